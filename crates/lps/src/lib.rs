//! The LPS command line.
//!
//! `lps up <topology>` runs a topology as local processes on 127.0.0.1 with the compose
//! wiring and ports, prints the entry URLs, and stops everything on Ctrl-C, SIGTERM or
//! SIGHUP (a closed terminal); its services die with it whatever kills it. Every service
//! is this executable re-run as `lps service <program>`, so `cargo run -p lps` is all a
//! machine with the Rust toolchain needs.

#![warn(missing_docs)]

pub mod analyze;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod compose;
pub mod control;
pub mod dead_letters;
pub mod duration;
pub mod experiment;
pub mod faults;
pub mod hops;
pub mod load;
pub mod netem;
pub mod quantile;
pub mod records;
pub mod reproduce;
pub mod signals;
pub mod stale;
pub mod supervisor;
pub mod topology;
pub mod up;

pub use broker::{BrokerChoice, embedded_broker_main};
pub use up::{run_dir, start, up};
