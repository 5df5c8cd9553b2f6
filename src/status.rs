//! What a ferry process reports about itself: the rows of `ferry status`.
//!
//! In: readings of the listener, shipper and applier status cells, taken by
//! the node ([`crate::node`]) that runs them. Out: a [`NodeStatus`] value,
//! which the admin API turns into its protobuf reply and `ferry status
//! --json` prints as JSON.
//!
//! The columns follow NebulaGraph's `SHOW SYNC STATUS`: per partition, a
//! Sync Status (ONLINE/OFFLINE/STOPPED), a LogId Lag (entries not yet acked
//! by the next stage) and a Time Latency (ms from now back to the oldest
//! such entry; 0 when nothing is pending).

use serde::Serialize;

/// Everything one process runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// `"listener"`, `"drainer"` or `"sync"` (both in one process).
    pub role: String,
    /// Unix ms when this reading was taken.
    pub taken_unix_ms: u64,
    /// One per listener partition.
    pub listeners: Vec<ListenerSide>,
    /// One per (drainer, partition) applier.
    pub drainers: Vec<DrainerSide>,
    /// A two-way sync, established: its conflicts.
    pub two_way: Option<TwoWayStatus>,
    /// The process's WALs: what they wrote, how long their fsyncs took.
    pub wals: Vec<WalStatus>,
}

/// One WAL of a process (`ferry sync` applying from the listener's WAL has
/// one, a relayed `ferry sync` two).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WalStatus {
    /// Whose log it is: `listener` or `drainer`.
    pub wal: String,
    /// Bytes of entries (as accounted against the size cap) and snapshot
    /// chunks written since the process started.
    pub bytes_written: u64,
    /// Write batches (one RocksDB write each).
    pub batches_written: u64,
    /// Duration of each synced write (the batch's fsync).
    pub fsync: LatencyHistogram,
}

/// Durations counted in buckets (not cumulative: each observation is in
/// one bucket).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LatencyHistogram {
    /// Upper bounds of the buckets in microseconds, increasing.
    pub bounds_us: Vec<u64>,
    /// Observations per bucket: `counts[i]` took at most `bounds_us[i]`
    /// and more than the bound before; one more entry at the end counts
    /// those above the last bound.
    pub counts: Vec<u64>,
    /// Sum of every observation, microseconds.
    pub sum_us: u64,
}

/// A two-way sync's conflicts: one key written on both sides before either
/// saw the other's write (`src/node/conflicts.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TwoWayStatus {
    /// Conflicts found so far.
    pub conflicts: u64,
    /// The latest one: `db <n> "<key>"`.
    pub last_conflict: Option<String>,
    /// Where each is appended (JSON lines).
    pub conflict_log: String,
    /// Entries the detector could not examine (trimmed before it read them,
    /// or pushed out of a full window).
    pub unexamined: u64,
    /// The policy: `report`, `source-wins`, `target-wins`.
    pub policy: String,
    /// Keys a winner policy wrote again (a key's conflicts share one repair,
    /// at the latest winner's write), and the repairs still waiting for
    /// their side to apply the winner's write.
    pub repaired: u64,
    pub repairs_owed: u64,
    /// What the sync runs between (`standalone`, `clusters`,
    /// `standalone-cluster`, `cluster-standalone`): A's partitions are
    /// below 1000 and B's from 1000, but for two standalone servers (0
    /// and 1).
    pub pair: String,
}

/// A listener partition: its link to the source and what it ships.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ListenerSide {
    pub listener_id: String,
    pub partition: u32,
    /// The source address, never with its password (of a cluster source:
    /// the shard's master of the moment).
    pub source: String,
    /// The source shard this partition replicates (a cluster source only).
    pub shard: Option<SourceShard>,
    /// CONNECTING, FULL_SYNC, ONLINE, OFFLINE, or STOPPED (an entry ferry
    /// cannot carry; `source_error` names it).
    pub source_state: String,
    pub source_error: Option<String>,
    /// The source's replication id and the offsets received / acked to it.
    pub replid: Option<String>,
    pub received_offset: u64,
    pub durable_offset: u64,
    /// First and last log id held in the listener's WAL.
    pub first_log_id: u64,
    pub last_log_id: u64,
    pub full_syncs: u64,
    pub partial_resyncs: u64,
    /// RDB bytes received by the current (or last) full sync, and its size
    /// once known.
    pub full_sync_bytes_received: u64,
    pub full_sync_bytes_total: Option<u64>,
    /// Heartbeat round trip (source write → durable in the WAL).
    pub heartbeat_latency_ms: Option<u64>,
    /// Times the link to the source was lost, or could not be made, and
    /// ferry reconnected.
    pub reconnects: u64,
    /// One per drainer this partition ships to.
    pub shipping: Vec<ShipSide>,
}

