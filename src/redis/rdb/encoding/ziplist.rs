//! Ziplist: the compact list encoding of Redis before 7.0 (list nodes, small
//! hashes and sorted sets in RDB 6..=9 files; RDB 10 still reads them).
//!
//! Layout: `zlbytes: u32 LE` (must equal the blob length), `zltail: u32 LE`
//! (offset of the last entry), `zllen: u16 LE` (65535 = "count unknown"), the
//! entries, then `0xFF`. Each entry is `prevlen` (1 byte if < 254, else
//! `0xFE` + `u32 LE`), an encoding, then the payload:
//!
//! | encoding                  | payload                         |
//! |---------------------------|---------------------------------|
//! | `00pppppp`                | string of up to 63 bytes        |
//! | `01pppppp qqqqqqqq`       | string, 14-bit big-endian length |
//! | `10000000` + `u32 BE`     | string, 32-bit length           |
//! | `11000000` / `11010000` / `11100000` | int16 / int32 / int64 LE |
//! | `11110000`                | 24-bit signed LE                |
//! | `11111110`                | int8                            |
//! | `1111xxxx` (1..=13)       | immediate 0..=12 (`xxxx - 1`)   |

use bytes::Bytes;

use super::{listpack::canonical_int, Element, EncodingError};

const HEADER_LEN: usize = 10;
const END: u8 = 0xFF;
const BIG_PREVLEN: u8 = 0xFE;

/// Iterator over a ziplist blob's elements.
#[derive(Debug, Clone)]
pub struct ZiplistIter {
    data: Bytes,
    pos: usize,
    prev_len: usize,
    last_entry: usize,
    seen: usize,
    declared: u16,
    done: bool,
}

impl ZiplistIter {
    /// Checks the header and terminator; elements are checked as they come.
    pub fn new(data: Bytes) -> Result<ZiplistIter, EncodingError> {
        if data.len() < HEADER_LEN + 1 {
            return Err(EncodingError::new(
                0,
                format!("ziplist of {} bytes is shorter than its header", data.len()),
            ));
        }
        let total = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if total != data.len() {
            return Err(EncodingError::new(
                0,
                format!("ziplist header says {total} bytes, blob has {}", data.len()),
            ));
        }
        let tail = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
        if tail < HEADER_LEN || tail > data.len() - 1 {
            return Err(EncodingError::new(
                4,
                format!("ziplist tail offset {tail} out of bounds"),
            ));
        }
        if data[data.len() - 1] != END {
            return Err(EncodingError::new(
                data.len() - 1,
                "ziplist does not end with 0xFF",
            ));
        }
        let declared = u16::from_le_bytes([data[8], data[9]]);
        Ok(ZiplistIter {
            data,
            pos: HEADER_LEN,
            prev_len: 0,
            last_entry: HEADER_LEN,
            seen: 0,
            declared,
            done: false,
        })
    }

    /// Walks a whole ziplist and returns its element count.
    pub fn validate(data: Bytes) -> Result<usize, EncodingError> {
        let iter = ZiplistIter::new(data)?;
        let mut n = 0;
        for item in iter {
            item?;
            n += 1;
        }
        Ok(n)
    }

    fn entry(&mut self) -> Result<Option<Element>, EncodingError> {
        let data = &self.data;
        let start = self.pos;
        if data[start] == END {
            if start != data.len() - 1 {
                return Err(EncodingError::new(
                    start,
                    "ziplist terminator before the end of the blob",
                ));
            }
            let tail = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
            let expected_tail = if self.seen == 0 {
                HEADER_LEN
            } else {
                self.last_entry
            };
            if tail != expected_tail {
                return Err(EncodingError::new(
                    4,
                    format!("ziplist tail offset {tail}, last entry is at {expected_tail}"),
                ));
            }
            if self.declared != u16::MAX && self.declared as usize != self.seen {
                return Err(EncodingError::new(
                    8,
                    format!(
                        "ziplist header says {} elements, found {}",
                        self.declared, self.seen
                    ),
                ));
            }
            return Ok(None);
        }
        let avail = data.len() - 1 - start;
        let need = |n: usize| -> Result<(), EncodingError> {
            if n > avail {
                Err(EncodingError::new(
                    start,
                    format!("ziplist entry of {n} bytes runs past the end"),
                ))
            } else {
                Ok(())
            }
        };
        let (prevlen, mut p) = if data[start] == BIG_PREVLEN {
            need(5)?;
            let v = u32::from_le_bytes([
                data[start + 1],
                data[start + 2],
                data[start + 3],
                data[start + 4],
            ]);
            (v as usize, 5)
        } else {
            (data[start] as usize, 1)
        };
        if prevlen != self.prev_len {
            return Err(EncodingError::new(
                start,
                format!(
                    "ziplist prevlen {prevlen}, previous entry is {} bytes",
                    self.prev_len
                ),
            ));
        }
        need(p + 1)?;
        let enc = data[start + p];
        let element = match enc >> 6 {
            0 => {
                let len = (enc & 0x3f) as usize;
                p += 1;
                need(p + len)?;
                let s = data.slice(start + p..start + p + len);
                p += len;
                Element::Str(s)
            }
            1 => {
                need(p + 2)?;
                let len = (((enc & 0x3f) as usize) << 8) | data[start + p + 1] as usize;
                p += 2;
                need(p + len)?;
                let s = data.slice(start + p..start + p + len);
                p += len;
                Element::Str(s)
            }
            2 => {
                if enc != 0x80 {
                    return Err(EncodingError::new(
                        start + p,
                        format!("invalid ziplist encoding 0x{enc:02x}"),
                    ));
                }
                need(p + 5)?;
                let b = &data[start + p + 1..start + p + 5];
                let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
                p += 5;
                need(p.saturating_add(len))?;
                let s = data.slice(start + p..start + p + len);
                p += len;
                Element::Str(s)
            }
            _ => {
                p += 1;
                let int_len = match enc {
                    0xC0 => 2,
                    0xD0 => 4,
                    0xE0 => 8,
                    0xF0 => 3,
                    0xFE => 1,
                    0xF1..=0xFD => 0,
                    other => {
                        return Err(EncodingError::new(
                            start + p - 1,
                            format!("invalid ziplist encoding 0x{other:02x}"),
                        ));
                    }
                };
                need(p + int_len)?;
                let b = &data[start + p..start + p + int_len];
                let value = match enc {
                    0xC0 => i16::from_le_bytes([b[0], b[1]]) as i64,
                    0xD0 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
                    0xE0 => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                    0xF0 => (i32::from_le_bytes([0, b[0], b[1], b[2]]) >> 8) as i64,
                    0xFE => b[0] as i8 as i64,
                    imm => ((imm & 0x0f) as i64) - 1,
                };
                p += int_len;
                Element::Int(value)
            }
        };
        self.last_entry = start;
        self.prev_len = p;
        self.pos = start + p;
        self.seen += 1;
        Ok(Some(element))
    }
}

