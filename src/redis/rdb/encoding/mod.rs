//! Decoders (and, for tests and RESTORE payloads, encoders) of the compact
//! encodings found inside RDB values: LZF strings, CRC64 (Jones), listpack,
//! ziplist, intset and zipmap.

pub mod crc64;
pub mod intset;
pub mod listpack;
pub mod lzf;
pub mod ziplist;
pub mod zipmap;
