//! MQTT v5 plumbing shared by the bridges, on the `mqtt5` client.
//!
//! Why `mqtt5` and not rumqttc: on the paths the bridges depend on, rumqttc 0.25 loses
//! messages or stalls (a failed PUBREC leaks its in-flight slot, a PUBREL after a
//! reconnect causes a reconnect loop, a reconnect without a session drops pending
//! publishes silently), and working around that needs its event loop's internals. `mqtt5`
//! gives each publish an outcome (delivered on PUBCOMP, refused with the PUBREC reason
//! code, or indeterminate when the session was lost), honours the broker's Receive
//! Maximum, resolves deferred acknowledgements in arrival order, and resumes sessions.
//!
//! [`Link`] wraps one client: persistent session (`clean_start=false`, non-zero session
//! expiry), a first connect retried with capped exponential backoff (later reconnects are
//! the client's own, with the same backoff), a [`LinkState`] to watch, and
//! [`Link::publish`], which waits for the end of the QoS 2 handshake.
//!
//! Secure links: `MQTT_USERNAME` with `MQTT_PASSWORD` or `MQTT_PASSWORD_FILE` (never
//! logged), and TLS with rustls (`MQTT_TLS`, `MQTT_CA_FILE`, optionally
//! `MQTT_CLIENT_CERT_FILE` and `MQTT_CLIENT_KEY_FILE`). The files are read and checked at
//! start-up: a missing or unparsable one is a configuration error (exit 64). A broker that
//! refuses the credentials, or a TLS handshake that fails (unknown CA, wrong name), is
//! logged at `error` with what to check; the link stays down (so `/readyz` says not ready)
//! and retries at the longest reconnect delay, never in a tight loop.
//!
//! Session takeover: when a second instance connects with the same client id
//! (`SERVICE_NAME`, e.g. a rescheduled pod whose old one is not dead yet), the broker hands
//! it the session and drops the first (DISCONNECT 0x8E, not always seen under load). Each
//! bridge link ([`Link::guard_ownership`]) publishes a retained ownership record on `lps/owner/<client id>` at its first
//! CONNACK, and after a 0x8E or a reconnect reads it with a side client: the newest
//! instance keeps the id, the other stops reconnecting (two instances reconnecting with one
//! id would take the session from each other for ever) and says so in
//! [`LinkState::taken_over`]; the bridges stop and exit with [`EXIT_SESSION_TAKEN_OVER`].
//!
//! Capabilities: the bridges need QoS 2 and (legacy-proxy-2) shared subscriptions. The
//! client conforms every publish to the CONNACK's Maximum QoS and refuses a `$share`
//! subscription when the CONNACK says Shared Subscription Available = 0, so
//! [`Link::grants_qos`] and [`lacks_shared_subscriptions`] read the CONNACK through it;
//! a broker that lacks either is logged at `error` naming the capability, and the bridge
//! stays not ready, asking again at the longest reconnect delay.
//!
//! Environment: `MQTT_HOST` (alias `MQTT_BROKER`), `MQTT_PORT`, `MQTT_SESSION_EXPIRY_SECS`,
//! `MQTT_KEEPALIVE_SECS`, `MQTT_RECONNECT_MIN_MS`, `MQTT_RECONNECT_MAX_MS`,
//! `MQTT_USERNAME`, `MQTT_PASSWORD`, `MQTT_PASSWORD_FILE`, `MQTT_TLS`, `MQTT_CA_FILE`,
//! `MQTT_CLIENT_CERT_FILE`, `MQTT_CLIENT_KEY_FILE`.

use std::sync::Arc;
use std::time::Duration;

use mqtt5::protocol::v5::reason_codes::ReasonCode;
use mqtt5::transport::tls::TlsConfig;
use mqtt5::{
    ConnectOptions, ConnectionEvent, DisconnectReason, MqttClient, MqttError, PublishOptions,
    PublishOutcome, PublishResult, QoS,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{
    ConfigError, ENV_MQTT_BROKER, ENV_MQTT_CA_FILE, ENV_MQTT_CLIENT_CERT_FILE,
    ENV_MQTT_CLIENT_KEY_FILE, ENV_MQTT_HOST, ENV_MQTT_KEEPALIVE_SECS, ENV_MQTT_PASSWORD,
    ENV_MQTT_PASSWORD_FILE, ENV_MQTT_PORT, ENV_MQTT_QOS, ENV_MQTT_RECONNECT_MAX_MS,
    ENV_MQTT_RECONNECT_MIN_MS, ENV_MQTT_SESSION_EXPIRY_SECS, ENV_MQTT_TLS, ENV_MQTT_USERNAME,
    ENV_SERVICE_NAME, Env,
};

pub use mqtt5;

/// Broker connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// `MQTT_HOST` (or upstream's `MQTT_BROKER`): broker host name or address
    /// (default `localhost`).
    pub host: String,
    /// `MQTT_PORT`: broker port (default 1883).
    pub port: u16,
    /// `SERVICE_NAME`: the client id, and so the session the broker keeps.
    pub client_id: String,
    /// `MQTT_QOS`: 1 or 2 (default 2).
    pub qos: QoS,
    /// `MQTT_SESSION_EXPIRY_SECS`: how long the broker keeps the session (subscriptions,
    /// queued and unacknowledged messages) while the client is away (default 86400: a
    /// day, long enough to survive any restart of an experiment).
    pub session_expiry: Duration,
    /// `MQTT_KEEPALIVE_SECS`: MQTT keep-alive (default 30).
    pub keep_alive: Duration,
    /// `MQTT_RECONNECT_MIN_MS`: first reconnect delay (default 250).
    pub reconnect_min: Duration,
    /// `MQTT_RECONNECT_MAX_MS`: reconnect delays double up to this (default 5000).
    pub reconnect_max: Duration,
    /// `MQTT_USERNAME`: the user name sent in CONNECT (default: none, anonymous).
    pub username: Option<String>,
    /// `MQTT_PASSWORD`, or the contents of the file `MQTT_PASSWORD_FILE` names (one
    /// trailing newline dropped): the password sent with `MQTT_USERNAME`. Never logged.
    pub password: Option<Secret>,
    /// TLS to the broker, when `MQTT_TLS` is on (or a CA or client certificate is given).
    pub tls: Option<BrokerTls>,
}

