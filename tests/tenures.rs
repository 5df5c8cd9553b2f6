//! Slot tenures of a Redis Cluster source, applied by the standalone-target
//! applier (docs/cluster.md, rules 4 to 6), against real redis-servers.
//!
//! Two partitions of one drainer, P0 and P1 (one per source shard), apply
//! into one target. Their WALs are written here the way the listener writes
//! them for a resharding: snapshot markers with slot `tenures` (and
//! `handoffs`), writes tagged with their slot tenure, and `SlotHandoff`
//! records. A slot `s` of P0 moves to P1 (generation 1): P1's entries of
//! `s` (and a load of P1's snapshot naming `s`) must wait until the owner
//! map names P1, which P0's handoff does, and an `INCR` counter of `s` must
//! end exact whatever order the appliers run in and wherever they are
//! stopped.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::RedisServer;
use ferry::apply::checkpoint::Checkpoint;
use ferry::apply::{
    run, ApplyConfig, ApplyError, ApplyReport, ApplyStatus, ExistingData, SyncState,
};
use ferry::position::{LogId, PartitionId, ReplOffset};
use ferry::record::{Record, SlotHandoff, SlotTenure, SlotVoid, SnapshotMarker, WriteRecord};
use ferry::redis::client::Client;
use ferry::redis::cluster::SlotRanges;
use ferry::redis::command::{key_hash_slot, Command};
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;
use ferry::wal::{NewEntry, SnapshotPhase, SnapshotState, SourcePosition, Wal, WalConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DRAINER: &str = "tenures";
const OWNER_MAP: &str = "__ferry:slots:tenures";
const APPLY_WAIT: Duration = Duration::from_secs(120);

/// The two shards' slots at the start.
fn range_0() -> SlotRanges {
    SlotRanges::from_ranges([(0, 8191)])
}

fn range_1() -> SlotRanges {
    SlotRanges::from_ranges([(8192, 16383)])
}

/// A hash tag whose slot is P0's at the start: the slot that moves.
fn moving_tag() -> String {
    (0..)
        .map(|i| format!("m{i}"))
        .find(|tag| range_0().contains(key_hash_slot(tag.as_bytes())))
        .unwrap()
}

/// The moving slot and keys of it.
struct Moving {
    slot: u16,
    counter: String,
    moved: String,
    stale: String,
}

fn moving() -> Moving {
    let tag = moving_tag();
    Moving {
        slot: key_hash_slot(tag.as_bytes()),
        counter: format!("{{{tag}}}counter"),
        moved: format!("{{{tag}}}moved"),
        stale: format!("{{{tag}}}stale"),
    }
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

fn apply_config(target: &str, partition: u32) -> ApplyConfig {
    ApplyConfig {
        drainer_id: DRAINER.to_string(),
        partition,
        target: target.into(),
        batch_max_entries: 16,
        retry_backoff_min: "20ms".parse().unwrap(),
        retry_backoff_max: "200ms".parse().unwrap(),
        reply_timeout: "20s".parse().unwrap(),
        existing_data: ExistingData::Flush,
        ..ApplyConfig::default()
    }
}

fn write_of(command: Command, tenure: Option<SlotTenure>) -> Record {
    Record::Write(WriteRecord {
        db: 0,
        commands: vec![command],
        transaction: false,
        streamed: vec![],
        tenure,
    })
}

fn untagged(args: &[&str]) -> Record {
    write_of(Command::from_parts(args), None)
}

/// A write of slot `slot`'s tenure `gen` (its keys must be of that slot).
fn tagged(args: &[&str], slot: u16, gen: u64) -> Record {
    for key in &args[1..2] {
        assert_eq!(key_hash_slot(key.as_bytes()), slot, "{key}");
    }
    write_of(Command::from_parts(args), Some(SlotTenure { slot, gen }))
}

fn handoff(slot: u16, to: u32, gen: u64) -> Record {
    Record::Handoff(SlotHandoff { slot, to, gen })
}

fn incrs(key: &str, n: usize, slot: u16, gen: u64) -> Vec<Record> {
    (0..n).map(|_| tagged(&["INCR", key], slot, gen)).collect()
}

fn entry(record: &Record, offset: u64) -> NewEntry {
    NewEntry::new(
        SourcePosition {
            replid: "c".repeat(40).into(),
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
    let entries = records
        .iter()
        .enumerate()
        .map(|(j, r)| entry(r, first + j as u64 + 1))
        .collect();
    wal.append(partition, entries).await.unwrap().last
}

async fn connect(server: &RedisServer) -> Client {
    Client::connect(&RedisUrl::parse(&server.url()).unwrap())
        .await
        .unwrap()
}

/// `n` keys `<prefix>:<i>` whose hash slot is in `scope`.
fn keys_in(scope: &SlotRanges, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .filter(|key| scope.contains(key_hash_slot(key.as_bytes())))
        .take(n)
        .collect()
}

/// Every key of db 0 with its string value, `__ferry*` keys aside.
async fn data(server: &RedisServer) -> BTreeMap<String, String> {
    let mut client = connect(server).await;
    let Frame::Array(keys) = client.call(["KEYS", "*"]).await.unwrap() else {
        panic!("KEYS")
    };
    let mut out = BTreeMap::new();
    for key in keys {
        let key = String::from_utf8_lossy(key.as_bytes().unwrap()).into_owned();
        if key.starts_with("__ferry") {
            continue;
        }
        let value = client.call(["GET", key.as_str()]).await.unwrap();
        out.insert(
            key,
            String::from_utf8_lossy(value.as_bytes().unwrap()).into_owned(),
        );
    }
    out
}

/// The `RESTORE` payload of `key = value`, as `DUMP` on `server` gives it.
async fn dump_payload(server: &RedisServer, key: &str, value: &str) -> Bytes {
    let mut client = connect(server).await;
    client.call(["SET", key, value]).await.unwrap();
    let payload = client.call(["DUMP", key]).await.unwrap();
    client.call(["DEL", key]).await.unwrap();
    payload.as_bytes().cloned().expect("a DUMP payload")
}

/// `RESTORE-ASKING key 0 payload` of slot `slot`'s tenure `gen`: a key
/// moved into the shard by `MIGRATE`.
fn restore_asking(key: &str, payload: Bytes, slot: u16, gen: u64) -> Record {
    let command = Command::new(vec![
        Bytes::from_static(b"RESTORE-ASKING"),
        Bytes::from(key.to_string()),
        Bytes::from_static(b"0"),
        payload,
    ]);
    write_of(command, Some(SlotTenure { slot, gen }))
}

/// What a cluster source's marker says about slots.
struct Slots {
    scope: SlotRanges,
    tenures: Vec<(SlotRanges, u64)>,
    handoffs: Vec<SlotHandoff>,
}

/// Stores an RDB of `source` as `epoch` of `partition` and appends its
/// marker (with `slots`); returns the marker's id.
async fn append_snapshot(
    wal: &Wal,
    partition: u32,
    source: &RedisServer,
    epoch: u64,
    slots: Slots,
    dir: &Path,
) -> LogId {
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
    let marker = SnapshotMarker {
        epoch,
        rdb_bytes: rdb.len() as u64,
        chunks,
        replid: report.replid.to_string(),
        offset: report.offset.0,
        scope: Some(slots.scope),
        tenures: slots.tenures,
        handoffs: slots.handoffs,
    };
    append(wal, partition, &[Record::Snapshot(marker)]).await
}

/// A marker of a shard's first snapshot: its range, tenure 0.
async fn first_marker(
    wal: &Wal,
    partition: u32,
    source: &RedisServer,
    range: SlotRanges,
    dir: &Path,
) -> LogId {
    append_snapshot(
        wal,
        partition,
        source,
        1,
        Slots {
            scope: range.clone(),
            tenures: vec![(range, 0)],
            handoffs: vec![],
        },
        dir,
    )
    .await
}

struct Running {
    status: Arc<ApplyStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ApplyError>>,
}

fn start(target: &RedisServer, wal: &Wal, partition: u32) -> Running {
    let cfg = apply_config(&target.url(), partition);
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
    async fn wait(&self, what: &str, mut done: impl FnMut(&ApplyReport) -> bool) -> ApplyReport {
        let deadline = Instant::now() + APPLY_WAIT;
        loop {
            let report = self.status.snapshot();
            if done(&report) {
                return report;
            }
            assert!(!self.task.is_finished(), "the applier ended: {report:?}");
            assert!(Instant::now() < deadline, "{what}: {report:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_applied(&self, last: LogId) -> ApplyReport {
        self.wait(&format!("applied up to {last}"), |r| r.applied >= last)
            .await
    }

    /// Waits until the partition is held for `slot`'s tenure `gen`.
    async fn wait_handoff(&self, slot: u16, gen: u64) -> ApplyReport {
        self.wait("held for a handoff", |r| {
            r.state == SyncState::Handoff
                && r.handoff
                    .as_ref()
                    .is_some_and(|h| h.slot == slot && h.gen == gen)
        })
        .await
    }

    async fn stop(self) -> ApplyReport {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the applier stops on shutdown")
            .expect("applier task");
        if let Err(error) = result {
            panic!("the applier failed: {error}");
        }
        self.status.snapshot()
    }

    /// Ends the applier as a crash would: its task dropped wherever it is,
    /// its connections closed (a `MULTI` without `EXEC` is discarded by
    /// the target, an `EXEC` sent runs).
    async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn applied_at(target: &RedisServer, partition: u32) -> String {
    target.cmd(&["GET", &checkpoint_key(partition)])
}

/// (a) Slot `s` moves P0 → P1. P1's WAL is written and its applier started
/// first: it loads its snapshot, applies its own slots' entries, and holds
/// (HANDOFF, naming `s` and generation 1) at its first entry of `s`; it
/// stops cleanly while held. P0's applier, started later, applies its
/// entries of `s` (the counter, the `SET` and the `DEL` `MIGRATE` wrote)
/// and its handoff; P1 then applies the moved key (`RESTORE-ASKING`, after
/// P0's `DEL`) and its own increments: every value exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_slot_is_applied_in_tenure_order_whatever_applier_runs_first() {
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    let b_keys = keys_in(&range_1(), "b", 3);
    let mut c = connect(&source_1).await;
    for key in &b_keys {
        c.call(["SET", key.as_str(), "from-b"]).await.unwrap();
    }
    let payload = dump_payload(&source_0, &m.moved, "v0").await;

    // P1: snapshot, a write of its own slots, then the moved key and 50
    // increments of s (tenure 1), then another write of its own.
    first_marker(&wal, 1, &source_1, range_1(), work.path()).await;
    let own = append(&wal, 1, &[untagged(&["SET", &b_keys[0], "own"])]).await;
    let mut p1 = vec![restore_asking(&m.moved, payload, m.slot, 1)];
    p1.extend(incrs(&m.counter, 50, m.slot, 1));
    p1.push(untagged(&["SET", &b_keys[1], "after"]));
    let last_1 = append(&wal, 1, &p1).await;

    let held = start(&target, &wal, 1);
    held.wait_applied(own).await;
    let report = held.wait_handoff(m.slot, 1).await;
    assert_eq!(report.applied, own, "nothing of s is applied: {report:?}");
    assert_eq!(target.cmd(&["EXISTS", &m.counter]), "0");
    assert_eq!(target.cmd(&["EXISTS", &m.moved]), "0");
    // Shutdown works while held.
    held.stop().await;

    // P0, written and started only now: 30 increments of s, the key that
    // moves, MIGRATE's DEL, the handoff.
    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    let mut p0 = incrs(&m.counter, 30, m.slot, 0);
    p0.push(tagged(&["SET", &m.moved, "v0"], m.slot, 0));
    p0.push(tagged(&["DEL", &m.moved], m.slot, 0));
    p0.push(handoff(m.slot, 1, 1));
    let last_0 = append(&wal, 0, &p0).await;
    let p1_again = start(&target, &wal, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = p1_again.status.snapshot();
    assert!(report.applied < last_1, "P1 waits for P0: {report:?}");
    let p0_run = start(&target, &wal, 0);
    p0_run.wait_applied(last_0).await;
    p1_again.wait_applied(last_1).await;
    let report = p1_again.stop().await;
    assert!(report.handoff.is_none(), "{report:?}");
    p0_run.stop().await;

    assert_eq!(target.cmd(&["GET", &m.counter]), "80");
    assert_eq!(target.cmd(&["GET", &m.moved]), "v0");
    assert_eq!(target.cmd(&["GET", &b_keys[1]]), "after");
    assert_eq!(target.cmd(&["HGET", OWNER_MAP, &m.slot.to_string()]), "1 1");
    assert!(applied_at(&target, 1).contains(&format!("applied={last_1} ")));
    wal.close().await.unwrap();
}

/// (b) P1's snapshot taken after the migration names `s` at tenure 1 (its
/// RDB holds the counter at 30, P0's count). Its load, started before P0's
/// applier, waits (HANDOFF, naming the marker and `s`) with nothing written
/// until P0's handoff moves the owner map, then loads `s` and P1 increments
/// it. An entry of P0 tagged for `s` in tenure 0 after its handoff (the
/// map has passed that tenure) is held BLOCKED, never applied (rule 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_waits_for_the_owner_and_a_stale_entry_of_a_moved_slot_is_blocked() {
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    let a_key = keys_in(&range_0(), "a", 1).remove(0);

    source_1.cmd(&["SET", &m.counter, "30"]);
    let s = SlotRanges::from_ranges([(m.slot, m.slot)]);
    let mut scope_1 = range_1();
    scope_1.insert_range(m.slot, m.slot);
    let marker_1 = append_snapshot(
        &wal,
        1,
        &source_1,
        1,
        Slots {
            scope: scope_1,
            tenures: vec![(range_1(), 0), (s, 1)],
            handoffs: vec![],
        },
        work.path(),
    )
    .await;
    let last_1 = append(&wal, 1, &incrs(&m.counter, 5, m.slot, 1)).await;
    let p1_run = start(&target, &wal, 1);
    let report = p1_run.wait_handoff(m.slot, 1).await;
    assert_eq!(report.handoff.unwrap().log_id, marker_1, "the load waits");
    assert_eq!(applied_at(&target, 1), "", "nothing written");
    assert_eq!(target.cmd(&["EXISTS", &m.counter]), "0");

    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    let mut p0 = incrs(&m.counter, 30, m.slot, 0);
    p0.push(handoff(m.slot, 1, 1));
    let handed = append(&wal, 0, &p0).await;
    let p0_run = start(&target, &wal, 0);
    p0_run.wait_applied(handed).await;
    p1_run.wait_applied(last_1).await;
    assert_eq!(target.cmd(&["GET", &m.counter]), "35");

    // A stale entry of P0's tenure 0 (the map has passed it: a tenure the
    // listener did not record), then a write of its own slots: held BLOCKED
    // at the first, naming s and its owner, never applied.
    let mut stale = incrs(&m.counter, 7, m.slot, 0);
    stale.push(untagged(&["SET", &a_key, "a2"]));
    append(&wal, 0, &stale).await;
    let report = p0_run
        .wait("blocked at the stale entry", |r| {
            r.state == SyncState::Blocked
        })
        .await;
    assert_eq!(report.applied, handed);
    let blocked = report.blocked.expect("blocked");
    assert!(
        blocked.error.contains(&format!("slot {}", m.slot))
            && blocked.error.contains("partition 1 generation 1"),
        "{}",
        blocked.error
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(target.cmd(&["GET", &m.counter]), "35");
    assert_eq!(target.cmd(&["EXISTS", &a_key]), "0");
    p0_run.stop().await;
    p1_run.stop().await;
    wal.close().await.unwrap();
}

/// (c) A handoff record appended twice (the listener crashed before saving
/// its table) changes nothing: `s` moves P0 → P1 → P0 (generations 1 and
/// 2), and P0's duplicate of its first handoff, applied after the map
/// reached generation 2, does not lower it: P0's entries of generation 2
/// are applied and the counter is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_applied_twice_changes_nothing() {
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    first_marker(&wal, 1, &source_1, range_1(), work.path()).await;
    let mut p0 = incrs(&m.counter, 10, m.slot, 0);
    p0.push(handoff(m.slot, 1, 1));
    let first_0 = append(&wal, 0, &p0).await;
    let mut p1 = incrs(&m.counter, 20, m.slot, 1);
    p1.push(handoff(m.slot, 0, 2));
    let last_1 = append(&wal, 1, &p1).await;
    let p0_run = start(&target, &wal, 0);
    let p1_run = start(&target, &wal, 1);
    p0_run.wait_applied(first_0).await;
    p1_run.wait_applied(last_1).await;
    assert_eq!(target.cmd(&["HGET", OWNER_MAP, &m.slot.to_string()]), "0 2");

    let mut again = vec![handoff(m.slot, 1, 1)];
    again.extend(incrs(&m.counter, 4, m.slot, 2));
    let last_0 = append(&wal, 0, &again).await;
    p0_run.wait_applied(last_0).await;
    assert_eq!(target.cmd(&["HGET", OWNER_MAP, &m.slot.to_string()]), "0 2");
    assert_eq!(target.cmd(&["GET", &m.counter]), "34");
    p0_run.stop().await;
    p1_run.stop().await;
    wal.close().await.unwrap();
}

/// (d) Both appliers ended abruptly (their tasks dropped, connections
/// closed, as by kill -9) again and again, at whatever point they are:
/// while P1 is held for the handoff, between P0's handoff and P1's release,
/// mid-batch. Each restart resumes from the target's checkpoints and the
/// counters end exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliers_ended_abruptly_while_held_resume_exactly_once() {
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    let own_1 = keys_in(&range_1(), "own1", 1).remove(0);
    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    first_marker(&wal, 1, &source_1, range_1(), work.path()).await;
    const N0: usize = 4000;
    const N1: usize = 4000;
    let mut p0 = incrs(&m.counter, N0, m.slot, 0);
    p0.push(handoff(m.slot, 1, 1));
    let last_0 = append(&wal, 0, &p0).await;
    let mut p1: Vec<Record> = (0..200).map(|_| untagged(&["INCR", &own_1])).collect();
    p1.extend(incrs(&m.counter, N1, m.slot, 1));
    let last_1 = append(&wal, 1, &p1).await;

    // P1 alone first: held, then ended while held.
    let p1_run = start(&target, &wal, 1);
    p1_run.wait_handoff(m.slot, 1).await;
    p1_run.abort().await;
    // Both, ended amid P0's increments of s (P1 held).
    let p0_run = start(&target, &wal, 0);
    let p1_run = start(&target, &wal, 1);
    let at = p0_run.wait("P0 amid s", |r| r.applied > LogId(1000)).await;
    p0_run.abort().await;
    p1_run.abort().await;
    println!("P0 ended at {}", at.applied);
    // P0 to its handoff, P1 ended before its next read of the map.
    let p1_run = start(&target, &wal, 1);
    p1_run.wait_handoff(m.slot, 1).await;
    let p0_run = start(&target, &wal, 0);
    p0_run.wait_applied(last_0).await;
    p1_run.abort().await;
    p0_run.abort().await;
    // P1 ended amid its increments of s.
    let p1_run = start(&target, &wal, 1);
    let at = p1_run
        .wait("P1 amid s", |r| r.applied > LogId(201 + 1000))
        .await;
    p1_run.abort().await;
    println!("P1 ended at {}", at.applied);
    // Then both again and again, each time after a while.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..4 {
        let p0_run = start(&target, &wal, 0);
        let p1_run = start(&target, &wal, 1);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(20 + rng % 150)).await;
        let applied = p1_run.status.snapshot().applied;
        p0_run.abort().await;
        p1_run.abort().await;
        println!("round {round}: P1 ended at {applied}");
    }
    let p0_run = start(&target, &wal, 0);
    let p1_run = start(&target, &wal, 1);
    p0_run.wait_applied(last_0).await;
    p1_run.wait_applied(last_1).await;
    p0_run.stop().await;
    p1_run.stop().await;
    assert_eq!(
        target.cmd(&["GET", &m.counter]),
        (N0 + N1).to_string(),
        "exactly once"
    );
    assert_eq!(target.cmd(&["GET", &own_1]), "200");
    wal.close().await.unwrap();
}

/// (e) A new snapshot of P0 taken after it handed `s` over carries the
/// handoff in its `handoffs` (the record itself is before the marker):
/// its load deletes P0's keys of `s` (the target's, not the other slots'
/// of P1) and moves the owner map, which releases P1, held at its
/// `RESTORE-ASKING` of the counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_handoff_deletes_the_slots_keys_and_releases_the_receiver() {
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    let a_key = keys_in(&range_0(), "a", 1).remove(0);
    let b_key = keys_in(&range_1(), "b", 1).remove(0);
    source_1.cmd(&["SET", &b_key, "from-b"]);
    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    let mut p0 = incrs(&m.counter, 12, m.slot, 0);
    p0.push(tagged(&["SET", &m.stale, "of-p0"], m.slot, 0));
    let applied_0 = append(&wal, 0, &p0).await;
    let p0_run = start(&target, &wal, 0);
    p0_run.wait_applied(applied_0).await;
    p0_run.stop().await;
    assert_eq!(target.cmd(&["GET", &m.counter]), "12");

    // P1 receives s: the counter moved (12), then 3 increments.
    let payload = dump_payload(&source_1, &m.counter, "12").await;
    first_marker(&wal, 1, &source_1, range_1(), work.path()).await;
    let mut p1 = vec![restore_asking(&m.counter, payload, m.slot, 1)];
    p1.extend(incrs(&m.counter, 3, m.slot, 1));
    let last_1 = append(&wal, 1, &p1).await;
    let p1_run = start(&target, &wal, 1);
    p1_run.wait_handoff(m.slot, 1).await;

    // P0's new snapshot: s no longer its own (no key of it), the handoff
    // in the marker.
    source_0.cmd(&["SET", &a_key, "a"]);
    let mut scope_0 = SlotRanges::new();
    for (first, last) in [(0u16, m.slot.checked_sub(1)), (m.slot + 1, Some(8191))] {
        if let Some(last) = last.filter(|&l| l >= first) {
            scope_0.insert_range(first, last);
        }
    }
    let reload = append_snapshot(
        &wal,
        0,
        &source_0,
        2,
        Slots {
            scope: scope_0.clone(),
            tenures: vec![(scope_0, 0)],
            handoffs: vec![SlotHandoff {
                slot: m.slot,
                to: 1,
                gen: 1,
            }],
        },
        work.path(),
    )
    .await;
    let p0_run = start(&target, &wal, 0);
    p0_run.wait_applied(reload).await;
    p1_run.wait_applied(last_1).await;
    p0_run.stop().await;
    p1_run.stop().await;
    let got = data(&target).await;
    let expected: BTreeMap<String, String> = [
        (m.counter.clone(), "15".to_string()),
        (a_key.clone(), "a".to_string()),
        (b_key.clone(), "from-b".to_string()),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, expected, "P0's key of s deleted, the others kept");
    assert_eq!(target.cmd(&["HGET", OWNER_MAP, &m.slot.to_string()]), "1 1");
    wal.close().await.unwrap();
}

/// (f) An untagged `RESTORE-ASKING` (a listener that does not tag) still
/// holds its partition BLOCKED, while a tagged one of the open tenure in
/// the other partition is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untagged_restore_asking_holds_blocked_and_a_tagged_one_is_applied() {
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    let b_key = keys_in(&range_1(), "b", 1).remove(0);
    let payload = dump_payload(&source_0, &m.moved, "v").await;
    let b_payload = dump_payload(&source_0, &b_key, "w").await;
    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    first_marker(&wal, 1, &source_1, range_1(), work.path()).await;
    let tagged_last = append(&wal, 0, &[restore_asking(&m.moved, payload, m.slot, 0)]).await;
    let untagged_at = append(
        &wal,
        1,
        &[write_of(
            Command::new(vec![
                Bytes::from_static(b"RESTORE-ASKING"),
                Bytes::from(b_key.clone()),
                Bytes::from_static(b"0"),
                b_payload,
            ]),
            None,
        )],
    )
    .await;
    let p0_run = start(&target, &wal, 0);
    let p1_run = start(&target, &wal, 1);
    p0_run.wait_applied(tagged_last).await;
    assert_eq!(target.cmd(&["GET", &m.moved]), "v");
    let report = p1_run
        .wait("BLOCKED at the untagged RESTORE-ASKING", |r| {
            r.state == SyncState::Blocked
                && r.blocked
                    .as_ref()
                    .is_some_and(|b| b.log_id == untagged_at && b.command == "RESTORE-ASKING")
        })
        .await;
    assert!(
        report.blocked.unwrap().error.contains("resharding"),
        "the reason is named"
    );
    assert_eq!(target.cmd(&["EXISTS", &b_key]), "0");
    p0_run.stop().await;
    p1_run.stop().await;
    wal.close().await.unwrap();
}

/// The slots of `range` without `slot`.
fn without(range: &SlotRanges, slot: u16) -> SlotRanges {
    let mut out = SlotRanges::new();
    for &(first, last) in range.ranges() {
        if slot < first || slot > last {
            out.insert_range(first, last);
            continue;
        }
        if slot > first {
            out.insert_range(first, slot - 1);
        }
        if slot < last {
            out.insert_range(slot + 1, last);
        }
    }
    out
}

/// (g) `s` moved P0 → P1 → P0 while P0's snapshot was taken: its marker
/// hands `s` over (generation 1, the record is before the marker) and
/// imports it back (tenure 2). The load takes the handoff first, which
/// releases P1, whose handoff back opens tenure 2 for the load: no
/// partition waits for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_handing_a_slot_over_and_taking_it_back_does_not_wait_for_itself() {
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    let applied_0 = append(&wal, 0, &incrs(&m.counter, 5, m.slot, 0)).await;
    let p0_run = start(&target, &wal, 0);
    p0_run.wait_applied(applied_0).await;
    p0_run.stop().await;

    let payload = dump_payload(&source_1, &m.counter, "5").await;
    first_marker(&wal, 1, &source_1, range_1(), work.path()).await;
    let mut p1 = vec![restore_asking(&m.counter, payload, m.slot, 1)];
    p1.extend(incrs(&m.counter, 2, m.slot, 1));
    p1.push(tagged(&["DEL", &m.counter], m.slot, 1));
    p1.push(handoff(m.slot, 0, 2));
    let last_1 = append(&wal, 1, &p1).await;
    let p1_run = start(&target, &wal, 1);
    p1_run.wait_handoff(m.slot, 1).await;

    // P0's snapshot: the counter back (7), s at tenure 2, the handoff of
    // generation 1 in the marker.
    source_0.cmd(&["SET", &m.counter, "7"]);
    let reload = append_snapshot(
        &wal,
        0,
        &source_0,
        2,
        Slots {
            scope: range_0(),
            tenures: vec![
                (without(&range_0(), m.slot), 0),
                (SlotRanges::from_ranges([(m.slot, m.slot)]), 2),
            ],
            handoffs: vec![SlotHandoff {
                slot: m.slot,
                to: 1,
                gen: 1,
            }],
        },
        work.path(),
    )
    .await;
    let last_0 = append(&wal, 0, &incrs(&m.counter, 1, m.slot, 2)).await;
    assert!(last_0 > reload);
    let p0_run = start(&target, &wal, 0);
    p1_run.wait_applied(last_1).await;
    p0_run.wait_applied(last_0).await;
    p0_run.stop().await;
    p1_run.stop().await;
    assert_eq!(target.cmd(&["GET", &m.counter]), "8");
    assert_eq!(target.cmd(&["HGET", OWNER_MAP, &m.slot.to_string()]), "0 2");
    wal.close().await.unwrap();
}

