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

// The environment variables of every service, named once (as linkerd2-proxy's env.rs): the
// services read them, `lps up`'s topology, the testkit and the tests write them, all
// through these constants. The field docs of each `Config` are the operator documentation.

// The inbound HTTP server ([`ServerConfig`], [`crate::server::Limits`]).
/// `HTTP_HOST`: address to listen on.
pub const ENV_HTTP_HOST: &str = "HTTP_HOST";
/// `HTTP_PORT`: port to listen on (0 picks a free one).
pub const ENV_HTTP_PORT: &str = "HTTP_PORT";
/// `LISTEN_BACKLOG`: accept queue length.
pub const ENV_LISTEN_BACKLOG: &str = "LISTEN_BACKLOG";
/// `SHUTDOWN_GRACE_SECS`: how long in-flight work may take after SIGTERM.
pub const ENV_SHUTDOWN_GRACE_SECS: &str = "SHUTDOWN_GRACE_SECS";
/// `MAX_BODY_BYTES`: largest accepted request body.
pub const ENV_MAX_BODY_BYTES: &str = "MAX_BODY_BYTES";
/// `MAX_CONNECTIONS`: connections served at once.
pub const ENV_MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
/// `FIRST_BYTES_TIMEOUT_MS`: how long a new connection may stay silent.
pub const ENV_FIRST_BYTES_TIMEOUT_MS: &str = "FIRST_BYTES_TIMEOUT_MS";
/// `HEADER_READ_TIMEOUT_MS`: how long an HTTP/1.1 request head may take.
pub const ENV_HEADER_READ_TIMEOUT_MS: &str = "HEADER_READ_TIMEOUT_MS";
/// `BODY_READ_TIMEOUT_MS`: how long a request body may take after its head.
pub const ENV_BODY_READ_TIMEOUT_MS: &str = "BODY_READ_TIMEOUT_MS";
/// `IDLE_TIMEOUT_MS`: how long a connection may idle with no request in flight.
pub const ENV_IDLE_TIMEOUT_MS: &str = "IDLE_TIMEOUT_MS";
/// `HTTP2_KEEPALIVE_INTERVAL_MS`: h2 ping interval (0: off).
pub const ENV_HTTP2_KEEPALIVE_INTERVAL_MS: &str = "HTTP2_KEEPALIVE_INTERVAL_MS";
/// `HTTP2_KEEPALIVE_TIMEOUT_MS`: how long an h2 ping may go unanswered.
pub const ENV_HTTP2_KEEPALIVE_TIMEOUT_MS: &str = "HTTP2_KEEPALIVE_TIMEOUT_MS";
/// `BODY_BUDGET_WAIT_MS`: how long a large body waits for memory.
pub const ENV_BODY_BUDGET_WAIT_MS: &str = "BODY_BUDGET_WAIT_MS";

/// `TOKIO_WORKER_THREADS`: the runtime's worker threads ([`crate::service::main`]; Tokio
/// reads it itself, default one per core). `lps` sets it for replicas that share a
/// machine.
pub const ENV_TOKIO_WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

// Logging ([`crate::telemetry::TelemetryConfig`]).
/// `SERVICE_NAME`: the service's name: log file, MQTT client id.
pub const ENV_SERVICE_NAME: &str = "SERVICE_NAME";
/// `LOG`: the log filter.
pub const ENV_LOG: &str = "LOG";
/// `LOG_FORMAT`: `text` or `json`.
pub const ENV_LOG_FORMAT: &str = "LOG_FORMAT";
/// `LOG_DIR`: the folder of the log files (and the simulator's journal).
pub const ENV_LOG_DIR: &str = "LOG_DIR";

// The outbound client ([`crate::upstream::UpstreamConfig`]).
/// `TARGET_URL`: where requests are forwarded (comma-separated targets).
pub const ENV_TARGET_URL: &str = "TARGET_URL";
/// `USE_HTTP_2`: h2c instead of HTTP/1.1.
pub const ENV_USE_HTTP_2: &str = "USE_HTTP_2";
/// `SKIP_DNS_CACHE`: resolve the target on every connection.
pub const ENV_SKIP_DNS_CACHE: &str = "SKIP_DNS_CACHE";
/// `CONNECT_TIMEOUT_MS`: connect timeout.
pub const ENV_CONNECT_TIMEOUT_MS: &str = "CONNECT_TIMEOUT_MS";
/// `REQUEST_TIMEOUT_SECS`: timeout of one forwarded request.
pub const ENV_REQUEST_TIMEOUT_SECS: &str = "REQUEST_TIMEOUT_SECS";
/// `TARGET_COOLDOWN_MS`: how long a failed target is skipped.
pub const ENV_TARGET_COOLDOWN_MS: &str = "TARGET_COOLDOWN_MS";

