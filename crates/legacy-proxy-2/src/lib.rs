//! legacy-proxy-2: the MQTT → HTTP bridge.
//!
//! Subscribes to `$share/legacy_proxy/+/message` (first deliveries) and
//! `$share/legacy_proxy/+/retry/message` (retries) at `MQTT_QOS` with deferred
//! acknowledgements and persistent sessions, and forwards each payload with
//! `POST TARGET_URL` (h2c when `USE_HTTP_2`) and `Request-Id` from the payload. A message is
//! acknowledged only
//!
//! - after the target answered 2xx, or
//! - after it was republished (PUBCOMP received) to `<SERVICE_NAME>/retry/message` with its
//!   attempt count (MQTT v5 user property `attempt`) incremented and the earliest time of
//!   its next attempt (`not-before`): transient failures (connect errors, timeouts, 5xx,
//!   408, 429) are retried without limit by default, so an outage of any length is a
//!   backlog in the broker, never a loss; or
//! - after it was published as a durable dead letter: *retained*, QoS 2, to
//!   `<DEAD_LETTER_TOPIC>/<key>` (see [`lps_common::dead_letters`]), only for failures
//!   retrying cannot mend: a payload that is not a JSON object with a decimal `request_id`
//!   or is larger than `MAX_PAYLOAD_BYTES`, a 4xx other than 408/429, a handler panic, or
//!   the optional `MAX_ATTEMPTS` reached. The broker keeps a retained message with no
//!   subscriber, across restarts; `lps dead-letters list|replay` reads and replays them.
//!
//! No head-of-line blocking: each instance runs three MQTT clients. The traffic client
//! (`SERVICE_NAME`) takes first deliveries and never waits: a message that fails goes to the
//! retry topic at once. The retry client (`<SERVICE_NAME>-retry`) holds a retried message
//! until its `not-before` time, so a message in a 30 s backoff holds back only other
//! retries, never traffic or its acknowledgements (MQTT acknowledgements leave in arrival
//! order per connection). While the target keeps failing, the retry path sends one trial at
//! a time, paced by the same capped backoff, instead of spinning through the backlog. The
//! control client (`<SERVICE_NAME>-control`, a session the broker forgets) answers
//! legacy-proxy-1's subscriber probes on `lps/probe/request` while both subscriptions are
//! live on their current connections; its session holds no backlog, so an answer never
//! waits behind traffic.
//!
//! Nothing is dropped: a republish that fails is tried again, and the message stays
//! unacknowledged (the broker still owns it) meanwhile. A republish to the retry topic waits
//! until this instance's retry subscription is live (Mosquitto drops a QoS 2 message with a
//! successful PUBREC while a `$share` group has no member); one that completes only after a
//! reconnect is published again. At most `MQTT_RECEIVE_MAXIMUM` messages are in flight per
//! path (announced to the broker as the Receive Maximum and enforced here too).
//!
//! Serves `/healthz`, `/readyz` (all three clients connected and subscribed) and
//! `/metrics` on `HTTP_PORT`.
//!
//! A broker that lacks what the bridge needs is refused: before subscribing, each client
//! checks that the broker grants `MQTT_QOS` (its CONNACK Maximum QoS, read through one empty
//! publish to `lps/capability`), and a `$share` subscription that the CONNACK (Shared
//! Subscription Available = 0) or the SUBACK (0x9E) refuses is not retried in a loop: both
//! are logged at `error` naming the capability, `/readyz` stays 503, and the check is
//! repeated at `MQTT_RECONNECT_MAX_MS`.
//!
//! Session takeover: when another instance connects with the same `SERVICE_NAME` (a
//! rescheduled pod whose old one is still up), the broker moves the three sessions to it,
//! with every message this one holds unacknowledged, and sends DISCONNECT 0x8E. This
//! instance does not reconnect (it would take the sessions back, and the two would
//! displace each other for ever); it logs one `error` line, takes no new messages, abandons
//! those in flight without acknowledging them (no acknowledgement can reach the broker any
//! more; the new owner receives them again, marked DUP, so a message whose forward had
//! already succeeded arrives twice: a duplicate, never a loss), stops its admin server and
//! exits with code 3 ([`lps_common::mqtt::EXIT_SESSION_TAKEN_OVER`]).

