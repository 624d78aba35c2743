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
//! Every request, with all its attempts, becomes one line of the client ledger
//! ([`crate::records::ClientRecord`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lps_common::request_id::RequestId;
use rand::seq::IndexedRandom;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::records::{self, ClientRecord, FinalStatus, RequestKind};

/// Phones of the three alarm devices of upstream's Locust file.
const PHONES: [&str; 3] = ["015142611148", "01754937448", "016590943333"];
/// Branches of upstream's Locust file (2011 is not among them).
const BRANCHES: [u32; 15] = [
    2001, 2002, 2003, 2004, 2005, 2006, 2007, 2008, 2009, 2010, 2012, 2013, 2014, 2015, 2016,
];

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
}

impl LoadReport {
    /// The `q` quantile (0..=1) of the response times, ms.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.response_ms.is_empty() {
            return 0.0;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((self.response_ms.len() - 1) as f64 * q).round() as usize;
        self.response_ms[i]
    }

    /// The final table.
    pub fn table(&self) -> String {
        #[allow(clippy::cast_precision_loss)]
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

struct Shared {
    client: reqwest::Client,
    config: LoadConfig,
    counters: Counters,
    ledger: mpsc::UnboundedSender<ClientRecord>,
    /// Fires when alarms must give up retrying.
    give_up: CancellationToken,
    /// Response times of the current performance step, ms.
    step_times: std::sync::Mutex<Vec<f64>>,
}

/// Runs the load; returns when it is over and every started alarm finished (or gave up).
pub async fn run(config: LoadConfig, stop: CancellationToken) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(!config.entries.is_empty(), "no entry URL to send alarms to");
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4096)
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(60));
    builder = if config.http2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::task::spawn_blocking({
        let path = config.ledger.clone();
        move || write_ledger(&path, rx)
    });
    let shared = Arc::new(Shared {
        client: builder.build()?,
        config,
        counters: Counters::default(),
        ledger: tx,
        give_up: CancellationToken::new(),
        step_times: std::sync::Mutex::new(Vec::new()),
    });
    let started = Instant::now();
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
    let counters = &shared.counters;
    let mut report = LoadReport {
        sent: counters.sent.load(Ordering::Relaxed),
        ok: counters.ok.load(Ordering::Relaxed),
        retries: counters.retries.load(Ordering::Relaxed),
        background_ok: counters.background_ok.load(Ordering::Relaxed),
        background_failed: counters.background_failed.load(Ordering::Relaxed),
        elapsed,
        steps,
        ..LoadReport::default()
    };
    drop(shared);
    let mut response_ms = writer.await??;
    response_ms.sort_by(f64::total_cmp);
    report.failed = report.sent.saturating_sub(report.ok);
    report.response_ms = response_ms;
    Ok(report)
}

/// Writes ledger records as they come; returns the response times of acknowledged alarms.
fn write_ledger(
    path: &std::path::Path,
    mut rx: mpsc::UnboundedReceiver<ClientRecord>,
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
        #[allow(clippy::cast_precision_loss)]
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

fn alarm_body(user: u32) -> String {
    let mut rng = rand::rng();
    let branch = BRANCHES.choose(&mut rng).copied().unwrap_or(2001);
    let phone = PHONES[user as usize % PHONES.len()];
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
    format!(
        r#"{{"phone":"{phone}","branch":"{branch}","headnumber":"8023","triggertime":"{now}"}}"#
    )
}

/// One alarm: sent until acknowledged (rotating endpoints, waiting between attempts) or
/// until the load gives up; recorded in the ledger.
async fn alarm(shared: &Shared, user: u32, step: u32) {
    let id = RequestId::generate();
    let body = alarm_body(user);
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
        let base = &entries[endpoint % entries.len()];
        record.attempts += 1;
        record.endpoints.push(base.clone());
        if record.attempts > 1 {
            shared.counters.retries.fetch_add(1, Ordering::Relaxed);
        }
        let sent = shared
            .client
            .post(format!("{base}/api/v1/simple"))
            .header("Request-Id", id.as_str())
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) => {
                record.last_status = response.status().as_u16();
                let ok = response.status().is_success();
                let _ = response.bytes().await;
                if ok {
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
            }
            Err(_) => record.last_status = 0,
        }
        endpoint += 1;
        tokio::select! {
            () = tokio::time::sleep(shared.config.wait) => {}
            () = shared.give_up.cancelled() => break,
        }
    }
    let _ = shared.ledger.send(record);
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
                let _ = ledger.send(ClientRecord {
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
                });
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
