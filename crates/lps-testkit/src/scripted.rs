//! A scripted MQTT v5 peer: just enough of the protocol (MQTT v5 §3) to answer a client
//! the way a test wants, including ways no real broker can be made to answer on demand
//! (PUBREC 0x97, a QoS 2 handshake that never completes, a Maximum QoS below 2).
//!
//! Each connection gets CONNACK with the [`Script`]'s properties; PUBLISH QoS 2 is answered
//! per [`Qos2`], QoS 1 with PUBACK 0; SUBSCRIBE with SUBACK, PINGREQ with PINGRESP;
//! DISCONNECT closes. Every packet received is recorded. Nothing is routed to subscribers.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Control packet types (§2.1.2).
pub mod kind {
    /// CONNECT.
    pub const CONNECT: u8 = 1;
    /// PUBLISH.
    pub const PUBLISH: u8 = 3;
    /// PUBREL.
    pub const PUBREL: u8 = 6;
    /// SUBSCRIBE.
    pub const SUBSCRIBE: u8 = 8;
    /// PINGREQ.
    pub const PINGREQ: u8 = 12;
    /// DISCONNECT.
    pub const DISCONNECT: u8 = 14;
}

/// How a QoS 2 PUBLISH is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos2 {
    /// PUBREC 0x00, then PUBCOMP 0x00 on PUBREL.
    Complete,
    /// PUBREC with this reason code (e.g. 0x97 quota exceeded): the message is discarded.
    Refuse(u8),
    /// No answer to PUBLISH or PUBREL.
    Silent,
}

/// What the broker answers.
#[derive(Debug, Clone)]
pub struct Script {
    /// CONNACK Session Present flag.
    pub session_present: bool,
    /// CONNACK Maximum QoS property (0x24), absent when `None`.
    pub maximum_qos: Option<u8>,
    /// CONNACK Receive Maximum property (0x21), absent when `None`.
    pub receive_maximum: Option<u16>,
    /// The answer to a QoS 2 PUBLISH.
    pub qos2: Qos2,
    /// QoS granted to each SUBSCRIBE filter (capped at `maximum_qos`).
    pub granted_qos: u8,
}

impl Default for Script {
    /// A plain broker: no session, no limits, completes every handshake, grants QoS 1.
    fn default() -> Self {
        Self {
            session_present: false,
            maximum_qos: None,
            receive_maximum: None,
            qos2: Qos2::Complete,
            granted_qos: 1,
        }
    }
}

/// One packet the broker received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received {
    /// Which connection it came on, counting from 0 in accept order.
    pub connection: usize,
    /// Control packet type, see [`kind`].
    pub kind: u8,
    /// PUBLISH only: topic name.
    pub topic: String,
    /// PUBLISH only: QoS.
    pub qos: u8,
    /// PUBLISH only: payload.
    pub payload: Vec<u8>,
}

struct Shared {
    script: Mutex<Script>,
    received: Mutex<Vec<Received>>,
}

/// A scripted MQTT v5 broker on `127.0.0.1:0`; stops (closing every connection) when dropped.
pub struct ScriptedBroker {
    port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl ScriptedBroker {
    /// Listens and answers per `script`.
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            received: Mutex::default(),
        });
        let state = shared.clone();
        let accept = tokio::spawn(async move {
            // Owned here, so aborting this task aborts every connection too.
            let mut connections = JoinSet::new();
            for connection in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                connections.spawn(serve(stream, connection, state.clone()));
            }
        });
        Self {
            port,
            shared,
            accept,
        }
    }

    /// From now on answer QoS 2 with `qos2` (also on connections already open).
    pub fn set_qos2(&self, qos2: Qos2) {
        self.shared.script.lock().expect("lock").qos2 = qos2;
    }

    /// From now on answer per `script` (CONNACK properties apply to later connections).
    pub fn set_script(&self, script: Script) {
        *self.shared.script.lock().expect("lock") = script;
    }

    /// Every packet received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("lock").clone()
    }

    /// Every PUBLISH received so far.
    pub fn published(&self) -> Vec<Received> {
        let mut all = self.received();
        all.retain(|r| r.kind == kind::PUBLISH);
        all
    }
}

