//! `lps load`: the alarm-device workload of upstream's Locust scripts, and more.
//!
//! - **Closed loop** (`--users N`, failover load is 1 user): each user sends
//!   `POST /api/v1/simple` (phone fixed per user, branch random in 2001-2010/2012-2016,
//!   headnumber 8023, trigger time now in UTC) with a `Request-Id`, then waits 1 s. A
//!   request keeps its id across retries: on any failure the user waits 1 s and retries at
//!   the next entry endpoint (7081 → 7082 → 7083 → 7081 …) until it succeeds.
//! - **Steps** (`--steps`): performance load, 250·k users for a step, then a pause, until a
//!   step's average response time exceeds 10 s or its maximum 30 s (EN 50136), or
//!   `--max-steps` is reached.
//! - **Open loop** (`--rate R`): a new alarm every 1/R s whatever the answers, each retried
//!   like above, which avoids coordinated omission.
//! - **Background** (`--background URL`): 70 users sending one random non-alarm legacy
//!   command per second straight to the simulator, without request id.
//!
//! - **MQTT over WebSocket** (entries `ws://…` or `wss://…`, `lps load --mqtt-ws URL`): the
//!   same users, alarms, ids, waits and retries, but each user is an alarm *device* that
//!   publishes its alarm itself, at QoS 2 over MQTT over WebSocket through the edge
//!   (lps-edge) to the broker, on [`DEVICE_TOPIC`] (which legacy-proxy-2's first-delivery
//!   filter `+/message` takes), with the payload legacy-proxy-1 would publish:
//!   `{"id": <phone>, "body": "Phone: …, Branch: …, Headnumber: 8023, TriggerTime: …",
//!   "request_id": <id>}`. An alarm is acknowledged (ledger status 200) only by the PUBCOMP
//!   of its publish on the connection it was sent on. A PUBREC with a failure reason
//!   (≥ 0x80: the broker discarded it) is recorded as 503, as legacy-proxy-1 answers; no
//!   connection, a lost connection or no PUBCOMP within [`DEVICE_PUBLISH_TIMEOUT`] as 0;
//!   each is retried with the same id after the wait, at the next URL. A PUBCOMP that came
//!   only after a reconnect is not trusted (a broker restarted from an older snapshot
//!   completes a resent PUBREL for a message it lost): the alarm is published again. Each
//!   device keeps one MQTT v5 connection per URL (client id `lps-device-<run>-<user>-<i>`,
//!   persistent session of [`DEVICE_SESSION_EXPIRY`]), opened at its first alarm and
//!   closed when the load ends. Unlike legacy-proxy-1, a device cannot check that a
//!   legacy-proxy-2 is subscribed: Mosquitto completes a QoS 2 publish to a `$share` group
//!   without members and drops it, which `lps analyze` shows as lost.
//!
//! Every request, with all its attempts, becomes one line of the client ledger
//! ([`crate::records::ClientRecord`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use anyhow::Context;
use lps_common::config::Env;
use lps_common::mqtt::mqtt5::QoS;
use lps_common::mqtt::{Completed, Link, MqttConfig, PublishError};
use lps_common::request_id::RequestId;
use lps_common::wire::LegacyMessage;
use rand::seq::IndexedRandom;
use tokio::sync::{OnceCell, mpsc};
use tokio_util::sync::CancellationToken;

use crate::records::{self, ClientRecord, FinalStatus, RequestKind, RunInfo};

/// Phones of the three alarm devices of upstream's Locust file.
const PHONES: [&str; 3] = ["015142611148", "01754937448", "016590943333"];
/// Branches of upstream's Locust file (2011 is not among them).
const BRANCHES: [u32; 15] = [
    2001, 2002, 2003, 2004, 2005, 2006, 2007, 2008, 2009, 2010, 2012, 2013, 2014, 2015, 2016,
];

/// The topic alarm devices publish to over MQTT (`--mqtt-ws`): one level before `message`,
/// so legacy-proxy-2's shared filter `+/message` ([`lps_common::wire::bridge_filters`])
/// takes it like legacy-proxy-1's `proxy<i>/message`.
pub const DEVICE_TOPIC: &str = "devices/message";

