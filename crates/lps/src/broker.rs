//! The NG topology's broker: the `--broker` choice, what it resolves to for a run, the
//! Mosquitto configuration written for the run, and the embedded broker's entry point.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::topology::{Broker, Topology};

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

/// The broker `choice` resolves to for a run of `topology` in `dir` (none for the baseline).
pub(crate) fn resolve(
    topology: Topology,
    choice: &BrokerChoice,
    dir: &Path,
) -> anyhow::Result<Option<Broker>> {
    Ok(match (topology, choice) {
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
    })
}

/// Writes the broker configuration for a run: the repository's `mosquitto/mosquitto.conf`
/// (the copy in the working directory when there is one) on `port`, persisting next to it.
pub(crate) fn write_mosquitto_config(path: &Path, port: u16) -> anyhow::Result<()> {
    let dir = path.parent().context("broker folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = std::fs::read_to_string("mosquitto/mosquitto.conf")
        .unwrap_or_else(|_| MOSQUITTO_CONF.to_owned());
    let dir = std::fs::canonicalize(dir)?;
    let as_root = nix::unistd::geteuid().is_root();
    let config = lps_common::mqtt::mosquitto_config(&base, port, &dir, &[], as_root);
    std::fs::write(path, config).with_context(|| format!("writing {}", path.display()))
}

/// `lps service embedded-broker`: the embedded MQTT broker as a process of its own. Port
/// from `MQTT_PORT`, storage folder from `BROKER_DATA`, logging like the services;
/// SIGTERM/SIGINT stop it.
pub fn embedded_broker_main() -> std::process::ExitCode {
    use lps_common::config::{Env, ProcessEnv};
    let env = Env::new(&ProcessEnv);
    let port = env
        .number(lps_common::config::ENV_MQTT_PORT, 1883u16, 1, u16::MAX)
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    let data = PathBuf::from(env.string(lps_common::config::ENV_BROKER_DATA, "broker-data"));
    let telemetry = lps_common::telemetry::TelemetryConfig::from_env(&env, "embedded-broker")
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    lps_common::service::main(&telemetry, async move {
        lps_broker::run(port, data, lps_common::server::shutdown_on_signals()).await
    })
}
