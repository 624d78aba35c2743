//! `lps` as a real process.

mod demo;
mod up;
