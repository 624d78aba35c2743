//! `lps` never leaves services behind: SIGKILL and SIGHUP of `lps up` (also with its
//! terminal closed), SIGKILL of `lps experiment` mid-load, Ctrl-C during start-up and during `lps bench`; a run left behind
//! by an earlier `lps up` is named and replaced; durations take units.
//!
//! "Left" is checked by pid (the children seen before the signal, and every process marked
//! `LPS_SUPERVISOR=<pid of that lps>`) and by port (nothing listens on the services' ports).

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lps::stale::{environment, parent_of};
use lps_common::config::{ENV_HTTP_HOST, ENV_HTTP_PORT, ENV_LOG_DIR, ENV_SERVICE_NAME};
use lps_testkit::eventually;
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;

/// An `lps` process with its output collected as it comes.
struct Lps {
    child: tokio::process::Child,
    pid: i32,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Lps {
    /// `lps <args>`; killed (SIGKILL) when dropped, which its services survive no more.
    fn spawn(args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let collect = |mut from: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let text = Arc::new(Mutex::new(String::new()));
            let into = text.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut buffer).await {
                    into.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
            });
            text
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Self {
            pid: i32::try_from(child.id().unwrap()).unwrap(),
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    async fn wait_for(&self, text: &str, within: Duration) {
        eventually(&format!("{text:?} from lps"), within, || async {
            self.output().contains(text).then_some(())
        })
        .await;
    }

    fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), signal).unwrap();
    }

    async fn exit(&mut self, within: Duration) -> ExitStatus {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("lps ends within {within:?}\n{}", self.output()))
            .unwrap();
        // The rest of the output.
        tokio::time::sleep(Duration::from_millis(100)).await;
        status
    }

    /// Its live child processes.
    fn children(&self) -> Vec<i32> {
        children_of(self.pid)
    }

    /// Sends it `signal` once its `expected` services are noted (as [`services`] finds
    /// them).
    fn signal_services(&self, expected: usize, signal: Signal) -> Signalled {
        let (pids, ports) = services(self, expected);
        let at = Instant::now();
        self.signal(signal);
        Signalled {
            supervisor: self.pid,
            pids,
            ports,
            at,
        }
    }
}

/// The services of an `lps` as they were when a signal was sent to it.
struct Signalled {
    supervisor: i32,
    pids: Vec<i32>,
    ports: Vec<u16>,
    at: Instant,
}

impl Signalled {
    /// Waits up to `within` (from the signal) until nothing of them is left.
    async fn nothing_left(&self, within: Duration) {
        nothing_left(self.supervisor, &self.pids, &self.ports, self.at, within).await;
    }
}

/// The live child processes of `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|&p| parent_of(p) == Some(pid))
        .collect()
}

fn processes() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Live processes marked as services of the `lps` with pid `supervisor`.
fn marked(supervisor: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|&p| parent_of(p).is_some())
        .filter(|&p| environment(p, "LPS_SUPERVISOR") == Some(supervisor.to_string()))
        .collect()
}

/// The port a service listens on: `HTTP_PORT` of `lps service …`, the `listener` of
/// Mosquitto's `-c` configuration.
fn port_of(pid: i32) -> u16 {
    if let Some(port) = environment(pid, ENV_HTTP_PORT) {
        return port.parse().unwrap();
    }
    let command = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = command
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let config = args
        .iter()
        .position(|a| a == "-c")
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("no port known for {args:?}"));
    std::fs::read_to_string(config)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("listener ")?.split(' ').next()?.parse().ok())
        .unwrap()
}

/// The services of `lps` right now: pids, and their ports. Every child is marked.
fn services(lps: &Lps, expected: usize) -> (Vec<i32>, Vec<u16>) {
    let pids = lps.children();
    assert_eq!(pids.len(), expected, "services of lps: {pids:?}");
    let mut marked = marked(lps.pid);
    marked.sort_unstable();
    let mut sorted = pids.clone();
    sorted.sort_unstable();
    assert_eq!(marked, sorted, "every service carries LPS_SUPERVISOR");
    let ports = pids.iter().map(|&p| port_of(p)).collect();
    (pids, ports)
}

