//! The local topologies: which services run, on which ports, wired how.
//!
//! Names, ports and wiring follow the compose files (SPEC §5), shifted by an offset (or
//! replaced by free ports) so that several runs can share a machine:
//!
//! - baseline: `ars-comp-1-{1,2,3}` on 7081-7083, each → its own `ars-comp-2-{1,2,3}` on
//!   8081-8083, all → `ars-comp-3` (the simulator) on 8084;
//! - NG: `ars-comp-1-i` → `proxy1-i` (legacy-proxy-1 on 8081-8083, topic
//!   `proxy<i>/message`) → the broker (1883) → `proxy2-{1,2,3}` (legacy-proxy-2, shared
//!   subscription; admin ports 9091-9093) → `ars-comp-2-i` (9081-9083) → `ars-comp-3`;
//! - with `--edge`, also `edge` (lps-edge): MQTT over WebSocket on 8000 into the NG broker,
//!   and the forward proxy on 3128 (proxy only in the baseline, which has no broker).

use std::fmt;
use std::path::PathBuf;

use lps_common::config::{
    ENV_BROKER_DATA, ENV_MQTT_HOST, ENV_MQTT_PORT, ENV_MQTT_TOPIC, ENV_PROXY_ALLOWED_PORTS,
    ENV_PROXY_PORT, ENV_TARGET_URL, ENV_TOKIO_WORKER_THREADS, ENV_USE_HTTP_2, ENV_WS_ENABLED,
};
use lps_common::net::free_port;
use lps_common::wire::{HEALTHZ_PATH, READYZ_PATH};

/// Which topology to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    /// The baseline chain: ars-comp-1 → ars-comp-2 → simulator.
    Legacy,
    /// The refactored chain with the MQTT bridges and a broker in the middle.
    Ng,
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Legacy => "legacy",
            Self::Ng => "ng",
        })
    }
}

/// The program a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Program {
    /// The entry service.
    #[value(name = "ars-comp-1")]
    ArsComp1,
    /// The relay in front of the backend.
    #[value(name = "ars-comp-2")]
    ArsComp2,
    /// The legacy backend.
    RastSimulator,
    /// The HTTP → MQTT bridge.
    #[value(name = "legacy-proxy-1")]
    LegacyProxy1,
    /// The MQTT → HTTP bridge.
    #[value(name = "legacy-proxy-2")]
    LegacyProxy2,
    /// Mosquitto, an external executable (never run through `lps service`).
    #[value(skip)]
    Mosquitto,
    /// The embedded MQTT broker.
    #[value(name = "embedded-broker")]
    EmbeddedBroker,
    /// The edge: MQTT over WebSocket into the broker, and an HTTP forward proxy.
    #[value(name = "lps-edge")]
    LpsEdge,
    /// A shaping relay of `--netem` (network emulation).
    #[value(name = "lps-netem")]
    LpsNetem,
}

impl Program {
    /// The name used on the command line and for the binary.
    pub fn name(self) -> &'static str {
        match self {
            Self::ArsComp1 => "ars-comp-1",
            Self::ArsComp2 => "ars-comp-2",
            Self::RastSimulator => "rast-simulator",
            Self::LegacyProxy1 => "legacy-proxy-1",
            Self::LegacyProxy2 => "legacy-proxy-2",
            Self::Mosquitto => "mosquitto",
            Self::EmbeddedBroker => "embedded-broker",
            Self::LpsEdge => "lps-edge",
            Self::LpsNetem => "lps-netem",
        }
    }
}

/// How to tell that a service is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// `GET` on this path answers 2xx.
    Http(&'static str),
    /// The port accepts TCP connections.
    Tcp,
}

/// One service process of a topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name (compose service name; also `SERVICE_NAME`).
    pub name: String,
    /// What it runs.
    pub program: Program,
    /// Its port on 127.0.0.1 (HTTP, or MQTT for the broker).
    pub port: u16,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Whether clients talk to it (printed as an entry URL).
    pub entry: bool,
    /// When it counts as started.
    pub health: Health,
}

