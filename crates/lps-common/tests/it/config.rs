//! Configuration that cannot panic: every numeric and duration variable the common crate
//! reads, given an absurd value, is refused with one line naming the variable, the value
//! and the expected form (which `main` prints before exiting 64), never a panic.

use std::collections::HashMap;

use lps_common::config::{
    ConfigError, ENV_BODY_BUDGET_WAIT_MS, ENV_BODY_READ_TIMEOUT_MS, ENV_CONNECT_TIMEOUT_MS,
    ENV_FIRST_BYTES_TIMEOUT_MS, ENV_HEADER_READ_TIMEOUT_MS, ENV_HTTP_PORT,
    ENV_HTTP2_KEEPALIVE_INTERVAL_MS, ENV_HTTP2_KEEPALIVE_TIMEOUT_MS, ENV_IDLE_TIMEOUT_MS,
    ENV_LISTEN_BACKLOG, ENV_MAX_BODY_BYTES, ENV_MAX_CONNECTIONS, ENV_MQTT_KEEPALIVE_SECS,
    ENV_MQTT_PORT, ENV_MQTT_QOS, ENV_MQTT_RECONNECT_MAX_MS, ENV_MQTT_RECONNECT_MIN_MS,
    ENV_MQTT_SESSION_EXPIRY_SECS, ENV_REQUEST_TIMEOUT_SECS, ENV_SHUTDOWN_GRACE_SECS,
    ENV_TARGET_COOLDOWN_MS, Env, MAX_DURATION, ServerConfig,
};
use lps_common::mqtt::MqttConfig;
use lps_common::upstream::UpstreamConfig;

type Read = fn(&Env<'_>) -> Result<(), ConfigError>;

fn server(env: &Env<'_>) -> Result<(), ConfigError> {
    ServerConfig::from_env(env, 8080).map(drop)
}

fn upstream(env: &Env<'_>) -> Result<(), ConfigError> {
    UpstreamConfig::from_env(env, "http://localhost:1/x").map(drop)
}

fn mqtt(env: &Env<'_>) -> Result<(), ConfigError> {
    MqttConfig::from_env(env, "client").map(drop)
}

/// Values no variable accepts: negative, overflowing, not a number, not finite.
const ALWAYS_ABSURD: &[&str] = &[
    "-1",
    "1e30",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "NaN",
    "inf",
    "-inf",
    "ten",
    "0x10",
    "1 000",
];

/// Every numeric and duration variable, where it is read, and the values it must refuse
/// on top of [`ALWAYS_ABSURD`].
const TABLE: &[(&str, Read, &[&str])] = &[
    (ENV_HTTP_PORT, server, &["65536"]),
    (ENV_LISTEN_BACKLOG, server, &["0", "1048577"]),
    (ENV_SHUTDOWN_GRACE_SECS, server, &["2592001", "1e300"]),
    (ENV_MAX_BODY_BYTES, server, &["0", "1073741825"]),
    (ENV_MAX_CONNECTIONS, server, &["0", "1048577"]),
    (ENV_FIRST_BYTES_TIMEOUT_MS, server, &["0", "2592000001"]),
    (ENV_HEADER_READ_TIMEOUT_MS, server, &["0", "2592000001"]),
    (ENV_BODY_READ_TIMEOUT_MS, server, &["0", "2592000001"]),
    (ENV_IDLE_TIMEOUT_MS, server, &["0", "2592000001"]),
    (ENV_HTTP2_KEEPALIVE_INTERVAL_MS, server, &["2592000001"]),
    (ENV_HTTP2_KEEPALIVE_TIMEOUT_MS, server, &["0", "2592000001"]),
    (ENV_BODY_BUDGET_WAIT_MS, server, &["2592000001"]),
    (ENV_CONNECT_TIMEOUT_MS, upstream, &["0", "2592000001"]),
    (
        ENV_REQUEST_TIMEOUT_SECS,
        upstream,
        &["0", "2592001", "1e300"],
    ),
    (ENV_TARGET_COOLDOWN_MS, upstream, &["2592000001"]),
    (ENV_MQTT_PORT, mqtt, &["0", "65536"]),
    (ENV_MQTT_QOS, mqtt, &["0", "3"]),
    (ENV_MQTT_SESSION_EXPIRY_SECS, mqtt, &["0", "4294967296"]),
    (ENV_MQTT_KEEPALIVE_SECS, mqtt, &["65536"]),
    (ENV_MQTT_RECONNECT_MIN_MS, mqtt, &["2592000001"]),
    (ENV_MQTT_RECONNECT_MAX_MS, mqtt, &["2592000001"]),
];

#[test]
fn absurd_values_are_refused_with_one_line() {
    let mut checked = 0;
    for (var, read, extra) in TABLE {
        for value in ALWAYS_ABSURD.iter().chain(extra.iter()) {
            let map: HashMap<&str, &str> = [(*var, *value)].into();
            let error = match read(&Env::new(&map)) {
                Ok(()) => panic!("{var}={value:?} was accepted"),
                Err(error) => error,
            };
            assert_eq!(error.var, *var, "{var}={value:?}: {error}");
            let line = error.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(
                line.starts_with(&format!("invalid configuration: {var}="))
                    && line.contains("expected"),
                "{line}"
            );
            checked += 1;
        }
    }
    assert!(checked > 200, "{checked}");
}

#[test]
fn the_largest_sane_values_are_accepted() {
    let max_ms = MAX_DURATION.as_millis().to_string();
    let max_secs = MAX_DURATION.as_secs().to_string();
    for (var, read, _) in TABLE {
        let value = match *var {
            v if v.ends_with("_MS") => max_ms.as_str(),
            ENV_SHUTDOWN_GRACE_SECS | ENV_REQUEST_TIMEOUT_SECS => max_secs.as_str(),
            _ => continue,
        };
        let map: HashMap<&str, &str> = [(*var, value)].into();
        if let Err(error) = read(&Env::new(&map)) {
            panic!("{var}={value} refused: {error}");
        }
    }
}
