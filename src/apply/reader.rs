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
//!
//! # Reading the listener's WAL (`ferry sync`)
//!
//! An applier of `ferry sync` reads the listener's WAL itself
//! ([`super::run_direct`]). That log has no drainer to give it a snapshot in
//! place of what it lost, so the reader asks the listener for a fallback
//! snapshot (relay convention 4: consistent with the log at `M`) and hands
//! the applier a snapshot marker at `M` that is not in the log, then the
//! entries from `M + 1`, whenever the log cannot give it what it needs:
//!
//! - the entry wanted was trimmed (past `wal-ttl` or the size cap) and the
//!   first one stored is not a loadable marker;
//! - the target's checkpoint says a snapshot is loading at `from`
//!   (`marker_first`) and the entry there is not a loadable marker: the
//!   marker being loaded was such a fallback marker, or its epoch is gone;
//! - a marker in the log whose epoch's chunks are gone (the listener keeps
//!   the latest epochs, `listener/snapshot.rs`): the run stops before it,
//!   and the fallback takes its place.
//!
//! A fallback marker may sit below the id the reader was at (the applier
//! accepts it anywhere: a load replaces the whole owned data set), and the
//! reader continues after it.
//!
//! # Early reads
//!
//! With `early` (the listener's WAL, `early-apply`), the reader reads what
//! the WAL has handed to the storage, durable or still being fsynced
//! ([`Wal::read_written`], from the read tail only), and wakes on
//! [`Wal::subscribe_written`] as well. Past the durable end a run takes
//! writes only (without streamed arguments), each with its [`SourceMark`],
//! and stops before anything else;
//! that entry is read once it is durable ([`super`] module doc, "Applying
//! before the fsync", has why).
//!
//! Before its first read, a reader given a [`Verify`] (the target's
//! checkpoint is a `v3`) reads the log from the first id that was not
//! durable at the applier's start up to the checkpoint's id, as it becomes
//! durable: a snapshot marker there is loaded (the listener full-synced
//! after the crash); otherwise the entry at the checkpoint's id must have
//! the checkpoint's source position, and the reader goes on after it, or a
//! fallback snapshot replaces what the target holds.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::batch::Pending;
use super::checkpoint::SourceMark;
use super::ApplyError;
use crate::position::{LogId, PartitionId};
use crate::record::{Fragment, Record, RecordLimits, SnapshotMarker};
use crate::ship::SnapshotProvider;
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

/// What a run read from the WAL needs before it can be applied.
enum Run {
    Entries(Vec<Pending>),
    /// (Direct reads) the log cannot give what is needed at `at`: a
    /// fallback snapshot goes first (module doc); `entries` are the ones
    /// read before that point, to hand over first.
    Fallback {
        entries: Vec<Pending>,
        at: LogId,
    },
}

/// Whether `marker`'s chunks are in the WAL (a marker of an empty RDB has
/// none).
fn chunks_stored(
    wal: &Wal,
    partition: PartitionId,
    marker: &SnapshotMarker,
) -> Result<bool, WalError> {
    Ok(marker.chunks == 0
        || !wal
            .read_snapshot_chunks(partition, marker.epoch, 0, 1)?
            .is_empty())
}

/// Reads and decodes entries `from..` within `limits` (blocking). With
/// `direct` (the listener's WAL, module doc) a gap or a marker that cannot
/// be loaded asks for a fallback snapshot instead of failing.
fn read_run(
    wal: &Wal,
    partition: PartitionId,
    from: LogId,
    limits: ReadLimits,
    direct: bool,
    marker_first: bool,
) -> Result<Run, ApplyError> {
    let run = match read_stored(wal, partition, from, limits, direct)? {
        None => {
            return Ok(Run::Fallback {
                entries: Vec::new(),
                at: from,
            })
        }
        Some(entries) => decode_run(partition, entries, None)?,
    };
    if !direct {
        return Ok(Run::Entries(run));
    }
    direct_checks(wal, partition, from, run, marker_first)
}

