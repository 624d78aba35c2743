#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lps_fuzz::run("simulator_command", data));
