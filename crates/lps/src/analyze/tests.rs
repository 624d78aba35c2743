//! Crafted run folders with known answers.

use std::path::{Path, PathBuf};

use rast_simulator::journal::{LEDGER_FILE, LedgerRecord};
use tempfile::TempDir;

use super::*;
use crate::records::{FaultAction, append_jsonl};

/// Load start of every crafted run.
const T0: u64 = 1_700_000_000_000_000;
const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;

fn alarm(id: &str, first_send_us: u64, success_us: Option<u64>, attempts: u32) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        kind: RequestKind::Alarm,
        user: 1,
        step: 0,
        first_send_us,
        success_us,
        attempts,
        endpoints: vec!["http://127.0.0.1:7081".to_owned(); attempts as usize],
        last_status: if success_us.is_some() { 200 } else { 0 },
        status: if success_us.is_some() {
            FinalStatus::Ok
        } else {
            FinalStatus::Failed
        },
    }
}

fn arrival(uid: &str, start_us: u64, end_us: u64) -> LedgerRecord {
    LedgerRecord {
        uid: uid.to_owned(),
        cmd: ALARM_COMMAND.to_owned(),
        start_us,
        end_us,
        status: 200,
        pr1: 0,
        pr3: 0,
        pred_s: 0.0,
        proto: "HTTP/1.1".to_owned(),
    }
}

/// `run.json` for a run whose load lasted `load_s` seconds from `T0`.
fn info(topology: &str, load_s: u64) -> serde_json::Value {
    serde_json::json!({
        "topology": topology,
        "broker": if topology == "ng" { Some("mosquitto") } else { None },
        "load": "failover 1 user",
        "load_start_us": T0,
        "load_end_us": T0 + load_s * SEC,
    })
}

/// Writes a run folder under `root/name`.
fn write_run(
    root: &Path,
    name: &str,
    info: &serde_json::Value,
    client: &[ClientRecord],
    sim: &[LedgerRecord],
) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::write(dir.join(RUN_INFO), info.to_string()).unwrap();
    append_jsonl(&dir.join(CLIENT_LEDGER), client).unwrap();
    append_jsonl(&dir.join("logs").join(LEDGER_FILE), sim).unwrap();
    dir
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-6)
}

#[test]
fn loss_and_duplicates_are_computed_on_id_sets() {
    let tmp = TempDir::new().unwrap();
    let mut client: Vec<ClientRecord> = (1..=5)
        .map(|i| {
            alarm(
                &format!("a{i}"),
                T0 + i * SEC,
                Some(T0 + i * SEC + 20 * MS),
                1,
            )
        })
        .collect();
    client[0].attempts = 3;
    client.push(alarm("u1", T0, None, 4));
    client.push(ClientRecord {
        kind: RequestKind::Background,
        id: String::new(),
        ..alarm("", T0, Some(T0 + MS), 1)
    });
    let mut sim = vec![
        arrival("a1", T0 + SEC + 5 * MS, T0 + SEC + 10 * MS),
        arrival("a2", T0 + 2 * SEC + 5 * MS, T0 + 2 * SEC + 10 * MS),
        arrival("a2", T0 + 3 * SEC, T0 + 3 * SEC + 10 * MS),
        arrival("a3", T0 + 3 * SEC + 5 * MS, T0 + 3 * SEC + 10 * MS),
        arrival("a4", T0 + 4 * SEC + 5 * MS, T0 + 4 * SEC + 10 * MS),
        arrival("u1", T0 + 5 * MS, T0 + 10 * MS),
    ];
    // a5 reached the simulator only as an aborted request and as another command: lost.
    sim.push(LedgerRecord {
        status: 499,
        ..arrival("a5", T0 + 5 * SEC, T0 + 5 * SEC + MS)
    });
    sim.push(LedgerRecord {
        cmd: "ID_REQ_KC_OTHER".to_owned(),
        ..arrival("a5", T0 + 5 * SEC, T0 + 5 * SEC + MS)
    });
    let dir = write_run(tmp.path(), "r", &info("legacy", 10), &client, &sim);

    let s = summarize(&dir).unwrap();
    assert_eq!(s.topology, "legacy");
    assert_eq!(s.broker, None);
    assert_eq!(s.sent, 6);
    assert_eq!(s.acknowledged, 5);
    assert_eq!(s.failed, 1);
    assert_eq!(s.delivered, 4);
    assert_eq!(s.lost, 1);
    assert_eq!(s.duplicates, 1);
    assert_eq!(s.duplicate_ids, 1);
    assert_eq!(s.unacknowledged_delivered, 1);
    assert_eq!(s.unknown_delivered, 0);
    assert_eq!(s.simulator_rejected, 1);
    assert_eq!(s.retries, 2 + 3);
    assert_eq!(s.client_errors, 2 + 4);
    assert_eq!(s.background.sent, 1);
    assert_eq!(s.background.acknowledged, 1);
    assert_eq!(s.background.simulator_arrivals, 1);
    assert!(s.per_instance.is_empty());
    // The loss means the run never drained by the data.
    assert_eq!(s.drain_observed_s, None);
    assert_eq!(s.drain_s, None);
}

