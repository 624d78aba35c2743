//! The `lps` command line: the clap types ([`Cli`], [`Command`] and the arguments of each
//! subcommand) and one function per subcommand that runs it (`up`, `load`, `experiment`,
//! ...), which `main` dispatches to.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::BrokerChoice;
use crate::bench::{BenchOptions, Scenario};
use crate::compose::{Compose, DEFAULT_COMPOSE_COMMAND};
use crate::control::{CONTROL_SOCKET, Control};
use crate::dead_letters::DeadLettersArgs;
use crate::duration::parse as duration;
use crate::experiment::{ComposeSetup, Experiment, Platform};
use crate::faults::Schedule;
use crate::load::{LoadConfig, Shape};
use crate::supervisor::Signal;
use crate::topology::{Options, Program, Topology};
use crate::{records, signals};

/// LPS: run the Legacy Proxy System topologies locally, load them, break them, compare them.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by the commands that start a topology.
#[derive(Debug, Args)]
pub struct TopologyArgs {
    /// ars-comp-1 and legacy-proxy-2 send h2c to their next hop.
    #[arg(long)]
    http2: bool,
    /// NG broker: auto (Mosquitto when installed, else embedded), embedded, mosquitto, or mqtt://HOST:PORT.
    #[arg(long, default_value = "auto")]
    broker: BrokerChoice,
    /// Simulator options, e.g. --sim-arg=-m --sim-arg=fixed.
    #[arg(long = "sim-arg", allow_hyphen_values = true)]
    sim_args: Vec<String>,
    /// Network emulation on every hop upstream shaped: `--netem` is upstream's profile
    /// (30 ms ± 3 ms, 5 Mbit/s, 0.01 % loss); `--netem=lan`, `--netem=none`, or a list such
    /// as `--netem=delay=30ms,jitter=3ms,rate=5mbit,burst=18kb,loss=0.01%`.
    #[arg(long, value_name = "PROFILE", num_args = 0..=1, require_equals = true, default_missing_value = "upstream")]
    netem: Option<lps_netem::Profile>,
}

/// The alarm load.
#[derive(Debug, Args)]
pub struct AlarmLoadArgs {
    /// Closed-loop users (upstream's failover load is 1).
    #[arg(long, default_value_t = 10, conflicts_with_all = ["rate", "steps"])]
    users: u32,
    /// Open loop: new alarms per second instead of users.
    #[arg(long)]
    rate: Option<f64>,
    /// Performance steps: 250·k users per step (see --step-*).
    #[arg(long)]
    steps: bool,
    /// Users added per step.
    #[arg(long, default_value_t = 250)]
    step_users: u32,
    /// Time per step: 60, 60s, 1m, 1m30s, 500ms (a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1m")]
    step_secs: Duration,
    /// Pause after a step: 60, 60s, 1m, 1m30s, 500ms (a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1m")]
    pause_secs: Duration,
    /// At most this many steps.
    #[arg(long, default_value_t = 10)]
    max_steps: u32,
    /// Load time (users and rate): 60, 60s, 1m, 1m30s, 500ms (a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1m")]
    duration: Duration,
    /// Background users sending one non-alarm command per second to the simulator.
    #[arg(long, default_value_t = 0)]
    background_users: u32,
}

impl AlarmLoadArgs {
    fn shape(&self) -> Shape {
        if let Some(rate) = self.rate {
            Shape::Rate(rate)
        } else if self.steps {
            Shape::Steps {
                step_users: self.step_users,
                step: self.step_secs,
                pause: self.pause_secs,
                max_steps: self.max_steps,
            }
        } else {
            Shape::Users(self.users)
        }
    }
}

/// Faults and the drain.
#[derive(Debug, Args)]
pub struct FaultsAndDrainArgs {
    /// Fault schedule.
    #[arg(long, value_enum, default_value = "none")]
    faults: Schedule,
    /// Multiply every fault time by this (upstream's times: 1.0).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Stop services with SIGTERM (graceful) instead of SIGKILL (local; compose always
    /// uses `compose stop`).
    #[arg(long)]
    graceful: bool,
    /// How long to wait for the backlog to drain after the load: 120, 2m, 90s (a bare
    /// number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "2m")]
    drain_timeout: Duration,
}

