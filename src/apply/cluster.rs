//! Applying into a Redis Cluster target: every command routed to the master
//! of its keys' slot, exactly once with a checkpoint per target slot.
//!
//! In: the same WAL entries and batches as a standalone target
//! ([`super::batch`]). Out: `MULTI`/`EXEC` transactions on the masters of the
//! cluster, one per target slot a batch touches, each writing that slot's
//! checkpoint; a partition floor checkpoint; the split count and the
//! cluster's state in the status.
//!
//! # Detection and the slot map
//!
//! The applier asks the target (`INFO cluster`, every seed in turn) whether
//! it is a cluster; `target` may be any node or a comma-separated seed list
//! ([`super::ApplyConfig::target_seeds`]). A session discovers the topology
//! (`CLUSTER NODES` of the first seed, or a node it knew, that sees all 16384
//! slots served), connects to every master, fences each one
//! ([`super::fence`]: `CLIENT SETNAME`, `CLIENT KILL` of this applier's earlier
//! connections), and keeps a slot → master map. The target has only db 0:
//! entries in other dbs are refused by the applier itself (held, like on a
//! standalone target without that db).
//!
//! # Checkpoints
//!
//! - The **floor** `__ferry:checkpoint:<drainer>:<partition>` (same key and
//!   value format as on a standalone target, [`super::checkpoint`]), in the
//!   slot its name hashes to: every entry up to it is applied in every slot.
//!   It holds `loading=M` during a snapshot load. The applier reads the WAL
//!   from the floor on.
//! - One **slot checkpoint** per target slot `s`,
//!   `__ferry:checkpoint:<drainer>:<partition>:{ferry:N}`, where `{ferry:N}`
//!   ([`crate::redis::cluster::tag_for_slot`]) puts the key in slot `s`:
//!   value `applied=L epoch=E log=T`: every piece of slot `s` of the entries
//!   up to `L` is applied. It only counts when its epoch and log tag are the
//!   floor's (a snapshot load deletes them, and a value of another WAL's log
//!   means nothing for this one).
//!
//! # A batch
//!
//! A batch of entries `[a..b]` (built as for a standalone target) is cut into
//! **pieces**, one per target slot: the commands of its entries for that
//! slot, in log order. Each piece goes to the master of its slot as
//!
//! ```text
//! WATCH <slot checkpoint>  MULTI  <its commands>  SET <slot checkpoint> "applied=b ..."  EXEC
//! ```
//!
//! with every piece of the batch sent at once (one connection per master,
//! pieces of different slots are independent). A batch is sent only once
//! every piece of the one before committed, so two pieces of one slot are
//! never in flight together. The floor follows lazily: at most 200 ms after
//! the pieces it covers committed (sooner when idle, before a barrier or a
//! load, on shutdown), the applier `WAIT`s (up to 1 s) for the replicas of
//! every master that got pieces since the last floor, then `SET`s the floor
//! to the last batch whose pieces all committed; the WAL's applied mark and
//! ack follow the floor. On start (every session) the applier reads the floor
//! and every slot checkpoint (pipelined `GET`s per master), resumes the WAL
//! after the floor, and sends to slot `s` only the commands of entries above
//! `s`'s checkpoint: a piece that committed is never sent again, one that did
//! not is sent again, whatever the batches look like after the restart.
//!
//! Pieces of different slots commit independently: while a piece waits
//! (a refusal, a migration), pieces of other slots may already hold later
//! entries. Order is kept per slot, as Redis Cluster itself keeps it.
//!
//! # Entries over several slots
//!
//! A standalone source allows what a cluster refuses: `MSET k1 v1 k2 v2`,
//! `DEL k1 k2` or a `MULTI` over keys of several slots. Such an entry is
//! split: a transaction's commands go to their slots' pieces, and `DEL`,
//! `UNLINK`, `TOUCH`, `EXISTS` (key by key) and `MSET`, `MSETNX` (pair by
//! pair) are cut into one command per slot. Each piece is exactly once, but
//! the entry is no longer atomic on the target: every such entry is counted
//! (`split_entries` in the status, shown by `ferry status`). Any other
//! command whose keys are in several slots (`RENAME`, `SUNIONSTORE`,
//! `LMOVE`, ... across slots, a script over several slots) cannot be cut
//! and is refused by the applier itself: held, shown BLOCKED, until `ferry
//! skip` (or `on-refused = "skip-and-record"`) records and skips it.
//!
//! # Commands without keys
//!
//! - `FLUSHALL`, `FLUSHDB` (db 0) of the source delete this sync's keyspace
//!   on **every master**, keeping every `__ferry*` key (the keyspace module's
//!   flush script, run on each master: its keys are its own); `FUNCTION ...`
//!   and other keyless commands run on every master too (functions are per
//!   node in a cluster). Such an entry is a **barrier**: the batch before it
//!   gets its floor first, then each master other than the floor's runs
//!   `MULTI <commands> EXEC`, and the floor's master runs `WATCH floor MULTI
//!   <commands> SET floor <entry> EXEC`. A crash in between runs it again on
//!   every master (nothing after it was applied, so a flush again is the
//!   same; `FUNCTION LOAD` without `REPLACE` then answers "already exists",
//!   counted as refused). It counts as split when there is more than one
//!   master.
//! - `PUBLISH` runs once, on the floor's master, in the transaction that moves
//!   the floor past it (a cluster forwards it to every node).
//! - An entry mixing keyless commands with key commands is refused (the order
//!   of a flush and a write could not be kept across masters).
//!
//! # Redirections and topology changes
//!
//! - `MOVED` (a slot moved, a master became a replica after a failover), in
//!   a piece: the `MULTI` is discarded (`EXECABORT`), nothing ran; the map is
//!   read again and the piece is sent to the slot's master. A master the
//!   session did not fence at its start (a node added since) ends the session
//!   ([`ApplyError::Topology`], retried): the next one fences every master and
//!   reads every checkpoint again.
//! - `ASK` (the slot is migrating and a key of the piece, or its slot
//!   checkpoint, is already on the importing node): the piece is held and
//!   sent again with backoff until the migration of that slot ends (the
//!   status names the slot and the reply). Nothing of it ran, and the slot
//!   checkpoint moves with the slot's keys, so this stays exactly once; no
//!   `ASKING` is used, since a piece may hold keys on both sides.
//! - `TRYAGAIN`, `CLUSTERDOWN`: held and retried with backoff, the same way.
//! - A master that stops answering (killed, failed over): the session ends;
//!   the next one discovers the cluster again (from the seeds and every node
//!   it knew) and reconnects through the new map.
//!
//! A replica promoted after a crash of its master holds every piece below
//! the floor when its replicas acknowledged the `WAIT` before the floor
//! moved (pieces above the floor are applied again from its own slot
//! checkpoints). A replica that did not acknowledge within the `WAIT`'s
//! second (lagging, down) is logged, and the floor moves anyway: if its
//! master then crashes and it is promoted without those pieces, they are
//! not applied again (the floor lives on another master). A coordinated
//! `CLUSTER FAILOVER` loses nothing.
//!
//! # Snapshot loads
//!
//! The load of a marker at `M` of epoch `E`: with `existing-data = "refuse"`
//! and no floor yet, every master is checked for keys (outside `__ferry*`);
//! the floor is set to `loading=M`; each master then deletes this applier's
//! slot checkpoints and (unless `existing-data = "keep"`) every key but the
//! `__ferry*` ones, in one script; the RDB's keys are sent to the masters of
//! their slots (`RESTORE … REPLACE` / `SET`, pipelined in windows of
//! `load-window` commands), functions to every master; finally the floor
//! becomes `applied=M epoch=E`. A crash, a failover or a resharding during
//! the load (any redirection is an error there) finds `loading=M` and loads
//! again from the deletion.
//!
//! # Slot scopes
//!
//! A partition whose markers carry a slot scope (one source shard of a
//! cluster source; module doc of [`super`], "Slot scopes") owns only the
//! keys of its slots: its load deletes, on the masters serving them, only
//! the keys of those slots (`CLUSTER GETKEYSINSLOT` and `UNLINK` per slot,
//! `__ferry*` kept, after `loading=M` is written, so a crash deletes again),
//! never a whole master; its scope is written next to its floor right after
//! `loading=M` and read back by every session; a `FLUSHALL` in its stream
//! deletes the same way once every batch before it has its floor, then the
//! rest of its entry goes as pieces with the floor after them (a crash in
//! between deletes again: idempotent).
//!
//! # Slot tenures
//!
//! A cluster source's resharding is followed as on a standalone target
//! (docs/cluster.md, rules 4 to 6; module doc of [`super`], "Slot
//! tenures"), with the owner map `__ferry:slots:<drainer-id>` in the slot
//! its name hashes to, read from that slot's master at every session's
//! start:
//!
//! - a tagged write is decided by the batch builder against the map (held
//!   HANDOFF while the map is behind its tenure: the batches before it
//!   commit, the floor moves past them, then the slot is read again every
//!   200 ms; BLOCKED when the map has passed it);
//! - a **handoff record** is a barrier: the batch's entries before it are
//!   applied and the floor is moved past them, then the map is raised in
//!   a piece of the map's slot (`WATCH`, `MULTI`, the raise script, that
//!   slot's checkpoint at the record, `EXEC`). Floor first, because a
//!   session resumes from the floor and decides again every entry above
//!   it: an entry of the slot already applied must not meet a map that has
//!   moved on (it would be held BLOCKED). A crash between the raise and the
//!   floor raises again: nothing changes;
//! - a held partition raises ahead, after moving the floor, the handoffs
//!   no entry of their slot precedes (rule 4), as on a standalone target;
//! - a load with tenures takes the marker's handoffs first (their slots'
//!   keys deleted on the masters serving them, then the map raised), waits
//!   (HANDOFF) until the map opens every slot of its tenures to it, writes
//!   `loading=M`, then the slots it claims, deletes and loads only the
//!   slots it takes (the RDB's keys of other slots are not written). A
//!   crash anywhere plans the same load again: the map only rises.
//!
//! # Cost
//!
//! Every piece is `WATCH`, `MULTI`, its commands, `SET`, `EXEC`: with keys
//! spread over the slots, about four extra commands per entry, and a batch
//! waits for the pieces of the one before (no pipelining of one batch
//! behind the `EXEC` of the one before, unlike a standalone target). Debug
//! build, one shared box: 100k `SET`s applied at ~26k entries/s into 3
//! masters against ~51k into a standalone target in the same run; a 200k-key
//! full sync as fast (tests/cluster_target.rs
//! `figures_standalone_vs_cluster_target`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::batch::{self, Batch, Slot as CommandSlot};
use super::checkpoint::Checkpoint;
use super::config::ExistingData;
use super::expire::{self, ExpireGrace};
use super::keyspace::OwnedKeyspace;
use super::snapshot::{client_error, feed_chunks, scopeguard, CHUNK_QUEUE};
use super::status::{RefusedCommand, SnapshotLoadProgress};
use super::target::Target;
use super::tenure;
use super::{stream_command, Applier, ApplyError, Feed, ReplyError};
use crate::backoff::Backoff;
use crate::position::LogId;
use crate::record::{Record, SlotHandoff, SnapshotMarker, INTERNAL_PREFIX};
use crate::redis::cluster::{discover, SlotRanges, Topology};
use crate::redis::command::{self, key_hash_slot, Command, CommandError, CLUSTER_SLOTS};
use crate::redis::rdb::rebuild::{Output, RebuildOptions, RebuildStats, Rebuilder};
use crate::redis::rdb::{ParseOptions, RdbEvent, RdbParser};
use crate::redis::rdb_stream::ChannelReader;
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;

