//! The edge in process on ephemeral ports, raw MQTT packets, raw HTTP, metrics by name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::{SinkExt, StreamExt};
use lps_common::config::{
    ENV_HTTP_HOST, ENV_HTTP_PORT, ENV_MQTT_HOST, ENV_MQTT_PORT, ENV_PROXY_PORT,
    ENV_SHUTDOWN_GRACE_SECS,
};
use lps_edge::{Config, Listeners};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// An edge serving on 127.0.0.1, both listeners on free ports.
pub struct Edge {
    pub http: SocketAddr,
    pub proxy: Option<SocketAddr>,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Edge {
    /// Starts an edge for `broker_port` with `extra` variables.
    pub async fn start(broker_port: u16, extra: &[(&str, &str)]) -> Self {
        let broker_port = broker_port.to_string();
        let mut env: HashMap<String, String> = [
            (ENV_HTTP_HOST, "127.0.0.1"),
            (ENV_HTTP_PORT, "0"),
            (ENV_PROXY_PORT, "0"),
            (ENV_MQTT_HOST, "127.0.0.1"),
            (ENV_MQTT_PORT, broker_port.as_str()),
            (ENV_SHUTDOWN_GRACE_SECS, "2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let config = Config::from_lookup(&env).expect("edge configuration");
        let listeners = Listeners::bind(&config).expect("bind");
        let http = listeners.http.local_addr().unwrap();
        let proxy = listeners.proxy.as_ref().map(|l| l.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(lps_edge::serve(config, listeners, stop.clone()));
        Self {
            http,
            proxy,
            stop,
            task: Some(task),
        }
    }

    /// `ws://127.0.0.1:PORT/mqtt`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/mqtt", self.http)
    }

    /// The proxy's address.
    pub fn proxy(&self) -> SocketAddr {
        self.proxy.expect("proxy listener on")
    }

    /// Stops the edge the way SIGTERM would and waits for it.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        lps_testkit::scrape(&format!("http://{}", self.http)).await
    }

    /// One series of `/metrics`, by exact name and labels (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics().await, series)
    }

    /// Polls `series` until it equals `want`, within `within`.
    pub async fn wait_metric(&self, series: &str, want: f64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.metric(series).await;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {got}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The value of the series `name{labels}` as written here (0 when absent), read by name
/// and labels with [`lps_testkit::metric`]. The label values here hold no `,` or `"`.
pub fn metric(text: &str, series: &str) -> f64 {
    let (name, labels) = series.split_once('{').map_or((series, ""), |(name, rest)| {
        (name, rest.trim_end_matches('}'))
    });
    let labels: Vec<(&str, &str)> = labels
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key, value.trim_matches('"')))
        .collect();
    lps_testkit::metric(text, name, &labels).unwrap_or(0.0)
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `url` offering `protocol`.
pub async fn ws_connect(
    url: &str,
    protocol: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    if let Some(protocol) = protocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocol.parse().unwrap());
    }
    let (ws, response) = tokio_tungstenite::connect_async(request).await?;
    if let Some(protocol) = protocol {
        assert_eq!(
            response.headers().get("sec-websocket-protocol").unwrap(),
            protocol
        );
    }
    Ok(ws)
}

