//! The control socket of an `lps up` ([`CONTROL_SOCKET`] in its run folder): [`serve`]
//! runs in the `lps up`, [`Control`] is the client that `lps fault --run` (a fault
//! [`Target`]) uses.

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::faults::Target;
use crate::supervisor::{Signal, Supervisor};

/// The control socket of an `lps up`, in its run folder (see [`serve`]).
pub const CONTROL_SOCKET: &str = "control.sock";

/// An `lps up` in another process, through its control socket (`<run>/control.sock`).
#[derive(Debug, Clone)]
pub struct Control {
    /// The socket.
    pub socket: std::path::PathBuf,
}

impl Control {
    /// Sends one command line and returns the answer line (an error when it starts with
    /// `error`).
    pub async fn call(&self, command: &str) -> anyhow::Result<String> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "connecting to {} (is `lps up` running?): {e}",
                    self.socket.display()
                )
            })?;
        stream.write_all(format!("{command}\n").as_bytes()).await?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).await?;
        let answer = answer.trim().to_owned();
        if let Some(error) = answer.strip_prefix("error") {
            anyhow::bail!("{command}: {}", error.trim_start_matches(':').trim());
        }
        Ok(answer)
    }

    /// The services the `lps up` runs.
    pub async fn services(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .call("list")
            .await?
            .split_whitespace()
            .map(str::to_owned)
            .collect())
    }
}

impl Target for Control {
    async fn stop(&self, service: &str, signal: Signal) -> anyhow::Result<()> {
        self.call(&format!("stop {service} {signal:?}"))
            .await
            .map(drop)
    }

    async fn start(&self, service: &str) -> anyhow::Result<()> {
        self.call(&format!("start {service}")).await.map(drop)
    }
}

/// Serves the control socket of an `lps up`: `list`, `stop SERVICE SIGKILL|SIGTERM`,
/// `start SERVICE`, one command per connection.
pub async fn serve(
    socket: std::path::PathBuf,
    supervisor: Arc<Mutex<Supervisor>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| anyhow::anyhow!("control socket {}: {e}", socket.display()))?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = stop.cancelled() => break,
        };
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let answer: anyhow::Result<String> = async {
                match words.as_slice() {
                    ["list"] => Ok(supervisor.lock().await.names().join(" ")),
                    ["stop", service, signal] => {
                        let signal = match *signal {
                            "SIGKILL" => Signal::SIGKILL,
                            "SIGTERM" => Signal::SIGTERM,
                            other => anyhow::bail!("unknown signal {other}"),
                        };
                        Target::stop(&supervisor, service, signal)
                            .await
                            .map(|()| "ok".to_owned())
                    }
                    ["start", service] => Target::start(&supervisor, service)
                        .await
                        .map(|()| "ok".to_owned()),
                    _ => anyhow::bail!("unknown command {:?}", line.trim()),
                }
            }
            .await;
            let reply = answer.unwrap_or_else(|e| format!("error: {e:#}"));
            let _ = write.write_all(format!("{reply}\n").as_bytes()).await;
            let _ = write.shutdown().await;
        });
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
