//! `ferry switchover`: a running one-way `ferry sync` reversed, from the
//! exact position, without a full sync (issue 11, item 3).
//!
//! In: a `ferry sync` applying a standalone source A to a standalone
//! target B (or a Redis Cluster to a Redis Cluster: "Two clusters" below;
//! or a standalone server and a cluster, in either order: "A standalone
//! server and a cluster") from the listener's WAL, and a timeout. Out: the
//! same process replicating B into A, a [`DirectionRecord`] in the data
//! dir that a restart follows, and a [`SwitchoverReport`] of every step.
//!
//! # The steps
//!
//! 1. **check**: both sides standalone masters (A 6.2 or later, for
//!    `CLIENT PAUSE WRITE`), one partition, its applier neither stopped nor
//!    blocked, no `db-map` (its reverse is not what the operator wrote). B
//!    needs a replication backlog for the reversed listener to `PSYNC` into
//!    its stream at an offset: a master creates one only when a replica
//!    first connects, so a B without one is sent `PSYNC ? -1` and the
//!    connection is dropped once `INFO` shows the backlog (with
//!    diskless replication, the default, B forks nothing for it: the
//!    replica is gone before the delay ends; with disk-based replication
//!    it starts a `BGSAVE`).
//! 2. **prepare**: a new WAL dir `listener.g<N>` with the reversed
//!    partition's history (its log tag `T`). Nothing is written to A: a
//!    pause a crashed switchover left there would hold that write.
//! 3. **pause writes on the source**: `CLIENT PAUSE <timeout + 10s> WRITE`
//!    on A, so a ferry that dies mid-way leaves A unpaused by itself.
//! 4. **wait for the target**: A's `master_repl_offset` read once paused
//!    (only `PING`s to replicas move it after that); wait until the
//!    listener's durable offset reaches it and the applier has applied the
//!    last entry the listener logged, with no entry blocked.
//! 5. **stop the old direction**: every stage of A → B stopped, its WAL
//!    closed.
//! 6. **mark the switch point**: on B, `MULTI; SET __ferry:switchover:<id>
//!    …; INFO replication; EXEC`. The `INFO` runs before the transaction is
//!    propagated, so its `master_repl_offset` O is the end of everything B
//!    holds, which is A's data (only ferry wrote B); the `SET` makes B's
//!    stream after O begin in db 0 (a `SELECT 0` goes with it if another db
//!    was selected), so (replid, O, db 0) is exact.
//! 7. **store the reversed start**: entry 1 of the new WAL is that `SET`
//!    at (replid, O, db 0), fsynced; then the record is written (temp
//!    file, fsync, rename, fsync of the dir): **this is the commit point**.
//!    Before it every failure rolls back (A unpaused, the new WAL dir
//!    deleted, A → B started again; after a kill -9 the next start deletes
//!    the dir and unpauses A: "A crash" below); after it a restart runs
//!    B → A whatever the command line's order.
//! 8. **release the old source**: the clients A holds in the pause (flag
//!    `b`, not ferry's) are closed, as a Redis `FAILOVER` answers them
//!    `-READONLY`: their writes never ran, so none is acknowledged by A
//!    after the switch point and missing on B. Then `CLIENT UNPAUSE`, and
//!    A gets the reversed applier's checkpoint, `applied=1 log=T`, unless it
//!    holds one of log `T` already (a release done again must not move a
//!    checkpoint back). The record notes the release; a process killed
//!    before it releases A when it starts. A client that sends a write to A
//!    after this writes to a target (ferry counts it as a foreign write;
//!    `ferry guard` on A prevents it).
//! 9. **start B → A**: the listener resumes `PSYNC <replid> O+1` at B,
//!    which answers `+CONTINUE`; the applier finds `applied=1` on A and
//!    applies from entry 2. B's writes made meanwhile wait in its backlog.
//!
//! # Two clusters
//!
//! A sync of a Redis Cluster A into a Redis Cluster B (one partition per
//! master of A; B applied by slot, apply module "Applying into a Redis
//! Cluster target") is switched over the same way, master by master:
//!
//! 1. **check**: both sides clusters, every slot served on both, none
//!    migrating or importing, no node failing, every master of A followed
//!    by an online partition with no slot handoff waiting, every applier
//!    running and not blocked; every master of B gets a backlog as above.
//! 2. **prepare**: the new WAL with one partition per master of B (`i`: the
//!    `i`-th by first slot), and `cluster.g<N>` next to it holding the
//!    reversed listener's shard map (partition `i`: that master and its
//!    replicas) and slot table (every slot its master's partition's,
//!    generation 0). Generation 0 keeps these files in the data dir;
//!    [`cluster_dir`] says where a generation's are.
//! 3. **pause**: `CLIENT PAUSE … WRITE` on every master of A.
//! 4. **wait**: each paused master's `master_repl_offset` durable in the
//!    partition following it and applied by its applier.
//! 6. **mark**: every master of B marked alone, with the key
//!    `__ferry:switchover:{ferry:N}:<id>`, `{ferry:N}` a tag of the
//!    master's first slot, so the transaction runs on it.
//! 7. **store**: entry 1 of each partition at its master's mark, then the
//!    record with every partition's start (master, node id, slots,
//!    replid, offset, log tag): one atomic write, the commit point.
//! 8. **release**: held writers closed and `CLIENT UNPAUSE` on every master
//!    of A; then A gets the state a cluster target's applier reads at the
//!    start of a session, as a load would have left it: the owner map
//!    `__ferry:slots:<drainer-id>` (every slot to the partition of B's
//!    master that served it, generation 0, as the reversed slot table
//!    says), each partition's slot scope (its master's slots) and its
//!    floor checkpoint `applied=1 log=T_i` (slot checkpoints of other logs
//!    do not count). Nothing is written when every floor is of its log
//!    already; the floors go last, so an interrupted release writes it all
//!    again.
//! 9. **start**: each partition `PSYNC`s its master of B from its mark.
//!
//! A failure or timeout before the commit unpauses every master of A and
//! deletes the new WAL and `cluster.g<N>`; the commit deletes the old
//! direction's `cluster.g<N-1>` with its WAL (generation 0's files stay in
//! the data dir).
//!
//! # A standalone server and a cluster
//!
//! A standalone A into a cluster B, or a cluster A into a standalone B
//! (the one-way syncs of the apply module, "Applying into a Redis Cluster
//! target", and of docs/cluster.md), is switched over by side: each step
//! does for a cluster side what "Two clusters" does and for a standalone
//! side what the standalone steps do.
//!
//! 1. **check**: a cluster side as in "Two clusters" (a cluster A: every
//!    master followed by an online partition), a standalone side as in the
//!    standalone steps (a standalone A: a sync of one partition); B's one
//!    server, or each master, gets a backlog.
//! 2. **prepare**: the reversed direction's partitions are numbered as a
//!    one-way sync of B numbers them: a cluster B one per master (and
//!    `cluster.g<N>`, as between clusters), a standalone B its one
//!    partition 0 (no `cluster.g<N>`: its listener asks B what it is, a
//!    standalone server).
//! 3. **pause**, and 4. **wait**: A's one server, or every master of A.
//! 6. **mark**: B's one server as `__ferry:switchover:<id>`, or every
//!    master of B alone as between clusters.
//! 7. **store**: the record as between two standalone servers (a
//!    standalone B) or two clusters (a cluster B, every partition's start),
//!    plus `pair`, what the reversed direction runs between
//!    (`standalone-cluster`, `cluster-standalone`, B first): a restart
//!    releases and runs it whatever the command line's order.
//! 8. **release**: A's one server, or every master of A, released as
//!    above; then A gets what the reversed appliers read at a session's
//!    start, as a load would have left it. A standalone A fed by a cluster
//!    B: the owner map, each partition's slot scope and its checkpoint
//!    `applied=1 log=T_i`, all on its one server. A cluster A fed by a
//!    standalone B: partition 0's floor `applied=1 log=T` alone, on the
//!    master of its key's slot (a standalone source's writes carry no slot
//!    tenure: no owner map, no scope). The same rule as between clusters:
//!    nothing is written when every floor is of its log, the floors last.
//! 9. **start**: B's one partition `PSYNC`s B, or each partition its master
//!    of B, from its mark.
//!
//! Rollback, the commit and "A crash" below are the same: the pause note
//! and the unpause at a start name A's one server or every master of A.
//!
//! # A crash
//!
//! Before pausing, the switchover writes `switchover.paused` in the data
//! dir: the generation it would commit. It is deleted once the source is
//! unpaused (a rollback) or the record is committed and the release tried.
//! A start that finds it naming a generation the record does not have (the
//! process died between the pause and the commit) sends `CLIENT UNPAUSE`
//! to every master of the source (of a cluster: as discovered now), so the
//! writers the pause held go on at once, their writes replicated the old
//! way, rather than after the pause's own end (timeout + 10 s, which is
//! what is left when the source does not answer). This also lifts a pause
//! somebody else set on those masters meanwhile. A note naming the
//! record's generation is only deleted: the record's `released` flag
//! decides whether the start releases the old source (step 8).
//!
//! For the crash tests, `FERRY_TEST_SWITCHOVER_HOLD=<point>` makes a
//! switchover stop for good at a point ([`HOLD_ENV`]).
//!
//! What a switchover does not change: the keys of both sides carry the
//! deadlines the old target had, the source's plus `expire-grace` (apply
//! module, "Expiry"); the new target gets the new source's plus the grace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::SyncConfig;
use super::run::NodeError;
use super::two_way::Pair;
use crate::apply::checkpoint::{checkpoint_key, Checkpoint};
use crate::apply::scope::{encode_scope, scope_key};
use crate::apply::tenure::owner_map_key;
use crate::listener::{ShardMap, ShardNodes, SlotTable, SHARD_MAP_FILE, SLOT_TABLE_FILE};
use crate::position::{now_unix_ms, LogId, PartitionId, ReplOffset};
use crate::record::{Record, INTERNAL_PREFIX};
use crate::redis::client::{parse_info, Client, ClientError};
use crate::redis::cluster::{tag_for_slot, SlotRanges, Topology};
use crate::redis::command::{key_hash_slot, Command};
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;
use crate::status::{NodeControl, NodeStatus, SwitchStep, SwitchoverReport};
use crate::wal::{NewEntry, SourcePosition, Wal, WalConfig};

