//! `lps bench`: throughput, latency, CPU and memory of every hop, each next to the
//! ceiling it is bounded by, measured side by side in one run.
//!
//! Scenarios:
//! - `direct`: load generator → simulator (`-m zero`), the ceiling of the HTTP hops;
//! - `relay`: → ars-comp-2 → simulator, HTTP/1.1 and h2c, at each connection count, the
//!   payload matrix of the CONNECT-proxy benchmark (1 KiB to 1 MiB), and the latency the
//!   hop adds at half its throughput (open loop, against `direct` at the same rate);
//! - `legacy`: the whole baseline chain (three entries);
//! - `broker`: QoS 2 publish → shared subscription, three publishers and three
//!   subscribers, through the broker the NG chain uses: the NG ceiling;
//! - `ng`: the whole NG chain, counting what *arrived* at the simulator, not the 200s:
//!   the sustainable delivered rate (closed loop), then an open-loop run at 80 % of it for
//!   the drain time; loss is every acknowledged id missing at the simulator;
//! - `edge` (not in the default set: needs nginx and wrk): the edge's forward proxy,
//!   CONNECT tunnels and MQTT over WebSocket against nginx and the broker directly (see
//!   [`edge`]).
//!
//! Each figure carries the CPU seconds and peak memory of every process (from `/proc`),
//! the generator's own included: it shares the cores with the services.
//!
//! The stop token (Ctrl-C, SIGTERM, SIGHUP) ends a bench at any point: the services of the
//! current scenario are stopped in order and the bench fails, writing no `bench.json`.

pub mod broker;
pub mod edge;
pub mod generator;
pub mod procstat;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::BrokerChoice;
use crate::records;
use crate::signals::{interruption, or_interrupted};
use crate::supervisor::Supervisor;
use crate::topology::{Health, Options, Program, ServiceSpec, Topology};
use generator::{LoadResult, LoadSpec, Mode, Protocol, Target};
use procstat::{ProcessFigures, Watched, Window};

/// Upstream's figures on the same machine (issue 5), requests or messages per second.
pub mod upstream {
    /// ars-comp-2 (FastAPI + httpx) at 8 connections.
    pub const RELAY_C8: f64 = 570.0;
    /// ars-comp-2 at 50 connections.
    pub const RELAY_C50: f64 = 120.0;
    /// The baseline chain.
    pub const LEGACY: f64 = 240.0;
    /// The NG chain: ~230 answered 200, of which ~55 % reached the backend.
    pub const NG_DELIVERED: f64 = 230.0 * 0.55;
    /// nginx serving a stub directly.
    pub const DIRECT_NGINX: f64 = 86_000.0;
    /// Mosquitto QoS 2, 3 publishers × 3 subscribers.
    pub const BROKER: f64 = 12_000.0;
}

/// A scenario of `lps bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Generator → simulator: the HTTP ceiling.
    Direct,
    /// → ars-comp-2 → simulator.
    Relay,
    /// The baseline chain.
    Legacy,
    /// Raw QoS 2 through the broker: the NG ceiling.
    Broker,
    /// The NG chain, delivered rate.
    Ng,
    /// The edge (forward proxy, CONNECT, MQTT over WebSocket) against nginx and the broker.
    Edge,
}

/// What `lps bench` runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Scenarios (their ceilings are measured too).
    pub scenarios: Vec<Scenario>,
    /// Measured time of each figure.
    pub duration: Duration,
    /// Unmeasured time before each figure.
    pub warmup: Duration,
    /// Connection counts.
    pub connections: Vec<usize>,
    /// Relay payload sizes, bytes.
    pub sizes: Vec<usize>,
    /// NG broker.
    pub broker: BrokerChoice,
    /// How long NG may take to drain.
    pub drain_timeout: Duration,
    /// Run folder (service logs, bench.json).
    pub out: PathBuf,
    /// Rounds: every figure is measured this many times (services started afresh each
    /// round) and the median is reported, which tames a noisy machine.
    pub rounds: usize,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Scenario.
    pub scenario: Scenario,
    /// What was measured, e.g. `relay http1 c50 16KiB`.
    pub name: String,
    /// Generator protocol (none for `broker`).
    pub protocol: Option<Protocol>,
    /// Connections (or publishers × window for `broker`).
    pub connections: usize,
    /// Request body or payload, bytes.
    pub body_bytes: usize,
    /// `closed` or `open N/s`.
    pub mode: String,
    /// Measured seconds.
    pub seconds: f64,
    /// Acknowledged in the window.
    pub ok: u64,
    /// Failures.
    pub errors: u64,
    /// First failure.
    pub first_error: Option<String>,
    /// Acknowledged per second (`broker`: delivered per second).
    pub rate: f64,
    /// Latency quantiles, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
    /// NG: arrived at the simulator per second in the window.
    pub delivered_rate: Option<f64>,
    /// NG and legacy: acknowledged ids that never reached the simulator.
    pub lost: Option<u64>,
    /// NG: seconds from the end of the load to the last arrival.
    pub drain_s: Option<f64>,
    /// The figure this one is bounded by.
    pub ceiling: Option<String>,
    /// `rate` (NG: `delivered_rate`) over the ceiling's.
    pub ratio: Option<f64>,
    /// Upstream's figure for the same thing, if measured.
    pub upstream: Option<f64>,
    /// Our figure over upstream's.
    pub vs_upstream: Option<f64>,
    /// Share of the machine's CPU time the hypervisor stole meanwhile (0..1).
    pub steal: f64,
    /// The load generator (this process).
    pub generator: ProcessFigures,
    /// The services.
    pub processes: Vec<ProcessFigures>,
}