/// A secret read from the environment: shown as `***` in `Debug` output, so that no log
/// line or error message carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret holding `bytes`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// TLS settings of the broker link (rustls; TLS 1.2 and 1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerTls {
    /// `MQTT_CA_FILE`: PEM certificates of the CAs that may sign the broker's certificate
    /// (default: the bundled Web PKI roots). The broker's certificate must name `MQTT_HOST`.
    pub ca_pem: Option<Vec<u8>>,
    /// `MQTT_CLIENT_CERT_FILE`: a PEM client certificate chain, for brokers that require
    /// one (`require_certificate true`); needs `MQTT_CLIENT_KEY_FILE`.
    pub client_cert_pem: Option<Vec<u8>>,
    /// `MQTT_CLIENT_KEY_FILE`: the PEM private key of the client certificate.
    pub client_key_pem: Option<Secret>,
}

impl BrokerTls {
    /// Reads and checks the TLS files; `None` when TLS is off.
    fn from_env(env: &Env<'_>) -> Result<Option<Self>, ConfigError> {
        let ca = read_file(env, ENV_MQTT_CA_FILE)?;
        let cert = read_file(env, ENV_MQTT_CLIENT_CERT_FILE)?;
        let key = read_file(env, ENV_MQTT_CLIENT_KEY_FILE)?;
        let any_file = ca.is_some() || cert.is_some() || key.is_some();
        let on = match env.raw(ENV_MQTT_TLS) {
            None => any_file,
            Some(_) => env.flag(ENV_MQTT_TLS, false)?,
        };
        if !on {
            if any_file {
                return Err(ConfigError::new(
                    ENV_MQTT_TLS,
                    &env.string(ENV_MQTT_TLS, ""),
                    "1|true|yes when MQTT_CA_FILE, MQTT_CLIENT_CERT_FILE or MQTT_CLIENT_KEY_FILE is set",
                ));
            }
            return Ok(None);
        }
        // Parse now, so that a wrong file is a configuration error, not a retry loop.
        let mut check = TlsConfig::new(([127, 0, 0, 1], 8883).into(), "localhost");
        if let Some((path, pem)) = &ca
            && check.load_ca_cert_pem_bytes(pem).is_err()
        {
            return Err(ConfigError::new(
                ENV_MQTT_CA_FILE,
                path,
                "a file of PEM certificates (-----BEGIN CERTIFICATE-----)",
            ));
        }
        match (&cert, &key) {
            (None, None) => {}
            (Some((path, pem)), Some((key_path, key_pem))) => {
                if check.load_client_cert_pem_bytes(pem).is_err() {
                    return Err(ConfigError::new(
                        ENV_MQTT_CLIENT_CERT_FILE,
                        path,
                        "a file of PEM certificates (-----BEGIN CERTIFICATE-----)",
                    ));
                }
                if check.load_client_key_pem_bytes(key_pem).is_err()
                    || check.client_config().is_err()
                {
                    return Err(ConfigError::new(
                        ENV_MQTT_CLIENT_KEY_FILE,
                        key_path,
                        "the PEM private key of MQTT_CLIENT_CERT_FILE",
                    ));
                }
            }
            (Some((path, _)), None) => {
                return Err(ConfigError::new(
                    ENV_MQTT_CLIENT_KEY_FILE,
                    "",
                    format!("the PEM private key of MQTT_CLIENT_CERT_FILE={path}"),
                ));
            }
            (None, Some((path, _))) => {
                return Err(ConfigError::new(
                    ENV_MQTT_CLIENT_CERT_FILE,
                    "",
                    format!("the PEM certificate of MQTT_CLIENT_KEY_FILE={path}"),
                ));
            }
        }
        Ok(Some(Self {
            ca_pem: ca.map(|(_, pem)| pem),
            client_cert_pem: cert.map(|(_, pem)| pem),
            client_key_pem: key.map(|(_, pem)| Secret(pem)),
        }))
    }
}