const SLOTS: usize = CLUSTER_SLOTS as usize;
/// No master serves the slot (in the map).
const NO_NODE: usize = usize::MAX;
/// Commands handed from the load's parser thread to the router at a time.
const LOAD_CHUNK: usize = 256;
/// The floor is written at most this long after the pieces it covers
/// committed (sooner when idle, before a barrier or a load, on shutdown).
const FLOOR_INTERVAL: Duration = Duration::from_millis(200);
/// How long the floor waits for the replicas of the masters it covers.
const FLOOR_WAIT_MS: u64 = 1000;
/// Refused snapshot commands logged one by one per load.
const LOGGED_REFUSALS: u64 = 10;

/// The slot checkpoint key of slot `slot` for the floor key `floor`.
pub(crate) fn slot_checkpoint_key(floor: &[u8], slot: u16) -> Bytes {
    let mut key = floor.to_vec();
    key.push(b':');
    key.extend_from_slice(crate::redis::cluster::tag_for_slot(slot).as_bytes());
    Bytes::from(key)
}

/// Whether a refusal says the slot is elsewhere or unavailable for now.
fn is_redirect(error: &str) -> bool {
    let code = error.split(' ').next().unwrap_or("");
    matches!(code, "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN")
}

/// Whether any of `seeds` is a cluster node (the first that answers says).
pub(crate) async fn detect(seeds: &[RedisUrl]) -> Result<bool, ApplyError> {
    let mut errors = Vec::new();
    for seed in seeds {
        match crate::redis::cluster::is_cluster(seed).await {
            Ok(found) => return Ok(found),
            Err(error) => errors.push(error.to_string()),
        }
    }
    Err(ApplyError::Topology(format!(
        "no target address answered: {}",
        errors.join("; ")
    )))
}

/// One master of the target and this session's connection to it.
struct Node {
    id: String,
    addr: String,
    target: Target,
    /// Replicas of this master in the topology (`WAIT` for them before the
    /// floor moves past pieces sent here).
    replicas: usize,
    /// Pieces were committed here since the floor was last written.
    touched: bool,
}

/// The target cluster as one session sees it.
struct ClusterTarget {
    nodes: Vec<Node>,
    /// Index in `nodes` of the master of each slot.
    owner: Vec<usize>,
    /// Where to discover the topology again: the seeds, then every node
    /// seen.
    seeds: Vec<RedisUrl>,
    template: RedisUrl,
    /// The end of the last segment whose pieces all committed, when the
    /// floor is not written up to it yet.
    pending_floor: Option<LogId>,
    /// When the floor was last written.
    floor_written: Instant,
}

impl ClusterTarget {
    async fn connect(
        seeds: Vec<RedisUrl>,
        connect_timeout: Duration,
        reply_timeout: Duration,
    ) -> Result<ClusterTarget, ApplyError> {
        let template = seeds
            .first()
            .cloned()
            .ok_or_else(|| ApplyError::Topology("no target address".into()))?;
        let topology = read_map(&seeds, reply_timeout).await?;
        let mut nodes = Vec::new();
        for shard in topology.shards() {
            let url = Topology::url_for(&shard.master, &template);
            let target = Target::connect(&url, connect_timeout, reply_timeout).await?;
            nodes.push(Node {
                id: shard.master.id.clone(),
                addr: shard.master.addr.clone(),
                target,
                replicas: shard.replicas.iter().filter(|r| !r.failing).count(),
                touched: false,
            });
        }
        let mut cluster = ClusterTarget {
            nodes,
            owner: vec![NO_NODE; SLOTS],
            seeds,
            template,
            pending_floor: None,
            floor_written: Instant::now(),
        };
        cluster.remap(&topology)?;
        Ok(cluster)
    }

    /// Rebuilds the slot map from `topology`; a master this session has no
    /// connection to is [`ApplyError::Topology`].
    fn remap(&mut self, topology: &Topology) -> Result<(), ApplyError> {
        let mut owner = vec![NO_NODE; SLOTS];
        for shard in topology.shards() {
            let Some(index) = self.nodes.iter().position(|n| n.id == shard.master.id) else {
                return Err(ApplyError::Topology(format!(
                    "{} became a master of slots {} during the session; starting a new one",
                    shard.master.addr,
                    shard.slots()
                )));
            };
            self.nodes[index].replicas = shard.replicas.iter().filter(|r| !r.failing).count();
            for &(first, last) in shard.slots().ranges() {
                for slot in first..=last {
                    owner[usize::from(slot)] = index;
                }
            }
        }
        self.owner = owner;
        // Every node seen is a seed of the next discovery.
        for node in &topology.nodes {
            let url = Topology::url_for(node, &self.template);
            if !self.seeds.iter().any(|s| s.addr() == url.addr()) {
                self.seeds.push(url);
            }
        }
        Ok(())
    }

    async fn refresh(&mut self) -> Result<(), ApplyError> {
        let timeout = self
            .nodes
            .first()
            .map_or(Duration::from_secs(5), |n| n.target.reply_timeout);
        let topology = read_map(&self.seeds, timeout).await?;
        self.remap(&topology)
    }

    fn node_of(&self, slot: u16) -> Result<usize, ApplyError> {
        match self.owner[usize::from(slot)] {
            NO_NODE => Err(ApplyError::Topology(format!(
                "no master serves slot {slot}"
            ))),
            index => Ok(index),
        }
    }

    fn describe(&self) -> String {
        let addrs: Vec<&str> = self.nodes.iter().map(|n| n.addr.as_str()).collect();
        format!(
            "cluster: {} masters ({})",
            self.nodes.len(),
            addrs.join(", ")
        )
    }
}

async fn read_map(seeds: &[RedisUrl], timeout: Duration) -> Result<Topology, ApplyError> {
    tokio::time::timeout(timeout, discover(seeds))
        .await
        .map_err(|_| ApplyError::Timeout(timeout))?
        .map_err(|error| ApplyError::Topology(error.to_string()))
}

/// Where one command of a batch goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// To the master of the slot (a command cut per slot gives several).
    Slot(u16, Command),
    /// To every master (`FLUSHALL`'s script, `FUNCTION ...`).
    Every(Command),
    /// Once, in the floor's transaction (`PUBLISH`).
    Floor(Command),
}

/// Commands whose every argument after the name is a key of its own.
const KEY_LIST: [&str; 4] = ["DEL", "UNLINK", "TOUCH", "EXISTS"];
/// Commands of key/value pairs.
const PAIRS: [&str; 2] = ["MSET", "MSETNX"];

/// Routes `cmd` (`streamed`: it has streamed arguments, which stay where
/// they are only when it is not cut). `Err` says why it cannot be applied
/// on a cluster.
fn route(cmd: &Command, streamed: bool) -> Result<Vec<Route>, String> {
    if cmd.is("PUBLISH") {
        return Ok(vec![Route::Floor(cmd.clone())]);
    }
    match command::command_slot(cmd) {
        Ok(Some(slot)) => Ok(vec![Route::Slot(slot, cmd.clone())]),
        Ok(None) => Ok(vec![Route::Every(cmd.clone())]),
        Err(CommandError::CrossSlot { .. }) if streamed => Err(
            "names keys of several target slots and has streamed arguments: it cannot be cut per slot"
                .into(),
        ),
        Err(CommandError::CrossSlot { .. }) => {
            let name = cmd.name();
            let mut by_slot: BTreeMap<u16, Vec<Bytes>> = BTreeMap::new();
            if KEY_LIST.iter().any(|n| cmd.is(n)) {
                for key in &cmd.args[1..] {
                    by_slot.entry(key_hash_slot(key)).or_default().push(key.clone());
                }
            } else if PAIRS.iter().any(|n| cmd.is(n)) && cmd.args.len() % 2 == 1 {
                for pair in cmd.args[1..].chunks(2) {
                    let entry = by_slot.entry(key_hash_slot(&pair[0])).or_default();
                    entry.extend(pair.iter().cloned());
                }
            } else {
                return Err(format!(
                    "names keys of several target slots and cannot be cut per slot (a cluster \
                     runs it only within one slot); {} of a standalone source has no cluster \
                     equivalent",
                    batch::command_name(cmd)
                ));
            }
            Ok(by_slot
                .into_iter()
                .map(|(slot, rest)| {
                    let mut args = Vec::with_capacity(rest.len() + 1);
                    args.push(Bytes::copy_from_slice(name));
                    args.extend(rest);
                    Route::Slot(slot, Command::new(args))
                })
                .collect())
        }
        Err(error) => Err(format!("cannot be routed to a target slot: {error}")),
    }
}

/// A command of a piece: the entry it belongs to, and its index in the
/// batch's commands when it is sent as it is there (for streamed
/// arguments).
#[derive(Debug, Clone)]
struct PieceCommand {
    log_id: LogId,
    cmd: Command,
    source: Option<usize>,
}

/// One entry's commands, routed.
struct Routed {
    log_id: LogId,
    routes: Vec<(Route, Option<usize>)>,
}

impl Routed {
    fn keyless(&self) -> bool {
        self.routes
            .iter()
            .any(|(r, _)| !matches!(r, Route::Slot(..)))
    }

    fn keyed(&self) -> bool {
        self.routes
            .iter()
            .any(|(r, _)| matches!(r, Route::Slot(..)))
    }

    fn slot_count(&self) -> usize {
        let mut slots: Vec<u16> = self
            .routes
            .iter()
            .filter_map(|(r, _)| match r {
                Route::Slot(s, _) => Some(*s),
                _ => None,
            })
            .collect();
        slots.sort_unstable();
        slots.dedup();
        slots.len()
    }
}

/// The outcome of one piece's `EXEC`.
enum PieceOutcome {
    Committed {
        applied: u64,
        refused: Vec<RefusedCommand>,
    },
    /// Nothing ran; send it again after a new map (and backoff).
    Redirect(String),
}

/// The last committed log id of each slot, for the floor's log and epoch
/// (`LogId::ZERO`: nothing above the floor).
struct SlotTable(Vec<LogId>);

impl SlotTable {
    fn reset(&mut self) {
        self.0.iter_mut().for_each(|id| *id = LogId::ZERO);
    }
}

