//! Integration tests of the common crate over real sockets on loopback.

mod dead_letters;
mod healthcheck;
mod server;
mod upstream;
