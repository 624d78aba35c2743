//! `direct` and `relay`: one simulator and one ars-comp-2 (and nginx in ars-comp-2's
//! place, when installed), loaded by our generator.
//!
//! The relay's figures, each against its ceiling (`direct` at the same load):
//! - HTTP/1.1 and h2c (a connection per request in flight) at each `--connections`, and
//!   nginx as the relay at the same load (`nginx-as-relay`), which the HTTP/1.1 figures
//!   are compared with (`versus`);
//! - h2c with all requests as streams of one connection, against HTTP/1.1 at the same
//!   concurrency;
//! - the size matrix at the most connections, with the relay's peak memory;
//! - the added latency at half the relay's rate (open loop);
//! - the connection-scaling curve (`--curve`);
//! - idle keep-alive connections held open at once (`--held`) and the relay's memory.

use std::time::Instant;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::generator::{LoadSpec, Mode, Protocol, Target};
use super::procstat::{Watched, Window};
use super::{
    BenchOptions, Figure, Hop, Key, Measured, Outcome, Report, Scenario, Shape, Skipped, held, me,
    measure, nginx, progress, relay_body, small_body, spec_of, stop_services, target, upstream,
    watched,
};
use crate::quantile::p50_p99_max_ms;
use crate::signals::or_interrupted;
use crate::supervisor::Supervisor;
use crate::topology::Program;

/// Starts the simulator and ars-comp-2, measures the HTTP figures, stops them.
pub(super) async fn run(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let dir = options.out.join("http");
    let mut supervisor = Supervisor::new(&dir)?;
    let sim_port = lps_common::net::free_port();
    let relay_port = lps_common::net::free_port();
    let max_body = options.sizes.iter().copied().max().unwrap_or(0) * 2 + (64 << 10);
    let held = held_connections(options, report);
    // Accepting beyond MAX_CONNECTIONS waits: the held connections must all be served.
    let max_connections = (held + 1024).max(4096);
    let started = or_interrupted(stop, async {
        supervisor
            .start(spec_of(
                "ars-comp-3",
                Program::RastSimulator,
                sim_port,
                vec![("MAX_BODY_BYTES".into(), max_body.to_string())],
                vec!["-m".into(), "zero".into()],
            ))
            .await?;
        supervisor
            .start(spec_of(
                "ars-comp-2",
                Program::ArsComp2,
                relay_port,
                vec![
                    (
                        lps_common::config::ENV_TARGET_URL.into(),
                        format!(
                            "http://127.0.0.1:{sim_port}{}",
                            lps_common::wire::STORE_PATH
                        ),
                    ),
                    ("MAX_BODY_BYTES".into(), max_body.to_string()),
                    (
                        lps_common::config::ENV_MAX_CONNECTIONS.into(),
                        max_connections.to_string(),
                    ),
                ],
                Vec::new(),
            ))
            .await
    })
    .await;
    let result = match started {
        Ok(()) => {
            let mut hops = Hops::new(options, &supervisor, sim_port, relay_port)?;
            hops.held = held;
            hops.max_body = max_body;
            let result = or_interrupted(stop, hops.figures(report, most)).await;
            // Interrupted while nginx ran: its workers would outlive a killed master.
            let nginx = hops.nginx.lock().map(|mut n| n.take()).ok().flatten();
            if let Some((_, child)) = nginx {
                nginx::stop(child).await;
            }
            result
        }
        Err(e) => Err(e),
    };
    stop_services(&mut supervisor, stop).await;
    result
}

/// nginx as a relay to the simulator on `sim_port`, in `dir`: its target and the
/// process.
async fn start_nginx(
    dir: &std::path::Path,
    sim_port: u16,
    max_body: usize,
) -> anyhow::Result<(Target, tokio::process::Child)> {
    // Absolute: nginx resolves relative paths against its own prefix.
    let dir = std::path::absolute(dir.join("nginx"))?;
    std::fs::create_dir_all(&dir)?;
    let port = lps_common::net::free_port();
    let config = nginx::relay_config(&dir, port, sim_port, max_body);
    let child = nginx::start(&dir, &config, &[port]).await?;
    let url = format!("http://127.0.0.1:{port}");
    Ok((target(&url, lps_common::wire::STORE_PATH)?, child))
}

