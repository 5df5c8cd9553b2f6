//! Partitions with a slot scope (one per Redis Cluster source shard) applying
//! into one target, against real redis-servers: each partition's snapshot
//! load and each `FLUSHALL` in its stream touch only the keys of its hash
//! slots, never those another partition of the same sync loaded.
//!
//! The snapshots are RDBs of standalone servers holding only keys of the
//! partition's slots (what a cluster shard's RDB holds), stored in a
//! drainer WAL with a marker whose `scope` names those slots; the records
//! after them are written straight into the WAL. The crash test re-executes
//! this binary as a child (the ignored `scoped_apply_child`, configured
//! through environment variables) and kills it with SIGKILL.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::RedisServer;
use ferry::apply::{run, ApplyConfig, ApplyError, ApplyStatus, ExistingData};
use ferry::position::{LogId, PartitionId, ReplOffset};
use ferry::record::{Record, SnapshotMarker, WriteRecord};
use ferry::redis::client::Client;
use ferry::redis::cluster::SlotRanges;
use ferry::redis::command::{key_hash_slot, Command};
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;
use ferry::wal::{NewEntry, SnapshotPhase, SnapshotState, SourcePosition, Wal, WalConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DRAINER: &str = "scoped";
const APPLY_WAIT: Duration = Duration::from_secs(120);

// Child process configuration.
const WAL_DIR_ENV: &str = "FERRY_SCOPED_TEST_WAL";
const TARGET_ENV: &str = "FERRY_SCOPED_TEST_TARGET";
const PARTITION_ENV: &str = "FERRY_SCOPED_TEST_PARTITION";
const UNTIL_ENV: &str = "FERRY_SCOPED_TEST_UNTIL";

/// The two shards' slots.
fn scope_a() -> SlotRanges {
    SlotRanges::from_ranges([(0, 8191)])
}

fn scope_b() -> SlotRanges {
    SlotRanges::from_ranges([(8192, 16383)])
}

fn checkpoint_key(partition: u32) -> String {
    format!("__ferry:checkpoint:{DRAINER}:{partition}")
}

fn wal_config(dir: &Path) -> WalConfig {
    WalConfig {
        group_commit_linger: "100us".parse().unwrap(),
        ..WalConfig::with_dir(dir)
    }
}

fn apply_config(target: &str, partition: u32, existing_data: ExistingData) -> ApplyConfig {
    ApplyConfig {
        drainer_id: DRAINER.to_string(),
        partition,
        target: target.into(),
        batch_max_entries: 64,
        retry_backoff_min: "20ms".parse().unwrap(),
        retry_backoff_max: "200ms".parse().unwrap(),
        reply_timeout: "20s".parse().unwrap(),
        existing_data,
        ..ApplyConfig::default()
    }
}

fn single(args: &[&str]) -> Record {
    Record::Write(WriteRecord {
        db: 0,
        commands: vec![Command::from_parts(args)],
        transaction: false,
        streamed: vec![],
        tenure: None,
    })
}

fn entry(record: &Record, offset: u64) -> NewEntry {
    NewEntry::new(
        SourcePosition {
            replid: "b".repeat(40).into(),
            offset: ReplOffset(offset),
            db: 0,
        },
        record.encode(),
    )
}

/// Appends `records` to `partition`; returns the last id.
async fn append(wal: &Wal, partition: u32, records: &[Record]) -> LogId {
    let partition = PartitionId(partition);
    let first = wal.positions(partition).unwrap().map_or(0, |p| p.durable.0);
    let mut last = LogId::ZERO;
    for (i, group) in records.chunks(2000).enumerate() {
        let base = first + (i * 2000) as u64;
        let entries = group
            .iter()
            .enumerate()
            .map(|(j, r)| entry(r, base + j as u64 + 1))
            .collect();
        last = wal.append(partition, entries).await.unwrap().last;
    }
    last
}

/// `n` keys `<prefix>:<i>` whose hash slot is in `scope`.
fn keys_in(scope: &SlotRanges, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .filter(|key| scope.contains(key_hash_slot(key.as_bytes())))
        .take(n)
        .collect()
}

async fn connect(server: &RedisServer) -> Client {
    Client::connect(&RedisUrl::parse(&server.url()).unwrap())
        .await
        .unwrap()
}

/// Sets `key = value` for each key in `server` (db 0).
async fn set_all(server: &RedisServer, pairs: &[(String, String)]) {
    let mut client = connect(server).await;
    for chunk in pairs.chunks(500) {
        let mut args = vec!["MSET".to_string()];
        for (key, value) in chunk {
            args.push(key.clone());
            args.push(value.clone());
        }
        client.call(args).await.unwrap();
    }
}

/// Every key of db 0 with its string value, `__ferry*` keys aside.
async fn data(server: &RedisServer) -> BTreeMap<String, String> {
    let mut client = connect(server).await;
    let mut cursor = "0".to_string();
    let mut keys = Vec::new();
    loop {
        let reply = client
            .call(["SCAN", cursor.as_str(), "COUNT", "1000"])
            .await
            .unwrap();
        let Frame::Array(parts) = reply else {
            panic!("SCAN reply {reply:?}")
        };
        cursor = String::from_utf8_lossy(parts[0].as_bytes().unwrap()).into_owned();
        let Frame::Array(batch) = &parts[1] else {
            panic!("SCAN keys")
        };
        for key in batch {
            let key = String::from_utf8_lossy(key.as_bytes().unwrap()).into_owned();
            if !key.starts_with("__ferry") {
                keys.push(key);
            }
        }
        if cursor == "0" {
            break;
        }
    }
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(500) {
        let mut args = vec!["MGET".to_string()];
        args.extend(chunk.iter().cloned());
        let Frame::Array(values) = client.call(args).await.unwrap() else {
            panic!("MGET")
        };
        for (key, value) in chunk.iter().zip(values) {
            if let Some(value) = value.as_bytes() {
                out.insert(key.clone(), String::from_utf8_lossy(value).into_owned());
            }
        }
    }
    out
}

fn pairs(keys: &[String], value: &str) -> Vec<(String, String)> {
    keys.iter()
        .map(|k| (k.clone(), value.to_string()))
        .collect()
}

/// Takes an RDB of `source` and stores it as `epoch` of `partition`;
/// returns the marker (with `scope`) once its chunks are durable.
async fn store_snapshot(
    wal: &Wal,
    partition: u32,
    source: &RedisServer,
    epoch: u64,
    scope: Option<SlotRanges>,
    dir: &Path,
) -> SnapshotMarker {
    let file = dir.join(format!("snapshot-{partition}-{epoch}.rdb"));
    let report = ferry::cli::fetch::fetch(&RedisUrl::parse(&source.url()).unwrap(), &file)
        .await
        .unwrap();
    let rdb = Bytes::from(std::fs::read(&file).unwrap());
    let part = PartitionId(partition);
    let state = |phase| SnapshotState { epoch, phase };
    wal.set_snapshot_state(part, state(SnapshotPhase::Writing))
        .await
        .unwrap();
    let mut chunks = 0;
    for (seq, chunk) in rdb.chunks(64 << 10).enumerate() {
        wal.put_snapshot_chunk(part, epoch, seq as u64, rdb.slice_ref(chunk))
            .await
            .unwrap();
        chunks += 1;
    }
    wal.set_snapshot_state(part, state(SnapshotPhase::Complete))
        .await
        .unwrap();
    SnapshotMarker {
        epoch,
        rdb_bytes: rdb.len() as u64,
        chunks,
        replid: report.replid.to_string(),
        offset: report.offset.0,
        scope,
        tenures: Vec::new(),
        handoffs: Vec::new(),
    }
}

/// Stores a snapshot of `source` and appends its marker; returns its id.
async fn append_snapshot(
    wal: &Wal,
    partition: u32,
    source: &RedisServer,
    epoch: u64,
    scope: Option<SlotRanges>,
    dir: &Path,
) -> LogId {
    let marker = store_snapshot(wal, partition, source, epoch, scope, dir).await;
    append(wal, partition, &[Record::Snapshot(marker)]).await
}

struct Running {
    status: Arc<ApplyStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ApplyError>>,
}

fn start(cfg: ApplyConfig, wal: &Wal) -> Running {
    let status = Arc::new(ApplyStatus::new(cfg.partition_id()));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(cfg, wal.clone(), Arc::clone(&status), shutdown.clone()));
    Running {
        status,
        shutdown,
        task,
    }
}