impl Applier {
    /// A session against a cluster target: discover, fence every master,
    /// read the floor and the slot checkpoints, then apply until shutdown or
    /// the first error.
    /// Starts a foreign-write sampler ([`super::foreign`]) for each master
    /// of `cluster` no other applier of this process samples; dropping the
    /// guards stops them.
    fn sample_foreign_writes(
        &self,
        cluster: &ClusterTarget,
    ) -> Vec<(super::foreign::Claim, tokio_util::sync::DropGuard)> {
        if self.cfg.foreign_writes_every.0.is_zero() {
            return Vec::new();
        }
        let mut guards = Vec::new();
        for node in &cluster.nodes {
            let Ok(mut url) = RedisUrl::parse(&format!("redis://{}", node.addr)) else {
                continue;
            };
            url.user = cluster.template.user.clone();
            url.password = cluster.template.password.clone();
            let Some(claim) = super::foreign::claim(&node.addr) else {
                continue;
            };
            let cancel = self.shutdown.child_token();
            tokio::spawn(super::foreign::run(
                url,
                self.cfg.foreign_writes_every.0,
                self.cfg.foreign_writes_window.0,
                Arc::clone(&self.status),
                cancel.clone(),
            ));
            guards.push((claim, cancel.drop_guard()));
        }
        guards
    }

