//! `lps reproduce`: upstream's experiment matrix at a scale that fits minutes, and one
//! report that puts each of upstream's findings next to ours.
//!
//! The matrix ([`matrix`]) is {legacy, NG} × {failover load, performance steps} × {faults,
//! none} × {netem, none}; NG under netem runs twice, with legacy-proxy-2's in-flight window
//! (`MQTT_RECEIVE_MAXIMUM`) at 1 (upstream's `max_inflight_messages 1`) and at 32 (ours):
//! 20 experiments, one after another (each one alone on the machine), each a normal
//! `lps experiment` run folder under `<out>/<cell>`. Faults are upstream's `all` schedule
//! scaled into 80 % of the load time. Then `<out>` gets `summary.json` (one key per cell),
//! the CSV and `.hgrm` files of `lps analyze`, `findings.json` and `report.html`
//! ([`crate::analyze::findings`]).
//!
//! [`Scale::quick`] runs the whole matrix in about three minutes (CI); [`Scale::full`] in
//! about a quarter of an hour.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::BrokerChoice;
use crate::experiment::{Experiment, Platform};
use crate::faults::Schedule;
use crate::load::Shape;
use crate::topology::{Options, Topology};

/// The load of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadKind {
    /// Upstream's failover load: one closed-loop user.
    Failover,
    /// Upstream's performance load: steps of users with pauses, EN 50136 stop.
    Steps,
}

/// One experiment of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// Folder and key, e.g. `ng-steps-none-netem-w1`.
    pub name: String,
    /// `legacy` or `ng`.
    pub topology: String,
    /// Failover or performance load.
    pub load: LoadKind,
    /// Upstream's fault schedule (`all`, scaled) or none.
    pub faults: bool,
    /// Upstream's network profile on every shaped hop.
    pub netem: bool,
    /// legacy-proxy-2's window (NG); `None` for legacy.
    pub window: Option<u16>,
}

/// The window of NG cells without netem: the service's default.
pub const DEFAULT_WINDOW: u16 = 32;
/// Upstream's window (`max_inflight_messages 1`).
pub const UPSTREAM_WINDOW: u16 = 1;

/// Every cell, legacy first, failover before steps.
pub fn matrix() -> Vec<Cell> {
    let mut cells = Vec::new();
    for topology in [Topology::Legacy, Topology::Ng] {
        for load in [LoadKind::Failover, LoadKind::Steps] {
            for faults in [false, true] {
                for netem in [false, true] {
                    let windows: &[Option<u16>] = match (topology, netem) {
                        (Topology::Legacy, _) => &[None],
                        (Topology::Ng, false) => &[Some(DEFAULT_WINDOW)],
                        (Topology::Ng, true) => &[Some(UPSTREAM_WINDOW), Some(DEFAULT_WINDOW)],
                    };
                    for &window in windows {
                        cells.push(Cell {
                            name: cell_name(topology, load, faults, netem, window),
                            topology: topology.to_string(),
                            load,
                            faults,
                            netem,
                            window,
                        });
                    }
                }
            }
        }
    }
    cells
}

fn cell_name(
    topology: Topology,
    load: LoadKind,
    faults: bool,
    netem: bool,
    window: Option<u16>,
) -> String {
    let load = match load {
        LoadKind::Failover => "failover",
        LoadKind::Steps => "steps",
    };
    let faults = if faults { "faults" } else { "none" };
    let netem = if netem { "netem" } else { "lan" };
    let window = window.map_or_else(String::new, |w| format!("-w{w}"));
    format!("{topology}-{load}-{faults}-{netem}{window}")
}

/// How big each experiment is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scale {
    /// `quick` or `full`.
    pub name: &'static str,
    /// Failover load time (one user).
    pub failover: Duration,
    /// Users added per performance step (upstream: 250).
    pub step_users: u32,
    /// Length of a step (upstream: 60 s).
    pub step: Duration,
    /// Pause after a step (upstream: 60 s).
    pub pause: Duration,
    /// Most steps.
    pub max_steps: u32,
    /// Longest wait for the backlog after the load.
    pub drain_timeout: Duration,
}

impl Scale {
    /// The CI scale: the whole matrix in about three minutes on two cores.
    pub fn quick() -> Self {
        Self {
            name: "quick",
            failover: Duration::from_secs(4),
            step_users: 20,
            step: Duration::from_secs(3),
            pause: Duration::from_secs(1),
            max_steps: 2,
            drain_timeout: Duration::from_secs(30),
        }
    }

    /// The default scale: about a quarter of an hour.
    pub fn full() -> Self {
        Self {
            name: "full",
            failover: Duration::from_secs(30),
            step_users: 30,
            step: Duration::from_secs(10),
            pause: Duration::from_secs(5),
            max_steps: 3,
            drain_timeout: Duration::from_secs(120),
        }
    }