/// The compose command.
#[derive(Debug, Args)]
pub struct ComposeCommand {
    /// The compose command, e.g. "docker compose" or docker-compose.
    #[arg(long, env = "LPS_COMPOSE", default_value = DEFAULT_COMPOSE_COMMAND)]
    compose_command: String,
}

/// Running an experiment against a compose topology instead of local processes.
#[derive(Debug, Args)]
pub struct ComposeArgs {
    /// Run against this compose file (docker-compose-legacy.yml, docker-compose-ng.yml) on
    /// the compose host ports instead of as local processes; repeat it for overrides
    /// (passed as one -f each, in order), e.g. --compose docker-compose-ng.yml --compose
    /// docker-compose-netem.yml (which shapes with tc; `--netem` is for local runs).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["broker", "sim_args", "netem"])]
    compose: Vec<PathBuf>,
    #[command(flatten)]
    command: ComposeCommand,
    /// Clean start: `down -v` before `up` (compose).
    #[arg(long, requires = "compose")]
    clean: bool,
    /// Leave the compose topology running afterwards, also after Ctrl-C (no `down`).
    #[arg(long, requires = "compose")]
    keep_up: bool,
    /// How long to wait after `up` for the entry services and the simulator (compose): 300,
    /// 5m, 90s (a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "5m")]
    ready_timeout: Duration,
}

impl ComposeArgs {
    fn platform(&self) -> anyhow::Result<Platform> {
        if self.compose.is_empty() {
            return Ok(Platform::Local);
        }
        Ok(Platform::Compose(ComposeSetup {
            compose: Compose::new(&self.command.compose_command, self.compose.clone())?,
            clean: self.clean,
            keep_up: self.keep_up,
            ready_timeout: self.ready_timeout,
        }))
    }
}

/// The subcommands, each run by the function of the same name in this module.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a topology as local processes on 127.0.0.1 with the compose ports; Ctrl-C,
    /// SIGTERM or SIGHUP (a closed terminal) stops it, and its services die with it whatever
    /// kills it.
    Up(UpArgs),
    /// Send the alarm-device workload to running entry services and write a client ledger.
    Load(LoadArgs),
    /// Start a topology (local processes, or --compose FILE...), load it (with faults), wait
    /// for the drain, stop, analyze. Ctrl-C stops the topology (compose: `down`, unless
    /// --keep-up).
    Experiment(ExperimentArgs),
    /// The baseline and the NG experiment back to back under the same load and faults, and a
    /// side-by-side report.
    Demo(DemoArgs),
    /// Inject a fault schedule into a running `lps up` (--run) or a compose topology (--compose).
    Fault(FaultArgs),
    /// Analyze run folders (one per topology) into summary.json, CSV files and report.html.
    Analyze(AnalyzeArgs),
    /// Run upstream's experiment matrix ({legacy, NG} × {failover, steps} × {faults, none}
    /// × {netem, none}; NG under netem with windows 1 and 32) and write one report that
    /// puts each of upstream's findings next to ours.
    Reproduce(ReproduceArgs),
    /// Measure every hop next to its ceiling (throughput, latency, CPU, memory); writes
    /// bench.json and prints a table.
    Bench(BenchArgs),
    /// List or replay legacy-proxy-2's dead letters (retained on the broker).
    DeadLetters(DeadLettersArgs),
    /// Run one service in the foreground (what `up` starts for each process).
    #[command(hide = true)]
    Service(ServiceArgs),
}

