//! A raw MQTT v5 client written from the specification (OASIS MQTT Version 5.0, §2-§3),
//! so the conformance tests see exactly what a broker puts on the wire: every property in
//! order, the DUP flag, packet sizes, topic aliases. It shares no code with either broker.
//!
//! Everything waits against [`DEADLINE`] and panics with what it was waiting for.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use lps_testkit::scripted::encode_varint;

/// How long any single wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A property (§2.2.2.2, table 2-4), typed by its identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prop {
    /// 0x01 Payload Format Indicator.
    PayloadFormat(u8),
    /// 0x02 Message Expiry Interval.
    MessageExpiry(u32),
    /// 0x03 Content Type.
    ContentType(String),
    /// 0x08 Response Topic.
    ResponseTopic(String),
    /// 0x09 Correlation Data.
    CorrelationData(Vec<u8>),
    /// 0x0B Subscription Identifier.
    SubscriptionId(u32),
    /// 0x11 Session Expiry Interval.
    SessionExpiry(u32),
    /// 0x12 Assigned Client Identifier.
    AssignedClientId(String),
    /// 0x13 Server Keep Alive.
    ServerKeepAlive(u16),
    /// 0x18 Will Delay Interval.
    WillDelay(u32),
    /// 0x1F Reason String.
    ReasonString(String),
    /// 0x21 Receive Maximum.
    ReceiveMaximum(u16),
    /// 0x22 Topic Alias Maximum.
    TopicAliasMaximum(u16),
    /// 0x23 Topic Alias.
    TopicAlias(u16),
    /// 0x26 User Property.
    User(String, String),
    /// 0x27 Maximum Packet Size.
    MaximumPacketSize(u32),
    /// 0x29 Subscription Identifier Available.
    SubscriptionIdsAvailable(u8),
    /// 0x2A Shared Subscription Available.
    SharedAvailable(u8),
    /// Any other property, raw: identifier, then its encoded value.
    Other(u8, Vec<u8>),
}

impl Prop {
    /// A user property.
    pub fn user(key: &str, value: &str) -> Self {
        Self::User(key.to_owned(), value.to_owned())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::PayloadFormat(v) => out.extend([0x01, *v]),
            Self::MessageExpiry(v) => u32_prop(out, 0x02, *v),
            Self::ContentType(v) => str_prop(out, 0x03, v),
            Self::ResponseTopic(v) => str_prop(out, 0x08, v),
            Self::CorrelationData(v) => {
                out.push(0x09);
                binary(out, v);
            }
            Self::SubscriptionId(v) => {
                out.push(0x0B);
                encode_varint(*v as usize, out);
            }
            Self::SessionExpiry(v) => u32_prop(out, 0x11, *v),
            Self::AssignedClientId(v) => str_prop(out, 0x12, v),
            Self::ServerKeepAlive(v) => u16_prop(out, 0x13, *v),
            Self::WillDelay(v) => u32_prop(out, 0x18, *v),
            Self::ReasonString(v) => str_prop(out, 0x1F, v),
            Self::ReceiveMaximum(v) => u16_prop(out, 0x21, *v),
            Self::TopicAliasMaximum(v) => u16_prop(out, 0x22, *v),
            Self::TopicAlias(v) => u16_prop(out, 0x23, *v),
            Self::User(k, v) => {
                out.push(0x26);
                string(out, k);
                string(out, v);
            }
            Self::MaximumPacketSize(v) => u32_prop(out, 0x27, *v),
            Self::SubscriptionIdsAvailable(v) => out.extend([0x29, *v]),
            Self::SharedAvailable(v) => out.extend([0x2A, *v]),
            Self::Other(id, raw) => {
                out.push(*id);
                out.extend(raw);
            }
        }
    }

    fn decode(cur: &mut Cursor<'_>) -> Result<Self, String> {
        let id = cur.byte()?;
        Ok(match id {
            0x01 => Self::PayloadFormat(cur.byte()?),
            0x02 => Self::MessageExpiry(cur.u32()?),
            0x03 => Self::ContentType(cur.string()?),
            0x08 => Self::ResponseTopic(cur.string()?),
            0x09 => Self::CorrelationData(cur.binary()?.to_vec()),
            0x0B => Self::SubscriptionId(cur.varint()? as u32),
            0x11 => Self::SessionExpiry(cur.u32()?),
            0x12 => Self::AssignedClientId(cur.string()?),
            0x13 => Self::ServerKeepAlive(cur.u16()?),
            0x18 => Self::WillDelay(cur.u32()?),
            0x1F => Self::ReasonString(cur.string()?),
            0x21 => Self::ReceiveMaximum(cur.u16()?),
            0x22 => Self::TopicAliasMaximum(cur.u16()?),
            0x23 => Self::TopicAlias(cur.u16()?),
            0x26 => Self::User(cur.string()?, cur.string()?),
            0x27 => Self::MaximumPacketSize(cur.u32()?),
            0x29 => Self::SubscriptionIdsAvailable(cur.byte()?),
            0x2A => Self::SharedAvailable(cur.byte()?),
            // The rest, by the type table 2-4 gives them.
            0x17 | 0x19 | 0x24 | 0x25 | 0x28 => Self::Other(id, cur.take(1)?.to_vec()),
            0x1A | 0x1C | 0x15 => Self::Other(id, cur.binary()?.to_vec()),
            0x16 => Self::Other(id, cur.binary()?.to_vec()),
            _ => return Err(format!("unknown property identifier {id:#04x}")),
        })
    }
}