/// (Direct reads) where `run`, read from `from`, needs a fallback snapshot
/// (module doc). Blocking: reads the first chunk of any marker in it (a
/// failing read is the WAL's error, not a reason for a snapshot).
fn direct_checks(
    wal: &Wal,
    partition: PartitionId,
    from: LogId,
    run: Vec<Pending>,
    marker_first: bool,
) -> Result<Run, ApplyError> {
    let first_is_marker = run
        .first()
        .is_some_and(|p| matches!(p.record, Record::Snapshot(_)));
    if marker_first && !first_is_marker {
        info!(
            partition = %partition,
            log_id = %from,
            "the target's checkpoint says a snapshot is loading at an entry that is not a snapshot marker in the log (a fallback snapshot was loading); asking the listener for a fallback snapshot"
        );
        return Ok(Run::Fallback {
            entries: Vec::new(),
            at: from,
        });
    }
    let mut unloadable = None;
    for (index, pending) in run.iter().enumerate() {
        if let Record::Snapshot(marker) = &pending.record {
            if !chunks_stored(wal, partition, marker)? {
                unloadable = Some(index);
                break;
            }
        }
    }
    match unloadable {
        Some(index) => {
            let at = run[index].log_id;
            info!(
                partition = %partition,
                marker = %at,
                "the snapshot epoch of a marker in the log is gone (the listener keeps the latest ones); asking the listener for a fallback snapshot in its place"
            );
            let mut entries = run;
            entries.truncate(index);
            Ok(Run::Fallback { entries, at })
        }
        None => Ok(Run::Entries(run)),
    }
}

/// The stored entries `from..`, or those from the marker that replaces
/// trimmed ones; `None` (direct reads only) when no marker does.
fn read_stored(
    wal: &Wal,
    partition: PartitionId,
    from: LogId,
    limits: ReadLimits,
    direct: bool,
) -> Result<Option<Vec<WalEntry>>, ApplyError> {
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
            if !is_marker && direct {
                info!(
                    partition = %partition,
                    wanted = %from,
                    first_available = %first_available,
                    "entries the target needs were trimmed (past wal-ttl or the size cap) with no snapshot marker in their place; asking the listener for a fallback snapshot"
                );
                return Ok(None);
            }
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
    Ok(Some(entries))
}

/// Decodes the records of `entries` into a run. `durable`: the entries were
/// read early ([`Wal::read_written`]) when the log was durable up to this id;
/// past it the run takes only writes without streamed arguments, each with
/// its source position (module doc, "Early reads"), and ends before anything
/// else.
fn decode_run(
    partition: PartitionId,
    entries: Vec<WalEntry>,
    durable: Option<LogId>,
) -> Result<Vec<Pending>, ApplyError> {
    let mut run = Vec::with_capacity(entries.len());
    for entry in entries {
        let early = durable.is_some_and(|durable| entry.log_id > durable);
        let record =
            Record::decode_shared(&entry.payload, RecordLimits::default()).map_err(|error| {
                ApplyError::Record {
                    partition,
                    log_id: entry.log_id,
                    error,
                }
            })?;
        // A write with streamed arguments is not one entry of its command:
        // its fragments come first, and a restart stores them again.
        if early && !matches!(&record, Record::Write(write) if write.streamed.is_empty()) {
            break;
        }
        let mark = early.then(|| SourceMark::of(&entry.source));
        run.push(pending_of(entry.log_id, entry.payload.len(), record, mark));
    }
    Ok(run)
}

/// The pending entry of a decoded record.
fn pending_of(
    log_id: LogId,
    payload_len: usize,
    record: Record,
    mark: Option<SourceMark>,
) -> Pending {
    let (record, size) = match record {
        // Its data is read again when its write is sent: holding it here
        // would hold whole big values.
        Record::Fragment(fragment) => (
            Record::Fragment(Fragment {
                seq: fragment.seq,
                data: Bytes::new(),
            }),
            0,
        ),
        Record::Write(write) => {
            let streamed = usize::try_from(write.streamed_bytes()).unwrap_or(usize::MAX);
            let size = payload_len.saturating_add(streamed);
            (Record::Write(write), size)
        }
        record => (record, payload_len),
    };
    Pending {
        log_id,
        size,
        record,
        mark,
    }
}

/// Waits until the WAL committed another append (or `idle_poll` passed);
/// `false` on `cancel`.
async fn wait_for_appends(
    appended_rx: &mut watch::Receiver<u64>,
    idle_poll: Duration,
    cancel: &CancellationToken,
) -> bool {
    wait_for_more(appended_rx, None, idle_poll, cancel).await
}