// The broker connection ([`crate::mqtt::MqttConfig`]).
/// `MQTT_HOST`: the broker's host.
pub const ENV_MQTT_HOST: &str = "MQTT_HOST";
/// `MQTT_BROKER`: upstream's name for [`ENV_MQTT_HOST`].
pub const ENV_MQTT_BROKER: &str = "MQTT_BROKER";
/// `MQTT_PORT`: the broker's port.
pub const ENV_MQTT_PORT: &str = "MQTT_PORT";
/// `MQTT_QOS`: the QoS of traffic.
pub const ENV_MQTT_QOS: &str = "MQTT_QOS";
/// `MQTT_KEEPALIVE_SECS`: MQTT keep-alive.
pub const ENV_MQTT_KEEPALIVE_SECS: &str = "MQTT_KEEPALIVE_SECS";
/// `MQTT_SESSION_EXPIRY_SECS`: how long the broker keeps a session.
pub const ENV_MQTT_SESSION_EXPIRY_SECS: &str = "MQTT_SESSION_EXPIRY_SECS";
/// `MQTT_RECONNECT_MIN_MS`: first reconnect delay.
pub const ENV_MQTT_RECONNECT_MIN_MS: &str = "MQTT_RECONNECT_MIN_MS";
/// `MQTT_RECONNECT_MAX_MS`: longest reconnect delay.
pub const ENV_MQTT_RECONNECT_MAX_MS: &str = "MQTT_RECONNECT_MAX_MS";
/// `MQTT_TLS`: TLS to the broker.
pub const ENV_MQTT_TLS: &str = "MQTT_TLS";
/// `MQTT_CA_FILE`: the CA the broker's certificate must chain to.
pub const ENV_MQTT_CA_FILE: &str = "MQTT_CA_FILE";
/// `MQTT_CLIENT_CERT_FILE`: client certificate.
pub const ENV_MQTT_CLIENT_CERT_FILE: &str = "MQTT_CLIENT_CERT_FILE";
/// `MQTT_CLIENT_KEY_FILE`: client key.
pub const ENV_MQTT_CLIENT_KEY_FILE: &str = "MQTT_CLIENT_KEY_FILE";
/// `MQTT_USERNAME`: broker user.
pub const ENV_MQTT_USERNAME: &str = "MQTT_USERNAME";
/// `MQTT_PASSWORD`: broker password.
pub const ENV_MQTT_PASSWORD: &str = "MQTT_PASSWORD";
/// `MQTT_PASSWORD_FILE`: file holding the broker password.
pub const ENV_MQTT_PASSWORD_FILE: &str = "MQTT_PASSWORD_FILE";

// legacy-proxy-1.
/// `MQTT_TOPIC`: where requests are published.
pub const ENV_MQTT_TOPIC: &str = "MQTT_TOPIC";
/// `PUBLISH_TIMEOUT_MS`: how long one publish may take (both bridges).
pub const ENV_PUBLISH_TIMEOUT_MS: &str = "PUBLISH_TIMEOUT_MS";
/// `MQTT_MAX_INFLIGHT`: publishes in flight at once.
pub const ENV_MQTT_MAX_INFLIGHT: &str = "MQTT_MAX_INFLIGHT";
/// `REPLAY_WINDOW_MS`: how long acknowledged messages are kept for a replay.
pub const ENV_REPLAY_WINDOW_MS: &str = "REPLAY_WINDOW_MS";
/// `REPLAY_JOURNAL_DIR`: where the replay window is kept on disk.
pub const ENV_REPLAY_JOURNAL_DIR: &str = "REPLAY_JOURNAL_DIR";
/// `SUBSCRIBER_PROBE`: admit traffic only once a legacy-proxy-2 answered a probe.
pub const ENV_SUBSCRIBER_PROBE: &str = "SUBSCRIBER_PROBE";
/// `MAX_PAYLOAD_BYTES`: the largest message the bridges carry (both bridges).
pub const ENV_MAX_PAYLOAD_BYTES: &str = "MAX_PAYLOAD_BYTES";

