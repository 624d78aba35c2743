//! A CI-sized `lps demo`: both topologies under load and a scaled fault schedule, then the
//! side-by-side report. Asserts that nothing acknowledged was lost and that the report has
//! every plot.

use std::process::Stdio;
use std::time::Duration;

async fn demo(broker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
            .args([
                "demo",
                "--duration",
                "20",
                "--users",
                "5",
                "--background-users",
                "5",
                "--broker",
                broker,
                "--out",
            ])
            .arg(&out)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("demo within 5 minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    println!("{stdout}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    for topology in ["legacy", "ng"] {
        let s = &summary[topology];
        assert!(s["acknowledged"].as_u64().unwrap() > 20, "{topology}: {s}");
        assert_eq!(s["lost"], 0, "{topology} lost acknowledged alarms: {s}");
        assert!(s["drain_s"].is_number(), "{topology} drained: {s}");
    }
    let faults = std::fs::read_to_string(out.join("ng").join("faults.jsonl")).unwrap();
    for service in [
        "ars-comp-1-1",
        "proxy1-1",
        "proxy2-1",
        "ars-comp-2-1",
        "ars-comp-3",
    ] {
        assert!(
            faults.contains(&format!("\"{service}\"")),
            "{service} was stopped and started: {faults}"
        );
    }
    let per_instance = summary["ng"]["per_instance"].as_object().unwrap();
    assert_eq!(per_instance.len(), 3, "{per_instance:?}");
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    for plot in [
        "plot-response-time",
        "plot-latency-cdf",
        "plot-per-instance",
        "plot-throughput",
    ] {
        assert!(report.contains(plot), "report.html lacks {plot}");
    }
    assert!(stdout.contains("report.html"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_mosquitto_loses_nothing_and_reports_every_plot() {
    demo("mosquitto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_the_embedded_broker_loses_nothing_and_reports_every_plot() {
    demo("embedded").await;
}
