//! The bridges over a real Mosquitto: the NG chain, faults, poison messages, windows.

mod chain;
mod dead_letters;
mod faults;
mod harness;
mod messages;
mod outages;
mod takeover;