/// How long a device waits for the PUBCOMP of one publish before it retries.
pub const DEVICE_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a device waits for its WebSocket upgrade and CONNACK.
const DEVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the broker keeps a device's session (its unfinished QoS 2 handshakes) after
/// the device went away: long enough for a reconnect, short enough that a load's devices
/// do not pile up in the broker.
pub const DEVICE_SESSION_EXPIRY: Duration = Duration::from_secs(300);

/// How alarms travel, from the scheme of the entry URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `http://`: `POST /api/v1/simple` to an entry service.
    Http,
    /// `ws://` or `wss://`: QoS 2 publishes over MQTT over WebSocket (the edge).
    MqttWs,
}

impl Transport {
    /// The transport of `entries`; they must all use the same one.
    pub fn of(entries: &[String]) -> anyhow::Result<Self> {
        let of_one = |url: &str| {
            if url.starts_with("ws://") || url.starts_with("wss://") {
                Ok(Self::MqttWs)
            } else if url.starts_with("http://") || url.starts_with("https://") {
                Ok(Self::Http)
            } else {
                anyhow::bail!(
                    "{url}: expected an http:// entry URL or a ws:// (wss://) MQTT-over-WebSocket URL"
                )
            }
        };
        let first = of_one(entries.first().context("no entry URL to send alarms to")?)?;
        for url in entries {
            anyhow::ensure!(
                of_one(url)? == first,
                "{url}: entry URLs mix HTTP and MQTT over WebSocket"
            );
        }
        Ok(first)
    }
}

/// The shape of the alarm load.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// `n` closed-loop users for the whole duration.
    Users(u32),
    /// Performance steps.
    Steps {
        /// Users added per step (upstream: 250).
        step_users: u32,
        /// Length of a step.
        step: Duration,
        /// Pause after a step.
        pause: Duration,
        /// Stop after this many steps at the latest.
        max_steps: u32,
    },
    /// Open loop: new alarms per second.
    Rate(f64),
}

/// What `lps load` does.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Entry base URLs, e.g. `http://127.0.0.1:7081`, in rotation order.
    pub entries: Vec<String>,
    /// Alarm load shape.
    pub shape: Shape,
    /// How long closed-loop or open-loop load runs (steps have their own length).
    pub duration: Duration,
    /// Wait between a user's alarms and before a retry (upstream: 1 s).
    pub wait: Duration,
    /// h2c instead of HTTP/1.1.
    pub http2: bool,
    /// Simulator base URL for the background workload, if any.
    pub background: Option<String>,
    /// Background users (upstream: 70), one request per second each.
    pub background_users: u32,
    /// How long unfinished alarms keep retrying after the load stops.
    pub finish_within: Duration,
    /// Client ledger path.
    pub ledger: PathBuf,
    /// Print a progress line every second.
    pub progress: bool,
}

/// Totals of a load run.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Alarms started.
    pub sent: u64,
    /// Alarms acknowledged (200).
    pub ok: u64,
    /// Alarms still failing at the end.
    pub failed: u64,
    /// Extra attempts.
    pub retries: u64,
    /// Background requests answered 200.
    pub background_ok: u64,
    /// Background requests that failed.
    pub background_failed: u64,
    /// Response times of acknowledged alarms, milliseconds, sorted.
    pub response_ms: Vec<f64>,
    /// Wall time of the load.
    pub elapsed: Duration,
    /// Steps completed (step loads).
    pub steps: u32,
    /// When the load started, µs since the epoch.
    pub start_us: u64,
    /// When the load ended (every alarm finished or gave up), µs since the epoch.
    pub end_us: u64,
}

impl LoadReport {
    /// The `q` quantile (0..=1) of the response times, ms.
    pub fn quantile(&self, q: f64) -> f64 {
        crate::quantile::quantile(&self.response_ms, q).unwrap_or(0.0)
    }

    /// The final table.
    pub fn table(&self) -> String {
        let rate = self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "alarms sent {}, ok {}, failed {}, retries {} ({rate:.0} ok/s over {:.1} s)\n\
             response time ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}\n\
             background ok {}, failed {}",
            self.sent,
            self.ok,
            self.failed,
            self.retries,
            self.elapsed.as_secs_f64(),
            self.quantile(0.5),
            self.quantile(0.9),
            self.quantile(0.99),
            self.quantile(1.0),
            self.background_ok,
            self.background_failed,
        )
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ok: AtomicU64,
    retries: AtomicU64,
    background_ok: AtomicU64,
    background_failed: AtomicU64,
}

