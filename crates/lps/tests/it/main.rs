//! `lps` as a real process.

mod demo;
mod load;
mod up;
