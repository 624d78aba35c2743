//! legacy-proxy-2: the MQTT → HTTP bridge.
//!
//! Subscribes to `$share/legacy_proxy/+/message` and `$share/legacy_proxy/+/retry/message`
//! (QoS `MQTT_QOS`, deferred acknowledgements, persistent session) and forwards each
//! payload with `POST TARGET_URL` (h2c when `USE_HTTP_2`) and `Request-Id` from the
//! payload. A message is acknowledged only
//!
//! - after the target answered 2xx, or
//! - after it was republished (QoS 2, PUBCOMP received) to `<SERVICE_NAME>/retry/message`
//!   with its attempt count (MQTT v5 user property `attempt`) incremented, following a
//!   backoff of `RETRY_BACKOFF_MS` doubling up to `RETRY_BACKOFF_MAX_MS`, or
//! - after it was published to `DEAD_LETTER_TOPIC` with a reason (user property
//!   `dead-letter-reason`): when `MAX_ATTEMPTS` is reached, when the target rejects it with
//!   a 4xx (retrying the same payload cannot help), or when the payload is not a JSON object
//!   with a decimal `request_id`, or larger than `MAX_PAYLOAD_BYTES`.
//!
//! Nothing is dropped: a message that cannot be republished stays unacknowledged, and the
//! broker redelivers it. At most `MQTT_RECEIVE_MAXIMUM` messages are in flight (announced
//! to the broker as the MQTT v5 Receive Maximum, and enforced here too since some brokers
//! ignore it); acknowledgements leave in arrival order as MQTT requires.
//!
//! Probe messages from legacy-proxy-1 (user property `lps-probe`) are answered on the
//! reply topic they name and acknowledged; they are never forwarded.
//!
//! Serves `/healthz`, `/readyz` (connected and subscribed) and `/metrics` on `HTTP_PORT`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use lps_common::config::{ConfigError, Env, Lookup, ServerConfig};
use lps_common::mqtt::mqtt5::packet::publish::PublishPacket;
use lps_common::mqtt::mqtt5::{AckToken, QoS, SubscribeOptions};
use lps_common::mqtt::{Link, MqttConfig};
use lps_common::request_id::RequestId;
use lps_common::server::{Protocols, shutdown_on_signals};
use lps_common::telemetry::TelemetryConfig;
use lps_common::upstream::{Upstream, UpstreamConfig, UpstreamError};
use lps_common::wire::{
    ATTEMPT_PROPERTY, DEAD_LETTER_REASON_PROPERTY, PROBE_PROPERTY, SHARE_GROUP, bridge_filters,
    retry_topic,
};
use lps_common::{Registry, api, finish_router, service};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// How long a stopping bridge keeps the connection after its last acknowledgement.
const ACK_SETTLE: Duration = Duration::from_millis(200);

/// Default target: ars-comp-2 on its usual port.
pub const DEFAULT_TARGET: &str = "http://localhost:8080/ID_REQ_KC_STORE7D3BPACKET";

/// Everything legacy-proxy-2 reads from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Admin server (`/healthz`, `/readyz`, `/metrics`).
    pub server: ServerConfig,
    /// Logging.
    pub telemetry: TelemetryConfig,
    /// Broker connection.
    pub mqtt: MqttConfig,
    /// Where messages are forwarded.
    pub upstream: UpstreamConfig,
    /// `MQTT_SHARE_GROUP`: the shared-subscription group (default `legacy_proxy`).
    pub group: String,
    /// `MQTT_RECEIVE_MAXIMUM`: messages in flight at once (default 32; upstream used 1).
    pub receive_maximum: u16,
    /// `MAX_ATTEMPTS`: deliveries before a message goes to the dead-letter topic (default 10).
    pub max_attempts: u32,
    /// `RETRY_BACKOFF_MS`: wait before the first republish (default 500), doubling.
    pub retry_backoff: Duration,
    /// `RETRY_BACKOFF_MAX_MS`: the longest wait between attempts (default 30000).
    pub retry_backoff_max: Duration,
    /// `DEAD_LETTER_TOPIC`: where undeliverable messages go (default
    /// `legacy_proxy/dead_letter`).
    pub dead_letter_topic: String,
    /// `MAX_PAYLOAD_BYTES`: larger payloads are dead-lettered (default 1 MiB).
    pub max_payload_bytes: usize,
    /// `PUBLISH_TIMEOUT_MS`: how long a republish may take (default 5000).
    pub publish_timeout: Duration,
}