#[test]
fn latency_joins_use_the_first_arrival() {
    let tmp = TempDir::new().unwrap();
    let client = vec![
        alarm("a", T0, Some(T0 + 100 * MS), 1),
        // Acknowledged before the simulator saw it (NG-like).
        alarm("b", T0, Some(T0 + 10 * MS), 1),
    ];
    // The duplicate of `a` is written first: the join must go by time, not file order.
    let sim = vec![
        arrival("a", T0 + 2 * SEC, T0 + 2 * SEC + 100 * MS),
        arrival("a", T0 + 50 * MS, T0 + 80 * MS),
        arrival("b", T0 + SEC, T0 + 1_200 * MS),
    ];
    let dir = write_run(tmp.path(), "r", &info("ng", 1), &client, &sim);

    let s = summarize(&dir).unwrap();
    assert_eq!(s.broker.as_deref(), Some("mosquitto"));
    assert_eq!(s.e2e_latency_ms.count, 2);
    assert!(close(s.e2e_latency_ms.p50, 80.0), "{:?}", s.e2e_latency_ms);
    assert!(close(s.e2e_latency_ms.max, 1_200.0));
    assert!(close(s.e2e_latency_ms.mean, 640.0));
    assert!(close(s.response_time_ms.max, 100.0));
    assert!(close(s.response_time_ms.p50, 10.0));
    let hop = &s.per_hop_ms;
    assert!(close(hop.to_backend.p50, 50.0), "{hop:?}");
    assert!(close(hop.to_backend.max, 1_000.0));
    assert!(close(hop.backend.p50, 30.0));
    assert!(close(hop.backend.max, 200.0));
    assert_eq!(hop.back_to_client.count, 1);
    assert!(close(hop.back_to_client.max, 20.0));
    assert_eq!(hop.acknowledged_before_backend, 1);
    // Processing time covers every arrival, the duplicate included.
    assert_eq!(s.sim_processing_ms.count, 3);
    assert!(close(s.sim_processing_ms.max, 200.0));
    assert_eq!(s.duplicates, 1);
}

