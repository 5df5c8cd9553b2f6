//! [`Wal`]: the handle to a partitioned WAL, its group-commit writer task and
//! its retention task.
//!
//! In: append / ack / apply / trim / snapshot requests from any number of
//! tasks. Out: each request resolves once the batch holding it is durable
//! (fsynced when `sync`; a batch of acks and applied marks alone is written
//! without a fsync of its own, since they are advisory: see `commit`), with
//! the ids it was given or a typed error; reads return durable entries only.
//!
//! The writer is the only task that mutates the storage. It collects requests
//! until `group-commit-linger` passed or `group-commit-max-bytes` of payload
//! are pending, validates them against the committed positions (so an ack in
//! the same batch as the append it names is rejected: that entry was not
//! durable when the ack was sent), writes one batch, and only then publishes
//! the new positions and answers.

use crate::position::now_unix_ms;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::codec::encoded_entry_len;
use super::metrics::WalMetrics;
use super::storage::{StoredPartition, WalStorage, WriteOp};
use super::tail::Tails;
use super::{
    random_id, AppendedRange, DownstreamId, LogMeta, NewEntry, PartitionHistory,
    PartitionPositions, ReadLimits, RocksWalStorage, SnapshotState, WalConfig, WalEntry, WalError,
    MAX_OWNER_LEN, MAX_PAYLOAD_LEN, MAX_REPLID_LEN,
};
use crate::position::{LogId, PartitionId};

/// Committed state of one partition, as the writer last made it durable.
#[derive(Debug, Clone, Default)]
struct PartitionState {
    log: LogMeta,
    received: LogId,
    applied: LogId,
    acks: BTreeMap<DownstreamId, LogId>,
    snapshot: SnapshotState,
    history: Option<PartitionHistory>,
}

impl From<StoredPartition> for PartitionState {
    fn from(stored: StoredPartition) -> Self {
        PartitionState {
            received: stored.log.last,
            log: stored.log,
            applied: stored.applied,
            acks: stored.acks,
            snapshot: stored.snapshot,
            history: stored.history,
        }
    }
}

/// How a caller takes up a partition's history record
/// ([`Wal::open_history`], [`Wal::follow_history`]).
#[derive(Debug, Clone)]
enum HistoryClaim {
    /// A listener's own log: the record is created, with a new random
    /// incarnation, if it is absent; otherwise left as it is.
    Own { owner: String },
    /// A drainer's mirror: a record is created if absent (no owner, no
    /// incarnation, a new log tag); `owner` claims it if nobody has; while
    /// the log is empty, the owner's `incarnation` is adopted.
    Follow {
        owner: Option<String>,
        incarnation: u64,
    },
}

#[derive(Default)]
struct Shared {
    partitions: HashMap<PartitionId, PartitionState>,
    poisoned: Option<String>,
    /// The latest entries of each partition, for caught-up readers: put in
    /// when their batch goes to the storage, read only up to the durable end
    /// (`partitions`) except by an early reader ([`Wal::read_written`]).
    tails: Tails,
    /// Each partition's last id handed to the storage, durable or not yet
    /// (at least its durable end once that batch committed).
    written: HashMap<PartitionId, LogId>,
}

enum Request {
    Append {
        partition: PartitionId,
        entries: Vec<NewEntry>,
    },
    AppendAt {
        partition: PartitionId,
        first: LogId,
        entries: Vec<NewEntry>,
    },
    Reset {
        partition: PartitionId,
        start: LogId,
        entry: NewEntry,
        history: Option<PartitionHistory>,
    },
    History {
        partition: PartitionId,
        claim: HistoryClaim,
    },
    Register {
        partition: PartitionId,
        downstream: DownstreamId,
    },
    Unregister {
        partition: PartitionId,
        downstream: DownstreamId,
    },
    Ack {
        partition: PartitionId,
        downstream: DownstreamId,
        log_id: LogId,
    },
    Apply {
        partition: PartitionId,
        log_id: LogId,
    },
    Trim {
        partition: PartitionId,
        before: LogId,
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
    DeleteSnapshot {
        partition: PartitionId,
        epoch: u64,
    },
}

impl Request {
    fn partition(&self) -> PartitionId {
        match self {
            Request::Append { partition, .. }
            | Request::AppendAt { partition, .. }
            | Request::Reset { partition, .. }
            | Request::History { partition, .. }
            | Request::Register { partition, .. }
            | Request::Unregister { partition, .. }
            | Request::Ack { partition, .. }
            | Request::Apply { partition, .. }
            | Request::Trim { partition, .. }
            | Request::SnapshotChunk { partition, .. }
            | Request::SnapshotState { partition, .. }
            | Request::DeleteSnapshot { partition, .. } => *partition,
        }
    }

    /// Bytes this request adds to a batch, for the group-commit size limit.
    fn batch_bytes(&self) -> usize {
        match self {
            Request::Append { entries, .. } | Request::AppendAt { entries, .. } => {
                entries.iter().map(|e| e.payload.len() + 64).sum()
            }
            Request::Reset { entry, .. } => entry.payload.len() + 64,
            Request::SnapshotChunk { data, .. } => data.len() + 32,
            _ => 32,
        }
    }
}

enum Outcome {
    Appended(AppendedRange),
    Trimmed(LogId),
    History(PartitionHistory),
    Done,
}

/// Granularity of tokio's timer; shorter lingers are waited by yielding.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// Test hook for the crash tests of early apply: `FERRY_TEST_WAL_SYNC_DELAY_MS`
/// makes every synced write wait this long before it starts, so that an
/// early reader is reliably ahead of the durable end when the process is
/// killed. Unset (always, outside those tests): no delay.
fn test_sync_delay() -> Option<Duration> {
    let ms = std::env::var("FERRY_TEST_WAL_SYNC_DELAY_MS").ok()?;
    let ms: u64 = ms.trim().parse().ok()?;
    warn!(
        ms,
        "FERRY_TEST_WAL_SYNC_DELAY_MS is set: every synced wal write is delayed (a test hook)"
    );
    Some(Duration::from_millis(ms))
}

type Reply = oneshot::Sender<Result<Outcome, WalError>>;

enum Command {
    Request(Request, Reply),
    Shutdown,
}

struct Inner {
    storage: Arc<dyn WalStorage>,
    config: WalConfig,
    shared: Arc<Mutex<Shared>>,
    command_tx: mpsc::Sender<Command>,
    writer: Mutex<Option<JoinHandle<()>>>,
    retention: Mutex<Option<JoinHandle<()>>>,
    shutdown_tx: watch::Sender<bool>,
    /// Bumped after every committed batch that appended entries.
    appended_tx: Arc<watch::Sender<u64>>,
    /// Bumped when a batch that appends entries goes to the storage, before
    /// its fsync ([`Wal::subscribe_written`]).
    written_tx: Arc<watch::Sender<u64>>,
    /// Snapshot epochs being read right now ([`Wal::pin_snapshot`]), with
    /// their reader counts; [`Wal::collect_snapshots`] leaves them alone.
    pins: Arc<Mutex<HashMap<(PartitionId, u64), usize>>>,
    /// Why writes are paused for lack of disk space, while they are.
    disk_state: Arc<Mutex<Option<String>>>,
    /// Bytes and batches written, fsync latencies.
    metrics: Arc<WalMetrics>,
}

/// Keeps a snapshot epoch from [`Wal::collect_snapshots`] while it lives
/// (in memory only: a restart forgets every pin, and so do its readers).
pub struct SnapshotPin {
    pins: Arc<Mutex<HashMap<(PartitionId, u64), usize>>>,
    key: (PartitionId, u64),
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        let mut pins = self
            .pins
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(count) = pins.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.key);
            }
        }
    }
}

/// An append queued by [`Wal::submit_append_at`]; resolves with its ids
/// once durable.
pub struct PendingAppend(oneshot::Receiver<Result<Outcome, WalError>>);

impl std::future::Future for PendingAppend {
    type Output = Result<AppendedRange, WalError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|reply| match reply {
                Ok(Ok(Outcome::Appended(range))) => Ok(range),
                Ok(Ok(_)) | Err(_) => Err(WalError::Closed),
                Ok(Err(error)) => Err(error),
            })
    }
}

