//! Loopback ports for the tools and the tests: the one place that picks one.

use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port [`free_port`] hands out: below it are the well-known and compose ports.
const FLOOR: u16 = 10_000;

/// The start of the kernel's ephemeral range when `/proc` does not tell (Linux's default).
const EPHEMERAL_DEFAULT: u16 = 32_768;

/// How many ports [`free_port`] tries before it asks the system for one.
const ATTEMPTS: u32 = 512;

/// A loopback port that is free now and stays free until the caller binds it, as far as
/// the machine's other traffic goes: it is below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`, from 32768 by default), which outgoing connections take
/// their local ports from. A port the system picks for `127.0.0.1:0` is in that range, and
/// any connection opened between the pick and the bind may take it ("Address already in
/// use"; seen in CI for a topology whose last services start seconds after their ports were
/// chosen). Successive calls in one process give different ports; processes start at
/// different places. When no port below the range is free (or the range starts too low),
/// the system's pick; 0 when there is none either, so binding it later fails or picks
/// another port and the caller's readiness check reports it.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = ephemeral_start();
    if ephemeral > FLOOR + 1_000 {
        let span = u32::from(ephemeral - FLOOR);
        // A different start per process, then one port after the other.
        let start = std::process::id().wrapping_mul(2_654_435_761) % span;
        for _ in 0..ATTEMPTS {
            let step = NEXT.fetch_add(1, Ordering::Relaxed);
            let offset = (start + step) % span;
            let port = FLOOR + u16::try_from(offset).unwrap_or(0);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(EPHEMERAL_DEFAULT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let ephemeral = ephemeral_start();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!((FLOOR..ephemeral).contains(&port), "{port}");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("free");
        }
    }

    #[test]
    fn a_taken_port_is_skipped() {
        let port = free_port();
        let _held = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        // The cursor moved on; even after it wraps, a bind check guards each pick.
        for _ in 0..20 {
            assert_ne!(free_port(), port);
        }
    }
}
