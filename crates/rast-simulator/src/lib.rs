//! rast-simulator: the legacy RAST backend ("ars-comp-3") the alarm chain ends in.
//!
//! `POST /<COMMAND>` for a known legacy command (see [`commands`]) reads and ignores the
//! body, waits the processing time the selected [`model::Model`] predicts (without
//! blocking a thread), and answers 200 `Success` with `X-Process-Time` (seconds spent) and
//! `X-Pred-Process-Time` (seconds predicted). An unknown command is 404
//! `Command not found`. The request uid is the `Request-Id` header verbatim, else a random
//! UUID. Every arrival is written to `ars_simulation.log` (upstream's format) and to a
//! JSON-lines ledger, see [`journal`]. Speaks HTTP/1.1 only, like the real backend. Each
//! request is processed in a `command` span (debug level) carrying its `request_id`.
//!
//! Environment: `HTTP_HOST`, `HTTP_PORT` (default 1337), `LOG_DIR` (folder of the
//! simulation log and ledger; default the working directory), plus the logging variables
//! of `lps-common`. Command line: `-m/--model`, `-c/--corr-max`, `--workers`,
//! `--service-ms` (see `rast-simulator --help`).

// Stricter than the workspace: a library documents what it exports, and `pub` means
// exported (`pub(crate)` otherwise).
#![warn(missing_docs, unreachable_pub)]

pub mod commands;
pub mod journal;
pub mod model;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{HeaderMap, HeaderValue, StatusCode, Version};
use lps_common::api::Body;
use lps_common::config::{
    ConfigError, ENV_LOG_DIR, ENV_SIM_CORR_MAX, ENV_SIM_MODEL, ENV_SIM_SERVICE_MS, ENV_SIM_WORKERS,
    Env, Lookup, ServerConfig,
};
use lps_common::metrics::version_label;
use lps_common::request_id::REQUEST_ID;
use lps_common::server::Protocols;
use lps_common::telemetry::TelemetryConfig;
use lps_common::{CancellationToken, Registry, finish_router, service};
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug_span, info};

use crate::journal::{Entry, Journal, LedgerRecord, epoch_us};
use crate::model::{Load, Model};

/// The most workers `--workers` accepts (a semaphore of more panics).
const MAX_WORKERS: usize = 1 << 20;

/// Command-line options.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about = "Simulator of the legacy RAST backend (ars-comp-3)")]
pub struct Args {
    /// Processing-time model: `0` (upstream's regression, gets faster under load), `fixed`
    /// or `exp` (service time with a worker limit, for overload experiments), `zero` (no
    /// delay, for benchmarks).
    #[arg(short = 'm', long, env = ENV_SIM_MODEL, default_value = "0")]
    pub model: String,
    /// Model 0: re-predict the processing time up to N times as other requests finish.
    #[arg(
        short = 'c',
        long = "corr-max",
        env = ENV_SIM_CORR_MAX,
        default_value_t = 0
    )]
    pub corr_max: u32,
    /// `fixed`/`exp`: requests served at once; the rest queue.
    #[arg(long, env = ENV_SIM_WORKERS, default_value_t = 4)]
    pub workers: usize,
    /// `fixed`/`exp`: service time (the mean for `exp`), milliseconds.
    #[arg(long = "service-ms", env = ENV_SIM_SERVICE_MS, default_value_t = 35.0)]
    pub service_ms: f64,
}

impl Args {
    /// The model these options select.
    pub fn model(&self) -> Result<Model, ConfigError> {
        let max = lps_common::config::MAX_DURATION;
        let service = Duration::try_from_secs_f64(self.service_ms / 1000.0)
            .ok()
            .filter(|d| (!d.is_zero() || self.model == "fixed") && *d <= max)
            .ok_or_else(|| {
                ConfigError::new(
                    "--service-ms",
                    &self.service_ms.to_string(),
                    format!(
                        "a positive number of milliseconds up to {}",
                        max.as_millis()
                    ),
                )
            })?;
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(ConfigError::new(
                "--workers",
                &self.workers.to_string(),
                format!("an integer from 1 to {MAX_WORKERS}"),
            ));
        }
        match self.model.as_str() {
            "0" => Ok(Model::Regression0 {
                corr_max: self.corr_max,
            }),
            "fixed" => Ok(Model::Fixed {
                workers: self.workers,
                service,
            }),
            "exp" => Ok(Model::Exponential {
                workers: self.workers,
                mean: service,
            }),
            "zero" => Ok(Model::Zero),
            other => Err(ConfigError::new("--model", other, "0, fixed, exp or zero")),
        }
    }
}

