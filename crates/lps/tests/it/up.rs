//! `lps up` starts a topology as processes, serves alarms end to end, and stops every
//! process on SIGINT.

use std::process::Stdio;
use std::time::Duration;

use http::StatusCode;
use lps_testkit::{eventually, http1_client};
use tokio::io::{AsyncBufReadExt, BufReader};

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
    let run = dir.path().join("run");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
        .args([
            "up",
            topology,
            "--broker",
            broker,
            "--ephemeral-ports",
            "--out",
        ])
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut entries = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.trim_end().ends_with("entry") {
                entries.push(line.split_whitespace().nth(1).unwrap().to_owned());
            }
            if line.contains("press Ctrl-C") {
                return;
            }
        }
        panic!("lps up ended before the topology was up");
    })
    .await
    .expect("topology up within 60 s");
    assert_eq!(entries.len(), 3, "three entry services");

    let client = http1_client();
    for (i, entry) in entries.iter().enumerate() {
        let response = client
            .post(format!("{entry}/api/v1/simple"))
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

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    for entry in &entries {
        assert!(
            client.get(format!("{entry}/healthz")).send().await.is_err(),
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
    let run = dir.path().join("run");
    let mut up = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
        .args(["up", "legacy", "--ephemeral-ports", "--out"])
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut entry = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.trim_end().ends_with("entry") && entry.is_empty() {
            entry = line.split_whitespace().nth(1).unwrap().to_owned();
        }
        if line.contains("press Ctrl-C") {
            break;
        }
    }
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
        .post(format!("{entry}/api/v1/simple"))
        .body(r#"{"phone":"015142611148","branch":"2001","headnumber":"8023","triggertime":"2025-01-31T12:00:00Z"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(up.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    assert!(up.wait().await.unwrap().success());
}
