//! A real Mosquitto broker for tests: the repository's `mosquitto/mosquitto.conf` with the
//! port, persistence folder and log redirected into a temporary folder, on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lps_common::config::{ENV_MQTT_HOST, ENV_MQTT_PORT};
use lps_common::net::free_port;
use tokio::process::{Child, Command};

/// A Mosquitto process; killed when dropped.
pub struct Mosquitto {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
}

/// The Mosquitto executable, or a panic that says how to install it.
pub fn binary() -> PathBuf {
    lps_common::mqtt::mosquitto_binary().unwrap_or_else(|| {
        panic!("these tests need Mosquitto: apt-get install mosquitto (.ci/run installs it)")
    })
}

impl Mosquitto {
    /// Starts a broker with the repository configuration.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a broker with the repository configuration, each `overrides` line
    /// (`"key value"`) replacing the setting of that key.
    pub async fn start_with(overrides: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let base = std::fs::read_to_string(repo_config()).expect("read mosquitto/mosquitto.conf");
        let config = lps_common::mqtt::mosquitto_config(
            &base,
            port,
            dir.path(),
            overrides,
            nix::unistd::geteuid().is_root(),
        );
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, config).expect("write config");
        let mut broker = Self {
            port,
            dir,
            config: path,
            child: None,
        };
        broker.launch().await;
        broker
    }

    /// Starts a broker that takes only TLS (the certificates of `pki`) and only `user`
    /// with `password` (a Mosquitto password file made with `mosquitto_passwd`).
    pub async fn start_secure(pki: &crate::pki::TestPki, user: &str, password: &str) -> Self {
        let files = tempfile::tempdir().expect("temp dir");
        let passwords = files.path().join("passwords");
        let status = std::process::Command::new(passwd_binary())
            .arg("-b")
            .arg("-c")
            .arg(&passwords)
            .arg(user)
            .arg(password)
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd failed: {status}");
        let lines = [
            format!("certfile {}", pki.server_cert.display()),
            format!("keyfile {}", pki.server_key.display()),
            format!("password_file {}", passwords.display()),
            "allow_anonymous false".to_owned(),
        ];
        let overrides: Vec<&str> = lines.iter().map(String::as_str).collect();
        let broker = Self::start_with(&overrides).await;
        // Mosquitto read the password file at start-up; it may go with `files`.
        drop(files);
        broker
    }

    async fn launch(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.stderr"))
            .expect("mosquitto stderr file");
        let mut child = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start mosquitto");
        let port = self.port;
        // `Some(None)`: listening; `Some(Some(status))`: exited.
        let started = lps_common::poll::poll_until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                let exited = child.try_wait().ok().flatten();
                async move {
                    if let Some(status) = exited {
                        return Some(Some(status));
                    }
                    let listening = tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok();
                    listening.then_some(None)
                }
            },
        )
        .await;
        self.child = Some(child);
        match started {
            Some(None) => {}
            Some(Some(status)) => panic!("mosquitto exited ({status}); log:\n{}", self.log()),
            None => panic!("mosquitto not listening within 10 s; log:\n{}", self.log()),
        }
    }

    /// `MQTT_HOST`/`MQTT_PORT` for a client of this broker.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            (ENV_MQTT_HOST, "127.0.0.1".to_owned()),
            (ENV_MQTT_PORT, self.port.to_string()),
        ]
    }

    /// Kills the broker with SIGKILL (no final save).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the broker with SIGTERM (it saves its state) and waits.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    /// Starts the broker again on the same port with the same persistence folder.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    /// The broker's log (and stderr) so far.
    pub fn log(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        read("mosquitto.stderr") + &read("mosquitto.log")
    }
}

impl crate::Broker for Mosquitto {
    fn port(&self) -> u16 {
        self.port
    }
}

/// `mosquitto_passwd`, next to the broker or on `PATH`.
fn passwd_binary() -> PathBuf {
    let beside = binary().with_file_name("mosquitto_passwd");
    [beside, PathBuf::from("/usr/bin/mosquitto_passwd")]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mosquitto_passwd"))
}

fn repo_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mosquitto/mosquitto.conf")
}