/// The arguments of `lps up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Which topology.
    topology: Topology,
    /// Run folder for logs (default runs/<timestamp>-<topology>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Added to every port (7081-7083, 8081-8084, ...), to run beside something else.
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// Use free ports (below the kernel's ephemeral range) instead of the compose ports.
    #[arg(long, conflicts_with = "port_offset")]
    ephemeral_ports: bool,
    /// Stop the services an earlier `lps up` left behind on these ports first (without
    /// it, `lps up` names them and the command that stops them).
    #[arg(long)]
    replace: bool,
    /// Also run the edge (lps-edge): MQTT over WebSocket into the NG broker on 8000
    /// (ws://127.0.0.1:8000/mqtt) and the HTTP forward proxy on 3128.
    #[arg(long)]
    edge: bool,
    #[command(flatten)]
    topology_args: TopologyArgs,
}

/// The arguments of `lps load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Entry base URLs in rotation order.
    #[arg(long = "entry", default_values = ["http://127.0.0.1:7081", "http://127.0.0.1:7082", "http://127.0.0.1:7083"])]
    entries: Vec<String>,
    /// Alarm devices instead: each user publishes its alarms at QoS 2 over MQTT over
    /// WebSocket to this URL (the edge, e.g. ws://127.0.0.1:8000/mqtt); repeat it for
    /// a rotation. Writes run.json too, for `lps analyze`.
    #[arg(long, value_name = "URL", conflicts_with_all = ["entries", "http2"])]
    mqtt_ws: Vec<String>,
    #[command(flatten)]
    load: AlarmLoadArgs,
    /// Simulator base URL for the background workload.
    #[arg(long)]
    background: Option<String>,
    /// Send h2c instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Folder for client_ledger.jsonl (default runs/<timestamp>-load).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The arguments of `lps experiment`.
#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// Which topology.
    topology: Topology,
    #[command(flatten)]
    compose: ComposeArgs,
    #[command(flatten)]
    topology_args: TopologyArgs,
    #[command(flatten)]
    load: AlarmLoadArgs,
    #[command(flatten)]
    faults: FaultsAndDrainArgs,
    /// Run folder (default runs/<timestamp>-<topology>).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The arguments of `lps demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Load time for each topology: 40, 40s, 1m30s (a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "40s")]
    duration: Duration,
    /// Closed-loop users.
    #[arg(long, default_value_t = 10)]
    users: u32,
    /// Background users sending one non-alarm command per second to the simulator.
    #[arg(long, default_value_t = 20)]
    background_users: u32,
    /// Fault schedule, scaled to fit the load time.
    #[arg(long, value_enum, default_value = "all")]
    faults: Schedule,
    /// Stop services with SIGTERM (graceful) instead of SIGKILL.
    #[arg(long)]
    graceful: bool,
    #[command(flatten)]
    topology_args: TopologyArgs,
    /// Run folder (default runs/<timestamp>-demo).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The arguments of `lps fault`.