impl Counters {
    /// A report of the counts so far.
    fn report(&self) -> LoadReport {
        LoadReport {
            sent: self.sent.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            background_ok: self.background_ok.load(Ordering::Relaxed),
            background_failed: self.background_failed.load(Ordering::Relaxed),
            ..LoadReport::default()
        }
    }
}

struct Shared {
    client: reqwest::Client,
    config: LoadConfig,
    counters: Counters,
    ledger: mpsc::Sender<ClientRecord>,
    /// Fires when alarms must give up retrying.
    give_up: CancellationToken,
    /// Response times of the current performance step, ms.
    step_times: std::sync::Mutex<Vec<f64>>,
    /// How alarms travel.
    transport: Transport,
    /// The MQTT connections of the devices (MQTT over WebSocket).
    devices: Devices,
}

/// Runs the load; returns when it is over and every started alarm finished (or gave up).
pub async fn run(config: LoadConfig, stop: CancellationToken) -> anyhow::Result<LoadReport> {
    let transport = Transport::of(&config.entries)?;
    let client = alarm_client(config.http2)?;
    let (tx, rx) = mpsc::channel(LEDGER_QUEUE);
    let writer = tokio::task::spawn_blocking({
        let path = config.ledger.clone();
        move || write_ledger(&path, rx)
    });
    let shared = Arc::new(Shared {
        client,
        config,
        counters: Counters::default(),
        ledger: tx,
        give_up: CancellationToken::new(),
        step_times: std::sync::Mutex::new(Vec::new()),
        transport,
        devices: Devices::new(),
    });
    let started = Instant::now();
    let start_us = records::now_us();
    let stop_sending = stop.child_token();
    let progress = shared
        .config
        .progress
        .then(|| tokio::spawn(progress(shared.clone(), stop_sending.clone())));
    let background = shared.config.background.clone().map(|url| {
        let shared = shared.clone();
        let stop = stop_sending.clone();
        tokio::spawn(async move { background_load(&shared, &url, &stop).await })
    });
    let steps = match shared.config.shape.clone() {
        Shape::Users(n) => {
            let deadline = tokio::time::Instant::now() + shared.config.duration;
            users(&shared, n, 0, deadline, &stop_sending).await;
            0
        }
        Shape::Rate(rate) => {
            open_loop(&shared, rate, &stop_sending).await;
            0
        }
        Shape::Steps {
            step_users,
            step,
            pause,
            max_steps,
        } => steps(&shared, step_users, step, pause, max_steps, &stop_sending).await,
    };
    stop_sending.cancel();
    if let Some(bg) = background {
        let _ = bg.await;
    }
    shared.give_up.cancel();
    if let Some(p) = progress {
        p.abort();
    }
    let elapsed = started.elapsed();
    shared.devices.disconnect().await;
    let report = LoadReport {
        elapsed,
        steps,
        start_us,
        end_us: records::now_us(),
        ..shared.counters.report()
    };
    drop(shared);
    complete(report, writer).await
}

/// The client the users send alarms with: pooled, `TCP_NODELAY`, no proxy from the
/// environment, HTTP/1.1 or h2c (prior knowledge).
fn alarm_client(http2: bool) -> reqwest::Result<reqwest::Client> {
    let builder = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4096)
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(60));
    if http2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    }
    .build()
}

/// Completes `report` once the ledger writer has written every record (the senders are
/// gone): the failures and the sorted response times.
async fn complete(
    mut report: LoadReport,
    writer: tokio::task::JoinHandle<anyhow::Result<Vec<f64>>>,
) -> anyhow::Result<LoadReport> {
    let mut response_ms = writer.await??;
    response_ms.sort_by(f64::total_cmp);
    report.failed = report.sent.saturating_sub(report.ok);
    report.response_ms = response_ms;
    Ok(report)
}

