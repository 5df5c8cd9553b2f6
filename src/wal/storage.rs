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
    /// `below`, whenever it likes (a block of entries goes once all of them
    /// are below it). Trims write nothing but the meta, so
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

/// What one write op of a batch is stored as: runs of entries become
/// blocks (one log value each, `wal/mod.rs` "On-disk format").
pub(crate) enum Stored<'a> {
    /// Entries of `partition` with consecutive ids, stored under the first.
    Block {
        partition: PartitionId,
        entries: Vec<&'a WalEntry>,
    },
    Other(&'a WriteOp),
}

/// Groups the entries of `ops` into blocks ([`codec::block_takes`]): a run
/// of one partition's consecutive ids, in the order given.
pub(crate) fn stored_ops(ops: &[WriteOp]) -> Vec<Stored<'_>> {
    let mut stored: Vec<Stored<'_>> = Vec::new();
    let mut payload_bytes = 0;
    for op in ops {
        let WriteOp::Entry { partition, entry } = op else {
            stored.push(Stored::Other(op));
            continue;
        };
        if let Some(Stored::Block {
            partition: open,
            entries,
        }) = stored.last_mut()
        {
            let last = entries.last().map_or(LogId::ZERO, |e| e.log_id);
            if open == partition && codec::block_takes(entries.len(), payload_bytes, last, entry) {
                payload_bytes += entry.payload.len();
                entries.push(entry);
                continue;
            }
        }
        payload_bytes = entry.payload.len();
        stored.push(Stored::Block {
            partition: *partition,
            entries: vec![entry],
        });
    }
    stored
}

/// Collects entries of one read, in order, within its limits.
pub(crate) struct EntryCollector {
    partition: PartitionId,
    from: LogId,
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
    pub(crate) fn new(partition: PartitionId, from: LogId, to: LogId, limits: ReadLimits) -> Self {
        EntryCollector {
            partition,
            from,
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

    /// Takes the entries of the log value stored under `first` (a block or
    /// a single entry) that the read asks for.
    pub(crate) fn push(&mut self, first: LogId, value: &[u8]) -> Result<(), WalError> {
        let partition = self.partition;
        codec::decode_log_value(first, value, |entry, payload| {
            if entry.log_id < self.from {
                return true;
            }
            if self.is_done(entry.log_id) {
                return false;
            }
            let start = self.payloads.len();
            self.payloads.extend_from_slice(&value[payload]);
            self.payload_bytes += self.payloads.len() - start;
            self.entries.push((entry, start..self.payloads.len()));
            true
        })
        .map_err(|what| WalError::Corrupt {
            partition,
            log_id: first,
            what,
        })
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

/// The key of the log value a read of `from` starts at, given the greatest
/// key at or below `from` and its value: that block if it holds `from`,
/// else `from` itself (the next key above).
pub(crate) fn start_key(from: LogId, at_or_below: Option<(LogId, &[u8])>) -> LogId {
    match at_or_below {
        Some((key, value)) if codec::value_last_id(key, value).is_some_and(|last| last >= from) => {
            key
        }
        _ => from,
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

    /// The ids each stored log value of `partition` spans (first, last).
    #[cfg(test)]
    pub fn stored_spans(&self, partition: PartitionId) -> Vec<(LogId, LogId)> {
        self.lock().logs.get(&partition).map_or(Vec::new(), |log| {
            log.iter()
                .map(|(first, value)| {
                    (
                        *first,
                        codec::value_last_id(*first, value).unwrap_or(*first),
                    )
                })
                .collect()
        })
    }

    /// Overwrites the log value stored under `log_id` (tests of corruption
    /// and of values written by older versions).
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
        // Stored as blocks by the caller (`stored_ops`).
        WriteOp::Entry { .. } => {}
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
        for stored in stored_ops(ops) {
            match stored {
                Stored::Block { partition, entries } => {
                    let first = entries[0].log_id;
                    let mut value = Vec::new();
                    codec::encode_block_into(entries, &mut value);
                    state
                        .logs
                        .entry(partition)
                        .or_default()
                        .insert(first, value);
                }
                Stored::Other(op) => apply_op(&mut state, op),
            }
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
        let start = start_key(
            from,
            log.range(..=from)
                .next_back()
                .map(|(key, value)| (*key, &value[..])),
        );
        let mut collector = EntryCollector::new(partition, from, to, limits);
        for (log_id, value) in log.range(start..) {
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
        let start = start_key(
            from,
            log.range(..=from)
                .next_back()
                .map(|(key, value)| (*key, &value[..])),
        );
        let Some((first, _)) = log.range(start..).next() else {
            return Ok(None);
        };
        let Some((key, value)) = log.last_key_value() else {
            return Ok(None);
        };
        let last = codec::value_last_id(*key, value).ok_or_else(|| WalError::Corrupt {
            partition,
            log_id: *key,
            what: "log value without a block header".to_string(),
        })?;
        Ok(Some(((*first).max(from), last)))
    }

    fn release_trimmed(&self, partition: PartitionId, below: LogId) -> Result<(), WalError> {
        let mut state = self.lock();
        if let Some(log) = state.logs.get_mut(&partition) {
            // A block holding `below` stays whole (its live entries).
            let keep = start_key(
                below,
                log.range(..=below)
                    .next_back()
                    .map(|(key, value)| (*key, &value[..])),
            );
            *log = log.split_off(&keep);
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
