//! CPU time and memory of processes, from `/proc`.

use std::path::PathBuf;

/// Clock ticks per second of `/proc/<pid>/stat` (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// One process to watch: a name and its pid (`None`: this process).
#[derive(Debug, Clone)]
pub struct Watched {
    /// Name in the report.
    pub name: String,
    /// Pid, or `None` for this process.
    pub pid: Option<u32>,
}

impl Watched {
    fn dir(&self) -> PathBuf {
        match self.pid {
            Some(pid) => PathBuf::from(format!("/proc/{pid}")),
            None => PathBuf::from("/proc/self"),
        }
    }

    /// User + system CPU seconds so far (all threads).
    pub fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(self.dir().join("stat")) else {
            return 0.0;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            return 0.0;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let total = (ticks(11) + ticks(12)) as f64;
        total / ticks_per_second()
    }

    /// (resident now, peak resident) in MiB, from `/proc/<pid>/status`.
    pub fn rss_mib(&self) -> (f64, f64) {
        let Ok(status) = std::fs::read_to_string(self.dir().join("status")) else {
            return (0.0, 0.0);
        };
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }

    /// Resets the peak resident size to the current one (Linux ≥ 4.0), so the peak of a
    /// measured window excludes what came before. Best effort.
    pub fn reset_peak(&self) {
        let _ = std::fs::write(self.dir().join("clear_refs"), "5");
    }
}

/// Figures of one process over a measured window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessFigures {
    /// Name.
    pub name: String,
    /// CPU seconds used in the window.
    pub cpu_s: f64,
    /// CPU share of one core over the window (1.0 = one core busy).
    pub cores: f64,
    /// Resident MiB before the window (idle).
    pub rss_idle_mib: f64,
    /// Peak resident MiB in the window.
    pub rss_peak_mib: f64,
    /// CPU µs per request (NG: per delivered alarm; `broker`: per delivered message) in
    /// the window.
    pub cpu_us_per_op: Option<f64>,
}

/// (stolen, total) clock ticks of the whole machine so far, from `/proc/stat`: time the
/// hypervisor gave this virtual machine's CPUs to someone else.
fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total = ticks.iter().take(8).sum();
    (ticks.get(7).copied().unwrap_or(0), total)
}

/// A window being measured over some processes.
#[derive(Debug)]
pub struct Window {
    watched: Vec<Watched>,
    start_cpu: Vec<f64>,
    idle_rss: Vec<f64>,
    started: std::time::Instant,
    machine: (u64, u64),
}

impl Window {
    /// Starts measuring `watched` now.
    pub fn start(watched: Vec<Watched>) -> Self {
        let idle_rss = watched.iter().map(|w| w.rss_mib().0).collect();
        for w in &watched {
            w.reset_peak();
        }
        let start_cpu = watched.iter().map(Watched::cpu_seconds).collect();
        Self {
            watched,
            start_cpu,
            idle_rss,
            started: std::time::Instant::now(),
            machine: machine_ticks(),
        }
    }

    /// Share of the machine's CPU time stolen by the hypervisor since the start (0..1).
    /// Figures measured while it is high say more about the neighbours than about LPS.
    pub fn steal(&self) -> f64 {
        let (steal, total) = machine_ticks();
        let total = total.saturating_sub(self.machine.1);
        if total == 0 {
            return 0.0;
        }
        steal.saturating_sub(self.machine.0) as f64 / total as f64
    }

    /// The figures from the start until now.
    pub fn finish(&self) -> Vec<ProcessFigures> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        self.watched
            .iter()
            .zip(&self.start_cpu)
            .zip(&self.idle_rss)
            .map(|((w, cpu0), idle)| {
                let cpu_s = (w.cpu_seconds() - cpu0).max(0.0);
                ProcessFigures {
                    name: w.name.clone(),
                    cpu_s,
                    cores: cpu_s / wall,
                    rss_idle_mib: *idle,
                    rss_peak_mib: w.rss_mib().1,
                    cpu_us_per_op: None,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = Watched {
            name: "self".into(),
            pid: None,
        };
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(me.cpu_seconds() > 0.0);
        let (rss, peak) = me.rss_mib();
        assert!(rss > 0.0 && peak >= rss, "rss {rss} peak {peak}");
    }
}
