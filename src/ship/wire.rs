//! Encoding of entry batches and snapshot chunks on the `Ship` stream
//! (layout in `ship/mod.rs` and `proto/ferry.proto`).
//!
//! In: WAL entries / raw chunk bytes (encode), received frames (decode).
//! Out: frames, and decoded entries ready for
//! [`Wal::append_at`](crate::wal::Wal::append_at). Decoding checks every
//! declared length against [`ShipLimits`] before allocating, and names the
//! entry and byte offset of anything malformed.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use super::{ShipError, ShipLimits};
use crate::position::{LogId, ReplOffset};
use crate::record::pb;
use crate::record::{Record, RecordLimits, SnapshotMarker};
use crate::wal::{NewEntry, SourcePosition, WalEntry, MAX_PAYLOAD_LEN, MAX_REPLID_LEN};

/// Largest encoded `WireEntry`: a maximal payload plus generous room for the
/// other fields.
const MAX_WIRE_ENTRY_LEN: usize = MAX_PAYLOAD_LEN + 4096;

/// Encoded length of `entry` as a `WireEntry` message (without its prefix).
/// The message is written field by field from the borrowed entry (see
/// [`put_wire_entry`]) rather than through `pb::WireEntry`, which would clone
/// the replid for every entry shipped.
fn wire_body_len(entry: &WalEntry) -> usize {
    use prost::encoding::{bytes, encoded_len_varint, key_len, uint32, uint64};
    let mut len = 0;
    if entry.log_id.0 != 0 {
        len += uint64::encoded_len(1, &entry.log_id.0);
    }
    if entry.created_unix_ms != 0 {
        len += uint64::encoded_len(2, &entry.created_unix_ms);
    }
    if entry.flags != 0 {
        len += uint32::encoded_len(3, &u32::from(entry.flags));
    }
    if !entry.source.replid.is_empty() {
        // A string field (prost's `string::encoded_len`, which wants a
        // `String`).
        let replid_len = entry.source.replid.len();
        len += key_len(4) + encoded_len_varint(replid_len as u64) + replid_len;
    }
    if entry.source.offset.0 != 0 {
        len += uint64::encoded_len(5, &entry.source.offset.0);
    }
    if entry.source.db != 0 {
        len += uint32::encoded_len(6, &entry.source.db);
    }
    if !entry.payload.is_empty() {
        len += bytes::encoded_len(7, &entry.payload);
    }
    len
}

/// Writes `entry` as a length-prefixed `WireEntry`: the same bytes as
/// prost's encoding of `pb::WireEntry` (field order, defaults left out).
fn put_wire_entry(entry: &WalEntry, out: &mut BytesMut) {
    use prost::encoding::{bytes, encode_key, encode_varint, uint32, uint64, WireType};
    encode_varint(wire_body_len(entry) as u64, out);
    if entry.log_id.0 != 0 {
        uint64::encode(1, &entry.log_id.0, out);
    }
    if entry.created_unix_ms != 0 {
        uint64::encode(2, &entry.created_unix_ms, out);
    }
    if entry.flags != 0 {
        uint32::encode(3, &u32::from(entry.flags), out);
    }
    if !entry.source.replid.is_empty() {
        encode_key(4, WireType::LengthDelimited, out);
        encode_varint(entry.source.replid.len() as u64, out);
        out.put_slice(entry.source.replid.as_bytes());
    }
    if entry.source.offset.0 != 0 {
        uint64::encode(5, &entry.source.offset.0, out);
    }
    if entry.source.db != 0 {
        uint32::encode(6, &entry.source.db, out);
    }
    if !entry.payload.is_empty() {
        bytes::encode(7, &entry.payload, out);
    }
}

/// Length of one entry inside a batch's raw bytes (prefix included).
pub fn wire_entry_len(entry: &WalEntry) -> usize {
    let len = wire_body_len(entry);
    prost::length_delimiter_len(len) + len
}

/// Encodes consecutive `entries` (at least one) as one batch.
pub fn encode_batch(entries: &[WalEntry]) -> pb::EntryBatch {
    let raw_len: usize = entries.iter().map(wire_entry_len).sum();
    let mut raw = BytesMut::with_capacity(raw_len);
    for entry in entries {
        put_wire_entry(entry, &mut raw);
    }
    let compressed = snap::raw::Encoder::new()
        .compress_vec(&raw)
        .unwrap_or_else(|_| Vec::new());
    pb::EntryBatch {
        first_log_id: entries.first().map_or(0, |entry| entry.log_id.0),
        count: entries.len() as u32,
        raw_len: raw.len() as u64,
        snappy_entries: Bytes::from(compressed),
    }
}

