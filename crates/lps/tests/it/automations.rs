//! `Automations/`: the shell scripts pass shellcheck, map upstream's experiment names onto
//! `lps experiment`, and a short local experiment through them yields a complete result
//! folder. Compose mode is checked as far as it goes without a Docker engine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    std::fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")).unwrap()
}

fn script(name: &str) -> Command {
    let mut command = Command::new(repo().join("Automations").join(name));
    command
        .env("LPS_BIN", env!("CARGO_BIN_EXE_lps"))
        .stdin(Stdio::null());
    command
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn automation_scripts_pass_shellcheck() {
    let mut scripts: Vec<String> = std::fs::read_dir(repo().join("Automations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sh"))
        .map(|n| format!("Automations/{n}"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 3, "{scripts:?}");
    let output = match Command::new("shellcheck")
        .args(&scripts)
        .current_dir(repo())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "shellcheck is not installed (apt-get install -y shellcheck); it checks Automations/*.sh"
        ),
        Err(e) => panic!("running shellcheck: {e}"),
    };
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "shellcheck {scripts:?}:\n{stdout}{stderr}"
    );
}

#[test]
fn run_experiment_maps_upstream_names_onto_lps_experiment() {
    let dry = |args: &[&str]| {
        let output = script("run_experiment.sh")
            .arg("--dry-run")
            .args(args)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "{args:?}: {stderr}");
        stdout
    };
    let compose = repo().join("docker-compose-ng.yml");
    let line = dry(&[
        "--compose",
        "ng",
        "performance",
        "--faults",
        "chain",
        "--scale",
        "0.5",
        "--clean",
        "--out",
        "out",
        "--",
        "--drain-timeout",
        "900",
    ]);
    let expected = format!(
        "lps experiment ng --faults chain --out out --steps --scale 0.5 --compose {} --clean --drain-timeout 900",
        compose.display()
    );
    assert_eq!(line.trim(), expected);
    let line = dry(&[
        "legacy",
        "failover",
        "--duration",
        "30",
        "--broker",
        "embedded",
        "--out",
        "o",
    ]);
    assert_eq!(
        line.trim(),
        "lps experiment legacy --faults none --out o --users 1 --duration 30 --broker embedded"
    );
    // Mistakes are usage errors that name the mistake.
    for (args, says) in [
        (&["ng", "soak"][..], "experiment 'soak'"),
        (
            &["--compose", "ng", "failover", "--broker", "embedded"][..],
            "--broker is for local runs",
        ),
        (
            &["ng", "failover", "--scale", "x"][..],
            "'x' is not a number",
        ),
    ] {
        let output = script("run_experiment.sh").args(args).output().unwrap();
        let (_, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn start_experiment_runs_both_topologies_per_mode_and_compares_them() {
    let output = script("start_experiment.sh")
        .args([
            "--compose",
            "--experiments",
            "failover",
            "--faults",
            "entry",
            "--out",
            "r",
            "--dry-run",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert!(
        lines[0].contains("experiment legacy --faults none --out r/failover-without-faults/legacy")
    );
    assert!(lines[1].contains("experiment ng --faults none --out r/failover-without-faults/ng"));
    assert_eq!(
        lines[2],
        "lps analyze r/failover-without-faults/legacy r/failover-without-faults/ng --out r/failover-without-faults"
    );
    assert!(
        lines[4].contains("experiment ng --faults entry --out r/failover-with-faults-entry/ng")
    );
    assert!(lines[4].contains("docker-compose-ng.yml"));
    assert!(lines[5].starts_with("lps analyze r/failover-with-faults-entry/legacy"));
}

#[test]
fn a_short_local_failover_run_through_the_script_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ng-failover");
    let started = std::time::Instant::now();
    let output = script("run_experiment.sh")
        .args([
            "--local",
            "ng",
            "failover",
            "--duration",
            "3",
            "--faults",
            "none",
            "--broker",
            "embedded",
            "--out",
        ])
        .arg(&out)
        .args(["--", "--drain-timeout", "20"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    println!("{stdout}\ntook {:?}", started.elapsed());
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let ng = &summary["ng"];
    assert!(ng["acknowledged"].as_u64().unwrap() >= 1, "{ng}");
    assert_eq!(ng["lost"], 0, "{ng}");
    assert!(
        ng["load"]
            .as_str()
            .unwrap()
            .starts_with("1 closed-loop user"),
        "{ng}"
    );
    assert!(out.join("report.html").is_file());
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["platform"], "local", "{info}");
}

#[test]
fn compose_mode_without_the_compose_command_fails_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_lps"))
        .args(["experiment", "ng", "--compose"])
        .arg(repo().join("docker-compose-ng.yml"))
        .args(["--compose-command", "lps-test-no-such-compose", "--out"])
        .arg(dir.path().join("run"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("lps-test-no-such-compose not found; install it or pass --compose-command"),
        "{stderr}"
    );
}
