//! The edge's configuration, from the environment (see the crate docs for the list).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use lps_common::config::{
    ConfigError, ENV_PROXY_ALLOWED_PORTS, ENV_PROXY_AUTH, ENV_PROXY_AUTH_FILE,
    ENV_PROXY_CONNECT_TIMEOUT_MS, ENV_PROXY_ENABLED, ENV_PROXY_HOST, ENV_PROXY_IDLE_TIMEOUT_MS,
    ENV_PROXY_MAX_CONNECTIONS, ENV_PROXY_PORT, ENV_PROXY_RESPONSE_TIMEOUT_MS, ENV_REUSE_PORT,
    ENV_WS_BROKER_CONNECT_TIMEOUT_MS, ENV_WS_ENABLED, ENV_WS_FLUSH_THRESHOLD_BYTES,
    ENV_WS_MAX_CONNECTIONS, ENV_WS_MAX_MESSAGE_BYTES, ENV_WS_PATH, ENV_WS_SMALL_PACKET_BYTES, Env,
    Lookup, ServerConfig,
};
use lps_common::mqtt::MqttConfig;
use lps_common::telemetry::TelemetryConfig;

/// `HTTP_PORT` default: the WebSocket listener (and `/healthz`, `/metrics`).
pub const DEFAULT_HTTP_PORT: u16 = 8000;
/// `PROXY_PORT` default: the forward proxy, as Squid.
pub const DEFAULT_PROXY_PORT: u16 = 3128;
/// `WS_PATH` default.
pub const DEFAULT_WS_PATH: &str = "/mqtt";
/// `PROXY_ALLOWED_PORTS` default: HTTP, HTTPS, and the ports of the LPS topologies
/// (simulator, broker, the edge's WebSocket port, the relays and bridges).
pub const DEFAULT_ALLOWED_PORTS: &str = "80,443,1337,1883,7081-7084,8000,8080-8084,9081-9093";

/// Everything lps-edge reads from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `HTTP_*`, `MAX_CONNECTIONS`, `SHUTDOWN_GRACE_SECS`...: the WebSocket listener, which
    /// also serves `/healthz` and `/metrics` (default port 8000).
    pub server: ServerConfig,
    /// Logging (`SERVICE_NAME` default `lps-edge`).
    pub telemetry: TelemetryConfig,
    /// `REUSE_PORT`: bind both listeners with `SO_REUSEPORT` (default on), so that several
    /// edge processes can share a port when one is not enough; the kernel spreads new
    /// connections over them.
    pub reuse_port: bool,
    /// The MQTT-over-WebSocket bridge; `None` when `WS_ENABLED=false` (then `WS_PATH`
    /// answers 404 and only the operational endpoints remain on `HTTP_PORT`).
    pub ws: Option<WsConfig>,
    /// The forward proxy; `None` when `PROXY_ENABLED=false`.
    pub proxy: Option<ProxyConfig>,
}

/// The MQTT-over-WebSocket bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsConfig {
    /// `WS_PATH`: the path that upgrades (default `/mqtt`).
    pub path: String,
    /// `MQTT_HOST` (alias `MQTT_BROKER`): the broker every WebSocket is bridged to
    /// (default `localhost`).
    pub broker_host: String,
    /// `MQTT_PORT`: the broker's plain TCP port (default 1883).
    pub broker_port: u16,
    /// `WS_MAX_CONNECTIONS`: bridges open at once (default 4096); one more is answered 503
    /// before the upgrade, so a device backs off instead of hanging.
    pub max_connections: u32,
    /// `WS_MAX_MESSAGE_BYTES`: largest WebSocket message accepted from a client (default
    /// 1 MiB); a larger one closes the connection (1009). Each message is buffered whole.
    pub max_message_bytes: usize,
    /// `WS_FLUSH_THRESHOLD_BYTES`: client bytes coalesced into one write to the broker at
    /// most (default 131072, the seed's threshold). Coalescing only takes what has already
    /// arrived: nothing waits for more data.
    pub flush_threshold: usize,
    /// `WS_SMALL_PACKET_BYTES`: a client message shorter than this (acknowledgements,
    /// PINGREQ) is written to the broker at once, never coalesced with later ones
    /// (default 100, the seed's rule).
    pub small_packet: usize,
    /// `WS_BROKER_CONNECT_TIMEOUT_MS`: how long the upgrade waits for the broker's TCP
    /// connection before answering 504 (default 5000).
    pub broker_connect_timeout: Duration,
}

