//! The common `main` of a service: telemetry, runtime, bind, signals, serve.
//!
//! Every service has the shape of tokio's mini-redis: its library exposes
//! `serve(config, listener, shutdown)`, which the binary's `run` calls after [`bind`] with
//! [`server::shutdown_on_signals`], and which the tests call with a listener on
//! `127.0.0.1:0` and a token of their own.
//!
//! It also makes every service binary its own health probe: `<binary> healthcheck [PATH]`
//! sends `GET PATH` (default `/healthz`) to `127.0.0.1:$HTTP_PORT` over a plain blocking
//! socket, prints one line, and exits 0 on a 2xx answer, 1 otherwise. Container health
//! checks then need no shell, curl or wget in the image.

use std::ffi::OsString;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::Registry;
use crate::config::{ConfigError, Env, Lookup, ProcessEnv, ServerConfig};
use crate::server::{self, Protocols};
use crate::telemetry::{self, TelemetryConfig};
use crate::upstream::{Upstream, UpstreamConfig};

/// The first argument that turns a service binary into its health probe.
pub const HEALTHCHECK_ARG: &str = "healthcheck";

/// The path probed when `healthcheck` names none.
pub const HEALTHCHECK_PATH: &str = crate::wire::HEALTHZ_PATH;

/// How long a probe may take in all (connect, send, first line of the answer).
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The port [`main`] probes when `HTTP_PORT` is unset (the default of the HTTP services).
const DEFAULT_HTTP_PORT: u16 = 8080;

/// Sets up telemetry and a Tokio runtime, runs `run`, and turns its outcome into an exit
/// code (0 on a clean stop, [`crate::mqtt::EXIT_SESSION_TAKEN_OVER`] when a bridge's
/// session was taken over, 1 on any other error, which is logged).
///
/// Started as `<binary> healthcheck [PATH]`, it probes the running service instead (see
/// [`healthcheck_if_requested`]; `HTTP_PORT` defaults to 8080 here) and never touches the
/// log files.
pub fn main<F>(telemetry: &TelemetryConfig, run: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    if let Some(code) = healthcheck_if_requested(DEFAULT_HTTP_PORT) {
        return code;
    }
    let _guard = match telemetry::init(telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("cannot set up logging: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "cannot start the Tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(()) => {
            info!(service = %telemetry.service_name, "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let Some(taken) = e.downcast_ref::<crate::mqtt::SessionTakenOver>() {
                // The bridge logged the one `error` line already; this is its exit.
                let code = crate::mqtt::EXIT_SESSION_TAKEN_OVER;
                info!(service = %telemetry.service_name, client_id = %taken.client_id, exit_code = code, "stopped: session taken over");
                return ExitCode::from(code);
            }
            error!(service = %telemetry.service_name, error = format!("{e:#}"), "failed");
            ExitCode::FAILURE
        }
    }
}

/// What a service binary's `main` does: reads its configuration from the process
/// environment with `from_lookup` (exit 64 when invalid), then runs `run(config)` under
/// [`main`] with the logging settings `telemetry_of(&config)`.
pub fn main_from_env<C, F>(
    from_lookup: fn(&dyn Lookup) -> Result<C, ConfigError>,
    telemetry_of: fn(&C) -> &TelemetryConfig,
    run: impl FnOnce(C) -> F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let config = from_lookup(&ProcessEnv).unwrap_or_else(|e| crate::exit_on_config_error(&e));
    main(&telemetry_of(&config).clone(), run(config))
}

/// What a service's `run` does: [`bind`]s the address `server_of(&config)` names, then calls
/// the service's `serve` with the listener and [`server::shutdown_on_signals`].
pub async fn bind_and_serve<C, F>(
    config: C,
    server_of: fn(&C) -> &ServerConfig,
    serve: impl FnOnce(C, TcpListener, CancellationToken) -> F,
) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let listener = bind(server_of(&config))?;
    serve(config, listener, server::shutdown_on_signals()).await
}

/// Binds the address `config` names, with its listen backlog: what a service's `run` does
/// before it calls the service's `serve` (tests bind `127.0.0.1:0` instead).
pub fn bind(config: &ServerConfig) -> anyhow::Result<TcpListener> {
    server::bind(config.addr(), config.backlog)
        .with_context(|| format!("binding {}", config.addr()))
}

/// Serves `app` on `listener` within `config`'s limits until `shutdown` fires, then lets
/// in-flight requests finish for `config.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    config: &ServerConfig,
    app: Router,
    protocols: Protocols,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    server::serve_with_limits(
        listener,
        app,
        protocols,
        shutdown,
        config.shutdown_grace,
        config.limits,
    )
    .await
    .context("serving HTTP")
}

