#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dynamics_gateway_fuzz::properties::fuzz_json_access(data);
});
