//! The whole chains: `legacy`, and `broker` + `ng` on one NG topology.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::generator::{LoadSpec, Mode, Protocol, Target};
use super::procstat::{Watched, Window};
use super::{
    BenchOptions, Figure, Hop, Key, Measured, Outcome, Report, Shape, alarm_body, broker, me,
    measure, micros, progress, seconds_after, small_body, stop_services, target, upstream, watched,
};
use crate::BrokerChoice;
use crate::quantile::p50_p99_max_ms;
use crate::records;
use crate::signals::or_interrupted;
use crate::supervisor::Supervisor;
use crate::topology::{Options, Program, Topology};

fn topology_options() -> Options {
    Options {
        ephemeral_ports: true,
        simulator_args: vec!["-m".into(), "zero".into()],
        ..Options::default()
    }
}

fn entries(supervisor: &Supervisor) -> anyhow::Result<Vec<Target>> {
    supervisor
        .running()
        .iter()
        .filter(|r| r.spec.entry)
        .map(|r| target(&r.base_url(), ars_comp_1::SIMPLE_PATH))
        .collect()
}

/// A closed or open load of alarms on the chain's entries, keeping the acknowledged ids.
fn alarms(
    options: &BenchOptions,
    supervisor: &Supervisor,
    connections: usize,
    mode: Mode,
) -> anyhow::Result<LoadSpec> {
    Ok(LoadSpec {
        targets: entries(supervisor)?,
        protocol: Protocol::Http1,
        connections,
        body: alarm_body(),
        mode,
        warmup: options.warmup,
        duration: options.duration,
        keep_ids: true,
        streams: 1,
    })
}

/// The baseline chain at the most connections, against `direct` at the same count.
pub(super) async fn legacy(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let dir = options.out.join("legacy");
    let mut supervisor = crate::start(
        Topology::Legacy,
        &topology_options(),
        &BrokerChoice::Auto,
        &dir,
        stop,
    )
    .await?;
    let result = or_interrupted(stop, async {
        let key = Key::Legacy { connections: most };
        progress(&key.to_string());
        let spec = alarms(options, &supervisor, most, Mode::Closed)?;
        let services = watched(
            &supervisor,
            &[Program::ArsComp1, Program::ArsComp2, Program::RastSimulator],
        );
        let (result, measured) = measure(spec.clone(), services).await?;
        let ledger = dir.join("logs").join(rast_simulator::journal::LEDGER_FILE);
        let (lost, _, _) = arrivals(&ledger, &result.ids, (0, 0), Duration::from_secs(5)).await?;
        let ceiling = Key::http(Hop::Direct, Protocol::Http1, most);
        let ceiling = super::find(&report.figures, &ceiling).cloned();
        let mut f = Figure::of_load(key, &spec, &result, measured);
        f.lost = Some(lost);
        report
            .figures
            .push(f.against(ceiling.as_ref(), Some(upstream::LEGACY)));
        anyhow::Ok(())
    })
    .await;
    stop_services(&mut supervisor, stop).await;
    result
}

/// `broker` and `ng` on one NG topology.
pub(super) async fn ng(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let dir = options.out.join("ng");
    let mut supervisor = crate::start(
        Topology::Ng,
        &topology_options(),
        &options.broker,
        &dir,
        stop,
    )
    .await?;
    let figures = ng_figures(options, report, most, &supervisor, &dir);
    let result = or_interrupted(stop, figures).await;
    stop_services(&mut supervisor, stop).await;
    result
}

async fn ng_figures(
    options: &BenchOptions,
    report: &mut Report,
    most: usize,
    supervisor: &Supervisor,
    dir: &Path,
) -> anyhow::Result<()> {
    let ceiling = broker_ceiling(options, report, supervisor).await?;
    report.figures.push(ceiling.clone());
    if !options.scenarios.contains(&super::Scenario::Ng) {
        return Ok(());
    }
    let ledger = dir.join("logs").join(rast_simulator::journal::LEDGER_FILE);
    let services = || {
        watched(
            supervisor,
            &[
                Program::ArsComp1,
                Program::LegacyProxy1,
                Program::Mosquitto,
                Program::EmbeddedBroker,
                Program::LegacyProxy2,
                Program::ArsComp2,
                Program::RastSimulator,
            ],
        )
    };
    // Sustainable: closed loop, counting arrivals at the simulator in the window.
    let key = Key::Ng {
        connections: most,
        open80: false,
    };
    progress(&key.to_string());
    let spec = alarms(options, supervisor, most, Mode::Closed)?;
    let f = ng_figure(options, key, spec, services(), &ledger).await?;
    let delivered = f.delivered_rate.unwrap_or(0.0);
    report
        .figures
        .push(f.against(Some(&ceiling), Some(upstream::NG_DELIVERED)));

    // 80 % of the sustainable delivered rate, open loop: the drain after the load.
    let rate = (delivered * 0.8).max(1.0);
    let key = Key::Ng {
        connections: most,
        open80: true,
    };
    progress(&format!("{key} ({rate:.0}/s)"));
    let spec = alarms(options, supervisor, most, Mode::Open(rate))?;
    let f = ng_figure(options, key, spec, services(), &ledger).await?;
    report.figures.push(f.against(Some(&ceiling), None));
    Ok(())
}