/// (h) P0's applier ended abruptly, again and again, while it takes the
/// handoffs of its new snapshot and loads it (an RDB of 200k keys of every
/// slot): every restart ends in the same state. Only the keys of the slots
/// the load takes are written (not those of `s`, handed over, nor P1's
/// slots), P1's keys are never deleted, and P1's counter of `s` is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_with_tenures_ended_abruptly_converges() {
    const POPULATED: usize = 200_000;
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    let b_keys = keys_in(&range_1(), "b", 100);
    for key in &b_keys {
        source_1.cmd(&["SET", key, "from-b"]);
    }
    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    let applied_0 = append(&wal, 0, &incrs(&m.counter, 9, m.slot, 0)).await;
    let p0_run = start(&target, &wal, 0);
    p0_run.wait_applied(applied_0).await;
    p0_run.stop().await;
    first_marker(&wal, 1, &source_1, range_1(), work.path()).await;
    let payload = dump_payload(&source_1, &m.counter, "9").await;
    let mut p1 = vec![restore_asking(&m.counter, payload, m.slot, 1)];
    p1.extend(incrs(&m.counter, 4, m.slot, 1));
    let last_1 = append(&wal, 1, &p1).await;

    // P0's new snapshot: 200k keys of every slot (a shard's RDB holds only
    // its own; the others must not be written), s handed over.
    source_0.cmd(&["DEBUG", "POPULATE", &POPULATED.to_string(), "key", "8"]);
    let scope_0 = without(&range_0(), m.slot);
    let reload = append_snapshot(
        &wal,
        0,
        &source_0,
        2,
        Slots {
            scope: scope_0.clone(),
            tenures: vec![(scope_0.clone(), 0)],
            handoffs: vec![SlotHandoff {
                slot: m.slot,
                to: 1,
                gen: 1,
            }],
        },
        work.path(),
    )
    .await;
    let p1_run = start(&target, &wal, 1);
    let mut ended_loading = 0;
    for round in 0..4 {
        let p0_run = start(&target, &wal, 0);
        let deadline = Instant::now() + APPLY_WAIT;
        loop {
            let value = applied_at(&target, 0);
            let size: usize = target.cmd(&["DBSIZE"]).parse().unwrap();
            if value.contains("loading=") && size > 100 + 1000 * (round + 1) {
                break;
            }
            assert!(Instant::now() < deadline, "no load seen: {value} {size}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        p0_run.abort().await;
        let value = applied_at(&target, 0);
        println!("round {round}: ended at {value:?}");
        ended_loading += u32::from(value.contains("loading="));
    }
    assert!(ended_loading > 0, "no end landed mid-load");
    let p0_run = start(&target, &wal, 0);
    p0_run.wait_applied(reload).await;
    p1_run.wait_applied(last_1).await;
    p0_run.stop().await;
    p1_run.stop().await;

    let got = data(&target).await;
    let populated: Vec<&String> = got.keys().filter(|k| k.starts_with("key:")).collect();
    let expected_populated = (0..POPULATED)
        .filter(|i| scope_0.contains(key_hash_slot(format!("key:{i}").as_bytes())))
        .count();
    assert_eq!(populated.len(), expected_populated, "only the loaded slots");
    assert!(populated
        .iter()
        .all(|k| scope_0.contains(key_hash_slot(k.as_bytes()))));
    assert_eq!(got.get(&m.counter).map(String::as_str), Some("13"));
    assert!(b_keys
        .iter()
        .all(|k| got.get(k).map(String::as_str) == Some("from-b")));
    assert_eq!(got.len(), expected_populated + b_keys.len() + 1);
    wal.close().await.unwrap();
}

/// (i) A `FLUSHALL` of a shard deletes the keys of the slots the owner
/// map gives its partition: P0's flush after it handed `s` over keeps
/// P1's keys of `s` (its last marker's scope still names `s`), and P1's
/// flush deletes them (`s` is not in its marker's scope, but it received
/// it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_of_a_shard_follows_the_owner_map() {
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    let a_key = keys_in(&range_0(), "a", 1).remove(0);
    let b_key = keys_in(&range_1(), "b", 1).remove(0);
    source_0.cmd(&["SET", &a_key, "a"]);
    source_1.cmd(&["SET", &b_key, "b"]);
    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    first_marker(&wal, 1, &source_1, range_1(), work.path()).await;
    let mut p0 = incrs(&m.counter, 3, m.slot, 0);
    p0.push(tagged(&["DEL", &m.counter], m.slot, 0));
    p0.push(handoff(m.slot, 1, 1));
    append(&wal, 0, &p0).await;
    let payload = dump_payload(&source_1, &m.counter, "3").await;
    let mut p1 = vec![restore_asking(&m.counter, payload, m.slot, 1)];
    p1.extend(incrs(&m.counter, 2, m.slot, 1));
    let before_flush_1 = append(&wal, 1, &p1).await;
    let p0_run = start(&target, &wal, 0);
    let p1_run = start(&target, &wal, 1);
    p1_run.wait_applied(before_flush_1).await;
    let last_0 = append(&wal, 0, &[untagged(&["FLUSHALL"])]).await;
    p0_run.wait_applied(last_0).await;
    let got = data(&target).await;
    let expected: BTreeMap<String, String> = [
        (m.counter.clone(), "5".to_string()),
        (b_key.clone(), "b".to_string()),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, expected, "P0's flush kept P1's key of s");

    let last_1 = append(&wal, 1, &[untagged(&["FLUSHALL"])]).await;
    p1_run.wait_applied(last_1).await;
    assert_eq!(data(&target).await, BTreeMap::new(), "P1's flush took s");
    p0_run.stop().await;
    p1_run.stop().await;
    wal.close().await.unwrap();
}

