//! `ferry precheck`: can this source be replicated into this target, and
//! what will it cost them? Alibaba DTS-style checks before the first full
//! sync, each PASS, WARN or FAIL with the figures behind it.
//!
//! In: a source and/or a target address and what the sync will do (owned
//! dbs, `existing-data`, the outage to survive, its id). Out: a [`Report`]
//! (a table or JSON); any FAIL means the sync must not start. `ferry sync`,
//! `ferry listener` (source checks) and `ferry drainer` (target checks) run
//! it before their first full sync and refuse to start on a FAIL.
//!
//! Only reads: `PING`, `INFO`, `CONFIG GET`, `COMMAND`, `SCAN` and `GET` of
//! this sync's checkpoint; nothing is written to either server. Where a
//! managed Redis forbids `CONFIG`, the check that needs it says so (WARN).
//!
//! The source's write rate is measured over `sample` (default 1 s) from
//! `master_repl_offset`; the backlog and output-buffer checks are estimates
//! built on it and say so.

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
use crate::redis::command::Command;
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

/// What to check.
#[derive(Debug, Clone)]
pub struct PrecheckConfig {
    pub source: Option<RedisUrl>,
    pub target: Option<RedisUrl>,
    /// The dbs the sync will own on the target.
    pub keyspace: OwnedKeyspace,
    pub existing_data: ExistingData,
    /// How long an outage of the listener (or of its link to the source)
    /// must be survivable without a full sync.
    pub outage: Duration,
    /// The sync's id (drainer id): its checkpoint on the target means the
    /// sync is resuming, not starting.
    pub id: Option<String>,
    /// How long the source's write rate is measured.
    pub sample: Duration,
    pub connect_timeout: Duration,
}

