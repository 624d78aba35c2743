//! `lps up` and what `lps experiment`, `lps demo` and `lps bench` share with it: the run
//! folder, the plan of a topology's services, and starting them in order.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BrokerChoice};
use crate::control::{self, CONTROL_SOCKET};
use crate::supervisor::Supervisor;
use crate::topology::{self, Broker, Options, Program, ServiceSpec, Topology};
use crate::{signals, stale};

/// `runs/<UTC timestamp>-<name>`: where a run writes when not told (`--out`).
pub fn default_run_dir(name: &str) -> PathBuf {
    PathBuf::from("runs").join(format!(
        "{}-{name}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ))
}

/// A fresh run folder `runs/<UTC timestamp>-<topology>` (or `out`).
pub fn run_dir(out: Option<PathBuf>, topology: Topology) -> anyhow::Result<PathBuf> {
    let dir = out.unwrap_or_else(|| default_run_dir(&topology.to_string()));
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
pub(crate) fn plan(
    topology: Topology,
    options: &Options,
    broker: &BrokerChoice,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<ServiceSpec>> {
    let broker = broker::resolve(topology, broker, dir)?;
    let specs = topology::services(topology, options, broker.as_ref());
    if let Some(Broker::Mosquitto { config }) = &broker
        && let Some(spec) = specs.iter().find(|s| s.program == Program::Mosquitto)
    {
        broker::write_mosquitto_config(config, spec.port)?;
    }
    Ok(specs)
}

/// Starts `specs` in order, each once healthy; see [`start`].
pub(crate) async fn launch(
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

/// The file in the run folder of an `lps up` that lists its services (a JSON array of
/// [`ServiceEntry`]), for scripts and tests; the table `lps up` prints is for people.
pub const SERVICES_FILE: &str = "services.json";

/// One service of a running topology, as [`SERVICES_FILE`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceEntry {
    /// Its name in the topology (`proxy1-1`, `ars-comp-3`, ...).
    pub name: String,
    /// The program it runs (`legacy-proxy-1`, ...).
    pub program: String,
    /// Its base URL, `http://127.0.0.1:PORT` (`mqtt://` for a broker).
    pub url: String,
    /// Whether clients send alarms here.
    pub entry: bool,
}

/// Writes [`SERVICES_FILE`] into the run folder `dir`.
fn write_services(dir: &std::path::Path, supervisor: &Supervisor) -> anyhow::Result<()> {
    let entries: Vec<ServiceEntry> = supervisor
        .running()
        .iter()
        .map(|s| ServiceEntry {
            name: s.spec.name.clone(),
            program: s.spec.program.name().to_owned(),
            url: s.base_url(),
            entry: s.spec.entry,
        })
        .collect();
    let path = dir.join(SERVICES_FILE);
    std::fs::write(&path, serde_json::to_vec_pretty(&entries)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// What `lps up` prints once the topology runs: each service and its URL, the edge's
/// endpoints, a request to try, how to inject faults and how to stop.
fn print_welcome(topology: Topology, supervisor: &Supervisor, dir: &std::path::Path) {
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
        if env(lps_common::config::ENV_WS_ENABLED) != Some("false") {
            println!(
                "edge: MQTT over WebSocket at ws://127.0.0.1:{}/mqtt",
                edge.spec.port
            );
        }
        println!(
            "edge: forward proxy at http://127.0.0.1:{}",
            env(lps_common::config::ENV_PROXY_PORT).unwrap_or("3128")
        );
    }
    if let Some(entry) = supervisor.running().iter().find(|s| s.spec.entry) {
        println!(
            "try: curl -X POST -H 'Content-Type: application/json' -d '{{\"phone\":\"015142611148\",\"branch\":\"2001\",\"headnumber\":\"8023\",\"triggertime\":\"2025-01-31T12:00:00Z\"}}' {}{}",
            entry.base_url(),
            ars_comp_1::SIMPLE_PATH
        );
    }
    println!(
        "faults: lps fault --run {} --faults chain --scale 0.2",
        dir.display()
    );
    println!("press Ctrl-C to stop");
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
    write_services(&dir, &supervisor)?;
    print_welcome(topology, &supervisor, &dir);
    let logs = supervisor.logs().to_owned();
    let supervisor = std::sync::Arc::new(tokio::sync::Mutex::new(supervisor));
    let socket = dir.join(CONTROL_SOCKET);
    let control = tokio::spawn(control::serve(socket, supervisor.clone(), stop.clone()));
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
