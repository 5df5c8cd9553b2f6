//! Running nodes: [`run_listener`], [`run_drainer`], [`run_sync`].
//!
//! In: a checked config and a shutdown token (SIGTERM/SIGINT in the CLI).
//! Out: the stages running as tokio tasks until shutdown, a [`Node`] that
//! answers the admin API, and `Ok(())` after a clean stop: every stage
//! flushed what it received and the WALs are closed.
//!
//! A listener runs one partition for a standalone source, or one per shard
//! of a Redis Cluster source ([`crate::listener::ClusterSource`]: detected
//! when the node starts, shards added later get their partition from a
//! topology poll), each with its shippers to every drainer.
//!
//! Failure policy: network and target failures are retried inside each stage
//! (backoff, state shown in `ferry status`); only a failing WAL (disk) or an
//! applier's fatal error stops the node, which then shuts the other stages
//! down cleanly and returns the error (exit code 1, so a supervisor restarts
//! it and the stages resume from their durable positions).

use crate::position::now_unix_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::config::{ApplyFrom, DrainerNodeConfig, DrainerPeer, ListenerNodeConfig, SyncConfig};
use super::conflicts;
use super::switchover;
use super::two_way;
use crate::admin::AdminAccess;
use crate::apply::{self, ApplyConfig, ApplyStatus};
use crate::backoff::Backoff;
use crate::listener::{
    ClusterSource, Listener, ListenerHandle, ListenerStatus, ShardRoute as ClusterRoute,
};
use crate::position::{LogId, PartitionId};
use crate::precheck::Verdict;
use crate::record::SnapshotMarker;
use crate::redis::url::RedisUrl;
use crate::secret::Secret;
use crate::ship::tls::ServerTls;
use crate::ship::{
    self, AllowedListener, DrainerService, DrainerServiceConfig, DrainerTarget, FallbackSnapshot,
    Shipper, ShipperConfig, ShipperStatusHandle, SnapshotProvider, SnapshotProviderError,
};
use crate::status::{
    BlockedEntry, ControlError, DrainerSide, ListenerSide, NodeControl, NodeStatus, RefusedCommand,
    ShipSide, SkipOutcome, SkipRequest, SnapshotLoad, SourceShard, SwitchoverReport, SyncSelector,
};
use crate::wal::{DownstreamId, Wal, WalConfig, WalError};

