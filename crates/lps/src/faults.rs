//! Fault injection as upstream's `inject_fault.py`: stop a service, keep it down for a
//! "detection" time uniform in 26-34 s plus 2 s, then 1 s + 0.5 s, then start it again
//! (random seed 42). Schedules, each step 20 s after the previous one:
//!
//! - `entry`: all entry services (`ars-comp-1-*`) at once;
//! - `chain`: one after another `ars-comp-1-1`, `proxy1-1`, `proxy2-1`, `ars-comp-2-1`,
//!   `ars-comp-3` (services the topology does not have are skipped);
//! - `all`: `entry`, then `chain`.
//!
//! Every time is multiplied by a scale factor so that a schedule fits a short run.
//!
//! Targets: the supervisor of this process (signals), an `lps up` in another process (its
//! control socket, [`crate::control::Control`]), or a compose topology
//! ([`crate::compose::Compose`]: `stop|start`).

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::records::{self, FaultAction, FaultRecord};
use crate::supervisor::{Signal, Supervisor};

/// Which services to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    /// No faults.
    None,
    /// All entry services at once.
    Entry,
    /// One after another along the chain.
    Chain,
    /// `entry`, then `chain`.
    All,
}

/// One planned fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// When to stop, from the start of the load.
    pub at: Duration,
    /// Services stopped together.
    pub services: Vec<String>,
    /// How long they stay down.
    pub down: Duration,
}

/// Upstream's down time: detection U(26, 34) s + 2 s, then 1 s + 0.5 s.
fn down_time(rng: &mut impl Rng) -> Duration {
    Duration::from_secs_f64(rng.random_range(26.0..34.0) + 2.0 + 1.0 + 0.5)
}

/// The faults of `schedule` for a topology with `services`, times multiplied by `scale`.
pub fn plan(schedule: Schedule, services: &[String], scale: f64) -> Vec<Fault> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let has = |name: &str| services.iter().any(|s| s == name);
    let mut steps: Vec<Vec<String>> = Vec::new();
    if matches!(schedule, Schedule::Entry | Schedule::All) {
        steps.push(
            services
                .iter()
                .filter(|s| s.starts_with("ars-comp-1-"))
                .cloned()
                .collect(),
        );
    }
    if matches!(schedule, Schedule::Chain | Schedule::All) {
        for name in [
            "ars-comp-1-1",
            "proxy1-1",
            "proxy2-1",
            "ars-comp-2-1",
            "ars-comp-3",
        ] {
            if has(name) {
                steps.push(vec![name.to_owned()]);
            }
        }
    }
    let gap = 20.0 * scale;
    let mut at = gap;
    let mut faults = Vec::new();
    for services in steps.into_iter().filter(|s| !s.is_empty()) {
        let down = down_time(&mut rng).mul_f64(scale);
        faults.push(Fault {
            at: Duration::from_secs_f64(at),
            services,
            down,
        });
        // The next fault starts 20 s (scaled) after this one ended.
        at += down.as_secs_f64() + gap;
    }
    faults
}

/// How long a plan takes from the start of the load until the last service is back.
pub fn span(faults: &[Fault]) -> Duration {
    faults
        .iter()
        .map(|f| f.at + f.down)
        .max()
        .unwrap_or_default()
}

/// The scale at which the plan of `schedule` for `services` takes `within_secs` seconds
/// (see [`span`]); 1 for a plan without faults.
pub fn scale_to_fit(schedule: Schedule, services: &[String], within_secs: f64) -> f64 {
    let full = span(&plan(schedule, services, 1.0)).as_secs_f64();
    if full > 0.0 { within_secs / full } else { 1.0 }
}

/// Something whose services can be stopped and started: the supervisor of this process,
/// an `lps up` in another process (its control socket), or docker compose.
pub trait Target {
    /// Stops `service` (`signal` says how hard, where the target can choose).
    fn stop(
        &self,
        service: &str,
        signal: Signal,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Starts `service` again.
    fn start(&self, service: &str) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// How a stop is recorded, e.g. `SIGKILL` or `compose`.
    fn how(&self, signal: Signal) -> String {
        format!("{signal:?}")
    }
}

impl Target for Arc<Mutex<Supervisor>> {
    async fn stop(&self, service: &str, signal: Signal) -> anyhow::Result<()> {
        self.lock()
            .await
            .stop(service, signal, Duration::from_secs(15))
            .await
    }