/// Handle to an open WAL; cheap to clone. Must be opened inside a tokio
/// runtime (it spawns its writer and retention tasks).
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // Writers replace whole partition states under the lock, so a poisoned
    // lock still guards consistent data.
    shared.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn join_error(error: tokio::task::JoinError) -> WalError {
    WalError::Io(std::io::Error::other(format!("wal task failed: {error}")))
}

/// Checks the recovery invariants (module doc, 1 and 2) of stored progress.
/// Stored ids below `first` are garbage of trims (invariant 2) and ignored.
fn check_recovered(storage: &dyn WalStorage, stored: &StoredPartition) -> Result<(), WalError> {
    let partition = stored.partition;
    let inconsistent = |what: String| WalError::Inconsistent { partition, what };
    let log = &stored.log;
    let bounds = storage.stored_bounds(partition, log.first)?;
    if log.first <= log.last {
        let Some((lowest, highest)) = bounds else {
            return Err(inconsistent(format!(
                "meta holds entries {}..={} but none are stored",
                log.first, log.last
            )));
        };
        if highest != log.last {
            return Err(inconsistent(format!(
                "greatest stored entry is {highest} but meta says last is {}",
                log.last
            )));
        }
        if lowest != log.first {
            return Err(inconsistent(format!(
                "smallest stored entry from {} on is {lowest} but meta says first is {}",
                log.first, log.first
            )));
        }
    } else if let Some((lowest, highest)) = bounds {
        return Err(inconsistent(format!(
            "entries {lowest}..={highest} are stored but meta says the log is empty before {}",
            log.first
        )));
    }
    if stored.applied > log.last {
        return Err(inconsistent(format!(
            "applied {} is beyond durable {}",
            stored.applied, log.last
        )));
    }
    if let Some((downstream, acked)) = stored.acks.iter().find(|(_, acked)| **acked > log.last) {
        return Err(inconsistent(format!(
            "downstream {downstream} acked {acked} beyond durable {}",
            log.last
        )));
    }
    Ok(())
}

impl Wal {
    /// Opens the RocksDB WAL in `config.dir`, checks the recovery invariants
    /// and starts the writer and retention tasks.
    pub async fn open(config: WalConfig) -> Result<Wal, WalError> {
        let config = config.validate()?;
        let open_config = config.clone();
        let storage = tokio::task::spawn_blocking(move || RocksWalStorage::open(&open_config))
            .await
            .map_err(join_error)??;
        Wal::with_storage(Arc::new(storage), config).await
    }

    /// Runs the WAL on any storage (the in-memory one in tests).
    pub async fn with_storage(
        storage: Arc<dyn WalStorage>,
        config: WalConfig,
    ) -> Result<Wal, WalError> {
        let config = config.validate()?;
        let load_storage = Arc::clone(&storage);
        let partitions = tokio::task::spawn_blocking(move || {
            let stored = load_storage.load_progress()?;
            let mut partitions = HashMap::new();
            for partition in stored {
                check_recovered(load_storage.as_ref(), &partition)?;
                // Garbage left by a crash before its release goes now, and
                // the storage learns the first ids.
                load_storage.release_trimmed(partition.partition, partition.log.first)?;
                partitions.insert(partition.partition, PartitionState::from(partition));
            }
            // A log without a meta record must be empty (invariant 1).
            for partition in load_storage.log_partitions()? {
                if !partitions.contains_key(&partition) {
                    let empty = StoredPartition {
                        partition,
                        ..StoredPartition::default()
                    };
                    check_recovered(load_storage.as_ref(), &empty)?;
                }
            }
            Ok::<_, WalError>(partitions)
        })
        .await
        .map_err(join_error)??;
        info!(partitions = partitions.len(), "wal recovered");

        let shared = Arc::new(Mutex::new(Shared {
            partitions,
            poisoned: None,
            tails: Tails::new(config.tail_bytes.as_usize()),
            written: HashMap::new(),
        }));
        let (command_tx, command_rx) = mpsc::channel(config.queue_depth);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let appended_tx = Arc::new(watch::channel(0u64).0);
        let written_tx = Arc::new(watch::channel(0u64).0);
        let disk_state = Arc::new(Mutex::new(None));
        let metrics = Arc::new(WalMetrics::default());
        let writer = GroupCommitWriter {
            metrics: Arc::clone(&metrics),
            appended_tx: Arc::clone(&appended_tx),
            written_tx: Arc::clone(&written_tx),
            sync_delay: test_sync_delay(),
            storage: Arc::clone(&storage),
            shared: Arc::clone(&shared),
            sync: config.sync,
            linger: config.group_commit_linger.0,
            max_bytes: config.group_commit_max_bytes.as_usize(),
            buffered_limit: config.memtable_budget.as_u64().saturating_mul(2),
            last_buffer_check: None,
            over_buffer_limit: false,
            disk: DiskGuard {
                dir: config.dir.clone(),
                min_free: config.min_free_space.as_u64(),
                last_check: None,
                low: false,
                errors_at_pause: 0,
                storage: Arc::clone(&storage),
                shutdown: shutdown_rx.clone(),
                state: Arc::clone(&disk_state),
            },
            release: None,
            keeps_tail: config.tail_bytes.as_u64() > 0,
        };
        let writer_task = tokio::spawn(writer.run(command_rx));
        let inner = Arc::new(Inner {
            storage,
            config,
            shared,
            command_tx,
            writer: Mutex::new(Some(writer_task)),
            retention: Mutex::new(None),
            shutdown_tx,
            appended_tx,
            written_tx,
            pins: Arc::new(Mutex::new(HashMap::new())),
            disk_state,
            metrics,
        });
        let retention_task = tokio::spawn(run_retention(
            Arc::downgrade(&inner),
            inner.config.retention_interval.0,
            shutdown_rx,
        ));
        *inner
            .retention
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(retention_task);
        Ok(Wal { inner })
    }

    /// Flushes what was received, stops the tasks and waits for them. Other
    /// clones of this handle get [`WalError::Closed`] afterwards.
    pub async fn close(self) -> Result<(), WalError> {
        let _ = self.inner.shutdown_tx.send(true);
        let _ = self.inner.command_tx.send(Command::Shutdown).await;
        let writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(writer) = writer {
            writer.await.map_err(join_error)?;
        }
        let retention = self
            .inner
            .retention
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some(retention) = retention {
            retention.await.map_err(join_error)?;
        }
        Ok(())
    }

    /// Why appends are paused (the file system is below `min-free-space`),
    /// while they are; `None` when writing normally.
    pub fn disk_pause(&self) -> Option<String> {
        self.inner
            .disk_state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    pub fn config(&self) -> &WalConfig {
        &self.inner.config
    }

    /// What this WAL wrote since it was opened, and how long its fsyncs
    /// took.
    pub fn metrics(&self) -> &WalMetrics {
        &self.inner.metrics
    }

    /// The storage under this WAL (read-only use: writing to it directly
    /// bypasses the position checks).
    pub fn storage(&self) -> &Arc<dyn WalStorage> {
        &self.inner.storage
    }

    async fn call(&self, request: Request) -> Result<Outcome, WalError> {
        self.submit(request)
            .await?
            .await
            .map_err(|_| WalError::Closed)?
    }

    /// Queues `request`; the receiver resolves once its batch is durable.
    async fn submit(
        &self,
        request: Request,
    ) -> Result<oneshot::Receiver<Result<Outcome, WalError>>, WalError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.inner
            .command_tx
            .send(Command::Request(request, reply_tx))
            .await
            .map_err(|_| WalError::Closed)?;
        Ok(reply_rx)
    }

    /// [`Wal::append_at`] split in two: this resolves once the request is
    /// queued, the returned [`PendingAppend`] once it is durable. Requests
    /// are staged in the order they were queued, so a caller may queue
    /// `first..=k` and then `k+1..` before the first is durable: both can
    /// share a group commit instead of paying one fsync each. If one fails,
    /// every later one of the partition fails too (its `first` no longer
    /// follows).
    pub async fn submit_append_at(
        &self,
        partition: PartitionId,
        first: LogId,
        entries: Vec<NewEntry>,
    ) -> Result<PendingAppend, WalError> {
        let request = Request::AppendAt {
            partition,
            first,
            entries,
        };
        Ok(PendingAppend(self.submit(request).await?))
    }

