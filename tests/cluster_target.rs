//! A Redis Cluster as the target: a real standalone `redis-server` source,
//! real clusters (tests/common/cluster.rs) as targets, `ferry sync` end to end
//! and the applier driven directly from a WAL for precise crash points.
//!
//! Run: `cargo test --test cluster_target -- --test-threads 2` (each test
//! starts its own cluster; a few minutes on a loaded box).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{key_in_slot, Cluster};
use common::ferry::FerryProcess;
use common::resp::{connect, Conn, Resp};
use common::RedisServer;
use ferry::apply::{run, ApplyConfig, ApplyError, ApplyStatus, ExistingData, SyncState};
use ferry::position::{LogId, PartitionId, ReplOffset};
use ferry::record::{Record, SnapshotMarker, WriteRecord};
use ferry::redis::cluster::SlotRanges;
use ferry::redis::command::{key_hash_slot, Command};
use ferry::redis::url::RedisUrl;
use ferry::wal::{NewEntry, SnapshotPhase, SnapshotState, SourcePosition, Wal, WalConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CONVERGE: Duration = Duration::from_secs(180);

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(why) = check() else { return };
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {why}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The data keys of one node (`__ferry*` left out) with a canonical text of
/// their value.
fn node_data(conn: &mut Conn) -> BTreeMap<String, String> {
    conn.queue(&["KEYS", "*"]);
    let keys: Vec<String> = match conn.replies().expect("KEYS").pop() {
        Some(Resp::Array(Some(items))) => items.iter().filter_map(Resp::text).collect(),
        other => panic!("KEYS reply {other:?}"),
    };
    let keys: Vec<String> = keys
        .into_iter()
        .filter(|k| !k.starts_with("__ferry"))
        .collect();
    for key in &keys {
        conn.queue(&["TYPE", key]);
    }
    let types: Vec<String> = conn.replies().expect("TYPE").iter().map(shown).collect();
    for (key, kind) in keys.iter().zip(&types) {
        match kind.as_str() {
            "string" => conn.queue(&["GET", key]),
            "hash" => conn.queue(&["HGETALL", key]),
            "list" => conn.queue(&["LRANGE", key, "0", "-1"]),
            "set" => conn.queue(&["SMEMBERS", key]),
            "zset" => conn.queue(&["ZRANGE", key, "0", "-1", "WITHSCORES"]),
            _ => conn.queue(&["TYPE", key]),
        }
    }
    let values = conn.replies().expect("values");
    keys.into_iter()
        .zip(types.iter().zip(values))
        .map(|(key, (kind, value))| {
            let mut parts: Vec<String> = match value {
                Resp::Array(Some(items)) => items.iter().map(shown).collect(),
                other => vec![shown(&other)],
            };
            match kind.as_str() {
                "set" => parts.sort(),
                "hash" => {
                    let mut pairs: Vec<String> = parts.chunks(2).map(|p| p.join("=")).collect();
                    pairs.sort();
                    parts = pairs;
                }
                _ => {}
            }
            (key, format!("{kind}:{}", parts.join(",")))
        })
        .collect()
}

/// A reply as text; an error reply (a cluster not up yet) as `ERR <it>`,
/// which never equals a value, so the comparison waits.
fn shown(reply: &Resp) -> String {
    match reply {
        Resp::Error(error) => format!("ERR {error}"),
        Resp::Int(n) => n.to_string(),
        other => other.text().unwrap_or_default(),
    }
}

fn source_data(source: &RedisServer) -> BTreeMap<String, String> {
    node_data(&mut connect(&source.addr()))
}

fn cluster_data(cluster: &Cluster) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    for port in cluster.master_ports() {
        all.extend(node_data(&mut cluster.node(port).conn()));
    }
    all
}

/// `None` when both hold the same keys and values; else what differs.
fn difference(
    source: &BTreeMap<String, String>,
    target: &BTreeMap<String, String>,
) -> Option<String> {
    if source == target {
        return None;
    }
    let missing: Vec<&String> = source.keys().filter(|k| !target.contains_key(*k)).collect();
    let extra: Vec<&String> = target.keys().filter(|k| !source.contains_key(*k)).collect();
    let differ: Vec<&String> = source
        .iter()
        .filter(|(k, v)| target.get(*k).is_some_and(|t| t != *v))
        .map(|(k, _)| k)
        .collect();
    Some(format!(
        "{} source keys, {} target keys; missing {:?}, extra {:?}, different {:?}",
        source.len(),
        target.len(),
        &missing[..missing.len().min(5)],
        &extra[..extra.len().min(5)],
        &differ[..differ.len().min(5)]
    ))
}