impl PrecheckConfig {
    pub fn new(source: Option<RedisUrl>, target: Option<RedisUrl>) -> PrecheckConfig {
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

/// Connects to one side (if given), with its row.
async fn reach(
    report: &mut Report,
    name: &str,
    url: Option<&RedisUrl>,
    cfg: &PrecheckConfig,
) -> Option<Side> {
    let url = url?;
    let check = format!("{name} reachable");
    match connect(url, cfg.connect_timeout).await {
        Ok(side) => {
            let detail = format!(
                "{url}: redis {}, role {}",
                side.version(),
                side.get("role").unwrap_or("?")
            );
            report.push(check, Verdict::Pass, detail);
            Some(side)
        }
        Err(error) => {
            report.push(check, Verdict::Fail, format!("{url}: {error}"));
            None
        }
    }
}

/// Runs every check the given sides allow.
pub async fn run(cfg: &PrecheckConfig) -> Report {
    let mut report = Report::default();
    let mut source = reach(&mut report, "source", cfg.source.as_ref(), cfg).await;
    let mut target = reach(&mut report, "target", cfg.target.as_ref(), cfg).await;
    if let (Some(source), Some(target)) = (&source, &target) {
        let same = source.get("run_id").is_some() && source.get("run_id") == target.get("run_id");
        if same {
            report.push(
                "distinct servers",
                Verdict::Fail,
                "source and target are the same server (same run_id)",
            );
        }
    }
    for (name, side) in [("source", &source), ("target", &target)] {
        if let Some(side) = side {
            let cluster = side.get("cluster_enabled") == Some("1");
            if cluster && name == "source" {
                report.push(
                    format!("{name} cluster mode"),
                    Verdict::Pass,
                    "Redis Cluster (cluster_enabled:1): one partition per shard, each \
                     replicated from its master (the checks below are of this node only)",
                );
            } else if cluster {
                report.push(
                    format!("{name} cluster mode"),
                    Verdict::Fail,
                    format!(
                        "the {name} runs Redis Cluster (cluster_enabled:1); ferry replicates \
                         standalone servers only for now"
                    ),
                );
            } else {
                report.push(
                    format!("{name} cluster mode"),
                    Verdict::Pass,
                    "standalone (cluster_enabled:0)",
                );
            }
        }
    }
    if let Some(source) = &mut source {
        check_source_version(&mut report, source);
        check_backlog_and_buffers(&mut report, source, cfg).await;
    }
    if let Some(target) = &mut target {
        check_target_role(&mut report, target);
        check_target_memory(&mut report, target);
        check_target_persistence(&mut report, target);
        check_target_data(&mut report, target, cfg).await;
    }
    if let (Some(source), Some(target)) = (&mut source, &mut target) {
        check_pair(&mut report, source, target, cfg).await;
    }
    report
}

fn check_source_version(report: &mut Report, source: &Side) {
    match TargetCaps::from_version_str(source.version()) {
        Ok(caps) if u32::from(caps.rdb_version) > MAX_RDB_VERSION => report.push(
            "source version",
            Verdict::Fail,
            format!(
                "redis {} writes RDB version {}; ferry reads up to {MAX_RDB_VERSION}",
                source.version(),
                caps.rdb_version
            ),
        ),
        Ok(caps) => report.push(
            "source version",
            Verdict::Pass,
            format!(
                "redis {} (RDB version {}), readable by ferry",
                source.version(),
                caps.rdb_version
            ),
        ),
        Err(error) => report.push("source version", Verdict::Fail, error.to_string()),
    }
}

async fn check_backlog_and_buffers(report: &mut Report, source: &mut Side, cfg: &PrecheckConfig) {
    // The write rate: the replication offset moves only while a replica
    // is attached; otherwise the clients' input bytes (reads included, an
    // upper bound) stand in for it.
    let first_offset = source.number("master_repl_offset").unwrap_or(0);
    let first_input = source.number("total_net_input_bytes").unwrap_or(0);
    let started = Instant::now();
    tokio::time::sleep(cfg.sample).await;
    let (rate, measured) = match source.client.info("all").await {
        Ok(info) => {
            let number = |field: &str, default: u64| {
                info.get(field)
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(default)
            };
            let seconds = started.elapsed().as_secs_f64().max(0.001);
            let offset = number("master_repl_offset", first_offset).saturating_sub(first_offset);
            let input = number("total_net_input_bytes", first_input).saturating_sub(first_input);
            if offset > 0 {
                (offset as f64 / seconds, "replication offset")
            } else {
                (
                    input as f64 / seconds,
                    "client input bytes, no replica attached",
                )
            }
        }
        Err(error) => {
            report.push(
                "source write rate",
                Verdict::Warn,
                format!("cannot measure: {error}"),
            );
            (0.0, "not measured")
        }
    };
    let outage = cfg.outage.as_secs_f64();
    let backlog = source
        .config_value("repl-backlog-size")
        .and_then(|v| v.parse::<f64>().ok());
    match backlog {
        None => report.push(
            "source backlog",
            Verdict::Warn,
            format!(
                "repl-backlog-size unknown (CONFIG GET refused: {}); an outage of the listener \
                 longer than the backlog covers forces a full sync",
                source.config_error.as_deref().unwrap_or("not listed")
            ),
        ),
        Some(backlog) if rate <= 0.0 => report.push(
            "source backlog",
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
                report.push("source backlog", Verdict::Pass, detail);
            } else {
                report.push(
                    "source backlog",
                    Verdict::Warn,
                    format!(
                        "{detail}: a longer outage of the listener forces a full sync; set \
                         repl-backlog-size >= {}",
                        mib(rate * outage)
                    ),
                );
            }
        }
    }
    // The replica output buffer holds the writes made while a full sync
    // transfers the dataset; past its limits the source drops the replica
    // and the full sync starts over.
    let dataset = source
        .number("used_memory_dataset")
        .or_else(|| source.number("used_memory"))
        .unwrap_or(0) as f64;
    let limits = source
        .config_value("client-output-buffer-limit")
        .and_then(replica_output_limits);
    match limits {
        None => report.push(
            "source replica output buffer",
            Verdict::Warn,
            "client-output-buffer-limit unknown (CONFIG GET refused or unparsable)",
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
                report.push(
                    "source replica output buffer",
                    Verdict::Warn,
                    format!(
                        "{detail}: the source may drop the replica mid full sync; raise \
                         client-output-buffer-limit replica"
                    ),
                );
            } else {
                report.push("source replica output buffer", Verdict::Pass, detail);
            }
        }
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

fn check_target_role(report: &mut Report, target: &Side) {
    match target.get("role") {
        Some("master") => report.push("target role", Verdict::Pass, "master (writable)"),
        Some(role) => report.push(
            "target role",
            Verdict::Fail,
            format!(
                "the target is a {role} of {}:{}: it refuses writes",
                target.get("master_host").unwrap_or("?"),
                target.get("master_port").unwrap_or("?")
            ),
        ),
        None => report.push("target role", Verdict::Warn, "INFO gives no role"),
    }
}

fn check_target_memory(report: &mut Report, target: &Side) {
    match target.config_value("maxmemory-policy") {
        Some("noeviction") => report.push(
            "target maxmemory-policy",
            Verdict::Pass,
            "noeviction: a full target refuses writes (shown in status) instead of dropping keys",
        ),
        Some(policy) => report.push(
            "target maxmemory-policy",
            Verdict::Warn,
            format!(
                "{policy}: a full target evicts keys on its own, and then differs from the \
                 source; set noeviction"
            ),
        ),
        None => report.push(
            "target maxmemory-policy",
            Verdict::Warn,
            format!(
                "unknown (CONFIG GET refused: {})",
                target.config_error.as_deref().unwrap_or("not listed")
            ),
        ),
    }
}

fn check_target_persistence(report: &mut Report, target: &Side) {
    let aof = target.config_value("appendonly");
    let save = target.config_value("save");
    match (aof, save) {
        (Some("yes"), _) => report.push(
            "target persistence",
            Verdict::Pass,
            format!(
                "appendonly yes, appendfsync {}: a restarted target comes back with data and \
                 checkpoint from the same moment",
                target.config_value("appendfsync").unwrap_or("?")
            ),
        ),
        (Some(_), Some(save)) if !save.trim().is_empty() => report.push(
            "target persistence",
            Verdict::Warn,
            format!(
                "RDB snapshots only (save \"{save}\"): a restarted target loses the writes since \
                 its last save, more than retain-applied keeps; the drainer then stops with the \
                 gap error. appendonly yes is safer"
            ),
        ),
        (Some(_), _) => report.push(
            "target persistence",
            Verdict::Warn,
            "none (appendonly no, no save points): a restarted target comes back empty and the \
             drainer stops with the gap error until it gets a snapshot",
        ),
        (None, _) => report.push(
            "target persistence",
            Verdict::Warn,
            format!(
                "unknown (CONFIG GET refused: {})",
                target.config_error.as_deref().unwrap_or("not listed")
            ),
        ),
    }
}

async fn check_target_data(report: &mut Report, target: &mut Side, cfg: &PrecheckConfig) {
    // Resuming: this sync's own checkpoint is there.
    if let Some(id) = &cfg.id {
        let key = checkpoint_key(id, PartitionId(0));
        let get = Command::new(vec![Bytes::from_static(b"GET"), Bytes::from(key.clone())]);
        if let Ok(Frame::Bulk(value)) = target.client.call_command(&get).await {
            report.push(
                "target data",
                Verdict::Pass,
                format!(
                    "this sync's checkpoint is on the target ({}: {}): it resumes, \
                     existing-data does not apply",
                    String::from_utf8_lossy(&key),
                    String::from_utf8_lossy(&value)
                ),
            );
            return;
        }
    }
    let databases = target
        .config_value("databases")
        .and_then(|d| d.parse().ok())
        .unwrap_or(16);
    let mut counts = keyspace_counts(&target.info);
    let internal = match internal_keys(&mut target.client, 100_000).await {
        Ok(keys) => keys,
        Err(error) => {
            report.push(
                "target data",
                Verdict::Warn,
                format!("cannot count ferry's own keys in db 0: {error}"),
            );
            Vec::new()
        }
    };
    if let Some(db0) = counts.get_mut(&0) {
        *db0 = db0.saturating_sub(internal.len() as u64);
    }
    let others: Vec<String> = internal
        .iter()
        .filter(|k| k.starts_with(b"__ferry:checkpoint:"))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let mut busy: Vec<(u32, u64)> = counts
        .into_iter()
        .filter(|&(db, keys)| keys > 0 && db < databases && cfg.keyspace.owns_target_db(db))
        .collect();
    // Under a key filter only the owned keys count: the others are another
    // sync's, or nobody's, and stay.
    let mut at_least = false;
    if let Some(filter) = cfg.keyspace.key_filter() {
        let mut owned = Vec::with_capacity(busy.len());
        for (db, _) in busy {
            match owned_keys(&mut target.client, db, filter, OWNED_KEYS_COUNTED).await {
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
                            "cannot count the owned keys of db {db} ({}): {error}",
                            cfg.keyspace
                        ),
                    );
                    return;
                }
            }
        }
        busy = owned;
    }
    let others_note = if others.is_empty() {
        String::new()
    } else {
        format!(
            "; other syncs' checkpoints found (they are kept): {}",
            others.join(", ")
        )
    };
    if busy.is_empty() {
        report.push(
            "target data",
            Verdict::Pass,
            format!(
                "the owned dbs ({}) hold no owned keys{others_note}",
                cfg.keyspace
            ),
        );
        return;
    }
    let listed = busy
        .iter()
        .map(|(db, keys)| {
            let more = if at_least { "at least " } else { "" };
            format!("db {db}: {more}{keys} keys")
        })
        .collect::<Vec<_>>()
        .join(", ");
    match cfg.existing_data {
        ExistingData::Refuse => report.push(
            "target data",
            Verdict::Fail,
            format!(
                "the owned dbs hold keys ({listed}); existing-data = refuse. Use \
                 --existing-data keep (load over them, keep the others) or flush (delete them \
                 first), or own other dbs or keys (--dbs, --db-map, --key-prefix){others_note}"
            ),
        ),
        ExistingData::Keep => report.push(
            "target data",
            Verdict::Warn,
            format!(
                "the owned dbs hold keys ({listed}); existing-data = keep: same-named keys are \
                 replaced, the others kept{others_note}"
            ),
        ),
        ExistingData::Flush => report.push(
            "target data",
            Verdict::Warn,
            format!(
                "the owned dbs hold keys ({listed}); existing-data = flush: they will be \
                 deleted by the first full sync{others_note}"
            ),
        ),
    }
}

