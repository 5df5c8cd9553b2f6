//! The durable write-ahead log of a ferry process (listener or drainer).
//!
//! In: entries to append per partition (opaque payload bytes plus the source
//! position they came from), acks from downstreams, applied marks, snapshot
//! chunks. Out: durable [`LogId`]s (an `append` resolves only after its batch
//! was fsynced), entry ranges read back for shipping or applying, per-partition
//! positions, and typed errors for corrupt or trimmed data.
//!
//! # Layers
//!
//! - [`Wal`] (in `writer.rs`): the handle the rest of ferry uses. All
//!   mutations go through one group-commit writer task that collects requests
//!   from many partitions (for up to `group-commit-linger` or
//!   `group-commit-max-bytes`), validates them against the positions, writes
//!   them as one atomic batch with `sync = true` and only then resolves each
//!   request. It stalls while RocksDB's memtables hold more than twice
//!   `memtable-budget` (flushes lagging behind appends). A retention task
//!   trims acked and expired entries.
//!   After each batch that appended entries it bumps a counter that
//!   readers which caught up wait on ([`Wal::subscribe_appends`]).
//! - [`WalStorage`] (in `storage.rs`): the narrow storage boundary (atomic
//!   write of a batch of [`WriteOp`]s, read a range, load progress).
//!   [`RocksWalStorage`] is the real one, [`MemWalStorage`] the in-memory one
//!   used by unit and model tests. Both store the same encoded bytes.
//!
//! # Positions
//!
//! Per partition: `received` (ids assigned to appends the writer has taken but
//! not yet made durable), `durable` (last id whose batch was fsynced; the
//! `last` of the log meta), `acked` (per registered downstream: the last id it
//! made durable on its side) and `applied` (last id applied to the sink, used
//! by the drainer). The writer enforces
//! `acked <= durable <= received` and `applied <= durable`: acking or applying
//! past `durable` is [`WalError::AckBeyondDurable`] /
//! [`WalError::ApplyBeyondDurable`]. On a drainer, which acks upstream only
//! what it made durable and applies from its own WAL, `applied <= durable`
//! holds likewise. Acks and applied marks never move backwards (a stale one is
//! a no-op). Readers only ever see durable entries.
//!
//! # On-disk format
//!
//! One RocksDB instance per data dir. Column families:
//!
//! - `p<id>.log` (one per partition, `<id>` decimal): blocks of entries. A
//!   run of one partition's consecutive entries in one write batch is stored
//!   as blocks of at most 128 entries (a block takes no further entry once
//!   its payloads reach 32 KiB), each under the id of its first entry as 8
//!   bytes big-endian (so RocksDB's bytewise order is log order); value:
//!
//!   ```text
//!   u8  version (2)
//!   u32 count            entries in the block (>= 1), ids key..key+count-1
//!   per entry:
//!     u16 flags            caller-defined, stored and returned untouched
//!     u64 created_unix_ms  creation time, non-decreasing within a partition
//!     u64 bytes_end        cumulative accounted bytes of the partition's log
//!                          including this entry (size accounting without scans)
//!     u64 source offset    replication offset after this entry
//!     u32 source db        selected db at this entry
//!     u8  replid length (<= 64), then the replid bytes (utf-8); or 0xff:
//!         the replid of the entry before it in the block
//!     u32 payload length, then the payload (opaque to the WAL)
//!   u32 crc32c over (key ++ everything above)
//!   ```
//!
//!   A value of version 1 (data dirs written before blocks) is one entry:
//!   `u8 version (1)`, the fields of one entry above with its replid always
//!   spelled out, and the crc32c. Both are read; only blocks are written.
//!   An entry is accounted (`bytes_end`, `partition-size-cap`) for its size
//!   as a version-1 value, whatever block holds it. Why blocks: RocksDB's
//!   costs are mostly per key (the write batch, the memtable's skip list,
//!   flushes, iterator steps); a key per entry made them the largest part
//!   of a busy listener's CPU (benches/README.md, "Issue 13, third round").
//!
//!   All integers are big-endian. A value whose checksum, version or lengths
//!   do not match is [`WalError::Corrupt`] naming the partition and the log
//!   id it is stored under (a block's first id, whichever entry was read).
//! - `p<id>.snap`: key = snapshot epoch (u64 BE) ++ chunk sequence (u64 BE);
//!   value = `u8 version, chunk bytes, u32 crc32c(key ++ version ++ bytes)`.
//! - `meta`: one record per partition and kind, every value
//!   `u8 version, body, u32 crc32c(key ++ version ++ body)`:
//!   - `'L' ++ partition u32 BE` → log meta: first available id, last durable
//!     id, last creation time, cumulative bytes, source position of the last
//!     entry (replid, offset, db) if any.
//!   - `'A' ++ partition` → applied log id.
//!   - `'D' ++ partition ++ downstream id bytes` → acked log id of that
//!     downstream (registered downstreams hold back retention).
//!   - `'S' ++ partition` → snapshot epoch and phase (absent/writing/complete).
//!   - `'H' ++ partition` → the partition's history ([`PartitionHistory`]):
//!     u8 owner length (<= 64), the owner (utf-8), then u64 incarnation,
//!     u64 id base, u64 epoch base, u64 log tag. Written with the first
//!     use of the partition ([`Wal::open_history`], [`Wal::follow_history`])
//!     and, on a drainer, in the same batch as the reset that makes the
//!     partition follow another history ([`Wal::reset_partition`]).
//!     Data dirs written before it existed have none: the record is created
//!     on first use (module doc of `ship`, "History"). An older binary
//!     refuses a dir holding one ("unknown meta tag 0x48").
//! - `default`: unused (RocksDB requires it).
//!
//! # Recovery invariants
//!
//! 1. Entries and the log meta describing them are written in the same
//!    RocksDB `WriteBatch`, which RocksDB's own WAL applies atomically after a
//!    crash (`PointInTime` recovery). So after any crash `meta.last` is
//!    exactly the greatest stored entry id: never ahead of the entries, never
//!    behind them.
//! 2. Trims (and resets) write only the meta update of `first`: stored ids
//!    below `meta.first` are garbage, never read and ignored by recovery;
//!    entries in `[first, last]` are all present. A block holding `first`
//!    stays whole until all of its entries are below `first`. Garbage is dropped only
//!    after the batch that raised `first` is durable and published to
//!    readers ([`WalStorage::release_trimmed`]: whole SST files at once, a
//!    compaction filter for the rest), so a crash can leave garbage behind
//!    but never a hole at or above `first`. Range tombstones are avoided on
//!    purpose: they overlap older files, so compactions of a log with a
//!    backlog merged and rewrote files instead of moving them down; without
//!    them the flushed files of a log (keys only grow) stay disjoint.
//!    Format note: until this change (same format version 1) trims wrote a
//!    `delete_range` and the invariant was `meta.first == smallest stored
//!    id`. Data written either way satisfies the new check, so old data
//!    dirs open unchanged; an older binary refuses a dir holding garbage
//!    below `first` ([`WalError::Inconsistent`], "smallest stored entry").
//! 3. An `append` resolves only after the batch containing it was written with
//!    fsync, so every acknowledged id survives a crash; appends after a
//!    restart continue at `last + 1`.
//! 4. `Wal::open` checks 1 and 2 against the stored keys (the smallest
//!    stored id at or after `first` is `first`, the greatest stored id is
//!    `last`; nothing at or after `first` for an empty log) and refuses to
//!    start ([`WalError::Inconsistent`]) if they do not hold. It then
//!    releases the garbage below `first`.
//! 5. After a failed write the WAL is poisoned: everything fails with
//!    [`WalError::Poisoned`] until the process reopens it, because the state
//!    of a failed fsync is unknown.
//! 6. Ids are dense: [`Wal::append`] takes the ids after `last`;
//!    [`Wal::append_at`] (a drainer mirroring its listener's ids) must name
//!    exactly `last + 1` ([`WalError::NotContiguous`] otherwise). The only
//!    jump is [`Wal::reset_partition`] (a snapshot marker at `start`): in one
//!    batch it sets `first = start` (the old `[first, last]` become garbage,
//!    invariant 2) and stores the marker as entry `start`, so the log is
//!    never seen empty without its marker. `start` must be past `last` ([`WalError::ResetBehindLog`]):
//!    durable only moves forward, and acked/applied marks (all `<= last`)
//!    stay below it without moving backwards.
//!
//! # Retention
//!
//! An entry is kept until every downstream registered on its partition acked
//! it, but never longer than `wal-ttl` (by creation time) nor beyond
//! `partition-size-cap`. Reading below the first available id is
//! [`WalError::Trimmed`], so the caller can fall back to a snapshot. On a
//! drainer the appliers are the downstreams (they ack what they applied).
//!
//! # Snapshot epochs
//!
//! Chunks stay until their owner deletes them: [`Wal::collect_snapshots`]
//! deletes every stored epoch a caller-given rule does not keep, except
//! those pinned in memory by a reader ([`Wal::pin_snapshot`]). The rules
//! (listener: epochs in progress, the latest two, the latest logged
//! marker's; drainer: what the log's first marker or an unfinished load
//! needs) live in `listener/snapshot.rs` and `apply/mod.rs` and are
//! summarised in docs/wal.md. Readers treat missing chunks as gone, never
//! as corruption, so a deletion racing a read costs a retry, not data.

