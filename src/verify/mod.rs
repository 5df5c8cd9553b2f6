//! `ferry verify`: compare a source and a target Redis key by key.
//!
//! In: two sides ([`VerifyConfig`]), each a standalone server or a Redis
//! Cluster (found out from `INFO cluster`; any node, or a seed list). Out: a
//! [`VerifyReport`] (per-db counts, the keys that still differ after the
//! last pass, and per side whether it is a cluster and how many masters
//! were scanned), or a [`VerifyError`] naming the side, db, key and command
//! that failed.
//!
//! A cluster side is walked master by master and each key read from the
//! master serving its slot, following `MOVED` and `ASK`, with the slots
//! that moved under the walk walked again (`src/verify/cluster.rs` says
//! how); it has db 0 only.
//!
//! # Passes
//!
//! The design follows redis-full-check: compare everything once, then
//! compare again only what differed, so that keys written while the check
//! runs (a sync in progress) get time to settle.
//!
//! - Pass 1, per db: `SCAN` the source (`MATCH` `--match`, `COUNT`
//!   `--batch`) and compare each page of keys on both sides; then `SCAN` the
//!   target, ask the source `EXISTS` for each page, and compare the keys the
//!   source lacks (they are *extra*). Keys starting with `__ferry` (ferry's
//!   own heartbeats and checkpoints) are skipped on both sides.
//! - A sync's keyspace: [`VerifyConfig::db_map`] compares each source db
//!   with the target db it maps to, [`VerifyConfig::key_filter`] only the
//!   keys a sync owns (other keys of a shared target db are another sync's,
//!   not *extra*).
//! - Passes 2..=N: after [`VerifyConfig::pass_interval`], re-compare only the
//!   keys that differed in the previous pass. A db stops early once nothing
//!   differs. What differs after its last pass is reported.
//!
//! # What is compared
//!
//! For each key, on both sides: `TYPE` and `PTTL` (pipelined).
//!
//! - *missing*: on the source, not on the target; *extra*: the reverse. A
//!   key gone from both (deleted or expired since the scan) is not a
//!   difference.
//! - *expiring*: on the target only, and expiring there within
//!   [`VerifyConfig::expire_grace_ms`] (plus the tolerance): the source
//!   expired it, and the target keeps it until the source's `DEL` arrives
//!   (the applier writes every deadline later by its `expire-grace`;
//!   `src/apply/expire.rs`). Like a difference from lag it is re-checked
//!   in the next pass (the verify's own `TYPE` on the source expires the
//!   key there, which sends the `DEL`); still so after the last pass, it is
//!   counted in [`DbReport::expiring`], not as a difference.
//! - *type*: the types differ (nothing more is compared).
//! - *ttl*: one side has a TTL and the other not, or the target's expiry
//!   (`PTTL` turned into an absolute time by our clock when the reply
//!   arrived) is more than [`VerifyConfig::ttl_tolerance_ms`] earlier, or
//!   more than the tolerance plus [`VerifyConfig::expire_grace_ms`] later,
//!   than the source's.
//! - *value*, [`Mode::Outline`]: the length or cardinality differs
//!   (`STRLEN`, `LLEN`, `HLEN`, `SCARD`, `ZCARD`, `XLEN`).
//! - *value*, [`Mode::Full`]: the lengths, then the values. When both
//!   servers allow `DEBUG`, equal `DEBUG DIGEST-VALUE`s settle a key at once
//!   (only for keys up to [`VerifyConfig::digest_max_elements`] /
//!   [`VerifyConfig::digest_max_bytes`]: a digest is one command that blocks
//!   the server for the whole value); otherwise (DEBUG refused, a bigger
//!   key, or digests that differ, to name the difference) the value is
//!   walked in chunks, never loaded whole: strings
//!   by `GETRANGE` of [`VerifyConfig::string_chunk`] bytes; lists by
//!   `LRANGE`, sorted sets by `ZRANGE … WITHSCORES` (by index, scores
//!   compared as numbers) and streams by `XRANGE … COUNT` (exclusive start,
//!   Redis 6.2+), [`VerifyConfig::batch`] elements at a time (fewer when
//!   elements are big: see [`VerifyConfig::chunk_budget`]), in order;
//!   hashes and sets, which have no order, by `HSCAN`/`SSCAN` pages of one
//!   side looked up on the other with `HMGET`/`SMISMEMBER` (Redis 6.2+), in
//!   both directions. Streams also compare `XINFO STREAM` (length, last
//!   generated id, max deleted id, entries added, group count) and each
//!   group's consumers, pending count and last delivered id (not
//!   `entries-read` and `lag`, which Redis 7.0 does not replicate). The
//!   first difference of a key is named (offset, index, field or member).
//!   Module types are compared by existence, type and TTL only.
//!
//! A key that changes type under a walk (`WRONGTYPE`), or a stream deleted
//! under it (`no such key`), is a difference for that pass and is re-checked
//! by the next. Any other error reply, and any
//! reply of the wrong shape, ends the verify with a [`VerifyError`].
//!
//! # Cost and memory
//!
//! Each server's commands go through a token bucket of
//! [`VerifyConfig::qps`] commands per second (a pipeline of `n` takes `n`
//! tokens; each master of a cluster has its own), so a verify can run
//! against production while a sync runs.
//! Memory per key is one chunk per side (about
//! [`VerifyConfig::chunk_budget`], or one element when a single element is
//! bigger); what grows with the data is the set of differing keys kept
//! between passes (each key's name and a one-line description).

