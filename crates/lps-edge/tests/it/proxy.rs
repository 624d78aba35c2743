//! The forward proxy, with real sockets: an HTTP backend, a TLS backend with a
//! certificate made here, and Mosquitto as a backend that can be killed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::{Router, routing};
use base64::Engine;
use bytes::BytesMut;
use futures_util::FutureExt;
use http::HeaderMap;
use lps_common::config::{
    ENV_PROXY_ALLOWED_PORTS, ENV_PROXY_AUTH, ENV_PROXY_MAX_CONNECTIONS, ENV_WS_ENABLED,
};
use lps_testkit::TestServer;
use lps_testkit::mosquitto::Mosquitto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::harness::{self, Edge, header, mqtt, read_response};

/// `/delay/{ms}` answers `ms` after that long; `/headers` answers the request headers.
async fn backend() -> TestServer {
    let app = Router::new()
        .route(
            "/delay/{ms}",
            routing::get(|Path(ms): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                ms.to_string()
            }),
        )
        .route(
            "/headers",
            routing::get(|headers: HeaderMap| async move {
                let mut lines: Vec<String> = headers
                    .iter()
                    .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                    .collect();
                lines.sort();
                lines.join("\n")
            }),
        );
    TestServer::start(app).await
}

/// An edge with its forward proxy only (no WebSocket bridge), allowed to reach `ports`
/// (comma-separated), with `extra` variables.
async fn proxy_only(ports: &str, extra: &[(&str, &str)]) -> Edge {
    let mut env = vec![(ENV_PROXY_ALLOWED_PORTS, ports)];
    env.extend_from_slice(extra);
    env.push((ENV_WS_ENABLED, "false"));
    Edge::start(1, &env).await
}

fn get(port: u16, path: &str) -> String {
    format!("GET http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
}

fn connect(target: &str, extra: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n")
}

/// Three absolute-form requests written at once on one connection come back in order,
/// though the first is the slowest; hop-by-hop headers stay behind and `Via` is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_absolute_form_requests_come_back_in_order() {
    let backend = backend().await;
    let port = backend.addr.port();
    let port_list = port.to_string();
    let edge = proxy_only(&port_list, &[]).await;
    let mut stream = TcpStream::connect(edge.proxy()).await.unwrap();
    let pipelined = [
        get(port, "/delay/300"),
        get(port, "/delay/0"),
        get(port, "/delay/100"),
        format!(
            "GET http://127.0.0.1:{port}/headers HTTP/1.1\r\nHost: wrong\r\n\
             Proxy-Connection: keep-alive\r\nConnection: x-secret\r\nx-secret: 1\r\n\
             Accept: text/plain\r\n\r\n"
        ),
    ]
    .concat();
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let mut buffer = BytesMut::new();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let response = read_response(&mut stream, &mut buffer).await;
        assert_eq!(response.0, 200);
        bodies.push(String::from_utf8(response.2).unwrap());
    }
    assert_eq!(bodies, ["300", "0", "100"]);
    let headers = read_response(&mut stream, &mut buffer).await;
    let seen = String::from_utf8(headers.2).unwrap();
    assert!(seen.contains(&format!("host: 127.0.0.1:{port}")), "{seen}");
    assert!(
        seen.contains("via: 1.1 lps-edge") && seen.contains("accept: text/plain"),
        "{seen}"
    );
    assert!(
        !seen.contains("x-secret") && !seen.contains("proxy-connection"),
        "{seen}"
    );
    // Still the same keep-alive connection.
    stream
        .write_all(get(port, "/delay/0").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream, &mut buffer).await.2, b"0");
    assert_eq!(
        edge.metric("edge_proxy_requests_total{kind=\"forward\",status=\"200\"}")
            .await,
        5.0
    );
}

/// A TLS server with a certificate for `localhost` made here; it answers one request per
/// connection with `hello over tls`.
async fn tls_backend() -> (u16, CertificateDer<'static>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = made.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nhello over tls")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, cert)
}

