//! ars-comp-1: the client-facing entry service of the alarm chain.
//!
//! `POST /api/v1/simple` takes an alarm as a JSON body
//! `{"phone","branch","headnumber","triggertime"}` or as the query parameters `Phone`,
//! `Branch`, `Headnumber`, `TriggerTime`, and forwards `POST TARGET_URL` with
//! `{"id": <phone>, "body": "Phone: <p>, Branch: <b>, Headnumber: <h>, TriggerTime: <t>"}`
//! and the `Request-Id` header (propagated, or generated when missing). The next hop is
//! ars-comp-2 in the baseline chain and legacy-proxy-1 in the NG chain.
//!
//! Answers 200 `{"status":"success","message":"Data published to Legacy System"}`, 4xx with
//! a JSON error for missing or invalid input, 502/503/504 for a failure downstream.
//!
//! Each request is forwarded in a `simple` span (debug level) carrying its `request_id`, as
//! every hop does, so `LOG=debug` and one grep for the id follow an alarm through the chain.
//!
//! Environment: the server and logging variables of `lps-common`, plus `TARGET_URL`
//! (default `http://localhost:8080/ID_REQ_KC_STORE7D3BPACKET`), `USE_HTTP_2`,
//! `SKIP_DNS_CACHE`, `CONNECT_TIMEOUT_MS`, `REQUEST_TIMEOUT_SECS`, `TARGET_COOLDOWN_MS`.

// Stricter than the workspace: a library documents what it exports, and `pub` means
// exported (`pub(crate)` otherwise).
#![warn(missing_docs, unreachable_pub)]

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::post;
use http::HeaderMap;
use lps_common::api::{self, ApiError, Body};
use lps_common::config::{ConfigError, Env, Lookup, ServerConfig};
use lps_common::request_id::RequestId;
use lps_common::telemetry::{self, TelemetryConfig};
use lps_common::upstream::{Upstream, UpstreamConfig};
use lps_common::wire::LegacyMessage;
use lps_common::{CancellationToken, Registry, finish_router, service};
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::debug_span;

/// The entry route.
pub const SIMPLE_PATH: &str = "/api/v1/simple";

/// Default target, as upstream: the next hop on port 8080.
pub const DEFAULT_TARGET: &str = "http://localhost:8080/ID_REQ_KC_STORE7D3BPACKET";

/// Everything ars-comp-1 reads from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Inbound server.
    pub server: ServerConfig,
    /// Logging.
    pub telemetry: TelemetryConfig,
    /// Outbound client (h2c when `USE_HTTP_2`).
    pub upstream: UpstreamConfig,
}

impl Config {
    /// Reads the configuration from `lookup`.
    pub fn from_lookup(lookup: &dyn Lookup) -> Result<Self, ConfigError> {
        let env = Env::new(lookup);
        Ok(Self {
            server: ServerConfig::from_env(&env, 8080)?,
            telemetry: TelemetryConfig::from_env(&env, "ars-comp-1")?,
            upstream: UpstreamConfig::from_env(&env, DEFAULT_TARGET)?,
        })
    }
}

/// An alarm as a JSON body; the capitalised names of upstream's model are accepted too.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlarmBody {
    #[serde(alias = "Phone")]
    phone: String,
    #[serde(alias = "Branch")]
    branch: String,
    #[serde(alias = "Headnumber")]
    headnumber: String,
    #[serde(alias = "TriggerTime")]
    triggertime: String,
}

/// A validated alarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarm {
    /// Phone number of the device; becomes the message id.
    pub phone: String,
    /// Branch number.
    pub branch: String,
    /// Head number.
    pub headnumber: String,
    /// Trigger time as sent (ISO-8601).
    pub triggertime: String,
}

impl Alarm {
    /// Checks that every field is present and the trigger time is ISO-8601.
    fn validate(self) -> Result<Self, ApiError> {
        for (name, value) in [
            ("phone", &self.phone),
            ("branch", &self.branch),
            ("headnumber", &self.headnumber),
            ("triggertime", &self.triggertime),
        ] {
            if value.trim().is_empty() {
                return Err(ApiError::invalid(
                    "invalid_field",
                    format!("{name} is empty"),
                ));
            }
        }
        if !is_iso8601(&self.triggertime) {
            return Err(ApiError::invalid(
                "invalid_field",
                format!(
                    "triggertime {:?} is not an ISO-8601 date-time such as 2025-01-31T12:00:00Z",
                    self.triggertime
                ),
            ));
        }
        Ok(self)
    }

    /// The legacy message body text.
    pub fn body_text(&self) -> String {
        format!(
            "Phone: {}, Branch: {}, Headnumber: {}, TriggerTime: {}",
            self.phone, self.branch, self.headnumber, self.triggertime
        )
    }
}

