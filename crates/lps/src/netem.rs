//! Network emulation of a local run (`--netem[=PROFILE]`): a shaping relay
//! ([`lps_netem`], run as `lps service lps-netem`) on every connection a shaped service
//! makes or accepts, so a local run sees the network upstream's `tc` made.
//!
//! Upstream shaped the *egress* of every service container but the simulator and the
//! broker (`docker-compose-netem.yml`: ars-comp-1, ars-comp-2, legacy-proxy-1,
//! legacy-proxy-2). Over loopback, a connection from a client A to a server B carries A's
//! egress one way and B's egress the other, so its relay shapes client → server when A is
//! shaped and server → client when B is. Per topology:
//!
//! | hop | client → server | server → client |
//! |---|---|---|
//! | load → ars-comp-1 (the entry port) | no | shaped |
//! | ars-comp-1 → ars-comp-2 / legacy-proxy-1 | shaped | shaped |
//! | legacy-proxy-1, legacy-proxy-2 → broker | shaped | no |
//! | legacy-proxy-2 → ars-comp-2 | shaped | shaped |
//! | ars-comp-2 → simulator | shaped | no |
//!
//! Each relay has its own token bucket per direction, where upstream's service had one
//! per interface for all its connections: a service with two peers gets twice the rate.
//! At upstream's 5 Mbit/s and alarms of a few hundred bytes the rate is never what limits
//! a run; the delay is (README.adoc, "Network emulation").
//!
//! The entry keeps its port: ars-comp-1 moves to a port of its own and the relay takes
//! its place, so clients, `lps load` and the printed URLs do not change.

use lps_common::net::free_port;
use lps_netem::Profile;

use crate::topology::{Health, Program, ServiceSpec};

/// Whether upstream shaped this program's container.
fn shaped(program: Program) -> bool {
    matches!(
        program,
        Program::ArsComp1 | Program::ArsComp2 | Program::LegacyProxy1 | Program::LegacyProxy2
    )
}

/// Where relays and moved entries listen. With the compose ports, fixed neighbours of the
/// service's own port, so a run's ports stay predictable: the entry ars-comp-1-1 (7081)
/// moves to 27081; its relay to the next hop listens on 47081, and a service's relay to
/// the broker on 3xxxx (legacy-proxy-1-1, 8081: 38081). With ephemeral ports, free ones.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// A moved entry service.
    Entry = 20_000,
    /// A relay to the broker.
    Broker = 30_000,
    /// A relay to an HTTP target.
    Target = 40_000,
}

impl Slot {
    /// How the relay's name ends: `netem-<service>-in` (before an entry), `-mqtt` (to the
    /// broker), `-out` (to the next HTTP hop).
    fn suffix(self) -> &'static str {
        match self {
            Self::Entry => "in",
            Self::Broker => "mqtt",
            Self::Target => "out",
        }
    }
}

fn port_for(slot: Slot, own: u16, ephemeral: bool) -> u16 {
    if ephemeral {
        free_port()
    } else {
        own.checked_add(slot as u16)
            .unwrap_or_else(|| panic!("port {own} has no netem neighbour below 65536"))
    }
}

/// `specs` (in start order, as [`crate::topology::services`] gives them) with a relay in
/// front of every shaped connection, shaping with `profile`. Relays start before the
/// services that connect through them.
pub fn shape(specs: Vec<ServiceSpec>, profile: &Profile, ephemeral: bool) -> Vec<ServiceSpec> {
    let by_port: std::collections::HashMap<u16, Program> =
        specs.iter().map(|s| (s.port, s.program)).collect();
    let mut out = Vec::with_capacity(specs.len() * 2);
    for mut spec in specs {
        let client_shaped = shaped(spec.program);
        // Outgoing connections: HTTP targets and the broker.
        for (key, value) in &mut spec.env {
            let Some((slot, target, rewrite)) = outgoing(key, value) else {
                continue;
            };
            let Some(&server) = by_port.get(&target) else {
                continue;
            };
            let server_shaped = shaped(server);
            if !client_shaped && !server_shaped {
                continue;
            }
            let listen = port_for(slot, spec.port, ephemeral);
            let relay_name = format!("netem-{}-{}", spec.name, slot.suffix());
            out.push(relay(
                relay_name,
                listen,
                target,
                profile,
                client_shaped,
                server_shaped,
            ));
            *value = rewrite(listen);
        }
        // The entry: the load generator is not shaped, ars-comp-1 is.
        if spec.entry && client_shaped {
            let public = spec.port;
            let own = port_for(Slot::Entry, public, ephemeral);
            spec.port = own;
            spec.entry = false;
            let name = format!("netem-{}-{}", spec.name, Slot::Entry.suffix());
            out.push(spec);
            let mut entry = relay(name, public, own, profile, false, true);
            entry.entry = true;
            out.push(entry);
            continue;
        }
        out.push(spec);
    }
    out
}

/// Points a variable at a relay's port.
type Rewrite = Box<dyn Fn(u16) -> String>;

