//! The listener's source side: ingests one source Redis into the local WAL,
//! durably, resumable after a crash.
//!
//! In: the source's replication stream ([`PsyncSource`]: a snapshot, then
//! commands) and a shutdown token. Out: WAL entries of one partition (relay
//! conventions 2 and 3), `REPLCONF ACK`s carrying the durable offset, a
//! heartbeat key written to the source, fallback snapshots on request
//! ([`ListenerHandle::take_fallback_snapshot`]) and a live
//! [`ListenerStatus`].
//!
//! A listener of a Redis Cluster source replicates one shard
//! ([`Listener::open_routed`]): each connection goes to the shard's master
//! of the moment, found from the cluster ([`ShardRoute::locate`], module
//! `cluster`), a session ends when the route names another master (a
//! failover), snapshot markers carry the shard's slots as their scope, and
//! the heartbeat key carries a hash tag of the shard's first slot.
//!
//! # What is stored
//!
//! - Per replication entry (one command, or one whole `MULTI`/`EXEC`): one
//!   `Record::Write` log entry whose source position is (replid, offset after
//!   the entry, db selected after the entry) and whose creation time is the
//!   receive time.
//! - Before the write of an entry with streamed (big) arguments: its
//!   `Record::Fragment`s, appended as they arrive (batched like entries),
//!   each at the source position of the entry's *start* (replid, offset
//!   after the previous entry, db there), so the source is acked past the
//!   entry only once its write is durable (`src/record.rs`, "Big entries").
//! - Per full resync: the RDB as snapshot chunks of a new epoch E exactly as
//!   received, E set complete, then a `Record::Snapshot` marker log entry at
//!   source position (replid, FULLRESYNC offset, db 0). Entries after the
//!   marker apply on top of the RDB.
//!
//! # History
//!
//! The partition's log is this listener's: [`Listener::open`] creates its
//! history record (a random incarnation, `ship` module doc "History") in a
//! new WAL and refuses a WAL whose log another listener id created.
//!
//! # Positions and recovery
//!
//! `acked to the source <= durable <= received`: the [`AckHandle`] is raised
//! only after the `append` holding an entry resolved (fsynced), to that
//! entry's offset; a `Progress` event (data-free bytes: `PING`, `SELECT`,
//! `REPLCONF`) raises it further only when no entry is waiting to become
//! durable. On start and after every lost link the listener resumes with
//! `PSYNC <replid> <offset+1>` from the source position of its last durable
//! entry (that position is exact: the db after the entry is stored with it),
//! so a kill -9 loses nothing acknowledged and duplicates nothing: entries
//! received but not durable are received again. It never asks for a full
//! resync itself once its WAL has a position; if the source answers
//! `+FULLRESYNC` (backlog lost, history changed) a new snapshot epoch and
//! marker are written, which downstreams see. A `+CONTINUE <new replid>`
//! (failover to a promoted replica) is followed: later entries carry the new
//! id.
//!
//! # Failures
//!
//! Replication errors (lost link, source down, `-LOADING`, timeouts, protocol
//! errors) end the session: what was received is made durable, the status
//! goes OFFLINE with the error, and the listener reconnects after a capped
//! exponential backoff (reset once a session is established), logging once
//! per change of error. WAL errors are fatal: [`run`] returns them (the WAL
//! is poisoned after a failed write and must be reopened).
//!
//! An entry ferry cannot carry (more than `replica.max-entry-bytes`, or a
//! record over the WAL's entry limit) is not a lost link: the source would
//! send it again on every reconnect. What came before it is made durable,
//! then the listener stops replicating (status `STOPPED` with the error,
//! logged once) and waits for shutdown; the rest of the node goes on. Its
//! position stays before the entry, so a restart with a higher limit
//! resumes there (while the source's backlog still holds it).
//!
//! On shutdown the listener stops reading, makes everything received durable
//! and returns. A full resync interrupted by shutdown is abandoned (its
//! chunks deleted; the next start resumes from the old position).

mod cluster;
mod config;
mod heartbeat;
mod slots;
mod snapshot;
mod status;

pub(crate) use crate::position::now_unix_ms as unix_ms;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use cluster::{
    ClusterSource, MarkerSlots, PendingHandoff, PendingVoid, RefreshError, ShardMap, ShardMapError,
    ShardNodes, ShardRoute, ShardState, SHARD_MAP_FILE,
};
pub use config::{CheckedListenerConfig, ListenerConfig, ListenerConfigError, ReplicaSettings};
pub use slots::{SlotOwner, SlotTable, SlotTableError, SLOT_TABLE_FILE};
pub use snapshot::FallbackSnapshot;
pub use status::{ListenerStatus, ListenerStatusSnapshot, SyncState};

use crate::backoff::Backoff;
use crate::position::{LogId, PartitionId, ReplId, ReplOffset};
use crate::record::{Record, RecordError, SnapshotMarker};
use crate::record::{SlotHandoff, SlotVoid};
use crate::redis::psync::{AckHandle, PsyncSource, ReplError, ReplEvent, ReplPosition};
use crate::wal::{AppendedRange, NewEntry, SnapshotPhase, SourcePosition, Wal, WalError};
use snapshot::{EpochAllocator, RdbOutcome};

/// Prefix of the heartbeat key; the listener id follows.
pub const HEARTBEAT_KEY_PREFIX: &str = "__ferry:heartbeat:";