/// The direction record's file in the data dir.
pub const RECORD_FILE: &str = "direction";
const RECORD_VERSION: u32 = 1;
/// How much longer than the timeout the source's pause lasts on its own.
const PAUSE_MARGIN: Duration = Duration::from_secs(10);
/// How often the wait for the target reads the status.
const POLL: Duration = Duration::from_millis(5);
/// Longest wait for a backlog to appear on the target.
const BACKLOG_WAIT: Duration = Duration::from_secs(5);
/// A switchover's pause in flight: the generation it would commit, written
/// before the source is paused and deleted once it is unpaused (module doc,
/// "A crash").
const PAUSED_FILE: &str = "switchover.paused";
/// Prefix of the WAL dirs of switched-over generations.
const WAL_DIR_PREFIX: &str = "listener.g";
/// Prefix of the dirs holding a cluster source's shard map and slot table
/// of switched-over generations (generation 0 keeps them in the data dir).
const CLUSTER_DIR_PREFIX: &str = "cluster.g";

/// What direction a data dir's sync runs in since its last switchover:
/// `<data-dir>/direction`, JSON, replaced atomically. Absent: as
/// configured, WAL in `<data-dir>/listener`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DirectionRecord {
    pub version: u32,
    /// Switchovers so far.
    pub generation: u64,
    /// `host:port` replicated from, and into (no credentials).
    pub source: String,
    pub target: String,
    /// The listener WAL dir of this generation, in the data dir.
    pub wal_dir: String,
    pub switched_unix_ms: u64,
    /// Where in the new source's stream the generation started.
    pub replid: String,
    pub offset: u64,
    /// The log tag of the generation's WAL partition: the checkpoint the
    /// new target gets names it.
    pub log_tag: u64,
    /// The old source was released (held writers closed, unpaused) after
    /// the switch; a process that died before doing so does it when it
    /// starts (module doc, step 8).
    #[serde(default)]
    pub released: bool,
    /// A cluster new source's switchover: the generation's partitions, one
    /// per master of the new source (empty: a standalone new source, the
    /// one partition 0 of `replid`, `offset` and `log_tag` above, which for
    /// a cluster are partition 0's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionStart>,
    /// What the generation replicates between, `source` first: written for
    /// a standalone server with a cluster (`standalone-cluster`,
    /// `cluster-standalone`) only, so that the record of two standalone
    /// servers or two clusters reads as before (absent: both sides are
    /// what `partitions` says, [`DirectionRecord::pair`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair: Option<Pair>,
}

/// Where one partition of a cluster's reversed direction started: the
/// master of the new source it replicates (as it was at the switch) and
/// its mark there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PartitionStart {
    pub partition: u32,
    /// `host:port` of the master, and its node id.
    pub master: String,
    pub node_id: String,
    /// The slots it served (`0-5460`): the partition's slot scope and its
    /// slots in the new target's owner map.
    pub slots: String,
    pub replid: String,
    pub offset: u64,
    pub log_tag: u64,
}

impl DirectionRecord {
    /// The record of `data_dir`, if it was ever switched over.
    pub fn load(data_dir: &Path) -> Result<Option<DirectionRecord>, NodeError> {
        let path = data_dir.join(RECORD_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(NodeError::Io {
                    what: format!("reading {}", path.display()),
                    error,
                })
            }
        };
        let bad = |why: String| NodeError::Config(format!("{}: {why}", path.display()));
        let record: DirectionRecord =
            serde_json::from_str(&text).map_err(|error| bad(error.to_string()))?;
        if record.version != RECORD_VERSION {
            return Err(bad(format!(
                "version {} (this ferry reads {RECORD_VERSION})",
                record.version
            )));
        }
        let generation_dir = record
            .wal_dir
            .strip_prefix(WAL_DIR_PREFIX)
            .and_then(|n| n.parse::<u64>().ok());
        if generation_dir != Some(record.generation) {
            return Err(bad(format!(
                "wal-dir {:?} is not {WAL_DIR_PREFIX}{}",
                record.wal_dir, record.generation
            )));
        }
        if record.pair().is_cluster(0) == record.partitions.is_empty() {
            return Err(bad(format!(
                "the pair {} does not go with {} partition start(s) (a cluster source has one \
                 per master, a standalone source none)",
                record.pair().as_str(),
                record.partitions.len()
            )));
        }
        Ok(Some(record))
    }

    /// What the generation replicates between, its `source` first (module
    /// doc, "A standalone server and a cluster").
    pub fn pair(&self) -> Pair {
        self.pair.unwrap_or(match self.partitions.is_empty() {
            true => Pair::Standalone,
            false => Pair::Clusters,
        })
    }

    /// The start of every partition of the generation: `partitions`, or
    /// for a standalone new source its one partition 0 (no node id, no
    /// slots) at `replid`, `offset`, `log_tag`.
    fn starts(&self) -> Vec<PartitionStart> {
        if !self.partitions.is_empty() {
            return self.partitions.clone();
        }
        vec![PartitionStart {
            partition: 0,
            master: self.source.clone(),
            node_id: String::new(),
            slots: String::new(),
            replid: self.replid.clone(),
            offset: self.offset,
            log_tag: self.log_tag,
        }]
    }

    fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)? + "\n";
        super::run::write_atomically(&data_dir.join(RECORD_FILE), &text)
    }
}

/// `host:port` of the source and of the target (a seed list joined by
/// commas).
fn addresses(cfg: &SyncConfig) -> Result<(String, String), NodeError> {
    let (source, target) = urls(cfg)?;
    let join = |urls: &[RedisUrl]| {
        urls.iter()
            .map(RedisUrl::addr)
            .collect::<Vec<_>>()
            .join(",")
    };
    Ok((join(&source), join(&target)))
}

pub(super) fn urls(cfg: &SyncConfig) -> Result<(Vec<RedisUrl>, Vec<RedisUrl>), NodeError> {
    let source = cfg
        .listener
        .validate()
        .map_err(|e| NodeError::Config(format!("listener.{}: {}", e.field, e.reason)))?
        .seeds;
    let target = cfg
        .apply
        .target_seeds()
        .map_err(|e| NodeError::Config(e.to_string()))?;
    Ok((source, target))
}

/// `cfg` the other way round: the target's URL and password become the
/// source's and the other way round; filters stay (a `db-map` is refused:
/// [`check_reversible`]).
fn reversed(mut cfg: SyncConfig) -> SyncConfig {
    let (listener, apply) = (&mut cfg.listener, &mut cfg.apply);
    std::mem::swap(&mut listener.source, &mut apply.target);
    std::mem::swap(
        &mut listener.source_password_file,
        &mut apply.target_password_file,
    );
    std::mem::swap(
        &mut listener.source_password_env,
        &mut apply.target_password_env,
    );
    cfg
}

fn check_reversible(cfg: &SyncConfig) -> Result<(), String> {
    if cfg.apply.filter.db_map.is_some() {
        return Err(
            "a sync with a db-map cannot be switched over: its reverse would map target dbs back \
             by a rule nobody wrote (use dbs, which both directions read the same)"
                .into(),
        );
    }
    Ok(())
}

/// Lays the data dir's direction record over `cfg`: the WAL dir of the
/// current generation, and source and target swapped when the command
/// line names them in the order they had before the last switchover.
/// Leftovers of other generations (an old WAL a crash kept, a new one a
/// failed switchover left) are deleted.
pub fn lay_record(cfg: SyncConfig) -> Result<(SyncConfig, Option<DirectionRecord>), NodeError> {
    let record = DirectionRecord::load(&cfg.data_dir)?;
    let current = record
        .as_ref()
        .map(|r| r.wal_dir.clone())
        .unwrap_or_else(|| "listener".into());
    remove_other_generations(&cfg.data_dir, &current);
    let Some(record) = record else {
        return Ok((cfg, None));
    };
    let (source, target) = addresses(&cfg)?;
    let mut cfg = if (&source, &target) == (&record.source, &record.target) {
        cfg
    } else if (&target, &source) == (&record.source, &record.target) {
        info!(
            source = %record.source,
            target = %record.target,
            generation = record.generation,
            "this data dir was switched over: replicating the configured target into the configured source"
        );
        check_reversible(&cfg).map_err(NodeError::Config)?;
        reversed(cfg)
    } else {
        return Err(NodeError::Config(format!(
            "{}: this data dir replicates {} into {} since its switchover; the command line names \
             {source} and {target} (give those two servers, in either order, or another data dir)",
            cfg.data_dir.join(RECORD_FILE).display(),
            record.source,
            record.target
        )));
    };
    cfg.listener_wal.dir = cfg.data_dir.join(&record.wal_dir);
    Ok((cfg, Some(record)))
}

/// Where the listener of `cfg` keeps a cluster source's shard map and slot
/// table: the data dir for the configured direction, `cluster.g<N>` in it
/// for the generation whose WAL is `listener.g<N>` (a switched-over
/// cluster's shards are the other cluster's, under partition ids of their
/// own).
pub fn cluster_dir(cfg: &SyncConfig) -> PathBuf {
    match generation_of(&cfg.listener_wal.dir) {
        Some(generation) => cfg
            .data_dir
            .join(format!("{CLUSTER_DIR_PREFIX}{generation}")),
        None => cfg.data_dir.clone(),
    }
}

/// `N` of a WAL dir `listener.g<N>`.
fn generation_of(wal_dir: &Path) -> Option<u64> {
    wal_dir
        .file_name()?
        .to_str()?
        .strip_prefix(WAL_DIR_PREFIX)?
        .parse()
        .ok()
}

/// Deletes the listener WAL dirs (and the cluster dirs) of `data_dir` other
/// than `current`'s.
fn remove_other_generations(data_dir: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    let current_cluster = current
        .strip_prefix(WAL_DIR_PREFIX)
        .map(|n| format!("{CLUSTER_DIR_PREFIX}{n}"));
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let numbered = |prefix: &str| {
            name.strip_prefix(prefix)
                .is_some_and(|n| n.parse::<u64>().is_ok())
        };
        let wal = name == "listener" || numbered(WAL_DIR_PREFIX);
        let other = match wal {
            true => name != current,
            false => numbered(CLUSTER_DIR_PREFIX) && Some(&name) != current_cluster.as_ref(),
        };
        if (wal || numbered(CLUSTER_DIR_PREFIX)) && other {
            let path = entry.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => info!(dir = %path.display(), "deleted the WAL of another sync direction"),
                Err(error) => {
                    warn!(dir = %path.display(), %error, "cannot delete the WAL of another sync direction")
                }
            }
        }
    }
}