mod cluster;
mod compare;
mod conn;
pub mod rate;
pub mod report;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use self::compare::{check_keys, Pair};
use self::conn::{Conn, KeyCommand};
pub use self::report::{
    escape_key, render_report, DbReport, KeyReport, SideTopology, VerifyReport,
};
use crate::apply::expire::DEFAULT_EXPIRE_GRACE;
use crate::apply::keyspace::KeyFilter;
use crate::record::INTERNAL_PREFIX;
use crate::redis::client::ClientError;
use crate::redis::cluster::TopologyError;
use crate::redis::url::RedisUrl;

/// Which server a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// How deep the comparison goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Existence, type, TTL, and values element by element.
    Full,
    /// Existence, type, TTL, and length or cardinality.
    Outline,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Outline => "outline",
        }
    }
}

/// What kind of difference a key has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    Missing,
    Extra,
    Type,
    Ttl,
    Value,
    /// On the target only, expiring there within the expire grace: the
    /// source expired it and the target keeps it until the source's `DEL`
    /// arrives. Re-checked like any difference; not one after the last pass.
    Expiring,
}

impl DiffKind {
    pub fn name(self) -> &'static str {
        match self {
            DiffKind::Missing => "missing",
            DiffKind::Extra => "extra",
            DiffKind::Type => "type",
            DiffKind::Ttl => "ttl",
            DiffKind::Value => "value",
            DiffKind::Expiring => "expiring",
        }
    }
}

/// One difference of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub kind: DiffKind,
    /// What differs, for people.
    pub detail: String,
}