/// The broker of the NG topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// Mosquitto started by the run, with this configuration file.
    Mosquitto {
        /// The configuration written for this run.
        config: PathBuf,
    },
    /// The embedded broker, started by the run, with its state in this folder.
    Embedded {
        /// Its storage folder.
        data: PathBuf,
    },
    /// A broker that is already running.
    External {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// Options shaping a topology.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Added to every compose port.
    pub port_offset: u16,
    /// Use free ports ([`lps_common::net::free_port`]) instead of the compose ports (tests,
    /// parallel runs).
    pub ephemeral_ports: bool,
    /// Simulator arguments, e.g. `["-m", "fixed", "--workers", "4"]`.
    pub simulator_args: Vec<String>,
    /// `USE_HTTP_2` on the hops that may use it.
    pub http2: bool,
    /// Also run the edge (`lps up --edge`).
    pub edge: bool,
    /// Network emulation (`--netem`): a shaping relay on every shaped hop ([`crate::netem`]).
    pub netem: Option<lps_netem::Profile>,
}

/// The environment of replica `i` of a tier.
type TierEnv<'a> = dyn Fn(&mut Ports<'_>, u16) -> Vec<(&'static str, String)> + 'a;

struct Ports<'a> {
    options: &'a Options,
    taken: std::collections::HashMap<u16, u16>,
}

impl Ports<'_> {
    fn get(&mut self, compose: u16) -> u16 {
        if self.options.ephemeral_ports {
            *self.taken.entry(compose).or_insert_with(free_port)
        } else {
            compose + self.options.port_offset
        }
    }
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/ID_REQ_KC_STORE7D3BPACKET")
}

fn spec(
    name: String,
    program: Program,
    port: u16,
    env: Vec<(&str, String)>,
    entry: bool,
    health: Health,
) -> ServiceSpec {
    ServiceSpec {
        name,
        program,
        port,
        env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        args: Vec::new(),
        entry,
        health,
    }
}

/// The services of a topology as they are added, in start order, with the ports they took.
struct Builder<'a> {
    ports: Ports<'a>,
    specs: Vec<ServiceSpec>,
}

/// The replicas of a tier.
const REPLICAS: u16 = 3;

/// The runtime threads of one replica: the tier's replicas share the machine's cores
/// (`max(1, cores / 3)`; 1 on 2 cores). Tokio's default, a thread per core in every
/// process, puts 30 runtime threads of the NG chain on 2 cores, and each request then
/// wakes threads across processes: measured on 2 cores, NG's CPU per delivered alarm
/// fell from 835 to 624 µs with one thread per replica (BENCHMARKS.md, issue 13).
fn replica_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (cores / usize::from(REPLICAS)).max(1)
}

