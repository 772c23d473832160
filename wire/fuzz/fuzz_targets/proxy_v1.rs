#![no_main]
use libfuzzer_sys::fuzz_target;
use remoteingress_wire::proxy::ProxyV1;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, len))) = ProxyV1::parse(data) {
        assert!(len <= data.len());
        let line = header.to_line();
        assert_eq!(ProxyV1::parse(line.as_bytes()).ok().flatten().map(|(h, _)| h), Some(header));
    }
});
