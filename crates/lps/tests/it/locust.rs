//! `locust_scripts/` against a real `lps up ng` with Mosquitto: Locust (installed by
//! `scripts/locust-env.sh`) runs the alarm-device workload for a few seconds, over HTTP/1.1
//! with the background production load beside it, and over h2c. Locust must report requests
//! and no failure, and every alarm it saw acknowledged must reach the simulator.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use ars_comp_1::SIMPLE_PATH;
use lps::records::{ClientRecord, FinalStatus, RequestKind, read_jsonl};
use lps_common::config::ENV_USE_HTTP_2;
use lps_common::request_id::RequestId;
use lps_common::wire::STORE_COMMAND;
use rast_simulator::journal::LedgerRecord;

use crate::support::{Up, repo};

/// Runs `scripts/locust-env.sh` (once per test binary) and returns the `locust` executable.
async fn locust() -> &'static Path {
    static LOCUST: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    LOCUST
        .get_or_init(|| async {
            let install = tokio::process::Command::new("bash")
                .arg(repo().join("scripts/locust-env.sh"))
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output();
            // A fresh machine installs the packages first (about 30 s here).
            let output = tokio::time::timeout(Duration::from_secs(300), install)
                .await
                .expect("scripts/locust-env.sh finished within 5 minutes")
                .expect("bash runs scripts/locust-env.sh");
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "scripts/locust-env.sh failed ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
            assert!(path.is_file(), "no locust at {}", path.display());
            path
        })
        .await
}