/// Waits until the WAL committed another append or, with `written_rx`,
/// handed another batch to the storage (or `idle_poll` passed); `false` on
/// `cancel`.
async fn wait_for_more(
    appended_rx: &mut watch::Receiver<u64>,
    written_rx: Option<&mut watch::Receiver<u64>>,
    idle_poll: Duration,
    cancel: &CancellationToken,
) -> bool {
    let written = async {
        match written_rx {
            Some(written_rx) => written_rx.changed().await,
            None => std::future::pending().await,
        }
    };
    let changed = tokio::select! {
        _ = cancel.cancelled() => return false,
        changed = appended_rx.changed() => changed,
        changed = written => changed,
        _ = tokio::time::sleep(idle_poll) => return true,
    };
    if changed.is_err() {
        // The WAL is gone; only the fallback poll is left.
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(idle_poll) => {}
        }
    }
    true
}

/// (Direct reads) The target's checkpoint names entry `at` as applied before
/// it was durable, at source position `mark` (checkpoint `v3`): the reader
/// first finds out whether the log holds that entry there now (module doc,
/// "Early reads").
#[derive(Debug, Clone, Copy)]
pub(crate) struct Verify {
    pub at: LogId,
    pub mark: SourceMark,
    /// The first id that may have been written after the crash: a snapshot
    /// marker from here to `at` replaces what the target holds.
    pub scan_from: LogId,
}

/// What the log holds where a `v3` checkpoint points.
enum Checked {
    /// The same entry: resume after it.
    Same,
    /// A snapshot marker at or before it (the listener full-synced after the
    /// crash): load it.
    Marker(LogId),
    /// Another entry, or none any more: a fallback snapshot replaces what the
    /// target holds.
    Other(String),
}

/// Reads the log from `verify.scan_from` to `verify.at` as it becomes
/// durable (module doc, "Early reads"). `None` on `cancel`.
async fn check_early_checkpoint(
    wal: &Wal,
    partition: PartitionId,
    verify: Verify,
    appended_rx: &mut watch::Receiver<u64>,
    idle_poll: Duration,
    cancel: &CancellationToken,
) -> Option<Result<Checked, ApplyError>> {
    // (A `v3` checkpoint names an entry: `at` >= 1, checked when decoded.)
    let mut scan = verify.scan_from.min(verify.at).max(LogId(1));
    loop {
        appended_rx.borrow_and_update();
        let durable = match wal.last_log_id(partition) {
            Ok(durable) => durable.unwrap_or(LogId::ZERO),
            Err(error) => return Some(Err(error.into())),
        };
        if durable < scan {
            if !wait_for_appends(appended_rx, idle_poll, cancel).await {
                return None;
            }
            continue;
        }
        let until = durable.min(verify.at);
        if until < scan {
            return Some(Ok(Checked::Other(format!("no entry {}", verify.at))));
        }
        let limits = ReadLimits {
            max_entries: usize::try_from(until.0 - scan.0 + 1)
                .unwrap_or(usize::MAX)
                .min(4096),
            max_bytes: 8 << 20,
        };
        let (read_wal, from) = (wal.clone(), scan);
        let read = tokio::task::spawn_blocking(move || read_wal.read(partition, from, limits))
            .await
            .map_err(join_error);
        let entries = match read {
            Ok(Ok(entries)) => entries,
            Ok(Err(WalError::Trimmed { .. })) => {
                return Some(Ok(Checked::Other(format!(
                    "entries up to {} were trimmed",
                    verify.at
                ))))
            }
            Ok(Err(error)) => return Some(Err(error.into())),
            Err(error) => return Some(Err(error)),
        };
        if entries.is_empty() {
            // Raced with a trim or a reset: look again.
            if !wait_for_appends(appended_rx, idle_poll, cancel).await {
                return None;
            }
            continue;
        }
        for entry in entries
            .into_iter()
            .take_while(|entry| entry.log_id <= until)
        {
            let record = Record::decode_shared(&entry.payload, RecordLimits::default());
            if matches!(record, Ok(Record::Snapshot(_))) {
                return Some(Ok(Checked::Marker(entry.log_id)));
            }
            if entry.log_id == verify.at {
                let found = SourceMark::of(&entry.source);
                return Some(Ok(if found == verify.mark {
                    Checked::Same
                } else {
                    Checked::Other(format!(
                        "source position {}, the checkpoint's {:016x}:{}",
                        entry.source, verify.mark.replid, verify.mark.offset
                    ))
                }));
            }
            scan = entry.log_id.next();
        }
    }
}

