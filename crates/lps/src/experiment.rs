//! `lps experiment` and `lps demo`: a topology, load (and faults), drain, stop, analysis,
//! all into one run folder.
//!
//! The topology runs on a [`Platform`]:
//!
//! - **local** (default): the services as processes on free ports (so an experiment never
//!   collides with an `lps up`), faults by signals, the legacy-proxy-2 counters scraped
//!   every second (NG);
//! - **compose**: a compose file (`docker-compose-legacy.yml`, `docker-compose-ng.yml`),
//!   possibly with overrides (`docker-compose-netem.yml`), brought up with
//!   `LPS_LOGS=<run>/logs <compose> -f FILE [-f OVERRIDE...] up -d --build` (after
//!   `down -v` for a clean start; `LPS_UID`/`LPS_GID` default to this user, so the
//!   containers can write the bind-mounted logs folder), ready once the entry services
//!   (127.0.0.1:7081-7083) and the simulator (127.0.0.1:8084) answer `/healthz`; faults
//!   by `<compose> stop|start SERVICE`; `down` at the end unless kept up. The containers
//!   log into `<run>/logs` through the bind mount, so the simulator's ledger lands where
//!   the drain and the analysis read it. The legacy-proxy-2 counters are scraped on their
//!   host ports 9091-9093 when the compose file publishes them; otherwise `run.json`
//!   notes that they were not (and the per-instance figures stay empty). Files with
//!   network-emulation sidecars (services `netem-*`) are refused up front when this
//!   machine's kernel has no `sch_netem` ([`netem_unavailable`]): the run would measure
//!   an unshaped network under the netem label.
//!
//! Then, the same on both: load and fault schedule side by side, wait until every
//! acknowledged alarm has arrived at the simulator (the drain, measured by ids) or a
//! timeout, stop the topology, write `run.json`.
//!
//! An interruption (the caller's stop token: Ctrl-C, SIGTERM, SIGHUP) ends the run at any
//! point, start-up, load, drain and analysis included, stops the topology the same way
//! (local services in order; `down` for compose unless kept up) and fails the run, whose
//! folder keeps what was recorded so far.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::BrokerChoice;
use crate::compose::Compose;
use crate::faults::{self, Schedule, Target};
use crate::hops;
use crate::load::{self, LoadConfig, Shape};
use crate::records::{self, BridgeSample, ClientRecord, FinalStatus, RequestKind, RunInfo};
use crate::supervisor::{Signal, Supervisor, local_client};
use crate::topology::{self, Broker, Options, Program, ServiceSpec, Topology};

/// Where the topology of an experiment runs.
#[derive(Debug, Clone)]
pub enum Platform {
    /// Local processes on free ports (the experiment's `broker` and `options` apply).
    Local,
    /// A compose topology on the compose host ports.
    Compose(ComposeSetup),
}

/// How to run a compose topology.
#[derive(Debug, Clone)]
pub struct ComposeSetup {
    /// The compose command and files.
    pub compose: Compose,
    /// Clean start: `down -v` before `up` (containers, networks and volumes of a previous
    /// run go, the broker's persisted queue with them).
    pub clean: bool,
    /// Leave the topology running after the run (no `down`).
    pub keep_up: bool,
    /// How long to wait for the entry services and the simulator after `up`.
    pub ready_timeout: Duration,
}

/// One experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// Which topology.
    pub topology: Topology,
    /// Where it runs.
    pub platform: Platform,
    /// NG broker (local platform).
    pub broker: BrokerChoice,
    /// Topology options (simulator model, h2c); the load uses `http2` on both platforms.
    pub options: Options,
    /// Alarm load shape.
    pub shape: Shape,
    /// Load time (closed and open loop).
    pub duration: Duration,
    /// Background workload users (0: none).
    pub background_users: u32,
    /// Fault schedule.
    pub faults: Schedule,
    /// Fault time scale (1.0: upstream's times).
    pub scale: f64,
    /// SIGTERM instead of SIGKILL for faults (local platform).
    pub graceful: bool,
    /// How long to wait for the backlog to drain after the load.
    pub drain_timeout: Duration,
    /// legacy-proxy-2's in-flight window (`MQTT_RECEIVE_MAXIMUM`) on the local platform;
    /// `None`: the service's default (32).
    pub bridge_window: Option<u16>,
    /// The run folder.
    pub out: PathBuf,
}