mod codec;
pub mod config;
pub mod metrics;
mod rocks;
mod storage;
mod tail;
mod writer;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::position::{LogId, PartitionId, ReplOffset};

pub use config::{WalConfig, WalConfigError};
pub use metrics::WalMetrics;
pub use rocks::RocksWalStorage;
pub use storage::{MemWalStorage, StoredPartition, WalStorage, WriteOp};
pub use writer::{PendingAppend, SnapshotPin, Wal};

/// Longest replication id stored (Redis uses 40 hex characters).
pub const MAX_REPLID_LEN: usize = 64;
/// Largest payload of one entry. Bigger replication entries must be split by
/// the caller; this keeps one corrupt length from asking for gigabytes.
pub const MAX_PAYLOAD_LEN: usize = 64 << 20;
/// Longest downstream id.
pub const MAX_DOWNSTREAM_ID_LEN: usize = 64;

/// Where in the source's replication stream an entry came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SourcePosition {
    /// The source master's replication id. Shared: every entry of a stream
    /// carries the same one, and a clone per entry (listener, WAL reads, read
    /// tail) is a reference count, not an allocation.
    pub replid: Arc<str>,
    /// The replication offset after this entry.
    pub offset: ReplOffset,
    /// The db selected at this entry.
    pub db: u32,
}

