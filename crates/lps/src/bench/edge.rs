//! `lps bench edge`: the edge (lps-edge) next to what it stands in front of, in one run.
//!
//! - **Forward proxy** (seed 002's matrix): wrk, 2 threads, [`CONNECTIONS`] connections,
//!   `GET` of a small page (612 bytes, nginx's default page) and of each `--sizes` body
//!   (default 1 KiB, 16 KiB, 128 KiB, 1 MiB), from nginx directly (the ceiling) and as
//!   absolute-form requests through the edge's proxy with Basic `Proxy-Authorization`, as
//!   the seed ran its own. Each figure also carries seed 002's published req/s.
//! - **CONNECT to TLS**: each request is a fresh TCP connection, `CONNECT` through the edge,
//!   a full TLS handshake with nginx (no resumption), `GET`, the whole answer, close; the
//!   ceiling is the same without the tunnel. The certificate is made at run time (rcgen)
//!   and the client trusts exactly that one.
//! - **MQTT over WebSocket**: clients publishing [`WS_RATE`] msg/s each (QoS 0, 64-byte
//!   payload carrying the send time) over WebSocket through the edge into Mosquitto,
//!   against the same clients over TCP straight to Mosquitto (the ceiling); one TCP
//!   subscriber counts what arrives and the latency from publish to delivery.
//!
//! nginx runs as one process (`master_process off`, as one worker), wrk as the generator
//! of the proxy matrix (its CPU is reported as the generator's), this process for the
//! other two. Everything shares the machine's cores: compare a figure with its ceiling.
//! Needs `nginx` and `wrk` (`apt-get install nginx-light wrk`) and Mosquitto.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use lps_common::mqtt::mqtt5::{ConnectOptions, MqttClient, QoS};
use lps_common::net::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;

use super::generator::Mode;
use super::nginx;
use super::procstat::{Watched, Window};
use super::{
    BenchOptions, Figure, Key, Measured, Outcome, Report, Shape, me, progress, size_name,
    stop_services,
};
use crate::quantile::p50_p99_max_ms;
use crate::signals::or_interrupted;
use crate::supervisor::Supervisor;
use crate::topology::{Health, Program, ServiceSpec};

/// Connections of seed 002's matrix (wrk and siege at 100).
pub const CONNECTIONS: usize = 100;

/// Messages per second each MQTT client publishes (the seed's client: 100 msg/s).
pub const WS_RATE: f64 = 100.0;

/// MQTT client counts, each at [`WS_RATE`].
pub const WS_CLIENTS: [usize; 2] = [10, 100];

/// Size of nginx's default page, the seed's "small (HTML)".
const SMALL: usize = 612;

/// Proxy credentials of the run (the seed's proxy ran with Basic auth too).
const PROXY_USER: &str = "bench:bench";

/// Seed 002's published figures, on its own machine (`connect-proxy-benchmark.md`).
pub mod seed {
    /// wrk through the proxy, 100 connections, req/s: (body bytes, req/s).
    pub const FORWARD: [(usize, f64); 5] = [
        (super::SMALL, 10_876.48),
        (1 << 10, 9_943.98),
        (16 << 10, 6_255.64),
        (128 << 10, 2_488.53),
        (1 << 20, 459.31),
    ];
    /// CONNECT to TLS (siege, a tunnel per request), req/s: (body bytes, req/s).
    pub const CONNECT_TLS: [(usize, f64); 5] = [
        (super::SMALL, 268.64),
        (1 << 10, 277.97),
        (16 << 10, 308.88),
        (128 << 10, 280.31),
        (1 << 20, 168.42),
    ];
}

fn seed_figure(table: &[(usize, f64)], bytes: usize) -> Option<f64> {
    table.iter().find(|(b, _)| *b == bytes).map(|(_, r)| *r)
}

/// The file nginx serves for a body of `bytes`.
fn file_name(bytes: usize) -> String {
    if bytes == SMALL {
        "index.html".into()
    } else {
        format!("payload_{bytes}.bin")
    }
}

/// The processes of the edge scenario: nginx, Mosquitto and the edge.
struct Stage {
    nginx: tokio::process::Child,
    http_port: u16,
    tls_port: u16,
    broker_port: u16,
    ws_url: String,
    proxy: String,
    cert: tokio_rustls::rustls::pki_types::CertificateDer<'static>,
}

