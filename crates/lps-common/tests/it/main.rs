//! Integration tests of the common crate over real sockets on loopback.

mod server;
mod upstream;
