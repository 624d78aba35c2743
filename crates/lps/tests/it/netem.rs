//! `lps up --netem`: the shaping relays sit on every hop upstream shaped, and an alarm
//! pays their delay on each of them, end to end through real processes.

use std::time::{Duration, Instant};

use ars_comp_1::SIMPLE_PATH;
use http::StatusCode;
use lps_testkit::{eventually, http1_client};

use crate::support::Up;

/// The one-way delay of the test's profile (no jitter, so it is a floor).
const DELAY: Duration = Duration::from_millis(40);

#[tokio::test]
async fn up_legacy_with_netem_delays_every_shaped_hop() {
    let dir = tempfile::tempdir().unwrap();
    let profile = format!("--netem=delay={}ms,jitter=0ms", DELAY.as_millis());
    let up = Up::start(&["legacy", &profile], dir.path().join("run")).await;
    let services: Vec<lps::up::ServiceEntry> =
        serde_json::from_slice(&std::fs::read(up.run.join(lps::up::SERVICES_FILE)).unwrap())
            .unwrap();
    let relays = services.iter().filter(|s| s.program == "lps-netem").count();
    // In front of each entry, ars-comp-1 → ars-comp-2 and ars-comp-2 → simulator.
    assert_eq!(relays, 9, "{services:?}");
    let client = http1_client();
    let mut fastest = Duration::MAX;
    for id in 700..703u32 {
        let started = Instant::now();
        let response = client
            .post(format!("{}{SIMPLE_PATH}", up.entries[0]))
            .header("Request-Id", id.to_string())
            .body(r#"{"phone":"015142611148","branch":"2001","headnumber":"8023","triggertime":"2025-01-31T12:00:00Z"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        fastest = fastest.min(started.elapsed());
    }
    // Shaped, once connections are warm: ars-comp-1's answer (1 delay), both ways between
    // ars-comp-1 and ars-comp-2 (2), ars-comp-2's request to the simulator (1).
    assert!(
        fastest >= DELAY * 4,
        "fastest alarm took {fastest:?}, less than the 4 × {DELAY:?} the relays add"
    );
    let log_path = up.run.join("logs").join("ars_simulation.log");
    eventually(
        "the alarms at the simulator",
        Duration::from_secs(10),
        || {
            let path = log_path.clone();
            async move {
                let log = std::fs::read_to_string(path).ok()?;
                (700..703)
                    .all(|id| log.contains(&format!("UID: {id}, CMD-ENDE")))
                    .then_some(())
            }
        },
    )
    .await;
    up.stop().await;
}
