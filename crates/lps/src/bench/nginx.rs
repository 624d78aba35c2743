//! nginx, run by the bench as this user with a configuration written into the run folder:
//! the file server of `lps bench edge`, and the reverse proxy that takes ars-comp-2's place
//! in `lps bench relay` (the `nginx-as-relay` figures).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpStream;

use super::procstat::Watched;

/// Where nginx is installed, if it is.
pub(super) fn binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Why the nginx figures are skipped when nginx is missing.
pub(super) const MISSING: &str = "nginx is not installed (apt-get install nginx-light)";

/// The directives every configuration of ours starts with: no daemon, everything
/// (pid, logs, temporary files) inside `dir`, so nginx runs without root.
pub(super) fn preamble(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/nginx.error.log warn;\n"
    )
}

/// Temporary paths inside `dir`, for the `http` block.
pub(super) fn temp_paths(dir: &Path) -> String {
    let d = dir.display();
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .map(|kind| format!("    {kind}_temp_path {d};\n"))
        .concat()
}

/// The reverse proxy in ars-comp-2's place: `port` → the simulator on `backend`, over
/// HTTP/1.1 with upstream keep-alive (a pool of idle connections like ars-comp-2's), one
/// worker per core as ars-comp-2 has a runtime thread per core.
pub(super) fn relay_config(dir: &Path, port: u16, backend: u16, max_body: usize) -> String {
    format!(
        "{preamble}worker_processes auto;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   client_max_body_size {max_body};\n\
         \x20   client_body_buffer_size 64k;\n\
         {temp}\
         \x20   upstream simulator {{\n\
         \x20       server 127.0.0.1:{backend};\n\
         \x20       keepalive 1024;\n\
         \x20       keepalive_requests 1000000;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port} backlog=4096;\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://simulator;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        preamble = preamble(dir),
        temp = temp_paths(dir),
    )
}

/// Writes `config` to `dir/nginx.conf` and starts nginx on it; returns it once every port
/// of `ports` accepts.
pub(super) async fn start(
    dir: &Path,
    config: &str,
    ports: &[u16],
) -> anyhow::Result<tokio::process::Child> {
    let binary = binary().context(MISSING)?;
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let log = std::fs::File::create(dir.join("nginx.stderr"))?;
    let mut child = tokio::process::Command::new(&binary)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("nginx.error.log"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    for &port in ports {
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "nginx exited ({status}); see {}",
                    dir.join("nginx.stderr").display()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "nginx did not listen on {port} within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(child)
}

/// Stops nginx and its workers: SIGTERM to its process group (it runs in its own), then
/// SIGKILL to whatever is left after 3 s.
pub(super) async fn stop(mut child: tokio::process::Child) {
    use nix::sys::signal::{Signal, killpg};
    let group = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(nix::unistd::Pid::from_raw);
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGTERM);
        let _ = tokio::time::timeout(Duration::from_secs(3), child.wait()).await;
        let _ = killpg(group, Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

/// nginx's master and its workers (the processes whose parent is the master), to watch.
pub(super) fn processes(master: u32) -> Vec<Watched> {
    let mut all = vec![Watched {
        name: "nginx".into(),
        pid: Some(master),
    }];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return all;
    };
    let mut workers: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent(*pid) == Some(master))
        .collect();
    workers.sort_unstable();
    all.extend(workers.into_iter().enumerate().map(|(i, pid)| Watched {
        name: format!("nginx worker {}", i + 1),
        pid: Some(pid),
    }));
    all
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, in parentheses: state, then ppid.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}
