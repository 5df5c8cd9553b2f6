//! Byte layouts of WAL keys and values (documented in `wal/mod.rs`).
//!
//! In: [`WalEntry`], [`LogMeta`], acks, snapshot records. Out: the bytes
//! stored in RocksDB, and back. Every value ends in a crc32c over the key and
//! the value body, so a value written under the wrong key is caught too.
//! Decoding never panics and never allocates from a length it has not checked
//! against the bytes actually present.

use std::sync::Arc;

use bytes::Bytes;

use super::{
    DownstreamId, LogMeta, PartitionHistory, SnapshotPhase, SnapshotState, SourcePosition,
    WalEntry, MAX_OWNER_LEN, MAX_REPLID_LEN,
};
use crate::position::{LogId, PartitionId, ReplOffset};

/// Version byte of every value this code writes.
pub const FORMAT_VERSION: u8 = 1;

/// Meta key tags (first byte of a `meta` key).
pub const META_LOG: u8 = b'L';
pub const META_APPLIED: u8 = b'A';
pub const META_DOWNSTREAM: u8 = b'D';
pub const META_SNAPSHOT: u8 = b'S';
pub const META_HISTORY: u8 = b'H';

const CRC_LEN: usize = 4;
/// Fixed part of an entry value before the replid.
const ENTRY_FIXED_LEN: usize = 1 + 2 + 8 + 8 + 8 + 4 + 1;

pub fn log_cf_name(partition: PartitionId) -> String {
    format!("p{}.log", partition.0)
}

pub fn snap_cf_name(partition: PartitionId) -> String {
    format!("p{}.snap", partition.0)
}

/// `p<id>.log` / `p<id>.snap` back to the partition; `None` for other names.
pub fn parse_cf_name(name: &str) -> Option<(PartitionId, bool)> {
    let rest = name.strip_prefix('p')?;
    let (id, is_log) = if let Some(id) = rest.strip_suffix(".log") {
        (id, true)
    } else {
        (rest.strip_suffix(".snap")?, false)
    };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((PartitionId(id.parse().ok()?), is_log))
}

pub fn log_key(log_id: LogId) -> [u8; 8] {
    log_id.0.to_be_bytes()
}

pub fn snap_key(epoch: u64, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&epoch.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub fn meta_key(tag: u8, partition: PartitionId) -> Vec<u8> {
    let mut key = Vec::with_capacity(5);
    key.push(tag);
    key.extend_from_slice(&partition.0.to_be_bytes());
    key
}

pub fn downstream_key(partition: PartitionId, downstream: &DownstreamId) -> Vec<u8> {
    let mut key = meta_key(META_DOWNSTREAM, partition);
    key.extend_from_slice(downstream.as_str().as_bytes());
    key
}

/// A meta key split into its tag, partition and (for acks) downstream.
pub fn parse_meta_key(key: &[u8]) -> Result<(u8, PartitionId, &[u8]), String> {
    if key.len() < 5 {
        return Err(format!("meta key of {} bytes is too short", key.len()));
    }
    let partition = PartitionId(u32::from_be_bytes([key[1], key[2], key[3], key[4]]));
    Ok((key[0], partition, &key[5..]))
}

fn seal(key: &[u8], mut value: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(key), &value);
    value.extend_from_slice(&crc.to_be_bytes());
    value
}

/// Checks version and checksum; returns the body between them.
fn unseal<'a>(key: &[u8], value: &'a [u8]) -> Result<&'a [u8], String> {
    unseal_version(key, value, FORMAT_VERSION)
}

/// [`unseal`] of a value of format `version`.
fn unseal_version<'a>(key: &[u8], value: &'a [u8], version: u8) -> Result<&'a [u8], String> {
    if value.len() < 1 + CRC_LEN {
        return Err(format!("value of {} bytes is too short", value.len()));
    }
    let (sealed, crc_bytes) = value.split_at(value.len() - CRC_LEN);
    let stored = u32::from_be_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let computed = crc32c::crc32c_append(crc32c::crc32c(key), sealed);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    if sealed[0] != version {
        return Err(format!("unknown format version {}", sealed[0]));
    }
    Ok(&sealed[1..])
}