/// MQTT 3.1.1 packets, written by hand so that the tests control every byte and frame.
pub mod mqtt {
    /// Appends the variable-length "remaining length".
    fn remaining(out: &mut Vec<u8>, mut len: usize) {
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                return;
            }
        }
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        remaining(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    /// CONNECT (3.1.1, clean session) with `keep_alive` seconds and an optional will
    /// (topic, payload; QoS 0).
    pub fn connect(client_id: &str, keep_alive: u16, will: Option<(&str, &str)>) -> Vec<u8> {
        let mut body = Vec::new();
        string(&mut body, b"MQTT");
        body.push(4);
        body.push(0x02 | if will.is_some() { 0x04 } else { 0 });
        body.extend_from_slice(&keep_alive.to_be_bytes());
        string(&mut body, client_id.as_bytes());
        if let Some((topic, payload)) = will {
            string(&mut body, topic.as_bytes());
            string(&mut body, payload.as_bytes());
        }
        packet(0x10, &body)
    }

    /// PUBLISH at QoS 0.
    pub fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        string(&mut body, topic.as_bytes());
        body.extend_from_slice(payload);
        packet(0x30, &body)
    }

    pub const PINGREQ: [u8; 2] = [0xC0, 0];
    pub const DISCONNECT: [u8; 2] = [0xE0, 0];
    pub const CONNACK_TYPE: u8 = 2;
    pub const PINGRESP_TYPE: u8 = 13;

    /// Splits whole packets off `buffer`: (type, body).
    pub fn parse(buffer: &mut bytes::BytesMut) -> Vec<(u8, Vec<u8>)> {
        use bytes::Buf;
        let mut packets = Vec::new();
        loop {
            let mut len = 0usize;
            let mut shift = 0;
            let mut i = 1;
            let complete = loop {
                let Some(byte) = buffer.get(i) else {
                    break false;
                };
                len |= usize::from(byte & 0x7F) << shift;
                shift += 7;
                i += 1;
                if byte & 0x80 == 0 {
                    break true;
                }
            };
            if !complete || buffer.len() < i + len {
                return packets;
            }
            let kind = buffer[0] >> 4;
            buffer.advance(i);
            packets.push((kind, buffer.split_to(len).to_vec()));
        }
    }
}

/// Reads MQTT packets from a WebSocket, whatever the framing.
pub struct MqttReader {
    buffer: BytesMut,
    pub pings_from_server: usize,
}

impl MqttReader {
    pub fn new() -> Self {
        Self {
            buffer: BytesMut::new(),
            pings_from_server: 0,
        }
    }

    /// The next MQTT packet, or the message that ended the stream (`Err`).
    pub async fn next(&mut self, ws: &mut Ws) -> Result<(u8, Vec<u8>), String> {
        loop {
            if let Some(first) = mqtt::parse(&mut self.buffer).into_iter().next() {
                return Ok(first);
            }
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => self.buffer.extend_from_slice(&data),
                Some(Ok(Message::Ping(_))) => self.pings_from_server += 1,
                Some(Ok(Message::Close(frame))) => return Err(format!("close {frame:?}")),
                Some(Ok(other)) => return Err(format!("unexpected {other:?}")),
                Some(Err(e)) => return Err(format!("error {e}")),
                None => return Err("end of stream".into()),
            }
        }
    }
}

/// Opens a WebSocket and completes an MQTT 3.1.1 CONNECT.
pub async fn mqtt_over_ws(url: &str, connect: Vec<u8>) -> (Ws, MqttReader) {
    let mut ws = ws_connect(url, Some("mqtt")).await.expect("websocket");
    ws.send(Message::Binary(connect.into())).await.unwrap();
    let mut reader = MqttReader::new();
    let (kind, body) = tokio::time::timeout(Duration::from_secs(5), reader.next(&mut ws))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(
        (kind, body),
        (mqtt::CONNACK_TYPE, vec![0, 0]),
        "CONNACK accepted"
    );
    (ws, reader)
}

/// One HTTP/1.1 response read off a stream: status, headers (lower-case), body.
pub type RawResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// Reads one response (Content-Length bodies only; HEAD-less) from `stream`, keeping
/// what follows it in `buffer`.
pub async fn read_response(stream: &mut TcpStream, buffer: &mut BytesMut) -> RawResponse {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status: u16 = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line in {head:?}"));
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            while buffer.len() < end + 4 + length {
                read_more(stream, buffer).await;
            }
            buffer.advance(end + 4);
            let body = buffer.split_to(length).to_vec();
            return (status, headers, body);
        }
        read_more(stream, buffer).await;
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut BytesMut) {
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(buffer))
        .await
        .expect("response in time")
        .expect("read");
    assert!(
        n > 0,
        "connection closed; so far: {:?}",
        String::from_utf8_lossy(buffer)
    );
}

/// `GET path` on `addr`, one request on a fresh connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    read_response(&mut stream, &mut BytesMut::new()).await
}

/// Sends `request` (a raw head, and body) to the proxy on a fresh connection and reads
/// one response.
pub async fn proxy_request(proxy: SocketAddr, request: &str) -> (TcpStream, RawResponse) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = read_response(&mut stream, &mut BytesMut::new()).await;
    (stream, response)
}

/// The header `name` of a response.
pub fn header<'a>(response: &'a RawResponse, name: &str) -> Option<&'a str> {
    response
        .1
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