/// CONNECT to a TLS server: the tunnel carries a real TLS session (handshake verified
/// against the certificate made here), both ways, then ends when the server closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_tunnel_carries_a_tls_session() {
    let (port, cert) = tls_backend().await;
    let port_list = port.to_string();
    let edge = proxy_only(&port_list, &[]).await;
    let target = format!("localhost:{port}");
    let (tcp, response) = harness::proxy_request(edge.proxy(), &connect(&target, "")).await;
    assert_eq!(response.0, 200, "{response:?}");
    let mut roots = RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake through the tunnel");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer))
        .await
        .expect("answer and close in time")
        .expect("clean TLS close");
    assert!(
        answer.ends_with(b"\r\n\r\nhello over tls"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    edge.wait_metric("edge_proxy_tunnels", 0.0, Duration::from_secs(2))
        .await;
    let metrics = edge.metrics().await;
    assert_eq!(
        harness::metric(
            &metrics,
            "edge_proxy_tunnels_closed_total{reason=\"upstream_closed\"}"
        ),
        1.0
    );
    assert!(
        harness::metric(
            &metrics,
            "edge_proxy_tunnel_bytes_total{direction=\"to_upstream\"}"
        ) > 100.0
    );
    assert!(
        harness::metric(
            &metrics,
            "edge_proxy_tunnel_bytes_total{direction=\"to_client\"}"
        ) > 100.0
    );
}

/// With `PROXY_AUTH`, requests and tunnels without the right Basic credentials get 407
/// with a challenge, and the backend never sees them; with them, they pass, and the
/// credentials are not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_credentials_get_407() {
    let backend = backend().await;
    let port = backend.addr.port();
    let port_list = port.to_string();
    let edge = proxy_only(&port_list, &[(ENV_PROXY_AUTH, "user:s3cret")]).await;
    let basic = |pair: &str| {
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    };
    let target = format!("127.0.0.1:{port}");
    for request in [
        get(port, "/headers"),
        get(port, "/headers").replace("\r\n\r\n", &format!("\r\n{}\r\n", basic("user:wrong"))),
        connect(&target, ""),
        connect(&target, &basic("other:s3cret")),
    ] {
        let (_, response) = harness::proxy_request(edge.proxy(), &request).await;
        assert_eq!(response.0, 407, "{request}");
        assert_eq!(
            header(&response, "proxy-authenticate"),
            Some("Basic realm=\"lps-edge\", charset=\"UTF-8\"")
        );
    }
    let authed =
        get(port, "/headers").replace("\r\n\r\n", &format!("\r\n{}\r\n", basic("user:s3cret")));
    let (_, response) = harness::proxy_request(edge.proxy(), &authed).await;
    assert_eq!(response.0, 200);
    assert!(
        !String::from_utf8(response.2)
            .unwrap()
            .contains("proxy-authorization")
    );
    let (_, response) =
        harness::proxy_request(edge.proxy(), &connect(&target, &basic("user:s3cret"))).await;
    assert_eq!(response.0, 200);
    let metrics = edge.metrics().await;
    assert_eq!(
        harness::metric(
            &metrics,
            "edge_proxy_requests_total{kind=\"forward\",status=\"407\"}"
        ),
        2.0
    );
    assert_eq!(
        harness::metric(
            &metrics,
            "edge_proxy_requests_total{kind=\"connect\",status=\"407\"}"
        ),
        2.0
    );
}

/// A destination port outside `PROXY_ALLOWED_PORTS` is refused with 403, for requests
/// and tunnels alike, without any connection to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disallowed_port_is_refused_without_connecting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let edge = proxy_only("443", &[]).await;
    for request in [connect(&format!("127.0.0.1:{port}"), ""), get(port, "/")] {
        let (_, response) = harness::proxy_request(edge.proxy(), &request).await;
        assert_eq!(response.0, 403, "{request}");
        assert!(
            String::from_utf8_lossy(&response.2).contains(&format!("port {port} is not allowed"))
        );
    }
    assert!(
        listener.accept().now_or_never().is_none(),
        "the proxy connected to a refused port"
    );
    // Also not the defaults' way around it: origin-form requests are no proxy requests.
    let (_, response) =
        harness::proxy_request(edge.proxy(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(response.0, 400);
}

/// A destination that goes away mid-tunnel (Mosquitto, SIGKILL) tears the tunnel down:
/// the client's connection ends at once and the tunnel is gone from the gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_tunnel_tears_the_tunnel_down() {
    let mut broker = Mosquitto::start().await;
    let port_list = broker.port.to_string();
    let edge = proxy_only(&port_list, &[]).await;
    let (mut tunnel, response) = harness::proxy_request(
        edge.proxy(),
        &connect(&format!("127.0.0.1:{}", broker.port), ""),
    )
    .await;
    assert_eq!(response.0, 200);
    tunnel
        .write_all(&mqtt::connect("tunnelled", 60, None))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tunnel.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "MQTT through the tunnel");
    assert_eq!(edge.metric("edge_proxy_tunnels").await, 1.0);
    let start = Instant::now();
    broker.kill().await;
    let mut rest = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut rest))
        .await
        .expect("the tunnel ends in time");
    let elapsed = start.elapsed();
    println!("teardown (tunnel backend killed): client connection ended {elapsed:?} later");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    edge.wait_metric("edge_proxy_tunnels", 0.0, Duration::from_secs(2))
        .await;
    edge.wait_metric("edge_proxy_connections", 0.0, Duration::from_secs(2))
        .await;
}

