//! `ferry precheck`: can this source be replicated into this target, and
//! what will it cost them? Alibaba DTS-style checks before the first full
//! sync, each PASS, WARN or FAIL with the figures behind it.
//!
//! In: a source and/or a target address (one server, or any node or a
//! comma-separated seed list of a Redis Cluster) and what the sync will do
//! (owned dbs, `existing-data`, the outage to survive, its id). Out: a
//! [`Report`] (a table or JSON); any FAIL means the sync must not start.
//! `ferry sync`, `ferry listener` (source checks) and `ferry drainer`
//! (target checks) run it before their first full sync and refuse to start
//! on a FAIL.
//!
//! Only reads: `PING`, `INFO`, `CONFIG GET`, `COMMAND`, `CLUSTER NODES`,
//! `CLUSTER INFO`, `SCAN` and `GET` of this sync's checkpoint; nothing is
//! written to either server. Where a managed Redis forbids `CONFIG`, the
//! check that needs it says so (WARN).
//!
//! # Redis Cluster
//!
//! A side whose first answering address says `cluster_enabled:1` is read as
//! a cluster: its topology is discovered from the addresses given
//! ([`crate::redis::cluster::discover`]) and every master that serves slots
//! is connected to and checked on its own: the source's version, backlog and
//! replica output buffer; the target's role, eviction policy, persistence
//! and keys (summed over the masters, each master named with what it holds).
//! Each such check is one row whose verdict is the worst of the masters',
//! whose detail names the masters that are not PASS, and whose JSON has a
//! `nodes` list (`node`, `verdict`, `detail` per master). A master that does
//! not answer fails `reachable`; slots that no master serves (or whose
//! master is flagged failing), or a master saying `cluster_state:fail`, fail
//! `cluster slots`. The checks that compare the sides take the newest
//! source master and the oldest target master; a cluster target has db 0
//! only.
//!
//! The source's write rate is measured over `sample` (default 1 s) from
//! `master_repl_offset`, on every master at once; the backlog and
//! output-buffer checks are estimates built on it and say so.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::apply::checkpoint::checkpoint_key;
use crate::apply::keyspace::KeyFilter;
use crate::apply::{ExistingData, OwnedKeyspace};
use crate::position::PartitionId;
use crate::record::INTERNAL_PREFIX;
use crate::redis::client::{Client, ClientError, ClientOptions};
use crate::redis::cluster::{self, SlotRanges, Topology, TopologyError};
use crate::redis::command::{Command, CLUSTER_SLOTS};
use crate::redis::rdb::rebuild::TargetCaps;
use crate::redis::rdb::MAX_RDB_VERSION;
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;

/// A full sync is assumed to move the dataset at this rate, for the
/// output-buffer estimate (RDB generation and transfer on one core, loaded
/// by a replica on another; measured 100-300 MB/s on this project's boxes).
const ASSUMED_FULL_SYNC_BYTES_PER_SEC: f64 = 100.0 * 1024.0 * 1024.0;
/// Owned keys counted per db under a key filter before the count says
/// "at least".
const OWNED_KEYS_COUNTED: u64 = 100_000;
/// The most write commands listed by name in one row.
const LISTED_COMMANDS: usize = 12;

/// One check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub check: String,
    pub verdict: Verdict,
    pub detail: String,
    /// Each master's own outcome, for a check made on every master of a
    /// cluster (empty otherwise, and then left out of the JSON).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeCheck>,
}

/// One master's outcome of a per-master check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeCheck {
    /// `host:port`, as the cluster names it.
    pub node: String,
    pub verdict: Verdict,
    pub detail: String,
}

/// Every check, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// The worst verdict (PASS for an empty report).
    pub fn verdict(&self) -> Verdict {
        self.checks
            .iter()
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Pass)
    }

    pub fn failed(&self) -> bool {
        self.verdict() == Verdict::Fail
    }

    fn push(&mut self, check: impl Into<String>, verdict: Verdict, detail: impl Into<String>) {
        self.checks.push(Check {
            check: check.into(),
            verdict,
            detail: detail.into(),
            nodes: Vec::new(),
        });
    }

    /// One row from each node's outcome (`(node, verdict, detail)`): of a
    /// standalone side, its one outcome as it is; of a cluster, the worst
    /// verdict, naming every node that is not PASS with its detail, and the
    /// outcomes in `nodes`.
    fn push_nodes(
        &mut self,
        check: impl Into<String>,
        cluster: bool,
        outcomes: Vec<(String, Verdict, String)>,
    ) {
        let check = check.into();
        if outcomes.is_empty() {
            return;
        }
        if !cluster {
            for (_, verdict, detail) in outcomes {
                self.push(check.clone(), verdict, detail);
            }
            return;
        }
        let verdict = outcomes.iter().map(|o| o.1).max().unwrap_or(Verdict::Pass);
        let passing: Vec<&str> = outcomes
            .iter()
            .filter(|o| o.1 == Verdict::Pass)
            .map(|o| o.0.as_str())
            .collect();
        // Nodes with the same verdict and detail are named together.
        let mut groups: Vec<(Verdict, &str, Vec<&str>)> = Vec::new();
        for (node, verdict, detail) in &outcomes {
            match groups
                .iter_mut()
                .find(|g| g.0 == *verdict && g.1 == detail.as_str())
            {
                Some(group) => group.2.push(node),
                None => groups.push((*verdict, detail, vec![node])),
            }
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.0));
        let detail = if passing.len() == outcomes.len() {
            match groups.as_slice() {
                [(_, detail, nodes)] => format!("every master ({}): {detail}", names(nodes)),
                _ => groups
                    .iter()
                    .map(|(_, detail, nodes)| format!("{}: {detail}", names(nodes)))
                    .collect::<Vec<_>>()
                    .join("; "),
            }
        } else {
            let mut parts: Vec<String> = groups
                .iter()
                .filter(|g| g.0 != Verdict::Pass)
                .map(|(verdict, detail, nodes)| {
                    format!("{} {}: {detail}", verdict.as_str(), names(nodes))
                })
                .collect();
            if !passing.is_empty() {
                parts.push(format!("PASS on {}", names(&passing)));
            }
            parts.join("; ")
        };
        self.checks.push(Check {
            check,
            verdict,
            detail,
            nodes: outcomes
                .into_iter()
                .map(|(node, verdict, detail)| NodeCheck {
                    node,
                    verdict,
                    detail,
                })
                .collect(),
        });
    }

    /// The PASS/WARN/FAIL table, then the overall verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let rows: Vec<Vec<String>> = self
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.check.clone(),
                    c.verdict.as_str().to_string(),
                    c.detail.clone(),
                ]
            })
            .collect();
        crate::table::table(&mut out, &["Check", "Result", "Detail"], &rows);
        let (warns, fails) = self
            .checks
            .iter()
            .fold((0, 0), |(w, f), c| match c.verdict {
                Verdict::Warn => (w + 1, f),
                Verdict::Fail => (w, f + 1),
                Verdict::Pass => (w, f),
            });
        out.push_str(&format!(
            "precheck: {} ({} checks, {warns} WARN, {fails} FAIL)\n",
            self.verdict().as_str(),
            self.checks.len()
        ));
        out
    }

    /// `{"verdict": ..., "checks": [...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "verdict": self.verdict(),
            "checks": self.checks,
        })
    }
}

