//! legacy-proxy-1: the HTTP → MQTT bridge.
//!
//! `POST /ID_REQ_KC_STORE7D3BPACKET` with `{"id","body"}` is published as
//! `{"id","body","request_id"}` to `MQTT_TOPIC` with QoS 2 (MQTT v5, client id
//! `SERVICE_NAME`, persistent session). The answer is 200 only once the broker completed
//! the QoS 2 handshake (PUBCOMP) for *that* message; 503 with `Retry-After` when the broker
//! is unreachable, refused the message (a PUBREC reason ≥ 0x80 such as 0x97 quota exceeded
//! means it was discarded), or the handshake did not finish within `PUBLISH_TIMEOUT_MS`.
//!
//! Two safeguards go beyond the handshake, both because Mosquitto persists by snapshot:
//!
//! - **Subscriber probe.** Mosquitto does not restore shared subscriptions after a restart,
//!   and a QoS 2 message published while the group has no member is dropped with a
//!   successful PUBREC. After every (re)connect the bridge therefore sends a probe through
//!   its topic and admits traffic only once a legacy-proxy-2 answered it
//!   (`SUBSCRIBER_PROBE`, on by default).
//! - **Replay window.** A broker killed between two snapshots forgets messages it already
//!   completed. The bridge keeps what it acknowledged in the last `REPLAY_WINDOW_MS` and
//!   publishes it again after a reconnect: at-least-once, with duplicates after a broker
//!   crash instead of losses.
//!
//! Environment: the server and logging variables of `lps-common`, the broker variables of
//! [`lps_common::mqtt`], and `MQTT_TOPIC`, `MQTT_QOS`, `PUBLISH_TIMEOUT_MS`,
//! `MQTT_MAX_INFLIGHT`, `REPLAY_WINDOW_MS`, `SUBSCRIBER_PROBE`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode};
use lps_common::api::{self, ApiError, Body};
use lps_common::config::{ConfigError, Env, Lookup, ServerConfig};
use lps_common::mqtt::mqtt5::{QoS, SubscribeOptions};
use lps_common::mqtt::{Completed, Link, MqttConfig, PublishError};
use lps_common::server::{Protocols, shutdown_on_signals};
use lps_common::telemetry::TelemetryConfig;
use lps_common::wire::{PROBE_PROPERTY, STORE_PATH, probe_reply_topic};
use lps_common::{Registry, finish_router, service};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Everything legacy-proxy-1 reads from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Inbound server.
    pub server: ServerConfig,
    /// Logging.
    pub telemetry: TelemetryConfig,
    /// Broker connection.
    pub mqtt: MqttConfig,
    /// `MQTT_TOPIC`: where requests are published (default `proxy1/message`).
    pub topic: String,
    /// `PUBLISH_TIMEOUT_MS`: how long a request waits for its handshake (default 5000).
    pub publish_timeout: Duration,
    /// `MQTT_MAX_INFLIGHT`: publishes in flight at once (default 1024); the broker's
    /// Receive Maximum bounds it further.
    pub max_inflight: usize,
    /// `REPLAY_WINDOW_MS`: how long acknowledged messages are kept for a replay after a
    /// reconnect (default 5000; 0 turns replay off). Must exceed the broker's save interval.
    pub replay_window: Duration,
    /// `SUBSCRIBER_PROBE`: admit traffic after a (re)connect only once a legacy-proxy-2
    /// answered a probe (default true).
    pub probe: bool,
}

impl Config {
    /// Reads the configuration from `lookup`.
    pub fn from_lookup(lookup: &dyn Lookup) -> Result<Self, ConfigError> {
        let env = Env::new(lookup);
        let topic = lps_common::mqtt::topic_from_env(&env, "MQTT_TOPIC", "proxy1/message")?;
        Ok(Self {
            server: ServerConfig::from_env(&env, 8080)?,
            telemetry: TelemetryConfig::from_env(&env, "legacy-proxy-1")?,
            mqtt: MqttConfig::from_env(&env, "legacy-proxy-1")?,
            topic,
            publish_timeout: env.millis("PUBLISH_TIMEOUT_MS", Duration::from_secs(5))?,
            max_inflight: env.number("MQTT_MAX_INFLIGHT", 1024, 1, 65_535)?,
            replay_window: env.millis("REPLAY_WINDOW_MS", Duration::from_secs(5))?,
            probe: env.flag("SUBSCRIBER_PROBE", true)?,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Default)]
struct Metrics {
    publishes: Family<OutcomeLabels, Counter>,
    replayed: Counter,
    connected: Gauge,
    admitted: Gauge,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "mqtt_publishes",
            "Requests published, by outcome",
            m.publishes.clone(),
        );
        registry.register(
            "mqtt_replayed",
            "Acknowledged messages published again after a reconnect",
            m.replayed.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while connected to the broker",
            m.connected.clone(),
        );
        registry.register(
            "mqtt_admitting",
            "1 while requests are admitted (connected and a subscriber answered the probe)",
            m.admitted.clone(),
        );
        m
    }