/// Errors that end [`run`] or a fallback snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error(transparent)]
    Config(#[from] ListenerConfigError),
    #[error("wal: {0}")]
    Wal(#[from] WalError),
    #[error(
        "partition {partition}: stored source position {position} has an invalid replication id"
    )]
    BadStoredPosition {
        partition: PartitionId,
        position: SourcePosition,
    },
    #[error("{0}")]
    Uncarriable(String),
    #[error("partition {partition}: entry at source offset {offset} encodes to {len} bytes, more than a WAL entry holds ({limit}); ferry cannot carry it")]
    EntryTooLarge {
        partition: PartitionId,
        offset: u64,
        len: usize,
        limit: usize,
    },
    #[error("partition {partition}: corrupt record at log id {log_id}: {error}")]
    CorruptRecord {
        partition: PartitionId,
        log_id: LogId,
        #[source]
        error: RecordError,
    },
    #[error("partition {partition}: fallback snapshot {what} failed: {error}")]
    Fallback {
        partition: PartitionId,
        what: String,
        #[source]
        error: Box<ReplError>,
    },
    #[error("partition {partition}: fallback snapshot: source answered PSYNC ? -1 with {what} instead of a full resync")]
    FallbackNotFullResync {
        partition: PartitionId,
        what: String,
    },
    #[error("partition {partition}: fallback snapshot at {replid}:{offset} not reached by the durable stream ({durable}) within {waited:?}")]
    FallbackTimeout {
        partition: PartitionId,
        waited: Duration,
        replid: String,
        offset: u64,
        durable: String,
    },
    #[error("partition {partition}: fallback snapshot at offset {offset} is older than the first stored entry {first} (offset {first_offset}); take a new one")]
    FallbackBehindLog {
        partition: PartitionId,
        offset: u64,
        first: LogId,
        first_offset: u64,
    },
    #[error(
        "partition {partition}: this WAL holds the log of listener {owner:?}, not of {id:?}; run \
         the listener under id {owner:?}, or give {id:?} a new WAL dir (its drainers then get a \
         snapshot)"
    )]
    ForeignLog {
        partition: PartitionId,
        owner: String,
        id: String,
    },
    #[error("partition {partition}: source shard: {error}")]
    Route {
        partition: PartitionId,
        error: String,
    },
    #[error("listener task failed: {0}")]
    Task(String),
    #[error("shut down")]
    Shutdown,
}

/// The durable end of the stream, published after every durable batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DurableMark {
    replid: Option<String>,
    /// Offset acknowledged to the source (see the module doc).
    offset: u64,
    log_id: LogId,
}

struct Inner {
    cfg: CheckedListenerConfig,
    wal: Wal,
    status: Arc<ListenerStatus>,
    durable_tx: watch::Sender<DurableMark>,
    epochs: Mutex<EpochAllocator>,
    /// Log id of the latest snapshot marker, once known.
    era_start: Mutex<Option<LogId>>,
    /// The shard of a cluster source this partition replicates (`None`: a
    /// standalone source at `cfg.source`).
    route: Option<Arc<ShardRoute>>,
    /// Whether the source was not asked yet whether it is a cluster (it did
    /// not answer when the node started): a first full sync is then refused
    /// from a cluster node (see [`Listener::check_not_cluster`]).
    check_not_cluster: std::sync::atomic::AtomicBool,
    /// The snapshot epoch of the full resync being stored (0: none); its
    /// marker will follow in the log unless the attempt fails
    /// ([`ListenerHandle::resync_epoch`]).
    resync_epoch: std::sync::atomic::AtomicU64,
}

/// Clears [`Inner::resync_epoch`] when a full resync attempt ends, however.
struct ResyncMark<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for ResyncMark<'_> {
    fn drop(&mut self) {
        self.0.store(0, std::sync::atomic::Ordering::Release);
    }
}

/// A listener bound to its WAL, before it runs.
pub struct Listener {
    handle: ListenerHandle,
    /// Where the replication resumes (`None`: full sync).
    resume: Option<ReplPosition>,
}

/// Cheap-to-clone handle to a listener, for other tasks (the shipper): its
/// status and [`ListenerHandle::take_fallback_snapshot`].
#[derive(Clone)]
pub struct ListenerHandle {
    inner: Arc<Inner>,
}

impl ListenerHandle {
    pub fn status(&self) -> &Arc<ListenerStatus> {
        &self.inner.status
    }

    pub fn partition(&self) -> PartitionId {
        self.inner.cfg.partition
    }

    /// The epoch of the full resync being stored right now, whose chunks a
    /// shipper may send before its marker is in the log; `None` between
    /// full resyncs (and during fallback snapshots, which get no marker in
    /// the log).
    pub fn resync_epoch(&self) -> Option<u64> {
        match self
            .inner
            .resync_epoch
            .load(std::sync::atomic::Ordering::Acquire)
        {
            0 => None,
            epoch => Some(epoch),
        }
    }

    pub fn config(&self) -> &CheckedListenerConfig {
        &self.inner.cfg
    }

    /// The cluster shard this partition replicates, if the source is a cluster.
    pub fn route(&self) -> Option<&Arc<ShardRoute>> {
        self.inner.route.as_ref()
    }

    /// The replication client's config for the next connection: the shard's
    /// master for a cluster source (rediscovered first when `rediscover`).
    pub(crate) async fn replica_config(
        &self,
        rediscover: bool,
    ) -> Result<crate::redis::psync::ReplicaConfig, String> {
        let mut replica = self.inner.cfg.replica.clone();
        if let Some(route) = &self.inner.route {
            replica.source = route.locate(rediscover).await?;
        }
        Ok(replica)
    }

    /// The slots of a snapshot marker written now ([`ShardRoute::marker_slots`]),
    /// `None` (the whole keyspace) for a standalone source. The shard's
    /// master is asked a few times before this gives up.
    pub(crate) async fn marker_slots(
        &self,
        shutdown: &CancellationToken,
        up_to: u64,
    ) -> Result<Option<MarkerSlots>, String> {
        let Some(route) = &self.inner.route else {
            return Ok(None);
        };
        let mut last = String::new();
        for attempt in 0..5u64 {
            if attempt > 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200 * attempt)) => {}
                }
            }
            match route.marker_slots(up_to).await {
                Ok(slots) => return Ok(Some(slots)),
                Err(error) => last = error,
            }
        }
        Err(last)
    }
}

