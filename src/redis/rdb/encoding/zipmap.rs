//! Zipmap: the compact hash encoding of Redis before 2.6 (RDB type 9).
//!
//! Layout: `zmlen: u8` (entry count if < 254, else "walk to count"), then
//! entries `len key len free value <free unused bytes>`, then `0xFF`. A `len`
//! is one byte if < 254, else `0xFE` followed by a `u32` (little-endian, as
//! written on the x86 hosts of the time). `free` is one byte.

use bytes::Bytes;

use super::EncodingError;

const END: u8 = 0xFF;
const BIG_LEN: u8 = 254;

/// Iterator over a zipmap blob's `(field, value)` pairs.
#[derive(Debug, Clone)]
pub struct ZipmapIter {
    data: Bytes,
    pos: usize,
    seen: usize,
    declared: u8,
    done: bool,
}

impl ZipmapIter {
    /// Checks the blob is long enough for a count and a terminator.
    pub fn new(data: Bytes) -> Result<ZipmapIter, EncodingError> {
        if data.len() < 2 {
            return Err(EncodingError::new(
                0,
                format!("zipmap of {} bytes is too short", data.len()),
            ));
        }
        if data[data.len() - 1] != END {
            return Err(EncodingError::new(
                data.len() - 1,
                "zipmap does not end with 0xFF",
            ));
        }
        Ok(ZipmapIter {
            declared: data[0],
            data,
            pos: 1,
            seen: 0,
            done: false,
        })
    }

    /// Walks a whole zipmap and returns its pair count.
    pub fn validate(data: Bytes) -> Result<usize, EncodingError> {
        let iter = ZipmapIter::new(data)?;
        let mut n = 0;
        for item in iter {
            item?;
            n += 1;
        }
        Ok(n)
    }

    fn read_len(&mut self) -> Result<usize, EncodingError> {
        let at = self.pos;
        let data = &self.data;
        let first = *data
            .get(at)
            .ok_or_else(|| EncodingError::new(at, "zipmap length past the end"))?;
        match first {
            END => Err(EncodingError::new(at, "zipmap ends inside an entry")),
            BIG_LEN => {
                let b = data
                    .get(at + 1..at + 5)
                    .ok_or_else(|| EncodingError::new(at, "zipmap 5-byte length past the end"))?;
                self.pos += 5;
                Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            }
            len => {
                self.pos += 1;
                Ok(len as usize)
            }
        }
    }

    fn take(&mut self, len: usize) -> Result<Bytes, EncodingError> {
        let end = self.pos.checked_add(len).filter(|&e| e < self.data.len());
        let Some(end) = end else {
            return Err(EncodingError::new(
                self.pos,
                format!("zipmap string of {len} bytes runs past the end"),
            ));
        };
        let s = self.data.slice(self.pos..end);
        self.pos = end;
        Ok(s)
    }

    fn entry(&mut self) -> Result<Option<(Bytes, Bytes)>, EncodingError> {
        if self.data[self.pos] == END {
            if self.pos != self.data.len() - 1 {
                return Err(EncodingError::new(
                    self.pos,
                    "zipmap terminator before the end of the blob",
                ));
            }
            if self.declared < BIG_LEN && self.declared as usize != self.seen {
                return Err(EncodingError::new(
                    0,
                    format!(
                        "zipmap header says {} entries, found {}",
                        self.declared, self.seen
                    ),
                ));
            }
            return Ok(None);
        }
        let key_len = self.read_len()?;
        let key = self.take(key_len)?;
        let value_len = self.read_len()?;
        let free = *self
            .data
            .get(self.pos)
            .ok_or_else(|| EncodingError::new(self.pos, "zipmap free byte past the end"))?
            as usize;
        self.pos += 1;
        let value = self.take(value_len)?;
        self.take(free)?;
        self.seen += 1;
        Ok(Some((key, value)))
    }
}

impl Iterator for ZipmapIter {
    type Item = Result<(Bytes, Bytes), EncodingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let step = self.entry();
        super::fuse(&mut self.done, step)
    }
}

/// Encodes `pairs` as a zipmap with `free` unused bytes after each value.
pub fn encode(pairs: &[(Bytes, Bytes)], free: u8) -> Vec<u8> {
    fn put_len(out: &mut Vec<u8>, len: usize) {
        if len < BIG_LEN as usize {
            out.push(len as u8);
        } else {
            out.push(BIG_LEN);
            out.extend_from_slice(&(len as u32).to_le_bytes());
        }
    }
    let mut out = vec![u8::try_from(pairs.len()).map_or(BIG_LEN, |n| n.min(BIG_LEN))];
    for (key, value) in pairs {
        put_len(&mut out, key.len());
        out.extend_from_slice(key);
        put_len(&mut out, value.len());
        out.push(free);
        out.extend_from_slice(value);
        out.extend(std::iter::repeat(0).take(free as usize));
    }
    out.push(END);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_corruption() {
        let blob = encode(&[(Bytes::from_static(b"f1"), Bytes::from_static(b"v1"))], 0);
        assert_eq!(ZipmapIter::validate(Bytes::from(blob.clone())).unwrap(), 1);
        let mut bad_count = blob.clone();
        bad_count[0] = 2;
        assert!(ZipmapIter::validate(Bytes::from(bad_count)).is_err());
        let mut long_key = blob;
        long_key[1] = 30;
        assert!(ZipmapIter::validate(Bytes::from(long_key)).is_err());
    }

    #[test]
    fn lengths_below_254_take_one_byte() {
        // Redis writes and reads a 5-byte length only from 254 up; a 253
        // written long is refused by its integrity check.
        let blob = encode(
            &[(Bytes::from(vec![b'k'; 253]), Bytes::from_static(b"v"))],
            0,
        );
        assert_eq!(blob[1], 253);
        assert_eq!(blob.len(), 1 + (1 + 253) + (1 + 1 + 1) + 1);
        let blob = encode(&[(Bytes::from(vec![b'k'; 254]), Bytes::new())], 0);
        assert_eq!(&blob[1..6], &[BIG_LEN, 254, 0, 0, 0]);
    }

    proptest! {
        #[test]
        fn round_trips(pairs in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..300), proptest::collection::vec(any::<u8>(), 0..300)), 0..20), free in 0u8..5) {
            let pairs: Vec<(Bytes, Bytes)> = pairs.into_iter().map(|(k, v)| (Bytes::from(k), Bytes::from(v))).collect();
            let blob = encode(&pairs, free);
            let back: Vec<_> = ZipmapIter::new(Bytes::from(blob)).unwrap().collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(back, pairs);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ZipmapIter::validate(Bytes::from(data));
        }
    }
}
