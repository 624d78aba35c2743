//! Integration tests of the common crate over real sockets on loopback.

mod broker_tls;
mod config;
mod dead_letters;
mod healthcheck;
mod limits;
mod server;
mod upstream;