impl crate::Broker for ScriptedBroker {
    fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for ScriptedBroker {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Answers one connection until it closes, DISCONNECT, or a malformed packet.
async fn serve(stream: TcpStream, connection: usize, shared: Arc<Shared>) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    while let Ok((header, body)) = read_packet(&mut reader).await {
        let mut received = Received {
            connection,
            kind: header >> 4,
            ..Received::default()
        };
        let script = shared.script.lock().expect("lock").clone();
        let answer = answer(header, &body, &script, &mut received);
        shared.received.lock().expect("lock").push(received);
        let Ok(answer) = answer else { return };
        if header >> 4 == kind::DISCONNECT
            || (!answer.is_empty() && writer.write_all(&answer).await.is_err())
        {
            return;
        }
    }
}

/// Parses a packet as far as needed, fills in `received`, and returns the scripted answer
/// (empty for none).
fn answer(
    header: u8,
    body: &[u8],
    script: &Script,
    received: &mut Received,
) -> std::io::Result<Vec<u8>> {
    let mut body = Cursor(body);
    Ok(match header >> 4 {
        kind::CONNECT => connack(script),
        kind::PUBLISH => {
            let qos = (header >> 1) & 3;
            received.qos = qos;
            received.topic = String::from_utf8(body.string()?.to_vec()).map_err(malformed)?;
            let packet_id = if qos > 0 { body.u16()? } else { 0 };
            body.skip_properties()?;
            received.payload = body.0.to_vec();
            match (qos, script.qos2) {
                (1, _) => ack(0x40, packet_id, 0),
                (2, Qos2::Complete) => ack(0x50, packet_id, 0),
                (2, Qos2::Refuse(reason)) => ack(0x50, packet_id, reason),
                _ => Vec::new(),
            }
        }
        kind::PUBREL if script.qos2 != Qos2::Silent => ack(0x70, body.u16()?, 0),
        kind::SUBSCRIBE => {
            let granted = script.granted_qos.min(script.maximum_qos.unwrap_or(2));
            let mut suback = body.take(2)?.to_vec(); // packet id
            suback.push(0); // property length
            body.skip_properties()?;
            while !body.0.is_empty() {
                body.string()?; // topic filter
                body.take(1)?; // subscription options
                suback.push(granted);
            }
            frame(0x90, &suback)
        }
        kind::PINGREQ => vec![0xD0, 0],
        _ => Vec::new(),
    })
}

/// Reads the rest of a packet body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::io::Result<&'a [u8]> {
        if n > self.0.len() {
            return Err(malformed("packet shorter than its fields"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> std::io::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A length-prefixed string or binary (§1.5.4).
    fn string(&mut self) -> std::io::Result<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A property length and the properties, unread (§2.2.2).
    fn skip_properties(&mut self) -> std::io::Result<()> {
        let (len, used) = decode_varint(self.0).ok_or_else(|| malformed("bad property length"))?;
        self.take(used + len).map(drop)
    }
}

fn malformed(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, error)
}

/// Reads one packet: the fixed header's first byte and the body.
async fn read_packet(reader: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<(u8, Vec<u8>)> {
    let header = reader.read_u8().await?;
    let mut len = Vec::with_capacity(4);
    let len = loop {
        len.push(reader.read_u8().await?);
        match decode_varint(&len) {
            Some((value, _)) => break value,
            None if len.len() == 4 => return Err(malformed("remaining length over 4 bytes")),
            None => {}
        }
    };
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await?;
    Ok((header, body))
}

/// Largest value of a variable byte integer (§1.5.5).
const VARINT_MAX: usize = 268_435_455;

/// Appends `value` as a variable byte integer (§1.5.5); panics when it does not fit one.
pub fn encode_varint(mut value: usize, out: &mut Vec<u8>) {
    assert!(
        value <= VARINT_MAX,
        "{value} does not fit a variable byte integer"
    );
    loop {
        let byte = (value % 128) as u8;
        value /= 128;
        out.push(if value > 0 { byte | 0x80 } else { byte });
        if value == 0 {
            return;
        }
    }
}

/// The variable byte integer at the start of `bytes` and how many bytes it used; `None`
/// when it is incomplete or longer than 4 bytes.
fn decode_varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value += usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// A packet: fixed header byte, remaining length, body.
fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    encode_varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// PUBACK, PUBREC or PUBCOMP with a reason code and no properties (§3.4, §3.5, §3.7).
fn ack(header: u8, packet_id: u16, reason: u8) -> Vec<u8> {
    let [hi, lo] = packet_id.to_be_bytes();
    frame(header, &[hi, lo, reason, 0])
}

/// CONNACK: flags, reason 0 (success), then the scripted properties (§3.2).
fn connack(script: &Script) -> Vec<u8> {
    let mut properties = Vec::new();
    if let Some(qos) = script.maximum_qos {
        properties.extend([0x24, qos]);
    }
    if let Some(max) = script.receive_maximum {
        properties.push(0x21);
        properties.extend(max.to_be_bytes());
    }
    let mut body = vec![u8::from(script.session_present), 0];
    encode_varint(properties.len(), &mut body);
    body.extend(properties);
    frame(0x20, &body)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lps_common::mqtt::mqtt5::{self, MqttClient, PublishOptions, PublishResult, QoS};

    use super::*;
    use crate::Broker;

    #[test]
    fn remaining_length_round_trips_at_every_byte_boundary() {
        // The boundaries of §1.5.5's table.
        for (value, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (VARINT_MAX, 4),
        ] {
            let mut out = Vec::new();
            encode_varint(value, &mut out);
            assert_eq!(out.len(), len, "{value}");
            out.push(0x55); // what follows is not read
            assert_eq!(decode_varint(&out), Some((value, len)));
        }
        assert_eq!(decode_varint(&[0xC1, 0x02]), Some((321, 2)));
        assert_eq!(decode_varint(&[0x80, 0x80]), None, "incomplete");
        assert_eq!(decode_varint(&[0xFF; 5]), None, "over 4 bytes");
    }

    #[test]
    fn answers_publish_and_subscribe_as_scripted() {
        let mut script = Script::default();
        let mut received = Received::default();
        // PUBLISH QoS 2 to "a/b", packet id 7, one property (2 bytes), payload "hi".
        let publish = [0, 3, b'a', b'/', b'b', 0, 7, 2, 0x01, 0x01, b'h', b'i'];
        let pubrec = answer(0x34, &publish, &script, &mut received).unwrap();
        assert_eq!(pubrec, [0x50, 4, 0, 7, 0, 0]);
        assert_eq!(
            (received.topic.as_str(), received.qos, &received.payload[..]),
            ("a/b", 2, &b"hi"[..])
        );
        script.qos2 = Qos2::Refuse(0x97);
        let pubrec = answer(0x34, &publish, &script, &mut received).unwrap();
        assert_eq!(pubrec, [0x50, 4, 0, 7, 0x97, 0]);
        // SUBSCRIBE packet id 9, no properties, filters "x" and "y"; Maximum QoS 0 caps
        // the grant.
        script.maximum_qos = Some(0);
        let subscribe = [0, 9, 0, 0, 1, b'x', 1, 0, 1, b'y', 2];
        let suback = answer(0x82, &subscribe, &script, &mut received).unwrap();
        assert_eq!(suback, [0x90, 5, 0, 9, 0, 0, 0]);
        assert_eq!(
            connack(&script),
            [0x20, 5, 0, 0, 2, 0x24, 0],
            "CONNACK with Maximum QoS 0"
        );
        assert!(answer(0x34, &[0, 9, b'a'], &script, &mut received).is_err());
    }

    #[tokio::test]
    async fn a_real_client_completes_qos_2_and_sees_a_refusal() {
        let broker = ScriptedBroker::start(Script::default()).await;
        let client = MqttClient::new("scripted-round-trip");
        client
            .connect(&format!("mqtt://127.0.0.1:{}", broker.port()))
            .await
            .unwrap();
        client.subscribe("t/in", |_| {}).await.unwrap();
        let options = PublishOptions {
            qos: QoS::ExactlyOnce,
            ..PublishOptions::default()
        };
        let sent = client
            .publish_with_options("t/out", b"one".to_vec(), options.clone())
            .await
            .unwrap();
        assert!(
            matches!(sent, PublishResult::Sent(d) if d.qos_used() == QoS::ExactlyOnce),
            "{sent:?}"
        );
        broker.set_qos2(Qos2::Refuse(0x97));
        let refused = tokio::time::timeout(
            Duration::from_secs(5),
            client.publish_with_options("t/out", b"two".to_vec(), options),
        )
        .await
        .unwrap();
        assert!(
            matches!(refused, Err(mqtt5::MqttError::PublishFailed(_))),
            "{refused:?}"
        );
        client.disconnect().await.unwrap();
        let kinds = crate::eventually("DISCONNECT received", Duration::from_secs(5), || {
            let kinds: Vec<u8> = broker.received().iter().map(|r| r.kind).collect();
            async move { kinds.contains(&kind::DISCONNECT).then_some(kinds) }
        })
        .await;
        assert_eq!(
            kinds,
            [
                kind::CONNECT,
                kind::SUBSCRIBE,
                kind::PUBLISH,
                kind::PUBREL,
                kind::PUBLISH,
                kind::DISCONNECT
            ]
        );
        let published = broker.published();
        assert_eq!(
            (published[0].topic.as_str(), published[0].qos),
            ("t/out", 2)
        );
        assert_eq!(published[1].payload, b"two");
    }
}