/// Runs the edge figures into `report`.
pub(super) async fn run(
    options: &BenchOptions,
    report: &mut Report,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    // Absolute: nginx resolves relative paths against its own prefix.
    let dir = std::path::absolute(options.out.join("edge"))?;
    let bodies: Vec<usize> = std::iter::once(SMALL)
        .chain(options.sizes.iter().copied())
        .collect();
    write_bodies(&dir.join("www"), &bodies)?;
    let (http_port, tls_port) = (free_port(), free_port());
    let (nginx, cert) = start_nginx(&dir, http_port, tls_port).await?;
    let ([broker, edge], ports) = broker_and_edge(&dir, http_port, tls_port)?;
    let mut supervisor = Supervisor::new(&dir)?;
    let started = or_interrupted(stop, async {
        supervisor.start(broker).await?;
        supervisor.start(edge).await
    })
    .await;
    if let Err(e) = started {
        stop_services(&mut supervisor, stop).await;
        return Err(e);
    }
    let stage = Stage {
        nginx,
        http_port,
        tls_port,
        broker_port: ports.broker,
        ws_url: format!("ws://127.0.0.1:{}/mqtt", ports.ws),
        proxy: format!("127.0.0.1:{}", ports.proxy),
        cert,
    };
    let services = || {
        let mut watched = super::watched(&supervisor, &[Program::LpsEdge, Program::Mosquitto]);
        watched.push(Watched {
            name: "nginx".into(),
            pid: stage.nginx.id(),
        });
        watched
    };
    let result = or_interrupted(stop, async {
        forward(options, report, &stage, &bodies, &services).await?;
        connect_tls(options, report, &stage, &bodies, &services).await?;
        websocket(options, report, &stage, &services).await
    })
    .await;
    stop_services(&mut supervisor, stop).await;
    let mut nginx = stage.nginx;
    let _ = nginx.kill().await;
    result
}

/// Writes the file nginx serves for each of `bodies` into `www`.
fn write_bodies(www: &Path, bodies: &[usize]) -> anyhow::Result<()> {
    std::fs::create_dir_all(www).with_context(|| format!("creating {}", www.display()))?;
    for &bytes in bodies {
        let body: Vec<u8> = (0..bytes).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(www.join(file_name(bytes)), body)?;
    }
    Ok(())
}

/// Where the broker and the edge listen.
struct EdgePorts {
    broker: u16,
    /// The edge's MQTT over WebSocket.
    ws: u16,
    /// The edge's forward proxy.
    proxy: u16,
}

/// The specs of Mosquitto (the repository's configuration, written into `dir`) and of the
/// edge in front of it, which may proxy to nginx's `http_port` and `tls_port` only; and
/// their ports.
fn broker_and_edge(
    dir: &Path,
    http_port: u16,
    tls_port: u16,
) -> anyhow::Result<([ServiceSpec; 2], EdgePorts)> {
    let broker_port = free_port();
    let broker_config = dir.join("broker").join("mosquitto.conf");
    crate::broker::write_mosquitto_config(&broker_config, broker_port)?;
    let mut broker = super::spec_of(
        "mosquitto",
        Program::Mosquitto,
        broker_port,
        Vec::new(),
        vec!["-c".into(), broker_config.display().to_string()],
    );
    broker.health = Health::Tcp;
    let (ws_port, proxy_port) = (free_port(), free_port());
    let edge = super::spec_of(
        "edge",
        Program::LpsEdge,
        ws_port,
        [
            (lps_common::config::ENV_MQTT_HOST, "127.0.0.1".to_owned()),
            (lps_common::config::ENV_MQTT_PORT, broker_port.to_string()),
            (lps_common::config::ENV_PROXY_PORT, proxy_port.to_string()),
            (
                lps_common::config::ENV_PROXY_ALLOWED_PORTS,
                format!("{http_port},{tls_port}"),
            ),
            ("PROXY_AUTH", PROXY_USER.to_owned()),
            ("LOG", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        Vec::new(),
    );
    let ports = EdgePorts {
        broker: broker_port,
        ws: ws_port,
        proxy: proxy_port,
    };
    Ok(([broker, edge], ports))
}

/// Writes nginx's configuration and a fresh certificate into `dir` and starts it on
/// `http_port` and `tls_port` (TLS); returns it once both ports accept, and the
/// certificate.
async fn start_nginx(
    dir: &Path,
    http_port: u16,
    tls_port: u16,
) -> anyhow::Result<(
    tokio::process::Child,
    tokio_rustls::rustls::pki_types::CertificateDer<'static>,
)> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .context("making the TLS certificate")?;
    std::fs::write(dir.join("cert.pem"), made.cert.pem())?;
    std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem())?;
    let d = dir.display();
    let config = format!(
        "{preamble}master_process off;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   sendfile on;\n\
         \x20   keepalive_requests 1000000;\n\
         {temp}\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{http_port};\n\
         \x20       listen 127.0.0.1:{tls_port} ssl;\n\
         \x20       ssl_certificate {d}/cert.pem;\n\
         \x20       ssl_certificate_key {d}/key.pem;\n\
         \x20       root {d}/www;\n\
         \x20   }}\n\
         }}\n",
        preamble = nginx::preamble(dir),
        temp = nginx::temp_paths(dir),
    );
    let child = nginx::start(dir, &config, &[http_port, tls_port]).await?;
    Ok((child, made.cert.der().clone()))
}

