#![no_main]
use libfuzzer_sys::fuzz_target;
use remoteingress_wire::token::ConnectionToken;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(token) = ConnectionToken::decode(text) {
            assert_eq!(ConnectionToken::decode(&token.encode()).ok(), Some(token));
        }
    }
});