    fn load_time(&self, load: LoadKind) -> Duration {
        match load {
            LoadKind::Failover => self.failover,
            LoadKind::Steps => {
                self.step * self.max_steps + self.pause * self.max_steps.saturating_sub(1)
            }
        }
    }
}

/// What `lps reproduce` does.
#[derive(Debug, Clone)]
pub struct Reproduce {
    /// Experiment sizes.
    pub scale: Scale,
    /// NG broker.
    pub broker: BrokerChoice,
    /// Output folder: one run folder per cell and the report.
    pub out: PathBuf,
}

/// The experiment of `cell`.
fn experiment(cell: &Cell, scale: &Scale, broker: &BrokerChoice, out: &Path) -> Experiment {
    let topology = if cell.topology == "ng" {
        Topology::Ng
    } else {
        Topology::Legacy
    };
    let load_time = scale.load_time(cell.load);
    let faults = if cell.faults {
        Schedule::All
    } else {
        Schedule::None
    };
    let names: Vec<String> = crate::topology::services(topology, &Options::default(), None)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let shape = match cell.load {
        LoadKind::Failover => Shape::Users(1),
        LoadKind::Steps => Shape::Steps {
            step_users: scale.step_users,
            step: scale.step,
            pause: scale.pause,
            max_steps: scale.max_steps,
        },
    };
    Experiment {
        topology,
        platform: Platform::Local,
        broker: broker.clone(),
        options: Options {
            ephemeral_ports: true,
            netem: cell.netem.then(lps_netem::Profile::upstream),
            ..Options::default()
        },
        shape,
        duration: load_time,
        background_users: 0,
        faults,
        scale: crate::faults::scale_to_fit(faults, &names, load_time.as_secs_f64() * 0.8),
        graceful: false,
        drain_timeout: scale.drain_timeout,
        bridge_window: cell.window,
        out: out.join(&cell.name),
    }
}

/// Runs the matrix and writes the report; returns the report's path.
pub async fn run(reproduce: &Reproduce, stop: &CancellationToken) -> anyhow::Result<PathBuf> {
    let out = &reproduce.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cells = matrix();
    let started = Instant::now();
    eprintln!(
        "== lps reproduce ({} scale): {} experiments into {}",
        reproduce.scale.name,
        cells.len(),
        out.display()
    );
    let mut runs = Vec::with_capacity(cells.len());
    for (i, cell) in cells.iter().enumerate() {
        eprintln!(
            "== [{}/{}] {} ({:.0} s so far)",
            i + 1,
            cells.len(),
            cell.name,
            started.elapsed().as_secs_f64()
        );
        let experiment = experiment(cell, &reproduce.scale, &reproduce.broker, out);
        let dir = crate::experiment::run(&experiment, stop).await?;
        runs.push((cell.name.clone(), dir));
    }
    let then = format!(
        "every experiment is complete (run folders in {}); the report was not written",
        out.display()
    );
    let into = out.clone();
    let scale = reproduce.scale.clone();
    let elapsed = started.elapsed();
    let report = crate::signals::blocking_or_interrupted(stop, &then, move || {
        crate::analyze::findings::write(&cells, &runs, &scale, elapsed, &into)
    })
    .await?;
    println!("{}", report.table);
    println!(
        "{} experiments in {:.0} s",
        report.cells,
        started.elapsed().as_secs_f64()
    );
    println!("report: {}", report.path.display());
    Ok(report.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_is_upstreams_with_two_windows_for_ng_under_netem() {
        let cells = matrix();
        assert_eq!(cells.len(), 20);
        let names: std::collections::HashSet<&str> =
            cells.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), 20, "unique names");
        for name in [
            "legacy-failover-none-lan",
            "legacy-steps-faults-netem",
            "ng-steps-none-netem-w1",
            "ng-steps-none-netem-w32",
            "ng-failover-faults-lan-w32",
        ] {
            assert!(names.contains(name), "{name}: {names:?}");
        }
        assert!(cells.iter().all(|c| c.netem || c.window != Some(1)));
    }

    #[test]
    fn faults_fit_into_the_load_time() {
        let scale = Scale::quick();
        for cell in matrix().iter().filter(|c| c.faults) {
            let e = experiment(cell, &scale, &BrokerChoice::Auto, Path::new("/x"));
            let names: Vec<String> =
                crate::topology::services(e.topology, &Options::default(), None)
                    .into_iter()
                    .map(|s| s.name)
                    .collect();
            let span = crate::faults::span(&crate::faults::plan(e.faults, &names, e.scale));
            assert!(
                span <= e.duration,
                "{}: {span:?} > {:?}",
                cell.name,
                e.duration
            );
            assert!(!span.is_zero());
        }
    }
}
