//! Snapshot epochs of the listener's partition: storing an RDB received from
//! the source as WAL snapshot chunks (full resyncs and fallback snapshots),
//! and locating a fallback snapshot in the log.
//!
//! In: RDB chunks from a [`PsyncSource`]. Out: a complete snapshot epoch in
//! the WAL (`(partition, epoch, seq 0..n)` chunks exactly as received, then
//! the partition's snapshot state set to complete) and, for fallback
//! snapshots, the log id M the snapshot corresponds to.
//!
//! # Epochs
//!
//! Epochs are allocated in increasing order by one allocator per listener
//! (shared by the replication loop and fallback snapshots, which may run at
//! the same time). The partition's stored [`SnapshotState`] is
//! `(latest allocated epoch, Writing)` while any snapshot is being written,
//! and `(latest epoch, Complete)` (or `Absent` if that one failed) once none
//! is. A marker entry or a [`FallbackSnapshot`] is only produced after its
//! epoch's chunks are durable, so an incomplete epoch is never referenced.
//! On start, an epoch left `Writing` by a crash is deleted; chunks of an
//! older epoch interrupted by the same crash while a newer one was being
//! written stay behind unreferenced (garbage, never read).
//!
//! # Deleting superseded epochs
//!
//! Whenever an epoch completes, and at start, the listener deletes the
//! stored epochs nothing is likely to read again. It keeps
//! - every epoch being written,
//! - the latest [`KEPT_COMPLETE_EPOCHS`] other stored epochs (the newest is
//!   what a fallback snapshot hands out; one more covers a shipper that
//!   just received the previous one),
//! - the epoch of the latest snapshot marker of the log while that marker
//!   is still stored (a drainer resuming before it gets it with its chunks),
//! - epochs a shipper is sending right now ([`Wal::pin_snapshot`]).
//!
//! Deleting is always safe, only sometimes costly: a shipper that finds
//! the chunks of a logged marker gone sends a fresh fallback snapshot
//! instead, and one whose fallback epoch vanished mid-transfer fails the
//! session (the drainer never gets a marker for an incomplete epoch) and
//! retries with a new snapshot. The collection runs under the epoch
//! allocator's lock, so an epoch that begins meanwhile is never taken for
//! an old one.
//!
//! # Locating a fallback snapshot (relay convention 4, docs/ARCHITECTURE.md)
//!
//! A fallback snapshot is consistent with the source at (R, X). Once the
//! listener's durable stream is on R at offset >= X, M is the last log id
//! whose source offset is <= X. Source offsets increase along the log except
//! at a snapshot marker (a full resync may restart them), so M is searched by
//! bisection between the latest marker (the "era" start) and the durable end;
//! if that marker itself lies after X, M is the id just before it (applying
//! the marker replaces the state anyway). M is never a fragment whose write
//! comes after it (`src/record.rs`, "Big entries", rule 4): fragments carry
//! their entry's start offset, so when X is exactly where a big entry
//! starts the search can land on one of its fragments (seq k at id F); M is
//! then F - k - 1, the entry before the run, and the downstream gets the
//! whole run after the marker.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ListenerError, ListenerHandle};
use crate::position::{LogId, PartitionId};
use crate::record::{Record, RecordLimits};
use crate::redis::psync::{PsyncSource, ReplError, ReplEvent, ReplicaConfig};
use crate::wal::{ReadLimits, SnapshotPhase, SnapshotState, Wal, WalEntry, WalError};