impl Running {
    async fn wait_applied(&self, last: LogId) {
        let deadline = Instant::now() + APPLY_WAIT;
        loop {
            let report = self.status.snapshot();
            if report.applied >= last {
                return;
            }
            assert!(!self.task.is_finished(), "the applier ended: {report:?}");
            assert!(
                Instant::now() < deadline,
                "not applied up to {last} in {APPLY_WAIT:?}: {report:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the applier stops on shutdown")
            .expect("applier task");
        if let Err(error) = result {
            panic!("the applier failed: {error}");
        }
    }

    /// Waits for the applier to end by itself; returns its error.
    async fn failed(self) -> ApplyError {
        let result = tokio::time::timeout(APPLY_WAIT, self.task)
            .await
            .expect("the applier ends")
            .expect("applier task");
        result.expect_err("the applier fails")
    }
}

/// Runs one applier of `partition` until `last` is applied, then stops it.
async fn apply_until(wal: &Wal, target: &RedisServer, partition: u32, last: LogId) {
    let applier = start(
        apply_config(&target.url(), partition, ExistingData::Refuse),
        wal,
    );
    applier.wait_applied(last).await;
    applier.stop().await;
}

fn merged(parts: &[&BTreeMap<String, String>]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for part in parts {
        out.extend(part.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    out
}

/// Two shards' snapshots, loaded one after the other into one target by
/// the two partitions' appliers (existing-data = refuse, the default):
/// the second load neither is refused because of the first shard's keys
/// nor deletes them. Shard A's RDB also holds a key of one of B's slots (a
/// slot it was importing): it is loaded like every key of the RDB, and B's
/// earlier load does not stand in its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_partitions_with_disjoint_scopes_share_a_target() {
    let source_a = RedisServer::start(&[]);
    let source_b = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let importing = keys_in(&scope_b(), "importing", 1);
    let mut a = pairs(&keys_in(&scope_a(), "a", 2000), "from-a");
    a.extend(pairs(&importing, "imported-by-a"));
    let b = pairs(&keys_in(&scope_b(), "b", 2000), "from-b");
    set_all(&source_a, &a).await;
    set_all(&source_b, &b).await;
    let marker_b = append_snapshot(&wal, 1, &source_b, 1, Some(scope_b()), work.path()).await;
    let marker_a = append_snapshot(&wal, 0, &source_a, 1, Some(scope_a()), work.path()).await;
    let on_top_a = append(&wal, 0, &[single(&["SET", "a:0", "written-after"])]).await;

    apply_until(&wal, &target, 1, marker_b).await;
    let after_b = data(&target).await;
    assert_eq!(after_b, b.iter().cloned().collect());
    apply_until(&wal, &target, 0, on_top_a).await;
    let mut expected: BTreeMap<String, String> =
        merged(&[&a.iter().cloned().collect(), &b.iter().cloned().collect()]);
    expected.insert("a:0".into(), "written-after".into());
    let got = data(&target).await;
    assert_eq!(got.len(), expected.len(), "keys on the target");
    assert_eq!(got, expected);
    assert_eq!(
        target.cmd(&["GET", &importing[0]]),
        "imported-by-a",
        "a key of the RDB outside its scope is loaded"
    );
    // Both partitions' checkpoints, and their scopes, are there.
    for (partition, at) in [(0, on_top_a), (1, marker_b)] {
        let value = target.cmd(&["GET", &checkpoint_key(partition)]);
        assert!(value.contains(&format!("applied={at} ")), "{value}");
    }
    let _ = marker_a;
    wal.close().await.unwrap();
}

/// A new snapshot of one shard (a full resync of that partition) replaces
/// the keys of its slots only: keys of those slots the new RDB lacks are
/// gone (also ones written into them behind ferry's back), the other
/// partition's keys and ferry's own keys stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_one_partition_replaces_only_its_slots() {
    let source_a = RedisServer::start(&[]);
    let source_b = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let a_keys = keys_in(&scope_a(), "a", 3000);
    let a = pairs(&a_keys, "v1");
    let b = pairs(&keys_in(&scope_b(), "b", 3000), "from-b");
    set_all(&source_a, &a).await;
    set_all(&source_b, &b).await;
    let first_a = append_snapshot(&wal, 0, &source_a, 1, Some(scope_a()), work.path()).await;
    let first_b = append_snapshot(&wal, 1, &source_b, 1, Some(scope_b()), work.path()).await;
    apply_until(&wal, &target, 0, first_a).await;
    apply_until(&wal, &target, 1, first_b).await;

    // Shard A changes: half its keys deleted, new ones, new values.
    let mut client = connect(&source_a).await;
    for key in &a_keys[..1500] {
        client.call(["DEL", key.as_str()]).await.unwrap();
    }
    let a2 = merged(&[
        &pairs(&a_keys[1500..], "v2").into_iter().collect(),
        &pairs(&keys_in(&scope_a(), "new-a", 500), "v2")
            .into_iter()
            .collect(),
    ]);
    set_all(&source_a, &a2.clone().into_iter().collect::<Vec<_>>()).await;
    // Written on the target behind ferry's back, in A's slots: not in A's
    // new RDB, so gone after the reload; a `__ferry*` key stays.
    target.cmd(&["SET", &keys_in(&scope_a(), "stray", 1)[0], "x"]);
    target.cmd(&["SET", "__ferry:other:key", "kept"]);
    let second_a = append_snapshot(&wal, 0, &source_a, 2, Some(scope_a()), work.path()).await;
    apply_until(&wal, &target, 0, second_a).await;

    let expected = merged(&[&a2, &b.iter().cloned().collect()]);
    let got = data(&target).await;
    assert_eq!(got.len(), expected.len(), "keys on the target");
    assert_eq!(got, expected);
    assert_eq!(target.cmd(&["GET", "__ferry:other:key"]), "kept");
    let value = target.cmd(&["GET", &checkpoint_key(1)]);
    assert!(value.contains(&format!("applied={first_b} ")), "{value}");
    wal.close().await.unwrap();
}

/// existing-data = refuse on a partition's first load counts only the keys
/// of its slots: keys of other slots (another shard's, loaded by another
/// partition or there before) do not refuse it and are kept; a key of its
/// slots refuses it, naming the slots, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_counts_only_the_keys_of_the_partitions_slots() {
    let source_a = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let a = pairs(&keys_in(&scope_a(), "a", 500), "from-a");
    set_all(&source_a, &a).await;
    let marker = append_snapshot(&wal, 0, &source_a, 1, Some(scope_a()), work.path()).await;

