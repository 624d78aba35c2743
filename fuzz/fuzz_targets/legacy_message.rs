#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lps_fuzz::run("legacy_message", data));