/// Asserts `got` are the properties `want`: user properties in the same order (MQTT-3.3.2-18),
/// the others in any order (the specification fixes no order for them).
#[track_caller]
pub fn assert_props(got: &[Prop], want: &[Prop]) {
    let users = |props: &[Prop]| -> Vec<Prop> {
        props
            .iter()
            .filter(|p| matches!(p, Prop::User(..)))
            .cloned()
            .collect()
    };
    let others = |props: &[Prop]| -> Vec<String> {
        let mut others: Vec<String> = props
            .iter()
            .filter(|p| !matches!(p, Prop::User(..)))
            .map(|p| format!("{p:?}"))
            .collect();
        others.sort();
        others
    };
    assert_eq!(users(got), users(want), "user properties, in order");
    assert_eq!(others(got), others(want), "the other properties");
}

fn u16_prop(out: &mut Vec<u8>, id: u8, v: u16) {
    out.push(id);
    out.extend(v.to_be_bytes());
}

fn u32_prop(out: &mut Vec<u8>, id: u8, v: u32) {
    out.push(id);
    out.extend(v.to_be_bytes());
}

fn str_prop(out: &mut Vec<u8>, id: u8, v: &str) {
    out.push(id);
    string(out, v);
}

/// A UTF-8 string or binary data: two-byte length, then the bytes (§1.5.4, §1.5.6).
fn binary(out: &mut Vec<u8>, v: &[u8]) {
    out.extend(u16::try_from(v.len()).expect("short field").to_be_bytes());
    out.extend(v);
}

fn string(out: &mut Vec<u8>, v: &str) {
    binary(out, v.as_bytes());
}

/// Properties with their length in front (§2.2.2.1).
fn properties(out: &mut Vec<u8>, props: &[Prop]) {
    let mut encoded = Vec::new();
    for prop in props {
        prop.encode(&mut encoded);
    }
    encode_varint(encoded.len(), out);
    out.extend(encoded);
}

/// A packet: fixed header byte, remaining length, variable header and payload (§2.1).
fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    encode_varint(body.len(), &mut out);
    out.extend(body);
    out
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err(format!("packet ends {} bytes early", n - self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn binary(&mut self) -> Result<&'a [u8], String> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.binary()?.to_vec()).map_err(|e| e.to_string())
    }

    fn varint(&mut self) -> Result<usize, String> {
        let mut value = 0;
        for i in 0..4 {
            let byte = self.byte()?;
            value += usize::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("variable byte integer over 4 bytes".into())
    }

    fn properties(&mut self) -> Result<Vec<Prop>, String> {
        let len = self.varint()?;
        let mut inner = Cursor(self.take(len)?);
        let mut props = Vec::new();
        while !inner.0.is_empty() {
            props.push(Prop::decode(&mut inner)?);
        }
        Ok(props)
    }
}

/// An application message as PUBLISH carries it (§3.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publish {
    /// Topic name; empty when a topic alias stands for it.
    pub topic: String,
    /// 0, 1 or 2.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// DUP flag.
    pub dup: bool,
    /// Packet identifier (0 at QoS 0).
    pub packet_id: u16,
    /// Properties in wire order.
    pub props: Vec<Prop>,
    /// Payload.
    pub payload: Vec<u8>,
    /// Received only: the whole packet's size on the wire, fixed header included.
    pub wire_len: usize,
}

