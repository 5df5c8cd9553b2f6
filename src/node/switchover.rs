//! `ferry switchover`: a running one-way `ferry sync` reversed, from the
//! exact position, without a full sync (issue 11, item 3).
//!
//! In: a `ferry sync` applying a standalone source A to a standalone
//! target B from the listener's WAL, and a timeout. Out: the same process
//! replicating B into A, a [`DirectionRecord`] in the data dir that a
//! restart follows, and a [`SwitchoverReport`] of every step.
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
//!    deleted, A → B started again; a kill -9 leaves A paused until the
//!    pause ends, and the next start deletes the dir); after it a restart
//!    runs B → A whatever the command line's order.
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
//! What a switchover does not change: the keys of both sides carry the
//! deadlines the old target had, the source's plus `expire-grace` (apply
//! module, "Expiry"); the new target gets the new source's plus the grace.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::SyncConfig;
use super::run::NodeError;
use crate::apply::checkpoint::{checkpoint_key, Checkpoint};
use crate::position::{now_unix_ms, LogId, PartitionId, ReplOffset};
use crate::record::{Record, INTERNAL_PREFIX};
use crate::redis::client::{parse_info, Client, ClientError};
use crate::redis::command::Command;
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
/// Prefix of the WAL dirs of switched-over generations.
const WAL_DIR_PREFIX: &str = "listener.g";

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
        Ok(Some(record))
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

