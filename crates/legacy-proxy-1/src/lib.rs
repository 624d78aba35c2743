//! legacy-proxy-1: the HTTP → MQTT bridge.
//!
//! `POST /ID_REQ_KC_STORE7D3BPACKET` with `{"id","body"}` is published as
//! `{"id","body","request_id"}` to `MQTT_TOPIC` with QoS 2 (MQTT v5, client id
//! `SERVICE_NAME`, persistent session). The answer is 200 only once the broker completed
//! the QoS 2 handshake (PUBCOMP) for *that* message; 503 with `Retry-After` when the broker
//! is unreachable, refused the message (a PUBREC reason ≥ 0x80 such as 0x97 quota exceeded
//! means it was discarded), grants less than the QoS asked for (nothing would prove it kept
//! the message), or the handshake did not finish within `PUBLISH_TIMEOUT_MS`; 413 when the
//! payload exceeds `MAX_PAYLOAD_BYTES` (the same limit legacy-proxy-2 forwards).
//!
//! Three safeguards go beyond the handshake, all because Mosquitto persists by snapshot:
//!
//! - **Subscriber probe.** Mosquitto does not restore shared subscriptions after a restart,
//!   and a QoS 2 message published while the group has no member is dropped with a
//!   successful PUBREC. After every (re)connect the bridge publishes a probe on
//!   `lps/probe/request` (a topic no traffic filter matches) and admits traffic only once a
//!   legacy-proxy-2 whose subscriptions are live answered it (`SUBSCRIBER_PROBE`, on by
//!   default). legacy-proxy-2 answers from a connection of its own with no backlog, so a
//!   restarted bridge is ready within a round trip however much traffic is queued.
//! - **Replay.** A broker killed between two snapshots forgets messages it already
//!   completed. The bridge keeps what it acknowledged in the last `REPLAY_WINDOW_MS`, tagged
//!   with the connection it completed on; after a reconnect, and before admitting requests,
//!   it publishes every message completed on an earlier connection again, until each has
//!   completed on the new one (a flap in between keeps the rest for the next connection).
//!   A publish that completed only after a reconnect, or just after the replay for a newer
//!   connection ran, is published again by its own request, through the admission gate.
//!   At-least-once: duplicates after a broker crash instead of losses.
//! - **Journal** (`REPLAY_JOURNAL_DIR`): the replay window on disk, written concurrently
//!   with the publish and made durable (group-committed `fdatasync`) before the 200, so a
//!   crash of the broker *and* this bridge together (a host crash) loses nothing either:
//!   after a restart the bridge replays what the journal holds from its last window.
//!
//! Two conditions stop it from admitting, both logged at `error`:
//!
//! - **A broker without QoS 2.** After every (re)connect, and before the probe, the bridge
//!   checks that the broker grants `MQTT_QOS` (its CONNACK Maximum QoS, read through one
//!   empty publish to `lps/capability`); a broker that does not is refused: `/readyz` stays
//!   503 and the check is repeated at `MQTT_RECONNECT_MAX_MS`.
//! - **Session taken over.** When another instance connects with the same `SERVICE_NAME`,
//!   the broker moves the session (with any QoS 2 handshake still open) to it and sends
//!   this one DISCONNECT 0x8E. This instance does not reconnect (it would take the session
//!   back, and the two would displace each other for ever): it closes the gate, answers
//!   503 to every request not yet completed (none gets 200 without its PUBCOMP; a PUBREL
//!   left open is finished by the new instance on the session it took), stops serving,
//!   and exits with code 3 ([`lps_common::mqtt::EXIT_SESSION_TAKEN_OVER`]). The 0x8E can
//!   be lost under load; the ownership record of [`lps_common::mqtt`] catches that, and
//!   after any reconnect the bridge admits nothing before the record confirmed it still
//!   owns the id.
//!
//! Environment: the server and logging variables of `lps-common`, the broker variables of
//! [`lps_common::mqtt`], and `MQTT_TOPIC`, `MQTT_QOS`, `PUBLISH_TIMEOUT_MS`,
//! `MQTT_MAX_INFLIGHT`, `REPLAY_WINDOW_MS`, `REPLAY_JOURNAL_DIR`, `SUBSCRIBER_PROBE`,
//! `MAX_PAYLOAD_BYTES`.