impl Builder<'_> {
    /// One tier of three replicas: `name-{1,2,3}` on compose ports `base + {1,2,3}`, each
    /// with its share of the cores ([`replica_threads`]).
    fn tier(&mut self, name: &str, program: Program, base: u16, env: &TierEnv<'_>) {
        let (entry, health) = match program {
            Program::ArsComp1 => (true, Health::Http(HEALTHZ_PATH)),
            Program::LegacyProxy1 | Program::LegacyProxy2 => (false, Health::Http(READYZ_PATH)),
            _ => (false, Health::Http(HEALTHZ_PATH)),
        };
        let threads = replica_threads().to_string();
        for i in 1..=REPLICAS {
            let mut env = env(&mut self.ports, i);
            env.push((ENV_TOKIO_WORKER_THREADS, threads.clone()));
            let port = self.ports.get(base + i);
            self.specs.push(spec(
                format!("{name}-{i}"),
                program,
                port,
                env,
                entry,
                health,
            ));
        }
    }

    /// The simulator (`ars-comp-3`) on 8084; returns its port.
    fn simulator(&mut self) -> u16 {
        let port = self.ports.get(8084);
        let mut sim = spec(
            "ars-comp-3".into(),
            Program::RastSimulator,
            port,
            vec![],
            false,
            Health::Http(HEALTHZ_PATH),
        );
        sim.args.clone_from(&self.ports.options.simulator_args);
        self.specs.push(sim);
        port
    }

    /// The NG broker on 1883 when the run starts one; returns where the bridges reach it.
    fn broker(&mut self, broker: Option<&Broker>) -> (String, u16) {
        let local = |port| ("127.0.0.1".to_owned(), port);
        match broker {
            Some(Broker::External { host, port }) => (host.clone(), *port),
            Some(Broker::Mosquitto { config }) => {
                let port = self.ports.get(1883);
                let mut mosquitto = spec(
                    "mosquitto".into(),
                    Program::Mosquitto,
                    port,
                    vec![],
                    false,
                    Health::Tcp,
                );
                mosquitto.args = vec!["-c".into(), config.display().to_string()];
                self.specs.push(mosquitto);
                local(port)
            }
            Some(Broker::Embedded { data }) => {
                let port = self.ports.get(1883);
                let env = vec![
                    (ENV_MQTT_PORT, port.to_string()),
                    (ENV_BROKER_DATA, data.display().to_string()),
                ];
                self.specs.push(spec(
                    "embedded-broker".into(),
                    Program::EmbeddedBroker,
                    port,
                    env,
                    false,
                    Health::Tcp,
                ));
                local(port)
            }
            None => local(self.ports.get(1883)),
        }
    }
}

/// Replica `i`'s `TARGET_URL`: the replica `i` of the tier on compose ports `hop + i`.
fn relay_to(hop: u16) -> impl Fn(&mut Ports<'_>, u16) -> Vec<(&'static str, String)> {
    move |ports, i| vec![(ENV_TARGET_URL, url(ports.get(hop + i)))]
}

/// The services of `topology`, in start order (backend first). `broker` is used by NG.
pub fn services(
    topology: Topology,
    options: &Options,
    broker: Option<&Broker>,
) -> Vec<ServiceSpec> {
    let mut b = Builder {
        ports: Ports {
            options,
            taken: std::collections::HashMap::new(),
        },
        specs: Vec::new(),
    };
    let http2 = || (ENV_USE_HTTP_2, options.http2.to_string());
    let sim_port = b.simulator();
    let to_simulator = |_: &mut Ports<'_>, _| vec![(ENV_TARGET_URL, url(sim_port))];
    // The broker the edge bridges WebSockets to (NG only).
    let mut edge_broker: Option<(String, u16)> = None;
    match topology {
        Topology::Legacy => b.tier("ars-comp-2", Program::ArsComp2, 8080, &to_simulator),
        Topology::Ng => {
            let (mqtt_host, mqtt_port) = b.broker(broker);
            let mqtt = |mut env: Vec<(&'static str, String)>| {
                env.push((ENV_MQTT_HOST, mqtt_host.clone()));
                env.push((ENV_MQTT_PORT, mqtt_port.to_string()));
                env
            };
            b.tier("ars-comp-2", Program::ArsComp2, 9080, &to_simulator);
            b.tier("proxy2", Program::LegacyProxy2, 9090, &|ports, i| {
                let mut env = mqtt(relay_to(9080)(ports, i));
                env.push(http2());
                env
            });
            b.tier("proxy1", Program::LegacyProxy1, 8080, &|_, i| {
                mqtt(vec![(ENV_MQTT_TOPIC, format!("proxy{i}/message"))])
            });
            edge_broker = Some((mqtt_host, mqtt_port));
        }
    }
    // Both topologies end in the entry tier, each replica in front of port 8080 + i
    // (ars-comp-2 in the baseline, legacy-proxy-1 in NG).
    b.tier("ars-comp-1", Program::ArsComp1, 7080, &|ports, i| {
        let mut env = relay_to(8080)(ports, i);
        env.push(http2());
        env
    });
    let Builder {
        mut ports,
        mut specs,
    } = b;
    if options.edge {
        let edge = edge(&mut ports, &specs, edge_broker);
        specs.push(edge);
    }
    match &options.netem {
        Some(profile) => crate::netem::shape(specs, profile, options.ephemeral_ports),
        None => specs,
    }
}

