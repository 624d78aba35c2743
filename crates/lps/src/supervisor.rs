//! Runs the services of a topology as local processes and stops them cleanly.
//!
//! Each service is this same executable re-run as `lps service <program>`, so one
//! `cargo run -p lps` builds everything a topology needs. Every child gets a clean
//! environment (plus `PATH`, `HOME`, `TZ`, `LOG`), listens on 127.0.0.1, logs to
//! `<run>/logs/<name>.log`, and has its stderr in `<run>/logs/<name>.stderr`.
//!
//! The services die with their supervisor, whatever kills it. `lps` stops them in order on
//! SIGINT, SIGTERM and SIGHUP ([`crate::signals`]); for what it cannot catch (SIGKILL, a
//! crash) every child asks the kernel for SIGKILL when its parent dies
//! (`PR_SET_PDEATHSIG`). That signal is sent when the *thread* that forked the child ends,
//! so every child is forked by one thread that lives as long as the process (see
//! [`spawn`]). SIGKILL and not SIGTERM: a supervisor that died without stopping its
//! services crashed, and its services then go at once, as in a fault, rather than wait out
//! their grace period for peers that are gone. Each child also carries
//! `LPS_SUPERVISOR=<pid of lps>`, by which a later `lps up` recognises services left
//! behind ([`crate::stale`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::Duration;

use anyhow::{Context, bail};
use lps_common::config::{
    ENV_HTTP_HOST, ENV_HTTP_PORT, ENV_LOG, ENV_LOG_DIR, ENV_REPLAY_JOURNAL_DIR, ENV_SERVICE_NAME,
};
use lps_common::poll::poll_until;
pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::topology::{Health, Program, ServiceSpec};

/// The environment variable naming the `lps` process that started a service.
pub const SUPERVISOR_ENV: &str = "LPS_SUPERVISOR";

/// A command to spawn, the runtime to register the child with, and where to answer.
type SpawnRequest = (
    Command,
    tokio::runtime::Handle,
    tokio::sync::oneshot::Sender<std::io::Result<Child>>,
);

/// Spawns `command` from the spawner thread, which is never joined and so lives as long
/// as the process.
///
/// Why a thread of its own: `PR_SET_PDEATHSIG` fires when the thread that forked ends.
/// Services are started from the `block_on` thread and from Tokio workers (a restart
/// through the control socket of `lps up`); a worker that ran `block_in_place`, or a
/// blocking-pool thread, can end while the supervisor lives on, which would kill the
/// services it had forked. (A cancelled `spawn` drops the child: `kill_on_drop` kills it.)
async fn spawn(command: Command) -> std::io::Result<Child> {
    static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);
    let sender = {
        let mut spawner = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        match &*spawner {
            Some(sender) => sender.clone(),
            None => {
                let (sender, requests) = mpsc::channel::<SpawnRequest>();
                std::thread::Builder::new()
                    .name("lps-spawner".into())
                    .spawn(move || {
                        for (mut command, runtime, answer) in requests {
                            // Tokio registers the child with the runtime that waits for it.
                            let _runtime = runtime.enter();
                            let _ = answer.send(command.spawn());
                        }
                    })?;
                spawner.insert(sender).clone()
            }
        }
    };
    let (answer, spawned) = tokio::sync::oneshot::channel();
    sender
        .send((command, tokio::runtime::Handle::current(), answer))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    spawned
        .await
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// Makes the child of `command` receive SIGKILL when this process dies.
#[allow(unsafe_code)]
fn die_with_supervisor(command: &mut Command) {
    let supervisor = nix::unistd::getpid();
    // SAFETY: `pre_exec` runs the closure in the forked child before `exec`, where only
    // async-signal-safe calls are sound. It makes two system calls (prctl, getppid) and
    // allocates nothing: the error is a raw OS error.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid() != supervisor {
                // The supervisor died between fork and prctl: no signal would come.
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// A client for the health checks and scrapes of local services: no proxy from the
/// environment (a machine's `HTTP_PROXY` must not see loopback traffic), and `timeout` per
/// request.
pub fn local_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
}

