//! The outbound client: target lists, cool-down, the DNS cache, error mapping.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use lps_common::Registry;
use lps_common::dns::StaticLookup;
use lps_common::request_id::RequestId;
use lps_common::server::Protocols;
use lps_common::upstream::{Upstream, UpstreamConfig, UpstreamError, parse_targets};
use lps_testkit::{Recorder, TestServer};

fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

/// Asserts that the counter `name` of `registry` (unlabelled) stands at `value`.
fn assert_counter(registry: &Registry, name: &str, value: u64) {
    let text = encode(registry);
    assert!(text.contains(&format!("{name} {value}\n")), "{text}");
}

async fn post(upstream: &Upstream) -> Result<StatusCode, UpstreamError> {
    upstream
        .post_json("{}".into(), &RequestId::generate())
        .await
}

#[tokio::test]
async fn a_dead_target_in_the_list_is_skipped() {
    let recorder = Recorder::new();
    let live = TestServer::start(recorder.router()).await;
    let closed = lps_testkit::ClosedPort::new();
    let targets = format!("{},{}", closed.url("/x"), live.url("/x"));
    let config = UpstreamConfig::for_targets(parse_targets(&targets).unwrap());
    let mut registry = Registry::default();
    let upstream = Upstream::new(&config, &mut registry).unwrap();
    for _ in 0..20 {
        post(&upstream)
            .await
            .expect("every request succeeds via the live target");
    }
    assert_eq!(recorder.requests().len(), 20);
    // One failed connect, then the dead target sits out its cool-down.
    assert_counter(&registry, "upstream_connect_retries_total", 1);
}

#[tokio::test]
async fn a_refused_connection_fails_fast_as_unavailable() {
    let closed = lps_testkit::ClosedPort::new();
    let targets = parse_targets(&closed.url("/x")).unwrap();
    let upstream = Upstream::new(
        &UpstreamConfig::for_targets(targets),
        &mut Registry::default(),
    )
    .unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), post(&upstream))
        .await
        .expect("no hang on a refused connection")
        .unwrap_err();
    assert!(
        matches!(error, UpstreamError::Unavailable { .. }),
        "{error}"
    );
    // The cause is spelled out, not just "client error (Connect)".
    assert!(error.to_string().contains("Connection refused"), "{error}");
    let api = error.to_api_error();
    assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.retry_after, Some(1));
}

