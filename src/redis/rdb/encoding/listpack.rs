//! Listpack: the compact list encoding of Redis 7 (hashes, sets, sorted sets,
//! quicklist nodes and stream nodes).
//!
//! Layout: `total_bytes: u32 LE`, `count: u16 LE` (65535 = "too many to
//! count"), the entries, then the terminator `0xFF`. `total_bytes` must equal
//! the blob length. Each entry is an encoding byte (with its payload), then a
//! "backlen" of 1..=5 bytes holding the length of encoding + payload (7 bits
//! per byte, read from the right), so that the list can be walked backwards:
//!
//! | first byte  | meaning                                   |
//! |-------------|-------------------------------------------|
//! | `0xxxxxxx`  | 7-bit unsigned integer                    |
//! | `10xxxxxx`  | string of up to 63 bytes follows          |
//! | `110xxxxx`  | 13-bit signed integer (+ 1 byte)          |
//! | `1110xxxx`  | string, 12-bit length (+ 1 byte)          |
//! | `11110000`  | string, 32-bit LE length follows          |
//! | `11110001..11110100` | 16/24/32/64-bit LE signed integer |
//! | `11111111`  | end of listpack                           |

use bytes::Bytes;

use super::{Element, EncodingError};

const HEADER_LEN: usize = 6;
const TERMINATOR: u8 = 0xFF;
/// `count` value meaning "not stored, walk the list to know".
pub const COUNT_UNKNOWN: u16 = u16::MAX;

/// Iterator over a listpack blob's elements.
#[derive(Debug, Clone)]
pub struct ListpackIter {
    data: Bytes,
    pos: usize,
    seen: usize,
    declared: u16,
    done: bool,
}

impl ListpackIter {
    /// Checks the header and terminator; elements are checked as they come.
    pub fn new(data: Bytes) -> Result<ListpackIter, EncodingError> {
        if data.len() < HEADER_LEN + 1 {
            return Err(EncodingError::new(
                0,
                format!(
                    "listpack of {} bytes is shorter than its header",
                    data.len()
                ),
            ));
        }
        let total = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if total != data.len() {
            return Err(EncodingError::new(
                0,
                format!(
                    "listpack header says {total} bytes, blob has {}",
                    data.len()
                ),
            ));
        }
        if data[data.len() - 1] != TERMINATOR {
            return Err(EncodingError::new(
                data.len() - 1,
                "listpack does not end with 0xFF",
            ));
        }
        let declared = u16::from_le_bytes([data[4], data[5]]);
        Ok(ListpackIter {
            data,
            pos: HEADER_LEN,
            seen: 0,
            declared,
            done: false,
        })
    }

    /// The element count from the header (None when it says "unknown").
    pub fn declared_len(&self) -> Option<usize> {
        (self.declared != COUNT_UNKNOWN).then_some(self.declared as usize)
    }