    fn outcome(&self, outcome: &'static str) {
        self.publishes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// The bridge state shared by the handlers and the background tasks.
pub struct Bridge {
    link: Link,
    config: Config,
    window: Semaphore,
    /// Open while requests are admitted.
    admitting: Arc<AtomicBool>,
    /// What was acknowledged recently, oldest first.
    recent: Mutex<VecDeque<(Instant, Arc<Vec<u8>>)>>,
    /// Acknowledged before the last disconnect; published again after the reconnect.
    to_replay: Mutex<Vec<Arc<Vec<u8>>>>,
    /// The connect generation whose probe was answered.
    probe_answered: Arc<AtomicU64>,
    probe_notify: Arc<tokio::sync::Notify>,
    metrics: Metrics,
}

impl Bridge {
    /// Creates the client (not yet connected) and registers the metrics.
    pub async fn new(config: Config, registry: &mut Registry) -> anyhow::Result<Arc<Self>> {
        let link = Link::new(config.mqtt.clone(), config.mqtt.connect_options()).await?;
        Ok(Arc::new(Self {
            link,
            window: Semaphore::new(config.max_inflight),
            admitting: Arc::new(AtomicBool::new(false)),
            recent: Mutex::new(VecDeque::new()),
            to_replay: Mutex::new(Vec::new()),
            probe_answered: Arc::new(AtomicU64::new(0)),
            probe_notify: Arc::new(tokio::sync::Notify::new()),
            metrics: Metrics::register(registry),
            config,
        }))
    }

    /// The readiness flag (`/readyz`).
    pub fn admitting(&self) -> Arc<AtomicBool> {
        self.admitting.clone()
    }

    /// Connects and keeps the admission gate, probe and replay in step with the
    /// connection until `shutdown` fires; then disconnects.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let reply_topic = probe_reply_topic(&self.config.mqtt.client_id);
        if !self.link.connect(&shutdown).await {
            return;
        }
        let mut state = self.link.state();
        loop {
            let current = *state.borrow_and_update();
            self.metrics.connected.set(i64::from(current.connected));
            if current.connected {
                let this = self.clone();
                let reply = reply_topic.clone();
                let generation = current.connects;
                tokio::select! {
                    () = this.admit(generation, &reply) => {}
                    _ = state.changed() => continue,
                    () = shutdown.cancelled() => break,
                }
            } else {
                self.close_gate().await;
            }
            tokio::select! {
                changed = state.changed() => if changed.is_err() { break },
                () = shutdown.cancelled() => break,
            }
        }
        self.admitting.store(false, Ordering::Release);
        self.metrics.admitted.set(0);
        self.link.disconnect().await;
    }

    /// After a disconnect: stop admitting, and keep what was acknowledged within the
    /// replay window for publishing again.
    async fn close_gate(&self) {
        if self.admitting.swap(false, Ordering::AcqRel) {
            self.metrics.admitted.set(0);
            let window = self.config.replay_window;
            let mut recent = self.recent.lock().await;
            let cutoff = Instant::now().checked_sub(window);
            let kept: Vec<_> = recent
                .drain(..)
                .filter(|(at, _)| cutoff.is_none_or(|c| *at >= c))
                .map(|(_, payload)| payload)
                .collect();
            if !kept.is_empty() {
                info!(
                    count = kept.len(),
                    "will publish recently acknowledged messages again after reconnecting"
                );
            }
            self.to_replay.lock().await.extend(kept);
        }
    }

    /// After a (re)connect: re-subscribe the probe replies, wait for a subscriber to answer
    /// a probe, replay, then admit requests.
    async fn admit(&self, generation: u64, reply_topic: &str) {
        let options = SubscribeOptions {
            qos: QoS::AtLeastOnce,
            ..SubscribeOptions::default()
        };
        let answered = self.probe_answered.clone();
        let notify = self.probe_notify.clone();
        if let Err(error) = self
            .link
            .client
            .subscribe_with_options(reply_topic.to_owned(), options, move |message| {
                if let Some(g) = std::str::from_utf8(&message.payload)
                    .ok()
                    .and_then(|s| s.parse().ok())
                {
                    answered.fetch_max(g, Ordering::AcqRel);
                    notify.notify_waiters();
                }
            })
            .await
        {
            warn!(%error, "cannot subscribe to probe replies");
        }
        if self.config.probe {
            let mut attempt = 0u32;
            while self.probe_answered.load(Ordering::Acquire) < generation {
                let notified = self.probe_notify.notified();
                let probe = self
                    .link
                    .publish(
                        &self.config.topic,
                        Vec::new(),
                        QoS::AtLeastOnce,
                        vec![
                            (PROBE_PROPERTY.to_owned(), reply_topic.to_owned()),
                            ("generation".to_owned(), generation.to_string()),
                        ],
                        self.config.publish_timeout,
                    )
                    .await;
                if let Err(error) = probe {
                    debug!(%error, "probe not sent");
                }
                if self.probe_answered.load(Ordering::Acquire) >= generation {
                    break;
                }
                attempt += 1;
                if attempt % 10 == 0 {
                    warn!(
                        attempts = attempt,
                        "no legacy-proxy-2 answered the probe yet; not admitting requests"
                    );
                }
                let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
            }
        }
        self.replay().await;
        self.admitting.store(true, Ordering::Release);
        self.metrics.admitted.set(1);
        info!(generation, "admitting requests");
    }

    async fn replay(&self) {
        let pending = std::mem::take(&mut *self.to_replay.lock().await);
        if pending.is_empty() {
            return;
        }
        let total = pending.len();
        let results: Vec<_> = futures_util::stream::iter(pending)
            .map(|payload| async move {
                let sent = self
                    .link
                    .publish(
                        &self.config.topic,
                        payload.to_vec(),
                        self.config.mqtt.qos,
                        Vec::new(),
                        self.config.publish_timeout,
                    )
                    .await;
                (payload, sent)
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut failed = Vec::new();
        for (payload, sent) in results {
            if sent.is_ok() {
                self.metrics.replayed.inc();
                self.remember(payload).await;
            } else {
                failed.push(payload);
            }
        }
        if failed.is_empty() {
            info!(
                count = total,
                "published recently acknowledged messages again"
            );
        } else {
            warn!(
                count = failed.len(),
                "replay incomplete; trying again after the next reconnect"
            );
            self.to_replay.lock().await.extend(failed);
        }
    }

    async fn remember(&self, payload: Arc<Vec<u8>>) {
        if self.config.replay_window.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut recent = self.recent.lock().await;
        if let Some(cutoff) = now.checked_sub(self.config.replay_window) {
            while recent.front().is_some_and(|(at, _)| *at < cutoff) {
                recent.pop_front();
            }
        }
        recent.push_back((now, payload));
    }

    /// Publishes one request; `Ok` once the broker completed the handshake.
    async fn publish(&self, payload: Vec<u8>) -> Result<(), ApiError> {
        if !self.admitting.load(Ordering::Acquire) {
            self.metrics.outcome("not_admitted");
            return Err(unavailable(
                "the broker is not connected or no subscriber is ready yet",
            ));
        }
        let _permit = tokio::time::timeout(self.config.publish_timeout, self.window.acquire())
            .await
            .map_err(|_| unavailable("too many requests in flight"))?
            .map_err(|_| unavailable("shutting down"))?;
        let payload = Arc::new(payload);
        let publish = || {
            let config = &self.config;
            self.link.publish(
                &config.topic,
                payload.to_vec(),
                config.mqtt.qos,
                Vec::new(),
                config.publish_timeout,
            )
        };
        let mut result = publish().await;
        if result == Ok(Completed::AfterReconnect) {
            // Completed only after a reconnect: a broker restarted from an older snapshot
            // confirms messages it no longer has, so publish once more.
            result = publish().await;
        }
        match result {
            Ok(_) => {
                self.metrics.outcome("delivered");
                self.remember(payload).await;
                Ok(())
            }
            Err(error) => {
                let outcome = match &error {
                    PublishError::NotConnected => "not_connected",
                    PublishError::Refused(_) => "refused",
                    PublishError::Indeterminate(_) => "indeterminate",
                    PublishError::Failed(_) => "failed",
                };
                self.metrics.outcome(outcome);
                Err(unavailable(&error.to_string()))
            }
        }
    }
}

fn unavailable(message: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        message,
    )
    .with_retry_after(1)
}

/// The router: the bridge route plus `/healthz`, `/readyz` and `/metrics`.
pub fn app(bridge: Arc<Bridge>, registry: Registry, max_body_bytes: usize) -> Router {
    let routes = Router::new()
        .route(STORE_PATH, post(store))
        .with_state(bridge.clone())
        .merge(api::readyz(bridge.admitting()));
    finish_router(routes, registry, max_body_bytes)
}

/// Connects, serves until SIGTERM/SIGINT, lets in-flight requests finish their
/// handshakes, then disconnects.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let server = config.server.clone();
    let bridge = Bridge::new(config, &mut registry).await?;
    let shutdown = shutdown_on_signals();
    let stop_mqtt = CancellationToken::new();
    let mqtt = tokio::spawn(bridge.clone().run(stop_mqtt.clone()));
    let served = service::serve(
        &server,
        app(bridge, registry, server.max_body_bytes),
        Protocols::Http1AndH2c,
        shutdown,
    )
    .await;
    // Only now, with every request answered, close the broker connection.
    stop_mqtt.cancel();
    let _ = mqtt.await;
    served
}

async fn store(
    State(bridge): State<Arc<Bridge>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let (message, request_id) = api::legacy_message(&headers, &body)?;
    let payload = serde_json::to_vec(&message)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let response = match bridge.publish(payload).await {
        Ok(()) => {
            debug!(%request_id, "published");
            api::success()
        }
        Err(error) => {
            warn!(%request_id, error = %error.message, "not published");
            error.into_response()
        }
    };
    Ok(api::with_request_id(response, &request_id))
}

/// The binary's entry point: configuration from the process environment (exit 64 when
/// invalid), then [`run`] until SIGTERM/SIGINT.
pub fn main() -> std::process::ExitCode {
    let config = Config::from_lookup(&lps_common::config::ProcessEnv)
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    service::main(&config.telemetry.clone(), run(config))
}