/// Writes `run.json` into `dir` for `lps analyze`, unless `dir` has one (an experiment's):
/// the load of `report` against a topology started elsewhere (`lps up … --out dir`, then
/// `lps load … --out dir`). Without a drain measurement, `lps analyze` reports the observed
/// drain (the `drained_us` key is left out). Returns whether it wrote the file.
pub fn write_run_info(
    dir: &std::path::Path,
    topology: &str,
    config: &LoadConfig,
    report: &LoadReport,
) -> anyhow::Result<bool> {
    let path = dir.join(records::RUN_INFO);
    if path.exists() {
        return Ok(false);
    }
    let shape = match &config.shape {
        Shape::Users(n) => format!("{n} users"),
        Shape::Rate(rate) => format!("rate {rate}/s"),
        Shape::Steps { step_users, .. } => format!("steps of {step_users} users"),
    };
    let how = match Transport::of(&config.entries)? {
        Transport::Http => "HTTP",
        Transport::MqttWs => "MQTT over WebSocket, QoS 2",
    };
    let info = RunInfo {
        topology: topology.to_owned(),
        broker: None,
        load: format!("lps load {shape}, {how}"),
        load_start_us: report.start_us,
        load_end_us: report.end_us,
        drained_us: None,
        platform: None,
        notes: vec![format!(
            "alarms sent by lps load to {}; the drain was not measured",
            config.entries.join(", ")
        )],
    };
    let mut value = serde_json::to_value(&info)?;
    if let Some(object) = value.as_object_mut() {
        object.remove("drained_us");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&value)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// Ledger records waiting for the writer; a full queue makes users wait (bounded memory
/// whatever the disk does).
const LEDGER_QUEUE: usize = 1 << 16;

/// Writes ledger records as they come; returns the response times of acknowledged alarms.
fn write_ledger(
    path: &std::path::Path,
    mut rx: mpsc::Receiver<ClientRecord>,
) -> anyhow::Result<Vec<f64>> {
    use std::io::Write;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut out = std::io::BufWriter::new(file);
    let mut response_ms = Vec::new();
    while let Some(record) = rx.blocking_recv() {
        if record.kind == RequestKind::Alarm
            && let Some(ms) = record.response_ms()
        {
            response_ms.push(ms);
        }
        serde_json::to_writer(&mut out, &record)?;
        out.write_all(b"\n")?;
        if rx.is_empty() {
            out.flush()?;
        }
    }
    out.flush()?;
    Ok(response_ms)
}

async fn progress(shared: Arc<Shared>, stop: CancellationToken) {
    let started = Instant::now();
    let mut last_ok = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = &shared.counters;
        let ok = c.ok.load(Ordering::Relaxed);
        let sent = c.sent.load(Ordering::Relaxed);
        eprintln!(
            "[{:>5.0} s] sent {sent}  ok {ok}  in flight {}  retries {}  {} ok/s",
            started.elapsed().as_secs_f64(),
            sent.saturating_sub(ok),
            c.retries.load(Ordering::Relaxed),
            ok - last_ok,
        );
        last_ok = ok;
    }
}

/// `n` closed-loop users until `deadline` or `stop`; alarms still retrying get
/// `finish_within` more.
async fn users(
    shared: &Arc<Shared>,
    n: u32,
    step: u32,
    deadline: tokio::time::Instant,
    stop: &CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for user in 0..n {
        let shared = shared.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            while tokio::time::Instant::now() < deadline && !stop.is_cancelled() {
                alarm(&shared, user, step).await;
                tokio::select! {
                    () = tokio::time::sleep(shared.config.wait) => {}
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(deadline) => return,
                }
            }
        });
    }
    tokio::select! {
        () = tokio::time::sleep_until(deadline) => {}
        () = stop.cancelled() => {}
    }
    finish(shared, tasks).await;
}

/// Waits for the alarms still in flight, at most `finish_within`; then they give up (and
/// are recorded as failed).
async fn finish(shared: &Shared, mut tasks: tokio::task::JoinSet<()>) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(shared.config.finish_within, all)
        .await
        .is_err()
    {
        shared.give_up.cancel();
        while tasks.join_next().await.is_some() {}
    }
}

