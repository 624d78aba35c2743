//! `Automations/`: the shell scripts (and the repository's others) pass shellcheck, map upstream's experiment names onto
//! `lps experiment`, and a short local experiment through them yields a complete result
//! folder. Compose mode is checked as far as it goes without a Docker engine (a fake
//! compose command records what `lps experiment --compose` runs). Ctrl-C stops what an
//! experiment started, locally and in compose mode.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// The shell scripts of `folder` (relative to the repository), sorted.
fn shell_scripts(folder: &str) -> Vec<String> {
    let mut scripts: Vec<String> = std::fs::read_dir(repo().join(folder))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sh"))
        .map(|n| format!("{folder}/{n}"))
        .collect();
    scripts.sort();
    scripts
}

#[test]
fn automation_scripts_pass_shellcheck() {
    let automations = shell_scripts("Automations");
    assert!(automations.len() >= 3, "{automations:?}");
    // The repository's other shell scripts too (scripts/test.sh, scripts/locust-env.sh,
    // mosquitto/persistence-bench.sh); all in one call so that `source` is followed.
    let mut scripts = automations;
    scripts.extend(shell_scripts("scripts"));
    scripts.extend(shell_scripts("mosquitto"));
    assert!(
        scripts.iter().any(|s| s == "scripts/test.sh"),
        "{scripts:?}"
    );
    let output = match Command::new("shellcheck")
        .args(&scripts)
        .current_dir(repo())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "shellcheck is not installed (apt-get install -y shellcheck); it checks the shell scripts"
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
    // --netem adds the topology's network emulation override after its file.
    for (topology, netem) in [
        ("ng", "docker-compose-netem.yml"),
        ("legacy", "docker-compose-legacy-netem.yml"),
    ] {
        let line = dry(&["--compose", "--netem", topology, "failover", "--out", "o"]);
        assert_eq!(
            line.trim(),
            format!(
                "lps experiment {topology} --faults none --out o --users 1 --duration 600 --compose {} --compose {}",
                repo()
                    .join(format!("docker-compose-{topology}.yml"))
                    .display(),
                repo().join(netem).display()
            )
        );
    }
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
        (
            &["ng", "failover", "--netem"][..],
            "--netem needs --compose",
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
            "--netem",
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
    assert!(lines[4].contains("docker-compose-netem.yml"));
    assert!(lines[3].contains("docker-compose-legacy-netem.yml"));
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

/// Waits for `child` to exit within `timeout`; kills it and fails otherwise.
fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("lps did not exit within {timeout:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `ready` every 50 ms until it holds; fails after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn interrupt(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // `pid (comm) state ppid ...`; comm may hold spaces, so split after the last ')'.
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

#[test]
fn ctrl_c_stops_the_services_of_a_local_experiment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut lps = Command::new(env!("CARGO_BIN_EXE_lps"))
        .args([
            "experiment",
            "legacy",
            "--users",
            "1",
            "--duration",
            "120",
            "--out",
        ])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The load runs once every service is up.
    let ledger = out.join("client_ledger.jsonl");
    wait_until("the load started", Duration::from_secs(60), || {
        std::fs::metadata(&ledger).is_ok_and(|m| m.len() > 0)
    });
    let services = children(lps.id());
    assert_eq!(services.len(), 7, "the legacy services: {services:?}");
    interrupt(&lps);
    let status = wait_exit(&mut lps, Duration::from_secs(60));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut lps.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("interrupted: stopping the services"),
        "{stderr}"
    );
    // Stopped and reaped by lps, not left running (they have their own process group, so
    // the terminal's Ctrl-C does not reach them).
    let left: Vec<u32> = services
        .into_iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert!(left.is_empty(), "still there: {left:?}\n{stderr}");
}

#[test]
fn ctrl_c_brings_a_compose_experiment_down_unless_kept_up() {
    let dir = tempfile::tempdir().unwrap();
    // A compose command that records its arguments, declares the NG services and hangs in
    // `up` (as a build would), so the signal arrives while the topology starts.
    let services = lps::experiment::Endpoints::compose(lps::topology::Topology::Ng)
        .names
        .join(" ");
    let fake = dir.path().join("fake-compose");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> \"$FAKE_COMPOSE_LOG\"\ncase \"$*\" in\n  *' config --services') printf '%s\\n' {services} ;;\n  *' up '*) exec sleep 60 ;;\nesac\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ng = repo().join("docker-compose-ng.yml");
    let netem = repo().join("docker-compose-netem.yml");
    let files = format!("-f {} -f {}", ng.display(), netem.display());
    for keep_up in [false, true] {
        let log = dir.path().join(format!("compose-{keep_up}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_lps"));
        command
            .args(["experiment", "ng", "--compose"])
            .arg(&ng)
            .arg("--compose")
            .arg(&netem)
            .arg("--compose-command")
            .arg(&fake)
            .arg("--out")
            .arg(dir.path().join(format!("run-{keep_up}")))
            .env("FAKE_COMPOSE_LOG", &log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if keep_up {
            command.arg("--keep-up");
        }
        let mut lps = command.spawn().unwrap();
        let calls = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_until("`up` started", Duration::from_secs(30), || {
            calls().contains(" up -d --build")
        });
        interrupt(&lps);
        let status = wait_exit(&mut lps, Duration::from_secs(30));
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut lps.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{stderr}");
        assert!(stderr.contains("error: interrupted"), "{stderr}");
        let calls = calls();
        let calls: Vec<&str> = calls.lines().collect();
        // Every call names both files, in order.
        assert_eq!(calls[0], "version", "{calls:?}");
        for call in &calls[1..] {
            assert!(call.starts_with(&files), "{call} lacks {files}");
        }
        if keep_up {
            assert_eq!(calls.last().unwrap(), &format!("{files} up -d --build"));
            assert!(
                stderr.contains("interrupted: leaving the topology up (--keep-up)")
                    && stderr.contains("stop it with: "),
                "{stderr}"
            );
        } else {
            assert_eq!(calls.last().unwrap(), &format!("{files} down"));
            assert!(
                stderr.contains("interrupted: bringing the topology down"),
                "{stderr}"
            );
        }
    }
}
