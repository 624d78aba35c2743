//! Typed configuration from the environment.
//!
//! Every service reads its settings through a [`Lookup`] so that tests can pass a map
//! instead of touching the process environment. A bad value yields a [`ConfigError`] that
//! names the variable, the value and the expected form; `main` prints it on one line and
//! exits with [`EXIT_CONFIG`].

use std::collections::HashMap;
use std::fmt::Display;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

/// Exit code for invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// The longest duration any variable accepts: 30 days. Longer values are typing errors,
/// and unbounded ones overflow (`Instant + Duration` and `Duration::from_secs_f64` panic).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where configuration values come from: the process environment or a map in tests.
pub trait Lookup {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Lookup for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Lookup for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl Lookup for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| (*v).to_owned())
    }
}

impl<F: Fn(&str) -> Option<String>> Lookup for F {
    fn get(&self, key: &str) -> Option<String> {
        self(key)
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    /// The environment variable.
    pub var: String,
    /// The value that was found (empty when it was missing).
    pub value: String,
    /// The accepted form, in words.
    pub expected: String,
}

impl ConfigError {
    /// An error for `var` holding `value`, which should have been `expected`.
    pub fn new(var: &str, value: &str, expected: impl Into<String>) -> Self {
        Self {
            var: var.to_owned(),
            value: value.to_owned(),
            expected: expected.into(),
        }
    }
}

/// Typed reads of environment variables with defaults and clear errors.
pub struct Env<'a> {
    lookup: &'a dyn Lookup,
}

impl<'a> Env<'a> {
    /// Reads from `lookup`.
    pub fn new(lookup: &'a dyn Lookup) -> Self {
        Self { lookup }
    }

    /// The raw value of `var`, treating an empty or blank value as unset.
    pub fn raw(&self, var: &str) -> Option<String> {
        self.lookup
            .get(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// The value of `var` exactly as given (spaces kept), if set and not empty.
    pub fn exact(&self, var: &str) -> Option<String> {
        self.lookup.get(var).filter(|v| !v.is_empty())
    }

    /// The first of `vars` that is set.
    pub fn raw_any(&self, vars: &[&str]) -> Option<(String, String)> {
        vars.iter()
            .find_map(|var| self.raw(var).map(|v| ((*var).to_owned(), v)))
    }

    /// A string, or `default`.
    pub fn string(&self, var: &str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_owned())
    }

    /// A value parsed with `FromStr`, or `default`; `expected` describes the form.
    pub fn parse<T>(&self, var: &str, default: T, expected: &str) -> Result<T, ConfigError>
    where
        T: FromStr,
    {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| ConfigError::new(var, &v, expected)),
        }
    }

    /// A number in `min..=max`, or `default`.
    pub fn number<T>(&self, var: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Display + Copy,
    {
        let expected = format!("an integer from {min} to {max}");
        let value: T = self.parse(var, default, &expected)?;
        if value < min || value > max {
            return Err(ConfigError::new(var, &value.to_string(), expected));
        }
        Ok(value)
    }

    /// A flag: `1|true|yes|on` or `0|false|no|off` (any case), or `default`.
    pub fn flag(&self, var: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => {
                parse_flag(&v).ok_or_else(|| ConfigError::new(var, &v, "1|true|yes or 0|false|no"))
            }
        }
    }

    /// A duration in milliseconds from 0 to [`MAX_DURATION`], or `default`.
    pub fn millis(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        self.millis_in(var, default, Duration::ZERO, MAX_DURATION)
    }

    /// A duration in milliseconds in `min..=max`, or `default`.
    pub fn millis_in(
        &self,
        var: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let expected = format!("a number of milliseconds from {} to {}", ms(min), ms(max));
        let value: u64 = self.parse(var, ms(default), &expected)?;
        if value < ms(min) || value > ms(max) {
            return Err(ConfigError::new(var, &value.to_string(), expected));
        }
        Ok(Duration::from_millis(value))
    }

    /// A duration in (possibly fractional) seconds from 0 to [`MAX_DURATION`], or
    /// `default`.
    pub fn seconds(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && (0.0..=MAX_DURATION.as_secs_f64()).contains(s))
                // In range, so this cannot panic (from_secs_f64 does on overflow).
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| {
                    ConfigError::new(
                        var,
                        &v,
                        format!("a number of seconds from 0 to {}", MAX_DURATION.as_secs()),
                    )
                }),
        }
    }
}

