//! The local topologies: which services run, on which ports, wired how.
//!
//! Ports and names follow the compose files (SPEC §5), shifted by an offset so that
//! several runs (or tests) can share a machine:
//! baseline `ars-comp-1-{1,2,3}` on 7081-7083, each → its own `ars-comp-2-{1,2,3}` on
//! 8081-8083, all → `ars-comp-3` (the simulator) on 8084.

use std::fmt;

/// Which topology to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    /// The baseline chain: ars-comp-1 → ars-comp-2 → simulator.
    Legacy,
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Legacy => "legacy",
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
}

impl Program {
    /// The name used on the command line and for the binary.
    pub fn name(self) -> &'static str {
        match self {
            Self::ArsComp1 => "ars-comp-1",
            Self::ArsComp2 => "ars-comp-2",
            Self::RastSimulator => "rast-simulator",
        }
    }
}

/// One service process of a topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name (compose service name; also `SERVICE_NAME`).
    pub name: String,
    /// What it runs.
    pub program: Program,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Whether clients talk to it (printed as an entry URL).
    pub entry: bool,
}

/// Options shaping a topology.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Added to every compose port.
    pub port_offset: u16,
    /// Use free ports the system picks instead of the compose ports (tests, parallel runs).
    pub ephemeral_ports: bool,
    /// Simulator arguments, e.g. `["-m", "fixed", "--workers", "4"]`.
    pub simulator_args: Vec<String>,
    /// `USE_HTTP_2` between ars-comp-1 and the next hop.
    pub http2: bool,
}

/// The services of `topology`, in start order (backend first).
pub fn services(topology: Topology, options: &Options) -> Vec<ServiceSpec> {
    let mut ephemeral = std::collections::HashMap::new();
    let mut port = |p: u16| {
        if options.ephemeral_ports {
            *ephemeral.entry(p).or_insert_with(free_port)
        } else {
            p + options.port_offset
        }
    };
    let sim_port = port(8084);
    let mut specs = vec![ServiceSpec {
        name: "ars-comp-3".into(),
        program: Program::RastSimulator,
        port: sim_port,
        env: vec![],
        args: options.simulator_args.clone(),
        entry: false,
    }];
    match topology {
        Topology::Legacy => {
            for i in 1..=3u16 {
                specs.push(ServiceSpec {
                    name: format!("ars-comp-2-{i}"),
                    program: Program::ArsComp2,
                    port: port(8080 + i),
                    env: vec![(
                        "TARGET_URL".into(),
                        format!("http://127.0.0.1:{sim_port}/ID_REQ_KC_STORE7D3BPACKET"),
                    )],
                    args: vec![],
                    entry: false,
                });
            }
            for i in 1..=3u16 {
                specs.push(ServiceSpec {
                    name: format!("ars-comp-1-{i}"),
                    program: Program::ArsComp1,
                    port: port(7080 + i),
                    env: vec![
                        (
                            "TARGET_URL".into(),
                            format!(
                                "http://127.0.0.1:{}/ID_REQ_KC_STORE7D3BPACKET",
                                port(8080 + i)
                            ),
                        ),
                        ("USE_HTTP_2".into(), options.http2.to_string()),
                    ],
                    args: vec![],
                    entry: true,
                });
            }
        }
    }
    specs
}

/// A port that was free a moment ago (the system's pick for port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_wiring_matches_compose() {
        let specs = services(Topology::Legacy, &Options::default());
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ars-comp-3",
                "ars-comp-2-1",
                "ars-comp-2-2",
                "ars-comp-2-3",
                "ars-comp-1-1",
                "ars-comp-1-2",
                "ars-comp-1-3"
            ]
        );
        let ac1_2 = &specs[5];
        assert_eq!(ac1_2.port, 7082);
        assert_eq!(
            ac1_2.env[0].1,
            "http://127.0.0.1:8082/ID_REQ_KC_STORE7D3BPACKET"
        );
        assert_eq!(specs[0].port, 8084);
        let shifted = services(
            Topology::Legacy,
            &Options {
                port_offset: 100,
                ..Options::default()
            },
        );
        assert_eq!(
            shifted[1].env[0].1,
            "http://127.0.0.1:8184/ID_REQ_KC_STORE7D3BPACKET"
        );
    }
}
