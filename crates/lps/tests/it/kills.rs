//! SIGKILL scenarios of the NG chain, every piece a real process: the broker (Mosquitto,
//! or `lps service embedded-broker`), and `lps service …` for rast-simulator, ars-comp-2,
//! two legacy-proxy-2 and legacy-proxy-1.
//!
//! Steady load runs through legacy-proxy-1 while the victims are killed and restarted
//! (same environment, same folders, same ports where a client needs them); then every id
//! answered 200 must show up in the simulator's ledger. Each test prints
//! `kill <scenario>: N acknowledged, L lost, D duplicates`.
//!
//! A host crash without legacy-proxy-1's journal loses what the broker had not made
//! durable: with Mosquitto, what it completed since its last snapshot (`SNAPSHOT_GAP`); with
//! the embedded broker, what it completed since its last write-behind (`EMBEDDED_FORGETS`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lps_common::config::{
    ENV_BROKER_DATA, ENV_HTTP_PORT, ENV_LOG_DIR, ENV_LOG_FORMAT, ENV_MQTT_HOST, ENV_MQTT_PORT,
    ENV_MQTT_RECONNECT_MAX_MS, ENV_MQTT_TOPIC, ENV_REPLAY_JOURNAL_DIR, ENV_REPLAY_WINDOW_MS,
    ENV_RETRY_BACKOFF_MAX_MS, ENV_RETRY_BACKOFF_MS, ENV_SERVICE_NAME, ENV_SIM_MODEL,
    ENV_SIM_SERVICE_MS, ENV_SIM_WORKERS, ENV_TARGET_URL,
};
use lps_common::net::free_port;
use lps_common::wire::{METRICS_PATH, READYZ_PATH, STORE_PATH};
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::{ChildService, eventually};
use rast_simulator::journal::{LEDGER_FILE, LedgerRecord};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

const STORE: &str = STORE_PATH;
const MESSAGE: &str = r#"{"id":"070010","body":"alarm"}"#;
/// Requests in flight through legacy-proxy-1 at any time.
const CONCURRENCY: usize = 16;
/// Acknowledgements that count as "traffic flows", before the kill and again after it.
const FLOWING: usize = 200;
/// The simulator as fast as it gets: the chain holds almost nothing in flight.
const FAST_BACKEND: &[(&str, &str)] = &[(ENV_SIM_MODEL, "zero")];
/// A simulator slower than legacy-proxy-1 accepts (100/s: 2 workers, 20 ms each), as a
/// real backend under load: the broker holds a backlog of acknowledged messages, so a
/// host crash has something to lose.
const SLOW_BACKEND: &[(&str, &str)] = &[
    (ENV_SIM_MODEL, "fixed"),
    (ENV_SIM_WORKERS, "2"),
    (ENV_SIM_SERVICE_MS, "20"),
];
/// How long after the last save Mosquitto may still forget a completed message: its
/// `autosave_interval 1` is checked against whole seconds (`last + 1 < now`), so saves
/// come up to 2 s apart; plus the time a save takes.
const SNAPSHOT_GAP: Duration = Duration::from_secs(3);
/// legacy-proxy-1's `REPLAY_WINDOW_MS` (its default): what its journal holds.
const REPLAY_WINDOW: Duration = Duration::from_secs(5);
/// How long after completing a message the embedded broker (mqtt5 0.49.0, file storage)
/// may still forget it on a SIGKILL: it writes its session queues and in-flight messages
/// behind, every 250 ms, without fsync (the page cache outlives the process), so what it
/// completed in the last interval plus the time the write-out takes. Every QoS 1/2 message
/// for a session goes through its queue, also for an online subscriber whose Receive
/// Maximum window is full (`vendor/mqtt5/LPS-PATCH.md`; the published crate kept those in
/// memory only, and a SIGKILL lost the whole backlog, however old). Measured here (debug
/// build): 248 to 415 lost, acknowledged at most 0.50 to 0.59 s before the crash; the margin
/// is for a busier machine, where the write-out takes longer.
const EMBEDDED_FORGETS: Option<Duration> = Some(Duration::from_secs(2));

fn lps() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lps"))
}

/// One `lps service <program>` process that can be killed and started again with the
/// same environment and folder.
struct Service {
    program: &'static str,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    child: Option<ChildService>,
    /// Its address since the last start (a fixed `HTTP_PORT` keeps it across restarts).
    base: String,
}