/// `1|true|yes|on` → true, `0|false|no|off` → false, case-insensitive.
pub fn parse_flag(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Settings of the inbound HTTP server, shared by every service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `HTTP_HOST`: address to listen on (default `0.0.0.0`).
    pub host: IpAddr,
    /// `HTTP_PORT`: port to listen on (default 8080; the simulator 1337; 0 picks a free one).
    pub port: u16,
    /// `LISTEN_BACKLOG`: accept queue length (default 4096). Too small a queue drops SYNs
    /// silently and clients stall for 1/3/6 s retransmits.
    pub backlog: u32,
    /// `SHUTDOWN_GRACE_SECS`: how long in-flight requests may take after SIGTERM (default 10).
    pub shutdown_grace: Duration,
    /// `MAX_BODY_BYTES`: largest accepted request body (default 4 MiB).
    pub max_body_bytes: usize,
    /// Connection limits and timeouts (`MAX_CONNECTIONS`, `*_TIMEOUT_MS`, ...).
    pub limits: crate::server::Limits,
}

impl ServerConfig {
    /// Reads the server settings; `default_port` differs per service.
    pub fn from_env(env: &Env<'_>, default_port: u16) -> Result<Self, ConfigError> {
        Ok(Self {
            host: env.parse(
                "HTTP_HOST",
                IpAddr::from([0, 0, 0, 0]),
                "an IP address such as 0.0.0.0, 127.0.0.1 or ::",
            )?,
            port: env.number("HTTP_PORT", default_port, 0, u16::MAX)?,
            backlog: env.number("LISTEN_BACKLOG", 4096, 1, 1 << 20)?,
            shutdown_grace: env.seconds("SHUTDOWN_GRACE_SECS", Duration::from_secs(10))?,
            max_body_bytes: env.number("MAX_BODY_BYTES", 4 << 20, 1, 1 << 30)?,
            limits: crate::server::Limits::from_env(env)?,
        })
    }

    /// The socket address to bind.
    pub fn addr(&self) -> std::net::SocketAddr {
        (self.host, self.port).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn defaults_apply_when_unset_or_blank() {
        let map = env(&[("HTTP_PORT", "  ")]);
        let cfg = ServerConfig::from_env(&Env::new(&map), 1337).unwrap();
        assert_eq!(cfg.port, 1337);
        assert_eq!(cfg.backlog, 4096);
        assert_eq!(cfg.host, IpAddr::from([0, 0, 0, 0]));
    }

    #[test]
    fn bad_values_name_variable_value_and_form() {
        let map = env(&[("HTTP_PORT", "80000")]);
        let err = ServerConfig::from_env(&Env::new(&map), 8080).unwrap_err();
        assert_eq!(err.var, "HTTP_PORT");
        assert_eq!(
            err.to_string(),
            "invalid configuration: HTTP_PORT=\"80000\": expected an integer from 0 to 65535"
        );
        let map = env(&[("HTTP_HOST", "localhost:1")]);
        let err = ServerConfig::from_env(&Env::new(&map), 8080).unwrap_err();
        assert_eq!(err.var, "HTTP_HOST");
    }

    #[test]
    fn flags_accept_upstream_spellings() {
        for (v, want) in [
            ("1", true),
            ("TRUE", true),
            ("yes", true),
            ("0", false),
            ("no", false),
        ] {
            let map = env(&[("USE_HTTP_2", v)]);
            assert_eq!(
                Env::new(&map).flag("USE_HTTP_2", !want).unwrap(),
                want,
                "{v}"
            );
        }
        let map = env(&[("USE_HTTP_2", "maybe")]);
        let err = Env::new(&map).flag("USE_HTTP_2", false).unwrap_err();
        assert!(err.to_string().contains("USE_HTTP_2=\"maybe\""));
    }

    #[test]
    fn seconds_accept_fractions_and_reject_negatives() {
        let map = env(&[("SHUTDOWN_GRACE_SECS", "0.5")]);
        let cfg = ServerConfig::from_env(&Env::new(&map), 1).unwrap();
        assert_eq!(cfg.shutdown_grace, Duration::from_millis(500));
        let map = env(&[("SHUTDOWN_GRACE_SECS", "-1")]);
        assert!(ServerConfig::from_env(&Env::new(&map), 1).is_err());
    }
}