/// Deletes the listener WAL dirs of `data_dir` other than `current`.
fn remove_other_generations(data_dir: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let generation = name == "listener"
            || name
                .strip_prefix(WAL_DIR_PREFIX)
                .is_some_and(|n| n.parse::<u64>().is_ok());
        if generation && name != current {
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
    let cluster = info(client, addr, "cluster").await?;
    if cluster.get("cluster_enabled").map(String::as_str) == Some("1") {
        return Err(format!(
            "the {side} {addr} is a Redis Cluster node: a switchover needs standalone servers (a cluster's comes later)"
        ));
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

/// A switchover paused on the source with the target caught up: what the
/// next steps need.
pub(super) struct Drained {
    steps: Steps,
    paused: Instant,
    deadline: Instant,
    source: RedisUrl,
    target: RedisUrl,
    /// The connection that paused the source.
    pauser: Client,
    next: Wal,
    next_dir: PathBuf,
    generation: u64,
    partition: PartitionId,
    log_tag: u64,
    direction: (String, String),
}

/// A reversed direction stored, not yet started: the source is still
/// paused.
pub(super) struct Committed {
    steps: Steps,
    paused: Instant,
    source: RedisUrl,
    pauser: Client,
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
    let checked = check(cfg, node).await;
    let (source, target, detail) = match checked {
        Ok(checked) => checked,
        Err(error) => return Err(steps.report(Some(error), direction, None)),
    };
    steps.done("check", started, detail);

    let started = Instant::now();
    let generation = record.map(|r| r.generation).unwrap_or(0) + 1;
    let next_dir = cfg.data_dir.join(format!("{WAL_DIR_PREFIX}{generation}"));
    let partition = PartitionId(0);
    let prepared = prepare(cfg, &next_dir, partition).await;
    let (next, log_tag) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            discard_wal(None, &next_dir).await;
            return Err(steps.report(Some(error), direction, None));
        }
    };
    steps.done(
        "prepare the reverse",
        started,
        format!("new WAL {}, log {log_tag:016x}", next_dir.display()),
    );

    let started = Instant::now();
    let pause_ms = (timeout + PAUSE_MARGIN).as_millis().to_string();
    let paused = async {
        let mut pauser = connect(&source).await?;
        pauser
            .call(["CLIENT", "PAUSE", pause_ms.as_str(), "WRITE"])
            .await
            .map_err(client_error("CLIENT PAUSE", &source.addr()))?;
        Ok::<Client, String>(pauser)
    }
    .await;
    let mut pauser = match paused {
        Ok(pauser) => pauser,
        Err(error) => {
            undo(None, &source, &next, &next_dir).await;
            return Err(steps.report(Some(error), direction, None));
        }
    };
    let paused_at = started;
    let deadline = paused_at + timeout;
    steps.done(
        "pause writes on the source",
        started,
        format!("CLIENT PAUSE {pause_ms} WRITE on {}", source.addr()),
    );

    let started = Instant::now();
    match caught_up(&mut pauser, &source, node, stopping, deadline, timeout).await {
        Ok(detail) => steps.done("wait for the target", started, detail),
        Err(error) => {
            undo(Some(pauser), &source, &next, &next_dir).await;
            return Err(steps.report(Some(error), direction, Some((paused_at, Instant::now()))));
        }
    }
    Ok(Drained {
        steps,
        paused: paused_at,
        deadline,
        source,
        target,
        pauser,
        next,
        next_dir,
        generation,
        partition,
        log_tag,
        direction,
    })
}

/// Step 1: what a switchover needs (module doc).
async fn check(
    cfg: &SyncConfig,
    node: &Arc<dyn NodeControl>,
) -> Result<(RedisUrl, RedisUrl, String), String> {
    if cfg.two_way {
        return Err(
            "a two-way sync replicates both ways already: there is no direction to switch".into(),
        );
    }
    check_reversible(cfg)?;
    let (sources, targets) = urls(cfg).map_err(|e| e.to_string())?;
    let (Some(source), Some(target)) = (sources.first(), targets.first()) else {
        return Err("no source or no target".into());
    };
    if sources.len() > 1 || targets.len() > 1 {
        return Err("a switchover needs standalone servers (a cluster's comes later)".into());
    }
    let status = read_status(node).await?;
    let (Some(listener), Some(applier)) = (status.listeners.first(), status.drainers.first())
    else {
        return Err("the sync has not started its stages yet".into());
    };
    if status.listeners.len() != 1 || status.drainers.len() != 1 {
        return Err("a switchover needs a sync of one partition".into());
    }
    if applier.state == "STOPPED" {
        return Err("the sync is stopped (ferry restart-sync first)".into());
    }
    if let Some(blocked) = &applier.blocked {
        return Err(format!(
            "the applier is held at entry {} ({}): the target refuses it; resolve it first",
            blocked.log_id, blocked.error
        ));
    }
    if listener.source_state != "ONLINE" {
        return Err(format!(
            "the listener is {}, not ONLINE{}",
            listener.source_state,
            listener
                .source_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    let mut a = connect(source).await?;
    let a_version = check_master(&mut a, &source.addr(), "source", (6, 2)).await?;
    let mut b = connect(target).await?;
    let b_version = check_master(&mut b, &target.addr(), "target", (6, 0)).await?;
    let backlog = ensure_backlog(target).await?;
    Ok((
        source.clone(),
        target.clone(),
        format!(
            "source {} (Redis {a_version}) and target {} (Redis {b_version}) standalone masters; {backlog}",
            source.addr(),
            target.addr()
        ),
    ))
}

/// Step 2: the new WAL and its partition's history; returns its log tag.
async fn prepare(
    cfg: &SyncConfig,
    next_dir: &Path,
    partition: PartitionId,
) -> Result<(Wal, u64), String> {
    if next_dir.exists() {
        std::fs::remove_dir_all(next_dir)
            .map_err(|error| format!("deleting {}: {error}", next_dir.display()))?;
    }
    let wal_cfg = WalConfig {
        dir: next_dir.to_path_buf(),
        ..cfg.listener_wal.clone()
    };
    let wal = Wal::open(wal_cfg)
        .await
        .map_err(|error| format!("creating the WAL in {}: {error}", next_dir.display()))?;
    match wal.open_history(partition, &cfg.listener.id).await {
        Ok(history) => Ok((wal, history.log_tag)),
        Err(error) => {
            let _ = wal.close().await;
            Err(format!("creating the partition's history: {error}"))
        }
    }
}

/// Step 4: until the listener holds everything the paused source has and
/// the applier applied all of it.
async fn caught_up(
    pauser: &mut Client,
    source: &RedisUrl,
    node: &Arc<dyn NodeControl>,
    stopping: &CancellationToken,
    deadline: Instant,
    timeout: Duration,
) -> Result<String, String> {
    let addr = source.addr();
    let replication = info(pauser, &addr, "replication").await?;
    let offset: u64 = field(&replication, "master_repl_offset", &addr)?
        .parse()
        .map_err(|_| format!("{addr}: master_repl_offset is not a number"))?;
    let replid = field(&replication, "master_replid", &addr)?.to_string();
    loop {
        if stopping.is_cancelled() {
            return Err("the sync stopped during the switchover".into());
        }
        let status = read_status(node).await?;
        let (Some(listener), Some(applier)) = (status.listeners.first(), status.drainers.first())
        else {
            return Err("the sync's stages are gone".into());
        };
        if let Some(blocked) = &applier.blocked {
            return Err(format!(
                "the applier is held at entry {}: {}",
                blocked.log_id, blocked.error
            ));
        }
        let received = listener.replid.as_deref() == Some(replid.as_str())
            && listener.durable_offset >= offset;
        if received && applier.applied >= listener.last_log_id {
            return Ok(format!(
                "the source's offset {offset} is durable and applied (log id {})",
                applier.applied
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {}s: the source is at offset {offset}, the listener at {} \
                 (durable), the target at log id {} of {}",
                timeout.as_secs_f64(),
                listener.durable_offset,
                applier.applied,
                listener.last_log_id
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Rolls back what [`drain`] or [`Drained::commit`] prepared: the source
/// unpaused, the new WAL closed and deleted.
async fn undo(pauser: Option<Client>, source: &RedisUrl, next: &Wal, next_dir: &Path) {
    let unpaused = async {
        let mut client = match pauser {
            Some(client) => client,
            None => connect(source).await?,
        };
        client
            .call(["CLIENT", "UNPAUSE"])
            .await
            .map_err(client_error("CLIENT UNPAUSE", &source.addr()))?;
        Ok::<(), String>(())
    }
    .await;
    if let Err(error) = unpaused {
        warn!(%error, "rolling back a switchover: the source unpauses by itself when the pause ends");
    }
    discard_wal(Some(next.clone()), next_dir).await;
}

async fn discard_wal(wal: Option<Wal>, dir: &Path) {
    if let Some(wal) = wal {
        if let Err(error) = wal.close().await {
            warn!(%error, "closing the switchover's WAL");
        }
    }
    if dir.exists() {
        if let Err(error) = std::fs::remove_dir_all(dir) {
            warn!(dir = %dir.display(), %error, "cannot delete the switchover's WAL");
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
                Ok((
                    next_cfg,
                    Committed {
                        steps: self.steps,
                        paused: self.paused,
                        source: self.source,
                        pauser: self.pauser,
                        unpaused: None,
                        record,
                    },
                ))
            }
            Err(error) => {
                undo(Some(self.pauser), &self.source, &self.next, &self.next_dir).await;
                Err(self.steps.report(
                    Some(error),
                    self.direction,
                    Some((self.paused, Instant::now())),
                ))
            }
        }
    }

    /// The old direction could not be stopped cleanly: roll back.
    pub(super) async fn abandon(self, why: String) -> SwitchoverReport {
        undo(Some(self.pauser), &self.source, &self.next, &self.next_dir).await;
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
        let addr = self.target.addr();
        let note = format!(
            "{{\"generation\":{},\"unix-ms\":{},\"from\":\"{}\"}}",
            self.generation,
            now_unix_ms(),
            self.source.addr()
        );
        let (set, replid, offset) =
            mark_stream(&self.target, &format!("switchover:{}", cfg.id), &note).await?;
        self.steps.done(
            "mark the switch point on the target",
            started,
            format!("{addr} at replid {replid} offset {offset}"),
        );

        let started = Instant::now();
        let payload = Record::encode_write(0, &[set], false);
        let position = SourcePosition {
            replid: replid.clone(),
            offset: ReplOffset(offset),
            db: 0,
        };
        let appended = self
            .next
            .append(self.partition, vec![NewEntry::new(position, payload)])
            .await
            .map_err(|error| format!("storing the reversed start: {error}"))?;
        if appended.first != LogId(1) {
            return Err(format!(
                "the reversed WAL's first entry got id {}, not 1",
                appended.first
            ));
        }
        self.next
            .clone()
            .close()
            .await
            .map_err(|error| format!("closing the reversed WAL: {error}"))?;
        let record = DirectionRecord {
            version: RECORD_VERSION,
            generation: self.generation,
            source: self.target.addr(),
            target: self.source.addr(),
            wal_dir: format!("{WAL_DIR_PREFIX}{}", self.generation),
            switched_unix_ms: now_unix_ms(),
            replid,
            offset,
            log_tag: self.log_tag,
            released: false,
        };
        record.save(&cfg.data_dir).map_err(|error| {
            format!(
                "writing {}: {error}",
                cfg.data_dir.join(RECORD_FILE).display()
            )
        })?;
        self.steps.done(
            "store the reversed start",
            started,
            format!(
                "entry 1 of {} at offset {offset}; {} committed (generation {})",
                self.next_dir.display(),
                cfg.data_dir.join(RECORD_FILE).display(),
                self.generation
            ),
        );
        Ok(record)
    }
}

impl Committed {
    /// Step 8 (module doc): the held writers closed, the old source
    /// unpaused and given the reversed applier's checkpoint. Done before the
    /// reversed stages start, so that the checkpoint is there when the
    /// applier reads it.
    pub(super) async fn release(&mut self, cfg: &SyncConfig) {
        let began = Instant::now();
        let released = release(&mut self.pauser, &self.source, cfg, &self.record).await;
        match released {
            Ok(detail) => {
                self.unpaused = Some(Instant::now());
                self.record.released = true;
                if let Err(error) = self.record.save(&cfg.data_dir) {
                    warn!(%error, "cannot note in the direction record that the old source was released (the next start does it again, which changes nothing)");
                }
                self.steps.done("release the old source", began, detail)
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

/// Step 8 for a process that died between the commit and the release: the
/// old source is the target now (`cfg` has the record laid over it). A
/// target that does not answer is left to its pause's end; the applier
/// then waits for its checkpoint's log (a foreign checkpoint is never
/// resumed after).
pub async fn release_after_restart(cfg: &SyncConfig, record: &mut DirectionRecord) {
    let released = async {
        let (_, targets) = urls(cfg).map_err(|e| e.to_string())?;
        let target = targets.first().ok_or("no target")?.clone();
        let mut client = connect(&target).await?;
        release(&mut client, &target, cfg, record).await
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

/// Step 8: closes the clients the pause holds (not ferry's), unpauses, and
/// sets the reversed applier's checkpoint, `applied=1` of the record's log,
/// unless the old source already holds one of that log (a release done
/// again after a crash must not move back a checkpoint the applier moved).
/// Returns what it did.
async fn release(
    pauser: &mut Client,
    source: &RedisUrl,
    cfg: &SyncConfig,
    record: &DirectionRecord,
) -> Result<String, String> {
    let addr = source.addr();
    let own = pauser
        .call(["CLIENT", "ID"])
        .await
        .map_err(client_error("CLIENT ID", &addr))?;
    let own = match own {
        Frame::Integer(id) => id.to_string(),
        other => return Err(format!("{addr}: CLIENT ID answered {other:?}")),
    };
    let list = pauser
        .call(["CLIENT", "LIST", "TYPE", "normal"])
        .await
        .map_err(client_error("CLIENT LIST", &addr))?;
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
    let replies = pauser
        .pipeline(&commands)
        .await
        .map_err(client_error("CLIENT KILL / UNPAUSE", &addr))?;
    if let Some(Frame::Error(error)) = replies.last() {
        return Err(format!(
            "{addr}: CLIENT UNPAUSE answered {}",
            String::from_utf8_lossy(error)
        ));
    }
    let key = checkpoint_key(&cfg.apply.drainer_id, PartitionId(0));
    let current = pauser
        .call([b"GET".as_slice(), key.as_slice()])
        .await
        .map_err(client_error("GET of the checkpoint", &addr))?;
    let ours = match &current {
        Frame::Bulk(value) => Checkpoint::decode(value).is_ok_and(|c| c.log() == record.log_tag),
        _ => false,
    };
    if !ours {
        let value = Checkpoint::Applied {
            log_id: LogId(1),
            epoch: 0,
            log: record.log_tag,
        }
        .encode();
        pauser
            .call([b"SET".as_slice(), key.as_slice(), value.as_bytes()])
            .await
            .map_err(client_error("SET of the checkpoint", &addr))?;
    }
    Ok(format!(
        "{} client(s) with writes held by the pause closed (their writes did not run), \
         CLIENT UNPAUSE; {}",
        held.len(),
        if ours {
            "the reversed applier's checkpoint was there"
        } else {
            "the reversed applier's checkpoint set to resume after entry 1"
        }
    ))
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
        }
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
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        remove_other_generations(dir.path(), "listener.g1");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["drainer", "listener.g1", "listener.gx"]);
    }
}