/// The NG ceiling: raw QoS 2 with the chain's client counts, through the topology's
/// broker. Names the broker in `report`.
async fn broker_ceiling(
    options: &BenchOptions,
    report: &mut Report,
    supervisor: &Supervisor,
) -> anyhow::Result<Figure> {
    let broker_service = supervisor
        .running()
        .iter()
        .find(|r| matches!(r.spec.program, Program::Mosquitto | Program::EmbeddedBroker));
    let broker_name = broker_service.map_or_else(
        || format!("{:?}", options.broker),
        |r| r.spec.program.name().to_owned(),
    );
    report.broker = Some(broker_name.clone());
    let address = match (broker_service, &options.broker) {
        (Some(r), _) => r.base_url(),
        (None, BrokerChoice::External(host, port)) => format!("mqtt://{host}:{port}"),
        (None, _) => anyhow::bail!("the NG topology has no broker"),
    };
    let key = Key::Broker {
        broker: broker_name,
    };
    progress(&key.to_string());
    let spec = broker::BrokerSpec {
        address,
        publishers: 3,
        subscribers: 3,
        window: 32,
        receive_maximum: 32,
        payload: small_body().len(),
        warmup: options.warmup,
        duration: options.duration,
    };
    let mut all = vec![me()];
    all.extend(watched(
        supervisor,
        &[Program::Mosquitto, Program::EmbeddedBroker],
    ));
    let run = tokio::spawn({
        let spec = spec.clone();
        async move { broker::run(&spec).await }
    });
    tokio::time::sleep(options.warmup).await;
    let window = Window::start(all);
    let result = run.await??;
    let measured = Measured::of(&window);
    let shape = Shape {
        protocol: None,
        connections: spec.publishers * spec.window,
        body_bytes: spec.payload,
        mode: Mode::Closed,
    };
    let outcome = Outcome {
        seconds: result.elapsed.as_secs_f64().max(1e-9),
        ok: result.delivered,
        errors: result.errors,
        first_error: result.first_error.clone(),
        latency_ms: p50_p99_max_ms(&result.latencies_us),
    };
    Ok(Figure::new(key, shape, outcome, measured).against(None, Some(upstream::BROKER)))
}

/// One NG load: what arrived at the simulator in the window, what never did, and how
/// long after the load the last acknowledged alarm arrived.
async fn ng_figure(
    options: &BenchOptions,
    key: Key,
    load: LoadSpec,
    services: Vec<Watched>,
    ledger: &Path,
) -> anyhow::Result<Figure> {
    let from_us = records::now_us() + micros(options.warmup);
    let (result, measured) = measure(load.clone(), services).await?;
    let to_us = from_us + micros(options.duration);
    let end_us = records::now_us();
    let (lost, in_window, last) =
        arrivals(ledger, &result.ids, (from_us, to_us), options.drain_timeout).await?;
    let mut f = Figure::of_load(key, &load, &result, measured);
    let delivered = in_window as f64 / options.duration.as_secs_f64().max(1e-9);
    f.delivered_rate = Some(delivered);
    f.lost = Some(lost);
    f.drain_s = Some(seconds_after(last, end_us));
    Ok(f)
}

/// Waits until every id of `ids` is in the simulator ledger `ledger` (or `timeout`);
/// returns the missing count, the arrivals in `[from_us, to_us)`, and the last arrival
/// of an id of `ids`.
async fn arrivals(
    ledger: &Path,
    ids: &[u64],
    window: (u64, u64),
    timeout: Duration,
) -> anyhow::Result<(u64, u64, u64)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let wanted: HashSet<String> = ids.iter().map(u64::to_string).collect();
    let mut tail = records::JsonlTail::new(ledger);
    let mut seen = HashSet::new();
    let (mut in_window, mut last) = (0, 0);
    loop {
        let records: Vec<rast_simulator::journal::LedgerRecord> = tail.read_new()?;
        for record in records.into_iter().filter(|r| r.status == 200) {
            if wanted.contains(&record.uid) {
                last = last.max(record.start_us);
                if (window.0..window.1).contains(&record.start_us) {
                    in_window += 1;
                }
                seen.insert(record.uid);
            }
        }
        let missing = (wanted.len() - seen.len()) as u64;
        if missing == 0 || tokio::time::Instant::now() >= deadline {
            return Ok((missing, in_window, last));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
