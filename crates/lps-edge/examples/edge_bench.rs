//! Load generators for the edge's benchmark (`crates/lps-edge/bench.sh` runs them; wrk does
//! the plain forward-proxy matrix):
//!
//! - `connect-tls PROXY|- TARGET PATH SECONDS CONNECTIONS`: each request is a fresh
//!   `CONNECT TARGET` through PROXY (or a direct TCP connection with `-`), a full TLS
//!   handshake (no resumption, as the seed's siege runs), `GET PATH`, the whole answer,
//!   close. Prints requests/s, MB/s and latency percentiles.
//! - `ws URL|mqtt://HOST:PORT BROKER_PORT CLIENTS RATE SECONDS`: CLIENTS MQTT 3.1.1
//!   clients publish RATE msg/s each (QoS 0, 64-byte payload carrying the send time)
//!   over WebSocket to URL (the edge) or over TCP straight to the broker; one TCP
//!   subscriber on BROKER_PORT measures delivery and end-to-end latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("connect-tls") if args.len() == 6 => {
            connect_tls(
                &args[1],
                &args[2],
                &args[3],
                args[4].parse()?,
                args[5].parse()?,
            )
            .await
        }
        Some("ws") if args.len() == 6 => {
            ws(
                &args[1],
                args[2].parse()?,
                args[3].parse()?,
                args[4].parse()?,
                args[5].parse()?,
            )
            .await
        }
        _ => {
            eprintln!(
                "usage: edge_bench connect-tls PROXY|- HOST:PORT PATH SECONDS CONNECTIONS\n       \
                 edge_bench ws ws://EDGE/mqtt|mqtt://HOST:PORT BROKER_PORT CLIENTS RATE SECONDS"
            );
            std::process::exit(64);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The benchmark trusts any certificate: it measures the tunnel, not the PKI.
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        tokio_rustls::rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn connect_tls(
    proxy: &str,
    target: &str,
    path: &str,
    seconds: u64,
    connections: usize,
) -> Result<(), Error> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    // A full handshake per request, as a client without session tickets.
    config.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    let connector = TlsConnector::from(Arc::new(config));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let bytes = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (connector, bytes) = (connector.clone(), bytes.clone());
        let (proxy, target, path) = (proxy.to_owned(), target.to_owned(), path.to_owned());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let start = Instant::now();
                match one_tls_request(&connector, &proxy, &target, &path).await {
                    Ok(n) => {
                        bytes.fetch_add(n, Ordering::Relaxed);
                        latencies.push(start.elapsed());
                    }
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (l, e) = worker.await?;
        latencies.extend(l);
        errors += e;
    }
    latencies.sort_unstable();
    let secs = seconds as f64;
    println!(
        "connect-tls via={proxy} {path}: {:.1} req/s, {:.2} MB/s, p50 {:.1} ms, p99 {:.1} ms, errors {errors}",
        latencies.len() as f64 / secs,
        bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
    Ok(())
}

async fn one_tls_request(
    connector: &TlsConnector,
    proxy: &str,
    target: &str,
    path: &str,
) -> Result<u64, Error> {
    let tcp = if proxy == "-" {
        TcpStream::connect(target).await?
    } else {
        let mut tcp = TcpStream::connect(proxy).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if tcp.read(&mut byte).await? == 0 {
                return Err("proxy closed".into());
            }
            head.push(byte[0]);
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            return Err(String::from_utf8_lossy(&head).into_owned().into());
        }
        tcp
    };
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    read_all(&mut tls).await
}