// legacy-proxy-2.
/// `MQTT_SHARE_GROUP`: the shared-subscription group.
pub const ENV_MQTT_SHARE_GROUP: &str = "MQTT_SHARE_GROUP";
/// `MQTT_RECEIVE_MAXIMUM`: messages in flight per path.
pub const ENV_MQTT_RECEIVE_MAXIMUM: &str = "MQTT_RECEIVE_MAXIMUM";
/// `MAX_ATTEMPTS`: deliveries before a dead letter (0: no limit).
pub const ENV_MAX_ATTEMPTS: &str = "MAX_ATTEMPTS";
/// `RETRY_BACKOFF_MS`: wait before the first retry.
pub const ENV_RETRY_BACKOFF_MS: &str = "RETRY_BACKOFF_MS";
/// `RETRY_BACKOFF_MAX_MS`: longest wait between attempts.
pub const ENV_RETRY_BACKOFF_MAX_MS: &str = "RETRY_BACKOFF_MAX_MS";
/// `DEAD_LETTER_TOPIC`: the prefix of the dead letters' topics.
pub const ENV_DEAD_LETTER_TOPIC: &str = "DEAD_LETTER_TOPIC";

// rast-simulator (its command-line options read these too).
/// `SIM_MODEL`: processing-time model.
pub const ENV_SIM_MODEL: &str = "SIM_MODEL";
/// `SIM_CORR_MAX`: model 0's re-predictions.
pub const ENV_SIM_CORR_MAX: &str = "SIM_CORR_MAX";
/// `SIM_WORKERS`: `fixed`/`exp`: requests served at once.
pub const ENV_SIM_WORKERS: &str = "SIM_WORKERS";
/// `SIM_SERVICE_MS`: `fixed`/`exp`: service time.
pub const ENV_SIM_SERVICE_MS: &str = "SIM_SERVICE_MS";

// lps-edge (`lps_edge::config` documents each).
/// `REUSE_PORT`: `SO_REUSEPORT` on both listeners.
pub const ENV_REUSE_PORT: &str = "REUSE_PORT";
/// `WS_ENABLED`: the MQTT-over-WebSocket bridge on or off.
pub const ENV_WS_ENABLED: &str = "WS_ENABLED";
/// `WS_PATH`: the path that upgrades.
pub const ENV_WS_PATH: &str = "WS_PATH";
/// `WS_MAX_CONNECTIONS`: bridges open at once.
pub const ENV_WS_MAX_CONNECTIONS: &str = "WS_MAX_CONNECTIONS";
/// `WS_MAX_MESSAGE_BYTES`: largest WebSocket message from a client.
pub const ENV_WS_MAX_MESSAGE_BYTES: &str = "WS_MAX_MESSAGE_BYTES";
/// `WS_FLUSH_THRESHOLD_BYTES`: client bytes coalesced into one write.
pub const ENV_WS_FLUSH_THRESHOLD_BYTES: &str = "WS_FLUSH_THRESHOLD_BYTES";
/// `WS_SMALL_PACKET_BYTES`: messages shorter than this are written at once.
pub const ENV_WS_SMALL_PACKET_BYTES: &str = "WS_SMALL_PACKET_BYTES";
/// `WS_BROKER_CONNECT_TIMEOUT_MS`: broker connect timeout.
pub const ENV_WS_BROKER_CONNECT_TIMEOUT_MS: &str = "WS_BROKER_CONNECT_TIMEOUT_MS";
/// `PROXY_ENABLED`: the forward proxy on or off.
pub const ENV_PROXY_ENABLED: &str = "PROXY_ENABLED";
/// `PROXY_HOST`: the proxy's address.
pub const ENV_PROXY_HOST: &str = "PROXY_HOST";
/// `PROXY_PORT`: the proxy's port.
pub const ENV_PROXY_PORT: &str = "PROXY_PORT";
/// `PROXY_ALLOWED_PORTS`: destination ports the proxy may reach.
pub const ENV_PROXY_ALLOWED_PORTS: &str = "PROXY_ALLOWED_PORTS";
/// `PROXY_AUTH`: `user:password` for Basic proxy authentication.
pub const ENV_PROXY_AUTH: &str = "PROXY_AUTH";
/// `PROXY_AUTH_FILE`: file holding [`ENV_PROXY_AUTH`].
pub const ENV_PROXY_AUTH_FILE: &str = "PROXY_AUTH_FILE";
/// `PROXY_MAX_CONNECTIONS`: proxy connections at once.
pub const ENV_PROXY_MAX_CONNECTIONS: &str = "PROXY_MAX_CONNECTIONS";
/// `PROXY_CONNECT_TIMEOUT_MS`: proxy connect timeout.
pub const ENV_PROXY_CONNECT_TIMEOUT_MS: &str = "PROXY_CONNECT_TIMEOUT_MS";
/// `PROXY_RESPONSE_TIMEOUT_MS`: how long the proxy waits for a response head.
pub const ENV_PROXY_RESPONSE_TIMEOUT_MS: &str = "PROXY_RESPONSE_TIMEOUT_MS";
/// `PROXY_IDLE_TIMEOUT_MS`: how long a proxied connection may idle.
pub const ENV_PROXY_IDLE_TIMEOUT_MS: &str = "PROXY_IDLE_TIMEOUT_MS";