/// Performance steps; returns how many ran.
async fn steps(
    shared: &Arc<Shared>,
    step_users: u32,
    step: Duration,
    pause: Duration,
    max_steps: u32,
    stop: &CancellationToken,
) -> u32 {
    for k in 1..=max_steps {
        let mark = shared.counters.ok.load(Ordering::Relaxed);
        let started = Instant::now();
        if let Ok(mut times) = shared.step_times.lock() {
            times.clear();
        }
        users(
            shared,
            step_users * k,
            k - 1,
            tokio::time::Instant::now() + step,
            stop,
        )
        .await;
        let times = shared
            .step_times
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        let avg = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let max = times.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "step {k}: {} users, {} ok in {:.0} s, response avg {avg:.0} ms, max {max:.0} ms",
            step_users * k,
            shared.counters.ok.load(Ordering::Relaxed) - mark,
            started.elapsed().as_secs_f64()
        );
        if avg > 10_000.0 || max > 30_000.0 {
            eprintln!("step {k} broke the EN 50136 limits (avg > 10 s or max > 30 s); stopping");
            return k;
        }
        if stop.is_cancelled() || k == max_steps {
            return k;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return k,
        }
    }
    max_steps
}

/// Open loop: `rate` new alarms per second until the duration ends or `stop`.
async fn open_loop(shared: &Arc<Shared>, rate: f64, stop: &CancellationToken) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let deadline = tokio::time::Instant::now() + shared.config.duration;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let mut n: u32 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let shared = shared.clone();
        tasks.spawn(async move { alarm(&shared, n % 3, 0).await });
        n = n.wrapping_add(1);
        while tasks.try_join_next().is_some() {}
    }
    finish(shared, tasks).await;
}

/// A user's alarm as ars-comp-1 takes it: the user's phone, a random branch, now.
fn alarm_of(user: u32) -> ars_comp_1::Alarm {
    let mut rng = rand::rng();
    let branch = BRANCHES.choose(&mut rng).copied().unwrap_or(2001);
    ars_comp_1::Alarm {
        phone: PHONES[user as usize % PHONES.len()].to_owned(),
        branch: branch.to_string(),
        headnumber: "8023".to_owned(),
        triggertime: chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string(),
    }
}

/// What one attempt sends: the entry's JSON body, or the device's MQTT payload.
fn message(transport: Transport, alarm: &ars_comp_1::Alarm, id: &RequestId) -> String {
    match transport {
        Transport::Http => format!(
            r#"{{"phone":"{}","branch":"{}","headnumber":"{}","triggertime":"{}"}}"#,
            alarm.phone, alarm.branch, alarm.headnumber, alarm.triggertime
        ),
        // What legacy-proxy-1 publishes for the same alarm coming from ars-comp-1.
        Transport::MqttWs => serde_json::to_string(&LegacyMessage {
            id: alarm.phone.clone(),
            body: alarm.body_text(),
            request_id: Some(id.to_string()),
        })
        .unwrap_or_default(),
    }
}

/// One alarm: sent until acknowledged (rotating endpoints, waiting between attempts) or
/// until the load gives up; recorded in the ledger.
async fn alarm(shared: &Shared, user: u32, step: u32) {
    let id = RequestId::generate();
    let body = message(shared.transport, &alarm_of(user), &id);
    let entries = &shared.config.entries;
    let mut record = ClientRecord {
        id: id.to_string(),
        kind: RequestKind::Alarm,
        user,
        step,
        first_send_us: records::now_us(),
        success_us: None,
        attempts: 0,
        endpoints: Vec::new(),
        last_status: 0,
        status: FinalStatus::Failed,
    };
    shared.counters.sent.fetch_add(1, Ordering::Relaxed);
    let mut endpoint = 0;
    loop {
        let slot = endpoint % entries.len();
        let base = &entries[slot];
        record.attempts += 1;
        record.endpoints.push(base.clone());
        if record.attempts > 1 {
            shared.counters.retries.fetch_add(1, Ordering::Relaxed);
        }
        record.last_status = match shared.transport {
            Transport::Http => post(shared, base, &id, &body).await,
            Transport::MqttWs => shared.devices.publish(user, slot, base, &body).await,
        };
        if (200..300).contains(&record.last_status) {
            record.success_us = Some(records::now_us());
            if let (Shape::Steps { .. }, Some(ms), Ok(mut times)) = (
                &shared.config.shape,
                record.response_ms(),
                shared.step_times.lock(),
            ) {
                times.push(ms);
            }
            record.status = FinalStatus::Ok;
            shared.counters.ok.fetch_add(1, Ordering::Relaxed);
            break;
        }
        endpoint += 1;
        tokio::select! {
            () = tokio::time::sleep(shared.config.wait) => {}
            () = shared.give_up.cancelled() => break,
        }
    }
    // After the alarm has finished: a slow disk delays the next alarm of this user, never
    // when this one was sent.
    let _ = shared.ledger.send(record).await;
}