impl Config {
    /// Reads the configuration from `lookup`.
    pub fn from_lookup(lookup: &dyn Lookup) -> Result<Self, ConfigError> {
        let env = Env::new(lookup);
        let dead_letter_topic = lps_common::mqtt::topic_from_env(
            &env,
            "DEAD_LETTER_TOPIC",
            "legacy_proxy/dead_letter",
        )?;
        let group = env.string("MQTT_SHARE_GROUP", SHARE_GROUP);
        if group.contains(['/', '+', '#']) {
            return Err(ConfigError::new(
                "MQTT_SHARE_GROUP",
                &group,
                "a group name without '/', '+' or '#'",
            ));
        }
        Ok(Self {
            server: ServerConfig::from_env(&env, 8080)?,
            telemetry: TelemetryConfig::from_env(&env, "legacy-proxy-2")?,
            mqtt: MqttConfig::from_env(&env, "legacy-proxy-2")?,
            upstream: UpstreamConfig::from_env(&env, DEFAULT_TARGET)?,
            group,
            receive_maximum: env.number("MQTT_RECEIVE_MAXIMUM", 32, 1, 65_535)?,
            max_attempts: env.number("MAX_ATTEMPTS", 10, 1, 1000)?,
            retry_backoff: env.millis("RETRY_BACKOFF_MS", Duration::from_millis(500))?,
            retry_backoff_max: env.millis("RETRY_BACKOFF_MAX_MS", Duration::from_secs(30))?,
            dead_letter_topic,
            max_payload_bytes: env.number("MAX_PAYLOAD_BYTES", 1 << 20, 1, 256 << 20)?,
            publish_timeout: env.millis("PUBLISH_TIMEOUT_MS", Duration::from_secs(5))?,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone)]
struct Metrics {
    received: Counter,
    forwarded: Counter,
    retried: Counter,
    dead_lettered: Family<ReasonLabels, Counter>,
    probes: Counter,
    in_flight: Gauge,
    forward_latency: Histogram,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            received: Counter::default(),
            forwarded: Counter::default(),
            retried: Counter::default(),
            dead_lettered: Family::default(),
            probes: Counter::default(),
            in_flight: Gauge::default(),
            forward_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
        };
        registry.register(
            "bridge_received",
            "Messages received from the broker (probes excluded)",
            m.received.clone(),
        );
        registry.register(
            "bridge_forwarded",
            "Messages the target accepted (2xx)",
            m.forwarded.clone(),
        );
        registry.register(
            "bridge_retried",
            "Messages republished to the retry topic",
            m.retried.clone(),
        );
        registry.register(
            "bridge_dead_lettered",
            "Messages published to the dead-letter topic, by reason",
            m.dead_lettered.clone(),
        );
        registry.register(
            "bridge_probes",
            "Subscriber probes answered",
            m.probes.clone(),
        );
        registry.register(
            "bridge_in_flight",
            "Messages being handled",
            m.in_flight.clone(),
        );
        registry.register(
            "bridge_forward_duration_seconds",
            "Time of one forwarding attempt",
            m.forward_latency.clone(),
        );
        m
    }
}

/// A message with the token that acknowledges it.
struct Inbound {
    packet: PublishPacket,
    token: AckToken,
}

