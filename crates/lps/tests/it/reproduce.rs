//! `lps reproduce --quick`: upstream's whole experiment matrix at the CI scale, then one
//! report. Asserts that the report has every finding and figure, that NG under netem with
//! a window of 1 is clearly slower than with 32 (as ratios, no absolute times), and that
//! the CSV and `.hgrm` files parse and agree with `summary.json`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The rows of a CSV file as header → value maps.
fn csv_rows(path: &Path) -> Vec<HashMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let headers = reader.headers().unwrap().clone();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            headers
                .iter()
                .map(str::to_owned)
                .zip(r.iter().map(str::to_owned))
                .collect()
        })
        .collect()
}

/// The `(value, percentile)` rows of an HdrHistogram percentile file.
fn hgrm_rows(path: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("Value"), "{}: no header", path.display());
    let rows: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.contains("Value"))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    assert!(!rows.is_empty(), "{}: no rows", path.display());
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reproduce_quick_reports_every_finding_and_window_1_is_slower_than_32() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reproduce");
    let started = std::time::Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
            .args(["reproduce", "--quick", "--out"])
            .arg(&out)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("reproduce --quick within 10 minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "reproduce failed:\n{stdout}\n{stderr}"
    );
    println!("{stdout}\n(took {:.0} s)", started.elapsed().as_secs_f64());
    assert!(stderr.contains("[20/20]"), "progress: {stderr}");
    assert!(
        stdout.contains(&out.join("report.html").display().to_string()),
        "{stdout}"
    );

    // Every finding, in the terminal table and in the report, each with its figure.
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    for key in ["window", "drain", "loss", "steps", "queueing"] {
        assert!(
            report.contains(&format!("href=\"#fig-{key}\"")),
            "link {key}"
        );
        assert!(
            report.contains(&format!("id=\"fig-{key}\"")),
            "figure {key}"
        );
    }
    for words in ["~22 msg/s", "2707 s", "EN 50136", "λ = 302.51"] {
        assert!(report.contains(words), "report lacks {words}");
        assert!(stdout.contains(words), "table lacks {words}");
    }

    // Window 1 under netem is clearly slower than 32: fewer alarms delivered per second
    // and a longer median end-to-end latency.
    let findings = json(&out.join("findings.json"));
    let window = &findings["window"];
    let rate_ratio = window["rate_ratio"].as_f64().unwrap();
    let latency_ratio = window["latency_ratio"].as_f64().unwrap();
    assert!(
        rate_ratio > 1.2,
        "window 32 ÷ window 1 delivery rate: {window}"
    );
    assert!(
        latency_ratio > 2.0,
        "window 1 ÷ window 32 e2e p50: {window}"
    );

    // The CSV and .hgrm files parse and agree with summary.json.
    let summary = json(&out.join("summary.json"));
    let cells = findings["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 20);
    let rows = csv_rows(&out.join("summary.csv"));
    assert_eq!(rows.len(), 20);
    for row in &rows {
        let s = &summary[&row["key"]];
        for field in ["sent", "acknowledged", "delivered", "lost", "duplicates"] {
            assert_eq!(
                row[field].parse::<u64>().unwrap(),
                s[field].as_u64().unwrap(),
                "{} {field}",
                row["key"]
            );
        }
        let p50: f64 = row["e2e_p50_ms"].parse().unwrap();
        assert!((p50 - s["e2e_latency_ms"]["p50"].as_f64().unwrap()).abs() < 0.01);
    }
    for cell in cells {
        let key = cell["name"].as_str().unwrap();
        let s = &summary[key];
        let requests = csv_rows(&out.join(format!("requests_{key}.csv")));
        assert_eq!(requests.len() as u64, s["sent"].as_u64().unwrap(), "{key}");
        let delivered = requests.iter().filter(|r| !r["e2e_ms"].is_empty()).count() as u64;
        assert_eq!(delivered, s["e2e_latency_ms"]["count"].as_u64().unwrap());
        let hgrm = hgrm_rows(&out.join(format!("e2e_{key}.hgrm")));
        let max = hgrm.last().unwrap().0;
        let s_max = s["e2e_latency_ms"]["max"].as_f64().unwrap();
        assert!(
            (max - s_max).abs() <= s_max * 0.01 + 0.01,
            "{key}: .hgrm max {max} vs summary {s_max}"
        );
        let throughput = csv_rows(&out.join(format!("throughput_{key}.csv")));
        let delivered_total: u64 = throughput
            .iter()
            .map(|r| r["delivered"].parse::<u64>().unwrap())
            .sum();
        assert!(delivered_total >= s["delivered"].as_u64().unwrap(), "{key}");
        // Per-hop latency: every hop of the topology, each with its own time.
        let hops = s["per_hop_ms"]["services"].as_array().unwrap();
        let expected = if key.starts_with("ng") { 6 } else { 3 };
        assert_eq!(hops.len(), expected, "{key}: {hops:?}");
        let simulator = hops.last().unwrap();
        assert_eq!(simulator["hop"], "simulator", "{key}");
        for hop in hops {
            assert!(hop["mean_ms"].as_f64().unwrap().is_finite(), "{key}: {hop}");
        }
    }
    assert!(
        report.contains("Per-hop latency"),
        "report lacks the per-hop table"
    );
}
