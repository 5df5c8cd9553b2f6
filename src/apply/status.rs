//! [`ApplyStatus`]: what an applier shows to `ferry status`, readable at any
//! time from another task through an `Arc`.
//!
//! In: updates from the applier (state changes, applied ids, counters,
//! snapshot load progress, the entry it is blocked on), and the operator's
//! request to skip that entry ([`ApplyStatus::request_skip`], from `ferry
//! skip`), which the applier takes when it next gets to the entry. Out:
//! [`ApplyReport`]s, which add the LogId lag and time latency computed
//! against the WAL at the moment of the report.

pub(crate) use crate::position::now_unix_ms;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::position::{LogId, PartitionId};
use crate::wal::{Wal, WalError};

/// Whether the applier is applying (ONLINE), waiting to retry (OFFLINE),
/// held at an entry the target refuses (BLOCKED: the entries after it
/// wait; [`ApplyReport::blocked`] names it), held until another
/// partition hands a slot over (HANDOFF, a cluster source's resharding:
/// [`ApplyReport::handoff`] names the slot and the tenure awaited), or
/// waiting for a reply the target is late with (STALLED: longer than
/// [`stall_after`]; `last_error` names the target and for how long; the
/// session ends at `reply-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    Online,
    Offline,
    Blocked,
    Handoff,
    Stalled,
}

/// How long a reply of the target may take before the applier shows
/// STALLED: 5 s, or half of `reply_timeout` when that is shorter (the
/// session ends at `reply_timeout`, OFFLINE).
pub fn stall_after(reply_timeout: std::time::Duration) -> std::time::Duration {
    (reply_timeout / 2).min(std::time::Duration::from_secs(5))
}

/// A reply the target is late with: which target, since when.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stall {
    target: String,
    since_unix_ms: u64,
    reply_timeout: std::time::Duration,
}

impl std::fmt::Display for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncState::Online => "ONLINE",
            SyncState::Offline => "OFFLINE",
            SyncState::Blocked => "BLOCKED",
            SyncState::Handoff => "HANDOFF",
            SyncState::Stalled => "STALLED",
        })
    }
}

/// A command the target refused: inside a committed batch (the last one is
/// shown), or when queued (the entry is then blocked or skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedCommand {
    pub log_id: LogId,
    /// Command name, upper case.
    pub command: String,
    pub error: String,
}

/// The entry the applier is held at: the target refused it when queued, so
/// its batch did not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedEntry {
    pub log_id: LogId,
    /// The refused command's name, upper case.
    pub command: String,
    pub error: String,
    /// The refusal is about the target's state (`OOM`, `READONLY`,
    /// `LOADING`, ...), not about the entry: the applier retries it with
    /// backoff under every `on-refused` and never skips it by itself.
    pub transient: bool,
    /// When the applier first found it blocked here (unix ms).
    pub since_unix_ms: u64,
}

/// Entries of a cluster source's aborted slot imports the applier skipped
/// (docs/cluster.md, rule 9): how many, and the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoidedEntries {
    pub entries: u64,
    pub last: LogId,
    pub slot: u16,
    pub gen: u64,
}

impl std::fmt::Display for VoidedEntries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} entries of aborted slot imports skipped, never applied (the shard gave the keys \
             back to the slot's owner); last: entry {}, slot {} tenure generation {}",
            self.entries, self.last, self.slot, self.gen
        )
    }
}

/// What a partition held for a slot handoff waits for (docs/cluster.md,
/// rules 4 and 6): the owner map of the target must name this partition
/// as the owner of `slot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffWait {
    /// The entry (or snapshot marker) held.
    pub log_id: LogId,
    pub slot: u16,
    /// The tenure generation of the entry (or of the marker's slot).
    pub gen: u64,
    /// The map's tenure of the slot when last read: `(partition, gen)`;
    /// `None`: no partition has loaded it yet.
    pub current: Option<(u32, u64)>,
    /// When the applier first waited here (unix ms).
    pub since_unix_ms: u64,
}

impl std::fmt::Display for HandoffWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "entry {} waits for slot {} to be handed to this partition (tenure generation {}); \
             the target's owner map has ",
            self.log_id, self.slot, self.gen
        )?;
        match self.current {
            Some((partition, gen)) => write!(f, "partition {partition} generation {gen}"),
            None => f.write_str("no owner yet"),
        }
    }
}