impl Iterator for ZiplistIter {
    type Item = Result<Element, EncodingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let step = self.entry();
        super::fuse(&mut self.done, step)
    }
}

/// Encodes `elements` as a ziplist (strings holding canonical integers are
/// stored as integers, as Redis does).
pub fn encode(elements: &[Element]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    let mut prev_len = 0usize;
    let mut last_entry = HEADER_LEN;
    for element in elements {
        let start = out.len();
        last_entry = start;
        if prev_len < BIG_PREVLEN as usize {
            out.push(prev_len as u8);
        } else {
            out.push(BIG_PREVLEN);
            out.extend_from_slice(&(prev_len as u32).to_le_bytes());
        }
        let as_int = match element {
            Element::Int(i) => Some(*i),
            Element::Str(b) => canonical_int(b),
        };
        match (as_int, element) {
            (Some(v), _) => {
                if (0..=12).contains(&v) {
                    out.push(0xF1 + v as u8);
                } else if let Ok(v) = i8::try_from(v) {
                    out.push(0xFE);
                    out.push(v as u8);
                } else if let Ok(v) = i16::try_from(v) {
                    out.push(0xC0);
                    out.extend_from_slice(&v.to_le_bytes());
                } else if (-(1 << 23)..(1 << 23)).contains(&v) {
                    out.push(0xF0);
                    out.extend_from_slice(&(v as i32).to_le_bytes()[..3]);
                } else if let Ok(v) = i32::try_from(v) {
                    out.push(0xD0);
                    out.extend_from_slice(&v.to_le_bytes());
                } else {
                    out.push(0xE0);
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            (None, Element::Str(b)) => {
                let len = b.len();
                if len < 64 {
                    out.push(len as u8);
                } else if len < 16384 {
                    out.push(0x40 | (len >> 8) as u8);
                    out.push(len as u8);
                } else {
                    out.push(0x80);
                    out.extend_from_slice(&(len as u32).to_be_bytes());
                }
                out.extend_from_slice(b);
            }
            (None, Element::Int(_)) => unreachable!("integers always have an integer form"),
        }
        prev_len = out.len() - start;
    }
    out.push(END);
    let total = out.len() as u32;
    out[0..4].copy_from_slice(&total.to_le_bytes());
    out[4..8].copy_from_slice(&(last_entry as u32).to_le_bytes());
    let count = u16::try_from(elements.len()).unwrap_or(u16::MAX);
    out[8..10].copy_from_slice(&count.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn element() -> impl Strategy<Value = Element> {
        prop_oneof![
            any::<i64>().prop_map(Element::Int),
            (-300i64..300).prop_map(Element::Int),
            proptest::collection::vec(any::<u8>(), 0..20000)
                .prop_map(|v| Element::Str(Bytes::from(v))),
            "[a-z]{0,300}".prop_map(|s| Element::Str(Bytes::from(s))),
        ]
    }

    #[test]
    fn refuses_corruption() {
        let blob = encode(&[Element::Str(Bytes::from_static(b"hello")), Element::Int(7)]);
        assert_eq!(ZiplistIter::validate(Bytes::from(blob.clone())).unwrap(), 2);
        let mut bad_count = blob.clone();
        bad_count[8] = 3;
        assert!(ZiplistIter::validate(Bytes::from(bad_count)).is_err());
        let mut bad_prevlen = blob.clone();
        bad_prevlen[10 + 7] = 3;
        assert!(ZiplistIter::validate(Bytes::from(bad_prevlen)).is_err());
        let mut bad_tail = blob.clone();
        bad_tail[4] = 10;
        assert!(ZiplistIter::validate(Bytes::from(bad_tail)).is_err());
        let mut long_string = blob;
        long_string[11] = 60;
        assert!(ZiplistIter::validate(Bytes::from(long_string)).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(elements in proptest::collection::vec(element(), 0..30)) {
            let blob = encode(&elements);
            let back: Vec<_> = ZiplistIter::new(Bytes::from(blob)).unwrap().collect::<Result<_, _>>().unwrap();
            let expected: Vec<_> = elements.iter().map(|e| match e {
                Element::Str(b) => canonical_int(b).map_or_else(|| e.clone(), Element::Int),
                Element::Int(_) => e.clone(),
            }).collect();
            prop_assert_eq!(back, expected);
        }

        #[test]
        fn never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if data.len() >= 4 {
                let len = data.len() as u32;
                data[..4].copy_from_slice(&len.to_le_bytes());
            }
            let _ = ZiplistIter::validate(Bytes::from(data));
        }
    }
}