/// How a reader reads.
pub(crate) struct ReaderConfig {
    pub limits: ReadLimits,
    /// The fallback period of looking for new entries.
    pub idle_poll: Duration,
    /// Reading the listener's WAL: its fallback snapshots (module doc).
    pub direct: Option<Arc<dyn SnapshotProvider>>,
    /// Where fallback snapshots taken are counted.
    pub status: Arc<super::ApplyStatus>,
    /// (Direct reads) Read entries while their WAL write is being fsynced
    /// (module doc, "Early reads").
    pub early: bool,
    /// (Direct reads) The target's checkpoint is a `v3`: check it first.
    pub verify: Option<Verify>,
}

/// Starts the reader at `from`. It stops on `cancel`, when the receiver is
/// dropped, or after sending an error. `idle_poll` is the fallback period of
/// looking for new entries when no append notification came. With `direct`
/// (the listener's WAL and its fallback snapshots, module doc), what the log
/// cannot give is replaced by a fallback snapshot; `marker_first` says the
/// target is loading a snapshot at `from`.
pub(crate) fn spawn_reader(
    wal: Wal,
    partition: PartitionId,
    from: LogId,
    marker_first: bool,
    cfg: ReaderConfig,
    cancel: CancellationToken,
) -> (mpsc::Receiver<ReadResult>, JoinHandle<()>) {
    let ReaderConfig {
        limits,
        idle_poll,
        direct,
        status,
        early,
        verify,
    } = cfg;
    let early = early && direct.is_some();
    let (run_tx, run_rx) = mpsc::channel(QUEUE_RUNS);
    let mut appended_rx = wal.subscribe_appends();
    let mut written_rx = early.then(|| wal.subscribe_written());
    let task = tokio::spawn(async move {
        let mut next = from;
        let mut marker_first = marker_first;
        // A fallback snapshot to take before anything is read.
        let mut fallback_first = None;
        if let (Some(verify), true) = (verify, direct.is_some()) {
            let checked = check_early_checkpoint(
                &wal,
                partition,
                verify,
                &mut appended_rx,
                idle_poll,
                &cancel,
            )
            .await;
            match checked {
                None => return,
                Some(Err(error)) => {
                    let _ = run_tx.send(Err(error)).await;
                    return;
                }
                Some(Ok(Checked::Same)) => info!(
                    partition = %partition,
                    log_id = %verify.at,
                    "the log holds the same entry the target's checkpoint names; resuming after it"
                ),
                Some(Ok(Checked::Marker(marker))) => {
                    info!(
                        partition = %partition,
                        log_id = %verify.at,
                        %marker,
                        "the log holds a snapshot marker before the entry the target's checkpoint names (the source was synced in full again); loading it"
                    );
                    next = marker;
                }
                Some(Ok(Checked::Other(what))) => {
                    info!(
                        partition = %partition,
                        log_id = %verify.at,
                        found = %what,
                        "the log holds another entry there than the one the target's checkpoint names (the source's history changed while ferry was down); asking the listener for a fallback snapshot"
                    );
                    fallback_first = Some(verify.at.next());
                }
            }
        }
        loop {
            appended_rx.borrow_and_update();
            if let Some(written_rx) = written_rx.as_mut() {
                written_rx.borrow_and_update();
            }
            let forced = fallback_first.take();
            let durable = match wal.last_log_id(partition) {
                Ok(durable) => durable.unwrap_or(LogId::ZERO),
                Err(error) => {
                    let _ = run_tx.send(Err(error.into())).await;
                    return;
                }
            };
            // An early reader reads what is written, durable or not (module
            // doc, "Early reads"), as long as the read tail holds it.
            let mut early_durable = None;
            let written = match (early && forced.is_none())
                .then(|| wal.read_written(partition, next, limits))
                .flatten()
            {
                Some(Ok((entries, durable))) if !entries.is_empty() => {
                    early_durable = Some(durable);
                    Some(entries)
                }
                Some(Err(error)) => {
                    let _ = run_tx.send(Err(error.into())).await;
                    return;
                }
                _ => None,
            };
            if forced.is_none() && written.is_none() && durable < next {
                if !wait_for_more(&mut appended_rx, written_rx.as_mut(), idle_poll, &cancel).await {
                    return;
                }
                continue;
            }
            // A reader that keeps up finds its entries in the WAL's read
            // tail: no storage read, and a short run is decoded right here.
            let cached = match (forced, written) {
                (Some(_), _) => None,
                (None, Some(entries)) => Some(entries),
                (None, None) => match wal.read_cached(partition, next, limits) {
                    Some(Ok(entries)) if !entries.is_empty() => Some(entries),
                    // Empty, trimmed or failed: `read_run` decides, as before.
                    _ => None,
                },
            };
            let is_direct = direct.is_some();
            let read_wal = wal.clone();
            let at = next;
            let check = move |run: Vec<Pending>| match is_direct {
                // An early run cut short before its first entry (not a
                // write): nothing to check, wait for it to be durable.
                true if run.is_empty() => Ok(Run::Entries(run)),
                true => direct_checks(&read_wal, partition, at, run, marker_first),
                false => Ok(Run::Entries(run)),
            };
            let run = match cached {
                _ if forced.is_some() => Ok(Run::Fallback {
                    entries: Vec::new(),
                    at: forced.unwrap_or(next),
                }),
                // The direct checks block only on a snapshot marker (they
                // read its first chunk): a run without one is checked here.
                Some(entries) if entries.len() <= INLINE_DECODE_ENTRIES => {
                    match decode_run(partition, entries, early_durable) {
                        Ok(run)
                            if is_direct
                                && (marker_first
                                    || run
                                        .iter()
                                        .any(|p| matches!(p.record, Record::Snapshot(_)))) =>
                        {
                            tokio::task::spawn_blocking(move || check(run))
                                .await
                                .map_err(join_error)
                                .and_then(|run| run)
                        }
                        decoded => decoded.and_then(check),
                    }
                }
                Some(entries) => tokio::task::spawn_blocking(move || {
                    decode_run(partition, entries, early_durable).and_then(check)
                })
                .await
                .map_err(join_error)
                .and_then(|run| run),
                None => {
                    let read_wal = wal.clone();
                    tokio::task::spawn_blocking(move || {
                        read_run(&read_wal, partition, at, limits, is_direct, marker_first)
                    })
                    .await
                    .map_err(join_error)
                    .and_then(|run| run)
                }
            };
            let (run, fallback_at) = match run {
                Ok(Run::Entries(run)) => (Ok(run), None),
                Ok(Run::Fallback { entries, at }) => (Ok(entries), Some(at)),
                Err(error) => (Err(error), None),
            };
            let failed = run.is_err();
            if let Ok(run) = &run {
                match run.last() {
                    Some(last) => {
                        next = last.log_id.next();
                        marker_first = false;
                    }
                    // Raced with a trim between the look and the read.
                    None if fallback_at.is_none() => {
                        if !wait_for_appends(&mut appended_rx, idle_poll, &cancel).await {
                            return;
                        }
                        continue;
                    }
                    None => {}
                }
            }
            if !matches!(&run, Ok(run) if run.is_empty()) {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    sent = run_tx.send(run) => {
                        if sent.is_err() || failed {
                            return;
                        }
                    }
                }
            }
            let (Some(at), Some(provider)) = (fallback_at, direct.as_ref()) else {
                continue;
            };
            let taken = tokio::select! {
                _ = cancel.cancelled() => return,
                taken = provider.fallback_snapshot(partition) => taken,
            };
            let last = wal
                .last_log_id(partition)
                .ok()
                .flatten()
                .unwrap_or(LogId::ZERO);
            let run = match taken
                .map_err(|error| error.to_string())
                .and_then(|fallback| {
                    // What the applier will load at `marker_log_id` must be a
                    // whole stored epoch at an id of this log.
                    let marker = &fallback.marker;
                    let fits = marker.epoch == fallback.epoch
                        && marker.chunks > 0
                        && fallback.marker_log_id > LogId::ZERO
                        && fallback.marker_log_id <= last;
                    match fits {
                        true => Ok(fallback),
                        false => Err(format!(
                        "the listener returned epoch {} with a marker of epoch {} and {} chunks \
                         at log id {} (the log ends at {last})",
                        fallback.epoch, marker.epoch, marker.chunks, fallback.marker_log_id
                    )),
                    }
                }) {
                Ok(fallback) => {
                    info!(
                        partition = %partition,
                        needed_at = %at,
                        marker = %fallback.marker_log_id,
                        epoch = fallback.epoch,
                        "fallback snapshot taken; it is loaded in place of what the log lacks"
                    );
                    status.add_fallback_snapshot();
                    next = fallback.marker_log_id.next();
                    marker_first = false;
                    Ok(vec![Pending {
                        mark: None,
                        log_id: fallback.marker_log_id,
                        size: 0,
                        record: Record::Snapshot(fallback.marker),
                    }])
                }
                Err(error) => Err(ApplyError::Fallback { partition, error }),
            };
            let failed = run.is_err();
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::future::BoxFuture;

    use super::*;
    use crate::position::ReplOffset;
    use crate::record::WriteRecord;
    use crate::redis::command::Command;
    use crate::ship::{FallbackSnapshot, SnapshotProviderError};
    use crate::wal::{MemWalStorage, NewEntry, SourcePosition, WalConfig};

    const P: PartitionId = PartitionId(0);

    /// Hands out the fallback snapshots it is given, counting the asks.
    struct Provider {
        answer: Mutex<Option<FallbackSnapshot>>,
        asked: Mutex<u32>,
    }

    impl SnapshotProvider for Provider {
        fn fallback_snapshot(
            &self,
            _partition: PartitionId,
        ) -> BoxFuture<'_, Result<FallbackSnapshot, SnapshotProviderError>> {
            *self.asked.lock().unwrap() += 1;
            let answer = self.answer.lock().unwrap().clone();
            Box::pin(async move { answer.ok_or_else(|| "source unreachable".into()) })
        }
    }

    fn fallback(marker_log_id: u64, epoch: u64, marker_epoch: u64) -> FallbackSnapshot {
        FallbackSnapshot {
            epoch,
            marker: SnapshotMarker {
                epoch: marker_epoch,
                rdb_bytes: 10,
                chunks: 1,
                replid: "r".repeat(40),
                offset: 7,
                scope: None,
                tenures: Vec::new(),
                handoffs: Vec::new(),
            },
            marker_log_id: LogId(marker_log_id),
        }
    }

    /// Writes of one stream, each ending at its offset in `offsets`.
    fn writes(offsets: std::ops::RangeInclusive<u64>) -> Vec<NewEntry> {
        offsets
            .map(|i| {
                let record = Record::Write(WriteRecord {
                    db: 0,
                    commands: vec![Command::from_parts(["SET", "k", "v"])],
                    transaction: false,
                    streamed: Vec::new(),
                    tenure: None,
                });
                let source = SourcePosition {
                    replid: "r".repeat(40).into(),
                    offset: ReplOffset(i),
                    db: 0,
                };
                NewEntry::new(source, record.encode())
            })
            .collect()
    }

    /// A WAL holding three writes.
    async fn wal_of_three(dir: &std::path::Path) -> Wal {
        let wal = Wal::with_storage(Arc::new(MemWalStorage::new()), WalConfig::with_dir(dir))
            .await
            .unwrap();
        wal.append(P, writes(1..=3)).await.unwrap();
        wal
    }

    fn read_from_one(
        wal: &Wal,
        provider: &Arc<Provider>,
        status: &Arc<super::super::ApplyStatus>,
    ) -> (mpsc::Receiver<ReadResult>, CancellationToken) {
        let cancel = CancellationToken::new();
        let direct: Arc<dyn SnapshotProvider> = Arc::clone(provider) as Arc<dyn SnapshotProvider>;
        let cfg = ReaderConfig {
            limits: ReadLimits {
                max_entries: 100,
                max_bytes: 1 << 20,
            },
            idle_poll: Duration::from_millis(50),
            direct: Some(direct),
            status: Arc::clone(status),
            early: false,
            verify: None,
        };
        // The target says a snapshot is loading at 1, which is a write: a
        // fallback that was loading (module doc).
        let (runs, _task) = spawn_reader(wal.clone(), P, LogId(1), true, cfg, cancel.clone());
        (runs, cancel)
    }

    #[tokio::test]
    async fn a_loading_checkpoint_without_its_marker_gets_a_checked_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let wal = wal_of_three(dir.path()).await;
        let status = Arc::new(super::super::ApplyStatus::new(P));

        // A fallback consistent with the log at 2: its marker, then 3.
        let provider = Arc::new(Provider {
            answer: Mutex::new(Some(fallback(2, 7, 7))),
            asked: Mutex::new(0),
        });
        let (mut runs, cancel) = read_from_one(&wal, &provider, &status);
        let first = runs.recv().await.unwrap().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].log_id, LogId(2));
        assert!(matches!(&first[0].record, Record::Snapshot(m) if m.epoch == 7));
        let next = runs.recv().await.unwrap().unwrap();
        assert_eq!(
            next.iter().map(|p| p.log_id).collect::<Vec<_>>(),
            vec![LogId(3)]
        );
        assert_eq!(*provider.asked.lock().unwrap(), 1);
        assert_eq!(status.snapshot().fallback_snapshots, 1);
        cancel.cancel();

        // What the listener hands out is checked: a marker past the log's
        // end, or of another epoch than the one stored, is a retried error.
        for (bad, why) in [
            (fallback(9, 7, 7), "log ends at 3"),
            (fallback(2, 7, 6), "epoch 7"),
        ] {
            *provider.answer.lock().unwrap() = Some(bad);
            let (mut runs, cancel) = read_from_one(&wal, &provider, &status);
            match runs.recv().await.unwrap() {
                Err(error @ ApplyError::Fallback { .. }) => {
                    assert!(!error.is_fatal());
                    assert!(error.to_string().contains(why), "{error}");
                }
                other => panic!("{other:?}"),
            }
            cancel.cancel();
        }
        // A provider that cannot take one: the same retried error.
        *provider.answer.lock().unwrap() = None;
        let (mut runs, cancel) = read_from_one(&wal, &provider, &status);
        let error = runs.recv().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("source unreachable"), "{error}");
        cancel.cancel();
        assert_eq!(status.snapshot().fallback_snapshots, 1);
        wal.close().await.unwrap();
    }
    /// A direct reader from `from` that first checks `verify`.
    fn read_verifying(
        wal: &Wal,
        provider: &Arc<Provider>,
        status: &Arc<super::super::ApplyStatus>,
        from: LogId,
        verify: Verify,
    ) -> (mpsc::Receiver<ReadResult>, CancellationToken) {
        let cancel = CancellationToken::new();
        let direct: Arc<dyn SnapshotProvider> = Arc::clone(provider) as Arc<dyn SnapshotProvider>;
        let cfg = ReaderConfig {
            limits: ReadLimits {
                max_entries: 100,
                max_bytes: 1 << 20,
            },
            idle_poll: Duration::from_millis(50),
            direct: Some(direct),
            status: Arc::clone(status),
            early: true,
            verify: Some(verify),
        };
        let (runs, _task) = spawn_reader(wal.clone(), P, from, false, cfg, cancel.clone());
        (runs, cancel)
    }

    fn mark_at(offset: u64) -> SourceMark {
        SourceMark::of(&SourcePosition {
            replid: "r".repeat(40).into(),
            offset: ReplOffset(offset),
            db: 0,
        })
    }

    #[tokio::test]
    async fn a_checkpoint_applied_before_it_was_durable_is_checked_against_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let wal = wal_of_three(dir.path()).await;
        let status = Arc::new(super::super::ApplyStatus::new(P));
        let provider = Arc::new(Provider {
            answer: Mutex::new(Some(fallback(3, 7, 7))),
            asked: Mutex::new(0),
        });
        // The log holds the entry the checkpoint names (entry 2, offset 2):
        // the reader goes on after it.
        let verify = Verify {
            at: LogId(2),
            mark: mark_at(2),
            scan_from: LogId(1),
        };
        let (mut runs, cancel) = read_verifying(&wal, &provider, &status, LogId(3), verify);
        let run = runs.recv().await.unwrap().unwrap();
        assert_eq!(
            run.iter().map(|p| p.log_id).collect::<Vec<_>>(),
            vec![LogId(3)]
        );
        assert_eq!(*provider.asked.lock().unwrap(), 0);
        cancel.cancel();
        // Another source position there (another history): a fallback
        // snapshot comes first, then what follows its marker.
        let verify = Verify {
            mark: mark_at(99),
            ..verify
        };
        let (mut runs, cancel) = read_verifying(&wal, &provider, &status, LogId(3), verify);
        let run = runs.recv().await.unwrap().unwrap();
        assert!(
            matches!(&run[..], [p] if p.log_id == LogId(3) && matches!(p.record, Record::Snapshot(_)))
        );
        assert_eq!(*provider.asked.lock().unwrap(), 1);
        cancel.cancel();
        // Not written yet: the check waits for the log to reach it.
        let verify = Verify {
            at: LogId(5),
            mark: mark_at(5),
            scan_from: LogId(4),
        };
        let (mut runs, cancel) = read_verifying(&wal, &provider, &status, LogId(6), verify);
        let waited = tokio::time::timeout(Duration::from_millis(200), runs.recv()).await;
        assert!(waited.is_err(), "{waited:?}");
        wal.append(P, writes(4..=6)).await.unwrap();
        let run = runs.recv().await.unwrap().unwrap();
        assert_eq!(
            run.iter().map(|p| p.log_id).collect::<Vec<_>>(),
            vec![LogId(6)]
        );
        assert_eq!(*provider.asked.lock().unwrap(), 1);
        cancel.cancel();
        wal.close().await.unwrap();
    }

    #[test]
    fn an_early_run_takes_writes_only_past_the_durable_end() {
        let write = Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::from_parts(["INCR", "k"])],
            transaction: false,
            streamed: Vec::new(),
            tenure: None,
        });
        let marker = Record::Snapshot(fallback(3, 7, 7).marker);
        let entry = |id: u64, record: &Record| WalEntry {
            log_id: LogId(id),
            flags: 0,
            created_unix_ms: 0,
            bytes_end: 0,
            stored_len: 0,
            source: SourcePosition {
                replid: "r".repeat(40).into(),
                offset: ReplOffset(id),
                db: 0,
            },
            payload: record.encode(),
        };
        let entries = || {
            vec![
                entry(1, &write),
                entry(2, &write),
                entry(3, &marker),
                entry(4, &write),
            ]
        };
        // Durable up to 1: entry 2 is taken with its source position, the
        // marker past the durable end stops the run.
        let run = decode_run(P, entries(), Some(LogId(1))).unwrap();
        let got: Vec<_> = run.iter().map(|p| (p.log_id.0, p.mark)).collect();
        assert_eq!(got, vec![(1, None), (2, Some(mark_at(2)))]);
        // Durable up to 3: the marker is durable, entry 4 early.
        let run = decode_run(P, entries(), Some(LogId(3))).unwrap();
        let got: Vec<_> = run.iter().map(|p| (p.log_id.0, p.mark)).collect();
        assert_eq!(
            got,
            vec![(1, None), (2, None), (3, None), (4, Some(mark_at(4)))]
        );
        // Not an early read: every entry, no marks.
        let run = decode_run(P, entries(), None).unwrap();
        assert!(run.iter().all(|p| p.mark.is_none()) && run.len() == 4);
        // A write that streams a big value (its fragments before it) waits
        // to be durable too.
        let big = Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::from_parts(["SET", "big", ""])],
            transaction: false,
            streamed: vec![crate::redis::psync::StreamedArg {
                command: 0,
                arg: 2,
                len: 10,
                fragments: 1,
            }],
            tenure: None,
        });
        let run = decode_run(P, vec![entry(1, &write), entry(2, &big)], Some(LogId(0))).unwrap();
        let got: Vec<_> = run.iter().map(|p| (p.log_id.0, p.mark)).collect();
        assert_eq!(got, vec![(1, Some(mark_at(1)))]);
    }
}
