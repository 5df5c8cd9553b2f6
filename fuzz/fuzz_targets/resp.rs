//! Arbitrary bytes through the incremental RESP decoder, fed as one buffer
//! and decoded frame after frame until it needs more input or errors.
#![no_main]

use bytes::BytesMut;
use ferry::redis::resp::{RespDecoder, RespLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = RespDecoder::new(RespLimits::default());
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = decoder.decode_frame(&mut buf) {}
});
