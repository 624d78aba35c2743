//! The relay measured on 127.0.0.1 with ephemeral ports: delay, rate, integrity, endings,
//! profile errors. Every test is bounded in time.

mod harness;
mod integrity;
mod pingpong;
mod profile;
mod rate;
mod rtt;
mod shutdown;