/// One `POST /api/v1/simple`; its status, 0 without an answer.
async fn post(shared: &Shared, base: &str, id: &RequestId, body: &str) -> u16 {
    let sent = shared
        .client
        .post(format!("{base}{}", ars_comp_1::SIMPLE_PATH))
        .header("Request-Id", id.as_str())
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }
        Err(_) => 0,
    }
}

/// A device connection: the user and the index of its URL.
type DeviceKey = (u32, usize);

/// The MQTT connections of the alarm devices: one per user and URL, opened at the
/// device's first alarm, closed when the load ends.
struct Devices {
    /// Tells this load's client ids from another's on the same broker.
    run: String,
    links: std::sync::Mutex<HashMap<DeviceKey, Arc<OnceCell<Link>>>>,
    /// The first connect failure was reported.
    reported: std::sync::atomic::AtomicBool,
}

impl Devices {
    fn new() -> Self {
        Self {
            run: format!("{}-{}", std::process::id(), records::now_us() % 1_000_000),
            links: std::sync::Mutex::new(HashMap::new()),
            reported: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Publishes `payload` as `user`'s device through `url` (the `slot`-th URL); the ledger
    /// status: 200 on PUBCOMP, 503 when the broker refused the message (PUBREC ≥ 0x80, or
    /// it grants less than QoS 2), 0 otherwise (not connected, lost mid-handshake, no
    /// PUBCOMP in time, or a PUBCOMP only after a reconnect, which proves too little).
    async fn publish(&self, user: u32, slot: usize, url: &str, payload: &str) -> u16 {
        let link = match self.link(user, slot, url).await {
            Ok(link) => link,
            Err(e) => {
                if !self.reported.swap(true, Ordering::Relaxed) {
                    eprintln!("alarm device: {e:#} (retrying; further failures not shown)");
                }
                return 0;
            }
        };
        let outcome = link
            .publish(
                DEVICE_TOPIC,
                payload.as_bytes().to_vec(),
                QoS::ExactlyOnce,
                Vec::new(),
                DEVICE_PUBLISH_TIMEOUT,
            )
            .await;
        device_status(&outcome)
    }

    /// The device's connection through `url`, connecting it first if needed.
    async fn link(&self, user: u32, slot: usize, url: &str) -> anyhow::Result<Link> {
        let cell = self
            .links
            .lock()
            .map_err(|_| anyhow::anyhow!("device table poisoned"))?
            .entry((user, slot))
            .or_default()
            .clone();
        let client_id = format!("lps-device-{}-{user}-{slot}", self.run);
        cell.get_or_try_init(|| connect_device(client_id, url))
            .await
            .cloned()
    }

    /// Disconnects every device cleanly.
    async fn disconnect(&self) {
        let links: Vec<Link> = self.links.lock().map_or_else(
            |_| Vec::new(),
            |links| links.values().filter_map(|c| c.get().cloned()).collect(),
        );
        for link in links {
            link.disconnect().await;
        }
    }
}

/// The ledger status of a device's publish (see [`Devices::publish`]).
fn device_status(outcome: &Result<Completed, PublishError>) -> u16 {
    match outcome {
        Ok(Completed::Direct) => 200,
        Err(PublishError::Refused(_) | PublishError::Downgraded(_)) => 503,
        Ok(Completed::AfterReconnect) | Err(_) => 0,
    }
}

/// Opens one device's MQTT v5 connection over WebSocket at `url`.
async fn connect_device(client_id: String, url: &str) -> anyhow::Result<Link> {
    let expiry = DEVICE_SESSION_EXPIRY.as_secs().to_string();
    let settings: HashMap<&str, &str> = [
        (lps_common::config::ENV_SERVICE_NAME, client_id.as_str()),
        ("MQTT_SESSION_EXPIRY_SECS", expiry.as_str()),
    ]
    .into();
    let config = MqttConfig::from_env(&Env::new(&settings), &client_id)
        .map_err(|e| anyhow::anyhow!("device settings: {e}"))?;
    let options = config.connect_options();
    let link = Link::new(config, options).await?;
    match tokio::time::timeout(DEVICE_CONNECT_TIMEOUT, link.client.connect(url)).await {
        Ok(Ok(())) => Ok(link),
        Ok(Err(e)) => {
            let _ = link.client.disconnect().await;
            anyhow::bail!("{client_id}: connecting to {url}: {e}")
        }
        Err(_) => {
            let _ = link.client.disconnect().await;
            anyhow::bail!("{client_id}: no CONNACK from {url} within {DEVICE_CONNECT_TIMEOUT:?}")
        }
    }
}

async fn background_load(shared: &Shared, url: &str, stop: &CancellationToken) {
    let commands: Vec<&str> = rast_simulator::commands::background_commands().collect();
    let mut tasks = tokio::task::JoinSet::new();
    for user in 0..shared.config.background_users {
        let client = shared.client.clone();
        let commands = commands.clone();
        let url = url.to_owned();
        let stop = stop.clone();
        let ledger = shared.ledger.clone();
        // Spread the users over the first second.
        let offset = Duration::from_millis(
            u64::from(user) * 1000 / u64::from(shared.config.background_users.max(1)),
        );
        tasks.spawn(async move {
            tokio::time::sleep(offset).await;
            let mut ok = 0u64;
            let mut failed = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => break,
                }
                let command = commands
                    .choose(&mut rand::rng())
                    .copied()
                    .unwrap_or("ID_REQ_KC_HEARTBEAT");
                let first = records::now_us();
                let status = client
                    .post(format!("{url}/{command}"))
                    .body("{}")
                    .send()
                    .await
                    .map(|r| r.status());
                let success = matches!(status, Ok(s) if s.is_success());
                if success {
                    ok += 1
                } else {
                    failed += 1
                }
                let _ = ledger
                    .send(ClientRecord {
                        id: String::new(),
                        kind: RequestKind::Background,
                        user,
                        step: 0,
                        first_send_us: first,
                        success_us: success.then(records::now_us),
                        attempts: 1,
                        endpoints: vec![url.clone()],
                        last_status: status.map_or(0, |s| s.as_u16()),
                        status: if success {
                            FinalStatus::Ok
                        } else {
                            FinalStatus::Failed
                        },
                    })
                    .await;
            }
            (ok, failed)
        });
    }
    while let Some(result) = tasks.join_next().await {
        if let Ok((ok, failed)) = result {
            shared
                .counters
                .background_ok
                .fetch_add(ok, Ordering::Relaxed);
            shared
                .counters
                .background_failed
                .fetch_add(failed, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_of_the_entries_picks_the_transport() {
        let urls = |u: &[&str]| u.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            Transport::of(&urls(&["http://a:1", "http://b:2"])).unwrap(),
            Transport::Http
        );
        assert_eq!(
            Transport::of(&urls(&["ws://a:1/mqtt", "wss://b/mqtt"])).unwrap(),
            Transport::MqttWs
        );
        for bad in [&["http://a", "ws://b"][..], &["mqtt://a:1883"], &[]] {
            assert!(Transport::of(&urls(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_device_publishes_what_legacy_proxy_1_would() {
        let id = RequestId::generate();
        let alarm = alarm_of(1);
        let payload = message(Transport::MqttWs, &alarm, &id);
        // legacy-proxy-2 takes it: a JSON object with the request id.
        let parsed = lps_common::wire::validate_payload(payload.as_bytes(), 1 << 20).unwrap();
        assert_eq!(parsed, id);
        let message: LegacyMessage = serde_json::from_str(&payload).unwrap();
        assert_eq!(message.id, PHONES[1]);
        assert_eq!(message.body, alarm.body_text());
        assert!(message.body.starts_with("Phone: 01754937448, Branch: 20"));
    }

    #[test]
    fn only_a_pubcomp_on_the_same_connection_acknowledges() {
        assert_eq!(device_status(&Ok(Completed::Direct)), 200);
        assert_eq!(device_status(&Ok(Completed::AfterReconnect)), 0);
        let refused = PublishError::Refused("QuotaExceeded".into());
        assert_eq!(device_status(&Err(refused)), 503);
        let downgraded = PublishError::Downgraded("AtLeastOnce".into());
        assert_eq!(device_status(&Err(downgraded)), 503);
        for error in [
            PublishError::NotConnected,
            PublishError::Indeterminate("x".into()),
            PublishError::Failed("x".into()),
        ] {
            assert_eq!(device_status(&Err(error)), 0);
        }
    }
}