    // A key of A's slots: refused, nothing written.
    let squatter = keys_in(&scope_a(), "there-before", 1).remove(0);
    let others = pairs(&keys_in(&scope_b(), "other", 300), "other");
    set_all(&target, &others).await;
    target.cmd(&["SET", &squatter, "there-before"]);
    let refusing = start(apply_config(&target.url(), 0, ExistingData::Refuse), &wal);
    let error = refusing.failed().await.to_string();
    assert!(
        error.contains("db 0: 1 keys") && error.contains("0-8191"),
        "{error}"
    );
    assert_eq!(target.cmd(&["GET", &checkpoint_key(0)]), "");
    assert_eq!(target.cmd(&["DBSIZE"]), "301");

    // Without it, the 300 keys of B's slots do not refuse the load.
    target.cmd(&["DEL", &squatter]);
    apply_until(&wal, &target, 0, marker).await;
    let expected = merged(&[
        &a.iter().cloned().collect(),
        &others.iter().cloned().collect(),
    ]);
    assert_eq!(data(&target).await, expected);
    wal.close().await.unwrap();
}

#[test]
#[ignore = "helper process of scoped_deletion_survives_sigkill"]
fn scoped_apply_child() {
    let Ok(wal_dir) = std::env::var(WAL_DIR_ENV) else {
        panic!("scoped_apply_child runs only as a helper process");
    };
    let target = std::env::var(TARGET_ENV).unwrap();
    let partition: u32 = std::env::var(PARTITION_ENV).unwrap().parse().unwrap();
    let until: Option<u64> = std::env::var(UNTIL_ENV).ok().map(|v| v.parse().unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let wal = Wal::open(wal_config(Path::new(&wal_dir))).await.unwrap();
        let applier = start(apply_config(&target, partition, ExistingData::Flush), &wal);
        match until {
            Some(last) => {
                applier.wait_applied(LogId(last)).await;
                applier.stop().await;
                wal.close().await.unwrap();
            }
            None => {
                let result = applier.task.await.unwrap();
                panic!("the applier ended on its own: {result:?}");
            }
        }
    });
}