#[test]
fn drain_comes_from_run_json_or_else_from_the_data() {
    let tmp = TempDir::new().unwrap();
    let client = vec![
        alarm("a", T0, Some(T0 + 10 * MS), 1),
        alarm("b", T0 + SEC, Some(T0 + SEC + 10 * MS), 1),
    ];
    // Load ends at T0 + 2 s; `b` first arrives 4 s later (and again even later).
    let sim = vec![
        arrival("a", T0 + 20 * MS, T0 + 30 * MS),
        arrival("b", T0 + 5 * SEC, T0 + 6 * SEC),
        arrival("b", T0 + 9 * SEC, T0 + 10 * SEC),
    ];
    let mut with = info("ng", 2);
    with["drained_us"] = serde_json::json!(T0 + 4_500 * MS);
    let mut null = info("ng", 2);
    null["drained_us"] = serde_json::Value::Null;

    let from_run = summarize(&write_run(tmp.path(), "a", &with, &client, &sim)).unwrap();
    assert!(close(from_run.drain_s, 2.5), "{:?}", from_run.drain_s);
    assert!(close(from_run.drain_observed_s, 4.0));

    let not_drained = summarize(&write_run(tmp.path(), "b", &null, &client, &sim)).unwrap();
    assert_eq!(not_drained.drain_s, None);

    let from_data = summarize(&write_run(tmp.path(), "c", &info("ng", 2), &client, &sim)).unwrap();
    assert!(close(from_data.drain_s, 4.0), "{:?}", from_data.drain_s);

    // Everything arrived before the load ended: drained at once.
    let early = summarize(&write_run(tmp.path(), "d", &info("ng", 20), &client, &sim)).unwrap();
    assert!(close(early.drain_s, 0.0));
}

#[test]
fn per_instance_counts_survive_counter_resets() {
    let tmp = TempDir::new().unwrap();
    let dir = write_run(tmp.path(), "r", &info("ng", 5), &[], &[]);
    let sample = |at: u64, service: &str, forwarded: u64| BridgeSample {
        at_us: T0 + at * SEC,
        service: service.to_owned(),
        forwarded,
        retried: 0,
        dead_lettered: 0,
    };
    // Out of time order on purpose; proxy2-2 already had 3 when sampling started.
    let samples = vec![
        sample(3, "proxy2-1", 0),
        sample(0, "proxy2-1", 0),
        sample(1, "proxy2-1", 10),
        sample(0, "proxy2-2", 3),
        sample(2, "proxy2-1", 20),
        sample(4, "proxy2-1", 5),
        sample(4, "proxy2-2", 7),
        // Restarted between samples and forwarded 4 before the next one.
        sample(0, "proxy2-3", 0),
        sample(1, "proxy2-3", 10),
        sample(2, "proxy2-3", 4),
        sample(3, "proxy2-3", 6),
    ];
    append_jsonl(&dir.join(BRIDGE_METRICS), &samples).unwrap();
    let s = summarize(&dir).unwrap();
    assert_eq!(
        s.per_instance,
        BTreeMap::from([
            ("proxy2-1".to_owned(), 25),
            ("proxy2-2".to_owned(), 4),
            ("proxy2-3".to_owned(), 16),
        ])
    );
}

#[test]
fn queueing_and_throughput_on_a_known_schedule() {
    let tmp = TempDir::new().unwrap();
    // 10 alarms per second for 10 s; each served in 50 ms, one at a time.
    let mut client = Vec::new();
    let mut sim = Vec::new();
    for i in 0..100 {
        let send = T0 + i * 100 * MS;
        let id = format!("a{i}");
        client.push(alarm(&id, send, Some(send + 5 * MS), 1));
        sim.push(arrival(&id, send + 10 * MS, send + 60 * MS));
    }
    // A duplicate overlapping the first service by 30 ms extends busy time by 20 ms.
    sim.push(arrival("a0", T0 + 30 * MS, T0 + 80 * MS));
    // Sent after the load window: not part of λ.
    client.push(alarm("late", T0 + 11 * SEC, Some(T0 + 11 * SEC + MS), 1));
    let dir = write_run(tmp.path(), "r", &info("legacy", 10), &client, &sim);

    let s = summarize(&dir).unwrap();
    let q = &s.queueing;
    assert!(close(Some(q.load_window_s), 10.0));
    assert!(close(q.lambda_per_s, 10.0), "{q:?}");
    assert!(close(Some(q.busy_s), 5.02), "{q:?}");
    assert_eq!(q.served, 101);
    assert!(close(q.mu_per_s, 101.0 / 5.02), "{q:?}");
    assert!(close(q.rho, 10.0 / (101.0 / 5.02)), "{q:?}");
    assert_eq!(q.peak_delivered_per_s, 10);

    // Seconds 0..=9 full, 10 empty (filled), 11 has the late alarm.
    assert_eq!(s.throughput.len(), 12, "{:?}", s.throughput);
    for b in &s.throughput[..10] {
        assert_eq!((b.sent, b.acknowledged, b.delivered), (10, 10, 10), "{b:?}");
    }
    assert_eq!(s.throughput[10].t_s, 10);
    assert_eq!(s.throughput[10].sent, 0);
    assert_eq!(s.throughput[11].sent, 1);
    assert_eq!(s.lost, 1);
}