/// Runs a listener until `shutdown` (see the module doc). Equivalent to
/// [`Listener::open`] then [`Listener::run`]; use those to get a
/// [`ListenerHandle`] first.
pub async fn run(
    cfg: ListenerConfig,
    wal: Wal,
    status: Arc<ListenerStatus>,
    shutdown: CancellationToken,
) -> Result<(), ListenerError> {
    Listener::open(cfg, wal, status).await?.run(shutdown).await
}

impl Listener {
    /// Validates `cfg`, takes up the partition's history (a new WAL gets
    /// one, a WAL holding another listener id's log is refused), reads the
    /// partition's durable position from the WAL and cleans up a snapshot
    /// epoch a crash left half-written.
    pub async fn open(
        cfg: ListenerConfig,
        wal: Wal,
        status: Arc<ListenerStatus>,
    ) -> Result<Listener, ListenerError> {
        Listener::open_routed(cfg, wal, status, None).await
    }

    /// [`Listener::open`] for one shard of a cluster source: the partition
    /// is `route`'s, and every connection goes to the shard's master of the
    /// moment (cluster module doc).
    pub async fn open_routed(
        cfg: ListenerConfig,
        wal: Wal,
        status: Arc<ListenerStatus>,
        route: Option<Arc<ShardRoute>>,
    ) -> Result<Listener, ListenerError> {
        let mut cfg = cfg.validate()?;
        if let Some(route) = &route {
            cfg.partition = route.partition();
        }
        let partition = cfg.partition;
        let history = wal.open_history(partition, &cfg.id).await?;
        if history.owner != cfg.id {
            return Err(ListenerError::ForeignLog {
                partition,
                owner: history.owner,
                id: cfg.id.clone(),
            });
        }
        info!(partition = %partition, incarnation = format_args!("{:016x}", history.incarnation), "wal history");
        let positions_wal = wal.clone();
        let positions = tokio::task::spawn_blocking(move || positions_wal.positions(partition))
            .await
            .map_err(|e| ListenerError::Task(e.to_string()))??;
        let (resume, snapshot_state, durable) = match positions {
            None => (None, Default::default(), LogId::ZERO),
            Some(positions) => {
                let resume = match positions.source {
                    None => None,
                    Some(source) => {
                        let Some(replid) = ReplId::parse(&source.replid) else {
                            return Err(ListenerError::BadStoredPosition {
                                partition,
                                position: source,
                            });
                        };
                        Some(ReplPosition {
                            replid,
                            offset: source.offset,
                            db: source.db,
                        })
                    }
                };
                (resume, positions.snapshot, positions.durable)
            }
        };
        if snapshot_state.phase == SnapshotPhase::Writing {
            info!(partition = %partition, epoch = snapshot_state.epoch, "deleting a snapshot epoch left incomplete by a crash");
            wal.delete_snapshot(partition, snapshot_state.epoch).await?;
            wal.set_snapshot_state(
                partition,
                crate::wal::SnapshotState {
                    epoch: snapshot_state.epoch,
                    phase: SnapshotPhase::Absent,
                },
            )
            .await?;
        }
        // Nothing can begin an epoch yet: superseded ones left by an earlier
        // run go now.
        if let Err(error) = snapshot::collect_listener_snapshots(&wal, partition, &[], None).await {
            warn!(partition = %partition, %error, "cannot delete superseded snapshot epochs");
        }
        let mark = DurableMark {
            replid: resume.as_ref().map(|p| p.replid.to_string()),
            offset: resume.as_ref().map(|p| p.offset.0).unwrap_or(0),
            log_id: durable,
        };
        status.update(|s| {
            s.partition = partition.0;
            s.replid = mark.replid.clone();
            s.durable_offset = mark.offset;
            s.received_offset = mark.offset;
            s.last_log_id = durable.0;
        });
        let (durable_tx, _) = watch::channel(mark);
        let inner = Arc::new(Inner {
            cfg,
            wal,
            status,
            durable_tx,
            epochs: Mutex::new(EpochAllocator::recovered(snapshot_state)),
            era_start: Mutex::new(None),
            route,
            check_not_cluster: std::sync::atomic::AtomicBool::new(false),
            resync_epoch: std::sync::atomic::AtomicU64::new(0),
        });
        Ok(Listener {
            handle: ListenerHandle { inner },
            resume,
        })
    }

    pub fn handle(&self) -> ListenerHandle {
        self.handle.clone()
    }

    /// For a standalone source whose kind could not be asked when the node
    /// started (it did not answer): before a first full sync (no stored
    /// position), the source is asked whether it runs Redis Cluster, and if
    /// so replication stops (`STOPPED`, the error says to restart ferry,
    /// which then replicates it shard by shard) instead of taking one
    /// shard's data for the whole source.
    pub fn check_not_cluster(self) -> Listener {
        self.handle
            .inner
            .check_not_cluster
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Replicates until `shutdown`; returns after everything received is
    /// durable. Returns early only on a WAL error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ListenerError> {
        let cfg = &self.handle.inner.cfg;
        let route = self.handle.inner.route.clone();
        let heartbeat = cfg.heartbeat_interval.map(|interval| {
            let target = match &route {
                None => heartbeat::HeartbeatTarget::Fixed {
                    source: cfg.source.clone(),
                    key: cfg.heartbeat_key(),
                },
                Some(route) => heartbeat::HeartbeatTarget::Shard {
                    route: Arc::clone(route),
                    key_base: cfg.heartbeat_key(),
                },
            };
            tokio::spawn(heartbeat::run_heartbeat(
                target,
                interval,
                cfg.replica.connect_timeout,
                Arc::clone(&self.handle.inner.status),
                shutdown.child_token(),
            ))
        });
        let mut session = Session {
            handle: self.handle.clone(),
            resume: self.resume,
            heartbeat_key: Bytes::from(cfg.heartbeat_key()),
            tagged_heartbeat: route.is_some(),
        };
        let result = session.run_sessions(&shutdown).await;
        if let Some(task) = heartbeat {
            task.abort();
            let _ = task.await;
        }
        result
    }
}