async fn check_pair(
    report: &mut Report,
    source: &mut Side,
    target: &mut Side,
    cfg: &PrecheckConfig,
) {
    // Versions and what the target can take.
    let source_caps = TargetCaps::from_version_str(source.version()).ok();
    let target_caps = TargetCaps::from_version_str(target.version()).ok();
    match (source_caps, target_caps) {
        (Some(s), Some(t)) if t.version >= s.version => report.push(
            "versions",
            Verdict::Pass,
            format!(
                "target redis {} >= source redis {}: snapshots load with RESTORE",
                target.version(),
                source.version()
            ),
        ),
        (Some(s), Some(t)) => report.push(
            "versions",
            Verdict::Warn,
            format!(
                "target redis {} is older than source redis {}: keys in RDB encodings newer \
                 than the target's RDB {} are rebuilt command by command, and what the target \
                 cannot hold is reported",
                target.version(),
                source.version(),
                t.rdb_version.min(s.rdb_version)
            ),
        ),
        (_, None) => report.push(
            "versions",
            Verdict::Fail,
            format!(
                "the target's redis_version {:?} is not usable (2.6 or later)",
                target.version()
            ),
        ),
        (None, _) => {}
    }
    // Write commands the source accepts and the target does not know.
    match (
        write_commands(&mut source.client).await,
        command_names(&mut target.client).await,
    ) {
        (Ok(writes), Ok(known)) => {
            let known: std::collections::HashSet<String> = known.into_iter().collect();
            let missing: Vec<&String> = writes.iter().filter(|w| !known.contains(*w)).collect();
            if missing.is_empty() {
                report.push(
                    "write commands",
                    Verdict::Pass,
                    format!(
                        "the target knows all {} write commands of the source",
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
                         entries using them are refused there and shown in status",
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
    // Source dbs the target does not have.
    let databases: u32 = target
        .config_value("databases")
        .and_then(|d| d.parse().ok())
        .unwrap_or(16);
    let missing: Vec<String> = keyspace_counts(&source.info)
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
            format!("the target has {databases} dbs: every owned source db with keys fits"),
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
    // Memory: will the dataset fit?
    let used = source.number("used_memory").unwrap_or(0) as f64;
    let maxmemory = target
        .config_value("maxmemory")
        .and_then(|m| m.parse::<f64>().ok())
        .unwrap_or(0.0);
    if maxmemory > 0.0 && used > maxmemory * 0.9 {
        report.push(
            "target memory",
            Verdict::Warn,
            format!(
                "the source uses {} and the target's maxmemory is {}: the full sync may not fit",
                mib(used),
                mib(maxmemory)
            ),
        );
    } else {
        report.push(
            "target memory",
            Verdict::Pass,
            format!(
                "source uses {}; target maxmemory {}",
                mib(used),
                if maxmemory > 0.0 {
                    mib(maxmemory)
                } else {
                    "unlimited".into()
                }
            ),
        );
    }
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
