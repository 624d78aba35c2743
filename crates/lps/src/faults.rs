//! Fault injection as upstream's `inject_fault.py`: stop a service, keep it down for a
//! "detection" time uniform in 26-34 s plus 2 s, then 1 s + 0.5 s, then start it again
//! (random seed 42). Schedules, each step 20 s after the previous one:
//!
//! - `entry`: all entry services (`ars-comp-1-*`) at once;
//! - `chain`: one after another `ars-comp-1-1`, `proxy1-1`, `proxy2-1`, `ars-comp-2-1`,
//!   `ars-comp-3` (services the topology does not have are skipped);
//! - `all`: `entry`, then `chain`.
//!
//! Every time is multiplied by a scale factor so that a schedule fits a short run.
//!
//! Targets: the supervisor of this process (signals), an `lps up` in another process (its
//! control socket), or a compose topology ([`Compose`]: `<command> -f FILE [-f FILE...]
//! stop|start`, where the command is `docker compose`, or `docker-compose` through
//! `--compose-command` or `LPS_COMPOSE`, and the files a topology and its overrides, e.g.
//! `docker-compose-ng.yml` and `docker-compose-netem.yml`). The default `docker compose`
//! falls back to Compose v1 (`docker-compose`) when the plugin is missing and v1 runs.

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::records::{self, FaultAction, FaultRecord};
use crate::supervisor::{Signal, Supervisor};

/// Which services to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    /// No faults.
    None,
    /// All entry services at once.
    Entry,
    /// One after another along the chain.
    Chain,
    /// `entry`, then `chain`.
    All,
}

/// One planned fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// When to stop, from the start of the load.
    pub at: Duration,
    /// Services stopped together.
    pub services: Vec<String>,
    /// How long they stay down.
    pub down: Duration,
}

/// Upstream's down time: detection U(26, 34) s + 2 s, then 1 s + 0.5 s.
fn down_time(rng: &mut impl Rng) -> Duration {
    Duration::from_secs_f64(rng.random_range(26.0..34.0) + 2.0 + 1.0 + 0.5)
}

/// The faults of `schedule` for a topology with `services`, times multiplied by `scale`.
pub fn plan(schedule: Schedule, services: &[String], scale: f64) -> Vec<Fault> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let has = |name: &str| services.iter().any(|s| s == name);
    let mut steps: Vec<Vec<String>> = Vec::new();
    if matches!(schedule, Schedule::Entry | Schedule::All) {
        steps.push(
            services
                .iter()
                .filter(|s| s.starts_with("ars-comp-1-"))
                .cloned()
                .collect(),
        );
    }
    if matches!(schedule, Schedule::Chain | Schedule::All) {
        for name in [
            "ars-comp-1-1",
            "proxy1-1",
            "proxy2-1",
            "ars-comp-2-1",
            "ars-comp-3",
        ] {
            if has(name) {
                steps.push(vec![name.to_owned()]);
            }
        }
    }
    let gap = 20.0 * scale;
    let mut at = gap;
    let mut faults = Vec::new();
    for services in steps.into_iter().filter(|s| !s.is_empty()) {
        let down = down_time(&mut rng).mul_f64(scale);
        faults.push(Fault {
            at: Duration::from_secs_f64(at),
            services,
            down,
        });
        // The next fault starts 20 s (scaled) after this one ended.
        at += down.as_secs_f64() + gap;
    }
    faults
}

/// How long a plan takes from the start of the load until the last service is back.
pub fn span(faults: &[Fault]) -> Duration {
    faults
        .iter()
        .map(|f| f.at + f.down)
        .max()
        .unwrap_or_default()
}

/// Something whose services can be stopped and started: the supervisor of this process,
/// an `lps up` in another process (its control socket), or docker compose.
pub trait Target {
    /// Stops `service` (`signal` says how hard, where the target can choose).
    fn stop(
        &self,
        service: &str,
        signal: Signal,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Starts `service` again.
    fn start(&self, service: &str) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// How a stop is recorded, e.g. `SIGKILL` or `compose`.
    fn how(&self, signal: Signal) -> String {
        format!("{signal:?}")
    }
}

impl Target for Arc<Mutex<Supervisor>> {
    async fn stop(&self, service: &str, signal: Signal) -> anyhow::Result<()> {
        self.lock()
            .await
            .stop(service, signal, Duration::from_secs(15))
            .await
    }