/// A performance target and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The target.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Met or not.
    pub met: bool,
}

/// The whole report (`bench.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// When, UTC.
    pub started: String,
    /// Seconds measured per figure.
    pub duration_s: f64,
    /// Broker used by `broker` and `ng`.
    pub broker: Option<String>,
    /// The figures.
    pub figures: Vec<Figure>,
    /// The targets of issue 5.
    pub checks: Vec<Check>,
}

/// The machine, from `/proc`.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// A relay request body of about `size` bytes: `{"id":"1","body":"xxx…"}`.
pub fn relay_body(size: usize) -> Bytes {
    let frame = r#"{"id":"1","body":""}"#.len();
    let pad = "x".repeat(size.saturating_sub(frame));
    Bytes::from(format!(r#"{{"id":"1","body":"{pad}"}}"#))
}

/// The small relay body: a legacy store command as ars-comp-1 sends it.
fn small_body() -> Bytes {
    Bytes::from_static(br#"{"id":"1","body":"8023;015142611148;2001;2026-11-22T05:00:00.000000Z"}"#)
}

fn alarm_body() -> Bytes {
    Bytes::from_static(
        br#"{"phone":"015142611148","branch":"2001","headnumber":"8023","triggertime":"2026-11-22T05:00:00.000000Z"}"#,
    )
}

fn size_name(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{}MiB", bytes >> 20)
    } else if bytes >= 1 << 10 {
        format!("{}KiB", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

fn watched(supervisor: &Supervisor, programs: &[Program]) -> Vec<Watched> {
    supervisor
        .running()
        .iter()
        .filter(|r| programs.contains(&r.spec.program))
        .map(|r| Watched {
            name: r.spec.name.clone(),
            pid: r.pid(),
        })
        .collect()
}

fn me() -> Watched {
    Watched {
        name: "lps bench (generator)".into(),
        pid: None,
    }
}

/// Runs one HTTP load while measuring `processes`.
async fn measure(
    spec: LoadSpec,
    processes: Vec<Watched>,
) -> anyhow::Result<(LoadResult, Measured)> {
    let warmup = spec.warmup;
    let mut all = vec![me()];
    all.extend(processes);
    // The window starts after the warm-up: the generator runs meanwhile.
    let load = tokio::spawn(generator::run(spec));
    tokio::time::sleep(warmup).await;
    let window = Window::start(all);
    let result = load.await??;
    Ok((result, Measured::of(&window)))
}

/// What a window measured besides the load: the generator, the services, the steal.
struct Measured {
    generator: ProcessFigures,
    processes: Vec<ProcessFigures>,
    steal: f64,
}

impl Measured {
    fn of(window: &Window) -> Self {
        let steal = window.steal();
        let mut processes = window.finish();
        let generator = processes.remove(0);
        Self {
            generator,
            processes,
            steal,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn figure(
    scenario: Scenario,
    name: String,
    spec: &LoadSpec,
    result: &LoadResult,
    measured: Measured,
) -> Figure {
    Figure {
        scenario,
        name,
        protocol: Some(spec.protocol),
        connections: spec.connections,
        body_bytes: spec.body.len(),
        mode: match spec.mode {
            Mode::Closed => "closed".into(),
            Mode::Open(rate) => format!("open {rate:.0}/s"),
        },
        seconds: result.elapsed.as_secs_f64(),
        ok: result.ok,
        errors: result.errors,
        first_error: result.first_error.clone(),
        rate: result.rate(),
        p50_ms: result.quantile_ms(0.5),
        p99_ms: result.quantile_ms(0.99),
        max_ms: result.quantile_ms(1.0),
        delivered_rate: None,
        lost: None,
        drain_s: None,
        ceiling: None,
        ratio: None,
        upstream: None,
        vs_upstream: None,
        steal: measured.steal,
        generator: measured.generator,
        processes: measured.processes,
    }
}

impl Figure {
    /// Records what this figure is compared with; [`rebase`] computes the ratios once the
    /// reported figures are known.
    fn against(mut self, ceiling: Option<&Figure>, upstream: Option<f64>) -> Self {
        self.ceiling = ceiling.map(|c| c.name.clone());
        self.upstream = upstream;
        self
    }
}

fn spec_of(
    name: &str,
    program: Program,
    port: u16,
    env: Vec<(String, String)>,
    args: Vec<String>,
) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        program,
        port,
        env,
        args,
        entry: false,
        health: Health::Http("/healthz"),
    }
}

fn target(url: &str, path: &str) -> anyhow::Result<Target> {
    let authority = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: not http://"))?;
    Ok(Target {
        addr: authority
            .parse()
            .with_context(|| format!("{url}: address"))?,
        path: path.to_owned(),
    })
}

/// Runs the benchmark until done or `stop`; returns the report (also written to
/// `out/bench.json`).
pub async fn run(options: &BenchOptions, stop: &CancellationToken) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let mut report = Report {
        machine: Machine::read(),
        started: chrono::Utc::now().to_rfc3339(),
        duration_s: options.duration.as_secs_f64(),
        broker: None,
        figures: Vec::new(),
        checks: Vec::new(),
    };
    let most = options.connections.iter().copied().max().unwrap_or(50);
    let rounds = options.rounds.max(1);
    let mut measured = Vec::new();
    for round in 1..=rounds {
        let mut this = options.clone();
        if rounds > 1 {
            eprintln!("bench: round {round} of {rounds}");
            this.out = options.out.join(format!("round-{round}"));
        }
        let mut figures = Report {
            figures: Vec::new(),
            ..report.clone()
        };
        one_round(&this, &mut figures, most, stop).await?;
        report.broker = figures.broker;
        measured.push(figures.figures);
    }
    report.figures = median(measured);
    rebase(&mut report.figures);
    report.checks = checks(&report.figures, most);
    let path = options.out.join("bench.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}

async fn one_round(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let wants = |s: Scenario| options.scenarios.contains(&s);
    if wants(Scenario::Direct) || wants(Scenario::Relay) || wants(Scenario::Legacy) {
        http_hops(options, report, most, stop).await?;
    }
    if wants(Scenario::Legacy) {
        legacy(options, report, most, stop).await?;
    }
    if wants(Scenario::Broker) || wants(Scenario::Ng) {
        ng(options, report, most, stop).await?;
    }
    if wants(Scenario::Edge) {
        edge::run(options, report, stop).await?;
    }
    Ok(())
}

/// Stops the services of a scenario, saying so when interrupted.
async fn stop_services(supervisor: &mut Supervisor, stop: &CancellationToken) {
    if stop.is_cancelled() {
        eprintln!("{}: stopping the services", interruption());
    }
    supervisor.stop_all(Duration::from_secs(5)).await;
}

/// Per figure, the round with the median result: the median rate for closed loops, the
/// median p99 for open loops (their rate is the schedule's).
fn median(rounds: Vec<Vec<Figure>>) -> Vec<Figure> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    let names: Vec<String> = first.iter().map(|f| f.name.clone()).collect();
    names
        .iter()
        .filter_map(|name| {
            let mut all: Vec<&Figure> = rounds
                .iter()
                .filter_map(|round| round.iter().find(|f| &f.name == name))
                .collect();
            all.sort_by(|a, b| {
                if a.mode == "closed" {
                    let rate = |f: &Figure| f.delivered_rate.unwrap_or(f.rate);
                    rate(a).total_cmp(&rate(b))
                } else {
                    a.p99_ms.total_cmp(&b.p99_ms)
                }
            });
            all.get(all.len() / 2).map(|f| (*f).clone())
        })
        .collect()
}

/// Ratios to the ceilings and to upstream, from the figures finally reported.
fn rebase(figures: &mut [Figure]) {
    let rates: Vec<(String, f64)> = figures
        .iter()
        .map(|f| (f.name.clone(), f.delivered_rate.unwrap_or(f.rate)))
        .collect();
    for f in figures.iter_mut() {
        let rate = f.delivered_rate.unwrap_or(f.rate);
        if let Some(ceiling) = &f.ceiling
            && let Some((_, base)) = rates.iter().find(|(name, _)| name == ceiling)
        {
            f.ratio = Some(rate / base.max(1e-9));
        }
        if let Some(upstream) = f.upstream {
            f.vs_upstream = Some(rate / upstream);
        }
    }
}

fn progress(name: &str) {
    eprintln!("bench: {name} …");
}

/// `direct` and `relay` on one simulator and one ars-comp-2.
async fn http_hops(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let dir = options.out.join("http");
    let mut supervisor = Supervisor::new(&dir)?;
    let sim_port = crate::topology::free_port();
    let relay_port = crate::topology::free_port();
    let max_body = options.sizes.iter().copied().max().unwrap_or(0) * 2 + (64 << 10);
    let started = or_interrupted(stop, async {
        supervisor
            .start(spec_of(
                "ars-comp-3",
                Program::RastSimulator,
                sim_port,
                vec![("MAX_BODY_BYTES".into(), max_body.to_string())],
                vec!["-m".into(), "zero".into()],
            ))
            .await?;
        supervisor
            .start(spec_of(
                "ars-comp-2",
                Program::ArsComp2,
                relay_port,
                vec![
                    (
                        lps_common::config::ENV_TARGET_URL.into(),
                        format!(
                            "http://127.0.0.1:{sim_port}{}",
                            lps_common::wire::STORE_PATH
                        ),
                    ),
                    ("MAX_BODY_BYTES".into(), max_body.to_string()),
                ],
                Vec::new(),
            ))
            .await
    })
    .await;
    let result = match started {
        Ok(()) => {
            let figures = http_figures(options, report, most, &supervisor, sim_port, relay_port);
            or_interrupted(stop, figures).await
        }
        Err(e) => Err(e),
    };
    stop_services(&mut supervisor, stop).await;
    result
}

async fn http_figures(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    supervisor: &Supervisor,
    sim_port: u16,
    relay_port: u16,
) -> anyhow::Result<()> {
    let path = lps_common::wire::STORE_PATH;
    let sim = target(&format!("http://127.0.0.1:{sim_port}"), path)?;
    let relay = target(&format!("http://127.0.0.1:{relay_port}"), path)?;
    let sim_only = || watched(supervisor, &[Program::RastSimulator]);
    let both = || watched(supervisor, &[Program::ArsComp2, Program::RastSimulator]);
    let load = |target: &Target, protocol, connections, body: Bytes, mode| LoadSpec {
        targets: vec![target.clone()],
        protocol,
        connections,
        body,
        mode,
        warmup: options.warmup,
        duration: options.duration,
        keep_ids: false,
    };
    let relay_wanted = options.scenarios.contains(&Scenario::Relay);
    // Ceilings first, at every connection count (legacy needs them too).
    let mut directs = Vec::new();
    for &c in &options.connections {
        let name = format!("direct http1 c{c}");
        progress(&name);
        let spec = load(&sim, Protocol::Http1, c, small_body(), Mode::Closed);
        let (result, measured) = measure(spec.clone(), sim_only()).await?;
        let upstream = (c == most).then_some(upstream::DIRECT_NGINX);
        let f = figure(Scenario::Direct, name, &spec, &result, measured).against(None, upstream);
        directs.push(f.clone());
        report.figures.push(f);
    }
    if !relay_wanted {
        return Ok(());
    }
    for protocol in [Protocol::Http1, Protocol::H2c] {
        for (i, &c) in options.connections.iter().enumerate() {
            let name = format!("relay {protocol} c{c}");
            progress(&name);
            let spec = load(&relay, protocol, c, small_body(), Mode::Closed);
            let (result, measured) = measure(spec.clone(), both()).await?;
            let upstream = match (protocol, c) {
                (Protocol::Http1, 8) => Some(upstream::RELAY_C8),
                (Protocol::Http1, 50) => Some(upstream::RELAY_C50),
                _ => None,
            };
            report.figures.push(
                figure(Scenario::Relay, name, &spec, &result, measured)
                    .against(directs.get(i), upstream),
            );
        }
    }
    // The payload matrix at the most connections, each size against its own ceiling.
    for &size in &options.sizes {
        let body = relay_body(size);
        let mut pair = Vec::new();
        for (scenario, target, label) in [
            (Scenario::Direct, &sim, "direct"),
            (Scenario::Relay, &relay, "relay"),
        ] {
            let name = format!("{label} http1 c{most} {}", size_name(size));
            progress(&name);
            let spec = load(target, Protocol::Http1, most, body.clone(), Mode::Closed);
            let watch = if scenario == Scenario::Direct {
                sim_only()
            } else {
                both()
            };
            let (result, measured) = measure(spec.clone(), watch).await?;
            let f = figure(scenario, name, &spec, &result, measured).against(pair.first(), None);
            pair.push(f);
        }
        report.figures.extend(pair);
    }
    // Added latency at half the relay's throughput, open loop, against direct at that rate.
    let relay_most = report
        .figures
        .iter()
        .find(|f| f.name == format!("relay http1 c{most}"))
        .map_or(0.0, |f| f.rate);
    if relay_most > 0.0 {
        let rate = relay_most / 2.0;
        let mut pair: Vec<Figure> = Vec::new();
        for (scenario, target, label) in [
            (Scenario::Direct, &sim, "direct"),
            (Scenario::Relay, &relay, "relay"),
        ] {
            let name = format!("{label} http1 c{most} open half");
            progress(&format!("{name} ({rate:.0}/s)"));
            let spec = load(
                target,
                Protocol::Http1,
                most,
                small_body(),
                Mode::Open(rate),
            );
            let watch = if scenario == Scenario::Direct {
                sim_only()
            } else {
                both()
            };
            let (result, measured) = measure(spec.clone(), watch).await?;
            let f = figure(scenario, name, &spec, &result, measured).against(pair.first(), None);
            pair.push(f);
        }
        report.figures.extend(pair);
    }
    Ok(())
}

/// Waits until every id of `ids` is in the simulator ledger `ledger` (or `timeout`);
/// returns the missing count, the arrivals in `[from_us, to_us)`, and the last arrival
/// of an id of `ids`.
async fn arrivals(
    ledger: &Path,
    ids: &[u64],
    window: (u64, u64),
    timeout: Duration,
) -> anyhow::Result<(u64, u64, u64)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let wanted: HashSet<String> = ids.iter().map(u64::to_string).collect();
    let mut tail = records::JsonlTail::new(ledger);
    let mut seen = HashSet::new();
    let (mut in_window, mut last) = (0, 0);
    loop {
        let records: Vec<rast_simulator::journal::LedgerRecord> = tail.read_new()?;
        for record in records.into_iter().filter(|r| r.status == 200) {
            if wanted.contains(&record.uid) {
                last = last.max(record.start_us);
                if (window.0..window.1).contains(&record.start_us) {
                    in_window += 1;
                }
                seen.insert(record.uid);
            }
        }
        let missing = (wanted.len() - seen.len()) as u64;
        if missing == 0 || tokio::time::Instant::now() >= deadline {
            return Ok((missing, in_window, last));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn topology_options() -> Options {
    Options {
        ephemeral_ports: true,
        simulator_args: vec!["-m".into(), "zero".into()],
        ..Options::default()
    }
}

fn entries(supervisor: &Supervisor) -> anyhow::Result<Vec<Target>> {
    supervisor
        .running()
        .iter()
        .filter(|r| r.spec.entry)
        .map(|r| target(&r.base_url(), ars_comp_1::SIMPLE_PATH))
        .collect()
}

/// The baseline chain at the most connections, against `direct` at the same count.
async fn legacy(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let dir = options.out.join("legacy");
    let mut supervisor = crate::start(
        Topology::Legacy,
        &topology_options(),
        &BrokerChoice::Auto,
        &dir,
        stop,
    )
    .await?;
    let result = or_interrupted(stop, async {
        let name = format!("legacy http1 c{most}");
        progress(&name);
        let spec = LoadSpec {
            targets: entries(&supervisor)?,
            protocol: Protocol::Http1,
            connections: most,
            body: alarm_body(),
            mode: Mode::Closed,
            warmup: options.warmup,
            duration: options.duration,
            keep_ids: true,
        };
        let services = watched(
            &supervisor,
            &[Program::ArsComp1, Program::ArsComp2, Program::RastSimulator],
        );
        let (result, measured) = measure(spec.clone(), services).await?;
        let ledger = dir.join("logs").join(rast_simulator::journal::LEDGER_FILE);
        let (lost, _, _) = arrivals(&ledger, &result.ids, (0, 0), Duration::from_secs(5)).await?;
        let ceiling = report
            .figures
            .iter()
            .find(|f| f.name == format!("direct http1 c{most}"))
            .cloned();
        let mut f = figure(Scenario::Legacy, name, &spec, &result, measured);
        f.lost = Some(lost);
        report
            .figures
            .push(f.against(ceiling.as_ref(), Some(upstream::LEGACY)));
        anyhow::Ok(())
    })
    .await;
    stop_services(&mut supervisor, stop).await;
    result
}

/// `broker` and `ng` on one NG topology.
async fn ng(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let dir = options.out.join("ng");
    let mut supervisor = crate::start(
        Topology::Ng,
        &topology_options(),
        &options.broker,
        &dir,
        stop,
    )
    .await?;
    let figures = ng_figures(options, report, most, &supervisor, &dir);
    let result = or_interrupted(stop, figures).await;
    stop_services(&mut supervisor, stop).await;
    result
}

async fn ng_figures(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    supervisor: &Supervisor,
    dir: &Path,
) -> anyhow::Result<()> {
    let broker_service = supervisor
        .running()
        .iter()
        .find(|r| matches!(r.spec.program, Program::Mosquitto | Program::EmbeddedBroker));
    let broker_name = broker_service.map_or_else(
        || format!("{:?}", options.broker),
        |r| r.spec.program.name().to_owned(),
    );
    report.broker = Some(broker_name.clone());
    let address = match (broker_service, &options.broker) {
        (Some(r), _) => r.base_url(),
        (None, BrokerChoice::External(host, port)) => format!("mqtt://{host}:{port}"),
        (None, _) => anyhow::bail!("the NG topology has no broker"),
    };
    let broker_procs = || watched(supervisor, &[Program::Mosquitto, Program::EmbeddedBroker]);

    // The ceiling: raw QoS 2 with the chain's client counts.
    let name = format!("broker {broker_name} qos2 3×3");
    progress(&name);
    let spec = broker::BrokerSpec {
        address,
        publishers: 3,
        subscribers: 3,
        window: 32,
        receive_maximum: 32,
        payload: small_body().len(),
        warmup: options.warmup,
        duration: options.duration,
    };
    let mut all = vec![me()];
    all.extend(broker_procs());
    let run = tokio::spawn({
        let spec = spec.clone();
        async move { broker::run(&spec).await }
    });
    tokio::time::sleep(options.warmup).await;
    let window = Window::start(all);
    let result = run.await??;
    let measured = Measured::of(&window);
    let quantile = |q: f64| generator::quantile_ms(&result.latencies_us, q);
    let seconds = result.elapsed.as_secs_f64().max(1e-9);
    let ceiling = Figure {
        scenario: Scenario::Broker,
        name,
        protocol: None,
        connections: spec.publishers * spec.window,
        body_bytes: spec.payload,
        mode: "closed".into(),
        seconds,
        ok: result.delivered,
        errors: result.errors,
        first_error: result.first_error.clone(),
        rate: result.delivered as f64 / seconds,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        max_ms: quantile(1.0),
        delivered_rate: None,
        lost: None,
        drain_s: None,
        ceiling: None,
        ratio: None,
        upstream: None,
        vs_upstream: None,
        steal: measured.steal,
        generator: measured.generator,
        processes: measured.processes,
    }
    .against(None, Some(upstream::BROKER));
    report.figures.push(ceiling.clone());
    if !options.scenarios.contains(&Scenario::Ng) {
        return Ok(());
    }

    let ledger = dir.join("logs").join(rast_simulator::journal::LEDGER_FILE);
    let services = || {
        watched(
            supervisor,
            &[
                Program::ArsComp1,
                Program::LegacyProxy1,
                Program::Mosquitto,
                Program::EmbeddedBroker,
                Program::LegacyProxy2,
                Program::ArsComp2,
                Program::RastSimulator,
            ],
        )
    };
    let spec = |mode| -> anyhow::Result<LoadSpec> {
        Ok(LoadSpec {
            targets: entries(supervisor)?,
            protocol: Protocol::Http1,
            connections: most,
            body: alarm_body(),
            mode,
            warmup: options.warmup,
            duration: options.duration,
            keep_ids: true,
        })
    };
    // Sustainable: closed loop, counting arrivals at the simulator in the window.
    let name = format!("ng http1 c{most}");
    progress(&name);
    let f = ng_figure(options, name, spec(Mode::Closed)?, services(), &ledger).await?;
    let delivered = f.delivered_rate.unwrap_or(0.0);
    report
        .figures
        .push(f.against(Some(&ceiling), Some(upstream::NG_DELIVERED)));

    // 80 % of the sustainable delivered rate, open loop: the drain after the load.
    let rate = (delivered * 0.8).max(1.0);
    let name = format!("ng http1 c{most} open 80%");
    progress(&format!("{name} ({rate:.0}/s)"));
    let f = ng_figure(options, name, spec(Mode::Open(rate))?, services(), &ledger).await?;
    report.figures.push(f.against(Some(&ceiling), None));
    Ok(())
}

/// One NG load: what arrived at the simulator in the window, what never did, and how
/// long after the load the last acknowledged alarm arrived.
async fn ng_figure(
    options: &BenchOptions,
    name: String,
    load: LoadSpec,
    services: Vec<Watched>,
    ledger: &Path,
) -> anyhow::Result<Figure> {
    let from_us = records::now_us() + micros(options.warmup);
    let (result, measured) = measure(load.clone(), services).await?;
    let to_us = from_us + micros(options.duration);
    let end_us = records::now_us();
    let (lost, in_window, last) =
        arrivals(ledger, &result.ids, (from_us, to_us), options.drain_timeout).await?;
    let mut f = figure(Scenario::Ng, name, &load, &result, measured);
    let delivered = in_window as f64 / options.duration.as_secs_f64().max(1e-9);
    f.delivered_rate = Some(delivered);
    f.lost = Some(lost);
    f.drain_s = Some(seconds_after(last, end_us));
    Ok(f)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Seconds from `end_us` to `last_us` (0 when nothing arrived after the end).
fn seconds_after(last_us: u64, end_us: u64) -> f64 {
    last_us.saturating_sub(end_us) as f64 / 1e6
}

fn find<'a>(figures: &'a [Figure], name: &str) -> Option<&'a Figure> {
    figures.iter().find(|f| f.name == name)
}

/// Issue 5's targets, checked against this run's figures.
fn checks(figures: &[Figure], most: usize) -> Vec<Check> {
    let mut checks = Vec::new();
    let pct = |x: f64| format!("{:.0} %", x * 100.0);
    if let Some(relay) = find(figures, &format!("relay http1 c{most}"))
        && let Some(ratio) = relay.ratio
    {
        checks.push(Check {
            target: format!("relay ≥ 50 % of direct at c{most}, small bodies"),
            measured: pct(ratio),
            met: ratio >= 0.5,
        });
    }
    if let (Some(direct), Some(relay)) = (
        figures
            .iter()
            .find(|f| f.scenario == Scenario::Direct && f.mode.starts_with("open")),
        figures
            .iter()
            .find(|f| f.scenario == Scenario::Relay && f.mode.starts_with("open")),
    ) {
        let added = relay.p99_ms - direct.p99_ms;
        checks.push(Check {
            target: "relay adds ≤ 1 ms p99 at half its throughput".into(),
            measured: format!(
                "{added:.2} ms ({:.2} vs {:.2} ms at {})",
                relay.p99_ms, direct.p99_ms, relay.mode
            ),
            met: added <= 1.0,
        });
    }
    if let Some(big) = figures
        .iter()
        .filter(|f| f.scenario == Scenario::Relay && f.body_bytes >= 1 << 20)
        .max_by_key(|f| f.body_bytes)
        && let Some(relay) = big.processes.iter().find(|p| p.name == "ars-comp-2")
    {
        let product = (big.body_bytes * big.connections) as f64 / f64::from(1 << 20);
        checks.push(Check {
            target: format!(
                "relay memory below body × connections ({product:.0} MiB) at {}",
                size_name(big.body_bytes)
            ),
            measured: format!("{:.1} MiB peak", relay.rss_peak_mib),
            met: relay.rss_peak_mib < product,
        });
    }
    if let Some(legacy) = figures.iter().find(|f| f.scenario == Scenario::Legacy)
        && let Some(ratio) = legacy.ratio
    {
        checks.push(Check {
            target: "legacy chain ≥ 30 % of direct".into(),
            measured: pct(ratio),
            met: ratio >= 0.3,
        });
    }
    let ng: Vec<&Figure> = figures
        .iter()
        .filter(|f| f.scenario == Scenario::Ng)
        .collect();
    if let Some(closed) = ng.iter().find(|f| f.mode == "closed")
        && let Some(ratio) = closed.ratio
    {
        checks.push(Check {
            target: "NG delivered ≥ 60 % of the broker ceiling".into(),
            measured: pct(ratio),
            met: ratio >= 0.6,
        });
    }
    if !ng.is_empty() {
        let lost: u64 = ng.iter().filter_map(|f| f.lost).sum();
        checks.push(Check {
            target: "NG loses nothing".into(),
            measured: format!("{lost} lost"),
            met: lost == 0,
        });
    }
    if let Some(open) = ng.iter().find(|f| f.mode.starts_with("open"))
        && let Some(drain) = open.drain_s
    {
        checks.push(Check {
            target: "NG drains ≤ 1 s after load at 80 % of sustainable".into(),
            measured: format!("{drain:.2} s"),
            met: drain <= 1.0,
        });
    }
    // Idle: each process before its first load (later "idle" figures include what the
    // allocator kept from earlier loads). Full load: small-body figures only.
    let mut first_idle: Vec<(&str, f64)> = Vec::new();
    let mut peak: f64 = 0.0;
    let mut worst_peak = String::new();
    for f in figures {
        for p in f.processes.iter().filter(|p| p.name != "mosquitto") {
            if !first_idle.iter().any(|(name, _)| *name == p.name) {
                first_idle.push((&p.name, p.rss_idle_mib));
            }
            if f.body_bytes < 64 << 10 && p.rss_peak_mib > peak {
                peak = p.rss_peak_mib;
                worst_peak.clone_from(&p.name);
            }
        }
    }
    let (worst_idle, idle) = first_idle
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default();
    let worst = (worst_idle.to_owned(), worst_peak);
    if peak > 0.0 {
        checks.push(Check {
            target: "every service ≤ 20 MiB idle".into(),
            measured: format!("{idle:.1} MiB at most ({})", worst.0),
            met: idle <= 20.0,
        });
        checks.push(Check {
            target: "every service ≤ 64 MiB at full load (small bodies)".into(),
            measured: format!("{peak:.1} MiB at most ({})", worst.1),
            met: peak <= 64.0,
        });
    }
    checks
}

/// The report as a text table.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "{:<30} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>6} {:>6} {:<24} {:>7} {:>5}\n",
        "figure",
        "rate/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "ceiling",
        "upstream",
        "lost",
        "drain",
        "busiest service",
        "gen CPU",
        "steal"
    );
    for f in &report.figures {
        let rate = f.delivered_rate.unwrap_or(f.rate);
        let opt = |v: Option<f64>, fmt: &dyn Fn(f64) -> String| v.map_or("-".into(), fmt);
        let busiest = f
            .processes
            .iter()
            .max_by(|a, b| a.cores.total_cmp(&b.cores))
            .map_or("-".into(), |p| {
                format!("{} {:.0}% {:.0}M", p.name, p.cores * 100.0, p.rss_peak_mib)
            });
        out.push_str(&format!(
            "{:<30} {:>9.0} {:>7.2} {:>7.2} {:>7.1} {:>7} {:>8} {:>6} {:>6} {:<24} {:>6.0}% {:>4.0}%\n",
            f.name,
            rate,
            f.p50_ms,
            f.p99_ms,
            f.max_ms,
            opt(f.ratio, &|r| format!("{:.0}%", r * 100.0)),
            opt(f.vs_upstream, &|r| format!("{r:.1}×")),
            f.lost.map_or("-".into(), |l| l.to_string()),
            opt(f.drain_s, &|d| format!("{d:.2}s")),
            busiest,
            f.generator.cores * 100.0,
            f.steal * 100.0,
        ));
        if f.errors > 0 {
            out.push_str(&format!(
                "  {} errors, first: {}\n",
                f.errors,
                f.first_error.as_deref().unwrap_or("?")
            ));
        }
    }
    let steal = report.figures.iter().map(|f| f.steal).fold(0.0, f64::max);
    if steal > 0.05 {
        out.push_str(&format!(
            "note: the hypervisor took up to {:.0} % of this machine's CPU time during a figure \
             (steal); such figures understate what the code does\n",
            steal * 100.0
        ));
    }
    out.push('\n');
    for c in &report.checks {
        out.push_str(&format!(
            "[{}] {}: {}\n",
            if c.met { "met" } else { "MISSED" },
            c.target,
            c.measured
        ));
    }
    out
}