/// Runs one Locust file headless on `users` users for `seconds` s, writing
/// `<dir>/<name>_stats.csv` (and the other CSV files), `<dir>/<name>.json` and the client
/// ledger `<dir>/<name>.jsonl`.
async fn run_locust(
    file: &str,
    env: &[(&str, String)],
    users: u32,
    seconds: u32,
    dir: &Path,
    name: &str,
) -> Output {
    let locust = locust().await;
    let prefix = dir.join(name);
    let mut command = tokio::process::Command::new(locust);
    command
        .current_dir(repo())
        .args([
            "-f",
            file,
            "--headless",
            "--only-summary",
            "--loglevel",
            "INFO",
        ])
        .args(["-u", &users.to_string(), "-r", &users.to_string()])
        .args(["-t", &format!("{seconds}s"), "--stop-timeout", "20"])
        .arg("--csv")
        .arg(&prefix)
        .arg("--json-file")
        .arg(&prefix)
        .env("LPS_LEDGER", prefix.with_extension("jsonl"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("locust -f {file} finished within 60 s"))
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Requests and failures of the `Aggregated` row of `<prefix>_stats.csv`, and the rows of
/// `<prefix>_failures.csv`.
fn csv_totals(dir: &Path, name: &str) -> (u64, u64, Vec<String>) {
    let stats_path = dir.join(format!("{name}_stats.csv"));
    let stats = std::fs::read_to_string(&stats_path).unwrap();
    let mut lines = stats.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let column = |title: &str| {
        header
            .iter()
            .position(|h| *h == title)
            .unwrap_or_else(|| panic!("{title} in {}: {stats}", stats_path.display()))
    };
    let (requests, failures) = (column("Request Count"), column("Failure Count"));
    let total: Vec<&str> = lines
        .find(|l| l.split(',').nth(1) == Some("Aggregated"))
        .unwrap_or_else(|| panic!("Aggregated row in {}: {stats}", stats_path.display()))
        .split(',')
        .collect();
    let failures_csv = std::fs::read_to_string(dir.join(format!("{name}_failures.csv"))).unwrap();
    (
        total[requests].parse().unwrap(),
        total[failures].parse().unwrap(),
        failures_csv.lines().skip(1).map(str::to_owned).collect(),
    )
}

/// Requests and failures per request name from Locust's final `<name>.json`.
fn json_stats(dir: &Path, name: &str) -> Vec<(String, u64, u64)> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["num_requests"].as_u64().unwrap(),
                e["num_failures"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn alarms_reach_the_simulator(http2: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Install before the topology starts: on a fresh machine that takes half a minute.
    locust().await;
    let up = Up::start(&["ng", "--broker", "mosquitto"], dir.join("run")).await;
    let alarms_env = [
        ("LPS_ENTRIES", up.entries.join(",")),
        (ENV_USE_HTTP_2, http2.to_string()),
    ];
    let background_env = [("LPS_SIMULATOR", up.simulator.clone())];
    let alarms = run_locust(
        "locust_scripts/locustfile.py",
        &alarms_env,
        5,
        10,
        dir,
        "alarms",
    );
    let (alarms, background) = if http2 {
        (alarms.await, None)
    } else {
        let background = run_locust(
            "locust_scripts/background.py",
            &background_env,
            5,
            10,
            dir,
            "background",
        );
        let (a, b) = tokio::join!(alarms, background);
        (a, Some(b))
    };
    assert!(alarms.status.success(), "locust alarms: {}", text(&alarms));

    // Locust's statistics: requests, no failure (a failed attempt would be one).
    let (requests, failures, failure_rows) = csv_totals(dir, "alarms");
    assert!(
        requests > 0,
        "no request in alarms_stats.csv: {}",
        text(&alarms)
    );
    assert_eq!(failures, 0, "failures: {failure_rows:?}\n{}", text(&alarms));
    assert!(failure_rows.is_empty(), "{failure_rows:?}");
    let stats = json_stats(dir, "alarms");
    assert_eq!(stats.len(), 1, "only acknowledged alarms: {stats:?}");
    let (name, acknowledged, failed) = &stats[0];
    assert_eq!((name.as_str(), *failed), (SIMPLE_PATH, 0), "{stats:?}");

    // The client ledger: every alarm finished, once, with a valid id, over the protocol asked.
    let ledger_path = dir.join("alarms.jsonl");
    let ledger: Vec<ClientRecord> = read_jsonl(&ledger_path).unwrap();
    let raw: Vec<serde_json::Value> = read_jsonl(&ledger_path).unwrap();
    let unfinished: Vec<&serde_json::Value> = ledger
        .iter()
        .zip(&raw)
        .filter(|(r, _)| r.status != FinalStatus::Ok)
        .map(|(_, raw)| raw)
        .collect();
    assert!(
        unfinished.is_empty(),
        "alarms not acknowledged: {unfinished:?}\n{}",
        text(&alarms)
    );
    assert_eq!(
        ledger.len() as u64,
        *acknowledged,
        "one ledger line per alarm Locust counted\n{}",
        text(&alarms)
    );
    let protocol = if http2 { "HTTP/2" } else { "HTTP/1.1" };
    for (record, raw) in ledger.iter().zip(&raw) {
        assert_eq!(record.kind, RequestKind::Alarm);
        assert_eq!(record.status, FinalStatus::Ok, "{raw}");
        assert_eq!(record.last_status, 200, "{raw}");
        assert!(RequestId::parse(&record.id).is_ok(), "id {:?}", record.id);
        assert!(up.entries.contains(&record.endpoints[0]), "{raw}");
        assert_eq!(raw["http_version"], protocol, "{raw}");
    }
    let ids: BTreeSet<&str> = ledger.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), ledger.len(), "ids are unique");

    // Every acknowledged id reaches the simulator (the NG chain delivers after the answer).
    let sim_ledger = up.run.join("logs").join("ars_simulation.ledger.jsonl");
    let arrived = |records: &[LedgerRecord]| -> BTreeSet<String> {
        records
            .iter()
            .filter(|r| r.cmd == STORE_COMMAND && r.status == 200)
            .map(|r| r.uid.clone())
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let missing = loop {
        let records: Vec<LedgerRecord> = read_jsonl(&sim_ledger).unwrap_or_default();
        let arrived = arrived(&records);
        let missing: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !arrived.contains(*id))
            .collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged alarms never reached the simulator within 15 s: {missing:?}",
        missing.len(),
        ids.len()
    );

    if let Some(background) = background {
        assert!(
            background.status.success(),
            "locust background: {}",
            text(&background)
        );
        let (requests, failures, failure_rows) = csv_totals(dir, "background");
        assert!(requests > 0, "{}", text(&background));
        assert_eq!(failures, 0, "{failure_rows:?}");
        let sent: Vec<ClientRecord> = read_jsonl(&dir.join("background.jsonl")).unwrap();
        assert!(!sent.is_empty());
        assert!(
            sent.iter()
                .all(|r| r.kind == RequestKind::Background && r.id.is_empty())
        );
        let records: Vec<LedgerRecord> = read_jsonl(&sim_ledger).unwrap();
        let commands: BTreeSet<&str> = rast_simulator::commands::background_commands().collect();
        let background_arrivals = records
            .iter()
            .filter(|r| commands.contains(r.cmd.as_str()) && r.status == 200)
            .filter(|r| RequestId::parse(&r.uid).is_err())
            .count();
        assert!(
            background_arrivals as u64 >= sent.len() as u64,
            "{background_arrivals} background commands at the simulator, {} sent",
            sent.len()
        );
    }
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locust_alarms_and_background_over_http1_reach_the_simulator() {
    alarms_reach_the_simulator(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locust_alarms_over_h2c_reach_the_simulator() {
    alarms_reach_the_simulator(true).await;
}

/// background.py names exactly the simulator's non-alarm commands.
#[test]
fn background_commands_match_the_simulator() {
    let script = std::fs::read_to_string(repo().join("locust_scripts/background.py")).unwrap();
    let list = script
        .split_once("BACKGROUND_COMMANDS = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .expect("BACKGROUND_COMMANDS list in background.py")
        .0;
    let named: Vec<&str> = list.split('"').skip(1).step_by(2).collect();
    let expected: Vec<&str> = rast_simulator::commands::background_commands().collect();
    assert_eq!(named, expected);
}
