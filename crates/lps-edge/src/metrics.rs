//! The edge's Prometheus metrics (served at `/metrics` with the common ones).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A reason label: why a connection was refused or closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// See the `as_str` of the enum that produced it.
    pub reason: &'static str,
}

/// A direction label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    /// `to_broker`/`to_client` (WebSocket) or `to_upstream`/`to_client` (tunnels).
    pub direction: &'static str,
}

/// Labels of a proxy request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyRequest {
    /// `forward` (absolute-form) or `connect`.
    pub kind: &'static str,
    /// The status the proxy answered (200 for an established tunnel).
    pub status: u16,
}

/// Metrics of the MQTT-over-WebSocket bridge.
#[derive(Clone, Default)]
pub struct WsMetrics {
    /// Bridges open now.
    pub open: Gauge,
    /// Upgrades accepted.
    pub accepted: Counter,
    /// Upgrades refused, by reason.
    pub rejected: Family<Reason, Counter>,
    /// Bridges closed, by reason.
    pub closed: Family<Reason, Counter>,
    /// Bytes relayed, by direction.
    pub bytes: Family<Direction, Counter>,
    /// WebSocket messages relayed, by direction.
    pub messages: Family<Direction, Counter>,
    /// Socket writes (flushes), by direction: messages / writes is the batching factor.
    pub writes: Family<Direction, Counter>,
}

/// Metrics of the forward proxy.
#[derive(Clone, Default)]
pub struct ProxyMetrics {
    /// Client connections open now (tunnels included).
    pub connections: Gauge,
    /// Requests answered, by kind and status.
    pub requests: Family<ProxyRequest, Counter>,
    /// Tunnels open now.
    pub tunnels: Gauge,
    /// Tunnels closed, by reason.
    pub tunnels_closed: Family<Reason, Counter>,
    /// Bytes through tunnels, by direction.
    pub tunnel_bytes: Family<Direction, Counter>,
}

/// All of the edge's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    /// The WebSocket bridge.
    pub ws: WsMetrics,
    /// The forward proxy.
    pub proxy: ProxyMetrics,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("edge");
        // (name, metric => help), registered in this order.
        macro_rules! register {
            ($($name:literal, $metric:expr => $help:literal;)*) => {
                $(r.register($name, $help, $metric.clone());)*
            };
        }
        register! {
            "ws_connections", m.ws.open => "WebSocket bridges open";
            "ws_accepted", m.ws.accepted => "WebSocket upgrades accepted";
            "ws_rejected", m.ws.rejected =>
                "WebSocket upgrades refused (bad_handshake, limit, broker_unreachable)";
            "ws_closed", m.ws.closed =>
                "WebSocket bridges closed (client_closed, client_error, client_protocol, \
                 broker_closed, broker_error, shutdown)";
            "ws_bytes", m.ws.bytes => "Bytes bridged";
            "ws_messages", m.ws.messages =>
                "WebSocket messages received from clients (to_broker) or sent to them (to_client)";
            "ws_writes", m.ws.writes => "Socket writes of the bridge";
            "proxy_connections", m.proxy.connections =>
                "Forward-proxy client connections open";
            "proxy_requests", m.proxy.requests =>
                "Forward-proxy requests answered, by kind and status";
            "proxy_tunnels", m.proxy.tunnels => "CONNECT tunnels open";
            "proxy_tunnels_closed", m.proxy.tunnels_closed =>
                "CONNECT tunnels closed (upstream_closed, client_closed, upstream_error, \
                 client_error, shutdown)";
            "proxy_tunnel_bytes", m.proxy.tunnel_bytes => "Bytes through CONNECT tunnels";
        }
        m
    }
}

/// The counter of `family` for `direction`, resolved once (the hot path then skips the
/// family's lock and hash).
pub fn direction(family: &Family<Direction, Counter>, direction: &'static str) -> Counter {
    family.get_or_create(&Direction { direction }).clone()
}

/// Counts one `reason` in `family`.
pub fn count(family: &Family<Reason, Counter>, reason: &'static str) {
    family.get_or_create(&Reason { reason }).inc();
}
