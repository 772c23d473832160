#![no_main]
use libfuzzer_sys::fuzz_target;
use remoteingress_wire::EdgeConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = serde_json::from_slice::<EdgeConfig>(data) {
        let _ = config.validate();
    }
});
