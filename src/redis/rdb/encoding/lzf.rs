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
//! [`LzfStream`] does the same piece by piece, for strings too big to hold:
//! it keeps only the last 8 KiB of output (as far back as a reference
//! reaches) and the bytes of one token cut between two pieces of input.
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

/// How far back a reference reaches (13 bits of distance, plus one).
const WINDOW: usize = 1 << 13;
/// Longest token: a control byte and 32 literal bytes.
const MAX_TOKEN: usize = 33;

/// Streaming [`decompress`]: feed the compressed bytes in pieces of any
/// size, get the output of each as it is decoded, then [`LzfStream::finish`].
/// Errors name the position in the compressed input.
#[derive(Debug)]
pub struct LzfStream {
    out_len: u64,
    produced: u64,
    /// Compressed bytes fed so far (before `carry`).
    consumed: usize,
    /// The last output bytes, at most [`WINDOW`].
    window: Vec<u8>,
    /// The start of a token cut at the end of the last piece.
    carry: Vec<u8>,
}

impl LzfStream {
    /// A stream that must produce exactly `out_len` bytes.
    pub fn new(out_len: u64) -> LzfStream {
        LzfStream {
            out_len,
            produced: 0,
            consumed: 0,
            window: Vec::new(),
            carry: Vec::new(),
        }
    }

    /// Bytes produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Decodes `input`, the next compressed bytes; returns their output (at
    /// most [`MAX_EXPANSION`] times `input.len()` bytes, plus a token).
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<u8>, EncodingError> {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(input);
        let mut buf = std::mem::take(&mut self.window);
        let history = buf.len();
        let mut ip = 0;
        while ip < data.len() {
            let ctrl = data[ip] as usize;
            let at = self.consumed + ip;
            let (run, token) = if ctrl < 32 {
                (ctrl + 1, ctrl + 2)
            } else if ctrl >> 5 == 7 {
                (0, 3)
            } else {
                (0, 2)
            };
            if ip + token > data.len() {
                break;
            }
            let made = (buf.len() - history) as u64;
            if run > 0 {
                if self.produced + made + run as u64 > self.out_len {
                    return Err(EncodingError::new(at, "LZF output longer than declared"));
                }
                buf.extend_from_slice(&data[ip + 1..ip + 1 + run]);
            } else {
                let mut len = ctrl >> 5;
                let mut next = ip + 1;
                if len == 7 {
                    len += data[next] as usize;
                    next += 1;
                }
                let distance = ((ctrl & 0x1f) << 8) + data[next] as usize + 1;
                let len = len + 2;
                if distance > buf.len() {
                    return Err(EncodingError::new(
                        at,
                        "LZF back-reference before the start of the output",
                    ));
                }
                if self.produced + made + len as u64 > self.out_len {
                    return Err(EncodingError::new(at, "LZF output longer than declared"));
                }
                // An overlapping reference repeats with period `distance`:
                // copy what exists, doubling, instead of byte by byte.
                let start = buf.len() - distance;
                let mut left = len;
                while left > 0 {
                    let n = left.min(buf.len() - start);
                    buf.extend_from_within(start..start + n);
                    left -= n;
                }
            }
            ip += token;
        }
        self.consumed += ip;
        self.carry = data[ip..].to_vec();
        let output = buf[history..].to_vec();
        self.produced += output.len() as u64;
        let keep = buf.len().min(WINDOW);
        buf.drain(..buf.len() - keep);
        self.window = buf;
        debug_assert!(self.carry.len() < MAX_TOKEN + 1);
        Ok(output)
    }

    /// Checks the input ended on a token boundary with exactly the declared
    /// output.
    pub fn finish(&self) -> Result<(), EncodingError> {
        if !self.carry.is_empty() {
            return Err(EncodingError::new(
                self.consumed,
                "LZF input ends inside a token",
            ));
        }
        if self.produced != self.out_len {
            return Err(EncodingError::new(
                self.consumed,
                format!(
                    "LZF produced {} bytes, {} declared",
                    self.produced, self.out_len
                ),
            ));
        }
        Ok(())
    }
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

    /// `LzfStream` over `packed` fed in pieces of `step` bytes.
    fn stream(packed: &[u8], len: usize, step: usize) -> Result<Vec<u8>, EncodingError> {
        let mut lzf = LzfStream::new(len as u64);
        let mut out = Vec::new();
        for piece in packed.chunks(step.max(1)) {
            out.extend(lzf.feed(piece)?);
        }
        lzf.finish()?;
        Ok(out)
    }

    #[test]
    fn streaming_matches_whole_at_every_step() {
        let mut data = b"abababababxyz".repeat(2000);
        data.extend((0..20_000u32).map(|i| (i * 7 % 251) as u8));
        data.extend(std::iter::repeat(b'q').take(50_000));
        let packed = compress(&data);
        for step in [1, 2, 3, 7, 33, 34, 4096, packed.len()] {
            assert_eq!(
                stream(&packed, data.len(), step).unwrap(),
                data,
                "step {step}"
            );
        }
        // Corrupt streams fail as the whole decoder does.
        assert!(stream(&[5, b'a'], 6, 1).is_err(), "literal past input");
        assert!(
            stream(&[0, b'a', 0x20, 5], 4, 2).is_err(),
            "reference before start"
        );
        assert!(stream(&[0, b'a'], 2, 1).is_err(), "short output");
        assert!(stream(&[1, b'a', b'b'], 1, 3).is_err(), "long output");
    }

    proptest! {
        #[test]
        fn streaming_round_trips(data in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), any::<u8>()], 0..20000), step in 1usize..100) {
            let packed = compress(&data);
            prop_assert_eq!(stream(&packed, data.len(), step).unwrap(), data);
        }

        #[test]
        fn streaming_agrees_with_whole(data in proptest::collection::vec(any::<u8>(), 0..300), len in 0usize..3000, step in 1usize..40) {
            let whole = decompress(&data, len).ok();
            let streamed = stream(&data, len, step).ok();
            prop_assert_eq!(whole, streamed);
        }

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