    /// Appends `entries` to `partition`; resolves with their ids once they
    /// are durable.
    pub async fn append(
        &self,
        partition: PartitionId,
        entries: Vec<NewEntry>,
    ) -> Result<AppendedRange, WalError> {
        match self.call(Request::Append { partition, entries }).await? {
            Outcome::Appended(range) => Ok(range),
            _ => Err(WalError::Closed),
        }
    }

    /// Appends `entries` at ids `first..`, for a WAL that mirrors another
    /// one's ids (a drainer keeps the listener's ids). `first` must be
    /// exactly the id after the last one taken
    /// ([`WalError::NotContiguous`] otherwise), so the log stays dense.
    pub async fn append_at(
        &self,
        partition: PartitionId,
        first: LogId,
        entries: Vec<NewEntry>,
    ) -> Result<AppendedRange, WalError> {
        let request = Request::AppendAt {
            partition,
            first,
            entries,
        };
        match self.call(request).await? {
            Outcome::Appended(range) => Ok(range),
            _ => Err(WalError::Closed),
        }
    }

    /// Drops every entry of `partition` and makes `entry` (a snapshot
    /// marker) its entry `start`, atomically: after a crash the log is either
    /// untouched or starts with the marker, never empty in between (an empty
    /// log at `start - 1` would let the next entry land without the snapshot
    /// it builds on). `start` must be past every id taken so far
    /// ([`WalError::ResetBehindLog`]), so acked and applied marks stay at or
    /// below durable and never move backwards.
    pub async fn reset_partition(
        &self,
        partition: PartitionId,
        start: LogId,
        entry: NewEntry,
    ) -> Result<AppendedRange, WalError> {
        self.reset_partition_to(partition, start, entry, None).await
    }

    /// [`Wal::reset_partition`] that, when `history` is given, also replaces
    /// the partition's history record in the same atomic write: a drainer
    /// that starts following another log (a snapshot of it) never holds the
    /// new marker under the old history, nor the old log under the new one.
    pub async fn reset_partition_to(
        &self,
        partition: PartitionId,
        start: LogId,
        entry: NewEntry,
        history: Option<PartitionHistory>,
    ) -> Result<AppendedRange, WalError> {
        let request = Request::Reset {
            partition,
            start,
            entry,
            history,
        };
        match self.call(request).await? {
            Outcome::Appended(range) => Ok(range),
            _ => Err(WalError::Closed),
        }
    }

    /// The history record of a listener's own log of `partition`: created
    /// durably, with a new random incarnation, if the partition has none (a
    /// new WAL, or one written before history records existed); returned as
    /// stored otherwise. The caller checks that `owner` is its own id.
    pub async fn open_history(
        &self,
        partition: PartitionId,
        owner: &str,
    ) -> Result<PartitionHistory, WalError> {
        let claim = HistoryClaim::Own {
            owner: owner.to_string(),
        };
        self.claim_history(partition, claim).await
    }

    /// The history record of a drainer's mirror of `partition`, created
    /// durably if absent (unclaimed, no incarnation, a new log tag). With
    /// `owner`, an unclaimed partition becomes that listener's (the caller
    /// checks the returned owner: a partition claimed by another listener
    /// stays its). With a non-zero `incarnation` of the owner's log, a
    /// partition whose log is still empty adopts it: an empty log holds no
    /// history that entries could be spliced onto.
    pub async fn follow_history(
        &self,
        partition: PartitionId,
        owner: Option<&str>,
        incarnation: u64,
    ) -> Result<PartitionHistory, WalError> {
        let claim = HistoryClaim::Follow {
            owner: owner.map(str::to_string),
            incarnation,
        };
        self.claim_history(partition, claim).await
    }

    async fn claim_history(
        &self,
        partition: PartitionId,
        claim: HistoryClaim,
    ) -> Result<PartitionHistory, WalError> {
        match self.call(Request::History { partition, claim }).await? {
            Outcome::History(history) => Ok(history),
            _ => Err(WalError::Closed),
        }
    }

    /// The history record of `partition`, if it has one.
    pub fn history(&self, partition: PartitionId) -> Result<Option<PartitionHistory>, WalError> {
        Ok(self.state(partition)?.and_then(|state| state.history))
    }

    /// A receiver whose value changes after every committed batch that
    /// appended entries or stored snapshot chunks (to any partition), so a
    /// reader that caught up can wait for more instead of polling. Mark it seen (`borrow_and_update`)
    /// before reading, then wait on `changed()` once the read came back
    /// empty: no append can be missed in between.
    pub fn subscribe_appends(&self) -> watch::Receiver<u64> {
        self.inner.appended_tx.subscribe()
    }

    /// A receiver whose value changes whenever a batch that appends entries
    /// goes to the storage, before its fsync: what an early reader
    /// ([`Wal::read_written`]) waits on, as others wait on
    /// [`Wal::subscribe_appends`].
    pub fn subscribe_written(&self) -> watch::Receiver<u64> {
        self.inner.written_tx.subscribe()
    }

    /// Registers a downstream: from now on entries are kept until it acks
    /// them (within TTL and size cap). Its ack starts just before the first
    /// available entry. Registering twice is a no-op.
    pub async fn register_downstream(
        &self,
        partition: PartitionId,
        downstream: DownstreamId,
    ) -> Result<(), WalError> {
        self.call(Request::Register {
            partition,
            downstream,
        })
        .await
        .map(|_| ())
    }

    /// Forgets a downstream; it no longer holds back retention.
    pub async fn unregister_downstream(
        &self,
        partition: PartitionId,
        downstream: DownstreamId,
    ) -> Result<(), WalError> {
        self.call(Request::Unregister {
            partition,
            downstream,
        })
        .await
        .map(|_| ())
    }

    /// Records that `downstream` made everything up to `log_id` durable.
    /// Past `durable` it is [`WalError::AckBeyondDurable`]; an older ack than
    /// the stored one is a no-op.
    pub async fn ack(
        &self,
        partition: PartitionId,
        downstream: DownstreamId,
        log_id: LogId,
    ) -> Result<(), WalError> {
        self.call(Request::Ack {
            partition,
            downstream,
            log_id,
        })
        .await
        .map(|_| ())
    }

    /// Records that everything up to `log_id` was applied to the sink. Past
    /// `durable` it is [`WalError::ApplyBeyondDurable`]; an older mark is a
    /// no-op.
    pub async fn set_applied(&self, partition: PartitionId, log_id: LogId) -> Result<(), WalError> {
        self.call(Request::Apply { partition, log_id })
            .await
            .map(|_| ())
    }

    /// Deletes entries before `before`; returns the first available id
    /// afterwards. Trimming to at most the current first is a no-op.
    pub async fn trim(&self, partition: PartitionId, before: LogId) -> Result<LogId, WalError> {
        match self.call(Request::Trim { partition, before }).await? {
            Outcome::Trimmed(first) => Ok(first),
            _ => Err(WalError::Closed),
        }
    }

    /// Stores chunk `seq` of snapshot `epoch` (epochs below `u64::MAX`).
    pub async fn put_snapshot_chunk(
        &self,
        partition: PartitionId,
        epoch: u64,
        seq: u64,
        data: Bytes,
    ) -> Result<(), WalError> {
        self.call(Request::SnapshotChunk {
            partition,
            epoch,
            seq,
            data,
        })
        .await
        .map(|_| ())
    }

    pub async fn set_snapshot_state(
        &self,
        partition: PartitionId,
        state: SnapshotState,
    ) -> Result<(), WalError> {
        self.call(Request::SnapshotState { partition, state })
            .await
            .map(|_| ())
    }

    /// Deletes every chunk of snapshot `epoch`.
    pub async fn delete_snapshot(
        &self,
        partition: PartitionId,
        epoch: u64,
    ) -> Result<(), WalError> {
        self.call(Request::DeleteSnapshot { partition, epoch })
            .await
            .map(|_| ())
    }

    /// Epochs of `partition` with any stored chunk, ascending. Blocking
    /// (one seek per epoch).
    pub fn snapshot_epochs(&self, partition: PartitionId) -> Result<Vec<u64>, WalError> {
        self.inner.storage.snapshot_epochs(partition)
    }

