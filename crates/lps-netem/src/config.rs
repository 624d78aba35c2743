//! The relay's configuration from the environment (`lps service lps-netem`).

use std::net::SocketAddr;
use std::time::Duration;

use lps_common::config::{ConfigError, Env, Lookup};
use lps_common::telemetry::TelemetryConfig;

use crate::{Options, Profile};

/// `NETEM_LISTEN`: where the relay listens.
pub const ENV_LISTEN: &str = "NETEM_LISTEN";
/// `NETEM_TARGET`: where it relays to.
pub const ENV_TARGET: &str = "NETEM_TARGET";
/// `NETEM_PROFILE`: the shaping of client → target.
pub const ENV_PROFILE: &str = "NETEM_PROFILE";
/// `NETEM_REVERSE_PROFILE`: the shaping of target → client.
pub const ENV_REVERSE_PROFILE: &str = "NETEM_REVERSE_PROFILE";
/// `NETEM_BUFFER_BYTES`: most bytes queued per connection and direction.
pub const ENV_BUFFER_BYTES: &str = "NETEM_BUFFER_BYTES";
/// `NETEM_MAX_CONNECTIONS`: most connections at once.
pub const ENV_MAX_CONNECTIONS: &str = "NETEM_MAX_CONNECTIONS";
/// `NETEM_CONNECT_TIMEOUT_MS`: how long connecting to the target may take.
pub const ENV_CONNECT_TIMEOUT_MS: &str = "NETEM_CONNECT_TIMEOUT_MS";
/// `NETEM_SEED`: seed of the random draws.
pub const ENV_SEED: &str = "NETEM_SEED";

/// The default of `NETEM_PROFILE`.
pub const DEFAULT_PROFILE: &str = "upstream";

const ADDRESS: &str = "an address with a port such as 127.0.0.1:18081";

/// Everything the relay process reads from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `NETEM_LISTEN` (required): address and port to listen on, e.g. `127.0.0.1:18081`
    /// (port 0 picks a free one).
    pub listen: SocketAddr,
    /// `NETEM_TARGET` (required): address and port every connection is relayed to.
    pub target: SocketAddr,
    /// `NETEM_PROFILE` (default `upstream`): client → target shaping, a name (`upstream`,
    /// `lan`, `none`) or a list such as `delay=30ms,jitter=3ms,rate=5mbit,burst=18kb,loss=0.01%,correlation=25%`.
    /// `NETEM_REVERSE_PROFILE` (default: `NETEM_PROFILE`): target → client shaping.
    /// `NETEM_BUFFER_BYTES` (default 262144), `NETEM_MAX_CONNECTIONS` (default 1024),
    /// `NETEM_CONNECT_TIMEOUT_MS` (default 5000), `NETEM_SEED` (default random),
    /// `LISTEN_BACKLOG` (default 4096).
    pub options: Options,
    /// Logging: `SERVICE_NAME` (default `lps-netem`), `LOG`, `LOG_FORMAT`, `LOG_DIR`.
    pub telemetry: TelemetryConfig,
}

impl Config {
    /// Reads the configuration from `lookup`.
    pub fn from_lookup(lookup: &dyn Lookup) -> Result<Self, ConfigError> {
        let env = Env::new(lookup);
        let address = |var: &str| -> Result<SocketAddr, ConfigError> {
            let value = env
                .raw(var)
                .ok_or_else(|| ConfigError::new(var, "", ADDRESS))?;
            value
                .parse()
                .map_err(|_| ConfigError::new(var, &value, ADDRESS))
        };
        let profile = |var: &str, default: &str| -> Result<Profile, ConfigError> {
            let value = env.string(var, default);
            value.parse().map_err(|e: crate::ProfileError| {
                ConfigError::new(var, &value, format!("a network profile ({e})"))
            })
        };
        let forward = profile(ENV_PROFILE, DEFAULT_PROFILE)?;
        let reverse = match env.raw(ENV_REVERSE_PROFILE) {
            Some(_) => profile(ENV_REVERSE_PROFILE, DEFAULT_PROFILE)?,
            None => forward.clone(),
        };
        let seed = match env.raw(ENV_SEED) {
            None => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| ConfigError::new(ENV_SEED, &v, "an unsigned 64-bit integer"))?,
            ),
        };
        Ok(Self {
            listen: address(ENV_LISTEN)?,
            target: address(ENV_TARGET)?,
            options: Options {
                forward,
                reverse,
                buffer_bytes: env.number(ENV_BUFFER_BYTES, 256 * 1024, 4096, 64 << 20)?,
                max_connections: env.number(ENV_MAX_CONNECTIONS, 1024, 1, 1 << 20)?,
                connect_timeout: env
                    .connect_timeout_ms(ENV_CONNECT_TIMEOUT_MS, Duration::from_secs(5))?,
                backlog: env.number("LISTEN_BACKLOG", 4096, 1, 1 << 20)?,
                seed,
            },
            telemetry: TelemetryConfig::from_env(&env, "lps-netem")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(pairs: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        Config::from_lookup(&map)
    }

    #[test]
    fn defaults_to_upstream_both_ways() {
        let c = config(&[(ENV_LISTEN, "127.0.0.1:0"), (ENV_TARGET, "127.0.0.1:8081")]).unwrap();
        assert_eq!(c.options.forward, Profile::upstream());
        assert_eq!(c.options.reverse, Profile::upstream());
        assert_eq!(c.options.buffer_bytes, 256 * 1024);
        assert_eq!(c.telemetry.service_name, "lps-netem");
    }

    #[test]
    fn reverse_profile_overrides() {
        let c = config(&[
            (ENV_LISTEN, "127.0.0.1:0"),
            (ENV_TARGET, "127.0.0.1:8081"),
            (ENV_PROFILE, "lan"),
            (ENV_REVERSE_PROFILE, "none"),
            (ENV_SEED, "42"),
        ])
        .unwrap();
        assert_eq!(c.options.forward, Profile::lan());
        assert_eq!(c.options.reverse, Profile::none());
        assert_eq!(c.options.seed, Some(42));
    }

    #[test]
    fn errors_name_the_variable_value_and_form() {
        let err = config(&[(ENV_LISTEN, "127.0.0.1:0")]).unwrap_err();
        assert_eq!(err.var, ENV_TARGET);
        let err = config(&[(ENV_LISTEN, "localhost"), (ENV_TARGET, "127.0.0.1:1")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: NETEM_LISTEN=\"localhost\": expected an address with a port such as 127.0.0.1:18081"
        );
        let err = config(&[
            (ENV_LISTEN, "127.0.0.1:0"),
            (ENV_TARGET, "127.0.0.1:1"),
            (ENV_PROFILE, "delay=30"),
        ])
        .unwrap_err();
        assert_eq!(err.var, ENV_PROFILE);
        assert!(err.to_string().contains("30ms"), "{err}");
    }
}