/// Why a node could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{what}: {error}")]
    Io {
        what: String,
        #[source]
        error: std::io::Error,
    },
    #[error("opening the WAL in {dir}: {error}")]
    WalOpen {
        dir: PathBuf,
        #[source]
        error: WalError,
    },
    #[error("listener: {0}")]
    Listener(#[from] crate::listener::ListenerError),
    #[error("ship: {0}")]
    Ship(#[from] ship::ShipError),
    #[error("apply: {0}")]
    Apply(#[from] apply::ApplyError),
    #[error("{0}")]
    Config(String),
    /// A stage failed for good; the node stopped the others.
    #[error("{0}")]
    Fatal(String),
    /// The precheck before the first full sync failed: the report's table.
    #[error("precheck failed; nothing was started:\n{0}")]
    Precheck(String),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here assigns whole values.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// What every stage of a node is started with: the node's stop token, its
/// fatal-error slot, and the list of tasks `finish` waits for.
pub(super) struct Stages {
    pub(super) shutdown: CancellationToken,
    fatal: Arc<Fatal>,
    pub(super) tasks: Vec<JoinHandle<()>>,
}

impl Stages {
    pub(super) fn new(shutdown: CancellationToken) -> Stages {
        Stages {
            fatal: Fatal::new(shutdown.clone()),
            shutdown,
            tasks: Vec::new(),
        }
    }
}

/// The first fatal error of any stage; setting it stops the node.
struct Fatal {
    stop: CancellationToken,
    error: Mutex<Option<String>>,
}

impl Fatal {
    fn new(stop: CancellationToken) -> Arc<Fatal> {
        Arc::new(Fatal {
            stop,
            error: Mutex::new(None),
        })
    }

    fn raise(&self, what: String) {
        error!(error = %what, "stopping the node");
        lock(&self.error).get_or_insert(what);
        self.stop.cancel();
    }

    fn take(&self) -> Option<String> {
        lock(&self.error).take()
    }
}

/// The address of `url` without its password (for status and logs); a
/// comma-separated seed list (a Redis Cluster) address by address, as the
/// stages split it, not parsed as one URL (whose "host" would be everything
/// up to the last colon, shown as `redis://[h1:p1,h2:p2,h3]:p3`). One
/// address that does not parse makes it all `<invalid url>`.
pub(super) fn redacted(url: &str) -> String {
    url.split(',')
        .map(|address| RedisUrl::parse(address.trim()).map(|url| url.to_string()))
        .collect::<Result<Vec<_>, _>>()
        .map(|addresses| addresses.join(","))
        .unwrap_or_else(|_| "<invalid url>".to_string())
}

/// Entries after `acked` and the age of the oldest of them. Blocking.
fn lag_after(wal: &Wal, partition: PartitionId, acked: LogId) -> (u64, u64) {
    let last = wal
        .last_log_id(partition)
        .ok()
        .flatten()
        .unwrap_or(LogId::ZERO);
    let lag = last.0.saturating_sub(acked.0);
    if lag == 0 {
        return (0, 0);
    }
    let created = wal.oldest_created(partition, acked.next()).ok().flatten();
    let latency = created.map_or(0, |created| now_unix_ms().saturating_sub(created));
    (lag, latency)
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |error| NodeError::Io { what, error }
}

pub(super) async fn open_wal(cfg: WalConfig) -> Result<Wal, NodeError> {
    let dir = cfg.dir.clone();
    crate::secret::create_private_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
    Wal::open(cfg)
        .await
        .map_err(|error| NodeError::WalOpen { dir, error })
}

/// How long [`reopen_wal`] waits for the old handles of a WAL to go.
const REOPEN_WAIT: Duration = Duration::from_secs(30);

/// Opens the WAL of `cfg` again once the stages that used it stopped and
/// the last handle was dropped. A handle can outlive the stages by a
/// moment: an admin API `status` call running on the blocking pool holds
/// the node, and with it the WAL. RocksDB's lock is then still held by
/// this process, and the open is retried until the handle goes (at most
/// [`REOPEN_WAIT`]). Before, that open failed and the process exited
/// (seen right after two-way sync was established, while status was
/// polled).
pub(super) async fn reopen_wal(cfg: WalConfig) -> Result<Wal, NodeError> {
    let deadline = std::time::Instant::now() + REOPEN_WAIT;
    let mut waited = false;
    loop {
        match open_wal(cfg.clone()).await {
            Err(NodeError::WalOpen {
                error: crate::wal::WalError::Rocks(error),
                dir,
            }) if is_lock_held(&error) && std::time::Instant::now() < deadline => {
                if !waited {
                    info!(dir = %dir.display(), "the WAL's old handle is still in use; opening it again once it is dropped");
                    waited = true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            done => return done,
        }
    }
}

/// Whether RocksDB refused an open because its `LOCK` file is held (by
/// this process: another handle of the same dir is still open).
fn is_lock_held(error: &rocksdb::Error) -> bool {
    let text = error.to_string();
    text.contains("/LOCK") || text.contains("lock hold by current process")
}

// ---------------------------------------------------------------------------
// Listener side

/// Fallback snapshots for the shippers, taken by the listener.
struct ListenerSnapshots {
    handle: ListenerHandle,
    shutdown: CancellationToken,
}

impl SnapshotProvider for ListenerSnapshots {
    fn resync_epoch(&self, partition: PartitionId) -> Option<u64> {
        (partition == self.handle.partition())
            .then(|| self.handle.resync_epoch())
            .flatten()
    }

    fn preload_epoch(&self, partition: PartitionId) -> Option<u64> {
        self.handle
            .route()
            .is_none()
            .then(|| self.resync_epoch(partition))
            .flatten()
    }

    fn fallback_snapshot(
        &self,
        partition: PartitionId,
    ) -> BoxFuture<'_, Result<FallbackSnapshot, SnapshotProviderError>> {
        Box::pin(async move {
            if partition != self.handle.partition() {
                return Err(format!(
                    "this listener replicates partition {}, not {partition}",
                    self.handle.partition()
                )
                .into());
            }
            let taken = self.handle.take_fallback_snapshot(&self.shutdown).await?;
            Ok(FallbackSnapshot {
                epoch: taken.epoch,
                marker: SnapshotMarker {
                    epoch: taken.epoch,
                    rdb_bytes: taken.rdb_bytes,
                    chunks: taken.chunks,
                    replid: taken.replid,
                    offset: taken.offset,
                    scope: taken.scope,
                    tenures: taken.tenures,
                    handoffs: taken.handoffs,
                },
                marker_log_id: taken.marker_log_id,
            })
        })
    }
}

struct RunningShipper {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct ShipSlot {
    target: DrainerTarget,
    stopped: bool,
    running: Option<RunningShipper>,
    status: Option<ShipperStatusHandle>,
}

/// A listener partition and its shippers.
pub struct ListenerPart {
    listener_id: String,
    source: String,
    partition: PartitionId,
    wal: Wal,
    handle: ListenerHandle,
    ship_cfg: ShipperConfig,
    provider: Arc<dyn SnapshotProvider>,
    slots: Mutex<Vec<ShipSlot>>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    fatal: Arc<Fatal>,
}

/// `<data-dir>/stopped-syncs`: one `<partition> <drainer-id>` per line.
fn read_stopped(path: &Path) -> Result<BTreeSet<(u32, String)>, NodeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(error) => return Err(io(format!("reading {}", path.display()))(error)),
    };
    let mut stopped = BTreeSet::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parsed = line
            .split_once(' ')
            .and_then(|(p, d)| Some((p.parse::<u32>().ok()?, d.to_string())));
        match parsed {
            Some(entry) => {
                stopped.insert(entry);
            }
            None => {
                return Err(NodeError::Config(format!(
                    "{} line {}: expected `<partition> <drainer-id>`, got {line:?}",
                    path.display(),
                    index + 1
                )))
            }
        }
    }
    Ok(stopped)
}

/// One rewrite of `<data-dir>/stopped-syncs` at a time in this process.
static STOP_FILE_LOCK: Mutex<()> = Mutex::new(());

pub(super) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl ListenerPart {
    fn spawn_shipper(&self, slot: &mut ShipSlot) -> Result<(), ship::ShipError> {
        let shipper = Shipper::new(
            self.wal.clone(),
            self.partition,
            slot.target.clone(),
            self.ship_cfg.clone(),
            Arc::clone(&self.provider),
        )?;
        slot.status = Some(shipper.status_handle());
        let cancel = self.shutdown.child_token();
        let fatal = Arc::clone(&self.fatal);
        let drainer = slot.target.drainer_id.to_string();
        let partition = self.partition;
        let task = self.runtime.spawn({
            let cancel = cancel.clone();
            async move {
                if let Err(error) = shipper.run(cancel).await {
                    fatal.raise(format!(
                        "shipper of partition {partition} to {drainer}: {error}"
                    ));
                }
            }
        });
        slot.running = Some(RunningShipper { cancel, task });
        Ok(())
    }

    /// This partition's lines of `<data-dir>/stopped-syncs`.
    fn stopped_lines(&self) -> String {
        lock(&self.slots)
            .iter()
            .filter(|slot| slot.stopped)
            .map(|slot| format!("{} {}\n", self.partition.0, slot.target.drainer_id))
            .collect()
    }

    fn matches(&self, slot: &ShipSlot, which: &SyncSelector) -> bool {
        which.partition.map_or(true, |p| p == self.partition.0)
            && which
                .drainer_id
                .as_deref()
                .map_or(true, |d| d == slot.target.drainer_id.as_str())
    }

    /// Stops or restarts the matching shippers; returns (matched, changed).
    /// The caller saves the stop file.
    fn set_stopped(
        &self,
        which: &SyncSelector,
        stop: bool,
    ) -> Result<(usize, usize), ControlError> {
        let mut slots = lock(&self.slots);
        let mut matched = 0;
        let mut changed = 0;
        for index in 0..slots.len() {
            if !self.matches(&slots[index], which) {
                continue;
            }
            matched += 1;
            if slots[index].stopped == stop {
                continue;
            }
            let slot = &mut slots[index];
            slot.stopped = stop;
            if stop {
                if let Some(running) = slot.running.take() {
                    running.cancel.cancel();
                    // The task finishes on its own (it waits for acks of
                    // what it sent); nothing here needs its result.
                    drop(running.task);
                }
                info!(partition = %self.partition, drainer = %slot.target.drainer_id, "sync stopped");
            } else {
                self.spawn_shipper(slot)
                    .map_err(|error| ControlError::Failed(error.to_string()))?;
                info!(partition = %self.partition, drainer = %slot.target.drainer_id, "sync restarted");
            }
            changed += 1;
        }
        Ok((matched, changed))
    }

    fn status(&self) -> ListenerSide {
        let listener = self.handle.status().snapshot();
        let acked_in_wal: BTreeMap<String, LogId> = self
            .wal
            .positions(self.partition)
            .ok()
            .flatten()
            .map(|positions| {
                positions
                    .acked
                    .into_iter()
                    .map(|(id, acked)| (id.to_string(), acked))
                    .collect()
            })
            .unwrap_or_default();
        let slots = lock(&self.slots);
        let shipping = slots
            .iter()
            .map(|slot| {
                let drainer_id = slot.target.drainer_id.to_string();
                let live = slot.status.as_ref().map(|status| status.snapshot());
                let acked = acked_in_wal
                    .get(&drainer_id)
                    .copied()
                    .unwrap_or(LogId::ZERO)
                    .max(live.as_ref().map_or(LogId::ZERO, |live| live.acked));
                let (lag, latency_ms) = lag_after(&self.wal, self.partition, acked);
                let state = if slot.stopped {
                    "STOPPED".to_string()
                } else {
                    live.as_ref()
                        .map_or("OFFLINE".to_string(), |live| live.state.to_string())
                };
                ShipSide {
                    drainer_id,
                    endpoint: slot.target.endpoint.clone(),
                    state,
                    acked: acked.0,
                    lag,
                    latency_ms,
                    fallback_snapshots: live.as_ref().map_or(0, |l| l.fallback_snapshots),
                    entries_sent: live.as_ref().map_or(0, |l| l.entries_sent),
                    bytes_sent: live.as_ref().map_or(0, |l| l.bytes_sent),
                    reconnects: live.as_ref().map_or(0, |l| l.reconnects),
                    last_error: live.and_then(|l| l.last_error),
                }
            })
            .collect();
        let pending_handoffs: Vec<String> = self
            .handle
            .route()
            .map(|route| {
                route
                    .pending_handoffs()
                    .iter()
                    .map(|p| {
                        format!(
                            "slot {} to partition {} (generation {}) at source offset {}",
                            p.handoff.slot, p.handoff.to, p.handoff.gen, p.at
                        )
                    })
                    .chain(route.pending_voids().iter().map(|p| {
                        format!(
                            "slot {} back to its owner (import aborted: tenure generation {} voided) at source offset {}",
                            p.void.slot, p.void.gen, p.at
                        )
                    }))
                    .chain(route.stranded())
                    .collect()
            })
            .unwrap_or_default();
        let route = self.handle.route().map(|route| route.state());
        let source = match route.as_ref().and_then(|state| state.master.as_ref()) {
            Some(master) => master.addr(),
            None => self.source.clone(),
        };
        ListenerSide {
            listener_id: self.listener_id.clone(),
            partition: self.partition.0,
            source,
            shard: route.map(|state| SourceShard {
                master_id: state.master_id.unwrap_or_default(),
                slots: state.slots.to_string(),
                slot_count: state.slots.count() as u32,
                pending_handoffs,
            }),
            source_state: listener.state.to_string(),
            // A paused WAL explains a stalled stream better than any link error.
            source_error: self.wal.disk_pause().or(listener.last_error),
            replid: listener.replid,
            received_offset: listener.received_offset,
            durable_offset: listener.durable_offset,
            first_log_id: self
                .wal
                .first_log_id(self.partition)
                .ok()
                .flatten()
                .map_or(0, |id| id.0),
            last_log_id: listener.last_log_id,
            full_syncs: listener.full_syncs,
            partial_resyncs: listener.partial_resyncs,
            full_sync_bytes_received: listener.full_sync_bytes_received,
            full_sync_bytes_total: listener.full_sync_bytes_total,
            heartbeat_latency_ms: listener.heartbeat_latency_ms,
            reconnects: listener.reconnects,
            shipping,
        }
    }
}

/// What a listener partition is started with (the node's, shared by every
/// partition; a cluster source starts more while it runs).
#[derive(Clone)]
struct PartContext {
    stop_file: PathBuf,
    cfg: crate::listener::ListenerConfig,
    wal: Wal,
    ship_cfg: ShipperConfig,
    peers: Vec<DrainerPeer>,
    shutdown: CancellationToken,
    fatal: Arc<Fatal>,
}

/// Opens the listener of one partition (a cluster shard's when `route`),
/// starts its shippers and returns the listener's task.
async fn start_listener_part(
    ctx: &PartContext,
    route: Option<Arc<ClusterRoute>>,
    check_not_cluster: bool,
) -> Result<(Arc<ListenerPart>, JoinHandle<()>), NodeError> {
    let shutdown = &ctx.shutdown;
    let fatal = &ctx.fatal;
    let wal = ctx.wal.clone();
    let peers = &ctx.peers;
    let cfg = ctx.cfg.clone();
    let partition = route
        .as_ref()
        .map_or(PartitionId(cfg.partition), |route| route.partition());
    let listener_id = cfg.id.clone();
    let source = redacted(&cfg.source);
    let status = Arc::new(ListenerStatus::new(partition));
    let mut listener = Listener::open_routed(cfg, wal.clone(), status, route).await?;
    if check_not_cluster {
        listener = listener.check_not_cluster();
    }
    let handle = listener.handle();
    let stopped = read_stopped(&ctx.stop_file)?;
    let mut slots = Vec::new();
    for peer in peers {
        let drainer_id = DownstreamId::new(peer.id.clone())
            .map_err(|e| NodeError::Config(format!("drainer id {:?}: {e}", peer.id)))?;
        slots.push(ShipSlot {
            stopped: stopped.contains(&(partition.0, peer.id.clone())),
            target: DrainerTarget {
                drainer_id,
                endpoint: peer.endpoint.clone(),
                listener_id: listener_id.clone(),
                secret: peer.secret.clone(),
                tls: peer.tls_options(),
            },
            running: None,
            status: None,
        });
    }
    let part = Arc::new(ListenerPart {
        listener_id,
        source,
        partition,
        wal,
        provider: Arc::new(ListenerSnapshots {
            handle: handle.clone(),
            shutdown: shutdown.clone(),
        }),
        handle,
        ship_cfg: ctx.ship_cfg.clone(),
        slots: Mutex::new(Vec::new()),
        runtime: tokio::runtime::Handle::current(),
        shutdown: shutdown.clone(),
        fatal: Arc::clone(fatal),
    });
    for slot in slots.iter_mut() {
        if slot.stopped {
            info!(partition = %partition, drainer = %slot.target.drainer_id, "sync is stopped (ferry restart-sync resumes it)");
        } else {
            part.spawn_shipper(slot)?;
        }
    }
    *lock(&part.slots) = slots;
    let fatal = Arc::clone(fatal);
    let listener_shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(error) = listener.run(listener_shutdown).await {
            fatal.raise(format!("listener of partition {partition}: {error}"));
        }
    });
    Ok((part, task))
}