/// An edge figure: `ok` answers in `seconds` (latencies p50, p99, max in ms).
fn edge_figure(
    name: String,
    (connections, body_bytes, mode): (usize, usize, Mode),
    outcome: Outcome,
    measured: Measured,
) -> Figure {
    let shape = Shape {
        protocol: None,
        connections,
        body_bytes,
        mode,
    };
    Figure::new(Key::Edge(name), shape, outcome, measured)
}

/// Adds `figure` to the report. Figures come in pairs, the ceiling first: the first becomes
/// `ceiling`, the second is compared with it and with `upstream` (the seed's figure).
fn pair(report: &mut Report, ceiling: &mut Option<Figure>, figure: Figure, upstream: Option<f64>) {
    let figure = match ceiling {
        Some(base) => figure.against(Some(base), upstream),
        None => {
            *ceiling = Some(figure.clone());
            figure
        }
    };
    report.figures.push(figure);
}

/// Adds the closed-loop figure `(name, bytes, outcome, measured)` of [`CONNECTIONS`]
/// connections and `bytes` bodies to the report, paired as [`pair`] does, the seed's figure
/// for `bytes` taken from `seed`.
fn pair_closed(
    report: &mut Report,
    ceiling: &mut Option<Figure>,
    (name, bytes, outcome, measured): (String, usize, Outcome, Measured),
    seed: &[(usize, f64)],
) {
    let shape = (CONNECTIONS, bytes, Mode::Closed);
    let figure = edge_figure(name, shape, outcome, measured);
    pair(report, ceiling, figure, seed_figure(seed, bytes));
}