/// How many idle connections the relay is asked to hold: `--held`, within what the
/// open-files limit allows this process and the relay (each holds one descriptor per
/// connection, besides ~1,000 for the rest of the bench).
fn held_connections(options: &BenchOptions, report: &mut Report) -> usize {
    if options.held == 0 || !options.scenarios.contains(&Scenario::Relay) {
        return 0;
    }
    let limit = held::raise_fd_limit();
    let allowed = usize::try_from(limit.saturating_sub(1024)).unwrap_or(usize::MAX);
    if options.held <= allowed {
        return options.held;
    }
    let note = format!(
        "held connections clamped from {} to {allowed}: the open-files limit (RLIMIT_NOFILE) \
         is {limit}; raise its hard limit (ulimit -Hn) to hold more",
        options.held
    );
    eprintln!("bench: {note}");
    if !report.notes.contains(&note) {
        report.notes.push(note);
    }
    allowed
}

/// The running hops and how to load them.
struct Hops<'a> {
    options: &'a BenchOptions,
    supervisor: &'a Supervisor,
    sim: Target,
    relay: Target,
    /// The simulator's port, for nginx.
    sim_port: u16,
    /// `MAX_BODY_BYTES` of the services, nginx's `client_max_body_size`.
    max_body: usize,
    /// nginx as the relay, while its figures are measured (only then: it would be one
    /// more process on the cores during the others).
    nginx: std::sync::Mutex<Option<(Target, tokio::process::Child)>>,
    /// Idle connections to hold (already within the open-files limit).
    held: usize,
}

impl<'a> Hops<'a> {
    fn new(
        options: &'a BenchOptions,
        supervisor: &'a Supervisor,
        sim_port: u16,
        relay_port: u16,
    ) -> anyhow::Result<Self> {
        let path = lps_common::wire::STORE_PATH;
        Ok(Self {
            options,
            supervisor,
            sim: target(&format!("http://127.0.0.1:{sim_port}"), path)?,
            relay: target(&format!("http://127.0.0.1:{relay_port}"), path)?,
            sim_port,
            max_body: 0,
            nginx: std::sync::Mutex::new(None),
            held: 0,
        })
    }

    fn load(
        &self,
        target: &Target,
        protocol: Protocol,
        connections: usize,
        body: Bytes,
        mode: Mode,
    ) -> LoadSpec {
        LoadSpec {
            targets: vec![target.clone()],
            protocol,
            connections,
            body,
            mode,
            warmup: self.options.warmup,
            duration: self.options.duration,
            keep_ids: false,
            streams: 1,
        }
    }

    /// The target of `hop` and the processes its figures watch.
    fn hop(&self, hop: Hop) -> (Target, Vec<Watched>) {
        let sim = || watched(self.supervisor, &[Program::RastSimulator]);
        let nginx = match self.nginx.lock() {
            Ok(n) => n
                .as_ref()
                .map(|(target, child)| (target.clone(), child.id())),
            Err(_) => None,
        };
        match (hop, nginx) {
            (Hop::Direct, _) => (self.sim.clone(), sim()),
            (Hop::Nginx, Some((target, pid))) => {
                let mut watch = pid.map(nginx::processes).unwrap_or_default();
                watch.extend(sim());
                (target, watch)
            }
            (Hop::Relay | Hop::Nginx, _) => (
                self.relay.clone(),
                watched(
                    self.supervisor,
                    &[Program::ArsComp2, Program::RastSimulator],
                ),
            ),
        }
    }

    /// Measures `spec` through `hop` as the figure `key`.
    async fn figure(&self, key: Key, hop: Hop, spec: LoadSpec) -> anyhow::Result<Figure> {
        progress(&key.to_string());
        let (_, watch) = self.hop(hop);
        let (result, measured) = measure(spec.clone(), watch).await?;
        Ok(Figure::of_load(key, &spec, &result, measured))
    }

