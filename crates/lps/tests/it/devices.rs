//! `lps load --mqtt-ws`: alarm devices publishing over MQTT over WebSocket through the edge.
//!
//! - Against a real `lps up ng --edge` (Mosquitto, legacy-proxy-2, the simulator as
//!   processes): every alarm the devices saw completed (PUBCOMP) reaches the simulator by
//!   its id, and `lps analyze` on the run folder counts them like HTTP alarms.
//! - Against a Mosquitto whose ACL refuses the device topic (a PUBREC with reason 0x87,
//!   not authorized): no alarm is acknowledged, each is recorded as refused (503).
//! - Locust's devices (`locust_scripts/mqtt_ws.py`, paho-mqtt over WebSocket) against the
//!   same `lps up ng --edge`: no failure, and every alarm in their ledger arrives.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lps::load::{LoadConfig, Shape};
use lps::records::{CLIENT_LEDGER, ClientRecord, FinalStatus, RequestKind, read_jsonl};
use lps_common::request_id::RequestId;
use lps_common::wire::STORE_COMMAND;
use lps_testkit::ChildService;
use lps_testkit::mosquitto::Mosquitto;
use rast_simulator::journal::{LEDGER_FILE, LedgerRecord};
use tokio_util::sync::CancellationToken;

use crate::support::Up;

/// The edge's WebSocket URL, from the services file of the `lps up` run folder.
fn edge_ws_url(run: &Path) -> String {
    let services: Vec<lps::up::ServiceEntry> =
        serde_json::from_slice(&std::fs::read(run.join(lps::up::SERVICES_FILE)).unwrap()).unwrap();
    let edge = services
        .iter()
        .find(|s| s.program == "lps-edge")
        .expect("lps up --edge runs the edge");
    format!("{}/mqtt", edge.url.replace("http://", "ws://"))
}

/// Alarm ids that have not arrived at the simulator (status 200) within 15 s.
async fn wait_for_arrivals(run: &Path, ids: &BTreeSet<&str>) {
    let sim_ledger = run.join("logs").join(LEDGER_FILE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let records: Vec<LedgerRecord> = read_jsonl(&sim_ledger).unwrap_or_default();
        let arrived: BTreeSet<&str> = records
            .iter()
            .filter(|r| r.cmd == STORE_COMMAND && r.status == 200)
            .map(|r| r.uid.as_str())
            .collect();
        let missing: Vec<&&str> = ids.iter().filter(|id| !arrived.contains(**id)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} completed alarms never reached the simulator within 15 s: {missing:?}",
            missing.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn lps(args: &[&str], dir: &Path) -> std::process::Output {
    let command = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
        .args(args)
        .arg(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), command)
        .await
        .unwrap_or_else(|_| panic!("lps {args:?} finished within 60 s"))
        .unwrap();
    assert!(
        output.status.success(),
        "lps {args:?}: {}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_alarms_over_websocket_reach_the_simulator_and_analyze_counts_them() {
    let tmp = tempfile::tempdir().unwrap();
    let run: PathBuf = tmp.path().join("run");
    let up = Up::start(&["ng", "--edge", "--broker", "mosquitto"], run.clone()).await;
    let ws = edge_ws_url(&run);

    // Four devices, one alarm a second each, for 3 s, into the `lps up` run folder.
    lps(
        &[
            "load",
            "--mqtt-ws",
            &ws,
            "--users",
            "4",
            "--duration",
            "3s",
            "--out",
        ],
        &run,
    )
    .await;

    let ledger: Vec<ClientRecord> = read_jsonl(&run.join(CLIENT_LEDGER)).unwrap();
    assert!(
        ledger.len() >= 8,
        "{} alarms in 3 s from 4 devices",
        ledger.len()
    );
    for record in &ledger {
        assert_eq!(record.kind, RequestKind::Alarm);
        assert_eq!(
            (record.status, record.last_status, record.attempts),
            (FinalStatus::Ok, 200, 1),
            "{record:?}"
        );
        assert_eq!(record.endpoints, std::slice::from_ref(&ws), "{record:?}");
        assert!(RequestId::parse(&record.id).is_ok(), "id {:?}", record.id);
    }
    let ids: BTreeSet<&str> = ledger.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), ledger.len(), "ids are unique");

    // legacy-proxy-2 forwards what the devices published, by the id in the payload.
    wait_for_arrivals(&run, &ids).await;

    // `lps analyze` on the run folder: the run.json `lps load` wrote, the client ledger and
    // the simulator's ledger.
    lps(&["analyze"], &run).await;
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let ng = &summary["ng"];
    let n = ledger.len() as u64;
    assert_eq!(ng["sent"], n, "{ng}");
    assert_eq!(ng["acknowledged"], n, "{ng}");
    assert_eq!(ng["delivered"], n, "{ng}");
    assert_eq!(ng["lost"], 0, "{ng}");
    assert_eq!(ng["unknown_delivered"], 0, "{ng}");

    // Locust's devices, paho-mqtt over WebSocket, through the same edge.
    let locust_ledger = tmp.path().join("locust.jsonl");
    let output = locust_devices(&ws, &locust_ledger, tmp.path()).await;
    let text = format!(
        "{}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "locust: {text}");
    let devices: Vec<ClientRecord> = read_jsonl(&locust_ledger).unwrap();
    assert!(
        devices.len() >= 3,
        "{} alarms from Locust: {text}",
        devices.len()
    );
    for record in &devices {
        assert_eq!(
            (record.status, record.last_status, record.attempts),
            (FinalStatus::Ok, 200, 1),
            "{record:?}\n{text}"
        );
        assert_eq!(record.endpoints, std::slice::from_ref(&ws), "{record:?}");
    }
    assert!(
        !text.contains("(failed attempt)"),
        "no failed attempt: {text}"
    );
    let ids: BTreeSet<&str> = devices.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), devices.len(), "ids are unique");
    wait_for_arrivals(&run, &ids).await;
    up.stop().await;
}

