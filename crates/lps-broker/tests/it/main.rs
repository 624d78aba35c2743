//! Conformance of the embedded broker against the MQTT v5 specification, side by side with
//! Mosquitto: each behaviour is one function run against both brokers (`<behaviour>::embedded`
//! and `<behaviour>::mosquitto`), through a raw client ([`wire`]) that shows every byte.
//!
//! Where a broker departs from the specification, the test asserts what that broker does
//! and says so ([`Kind`]): a known difference stays visible and fails if it changes.
//!
//! [`crash`] is the embedded broker's alone: it SIGKILLs the broker as a process of its own.

mod aliases;
mod crash;
mod flow;
mod keep_alive;
mod packet_size;
mod properties;
mod retained;
mod sessions;
mod shared;
mod subscription_ids;
mod will;
mod wire;

/// Which broker a behaviour runs against, for the known differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The embedded broker (`lps-broker`) with the settings `lps` runs it with.
    Embedded,
    /// Mosquitto with the repository's `mosquitto/mosquitto.conf`.
    Mosquitto,
}

/// Declares `mod $behaviour { embedded, mosquitto }`: the function `$behaviour(port, Kind)`
/// run against a fresh broker of each kind.
macro_rules! against_both {
    ($behaviour:ident) => {
        mod $behaviour {
            use lps_testkit::Broker as _;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                let broker = lps_testkit::embedded::Embedded::start().await;
                super::$behaviour(broker.port(), crate::Kind::Embedded).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                let broker = lps_testkit::mosquitto::Mosquitto::start().await;
                super::$behaviour(broker.port(), crate::Kind::Mosquitto).await;
            }
        }
    };
}
pub(crate) use against_both;