    /// Closed loop, small body, through `hop`.
    async fn closed(
        &self,
        hop: Hop,
        protocol: Protocol,
        connections: usize,
    ) -> anyhow::Result<Figure> {
        let (target, _) = self.hop(hop);
        let spec = self.load(&target, protocol, connections, small_body(), Mode::Closed);
        let key = Key::http(hop, protocol, connections);
        self.figure(key, hop, spec).await
    }

    async fn figures(&self, report: &mut Report, most: usize) -> anyhow::Result<()> {
        // Ceilings first, at every connection count (legacy needs them too).
        for &c in &self.options.connections {
            let upstream = (c == most).then_some(upstream::DIRECT_NGINX);
            let f = self.closed(Hop::Direct, Protocol::Http1, c).await?;
            report.figures.push(f.against(None, upstream));
        }
        if !self.options.scenarios.contains(&Scenario::Relay) {
            return Ok(());
        }
        self.nginx_as_relay(report).await?;
        self.relays(report).await?;
        self.streams(report).await?;
        self.size_matrix(report, most).await?;
        self.open_half(report, most).await?;
        self.curve(report).await?;
        self.held(report).await
    }

    /// nginx in the relay's place at each connection count, against `direct`; reported
    /// as skipped when nginx is missing or would not start.
    async fn nginx_as_relay(&self, report: &mut Report) -> anyhow::Result<()> {
        let dir = self.options.out.join("http");
        let started = match nginx::binary() {
            Some(_) => start_nginx(&dir, self.sim_port, self.max_body).await,
            None => Err(anyhow::anyhow!(nginx::MISSING)),
        };
        let nginx = match started {
            Ok(nginx) => nginx,
            Err(reason) => {
                for &c in &self.options.connections {
                    let key = Key::http(Hop::Nginx, Protocol::Http1, c);
                    let reason = format!("{reason:#}");
                    eprintln!("bench: {key} skipped: {reason}");
                    report.skipped.push(Skipped {
                        figure: key.to_string(),
                        reason,
                    });
                }
                return Ok(());
            }
        };
        if let Ok(mut slot) = self.nginx.lock() {
            *slot = Some(nginx);
        }
        for &c in &self.options.connections {
            let ceiling = Key::http(Hop::Direct, Protocol::Http1, c);
            let ceiling = super::find(&report.figures, &ceiling).cloned();
            let f = self.closed(Hop::Nginx, Protocol::Http1, c).await?;
            report.figures.push(f.against(ceiling.as_ref(), None));
        }
        let nginx = self.nginx.lock().map(|mut n| n.take()).ok().flatten();
        if let Some((_, child)) = nginx {
            nginx::stop(child).await;
        }
        Ok(())
    }

    /// The relay at each connection count and protocol, against `direct` at the same count.
    async fn relays(&self, report: &mut Report) -> anyhow::Result<()> {
        for protocol in [Protocol::Http1, Protocol::H2c] {
            for &c in &self.options.connections {
                let upstream = match (protocol, c) {
                    (Protocol::Http1, 8) => Some(upstream::RELAY_C8),
                    (Protocol::Http1, 50) => Some(upstream::RELAY_C50),
                    _ => None,
                };
                let find = |hop| super::find(&report.figures, &Key::http(hop, Protocol::Http1, c));
                let ceiling = find(Hop::Direct).cloned();
                // HTTP/1.1 against nginx in its place, h2c against HTTP/1.1.
                let versus = match protocol {
                    Protocol::Http1 => find(Hop::Nginx).cloned(),
                    Protocol::H2c => find(Hop::Relay).cloned(),
                };
                let f = self.closed(Hop::Relay, protocol, c).await?;
                let f = f
                    .against(ceiling.as_ref(), upstream)
                    .versus(versus.as_ref());
                report.figures.push(f);
            }
        }
        Ok(())
    }

    /// h2c with every request in flight a stream of one connection, at each connection
    /// count as streams, against `direct` and against HTTP/1.1 at the same concurrency.
    async fn streams(&self, report: &mut Report) -> anyhow::Result<()> {
        for &streams in &self.options.connections {
            let key = Key::Streams { streams };
            let mut spec = self.load(&self.relay, Protocol::H2c, 1, small_body(), Mode::Closed);
            spec.streams = streams;
            let f = self.figure(key, Hop::Relay, spec).await?;
            let find =
                |hop| super::find(&report.figures, &Key::http(hop, Protocol::Http1, streams));
            let f = f.against(find(Hop::Direct), None).versus(find(Hop::Relay));
            report.figures.push(f);
        }
        Ok(())
    }