    async fn start(&self, service: &str) -> anyhow::Result<()> {
        self.lock().await.restart(service).await
    }
}

/// Runs `faults` against `target`, logging each event to `log` (JSON lines, see
/// [`FaultRecord`]). Services that are down when `stop` fires are started again at once.
pub async fn inject(
    faults: Vec<Fault>,
    target: &impl Target,
    signal: Signal,
    log: std::path::PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let how = target.how(signal);
    let record = |service: &str, action| -> anyhow::Result<()> {
        let event = FaultRecord {
            at_us: records::now_us(),
            service: service.to_owned(),
            action,
            how: how.clone(),
        };
        records::append_jsonl(&log, &[event])?;
        Ok(())
    };
    for fault in faults {
        tokio::select! {
            () = tokio::time::sleep_until(started + fault.at) => {}
            () = stop.cancelled() => return Ok(()),
        }
        for service in &fault.services {
            target.stop(service, signal).await?;
            record(service, FaultAction::Stop)?;
            eprintln!(
                "fault: stopped {service} ({how}) for {:.1} s",
                fault.down.as_secs_f64()
            );
        }
        tokio::select! {
            () = tokio::time::sleep(fault.down) => {}
            () = stop.cancelled() => {}
        }
        for service in &fault.services {
            target.start(service).await?;
            record(service, FaultAction::Start)?;
            eprintln!("fault: started {service} again");
        }
    }
    Ok(())
}

/// Plans `schedule` for `services` and runs it against `target` (see [`inject`]), logging
/// to `dir`.
pub async fn run(
    schedule: Schedule,
    scale: f64,
    services: &[String],
    target: &impl Target,
    signal: Signal,
    dir: &std::path::Path,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let plan = plan(schedule, services, scale);
    eprintln!(
        "{} faults over {:.0} s",
        plan.len(),
        span(&plan).as_secs_f64()
    );
    inject(plan, target, signal, dir.join(records::FAULTS), stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn plans_follow_upstream_and_scale() {
        let ng = names(&[
            "ars-comp-3",
            "ars-comp-2-1",
            "proxy2-1",
            "proxy1-1",
            "ars-comp-1-1",
            "ars-comp-1-2",
            "ars-comp-1-3",
        ]);
        let full = plan(Schedule::All, &ng, 1.0);
        assert_eq!(full.len(), 6);
        assert_eq!(
            full[0].services,
            names(&["ars-comp-1-1", "ars-comp-1-2", "ars-comp-1-3"])
        );
        assert_eq!(full[2].services, names(&["proxy1-1"]));
        for fault in &full {
            let down = fault.down.as_secs_f64();
            assert!((29.5..37.5).contains(&down), "{down}");
        }
        assert_eq!(full[0].at, Duration::from_secs(20));
        assert!(
            (full[1].at.as_secs_f64() - (20.0 + full[0].down.as_secs_f64() + 20.0)).abs() < 1e-9
        );
        // Seeded: the same plan every time; scaled: every time shrinks alike.
        assert_eq!(plan(Schedule::All, &ng, 1.0), full);
        let small = plan(Schedule::All, &ng, 0.1);
        assert!((small[3].down.as_secs_f64() - full[3].down.as_secs_f64() * 0.1).abs() < 1e-9);
        let legacy = names(&["ars-comp-3", "ars-comp-2-1", "ars-comp-1-1"]);
        let chain = plan(Schedule::Chain, &legacy, 1.0);
        assert_eq!(
            chain
                .iter()
                .map(|f| f.services[0].as_str())
                .collect::<Vec<_>>(),
            ["ars-comp-1-1", "ars-comp-2-1", "ars-comp-3"]
        );
        assert!(plan(Schedule::None, &ng, 1.0).is_empty());
    }
}
