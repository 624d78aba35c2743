//! The LPS command line.
//!
//! `lps up <topology>` runs a topology as local processes on 127.0.0.1 with the compose
//! wiring and ports, prints the entry URLs, and stops everything on Ctrl-C. Every service
//! is this executable re-run as `lps service <program>`, so `cargo run -p lps` is all a
//! machine with the Rust toolchain needs.

pub mod supervisor;
pub mod topology;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::supervisor::Supervisor;
use crate::topology::{Options, Topology};

/// A fresh run folder `runs/<UTC timestamp>-<topology>` (or `out`).
pub fn run_dir(out: Option<PathBuf>, topology: Topology) -> anyhow::Result<PathBuf> {
    let dir = out.unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{}-{topology}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
        ))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Starts every service of `topology`; on failure stops what was started.
pub async fn start(
    topology: Topology,
    options: &Options,
    dir: &std::path::Path,
) -> anyhow::Result<Supervisor> {
    let mut supervisor = Supervisor::new(dir)?;
    for spec in topology::services(topology, options) {
        let name = spec.name.clone();
        if let Err(e) = supervisor.start(spec).await {
            supervisor.stop_all(Duration::from_secs(5)).await;
            return Err(e.context(format!("starting {name}")));
        }
    }
    Ok(supervisor)
}

/// `lps up`: start, print the entry URLs, wait for Ctrl-C (or SIGTERM), stop.
pub async fn up(topology: Topology, options: Options, out: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = run_dir(out, topology)?;
    let mut supervisor = start(topology, &options, &dir).await?;
    println!(
        "{topology} topology is up; logs in {}",
        supervisor.logs().display()
    );
    for service in supervisor.running() {
        let role = if service.spec.entry { "entry" } else { "" };
        println!(
            "  {:<14} {:<40} {role}",
            service.spec.name,
            service.base_url()
        );
    }
    if let Some(entry) = supervisor.running().iter().find(|s| s.spec.entry) {
        println!(
            "try: curl -X POST -H 'Content-Type: application/json' -d '{{\"phone\":\"015142611148\",\"branch\":\"2001\",\"headnumber\":\"8023\",\"triggertime\":\"2025-01-31T12:00:00Z\"}}' {}/api/v1/simple",
            entry.base_url()
        );
    }
    println!("press Ctrl-C to stop");
    let stop = lps_common::server::shutdown_on_signals();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                for (name, status) in supervisor.exited() {
                    eprintln!("warning: {name} exited ({status}); see {}", supervisor.logs().display());
                }
            }
        }
    }
    println!("stopping…");
    supervisor.stop_all(Duration::from_secs(15)).await;
    println!("stopped; logs in {}", dir.join("logs").display());
    Ok(())
}