/// What is still there of `pids` (and of anything marked by `supervisor`) and `ports`.
fn left(supervisor: i32, pids: &[i32], ports: &[u16]) -> Option<String> {
    let mut alive: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| parent_of(p).is_some())
        .collect();
    for pid in marked(supervisor) {
        if !alive.contains(&pid) {
            alive.push(pid);
        }
    }
    let open: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|&port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        .collect();
    (!alive.is_empty() || !open.is_empty())
        .then(|| format!("processes {alive:?}, listening ports {open:?}"))
}

/// Waits up to `within` (from `since`) until nothing is left.
async fn nothing_left(
    supervisor: i32,
    pids: &[i32],
    ports: &[u16],
    since: Instant,
    within: Duration,
) {
    loop {
        let Some(what) = left(supervisor, pids, ports) else {
            return;
        };
        assert!(
            since.elapsed() < within,
            "still there {:?} after the signal: {what}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `lps up <args> --ephemeral-ports`, up.
async fn up(args: &[&str], run: &std::path::Path) -> Lps {
    let mut all = vec!["up"];
    all.extend_from_slice(args);
    all.extend(["--ephemeral-ports", "--out", run.to_str().unwrap()]);
    let lps = Lps::spawn(&all);
    lps.wait_for("press Ctrl-C", Duration::from_secs(60)).await;
    lps
}

/// The NG topology with its broker: 1 + 1 + 3 × 4 processes.
const NG_SERVICES: usize = 14;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_killed_with_sigkill_leaves_no_service_not_even_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut lps = up(&["ng", "--broker", "mosquitto"], &dir.path().join("run")).await;
    let killed = lps.signal_services(NG_SERVICES, Signal::SIGKILL);
    lps.exit(Duration::from_secs(5)).await;
    killed.nothing_left(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_stopped_by_sighup_stops_every_service_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut lps = up(&["ng", "--broker", "embedded"], &run).await;
    let hung_up = lps.signal_services(NG_SERVICES, Signal::SIGHUP);
    hung_up.nothing_left(Duration::from_secs(2)).await;
    let status = lps.exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}\n{}", lps.output());
    assert!(
        lps.output()
            .contains("interrupted by SIGHUP (terminal closed): stopping"),
        "{}",
        lps.output()
    );
    // Stopped, not killed: each drained its connections.
    for name in ["ars-comp-1-1", "proxy1-2", "proxy2-3"] {
        let log = std::fs::read_to_string(run.join("logs").join(format!("{name}.log"))).unwrap();
        assert!(
            log.contains("all connections drained"),
            "{name} stopped gracefully:\n{log}"
        );
    }
}

/// A pseudo-terminal: its master and slave side, both close-on-exec, so that no child
/// keeps the terminal open once the test closes the master.
fn terminal() -> (std::fs::File, std::fs::File) {
    use nix::fcntl::OFlag;
    use std::os::unix::fs::OpenOptionsExt;
    let master =
        nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).unwrap();
    nix::pty::grantpt(&master).unwrap();
    nix::pty::unlockpt(&master).unwrap();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(nix::pty::ptsname_r(&master).unwrap())
        .unwrap();
    (
        std::fs::File::from(std::os::fd::OwnedFd::from(master)),
        slave,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_terminal_stops_every_service_cleanly() {
    // `lps up` writing to a terminal; once it is up, the terminal goes away (its master side
    // is closed: every write to it fails from then on) and SIGHUP comes, as when the window
    // is closed.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let (master, slave) = terminal();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
        .args(["up", "legacy", "--ephemeral-ports", "--out"])
        .arg(&run)
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    let mut master = master;
    let shown = tokio::task::spawn_blocking(move || {
        let mut shown = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(n @ 1..) = std::io::Read::read(&mut master, &mut buffer) {
            shown.extend_from_slice(&buffer[..n]);
            if String::from_utf8_lossy(&shown).contains("press Ctrl-C") {
                break;
            }
        }
        // Dropping `master` closes the terminal.
        String::from_utf8_lossy(&shown).into_owned()
    });
    let shown = tokio::time::timeout(Duration::from_secs(60), shown)
        .await
        .expect("up within 60 s")
        .unwrap();
    assert!(shown.contains("press Ctrl-C"), "{shown}");
    let pids = children_of(pid);
    assert_eq!(pids.len(), 7, "{pids:?}");
    let ports: Vec<u16> = pids.iter().map(|&p| port_of(p)).collect();
    let hung_up = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("lps ends")
        .unwrap();
    // Not a panic on the dead terminal (101), nor killed by the SIGHUP.
    assert!(status.success(), "{status}");
    nothing_left(pid, &pids, &ports, hung_up, Duration::from_secs(2)).await;
    let log = std::fs::read_to_string(run.join("logs").join("ars-comp-1-1.log")).unwrap();
    assert!(log.contains("all connections drained"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_killed_mid_load_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut lps = Lps::spawn(&[
        "experiment",
        "ng",
        "--broker",
        "embedded",
        "--users",
        "2",
        "--duration",
        "2m",
        "--out",
        out.to_str().unwrap(),
    ]);
    let ledger = out.join("client_ledger.jsonl");
    eventually("alarms acknowledged", Duration::from_secs(90), || async {
        std::fs::metadata(&ledger)
            .is_ok_and(|m| m.len() > 0)
            .then_some(())
    })
    .await;
    let killed = lps.signal_services(NG_SERVICES, Signal::SIGKILL);
    lps.exit(Duration::from_secs(5)).await;
    killed.nothing_left(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_start_up_stops_what_was_started_and_says_so() {
    // A "broker" that accepts connections and never answers: proxy2-1 never gets ready, so
    // start-up is still going on when Ctrl-C comes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broker = format!("mqtt://{}", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut lps = Lps::spawn(&[
        "up",
        "ng",
        "--broker",
        &broker,
        "--ephemeral-ports",
        "--out",
        run.to_str().unwrap(),
    ]);
    // The simulator, ars-comp-2-{1,2,3} and proxy2-1 (starting).
    eventually("five services started", Duration::from_secs(60), || async {
        (lps.children().len() >= 5).then_some(())
    })
    .await;
    let interrupted = lps.signal_services(5, Signal::SIGINT);
    // Its output only grows: not up when the signal came either.
    assert!(!lps.output().contains("press Ctrl-C"), "{}", lps.output());
    let status = lps.exit(Duration::from_secs(30)).await;
    let output = lps.output();
    assert_eq!(status.code(), Some(130), "128 + SIGINT\n{output}");
    assert!(
        output.contains(
            "error: interrupted by SIGINT (Ctrl-C) while starting proxy2-1; stopped what was started"
        ),
        "{output}"
    );
    assert!(
        output.contains("stopping the 4 services started so far"),
        "{output}"
    );
    // lps has exited: what it started is gone with it, reaped.
    interrupted.nothing_left(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_a_bench_stops_its_services() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let mut lps = Lps::spawn(&[
        "bench",
        "relay",
        "--duration",
        "5m",
        "--warmup",
        "0",
        "--rounds",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    lps.wait_for("bench: direct", Duration::from_secs(60)).await;
    let interrupted = lps.signal_services(2, Signal::SIGINT);
    let status = lps.exit(Duration::from_secs(30)).await;
    let output = lps.output();
    assert_eq!(status.code(), Some(130), "{output}");
    assert!(
        output.contains("interrupted by SIGINT (Ctrl-C): stopping the services"),
        "{output}"
    );
    interrupted.nothing_left(Duration::from_secs(30)).await;
    assert!(!out.join("bench.json").exists());
}

/// An offset that moves the legacy topology's seven ports (7081-7083, 8081-8084) onto
/// ports free now and below the ephemeral range (`ip_local_port_range`, 32768 and up by
/// default): a free port from the system is in that range, where another test's outgoing
/// connection can take a neighbour of it before `lps up` binds (seen once in CI: "port …
/// held by a process this user cannot see").
fn quiet_offset() -> u16 {
    const PORTS: [u16; 7] = [7081, 7082, 7083, 8081, 8082, 8083, 8084];
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let start = 1_000 + u16::try_from(std::process::id() % 5_000).unwrap_or(0);
    let below = ephemeral.saturating_sub(8_084).max(start + 1);
    (start..below)
        .chain(start..u16::MAX - 8_084)
        .step_by(11)
        .find(|offset| {
            PORTS
                .iter()
                .all(|port| std::net::TcpListener::bind(("127.0.0.1", port + offset)).is_ok())
        })
        .expect("a free offset below the ephemeral range")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_left_behind_is_named_and_replaced() {
    // The legacy topology at an offset that puts the simulator (8084) on a free port, where a
    // simulator "left behind" by a gone lps listens.
    let offset = quiet_offset();
    let port = 8084 + offset;
    let gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    let mut gone = gone;
    gone.wait().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut leftover = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
        .args(["service", "rast-simulator", "--"])
        .env_clear()
        .env(ENV_HTTP_HOST, "127.0.0.1")
        .env(ENV_HTTP_PORT, port.to_string())
        .env(ENV_SERVICE_NAME, "ars-comp-3")
        .env(ENV_LOG_DIR, logs.path())
        .env("LPS_SUPERVISOR", gone_pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let leftover_pid = leftover.id().unwrap();
    eventually("the leftover listens", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(drop)
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let offset = offset.to_string();
    let mut refused = Lps::spawn(&[
        "up",
        "legacy",
        "--port-offset",
        &offset,
        "--out",
        dir.path().join("refused").to_str().unwrap(),
    ]);
    let status = refused.exit(Duration::from_secs(30)).await;
    let output = refused.output();
    assert_eq!(status.code(), Some(1), "{output}");
    for expected in [
        format!("ports {port} are taken by services left behind by an earlier lps up"),
        format!("(lps pid {gone_pid}): ars-comp-3 (pid {leftover_pid})"),
        format!("stop them with: kill {leftover_pid}\n"),
        "or start with --replace".to_owned(),
    ] {
        assert!(output.contains(&expected), "{expected:?} in\n{output}");
    }
    assert!(leftover.try_wait().unwrap().is_none(), "left alone");

    let mut replaced = Lps::spawn(&[
        "up",
        "legacy",
        "--port-offset",
        &offset,
        "--replace",
        "--out",
        dir.path().join("replaced").to_str().unwrap(),
    ]);
    replaced
        .wait_for("press Ctrl-C", Duration::from_secs(60))
        .await;
    assert!(
        replaced
            .output()
            .contains("--replace: stopping services left behind by an earlier lps up"),
        "{}",
        replaced.output()
    );
    // Stopped before the new topology started (it has exited, only its reaping is left).
    tokio::time::timeout(Duration::from_secs(5), leftover.wait())
        .await
        .expect("the leftover was stopped")
        .unwrap();
    let stopping = replaced.signal_services(7, Signal::SIGINT);
    assert!(stopping.ports.contains(&port), "{:?}", stopping.ports);
    let status = replaced.exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}\n{}", replaced.output());
    stopping.nothing_left(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn duration_options_show_their_form_and_refuse_others() {
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
        .args(["demo", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--duration <DURATION>")
            && help.contains("1m30s")
            && help.contains("[default: 40s]"),
        "{help}"
    );
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
        .args(["experiment", "legacy", "--drain-timeout", "1m30x"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--drain-timeout <DURATION>")
            && stderr.contains("expected a duration such as 30 (seconds), 30s, 1m, 1m30s or 500ms"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_takes_a_duration_with_a_unit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let mut lps = Lps::spawn(&[
        "demo",
        "--duration",
        "30s",
        "--faults",
        "none",
        "--users",
        "2",
        "--background-users",
        "0",
        "--broker",
        "embedded",
        "--out",
        out.to_str().unwrap(),
    ]);
    let status = lps.exit(Duration::from_secs(300)).await;
    assert!(status.success(), "{status}\n{}", lps.output());
    for topology in ["legacy", "ng"] {
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(topology).join("run.json")).unwrap())
                .unwrap();
        assert_eq!(run["load"], "2 closed-loop users for 30 s", "{run}");
        let (start, end) = (
            run["load_start_us"].as_u64().unwrap(),
            run["load_end_us"].as_u64().unwrap(),
        );
        assert!(end - start >= 30_000_000, "{topology}: 30 s of load: {run}");
    }
    assert!(out.join("report.html").exists());
}