/// The environment variable of the crash tests' hook: a switchover stops
/// for good at the point it names, for a test to kill -9 the process
/// exactly there: `drained` (the source paused, the target caught up, the
/// old direction still running), `committed` (the record written, nothing
/// released), `unpaused` (the old source's masters unpaused, its
/// checkpoints not written yet), `released` (the release done, the
/// reversed direction not started). Two-way sync between clusters
/// establishing (`super::two_way`): `two-way-marked-one` (the first master
/// of the target marked and its entry 1 durable, the others not yet),
/// `two-way-marked-all` (every master marked, the established file not
/// written). Unset in production.
const HOLD_ENV: &str = "FERRY_TEST_SWITCHOVER_HOLD";

/// The crash tests' hook ([`HOLD_ENV`]): never returns at `point` when the
/// variable names it.
pub(super) async fn hold_for_test(point: &str) {
    if std::env::var(HOLD_ENV).is_ok_and(|held| held == point) {
        warn!(
            point,
            "{HOLD_ENV}: ferry holds here until the process is killed"
        );
        std::future::pending::<()>().await;
    }
}

/// The steps so far, each logged as it ends.
struct Steps {
    list: Vec<SwitchStep>,
}

impl Steps {
    fn done(&mut self, name: &str, started: Instant, detail: impl Into<String>) {
        let step = SwitchStep {
            name: name.to_string(),
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            detail: detail.into(),
        };
        info!(step = %step.name, ms = step.millis, detail = %step.detail, "switchover");
        self.list.push(step);
    }

    fn report(
        self,
        error: Option<String>,
        direction: (String, String),
        paused: Option<(Instant, Instant)>,
    ) -> SwitchoverReport {
        if let Some(error) = &error {
            warn!(%error, "switchover failed; the old direction runs on");
        }
        SwitchoverReport {
            steps: self.list,
            error,
            source: direction.0,
            target: direction.1,
            write_pause_ms: paused
                .map(|(from, to)| {
                    u64::try_from(to.saturating_duration_since(from).as_millis())
                        .unwrap_or(u64::MAX)
                })
                .unwrap_or(0),
        }
    }
}

pub(super) fn client_error(what: &str, addr: &str) -> impl FnOnce(ClientError) -> String {
    let (what, addr) = (what.to_string(), addr.to_string());
    move |error| format!("{what} on {addr}: {error}")
}

pub(super) async fn connect(url: &RedisUrl) -> Result<Client, String> {
    Client::connect(url)
        .await
        .map_err(|error| format!("connecting to {}: {error}", url.addr()))
}

async fn info(
    client: &mut Client,
    addr: &str,
    section: &str,
) -> Result<std::collections::HashMap<String, String>, String> {
    client
        .info(section)
        .await
        .map_err(client_error(&format!("INFO {section}"), addr))
}

fn field<'a>(
    info: &'a std::collections::HashMap<String, String>,
    name: &str,
    addr: &str,
) -> Result<&'a str, String> {
    info.get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("{addr}: INFO has no {name}"))
}

/// A standalone master of at least `major.minor`.
pub(super) async fn check_master(
    client: &mut Client,
    addr: &str,
    side: &str,
    min: (u32, u32),
) -> Result<String, String> {
    check_node(client, addr, side, min, false).await
}

/// A master of at least `major.minor`, a cluster node when `cluster`, else
/// a standalone server.
async fn check_node(
    client: &mut Client,
    addr: &str,
    side: &str,
    min: (u32, u32),
    cluster: bool,
) -> Result<String, String> {
    let server = info(client, addr, "server").await?;
    let version = field(&server, "redis_version", addr)?.to_string();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if have < min {
        return Err(format!(
            "the {side} {addr} runs Redis {version}; a switchover needs {}.{} or later",
            min.0, min.1
        ));
    }
    let enabled = info(client, addr, "cluster").await?;
    let is_cluster = enabled.get("cluster_enabled").map(String::as_str) == Some("1");
    if is_cluster != cluster {
        return Err(match is_cluster {
            true => format!(
                "the {side} {addr} is a Redis Cluster node where a standalone server was expected"
            ),
            false => format!(
                "the {side} {addr} is a standalone server where a Redis Cluster node was expected"
            ),
        });
    }
    let replication = info(client, addr, "replication").await?;
    let role = field(&replication, "role", addr)?;
    if role != "master" {
        return Err(format!("the {side} {addr} is a {role}, not a master"));
    }
    Ok(version)
}

