//! The whole baseline chain on ephemeral ports:
//! client → ars-comp-1 → (h2c) → ars-comp-2 → (HTTP/1.1) → rast-simulator.

use std::collections::HashMap;
use std::time::Duration;

use ars_comp_1::SIMPLE_PATH;
use http::StatusCode;
use lps_common::config::{ENV_LOG_DIR, ENV_MAX_BODY_BYTES, ENV_TARGET_URL, ENV_USE_HTTP_2};
use lps_common::wire::STORE_PATH;
use lps_testkit::{Recorder, TestServer, eventually, http1_client};
use rast_simulator::journal;
use serde_json::json;

const LIMIT: &str = "1048576";

/// ars-comp-1 (sending h2c) → ars-comp-2 → `backend`, each through its own `serve`.
async fn chain(backend: &str) -> (TestServer, TestServer) {
    let env = HashMap::from([(ENV_TARGET_URL, backend), (ENV_MAX_BODY_BYTES, LIMIT)]);
    let config = ars_comp_2::Config::from_lookup(&env).unwrap();
    let ac2 = TestServer::serve(|l, s| ars_comp_2::serve(config, l, s)).await;
    let target = ac2.url(STORE_PATH);
    let env = HashMap::from([
        (ENV_TARGET_URL, target.as_str()),
        (ENV_USE_HTTP_2, "true"),
        (ENV_MAX_BODY_BYTES, LIMIT),
    ]);
    let config = ars_comp_1::Config::from_lookup(&env).unwrap();
    let ac1 = TestServer::serve(|l, s| ars_comp_1::serve(config, l, s)).await;
    (ac1, ac2)
}

fn alarm(branch: u32) -> String {
    json!({"phone": "01754937448", "branch": branch.to_string(), "headnumber": "8023", "triggertime": "2025-01-31T12:00:00.250Z"})
        .to_string()
}

#[tokio::test]
async fn the_chain_delivers_to_the_simulator_with_ids_and_protocols_intact() {
    let dir = tempfile::tempdir().unwrap();
    let env = HashMap::from([
        (ENV_LOG_DIR, dir.path().to_str().unwrap()),
        (ENV_MAX_BODY_BYTES, LIMIT),
    ]);
    let args = rast_simulator::Args {
        model: "0".to_owned(),
        corr_max: 2,
        workers: 4,
        service_ms: 35.0,
    };
    let config = rast_simulator::Config::new(&env, &args).unwrap();
    let sim_server = TestServer::serve(|l, s| rast_simulator::serve(config, l, s)).await;
    let (ac1, ac2) = chain(&sim_server.url(STORE_PATH)).await;
    let client = http1_client();
    let ids: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "{}",
                340_282_366_920_938_463_463_374_607_431_768_211_000u128 + i
            )
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let response = client
            .post(ac1.url(SIMPLE_PATH))
            .header("Request-Id", id)
            .body(alarm(2001 + u32::try_from(i).unwrap() % 10))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["request-id"], id.as_str());
    }

    // ars-comp-2 was reached over h2c.
    let metrics = ac2.metrics().await;
    let labels = [
        ("route", STORE_PATH),
        ("status", "200"),
        ("version", "HTTP/2.0"),
    ];
    assert_eq!(
        lps_testkit::metric(&metrics, "http_requests_total", &labels),
        Some(20.0),
        "{metrics}"
    );
    // The simulator was reached over HTTP/1.1, once per id, with the id as its UID.
    let ledger_path = dir.path().join(journal::LEDGER_FILE);
    let ledger = eventually("20 ledger records", Duration::from_secs(10), || {
        let path = ledger_path.clone();
        async move { journal::read_ledger(&path).ok().filter(|l| l.len() == 20) }
    })
    .await;
    let mut uids: Vec<&str> = ledger.iter().map(|r| r.uid.as_str()).collect();
    uids.sort_unstable();
    assert_eq!(uids, ids.iter().map(String::as_str).collect::<Vec<_>>());
    for record in &ledger {
        assert_eq!(record.proto, "HTTP/1.1");
        assert_eq!(record.status, 200);
        assert_eq!(record.cmd, "ID_REQ_KC_STORE7D3BPACKET");
        assert!(record.end_us >= record.start_us);
    }
    // Upstream's analysis regex finds a CMD-ENDE line for every id.
    let log = std::fs::read_to_string(dir.path().join(journal::LOG_FILE)).unwrap();
    let cmd_ende =
        regex::Regex::new(r"]\s(.+)\s\[.+UID:\s([^,]+),\s*CMD-ENDE\s*ID_REQ_KC_STORE7D3BPACKET")
            .unwrap();
    let mut ended: Vec<&str> = log
        .lines()
        .filter_map(|l| cmd_ende.captures(l))
        .map(|c| c.get(2).unwrap().as_str())
        .collect();
    ended.sort_unstable();
    assert_eq!(ended, ids.iter().map(String::as_str).collect::<Vec<_>>());
    let stamp = cmd_ende
        .captures(log.lines().find(|l| l.contains("CMD-ENDE")).unwrap())
        .unwrap()[1]
        .to_owned();
    assert!(
        chrono::NaiveDateTime::parse_from_str(&stamp, "%Y-%m-%d %H:%M:%S%.3f").is_ok(),
        "{stamp}"
    );

    ac1.stop().await;
    ac2.stop().await;
    sim_server.stop().await;
}

#[tokio::test]
async fn the_last_hop_gets_one_json_object_with_the_request_id() {
    let backend = Recorder::new();
    let backend_server = TestServer::start(backend.router()).await;
    let (ac1, _ac2) = chain(&backend_server.url(STORE_PATH)).await;
    let response = http1_client()
        .post(ac1.url(&format!("{SIMPLE_PATH}?Phone=016590943333&Branch=2012&Headnumber=8023&TriggerTime=2025-01-31T12%3A00%3A00")))
        .header("Request-Id", "77")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].version,
        http::Version::HTTP_11,
        "ars-comp-2 speaks HTTP/1.1 to the backend"
    );
    assert_eq!(seen[0].header("request-id"), Some("77"));
    // A JSON object, not a JSON string holding one (upstream's double encoding).
    assert_eq!(
        seen[0].json(),
        json!({
            "id": "016590943333",
            "body": "Phone: 016590943333, Branch: 2012, Headnumber: 8023, TriggerTime: 2025-01-31T12:00:00",
            "request_id": "77"
        })
    );
}