/// Snapshot chunk writes kept in flight: the WAL group-commits them, so one
/// fsync covers several chunks instead of one per chunk.
const CHUNKS_IN_FLIGHT: usize = 8;
/// Size of a stored snapshot chunk. The replication client hands over what
/// each socket read returned (often ~20 KiB); those are joined into chunks
/// of this size so that the WAL, the ship stream and the drainer's WAL each
/// handle (and fsync) a few dozen chunks per 32 MB instead of thousands.
/// Held in memory: at most `CHUNKS_IN_FLIGHT + 1` of them.
const CHUNK_TARGET_BYTES: usize = 1 << 20;
/// How long a fallback snapshot's connection waits for an rdb-only source to
/// close it after the RDB.
const RDB_ONLY_CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Entries read per step when scanning the log backwards for a marker.
const MARKER_SCAN_WINDOW: u64 = 512;
/// Most payload bytes read at once while scanning for a marker.
const MARKER_SCAN_BYTES: usize = 4 << 20;

/// A fallback snapshot stored in the WAL (relay convention 4, docs/ARCHITECTURE.md).
///
/// The downstream that needs it receives chunks `0..chunks` of `epoch`, then
/// a `SnapshotMarker { epoch, rdb_bytes, chunks, replid, offset  tenures: Vec::new(), handoffs: Vec::new(), }` record at
/// log id `marker_log_id`, then the entries from `marker_log_id + 1` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackSnapshot {
    pub epoch: u64,
    /// The source's replication id the RDB is consistent with.
    pub replid: String,
    /// The source offset X the RDB is consistent with.
    pub offset: u64,
    pub rdb_bytes: u64,
    pub chunks: u64,
    /// M: the last log id whose source offset is <= `offset` (`LogId::ZERO`
    /// if the log holds none); every entry after it has a source offset >
    /// `offset`, or follows a newer snapshot marker.
    pub marker_log_id: LogId,
    /// The slots of the cluster shard the RDB holds (`None`: a standalone
    /// source), with their tenures and the handoffs the partition made last
    /// (docs/cluster.md, rule 3), as the slot table had them once the log
    /// held everything up to the RDB.
    pub scope: Option<crate::redis::cluster::SlotRanges>,
    pub tenures: Vec<(crate::redis::cluster::SlotRanges, u64)>,
    pub handoffs: Vec<crate::record::SlotHandoff>,
}

/// Complete epochs kept besides those in progress (module doc).
pub(crate) const KEPT_COMPLETE_EPOCHS: usize = 2;

/// Deletes the epochs of `partition` the module doc's rule does not keep;
/// returns them. `in_progress` are the epochs being written, `era_start`
/// the latest marker of the log if known. The caller holds the epoch
/// allocator's lock (or runs before anything can begin an epoch).
pub(crate) async fn collect_listener_snapshots(
    wal: &Wal,
    partition: PartitionId,
    in_progress: &[u64],
    era_start: Option<LogId>,
) -> Result<Vec<u64>, ListenerError> {
    let read_wal = wal.clone();
    let (stored, logged) = tokio::task::spawn_blocking(move || {
        let stored = read_wal.snapshot_epochs(partition)?;
        let logged = match era_start {
            Some(marker_id) => match read_wal.read(
                partition,
                marker_id,
                ReadLimits {
                    max_entries: 1,
                    max_bytes: 1,
                },
            ) {
                Ok(entries) => entries.first().and_then(|entry| {
                    match Record::decode(&entry.payload, RecordLimits::default()) {
                        Ok(Record::Snapshot(marker)) => Some(marker.epoch),
                        _ => None,
                    }
                }),
                Err(WalError::Trimmed { .. }) => None,
                Err(error) => return Err(error),
            },
            None => None,
        };
        Ok::<_, WalError>((stored, logged))
    })
    .await
    .map_err(|e| ListenerError::Task(e.to_string()))??;
    let latest: Vec<u64> = stored
        .iter()
        .rev()
        .filter(|epoch| !in_progress.contains(epoch))
        .take(KEPT_COMPLETE_EPOCHS)
        .copied()
        .collect();
    let deleted = wal
        .collect_snapshots(partition, |epoch| {
            in_progress.contains(&epoch) || latest.contains(&epoch) || Some(epoch) == logged
        })
        .await?;
    if !deleted.is_empty() {
        info!(partition = %partition, epochs = ?deleted, "deleted superseded snapshot epochs");
    }
    Ok(deleted)
}

