//! A Redis Cluster source: one listener partition per shard, each following
//! its shard's master through failovers, with a partition id that never
//! changes for a shard.
//!
//! In: the source's seed addresses (any nodes of the cluster) and the
//! listener's data dir. Out: a [`ShardRoute`] per partition, which the
//! [`super::Listener`] of that partition asks where to `PSYNC` (the shard's
//! current master), which slots its snapshot markers cover, and where its
//! heartbeat goes; and the shard map file that makes partition ids stable.
//!
//! # Shards and partitions
//!
//! A shard is a master, the slots it serves and its replicas. It is known by
//! the node ids of those nodes, not by an address or a slot range: a
//! promoted replica is the same shard (its partition goes on with a partial
//! resync, `+CONTINUE`), and so is a shard whose slots moved. The map from
//! partitions to node ids is kept in `<data-dir>/cluster-shards`, one line
//! `<partition> <node-id>...` per partition, replaced atomically (written
//! to a temporary file, fsynced, renamed, the dir fsynced) before any
//! partition it names is started, so a crash never leaves a partition the
//! map does not name, and a restart finds every shard under the id it had.
//!
//! Matching a topology against the map ([`ShardMap::assign`]): every master
//! (with or without slots) takes the partition whose ids hold the master's
//! id, else one holding a replica's id; the partition's ids then grow by the
//! shard's current nodes, and those nodes leave any other partition's ids
//! (a node belongs to one shard at a time). A master with slots that
//! matches no partition is a new shard: it gets the next unused id. A
//! partition whose master serves no slot any more, or whose nodes all left
//! the cluster, keeps its id and stays, idle (shown so in `ferry status`).
//!
//! # Following the topology
//!
//! [`ClusterSource::refresh`] reads `CLUSTER NODES` from the first node that
//! answers with every slot served (every node ever seen, then the seeds),
//! and updates every route; the node polls it every few seconds (backoff on
//! errors) to pick up new shards and moved masters. A listener whose link
//! failed asks [`ShardRoute::locate`] to rediscover first, so a failover is
//! followed as soon as the cluster has promoted a replica; a route whose
//! master changes under a live session ends that session
//! ([`ShardRoute::moved_from`]), so a demoted master is left for the new
//! one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tracing::{debug, info};

use super::slots::{SlotTable, SlotTableError, SLOT_TABLE_FILE};
use crate::position::PartitionId;
use crate::record::{SlotHandoff, SlotTenure, SlotVoid};
use crate::redis::client::Client;
use crate::redis::cluster::{self, NodeInfo, SlotRanges, Topology, TopologyError};
use crate::redis::command::{self, Command, CLUSTER_SLOTS};
use crate::redis::url::RedisUrl;

/// Name of the shard map file in the listener's data dir.
pub const SHARD_MAP_FILE: &str = "cluster-shards";

/// Why the shard map could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ShardMapError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("slot table: {0}")]
    Slots(#[from] SlotTableError),
}

/// Partitions and the node ids of their shards (module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardMap {
    parts: BTreeMap<u32, BTreeSet<String>>,
    /// The id of the first partition of an empty map (not saved: once a
    /// partition exists, new ones follow the highest).
    first: u32,
}

/// The node ids of one shard as the topology shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardNodes {
    pub master: String,
    pub replicas: Vec<String>,
    /// Whether the master serves any slot (only such shards get a new id).
    pub has_slots: bool,
}

/// Longest shard map file read (a few hundred shards of a few nodes each
/// fit many times over).
const MAX_MAP_BYTES: u64 = 4 << 20;

impl ShardMap {
    /// Reads the map; a missing file is `None`.
    pub fn load(path: &Path) -> Result<Option<ShardMap>, ShardMapError> {
        let io = |error| ShardMapError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io(error)),
        };
        let mut text = String::new();
        use std::io::Read;
        file.take(MAX_MAP_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_MAP_BYTES {
            return Err(ShardMapError::Parse {
                path: path.to_path_buf(),
                line: 0,
                reason: format!("longer than {MAX_MAP_BYTES} bytes"),
            });
        }
        ShardMap::parse(&text)
            .map(Some)
            .map_err(|(line, reason)| ShardMapError::Parse {
                path: path.to_path_buf(),
                line,
                reason,
            })
    }

    fn parse(text: &str) -> Result<ShardMap, (usize, String)> {
        let mut parts = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let partition = fields
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .ok_or_else(|| {
                    (
                        index + 1,
                        format!("expected `<partition> <node-id>...`, got {line:?}"),
                    )
                })?;
            let ids: BTreeSet<String> = fields.map(str::to_string).collect();
            if let Some(bad) = ids
                .iter()
                .find(|id| id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()))
            {
                return Err((index + 1, format!("bad node id {bad:?}")));
            }
            if parts.insert(partition, ids).is_some() {
                return Err((index + 1, format!("partition {partition} listed twice")));
            }
        }
        Ok(ShardMap { parts, first: 0 })
    }

    /// An empty map whose first partition is `first` (a two-way sync's
    /// backward direction numbers its partitions after the forward ones').
    pub fn starting_at(first: u32) -> ShardMap {
        ShardMap {
            parts: BTreeMap::new(),
            first,
        }
    }

    fn render(&self) -> String {
        let mut text = String::from(
            "# ferry: partition -> node ids of its source shard (written by ferry; do not edit)\n",
        );
        for (partition, ids) in &self.parts {
            text.push_str(&partition.to_string());
            for id in ids {
                text.push(' ');
                text.push_str(id);
            }
            text.push('\n');
        }
        text
    }

    /// Writes the map atomically and durably (module doc).
    pub fn save(&self, path: &Path) -> Result<(), ShardMapError> {
        write_atomically(path, self.render().as_bytes()).map_err(|error| ShardMapError::Io {
            path: path.to_path_buf(),
            error,
        })
    }

    pub fn partitions(&self) -> impl Iterator<Item = PartitionId> + '_ {
        self.parts.keys().map(|&p| PartitionId(p))
    }

    /// The partition whose shard holds the node `id`.
    pub fn partition_of_node(&self, id: &str) -> Option<PartitionId> {
        self.parts
            .iter()
            .find(|(_, ids)| ids.contains(id))
            .map(|(&p, _)| PartitionId(p))
    }

    /// Matches `shards` to partitions (module doc); returns the partition of
    /// each shard (`None`: a master without slots no partition knows) and
    /// whether the map changed.
    pub fn assign(&mut self, shards: &[ShardNodes]) -> (Vec<Option<PartitionId>>, bool) {
        let before = self.clone();
        let mut taken: BTreeSet<u32> = BTreeSet::new();
        let mut assigned = Vec::with_capacity(shards.len());
        for shard in shards {
            let find = |id: &str| {
                self.parts
                    .iter()
                    .find(|(p, ids)| !taken.contains(p) && ids.contains(id))
                    .map(|(&p, _)| p)
            };
            let found = find(&shard.master).or_else(|| shard.replicas.iter().find_map(|r| find(r)));
            let partition = match found {
                Some(p) => p,
                None if shard.has_slots => {
                    let next = self.parts.keys().next_back().map_or(self.first, |&p| p + 1);
                    self.parts.insert(next, BTreeSet::new());
                    next
                }
                None => {
                    assigned.push(None);
                    continue;
                }
            };
            taken.insert(partition);
            let current: BTreeSet<String> = std::iter::once(shard.master.clone())
                .chain(shard.replicas.iter().cloned())
                .collect();
            for (p, ids) in self.parts.iter_mut() {
                if *p != partition {
                    ids.retain(|id| !current.contains(id));
                }
            }
            if let Some(ids) = self.parts.get_mut(&partition) {
                ids.extend(current);
            }
            assigned.push(Some(PartitionId(partition)));
        }
        let changed = *self != before;
        (assigned, changed)
    }
}

