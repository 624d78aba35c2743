//! Who holds the ports `lps up` needs, and whether it is a run left behind.
//!
//! Before it starts anything, `lps up` binds each port of the topology once; for a port
//! that is taken it finds the listening socket in `/proc/net/tcp{,6}` and the process
//! holding it through `/proc/<pid>/fd`. A service started by `lps` carries
//! `LPS_SUPERVISOR=<pid>` ([`crate::supervisor::SUPERVISOR_ENV`]); when its parent is no
//! longer that process, its supervisor is gone and the whole earlier run (every process
//! with the same mark) is a leftover: `lps up` prints the `kill` command that stops it, or
//! stops it itself (SIGTERM, SIGKILL after 15 s) with `--replace`. Services of older
//! `lps` builds, without the mark, count as left behind when their parent is not `lps`.
//! Anything else holding a port (a live `lps up`, another program, a process of another
//! user) is named and left alone. Linux only, as the supervisor.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use lps_common::poll::poll_until;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::supervisor::SUPERVISOR_ENV;

/// How long stopped leftovers may take to exit before SIGKILL.
const GRACE: Duration = Duration::from_secs(15);

/// A process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Process {
    pid: i32,
    parent: i32,
    /// The command line, space-separated.
    command: String,
    /// `SERVICE_NAME`, when set.
    service: Option<String>,
    /// `LPS_SUPERVISOR`, when set.
    supervisor: Option<i32>,
    /// The `lps` executable it runs, for services without the mark.
    exe: Option<String>,
}

impl Process {
    fn read(pid: i32) -> Option<Self> {
        let command: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()?
            .split(|&b| b == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = |key: &str| variable(&environ, key);
        Some(Self {
            pid,
            parent: parent_of(pid)?,
            service: env(lps_common::config::ENV_SERVICE_NAME),
            supervisor: env(SUPERVISOR_ENV).and_then(|v| v.parse().ok()),
            exe: std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(|p| p.display().to_string()),
            command: command.join(" "),
        })
    }

    /// Whether it is a service whose `lps` is gone.
    fn left_behind(&self) -> bool {
        match self.supervisor {
            Some(supervisor) => self.parent != supervisor,
            // An older `lps service …` without the mark: its parent should be the same `lps`.
            None => {
                self.command.split(' ').nth(1) == Some("service")
                    && self.exe.is_some()
                    && Self::read(self.parent).and_then(|p| p.exe) != self.exe
            }
        }
    }

    /// `proxy1-2 (pid 1234)`, or the command line when it is not a named service.
    fn describe(&self) -> String {
        match &self.service {
            Some(name) => format!("{name} (pid {})", self.pid),
            None => {
                let mut command = self.command.clone();
                if command.len() > 100 {
                    let cut = (0..=100).rev().find(|&i| command.is_char_boundary(i));
                    command.truncate(cut.unwrap_or(0));
                    command.push('…');
                }
                format!("pid {} ({command})", self.pid)
            }
        }
    }
}

/// The variable `key` of `pid`'s environment, from `/proc/<pid>/environ`.
pub fn environment(pid: i32, key: &str) -> Option<String> {
    variable(&std::fs::read(format!("/proc/{pid}/environ")).ok()?, key)
}

/// The variable `key` of an environment as `/proc/<pid>/environ` holds it (`KEY=value`
/// entries, each ended by a NUL).
fn variable(environ: &[u8], key: &str) -> Option<String> {
    environ.split(|&b| b == 0).find_map(|entry| {
        let entry = std::str::from_utf8(entry).ok()?;
        entry
            .strip_prefix(key)?
            .strip_prefix('=')
            .map(str::to_owned)
    })
}

/// The parent of `pid` from `/proc/<pid>/stat`; a zombie counts as gone.
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    rest.next()?.parse().ok()
}

fn alive(pid: i32) -> bool {
    parent_of(pid).is_some()
}

/// The ports among `ports` that cannot be bound on 127.0.0.1.
fn taken(ports: &[u16]) -> Vec<u16> {
    ports
        .iter()
        .copied()
        .filter(|&port| {
            std::net::TcpListener::bind(("127.0.0.1", port))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
        })
        .collect()
}

/// Socket inodes of listening TCP sockets and their ports, from the text of
/// `/proc/net/tcp` or `/proc/net/tcp6`.
fn listening(table: &str) -> Vec<(u64, u16)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if fields.get(3) != Some(&"0A") {
                return None;
            }
            let port = u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let inode = fields.get(9)?.parse().ok()?;
            Some((inode, port))
        })
        .collect()
}