impl Service {
    /// Not started yet: its folder exists, so its environment can name it.
    fn new(program: &'static str, env: Vec<(&str, String)>) -> Self {
        Self {
            program,
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            base: String::new(),
        }
    }

    async fn start(program: &'static str, env: Vec<(&str, String)>) -> Self {
        let mut service = Self::new(program, env);
        service.launch().await;
        service
    }

    async fn launch(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let child =
            ChildService::start_with_args(lps(), &["service", self.program], &env, self.dir.path())
                .await
                .unwrap_or_else(|e| panic!("start lps service {}: {e:#}", self.program));
        self.base = child.url("");
        self.child = Some(child);
    }

    /// SIGKILL, and waits until the process is gone.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A gauge or counter from `/metrics` (0 when absent or unreachable).
    async fn metric(&self, name: &str) -> f64 {
        let Ok(response) = client().get(self.url(METRICS_PATH)).send().await else {
            return 0.0;
        };
        let text = response.text().await.unwrap_or_default();
        lps_testkit::metric(&text, name, &[]).unwrap_or(0.0)
    }
}

/// Which broker the chain runs on.
#[derive(Clone, Copy)]
enum BrokerKind {
    Mosquitto,
    Embedded,
}

/// The chain's MQTT broker, a process a host crash kills: it comes back on the same port
/// with the same storage.
enum Broker {
    Mosquitto(Mosquitto),
    Embedded(EmbeddedBroker),
}

impl Broker {
    async fn start(kind: BrokerKind) -> Self {
        match kind {
            BrokerKind::Mosquitto => Self::Mosquitto(Mosquitto::start().await),
            BrokerKind::Embedded => Self::Embedded(EmbeddedBroker::start().await),
        }
    }

    fn env(&self) -> [(&'static str, String); 2] {
        let port = match self {
            Self::Mosquitto(broker) => broker.port,
            Self::Embedded(broker) => broker.port,
        };
        [
            (ENV_MQTT_HOST, "127.0.0.1".to_owned()),
            (ENV_MQTT_PORT, port.to_string()),
        ]
    }

    /// SIGKILL, and waits until the process is gone.
    async fn kill(&mut self) {
        match self {
            Self::Mosquitto(broker) => broker.kill().await,
            Self::Embedded(broker) => broker.kill().await,
        }
    }

    /// Starts it again on the same port with the same storage.
    async fn restart(&mut self) {
        match self {
            Self::Mosquitto(broker) => broker.restart().await,
            Self::Embedded(broker) => {
                broker.kill().await;
                broker.launch().await;
            }
        }
    }
}

/// `lps service embedded-broker` on a fixed `MQTT_PORT`, its storage (`BROKER_DATA`) in its
/// folder. It logs `embedded MQTT broker listening`, not the `listening` that
/// [`ChildService`] waits for, so readiness is its TCP port accepting.
struct EmbeddedBroker {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl EmbeddedBroker {
    async fn start() -> Self {
        let mut broker = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        broker.launch().await;
        broker
    }