// Stricter than the workspace: a library documents what it exports, and `pub` means
// exported (`pub(crate)` otherwise).
#![warn(missing_docs, unreachable_pub)]

pub mod journal;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
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
use lps_common::config::{
    ConfigError, ENV_MAX_PAYLOAD_BYTES, ENV_MQTT_MAX_INFLIGHT, ENV_MQTT_TOPIC,
    ENV_PUBLISH_TIMEOUT_MS, ENV_REPLAY_JOURNAL_DIR, ENV_REPLAY_WINDOW_MS, ENV_SUBSCRIBER_PROBE,
    Env, Lookup, ServerConfig,
};
use lps_common::mqtt::mqtt5::{QoS, SubscribeOptions};
use lps_common::mqtt::{Capability, Completed, Link, MqttConfig, PublishError, SessionTakenOver};
use lps_common::server::Protocols;
use lps_common::telemetry::TelemetryConfig;
use lps_common::wire::{PROBE_PROPERTY, PROBE_TOPIC, STORE_PATH, probe_reply_topic};
use lps_common::{Registry, finish_router, service};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, error, info, warn};

use crate::journal::Journal;

/// Times one request's message may be published (the first time, and again after a
/// completion that proves too little) before it is answered 503.
const PUBLISH_ROUNDS: u32 = 3;

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
    /// `REPLAY_JOURNAL_DIR`: where the replay window is also kept on disk (file
    /// `<SERVICE_NAME>.<n>.journal`), so a host crash loses nothing; unset or empty: memory
    /// only.
    pub journal_dir: Option<PathBuf>,
    /// `SUBSCRIBER_PROBE`: admit traffic after a (re)connect only once a legacy-proxy-2
    /// answered a probe (default true).
    pub probe: bool,
    /// `MAX_PAYLOAD_BYTES`: the largest message published (default 1 MiB, legacy-proxy-2's
    /// default limit too); a larger one is answered 413.
    pub max_payload_bytes: usize,
}