/// Makes `target` keep a replication backlog (module doc, step 1).
pub(super) async fn ensure_backlog(target: &RedisUrl) -> Result<&'static str, String> {
    let addr = target.addr();
    let mut client = connect(target).await?;
    let active = |info: &std::collections::HashMap<String, String>| {
        info.get("repl_backlog_active").map(String::as_str) == Some("1")
    };
    if active(&info(&mut client, &addr, "replication").await?) {
        return Ok("the target keeps a replication backlog");
    }
    let mut replica = connect(target).await?;
    replica
        .call(["REPLCONF", "capa", "eof", "capa", "psync2"])
        .await
        .map_err(client_error("REPLCONF", &addr))?;
    // Answered only once a full sync starts; the backlog exists as soon
    // as the command ran.
    replica.queue(&Command::from_parts(["PSYNC", "?", "-1"]));
    replica
        .flush()
        .await
        .map_err(client_error("PSYNC", &addr))?;
    let deadline = Instant::now() + BACKLOG_WAIT;
    loop {
        if active(&info(&mut client, &addr, "replication").await?) {
            drop(replica);
            return Ok("created the target's replication backlog (a replica handshake, hung up)");
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{addr} created no replication backlog within {}s of a replica's PSYNC",
                BACKLOG_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Marks the end of what `server` holds in its replication stream (module
/// doc, step 6): `MULTI; SET __ferry:<name> <note>; INFO replication;
/// EXEC`. Returns the `SET` (the first entry of the stream after that
/// point, which it makes begin in db 0) and (replid, offset) of the point;
/// the server's backlog must reach it.
pub(super) async fn mark_stream(
    server: &RedisUrl,
    name: &str,
    note: &str,
) -> Result<(Command, String, u64), String> {
    let addr = server.addr();
    let mut client = connect(server).await?;
    let mut key = INTERNAL_PREFIX.to_vec();
    key.push(b':');
    key.extend_from_slice(name.as_bytes());
    let set = Command::from_parts([b"SET".as_slice(), key.as_slice(), note.as_bytes()]);
    let replies = client
        .pipeline(&[
            Command::from_parts(["MULTI"]),
            set.clone(),
            Command::from_parts(["INFO", "replication"]),
            Command::from_parts(["EXEC"]),
        ])
        .await
        .map_err(client_error("the stream mark's transaction", &addr))?;
    let info_text = match replies.last() {
        Some(Frame::Array(items)) if items.len() == 2 => match &items[1] {
            Frame::Bulk(text) => String::from_utf8_lossy(text).into_owned(),
            Frame::Verbatim { text, .. } => String::from_utf8_lossy(text).into_owned(),
            other => return Err(format!("{addr}: INFO inside MULTI answered {other:?}")),
        },
        other => return Err(format!("{addr}: the stream mark's EXEC answered {other:?}")),
    };
    let replication = parse_info(&info_text);
    let replid = field(&replication, "master_replid", &addr)?.to_string();
    let offset: u64 = field(&replication, "master_repl_offset", &addr)?
        .parse()
        .map_err(|_| format!("{addr}: master_repl_offset is not a number"))?;
    let backlog_first: u64 = replication
        .get("repl_backlog_first_byte_offset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    if replication.get("repl_backlog_active").map(String::as_str) != Some("1")
        || backlog_first > offset + 1
    {
        return Err(format!(
            "{addr}'s replication backlog does not reach offset {} (it begins at {backlog_first})",
            offset + 1
        ));
    }
    Ok((set, replid, offset))
}

/// A master of one side of a switchover: a standalone server, or a master
/// of a cluster with its node id, its slots and its replicas' ids.
#[derive(Debug, Clone)]
pub(super) struct Master {
    pub(super) url: RedisUrl,
    pub(super) id: String,
    pub(super) slots: SlotRanges,
    pub(super) replicas: Vec<String>,
}

impl Master {
    pub(super) fn standalone(url: &RedisUrl) -> Master {
        Master {
            url: url.clone(),
            id: String::new(),
            slots: SlotRanges::new(),
            replicas: Vec::new(),
        }
    }
}

/// The servers of a switchover: the source's masters (paused, each
/// followed by a partition of the old direction) and the target's
/// (marked; master `i` starts partition `i` of the reversed direction);
/// `pair` says which side is a cluster, the source first.
#[derive(Debug, Clone)]
struct Sides {
    pair: Pair,
    sources: Vec<Master>,
    targets: Vec<Master>,
}

/// A switchover paused on the source with the target caught up: what the
/// next steps need.
pub(super) struct Drained {
    data_dir: PathBuf,
    steps: Steps,
    paused: Instant,
    deadline: Instant,
    sides: Sides,
    /// The connections that paused the source's masters, in their order.
    pausers: Vec<Client>,
    next: Wal,
    next_dir: PathBuf,
    /// A cluster's shard map and slot table of the reversed direction.
    next_cluster_dir: Option<PathBuf>,
    generation: u64,
    /// The log tag of each reversed partition.
    log_tags: Vec<u64>,
    direction: (String, String),
}

/// A reversed direction stored, not yet started: the source is still
/// paused.
pub(super) struct Committed {
    steps: Steps,
    paused: Instant,
    /// The old source's masters and the connections that paused them.
    pausers: Vec<(RedisUrl, Client)>,
    /// When the release unpaused the source.
    unpaused: Option<Instant>,
    pub(super) record: DirectionRecord,
}

pub(super) async fn read_status(node: &Arc<dyn NodeControl>) -> Result<NodeStatus, String> {
    let node = Arc::clone(node);
    tokio::task::spawn_blocking(move || node.status())
        .await
        .map_err(|error| format!("reading the status: {error}"))
}

/// Steps 1 to 4 (module doc) while the old direction runs. On error the
/// source is unpaused and what was prepared is deleted; the report says
/// why.
pub(super) async fn drain(
    cfg: &SyncConfig,
    record: Option<&DirectionRecord>,
    node: &Arc<dyn NodeControl>,
    stopping: &CancellationToken,
    timeout: Duration,
) -> Result<Drained, SwitchoverReport> {
    let mut steps = Steps { list: Vec::new() };
    let direction = addresses(cfg).unwrap_or_default();
    let started = Instant::now();
    let (sides, detail) = match check(cfg, node).await {
        Ok(checked) => checked,
        Err(error) => return Err(steps.report(Some(error), direction, None)),
    };
    steps.done("check", started, detail);

    let started = Instant::now();
    let generation = record.map(|r| r.generation).unwrap_or(0) + 1;
    let next_dir = cfg.data_dir.join(format!("{WAL_DIR_PREFIX}{generation}"));
    let next_cluster_dir = sides.pair.is_cluster(1).then(|| {
        cfg.data_dir
            .join(format!("{CLUSTER_DIR_PREFIX}{generation}"))
    });
    let prepared = prepare(cfg, &next_dir, next_cluster_dir.as_deref(), &sides.targets).await;
    let (next, log_tags) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            discard(None, &next_dir, next_cluster_dir.as_deref()).await;
            return Err(steps.report(Some(error), direction, None));
        }
    };
    let tags: Vec<String> = log_tags.iter().map(|t| format!("{t:016x}")).collect();
    steps.done(
        "prepare the reverse",
        started,
        match sides.pair.is_cluster(1) {
            false => format!("new WAL {}, log {}", next_dir.display(), tags.join(", ")),
            true => format!(
                "new WAL {} with {} partitions (logs {}), shard map in {}",
                next_dir.display(),
                tags.len(),
                tags.join(", "),
                next_cluster_dir.as_deref().unwrap_or(&next_dir).display()
            ),
        },
    );

    let started = Instant::now();
    if let Err(error) = note_pause(&cfg.data_dir, generation) {
        discard(Some(next), &next_dir, next_cluster_dir.as_deref()).await;
        return Err(steps.report(Some(error), direction, None));
    }
    let pause_ms = (timeout + PAUSE_MARGIN).as_millis().to_string();
    let mut pausers = Vec::with_capacity(sides.sources.len());
    for master in &sides.sources {
        let paused = async {
            let mut pauser = connect(&master.url).await?;
            pauser
                .call(["CLIENT", "PAUSE", pause_ms.as_str(), "WRITE"])
                .await
                .map_err(client_error("CLIENT PAUSE", &master.url.addr()))?;
            Ok::<Client, String>(pauser)
        }
        .await;
        match paused {
            Ok(pauser) => pausers.push(pauser),
            Err(error) => {
                let paused_at = (started, Instant::now());
                undo(
                    &cfg.data_dir,
                    pausers,
                    &sides.sources,
                    &next,
                    &next_dir,
                    next_cluster_dir.as_deref(),
                )
                .await;
                return Err(steps.report(Some(error), direction, Some(paused_at)));
            }
        }
    }
    let paused_at = started;
    let deadline = paused_at + timeout;
    let addrs: Vec<String> = sides.sources.iter().map(|m| m.url.addr()).collect();
    steps.done(
        "pause writes on the source",
        started,
        format!("CLIENT PAUSE {pause_ms} WRITE on {}", addrs.join(", ")),
    );

    let started = Instant::now();
    match caught_up(&mut pausers, &sides, node, stopping, deadline, timeout).await {
        Ok(detail) => steps.done("wait for the target", started, detail),
        Err(error) => {
            undo(
                &cfg.data_dir,
                pausers,
                &sides.sources,
                &next,
                &next_dir,
                next_cluster_dir.as_deref(),
            )
            .await;
            return Err(steps.report(Some(error), direction, Some((paused_at, Instant::now()))));
        }
    }
    hold_for_test("drained").await;
    Ok(Drained {
        data_dir: cfg.data_dir.clone(),
        steps,
        paused: paused_at,
        deadline,
        sides,
        pausers,
        next,
        next_dir,
        next_cluster_dir,
        generation,
        log_tags,
        direction,
    })
}

/// Whether the servers of `urls` (a standalone server or a cluster's
/// seeds) are a Redis Cluster: what the first that answers says.
pub(super) async fn is_cluster(urls: &[RedisUrl], side: &str) -> Result<bool, String> {
    let mut errors = Vec::new();
    for url in urls {
        match crate::redis::cluster::is_cluster(url).await {
            Ok(cluster) => return Ok(cluster),
            Err(error) => errors.push(error.to_string()),
        }
    }
    Err(format!(
        "cannot ask the {side} whether it runs Redis Cluster: {}",
        errors.join("; ")
    ))
}

/// Step 1: what a switchover needs (module doc).
async fn check(cfg: &SyncConfig, node: &Arc<dyn NodeControl>) -> Result<(Sides, String), String> {
    if cfg.two_way {
        return Err(
            "a two-way sync replicates both ways already: there is no direction to switch".into(),
        );
    }
    check_reversible(cfg)?;
    let (sources, targets) = urls(cfg).map_err(|e| e.to_string())?;
    if sources.is_empty() || targets.is_empty() {
        return Err("no source or no target".into());
    }
    let status = read_status(node).await?;
    if status.listeners.is_empty() || status.drainers.is_empty() {
        return Err("the sync has not started its stages yet".into());
    }
    for applier in &status.drainers {
        if applier.state == "STOPPED" {
            return Err(format!(
                "the sync of partition {} is stopped (ferry restart-sync first)",
                applier.partition
            ));
        }
        if let Some(blocked) = &applier.blocked {
            return Err(format!(
                "the applier of partition {} is held at entry {} ({}): the target refuses it; \
                 resolve it first",
                applier.partition, blocked.log_id, blocked.error
            ));
        }
    }
    for listener in &status.listeners {
        if listener.source_state != "ONLINE" {
            return Err(format!(
                "the listener of partition {} is {}, not ONLINE{}",
                listener.partition,
                listener.source_state,
                listener
                    .source_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    let pair = Pair::of(
        is_cluster(&sources, "source").await?,
        is_cluster(&targets, "target").await?,
    );
    let (a, a_shown) = side_masters(&sources, "source", pair.is_cluster(0), (6, 2)).await?;
    let (b, b_shown) = side_masters(&targets, "target", pair.is_cluster(1), (6, 0)).await?;
    let followed = match pair.is_cluster(0) {
        true => check_followed(&a, &status)?,
        false if status.listeners.len() != 1 || status.drainers.len() != 1 => {
            return Err("a switchover of a standalone source needs a sync of one partition".into())
        }
        false => "",
    };
    let mut backlogs = Vec::with_capacity(b.len());
    for master in &b {
        backlogs.push(ensure_backlog(&master.url).await?);
    }
    let backlog = match pair.is_cluster(1) {
        false => backlogs.concat(),
        true => format!(
            "{} target master(s) given a replication backlog",
            backlogs.iter().filter(|b| b.starts_with("created")).count()
        ),
    };
    let slots = match (pair.is_cluster(0), pair.is_cluster(1)) {
        (true, true) => "; all 16384 slots served on both sides, none moving",
        (true, false) => "; all 16384 slots served on the source, none moving",
        (false, true) => "; all 16384 slots served on the target, none moving",
        (false, false) => "",
    };
    Ok((
        Sides {
            pair,
            sources: a,
            targets: b,
        },
        format!("source: {a_shown}{followed}; target: {b_shown}{slots}; {backlog}"),
    ))
}

/// The masters of one side of a switchover, and what they are: a cluster's
/// ([`cluster_masters`]), or a standalone master of at least `min`.
async fn side_masters(
    seeds: &[RedisUrl],
    side: &str,
    cluster: bool,
    min: (u32, u32),
) -> Result<(Vec<Master>, String), String> {
    if cluster {
        let (masters, version) = cluster_masters(seeds, side, min).await?;
        let shown = format!(
            "a Redis Cluster of {} masters (Redis {version})",
            masters.len()
        );
        return Ok((masters, shown));
    }
    let [url] = seeds else {
        return Err(format!(
            "the {side} is a standalone server but {} addresses are given: give one",
            seeds.len()
        ));
    };
    let mut client = connect(url).await?;
    let version = check_master(&mut client, &url.addr(), side, min).await?;
    Ok((
        vec![Master::standalone(url)],
        format!("{}, a standalone master (Redis {version})", url.addr()),
    ))
}

/// Step 1 for a cluster source: every master followed by an online
/// partition with an applier and no slot handoff waiting.
fn check_followed(masters: &[Master], status: &NodeStatus) -> Result<&'static str, String> {
    for master in masters {
        let followed = status.listeners.iter().find(|l| {
            l.shard
                .as_ref()
                .is_some_and(|shard| shard.master_id == master.id)
        });
        let Some(listener) = followed else {
            return Err(format!(
                "no partition follows the source master {} ({}) yet",
                master.url.addr(),
                master.id
            ));
        };
        if let Some(pending) = listener.shard.as_ref().map(|s| &s.pending_handoffs) {
            if !pending.is_empty() {
                return Err(format!(
                    "partition {} has slot handoffs waiting ({}): a switchover needs a stable \
                     slot map",
                    listener.partition,
                    pending.join(", ")
                ));
            }
        }
        if !status
            .drainers
            .iter()
            .any(|d| d.partition == listener.partition)
        {
            return Err(format!(
                "partition {} has no applier running",
                listener.partition
            ));
        }
    }
    Ok(", each followed by an online partition")
}

/// The masters of a cluster with every slot served and none moving, each a
/// master of at least `min`; and the version of the last.
pub(super) async fn cluster_masters(
    seeds: &[RedisUrl],
    side: &str,
    min: (u32, u32),
) -> Result<(Vec<Master>, String), String> {
    let topology = crate::redis::cluster::discover(seeds)
        .await
        .map_err(|error| format!("the {side} cluster: {error}"))?;
    if topology.migrating() {
        return Err(format!(
            "the {side} cluster has slots migrating or importing (seen from {}): a switchover \
             needs a stable slot map",
            topology.seen_from
        ));
    }
    if let Some(failing) = topology.nodes.iter().find(|n| n.failing) {
        return Err(format!(
            "the {side} cluster's node {} ({}) is flagged failing (seen from {})",
            failing.addr, failing.id, topology.seen_from
        ));
    }
    let template = seeds.first().ok_or_else(|| format!("no {side} address"))?;
    let mut masters = Vec::new();
    let mut version = String::new();
    let mut covered = 0;
    for shard in topology.shards() {
        let url = Topology::url_for(&shard.master, template);
        let mut client = connect(&url).await?;
        version = check_node(&mut client, &url.addr(), side, min, true).await?;
        covered += shard.master.slots.count();
        masters.push(Master {
            url,
            id: shard.master.id.clone(),
            slots: shard.master.slots.clone(),
            replicas: shard.replicas.iter().map(|r| r.id.clone()).collect(),
        });
    }
    if covered != usize::from(crate::redis::command::CLUSTER_SLOTS) {
        return Err(format!(
            "the {side} cluster's masters serve {covered} of 16384 slots (seen from {})",
            topology.seen_from
        ));
    }
    Ok((masters, version))
}

/// Step 2: the new WAL and a history for each partition (one per master
/// of the target), and a cluster's shard map and slot table (partition
/// `i`: master `i`, every slot its master's at generation 0); returns the
/// partitions' log tags.
async fn prepare(
    cfg: &SyncConfig,
    next_dir: &Path,
    cluster_dir: Option<&Path>,
    targets: &[Master],
) -> Result<(Wal, Vec<u64>), String> {
    for dir in std::iter::once(next_dir).chain(cluster_dir) {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|error| format!("deleting {}: {error}", dir.display()))?;
        }
    }
    let wal_cfg = WalConfig {
        dir: next_dir.to_path_buf(),
        ..cfg.listener_wal.clone()
    };
    let wal = Wal::open(wal_cfg)
        .await
        .map_err(|error| format!("creating the WAL in {}: {error}", next_dir.display()))?;
    let mut tags = Vec::with_capacity(targets.len());
    for partition in 0..targets.len() {
        let partition = PartitionId(u32::try_from(partition).unwrap_or(u32::MAX));
        match wal.open_history(partition, &cfg.listener.id).await {
            Ok(history) => tags.push(history.log_tag),
            Err(error) => {
                let _ = wal.close().await;
                return Err(format!(
                    "creating the history of partition {partition}: {error}"
                ));
            }
        }
    }
    if let Some(dir) = cluster_dir {
        if let Err(error) = write_cluster_files(dir, targets) {
            let _ = wal.close().await;
            return Err(error);
        }
    }
    Ok((wal, tags))
}

/// The reversed direction's shard map and slot table in `dir`.
fn write_cluster_files(dir: &Path, targets: &[Master]) -> Result<(), String> {
    write_shard_files(dir, targets, 0)
}

/// A shard map and slot table in `dir` for a listener of the cluster of
/// `masters`: master `i` is partition `base + i`, every slot its master's
/// at generation 0.
pub(super) fn write_shard_files(dir: &Path, targets: &[Master], base: u32) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|error| format!("creating {}: {error}", dir.display()))?;
    let nodes: Vec<ShardNodes> = targets
        .iter()
        .map(|m| ShardNodes {
            master: m.id.clone(),
            replicas: m.replicas.clone(),
            has_slots: true,
        })
        .collect();
    let mut map = ShardMap::starting_at(base);
    let (assigned, _) = map.assign(&nodes);
    let expected: Vec<Option<PartitionId>> = (0..targets.len())
        .map(|i| {
            Some(PartitionId(
                base + u32::try_from(i).unwrap_or(u32::MAX - base),
            ))
        })
        .collect();
    if assigned != expected {
        return Err(format!(
            "the target's masters got partitions {assigned:?}, not one each in order"
        ));
    }
    map.save(&dir.join(SHARD_MAP_FILE))
        .map_err(|error| format!("writing the reversed shard map: {error}"))?;
    let table = SlotTable::initial(|slot| {
        targets
            .iter()
            .position(|m| m.slots.contains(slot))
            .and_then(|i| u32::try_from(i).ok())
            .map(|i| base + i)
    })
    .ok_or("the target's masters do not serve every slot")?;
    table
        .save(&dir.join(SLOT_TABLE_FILE))
        .map_err(|error| format!("writing the reversed slot table: {error}"))
}

/// Step 4: until the listeners hold everything the paused source masters
/// have and the appliers applied all of it.
async fn caught_up(
    pausers: &mut [Client],
    sides: &Sides,
    node: &Arc<dyn NodeControl>,
    stopping: &CancellationToken,
    deadline: Instant,
    timeout: Duration,
) -> Result<String, String> {
    // Each paused master's end, read once (only PINGs to replicas move it
    // after the pause).
    let mut ends = Vec::with_capacity(pausers.len());
    for (pauser, master) in pausers.iter_mut().zip(&sides.sources) {
        let addr = master.url.addr();
        let replication = info(pauser, &addr, "replication").await?;
        let offset: u64 = field(&replication, "master_repl_offset", &addr)?
            .parse()
            .map_err(|_| format!("{addr}: master_repl_offset is not a number"))?;
        let replid = field(&replication, "master_replid", &addr)?.to_string();
        ends.push((addr, master.id.as_str(), replid, offset));
    }
    loop {
        if stopping.is_cancelled() {
            return Err("the sync stopped during the switchover".into());
        }
        let status = read_status(node).await?;
        let mut behind = None;
        let mut applied = Vec::new();
        for (addr, id, replid, offset) in &ends {
            let listener = match sides.pair.is_cluster(0) {
                false => status.listeners.first(),
                true => status
                    .listeners
                    .iter()
                    .find(|l| l.shard.as_ref().is_some_and(|s| s.master_id == *id)),
            };
            let Some(listener) = listener else {
                return Err(format!(
                    "no partition follows the source master {addr} any more"
                ));
            };
            let partition = listener.partition;
            let Some(applier) = status.drainers.iter().find(|d| d.partition == partition) else {
                return Err(format!("the applier of partition {partition} is gone"));
            };
            if let Some(blocked) = &applier.blocked {
                return Err(format!(
                    "the applier of partition {partition} is held at entry {}: {}",
                    blocked.log_id, blocked.error
                ));
            }
            let received = listener.replid.as_deref() == Some(replid.as_str())
                && listener.durable_offset >= *offset;
            if received && applier.applied >= listener.last_log_id {
                applied.push(format!("{addr} at {offset}: log id {}", applier.applied));
            } else if behind.is_none() {
                behind = Some(format!(
                    "the source {addr} is at offset {offset}, the listener of partition \
                     {partition} at {} (durable), the target at log id {} of {}",
                    listener.durable_offset, applier.applied, listener.last_log_id
                ));
            }
        }
        let Some(behind) = behind else {
            return Ok(format!(
                "every paused offset is durable and applied ({})",
                applied.join("; ")
            ));
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {}s: {behind}",
                timeout.as_secs_f64()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Rolls back what [`drain`] or [`Drained::commit`] prepared: every master
/// of the source unpaused (through its pauser when there is one), the new
/// WAL closed and deleted, with a cluster's dir.
async fn undo(
    data_dir: &Path,
    pausers: Vec<Client>,
    sources: &[Master],
    next: &Wal,
    next_dir: &Path,
    cluster_dir: Option<&Path>,
) {
    let mut pausers = pausers.into_iter();
    let mut all_unpaused = true;
    for master in sources {
        let pauser = pausers.next();
        let unpaused = async {
            let mut client = match pauser {
                Some(client) => client,
                None => connect(&master.url).await?,
            };
            client
                .call(["CLIENT", "UNPAUSE"])
                .await
                .map_err(client_error("CLIENT UNPAUSE", &master.url.addr()))?;
            Ok::<(), String>(())
        }
        .await;
        if let Err(error) = unpaused {
            warn!(%error, "rolling back a switchover: the source unpauses by itself when the pause ends");
            all_unpaused = false;
        }
    }
    if all_unpaused {
        clear_pause_note(data_dir);
    }
    discard(Some(next.clone()), next_dir, cluster_dir).await;
}

async fn discard(wal: Option<Wal>, dir: &Path, cluster_dir: Option<&Path>) {
    if let Some(wal) = wal {
        if let Err(error) = wal.close().await {
            warn!(%error, "closing the switchover's WAL");
        }
    }
    for dir in std::iter::once(dir).chain(cluster_dir) {
        if dir.exists() {
            if let Err(error) = std::fs::remove_dir_all(dir) {
                warn!(dir = %dir.display(), %error, "cannot delete what the switchover prepared");
            }
        }
    }
}

impl Drained {
    /// Steps 5 (done by the caller: `stopped` says how long it took) to 7:
    /// the switch point marked on the target, the reversed start stored
    /// and the record committed. On error everything is rolled back and
    /// the caller starts the old direction again.
    pub(super) async fn commit(
        mut self,
        cfg: &SyncConfig,
        stopped: Instant,
    ) -> Result<(SyncConfig, Committed), SwitchoverReport> {
        self.steps.done(
            "stop the old direction",
            stopped,
            "its stages stopped, its WAL closed",
        );
        match self.mark_and_store(cfg).await {
            Ok(record) => {
                let mut next_cfg = reversed(cfg.clone());
                next_cfg.listener_wal.dir = cfg.data_dir.join(&record.wal_dir);
                let sources = self.sides.sources.iter().map(|m| m.url.clone());
                Ok((
                    next_cfg,
                    Committed {
                        steps: self.steps,
                        paused: self.paused,
                        pausers: sources.zip(self.pausers).collect(),
                        unpaused: None,
                        record,
                    },
                ))
            }
            Err(error) => {
                self.rollback().await;
                Err(self.steps.report(
                    Some(error),
                    self.direction,
                    Some((self.paused, Instant::now())),
                ))
            }
        }
    }

    async fn rollback(&mut self) {
        undo(
            &self.data_dir,
            std::mem::take(&mut self.pausers),
            &self.sides.sources,
            &self.next,
            &self.next_dir,
            self.next_cluster_dir.as_deref(),
        )
        .await;
    }

    /// The old direction could not be stopped cleanly: roll back.
    pub(super) async fn abandon(mut self, why: String) -> SwitchoverReport {
        self.rollback().await;
        self.steps.report(
            Some(why),
            self.direction,
            Some((self.paused, Instant::now())),
        )
    }

    async fn mark_and_store(&mut self, cfg: &SyncConfig) -> Result<DirectionRecord, String> {
        if Instant::now() >= self.deadline {
            return Err("timed out before the switch point was marked".into());
        }
        let started = Instant::now();
        let note = format!(
            "{{\"generation\":{},\"unix-ms\":{},\"from\":\"{}\"}}",
            self.generation,
            now_unix_ms(),
            self.direction.0
        );
        let mut names = Vec::with_capacity(self.sides.targets.len());
        for master in &self.sides.targets {
            // On a cluster the key is in a slot of the master, so that
            // the whole transaction runs there.
            names.push(match self.sides.pair.is_cluster(1) {
                false => format!("switchover:{}", cfg.id),
                true => {
                    let slot = master
                        .slots
                        .first()
                        .ok_or_else(|| format!("{} serves no slot", master.url.addr()))?;
                    format!("switchover:{}:{}", tag_for_slot(slot), cfg.id)
                }
            });
        }
        // Every master at once: each mark is its own master's point, and
        // the writes are paused on the other side meanwhile.
        let marks = futures::future::try_join_all(
            self.sides
                .targets
                .iter()
                .zip(&names)
                .map(|(master, name)| mark_stream(&master.url, name, &note)),
        )
        .await?;
        let shown: Vec<String> = self
            .sides
            .targets
            .iter()
            .zip(&marks)
            .map(|(m, (_, replid, offset))| {
                format!("{} at replid {replid} offset {offset}", m.url.addr())
            })
            .collect();
        self.steps.done(
            "mark the switch point on the target",
            started,
            shown.join("; "),
        );

        let started = Instant::now();
        // Every partition's entry 1 at once: the WAL's group commit makes
        // them durable together.
        let stored = futures::future::try_join_all(marks.iter().enumerate().map(
            |(i, (set, replid, offset))| {
                let partition = PartitionId(u32::try_from(i).unwrap_or(u32::MAX));
                let payload = Record::encode_write(0, std::slice::from_ref(set), false);
                let position = SourcePosition {
                    replid: replid.as_str().into(),
                    offset: ReplOffset(*offset),
                    db: 0,
                };
                let wal = self.next.clone();
                async move {
                    let appended = wal
                        .append(partition, vec![NewEntry::new(position, payload)])
                        .await
                        .map_err(|error| {
                            format!("storing the reversed start of partition {partition}: {error}")
                        })?;
                    match appended.first == LogId(1) {
                        true => Ok(()),
                        false => Err(format!(
                            "the reversed WAL's first entry of partition {partition} got id {}, \
                             not 1",
                            appended.first
                        )),
                    }
                }
            },
        ))
        .await;
        stored?;
        let mut partitions = Vec::with_capacity(marks.len());
        for (i, ((_, replid, offset), master)) in
            marks.into_iter().zip(&self.sides.targets).enumerate()
        {
            let partition = PartitionId(u32::try_from(i).unwrap_or(u32::MAX));
            partitions.push(PartitionStart {
                partition: partition.0,
                master: master.url.addr(),
                node_id: master.id.clone(),
                slots: master.slots.to_string(),
                replid,
                offset,
                log_tag: self.log_tags.get(i).copied().ok_or_else(|| {
                    format!("no log tag prepared for the reversed partition {partition}")
                })?,
            });
        }
        self.next
            .clone()
            .close()
            .await
            .map_err(|error| format!("closing the reversed WAL: {error}"))?;
        let first = partitions
            .first()
            .cloned()
            .ok_or("the target has no master")?;
        let record = DirectionRecord {
            version: RECORD_VERSION,
            generation: self.generation,
            source: self.direction.1.clone(),
            target: self.direction.0.clone(),
            wal_dir: format!("{WAL_DIR_PREFIX}{}", self.generation),
            switched_unix_ms: now_unix_ms(),
            replid: first.replid,
            offset: first.offset,
            log_tag: first.log_tag,
            released: false,
            // The reversed direction: the old target is its source.
            partitions: match self.sides.pair.is_cluster(1) {
                true => partitions.clone(),
                false => Vec::new(),
            },
            pair: match self.sides.pair {
                Pair::StandaloneCluster => Some(Pair::ClusterStandalone),
                Pair::ClusterStandalone => Some(Pair::StandaloneCluster),
                Pair::Standalone | Pair::Clusters => None,
            },
        };
        record.save(&cfg.data_dir).map_err(|error| {
            format!(
                "writing {}: {error}",
                cfg.data_dir.join(RECORD_FILE).display()
            )
        })?;
        let entries = match partitions.len() {
            1 => format!(
                "entry 1 of {} at offset {}",
                self.next_dir.display(),
                first.offset
            ),
            n => format!(
                "entry 1 of each of the {n} partitions of {}",
                self.next_dir.display()
            ),
        };
        self.steps.done(
            "store the reversed start",
            started,
            format!(
                "{entries}; {} committed (generation {})",
                cfg.data_dir.join(RECORD_FILE).display(),
                self.generation
            ),
        );
        Ok(record)
    }
}

impl Committed {
    /// Step 8 (module doc): the held writers closed, the old source
    /// unpaused and given the reversed appliers' checkpoints. Done before
    /// the reversed stages start, so that the checkpoints are there when
    /// the appliers read them.
    pub(super) async fn release(&mut self, cfg: &SyncConfig) {
        hold_for_test("committed").await;
        let began = Instant::now();
        let mut unpaused = None;
        let released = release(&mut self.pausers, cfg, &self.record, &mut unpaused).await;
        // The write pause ended with the last `CLIENT UNPAUSE`, before the
        // reversed appliers' checkpoints were written.
        self.unpaused = unpaused;
        // Committed: the record says what a restart does from now on.
        clear_pause_note(&cfg.data_dir);
        match released {
            Ok(detail) => {
                self.record.released = true;
                if let Err(error) = self.record.save(&cfg.data_dir) {
                    warn!(%error, "cannot note in the direction record that the old source was released (the next start does it again, which changes nothing)");
                }
                self.steps.done("release the old source", began, detail);
                hold_for_test("released").await;
            }
            Err(error) => self.steps.done(
                "release the old source",
                began,
                format!(
                    "{error}; the pause ends by itself, and the next start of ferry releases it"
                ),
            ),
        }
    }

    /// Step 9, done by the caller (`started` is when it began, `error` what
    /// went wrong): the report.
    pub(super) fn finish(mut self, started: Instant, error: Option<String>) -> SwitchoverReport {
        let direction = (self.record.source.clone(), self.record.target.clone());
        match &error {
            None => self.steps.done(
                "start the reversed direction",
                started,
                format!("{} -> {}", self.record.source, self.record.target),
            ),
            Some(error) => self.steps.done(
                "start the reversed direction",
                started,
                format!("failed: {error}; a restart of ferry runs it"),
            ),
        }
        let unpaused = self.unpaused.unwrap_or_else(Instant::now);
        self.steps
            .report(error, direction, Some((self.paused, unpaused)))
    }
}

/// Notes in the data dir that a switchover to `generation` pauses the
/// source ([`PAUSED_FILE`]).
fn note_pause(data_dir: &Path, generation: u64) -> Result<(), String> {
    let path = data_dir.join(PAUSED_FILE);
    super::run::write_atomically(&path, &format!("{generation}\n"))
        .map_err(|error| format!("writing {}: {error}", path.display()))
}

fn clear_pause_note(data_dir: &Path) {
    let path = data_dir.join(PAUSED_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            warn!(file = %path.display(), %error, "cannot delete the switchover's pause note")
        }
    }
}

/// For a process that died while a switchover it never committed had the
/// source paused (its [`PAUSED_FILE`] names a generation the record does
/// not have): `CLIENT UNPAUSE` on every master of the source (`cfg` has the
/// record laid over it: the direction that was paused), rather than leaving
/// its writers waiting for the pause's end. The writes the pause held then
/// run on the source and go the old direction's way. A committed
/// switchover's note is only deleted: [`release_after_restart`] releases.
pub async fn unpause_after_restart(cfg: &SyncConfig, record: Option<&DirectionRecord>) {
    let path = cfg.data_dir.join(PAUSED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
        Err(error) => {
            warn!(file = %path.display(), %error, "cannot read the switchover's pause note; the source's pause ends by itself");
            return;
        }
    };
    let noted = text.trim().parse::<u64>().ok();
    if noted.is_some() && noted == record.map(|r| r.generation) {
        clear_pause_note(&cfg.data_dir);
        return;
    }
    let unpaused = async {
        let (sources, _) = urls(cfg).map_err(|e| e.to_string())?;
        let cluster = is_cluster(&sources, "source").await?;
        let masters = master_urls(&sources, cluster, "source").await?;
        let mut addrs = Vec::with_capacity(masters.len());
        for url in masters {
            let addr = url.addr();
            connect(&url)
                .await?
                .call(["CLIENT", "UNPAUSE"])
                .await
                .map_err(client_error("CLIENT UNPAUSE", &addr))?;
            addrs.push(addr);
        }
        Ok::<String, String>(addrs.join(", "))
    }
    .await;
    match unpaused {
        Ok(addrs) => {
            info!(masters = %addrs, "unpaused the source of a switchover that a stop interrupted before its commit");
            clear_pause_note(&cfg.data_dir);
        }
        Err(error) => {
            warn!(%error, "cannot unpause the source of an interrupted switchover; its pause ends by itself")
        }
    }
}

/// The masters of one side: its URL for a standalone server, every shard's
/// master for a cluster (with the first seed's login and TLS options).
async fn master_urls(
    seeds: &[RedisUrl],
    cluster: bool,
    side: &str,
) -> Result<Vec<RedisUrl>, String> {
    let template = seeds.first().ok_or_else(|| format!("no {side}"))?.clone();
    if !cluster {
        return Ok(vec![template]);
    }
    Ok(crate::redis::cluster::discover(seeds)
        .await
        .map_err(|error| format!("the {side} cluster: {error}"))?
        .shards()
        .iter()
        .map(|shard| Topology::url_for(&shard.master, &template))
        .collect())
}

/// Step 8 for a process that died between the commit and the release: the
/// old source is the target now (`cfg` has the record laid over it). A
/// target that does not answer is left to its pause's end; the applier
/// then waits for its checkpoint's log (a foreign checkpoint is never
/// resumed after).
pub async fn release_after_restart(cfg: &SyncConfig, record: &mut DirectionRecord) {
    let released = async {
        let (_, targets) = urls(cfg).map_err(|e| e.to_string())?;
        let masters = master_urls(&targets, record.pair().is_cluster(1), "old source").await?;
        let mut clients = Vec::with_capacity(masters.len());
        for url in masters {
            let client = connect(&url).await?;
            clients.push((url, client));
        }
        release(&mut clients, cfg, record, &mut None).await
    }
    .await;
    match released {
        Ok(detail) => {
            info!(%detail, "released the old source of an unfinished switchover");
            record.released = true;
            if let Err(error) = record.save(&cfg.data_dir) {
                warn!(%error, "cannot update the direction record");
            }
        }
        Err(error) => {
            warn!(%error, "cannot release the old source of an unfinished switchover; its pause ends by itself")
        }
    }
}

/// Step 8: on every master of the old source, closes the clients the
/// pause holds (not ferry's) and unpauses; then sets the reversed
/// appliers' checkpoints (two standalone servers:
/// [`standalone_checkpoint`]; a cluster on either side:
/// [`cluster_checkpoints`]). Returns what it did; `unpaused` gets when the
/// last master was unpaused (the write pause's end).
async fn release(
    masters: &mut [(RedisUrl, Client)],
    cfg: &SyncConfig,
    record: &DirectionRecord,
    unpaused: &mut Option<Instant>,
) -> Result<String, String> {
    let mut closed = 0;
    for (url, client) in masters.iter_mut() {
        closed += release_held(client, &url.addr()).await?;
    }
    *unpaused = Some(Instant::now());
    hold_for_test("unpaused").await;
    let checkpoints = match record.pair() {
        Pair::Standalone => {
            let (url, client) = masters.first_mut().ok_or("no old source")?;
            standalone_checkpoint(client, &url.addr(), cfg, record).await?
        }
        Pair::Clusters | Pair::StandaloneCluster | Pair::ClusterStandalone => {
            cluster_checkpoints(cfg, record).await?
        }
    };
    Ok(format!(
        "{closed} client(s) with writes held by the pause closed (their writes did not run), \
         CLIENT UNPAUSE{}; {checkpoints}",
        match masters.len() {
            1 => String::new(),
            n => format!(" on each of {n} masters"),
        }
    ))
}

/// Closes the clients the pause of `client`'s server holds (not ferry's)
/// and unpauses it; returns how many it closed.
async fn release_held(client: &mut Client, addr: &str) -> Result<usize, String> {
    let own = client
        .call(["CLIENT", "ID"])
        .await
        .map_err(client_error("CLIENT ID", addr))?;
    let own = match own {
        Frame::Integer(id) => id.to_string(),
        other => return Err(format!("{addr}: CLIENT ID answered {other:?}")),
    };
    let list = client
        .call(["CLIENT", "LIST", "TYPE", "normal"])
        .await
        .map_err(client_error("CLIENT LIST", addr))?;
    let text = match &list {
        Frame::Bulk(text) => String::from_utf8_lossy(text).into_owned(),
        Frame::Verbatim { text, .. } => String::from_utf8_lossy(text).into_owned(),
        other => return Err(format!("{addr}: CLIENT LIST answered {other:?}")),
    };
    let held = held_clients(&text, &own);
    let mut commands: Vec<Command> = held
        .iter()
        .map(|id| Command::from_parts(["CLIENT", "KILL", "ID", id.as_str()]))
        .collect();
    commands.push(Command::from_parts(["CLIENT", "UNPAUSE"]));
    let replies = client
        .pipeline(&commands)
        .await
        .map_err(client_error("CLIENT KILL / UNPAUSE", addr))?;
    if let Some(Frame::Error(error)) = replies.last() {
        return Err(format!(
            "{addr}: CLIENT UNPAUSE answered {}",
            String::from_utf8_lossy(error)
        ));
    }
    Ok(held.len())
}

/// The reversed applier's checkpoint on a standalone old source,
/// `applied=1` of the record's log, unless it already holds one of that
/// log (a release done again after a crash must not move back a
/// checkpoint the applier moved).
async fn standalone_checkpoint(
    client: &mut Client,
    addr: &str,
    cfg: &SyncConfig,
    record: &DirectionRecord,
) -> Result<String, String> {
    let key = checkpoint_key(&cfg.apply.drainer_id, PartitionId(0));
    let current = client
        .call([b"GET".as_slice(), key.as_slice()])
        .await
        .map_err(client_error("GET of the checkpoint", addr))?;
    if is_ours(&current, record.log_tag) {
        return Ok("the reversed applier's checkpoint was there".into());
    }
    client
        .call([
            b"SET".as_slice(),
            key.as_slice(),
            first_applied(record.log_tag).as_bytes(),
        ])
        .await
        .map_err(client_error("SET of the checkpoint", addr))?;
    Ok("the reversed applier's checkpoint set to resume after entry 1".into())
}

fn is_ours(value: &Frame, log_tag: u64) -> bool {
    match value {
        Frame::Bulk(value) => Checkpoint::decode(value).is_ok_and(|c| c.log() == log_tag),
        _ => false,
    }
}

fn first_applied(log_tag: u64) -> String {
    Checkpoint::Applied {
        log_id: LogId(1),
        epoch: 0,
        log: log_tag,
        source: None,
    }
    .encode()
}

/// Connections to the masters of a cluster, a command sent to the master
/// of its key's slot; without a topology, every command to the one
/// standalone server `template`.
struct Routed {
    topology: Option<Topology>,
    template: RedisUrl,
    clients: BTreeMap<String, Client>,
}

impl Routed {
    /// `commands` pipelined on the master of `key`'s slot; an error reply
    /// is an error naming the master.
    async fn run(&mut self, key: &[u8], commands: &[Command]) -> Result<Vec<Frame>, String> {
        let url = match &self.topology {
            None => self.template.clone(),
            Some(topology) => {
                let slot = key_hash_slot(key);
                let node = topology.master_for_slot(slot).ok_or_else(|| {
                    format!(
                        "no master of the cluster {} serves slot {slot}",
                        topology.seen_from
                    )
                })?;
                Topology::url_for(node, &self.template)
            }
        };
        let addr = url.addr();
        if !self.clients.contains_key(&addr) {
            let client = connect(&url).await?;
            self.clients.insert(addr.clone(), client);
        }
        let client = self
            .clients
            .get_mut(&addr)
            .ok_or_else(|| format!("no connection to {addr}"))?;
        let replies = client
            .pipeline(commands)
            .await
            .map_err(client_error("the reversed appliers' checkpoints", &addr))?;
        let failed = |frame: &Frame| match frame {
            Frame::Error(error) => Some(String::from_utf8_lossy(error).into_owned()),
            Frame::Array(items) => items.iter().find_map(|item| match item {
                Frame::Error(error) => Some(String::from_utf8_lossy(error).into_owned()),
                _ => None,
            }),
            _ => None,
        };
        if let Some(error) = replies.iter().find_map(failed) {
            return Err(format!("{addr} answered {error}"));
        }
        Ok(replies)
    }
}

/// The reversed appliers' state on the old source with a cluster on
/// either side (what a cluster source's appliers, or any applier into a
/// cluster, read at a session's start; apply module): for a cluster new
/// source, every slot of the owner map given to the partition whose master
/// served it at the switch, generation 0 (the slot table the reversed
/// listener starts with), and each partition's slot scope, its master's
/// slots; each partition's floor checkpoint `applied=1` of its log (on a
/// standalone old source its plain checkpoint; a standalone new source's
/// one partition 0 gets that alone, on the master of its key's slot of a
/// cluster old source). Nothing is written when every floor is of its
/// partition's log already (a release done again after a crash must not
/// move back what the appliers moved); the floors go last, so a crash in
/// between writes everything again.
async fn cluster_checkpoints(cfg: &SyncConfig, record: &DirectionRecord) -> Result<String, String> {
    let (_, targets) = urls(cfg).map_err(|e| e.to_string())?;
    let target = TargetState {
        targets: &targets,
        cluster: record.pair().is_cluster(1),
        drainer: &cfg.apply.drainer_id,
        origin: &cfg.data_dir.join(RECORD_FILE),
    };
    cluster_target_state(&target, &record.starts()).await
}

/// The appliers' target [`cluster_target_state`] prepares.
pub(super) struct TargetState<'a> {
    /// The target's seeds (a standalone target's one server).
    pub(super) targets: &'a [RedisUrl],
    /// Whether the target runs Redis Cluster.
    pub(super) cluster: bool,
    /// The drainer id of the appliers (their keys' names).
    pub(super) drainer: &'a str,
    /// Where the starts' slots come from, for errors.
    pub(super) origin: &'a Path,
}

/// [`cluster_checkpoints`] for the partitions `starts` into `target` (also
/// the backward direction of a two-way sync with a cluster on either side).
/// A standalone target gets the same keys on its one server, its floors
/// being its checkpoints. Starts without slots (a standalone source's one
/// partition) get their floor alone: no owner map, no scope.
pub(super) async fn cluster_target_state(
    target: &TargetState<'_>,
    starts: &[PartitionStart],
) -> Result<String, String> {
    let template = target.targets.first().ok_or("no target")?.clone();
    let topology = match target.cluster {
        true => Some(
            crate::redis::cluster::discover(target.targets)
                .await
                .map_err(|error| format!("the cluster the reversed appliers write: {error}"))?,
        ),
        false => None,
    };
    let mut routed = Routed {
        topology,
        template,
        clients: BTreeMap::new(),
    };
    let drainer = target.drainer;
    let mut missing = Vec::new();
    for start in starts {
        let key = checkpoint_key(drainer, PartitionId(start.partition));
        let replies = routed
            .run(&key, &[Command::from_parts([b"GET".as_slice(), &key])])
            .await?;
        if !replies.first().is_some_and(|r| is_ours(r, start.log_tag)) {
            missing.push(start);
        }
    }
    if missing.is_empty() {
        return Ok("the reversed appliers' checkpoints were there".into());
    }
    let sharded = starts.iter().any(|start| !start.slots.is_empty());
    let map_key = owner_map_key(drainer);
    let mut hset = vec![Bytes::from_static(b"HSET"), Bytes::from(map_key.clone())];
    let mut scopes = Vec::with_capacity(starts.len());
    for start in starts.iter().filter(|_| sharded) {
        let slots = SlotRanges::parse(&start.slots).map_err(|why| {
            format!(
                "{}: the slots {:?} of partition {}: {why}",
                target.origin.display(),
                start.slots,
                start.partition
            )
        })?;
        let owner = Bytes::from(format!("{} 0", start.partition));
        for &(first, last) in slots.ranges() {
            for slot in first..=last {
                hset.push(Bytes::from(slot.to_string()));
                hset.push(owner.clone());
            }
        }
        scopes.push((start.partition, encode_scope(&slots)));
    }
    if sharded {
        routed
            .run(
                &map_key,
                &[
                    Command::from_parts(["MULTI"]),
                    Command::from_parts([b"DEL".as_slice(), &map_key]),
                    Command::new(hset),
                    Command::from_parts(["EXEC"]),
                ],
            )
            .await?;
    }
    // The scopes, then the floors last.
    let scopes = scopes.iter().map(|(partition, scope)| {
        (
            scope_key(drainer, PartitionId(*partition)),
            scope.to_string(),
        )
    });
    let floors = missing.iter().map(|start| {
        let key = checkpoint_key(drainer, PartitionId(start.partition));
        (key, first_applied(start.log_tag))
    });
    for (key, value) in scopes.chain(floors) {
        let set = Command::from_parts([b"SET".as_slice(), &key, value.as_bytes()]);
        routed.run(&key, &[set]).await?;
    }
    Ok(match sharded {
        true => format!(
            "the reversed appliers' owner map (16384 slots, generation 0) and slot scopes \
             written, {} checkpoint(s) set to resume after entry 1",
            missing.len()
        ),
        false => format!(
            "{} checkpoint(s) set to resume after entry 1",
            missing.len()
        ),
    })
}

/// Ids of the clients of a `CLIENT LIST` that are blocked (flag `b`: held
/// by the pause, or in a blocking command, which is a write too) and not
/// ferry's own (named `ferry-*`) nor `own`.
fn held_clients(list: &str, own: &str) -> Vec<String> {
    list.lines()
        .filter_map(|line| {
            let mut id = None;
            let mut blocked = false;
            let mut ferry = false;
            for part in line.split(' ') {
                if let Some(value) = part.strip_prefix("id=") {
                    id = Some(value.to_string());
                } else if let Some(flags) = part.strip_prefix("flags=") {
                    blocked = flags.contains('b');
                } else if let Some(name) = part.strip_prefix("name=") {
                    ferry = name.starts_with("ferry-");
                }
            }
            id.filter(|id| blocked && !ferry && id != own)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_clients_are_blocked_ones_not_ferrys() {
        let list = "id=3 addr=127.0.0.1:1 laddr=x fd=8 name= age=1 idle=0 flags=b db=0 cmd=set\n\
                    id=4 addr=127.0.0.1:2 laddr=x fd=9 name=ferry-apply:ferry:0 age=1 idle=0 flags=b db=0 cmd=exec\n\
                    id=5 addr=127.0.0.1:3 laddr=x fd=10 name=app age=1 idle=0 flags=N db=0 cmd=get\n\
                    id=6 addr=127.0.0.1:4 laddr=x fd=11 name=app age=1 idle=0 flags=b db=0 cmd=blpop\n\
                    id=7 addr=127.0.0.1:5 laddr=x fd=12 name= age=1 idle=0 flags=b db=0 cmd=client|list\n";
        assert_eq!(
            held_clients(list, "7"),
            vec!["3".to_string(), "6".to_string()]
        );
    }

    fn record() -> DirectionRecord {
        DirectionRecord {
            version: 1,
            generation: 2,
            source: "127.0.0.1:7001".into(),
            target: "127.0.0.1:7000".into(),
            wal_dir: "listener.g2".into(),
            switched_unix_ms: 1,
            replid: "a".repeat(40),
            offset: 99,
            log_tag: 7,
            released: true,
            partitions: Vec::new(),
            pair: None,
        }
    }

    /// A mixed pair's record names its pair; its partitions go with the
    /// kind of its source, and a standalone source's one partition is the
    /// record's own start.
    #[test]
    fn a_mixed_pairs_record_names_its_pair() {
        let dir = tempfile::tempdir().unwrap();
        let mut into_cluster = record();
        into_cluster.pair = Some(Pair::StandaloneCluster);
        into_cluster.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(RECORD_FILE)).unwrap();
        assert!(text.contains("\"pair\": \"standalone-cluster\""), "{text}");
        let loaded = DirectionRecord::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, into_cluster);
        assert_eq!(loaded.pair(), Pair::StandaloneCluster);
        let starts = loaded.starts();
        assert_eq!(starts.len(), 1);
        assert_eq!((starts[0].partition, starts[0].slots.as_str()), (0, ""));
        assert_eq!(
            (
                starts[0].offset,
                starts[0].log_tag,
                starts[0].master.as_str()
            ),
            (99, 7, "127.0.0.1:7001")
        );
        // Without the field: what the partitions say.
        assert_eq!(record().pair(), Pair::Standalone);
        // A cluster source without partitions, or a standalone one with
        // them, is refused naming the file.
        let mut wrong = record();
        wrong.pair = Some(Pair::ClusterStandalone);
        wrong.save(dir.path()).unwrap();
        let error = DirectionRecord::load(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains(RECORD_FILE) && error.contains("cluster-standalone"),
            "{error}"
        );
        wrong.pair = Some(Pair::StandaloneCluster);
        wrong.partitions = vec![PartitionStart {
            partition: 0,
            master: "127.0.0.1:7001".into(),
            node_id: "a".repeat(40),
            slots: "0-16383".into(),
            replid: "b".repeat(40),
            offset: 5,
            log_tag: 9,
        }];
        wrong.save(dir.path()).unwrap();
        assert!(DirectionRecord::load(dir.path()).is_err());
        wrong.pair = Some(Pair::ClusterStandalone);
        wrong.save(dir.path()).unwrap();
        let loaded = DirectionRecord::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.pair(), Pair::ClusterStandalone);
        assert_eq!(loaded.starts(), wrong.partitions);
    }

    #[test]
    fn a_generations_cluster_files_are_in_its_own_dir() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let mut cfg = config(&data, "redis://127.0.0.1:7000", "redis://127.0.0.1:7001");
        assert_eq!(cluster_dir(&cfg), data);
        cfg.listener_wal.dir = data.join("listener.g3");
        assert_eq!(cluster_dir(&cfg), data.join("cluster.g3"));
    }

    #[test]
    fn a_clusters_record_keeps_every_partition_and_older_records_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = record();
        cluster.partitions = vec![PartitionStart {
            partition: 0,
            master: "127.0.0.1:7001".into(),
            node_id: "a".repeat(40),
            slots: "0-5460".into(),
            replid: "b".repeat(40),
            offset: 5,
            log_tag: 9,
        }];
        cluster.save(dir.path()).unwrap();
        assert_eq!(DirectionRecord::load(dir.path()).unwrap(), Some(cluster));
        // A standalone record has no partitions field at all.
        record().save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(RECORD_FILE)).unwrap();
        assert!(!text.contains("partitions"), "{text}");
        assert_eq!(DirectionRecord::load(dir.path()).unwrap(), Some(record()));
    }

    #[test]
    fn records_round_trip_and_bad_ones_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DirectionRecord::load(dir.path()).unwrap(), None);
        record().save(dir.path()).unwrap();
        assert_eq!(DirectionRecord::load(dir.path()).unwrap(), Some(record()));
        for (text, why) in [
            ("{", "EOF"),
            (r#"{"version": 2}"#, "missing field"),
            ("", "EOF"),
        ] {
            std::fs::write(dir.path().join(RECORD_FILE), text).unwrap();
            let error = DirectionRecord::load(dir.path()).unwrap_err().to_string();
            assert!(
                error.contains(RECORD_FILE) && error.contains(why),
                "{error}"
            );
        }
        let mut wrong = record();
        wrong.wal_dir = "../elsewhere".into();
        wrong.save(dir.path()).unwrap();
        let error = DirectionRecord::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("is not listener.g2"), "{error}");
        let mut newer = record();
        newer.version = 9;
        newer.save(dir.path()).unwrap();
        let error = DirectionRecord::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("version 9"), "{error}");
    }

    fn config(data_dir: &Path, source: &str, target: &str) -> SyncConfig {
        let secrets = data_dir.parent().unwrap();
        std::fs::write(secrets.join("source.pw"), "source-secret\n").unwrap();
        std::fs::write(secrets.join("target.pw"), "target-secret\n").unwrap();
        SyncConfig::build(
            None,
            crate::node::SyncOverrides {
                source: Some(source.into()),
                target: Some(target.into()),
                source_password_file: Some(secrets.join("source.pw")),
                target_password_file: Some(secrets.join("target.pw")),
                data_dir: Some(data_dir.to_path_buf()),
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn a_record_reverses_the_command_line_and_refuses_other_servers() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let (a, b) = ("redis://127.0.0.1:7000", "redis://127.0.0.1:7001");
        // No record: as configured.
        let (cfg, none) = lay_record(config(&data, a, b)).unwrap();
        assert_eq!(none, None);
        assert_eq!(cfg.listener_wal.dir, data.join("listener"));
        record().save(&data).unwrap();
        // The original order is swapped, passwords with their servers.
        let (cfg, laid) = lay_record(config(&data, a, b)).unwrap();
        assert_eq!(laid, Some(record()));
        assert_eq!(&*cfg.listener.source, b);
        assert_eq!(&*cfg.apply.target, a);
        let source_pw = cfg.listener.source_password_file.as_ref().unwrap();
        assert!(source_pw.ends_with("target.pw"), "{source_pw:?}");
        let target_pw = cfg.apply.target_password_file.as_ref().unwrap();
        assert!(target_pw.ends_with("source.pw"), "{target_pw:?}");
        let (sources, targets) = urls(&cfg).unwrap();
        assert_eq!(sources[0].password.as_deref(), Some("target-secret"));
        assert_eq!(targets[0].password.as_deref(), Some("source-secret"));
        assert_eq!(cfg.listener_wal.dir, data.join("listener.g2"));
        // The order the record names runs as given.
        let (cfg, _) = lay_record(config(&data, b, a)).unwrap();
        assert_eq!(&*cfg.listener.source, b);
        // Other servers are refused, naming the record and both pairs.
        let error = lay_record(config(&data, a, "redis://127.0.0.1:7002"))
            .unwrap_err()
            .to_string();
        for part in [
            RECORD_FILE,
            "127.0.0.1:7001 into 127.0.0.1:7000",
            "127.0.0.1:7002",
        ] {
            assert!(error.contains(part), "{error}");
        }
        // A db-map is not reversed.
        let mut mapped = config(&data, a, b);
        mapped.apply.filter.db_map = Some([("0".to_string(), 1)].into_iter().collect());
        let error = lay_record(mapped).unwrap_err().to_string();
        assert!(error.contains("db-map"), "{error}");
    }

    #[test]
    fn only_other_generations_wal_dirs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "listener",
            "listener.g1",
            "listener.g2",
            "drainer",
            "listener.gx",
            "cluster.g1",
            "cluster.g2",
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        remove_other_generations(dir.path(), "listener.g1");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["cluster.g1", "drainer", "listener.g1", "listener.gx"]
        );
        remove_other_generations(dir.path(), "listener");
        assert!(!dir.path().join("cluster.g1").exists());
    }
}