/// What to compare and how fast.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// The source: a standalone server, or any node of a cluster.
    pub source: RedisUrl,
    pub target: RedisUrl,
    /// More nodes of a cluster side given as a seed list, tried after
    /// `source` (`target`) when it does not answer. Default none.
    pub source_seeds: Vec<RedisUrl>,
    pub target_seeds: Vec<RedisUrl>,
    /// Dbs to compare; empty: every db holding keys on either side
    /// (`INFO keyspace`).
    pub dbs: Vec<u32>,
    /// `SCAN MATCH` pattern; `None`: every key.
    pub pattern: Option<Bytes>,
    /// Source db to target db (a sync's `[filter] db-map`): each source db
    /// is compared with its target db, and only those (`dbs`, if given,
    /// picks among them). Empty: each db with the db of the same number.
    pub db_map: Vec<(u32, u32)>,
    /// Only the keys a sync's `[filter] key-prefix` / `exclude-key-prefix`
    /// own, on both sides (the target's other keys belong to other syncs).
    /// `None`: every key.
    pub key_filter: Option<KeyFilter>,
    /// Default [`Mode::Full`].
    pub mode: Mode,
    /// Passes per db, at least 1. Default 3.
    pub passes: u32,
    /// Commands per second to each server; 0: unlimited. Default 5000.
    pub qps: u32,
    /// Largest gap between expiry times that is still equal. Default 2000 ms.
    pub ttl_tolerance_ms: u64,
    /// How much later than the source's a target's expiry may be (the
    /// applier's `expire-grace`), and how long a key expired on the source
    /// may stay on the target. Default: the applier's default, 5 minutes.
    pub expire_grace_ms: u64,
    /// Keys per `SCAN` page and pipeline, elements per chunk. Default 100.
    pub batch: usize,
    /// Bytes per `GETRANGE` chunk of a string. Default 256 KiB.
    pub string_chunk: usize,
    /// Bytes a chunk of collection elements should stay under: chunks hold
    /// fewer than `batch` elements when elements are big. Default 4 MiB.
    pub chunk_budget: usize,
    /// Largest collection (elements) and string (bytes) compared with
    /// `DEBUG DIGEST-VALUE`, which blocks the server for the whole value;
    /// bigger ones are walked. Defaults 10 000 and 8 MiB.
    pub digest_max_elements: u64,
    pub digest_max_bytes: u64,
    /// Pause before each pass after the first. Default 1 s.
    pub pass_interval: Duration,
    /// Most differing keys listed in the report. Default 1000.
    pub max_listed: usize,
}

impl VerifyConfig {
    /// The defaults above, for two servers.
    pub fn new(source: RedisUrl, target: RedisUrl) -> VerifyConfig {
        VerifyConfig {
            source,
            target,
            source_seeds: Vec::new(),
            target_seeds: Vec::new(),
            dbs: Vec::new(),
            pattern: None,
            db_map: Vec::new(),
            key_filter: None,
            mode: Mode::Full,
            passes: 3,
            qps: 5000,
            ttl_tolerance_ms: 2000,
            expire_grace_ms: DEFAULT_EXPIRE_GRACE.as_millis() as u64,
            batch: 100,
            string_chunk: 256 * 1024,
            chunk_budget: 4 << 20,
            digest_max_elements: 10_000,
            digest_max_bytes: 8 << 20,
            pass_interval: Duration::from_secs(1),
            max_listed: 1000,
        }
    }
}

impl VerifyConfig {
    /// Every address given for `side`, the first one first.
    pub fn seeds(&self, side: Side) -> Vec<RedisUrl> {
        let (first, more) = match side {
            Side::Source => (&self.source, &self.source_seeds),
            Side::Target => (&self.target, &self.target_seeds),
        };
        std::iter::once(first).chain(more).cloned().collect()
    }

    /// `side`'s address(es) for the report, without passwords:
    /// `redis://host:port` or `redis://host:port,host2:port2,…`.
    pub fn describe(&self, side: Side) -> String {
        let mut text = String::new();
        for (i, url) in self.seeds(side).iter().enumerate() {
            if i == 0 {
                text.push_str(&url.to_string());
            } else {
                text.push(',');
                text.push_str(&url.addr());
            }
        }
        text
    }
}

/// Why a verify could not finish.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot connect to the {side} {url}: {source}")]
    Connect {
        side: Side,
        url: String,
        #[source]
        source: ClientError,
    },
    #[error("lost the {side} connection during {command}: {source}")]
    Link {
        side: Side,
        command: String,
        #[source]
        source: ClientError,
    },
    #[error("the {side} refused {command} ({at}): {message}")]
    Server {
        side: Side,
        at: String,
        command: String,
        message: String,
    },
    #[error("unexpected reply from the {side} to {command} ({at}): {reply}")]
    Reply {
        side: Side,
        at: String,
        command: String,
        reply: String,
    },
    #[error("the {side} is a Redis Cluster whose slot map cannot be read: {source}")]
    Topology {
        side: Side,
        #[source]
        source: TopologyError,
    },
    #[error(
        "the {side} was given as a seed list (for a Redis Cluster) but {url} is a standalone server"
    )]
    NotCluster { side: Side, url: String },
    #[error(
        "the {side} is a Redis Cluster, which has db 0 only: db {db} cannot be compared there \
         (it was asked for, or holds keys on the other side; compare db 0 alone with --db 0)"
    )]
    ClusterDb { side: Side, db: u32 },
    #[error("the {side} redirected {command} ({at}) more than {limit} times; last: {last}")]
    Redirects {
        side: Side,
        at: String,
        command: String,
        limit: usize,
        last: String,
    },
    #[error(
        "the {side} cluster's slots kept moving while its keys were walked (walked again for \
         {secs} s): a resharding in progress? verify again once it ends"
    )]
    Unsettled { side: Side, secs: u64 },
}