/// RFC 3339 with an offset, or a naive date-time with `T` or a space.
fn is_iso8601(value: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(value).is_ok()
        || [
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M",
        ]
        .iter()
        .any(|f| chrono::NaiveDateTime::parse_from_str(value, f).is_ok())
}

/// Reads the alarm from the query parameters when any is given, else from the JSON body.
fn alarm_from(query: &[(String, String)], body: &[u8]) -> Result<Alarm, ApiError> {
    const NAMES: [&str; 4] = ["Phone", "Branch", "Headnumber", "TriggerTime"];
    let mut values: [Option<String>; 4] = Default::default();
    let mut any = false;
    for (key, value) in query {
        if let Some(i) = NAMES.iter().position(|n| n.eq_ignore_ascii_case(key)) {
            values[i] = Some(value.clone());
            any = true;
        }
    }
    let alarm = if any {
        let missing: Vec<&str> = NAMES
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(ApiError::invalid(
                "missing_field",
                format!("missing query parameter(s): {}", missing.join(", ")),
            ));
        }
        let [phone, branch, headnumber, triggertime] = values.map(Option::unwrap_or_default);
        Alarm {
            phone,
            branch,
            headnumber,
            triggertime,
        }
    } else {
        let body: AlarmBody = api::parse_json(body)?;
        Alarm {
            phone: body.phone,
            branch: body.branch,
            headnumber: body.headnumber,
            triggertime: body.triggertime,
        }
    };
    alarm.validate()
}

/// The router: the entry route plus `/healthz` and `/metrics`.
pub fn app(upstream: Arc<Upstream>, registry: Registry, max_body_bytes: usize) -> Router {
    let routes = Router::new()
        .route(SIMPLE_PATH, post(simple))
        .with_state(upstream);
    finish_router(routes, registry, max_body_bytes)
}

/// Builds the client and serves `listener` until `shutdown` fires, then drains: what the
/// binary runs (see [`run`]) and what the tests run.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    service::serve_relay(&config.server, &config.upstream, app, listener, shutdown).await
}

/// Binds per `config` and [`serve`]s until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    service::bind_and_serve(config, |c| &c.server, serve).await
}

async fn simple(
    State(upstream): State<Arc<Upstream>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request_id = RequestId::from_headers(&headers)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let alarm = alarm_from(&query, &body)?;
    let message = LegacyMessage {
        body: alarm.body_text(),
        id: alarm.phone,
        request_id: None,
    };
    // Debug level: below it the span is never built (one relaxed load per request).
    let span = debug_span!("simple", %request_id);
    let relay = upstream.relay(&message, &request_id);
    Ok(telemetry::in_span(span, relay).await)
}

/// The binary's entry point: configuration from the process environment (exit 64 when
/// invalid), then [`run`].
pub fn main() -> std::process::ExitCode {
    service::main_from_env(Config::from_lookup, |c| &c.telemetry, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn query_and_body_give_the_same_alarm() {
        let q = pairs(&[
            ("Phone", "015142611148"),
            ("Branch", "2001"),
            ("Headnumber", "8023"),
            ("TriggerTime", "2025-01-31T12:00:00+00:00"),
        ]);
        let from_query = alarm_from(&q, b"").unwrap();
        let body = br#"{"phone":"015142611148","branch":"2001","headnumber":"8023","triggertime":"2025-01-31T12:00:00+00:00"}"#;
        let from_body = alarm_from(&[], body).unwrap();
        assert_eq!(from_query, from_body);
        assert_eq!(
            from_body.body_text(),
            "Phone: 015142611148, Branch: 2001, Headnumber: 8023, TriggerTime: 2025-01-31T12:00:00+00:00"
        );
    }

    #[test]
    fn invalid_alarms_say_what_is_wrong() {
        let err = alarm_from(&pairs(&[("Phone", "1"), ("branch", "2")]), b"").unwrap_err();
        assert!(
            err.message.contains("Headnumber, TriggerTime"),
            "{}",
            err.message
        );
        let body = br#"{"phone":"1","branch":"2","headnumber":"3","triggertime":"yesterday"}"#;
        let err = alarm_from(&[], body).unwrap_err();
        assert!(err.message.contains("triggertime"), "{}", err.message);
        let body =
            br#"{"phone":1,"branch":"2","headnumber":"3","triggertime":"2025-01-01T00:00:00"}"#;
        assert!(
            alarm_from(&[], body)
                .unwrap_err()
                .message
                .contains("invalid type")
        );
    }

    #[test]
    fn iso8601_forms() {
        for ok in [
            "2025-01-31T12:00:00Z",
            "2025-01-31T12:00:00.123+01:00",
            "2025-01-31 12:00:00",
            "2025-01-31T12:00:00.5",
        ] {
            assert!(is_iso8601(ok), "{ok}");
        }
        for bad in ["2025-13-01T00:00:00", "12:00", "now", "2025-01-31"] {
            assert!(!is_iso8601(bad), "{bad}");
        }
    }
}