/// The edge (`lps-edge`) on 8000 (WebSocket, `/healthz`) and 3128 (proxy), bridging to
/// `broker`; without one (the baseline) only the proxy runs.
fn edge(
    ports: &mut Ports<'_>,
    specs: &[ServiceSpec],
    broker: Option<(String, u16)>,
) -> ServiceSpec {
    let ws_port = ports.get(8000);
    let proxy_port = ports.get(3128);
    let mut env = vec![(ENV_PROXY_PORT, proxy_port.to_string())];
    match broker {
        Some((host, port)) => {
            env.push((ENV_MQTT_HOST, host));
            env.push((ENV_MQTT_PORT, port.to_string()));
        }
        None => env.push((ENV_WS_ENABLED, "false".to_owned())),
    }
    if ports.options.port_offset != 0 || ports.options.ephemeral_ports {
        // The edge's default allow-list names the compose ports; moved ports are listed.
        let mut allowed: Vec<u16> = vec![80, 443, ws_port];
        allowed.extend(specs.iter().map(|s| s.port));
        allowed.sort_unstable();
        allowed.dedup();
        let allowed: Vec<String> = allowed.iter().map(u16::to_string).collect();
        env.push((ENV_PROXY_ALLOWED_PORTS, allowed.join(",")));
    }
    spec(
        "edge".into(),
        Program::LpsEdge,
        ws_port,
        env,
        false,
        Health::Http(HEALTHZ_PATH),
    )
}

/// The services of the legacy topology, in the order they start (the last hop first).
#[cfg(test)]
pub(crate) const LEGACY_SERVICES: [&str; 7] = [
    "ars-comp-3",
    "ars-comp-2-1",
    "ars-comp-2-2",
    "ars-comp-2-3",
    "ars-comp-1-1",
    "ars-comp-1-2",
    "ars-comp-1-3",
];

#[cfg(test)]
mod tests {
    use super::*;
    use lps_common::config::{
        ENV_MQTT_HOST, ENV_MQTT_PORT, ENV_MQTT_TOPIC, ENV_PROXY_ALLOWED_PORTS, ENV_PROXY_PORT,
        ENV_TARGET_URL, ENV_WS_ENABLED,
    };

