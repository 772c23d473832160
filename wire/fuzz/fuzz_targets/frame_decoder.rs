#![no_main]
use libfuzzer_sys::fuzz_target;
use remoteingress_wire::frame::FrameDecoder;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a chunk size so that split headers and payloads are exercised.
    let Some((&chunk, rest)) = data.split_first() else { return };
    let mut decoder = FrameDecoder::with_max_payload(64 * 1024);
    for piece in rest.chunks(usize::from(chunk).max(1)) {
        decoder.feed(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
