#![no_main]
use libfuzzer_sys::fuzz_target;
use remoteingress_wire::proxy::{ProxyV2, V2_SIGNATURE};

fuzz_target!(|data: &[u8]| {
    let mut input = V2_SIGNATURE.to_vec();
    input.extend_from_slice(data);
    if let Ok(Some((_, len))) = ProxyV2::parse(&input) {
        assert!(len <= input.len());
    }
});
