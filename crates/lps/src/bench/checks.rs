//! Issue 5's targets, checked against a run's figures.

use super::generator::Protocol;
use super::procstat::ProcessFigures;
use super::{Check, Figure, Hop, Key, Scenario, find, size_name};

fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

/// Every target this run has the figures for.
pub(super) fn checks(figures: &[Figure], most: usize) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.extend(relay_ratio(figures, most));
    checks.extend(added_latency(figures, most));
    checks.extend(relay_memory(figures));
    checks.extend(legacy_ratio(figures, most));
    checks.extend(ng(figures, most));
    checks.extend(memory(figures, most));
    checks
}

fn relay_ratio(figures: &[Figure], most: usize) -> Option<Check> {
    let ratio = find(figures, &Key::http(Hop::Relay, Protocol::Http1, most))?.ratio?;
    Some(Check {
        target: format!("relay ≥ 50 % of direct at c{most}, small bodies"),
        measured: pct(ratio),
        met: ratio >= 0.5,
    })
}

fn added_latency(figures: &[Figure], most: usize) -> Option<Check> {
    let open = |hop| {
        find(
            figures,
            &Key::OpenHalf {
                hop,
                connections: most,
            },
        )
    };
    let (direct, relay) = (open(Hop::Direct)?, open(Hop::Relay)?);
    let added = relay.p99_ms - direct.p99_ms;
    Some(Check {
        target: "relay adds ≤ 1 ms p99 at half its throughput".into(),
        measured: format!(
            "{added:.2} ms ({:.2} vs {:.2} ms at {})",
            relay.p99_ms, direct.p99_ms, relay.mode
        ),
        met: added <= 1.0,
    })
}

/// The relay's peak at the largest body of the size matrix (at least 1 MiB).
fn relay_memory(figures: &[Figure]) -> Option<Check> {
    let big = figures
        .iter()
        .filter(|f| f.key.relay_body().is_some_and(|bytes| bytes >= 1 << 20))
        .max_by_key(|f| f.body_bytes)?;
    let relay = big.processes.iter().find(|p| p.name == "ars-comp-2")?;
    let product = (big.body_bytes * big.connections) as f64 / f64::from(1 << 20);
    Some(Check {
        target: format!(
            "relay memory below body × connections ({product:.0} MiB) at {}",
            size_name(big.body_bytes)
        ),
        measured: format!("{:.1} MiB peak", relay.rss_peak_mib),
        met: relay.rss_peak_mib < product,
    })
}

fn legacy_ratio(figures: &[Figure], most: usize) -> Option<Check> {
    let ratio = find(figures, &Key::Legacy { connections: most })?.ratio?;
    Some(Check {
        target: "legacy chain ≥ 30 % of direct".into(),
        measured: pct(ratio),
        met: ratio >= 0.3,
    })
}

/// The NG targets: the share of the broker ceiling, no loss, the drain.
fn ng(figures: &[Figure], most: usize) -> Vec<Check> {
    let mut checks = Vec::new();
    let ng = |open80| {
        find(
            figures,
            &Key::Ng {
                connections: most,
                open80,
            },
        )
    };
    if let Some(ratio) = ng(false).and_then(|f| f.ratio) {
        checks.push(Check {
            target: "NG delivered ≥ 60 % of the broker ceiling".into(),
            measured: pct(ratio),
            met: ratio >= 0.6,
        });
    }
    let all: Vec<&Figure> = figures
        .iter()
        .filter(|f| f.scenario == Scenario::Ng)
        .collect();
    if !all.is_empty() {
        let lost: u64 = all.iter().filter_map(|f| f.lost).sum();
        checks.push(Check {
            target: "NG loses nothing".into(),
            measured: format!("{lost} lost"),
            met: lost == 0,
        });
    }
    if let Some(drain) = ng(true).and_then(|f| f.drain_s) {
        checks.push(Check {
            target: "NG drains ≤ 1 s after load at 80 % of sustainable".into(),
            measured: format!("{drain:.2} s"),
            met: drain <= 1.0,
        });
    }
    checks
}

/// Idle: each process before its first load (later "idle" figures include what the
/// allocator kept from earlier loads). Full load: small-body figures at up to the most
/// `--connections` (not the far end of the curve, not the held connections). Our
/// services only: neither Mosquitto nor nginx.
fn memory(figures: &[Figure], most: usize) -> Vec<Check> {
    let mut first_idle: Vec<(&str, f64)> = Vec::new();
    let mut peak: (f64, &str) = (0.0, "");
    let ours = |p: &&ProcessFigures| p.name != "mosquitto" && !p.name.starts_with("nginx");
    for f in figures {
        let beyond = match f.key {
            Key::Http { connections, .. } => connections > most,
            Key::Held { .. } => true,
            _ => false,
        };
        let full_load = f.body_bytes < 64 << 10 && !beyond;
        for p in f.processes.iter().filter(ours) {
            if !first_idle.iter().any(|(name, _)| *name == p.name) {
                first_idle.push((&p.name, p.rss_idle_mib));
            }
            if full_load && p.rss_peak_mib > peak.0 {
                peak = (p.rss_peak_mib, &p.name);
            }
        }
    }
    if peak.0 <= 0.0 {
        return Vec::new();
    }
    let (worst_idle, idle) = first_idle
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default();
    vec![
        Check {
            target: "every service ≤ 20 MiB idle".into(),
            measured: format!("{idle:.1} MiB at most ({worst_idle})"),
            met: idle <= 20.0,
        },
        Check {
            target: "every service ≤ 64 MiB at full load (small bodies)".into(),
            measured: format!("{:.1} MiB at most ({})", peak.0, peak.1),
            met: peak.0 <= 64.0,
        },
    ]
}
