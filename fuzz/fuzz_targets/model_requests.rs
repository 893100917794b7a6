#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::model_requests(data));
