use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lps::topology::{Options, Program, Topology};

/// LPS: run the Legacy Proxy System topologies locally.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// ars-comp-1 sends h2c to the next hop.
        #[arg(long)]
        http2: bool,
        /// NG broker: auto (Mosquitto when installed), mosquitto, or mqtt://HOST:PORT.
        #[arg(long, default_value = "auto")]
        broker: lps::BrokerChoice,
        /// Simulator options, e.g. --sim-arg=-m --sim-arg=fixed.
        #[arg(long = "sim-arg", allow_hyphen_values = true)]
        sim_args: Vec<String>,
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
            http2,
            broker,
            sim_args,
        } => {
            let options = Options {
                port_offset,
                ephemeral_ports,
                simulator_args: sim_args,
                http2,
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(lps::up(topology, options, broker, out)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
