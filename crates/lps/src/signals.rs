//! How `lps` stops on signals.
//!
//! SIGINT (Ctrl-C), SIGTERM and SIGHUP (what a closed terminal sends) fire one
//! [`CancellationToken`]: whatever runs then stops the services it started, in order, and
//! says so. A command that ends early because of a signal exits with 128 + the signal's
//! number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP); `lps up`, whose normal end
//! is a signal, exits 0 once it is up.
//!
//! After SIGHUP the terminal may be gone and every write to it fails (EIO), which would
//! make `println!` panic halfway through the stop; so output that went to a terminal goes
//! to `/dev/null` from then on. The run folder keeps the logs.
//!
//! The handlers are installed by [`stop_on_signals`] before it returns, so a signal that
//! arrives while the first service starts is caught like any later one. What no handler
//! catches (SIGKILL, a crash) is covered by the services themselves: each one dies with
//! its supervisor (see [`crate::supervisor`]).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The first stop signal received (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// A token that the first SIGINT, SIGTERM or SIGHUP fires. Call it inside the runtime, before
/// starting anything: the handlers are in place when it returns.
pub fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    let terminal = [
        std::io::stdout().is_terminal(),
        std::io::stderr().is_terminal(),
    ];
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let received = tokio::select! {
            _ = interrupt.recv() => Signal::SIGINT,
            _ = terminate.recv() => Signal::SIGTERM,
            _ = hangup.recv() => {
                leave_terminal(terminal);
                Signal::SIGHUP
            }
        };
        RECEIVED.store(received as i32, Ordering::SeqCst);
        fire.cancel();
    });
    Ok(token)
}

/// Sends stdout and stderr to `/dev/null` where they were a terminal (`terminal`: at start),
/// which a SIGHUP says may be gone.
fn leave_terminal(terminal: [bool; 2]) {
    let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return;
    };
    if terminal[0] {
        let _ = nix::unistd::dup2_stdout(&null);
    }
    if terminal[1] {
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

/// The stop signal received so far, if any.
pub fn received() -> Option<Signal> {
    Signal::try_from(RECEIVED.load(Ordering::SeqCst)).ok()
}

/// The exit code of a command that failed after a stop signal: 128 + its number.
pub fn exit_code() -> Option<u8> {
    received().and_then(|s| u8::try_from(128 + s as i32).ok())
}

/// `interrupted by SIGINT (Ctrl-C)`, or the signal received.
pub fn interruption() -> String {
    match received() {
        Some(Signal::SIGINT) => "interrupted by SIGINT (Ctrl-C)".to_owned(),
        Some(Signal::SIGHUP) => "interrupted by SIGHUP (terminal closed)".to_owned(),
        Some(signal) => format!("interrupted by {signal}"),
        None => "interrupted".to_owned(),
    }
}

/// `work`, or an `interrupted …` error as soon as `stop` fires (`work` is dropped then).
pub async fn or_interrupted<T>(
    stop: &CancellationToken,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        result = work => result,
        () = stop.cancelled() => Err(anyhow::anyhow!(interruption())),
    }
}

/// Runs the blocking `work` (an analysis) on a thread of its own, given up when `stop`
/// fires: the error then says where to pick it up (`then`).
pub async fn blocking_or_interrupted<T: Send + 'static>(
    stop: &CancellationToken,
    then: &str,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let task = tokio::task::spawn_blocking(work);
    tokio::select! {
        result = task => result.context("the analysis panicked")?,
        () = stop.cancelled() => Err(anyhow::anyhow!("{}; {then}", interruption())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_signal_no_exit_code() {
        // Nothing in this test binary raises SIGINT, SIGTERM or SIGHUP.
        assert_eq!(received(), None);
        assert_eq!(exit_code(), None);
        assert_eq!(interruption(), "interrupted");
    }

    #[tokio::test]
    async fn a_blocking_analysis_is_given_up_when_stopped() {
        let stop = CancellationToken::new();
        stop.cancel();
        let (hold, release) = std::sync::mpsc::channel::<()>();
        let error = blocking_or_interrupted(&stop, "rerun it", move || {
            let _ = release.recv();
            Ok(())
        })
        .await
        .unwrap_err();
        drop(hold);
        assert_eq!(error.to_string(), "interrupted; rerun it");
    }
}
