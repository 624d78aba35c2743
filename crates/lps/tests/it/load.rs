//! `lps load` against a trivial local server: how much load it can make (printed, not
//! asserted), and that every request is in the ledger.

use std::time::Duration;

use ars_comp_1::SIMPLE_PATH;
use axum::Router;
use axum::routing::post;
use lps::load::{LoadConfig, Shape};
use lps_testkit::TestServer;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_load_records_every_request_and_prints_its_rate() {
    let server = TestServer::start(Router::new().route(SIMPLE_PATH, post(|| async { "ok" }))).await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("client_ledger.jsonl");
    let config = LoadConfig {
        entries: vec![server.url("")],
        // Well under what one core serves, so that a busy CI machine (where the server
        // shares two cores with the generator and other tests) still keeps up: at 5,000/s
        // and a p50 of 5 s, the server's connection limit and backlog filled and connects
        // timed out (a retry, so `attempts == 1` failed), which says nothing about `lps load`.
        shape: Shape::Rate(2_000.0),
        duration: Duration::from_secs(2),
        wait: Duration::from_secs(1),
        http2: false,
        background: None,
        background_users: 0,
        finish_within: Duration::from_secs(60),
        ledger: ledger.clone(),
        progress: false,
    };
    let report = lps::load::run(config, CancellationToken::new())
        .await
        .unwrap();
    println!(
        "lps load, open loop against a trivial server: {}",
        report.table()
    );
    assert!(report.sent > 1000, "{}", report.table());
    assert_eq!(report.ok, report.sent, "every alarm acknowledged");
    let records: Vec<lps::records::ClientRecord> = lps::records::read_jsonl(&ledger).unwrap();
    assert_eq!(
        records.len() as u64,
        report.sent,
        "one ledger line per request"
    );
    assert!(
        records
            .iter()
            .all(|r| r.attempts == 1 && r.success_us.is_some())
    );
}