/// What the load, the faults and the drain need from a started topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Every service name (what fault schedules pick from).
    pub names: Vec<String>,
    /// Entry base URLs in rotation order.
    pub entries: Vec<String>,
    /// The simulator's base URL (background load, readiness).
    pub simulator: String,
    /// legacy-proxy-2 instances and their `/metrics` URLs (empty: not scraped).
    pub bridges: Vec<(String, String)>,
    /// Every service with its program and base URL, for the per-hop timings ([`hops`]).
    pub services: Vec<(String, Program, String)>,
}

impl Endpoints {
    /// The endpoints of `specs`, each at `http://127.0.0.1:<port>`.
    fn of<'a>(specs: impl IntoIterator<Item = &'a ServiceSpec>) -> anyhow::Result<Self> {
        let specs: Vec<&ServiceSpec> = specs.into_iter().collect();
        let base = |s: &ServiceSpec| format!("http://127.0.0.1:{}", s.port);
        Ok(Self {
            names: specs.iter().map(|s| s.name.clone()).collect(),
            entries: specs.iter().filter(|s| s.entry).map(|s| base(s)).collect(),
            simulator: specs
                .iter()
                .find(|s| s.program == Program::RastSimulator)
                .map(|s| base(s))
                .context("no simulator")?,
            bridges: specs
                .iter()
                .filter(|s| s.program == Program::LegacyProxy2)
                .map(|s| (s.name.clone(), format!("{}/metrics", base(s))))
                .collect(),
            services: specs
                .iter()
                .map(|s| (s.name.clone(), s.program, base(s)))
                .collect(),
        })
    }

    /// The endpoints of a compose topology on the host: SPEC §5 service names, entries on
    /// 7081-7083, the simulator on 8084, legacy-proxy-2 admin ports 9091-9093 (the local
    /// topology's compose ports, which mirror the compose files).
    pub fn compose(topology: Topology) -> Self {
        let broker = Broker::Mosquitto {
            config: PathBuf::new(),
        };
        let specs = topology::services(topology, &Options::default(), Some(&broker));
        Self::of(&specs).expect("every topology has a simulator")
    }
}

/// What must answer `/healthz` before a compose topology counts as up: the entry services
/// and the simulator, on the host ports.
pub fn compose_health(topology: Topology) -> Vec<(String, String)> {
    topology::services(topology, &Options::default(), None)
        .into_iter()
        .filter(|s| s.entry || s.program == Program::RastSimulator)
        .map(|s| (s.name, format!("http://127.0.0.1:{}/healthz", s.port)))
        .collect()
}

/// Why a compose run has no per-instance figures.
pub const COMPOSE_NO_BRIDGE_METRICS: &str = "bridge metrics not scraped: no legacy-proxy-2 \
    answered /metrics on its host port (9091-9093 not published by the compose file?), so \
    the per-instance figures are empty";

/// A started topology: its endpoints and how to fault and stop it.
struct Deployed {
    endpoints: Endpoints,
    /// The broker that ran (NG), for `run.json`.
    broker: Option<String>,
    /// `local` or `compose FILE [+ OVERRIDE...]`, for `run.json`.
    platform: String,
    /// What this run does not measure, and why.
    notes: Vec<String>,
    target: Deployment,
}

/// The running topology, as a fault target.
enum Deployment {
    Local(Arc<Mutex<Supervisor>>),
    Compose(ComposeSetup),
}

impl Target for Deployment {
    async fn stop(&self, service: &str, signal: Signal) -> anyhow::Result<()> {
        match self {
            Self::Local(supervisor) => Target::stop(supervisor, service, signal).await,
            Self::Compose(setup) => setup.compose.stop(service, signal).await,
        }
    }

    async fn start(&self, service: &str) -> anyhow::Result<()> {
        match self {
            Self::Local(supervisor) => Target::start(supervisor, service).await,
            Self::Compose(setup) => setup.compose.start(service).await,
        }
    }

    fn how(&self, signal: Signal) -> String {
        match self {
            Self::Local(supervisor) => supervisor.how(signal),
            Self::Compose(setup) => setup.compose.how(signal),
        }
    }
}

impl Deployment {
    /// Says what an interruption does to the topology (before [`Deployment::shut_down`]).
    fn interrupted(&self) {
        match self {
            Self::Local(_) => eprintln!("interrupted: stopping the services"),
            Self::Compose(setup) if setup.keep_up => {
                eprintln!("interrupted: leaving the topology up (--keep-up)");
            }
            Self::Compose(setup) => eprintln!(
                "interrupted: bringing the topology down ({})",
                setup.compose.display(&["down"])
            ),
        }
    }