    /// Walks a whole listpack and returns its element count.
    pub fn validate(data: Bytes) -> Result<usize, EncodingError> {
        let iter = ListpackIter::new(data)?;
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
        let first = data[start];
        if first == TERMINATOR {
            if start != data.len() - 1 {
                return Err(EncodingError::new(
                    start,
                    "listpack terminator before the end of the blob",
                ));
            }
            if self.declared != COUNT_UNKNOWN && self.declared as usize != self.seen {
                return Err(EncodingError::new(
                    0,
                    format!(
                        "listpack header says {} elements, found {}",
                        self.declared, self.seen
                    ),
                ));
            }
            return Ok(None);
        }
        // Bytes available for this entry, terminator excluded.
        let avail = data.len() - 1 - start;
        let need = |n: usize| -> Result<(), EncodingError> {
            if n > avail {
                Err(EncodingError::new(
                    start,
                    format!("listpack entry of {n} bytes runs past the end"),
                ))
            } else {
                Ok(())
            }
        };
        let (element, enc_len) = if first & 0x80 == 0 {
            (Element::Int((first & 0x7f) as i64), 1)
        } else if first & 0xC0 == 0x80 {
            let len = (first & 0x3f) as usize;
            need(1 + len)?;
            (
                Element::Str(data.slice(start + 1..start + 1 + len)),
                1 + len,
            )
        } else if first & 0xE0 == 0xC0 {
            need(2)?;
            let raw = (((first & 0x1f) as u16) << 8) | data[start + 1] as u16;
            // Sign-extend 13 bits.
            let value = ((raw << 3) as i16 >> 3) as i64;
            (Element::Int(value), 2)
        } else if first & 0xF0 == 0xE0 {
            need(2)?;
            let len = (((first & 0x0f) as usize) << 8) | data[start + 1] as usize;
            need(2 + len)?;
            (
                Element::Str(data.slice(start + 2..start + 2 + len)),
                2 + len,
            )
        } else {
            match first {
                0xF0 => {
                    need(5)?;
                    let len = u32::from_le_bytes([
                        data[start + 1],
                        data[start + 2],
                        data[start + 3],
                        data[start + 4],
                    ]) as usize;
                    need(5usize.saturating_add(len))?;
                    (
                        Element::Str(data.slice(start + 5..start + 5 + len)),
                        5 + len,
                    )
                }
                0xF1 => {
                    need(3)?;
                    let v = i16::from_le_bytes([data[start + 1], data[start + 2]]);
                    (Element::Int(v as i64), 3)
                }
                0xF2 => {
                    need(4)?;
                    let v =
                        i32::from_le_bytes([0, data[start + 1], data[start + 2], data[start + 3]])
                            >> 8;
                    (Element::Int(v as i64), 4)
                }
                0xF3 => {
                    need(5)?;
                    let v = i32::from_le_bytes([
                        data[start + 1],
                        data[start + 2],
                        data[start + 3],
                        data[start + 4],
                    ]);
                    (Element::Int(v as i64), 5)
                }
                0xF4 => {
                    need(9)?;
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[start + 1..start + 9]);
                    (Element::Int(i64::from_le_bytes(b)), 9)
                }
                other => {
                    return Err(EncodingError::new(
                        start,
                        format!("invalid listpack encoding byte 0x{other:02x}"),
                    ));
                }
            }
        };
        let back_size = backlen_size(enc_len);
        need(enc_len + back_size)?;
        let back = decode_backlen(&data[start + enc_len..start + enc_len + back_size]);
        if back != enc_len as u64 {
            return Err(EncodingError::new(
                start + enc_len,
                format!("listpack backlen says {back}, entry is {enc_len} bytes"),
            ));
        }
        self.pos = start + enc_len + back_size;
        self.seen += 1;
        Ok(Some(element))
    }
}

impl Iterator for ListpackIter {
    type Item = Result<Element, EncodingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let step = self.entry();
        super::fuse(&mut self.done, step)
    }
}

/// Same thresholds as Redis's `lpEncodeBacklen` (note the strict `<`).
fn backlen_size(len: usize) -> usize {
    if len <= 127 {
        1
    } else if len < 16383 {
        2
    } else if len < 2097151 {
        3
    } else if len < 268435455 {
        4
    } else {
        5
    }
}

/// The backlen is stored so it can be read right to left: the last byte holds
/// the 7 lowest bits, and every byte but the leftmost has its high bit set.
fn decode_backlen(bytes: &[u8]) -> u64 {
    let mut value = 0u64;
    for (shift, &b) in bytes.iter().rev().enumerate() {
        value |= ((b & 0x7f) as u64) << (7 * shift);
    }
    value
}

fn encode_backlen(len: usize, out: &mut Vec<u8>) {
    let size = backlen_size(len);
    let mut bytes = [0u8; 5];
    for (i, slot) in bytes[..size].iter_mut().rev().enumerate() {
        let bits = ((len >> (7 * i)) & 0x7f) as u8;
        // Every byte but the leftmost says "more to the left".
        *slot = if i + 1 == size { bits } else { bits | 0x80 };
    }
    out.extend_from_slice(&bytes[..size]);
}