    /// Marks snapshot `epoch` as being read until the pin is dropped, so
    /// that [`Wal::collect_snapshots`] keeps it. A pin taken after a
    /// collection already chose the epoch does not bring it back: readers
    /// must still treat missing chunks as "gone" (the shipper then falls
    /// back to a fresh snapshot).
    pub fn pin_snapshot(&self, partition: PartitionId, epoch: u64) -> SnapshotPin {
        let key = (partition, epoch);
        *self
            .inner
            .pins
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .entry(key)
            .or_insert(0) += 1;
        SnapshotPin {
            pins: Arc::clone(&self.inner.pins),
            key,
        }
    }

    /// Deletes every stored snapshot epoch of `partition` for which `keep`
    /// is false, except pinned ones ([`Wal::pin_snapshot`]); returns the
    /// epochs deleted. The caller owns the rule of what is still needed
    /// (module doc, "Snapshot epochs").
    pub async fn collect_snapshots(
        &self,
        partition: PartitionId,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<u64>, WalError> {
        let storage = Arc::clone(&self.inner.storage);
        let stored = tokio::task::spawn_blocking(move || storage.snapshot_epochs(partition))
            .await
            .map_err(join_error)??;
        let doomed: Vec<u64> = {
            let pins = self
                .inner
                .pins
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            stored
                .into_iter()
                .filter(|epoch| !keep(*epoch) && !pins.contains_key(&(partition, *epoch)))
                .collect()
        };
        for epoch in &doomed {
            self.delete_snapshot(partition, *epoch).await?;
        }
        Ok(doomed)
    }

    /// Chunks `from_seq..` of snapshot `epoch`, at most `max_chunks`.
    /// Blocking (disk reads).
    pub fn read_snapshot_chunks(
        &self,
        partition: PartitionId,
        epoch: u64,
        from_seq: u64,
        max_chunks: usize,
    ) -> Result<Vec<(u64, Bytes)>, WalError> {
        self.inner
            .storage
            .read_snapshot_chunks(partition, epoch, from_seq, max_chunks)
    }

    fn state(&self, partition: PartitionId) -> Result<Option<PartitionState>, WalError> {
        let shared = lock(&self.inner.shared);
        if let Some(reason) = &shared.poisoned {
            return Err(WalError::Poisoned(reason.clone()));
        }
        Ok(shared.partitions.get(&partition).cloned())
    }

    /// Snapshot epoch and phase of `partition` (default if it has none).
    pub fn snapshot_state(&self, partition: PartitionId) -> Result<SnapshotState, WalError> {
        Ok(self
            .state(partition)?
            .map(|state| state.snapshot)
            .unwrap_or_default())
    }

    /// Partitions that have any stored state.
    pub fn partitions(&self) -> Vec<PartitionId> {
        let mut partitions: Vec<_> = lock(&self.inner.shared)
            .partitions
            .keys()
            .copied()
            .collect();
        partitions.sort();
        partitions
    }

    /// First available (untrimmed, durable) entry of `partition`.
    pub fn first_log_id(&self, partition: PartitionId) -> Result<Option<LogId>, WalError> {
        Ok(self
            .state(partition)?
            .filter(|state| state.log.first <= state.log.last)
            .map(|state| state.log.first))
    }

    /// Last durable entry of `partition` (even if trimmed since).
    pub fn last_log_id(&self, partition: PartitionId) -> Result<Option<LogId>, WalError> {
        Ok(self
            .state(partition)?
            .map(|state| state.log.last)
            .filter(|last| *last > LogId::ZERO))
    }

    /// Creation time of the first entry of `partition` at or after `from`
    /// (the first one still stored if `from` was trimmed); `None` if there
    /// is none. Lag reports use it for their time latency. Blocking (one
    /// point read).
    pub fn oldest_created(
        &self,
        partition: PartitionId,
        from: LogId,
    ) -> Result<Option<u64>, WalError> {
        let one = ReadLimits {
            max_entries: 1,
            max_bytes: 1,
        };
        let entries = match self.read(partition, from, one) {
            Ok(entries) => entries,
            Err(WalError::Trimmed {
                first_available, ..
            }) => self.read(partition, first_available, one)?,
            Err(error) => return Err(error),
        };
        Ok(entries.first().map(|entry| entry.created_unix_ms))
    }

    /// Durable entries of `partition` from `from` on, within `limits`; empty
    /// when `from` is past the last durable entry. [`WalError::Trimmed`] if
    /// `from` is no longer stored. Blocking (disk reads).
    pub fn read(
        &self,
        partition: PartitionId,
        from: LogId,
        limits: ReadLimits,
    ) -> Result<Vec<WalEntry>, WalError> {
        let from = from.max(LogId(1));
        let durable = match self.read_held(partition, from, limits) {
            Held::Answer(answer) => return answer,
            Held::Stored { durable } => durable,
        };
        let trimmed = |first_available| WalError::Trimmed {
            partition,
            wanted: from,
            first_available,
        };
        let entries = self
            .inner
            .storage
            .read_entries(partition, from, durable, limits)?;
        // A trim may have run between the position check and the read, and
        // its release may have dropped some of the entries read (whole
        // files, so a gap can show up anywhere below the new first id):
        // that is `Trimmed`, a hole at or above the first id is corruption.
        let trimmed_meanwhile = || -> Result<Option<LogId>, WalError> {
            let first = self
                .state(partition)?
                .map(|state| state.log.first)
                .unwrap_or(LogId(1));
            Ok((from < first).then_some(first))
        };
        if entries.first().map(|entry| entry.log_id) != Some(from) {
            if let Some(first) = trimmed_meanwhile()? {
                return Err(trimmed(first));
            }
            return Err(WalError::Inconsistent {
                partition,
                what: format!("durable entry {from} is missing"),
            });
        }
        for (offset, entry) in entries.iter().enumerate() {
            if entry.log_id.0 != from.0 + offset as u64 {
                if let Some(first) = trimmed_meanwhile()? {
                    return Err(trimmed(first));
                }
                return Err(WalError::Inconsistent {
                    partition,
                    what: format!(
                        "entry {} follows {} (gap in the log)",
                        entry.log_id,
                        LogId(from.0 + offset as u64).prev()
                    ),
                });
            }
        }
        Ok(entries)
    }

    /// [`Wal::read`] when it needs no storage read: `from` is trimmed, past
    /// the durable end, or held in the partition's read tail (the latest
    /// committed entries, kept in memory). `None`: the entries are in the
    /// storage only, read them with [`Wal::read`] (blocking). Does not block,
    /// so caught-up readers call it on the async runtime first.
    pub fn read_cached(
        &self,
        partition: PartitionId,
        from: LogId,
        limits: ReadLimits,
    ) -> Option<Result<Vec<WalEntry>, WalError>> {
        match self.read_held(partition, from.max(LogId(1)), limits) {
            Held::Answer(answer) => Some(answer),
            Held::Stored { .. } => None,
        }
    }

    /// The part of a read decided under the lock: the bounds, and the tail.
    fn read_held(&self, partition: PartitionId, from: LogId, limits: ReadLimits) -> Held {
        let shared = lock(&self.inner.shared);
        if let Some(reason) = &shared.poisoned {
            return Held::Answer(Err(WalError::Poisoned(reason.clone())));
        }
        let Some(state) = shared.partitions.get(&partition) else {
            return Held::Answer(Ok(Vec::new()));
        };
        if from < state.log.first {
            return Held::Answer(Err(WalError::Trimmed {
                partition,
                wanted: from,
                first_available: state.log.first,
            }));
        }
        let durable = state.log.last;
        if from > durable || limits.max_entries == 0 {
            return Held::Answer(Ok(Vec::new()));
        }
        match shared.tails.read(partition, from, durable, limits) {
            Some(entries) => Held::Answer(Ok(entries)),
            None => Held::Stored { durable },
        }
    }

    /// An early read: entries `from..` up to the last id handed to the
    /// storage, durable or still being fsynced, if the read tail holds
    /// them; with the durable end at the time of the read (the entries past
    /// it may still be lost in a crash). `None`: not in the tail (or nothing
    /// past `from` was written); read durable entries instead. Does not
    /// block.
    ///
    /// Only for an applier of the listener's own WAL (`apply` module doc,
    /// "Applying before the fsync"): what it applies early, the source sends
    /// again after a crash, and the applier checks it is the same.
    pub fn read_written(
        &self,
        partition: PartitionId,
        from: LogId,
        limits: ReadLimits,
    ) -> Option<Result<(Vec<WalEntry>, LogId), WalError>> {
        let shared = lock(&self.inner.shared);
        if let Some(reason) = &shared.poisoned {
            return Some(Err(WalError::Poisoned(reason.clone())));
        }
        let state = shared.partitions.get(&partition)?;
        let written = shared.written.get(&partition).copied()?;
        if from < state.log.first || from > written || limits.max_entries == 0 {
            return None;
        }
        let entries = shared.tails.read(partition, from, written, limits)?;
        Some(Ok((entries, state.log.last)))
    }

    /// The last id of `partition` handed to the storage, durable or being
    /// fsynced (its durable end if nothing is in flight).
    pub fn written_log_id(&self, partition: PartitionId) -> Result<LogId, WalError> {
        let shared = lock(&self.inner.shared);
        if let Some(reason) = &shared.poisoned {
            return Err(WalError::Poisoned(reason.clone()));
        }
        let durable = shared
            .partitions
            .get(&partition)
            .map_or(LogId::ZERO, |state| state.log.last);
        Ok(shared
            .written
            .get(&partition)
            .copied()
            .map_or(durable, |written| written.max(durable)))
    }

    /// All positions of `partition`; `None` if it has no stored state.
    /// Blocking (reads the first entry to size the log).
    pub fn positions(
        &self,
        partition: PartitionId,
    ) -> Result<Option<PartitionPositions>, WalError> {
        // Retention may trim the first entry between reading the state and
        // sizing the log; then the state is read again.
        let mut attempts = 0;
        let (state, stored_bytes) = loop {
            let Some(state) = self.state(partition)? else {
                return Ok(None);
            };
            match stored_bytes(self.inner.storage.as_ref(), partition, &state.log) {
                Ok(bytes) => break (state, bytes),
                Err(WalError::Trimmed { .. }) if attempts < 3 => attempts += 1,
                Err(error) => return Err(error),
            }
        };
        Ok(Some(PartitionPositions {
            first_available: state.log.first,
            received: state.received,
            durable: state.log.last,
            applied: state.applied,
            acked: state.acks.into_iter().collect(),
            source: state.log.source,
            stored_bytes,
            snapshot: state.snapshot,
            history: state.history,
        }))
    }

    /// Trims every partition as far as retention allows at `now_unix_ms`
    /// (see the module doc); returns the partitions trimmed and their new
    /// first ids. The retention task calls this every `retention-interval`.
    pub async fn enforce_retention(
        &self,
        now_unix_ms: u64,
    ) -> Result<Vec<(PartitionId, LogId)>, WalError> {
        let mut snapshot: Vec<(PartitionId, PartitionState)> = {
            let shared = lock(&self.inner.shared);
            shared
                .partitions
                .iter()
                .map(|(partition, state)| (*partition, state.clone()))
                .collect()
        };
        snapshot.sort_by_key(|(partition, _)| *partition);
        let storage = Arc::clone(&self.inner.storage);
        let ttl_ms = self.inner.config.wal_ttl.0.as_millis() as u64;
        let size_cap = self.inner.config.partition_size_cap.map(|cap| cap.as_u64());
        let targets = tokio::task::spawn_blocking(move || {
            let mut targets = Vec::new();
            for (partition, state) in snapshot {
                let cutoff = now_unix_ms.saturating_sub(ttl_ms);
                match retention_target(storage.as_ref(), partition, &state, cutoff, size_cap) {
                    Ok(Some(target)) => targets.push((partition, target)),
                    Ok(None) => {}
                    Err(WalError::Trimmed { .. }) => {} // trimmed meanwhile; next round
                    Err(error) => return Err(error),
                }
            }
            Ok(targets)
        })
        .await
        .map_err(join_error)??;
        let mut trimmed = Vec::new();
        for (partition, target) in targets {
            let first = self.trim(partition, target).await?;
            trimmed.push((partition, first));
        }
        Ok(trimmed)
    }
}

fn read_one(
    storage: &dyn WalStorage,
    partition: PartitionId,
    log_id: LogId,
) -> Result<WalEntry, WalError> {
    let limits = ReadLimits {
        max_entries: 1,
        max_bytes: usize::MAX,
    };
    storage
        .read_entries(partition, log_id, log_id, limits)?
        .pop()
        .ok_or(WalError::Trimmed {
            partition,
            wanted: log_id,
            first_available: log_id.next(),
        })
}

/// Stored bytes of entries `log.first..=log.last`.
fn stored_bytes(
    storage: &dyn WalStorage,
    partition: PartitionId,
    log: &LogMeta,
) -> Result<u64, WalError> {
    if log.first > log.last {
        return Ok(0);
    }
    let first = read_one(storage, partition, log.first)?;
    Ok(log.bytes_end - (first.bytes_end - first.stored_len))
}

/// Smallest id in `lo..=hi` whose entry satisfies `pred`, for a `pred` that
/// is false then true along the log; `hi + 1` if none does.
fn search_log(
    storage: &dyn WalStorage,
    partition: PartitionId,
    mut lo: LogId,
    mut hi: LogId,
    pred: impl Fn(&WalEntry) -> bool,
) -> Result<LogId, WalError> {
    let mut answer = hi.next();
    while lo <= hi {
        let mid = LogId(lo.0 + (hi.0 - lo.0) / 2);
        if pred(&read_one(storage, partition, mid)?) {
            answer = mid;
            if mid == lo {
                break;
            }
            hi = mid.prev();
        } else {
            lo = mid.next();
        }
    }
    Ok(answer)
}

/// Where retention wants the first available id of a partition to be.
fn retention_target(
    storage: &dyn WalStorage,
    partition: PartitionId,
    state: &PartitionState,
    cutoff_unix_ms: u64,
    size_cap: Option<u64>,
) -> Result<Option<LogId>, WalError> {
    let first = state.log.first;
    let durable = state.log.last;
    if first > durable {
        return Ok(None);
    }
    let mut target = first;
    if let Some(min_acked) = state.acks.values().min() {
        target = target.max(min_acked.next());
    }
    if state.log.last_created_unix_ms < cutoff_unix_ms {
        target = durable.next();
    } else {
        let ttl_target = search_log(storage, partition, first, durable, |entry| {
            entry.created_unix_ms >= cutoff_unix_ms
        })?;
        target = target.max(ttl_target);
    }
    if let Some(cap) = size_cap {
        let bytes_end = state.log.bytes_end;
        if stored_bytes(storage, partition, &state.log)? > cap {
            let cap_target = search_log(storage, partition, first, durable, |entry| {
                bytes_end - (entry.bytes_end - entry.stored_len) <= cap
            })?;
            target = target.max(cap_target);
        }
    }
    let target = target.min(durable.next());
    Ok((target > first).then_some(target))
}

async fn run_retention(
    inner: Weak<Inner>,
    period: Duration,
    mut shutdown_rx: watch::Receiver<bool>,
) {
    // The first round waits a full period: right after open the caller may
    // still be registering its downstreams.
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown_rx.changed() => break,
            _ = interval.tick() => {
                let Some(inner) = inner.upgrade() else { break };
                let wal = Wal { inner };
                match wal.enforce_retention(now_unix_ms()).await {
                    Ok(trimmed) if !trimmed.is_empty() => {
                        debug!(partitions = trimmed.len(), "retention trimmed");
                    }
                    Ok(_) => {}
                    Err(WalError::Closed) => break,
                    Err(error) => warn!(%error, "retention failed"),
                }
            }
        }
    }
}