/// (j) An import of `s` into P1 aborted in the source (docs/cluster.md, rule
/// 9): P1's snapshot was taken while it imported `s` (its RDB holds a key
/// of `s` written there through `ASK`, its marker names `s` at tenure 1),
/// then its log has the moved key, that `ASK` write, the `DEL`s of
/// `redis-cli --cluster fix` moving them back, and a `SlotVoid` of (s, 1).
/// P1's load neither waits for `s` nor loads it, its entries of (s, 1) are
/// skipped and counted, never applied, even when its applier is ended
/// abruptly in the middle and started again; P0's log (the owner's), with
/// the key moved back by `RESTORE-ASKING`, gives the target every value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_import_is_voided_in_the_load_and_the_log() {
    let source_0 = RedisServer::start(&[]);
    let source_1 = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let m = moving();
    let b_keys = keys_in(&range_1(), "b", 3);
    let mut c = connect(&source_1).await;
    for key in &b_keys {
        c.call(["SET", key.as_str(), "from-b"]).await.unwrap();
    }
    // The key written on P1's master through ASK while it imported s.
    c.call(["SET", m.stale.as_str(), "asked"]).await.unwrap();
    let payload = dump_payload(&source_0, &m.moved, "v0").await;

    // P1: the marker of its import, then its entries of (s, 1), the fix's
    // DELs, the void, and its own writes around them.
    let scope = {
        let mut scope = range_1();
        scope.insert_range(m.slot, m.slot);
        scope
    };
    let marker_1 = append_snapshot(
        &wal,
        1,
        &source_1,
        1,
        Slots {
            scope,
            tenures: vec![
                (range_1(), 0),
                (SlotRanges::from_ranges([(m.slot, m.slot)]), 1),
            ],
            handoffs: vec![],
        },
        work.path(),
    )
    .await;
    let mut p1 = vec![
        restore_asking(&m.moved, payload.clone(), m.slot, 1),
        untagged(&["SET", &b_keys[0], "own"]),
        tagged(&["DEL", &m.moved], m.slot, 1),
        tagged(&["DEL", &m.stale], m.slot, 1),
    ];
    p1.push(Record::Void(SlotVoid {
        slot: m.slot,
        gen: 1,
    }));
    p1.push(untagged(&["SET", &b_keys[1], "after"]));
    let last_1 = append(&wal, 1, &p1).await;
    assert!(last_1 > marker_1);

    // P0: the owner all along: its counter, the key that moved to P1
    // (MIGRATE's DEL) and back with the ASK write (the fix's
    // RESTORE-ASKINGs).
    let stale_payload = dump_payload(&source_0, &m.stale, "asked").await;
    first_marker(&wal, 0, &source_0, range_0(), work.path()).await;
    let mut p0 = incrs(&m.counter, 30, m.slot, 0);
    p0.push(tagged(&["SET", &m.moved, "v0"], m.slot, 0));
    p0.push(tagged(&["DEL", &m.moved], m.slot, 0));
    p0.push(restore_asking(&m.moved, payload, m.slot, 0));
    p0.push(restore_asking(&m.stale, stale_payload, m.slot, 0));
    p0.extend(incrs(&m.counter, 5, m.slot, 0));
    let last_0 = append(&wal, 0, &p0).await;

    // P1 first, ended abruptly while it runs, then again: its load and its
    // entries never wait for P0.
    let first = start(&target, &wal, 1);
    let first_status = Arc::clone(&first.status);
    tokio::time::sleep(Duration::from_millis(30)).await;
    first.abort().await;
    // Where the first run left the target: the entries of (s, 1) above it
    // are the second run's to skip and count. (The first run's count is in
    // its memory only: an abort between a batch's `EXEC` and its status
    // update loses it, so it is bounded, not exact.)
    let resume = match applied_at(&target, 1) {
        value if value.is_empty() => 0,
        value => Checkpoint::decode(value.as_bytes()).unwrap().applied().0,
    };
    let voided_ids = [last_1.0 - 5, last_1.0 - 3, last_1.0 - 2];
    let left = voided_ids.iter().filter(|&&id| id > resume).count() as u64;
    println!("the first run ended at {resume}; {left} voided entries left");
    let p1_run = start(&target, &wal, 1);
    let report = p1_run.wait_applied(last_1).await;
    assert!(report.handoff.is_none(), "{report:?}");
    assert_eq!(
        report.voided.as_ref().map_or(0, |v| v.entries),
        left,
        "second run from {resume}: {report:?}"
    );
    let counts: Vec<_> = [first_status.snapshot().voided, report.voided]
        .into_iter()
        .flatten()
        .collect();
    assert!(
        counts.iter().all(|v| (v.slot, v.gen) == (m.slot, 1)),
        "{counts:?}"
    );
    let total: u64 = counts.iter().map(|v| v.entries).sum();
    assert!((left..=3).contains(&total), "{counts:?}");
    // Nothing of s from P1: not its RDB's key, not its entries.
    assert_eq!(target.cmd(&["EXISTS", &m.stale]), "0");
    assert_eq!(target.cmd(&["EXISTS", &m.moved]), "0");
    assert_eq!(target.cmd(&["GET", &b_keys[1]]), "after");
    assert_eq!(target.cmd(&["HGET", OWNER_MAP, &m.slot.to_string()]), "");
    let p0_run = start(&target, &wal, 0);
    p0_run.wait_applied(last_0).await;
    p0_run.stop().await;
    p1_run.stop().await;
    assert_eq!(target.cmd(&["GET", &m.counter]), "35");
    assert_eq!(target.cmd(&["GET", &m.moved]), "v0");
    assert_eq!(target.cmd(&["GET", &m.stale]), "asked");
    assert_eq!(target.cmd(&["HGET", OWNER_MAP, &m.slot.to_string()]), "0 0");
    wal.close().await.unwrap();
}