/// How one replication session ended.
enum SessionEnd {
    Shutdown,
    /// The link failed; `established` says whether the stream had started
    /// (the backoff restarts from its minimum then).
    Lost {
        error: ReplError,
        established: bool,
    },
    /// The source sent an entry ferry cannot carry: replication stops.
    Refused {
        error: String,
    },
    /// The shard's master moved (a cluster failover): reconnect at once.
    Moved {
        from: String,
        to: String,
    },
}

/// A batch handed to the WAL and what its durability means.
struct BatchInfo {
    last: SourcePosition,
    /// Highest heartbeat timestamp in the batch.
    heartbeat_unix_ms: Option<u64>,
    /// Slot handoffs in the batch and their places in it (recorded in the
    /// slot table once durable).
    handoffs: Vec<(usize, SlotHandoff)>,
    /// Tenure voids in the batch (recorded in the slot table once durable).
    voids: Vec<SlotVoid>,
}

/// Entries waiting for an append.
#[derive(Default)]
struct Pending {
    entries: Vec<NewEntry>,
    bytes: usize,
    heartbeat_unix_ms: Option<u64>,
    handoffs: Vec<(usize, SlotHandoff)>,
    voids: Vec<SlotVoid>,
    /// The creation time of entries taken in the current receive pass: one
    /// clock reading per pass, as it all arrived together (a reading per
    /// entry was 1% of the listener's CPU at full rate).
    now_unix_ms: u64,
    /// Where the entries' payloads are encoded ([`Record::encode_write_into`]):
    /// blocks shared by consecutive entries. Carried from batch to batch.
    arena: BytesMut,
}

struct Session {
    handle: ListenerHandle,
    resume: Option<ReplPosition>,
    heartbeat_key: Bytes,
    /// The key is `heartbeat_key:<hash tag>` (a cluster shard's).
    tagged_heartbeat: bool,
}

impl Session {
    fn inner(&self) -> &Inner {
        &self.handle.inner
    }