impl fmt::Display for SourcePosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} db{}", self.replid, self.offset, self.db)
    }
}

/// An entry handed to [`Wal::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// Caller-defined flags, stored and returned untouched.
    pub flags: u16,
    /// Creation time in unix ms; `None` stamps the time of the append. The
    /// WAL raises it to the previous entry's time if it is earlier, so that
    /// creation times never decrease within a partition (TTL trimming
    /// relies on it).
    pub created_unix_ms: Option<u64>,
    pub source: SourcePosition,
    /// The serialized replication entry; opaque to the WAL.
    pub payload: Bytes,
}

impl NewEntry {
    /// An entry stamped with the append time and no flags.
    pub fn new(source: SourcePosition, payload: Bytes) -> NewEntry {
        NewEntry {
            flags: 0,
            created_unix_ms: None,
            source,
            payload,
        }
    }
}

/// An entry as stored and read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalEntry {
    pub log_id: LogId,
    pub flags: u16,
    pub created_unix_ms: u64,
    /// Cumulative stored bytes of the partition's log up to and including
    /// this entry.
    pub bytes_end: u64,
    /// Size of the stored value (0 before it is stored).
    pub stored_len: u64,
    pub source: SourcePosition,
    pub payload: Bytes,
}

/// The ids given to one append: `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendedRange {
    pub first: LogId,
    pub last: LogId,
}

/// Name of a consumer of a partition (a drainer, or a drainer's applier),
/// 1 to 64 bytes of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DownstreamId(String);

impl DownstreamId {
    pub fn new(id: impl Into<String>) -> Result<DownstreamId, WalError> {
        let id = id.into();
        let valid_char =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
        if id.is_empty() || id.len() > MAX_DOWNSTREAM_ID_LEN || !id.bytes().all(valid_char) {
            return Err(WalError::InvalidDownstreamId(id));
        }
        Ok(DownstreamId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DownstreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Stored state of a partition's log (the `'L'` meta record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogMeta {
    /// First available id (everything before it was trimmed).
    pub first: LogId,
    /// Last durable id (`LogId::ZERO` if nothing was ever appended).
    pub last: LogId,
    pub last_created_unix_ms: u64,
    /// Cumulative stored bytes up to and including `last`.
    pub bytes_end: u64,
    /// Source position of entry `last`.
    pub source: Option<SourcePosition>,
}

impl Default for LogMeta {
    fn default() -> Self {
        LogMeta {
            first: LogId(1),
            last: LogId::ZERO,
            last_created_unix_ms: 0,
            bytes_end: 0,
            source: None,
        }
    }
}

/// Which history a partition's log holds: whose log it is and which
/// incarnation of it, so that a log rebuilt from scratch, or a drainer fed
/// by another listener's log, is never mistaken for the one it replaced
/// (`ship` module doc, "History").
///
/// On a listener the record describes its own log: `owner` is the listener
/// id that created it, `incarnation` a random id given at creation (a WAL
/// dir deleted and started again gets a new one), the bases are 0. On a
/// drainer it describes the log it mirrors: the listener id that claimed
/// the partition (no other listener may ship to it), the incarnation of that
/// listener's log it holds (0: none yet), and how its ids and snapshot
/// epochs map to the listener's (local = listener + base; 0 until the
/// partition had to follow a new history whose ids lie below its own).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionHistory {
    /// The listener id the log belongs to (empty: not claimed yet).
    pub owner: String,
    /// Incarnation of the owner's log (0: none yet).
    pub incarnation: u64,
    /// Local log id = listener log id + `id_base`.
    pub id_base: u64,
    /// Local snapshot epoch = listener epoch + `epoch_base`.
    pub epoch_base: u64,
    /// Random id of this WAL's own log of the partition, created with the
    /// record and never changed (its ids only ever grow): the applier's
    /// checkpoint names it, so a target is never resumed against another
    /// WAL's log ids.
    pub log_tag: u64,
}

/// Longest owner (listener id) in a [`PartitionHistory`].
pub const MAX_OWNER_LEN: usize = 64;

/// A random non-zero u64 (an incarnation or a log tag): 64 bits from the
/// standard library's randomly keyed hasher, mixed with the time, the pid
/// and a counter. Not for secrets; distinct ids are all it must give.
pub fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        hasher.write_u32(std::process::id());
        let id = hasher.finish();
        if id != 0 {
            return id;
        }
    }
}