/// The path in `var` and the file's contents, if `var` is set.
fn read_file(env: &Env<'_>, var: &str) -> Result<Option<(String, Vec<u8>)>, ConfigError> {
    let Some(path) = env.raw(var) else {
        return Ok(None);
    };
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some((path, bytes))),
        Err(e) => Err(ConfigError::new(
            var,
            &path,
            format!("a readable file ({e})"),
        )),
    }
}

/// The password from `MQTT_PASSWORD` or `MQTT_PASSWORD_FILE` (not both).
fn password_from_env(env: &Env<'_>) -> Result<Option<Secret>, ConfigError> {
    // Not `raw`: a password may begin or end with spaces.
    let inline = env.exact(ENV_MQTT_PASSWORD);
    match (inline, read_file(env, ENV_MQTT_PASSWORD_FILE)?) {
        (Some(_), Some((path, _))) => Err(ConfigError::new(
            ENV_MQTT_PASSWORD_FILE,
            &path,
            "unset while MQTT_PASSWORD is set (give the password one way)",
        )),
        (Some(password), None) => Ok(Some(Secret(password.into_bytes()))),
        (None, Some((_, mut bytes))) => {
            if bytes.ends_with(b"\n") {
                bytes.pop();
                if bytes.ends_with(b"\r") {
                    bytes.pop();
                }
            }
            Ok(Some(Secret(bytes)))
        }
        (None, None) => Ok(None),
    }
}

impl MqttConfig {
    /// Reads the broker settings; `default_client_id` applies when `SERVICE_NAME` is unset.
    pub fn from_env(env: &Env<'_>, default_client_id: &str) -> Result<Self, ConfigError> {
        let host = env
            .raw_any(&[ENV_MQTT_HOST, ENV_MQTT_BROKER])
            .map_or_else(|| "localhost".to_owned(), |(_, v)| v);
        if host.contains(['/', ' ', ':']) && host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(ConfigError::new(
                ENV_MQTT_HOST,
                &host,
                "a host name or IP address, without scheme or port",
            ));
        }
        let session_expiry: u32 = env.number(ENV_MQTT_SESSION_EXPIRY_SECS, 86_400, 1, u32::MAX)?;
        let client_id = env.string(ENV_SERVICE_NAME, default_client_id);
        if client_id.len() > 128
            || client_id
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || "/+#".contains(c))
        {
            return Err(ConfigError::new(
                ENV_SERVICE_NAME,
                &client_id,
                "an MQTT client id: up to 128 characters, no spaces, control characters, '/', '+' or '#'",
            ));
        }
        let qos = match env.number(ENV_MQTT_QOS, 2u8, 1, 2)? {
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let tls = BrokerTls::from_env(env)?;
        let username = env.raw(ENV_MQTT_USERNAME);
        let password = password_from_env(env)?;
        if password.is_some() && username.is_none() {
            return Err(ConfigError::new(
                ENV_MQTT_USERNAME,
                "",
                "a user name for the password in MQTT_PASSWORD or MQTT_PASSWORD_FILE",
            ));
        }
        let default_port = if tls.is_some() { 8883 } else { 1883 };
        Ok(Self {
            host,
            port: env.number(ENV_MQTT_PORT, default_port, 1, u16::MAX)?,
            client_id,
            qos,
            session_expiry: Duration::from_secs(u64::from(session_expiry)),
            keep_alive: Duration::from_secs(env.number(ENV_MQTT_KEEPALIVE_SECS, 30, 0, 65_535)?),
            reconnect_min: env.millis(ENV_MQTT_RECONNECT_MIN_MS, Duration::from_millis(250))?,
            reconnect_max: env.millis(ENV_MQTT_RECONNECT_MAX_MS, Duration::from_secs(5))?,
            username,
            password,
            tls,
        })
    }

    /// `mqtt://host:port`, or `mqtts://host:port` with TLS.
    pub fn address(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }

    /// The same broker settings for a second client of the same service, with client id
    /// `<SERVICE_NAME>-<suffix>` (stable, so its session resumes after a restart too).
    pub fn companion(&self, suffix: &str) -> Self {
        Self {
            client_id: format!("{}-{suffix}", self.client_id),
            ..self.clone()
        }
    }

    /// Connect options for a persistent session that resumes after restarts.
    pub fn connect_options(&self) -> ConnectOptions {
        let expiry = u32::try_from(self.session_expiry.as_secs()).unwrap_or(u32::MAX);
        self.base_options()
            .with_clean_start(false)
            .with_session_expiry_interval(expiry)
            // A restarted process resumes the session the broker kept for its client id:
            // that is how unacknowledged messages reach it again.
            .with_resume_existing_session(true)
    }

    /// Connect options for a session the broker forgets on disconnect (`clean_start=true`,
    /// session expiry 0): for control traffic that must never queue behind a backlog.
    pub fn ephemeral_options(&self) -> ConnectOptions {
        self.base_options()
            .with_clean_start(true)
            .with_session_expiry_interval(0)
    }

    fn base_options(&self) -> ConnectOptions {
        let options = ConnectOptions::new(self.client_id.clone())
            .with_keep_alive(self.keep_alive)
            .with_automatic_reconnect(true)
            .with_reconnect_delay(
                self.reconnect_min,
                self.reconnect_max.max(self.reconnect_min),
            );
        match &self.username {
            Some(username) => options.with_credentials(
                username.clone(),
                self.password.as_ref().map_or(&[][..], Secret::expose),
            ),
            None => options,
        }
    }
}