impl Publish {
    /// A QoS 0 message.
    pub fn new(topic: &str, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: topic.to_owned(),
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// At QoS `qos`.
    pub fn qos(mut self, qos: u8) -> Self {
        self.qos = qos;
        self
    }

    /// With the RETAIN flag.
    pub fn retained(mut self) -> Self {
        self.retain = true;
        self
    }

    /// With these properties, in this order.
    pub fn props(mut self, props: Vec<Prop>) -> Self {
        self.props = props;
        self
    }

    /// Its subscription identifiers, in order.
    pub fn subscription_ids(&self) -> Vec<u32> {
        self.props
            .iter()
            .filter_map(|p| match p {
                Prop::SubscriptionId(id) => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Its Topic Alias property, if any.
    pub fn topic_alias(&self) -> Option<u16> {
        self.props.iter().find_map(|p| match p {
            Prop::TopicAlias(a) => Some(*a),
            _ => None,
        })
    }

    /// The payload as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The encoded packet.
    pub fn encode(&self) -> Vec<u8> {
        let header = 0x30 | (self.qos << 1) | u8::from(self.retain) | (u8::from(self.dup) << 3);
        let mut body = Vec::new();
        string(&mut body, &self.topic);
        if self.qos > 0 {
            body.extend(self.packet_id.to_be_bytes());
        }
        properties(&mut body, &self.props);
        body.extend(&self.payload);
        frame(header, &body)
    }

    fn decode(header: u8, body: &[u8], wire_len: usize) -> Result<Self, String> {
        let mut cur = Cursor(body);
        let qos = (header >> 1) & 3;
        let topic = cur.string()?;
        let packet_id = if qos > 0 { cur.u16()? } else { 0 };
        let props = cur.properties()?;
        Ok(Self {
            topic,
            qos,
            retain: header & 1 == 1,
            dup: header & 8 == 8,
            packet_id,
            props,
            payload: cur.0.to_vec(),
            wire_len,
        })
    }
}

/// A packet from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNACK (§3.2).
    ConnAck(ConnAck),
    /// PUBLISH (§3.3).
    Publish(Publish),
    /// PUBACK (§3.4): packet id, reason code.
    PubAck(u16, u8),
    /// PUBREC (§3.5).
    PubRec(u16, u8),
    /// PUBREL (§3.6).
    PubRel(u16, u8),
    /// PUBCOMP (§3.7).
    PubComp(u16, u8),
    /// SUBACK (§3.9): packet id, one reason code per filter.
    SubAck(u16, Vec<u8>),
    /// UNSUBACK (§3.11).
    UnsubAck(u16, Vec<u8>),
    /// PINGRESP (§3.13).
    PingResp,
    /// DISCONNECT (§3.14): reason code.
    Disconnect(u8),
    /// Anything else: its packet type.
    Other(u8),
}

/// What CONNACK said (§3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present flag.
    pub session_present: bool,
    /// Connect Reason Code.
    pub reason: u8,
    /// Properties in wire order.
    pub props: Vec<Prop>,
}

impl ConnAck {
    /// The broker's Topic Alias Maximum (0 when absent, §3.2.2.3.8).
    pub fn topic_alias_maximum(&self) -> u16 {
        self.props
            .iter()
            .find_map(|p| match p {
                Prop::TopicAliasMaximum(v) => Some(*v),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// The Server Keep Alive, if the broker set one (§3.2.2.3.14).
    pub fn server_keep_alive(&self) -> Option<u16> {
        self.props.iter().find_map(|p| match p {
            Prop::ServerKeepAlive(v) => Some(*v),
            _ => None,
        })
    }
}

fn decode(header: u8, body: &[u8], wire_len: usize) -> Result<Packet, String> {
    let mut cur = Cursor(body);
    // PUBACK..PUBCOMP: packet id, then reason code and properties unless the remaining
    // length is 2 (reason 0x00, §3.4.2.1).
    let ack = |cur: &mut Cursor<'_>| -> Result<(u16, u8), String> {
        let id = cur.u16()?;
        let reason = if cur.0.is_empty() { 0 } else { cur.byte()? };
        Ok((id, reason))
    };
    Ok(match header >> 4 {
        2 => {
            let flags = cur.byte()?;
            let reason = cur.byte()?;
            let props = cur.properties()?;
            Packet::ConnAck(ConnAck {
                session_present: flags & 1 == 1,
                reason,
                props,
            })
        }
        3 => Packet::Publish(Publish::decode(header, body, wire_len)?),
        4 => ack(&mut cur).map(|(id, r)| Packet::PubAck(id, r))?,
        5 => ack(&mut cur).map(|(id, r)| Packet::PubRec(id, r))?,
        6 => ack(&mut cur).map(|(id, r)| Packet::PubRel(id, r))?,
        7 => ack(&mut cur).map(|(id, r)| Packet::PubComp(id, r))?,
        9 | 11 => {
            let id = cur.u16()?;
            cur.properties()?;
            let reasons = cur.0.to_vec();
            if header >> 4 == 9 {
                Packet::SubAck(id, reasons)
            } else {
                Packet::UnsubAck(id, reasons)
            }
        }
        13 => Packet::PingResp,
        14 => Packet::Disconnect(if cur.0.is_empty() { 0 } else { cur.byte()? }),
        kind => Packet::Other(kind),
    })
}

/// A Will Message (§3.1.3.2-§3.1.3.4).
#[derive(Debug, Clone, Default)]
pub struct Will {
    /// Will Topic.
    pub topic: String,
    /// Will Payload.
    pub payload: Vec<u8>,
    /// Will QoS.
    pub qos: u8,
    /// Will Retain.
    pub retain: bool,
    /// Will Properties, in order.
    pub props: Vec<Prop>,
}

/// A CONNECT packet (§3.1).
#[derive(Debug, Clone)]
pub struct Connect {
    /// Client Identifier.
    pub client_id: String,
    /// Clean Start flag.
    pub clean_start: bool,
    /// Keep Alive in seconds.
    pub keep_alive: u16,
    /// CONNECT properties, in order.
    pub props: Vec<Prop>,
    /// Will Message, if any.
    pub will: Option<Will>,
}

impl Connect {
    /// Clean Start, Keep Alive 60 s, no properties, no will.
    pub fn new(client_id: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            clean_start: true,
            keep_alive: 60,
            props: Vec::new(),
            will: None,
        }
    }

    /// Adds a CONNECT property.
    pub fn prop(mut self, prop: Prop) -> Self {
        self.props.push(prop);
        self
    }

    /// A session that outlives the connection by `seconds`.
    pub fn session_expiry(self, seconds: u32) -> Self {
        self.prop(Prop::SessionExpiry(seconds))
    }

    /// Clean Start off: resume the session if the broker has one.
    pub fn resume(mut self) -> Self {
        self.clean_start = false;
        self
    }

    /// Keep Alive `seconds`.
    pub fn keep_alive(mut self, seconds: u16) -> Self {
        self.keep_alive = seconds;
        self
    }

    /// With a will.
    pub fn will(mut self, will: Will) -> Self {
        self.will = Some(will);
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        string(&mut body, "MQTT");
        body.push(5);
        let mut flags = u8::from(self.clean_start) << 1;
        if let Some(will) = &self.will {
            flags |= 0x04 | (will.qos << 3) | (u8::from(will.retain) << 5);
        }
        body.push(flags);
        body.extend(self.keep_alive.to_be_bytes());
        properties(&mut body, &self.props);
        string(&mut body, &self.client_id);
        if let Some(will) = &self.will {
            properties(&mut body, &will.props);
            string(&mut body, &will.topic);
            binary(&mut body, &will.payload);
        }
        frame(0x10, &body)
    }
}

/// How a connection ended, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The broker sent DISCONNECT with this reason code, then closed.
    Disconnect(u8),
    /// The broker closed the connection without DISCONNECT.
    Eof,
}

/// One connection to a broker.
pub struct Client {
    /// What the broker answered to CONNECT.
    pub connack: ConnAck,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u16,
    /// Packets read while waiting for something else, oldest first.
    pending: VecDeque<Packet>,
}

impl Client {
    /// Connects and asserts CONNACK success.
    pub async fn connect(port: u16, connect: Connect) -> Self {
        let client = Self::try_connect(port, connect.clone()).await;
        assert_eq!(
            client.connack.reason, 0,
            "CONNACK for {}: {:?}",
            connect.client_id, client.connack
        );
        client
    }

    /// Connects and returns whatever CONNACK said.
    pub async fn try_connect(port: u16, connect: Connect) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        let (reader, writer) = stream.into_split();
        let mut client = Self {
            connack: ConnAck {
                session_present: false,
                reason: 0xFF,
                props: Vec::new(),
            },
            reader: BufReader::new(reader),
            writer,
            next_id: 0,
            pending: VecDeque::new(),
        };
        client.send(&connect.encode()).await;
        match client.recv().await {
            Packet::ConnAck(connack) => client.connack = connack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
        client
    }

    /// A connection with Clean Start and no session.
    pub async fn plain(port: u16, client_id: &str) -> Self {
        Self::connect(port, Connect::new(client_id)).await
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write to broker");
    }

    /// The next packet id (never 0, wraps).
    pub fn packet_id(&mut self) -> u16 {
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        self.next_id
    }

    async fn read(&mut self) -> Result<Packet, Closed> {
        let header = self.reader.read_u8().await.map_err(|_| Closed::Eof)?;
        let mut len_bytes = 1;
        let mut len = 0usize;
        for i in 0..4 {
            let byte = self.reader.read_u8().await.map_err(|_| Closed::Eof)?;
            len += usize::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                break;
            }
            len_bytes += 1;
        }
        let mut body = vec![0; len];
        self.reader
            .read_exact(&mut body)
            .await
            .map_err(|_| Closed::Eof)?;
        decode(header, &body, 1 + len_bytes + len)
            .map_err(|e| panic!("malformed packet from the broker ({header:#04x}): {e}"))
    }

    /// The next packet, or how the connection ended, within `within`; `None` on timeout.
    pub async fn recv_within(&mut self, within: Duration) -> Option<Result<Packet, Closed>> {
        if let Some(packet) = self.pending.pop_front() {
            return Some(Ok(packet));
        }
        tokio::time::timeout(within, self.read()).await.ok()
    }

    /// The next packet; panics on timeout or a closed connection.
    pub async fn recv(&mut self) -> Packet {
        match self.recv_within(DEADLINE).await {
            Some(Ok(packet)) => packet,
            Some(Err(closed)) => panic!("connection closed while waiting for a packet: {closed:?}"),
            None => panic!("no packet within {DEADLINE:?}"),
        }
    }

    /// Reads packets until one matches `want`, keeping the others for later.
    async fn wait_for(&mut self, what: &str, want: impl Fn(&Packet) -> bool) -> Packet {
        let mut skipped = Vec::new();
        let found = loop {
            let packet = match tokio::time::timeout(DEADLINE, self.read()).await {
                Ok(Ok(packet)) => packet,
                Ok(Err(closed)) => panic!("connection closed waiting for {what}: {closed:?}"),
                Err(_) => panic!("no {what} within {DEADLINE:?}"),
            };
            if want(&packet) {
                break packet;
            }
            skipped.push(packet);
        };
        self.pending.extend(skipped);
        found
    }

    /// Subscribes `filter` with subscription `options` (§3.8.3.1: QoS in bits 0-1, No Local
    /// 2, Retain As Published 3, Retain Handling 4-5) and `props`; returns the reason code.
    pub async fn subscribe_with(&mut self, filter: &str, options: u8, props: Vec<Prop>) -> u8 {
        let id = self.packet_id();
        let mut body = id.to_be_bytes().to_vec();
        properties(&mut body, &props);
        string(&mut body, filter);
        body.push(options);
        self.send(&frame(0x82, &body)).await;
        match self
            .wait_for("SUBACK", |p| matches!(p, Packet::SubAck(i, _) if *i == id))
            .await
        {
            Packet::SubAck(_, reasons) => reasons[0],
            _ => unreachable!(),
        }
    }

    /// Subscribes `filter` at `qos`; asserts it was granted.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) {
        let granted = self.subscribe_with(filter, qos, Vec::new()).await;
        assert_eq!(granted, qos, "SUBACK for {filter}");
    }