    /// Connects, replicates, reconnects with backoff; until shutdown.
    async fn run_sessions(&mut self, shutdown: &CancellationToken) -> Result<(), ListenerError> {
        let partition = self.inner().cfg.partition;
        let mut backoff = Backoff::new(
            self.inner().cfg.reconnect_backoff_min,
            self.inner().cfg.reconnect_backoff_max,
        );
        let mut last_error: Option<String> = None;
        // A cluster shard's master is looked up again after a failed link.
        let mut rediscover = false;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            self.inner()
                .status
                .update(|s| s.state = SyncState::Connecting);
            let handle = self.handle.clone();
            let resume = self.resume.clone();
            let check = resume.is_none()
                && self
                    .inner()
                    .check_not_cluster
                    .load(std::sync::atomic::Ordering::Relaxed);
            let connect = async move {
                let replica = handle.replica_config(rediscover).await?;
                if check {
                    match crate::redis::cluster::is_cluster(&replica.source).await {
                        Ok(true) => return Ok(None),
                        Ok(false) => handle
                            .inner
                            .check_not_cluster
                            .store(false, std::sync::atomic::Ordering::Relaxed),
                        Err(error) => return Err(error.to_string()),
                    }
                }
                let addr = replica.source.addr();
                PsyncSource::connect(&replica, resume)
                    .await
                    .map(|psync| Some((psync, addr)))
                    .map_err(|error| error.to_string())
            };
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                connected = connect => connected,
            };
            rediscover = true;
            let (error, established) = match connected {
                Ok(None) => {
                    let error = "the source runs Redis Cluster (cluster_enabled:1) but was \
                                 started as a standalone source because it did not answer \
                                 when ferry started; restart ferry to replicate it shard by shard";
                    tracing::error!(partition = %partition, error, "replication stopped");
                    self.inner().status.update(|s| {
                        s.state = SyncState::Stopped;
                        s.last_error = Some(error.to_string());
                    });
                    shutdown.cancelled().await;
                    return Ok(());
                }
                Ok(Some((psync, addr))) => match self.session(psync, &addr, shutdown).await? {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost { error, established } => (error.to_string(), established),
                    SessionEnd::Moved { from, to } => {
                        info!(partition = %partition, %from, %to, "source shard master moved; following it");
                        backoff.reset();
                        continue;
                    }
                    SessionEnd::Refused { error } => {
                        tracing::error!(partition = %partition, %error, "replication stopped: the source sent an entry ferry cannot carry; raise the limit named and restart ferry");
                        self.inner().status.update(|s| {
                            s.state = SyncState::Stopped;
                            s.last_error = Some(error);
                        });
                        shutdown.cancelled().await;
                        return Ok(());
                    }
                },
                Err(error) => {
                    self.append_idle_handoffs().await?;
                    (error, false)
                }
            };
            if established {
                backoff.reset();
            }
            let message = error.clone();
            if last_error.as_ref() != Some(&message) {
                warn!(partition = %partition, %error, retry_in = ?backoff.current(), "replication link lost; reconnecting");
            } else {
                debug!(partition = %partition, %error, "replication link still failing");
            }
            self.inner().status.update(|s| {
                s.state = SyncState::Offline;
                s.last_error = Some(message.clone());
                s.reconnects += 1;
            });
            last_error = Some(message);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One replication session, from the PSYNC answer to its end.
    async fn session(
        &mut self,
        mut psync: PsyncSource,
        addr: &str,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, ListenerError> {
        let partition = self.inner().cfg.partition;
        let first = match psync.next_event().await {
            Ok(event) => event,
            Err(error) => {
                return Ok(SessionEnd::Lost {
                    error,
                    established: false,
                })
            }
        };
        match first {
            ReplEvent::FullResync { replid, offset } => {
                match self.full_sync(&mut psync, replid, offset, shutdown).await? {
                    None => {}
                    Some(end) => return Ok(end),
                }
            }
            ReplEvent::Continue { replid, offset, .. } => {
                info!(partition = %partition, %replid, %offset, "partial resync");
                self.inner().status.update(|s| {
                    s.state = SyncState::Online;
                    s.partial_resyncs += 1;
                    s.replid = Some(replid.to_string());
                });
            }
            other => {
                return Ok(SessionEnd::Lost {
                    error: ReplError::Protocol {
                        offset: psync.received_offset().0,
                        what: format!("session started with {other:?}"),
                    },
                    established: false,
                })
            }
        }
        self.stream(&mut psync, addr, shutdown).await
    }

    /// Stores a full resync (relay convention 3, docs/ARCHITECTURE.md). `None` when the stream
    /// may follow.
    async fn full_sync(
        &mut self,
        psync: &mut PsyncSource,
        replid: ReplId,
        offset: ReplOffset,
        shutdown: &CancellationToken,
    ) -> Result<Option<SessionEnd>, ListenerError> {
        let partition = self.inner().cfg.partition;
        info!(partition = %partition, %replid, %offset, "full resync: storing the source's rdb");
        self.inner().status.update(|s| {
            s.state = SyncState::FullSync;
            s.full_syncs += 1;
            s.full_sync_bytes_received = 0;
            s.full_sync_bytes_total = None;
        });
        let epoch = self.handle.begin_epoch().await?;
        let inner = Arc::clone(&self.handle.inner);
        inner
            .resync_epoch
            .store(epoch, std::sync::atomic::Ordering::Release);
        let _resync = ResyncMark(&inner.resync_epoch);
        let status = Arc::clone(&self.inner().status);
        let outcome = self
            .handle
            .receive_rdb(psync, epoch, shutdown, |bytes| {
                status.update(|s| s.full_sync_bytes_received = bytes)
            })
            .await;
        let (rdb_bytes, chunks) = match outcome {
            Ok(RdbOutcome::Complete { rdb_bytes, chunks }) => (rdb_bytes, chunks),
            Ok(RdbOutcome::Shutdown) => {
                self.handle.finish_epoch(epoch, false).await?;
                return Ok(Some(SessionEnd::Shutdown));
            }
            Ok(RdbOutcome::Lost(error)) => {
                self.handle.finish_epoch(epoch, false).await?;
                return Ok(Some(SessionEnd::Lost {
                    error,
                    established: false,
                }));
            }
            Err(error) => return Err(error),
        };
        // The new marker follows every handoff record of the log.
        let slots = match self.handle.marker_slots(shutdown, u64::MAX).await {
            Ok(slots) => slots,
            Err(error) => {
                // Without the shard's slots the marker cannot say which
                // keys it holds: the full sync is done again.
                self.handle.finish_epoch(epoch, false).await?;
                return Ok(Some(SessionEnd::Lost {
                    error: ReplError::MasterError {
                        step: "CLUSTER NODES (the snapshot marker's slots)",
                        message: error,
                    },
                    established: false,
                }));
            }
        };
        self.handle.finish_epoch(epoch, true).await?;
        let source = SourcePosition {
            replid: replid.as_str().into(),
            offset,
            db: 0,
        };
        let (scope, tenures, handoffs) = match slots {
            Some(slots) => (Some(slots.scope), slots.tenures, slots.handoffs),
            None => (None, Vec::new(), Vec::new()),
        };
        let marker = Record::Snapshot(SnapshotMarker {
            epoch,
            rdb_bytes,
            chunks,
            replid: replid.to_string(),
            offset: offset.0,
            scope,
            tenures,
            handoffs,
        });
        let range = self
            .inner()
            .wal
            .append(
                partition,
                vec![NewEntry {
                    flags: 0,
                    created_unix_ms: Some(unix_ms()),
                    source: source.clone(),
                    payload: marker.encode(),
                }],
            )
            .await?;
        *self.inner().era_start.lock().await = Some(range.last);
        info!(partition = %partition, epoch, rdb_bytes, chunks, marker_log_id = %range.last, "full resync stored");
        self.inner().status.update(|s| {
            s.full_sync_bytes_total = Some(rdb_bytes);
            s.state = SyncState::Online;
        });
        self.made_durable(
            &psync.ack_handle(),
            range,
            &BatchInfo {
                last: source,
                heartbeat_unix_ms: None,
                handoffs: Vec::new(),
                voids: Vec::new(),
            },
        );
        Ok(None)
    }

    /// Publishes a durable batch: resume position, source ack, status.
    fn made_durable(&mut self, ack: &AckHandle, range: AppendedRange, batch: &BatchInfo) {
        let last = &batch.last;
        if let Some(replid) = ReplId::parse(&last.replid) {
            self.resume = Some(ReplPosition {
                replid,
                offset: last.offset,
                db: last.db,
            });
        }
        ack.set(last.offset);
        self.publish_durable(ack, range.last, &last.replid);
        if let Some(route) = &self.inner().route {
            let done: Vec<(SlotHandoff, u64)> = batch
                .handoffs
                .iter()
                .map(|&(index, handoff)| (handoff, range.first.0 + index as u64))
                .collect();
            if let Err(error) = route.handoffs_durable(&done) {
                // Logged again after a restart (the table still names this
                // partition): a repeated handoff changes nothing.
                warn!(partition = %self.inner().cfg.partition, %error, "slot handoffs are durable in the log but the slot table was not saved");
            }
            if let Err(error) = route.voids_durable(&batch.voids) {
                // Checked again after a restart (the receiver is still in
                // the file): a repeated void changes nothing.
                warn!(partition = %self.inner().cfg.partition, %error, "slot tenure voids are durable in the log but the slot table was not saved");
            }
        }
        if let Some(sent) = batch.heartbeat_unix_ms {
            let latency = unix_ms().saturating_sub(sent);
            self.inner().status.update(|s| {
                s.heartbeat_latency_ms = Some(latency);
                s.heartbeat_unix_ms = Some(sent);
            });
        }
    }

    /// A shard whose nodes all left (or joined other shards) has no stream
    /// any more: what its log holds is all it will ever hold, so the slots
    /// handed over from it (`ClusterSource::check_handoffs` does not ask a
    /// master there is not) are appended at its last durable position.
    async fn append_idle_handoffs(&mut self) -> Result<(), ListenerError> {
        let Some(route) = self.inner().route.clone() else {
            return Ok(());
        };
        let pending = route.pending_handoffs();
        if pending.is_empty() || route.state().master.is_some() {
            return Ok(());
        }
        let Some(resume) = self.resume.clone() else {
            return Ok(());
        };
        let partition = self.inner().cfg.partition;
        let source = SourcePosition {
            replid: resume.replid.as_str().into(),
            offset: resume.offset,
            db: resume.db,
        };
        let entries: Vec<NewEntry> = pending
            .iter()
            .map(|p| NewEntry {
                flags: 0,
                created_unix_ms: Some(unix_ms()),
                source: source.clone(),
                payload: Record::Handoff(p.handoff).encode(),
            })
            .collect();
        let range = self.inner().wal.append(partition, entries).await?;
        info!(partition = %partition, handoffs = pending.len(), first_log_id = %range.first, "slot handoffs of a shard that left the cluster appended at its last position");
        let done: Vec<(SlotHandoff, u64)> = pending
            .iter()
            .enumerate()
            .map(|(i, p)| (p.handoff, range.first.0 + i as u64))
            .collect();
        if let Err(error) = route.handoffs_durable(&done) {
            warn!(partition = %partition, %error, "slot handoffs are durable in the log but the slot table was not saved");
        }
        self.inner().status.update(|s| s.last_log_id = range.last.0);
        let mut mark = self.inner().durable_tx.borrow().clone();
        mark.log_id = range.last;
        self.inner().durable_tx.send_replace(mark);
        Ok(())
    }

    fn publish_durable(&self, ack: &AckHandle, log_id: LogId, replid: &str) {
        let offset = ack.get().0;
        let mark = DurableMark {
            replid: Some(replid.to_string()),
            offset,
            log_id,
        };
        self.inner().status.update(|s| {
            s.durable_offset = offset;
            // Everything durable was received (the stream loop updates the
            // received offset only as frames arrive).
            s.received_offset = s.received_offset.max(offset);
            s.last_log_id = log_id.0;
            s.replid = mark.replid.clone();
        });
        self.inner().durable_tx.send_replace(mark);
    }

    /// The heartbeat timestamp if `commands` is this listener's heartbeat.
    fn heartbeat_value(&self, entry: &crate::redis::psync::ReplEntry) -> Option<u64> {
        let [command] = entry.commands.as_slice() else {
            return None;
        };
        let [name, key, value, ..] = command.args.as_slice() else {
            return None;
        };
        let ours = key == &self.heartbeat_key
            || (self.tagged_heartbeat
                && key.len() > self.heartbeat_key.len()
                && key.starts_with(&self.heartbeat_key)
                && key[self.heartbeat_key.len()] == b':');
        if !name.eq_ignore_ascii_case(b"SET") || !ours {
            return None;
        }
        std::str::from_utf8(value).ok()?.parse().ok()
    }

    /// Streams commands into the WAL until the link fails or shutdown.
    async fn stream(
        &mut self,
        psync: &mut PsyncSource,
        addr: &str,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, ListenerError> {
        let partition = self.inner().cfg.partition;
        let max_entries = self.inner().cfg.batch_max_entries;
        let max_bytes = self.inner().cfg.batch_max_bytes;
        let ack = psync.ack_handle();
        let wal = self.inner().wal.clone();
        let mut pending = Pending::default();
        let mut in_flight: Option<(
            BoxFuture<'static, Result<AppendedRange, WalError>>,
            BatchInfo,
        )> = None;
        // Offset after the latest data-free bytes, acked once nothing is
        // waiting to become durable.
        let mut progress: Option<u64> = None;
        let mut end: Option<SessionEnd> = None;
        // Fragments taken of the entry being received.
        let mut fragments = 0u32;
        let mut replid: Arc<str> = psync.position().replid.as_str().into();
        // Slot handoffs (docs/cluster.md, rule 2) appended this session.
        let mut handoffs_pushed: Vec<SlotHandoff> = Vec::new();
        // The stream's offset and db after the last event taken.
        let mut last_position = psync.offset_db();
        if let Some(route) = &self.inner().route {
            route.reset_queued();
        }
        let mut handoff_rx = self.inner().route.as_ref().map(|r| r.watch_handoffs());
        self.push_handoffs(psync, &mut pending, &replid, &mut handoffs_pushed);
        if self
            .resume
            .as_ref()
            .is_some_and(|r| r.replid.as_str() != &*replid)
        {
            // `+CONTINUE <new id>`: the durable history is now known under it.
            // The borrow must end before publish_durable writes the watch:
            // a guard kept for the whole statement deadlocks this thread.
            let log_id = self.inner().durable_tx.borrow().log_id;
            self.publish_durable(&ack, log_id, &replid);
        }
        loop {
            if in_flight.is_none() && !pending.entries.is_empty() {
                // A write of a slot its partition receives is appended only
                // once the slot table names the partition as a receiver
                // (docs/cluster.md, rule 9).
                if let Some(route) = &self.inner().route {
                    if let Err(error) = route.save_receivers() {
                        return Err(ListenerError::Route {
                            partition,
                            error: format!("saving the slot table: {error}"),
                        });
                    }
                }
                let mut batch = std::mem::take(&mut pending);
                // The next batch is likely as long: one allocation for it.
                pending.entries.reserve(batch.entries.len());
                pending.arena = std::mem::take(&mut batch.arena);
                let info = BatchInfo {
                    last: batch
                        .entries
                        .last()
                        .map(|e| e.source.clone())
                        .unwrap_or_default(),
                    heartbeat_unix_ms: batch.heartbeat_unix_ms,
                    handoffs: batch.handoffs,
                    voids: batch.voids,
                };
                let wal = wal.clone();
                in_flight = Some((
                    async move { wal.append(partition, batch.entries).await }.boxed(),
                    info,
                ));
            }
            if in_flight.is_none() && pending.entries.is_empty() {
                if let Some(offset) = progress.take() {
                    if offset > ack.get().0 {
                        ack.set(ReplOffset(offset));
                        let log_id = self.inner().durable_tx.borrow().log_id;
                        self.publish_durable(&ack, log_id, &replid);
                    }
                }
                if let Some(end) = end.take() {
                    return Ok(end);
                }
            }
            let reading =
                end.is_none() && pending.entries.len() < max_entries && pending.bytes < max_bytes;
            enum Step {
                Stop,
                Moved(String),
                Handoffs,
                Appended(Result<AppendedRange, WalError>),
                Event(Result<ReplEvent, ReplError>),
            }
            let route = self.inner().route.clone();
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled(), if end.is_none() => Step::Stop,
                to = async {
                    match &route {
                        Some(route) => route.moved_from(addr).await,
                        None => std::future::pending().await,
                    }
                }, if end.is_none() => Step::Moved(to),
                _ = async {
                    match handoff_rx.as_mut() {
                        Some(rx) => {
                            if rx.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                        None => std::future::pending().await,
                    }
                }, if end.is_none() => Step::Handoffs,
                appended = async {
                    match in_flight.as_mut() {
                        Some((future, _)) => future.await,
                        None => std::future::pending().await,
                    }
                }, if in_flight.is_some() => Step::Appended(appended),
                event = psync.next_event(), if reading => Step::Event(event),
            };
            match step {
                Step::Stop => end = Some(SessionEnd::Shutdown),
                // What was received is made durable first (the loop drains
                // before it returns `end`).
                Step::Moved(to) => {
                    end = Some(SessionEnd::Moved {
                        from: addr.to_string(),
                        to,
                    })
                }
                Step::Handoffs => {
                    if fragments == 0 {
                        self.push_handoffs(psync, &mut pending, &replid, &mut handoffs_pushed);
                    }
                }
                Step::Appended(result) => {
                    let range = result?;
                    if let Some((_, info)) = in_flight.take() {
                        self.made_durable(&ack, range, &info);
                    }
                }
                Step::Event(event) => {
                    let mut event = Some(event);
                    pending.now_unix_ms = unix_ms();
                    // Take what is already buffered without waiting, up to
                    // the batch limits.
                    while let Some(next) = event.take() {
                        if let (Ok(next), 0) = (&next, fragments) {
                            self.before_entry(
                                psync,
                                next,
                                last_position,
                                &mut pending,
                                &replid,
                                &mut handoffs_pushed,
                            )
                            .await;
                        }
                        let taken = match next {
                            Ok(next) => self.take_event(
                                psync,
                                next,
                                &mut pending,
                                &mut progress,
                                &mut replid,
                                &mut fragments,
                            ),
                            Err(error) if error.is_uncarriable() => {
                                Err(ListenerError::Uncarriable(error.to_string()))
                            }
                            Err(error) => {
                                end = Some(SessionEnd::Lost {
                                    error,
                                    established: true,
                                });
                                break;
                            }
                        };
                        match taken {
                            Ok(()) => {}
                            Err(
                                error @ (ListenerError::EntryTooLarge { .. }
                                | ListenerError::Uncarriable(_)),
                            ) => {
                                end = Some(SessionEnd::Refused {
                                    error: error.to_string(),
                                });
                                break;
                            }
                            Err(error) => return Err(error),
                        }
                        last_position = psync.offset_db();
                        // A handoff (or void) goes right after the entry that
                        // reaches its offset, before any later one (their
                        // tags count it, rule 1).
                        if fragments == 0 && self.handoff_due(psync) {
                            self.push_handoffs(psync, &mut pending, &replid, &mut handoffs_pushed);
                        }
                        if pending.entries.len() < max_entries && pending.bytes < max_bytes {
                            event = psync.next_event().now_or_never();
                        }
                    }
                    if fragments == 0 && end.is_none() {
                        self.push_handoffs(psync, &mut pending, &replid, &mut handoffs_pushed);
                    }
                    let received = psync.received_offset().0;
                    self.inner().status.update(|s| s.received_offset = received);
                }
            }
        }
    }

    /// Whether a pending handoff or void waits for an offset the stream has
    /// reached.
    fn handoff_due(&self, psync: &PsyncSource) -> bool {
        self.inner()
            .route
            .as_ref()
            .is_some_and(|route| route.due() <= psync.position().offset.0)
    }

    /// Appends the pending slot handoffs whose offset the stream has reached
    /// (docs/cluster.md, rule 2): every entry at or below it is already in
    /// `pending` or in the log before it. Never inside an entry's fragment
    /// run (the caller checks).
    fn push_handoffs(
        &self,
        psync: &PsyncSource,
        pending: &mut Pending,
        replid: &str,
        pushed: &mut Vec<SlotHandoff>,
    ) {
        let at = psync.offset_db();
        self.push_handoffs_at(at, at.0 .0, pending, replid, pushed);
    }

    /// [`Self::push_handoffs`] for the records due at or below `reached`,
    /// placed at `(offset, db)` (the stream's position after the last event
    /// taken, at or below `reached`).
    fn push_handoffs_at(
        &self,
        (offset, db): (ReplOffset, u32),
        reached: u64,
        pending: &mut Pending,
        replid: &str,
        pushed: &mut Vec<SlotHandoff>,
    ) {
        let Some(route) = &self.inner().route else {
            return;
        };
        // A record of the log's own at the stream's position.
        let append = |pending: &mut Pending, record: Record| {
            let payload = record.encode();
            pending.bytes += payload.len();
            pending.entries.push(NewEntry {
                flags: 0,
                created_unix_ms: Some(unix_ms()),
                source: SourcePosition {
                    replid: replid.into(),
                    offset,
                    db,
                },
                payload,
            });
        };
        for waiting in route.pending_handoffs() {
            if waiting.at > reached || pushed.contains(&waiting.handoff) {
                continue;
            }
            append(pending, Record::Handoff(waiting.handoff));
            pending
                .handoffs
                .push((pending.entries.len() - 1, waiting.handoff));
            pushed.push(waiting.handoff);
            // The writes after it are tagged as no longer the owner's.
            route.handoff_queued(waiting.handoff);
        }
        // Tenure voids (docs/cluster.md, rule 9), once at their offset:
        // the writes after the record are tagged past the voided tenure.
        for waiting in route.pending_voids() {
            if waiting.at > reached {
                continue;
            }
            route.void_queued(&waiting.void);
            append(pending, Record::Void(waiting.void));
            pending.voids.push(waiting.void);
        }
        route.set_due_after(reached);
    }

    /// Before `event` when it begins an entry (no fragment of one taken):
    /// when this partition's master is being asked about a slot the entry
    /// may write (a handoff or void check in flight), waits for the answer,
    /// then appends what is due before the entry's first byte, at
    /// `position` (offset and db after the last event taken). The answer's offset may be
    /// below what the stream received meanwhile; without the wait, a write
    /// of the slot past that offset (the slot coming back into the shard)
    /// would be tagged and logged before the record that orders it after
    /// the handoff (docs/cluster.md, rule 2, "late answers").
    async fn before_entry(
        &self,
        psync: &PsyncSource,
        event: &ReplEvent,
        position: (ReplOffset, u32),
        pending: &mut Pending,
        replid: &str,
        pushed: &mut Vec<SlotHandoff>,
    ) {
        let Some(route) = self.inner().route.as_ref() else {
            return;
        };
        if !route.checking(None) {
            return;
        }
        // The entry's slot, and the highest record offset that goes before
        // it: a record's offset is a command boundary, so one below the
        // entry's end is at or below its start.
        let (slot, reached) = match event {
            ReplEvent::Entry(entry) => match cluster::write_slot(&entry.commands) {
                Some(slot) => (Some(slot), entry.offset.0.saturating_sub(1)),
                None => return,
            },
            // A streamed entry's keys are not known yet: any slot.
            ReplEvent::Fragment(_) => (None, psync.position().offset.0),
            _ => return,
        };
        if !route.checking(slot) {
            return;
        }
        route.check_done(slot).await;
        if route.due() <= reached {
            self.push_handoffs_at(position, reached, pending, replid, pushed);
        }
    }

    fn take_event(
        &self,
        psync: &PsyncSource,
        event: ReplEvent,
        pending: &mut Pending,
        progress: &mut Option<u64>,
        replid: &mut Arc<str>,
        fragments: &mut u32,
    ) -> Result<(), ListenerError> {
        let partition = self.inner().cfg.partition;
        match event {
            ReplEvent::Fragment(data) => {
                // The entry's start: this entry is not acked until its write
                // is durable, and a restart receives it again from there.
                let position = psync.position();
                if **replid != *position.replid.as_str() {
                    *replid = position.replid.as_str().into();
                }
                let payload = Record::encode_fragment(*fragments, &data);
                *fragments += 1;
                pending.bytes += payload.len();
                pending.entries.push(NewEntry {
                    flags: 0,
                    created_unix_ms: Some(pending.now_unix_ms),
                    source: SourcePosition {
                        replid: Arc::clone(replid),
                        offset: position.offset,
                        db: position.db,
                    },
                    payload,
                });
                *progress = None;
            }
            ReplEvent::Entry(entry) => {
                let position = psync.position();
                if **replid != *position.replid.as_str() {
                    *replid = position.replid.as_str().into();
                }
                let expected: u64 = entry.streamed.iter().map(|s| u64::from(s.fragments)).sum();
                if expected != u64::from(*fragments) {
                    return Err(ListenerError::Task(format!(
                        "entry at source offset {} names {expected} fragments but {} came before it",
                        entry.offset, *fragments
                    )));
                }
                *fragments = 0;
                let tenure = self
                    .inner()
                    .route
                    .as_ref()
                    .and_then(|route| route.tenure_of(&entry.commands));
                let payload = Record::encode_write_into(
                    &mut pending.arena,
                    entry.db,
                    &entry.commands,
                    entry.transaction,
                    &entry.streamed,
                    tenure,
                );
                if payload.len() > crate::wal::MAX_PAYLOAD_LEN {
                    return Err(ListenerError::EntryTooLarge {
                        partition,
                        offset: entry.offset.0,
                        len: payload.len(),
                        limit: crate::wal::MAX_PAYLOAD_LEN,
                    });
                }
                if let Some(sent) = self.heartbeat_value(&entry) {
                    pending.heartbeat_unix_ms = Some(sent);
                }
                pending.bytes += payload.len();
                pending.entries.push(NewEntry {
                    flags: 0,
                    created_unix_ms: Some(pending.now_unix_ms),
                    // The db after the entry, so that resuming here is exact
                    // even after a transaction that switched db.
                    source: SourcePosition {
                        replid: Arc::clone(replid),
                        offset: entry.offset,
                        db: position.db,
                    },
                    payload,
                });
                // Data-free bytes before this entry are covered by its ack.
                *progress = None;
            }
            ReplEvent::Progress { offset } => *progress = Some(offset.0),
            other => {
                // The client yields these only at a session's start.
                warn!(partition = %partition, event = ?other, "unexpected replication event in the stream; ignored");
            }
        }
        Ok(())
    }
}