/// A child applier, killed when dropped (a failing test must not leave
/// one running against a port a later test's server may get).
struct ChildApplier(Child);

impl ChildApplier {
    fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for ChildApplier {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(
    wal_dir: &Path,
    target: &RedisServer,
    partition: u32,
    until: Option<LogId>,
) -> ChildApplier {
    let mut child = Process::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "scoped_apply_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WAL_DIR_ENV, wal_dir)
        .env(TARGET_ENV, target.url())
        .env(PARTITION_ENV, partition.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(until) = until {
        child.env(UNTIL_ENV, until.0.to_string());
    }
    ChildApplier(child.spawn().unwrap())
}

/// The number of `key:<i>` keys (`DEBUG POPULATE n`) whose slot is in
/// `scope`.
fn populated_in(scope: &SlotRanges, n: usize) -> usize {
    (0..n)
        .filter(|i| scope.contains(key_hash_slot(format!("key:{i}").as_bytes())))
        .count()
}

/// SIGKILL of the applier while it deletes its slots' keys before a load
/// (the target holds 300k keys, half of them another partition's): every
/// restart finds `loading=M` and deletes again, and the end state is the
/// other partition's keys untouched plus exactly the new snapshot.
#[test]
fn scoped_deletion_survives_sigkill() {
    const POPULATED: usize = 300_000;
    let source_a = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal_dir = work.path().join("wal");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let a = pairs(&keys_in(&scope_a(), "a", 1000), "from-a");
    let last = runtime.block_on(async {
        set_all(&source_a, &a).await;
        let wal = Wal::open(wal_config(&wal_dir)).await.unwrap();
        let marker = append_snapshot(&wal, 0, &source_a, 1, Some(scope_a()), work.path()).await;
        let last = append(&wal, 0, &[single(&["SET", "a:after", "1"])]).await;
        wal.close().await.unwrap();
        assert!(last > marker);
        last
    });
    // The target as two shards left it: `key:*` in every slot.
    target.cmd(&["DEBUG", "POPULATE", &POPULATED.to_string(), "key", "8"]);
    let others = populated_in(&scope_b(), POPULATED);
    let mut kills_mid_deletion = 0;
    let mut before = POPULATED;
    for round in 0..3 {
        let mut child = spawn_child(&wal_dir, &target, 0, None);
        // Killed once this run's deletion is under way (the checkpoint says
        // loading and more keys of A's slots are gone than before it).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let value = target.cmd(&["GET", &checkpoint_key(0)]);
            let size: usize = target.cmd(&["DBSIZE"]).parse().unwrap();
            if value.contains("loading=") && size + 3000 < before {
                before = size;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no deletion seen: {value} {size}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill();
        let value = target.cmd(&["GET", &checkpoint_key(0)]);
        let size: usize = target.cmd(&["DBSIZE"]).parse().unwrap();
        println!("round {round}: killed at {value:?}, dbsize {size}");
        if value.contains("loading=") && size > others + 2 {
            kills_mid_deletion += 1;
        }
    }
    assert!(kills_mid_deletion >= 1, "no kill landed mid-deletion");
    let mut child = spawn_child(&wal_dir, &target, 0, Some(last));
    let status = child.wait();
    assert!(status.success(), "the last run failed: {status}");

    let got = runtime.block_on(data(&target));
    let mut expected: BTreeMap<String, String> = a.iter().cloned().collect();
    expected.insert("a:after".into(), "1".into());
    let populated: Vec<_> = got.keys().filter(|k| k.starts_with("key:")).collect();
    assert_eq!(populated.len(), others, "the other partition's keys");
    assert!(populated
        .iter()
        .all(|k| scope_b().contains(key_hash_slot(k.as_bytes()))));
    let ours: BTreeMap<String, String> = got
        .into_iter()
        .filter(|(k, _)| !k.starts_with("key:"))
        .collect();
    assert_eq!(ours, expected);
    let value = target.cmd(&["GET", &checkpoint_key(0)]);
    assert!(value.contains(&format!("applied={last} ")), "{value}");
}

fn transaction(commands: &[&[&str]]) -> Record {
    Record::Write(WriteRecord {
        db: 0,
        commands: commands.iter().map(|c| Command::from_parts(*c)).collect(),
        transaction: true,
        streamed: vec![],
        tenure: None,
    })
}

/// A `FLUSHALL` (or `FLUSHDB`) in a scoped partition's stream empties only
/// that shard at the source: on the target it deletes the keys of the
/// partition's slots, and keeps the other partition's keys, every
/// checkpoint and ferry's other keys. Commands after it in the same entry
/// apply after the deletion; writes before it in the entry are erased by
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushall_in_a_scoped_partition_deletes_only_its_slots() {
    let source_a = RedisServer::start(&[]);
    let source_b = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let a = pairs(&keys_in(&scope_a(), "a", 2000), "from-a");
    let b = pairs(&keys_in(&scope_b(), "b", 2000), "from-b");
    set_all(&source_a, &a).await;
    set_all(&source_b, &b).await;
    let marker_a = append_snapshot(&wal, 0, &source_a, 1, Some(scope_a()), work.path()).await;
    let marker_b = append_snapshot(&wal, 1, &source_b, 1, Some(scope_b()), work.path()).await;
    apply_until(&wal, &target, 0, marker_a).await;
    apply_until(&wal, &target, 1, marker_b).await;
    target.cmd(&["SET", "__ferry:other:key", "kept"]);

    let k = keys_in(&scope_a(), "after", 4);
    let stream_a = [
        single(&["SET", &k[0], "before-flush"]),
        single(&["FLUSHALL"]),
        single(&["SET", &k[1], "after-flush"]),
        transaction(&[
            &["SET", &k[2], "erased"],
            &["FLUSHDB"],
            &["SET", &k[3], "after-flushdb"],
            &["INCR", &k[1]],
        ]),
    ];
    let stream_b = [single(&["SET", "b:0", "still-b"])];
    let last_a = append(&wal, 0, &stream_a).await;
    let last_b = append(&wal, 1, &stream_b).await;
    let one = start(apply_config(&target.url(), 0, ExistingData::Refuse), &wal);
    let other = start(apply_config(&target.url(), 1, ExistingData::Refuse), &wal);
    one.wait_applied(last_a).await;
    other.wait_applied(last_b).await;
    one.stop().await;
    other.stop().await;

    let mut expected: BTreeMap<String, String> = b.iter().cloned().collect();
    expected.insert("b:0".into(), "still-b".into());
    expected.insert(k[3].clone(), "after-flushdb".into());
    expected.insert(k[1].clone(), "1".into());
    let got = data(&target).await;
    assert_eq!(got.len(), expected.len(), "keys on the target");
    assert_eq!(got, expected);
    assert_eq!(target.cmd(&["GET", "__ferry:other:key"]), "kept");
    for (partition, at) in [(0, last_a), (1, last_b)] {
        let value = target.cmd(&["GET", &checkpoint_key(partition)]);
        assert!(value.contains(&format!("applied={at} ")), "{value}");
    }
    wal.close().await.unwrap();
}

/// SIGKILL of the applier while a `FLUSHALL` of its shard deletes the
/// partition's slots (150k of the target's 300k keys): each restart deletes
/// again and then applies the rest of the entry once. The `INCR` after the
/// flush in the same transaction is of a key outside the scope (a slot the
/// shard imports), which the deletion does not reset: it ends at 1, not at
/// the number of runs.
#[test]
fn a_scoped_flush_survives_sigkill_mid_deletion_exactly_once() {
    const POPULATED: usize = 300_000;
    let source_a = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal_dir = work.path().join("wal");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let counter = keys_in(&scope_b(), "counter", 1).remove(0);
    let erased = keys_in(&scope_a(), "erased", 1).remove(0);
    let marker = runtime.block_on(async {
        set_all(&source_a, &pairs(&keys_in(&scope_a(), "a", 100), "from-a")).await;
        let wal = Wal::open(wal_config(&wal_dir)).await.unwrap();
        let marker = append_snapshot(&wal, 0, &source_a, 1, Some(scope_a()), work.path()).await;
        wal.close().await.unwrap();
        marker
    });
    let mut child = spawn_child(&wal_dir, &target, 0, Some(marker));
    assert!(child.wait().success());
    // Keys of every slot, as if written by this partition (its slots) and
    // another one (the others), then the stream with the flush.
    target.cmd(&["DEBUG", "POPULATE", &POPULATED.to_string(), "key", "8"]);
    let others = populated_in(&scope_b(), POPULATED);
    let last = runtime.block_on(async {
        let wal = Wal::open(wal_config(&wal_dir)).await.unwrap();
        let last = append(
            &wal,
            0,
            &[
                single(&["SET", &erased, "1"]),
                transaction(&[&["FLUSHALL"], &["INCR", &counter]]),
                single(&["SET", "a:after", "1"]),
            ],
        )
        .await;
        wal.close().await.unwrap();
        last
    });
    let flush_entry = LogId(last.0 - 1);
    let mut kills_mid_deletion = 0;
    let mut before: usize = target.cmd(&["DBSIZE"]).parse().unwrap();
    for round in 0..3 {
        let mut child = spawn_child(&wal_dir, &target, 0, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let size: usize = target.cmd(&["DBSIZE"]).parse().unwrap();
            if size + 3000 < before {
                before = size;
                break;
            }
            assert!(Instant::now() < deadline, "no deletion seen: {size}");
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill();
        let value = target.cmd(&["GET", &checkpoint_key(0)]);
        let size: usize = target.cmd(&["DBSIZE"]).parse().unwrap();
        println!("round {round}: killed at {value:?}, dbsize {size}");
        if value.contains(&format!("applied={} ", flush_entry.prev())) && size > others + 3 {
            kills_mid_deletion += 1;
        }
    }
    assert!(kills_mid_deletion >= 1, "no kill landed mid-deletion");
    let mut child = spawn_child(&wal_dir, &target, 0, Some(last));
    assert!(child.wait().success());

    let got = runtime.block_on(data(&target));
    let populated: Vec<_> = got.keys().filter(|k| k.starts_with("key:")).collect();
    assert_eq!(populated.len(), others, "the other partition's keys");
    let ours: BTreeMap<String, String> = got
        .into_iter()
        .filter(|(k, _)| !k.starts_with("key:"))
        .collect();
    let expected: BTreeMap<String, String> = [
        (counter.clone(), "1".to_string()),
        ("a:after".to_string(), "1".to_string()),
    ]
    .into_iter()
    .collect();
    assert_eq!(ours, expected, "exactly once after the flush");
    let value = target.cmd(&["GET", &checkpoint_key(0)]);
    assert!(value.contains(&format!("applied={last} ")), "{value}");
}

/// Figures: `SCAN` + slot + `UNLINK` of half of a 1M-key target, and a
/// count of it (`cargo test --test scoped_apply -- --ignored
/// scope_deletion_figures --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures, run by hand"]
async fn scope_deletion_figures() {
    const KEYS: usize = 1_000_000;
    let target = RedisServer::start(&[]);
    target.cmd(&["DEBUG", "POPULATE", &KEYS.to_string(), "key", "16"]);
    let mut client = connect(&target).await;
    let conn = ferry::apply::scope::ScopeConn {
        reply_timeout: Duration::from_secs(30),
        unlink: true,
    };
    let everything = ferry::apply::OwnedKeyspace::all();
    let started = Instant::now();
    let counted = ferry::apply::scope::count_scope(&mut client, 0, &scope_a(), &everything, conn)
        .await
        .unwrap();
    let count_time = started.elapsed();
    let started = Instant::now();
    let done = ferry::apply::scope::delete_scope(&mut client, 0, &scope_a(), &everything, conn)
        .await
        .unwrap();
    let delete_time = started.elapsed();
    assert_eq!(done.deleted, counted);
    assert_eq!(
        target.cmd(&["DBSIZE"]).parse::<u64>().unwrap(),
        KEYS as u64 - counted
    );
    println!(
        "count: {KEYS} keys scanned, {counted} in scope, {:.2}s ({:.0} keys/s scanned)",
        count_time.as_secs_f64(),
        KEYS as f64 / count_time.as_secs_f64()
    );
    println!(
        "delete: {} scanned, {} deleted, {:.2}s ({:.0} keys/s scanned)",
        done.scanned,
        done.deleted,
        delete_time.as_secs_f64(),
        done.scanned as f64 / delete_time.as_secs_f64()
    );
}

/// A partition whose next snapshot has no scope (its source is a
/// standalone server again) owns the whole keyspace again: the load
/// empties the owned dbs as without scopes, drops the recorded scope, and
/// a later `FLUSHALL` is a flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unscoped_marker_after_a_scoped_one_owns_everything_again() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let a = pairs(&keys_in(&scope_a(), "a", 200), "from-a");
    set_all(&source, &a).await;
    let scoped = append_snapshot(&wal, 0, &source, 1, Some(scope_a()), work.path()).await;
    apply_until(&wal, &target, 0, scoped).await;
    let scope_key = format!("__ferry:scope:{DRAINER}:0");
    assert_eq!(target.cmd(&["GET", &scope_key]), "v1 0-8191");
    let other = keys_in(&scope_b(), "other", 1).remove(0);
    target.cmd(&["SET", &other, "not-in-a"]);

    let unscoped = append_snapshot(&wal, 0, &source, 2, None, work.path()).await;
    apply_until(&wal, &target, 0, unscoped).await;
    assert_eq!(target.cmd(&["EXISTS", &scope_key]), "0");
    assert_eq!(
        target.cmd(&["EXISTS", &other]),
        "0",
        "the load emptied db 0"
    );
    assert_eq!(data(&target).await, a.iter().cloned().collect());

    target.cmd(&["SET", &other, "again"]);
    let last = append(&wal, 0, &[single(&["FLUSHALL"])]).await;
    apply_until(&wal, &target, 0, last).await;
    assert_eq!(data(&target).await, BTreeMap::new());
    let value = target.cmd(&["GET", &checkpoint_key(0)]);
    assert!(value.contains(&format!("applied={last} ")), "{value}");
    wal.close().await.unwrap();
}

/// A scoped load with a key filter deletes only the keys the filter owns
/// in its slots: another sync's keys in the same slots stay, at the first
/// load (`existing-data = "flush"`) and at a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_load_with_a_key_filter_keeps_other_keys_of_its_slots() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let ours = pairs(&keys_in(&scope_a(), "mine:", 500), "v1");
    set_all(&source, &ours).await;
    // Another sync's keys, in the same slots, on the target.
    let theirs = pairs(&keys_in(&scope_a(), "theirs:", 300), "other-sync");
    set_all(&target, &theirs).await;
    // One of ours already there, stale: the flush deletes it.
    let stale = keys_in(&scope_a(), "mine:stale", 1);
    target.cmd(&["SET", &stale[0], "stale"]);
    let cfg = |existing| {
        let mut cfg = apply_config(&target.url(), 0, existing);
        cfg.filter.key_prefix = Some(vec!["mine:".to_string()]);
        cfg
    };
    let first = append_snapshot(&wal, 0, &source, 1, Some(scope_a()), work.path()).await;
    let applier = start(cfg(ExistingData::Flush), &wal);
    applier.wait_applied(first).await;
    applier.stop().await;
    let expected = merged(&[
        &ours.iter().cloned().collect(),
        &theirs.iter().cloned().collect(),
    ]);
    assert_eq!(data(&target).await, expected, "after the first load");

    // A reload (new marker) of the same scope: the same rule.
    set_all(&source, &pairs(&keys_in(&scope_a(), "mine:", 500), "v2")).await;
    let second = append_snapshot(&wal, 0, &source, 2, Some(scope_a()), work.path()).await;
    let applier = start(cfg(ExistingData::Refuse), &wal);
    applier.wait_applied(second).await;
    applier.stop().await;
    let expected = merged(&[
        &pairs(&keys_in(&scope_a(), "mine:", 500), "v2")
            .into_iter()
            .collect(),
        &theirs.iter().cloned().collect(),
    ]);
    assert_eq!(data(&target).await, expected, "after the reload");
    wal.close().await.unwrap();
}