/// How long a service may take to become healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

/// A running service.
#[derive(Debug)]
pub struct Running {
    /// What was started.
    pub spec: ServiceSpec,
    child: Child,
}

impl Running {
    /// `http://127.0.0.1:PORT` (`mqtt://` for the broker).
    pub fn base_url(&self) -> String {
        let scheme = if matches!(
            self.spec.program,
            Program::Mosquitto | Program::EmbeddedBroker
        ) {
            "mqtt"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.spec.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Starts and stops the processes of one run.
#[derive(Debug)]
pub struct Supervisor {
    exe: PathBuf,
    logs: PathBuf,
    running: Vec<Running>,
    stopped: Vec<(usize, ServiceSpec)>,
    client: reqwest::Client,
}

impl Supervisor {
    /// A supervisor writing logs under `run_dir/logs`.
    pub fn new(run_dir: &Path) -> anyhow::Result<Self> {
        let logs = run_dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        Ok(Self {
            exe: std::env::current_exe().context("finding the lps executable")?,
            logs,
            running: Vec::new(),
            stopped: Vec::new(),
            client: local_client(Duration::from_secs(1))?,
        })
    }

    /// The folder of the service logs.
    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// The services started so far, in start order.
    pub fn running(&self) -> &[Running] {
        &self.running
    }

    /// Starts `spec` and waits until its `/healthz` answers.
    pub async fn start(&mut self, spec: ServiceSpec) -> anyhow::Result<()> {
        let stderr_path = self.logs.join(format!("{}.stderr", spec.name));
        let stderr = std::fs::File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let mut command = if spec.program == Program::Mosquitto {
            let binary = lps_common::mqtt::mosquitto_binary().context(
                "Mosquitto is not installed (apt-get install mosquitto), or use --broker embedded",
            )?;
            let mut command = Command::new(binary);
            command
                .args(&spec.args)
                .env_clear()
                .env(ENV_SERVICE_NAME, &spec.name);
            command
        } else {
            let mut command = Command::new(&self.exe);
            command
                .arg("service")
                .arg(spec.program.name())
                .arg("--")
                .args(&spec.args)
                .env_clear()
                .env(ENV_HTTP_HOST, "127.0.0.1")
                .env(ENV_HTTP_PORT, spec.port.to_string())
                .env(ENV_SERVICE_NAME, &spec.name)
                .env(ENV_LOG_DIR, &self.logs);
            if spec.program == Program::LegacyProxy1 {
                // The replay window on disk, beside the logs: a crash of the broker and
                // the bridge together loses nothing (README, delivery guarantees).
                command.env(ENV_REPLAY_JOURNAL_DIR, self.logs.join("journal"));
            }
            command
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Own process group: a Ctrl-C in the terminal reaches lps only, which then
            // stops the services in order.
            .process_group(0)
            .kill_on_drop(true)
            .env(SUPERVISOR_ENV, std::process::id().to_string());
        die_with_supervisor(&mut command);
        for key in ["PATH", "HOME", "TZ", ENV_LOG] {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        let child = spawn(command)
            .await
            .with_context(|| format!("starting {}", spec.name))?;
        let mut running = Running { spec, child };
        self.wait_healthy(&mut running).await?;
        self.running.push(running);
        Ok(())
    }

    async fn wait_healthy(&self, service: &mut Running) -> anyhow::Result<()> {
        let what = match service.spec.health {
            Health::Http(path) => format!("{}{path}", service.base_url()),
            Health::Tcp => format!("127.0.0.1:{}", service.spec.port),
        };
        let health = service.spec.health;
        let checked = poll_until(HEALTHY_WITHIN, Duration::from_millis(25), || {
            let exited = match service.child.try_wait() {
                Ok(Some(status)) => Some(format!("exited ({status})")),
                Err(error) => Some(format!("cannot be waited for: {error}")),
                Ok(None) => None,
            };
            let (client, what) = (self.client.clone(), what.clone());
            async move {
                if let Some(why) = exited {
                    return Some(Err(why));
                }
                let healthy = match health {
                    Health::Http(_) => client
                        .get(&what)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                    Health::Tcp => tokio::net::TcpStream::connect(&what).await.is_ok(),
                };
                healthy.then_some(Ok(()))
            }
        })
        .await;
        let name = &service.spec.name;
        match checked {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => bail!(
                "{name} {why} before it was healthy; see {}",
                self.tail(name)
            ),
            None => bail!(
                "{name} not healthy at {what} within {} s; see {}",
                HEALTHY_WITHIN.as_secs(),
                self.tail(name)
            ),
        }
    }

    /// Where to look when a service failed, with its last log lines.
    fn tail(&self, name: &str) -> String {
        let mut out = String::new();
        for file in [format!("{name}.stderr"), format!("{name}.log")] {
            let path = self.logs.join(&file);
            if let Ok(text) = std::fs::read_to_string(&path) {
                let lines: Vec<&str> = text.lines().collect();
                let last = lines[lines.len().saturating_sub(5)..].join("\n    ");
                if !last.is_empty() {
                    out.push_str(&format!("\n  {}:\n    {last}", path.display()));
                }
            }
        }
        if out.is_empty() {
            format!("{} (empty)", self.logs.display())
        } else {
            out
        }
    }

    /// The names of every service, running or stopped by a fault.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.iter().map(|r| r.spec.name.clone()).collect();
        names.extend(self.stopped.iter().map(|(_, spec)| spec.name.clone()));
        names
    }

    /// Services that exited on their own since the last call, with their status.
    pub fn exited(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        self.running
            .iter_mut()
            .filter_map(|r| match r.child.try_wait() {
                Ok(Some(status)) => Some((r.spec.name.clone(), status)),
                _ => None,
            })
            .collect()
    }

    /// Stops service `name` with `signal` (SIGKILL or SIGTERM), waiting up to `grace` before
    /// a SIGKILL; it can be started again with [`Supervisor::restart`].
    pub async fn stop(
        &mut self,
        name: &str,
        signal: Signal,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let index = self
            .running
            .iter()
            .position(|r| r.spec.name == name)
            .with_context(|| format!("no running service named {name}"))?;
        let mut service = self.running.remove(index);
        if let Some(pid) = service.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
        if tokio::time::timeout(grace, service.child.wait())
            .await
            .is_err()
        {
            let _ = service.child.kill().await;
        }
        self.stopped.push((index, service.spec));
        Ok(())
    }

    /// Starts a service stopped with [`Supervisor::stop`] again, in its old place.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let at = self
            .stopped
            .iter()
            .position(|(_, spec)| spec.name == name)
            .with_context(|| format!("no stopped service named {name}"))?;
        let (index, spec) = self.stopped.remove(at);
        self.start(spec).await?;
        // `start` appended it; put it back where it was so stop order stays right.
        if let Some(service) = self.running.pop() {
            let index = index.min(self.running.len());
            self.running.insert(index, service);
        }
        Ok(())
    }

    /// Stops every service, entry services first: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop_all(&mut self, grace: Duration) {
        while let Some(mut service) = self.running.pop() {
            if let Some(pid) = service.child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            if tokio::time::timeout(grace, service.child.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "{} did not stop within {grace:?}; killing it",
                    service.spec.name
                );
                let _ = service.child.kill().await;
            }
            // Keep only stderr files that say something.
            let stderr = self.logs.join(format!("{}.stderr", service.spec.name));
            if std::fs::metadata(&stderr).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(stderr);
            }
        }
    }
}