/// Every listener partition of a process: one for a standalone source, one
/// per shard of a cluster source (more appear as shards are added).
pub struct ListenerParts {
    parts: Mutex<Vec<Arc<ListenerPart>>>,
    stop_file: PathBuf,
    /// One stop/restart at a time (they rewrite the stop file).
    control: Mutex<()>,
}

impl ListenerParts {
    fn new(stop_file: PathBuf) -> Arc<ListenerParts> {
        Arc::new(ListenerParts {
            parts: Mutex::new(Vec::new()),
            stop_file,
            control: Mutex::new(()),
        })
    }

    fn add(&self, part: Arc<ListenerPart>) {
        let mut parts = lock(&self.parts);
        parts.push(part);
        parts.sort_by_key(|part| part.partition);
    }

    fn list(&self) -> Vec<Arc<ListenerPart>> {
        lock(&self.parts).clone()
    }

    fn status(&self) -> Vec<ListenerSide> {
        self.list().iter().map(|part| part.status()).collect()
    }

    fn set_stopped(&self, which: &SyncSelector, stop: bool) -> Result<usize, ControlError> {
        let _one = lock(&self.control);
        let parts = self.list();
        let (mut matched, mut changed) = (0, 0);
        let mut outcome = Ok(());
        for part in &parts {
            match part.set_stopped(which, stop) {
                Ok((m, c)) => {
                    matched += m;
                    changed += c;
                }
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            }
        }
        // What changed is saved even when a later partition failed.
        let text: String = parts.iter().map(|part| part.stopped_lines()).collect();
        write_atomically(&self.stop_file, &text).map_err(|error| {
            ControlError::Failed(format!("writing {}: {error}", self.stop_file.display()))
        })?;
        outcome?;
        if matched == 0 {
            return Err(ControlError::NoMatch {
                partition: which.partition,
                drainer_id: which.drainer_id.clone(),
            });
        }
        Ok(changed)
    }

    async fn join_shippers(&self) {
        for part in self.list() {
            part.join_shippers().await;
        }
    }
}

/// How often a cluster source's topology is read while it answers.
const TOPOLOGY_POLL: Duration = Duration::from_secs(2);
/// Longest pause between topology reads while they fail.
const TOPOLOGY_POLL_MAX: Duration = Duration::from_secs(30);
/// The topology poll while slots are on the move (docs/cluster.md, rule 2).
const TOPOLOGY_POLL_MOVING: Duration = Duration::from_millis(200);

/// Starts the listener partitions of the node's source (module doc of
/// [`crate::listener::ClusterSource`] for a cluster); their tasks, and a
/// cluster source's topology follower, go to `stages`.
/// A cluster source's shard map and slot table are in `cluster_dir` (the
/// data dir, or a switched-over generation's dir: `switchover::cluster_dir`).
pub(super) async fn start_listeners(
    data_dir: &Path,
    cluster_dir: &Path,
    cfg: &crate::listener::ListenerConfig,
    wal: Wal,
    ship_cfg: ShipperConfig,
    peers: &[DrainerPeer],
    stages: &mut Stages,
) -> Result<Arc<ListenerParts>, NodeError> {
    let ctx = PartContext {
        stop_file: data_dir.join("stopped-syncs"),
        cfg: cfg.clone(),
        wal,
        ship_cfg,
        peers: peers.to_vec(),
        shutdown: stages.shutdown.clone(),
        fatal: Arc::clone(&stages.fatal),
    };
    let parts = ListenerParts::new(ctx.stop_file.clone());
    let checked = cfg
        .validate()
        .map_err(|e| NodeError::Config(format!("listener.{}: {}", e.field, e.reason)))?;
    let kind = source_kind(cluster_dir, &checked).await;
    let Some(true) = kind else {
        // Standalone, or not known yet (the source does not answer).
        let (part, task) = start_listener_part(&ctx, None, kind.is_none()).await?;
        parts.add(part);
        stages.tasks.push(task);
        return Ok(parts);
    };
    if checked.partition != PartitionId(0) {
        return Err(NodeError::Config(
            "listener.partition: a cluster source gets a partition per shard; leave it at 0"
                .to_string(),
        ));
    }
    let has_map = ClusterSource::has_map(cluster_dir);
    let cluster = ClusterSource::open(checked.seeds.clone(), cluster_dir)
        .map_err(|error| NodeError::Config(error.to_string()))?;
    let holds_log = ctx
        .wal
        .partitions()
        .into_iter()
        .any(|p| matches!(ctx.wal.last_log_id(p), Ok(Some(_))));
    if !has_map && holds_log {
        return Err(NodeError::Config(format!(
            "the source is a Redis Cluster but {} holds the log of a standalone source (no {}); \
             give the cluster sync a new data dir",
            cluster_dir.display(),
            crate::listener::SHARD_MAP_FILE
        )));
    }
    if let Err(error) = cluster.refresh().await {
        warn!(%error, "cannot read the source cluster's topology yet; retrying");
    }
    for route in cluster.take_new() {
        info!(partition = %route.partition(), "starting the listener of a source shard");
        let (part, task) = start_listener_part(&ctx, Some(route), false).await?;
        parts.add(part);
        stages.tasks.push(task);
    }
    stages.tasks.push(tokio::spawn(follow_cluster(
        cluster,
        ctx,
        Arc::clone(&parts),
    )));
    Ok(parts)
}

/// Whether the source is a cluster: `Some(true)` when the data dir holds a
/// shard map or the source is a seed list, else what the first address
/// answers (`cluster_enabled`); `None` when it does not answer.
async fn source_kind(
    data_dir: &Path,
    checked: &crate::listener::CheckedListenerConfig,
) -> Option<bool> {
    if ClusterSource::has_map(data_dir) || checked.seeds.len() > 1 {
        return Some(true);
    }
    match crate::redis::cluster::is_cluster(&checked.source).await {
        Ok(cluster) => Some(cluster),
        Err(error) => {
            warn!(%error, "cannot ask the source whether it runs Redis Cluster; replicating it as a standalone source, which stops before a first full sync if it turns out to be a cluster");
            None
        }
    }
}

/// Reads a cluster source's topology every [`TOPOLOGY_POLL`] (backoff on
/// errors; every [`TOPOLOGY_POLL_MOVING`] while slots move): routes follow
/// moved masters, a new shard gets a partition and a listener, and slots
/// the source handed to another shard get their handoff records. Waits for the listeners it started on shutdown.
async fn follow_cluster(cluster: Arc<ClusterSource>, ctx: PartContext, parts: Arc<ListenerParts>) {
    let mut tasks = Vec::new();
    let mut backoff = Backoff::new(TOPOLOGY_POLL, TOPOLOGY_POLL_MAX);
    let mut last_error: Option<String> = None;
    let mut moving = false;
    loop {
        let delay = if moving && last_error.is_none() {
            TOPOLOGY_POLL_MOVING
        } else {
            backoff.current()
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
            // A migration into a shard: look at once, then fast.
            _ = cluster.receiving_notified() => {}
        }
        match cluster.refresh().await {
            Ok(()) => {
                backoff.reset();
                if last_error.take().is_some() {
                    info!("source cluster topology readable again");
                }
                // Slots on the move: their handoffs are logged soon after
                // the source settles them (docs/cluster.md, rule 2).
                moving = cluster.check_handoffs().await || cluster.slots_on_the_move();
            }
            Err(error) => {
                let message = error.to_string();
                if last_error.as_ref() != Some(&message) {
                    warn!(%error, "cannot read the source cluster's topology; retrying");
                }
                last_error = Some(message);
                backoff.next_delay();
                continue;
            }
        }
        for route in cluster.take_new() {
            info!(partition = %route.partition(), "new source shard: starting its listener");
            match start_listener_part(&ctx, Some(route), false).await {
                Ok((part, task)) => {
                    parts.add(part);
                    tasks.push(task);
                }
                Err(error) => {
                    ctx.fatal.raise(format!(
                        "starting the listener of a new source shard: {error}"
                    ));
                    break;
                }
            }
        }
    }
    for task in tasks {
        let _ = task.await;
    }
}