/// Allocation state of snapshot epochs (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct EpochAllocator {
    pub(crate) last_allocated: u64,
    in_progress: Vec<u64>,
    last_failed: bool,
}

impl EpochAllocator {
    pub(crate) fn recovered(state: SnapshotState) -> EpochAllocator {
        EpochAllocator {
            last_allocated: state.epoch,
            in_progress: Vec::new(),
            last_failed: state.phase != SnapshotPhase::Complete,
        }
    }
}

/// How an RDB transfer ended.
pub(crate) enum RdbOutcome {
    Complete { rdb_bytes: u64, chunks: u64 },
    Shutdown,
    Lost(ReplError),
}

impl ListenerHandle {
    /// Allocates the next epoch and records it as being written.
    pub(crate) async fn begin_epoch(&self) -> Result<u64, ListenerError> {
        let mut epochs = self.inner.epochs.lock().await;
        let epoch = epochs.last_allocated + 1;
        self.inner
            .wal
            .set_snapshot_state(
                self.inner.cfg.partition,
                SnapshotState {
                    epoch,
                    phase: SnapshotPhase::Writing,
                },
            )
            .await?;
        epochs.last_allocated = epoch;
        epochs.last_failed = false;
        epochs.in_progress.push(epoch);
        Ok(epoch)
    }

    /// Ends `epoch`: on failure its chunks are deleted. The stored state
    /// leaves `Writing` once no epoch is in progress.
    pub(crate) async fn finish_epoch(&self, epoch: u64, ok: bool) -> Result<(), ListenerError> {
        let partition = self.inner.cfg.partition;
        let mut epochs = self.inner.epochs.lock().await;
        epochs.in_progress.retain(|e| *e != epoch);
        if !ok {
            self.inner.wal.delete_snapshot(partition, epoch).await?;
            if epoch == epochs.last_allocated {
                epochs.last_failed = true;
            }
        }
        if ok {
            let era_start = *self.inner.era_start.lock().await;
            let in_progress = epochs.in_progress.clone();
            if let Err(error) =
                collect_listener_snapshots(&self.inner.wal, partition, &in_progress, era_start)
                    .await
            {
                warn!(partition = %partition, %error, "cannot delete superseded snapshot epochs");
            }
        }
        if epochs.in_progress.is_empty() {
            let phase = if epochs.last_failed {
                SnapshotPhase::Absent
            } else {
                SnapshotPhase::Complete
            };
            self.inner
                .wal
                .set_snapshot_state(
                    partition,
                    SnapshotState {
                        epoch: epochs.last_allocated,
                        phase,
                    },
                )
                .await?;
        }
        Ok(())
    }