/// Every process this user can see.
fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// For each of `ports`, the processes holding a listening socket on it (empty: not visible).
fn holders(ports: &[u16]) -> BTreeMap<u16, BTreeSet<i32>> {
    let mut sockets: HashMap<u64, u16> = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        sockets.extend(
            listening(&text)
                .into_iter()
                .filter(|(_, port)| ports.contains(port)),
        );
    }
    let mut holders: BTreeMap<u16, BTreeSet<i32>> =
        ports.iter().map(|&p| (p, BTreeSet::new())).collect();
    for pid in pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok());
            if let Some(port) = inode.and_then(|i| sockets.get(&i)) {
                holders.entry(*port).or_default().insert(pid);
            }
        }
    }
    holders
}

/// Every service of the run of the gone `lps` with pid `supervisor` (or just `process`
/// for an unmarked one).
fn run_of(process: &Process) -> Vec<Process> {
    let Some(supervisor) = process.supervisor else {
        return vec![process.clone()];
    };
    pids()
        .into_iter()
        .filter_map(Process::read)
        .filter(|p| p.supervisor == Some(supervisor) && p.left_behind())
        .collect()
}

/// Makes sure `ports` are free for `lps up`: fails naming who holds them, or, with
/// `replace`, first stops the services an earlier `lps` left behind on them.
pub async fn make_room(ports: &[u16], replace: bool) -> anyhow::Result<()> {
    let taken = taken(ports);
    if taken.is_empty() {
        return Ok(());
    }
    let mut leftovers: BTreeMap<i32, Process> = BTreeMap::new();
    let mut others = Vec::new();
    for (port, pids) in holders(&taken) {
        let processes: Vec<Process> = pids.into_iter().filter_map(Process::read).collect();
        if processes.is_empty() {
            others.push(format!(
                "port {port}: held by a process this user cannot see (ss -ltnp 'sport = :{port}' as root tells)"
            ));
        }
        for process in processes {
            if process.left_behind() {
                for p in run_of(&process) {
                    leftovers.insert(p.pid, p);
                }
                leftovers.insert(process.pid, process);
            } else {
                let whose = match process.supervisor {
                    Some(supervisor) => {
                        format!(", a service of the running lps (pid {supervisor})")
                    }
                    None => String::new(),
                };
                others.push(format!("port {port}: {}{whose}", process.describe()));
            }
        }
    }
    if !others.is_empty() {
        anyhow::bail!(
            "ports taken:\n  {}\nstop what holds them, or move this topology with --port-offset N or --ephemeral-ports",
            others.join("\n  ")
        );
    }
    let names: Vec<String> = leftovers.values().map(Process::describe).collect();
    let supervisors: BTreeSet<String> = leftovers
        .values()
        .map(|p| {
            p.supervisor
                .map_or("an older lps".to_owned(), |s| format!("lps pid {s}"))
        })
        .collect();
    let what = format!(
        "services left behind by an earlier lps up whose supervisor is gone ({}): {}",
        supervisors.into_iter().collect::<Vec<_>>().join(", "),
        names.join(", ")
    );
    let pids: Vec<String> = leftovers.keys().map(i32::to_string).collect();
    if !replace {
        anyhow::bail!(
            "ports {} are taken by {what}\nstop them with: kill {}\nor start with --replace to stop them first",
            taken
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            pids.join(" ")
        );
    }
    eprintln!("--replace: stopping {what}");
    stop(&leftovers.keys().copied().collect::<Vec<_>>()).await;
    let freed = poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        async || self::taken(ports).is_empty().then_some(()),
    )
    .await;
    anyhow::ensure!(
        freed.is_some(),
        "ports {:?} are still taken after stopping the services left behind",
        self::taken(ports)
    );
    Ok(())
}

/// SIGTERM to `pids`, SIGKILL to those still there after [`GRACE`]; returns once all are
/// gone (they are not our children: their new parent reaps them).
async fn stop(pids: &[i32]) {
    let signal = |sig| {
        for &pid in pids {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    };
    signal(Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + GRACE;
    let mut killed = false;
    while pids.iter().any(|&p| alive(p)) {
        if !killed && tokio::time::Instant::now() >= deadline {
            eprintln!("--replace: not stopped within {GRACE:?}; killing them");
            signal(Signal::SIGKILL);
            killed = true;
        }
        if tokio::time::Instant::now() >= deadline + Duration::from_secs(5) {
            eprintln!("warning: --replace: some are still there");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_read_from_proc_net_tcp() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1BA1 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 43210 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1BA1 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 43211 1 0000000000000000 20 4 30 10 -1
   2: 00000000:075B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listening(tcp), [(43210, 7073), (777, 1883)]);
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listening(tcp6), [(99, 8081)]);
    }

    #[tokio::test]
    async fn a_port_held_here_is_named_with_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let error = make_room(&[port], true).await.unwrap_err().to_string();
        // This test process is no service: named, never stopped, even with --replace.
        assert!(
            error.contains(&format!("port {port}: pid {} (", std::process::id())),
            "{error}"
        );
        drop(listener);
        make_room(&[port], false).await.unwrap();
    }
}