/// A bounds-checked reader over a value body.
struct Cursor<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, offset: 0 }
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .offset
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "truncated {what}: need {len} bytes at body offset {}, {} left",
                    self.offset,
                    self.bytes.len() - self.offset
                )
            })?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Ok(u64::from_be_bytes(array))
    }

    fn finish(&self, what: &str) -> Result<(), String> {
        if self.offset != self.bytes.len() {
            return Err(format!(
                "{} trailing bytes after {what}",
                self.bytes.len() - self.offset
            ));
        }
        Ok(())
    }
}

fn put_source(out: &mut Vec<u8>, source: &SourcePosition) {
    out.extend_from_slice(&source.offset.0.to_be_bytes());
    out.extend_from_slice(&source.db.to_be_bytes());
    // Callers validate the length against MAX_REPLID_LEN (< 256) first.
    out.push(source.replid.len() as u8);
    out.extend_from_slice(source.replid.as_bytes());
}

fn get_source(cursor: &mut Cursor<'_>) -> Result<SourcePosition, String> {
    let offset = ReplOffset(cursor.u64("source offset")?);
    let db = cursor.u32("source db")?;
    let replid_len = usize::from(cursor.u8("replid length")?);
    if replid_len > MAX_REPLID_LEN {
        return Err(format!(
            "replid length {replid_len} exceeds {MAX_REPLID_LEN}"
        ));
    }
    let replid = std::str::from_utf8(cursor.take(replid_len, "replid")?)
        .map_err(|_| "replid is not utf-8".to_string())?
        .into();
    Ok(SourcePosition { replid, offset, db })
}

/// Version byte of a log value holding a block of entries (`wal/mod.rs`,
/// "On-disk format"): every log value written now. A value of version 1 is
/// one entry, as data dirs written before blocks hold them.
pub const BLOCK_VERSION: u8 = 2;
/// Entries a block holds at most.
pub const BLOCK_MAX_ENTRIES: usize = 128;
/// Payload bytes after which a block takes no further entry (an entry as
/// large or larger is a block of its own).
pub const BLOCK_MAX_BYTES: usize = 32 << 10;
/// Replid length byte of an entry whose replid is that of the entry before
/// it in its block (replids are at most [`MAX_REPLID_LEN`] bytes).
const SAME_REPLID: u8 = 0xff;
/// Fixed part of a block before its entries: version, entry count.
const BLOCK_HEADER_LEN: usize = 1 + 4;

/// Whether a block of `count` entries with `payload_bytes` of payload, the
/// last of them `last`, takes `next` too: same partition's next id, within
/// [`BLOCK_MAX_ENTRIES`] and [`BLOCK_MAX_BYTES`].
pub fn block_takes(count: usize, payload_bytes: usize, last: LogId, next: &WalEntry) -> bool {
    count < BLOCK_MAX_ENTRIES && payload_bytes < BLOCK_MAX_BYTES && last.next() == next.log_id
}

