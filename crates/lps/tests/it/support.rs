//! Helpers shared by the tests of `lps` as a process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// A running `lps up` (as a real process), stopped with SIGINT like Ctrl-C, also when a
/// test fails: `kill_on_drop`'s SIGKILL alone would leave its services running.
pub struct Up {
    pub child: tokio::process::Child,
    pub run: PathBuf,
    /// Entry base URLs, in order.
    pub entries: Vec<String>,
    /// The simulator's base URL.
    pub simulator: String,
    /// Every service's base URL by name (`mqtt://` for a broker), from the run folder.
    pub services: BTreeMap<String, String>,
}

impl Up {
    /// `lps up <args> --ephemeral-ports --out <run>`; returns once it is up.
    pub async fn start(args: &[&str], run: PathBuf) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lps"))
            .arg("up")
            .args(args)
            .args(["--ephemeral-ports", "--out"])
            .arg(&run)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("press Ctrl-C") {
                    return;
                }
            }
            panic!("lps up ended before the topology was up");
        })
        .await
        .expect("topology up within 60 s");
        // Keep reading: `lps up` prints while it stops, and a closed pipe would fail it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // The services from the run folder's machine-readable list, not the printed table.
        let listed = std::fs::read(run.join(lps::up::SERVICES_FILE)).expect("services.json");
        let services: Vec<lps::up::ServiceEntry> = serde_json::from_slice(&listed).unwrap();
        let entries: Vec<String> = services
            .iter()
            .filter(|s| s.entry)
            .map(|s| s.url.clone())
            .collect();
        let simulator = services
            .iter()
            .find(|s| s.name == "ars-comp-3")
            .map(|s| s.url.clone())
            .unwrap_or_default();
        assert_eq!(entries.len(), 3, "three entry services");
        assert!(simulator.starts_with("http://127.0.0.1:"), "{simulator}");
        let services = services.into_iter().map(|s| (s.name, s.url)).collect();
        Self {
            child,
            run,
            entries,
            simulator,
            services,
        }
    }

    /// SIGINT, as Ctrl-C; `lps up` must stop cleanly.
    pub async fn stop(mut self) {
        self.interrupt();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("lps up stops within 30 s")
            .unwrap();
        assert!(status.success(), "lps up: {status}");
    }

    fn interrupt(&self) {
        if let Some(id) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(id).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        }
    }
}

impl Drop for Up {
    /// A failed test still stops the services: `kill_on_drop`'s SIGKILL alone would leave
    /// them running without `lps up`.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.interrupt();
            for _ in 0..200 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Mosquitto configuration of compose and Kubernetes, from the repository's root.
pub const MOSQUITTO_CONF: &str = "mosquitto/mosquitto.conf";

/// The port Mosquitto listens on with [`MOSQUITTO_CONF`].
pub fn mosquitto_listener() -> u16 {
    std::fs::read_to_string(repo().join(MOSQUITTO_CONF))
        .expect("mosquitto.conf")
        .lines()
        .find_map(|l| l.strip_prefix("listener "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("a `listener PORT` line in mosquitto.conf")
}

/// Whether an MQTT topic matches a filter (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut topic = topic.split('/');
    for level in filter.split('/') {
        match (level, topic.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (l, Some(t)) if l == t => {}
            _ => return false,
        }
    }
    topic.next().is_none()
}

/// `(host, port, path)` of every target of `upstream`, as its service reads them.
pub fn upstream_targets(
    upstream: &lps_common::upstream::UpstreamConfig,
) -> Vec<(String, u16, String)> {
    upstream
        .targets
        .iter()
        .map(|t| {
            (
                t.host_str().unwrap_or_default().to_owned(),
                t.port_or_known_default().unwrap_or_default(),
                t.path().to_owned(),
            )
        })
        .collect()
}