// Stricter than the workspace: a library documents what it exports, and `pub` means
// exported (`pub(crate)` otherwise).
#![warn(missing_docs, unreachable_pub)]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use bytes::Bytes;
use futures_util::FutureExt;
use http::StatusCode;
use lps_common::config::{
    ConfigError, ENV_DEAD_LETTER_TOPIC, ENV_MAX_ATTEMPTS, ENV_MAX_PAYLOAD_BYTES,
    ENV_MQTT_RECEIVE_MAXIMUM, ENV_MQTT_SHARE_GROUP, ENV_PUBLISH_TIMEOUT_MS,
    ENV_RETRY_BACKOFF_MAX_MS, ENV_RETRY_BACKOFF_MS, Env, Lookup, ServerConfig,
};
use lps_common::mqtt::mqtt5::packet::publish::PublishPacket;
use lps_common::mqtt::mqtt5::{AckToken, MqttError, PublishOptions, QoS, SubscribeOptions};
use lps_common::mqtt::{
    Capability, Completed, Link, MqttConfig, PublishError, SessionTakenOver,
    lacks_shared_subscriptions,
};
use lps_common::request_id::RequestId;
use lps_common::server::Protocols;
use lps_common::telemetry::TelemetryConfig;
use lps_common::upstream::{Upstream, UpstreamConfig, UpstreamError};
use lps_common::wire::{
    ATTEMPT_PROPERTY, LAST_ERROR_PROPERTY, NOT_BEFORE_PROPERTY, PROBE_PROPERTY, PROBE_TOPIC,
    SHARE_GROUP, SOURCE_TOPIC_PROPERTY, bridge_filters, retry_topic,
};
use lps_common::{Registry, api, dead_letters, finish_router, service};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, debug, debug_span, error, field, info, warn};

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
    /// Broker connection of the traffic client; the retry and control clients use the
    /// same settings with `-retry` and `-control` appended to the client id.
    pub mqtt: MqttConfig,
    /// Where messages are forwarded.
    pub upstream: UpstreamConfig,
    /// `MQTT_SHARE_GROUP`: the shared-subscription group (default `legacy_proxy`).
    pub group: String,
    /// `MQTT_RECEIVE_MAXIMUM`: messages in flight at once on each path, traffic and retry
    /// (default 32; upstream used 1).
    pub receive_maximum: u16,
    /// `MAX_ATTEMPTS`: deliveries before a message is dead-lettered; 0 (the default) means
    /// no limit: transient failures are retried for as long as they last.
    pub max_attempts: u32,
    /// `RETRY_BACKOFF_MS`: wait before the first retry (default 500), doubling per attempt.
    pub retry_backoff: Duration,
    /// `RETRY_BACKOFF_MAX_MS`: the longest wait between attempts (default 30000).
    pub retry_backoff_max: Duration,
    /// `DEAD_LETTER_TOPIC`: the prefix of the dead letters' topics (default
    /// `legacy_proxy/dead_letter`; each letter is retained on `<prefix>/<key>`).
    pub dead_letter_topic: String,
    /// `MAX_PAYLOAD_BYTES`: larger payloads are dead-lettered (default 1 MiB, the same as
    /// legacy-proxy-1's limit, so whatever it acknowledged can be forwarded).
    pub max_payload_bytes: usize,
    /// `PUBLISH_TIMEOUT_MS`: how long one republish may take (default 5000).
    pub publish_timeout: Duration,
}