/// The forward proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `PROXY_HOST` (default `HTTP_HOST`) and `PROXY_PORT` (default 3128; 0 picks one).
    pub addr: SocketAddr,
    /// `PROXY_ALLOWED_PORTS`: destination ports a request or tunnel may reach, as a
    /// comma-separated list of ports and ranges (default
    /// `80,443,1337,1883,7081-7084,8000,8080-8084,9081-9093`); others are answered 403,
    /// so the proxy is not an open relay.
    pub allowed_ports: PortSet,
    /// `PROXY_AUTH` (`user:password`) and `PROXY_AUTH_FILE` (one `user:password` a line,
    /// `#` comments): when either is set, every request needs `Proxy-Authorization: Basic`
    /// with one of these pairs, or is answered 407.
    pub credentials: Option<Credentials>,
    /// `PROXY_MAX_CONNECTIONS`: client connections at once, tunnels included (default
    /// 4096); beyond that new connections wait in the listen backlog.
    pub max_connections: u32,
    /// `PROXY_CONNECT_TIMEOUT_MS`: TCP connect to a destination (default 5000); 504 after.
    pub connect_timeout: Duration,
    /// `PROXY_RESPONSE_TIMEOUT_MS`: from a forwarded request to its response head
    /// (default 60000); 504 after.
    pub response_timeout: Duration,
    /// `PROXY_IDLE_TIMEOUT_MS`: a client connection must send a complete request head
    /// within this, also between keep-alive requests (default 60000). Tunnels have no idle
    /// limit (TCP keep-alive finds dead peers): MQTT and TLS sessions idle legitimately.
    pub idle_timeout: Duration,
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("addr", &self.addr)
            .field("allowed_ports", &self.allowed_ports)
            .field("credentials", &self.credentials)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

/// A set of ports, from `80,443,8080-8084`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

impl PortSet {
    /// Parses `80,443,8080-8084` (spaces allowed; at least one entry).
    pub fn parse(text: &str) -> Option<Self> {
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim) {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo.trim().parse().ok()?, hi.trim().parse().ok()?),
                None => {
                    let port = part.parse().ok()?;
                    (port, port)
                }
            };
            if lo == 0 || lo > hi {
                return None;
            }
            ranges.push(lo..=hi);
        }
        (!ranges.is_empty()).then_some(Self(ranges))
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }
}

/// The `user:password` pairs the proxy accepts. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials(BTreeSet<String>);

impl Credentials {
    /// Whether `user_password` (`user:password`, decoded) is one of the pairs.
    pub fn accepts(&self, user_password: &str) -> bool {
        self.0.contains(user_password)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({} users)", self.0.len())
    }
}

const PAIR: &str = "user:password (a user name without ':', then the password)";

fn is_pair(text: &str) -> bool {
    text.split_once(':')
        .is_some_and(|(user, _)| !user.is_empty())
}

impl Config {
    /// Reads the configuration from `lookup`.
    pub fn from_lookup(lookup: &dyn Lookup) -> Result<Self, ConfigError> {
        let env = Env::new(lookup);
        let server = ServerConfig::from_env(&env, DEFAULT_HTTP_PORT)?;
        let ws = if env.flag(ENV_WS_ENABLED, true)? {
            Some(WsConfig::from_env(&env)?)
        } else {
            None
        };
        let proxy = if env.flag(ENV_PROXY_ENABLED, true)? {
            Some(ProxyConfig::from_env(&env, server.host)?)
        } else {
            None
        };
        Ok(Self {
            telemetry: TelemetryConfig::from_env(&env, "lps-edge")?,
            reuse_port: env.flag(ENV_REUSE_PORT, true)?,
            server,
            ws,
            proxy,
        })
    }
}

