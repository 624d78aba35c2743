//! `lps up` starts a topology as processes, serves alarms end to end, and stops every
//! process on SIGINT.

use std::time::Duration;

use ars_comp_1::SIMPLE_PATH;
use http::StatusCode;
use lps_common::wire::HEALTHZ_PATH;
use lps_testkit::{eventually, http1_client};

use crate::support::Up;

#[tokio::test]
async fn up_legacy_serves_alarms_end_to_end_and_stops_on_sigint() {
    up_serves_alarms_and_stops("legacy", &["ars-comp-1-1", "ars-comp-2-3", "ars-comp-3"]).await;
}

#[tokio::test]
async fn up_ng_with_mosquitto_serves_alarms_end_to_end_and_stops_on_sigint() {
    up_serves_alarms_and_stops(
        "ng",
        &[
            "ars-comp-1-1",
            "proxy1-2",
            "proxy2-3",
            "ars-comp-2-1",
            "ars-comp-3",
        ],
    )
    .await;
}

#[tokio::test]
async fn up_ng_with_the_embedded_broker_serves_alarms_end_to_end_and_stops_on_sigint() {
    up_serves_alarms_and_stops_with("ng", "embedded", &["ars-comp-1-1", "proxy1-2", "proxy2-3"])
        .await;
}

async fn up_serves_alarms_and_stops(topology: &str, graceful: &[&str]) {
    up_serves_alarms_and_stops_with(topology, "mosquitto", graceful).await;
}

async fn up_serves_alarms_and_stops_with(topology: &str, broker: &str, graceful: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&[topology, "--broker", broker], dir.path().join("run")).await;
    let (run, entries) = (up.run.clone(), up.entries.clone());
    let client = http1_client();
    for (i, entry) in entries.iter().enumerate() {
        let response = client
            .post(format!("{entry}{SIMPLE_PATH}"))
            .header("Request-Id", format!("{}", 900 + i))
            .body(r#"{"phone":"015142611148","branch":"2001","headnumber":"8023","triggertime":"2025-01-31T12:00:00Z"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "via {entry}");
    }
    let log_path = run.join("logs").join("ars_simulation.log");
    eventually(
        "three alarms at the simulator",
        Duration::from_secs(10),
        || {
            let path = log_path.clone();
            async move {
                let log = std::fs::read_to_string(path).ok()?;
                (900..903)
                    .all(|id| log.contains(&format!("UID: {id}, CMD-ENDE")))
                    .then_some(())
            }
        },
    )
    .await;

    up.stop().await;
    for entry in &entries {
        assert!(
            client
                .get(format!("{entry}{HEALTHZ_PATH}"))
                .send()
                .await
                .is_err(),
            "{entry} still up"
        );
    }
    for name in graceful {
        let log = std::fs::read_to_string(run.join("logs").join(format!("{name}.log"))).unwrap();
        assert!(
            log.contains("all connections drained"),
            "{name} stopped gracefully:\n{log}"
        );
    }
}

#[tokio::test]
async fn fault_stops_and_restarts_the_services_of_a_running_up() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&["legacy"], dir.path().join("run")).await;
    let (run, entry) = (up.run.clone(), up.entries[0].clone());
    let fault = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
        .args(["fault", "--faults", "chain", "--scale", "0.02", "--run"])
        .arg(&run)
        .output()
        .await
        .unwrap();
    assert!(
        fault.status.success(),
        "{}",
        String::from_utf8_lossy(&fault.stderr)
    );
    let log = std::fs::read_to_string(run.join("faults.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let order: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["action"].as_str().unwrap(),
                e["service"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            "stop ars-comp-1-1",
            "start ars-comp-1-1",
            "stop ars-comp-2-1",
            "start ars-comp-2-1",
            "stop ars-comp-3",
            "start ars-comp-3"
        ]
    );
    assert!(events.iter().all(|e| e["how"] == "SIGKILL"));
    // Everything is back: an alarm goes through the first chain again.
    let response = http1_client()
        .post(format!("{entry}{SIMPLE_PATH}"))
        .body(r#"{"phone":"015142611148","branch":"2001","headnumber":"8023","triggertime":"2025-01-31T12:00:00Z"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    up.stop().await;
}