#[derive(Debug, Args)]
pub struct FaultArgs {
    /// The run folder of an `lps up` (its control socket); faults.jsonl goes there.
    #[arg(long, required_unless_present = "compose", conflicts_with = "compose")]
    run: Option<PathBuf>,
    /// A compose file: services are stopped and started with `docker compose`; repeat it
    /// for the overrides the topology was started with (one -f each, in order).
    #[arg(long, value_name = "FILE")]
    compose: Vec<PathBuf>,
    #[command(flatten)]
    compose_command: ComposeCommand,
    /// Fault schedule.
    #[arg(long, value_enum, default_value = "chain")]
    faults: Schedule,
    /// Multiply every fault time by this (upstream's times: 1.0).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Stop services with SIGTERM (graceful) instead of SIGKILL (local mode).
    #[arg(long)]
    graceful: bool,
    /// Folder for faults.jsonl in compose mode (default runs/<timestamp>-faults).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The arguments of `lps reproduce`.
#[derive(Debug, Args)]
pub struct ReproduceArgs {
    /// The CI scale: the whole matrix in about three minutes (default: about 15 minutes).
    #[arg(long)]
    quick: bool,
    /// NG broker: auto, mosquitto, embedded or mqtt://HOST:PORT.
    #[arg(long, default_value = "auto")]
    broker: BrokerChoice,
    /// Output folder: one run folder per experiment and the report (default
    /// runs/<timestamp>-reproduce).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The arguments of `lps analyze`.
#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Run folders.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where to write the report (default: the first run folder).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The arguments of `lps bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Scenarios (default: all but edge, which needs nginx and wrk). Ceilings a
    /// scenario is compared with run too.
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Time measured per figure: 5, 5s, 500ms, 1m (a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "5s")]
    duration: Duration,
    /// Unmeasured load before each figure: 1, 1s, 500ms (a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1s")]
    warmup: Duration,
    /// Connection counts.
    #[arg(long, value_delimiter = ',', default_values_t = [8, 50])]
    connections: Vec<usize>,
    /// Relay payload sizes: bytes, or with a k/m suffix (KiB/MiB).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_values = ["1k", "16k", "128k", "1m"])]
    sizes: Vec<usize>,
    /// The relay's connection-scaling curve: connection counts measured besides
    /// --connections (HTTP/1.1, small body, each against direct at the same count).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 50, 200, 1000])]
    curve: Vec<usize>,
    /// Idle keep-alive connections the relay holds open at once, measuring its memory (0:
    /// skip). Clamped, with a note, to what the open-files limit allows.
    #[arg(long, default_value_t = 10_000)]
    held: usize,
    /// NG broker: auto (Mosquitto when installed, else embedded), embedded, mosquitto, or mqtt://HOST:PORT.
    #[arg(long, default_value = "auto")]
    broker: BrokerChoice,
    /// How long NG may take to deliver what it acknowledged: 30, 30s, 2m (a bare number is
    /// seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "30s")]
    drain_timeout: Duration,
    /// Measure everything this many times and report the median of each figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run folder (default runs/<timestamp>-bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The arguments of `lps service`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Which service.
    program: Program,
    /// Its arguments.
    #[arg(last = true)]
    args: Vec<String>,
}

/// `1024`, `16k`, `1m` (binary units).
fn parse_size(text: &str) -> Result<usize, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (digits, unit) = match lower.strip_suffix('k') {
        Some(d) => (d, 1 << 10),
        None => match lower.strip_suffix('m') {
            Some(d) => (d, 1 << 20),
            None => (lower.as_str(), 1),
        },
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text:?}: expected a size such as 1024, 16k or 1m"))
}

fn options(args: &TopologyArgs) -> Options {
    Options {
        ephemeral_ports: true,
        simulator_args: args.sim_args.clone(),
        http2: args.http2,
        netem: args.netem.clone(),
        ..Options::default()
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .inspect_err(|e| eprintln!("error: cannot start the runtime: {e}"))
        .ok()
}

/// Runs `work`, which starts nothing that could outlive it: Ctrl-C just ends the process.
fn block_on(work: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `work` with a token that SIGINT, SIGTERM and SIGHUP fire (installed before `work`
/// starts anything), which `work` answers by stopping what it started. A failure after such
/// a signal exits with 128 + its number (130 for Ctrl-C).
fn block_on_stoppable<F>(work: impl FnOnce(CancellationToken) -> F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async { work(signals::stop_on_signals()?).await });
    // An interrupted analysis may still run on a blocking thread: do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            signals::exit_code().map_or(ExitCode::FAILURE, ExitCode::from)
        }
    }
}

/// `lps service`: runs one service in the foreground.
pub fn service(args: ServiceArgs) -> ExitCode {
    match args.program {
        Program::ArsComp1 => ars_comp_1::main(),
        Program::ArsComp2 => ars_comp_2::main(),
        Program::RastSimulator => {
            rast_simulator::main(std::iter::once("rast-simulator".to_owned()).chain(args.args))
        }
        Program::LegacyProxy1 => legacy_proxy_1::main(),
        Program::LegacyProxy2 => legacy_proxy_2::main(),
        Program::EmbeddedBroker => crate::embedded_broker_main(),
        Program::LpsEdge => lps_edge::main(),
        Program::LpsNetem => lps_netem::main(),
        Program::Mosquitto => {
            eprintln!("error: mosquitto is an external program; run it directly");
            ExitCode::FAILURE
        }
    }
}