/// Progress, reported after each pass of each db.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassEvent {
    pub db: u32,
    /// 1-based.
    pub pass: u32,
    /// Keys differing after this pass.
    pub differing: u64,
    /// Whether another pass follows (after the pass interval).
    pub another_pass: bool,
}

/// Runs a verify; see the module doc.
pub async fn run(config: &VerifyConfig) -> Result<VerifyReport, VerifyError> {
    run_observed(config, &mut |_| {}).await
}

/// [`run`], calling `observer` after each pass (before the pause that
/// precedes the next one).
pub async fn run_observed(
    config: &VerifyConfig,
    observer: &mut (dyn FnMut(&PassEvent) + Send),
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let mut pair = Pair {
        source: Conn::connect(Side::Source, &config.seeds(Side::Source), config.qps).await?,
        target: Conn::connect(Side::Target, &config.seeds(Side::Target), config.qps).await?,
    };
    // (source db, target db) pairs.
    let dbs: Vec<(u32, u32)> = if !config.db_map.is_empty() {
        let mut pairs: Vec<(u32, u32)> = config
            .db_map
            .iter()
            .copied()
            .filter(|(source, _)| config.dbs.is_empty() || config.dbs.contains(source))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        pairs
    } else {
        let mut dbs = if config.dbs.is_empty() {
            let mut dbs = pair.source.keyspace_dbs().await?;
            dbs.extend(pair.target.keyspace_dbs().await?);
            dbs
        } else {
            config.dbs.clone()
        };
        dbs.sort_unstable();
        dbs.dedup();
        dbs.into_iter().map(|db| (db, db)).collect()
    };

    let walked = !dbs.is_empty();
    let mut db_reports = Vec::with_capacity(dbs.len());
    let mut listed = Vec::new();
    let mut total = 0u64;
    for (db, target_db) in dbs {
        let (db_report, differing) = verify_db(&mut pair, db, target_db, config, observer).await?;
        total += differing.len() as u64;
        for (key, diffs) in differing {
            if listed.len() >= config.max_listed {
                break;
            }
            let mut kinds: Vec<DiffKind> = diffs.iter().map(|d| d.kind).collect();
            kinds.sort_unstable();
            kinds.dedup();
            listed.push(KeyReport {
                db,
                key: report::escape_bytes(&key),
                kinds,
                detail: diffs
                    .iter()
                    .map(|d| d.detail.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        db_reports.push(db_report);
    }
    Ok(VerifyReport {
        source: config.describe(Side::Source),
        target: config.describe(Side::Target),
        mode: config.mode,
        passes_max: config.passes.max(1),
        equal: total == 0,
        dbs: db_reports,
        differences_total: total,
        differences_omitted: total - listed.len() as u64,
        differences: listed,
        source_commands: pair.source.commands(),
        target_commands: pair.target.commands(),
        source_topology: SideTopology {
            cluster: pair.source.is_cluster(),
            masters_scanned: pair.source.masters_scanned(walked),
            rewalks: pair.source.rewalks(),
        },
        target_topology: SideTopology {
            cluster: pair.target.is_cluster(),
            masters_scanned: pair.target.masters_scanned(walked),
            rewalks: pair.target.rewalks(),
        },
        elapsed_ms: millis(started.elapsed()),
    })
}

fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

type Differing = BTreeMap<Bytes, Vec<crate::verify::Difference>>;

/// All passes over source db `db` against target db `target_db`.
async fn verify_db(
    pair: &mut Pair,
    db: u32,
    target_db: u32,
    config: &VerifyConfig,
    observer: &mut (dyn FnMut(&PassEvent) + Send),
) -> Result<(DbReport, Differing), VerifyError> {
    let started = Instant::now();
    pair.source.select(db).await?;
    pair.target.select(target_db).await?;
    let batch = config.batch.max(1);
    let passes = config.passes.max(1);
    let mut differing = Differing::new();
    let mut keys_checked = 0u64;

    // Pass 1, source side: every key.
    let mut walk = pair.source.walk(config);
    while let Some(keys) = pair.source.next_page(&mut walk, config).await? {
        keys_checked += keys.len() as u64;
        for chunk in keys.chunks(batch) {
            differing.extend(check_keys(pair, chunk, config).await?);
        }
    }
    // Pass 1, target side: keys the source lacks.
    let mut walk = pair.target.walk(config);
    while let Some(keys) = pair.target.next_page(&mut walk, config).await? {
        for chunk in keys.chunks(batch) {
            let cmds: Vec<KeyCommand> = chunk
                .iter()
                .map(|key| KeyCommand::on(b"EXISTS", key))
                .collect();
            let replies = pair.source.pipeline(&cmds).await?;
            let mut absent = Vec::new();
            for (key, reply) in chunk.iter().zip(&replies) {
                if let Some(message) = reply.error_message() {
                    return Err(pair.source.server_error("EXISTS", Some(key), message));
                }
                match reply.as_integer() {
                    Some(0) => absent.push(key.clone()),
                    Some(_) => {}
                    None => return Err(pair.source.bad_reply("EXISTS", Some(key), reply)),
                }
            }
            keys_checked += absent.len() as u64;
            differing.extend(check_keys(pair, &absent, config).await?);
        }
    }

    let mut differing_after_pass = vec![differing.len() as u64];
    let mut pass = 1;
    loop {
        let another_pass = pass < passes && !differing.is_empty();
        observer(&PassEvent {
            db,
            pass,
            differing: differing.len() as u64,
            another_pass,
        });
        if !another_pass {
            break;
        }
        tokio::time::sleep(config.pass_interval).await;
        pass += 1;
        let keys: Vec<Bytes> = std::mem::take(&mut differing).into_keys().collect();
        for chunk in keys.chunks(batch) {
            differing.extend(check_keys(pair, chunk, config).await?);
        }
        differing_after_pass.push(differing.len() as u64);
    }

    // Keys still only expiring after the last pass are not differences.
    let before = differing.len();
    differing.retain(|_, diffs| !diffs.iter().all(|d| d.kind == DiffKind::Expiring));
    let mut db_report = DbReport {
        db,
        target_db,
        keys_checked,
        passes: pass,
        differing_after_pass,
        expiring: (before - differing.len()) as u64,
        elapsed_ms: millis(started.elapsed()),
        ..DbReport::default()
    };
    for diffs in differing.values() {
        let has = |kind| diffs.iter().any(|d| d.kind == kind);
        db_report.missing += u64::from(has(DiffKind::Missing));
        db_report.extra += u64::from(has(DiffKind::Extra));
        db_report.type_ += u64::from(has(DiffKind::Type));
        db_report.ttl += u64::from(has(DiffKind::Ttl));
        db_report.value += u64::from(has(DiffKind::Value));
    }
    Ok((db_report, differing))
}

/// The `SCAN MATCH` pattern of a db's scan: `--match`, else the key
/// filter's one include prefix (several, or none, are filtered per key).
pub(crate) fn scan_pattern(config: &VerifyConfig) -> Option<Bytes> {
    if config.pattern.is_some() {
        return config.pattern.clone();
    }
    let filter = config.key_filter.as_ref()?;
    match filter.patterns().as_slice() {
        [one] if one.as_ref() != b"*" => Some(one.clone()),
        _ => None,
    }
}

/// Whether a scanned key is compared: not one of ferry's internal keys,
/// and inside the key filter.
pub(crate) fn compared(config: &VerifyConfig, key: &[u8]) -> bool {
    match &config.key_filter {
        Some(filter) => filter.owns(key),
        None => !key.starts_with(INTERNAL_PREFIX),
    }
}