    /// Stops the topology (a compose topology only unless it is to be kept up).
    async fn shut_down(&self) -> anyhow::Result<()> {
        match self {
            Self::Local(supervisor) => {
                supervisor
                    .lock()
                    .await
                    .stop_all(Duration::from_secs(15))
                    .await;
                Ok(())
            }
            Self::Compose(setup) if setup.keep_up => {
                eprintln!(
                    "keeping the topology up; stop it with: {}",
                    setup.compose.display(&["down"])
                );
                Ok(())
            }
            Self::Compose(setup) => setup.compose.run_visible(&["down"]).await,
        }
    }
}

/// The error of an interrupted run.
fn interrupted(dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{}; what was recorded so far is in {}",
        crate::signals::interruption(),
        dir.display()
    )
}

/// Starts the topology of `experiment` with its logs in `dir/logs`. A local topology
/// interrupted while it starts is stopped in order (see [`crate::start`]); a compose
/// topology is brought down unless kept up.
async fn deploy(
    experiment: &Experiment,
    dir: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<Deployed> {
    match &experiment.platform {
        Platform::Local => deploy_local(experiment, dir, stop).await,
        Platform::Compose(setup) => deploy_compose(experiment.topology, setup, dir, stop).await,
    }
}

async fn deploy_local(
    experiment: &Experiment,
    dir: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<Deployed> {
    let mut specs = crate::up::plan(
        experiment.topology,
        &experiment.options,
        &experiment.broker,
        dir,
    )?;
    if let Some(window) = experiment.bridge_window {
        for spec in specs
            .iter_mut()
            .filter(|s| s.program == Program::LegacyProxy2)
        {
            spec.env.push((
                lps_common::config::ENV_MQTT_RECEIVE_MAXIMUM.to_owned(),
                window.to_string(),
            ));
        }
    }
    let supervisor = crate::up::launch(specs, dir, stop).await?;
    let endpoints = Endpoints::of(supervisor.running().iter().map(|r| &r.spec))?;
    let broker = supervisor
        .running()
        .iter()
        .find(|r| matches!(r.spec.program, Program::Mosquitto | Program::EmbeddedBroker))
        .map(|r| {
            if r.spec.program == Program::Mosquitto {
                "mosquitto"
            } else {
                "embedded"
            }
            .to_owned()
        })
        .or_else(|| match (&experiment.broker, experiment.topology) {
            (BrokerChoice::External(host, port), Topology::Ng) => {
                Some(format!("mqtt://{host}:{port}"))
            }
            _ => None,
        });
    Ok(Deployed {
        endpoints,
        broker,
        platform: "local".to_owned(),
        notes: Vec::new(),
        target: Deployment::Local(Arc::new(Mutex::new(supervisor))),
    })
}

/// The compose services that shape another service's network (docker-compose-netem.yml).
pub const NETEM_SIDECAR_PREFIX: &str = "netem-";

/// Why network emulation cannot work here, or `None` when it can or when that cannot be
/// told. The probe adds a netem qdisc to the loopback device of a throwaway network
/// namespace (`unshare --net`, with `--user --map-root-user` when not root), never to the
/// machine's own interfaces; the namespace ends with the probe. It checks this machine's
/// kernel, which is the Docker engine's unless `DOCKER_HOST` points elsewhere (then it
/// does not probe).
pub async fn netem_unavailable() -> Option<String> {
    if std::env::var("DOCKER_HOST").is_ok_and(|h| !h.is_empty() && !h.starts_with("unix://")) {
        return None;
    }
    let mut probe = tokio::process::Command::new("unshare");
    if !nix::unistd::geteuid().is_root() {
        probe.args(["--user", "--map-root-user"]);
    }
    probe
        .args([
            "--net", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(Duration::from_secs(10), probe.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            eprintln!("note: could not check for sch_netem (unshare: {e})");
            return None;
        }
        Err(_) => {
            eprintln!("note: could not check for sch_netem (the probe took over 10 s)");
            return None;
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    netem_probe_verdict(output.status.success(), stderr.trim())
}

/// The verdict on the probe's outcome: only tc's "unknown qdisc" answers count as a no.
fn netem_probe_verdict(success: bool, stderr: &str) -> Option<String> {
    if success {
        return None;
    }
    if stderr.contains("qdisc kind is unknown") || stderr.contains("Unknown qdisc") {
        return Some(format!(
            "this kernel has no sch_netem (`tc qdisc add dev lo root netem delay 1ms` in a \
             throwaway network namespace answered \"{stderr}\")"
        ));
    }
    eprintln!("note: could not check for sch_netem: {stderr}");
    None
}

/// `setup` with the run's logs folder (`LPS_LOGS`, created here, not by the engine, which
/// would make it root's) and this user as `LPS_UID`/`LPS_GID` unless the caller chose;
/// returns the logs folder too.
fn with_run_logs(setup: &ComposeSetup, dir: &Path) -> anyhow::Result<(ComposeSetup, PathBuf)> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let logs =
        std::fs::canonicalize(&logs).with_context(|| format!("resolving {}", logs.display()))?;
    let mut setup = setup.clone();
    setup.compose = setup
        .compose
        .with_env("LPS_LOGS", logs.display().to_string());
    // The containers write the logs folder as LPS_UID:LPS_GID (default 1000).
    for (key, id) in [
        ("LPS_UID", nix::unistd::getuid().as_raw()),
        ("LPS_GID", nix::unistd::getgid().as_raw()),
    ] {
        if std::env::var_os(key).is_none() {
            setup.compose = setup.compose.with_env(key, id.to_string());
        }
    }
    Ok((setup, logs))
}

/// Refuses a compose file that lacks a service of `topology`, or asks for network
/// emulation this machine cannot do.
async fn check_compose(
    compose: &Compose,
    topology: Topology,
    endpoints: &Endpoints,
) -> anyhow::Result<()> {
    compose.check().await?;
    let declared = compose.services().await?;
    let missing: Vec<&String> = endpoints
        .names
        .iter()
        .filter(|n| !declared.contains(n))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} lacks the {topology} services {missing:?} (it declares {declared:?})",
        compose.files_display()
    );
    if declared.iter().any(|s| s.starts_with(NETEM_SIDECAR_PREFIX))
        && let Some(why) = netem_unavailable().await
    {
        anyhow::bail!(
            "{} asks for network emulation, which this machine cannot do: {why}. Its sidecars \
             would leave every service unshaped, so the run would not measure what it is \
             labelled with. Run without the netem override, or on a host whose kernel has \
             sch_netem (and sch_tbf, sch_ingress, act_police).",
            compose.files_display()
        );
    }
    Ok(())
}

async fn deploy_compose(
    topology: Topology,
    setup: &ComposeSetup,
    dir: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<Deployed> {
    let (setup, logs) = with_run_logs(setup, dir)?;
    let compose = &setup.compose;
    let mut endpoints = Endpoints::compose(topology);
    check_compose(compose, topology, &endpoints).await?;
    let target = Deployment::Compose(setup.clone());
    let ready = async {
        if setup.clean {
            compose
                .run_visible(&["down", "-v", "--remove-orphans"])
                .await?;
        }
        compose.run_visible(&["up", "-d", "--build"]).await?;
        wait_ready(&compose_health(topology), setup.ready_timeout).await
    };
    let ready = tokio::select! {
        ready = ready => ready.map_err(|e| e.context(format!(
            "starting {}; see {} and `{}`",
            compose.files_display(),
            logs.display(),
            compose.display(&["ps"])
        ))),
        () = stop.cancelled() => {
            target.interrupted();
            Err(interrupted(dir))
        }
    };
    if let Err(e) = ready {
        if let Err(down) = target.shut_down().await {
            eprintln!("warning: {down:#}");
        }
        return Err(e);
    }
    let mut notes = Vec::new();
    if !endpoints.bridges.is_empty() && !any_answers(&endpoints.bridges).await {
        eprintln!("note: {COMPOSE_NO_BRIDGE_METRICS}");
        notes.push(COMPOSE_NO_BRIDGE_METRICS.to_owned());
        endpoints.bridges.clear();
    }
    Ok(Deployed {
        endpoints,
        broker: (topology == Topology::Ng).then(|| "mosquitto".to_owned()),
        platform: format!("compose {}", compose.files_display()),
        notes,
        target,
    })
}

/// Whether any of the `(name, url)` answers 2xx within 15 s (a legacy-proxy-2 answers
/// once it is up, before it is subscribed).
async fn any_answers(urls: &[(String, String)]) -> bool {
    let Ok(client) = local_client(Duration::from_secs(2)) else {
        return false;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        for (_, url) in urls {
            if client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until every `(name, url)` answers 2xx, printing who is still missing every 5 s.
async fn wait_ready(health: &[(String, String)], timeout: Duration) -> anyhow::Result<()> {
    let client = local_client(Duration::from_secs(2))?;
    let started = tokio::time::Instant::now();
    let mut next_report = started + Duration::from_secs(5);
    eprintln!(
        "waiting up to {:.0} s for {}",
        timeout.as_secs_f64(),
        health
            .iter()
            .map(|(n, u)| format!("{n} ({u})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    loop {
        let mut waiting = Vec::new();
        for (name, url) in health {
            let why = match client.get(url).send().await {
                Ok(r) if r.status().is_success() => continue,
                Ok(r) => r.status().to_string(),
                Err(e) if e.is_connect() => "no connection".to_owned(),
                Err(e) if e.is_timeout() => "timed out".to_owned(),
                Err(e) => e.to_string(),
            };
            waiting.push(format!("{name} ({why})"));
        }
        if waiting.is_empty() {
            eprintln!(
                "ready after {:.0} s",
                started.elapsed().as_secs_f64().ceil()
            );
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        anyhow::ensure!(
            now < started + timeout,
            "not ready within {:.0} s: {}",
            timeout.as_secs_f64(),
            waiting.join(", ")
        );
        if now >= next_report {
            eprintln!(
                "  {:.0} s: waiting for {}",
                started.elapsed().as_secs_f64(),
                waiting.join(", ")
            );
            next_report = now + Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs `experiment`; returns its run folder. When `stop` fires (Ctrl-C, SIGTERM) the run
/// ends at once: the topology is stopped (see [`ComposeSetup::keep_up`]) and the run fails.
pub async fn run(experiment: &Experiment, stop: &CancellationToken) -> anyhow::Result<PathBuf> {
    let dir = experiment.out.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let on = match &experiment.platform {
        Platform::Local => "local processes".to_owned(),
        Platform::Compose(setup) => setup.compose.files_display(),
    };
    eprintln!(
        "== {} experiment on {on}, run folder {}",
        experiment.topology,
        dir.display()
    );
    let deployed = deploy(experiment, &dir, stop).await?;
    let window = tokio::select! {
        window = drive(experiment, &deployed, &dir, stop) => window,
        () = stop.cancelled() => {
            deployed.target.interrupted();
            Err(interrupted(&dir))
        }
    };
    let stopped = deployed.target.shut_down().await;
    let (load_start_us, load_end_us, drained_us) = window?;
    if let Err(e) = stopped {
        eprintln!("warning: stopping the topology: {e:#}");
    }
    let info = RunInfo {
        topology: experiment.topology.to_string(),
        broker: deployed.broker,
        load: describe(&experiment.shape, experiment.duration),
        load_start_us,
        load_end_us,
        drained_us,
        platform: Some(deployed.platform),
        notes: deployed.notes,
    };
    std::fs::write(
        dir.join(records::RUN_INFO),
        serde_json::to_vec_pretty(&info)?,
    )?;
    Ok(dir)
}

/// Load, faults, bridge scraping and the drain on a started topology; returns the load
/// start, the load end and when it drained.
async fn drive(
    experiment: &Experiment,
    deployed: &Deployed,
    dir: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<(u64, u64, Option<u64>)> {
    let endpoints = &deployed.endpoints;
    // A child of `stop`: the scraper task also ends when the run is interrupted (and this
    // future dropped).
    let stop_scraper = stop.child_token();
    let scraper = tokio::spawn(scrape_bridges(
        endpoints.bridges.clone(),
        dir.join(records::BRIDGE_METRICS),
        stop_scraper.clone(),
    ));
    let plan = faults::plan(experiment.faults, &endpoints.names, experiment.scale);
    if !plan.is_empty() {
        eprintln!(
            "{} faults over {:.0} s",
            plan.len(),
            faults::span(&plan).as_secs_f64()
        );
    }
    let stop_faults = CancellationToken::new();
    let signal = if experiment.graceful {
        Signal::SIGTERM
    } else {
        Signal::SIGKILL
    };
    let injector = faults::inject(
        plan,
        &deployed.target,
        signal,
        dir.join(records::FAULTS),
        stop_faults.clone(),
    );

    let hops_before = hops::read(&endpoints.services).await;
    let load_start_us = records::now_us();
    let config = LoadConfig {
        entries: endpoints.entries.clone(),
        shape: experiment.shape.clone(),
        duration: experiment.duration,
        wait: Duration::from_secs(1),
        http2: experiment.options.http2,
        background: (experiment.background_users > 0).then(|| endpoints.simulator.clone()),
        background_users: experiment.background_users,
        finish_within: Duration::from_secs(60).max(experiment.drain_timeout),
        ledger: dir.join(records::CLIENT_LEDGER),
        progress: true,
    };
    // The faults run to the end of their schedule; alarms retry until they succeed, so the
    // load finishes once every service is back.
    let load = async {
        let report = load::run(config, CancellationToken::new()).await;
        stop_faults.cancel();
        report
    };
    let (report, injected) = tokio::join!(load, injector);
    let load_end_us = records::now_us();
    if let Err(e) = injected {
        eprintln!("warning: fault injection failed: {e:#}");
    }
    let report = report?;
    eprintln!("{}", report.table());

    let drained_us = drain(dir, experiment.drain_timeout).await;
    stop_scraper.cancel();
    let _ = scraper.await;
    let hops_after = hops::read(&endpoints.services).await;
    let timings = hops::difference(&endpoints.services, &hops_before, &hops_after);
    if let Err(e) = hops::write(dir, &timings) {
        eprintln!("warning: cannot record the per-hop timings: {e:#}");
    }
    Ok((load_start_us, load_end_us, drained_us?))
}

fn describe(shape: &Shape, duration: Duration) -> String {
    match shape {
        Shape::Users(n) => format!("{n} closed-loop users for {:.0} s", duration.as_secs_f64()),
        Shape::Rate(r) => format!("{r}/s open loop for {:.0} s", duration.as_secs_f64()),
        Shape::Steps {
            step_users,
            step,
            pause,
            max_steps,
        } => format!(
            "steps of {step_users} users, {:.0} s each with {:.0} s pauses, at most {max_steps}",
            step.as_secs_f64(),
            pause.as_secs_f64()
        ),
    }
}

/// Waits until every acknowledged alarm id of the client ledger is in the simulator ledger;
/// returns when that was, or `None` after `timeout`.
async fn drain(dir: &Path, timeout: Duration) -> anyhow::Result<Option<u64>> {
    let clients: Vec<ClientRecord> = records::read_jsonl(&dir.join(records::CLIENT_LEDGER))?;
    let mut waiting: HashSet<String> = clients
        .into_iter()
        .filter(|r| r.kind == RequestKind::Alarm && r.status == FinalStatus::Ok)
        .map(|r| r.id)
        .collect();
    let ledger = dir.join("logs").join(rast_simulator::journal::LEDGER_FILE);
    let deadline = tokio::time::Instant::now() + timeout;
    let total = waiting.len();
    let mut tail = records::JsonlTail::new(&ledger);
    let started = tokio::time::Instant::now();
    let mut next_report = started + Duration::from_secs(5);
    loop {
        let arrived: Vec<rast_simulator::journal::LedgerRecord> = tail.read_new()?;
        for record in arrived {
            if record.status == 200 {
                waiting.remove(&record.uid);
            }
        }
        if waiting.is_empty() {
            eprintln!("drained: all {total} acknowledged alarms arrived");
            return Ok(Some(records::now_us()));
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "not drained within {:.0} s: {} of {total} acknowledged alarms missing",
                timeout.as_secs_f64(),
                waiting.len()
            );
            return Ok(None);
        }
        if tokio::time::Instant::now() >= next_report {
            // The backlog, visible while it drains (an outage behind the broker is one).
            eprintln!(
                "draining: {} of {total} acknowledged alarms still on their way ({:.0} s)",
                waiting.len(),
                started.elapsed().as_secs_f64()
            );
            next_report += Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Scrapes `bridge_forwarded_total` and friends from each legacy-proxy-2 every second.
async fn scrape_bridges(bridges: Vec<(String, String)>, path: PathBuf, stop: CancellationToken) {
    if bridges.is_empty() {
        return;
    }
    let client = local_client(Duration::from_secs(1)).unwrap_or_default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            () = stop.cancelled() => true,
        };
        let mut samples = Vec::new();
        for (service, url) in &bridges {
            let Ok(response) = client.get(url).send().await else {
                continue;
            };
            let Ok(text) = response.text().await else {
                continue;
            };
            let value = |prefix: &str| -> u64 {
                text.lines()
                    .filter(|l| l.starts_with(prefix))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64
            };
            samples.push(BridgeSample {
                at_us: records::now_us(),
                service: service.clone(),
                forwarded: value("bridge_forwarded_total"),
                retried: value("bridge_retried_total"),
                dead_lettered: value("bridge_dead_lettered_total"),
            });
        }
        if let Err(e) = records::append_jsonl(&path, &samples) {
            eprintln!("warning: cannot record bridge metrics: {e}");
        }
        if last {
            return;
        }
    }
}

/// `lps demo`: the baseline and the NG experiment back to back, then one report; `stop`
/// interrupts it as it does [`run`].
pub async fn demo(
    template: &Experiment,
    out: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<PathBuf> {
    let mut runs = Vec::new();
    for topology in [Topology::Legacy, Topology::Ng] {
        let experiment = Experiment {
            topology,
            out: out.join(topology.to_string()),
            ..template.clone()
        };
        runs.push(run(&experiment, stop).await?);
    }
    let then = format!(
        "both runs are complete; `lps analyze {} --out {}` makes the report",
        runs.iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        out.display()
    );
    let into = out.to_owned();
    let summaries = crate::signals::blocking_or_interrupted(stop, &then, move || {
        crate::analyze::write_report(&runs, &into)
    })
    .await?;
    println!("{}", crate::analyze::table(&summaries));
    let report = out.join("report.html");
    println!("report: {}", report.display());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_endpoints_are_the_spec_names_on_the_host_ports() {
        let legacy = Endpoints::compose(Topology::Legacy);
        assert_eq!(legacy.names, crate::topology::LEGACY_SERVICES);
        assert_eq!(
            legacy.entries,
            [
                "http://127.0.0.1:7081",
                "http://127.0.0.1:7082",
                "http://127.0.0.1:7083"
            ]
        );
        assert_eq!(legacy.simulator, "http://127.0.0.1:8084");

        let ng = Endpoints::compose(Topology::Ng);
        for name in ["mosquitto", "proxy1-3", "proxy2-1", "ars-comp-2-2"] {
            assert!(ng.names.iter().any(|n| n == name), "{name}: {:?}", ng.names);
        }
        assert_eq!(ng.entries, legacy.entries);
        assert_eq!(ng.simulator, legacy.simulator);
        assert_eq!(
            ng.bridges,
            [1, 2, 3].map(|i| (
                format!("proxy2-{i}"),
                format!("http://127.0.0.1:909{i}/metrics")
            ))
        );
        assert!(legacy.bridges.is_empty());
        // The chain schedule finds every hop it stops among the compose services.
        let chain: Vec<String> = faults::plan(Schedule::Chain, &ng.names, 1.0)
            .into_iter()
            .flat_map(|f| f.services)
            .collect();
        assert_eq!(
            chain,
            [
                "ars-comp-1-1",
                "proxy1-1",
                "proxy2-1",
                "ars-comp-2-1",
                "ars-comp-3"
            ]
        );
    }

    #[test]
    fn only_an_unknown_qdisc_refuses_network_emulation() {
        assert_eq!(netem_probe_verdict(true, ""), None);
        let why = netem_probe_verdict(false, "Error: Specified qdisc kind is unknown.").unwrap();
        assert!(why.starts_with("this kernel has no sch_netem"), "{why}");
        assert!(why.contains("Specified qdisc kind is unknown"), "{why}");
        // The probe itself failing (no tc, no user namespaces) is no verdict.
        assert_eq!(
            netem_probe_verdict(false, "unshare: unshare failed: Operation not permitted"),
            None
        );
        assert_eq!(
            netem_probe_verdict(
                false,
                "unshare: failed to execute tc: No such file or directory"
            ),
            None
        );
    }

    #[test]
    fn compose_readiness_waits_for_the_entries_and_the_simulator() {
        assert_eq!(
            compose_health(Topology::Ng),
            [
                ("ars-comp-3", "http://127.0.0.1:8084/healthz"),
                ("ars-comp-1-1", "http://127.0.0.1:7081/healthz"),
                ("ars-comp-1-2", "http://127.0.0.1:7082/healthz"),
                ("ars-comp-1-3", "http://127.0.0.1:7083/healthz"),
            ]
            .map(|(n, u)| (n.to_owned(), u.to_owned()))
        );
    }
}