/// What the lock-held part of a read decided.
enum Held {
    /// The read's result, without the storage.
    Answer(Result<Vec<WalEntry>, WalError>),
    /// The entries `from..=durable` must be read from the storage.
    Stored { durable: LogId },
}

/// A partition's state while a batch is being staged.
struct Staged {
    state: PartitionState,
    /// `durable` when the batch started: acks and applied marks are checked
    /// against it, not against appends of the same batch.
    durable: LogId,
    log_changed: bool,
    /// Whether any request changed this partition (only then is its staged
    /// state committed, so failed requests do not invent partitions).
    changed: bool,
    /// Whether a trim or reset raised `first`: once committed and
    /// published, the ids below it are released to the storage.
    first_raised: bool,
}

struct GroupCommitWriter {
    metrics: Arc<WalMetrics>,
    appended_tx: Arc<watch::Sender<u64>>,
    written_tx: Arc<watch::Sender<u64>>,
    /// Test hook: slept before each synced write (`FERRY_TEST_WAL_SYNC_DELAY_MS`).
    sync_delay: Option<Duration>,
    storage: Arc<dyn WalStorage>,
    shared: Arc<Mutex<Shared>>,
    sync: bool,
    linger: Duration,
    max_bytes: usize,
    /// Stall writes while the storage buffers more than this.
    buffered_limit: u64,
    /// When buffered bytes were last measured, and whether they were over.
    last_buffer_check: Option<Instant>,
    over_buffer_limit: bool,
    disk: DiskGuard,
    /// The release of trimmed entries in flight (one at a time, awaited
    /// before the next one and at shutdown).
    release: Option<JoinHandle<()>>,
    /// Whether committed entries go to the read tails (`tail-bytes` > 0);
    /// without them a commit keeps nothing of its batch.
    keeps_tail: bool,
}

