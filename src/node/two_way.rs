//! Two-way sync (issue 11, item 1): `ferry sync --two-way` between two
//! standalone Redis 7 servers A (`--source`) and B (`--target`), two
//! Redis 7 Clusters ("Two clusters" below), or a standalone server and a
//! cluster in either order ("A standalone server and a cluster").
//!
//! In: the sync's config and its one WAL. Out: the configs of the two
//! directions' stages, the backward direction established once the first
//! full sync is in B, and the precheck of the pair.
//!
//! # Partitions
//!
//! Both directions are ordinary `ferry sync` stages in one process and one
//! WAL (`<data-dir>/listener`), with the same ids:
//!
//! - partition 0 ([`FORWARD`]): a listener of A, its applier writes B, with
//!   the checkpoint `__ferry:checkpoint:<id>:0` on B;
//! - partition 1 ([`BACKWARD`]): a listener of B, its applier writes A, with
//!   the checkpoint `__ferry:checkpoint:<id>:1` on A.
//!
//! Each direction is exactly once on its own terms (apply module doc), so
//! a kill -9 of ferry at any moment leaves each side with a checkpoint
//! that says what it holds.
//!
//! # No loops: the echo rule
//!
//! An applier writes every batch as one `MULTI`/`EXEC` that ends with its
//! checkpoint `SET`. The side propagates that transaction whole, as one
//! entry of its stream, and no other writer writes a `__ferry*` key. So
//! the other direction's listener logs it as one entry that writes the
//! applier's checkpoint key: the other applier covers such an entry
//! without sending any of it back ([`crate::apply`]'s batch builder,
//! `echo`; counted as `echoes` in `ferry status`). The rule is per entry
//! and depends on the entry alone, so a replay after a crash decides the
//! same. A batch that applies nothing (it covers heartbeats and echoes
//! only) is not written at once, or the two appliers would echo each
//! other's checkpoints forever: it waits for a batch with data, or 30 s
//! (a quarter of `wal-ttl` at most).
//!
//! # Establishing the backward direction
//!
//! The first full sync A → B runs on partition 0 alone (B passes the
//! existing-data rule). Once B holds it (the applier's checkpoint is
//! `applied` in a loaded epoch), partition 1 starts at the exact end of
//! what B holds, as a switchover does (`super::switchover`, steps 6 and
//! 7): B's point is marked with `MULTI; SET __ferry:two-way:<id> …; INFO
//! replication; EXEC`, A gets the checkpoint `applied=1` of partition 1's
//! log, and entry 1 of partition 1 is that `SET` at B's point. Then the
//! stages restart with both directions. Writes to B before that point are
//! not carried to A: B takes writes once the log says "two-way sync
//! established" (`ferry status` shows partition 1). A crash before entry 1
//! is durable does it again; after it, partition 1 resumes like any.
//!
//! # Conflicts
//!
//! One key written on both sides before either saw the other's write:
//! found from the two logs by [`super::conflicts`] (its module doc has the
//! rule), appended to `<data-dir>/conflicts.jsonl` and counted in `ferry
//! status`; with `--conflict source-wins` or `target-wins` both sides then
//! converge on what the winner's write left.
//!
//! # Two clusters
//!
//! Between two clusters ([`Pair::Clusters`]) each direction is what a
//! one-way sync of a cluster into a cluster is (apply module, "Applying
//! into a Redis Cluster target"), in the same one WAL:
//!
//! - forward: a partition per master of A (0, 1, …; the shard map and slot
//!   table in the data dir), each applied into B by slot;
//! - backward: a partition per master of B from [`CLUSTER_BACKWARD_BASE`]
//!   (1000, 1001, …; the `i`-th master by first slot is 1000 + `i`), the
//!   shard map and slot table in [`CLUSTER_BACKWARD_DIR`], each applied
//!   into A by slot.
//!
//! Establishing waits until every forward partition's floor on B is
//! `applied` in a loaded epoch, then does what a switchover of two
//! clusters does (`super::switchover`, "Two clusters", steps 2, 6 to 8):
//! the backward shard map and slot table, a history per partition, A
//! prepared as their target (owner map, slot scopes, floors `applied=1` of
//! each log), each master of B marked alone (`MULTI; SET
//! __ferry:two-way:{ferry:N}:<id> …; INFO replication; EXEC`, `{ferry:N}` a
//! tag of its first slot) and the mark stored as its partition's entry 1;
//! last, [`CLUSTER_ESTABLISHED_FILE`]. A retry after a crash keeps the
//! partitions whose entry 1 is durable (B's writes after such a mark are in
//! its stream after it) and marks the others, if B's masters are the same.
//!
//! No loops: an applier writes each piece of a batch as one transaction
//! ending with its slot checkpoint `__ferry:checkpoint:<id>:<p>:{ferry:N}`,
//! and its floor `__ferry:checkpoint:<id>:<p>` alone; the other direction's
//! appliers cover every entry writing a checkpoint of a partition of this
//! direction's range (`EchoRule`). Owner map and scope keys are written
//! with a floor or a slot checkpoint, or only at establishing (then they
//! are `__ferry*` keys, never applied). Silent batches are held back into a
//! cluster as into a standalone server, and commands without keys but
//! `PUBLISH` are refused (run on every master, they would come back from
//! the masters whose transaction has no checkpoint). Conflicts: a key
//! lives in one slot, so its writes come from one shard's log per side;
//! `super::conflicts` keeps what each side has seen per (partition, slot),
//! and a winner policy's repair waits for the checkpoint of the winner's
//! partition in the key's slot.
//!
//! # A standalone server and a cluster
//!
//! A standalone A with a cluster B ([`Pair::StandaloneCluster`]), or a
//! cluster A with a standalone B ([`Pair::ClusterStandalone`]): each
//! direction is the one-way sync of its kind (a standalone source into a
//! cluster, apply module "Applying into a Redis Cluster target"; a cluster
//! source into a standalone server by slot tenures, docs/cluster.md), and
//! the partitions are numbered as between clusters, so the two directions'
//! ids never meet:
//!
//! - forward: A's one partition 0, or a partition per master of A below
//!   [`CLUSTER_BACKWARD_BASE`] (A's shard map and slot table in the data
//!   dir);
//! - backward: a partition per master of B from [`CLUSTER_BACKWARD_BASE`]
//!   (the shard map and slot table in [`CLUSTER_BACKWARD_DIR`]), or B's one
//!   partition [`CLUSTER_BACKWARD_BASE`] (no shard map there: B's listener
//!   is a standalone one).
//!
//! Establishing is the clusters' (the masters of B marked one by one; a
//! standalone B is one master, marked `__ferry:two-way:<id>`), then
//! [`CLUSTER_ESTABLISHED_FILE`]. What A gets as the backward appliers'
//! target: a cluster B's owner map and slot scopes and every partition's
//! floor, on a standalone A plain checkpoints on its one server; a
//! standalone B's partition its floor alone on the cluster A (it carries
//! no slot tenures). The echo rule is the same: on a standalone side the
//! echoes write the other side's partitions' checkpoints, on a cluster
//! side their slot checkpoints and floors. Conflicts: `seen` is per slot on
//! the cluster side and one for every slot on the standalone side
//! (`super::conflicts`, "A standalone server and a cluster"); a repair
//! touches a standalone side on its server, a cluster side on the master of
//! the key's slot.
//!
//! A cluster has db 0 only. A standalone side with keys in another db that
//! the sync owns fails the precheck ("databases", the one-way check in the
//! direction into the cluster: forward for a standalone A, the other way
//! round for a standalone B), and a write in such a db afterwards is held
//! by the cluster's applier like any entry naming a db the target lacks
//! (BLOCKED, `ferry skip` passes it over). `--dbs 0` leaves the others out.
//!
//! # The pair
//!
//! What the servers are is asked once, at the first start, and stored in
//! [`PAIR_FILE`] before either direction logs anything: a restart runs the
//! same pair whatever the servers answer then (a data dir of a ferry
//! before the file is read as before: A's shard map means two clusters,
//! a log two standalone servers).
//!
//! # What two-way refuses
//!
//! - `FLUSHALL`, `FLUSHDB`, `SWAPDB` (held like an entry the target refuses;
//!   `ferry skip` passes one over): applied to the other side they would
//!   destroy what its writers did there meanwhile.
//! - Any snapshot load once established (a full resync after a backlog was
//!   overrun, entries expired past `wal-ttl`): it would overwrite the
//!   loading side's writes the other direction has not carried yet. The
//!   node stops with the error.
//! - Redis before 7.0 on either side (every master of a cluster), a
//!   `db-map`, the relayed path, a switchover.
//!
//! The foreign-write sampler is off: both sides take writes by design.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::SyncConfig;
use super::run::NodeError;
use super::switchover::{
    check_master, client_error, cluster_masters, cluster_target_state, connect, ensure_backlog,
    is_cluster, mark_stream, read_status, urls, write_shard_files, Master, PartitionStart,
    TargetState,
};
use crate::apply::checkpoint::{checkpoint_key, Checkpoint};
use crate::apply::ApplyConfig;
use crate::config_units::HumanDuration;
use crate::listener::ListenerConfig;
use crate::position::{now_unix_ms, LogId, PartitionId, ReplOffset};
use crate::precheck::Verdict;
use crate::record::Record;
use crate::redis::url::RedisUrl;
use crate::status::NodeControl;
use crate::wal::{NewEntry, SourcePosition, Wal};