/// `lps up`: starts a topology and keeps it up until a signal.
pub fn up(args: UpArgs) -> ExitCode {
    let UpArgs {
        topology,
        out,
        port_offset,
        ephemeral_ports,
        replace,
        edge,
        topology_args,
    } = args;
    let options = Options {
        port_offset,
        ephemeral_ports,
        edge,
        ..options(&topology_args)
    };
    block_on_stoppable(|stop| {
        crate::up(topology, options, topology_args.broker, out, replace, stop)
    })
}

/// `lps load`: sends the alarm workload and writes the client ledger.
pub fn load(args: LoadArgs) -> ExitCode {
    let LoadArgs {
        entries,
        mqtt_ws,
        load,
        background,
        http2,
        out,
    } = args;
    block_on_stoppable(|stop| async move {
        let dir = out.unwrap_or_else(|| crate::up::default_run_dir("load"));
        std::fs::create_dir_all(&dir)?;
        let devices = !mqtt_ws.is_empty();
        let config = LoadConfig {
            entries: if devices { mqtt_ws } else { entries },
            shape: load.shape(),
            duration: load.duration,
            wait: Duration::from_secs(1),
            http2,
            background_users: if background.is_some() {
                load.background_users.max(1)
            } else {
                0
            },
            background,
            finish_within: Duration::from_secs(30),
            ledger: dir.join(records::CLIENT_LEDGER),
            progress: true,
        };
        let report = crate::load::run(config.clone(), stop).await?;
        if devices && crate::load::write_run_info(&dir, "ng", &config, &report)? {
            println!("run.json: {}", dir.join(records::RUN_INFO).display());
        }
        println!("{}", report.table());
        println!(
            "client ledger: {}",
            dir.join(records::CLIENT_LEDGER).display()
        );
        Ok(())
    })
}

/// `lps experiment`: starts, loads, breaks, drains, stops and analyzes one topology.
pub fn experiment(args: ExperimentArgs) -> ExitCode {
    let ExperimentArgs {
        topology,
        compose,
        topology_args,
        load,
        faults,
        out,
    } = args;
    block_on_stoppable(|stop| async move {
        let experiment = Experiment {
            topology,
            platform: compose.platform()?,
            broker: topology_args.broker.clone(),
            options: options(&topology_args),
            shape: load.shape(),
            duration: load.duration,
            background_users: load.background_users,
            faults: faults.faults,
            scale: faults.scale,
            graceful: faults.graceful,
            drain_timeout: faults.drain_timeout,
            bridge_window: None,
            out: out.unwrap_or_else(|| crate::up::default_run_dir(&topology.to_string())),
        };
        let dir = crate::experiment::run(&experiment, &stop).await?;
        let runs = vec![dir.clone()];
        let out = dir.clone();
        let summaries = signals::blocking_or_interrupted(
            &stop,
            &format!(
                "the run is complete; `lps analyze {}` makes its report",
                dir.display()
            ),
            move || crate::analyze::write_report(&runs, &out),
        )
        .await?;
        println!("{}", crate::analyze::table(&summaries));
        println!("report: {}", dir.join("report.html").display());
        Ok(())
    })
}

/// `lps reproduce`: upstream's experiment matrix and the findings report.
pub fn reproduce(args: ReproduceArgs) -> ExitCode {
    block_on_stoppable(|stop| async move {
        let reproduce = crate::reproduce::Reproduce {
            scale: if args.quick {
                crate::reproduce::Scale::quick()
            } else {
                crate::reproduce::Scale::full()
            },
            broker: args.broker,
            out: args
                .out
                .unwrap_or_else(|| crate::up::default_run_dir("reproduce")),
        };
        crate::reproduce::run(&reproduce, &stop).await?;
        Ok(())
    })
}