/// Keeps `min-free-space` free on the WAL's file system by pausing writes.
struct DiskGuard {
    dir: PathBuf,
    min_free: u64,
    last_check: Option<Instant>,
    low: bool,
    /// The storage's background error count when writes were paused.
    errors_at_pause: u64,
    storage: Arc<dyn WalStorage>,
    shutdown: watch::Receiver<bool>,
    /// Why writes are paused, for [`Wal::disk_pause`].
    state: Arc<Mutex<Option<String>>>,
}

/// How often free space is measured while there is enough.
const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// How often it is measured while writes are paused.
const DISK_RECHECK: Duration = Duration::from_millis(200);

fn set_reason(state: &Mutex<Option<String>>, reason: Option<String>) {
    // A plain value: a poisoned lock still guards a usable one.
    *state.lock().unwrap_or_else(|poison| poison.into_inner()) = reason;
}

/// Free bytes for unprivileged users on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

impl DiskGuard {
    /// Returns once the file system has `min_free` bytes free (at once,
    /// between checks, while it had). Errors only when shutdown is asked
    /// while writes are paused: the batch is then refused, never written
    /// into a full disk.
    async fn wait_for_space(&mut self) -> Result<(), WalError> {
        if self.min_free == 0 {
            return Ok(());
        }
        loop {
            let due = self
                .last_check
                .map_or(true, |checked| checked.elapsed() >= DISK_CHECK_INTERVAL);
            if !self.low && !due {
                return Ok(());
            }
            self.last_check = Some(Instant::now());
            let free = match free_bytes(&self.dir) {
                Ok(free) => free,
                // Not a directory of a real file system (in-memory storage
                // in tests), or a transient error: do not block on it.
                Err(error) => {
                    debug!(%error, dir = %self.dir.display(), "cannot measure free space");
                    return Ok(());
                }
            };
            if free >= self.min_free {
                if self.low {
                    self.low = false;
                    set_reason(&self.state, None);
                    // RocksDB itself ran out of space while writes were
                    // paused (someone else filled the disk): its open files
                    // are in an error state it does not leave in-process,
                    // and writing on could abort. Stop cleanly instead; a
                    // restart recovers everything acknowledged.
                    let errors = self.storage.background_errors().unwrap_or(0);
                    if errors > self.errors_at_pause {
                        return Err(WalError::Poisoned(format!(
                            "the storage engine hit {} background error(s) while the disk in {} \
                             was full; restart to reopen the wal (everything acknowledged is on \
                             disk)",
                            errors - self.errors_at_pause,
                            self.dir.display()
                        )));
                    }
                    info!(dir = %self.dir.display(), free, "disk space is back; wal writes resumed");
                }
                return Ok(());
            }
            if !self.low {
                self.low = true;
                self.errors_at_pause = self.storage.background_errors().unwrap_or(0);
                let reason = format!(
                    "No space left on device for the wal in {}: {free} bytes free, below \
                     min-free-space ({} bytes); writes paused until space returns",
                    self.dir.display(),
                    self.min_free
                );
                warn!("{reason}");
                set_reason(&self.state, Some(reason));
            }
            if *self.shutdown.borrow() {
                return Err(WalError::Io(std::io::Error::other(format!(
                    "wal in {} is out of space; not written",
                    self.dir.display()
                ))));
            }
            tokio::select! {
                _ = tokio::time::sleep(DISK_RECHECK) => {}
                _ = self.shutdown.changed() => {}
            }
        }
    }
}

/// How often buffered bytes are measured while under the limit (the
/// measurement costs a property lookup per column family).
const BUFFER_CHECK_INTERVAL: Duration = Duration::from_millis(10);
/// Longest stall of one batch: if flushes stop entirely (a RocksDB
/// background error), writing on and failing loudly beats hanging.
const MAX_BUFFER_STALL: Duration = Duration::from_secs(10);