/// The router of a relay: its routes over the outbound client, given the metrics registry
/// and the body limit (`ars_comp_1::app`, `ars_comp_2::app`).
pub type RelayApp = fn(Arc<Upstream>, Registry, usize) -> Router;

/// What a relay's `serve` does: builds the outbound client of `upstream` once, then serves
/// `app` over it on `listener` (HTTP/1.1 and h2c) until `shutdown` fires, then drains.
pub async fn serve_relay(
    server: &ServerConfig,
    upstream: &UpstreamConfig,
    app: RelayApp,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let upstream = Arc::new(Upstream::new(upstream, &mut registry)?);
    let app = app(upstream, registry, server.max_body_bytes);
    serve(listener, server, app, Protocols::Http1AndH2c, shutdown).await
}

/// If the process was started as `<binary> healthcheck [PATH]`, probes the service that
/// the environment describes (`HTTP_HOST`, `HTTP_PORT`, else `default_port`), prints one
/// line and returns the exit code: 0 for a 2xx answer, 1 for anything else. `None` when
/// the arguments ask for something else.
///
/// A binary that parses its own command line calls this first, with its default port.
pub fn healthcheck_if_requested(default_port: u16) -> Option<ExitCode> {
    let path = healthcheck_path(std::env::args_os())?;
    Some(
        match healthcheck(&ProcessEnv, default_port, &path, HEALTHCHECK_TIMEOUT) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(line) => {
                eprintln!("{line}");
                ExitCode::FAILURE
            }
        },
    )
}

/// The path to probe when `args` (program name first) are `healthcheck [PATH]`.
pub fn healthcheck_path<I: IntoIterator<Item = OsString>>(args: I) -> Option<String> {
    let mut args = args.into_iter().skip(1);
    if args.next()? != HEALTHCHECK_ARG {
        return None;
    }
    Some(args.next().map_or_else(
        || HEALTHCHECK_PATH.to_owned(),
        |p| p.to_string_lossy().into(),
    ))
}

/// Probes `GET path` on the address `lookup` configures (an unspecified `HTTP_HOST` such
/// as `0.0.0.0` means loopback). `Ok` and `Err` both carry the line to print.
pub fn healthcheck(
    lookup: &dyn Lookup,
    default_port: u16,
    path: &str,
    timeout: Duration,
) -> Result<String, String> {
    let config = ServerConfig::from_env(&Env::new(lookup), default_port)
        .map_err(|e| format!("unhealthy: {e}"))?;
    if config.port == 0 {
        return Err("unhealthy: HTTP_PORT=0 picks a free port; cannot tell which".into());
    }
    let host = match config.host {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(host, config.port);
    match probe(addr, path, timeout) {
        Ok(status) if (200..300).contains(&status) => Ok(format!(
            "healthy: GET http://{addr}{path} answered {status}"
        )),
        Ok(status) => Err(format!(
            "unhealthy: GET http://{addr}{path} answered {status}"
        )),
        Err(e) => Err(format!("unhealthy: GET http://{addr}{path}: {e}")),
    }
}

/// Sends `GET path` over HTTP/1.1 to `addr` and returns the status code, all within
/// `timeout`.
pub fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    use std::io::{Error, ErrorKind};
    let deadline = Instant::now() + timeout;
    let late = || Error::new(ErrorKind::TimedOut, format!("no answer within {timeout:?}"));
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(late)
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_write_timeout(Some(left()?))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lps-healthcheck\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    // The status line is all we need; read until its end, at most 1 KiB.
    let mut head = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        stream.set_read_timeout(Some(left()?))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(late());
            }
            Err(e) => return Err(e),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(version), Some(Ok(status))) if version.starts_with("HTTP/1.") => Ok(status),
        _ => Err(Error::new(
            ErrorKind::InvalidData,
            format!("not an HTTP/1.x status line: {line:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{HEALTHZ_PATH, READYZ_PATH};

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn healthcheck_argument_selects_the_probe() {
        assert_eq!(
            healthcheck_path(args(&["ars-comp-1", "healthcheck"])).as_deref(),
            Some(HEALTHZ_PATH)
        );
        assert_eq!(
            healthcheck_path(args(&["legacy-proxy-2", "healthcheck", READYZ_PATH])).as_deref(),
            Some(READYZ_PATH)
        );
        assert_eq!(healthcheck_path(args(&["ars-comp-1"])), None);
        // `lps service ars-comp-1` reaches `main` too; it must still serve.
        assert_eq!(
            healthcheck_path(args(&["lps", "service", "ars-comp-1"])),
            None
        );
    }
}