impl ListenerPart {
    /// Waits for the shippers still running.
    async fn join_shippers(&self) {
        let tasks: Vec<JoinHandle<()>> = lock(&self.slots)
            .iter_mut()
            .filter_map(|slot| slot.running.take().map(|running| running.task))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}

// ---------------------------------------------------------------------------
// Drainer side

/// A partition's applier: its status (kept across a stop and a restart),
/// its task while it runs, and what stops it alone.
struct RunningApplier {
    status: Arc<ApplyStatus>,
    task: Option<JoinHandle<()>>,
    cancel: CancellationToken,
}

type Appliers = BTreeMap<PartitionId, RunningApplier>;

/// Where a drainer part's appliers read: its own WAL, filled by its ship
/// endpoint, or (`ferry sync`) the listener's WAL directly.
enum ApplySource {
    Relayed(DrainerService),
    Direct {
        listeners: Arc<ListenerParts>,
        /// `<data-dir>/stopped-syncs`: with no shipper, `ferry stop-sync`
        /// stops the partition's applier.
        stop_file: PathBuf,
        /// One stop/restart at a time (they rewrite the stop file).
        control: Mutex<()>,
    },
}

/// The drainer's ship endpoint and its appliers, one per partition.
pub struct DrainerPart {
    drainer_id: String,
    target: String,
    wal: Wal,
    source: ApplySource,
    /// The partitions to apply (`ferry site`: the other site's; its WAL
    /// also holds the site's own listener's partitions).
    only: Option<RangeInclusive<u32>>,
    apply_cfg: ApplyConfig,
    appliers: Mutex<Appliers>,
    /// Partitions whose sync is stopped (direct reads only).
    stopped: Mutex<BTreeSet<u32>>,
    shutdown: CancellationToken,
    fatal: Arc<Fatal>,
}

impl DrainerPart {
    /// The partitions to apply, each with the listener's fallback
    /// snapshots when the applier reads the listener's WAL.
    fn partitions(&self) -> Vec<(PartitionId, Option<Arc<dyn SnapshotProvider>>)> {
        match &self.source {
            ApplySource::Relayed(service) => {
                let mut partitions: BTreeSet<PartitionId> =
                    self.wal.partitions().into_iter().collect();
                partitions.extend(service.status().iter().map(|s| s.partition));
                partitions
                    .into_iter()
                    .filter(|p| self.only.as_ref().map_or(true, |only| only.contains(&p.0)))
                    .map(|p| (p, None))
                    .collect()
            }
            ApplySource::Direct { listeners, .. } => listeners
                .list()
                .iter()
                .map(|part| (part.partition, Some(Arc::clone(&part.provider))))
                .collect(),
        }
    }

    /// Starts an applier for every partition that has none yet (and whose
    /// sync is not stopped).
    fn spawn_appliers(&self) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let partitions = self.partitions();
        let stopped = lock(&self.stopped).clone();
        let mut appliers = lock(&self.appliers);
        for (partition, snapshots) in partitions {
            if stopped.contains(&partition.0) {
                appliers.entry(partition).or_insert_with(|| {
                    let cancel = self.shutdown.child_token();
                    cancel.cancel();
                    RunningApplier {
                        status: Arc::new(ApplyStatus::new(partition)),
                        task: None,
                        cancel,
                    }
                });
                continue;
            }
            let earlier = match appliers.get_mut(&partition) {
                Some(applier) if !applier.cancel.is_cancelled() => continue,
                // Stopped, now restarted: the new one starts once the
                // stopped one ended.
                Some(applier) => applier.task.take(),
                None => None,
            };
            let status = appliers
                .get(&partition)
                .map(|a| Arc::clone(&a.status))
                .unwrap_or_else(|| Arc::new(ApplyStatus::new(partition)));
            let cancel = self.shutdown.child_token();
            let task = self.spawn_applier(
                partition,
                snapshots,
                Arc::clone(&status),
                cancel.clone(),
                earlier,
            );
            info!(partition = %partition, target = %self.target, "applier started");
            appliers.insert(
                partition,
                RunningApplier {
                    status,
                    task: Some(task),
                    cancel,
                },
            );
        }
    }

