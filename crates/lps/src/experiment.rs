//! `lps experiment` and `lps demo`: a topology, load (and faults), drain, stop, analysis,
//! all into one run folder.
//!
//! An experiment starts the topology on free ports (so it never collides with an `lps up`),
//! scrapes the legacy-proxy-2 counters every second (NG), runs the load and the fault
//! schedule side by side, then waits until every acknowledged alarm has arrived at the
//! simulator (the drain, measured by ids) or a timeout, stops everything and analyzes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::faults::{self, Schedule};
use crate::load::{self, LoadConfig, Shape};
use crate::records::{self, BridgeSample, ClientRecord, FinalStatus, RequestKind, RunInfo};
use crate::supervisor::Signal;
use crate::topology::{Options, Program, Topology};
use crate::{BrokerChoice, start};

/// One experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// Which topology.
    pub topology: Topology,
    /// NG broker.
    pub broker: BrokerChoice,
    /// Topology options (ports, simulator model, h2c).
    pub options: Options,
    /// Alarm load shape.
    pub shape: Shape,
    /// Load time (closed and open loop).
    pub duration: Duration,
    /// Background workload users (0: none).
    pub background_users: u32,
    /// Fault schedule.
    pub faults: Schedule,
    /// Fault time scale (1.0: upstream's times).
    pub scale: f64,
    /// SIGTERM instead of SIGKILL for faults.
    pub graceful: bool,
    /// How long to wait for the backlog to drain after the load.
    pub drain_timeout: Duration,
    /// The run folder.
    pub out: PathBuf,
}

/// Runs `experiment`; returns its run folder.
pub async fn run(experiment: &Experiment) -> anyhow::Result<PathBuf> {
    let dir = experiment.out.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "== {} experiment, run folder {}",
        experiment.topology,
        dir.display()
    );
    let supervisor = start(
        experiment.topology,
        &experiment.options,
        &experiment.broker,
        &dir,
    )
    .await?;
    let names: Vec<String> = supervisor
        .running()
        .iter()
        .map(|r| r.spec.name.clone())
        .collect();
    let entries: Vec<String> = supervisor
        .running()
        .iter()
        .filter(|r| r.spec.entry)
        .map(|r| r.base_url())
        .collect();
    let simulator = supervisor
        .running()
        .iter()
        .find(|r| r.spec.program == Program::RastSimulator)
        .map(|r| r.base_url())
        .context("no simulator")?;
    let bridges: Vec<(String, String)> = supervisor
        .running()
        .iter()
        .filter(|r| r.spec.program == Program::LegacyProxy2)
        .map(|r| (r.spec.name.clone(), format!("{}/metrics", r.base_url())))
        .collect();
    let broker = supervisor
        .running()
        .iter()
        .find(|r| matches!(r.spec.program, Program::Mosquitto | Program::EmbeddedBroker))
        .map(|r| {
            if r.spec.program == Program::Mosquitto {
                "mosquitto"
            } else {
                "embedded"
            }
            .to_owned()
        })
        .or_else(|| match (&experiment.broker, experiment.topology) {
            (BrokerChoice::External(host, port), Topology::Ng) => {
                Some(format!("mqtt://{host}:{port}"))
            }
            _ => None,
        });
    let supervisor = Arc::new(Mutex::new(supervisor));

    let stop_scraper = CancellationToken::new();
    let scraper = tokio::spawn(scrape_bridges(
        bridges,
        dir.join(records::BRIDGE_METRICS),
        stop_scraper.clone(),
    ));
    let plan = faults::plan(experiment.faults, &names, experiment.scale);
    let stop_faults = CancellationToken::new();
    let signal = if experiment.graceful {
        Signal::SIGTERM
    } else {
        Signal::SIGKILL
    };
    let injector = {
        let target = supervisor.clone();
        let log = dir.join(records::FAULTS);
        let stop = stop_faults.clone();
        tokio::spawn(async move { faults::inject(plan, &target, signal, log, stop).await })
    };

    let load_start_us = records::now_us();
    let config = LoadConfig {
        entries,
        shape: experiment.shape.clone(),
        duration: experiment.duration,
        wait: Duration::from_secs(1),
        http2: experiment.options.http2,
        background: (experiment.background_users > 0).then_some(simulator),
        background_users: experiment.background_users,
        finish_within: Duration::from_secs(60).max(experiment.drain_timeout),
        ledger: dir.join(records::CLIENT_LEDGER),
        progress: true,
    };
    // The faults run to the end of their schedule; alarms retry until they succeed, so the
    // load finishes once every service is back.
    let report = load::run(config, CancellationToken::new()).await;
    stop_faults.cancel();
    let injected = injector.await;
    let load_end_us = records::now_us();
    let report = report?;
    eprintln!("{}", report.table());

    let drained_us = drain(&dir, experiment.drain_timeout).await?;
    stop_scraper.cancel();
    let _ = scraper.await;
    supervisor
        .lock()
        .await
        .stop_all(Duration::from_secs(15))
        .await;
    if let Ok(Err(e)) | Err(e) = injected.map_err(anyhow::Error::from) {
        eprintln!("warning: fault injection failed: {e:#}");
    }
    let info = RunInfo {
        topology: experiment.topology.to_string(),
        broker,
        load: describe(&experiment.shape, experiment.duration),
        load_start_us,
        load_end_us,
        drained_us,
    };
    std::fs::write(
        dir.join(records::RUN_INFO),
        serde_json::to_vec_pretty(&info)?,
    )?;
    Ok(dir)
}