/// Seconds for wrk, which takes whole seconds.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// The forward-proxy matrix: wrk at nginx directly, then through the proxy.
async fn forward(
    options: &BenchOptions,
    report: &mut Report,
    stage: &Stage,
    bodies: &[usize],
    services: &impl Fn() -> Vec<Watched>,
) -> anyhow::Result<()> {
    let dir = options.out.join("edge");
    let wrk = ["/usr/bin/wrk", "/usr/local/bin/wrk"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("wrk is not installed (apt-get install wrk)")?;
    let auth = format!("Proxy-Authorization: Basic {}", basic_credentials());
    for &bytes in bodies {
        let url = format!("http://127.0.0.1:{}/{}", stage.http_port, file_name(bytes));
        let script = dir.join(format!("proxy_{bytes}.lua"));
        std::fs::write(
            &script,
            format!("request = function() return wrk.format(\"GET\", \"{url}\") end\n"),
        )?;
        let mut ceiling: Option<Figure> = None;
        for through_edge in [false, true] {
            let label = if through_edge {
                "proxy"
            } else {
                "nginx direct"
            };
            let name = format!("edge {label} c{CONNECTIONS} {}", size_name(bytes));
            progress(&name);
            let mut args: Vec<String> =
                vec!["-t2".into(), format!("-c{CONNECTIONS}"), "--latency".into()];
            if through_edge {
                args.extend([
                    "-s".into(),
                    script.display().to_string(),
                    "-H".into(),
                    auth.clone(),
                    format!("http://{}", stage.proxy),
                ]);
            } else {
                args.push(url.clone());
            }
            if !options.warmup.is_zero() {
                run_wrk(&wrk, &args, whole_seconds(options.warmup), None).await?;
            }
            let (out, measured) = run_wrk(
                &wrk,
                &args,
                whole_seconds(options.duration),
                Some(services()),
            )
            .await?;
            let measured = measured.context("wrk figures")?;
            let parsed = WrkOutput::parse(&out)
                .with_context(|| format!("reading wrk's output for {name}:\n{out}"))?;
            let outcome = Outcome {
                seconds: parsed.seconds,
                ok: parsed.requests,
                errors: parsed.errors,
                first_error: parsed.first_error.clone(),
                latency_ms: [parsed.p50_ms, parsed.p99_ms, parsed.max_ms],
            };
            let figure = (name, bytes, outcome, measured);
            pair_closed(report, &mut ceiling, figure, &seed::FORWARD);
        }
    }
    Ok(())
}

/// Runs wrk for `seconds`; its output and, when `watch` is given, the figures of wrk (as
/// the generator) and of `watch` over the run.
async fn run_wrk(
    wrk: &Path,
    args: &[String],
    seconds: u64,
    watch: Option<Vec<Watched>>,
) -> anyhow::Result<(String, Option<Measured>)> {
    let child = tokio::process::Command::new(wrk)
        .args(args)
        .arg(format!("-d{seconds}s"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", wrk.display()))?;
    let window = watch.map(|services| {
        let mut all = vec![Watched {
            name: "wrk (generator)".into(),
            pid: child.id(),
        }];
        all.extend(services);
        Window::start(all)
    });
    // wrk's CPU is read before it is reaped.
    let output = tokio::time::timeout(Duration::from_secs(seconds + 30), child.wait_with_output());
    let (output, measured) = match window {
        Some(window) => {
            let mut measured = None;
            tokio::pin!(output);
            let out = loop {
                tokio::select! {
                    out = &mut output => break out,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {
                        measured = Some(Measured::of(&window));
                    }
                }
            };
            (out, measured)
        }
        None => (output.await, None),
    };
    let output = output
        .context("wrk did not finish in time")?
        .context("running wrk")?;
    anyhow::ensure!(
        output.status.success(),
        "wrk {}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((
        String::from_utf8_lossy(&output.stdout).into_owned(),
        measured,
    ))
}

/// What wrk printed.
#[derive(Debug, Clone, PartialEq)]
struct WrkOutput {
    requests: u64,
    seconds: f64,
    errors: u64,
    first_error: Option<String>,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl WrkOutput {
    fn parse(out: &str) -> Option<Self> {
        let mut parsed = Self {
            requests: 0,
            seconds: 0.0,
            errors: 0,
            first_error: None,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
        };
        let mut found = false;
        for line in out.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                // "  12345 requests in 5.00s, 12.34MB read"
                [n, "requests", "in", secs, ..] => {
                    parsed.requests = n.parse().ok()?;
                    parsed.seconds = duration_ms(secs.trim_end_matches(','))? / 1e3;
                    found = true;
                }
                ["Latency", _avg, _stdev, max, ..] => parsed.max_ms = duration_ms(max)?,
                ["50%", value] => parsed.p50_ms = duration_ms(value)?,
                ["99%", value] => parsed.p99_ms = duration_ms(value)?,
                ["Socket", "errors:", rest @ ..] => {
                    let n: u64 = rest
                        .iter()
                        .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                        .sum();
                    parsed.errors += n;
                    parsed.first_error.get_or_insert_with(|| line.trim().into());
                }
                ["Non-2xx", "or", "3xx", "responses:", n] => {
                    parsed.errors += n.parse::<u64>().ok()?;
                    parsed.first_error.get_or_insert_with(|| line.trim().into());
                }
                _ => {}
            }
        }
        // Failed requests are counted in wrk's total; the figure counts answers.
        parsed.requests = parsed.requests.saturating_sub(parsed.errors);
        found.then_some(parsed)
    }
}

/// wrk's `1.23ms`, `456.78us`, `1.02s`, `2.00m`, in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(value * factor)
}

fn basic_credentials() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(PROXY_USER)
}