/// The source into the target.
pub const FORWARD: PartitionId = PartitionId(0);
/// The target into the source.
pub const BACKWARD: PartitionId = PartitionId(1);
/// Between clusters: the backward direction's first partition (module doc,
/// "Two clusters"); the forward partitions are below it.
pub const CLUSTER_BACKWARD_BASE: u32 = 1000;
/// Between clusters: the backward listener's shard map and slot table, in
/// the data dir.
pub const CLUSTER_BACKWARD_DIR: &str = "cluster.two-way";
/// Between clusters: written once every backward partition's first entry
/// is durable (the backward direction is established).
pub(super) const CLUSTER_ESTABLISHED_FILE: &str = "two-way.established";

/// What a two-way sync runs between (also what a switchover's direction
/// record says a direction runs between: `super::switchover`). Serialized
/// as [`Pair::as_str`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pair {
    /// Two standalone servers: partitions 0 and 1.
    Standalone,
    /// Two Redis Clusters: a partition per master of A below
    /// [`CLUSTER_BACKWARD_BASE`], one per master of B from it.
    Clusters,
    /// A standalone source A and a Redis Cluster target B (module doc,
    /// "A standalone server and a cluster"): partition 0 for A, one per
    /// master of B from [`CLUSTER_BACKWARD_BASE`].
    StandaloneCluster,
    /// A Redis Cluster source A and a standalone target B: a partition per
    /// master of A below [`CLUSTER_BACKWARD_BASE`], B's is
    /// [`CLUSTER_BACKWARD_BASE`].
    ClusterStandalone,
}