    /// The connection-scaling curve: the relay at each count of `--curve` not measured
    /// yet, each against `direct` at the same count.
    async fn curve(&self, report: &mut Report) -> anyhow::Result<()> {
        for &c in &self.options.curve {
            if self.options.connections.contains(&c) {
                continue;
            }
            let direct = self.closed(Hop::Direct, Protocol::Http1, c).await?;
            let relay = self.closed(Hop::Relay, Protocol::Http1, c).await?;
            let relay = relay.against(Some(&direct), None);
            report.figures.extend([direct, relay]);
        }
        Ok(())
    }

    /// Idle keep-alive connections held open at once: opened with a request each, held
    /// for `--duration`, used once more. The window spans all of it, so the relay's peak
    /// is its memory with all of them open.
    async fn held(&self, report: &mut Report) -> anyhow::Result<()> {
        if self.held == 0 {
            return Ok(());
        }
        let key = Key::Held {
            connections: self.held,
        };
        progress(&key.to_string());
        let (_, services) = self.hop(Hop::Relay);
        let mut all = vec![me()];
        all.extend(services);
        let window = Window::start(all);
        let started = Instant::now();
        let held = held::run(&self.relay, self.held, small_body(), self.options.duration).await;
        let measured = Measured::of(&window);
        let shape = Shape {
            protocol: Some(Protocol::Http1),
            connections: self.held,
            body_bytes: small_body().len(),
            mode: Mode::Closed,
        };
        let outcome = Outcome {
            seconds: started.elapsed().as_secs_f64(),
            ok: held.ok,
            errors: held.errors,
            first_error: held.first_error,
            latency_ms: p50_p99_max_ms(&held.latencies_us),
        };
        report
            .figures
            .push(Figure::new(key, shape, outcome, measured));
        Ok(())
    }

    /// The payload matrix at the most connections, each size against its own ceiling.
    async fn size_matrix(&self, report: &mut Report, most: usize) -> anyhow::Result<()> {
        for &size in &self.options.sizes {
            let body = relay_body(size);
            let mut ceiling: Option<Figure> = None;
            for hop in [Hop::Direct, Hop::Relay] {
                let key = Key::Http {
                    hop,
                    protocol: Protocol::Http1,
                    connections: most,
                    body: Some(size),
                };
                let (target, _) = self.hop(hop);
                let spec = self.load(&target, Protocol::Http1, most, body.clone(), Mode::Closed);
                let f = self.figure(key, hop, spec).await?;
                let f = f.against(ceiling.as_ref(), None);
                ceiling.get_or_insert_with(|| f.clone());
                report.figures.push(f);
            }
        }
        Ok(())
    }

    /// Added latency at half the relay's throughput, open loop, against direct at that
    /// rate.
    async fn open_half(&self, report: &mut Report, most: usize) -> anyhow::Result<()> {
        let relay = Key::http(Hop::Relay, Protocol::Http1, most);
        let relay_most = super::find(&report.figures, &relay).map_or(0.0, |f| f.rate);
        if relay_most <= 0.0 {
            return Ok(());
        }
        let rate = relay_most / 2.0;
        let mut ceiling: Option<Figure> = None;
        for hop in [Hop::Direct, Hop::Relay] {
            let key = Key::OpenHalf {
                hop,
                connections: most,
            };
            progress(&format!("{key} ({rate:.0}/s)"));
            let (target, watch) = self.hop(hop);
            let spec = self.load(
                &target,
                Protocol::Http1,
                most,
                small_body(),
                Mode::Open(rate),
            );
            let (result, measured) = measure(spec.clone(), watch).await?;
            let f = Figure::of_load(key, &spec, &result, measured).against(ceiling.as_ref(), None);
            ceiling.get_or_insert_with(|| f.clone());
            report.figures.push(f);
        }
        Ok(())
    }
}
