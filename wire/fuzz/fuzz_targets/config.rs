#![no_main]
use libfuzzer_sys::fuzz_target;
use remoteingress_wire::EdgeConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = serde_json::from_slice::<EdgeConfig>(data) {
        let _ = config.validate();
        let (scoped, _) = config.within_edge_scope();
        if let Err(error) = scoped.validate() {
            assert!(!error.problems.iter().any(|p| p.contains("edge's ports")), "{error}");
        }
    }
});
