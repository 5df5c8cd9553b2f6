//! Two-way sync (issue 11, item 1): `ferry sync --two-way` between two
//! standalone Redis 7 servers A (`--source`) and B (`--target`), or two
//! Redis 7 Clusters ("Two clusters" below).
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
//! Between two clusters ([`Pair::Clusters`]; a standalone server paired
//! with a cluster is refused) each direction is what a one-way sync of a
//! cluster into a cluster is (apply module, "Applying into a Redis Cluster
//! target"), in the same one WAL:
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
//!   standalone server with a cluster, a `db-map`, the relayed path, a
//!   switchover.
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
const CLUSTER_ESTABLISHED_FILE: &str = "two-way.established";

/// What a two-way sync runs between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pair {
    /// Two standalone servers: partitions 0 and 1.
    Standalone,
    /// Two Redis Clusters: a partition per master of A below
    /// [`CLUSTER_BACKWARD_BASE`], one per master of B from it.
    Clusters,
}

impl Pair {
    /// The partitions of the backward direction (B's stream).
    pub fn backward(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Pair::Standalone => BACKWARD.0..=BACKWARD.0,
            Pair::Clusters => CLUSTER_BACKWARD_BASE..=u32::MAX,
        }
    }

    /// The partitions of the forward direction (A's stream).
    pub fn forward(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Pair::Standalone => FORWARD.0..=FORWARD.0,
            Pair::Clusters => 0..=CLUSTER_BACKWARD_BASE - 1,
        }
    }

    /// Whether `partition` is of the backward direction.
    pub fn is_backward(self, partition: PartitionId) -> bool {
        self.backward().contains(&partition.0)
    }
}

/// What `cfg`'s two-way sync runs between: two clusters once the data dir
/// holds the forward listener's shard map; else what the servers say (a
/// standalone server and a cluster are refused). With a standalone log and
/// no map, or servers that do not answer, the seed lists decide.
pub(super) async fn pair(cfg: &SyncConfig, wal: &Wal) -> Result<Pair, NodeError> {
    if crate::listener::ClusterSource::has_map(&cfg.data_dir) {
        return Ok(Pair::Clusters);
    }
    let holds_log = wal
        .partitions()
        .into_iter()
        .any(|p| matches!(wal.last_log_id(p), Ok(Some(_))));
    if holds_log {
        return Ok(Pair::Standalone);
    }
    servers_pair(cfg).await
}

/// What the servers of `cfg` are (module doc, "What two-way refuses").
async fn servers_pair(cfg: &SyncConfig) -> Result<Pair, NodeError> {
    let (a, b) = urls(cfg)?;
    let asked = async {
        let a_cluster = is_cluster(&a, "source").await?;
        let b_cluster = is_cluster(&b, "target").await?;
        Ok::<_, String>((a_cluster, b_cluster))
    }
    .await;
    match asked {
        Ok((false, false)) => Ok(Pair::Standalone),
        Ok((true, true)) => Ok(Pair::Clusters),
        Ok((a_cluster, _)) => {
            let kind = |cluster: bool| match cluster {
                true => "a Redis Cluster",
                false => "a standalone server",
            };
            Err(NodeError::Precheck(format!(
                "two-way sync: the source is {} and the target {}; two-way sync runs between two \
                 standalone servers or between two Redis Clusters (a cluster's writes come in \
                 one stream per master, which a standalone side cannot give back by slot)",
                kind(a_cluster),
                kind(!a_cluster)
            )))
        }
        Err(why) => {
            let pair = match a.len() > 1 || b.len() > 1 {
                true => Pair::Clusters,
                false => Pair::Standalone,
            };
            warn!(%why, ?pair, "two-way sync: cannot ask the servers whether they run Redis Cluster; going by the seed lists");
            Ok(pair)
        }
    }
}

/// Where the backward listener keeps a cluster's shard map and slot table.
pub(super) fn backward_cluster_dir(cfg: &SyncConfig, pair: Pair) -> std::path::PathBuf {
    match pair {
        Pair::Standalone => cfg.data_dir.clone(),
        Pair::Clusters => cfg.data_dir.join(CLUSTER_BACKWARD_DIR),
    }
}
/// The Redis version both sides need (module doc, "What two-way refuses").
const MIN_VERSION: (u32, u32) = (7, 0);
/// How often establishing looks at the forward applier, and retries.
const ESTABLISH_POLL: Duration = Duration::from_millis(200);
const ESTABLISH_RETRY: Duration = Duration::from_secs(1);

