//! The fuzz smoke run: every target over its seed corpus and then random mutations of it,
//! a couple of seconds each (`LPS_FUZZ_SMOKE_SECS`), on stable Rust. The coverage-guided
//! long runs use `fuzz/` with cargo fuzz (nightly).

use std::time::Duration;

fn budget() -> Duration {
    let secs = std::env::var("LPS_FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("LPS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

fn smoke(target: &str) {
    let seed = seed();
    let failures = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let report = lps_fuzz::smoke(target, budget(), seed, &failures);
    eprintln!(
        "{target}: {} seeds, {} mutations in {:?} (LPS_FUZZ_SEED={seed})",
        report.seeds,
        report.mutations,
        budget()
    );
    assert!(report.seeds > 0);
}

#[test]
fn alarm() {
    smoke("alarm");
}

#[test]
fn legacy_message() {
    smoke("legacy_message");
}

#[test]
fn request_id() {
    smoke("request_id");
}

#[test]
fn mqtt_payload() {
    smoke("mqtt_payload");
}

#[test]
fn simulator_command() {
    smoke("simulator_command");
}

/// Replays one input file: `LPS_FUZZ_REPLAY=<file> LPS_FUZZ_TARGET=<target>`.
#[test]
fn replay() {
    let (Ok(file), Ok(target)) = (
        std::env::var("LPS_FUZZ_REPLAY"),
        std::env::var("LPS_FUZZ_TARGET"),
    ) else {
        return;
    };
    let data = std::fs::read(&file).expect("input file");
    lps_fuzz::run(&target, &data);
}

#[test]
fn every_target_has_seeds_and_a_cargo_fuzz_binary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    for target in lps_fuzz::TARGETS {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{target}.rs missing"
        );
        let seeds = std::fs::read_dir(lps_fuzz::seed_dir(target))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(seeds >= 3, "{target}: {seeds} seeds");
    }
}
