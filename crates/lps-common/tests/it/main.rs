//! Integration tests of the common crate over real sockets on loopback.

mod healthcheck;
mod server;
mod upstream;