/// What to check when `error` says that the broker refused us or TLS failed, rather than
/// that it is unreachable: such errors do not go away by retrying.
fn refusal(error: &MqttError) -> Option<&'static str> {
    match error {
        MqttError::ConnectionRefused(
            ReasonCode::BadUsernameOrPassword
            | ReasonCode::NotAuthorized
            | ReasonCode::BadAuthenticationMethod,
        )
        | MqttError::BadUsernameOrPassword
        | MqttError::NotAuthorized
        | MqttError::AuthenticationFailed => Some(
            "the broker refused the credentials; check MQTT_USERNAME and MQTT_PASSWORD or MQTT_PASSWORD_FILE",
        ),
        MqttError::ConnectionError(text) if text.contains("TLS") => Some(
            "the TLS handshake failed; check MQTT_TLS, MQTT_CA_FILE (the CA that signed the broker's certificate) and that the certificate names MQTT_HOST",
        ),
        _ => None,
    }
}

/// An MQTT topic name (no wildcards) from `var`, or `default`.
pub fn topic_from_env(env: &Env<'_>, var: &str, default: &str) -> Result<String, ConfigError> {
    let topic = env.string(var, default);
    if mqtt5::is_valid_topic_name(&topic) {
        Ok(topic)
    } else {
        Err(ConfigError::new(
            var,
            &topic,
            "an MQTT topic name without wildcards",
        ))
    }
}

/// The connection as the bridges see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkState {
    /// Connected right now.
    pub connected: bool,
    /// Whether the broker resumed the session on the last CONNACK.
    pub session_present: bool,
    /// CONNACKs received so far; changes on every (re)connect.
    pub connects: u64,
    /// Another instance took this client id's session: the link no longer reconnects
    /// (see [`Link::guard_ownership`]).
    pub taken_over: bool,
    /// The last connection ended with DISCONNECT 0x8E (Session taken over); cleared by the
    /// next CONNACK.
    pub session_moved: bool,
    /// The latest connect generation on which this link still owned its client id: at once
    /// for the first, after reading the ownership record for every reconnect.
    pub confirmed: u64,
}

/// The exit code of a bridge whose broker session another instance with the same client id
/// (`SERVICE_NAME`) took over: it stopped on purpose, not because it failed. Restarting it
/// with the same id takes the session back and displaces the other instance in turn.
pub const EXIT_SESSION_TAKEN_OVER: u8 = 3;

/// The error a bridge's `serve` returns when its session was taken over (see
/// [`EXIT_SESSION_TAKEN_OVER`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "another client connected with client id {client_id} and took over the broker session (DISCONNECT 0x8E)"
)]
pub struct SessionTakenOver {
    /// The client id whose session moved.
    pub client_id: String,
}

/// What a bridge's `serve` returns once its HTTP server finished (`served`): waits for the
/// broker `worker` and returns its [`SessionTakenOver`] if it had one, else `served` (also
/// when the worker panicked).
pub async fn bridge_outcome(
    worker: tokio::task::JoinHandle<Result<(), SessionTakenOver>>,
    served: anyhow::Result<()>,
) -> anyhow::Result<()> {
    match worker.await {
        Ok(Err(taken_over)) => Err(taken_over.into()),
        _ => served,
    }
}

/// What a bridge needs from the broker and a CONNACK may deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// QoS 2 (CONNACK Maximum QoS absent or 2): only its handshake proves the broker has a
    /// message exactly once.
    Qos2,
    /// Shared subscriptions (CONNACK Shared Subscription Available absent or 1): the
    /// legacy-proxy-2 replicas share one `$share` group.
    SharedSubscriptions,
}

impl Capability {
    /// What the broker lacks, for the log line.
    pub fn missing(self) -> &'static str {
        match self {
            Self::Qos2 => {
                "the broker does not grant QoS 2 (CONNACK Maximum QoS below 2, e.g. Mosquitto's max_qos); the bridges need it"
            }
            Self::SharedSubscriptions => {
                "the broker does not offer shared subscriptions (CONNACK Shared Subscription Available = 0, or SUBACK 0x9E); legacy-proxy-2 needs them"
            }
        }
    }

    /// A short label for metrics and log fields.
    pub fn label(self) -> &'static str {
        match self {
            Self::Qos2 => "qos2",
            Self::SharedSubscriptions => "shared_subscriptions",
        }
    }
}

/// Whether a failed SUBSCRIBE says that the broker lacks shared subscriptions: refused by
/// the client because the CONNACK said so, or by the broker with SUBACK 0x9E.
pub fn lacks_shared_subscriptions(error: &MqttError) -> bool {
    matches!(
        error,
        MqttError::SharedSubscriptionsNotSupported
            | MqttError::SubscriptionFailed(ReasonCode::SharedSubscriptionsNotSupported)
    )
}