impl Pair {
    /// The pair of a standalone or cluster A and B.
    pub fn of(a_cluster: bool, b_cluster: bool) -> Pair {
        match (a_cluster, b_cluster) {
            (false, false) => Pair::Standalone,
            (true, true) => Pair::Clusters,
            (false, true) => Pair::StandaloneCluster,
            (true, false) => Pair::ClusterStandalone,
        }
    }

    /// Whether side `side` (0: A, the source; 1: B, the target) is a
    /// Redis Cluster.
    pub fn is_cluster(self, side: usize) -> bool {
        match self {
            Pair::Standalone => false,
            Pair::Clusters => true,
            Pair::StandaloneCluster => side == 1,
            Pair::ClusterStandalone => side == 0,
        }
    }

    /// The partitions of the backward direction (B's stream).
    pub fn backward(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Pair::Standalone => BACKWARD.0..=BACKWARD.0,
            Pair::Clusters | Pair::StandaloneCluster => CLUSTER_BACKWARD_BASE..=u32::MAX,
            Pair::ClusterStandalone => CLUSTER_BACKWARD_BASE..=CLUSTER_BACKWARD_BASE,
        }
    }

    /// The partitions of the forward direction (A's stream).
    pub fn forward(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Pair::Standalone | Pair::StandaloneCluster => FORWARD.0..=FORWARD.0,
            Pair::Clusters | Pair::ClusterStandalone => 0..=CLUSTER_BACKWARD_BASE - 1,
        }
    }

    /// Whether `partition` is of the backward direction.
    pub fn is_backward(self, partition: PartitionId) -> bool {
        self.backward().contains(&partition.0)
    }

    /// The name stored in [`PAIR_FILE`].
    pub fn as_str(self) -> &'static str {
        match self {
            Pair::Standalone => "standalone",
            Pair::Clusters => "clusters",
            Pair::StandaloneCluster => "standalone-cluster",
            Pair::ClusterStandalone => "cluster-standalone",
        }
    }

    pub(super) fn parse(text: &str) -> Option<Pair> {
        [
            Pair::Standalone,
            Pair::Clusters,
            Pair::StandaloneCluster,
            Pair::ClusterStandalone,
        ]
        .into_iter()
        .find(|pair| pair.as_str() == text)
    }
}

/// The pair a data dir's two-way sync runs between, in the data dir:
/// written once the servers said what they are, before either direction
/// logs anything, and read by every later start (module doc, "The pair").
pub const PAIR_FILE: &str = "two-way.pair";

/// The pair stored in `data_dir` ([`PAIR_FILE`]); without the file (a data
/// dir of a ferry before it, which knew two pairs only), what the data
/// dir holds: the forward listener's shard map (two clusters), or a log
/// (two standalone servers). `Ok(None)`: nothing tells yet.
pub fn stored_pair(data_dir: &std::path::Path, wal: Option<&Wal>) -> Result<Option<Pair>, String> {
    let path = data_dir.join(PAIR_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return Pair::parse(text.trim()).map(Some).ok_or_else(|| {
                format!(
                    "{}: {:?} is not a two-way pair (standalone, clusters, standalone-cluster, \
                     cluster-standalone)",
                    path.display(),
                    text.trim()
                )
            })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(format!("reading {}: {error}", path.display())),
    }
    if crate::listener::ClusterSource::has_map(data_dir) {
        return Ok(Some(Pair::Clusters));
    }
    let holds_log = wal.is_some_and(|wal| {
        wal.partitions()
            .into_iter()
            .any(|p| matches!(wal.last_log_id(p), Ok(Some(_))))
    });
    Ok(holds_log.then_some(Pair::Standalone))
}

/// What `cfg`'s two-way sync runs between: the pair stored in the data dir
/// ([`stored_pair`], which [`settle_pair`] wrote at the first start); else
/// what the servers say, or with servers that do not answer what the seed
/// lists say (a list of more than one address is a cluster).
pub(super) async fn pair(cfg: &SyncConfig, wal: &Wal) -> Result<Pair, NodeError> {
    if let Some(pair) = stored_pair(&cfg.data_dir, Some(wal)).map_err(NodeError::Config)? {
        return Ok(pair);
    }
    match servers_pair(cfg).await? {
        Ok(pair) => Ok(pair),
        Err(why) => guessed_pair(cfg, &why),
    }
}

/// How often the first start asks the servers again what they are.
const PAIR_RETRY: Duration = Duration::from_secs(1);