/// `lps demo`: the baseline and the NG experiment back to back, and their report.
pub fn demo(args: DemoArgs) -> ExitCode {
    let DemoArgs {
        duration,
        users,
        background_users,
        faults,
        graceful,
        topology_args,
        out,
    } = args;
    block_on_stoppable(|stop| async move {
        let out = out.unwrap_or_else(|| crate::up::default_run_dir("demo"));
        // Fit the whole fault schedule (planned for the NG services, the longer one) into
        // 80 % of the load time.
        let ng: Vec<String> = crate::topology::services(Topology::Ng, &Options::default(), None)
            .into_iter()
            .map(|s| s.name)
            .collect();
        let scale = crate::faults::scale_to_fit(faults, &ng, duration.as_secs_f64() * 0.8);
        let template = Experiment {
            topology: Topology::Legacy,
            platform: Platform::Local,
            broker: topology_args.broker.clone(),
            options: options(&topology_args),
            shape: Shape::Users(users),
            duration,
            background_users,
            faults,
            scale,
            graceful,
            drain_timeout: Duration::from_secs(60),
            bridge_window: None,
            out: out.clone(),
        };
        crate::experiment::demo(&template, &out, &stop).await?;
        Ok(())
    })
}

/// `lps fault`: injects a fault schedule into a running `lps up` or compose topology.
pub fn fault(args: FaultArgs) -> ExitCode {
    let FaultArgs {
        run,
        compose,
        compose_command,
        faults,
        scale,
        graceful,
        out,
    } = args;
    block_on_stoppable(|stop| async move {
        let signal = if graceful {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        if !compose.is_empty() {
            let target = Compose::new(&compose_command.compose_command, compose)?;
            target.check().await?;
            let dir = out.unwrap_or_else(|| crate::up::default_run_dir("faults"));
            std::fs::create_dir_all(&dir)?;
            let services = target.services().await?;
            crate::faults::run(faults, scale, &services, &target, signal, &dir, stop).await
        } else {
            let dir = run.unwrap_or_default();
            let target = Control {
                socket: dir.join(CONTROL_SOCKET),
            };
            let services = target.services().await?;
            crate::faults::run(faults, scale, &services, &target, signal, &dir, stop).await
        }
    })
}

/// `lps bench`: measures every hop next to its ceiling.
pub fn bench(args: BenchArgs) -> ExitCode {
    block_on_stoppable(|stop| async move {
        let scenarios = if args.scenarios.is_empty() {
            <Scenario as clap::ValueEnum>::value_variants()
                .iter()
                .copied()
                .filter(|s| *s != Scenario::Edge)
                .collect()
        } else {
            args.scenarios
        };
        let options = BenchOptions {
            scenarios,
            duration: args.duration,
            warmup: args.warmup,
            connections: args.connections,
            sizes: args.sizes,
            curve: args.curve,
            held: args.held,
            broker: args.broker,
            drain_timeout: args.drain_timeout,
            out: args
                .out
                .unwrap_or_else(|| crate::up::default_run_dir("bench")),
            rounds: args.rounds,
        };
        let report = crate::bench::run(&options, &stop).await?;
        println!("{}", crate::bench::table(&report));
        println!("figures: {}", options.out.join("bench.json").display());
        println!("markdown: {}", options.out.join("bench.md").display());
        Ok(())
    })
}

/// `lps dead-letters`: lists or replays legacy-proxy-2's dead letters.
pub fn dead_letters(args: DeadLettersArgs) -> ExitCode {
    block_on(crate::dead_letters::run(args))
}

/// `lps analyze`: writes the report of run folders.
pub fn analyze(args: AnalyzeArgs) -> ExitCode {
    let AnalyzeArgs { runs, out } = args;
    block_on(async move {
        let out = out.unwrap_or_else(|| runs[0].clone());
        let summaries = crate::analyze::write_report(&runs, &out)?;
        println!("{}", crate::analyze::table(&summaries));
        println!("report: {}", out.join("report.html").display());
        Ok(())
    })
}
