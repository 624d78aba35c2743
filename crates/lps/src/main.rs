use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use lps::experiment::Experiment;
use lps::faults::Schedule;
use lps::load::{LoadConfig, Shape};
use lps::topology::{Options, Program, Topology};

/// LPS: run the Legacy Proxy System topologies locally, load them, break them, compare them.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by the commands that start a topology.
#[derive(Debug, Args)]
struct TopologyArgs {
    /// ars-comp-1 and legacy-proxy-2 send h2c to their next hop.
    #[arg(long)]
    http2: bool,
    /// NG broker: auto (Mosquitto when installed, else embedded), embedded, mosquitto, or mqtt://HOST:PORT.
    #[arg(long, default_value = "auto")]
    broker: lps::BrokerChoice,
    /// Simulator options, e.g. --sim-arg=-m --sim-arg=fixed.
    #[arg(long = "sim-arg", allow_hyphen_values = true)]
    sim_args: Vec<String>,
}

/// The alarm load.
#[derive(Debug, Args)]
struct LoadArgs {
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
    /// Seconds per step.
    #[arg(long, default_value_t = 60.0)]
    step_secs: f64,
    /// Seconds of pause after a step.
    #[arg(long, default_value_t = 60.0)]
    pause_secs: f64,
    /// At most this many steps.
    #[arg(long, default_value_t = 10)]
    max_steps: u32,
    /// Seconds of load (users and rate).
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Background users sending one non-alarm command per second to the simulator.
    #[arg(long, default_value_t = 0)]
    background_users: u32,
}

impl LoadArgs {
    fn shape(&self) -> Shape {
        if let Some(rate) = self.rate {
            Shape::Rate(rate)
        } else if self.steps {
            Shape::Steps {
                step_users: self.step_users,
                step: Duration::from_secs_f64(self.step_secs),
                pause: Duration::from_secs_f64(self.pause_secs),
                max_steps: self.max_steps,
            }
        } else {
            Shape::Users(self.users)
        }
    }
}