    /// Stores the RDB that `psync` is sending (after its `FullResync` event)
    /// as chunks of `epoch`, `on_bytes` seeing the running total. Returns
    /// once every chunk is durable, or how the transfer ended early.
    pub(crate) async fn receive_rdb(
        &self,
        psync: &mut PsyncSource,
        epoch: u64,
        shutdown: &CancellationToken,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<RdbOutcome, ListenerError> {
        let partition = self.inner.cfg.partition;
        let mut writes = FuturesUnordered::new();
        let mut seq = 0u64;
        let mut received = 0u64;
        let mut joined = bytes::BytesMut::new();
        let wal = &self.inner.wal;
        // Stores what `joined` holds as chunk `seq`, then moves to the next.
        let store_next = |joined: &mut bytes::BytesMut, seq: &mut u64| {
            let write = put_chunk(wal.clone(), partition, epoch, *seq, joined.split().freeze());
            *seq += 1;
            write
        };
        loop {
            // Bound the chunks held in memory while the WAL catches up.
            while writes.len() >= CHUNKS_IN_FLIGHT {
                if let Some(result) = writes.next().await {
                    result?;
                }
            }
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(RdbOutcome::Shutdown),
                Some(result) = writes.next(), if !writes.is_empty() => {
                    result?;
                    continue;
                }
                event = psync.next_event() => event,
            };
            match event {
                Ok(ReplEvent::RdbChunk(chunk)) => {
                    received += chunk.len() as u64;
                    on_bytes(received);
                    joined.extend_from_slice(&chunk);
                    if joined.len() >= CHUNK_TARGET_BYTES {
                        writes.push(store_next(&mut joined, &mut seq));
                    }
                }
                Ok(ReplEvent::RdbEnd { len }) => {
                    if !joined.is_empty() {
                        writes.push(store_next(&mut joined, &mut seq));
                    }
                    while let Some(result) = writes.next().await {
                        result?;
                    }
                    if len != received {
                        return Ok(RdbOutcome::Lost(ReplError::RdbTransfer {
                            received,
                            what: format!("end of a {len}-byte payload"),
                        }));
                    }
                    return Ok(RdbOutcome::Complete {
                        rdb_bytes: received,
                        chunks: seq,
                    });
                }
                Ok(other) => {
                    return Ok(RdbOutcome::Lost(ReplError::Protocol {
                        offset: psync.received_offset().0,
                        what: format!("{other:?} in the middle of the RDB"),
                    }))
                }
                Err(error) => return Ok(RdbOutcome::Lost(error)),
            }
        }
    }

