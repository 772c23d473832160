#![no_main]
use libfuzzer_sys::fuzz_target;
use remoteingress_wire::extension::Extensions;
use remoteingress_wire::handshake::{parse_reply, EdgeHello};

fuzz_target!(|data: &[u8]| {
    let _ = EdgeHello::parse(data);
    let _ = parse_reply(data);
    let _ = Extensions::parse(data);
});