impl Config {
    /// Reads the configuration from `lookup`.
    pub fn from_lookup(lookup: &dyn Lookup) -> Result<Self, ConfigError> {
        let env = Env::new(lookup);
        let dead_letter_topic = lps_common::mqtt::topic_from_env(
            &env,
            ENV_DEAD_LETTER_TOPIC,
            lps_common::wire::DEAD_LETTER_TOPIC,
        )?;
        let group = env.string(ENV_MQTT_SHARE_GROUP, SHARE_GROUP);
        if group.contains(['/', '+', '#']) {
            return Err(ConfigError::new(
                ENV_MQTT_SHARE_GROUP,
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
            receive_maximum: env.number(ENV_MQTT_RECEIVE_MAXIMUM, 32, 1, 65_535)?,
            max_attempts: env.number(ENV_MAX_ATTEMPTS, 0, 0, u32::MAX)?,
            retry_backoff: env.millis(ENV_RETRY_BACKOFF_MS, Duration::from_millis(500))?,
            retry_backoff_max: env.millis(ENV_RETRY_BACKOFF_MAX_MS, Duration::from_secs(30))?,
            dead_letter_topic,
            max_payload_bytes: env.number(
                ENV_MAX_PAYLOAD_BYTES,
                lps_common::wire::MAX_PAYLOAD_BYTES,
                1,
                256 << 20,
            )?,
            publish_timeout: env.millis(ENV_PUBLISH_TIMEOUT_MS, Duration::from_secs(5))?,
        })
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.retry_backoff
            .saturating_mul(factor)
            .min(self.retry_backoff_max)
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
    retry_waiting: Gauge,
    downstream_failures: Gauge,
    republish_failures: Counter,
    stuck: Gauge,
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
            retry_waiting: Gauge::default(),
            downstream_failures: Gauge::default(),
            republish_failures: Counter::default(),
            stuck: Gauge::default(),
            forward_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
        };
        registry.register(
            "bridge_received",
            "Messages received from the broker, first deliveries and retries",
            m.received.clone(),
        );
        registry.register(
            "bridge_forwarded",
            "Messages the target accepted (2xx)",
            m.forwarded.clone(),
        );
        registry.register(
            "bridge_retried",
            "Messages republished to the retry topic after a transient failure",
            m.retried.clone(),
        );
        registry.register(
            "bridge_dead_lettered",
            "Messages kept as durable dead letters, by reason",
            m.dead_lettered.clone(),
        );
        registry.register(
            "bridge_probes",
            "Subscriber probes answered",
            m.probes.clone(),
        );
        registry.register(
            "bridge_in_flight",
            "Messages being handled, both paths",
            m.in_flight.clone(),
        );
        registry.register(
            "bridge_retry_waiting",
            "Retried messages held until their next attempt is due",
            m.retry_waiting.clone(),
        );
        registry.register(
            "bridge_downstream_failures",
            "Consecutive failed forwarding attempts (0 while the target answers)",
            m.downstream_failures.clone(),
        );
        registry.register(
            "bridge_republish_failures",
            "Republishes (retry topic or dead letter) the broker did not complete, each tried again",
            m.republish_failures.clone(),
        );
        registry.register(
            "bridge_stuck",
            "Messages held because the broker refuses both their retry and their dead letter",
            m.stuck.clone(),
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

/// Which subscription a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// First deliveries, on the traffic client.
    Traffic,
    /// Retries, on the retry client.
    Retry,
}

/// What to do with a message after one forwarding attempt.
enum Verdict {
    Forwarded,
    Retry(String),
    DeadLetter(&'static str, String),
}

/// Paces the retry path while the target keeps failing: after a failed retry, retries go one
/// at a time, each after the capped backoff of the streak of failed retries; a success
/// anywhere (a first delivery too) ends the streak and lets retries flow at full rate.
struct Pacer {
    failures: AtomicU32,
    next_try: std::sync::Mutex<Instant>,
    trial: tokio::sync::Mutex<()>,
    recovered: Notify,
}

impl Pacer {
    fn new() -> Self {
        Self {
            failures: AtomicU32::new(0),
            next_try: std::sync::Mutex::new(Instant::now()),
            trial: tokio::sync::Mutex::new(()),
            recovered: Notify::new(),
        }
    }

    fn succeeded(&self, metrics: &Metrics) {
        if self.failures.swap(0, Ordering::AcqRel) > 0 {
            metrics.downstream_failures.set(0);
            self.recovered.notify_waiters();
        }
    }

    fn failed(&self, config: &Config, metrics: &Metrics) {
        let streak = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        metrics.downstream_failures.set(i64::from(streak));
        if let Ok(mut next) = self.next_try.lock() {
            *next = Instant::now() + config.backoff(streak);
        }
    }

    /// Waits for this retry's turn; the guard, while held, keeps other retries waiting.
    async fn turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if self.failures.load(Ordering::Acquire) == 0 {
            return None;
        }
        let guard = self.trial.lock().await;
        let recovered = self.recovered.notified();
        if self.failures.load(Ordering::Acquire) == 0 {
            return None;
        }
        let next = self.next_try.lock().map_or_else(|_| Instant::now(), |n| *n);
        tokio::select! {
            () = tokio::time::sleep_until(next.into()) => {}
            () = recovered => {}
        }
        Some(guard)
    }
}

/// One MQTT client of the bridge and whether its subscriptions are live on its current
/// connection.
struct Client {
    link: Link,
    live: watch::Sender<bool>,
}

impl Client {
    fn new(link: Link) -> Self {
        Self {
            link,
            live: watch::Sender::new(false),
        }
    }

    fn is_live(&self) -> bool {
        *self.live.borrow()
    }
}

/// The bridge state shared by the tasks.
struct Bridge {
    traffic: Client,
    retries: Client,
    control: Client,
    config: Config,
    upstream: Upstream,
    ready: Arc<AtomicBool>,
    pacer: Pacer,
    metrics: Metrics,
}

impl Bridge {
    /// Creates the MQTT clients (not yet connected) and the HTTP client.
    async fn new(config: Config, registry: &mut Registry) -> anyhow::Result<Arc<Self>> {
        let subscriber = |mqtt: &MqttConfig| {
            mqtt.connect_options()
                .with_deferred_ack(true)
                .with_receive_maximum(config.receive_maximum)
        };
        let traffic = Link::new(config.mqtt.clone(), subscriber(&config.mqtt)).await?;
        let retry_mqtt = config.mqtt.companion("retry");
        let retries = Link::new(retry_mqtt.clone(), subscriber(&retry_mqtt)).await?;
        let control_mqtt = config.mqtt.companion("control");
        let control = Link::new(control_mqtt.clone(), control_mqtt.ephemeral_options()).await?;
        for link in [&traffic, &retries, &control] {
            link.guard_ownership();
        }
        let upstream = Upstream::new(&config.upstream, registry)?;
        Ok(Arc::new(Self {
            traffic: Client::new(traffic),
            retries: Client::new(retries),
            control: Client::new(control),
            upstream,
            ready: Arc::new(AtomicBool::new(false)),
            pacer: Pacer::new(),
            metrics: Metrics::register(registry),
            config,
        }))
    }

    /// The readiness flag (`/readyz`): all three clients connected and subscribed.
    fn ready(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    fn client(&self, path: Path) -> &Client {
        match path {
            Path::Traffic => &self.traffic,
            Path::Retry => &self.retries,
        }
    }

    /// Connects, subscribes (again after every CONNACK: Mosquitto does not restore shared
    /// subscriptions after a restart), and handles messages until `shutdown` fires. Then
    /// it takes no new messages, lets the ones in flight finish (forwarded, retried or
    /// dead-lettered, and acknowledged) within `grace`, and disconnects. When another
    /// client takes over one of the sessions it stops at once instead (see the crate
    /// docs), cancels `shutdown` (the admin server stops too) and returns the takeover.
    async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), SessionTakenOver> {
        // Any of the three sessions taken over stops the whole bridge.
        let taken = Arc::new(std::sync::OnceLock::<String>::new());
        let watch_takeover = {
            let (this, taken, stop) = (self.clone(), taken.clone(), shutdown.clone());
            tokio::spawn(async move {
                let links = [&this.traffic.link, &this.retries.link, &this.control.link];
                let [a, b, c] = links.map(Link::taken_over);
                let client_id = tokio::select! {
                    () = a => links[0].client_id(),
                    () = b => links[1].client_id(),
                    () = c => links[2].client_id(),
                    () = stop.cancelled() => return,
                };
                let _ = taken.set(client_id.to_owned());
                this.ready.store(false, Ordering::Release);
                error!(
                    client_id,
                    exit_code = lps_common::mqtt::EXIT_SESSION_TAKEN_OVER,
                    "another instance connected with this SERVICE_NAME and took over the broker session (DISCONNECT 0x8E); not reconnecting, leaving unacknowledged messages to it and stopping"
                );
                stop.cancel();
            })
        };
        self.clone()
            .work(shutdown.clone(), grace, taken.clone())
            .await;
        watch_takeover.abort();
        match taken.get() {
            Some(client_id) => Err(SessionTakenOver {
                client_id: client_id.clone(),
            }),
            None => Ok(()),
        }
    }

    // Long (~130 lines) on purpose for now: the receive, dispatch, grace and takeover
    // drain in one place keeps their order visible. A split into steps (fd9b9f0) made the
    // double broker kill test miss its readiness deadline and was reverted (45917a2).
    async fn work(
        self: Arc<Self>,
        shutdown: CancellationToken,
        grace: Duration,
        taken: Arc<std::sync::OnceLock<String>>,
    ) {
        let [traffic_filter, retry_filter] = bridge_filters(&self.config.group);
        let mut inboxes = Vec::new();
        for (path, filter) in [(Path::Traffic, traffic_filter), (Path::Retry, retry_filter)] {
            let (tx, rx) = mpsc::unbounded_channel::<Inbound>();
            // Registered before connecting: a resumed session flushes its messages right
            // after CONNACK, before any SUBSCRIBE.
            let link = &self.client(path).link;
            if let Err(e) = link
                .client
                .register_ack_callback(filter.clone(), enqueue(tx.clone()))
                .await
            {
                error!(error = %e, "cannot register the message handler");
                return;
            }
            inboxes.push((path, filter, tx, rx));
        }
        for client in [&self.traffic, &self.retries, &self.control] {
            if !client.link.connect(&shutdown).await {
                return;
            }
        }
        let background = TaskTracker::new();
        let stop_background = CancellationToken::new();
        background.spawn(self.clone().watch_readiness(stop_background.clone()));
        let control = self.clone();
        background.spawn(keep_subscribed(
            &self.control,
            self.config.mqtt.qos,
            self.config.publish_timeout,
            stop_background.clone(),
            move || control.clone().subscribe_probes(),
        ));
        let work = TaskTracker::new();
        let mut dispatchers = Vec::new();
        let mut leftovers = Vec::new();
        for (path, filter, tx, rx) in inboxes {
            let this = self.clone();
            background.spawn(keep_subscribed(
                self.client(path),
                self.config.mqtt.qos,
                self.config.publish_timeout,
                stop_background.clone(),
                move || {
                    let this = this.clone();
                    let filter = filter.clone();
                    let tx = tx.clone();
                    async move {
                        let options = SubscribeOptions {
                            qos: this.config.mqtt.qos,
                            ..SubscribeOptions::default()
                        };
                        // Replaces the handler registered above with an identical one.
                        this.client(path)
                            .link
                            .client
                            .subscribe_with_ack(filter, options, enqueue(tx))
                            .await
                            .map(|_| ())
                    }
                },
            ));
            dispatchers.push(tokio::spawn(self.clone().dispatch(
                path,
                rx,
                work.clone(),
                shutdown.clone(),
            )));
        }
        for dispatcher in dispatchers {
            if let Ok(rx) = dispatcher.await {
                leftovers.push(rx);
            }
        }
        self.ready.store(false, Ordering::Release);
        work.close();
        // After a takeover no acknowledgement can reach the broker: the sessions, with
        // every message in flight here, belong to the new instance, which gets them again.
        let grace = if taken.get().is_some() {
            Duration::ZERO
        } else {
            info!(
                in_flight = work.len(),
                "taking no new messages; finishing those in flight"
            );
            grace
        };
        if grace.is_zero() {
            if !work.is_empty() {
                info!(
                    abandoned = work.len(),
                    "session taken over: abandoning messages in flight; the new owner receives them again"
                );
            }
        } else if tokio::time::timeout(grace, work.wait()).await.is_err() {
            warn!(
                left = work.len(),
                "grace period over; unacknowledged messages will be redelivered"
            );
        }
        stop_background.cancel();
        background.close();
        background.wait().await;
        // Acknowledgements leave through the client's background writer; give the last
        // ones a moment to reach the broker so it does not deliver those messages again.
        // (The client offers no way to wait for that; on loopback it takes microseconds.)
        tokio::time::sleep(ACK_SETTLE).await;
        for client in [&self.traffic, &self.retries, &self.control] {
            client.link.disconnect().await;
        }
        // Messages that arrived but were not started: unacknowledged, so the broker
        // delivers them again. Forget the tokens rather than let them send a negative
        // acknowledgement (which would make the broker drop the message).
        let mut left = 0;
        for mut rx in leftovers {
            rx.close();
            while let Ok(inbound) = rx.try_recv() {
                std::mem::forget(inbound.token);
                left += 1;
            }
        }
        if left > 0 {
            info!(left, "left unacknowledged for redelivery");
        }
    }

    /// Hands the messages of one path to tasks, at most `MQTT_RECEIVE_MAXIMUM` at once,
    /// until `shutdown`; returns the inbox with what was not started.
    async fn dispatch(
        self: Arc<Self>,
        path: Path,
        mut rx: mpsc::UnboundedReceiver<Inbound>,
        work: TaskTracker,
        shutdown: CancellationToken,
    ) -> mpsc::UnboundedReceiver<Inbound> {
        let window = Arc::new(Semaphore::new(usize::from(self.config.receive_maximum)));
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
            work.spawn(async move {
                this.handle(path, inbound).await;
                drop(permit);
            });
        }
        rx
    }

    /// Keeps `/readyz` equal to "every client's subscriptions are live".
    async fn watch_readiness(self: Arc<Self>, stop: CancellationToken) {
        let mut watches = [&self.traffic, &self.retries, &self.control].map(|c| c.live.subscribe());
        loop {
            let ready = watches.iter_mut().all(|w| *w.borrow_and_update());
            self.ready.store(ready, Ordering::Release);
            let [a, b, c] = &mut watches;
            tokio::select! {
                _ = a.changed() => {}
                _ = b.changed() => {}
                _ = c.changed() => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Subscribes the control client to probes: each is answered (the token back to the
    /// reply topic it names) while both message subscriptions are live.
    async fn subscribe_probes(self: Arc<Self>) -> Result<(), MqttError> {
        let options = SubscribeOptions {
            qos: QoS::AtLeastOnce,
            ..SubscribeOptions::default()
        };
        let this = Arc::downgrade(&self);
        self.control
            .link
            .client
            .subscribe_with_options(PROBE_TOPIC, options, move |message| {
                let Some(this) = this.upgrade() else { return };
                let Some(reply) = message
                    .properties
                    .user_properties
                    .iter()
                    .find(|(k, _)| k == PROBE_PROPERTY)
                    .map(|(_, v)| v.clone())
                else {
                    return;
                };
                if !(this.traffic.is_live() && this.retries.is_live()) {
                    debug!("probe not answered: subscriptions not live");
                    return;
                }
                tokio::spawn(async move {
                    let answered = this
                        .control
                        .link
                        .publish(
                            &reply,
                            message.payload,
                            QoS::AtLeastOnce,
                            Vec::new(),
                            this.config.publish_timeout,
                        )
                        .await;
                    match answered {
                        Ok(_) => {
                            this.metrics.probes.inc();
                        }
                        Err(e) => debug!(error = %e, "probe answer not sent"),
                    }
                });
            })
            .await
            .map(|_| ())
    }

    /// Handles one message in a `message` span (debug level: below it the span is never
    /// built) carrying its `request_id` once the payload yields one, like every hop.
    async fn handle(&self, path: Path, inbound: Inbound) {
        let span = debug_span!(
            "message",
            request_id = field::Empty,
            topic = %inbound.packet.topic_name,
            ?path,
        );
        self.handle_in(path, inbound, &span)
            .instrument(span.clone())
            .await;
    }

    async fn handle_in(&self, path: Path, inbound: Inbound, span: &Span) {
        let Inbound { packet, token } = inbound;
        self.metrics.received.inc();
        self.metrics.in_flight.inc();
        let attempt = property(&packet, ATTEMPT_PROPERTY)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1u32);
        // The token stays out here: a panic below must not drop it (a dropped token sends
        // an error PUBREC, and the broker discards the message).
        let verdict = AssertUnwindSafe(self.attempt(path, &packet, span))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let detail = panic_message(&*panic);
                error!(topic = %packet.topic_name, %detail, "handling a message panicked");
                Verdict::DeadLetter("panic", format!("handling panicked: {detail}"))
            });
        let settled = AssertUnwindSafe(self.settle(&packet, attempt, verdict))
            .catch_unwind()
            .await;
        if let Err(panic) = settled {
            let detail = panic_message(&*panic);
            error!(topic = %packet.topic_name, %detail, "settling a message panicked");
            self.dead_letter(&packet, attempt, "panic", detail).await;
        }
        token.ack();
        self.metrics.in_flight.dec();
    }

    /// One forwarding attempt; on the retry path only once the message is due and the
    /// pacer lets it through.
    async fn attempt(&self, path: Path, packet: &PublishPacket, span: &Span) -> Verdict {
        let request_id = match self.validate(&packet.payload) {
            Ok(id) => id,
            Err((reason, detail)) => return Verdict::DeadLetter(reason, detail),
        };
        span.record("request_id", field::display(&request_id));
        let _trial = match path {
            Path::Traffic => None,
            Path::Retry => {
                self.wait_until_due(packet).await;
                self.pacer.turn().await
            }
        };
        let verdict = self.forward(&packet.payload, &request_id).await;
        match verdict {
            // Only the retry path's own trials lengthen its pace, one step per trial, so
            // the pace grows with the length of the outage (0.5 s, 1 s, 2 s, ... up to the
            // cap), not with the rate of first deliveries failing meanwhile.
            Verdict::Retry(_) if path == Path::Retry => {
                self.pacer.failed(&self.config, &self.metrics);
            }
            Verdict::Retry(_) => {}
            _ => self.pacer.succeeded(&self.metrics),
        }
        verdict
    }

    async fn wait_until_due(&self, packet: &PublishPacket) {
        let Some(not_before) = property(packet, NOT_BEFORE_PROPERTY).and_then(|v| v.parse().ok())
        else {
            return;
        };
        // Clamped to the backoff cap: the clocks of two instances may disagree.
        let wait = Duration::from_millis(u64::saturating_sub(not_before, unix_millis()))
            .min(self.config.retry_backoff_max);
        if !wait.is_zero() {
            self.metrics.retry_waiting.inc();
            tokio::time::sleep(wait).await;
            self.metrics.retry_waiting.dec();
        }
    }

    /// Hands the message on after `verdict`; returns once it is safe to acknowledge.
    async fn settle(&self, packet: &PublishPacket, attempt: u32, verdict: Verdict) {
        match verdict {
            Verdict::Forwarded => {
                self.metrics.forwarded.inc();
            }
            Verdict::Retry(why)
                if self.config.max_attempts != 0 && attempt >= self.config.max_attempts =>
            {
                let detail = format!("gave up after {attempt} attempts: {why}");
                self.dead_letter(packet, attempt, "max_attempts", detail)
                    .await;
            }
            Verdict::Retry(why) => {
                let wait = self.config.backoff(attempt);
                debug!(attempt, wait_ms = wait.as_millis() as u64, %why, "forwarding failed; will retry");
                let not_before = unix_millis().saturating_add(wait.as_millis() as u64);
                let mut options = self.options(self.config.mqtt.qos, false);
                options.properties.user_properties = vec![
                    (ATTEMPT_PROPERTY.to_owned(), (attempt + 1).to_string()),
                    (NOT_BEFORE_PROPERTY.to_owned(), not_before.to_string()),
                    (
                        SOURCE_TOPIC_PROPERTY.to_owned(),
                        source_topic(packet).to_owned(),
                    ),
                    (LAST_ERROR_PROPERTY.to_owned(), why),
                ];
                let topic = retry_topic(&self.config.mqtt.client_id);
                match self.republish(&topic, &packet.payload, options, true).await {
                    Ok(()) => {
                        self.metrics.retried.inc();
                    }
                    Err(refused) => {
                        let detail =
                            format!("the broker refused the retry topic {topic}: {refused}");
                        error!(%detail, "cannot retry; dead-lettering instead");
                        self.dead_letter(packet, attempt, "retry_refused", detail)
                            .await;
                    }
                }
            }
            Verdict::DeadLetter(reason, detail) => {
                self.dead_letter(packet, attempt, reason, detail).await;
            }
        }
    }

    fn options(&self, qos: QoS, retain: bool) -> PublishOptions {
        PublishOptions {
            qos,
            retain,
            ..PublishOptions::default()
        }
    }

    /// The checks of [`lps_common::wire::validate_payload`] (fuzzed in `lps-fuzz`).
    fn validate(&self, payload: &[u8]) -> Result<RequestId, lps_common::wire::PayloadRejection> {
        lps_common::wire::validate_payload(payload, self.config.max_payload_bytes)
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
                debug!(%request_id, %error, "forwarding failed");
                Verdict::Retry(error.to_string())
            }
        }
    }

