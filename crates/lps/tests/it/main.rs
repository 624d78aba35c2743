//! `lps` as a real process.

mod automations;
mod bench;
mod compose;
mod demo;
mod devices;
mod k8s;
mod kills;
mod lifecycle;
mod load;
mod locust;
mod monitoring;
mod netem;
mod reproduce;
mod support;
mod up;