/// What to do with a message after one forwarding attempt.
enum Verdict {
    Forwarded,
    Retry(String),
    DeadLetter(&'static str, String),
}

/// The bridge state shared by the tasks.
pub struct Bridge {
    link: Link,
    config: Config,
    upstream: Upstream,
    ready: Arc<AtomicBool>,
    metrics: Metrics,
}

impl Bridge {
    /// Creates the MQTT client (not yet connected) and the HTTP client.
    pub async fn new(config: Config, registry: &mut Registry) -> anyhow::Result<Arc<Self>> {
        let options = config
            .mqtt
            .connect_options()
            .with_deferred_ack(true)
            .with_receive_maximum(config.receive_maximum);
        let link = Link::new(config.mqtt.clone(), options).await?;
        let upstream = Upstream::new(&config.upstream, registry)?;
        Ok(Arc::new(Self {
            link,
            upstream,
            ready: Arc::new(AtomicBool::new(false)),
            metrics: Metrics::register(registry),
            config,
        }))
    }

    /// The readiness flag (`/readyz`): connected and subscribed.
    pub fn ready(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// Connects, subscribes (again after every CONNACK: Mosquitto does not restore shared
    /// subscriptions after a restart), and handles messages until `shutdown` fires. Then
    /// it takes no new messages, lets the ones in flight finish (forwarded, retried or
    /// dead-lettered, and acknowledged) within `grace`, and disconnects.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, grace: Duration) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Inbound>();
        let filters = bridge_filters(&self.config.group);
        for filter in &filters {
            // Registered before connecting: a resumed session flushes its messages right
            // after CONNACK, before any SUBSCRIBE.
            let registered = self
                .link
                .client
                .register_ack_callback(filter.clone(), enqueue(tx.clone()))
                .await;
            if let Err(e) = registered {
                error!(error = %e, "cannot register the message handler");
                return;
            }
        }
        if !self.link.connect(&shutdown).await {
            return;
        }
        let subscriber = tokio::spawn(self.clone().keep_subscribed(filters, tx, shutdown.clone()));
        let window = Arc::new(Semaphore::new(usize::from(self.config.receive_maximum)));
        let tasks = TaskTracker::new();
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = window.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            };
            let inbound = tokio::select! {
                () = shutdown.cancelled() => break,
                inbound = rx.recv() => match inbound { Some(i) => i, None => break },
            };
            let this = self.clone();
            tasks.spawn(async move {
                this.handle(inbound).await;
                drop(permit);
            });
        }
        self.ready.store(false, Ordering::Release);
        tasks.close();
        info!(
            in_flight = tasks.len(),
            "taking no new messages; finishing those in flight"
        );
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            warn!(
                left = tasks.len(),
                "grace period over; unacknowledged messages will be redelivered"
            );
        }
        subscriber.abort();
        // Acknowledgements leave through the client's background writer; give the last
        // ones a moment to reach the broker so it does not deliver those messages again.
        // (The client offers no way to wait for that; on loopback it takes microseconds.)
        tokio::time::sleep(ACK_SETTLE).await;
        self.link.disconnect().await;
        // Messages that arrived but were not started: unacknowledged, so the broker
        // delivers them again. Forget the tokens rather than let them send a negative
        // acknowledgement (which would make the broker drop the message).
        rx.close();
        let mut left = 0;
        while let Ok(inbound) = rx.try_recv() {
            std::mem::forget(inbound.token);
            left += 1;
        }
        if left > 0 {
            info!(left, "left unacknowledged for redelivery");
        }
    }

    async fn keep_subscribed(
        self: Arc<Self>,
        filters: [String; 2],
        tx: mpsc::UnboundedSender<Inbound>,
        shutdown: CancellationToken,
    ) {
        let mut state = self.link.state();
        loop {
            let current = *state.borrow_and_update();
            if current.connected {
                let options = SubscribeOptions {
                    qos: self.config.mqtt.qos,
                    ..SubscribeOptions::default()
                };
                let mut subscribed = true;
                for filter in &filters {
                    // Replaces the handler registered in `run` with an identical one.
                    if let Err(e) = self
                        .link
                        .client
                        .subscribe_with_ack(filter.clone(), options.clone(), enqueue(tx.clone()))
                        .await
                    {
                        warn!(%filter, error = %e, "subscribe failed");
                        subscribed = false;
                    }
                }
                self.ready.store(subscribed, Ordering::Release);
                if subscribed {
                    info!(connects = current.connects, "subscribed");
                }
            } else {
                self.ready.store(false, Ordering::Release);
            }
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn handle(&self, inbound: Inbound) {
        let Inbound { packet, token } = inbound;
        if let Some(reply) = packet.properties.get_user_property_value(PROBE_PROPERTY) {
            self.answer_probe(reply.to_owned(), &packet, token).await;
            return;
        }
        self.metrics.received.inc();
        self.metrics.in_flight.inc();
        let attempt: u32 = packet
            .properties
            .get_user_property_value(ATTEMPT_PROPERTY)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1);
        let verdict = match self.validate(&packet.payload) {
            Err((reason, detail)) => Verdict::DeadLetter(reason, detail),
            Ok(request_id) => self.forward(&packet.payload, &request_id).await,
        };
        match verdict {
            Verdict::Forwarded => {
                self.metrics.forwarded.inc();
                token.ack();
            }
            Verdict::Retry(why) if attempt < self.config.max_attempts => {
                let wait = self.backoff(attempt);
                debug!(attempt, wait_ms = wait.as_millis() as u64, %why, "forwarding failed; will retry");
                tokio::time::sleep(wait).await;
                let mut properties = vec![(ATTEMPT_PROPERTY.to_owned(), (attempt + 1).to_string())];
                properties.push(("last-error".to_owned(), why));
                let topic = retry_topic(&self.config.mqtt.client_id);
                self.publish_until_done(&topic, packet.payload.to_vec(), properties)
                    .await;
                self.metrics.retried.inc();
                token.ack();
            }
            Verdict::Retry(why) => {
                self.dead_letter(
                    &packet,
                    token,
                    attempt,
                    "max_attempts",
                    format!("gave up after {attempt} attempts: {why}"),
                )
                .await;
            }
            Verdict::DeadLetter(reason, detail) => {
                self.dead_letter(&packet, token, attempt, reason, detail)
                    .await;
            }
        }
        self.metrics.in_flight.dec();
    }

    fn validate(&self, payload: &[u8]) -> Result<RequestId, (&'static str, String)> {
        if payload.len() > self.config.max_payload_bytes {
            return Err((
                "too_large",
                format!(
                    "payload of {} bytes exceeds MAX_PAYLOAD_BYTES={}",
                    payload.len(),
                    self.config.max_payload_bytes
                ),
            ));
        }
        let value: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| ("not_json", format!("payload is not JSON: {e}")))?;
        let id = match value.get("request_id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(other) => {
                return Err((
                    "no_request_id",
                    format!("request_id is not a decimal id: {other}"),
                ));
            }
            None if value.is_object() => {
                return Err(("no_request_id", "payload has no request_id".to_owned()));
            }
            None => return Err(("not_json", "payload is not a JSON object".to_owned())),
        };
        RequestId::parse(&id).map_err(|e| ("no_request_id", e.message))
    }

    async fn forward(&self, payload: &Bytes, request_id: &RequestId) -> Verdict {
        let started = Instant::now();
        let result = self.upstream.post_json(payload.clone(), request_id).await;
        self.metrics
            .forward_latency
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(_) => {
                debug!(%request_id, "forwarded");
                Verdict::Forwarded
            }
            Err(UpstreamError::Status { status, .. })
                if status.is_client_error()
                    && status != StatusCode::REQUEST_TIMEOUT
                    && status != StatusCode::TOO_MANY_REQUESTS =>
            {
                Verdict::DeadLetter("rejected", format!("the target rejected it with {status}"))
            }
            Err(error) => {
                warn!(%request_id, %error, "forwarding failed");
                Verdict::Retry(error.to_string())
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.config
            .retry_backoff
            .saturating_mul(factor)
            .min(self.config.retry_backoff_max)
    }

    async fn dead_letter(
        &self,
        packet: &PublishPacket,
        token: AckToken,
        attempt: u32,
        reason: &'static str,
        detail: String,
    ) {
        warn!(topic = %packet.topic_name, attempt, reason, %detail, "dead-lettering a message");
        let properties = vec![
            (
                DEAD_LETTER_REASON_PROPERTY.to_owned(),
                format!("{reason}: {detail}"),
            ),
            (ATTEMPT_PROPERTY.to_owned(), attempt.to_string()),
            ("source-topic".to_owned(), packet.topic_name.clone()),
            (
                "dead-lettered-by".to_owned(),
                self.config.mqtt.client_id.clone(),
            ),
        ];
        self.publish_until_done(
            &self.config.dead_letter_topic,
            packet.payload.to_vec(),
            properties,
        )
        .await;
        self.metrics
            .dead_lettered
            .get_or_create(&ReasonLabels { reason })
            .inc();
        token.ack();
    }

    async fn answer_probe(&self, reply: String, packet: &PublishPacket, token: AckToken) {
        let generation = packet
            .properties
            .get_user_property_value("generation")
            .unwrap_or("0")
            .to_owned();
        match self
            .link
            .publish(
                &reply,
                generation.into_bytes(),
                QoS::AtLeastOnce,
                Vec::new(),
                self.config.publish_timeout,
            )
            .await
        {
            Ok(_) => {
                self.metrics.probes.inc();
            }
            Err(e) => debug!(error = %e, "probe answer not sent"),
        }
        token.ack();
    }

    /// Publishes with QoS 2 until the broker completed the handshake. The message this
    /// replaces is acknowledged only afterwards, so nothing is lost if this takes a while.
    async fn publish_until_done(
        &self,
        topic: &str,
        payload: Vec<u8>,
        properties: Vec<(String, String)>,
    ) {
        let mut wait = Duration::from_millis(100);
        loop {
            match self
                .link
                .publish(
                    topic,
                    payload.clone(),
                    QoS::ExactlyOnce,
                    properties.clone(),
                    self.config.publish_timeout,
                )
                .await
            {
                Ok(_) => return,
                Err(error) => {
                    warn!(topic, %error, retry_in_ms = wait.as_millis() as u64, "republish failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// The message handler: hands each message to the dispatcher. It runs inside the MQTT
/// client, so it never blocks.
fn enqueue(
    tx: mpsc::UnboundedSender<Inbound>,
) -> impl Fn(PublishPacket, AckToken) + Send + Sync + 'static {
    move |packet, token| {
        if let Err(mpsc::error::SendError(inbound)) = tx.send(Inbound { packet, token }) {
            // Shutting down: leave it unacknowledged for redelivery.
            std::mem::forget(inbound.token);
        }
    }
}

/// The admin router: `/healthz`, `/readyz`, `/metrics`.
pub fn app(bridge: &Bridge, registry: Registry, max_body_bytes: usize) -> Router {
    finish_router(api::readyz(bridge.ready()), registry, max_body_bytes)
}

/// Runs the bridge and its admin server until SIGTERM/SIGINT, then drains.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let server = config.server.clone();
    let bridge = Bridge::new(config, &mut registry).await?;
    let shutdown = shutdown_on_signals();
    let worker = tokio::spawn(bridge.clone().run(shutdown.clone(), server.shutdown_grace));
    let served = service::serve(
        &server,
        app(&bridge, registry, server.max_body_bytes),
        Protocols::Http1AndH2c,
        shutdown,
    )
    .await;
    let _ = worker.await;
    served
}

/// The binary's entry point: configuration from the process environment (exit 64 when
/// invalid), then [`run`] until SIGTERM/SIGINT.
pub fn main() -> std::process::ExitCode {
    let config = Config::from_lookup(&lps_common::config::ProcessEnv)
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    service::main(&config.telemetry.clone(), run(config))
}
