//! The storage boundary of the WAL: [`WalStorage`], and [`MemWalStorage`],
//! the in-memory implementation used by unit and model tests.
//!
//! In: batches of [`WriteOp`]s that must be applied atomically (and durably
//! when `sync`). Out: entry ranges, snapshot chunks and the stored progress of
//! every partition. The storage does not validate positions: [`super::Wal`]
//! does, and is the only writer.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;

use super::codec;
use super::{
    DownstreamId, LogMeta, PartitionHistory, ReadLimits, SnapshotState, WalEntry, WalError,
};
use crate::position::{LogId, PartitionId};

/// One mutation of a write batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Store an entry under `entry.log_id`.
    Entry {
        partition: PartitionId,
        entry: WalEntry,
    },
    /// Replace the partition's log meta.
    LogMeta {
        partition: PartitionId,
        meta: LogMeta,
    },
    Applied {
        partition: PartitionId,
        log_id: LogId,
    },
    /// Register (or move) a downstream's ack.
    Ack {
        partition: PartitionId,
        downstream: DownstreamId,
        log_id: LogId,
    },
    RemoveDownstream {
        partition: PartitionId,
        downstream: DownstreamId,
    },
    SnapshotChunk {
        partition: PartitionId,
        epoch: u64,
        seq: u64,
        data: Bytes,
    },
    SnapshotState {
        partition: PartitionId,
        state: SnapshotState,
    },
    /// Delete every chunk of `epoch`.
    DeleteSnapshot { partition: PartitionId, epoch: u64 },
    /// Replace the partition's history record.
    History {
        partition: PartitionId,
        history: PartitionHistory,
    },
}

/// Everything stored about one partition except its entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredPartition {
    pub partition: PartitionId,
    pub log: LogMeta,
    pub applied: LogId,
    pub acks: BTreeMap<DownstreamId, LogId>,
    pub snapshot: SnapshotState,
    pub history: Option<PartitionHistory>,
}

/// Durable storage of entries, snapshot chunks and progress.
pub trait WalStorage: Send + Sync + 'static {
    /// Applies `ops` atomically: after a crash either all of them or none are
    /// visible. With `sync`, returns only once they are on stable storage.
    fn write(&self, ops: &[WriteOp], sync: bool) -> Result<(), WalError>;

    /// Entries of `partition` with ids in `from..=to`, in order, within
    /// `limits`. Missing ids are skipped (the caller checks trims).
    fn read_entries(
        &self,
        partition: PartitionId,
        from: LogId,
        to: LogId,
        limits: ReadLimits,
    ) -> Result<Vec<WalEntry>, WalError>;

    /// The smallest and greatest entry ids stored for `partition` at or
    /// after `from` (ids below `from` are ignored: below the log's first id
    /// they are garbage awaiting [`WalStorage::release_trimmed`]). Used at
    /// open to check the recovery invariants.
    fn stored_bounds(
        &self,
        partition: PartitionId,
        from: LogId,
    ) -> Result<Option<(LogId, LogId)>, WalError>;

    /// Called once `below` is the partition's first id in a durably written
    /// log meta and published to readers (after a trim or a reset, and at
    /// open): the storage may now drop every stored entry with an id below
    /// `below`, whenever it likes. Trims write nothing but the meta, so
    /// until then (and after a crash before it) those entries stay stored
    /// as garbage, which readers never ask for and recovery ignores.
    fn release_trimmed(&self, partition: PartitionId, below: LogId) -> Result<(), WalError>;

    /// Partitions that have a log in storage (possibly empty), so that
    /// recovery also checks logs whose meta record is missing.
    fn log_partitions(&self) -> Result<Vec<PartitionId>, WalError>;

    /// Chunks `from_seq..` of snapshot `epoch`, at most `max_chunks`.
    fn read_snapshot_chunks(
        &self,
        partition: PartitionId,
        epoch: u64,
        from_seq: u64,
        max_chunks: usize,
    ) -> Result<Vec<(u64, Bytes)>, WalError>;

    /// Epochs of `partition` that have at least one stored chunk, ascending.
    fn snapshot_epochs(&self, partition: PartitionId) -> Result<Vec<u64>, WalError>;

    /// The stored progress of every partition that has any.
    fn load_progress(&self) -> Result<Vec<StoredPartition>, WalError>;

    /// Bytes of write buffers not yet flushed, for write stalls (0 where the
    /// storage has no such buffers).
    fn buffered_bytes(&self) -> Result<u64, WalError> {
        Ok(0)
    }

    /// Background errors the storage engine has hit so far (RocksDB's
    /// `rocksdb.background-errors`: a flush or compaction that failed, e.g.
    /// for lack of space); 0 where there are none to report.
    fn background_errors(&self) -> Result<u64, WalError> {
        Ok(0)
    }
}

