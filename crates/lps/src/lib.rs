//! The LPS command line.
//!
//! `lps up <topology>` runs a topology as local processes on 127.0.0.1 with the compose
//! wiring and ports, prints the entry URLs, and stops everything on Ctrl-C, SIGTERM or
//! SIGHUP (a closed terminal); its services die with it whatever kills it. Every service
//! is this executable re-run as `lps service <program>`, so `cargo run -p lps` is all a
//! machine with the Rust toolchain needs.

pub mod analyze;
pub mod bench;
pub mod dead_letters;
pub mod duration;
pub mod experiment;
pub mod faults;
pub mod load;
pub mod records;
pub mod signals;
pub mod stale;
pub mod supervisor;
pub mod topology;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::supervisor::Supervisor;
use crate::topology::{Broker, Options, Program, ServiceSpec, Topology};

/// The control socket of an `lps up`, in its run folder (see [`faults::serve_control`]).
pub const CONTROL_SOCKET: &str = "control.sock";

/// The repository's Mosquitto configuration, compiled in for runs outside the repository.
const MOSQUITTO_CONF: &str = include_str!("../../../mosquitto/mosquitto.conf");

/// Which broker the NG topology uses (`--broker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// Mosquitto when installed, else the embedded broker.
    Auto,
    /// Mosquitto from `PATH`, started for the run with `mosquitto/mosquitto.conf`.
    Mosquitto,
    /// The embedded broker (the `lps-broker` crate), started for the run.
    Embedded,
    /// A broker already running at this host and port.
    External(String, u16),
}

impl std::str::FromStr for BrokerChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "mosquitto" => Ok(Self::Mosquitto),
            "embedded" => Ok(Self::Embedded),
            other => {
                let rest = other.strip_prefix("mqtt://").ok_or_else(|| {
                    format!("{other:?}: expected auto, embedded, mosquitto or mqtt://HOST:PORT")
                })?;
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{other:?}: expected mqtt://HOST:PORT"))?;
                let port = port
                    .parse()
                    .map_err(|_| format!("{other:?}: {port:?} is not a port"))?;
                Ok(Self::External(
                    host.trim_matches(['[', ']']).to_owned(),
                    port,
                ))
            }
        }
    }
}

/// A fresh run folder `runs/<UTC timestamp>-<topology>` (or `out`).
pub fn run_dir(out: Option<PathBuf>, topology: Topology) -> anyhow::Result<PathBuf> {
    let dir = out.unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{}-{topology}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
        ))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Starts every service of `topology`; on failure, or when `stop` fires meanwhile, stops
/// what was started (in order) and fails.
pub async fn start(
    topology: Topology,
    options: &Options,
    broker: &BrokerChoice,
    dir: &std::path::Path,
    stop: &CancellationToken,
) -> anyhow::Result<Supervisor> {
    let specs = plan(topology, options, broker, dir)?;
    launch(specs, dir, stop).await
}