    async fn start(&self, service: &str) -> anyhow::Result<()> {
        self.lock().await.restart(service).await
    }
}

/// Runs `faults` against `target`, logging each event to `log` (JSON lines, see
/// [`FaultRecord`]). Services that are down when `stop` fires are started again at once.
pub async fn inject(
    faults: Vec<Fault>,
    target: &impl Target,
    signal: Signal,
    log: std::path::PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let how = target.how(signal);
    let record = |service: &str, action| -> anyhow::Result<()> {
        let event = FaultRecord {
            at_us: records::now_us(),
            service: service.to_owned(),
            action,
            how: how.clone(),
        };
        records::append_jsonl(&log, &[event])?;
        Ok(())
    };
    for fault in faults {
        tokio::select! {
            () = tokio::time::sleep_until(started + fault.at) => {}
            () = stop.cancelled() => return Ok(()),
        }
        for service in &fault.services {
            target.stop(service, signal).await?;
            record(service, FaultAction::Stop)?;
            eprintln!(
                "fault: stopped {service} ({how}) for {:.1} s",
                fault.down.as_secs_f64()
            );
        }
        tokio::select! {
            () = tokio::time::sleep(fault.down) => {}
            () = stop.cancelled() => {}
        }
        for service in &fault.services {
            target.start(service).await?;
            record(service, FaultAction::Start)?;
            eprintln!("fault: started {service} again");
        }
    }
    Ok(())
}

/// The compose command used unless told otherwise (`--compose-command`, `LPS_COMPOSE`).
pub const DEFAULT_COMPOSE_COMMAND: &str = "docker compose";

/// What [`DEFAULT_COMPOSE_COMMAND`] falls back to when the plugin is missing: Compose v1,
/// which takes the same arguments and files.
pub const FALLBACK_COMPOSE_COMMAND: &str = "docker-compose";

/// How long `<command> version` may take when deciding between the two.
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// A compose command on a compose file and its overrides: `<command> -f FILE [-f FILE...]
/// stop|start SERVICE` for faults, `up`/`down` for `lps experiment --compose`.
#[derive(Debug, Clone)]
pub struct Compose {
    /// The program and its leading arguments: `["docker", "compose"]` or
    /// `["docker-compose"]`.
    pub command: Vec<String>,
    /// The compose files, in order: the topology, then overrides (later files override
    /// earlier ones, as with repeated `-f`).
    pub files: Vec<std::path::PathBuf>,
    /// Environment for every invocation, e.g. `LPS_LOGS` (where the containers log).
    pub env: Vec<(String, String)>,
    /// Used instead of `command` when `command` does not run (`<command> version` fails)
    /// and this does: Compose v1 for the default `docker compose`.
    pub fallback: Option<Vec<String>>,
    /// The command that runs, decided on first use (shared by clones).
    resolved: Arc<tokio::sync::OnceCell<Vec<String>>>,
}

impl Compose {
    /// `command` is split at whitespace (`"docker compose"`, `"docker-compose"`); `files`
    /// are passed as one `-f` each, in order.
    pub fn new(command: &str, files: Vec<std::path::PathBuf>) -> anyhow::Result<Self> {
        let command: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        anyhow::ensure!(
            !command.is_empty(),
            "the compose command is empty; expected \"docker compose\" or docker-compose"
        );
        anyhow::ensure!(!files.is_empty(), "no compose file given");
        let fallback = (command.join(" ") == DEFAULT_COMPOSE_COMMAND)
            .then(|| vec![FALLBACK_COMPOSE_COMMAND.to_owned()]);
        Ok(Self {
            command,
            files,
            env: Vec::new(),
            fallback,
            resolved: Arc::default(),
        })
    }

    /// The command that runs: `command` when `<command> version` succeeds, else the
    /// fallback when it does (said once on stderr), else `command` (whose errors then say
    /// what to install).
    async fn program(&self) -> &[String] {
        self.resolved
            .get_or_init(|| async {
                let Some(fallback) = &self.fallback else {
                    return self.command.clone();
                };
                if runs(&self.command).await {
                    return self.command.clone();
                }
                if runs(fallback).await {
                    eprintln!(
                        "note: `{}` does not run here (no Compose plugin?); using `{}` \
                         (Compose v1) instead",
                        self.command.join(" "),
                        fallback.join(" ")
                    );
                    return fallback.clone();
                }
                self.command.clone()
            })
            .await
    }