/// CONNECT to TLS: the smallest and the largest body, a tunnel and a handshake per request.
async fn connect_tls(
    options: &BenchOptions,
    report: &mut Report,
    stage: &Stage,
    bodies: &[usize],
    services: &impl Fn() -> Vec<Watched>,
) -> anyhow::Result<()> {
    let mut roots = RootCertStore::empty();
    roots.add(stage.cert.clone())?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // A full handshake per request, as the seed's siege made them.
    config.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    let connector = TlsConnector::from(Arc::new(config));
    let ends = [bodies.iter().copied().min(), bodies.iter().copied().max()];
    let mut sizes: Vec<usize> = ends.into_iter().flatten().collect();
    sizes.dedup();
    for bytes in sizes {
        let mut ceiling: Option<Figure> = None;
        for via in [None, Some(stage.proxy.as_str())] {
            let label = if via.is_some() {
                "CONNECT"
            } else {
                "TLS direct"
            };
            let name = format!("edge {label} c{CONNECTIONS} {}", size_name(bytes));
            progress(&name);
            let load = TlsLoad {
                connector: connector.clone(),
                proxy: via.map(str::to_owned),
                target: format!("127.0.0.1:{}", stage.tls_port),
                path: format!("/{}", file_name(bytes)),
            };
            if !options.warmup.is_zero() {
                load.run(options.warmup).await;
            }
            let mut all = vec![me()];
            all.extend(services());
            let window = Window::start(all);
            let (latencies, errors, first_error) = load.run(options.duration).await;
            let measured = Measured::of(&window);
            let outcome = Outcome {
                seconds: options.duration.as_secs_f64(),
                ok: latencies.len() as u64,
                errors,
                first_error,
                latency_ms: quantiles(&latencies),
            };
            let figure = (name, bytes, outcome, measured);
            pair_closed(report, &mut ceiling, figure, &seed::CONNECT_TLS);
        }
    }
    Ok(())
}

/// p50, p99 and max of `latencies` (sorted here), ms.
fn quantiles(latencies: &[Duration]) -> [f64; 3] {
    let mut us: Vec<u32> = latencies
        .iter()
        .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX))
        .collect();
    us.sort_unstable();
    p50_p99_max_ms(&us)
}

/// One TLS load: [`CONNECTIONS`] workers, each making requests one after the other.
#[derive(Clone)]
struct TlsLoad {
    connector: TlsConnector,
    /// The proxy to tunnel through; `None`: straight to `target`.
    proxy: Option<String>,
    target: String,
    path: String,
}