/// Decodes stored meta records (shared by both implementations so that they
/// report corruption identically).
pub(crate) fn decode_meta_records<'a>(
    records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Vec<StoredPartition>, WalError> {
    let mut partitions: BTreeMap<PartitionId, StoredPartition> = BTreeMap::new();
    for (key, value) in records {
        let (tag, partition, rest) =
            codec::parse_meta_key(key).map_err(|what| WalError::CorruptMeta {
                partition: PartitionId(0),
                what,
            })?;
        let corrupt = |what: String| WalError::CorruptMeta { partition, what };
        let stored = partitions
            .entry(partition)
            .or_insert_with(|| StoredPartition {
                partition,
                ..StoredPartition::default()
            });
        match tag {
            codec::META_LOG => {
                stored.log = codec::decode_log_meta(partition, value).map_err(corrupt)?
            }
            codec::META_APPLIED => {
                stored.applied = codec::decode_log_id(key, value).map_err(corrupt)?
            }
            codec::META_SNAPSHOT => {
                stored.snapshot = codec::decode_snapshot_state(partition, value).map_err(corrupt)?
            }
            codec::META_HISTORY => {
                stored.history = Some(codec::decode_history(partition, value).map_err(corrupt)?)
            }
            codec::META_DOWNSTREAM => {
                let name = std::str::from_utf8(rest)
                    .map_err(|_| corrupt("downstream id is not utf-8".into()))?;
                let downstream = DownstreamId::new(name)
                    .map_err(|_| corrupt(format!("bad downstream id {name:?}")))?;
                let acked = codec::decode_log_id(key, value).map_err(corrupt)?;
                stored.acks.insert(downstream, acked);
            }
            other => return Err(corrupt(format!("unknown meta tag {other:#04x}"))),
        }
    }
    Ok(partitions.into_values().collect())
}

/// Collects entries of one read, in order, within its limits.
pub(crate) struct EntryCollector {
    partition: PartitionId,
    to: LogId,
    limits: ReadLimits,
    payload_bytes: usize,
    /// Entries read, with the range of their payload in `payloads`.
    entries: Vec<(WalEntry, std::ops::Range<usize>)>,
    /// Every payload of the read, copied out of the storage once: one
    /// allocation per read instead of one per entry.
    payloads: Vec<u8>,
}

impl EntryCollector {
    pub(crate) fn new(partition: PartitionId, to: LogId, limits: ReadLimits) -> Self {
        EntryCollector {
            partition,
            to,
            limits,
            payload_bytes: 0,
            entries: Vec::new(),
            payloads: Vec::new(),
        }
    }

    /// Whether the read is complete before looking at `log_id`.
    pub(crate) fn is_done(&self, log_id: LogId) -> bool {
        log_id > self.to
            || self.entries.len() >= self.limits.max_entries
            || (!self.entries.is_empty() && self.payload_bytes >= self.limits.max_bytes)
    }

    pub(crate) fn push(&mut self, log_id: LogId, value: &[u8]) -> Result<(), WalError> {
        let (entry, payload) =
            codec::decode_entry_header(log_id, value).map_err(|what| WalError::Corrupt {
                partition: self.partition,
                log_id,
                what,
            })?;
        let start = self.payloads.len();
        self.payloads.extend_from_slice(&value[payload]);
        self.payload_bytes += self.payloads.len() - start;
        self.entries.push((entry, start..self.payloads.len()));
        Ok(())
    }

    pub(crate) fn finish(self) -> Vec<WalEntry> {
        let payloads = Bytes::from(self.payloads);
        self.entries
            .into_iter()
            .map(|(mut entry, range)| {
                entry.payload = payloads.slice(range);
                entry
            })
            .collect()
    }
}