/// Faults and the drain.
#[derive(Debug, Args)]
struct FaultArgs {
    /// Fault schedule.
    #[arg(long, value_enum, default_value = "none")]
    faults: Schedule,
    /// Multiply every fault time by this (upstream's times: 1.0).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Stop services with SIGTERM (graceful) instead of SIGKILL.
    #[arg(long)]
    graceful: bool,
    /// Seconds to wait for the backlog to drain after the load.
    #[arg(long, default_value_t = 120.0)]
    drain_timeout: f64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a topology as local processes on 127.0.0.1 with the compose ports; Ctrl-C stops it.
    Up {
        /// Which topology.
        topology: Topology,
        /// Run folder for logs (default runs/<timestamp>-<topology>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Added to every port (7081-7083, 8081-8084, ...), to run beside something else.
        #[arg(long, default_value_t = 0)]
        port_offset: u16,
        /// Use free ports picked by the system instead of the compose ports.
        #[arg(long, conflicts_with = "port_offset")]
        ephemeral_ports: bool,
        #[command(flatten)]
        topology_args: TopologyArgs,
    },
    /// Send the alarm-device workload to running entry services and write a client ledger.
    Load {
        /// Entry base URLs in rotation order.
        #[arg(long = "entry", default_values = ["http://127.0.0.1:7081", "http://127.0.0.1:7082", "http://127.0.0.1:7083"])]
        entries: Vec<String>,
        #[command(flatten)]
        load: LoadArgs,
        /// Simulator base URL for the background workload.
        #[arg(long)]
        background: Option<String>,
        /// Send h2c instead of HTTP/1.1.
        #[arg(long)]
        http2: bool,
        /// Folder for client_ledger.jsonl (default runs/<timestamp>-load).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Start a topology, load it (with faults), wait for the drain, stop, analyze.
    Experiment {
        /// Which topology.
        topology: Topology,
        #[command(flatten)]
        topology_args: TopologyArgs,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        faults: FaultArgs,
        /// Run folder (default runs/<timestamp>-<topology>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The baseline and the NG experiment back to back under the same load and faults, and a
    /// side-by-side report.
    Demo {
        /// Seconds of load for each topology.
        #[arg(long, default_value_t = 40.0)]
        duration: f64,
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
    },
    /// Inject a fault schedule into a running `lps up` (--run) or a compose topology (--compose).
    Fault {
        /// The run folder of an `lps up` (its control socket); faults.jsonl goes there.
        #[arg(long, required_unless_present = "compose", conflicts_with = "compose")]
        run: Option<PathBuf>,
        /// A compose file: services are stopped and started with `docker compose`.
        #[arg(long)]
        compose: Option<PathBuf>,
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
    },
    /// Analyze run folders (one per topology) into summary.json, CSV files and report.html.
    Analyze {
        /// Run folders.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where to write the report (default: the first run folder).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run one service in the foreground (what `up` starts for each process).
    #[command(hide = true)]
    Service {
        /// Which service.
        program: Program,
        /// Its arguments.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn timestamped(name: &str) -> PathBuf {
    PathBuf::from("runs").join(format!(
        "{}-{name}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ))
}

fn options(args: &TopologyArgs) -> Options {
    Options {
        ephemeral_ports: true,
        simulator_args: args.sim_args.clone(),
        http2: args.http2,
        ..Options::default()
    }
}

fn block_on(work: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Plans `schedule` for `services` and runs it against `target`, logging to `dir`.
async fn run_faults(
    schedule: Schedule,
    scale: f64,
    services: &[String],
    target: &impl lps::faults::Target,
    signal: lps::supervisor::Signal,
    dir: &std::path::Path,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let plan = lps::faults::plan(schedule, services, scale);
    eprintln!(
        "{} faults over {:.0} s",
        plan.len(),
        lps::faults::span(&plan).as_secs_f64()
    );
    lps::faults::inject(plan, target, signal, dir.join(lps::records::FAULTS), stop).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Service { program, args } => match program {
            Program::ArsComp1 => ars_comp_1::main(),
            Program::ArsComp2 => ars_comp_2::main(),
            Program::RastSimulator => {
                rast_simulator::main(std::iter::once("rast-simulator".to_owned()).chain(args))
            }
            Program::LegacyProxy1 => legacy_proxy_1::main(),
            Program::LegacyProxy2 => legacy_proxy_2::main(),
            Program::EmbeddedBroker => lps::embedded_broker_main(),
            Program::Mosquitto => {
                eprintln!("error: mosquitto is an external program; run it directly");
                ExitCode::FAILURE
            }
        },
        Command::Up {
            topology,
            out,
            port_offset,
            ephemeral_ports,
            topology_args,
        } => {
            let options = Options {
                port_offset,
                ephemeral_ports,
                ..options(&topology_args)
            };
            block_on(lps::up(topology, options, topology_args.broker, out))
        }
        Command::Load {
            entries,
            load,
            background,
            http2,
            out,
        } => block_on(async move {
            let dir = out.unwrap_or_else(|| timestamped("load"));
            std::fs::create_dir_all(&dir)?;
            let config = LoadConfig {
                entries,
                shape: load.shape(),
                duration: Duration::from_secs_f64(load.duration),
                wait: Duration::from_secs(1),
                http2,
                background_users: if background.is_some() {
                    load.background_users.max(1)
                } else {
                    0
                },
                background,
                finish_within: Duration::from_secs(30),
                ledger: dir.join(lps::records::CLIENT_LEDGER),
                progress: true,
            };
            let stop = lps_common::server::shutdown_on_signals();
            let report = lps::load::run(config, stop).await?;
            println!("{}", report.table());
            println!(
                "client ledger: {}",
                dir.join(lps::records::CLIENT_LEDGER).display()
            );
            Ok(())
        }),
        Command::Experiment {
            topology,
            topology_args,
            load,
            faults,
            out,
        } => block_on(async move {
            let experiment = Experiment {
                topology,
                broker: topology_args.broker.clone(),
                options: options(&topology_args),
                shape: load.shape(),
                duration: Duration::from_secs_f64(load.duration),
                background_users: load.background_users,
                faults: faults.faults,
                scale: faults.scale,
                graceful: faults.graceful,
                drain_timeout: Duration::from_secs_f64(faults.drain_timeout),
                out: out.unwrap_or_else(|| timestamped(&topology.to_string())),
            };
            let dir = lps::experiment::run(&experiment).await?;
            let summaries = lps::analyze::write_report(std::slice::from_ref(&dir), &dir)?;
            println!("{}", lps::analyze::table(&summaries));
            println!("report: {}", dir.join("report.html").display());
            Ok(())
        }),
        Command::Demo {
            duration,
            users,
            background_users,
            faults,
            graceful,
            topology_args,
            out,
        } => block_on(async move {
            let out = out.unwrap_or_else(|| timestamped("demo"));
            let load = Duration::from_secs_f64(duration);
            // Fit the whole fault schedule (planned for the NG services, the longer one) into
            // 80 % of the load time.
            let ng: Vec<String> = lps::topology::services(Topology::Ng, &Options::default(), None)
                .into_iter()
                .map(|s| s.name)
                .collect();
            let full = lps::faults::span(&lps::faults::plan(faults, &ng, 1.0)).as_secs_f64();
            let scale = if full > 0.0 {
                duration * 0.8 / full
            } else {
                1.0
            };
            let template = Experiment {
                topology: Topology::Legacy,
                broker: topology_args.broker.clone(),
                options: options(&topology_args),
                shape: Shape::Users(users),
                duration: load,
                background_users,
                faults,
                scale,
                graceful,
                drain_timeout: Duration::from_secs(60),
                out: out.clone(),
            };
            lps::experiment::demo(&template, &out).await?;
            Ok(())
        }),
        Command::Fault {
            run,
            compose,
            faults,
            scale,
            graceful,
            out,
        } => block_on(async move {
            let signal = if graceful {
                lps::supervisor::Signal::SIGTERM
            } else {
                lps::supervisor::Signal::SIGKILL
            };
            let stop = lps_common::server::shutdown_on_signals();
            if let Some(file) = compose {
                let target = lps::faults::Compose { file };
                let dir = out.unwrap_or_else(|| timestamped("faults"));
                std::fs::create_dir_all(&dir)?;
                let services = target.services().await?;
                run_faults(faults, scale, &services, &target, signal, &dir, stop).await
            } else {
                let dir = run.unwrap_or_default();
                let target = lps::faults::Control {
                    socket: dir.join(lps::CONTROL_SOCKET),
                };
                let services = target.services().await?;
                run_faults(faults, scale, &services, &target, signal, &dir, stop).await
            }
        }),
        Command::Analyze { runs, out } => block_on(async move {
            let out = out.unwrap_or_else(|| runs[0].clone());
            let summaries = lps::analyze::write_report(&runs, &out)?;
            println!("{}", lps::analyze::table(&summaries));
            println!("report: {}", out.join("report.html").display());
            Ok(())
        }),
    }
}