/// Everything the simulator reads from the environment and the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// Inbound server (default port 1337).
    pub server: ServerConfig,
    /// Logging.
    pub telemetry: TelemetryConfig,
    /// Folder of `ars_simulation.log` and the ledger.
    pub journal_dir: PathBuf,
    /// Processing-time model.
    pub model: Model,
}

impl Config {
    /// Reads the environment from `lookup` and the model from `args`.
    pub fn new(lookup: &dyn Lookup, args: &Args) -> Result<Self, ConfigError> {
        let env = Env::new(lookup);
        Ok(Self {
            server: ServerConfig::from_env(&env, 1337)?,
            telemetry: TelemetryConfig::from_env(&env, "ars-comp-3")?,
            journal_dir: PathBuf::from(env.string(ENV_LOG_DIR, ".")),
            model: args.model()?,
        })
    }
}

/// Shared state of the simulator.
#[derive(Debug)]
pub struct Simulator {
    model: Model,
    load: Load,
    workers: Option<Semaphore>,
    journal: Journal,
}

impl Simulator {
    /// A simulator using `model`, recording into `journal`.
    pub fn new(model: Model, journal: Journal) -> Arc<Self> {
        Arc::new(Self {
            workers: model.workers().map(Semaphore::new),
            model,
            load: Load::default(),
            journal,
        })
    }

    /// The PR1/PR3 bookkeeping (tests hold requests "in progress" through it).
    pub fn load(&self) -> &Load {
        &self.load
    }

    /// Waits out the processing time; returns the predicted seconds.
    async fn process(
        &self,
        progress: &model::InProgress<'_>,
        req_type: u32,
        start: Instant,
    ) -> f64 {
        match &self.model {
            Model::Zero => 0.0,
            Model::Regression0 { corr_max } => {
                let mut predicted = model::regression0(progress.pr1, progress.pr3(), req_type);
                sleep_until(start, predicted).await;
                for _ in 0..*corr_max {
                    let again = model::regression0(progress.pr1, progress.pr3(), req_type);
                    if again <= start.elapsed().as_secs_f64() {
                        break;
                    }
                    predicted = again;
                    sleep_until(start, predicted).await;
                }
                predicted
            }
            Model::Fixed { service, .. } => self.serve_with_worker(service.as_secs_f64()).await,
            Model::Exponential { mean, .. } => {
                // Inverse transform sampling; 1 - u is in (0, 1].
                let u: f64 = rand::rng().random();
                let sample = -mean.as_secs_f64() * (1.0 - u).ln();
                self.serve_with_worker(sample).await
            }
        }
    }

    async fn serve_with_worker(&self, seconds: f64) -> f64 {
        let _permit = match &self.workers {
            Some(workers) => workers.acquire().await.ok(),
            None => None,
        };
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        seconds
    }
}

async fn sleep_until(start: Instant, seconds: f64) {
    let target = start + Duration::from_secs_f64(seconds);
    tokio::time::sleep_until(target.into()).await;
}

/// The router: `POST /{command}` plus `/healthz` and `/metrics`.
pub fn app(sim: Arc<Simulator>, registry: Registry, max_body_bytes: usize) -> Router {
    let routes = Router::new()
        .route("/{command}", post(command))
        .with_state(sim);
    finish_router(routes, registry, max_body_bytes)
}

impl Simulator {
    /// Opens the journal in `config.journal_dir` and creates the simulator of
    /// `config.model`: the first half of [`serve`], for tests that need the simulator's
    /// [`Load`] too.
    pub fn open(config: &Config) -> anyhow::Result<(Arc<Self>, journal::Writer)> {
        let (journal, writer) = Journal::open(&config.journal_dir)?;
        info!(dir = %config.journal_dir.display(), model = ?config.model, "simulator journal open");
        Ok((Self::new(config.model.clone(), journal), writer))
    }

    /// Serves `listener` until `shutdown` fires, drains, then waits (at most 5 s) until the
    /// journal is written out: the second half of [`serve`].
    pub async fn serve(
        self: Arc<Self>,
        writer: journal::Writer,
        config: &ServerConfig,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let app = app(self, Registry::default(), config.max_body_bytes);
        let served = service::serve(listener, config, app, Protocols::Http1Only, shutdown).await;
        // The router (and with it the last Journal) is gone once serve returns; wait for the
        // writer to drain, but not forever in case a stuck connection still holds a sender.
        let closed = tokio::task::spawn_blocking(move || writer.close());
        if tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .is_err()
        {
            tracing::warn!("simulator journal not closed within 5 s");
        }
        served
    }
}