/// Encodes a block of entries with consecutive ids, stored under the first
/// one's id, into `out` (cleared first, so that a writer reuses one
/// buffer). `entries` must not be empty.
pub fn encode_block_into<'a>(entries: impl IntoIterator<Item = &'a WalEntry>, out: &mut Vec<u8>) {
    out.clear();
    out.push(BLOCK_VERSION);
    out.extend_from_slice(&[0; 4]);
    let mut first = None;
    let mut count: u32 = 0;
    let mut replid: Option<&str> = None;
    for entry in entries {
        first.get_or_insert(entry.log_id);
        count += 1;
        out.extend_from_slice(&entry.flags.to_be_bytes());
        out.extend_from_slice(&entry.created_unix_ms.to_be_bytes());
        out.extend_from_slice(&entry.bytes_end.to_be_bytes());
        out.extend_from_slice(&entry.source.offset.0.to_be_bytes());
        out.extend_from_slice(&entry.source.db.to_be_bytes());
        if replid == Some(&*entry.source.replid) {
            out.push(SAME_REPLID);
        } else {
            // Callers validate the length against MAX_REPLID_LEN (< 255).
            out.push(entry.source.replid.len() as u8);
            out.extend_from_slice(entry.source.replid.as_bytes());
            replid = Some(&*entry.source.replid);
        }
        // Payload length is bounded by MAX_PAYLOAD_LEN (< 4GiB) at append.
        out.extend_from_slice(&(entry.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&entry.payload);
    }
    out[1..BLOCK_HEADER_LEN].copy_from_slice(&count.to_be_bytes());
    let key = log_key(first.unwrap_or(LogId::ZERO));
    let crc = crc32c::crc32c_append(crc32c::crc32c(&key), out);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// The stored size an entry is accounted for (`bytes_end`, size caps): its
/// size as a value of its own (format 1), whatever block holds it.
pub fn encoded_entry_len(replid_len: usize, payload_len: usize) -> u64 {
    (ENTRY_FIXED_LEN + replid_len + 4 + payload_len + CRC_LEN) as u64
}

/// The id of the last entry of the log value stored under `first`, read
/// from its header without checking it (`None` if the header is not one):
/// for trims, which keep a block while any of its entries is live.
pub fn value_last_id(first: LogId, value: &[u8]) -> Option<LogId> {
    match value.first()? {
        1 => Some(first),
        &BLOCK_VERSION => {
            let count = u32::from_be_bytes(value.get(1..BLOCK_HEADER_LEN)?.try_into().ok()?);
            let more = u64::from(count.checked_sub(1)?);
            Some(LogId(first.0.checked_add(more)?))
        }
        _ => None,
    }
}

/// Decodes and checks the log value stored under `first`: a block of
/// entries, or a single entry (format 1). Calls `visit` with each entry in
/// id order (its payload empty, and where the payload lies in `value`)
/// until it returns false. Readers copy many payloads into one buffer.
pub fn decode_log_value(
    first: LogId,
    value: &[u8],
    mut visit: impl FnMut(WalEntry, std::ops::Range<usize>) -> bool,
) -> Result<(), String> {
    if value.first() != Some(&BLOCK_VERSION) {
        let (entry, payload) = decode_entry_header(first, value)?;
        visit(entry, payload);
        return Ok(());
    }
    let body = unseal_version(&log_key(first), value, BLOCK_VERSION)?;
    let mut cursor = Cursor::new(body);
    let count = cursor.u32("block entry count")?;
    if count == 0 {
        return Err("block of 0 entries".to_string());
    }
    if first.0.checked_add(u64::from(count) - 1).is_none() {
        return Err(format!("block of {count} entries overflows the log ids"));
    }
    // Written once per block: its entries share one copy.
    let mut replid: Option<Arc<str>> = None;
    for index in 0..u64::from(count) {
        let flags = cursor.u16("flags")?;
        let created_unix_ms = cursor.u64("creation time")?;
        let bytes_end = cursor.u64("cumulative size")?;
        let offset = ReplOffset(cursor.u64("source offset")?);
        let db = cursor.u32("source db")?;
        let replid = match cursor.u8("replid length")? {
            SAME_REPLID => replid
                .clone()
                .ok_or_else(|| format!("entry {index} of the block repeats a replid before any"))?,
            len => {
                let len = usize::from(len);
                if len > MAX_REPLID_LEN {
                    return Err(format!("replid length {len} exceeds {MAX_REPLID_LEN}"));
                }
                let own: Arc<str> = std::str::from_utf8(cursor.take(len, "replid")?)
                    .map_err(|_| "replid is not utf-8".to_string())?
                    .into();
                replid = Some(Arc::clone(&own));
                own
            }
        };
        let payload_len = cursor.u32("payload length")? as usize;
        // The body starts after the version byte.
        let start = 1 + cursor.offset;
        cursor.take(payload_len, "payload")?;
        let entry = WalEntry {
            log_id: LogId(first.0 + index),
            flags,
            created_unix_ms,
            bytes_end,
            stored_len: encoded_entry_len(replid.len(), payload_len),
            source: SourcePosition { replid, offset, db },
            payload: Bytes::new(),
        };
        if !visit(entry, start..start + payload_len) {
            return Ok(());
        }
    }
    cursor.finish("block")
}

/// Encodes an entry as a value of its own (format 1, what data dirs
/// written before blocks hold; tests of reading them).
#[cfg(test)]
pub fn encode_entry(entry: &WalEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        ENTRY_FIXED_LEN + entry.source.replid.len() + 4 + entry.payload.len() + CRC_LEN,
    );
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&entry.flags.to_be_bytes());
    out.extend_from_slice(&entry.created_unix_ms.to_be_bytes());
    out.extend_from_slice(&entry.bytes_end.to_be_bytes());
    put_source(&mut out, &entry.source);
    out.extend_from_slice(&(entry.payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&entry.payload);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&log_key(entry.log_id)), &out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes an entry value stored under `log_id` (tests; readers use
/// [`decode_log_value`]).
#[cfg(test)]
pub fn decode_entry(log_id: LogId, value: &[u8]) -> Result<WalEntry, String> {
    let (mut entry, payload) = decode_entry_header(log_id, value)?;
    entry.payload = Bytes::copy_from_slice(&value[payload]);
    Ok(entry)
}

/// Decodes and checks a single-entry value (format 1) stored under
/// `log_id` except for copying its payload: returns the entry with an empty
/// payload and where the payload lies in `value`.
fn decode_entry_header(
    log_id: LogId,
    value: &[u8],
) -> Result<(WalEntry, std::ops::Range<usize>), String> {
    let body = unseal(&log_key(log_id), value)?;
    let mut cursor = Cursor::new(body);
    let flags = cursor.u16("flags")?;
    let created_unix_ms = cursor.u64("creation time")?;
    let bytes_end = cursor.u64("cumulative size")?;
    let source = get_source(&mut cursor)?;
    let payload_len = cursor.u32("payload length")? as usize;
    cursor.take(payload_len, "payload")?;
    cursor.finish("payload")?;
    // The body starts after the version byte.
    let payload_end = 1 + cursor.offset;
    let entry = WalEntry {
        log_id,
        flags,
        created_unix_ms,
        bytes_end,
        stored_len: value.len() as u64,
        source,
        payload: Bytes::new(),
    };
    Ok((entry, payload_end - payload_len..payload_end))
}

pub fn encode_log_meta(partition: PartitionId, meta: &LogMeta) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&meta.first.0.to_be_bytes());
    out.extend_from_slice(&meta.last.0.to_be_bytes());
    out.extend_from_slice(&meta.last_created_unix_ms.to_be_bytes());
    out.extend_from_slice(&meta.bytes_end.to_be_bytes());
    match &meta.source {
        Some(source) => {
            out.push(1);
            put_source(&mut out, source);
        }
        None => out.push(0),
    }
    seal(&meta_key(META_LOG, partition), out)
}