/// `a, b, c`.
fn names(nodes: &[&str]) -> String {
    nodes.join(", ")
}

/// What to check.
#[derive(Debug, Clone)]
pub struct PrecheckConfig {
    /// The source's addresses: one server, or any node(s) of a cluster (a
    /// seed list, tried in order); empty: no source checks.
    pub source: Vec<RedisUrl>,
    /// The target's addresses, as `source`; empty: no target checks.
    pub target: Vec<RedisUrl>,
    /// The dbs the sync will own on the target.
    pub keyspace: OwnedKeyspace,
    pub existing_data: ExistingData,
    /// How long an outage of the listener (or of its link to the source)
    /// must be survivable without a full sync.
    pub outage: Duration,
    /// The sync's id (drainer id): its checkpoint on the target means the
    /// sync is resuming, not starting.
    pub id: Option<String>,
    /// How long the source's write rate is measured (for the backlog and
    /// replica output buffer checks); zero leaves those checks out, for
    /// [`source_rate`] to run beside the sync.
    pub sample: Duration,
    pub connect_timeout: Duration,
}

impl PrecheckConfig {
    pub fn new(source: Vec<RedisUrl>, target: Vec<RedisUrl>) -> PrecheckConfig {
        PrecheckConfig {
            source,
            target,
            keyspace: OwnedKeyspace::all(),
            existing_data: ExistingData::Refuse,
            outage: Duration::from_secs(60),
            id: None,
            sample: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What was read from one server.
struct Side {
    client: Client,
    info: HashMap<String, String>,
    config: HashMap<String, String>,
    /// `CONFIG GET` refused (a managed Redis).
    config_error: Option<String>,
}

impl Side {
    fn get(&self, field: &str) -> Option<&str> {
        self.info.get(field).map(String::as_str)
    }

    fn version(&self) -> &str {
        self.get("redis_version").unwrap_or("?")
    }

    fn number(&self, field: &str) -> Option<u64> {
        self.get(field).and_then(|v| v.trim().parse().ok())
    }

    fn config_value(&self, key: &str) -> Option<&str> {
        self.config.get(key).map(String::as_str)
    }
}

async fn connect(url: &RedisUrl, timeout: Duration) -> Result<Side, String> {
    let opts = ClientOptions {
        connect_timeout: timeout,
        ..ClientOptions::default()
    };
    let work = async {
        let mut client = Client::connect_with(url, &opts).await?;
        client.call(["PING"]).await?;
        let info = client.info("all").await?;
        let (config, config_error) = match client.call(["CONFIG", "GET", "*"]).await {
            Ok(Frame::Array(pairs)) => {
                let mut config = HashMap::new();
                for pair in pairs.chunks(2) {
                    if let [key, value] = pair {
                        if let (Some(key), Some(value)) = (key.as_bytes(), value.as_bytes()) {
                            config.insert(
                                String::from_utf8_lossy(key).into_owned(),
                                String::from_utf8_lossy(value).into_owned(),
                            );
                        }
                    }
                }
                (config, None)
            }
            Ok(other) => (HashMap::new(), Some(format!("unexpected reply {other:?}"))),
            Err(ClientError::Server { message, .. }) => (HashMap::new(), Some(message)),
            Err(error) => return Err(error),
        };
        Ok::<_, ClientError>(Side {
            client,
            info,
            config,
            config_error,
        })
    };
    match tokio::time::timeout(timeout * 2, work).await {
        Ok(Ok(side)) => Ok(side),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {:?}", timeout * 2)),
    }
}

fn mib(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", bytes / (1024.0 * 1024.0 * 1024.0))
    } else if bytes >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    } else if bytes >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

/// `dbN:keys=1,expires=0,avg_ttl=0` lines of `INFO keyspace`.
fn keyspace_counts(info: &HashMap<String, String>) -> BTreeMap<u32, u64> {
    let mut counts = BTreeMap::new();
    for (field, value) in info {
        let Some(db) = field.strip_prefix("db").and_then(|d| d.parse::<u32>().ok()) else {
            continue;
        };
        let keys = value
            .split(',')
            .find_map(|part| part.strip_prefix("keys="))
            .and_then(|k| k.parse().ok())
            .unwrap_or(0);
        counts.insert(db, keys);
    }
    counts
}

/// Keys of the connection's db 0 that start with `__ferry` (at most
/// `limit` are counted).
async fn internal_keys(client: &mut Client, limit: usize) -> Result<Vec<Bytes>, ClientError> {
    let mut found = Vec::new();
    let mut cursor = Bytes::from_static(b"0");
    let pattern = [INTERNAL_PREFIX, b"*"].concat();
    loop {
        let reply = client
            .call_command(&Command::new(vec![
                Bytes::from_static(b"SCAN"),
                cursor.clone(),
                Bytes::from_static(b"MATCH"),
                Bytes::from(pattern.clone()),
                Bytes::from_static(b"COUNT"),
                Bytes::from_static(b"1000"),
            ]))
            .await?;
        let Frame::Array(parts) = reply else {
            return Err(ClientError::UnexpectedReply {
                command: "SCAN".into(),
                reply: format!("{reply:?}"),
            });
        };
        let next = parts.first().and_then(Frame::as_bytes).cloned();
        if let Some(Frame::Array(keys)) = parts.get(1) {
            found.extend(keys.iter().filter_map(Frame::as_bytes).cloned());
        }
        match next {
            Some(next) if next.as_ref() != b"0" && found.len() < limit => cursor = next,
            _ => return Ok(found),
        }
    }
}

/// Owned keys of target db `db` under `filter` (SCAN MATCH of each include
/// prefix, each key checked against the filter), counted up to `limit`:
/// `(count, complete)`. Leaves the connection in db 0.
async fn owned_keys(
    client: &mut Client,
    db: u32,
    filter: &KeyFilter,
    limit: u64,
) -> Result<(u64, bool), ClientError> {
    client
        .call_command(&Command::new(vec![
            Bytes::from_static(b"SELECT"),
            Bytes::from(db.to_string()),
        ]))
        .await?;
    let mut seen = std::collections::HashSet::new();
    let mut complete = true;
    'patterns: for pattern in filter.patterns() {
        let mut cursor = Bytes::from_static(b"0");
        loop {
            let reply = client
                .call_command(&Command::new(vec![
                    Bytes::from_static(b"SCAN"),
                    cursor.clone(),
                    Bytes::from_static(b"MATCH"),
                    pattern.clone(),
                    Bytes::from_static(b"COUNT"),
                    Bytes::from_static(b"1000"),
                ]))
                .await?;
            let Frame::Array(parts) = reply else {
                return Err(ClientError::UnexpectedReply {
                    command: "SCAN".into(),
                    reply: format!("{reply:?}"),
                });
            };
            if let Some(Frame::Array(keys)) = parts.get(1) {
                seen.extend(
                    keys.iter()
                        .filter_map(Frame::as_bytes)
                        .filter(|key| filter.owns(key))
                        .cloned(),
                );
            }
            if seen.len() as u64 >= limit {
                complete = false;
                break 'patterns;
            }
            match parts.first().and_then(Frame::as_bytes) {
                Some(next) if next.as_ref() != b"0" => cursor = next.clone(),
                _ => break,
            }
        }
    }
    client.call(&["SELECT", "0"]).await?;
    Ok((seen.len() as u64, complete))
}

/// Names of the write commands `COMMAND` lists (flag `write`).
async fn write_commands(client: &mut Client) -> Result<Vec<String>, ClientError> {
    let Frame::Array(entries) = client.call(["COMMAND"]).await? else {
        return Ok(Vec::new());
    };
    let mut names = Vec::new();
    for entry in entries {
        let Frame::Array(fields) = entry else {
            continue;
        };
        let name = fields.first().and_then(Frame::as_bytes);
        let writes = match fields.get(2) {
            Some(Frame::Array(flags)) | Some(Frame::Set(flags)) => flags
                .iter()
                .any(|f| f.as_bytes().is_some_and(|b| b.as_ref() == b"write")),
            _ => false,
        };
        if let (Some(name), true) = (name, writes) {
            names.push(String::from_utf8_lossy(name).to_lowercase());
        }
    }
    names.sort();
    Ok(names)
}

/// All command names the server knows.
async fn command_names(client: &mut Client) -> Result<Vec<String>, ClientError> {
    let Frame::Array(entries) = client.call(["COMMAND"]).await? else {
        return Ok(Vec::new());
    };
    Ok(entries
        .iter()
        .filter_map(|entry| match entry {
            Frame::Array(fields) => fields.first().and_then(Frame::as_bytes),
            _ => None,
        })
        .map(|name| String::from_utf8_lossy(name).to_lowercase())
        .collect())
}

/// One server checked: a standalone server, or one master of a cluster.
struct Node {
    /// `host:port` (as the cluster names it, for a master).
    addr: String,
    side: Side,
}

/// One side (source or target) as reached.
struct Reached {
    /// A Redis Cluster: `nodes` are its masters that answered.
    cluster: bool,
    nodes: Vec<Node>,
    /// The `cluster mode` (and `cluster slots`) rows, pushed after both
    /// sides' `reachable` rows.
    rows: Vec<Check>,
}

impl Reached {
    /// Each node's outcome of `check`.
    fn outcomes(
        &self,
        check: impl Fn(&Side) -> (Verdict, String),
    ) -> Vec<(String, Verdict, String)> {
        self.nodes
            .iter()
            .map(|node| {
                let (verdict, detail) = check(&node.side);
                (node.addr.clone(), verdict, detail)
            })
            .collect()
    }