/// One entry of a received batch; its payload was checked to decode as a
/// record.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEntry {
    pub log_id: LogId,
    pub entry: NewEntry,
    /// The payload's snapshot marker, if it is one (it needs special
    /// handling); write records are only checked, not kept decoded.
    pub marker: Option<SnapshotMarker>,
}

impl DecodedEntry {
    pub fn marker(&self) -> Option<&SnapshotMarker> {
        self.marker.as_ref()
    }
}

/// Decompresses a snappy raw block whose header must declare `expected`
/// bytes (or at most `limit` when `expected` is `None`).
fn decompress(
    data: &[u8],
    expected: Option<usize>,
    limit: usize,
    what: &str,
) -> Result<Bytes, ShipError> {
    let declared = snap::raw::decompress_len(data)
        .map_err(|error| ShipError::invalid(format!("{what}: snappy header: {error}")))?;
    if let Some(expected) = expected {
        if declared != expected {
            return Err(ShipError::invalid(format!(
                "{what}: snappy header declares {declared} bytes but raw_len is {expected}"
            )));
        }
    }
    if declared > limit {
        return Err(ShipError::invalid(format!(
            "{what}: {declared} decompressed bytes exceed the limit of {limit}"
        )));
    }
    let mut raw = vec![0u8; declared];
    let written = snap::raw::Decoder::new()
        .decompress(data, &mut raw)
        .map_err(|error| ShipError::invalid(format!("{what}: bad snappy payload: {error}")))?;
    if written != declared {
        return Err(ShipError::invalid(format!(
            "{what}: snappy payload decompressed to {written} bytes, header said {declared}"
        )));
    }
    Ok(Bytes::from(raw))
}

/// Decodes and checks a received batch.
pub fn decode_batch(
    batch: &pb::EntryBatch,
    limits: &ShipLimits,
) -> Result<Vec<DecodedEntry>, ShipError> {
    let first = batch.first_log_id;
    let what = format!("entry batch at {first}");
    if batch.count == 0 {
        return Err(ShipError::invalid(format!("{what}: count is 0")));
    }
    if batch.count > limits.max_batch_entries {
        return Err(ShipError::invalid(format!(
            "{what}: count {} exceeds the limit of {}",
            batch.count, limits.max_batch_entries
        )));
    }
    if first == 0 || first.checked_add(u64::from(batch.count)).is_none() {
        return Err(ShipError::invalid(format!(
            "{what}: first_log_id {first} with count {} is out of range",
            batch.count
        )));
    }
    let raw_len = usize::try_from(batch.raw_len)
        .ok()
        .filter(|len| *len <= limits.max_batch_raw_bytes)
        .ok_or_else(|| {
            ShipError::invalid(format!(
                "{what}: raw_len {} exceeds the limit of {}",
                batch.raw_len, limits.max_batch_raw_bytes
            ))
        })?;
    let raw = decompress(
        &batch.snappy_entries,
        Some(raw_len),
        limits.max_batch_raw_bytes,
        &what,
    )?;

    let record_limits = RecordLimits::default();
    let mut entries = Vec::with_capacity((batch.count as usize).min(raw_len / 4 + 1));
    let mut offset = 0usize;
    for index in 0..u64::from(batch.count) {
        let log_id = LogId(first + index);
        let at =
            |what_part: &str| format!("{what}: entry {log_id} at raw byte {offset}: {what_part}");
        let mut rest = &raw[offset..];
        let before = rest.len();
        let len = prost::decode_length_delimiter(&mut rest)
            .map_err(|error| ShipError::invalid(at(&format!("bad length prefix: {error}"))))?;
        let prefix_len = before - rest.len();
        if len > rest.len() {
            return Err(ShipError::invalid(at(&format!(
                "length {len} runs past the batch end ({} bytes left)",
                rest.len()
            ))));
        }
        if len > MAX_WIRE_ENTRY_LEN {
            return Err(ShipError::invalid(at(&format!(
                "length {len} exceeds the limit of {MAX_WIRE_ENTRY_LEN}"
            ))));
        }
        let body_start = offset + prefix_len;
        let wire = pb::WireEntry::decode(raw.slice(body_start..body_start + len))
            .map_err(|error| ShipError::invalid(at(&format!("does not decode: {error}"))))?;
        if wire.log_id != log_id.0 {
            return Err(ShipError::invalid(at(&format!(
                "carries log id {} (entries must be consecutive)",
                wire.log_id
            ))));
        }
        let flags = u16::try_from(wire.flags)
            .map_err(|_| ShipError::invalid(at(&format!("flags {} exceed 16 bits", wire.flags))))?;
        if wire.replid.len() > MAX_REPLID_LEN {
            return Err(ShipError::invalid(at(&format!(
                "replid of {} bytes exceeds {MAX_REPLID_LEN}",
                wire.replid.len()
            ))));
        }
        if wire.payload.len() > MAX_PAYLOAD_LEN {
            return Err(ShipError::invalid(at(&format!(
                "payload of {} bytes exceeds {MAX_PAYLOAD_LEN}",
                wire.payload.len()
            ))));
        }
        let marker = Record::check_shared(&wire.payload, record_limits)
            .map_err(|error| ShipError::invalid(at(&format!("payload: {error}"))))?;
        entries.push(DecodedEntry {
            log_id,
            entry: NewEntry {
                flags,
                created_unix_ms: Some(wire.created_unix_ms),
                source: SourcePosition {
                    replid: wire.replid.into(),
                    offset: ReplOffset(wire.offset),
                    db: wire.db,
                },
                payload: wire.payload,
            },
            marker,
        });
        offset = body_start + len;
    }
    if offset != raw.len() {
        return Err(ShipError::invalid(format!(
            "{what}: {} trailing bytes after {} entries",
            raw.len() - offset,
            batch.count
        )));
    }
    Ok(entries)
}