impl GroupCommitWriter {
    async fn run(mut self, mut command_rx: mpsc::Receiver<Command>) {
        let mut open = true;
        while open {
            let Some(first) = command_rx.recv().await else {
                break;
            };
            let mut batch = Vec::new();
            let mut bytes = 0;
            match first {
                Command::Request(request, reply) => {
                    bytes += request.batch_bytes();
                    batch.push((request, reply));
                }
                Command::Shutdown => open = false,
            }
            let deadline = Instant::now() + self.linger;
            while open && bytes < self.max_bytes {
                let next = match command_rx.try_recv() {
                    Ok(command) => Some(command),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if Instant::now() >= deadline {
                            break;
                        }
                        if self.linger < TIMER_RESOLUTION {
                            // tokio's timer would round a sub-millisecond
                            // linger up to 1ms; yielding instead lets the
                            // appenders run and enqueue until the deadline.
                            tokio::task::yield_now().await;
                            continue;
                        }
                        match tokio::time::timeout_at(deadline, command_rx.recv()).await {
                            Ok(command) => command,
                            Err(_elapsed) => break,
                        }
                    }
                };
                match next {
                    Some(Command::Request(request, reply)) => {
                        bytes += request.batch_bytes();
                        batch.push((request, reply));
                    }
                    Some(Command::Shutdown) | None => open = false,
                }
            }
            if !batch.is_empty() {
                self.commit(batch).await;
            }
        }
        self.finish_release().await;
        debug!("wal writer stopped");
    }

    async fn commit(&mut self, batch: Vec<(Request, Reply)>) {
        let waited = self.disk.wait_for_space().await;
        if let Err(WalError::Poisoned(reason)) = &waited {
            error!("{reason}");
            lock(&self.shared).poisoned = Some(reason.clone());
            for (_, reply) in batch {
                let _ = reply.send(Err(WalError::Poisoned(reason.clone())));
            }
            return;
        }
        if let Err(error) = waited {
            let reason = error.to_string();
            for (_, reply) in batch {
                let _ = reply.send(Err(WalError::Io(std::io::Error::other(reason.clone()))));
            }
            return;
        }
        let now = now_unix_ms();
        let mut staged: HashMap<PartitionId, Staged> = HashMap::new();
        let mut ops = Vec::new();
        let mut answers = Vec::new();
        let mut chunks_stored = false;
        // Marks alone (acks, applied ids) are advisory: written without a
        // fsync of their own, they become durable with the next synced
        // write. One lost in a crash only makes retention keep more, or the
        // applied mark lag the target's checkpoint, which the applier
        // corrects (`apply` module doc). An append no longer waits behind
        // an applier's mark for a second fsync.
        let marks_only = batch
            .iter()
            .all(|(request, _)| matches!(request, Request::Ack { .. } | Request::Apply { .. }));
        // Partitions appended at given ids (a drainer's): their payloads are
        // slices of the batch they arrived in, copied before the tail keeps
        // them so that it does not keep whole batches alive.
        let mut received: std::collections::HashSet<PartitionId> = Default::default();
        {
            let mut shared = lock(&self.shared);
            if let Some(reason) = shared.poisoned.clone() {
                drop(shared);
                for (_, reply) in batch {
                    let _ = reply.send(Err(WalError::Poisoned(reason.clone())));
                }
                return;
            }
            for (request, reply) in batch {
                let partition = request.partition();
                chunks_stored |= matches!(request, Request::SnapshotChunk { .. });
                if self.keeps_tail && matches!(request, Request::AppendAt { .. }) {
                    received.insert(partition);
                }
                let entry = staged.entry(partition).or_insert_with(|| {
                    let state = shared
                        .partitions
                        .get(&partition)
                        .cloned()
                        .unwrap_or_default();
                    Staged {
                        durable: state.log.last,
                        state,
                        log_changed: false,
                        changed: false,
                        first_raised: false,
                    }
                });
                let ops_before = ops.len();
                let result = stage(request, entry, &mut ops, now);
                // A trim adds no op of its own (its meta is added below).
                entry.changed |= ops.len() > ops_before || entry.first_raised;
                match result {
                    Ok(outcome) => answers.push((reply, outcome)),
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            // The entries go to the read tails now, before their fsync: other
            // readers read them only up to the durable end, an early reader
            // (`Wal::read_written`) up to `written`.
            let mut appended: HashMap<PartitionId, Vec<WalEntry>> = HashMap::new();
            if self.keeps_tail {
                for op in &ops {
                    if let WriteOp::Entry { partition, entry } = op {
                        let mut entry = entry.clone();
                        if received.contains(partition) {
                            entry.payload = Bytes::copy_from_slice(&entry.payload);
                        }
                        appended.entry(*partition).or_default().push(entry);
                    }
                }
            }
            let mut wrote_entries = false;
            for (partition, staged) in &staged {
                if staged.log_changed {
                    ops.push(WriteOp::LogMeta {
                        partition: *partition,
                        meta: staged.state.log.clone(),
                    });
                    if let Some(state) = shared.partitions.get_mut(partition) {
                        state.received = staged.state.log.last;
                    }
                    shared.written.insert(*partition, staged.state.log.last);
                    wrote_entries = true;
                }
                if let Some(entries) = appended.remove(partition) {
                    shared
                        .tails
                        .extend(*partition, entries, staged.state.log.first);
                }
            }
            drop(shared);
            if wrote_entries {
                self.written_tx
                    .send_modify(|generation| *generation = generation.wrapping_add(1));
            }
        }
        if !ops.is_empty() {
            self.wait_for_buffer_space().await;
            let storage = Arc::clone(&self.storage);
            let sync = self.sync && !marks_only;
            let metrics = Arc::clone(&self.metrics);
            let delay = self.sync_delay.filter(|_| sync);
            let written = tokio::task::spawn_blocking(move || {
                let bytes = written_bytes(&ops);
                if let Some(delay) = delay {
                    std::thread::sleep(delay);
                }
                let started = std::time::Instant::now();
                let result = storage.write(&ops, sync);
                if result.is_ok() {
                    metrics.record_batch(bytes, sync.then(|| started.elapsed()));
                }
                result
            })
            .await
            .map_err(join_error)
            .and_then(|result| result);
            if let Err(error) = written {
                error!(%error, "wal write failed, poisoning the wal");
                let reason = error.to_string();
                lock(&self.shared).poisoned = Some(reason.clone());
                for (reply, _) in answers {
                    let _ = reply.send(Err(WalError::Poisoned(reason.clone())));
                }
                return;
            }
        }
        let mut releases = Vec::new();
        {
            let mut shared = lock(&self.shared);
            for (partition, mut staged) in staged {
                if !staged.changed {
                    continue;
                }
                let first = staged.state.log.first;
                if staged.first_raised {
                    releases.push((partition, first));
                    shared.tails.trim(partition, first);
                }
                staged.state.received = staged.state.log.last;
                shared.partitions.insert(partition, staged.state);
            }
        }
        if !releases.is_empty() {
            // The new first ids are durable and published: readers check
            // them before reading, so nobody asks for the released entries.
            self.finish_release().await;
            let storage = Arc::clone(&self.storage);
            self.release = Some(tokio::task::spawn_blocking(move || {
                release_trimmed(storage.as_ref(), &releases)
            }));
        }
        // Chunks too: a shipper sends the chunks of a full resync while the
        // listener stores them.
        if chunks_stored
            || answers
                .iter()
                .any(|(_, outcome)| matches!(outcome, Outcome::Appended(_)))
        {
            self.appended_tx
                .send_modify(|generation| *generation = generation.wrapping_add(1));
        }
        for (reply, outcome) in answers {
            let _ = reply.send(Ok(outcome));
        }
    }
}

/// Bytes of entries (as accounted against the size cap) and snapshot chunks
/// in a batch, for [`WalMetrics`].
fn written_bytes(ops: &[WriteOp]) -> u64 {
    ops.iter()
        .map(|op| match op {
            WriteOp::Entry { entry, .. } => {
                encoded_entry_len(entry.source.replid.len(), entry.payload.len())
            }
            WriteOp::SnapshotChunk { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum()
}

/// Lets the storage drop entries below each partition's new first id. A
/// failure costs disk space until the next release, not data: it is logged.
fn release_trimmed(storage: &dyn WalStorage, releases: &[(PartitionId, LogId)]) {
    for (partition, below) in releases {
        if let Err(error) = storage.release_trimmed(*partition, *below) {
            warn!(partition = %partition, %error, "releasing trimmed entries failed");
        }
    }
}

impl GroupCommitWriter {
    /// Waits for the release in flight, if any.
    async fn finish_release(&mut self) {
        if let Some(release) = self.release.take() {
            if let Err(error) = release.await {
                warn!(%error, "releasing trimmed entries failed");
            }
        }
    }

    /// Stalls while the storage buffers more than `buffered_limit` bytes, so
    /// that flushes lagging behind appends cannot grow memory without bound.
    async fn wait_for_buffer_space(&mut self) {
        let stall_started = Instant::now();
        loop {
            let due = match self.last_buffer_check {
                Some(checked) => checked.elapsed() >= BUFFER_CHECK_INTERVAL,
                None => true,
            };
            if !self.over_buffer_limit && !due {
                return;
            }
            let storage = Arc::clone(&self.storage);
            let buffered = match tokio::task::spawn_blocking(move || storage.buffered_bytes()).await
            {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(error)) => {
                    warn!(%error, "measuring buffered bytes failed");
                    0
                }
                Err(error) => {
                    warn!(%error, "measuring buffered bytes failed");
                    0
                }
            };
            self.last_buffer_check = Some(Instant::now());
            let was_over = self.over_buffer_limit;
            self.over_buffer_limit = buffered > self.buffered_limit;
            if !self.over_buffer_limit {
                if was_over {
                    debug!(buffered, waited = ?stall_started.elapsed(), "write stall over");
                }
                return;
            }
            if !was_over {
                debug!(
                    buffered,
                    limit = self.buffered_limit,
                    "memtables over budget, stalling writes"
                );
            }
            if stall_started.elapsed() >= MAX_BUFFER_STALL {
                warn!(
                    buffered,
                    limit = self.buffered_limit,
                    "memtables stay over budget, writing anyway"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Validates one request against the staged state, updates it and adds the
/// write ops it needs.
fn stage(
    request: Request,
    staged: &mut Staged,
    ops: &mut Vec<WriteOp>,
    now_unix_ms: u64,
) -> Result<Outcome, WalError> {
    let state = &mut staged.state;
    match request {
        Request::Append { partition, entries } => {
            check_entries(partition, &entries)?;
            let range = stage_entries(partition, entries, state, ops, now_unix_ms);
            staged.log_changed = true;
            Ok(Outcome::Appended(range))
        }
        Request::AppendAt {
            partition,
            first,
            entries,
        } => {
            check_entries(partition, &entries)?;
            let expected = state.log.last.next();
            if first != expected {
                return Err(WalError::NotContiguous {
                    partition,
                    expected,
                    got: first,
                });
            }
            let range = stage_entries(partition, entries, state, ops, now_unix_ms);
            staged.log_changed = true;
            Ok(Outcome::Appended(range))
        }
        Request::Reset {
            partition,
            start,
            entry,
            history,
        } => {
            let entries = vec![entry];
            check_entries(partition, &entries)?;
            if start <= state.log.last {
                return Err(WalError::ResetBehindLog {
                    partition,
                    start,
                    last: state.log.last,
                });
            }
            if let Some(history) = history {
                check_owner(partition, &history.owner)?;
                state.history = Some(history.clone());
                ops.push(WriteOp::History { partition, history });
            }
            // The old entries become garbage below the new first id (no
            // delete is written; module doc, invariant 2).
            staged.first_raised = true;
            state.log.first = start;
            state.log.last = start.prev();
            state.log.source = None;
            let range = stage_entries(partition, entries, state, ops, now_unix_ms);
            staged.log_changed = true;
            Ok(Outcome::Appended(range))
        }
        Request::History { partition, claim } => {
            let empty = state.log.last == LogId::ZERO;
            let next = match (claim, &state.history) {
                (HistoryClaim::Own { .. }, Some(existing)) => existing.clone(),
                (HistoryClaim::Own { owner }, None) => {
                    check_owner(partition, &owner)?;
                    let incarnation = random_id();
                    PartitionHistory {
                        owner,
                        incarnation,
                        id_base: 0,
                        epoch_base: 0,
                        log_tag: incarnation,
                    }
                }
                (HistoryClaim::Follow { owner, incarnation }, existing) => {
                    let mut next = existing.clone().unwrap_or_else(|| PartitionHistory {
                        log_tag: random_id(),
                        ..PartitionHistory::default()
                    });
                    let Some(owner) = owner else {
                        return Ok(Outcome::History(next_or_store(state, ops, partition, next)));
                    };
                    if next.owner.is_empty() {
                        check_owner(partition, &owner)?;
                        next.owner = owner.clone();
                    }
                    // Only the owner's log, and only into an empty one.
                    if next.owner == owner && incarnation != 0 && next.incarnation == 0 && empty {
                        next.incarnation = incarnation;
                    }
                    next
                }
            };
            Ok(Outcome::History(next_or_store(state, ops, partition, next)))
        }
        Request::Register {
            partition,
            downstream,
        } => {
            if !state.acks.contains_key(&downstream) {
                let acked = state.log.first.prev();
                state.acks.insert(downstream.clone(), acked);
                ops.push(WriteOp::Ack {
                    partition,
                    downstream,
                    log_id: acked,
                });
            }
            Ok(Outcome::Done)
        }
        Request::Unregister {
            partition,
            downstream,
        } => {
            if state.acks.remove(&downstream).is_some() {
                ops.push(WriteOp::RemoveDownstream {
                    partition,
                    downstream,
                });
            }
            Ok(Outcome::Done)
        }
        Request::Ack {
            partition,
            downstream,
            log_id,
        } => {
            let Some(current) = state.acks.get_mut(&downstream) else {
                return Err(WalError::UnknownDownstream {
                    partition,
                    downstream,
                });
            };
            if log_id > staged.durable {
                return Err(WalError::AckBeyondDurable {
                    partition,
                    downstream,
                    ack: log_id,
                    durable: staged.durable,
                });
            }
            if log_id > *current {
                *current = log_id;
                ops.push(WriteOp::Ack {
                    partition,
                    downstream,
                    log_id,
                });
            }
            Ok(Outcome::Done)
        }
        Request::Apply { partition, log_id } => {
            if log_id > staged.durable {
                return Err(WalError::ApplyBeyondDurable {
                    partition,
                    applied: log_id,
                    durable: staged.durable,
                });
            }
            if log_id > state.applied {
                state.applied = log_id;
                ops.push(WriteOp::Applied { partition, log_id });
            }
            Ok(Outcome::Done)
        }
        Request::Trim { partition, before } => {
            if before > staged.durable.next() {
                return Err(WalError::TrimBeyondDurable {
                    partition,
                    before,
                    durable: staged.durable,
                });
            }
            if before > state.log.first {
                state.log.first = before;
                staged.log_changed = true;
                staged.first_raised = true;
            }
            Ok(Outcome::Trimmed(state.log.first))
        }
        Request::SnapshotChunk {
            partition,
            epoch,
            seq,
            data,
        } => {
            if epoch == u64::MAX {
                return Err(WalError::InvalidEntry {
                    partition,
                    what: "snapshot epoch u64::MAX is reserved".into(),
                });
            }
            if data.len() > MAX_PAYLOAD_LEN {
                return Err(WalError::InvalidEntry {
                    partition,
                    what: format!(
                        "snapshot chunk of {} bytes exceeds {MAX_PAYLOAD_LEN}",
                        data.len()
                    ),
                });
            }
            ops.push(WriteOp::SnapshotChunk {
                partition,
                epoch,
                seq,
                data,
            });
            Ok(Outcome::Done)
        }
        Request::SnapshotState {
            partition,
            state: snapshot,
        } => {
            state.snapshot = snapshot;
            ops.push(WriteOp::SnapshotState {
                partition,
                state: snapshot,
            });
            Ok(Outcome::Done)
        }
        Request::DeleteSnapshot { partition, epoch } => {
            ops.push(WriteOp::DeleteSnapshot { partition, epoch });
            Ok(Outcome::Done)
        }
    }
}

/// Stages `next` as the partition's history record if it differs from the
/// stored one; returns it.
fn next_or_store(
    state: &mut PartitionState,
    ops: &mut Vec<WriteOp>,
    partition: PartitionId,
    next: PartitionHistory,
) -> PartitionHistory {
    if state.history.as_ref() != Some(&next) {
        state.history = Some(next.clone());
        ops.push(WriteOp::History {
            partition,
            history: next.clone(),
        });
    }
    next
}

fn check_owner(partition: PartitionId, owner: &str) -> Result<(), WalError> {
    if owner.len() > MAX_OWNER_LEN {
        return Err(WalError::InvalidHistory {
            partition,
            what: format!("owner of {} bytes exceeds {MAX_OWNER_LEN}", owner.len()),
        });
    }
    Ok(())
}

/// Checks entries against the WAL's limits before anything is staged, so a
/// rejected append has no side effects.
fn check_entries(partition: PartitionId, entries: &[NewEntry]) -> Result<(), WalError> {
    let invalid = |what: String| WalError::InvalidEntry { partition, what };
    if entries.is_empty() {
        return Err(invalid("append of no entries".into()));
    }
    for (index, entry) in entries.iter().enumerate() {
        if entry.payload.len() > MAX_PAYLOAD_LEN {
            return Err(invalid(format!(
                "entry {index}: payload of {} bytes exceeds {MAX_PAYLOAD_LEN}",
                entry.payload.len()
            )));
        }
        if entry.source.replid.len() > MAX_REPLID_LEN {
            return Err(invalid(format!(
                "entry {index}: replid of {} bytes exceeds {MAX_REPLID_LEN}",
                entry.source.replid.len()
            )));
        }
    }
    Ok(())
}

/// Gives checked `entries` the ids after `state.log.last` and stages them.
fn stage_entries(
    partition: PartitionId,
    entries: Vec<NewEntry>,
    state: &mut PartitionState,
    ops: &mut Vec<WriteOp>,
    now_unix_ms: u64,
) -> AppendedRange {
    let first = state.log.last.next();
    let count = entries.len();
    ops.reserve(count);
    for (index, entry) in entries.into_iter().enumerate() {
        let log_id = state.log.last.next();
        let created_unix_ms = entry
            .created_unix_ms
            .unwrap_or(now_unix_ms)
            .max(state.log.last_created_unix_ms);
        let stored_len = encoded_entry_len(entry.source.replid.len(), entry.payload.len());
        let bytes_end = state.log.bytes_end + stored_len;
        state.log.last = log_id;
        state.log.last_created_unix_ms = created_unix_ms;
        state.log.bytes_end = bytes_end;
        if index + 1 == count {
            // Only the last entry's position is the log's (one clone per
            // batch rather than per entry).
            state.log.source = Some(entry.source.clone());
        }
        ops.push(WriteOp::Entry {
            partition,
            entry: WalEntry {
                log_id,
                flags: entry.flags,
                created_unix_ms,
                bytes_end,
                stored_len,
                source: entry.source,
                payload: entry.payload,
            },
        });
    }
    AppendedRange {
        first,
        last: state.log.last,
    }
}