/// A shard of a cluster source, as the listener last read the topology.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceShard {
    /// The node id of its master (empty while none is known).
    pub master_id: String,
    /// The slots its master serves, `0-5460,5462` (empty: idle, the shard
    /// lost all its slots or its nodes left the cluster).
    pub slots: String,
    pub slot_count: u32,
    /// Slot handoffs waiting for the stream to reach their offset
    /// (docs/cluster.md, rule 2).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_handoffs: Vec<String>,
}

/// Shipping of one listener partition to one drainer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShipSide {
    pub drainer_id: String,
    pub endpoint: String,
    /// ONLINE (stream established), OFFLINE (retrying) or STOPPED
    /// (`ferry stop-sync`).
    pub state: String,
    /// Last log id the drainer made durable.
    pub acked: u64,
    /// Entries the drainer does not have yet.
    pub lag: u64,
    /// Ms from now back to the oldest entry not acked; 0 if none.
    pub latency_ms: u64,
    pub fallback_snapshots: u64,
    pub entries_sent: u64,
    pub bytes_sent: u64,
    pub last_error: Option<String>,
    /// Times a stream to the drainer ended or could not be made, and the
    /// shipper reconnected.
    pub reconnects: u64,
}

/// One applier: a partition of a drainer's WAL applied to a target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DrainerSide {
    pub drainer_id: String,
    pub partition: u32,
    /// The target address, never with its password.
    pub target: String,
    /// ONLINE (applying), OFFLINE (target unreachable or refusing;
    /// `last_error` says why), BLOCKED (held at the entry `blocked`
    /// names: the target refuses it when queued) or HANDOFF (held until
    /// another partition hands a slot over: `handoff` says which).
    pub state: String,
    pub last_error: Option<String>,
    /// The listener whose stream is connected, if one is.
    pub connected_listener: Option<String>,
    /// Last log id durable in the drainer's WAL, and last applied to the
    /// target.
    pub durable: u64,
    pub applied: u64,
    /// `durable - applied`.
    pub lag: u64,
    /// Ms from now back to the oldest entry not applied; 0 if none.
    pub latency_ms: u64,
    /// Snapshot epoch the target's data is based on.
    pub epoch: u64,
    pub commands_applied: u64,
    /// Commands the target refused inside a committed batch (not retried).
    pub commands_refused: u64,
    /// The latest snapshot load (full sync) into the target, if any.
    pub snapshot_load: Option<SnapshotLoad>,
    /// The entry the applier is held at (state BLOCKED).
    pub blocked: Option<BlockedEntry>,
    /// Entries skipped (`ferry skip`, or `on-refused = "skip-and-record"`),
    /// each recorded in `dead_letter_file`.
    pub entries_skipped: u64,
    pub last_skipped: Option<u64>,
    pub dead_letter_file: Option<String>,
    /// How a late batch of an abandoned connection is kept out:
    /// `client-kill`, or `watch-only: <why>` when the target user may not
    /// use `CLIENT`; absent before the first connection.
    pub fence: Option<String>,
    /// The last command the target refused inside a committed batch.
    pub last_refused: Option<RefusedCommand>,
    /// Entries applied as several transactions because their keys are in
    /// several slots of a cluster target: each piece exactly once, the
    /// entry not atomic.
    pub split_entries: u64,
    /// Two-way sync: entries of the source that the other direction wrote
    /// there, covered and never sent back.
    pub echoes: u64,
    /// Fallback snapshots loaded in place of entries the log lacked (`ferry
    /// sync`, applying from the listener's WAL).
    pub fallback_snapshots: u64,
    /// Writes on a standalone target that ferry did not make, seen in the
    /// sampling windows so far (`[apply] foreign-writes-every`); the windows
    /// watched; the latest few (`db <n> <COMMAND> "<key>" by <client>`).
    pub foreign_writes: u64,
    pub foreign_windows: u64,
    pub foreign_samples: Vec<String>,
    /// A cluster target: its masters, and the slot the applier waits on
    /// (a migration, `TRYAGAIN`, `CLUSTERDOWN`), if any.
    pub cluster: Option<String>,
    /// State HANDOFF (a cluster source's resharding): the entry held, the
    /// slot it waits for and the slot's owner now.
    pub handoff: Option<String>,
    /// Entries of a cluster source's aborted slot imports skipped, never
    /// applied (docs/cluster.md, rule 9): how many, the last one.
    pub voided: Option<String>,
    /// Times the applier lost the target (ONLINE to OFFLINE) and
    /// reconnected.
    pub reconnects: u64,
}