impl WsConfig {
    fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let path = env.string(ENV_WS_PATH, DEFAULT_WS_PATH);
        if !path.starts_with('/') || path.contains(['?', '#', ' ', '{', '}', '*']) {
            return Err(ConfigError::new(
                ENV_WS_PATH,
                &path,
                "a URL path starting with / such as /mqtt",
            ));
        }
        let mqtt = MqttConfig::from_env(env, "lps-edge")?;
        Ok(Self {
            path,
            broker_host: mqtt.host,
            broker_port: mqtt.port,
            max_connections: env.number(ENV_WS_MAX_CONNECTIONS, 4096, 1, 1 << 20)?,
            max_message_bytes: env.number(ENV_WS_MAX_MESSAGE_BYTES, 1 << 20, 128, 256 << 20)?,
            flush_threshold: env.number(ENV_WS_FLUSH_THRESHOLD_BYTES, 128 << 10, 1, 16 << 20)?,
            small_packet: env.number(ENV_WS_SMALL_PACKET_BYTES, 100, 0, 1 << 20)?,
            broker_connect_timeout: env
                .connect_timeout_ms(ENV_WS_BROKER_CONNECT_TIMEOUT_MS, Duration::from_secs(5))?,
        })
    }
}

impl ProxyConfig {
    fn from_env(env: &Env<'_>, default_host: IpAddr) -> Result<Self, ConfigError> {
        let host = env.parse(
            ENV_PROXY_HOST,
            default_host,
            "an IP address such as 0.0.0.0, 127.0.0.1 or ::",
        )?;
        let port = env.number(ENV_PROXY_PORT, DEFAULT_PROXY_PORT, 0, u16::MAX)?;
        let ports = env.string(ENV_PROXY_ALLOWED_PORTS, DEFAULT_ALLOWED_PORTS);
        let allowed_ports = PortSet::parse(&ports).ok_or_else(|| {
            ConfigError::new(
                ENV_PROXY_ALLOWED_PORTS,
                &ports,
                "a comma-separated list of ports 1-65535 and ranges such as 80,443,8080-8084",
            )
        })?;
        let mut pairs = BTreeSet::new();
        if let Some(pair) = env.raw(ENV_PROXY_AUTH) {
            if !is_pair(&pair) {
                // The value is a secret: name the form, not the value.
                return Err(ConfigError::new(ENV_PROXY_AUTH, "<hidden>", PAIR));
            }
            pairs.insert(pair);
        }
        if let Some(path) = env.raw(ENV_PROXY_AUTH_FILE) {
            pairs.extend(
                read_credentials(Path::new(&path))
                    .map_err(|expected| ConfigError::new(ENV_PROXY_AUTH_FILE, &path, expected))?,
            );
        }
        let ms = Duration::from_millis;
        let timeout =
            |var: &str, default: Duration| env.millis_in(var, default, ms(1), ms(86_400_000));
        Ok(Self {
            addr: SocketAddr::new(host, port),
            allowed_ports,
            credentials: (!pairs.is_empty()).then_some(Credentials(pairs)),
            max_connections: env.number(ENV_PROXY_MAX_CONNECTIONS, 4096, 1, 1 << 20)?,
            connect_timeout: timeout(ENV_PROXY_CONNECT_TIMEOUT_MS, ms(5000))?,
            response_timeout: timeout(ENV_PROXY_RESPONSE_TIMEOUT_MS, ms(60_000))?,
            idle_timeout: timeout(ENV_PROXY_IDLE_TIMEOUT_MS, ms(60_000))?,
        })
    }
}