    /// The index of the node with the newest (`newest`) or the oldest
    /// `redis_version`; an unreadable version counts as the oldest.
    fn by_version(&self, newest: bool) -> usize {
        let version = |i: &usize| {
            TargetCaps::from_version_str(self.nodes[*i].side.version())
                .ok()
                .map(|caps| caps.version)
        };
        let indexes = 0..self.nodes.len();
        let found = if newest {
            indexes.max_by_key(version)
        } else {
            indexes.min_by_key(version)
        };
        found.unwrap_or(0)
    }
}

fn row(check: String, verdict: Verdict, detail: String) -> Check {
    Check {
        check,
        verdict,
        detail,
        nodes: Vec::new(),
    }
}

/// Connects to one side (if given): the first address that answers; of a
/// cluster, then every master. Pushes its `reachable` row.
async fn reach(
    report: &mut Report,
    name: &str,
    seeds: &[RedisUrl],
    cfg: &PrecheckConfig,
) -> Option<Reached> {
    if seeds.is_empty() {
        return None;
    }
    let check = format!("{name} reachable");
    let mut errors = Vec::new();
    let mut entry = None;
    for seed in seeds {
        match connect(seed, cfg.connect_timeout).await {
            Ok(side) => {
                entry = Some((seed, side));
                break;
            }
            Err(error) => errors.push(format!("{seed}: {error}")),
        }
    }
    let Some((url, side)) = entry else {
        report.push(check, Verdict::Fail, errors.join("; "));
        return None;
    };
    if side.get("cluster_enabled") == Some("1") {
        return Some(reach_cluster(report, name, seeds, url, side, cfg).await);
    }
    let mut detail = format!(
        "{url}: redis {}, role {}",
        side.version(),
        side.get("role").unwrap_or("?")
    );
    if !errors.is_empty() {
        detail.push_str(&format!("; not answering: {}", errors.join("; ")));
    }
    report.push(check, Verdict::Pass, detail);
    let mode = if seeds.len() > 1 {
        row(
            format!("{name} cluster mode"),
            Verdict::Fail,
            format!(
                "a seed list names the nodes of one Redis Cluster, but {url} is standalone \
                 (cluster_enabled:0)"
            ),
        )
    } else {
        row(
            format!("{name} cluster mode"),
            Verdict::Pass,
            "standalone (cluster_enabled:0)".into(),
        )
    };
    Some(Reached {
        cluster: false,
        nodes: vec![Node {
            addr: url.addr(),
            side,
        }],
        rows: vec![mode],
    })
}

/// The topology of a cluster from its seeds, `entry` (the seed that
/// answered) first: one that sees every slot served, else the view of the
/// first seed that answers (its gaps are the `cluster slots` row's FAIL).
async fn cluster_view(entry: &RedisUrl, seeds: &[RedisUrl]) -> Result<Topology, String> {
    let mut order = vec![entry.clone()];
    order.extend(seeds.iter().filter(|s| *s != entry).cloned());
    match cluster::discover(&order).await {
        Ok(topology) => Ok(topology),
        Err(incomplete @ TopologyError::Incomplete { .. }) => {
            for seed in &order {
                if let Ok(topology) = cluster::read_topology(seed).await {
                    return Ok(topology);
                }
            }
            Err(incomplete.to_string())
        }
        Err(error) => Err(error.to_string()),
    }
}

/// The slots `served` does not hold.
fn uncovered(served: &SlotRanges) -> SlotRanges {
    let mut gaps = SlotRanges::new();
    let mut next: u32 = 0;
    for &(first, last) in served.ranges() {
        if u32::from(first) > next {
            gaps.insert_range(next as u16, first - 1);
        }
        next = u32::from(last) + 1;
    }
    if next < u32::from(CLUSTER_SLOTS) {
        gaps.insert_range(next as u16, CLUSTER_SLOTS - 1);
    }
    gaps
}

/// `cluster_state` of `CLUSTER INFO` (`None`: not answered).
async fn cluster_state(client: &mut Client) -> Option<String> {
    let reply = client.call(["CLUSTER", "INFO"]).await.ok()?;
    let text = String::from_utf8_lossy(reply.as_bytes()?).into_owned();
    text.lines()
        .find_map(|line| line.trim().strip_prefix("cluster_state:"))
        .map(str::to_string)
}

/// [`reach`] of a cluster: its topology, then every master that serves
/// slots, each connected to on its own.
async fn reach_cluster(
    report: &mut Report,
    name: &str,
    seeds: &[RedisUrl],
    entry_url: &RedisUrl,
    entry: Side,
    cfg: &PrecheckConfig,
) -> Reached {
    let check = format!("{name} reachable");
    let mode_detail = if name == "source" {
        "Redis Cluster (cluster_enabled:1): one partition per shard, each replicated from its \
         master"
    } else {
        "Redis Cluster (cluster_enabled:1): applied by slot to every master"
    };
    // A node that accepts but never answers must not hang the precheck.
    let patience = cfg.connect_timeout * 2 * (seeds.len() as u32 + 1);
    let view = match tokio::time::timeout(patience, cluster_view(entry_url, seeds)).await {
        Ok(view) => view,
        Err(_) => Err(format!("no topology within {patience:?}")),
    };
    let topology = match view {
        Ok(topology) => topology,
        Err(error) => {
            report.push(
                check,
                Verdict::Pass,
                format!(
                    "{entry_url}: redis {}, role {}",
                    entry.version(),
                    entry.get("role").unwrap_or("?")
                ),
            );
            return Reached {
                cluster: true,
                nodes: vec![Node {
                    addr: entry_url.addr(),
                    side: entry,
                }],
                rows: vec![
                    row(
                        format!("{name} cluster mode"),
                        Verdict::Pass,
                        format!("{mode_detail} (the checks below read {entry_url} only)"),
                    ),
                    row(
                        format!("{name} cluster slots"),
                        Verdict::Fail,
                        format!("cannot read the cluster's topology: {error}"),
                    ),
                ],
            };
        }
    };
    let masters: Vec<cluster::NodeInfo> = topology.shards().into_iter().map(|s| s.master).collect();
    let mut nodes = Vec::new();
    let mut reached = Vec::new();
    let mut failed = Vec::new();
    if masters.is_empty() {
        // No master serves a slot (a cluster not created yet): the node
        // named is all there is to check.
        reached.push((
            entry_url.addr(),
            Verdict::Pass,
            format!("redis {}, no slots", entry.version()),
        ));
        nodes.push(Node {
            addr: entry_url.addr(),
            side: entry,
        });
    } else {
        drop(entry);
        let connections = futures::future::join_all(
            masters
                .iter()
                .map(|m| connect_url(Topology::url_for(m, entry_url), cfg.connect_timeout)),
        )
        .await;
        for (master, connection) in masters.iter().zip(connections) {
            match connection {
                Ok(side) => {
                    reached.push((
                        master.addr.clone(),
                        Verdict::Pass,
                        format!("redis {}, slots {}", side.version(), master.slots),
                    ));
                    nodes.push(Node {
                        addr: master.addr.clone(),
                        side,
                    });
                }
                Err(error) => failed.push((
                    master.addr.clone(),
                    Verdict::Fail,
                    format!("master of slots {} does not answer: {error}", master.slots),
                )),
            }
        }
    }
    let answering = names(&reached.iter().map(|o| o.0.as_str()).collect::<Vec<_>>());
    let detail = if failed.is_empty() {
        format!(
            "{} master(s) of the cluster seen from {} answer: {}",
            reached.len(),
            topology.seen_from,
            reached
                .iter()
                .map(|(node, _, detail)| format!("{node} ({detail})"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!(
            "{}; answering: {}",
            failed
                .iter()
                .map(|(node, _, detail)| format!("{node}: {detail}"))
                .collect::<Vec<_>>()
                .join("; "),
            if answering.is_empty() {
                "none".into()
            } else {
                answering
            }
        )
    };
    report.checks.push(Check {
        check,
        verdict: if failed.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        detail,
        nodes: reached
            .into_iter()
            .chain(failed)
            .map(|(node, verdict, detail)| NodeCheck {
                node,
                verdict,
                detail,
            })
            .collect(),
    });
    // Slots: every one served by a master that is not failing, and no
    // master saying the cluster is down.
    let mut served = SlotRanges::new();
    let mut failing = Vec::new();
    for master in topology.nodes.iter().filter(|n| n.master) {
        if master.failing {
            if !master.slots.is_empty() {
                failing.push(format!(
                    "{} of {} (flagged failing)",
                    master.slots, master.addr
                ));
            }
            continue;
        }
        for &(first, last) in master.slots.ranges() {
            served.insert_range(first, last);
        }
    }
    let gaps = uncovered(&served);
    let mut down = Vec::new();
    for node in &mut nodes {
        let state = tokio::time::timeout(cfg.connect_timeout, cluster_state(&mut node.side.client));
        if let Ok(Some(state)) = state.await {
            if state != "ok" {
                down.push(format!("cluster_state:{state} on {}", node.addr));
            }
        }
    }
    let slots_row = if gaps.is_empty() && down.is_empty() {
        let migrating = if topology.migrating() {
            "; slots are being migrated (the sync follows them)"
        } else {
            ""
        };
        row(
            format!("{name} cluster slots"),
            Verdict::Pass,
            format!(
                "all {CLUSTER_SLOTS} slots served (seen from {}): {}{migrating}",
                topology.seen_from,
                masters
                    .iter()
                    .map(|m| format!("{} {}", m.addr, m.slots))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    } else {
        let mut parts = Vec::new();
        if !gaps.is_empty() {
            let mut gap = format!(
                "slots {gaps} ({} of {CLUSTER_SLOTS}) are not served, as {} sees the cluster",
                gaps.count(),
                topology.seen_from
            );
            if !failing.is_empty() {
                gap.push_str(&format!(": {}", failing.join(", ")));
            }
            parts.push(gap);
        }
        parts.extend(down);
        row(
            format!("{name} cluster slots"),
            Verdict::Fail,
            format!(
                "{}: the cluster refuses keys of those slots; fix the cluster first",
                parts.join("; ")
            ),
        )
    };
    let checked = nodes.len();
    Reached {
        cluster: true,
        nodes,
        rows: vec![
            row(
                format!("{name} cluster mode"),
                Verdict::Pass,
                if masters.is_empty() {
                    format!("{mode_detail} (no master serves slots: the checks below read {entry_url} only)")
                } else {
                    format!("{mode_detail}; the checks below read every master that answers ({checked} of {})", masters.len())
                },
            ),
            slots_row,
        ],
    }
}

async fn connect_url(url: RedisUrl, timeout: Duration) -> Result<Side, String> {
    connect(&url, timeout).await
}

/// Runs every check the given sides allow.
pub async fn run(cfg: &PrecheckConfig) -> Report {
    let mut report = Report::default();
    let mut source = reach(&mut report, "source", &cfg.source, cfg).await;
    let mut target = reach(&mut report, "target", &cfg.target, cfg).await;
    if let (Some(source), Some(target)) = (&source, &target) {
        let same = source.nodes.iter().find_map(|s| {
            let run_id = s.side.get("run_id")?;
            let t = target
                .nodes
                .iter()
                .find(|t| t.side.get("run_id") == Some(run_id))?;
            Some((s.addr.as_str(), t.addr.as_str()))
        });
        match same {
            Some(_) if !source.cluster && !target.cluster => report.push(
                "distinct servers",
                Verdict::Fail,
                "source and target are the same server (same run_id)",
            ),
            Some((s, t)) => report.push(
                "distinct servers",
                Verdict::Fail,
                format!("source {s} and target {t} are the same server (same run_id)"),
            ),
            None => {}
        }
    }
    for side in [&mut source, &mut target] {
        if let Some(reached) = side {
            report.checks.append(&mut reached.rows);
            // A cluster none of whose masters answered: nothing more to read
            // (its `reachable` row failed).
            if reached.nodes.is_empty() {
                *side = None;
            }
        }
    }
    if let Some(source) = &mut source {
        let versions = source.outcomes(source_version);
        report.push_nodes("source version", source.cluster, versions);
        if !cfg.sample.is_zero() {
            check_backlog_and_buffers(&mut report, source, cfg).await;
        }
    }
    if let Some(target) = &mut target {
        for (check, outcome) in [
            ("target role", target_role as fn(&Side) -> (Verdict, String)),
            ("target maxmemory-policy", target_memory),
            ("target persistence", target_persistence),
        ] {
            let outcomes = target.outcomes(outcome);
            report.push_nodes(check, target.cluster, outcomes);
        }
        check_target_data(&mut report, target, cfg).await;
    }
    if let (Some(source), Some(target)) = (&mut source, &mut target) {
        check_pair(&mut report, source, target, cfg).await;
    }
    report
}

/// The checks that need the source's write rate (`source backlog`, `source
/// replica output buffer`), measured over `cfg.sample`: they can only warn,
/// so a node runs them beside its first full sync instead of delaying it.
pub async fn source_rate(cfg: &PrecheckConfig) -> Report {
    let mut report = Report::default();
    if let Some(mut source) = reach(&mut report, "source", &cfg.source, cfg).await {
        report.checks.append(&mut source.rows);
        if !source.nodes.is_empty() {
            check_backlog_and_buffers(&mut report, &mut source, cfg).await;
        }
    }
    report
}

fn source_version(source: &Side) -> (Verdict, String) {
    match TargetCaps::from_version_str(source.version()) {
        Ok(caps) if u32::from(caps.rdb_version) > MAX_RDB_VERSION => (
            Verdict::Fail,
            format!(
                "redis {} writes RDB version {}; ferry reads up to {MAX_RDB_VERSION}",
                source.version(),
                caps.rdb_version
            ),
        ),
        Ok(caps) => (
            Verdict::Pass,
            format!(
                "redis {} (RDB version {}), readable by ferry",
                source.version(),
                caps.rdb_version
            ),
        ),
        Err(error) => (Verdict::Fail, error.to_string()),
    }
}

/// A source server's write rate in bytes/s and where it was read from.
struct WriteRate {
    rate: f64,
    measured: &'static str,
}

async fn check_backlog_and_buffers(
    report: &mut Report,
    source: &mut Reached,
    cfg: &PrecheckConfig,
) {
    // The write rate: the replication offset moves only while a replica
    // is attached; otherwise the clients' input bytes (reads included, an
    // upper bound) stand in for it. Every master is sampled over the same
    // interval.
    let firsts: Vec<(u64, u64)> = source
        .nodes
        .iter()
        .map(|node| {
            (
                node.side.number("master_repl_offset").unwrap_or(0),
                node.side.number("total_net_input_bytes").unwrap_or(0),
            )
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(cfg.sample).await;
    let infos = futures::future::join_all(
        source
            .nodes
            .iter_mut()
            .map(|node| node.side.client.info("all")),
    )
    .await;
    let seconds = started.elapsed().as_secs_f64().max(0.001);
    let mut rates = Vec::with_capacity(infos.len());
    let mut unmeasured = Vec::new();
    for ((node, info), (first_offset, first_input)) in source.nodes.iter().zip(infos).zip(firsts) {
        match info {
            Ok(info) => {
                let number = |field: &str, default: u64| {
                    info.get(field)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(default)
                };
                let offset =
                    number("master_repl_offset", first_offset).saturating_sub(first_offset);
                let input =
                    number("total_net_input_bytes", first_input).saturating_sub(first_input);
                rates.push(if offset > 0 {
                    WriteRate {
                        rate: offset as f64 / seconds,
                        measured: "replication offset",
                    }
                } else {
                    WriteRate {
                        rate: input as f64 / seconds,
                        measured: "client input bytes, no replica attached",
                    }
                });
            }
            Err(error) => {
                unmeasured.push((
                    node.addr.clone(),
                    Verdict::Warn,
                    format!("cannot measure: {error}"),
                ));
                rates.push(WriteRate {
                    rate: 0.0,
                    measured: "not measured",
                });
            }
        }
    }
    if !unmeasured.is_empty() {
        report.push_nodes("source write rate", source.cluster, unmeasured);
    }
    let outcomes = |check: &dyn Fn(&Side, &WriteRate) -> (Verdict, String)| {
        source
            .nodes
            .iter()
            .zip(&rates)
            .map(|(node, rate)| {
                let (verdict, detail) = check(&node.side, rate);
                (node.addr.clone(), verdict, detail)
            })
            .collect::<Vec<_>>()
    };
    let backlogs = outcomes(&|side, rate| backlog(side, rate, cfg));
    report.push_nodes("source backlog", source.cluster, backlogs);
    let buffers = outcomes(&|side, rate| replica_output_buffer(side, rate));
    report.push_nodes("source replica output buffer", source.cluster, buffers);
}

/// `repl-backlog-size` against the outage to survive.
fn backlog(source: &Side, rate: &WriteRate, cfg: &PrecheckConfig) -> (Verdict, String) {
    let WriteRate { rate, measured } = *rate;
    let outage = cfg.outage.as_secs_f64();
    let backlog = source
        .config_value("repl-backlog-size")
        .and_then(|v| v.parse::<f64>().ok());
    match backlog {
        None => (
            Verdict::Warn,
            format!(
                "repl-backlog-size unknown (CONFIG GET refused: {}); an outage of the listener \
                 longer than the backlog covers forces a full sync",
                source.config_error.as_deref().unwrap_or("not listed")
            ),
        ),
        Some(backlog) if rate <= 0.0 => (
            Verdict::Pass,
            format!(
                "repl-backlog-size {}; no writes measured in {:?}: it covers a {}s outage at any \
                 rate up to {}/s",
                mib(backlog),
                cfg.sample,
                outage as u64,
                mib(backlog / outage.max(1.0))
            ),
        ),
        Some(backlog) => {
            let covers = backlog / rate;
            let detail = format!(
                "repl-backlog-size {} at {}/s of writes (measured over {:?} from the {measured}) \
                 covers {:.1}s; the outage to survive is {}s",
                mib(backlog),
                mib(rate),
                cfg.sample,
                covers,
                outage as u64
            );
            if covers >= outage {
                (Verdict::Pass, detail)
            } else {
                (
                    Verdict::Warn,
                    format!(
                        "{detail}: a longer outage of the listener forces a full sync; set \
                         repl-backlog-size >= {}",
                        mib(rate * outage)
                    ),
                )
            }
        }
    }
}

/// The replica output buffer holds the writes made while a full sync
/// transfers the dataset; past its limits the source drops the replica and
/// the full sync starts over.
fn replica_output_buffer(source: &Side, rate: &WriteRate) -> (Verdict, String) {
    let rate = rate.rate;
    let dataset = source
        .number("used_memory_dataset")
        .or_else(|| source.number("used_memory"))
        .unwrap_or(0) as f64;
    let limits = source
        .config_value("client-output-buffer-limit")
        .and_then(replica_output_limits);
    match limits {
        None => (
            Verdict::Warn,
            "client-output-buffer-limit unknown (CONFIG GET refused or unparsable)".into(),
        ),
        Some((hard, soft, soft_seconds)) => {
            let seconds = dataset / ASSUMED_FULL_SYNC_BYTES_PER_SEC;
            let buffered = rate * seconds;
            let over_hard = hard > 0.0 && buffered >= hard;
            let over_soft = soft > 0.0 && buffered >= soft && seconds >= soft_seconds;
            let detail = format!(
                "limit replica hard {} soft {}/{}s; dataset {} takes ~{:.0}s to sync (estimated \
                 at {}/s), buffering ~{} of writes at {}/s",
                limit_text(hard),
                limit_text(soft),
                soft_seconds as u64,
                mib(dataset),
                seconds,
                mib(ASSUMED_FULL_SYNC_BYTES_PER_SEC),
                mib(buffered),
                mib(rate)
            );
            if over_hard || over_soft {
                (
                    Verdict::Warn,
                    format!(
                        "{detail}: the source may drop the replica mid full sync; raise \
                         client-output-buffer-limit replica"
                    ),
                )
            } else {
                (Verdict::Pass, detail)
            }
        }
    }
}

fn target_role(target: &Side) -> (Verdict, String) {
    match target.get("role") {
        Some("master") => (Verdict::Pass, "master (writable)".into()),
        Some(role) => (
            Verdict::Fail,
            format!(
                "the target is a {role} of {}:{}: it refuses writes",
                target.get("master_host").unwrap_or("?"),
                target.get("master_port").unwrap_or("?")
            ),
        ),
        None => (Verdict::Warn, "INFO gives no role".into()),
    }
}

fn target_memory(target: &Side) -> (Verdict, String) {
    match target.config_value("maxmemory-policy") {
        Some("noeviction") => (
            Verdict::Pass,
            "noeviction: a full target refuses writes (shown in status) instead of dropping keys"
                .into(),
        ),
        Some(policy) => (
            Verdict::Warn,
            format!(
                "{policy}: a full target evicts keys on its own, and then differs from the \
                 source; set noeviction"
            ),
        ),
        None => (
            Verdict::Warn,
            format!(
                "unknown (CONFIG GET refused: {})",
                target.config_error.as_deref().unwrap_or("not listed")
            ),
        ),
    }
}

fn target_persistence(target: &Side) -> (Verdict, String) {
    let aof = target.config_value("appendonly");
    let save = target.config_value("save");
    match (aof, save) {
        (Some("yes"), _) => (
            Verdict::Pass,
            format!(
                "appendonly yes, appendfsync {}: a restarted target comes back with data and \
                 checkpoint from the same moment",
                target.config_value("appendfsync").unwrap_or("?")
            ),
        ),
        (Some(_), Some(save)) if !save.trim().is_empty() => (
            Verdict::Warn,
            format!(
                "RDB snapshots only (save \"{save}\"): a restarted target loses the writes since \
                 its last save, more than retain-applied keeps; ferry sync then reloads it from a \
                 fallback snapshot of the source, a drainer stops with the gap error. appendonly \
                 yes is safer"
            ),
        ),
        (Some(_), _) => (
            Verdict::Warn,
            "none (appendonly no, no save points): a restarted target comes back empty; ferry \
             sync then reloads it from a fallback snapshot of the source, a drainer stops with \
             the gap error until it gets a snapshot"
                .into(),
        ),
        (None, _) => (
            Verdict::Warn,
            format!(
                "unknown (CONFIG GET refused: {})",
                target.config_error.as_deref().unwrap_or("not listed")
            ),
        ),
    }
}

/// One node's owned keys: `(db, keys)` of each owned db that holds some.
struct Held {
    addr: String,
    dbs: Vec<(u32, u64)>,
}

async fn check_target_data(report: &mut Report, target: &mut Reached, cfg: &PrecheckConfig) {
    let resumes = |report: &mut Report, key: &[u8], value: Option<&[u8]>, node: Option<&str>| {
        let value = value
            .map(|v| format!(": {}", String::from_utf8_lossy(v)))
            .unwrap_or_default();
        let on = node.map(|n| format!(" on {n}")).unwrap_or_default();
        report.push(
            "target data",
            Verdict::Pass,
            format!(
                "this sync's checkpoint is on the target ({}{value}{on}): it resumes, \
                 existing-data does not apply",
                String::from_utf8_lossy(key),
            ),
        );
    };
    // Resuming: this sync's own checkpoint is there (of partition 0 on a
    // standalone target; of any partition, found by the scan below, on a
    // cluster or from a cluster source).
    if let (Some(id), false) = (&cfg.id, target.cluster) {
        let key = checkpoint_key(id, PartitionId(0));
        let get = Command::new(vec![Bytes::from_static(b"GET"), Bytes::from(key.clone())]);
        if let Some(node) = target.nodes.first_mut() {
            if let Ok(Frame::Bulk(value)) = node.side.client.call_command(&get).await {
                resumes(report, &key, Some(&value), None);
                return;
            }
        }
    }
    let own_checkpoints = cfg.id.as_ref().map(|id| {
        let mut prefix = INTERNAL_PREFIX.to_vec();
        prefix.extend_from_slice(format!(":checkpoint:{id}:").as_bytes());
        prefix
    });
    let cluster = target.cluster;
    let masters = target.nodes.len();
    let mut others: Vec<String> = Vec::new();
    let mut held: Vec<Held> = Vec::new();
    let mut at_least = false;
    for node in &mut target.nodes {
        let on = if cluster {
            format!(" on {}", node.addr)
        } else {
            String::new()
        };
        let databases = node
            .side
            .config_value("databases")
            .and_then(|d| d.parse().ok())
            .unwrap_or(16);
        let mut counts = keyspace_counts(&node.side.info);
        let internal = match internal_keys(&mut node.side.client, 100_000).await {
            Ok(keys) => keys,
            Err(error) => {
                report.push(
                    "target data",
                    Verdict::Warn,
                    format!("cannot count ferry's own keys in db 0{on}: {error}"),
                );
                Vec::new()
            }
        };
        if let Some(own) = &own_checkpoints {
            if let Some(key) = internal.iter().find(|k| k.starts_with(own)) {
                resumes(report, key, None, cluster.then_some(node.addr.as_str()));
                return;
            }
        }
        if let Some(db0) = counts.get_mut(&0) {
            *db0 = db0.saturating_sub(internal.len() as u64);
        }
        others.extend(
            internal
                .iter()
                .filter(|k| k.starts_with(b"__ferry:checkpoint:"))
                .map(|k| format!("{}{on}", String::from_utf8_lossy(k))),
        );
        let mut busy: Vec<(u32, u64)> = counts
            .into_iter()
            .filter(|&(db, keys)| keys > 0 && db < databases && cfg.keyspace.owns_target_db(db))
            .collect();
        // Under a key filter only the owned keys count: the others are
        // another sync's, or nobody's, and stay.
        if let Some(filter) = cfg.keyspace.key_filter() {
            let mut owned = Vec::with_capacity(busy.len());
            for (db, _) in busy {
                match owned_keys(&mut node.side.client, db, filter, OWNED_KEYS_COUNTED).await {
                    Ok((0, _)) => {}
                    Ok((keys, complete)) => {
                        at_least |= !complete;
                        owned.push((db, keys));
                    }
                    Err(error) => {
                        report.push(
                            "target data",
                            Verdict::Warn,
                            format!(
                                "cannot count the owned keys of db {db}{on} ({}): {error}",
                                cfg.keyspace
                            ),
                        );
                        return;
                    }
                }
            }
            busy = owned;
        }
        held.push(Held {
            addr: node.addr.clone(),
            dbs: busy,
        });
    }
    let others_note = if others.is_empty() {
        String::new()
    } else {
        format!(
            "; other syncs' checkpoints found (they are kept): {}",
            others.join(", ")
        )
    };
    let more = if at_least { "at least " } else { "" };
    if held.iter().all(|h| h.dbs.is_empty()) {
        let anywhere = if cluster {
            format!(" on any of the {masters} masters that answered")
        } else {
            String::new()
        };
        let detail = format!(
            "the owned dbs ({}) hold no owned keys{anywhere}{others_note}",
            cfg.keyspace
        );
        push_data(report, cluster, &held, Verdict::Pass, detail);
        return;
    }
    let listed = if cluster {
        // Per db, the sum over the masters and which master holds what.
        let mut by_db: BTreeMap<u32, Vec<(&str, u64)>> = BTreeMap::new();
        for h in &held {
            for &(db, keys) in &h.dbs {
                by_db.entry(db).or_default().push((h.addr.as_str(), keys));
            }
        }
        by_db
            .iter()
            .map(|(db, holders)| match holders.as_slice() {
                [(addr, keys)] => format!("db {db}: {more}{keys} keys on {addr}"),
                _ => format!(
                    "db {db}: {more}{} keys ({})",
                    holders.iter().map(|h| h.1).sum::<u64>(),
                    holders
                        .iter()
                        .map(|(addr, keys)| format!("{addr}: {keys}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        held.iter()
            .flat_map(|h| &h.dbs)
            .map(|(db, keys)| format!("db {db}: {more}{keys} keys"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (verdict, detail) = match cfg.existing_data {
        ExistingData::Refuse => (
            Verdict::Fail,
            format!(
                "the owned dbs hold keys ({listed}); existing-data = refuse. Use \
                 --existing-data keep (load over them, keep the others) or flush (delete them \
                 first), or own other dbs or keys (--dbs, --db-map, --key-prefix){others_note}"
            ),
        ),
        ExistingData::Keep => (
            Verdict::Warn,
            format!(
                "the owned dbs hold keys ({listed}); existing-data = keep: same-named keys are \
                 replaced, the others kept{others_note}"
            ),
        ),
        ExistingData::Flush => (
            Verdict::Warn,
            format!(
                "the owned dbs hold keys ({listed}); existing-data = flush: they will be \
                 deleted by the first full sync{others_note}"
            ),
        ),
    };
    push_data(report, cluster, &held, verdict, detail);
}

/// The `target data` row: its detail sums up every master; on a cluster,
/// `nodes` says what each master holds.
fn push_data(report: &mut Report, cluster: bool, held: &[Held], verdict: Verdict, detail: String) {
    let nodes = if cluster {
        held.iter()
            .map(|h| {
                if h.dbs.is_empty() {
                    NodeCheck {
                        node: h.addr.clone(),
                        verdict: Verdict::Pass,
                        detail: "no owned keys".into(),
                    }
                } else {
                    NodeCheck {
                        node: h.addr.clone(),
                        verdict,
                        detail: h
                            .dbs
                            .iter()
                            .map(|(db, keys)| format!("db {db}: {keys} keys"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    report.checks.push(Check {
        check: "target data".into(),
        verdict,
        detail,
        nodes,
    });
}

async fn check_pair(
    report: &mut Report,
    source: &mut Reached,
    target: &mut Reached,
    cfg: &PrecheckConfig,
) {
    // The newest source master against the oldest target master: what one
    // master of the source can write, every master of the target must take.
    let newest = source.by_version(true);
    let oldest = target.by_version(false);
    let compared = if source.cluster || target.cluster {
        format!(
            " (the newest source master {} against the oldest target master {})",
            source.nodes[newest].addr, target.nodes[oldest].addr
        )
    } else {
        String::new()
    };
    let (source_node, target_node) = (&mut source.nodes[newest], &mut target.nodes[oldest]);
    let (source_side, target_side) = (&mut source_node.side, &mut target_node.side);
    // Versions and what the target can take.
    let source_caps = TargetCaps::from_version_str(source_side.version()).ok();
    let target_caps = TargetCaps::from_version_str(target_side.version()).ok();
    match (source_caps, target_caps) {
        (Some(s), Some(t)) if t.version >= s.version => report.push(
            "versions",
            Verdict::Pass,
            format!(
                "target redis {} >= source redis {}: snapshots load with RESTORE{compared}",
                target_side.version(),
                source_side.version()
            ),
        ),
        (Some(s), Some(t)) => report.push(
            "versions",
            Verdict::Warn,
            format!(
                "target redis {} is older than source redis {}: keys in RDB encodings newer \
                 than the target's RDB {} are rebuilt command by command, and what the target \
                 cannot hold is reported{compared}",
                target_side.version(),
                source_side.version(),
                t.rdb_version.min(s.rdb_version)
            ),
        ),
        (_, None) => report.push(
            "versions",
            Verdict::Fail,
            format!(
                "the target's redis_version {:?} is not usable (2.6 or later){compared}",
                target_side.version()
            ),
        ),
        (None, _) => {}
    }
    // Write commands the source accepts and the target does not know.
    match (
        write_commands(&mut source_side.client).await,
        command_names(&mut target_side.client).await,
    ) {
        (Ok(writes), Ok(known)) => {
            let known: std::collections::HashSet<String> = known.into_iter().collect();
            let missing: Vec<&String> = writes.iter().filter(|w| !known.contains(*w)).collect();
            if missing.is_empty() {
                report.push(
                    "write commands",
                    Verdict::Pass,
                    format!(
                        "the target knows all {} write commands of the source{compared}",
                        writes.len()
                    ),
                );
            } else {
                let shown: Vec<&str> = missing
                    .iter()
                    .take(LISTED_COMMANDS)
                    .map(|s| s.as_str())
                    .collect();
                report.push(
                    "write commands",
                    Verdict::Warn,
                    format!(
                        "{} write commands of the source are unknown to the target ({}{}): \
                         entries using them are refused there and shown in status{compared}",
                        missing.len(),
                        shown.join(", "),
                        if missing.len() > shown.len() {
                            ", ..."
                        } else {
                            ""
                        }
                    ),
                );
            }
        }
        (Err(error), _) | (_, Err(error)) => report.push(
            "write commands",
            Verdict::Warn,
            format!("cannot compare command tables: {error}"),
        ),
    }
    // Source dbs the target does not have (a cluster has db 0 only).
    let databases: u32 = if target.cluster {
        1
    } else {
        target.nodes[oldest]
            .side
            .config_value("databases")
            .and_then(|d| d.parse().ok())
            .unwrap_or(16)
    };
    let mut source_counts: BTreeMap<u32, u64> = BTreeMap::new();
    for node in &source.nodes {
        for (db, keys) in keyspace_counts(&node.side.info) {
            *source_counts.entry(db).or_default() += keys;
        }
    }
    let missing: Vec<String> = source_counts
        .into_iter()
        .filter_map(|(db, keys)| {
            let target = cfg.keyspace.target_db(db)?;
            (keys > 0 && target >= databases).then(|| match target == db {
                true => format!("db {db} ({keys} keys)"),
                false => format!("db {db} ({keys} keys, into target db {target})"),
            })
        })
        .collect();
    if missing.is_empty() {
        report.push(
            "databases",
            Verdict::Pass,
            if target.cluster {
                "the target is a Redis Cluster (db 0 only): every owned source db with keys \
                 lands in db 0"
                    .to_string()
            } else {
                format!("the target has {databases} dbs: every owned source db with keys fits")
            },
        );
    } else if target.cluster {
        report.push(
            "databases",
            Verdict::Fail,
            format!(
                "the source has keys in {} but the target is a Redis Cluster (db 0 only); \
                 leave them out or map them to db 0 (--dbs, --db-map)",
                missing.join(", ")
            ),
        );
    } else {
        report.push(
            "databases",
            Verdict::Fail,
            format!(
                "the source has keys in {} but the target has only {databases} dbs; raise the \
                 target's databases or leave them out (--dbs, --db-map)",
                missing.join(", ")
            ),
        );
    }
    // Memory: will the dataset fit? Over a cluster, the sum of the masters'
    // (the slots may not spread the keys evenly: an estimate).
    let used: f64 = source
        .nodes
        .iter()
        .map(|n| n.side.number("used_memory").unwrap_or(0) as f64)
        .sum();
    let limits: Vec<f64> = target
        .nodes
        .iter()
        .map(|n| {
            n.side
                .config_value("maxmemory")
                .and_then(|m| m.parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .collect();
    // One master without a limit makes the whole unlimited.
    let maxmemory = if limits.iter().all(|&m| m > 0.0) {
        limits.iter().sum()
    } else {
        0.0
    };
    let over = |side: &Reached| {
        if side.cluster {
            format!(" over {} masters", side.nodes.len())
        } else {
            String::new()
        }
    };
    let (source_over, target_over) = (over(source), over(target));
    if maxmemory > 0.0 && used > maxmemory * 0.9 {
        report.push(
            "target memory",
            Verdict::Warn,
            format!(
                "the source uses {}{source_over} and the target's maxmemory is \
                 {}{target_over}: the full sync may not fit",
                mib(used),
                mib(maxmemory)
            ),
        );
    } else {
        report.push(
            "target memory",
            Verdict::Pass,
            format!(
                "source uses {}{source_over}; target maxmemory {}{}",
                mib(used),
                if maxmemory > 0.0 {
                    mib(maxmemory)
                } else {
                    "unlimited".into()
                },
                if maxmemory > 0.0 {
                    target_over.as_str()
                } else {
                    ""
                }
            ),
        );
    }
}

fn limit_text(bytes: f64) -> String {
    if bytes <= 0.0 {
        "none".into()
    } else {
        mib(bytes)
    }
}

/// `(hard, soft, soft seconds)` of the `replica` (or `slave`) class in a
/// `client-output-buffer-limit` value.
fn replica_output_limits(value: &str) -> Option<(f64, f64, f64)> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    parts.chunks(4).find_map(|chunk| match chunk {
        [class, hard, soft, seconds] if *class == "replica" || *class == "slave" => {
            Some((parse_size(hard)?, parse_size(soft)?, seconds.parse().ok()?))
        }
        _ => None,
    })
}

/// Redis memory sizes: plain bytes, or with k/kb/m/mb/g/gb.
fn parse_size(text: &str) -> Option<f64> {
    let lower = text.to_ascii_lowercase();
    let split = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (digits, unit) = lower.split_at(split);
    let n: f64 = digits.parse().ok()?;
    let factor = match unit {
        "" | "b" => 1.0,
        "k" => 1000.0,
        "kb" => 1024.0,
        "m" => 1000.0 * 1000.0,
        "mb" => 1024.0 * 1024.0,
        "g" => 1000.0 * 1000.0 * 1000.0,
        "gb" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_output_limits_parse() {
        assert_eq!(parse_size("256mb"), Some(256.0 * 1024.0 * 1024.0));
        assert_eq!(parse_size("64m"), Some(64e6));
        assert_eq!(parse_size("0"), Some(0.0));
        assert_eq!(parse_size("x"), None);
        let value = "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60";
        assert_eq!(
            replica_output_limits(value),
            Some((268435456.0, 67108864.0, 60.0))
        );
        assert_eq!(replica_output_limits("normal 0 0 0"), None);
    }

    #[test]
    fn keyspace_lines_parse() {
        let info: HashMap<String, String> = [
            ("db0".to_string(), "keys=3,expires=0,avg_ttl=0".to_string()),
            (
                "db12".to_string(),
                "keys=10,expires=1,avg_ttl=5".to_string(),
            ),
            ("dbx".to_string(), "keys=1".to_string()),
        ]
        .into();
        let counts = keyspace_counts(&info);
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), [(0, 3), (12, 10)]);
    }

    #[test]
    fn uncovered_slots_are_the_complement() {
        let served = SlotRanges::from_ranges([(100, 5460), (5461, 16000)]);
        assert_eq!(uncovered(&served).to_string(), "0-99,16001-16383");
        assert_eq!(uncovered(&SlotRanges::all()).to_string(), "");
        assert_eq!(uncovered(&SlotRanges::new()).to_string(), "0-16383");
        let served = SlotRanges::from_ranges([(0, 0), (16383, 16383)]);
        assert_eq!(uncovered(&served).to_string(), "1-16382");
    }

    #[test]
    fn a_per_master_row_names_the_masters_that_are_not_pass() {
        let outcome =
            |node: &str, verdict, detail: &str| (node.to_string(), verdict, detail.to_string());
        let mut report = Report::default();
        report.push_nodes("one", false, vec![outcome("a:1", Verdict::Warn, "hmm")]);
        assert_eq!(report.checks[0].detail, "hmm");
        assert!(report.checks[0].nodes.is_empty());
        assert!(report.to_json()["checks"][0].get("nodes").is_none());
        report.push_nodes(
            "same",
            true,
            vec![
                outcome("a:1", Verdict::Pass, "fine"),
                outcome("b:2", Verdict::Pass, "fine"),
            ],
        );
        assert_eq!(report.checks[1].detail, "every master (a:1, b:2): fine");
        report.push_nodes(
            "mixed",
            true,
            vec![
                outcome("a:1", Verdict::Pass, "fine"),
                outcome("b:2", Verdict::Fail, "no"),
                outcome("c:3", Verdict::Warn, "hmm"),
            ],
        );
        let mixed = &report.checks[2];
        assert_eq!(mixed.verdict, Verdict::Fail);
        assert_eq!(mixed.detail, "FAIL b:2: no; WARN c:3: hmm; PASS on a:1");
        report.push_nodes(
            "grouped",
            true,
            vec![
                outcome("a:1", Verdict::Warn, "hmm"),
                outcome("b:2", Verdict::Pass, "fine"),
                outcome("c:3", Verdict::Warn, "hmm"),
            ],
        );
        assert_eq!(report.checks[3].detail, "WARN a:1, c:3: hmm; PASS on b:2");
        let json = report.to_json();
        assert_eq!(json["checks"][2]["nodes"][1]["node"], "b:2");
        assert_eq!(json["checks"][2]["nodes"][1]["verdict"], "FAIL");
    }

    #[test]
    fn the_worst_verdict_wins_and_renders() {
        let mut report = Report::default();
        assert_eq!(report.verdict(), Verdict::Pass);
        report.push("a", Verdict::Pass, "fine");
        report.push("b", Verdict::Warn, "hmm");
        assert_eq!(report.verdict(), Verdict::Warn);
        assert!(!report.failed());
        report.push("c", Verdict::Fail, "no");
        assert!(report.failed());
        let text = report.render();
        assert!(text.contains("| c     | FAIL   | no     |"), "{text}");
        assert!(
            text.ends_with("precheck: FAIL (3 checks, 1 WARN, 1 FAIL)\n"),
            "{text}"
        );
        let json = report.to_json();
        assert_eq!(json["verdict"], "FAIL");
        assert_eq!(json["checks"][1]["verdict"], "WARN");
    }
}