/// The target port of an outgoing-connection variable, and how to point it at a relay.
fn outgoing(key: &str, value: &str) -> Option<(Slot, u16, Rewrite)> {
    match key {
        lps_common::config::ENV_TARGET_URL => {
            let rest = value.strip_prefix("http://127.0.0.1:")?;
            let (port, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let port: u16 = port.parse().ok()?;
            let path = path.to_owned();
            Some((
                Slot::Target,
                port,
                Box::new(move |p| format!("http://127.0.0.1:{p}{path}")),
            ))
        }
        lps_common::config::ENV_MQTT_PORT => Some((
            Slot::Broker,
            value.parse().ok()?,
            Box::new(|p| p.to_string()),
        )),
        _ => None,
    }
}

/// A relay listening on `listen`, relaying to `target` on 127.0.0.1.
fn relay(
    name: String,
    listen: u16,
    target: u16,
    profile: &Profile,
    forward: bool,
    reverse: bool,
) -> ServiceSpec {
    let side = |on: bool| {
        if on {
            profile.spec()
        } else {
            Profile::none().spec()
        }
    };
    ServiceSpec {
        env: vec![
            (
                lps_netem::config::ENV_LISTEN.to_owned(),
                format!("127.0.0.1:{listen}"),
            ),
            (
                lps_netem::config::ENV_TARGET.to_owned(),
                format!("127.0.0.1:{target}"),
            ),
            (lps_netem::config::ENV_PROFILE.to_owned(), side(forward)),
            (
                lps_netem::config::ENV_REVERSE_PROFILE.to_owned(),
                side(reverse),
            ),
        ],
        name,
        program: Program::LpsNetem,
        port: listen,
        args: Vec::new(),
        entry: false,
        health: Health::Tcp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Broker, Options, Topology, services};

    fn relays(specs: &[ServiceSpec]) -> Vec<(String, String, String, String)> {
        let env = |s: &ServiceSpec, k: &str| {
            s.env
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        specs
            .iter()
            .filter(|s| s.program == Program::LpsNetem)
            .map(|s| {
                (
                    s.name.clone(),
                    env(s, lps_netem::config::ENV_TARGET),
                    env(s, lps_netem::config::ENV_PROFILE),
                    env(s, lps_netem::config::ENV_REVERSE_PROFILE),
                )
            })
            .collect()
    }

    #[test]
    fn every_connection_of_a_shaped_service_goes_through_a_relay_shaping_its_side() {
        let profile: Profile = "delay=30ms".parse().unwrap();
        let shaped = profile.spec();
        let none = Profile::none().spec();
        let options = Options {
            netem: Some(profile),
            ..Options::default()
        };
        let broker = Broker::Mosquitto {
            config: "/run/m.conf".into(),
        };
        let specs = services(Topology::Ng, &options, Some(&broker));
        let relays = relays(&specs);
        let find = |name: &str| {
            relays
                .iter()
                .find(|r| r.0 == name)
                .unwrap_or_else(|| panic!("{name} in {relays:?}"))
                .clone()
        };
        // The entry keeps its port; ars-comp-1 moves.
        let entry = specs
            .iter()
            .find(|s| s.name == "netem-ars-comp-1-1-in")
            .unwrap();
        assert!(entry.entry && entry.port == 7081);
        let ac1 = specs.iter().find(|s| s.name == "ars-comp-1-1").unwrap();
        assert!(!ac1.entry && ac1.port == 27081);
        assert_eq!(find("netem-ars-comp-1-1-in").1, "127.0.0.1:27081");
        assert_eq!(
            (
                find("netem-ars-comp-1-1-in").2,
                find("netem-ars-comp-1-1-in").3
            ),
            (none.clone(), shaped.clone())
        );
        // Both ends shaped: ars-comp-1 → legacy-proxy-1, legacy-proxy-2 → ars-comp-2.
        for name in ["netem-ars-comp-1-2-out", "netem-proxy2-3-out"] {
            assert_eq!(
                (find(name).2, find(name).3),
                (shaped.clone(), shaped.clone()),
                "{name}"
            );
        }
        assert_eq!(find("netem-proxy2-3-out").1, "127.0.0.1:9083");
        // To the broker and the simulator, unshaped: only the client's side.
        for name in [
            "netem-proxy1-1-mqtt",
            "netem-proxy2-2-mqtt",
            "netem-ars-comp-2-1-out",
        ] {
            assert_eq!(
                (find(name).2, find(name).3),
                (shaped.clone(), none.clone()),
                "{name}"
            );
        }
        assert_eq!(find("netem-proxy1-1-mqtt").1, "127.0.0.1:1883");
        let proxy1 = specs.iter().find(|s| s.name == "proxy1-1").unwrap();
        assert!(
            proxy1
                .env
                .contains(&("MQTT_PORT".to_owned(), "38081".to_owned()))
        );
        // 3 entries, 3 + 3 + 3 HTTP hops, 6 broker clients; the broker and simulator take none.
        assert_eq!(relays.len(), 18);
        // Every relay starts before the service that connects through it, after its target.
        for (i, spec) in specs.iter().enumerate() {
            for (_, value) in &spec.env {
                if let Some(port) = value
                    .strip_prefix("http://127.0.0.1:")
                    .and_then(|r| r.split('/').next())
                    .and_then(|p| p.parse::<u16>().ok())
                    .or_else(|| {
                        (spec.program != Program::LpsNetem && value.len() == 5)
                            .then(|| value.parse().ok())
                            .flatten()
                    })
                {
                    if let Some(j) = specs.iter().position(|s| s.port == port) {
                        assert!(j < i, "{} starts after {}", specs[j].name, spec.name);
                    }
                }
            }
        }
        assert!(
            relays
                .iter()
                .all(|r| !r.0.contains("ars-comp-3") && !r.0.contains("mosquitto"))
        );
    }

    #[test]
    fn without_netem_nothing_changes() {
        let legacy = services(Topology::Legacy, &Options::default(), None);
        assert!(legacy.iter().all(|s| s.program != Program::LpsNetem));
        let shaped = services(
            Topology::Legacy,
            &Options {
                netem: Some(Profile::default()),
                ..Options::default()
            },
            None,
        );
        // 3 entries, 3 ars-comp-1 → ars-comp-2, 3 ars-comp-2 → simulator.
        assert_eq!(relays(&shaped).len(), 9);
    }
}