/// Replaces `path` by `bytes` so that a crash leaves the old or the new file,
/// and the new one is durable when this returns.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The node ids of every master of `topology` (with or without slots),
/// masters with slots first, in slot order.
fn shard_nodes(topology: &Topology) -> Vec<(ShardNodes, Option<&cluster::NodeInfo>)> {
    let mut masters: Vec<&cluster::NodeInfo> = topology.nodes.iter().filter(|n| n.master).collect();
    masters.sort_by_key(|m| (m.slots.is_empty(), m.slots.first(), m.id.clone()));
    masters
        .into_iter()
        .map(|m| {
            let replicas = topology
                .nodes
                .iter()
                .filter(|r| r.master_id.as_deref() == Some(m.id.as_str()))
                .map(|r| r.id.clone())
                .collect();
            (
                ShardNodes {
                    master: m.id.clone(),
                    replicas,
                    has_slots: !m.slots.is_empty(),
                },
                Some(m),
            )
        })
        .collect()
}

/// Where a shard is now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardState {
    /// The shard's master (with the source's credentials), if the cluster
    /// lists one.
    pub master: Option<RedisUrl>,
    pub master_id: Option<String>,
    /// The slots the master serves (empty: idle).
    pub slots: SlotRanges,
}

/// One partition's view of its shard, shared by its listener, heartbeat and
/// status.
pub struct ShardRoute {
    partition: PartitionId,
    state: watch::Sender<ShardState>,
    /// Handoffs this partition's stream is to append (docs/cluster.md,
    /// rule 2), set by [`ClusterSource::check_handoffs`].
    handoffs: watch::Sender<Vec<PendingHandoff>>,
    /// Tenures this partition's stream is to void (docs/cluster.md, rule
    /// 9), set by [`ClusterSource::check_handoffs`]; a change wakes the
    /// stream through `handoffs`.
    voids: Mutex<Vec<PendingVoid>>,
    /// Slots whose import into this shard stopped with keys left on its
    /// master (not served; nothing voided), for status.
    stranded: Mutex<Vec<String>>,
    /// Handoffs appended to this partition's stream this session, not
    /// durable yet: the writes after one in the log are no longer the
    /// owner's (rule 1), though the table changes only once it is durable.
    queued: Mutex<Vec<SlotHandoff>>,
    /// The lowest source offset a pending handoff or void waits for
    /// (`u64::MAX`: none): the stream appends them as soon as it gets
    /// there, between two entries ([`ShardRoute::due`]).
    due: std::sync::atomic::AtomicU64,
    /// Slots this partition's master is being asked about right now (a
    /// handoff or a void check, each counted): the stream takes no write of
    /// them until the answer is in (docs/cluster.md, rule 2, "late
    /// answers"). `checks` is their total, read first on the hot path.
    checking: Mutex<BTreeMap<u16, usize>>,
    checks: std::sync::atomic::AtomicUsize,
    /// Bumped when a check ends.
    checked: watch::Sender<u64>,
    source: Arc<ClusterSource>,
}

/// A check of slots of one partition's master in flight
/// ([`ShardRoute::begin_check`]); ends when dropped, after what it found is
/// pending in the route.
struct SlotCheck {
    route: Arc<ShardRoute>,
    slots: Vec<u16>,
}

impl Drop for SlotCheck {
    fn drop(&mut self) {
        {
            let mut checking = self
                .route
                .checking
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for slot in &self.slots {
                if let Some(count) = checking.get_mut(slot) {
                    *count -= 1;
                    if *count == 0 {
                        checking.remove(slot);
                    }
                }
            }
            self.route
                .checks
                .fetch_sub(self.slots.len(), std::sync::atomic::Ordering::SeqCst);
        }
        self.route.checked.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// How long one check of a master (a `MULTI` of its view and offset) may
/// take; the stream waits for it when it meets a write of a slot asked
/// about.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A tenure this partition's log is to void once its stream has been
/// received up to source offset `at` (its master then held no key of the
/// slot and neither served nor imported it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingVoid {
    pub void: SlotVoid,
    pub at: u64,
}

/// A slot this partition's log is to hand over once its stream has been
/// received up to source offset `at` (every command of the slot its master
/// ran is at or below it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingHandoff {
    pub handoff: SlotHandoff,
    pub at: u64,
}

/// A snapshot marker's slots (docs/cluster.md, rule 3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MarkerSlots {
    pub scope: SlotRanges,
    pub tenures: Vec<(SlotRanges, u64)>,
    pub handoffs: Vec<SlotHandoff>,
}

impl ShardRoute {
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// Marks `slots` as being asked about on this partition's master, until
    /// the returned check is dropped. Called before the question is sent:
    /// every write of them the stream took before is at or below the offset
    /// the answer carries.
    fn begin_check(self: &Arc<Self>, slots: Vec<u16>) -> SlotCheck {
        {
            let mut checking = self.checking.lock().unwrap_or_else(|p| p.into_inner());
            for slot in &slots {
                *checking.entry(*slot).or_default() += 1;
            }
            self.checks
                .fetch_add(slots.len(), std::sync::atomic::Ordering::SeqCst);
        }
        SlotCheck {
            route: Arc::clone(self),
            slots,
        }
    }

