//! Test harness for the LPS services (dev-only).
//!
//! - [`TestServer`]: a service's own `serve(config, listener, shutdown)` (the call its
//!   binary makes), or any router served by the real [`lps_common::server::serve`], on
//!   `127.0.0.1:0`, stopped when dropped.
//! - [`Recorder`]: a fake upstream that records every request (HTTP version, headers,
//!   body) and answers with a chosen status after a chosen delay.
//! - [`ChildService`]: a service binary started as a real process on an ephemeral port,
//!   its address read from its `listening` log line, killed when dropped; [`exits_64`]:
//!   a binary that refuses its configuration.
//! - [`eventually`]: polls a condition against a deadline instead of sleeping;
//!   [`wait_ready`]: until a `/readyz` (or `/healthz`) answers 2xx; [`assert_never_ready`]:
//!   it answers 503 all along.
//! - [`collector`]: an MQTT subscriber that keeps what arrives.
//! - [`post_ids`]: a load of requests, each with its own `Request-Id`.
//! - [`log_lines`] counts the lines of a service's log file that contain a text.
//! - [`scrape`] fetches a service's `/metrics` ([`try_scrape`] when it may not answer); [`metric`] reads one series of it by name
//!   and labels.
//! - [`mosquitto::Mosquitto`] and [`embedded::Embedded`]: real MQTT brokers on ephemeral
//!   ports, behind the [`Broker`] trait so a test can run against both.
//! - [`pki::TestPki`] and [`mosquitto::Mosquitto::start_secure`]: certificates generated
//!   for the test and a Mosquitto that requires TLS and a password.
//! - [`scripted::ScriptedBroker`]: a hand-written MQTT v5 peer answering as a test scripts
//!   it (PUBREC reason codes, a handshake that never completes, CONNACK Maximum QoS and
//!   Receive Maximum), recording every packet it received.

// Stricter than the workspace: a library documents what it exports, and `pub` means
// exported (`pub(crate)` otherwise).
#![warn(missing_docs, unreachable_pub)]

pub mod embedded;
pub mod mosquitto;
pub mod pki;
pub mod scripted;

/// An MQTT broker a test talks to: Mosquitto, the embedded one, or a scripted one.
pub trait Broker {
    /// Its TCP port on 127.0.0.1.
    fn port(&self) -> u16;

    /// `MQTT_HOST`/`MQTT_PORT` for a client of this broker.
    fn env(&self) -> [(&'static str, String); 2] {
        [
            (ENV_MQTT_HOST, "127.0.0.1".to_owned()),
            (ENV_MQTT_PORT, self.port().to_string()),
        ]
    }
}

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, Version};
use lps_common::config::{
    ENV_HTTP_HOST, ENV_HTTP_PORT, ENV_LOG_DIR, ENV_LOG_FORMAT, ENV_MQTT_HOST, ENV_MQTT_PORT,
};
use lps_common::mqtt::mqtt5::{Message, MqttClient, QoS, SubscribeOptions};
use lps_common::server::{self, Protocols};
use lps_common::wire::METRICS_PATH;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A service (its own `serve`) or a router, served in-process on a loopback port.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Binds `127.0.0.1:0` and runs `serve(listener, shutdown)` on it: a service's own
    /// `serve`, the call its binary makes, e.g.
    /// `TestServer::serve(|l, s| ars_comp_2::serve(config, l, s))`. [`TestServer::stop`]
    /// fires `shutdown` as SIGTERM would.
    pub async fn serve<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(TcpListener, CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Self::serve_on(loopback(), serve).await
    }

    /// [`TestServer::serve`] on `addr` (to bring a stopped service back on its port).
    pub async fn serve_on<F, Fut>(addr: SocketAddr, serve: F) -> Self
    where
        F: FnOnce(TcpListener, CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = server::bind(addr, 1024).expect("bind test server");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, shutdown.clone()));
        Self {
            addr,
            shutdown,
            task: Some(task),
        }
    }

    /// Serves `app` on `127.0.0.1:0` (HTTP/1.1 and h2c).
    pub async fn start(app: Router) -> Self {
        Self::start_on(loopback(), app, Protocols::default()).await
    }

    /// Serves `app` on `addr` with `protocols`.
    pub async fn start_on(addr: SocketAddr, app: Router, protocols: Protocols) -> Self {
        Self::start_with_limits(addr, app, protocols, server::Limits::default()).await
    }

    /// Serves `app` on `addr` with `protocols` within `limits` (short timeouts in tests).
    pub async fn start_with_limits(
        addr: SocketAddr,
        app: Router,
        protocols: Protocols,
        limits: server::Limits,
    ) -> Self {
        Self::serve_on(addr, move |listener, shutdown| async move {
            server::serve_with_limits(
                listener,
                app,
                protocols,
                shutdown,
                Duration::from_secs(5),
                limits,
            )
            .await
            .map_err(anyhow::Error::from)
        })
        .await
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Its `/metrics` text ([`scrape`]).
    pub async fn metrics(&self) -> String {
        scrape(&self.url("")).await
    }

    /// Fires the shutdown token, as SIGTERM would, and waits until the server drained and
    /// returned. Panics when it returned an error.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Ok(Err(error)) = task.await
        {
            panic!("the server stopped with an error: {error:#}");
        }
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One request as a [`Recorder`] saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP version used on the wire.
    pub version: Version,
    /// Request path.
    pub path: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
}