/// Whether the backward direction is established: its first entry is
/// durable (between clusters, every backward partition's: the file written
/// after the last).
pub(super) fn established(cfg: &SyncConfig, wal: &Wal, pair: Pair) -> Result<bool, NodeError> {
    match pair {
        Pair::Standalone => wal
            .last_log_id(BACKWARD)
            .map(|last| last.is_some())
            .map_err(|error| NodeError::Fatal(format!("reading the WAL: {error}"))),
        Pair::Clusters => Ok(cfg.data_dir.join(CLUSTER_ESTABLISHED_FILE).exists()),
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

/// The backward listener: B as its source, partition 1 (between clusters,
/// the shard map in [`CLUSTER_BACKWARD_DIR`] numbers them).
pub(super) fn backward_listener(cfg: &SyncConfig, pair: Pair) -> ListenerConfig {
    let mut listener = cfg.listener.clone();
    listener.source = cfg.apply.target.clone();
    listener.source_password_file = cfg.apply.target_password_file.clone();
    listener.source_password_env = cfg.apply.target_password_env.clone();
    listener.partition = match pair {
        Pair::Standalone => BACKWARD.0,
        Pair::Clusters => 0,
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

/// `cfg` as the backward direction's: B the source, A the target.
fn backward_cfg(cfg: &SyncConfig, pair: Pair) -> SyncConfig {
    let mut backward = cfg.clone();
    backward.listener = backward_listener(cfg, pair);
    backward.apply = backward_apply(cfg, pair);
    backward
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

/// Between clusters: every master of A and of B a master of Redis 7.0 or
/// later, every slot served, none moving; returns B's masters (by first
/// slot: master `i` starts partition [`CLUSTER_BACKWARD_BASE`] + `i`).
async fn check_clusters(a: &[RedisUrl], b: &[RedisUrl]) -> Result<Vec<Master>, String> {
    let why = |why: String| {
        format!(
            "two-way sync: {why} (before 7.0 a script may be replicated verbatim instead of by \
             its effects, and ferry's echo rule rests on how 7.0 propagates transactions)"
        )
    };
    let (sources, _) = cluster_masters(a, "source", MIN_VERSION)
        .await
        .map_err(why)?;
    // A's partitions (one per master, more as shards come) must stay below
    // the ids of B's.
    if sources.len() >= CLUSTER_BACKWARD_BASE as usize / 2 {
        return Err(format!(
            "two-way sync: the source cluster has {} masters; two-way takes at most {} (its \
             partitions must stay below {CLUSTER_BACKWARD_BASE}, where the target's begin, with \
             room for shards added later)",
            sources.len(),
            CLUSTER_BACKWARD_BASE / 2 - 1
        ));
    }
    let (masters, _) = cluster_masters(b, "target", MIN_VERSION)
        .await
        .map_err(why)?;
    Ok(masters)
}

/// A and B: standalone masters of Redis 7.0 or later.
async fn check_sides(a: &RedisUrl, b: &RedisUrl) -> Result<(), String> {
    for (url, side) in [(a, "source"), (b, "target")] {
        let mut client = connect(url).await?;
        check_master(&mut client, &url.addr(), side, MIN_VERSION)
            .await
            .map_err(|why| {
                format!(
                    "two-way sync: {why} (before 7.0 a script may be replicated verbatim instead \
                     of by its effects, and ferry's echo rule rests on how 7.0 propagates \
                     transactions)"
                )
            })?;
    }
    Ok(())
}

/// The precheck of a first two-way sync beside the one-way one: the
/// one-way checks the other way round (B as the source, A as the target,
/// whose data is expected), and both sides' versions. A side that does
/// not answer yet is left to the establishing, which checks again.
pub(crate) async fn precheck(cfg: &SyncConfig) -> Result<(), NodeError> {
    let (a, b) = urls(cfg)?;
    let pair = servers_pair(cfg).await?;
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
    let checked = match pair {
        Pair::Clusters => check_clusters(&a, &b).await.map(|_| ()),
        Pair::Standalone => {
            let (Some(a), Some(b)) = (a.first(), b.first()) else {
                return Err(NodeError::Config(
                    "two-way sync: no source or no target".into(),
                ));
            };
            check_sides(a, b).await
        }
    };
    match checked {
        Err(why) if !unreachable(&why) => Err(NodeError::Precheck(why)),
        Err(why) => {
            warn!(%why, "two-way precheck: a side does not answer yet; checked again before the other direction starts");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Whether a check failed because a server did not answer (retried).
fn unreachable(why: &str) -> bool {
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
    // The first full sync, in B.
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let status = read_status(&node).await?;
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
        let loaded = !forward.is_empty() && forward.len() >= status.listeners.len();
        // The status may show the load's progress between its states; the
        // target's own checkpoints say whether the load is committed.
        if loaded && full_sync_committed(&cfg, &b, &forward).await {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(ESTABLISH_POLL) => {}
        }
    }
    loop {
        let started = Instant::now();
        let seeded = match pair {
            Pair::Standalone => seed(&cfg, &wal, &a[0], &b[0]).await,
            Pair::Clusters => seed_clusters(&cfg, &wal, &a, &b).await,
        };
        match seeded {
            Ok(detail) => {
                info!(
                    ms = started.elapsed().as_millis() as u64,
                    %detail,
                    "two-way sync established: writes on either side replicate to the other"
                );
                return Ok(());
            }
            Err(Seeding::Refused(why)) => return Err(why),
            Err(Seeding::Failed(why)) => {
                warn!(%why, "two-way sync: cannot start the target -> source direction yet; retrying")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(ESTABLISH_RETRY) => {}
        }
    }
}

/// Whether the target's checkpoint (a cluster's floor) of each forward
/// partition is `applied` in a loaded epoch (not `loading`, not absent).
async fn full_sync_committed(cfg: &SyncConfig, b: &[RedisUrl], partitions: &[u32]) -> bool {
    let Some(template) = b.first() else {
        return false;
    };
    let topology = match b.len() > 1 || partitions.iter().any(|p| *p != FORWARD.0) {
        true => match crate::redis::cluster::discover(b).await {
            Ok(topology) => Some(topology),
            Err(_) => return false,
        },
        false => None,
    };
    for &partition in partitions {
        let key = checkpoint_key(&cfg.apply.drainer_id, PartitionId(partition));
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

enum Seeding {
    Refused(String),
    Failed(String),
}

/// Partition 1's history, A's checkpoint of it, B's point and entry 1.
/// Marks `master`'s stream (`name`, `note`) and stores the mark as entry 1
/// of `partition`: the partition starts at that exact point. Returns the
/// point's replid and offset.
async fn seed_partition(
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
    check_sides(a, b).await.map_err(|why| {
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

/// Between clusters (module doc, "Two clusters"): the backward partitions'
/// shard map and slot table, their histories, A prepared as their target
/// (owner map, slot scopes, floors), each master of B marked and its mark
/// stored as its partition's entry 1, then [`CLUSTER_ESTABLISHED_FILE`].
/// A retry after a partial attempt keeps the partitions whose entry 1 is
/// durable (their marks stand: what B wrote after one is in its stream
/// after it) and marks the others, as long as B's masters are the same.
async fn seed_clusters(
    cfg: &SyncConfig,
    wal: &Wal,
    a: &[RedisUrl],
    b: &[RedisUrl],
) -> Result<String, Seeding> {
    let masters = check_clusters(a, b)
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
    let dir = cfg.data_dir.join(CLUSTER_BACKWARD_DIR);
    let map_path = dir.join(crate::listener::SHARD_MAP_FILE);
    if started.iter().any(|s| *s) {
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
    write_shard_files(&dir, &masters, CLUSTER_BACKWARD_BASE).map_err(failed)?;
    let mut starts = Vec::with_capacity(partitions.len());
    for (master, &partition) in masters.iter().zip(&partitions) {
        let history = wal
            .open_history(partition, &cfg.listener.id)
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
            log_tag: history.log_tag,
        });
    }
    let prepared = cluster_target_state(&backward_cfg(cfg, Pair::Clusters), &starts)
        .await
        .map_err(failed)?;
    let note = format!(
        "{{\"unix-ms\":{},\"source\":\"{}\"}}",
        now_unix_ms(),
        a.first().map(RedisUrl::addr).unwrap_or_default()
    );
    let mut marked = Vec::new();
    for ((master, &partition), started) in masters.iter().zip(&partitions).zip(&started) {
        if *started {
            continue;
        }
        let slot = master
            .slots
            .first()
            .ok_or_else(|| Seeding::Failed(format!("{} serves no slot", master.url.addr())))?;
        let name = format!(
            "two-way:{}:{}",
            crate::redis::cluster::tag_for_slot(slot),
            cfg.id
        );
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
    let path = cfg.data_dir.join(CLUSTER_ESTABLISHED_FILE);
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
