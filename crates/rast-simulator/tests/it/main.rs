//! rast-simulator over real sockets and as a real process.

mod process;
mod serve;