    pub(super) async fn cluster_session(
        &mut self,
        last_error: &mut Option<String>,
    ) -> Result<(), ApplyError> {
        let mut seeds = self.cfg.target_seeds()?;
        for known in &self.cluster_nodes {
            if !seeds.iter().any(|s| s.addr() == known.addr()) {
                seeds.push(known.clone());
            }
        }
        let shutdown = self.shutdown.clone();
        let connect = async {
            let mut cluster =
                ClusterTarget::connect(seeds, self.cfg.connect_timeout.0, self.cfg.reply_timeout.0)
                    .await?;
            // Before any checkpoint is read: whatever an earlier connection
            // still has queued at any master is discarded.
            let mut unavailable = Vec::new();
            for node in &mut cluster.nodes {
                node.target.stall_watch = Some(super::target::StallWatch {
                    status: Arc::clone(&self.status),
                    target: node.addr.clone(),
                });
                match super::fence::fence(&mut node.target, &self.client_name).await? {
                    super::fence::Fence::Closed(closed) if closed > 0 => {
                        info!(partition = %self.partition, node = %node.addr, closed, "closed earlier connections of this applier at a target master");
                    }
                    super::fence::Fence::Closed(_) => {}
                    super::fence::Fence::Unavailable(why) => {
                        unavailable.push(format!("{}: {why}", node.addr));
                    }
                }
            }
            // One master without the fence is enough for the session to be
            // guarded by WATCH alone there.
            if unavailable.is_empty() {
                self.status.set_fence("client-kill".to_string());
                self.fence_warned = None;
            } else {
                let why = unavailable.join("; ");
                if self.fence_warned.as_deref() != Some(why.as_str()) {
                    warn!(partition = %self.partition, reason = %why, "cannot close earlier connections at some target masters (CLIENT not allowed); guarded by WATCH alone there");
                    self.fence_warned = Some(why.clone());
                }
                self.status.set_fence(format!("watch-only: {why}"));
            }
            let floor = self.read_floor(&mut cluster).await?;
            let slots = self.read_slot_checkpoints(&mut cluster, floor).await?;
            let scope_node = cluster.node_of(key_hash_slot(&self.scope_key))?;
            let scope = cluster.nodes[scope_node]
                .target
                .read_scope(&self.scope_key)
                .await?;
            let owners = read_owners(&mut cluster, &self.owners_key).await?;
            Ok::<_, ApplyError>((cluster, floor, slots, scope, owners))
        };
        let (mut cluster, floor, mut table, scope, owners) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            connected = connect => connected?,
        };
        self.owners = owners;
        // Only with a floor of this partition: its scope goes with the data
        // the floor describes.
        self.scope = if floor.is_some() { scope } else { None };
        self.cluster_nodes = cluster.seeds.clone();
        self.status.set_cluster(Some(cluster.describe()));
        // Writes ferry did not make, sampled on every master of this
        // session (each by one applier of this process: `foreign::claim`);
        // the samplers end with the session.
        let _samplers = self.sample_foreign_writes(&cluster);
        let (resume, marker_first) = self.reconcile(floor).await?;
        if marker_first {
            table.reset();
        }
        self.passed(resume);
        self.status.set_online();
        let above = table.0.iter().filter(|id| **id > LogId::ZERO).count();
        if last_error.take().is_some() {
            info!(partition = %self.partition, resume = %resume, slots_above_floor = above, "target cluster reachable again; applying");
        } else {
            info!(partition = %self.partition, resume = %resume, ?floor, slots_above_floor = above, masters = cluster.nodes.len(), "applying to a cluster");
        }
        let cancel = self.shutdown.child_token();
        let _stop_reader = cancel.clone().drop_guard();
        let (mut feed, _reader) = self.start_feed(resume, marker_first, false, cancel);
        self.cluster_loop(&mut cluster, &mut feed, &mut table).await
    }

    async fn read_floor(
        &mut self,
        cluster: &mut ClusterTarget,
    ) -> Result<Option<Checkpoint>, ApplyError> {
        let node = cluster.node_of(key_hash_slot(&self.key))?;
        match cluster.nodes[node].target.read_checkpoint(&self.key).await {
            Err(ApplyError::Client(crate::redis::client::ClientError::Server {
                message, ..
            })) if is_redirect(&message) => Err(ApplyError::Topology(format!(
                "reading the floor checkpoint: {message}"
            ))),
            other => other,
        }
    }

    /// Reads every slot checkpoint (one pipeline of `GET`s per master; a
    /// key of a migrating slot already moved is read with `ASKING` from the
    /// importing master). Values of another log or epoch than the floor's
    /// count as nothing above it.
    async fn read_slot_checkpoints(
        &mut self,
        cluster: &mut ClusterTarget,
        floor: Option<Checkpoint>,
    ) -> Result<SlotTable, ApplyError> {
        let mut table = SlotTable(vec![LogId::ZERO; SLOTS]);
        let Some(Checkpoint::Applied { epoch, log, .. }) = floor else {
            return Ok(table);
        };
        let mut asked: Vec<(u16, String)> = Vec::new();
        let accept = |value: &Bytes, table: &mut SlotTable, slot: u16| -> Result<(), ApplyError> {
            if let Checkpoint::Applied {
                log_id,
                epoch: e,
                log: l,
                ..
            } = Checkpoint::decode(value)?
            {
                if e == epoch && l == log {
                    table.0[usize::from(slot)] = log_id;
                }
            }
            Ok(())
        };
        for index in 0..cluster.nodes.len() {
            let slots: Vec<u16> = (0..CLUSTER_SLOTS)
                .filter(|&s| cluster.owner[usize::from(s)] == index)
                .collect();
            let target = &mut cluster.nodes[index].target;
            for &slot in &slots {
                target.client.queue(&Command::new(vec![
                    Bytes::from_static(b"GET"),
                    slot_checkpoint_key(&self.key, slot),
                ]));
            }
            target.flush().await?;
            for &slot in &slots {
                match target.reply().await? {
                    Frame::Null => {}
                    Frame::Bulk(value) => accept(&value, &mut table, slot)?,
                    Frame::Error(error) if error.starts_with(b"ASK ") => {
                        let text = String::from_utf8_lossy(&error).into_owned();
                        let addr = text.split(' ').nth(2).unwrap_or("").to_string();
                        asked.push((slot, addr));
                    }
                    other => {
                        return Err(ApplyError::Topology(format!(
                            "reading the checkpoint of slot {slot}: {other:?}"
                        )))
                    }
                }
            }
        }
        for (slot, addr) in asked {
            let Some(node) = cluster.nodes.iter_mut().find(|n| n.addr == addr) else {
                return Err(ApplyError::Topology(format!(
                    "slot {slot} is migrating to {addr}, a master this session does not know"
                )));
            };
            node.target.call(&["ASKING"]).await?;
            let get = Command::new(vec![
                Bytes::from_static(b"GET"),
                slot_checkpoint_key(&self.key, slot),
            ]);
            if let Frame::Bulk(value) = node.target.call_command(&get).await? {
                accept(&value, &mut table, slot)?;
            }
        }
        Ok(table)
    }

    async fn cluster_loop(
        &mut self,
        cluster: &mut ClusterTarget,
        feed: &mut Feed,
        table: &mut SlotTable,
    ) -> Result<(), ApplyError> {
        let mut builder = self.builder(&cluster.nodes[0].target);
        // A cluster has db 0 only.
        builder.databases = 1;
        // Two-way sync: a silent batch not written yet, and since when
        // (module doc of [`super`], "Two-way sync").
        let mut silent: Option<(Batch, tokio::time::Instant)> = None;
        let silent_flush = super::SILENT_FLUSH.min(self.wal.config().wal_ttl.0 / 4);
        loop {
            feed.take_ready()?;
            if self.shutdown.is_cancelled() {
                self.flush_floor(cluster).await?;
                return Ok(());
            }
            // Entries of an aborted import's tenure are voided (rule 9).
            self.find_voids(&mut builder, &feed.pending)?;
            if let Some(batch) = builder.build(&mut feed.pending, self.epoch, self.hold().as_ref())
            {
                if let Some(refused) = batch.refused {
                    self.status.set_last_refused(refused.clone());
                    return Err(ApplyError::Refused {
                        refused,
                        transient: false,
                    });
                }
                self.status.add_echoes(batch.echoes);
                if self.cfg.two_way_peers.is_some() && batch.is_silent() {
                    // Its floor would be echoed by the other side, whose
                    // silent batch would be echoed here: kept back until a
                    // batch with data covers it, or `silent_flush` passed.
                    let since = silent
                        .take()
                        .map_or_else(tokio::time::Instant::now, |(_, at)| at);
                    self.status.set_applied(batch.last, self.epoch);
                    silent = Some((batch, since));
                    continue;
                }
                silent = None;
                // Every batch before it committed: a flush of a scoped
                // partition deletes its slots' keys now (idempotent: a crash
                // before its floor runs it again).
                if !batch.scope_delete.is_empty() {
                    let Some(scope) = self.scope.clone() else {
                        return Err(ApplyError::Task("a scoped flush without a scope".into()));
                    };
                    // With slot tenures the shard's keys are those of the
                    // slots the owner map gives this partition now.
                    self.owners = read_owners(cluster, &self.owners_key).await?;
                    let scope = tenure::flush_slots(&scope, &self.owners, self.partition.0);
                    let deleted = tokio::select! {
                        _ = self.shutdown.cancelled() => return Ok(()),
                        deleted = delete_slots(cluster, &scope, &self.keyspace) => deleted?,
                    };
                    info!(partition = %self.partition, log_id = %batch.last, %scope, deleted, "a flush of the source shard: deleted the keys of its slots on every master");
                }
                if !self.cluster_batch(cluster, &batch, table).await? {
                    return Ok(()); // shut down while held
                }
                self.report_voided(&batch);
                continue;
            }
            if let Some(front) = feed.pending.front() {
                if let Record::Snapshot(marker) = &front.record {
                    let (log_id, marker) = (front.log_id, marker.clone());
                    feed.pending.pop_front();
                    // The load's floor covers a silent batch before it.
                    silent = None;
                    // The load rewrites the floor (`loading=M`, `applied=M`).
                    self.flush_floor(cluster).await?;
                    if !self.cluster_load(cluster, table, log_id, marker).await? {
                        return Ok(());
                    }
                    // The marker's scope is the partition's from now on,
                    // and the load may have changed the owner map.
                    builder.scope = self.scope.clone();
                    if let Some(tenures) = &mut builder.tenures {
                        tenures.map = self.owners.clone();
                    }
                    self.passed(log_id.next());
                    continue;
                }
            }
            // Idle: the floor catches up before waiting.
            self.flush_floor(cluster).await?;
            // Everything before it is applied and below the floor (a
            // replay never decides an applied entry again against a map
            // raised since): the next entry waits for a slot handoff of
            // another partition.
            if let Some(wait) = builder.tenure_wait(&feed.pending) {
                feed.take_ahead(tenure::HOLD_LOOKAHEAD_ENTRIES, tenure::HOLD_LOOKAHEAD_BYTES)?;
                let node = cluster.node_of(key_hash_slot(&self.owners_key))?;
                let target = &mut cluster.nodes[node].target;
                self.raise_handoffs_ahead(target, &mut builder, &feed.pending, wait.log_id)
                    .await?;
                if !self.wait_for_tenure(target, &mut builder, wait).await? {
                    return Ok(()); // shut down while held
                }
                continue;
            }
            let flush_at = silent.as_ref().map(|(_, since)| *since + silent_flush);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = super::sleep_until_some(flush_at) => {
                    if let Some((batch, _)) = silent.take() {
                        if !self.cluster_batch(cluster, &batch, table).await? {
                            return Ok(()); // shut down while held
                        }
                    }
                }
                run = feed.runs.recv() => {
                    if run.is_none() && self.shutdown.is_cancelled() {
                        return Ok(());
                    }
                    feed.accept(run)?
                }
            }
        }
    }

    fn checkpoint_at(&self, log_id: LogId) -> Bytes {
        Bytes::from(
            Checkpoint::Applied {
                log_id,
                epoch: self.epoch,
                log: self.log_tag,
                source: None,
            }
            .encode(),
        )
    }

    /// Applies `batch`: its segments (runs of entries between barriers), each
    /// as pieces per slot then the floor. `false`: shut down while a piece
    /// was held.
    async fn cluster_batch(
        &mut self,
        cluster: &mut ClusterTarget,
        batch: &Batch,
        table: &mut SlotTable,
    ) -> Result<bool, ApplyError> {
        if let Some(skip) = &batch.skip {
            self.record_skip(batch).await?;
            warn!(
                partition = %self.partition,
                log_id = %skip.log_id,
                command = %skip.refused.command,
                error = %skip.refused.error,
                by = ?skip.by,
                "entry skipped; it is recorded in the dead-letter file (pieces of it already \
                 committed in other slots stay)"
            );
            self.status.add_skipped(skip.log_id);
            self.floor_reached(batch.last, 0, Vec::new(), batch.skipped, 0);
            self.flush_floor_at(cluster, batch.last).await?;
            return Ok(true);
        }
        // The data commands of each entry, in order.
        let mut entries: Vec<(LogId, Vec<usize>)> = Vec::new();
        for (index, slot) in batch.slots.iter().enumerate() {
            if let CommandSlot::Data { log_id } = slot {
                match entries.last_mut() {
                    Some((id, commands)) if id == log_id => commands.push(index),
                    _ => entries.push((*log_id, vec![index])),
                }
            }
        }
        let mut start = batch.first;
        let mut segment: Vec<Routed> = Vec::new();
        let mut skipped = batch.skipped;
        let mut handoffs = batch.handoffs.iter().copied().peekable();
        // Each entry, then the end of the batch (`None`).
        for next in entries.into_iter().map(Some).chain([None]) {
            // The batch's slot handoffs before it.
            let before = |at: &LogId| next.as_ref().map_or(true, |(log_id, _)| at < log_id);
            while let Some((at, handoff)) = handoffs.next_if(|(at, _)| before(at)) {
                if !self
                    .handoff_barrier(
                        cluster,
                        batch,
                        table,
                        &mut start,
                        &mut segment,
                        &mut skipped,
                        at,
                        handoff,
                    )
                    .await?
                {
                    return Ok(false);
                }
            }
            let Some((log_id, commands)) = next else {
                break;
            };
            let mut routes = Vec::new();
            let mut refusal = None;
            for &index in &commands {
                let cmd = &batch.commands[index];
                let streamed = batch.streams.iter().any(|p| p.command == index);
                match route(cmd, streamed) {
                    Ok(routed) => {
                        let whole = routed.len() == 1;
                        routes.extend(routed.into_iter().map(|r| (r, whole.then_some(index))));
                    }
                    Err(why) => {
                        refusal = Some((batch::command_name(cmd), why));
                        break;
                    }
                }
            }
            let entry = Routed { log_id, routes };
            if refusal.is_none()
                && self.cfg.two_way_peers.is_some()
                && entry
                    .routes
                    .iter()
                    .any(|(r, _)| matches!(r, Route::Every(_)))
            {
                refusal = Some((
                    batch::command_name(&batch.commands[commands[0]]),
                    "two-way sync into a cluster refuses commands without keys (FUNCTION, ...): \
                     run on every master of this side, they would come back from the masters \
                     whose transaction holds no checkpoint. The entry is held (ferry skip passes \
                     it over); run it on both sides by hand"
                        .to_string(),
                ));
            }
            if refusal.is_none() && entry.keyless() && entry.keyed() {
                refusal = Some((
                    batch::command_name(&batch.commands[commands[0]]),
                    "a transaction mixing commands without keys (FLUSHALL, FUNCTION, ...) with key \
                     commands cannot keep its order over the masters of a cluster"
                        .to_string(),
                ));
            }
            if let Some((command, why)) = refusal {
                // Everything before it first; then it is held.
                if log_id > start {
                    let segment = std::mem::take(&mut segment);
                    if !self
                        .apply_segment(cluster, batch, table, log_id.prev(), segment, skipped)
                        .await?
                    {
                        return Ok(false);
                    }
                }
                let refused = RefusedCommand {
                    log_id,
                    command,
                    error: format!("ERR ferry: {why}"),
                };
                self.status.set_last_refused(refused.clone());
                return Err(ApplyError::Refused {
                    refused,
                    transient: false,
                });
            }
            if entry.keyless() {
                if log_id > start {
                    let before = std::mem::take(&mut segment);
                    if !self
                        .apply_segment(cluster, batch, table, log_id.prev(), before, skipped)
                        .await?
                    {
                        return Ok(false);
                    }
                    skipped = 0;
                }
                self.flush_floor(cluster).await?;
                self.apply_barrier(cluster, entry).await?;
                start = log_id.next();
                continue;
            }
            segment.push(entry);
        }
        if start <= batch.last {
            return self
                .apply_segment(cluster, batch, table, batch.last, segment, skipped)
                .await;
        }
        Ok(true)
    }

    /// A slot handoff record at `log_id` of a batch (docs/cluster.md, rule
    /// 5): the batch's entries before it are applied and the floor moved
    /// past them first, so that no entry of its slot is left to apply (or
    /// to decide again after a crash, against a map that has moved on);
    /// then the map is raised in a piece of the map's own slot, with that
    /// slot's checkpoint at `log_id`. A crash before the floor passes the
    /// record raises it again, which changes nothing. `false`: shut down.
    #[allow(clippy::too_many_arguments)]
    async fn handoff_barrier(
        &mut self,
        cluster: &mut ClusterTarget,
        batch: &Batch,
        table: &mut SlotTable,
        start: &mut LogId,
        segment: &mut Vec<Routed>,
        skipped: &mut u64,
        log_id: LogId,
        handoff: SlotHandoff,
    ) -> Result<bool, ApplyError> {
        if log_id > *start {
            let before = std::mem::take(segment);
            if !self
                .apply_segment(cluster, batch, table, log_id.prev(), before, *skipped)
                .await?
            {
                return Ok(false);
            }
            *skipped = 0;
        }
        self.flush_floor(cluster).await?;
        let owner = tenure::Owner {
            partition: handoff.to,
            gen: handoff.gen,
        };
        let slot = key_hash_slot(&self.owners_key);
        if log_id > table.0[usize::from(slot)] {
            let node = cluster.node_of(slot)?;
            let piece = [PieceCommand {
                log_id,
                cmd: tenure::raise_command(&self.owners_key, &[(handoff.slot, owner)]),
                source: None,
            }];
            let value = self.checkpoint_at(log_id);
            let target = &mut cluster.nodes[node].target;
            self.queue_piece(target, batch, slot, &piece, &value)
                .await?;
            target.flush().await?;
            match read_piece(target, &piece, slot).await? {
                PieceOutcome::Committed { refused, .. } => {
                    if let Some(refused) = refused.into_iter().next() {
                        return Err(ApplyError::Reply(ReplyError::InternalRefused {
                            command: "the owner map's raise".into(),
                            error: refused.error,
                        }));
                    }
                }
                PieceOutcome::Redirect(why) => {
                    return Err(ApplyError::Topology(format!(
                        "the owner map's slot {slot}, raising slot {} for a handoff: {why}",
                        handoff.slot
                    )))
                }
            }
            table.0[usize::from(slot)] = log_id;
            cluster.nodes[node].touched = true;
        }
        self.owners.raise(handoff.slot, owner);
        info!(partition = %self.partition, %log_id, slot = handoff.slot, to = handoff.to, gen = handoff.gen, "slot handed over: the owner map moved");
        self.floor_reached(log_id, 0, Vec::new(), 0, 0);
        self.floor_due(cluster, log_id).await?;
        *start = log_id.next();
        Ok(true)
    }

    /// The status and the WAL marks once the floor is at `floor`.
    fn floor_reached(
        &mut self,
        floor: LogId,
        applied: u64,
        refused: Vec<RefusedCommand>,
        skipped: u64,
        split: u64,
    ) {
        self.passed(floor.next());
        for refused in &refused {
            warn!(
                partition = %self.partition,
                log_id = %refused.log_id,
                command = %refused.command,
                error = %refused.error,
                "the target refused a command; it is not retried"
            );
            self.status.set_last_refused(refused.clone());
        }
        self.status
            .add_counts(applied, refused.len() as u64, skipped);
        if split > 0 {
            self.status.add_split_entries(split);
        }
        self.status.set_applied(floor, self.epoch);
        // Past any hold for a handoff.
        self.status.clear_handoff();
        self.status.set_online();
        self.progressed = true;
    }

    /// Every piece up to `end` committed: the floor moves there at the
    /// latest [`FLOOR_INTERVAL`] after its last write (sooner when idle,
    /// before a barrier or a load, on shutdown).
    async fn floor_due(
        &mut self,
        cluster: &mut ClusterTarget,
        end: LogId,
    ) -> Result<(), ApplyError> {
        cluster.pending_floor = Some(end);
        if cluster.floor_written.elapsed() >= FLOOR_INTERVAL {
            self.flush_floor(cluster).await?;
        }
        Ok(())
    }

    /// Moves the floor to `end` now (a skip: no piece to wait for).
    async fn flush_floor_at(
        &mut self,
        cluster: &mut ClusterTarget,
        end: LogId,
    ) -> Result<(), ApplyError> {
        cluster.pending_floor = Some(end);
        self.flush_floor(cluster).await
    }

    /// Writes the pending floor, after `WAIT`ing (up to
    /// [`FLOOR_WAIT_MS`]) for the replicas of every master that got pieces
    /// since the last floor, so that a replica promoted after a crash of its
    /// master holds every piece below the floor; the WAL's applied mark and
    /// ack follow the floor.
    async fn flush_floor(&mut self, cluster: &mut ClusterTarget) -> Result<(), ApplyError> {
        let Some(end) = cluster.pending_floor else {
            return Ok(());
        };
        let wait_ms = FLOOR_WAIT_MS.to_string();
        let mut waiting = Vec::new();
        for (index, node) in cluster.nodes.iter_mut().enumerate() {
            if node.touched && node.replicas > 0 {
                let replicas = node.replicas.to_string();
                node.target.client.queue(&Command::from_parts([
                    "WAIT",
                    replicas.as_str(),
                    wait_ms.as_str(),
                ]));
                node.target.flush().await?;
                waiting.push(index);
            }
        }
        for index in waiting {
            let node = &mut cluster.nodes[index];
            let acked = node.target.reply().await?.as_integer().unwrap_or(0);
            if acked < node.replicas as i64 {
                warn!(
                    partition = %self.partition,
                    node = %node.addr,
                    acked,
                    replicas = node.replicas,
                    "not every replica of a target master acknowledged its pieces in time; the \
                     floor moves anyway (a crash of that master now may lose them)"
                );
            }
        }
        self.write_floor(cluster, end).await?;
        for node in &mut cluster.nodes {
            node.touched = false;
        }
        cluster.pending_floor = None;
        cluster.floor_written = Instant::now();
        let _ = self.applied_tx.send(end);
        Ok(())
    }

    /// Applies the entries of `segment` (all keyed) up to `end` as one piece
    /// per slot, then sets the floor to `end`.
    async fn apply_segment(
        &mut self,
        cluster: &mut ClusterTarget,
        batch: &Batch,
        table: &mut SlotTable,
        end: LogId,
        segment: Vec<Routed>,
        skipped: u64,
    ) -> Result<bool, ApplyError> {
        let mut pieces: BTreeMap<u16, Vec<PieceCommand>> = BTreeMap::new();
        let mut split = 0u64;
        for entry in segment {
            if entry.slot_count() > 1 {
                split += 1;
            }
            for (route, source) in entry.routes {
                if let Route::Slot(slot, cmd) = route {
                    if entry.log_id > table.0[usize::from(slot)] {
                        pieces.entry(slot).or_default().push(PieceCommand {
                            log_id: entry.log_id,
                            cmd,
                            source,
                        });
                    }
                }
            }
        }
        let value = self.checkpoint_at(end);
        let mut todo: Vec<(u16, Vec<PieceCommand>)> = pieces.into_iter().collect();
        let mut applied = 0u64;
        let mut refused = Vec::new();
        let mut backoff = Backoff::new(self.cfg.retry_backoff_min.0, self.cfg.retry_backoff_max.0);
        let mut waited = false;
        while !todo.is_empty() {
            let mut by_node: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (i, (slot, _)) in todo.iter().enumerate() {
                by_node.entry(cluster.node_of(*slot)?).or_default().push(i);
            }
            for (&node, indices) in &by_node {
                let target = &mut cluster.nodes[node].target;
                for &i in indices {
                    let (slot, commands) = &todo[i];
                    self.queue_piece(target, batch, *slot, commands, &value)
                        .await?;
                }
                target.flush().await?;
            }
            let mut again = Vec::new();
            let mut redirect: Option<(u16, String)> = None;
            for (&node, indices) in &by_node {
                for &i in indices {
                    let (slot, commands) = &todo[i];
                    let target = &mut cluster.nodes[node].target;
                    match read_piece(target, commands, *slot).await? {
                        PieceOutcome::Committed {
                            applied: n,
                            refused: r,
                        } => {
                            applied += n;
                            refused.extend(r);
                            table.0[usize::from(*slot)] = end;
                            cluster.nodes[node].touched = true;
                        }
                        PieceOutcome::Redirect(why) => {
                            redirect.get_or_insert((*slot, why));
                            again.push(i);
                        }
                    }
                }
            }
            let Some((slot, why)) = redirect else { break };
            let mut rest = Vec::with_capacity(again.len());
            for (i, piece) in todo.into_iter().enumerate() {
                if again.contains(&i) {
                    rest.push(piece);
                }
            }
            todo = rest;
            let moved_only = why.starts_with("MOVED");
            self.status.set_cluster(Some(format!(
                "{}; waiting on slot {slot}: {why}",
                cluster.describe()
            )));
            if waited || !moved_only {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            waited = true;
            cluster.refresh().await?;
        }
        if waited {
            self.cluster_nodes = cluster.seeds.clone();
            self.status.set_cluster(Some(cluster.describe()));
        }
        self.floor_reached(end, applied, refused, skipped, split);
        self.floor_due(cluster, end).await?;
        Ok(true)
    }

    /// Queues `WATCH`, `MULTI`, the piece's commands and its checkpoint
    /// `SET`, and `EXEC` on `target`.
    async fn queue_piece(
        &self,
        target: &mut Target,
        batch: &Batch,
        slot: u16,
        commands: &[PieceCommand],
        value: &Bytes,
    ) -> Result<(), ApplyError> {
        let key = slot_checkpoint_key(&self.key, slot);
        target.client.queue(&Command::new(vec![
            Bytes::from_static(b"WATCH"),
            key.clone(),
        ]));
        target.client.queue(&Command::from_parts(["MULTI"]));
        for piece in commands {
            let places: Vec<&batch::StreamedPlace> = match piece.source {
                Some(index) => batch
                    .streams
                    .iter()
                    .filter(|p| p.command == index)
                    .collect(),
                None => Vec::new(),
            };
            if places.is_empty() {
                target.client.queue(&piece.cmd);
            } else {
                if let Some(limit) = target.max_bulk_len {
                    if let Some(place) = places.iter().find(|p| p.len > limit) {
                        return Err(ApplyError::Refused {
                            refused: RefusedCommand {
                                log_id: piece.log_id,
                                command: batch::command_name(&piece.cmd),
                                error: format!(
                                    "ERR an argument of {} bytes is over the target's \
                                     proto-max-bulk-len ({limit}); raise it on the target",
                                    place.len
                                ),
                            },
                            transient: false,
                        });
                    }
                }
                stream_command(target, &piece.cmd, &places, &self.wal, self.partition).await?;
            }
        }
        target.client.queue(&Command::new(vec![
            Bytes::from_static(b"SET"),
            key,
            value.clone(),
        ]));
        target.client.queue(&Command::from_parts(["EXEC"]));
        Ok(())
    }

    /// Sets the floor to `applied=<log_id>` (following `MOVED` and waiting
    /// out `TRYAGAIN`/`CLUSTERDOWN`).
    async fn write_floor(
        &mut self,
        cluster: &mut ClusterTarget,
        log_id: LogId,
    ) -> Result<(), ApplyError> {
        let value = self.checkpoint_at(log_id);
        self.set_floor(cluster, value).await
    }

    async fn set_floor(
        &mut self,
        cluster: &mut ClusterTarget,
        value: Bytes,
    ) -> Result<(), ApplyError> {
        let set = Command::new(vec![Bytes::from_static(b"SET"), self.key.clone(), value]);
        let slot = key_hash_slot(&self.key);
        let mut backoff = Backoff::new(self.cfg.retry_backoff_min.0, self.cfg.retry_backoff_max.0);
        let mut waited = false;
        loop {
            let node = cluster.node_of(slot)?;
            match cluster.nodes[node].target.call_command(&set).await {
                Ok(_) => {
                    if waited {
                        self.status.set_cluster(Some(cluster.describe()));
                    }
                    return Ok(());
                }
                Err(ApplyError::Client(crate::redis::client::ClientError::Server {
                    message,
                    ..
                })) if is_redirect(&message) => {
                    self.status.set_cluster(Some(format!(
                        "{}; waiting on slot {slot} (floor): {message}",
                        cluster.describe()
                    )));
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(ApplyError::Topology("shut down while the floor waited".into())),
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    cluster.refresh().await?;
                    waited = true;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Applies a keyless entry on every master (the floor's last, with the
    /// floor moved past it in the same transaction).
    async fn apply_barrier(
        &mut self,
        cluster: &mut ClusterTarget,
        entry: Routed,
    ) -> Result<(), ApplyError> {
        let floor_node = cluster.node_of(key_hash_slot(&self.key))?;
        let mut every: Vec<Command> = entry
            .routes
            .iter()
            .filter_map(|(r, _)| match r {
                Route::Every(cmd) => Some(cmd.clone()),
                _ => None,
            })
            .collect();
        // A flush under a key filter: its script deletes keys of several
        // slots per command, which a cluster node refuses inside a script;
        // the owned keys are deleted with SCAN and UNLINK per slot instead
        // (before the floor moves: a crash deletes again, idempotent).
        if self.keyspace.key_filter().is_some() {
            let flush_script = self.keyspace.flush_db(0, None).args.get(1).cloned();
            let before = every.len();
            every.retain(|cmd| !(cmd.args.len() > 1 && cmd.args.get(1) == flush_script.as_ref()));
            if every.len() < before {
                let deleted = scan_owned(cluster, &self.keyspace, true).await?;
                info!(partition = %self.partition, log_id = %entry.log_id, deleted, "a flush under the key filter: deleted the owned keys on every master");
            }
        }
        let once: Vec<Command> = entry
            .routes
            .iter()
            .filter_map(|(r, _)| match r {
                Route::Floor(cmd) => Some(cmd.clone()),
                _ => None,
            })
            .collect();
        let mut applied = 0u64;
        let mut refused = Vec::new();
        let mut order: Vec<usize> = (0..cluster.nodes.len())
            .filter(|&n| n != floor_node)
            .collect();
        order.push(floor_node);
        let value = self.checkpoint_at(entry.log_id);
        for node in order {
            let target = &mut cluster.nodes[node].target;
            let last = node == floor_node;
            let mut commands: Vec<Command> = every.clone();
            if last {
                commands.extend(once.iter().cloned());
                target.client.queue(&Command::new(vec![
                    Bytes::from_static(b"WATCH"),
                    self.key.clone(),
                ]));
            }
            target.client.queue(&Command::from_parts(["MULTI"]));
            for cmd in &commands {
                target.client.queue(cmd);
            }
            if last {
                target.client.queue(&Command::new(vec![
                    Bytes::from_static(b"SET"),
                    self.key.clone(),
                    value.clone(),
                ]));
            }
            target.client.queue(&Command::from_parts(["EXEC"]));
            target.flush().await?;
            if last {
                target.reply().await?; // WATCH
            }
            let mut first_error = None;
            let queued = commands.len() + usize::from(last) + 1;
            for _ in 0..queued {
                let reply = target.reply().await?;
                if first_error.is_none() {
                    first_error = reply.error_message();
                }
            }
            match target.reply().await? {
                Frame::Array(results) => {
                    for (i, result) in results.iter().enumerate() {
                        match (result.error_message(), commands.get(i)) {
                            (None, Some(_)) => applied += 1,
                            (Some(error), Some(cmd)) => refused.push(RefusedCommand {
                                log_id: entry.log_id,
                                command: batch::command_name(cmd),
                                error,
                            }),
                            (Some(error), None) => {
                                return Err(ApplyError::Reply(ReplyError::InternalRefused {
                                    command: "SET checkpoint".into(),
                                    error,
                                }))
                            }
                            (None, None) => {}
                        }
                    }
                }
                Frame::Null => {
                    return Err(ApplyError::CheckpointMoved {
                        first: entry.log_id,
                        last: entry.log_id,
                    })
                }
                other => {
                    let error = first_error
                        .or_else(|| other.error_message())
                        .unwrap_or_else(|| format!("{other:?}"));
                    if is_redirect(&error) {
                        return Err(ApplyError::Topology(format!(
                            "entry {} on {}: {error}",
                            entry.log_id, cluster.nodes[node].addr
                        )));
                    }
                    return Err(ApplyError::Aborted {
                        first: entry.log_id,
                        last: entry.log_id,
                        error,
                    });
                }
            }
        }
        let split = u64::from(cluster.nodes.len() > 1 && !every.is_empty());
        self.floor_reached(entry.log_id, applied, refused, 0, split);
        cluster.floor_written = Instant::now();
        let _ = self.applied_tx.send(entry.log_id);
        Ok(())
    }
}

/// Reads the replies of one piece (`WATCH`, `MULTI`, one per command, the
/// checkpoint `SET`, `EXEC`).
async fn read_piece(
    target: &mut Target,
    commands: &[PieceCommand],
    slot: u16,
) -> Result<PieceOutcome, ApplyError> {
    let _watch = target.reply().await?;
    let multi = target.reply().await?;
    let mut first_error: Option<(Option<usize>, String)> = multi.error_message().map(|e| (None, e));
    for i in 0..=commands.len() {
        let reply = target.reply().await?;
        if first_error.is_none() {
            if let Some(error) = reply.error_message() {
                first_error = Some((Some(i), error));
            }
        }
    }
    let first = commands.first().map_or(LogId::ZERO, |c| c.log_id);
    let last = commands.last().map_or(LogId::ZERO, |c| c.log_id);
    match target.reply().await? {
        Frame::Array(results) if results.len() == commands.len() + 1 => {
            let mut applied = 0;
            let mut refused = Vec::new();
            for (i, result) in results.iter().enumerate() {
                let error = result.error_message();
                match (commands.get(i), error) {
                    (Some(_), None) => applied += 1,
                    (Some(cmd), Some(error)) => refused.push(RefusedCommand {
                        log_id: cmd.log_id,
                        command: batch::command_name(&cmd.cmd),
                        error,
                    }),
                    (None, Some(error)) => {
                        return Err(ApplyError::Reply(ReplyError::InternalRefused {
                            command: format!("SET checkpoint of slot {slot}"),
                            error,
                        }))
                    }
                    (None, None) => {}
                }
            }
            Ok(PieceOutcome::Committed { applied, refused })
        }
        Frame::Null => Err(ApplyError::CheckpointMoved { first, last }),
        other => {
            let exec_error = other.error_message();
            match first_error {
                Some((_, error)) if is_redirect(&error) => Ok(PieceOutcome::Redirect(error)),
                Some((Some(i), error)) if i < commands.len() => {
                    let cmd = &commands[i];
                    Err(ApplyError::Refused {
                        transient: batch::refusal_is_transient(&error),
                        refused: RefusedCommand {
                            log_id: cmd.log_id,
                            command: batch::command_name(&cmd.cmd),
                            error,
                        },
                    })
                }
                Some((_, error)) => Err(ApplyError::Aborted {
                    first,
                    last,
                    error: format!("slot {slot}: {error}"),
                }),
                None => {
                    let error = exec_error.unwrap_or_else(|| format!("{other:?}"));
                    if is_redirect(&error) {
                        return Ok(PieceOutcome::Redirect(error));
                    }
                    Err(ApplyError::Aborted {
                        first,
                        last,
                        error: format!("slot {slot}: {error}"),
                    })
                }
            }
        }
    }
}

/// Lua run on each master at the start of a load: deletes this applier's
/// slot checkpoints (`ARGV[2]`, a `KEYS` pattern) and, with `ARGV[1] ==
/// 'flush'`, every key but the `__ferry*` ones. Returns the keys kept.
const LOAD_START_SCRIPT: &str = "\
for _, key in ipairs(redis.call('KEYS', ARGV[2])) do redis.call('DEL', key) end
local kept = {}
if ARGV[1] == 'flush' and redis.call('DBSIZE') > 0 then
  for _, key in ipairs(redis.call('KEYS', '__ferry*')) do
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = 0 end
    kept[#kept + 1] = {key, ttl, redis.call('DUMP', key)}
  end
  redis.call('FLUSHDB')
  for _, entry in ipairs(kept) do
    redis.call('RESTORE', entry[1], entry[2], entry[3], 'REPLACE')
  end
end
return #kept";

/// The owner map of slot tenures ([`tenure`]), read from the master of its
/// slot (a redirection ends the session: the next one reads the map again).
async fn read_owners(
    cluster: &mut ClusterTarget,
    key: &Bytes,
) -> Result<tenure::OwnerMap, ApplyError> {
    let node = cluster.node_of(key_hash_slot(key))?;
    match cluster.nodes[node].target.read_owner_map(key).await {
        Err(ApplyError::Client(crate::redis::client::ClientError::Server { message, .. }))
            if is_redirect(&message) =>
        {
            Err(ApplyError::Topology(format!(
                "reading the slot owner map: {message}"
            )))
        }
        other => other,
    }
}

/// Lua: the number of keys of this node outside `__ferry*`.
const COUNT_DATA_SCRIPT: &str = "\
return redis.call('DBSIZE') - #redis.call('KEYS', '__ferry*')";

/// The slots of `scope` per master serving them.
fn slots_by_node(cluster: &ClusterTarget, scope: &SlotRanges) -> Result<Vec<Vec<u16>>, ApplyError> {
    let mut by_node = vec![Vec::new(); cluster.nodes.len()];
    for &(first, last) in scope.ranges() {
        for slot in first..=last {
            by_node[cluster.node_of(slot)?].push(slot);
        }
    }
    Ok(by_node)
}

/// The data keys (`__ferry*` left out) `CLUSTER GETKEYSINSLOT` gives for
/// each of `slots` (at most [`SLOT_KEYS`] each), pipelined on `target`.
async fn keys_in_slots(
    target: &mut Target,
    slots: &[u16],
    keyspace: &OwnedKeyspace,
) -> Result<Vec<(u16, usize, Vec<Bytes>)>, ApplyError> {
    let count = SLOT_KEYS.to_string();
    for slot in slots {
        target.client.queue(&Command::from_parts([
            "CLUSTER",
            "GETKEYSINSLOT",
            &slot.to_string(),
            &count,
        ]));
    }
    target.flush().await?;
    let mut out = Vec::with_capacity(slots.len());
    for &slot in slots {
        let reply = target.reply().await?;
        let Frame::Array(items) = reply else {
            return Err(ApplyError::Topology(format!(
                "CLUSTER GETKEYSINSLOT {slot}: {reply:?}"
            )));
        };
        let returned = items.len();
        let keys = items
            .into_iter()
            .filter_map(|item| item.as_bytes().cloned())
            .filter(|key| keyspace.owns_key(key))
            .collect();
        out.push((slot, returned, keys));
    }
    Ok(out)
}

/// Walks every master with `SCAN` and counts (or, with `delete`, deletes:
/// `UNLINK` per slot) the keys `keyspace` owns (`__ferry*` never). For a key
/// filter: idempotent, run again from any point it ends in the same state.
async fn scan_owned(
    cluster: &mut ClusterTarget,
    keyspace: &OwnedKeyspace,
    delete: bool,
) -> Result<u64, ApplyError> {
    let mut total = 0u64;
    for node in &mut cluster.nodes {
        let target = &mut node.target;
        let mut cursor = Bytes::from_static(b"0");
        loop {
            let reply = target
                .call_command(&Command::new(vec![
                    Bytes::from_static(b"SCAN"),
                    cursor.clone(),
                    Bytes::from_static(b"COUNT"),
                    Bytes::from_static(b"1000"),
                ]))
                .await?;
            let Frame::Array(parts) = reply else {
                return Err(ApplyError::Topology(format!(
                    "SCAN on {}: {reply:?}",
                    node.addr
                )));
            };
            let (Some(next), Some(Frame::Array(keys))) =
                (parts.first().and_then(Frame::as_bytes), parts.get(1))
            else {
                return Err(ApplyError::Topology(format!(
                    "SCAN on {}: {parts:?}",
                    node.addr
                )));
            };
            cursor = next.clone();
            let mut by_slot: BTreeMap<u16, Vec<Bytes>> = BTreeMap::new();
            for key in keys.iter().filter_map(Frame::as_bytes) {
                if keyspace.owns_key(key) {
                    by_slot
                        .entry(key_hash_slot(key))
                        .or_default()
                        .push(key.clone());
                }
            }
            if delete {
                let unlinks = by_slot.len();
                for (_, keys) in by_slot {
                    let mut args = vec![Bytes::from_static(b"UNLINK")];
                    args.extend(keys);
                    target.client.queue(&Command::new(args));
                }
                target.flush().await?;
                for _ in 0..unlinks {
                    let reply = target.reply().await?;
                    if let Some(error) = reply.error_message() {
                        return Err(ApplyError::Topology(format!(
                            "deleting owned keys: {error}"
                        )));
                    }
                    total += reply.as_integer().unwrap_or(0).max(0) as u64;
                }
            } else {
                total += by_slot.values().map(|k| k.len() as u64).sum::<u64>();
            }
            if &cursor[..] == b"0" {
                break;
            }
        }
    }
    Ok(total)
}

/// Keys asked per slot and step by the scoped deletion and count.
const SLOT_KEYS: usize = 1000;

/// Deletes every data key of `scope`'s slots from the masters serving them
/// (`CLUSTER GETKEYSINSLOT`, `UNLINK` of one slot's keys at a time), keeping
/// `__ferry*` keys; returns how many. Idempotent: run again from any point it
/// ends in the same state.
async fn delete_slots(
    cluster: &mut ClusterTarget,
    scope: &SlotRanges,
    keyspace: &OwnedKeyspace,
) -> Result<u64, ApplyError> {
    let by_node = slots_by_node(cluster, scope)?;
    let mut deleted = 0u64;
    for (index, mut slots) in by_node.into_iter().enumerate() {
        let target = &mut cluster.nodes[index].target;
        while !slots.is_empty() {
            let found = keys_in_slots(target, &slots, keyspace).await?;
            let mut again = Vec::new();
            let mut unlinks = 0usize;
            for (slot, returned, keys) in found {
                if keys.is_empty() {
                    continue;
                }
                let mut args = vec![Bytes::from_static(b"UNLINK")];
                args.extend(keys);
                target.client.queue(&Command::new(args));
                unlinks += 1;
                if returned >= SLOT_KEYS {
                    again.push(slot);
                }
            }
            target.flush().await?;
            for _ in 0..unlinks {
                let reply = target.reply().await?;
                if let Some(error) = reply.error_message() {
                    return Err(ApplyError::Topology(format!(
                        "deleting a slot's keys: {error}"
                    )));
                }
                deleted += reply.as_integer().unwrap_or(0).max(0) as u64;
            }
            slots = again;
        }
    }
    Ok(deleted)
}

/// The data keys of `scope`'s slots on the masters serving them.
async fn count_slots(
    cluster: &mut ClusterTarget,
    scope: &SlotRanges,
    keyspace: &OwnedKeyspace,
) -> Result<u64, ApplyError> {
    let by_node = slots_by_node(cluster, scope)?;
    let mut keys = 0u64;
    for (index, slots) in by_node.into_iter().enumerate() {
        let target = &mut cluster.nodes[index].target;
        for (_, _, found) in keys_in_slots(target, &slots, keyspace).await? {
            keys += found.len() as u64;
        }
    }
    Ok(keys)
}

/// One command of a load: for the master of its key's slot, or for every
/// master (functions).
enum LoadCommand {
    Key(Command),
    Global(Command),
}

struct LoadChunk {
    commands: Vec<LoadCommand>,
    keys_loaded: u64,
}

struct LoadProducer {
    partition: crate::position::PartitionId,
    parse: ParseOptions,
    rebuild: RebuildOptions,
    keyspace: OwnedKeyspace,
    expire_grace: ExpireGrace,
}

/// The parser thread of a cluster load: RDB events to commands, in chunks.
/// Returns the rebuild statistics and the commands of dbs other than 0 (a
/// cluster has none) not sent.
fn produce_commands(
    cfg: LoadProducer,
    chunk_rx: mpsc::Receiver<Bytes>,
    tx: mpsc::Sender<LoadChunk>,
) -> Result<(RebuildStats, u64), String> {
    let mut parser = RdbParser::new(ChannelReader::new(chunk_rx), cfg.parse);
    let mut rebuilder = Rebuilder::new(cfg.rebuild);
    let mut outputs = Vec::new();
    let mut chunk = Vec::with_capacity(LOAD_CHUNK);
    let mut skipping = false;
    let mut unsent = 0u64;
    let mut warned_dbs: Vec<u32> = Vec::new();
    loop {
        let mut event = match parser.next_event() {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(error) => return Err(error.to_string()),
        };
        cfg.expire_grace.shift_key_start(&mut event);
        match &event {
            RdbEvent::KeyStart(header)
                if header.key.starts_with(INTERNAL_PREFIX)
                    || !cfg.keyspace.replicates(header.db, &header.key) =>
            {
                skipping = true;
                continue;
            }
            RdbEvent::KeyEnd { .. } if skipping => {
                skipping = false;
                continue;
            }
            _ if skipping => continue,
            _ => {}
        }
        rebuilder
            .feed(event, &mut outputs)
            .map_err(|error| error.to_string())?;
        for output in outputs.drain(..) {
            match output {
                // Into the target db its source db maps to: 0 on a cluster.
                Output::Command { db, cmd } if cfg.keyspace.target_db(db) == Some(0) => {
                    chunk.push(LoadCommand::Key(cmd))
                }
                Output::Command { db, .. } if cfg.keyspace.target_db(db).is_none() => {}
                Output::Command { db, .. } => {
                    unsent += 1;
                    if !warned_dbs.contains(&db) {
                        warned_dbs.push(db);
                        warn!(partition = %cfg.partition, db, "snapshot keys of a db other than 0 are not loaded: a cluster target has db 0 only");
                    }
                }
                Output::Global { cmd } => chunk.push(LoadCommand::Global(cmd)),
                Output::Warning { db, key, what } => {
                    warn!(
                        partition = %cfg.partition,
                        db,
                        key = ?key.as_ref().map(|k| String::from_utf8_lossy(k)),
                        what,
                        "snapshot data the target cannot hold"
                    );
                }
            }
        }
        if chunk.len() >= LOAD_CHUNK {
            let full = LoadChunk {
                commands: std::mem::replace(&mut chunk, Vec::with_capacity(LOAD_CHUNK)),
                keys_loaded: rebuilder.stats().keys_loaded(),
            };
            if tx.blocking_send(full).is_err() {
                return Err("the load ended early".into());
            }
        }
    }
    let stats = rebuilder.finish().map_err(|error| error.to_string())?;
    if !chunk.is_empty()
        && tx
            .blocking_send(LoadChunk {
                commands: chunk,
                keys_loaded: stats.keys_loaded(),
            })
            .is_err()
    {
        return Err("the load ended early".into());
    }
    Ok((stats, unsent))
}

impl Applier {
    /// Rule 6 of docs/cluster.md for the load of `marker` (at `log_id`)
    /// into a cluster: reads the owner map; takes the marker's `handoffs`
    /// the map has not taken (the keys of those slots deleted on their
    /// masters, then the map raised: before waiting for anything, so a
    /// marker that hands a slot over and waits for it back does not wait
    /// for itself); holds (HANDOFF) while a slot of its tenures is not
    /// open to it. The plan's claims are written by the load. `None` on
    /// shutdown.
    async fn plan_cluster_load(
        &mut self,
        cluster: &mut ClusterTarget,
        log_id: LogId,
        marker: &SnapshotMarker,
    ) -> Result<Option<tenure::LoadPlan>, ApplyError> {
        loop {
            self.owners = read_owners(cluster, &self.owners_key).await?;
            let unvoided = self.marker_without_voids(log_id, marker)?;
            let marker = unvoided.as_ref().unwrap_or(marker);
            let plan = tenure::plan_load(&self.owners, self.partition.0, marker);
            let node = cluster.node_of(key_hash_slot(&self.owners_key))?;
            if !plan.handoffs.is_empty() {
                let deleted = tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(None),
                    deleted = delete_slots(cluster, &plan.handed_off, &self.keyspace) => deleted?,
                };
                cluster.nodes[node]
                    .target
                    .call_command(&tenure::raise_command(&self.owners_key, &plan.handoffs))
                    .await?;
                info!(
                    partition = %self.partition,
                    marker = %log_id,
                    slots = %plan.handed_off,
                    deleted,
                    "took the handoffs of the snapshot: deleted the keys of the slots handed over, moved the owner map"
                );
                continue;
            }
            let Some(wait) = plan.wait else {
                self.status.clear_handoff();
                return Ok(Some(plan));
            };
            if !self
                .wait_load_handoff(&mut cluster.nodes[node].target, log_id, wait)
                .await?
            {
                return Ok(None);
            }
        }
    }

    /// Loads the snapshot of `marker` (at `log_id`) into the cluster
    /// (module doc, "Snapshot loads"). `false`: shut down during the load.
    async fn cluster_load(
        &mut self,
        cluster: &mut ClusterTarget,
        table: &mut SlotTable,
        log_id: LogId,
        marker: SnapshotMarker,
    ) -> Result<bool, ApplyError> {
        let epoch = marker.epoch;
        let snapshot_error = |what: String| ApplyError::Snapshot {
            log_id,
            epoch,
            what,
        };
        let floor_node = cluster.node_of(key_hash_slot(&self.key))?;
        let caps = cluster.nodes[floor_node].target.caps.ok_or_else(|| {
            snapshot_error("the target's INFO server gave no usable redis_version".into())
        })?;
        let (wal, partition) = (self.wal.clone(), self.partition);
        let first =
            tokio::task::spawn_blocking(move || wal.read_snapshot_chunks(partition, epoch, 0, 1))
                .await
                .map_err(|error| ApplyError::Task(error.to_string()))??;
        if first.is_empty() && marker.chunks > 0 {
            return Err(snapshot_error("its chunks are not in the wal".into()));
        }
        // Slot tenures of a cluster source (docs/cluster.md, rule 6): the
        // marker's handoffs taken, its slots waited for or claimed; only
        // the slots it takes are deleted and loaded.
        let plan = if marker.tenures.is_empty() {
            None
        } else {
            match self.plan_cluster_load(cluster, log_id, &marker).await? {
                Some(plan) => Some(plan),
                None => return Ok(false),
            }
        };
        let taken = match &plan {
            Some(plan) => Some(plan.load.clone()),
            None => marker.scope.clone(),
        };
        let policy = self.cfg.existing_data;
        // A cluster has db 0 only: nothing of it may be owned.
        let flush = policy != ExistingData::Keep && self.keyspace.owns_target_db(0);
        if self.first_load && policy == ExistingData::Refuse {
            let mut keys = 0i64;
            if let (Some(_), Some(taken)) = (&marker.scope, &taken) {
                keys = count_slots(cluster, taken, &self.keyspace).await? as i64;
            } else if self.keyspace.key_filter().is_some() {
                keys = scan_owned(cluster, &self.keyspace, false).await? as i64;
            }
            let whole = marker.scope.is_none() && self.keyspace.key_filter().is_none();
            for node in cluster.nodes.iter_mut().filter(|_| whole) {
                let count = node
                    .target
                    .call(&["EVAL", COUNT_DATA_SCRIPT, "0"])
                    .await?
                    .as_integer()
                    .unwrap_or(0);
                keys += count.max(0);
            }
            if keys > 0 {
                return Err(ApplyError::ExistingData {
                    partition: self.partition,
                    dbs: vec![(0, keys as u64)],
                    slots: marker.scope.clone(),
                });
            }
        }
        info!(
            partition = %self.partition,
            marker = %log_id,
            epoch,
            rdb_bytes = marker.rdb_bytes,
            masters = cluster.nodes.len(),
            existing_data = policy.as_str(),
            "loading snapshot into the cluster: {}",
            if flush { "deleting the owned keys of every master" } else { "loading over the target's keys" }
        );
        let loading = Checkpoint::Loading {
            log_id,
            epoch,
            log: self.log_tag,
        };
        self.set_floor(cluster, Bytes::from(loading.encode()))
            .await?;
        // The scope next to the floor (after `loading=M`: a crash before it
        // loads the marker again, which carries it).
        let scope_node = cluster.node_of(key_hash_slot(&self.scope_key))?;
        let scope_cmd = match &marker.scope {
            Some(scope) => Command::new(vec![
                Bytes::from_static(b"SET"),
                self.scope_key.clone(),
                Bytes::from(super::scope::encode_scope(scope)),
            ]),
            None => Command::new(vec![Bytes::from_static(b"DEL"), self.scope_key.clone()]),
        };
        cluster.nodes[scope_node]
            .target
            .call_command(&scope_cmd)
            .await?;
        self.scope = marker.scope.clone();
        // The slots the load claims (after `loading=M`: a crash before the
        // claim plans the same load again, one after it finds them named).
        if let Some(plan) = plan.as_ref().filter(|plan| !plan.claims.is_empty()) {
            let node = cluster.node_of(key_hash_slot(&self.owners_key))?;
            cluster.nodes[node]
                .target
                .call_command(&tenure::raise_command(&self.owners_key, &plan.claims))
                .await?;
            for &(slot, owner) in &plan.claims {
                self.owners.raise(slot, owner);
            }
        }
        let mut pattern = self.key.to_vec();
        pattern.extend_from_slice(b":*");
        let pattern = String::from_utf8_lossy(&pattern).into_owned();
        if let (Some(_), Some(taken), true) = (&marker.scope, &taken, flush) {
            let deleted = delete_slots(cluster, taken, &self.keyspace).await?;
            info!(partition = %self.partition, slots = %taken, deleted, "deleted the keys of the partition's slots on every master");
        }
        // A scoped partition never empties a master: only its slots' keys
        // (deleted above) and its own slot checkpoints.
        let flush_all = flush && marker.scope.is_none();
        // Under a key filter only the owned keys go, found with SCAN (a
        // script cannot delete keys of several slots in one command).
        if flush_all && self.keyspace.key_filter().is_some() {
            let deleted = scan_owned(cluster, &self.keyspace, true).await?;
            info!(partition = %self.partition, deleted, "deleted the owned keys (key filter) on every master");
        }
        let whole = flush_all && self.keyspace.key_filter().is_none();
        for node in &mut cluster.nodes {
            let mode = if whole { "flush" } else { "keep" };
            node.target
                .call(&["EVAL", LOAD_START_SCRIPT, "0", mode, &pattern])
                .await
                .map_err(|error| {
                    snapshot_error(format!(
                        "{} refused the start of the load: {error}",
                        node.addr
                    ))
                })?;
            if whole && caps.at_least(7, 0) && self.keyspace.owns_whole_target(1) {
                if let Err(error) = node.target.call(&["FUNCTION", "FLUSH"]).await {
                    warn!(partition = %self.partition, node = %node.addr, %error, "the target refused FUNCTION FLUSH");
                }
            }
        }
        table.reset();
        self.first_load = false;
        self.status.set_applied(log_id.prev(), epoch);
        let mut progress = SnapshotLoadProgress {
            log_id,
            epoch,
            rdb_bytes: marker.rdb_bytes,
            ..SnapshotLoadProgress::default()
        };
        self.status.set_snapshot_load(progress.clone());

        let restore_max_bytes = self.cfg.restore_max_bytes.as_usize();
        let mut rebuild = RebuildOptions::new(caps);
        rebuild.replace = true;
        rebuild.restore_max_bytes = restore_max_bytes;
        rebuild.strings_by_set = true;
        let producer_cfg = LoadProducer {
            partition: self.partition,
            parse: ParseOptions {
                raw_capture_limit: restore_max_bytes,
                ..ParseOptions::default()
            },
            rebuild,
            keyspace: self.keyspace.clone(),
            expire_grace: expire::ExpireGrace::new(self.cfg.expire_grace.0),
        };
        let (chunk_tx, chunk_rx) = mpsc::channel(CHUNK_QUEUE);
        let (command_tx, mut command_rx) = mpsc::channel::<LoadChunk>(4);
        let producer = tokio::task::spawn_blocking(move || {
            produce_commands(producer_cfg, chunk_rx, command_tx)
        });
        let bytes_fed = Arc::new(AtomicU64::new(0));
        let feeding = tokio::spawn(feed_chunks(
            self.wal.clone(),
            self.partition,
            marker.clone(),
            chunk_tx,
            Arc::clone(&bytes_fed),
        ));
        let abort_feeding = feeding.abort_handle();
        let _abort = scopeguard(move || abort_feeding.abort());

        let window = self.cfg.load_window.max(1);
        let reply_timeout = self.cfg.reply_timeout.0;
        let status = Arc::clone(&self.status);
        let partition = self.partition;
        let progress_ref = &mut progress;
        let bytes_ref = &bytes_fed;
        // With tenures, the RDB's keys of slots the load does not take (the
        // shard imports them in a tenure not open yet) are not written.
        let only = plan.as_ref().map(|plan| plan.load.clone());
        let mut outside = 0u64;
        let outside_ref = &mut outside;
        let route_all = async {
            // Commands queued per master, not yet answered.
            let mut pending: Vec<Vec<Command>> = vec![Vec::new(); cluster.nodes.len()];
            let mut queued = 0usize;
            let mut done = false;
            while !done {
                match command_rx.recv().await {
                    Some(chunk) => {
                        for command in chunk.commands {
                            match command {
                                LoadCommand::Key(cmd) => {
                                    let slot = match command::command_slot(&cmd) {
                                        Ok(Some(slot)) => slot,
                                        _ => 0,
                                    };
                                    if only.as_ref().is_some_and(|only| !only.contains(slot)) {
                                        *outside_ref += 1;
                                        continue;
                                    }
                                    let node = cluster.node_of(slot)?;
                                    cluster.nodes[node].target.client.queue(&cmd);
                                    pending[node].push(cmd);
                                    queued += 1;
                                }
                                LoadCommand::Global(cmd) => {
                                    for (node, list) in pending.iter_mut().enumerate() {
                                        cluster.nodes[node].target.client.queue(&cmd);
                                        list.push(cmd.clone());
                                        queued += 1;
                                    }
                                }
                            }
                        }
                        progress_ref.keys_loaded = chunk.keys_loaded;
                    }
                    None => done = true,
                }
                if queued < window && !done {
                    continue;
                }
                queued = 0;
                for node in &mut cluster.nodes {
                    node.target.flush().await?;
                }
                for (index, list) in pending.iter_mut().enumerate() {
                    let node = &mut cluster.nodes[index];
                    for cmd in list.drain(..) {
                        let reply = node.target.reply().await.map_err(|error| match error {
                            ApplyError::Client(e) => client_error(e, reply_timeout),
                            other => other,
                        })?;
                        let Some(error) = reply.error_message() else {
                            continue;
                        };
                        if is_redirect(&error) {
                            return Err(ApplyError::Snapshot {
                                log_id,
                                epoch,
                                what: format!(
                                    "the target cluster changed during the load ({} answered \
                                     {error}); loading again",
                                    node.addr
                                ),
                            });
                        }
                        progress_ref.commands_refused += 1;
                        if progress_ref.commands_refused <= LOGGED_REFUSALS {
                            warn!(
                                partition = %partition,
                                marker = %log_id,
                                command = %batch::command_name(&cmd),
                                key = ?cmd.args.get(1).map(|k| String::from_utf8_lossy(k).into_owned()),
                                %error,
                                "the target refused a snapshot command"
                            );
                        }
                    }
                }
                progress_ref.bytes_loaded = bytes_ref.load(Ordering::Relaxed);
                status.set_snapshot_load(progress_ref.clone());
            }
            Ok::<_, ApplyError>(())
        };
        let routed = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(false),
            routed = route_all => routed,
        };
        let produced = producer
            .await
            .map_err(|error| ApplyError::Task(error.to_string()))?;
        let (stats, unsent) = match (routed, produced) {
            (Err(error), _) => return Err(error),
            (Ok(()), Ok(produced)) => produced,
            (Ok(()), Err(why)) => {
                if let Ok(Ok(Err(feed_error))) =
                    tokio::time::timeout(Duration::from_secs(2), feeding).await
                {
                    return Err(snapshot_error(feed_error));
                }
                return Err(ApplyError::SnapshotData {
                    log_id,
                    epoch,
                    error: why,
                });
            }
        };
        match feeding.await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(snapshot_error(why)),
            Err(error) => return Err(ApplyError::Task(error.to_string())),
        }
        progress.commands_refused += unsent;
        let applied = Checkpoint::Applied {
            log_id,
            epoch,
            log: self.log_tag,
            source: None,
        };
        self.set_floor(cluster, Bytes::from(applied.encode()))
            .await?;
        cluster.floor_written = Instant::now();
        self.epoch = epoch;
        progress.bytes_loaded = bytes_fed.load(Ordering::Relaxed);
        progress.keys_loaded = stats.keys_loaded();
        progress.done = true;
        info!(
            partition = %self.partition,
            marker = %log_id,
            epoch,
            keys = progress.keys_loaded,
            bytes = progress.bytes_loaded,
            refused = progress.commands_refused,
            not_taken = outside,
            "snapshot loaded into the cluster"
        );
        self.status.set_snapshot_load(progress.clone());
        self.status
            .add_counts(stats.commands, progress.commands_refused, 0);
        self.status.set_applied(log_id, epoch);
        let _ = self.applied_tx.send(log_id);
        self.loaded_tx.send_replace(epoch);
        self.progressed = true;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::cluster::tag_for_slot;

    #[test]
    fn slot_keys_land_in_their_slot() {
        for slot in [0u16, 1, 777, 5461, 16383] {
            let key = slot_checkpoint_key(b"__ferry:checkpoint:d:0", slot);
            assert_eq!(key_hash_slot(&key), slot);
            assert!(key.ends_with(tag_for_slot(slot).as_bytes()));
        }
    }

    fn slots_of(routes: &[Route]) -> Vec<(u16, Vec<String>)> {
        routes
            .iter()
            .map(|r| match r {
                Route::Slot(s, cmd) => (
                    *s,
                    cmd.args
                        .iter()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect(),
                ),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn routes_cuts_and_refuses() {
        let (a, b) = ("{a}1", "{b}1");
        let (sa, sb) = (key_hash_slot(b"a"), key_hash_slot(b"b"));
        let one = route(&Command::from_parts(["SET", a, "1"]), false).unwrap();
        assert_eq!(
            one,
            vec![Route::Slot(sa, Command::from_parts(["SET", a, "1"]))]
        );
        let mset = route(
            &Command::from_parts(["MSET", a, "1", b, "2", "{a}2", "3"]),
            false,
        )
        .unwrap();
        let mut want = vec![
            (
                sa,
                vec![
                    "MSET".to_string(),
                    a.into(),
                    "1".into(),
                    "{a}2".into(),
                    "3".into(),
                ],
            ),
            (sb, vec!["MSET".to_string(), b.into(), "2".into()]),
        ];
        want.sort();
        assert_eq!(slots_of(&mset), want);
        let del = route(&Command::from_parts(["DEL", a, b]), false).unwrap();
        assert_eq!(del.len(), 2);
        assert!(route(&Command::from_parts(["RENAME", a, b]), false).is_err());
        assert!(route(&Command::from_parts(["MSET", a, "", b, "x"]), true).is_err());
        assert!(matches!(
            route(&Command::from_parts(["FUNCTION", "FLUSH"]), false).unwrap()[0],
            Route::Every(_)
        ));
        assert!(matches!(
            route(&Command::from_parts(["PUBLISH", "ch", "m"]), false).unwrap()[0],
            Route::Floor(_)
        ));
        let flush = OwnedKeyspace::all().flush_db(0, None);
        assert!(matches!(route(&flush, false).unwrap()[0], Route::Every(_)));
    }

    #[test]
    fn redirects_are_told_apart() {
        assert!(is_redirect("MOVED 3999 127.0.0.1:6381"));
        assert!(is_redirect("ASK 3999 127.0.0.1:6381"));
        assert!(is_redirect(
            "TRYAGAIN Multiple keys request during rehashing of slot"
        ));
        assert!(is_redirect("CLUSTERDOWN The cluster is down"));
        assert!(!is_redirect("ERR wrong number of arguments"));
        assert!(!is_redirect("EXECABORT Transaction discarded"));
    }
}
