//! LZF, the compression Redis applies to RDB strings longer than 20 bytes
//! (`rdbcompression yes`).
//!
//! Format: a sequence of runs. A control byte `c < 32` is followed by
//! `c + 1` literal bytes. Otherwise `c >> 5` is a back-reference length
//! minus 2 (7 means "add the next byte"), and `((c & 0x1f) << 8) | next`
//! plus 1 is the distance back into the output; references may overlap the
//! bytes they produce.
//!
//! [`decompress`] needs the decompressed length up front (the RDB stores
//! it) and refuses any stream that does not produce exactly that many bytes.
//! [`compress`] is a simple greedy compressor: its output is valid LZF (Redis
//! reads it) but not byte-identical to liblzf's.

use super::EncodingError;

/// Largest output one input byte can produce (a 3-byte back-reference of
/// 264 bytes): used to refuse impossible lengths before allocating.
pub const MAX_EXPANSION: u64 = 88;

/// Decompresses `input` into exactly `out_len` bytes.
pub fn decompress(input: &[u8], out_len: usize) -> Result<Vec<u8>, EncodingError> {
    if out_len as u64 > (input.len() as u64).saturating_mul(MAX_EXPANSION) + 264 {
        return Err(EncodingError::new(
            0,
            format!(
                "LZF length {out_len} is more than {} compressed bytes can produce",
                input.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(out_len);
    let mut ip = 0;
    while ip < input.len() {
        let ctrl = input[ip] as usize;
        let ctrl_pos = ip;
        ip += 1;
        if ctrl < 32 {
            let run = ctrl + 1;
            if ip + run > input.len() {
                return Err(EncodingError::new(
                    ctrl_pos,
                    "LZF literal run past the input",
                ));
            }
            if out.len() + run > out_len {
                return Err(EncodingError::new(
                    ctrl_pos,
                    "LZF output longer than declared",
                ));
            }
            out.extend_from_slice(&input[ip..ip + run]);
            ip += run;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                let Some(&extra) = input.get(ip) else {
                    return Err(EncodingError::new(
                        ctrl_pos,
                        "LZF reference length past the input",
                    ));
                };
                len += extra as usize;
                ip += 1;
            }
            let Some(&low) = input.get(ip) else {
                return Err(EncodingError::new(
                    ctrl_pos,
                    "LZF reference offset past the input",
                ));
            };
            ip += 1;
            let distance = ((ctrl & 0x1f) << 8) + low as usize + 1;
            let len = len + 2;
            if distance > out.len() {
                return Err(EncodingError::new(
                    ctrl_pos,
                    "LZF back-reference before the start of the output",
                ));
            }
            if out.len() + len > out_len {
                return Err(EncodingError::new(
                    ctrl_pos,
                    "LZF output longer than declared",
                ));
            }
            let start = out.len() - distance;
            if distance >= len {
                out.extend_from_within(start..start + len);
            } else {
                for i in 0..len {
                    let byte = out[start + i];
                    out.push(byte);
                }
            }
        }
    }
    if out.len() != out_len {
        return Err(EncodingError::new(
            input.len(),
            format!("LZF produced {} bytes, {out_len} declared", out.len()),
        ));
    }
    Ok(out)
}

/// Compresses `input` (greedy, 3-byte hash of the last position).
pub fn compress(input: &[u8]) -> Vec<u8> {
    const HASH_BITS: u32 = 14;
    const MAX_DISTANCE: usize = 1 << 13;
    const MAX_REF_LEN: usize = 264;
    let mut table = vec![usize::MAX; 1 << HASH_BITS];
    let mut out = Vec::with_capacity(input.len() + input.len() / 32 + 2);
    let mut literals: Vec<u8> = Vec::with_capacity(32);
    let flush = |out: &mut Vec<u8>, literals: &mut Vec<u8>| {
        if !literals.is_empty() {
            out.push((literals.len() - 1) as u8);
            out.extend_from_slice(literals);
            literals.clear();
        }
    };
    let mut i = 0;
    while i < input.len() {
        let mut matched = 0;
        let mut distance = 0;
        if i + 3 <= input.len() {
            let h = (u32::from(input[i]) << 16
                | u32::from(input[i + 1]) << 8
                | u32::from(input[i + 2]))
            .wrapping_mul(2654435761)
                >> (32 - HASH_BITS);
            let candidate = table[h as usize];
            table[h as usize] = i;
            if candidate != usize::MAX && i - candidate <= MAX_DISTANCE {
                let max = (input.len() - i).min(MAX_REF_LEN);
                while matched < max && input[candidate + matched] == input[i + matched] {
                    matched += 1;
                }
                distance = i - candidate;
            }
        }
        if matched >= 3 {
            flush(&mut out, &mut literals);
            let len = matched - 2;
            let off = distance - 1;
            if len < 7 {
                out.push(((len << 5) | (off >> 8)) as u8);
            } else {
                out.push(((7 << 5) | (off >> 8)) as u8);
                out.push((len - 7) as u8);
            }
            out.push((off & 0xff) as u8);
            i += matched;
        } else {
            literals.push(input[i]);
            if literals.len() == 32 {
                flush(&mut out, &mut literals);
            }
            i += 1;
        }
    }
    flush(&mut out, &mut literals);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn overlapping_reference_repeats() {
        // literal "ab", then a reference of 6 bytes at distance 2.
        let data = [1, b'a', b'b', (4 << 5) as u8, 1];
        assert_eq!(decompress(&data, 8).unwrap(), b"abababab");
    }

    #[test]
    fn refuses_bad_streams() {
        assert!(decompress(&[5, b'a'], 6).is_err(), "literal past input");
        assert!(
            decompress(&[0, b'a', 0x20, 5], 4).is_err(),
            "reference before start"
        );
        assert!(decompress(&[0, b'a'], 2).is_err(), "short output");
        assert!(
            decompress(&[0, b'a'], 1_000_000).is_err(),
            "impossible length"
        );
    }

    proptest! {
        #[test]
        fn round_trips(data in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), any::<u8>()], 0..3000)) {
            let packed = compress(&data);
            prop_assert_eq!(decompress(&packed, data.len()).unwrap(), data);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), len in 0usize..2000) {
            let _ = decompress(&data, len);
        }
    }
}