    fn env<'a>(spec: &'a ServiceSpec, key: &str) -> &'a str {
        spec.env
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }

    #[test]
    fn legacy_wiring_matches_compose() {
        let specs = services(Topology::Legacy, &Options::default(), None);
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, LEGACY_SERVICES);
        assert_eq!(specs[5].port, 7082);
        assert_eq!(
            env(&specs[5], ENV_TARGET_URL),
            "http://127.0.0.1:8082/ID_REQ_KC_STORE7D3BPACKET"
        );
        assert_eq!(specs[0].port, 8084);
        let shifted = services(
            Topology::Legacy,
            &Options {
                port_offset: 100,
                ..Options::default()
            },
            None,
        );
        assert_eq!(
            env(&shifted[1], ENV_TARGET_URL),
            "http://127.0.0.1:8184/ID_REQ_KC_STORE7D3BPACKET"
        );
    }

    #[test]
    fn ng_wiring_matches_compose() {
        let broker = Broker::Mosquitto {
            config: PathBuf::from("/run/m.conf"),
        };
        let specs = services(Topology::Ng, &Options::default(), Some(&broker));
        let by_name = |n: &str| specs.iter().find(|s| s.name == n).unwrap();
        assert_eq!(by_name("mosquitto").port, 1883);
        assert_eq!(by_name("mosquitto").args, ["-c", "/run/m.conf"]);
        assert_eq!(
            env(by_name("ars-comp-1-2"), ENV_TARGET_URL),
            "http://127.0.0.1:8082/ID_REQ_KC_STORE7D3BPACKET"
        );
        assert_eq!(by_name("proxy1-2").port, 8082);
        assert_eq!(env(by_name("proxy1-2"), ENV_MQTT_TOPIC), "proxy2/message");
        assert_eq!(
            env(by_name("proxy2-3"), ENV_TARGET_URL),
            "http://127.0.0.1:9083/ID_REQ_KC_STORE7D3BPACKET"
        );
        assert_eq!(
            env(by_name("ars-comp-2-3"), ENV_TARGET_URL),
            "http://127.0.0.1:8084/ID_REQ_KC_STORE7D3BPACKET"
        );
        assert_eq!(env(by_name("proxy2-1"), ENV_MQTT_PORT), "1883");
        // Subscribers before publishers: legacy-proxy-1 admits traffic once one answers.
        let position = |n: &str| specs.iter().position(|s| s.name == n).unwrap();
        assert!(position("proxy2-3") < position("proxy1-1"));
        let external = Broker::External {
            host: "mq".into(),
            port: 1999,
        };
        let specs = services(Topology::Ng, &Options::default(), Some(&external));
        assert!(specs.iter().all(|s| s.program != Program::Mosquitto));
        assert!(specs.iter().all(|s| s.program != Program::LpsEdge));
        assert_eq!(
            env(
                specs.iter().find(|s| s.name == "proxy1-1").unwrap(),
                ENV_MQTT_HOST
            ),
            "mq"
        );
    }

    #[test]
    fn the_edge_runs_beside_either_topology_when_asked() {
        let broker = Broker::Mosquitto {
            config: PathBuf::from("/run/m.conf"),
        };
        let with_edge = Options {
            edge: true,
            ..Options::default()
        };
        let specs = services(Topology::Ng, &with_edge, Some(&broker));
        let edge = specs.iter().find(|s| s.name == "edge").unwrap();
        assert_eq!((edge.program, edge.port), (Program::LpsEdge, 8000));
        assert_eq!(env(edge, ENV_PROXY_PORT), "3128");
        assert_eq!(
            (env(edge, ENV_MQTT_HOST), env(edge, ENV_MQTT_PORT)),
            ("127.0.0.1", "1883")
        );
        // Compose ports: the edge's default allow-list covers them.
        assert_eq!(env(edge, ENV_PROXY_ALLOWED_PORTS), "");
        let moved = Options {
            port_offset: 100,
            ..with_edge.clone()
        };
        let specs = services(Topology::Ng, &moved, Some(&broker));
        let edge = specs.iter().find(|s| s.name == "edge").unwrap();
        assert_eq!(env(edge, ENV_PROXY_PORT), "3228");
        let allowed = env(edge, ENV_PROXY_ALLOWED_PORTS);
        for port in ["80", "443", "1983", "7181", "8100", "8184", "9193"] {
            assert!(allowed.split(',').any(|p| p == port), "{port} in {allowed}");
        }
        let legacy = services(Topology::Legacy, &with_edge, None);
        let edge = legacy.iter().find(|s| s.name == "edge").unwrap();
        assert_eq!(env(edge, ENV_WS_ENABLED), "false");
        assert!(
            services(Topology::Legacy, &Options::default(), None)
                .iter()
                .all(|s| s.name != "edge")
        );
    }

    #[test]
    fn replicas_share_the_cores() {
        let threads = replica_threads().to_string();
        for topology in [Topology::Legacy, Topology::Ng] {
            let broker = Broker::External {
                host: "mq".into(),
                port: 1883,
            };
            for spec in services(topology, &Options::default(), Some(&broker)) {
                let expected = if spec.program == Program::RastSimulator {
                    // One process: Tokio's default, a thread per core.
                    ""
                } else {
                    threads.as_str()
                };
                assert_eq!(
                    env(&spec, ENV_TOKIO_WORKER_THREADS),
                    expected,
                    "{}",
                    spec.name
                );
            }
        }
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert_eq!(replica_threads(), (cores / 3).max(1));
    }
}