    async fn launch(&mut self) {
        let dir = self.dir.path();
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("embedded-broker.stdout"))
            .unwrap();
        let child = Command::new(lps())
            .args(["service", "embedded-broker"])
            .env_clear()
            .env(ENV_MQTT_PORT, self.port.to_string())
            .env(ENV_BROKER_DATA, dir.join("data"))
            .env(ENV_LOG_DIR, dir)
            .env(ENV_LOG_FORMAT, "json")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start lps service embedded-broker");
        let child = self.child.insert(child);
        let port = self.port;
        eventually(
            "the embedded broker listening",
            Duration::from_secs(20),
            || {
                let exited = child.try_wait().ok().flatten();
                async move {
                    assert!(exited.is_none(), "the embedded broker exited: {exited:?}");
                    let connected = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
                    connected.ok().map(drop)
                }
            },
        )
        .await;
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// The NG chain: the broker → proxy2-1, proxy2-2 → ars-comp-2 → rast-simulator, fed by
/// proxy1-1.
struct Chain {
    broker: Broker,
    sim: Service,
    _ars_comp_2: Service,
    proxy2: [Service; 2],
    proxy1: Service,
}

impl Chain {
    /// Starts everything and waits until every bridge is ready. With `journal`,
    /// legacy-proxy-1 keeps its replay window in `REPLAY_JOURNAL_DIR` (in its folder).
    async fn start(broker: BrokerKind, journal: bool, backend: &[(&str, &str)]) -> Self {
        let broker = Broker::start(broker).await;
        // Fixed ports where a restart must come back on the same address.
        let mut env = vec![(ENV_HTTP_PORT, free_port().to_string())];
        env.extend(backend.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let sim = Service::start("rast-simulator", env).await;
        let ars_comp_2 = Service::start(
            "ars-comp-2",
            vec![
                (ENV_SERVICE_NAME, "ars-comp-2-1".to_owned()),
                (ENV_TARGET_URL, sim.url(STORE)),
            ],
        )
        .await;
        let mqtt = |name: &str| {
            let mut env: Vec<(&str, String)> = broker.env().into();
            env.push((ENV_SERVICE_NAME, name.to_owned()));
            env.push((ENV_MQTT_RECONNECT_MAX_MS, "500".to_owned()));
            env
        };
        let proxy2 = |name: &str| {
            let mut env = mqtt(name);
            env.push((ENV_TARGET_URL, ars_comp_2.url(STORE)));
            env.push((ENV_RETRY_BACKOFF_MS, "50".to_owned()));
            env.push((ENV_RETRY_BACKOFF_MAX_MS, "500".to_owned()));
            Service::start("legacy-proxy-2", env)
        };
        let proxy2 = [proxy2("proxy2-1").await, proxy2("proxy2-2").await];
        let mut env = mqtt("proxy1-1");
        env.push((ENV_HTTP_PORT, free_port().to_string()));
        env.push((ENV_MQTT_TOPIC, "proxy1/message".to_owned()));
        env.push((ENV_REPLAY_WINDOW_MS, REPLAY_WINDOW.as_millis().to_string()));
        let mut proxy1 = Service::new("legacy-proxy-1", env);
        if journal {
            // In its own folder: a restart finds the same journal.
            let dir = proxy1.dir.path().join("journal").display().to_string();
            proxy1.env.push((ENV_REPLAY_JOURNAL_DIR.into(), dir));
        }
        proxy1.launch().await;
        let chain = Self {
            broker,
            sim,
            _ars_comp_2: ars_comp_2,
            proxy2,
            proxy1,
        };
        chain.ready().await;
        chain
    }

    /// Waits until `/readyz` of every bridge answers 200.
    async fn ready(&self) {
        for bridge in [&self.proxy2[0], &self.proxy2[1], &self.proxy1] {
            lps_testkit::wait_ready(&bridge.url(READYZ_PATH), Duration::from_secs(20)).await;
        }
    }

    /// How often each id arrived at the simulator with status 200.
    fn arrivals(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for record in read_ledger(&self.sim.dir.path().join(LEDGER_FILE)) {
            if record.status == 200 {
                *counts.entry(record.uid).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Waits until the chain is idle: nothing in flight or waiting for a retry at either
    /// legacy-proxy-2, and the ledger unchanged, for a whole second. Duplicates are
    /// counted only then.
    async fn settled(&self) {
        let mut last = (usize::MAX, Instant::now());
        eventually("the chain idle", Duration::from_secs(20), || {
            let lines = self.arrivals().values().sum::<usize>();
            if lines != last.0 {
                last = (lines, Instant::now());
            }
            let quiet_since = last.1;
            async move {
                for proxy2 in &self.proxy2 {
                    let busy = proxy2.metric("bridge_in_flight").await
                        + proxy2.metric("bridge_retry_waiting").await;
                    if busy > 0.0 {
                        return None;
                    }
                }
                (quiet_since.elapsed() >= Duration::from_secs(1)).then_some(())
            }
        })
        .await;
    }
}

/// The simulator's ledger; a line torn by a SIGKILL is read from its last record start
/// (the restarted simulator appends right after it).
fn read_ledger(path: &Path) -> Vec<LedgerRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| {
            serde_json::from_str(line).ok().or_else(|| {
                let start = line.rfind(r#"{"uid""#)?;
                serde_json::from_str(&line[start..]).ok()
            })
        })
        .collect()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Closed-loop load through legacy-proxy-1: `CONCURRENCY` workers, each id sent once,
/// recording when each id was answered 200.
struct Load {
    running: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<BTreeMap<String, Instant>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(url: String) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let acknowledged = Arc::new(Mutex::new(BTreeMap::new()));
        let next = Arc::new(AtomicU64::new(1_000_000));
        let workers = (0..CONCURRENCY)
            .map(|_| {
                let (running, acknowledged, next, url) = (
                    running.clone(),
                    acknowledged.clone(),
                    next.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let client = client();
                    while running.load(Ordering::Acquire) {
                        let id = next.fetch_add(1, Ordering::Relaxed).to_string();
                        let sent = client
                            .post(&url)
                            .header("Request-Id", &id)
                            .header("Content-Type", "application/json")
                            .body(MESSAGE)
                            .send()
                            .await;
                        if sent.is_ok_and(|r| r.status().is_success()) {
                            acknowledged.lock().unwrap().insert(id, Instant::now());
                        } else {
                            // Refused (503) or the bridge is down: do not spin.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Self {
            running,
            acknowledged,
            workers,
        }
    }

    fn count(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    /// Waits until `more` further requests were acknowledged.
    async fn acknowledges(&self, more: usize) {
        let target = self.count() + more;
        eventually(
            "requests acknowledged again",
            Duration::from_secs(20),
            || async { (self.count() >= target).then_some(()) },
        )
        .await;
    }

    /// Stops the load; returns each acknowledged id with when it was answered.
    async fn stop(self) -> BTreeMap<String, Instant> {
        self.running.store(false, Ordering::Release);
        for worker in self.workers {
            worker.await.unwrap();
        }
        std::mem::take(&mut *self.acknowledged.lock().unwrap())
    }
}

/// Starts the chain and the load; returns once traffic arrives at the simulator.
async fn under_load(broker: BrokerKind, journal: bool, backend: &[(&str, &str)]) -> (Chain, Load) {
    let chain = Chain::start(broker, journal, backend).await;
    let load = Load::start(chain.proxy1.url(STORE));
    load.acknowledges(FLOWING).await;
    eventually("traffic at the simulator", Duration::from_secs(20), || {
        let arrived = chain.arrivals().len();
        async move { (arrived >= FLOWING / 4).then_some(()) }
    })
    .await;
    (chain, load)
}

/// After the restarts: the load goes on until `FLOWING` more were acknowledged, then stops.
async fn after_restart(chain: &Chain, load: Load) -> BTreeMap<String, Instant> {
    chain.ready().await;
    load.acknowledges(FLOWING).await;
    load.stop().await
}

/// Acknowledged ids missing from the ledger, and ids in it more than once.
struct Figures {
    acknowledged: usize,
    lost: Vec<String>,
    duplicates: usize,
}

impl Figures {
    fn of(acknowledged: &BTreeMap<String, Instant>, arrivals: &BTreeMap<String, usize>) -> Self {
        Self {
            acknowledged: acknowledged.len(),
            lost: acknowledged
                .keys()
                .filter(|id| !arrivals.contains_key(*id))
                .cloned()
                .collect(),
            duplicates: arrivals.values().filter(|n| **n > 1).count(),
        }
    }

    fn print(&self, scenario: &str) {
        println!(
            "kill {scenario}: {} acknowledged, {} lost, {} duplicates",
            self.acknowledged,
            self.lost.len(),
            self.duplicates
        );
    }
}

/// Waits until every acknowledged id arrived (at most 30 s) and the chain is idle, prints
/// the figures and asserts that nothing was lost.
async fn nothing_lost(scenario: &str, chain: &Chain, acknowledged: &BTreeMap<String, Instant>) {
    let arrived = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let arrivals = chain.arrivals();
            if acknowledged.keys().all(|id| arrivals.contains_key(id)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_ok();
    if arrived {
        chain.settled().await;
    }
    let figures = Figures::of(acknowledged, &chain.arrivals());
    figures.print(scenario);
    assert!(
        figures.lost.is_empty(),
        "{scenario}: {} acknowledged requests never reached the simulator, e.g. {:?}",
        figures.lost.len(),
        &figures.lost[..figures.lost.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_proxy_1_killed() {
    let (mut chain, load) = under_load(BrokerKind::Mosquitto, false, FAST_BACKEND).await;
    chain.proxy1.kill().await;
    chain.proxy1.launch().await;
    let acknowledged = after_restart(&chain, load).await;
    nothing_lost("legacy_proxy_1_killed", &chain, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rast_simulator_killed() {
    let (mut chain, load) = under_load(BrokerKind::Mosquitto, false, FAST_BACKEND).await;
    chain.sim.kill().await;
    // The deliberate outage: long enough for every legacy-proxy-2 to retry a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    chain.sim.launch().await;
    let acknowledged = after_restart(&chain, load).await;
    nothing_lost("rast_simulator_killed", &chain, &acknowledged).await;
}

/// Kills the broker, legacy-proxy-1 and both legacy-proxy-2 at once (the SIGKILLs go out
/// together, then each is awaited), as a host crash would, and starts them again.
async fn host_crash(scenario: &str, chain: &mut Chain, load: &Load) -> Instant {
    let backlog = load.count().saturating_sub(chain.arrivals().len());
    println!(
        "kill {scenario}: crash with ~{backlog} acknowledged requests not yet at the simulator"
    );
    let [proxy2a, proxy2b] = &mut chain.proxy2;
    tokio::join!(
        chain.broker.kill(),
        chain.proxy1.kill(),
        proxy2a.kill(),
        proxy2b.kill()
    );
    let crashed = Instant::now();
    chain.broker.restart().await;
    proxy2a.launch().await;
    proxy2b.launch().await;
    chain.proxy1.launch().await;
    crashed
}

/// A host crash with legacy-proxy-1's journal: nothing acknowledged may be lost.
async fn host_crash_with_the_journal_on(scenario: &str, broker: BrokerKind) {
    let (mut chain, load) = under_load(broker, true, SLOW_BACKEND).await;
    host_crash(scenario, &mut chain, &load).await;
    let acknowledged = after_restart(&chain, load).await;
    nothing_lost(scenario, &chain, &acknowledged).await;
    // The restarted bridge had no memory of the window: only the journal can have fed it.
    let replayed = chain.proxy1.metric("mqtt_replayed_total").await;
    println!("kill {scenario}: {replayed} published again from the journal");
    assert!(
        replayed > 0.0,
        "the restarted legacy-proxy-1 replayed its journal"
    );
}

/// A host crash without the journal: only what the broker completed less than `forgets`
/// before the crash (`None`: any time before it) may be gone; everything acknowledged
/// earlier, or after the restart, must arrive.
async fn host_crash_without_the_journal_on(
    scenario: &str,
    broker: BrokerKind,
    forgets: Option<Duration>,
) {
    let (mut chain, load) = under_load(broker, false, SLOW_BACKEND).await;
    let crashed = host_crash(scenario, &mut chain, &load).await;
    let acknowledged = after_restart(&chain, load).await;
    let may_be_lost = |at: &Instant| {
        *at < crashed && forgets.is_none_or(|forgets| crashed.duration_since(*at) < forgets)
    };
    let must_arrive: Vec<&String> = acknowledged
        .iter()
        .filter(|(_, at)| !may_be_lost(at))
        .map(|(id, _)| id)
        .collect();
    let what = match forgets {
        Some(gap) => format!("every id acknowledged {gap:?} before the crash or later arrived"),
        None => "every id acknowledged after the crash arrived".to_owned(),
    };
    eventually(&what, Duration::from_secs(30), || {
        let arrivals = chain.arrivals();
        let done = must_arrive.iter().all(|id| arrivals.contains_key(*id));
        async move { done.then_some(()) }
    })
    .await;
    chain.settled().await;
    let figures = Figures::of(&acknowledged, &chain.arrivals());
    figures.print(scenario);
    let ages: Vec<Duration> = figures
        .lost
        .iter()
        .map(|id| crashed.duration_since(acknowledged[id]))
        .collect();
    println!(
        "kill {scenario}: {} acknowledged requests lost without the journal (acknowledged \
         {:?} to {:?} before the crash)",
        figures.lost.len(),
        ages.iter().min(),
        ages.iter().max()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_crash_with_the_journal() {
    host_crash_with_the_journal_on("host_crash_with_the_journal", BrokerKind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_crash_without_the_journal() {
    host_crash_without_the_journal_on(
        "host_crash_without_the_journal",
        BrokerKind::Mosquitto,
        Some(SNAPSHOT_GAP),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_crash_with_the_journal_embedded_broker() {
    host_crash_with_the_journal_on(
        "host_crash_with_the_journal_embedded_broker",
        BrokerKind::Embedded,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_crash_without_the_journal_embedded_broker() {
    host_crash_without_the_journal_on(
        "host_crash_without_the_journal_embedded_broker",
        BrokerKind::Embedded,
        EMBEDDED_FORGETS,
    )
    .await;
}
