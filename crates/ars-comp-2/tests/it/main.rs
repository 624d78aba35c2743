//! ars-comp-2 over real sockets and as a real process.

mod process;
mod relay;