/// Phase of a partition's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotPhase {
    #[default]
    Absent,
    /// Chunks are being written; not usable yet.
    Writing,
    /// All chunks of the epoch are stored.
    Complete,
}

/// Snapshot epoch and phase of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotState {
    pub epoch: u64,
    pub phase: SnapshotPhase,
}

/// The positions of one partition (see the module doc for their order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPositions {
    /// First id still stored; `first_available > durable` means empty.
    pub first_available: LogId,
    /// Last id handed out to an append (durable or being written).
    pub received: LogId,
    /// Last id made durable.
    pub durable: LogId,
    /// Last id applied to the sink.
    pub applied: LogId,
    /// Last id acked, per registered downstream.
    pub acked: Vec<(DownstreamId, LogId)>,
    /// Source position of the last durable entry.
    pub source: Option<SourcePosition>,
    /// Stored bytes of the entries `first_available..=durable`.
    pub stored_bytes: u64,
    pub snapshot: SnapshotState,
    /// The partition's history record, if it has one.
    pub history: Option<PartitionHistory>,
}

/// Bounds of one read: it stops after `max_entries` entries or once
/// `max_bytes` of payload were collected (at least one entry is returned if
/// any is available, so an oversize entry still makes progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_entries: 1024,
            max_bytes: 4 << 20,
        }
    }
}

/// Errors at the WAL boundary.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] WalConfigError),
    #[error("corrupt entry {log_id} in partition {partition}: {what}")]
    Corrupt {
        partition: PartitionId,
        log_id: LogId,
        what: String,
    },
    #[error("corrupt meta record for partition {partition}: {what}")]
    CorruptMeta {
        partition: PartitionId,
        what: String,
    },
    #[error("corrupt snapshot chunk {epoch}/{seq} in partition {partition}: {what}")]
    CorruptSnapshot {
        partition: PartitionId,
        epoch: u64,
        seq: u64,
        what: String,
    },
    #[error("partition {partition} is inconsistent: {what}")]
    Inconsistent {
        partition: PartitionId,
        what: String,
    },
    #[error(
        "partition {partition}: entry {wanted} was trimmed, first available is {first_available}"
    )]
    Trimmed {
        partition: PartitionId,
        wanted: LogId,
        first_available: LogId,
    },
    #[error("partition {partition}: downstream {downstream} acked {ack} beyond durable {durable}")]
    AckBeyondDurable {
        partition: PartitionId,
        downstream: DownstreamId,
        ack: LogId,
        durable: LogId,
    },
    #[error("partition {partition}: applied {applied} beyond durable {durable}")]
    ApplyBeyondDurable {
        partition: PartitionId,
        applied: LogId,
        durable: LogId,
    },
    #[error("partition {partition}: trim to {before} beyond durable {durable}")]
    TrimBeyondDurable {
        partition: PartitionId,
        before: LogId,
        durable: LogId,
    },
    #[error("partition {partition}: downstream {downstream} is not registered")]
    UnknownDownstream {
        partition: PartitionId,
        downstream: DownstreamId,
    },
    #[error("partition {partition}: invalid entry: {what}")]
    InvalidEntry {
        partition: PartitionId,
        what: String,
    },
    #[error("partition {partition}: append at {got} but the next id is {expected}")]
    NotContiguous {
        partition: PartitionId,
        expected: LogId,
        got: LogId,
    },
    #[error("partition {partition}: invalid history: {what}")]
    InvalidHistory {
        partition: PartitionId,
        what: String,
    },
    #[error("partition {partition}: reset to start at {start} but ids up to {last} are taken")]
    ResetBehindLog {
        partition: PartitionId,
        start: LogId,
        last: LogId,
    },
    #[error("invalid downstream id {0:?}")]
    InvalidDownstreamId(String),
    #[error("wal is poisoned by an earlier failed write: {0}")]
    Poisoned(String),
    #[error("wal is closed")]
    Closed,
}
