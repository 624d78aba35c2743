//! Loopback ports for the tools and the tests: the one place that asks the system for one.

/// A loopback port that was free a moment ago (the system's pick for `127.0.0.1:0`); 0
/// when the system has none to give, so binding it later fails or picks another port and
/// the caller's readiness check reports it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}
