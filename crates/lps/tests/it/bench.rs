//! `lps bench` at a tiny size, so the harness cannot rot: every scenario and every kind of
//! figure is produced, nothing fails and nothing acknowledged is lost. No time is
//! asserted. nginx is required: scripts/test.sh installs it.

use std::collections::HashSet;

#[tokio::test]
async fn bench_produces_every_scenario_with_zero_loss() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
        .args([
            "bench",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--connections",
            "2,4",
            "--sizes",
            "1k,64k",
            "--curve",
            "1,4,16",
            "--held",
            "300",
            "--broker",
            "mosquitto",
            "--drain-timeout",
            "20",
            "--rounds",
            "2",
            "--out",
        ])
        .arg(&out)
        .kill_on_drop(true)
        .status()
        .await
        .unwrap();
    assert!(status.success(), "lps bench failed: {status}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bench.json")).unwrap()).unwrap();
    let figures = report["figures"].as_array().unwrap();
    let scenarios: HashSet<&str> = figures
        .iter()
        .map(|f| f["scenario"].as_str().unwrap())
        .collect();
    for scenario in ["direct", "relay", "legacy", "broker", "ng"] {
        assert!(scenarios.contains(scenario), "no {scenario} figure");
    }
    // direct and relay at 2 and 4 connections, both protocols, two sizes, one open loop.
    assert!(figures.len() >= 2 + 4 + 4 + 2 + 1 + 1 + 2, "{figures:#?}");
    let names: HashSet<&str> = figures
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    for name in [
        "nginx-as-relay http1 c2",
        "nginx-as-relay http1 c4",
        "relay h2c 1×2 streams",
        "relay h2c 1×4 streams",
        "direct http1 c1",
        "relay http1 c1",
        "direct http1 c16",
        "relay http1 c16",
        "relay held 300 idle",
        "relay http1 c4 1KiB",
        "relay http1 c4 64KiB",
    ] {
        assert!(names.contains(name), "no {name} figure: {names:?}");
    }
    assert_eq!(
        report["skipped"].as_array().map(Vec::len),
        Some(0),
        "{}",
        report["skipped"]
    );
    for f in figures {
        let name = f["name"].as_str().unwrap();
        assert!(
            f["ok"].as_u64().unwrap() > 0,
            "{name}: nothing acknowledged"
        );
        assert_eq!(
            f["errors"].as_u64(),
            Some(0),
            "{name}: {}",
            f["first_error"]
        );
        assert!(f["rate"].as_f64().unwrap() > 0.0, "{name}: no rate");
        assert!(
            f["generator"]["cpu_s"].as_f64().unwrap() > 0.0,
            "{name}: no generator CPU"
        );
        let processes = f["processes"].as_array().unwrap();
        assert!(!processes.is_empty(), "{name}: no service figures");
        for p in processes {
            assert!(p["rss_peak_mib"].as_f64().unwrap() > 0.0, "{name}: {p}");
        }
        if matches!(f["scenario"].as_str(), Some("legacy" | "ng")) {
            assert_eq!(
                f["lost"].as_u64(),
                Some(0),
                "{name} lost acknowledged alarms"
            );
        }
        assert!(f["steal"].as_f64().is_some(), "{name}: no steal");
        if name.starts_with("relay held") {
            // Every connection held open answered again after the hold.
            assert_eq!(f["ok"].as_u64(), Some(300), "{name}: connections lost");
        } else if f["scenario"] != "direct" && f["scenario"] != "broker" {
            assert!(
                f["ratio"].as_f64().is_some(),
                "{name}: no ratio to its ceiling"
            );
        }
    }
    // The relay against nginx in its place, h2c against HTTP/1.1.
    for c in [2, 4] {
        for name in [
            format!("relay http1 c{c}"),
            format!("relay h2c c{c}"),
            format!("relay h2c 1×{c} streams"),
        ] {
            let f = figures.iter().find(|f| f["name"] == name.as_str()).unwrap();
            assert!(
                f["versus_ratio"].as_f64().is_some(),
                "{name}: no ratio to {}",
                f["versus"]
            );
        }
    }
    let ng = figures.iter().find(|f| f["scenario"] == "ng").unwrap();
    assert!(ng["delivered_rate"].as_f64().unwrap() > 0.0);
    for p in ng["processes"].as_array().unwrap() {
        assert!(
            p["cpu_us_per_op"].as_f64().is_some(),
            "ng: no CPU per alarm for {p}"
        );
    }
    assert!(!report["checks"].as_array().unwrap().is_empty());
}