fn describe(shape: &Shape, duration: Duration) -> String {
    match shape {
        Shape::Users(n) => format!("{n} closed-loop users for {:.0} s", duration.as_secs_f64()),
        Shape::Rate(r) => format!("{r}/s open loop for {:.0} s", duration.as_secs_f64()),
        Shape::Steps {
            step_users,
            step,
            pause,
            max_steps,
        } => format!(
            "steps of {step_users} users, {:.0} s each with {:.0} s pauses, at most {max_steps}",
            step.as_secs_f64(),
            pause.as_secs_f64()
        ),
    }
}

/// Waits until every acknowledged alarm id of the client ledger is in the simulator ledger;
/// returns when that was, or `None` after `timeout`.
async fn drain(dir: &Path, timeout: Duration) -> anyhow::Result<Option<u64>> {
    let clients: Vec<ClientRecord> = records::read_jsonl(&dir.join(records::CLIENT_LEDGER))?;
    let mut waiting: HashSet<String> = clients
        .into_iter()
        .filter(|r| r.kind == RequestKind::Alarm && r.status == FinalStatus::Ok)
        .map(|r| r.id)
        .collect();
    let ledger = dir.join("logs").join(rast_simulator::journal::LEDGER_FILE);
    let deadline = tokio::time::Instant::now() + timeout;
    let total = waiting.len();
    loop {
        let arrived: Vec<rast_simulator::journal::LedgerRecord> = records::read_jsonl(&ledger)?;
        for record in arrived {
            if record.status == 200 {
                waiting.remove(&record.uid);
            }
        }
        if waiting.is_empty() {
            eprintln!("drained: all {total} acknowledged alarms arrived");
            return Ok(Some(records::now_us()));
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "not drained within {:.0} s: {} of {total} acknowledged alarms missing",
                timeout.as_secs_f64(),
                waiting.len()
            );
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Scrapes `bridge_forwarded_total` and friends from each legacy-proxy-2 every second.
async fn scrape_bridges(bridges: Vec<(String, String)>, path: PathBuf, stop: CancellationToken) {
    if bridges.is_empty() {
        return;
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap_or_default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            () = stop.cancelled() => true,
        };
        let mut samples = Vec::new();
        for (service, url) in &bridges {
            let Ok(response) = client.get(url).send().await else {
                continue;
            };
            let Ok(text) = response.text().await else {
                continue;
            };
            let value = |prefix: &str| -> u64 {
                text.lines()
                    .filter(|l| l.starts_with(prefix))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64
            };
            samples.push(BridgeSample {
                at_us: records::now_us(),
                service: service.clone(),
                forwarded: value("bridge_forwarded_total"),
                retried: value("bridge_retried_total"),
                dead_lettered: value("bridge_dead_lettered_total"),
            });
        }
        if let Err(e) = records::append_jsonl(&path, &samples) {
            eprintln!("warning: cannot record bridge metrics: {e}");
        }
        if last {
            return;
        }
    }
}

/// `lps demo`: the baseline and the NG experiment back to back, then one report.
pub async fn demo(template: &Experiment, out: &Path) -> anyhow::Result<PathBuf> {
    let mut runs = Vec::new();
    for topology in [Topology::Legacy, Topology::Ng] {
        let experiment = Experiment {
            topology,
            out: out.join(topology.to_string()),
            ..template.clone()
        };
        runs.push(run(&experiment).await?);
    }
    let summaries = crate::analyze::write_report(&runs, out)?;
    println!("{}", crate::analyze::table(&summaries));
    let report = out.join("report.html");
    println!("report: {}", report.display());
    Ok(report)
}
