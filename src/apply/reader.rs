//! The applier's WAL reader: a task that follows one partition of the WAL
//! from a log id on and hands decoded records to the applier.
//!
//! In: durable WAL entries (read on a blocking thread, since RocksDB reads
//! block). Out: `Vec<Pending>` runs in log order through a bounded channel,
//! or one error, after which the task ends.
//!
//! Once it caught up with the WAL's durable end, the reader sleeps until the
//! WAL's append notification ([`Wal::subscribe_appends`]) says a batch was
//! committed, or `idle-poll` passed (a fallback only: the notification is
//! sent after every committed append, `append_at` and `reset_partition`
//! included). It marks the notification seen *before* looking at the
//! durable end, so an append committed in between still wakes it.
//!
//! Entries are contiguous, with one exception: when the entry wanted was
//! trimmed and the first entry still stored is a snapshot marker, the reader
//! continues from that marker (loading it replaces everything before it;
//! relay convention 5: a drainer's log restarts at a snapshot marker).

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::batch::Pending;
use super::ApplyError;
use crate::position::{LogId, PartitionId};
use crate::record::{Fragment, Record, RecordLimits};
use crate::wal::{ReadLimits, Wal, WalEntry, WalError};

/// Runs of entries queued between the reader and the applier.
const QUEUE_RUNS: usize = 2;

pub(crate) type ReadResult = Result<Vec<Pending>, ApplyError>;

fn join_error(error: tokio::task::JoinError) -> ApplyError {
    ApplyError::Task(error.to_string())
}

/// Most entries of a run decoded on the async runtime (read from the WAL's
/// read tail); a longer run is decoded on a blocking thread.
const INLINE_DECODE_ENTRIES: usize = 256;

/// Reads and decodes entries `from..` within `limits` (blocking).
fn read_run(
    wal: &Wal,
    partition: PartitionId,
    from: LogId,
    limits: ReadLimits,
) -> Result<Vec<Pending>, ApplyError> {
    let entries = match wal.read(partition, from, limits) {
        Ok(entries) => entries,
        Err(WalError::Trimmed {
            first_available, ..
        }) => {
            // Only a snapshot marker may stand in for trimmed entries.
            let first = wal.read(
                partition,
                first_available,
                ReadLimits {
                    max_entries: 1,
                    max_bytes: 1,
                },
            )?;
            let is_marker = first.first().is_some_and(|entry| {
                matches!(
                    Record::decode_shared(&entry.payload, RecordLimits::default()),
                    Ok(Record::Snapshot(_))
                )
            });
            if !is_marker {
                return Err(ApplyError::Gap {
                    partition,
                    wanted: from,
                    first_available,
                });
            }
            info!(
                partition = %partition,
                wanted = %from,
                marker = %first_available,
                "entries were trimmed; resuming at the snapshot marker that replaces them"
            );
            wal.read(partition, first_available, limits)?
        }
        Err(error) => return Err(error.into()),
    };
    decode_run(partition, entries)
}

/// Decodes the records of `entries` into a run.
fn decode_run(partition: PartitionId, entries: Vec<WalEntry>) -> Result<Vec<Pending>, ApplyError> {
    entries
        .into_iter()
        .map(|entry| {
            let record = Record::decode_shared(&entry.payload, RecordLimits::default()).map_err(
                |error| ApplyError::Record {
                    partition,
                    log_id: entry.log_id,
                    error,
                },
            )?;
            let (record, size) = match record {
                // Its data is read again when its write is sent: holding it
                // here would hold whole big values.
                Record::Fragment(fragment) => (
                    Record::Fragment(Fragment {
                        seq: fragment.seq,
                        data: Bytes::new(),
                    }),
                    0,
                ),
                Record::Write(write) => {
                    let streamed = usize::try_from(write.streamed_bytes()).unwrap_or(usize::MAX);
                    let size = entry.payload.len().saturating_add(streamed);
                    (Record::Write(write), size)
                }
                record => (record, entry.payload.len()),
            };
            Ok(Pending {
                log_id: entry.log_id,
                size,
                record,
            })
        })
        .collect()
}

/// Waits until the WAL committed another append (or `idle_poll` passed);
/// `false` on `cancel`.
async fn wait_for_appends(
    appended_rx: &mut watch::Receiver<u64>,
    idle_poll: Duration,
    cancel: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        changed = appended_rx.changed() => {
            if changed.is_err() {
                // The WAL is gone; only the fallback poll is left.
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(idle_poll) => {}
                }
            }
            true
        }
        _ = tokio::time::sleep(idle_poll) => true,
    }
}

/// Starts the reader at `from`. It stops on `cancel`, when the receiver is
/// dropped, or after sending an error. `idle_poll` is the fallback period of
/// looking for new entries when no append notification came.
pub(crate) fn spawn_reader(
    wal: Wal,
    partition: PartitionId,
    from: LogId,
    limits: ReadLimits,
    idle_poll: Duration,
    cancel: CancellationToken,
) -> (mpsc::Receiver<ReadResult>, JoinHandle<()>) {
    let (run_tx, run_rx) = mpsc::channel(QUEUE_RUNS);
    let mut appended_rx = wal.subscribe_appends();
    let task = tokio::spawn(async move {
        let mut next = from;
        loop {
            appended_rx.borrow_and_update();
            let durable = match wal.last_log_id(partition) {
                Ok(durable) => durable.unwrap_or(LogId::ZERO),
                Err(error) => {
                    let _ = run_tx.send(Err(error.into())).await;
                    return;
                }
            };
            if durable < next {
                if !wait_for_appends(&mut appended_rx, idle_poll, &cancel).await {
                    return;
                }
                continue;
            }
            // A reader that keeps up finds its entries in the WAL's read
            // tail: no storage read, and a short run is decoded right here.
            let cached = match wal.read_cached(partition, next, limits) {
                Some(Ok(entries)) if !entries.is_empty() => Some(entries),
                // Empty, trimmed or failed: `read_run` decides, as before.
                _ => None,
            };
            let run = match cached {
                Some(entries) if entries.len() <= INLINE_DECODE_ENTRIES => {
                    decode_run(partition, entries)
                }
                Some(entries) => {
                    tokio::task::spawn_blocking(move || decode_run(partition, entries))
                        .await
                        .map_err(join_error)
                        .and_then(|run| run)
                }
                None => {
                    let read_wal = wal.clone();
                    tokio::task::spawn_blocking(move || {
                        read_run(&read_wal, partition, next, limits)
                    })
                    .await
                    .map_err(join_error)
                    .and_then(|run| run)
                }
            };
            let failed = run.is_err();
            if let Ok(run) = &run {
                match run.last() {
                    Some(last) => next = last.log_id.next(),
                    // Raced with a trim between the look and the read.
                    None => {
                        if !wait_for_appends(&mut appended_rx, idle_poll, &cancel).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                sent = run_tx.send(run) => {
                    if sent.is_err() || failed {
                        return;
                    }
                }
            }
        }
    });
    (run_rx, task)
}