/// Topic of [`Link::grants_qos`]'s empty publish; no subscription of the bridges matches it.
pub const CAPABILITY_TOPIC: &str = "lps/capability";

/// Why a publish did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// No connection to the broker: nothing was sent.
    #[error("not connected to the broker")]
    NotConnected,
    /// The broker refused the message (PUBACK/PUBREC reason ≥ 0x80): it was discarded.
    #[error("the broker refused the message: {0}")]
    Refused(String),
    /// The outcome is unknown (the connection or session was lost mid-handshake, or the
    /// handshake did not finish in time); the message may or may not be delivered.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The broker grants a lower QoS than asked for (CONNACK Maximum QoS), so the message
    /// went out without the handshake that would prove the broker has it.
    #[error("the broker grants only {0}; nothing proves it kept the message")]
    Downgraded(String),
    /// Anything else the client reported before sending.
    #[error("publish failed: {0}")]
    Failed(String),
}

impl PublishError {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotConnected => "not_connected",
            Self::Refused(_) => "refused",
            Self::Indeterminate(_) => "indeterminate",
            Self::Downgraded(_) => "downgraded",
            Self::Failed(_) => "failed",
        }
    }
}

/// How a publish completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// The handshake finished on the connection it started on.
    Direct,
    /// The handshake finished only after a reconnect. A broker restarted from an older
    /// snapshot answers a resent PUBREL with PUBCOMP even for a message it lost, so such
    /// a completion proves less; publish again where at-least-once matters.
    AfterReconnect,
}

/// Topic prefix of the ownership records: `lps/owner/<client id>`, retained, holding the
/// token of the process that connected last with that client id.
pub const OWNER_TOPIC_PREFIX: &str = "lps/owner/";

/// Decides whether a link whose connection ended still owns its client id, so that of two
/// instances with one id exactly one carries on.
///
/// The broker's DISCONNECT 0x8E says that another connection took the session, but it is
/// not always seen: under load the client can hit a write error on the closed socket
/// before it reads the DISCONNECT, and sees a plain network error. So each link, on its
/// first CONNACK, publishes a retained ownership record (`lps/owner/<client id>`, QoS 1)
/// with a token of its own: the newest instance's record wins. After a 0x8E, and after
/// every later CONNACK (a reconnect that may have displaced a newer instance), a short-lived
/// side client (clean session, its own id) reads the record. Another instance's token means
/// this link was taken over: it disconnects, stops reconnecting and sets
/// [`LinkState::taken_over`]. After a 0x8E without a readable record it stops too; after a
/// reconnect without one it carries on (a broker whose ACL refuses the record topic).
/// Only links that ask for it ([`Link::guard_ownership`]) do any of this.
struct Owner {
    client: MqttClient,
    config: Arc<MqttConfig>,
    nonce: String,
    state: Arc<watch::Sender<LinkState>>,
}

impl Owner {
    async fn watch(self, mut state: watch::Receiver<LinkState>, alive: CancellationToken) {
        let mut handled = 0u64;
        loop {
            let current = *state.borrow_and_update();
            let displaced = if current.session_moved {
                // Trust the 0x8E unless the record says this instance is the newest.
                self.recorded_owner()
                    .await
                    .is_none_or(|owner| owner != self.nonce)
            } else if current.connected && current.connects > handled {
                handled = current.connects;
                let displaced = if handled == 1 {
                    self.publish_record().await;
                    false
                } else {
                    self.recorded_owner()
                        .await
                        .is_some_and(|owner| owner != self.nonce)
                };
                if !displaced {
                    self.state
                        .send_modify(|s| s.confirmed = s.confirmed.max(handled));
                }
                displaced
            } else {
                false
            };
            if displaced {
                self.state.send_modify(|s| {
                    s.taken_over = true;
                    s.connected = false;
                });
                // Turns reconnecting off (and closes a connection made meanwhile).
                let _ = self.client.disconnect().await;
                self.state.send_modify(|s| s.connected = false);
                return;
            }
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                () = alive.cancelled() => return,
            }
        }
    }

    fn topic(&self) -> String {
        format!("{OWNER_TOPIC_PREFIX}{}", self.config.client_id)
    }

    async fn publish_record(&self) {
        let options = PublishOptions {
            qos: QoS::AtLeastOnce,
            retain: true,
            ..PublishOptions::default()
        };
        let sent = self
            .client
            .publish_with_options(self.topic(), self.nonce.clone().into_bytes(), options)
            .await;
        if let Err(error) = sent {
            warn!(client_id = %self.config.client_id, %error, "cannot publish the ownership record; a session takeover is then seen only by DISCONNECT 0x8E");
        }
    }

    /// The token in the ownership record, read by a side client; `None` when there is
    /// none or it cannot be read within a few seconds.
    async fn recorded_owner(&self) -> Option<String> {
        let side = self.config.companion(&format!("owner-{}", self.nonce));
        let client = plain_client(
            &side,
            side.ephemeral_options().with_automatic_reconnect(false),
        )
        .await;
        let read = async {
            client.connect(&self.config.address()).await.ok()?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let options = mqtt5::SubscribeOptions {
                qos: QoS::AtMostOnce,
                ..mqtt5::SubscribeOptions::default()
            };
            client
                .subscribe_with_options(self.topic(), options, move |message| {
                    let _ = tx.send(String::from_utf8_lossy(&message.payload).into_owned());
                })
                .await
                .ok()?;
            // A retained message follows the SUBACK at once; none means no record.
            tokio::time::timeout(Duration::from_secs(1), rx.recv())
                .await
                .ok()
                .flatten()
        };
        let owner = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .ok()
            .flatten();
        let _ = client.disconnect().await;
        owner
    }
}

