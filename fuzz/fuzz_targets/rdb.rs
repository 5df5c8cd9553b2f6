//! Arbitrary bytes through the streaming RDB parser: it must end in `End`
//! or a typed error, never panic, and never allocate what the input merely
//! claims (small limits make oversized claims fail fast).
#![no_main]

use ferry::redis::rdb::{ParseOptions, RdbParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Let the fuzzer skip the magic: most inputs get a valid header.
    let mut input = Vec::with_capacity(data.len() + 9);
    if !data.starts_with(b"REDIS") {
        input.extend_from_slice(b"REDIS0011");
    }
    input.extend_from_slice(data);
    let opts = ParseOptions {
        max_string_len: 1 << 20,
        chunk_items: 7,
        chunk_bytes: 256,
        raw_capture_limit: 4096,
        verify_checksum: data.first().is_some_and(|b| b & 1 == 1),
    };
    let mut parser = RdbParser::new(&input[..], opts);
    while let Ok(Some(_)) = parser.next_event() {}
});