    /// Unsubscribes `filter`.
    pub async fn unsubscribe(&mut self, filter: &str) {
        let id = self.packet_id();
        let mut body = id.to_be_bytes().to_vec();
        properties(&mut body, &[]);
        string(&mut body, filter);
        self.send(&frame(0xA2, &body)).await;
        self.wait_for(
            "UNSUBACK",
            |p| matches!(p, Packet::UnsubAck(i, _) if *i == id),
        )
        .await;
    }

    /// Sends `publish` (a packet id is assigned at QoS 1 and 2) without waiting; returns
    /// the packet id.
    pub async fn publish_nowait(&mut self, mut publish: Publish) -> u16 {
        if publish.qos > 0 {
            publish.packet_id = self.packet_id();
        }
        self.send(&publish.encode()).await;
        publish.packet_id
    }

    /// Publishes and completes the QoS flow (PUBACK, or PUBREC/PUBREL/PUBCOMP); returns
    /// the reason code of PUBACK or PUBREC (0 at QoS 0).
    pub async fn publish(&mut self, publish: Publish) -> u8 {
        let qos = publish.qos;
        let id = self.publish_nowait(publish).await;
        match qos {
            0 => 0,
            1 => match self
                .wait_for("PUBACK", |p| matches!(p, Packet::PubAck(i, _) if *i == id))
                .await
            {
                Packet::PubAck(_, reason) => reason,
                _ => unreachable!(),
            },
            _ => {
                let reason = match self
                    .wait_for("PUBREC", |p| matches!(p, Packet::PubRec(i, _) if *i == id))
                    .await
                {
                    Packet::PubRec(_, reason) => reason,
                    _ => unreachable!(),
                };
                if reason < 0x80 {
                    self.send(&ack(0x62, id)).await;
                    self.wait_for(
                        "PUBCOMP",
                        |p| matches!(p, Packet::PubComp(i, _) if *i == id),
                    )
                    .await;
                }
                reason
            }
        }
    }