pub fn decode_log_meta(partition: PartitionId, value: &[u8]) -> Result<LogMeta, String> {
    let body = unseal(&meta_key(META_LOG, partition), value)?;
    let mut cursor = Cursor::new(body);
    let first = LogId(cursor.u64("first log id")?);
    let last = LogId(cursor.u64("last log id")?);
    let last_created_unix_ms = cursor.u64("last creation time")?;
    let bytes_end = cursor.u64("cumulative size")?;
    let source = match cursor.u8("source flag")? {
        0 => None,
        1 => Some(get_source(&mut cursor)?),
        other => return Err(format!("bad source flag {other}")),
    };
    cursor.finish("log meta")?;
    if first.0 == 0 || first > last.next() {
        return Err(format!(
            "first log id {first} is not in 1..={}",
            last.next()
        ));
    }
    Ok(LogMeta {
        first,
        last,
        last_created_unix_ms,
        bytes_end,
        source,
    })
}

/// Encodes a single log id (applied or acked) stored under `key`.
pub fn encode_log_id(key: &[u8], log_id: LogId) -> Vec<u8> {
    let mut out = Vec::with_capacity(13);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&log_id.0.to_be_bytes());
    seal(key, out)
}

pub fn decode_log_id(key: &[u8], value: &[u8]) -> Result<LogId, String> {
    let body = unseal(key, value)?;
    let mut cursor = Cursor::new(body);
    let log_id = LogId(cursor.u64("log id")?);
    cursor.finish("log id")?;
    Ok(log_id)
}

pub fn encode_snapshot_state(partition: PartitionId, state: &SnapshotState) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&state.epoch.to_be_bytes());
    out.push(match state.phase {
        SnapshotPhase::Absent => 0,
        SnapshotPhase::Writing => 1,
        SnapshotPhase::Complete => 2,
    });
    seal(&meta_key(META_SNAPSHOT, partition), out)
}

pub fn decode_snapshot_state(
    partition: PartitionId,
    value: &[u8],
) -> Result<SnapshotState, String> {
    let body = unseal(&meta_key(META_SNAPSHOT, partition), value)?;
    let mut cursor = Cursor::new(body);
    let epoch = cursor.u64("snapshot epoch")?;
    let phase = match cursor.u8("snapshot phase")? {
        0 => SnapshotPhase::Absent,
        1 => SnapshotPhase::Writing,
        2 => SnapshotPhase::Complete,
        other => return Err(format!("unknown snapshot phase {other}")),
    };
    cursor.finish("snapshot state")?;
    Ok(SnapshotState { epoch, phase })
}

