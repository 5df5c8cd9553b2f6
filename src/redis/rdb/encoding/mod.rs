//! Decoders (and, for tests and RESTORE payloads, encoders) of the compact
//! encodings found inside RDB values: LZF strings, CRC64 (Jones), listpack,
//! ziplist, intset and zipmap.
//!
//! What flows in: one blob (an RDB string holding a whole compact
//! structure). What flows out: its elements, one at a time, through an
//! iterator that owns the blob ([`bytes::Bytes`], so string elements are
//! zero-copy slices of it). Every iterator checks the structure's header
//! against the blob length before the first element and every entry's bounds
//! as it goes, and answers a typed [`EncodingError`] naming the byte position
//! inside the blob; the RDB parser turns that into
//! [`super::RdbError::Corrupt`] with the blob's offset in the stream.

pub mod crc64;
pub mod intset;
pub mod listpack;
pub mod lzf;
pub mod ziplist;
pub mod zipmap;

use bytes::Bytes;

/// What was wrong inside a compact structure, and where (byte position from
/// the start of the blob).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at blob byte {pos}")]
pub struct EncodingError {
    pub pos: usize,
    pub what: String,
}

/// Turns one decoding step into an iterator item. After the end or an error
/// `done` is set, so the caller yields nothing more (a corrupt blob is
/// reported once).
pub(crate) fn fuse<T>(
    done: &mut bool,
    step: Result<Option<T>, EncodingError>,
) -> Option<Result<T, EncodingError>> {
    match step {
        Ok(Some(item)) => Some(Ok(item)),
        Ok(None) => {
            *done = true;
            None
        }
        Err(e) => {
            *done = true;
            Some(Err(e))
        }
    }
}

impl EncodingError {
    pub(crate) fn new(pos: usize, what: impl Into<String>) -> EncodingError {
        EncodingError {
            pos,
            what: what.into(),
        }
    }
}

/// One element of a listpack or ziplist: those store integers in binary and
/// everything else as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Element {
    Str(Bytes),
    Int(i64),
}

impl Element {
    /// The element as Redis would return it to a client (integers in decimal).
    pub fn into_bytes(self) -> Bytes {
        match self {
            Element::Str(b) => b,
            Element::Int(i) => Bytes::from(i.to_string()),
        }
    }

    /// Length of the element as a string, without formatting integers.
    pub fn byte_len(&self) -> usize {
        match self {
            Element::Str(b) => b.len(),
            Element::Int(i) => decimal_len(*i),
        }
    }

    /// The element as an integer if it is one or a string holding one (Redis
    /// stores such strings as integers, so both forms mean the same value).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Element::Int(i) => Some(*i),
            Element::Str(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        }
    }

    /// The element as a score (sorted set members' scores are stored as
    /// integers when integral, otherwise as `%.17g` strings).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Element::Int(i) => Some(*i as f64),
            Element::Str(b) => parse_f64(b),
        }
    }
}

/// Parses a double the way Redis writes them (`%.17g`, `inf`, `-inf`, `nan`).
pub fn parse_f64(text: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(text).ok()?;
    match s {
        "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        "nan" | "-nan" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

fn decimal_len(i: i64) -> usize {
    let mut n = i.unsigned_abs();
    let mut len = if i < 0 { 2 } else { 1 };
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_len_matches_formatting() {
        for i in [0i64, 9, 10, -1, -10, 99, 100, i64::MIN, i64::MAX, 12345] {
            assert_eq!(decimal_len(i), i.to_string().len(), "{i}");
        }
    }

    #[test]
    fn scores_parse_like_redis() {
        assert_eq!(parse_f64(b"2.37"), Some(2.37));
        assert_eq!(parse_f64(b"inf"), Some(f64::INFINITY));
        assert_eq!(parse_f64(b"-inf"), Some(f64::NEG_INFINITY));
        assert!(parse_f64(b"nan").is_some_and(f64::is_nan));
        assert_eq!(parse_f64(b"x1"), None);
    }
}
