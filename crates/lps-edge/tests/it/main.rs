//! lps-edge integration tests: real Mosquitto, real sockets, the edge in process (and
//! once as its binary).

mod binary;
mod harness;
mod proxy;
mod ws;