    /// Keeps the message as a durable dead letter (retained on its own topic). Only a
    /// broker that refuses even that holds it here, trying again and saying so.
    async fn dead_letter(
        &self,
        packet: &PublishPacket,
        attempt: u32,
        reason: &'static str,
        detail: String,
    ) {
        warn!(topic = %packet.topic_name, attempt, reason, %detail, "dead-lettering a message");
        let (topic, options) = dead_letters::letter(
            &self.config.dead_letter_topic,
            reason,
            &detail,
            attempt,
            source_topic(packet),
            &self.config.mqtt.client_id,
        );
        let mut stuck = false;
        while let Err(refused) = self
            .republish(&topic, &packet.payload, options.clone(), false)
            .await
        {
            if !stuck {
                stuck = true;
                self.metrics.stuck.inc();
            }
            error!(%topic, %refused, "the broker refuses the dead letter too; holding the message (check the broker's ACL and limits)");
            tokio::time::sleep(self.config.retry_backoff_max).await;
        }
        if stuck {
            self.metrics.stuck.dec();
        }
        self.metrics
            .dead_lettered
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Publishes until the broker completed the handshake on the connection it started on
    /// (a completion seen only after a reconnect proves less, so it publishes again). Waits
    /// while disconnected and, for the retry topic (`needs_group`), until this instance's
    /// retry subscription is live, so the `$share` group has a member. Returns the
    /// broker's refusal, which trying again cannot mend.
    async fn republish(
        &self,
        topic: &str,
        payload: &Bytes,
        options: PublishOptions,
        needs_group: bool,
    ) -> Result<(), PublishError> {
        // Through the control client: its session starts clean in every process, so a
        // republish never reuses a packet id that a killed predecessor left in flight (a
        // conforming broker takes such a PUBLISH as a duplicate and drops it).
        let link = &self.control.link;
        let mut wait = Duration::from_millis(100);
        loop {
            if needs_group {
                let mut live = self.retries.live.subscribe();
                let _ = live.wait_for(|live| *live).await;
            }
            link.wait_connected(self.config.publish_timeout).await;
            let result = link
                .publish_with(
                    topic,
                    payload.to_vec(),
                    options.clone(),
                    self.config.publish_timeout,
                )
                .await;
            match result {
                Ok(Completed::Direct) => return Ok(()),
                Ok(Completed::AfterReconnect) => {
                    debug!(topic, "completed only after a reconnect; publishing again");
                    continue;
                }
                Err(error @ (PublishError::Refused(_) | PublishError::Downgraded(_))) => {
                    return Err(error);
                }
                Err(error) => {
                    self.metrics.republish_failures.inc();
                    warn!(topic, %error, retry_in_ms = wait.as_millis() as u64, "republish failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Re-subscribes `client` after every CONNACK (and every second while a subscribe fails),
/// keeping `client.live` equal to "subscribed on the current connection". Before
/// subscribing it checks that the broker grants `qos`; a broker that does not, or that
/// refuses a shared subscription, is refused (logged at `error`, not live, asked again at
/// the longest reconnect delay).
fn keep_subscribed<F, Fut>(
    client: &Client,
    qos: QoS,
    check_timeout: Duration,
    stop: CancellationToken,
    subscribe: F,
) -> impl Future<Output = ()> + Send + 'static
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), MqttError>> + Send,
{
    let mut state = client.link.state();
    let live = client.live.clone();
    let link = client.link.clone();
    async move {
        loop {
            let current = *state.borrow_and_update();
            let mut retry = false;
            let mut refused = None;
            if current.connected {
                match link.grants_qos(qos, check_timeout).await {
                    Ok(true) => {}
                    Ok(false) => refused = Some(Capability::Qos2),
                    // Slow, not lacking: subscribe (a republish checks its QoS again).
                    Err(PublishError::Indeterminate(error)) => {
                        debug!(%error, "capability check not answered in time; subscribing");
                    }
                    Err(error) => {
                        debug!(%error, "capability check not answered; asking again");
                        retry = true;
                    }
                }
            }
            if let Some(capability) = refused {
                live.send_replace(false);
                link.refuse_broker(capability, &stop).await;
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
            if retry {
                live.send_replace(false);
            } else if current.connected {
                match subscribe().await {
                    Ok(()) => {
                        // Still the same connection? Otherwise go round again.
                        let same = state.borrow().connects == current.connects;
                        live.send_replace(same && state.borrow().connected);
                        debug!(connects = current.connects, "subscribed");
                    }
                    Err(e) if lacks_shared_subscriptions(&e) => {
                        live.send_replace(false);
                        link.refuse_broker(Capability::SharedSubscriptions, &stop)
                            .await;
                        if stop.is_cancelled() {
                            return;
                        }
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "subscribe failed; trying again");
                        live.send_replace(false);
                        retry = true;
                    }
                }
            } else {
                live.send_replace(false);
            }
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

fn property<'a>(packet: &'a PublishPacket, key: &str) -> Option<&'a str> {
    packet.properties.get_user_property_value(key)
}

/// The topic a message first came from (kept across retries).
fn source_topic(packet: &PublishPacket) -> &str {
    property(packet, SOURCE_TOPIC_PROPERTY).unwrap_or(&packet.topic_name)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
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
fn app(bridge: &Bridge, registry: Registry, max_body_bytes: usize) -> Router {
    finish_router(api::readyz(bridge.ready()), registry, max_body_bytes)
}

/// Runs the bridge, and its admin server on `listener`, until `shutdown` fires; then both
/// drain (the bridge within `SHUTDOWN_GRACE_SECS`). Returns [`SessionTakenOver`] (exit
/// code 3 in the binary) when another instance took over a broker session. What the
/// binary runs (see [`run`]) and what the tests run.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let server = config.server.clone();
    let bridge = Bridge::new(config, &mut registry).await?;
    // Cancelled by the bridge too, when a session is taken over.
    let stop = shutdown.child_token();
    let worker = tokio::spawn(bridge.clone().run(stop.clone(), server.shutdown_grace));
    let app = app(&bridge, registry, server.max_body_bytes);
    let served = service::serve(listener, &server, app, Protocols::Http1AndH2c, stop).await;
    lps_common::mqtt::bridge_outcome(worker, served).await
}

/// Binds the admin port per `config` and [`serve`]s until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    service::bind_and_serve(config, |c| &c.server, serve).await
}

/// The binary's entry point: configuration from the process environment (exit 64 when
/// invalid), then [`run`].
pub fn main() -> std::process::ExitCode {
    service::main_from_env(Config::from_lookup, |c| &c.telemetry, run)
}