    /// The next PUBLISH, not acknowledged. PUBREL is answered with PUBCOMP and PINGRESP
    /// skipped on the way.
    pub async fn next_publish(&mut self) -> Publish {
        loop {
            match self.recv().await {
                Packet::Publish(publish) => return publish,
                Packet::PubRel(id, _) => self.pubcomp(id).await,
                Packet::PingResp => {}
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    /// Acknowledges a received message: PUBACK at QoS 1, PUBREC at QoS 2 (the broker's
    /// PUBREL is answered by [`Client::next_publish`] or [`Client::drain_pubrels`]).
    pub async fn ack(&mut self, publish: &Publish) {
        match publish.qos {
            1 => self.send(&ack(0x40, publish.packet_id)).await,
            2 => self.send(&ack(0x50, publish.packet_id)).await,
            _ => {}
        }
    }

    /// Sends PUBCOMP.
    pub async fn pubcomp(&mut self, id: u16) {
        self.send(&ack(0x70, id)).await;
    }

    /// The next `n` messages, each acknowledged as it arrives.
    pub async fn take(&mut self, n: usize) -> Vec<Publish> {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            let publish = self.next_publish().await;
            self.ack(&publish).await;
            got.push(publish);
        }
        got
    }

    /// The next `n` messages, not acknowledged.
    pub async fn take_unacked(&mut self, n: usize) -> Vec<Publish> {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            got.push(self.next_publish().await);
        }
        got
    }

    /// Round trip: PINGREQ, then every packet up to PINGRESP (PUBRELs answered). A broker
    /// handles one connection's packets in order, so anything it had already sent this
    /// client is in the result.
    pub async fn ping(&mut self) -> Vec<Packet> {
        self.send(&[0xC0, 0]).await;
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                Packet::PingResp => return before,
                Packet::PubRel(id, _) => self.pubcomp(id).await,
                other => before.push(other),
            }
        }
    }

    /// Sends DISCONNECT 0x00 and waits until the broker closes the connection: the broker
    /// has then handled it (its will discarded, its session stored).
    pub async fn disconnect(self) {
        self.disconnect_with(0x00).await;
    }

    /// Sends DISCONNECT with `reason` (e.g. 0x04, disconnect with Will Message) and waits
    /// until the broker closes the connection.
    pub async fn disconnect_with(mut self, reason: u8) {
        self.send(&[0xE0, 1, reason]).await;
        let closed = self.closed(DEADLINE).await;
        assert_eq!(closed, Closed::Eof, "after DISCONNECT");
    }

    /// Reads (answering nothing) until the broker closes the connection; panics if it is
    /// still open after `within`. Packets read on the way are dropped.
    pub async fn closed(&mut self, within: Duration) -> Closed {
        let deadline = tokio::time::Instant::now() + within;
        let mut reason = None;
        loop {
            match tokio::time::timeout_at(deadline, self.read()).await {
                Ok(Ok(Packet::Disconnect(r))) => reason = Some(r),
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return reason.map_or(Closed::Eof, Closed::Disconnect),
                Err(_) => panic!("the broker kept the connection open for {within:?}"),
            }
        }
    }
}

/// PUBACK/PUBREC/PUBREL/PUBCOMP with reason 0x00 in the short form (§3.4.2.1).
fn ack(header: u8, id: u16) -> Vec<u8> {
    frame(header, &id.to_be_bytes())
}