/// Encodes a history record; callers check `owner` against
/// [`MAX_OWNER_LEN`] first.
pub fn encode_history(partition: PartitionId, history: &PartitionHistory) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + history.owner.len() + 32 + CRC_LEN);
    out.push(FORMAT_VERSION);
    out.push(history.owner.len() as u8);
    out.extend_from_slice(history.owner.as_bytes());
    out.extend_from_slice(&history.incarnation.to_be_bytes());
    out.extend_from_slice(&history.id_base.to_be_bytes());
    out.extend_from_slice(&history.epoch_base.to_be_bytes());
    out.extend_from_slice(&history.log_tag.to_be_bytes());
    seal(&meta_key(META_HISTORY, partition), out)
}

pub fn decode_history(partition: PartitionId, value: &[u8]) -> Result<PartitionHistory, String> {
    let body = unseal(&meta_key(META_HISTORY, partition), value)?;
    let mut cursor = Cursor::new(body);
    let owner_len = usize::from(cursor.u8("owner length")?);
    if owner_len > MAX_OWNER_LEN {
        return Err(format!("owner length {owner_len} exceeds {MAX_OWNER_LEN}"));
    }
    let owner = std::str::from_utf8(cursor.take(owner_len, "owner")?)
        .map_err(|_| "owner is not utf-8".to_string())?
        .to_string();
    let history = PartitionHistory {
        owner,
        incarnation: cursor.u64("incarnation")?,
        id_base: cursor.u64("id base")?,
        epoch_base: cursor.u64("epoch base")?,
        log_tag: cursor.u64("log tag")?,
    };
    cursor.finish("history")?;
    Ok(history)
}

pub fn encode_snapshot_chunk(epoch: u64, seq: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + data.len() + CRC_LEN);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(data);
    seal(&snap_key(epoch, seq), out)
}