/// The services of `topology` with `broker`, in start order (writes the Mosquitto
/// configuration of the run).
fn plan(
    topology: Topology,
    options: &Options,
    broker: &BrokerChoice,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<ServiceSpec>> {
    let broker = match (topology, broker) {
        (Topology::Legacy, _) => None,
        (Topology::Ng, BrokerChoice::External(host, port)) => Some(Broker::External {
            host: host.clone(),
            port: *port,
        }),
        (Topology::Ng, BrokerChoice::Embedded) => Some(Broker::Embedded {
            data: dir.join("broker"),
        }),
        (Topology::Ng, BrokerChoice::Auto) if lps_common::mqtt::mosquitto_binary().is_none() => {
            eprintln!("Mosquitto is not installed; using the embedded broker");
            Some(Broker::Embedded {
                data: dir.join("broker"),
            })
        }
        (Topology::Ng, BrokerChoice::Mosquitto | BrokerChoice::Auto) => {
            if lps_common::mqtt::mosquitto_binary().is_none() {
                anyhow::bail!(
                    "Mosquitto is not installed: apt-get install mosquitto, or pass --broker embedded or mqtt://HOST:PORT"
                );
            }
            Some(Broker::Mosquitto {
                config: dir.join("broker").join("mosquitto.conf"),
            })
        }
    };
    let specs = topology::services(topology, options, broker.as_ref());
    if let Some(Broker::Mosquitto { config }) = &broker
        && let Some(spec) = specs.iter().find(|s| s.program == Program::Mosquitto)
    {
        write_mosquitto_config(config, spec.port)?;
    }
    Ok(specs)
}

/// Starts `specs` in order, each once healthy; see [`start`].
async fn launch(
    specs: Vec<ServiceSpec>,
    dir: &std::path::Path,
    stop: &CancellationToken,
) -> anyhow::Result<Supervisor> {
    let mut supervisor = Supervisor::new(dir)?;
    for spec in specs {
        let name = spec.name.clone();
        // A service interrupted before it was healthy is killed (dropping its child does).
        let started = tokio::select! {
            started = supervisor.start(spec) => started.context(format!("starting {name}")),
            () = stop.cancelled() => Err(anyhow::anyhow!(
                "{} while starting {name}; stopped what was started",
                signals::interruption()
            )),
        };
        if let Err(e) = started {
            if stop.is_cancelled() {
                eprintln!(
                    "{} while starting: stopping the {} services started so far",
                    signals::interruption(),
                    supervisor.running().len()
                );
            }
            supervisor.stop_all(Duration::from_secs(5)).await;
            return Err(e);
        }
    }
    Ok(supervisor)
}

/// Writes the broker configuration for a run: the repository's `mosquitto/mosquitto.conf`
/// (the copy in the working directory when there is one) on `port`, persisting next to it.
fn write_mosquitto_config(path: &std::path::Path, port: u16) -> anyhow::Result<()> {
    let dir = path.parent().context("broker folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = std::fs::read_to_string("mosquitto/mosquitto.conf")
        .unwrap_or_else(|_| MOSQUITTO_CONF.to_owned());
    let dir = std::fs::canonicalize(dir)?;
    let as_root = nix::unistd::geteuid().is_root();
    let config = lps_common::mqtt::mosquitto_config(&base, port, &dir, &[], as_root);
    std::fs::write(path, config).with_context(|| format!("writing {}", path.display()))
}

/// `lps up`: start, print the entry URLs, wait for `stop` (Ctrl-C, SIGTERM, SIGHUP), stop.
/// Ports still held by services an earlier `lps up` left behind are named, or freed first
/// with `replace` (see [`stale`]).
pub async fn up(
    topology: Topology,
    options: Options,
    broker: BrokerChoice,
    out: Option<PathBuf>,
    replace: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let dir = run_dir(out, topology)?;
    let specs = plan(topology, &options, &broker, &dir)?;
    let ports: Vec<u16> = specs.iter().map(|s| s.port).collect();
    signals::or_interrupted(&stop, stale::make_room(&ports, replace)).await?;
    let supervisor = launch(specs, &dir, &stop).await?;
    println!(
        "{topology} topology is up; logs in {}",
        supervisor.logs().display()
    );
    for service in supervisor.running() {
        let role = if service.spec.entry { "entry" } else { "" };
        println!(
            "  {:<16} {:<32} {role}",
            service.spec.name,
            service.base_url()
        );
    }
    if let Some(edge) = supervisor
        .running()
        .iter()
        .find(|s| s.spec.program == Program::LpsEdge)
    {
        let env = |key: &str| {
            edge.spec
                .env
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if env("WS_ENABLED") != Some("false") {
            println!(
                "edge: MQTT over WebSocket at ws://127.0.0.1:{}/mqtt",
                edge.spec.port
            );
        }
        println!(
            "edge: forward proxy at http://127.0.0.1:{}",
            env("PROXY_PORT").unwrap_or("3128")
        );
    }
    if let Some(entry) = supervisor.running().iter().find(|s| s.spec.entry) {
        println!(
            "try: curl -X POST -H 'Content-Type: application/json' -d '{{\"phone\":\"015142611148\",\"branch\":\"2001\",\"headnumber\":\"8023\",\"triggertime\":\"2025-01-31T12:00:00Z\"}}' {}/api/v1/simple",
            entry.base_url()
        );
    }
    let socket = dir.join(CONTROL_SOCKET);
    println!(
        "faults: lps fault --run {} --faults chain --scale 0.2",
        dir.display()
    );
    println!("press Ctrl-C to stop");
    let logs = supervisor.logs().to_owned();
    let supervisor = std::sync::Arc::new(tokio::sync::Mutex::new(supervisor));
    let control = tokio::spawn(faults::serve_control(
        socket,
        supervisor.clone(),
        stop.clone(),
    ));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                for (name, status) in supervisor.lock().await.exited() {
                    eprintln!("warning: {name} exited ({status}); see {}", logs.display());
                }
            }
        }
    }
    println!("{}: stopping…", signals::interruption());
    if let Ok(Err(e)) = control.await {
        eprintln!("warning: {e:#}");
    }
    supervisor
        .lock()
        .await
        .stop_all(Duration::from_secs(15))
        .await;
    println!("stopped; logs in {}", dir.join("logs").display());
    Ok(())
}

/// `lps service embedded-broker`: the embedded MQTT broker as a process of its own. Port
/// from `MQTT_PORT`, storage folder from `BROKER_DATA`, logging like the services;
/// SIGTERM/SIGINT stop it.
pub fn embedded_broker_main() -> std::process::ExitCode {
    use lps_common::config::{Env, ProcessEnv};
    let env = Env::new(&ProcessEnv);
    let port = env
        .number("MQTT_PORT", 1883u16, 1, u16::MAX)
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    let data = PathBuf::from(env.string("BROKER_DATA", "broker-data"));
    let telemetry = lps_common::telemetry::TelemetryConfig::from_env(&env, "embedded-broker")
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    lps_common::service::main(&telemetry, async move {
        lps_broker::run(port, data, lps_common::server::shutdown_on_signals()).await
    })
}
