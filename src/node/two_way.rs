//! Two-way sync (issue 11, item 1): `ferry sync --two-way` between two
//! standalone Redis 7 servers A (`--source`) and B (`--target`).
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
//! # What two-way refuses
//!
//! - `FLUSHALL`, `FLUSHDB`, `SWAPDB` (held like an entry the target refuses;
//!   `ferry skip` passes one over): applied to the other side they would
//!   destroy what its writers did there meanwhile.
//! - Any snapshot load once established (a full resync after a backlog was
//!   overrun, entries expired past `wal-ttl`): it would overwrite the
//!   loading side's writes the other direction has not carried yet. The
//!   node stops with the error.
//! - Redis before 7.0 on either side, a Redis Cluster, a `db-map`, the
//!   relayed path, a switchover.
//!
//! The foreign-write sampler is off: both sides take writes by design.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::SyncConfig;
use super::run::NodeError;
use super::switchover::{
    check_master, client_error, connect, ensure_backlog, mark_stream, read_status, urls,
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
/// The Redis version both sides need (module doc, "What two-way refuses").
const MIN_VERSION: (u32, u32) = (7, 0);
/// How often establishing looks at the forward applier, and retries.
const ESTABLISH_POLL: Duration = Duration::from_millis(200);
const ESTABLISH_RETRY: Duration = Duration::from_secs(1);

/// Whether the backward direction is established: its first entry is
/// durable.
pub(super) fn established(wal: &Wal) -> Result<bool, NodeError> {
    wal.last_log_id(BACKWARD)
        .map(|last| last.is_some())
        .map_err(|error| NodeError::Fatal(format!("reading the WAL: {error}")))
}

/// The forward applier's config: echoes of partition 1 covered, loads
/// refused once established.
pub(super) fn forward_apply(cfg: &SyncConfig, established: bool) -> ApplyConfig {
    ApplyConfig {
        two_way_peer: Some(BACKWARD.0),
        refuse_loads: established,
        foreign_writes_every: HumanDuration(Duration::ZERO),
        ..cfg.apply.clone()
    }
}

/// The backward listener: B as its source, partition 1.
pub(super) fn backward_listener(cfg: &SyncConfig) -> ListenerConfig {
    let mut listener = cfg.listener.clone();
    listener.source = cfg.apply.target.clone();
    listener.source_password_file = cfg.apply.target_password_file.clone();
    listener.source_password_env = cfg.apply.target_password_env.clone();
    listener.partition = BACKWARD.0;
    listener
}

/// The backward applier: A as its target, echoes of partition 0 covered,
/// every load refused.
pub(super) fn backward_apply(cfg: &SyncConfig) -> ApplyConfig {
    let mut apply = forward_apply(cfg, true);
    apply.target = cfg.listener.source.clone();
    apply.target_password_file = cfg.listener.source_password_file.clone();
    apply.target_password_env = cfg.listener.source_password_env.clone();
    apply.two_way_peer = Some(FORWARD.0);
    apply
}

/// The conflict policy with both sides' servers, for a winner policy.
pub(super) fn resolution(cfg: &SyncConfig) -> Option<super::conflicts::Resolution> {
    if cfg.conflict == super::config::ConflictPolicy::Report {
        return None;
    }
    let (a, b) = urls(cfg).ok()?;
    Some(super::conflicts::Resolution {
        policy: cfg.conflict,
        sides: [a.first()?.clone(), b.first()?.clone()],
    })
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
    if a.len() > 1 || b.len() > 1 {
        return Err(NodeError::Precheck(
            "two-way sync needs two standalone servers (a Redis Cluster is not supported)".into(),
        ));
    }
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
    let (Some(a), Some(b)) = (a.first(), b.first()) else {
        return Err(NodeError::Config(
            "two-way sync: no source or no target".into(),
        ));
    };
    match check_sides(a, b).await {
        Err(why) if !why.contains("connecting to") => Err(NodeError::Precheck(why)),
        Err(why) => {
            warn!(%why, "two-way precheck: a side does not answer yet; checked again before the other direction starts");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
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
    let (a, b) = {
        let (a, b) = urls(&cfg).map_err(|e| e.to_string())?;
        match (a.first(), b.first()) {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            _ => return Err("no source or no target".into()),
        }
    };
    // The first full sync, in B.
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let status = read_status(&node).await?;
        let loaded = status
            .drainers
            .iter()
            .find(|d| d.partition == FORWARD.0)
            .is_some_and(|d| {
                d.epoch > 0
                    && d.applied > 0
                    && d.state == "ONLINE"
                    && d.snapshot_load.as_ref().map_or(true, |load| load.done)
            });
        // The status may show the load's progress between its states; the
        // target's own checkpoint says whether the load is committed.
        if loaded && full_sync_committed(&cfg, &b).await {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(ESTABLISH_POLL) => {}
        }
    }
    loop {
        let started = Instant::now();
        match seed(&cfg, &wal, &a, &b).await {
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

/// Whether the target's checkpoint of partition 0 is `applied` in a
/// loaded epoch (not `loading`, not absent).
async fn full_sync_committed(cfg: &SyncConfig, b: &RedisUrl) -> bool {
    let Ok(mut client) = connect(b).await else {
        return false;
    };
    let key = checkpoint_key(&cfg.apply.drainer_id, FORWARD);
    match client.call([b"GET".as_slice(), key.as_slice()]).await {
        Ok(crate::redis::resp::Frame::Bulk(value)) => matches!(
            Checkpoint::decode(&value),
            Ok(Checkpoint::Applied { epoch, .. }) if epoch > 0
        ),
        _ => false,
    }
}

enum Seeding {
    Refused(String),
    Failed(String),
}

/// Partition 1's history, A's checkpoint of it, B's point and entry 1.
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
    let (set, replid, offset) = mark_stream(b, &format!("two-way:{}", cfg.id), &note)
        .await
        .map_err(Seeding::Failed)?;
    let position = SourcePosition {
        replid: replid.clone(),
        offset: ReplOffset(offset),
        db: 0,
    };
    let payload = Record::encode_write(0, &[set], false);
    wal.append(BACKWARD, vec![NewEntry::new(position, payload)])
        .await
        .map_err(|error| Seeding::Failed(format!("storing partition 1's start: {error}")))?;
    Ok(format!(
        "partition 1 starts at {} replid {replid} offset {offset}, log {:016x}",
        b.addr(),
        history.log_tag
    ))
}
