//! What a figure measured, typed: [`Key`] is how figures are looked up, and its
//! `Display` is the name printed in the table and written to `bench.json`.

use std::fmt;

use super::Scenario;
use super::generator::Protocol;

/// An HTTP hop the generator loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Generator → simulator.
    Direct,
    /// Generator → ars-comp-2 → simulator.
    Relay,
    /// Generator → nginx (`proxy_pass`, upstream keep-alive) → simulator: ars-comp-2's
    /// place taken by nginx.
    Nginx,
}

impl Hop {
    fn scenario(self) -> Scenario {
        match self {
            Self::Direct => Scenario::Direct,
            Self::Relay => Scenario::Relay,
            Self::Nginx => Scenario::Nginx,
        }
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
            Self::Nginx => "nginx-as-relay",
        })
    }
}

/// A figure's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// Closed loop through an HTTP hop, one request in flight per connection; `body` is
    /// `None` for the small legacy body: `relay http1 c50`, `direct http1 c50 16KiB`.
    Http {
        /// The hop.
        hop: Hop,
        /// Generator protocol.
        protocol: Protocol,
        /// Connections.
        connections: usize,
        /// Padded body size, bytes (the size matrix).
        body: Option<usize>,
    },
    /// h2c over one connection carrying `streams` requests at once:
    /// `relay h2c 1×50 streams`.
    Streams {
        /// Requests in flight on the one connection.
        streams: usize,
    },
    /// Open loop at half the relay's closed-loop rate: `relay http1 c50 open half`.
    OpenHalf {
        /// The hop.
        hop: Hop,
        /// Connections.
        connections: usize,
    },
    /// Idle keep-alive connections held open at once by the relay:
    /// `relay held 10000 idle`.
    Held {
        /// Connections held.
        connections: usize,
    },
    /// The baseline chain: `legacy http1 c50`.
    Legacy {
        /// Connections.
        connections: usize,
    },
    /// The NG ceiling: `broker mosquitto qos2 3×3`.
    Broker {
        /// The broker's program name.
        broker: String,
    },
    /// The NG chain: `ng http1 c50`, `ng http1 c50 open 80%`.
    Ng {
        /// Connections.
        connections: usize,
        /// Open loop at 80 % of the sustainable rate (the drain figure).
        open80: bool,
    },
    /// `lps bench edge`'s figures, named by [`super::edge`].
    Edge(String),
}

impl Key {
    /// The scenario the figure belongs to.
    pub fn scenario(&self) -> Scenario {
        match self {
            Self::Http { hop, .. } | Self::OpenHalf { hop, .. } => hop.scenario(),
            Self::Streams { .. } | Self::Held { .. } => Scenario::Relay,
            Self::Legacy { .. } => Scenario::Legacy,
            Self::Broker { .. } => Scenario::Broker,
            Self::Ng { .. } => Scenario::Ng,
            Self::Edge(_) => Scenario::Edge,
        }
    }

    /// `hop http1 c{connections}` with the small body.
    pub fn http(hop: Hop, protocol: Protocol, connections: usize) -> Self {
        Self::Http {
            hop,
            protocol,
            connections,
            body: None,
        }
    }

    /// The body of a relay figure of the size matrix (`relay http1 c50 16KiB`); `None`
    /// for every other figure.
    pub fn relay_body(&self) -> Option<usize> {
        match self {
            Self::Http {
                hop: Hop::Relay,
                body,
                ..
            } => *body,
            _ => None,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http {
                hop,
                protocol,
                connections,
                body,
            } => {
                write!(f, "{hop} {protocol} c{connections}")?;
                match body {
                    Some(bytes) => write!(f, " {}", super::size_name(*bytes)),
                    None => Ok(()),
                }
            }
            Self::Streams { streams } => write!(f, "relay h2c 1×{streams} streams"),
            Self::OpenHalf { hop, connections } => {
                write!(f, "{hop} http1 c{connections} open half")
            }
            Self::Held { connections } => write!(f, "relay held {connections} idle"),
            Self::Legacy { connections } => write!(f, "legacy http1 c{connections}"),
            Self::Broker { broker } => write!(f, "broker {broker} qos2 3×3"),
            Self::Ng {
                connections,
                open80,
            } => {
                write!(f, "ng http1 c{connections}")?;
                if *open80 {
                    f.write_str(" open 80%")?;
                }
                Ok(())
            }
            Self::Edge(name) => f.write_str(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_report_names() {
        let http = |hop, protocol, connections, body| Key::Http {
            hop,
            protocol,
            connections,
            body,
        };
        let cases = [
            (
                http(Hop::Direct, Protocol::Http1, 50, None),
                "direct http1 c50",
            ),
            (http(Hop::Relay, Protocol::H2c, 8, None), "relay h2c c8"),
            (
                http(Hop::Relay, Protocol::Http1, 50, Some(16 << 10)),
                "relay http1 c50 16KiB",
            ),
            (
                http(Hop::Direct, Protocol::Http1, 50, Some(1 << 20)),
                "direct http1 c50 1MiB",
            ),
            (
                http(Hop::Nginx, Protocol::Http1, 8, None),
                "nginx-as-relay http1 c8",
            ),
            (Key::Streams { streams: 50 }, "relay h2c 1×50 streams"),
            (
                Key::OpenHalf {
                    hop: Hop::Relay,
                    connections: 50,
                },
                "relay http1 c50 open half",
            ),
            (
                Key::Held {
                    connections: 10_000,
                },
                "relay held 10000 idle",
            ),
            (Key::Legacy { connections: 50 }, "legacy http1 c50"),
            (
                Key::Broker {
                    broker: "mosquitto".into(),
                },
                "broker mosquitto qos2 3×3",
            ),
            (
                Key::Ng {
                    connections: 50,
                    open80: false,
                },
                "ng http1 c50",
            ),
            (
                Key::Ng {
                    connections: 50,
                    open80: true,
                },
                "ng http1 c50 open 80%",
            ),
        ];
        for (key, name) in cases {
            assert_eq!(key.to_string(), name);
        }
    }
}