/// Encodes `elements` as a listpack, choosing the smallest encoding for each
/// (strings that hold canonical integers are stored as integers, as Redis does).
pub fn encode(elements: &[Element]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    for element in elements {
        let entry_start = out.len();
        let as_int = match element {
            Element::Int(i) => Some(*i),
            Element::Str(b) => canonical_int(b),
        };
        match (as_int, element) {
            (Some(v), _) => {
                if (0..=127).contains(&v) {
                    out.push(v as u8);
                } else if (-4096..=4095).contains(&v) {
                    let raw = (v as u16) & 0x1fff;
                    out.push(0xC0 | (raw >> 8) as u8);
                    out.push(raw as u8);
                } else if i16::try_from(v).is_ok() {
                    out.push(0xF1);
                    out.extend_from_slice(&(v as i16).to_le_bytes());
                } else if (-(1 << 23)..(1 << 23)).contains(&v) {
                    out.push(0xF2);
                    out.extend_from_slice(&(v as i32).to_le_bytes()[..3]);
                } else if i32::try_from(v).is_ok() {
                    out.push(0xF3);
                    out.extend_from_slice(&(v as i32).to_le_bytes());
                } else {
                    out.push(0xF4);
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            (None, Element::Str(b)) => {
                let len = b.len();
                if len < 64 {
                    out.push(0x80 | len as u8);
                } else if len < 4096 {
                    out.push(0xE0 | (len >> 8) as u8);
                    out.push(len as u8);
                } else {
                    out.push(0xF0);
                    out.extend_from_slice(&(len as u32).to_le_bytes());
                }
                out.extend_from_slice(b);
            }
            (None, Element::Int(_)) => unreachable!("integers always have an integer form"),
        }
        let enc_len = out.len() - entry_start;
        encode_backlen(enc_len, &mut out);
    }
    out.push(TERMINATOR);
    let total = out.len() as u32;
    out[0..4].copy_from_slice(&total.to_le_bytes());
    let count = u16::try_from(elements.len()).unwrap_or(COUNT_UNKNOWN);
    out[4..6].copy_from_slice(&count.to_le_bytes());
    out
}

/// `Some(i)` when `b` is the canonical decimal form of `i` (what Redis's
/// `string2ll` accepts: no sign on zero, no leading zeros, no `+`).
pub(crate) fn canonical_int(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let v: i64 = std::str::from_utf8(b).ok()?.parse().ok()?;
    (v.to_string().as_bytes() == b).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn element() -> impl Strategy<Value = Element> {
        prop_oneof![
            any::<i64>().prop_map(Element::Int),
            (-5000i64..5000).prop_map(Element::Int),
            proptest::collection::vec(any::<u8>(), 0..5000)
                .prop_map(|v| Element::Str(Bytes::from(v))),
            "[a-z]{0,70}".prop_map(|s| Element::Str(Bytes::from(s))),
        ]
    }

    fn normalize(e: &Element) -> Element {
        match e {
            Element::Str(b) => match canonical_int(b) {
                Some(i) => Element::Int(i),
                None => e.clone(),
            },
            Element::Int(_) => e.clone(),
        }
    }

    #[test]
    fn decodes_integer_encodings() {
        let values = [
            0,
            127,
            -1,
            -4096,
            4095,
            8191,
            -4097,
            32767,
            -32768,
            1 << 22,
            -(1 << 23),
            1 << 30,
            i64::MIN,
            i64::MAX,
        ];
        let elements: Vec<_> = values.iter().map(|&v| Element::Int(v)).collect();
        let blob = encode(&elements);
        let back: Vec<_> = ListpackIter::new(Bytes::from(blob))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, elements);
    }

    #[test]
    fn refuses_corruption() {
        let blob = encode(&[Element::Str(Bytes::from_static(b"hello")), Element::Int(7)]);
        let mut bad_total = blob.clone();
        bad_total[0] += 1;
        assert!(ListpackIter::new(Bytes::from(bad_total)).is_err());
        let mut bad_count = blob.clone();
        bad_count[4] = 3;
        assert!(ListpackIter::validate(Bytes::from(bad_count)).is_err());
        let mut bad_backlen = blob.clone();
        bad_backlen[6 + 6] = 9;
        assert!(ListpackIter::validate(Bytes::from(bad_backlen)).is_err());
        let mut bad_len = blob.clone();
        bad_len[6] = 0x80 | 40;
        assert!(ListpackIter::validate(Bytes::from(bad_len)).is_err());
        let mut early_end = blob;
        early_end[6] = 0xFF;
        assert!(ListpackIter::validate(Bytes::from(early_end)).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(elements in proptest::collection::vec(element(), 0..40)) {
            let blob = encode(&elements);
            let back: Vec<_> = ListpackIter::new(Bytes::from(blob)).unwrap().collect::<Result<_, _>>().unwrap();
            let expected: Vec<_> = elements.iter().map(normalize).collect();
            prop_assert_eq!(back, expected);
        }

        #[test]
        fn never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if data.len() >= 4 {
                let len = data.len() as u32;
                data[..4].copy_from_slice(&len.to_le_bytes());
            }
            let _ = ListpackIter::validate(Bytes::from(data));
        }
    }
}