#[test]
fn per_step_aggregates_response_times() {
    let tmp = TempDir::new().unwrap();
    let step = |id: &str, step: u32, send_s: u64, response_ms: Option<u64>| ClientRecord {
        step,
        ..alarm(
            id,
            T0 + send_s * SEC,
            response_ms.map(|r| T0 + send_s * SEC + r * MS),
            1,
        )
    };
    let client = vec![
        step("a", 0, 0, Some(100)),
        step("b", 0, 1, Some(300)),
        step("c", 1, 120, Some(5_000)),
        step("d", 1, 121, Some(40_000)),
        step("e", 2, 240, None),
    ];
    let dir = write_run(tmp.path(), "r", &info("legacy", 300), &client, &[]);
    let s = summarize(&dir).unwrap();
    assert_eq!(s.per_step.len(), 3, "{:?}", s.per_step);
    let [s0, s1, s2] = &s.per_step[..] else {
        unreachable!()
    };
    assert_eq!((s0.step, s0.requests, s0.acknowledged), (0, 2, 2));
    assert!(close(s0.avg_response_ms, 200.0) && close(s0.max_response_ms, 300.0));
    assert!(s0.within_limits);
    assert_eq!((s1.step, s1.requests), (1, 2));
    assert!(close(Some(s1.start_s), 120.0));
    assert!(close(s1.avg_response_ms, 22_500.0) && close(s1.max_response_ms, 40_000.0));
    assert!(!s1.within_limits, "max above 30 s");
    assert_eq!(
        (s2.requests, s2.acknowledged, s2.avg_response_ms),
        (1, 0, None)
    );
    assert!(!s2.within_limits);

    // Without steps there is no per-step table.
    let flat = write_run(tmp.path(), "flat", &info("legacy", 3), &client[..2], &[]);
    assert!(summarize(&flat).unwrap().per_step.is_empty());
}

#[test]
fn percentiles_use_the_nearest_rank() {
    let values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
    let s = Stats::of(values);
    assert_eq!(s.count, 100);
    assert_eq!(
        (s.p50, s.p90, s.p99, s.max),
        (Some(50.0), Some(90.0), Some(99.0), Some(100.0))
    );
    assert_eq!(s.mean, Some(50.5));
    assert_eq!(Stats::of(vec![7.0]).p99, Some(7.0));
    assert_eq!(Stats::of(Vec::new()), Stats::default());
}