impl TlsLoad {
    /// Requests for `length`: their latencies, the failures and the first failure.
    async fn run(&self, length: Duration) -> (Vec<Duration>, u64, Option<String>) {
        let deadline = Instant::now() + length;
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..CONNECTIONS {
            let load = self.clone();
            workers.spawn(async move {
                let (mut latencies, mut errors, mut first) = (Vec::new(), 0u64, None);
                while Instant::now() < deadline {
                    let started = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(10), load.request()).await {
                        Ok(Ok(())) => latencies.push(started.elapsed()),
                        Ok(Err(e)) => {
                            errors += 1;
                            first.get_or_insert_with(|| format!("{e:#}"));
                        }
                        Err(_) => {
                            errors += 1;
                            first.get_or_insert_with(|| "no answer within 10 s".to_owned());
                        }
                    }
                }
                (latencies, errors, first)
            });
        }
        let (mut latencies, mut errors, mut first) = (Vec::new(), 0, None);
        while let Some(Ok((l, e, f))) = workers.join_next().await {
            latencies.extend(l);
            errors += e;
            first = first.or(f);
        }
        (latencies, errors, first)
    }

    async fn request(&self) -> anyhow::Result<()> {
        let tcp = match &self.proxy {
            None => TcpStream::connect(&self.target).await?,
            Some(proxy) => {
                let mut tcp = TcpStream::connect(proxy).await?;
                tcp.set_nodelay(true)?;
                let target = &self.target;
                let auth = basic_credentials();
                tcp.write_all(
                    format!(
                        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\
                         Proxy-Authorization: Basic {auth}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await?;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    anyhow::ensure!(tcp.read(&mut byte).await? == 1, "the proxy closed");
                    head.push(byte[0]);
                    anyhow::ensure!(head.len() < 8192, "answer head too long");
                }
                anyhow::ensure!(
                    head.starts_with(b"HTTP/1.1 200"),
                    "CONNECT answered {}",
                    String::from_utf8_lossy(&head).lines().next().unwrap_or("")
                );
                tcp
            }
        };
        let mut tls = self
            .connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        tls.write_all(
            format!(
                "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                self.path
            )
            .as_bytes(),
        )
        .await?;
        let mut buffer = vec![0u8; 64 << 10];
        let mut total = 0;
        loop {
            match tls.read(&mut buffer).await {
                Ok(0) => break,
                Ok(n) => total += n,
                // nginx may close without close_notify after `Connection: close`.
                Err(e) if total > 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::ensure!(total > 0, "empty answer");
        Ok(())
    }
}

/// MQTT at [`WS_RATE`] msg/s per client, over TCP straight to the broker and over
/// WebSocket through the edge.
async fn websocket(
    options: &BenchOptions,
    report: &mut Report,
    stage: &Stage,
    services: &impl Fn() -> Vec<Watched>,
) -> anyhow::Result<()> {
    let tcp_url = format!("mqtt://127.0.0.1:{}", stage.broker_port);
    for clients in WS_CLIENTS {
        let mut ceiling: Option<Figure> = None;
        for (label, url) in [("mqtt tcp", &tcp_url), ("mqtt ws", &stage.ws_url)] {
            let name = format!("edge {label} {clients}×{WS_RATE:.0}/s");
            progress(&name);
            let mut all = vec![me()];
            all.extend(services());
            let (result, measured) = mqtt_load(
                url,
                &tcp_url,
                clients,
                options.warmup,
                options.duration,
                all,
            )
            .await?;
            let outcome = Outcome {
                seconds: options.duration.as_secs_f64(),
                ok: result.received,
                errors: result.failed_clients,
                first_error: result.first_error,
                latency_ms: quantiles(&result.latencies),
            };
            let shape = (clients, PAYLOAD, Mode::Open(WS_RATE * clients as f64));
            let mut figure = edge_figure(name, shape, outcome, measured);
            figure.lost = Some(result.sent.saturating_sub(result.received));
            pair(report, &mut ceiling, figure, None);
        }
    }
    Ok(())
}

/// MQTT payload: 8 bytes of send time (µs since the epoch), then padding.
const PAYLOAD: usize = 64;

#[derive(Debug, Default)]
struct MqttResult {
    sent: u64,
    received: u64,
    latencies: Vec<Duration>,
    failed_clients: u64,
    first_error: Option<String>,
}

async fn mqtt_client(url: &str, id: String) -> anyhow::Result<MqttClient> {
    let client = MqttClient::with_options(ConnectOptions::new(id).with_clean_start(true));
    tokio::time::timeout(Duration::from_secs(10), client.connect(url))
        .await
        .with_context(|| format!("no CONNACK from {url} within 10 s"))?
        .with_context(|| format!("connecting to {url}"))?;
    Ok(client)
}

/// `clients` publishers on `url` at [`WS_RATE`] each for `warmup + duration`, one
/// subscriber on `broker`; what was published and delivered in the measured part.
async fn mqtt_load(
    url: &str,
    broker: &str,
    clients: usize,
    warmup: Duration,
    duration: Duration,
    watched: Vec<Watched>,
) -> anyhow::Result<(MqttResult, Measured)> {
    let run = format!("{}-{}", std::process::id(), crate::records::now_us());
    let topic = format!("lps/bench/edge/{run}");
    let subscriber = mqtt_client(broker, format!("bench-sub-{run}")).await?;
    let mut publishers = Vec::new();
    for c in 0..clients {
        publishers.push(mqtt_client(url, format!("bench-{run}-{c}")).await?);
    }
    let interval = Duration::from_secs_f64(1.0 / WS_RATE);
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let measure_at = start + warmup;
    let end = measure_at + duration;
    // The measured part, by the send time in the payload: a message counts as sent and
    // as received by the same rule.
    let from_us = crate::records::now_us()
        + u64::try_from((measure_at - tokio::time::Instant::now()).as_micros()).unwrap_or(u64::MAX);
    let latencies = record_arrivals(&subscriber, &topic, from_us).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (c, client) in publishers.iter().cloned().enumerate() {
        let offset = interval.mul_f64(c as f64 / clients as f64);
        let publishing = RatePublishing {
            client,
            topic: format!("{topic}/{c}"),
            first: start + offset,
            end,
            interval,
            from_us,
            sent: sent.clone(),
        };
        tasks.spawn(publishing.run());
    }
    tokio::time::sleep_until(measure_at).await;
    let window = Window::start(watched);
    let mut result = MqttResult::default();
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined.map_err(|e| e.to_string()).and_then(|r| r) {
            result.failed_clients += 1;
            result.first_error.get_or_insert(e);
        }
    }
    let measured = Measured::of(&window);
    result.sent = sent.load(Ordering::Relaxed);
    let count = || latencies.lock().map_or(0, |l| l.len() as u64);
    await_stragglers(count, result.sent).await;
    for client in publishers.iter().chain(std::iter::once(&subscriber)) {
        let _ = client.disconnect().await;
    }
    result.latencies = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    result.received = result.latencies.len() as u64;
    Ok((result, measured))
}

/// Subscribes `subscriber` to `topic/#`; the latencies of the messages sent from `from_us`
/// on (µs since the epoch, the first 8 bytes of the payload) collect in the vector
/// returned.
async fn record_arrivals(
    subscriber: &MqttClient,
    topic: &str,
    from_us: u64,
) -> anyhow::Result<Arc<std::sync::Mutex<Vec<Duration>>>> {
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = latencies.clone();
    subscriber
        .subscribe(format!("{topic}/#"), move |message| {
            let Some(sent) = message.payload.get(..8) else {
                return;
            };
            let sent = u64::from_be_bytes(sent.try_into().unwrap_or([0; 8]));
            if sent >= from_us
                && let Ok(mut l) = recorded.lock()
            {
                let now = crate::records::now_us();
                l.push(Duration::from_micros(now.saturating_sub(sent)));
            }
        })
        .await
        .context("subscribing")?;
    Ok(latencies)
}

/// One MQTT client publishing every `interval` from `first` until `end`, QoS 0, the send
/// time in the payload.
struct RatePublishing {
    client: MqttClient,
    topic: String,
    first: tokio::time::Instant,
    end: tokio::time::Instant,
    interval: Duration,
    /// Messages sent from here on (µs since the epoch) are measured and count in `sent`.
    from_us: u64,
    sent: Arc<AtomicU64>,
}

impl RatePublishing {
    async fn run(self) -> Result<(), String> {
        let mut next = self.first;
        while next < self.end {
            tokio::time::sleep_until(next).await;
            let now = crate::records::now_us();
            let mut payload = now.to_be_bytes().to_vec();
            payload.resize(PAYLOAD, b'x');
            self.client
                .publish_qos(self.topic.clone(), payload, QoS::AtMostOnce)
                .await
                .map_err(|e| format!("publish: {e}"))?;
            if now >= self.from_us {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            next += self.interval;
        }
        Ok(())
    }
}

/// Waits for whatever is still on its way: until `count()` reaches `sent`, nothing arrived
/// for 1 s, or 10 s passed.
async fn await_stragglers(count: impl Fn() -> u64, sent: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut grew) = (count(), Instant::now());
    while last < sent && Instant::now() < deadline && grew.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = count();
        if now > last {
            (last, grew) = (now, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let out = "Running 5s test @ http://127.0.0.1:8080/index.html
  2 threads and 100 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.73ms    2.10ms  41.30ms   80.00%
    Req/Sec     7.50k   500.00     8.00k    70.00%
  Latency Distribution
     50%    6.50ms
     75%    7.80ms
     90%    9.00ms
     99%  812.00us
  74800 requests in 5.01s, 60.20MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 10
Requests/sec:  14930.14
Transfer/sec:     12.02MB
";
        let parsed = WrkOutput::parse(out).unwrap();
        assert_eq!(parsed.requests, 74_800 - 15);
        assert_eq!(parsed.errors, 15);
        assert!((parsed.seconds - 5.01).abs() < 1e-9);
        assert!((parsed.p50_ms - 6.5).abs() < 1e-9);
        assert!((parsed.p99_ms - 0.812).abs() < 1e-9);
        assert!((parsed.max_ms - 41.3).abs() < 1e-9);
        assert!(WrkOutput::parse("wrk: connection refused").is_none());
    }
}