#[derive(Default)]
struct MemState {
    logs: BTreeMap<PartitionId, BTreeMap<LogId, Vec<u8>>>,
    snapshots: BTreeMap<PartitionId, BTreeMap<(u64, u64), Vec<u8>>>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// In-memory [`WalStorage`] holding the same encoded bytes as RocksDB would.
/// Not durable; `sync` is ignored.
#[derive(Default)]
pub struct MemWalStorage {
    state: Mutex<MemState>,
}

impl MemWalStorage {
    pub fn new() -> MemWalStorage {
        MemWalStorage::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        // Ops never panic midway, so a poisoned lock still guards whole maps.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Overwrites the stored bytes of an entry (tests of corruption).
    pub fn overwrite_raw_entry(&self, partition: PartitionId, log_id: LogId, value: Vec<u8>) {
        self.lock()
            .logs
            .entry(partition)
            .or_default()
            .insert(log_id, value);
    }
}

fn apply_op(state: &mut MemState, op: &WriteOp) {
    match op {
        WriteOp::Entry { partition, entry } => {
            state
                .logs
                .entry(*partition)
                .or_default()
                .insert(entry.log_id, codec::encode_entry(entry));
        }
        WriteOp::LogMeta { partition, meta } => {
            state.meta.insert(
                codec::meta_key(codec::META_LOG, *partition),
                codec::encode_log_meta(*partition, meta),
            );
        }
        WriteOp::Applied { partition, log_id } => {
            let key = codec::meta_key(codec::META_APPLIED, *partition);
            let value = codec::encode_log_id(&key, *log_id);
            state.meta.insert(key, value);
        }
        WriteOp::Ack {
            partition,
            downstream,
            log_id,
        } => {
            let key = codec::downstream_key(*partition, downstream);
            let value = codec::encode_log_id(&key, *log_id);
            state.meta.insert(key, value);
        }
        WriteOp::RemoveDownstream {
            partition,
            downstream,
        } => {
            state
                .meta
                .remove(&codec::downstream_key(*partition, downstream));
        }
        WriteOp::SnapshotChunk {
            partition,
            epoch,
            seq,
            data,
        } => {
            state.snapshots.entry(*partition).or_default().insert(
                (*epoch, *seq),
                codec::encode_snapshot_chunk(*epoch, *seq, data),
            );
        }
        WriteOp::SnapshotState {
            partition,
            state: snapshot,
        } => {
            state.meta.insert(
                codec::meta_key(codec::META_SNAPSHOT, *partition),
                codec::encode_snapshot_state(*partition, snapshot),
            );
        }
        WriteOp::DeleteSnapshot { partition, epoch } => {
            if let Some(chunks) = state.snapshots.get_mut(partition) {
                chunks.retain(|(chunk_epoch, _), _| chunk_epoch != epoch);
            }
        }
        WriteOp::History { partition, history } => {
            state.meta.insert(
                codec::meta_key(codec::META_HISTORY, *partition),
                codec::encode_history(*partition, history),
            );
        }
    }
}

impl WalStorage for MemWalStorage {
    fn write(&self, ops: &[WriteOp], _sync: bool) -> Result<(), WalError> {
        let mut state = self.lock();
        for op in ops {
            apply_op(&mut state, op);
        }
        Ok(())
    }

    fn read_entries(
        &self,
        partition: PartitionId,
        from: LogId,
        to: LogId,
        limits: ReadLimits,
    ) -> Result<Vec<WalEntry>, WalError> {
        let state = self.lock();
        let Some(log) = state.logs.get(&partition) else {
            return Ok(Vec::new());
        };
        let mut collector = EntryCollector::new(partition, to, limits);
        for (log_id, value) in log.range(from..) {
            if collector.is_done(*log_id) {
                break;
            }
            collector.push(*log_id, value)?;
        }
        Ok(collector.finish())
    }

    fn stored_bounds(
        &self,
        partition: PartitionId,
        from: LogId,
    ) -> Result<Option<(LogId, LogId)>, WalError> {
        let state = self.lock();
        let Some(log) = state.logs.get(&partition) else {
            return Ok(None);
        };
        let mut stored = log.range(from..);
        Ok(stored
            .next()
            .map(|(first, _)| *first)
            .zip(log.last_key_value().map(|(last, _)| *last)))
    }

    fn release_trimmed(&self, partition: PartitionId, below: LogId) -> Result<(), WalError> {
        let mut state = self.lock();
        if let Some(log) = state.logs.get_mut(&partition) {
            *log = log.split_off(&below);
        }
        Ok(())
    }

    fn log_partitions(&self) -> Result<Vec<PartitionId>, WalError> {
        Ok(self.lock().logs.keys().copied().collect())
    }

    fn read_snapshot_chunks(
        &self,
        partition: PartitionId,
        epoch: u64,
        from_seq: u64,
        max_chunks: usize,
    ) -> Result<Vec<(u64, Bytes)>, WalError> {
        let state = self.lock();
        let Some(chunks) = state.snapshots.get(&partition) else {
            return Ok(Vec::new());
        };
        chunks
            .range((epoch, from_seq)..=(epoch, u64::MAX))
            .take(max_chunks)
            .map(|((_, seq), value)| {
                codec::decode_snapshot_chunk(epoch, *seq, value)
                    .map(|data| (*seq, data))
                    .map_err(|what| WalError::CorruptSnapshot {
                        partition,
                        epoch,
                        seq: *seq,
                        what,
                    })
            })
            .collect()
    }

    fn snapshot_epochs(&self, partition: PartitionId) -> Result<Vec<u64>, WalError> {
        let state = self.lock();
        let mut epochs: Vec<u64> = state
            .snapshots
            .get(&partition)
            .map(|chunks| chunks.keys().map(|(epoch, _)| *epoch).collect())
            .unwrap_or_default();
        epochs.dedup();
        Ok(epochs)
    }

    fn load_progress(&self) -> Result<Vec<StoredPartition>, WalError> {
        let state = self.lock();
        decode_meta_records(
            state
                .meta
                .iter()
                .map(|(key, value)| (key.as_slice(), value.as_slice())),
        )
    }
}