/// A token unique to one link of one process.
fn owner_nonce() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{now:x}-{:x}-{n}", std::process::id())
}

/// A client with `options`, the link's TLS settings, and no queueing while disconnected.
async fn plain_client(config: &MqttConfig, options: ConnectOptions) -> MqttClient {
    let client = MqttClient::with_options(options);
    // Fail fast instead of queueing inside the client while disconnected: a request
    // must not be acknowledged on the strength of a queue that a restart loses.
    client.set_queue_on_disconnect(false).await;
    if let Some(tls) = &config.tls {
        // Checked when the configuration was read; reconnects reuse it.
        client
            .set_tls_config(
                tls.client_cert_pem.clone(),
                tls.client_key_pem.as_ref().map(|k| k.expose().to_vec()),
                tls.ca_pem.clone(),
            )
            .await;
    }
    client
}

/// One MQTT client with a persistent session.
#[derive(Clone)]
pub struct Link {
    /// The client.
    pub client: MqttClient,
    config: Arc<MqttConfig>,
    state: watch::Receiver<LinkState>,
    sender: Arc<watch::Sender<LinkState>>,
    /// Cancelled when the last clone of the link is gone: ends the ownership guard.
    alive: CancellationToken,
    _guard: Arc<tokio_util::sync::DropGuard>,
}

impl Link {
    /// Creates the client with `options` (from [`MqttConfig::connect_options`], tuned by
    /// the caller); it does not connect yet.
    pub async fn new(config: MqttConfig, options: ConnectOptions) -> anyhow::Result<Self> {
        let client = plain_client(&config, options).await;
        let (tx, state) = watch::channel(LinkState::default());
        let tx = Arc::new(tx);
        let events = tx.clone();
        let client_id = config.client_id.clone();
        client
            .on_connection_event(move |event| match event {
                ConnectionEvent::Connected {
                    session_present, ..
                } => {
                    events.send_modify(|s| {
                        s.connected = true;
                        s.session_present = session_present;
                        s.connects += 1;
                        s.session_moved = false;
                    });
                    info!(client_id, session_present, "connected to the broker");
                }
                ConnectionEvent::Disconnected {
                    reason: DisconnectReason::ServerDisconnect(ReasonCode::SessionTakenOver),
                } => {
                    events.send_modify(|s| {
                        s.connected = false;
                        s.session_moved = true;
                    });
                    warn!(
                        client_id,
                        "disconnected: another client connected with this client id (0x8E)"
                    );
                }
                ConnectionEvent::Disconnected { reason } => {
                    events.send_modify(|s| s.connected = false);
                    warn!(client_id, ?reason, "disconnected from the broker");
                }
                ConnectionEvent::ReconnectFailed { error } => {
                    events.send_modify(|s| s.connected = false);
                    warn!(client_id, %error, "reconnecting gave up");
                }
                _ => {}
            })
            .await?;
        let alive = CancellationToken::new();
        Ok(Self {
            client,
            config: Arc::new(config),
            state,
            sender: tx,
            _guard: Arc::new(alive.clone().drop_guard()),
            alive,
        })
    }

    /// Makes this link one of a kind for its client id (the bridges):
    /// publishes the ownership record on the first CONNACK and, when another instance took
    /// the session over, stops reconnecting and sets [`LinkState::taken_over`]. Call once,
    /// before connecting. Without it (simulated devices) a link just reconnects.
    pub fn guard_ownership(&self) {
        tokio::spawn(
            Owner {
                client: self.client.clone(),
                config: self.config.clone(),
                nonce: owner_nonce(),
                state: self.sender.clone(),
            }
            .watch(self.state.clone(), self.alive.clone()),
        );
    }

    /// The client id of this link.
    pub fn client_id(&self) -> &str {
        &self.config.client_id
    }

    /// Whether another client took over this link's session (see [`LinkState::taken_over`]).
    pub fn is_taken_over(&self) -> bool {
        self.state.borrow().taken_over
    }