/// The pairs of a credentials file, or the expected form when it cannot be used.
fn read_credentials(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("a readable file of {PAIR} lines ({e})"))?;
    let mut pairs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !is_pair(line) {
            return Err(format!("{PAIR} on every line; line {} is not", number + 1));
        }
        pairs.push(line.to_owned());
    }
    if pairs.is_empty() {
        return Err(format!("at least one {PAIR} line"));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lps_common::config::{
        ENV_MQTT_PORT, ENV_PROXY_ALLOWED_PORTS, ENV_PROXY_AUTH, ENV_PROXY_AUTH_FILE,
        ENV_PROXY_CONNECT_TIMEOUT_MS, ENV_PROXY_ENABLED, ENV_PROXY_PORT, ENV_REUSE_PORT,
        ENV_WS_ENABLED, ENV_WS_FLUSH_THRESHOLD_BYTES, ENV_WS_PATH,
    };
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(&map)
    }

    #[test]
    fn defaults_serve_both_listeners_on_the_compose_ports() {
        let c = config(&[]).unwrap();
        assert_eq!(c.server.port, 8000);
        assert!(c.reuse_port);
        let ws = c.ws.unwrap();
        assert_eq!(ws.path, "/mqtt");
        assert_eq!(
            (ws.broker_host.as_str(), ws.broker_port),
            ("localhost", 1883)
        );
        assert_eq!((ws.flush_threshold, ws.small_packet), (128 << 10, 100));
        let proxy = c.proxy.unwrap();
        assert_eq!(proxy.addr, "0.0.0.0:3128".parse().unwrap());
        assert!(proxy.credentials.is_none());
        for port in [80, 443, 1883, 8000, 8081, 9091] {
            assert!(proxy.allowed_ports.contains(port), "{port}");
        }
        for port in [22, 25, 3128, 6379] {
            assert!(!proxy.allowed_ports.contains(port), "{port}");
        }
    }

    #[test]
    fn listeners_switch_off() {
        let c = config(&[(ENV_WS_ENABLED, "false"), (ENV_PROXY_ENABLED, "0")]).unwrap();
        assert!(c.ws.is_none() && c.proxy.is_none());
    }

    #[test]
    fn bad_values_name_the_variable_and_the_form() {
        for (var, value) in [
            (ENV_PROXY_PORT, "70000"),
            (ENV_PROXY_ALLOWED_PORTS, "80,0"),
            (ENV_PROXY_ALLOWED_PORTS, "90-80"),
            (ENV_PROXY_ALLOWED_PORTS, ""),
            (ENV_WS_PATH, "mqtt"),
            (ENV_WS_ENABLED, "maybe"),
            (ENV_WS_FLUSH_THRESHOLD_BYTES, "0"),
            (ENV_PROXY_CONNECT_TIMEOUT_MS, "0"),
            (ENV_MQTT_PORT, "0"),
            (ENV_REUSE_PORT, "2"),
        ] {
            if value.is_empty() {
                // Blank means unset: the default applies.
                assert!(config(&[(var, value)]).is_ok());
                continue;
            }
            let err = config(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{value}");
            assert!(err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn credentials_come_from_the_variable_and_the_file_and_are_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users");
        std::fs::write(&file, "# users\nalice:s3cret\n\nbob:pa:ss\n").unwrap();
        let c = config(&[
            (ENV_PROXY_AUTH, "carol:x"),
            (ENV_PROXY_AUTH_FILE, file.to_str().unwrap()),
        ])
        .unwrap();
        let creds = c.proxy.unwrap().credentials.unwrap();
        assert!(
            creds.accepts("alice:s3cret") && creds.accepts("bob:pa:ss") && creds.accepts("carol:x")
        );
        assert!(!creds.accepts("alice:wrong"));
        assert_eq!(format!("{creds:?}"), "Credentials(3 users)");

        let err = config(&[(ENV_PROXY_AUTH, "nocolon")]).unwrap_err();
        assert!(!err.to_string().contains("nocolon"), "{err}");
        std::fs::write(&file, "alice\n").unwrap();
        let err = config(&[(ENV_PROXY_AUTH_FILE, file.to_str().unwrap())]).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = config(&[(ENV_PROXY_AUTH_FILE, "/nonexistent/users")]).unwrap_err();
        assert_eq!(err.var, ENV_PROXY_AUTH_FILE);
    }

    #[test]
    fn port_sets_parse_lists_and_ranges() {
        let set = PortSet::parse(" 80, 8080-8082 ,443").unwrap();
        assert!(set.contains(80) && set.contains(8081) && set.contains(443));
        assert!(!set.contains(8083) && !set.contains(81));
        assert!(PortSet::parse("80,").is_none());
        assert!(PortSet::parse("http").is_none());
    }
}