pub fn decode_snapshot_chunk(epoch: u64, seq: u64, value: &[u8]) -> Result<Bytes, String> {
    Ok(Bytes::copy_from_slice(unseal(
        &snap_key(epoch, seq),
        value,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_entry() -> WalEntry {
        WalEntry {
            log_id: LogId(42),
            flags: 3,
            created_unix_ms: 1_700_000_000_000,
            bytes_end: 1234,
            stored_len: 0,
            source: SourcePosition {
                replid: "8f3c".repeat(10).into(),
                offset: ReplOffset(99),
                db: 2,
            },
            payload: Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"),
        }
    }

    #[test]
    fn entry_round_trips_and_len_is_predicted() {
        let entry = sample_entry();
        let value = encode_entry(&entry);
        assert_eq!(
            value.len() as u64,
            encoded_entry_len(entry.source.replid.len(), entry.payload.len())
        );
        let back = decode_entry(LogId(42), &value).unwrap();
        assert_eq!(back.stored_len, value.len() as u64);
        assert_eq!(
            WalEntry {
                stored_len: 0,
                ..back
            },
            entry
        );
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let value = encode_entry(&sample_entry());
        for index in 0..value.len() {
            let mut bad = value.clone();
            bad[index] ^= 0x40;
            assert!(decode_entry(LogId(42), &bad).is_err(), "flip at {index}");
        }
        // The same bytes under another key are rejected too.
        let err = decode_entry(LogId(43), &value).unwrap_err();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn truncations_are_errors_not_panics() {
        let value = encode_entry(&sample_entry());
        for len in 0..value.len() {
            assert!(decode_entry(LogId(42), &value[..len]).is_err());
        }
    }

    /// Three entries with consecutive ids, the last with another replid.
    fn sample_block() -> Vec<WalEntry> {
        let mut entries = vec![sample_entry(), sample_entry(), sample_entry()];
        entries[2].source.replid = "other".into();
        for (index, entry) in entries.iter_mut().enumerate() {
            entry.log_id = LogId(42 + index as u64);
            entry.payload = Bytes::from(vec![index as u8; index * 3]);
            entry.stored_len = encoded_entry_len(entry.source.replid.len(), entry.payload.len());
        }
        entries
    }

    fn decode_block(first: LogId, value: &[u8]) -> Result<Vec<WalEntry>, String> {
        let mut entries = Vec::new();
        decode_log_value(first, value, |mut entry, payload| {
            entry.payload = Bytes::copy_from_slice(&value[payload]);
            entries.push(entry);
            true
        })?;
        Ok(entries)
    }

    #[test]
    fn blocks_round_trip_and_name_their_last_id() {
        let entries = sample_block();
        let mut value = Vec::new();
        encode_block_into(&entries, &mut value);
        assert_eq!(decode_block(LogId(42), &value).unwrap(), entries);
        assert_eq!(value_last_id(LogId(42), &value), Some(LogId(44)));
        // The replid of the second entry is stored once, for both.
        let replids = value
            .windows(entries[0].source.replid.len())
            .filter(|w| *w == entries[0].source.replid.as_bytes())
            .count();
        assert_eq!(replids, 1);
        // A single entry of format 1 decodes through the same call.
        let single = encode_entry(&entries[0]);
        assert_eq!(value_last_id(LogId(42), &single), Some(LogId(42)));
        let back = decode_block(LogId(42), &single).unwrap();
        assert_eq!(
            back,
            vec![WalEntry {
                stored_len: single.len() as u64,
                ..entries[0].clone()
            }]
        );
        // A visitor that stops early gets no more entries.
        let mut seen = 0;
        decode_log_value(LogId(42), &value, |_, _| {
            seen += 1;
            false
        })
        .unwrap();
        assert_eq!(seen, 1);
    }

    #[test]
    fn damaged_blocks_are_errors_not_panics() {
        let mut value = Vec::new();
        encode_block_into(&sample_block(), &mut value);
        for index in 0..value.len() {
            let mut bad = value.clone();
            bad[index] ^= 0x40;
            assert!(decode_block(LogId(42), &bad).is_err(), "flip at {index}");
        }
        for len in 0..value.len() {
            assert!(
                decode_block(LogId(42), &value[..len]).is_err(),
                "cut at {len}"
            );
        }
        let err = decode_block(LogId(43), &value).unwrap_err();
        assert!(err.contains("checksum"), "{err}");
        assert_eq!(value_last_id(LogId(42), &[]), None);
        assert_eq!(value_last_id(LogId(42), &[BLOCK_VERSION, 0, 0, 0, 0]), None);
        assert_eq!(
            value_last_id(LogId(u64::MAX), &[BLOCK_VERSION, 0, 0, 0, 2]),
            None
        );
    }

    #[test]
    fn meta_records_round_trip() {
        let partition = PartitionId(7);
        let meta = LogMeta {
            first: LogId(3),
            last: LogId(10),
            last_created_unix_ms: 5,
            bytes_end: 77,
            source: Some(sample_entry().source),
        };
        let value = encode_log_meta(partition, &meta);
        assert_eq!(decode_log_meta(partition, &value).unwrap(), meta);
        assert!(decode_log_meta(PartitionId(8), &value).is_err());

        let key = downstream_key(partition, &DownstreamId::new("drainer-1").unwrap());
        let value = encode_log_id(&key, LogId(9));
        assert_eq!(decode_log_id(&key, &value).unwrap(), LogId(9));

        let state = SnapshotState {
            epoch: 4,
            phase: SnapshotPhase::Complete,
        };
        let value = encode_snapshot_state(partition, &state);
        assert_eq!(decode_snapshot_state(partition, &value).unwrap(), state);

        let history = PartitionHistory {
            owner: "listener-1".into(),
            incarnation: 0x0123_4567_89ab_cdef,
            id_base: 500,
            epoch_base: 3,
            log_tag: 77,
        };
        let value = encode_history(partition, &history);
        assert_eq!(decode_history(partition, &value).unwrap(), history);
        assert!(decode_history(PartitionId(8), &value).is_err());
        for len in 0..value.len() {
            assert!(decode_history(partition, &value[..len]).is_err());
        }

        let value = encode_snapshot_chunk(4, 1, b"chunk");
        assert_eq!(&decode_snapshot_chunk(4, 1, &value).unwrap()[..], b"chunk");
        assert!(decode_snapshot_chunk(4, 2, &value).is_err());
    }

    #[test]
    fn cf_names_parse_back() {
        assert_eq!(
            parse_cf_name(&log_cf_name(PartitionId(12))),
            Some((PartitionId(12), true))
        );
        assert_eq!(
            parse_cf_name(&snap_cf_name(PartitionId(0))),
            Some((PartitionId(0), false))
        );
        assert_eq!(parse_cf_name("meta"), None);
        assert_eq!(parse_cf_name("p.log"), None);
        assert_eq!(parse_cf_name("p99999999999.log"), None);
    }
}
