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
mod chains;
mod checks;
pub mod edge;
pub mod generator;
mod held;
mod http;
mod key;
mod nginx;
pub mod procstat;
mod table;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::BrokerChoice;
use crate::quantile::p50_p99_max_ms;
use crate::signals::interruption;
use crate::supervisor::Supervisor;
use crate::topology::{Health, Program, ServiceSpec};
use generator::{LoadResult, LoadSpec, Mode, Protocol, Target};
pub use key::{Hop, Key};
use procstat::{ProcessFigures, Watched, Window};
pub use table::{markdown, table};

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
    /// nginx in ars-comp-2's place: measured with `relay` when nginx is installed.
    #[value(skip)]
    Nginx,
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
    /// The relay's connection-scaling curve: connection counts measured besides
    /// `connections` (HTTP/1.1, small body, each against `direct` at the same count).
    pub curve: Vec<usize>,
    /// Idle keep-alive connections the relay is asked to hold open at once (0: none).
    pub held: usize,
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
    /// What was measured (its `Display` is `name`).
    #[serde(skip)]
    pub key: Key,
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
    pub mode: Mode,
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
    /// A second comparison that is not a ceiling: for `relay http1`, nginx in the
    /// relay's place; for h2c, HTTP/1.1 through the relay at the same concurrency.
    pub versus: Option<String>,
    /// `rate` over the `versus` figure's.
    pub versus_ratio: Option<f64>,
    /// Share of the machine's CPU time the hypervisor stole meanwhile (0..1).
    pub steal: f64,
    /// The load generator (this process).
    pub generator: ProcessFigures,
    /// The services.
    pub processes: Vec<ProcessFigures>,
}

/// How a load was shaped: the figure's columns that come from its spec.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Generator protocol (none when the generator is not ours).
    pub protocol: Option<Protocol>,
    /// Connections (or clients).
    pub connections: usize,
    /// Request body or payload, bytes.
    pub body_bytes: usize,
    /// Closed or open loop.
    pub mode: Mode,
}

impl Shape {
    /// The shape of one of our HTTP loads.
    pub fn of(spec: &LoadSpec) -> Self {
        Self {
            protocol: Some(spec.protocol),
            connections: spec.connections,
            body_bytes: spec.body.len(),
            mode: spec.mode,
        }
    }
}

/// What a load did in its measured window, whoever generated it.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Measured seconds.
    pub seconds: f64,
    /// Acknowledged (or delivered) in the window.
    pub ok: u64,
    /// Failures.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// p50, p99 and max latency, ms.
    pub latency_ms: [f64; 3],
}

impl From<&LoadResult> for Outcome {
    fn from(result: &LoadResult) -> Self {
        Self {
            seconds: result.elapsed.as_secs_f64(),
            ok: result.ok,
            errors: result.errors,
            first_error: result.first_error.clone(),
            latency_ms: p50_p99_max_ms(&result.latencies_us),
        }
    }
}

impl Figure {
    /// The figure `key` measured: `shape` of the load, its `outcome`, and what the
    /// window `measured` besides. Comparisons are added with [`Figure::against`].
    pub fn new(key: Key, shape: Shape, outcome: Outcome, measured: Measured) -> Self {
        let seconds = outcome.seconds;
        Self {
            scenario: key.scenario(),
            name: key.to_string(),
            key,
            protocol: shape.protocol,
            connections: shape.connections,
            body_bytes: shape.body_bytes,
            mode: shape.mode,
            seconds,
            ok: outcome.ok,
            errors: outcome.errors,
            first_error: outcome.first_error,
            rate: if seconds > 0.0 {
                outcome.ok as f64 / seconds
            } else {
                0.0
            },
            p50_ms: outcome.latency_ms[0],
            p99_ms: outcome.latency_ms[1],
            max_ms: outcome.latency_ms[2],
            delivered_rate: None,
            lost: None,
            drain_s: None,
            ceiling: None,
            ratio: None,
            upstream: None,
            vs_upstream: None,
            versus: None,
            versus_ratio: None,
            steal: measured.steal,
            generator: measured.generator,
            processes: measured.processes,
        }
    }

    /// A figure of one of our HTTP loads.
    fn of_load(key: Key, spec: &LoadSpec, result: &LoadResult, measured: Measured) -> Self {
        Self::new(key, Shape::of(spec), Outcome::from(result), measured)
    }