#[test]
fn summary_json_has_the_documented_shape() {
    let tmp = TempDir::new().unwrap();
    let dir = write_run(
        tmp.path(),
        "r",
        &info("legacy", 1),
        &[alarm("a", T0, Some(T0 + MS), 1)],
        &[arrival("a", T0, T0 + MS)],
    );
    let v = serde_json::to_value(summarize(&dir).unwrap()).unwrap();
    for key in [
        "topology",
        "broker",
        "sent",
        "acknowledged",
        "delivered",
        "lost",
        "duplicates",
        "duplicate_ids",
        "unacknowledged_delivered",
        "client_errors",
        "retries",
        "per_step",
        "throughput",
        "drain_s",
        "faults",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for stats in ["e2e_latency_ms", "response_time_ms", "sim_processing_ms"] {
        for key in ["p50", "p90", "p99", "max", "mean"] {
            assert!(v[stats][key].is_number(), "{stats}.{key}");
        }
    }
    for hop in ["to_backend", "backend", "back_to_client"] {
        assert!(v["per_hop_ms"][hop].is_object(), "{hop}");
    }
    for key in ["lambda_per_s", "mu_per_s", "rho"] {
        assert!(v["queueing"][key].is_number(), "queueing.{key}");
    }
    assert!(v["per_instance"].is_object());
    assert!(v["broker"].is_null());
    let back: Summary = serde_json::from_value(v).unwrap();
    assert_eq!(back.sent, 1);
}

#[test]
fn bad_input_names_the_file_and_line() {
    let tmp = TempDir::new().unwrap();
    let err = summarize(&tmp.path().join("nothing")).unwrap_err();
    assert!(format!("{err:#}").contains(RUN_INFO), "{err:#}");

    let dir = write_run(
        tmp.path(),
        "r",
        &info("legacy", 1),
        &[alarm("a", T0, Some(T0 + MS), 1)],
        &[],
    );
    let mut ledger = std::fs::read_to_string(dir.join(CLIENT_LEDGER)).unwrap();
    ledger.push_str("{not json\n");
    std::fs::write(dir.join(CLIENT_LEDGER), ledger).unwrap();
    let err = summarize(&dir).unwrap_err();
    assert!(
        format!("{err:#}").contains("client_ledger.jsonl:2"),
        "{err:#}"
    );
}

#[test]
fn report_has_summary_csv_and_every_plot() {
    let tmp = TempDir::new().unwrap();
    let client: Vec<ClientRecord> = (0..20)
        .map(|i| {
            alarm(
                &format!("a{i}"),
                T0 + i * 100 * MS,
                Some(T0 + i * 100 * MS + 30 * MS),
                1,
            )
        })
        .collect();
    let sim: Vec<LedgerRecord> = (0..19)
        .map(|i| {
            arrival(
                &format!("a{i}"),
                T0 + i * 100 * MS + 10 * MS,
                T0 + i * 100 * MS + 20 * MS,
            )
        })
        .collect();
    let mut legacy_info = info("legacy", 2);
    legacy_info["load"] = serde_json::json!("rate <b>200/s</b>");
    let legacy = write_run(tmp.path(), "legacy", &legacy_info, &client, &sim);
    let ng = write_run(tmp.path(), "ng", &info("ng", 2), &client, &sim);
    append_jsonl(
        &ng.join(FAULTS),
        &[
            FaultRecord {
                at_us: T0 + 500 * MS,
                service: "proxy2-1".to_owned(),
                action: FaultAction::Stop,
                how: "SIGKILL".to_owned(),
            },
            FaultRecord {
                at_us: T0 + 1_500 * MS,
                service: "proxy2-1".to_owned(),
                action: FaultAction::Start,
                how: "SIGKILL".to_owned(),
            },
        ],
    )
    .unwrap();
    append_jsonl(
        &ng.join(BRIDGE_METRICS),
        &[
            BridgeSample {
                at_us: T0,
                service: "proxy2-1".to_owned(),
                forwarded: 0,
                retried: 0,
                dead_lettered: 0,
            },
            BridgeSample {
                at_us: T0 + SEC,
                service: "proxy2-1".to_owned(),
                forwarded: 19,
                retried: 0,
                dead_lettered: 0,
            },
        ],
    )
    .unwrap();
    let out = tmp.path().join("out");

    let summaries = write_report(&[legacy, ng], &out).unwrap();
    assert_eq!(summaries.len(), 2);
    assert_eq!(summaries[0].topology, "legacy");
    assert_eq!(summaries[1].per_instance["proxy2-1"], 19);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["legacy"]["lost"], 1);
    assert_eq!(json["ng"]["delivered"], 19);
    assert_eq!(json["ng"]["faults"].as_array().unwrap().len(), 2);

    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(
        csv.lines()
            .nth(2)
            .unwrap()
            .starts_with("ng,ng,mosquitto,20,20,0,19,1,")
    );
    let requests = std::fs::read_to_string(out.join("requests_ng.csv")).unwrap();
    assert_eq!(requests.lines().count(), 21);
    assert_eq!(
        requests.lines().next(),
        Some("id,first_send_us,success_us,attempts,delivered_count,e2e_ms")
    );
    assert!(requests.contains(&format!("\na0,{T0},{},1,1,20.000\n", T0 + 30 * MS)));
    assert!(out.join("requests_legacy.csv").exists());

    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for id in [
        "plot-response-time",
        "plot-latency-cdf",
        "plot-per-instance",
        "plot-throughput",
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "{id} missing");
    }
    for svg in [
        "plot-response-time-legacy",
        "plot-response-time-ng",
        "plot-latency-cdf-svg",
        "plot-per-instance-ng",
        "plot-throughput-legacy",
        "plot-throughput-ng",
    ] {
        assert!(
            html.contains(&format!("<svg id=\"{svg}\"")),
            "{svg} missing"
        );
    }
    assert!(html.contains("proxy2-1 stop") && html.contains("proxy2-1 start"));
    assert!(html.contains("rate &lt;b&gt;200/s&lt;/b&gt;"));
    assert!(!html.contains("<b>200"));
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("<link"));

    let text = table(&summaries);
    assert!(text.starts_with("topology"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("lost") && l.ends_with('1')),
        "{text}"
    );
}