    /// The compose files for messages: `a.yml + b.yml`.
    pub fn files_display(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// Sets `key=value` in the environment of every invocation.
    #[must_use]
    pub fn with_env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// The command line for `args` on the files: `docker compose -f FILE [-f FILE...]
    /// ARGS...`.
    /// (The fallback's once it was chosen.)
    pub fn command_line(&self, args: &[&str]) -> Vec<String> {
        let mut line = self.resolved.get().unwrap_or(&self.command).clone();
        for file in &self.files {
            line.push("-f".to_owned());
            line.push(file.display().to_string());
        }
        line.extend(args.iter().map(|a| (*a).to_owned()));
        line
    }

    /// The command line for `args` as one string, for messages (with the environment).
    pub fn display(&self, args: &[&str]) -> String {
        let env = self.env.iter().map(|(k, v)| format!("{k}={v} "));
        env.chain(std::iter::once(self.command_line(args).join(" ")))
            .collect()
    }

    /// What to say when the compose command cannot be run.
    fn not_found(&self, detail: &str) -> anyhow::Error {
        let command = self.command.join(" ");
        let hint = if command == DEFAULT_COMPOSE_COMMAND {
            "install Docker with its Compose plugin, or Compose v1 (docker-compose), or pass \
             --compose-command"
                .to_owned()
        } else {
            format!("install it or pass --compose-command \"{DEFAULT_COMPOSE_COMMAND}\"")
        };
        anyhow::anyhow!("{command} not found; {hint} ({detail})")
    }

    fn process(&self, line: &[String]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&line[0]);
        command
            .args(&line[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn output(&self, line: &[String]) -> anyhow::Result<std::process::Output> {
        self.process(line)
            .output()
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => self.not_found(&e.to_string()),
                _ => anyhow::anyhow!("running {}: {e}", line.join(" ")),
            })
    }

    /// Runs `args`, returns its standard output; an error carries its standard error.
    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        self.program().await;
        let output = self.output(&self.command_line(args)).await?;
        anyhow::ensure!(
            output.status.success(),
            "{} failed ({}): {}",
            self.display(args),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `args` with its output on this process's terminal (pulls and builds take a
    /// while and say so), after printing the command line.
    pub async fn run_visible(&self, args: &[&str]) -> anyhow::Result<()> {
        self.program().await;
        let line = self.command_line(args);
        eprintln!("$ {}", self.display(args));
        let status = self
            .process(&line)
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .status()
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => self.not_found(&e.to_string()),
                _ => anyhow::anyhow!("running {}: {e}", line.join(" ")),
            })?;
        anyhow::ensure!(
            status.success(),
            "{} failed ({status}); its output is above",
            self.display(args)
        );
        Ok(())
    }

    /// Checks that the compose command runs (`<command> version`) and the files exist.
    pub async fn check(&self) -> anyhow::Result<()> {
        let mut line = self.program().await.to_vec();
        line.push("version".to_owned());
        let output = self.output(&line).await?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let detail = stderr.lines().next().unwrap_or_default().trim();
            return Err(self.not_found(&format!("`{}`: {detail}", line.join(" "))));
        }
        for file in &self.files {
            anyhow::ensure!(file.is_file(), "compose file {} not found", file.display());
        }
        Ok(())
    }

    /// The services of the compose files together.
    pub async fn services(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .run(&["config", "--services"])
            .await?
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

impl Target for Compose {
    async fn stop(&self, service: &str, _signal: Signal) -> anyhow::Result<()> {
        self.run(&["stop", service]).await.map(drop)
    }

    async fn start(&self, service: &str) -> anyhow::Result<()> {
        self.run(&["start", service]).await.map(drop)
    }

    fn how(&self, _signal: Signal) -> String {
        "compose".to_owned()
    }
}

/// Whether `<command> version` succeeds within [`VERSION_TIMEOUT`].
async fn runs(command: &[String]) -> bool {
    let Some((program, args)) = command.split_first() else {
        return false;
    };
    let status = tokio::process::Command::new(program)
        .args(args)
        .arg("version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    matches!(
        tokio::time::timeout(VERSION_TIMEOUT, status).await,
        Ok(Ok(status)) if status.success()
    )
}

/// An `lps up` in another process, through its control socket (`<run>/control.sock`).
#[derive(Debug, Clone)]
pub struct Control {
    /// The socket.
    pub socket: std::path::PathBuf,
}

impl Control {
    /// Sends one command line and returns the answer line (an error when it starts with
    /// `error`).
    pub async fn call(&self, command: &str) -> anyhow::Result<String> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "connecting to {} (is `lps up` running?): {e}",
                    self.socket.display()
                )
            })?;
        stream.write_all(format!("{command}\n").as_bytes()).await?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).await?;
        let answer = answer.trim().to_owned();
        if let Some(error) = answer.strip_prefix("error") {
            anyhow::bail!("{command}: {}", error.trim_start_matches(':').trim());
        }
        Ok(answer)
    }

    /// The services the `lps up` runs.
    pub async fn services(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .call("list")
            .await?
            .split_whitespace()
            .map(str::to_owned)
            .collect())
    }
}

