//! The simulator binary: options, LOG_DIR, shutdown.

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use lps_common::config::{ENV_LOG_DIR, ENV_SIM_MODEL, ENV_SIM_SERVICE_MS};
use lps_common::wire::{HEALTHZ_PATH, STORE_PATH};
use lps_testkit::{ChildService, eventually, exits_64, http1_client};

const BINARY: &str = env!("CARGO_BIN_EXE_rast-simulator");

#[tokio::test]
async fn writes_its_journal_in_log_dir_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("sim-logs");
    let logs_str = logs.to_str().unwrap();
    // `-m fixed` through the environment, like compose would set it.
    let mut sim = ChildService::start(
        Path::new(BINARY),
        &[
            (ENV_LOG_DIR, logs_str),
            (ENV_SIM_MODEL, "fixed"),
            (ENV_SIM_SERVICE_MS, "1"),
        ],
        dir.path(),
    )
    .await
    .unwrap();
    let response = http1_client()
        .post(sim.url(STORE_PATH))
        .header("Request-Id", "31")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-pred-process-time"], "0.001000");
    let health = http1_client()
        .get(sim.url(HEALTHZ_PATH))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    sim.terminate().unwrap();
    assert_eq!(
        sim.wait(Duration::from_secs(10)).await.unwrap().code(),
        Some(0)
    );
    let log = eventually("simulation log", Duration::from_secs(5), || {
        let path = logs.join("ars_simulation.log");
        async move {
            std::fs::read_to_string(path)
                .ok()
                .filter(|l| l.contains("CMD-ENDE"))
        }
    })
    .await;
    assert!(
        log.contains("UID: 31, CMD-ENDE  ID_REQ_KC_STORE7D3BPACKET"),
        "{log}"
    );
    assert!(logs.join("ars_simulation.ledger.jsonl").exists());
    assert!(
        logs.join("ars-comp-3.log").exists(),
        "service log in LOG_DIR too"
    );
}

#[tokio::test]
async fn a_bad_model_exits_64() {
    let stderr = exits_64(BINARY, &["-m", "7"], &[]).await;
    assert!(
        stderr.contains("--model") && stderr.contains("0, fixed, exp or zero"),
        "{stderr}"
    );
}
