//! [`ApplyStatus`]: what an applier shows to `ferry status`, readable at any
//! time from another task through an `Arc`.
//!
//! In: updates from the applier (state changes, applied ids, counters,
//! snapshot load progress). Out: [`ApplyReport`]s, which add the LogId lag
//! and time latency computed against the WAL at the moment of the report.

pub(crate) use crate::position::now_unix_ms;
use std::sync::{Mutex, MutexGuard};

use crate::position::{LogId, PartitionId};
use crate::wal::{Wal, WalError};

/// Whether the applier is applying (ONLINE) or waiting to retry (OFFLINE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    Online,
    Offline,
}

impl std::fmt::Display for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncState::Online => "ONLINE",
            SyncState::Offline => "OFFLINE",
        })
    }
}

/// The last command the target refused inside a committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedCommand {
    pub log_id: LogId,
    /// Command name, upper case.
    pub command: String,
    pub error: String,
}

/// Progress of the latest snapshot load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotLoadProgress {
    /// Log id of the snapshot marker.
    pub log_id: LogId,
    pub epoch: u64,
    /// Size of the RDB (from the marker).
    pub rdb_bytes: u64,
    /// RDB bytes read from the WAL and parsed so far.
    pub bytes_loaded: u64,
    /// Keys written to the target so far.
    pub keys_loaded: u64,
    /// Commands the target refused during the load.
    pub commands_refused: u64,
    /// Whether the load finished (its checkpoint is written).
    pub done: bool,
}

#[derive(Debug, Clone)]
struct StatusFields {
    state: SyncState,
    last_error: Option<String>,
    applied: LogId,
    epoch: u64,
    commands_applied: u64,
    commands_refused: u64,
    commands_skipped: u64,
    last_refused: Option<RefusedCommand>,
    snapshot_load: Option<SnapshotLoadProgress>,
}

/// Shared status of one applier.
#[derive(Debug)]
pub struct ApplyStatus {
    partition: PartitionId,
    fields: Mutex<StatusFields>,
}

/// One reading of an applier's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub partition: PartitionId,
    pub state: SyncState,
    /// Why the applier is OFFLINE (or last was).
    pub last_error: Option<String>,
    /// Last log id applied to the target (its checkpoint).
    pub applied: LogId,
    /// Snapshot epoch the target's data set is based on.
    pub epoch: u64,
    /// Last durable log id of the WAL.
    pub durable: LogId,
    /// `durable - applied`: entries not yet applied.
    pub lag: u64,
    /// Milliseconds from now back to the creation of the oldest entry not
    /// yet applied; 0 when none is pending.
    pub latency_ms: u64,
    /// Data commands the target ran (refused ones not included).
    pub commands_applied: u64,
    /// Commands the target refused inside a committed batch.
    pub commands_refused: u64,
    /// Commands not applied because all their keys are internal.
    pub commands_skipped: u64,
    pub last_refused: Option<RefusedCommand>,
    pub snapshot_load: Option<SnapshotLoadProgress>,
}

impl ApplyStatus {
    /// A status for `partition`, OFFLINE until the applier reaches the
    /// target.
    pub fn new(partition: PartitionId) -> ApplyStatus {
        ApplyStatus {
            partition,
            fields: Mutex::new(StatusFields {
                state: SyncState::Offline,
                last_error: None,
                applied: LogId::ZERO,
                epoch: 0,
                commands_applied: 0,
                commands_refused: 0,
                commands_skipped: 0,
                last_refused: None,
                snapshot_load: None,
            }),
        }
    }

    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    fn lock(&self) -> MutexGuard<'_, StatusFields> {
        // Updates replace whole fields, so a poisoned lock still guards
        // consistent data.
        self.fields
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The status without the WAL-relative figures (`durable`, `lag` and
    /// `latency_ms` are 0). Never blocks on I/O.
    pub fn snapshot(&self) -> ApplyReport {
        let fields = self.lock().clone();
        ApplyReport {
            partition: self.partition,
            state: fields.state,
            last_error: fields.last_error,
            applied: fields.applied,
            epoch: fields.epoch,
            durable: LogId::ZERO,
            lag: 0,
            latency_ms: 0,
            commands_applied: fields.commands_applied,
            commands_refused: fields.commands_refused,
            commands_skipped: fields.commands_skipped,
            last_refused: fields.last_refused,
            snapshot_load: fields.snapshot_load,
        }
    }

    /// The full status, with lag and latency measured against `wal` now.
    /// Blocking: reads the oldest pending entry (one point read).
    pub fn report(&self, wal: &Wal) -> Result<ApplyReport, WalError> {
        self.report_at(wal, now_unix_ms())
    }

    /// [`ApplyStatus::report`] as of `now_unix_ms`.
    pub fn report_at(&self, wal: &Wal, now_unix_ms: u64) -> Result<ApplyReport, WalError> {
        let mut report = self.snapshot();
        let durable = wal.last_log_id(self.partition)?.unwrap_or(LogId::ZERO);
        report.durable = durable;
        report.lag = durable.0.saturating_sub(report.applied.0);
        if report.lag > 0 {
            // The pending entries start at the first one still stored.
            if let Some(created) = wal.oldest_created(self.partition, report.applied.next())? {
                report.latency_ms = now_unix_ms.saturating_sub(created);
            }
        }
        Ok(report)
    }

    pub(crate) fn set_online(&self) {
        let mut fields = self.lock();
        fields.state = SyncState::Online;
    }

    pub(crate) fn set_offline(&self, error: String) {
        let mut fields = self.lock();
        fields.state = SyncState::Offline;
        fields.last_error = Some(error);
    }

    pub(crate) fn set_applied(&self, applied: LogId, epoch: u64) {
        let mut fields = self.lock();
        fields.applied = applied;
        fields.epoch = epoch;
    }

    pub(crate) fn add_counts(&self, applied: u64, refused: u64, skipped: u64) {
        let mut fields = self.lock();
        fields.commands_applied += applied;
        fields.commands_refused += refused;
        fields.commands_skipped += skipped;
    }

    pub(crate) fn set_last_refused(&self, refused: RefusedCommand) {
        self.lock().last_refused = Some(refused);
    }

    pub(crate) fn set_snapshot_load(&self, progress: SnapshotLoadProgress) {
        self.lock().snapshot_load = Some(progress);
    }
}