impl Recorded {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("recorded body is JSON")
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct RecorderState {
    requests: Mutex<Vec<Recorded>>,
    behaviour: Mutex<(u16, Duration)>,
}

/// A fake upstream that records requests and answers `status` after `delay`.
#[derive(Clone)]
pub struct Recorder {
    state: Arc<RecorderState>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// Answers 200 at once until told otherwise.
    pub fn new() -> Self {
        let state = RecorderState::default();
        *state.behaviour.lock().expect("lock") = (200, Duration::ZERO);
        Self {
            state: Arc::new(state),
        }
    }

    /// From now on answer `status` after `delay`.
    pub fn respond(&self, status: u16, delay: Duration) {
        *self.state.behaviour.lock().expect("lock") = (status, delay);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    /// A router answering every path and method.
    pub fn router(&self) -> Router {
        Router::new().fallback(record).with_state(self.clone())
    }
}

async fn record(State(recorder): State<Recorder>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    recorder
        .state
        .requests
        .lock()
        .expect("lock")
        .push(Recorded {
            version: parts.version,
            path: parts.uri.path().to_owned(),
            headers: parts.headers,
            body,
        });
    let (status, delay) = *recorder.state.behaviour.lock().expect("lock");
    tokio::time::sleep(delay).await;
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        "recorded",
    )
        .into_response()
}

/// An HTTP/1.1 client.
pub fn http1_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .build()
        .expect("client")
}

/// An h2c (prior knowledge) client.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client")
}

/// The value of one series of a Prometheus text exposition: the sample named `name` (a
/// counter with its `_total`) whose labels are exactly `labels`, in any order. `None` when
/// there is no such series. Asserting by name and labels, not by substring, keeps a test
/// from matching a longer name or another label set.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(series, _)| match series.split_once('{') {
            None => *series == name && labels.is_empty(),
            Some((n, rest)) => {
                n == name
                    && rest.strip_suffix('}').is_some_and(|set| {
                        let found = parse_labels(set);
                        found.len() == labels.len()
                            && labels
                                .iter()
                                .all(|(k, v)| found.iter().any(|(fk, fv)| fk == k && fv == v))
                    })
            }
        })
        .and_then(|(_, value)| value.trim().parse().ok())
}

