#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| eptc_fuzz::ir_text(data));