/// Opens the journal and serves `listener` until `shutdown` fires; the journal is written
/// out before returning. What the binary runs (see [`run`]) and what the tests run.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (sim, writer) = Simulator::open(&config)?;
    sim.serve(writer, &config.server, listener, shutdown).await
}

/// Binds per `config` and [`serve`]s until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    service::bind_and_serve(config, |c| &c.server, serve).await
}

thread_local! {
    static THREAD_NAME: Arc<str> =
        Arc::from(std::thread::current().name().unwrap_or("main"));
}

fn thread_name() -> Arc<str> {
    THREAD_NAME.with(Arc::clone)
}

/// Records an arrival in the ledger when dropped before [`Pending::finish`]: the client
/// went away, the request is recorded as 499.
struct Pending<'a> {
    journal: &'a Journal,
    record: Option<LedgerRecord>,
}

impl Pending<'_> {
    async fn finish(mut self, status: u16, pr3: u64, pred_s: f64) {
        if let Some(mut record) = self.record.take() {
            let at = SystemTime::now();
            record.end_us = epoch_us(at);
            record.status = status;
            record.pr3 = pr3;
            record.pred_s = pred_s;
            let (written, done) = tokio::sync::oneshot::channel();
            self.journal
                .send(Entry::Finish {
                    at,
                    thread: thread_name(),
                    record,
                    written: Some(written),
                })
                .await;
            // Answer only once the record is written (to the OS): a simulator killed right
            // after answering still shows the request.
            let _ = done.await;
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            let at = SystemTime::now();
            record.end_us = epoch_us(at);
            record.status = 499;
            self.journal.try_send(Entry::Finish {
                at,
                thread: thread_name(),
                record,
                written: None,
            });
        }
    }
}

async fn command(
    State(sim): State<Arc<Simulator>>,
    Path(name): Path<String>,
    version: Version,
    headers: HeaderMap,
    _body: Body,
) -> Response {
    let start = Instant::now();
    let arrived = SystemTime::now();
    let uid: String = headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    // Debug level: below it the span is never built (one relaxed load per request).
    let span = debug_span!("command", request_id = %uid, cmd = %name);
    process_command(&sim, name, version, uid, start, arrived)
        .instrument(span)
        .await
}

/// Records, processes and answers one command (the body of [`command`], in its span).
async fn process_command(
    sim: &Simulator,
    name: String,
    version: Version,
    uid: String,
    start: Instant,
    arrived: SystemTime,
) -> Response {
    let mut record = LedgerRecord {
        uid,
        cmd: name,
        start_us: epoch_us(arrived),
        end_us: 0,
        status: 0,
        pr1: 0,
        pr3: 0,
        pred_s: 0.0,
        proto: version_label(version).to_owned(),
    };
    let Some(req_type) = commands::ordinal(&record.cmd) else {
        let pending = Pending {
            journal: &sim.journal,
            record: Some(record),
        };
        pending.finish(404, 0, 0.0).await;
        return (StatusCode::NOT_FOUND, "Command not found").into_response();
    };
    let cmd = commands::COMMANDS[req_type as usize];
    let progress = sim.load.arrive();
    record.pr1 = progress.pr1;
    sim.journal
        .send(Entry::Start {
            at: arrived,
            thread: thread_name(),
            uid: Arc::from(record.uid.as_str()),
            cmd,
        })
        .await;
    let pending = Pending {
        journal: &sim.journal,
        record: Some(record),
    };
    let predicted = sim.process(&progress, req_type, start).await;
    let pr3 = progress.pr3();
    progress.complete();
    let elapsed = start.elapsed().as_secs_f64();
    pending.finish(200, pr3, predicted).await;
    let mut response = (StatusCode::OK, "Success").into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-process-time", elapsed),
        ("x-pred-process-time", predicted),
    ] {
        if let Ok(value) = HeaderValue::from_str(&format!("{value:.6}")) {
            headers.insert(name, value);
        }
    }
    response
}

/// The binary's entry point: options from `args` (the first is the program name) and the
/// process environment (exit 64 when invalid), then [`run`].
pub fn main<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    if let Some(code) = service::healthcheck_if_requested(1337) {
        return code;
    }
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        // A bad option or SIM_* variable is a configuration error like any other: one
        // line, exit 64 (clap's own exit code is 2, with a usage hint).
        Err(e) => {
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "invalid configuration: {}",
                line.trim_start_matches("error: ")
            );
            std::process::exit(lps_common::config::EXIT_CONFIG)
        }
    };
    let config = Config::new(&lps_common::config::ProcessEnv, &args)
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    service::main(&config.telemetry.clone(), run(config))
}