// The embedded broker (`lps broker`).
/// `BROKER_DATA`: the folder of its stored sessions.
pub const ENV_BROKER_DATA: &str = "BROKER_DATA";

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

    /// A TCP connect timeout in milliseconds, from 1 ms to 10 minutes, or `default`.
    pub fn connect_timeout_ms(
        &self,
        var: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.millis_in(
            var,
            default,
            Duration::from_millis(1),
            Duration::from_secs(600),
        )
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
                ENV_HTTP_HOST,
                IpAddr::from([0, 0, 0, 0]),
                "an IP address such as 0.0.0.0, 127.0.0.1 or ::",
            )?,
            port: env.number(ENV_HTTP_PORT, default_port, 0, u16::MAX)?,
            backlog: env.number(ENV_LISTEN_BACKLOG, 4096, 1, 1 << 20)?,
            shutdown_grace: env.seconds(ENV_SHUTDOWN_GRACE_SECS, Duration::from_secs(10))?,
            max_body_bytes: env.number(ENV_MAX_BODY_BYTES, 4 << 20, 1, 1 << 30)?,
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
        let map = env(&[(ENV_HTTP_PORT, "  ")]);
        let cfg = ServerConfig::from_env(&Env::new(&map), 1337).unwrap();
        assert_eq!(cfg.port, 1337);
        assert_eq!(cfg.backlog, 4096);
        assert_eq!(cfg.host, IpAddr::from([0, 0, 0, 0]));
    }

    #[test]
    fn bad_values_name_variable_value_and_form() {
        let map = env(&[(ENV_HTTP_PORT, "80000")]);
        let err = ServerConfig::from_env(&Env::new(&map), 8080).unwrap_err();
        assert_eq!(err.var, ENV_HTTP_PORT);
        assert_eq!(
            err.to_string(),
            "invalid configuration: HTTP_PORT=\"80000\": expected an integer from 0 to 65535"
        );
        let map = env(&[(ENV_HTTP_HOST, "localhost:1")]);
        let err = ServerConfig::from_env(&Env::new(&map), 8080).unwrap_err();
        assert_eq!(err.var, ENV_HTTP_HOST);
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
            let map = env(&[(ENV_USE_HTTP_2, v)]);
            assert_eq!(
                Env::new(&map).flag(ENV_USE_HTTP_2, !want).unwrap(),
                want,
                "{v}"
            );
        }
        let map = env(&[(ENV_USE_HTTP_2, "maybe")]);
        let err = Env::new(&map).flag(ENV_USE_HTTP_2, false).unwrap_err();
        assert!(err.to_string().contains("USE_HTTP_2=\"maybe\""));
    }

    #[test]
    fn seconds_accept_fractions_and_reject_negatives() {
        let map = env(&[(ENV_SHUTDOWN_GRACE_SECS, "0.5")]);
        let cfg = ServerConfig::from_env(&Env::new(&map), 1).unwrap();
        assert_eq!(cfg.shutdown_grace, Duration::from_millis(500));
        let map = env(&[(ENV_SHUTDOWN_GRACE_SECS, "-1")]);
        assert!(ServerConfig::from_env(&Env::new(&map), 1).is_err());
    }
}