    fn spawn_applier(
        &self,
        partition: PartitionId,
        snapshots: Option<Arc<dyn SnapshotProvider>>,
        status: Arc<ApplyStatus>,
        cancel: CancellationToken,
        earlier: Option<JoinHandle<()>>,
    ) -> JoinHandle<()> {
        let cfg = ApplyConfig {
            partition: partition.0,
            ..self.apply_cfg.clone()
        };
        let fatal = Arc::clone(&self.fatal);
        let wal = self.wal.clone();
        let applier = async move {
            if let Some(earlier) = earlier {
                let _ = earlier.await;
            }
            match snapshots {
                Some(snapshots) => {
                    // A shipper of the relayed path (`apply-from` changed)
                    // no longer holds back the listener's retention.
                    let shipped = DownstreamId::new(cfg.drainer_id.clone())
                        .map_err(|e| NodeError::Config(format!("id {:?}: {e}", cfg.drainer_id)));
                    match shipped {
                        Ok(shipped) => match wal.unregister_downstream(partition, shipped).await {
                            Ok(()) => apply::run_direct(cfg, wal, status, cancel, snapshots)
                                .await
                                .map_err(NodeError::from),
                            Err(error) => Err(NodeError::from(apply::ApplyError::from(error))),
                        },
                        Err(error) => Err(error),
                    }
                }
                None => apply::run(cfg, wal, status, cancel)
                    .await
                    .map_err(NodeError::from),
            }
        };
        // Its own task, so that a panic is seen here and stops the node.
        let task = tokio::spawn(applier);
        tokio::spawn(async move {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => fatal.raise(format!("applier of partition {partition}: {error}")),
                Err(error) => fatal.raise(format!(
                    "applier of partition {partition} panicked: {error}"
                )),
            }
        })
    }

    /// `ferry stop-sync` / `restart-sync` when the appliers read the
    /// listener's WAL: stops or restarts the matching partitions' appliers
    /// (their entries stay in the listener's WAL, subject to `wal-ttl`; a
    /// restarted one gets a fallback snapshot for what expired), saved in
    /// the stop file. Returns how many changed.
    fn set_stopped(&self, which: &SyncSelector, stop: bool) -> Result<usize, ControlError> {
        let ApplySource::Direct {
            stop_file, control, ..
        } = &self.source
        else {
            return Err(ControlError::NoListener(if stop {
                "stop"
            } else {
                "restart"
            }));
        };
        let _one = lock(control);
        let no_match = || ControlError::NoMatch {
            partition: which.partition,
            drainer_id: which.drainer_id.clone(),
        };
        if which
            .drainer_id
            .as_deref()
            .is_some_and(|id| id != self.drainer_id)
        {
            return Err(no_match());
        }
        let matched: Vec<PartitionId> = self
            .partitions()
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| which.partition.map_or(true, |w| w == p.0))
            .collect();
        if matched.is_empty() {
            return Err(no_match());
        }
        let mut changed = 0;
        {
            let mut stopped = lock(&self.stopped);
            for partition in &matched {
                let was = stopped.contains(&partition.0);
                if was == stop {
                    continue;
                }
                changed += 1;
                if stop {
                    stopped.insert(partition.0);
                } else {
                    stopped.remove(&partition.0);
                }
            }
            // The file also holds the lines of the other direction's part
            // of a two-way sync (same drainer id, other partitions): kept.
            let own: BTreeSet<u32> = self.partitions().iter().map(|(p, _)| p.0).collect();
            let _file = lock(&STOP_FILE_LOCK);
            let mut lines =
                read_stopped(stop_file).map_err(|error| ControlError::Failed(error.to_string()))?;
            lines.retain(|(p, id)| !(*id == self.drainer_id && own.contains(p)));
            lines.extend(
                stopped
                    .iter()
                    .filter(|p| own.contains(p))
                    .map(|p| (*p, self.drainer_id.clone())),
            );
            let text: String = lines.iter().map(|(p, id)| format!("{p} {id}\n")).collect();
            write_atomically(stop_file, &text).map_err(|error| {
                ControlError::Failed(format!("writing {}: {error}", stop_file.display()))
            })?;
        }
        if stop {
            let mut appliers = lock(&self.appliers);
            for partition in &matched {
                if let Some(applier) = appliers.get_mut(partition) {
                    if !applier.cancel.is_cancelled() {
                        info!(partition = %partition, drainer = %self.drainer_id, "sync stopped");
                    }
                    // It finishes the batch in flight and ends (a fatal
                    // error is raised by it); a restart waits for that.
                    applier.cancel.cancel();
                }
            }
        } else {
            for partition in &matched {
                info!(partition = %partition, drainer = %self.drainer_id, "sync restarted");
            }
            self.spawn_appliers();
        }
        Ok(changed)
    }

    async fn supervise(self: Arc<Self>) {
        loop {
            self.spawn_appliers();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    async fn join_appliers(&self) {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.appliers))
            .into_values()
            .filter_map(|applier| applier.task)
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    fn status(&self) -> Vec<DrainerSide> {
        let streams: BTreeMap<PartitionId, (Option<String>, Option<String>)> = match &self.source {
            ApplySource::Relayed(service) => service
                .status()
                .into_iter()
                .map(|s| {
                    (
                        s.partition,
                        (s.connected_listener, recent_refusal(s.refused)),
                    )
                })
                .collect(),
            ApplySource::Direct { .. } => BTreeMap::new(),
        };
        let appliers: Vec<(PartitionId, Arc<ApplyStatus>, bool)> = lock(&self.appliers)
            .iter()
            .map(|(partition, applier)| {
                (
                    *partition,
                    Arc::clone(&applier.status),
                    applier.cancel.is_cancelled() && !self.shutdown.is_cancelled(),
                )
            })
            .collect();
        appliers
            .into_iter()
            .map(|(partition, status, stopped)| {
                let report = status
                    .report(&self.wal)
                    .unwrap_or_else(|_| status.snapshot());
                DrainerSide {
                    drainer_id: self.drainer_id.clone(),
                    partition: partition.0,
                    target: self.target.clone(),
                    state: match stopped {
                        true => "STOPPED".to_string(),
                        false => report.state.to_string(),
                    },
                    // A listener refused for this partition (it belongs to
                    // another) is shown while it keeps trying.
                    last_error: self
                        .wal
                        .disk_pause()
                        .or(report.last_error)
                        .or_else(|| streams.get(&partition).and_then(|s| s.1.clone())),
                    connected_listener: streams.get(&partition).and_then(|s| s.0.clone()),
                    durable: report.durable.0,
                    applied: report.applied.0,
                    lag: report.lag,
                    latency_ms: report.latency_ms,
                    epoch: report.epoch,
                    commands_applied: report.commands_applied,
                    commands_refused: report.commands_refused,
                    snapshot_load: report.snapshot_load.map(|load| SnapshotLoad {
                        epoch: load.epoch,
                        rdb_bytes: load.rdb_bytes,
                        bytes_loaded: load.bytes_loaded,
                        keys_loaded: load.keys_loaded,
                        done: load.done,
                    }),
                    blocked: report.blocked.map(|blocked| BlockedEntry {
                        log_id: blocked.log_id.0,
                        command: blocked.command,
                        error: blocked.error,
                        transient: blocked.transient,
                        since_unix_ms: blocked.since_unix_ms,
                    }),
                    entries_skipped: report.entries_skipped,
                    last_skipped: report.last_skipped.map(|id| id.0),
                    dead_letter_file: report.dead_letter_file,
                    fence: report.fence,
                    split_entries: report.split_entries,
                    echoes: report.echoes,
                    fallback_snapshots: report.fallback_snapshots,
                    foreign_writes: report.foreign_writes,
                    foreign_windows: report.foreign_windows,
                    foreign_samples: report.foreign_samples,
                    cluster: report.cluster,
                    handoff: report.handoff.map(|wait| wait.to_string()),
                    voided: report.voided.map(|voided| voided.to_string()),
                    last_refused: report.last_refused.map(|refused| RefusedCommand {
                        log_id: refused.log_id.0,
                        command: refused.command,
                        error: refused.error,
                    }),
                    reconnects: report.reconnects,
                }
            })
            .collect()
    }

    /// `ferry skip`: asks the partition's applier to skip the entry it is
    /// blocked on, then waits up to [`crate::admin::SKIP_WAIT`] for it to
    /// have done so. Blocking.
    fn skip(&self, request: &SkipRequest) -> Result<SkipOutcome, ControlError> {
        let partition = PartitionId(request.partition);
        let no_applier = || ControlError::NoApplier {
            partition: request.partition,
            drainer_id: request.drainer_id.clone(),
        };
        if request
            .drainer_id
            .as_ref()
            .is_some_and(|id| *id != self.drainer_id)
        {
            return Err(no_applier());
        }
        let status = lock(&self.appliers)
            .get(&partition)
            .filter(|applier| !applier.cancel.is_cancelled())
            .map(|applier| Arc::clone(&applier.status))
            .ok_or_else(no_applier)?;
        let log_id = LogId(request.log_id);
        let dead_letter_file = status
            .request_skip(log_id)
            .map_err(|refused| ControlError::Refused(refused.to_string()))?;
        info!(partition = %partition, log_id = %log_id, "skip requested");
        let deadline = std::time::Instant::now() + crate::admin::SKIP_WAIT;
        let done = loop {
            let report = status.snapshot();
            if report.last_skipped.is_some_and(|id| id >= log_id) || report.applied >= log_id {
                break true;
            }
            if std::time::Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(SkipOutcome {
            dead_letter_file,
            done,
        })
    }
}

/// How long a refused `Hello` stays in the status: a refused listener
/// retries at least this often (its backoff tops out at `reconnect-max`,
/// 10 s by default).
const REFUSAL_SHOWN_MS: u64 = 60_000;

fn recent_refusal(refused: Option<(u64, String)>) -> Option<String> {
    refused
        .filter(|(at, _)| now_unix_ms().saturating_sub(*at) <= REFUSAL_SHOWN_MS)
        .map(|(_, error)| error)
}

/// Starts the ship endpoint on `socket` and the applier supervisor.
pub(super) fn start_drainer_part(
    socket: tokio::net::TcpListener,
    tls: Option<ServerTls>,
    service_cfg: DrainerServiceConfig,
    wal: Wal,
    apply_cfg: ApplyConfig,
    only: Option<RangeInclusive<u32>>,
    stages: &mut Stages,
) -> Result<Arc<DrainerPart>, NodeError> {
    let shutdown = &stages.shutdown;
    let fatal = &stages.fatal;
    let service = DrainerService::new(wal.clone(), service_cfg)?;
    let part = Arc::new(DrainerPart {
        drainer_id: apply_cfg.drainer_id.clone(),
        target: redacted(&apply_cfg.target),
        wal,
        source: ApplySource::Relayed(service.clone()),
        only,
        apply_cfg,
        appliers: Mutex::new(BTreeMap::new()),
        stopped: Mutex::new(BTreeSet::new()),
        shutdown: shutdown.clone(),
        fatal: Arc::clone(fatal),
    });
    let serve_fatal = Arc::clone(fatal);
    let serve_shutdown = shutdown.clone();
    stages.tasks.push(tokio::spawn(async move {
        if let Err(error) = ship::serve_drainer(socket, service, tls, serve_shutdown).await {
            serve_fatal.raise(format!("ship endpoint: {error}"));
        }
    }));
    part.spawn_appliers();
    stages
        .tasks
        .push(tokio::spawn(Arc::clone(&part).supervise()));
    Ok(part)
}

/// Starts the appliers of `ferry sync` on the listener's WAL (one per
/// listener partition, more as a cluster source's shards appear), under a
/// supervisor; the partitions listed in `<data-dir>/stopped-syncs` wait for
/// `ferry restart-sync`.
fn start_direct_part(
    data_dir: &Path,
    listeners: Arc<ListenerParts>,
    wal: Wal,
    apply_cfg: ApplyConfig,
    stages: &mut Stages,
) -> Result<Arc<DrainerPart>, NodeError> {
    let stop_file = data_dir.join("stopped-syncs");
    let stopped = read_stopped(&stop_file)?
        .into_iter()
        .filter(|(_, id)| *id == apply_cfg.drainer_id)
        .map(|(partition, _)| partition)
        .collect::<BTreeSet<u32>>();
    for partition in &stopped {
        info!(partition, drainer = %apply_cfg.drainer_id, "sync is stopped (ferry restart-sync resumes it)");
    }
    let part = Arc::new(DrainerPart {
        drainer_id: apply_cfg.drainer_id.clone(),
        target: redacted(&apply_cfg.target),
        wal,
        only: None,
        source: ApplySource::Direct {
            listeners,
            stop_file,
            control: Mutex::new(()),
        },
        apply_cfg,
        appliers: Mutex::new(BTreeMap::new()),
        stopped: Mutex::new(stopped),
        shutdown: stages.shutdown.clone(),
        fatal: Arc::clone(&stages.fatal),
    });
    part.spawn_appliers();
    stages
        .tasks
        .push(tokio::spawn(Arc::clone(&part).supervise()));
    Ok(part)
}

// ---------------------------------------------------------------------------
// The node

/// A running process: what the admin API reads and controls. A two-way
/// `ferry sync` has two of each part, one per direction.
pub struct Node {
    pub(super) role: &'static str,
    pub(super) listeners: Vec<Arc<ListenerParts>>,
    pub(super) drainers: Vec<Arc<DrainerPart>>,
    /// A two-way sync, established: its conflict detector's counts.
    pub(super) conflicts: Option<Arc<conflicts::ConflictStats>>,
    /// The WALs the parts write, named by side (`listener`, `drainer`).
    pub(super) wals: Vec<(&'static str, Wal)>,
}

impl Node {
    /// Stops or restarts syncs: the shippers, or (`ferry sync` reading the
    /// listener's WAL, which has none) the appliers.
    fn set_stopped(&self, which: &SyncSelector, stop: bool) -> Result<usize, ControlError> {
        let direct: Vec<&Arc<DrainerPart>> = self
            .drainers
            .iter()
            .filter(|part| matches!(part.source, ApplySource::Direct { .. }))
            .collect();
        if !direct.is_empty() {
            let mut changed = None;
            for part in direct {
                match part.set_stopped(which, stop) {
                    Ok(count) => *changed.get_or_insert(0) += count,
                    Err(ControlError::NoMatch { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
            return changed.ok_or_else(|| ControlError::NoMatch {
                partition: which.partition,
                drainer_id: which.drainer_id.clone(),
            });
        }
        match self.listeners.first() {
            Some(part) => part.set_stopped(which, stop),
            None => Err(ControlError::NoListener(if stop {
                "stop"
            } else {
                "restart"
            })),
        }
    }
}

impl NodeControl for Node {
    fn status(&self) -> NodeStatus {
        NodeStatus {
            role: self.role.to_string(),
            taken_unix_ms: now_unix_ms(),
            listeners: self
                .listeners
                .iter()
                .flat_map(|part| part.status())
                .collect(),
            drainers: self
                .drainers
                .iter()
                .flat_map(|part| part.status())
                .collect(),
            two_way: self.conflicts.as_ref().map(|stats| stats.snapshot()),
            wals: self
                .wals
                .iter()
                .map(|(side, wal)| wal.metrics().reading(side))
                .collect(),
        }
    }

    fn stop_sync(&self, which: &SyncSelector) -> Result<usize, ControlError> {
        self.set_stopped(which, true)
    }

    fn restart_sync(&self, which: &SyncSelector) -> Result<usize, ControlError> {
        self.set_stopped(which, false)
    }

    fn skip(&self, request: &SkipRequest) -> Result<SkipOutcome, ControlError> {
        let mut last = ControlError::NoDrainer;
        for part in &self.drainers {
            match part.skip(request) {
                Err(error @ ControlError::NoApplier { .. }) => last = error,
                done => return done,
            }
        }
        Err(last)
    }
}

/// Binds the admin API and writes `<data-dir>/admin.addr` and
/// `<data-dir>/admin.url`.
pub(super) async fn start_admin(
    data_dir: &Path,
    addr: &str,
    access: &AdminAccess,
    node: Arc<dyn NodeControl>,
    stages: &mut Stages,
) -> Result<(), NodeError> {
    let socket = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(io(format!("binding the admin API on {addr}")))?;
    let bound = socket
        .local_addr()
        .map_err(io("reading the admin API address"))?;
    crate::admin::write_addr_file(data_dir, bound)
        .and_then(|()| {
            crate::admin::write_url_file(
                data_dir,
                crate::admin::URL_FILE_NAME,
                access.scheme(),
                bound,
            )
        })
        .map_err(io(format!(
            "writing {}",
            data_dir.join("admin.addr").display()
        )))?;
    info!(
        admin = %bound,
        tls = access.tls_cert_file.is_some(),
        token = access.token.is_some(),
        "admin API listening"
    );
    let fatal = Arc::clone(&stages.fatal);
    let shutdown = stages.shutdown.clone();
    let access = access.clone();
    stages.tasks.push(tokio::spawn(async move {
        if let Err(error) = crate::admin::serve_admin(socket, node, access, shutdown).await {
            fatal.raise(format!("admin API: {error}"));
        }
    }));
    Ok(())
}

/// Waits for the stop signal, then for every task, then closes the WALs.
pub(super) async fn finish(
    stages: Stages,
    node: Arc<Node>,
    wals: Vec<Wal>,
) -> Result<(), NodeError> {
    let Stages {
        shutdown,
        fatal,
        tasks,
    } = stages;
    shutdown.cancelled().await;
    info!("shutting down");
    for part in &node.listeners {
        part.join_shippers().await;
    }
    for part in &node.drainers {
        part.join_appliers().await;
    }
    for task in tasks {
        if let Err(error) = task.await {
            warn!(%error, "a task ended abnormally");
        }
    }
    drop(node);
    for wal in wals {
        if let Err(error) = wal.close().await {
            warn!(%error, "closing a WAL");
        }
    }
    match fatal.take() {
        Some(error) => Err(NodeError::Fatal(error)),
        None => Ok(()),
    }
}

/// The outage of the listener (or of its link to the source) the startup
/// precheck checks the source's backlog against.
pub(super) const PRECHECK_OUTAGE: Duration = Duration::from_secs(60);

/// What the precheck before a first full sync checks: the source's and the
/// target's addresses (with their passwords), the keyspace the sync owns.
fn precheck_config(
    source: Option<&crate::listener::ListenerConfig>,
    apply: Option<&apply::ApplyConfig>,
    outage: Duration,
) -> Result<crate::precheck::PrecheckConfig, NodeError> {
    let parse = |listener: &crate::listener::ListenerConfig| {
        listener
            .validate()
            .map(|checked| checked.seeds)
            .map_err(|e| NodeError::Config(format!("listener.{}: {}", e.field, e.reason)))
    };
    let source = source.map(parse).transpose()?.unwrap_or_default();
    let config = |error: apply::ApplyConfigError| NodeError::Config(error.to_string());
    let target = apply
        .map(|a| a.target_seeds())
        .transpose()
        .map_err(config)?
        .unwrap_or_default();
    let mut cfg = crate::precheck::PrecheckConfig::new(source, target);
    cfg.outage = outage;
    if let Some(apply) = apply {
        cfg.keyspace = apply.keyspace().map_err(config)?;
        cfg.existing_data = apply.existing_data;
        cfg.id = Some(apply.drainer_id.clone());
    }
    Ok(cfg)
}

/// The precheck of a sync that has not started (`ferry serve` shows it
/// before a task starts): every check, the source's write rate sampled for
/// `sample`; a two-way sync is also checked the other way round. Err: the
/// config cannot be checked (a bad URL, a password file missing).
pub async fn sync_precheck(
    cfg: &SyncConfig,
    sample: Duration,
) -> Result<crate::precheck::Report, NodeError> {
    let mut precheck = precheck_config(Some(&cfg.listener), Some(&cfg.apply), PRECHECK_OUTAGE)?;
    precheck.sample = sample;
    let mut report = crate::precheck::run(&precheck).await;
    if cfg.two_way && !report.failed() {
        if let Err(error) = two_way::precheck(cfg).await {
            report.checks.push(crate::precheck::Check {
                check: "two-way".into(),
                verdict: Verdict::Fail,
                detail: error.to_string(),
                nodes: Vec::new(),
            });
        }
    }
    Ok(report)
}

/// The precheck before a node's first full sync (its WAL holds no
/// partition yet): the checks of the sides it has, refusing to start on any
/// FAIL with the report's table. A side that does not answer yet (a server,
/// or a master of a cluster) or a cluster that does not serve every slot
/// yet is not a refusal: the stages wait for it as they always do (and the
/// applier still refuses existing data atomically at the first load, on
/// every master); the checks of what does not answer are skipped with a
/// warning. A node resuming (its WAL holds data) is not checked again.
pub(super) async fn precheck_first_sync(
    wal: &Wal,
    source: Option<&crate::listener::ListenerConfig>,
    apply: Option<&apply::ApplyConfig>,
    outage: Duration,
) -> Result<(), NodeError> {
    if !wal.partitions().is_empty() {
        return Ok(());
    }
    // The source's addresses with the password (from the URL, a file or a
    // variable): one, or a cluster's seed list; every master of a cluster
    // is checked. The target's the same way.
    let mut cfg = precheck_config(source, apply, outage)?;
    // The write rate is measured beside the full sync (its checks only warn),
    // so that the sync does not wait for the sample.
    cfg.sample = Duration::ZERO;
    let report = crate::precheck::run(&cfg).await;
    let waits = |check: &str| check.ends_with(" reachable") || check.ends_with(" cluster slots");
    let unreachable: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail && waits(&c.check))
        .map(|c| c.detail.as_str())
        .collect();
    let refused = report
        .checks
        .iter()
        .any(|c| c.verdict == Verdict::Fail && !waits(&c.check));
    if refused {
        let table = report.render();
        error!("precheck before the first full sync failed:\n{table}");
        return Err(NodeError::Precheck(table));
    }
    for check in report.checks.iter().filter(|c| c.verdict == Verdict::Warn) {
        warn!(check = %check.check, detail = %check.detail, "precheck warning");
    }
    if !cfg.source.is_empty() {
        // Enough to see a busy source; the sync starts meanwhile.
        cfg.sample = Duration::from_millis(500);
        tokio::spawn(async move {
            let report = crate::precheck::source_rate(&cfg).await;
            let rate = |c: &&crate::precheck::Check| {
                c.verdict == Verdict::Warn
                    && matches!(
                        c.check.as_str(),
                        "source write rate" | "source backlog" | "source replica output buffer"
                    )
            };
            for check in report.checks.iter().filter(rate) {
                warn!(check = %check.check, detail = %check.detail, "precheck warning");
            }
        });
    }
    if unreachable.is_empty() {
        info!(
            verdict = report.verdict().as_str(),
            "precheck before the first full sync passed"
        );
    } else {
        warn!(
            unreachable = ?unreachable,
            "precheck could not reach every server (or a cluster does not serve every slot); \
             the checks of a server that does not answer are skipped, and the stages wait for it"
        );
    }
    Ok(())
}

/// Creates the data dir (mode 0700: it holds the WALs, i.e. the replicated
/// data); an existing one keeps its mode.
pub(super) fn create_data_dir(data_dir: &Path) -> Result<(), NodeError> {
    crate::secret::create_private_dir(data_dir)
        .map_err(io(format!("creating {}", data_dir.display())))
}

/// `ferry listener`: runs until `shutdown` is cancelled.
pub async fn run_listener(
    cfg: ListenerNodeConfig,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    create_data_dir(&cfg.data_dir)?;
    let mut stages = Stages::new(shutdown);
    let wal = open_wal(cfg.wal.clone()).await?;
    precheck_first_sync(&wal, Some(&cfg.listener), None, PRECHECK_OUTAGE).await?;
    let listener = start_listeners(
        &cfg.data_dir,
        &cfg.data_dir,
        &cfg.listener,
        wal.clone(),
        cfg.ship.clone(),
        &cfg.drainers,
        &mut stages,
    )
    .await?;
    let node = Arc::new(Node {
        role: "listener",
        listeners: vec![listener],
        drainers: Vec::new(),
        conflicts: None,
        wals: vec![("listener", wal.clone())],
    });
    start_admin(
        &cfg.data_dir,
        &cfg.admin,
        &cfg.admin_access,
        node.clone(),
        &mut stages,
    )
    .await?;
    finish(stages, node, vec![wal]).await
}

/// `ferry drainer`: runs until `shutdown` is cancelled.
pub async fn run_drainer(
    cfg: DrainerNodeConfig,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    create_data_dir(&cfg.data_dir)?;
    let mut stages = Stages::new(shutdown);
    let wal = open_wal(cfg.wal.clone()).await?;
    precheck_first_sync(&wal, None, Some(&cfg.apply), PRECHECK_OUTAGE).await?;
    let tls = cfg
        .drainer
        .tls
        .as_ref()
        .map(ServerTls::new)
        .transpose()
        .map_err(|e| NodeError::Config(format!("drainer.tls.{e}")))?;
    let socket = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(io(format!("binding the ship endpoint on {}", cfg.listen)))?;
    info!(listen = %cfg.listen, tls = tls.is_some(), mutual_tls = cfg.drainer.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()), "ship endpoint listening");
    let drainer = start_drainer_part(
        socket,
        tls,
        cfg.drainer.clone(),
        wal.clone(),
        cfg.apply.clone(),
        None,
        &mut stages,
    )?;
    let node = Arc::new(Node {
        role: "drainer",
        listeners: Vec::new(),
        drainers: vec![drainer],
        conflicts: None,
        wals: vec![("drainer", wal.clone())],
    });
    start_admin(
        &cfg.data_dir,
        &cfg.admin,
        &cfg.admin_access,
        node.clone(),
        &mut stages,
    )
    .await?;
    finish(stages, node, vec![wal]).await
}

/// A secret for the in-process listener → drainer stream of `ferry sync`
/// (fresh per run: both ends restart together).
fn random_secret() -> Secret {
    let state = std::collections::hash_map::RandomState::new();
    (0..2u64)
        .map(|round| {
            let mut hasher = state.build_hasher();
            hasher.write_u64(round);
            hasher.write_u128(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            hasher.write_u32(std::process::id());
            format!("{:016x}", hasher.finish())
        })
        .collect::<String>()
        .into()
}

/// `ferry sync`: a listener and its appliers in one process. The appliers
/// read the listener's WAL ([`apply::run_direct`]); a data dir that holds a
/// drainer WAL from an earlier ferry (or `apply-from = "drainer-wal"`)
/// keeps the relayed path: the stream over gRPC on 127.0.0.1 into a second
/// WAL, as between a `ferry listener` and a `ferry drainer`.
pub async fn run_sync(cfg: SyncConfig, shutdown: CancellationToken) -> Result<(), NodeError> {
    run_sync_hosted(cfg, shutdown, ControlSlot::default()).await
}

/// Where a sync run in-process (`ferry serve`'s tasks) publishes what
/// answers its admin API: set once the stages are up, cleared when the
/// run ends.
#[derive(Clone, Default)]
pub struct ControlSlot(Arc<Mutex<Option<Arc<dyn NodeControl>>>>);

impl ControlSlot {
    pub fn get(&self) -> Option<Arc<dyn NodeControl>> {
        lock(&self.0).clone()
    }

    fn set(&self, control: Option<Arc<dyn NodeControl>>) {
        *lock(&self.0) = control;
    }
}

/// [`run_sync`], publishing its control in `slot` (also served on the
/// admin address, as `ferry sync` does).
pub async fn run_sync_hosted(
    cfg: SyncConfig,
    shutdown: CancellationToken,
    slot: ControlSlot,
) -> Result<(), NodeError> {
    let result = run_sync_inner(cfg, shutdown, &slot).await;
    slot.set(None);
    result
}

async fn run_sync_inner(
    cfg: SyncConfig,
    shutdown: CancellationToken,
    slot: &ControlSlot,
) -> Result<(), NodeError> {
    create_data_dir(&cfg.data_dir)?;
    let (cfg, record) = switchover::lay_record(cfg)?;
    let mut stages = Stages::new(shutdown.clone());
    let listener_wal = open_wal(cfg.listener_wal.clone()).await?;
    precheck_first_sync(
        &listener_wal,
        Some(&cfg.listener),
        Some(&cfg.apply),
        PRECHECK_OUTAGE,
    )
    .await?;
    let relayed = match cfg.apply_from {
        ApplyFrom::ListenerWal => false,
        ApplyFrom::DrainerWal => true,
        ApplyFrom::Auto => cfg.drainer_wal.dir.exists(),
    };
    if !relayed && cfg.drainer_wal.dir.exists() {
        // Switched by `apply-from = "listener-wal"`: the old drainer WAL is
        // set aside, so that `auto` does not go back to it (its log would
        // no longer match the target's checkpoint).
        let aside = cfg
            .data_dir
            .join(format!("drainer.unused-{}", now_unix_ms()));
        std::fs::rename(&cfg.drainer_wal.dir, &aside).map_err(io(format!(
            "moving {} to {}",
            cfg.drainer_wal.dir.display(),
            aside.display()
        )))?;
        warn!(
            from = %cfg.drainer_wal.dir.display(),
            to = %aside.display(),
            "apply-from = \"listener-wal\": the drainer WAL of the relayed path is no longer used and was moved aside (delete it once the target has loaded its snapshot)"
        );
    }
    if cfg.two_way && listener_wal.partitions().is_empty() {
        two_way::precheck(&cfg).await?;
    }
    if cfg.two_way
        && !relayed
        && two_way::settle_pair(&cfg, &listener_wal, &shutdown)
            .await?
            .is_none()
    {
        let _ = listener_wal.close().await;
        return Ok(());
    }
    if !relayed {
        return run_direct(cfg, shutdown, listener_wal, record, slot).await;
    }
    if cfg.two_way {
        return Err(NodeError::Config(format!(
            "two-way sync applies from the listener's WAL; this data dir holds a drainer WAL ({}) \
             for the relayed path: give two-way sync a new data dir",
            cfg.drainer_wal.dir.display()
        )));
    }
    if record.is_some() {
        return Err(NodeError::Config(format!(
            "{} says this data dir was switched over, which only a sync applying from the \
             listener's WAL does; it holds a drainer WAL ({}) for the relayed path",
            cfg.data_dir.join(switchover::RECORD_FILE).display(),
            cfg.drainer_wal.dir.display()
        )));
    }
    if cfg.apply_from == ApplyFrom::Auto {
        info!(dir = %cfg.drainer_wal.dir.display(), "this data dir holds a drainer WAL from an earlier ferry: keeping the relayed path (listener WAL -> drainer WAL); set apply-from = \"listener-wal\" to apply from the listener's WAL (one full sync)");
    }
    let drainer_wal = open_wal(cfg.drainer_wal.clone()).await?;
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("binding the internal ship endpoint"))?;
    let endpoint = format!(
        "http://{}",
        socket
            .local_addr()
            .map_err(io("reading the ship endpoint address"))?
    );
    let secret = random_secret();
    // Loopback, within one process: no TLS.
    let drainer = start_drainer_part(
        socket,
        None,
        DrainerServiceConfig {
            listeners: vec![AllowedListener::new(cfg.id.clone(), secret.clone())],
            ..DrainerServiceConfig::default()
        },
        drainer_wal.clone(),
        cfg.apply.clone(),
        None,
        &mut stages,
    )?;
    let listener = start_listeners(
        &cfg.data_dir,
        &cfg.data_dir,
        &cfg.listener,
        listener_wal.clone(),
        cfg.ship.clone(),
        &[DrainerPeer {
            id: cfg.id.clone(),
            endpoint,
            secret,
            secret_file: None,
            secret_env: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_server_name: None,
        }],
        &mut stages,
    )
    .await?;
    let node = Arc::new(Node {
        role: "sync",
        listeners: vec![listener],
        drainers: vec![drainer],
        conflicts: None,
        wals: vec![
            ("listener", listener_wal.clone()),
            ("drainer", drainer_wal.clone()),
        ],
    });
    start_admin(
        &cfg.data_dir,
        &cfg.admin,
        &cfg.admin_access,
        node.clone(),
        &mut stages,
    )
    .await?;
    slot.set(Some(node.clone()));
    info!(source = %redacted(&cfg.listener.source), target = %redacted(&cfg.apply.target), apply_from = "drainer-wal", "sync running");
    finish(stages, node, vec![listener_wal, drainer_wal]).await
}

/// The stages of one direction of a `ferry sync` that applies from the
/// listener's WAL.
async fn start_direct_stages(
    cfg: &SyncConfig,
    wal: Wal,
    stages: &mut Stages,
) -> Result<Arc<Node>, NodeError> {
    let listener = start_listeners(
        &cfg.data_dir,
        &switchover::cluster_dir(cfg),
        &cfg.listener,
        wal.clone(),
        cfg.ship.clone(),
        &[],
        stages,
    )
    .await?;
    let pair = match cfg.two_way {
        true => Some(two_way::pair(cfg, &wal).await?),
        false => None,
    };
    let established = match pair {
        Some(pair) => two_way::established(cfg, &wal, pair)?,
        None => false,
    };
    let forward = match pair {
        Some(pair) => two_way::forward_apply(cfg, established, pair),
        None => cfg.apply.clone(),
    };
    let drainer = start_direct_part(
        &cfg.data_dir,
        Arc::clone(&listener),
        wal.clone(),
        forward,
        stages,
    )?;
    let mut node = Node {
        role: "sync",
        listeners: vec![listener],
        drainers: vec![drainer],
        conflicts: None,
        wals: vec![("listener", wal.clone())],
    };
    if let Some(pair) = pair.filter(|_| established) {
        let listener = start_listeners(
            &cfg.data_dir,
            &two_way::backward_cluster_dir(cfg, pair),
            &two_way::backward_listener(cfg, pair),
            wal.clone(),
            cfg.ship.clone(),
            &[],
            stages,
        )
        .await?;
        let wal_for_conflicts = wal.clone();
        let drainer = start_direct_part(
            &cfg.data_dir,
            Arc::clone(&listener),
            wal,
            two_way::backward_apply(cfg, pair),
            stages,
        )?;
        node.listeners.push(listener);
        node.drainers.push(drainer);
        let stats = Arc::new(conflicts::ConflictStats::default());
        stages.tasks.push(tokio::spawn(conflicts::run(
            wal_for_conflicts,
            cfg.data_dir.clone(),
            [cfg.apply.drainer_id.clone(), cfg.apply.drainer_id.clone()],
            cfg.apply
                .keyspace()
                .map_err(|error| NodeError::Config(error.to_string()))?,
            Arc::clone(&stats),
            stages.shutdown.clone(),
            two_way::resolution(cfg, pair),
            pair,
        )));
        node.conflicts = Some(stats);
    }
    Ok(Arc::new(node))
}

/// A switchover asked through the admin API.
struct SwitchRequest {
    timeout: Duration,
    reply: tokio::sync::oneshot::Sender<SwitchoverReport>,
}

/// `ferry sync` as the admin API sees it: the node of the direction that
/// runs (none while a switchover stops one and starts the other) and the
/// way to ask for a switchover, which the run loop carries out
/// ([`run_direct`]), one at a time.
struct SyncHost {
    node: Mutex<Option<Arc<Node>>>,
    requests: tokio::sync::mpsc::Sender<SwitchRequest>,
    switching: std::sync::atomic::AtomicBool,
}

impl SyncHost {
    fn current(&self) -> Result<Arc<Node>, ControlError> {
        lock(&self.node).clone().ok_or_else(|| {
            ControlError::Refused(
                "a switchover is stopping one direction and starting the other; try again in a \
                 moment"
                    .into(),
            )
        })
    }

    fn set(&self, node: Option<Arc<Node>>) {
        *lock(&self.node) = node;
    }

    fn reply(
        &self,
        reply: tokio::sync::oneshot::Sender<SwitchoverReport>,
        report: SwitchoverReport,
    ) {
        self.switching
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // The caller may have gone; the switchover is done either way.
        let _ = reply.send(report);
    }
}

impl NodeControl for SyncHost {
    fn status(&self) -> NodeStatus {
        match lock(&self.node).clone() {
            Some(node) => node.status(),
            None => NodeStatus {
                role: "sync".into(),
                taken_unix_ms: now_unix_ms(),
                ..NodeStatus::default()
            },
        }
    }

    fn stop_sync(&self, which: &SyncSelector) -> Result<usize, ControlError> {
        self.current()?.stop_sync(which)
    }

    fn restart_sync(&self, which: &SyncSelector) -> Result<usize, ControlError> {
        self.current()?.restart_sync(which)
    }

    fn skip(&self, request: &SkipRequest) -> Result<SkipOutcome, ControlError> {
        self.current()?.skip(request)
    }

    fn switchover(
        &self,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<SwitchoverReport, ControlError>> {
        let requests = self.requests.clone();
        let busy = self
            .switching
            .swap(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if busy {
                return Err(ControlError::Refused(
                    "a switchover is already running".into(),
                ));
            }
            let (reply, answer) = tokio::sync::oneshot::channel();
            requests
                .send(SwitchRequest { timeout, reply })
                .await
                .map_err(|_| ControlError::Failed("the sync is shutting down".into()))?;
            answer.await.map_err(|_| {
                ControlError::Failed("the sync stopped before the switchover ended".into())
            })
        })
    }
}

/// `ferry sync` applying from the listener's WAL: one direction's stages
/// at a time, which a switchover ([`switchover`]) stops, reverses and
/// starts again while the admin API keeps serving.
async fn run_direct(
    mut cfg: SyncConfig,
    shutdown: CancellationToken,
    mut wal: Wal,
    mut record: Option<switchover::DirectionRecord>,
    slot: &ControlSlot,
) -> Result<(), NodeError> {
    let (requests, mut asked) = tokio::sync::mpsc::channel(1);
    let host = Arc::new(SyncHost {
        node: Mutex::new(None),
        requests,
        switching: std::sync::atomic::AtomicBool::new(false),
    });
    let control: Arc<dyn NodeControl> = host.clone();
    slot.set(Some(control.clone()));
    let mut admin = Stages::new(shutdown.clone());
    start_admin(
        &cfg.data_dir,
        &cfg.admin,
        &cfg.admin_access,
        control.clone(),
        &mut admin,
    )
    .await?;
    let mut pending: Option<(
        switchover::Committed,
        tokio::sync::oneshot::Sender<SwitchoverReport>,
    )> = None;
    if let Some(record) = record.as_mut().filter(|r| !r.released) {
        switchover::release_after_restart(&cfg, record).await;
    }
    switchover::unpause_after_restart(&cfg, record.as_ref()).await;
    let result = loop {
        let direction = shutdown.child_token();
        let mut stages = Stages::new(direction.clone());
        let starting = std::time::Instant::now();
        let node = match start_direct_stages(&cfg, wal.clone(), &mut stages).await {
            Ok(node) => node,
            Err(error) => {
                if let Some((committed, reply)) = pending.take() {
                    let report = committed.finish(starting, Some(error.to_string()));
                    host.reply(reply, report);
                }
                direction.cancel();
                for task in stages.tasks {
                    let _ = task.await;
                }
                let _ = wal.close().await;
                break Err(error);
            }
        };
        host.set(Some(Arc::clone(&node)));
        info!(source = %redacted(&cfg.listener.source), target = %redacted(&cfg.apply.target), apply_from = "listener-wal", "sync running");
        if let Some((committed, reply)) = pending.take() {
            let report = committed.finish(starting, None);
            host.reply(reply, report);
        }
        let ended = finish(stages, node, vec![wal.clone()]);
        tokio::pin!(ended);
        // Two-way, not established yet: the backward direction starts once
        // the first full sync is in the target (`two_way`, module doc).
        let unestablished = match cfg.two_way {
            true => !two_way::established(&cfg, &wal, two_way::pair(&cfg, &wal).await?)?,
            false => false,
        };
        let mut establishing = match unestablished {
            true => Some(Box::pin(two_way::establish(
                cfg.clone(),
                wal.clone(),
                control.clone(),
                direction.clone(),
            ))),
            false => None,
        };
        let switching = loop {
            tokio::select! {
                result = &mut ended => break Err(result),
                done = async { establishing.as_mut().expect("guarded").await }, if establishing.is_some() => {
                    establishing = None;
                    match done {
                        // Stopping: `ended` follows.
                        Ok(()) if direction.is_cancelled() => {}
                        Ok(()) => break Ok(None),
                        Err(why) => {
                            error!(%why, "two-way sync cannot start the target -> source direction");
                            direction.cancel();
                            let _ = (&mut ended).await;
                            break Err(Err(NodeError::Fatal(why)));
                        }
                    }
                }
                Some(request) = asked.recv() => {
                    let drained = switchover::drain(
                        &cfg,
                        record.as_ref(),
                        &control,
                        &direction,
                        request.timeout,
                    )
                    .await;
                    match drained {
                        Ok(drained) => break Ok(Some((drained, request.reply))),
                        Err(report) => host.reply(request.reply, report),
                    }
                }
            }
        };
        let (drained, reply) = match switching {
            Ok(Some(switching)) => switching,
            Ok(None) => {
                // Established: both directions' stages from now on.
                host.set(None);
                direction.cancel();
                if let Err(error) = ended.await {
                    break Err(error);
                }
                if shutdown.is_cancelled() {
                    break Ok(());
                }
                // The last handle: RocksDB's lock goes with it.
                drop(wal);
                wal = reopen_wal(cfg.listener_wal.clone()).await?;
                continue;
            }
            Err(result) => break result,
        };
        let stopping = std::time::Instant::now();
        host.set(None);
        direction.cancel();
        if let Err(error) = ended.await {
            let why = format!("stopping the old direction: {error}");
            host.reply(reply, drained.abandon(why).await);
            break Err(error);
        }
        if shutdown.is_cancelled() {
            let why = "ferry is shutting down".to_string();
            host.reply(reply, drained.abandon(why).await);
            break Ok(());
        }
        // The last handle of the old WAL: RocksDB's lock goes with it
        // (a rollback opens the same dir again).
        drop(wal);
        let old_dir = cfg.listener_wal.dir.clone();
        // A switched-over generation's cluster files (generation 0 keeps
        // them in the data dir, with other files; a standalone source's
        // generation has none).
        let old_cluster_dir =
            Some(switchover::cluster_dir(&cfg)).filter(|dir| *dir != cfg.data_dir && dir.exists());
        match drained.commit(&cfg, stopping).await {
            Ok((next, mut committed)) => {
                cfg = next;
                // Released before the new WAL is opened: the source's
                // writes are paused until then.
                committed.release(&cfg).await;
                record = Some(committed.record.clone());
                pending = Some((committed, reply));
                for dir in std::iter::once(&old_dir).chain(&old_cluster_dir) {
                    if let Err(error) = std::fs::remove_dir_all(dir) {
                        warn!(dir = %dir.display(), %error, "cannot delete the old direction's WAL or cluster files (the next start does)");
                    }
                }
            }
            Err(report) => host.reply(reply, report),
        }
        wal = match reopen_wal(cfg.listener_wal.clone()).await {
            Ok(wal) => wal,
            Err(error) => {
                if let Some((committed, reply)) = pending.take() {
                    let report = committed.finish(starting, Some(error.to_string()));
                    host.reply(reply, report);
                }
                break Err(error);
            }
        };
    };
    host.set(None);
    shutdown.cancel();
    for task in admin.tasks {
        let _ = task.await;
    }
    if let Some(error) = admin.fatal.take() {
        warn!(%error, "admin API");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAL whose old handle is still held for a moment (as by an admin
    /// `status` call on the blocking pool) opens once it is dropped; an
    /// open at once is refused with the lock error it waits out.
    #[tokio::test]
    async fn a_wal_is_opened_again_once_its_last_old_handle_goes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WalConfig::with_dir(dir.path().join("wal"));
        let wal = open_wal(cfg.clone()).await.unwrap();
        let held = wal.clone();
        wal.close().await.unwrap();
        match open_wal(cfg.clone()).await {
            Err(NodeError::WalOpen {
                error: crate::wal::WalError::Rocks(error),
                ..
            }) => assert!(is_lock_held(&error), "{error}"),
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("opened while a handle was held"),
        }
        let dropped = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(held);
        });
        let started = std::time::Instant::now();
        let wal = reopen_wal(cfg).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        dropped.await.unwrap();
        wal.close().await.unwrap();
    }
}