/// Above `PROXY_MAX_CONNECTIONS` (an open tunnel counts) a new connection waits, and is
/// served once a place frees up; a destination that refuses gets 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_new_connections_until_a_place_frees() {
    let backend = backend().await;
    let closed = lps_testkit::ClosedPort::new();
    let ports = format!("{},{}", backend.addr.port(), closed.port);
    let edge = proxy_only(&ports, &[(ENV_PROXY_MAX_CONNECTIONS, "1")]).await;
    let (first, response) =
        harness::proxy_request(edge.proxy(), &connect(&backend.addr.to_string(), "")).await;
    assert_eq!(response.0, 200);
    let mut second = TcpStream::connect(edge.proxy()).await.unwrap();
    second
        .write_all(get(backend.addr.port(), "/delay/0").as_bytes())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte))
            .await
            .is_err(),
        "served beyond the limit"
    );
    drop(first);
    let response = read_response(&mut second, &mut BytesMut::new()).await;
    assert_eq!((response.0, response.2), (200, b"0".to_vec()));
    drop(second);
    let (_, refused) = harness::proxy_request(edge.proxy(), &get(closed.port, "/")).await;
    assert_eq!(refused.0, 502, "{refused:?}");
    let (_, refused) = harness::proxy_request(
        edge.proxy(),
        &connect(&format!("127.0.0.1:{}", closed.port), ""),
    )
    .await;
    assert_eq!(refused.0, 502, "{refused:?}");
}

/// Bodies much larger than the proxy's buffers (64 KiB each way) pass intact both ways,
/// twice on one keep-alive connection: the forwarding streams them in bounded chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_the_buffers_stream_through_intact() {
    const SIZE: usize = 3 << 20;
    let pattern = |i: usize| (i * 31 % 251) as u8;
    let app = Router::new()
        .route(
            "/big",
            routing::get(move || async move { (0..SIZE).map(pattern).collect::<Vec<u8>>() }),
        )
        .route(
            "/sum",
            routing::post(|body: axum::body::Body| async move {
                use http_body_util::BodyExt;
                let bytes = body.collect().await.unwrap().to_bytes();
                let sum: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
                format!("{} {sum}", bytes.len())
            }),
        );
    let backend = TestServer::start(app).await;
    let port = backend.addr.port();
    let port_list = port.to_string();
    let edge = proxy_only(&port_list, &[]).await;
    let mut stream = TcpStream::connect(edge.proxy()).await.unwrap();
    let mut buffer = BytesMut::new();
    let upload: Vec<u8> = (0..SIZE / 2).map(pattern).collect();
    let upload_sum: u64 = upload.iter().map(|&b| u64::from(b)).sum();
    for _ in 0..2 {
        stream
            .write_all(get(port, "/big").as_bytes())
            .await
            .unwrap();
        let response = read_response(&mut stream, &mut buffer).await;
        assert_eq!(response.0, 200);
        assert_eq!(response.2.len(), SIZE);
        assert!(response.2.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        let head = format!(
            "POST http://127.0.0.1:{port}/sum HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Length: {}\r\n\r\n",
            upload.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&upload).await.unwrap();
        let response = read_response(&mut stream, &mut buffer).await;
        assert_eq!(response.0, 200);
        assert_eq!(
            String::from_utf8(response.2).unwrap(),
            format!("{} {upload_sum}", upload.len())
        );
    }
}