#[tokio::test]
async fn an_ipv6_literal_target_gets_the_headers_over_both_protocols() {
    let recorder = Recorder::new();
    let server = TestServer::start_on(
        "[::1]:0".parse().unwrap(),
        recorder.router(),
        Protocols::default(),
    )
    .await;
    let id = RequestId::generate();
    for http2 in [false, true] {
        let mut config = UpstreamConfig::for_targets(parse_targets(&server.url("/x")).unwrap());
        config.http2 = http2;
        let upstream = Upstream::new(&config, &mut Registry::default()).unwrap();
        let status = upstream
            .post_json(r#"{"a":1}"#.into(), &id)
            .await
            .expect("forwarded");
        assert_eq!(status, StatusCode::OK);
        // Literals are used as they are: nothing went through the DNS cache.
        assert_eq!(upstream.dns().lookups(), 0);
    }
    let requests = recorder.requests();
    assert_eq!(requests.len(), 2);
    let host = format!("[::1]:{}", server.addr.port());
    for (request, version) in requests
        .iter()
        .zip([http::Version::HTTP_11, http::Version::HTTP_2])
    {
        assert_eq!(request.version, version);
        assert_eq!(request.path, "/x");
        assert_eq!(request.body, r#"{"a":1}"#);
        assert_eq!(request.header("request-id"), Some(id.as_str()));
        assert_eq!(request.header("content-type"), Some("application/json"));
        // Over HTTP/2 the authority travels as `:authority`, not as a Host header.
        if version == http::Version::HTTP_11 {
            assert_eq!(request.header("host"), Some(host.as_str()));
        }
    }
}

#[tokio::test]
async fn upstream_status_and_timeout_are_reported() {
    let recorder = Recorder::new();
    let server = TestServer::start(recorder.router()).await;
    let mut config = UpstreamConfig::for_targets(parse_targets(&server.url("/x")).unwrap());
    config.request_timeout = Duration::from_millis(200);
    let upstream = Upstream::new(&config, &mut Registry::default()).unwrap();
    recorder.respond(500, Duration::ZERO);
    let error = post(&upstream).await.unwrap_err();
    assert!(
        matches!(error, UpstreamError::Status { status, .. } if status == StatusCode::INTERNAL_SERVER_ERROR)
    );
    assert_eq!(error.to_api_error().status, StatusCode::BAD_GATEWAY);
    recorder.respond(200, Duration::from_secs(2));
    let error = post(&upstream).await.unwrap_err();
    assert!(matches!(error, UpstreamError::Timeout { .. }), "{error}");
    assert_eq!(error.to_api_error().status, StatusCode::GATEWAY_TIMEOUT);
    // Sent once: a request that may have reached the target is never retried.
    assert_eq!(recorder.requests().len(), 2);
}

/// Two recorders on the same port of 127.0.0.1 and 127.0.0.2, a name pointing at the
/// first, and an upstream (its configuration set by `configure`) resolving through a table
/// the test controls.
async fn moving_name(
    configure: impl FnOnce(&mut UpstreamConfig),
) -> (
    Recorder,
    TestServer,
    Recorder,
    TestServer,
    Arc<StaticLookup>,
    Upstream,
    Registry,
) {
    let (a, b) = (Recorder::new(), Recorder::new());
    let server_a = TestServer::start(a.router()).await;
    let port = server_a.addr.port();
    let server_b = TestServer::start_on(
        SocketAddr::from(([127, 0, 0, 2], port)),
        b.router(),
        Protocols::default(),
    )
    .await;
    let table = Arc::new(StaticLookup::new(Duration::from_secs(600)));
    table.set("backend", vec![IpAddr::from([127, 0, 0, 1])]);
    let mut config =
        UpstreamConfig::for_targets(parse_targets(&format!("http://backend:{port}/x")).unwrap());
    configure(&mut config);
    let mut registry = Registry::default();
    let upstream = Upstream::with_lookup(&config, table.clone(), &mut registry).unwrap();
    (a, server_a, b, server_b, table, upstream, registry)
}

#[tokio::test]
async fn cached_name_is_followed_to_its_new_address_after_a_failed_connect() {
    let (a, server_a, b, server_b, table, upstream, registry) =
        moving_name(|c| c.skip_dns_cache = false).await;
    post(&upstream).await.unwrap();
    table.set("backend", vec![IpAddr::from([127, 0, 0, 2])]);
    post(&upstream).await.unwrap();
    assert_eq!(a.requests().len(), 2, "cached address still used");
    assert_eq!(upstream.dns().lookups(), 1);
    // The old instance goes away; the next connect fails, the entry is dropped, and the
    // request is retried on the name's new address.
    server_a.stop().await;
    post(&upstream).await.expect("request follows the name");
    assert_eq!(b.requests().len(), 1);
    // The URL keeps the name: the Host header is still `backend`, not an address.
    let host = format!("backend:{}", server_b.addr.port());
    assert_eq!(b.requests()[0].header("host"), Some(host.as_str()));
    assert_eq!(upstream.dns().lookups(), 2);
    assert_counter(&registry, "upstream_connect_retries_total", 1);
}

#[tokio::test]
async fn skip_dns_cache_resolves_every_new_connection() {
    let (a, server_a, b, _server_b, table, upstream, registry) =
        moving_name(|c| c.skip_dns_cache = true).await;
    post(&upstream).await.unwrap();
    table.set("backend", vec![IpAddr::from([127, 0, 0, 2])]);
    server_a.stop().await;
    post(&upstream).await.unwrap();
    assert_eq!((a.requests().len(), b.requests().len()), (1, 1));
    // Resolved afresh for the new connection: no failed connect on the way.
    assert_eq!(upstream.dns().lookups(), 2);
    assert_counter(&registry, "upstream_connect_retries_total", 0);
}

/// A target that stops answering (a peer gone without a reset, a name moved to a new
/// instance): after a request to it times out, neither its pooled connections nor its
/// cached address are used again. Over HTTP/1.1 (an idle pooled connection left) and h2c
/// (the one multiplexed connection).
#[tokio::test]
async fn a_timeout_drops_the_targets_pooled_connections_and_cached_address() {
    for http2 in [false, true] {
        let (a, _server_a, b, _server_b, table, upstream, registry) = moving_name(|c| {
            c.http2 = http2;
            c.request_timeout = Duration::from_millis(500);
        })
        .await;
        // Two requests at once: two pooled HTTP/1.1 connections (or one h2 connection).
        a.respond(200, Duration::from_millis(100));
        let (first, second) = tokio::join!(post(&upstream), post(&upstream));
        first.unwrap();
        second.unwrap();
        // The instance hangs, and the name now points at a new one.
        a.respond(200, Duration::from_secs(60));
        table.set("backend", vec![IpAddr::from([127, 0, 0, 2])]);
        let error = post(&upstream).await.unwrap_err();
        assert!(matches!(error, UpstreamError::Timeout { .. }), "{error}");
        // The next request goes to the new instance at once.
        tokio::time::timeout(Duration::from_secs(5), post(&upstream))
            .await
            .expect("no second timeout")
            .unwrap_or_else(|e| panic!("http2={http2}: {e}"));
        assert_eq!(b.requests().len(), 1, "http2={http2}");
        assert_eq!(a.requests().len(), 3, "http2={http2}");
        assert_counter(&registry, "upstream_pool_renewals_total", 1);
    }
}