    /// Takes a fallback snapshot (relay convention 4, docs/ARCHITECTURE.md): opens a second
    /// replication connection to the source with `PSYNC ? -1`, stores the
    /// RDB (consistent with the source at (R, X)) as a new complete epoch
    /// without any log entry, waits until the listener's durable stream is
    /// on R at offset >= X (at most `fallback-wait-timeout`), and locates M
    /// (see [`FallbackSnapshot::marker_log_id`]).
    ///
    /// The source forks a BGSAVE (or a diskless transfer) for it exactly as
    /// for a new replica; the connection asks for the RDB only
    /// (`REPLCONF rdb-only 1`, Redis 7.0+), so the source buffers no stream
    /// for it and closes it after the RDB (an older source streams as to any
    /// replica until the connection is dropped). Errors leave no usable epoch behind (its chunks
    /// are deleted); retrying is safe. `shutdown` aborts it
    /// ([`ListenerError::Shutdown`]).
    pub async fn take_fallback_snapshot(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<FallbackSnapshot, ListenerError> {
        let cfg = &self.inner.cfg;
        let partition = cfg.partition;
        let repl_err = |error| ListenerError::Fallback {
            partition,
            what: "replication".into(),
            error: Box::new(error),
        };
        // The snapshot alone: the source then keeps no replication buffer for
        // this connection while the RDB is made and sent (the listener's own
        // link carries the stream), and closes it afterwards.
        let replica = ReplicaConfig {
            rdb_only: true,
            ..self
                .replica_config(false)
                .await
                .map_err(|error| ListenerError::Route { partition, error })?
        };
        let mut psync = tokio::select! {
            _ = shutdown.cancelled() => return Err(ListenerError::Shutdown),
            connected = PsyncSource::connect(&replica, None) => connected.map_err(repl_err)?,
        };
        let (replid, offset) = match psync.next_event().await.map_err(repl_err)? {
            ReplEvent::FullResync { replid, offset } => (replid.to_string(), offset.0),
            other => {
                return Err(ListenerError::FallbackNotFullResync {
                    partition,
                    what: format!("{other:?}"),
                })
            }
        };
        info!(partition = %partition, %replid, offset, "fallback snapshot: receiving rdb");
        let epoch = self.begin_epoch().await?;
        let outcome = self.receive_rdb(&mut psync, epoch, shutdown, |_| {}).await;
        // The snapshot is all this connection is for. An rdb-only source
        // closes it itself, in the background of the wait that follows.
        if psync.rdb_only() && matches!(outcome, Ok(RdbOutcome::Complete { .. })) {
            tokio::spawn(async move {
                psync.wait_closed(RDB_ONLY_CLOSE_WAIT).await;
            });
        } else {
            drop(psync);
        }
        let failure = match outcome {
            Ok(RdbOutcome::Complete { rdb_bytes, chunks }) => Ok((rdb_bytes, chunks)),
            Ok(RdbOutcome::Shutdown) => Err(ListenerError::Shutdown),
            Ok(RdbOutcome::Lost(error)) => Err(repl_err(error)),
            Err(error) => Err(error),
        };
        let (rdb_bytes, chunks) = match failure {
            Ok(done) => done,
            Err(error) => {
                if let Err(cleanup) = self.finish_epoch(epoch, false).await {
                    warn!(partition = %partition, epoch, error = %cleanup, "cannot delete an abandoned snapshot epoch");
                }
                return Err(error);
            }
        };
        self.finish_epoch(epoch, true).await?;

        let durable = self
            .wait_durable(&replid, offset, cfg.fallback_wait_timeout, shutdown)
            .await?;
        let era_hint = *self.inner.era_start.lock().await;
        let wal = self.inner.wal.clone();
        let found = tokio::task::spawn_blocking(move || {
            find_marker_log_id(&wal, partition, era_hint, durable, offset)
        })
        .await
        .map_err(|e| ListenerError::Task(e.to_string()))??;
        // Taken once the log holds everything up to the RDB: every handoff
        // logged before the marker is then in the slot table (docs/cluster.md,
        // rule 3).
        let slots = match self.marker_slots(shutdown, found.marker_log_id.0).await {
            Ok(slots) => slots,
            Err(error) => {
                if let Err(cleanup) = self.finish_epoch(epoch, false).await {
                    warn!(partition = %partition, epoch, error = %cleanup, "cannot delete an abandoned snapshot epoch");
                }
                return Err(ListenerError::Route { partition, error });
            }
        };
        let (scope, tenures, handoffs) = match slots {
            Some(slots) => (Some(slots.scope), slots.tenures, slots.handoffs),
            None => (None, Vec::new(), Vec::new()),
        };
        let mut era_start = self.inner.era_start.lock().await;
        if era_start.is_none() || *era_start < found.era_start {
            *era_start = found.era_start;
        }
        info!(partition = %partition, epoch, %replid, offset, rdb_bytes, marker_log_id = %found.marker_log_id, "fallback snapshot stored");
        Ok(FallbackSnapshot {
            epoch,
            replid,
            offset,
            rdb_bytes,
            chunks,
            marker_log_id: found.marker_log_id,
            scope,
            tenures,
            handoffs,
        })
    }

    /// Waits until the durable stream is on `replid` at offset >= `offset`;
    /// returns the last durable log id at that moment.
    async fn wait_durable(
        &self,
        replid: &str,
        offset: u64,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<LogId, ListenerError> {
        let mut durable_rx = self.inner.durable_tx.subscribe();
        let wait = durable_rx
            .wait_for(|mark| mark.replid.as_deref() == Some(replid) && mark.offset >= offset);
        let mark = tokio::select! {
            _ = shutdown.cancelled() => return Err(ListenerError::Shutdown),
            mark = tokio::time::timeout(timeout, wait) => mark,
        };
        match mark {
            Ok(Ok(mark)) => Ok(mark.log_id),
            Ok(Err(_)) => Err(ListenerError::Shutdown),
            Err(_) => {
                let now = self.inner.durable_tx.borrow().clone();
                Err(ListenerError::FallbackTimeout {
                    partition: self.inner.cfg.partition,
                    waited: timeout,
                    replid: replid.to_string(),
                    offset,
                    durable: format!("{}:{}", now.replid.as_deref().unwrap_or("-"), now.offset),
                })
            }
        }
    }
}

async fn put_chunk(
    wal: Wal,
    partition: PartitionId,
    epoch: u64,
    seq: u64,
    chunk: Bytes,
) -> Result<(), WalError> {
    wal.put_snapshot_chunk(partition, epoch, seq, chunk).await
}

/// Where the search for M ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MarkerSearch {
    pub(crate) marker_log_id: LogId,
    /// The latest snapshot marker at or before the durable end, if any.
    pub(crate) era_start: Option<LogId>,
}

fn read_one(wal: &Wal, partition: PartitionId, id: LogId) -> Result<WalEntry, ListenerError> {
    let limits = ReadLimits {
        max_entries: 1,
        max_bytes: 1,
    };
    wal.read(partition, id, limits)?
        .into_iter()
        .next()
        .ok_or(ListenerError::Wal(WalError::Inconsistent {
            partition,
            what: format!("durable entry {id} cannot be read"),
        }))
}

fn is_marker(entry: &WalEntry, partition: PartitionId) -> Result<bool, ListenerError> {
    // A record's first byte is its kind's tag: writes (0x0a) and fragments
    // (0x1a, up to megabytes each) are told apart without decoding them.
    if matches!(entry.payload.first(), Some(0x0a | 0x1a)) {
        return Ok(false);
    }
    match Record::decode(&entry.payload, RecordLimits::default()) {
        Ok(record) => Ok(matches!(record, Record::Snapshot(_))),
        Err(error) => Err(ListenerError::CorruptRecord {
            partition,
            log_id: entry.log_id,
            error,
        }),
    }
}

/// The latest snapshot marker in `first..=hi`, scanning backwards.
fn scan_back_for_marker(
    wal: &Wal,
    partition: PartitionId,
    first: LogId,
    hi: LogId,
) -> Result<Option<LogId>, ListenerError> {
    let mut end = hi;
    while end >= first && end > LogId::ZERO {
        let start = LogId(end.0.saturating_sub(MARKER_SCAN_WINDOW - 1).max(first.0));
        // The window is read forward in pieces of bounded size (entries
        // may be big fragments); the latest marker in it wins.
        let mut found = None;
        let mut from = start;
        while from <= end {
            let limits = ReadLimits {
                max_entries: (end.0 - from.0 + 1) as usize,
                max_bytes: MARKER_SCAN_BYTES,
            };
            let entries = wal.read(partition, from, limits)?;
            let Some(last) = entries.last().map(|entry| entry.log_id) else {
                break;
            };
            for entry in &entries {
                if entry.log_id <= end && is_marker(entry, partition)? {
                    found = Some(entry.log_id);
                }
            }
            from = last.next();
        }
        if found.is_some() {
            return Ok(found);
        }
        if start == first {
            break;
        }
        end = start.prev();
    }
    Ok(None)
}

/// Finds M for a snapshot at source offset `x` (module doc), searching the
/// log up to the durable id `hi`. `era_hint` is the latest marker known to
/// the listener, if any. Blocking (disk reads).
pub(crate) fn find_marker_log_id(
    wal: &Wal,
    partition: PartitionId,
    era_hint: Option<LogId>,
    hi: LogId,
    x: u64,
) -> Result<MarkerSearch, ListenerError> {
    let Some(first) = wal.first_log_id(partition)? else {
        return Ok(MarkerSearch {
            marker_log_id: hi,
            era_start: era_hint,
        });
    };
    if hi < first {
        return Ok(MarkerSearch {
            marker_log_id: hi,
            era_start: era_hint,
        });
    }
    let era_start = match era_hint {
        Some(id) if id >= first && id <= hi => Some(id),
        _ => scan_back_for_marker(wal, partition, first, hi)?,
    };
    let lo = era_start.unwrap_or(first);
    let lo_entry = read_one(wal, partition, lo)?;
    if lo_entry.source.offset.0 > x {
        if era_start == Some(lo) {
            // A full resync after X: the marker replaces the state anyway.
            return Ok(MarkerSearch {
                marker_log_id: lo.prev(),
                era_start,
            });
        }
        return Err(ListenerError::FallbackBehindLog {
            partition,
            offset: x,
            first,
            first_offset: lo_entry.source.offset.0,
        });
    }
    // Invariant: offset(lo) <= x; answer in lo..=hi.
    let (mut low, mut high) = (lo.0, hi.0);
    while low < high {
        let mid = low + (high - low).div_ceil(2);
        if read_one(wal, partition, LogId(mid))?.source.offset.0 <= x {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    let mut marker_log_id = LogId(low);
    let entry = read_one(wal, partition, marker_log_id)?;
    match Record::decode_shared(&entry.payload, RecordLimits::default()) {
        Ok(Record::Fragment(fragment)) => {
            // Fragments of one run are consecutive from seq 0.
            let run_start = marker_log_id.0.saturating_sub(u64::from(fragment.seq));
            if run_start < first.0 || run_start == 0 {
                // The start of the run was trimmed: no marker can precede
                // it; a later snapshot will be past its write.
                return Err(ListenerError::FallbackBehindLog {
                    partition,
                    offset: x,
                    first,
                    first_offset: lo_entry.source.offset.0,
                });
            }
            marker_log_id = LogId(run_start - 1);
        }
        Ok(_) => {}
        Err(error) => {
            return Err(ListenerError::CorruptRecord {
                partition,
                log_id: marker_log_id,
                error,
            })
        }
    }
    Ok(MarkerSearch {
        marker_log_id,
        era_start,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::position::ReplOffset;
    use crate::record::SnapshotMarker;
    use crate::record::WriteRecord;
    use crate::redis::command::Command;
    use crate::wal::{MemWalStorage, NewEntry, SourcePosition, WalConfig};

    fn write(offset: u64) -> NewEntry {
        let record = Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::from_parts(["INCR", "k"])],
            transaction: false,
            streamed: vec![],
            tenure: None,
        });
        NewEntry::new(
            SourcePosition {
                replid: "a".repeat(40).into(),
                offset: ReplOffset(offset),
                db: 0,
            },
            record.encode(),
        )
    }

    fn marker(offset: u64) -> NewEntry {
        let record = Record::Snapshot(SnapshotMarker {
            epoch: 1,
            rdb_bytes: 0,
            chunks: 0,
            replid: "a".repeat(40),
            offset,
            scope: None,
            tenures: Vec::new(),
            handoffs: Vec::new(),
        });
        NewEntry::new(
            SourcePosition {
                replid: "a".repeat(40).into(),
                offset: ReplOffset(offset),
                db: 0,
            },
            record.encode(),
        )
    }

    async fn wal_with(entries: Vec<NewEntry>) -> Wal {
        let wal = Wal::with_storage(
            Arc::new(MemWalStorage::default()),
            WalConfig::with_dir("unused"),
        )
        .await
        .unwrap();
        wal.append(PartitionId(0), entries).await.unwrap();
        wal
    }

    #[tokio::test]
    async fn finds_the_last_entry_at_or_before_x() {
        // Era 1 (offsets up to 900), then a full resync restarting at 100.
        let mut entries = vec![marker(500), write(600), write(900)];
        entries.push(marker(100));
        entries.extend([110, 120, 130, 140, 150].map(write));
        let wal = wal_with(entries).await;
        let p = PartitionId(0);
        let hi = LogId(9);
        let search = |x, hint| find_marker_log_id(&wal, p, hint, hi, x).unwrap();
        // Ids 4..=9 carry offsets 100, 110, .., 150.
        assert_eq!(search(100, None).marker_log_id, LogId(4));
        assert_eq!(search(100, None).era_start, Some(LogId(4)));
        assert_eq!(search(125, None).marker_log_id, LogId(6));
        assert_eq!(search(150, Some(LogId(4))).marker_log_id, LogId(9));
        assert_eq!(search(10_000, None).marker_log_id, LogId(9));
        // X before the latest marker: M is just before it.
        assert_eq!(search(50, None).marker_log_id, LogId(3));
        // The listener's hint (the latest marker) gives the same answers.
        assert_eq!(search(140, Some(LogId(4))).marker_log_id, LogId(8));
    }

    #[tokio::test]
    async fn superseded_epochs_go_the_latest_logged_and_pinned_stay() {
        let p = PartitionId(0);
        // Log: a marker of epoch 1 at id 1, then writes.
        let wal = wal_with(vec![marker(100), write(110), write(120)]).await;
        for epoch in 1..=6u64 {
            wal.put_snapshot_chunk(p, epoch, 0, Bytes::from_static(b"rdb"))
                .await
                .unwrap();
        }
        let pinned = wal.pin_snapshot(p, 2);
        // 6 is being written; 4 and 5 are the latest complete; 1 is the
        // logged marker's; 2 is being shipped.
        let deleted = collect_listener_snapshots(&wal, p, &[6], Some(LogId(1)))
            .await
            .unwrap();
        assert_eq!(deleted, vec![3]);
        drop(pinned);
        // Once the marker is trimmed, its epoch goes too.
        wal.trim(p, LogId(2)).await.unwrap();
        let deleted = collect_listener_snapshots(&wal, p, &[], Some(LogId(1)))
            .await
            .unwrap();
        assert_eq!(deleted, vec![1, 2, 4]);
        assert_eq!(wal.snapshot_epochs(p).unwrap(), vec![5, 6]);
    }

    fn fragment(offset: u64, seq: u32) -> NewEntry {
        NewEntry::new(
            SourcePosition {
                replid: "a".repeat(40).into(),
                offset: ReplOffset(offset),
                db: 0,
            },
            Record::encode_fragment(seq, b"piece"),
        )
    }

    #[tokio::test]
    async fn m_is_never_inside_a_fragment_run() {
        // 1: marker@100, 2: write@110, 3-4: orphan run @110 (a crash),
        // 5-7: the run received again @110, 8: its write @500, 9: write@510.
        let entries = vec![
            marker(100),
            write(110),
            fragment(110, 0),
            fragment(110, 1),
            fragment(110, 0),
            fragment(110, 1),
            fragment(110, 2),
            write(500),
            write(510),
        ];
        let wal = wal_with(entries).await;
        let p = PartitionId(0);
        let search = |x, hi| find_marker_log_id(&wal, p, None, LogId(hi), x).unwrap();
        // X at the big entry's start: M before the run being written, so
        // the downstream gets all its fragments (the orphans may go).
        assert_eq!(search(110, 9).marker_log_id, LogId(4));
        // Durable only up to the middle of the run: the same.
        assert_eq!(search(110, 6).marker_log_id, LogId(4));
        assert_eq!(search(110, 4).marker_log_id, LogId(2));
        // Past the big entry: at its write or after.
        assert_eq!(search(500, 9).marker_log_id, LogId(8));
        assert_eq!(search(505, 9).marker_log_id, LogId(8));
        assert_eq!(search(510, 9).marker_log_id, LogId(9));
        // A run whose start was trimmed cannot be cut: take a new snapshot.
        wal.trim(p, LogId(6)).await.unwrap();
        let error = find_marker_log_id(&wal, p, None, LogId(9), 110).unwrap_err();
        assert!(
            matches!(error, ListenerError::FallbackBehindLog { .. }),
            "{error}"
        );
        assert_eq!(search(500, 9).marker_log_id, LogId(8));
    }

    #[tokio::test]
    async fn log_without_marker_starts_at_the_first_entry() {
        let wal = wal_with([10, 20, 30].map(write).to_vec()).await;
        let p = PartitionId(0);
        let found = find_marker_log_id(&wal, p, None, LogId(3), 25).unwrap();
        assert_eq!(found.marker_log_id, LogId(2));
        assert_eq!(found.era_start, None);
        let error = find_marker_log_id(&wal, p, None, LogId(3), 5).unwrap_err();
        assert!(
            matches!(error, ListenerError::FallbackBehindLog { .. }),
            "{error}"
        );
    }
}