    /// Whether a check of this partition's master is in flight for `slot`
    /// (`None`: for any slot).
    pub fn checking(&self, slot: Option<u16>) -> bool {
        if self.checks.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return false;
        }
        let checking = self.checking.lock().unwrap_or_else(|p| p.into_inner());
        match slot {
            Some(slot) => checking.contains_key(&slot),
            None => !checking.is_empty(),
        }
    }

    /// Waits until no check of `slot` (`None`: of any slot) is in flight;
    /// what a check found is then pending ([`Self::due`]). Bounded: a check
    /// gives up after [`CHECK_TIMEOUT`].
    pub async fn check_done(&self, slot: Option<u16>) {
        let mut checked = self.checked.subscribe();
        while self.checking(slot) {
            if checked.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn state(&self) -> ShardState {
        self.state.borrow().clone()
    }

    /// The slots the shard serves now (a snapshot marker's scope).
    pub fn slots(&self) -> SlotRanges {
        self.state.borrow().slots.clone()
    }

    /// The master to replicate from; rediscovers the cluster first when
    /// `rediscover` (the last link failed) or no master is known. When the
    /// topology cannot be read (a shard elsewhere has no master for a
    /// while, say), the master known before is tried again.
    pub async fn locate(&self, rediscover: bool) -> Result<RedisUrl, String> {
        let mut refresh_error = None;
        if rediscover || self.state.borrow().master.is_none() {
            if let Err(error) = self.source.refresh().await {
                refresh_error = Some(error.to_string());
            }
        }
        let known = self.state.borrow().master.clone();
        match (known, refresh_error) {
            (Some(master), _) => Ok(master),
            (None, Some(error)) => Err(error),
            (None, None) => Err(format!(
                "shard of partition {} has no master in the cluster (idle)",
                self.partition
            )),
        }
    }

    /// The handoffs waiting to be appended to this partition's log.
    pub fn pending_handoffs(&self) -> Vec<PendingHandoff> {
        self.handoffs.borrow().clone()
    }

    /// The lowest offset a pending handoff or void waits for (`u64::MAX`:
    /// none).
    pub fn due(&self) -> u64 {
        self.due.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A handoff or void now waits for offset `at`.
    fn note_due(&self, at: u64) {
        self.due.fetch_min(at, std::sync::atomic::Ordering::SeqCst);
    }

    /// What still waits beyond `offset`, once those at or below it are
    /// appended.
    pub fn set_due_after(&self, offset: u64) {
        let handoffs = self
            .handoffs
            .borrow()
            .iter()
            .map(|p| p.at)
            .collect::<Vec<_>>();
        let voids = self.pending_voids().into_iter().map(|p| p.at);
        let due = handoffs
            .into_iter()
            .chain(voids)
            .filter(|&at| at > offset)
            .min()
            .unwrap_or(u64::MAX);
        self.due.store(due, std::sync::atomic::Ordering::SeqCst);
    }

    /// `handoff` is appended to this partition's stream (not durable yet).
    pub fn handoff_queued(&self, handoff: SlotHandoff) {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handoff);
    }

    /// A new stream session: what the last one appended and did not make
    /// durable is received and appended again.
    pub fn reset_queued(&self) {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// This partition's handoff of `slot` appended and not durable yet.
    fn queued_for(&self, slot: u16) -> Option<SlotHandoff> {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|h| h.slot == slot)
            .max_by_key(|h| h.gen)
            .copied()
    }

    /// The latest handoff of `slot` waiting to be appended, if any.
    fn pending_for(&self, slot: u16) -> Option<SlotHandoff> {
        self.handoffs
            .borrow()
            .iter()
            .filter(|p| p.handoff.slot == slot)
            .map(|p| p.handoff)
            .max_by_key(|h| h.gen)
    }

    /// Changes of [`Self::pending_handoffs`] (and of [`Self::pending_voids`]).
    pub fn watch_handoffs(&self) -> watch::Receiver<Vec<PendingHandoff>> {
        self.handoffs.subscribe()
    }

    /// The tenure voids waiting to be appended to this partition's log.
    pub fn pending_voids(&self) -> Vec<PendingVoid> {
        self.voids.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Status lines of slots whose aborted import left keys on this
    /// shard's master.
    pub fn stranded(&self) -> Vec<String> {
        self.stranded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A void is queued in this partition's stream: later writes of its
    /// slot are tagged past the voided tenure (in memory; the file is
    /// saved once the record is durable, [`Self::voids_durable`]).
    pub fn void_queued(&self, void: &SlotVoid) {
        self.source.void_queued(self.partition.0, void);
        self.voids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| p.void != *void);
    }

    /// Records voids of this partition that are durable in its log.
    pub fn voids_durable(&self, done: &[SlotVoid]) -> Result<(), ShardMapError> {
        if done.is_empty() {
            return Ok(());
        }
        self.source.voids_durable(self.partition.0, done)
    }

    /// Saves the slot table if a write logged since names a new receiver
    /// (docs/cluster.md, rule 9): called before that write is appended.
    pub fn save_receivers(&self) -> Result<(), ShardMapError> {
        self.source.save_receivers()
    }

    /// The slot tenure of a write of this partition (docs/cluster.md, rule
    /// 1): `None` for a keyless write, one of ferry's own keys, or a
    /// command whose keys are not known.
    pub fn tenure_of(&self, commands: &[Command]) -> Option<SlotTenure> {
        let slot = write_slot(commands)?;
        let gen = self.source.tenure(self.partition.0, slot);
        Some(SlotTenure { slot, gen })
    }

    /// Records handoffs of this partition that are durable in its log, each
    /// with the log id of its record.
    pub fn handoffs_durable(&self, done: &[(SlotHandoff, u64)]) -> Result<(), ShardMapError> {
        if done.is_empty() {
            return Ok(());
        }
        self.source.handoffs_durable(self.partition.0, done)?;
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|q| !done.iter().any(|(h, _)| h == q));
        self.handoffs.send_if_modified(|pending| {
            let before = pending.len();
            pending.retain(|p| !done.iter().any(|(h, _)| *h == p.handoff));
            pending.len() != before
        });
        Ok(())
    }

    /// The slots of a snapshot marker taken now (docs/cluster.md, rule 3):
    /// the slots this partition owns in the log, plus those its master
    /// serves or imports in its own view, each with its tenure, and the
    /// handoffs it made last with a record at or below log id `up_to` (the
    /// marker's). `Err` when the master cannot be asked (the imported slots
    /// would be unknown).
    pub async fn marker_slots(&self, up_to: u64) -> Result<MarkerSlots, String> {
        let master = self
            .state
            .borrow()
            .master
            .clone()
            .ok_or_else(|| format!("partition {} has no master", self.partition))?;
        let view = cluster::read_topology(&master)
            .await
            .map_err(|e| format!("reading the slots of {}: {e}", master.addr()))?;
        let me =
            view.nodes.iter().find(|n| n.myself).ok_or_else(|| {
                format!("{} does not name itself in CLUSTER NODES", master.addr())
            })?;
        let mut scope = me.slots.clone();
        for &(slot, _) in &me.importing {
            scope.insert_range(slot, slot);
        }
        Ok(self.source.marker_slots(self.partition.0, scope, up_to))
    }

    /// Resolves once the route names a master other than `addr`, or none
    /// any more (every node of the shard left it: `addr` may now replicate
    /// another shard, whose stream is not this partition's); the session on
    /// `addr` should end.
    pub async fn moved_from(&self, addr: &str) -> String {
        let mut rx = self.state.subscribe();
        loop {
            match &rx.borrow_and_update().master {
                Some(master) if master.addr() != addr => return master.addr(),
                Some(_) => {}
                None => return "no master (the shard's nodes left it)".to_string(),
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

struct ClusterState {
    map: ShardMap,
    /// The slot table (`None` until the first topology is read on a first
    /// start).
    slots: Option<SlotTable>,
    /// Whether the last topology read showed a slot migrating or importing.
    migrating: bool,
    /// Every node address seen, for rediscovery beyond the seeds.
    known: Vec<RedisUrl>,
    routes: BTreeMap<PartitionId, Arc<ShardRoute>>,
    /// Partitions whose route was handed out by [`ClusterSource::take_new`].
    started: BTreeSet<PartitionId>,
}

/// A cluster source: its seeds, the shard map and a route per partition.
pub struct ClusterSource {
    seeds: Vec<RedisUrl>,
    map_path: PathBuf,
    slots_path: PathBuf,
    state: Mutex<ClusterState>,
    /// One discovery at a time (listeners and the poller share it).
    discovering: tokio::sync::Mutex<()>,
    /// When a partition last logged a write of a slot it does not own (a
    /// migration into its shard): the poller then reads the topology at
    /// once and fast, so the old owner's handoff is seen while the slot is
    /// away from it (unix ms; 0: never).
    receiving_since: std::sync::atomic::AtomicU64,
    receiving: tokio::sync::Notify,
    /// Slots a partition that does not own them logged writes of: the old
    /// owner is asked about them at every poll until the table names the
    /// receiver (the topology read may lag the migrations).
    received: Mutex<BTreeMap<u16, BTreeSet<u32>>>,
    /// A receiver was added to the slot table since it was last saved.
    receivers_unsaved: std::sync::atomic::AtomicBool,
}

impl ClusterSource {
    /// Loads the shard map of `data_dir` (if any) and makes a route for each
    /// partition it names (no master known until [`Self::refresh`]).
    pub fn open(
        seeds: Vec<RedisUrl>,
        data_dir: &Path,
    ) -> Result<Arc<ClusterSource>, ShardMapError> {
        let map_path = data_dir.join(SHARD_MAP_FILE);
        let map = ShardMap::load(&map_path)?.unwrap_or_default();
        let slots_path = data_dir.join(SLOT_TABLE_FILE);
        let slots = SlotTable::load(&slots_path)?;
        let source = Arc::new(ClusterSource {
            seeds,
            map_path,
            slots_path,
            state: Mutex::new(ClusterState {
                map,
                slots,
                migrating: false,
                known: Vec::new(),
                routes: BTreeMap::new(),
                started: BTreeSet::new(),
            }),
            discovering: tokio::sync::Mutex::new(()),
            receiving_since: std::sync::atomic::AtomicU64::new(0),
            receiving: tokio::sync::Notify::new(),
            received: Mutex::new(BTreeMap::new()),
            receivers_unsaved: std::sync::atomic::AtomicBool::new(false),
        });
        {
            let mut state = source.lock();
            let partitions: Vec<PartitionId> = state.map.partitions().collect();
            for partition in partitions {
                let route = source.new_route(partition);
                state.routes.insert(partition, route);
            }
        }
        Ok(source)
    }

    /// Whether `data_dir` holds a shard map (it replicated a cluster).
    pub fn has_map(data_dir: &Path) -> bool {
        data_dir.join(SHARD_MAP_FILE).exists()
    }

    fn new_route(self: &Arc<Self>, partition: PartitionId) -> Arc<ShardRoute> {
        let (state, _) = watch::channel(ShardState::default());
        let (handoffs, _) = watch::channel(Vec::new());
        Arc::new(ShardRoute {
            partition,
            state,
            handoffs,
            voids: Mutex::new(Vec::new()),
            stranded: Mutex::new(Vec::new()),
            queued: Mutex::new(Vec::new()),
            due: std::sync::atomic::AtomicU64::new(u64::MAX),
            checking: Mutex::new(BTreeMap::new()),
            checks: std::sync::atomic::AtomicUsize::new(0),
            checked: watch::channel(0).0,
            source: Arc::clone(self),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ClusterState> {
        // Critical sections assign whole values.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the topology and updates the map (saved before it returns) and
    /// every route.
    pub async fn refresh(self: &Arc<Self>) -> Result<(), RefreshError> {
        let _one = self.discovering.lock().await;
        let candidates: Vec<RedisUrl> = {
            let state = self.lock();
            state
                .known
                .iter()
                .chain(self.seeds.iter())
                .cloned()
                .collect()
        };
        let topology = cluster::discover(&candidates).await?;
        self.apply(&topology)
    }

    fn apply(self: &Arc<Self>, topology: &Topology) -> Result<(), RefreshError> {
        let template = &self.seeds[0];
        let shards = shard_nodes(topology);
        let mut state = self.lock();
        let nodes: Vec<ShardNodes> = shards.iter().map(|(n, _)| n.clone()).collect();
        let mut map = state.map.clone();
        let (assigned, changed) = map.assign(&nodes);
        if changed {
            map.save(&self.map_path)?;
            info!(map = %self.map_path.display(), "cluster shard map updated");
        }
        state.map = map;
        state.migrating = topology.migrating();
        if state.slots.is_none() {
            // First start: every slot belongs to its shard's partition.
            let owners: Vec<(SlotRanges, u32)> = shards
                .iter()
                .zip(&assigned)
                .filter_map(|((_, master), partition)| {
                    Some((master.as_ref()?.slots.clone(), partition.as_ref()?.0))
                })
                .collect();
            let table = SlotTable::initial(|slot| {
                owners
                    .iter()
                    .find(|(slots, _)| slots.contains(slot))
                    .map(|(_, p)| *p)
            });
            if let Some(table) = table {
                table.save(&self.slots_path).map_err(ShardMapError::from)?;
                info!(table = %self.slots_path.display(), "cluster slot table made");
                state.slots = Some(table);
            }
        }
        state.known = topology
            .nodes
            .iter()
            .filter(|n| !n.failing)
            .map(|n| Topology::url_for(n, template))
            .collect();
        let mut seen = BTreeSet::new();
        for ((_, master), partition) in shards.iter().zip(assigned) {
            let (Some(partition), Some(master)) = (partition, master) else {
                continue;
            };
            seen.insert(partition);
            let new = ShardState {
                master: Some(Topology::url_for(master, template)),
                master_id: Some(master.id.clone()),
                slots: master.slots.clone(),
            };
            let route = match state.routes.get(&partition) {
                Some(route) => Arc::clone(route),
                None => {
                    let route = self.new_route(partition);
                    state.routes.insert(partition, Arc::clone(&route));
                    route
                }
            };
            let mut master_moved = false;
            route.state.send_if_modified(|s| {
                if *s == new {
                    return false;
                }
                info!(partition = %partition, master = %master.addr, slots = %new.slots, "source shard");
                master_moved = s.master_id.is_some() && s.master_id != new.master_id;
                *s = new;
                true
            });
            if master_moved {
                // A void's offset was read from the old master: the new
                // one (a promoted replica) may not have reached it. The
                // receivers are still in the table: asked again.
                route
                    .voids
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            }
        }
        // A partition whose nodes all left the cluster: idle, master unknown.
        for (partition, route) in &state.routes {
            if !seen.contains(partition) {
                route.state.send_if_modified(|s| {
                    let changed = s.master.is_some() || !s.slots.is_empty();
                    *s = ShardState::default();
                    changed
                });
            }
        }
        Ok(())
    }

    /// Routes of partitions not handed out before, in partition order.
    pub fn take_new(&self) -> Vec<Arc<ShardRoute>> {
        let mut state = self.lock();
        let new: Vec<Arc<ShardRoute>> = state
            .routes
            .iter()
            .filter(|(p, _)| !state.started.contains(p))
            .map(|(_, r)| Arc::clone(r))
            .collect();
        for route in &new {
            state.started.insert(route.partition);
        }
        new
    }

    /// The seeds, for status when no master is known.
    pub fn seeds(&self) -> &[RedisUrl] {
        &self.seeds
    }

    /// The tenure of a write of `slot` by `partition` (0 before the table
    /// exists: nothing was handed over yet). A write of a slot the
    /// partition does not own wakes the poller ([`Self::slots_on_the_move`]);
    /// its tenure counts the owner's handoff of the slot still waiting to
    /// be logged, if any ([`slots::receiving_tenure`]).
    fn tenure(&self, partition: u32, slot: u16) -> u64 {
        let (tenure, owned) = {
            let mut guard = self.lock();
            let state: &mut ClusterState = &mut guard;
            match state.slots.as_mut() {
                None => (0, true),
                Some(table) => {
                    let owner = table.get(slot);
                    let handed = (owner.owner == partition)
                        .then(|| state.routes.get(&PartitionId(partition)))
                        .flatten()
                        .and_then(|route| route.queued_for(slot))
                        .filter(|h| h.gen > owner.gen);
                    let tenure = if let Some(handoff) = handed {
                        // Its own handoff of the slot is in the log before
                        // this write (not durable yet): the partition is
                        // receiving the slot again, after the handoff's
                        // tenure.
                        table
                            .receiving_above(slot, partition, handoff.gen)
                            .unwrap_or(owner.next.max(handoff.gen + 1))
                    } else if owner.owner == partition {
                        return owner.gen;
                    } else {
                        let pending = state
                            .routes
                            .get(&PartitionId(owner.owner))
                            .and_then(|route| route.pending_for(slot));
                        super::slots::receiving_tenure(
                            owner,
                            pending,
                            partition,
                            table.receiving(slot, partition),
                        )
                    };
                    // Rule 9: saved before the write is appended.
                    if table.add_receiver(slot, partition, tenure) {
                        self.receivers_unsaved
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    (tenure, false)
                }
            }
        };
        if !owned {
            self.received
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(slot)
                .or_default()
                .insert(partition);
            let now = crate::position::now_unix_ms();
            let before = self
                .receiving_since
                .swap(now, std::sync::atomic::Ordering::Relaxed);
            if now.saturating_sub(before) > 100 {
                self.receiving.notify_one();
            }
        }
        tenure
    }

    /// Whether a partition logged a write of a slot it does not own within
    /// the last few seconds (the poller reads the topology fast then).
    pub fn slots_on_the_move(&self) -> bool {
        let since = self
            .receiving_since
            .load(std::sync::atomic::Ordering::Relaxed);
        since > 0 && crate::position::now_unix_ms().saturating_sub(since) < 5_000
    }

    /// Resolves when a partition starts logging writes of a slot it does not
    /// own (a migration into its shard).
    pub async fn receiving_notified(&self) {
        self.receiving.notified().await
    }

    fn handoffs_durable(
        &self,
        from: u32,
        done: &[(SlotHandoff, u64)],
    ) -> Result<(), ShardMapError> {
        let mut state = self.lock();
        let Some(table) = state.slots.as_mut() else {
            return Ok(());
        };
        let mut changed = false;
        for (handoff, log_id) in done {
            changed |= table.hand_off(from, handoff, *log_id);
        }
        if changed {
            table.save(&self.slots_path)?;
            info!(from, handoffs = ?done, "slot handoffs recorded");
        }
        Ok(())
    }

    fn save_receivers(&self) -> Result<(), ShardMapError> {
        if !self
            .receivers_unsaved
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        let state = self.lock();
        if let Some(table) = state.slots.as_ref() {
            if let Err(error) = table.save(&self.slots_path) {
                self.receivers_unsaved
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(error.into());
            }
        }
        Ok(())
    }

    fn void_queued(&self, partition: u32, void: &SlotVoid) {
        if let Some(table) = self.lock().slots.as_mut() {
            table.void(partition, void);
        }
    }

    fn voids_durable(&self, partition: u32, done: &[SlotVoid]) -> Result<(), ShardMapError> {
        let mut state = self.lock();
        let Some(table) = state.slots.as_mut() else {
            return Ok(());
        };
        for void in done {
            table.void(partition, void);
        }
        table.save(&self.slots_path)?;
        info!(partition, voids = ?done, "slot tenures voided (aborted imports) recorded");
        Ok(())
    }

    /// Rule 9 (docs/cluster.md): asks the master of each partition that
    /// received a slot it does not own whether it still serves or imports
    /// it, or holds keys of it; a partition whose master does none of it
    /// gets a pending void of that tenure, at the master's offset read in
    /// the same `MULTI`.
    async fn check_voids(&self) {
        let mut asks: BTreeMap<PartitionId, (Arc<ShardRoute>, RedisUrl, Vec<SlotVoid>)> =
            BTreeMap::new();
        {
            let state = self.lock();
            let Some(table) = state.slots.as_ref() else {
                return;
            };
            for (slot, partition, gen) in table.receivers() {
                let Some(route) = state.routes.get(&PartitionId(partition)) else {
                    continue;
                };
                let void = SlotVoid { slot, gen };
                if route.pending_voids().iter().any(|p| p.void == void) {
                    continue;
                }
                let Some(master) = route.state().master else {
                    continue;
                };
                asks.entry(PartitionId(partition))
                    .or_insert_with(|| (Arc::clone(route), master, Vec::new()))
                    .2
                    .push(void);
            }
        }
        let routes: Vec<Arc<ShardRoute>> = self.lock().routes.values().cloned().collect();
        for route in routes {
            if !asks.contains_key(&route.partition) {
                route
                    .stranded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            }
        }
        for (partition, (route, master, voids)) in asks {
            let _check = route.begin_check(voids.iter().map(|v| v.slot).collect());
            match confirm_voids(&master, &voids).await {
                Ok((confirmed, stranded)) => {
                    *route.stranded.lock().unwrap_or_else(|p| p.into_inner()) = stranded
                        .iter()
                        .map(|(void, keys)| {
                            format!(
                                "slot {} back to its owner: not yet, its import into this shard (tenure generation {}) stopped with {keys} keys left on {} (not served by the cluster), so nothing is voided and the partition's applier holds until they are moved (CLUSTER SETSLOT {} IMPORTING <owner-id> on it, then redis-cli --cluster fix) or the migration is finished",
                                void.slot, void.gen, master.addr(), void.slot
                            )
                        })
                        .collect();
                    if confirmed.is_empty() {
                        continue;
                    }
                    {
                        let mut pending = route.voids.lock().unwrap_or_else(|p| p.into_inner());
                        for (void, at) in &confirmed {
                            if !pending.iter().any(|p| p.void == *void) {
                                info!(%partition, slot = void.slot, gen = void.gen, at, "slot import aborted in the source (the shard neither serves nor imports it, and holds no key of it): logging the void of its tenure once received up to the offset");
                                route.note_due(*at);
                                pending.push(PendingVoid {
                                    void: *void,
                                    at: *at,
                                });
                            }
                        }
                    }
                    // Wakes the stream loop.
                    route.handoffs.send_modify(|_| {});
                }
                Err(error) => {
                    debug!(%partition, master = %master.addr(), %error, "aborted imports not checked");
                }
            }
        }
    }

    fn marker_slots(&self, partition: u32, served: SlotRanges, up_to: u64) -> MarkerSlots {
        let state = self.lock();
        let Some(table) = state.slots.as_ref() else {
            return MarkerSlots {
                scope: served,
                ..MarkerSlots::default()
            };
        };
        let mut scope = table.owned_by(partition);
        for &(first, last) in served.ranges() {
            scope.insert_range(first, last);
        }
        MarkerSlots {
            tenures: table.tenures(partition, &scope),
            handoffs: table.handoffs_from(partition, up_to),
            scope,
        }
    }

    /// Finds the slots whose owner in the slot table no longer serves them
    /// while another shard does, confirms each with the owner's master
    /// (its own view: neither served nor migrating), reads that master's
    /// offset right after, and hands the handoff to the owner's route
    /// (docs/cluster.md, rule 2). Returns whether a slot is on the move
    /// (the caller then polls faster).
    pub async fn check_handoffs(&self) -> bool {
        // Candidates per owning partition: slots the last topology read
        // shows elsewhere, and slots another partition logged writes of.
        let mut candidates: BTreeMap<PartitionId, (RedisUrl, Vec<SlotHandoff>)> = BTreeMap::new();
        let mut idle: Vec<(PartitionId, SlotHandoff)> = Vec::new();
        {
            let state = self.lock();
            let Some(table) = state.slots.as_ref() else {
                return false;
            };
            let received: BTreeSet<u16> = {
                let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
                received.retain(|slot, receivers| {
                    receivers.remove(&table.get(*slot).owner);
                    !receivers.is_empty()
                });
                received.keys().copied().collect()
            };
            let served: Vec<(PartitionId, ShardState)> =
                state.routes.iter().map(|(p, r)| (*p, r.state())).collect();
            for slot in 0..CLUSTER_SLOTS {
                let owner = table.get(slot);
                let Some((_, owner_state)) = served.iter().find(|(p, _)| p.0 == owner.owner) else {
                    continue;
                };
                if owner_state.slots.contains(slot) && !received.contains(&slot) {
                    continue;
                }
                if let (Some(master), true) = (&owner_state.master, received.contains(&slot)) {
                    // The old owner's own view names the new one.
                    candidates
                        .entry(PartitionId(owner.owner))
                        .or_insert_with(|| (master.clone(), Vec::new()))
                        .1
                        .push(SlotHandoff {
                            slot,
                            to: u32::MAX,
                            gen: owner.next,
                        });
                    continue;
                }
                let Some((to, _)) = served.iter().find(|(_, s)| s.slots.contains(slot)) else {
                    continue;
                };
                let Some(master) = owner_state.master.clone() else {
                    // The owner's shard has no master any more (its nodes
                    // left it): its log is final, the handoff goes at its
                    // end (the listener appends it, ListenerHandle side).
                    idle.push((
                        PartitionId(owner.owner),
                        SlotHandoff {
                            slot,
                            to: to.0,
                            gen: owner.next,
                        },
                    ));
                    continue;
                };
                candidates
                    .entry(PartitionId(owner.owner))
                    .or_insert_with(|| (master, Vec::new()))
                    .1
                    .push(SlotHandoff {
                        slot,
                        to: to.0,
                        gen: owner.next,
                    });
            }
        }
        let moving = !candidates.is_empty() || !idle.is_empty() || self.lock().migrating;
        self.check_voids().await;
        for (partition, handoff) in idle {
            let route = self.lock().routes.get(&partition).cloned();
            if let Some(route) = route {
                if let Some(handoff) = self.opening(partition, handoff) {
                    route.add_pending(&[(handoff, 0)], partition);
                }
            }
        }
        for (partition, (master, slots)) in candidates {
            let route = self.lock().routes.get(&partition).cloned();
            let Some(route) = route else {
                continue;
            };
            let map = self.lock().map.clone();
            let _check = route.begin_check(slots.iter().map(|h| h.slot).collect());
            let confirmed = match confirm_handoffs(&master, &slots, &map).await {
                Ok(confirmed) => confirmed,
                Err(error) => {
                    debug!(%partition, master = %master.addr(), %error, "slot handoff not confirmed yet");
                    continue;
                }
            };
            if !confirmed.is_empty() {
                test_hold_answer(partition).await;
            }
            let confirmed: Vec<(SlotHandoff, u64)> = confirmed
                .into_iter()
                .filter_map(|(handoff, at)| Some((self.opening(partition, handoff)?, at)))
                .collect();
            route.add_pending(&confirmed, partition);
        }
        moving
    }

    /// `handoff` by `from` (its receiver known), with the tenure it opens
    /// as the table is now: the one its receiver has been receiving the
    /// slot in, when it has (its writes of the slot are tagged with it),
    /// else the slot's next tenure (docs/cluster.md, rules 2 and 9).
    /// `None` when the table no longer names `from` as the owner in the
    /// tenure the check found: the check began before an earlier handoff of
    /// the slot became durable (with a void since, it would open a tenure
    /// past the one handed over).
    fn opening(&self, from: PartitionId, mut handoff: SlotHandoff) -> Option<SlotHandoff> {
        let state = self.lock();
        let Some(table) = state.slots.as_ref() else {
            return Some(handoff);
        };
        let owner = table.get(handoff.slot);
        // (The candidate's generation is the next one as the check found
        // the table: a slot handed on and back since has passed it.)
        if owner.owner != from.0 || owner.gen >= handoff.gen {
            return None;
        }
        handoff.gen = table
            .receiving(handoff.slot, handoff.to)
            .unwrap_or(owner.next);
        Some(handoff)
    }
}

impl ShardRoute {
    /// Adds handoffs to log once the stream reaches their offset.
    fn add_pending(&self, confirmed: &[(SlotHandoff, u64)], partition: PartitionId) {
        self.handoffs.send_if_modified(|pending| {
                let mut changed = false;
                for (handoff, at) in confirmed {
                    // One handoff of a slot at a time: a slot that moved on
                    // again before its first handoff was logged keeps the
                    // first (the next owner hands it on in its own log).
                    let same = |p: &PendingHandoff| p.handoff.slot == handoff.slot;
                    if !pending.iter().any(same) {
                        self.note_due(*at);
                        info!(%partition, slot = handoff.slot, to = handoff.to, gen = handoff.gen, at, "slot handed over by the source: logging its handoff once received up to the offset");
                        pending.push(PendingHandoff {
                            handoff: *handoff,
                            at: *at,
                        });
                        changed = true;
                    }
                }
                changed
            });
    }
}

/// Test hook: `FERRY_TEST_SLOT_CHECK_HOLD_MS` holds each answer of a
/// master that found a handoff that long before it is pending, as a slow
/// answer would be (tests of writes that meet a check in flight).
async fn test_hold_answer(partition: PartitionId) {
    let Some(ms) = std::env::var("FERRY_TEST_SLOT_CHECK_HOLD_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    info!(%partition, ms, "test hook: holding the answer of a slot check");
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// The slot a write of a cluster source is tagged with (docs/cluster.md,
/// rule 1): its first key's, `None` for a keyless write, one of ferry's own
/// keys, or a command whose keys are not known.
pub fn write_slot(commands: &[Command]) -> Option<u16> {
    commands.iter().find_map(|cmd| {
        let keys = command::keys(cmd).ok()?;
        let key = keys.first()?;
        if key.starts_with(crate::record::INTERNAL_PREFIX) {
            return None;
        }
        Some(command::key_hash_slot(key))
    })
}

/// One instant of `master`'s state, in one `MULTI`: its own view (`CLUSTER
/// NODES`, and its own line of it), the replies of `extra`, and its
/// `master_repl_offset`. An error when it is not a master (any more).
async fn master_instant(
    master: &RedisUrl,
    extra: Vec<Command>,
) -> Result<(Topology, NodeInfo, u64, Vec<crate::redis::resp::Frame>), String> {
    let addr = master.addr();
    let asked = extra.len();
    let mut commands = vec![
        Command::from_parts(["MULTI"]),
        Command::from_parts(["CLUSTER", "NODES"]),
    ];
    commands.extend(extra);
    commands.push(Command::from_parts(["INFO", "replication"]));
    commands.push(Command::from_parts(["EXEC"]));
    // Bounded: the partition's stream waits for the answer when it meets a
    // write of a slot asked about.
    let asking = async {
        let mut client = Client::connect(master)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        client
            .pipeline(&commands)
            .await
            .map_err(|e| format!("{addr}: {e}"))
    };
    let mut replies = tokio::time::timeout(CHECK_TIMEOUT, asking)
        .await
        .map_err(|_| format!("{addr}: no answer within {CHECK_TIMEOUT:?}"))??;
    let mut results = match replies.pop() {
        Some(crate::redis::resp::Frame::Array(results)) => results,
        other => return Err(format!("{addr}: EXEC answered {other:?}")),
    };
    if results.len() != asked + 2 {
        return Err(format!("{addr}: EXEC gave {} replies", results.len()));
    }
    let text = |frame: &crate::redis::resp::Frame| {
        frame
            .as_bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| format!("{addr}: unexpected reply {frame:?}"))
    };
    let info = crate::redis::client::parse_info(&text(&results[asked + 1])?);
    let view = Topology::parse(&addr, &text(&results[0])?).map_err(|e| e.to_string())?;
    let me = view
        .nodes
        .iter()
        .find(|n| n.myself)
        .ok_or_else(|| format!("{addr} does not name itself in CLUSTER NODES"))?;
    if !me.master || info.get("role").map(String::as_str) != Some("master") {
        return Err(format!("{addr} is not a master any more"));
    }
    let offset: u64 = info
        .get("master_repl_offset")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{addr}: INFO replication has no master_repl_offset"))?;
    let me = me.clone();
    results.truncate(asked + 1);
    results.remove(0);
    Ok((view, me, offset, results))
}

/// Asks `master` which of the slots of `slots` it no longer serves nor
/// migrates, then its replication offset: every command of those
/// slots it ran is at or below that offset.
/// Whether the master `me` serves `slot`, or migrates or imports it, in its
/// own view.
fn has_slot(me: &NodeInfo, slot: u16) -> bool {
    me.slots.contains(slot)
        || me.migrating.iter().any(|(s, _)| *s == slot)
        || me.importing.iter().any(|(s, _)| *s == slot)
}

async fn confirm_handoffs(
    master: &RedisUrl,
    slots: &[SlotHandoff],
    map: &ShardMap,
) -> Result<Vec<(SlotHandoff, u64)>, String> {
    // The view and the offset of one instant: every command of the slot the
    // master ran is at or below the offset, and none of a later import of
    // it back (a slot it imports is not handed over yet).
    let (view, me, offset, _) = master_instant(master, Vec::new()).await?;
    // The new owner is the one this master's view names (the topology read
    // may be from a node that lags, or already a later move).
    Ok(slots
        .iter()
        .filter(|h| !has_slot(&me, h.slot))
        .filter_map(|h| {
            let node = view.master_for_slot(h.slot)?;
            let to = map.partition_of_node(&node.id)?;
            Some((SlotHandoff { to: to.0, ..*h }, offset))
        })
        .collect())
}

/// Asks `master`, in one `MULTI` (one instant of its state), for its own
/// view, its keys in each slot of `voids` and its replication offset.
/// Returns the voids it confirms (it neither serves nor imports the slot
/// and holds no key of it) with that offset, and those whose slot it
/// still holds keys of (with how many).
async fn confirm_voids(
    master: &RedisUrl,
    voids: &[SlotVoid],
) -> Result<(Vec<(SlotVoid, u64)>, Vec<(SlotVoid, i64)>), String> {
    let addr = master.addr();
    let counts = voids
        .iter()
        .map(|void| {
            Command::from_parts([
                "CLUSTER".to_string(),
                "COUNTKEYSINSLOT".to_string(),
                void.slot.to_string(),
            ])
        })
        .collect();
    let (_, me, offset, results) = master_instant(master, counts).await?;
    let mut confirmed = Vec::new();
    let mut stranded = Vec::new();
    for (void, count) in voids.iter().zip(results) {
        let crate::redis::resp::Frame::Integer(count) = count else {
            return Err(format!("{addr}: COUNTKEYSINSLOT answered {count:?}"));
        };
        if has_slot(&me, void.slot) {
            continue;
        }
        if count > 0 {
            stranded.push((*void, count));
        } else {
            confirmed.push((*void, offset));
        }
    }
    Ok((confirmed, stranded))
}

/// Why [`ClusterSource::refresh`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("cluster topology: {0}")]
    Topology(#[from] TopologyError),
    #[error("shard map: {0}")]
    Map(#[from] ShardMapError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(master: &str, replicas: &[&str], has_slots: bool) -> ShardNodes {
        ShardNodes {
            master: master.into(),
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            has_slots,
        }
    }

    #[test]
    fn shards_keep_their_partition_through_failover_and_new_shards_get_new_ids() {
        let mut map = ShardMap::default();
        let (ids, changed) = map.assign(&[
            shard("a", &["a2"], true),
            shard("b", &["b2"], true),
            shard("c", &["c2"], true),
        ]);
        assert!(changed);
        assert_eq!(
            ids,
            vec![
                Some(PartitionId(0)),
                Some(PartitionId(1)),
                Some(PartitionId(2))
            ]
        );
        // Failover in shard b (b2 promoted, b its replica), listed first now.
        let (ids, changed) = map.assign(&[
            shard("b2", &["b"], true),
            shard("a", &["a2"], true),
            shard("c", &["c2"], true),
        ]);
        assert!(!changed);
        assert_eq!(
            ids,
            vec![
                Some(PartitionId(1)),
                Some(PartitionId(0)),
                Some(PartitionId(2))
            ]
        );
        // A new master without slots gets nothing; with slots, the next id.
        let (ids, _) = map.assign(&[shard("a", &["a2"], true), shard("d", &[], false)]);
        assert_eq!(ids, vec![Some(PartitionId(0)), None]);
        let (ids, changed) = map.assign(&[shard("d", &["d2"], true), shard("c", &[], false)]);
        assert!(changed);
        assert_eq!(ids, vec![Some(PartitionId(3)), Some(PartitionId(2))]);
        // The map round-trips through its file form.
        assert_eq!(ShardMap::parse(&map.render()).unwrap(), map);
    }

    #[test]
    fn a_replica_moved_to_another_shard_leaves_its_old_partition() {
        let mut map = ShardMap::default();
        map.assign(&[shard("a", &["x"], true), shard("b", &[], true)]);
        let (ids, changed) = map.assign(&[shard("a", &[], true), shard("b", &["x"], true)]);
        assert!(changed);
        assert_eq!(ids, vec![Some(PartitionId(0)), Some(PartitionId(1))]);
        assert!(!map.parts[&0].contains("x"));
        assert!(map.parts[&1].contains("x"));
    }

    #[test]
    fn bad_map_files_are_errors_naming_the_line() {
        assert_eq!(ShardMap::parse("# c\n0 abc\nzz abc\n").unwrap_err().0, 3);
        assert_eq!(ShardMap::parse("0 a\n0 b\n").unwrap_err().0, 2);
        assert!(ShardMap::parse("0 a;b\n").is_err());
    }
}