impl Target for Control {
    async fn stop(&self, service: &str, signal: Signal) -> anyhow::Result<()> {
        self.call(&format!("stop {service} {signal:?}"))
            .await
            .map(drop)
    }

    async fn start(&self, service: &str) -> anyhow::Result<()> {
        self.call(&format!("start {service}")).await.map(drop)
    }
}

/// Serves the control socket of an `lps up`: `list`, `stop SERVICE SIGKILL|SIGTERM`,
/// `start SERVICE`, one command per connection.
pub async fn serve_control(
    socket: std::path::PathBuf,
    supervisor: Arc<Mutex<Supervisor>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| anyhow::anyhow!("control socket {}: {e}", socket.display()))?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = stop.cancelled() => break,
        };
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let answer: anyhow::Result<String> = async {
                match words.as_slice() {
                    ["list"] => Ok(supervisor.lock().await.names().join(" ")),
                    ["stop", service, signal] => {
                        let signal = match *signal {
                            "SIGKILL" => Signal::SIGKILL,
                            "SIGTERM" => Signal::SIGTERM,
                            other => anyhow::bail!("unknown signal {other}"),
                        };
                        Target::stop(&supervisor, service, signal)
                            .await
                            .map(|()| "ok".to_owned())
                    }
                    ["start", service] => Target::start(&supervisor, service)
                        .await
                        .map(|()| "ok".to_owned()),
                    _ => anyhow::bail!("unknown command {:?}", line.trim()),
                }
            }
            .await;
            let reply = answer.unwrap_or_else(|e| format!("error: {e:#}"));
            let _ = write.write_all(format!("{reply}\n").as_bytes()).await;
            let _ = write.shutdown().await;
        });
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn plans_follow_upstream_and_scale() {
        let ng = names(&[
            "ars-comp-3",
            "ars-comp-2-1",
            "proxy2-1",
            "proxy1-1",
            "ars-comp-1-1",
            "ars-comp-1-2",
            "ars-comp-1-3",
        ]);
        let full = plan(Schedule::All, &ng, 1.0);
        assert_eq!(full.len(), 6);
        assert_eq!(
            full[0].services,
            names(&["ars-comp-1-1", "ars-comp-1-2", "ars-comp-1-3"])
        );
        assert_eq!(full[2].services, names(&["proxy1-1"]));
        for fault in &full {
            let down = fault.down.as_secs_f64();
            assert!((29.5..37.5).contains(&down), "{down}");
        }
        assert_eq!(full[0].at, Duration::from_secs(20));
        assert!(
            (full[1].at.as_secs_f64() - (20.0 + full[0].down.as_secs_f64() + 20.0)).abs() < 1e-9
        );
        // Seeded: the same plan every time; scaled: every time shrinks alike.
        assert_eq!(plan(Schedule::All, &ng, 1.0), full);
        let small = plan(Schedule::All, &ng, 0.1);
        assert!((small[3].down.as_secs_f64() - full[3].down.as_secs_f64() * 0.1).abs() < 1e-9);
        let legacy = names(&["ars-comp-3", "ars-comp-2-1", "ars-comp-1-1"]);
        let chain = plan(Schedule::Chain, &legacy, 1.0);
        assert_eq!(
            chain
                .iter()
                .map(|f| f.services[0].as_str())
                .collect::<Vec<_>>(),
            ["ars-comp-1-1", "ars-comp-2-1", "ars-comp-3"]
        );
        assert!(plan(Schedule::None, &ng, 1.0).is_empty());
    }

    #[test]
    fn compose_command_lines_carry_the_command_the_file_and_the_environment() {
        let compose = Compose::new(
            "docker  compose",
            vec!["/repo/docker-compose-ng.yml".into()],
        )
        .unwrap()
        .with_env("LPS_LOGS", "/runs/1/logs");
        assert_eq!(
            compose.command_line(&["stop", "proxy2-1"]),
            [
                "docker",
                "compose",
                "-f",
                "/repo/docker-compose-ng.yml",
                "stop",
                "proxy2-1"
            ]
        );
        assert_eq!(
            compose.display(&["up", "-d"]),
            "LPS_LOGS=/runs/1/logs docker compose -f /repo/docker-compose-ng.yml up -d"
        );
        let v1 = Compose::new("docker-compose", vec!["c.yml".into()]).unwrap();
        assert_eq!(
            v1.command_line(&["down"]),
            ["docker-compose", "-f", "c.yml", "down"]
        );
        assert!(Compose::new("  ", vec!["c.yml".into()]).is_err());
        assert!(Compose::new("docker compose", Vec::new()).is_err());
        // A topology and its overrides: one -f each, in the order given.
        let netem = Compose::new(
            "docker compose",
            vec![
                "docker-compose-ng.yml".into(),
                "docker-compose-netem.yml".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            netem.command_line(&["down"]),
            [
                "docker",
                "compose",
                "-f",
                "docker-compose-ng.yml",
                "-f",
                "docker-compose-netem.yml",
                "down"
            ]
        );
        assert_eq!(
            netem.files_display(),
            "docker-compose-ng.yml + docker-compose-netem.yml"
        );
    }

    #[tokio::test]
    async fn a_missing_compose_command_says_what_to_install_or_pass() {
        let compose = Compose::new("lps-test-no-such-compose", vec!["c.yml".into()]).unwrap();
        let error = format!("{:#}", compose.check().await.unwrap_err());
        assert!(
            error.starts_with("lps-test-no-such-compose not found; install it or pass --compose-command \"docker compose\""),
            "{error}"
        );
        let error = format!(
            "{:#}",
            Target::stop(&compose, "ars-comp-3", Signal::SIGKILL)
                .await
                .unwrap_err()
        );
        assert!(error.contains("not found"), "{error}");
        // The hint for the default command names the alternative.
        let default = Compose::new("docker compose", vec!["c.yml".into()]).unwrap();
        assert!(default.not_found("x").to_string().starts_with(
            "docker compose not found; install Docker with its Compose plugin, or Compose v1 \
             (docker-compose), or pass --compose-command"
        ));
    }

    /// A compose command with `fallback` (a test double for the plugin and v1).
    fn with_fallback(command: &str, fallback: &str) -> Compose {
        let mut compose = Compose::new(command, vec!["c.yml".into()]).unwrap();
        compose.fallback = Some(vec![fallback.to_owned()]);
        compose
    }

    #[tokio::test]
    async fn the_default_falls_back_to_compose_v1_when_the_plugin_does_not_run() {
        // Only the default command has a fallback, and it is v1.
        let default = Compose::new(DEFAULT_COMPOSE_COMMAND, vec!["c.yml".into()]).unwrap();
        assert_eq!(default.fallback, Some(vec!["docker-compose".to_owned()]));
        let chosen = Compose::new("docker compose", vec!["c.yml".into()]).unwrap();
        assert_eq!(chosen.fallback, Some(vec!["docker-compose".to_owned()]));
        let v1 = Compose::new("docker-compose", vec!["c.yml".into()]).unwrap();
        assert_eq!(v1.fallback, None);

        // The command does not run, the fallback does (`true version` exits 0): the
        // fallback runs every command, also through clones.
        let compose = with_fallback("lps-test-no-such-compose-plugin", "true");
        let clone = compose.clone();
        assert_eq!(compose.program().await, ["true"]);
        assert_eq!(
            clone.command_line(&["down"]),
            ["true", "-f", "c.yml", "down"]
        );
        assert_eq!(clone.display(&["ps"]), "true -f c.yml ps");

        // The command runs: no fallback, even a working one.
        let compose = with_fallback("true", "lps-test-no-such-compose-v1");
        assert_eq!(compose.program().await, ["true"]);

        // Neither runs: the error names the command asked for.
        let compose = with_fallback("lps-test-no-such-compose-plugin", "false");
        let error = format!("{:#}", compose.check().await.unwrap_err());
        assert!(
            error.starts_with("lps-test-no-such-compose-plugin not found"),
            "{error}"
        );
        assert_eq!(
            compose.command_line(&["ps"])[0],
            "lps-test-no-such-compose-plugin"
        );
    }
}