#[test]
fn two_runs_get_a_difference_table_with_the_better_value_marked() {
    let tmp = TempDir::new().unwrap();
    let client = [
        alarm("a", T0, Some(T0 + 10 * MS), 1),
        alarm("b", T0 + SEC, Some(T0 + SEC + 10 * MS), 1),
    ];
    let lossy = write_run(
        tmp.path(),
        "lossy",
        &info("legacy", 2),
        &client,
        &[arrival("a", T0 + MS, T0 + 5 * MS)],
    );
    let whole = write_run(
        tmp.path(),
        "whole",
        &info("ng", 2),
        &client,
        &[
            arrival("a", T0 + MS, T0 + 5 * MS),
            arrival("b", T0 + SEC + MS, T0 + SEC + 5 * MS),
        ],
    );
    let out = tmp.path().join("out");
    write_report(&[lossy, whole], &out).unwrap();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let table = &html[html.find("id=\"comparison\"").expect("a difference table")..];
    let lost_row = &table[table.find("<td>lost</td>").unwrap()..];
    let lost_row = &lost_row[..lost_row.find("</tr>").unwrap()];
    assert_eq!(
        lost_row,
        "<td>lost</td><td>1.0</td><td class=\"better\">0.0</td><td>-1.0</td>"
    );
    // Every figure says what it shows, under it.
    let figures: Vec<&str> = html.split("<figure").skip(1).collect();
    assert_eq!(figures.len(), 4);
    for figure in figures {
        let figure = &figure[..figure.find("</figure>").unwrap()];
        assert!(figure.contains("<p class=\"note\">"), "{figure}");
    }

    // The .hgrm and throughput files agree with the summary.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let hgrm = std::fs::read_to_string(out.join("e2e_ng.hgrm")).unwrap();
    assert!(hgrm.contains("Total count    =            2"), "{hgrm}");
    assert_eq!(summary["ng"]["e2e_latency_ms"]["count"], 2);
    let throughput = std::fs::read_to_string(out.join("throughput_ng.csv")).unwrap();
    assert_eq!(
        throughput.lines().next(),
        Some("t_s,sent,acknowledged,delivered")
    );
    assert_eq!(throughput.lines().count(), 3, "{throughput}");
}