/// Compresses one snapshot chunk.
pub fn encode_chunk(epoch: u64, seq: u64, data: &[u8], last: bool) -> pb::SnapshotChunk {
    let compressed = snap::raw::Encoder::new()
        .compress_vec(data)
        .unwrap_or_else(|_| Vec::new());
    pb::SnapshotChunk {
        epoch,
        seq,
        data: Bytes::from(compressed),
        last,
    }
}

/// Decompresses a received chunk, bounded by `limits.max_chunk_raw_bytes`.
pub fn decode_chunk(chunk: &pb::SnapshotChunk, limits: &ShipLimits) -> Result<Bytes, ShipError> {
    let what = format!("snapshot chunk {}/{}", chunk.epoch, chunk.seq);
    if chunk.epoch == 0 || chunk.epoch == u64::MAX {
        return Err(ShipError::invalid(format!(
            "{what}: epoch must be between 1 and {}",
            u64::MAX - 1
        )));
    }
    decompress(&chunk.data, None, limits.max_chunk_raw_bytes, &what)
}

/// The snapshot marker in `payload`, if it holds one. A `Record` has a single
/// oneof field, so its first byte is the field's tag: `0x12` (field 2,
/// length-delimited) for a snapshot; only those payloads are decoded.
pub fn peek_marker(payload: &[u8]) -> Option<SnapshotMarker> {
    if payload.first() != Some(&0x12) {
        return None;
    }
    match Record::decode(payload, RecordLimits::default()) {
        Ok(Record::Snapshot(marker)) => Some(marker),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::WriteRecord;
    use crate::redis::command::Command;

    fn write_payload(key: &str) -> Bytes {
        Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::from_parts(["SET", key, "v"])],
            transaction: false,
            streamed: vec![],
            tenure: None,
        })
        .encode()
    }

    fn wal_entry(log_id: u64, payload: Bytes) -> WalEntry {
        WalEntry {
            log_id: LogId(log_id),
            flags: 3,
            created_unix_ms: 1000 + log_id,
            bytes_end: 0,
            stored_len: 0,
            source: SourcePosition {
                replid: "b".repeat(40).into(),
                offset: ReplOffset(100 * log_id),
                db: 2,
            },
            payload,
        }
    }

    #[test]
    fn batches_round_trip() {
        let entries: Vec<WalEntry> = (5..9)
            .map(|id| wal_entry(id, write_payload(&format!("k{id}"))))
            .collect();
        let batch = encode_batch(&entries);
        assert_eq!(batch.first_log_id, 5);
        assert_eq!(batch.count, 4);
        assert_eq!(
            batch.raw_len as usize,
            entries.iter().map(wire_entry_len).sum::<usize>()
        );
        let decoded = decode_batch(&batch, &ShipLimits::default()).unwrap();
        for (wal, got) in entries.iter().zip(&decoded) {
            assert_eq!(got.log_id, wal.log_id);
            assert_eq!(got.entry.payload, wal.payload);
            assert_eq!(got.entry.source, wal.source);
            assert_eq!(got.entry.flags, wal.flags);
            assert_eq!(got.entry.created_unix_ms, Some(wal.created_unix_ms));
            assert!(got.marker().is_none());
        }
    }

    #[test]
    fn direct_entry_encoding_matches_prost() {
        let mut entries = vec![
            wal_entry(1, write_payload("a")),
            wal_entry(u64::MAX / 1000, Bytes::from(vec![9u8; 1000])),
        ];
        // Defaults (0, empty) are left out, as prost does.
        entries.push(WalEntry {
            flags: 0,
            created_unix_ms: 0,
            source: SourcePosition::default(),
            payload: Bytes::new(),
            ..wal_entry(7, Bytes::new())
        });
        for entry in &entries {
            let message = pb::WireEntry {
                log_id: entry.log_id.0,
                created_unix_ms: entry.created_unix_ms,
                flags: u32::from(entry.flags),
                replid: entry.source.replid.to_string(),
                offset: entry.source.offset.0,
                db: entry.source.db,
                payload: entry.payload.clone(),
            };
            let mut direct = BytesMut::new();
            put_wire_entry(entry, &mut direct);
            assert_eq!(&direct[..], &message.encode_length_delimited_to_vec()[..]);
            assert_eq!(wire_entry_len(entry), direct.len());
        }
    }

    #[test]
    fn markers_are_recognised() {
        let marker = SnapshotMarker {
            epoch: 4,
            rdb_bytes: 10,
            chunks: 1,
            replid: "c".repeat(40),
            offset: 77,
            scope: None,
            tenures: Vec::new(),
            handoffs: Vec::new(),
        };
        let payload = Record::Snapshot(marker.clone()).encode();
        assert_eq!(peek_marker(&payload), Some(marker.clone()));
        assert_eq!(peek_marker(&write_payload("k")), None);
        let decoded = decode_batch(
            &encode_batch(&[wal_entry(9, payload)]),
            &ShipLimits::default(),
        )
        .unwrap();
        assert_eq!(decoded[0].marker(), Some(&marker));
    }

    fn expect_invalid(batch: &pb::EntryBatch, needle: &str) {
        match decode_batch(batch, &ShipLimits::default()) {
            Err(ShipError::InvalidFrame { what }) => {
                assert!(what.contains(needle), "{what:?} should mention {needle:?}")
            }
            other => panic!("expected an invalid frame about {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn hostile_batches_are_typed_errors() {
        let good = encode_batch(&[
            wal_entry(1, write_payload("a")),
            wal_entry(2, write_payload("b")),
        ]);
        expect_invalid(
            &pb::EntryBatch {
                raw_len: u64::MAX,
                ..good.clone()
            },
            "raw_len",
        );
        expect_invalid(
            &pb::EntryBatch {
                raw_len: good.raw_len + 1,
                ..good.clone()
            },
            "snappy header declares",
        );
        expect_invalid(
            &pb::EntryBatch {
                snappy_entries: Bytes::from_static(b"\xff\xff\xff\xff\xff\xff"),
                ..good.clone()
            },
            "snappy",
        );
        expect_invalid(
            &pb::EntryBatch {
                count: 0,
                ..good.clone()
            },
            "count is 0",
        );
        expect_invalid(
            &pb::EntryBatch {
                count: 3,
                ..good.clone()
            },
            "bad length prefix",
        );
        expect_invalid(
            &pb::EntryBatch {
                count: 1,
                ..good.clone()
            },
            "trailing bytes",
        );
        expect_invalid(
            &pb::EntryBatch {
                first_log_id: 7,
                ..good.clone()
            },
            "consecutive",
        );
        expect_invalid(
            &pb::EntryBatch {
                first_log_id: u64::MAX,
                ..good.clone()
            },
            "out of range",
        );
        // Garbage that is valid snappy but not entries.
        let garbage = b"\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00garbage";
        let compressed = snap::raw::Encoder::new().compress_vec(garbage).unwrap();
        expect_invalid(
            &pb::EntryBatch {
                first_log_id: 1,
                count: 1,
                raw_len: garbage.len() as u64,
                snappy_entries: Bytes::from(compressed),
            },
            "entry 1",
        );
        // An entry whose payload is not a record.
        let not_a_record = encode_batch(&[wal_entry(1, Bytes::from_static(b"\x0a\x05\x01"))]);
        expect_invalid(&not_a_record, "payload");
    }

    #[test]
    fn chunks_round_trip_and_are_bounded() {
        let data = vec![42u8; 70_000];
        let chunk = encode_chunk(3, 0, &data, true);
        assert!(chunk.data.len() < data.len());
        assert_eq!(
            decode_chunk(&chunk, &ShipLimits::default()).unwrap(),
            Bytes::from(data)
        );
        let small = ShipLimits {
            max_chunk_raw_bytes: 1000,
            ..ShipLimits::default()
        };
        assert!(matches!(
            decode_chunk(&chunk, &small),
            Err(ShipError::InvalidFrame { .. })
        ));
        let bad_epoch = pb::SnapshotChunk {
            epoch: 0,
            ..chunk.clone()
        };
        assert!(decode_chunk(&bad_epoch, &ShipLimits::default()).is_err());
        let bad_data = pb::SnapshotChunk {
            data: Bytes::from_static(b"\x10\x00garbage"),
            ..chunk
        };
        assert!(decode_chunk(&bad_data, &ShipLimits::default()).is_err());
    }
}
