//! Intset: a sorted array of unique integers (small sets of integers).
//!
//! Layout: `encoding: u32 LE` (element width in bytes: 2, 4 or 8), `length:
//! u32 LE`, then `length` little-endian signed integers of that width, in
//! strictly ascending order. The blob must be exactly `8 + width * length`
//! bytes.

use bytes::Bytes;

use super::EncodingError;

const HEADER_LEN: usize = 8;

/// Iterator over an intset blob's members.
#[derive(Debug, Clone)]
pub struct IntsetIter {
    data: Bytes,
    width: usize,
    len: usize,
    index: usize,
    prev: Option<i64>,
}

impl IntsetIter {
    /// Checks the header against the blob length.
    pub fn new(data: Bytes) -> Result<IntsetIter, EncodingError> {
        if data.len() < HEADER_LEN {
            return Err(EncodingError::new(
                0,
                format!("intset of {} bytes is shorter than its header", data.len()),
            ));
        }
        let width = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if !matches!(width, 2 | 4 | 8) {
            return Err(EncodingError::new(
                0,
                format!("invalid intset encoding {width}"),
            ));
        }
        let len = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
        let expected = (len as u64) * (width as u64) + HEADER_LEN as u64;
        if expected != data.len() as u64 {
            return Err(EncodingError::new(
                4,
                format!(
                    "intset of {len} x {width}-byte members needs {expected} bytes, blob has {}",
                    data.len()
                ),
            ));
        }
        Ok(IntsetIter {
            data,
            width,
            len,
            index: 0,
            prev: None,
        })
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Walks a whole intset (ordering included) and returns its length.
    pub fn validate(data: Bytes) -> Result<usize, EncodingError> {
        let mut iter = IntsetIter::new(data)?;
        let len = iter.len;
        for item in &mut iter {
            item?;
        }
        Ok(len)
    }
}

impl Iterator for IntsetIter {
    type Item = Result<i64, EncodingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.len {
            return None;
        }
        let at = HEADER_LEN + self.index * self.width;
        let b = &self.data[at..at + self.width];
        let value = match self.width {
            2 => i16::from_le_bytes([b[0], b[1]]) as i64,
            4 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            _ => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        };
        self.index += 1;
        if let Some(prev) = self.prev {
            if value <= prev {
                self.index = self.len;
                return Some(Err(EncodingError::new(
                    at,
                    format!("intset member {value} not above {prev}"),
                )));
            }
        }
        self.prev = Some(value);
        Some(Ok(value))
    }
}

/// Encodes `members` (sorted and deduplicated here) with the narrowest width.
pub fn encode(members: &[i64]) -> Vec<u8> {
    let mut sorted = members.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let width: usize = if sorted.iter().all(|v| i16::try_from(*v).is_ok()) {
        2
    } else if sorted.iter().all(|v| i32::try_from(*v).is_ok()) {
        4
    } else {
        8
    };
    let mut out = Vec::with_capacity(HEADER_LEN + width * sorted.len());
    out.extend_from_slice(&(width as u32).to_le_bytes());
    out.extend_from_slice(&(sorted.len() as u32).to_le_bytes());
    for v in sorted {
        out.extend_from_slice(&v.to_le_bytes()[..width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_corruption() {
        let blob = encode(&[1, 2, 3]);
        assert_eq!(IntsetIter::validate(Bytes::from(blob.clone())).unwrap(), 3);
        let mut bad_width = blob.clone();
        bad_width[0] = 3;
        assert!(IntsetIter::new(Bytes::from(bad_width)).is_err());
        let mut bad_len = blob.clone();
        bad_len[4] = 4;
        assert!(IntsetIter::new(Bytes::from(bad_len)).is_err());
        let mut unsorted = blob;
        unsorted[8] = 9;
        assert!(IntsetIter::validate(Bytes::from(unsorted)).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(members in proptest::collection::vec(prop_oneof![any::<i64>(), -40000i64..40000, any::<i32>().prop_map(i64::from)], 0..100)) {
            let blob = encode(&members);
            let back: Vec<i64> = IntsetIter::new(Bytes::from(blob)).unwrap().collect::<Result<_, _>>().unwrap();
            let mut expected = members.clone();
            expected.sort_unstable();
            expected.dedup();
            prop_assert_eq!(back, expected);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = IntsetIter::validate(Bytes::from(data));
        }
    }
}