/// `k="v",k2="v2"` (values with `\"` and `\\` escapes) as pairs.
fn parse_labels(set: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = set;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        pairs.push((key.trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    pairs
}

/// `GET {base}/metrics`: the Prometheus text of the service at `base`
/// (`http://127.0.0.1:PORT`). Panics unless it answers 200.
pub async fn scrape(base: &str) -> String {
    let response = http1_client()
        .get(format!("{base}{METRICS_PATH}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {base}{METRICS_PATH}: {e}"));
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "GET {base}{METRICS_PATH}"
    );
    response.text().await.expect("metrics text")
}

/// [`scrape`] for a service that may not answer (yet): the text of `GET {base}/metrics`
/// whatever its status, `None` when no answer came.
pub async fn try_scrape(base: &str) -> Option<String> {
    let response = http1_client()
        .get(format!("{base}{METRICS_PATH}"))
        .send()
        .await
        .ok()?;
    response.text().await.ok()
}

/// Waits until `GET url` (a `/readyz` or `/healthz`) answers 2xx, at most `within`.
pub async fn wait_ready(url: &str, within: Duration) {
    eventually(&format!("{url} ready"), within, || async {
        let response = http1_client().get(url).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `within` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match lps_common::poll::poll_until(within, Duration::from_millis(20), check).await {
        Some(value) => value,
        None => panic!("timed out after {within:?} waiting for {what}"),
    }
}

/// A plain MQTT client of `broker` subscribed to `filter` at QoS 2, collecting what `keep`
/// makes of each message that arrives (nothing where it gives `None`). Its client id is
/// `collector-<a free port>`, so that collectors never take over each other's session.
pub async fn collector<T, F>(
    broker: &dyn Broker,
    filter: &str,
    keep: F,
) -> (MqttClient, Arc<Mutex<Vec<T>>>)
where
    T: Send + 'static,
    F: Fn(Message) -> Option<T> + Send + Sync + 'static,
{
    let client = MqttClient::new(format!("collector-{}", lps_common::net::free_port()));
    client
        .connect(&format!("mqtt://127.0.0.1:{}", broker.port()))
        .await
        .expect("the collector connects");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let options = SubscribeOptions {
        qos: QoS::ExactlyOnce,
        ..SubscribeOptions::default()
    };
    client
        .subscribe_with_options(filter, options, move |m| {
            if let Some(kept) = keep(m) {
                sink.lock().unwrap().push(kept);
            }
        })
        .await
        .expect("the collector subscribes");
    (client, seen)
}

/// The ids answered 200 among `results` (as [`post_ids`] gives them).
pub fn ok_ids(results: &[(String, Option<StatusCode>)]) -> BTreeSet<String> {
    results
        .iter()
        .filter(|(_, s)| *s == Some(StatusCode::OK))
        .map(|(id, _)| id.clone())
        .collect()
}

/// Posts `body` to each `(url, id)` of `requests`, the id as its `Request-Id`,
/// `concurrency` at a time over one HTTP/1.1 client: each id with the status of its answer
/// (`None` when no answer came), in the order the answers came.
pub async fn post_ids(
    requests: impl IntoIterator<Item = (String, String)>,
    body: String,
    concurrency: usize,
) -> Vec<(String, Option<StatusCode>)> {
    use futures_util::StreamExt;
    let client = http1_client();
    futures_util::stream::iter(requests)
        .map(|(url, id)| {
            let request = client
                .post(url)
                .header("Request-Id", &id)
                .body(body.clone());
            async move {
                let status = request.send().await.ok().map(|r| r.status());
                (id, status)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Asserts that `GET url` (a `/readyz`) answers 503 for all of `during`, asking every
/// 100 ms; `each` runs after each answer (for more checks of the service while it is not
/// ready).
pub async fn assert_never_ready<F, Fut>(url: &str, during: Duration, mut each: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let client = http1_client();
    let started = std::time::Instant::now();
    while started.elapsed() < during {
        let status = client.get(url).send().await.unwrap().status();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "never ready");
        each().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lines of a service's JSON log file (`<dir>/<service>.log`, none when it is missing)
/// containing `text`.
pub fn log_lines(dir: &Path, service: &str, text: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{service}.log")))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(text))
        .count()
}

/// A loopback port where connections are refused, reserved while this lives: the socket
/// is bound but never listens, so no other test can take the port in the meantime.
pub struct ClosedPort {
    /// The port.
    pub port: u16,
    _socket: socket2::Socket,
}

impl ClosedPort {
    /// Reserves a port on 127.0.0.1.
    pub fn new() -> Self {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .expect("bound port");
        Self {
            port,
            _socket: socket,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `binary` with `args` and only `env`, in a temporary folder, and asserts that it
/// refuses its configuration (exit code 64); what it wrote to stderr.
pub async fn exits_64(binary: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("temporary folder");
    let output = Command::new(binary)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{binary}: {e}"));
    assert_eq!(output.status.code(), Some(64));
    String::from_utf8(output.stderr).expect("stderr in UTF-8")
}

/// A service binary running as a child process.
pub struct ChildService {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
}

impl ChildService {
    /// Starts `binary` with `env` (plus `HTTP_HOST=127.0.0.1`, `HTTP_PORT=0`, `LOG_DIR` in
    /// `dir` unless given) and waits for its `listening` line.
    pub async fn start(binary: &Path, env: &[(&str, &str)], dir: &Path) -> anyhow::Result<Self> {
        Self::start_with_args(binary, &[], env, dir).await
    }

    /// [`ChildService::start`] as a client of `broker`: its `MQTT_HOST`/`MQTT_PORT`, then
    /// `env`.
    pub async fn start_with_broker(
        binary: &Path,
        broker: &dyn Broker,
        env: &[(&str, &str)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let broker_env = broker.env();
        let mut all: Vec<(&str, &str)> = broker_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(env);
        Self::start(binary, &all, dir).await
    }

    /// [`ChildService::start`] with command-line `args`, e.g. `lps service legacy-proxy-1`
    /// (`["service", "legacy-proxy-1"]`). `HTTP_PORT` in `env` picks a fixed port, so a
    /// restarted process comes back where its clients expect it.
    pub async fn start_with_args(
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command
            .args(args)
            .env_clear()
            .env(ENV_HTTP_HOST, "127.0.0.1")
            .env(ENV_HTTP_PORT, "0")
            .env(ENV_LOG_DIR, dir)
            .env(ENV_LOG_FORMAT, "json")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await? {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
                    && event["fields"]["message"] == "listening"
                    && let Some(addr) = event["fields"]["addr"].as_str()
                {
                    return Ok::<_, anyhow::Error>(addr.parse()?);
                }
            }
            anyhow::bail!(
                "{} {} exited before listening",
                binary.display(),
                args.join(" ")
            )
        })
        .await??;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { addr, child })
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow::anyhow!("already exited"))?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// Kills the process with SIGKILL and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits (20 s at most) for this service, displaced by a second instance with its MQTT
    /// client id, to exit, and asserts that it exits with the takeover code
    /// ([`lps_common::mqtt::EXIT_SESSION_TAKEN_OVER`]); when it does not exit, panics showing
    /// `log()`.
    pub async fn assert_displaced(&mut self, log: impl FnOnce() -> String) {
        let started = std::time::Instant::now();
        let status = self
            .wait(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the displaced instance did not exit: {e}; its log ends:\n{}",
                    log()
                )
            });
        println!(
            "the displaced instance exited after {:?}",
            started.elapsed()
        );
        assert_eq!(
            status.code(),
            Some(i32::from(lps_common::mqtt::EXIT_SESSION_TAKEN_OVER)),
            "the displaced instance exits with the takeover code"
        );
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn wait(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(within, self.child.wait()).await??)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_a_series_by_name_and_exact_labels() {
        let text = "# HELP x_total X.\n# TYPE x_total counter\n\
                    x_total{route=\"/a\",status=\"200\"} 3\n\
                    x_total{route=\"/a\",status=\"200\",version=\"HTTP/2.0\"} 4\n\
                    x_total_more 9\nx_total 5\nq{v=\"a \\\"b\\\", c\"} 1.5\n";
        assert_eq!(metric(text, "x_total", &[]), Some(5.0));
        assert_eq!(
            metric(text, "x_total", &[("status", "200"), ("route", "/a")]),
            Some(3.0)
        );
        assert_eq!(
            metric(
                text,
                "x_total",
                &[("route", "/a"), ("status", "200"), ("version", "HTTP/2.0")]
            ),
            Some(4.0)
        );
        assert_eq!(metric(text, "x_total", &[("route", "/b")]), None);
        assert_eq!(metric(text, "x", &[]), None);
        assert_eq!(metric(text, "q", &[("v", "a \"b\", c")]), Some(1.5));
    }
}