fn wait_converged(source: &RedisServer, cluster: &Cluster, ferry: &FerryProcess, when: &str) {
    wait_for(when, CONVERGE, || {
        let want = source_data(source);
        let got = cluster_data(cluster);
        difference(&want, &got).map(|d| format!("{d}\n{}", ferry.log_tail(20)))
    });
}

fn start_source() -> RedisServer {
    RedisServer::start(&["--repl-diskless-sync-delay", "0"])
}

/// Keys `{t}<i>`-style names that spread over every slot.
fn key(prefix: &str, i: usize) -> String {
    format!("{prefix}:{i}")
}

/// Runs `commands` on `conn` pipelined, asserting no error.
fn run_all(conn: &mut Conn, commands: &[Vec<String>]) {
    for chunk in commands.chunks(500) {
        for cmd in chunk {
            conn.queue(cmd);
        }
        for (reply, cmd) in conn.replies().expect("replies").iter().zip(chunk) {
            assert!(
                !matches!(reply, Resp::Error(_)),
                "source refused {cmd:?}: {reply:?}"
            );
        }
    }
}

fn words(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// A mixed stream: strings, counters, hashes, lists, cross-slot `MSET`,
/// `DEL k1 k2` and transactions over several slots.
fn mixed_writes(round: usize, count: usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for i in 0..count {
        let a = key("w", (round * count + i) % 997);
        let b = key("w", (round * count + i * 7 + 3) % 997);
        match i % 8 {
            0 => out.push(words(&["SET", &a, &format!("v{round}-{i}")])),
            1 => out.push(words(&["INCR", &key("counter", i % 50)])),
            2 => out.push(words(&[
                "HSET",
                &key("hash", i % 20),
                &format!("f{i}"),
                "x",
            ])),
            3 => out.push(words(&["RPUSH", &key("list", i % 10), &format!("{i}")])),
            4 => out.push(words(&["MSET", &a, &format!("m{i}"), &b, &format!("n{i}")])),
            5 => out.push(words(&["DEL", &a, &key("w", (i * 13) % 997)])),
            6 => {
                out.push(words(&["MULTI"]));
                out.push(words(&["INCR", &key("counter", (i + 1) % 50)]));
                out.push(words(&["SET", &b, "in-multi"]));
                out.push(words(&["EXEC"]));
            }
            _ => out.push(words(&["SADD", &key("set", i % 5), &format!("{i}")])),
        }
    }
    out
}

fn split_entries(ferry: &FerryProcess) -> u64 {
    ferry.status_json()["drainers"][0]["split_entries"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn standalone_to_cluster_full_and_incremental_converge() {
    let source = start_source();
    source.cmd(&["DEBUG", "POPULATE", "3000", "pre", "20"]);
    let mut conn = connect(&source.addr());
    run_all(&mut conn, &mixed_writes(0, 400));
    let cluster = Cluster::start(3, 0);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    // The target as a seed list.
    let ferry = FerryProcess::sync(&data, &source.url(), &cluster.seed_list(), &[]);
    wait_converged(&source, &cluster, &ferry, "the full sync");
    for round in 1..4 {
        run_all(&mut conn, &mixed_writes(round, 800));
    }
    wait_converged(&source, &cluster, &ferry, "the stream");
    // Every master holds a share, and nothing of ferry but its checkpoints.
    for port in cluster.master_ports() {
        assert!(
            cluster.node(port).dbsize() > 500,
            "master {port} is nearly empty"
        );
    }
    let split = split_entries(&ferry);
    assert!(split >= 300, "split entries counted: {split}");
    let status = ferry.status_json();
    let drainer = &status["drainers"][0];
    assert!(
        drainer["cluster"]
            .as_str()
            .unwrap_or("")
            .contains("3 masters"),
        "{drainer}"
    );
    // A FLUSHALL of the source empties every master but keeps the
    // checkpoints; the stream goes on after it.
    run_all(&mut conn, &[words(&["FLUSHALL"])]);
    run_all(&mut conn, &mixed_writes(9, 200));
    wait_converged(&source, &cluster, &ferry, "after FLUSHALL");
    let checkpoints: usize = cluster
        .master_ports()
        .iter()
        .map(
            |&port| match cluster.node(port).call(&["KEYS", "__ferry:checkpoint:*"]) {
                Resp::Array(Some(items)) => items.len(),
                _ => 0,
            },
        )
        .sum();
    assert!(checkpoints > 1, "slot checkpoints kept: {checkpoints}");
}

/// The drainer's `(applied, durable)` from `ferry status`.
fn drainer_marks(ferry: &FerryProcess) -> (u64, u64) {
    let status = ferry.status_json();
    let drainer = &status["drainers"][0];
    (
        drainer["applied"].as_u64().unwrap_or(0),
        drainer["durable"].as_u64().unwrap_or(0),
    )
}

/// A sync owning only the keys under a prefix of a shared cluster target:
/// its full sync and a `FLUSHALL` of its source delete only those keys, on
/// every master (a script cannot delete keys of several slots at once on a
/// cluster node: SCAN and UNLINK per slot); other keys stay.
#[test]
fn a_key_filter_on_a_cluster_target_keeps_other_keys() {
    let source = start_source();
    let cluster = Cluster::start(3, 0);
    let others: Vec<(String, String)> = (0..300)
        .map(|i| (format!("other:{i}"), format!("kept-{i}")))
        .collect();
    cluster.set_all(&others);
    let mut conn = connect(&source.addr());
    let app: Vec<Vec<String>> = (0..600)
        .map(|i| words(&["SET", &format!("app:{i}"), &format!("v{i}")]))
        .collect();
    run_all(&mut conn, &app);
    // The source also has keys outside the prefix: never written.
    run_all(&mut conn, &[words(&["SET", "other:0", "from-source"])]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let ferry = FerryProcess::sync(
        &data,
        &source.url(),
        &cluster.url(),
        &["--key-prefix", "app:", "--existing-data", "flush"],
    );
    let owned = |all: BTreeMap<String, String>| -> BTreeMap<String, String> {
        all.into_iter()
            .filter(|(k, _)| k.starts_with("app:"))
            .collect()
    };
    wait_for("the full sync", CONVERGE, || {
        difference(&owned(source_data(&source)), &owned(cluster_data(&cluster)))
            .map(|d| format!("{d}\n{}", ferry.log_tail(20)))
    });
    run_all(&mut conn, &[words(&["FLUSHALL"])]);
    run_all(&mut conn, &[words(&["SET", "app:after", "1"])]);
    wait_for("the flush", CONVERGE, || {
        difference(&owned(source_data(&source)), &owned(cluster_data(&cluster)))
            .map(|d| format!("{d}\n{}", ferry.log_tail(20)))
    });
    let kept: Vec<Option<String>> =
        cluster.get_all(&others.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
    let want: Vec<Option<String>> = others.iter().map(|(_, v)| Some(v.clone())).collect();
    assert_eq!(kept, want, "keys outside the prefix kept");
}

/// A Redis Cluster source of 3 masters into a cluster target of 2 (made by
/// hand): one partition per source shard, each applied by slot into the
/// target with its slot scope; full sync and stream converge.
#[test]
fn cluster_source_of_three_masters_into_a_cluster_of_two() {
    let source = Cluster::start(3, 0);
    let target = Cluster::start_by_hand(2);
    let pairs: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("pre:{i}"), format!("v{i}")))
        .collect();
    source.set_all(&pairs);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let ferry = FerryProcess::sync(&data, &source.seed_list(), &target.seed_list(), &[]);
    let converge = |when: &str| {
        wait_for(when, CONVERGE, || {
            difference(&cluster_data(&source), &cluster_data(&target))
                .map(|d| format!("{d}\n{}", ferry.log_tail(20)))
        })
    };
    converge("the full sync");
    for round in 0..5 {
        let commands: Vec<(String, Vec<String>)> = (0..400)
            .map(|i| {
                let key = format!("c:{}", (round * 31 + i) % 120);
                (key.clone(), vec!["INCR".to_string(), key])
            })
            .chain((0..200).map(|i| {
                let key = format!("s:{round}:{i}");
                (key.clone(), vec!["SET".to_string(), key, "x".to_string()])
            }))
            .collect();
        for reply in source.pipeline_keys(&commands) {
            assert!(!matches!(reply, Resp::Error(_)), "{reply:?}");
        }
    }
    converge("the stream");
    let status = ferry.status_json();
    let drainers = status["drainers"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        drainers.len(),
        3,
        "one partition per source shard: {status}"
    );
    for drainer in &drainers {
        assert!(
            drainer["cluster"]
                .as_str()
                .unwrap_or("")
                .contains("2 masters"),
            "{drainer}"
        );
    }
}

#[test]
fn counters_are_applied_exactly_once_across_kill9_of_ferry() {
    let source = start_source();
    let cluster = Cluster::start(3, 0);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let mut ferry = FerryProcess::sync(&data, &source.url(), &cluster.url(), &[]);
    let counters: Vec<String> = (0..40).map(|i| key("c", i)).collect();
    let mut conn = connect(&source.addr());
    let mut mid_stream = 0;
    for round in 0..8 {
        let mut writes = Vec::new();
        for i in 0..4000 {
            let c = &counters[(round * 7 + i) % counters.len()];
            let d = &counters[(round * 3 + i * 11) % counters.len()];
            if i % 5 == 0 {
                // One entry over several slots: split, each piece once.
                writes.push(words(&["MULTI"]));
                writes.push(words(&["INCR", c]));
                writes.push(words(&["INCRBY", d, "2"]));
                writes.push(words(&["EXEC"]));
            } else {
                writes.push(words(&["INCR", c]));
            }
        }
        run_all(&mut conn, &writes);
        if round % 2 == 1 {
            // Kill as soon as this process applied something: mid-stream.
            let (before, _) = drainer_marks(&ferry);
            let deadline = Instant::now() + CONVERGE;
            loop {
                let (applied, durable) = drainer_marks(&ferry);
                if applied > before {
                    ferry.kill9();
                    if applied < durable {
                        mid_stream += 1;
                    }
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "nothing applied; {}",
                    ferry.log_tail(20)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            ferry.spawn();
        }
    }
    wait_converged(&source, &cluster, &ferry, "every increment");
    assert!(
        mid_stream >= 2,
        "only {mid_stream} of 4 kills landed with entries still to apply"
    );
}

/// kill -9 of ferry while the snapshot loads into the cluster: the floor
/// says `loading=M`, every master deletes again and the load restarts; the
/// stream after it is applied once.
#[test]
fn kill9_mid_snapshot_load_into_a_cluster_converges() {
    let source = start_source();
    source.cmd(&["DEBUG", "POPULATE", "200000", "big", "64"]);
    let cluster = Cluster::start(3, 0);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let mut ferry = FerryProcess::sync(&data, &source.url(), &cluster.url(), &[]);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let status = ferry.status_json();
        let load = &status["drainers"][0]["snapshot_load"];
        let keys = load["keys_loaded"].as_u64().unwrap_or(0);
        if keys > 1000 && load["done"] == false {
            ferry.kill9();
            break;
        }
        assert!(
            load["done"] != true,
            "the load ended before the kill: {status}"
        );
        assert!(
            Instant::now() < deadline,
            "no load seen; {}",
            ferry.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut conn = connect(&source.addr());
    run_all(&mut conn, &mixed_writes(1, 1000));
    ferry.spawn();
    wait_converged(&source, &cluster, &ferry, "after the kill mid-load");
    let log = std::fs::read_to_string(&ferry.log).unwrap_or_default();
    assert!(
        log.matches("loading snapshot into the cluster").count() >= 2,
        "the load started again from the deletion"
    );
}

#[test]
fn target_failover_during_writes_converges() {
    let source = start_source();
    let cluster = Cluster::start(3, 1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let ferry = FerryProcess::sync(&data, &source.url(), &cluster.url(), &[]);
    let mut conn = connect(&source.addr());
    run_all(&mut conn, &mixed_writes(0, 500));
    wait_converged(&source, &cluster, &ferry, "before the failover");
    let writer = {
        let addr = source.addr();
        std::thread::spawn(move || {
            let mut conn = connect(&addr);
            for round in 1..30 {
                run_all(&mut conn, &mixed_writes(round, 200));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let victim = cluster.master_ports()[0];
    let promoted = cluster.failover(victim);
    writer.join().expect("writer");
    wait_converged(&source, &cluster, &ferry, "after the failover");
    assert!(cluster.master_ports().contains(&promoted));
    assert!(!cluster.master_ports().contains(&victim));
}

/// kill -9 of a target master during writes: its replica takes over after
/// the cluster's node timeout; the applier rediscovers the cluster, reads
/// the promoted replica's slot checkpoints and converges (the floor only
/// moved past pieces its replica acknowledged with `WAIT`).
#[test]
fn target_master_killed_during_writes_converges() {
    let source = start_source();
    let mut cluster = Cluster::start(3, 1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    // The seed list names every node: any may be the one killed.
    let ferry = FerryProcess::sync(&data, &source.url(), &cluster.seed_list(), &[]);
    let mut conn = connect(&source.addr());
    run_all(&mut conn, &mixed_writes(0, 500));
    wait_converged(&source, &cluster, &ferry, "before the kill");
    let writer = {
        let addr = source.addr();
        std::thread::spawn(move || {
            let mut conn = connect(&addr);
            for round in 1..40 {
                run_all(&mut conn, &mixed_writes(round, 200));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let victim = cluster.master_ports()[1];
    let slot = (0..16384u16)
        .find(|&s| cluster.master_for_slot(s).port == victim)
        .expect("a slot of the victim");
    cluster.kill9(victim);
    let promoted = cluster.wait_promoted_after_crash(victim, slot);
    // Every master answers again (cluster_state ok).
    wait_for("the cluster up again", CONVERGE, || {
        let down: Vec<u16> = cluster
            .master_ports()
            .into_iter()
            .filter(|&p| {
                let info = cluster.node(p).call(&["CLUSTER", "INFO"]);
                !shown(&info).contains("cluster_state:ok")
            })
            .collect();
        (!down.is_empty()).then(|| format!("masters {down:?} refuse"))
    });
    writer.join().expect("writer");
    wait_converged(&source, &cluster, &ferry, "after the master was killed");
    assert_ne!(promoted, victim);
}

#[test]
fn slot_migration_on_the_target_during_writes_converges() {
    let source = start_source();
    let cluster = Cluster::start(3, 0);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let ferry = FerryProcess::sync(&data, &source.url(), &cluster.url(), &[]);
    let mut conn = connect(&source.addr());
    run_all(&mut conn, &mixed_writes(0, 500));
    wait_converged(&source, &cluster, &ferry, "before the migration");
    let masters = cluster.master_ports();
    let (from, to) = (masters[0], masters[1]);
    // A slot held half-migrated by hand (ASK), with writes into it.
    let slot = (0..16384u16)
        .find(|&s| cluster.master_for_slot(s).port == from)
        .expect("a slot of the first master");
    let hot: Vec<String> = (0..5)
        .map(|i| key_in_slot(&format!("hot{i}"), slot))
        .collect();
    for k in &hot {
        run_all(&mut conn, &[words(&["INCR", k])]);
    }
    wait_converged(&source, &cluster, &ferry, "the hot slot written");
    cluster.begin_slot_migration(slot, from, to);
    cluster.migrate_key(&hot[0], from, to);
    for _ in 0..20 {
        for k in &hot {
            run_all(&mut conn, &[words(&["INCR", k])]);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let status = ferry.status_json();
    let shown = status["drainers"][0]["cluster"]
        .as_str()
        .unwrap_or("")
        .to_string();
    cluster.migrate_slot_keys(slot, from, to);
    cluster.finish_slot_migration(slot, from, to);
    // And a whole resharding while writes run.
    let writer = {
        let addr = source.addr();
        std::thread::spawn(move || {
            let mut conn = connect(&addr);
            for round in 1..25 {
                run_all(&mut conn, &mixed_writes(round, 200));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    cluster.reshard(to, masters[2], 300);
    writer.join().expect("writer");
    wait_converged(&source, &cluster, &ferry, "after the migrations");
    assert!(
        shown.contains(&format!("slot {slot}")),
        "the status named the slot held during its migration: {shown:?}"
    );
}

// ---- The applier driven from a WAL, for precise crash points. ----

const PARTITION: PartitionId = PartitionId(0);
const DRAINER: &str = "ct";
const FLOOR: &str = "__ferry:checkpoint:ct:0";

fn write(commands: Vec<Command>, transaction: bool) -> Record {
    Record::Write(WriteRecord {
        db: 0,
        commands,
        transaction,
        streamed: vec![],
        tenure: None,
    })
}

fn cmd(parts: &[&str]) -> Command {
    Command::from_parts(parts)
}

async fn append(wal: &Wal, records: &[Record], first_offset: u64) -> LogId {
    append_to(wal, PARTITION, records, first_offset).await
}

async fn append_to(
    wal: &Wal,
    partition: PartitionId,
    records: &[Record],
    first_offset: u64,
) -> LogId {
    let entries = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            NewEntry::new(
                SourcePosition {
                    replid: "b".repeat(40).into(),
                    offset: ReplOffset(first_offset + i as u64),
                    db: 0,
                },
                r.encode(),
            )
        })
        .collect();
    wal.append(partition, entries).await.unwrap().last
}

struct Running {
    status: Arc<ApplyStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ApplyError>>,
}

fn start_applier(target: &str, wal: &Wal, batch: usize) -> Running {
    start_partition(target, wal, batch, 0)
}

fn start_partition(target: &str, wal: &Wal, batch: usize, partition: u32) -> Running {
    let cfg = ApplyConfig {
        drainer_id: DRAINER.into(),
        partition,
        target: target.into(),
        batch_max_entries: batch,
        retry_backoff_min: "20ms".parse().unwrap(),
        retry_backoff_max: "300ms".parse().unwrap(),
        existing_data: ExistingData::Flush,
        ..ApplyConfig::default()
    };
    let status = Arc::new(ApplyStatus::new(PartitionId(partition)));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(cfg, wal.clone(), Arc::clone(&status), shutdown.clone()));
    Running {
        status,
        shutdown,
        task,
    }
}

impl Running {
    async fn wait(&self, what: &str, mut done: impl FnMut(&ApplyStatus) -> bool) {
        let deadline = Instant::now() + CONVERGE;
        while !done(&self.status) {
            assert!(
                !self.task.is_finished(),
                "the applier ended: {:?}",
                self.status.snapshot()
            );
            assert!(
                Instant::now() < deadline,
                "{what}: {:?}",
                self.status.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Arc<ApplyStatus> {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("stops")
            .expect("task");
        if let Err(error) = result {
            panic!("the applier failed: {error}");
        }
        self.status
    }
}

fn get(cluster: &Cluster, key: &str) -> Option<String> {
    cluster.call_key(key, &["GET", key]).text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_slot_entries_are_split_counted_and_resumed_per_slot() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(3, 0))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(WalConfig::with_dir(dir.path())).await.unwrap();
    let (a, b, c) = ("{a}k", "{b}k", "{c}k");
    assert!(key_hash_slot(b"a") != key_hash_slot(b"b"));
    let records = vec![
        write(vec![cmd(&["MSET", a, "1", b, "2", c, "3"])], false),
        write(vec![cmd(&["INCR", "{a}n"]), cmd(&["INCR", "{b}n"])], true),
        write(vec![cmd(&["DEL", a, b])], false),
        write(vec![cmd(&["SET", "{a}one", "x"])], false),
    ];
    let last = append(&wal, &records, 1).await;
    let applier = start_applier(&cluster.url(), &wal, 100);
    applier
        .wait("the first entries", |s| s.snapshot().applied >= last)
        .await;
    assert_eq!(get(&cluster, a), None);
    assert_eq!(get(&cluster, b), None);
    assert_eq!(get(&cluster, c).as_deref(), Some("3"));
    assert_eq!(get(&cluster, "{a}n").as_deref(), Some("1"));
    assert_eq!(get(&cluster, "{b}n").as_deref(), Some("1"));
    let status = applier.stop().await;
    // MSET over 3 slots, the transaction over 2, DEL over 2.
    assert_eq!(status.snapshot().split_entries, 3);

    // A crash after some pieces of a batch committed and before the floor:
    // the floor is put back, the slot checkpoints stay. Started again, the
    // applier sends each slot only what it lacks.
    let floor_before = cluster.call_key(FLOOR, &["GET", FLOOR]).text().unwrap();
    let more = vec![
        write(vec![cmd(&["INCR", "{a}n"]), cmd(&["INCR", "{b}n"])], true),
        write(vec![cmd(&["INCR", "{c}n"])], false),
    ];
    let last = append(&wal, &more, 10).await;
    let applier = start_applier(&cluster.url(), &wal, 100);
    applier
        .wait("the second entries", |s| s.snapshot().applied >= last)
        .await;
    applier.stop().await;
    assert_eq!(get(&cluster, "{a}n").as_deref(), Some("2"));
    // Roll the floor back: as if the process died before writing it.
    cluster.call_key(FLOOR, &["SET", FLOOR, &floor_before]);
    // ... and as if the piece of slot {b} had not committed: its counter and
    // its slot checkpoint back where they were.
    let b_slot = key_hash_slot(b"b");
    let b_key = format!("{FLOOR}:{}", tag(b_slot));
    let b_checkpoint = cluster.call_key(&b_key, &["GET", &b_key]).text();
    assert!(b_checkpoint.is_some(), "slot {b_slot} has a checkpoint");
    cluster.call_key("{b}n", &["SET", "{b}n", "1"]);
    let c_key = format!("{FLOOR}:{}", tag(key_hash_slot(b"c")));
    cluster.call_key(&c_key, &["DEL", &c_key]);
    cluster.call_key("{c}n", &["DEL", "{c}n"]);
    // The {b} checkpoint goes back to the first batch's value.
    cluster.call_key(&b_key, &["SET", &b_key, &floor_before]);
    let applier = start_applier(&cluster.url(), &wal, 1);
    applier
        .wait("applied again", |s| s.snapshot().applied >= last)
        .await;
    applier.stop().await;
    // {a} committed before the "crash": not applied twice. {b} and {c} did
    // not: applied once.
    assert_eq!(get(&cluster, "{a}n").as_deref(), Some("2"));
    assert_eq!(get(&cluster, "{b}n").as_deref(), Some("2"));
    assert_eq!(get(&cluster, "{c}n").as_deref(), Some("1"));

    // A command that cannot be cut is held (BLOCKED), nothing of it sent.
    let rename = vec![write(vec![cmd(&["RENAME", "{a}one", "{b}two"])], false)];
    let held = append(&wal, &rename, 20).await;
    let applier = start_applier(&cluster.url(), &wal, 100);
    applier
        .wait("held at the RENAME", |s| {
            s.snapshot()
                .blocked
                .is_some_and(|b| b.log_id == held && b.command == "RENAME")
        })
        .await;
    assert_eq!(applier.status.snapshot().state, SyncState::Blocked);
    assert_eq!(get(&cluster, "{a}one").as_deref(), Some("x"));
    applier.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

fn tag(slot: u16) -> String {
    ferry::redis::cluster::tag_for_slot(slot).to_string()
}

// ---- Partitions with a slot scope (one per source shard) into a cluster. ----

/// `n` keys `<prefix>:<i>` whose hash slot is in `scope`.
fn keys_in(scope: &SlotRanges, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .filter(|key| scope.contains(key_hash_slot(key.as_bytes())))
        .take(n)
        .collect()
}

/// Takes an RDB of `source` and stores it as `epoch` of `partition` with
/// its marker (whose `scope` is given) appended; returns the marker's id.
async fn append_snapshot(
    wal: &Wal,
    partition: PartitionId,
    source: &RedisServer,
    epoch: u64,
    scope: Option<SlotRanges>,
    dir: &std::path::Path,
) -> LogId {
    let file = dir.join(format!("snapshot-{partition}-{epoch}.rdb"));
    let report = ferry::cli::fetch::fetch(&RedisUrl::parse(&source.url()).unwrap(), &file)
        .await
        .unwrap();
    let rdb = Bytes::from(std::fs::read(&file).unwrap());
    let state = |phase| SnapshotState { epoch, phase };
    wal.set_snapshot_state(partition, state(SnapshotPhase::Writing))
        .await
        .unwrap();
    let mut chunks = 0;
    for (seq, chunk) in rdb.chunks(64 << 10).enumerate() {
        wal.put_snapshot_chunk(partition, epoch, seq as u64, rdb.slice_ref(chunk))
            .await
            .unwrap();
        chunks += 1;
    }
    wal.set_snapshot_state(partition, state(SnapshotPhase::Complete))
        .await
        .unwrap();
    let marker = SnapshotMarker {
        epoch,
        rdb_bytes: rdb.len() as u64,
        chunks,
        replid: report.replid.to_string(),
        offset: report.offset.0,
        scope,
        tenures: Vec::new(),
        handoffs: Vec::new(),
    };
    append_to(wal, partition, &[Record::Snapshot(marker)], 1).await
}

fn string_data(cluster: &Cluster) -> BTreeMap<String, String> {
    cluster_data(cluster)
        .into_iter()
        .map(|(k, v)| (k, v.trim_start_matches("string:").to_string()))
        .collect()
}

/// Two partitions (two source shards, each with its slot scope) into one
/// cluster: each load and each `FLUSHALL` in a partition's stream deletes
/// only the keys of its slots, on every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_partitions_share_a_cluster_target() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(3, 0))
        .await
        .unwrap();
    let (scope_a, scope_b) = (
        SlotRanges::from_ranges([(0, 8191)]),
        SlotRanges::from_ranges([(8192, 16383)]),
    );
    let source_a = RedisServer::start(&[]);
    let source_b = RedisServer::start(&[]);
    let a = keys_in(&scope_a, "a", 1500);
    let b = keys_in(&scope_b, "b", 1500);
    for (source, keys, value) in [(&source_a, &a, "from-a"), (&source_b, &b, "from-b")] {
        let mut conn = connect(&source.addr());
        let writes: Vec<Vec<String>> = keys.iter().map(|k| words(&["SET", k, value])).collect();
        run_all(&mut conn, &writes);
    }
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(WalConfig::with_dir(work.path().join("wal")))
        .await
        .unwrap();
    let (pa, pb) = (PartitionId(0), PartitionId(1));
    let marker_b =
        append_snapshot(&wal, pb, &source_b, 1, Some(scope_b.clone()), work.path()).await;
    let marker_a =
        append_snapshot(&wal, pa, &source_a, 1, Some(scope_a.clone()), work.path()).await;
    let url = cluster.url();
    let one = start_partition(&url, &wal, 64, 1);
    one.wait("partition 1 loaded", |s| s.snapshot().applied >= marker_b)
        .await;
    let two = start_partition(&url, &wal, 64, 0);
    two.wait("partition 0 loaded", |s| s.snapshot().applied >= marker_a)
        .await;
    let mut expected: BTreeMap<String, String> = a
        .iter()
        .map(|k| (k.clone(), "from-a".to_string()))
        .chain(b.iter().map(|k| (k.clone(), "from-b".to_string())))
        .collect();
    let url_cluster = &cluster;
    assert_eq!(
        string_data(url_cluster),
        expected,
        "both loads, neither erasing the other"
    );

    // A's stream: a FLUSHALL of shard A, then writes.
    let k = keys_in(&scope_a, "after", 2);
    let stream_a = vec![
        write(vec![cmd(&["SET", &k[0], "before-flush"])], false),
        write(vec![cmd(&["FLUSHALL"])], false),
        write(vec![cmd(&["SET", &k[1], "after-flush"])], false),
    ];
    let last_a = append_to(&wal, pa, &stream_a, 10).await;
    let stream_b = vec![write(vec![cmd(&["SET", &b[0], "still-b"])], false)];
    let last_b = append_to(&wal, pb, &stream_b, 10).await;
    two.wait("A's stream", |s| s.snapshot().applied >= last_a)
        .await;
    one.wait("B's stream", |s| s.snapshot().applied >= last_b)
        .await;
    two.stop().await;
    one.stop().await;
    expected.retain(|key, _| !scope_a.contains(key_hash_slot(key.as_bytes())));
    expected.insert(b[0].clone(), "still-b".into());
    expected.insert(k[1].clone(), "after-flush".into());
    assert_eq!(
        string_data(&cluster),
        expected,
        "A's flush deleted only A's slots"
    );
    // The scope is kept next to each partition's floor.
    let scope_key = "__ferry:scope:ct:0";
    assert_eq!(
        cluster
            .call_key(scope_key, &["GET", scope_key])
            .text()
            .as_deref(),
        Some("v1 0-8191")
    );
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

/// Figures, not a check: full sync of 200k keys and a stream of 100k writes
/// into a standalone target and into a 3-master cluster, in one run.
/// `cargo test --release --test cluster_target figures -- --ignored --nocapture`
#[test]
#[ignore = "figures; run by hand"]
fn figures_standalone_vs_cluster_target() {
    const KEYS: usize = 200_000;
    const WRITES: usize = 100_000;
    for kind in ["standalone", "cluster"] {
        let source = start_source();
        source.cmd(&["DEBUG", "POPULATE", &KEYS.to_string(), "key", "64"]);
        let standalone = (kind == "standalone").then(|| RedisServer::start(&[]));
        let cluster = (kind == "cluster").then(|| Cluster::start(3, 0));
        let target_url = standalone
            .as_ref()
            .map(|t| t.url())
            .or_else(|| cluster.as_ref().map(|c| c.url()))
            .unwrap();
        let get = |key: &str| -> Option<String> {
            match (&standalone, &cluster) {
                (Some(t), _) => {
                    let value = t.cmd(&["GET", key]);
                    (!value.is_empty()).then_some(value)
                }
                (_, Some(c)) => c.call_key(key, &["GET", key]).text(),
                _ => None,
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let ferry = FerryProcess::sync(&dir.path().join("sync"), &source.url(), &target_url, &[]);
        let last = format!("key:{}", KEYS - 1);
        wait_for("the full sync", CONVERGE, || {
            get(&last).is_none().then(|| ferry.log_tail(5))
        });
        let full = started.elapsed();
        let mut conn = connect(&source.addr());
        let writes: Vec<Vec<String>> = (0..WRITES)
            .map(|i| words(&["SET", &format!("w:{i}"), "0123456789abcdef"]))
            .chain(std::iter::once(words(&["SET", "done", "1"])))
            .collect();
        let started = Instant::now();
        run_all(&mut conn, &writes);
        let written = started.elapsed();
        wait_for("the stream", CONVERGE, || {
            get("done").is_none().then(|| ferry.log_tail(5))
        });
        let stream = started.elapsed();
        eprintln!(
            "FIGURE {kind}: full sync of {KEYS} keys in {:.2}s; {WRITES} SETs written in {:.2}s, \
             applied in {:.2}s ({:.0} entries/s)",
            full.as_secs_f64(),
            written.as_secs_f64(),
            stream.as_secs_f64(),
            WRITES as f64 / stream.as_secs_f64()
        );
        drop(ferry);
    }
}