    /// Waits until this link's ownership of its client id was confirmed on connect
    /// `generation` (see [`LinkState::confirmed`]); never returns once taken over.
    pub async fn owner_confirmed(&self, generation: u64) {
        let mut state = self.state();
        let confirmed = state
            .wait_for(|s| s.confirmed >= generation && !s.taken_over)
            .await
            .is_ok();
        if !confirmed {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until another client took over this link's session.
    pub async fn taken_over(&self) {
        let mut state = self.state();
        let taken = state.wait_for(|s| s.taken_over).await.is_ok();
        if !taken {
            std::future::pending::<()>().await;
        }
    }

    /// Whether the broker grants `qos` on the current connection: one empty, non-retained
    /// publish at `qos` to [`CAPABILITY_TOPIC`]. The client sends it at the CONNACK's
    /// Maximum QoS when that is lower, so `Ok(false)` means the broker lacks `qos`; a
    /// refusal (PUBREC ≥ 0x80, e.g. quota exceeded) still answered at `qos`, so it counts as
    /// granted. `Err` when nothing was learnt: not connected, or no answer within `timeout`
    /// ([`PublishError::Indeterminate`]; every publish checks its QoS again anyway).
    pub async fn grants_qos(&self, qos: QoS, timeout: Duration) -> Result<bool, PublishError> {
        match self
            .publish(CAPABILITY_TOPIC, Vec::new(), qos, Vec::new(), timeout)
            .await
        {
            Ok(_) | Err(PublishError::Refused(_)) => Ok(true),
            Err(PublishError::Downgraded(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Logs at `error` that the broker lacks `capability` (the bridge stays not ready), then
    /// waits the longest reconnect delay before the caller asks again, or until `stop`.
    pub async fn refuse_broker(&self, capability: Capability, stop: &CancellationToken) {
        let delay = self.config.reconnect_max.max(self.config.reconnect_min);
        error!(
            address = %self.config.address(),
            client_id = %self.config.client_id,
            capability = capability.label(),
            retry_in_ms = delay.as_millis() as u64,
            "refusing the broker, not ready: {}",
            capability.missing()
        );
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    /// Watches the connection state.
    pub fn state(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// Whether the client is connected now.
    pub fn is_connected(&self) -> bool {
        self.state.borrow().connected
    }

    /// Connects, retrying with capped exponential backoff until it succeeds or `shutdown`
    /// fires; afterwards the client reconnects by itself. Returns whether it connected.
    pub async fn connect(&self, shutdown: &CancellationToken) -> bool {
        let address = self.config.address();
        let mut delay = self.config.reconnect_min;
        loop {
            if self.is_connected() {
                return true;
            }
            if self.is_taken_over() {
                return false;
            }
            match self.client.connect(&address).await {
                Ok(()) => return true,
                Err(error) => match refusal(&error) {
                    Some(check) => {
                        // Retrying soon cannot help: a human must fix the configuration
                        // (or the broker). Keep trying, at the longest delay.
                        delay = self.config.reconnect_max.max(self.config.reconnect_min);
                        error!(
                            %address,
                            username = self.config.username.as_deref().unwrap_or(""),
                            %error,
                            retry_in_ms = delay.as_millis() as u64,
                            "cannot connect to the broker: {check}"
                        );
                    }
                    None => warn!(
                        %address,
                        %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot connect to the broker"
                    ),
                },
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.config.reconnect_max.max(self.config.reconnect_min));
        }
    }

    /// Waits until connected or `within` passes.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let mut state = self.state();
        tokio::time::timeout(within, state.wait_for(|s| s.connected))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The connect generation now (see [`LinkState::connects`]).
    pub fn generation(&self) -> u64 {
        self.state.borrow().connects
    }

    /// Publishes at `qos` and waits up to `timeout` for the end of the handshake (PUBCOMP
    /// for QoS 2).
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        qos: QoS,
        user_properties: Vec<(String, String)>,
        timeout: Duration,
    ) -> Result<Completed, PublishError> {
        let mut options = PublishOptions {
            qos,
            ..PublishOptions::default()
        };
        options.properties.user_properties = user_properties;
        self.publish_with(topic, payload, options, timeout).await
    }

    /// [`Link::publish`] with every option (retain, properties) the caller's to set. A
    /// message the client sent at a lower QoS than `options.qos` (the broker's CONNACK
    /// Maximum QoS is lower) is [`PublishError::Downgraded`], never a success.
    pub async fn publish_with(
        &self,
        topic: &str,
        payload: Vec<u8>,
        options: PublishOptions,
        timeout: Duration,
    ) -> Result<Completed, PublishError> {
        if !self.is_connected() {
            return Err(PublishError::NotConnected);
        }
        let qos = options.qos;
        let downgraded = |used: QoS| {
            ((used as u8) < (qos as u8))
                .then(|| PublishError::Downgraded(format!("{used:?}, not {qos:?}")))
        };
        let started = self.client.publish_with_options(topic, payload, options);
        let result = match tokio::time::timeout(timeout, started).await {
            Err(_) => {
                return Err(PublishError::Indeterminate(format!(
                    "no acknowledgement within {timeout:?}"
                )));
            }
            Ok(Err(MqttError::NotConnected)) => return Err(PublishError::NotConnected),
            Ok(Err(MqttError::PublishFailed(reason))) => {
                return Err(PublishError::Refused(format!("{reason:?}")));
            }
            Ok(Err(error)) => return Err(PublishError::Failed(error.to_string())),
            Ok(Ok(result)) => result,
        };
        match result {
            PublishResult::Sent(delivery) => match downgraded(delivery.qos_used()) {
                Some(error) => Err(error),
                None => Ok(Completed::Direct),
            },
            PublishResult::Queued(handle) => {
                // Sent, but the connection ended (or the acknowledgement is late): the
                // client resends on the resumed session; wait for that outcome.
                match tokio::time::timeout(timeout, handle.outcome()).await {
                    Err(_) => Err(PublishError::Indeterminate(format!(
                        "no acknowledgement within {timeout:?}"
                    ))),
                    Ok(PublishOutcome::Delivered(delivery)) => {
                        match downgraded(delivery.qos_used()) {
                            Some(error) => Err(error),
                            None => Ok(Completed::AfterReconnect),
                        }
                    }
                    Ok(PublishOutcome::Rejected(rejection)) => {
                        Err(PublishError::Refused(format!("{rejection:?}")))
                    }
                    Ok(PublishOutcome::Indeterminate(reason)) => {
                        Err(PublishError::Indeterminate(format!("{reason:?}")))
                    }
                }
            }
        }
    }

    /// Disconnects cleanly (the broker keeps the session).
    pub async fn disconnect(&self) {
        match self.client.disconnect().await {
            // Already down (e.g. taken over): nothing to close.
            Ok(()) | Err(MqttError::NotConnected) => {}
            Err(error) => warn!(%error, "disconnect failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{ENV_MQTT_BROKER, ENV_MQTT_HOST, ENV_MQTT_PORT, ENV_SERVICE_NAME};

    #[test]
    fn broker_settings_from_env() {
        let env: HashMap<&str, &str> = [
            (ENV_MQTT_BROKER, "mosquitto"),
            (ENV_SERVICE_NAME, "proxy1-1"),
        ]
        .into();
        let cfg = MqttConfig::from_env(&Env::new(&env), "x").unwrap();
        assert_eq!(cfg.address(), "mqtt://mosquitto:1883");
        assert_eq!(cfg.client_id, "proxy1-1");
        let env: HashMap<&str, &str> = [(ENV_MQTT_HOST, "a"), (ENV_MQTT_BROKER, "b")].into();
        assert_eq!(
            MqttConfig::from_env(&Env::new(&env), "x").unwrap().host,
            "a"
        );
        let env: HashMap<&str, &str> = [(ENV_MQTT_HOST, "mqtt://a:1")].into();
        assert_eq!(
            MqttConfig::from_env(&Env::new(&env), "x").unwrap_err().var,
            ENV_MQTT_HOST
        );
        let env: HashMap<&str, &str> = [(ENV_MQTT_PORT, "0")].into();
        assert_eq!(
            MqttConfig::from_env(&Env::new(&env), "x").unwrap_err().var,
            ENV_MQTT_PORT
        );
    }
}

/// Rewrites a Mosquitto configuration (normally `mosquitto/mosquitto.conf`) for a local
/// run: listens on `127.0.0.1:port`, persists in and logs to `dir`, and applies each
/// `overrides` line (`"key value"`), dropping the base's lines for the same keys. When
/// running as root, `user root` keeps Mosquitto from switching to a user that cannot
/// write `dir`.
pub fn mosquitto_config(
    base: &str,
    port: u16,
    dir: &std::path::Path,
    overrides: &[&str],
    as_root: bool,
) -> String {
    let replaced: Vec<&str> = overrides
        .iter()
        .filter_map(|line| line.split_whitespace().next())
        .chain(["listener", "persistence_location", "log_dest", "user"])
        .collect();
    let mut config: String = base
        .lines()
        .filter(|line| !replaced.contains(&line.split_whitespace().next().unwrap_or("")))
        .map(|line| format!("{line}\n"))
        .collect();
    config.push_str(&format!("listener {port} 127.0.0.1\n"));
    config.push_str(&format!("persistence_location {}/\n", dir.display()));
    config.push_str(&format!(
        "log_dest file {}\n",
        dir.join("mosquitto.log").display()
    ));
    if as_root {
        config.push_str("user root\n");
    }
    for line in overrides {
        config.push_str(line);
        config.push('\n');
    }
    config
}

#[cfg(test)]
mod config_tests {
    #[test]
    fn mosquitto_config_is_redirected_and_overridden() {
        let base = "listener 1883\npersistence true\npersistence_location /mosquitto/data/\nmax_inflight_messages 128\n";
        let out = super::mosquitto_config(
            base,
            4000,
            std::path::Path::new("/tmp/x"),
            &["max_inflight_messages 1"],
            true,
        );
        assert!(
            !out.contains("1883") && !out.contains("/mosquitto/data/") && !out.contains("128"),
            "{out}"
        );
        for line in [
            "listener 4000 127.0.0.1",
            "persistence true",
            "persistence_location /tmp/x/",
            "user root",
            "max_inflight_messages 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
    }
}

/// The Mosquitto executable, if installed (`/usr/sbin/mosquitto` or on `PATH`).
pub fn mosquitto_binary() -> Option<std::path::PathBuf> {
    let fixed = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"].map(std::path::PathBuf::from);
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("mosquitto"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    fixed.into_iter().chain(on_path).find(|p| p.is_file())
}