/// Why a skip request was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipRefused {
    #[error("partition {partition} is not blocked (nothing to skip)")]
    NotBlocked { partition: PartitionId },
    #[error(
        "partition {partition} is blocked on entry {blocked_on}, not {requested}: only the \
         blocking entry can be skipped"
    )]
    OtherEntry {
        partition: PartitionId,
        blocked_on: LogId,
        requested: LogId,
    },
    #[error("partition {partition}: no dead-letter dir is configured, so no entry can be skipped")]
    NoDeadLetter { partition: PartitionId },
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
    blocked: Option<BlockedEntry>,
    handoff: Option<HandoffWait>,
    entries_skipped: u64,
    last_skipped: Option<LogId>,
    voided: Option<VoidedEntries>,
    dead_letter_file: Option<String>,
    fence: Option<String>,
    split_entries: u64,
    echoes: u64,
    fallback_snapshots: u64,
    foreign_writes: u64,
    foreign_windows: u64,
    foreign_samples: Vec<String>,
    cluster: Option<String>,
    /// A reply the target is late with.
    stall: Option<Stall>,
    /// `ferry skip` asked to skip this entry (the blocked one).
    skip_request: Option<LogId>,
    /// ONLINE to OFFLINE transitions: the target lost, then reconnected.
    reconnects: u64,
}