/// `locust_scripts/mqtt_ws.py`, 3 devices for 4 s (Locust from `scripts/locust-env.sh`).
async fn locust_devices(ws: &str, ledger: &Path, dir: &Path) -> std::process::Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let install = tokio::process::Command::new("bash")
        .arg(repo.join("scripts/locust-env.sh"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let install = tokio::time::timeout(Duration::from_secs(300), install)
        .await
        .expect("scripts/locust-env.sh within 5 minutes")
        .unwrap();
    assert!(install.status.success(), "scripts/locust-env.sh failed");
    let stdout = String::from_utf8_lossy(&install.stdout);
    let locust = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    let run = tokio::process::Command::new(locust)
        .current_dir(&repo)
        .args([
            "-f",
            "locust_scripts/mqtt_ws.py",
            "--headless",
            "--only-summary",
        ])
        .args(["-u", "3", "-r", "3", "-t", "4s", "--stop-timeout", "15"])
        .arg("--csv")
        .arg(dir.join("locust"))
        .env("LPS_MQTT_WS", ws)
        .env("LPS_LEDGER", ledger)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("locust within 60 s")
        .unwrap()
}

/// A broker that refuses the device topic answers each QoS 2 publish with a PUBREC
/// carrying 0x87 (not authorized): the message is discarded, so the alarm must never be
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_is_never_an_acknowledged_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite allowed/#\n").unwrap();
    let acl_line = format!("acl_file {}", acl.display());
    let broker = Mosquitto::start_with(&[&acl_line]).await;
    let port = broker.port.to_string();
    let edge = ChildService::start_with_args(
        Path::new(env!("CARGO_BIN_EXE_lps")),
        &["service", "lps-edge"],
        &[
            ("MQTT_HOST", "127.0.0.1"),
            ("MQTT_PORT", &port),
            ("PROXY_ENABLED", "false"),
        ],
        dir.path(),
    )
    .await
    .unwrap();
    let ledger = dir.path().join(CLIENT_LEDGER);
    let ws = format!("ws://{}/mqtt", edge.addr);
    let config = LoadConfig {
        entries: vec![ws],
        shape: Shape::Users(2),
        duration: Duration::from_millis(1500),
        wait: Duration::from_millis(200),
        http2: false,
        background: None,
        background_users: 0,
        finish_within: Duration::from_secs(1),
        ledger: ledger.clone(),
        progress: false,
    };
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        lps::load::run(config, CancellationToken::new()),
    )
    .await
    .expect("the load ends")
    .unwrap();
    assert_eq!(report.ok, 0, "{}", report.table());
    assert!(report.sent >= 2, "{}", report.table());
    let records: Vec<ClientRecord> = read_jsonl(&ledger).unwrap();
    assert_eq!(records.len() as u64, report.sent);
    for record in &records {
        assert_eq!(record.status, FinalStatus::Failed, "{record:?}");
        assert_eq!(record.last_status, 503, "refused, not lost: {record:?}");
        assert!(record.attempts > 1, "retried: {record:?}");
    }
}
