//! The docker-compose driver: `<command> -f FILE [-f FILE...] ARGS`, where the command is
//! `docker compose`, or `docker-compose` through `--compose-command` or `LPS_COMPOSE`, and
//! the files a topology and its overrides, e.g. `docker-compose-ng.yml` and
//! `docker-compose-netem.yml`. `lps experiment --compose` deploys with it (`up`, `down`),
//! and it is a fault [`Target`] (`stop`, `start`). The default `docker compose` falls back
//! to Compose v1 (`docker-compose`) when the plugin is missing and v1 runs.

use std::sync::Arc;
use std::time::Duration;

use crate::faults::Target;
use crate::supervisor::Signal;

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

#[cfg(test)]
mod tests {
    use super::*;

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
