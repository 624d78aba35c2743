//! `lps` as a real process.

mod up;