    /// Records what this figure is compared with; [`rebase`] computes the ratios once the
    /// reported figures are known.
    fn against(mut self, ceiling: Option<&Figure>, upstream: Option<f64>) -> Self {
        self.ceiling = ceiling.map(|c| c.name.clone());
        self.upstream = upstream;
        self
    }

    /// Records the second comparison (see [`Figure::versus`]).
    fn versus(mut self, other: Option<&Figure>) -> Self {
        self.versus = other.map(|o| o.name.clone());
        self
    }

    /// The rate compared with ceilings: NG counts what arrived, the rest what was
    /// acknowledged.
    fn compared_rate(&self) -> f64 {
        self.delivered_rate.unwrap_or(self.rate)
    }
}

/// The figure measured as `key`.
fn find<'a>(figures: &'a [Figure], key: &Key) -> Option<&'a Figure> {
    figures.iter().find(|f| &f.key == key)
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
    /// Figures not measured, and why (e.g. nginx not installed).
    pub skipped: Vec<Skipped>,
    /// What the run changed or clamped (e.g. the open-files limit).
    pub notes: Vec<String>,
}

/// A figure this run did not measure.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The figure, e.g. `nginx-as-relay http1 c50`.
    pub figure: String,
    /// Why.
    pub reason: String,
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
pub struct Measured {
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
        skipped: Vec::new(),
        notes: Vec::new(),
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
        // Every round skips and notes the same.
        report.skipped = figures.skipped;
        report.notes = figures.notes;
        measured.push(figures.figures);
    }
    report.figures = median(measured);
    rebase(&mut report.figures);
    report.checks = checks::checks(&report.figures, most);
    let path = options.out.join("bench.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let path = options.out.join("bench.md");
    std::fs::write(&path, markdown(&report))
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
        http::run(options, report, most, stop).await?;
    }
    if wants(Scenario::Legacy) {
        chains::legacy(options, report, most, stop).await?;
    }
    if wants(Scenario::Broker) || wants(Scenario::Ng) {
        chains::ng(options, report, most, stop).await?;
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
    first
        .iter()
        .filter_map(|figure| {
            let mut all: Vec<&Figure> = rounds
                .iter()
                .filter_map(|round| find(round, &figure.key))
                .collect();
            all.sort_by(|a, b| match a.mode {
                Mode::Closed => a.compared_rate().total_cmp(&b.compared_rate()),
                Mode::Open(_) => a.p99_ms.total_cmp(&b.p99_ms),
            });
            all.get(all.len() / 2).map(|f| (*f).clone())
        })
        .collect()
}

/// Ratios to the ceilings, to the `versus` figures and to upstream, from the figures
/// finally reported, and each process's CPU per request.
fn rebase(figures: &mut [Figure]) {
    let rates: Vec<(String, f64)> = figures
        .iter()
        .map(|f| (f.name.clone(), f.compared_rate()))
        .collect();
    let rate_of = |name: &Option<String>| {
        let name = name.as_ref()?;
        rates.iter().find(|(n, _)| n == name).map(|(_, r)| *r)
    };
    for f in figures.iter_mut() {
        let rate = f.compared_rate();
        f.ratio = rate_of(&f.ceiling).map(|base| rate / base.max(1e-9));
        f.versus_ratio = rate_of(&f.versus)
            .filter(|base| *base > 0.0)
            .map(|base| rate / base);
        if let Some(upstream) = f.upstream {
            f.vs_upstream = Some(rate / upstream);
        }
        // Held connections are idle: there is no per-request cost to speak of.
        let ops = rate * f.seconds;
        if ops > 0.0 && !matches!(f.key, Key::Held { .. }) {
            for p in f.processes.iter_mut().chain([&mut f.generator]) {
                p.cpu_us_per_op = Some(p.cpu_s * 1e6 / ops);
            }
        }
    }
}

fn progress(name: &str) {
    eprintln!("bench: {name} …");
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Seconds from `end_us` to `last_us` (0 when nothing arrived after the end).
fn seconds_after(last_us: u64, end_us: u64) -> f64 {
    last_us.saturating_sub(end_us) as f64 / 1e6
}