/// The first start of a two-way sync (nothing stored yet): asks both sides
/// whether they run Redis Cluster until both answer, and stores the pair
/// in [`PAIR_FILE`] before any stage starts (module doc, "The pair"): a
/// guess from the seed lists could be wrong, and nothing can be replicated
/// before both sides answer anyway. `Ok(None)`: `stop` fired first.
pub(super) async fn settle_pair(
    cfg: &SyncConfig,
    wal: &Wal,
    stop: &CancellationToken,
) -> Result<Option<Pair>, NodeError> {
    loop {
        if let Some(pair) = stored_pair(&cfg.data_dir, Some(wal)).map_err(NodeError::Config)? {
            return Ok(Some(pair));
        }
        match servers_pair(cfg).await? {
            Ok(pair) => {
                let path = cfg.data_dir.join(PAIR_FILE);
                super::run::write_atomically(&path, &format!("{}\n", pair.as_str())).map_err(
                    |error| NodeError::Io {
                        what: format!("writing {}", path.display()),
                        error,
                    },
                )?;
                info!(
                    pair = pair.as_str(),
                    "two-way sync: the pair is stored in the data dir"
                );
                return Ok(Some(pair));
            }
            Err(why) => {
                warn!(%why, "two-way sync: waiting for both sides to answer whether they run Redis Cluster (the first start stores the pair)")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(PAIR_RETRY) => {}
        }
    }
}

/// What the servers of `cfg` are: `Err` with why when a side does not
/// answer.
async fn servers_pair(cfg: &SyncConfig) -> Result<Result<Pair, String>, NodeError> {
    let (a, b) = urls(cfg)?;
    let a_cluster = match is_cluster(&a, "source").await {
        Ok(cluster) => cluster,
        Err(why) => return Ok(Err(why)),
    };
    Ok(is_cluster(&b, "target")
        .await
        .map(|b_cluster| Pair::of(a_cluster, b_cluster)))
}

/// The pair the seed lists suggest (a list of more than one address is a
/// cluster), for servers that do not answer.
fn guessed_pair(cfg: &SyncConfig, why: &str) -> Result<Pair, NodeError> {
    let (a, b) = urls(cfg)?;
    let pair = Pair::of(a.len() > 1, b.len() > 1);
    warn!(%why, ?pair, "two-way sync: cannot ask the servers whether they run Redis Cluster; going by the seed lists");
    Ok(pair)
}

/// Where the backward listener keeps a cluster's shard map and slot table.
pub(super) fn backward_cluster_dir(cfg: &SyncConfig, pair: Pair) -> std::path::PathBuf {
    match pair {
        Pair::Standalone => cfg.data_dir.clone(),
        // A standalone B's listener too: the data dir holds A's shard map
        // when A is a cluster, which would make B's listener one.
        Pair::Clusters | Pair::StandaloneCluster | Pair::ClusterStandalone => {
            cfg.data_dir.join(CLUSTER_BACKWARD_DIR)
        }
    }
}

/// The Redis version both sides need (module doc, "What two-way refuses").
pub(super) const MIN_VERSION: (u32, u32) = (7, 0);
/// How often establishing looks at the forward applier, and retries.
const ESTABLISH_POLL: Duration = Duration::from_millis(200);
pub(super) const ESTABLISH_RETRY: Duration = Duration::from_secs(1);

/// Whether the backward direction is established: its first entry is
/// durable (with a cluster on either side, every backward partition's: the
/// file written after the last).
pub(super) fn established(cfg: &SyncConfig, wal: &Wal, pair: Pair) -> Result<bool, NodeError> {
    match pair {
        Pair::Standalone => wal
            .last_log_id(BACKWARD)
            .map(|last| last.is_some())
            .map_err(|error| NodeError::Fatal(format!("reading the WAL: {error}"))),
        Pair::Clusters | Pair::StandaloneCluster | Pair::ClusterStandalone => {
            Ok(cfg.data_dir.join(CLUSTER_ESTABLISHED_FILE).exists())
        }
    }
}

/// The forward applier's config: echoes of the backward partitions
/// covered, loads refused once established.
pub(super) fn forward_apply(cfg: &SyncConfig, established: bool, pair: Pair) -> ApplyConfig {
    ApplyConfig {
        two_way_peers: Some(pair.backward()),
        refuse_loads: established,
        foreign_writes_every: HumanDuration(Duration::ZERO),
        ..cfg.apply.clone()
    }
}

/// The backward listener: B as its source, partition 1 between standalone
/// servers, [`CLUSTER_BACKWARD_BASE`] for a standalone B paired with a
/// cluster (a cluster B's shard map in [`CLUSTER_BACKWARD_DIR`] numbers
/// its partitions).
pub(super) fn backward_listener(cfg: &SyncConfig, pair: Pair) -> ListenerConfig {
    let mut listener = cfg.listener.clone();
    listener.source = cfg.apply.target.clone();
    listener.source_password_file = cfg.apply.target_password_file.clone();
    listener.source_password_env = cfg.apply.target_password_env.clone();
    listener.partition = match pair {
        Pair::Standalone => BACKWARD.0,
        Pair::ClusterStandalone => CLUSTER_BACKWARD_BASE,
        Pair::Clusters | Pair::StandaloneCluster => 0,
    };
    listener
}

/// The backward applier: A as its target, echoes of the forward partitions
/// covered, every load refused.
pub(super) fn backward_apply(cfg: &SyncConfig, pair: Pair) -> ApplyConfig {
    let mut apply = forward_apply(cfg, true, pair);
    apply.target = cfg.listener.source.clone();
    apply.target_password_file = cfg.listener.source_password_file.clone();
    apply.target_password_env = cfg.listener.source_password_env.clone();
    apply.two_way_peers = Some(pair.forward());
    apply
}

/// The conflict policy with both sides' servers, for a winner policy.
pub(super) fn resolution(cfg: &SyncConfig, pair: Pair) -> Option<super::conflicts::Resolution> {
    if cfg.conflict == super::config::ConflictPolicy::Report {
        return None;
    }
    let (a, b) = urls(cfg).ok()?;
    Some(super::conflicts::Resolution {
        policy: cfg.conflict,
        sides: [a, b],
        pair,
    })
}

/// Both sides of `pair` checked: each server of a standalone side, and
/// every master of a cluster side, a master of Redis 7.0 or later; a
/// cluster with every slot served, none moving, and a cluster A with few
/// enough masters for its partitions to stay below
/// [`CLUSTER_BACKWARD_BASE`]. Returns B's masters (a cluster's by first
/// slot: master `i` starts partition [`CLUSTER_BACKWARD_BASE`] + `i`; a
/// standalone B is its one server, without node id or slots).
async fn check_pair(a: &[RedisUrl], b: &[RedisUrl], pair: Pair) -> Result<Vec<Master>, String> {
    let why = |why: String| {
        format!(
            "two-way sync: {why} (before 7.0 a script may be replicated verbatim instead of by \
             its effects, and ferry's echo rule rests on how 7.0 propagates transactions)"
        )
    };
    let mut masters = Vec::new();
    for (index, (seeds, side)) in [(a, "source"), (b, "target")].into_iter().enumerate() {
        if pair.is_cluster(index) {
            let (found, _) = cluster_masters(seeds, side, MIN_VERSION)
                .await
                .map_err(why)?;
            // A's partitions (one per master, more as shards come) must
            // stay below the ids of B's.
            if index == 0 && found.len() >= CLUSTER_BACKWARD_BASE as usize / 2 {
                return Err(format!(
                    "two-way sync: the source cluster has {} masters; two-way takes at most {} \
                     (its partitions must stay below {CLUSTER_BACKWARD_BASE}, where the \
                     target's begin, with room for shards added later)",
                    found.len(),
                    CLUSTER_BACKWARD_BASE / 2 - 1
                ));
            }
            masters = found;
        } else {
            let url = seeds.first().ok_or_else(|| format!("no {side} address"))?;
            let mut client = connect(url).await?;
            check_master(&mut client, &url.addr(), side, MIN_VERSION)
                .await
                .map_err(why)?;
            masters = vec![Master::standalone(url)];
        }
    }
    Ok(masters)
}

/// The precheck of a first two-way sync beside the one-way one: the
/// one-way checks the other way round (B as the source, A as the target,
/// whose data is expected), and both sides' versions. A side that does
/// not answer yet is left to the establishing, which checks again.
pub(crate) async fn precheck(cfg: &SyncConfig) -> Result<(), NodeError> {
    let (a, b) = urls(cfg)?;
    let pair = match servers_pair(cfg).await? {
        Ok(pair) => pair,
        Err(why) => guessed_pair(cfg, &why)?,
    };
    let mut reverse = crate::precheck::PrecheckConfig::new(b.clone(), a.clone());
    reverse.sample = Duration::ZERO;
    reverse.existing_data = crate::apply::ExistingData::Keep;
    reverse.keyspace = cfg
        .apply
        .keyspace()
        .map_err(|error| NodeError::Config(error.to_string()))?;
    reverse.id = Some(cfg.apply.drainer_id.clone());
    let report = crate::precheck::run(&reverse).await;
    let waits = |check: &str| check.ends_with(" reachable") || check.ends_with(" cluster slots");
    if report
        .checks
        .iter()
        .any(|c| c.verdict == Verdict::Fail && !waits(&c.check))
    {
        return Err(NodeError::Precheck(format!(
            "the other way round (two-way sync: the target replicated into the source):\n{}",
            report.render()
        )));
    }
    for check in report.checks.iter().filter(|c| c.verdict == Verdict::Warn) {
        warn!(check = %check.check, detail = %check.detail, "two-way precheck warning (the target into the source)");
    }
    if a.is_empty() || b.is_empty() {
        return Err(NodeError::Config(
            "two-way sync: no source or no target".into(),
        ));
    }
    match check_pair(&a, &b, pair).await.map(|_| ()) {
        Err(why) if !unreachable(&why) => Err(NodeError::Precheck(why)),
        Err(why) => {
            warn!(%why, "two-way precheck: a side does not answer yet; checked again before the other direction starts");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Whether a check failed because a server did not answer (retried).
pub(super) fn unreachable(why: &str) -> bool {
    why.contains("connecting to") || why.contains("INFO") || why.contains("cluster: ")
}

/// Establishes the backward direction (module doc) once the forward
/// applier holds the first full sync in B: `Ok(())` when partition 1's
/// first entry is durable; `Err` for a refusal no retry fixes. Other
/// failures are logged and retried; returns early (with `Ok`) only if
/// `stop` fires, which the caller sees.
pub(super) async fn establish(
    cfg: SyncConfig,
    wal: Wal,
    node: Arc<dyn NodeControl>,
    stop: CancellationToken,
) -> Result<(), String> {
    let (a, b) = urls(&cfg).map_err(|e| e.to_string())?;
    if a.is_empty() || b.is_empty() {
        return Err("no source or no target".into());
    }
    let pair = pair(&cfg, &wal).await.map_err(|e| e.to_string())?;
    if !wait_full_sync(&node, &cfg.apply.drainer_id, &b, pair, None, &stop).await? {
        return Ok(());
    }
    let attempt = || async {
        match pair {
            Pair::Standalone => seed(&cfg, &wal, &a[0], &b[0]).await,
            Pair::Clusters | Pair::StandaloneCluster | Pair::ClusterStandalone => {
                seed_clusters(&cfg, &wal, &a, &b, pair).await
            }
        }
    };
    retry_seeding(
        &stop,
        "two-way sync established: writes on either side replicate to the other",
        "two-way sync: cannot start the target -> source direction yet; retrying",
        attempt,
    )
    .await
}

/// Runs `attempt` until it establishes the backward direction (logged as
/// `established`, with its detail and how long the attempt took) or is
/// refused (`Err`), or `stop` fires (`Ok`, which the caller sees); a
/// failed attempt is logged as `retrying` and runs again after
/// [`ESTABLISH_RETRY`].
pub(super) async fn retry_seeding<F, Fut>(
    stop: &CancellationToken,
    established: &str,
    retrying: &str,
    mut attempt: F,
) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, Seeding>>,
{
    loop {
        let started = Instant::now();
        match attempt().await {
            Ok(detail) => {
                info!(ms = started.elapsed().as_millis() as u64, %detail, "{established}");
                return Ok(());
            }
            Err(Seeding::Refused(why)) => return Err(why),
            Err(Seeding::Failed(why)) => warn!(%why, "{retrying}"),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(ESTABLISH_RETRY) => {}
        }
    }
}

/// Waits until the first full sync is in B: every forward partition's
/// applier (of `node`, drainer `drainer_id`) online after a load, and B's
/// checkpoints (a cluster's floors) of them `applied` in a loaded epoch.
/// The forward partitions are `expected` (a site's: A's masters), or as
/// many as `node` has listeners. `Ok(false)`: `stop` fired first.
pub(super) async fn wait_full_sync(
    node: &Arc<dyn NodeControl>,
    drainer_id: &str,
    b: &[RedisUrl],
    pair: Pair,
    expected: Option<usize>,
    stop: &CancellationToken,
) -> Result<bool, String> {
    loop {
        if stop.is_cancelled() {
            return Ok(false);
        }
        let status = read_status(node).await?;
        let forward: Vec<u32> = status
            .drainers
            .iter()
            .filter(|d| pair.forward().contains(&d.partition))
            .filter(|d| {
                d.epoch > 0
                    && d.applied > 0
                    && d.state == "ONLINE"
                    && d.snapshot_load.as_ref().map_or(true, |load| load.done)
            })
            .map(|d| d.partition)
            .collect();
        // Every partition of the forward direction (one per master of A).
        let expected = expected.unwrap_or(status.listeners.len());
        let loaded = !forward.is_empty() && forward.len() >= expected;
        // The status may show the load's progress between its states; the
        // target's own checkpoints say whether the load is committed.
        if loaded && full_sync_committed(drainer_id, b, pair.is_cluster(1), &forward).await {
            return Ok(true);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            _ = tokio::time::sleep(ESTABLISH_POLL) => {}
        }
    }
}

/// Whether the target's checkpoint (a cluster's floor) of each forward
/// partition is `applied` in a loaded epoch (not `loading`, not absent).
async fn full_sync_committed(
    drainer_id: &str,
    b: &[RedisUrl],
    b_cluster: bool,
    partitions: &[u32],
) -> bool {
    let Some(template) = b.first() else {
        return false;
    };
    let topology = match b_cluster {
        true => match crate::redis::cluster::discover(b).await {
            Ok(topology) => Some(topology),
            Err(_) => return false,
        },
        false => None,
    };
    for &partition in partitions {
        let key = checkpoint_key(drainer_id, PartitionId(partition));
        let url = match &topology {
            None => template.clone(),
            Some(topology) => {
                let slot = crate::redis::command::key_hash_slot(&key);
                match topology.master_for_slot(slot) {
                    Some(node) => crate::redis::cluster::Topology::url_for(node, template),
                    None => return false,
                }
            }
        };
        let Ok(mut client) = connect(&url).await else {
            return false;
        };
        let committed = match client.call([b"GET".as_slice(), key.as_slice()]).await {
            Ok(crate::redis::resp::Frame::Bulk(value)) => matches!(
                Checkpoint::decode(&value),
                Ok(Checkpoint::Applied { epoch, .. }) if epoch > 0
            ),
            _ => false,
        };
        if !committed {
            return false;
        }
    }
    true
}

pub(super) enum Seeding {
    Refused(String),
    Failed(String),
}

/// Partition 1's history, A's checkpoint of it, B's point and entry 1.
/// Marks `master`'s stream (`name`, `note`) and stores the mark as entry 1
/// of `partition`: the partition starts at that exact point. Returns the
/// point's replid and offset.
pub(super) async fn seed_partition(
    wal: &Wal,
    partition: PartitionId,
    master: &RedisUrl,
    name: &str,
    note: &str,
) -> Result<(String, u64), Seeding> {
    let (set, replid, offset) = mark_stream(master, name, note)
        .await
        .map_err(Seeding::Failed)?;
    let position = SourcePosition {
        replid: replid.as_str().into(),
        offset: ReplOffset(offset),
        db: 0,
    };
    let payload = Record::encode_write(0, &[set], false);
    wal.append(partition, vec![NewEntry::new(position, payload)])
        .await
        .map_err(|error| {
            Seeding::Failed(format!("storing partition {partition}'s start: {error}"))
        })?;
    Ok((replid, offset))
}

async fn seed(cfg: &SyncConfig, wal: &Wal, a: &RedisUrl, b: &RedisUrl) -> Result<String, Seeding> {
    check_pair(
        std::slice::from_ref(a),
        std::slice::from_ref(b),
        Pair::Standalone,
    )
    .await
    .map_err(|why| {
        if why.contains("connecting to") || why.contains("INFO") {
            Seeding::Failed(why)
        } else {
            Seeding::Refused(why)
        }
    })?;
    let failed = Seeding::Failed;
    ensure_backlog(b).await.map_err(failed)?;
    let history = wal
        .open_history(BACKWARD, &cfg.listener.id)
        .await
        .map_err(|error| Seeding::Failed(format!("partition 1's history: {error}")))?;
    let key = checkpoint_key(&cfg.apply.drainer_id, BACKWARD);
    let value = Checkpoint::Applied {
        log_id: LogId(1),
        epoch: 0,
        log: history.log_tag,
        source: None,
    }
    .encode();
    let mut client = connect(a).await.map_err(Seeding::Failed)?;
    client
        .call([b"SET".as_slice(), key.as_slice(), value.as_bytes()])
        .await
        .map_err(|e| Seeding::Failed(client_error("SET of the checkpoint", &a.addr())(e)))?;
    let note = format!(
        "{{\"unix-ms\":{},\"source\":\"{}\"}}",
        now_unix_ms(),
        a.addr()
    );
    let (replid, offset) =
        seed_partition(wal, BACKWARD, b, &format!("two-way:{}", cfg.id), &note).await?;
    Ok(format!(
        "partition 1 starts at {} replid {replid} offset {offset}, log {:016x}",
        b.addr(),
        history.log_tag
    ))
}

/// With a cluster on either side (module doc, "Two clusters", "A
/// standalone server and a cluster"): [`seed_backward`] for `cfg`'s sync,
/// whose backward appliers read the same WAL as its backward listener.
async fn seed_clusters(
    cfg: &SyncConfig,
    wal: &Wal,
    a: &[RedisUrl],
    b: &[RedisUrl],
    pair: Pair,
) -> Result<String, Seeding> {
    let plan = Backward {
        a,
        b,
        pair,
        listener_id: &cfg.listener.id,
        a_drainer: &cfg.apply.drainer_id,
        same_wal: true,
        mark_id: &cfg.id,
        data_dir: &cfg.data_dir,
    };
    seed_backward(&plan, wal).await
}

/// What establishing a backward direction with a cluster on either side
/// takes ([`seed_backward`]): `ferry sync --two-way`'s, or side b's of a
/// `ferry site` pair (`super::site`).
pub(super) struct Backward<'a> {
    /// A's seeds (a standalone A's server): the backward appliers' target.
    pub(super) a: &'a [RedisUrl],
    /// B's seeds (a standalone B's server): the backward listener's source.
    pub(super) b: &'a [RedisUrl],
    pub(super) pair: Pair,
    /// The backward listener's id: the owner of the partitions' logs.
    pub(super) listener_id: &'a str,
    /// The drainer id of the appliers that write A.
    pub(super) a_drainer: &'a str,
    /// Whether those appliers read this WAL (`ferry sync`): their floors
    /// name its logs. A site's drainer reads its own WAL, whose logs of
    /// the partitions have their own tags: the floors name none (a
    /// checkpoint without a tag is taken as the reader's log).
    pub(super) same_wal: bool,
    /// The id in the marks' names (`two-way:{ferry:N}:<id>`).
    pub(super) mark_id: &'a str,
    /// Where [`CLUSTER_BACKWARD_DIR`] and [`CLUSTER_ESTABLISHED_FILE`] go.
    pub(super) data_dir: &'a std::path::Path,
}

/// A cluster B's backward shard map and slot table, the backward
/// partitions' histories, A prepared as their target (for a cluster B the
/// owner map and slot scopes; the floors, on a standalone A the plain
/// checkpoints), each master of B (a standalone B: the server) marked and
/// its mark stored as its partition's entry 1, then
/// [`CLUSTER_ESTABLISHED_FILE`]. A retry after a partial attempt keeps the
/// partitions whose entry 1 is durable (their marks stand: what B wrote
/// after one is in its stream after it) and marks the others, as long as
/// B's masters are the same.
pub(super) async fn seed_backward(plan: &Backward<'_>, wal: &Wal) -> Result<String, Seeding> {
    let (a, b, pair) = (plan.a, plan.b, plan.pair);
    let b_cluster = pair.is_cluster(1);
    let masters = check_pair(a, b, pair)
        .await
        .map_err(|why| match unreachable(&why) {
            true => Seeding::Failed(why),
            false => Seeding::Refused(why),
        })?;
    let failed = Seeding::Failed;
    for master in &masters {
        ensure_backlog(&master.url).await.map_err(failed)?;
    }
    let partitions: Vec<PartitionId> = (0..masters.len())
        .map(|i| PartitionId(CLUSTER_BACKWARD_BASE + u32::try_from(i).unwrap_or(u32::MAX)))
        .collect();
    let mut started = Vec::with_capacity(partitions.len());
    for &partition in &partitions {
        let last = wal.last_log_id(partition).map_err(|error| {
            Seeding::Failed(format!("reading partition {partition} of the WAL: {error}"))
        })?;
        started.push(last.is_some());
    }
    let dir = plan.data_dir.join(CLUSTER_BACKWARD_DIR);
    let map_path = dir.join(crate::listener::SHARD_MAP_FILE);
    if b_cluster && started.iter().any(|s| *s) {
        // The partitions of an earlier attempt must still be these masters.
        let map = crate::listener::ShardMap::load(&map_path)
            .map_err(|error| Seeding::Failed(error.to_string()))?
            .unwrap_or_default();
        for ((master, partition), _) in masters
            .iter()
            .zip(&partitions)
            .zip(&started)
            .filter(|(_, started)| **started)
        {
            if map.partition_of_node(&master.id) != Some(*partition) {
                return Err(Seeding::Refused(format!(
                    "the target cluster's masters changed while the two-way sync was being \
                     established (partition {partition} started at another master than {} ({})); \
                     give the sync a new data dir",
                    master.url.addr(),
                    master.id
                )));
            }
        }
    }
    // A standalone B's listener has no shard map: its partition is the
    // one its config names.
    if b_cluster {
        write_shard_files(&dir, &masters, CLUSTER_BACKWARD_BASE).map_err(failed)?;
    }
    let mut starts = Vec::with_capacity(partitions.len());
    for (master, &partition) in masters.iter().zip(&partitions) {
        let history = wal
            .open_history(partition, plan.listener_id)
            .await
            .map_err(|error| {
                Seeding::Failed(format!("partition {partition}'s history: {error}"))
            })?;
        starts.push(PartitionStart {
            partition: partition.0,
            master: master.url.addr(),
            node_id: master.id.clone(),
            slots: master.slots.to_string(),
            replid: String::new(),
            offset: 0,
            log_tag: if plan.same_wal { history.log_tag } else { 0 },
        });
    }
    let target = TargetState {
        targets: a,
        cluster: pair.is_cluster(0),
        drainer: plan.a_drainer,
        origin: &plan.data_dir.join(CLUSTER_ESTABLISHED_FILE),
    };
    let prepared = cluster_target_state(&target, &starts)
        .await
        .map_err(failed)?;
    let note = format!(
        "{{\"unix-ms\":{},\"source\":\"{}\"}}",
        now_unix_ms(),
        a.first().map(RedisUrl::addr).unwrap_or_default()
    );
    super::switchover::hold_for_test("two-way-prepared").await;
    let mut marked = Vec::new();
    for ((master, &partition), started) in masters.iter().zip(&partitions).zip(&started) {
        if *started {
            continue;
        }
        let name = match b_cluster {
            true => {
                let slot = master.slots.first().ok_or_else(|| {
                    Seeding::Failed(format!("{} serves no slot", master.url.addr()))
                })?;
                format!(
                    "two-way:{}:{}",
                    crate::redis::cluster::tag_for_slot(slot),
                    plan.mark_id
                )
            }
            false => format!("two-way:{}", plan.mark_id),
        };
        let (replid, offset) = seed_partition(wal, partition, &master.url, &name, &note).await?;
        marked.push(format!(
            "partition {partition} at {} replid {replid} offset {offset}",
            master.url.addr()
        ));
        if marked.len() == 1 {
            super::switchover::hold_for_test("two-way-marked-one").await;
        }
    }
    super::switchover::hold_for_test("two-way-marked-all").await;
    let path = plan.data_dir.join(CLUSTER_ESTABLISHED_FILE);
    let text = serde_json::to_string_pretty(&starts)
        .map_err(|error| Seeding::Failed(error.to_string()))?
        + "\n";
    super::run::write_atomically(&path, &text)
        .map_err(|error| Seeding::Failed(format!("writing {}: {error}", path.display())))?;
    Ok(format!(
        "{} partitions from {}: {}; the source: {prepared}",
        partitions.len(),
        CLUSTER_BACKWARD_BASE,
        marked.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two directions' partitions never meet, in any pair, and a side
    /// is a cluster where the pair says so.
    #[test]
    fn every_pair_keeps_the_directions_apart() {
        for (a_cluster, b_cluster) in [(false, false), (true, true), (false, true), (true, false)] {
            let pair = Pair::of(a_cluster, b_cluster);
            assert_eq!(
                (pair.is_cluster(0), pair.is_cluster(1)),
                (a_cluster, b_cluster)
            );
            let (forward, backward) = (pair.forward(), pair.backward());
            assert!(
                forward.end() < backward.start(),
                "{pair:?}: {forward:?} {backward:?}"
            );
            assert!(forward.contains(&FORWARD.0));
            assert!(!pair.is_backward(FORWARD));
            assert_eq!(Pair::parse(pair.as_str()), Some(pair));
            // A switchover's direction record stores the pair by that name.
            let json = serde_json::to_string(&pair).unwrap();
            assert_eq!(json, format!("\"{}\"", pair.as_str()));
            assert_eq!(serde_json::from_str::<Pair>(&json).unwrap(), pair);
        }
        // A standalone side's one partition: A's 0, B's 1000.
        assert_eq!(Pair::StandaloneCluster.forward(), 0..=0);
        assert_eq!(Pair::ClusterStandalone.backward(), 1000..=1000);
        assert!(Pair::StandaloneCluster.is_backward(PartitionId(1002)));
        assert!(!Pair::ClusterStandalone.is_backward(PartitionId(5)));
        assert_eq!(Pair::parse("mixed"), None);
    }

    /// The stored pair wins over what the data dir holds; without it an
    /// older ferry's data dir is read as before, and a bad file is an
    /// error naming it.
    #[test]
    fn the_stored_pair_is_what_a_restart_runs() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(stored_pair(dir.path(), None), Ok(None));
        // A's shard map, as a cluster A's forward listener writes it.
        std::fs::write(dir.path().join(crate::listener::SHARD_MAP_FILE), "{}").unwrap();
        assert_eq!(stored_pair(dir.path(), None), Ok(Some(Pair::Clusters)));
        std::fs::write(dir.path().join(PAIR_FILE), "cluster-standalone\n").unwrap();
        assert_eq!(
            stored_pair(dir.path(), None),
            Ok(Some(Pair::ClusterStandalone))
        );
        std::fs::write(dir.path().join(PAIR_FILE), "both\n").unwrap();
        let error = stored_pair(dir.path(), None).unwrap_err();
        assert!(
            error.contains(PAIR_FILE) && error.contains("both"),
            "{error}"
        );
    }
}