async fn read_all<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<u64, Error> {
    let mut buffer = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            // nginx may close without close_notify after `Connection: close`.
            Err(e) if total > 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(total);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn mqtt_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn mqtt_packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn mqtt_connect(id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    mqtt_string(&mut body, id.as_bytes());
    mqtt_packet(0x10, &body)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

async fn ws(
    url: &str,
    broker_port: u16,
    clients: usize,
    rate: f64,
    seconds: u64,
) -> Result<(), Error> {
    // The subscriber: plain TCP to the broker, QoS 0, measures latency from the payload.
    let mut sub = TcpStream::connect(("127.0.0.1", broker_port)).await?;
    sub.set_nodelay(true)?;
    sub.write_all(&mqtt_connect("bench-sub")).await?;
    let mut connack = [0u8; 4];
    sub.read_exact(&mut connack).await?;
    let mut body = vec![0, 1];
    mqtt_string(&mut body, b"bench/edge/#");
    body.push(0);
    sub.write_all(&mqtt_packet(0x82, &body)).await?;
    let mut suback = [0u8; 5];
    sub.read_exact(&mut suback).await?;
    let expected = (clients as f64 * rate * seconds as f64) as u64;
    let receiver = tokio::spawn(async move {
        let mut buffer = bytes::BytesMut::with_capacity(1 << 20);
        let mut latencies = Vec::with_capacity(expected as usize);
        let idle = Duration::from_secs(3);
        while let Ok(Ok(n)) = tokio::time::timeout(idle, sub.read_buf(&mut buffer)).await {
            if n == 0 {
                break;
            }
            // Parse whole PUBLISH packets: topic, then an 8-byte send time.
            loop {
                if buffer.len() < 2 {
                    break;
                }
                let (mut len, mut i, mut shift) = (0usize, 1usize, 0);
                let mut complete = false;
                while let Some(b) = buffer.get(i) {
                    len |= usize::from(b & 0x7F) << shift;
                    shift += 7;
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if !complete || buffer.len() < i + len {
                    break;
                }
                let packet = buffer.split_to(i + len);
                if packet[0] >> 4 == 3 {
                    let topic_len = usize::from(u16::from_be_bytes([packet[i], packet[i + 1]]));
                    let at = i + 2 + topic_len;
                    let sent = u64::from_be_bytes(packet[at..at + 8].try_into().unwrap_or([0; 8]));
                    latencies.push(Duration::from_micros(now_micros().saturating_sub(sent)));
                }
            }
            if latencies.len() as u64 >= expected {
                break;
            }
        }
        latencies
    });
    let start = Instant::now() + Duration::from_millis(500);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let per_client = (rate * seconds as f64) as u64;
    let mut publishers = Vec::new();
    for c in 0..clients {
        let url = url.to_owned();
        publishers.push(tokio::spawn(async move {
            let topic = format!("bench/edge/{c}");
            let publish = |_: u64| {
                let mut body = Vec::new();
                mqtt_string(&mut body, topic.as_bytes());
                body.extend_from_slice(&now_micros().to_be_bytes());
                body.extend_from_slice(&[b'x'; 56]);
                mqtt_packet(0x30, &body)
            };
            // Spread the clients over one interval.
            let offset = interval.mul_f64(c as f64 / clients as f64);
            if let Some(rest) = url.strip_prefix("mqtt://") {
                let mut tcp = TcpStream::connect(rest).await?;
                tcp.set_nodelay(true)?;
                tcp.write_all(&mqtt_connect(&format!("bench-{c}"))).await?;
                let mut connack = [0u8; 4];
                tcp.read_exact(&mut connack).await?;
                for i in 0..per_client {
                    tokio::time::sleep_until((start + offset + interval.mul_f64(i as f64)).into())
                        .await;
                    tcp.write_all(&publish(i)).await?;
                }
            } else {
                let mut request = url.as_str().into_client_request()?;
                request
                    .headers_mut()
                    .insert("sec-websocket-protocol", "mqtt".parse()?);
                let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
                ws.send(Message::Binary(mqtt_connect(&format!("bench-{c}")).into()))
                    .await?;
                let _connack = ws.next().await;
                let (mut sink, mut stream) = ws.split();
                // Drain whatever comes back (nothing at QoS 0, but keep the socket read).
                tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
                for i in 0..per_client {
                    tokio::time::sleep_until((start + offset + interval.mul_f64(i as f64)).into())
                        .await;
                    sink.send(Message::Binary(publish(i).into())).await?;
                }
            }
            Ok::<_, Error>(())
        }));
    }
    let mut failed = 0;
    for p in publishers {
        if !matches!(p.await, Ok(Ok(()))) {
            failed += 1;
        }
    }
    let mut latencies = receiver.await?;
    latencies.sort_unstable();
    println!(
        "ws via={url} clients={clients} rate={rate}/s each: sent {} received {} ({:.0} msg/s), \
         latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms, failed clients {failed}",
        per_client * clients as u64,
        latencies.len(),
        latencies.len() as f64 / seconds as f64,
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    Ok(())
}