/// An entry the target refuses when it is queued, holding its partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BlockedEntry {
    pub log_id: u64,
    /// The refused command's name.
    pub command: String,
    /// The target's error.
    pub error: String,
    /// About the target's state (`OOM`, `READONLY`, ...): retried until it
    /// clears, never skipped by itself.
    pub transient: bool,
    /// When the applier first found it blocked there (unix ms).
    pub since_unix_ms: u64,
}

/// A command the target refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RefusedCommand {
    pub log_id: u64,
    pub command: String,
    pub error: String,
}

/// Progress of loading a snapshot into the target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotLoad {
    pub epoch: u64,
    pub rdb_bytes: u64,
    pub bytes_loaded: u64,
    pub keys_loaded: u64,
    pub done: bool,
}

/// Which shippers a `stop-sync` / `restart-sync` applies to; `None` fields
/// match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncSelector {
    pub partition: Option<u32>,
    pub drainer_id: Option<String>,
}

/// `ferry skip`: the entry to skip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipRequest {
    pub partition: u32,
    pub log_id: u64,
    /// The drainer whose applier it is; `None`: the process's only one.
    pub drainer_id: Option<String>,
}

/// What a skip request did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipOutcome {
    /// Where the entry is (or will be) recorded.
    pub dead_letter_file: String,
    /// The applier skipped it before the reply (else it will when it next
    /// gets to it; `ferry status` shows it).
    pub done: bool,
}

/// Error of a control request, shown to the operator as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("this process runs no listener, so it has no sync to {0}")]
    NoListener(&'static str),
    #[error("no sync matches partition {partition:?} drainer {drainer_id:?}")]
    NoMatch {
        partition: Option<u32>,
        drainer_id: Option<String>,
    },
    #[error("this process runs no drainer, so it has no entry to skip")]
    NoDrainer,
    #[error("no applier of partition {partition} (drainer {drainer_id:?}) runs here")]
    NoApplier {
        partition: u32,
        drainer_id: Option<String>,
    },
    /// The request does not fit the applier's state (not blocked, or on
    /// another entry).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// What the admin API needs from a running process (implemented by the
/// nodes in [`crate::node`]).
pub trait NodeControl: Send + Sync + 'static {
    /// A reading of every stage now. May block briefly (point reads of the
    /// WAL); call it from a blocking-friendly context.
    fn status(&self) -> NodeStatus;
    /// Stops shipping to the selected drainers (in a `ferry sync` that
    /// applies from the listener's WAL: stops the selected partitions'
    /// appliers): the listener keeps replicating and its WAL accumulates
    /// (subject to `wal-ttl`). Persisted: a restarted process stays
    /// stopped. Returns how many syncs changed.
    fn stop_sync(&self, which: &SyncSelector) -> Result<usize, ControlError>;
    /// Resumes shipping (or applying): the drainer gets what accumulated,
    /// or a fallback snapshot if entries it needs expired. Returns how many
    /// changed.
    fn restart_sync(&self, which: &SyncSelector) -> Result<usize, ControlError>;
    /// Skips the entry a partition's applier is blocked on (only that one),
    /// recording it in the dead-letter file first. May block briefly to
    /// report whether it was done.
    fn skip(&self, request: &SkipRequest) -> Result<SkipOutcome, ControlError>;
    /// Reverses a running one-way sync (`ferry switchover`): writes paused
    /// on the source, the target caught up, the old target replicated into
    /// the old source from the exact position, the pause lifted. The
    /// report lists every step, also when it failed (then the old direction
    /// runs on). Only `ferry sync` can; the default refuses.
    fn switchover(
        &self,
        _timeout: std::time::Duration,
    ) -> futures::future::BoxFuture<'static, Result<SwitchoverReport, ControlError>> {
        Box::pin(async {
            Err(ControlError::Refused(
                "only `ferry sync` can switch over (a listener and drainer pair cannot yet)".into(),
            ))
        })
    }
}

/// What `ferry switchover` did, step by step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SwitchoverReport {
    pub steps: Vec<SwitchStep>,
    /// Why it stopped; `None`: the direction is reversed.
    pub error: Option<String>,
    /// The sync's direction once it ended (addresses, no credentials).
    pub source: String,
    pub target: String,
    /// How long the old source's writes were paused: from `CLIENT PAUSE` to
    /// the last master's `CLIENT UNPAUSE` (or the report, when none ran).
    pub write_pause_ms: u64,
}

/// One step of a switchover and how long it took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SwitchStep {
    pub name: String,
    pub millis: u64,
    pub detail: String,
}