impl Config {
    /// Reads the configuration from `lookup`.
    pub fn from_lookup(lookup: &dyn Lookup) -> Result<Self, ConfigError> {
        let env = Env::new(lookup);
        let topic = lps_common::mqtt::topic_from_env(&env, ENV_MQTT_TOPIC, "proxy1/message")?;
        let journal_dir = env
            .raw(ENV_REPLAY_JOURNAL_DIR)
            .filter(|dir| !dir.trim().is_empty())
            .map(PathBuf::from);
        Ok(Self {
            server: ServerConfig::from_env(&env, 8080)?,
            telemetry: TelemetryConfig::from_env(&env, "legacy-proxy-1")?,
            mqtt: MqttConfig::from_env(&env, "legacy-proxy-1")?,
            topic,
            publish_timeout: env.millis(ENV_PUBLISH_TIMEOUT_MS, Duration::from_secs(5))?,
            max_inflight: env.number(ENV_MQTT_MAX_INFLIGHT, 1024, 1, 65_535)?,
            replay_window: env.millis(ENV_REPLAY_WINDOW_MS, Duration::from_secs(5))?,
            journal_dir,
            probe: env.flag(ENV_SUBSCRIBER_PROBE, true)?,
            max_payload_bytes: env.number(
                ENV_MAX_PAYLOAD_BYTES,
                lps_common::wire::MAX_PAYLOAD_BYTES,
                1,
                256 << 20,
            )?,
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
    published_again: Counter,
    replay_pending: Gauge,
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
            "mqtt_published_again",
            "Requests published a second time because their completion proved too little",
            m.published_again.clone(),
        );
        registry.register(
            "mqtt_replay_pending",
            "Acknowledged messages waiting to be published again",
            m.replay_pending.clone(),
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

/// What the replay works on.
#[derive(Default)]
struct Replay {
    /// Completed publishes within the window of the newest, oldest first: when, on which
    /// connect generation, what.
    recent: VecDeque<(Instant, u64, Arc<Vec<u8>>)>,
    /// To publish again before admitting; each leaves only once it completed.
    pending: BTreeMap<u64, Arc<Vec<u8>>>,
    next_key: u64,
    /// The newest generation whose replay set was taken from `recent`.
    drained: u64,
    /// When the last disconnect was noticed.
    dropped_at: Option<Instant>,
}

impl Replay {
    fn add_pending(&mut self, payload: Arc<Vec<u8>>) {
        self.next_key += 1;
        self.pending.insert(self.next_key, payload);
    }
}

/// The bridge state shared by the handlers and the background tasks.
struct Bridge {
    link: Link,
    config: Config,
    window: Semaphore,
    /// The generation requests are admitted on; 0 while closed.
    admitted: watch::Sender<u64>,
    /// `admitted != 0`, for `/readyz`.
    admitting: Arc<AtomicBool>,
    replay: Mutex<Replay>,
    journal: Option<Journal>,
    /// This process's probe tokens start with it, so a stale answer in a resumed session
    /// never counts.
    nonce: String,
    /// The connect generation whose probe was answered.
    probe_answered: Arc<AtomicU64>,
    probe_notify: Arc<tokio::sync::Notify>,
    metrics: Metrics,
}

impl Bridge {
    /// Creates the client (not yet connected), opens the journal (what it recovered is
    /// published again before the first request is admitted) and registers the metrics.
    async fn new(config: Config, registry: &mut Registry) -> anyhow::Result<Arc<Self>> {
        let link = Link::new(config.mqtt.clone(), config.mqtt.connect_options()).await?;
        link.guard_ownership();
        let mut replay = Replay::default();
        let journal = match &config.journal_dir {
            Some(dir) if !config.replay_window.is_zero() => {
                let (dir, name, window) = (
                    dir.clone(),
                    config.mqtt.client_id.clone(),
                    config.replay_window,
                );
                let (journal, recovered) = tokio::task::spawn_blocking(move || {
                    Journal::open(&dir, &name, window, journal::Limits::default())
                })
                .await?
                .map_err(|e| {
                    anyhow::anyhow!("opening the replay journal in REPLAY_JOURNAL_DIR: {e}")
                })?;
                if !recovered.is_empty() {
                    info!(
                        count = recovered.len(),
                        "the journal holds acknowledged messages; publishing them again before admitting"
                    );
                }
                for payload in recovered {
                    replay.add_pending(Arc::new(payload));
                }
                Some(journal)
            }
            _ => None,
        };
        let metrics = Metrics::register(registry);
        metrics.replay_pending.set(replay.pending.len() as i64);
        Ok(Arc::new(Self {
            link,
            window: Semaphore::new(config.max_inflight),
            admitted: watch::Sender::new(0),
            admitting: Arc::new(AtomicBool::new(false)),
            replay: Mutex::new(replay),
            journal,
            nonce: uuid_like_nonce(),
            probe_answered: Arc::new(AtomicU64::new(0)),
            probe_notify: Arc::new(tokio::sync::Notify::new()),
            metrics,
            config,
        }))
    }

    /// The readiness flag (`/readyz`).
    fn admitting(&self) -> Arc<AtomicBool> {
        self.admitting.clone()
    }

    /// Connects and keeps the admission gate, probe and replay in step with the
    /// connection until `shutdown` fires; then disconnects. When another client takes over
    /// the session, it closes the gate, cancels `serving` (the HTTP server drains: what is
    /// in flight ends in 503) and returns the takeover.
    async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        serving: CancellationToken,
    ) -> Result<(), SessionTakenOver> {
        let reply_topic = probe_reply_topic(&self.config.mqtt.client_id);
        let mut taken_over = false;
        if self.link.connect(&shutdown).await {
            taken_over = self.follow(&shutdown, &reply_topic).await;
        }
        self.close_gate().await;
        if taken_over || self.link.is_taken_over() {
            error!(
                client_id = %self.config.mqtt.client_id,
                exit_code = lps_common::mqtt::EXIT_SESSION_TAKEN_OVER,
                "another instance connected with this SERVICE_NAME and took over the broker session (DISCONNECT 0x8E); not reconnecting, answering 503 to what is in flight and stopping"
            );
            serving.cancel();
            return Err(SessionTakenOver {
                client_id: self.config.mqtt.client_id.clone(),
            });
        }
        self.link.disconnect().await;
        Ok(())
    }

    /// Follows the connection until `shutdown` (false) or a session takeover (true).
    async fn follow(&self, shutdown: &CancellationToken, reply_topic: &str) -> bool {
        let mut state = self.link.state();
        loop {
            let current = *state.borrow_and_update();
            if current.taken_over {
                return true;
            }
            self.metrics.connected.set(i64::from(current.connected));
            if !current.connected || *self.admitted.borrow() != current.connects {
                self.close_gate().await;
            }
            if current.connected && *self.admitted.borrow() != current.connects {
                tokio::select! {
                    () = self.admit(current.connects, reply_topic, shutdown) => {}
                    _ = state.changed() => continue,
                    () = shutdown.cancelled() => return false,
                }
            }
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return false },
                () = shutdown.cancelled() => return false,
            }
        }
    }

    async fn close_gate(&self) {
        if self.admitted.send_replace(0) != 0 {
            self.admitting.store(false, Ordering::Release);
            self.metrics.admitted.set(0);
            self.replay.lock().await.dropped_at = Some(Instant::now());
            info!("not admitting requests until the broker connection is back and probed");
        }
    }

    /// After a (re)connect: check that the broker grants the QoS asked for, probe for a
    /// subscriber, publish again what an earlier connection completed, then admit requests
    /// on this generation.
    async fn admit(&self, generation: u64, reply_topic: &str, shutdown: &CancellationToken) {
        // After a reconnect, first make sure this instance still owns the client id: a
        // displaced one that reconnected must not publish (a packet id the new owner left
        // open on the session would make the broker drop the message as a duplicate).
        self.link.owner_confirmed(generation).await;
        self.check_broker(shutdown).await;
        self.subscribe_probe_replies(reply_topic).await;
        if self.config.probe {
            self.probe(generation, reply_topic).await;
        }
        self.drain(generation).await;
        self.publish_pending(generation).await;
        self.admitted.send_replace(generation);
        self.admitting.store(true, Ordering::Release);
        self.metrics.admitted.set(1);
        info!(generation, "admitting requests");
    }

    /// Returns once the broker granted `MQTT_QOS` on this connection; a broker that does
    /// not is refused (logged, asked again at the longest reconnect delay).
    async fn check_broker(&self, shutdown: &CancellationToken) {
        loop {
            match self
                .link
                .grants_qos(self.config.mqtt.qos, self.config.publish_timeout)
                .await
            {
                Ok(true) => return,
                Ok(false) => self.link.refuse_broker(Capability::Qos2, shutdown).await,
                Err(PublishError::Indeterminate(error)) => {
                    // A broker that answers slowly is not one that lacks QoS 2; each
                    // request's publish checks again, and waits for its own handshake.
                    debug!(%error, "capability check not answered in time; admitting");
                    return;
                }
                Err(error) => {
                    debug!(%error, "capability check not answered; asking again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn subscribe_probe_replies(&self, reply_topic: &str) {
        let options = SubscribeOptions {
            qos: QoS::AtLeastOnce,
            ..SubscribeOptions::default()
        };
        let answered = self.probe_answered.clone();
        let notify = self.probe_notify.clone();
        let prefix = format!("{}:", self.nonce);
        if let Err(error) = self
            .link
            .client
            .subscribe_with_options(reply_topic.to_owned(), options, move |message| {
                let generation = std::str::from_utf8(&message.payload)
                    .ok()
                    .and_then(|s| s.strip_prefix(&prefix))
                    .and_then(|g| g.parse().ok());
                if let Some(g) = generation {
                    answered.fetch_max(g, Ordering::AcqRel);
                    notify.notify_waiters();
                }
            })
            .await
        {
            warn!(%error, "cannot subscribe to probe replies");
        }
    }

    /// Publishes probes on [`PROBE_TOPIC`] until a legacy-proxy-2 answers this generation's.
    async fn probe(&self, generation: u64, reply_topic: &str) {
        let token = format!("{}:{generation}", self.nonce);
        let mut attempt = 0u32;
        while self.probe_answered.load(Ordering::Acquire) < generation {
            let notified = self.probe_notify.notified();
            let sent = self
                .link
                .publish(
                    PROBE_TOPIC,
                    token.clone().into_bytes(),
                    QoS::AtLeastOnce,
                    vec![(PROBE_PROPERTY.to_owned(), reply_topic.to_owned())],
                    self.config.publish_timeout,
                )
                .await;
            if let Err(error) = sent {
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

    /// Moves what earlier connections completed, within the window of the disconnect, to
    /// the replay set.
    async fn drain(&self, generation: u64) {
        let mut replay = self.replay.lock().await;
        // The broker died at most 1.5 keep-alives before the drop was noticed; what
        // completed a window before that had been saved.
        let oldest = replay.dropped_at.and_then(|at| {
            at.checked_sub(self.config.replay_window + self.config.mqtt.keep_alive * 3 / 2)
        });
        let recent = std::mem::take(&mut replay.recent);
        let mut kept = VecDeque::new();
        let mut moved = 0;
        for (at, completed_on, payload) in recent {
            if completed_on >= generation {
                kept.push_back((at, completed_on, payload));
            } else if oldest.is_none_or(|oldest| at >= oldest) {
                replay.add_pending(payload);
                moved += 1;
            }
        }
        replay.recent = kept;
        replay.drained = replay.drained.max(generation);
        self.metrics.replay_pending.set(replay.pending.len() as i64);
        if moved > 0 {
            info!(
                count = moved,
                "publishing recently acknowledged messages again after the reconnect"
            );
        }
    }

    /// Publishes the replay set on this connection until every message completed on it;
    /// failures wait (backoff up to 5 s) and go again. Cancelled by a reconnect, it leaves
    /// what did not complete for the next connection.
    async fn publish_pending(&self, generation: u64) {
        let mut wait = Duration::from_millis(200);
        loop {
            let batch: Vec<(u64, Arc<Vec<u8>>)> = {
                let replay = self.replay.lock().await;
                replay
                    .pending
                    .iter()
                    .map(|(key, payload)| (*key, payload.clone()))
                    .collect()
            };
            if batch.is_empty() {
                return;
            }
            let total = batch.len();
            let results: Vec<_> = futures_util::stream::iter(batch)
                .map(|(key, payload)| async move {
                    let sent = self.publish_once(&payload).await;
                    let journaled = match (&sent, &self.journal) {
                        (Ok(Completed::Direct), Some(journal)) => {
                            journal.append(payload.clone()).await.is_ok()
                        }
                        _ => true,
                    };
                    (key, payload, sent, journaled)
                })
                .buffer_unordered(64)
                .collect()
                .await;
            let mut replay = self.replay.lock().await;
            let mut failed = 0;
            for (key, payload, sent, journaled) in results {
                if sent == Ok(Completed::Direct) && journaled {
                    replay.pending.remove(&key);
                    replay
                        .recent
                        .push_back((Instant::now(), generation, payload));
                    self.metrics.replayed.inc();
                } else {
                    failed += 1;
                }
            }
            self.metrics.replay_pending.set(replay.pending.len() as i64);
            drop(replay);
            if failed == 0 {
                info!(count = total, "published acknowledged messages again");
            } else {
                warn!(
                    failed,
                    of = total,
                    retry_in_ms = wait.as_millis() as u64,
                    "replay incomplete; not admitting requests until it is done"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }

    async fn publish_once(&self, payload: &[u8]) -> Result<Completed, PublishError> {
        let config = &self.config;
        self.link
            .publish(
                &config.topic,
                payload.to_vec(),
                config.mqtt.qos,
                Vec::new(),
                config.publish_timeout,
            )
            .await
    }

    /// Records a completion on `generation`; false when the replay for a newer generation
    /// already ran (the message must be published again).
    async fn remember(&self, generation: u64, payload: Arc<Vec<u8>>) -> bool {
        let mut replay = self.replay.lock().await;
        if generation < replay.drained {
            return false;
        }
        if self.config.replay_window.is_zero() {
            return true;
        }
        let now = Instant::now();
        if let Some(cutoff) = now.checked_sub(self.config.replay_window) {
            while replay.recent.front().is_some_and(|(at, _, _)| *at < cutoff) {
                replay.recent.pop_front();
            }
        }
        replay.recent.push_back((now, generation, payload));
        true
    }

    /// The generation requests are admitted on, once admitted, waiting at most `within`.
    async fn admitted_generation(&self, within: Duration) -> Option<u64> {
        let mut admitted = self.admitted.subscribe();
        tokio::time::timeout(within, admitted.wait_for(|g| *g != 0))
            .await
            .ok()?
            .ok()
            .map(|g| *g)
    }

    /// Publishes one request; `Ok` once the broker completed the handshake on an admitted
    /// connection and the completion is covered by the replay (and the journal).
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
        let journaled = async {
            match &self.journal {
                Some(journal) => journal.append(payload.clone()).await,
                None => Ok(()),
            }
        };
        let (journaled, published) = tokio::join!(journaled, self.publish_admitted(&payload));
        match (published, journaled) {
            (Ok(()), Ok(())) => {
                self.metrics.outcome("delivered");
                Ok(())
            }
            (Ok(()), Err(error)) => {
                self.metrics.outcome("journal_failed");
                debug!(%error, "cannot write the replay journal; answering 503");
                Err(unavailable("the replay journal cannot be written"))
            }
            (Err(error), _) => {
                self.metrics.outcome(error.label());
                if matches!(error, PublishError::Downgraded(_)) {
                    error!(%error, "the broker does not grant the QoS asked for (MQTT_QOS); refusing requests");
                }
                Err(unavailable(&error.to_string()))
            }
        }
    }

    /// Publishes until a completion proves the broker has the message: on the connection
    /// it started on, before any newer connection's replay ran. Otherwise it publishes
    /// again, through the admission gate of the newer connection.
    async fn publish_admitted(&self, payload: &Arc<Vec<u8>>) -> Result<(), PublishError> {
        for round in 0..PUBLISH_ROUNDS {
            let Some(generation) = self.admitted_generation(self.config.publish_timeout).await
            else {
                return Err(PublishError::NotConnected);
            };
            if round > 0 {
                self.metrics.published_again.inc();
            }
            match self.publish_once(payload).await? {
                Completed::Direct if self.remember(generation, payload.clone()).await => {
                    return Ok(());
                }
                // Completed across a reconnect, or before a newer connection's replay:
                // a broker restarted from an older snapshot confirms messages it lost.
                _ => debug!(round, "completion proves too little; publishing again"),
            }
        }
        Err(PublishError::Indeterminate(
            "the connection kept changing while publishing".to_owned(),
        ))
    }
}

/// A random token (time and address based) telling this process's probes apart.
fn uuid_like_nonce() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", now, std::process::id())
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
fn app(bridge: Arc<Bridge>, registry: Registry, max_body_bytes: usize) -> Router {
    let routes = Router::new()
        .route(STORE_PATH, post(store))
        .with_state(bridge.clone())
        .merge(api::readyz(bridge.admitting()));
    finish_router(routes, registry, max_body_bytes)
}

/// Connects, serves `listener` until `shutdown` fires, lets in-flight requests finish their
/// handshakes, then disconnects. Returns [`SessionTakenOver`] (exit code 3 in the binary)
/// when another instance took over the broker session. What the binary runs (see [`run`])
/// and what the tests run.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let server = config.server.clone();
    let bridge = Bridge::new(config, &mut registry).await?;
    let stop_mqtt = CancellationToken::new();
    // Cancelled by the bridge too, when its session is taken over.
    let serving = shutdown.child_token();
    let mqtt = tokio::spawn(bridge.clone().run(stop_mqtt.clone(), serving.clone()));
    let app = app(bridge, registry, server.max_body_bytes);
    let served = service::serve(listener, &server, app, Protocols::Http1AndH2c, serving).await;
    // Only now, with every request answered, close the broker connection.
    stop_mqtt.cancel();
    lps_common::mqtt::bridge_outcome(mqtt, served).await
}

/// Binds per `config` and [`serve`]s until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    service::bind_and_serve(config, |c| &c.server, serve).await
}

async fn store(
    State(bridge): State<Arc<Bridge>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    // The relay's splice: a compact message is checked by one scan and gets its
    // `request_id` without a JSON tree; the bytes are those `serde_json` would write.
    let (payload, request_id) = api::legacy_payload(&headers, &body)?;
    let payload = payload.to_vec();
    if payload.len() > bridge.config.max_payload_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the message is {} bytes; MAX_PAYLOAD_BYTES is {}",
                payload.len(),
                bridge.config.max_payload_bytes
            ),
        ));
    }
    // Debug level: below it the span is never built (one relaxed load per request).
    let span = debug_span!("store", %request_id);
    let response = match bridge.publish(payload).instrument(span).await {
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
/// invalid), then [`run`].
pub fn main() -> std::process::ExitCode {
    service::main_from_env(Config::from_lookup, |c| &c.telemetry, run)
}