/// Shared status of one applier.
#[derive(Debug)]
pub struct ApplyStatus {
    partition: PartitionId,
    fields: Mutex<StatusFields>,
    /// Wakes the applier out of its retry wait when a skip is requested.
    wake: Notify,
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
    /// The entry the applier is held at (state BLOCKED), if any.
    pub blocked: Option<BlockedEntry>,
    /// What the applier waits for (state HANDOFF), if anything.
    pub handoff: Option<HandoffWait>,
    /// Entries skipped (by `ferry skip` or `on-refused =
    /// "skip-and-record"`) and recorded in the dead-letter file.
    pub entries_skipped: u64,
    pub last_skipped: Option<LogId>,
    /// Entries of aborted slot imports skipped (docs/cluster.md, rule 9).
    pub voided: Option<VoidedEntries>,
    /// Where skipped entries are recorded.
    pub dead_letter_file: Option<String>,
    /// How late batches of abandoned connections are kept out
    /// (`client-kill`, or `watch-only: <why>`); `None` before the first
    /// session.
    pub fence: Option<String>,
    /// Entries of the source applied as several transactions because their
    /// keys live in several slots of a cluster target (or, for `FLUSHALL`
    /// and functions, on several masters): each piece is exactly once, but
    /// the entry is not atomic on the target.
    pub split_entries: u64,
    /// Two-way sync: entries of the source that the other direction's
    /// applier wrote there, covered and never sent back.
    pub echoes: u64,
    /// Fallback snapshots taken for this applier in place of entries its
    /// log lacked (reading the listener's WAL).
    pub fallback_snapshots: u64,
    /// Writes on the target that ferry did not make, seen in the sampling
    /// windows so far ([`super::foreign`]), the windows watched, and the
    /// latest few (`db <n> <COMMAND> "<key>" by <client>`).
    pub foreign_writes: u64,
    pub foreign_windows: u64,
    pub foreign_samples: Vec<String>,
    /// A cluster target: its masters, and the slot the applier waits on
    /// (migrating, `TRYAGAIN`, `CLUSTERDOWN`), if any; `None` for a
    /// standalone target.
    pub cluster: Option<String>,
    /// Times the applier lost the target (ONLINE to OFFLINE).
    pub reconnects: u64,
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
                blocked: None,
                handoff: None,
                entries_skipped: 0,
                last_skipped: None,
                voided: None,
                dead_letter_file: None,
                fence: None,
                split_entries: 0,
                echoes: 0,
                fallback_snapshots: 0,
                foreign_writes: 0,
                foreign_windows: 0,
                foreign_samples: Vec::new(),
                cluster: None,
                stall: None,
                skip_request: None,
                reconnects: 0,
            }),
            wake: Notify::new(),
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
        self.snapshot_at(now_unix_ms())
    }

    fn snapshot_at(&self, now_unix_ms: u64) -> ApplyReport {
        let fields = self.lock().clone();
        let stalled = fields
            .stall
            .as_ref()
            .filter(|_| fields.state == SyncState::Online && fields.blocked.is_none());
        ApplyReport {
            partition: self.partition,
            state: if fields.blocked.is_some() {
                SyncState::Blocked
            } else if stalled.is_some() {
                SyncState::Stalled
            } else if fields.handoff.is_some() && fields.state == SyncState::Online {
                SyncState::Handoff
            } else {
                fields.state
            },
            last_error: match stalled {
                Some(stall) => Some(format!(
                    "the target {} has not answered for {:.1} s (the session ends, and is \
                     retried, at reply-timeout {:?})",
                    stall.target,
                    now_unix_ms.saturating_sub(stall.since_unix_ms) as f64 / 1000.0,
                    stall.reply_timeout
                )),
                None => fields.last_error,
            },
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
            blocked: fields.blocked,
            handoff: fields.handoff,
            entries_skipped: fields.entries_skipped,
            last_skipped: fields.last_skipped,
            voided: fields.voided,
            dead_letter_file: fields.dead_letter_file,
            fence: fields.fence,
            split_entries: fields.split_entries,
            echoes: fields.echoes,
            fallback_snapshots: fields.fallback_snapshots,
            foreign_writes: fields.foreign_writes,
            foreign_windows: fields.foreign_windows,
            foreign_samples: fields.foreign_samples,
            cluster: fields.cluster,
            reconnects: fields.reconnects,
        }
    }

    /// The full status, with lag and latency measured against `wal` now.
    /// Blocking: reads the oldest pending entry (one point read).
    pub fn report(&self, wal: &Wal) -> Result<ApplyReport, WalError> {
        self.report_at(wal, now_unix_ms())
    }

    /// [`ApplyStatus::report`] as of `now_unix_ms`.
    pub fn report_at(&self, wal: &Wal, now_unix_ms: u64) -> Result<ApplyReport, WalError> {
        let mut report = self.snapshot_at(now_unix_ms);
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
        if fields.state == SyncState::Online {
            fields.reconnects += 1;
        }
        fields.state = SyncState::Offline;
        fields.last_error = Some(error);
        fields.stall = None;
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

    /// Holds the applier at `entry` (state BLOCKED); keeps the time it was
    /// first blocked there.
    pub(crate) fn set_blocked(&self, mut entry: BlockedEntry, error: String) {
        let mut fields = self.lock();
        if let Some(old) = &fields.blocked {
            if old.log_id == entry.log_id {
                entry.since_unix_ms = old.since_unix_ms;
            }
        }
        if fields.skip_request.is_some_and(|id| id != entry.log_id) {
            fields.skip_request = None;
        }
        fields.blocked = Some(entry);
        fields.last_error = Some(error);
    }

    /// The applier got past the entry it was blocked on.
    pub(crate) fn clear_blocked(&self) {
        let mut fields = self.lock();
        fields.blocked = None;
        fields.skip_request = None;
    }

    pub(crate) fn blocked(&self) -> Option<BlockedEntry> {
        self.lock().blocked.clone()
    }

    /// Counts `entries` voided entries, the last one `last` of `slot`'s
    /// tenure `gen`.
    pub(crate) fn add_voided(&self, entries: u64, last: LogId, slot: u16, gen: u64) {
        let mut fields = self.lock();
        let before = fields.voided.map_or(0, |v| v.entries);
        fields.voided = Some(VoidedEntries {
            entries: before + entries,
            last,
            slot,
            gen,
        });
    }

    /// Holds the applier for a slot handoff; keeps the time it first
    /// waited at that entry.
    pub(crate) fn set_handoff(&self, mut wait: HandoffWait) {
        let mut fields = self.lock();
        if let Some(old) = &fields.handoff {
            if old.log_id == wait.log_id {
                wait.since_unix_ms = old.since_unix_ms;
            }
        }
        fields.handoff = Some(wait);
    }

    /// The applier is not (or no longer) waiting for a handoff.
    pub(crate) fn clear_handoff(&self) {
        self.lock().handoff = None;
    }

    /// The target at `target` has not answered for [`stall_after`]: shown
    /// STALLED until [`ApplyStatus::clear_stall`].
    pub(crate) fn set_stall(
        &self,
        target: &str,
        since_unix_ms: u64,
        reply_timeout: std::time::Duration,
    ) {
        self.lock().stall = Some(Stall {
            target: target.to_string(),
            since_unix_ms,
            reply_timeout,
        });
    }

    /// The late reply came (or the wait ended).
    pub(crate) fn clear_stall(&self) {
        self.lock().stall = None;
    }

    /// Records that `log_id` was skipped (and recorded).
    pub(crate) fn add_skipped(&self, log_id: LogId) {
        let mut fields = self.lock();
        fields.entries_skipped += 1;
        fields.last_skipped = Some(log_id);
        if fields.skip_request == Some(log_id) {
            fields.skip_request = None;
        }
    }

    pub(crate) fn set_dead_letter_file(&self, path: Option<String>) {
        self.lock().dead_letter_file = path;
    }

    pub(crate) fn set_fence(&self, fence: String) {
        self.lock().fence = Some(fence);
    }

    pub(crate) fn add_echoes(&self, entries: u64) {
        self.lock().echoes += entries;
    }

    pub(crate) fn add_split_entries(&self, entries: u64) {
        self.lock().split_entries += entries;
    }

    pub(crate) fn add_fallback_snapshot(&self) {
        self.lock().fallback_snapshots += 1;
    }

    /// A foreign-writes window watched: `writes` seen, the latest samples
    /// first kept (at most [`super::foreign::SAMPLES_KEPT`]).
    pub(crate) fn add_foreign_window(
        &self,
        writes: u64,
        samples: Vec<super::foreign::ForeignWrite>,
    ) {
        let mut fields = self.lock();
        fields.foreign_windows += 1;
        fields.foreign_writes += writes;
        if !samples.is_empty() {
            let mut kept: Vec<String> = samples.iter().map(ToString::to_string).collect();
            kept.extend(std::mem::take(&mut fields.foreign_samples));
            kept.truncate(super::foreign::SAMPLES_KEPT);
            fields.foreign_samples = kept;
        }
    }

    pub(crate) fn set_cluster(&self, cluster: Option<String>) {
        self.lock().cluster = cluster;
    }

    /// Asks the applier to skip `log_id`, which must be the entry it is
    /// blocked on; it does so (recording it in the dead-letter file first)
    /// when it next gets to it, which is at once if it is waiting to
    /// retry. Returns the dead-letter file.
    pub fn request_skip(&self, log_id: LogId) -> Result<String, SkipRefused> {
        let mut fields = self.lock();
        let partition = self.partition;
        let Some(blocked) = &fields.blocked else {
            return Err(SkipRefused::NotBlocked { partition });
        };
        if blocked.log_id != log_id {
            return Err(SkipRefused::OtherEntry {
                partition,
                blocked_on: blocked.log_id,
                requested: log_id,
            });
        }
        let Some(file) = fields.dead_letter_file.clone() else {
            return Err(SkipRefused::NoDeadLetter { partition });
        };
        fields.skip_request = Some(log_id);
        drop(fields);
        self.wake.notify_one();
        Ok(file)
    }

    /// Whether the operator asked to skip `log_id`.
    pub(crate) fn skip_requested(&self, log_id: LogId) -> bool {
        self.lock().skip_request == Some(log_id)
    }

    /// Resolves when a skip is requested (or at once if one was requested
    /// since the last wait).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handoff_wait_shows_as_handoff_unless_blocked_or_offline() {
        let status = ApplyStatus::new(PartitionId(1));
        status.set_online();
        let wait = HandoffWait {
            log_id: LogId(9),
            slot: 7,
            gen: 1,
            current: Some((0, 0)),
            since_unix_ms: 5,
        };
        status.set_handoff(wait.clone());
        status.set_handoff(HandoffWait {
            since_unix_ms: 6,
            ..wait.clone()
        });
        let report = status.snapshot();
        assert_eq!(report.state, SyncState::Handoff);
        assert_eq!(report.state.to_string(), "HANDOFF");
        assert_eq!(report.handoff, Some(wait.clone()), "keeps when it began");
        assert_eq!(
            wait.to_string(),
            "entry 9 waits for slot 7 to be handed to this partition (tenure generation 1); \
             the target's owner map has partition 0 generation 0"
        );
        status.set_offline("target down".into());
        assert_eq!(status.snapshot().state, SyncState::Offline);
        status.set_online();
        status.clear_handoff();
        assert_eq!(status.snapshot().state, SyncState::Online);
    }

    #[test]
    fn a_late_reply_shows_stalled_with_the_target_and_how_long() {
        let status = ApplyStatus::new(PartitionId(0));
        status.set_online();
        let timeout = std::time::Duration::from_secs(60);
        assert_eq!(stall_after(timeout), std::time::Duration::from_secs(5));
        assert_eq!(
            stall_after(std::time::Duration::from_secs(1)),
            std::time::Duration::from_millis(500)
        );
        status.set_stall("127.0.0.1:7000", 10_000, timeout);
        let report = status.snapshot_at(17_500);
        assert_eq!(report.state.to_string(), "STALLED");
        assert_eq!(
            report.last_error.as_deref(),
            Some(
                "the target 127.0.0.1:7000 has not answered for 7.5 s (the session ends, and is \
                 retried, at reply-timeout 60s)"
            )
        );
        // A hold at a refused entry is what an operator must act on.
        let entry = BlockedEntry {
            log_id: LogId(3),
            command: "SET".into(),
            error: "OOM".into(),
            transient: true,
            since_unix_ms: 1,
        };
        status.set_blocked(entry, "OOM command not allowed".into());
        let report = status.snapshot();
        assert_eq!(report.state, SyncState::Blocked);
        assert_eq!(
            report.last_error.as_deref(),
            Some("OOM command not allowed")
        );
        status.clear_blocked();
        status.clear_stall();
        assert_eq!(status.snapshot_at(20_000).state, SyncState::Online);
        // A session that ended is OFFLINE with its own error.
        status.set_stall("127.0.0.1:7000", 10_000, timeout);
        status.set_offline("timed out".into());
        let report = status.snapshot();
        assert_eq!(report.state, SyncState::Offline);
        assert_eq!(report.last_error.as_deref(), Some("timed out"));
    }
}
