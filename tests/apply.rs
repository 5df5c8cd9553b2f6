//! The applier against real redis-servers: a WAL (in a temp dir, filled by
//! appending `Record`s) applied to a target, checked against a reference
//! server that received the same commands directly (`DEBUG DIGEST`, with the
//! `__ferry*` keys removed), or against exact counts.
//!
//! The SIGKILL tests re-execute this binary as a child process (the ignored
//! `apply_child` test, selected with `--exact` and configured through
//! environment variables) that runs the applier until it is killed or, in
//! the last round, until everything is applied.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{free_port, redis_cli_bin, redis_server_bin, RedisServer};
use ferry::apply::{run, ApplyConfig, ApplyError, ApplyStatus, ExistingData, SyncState};
use ferry::position::{LogId, PartitionId, ReplOffset};
use ferry::record::{Record, SnapshotMarker, WriteRecord};
use ferry::redis::client::Client;
use ferry::redis::command::Command;
use ferry::redis::url::RedisUrl;
use ferry::wal::{
    DownstreamId, NewEntry, SnapshotPhase, SnapshotState, SourcePosition, Wal, WalConfig,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PARTITION: PartitionId = PartitionId(0);
const DRAINER: &str = "test-drainer";
const CHECKPOINT_KEY: &str = "__ferry:checkpoint:test-drainer:0";
const APPLY_WAIT: Duration = Duration::from_secs(120);

// Child process configuration.
const WAL_DIR_ENV: &str = "FERRY_APPLY_TEST_WAL";
const TARGET_ENV: &str = "FERRY_APPLY_TEST_TARGET";
const BATCH_ENV: &str = "FERRY_APPLY_TEST_BATCH";
const UNTIL_ENV: &str = "FERRY_APPLY_TEST_UNTIL";

fn wal_config(dir: &Path) -> WalConfig {
    WalConfig {
        group_commit_linger: "100us".parse().unwrap(),
        ..WalConfig::with_dir(dir)
    }
}

fn apply_config(target: &str, batch_max_entries: usize) -> ApplyConfig {
    ApplyConfig {
        drainer_id: DRAINER.to_string(),
        target: target.into(),
        batch_max_entries,
        retry_backoff_min: "20ms".parse().unwrap(),
        retry_backoff_max: "200ms".parse().unwrap(),
        reply_timeout: "20s".parse().unwrap(),
        // These tests' targets are theirs alone; the refusal of existing
        // data is tested on its own.
        existing_data: ExistingData::Flush,
        ..ApplyConfig::default()
    }
}

fn cmd<T: AsRef<[u8]>>(args: &[T]) -> Command {
    Command::from_parts(args)
}

fn write(db: u32, commands: Vec<Command>, transaction: bool) -> Record {
    Record::Write(WriteRecord {
        db,
        commands,
        transaction,
        streamed: vec![],
        tenure: None,
    })
}

fn single(db: u32, args: &[&str]) -> Record {
    write(db, vec![cmd(args)], false)
}

fn entry(record: &Record, offset: u64) -> NewEntry {
    let db = match record {
        Record::Write(w) => w.db,
        Record::Snapshot(_) | Record::Fragment(_) | Record::Handoff(_) | Record::Void(_) => 0,
    };
    NewEntry::new(
        SourcePosition {
            replid: "a".repeat(40).into(),
            offset: ReplOffset(offset),
            db,
        },
        record.encode(),
    )
}

/// Appends `records` in groups; returns the last id.
async fn append(wal: &Wal, records: &[Record]) -> LogId {
    let mut last = LogId::ZERO;
    for group in records.chunks(2000) {
        let entries = group
            .iter()
            .enumerate()
            .map(|(i, r)| entry(r, last.0 + i as u64 + 1))
            .collect();
        last = wal.append(PARTITION, entries).await.unwrap().last;
    }
    last
}

/// An applier running in this process.
struct Running {
    status: Arc<ApplyStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ApplyError>>,
}

fn start(cfg: ApplyConfig, wal: &Wal) -> Running {
    let status = Arc::new(ApplyStatus::new(PARTITION));
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

    async fn stop(self) -> Arc<ApplyStatus> {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the applier stops on shutdown")
            .expect("applier task");
        if let Err(error) = result {
            panic!("the applier failed: {error}");
        }
        self.status
    }
}

async fn connect(server: &RedisServer) -> Client {
    Client::connect(&RedisUrl::parse(&server.url()).unwrap())
        .await
        .unwrap()
}

/// Sends every record to `reference` the way Redis would have run it:
/// its commands in its db, a transaction inside `MULTI`/`EXEC`.
async fn apply_directly(reference: &mut Client, records: &[Record]) {
    for record in records {
        let Record::Write(w) = record else {
            panic!("only writes go to the reference");
        };
        let mut cmds = vec![cmd(&["SELECT".to_string(), w.db.to_string()])];
        if w.transaction {
            cmds.push(cmd(&["MULTI"]));
        }
        cmds.extend(w.commands.iter().cloned());
        if w.transaction {
            cmds.push(cmd(&["EXEC"]));
        }
        let replies = reference.pipeline(&cmds).await.unwrap();
        for (reply, sent) in replies.iter().zip(&cmds) {
            assert!(
                reply.error_message().is_none(),
                "reference refused {:?}: {reply:?}",
                sent.args
            );
        }
    }
}

/// Deletes every `__ferry*` key of every db; returns how many there were.
fn delete_internal_keys(server: &RedisServer) -> usize {
    let mut deleted = 0;
    for db in 0..16 {
        let db = db.to_string();
        let keys = server.cmd(&["-n", &db, "--scan", "--pattern", "__ferry*"]);
        for key in keys.lines().filter(|k| !k.is_empty()) {
            server.cmd(&["-n", &db, "DEL", key]);
            deleted += 1;
        }
    }
    deleted
}

fn db_sizes(server: &RedisServer) -> Vec<String> {
    (0..16)
        .map(|db| server.cmd(&["-n", &db.to_string(), "DBSIZE"]))
        .collect()
}

/// Asserts both servers hold the same data, `__ferry*` keys aside.
fn assert_same_data(target: &RedisServer, reference: &RedisServer) {
    delete_internal_keys(target);
    delete_internal_keys(reference);
    assert_eq!(db_sizes(target), db_sizes(reference), "DBSIZE per db");
    let digest = target.cmd(&["DEBUG", "DIGEST"]);
    assert_eq!(digest, reference.cmd(&["DEBUG", "DIGEST"]), "DEBUG DIGEST");
    assert_ne!(digest, "0".repeat(40), "the data set is empty");
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Writes of every kind across dbs, transactions included.
fn varied_workload() -> Vec<Record> {
    let far = "4102444800000"; // 2100-01-01, so TTLs are equal on both sides
    let big = "x".repeat(200_000);
    let mut records = vec![
        single(0, &["SET", "s1", "hello"]),
        single(0, &["APPEND", "s1", " world"]),
        single(0, &["SET", "n", "10"]),
        single(0, &["INCRBY", "n", "5"]),
        single(0, &["SET", "big", &big]),
        single(0, &["RPUSH", "l", "a", "b", "c", "d"]),
        single(0, &["LPOP", "l"]),
        single(0, &["LSET", "l", "0", "B"]),
        single(0, &["SADD", "set", "a", "b", "c"]),
        single(0, &["SREM", "set", "a"]),
        single(0, &["ZADD", "z", "1", "a", "2", "b", "3.5", "c"]),
        single(0, &["ZINCRBY", "z", "3", "a"]),
        single(0, &["HSET", "h", "f1", "v1", "f2", "v2", "f3", "v3"]),
        single(0, &["HDEL", "h", "f1"]),
        single(0, &["XADD", "st", "1-1", "f", "v"]),
        single(0, &["XADD", "st", "2-1", "f", "w"]),
        single(0, &["XGROUP", "CREATE", "st", "g", "0"]),
        single(0, &["SETBIT", "bits", "77", "1"]),
        single(0, &["PFADD", "hll", "a", "b", "c"]),
        single(0, &["SET", "ttl", "v", "PXAT", far]),
        single(0, &["PEXPIREAT", "s1", far]),
        // A heartbeat: internal, never data.
        single(0, &["SET", "__ferry:heartbeat:l1", "1700000000000"]),
        single(1, &["SET", "db1", "one"]),
        single(1, &["RENAME", "db1", "db1-renamed"]),
        single(1, &["COPY", "db1-renamed", "copied", "DB", "6"]),
        single(1, &["SET", "tomove", "m"]),
        single(1, &["MOVE", "tomove", "7"]),
        write(
            2,
            vec![
                cmd(&["INCR", "tx:c"]),
                cmd(&["LPUSH", "tx:q", "x"]),
                cmd(&["SET", "tx:k", "v"]),
            ],
            true,
        ),
        // A client's transaction that switches db inside it.
        write(
            2,
            vec![
                cmd(&["SET", "a", "1"]),
                cmd(&["SELECT", "5"]),
                cmd(&["SET", "b", "2"]),
                cmd(&["SET", "__ferry:heartbeat:l1", "1700000000001"]),
            ],
            true,
        ),
        single(9, &["SET", "gone1", "x"]),
        single(9, &["SET", "gone2", "x"]),
        single(9, &["FLUSHDB"]),
        single(3, &["SET", "in3", "x"]),
        single(4, &["SET", "in4", "y"]),
        single(3, &["SWAPDB", "3", "4"]),
        single(5, &["DEL", "b", "nonexistent"]),
        single(5, &["SET", "b", "again"]),
    ];
    // Enough small records for many batches, across dbs.
    for i in 0..3000u32 {
        let db = i % 4;
        records.push(match i % 5 {
            0 => single(db, &["INCR", "many:c"]),
            1 => single(
                db,
                &["HSET", "many:h", &format!("f{}", i % 97), &i.to_string()],
            ),
            2 => single(db, &["RPUSH", "many:l", &i.to_string()]),
            3 => single(
                db,
                &["ZADD", "many:z", &i.to_string(), &format!("m{}", i % 50)],
            ),
            _ => single(0, &["SET", "__ferry:heartbeat:l1", &i.to_string()]),
        });
    }
    records
}

fn is_heartbeat(record: &Record) -> bool {
    matches!(record, Record::Write(w) if w.commands.len() == 1
        && w.commands[0].args.get(1).is_some_and(|k| k.starts_with(b"__ferry")))
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_kind_applies_like_the_source() {
    let target = RedisServer::start(&[]);
    let reference = RedisServer::start(&[]);
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();

    let records = varied_workload();
    let data: Vec<Record> = records
        .iter()
        .filter(|r| !is_heartbeat(r))
        .cloned()
        .collect();
    // The heartbeat inside the transaction is not data either.
    let mut reference_client = connect(&reference).await;
    let strip = |r: &Record| match r {
        Record::Write(w) => write(
            w.db,
            w.commands
                .iter()
                .filter(|c| !c.args.get(1).is_some_and(|k| k.starts_with(b"__ferry")))
                .cloned()
                .collect(),
            w.transaction,
        ),
        other => other.clone(),
    };
    let data: Vec<Record> = data.iter().map(strip).collect();
    apply_directly(&mut reference_client, &data).await;

    let last = append(&wal, &records).await;
    let applier = start(apply_config(&target.url(), 100), &wal);
    applier.wait_applied(last).await;
    let status = applier.stop().await;

    let report = status.report(&wal).unwrap();
    assert_eq!(report.state, SyncState::Online);
    assert_eq!(report.applied, last);
    assert_eq!((report.lag, report.latency_ms), (0, 0), "{report:?}");
    assert_eq!(report.commands_refused, 0, "{report:?}");
    let heartbeats = records.iter().filter(|r| is_heartbeat(r)).count() as u64 + 1;
    assert_eq!(report.commands_skipped, heartbeats);
    let data_commands: usize = data
        .iter()
        .map(|r| match r {
            // The source's SELECTs place the commands after them; the
            // applier sends its own.
            Record::Write(w) => w.commands.iter().filter(|c| !c.is("SELECT")).count(),
            Record::Snapshot(_) | Record::Fragment(_) | Record::Handoff(_) | Record::Void(_) => 0,
        })
        .sum();
    assert_eq!(report.commands_applied, data_commands as u64);
    let positions = wal.positions(PARTITION).unwrap().unwrap();
    assert_eq!(positions.applied, last, "the wal's applied mark");

    assert_eq!(checkpoint(target.port), format!("applied={last} epoch=0"));
    assert_eq!(target.cmd(&["EXISTS", "__ferry:heartbeat:l1"]), "0");
    assert_eq!(
        target.cmd(&["-n", "5", "EXISTS", "__ferry:heartbeat:l1"]),
        "0"
    );
    assert_same_data(&target, &reference);

    // Pending entries show as lag and latency.
    let more: Vec<Record> = (0..3).map(|_| single(0, &["INCR", "later"])).collect();
    append(&wal, &more).await;
    let report = status.report_at(&wal, now_ms() + 5_000).unwrap();
    assert_eq!(report.lag, 3, "{report:?}");
    assert!(report.latency_ms >= 5_000, "{report:?}");
    wal.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_refusals_are_counted_and_entries_the_applier_refuses_block() {
    let target = RedisServer::start(&[]);
    let wal_dir = tempfile::tempdir().unwrap();
    let dead_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let records = vec![
        single(0, &["SET", "k", "v"]),
        single(0, &["LPUSH", "k", "x"]), // WRONGTYPE: id 2
        single(0, &["INCR", "c"]),
        write(
            0,
            vec![
                cmd(&["INCR", "c"]),
                cmd(&["LPUSH", "k", "y"]), // WRONGTYPE inside a transaction: id 4
                cmd(&["INCR", "c"]),
            ],
            true,
        ),
        single(20, &["SET", "z", "1"]), // the target has 16 dbs: id 5
        single(0, &["INCR", "c"]),
    ];
    let last = append(&wal, &records).await;
    let cfg = ApplyConfig {
        dead_letter_dir: Some(dead_dir.path().to_path_buf()),
        retry_backoff_max: "500ms".parse().unwrap(),
        ..apply_config(&target.url(), 2)
    };
    let applier = start(cfg, &wal);
    // Runtime refusals (inside EXEC) are counted and passed over; the entry
    // the applier refuses itself (a db the target lacks) holds the
    // partition, unsent, until it is skipped.
    let report = wait_blocked(&applier, LogId(5)).await;
    let blocked = report.blocked.clone().unwrap();
    assert_eq!(blocked.command, "SET");
    assert!(
        blocked.error.contains("db 20 is out of range"),
        "{blocked:?}"
    );
    assert!(!blocked.transient);
    applier.wait_applied(LogId(4)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(applier.status.snapshot().applied, LogId(4));
    assert_eq!(target.cmd(&["GET", "c"]), "3");
    applier.status.request_skip(LogId(5)).unwrap();
    applier.wait_applied(last).await;
    let status = applier.stop().await;
    let report = status.snapshot();
    assert_eq!(report.commands_refused, 2, "{report:?}");
    assert_eq!(report.commands_applied, 5, "{report:?}");
    let refused = report.last_refused.expect("last refused command");
    assert_eq!(refused.log_id, LogId(5));
    assert_eq!(refused.command, "SET");
    assert!(refused.error.contains("out of range"), "{refused:?}");
    assert_eq!(report.entries_skipped, 1);
    assert_eq!(target.cmd(&["GET", "c"]), "4");
    assert_eq!(target.cmd(&["GET", "k"]), "v");
    let file = dead_dir.path().join("test-drainer-0.resp");
    assert_eq!(dead_letter_ids(&file), [5]);
    wal.close().await.unwrap();
}

/// Waits until the applier is blocked on `log_id`; returns the report.
async fn wait_blocked(applier: &Running, log_id: LogId) -> ferry::apply::ApplyReport {
    let deadline = Instant::now() + APPLY_WAIT;
    loop {
        let report = applier.status.snapshot();
        if report.blocked.as_ref().is_some_and(|b| b.log_id == log_id) {
            return report;
        }
        assert!(!applier.task.is_finished(), "the applier ended: {report:?}");
        assert!(
            Instant::now() < deadline,
            "not blocked on {log_id}: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The records of the refusal tests: entries 3 and 5 are refused when
/// queued (wrong arity); the others are `INCR c`, four of them.
fn refusal_workload() -> Vec<Record> {
    vec![
        single(0, &["INCR", "c"]),
        single(0, &["INCR", "c"]),
        single(0, &["SET", "only-a-key"]),
        single(0, &["INCR", "c"]),
        write(
            2,
            vec![cmd(&["INCR", "c2"]), cmd(&["LPUSH", "only-a-key"])],
            true,
        ),
        single(0, &["INCR", "c"]),
    ]
}

/// The `log_id=` of every record of a dead-letter file, in order.
fn dead_letter_ids(path: &Path) -> Vec<u64> {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
    text.split("ferry-dead-letter v1 log_id=")
        .skip(1)
        .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// `on-refused = "stop"`: an entry the target refuses when queued holds
/// the partition (state BLOCKED, its log id and error in the status), the
/// entries before it are applied and those after it wait; only the
/// blocking entry can be skipped, and a skipped entry is in the dead-letter
/// file before the applier goes past it; a skipped transaction is skipped
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_entry_blocks_until_skipped_and_is_recorded() {
    let target = RedisServer::start(&[]);
    let wal_dir = tempfile::tempdir().unwrap();
    let dead_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let records = refusal_workload();
    let last = append(&wal, &records).await;
    let cfg = ApplyConfig {
        dead_letter_dir: Some(dead_dir.path().join("dead-letter")),
        retry_backoff_max: "500ms".parse().unwrap(),
        ..apply_config(&target.url(), 10)
    };
    let applier = start(cfg, &wal);
    let report = wait_blocked(&applier, LogId(3)).await;
    assert_eq!(report.state, SyncState::Blocked, "{report:?}");
    let blocked = report.blocked.clone().unwrap();
    assert_eq!(blocked.command, "SET");
    assert!(
        blocked.error.contains("wrong number of arguments"),
        "{blocked:?}"
    );
    assert!(!blocked.transient);
    // Entries before it are applied, the ones after it wait (tried again
    // every retry-backoff-max, refused every time).
    applier.wait_applied(LogId(2)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = applier.status.snapshot();
    assert_eq!(report.applied, LogId(2), "{report:?}");
    assert_eq!(report.state, SyncState::Blocked);
    assert_eq!(target.cmd(&["GET", "c"]), "2");

    let file = dead_dir.path().join("dead-letter/test-drainer-0.resp");
    assert_eq!(
        applier
            .status
            .request_skip(LogId(4))
            .unwrap_err()
            .to_string(),
        "partition 0 is blocked on entry 3, not 4: only the blocking entry can be skipped"
    );
    assert_eq!(
        applier.status.request_skip(LogId(3)).unwrap(),
        file.display().to_string()
    );
    let report = wait_blocked(&applier, LogId(5)).await;
    let blocked = report.blocked.clone().unwrap();
    assert_eq!(blocked.command, "LPUSH");
    assert!(
        blocked.error.contains("wrong number of arguments"),
        "{blocked:?}"
    );
    applier.wait_applied(LogId(4)).await;
    assert_eq!(target.cmd(&["GET", "c"]), "3");
    assert_eq!(dead_letter_ids(&file), [3]);
    applier.status.request_skip(LogId(5)).unwrap();
    applier.wait_applied(last).await;
    let status = applier.stop().await;
    let report = status.snapshot();
    assert_eq!(report.state, SyncState::Online, "{report:?}");
    assert_eq!(report.blocked, None);
    assert_eq!(
        (report.entries_skipped, report.last_skipped),
        (2, Some(LogId(5)))
    );
    assert_eq!(target.cmd(&["GET", "c"]), "4");
    assert_eq!(target.cmd(&["-n", "2", "DBSIZE"]), "0");
    assert_eq!(dead_letter_ids(&file), [3, 5]);
    let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
    assert!(
        text.contains("by=operator command=SET error=ERR wrong number of arguments"),
        "{text}"
    );
    assert!(
        text.contains(
            "*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n*1\r\n$5\r\nMULTI\r\n*2\r\n$4\r\nINCR\r\n\
             $2\r\nc2\r\n*2\r\n$5\r\nLPUSH\r\n$10\r\nonly-a-key\r\n*1\r\n$4\r\nEXEC\r\n"
        ),
        "{text:?}"
    );
    wal.close().await.unwrap();
}

/// `on-refused = "skip-and-record"`: refused entries are recorded and
/// skipped without anyone asking, each exactly once; a crash after the
/// record and before the checkpoint moved (simulated: the target's
/// checkpoint and data put back to just before the skip) skips it again
/// without recording it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_and_record_goes_on_by_itself_and_records_each_entry_once() {
    let target = RedisServer::start(&[]);
    let wal_dir = tempfile::tempdir().unwrap();
    let dead_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let last = append(&wal, &refusal_workload()).await;
    let cfg = ApplyConfig {
        dead_letter_dir: Some(dead_dir.path().to_path_buf()),
        on_refused: ferry::apply::OnRefused::SkipAndRecord,
        ..apply_config(&target.url(), 10)
    };
    let applier = start(cfg.clone(), &wal);
    applier.wait_applied(last).await;
    let report = applier.stop().await.snapshot();
    assert_eq!(report.entries_skipped, 2, "{report:?}");
    assert_eq!(report.blocked, None);
    assert_eq!(target.cmd(&["GET", "c"]), "4");
    let file = dead_dir.path().join("test-drainer-0.resp");
    assert_eq!(dead_letter_ids(&file), [3, 5]);
    let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
    assert!(text.contains("by=on-refused"), "{text}");

    // As if the skip of entry 5 was recorded but its EXEC never ran.
    target.cmd(&["SET", CHECKPOINT_KEY, "v1 applied=4 epoch=0"]);
    target.cmd(&["SET", "c", "3"]);
    let applier = start(cfg, &wal);
    applier.wait_applied(last).await;
    let deadline = Instant::now() + APPLY_WAIT;
    while checkpoint(target.port) != "applied=6 epoch=0" {
        assert!(Instant::now() < deadline, "not applied again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = applier.stop().await.snapshot();
    assert_eq!(report.entries_skipped, 1, "{report:?}");
    assert_eq!(target.cmd(&["GET", "c"]), "4");
    assert_eq!(dead_letter_ids(&file), [3, 5]);
    wal.close().await.unwrap();
}

/// A refusal about the target's state (`OOM` under `noeviction`) is not
/// the entry's fault: it blocks, shown as transient, and is retried even
/// under `skip-and-record`, never skipped; once memory is back the entries
/// apply, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_is_retried_never_skipped() {
    let target = RedisServer::start(&["--maxmemory-policy", "noeviction"]);
    let wal_dir = tempfile::tempdir().unwrap();
    let dead_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let incr: Vec<Record> = (0..5).map(|_| single(0, &["INCR", "c"])).collect();
    let cfg = ApplyConfig {
        dead_letter_dir: Some(dead_dir.path().to_path_buf()),
        on_refused: ferry::apply::OnRefused::SkipAndRecord,
        ..apply_config(&target.url(), 10)
    };
    let last = append(&wal, &incr).await;
    let applier = start(cfg, &wal);
    applier.wait_applied(last).await;
    target.cmd(&["CONFIG", "SET", "maxmemory", "1"]);
    let last = append(&wal, &incr).await;
    let report = wait_blocked(&applier, LogId(6)).await;
    let blocked = report.blocked.clone().unwrap();
    assert!(blocked.error.starts_with("OOM"), "{blocked:?}");
    assert!(blocked.transient, "{blocked:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(applier.status.snapshot().applied, LogId(5));
    assert_eq!(target.cmd(&["GET", "c"]), "5");
    target.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    applier.wait_applied(last).await;
    let report = applier.stop().await.snapshot();
    assert_eq!((report.entries_skipped, report.blocked), (0, None));
    assert_eq!(target.cmd(&["GET", "c"]), "10");
    assert!(!dead_dir.path().join("test-drainer-0.resp").exists());
    wal.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Exactly once under SIGKILL of the applier.

/// Counts of what a counter workload did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    incr: u64,
    lpush: u64,
    xadd: u64,
}

/// INCR / LPUSH / XADD (explicit increasing ids) records, some of them
/// transactions of all three, some heartbeats.
fn counter_workload(n: u64, first_stream_id: u64) -> (Vec<Record>, Counts) {
    let mut counts = Counts::default();
    let mut stream_id = first_stream_id;
    let mut xadd = |counts: &mut Counts| {
        counts.xadd += 1;
        stream_id += 1;
        cmd(&[
            "XADD".to_string(),
            "x:stream".into(),
            format!("{stream_id}-0"),
            "f".into(),
            "v".into(),
        ])
    };
    let mut records = Vec::new();
    for i in 0..n {
        records.push(match i % 7 {
            0 | 3 => {
                counts.incr += 1;
                single(0, &["INCR", "x:counter"])
            }
            1 | 4 => {
                counts.lpush += 1;
                single(1, &["LPUSH", "x:list", &i.to_string()])
            }
            2 => write(2, vec![xadd(&mut counts)], false),
            5 => {
                counts.incr += 1;
                counts.lpush += 1;
                let x = xadd(&mut counts);
                write(
                    0,
                    vec![
                        cmd(&["INCR", "x:counter"]),
                        cmd(&["SELECT", "1"]),
                        cmd(&["LPUSH", "x:list", "tx"]),
                        cmd(&["SELECT", "2"]),
                        x,
                    ],
                    true,
                )
            }
            _ => single(0, &["SET", "__ferry:heartbeat:l", &i.to_string()]),
        });
    }
    (records, counts)
}

fn assert_counts(target_port: u16, counts: Counts) {
    let cli = |args: &[&str]| -> String {
        let out = Process::new(redis_cli_bin())
            .args(["-h", "127.0.0.1", "-p", &target_port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["GET", "x:counter"]), counts.incr.to_string(), "INCRs");
    assert_eq!(
        cli(&["-n", "1", "LLEN", "x:list"]),
        counts.lpush.to_string(),
        "LPUSHes"
    );
    assert_eq!(
        cli(&["-n", "2", "XLEN", "x:stream"]),
        counts.xadd.to_string(),
        "XADDs"
    );
}

/// Fills a fresh WAL in `dir` with `records` (in its own runtime, closed
/// after, so that a child process can open it).
fn fill_wal(dir: &Path, records: &[Record]) -> LogId {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let wal = Wal::open(wal_config(dir)).await.unwrap();
        let last = append(&wal, records).await;
        wal.close().await.unwrap();
        last
    })
}

#[test]
#[ignore = "helper process of the SIGKILL tests"]
fn apply_child() {
    let Ok(wal_dir) = std::env::var(WAL_DIR_ENV) else {
        panic!("apply_child runs only as a helper process");
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let target = std::env::var(TARGET_ENV).unwrap();
    let batch: usize = std::env::var(BATCH_ENV).unwrap().parse().unwrap();
    let until: Option<u64> = std::env::var(UNTIL_ENV).ok().map(|v| v.parse().unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let wal = Wal::open(wal_config(Path::new(&wal_dir))).await.unwrap();
        let applier = start(apply_config(&target, batch), &wal);
        match until {
            Some(last) => {
                applier.wait_applied(LogId(last)).await;
                applier.stop().await;
                // The applied mark reaches the WAL before the applier ends.
                let positions = wal.positions(PARTITION).unwrap().unwrap();
                assert_eq!(positions.applied, LogId(last), "the wal's applied mark");
                wal.close().await.unwrap();
            }
            None => {
                let result = applier.task.await.unwrap();
                panic!("the applier ended on its own: {result:?}");
            }
        }
    });
}

fn spawn_child(wal_dir: &Path, target_port: u16, batch: u64, until: Option<LogId>) -> Child {
    let mut child = Process::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "apply_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WAL_DIR_ENV, wal_dir)
        .env(TARGET_ENV, format!("redis://127.0.0.1:{target_port}"))
        .env(BATCH_ENV, batch.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(until) = until {
        child.env(UNTIL_ENV, until.0.to_string());
    }
    child.spawn().unwrap()
}

/// The checkpoint value in the target without its version and the WAL's
/// log tag (`applied=N epoch=E`, `loading=N epoch=E`), "" when absent.
fn checkpoint(port: u16) -> String {
    progress(&raw_checkpoint(port))
}

/// `v2 applied=N epoch=E log=T` (or `v1 ...` without a tag, or `v3 ...
/// src=H:O` of an entry applied before it was durable) as
/// `applied=N epoch=E`.
fn progress(value: &str) -> String {
    let mut fields: Vec<&str> = value.split(' ').collect();
    if fields
        .first()
        .is_some_and(|v| *v == "v1" || *v == "v2" || *v == "v3")
    {
        fields.remove(0);
    }
    fields.retain(|field| !field.starts_with("log=") && !field.starts_with("src="));
    fields.join(" ")
}

/// The checkpoint value in the target, "" when absent.
fn raw_checkpoint(port: u16) -> String {
    let out = Process::new(redis_cli_bin())
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "GET",
            CHECKPOINT_KEY,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Tiny xorshift generator: the test prints its seed so that a failing run
/// can be repeated with `FERRY_APPLY_SEED`.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("FERRY_APPLY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| now_ms() | 1);
        println!("FERRY_APPLY_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// Waits until `ready` holds for the checkpoint (or `timeout`).
fn wait_checkpoint(port: u16, timeout: Duration, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let value = checkpoint(port);
        if ready(&value) || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs a child to completion (everything up to `last` applied).
fn finish_in_child(wal_dir: &Path, port: u16, last: LogId) {
    let mut child = spawn_child(wal_dir, port, 64, Some(last));
    let deadline = Instant::now() + APPLY_WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the final applier run failed: {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the final applier run did not finish in {APPLY_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exactly_once_under_sigkill_of_the_applier() {
    let mut rng = Rng::from_env();
    let target = RedisServer::start(&[]);
    let wal_dir = tempfile::tempdir().unwrap();
    let (records, counts) = counter_workload(40_000, 0);
    let last = fill_wal(wal_dir.path(), &records);
    let done = format!("applied={last} epoch=0");
    let mut kills_mid_way = 0;
    for round in 0..8 {
        let batch = 1 + rng.below(20);
        let before = checkpoint(target.port);
        if before == done {
            break;
        }
        let mut child = spawn_child(wal_dir.path(), target.port, batch, None);
        // Kill once it applies something, at a random moment after.
        wait_checkpoint(target.port, Duration::from_secs(30), |v| v != before);
        std::thread::sleep(Duration::from_millis(rng.below(100)));
        assert!(child.try_wait().unwrap().is_none(), "the child ended early");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let after = checkpoint(target.port);
        if after != done {
            kills_mid_way += 1;
        }
        println!("round {round}: batch {batch}, killed at checkpoint {after:?}");
    }
    assert!(
        kills_mid_way >= 3,
        "only {kills_mid_way} kills hit before the end"
    );
    finish_in_child(wal_dir.path(), target.port, last);
    assert_eq!(checkpoint(target.port), format!("applied={last} epoch=0"));
    assert_counts(target.port, counts);
}

// ---------------------------------------------------------------------------
// The target killed and restarted.

/// A redis-server on a fixed port that keeps its data across restarts
/// (AOF, fsync on every write).
struct DurableRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl DurableRedis {
    fn start() -> DurableRedis {
        let mut server = DurableRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.restart();
        server
    }

    fn restart(&mut self) {
        let child = Process::new(redis_server_bin())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--enable-debug-command", "yes", "--protected-mode", "no"])
            .args(["--daemonize", "no", "--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Process::new(redis_cli_bin())
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "PING"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("PONG") {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not restart");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown save, only what the AOF fsynced survives.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for DurableRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_and_restarted_loses_and_doubles_nothing() {
    let mut target = DurableRedis::start();
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let (records, counts) = counter_workload(12_000, 0);
    let half = records.len() / 2;
    append(&wal, &records[..half]).await;
    let applier = start(apply_config(&target.url(), 20), &wal);
    let mut offline_errors = BTreeSet::new();
    for round in 0..3 {
        // Kill once the applier is under way again.
        let before = applier.status.snapshot().applied;
        let deadline = Instant::now() + Duration::from_secs(30);
        while applier.status.snapshot().applied == before {
            assert!(Instant::now() < deadline, "no progress in round {round}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        target.kill();
        if round == 1 {
            // Entries keep arriving while the target is down.
            append(&wal, &records[half..]).await;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let report = applier.status.snapshot();
            if report.state == SyncState::Offline {
                offline_errors.insert(report.last_error.unwrap_or_default());
                break;
            }
            assert!(Instant::now() < deadline, "never OFFLINE: {report:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!(
            "round {round}: target killed at applied {}",
            applier.status.snapshot().applied
        );
        target.restart();
    }
    let last = wal.last_log_id(PARTITION).unwrap().unwrap();
    applier.wait_applied(last).await;
    let status = applier.stop().await;
    assert_eq!(status.snapshot().state, SyncState::Online);
    println!("offline errors: {offline_errors:?}");
    assert_counts(target.port, counts);
    wal.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Snapshot markers.

/// Fills `source` with a data set across dbs; `keys` plain strings in db 0.
fn fill_source(source: &RedisServer, keys: u64) {
    source.cmd(&["DEBUG", "POPULATE", &keys.to_string(), "key", "64"]);
    source.cmd(&["-n", "1", "RPUSH", "snap:list", "a", "b", "c"]);
    source.cmd(&["-n", "1", "HSET", "snap:hash", "f", "v", "g", "w"]);
    source.cmd(&["-n", "3", "ZADD", "snap:zset", "1", "a", "2", "b"]);
    source.cmd(&["-n", "3", "XADD", "snap:stream", "5-1", "f", "v"]);
    source.cmd(&["-n", "3", "SET", "snap:ttl", "v", "PXAT", "4102444800000"]);
    source.cmd(&["SET", "snap:counter", "100"]);
    // The listener's heartbeat lives in the source too; never data.
    source.cmd(&["SET", "__ferry:heartbeat:l", "1700000000000"]);
}

/// Takes an RDB of `source`; returns the marker describing it once its
/// chunks are stored in `wal` as `epoch` (state complete).
async fn store_snapshot(wal: &Wal, source: &RedisServer, epoch: u64, dir: &Path) -> SnapshotMarker {
    let file: PathBuf = dir.join("snapshot.rdb");
    let report = ferry::cli::fetch::fetch(&RedisUrl::parse(&source.url()).unwrap(), &file)
        .await
        .unwrap();
    let rdb = Bytes::from(std::fs::read(&file).unwrap());
    let state = |phase| SnapshotState { epoch, phase };
    wal.set_snapshot_state(PARTITION, state(SnapshotPhase::Writing))
        .await
        .unwrap();
    let mut chunks = 0;
    for (seq, chunk) in rdb.chunks(64 << 10).enumerate() {
        wal.put_snapshot_chunk(PARTITION, epoch, seq as u64, rdb.slice_ref(chunk))
            .await
            .unwrap();
        chunks += 1;
    }
    wal.set_snapshot_state(PARTITION, state(SnapshotPhase::Complete))
        .await
        .unwrap();
    SnapshotMarker {
        epoch,
        rdb_bytes: rdb.len() as u64,
        chunks,
        replid: report.replid.to_string(),
        offset: report.offset.0,
        scope: None,
        tenures: Vec::new(),
        handoffs: Vec::new(),
    }
}

/// Writes applied to the source directly and recorded for the WAL.
async fn writes_on_top(source: &RedisServer) -> Vec<Record> {
    let records = vec![
        single(0, &["INCR", "snap:counter"]),
        single(0, &["DEL", "key:7"]),
        single(1, &["RPUSH", "snap:list", "d"]),
        write(
            3,
            vec![
                cmd(&["ZADD", "snap:zset", "3", "c"]),
                cmd(&["XADD", "snap:stream", "6-1", "f", "w"]),
            ],
            true,
        ),
        single(0, &["SET", "__ferry:heartbeat:l", "1700000000001"]),
    ];
    let mut client = connect(source).await;
    let data: Vec<Record> = records
        .iter()
        .filter(|r| !is_heartbeat(r))
        .cloned()
        .collect();
    apply_directly(&mut client, &data).await;
    records
}

fn seed_unrelated(target_port: u16) {
    for (db, key) in [("0", "unrelated:a"), ("0", "key:1"), ("7", "unrelated:b")] {
        let out = Process::new(redis_cli_bin())
            .args(["-h", "127.0.0.1", "-p", &target_port.to_string(), "-n", db])
            .args(["SET", key, "stale"])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_marker_makes_the_target_equal_to_the_source() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    fill_source(&source, 5_000);
    seed_unrelated(target.port);
    // Entries before the marker are superseded by it.
    append(&wal, &[single(0, &["SET", "before-snapshot", "x"])]).await;
    let marker = store_snapshot(&wal, &source, 1, work.path()).await;
    let marker_id = wal
        .append(
            PARTITION,
            vec![entry(&Record::Snapshot(marker.clone()), marker.offset)],
        )
        .await
        .unwrap()
        .last;
    let on_top = writes_on_top(&source).await;
    let last = append(&wal, &on_top).await;

    // By default the first load refuses a target whose dbs hold keys, and
    // writes nothing.
    let refusing = start(
        ApplyConfig {
            existing_data: ExistingData::Refuse,
            ..apply_config(&target.url(), 100)
        },
        &wal,
    );
    let result = tokio::time::timeout(APPLY_WAIT, refusing.task)
        .await
        .expect("the refusing applier ends")
        .unwrap();
    let error = result.expect_err("existing data refused").to_string();
    assert!(
        error.contains("db 0: 3 keys, db 7: 1 keys") && error.contains("existing-data"),
        "{error}"
    );
    assert_eq!(target.cmd(&["GET", "unrelated:a"]), "stale");
    assert_eq!(target.cmd(&["-n", "7", "GET", "unrelated:b"]), "stale");
    // The entry before the marker was applied (not a load): its checkpoint.
    assert_eq!(
        checkpoint(target.port),
        format!("applied={} epoch=0", marker_id.prev())
    );

    let applier = start(apply_config(&target.url(), 100), &wal);
    applier.wait_applied(last).await;
    let status = applier.stop().await;
    let report = status.snapshot();
    let load = report.snapshot_load.clone().expect("load progress");
    assert!(load.done, "{load:?}");
    assert_eq!(load.log_id, marker_id);
    assert_eq!(load.bytes_loaded, marker.rdb_bytes);
    // 5000 populated keys + 6 typed ones; the heartbeat is not loaded.
    assert_eq!(load.keys_loaded, 5_006, "{load:?}");
    assert_eq!(report.epoch, 1);
    assert_eq!(checkpoint(target.port), format!("applied={last} epoch=1"));
    assert_eq!(target.cmd(&["EXISTS", "unrelated:a"]), "0");
    assert_eq!(target.cmd(&["-n", "7", "DBSIZE"]), "0");
    assert_eq!(target.cmd(&["EXISTS", "before-snapshot"]), "0");
    assert_eq!(target.cmd(&["EXISTS", "__ferry:heartbeat:l"]), "0");
    assert_same_data(&target, &source);
    wal.close().await.unwrap();
}

#[test]
fn sigkill_during_a_snapshot_load_converges() {
    let mut rng = Rng::from_env();
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal_dir = work.path().join("wal");
    fill_source(&source, 100_000);
    seed_unrelated(target.port);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let last = runtime.block_on(async {
        let wal = Wal::open(wal_config(&wal_dir)).await.unwrap();
        let (before, _) = counter_workload(50, 0);
        append(&wal, &before).await;
        let marker = store_snapshot(&wal, &source, 1, work.path()).await;
        wal.append(
            PARTITION,
            vec![entry(&Record::Snapshot(marker.clone()), marker.offset)],
        )
        .await
        .unwrap();
        let on_top = writes_on_top(&source).await;
        let last = append(&wal, &on_top).await;
        wal.close().await.unwrap();
        last
    });
    drop(runtime);
    let mut kills_while_loading = 0;
    for round in 0..4 {
        let now = checkpoint(target.port);
        if now.starts_with("applied=") && now.ends_with(" epoch=1") {
            break; // loaded: no more loads to interrupt
        }
        let mut child = spawn_child(&wal_dir, target.port, 64, None);
        let seen = wait_checkpoint(target.port, Duration::from_secs(30), |v| {
            v.starts_with("loading=")
        });
        // The first kill comes right after the load began (a load of 100k
        // keys takes longer than 50 ms), so at least one lands mid-load;
        // later ones at random points. A finished load cannot be redone:
        // its marker may be trimmed from the WAL once applied.
        let delay = if round == 0 { 50 } else { 400 };
        std::thread::sleep(Duration::from_millis(rng.below(delay)));
        child.kill().unwrap();
        child.wait().unwrap();
        let after = checkpoint(target.port);
        if after.starts_with("loading=") {
            kills_while_loading += 1;
        }
        println!(
            "round {round}: saw {seen:?}, killed at {after:?}, target dbsize {}",
            target.cmd(&["DBSIZE"])
        );
    }
    assert!(kills_while_loading >= 1, "no kill landed during a load");
    finish_in_child(&wal_dir, target.port, last);
    assert_eq!(checkpoint(target.port), format!("applied={last} epoch=1"));
    assert_eq!(target.cmd(&["EXISTS", "unrelated:a"]), "0");
    assert_same_data(&target, &source);
}

// ---------------------------------------------------------------------------
// Figures (run in release: `cargo test --release --test apply -- --ignored
// throughput_figures --nocapture`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput figures, run by hand in release mode"]
async fn throughput_figures() {
    let target = RedisServer::start(&[]);
    let source = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(&work.path().join("wal")))
        .await
        .unwrap();
    let n = 500_000u64;
    let value = "v".repeat(100);
    let records: Vec<Record> = (0..n)
        .map(|i| single(0, &["SET", &format!("key:{i}"), &value]))
        .collect();
    let last = append(&wal, &records).await;
    let started = Instant::now();
    let applier = start(default_config(&target.url()), &wal);
    applier.wait_applied(last).await;
    let elapsed = started.elapsed();
    applier.stop().await;
    println!(
        "stream: {n} SET records (100 B values) in {elapsed:.2?}: {:.0} records/s",
        n as f64 / elapsed.as_secs_f64()
    );

    let keys = 1_000_000u64;
    source.cmd(&["DEBUG", "POPULATE", &keys.to_string(), "key", "100"]);
    let marker = store_snapshot(&wal, &source, 1, work.path()).await;
    let marker_id = wal
        .append(PARTITION, vec![entry(&Record::Snapshot(marker.clone()), 0)])
        .await
        .unwrap()
        .last;
    let started = Instant::now();
    let applier = start(default_config(&target.url()), &wal);
    applier.wait_applied(marker_id).await;
    let elapsed = started.elapsed();
    applier.stop().await;
    println!(
        "snapshot: {keys} keys x 100 B ({} RDB bytes) loaded in {elapsed:.2?}: {:.0} keys/s",
        marker.rdb_bytes,
        keys as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(target.cmd(&["DBSIZE"]), (keys + 1).to_string());
    wal.close().await.unwrap();
}

/// The default config, pointed at `target`.
fn default_config(target: &str) -> ApplyConfig {
    ApplyConfig {
        drainer_id: DRAINER.to_string(),
        target: target.into(),
        ..ApplyConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_behind_the_wal_is_caught_up_or_reported() {
    let first = RedisServer::start(&[]);
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let records: Vec<Record> = (0..10).map(|_| single(0, &["INCR", "c"])).collect();
    let last = append(&wal, &records).await;
    let applier = start(apply_config(&first.url(), 3), &wal);
    applier.wait_applied(last).await;
    applier.stop().await;
    assert_eq!(wal.positions(PARTITION).unwrap().unwrap().applied, last);

    // A fresh target (the old one lost its data, or was replaced): the WAL's
    // applied mark is ahead of its (missing) checkpoint; it gets everything.
    let second = RedisServer::start(&[]);
    let applier = start(apply_config(&second.url(), 3), &wal);
    applier.wait_applied(last).await;
    applier.stop().await;
    assert_eq!(second.cmd(&["GET", "c"]), "10");

    // Once the entries it needs are trimmed (and no snapshot marker replaces
    // them) a fresh target cannot be caught up: the applier stops, saying so.
    wal.trim(PARTITION, LogId(4)).await.unwrap();
    let third = RedisServer::start(&[]);
    let applier = start(apply_config(&third.url(), 3), &wal);
    let error = expect_fatal(applier).await;
    assert!(
        matches!(
            error,
            ApplyError::Gap {
                partition: PARTITION,
                wanted: LogId(1),
                first_available: LogId(4)
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("needs a snapshot"), "{error}");
    assert_eq!(third.cmd(&["EXISTS", "c"]), "0");
    wal.close().await.unwrap();
}

/// Waits for `applier` to end with a fatal error; checks the status shows
/// it OFFLINE with that error.
async fn expect_fatal(applier: Running) -> ApplyError {
    let result = tokio::time::timeout(Duration::from_secs(30), applier.task)
        .await
        .expect("the applier stops on a fatal error")
        .expect("applier task");
    let error = result.expect_err("the applier ended without an error");
    assert!(error.is_fatal(), "{error}");
    let report = applier.status.snapshot();
    assert_eq!(report.state, SyncState::Offline);
    assert_eq!(report.last_error, Some(error.to_string()));
    error
}

/// The applier's ack of `PARTITION` in `wal`, if it registered.
fn applier_ack(wal: &Wal) -> Option<LogId> {
    wal.positions(PARTITION)
        .unwrap()
        .unwrap()
        .acked
        .into_iter()
        .find(|(downstream, _)| downstream.as_str() == "apply:test-drainer")
        .map(|(_, acked)| acked)
}

async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_entries_are_trimmed_unapplied_kept_until_wal_ttl_which_is_fatal() {
    let target = RedisServer::start(&[]);
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let records: Vec<Record> = (0..10).map(|_| single(0, &["INCR", "c"])).collect();
    let applied = append(&wal, &records).await;
    let retained = ApplyConfig {
        retain_applied: "1s".parse().unwrap(),
        ..apply_config(&target.url(), 3)
    };
    let applier = start(retained, &wal);
    applier.wait_applied(applied).await;
    // The applier acks what it applied once it has been applied for
    // retain-applied (a target that lost its last second needs it again),
    // so retention may trim it then, and not before.
    let applied_at = Instant::now();
    // The applied mark follows within APPLIED_MARK_EVERY (50 ms).
    wait_for("the wal's applied mark", || {
        wal.positions(PARTITION).unwrap().unwrap().applied == applied
    })
    .await;
    assert_ne!(applier_ack(&wal), Some(applied), "acked at once");
    wait_for("the applier's ack", || applier_ack(&wal) == Some(applied)).await;
    assert!(
        applied_at.elapsed() >= Duration::from_millis(900),
        "acked {:?} after it was applied, before retain-applied",
        applied_at.elapsed()
    );
    wal.enforce_retention(now_ms()).await.unwrap();
    let positions = wal.positions(PARTITION).unwrap().unwrap();
    assert_eq!(positions.first_available, applied.next());
    assert_eq!(positions.applied, applied);
    applier.stop().await;

    // Entries it has not applied are kept...
    let more: Vec<Record> = (0..5).map(|_| single(0, &["INCR", "c"])).collect();
    let last = append(&wal, &more).await;
    wal.enforce_retention(now_ms()).await.unwrap();
    assert_eq!(wal.first_log_id(PARTITION).unwrap(), Some(applied.next()));
    // ... but not past wal-ttl, the hard limit.
    let ttl_ms = wal.config().wal_ttl.0.as_millis() as u64;
    wal.enforce_retention(now_ms() + ttl_ms + 1_000)
        .await
        .unwrap();
    assert_eq!(wal.first_log_id(PARTITION).unwrap(), None);
    assert_eq!(wal.last_log_id(PARTITION).unwrap(), Some(last));

    // For the applier that is fatal, naming the partition and the entry.
    let applier = start(apply_config(&target.url(), 3), &wal);
    let error = expect_fatal(applier).await;
    assert!(
        matches!(
            error,
            ApplyError::Gap {
                partition: PARTITION,
                wanted,
                first_available,
            } if wanted == applied.next() && first_available == last.next()
        ),
        "{error}"
    );
    let text = error.to_string();
    assert!(
        text.contains("partition 0") && text.contains("entry 11"),
        "{text}"
    );
    // Nothing was skipped silently: the target stays where it was.
    assert_eq!(target.cmd(&["GET", "c"]), "10");
    assert_eq!(
        checkpoint(target.port),
        format!("applied={applied} epoch=0")
    );
    wal.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_epochs_are_deleted_once_loaded_and_superseded_or_trimmed() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let wal = Wal::open(WalConfig {
        retention_interval: "100ms".parse().unwrap(),
        ..wal_config(&work.path().join("wal"))
    })
    .await
    .unwrap();
    // Another applier of the partition that lags: it holds retention.
    let holder = DownstreamId::new("apply:lagging").unwrap();
    wal.register_downstream(PARTITION, holder.clone())
        .await
        .unwrap();
    fill_source(&source, 1_000);
    // As on a drainer: a snapshot marker resets the log.
    let first = store_snapshot(&wal, &source, 1, work.path()).await;
    let first_id = LogId(10);
    wal.reset_partition(
        PARTITION,
        first_id,
        entry(&Record::Snapshot(first.clone()), first.offset),
    )
    .await
    .unwrap();
    let on_top = writes_on_top(&source).await;
    let last = append(&wal, &on_top).await;
    let applier = start(
        ApplyConfig {
            retain_applied: "0s".parse().unwrap(),
            ..apply_config(&target.url(), 100)
        },
        &wal,
    );
    applier.wait_applied(last).await;
    wait_for("the applier's ack", || applier_ack(&wal) == Some(last)).await;
    // Loaded, but its marker is still the log's first entry (the lagging
    // applier needs it): the epoch stays through several collections.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(wal.snapshot_epochs(PARTITION).unwrap(), vec![1]);
    assert_eq!(wal.first_log_id(PARTITION).unwrap(), Some(first_id));

    // A newer snapshot replaces the log: once loaded, epoch 1 goes, the
    // current epoch 2 stays while its marker is held.
    source.cmd(&["SET", "after-first-snapshot", "x"]);
    let second = store_snapshot(&wal, &source, 2, work.path()).await;
    assert_eq!(wal.snapshot_epochs(PARTITION).unwrap(), vec![1, 2]);
    let second_id = LogId(last.0 + 5);
    wal.reset_partition(
        PARTITION,
        second_id,
        entry(&Record::Snapshot(second.clone()), second.offset),
    )
    .await
    .unwrap();
    applier.wait_applied(second_id).await;
    wait_for("epoch 1 deleted", || {
        wal.snapshot_epochs(PARTITION).unwrap() == vec![2]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(wal.snapshot_epochs(PARTITION).unwrap(), vec![2]);
    assert_eq!(
        wal.read_snapshot_chunks(PARTITION, 2, 0, 1 << 20)
            .unwrap()
            .len() as u64,
        second.chunks
    );

    // Once every applier applied its marker, retention trims it and the
    // epoch goes too.
    wal.ack(PARTITION, holder, second_id).await.unwrap();
    wait_for("epoch 2 deleted", || {
        wal.snapshot_epochs(PARTITION).unwrap().is_empty()
    })
    .await;
    assert_eq!(wal.first_log_id(PARTITION).unwrap(), None);
    applier.stop().await;
    assert_same_data(&target, &source);
    wal.close().await.unwrap();
}

/// Milliseconds of `durations` at quantile `q` (sorted in place).
fn quantile_ms(durations: &mut [Duration], q: f64) -> f64 {
    durations.sort();
    let index = ((durations.len() - 1) as f64 * q).round() as usize;
    durations[index].as_secs_f64() * 1000.0
}

// Figures (run in release: `cargo test --release --test apply -- --ignored
// idle_latency_figures --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "latency figures, run by hand in release mode"]
async fn idle_latency_figures() {
    let target = RedisServer::start(&[]);
    target.cmd(&["CONFIG", "SET", "notify-keyspace-events", "K$"]);
    let mut watcher = connect(&target).await;
    watcher
        .call(["SUBSCRIBE", "__keyspace@0__:latency"])
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    // The default WAL config: fsync'd group commits.
    let wal = Wal::open(WalConfig::with_dir(work.path().join("wal")))
        .await
        .unwrap();
    let applier = start(default_config(&target.url()), &wal);
    let rounds = 300u64;
    let mut latencies = Vec::new();
    let mut appends = Vec::new();
    let mut after_append = Vec::new();
    for i in 0..rounds {
        // Idle between entries, for a varying time so that the entry lands
        // at any point of a polling period.
        tokio::time::sleep(Duration::from_millis(10 + i % 7)).await;
        let started = Instant::now();
        let record = single(0, &["SET", "latency", &i.to_string()]);
        wal.append(PARTITION, vec![entry(&record, i + 1)])
            .await
            .unwrap();
        let appended = started.elapsed();
        appends.push(appended);
        // The keyspace notification of this SET on the target.
        let message = tokio::time::timeout(Duration::from_secs(10), watcher.read_frame())
            .await
            .expect("the SET reaches the target")
            .unwrap();
        let total = started.elapsed();
        latencies.push(total);
        after_append.push(total - appended);
        assert!(format!("{message:?}").contains("set"), "{message:?}");
    }
    applier.stop().await;
    assert_eq!(target.cmd(&["GET", "latency"]), (rounds - 1).to_string());
    let mean = latencies.iter().sum::<Duration>().as_secs_f64() * 1000.0 / rounds as f64;
    let append_mean = appends.iter().sum::<Duration>().as_secs_f64() * 1000.0 / rounds as f64;
    println!(
        "idle latency of one SET, append -> target, {rounds} rounds: mean {mean:.3} ms, \
         p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms (of which the fsync'd append: \
         mean {append_mean:.3} ms)",
        quantile_ms(&mut latencies, 0.5),
        quantile_ms(&mut latencies, 0.9),
        quantile_ms(&mut latencies, 0.99),
        quantile_ms(&mut latencies, 1.0),
    );
    let applied_mean = after_append.iter().sum::<Duration>().as_secs_f64() * 1000.0 / rounds as f64;
    println!(
        "  durable -> on the target (applier wake-up, MULTI/EXEC, notification): mean \
         {applied_mean:.3} ms, p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
        quantile_ms(&mut after_append, 0.5),
        quantile_ms(&mut after_append, 0.9),
        quantile_ms(&mut after_append, 0.99),
    );
    wal.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// The WATCH guard against a late batch of an abandoned connection.

/// The `CLIENT LIST` lines of `server`'s clients other than redis-cli's own.
fn other_clients(server: &RedisServer) -> Vec<String> {
    server
        .cmd(&["CLIENT", "LIST"])
        .lines()
        .filter(|line| !line.contains("cmd=client|list"))
        .map(str::to_string)
        .collect()
}

/// The guard described in src/apply/mod.rs ("Exactly once"), made to fire
/// deterministically: an applier session starts with nothing to apply (it
/// `WATCH`ed the checkpoint, then read it: `applied=10`) and waits. From
/// another connection, the batch an abandoned earlier connection could run
/// late commits on the target: entry 11 (`INCR c`) with the checkpoint
/// naming it. Entry 11 then reaches the WAL: the applier's `EXEC` of it must
/// be refused (a null reply: `ApplyError::CheckpointMoved`, shown as the
/// last error), and the next session must resume after the checkpoint the
/// late batch wrote, so `c` ends at 11, not 12. Entry 12 (`INCR d`) shows
/// that it goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_batch_moving_the_checkpoint_is_caught_by_the_watch_guard() {
    let target = RedisServer::start(&[]);
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let first: Vec<Record> = (0..10).map(|_| single(0, &["INCR", "c"])).collect();
    let last = append(&wal, &first).await;
    assert_eq!(last, LogId(10));
    let applier = start(apply_config(&target.url(), 100), &wal);
    applier.wait_applied(last).await;
    applier.stop().await;

    // A new session: connect, WATCH, GET the checkpoint, nothing to apply.
    let applier = start(apply_config(&target.url(), 100), &wal);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let clients = other_clients(&target);
        // (Its last read at the start of a session is the slot owner map.)
        if clients.iter().any(|line| line.contains(" cmd=hgetall ")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the applier did not read its checkpoint: {clients:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(checkpoint(target.port), "applied=10 epoch=0");

    // The late batch: entry 11 and its checkpoint, committed by another
    // connection while the session waits.
    let log_tag = wal.history(PARTITION).unwrap().unwrap().log_tag;
    let late_checkpoint = format!("v2 applied=11 epoch=0 log={log_tag:016x}");
    let mut late = connect(&target).await;
    let replies = late
        .pipeline(&[
            cmd(&["MULTI"]),
            cmd(&["INCR", "c"]),
            cmd(&["SET", CHECKPOINT_KEY, &late_checkpoint]),
            cmd(&["EXEC"]),
        ])
        .await
        .expect("the late batch");
    assert!(
        matches!(replies.last(), Some(ferry::redis::resp::Frame::Array(items)) if items.len() == 2),
        "{replies:?}"
    );
    let more = [single(0, &["INCR", "c"]), single(0, &["INCR", "d"])];
    let last = wal
        .append(
            PARTITION,
            more.iter()
                .enumerate()
                .map(|(i, r)| entry(r, 11 + i as u64))
                .collect(),
        )
        .await
        .unwrap()
        .last;
    assert_eq!(last, LogId(12));
    applier.wait_applied(last).await;
    let report = applier.status.snapshot();
    let error = report.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("batch of entries 11..=12 not applied")
            && error.contains("the checkpoint changed under it"),
        "the guard did not fire: {report:?}"
    );
    assert_eq!(target.cmd(&["GET", "c"]), "11", "entry 11 applied twice");
    assert_eq!(target.cmd(&["GET", "d"]), "1");
    assert_eq!(checkpoint(target.port), "applied=12 epoch=0");
    applier.stop().await;
    wal.close().await.unwrap();
}

/// The late `EXEC` the `WATCH` guard cannot catch (src/apply/mod.rs,
/// "Exactly once"), made to happen: a proxy between the applier and the
/// target holds back everything connection 1 sends from its second batch
/// on (entries 11..=20: ten `INCR c` and their checkpoint). The applier
/// times out on it (reply-timeout 2 s), drops it and opens connection 2,
/// which commits entries 11..=20 itself. Only then does the proxy release
/// connection 1's bytes to the target, followed by its FIN: a batch that
/// arrives after the new session's first `EXEC`. Without a fence the
/// target runs it (`c` gains ten more); with the applier killing its
/// earlier connections (`CLIENT KILL ID`) before it reads the checkpoint,
/// the target has closed that connection and discards the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_exec_after_the_next_sessions_first_exec_is_discarded() {
    let target = RedisServer::start(&[]);
    let proxy = common::proxy::Proxy::start(&target.addr());
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let incr = |n: usize| -> Vec<Record> { (0..n).map(|_| single(0, &["INCR", "c"])).collect() };
    let cfg = ApplyConfig {
        reply_timeout: "2s".parse().unwrap(),
        ..apply_config(&format!("redis://{}", proxy.addr()), 100)
    };
    let last = append(&wal, &incr(10)).await;
    let applier = start(cfg, &wal);
    applier.wait_applied(last).await;

    // Connection 1 (the newest, if a loaded box made the applier reconnect
    // already) is idle: what it sends next is held.
    let held = proxy.hold_open_up();
    assert!(held >= 1);
    let last = append(&wal, &incr(10)).await;
    assert_eq!(last, LogId(20));
    // Connection 2 (or a later one) commits 11..=20 while 1 is held.
    let deadline = Instant::now() + APPLY_WAIT;
    loop {
        if checkpoint(target.port) == "applied=20 epoch=0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries 11..=20 not applied: {:?}",
            applier.status.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(proxy.connections() > held);
    assert_eq!(target.cmd(&["GET", "c"]), "20");
    let report = applier.status.snapshot();
    assert!(
        report
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("did not answer within")),
        "connection 1 was not given up on: {report:?}"
    );

    // Connection 1's batch reaches the target now, after connection 2's
    // first EXEC; wait until the target is done with connection 1.
    proxy.release_held();
    let deadline = Instant::now() + APPLY_WAIT;
    while (1..=held).any(|n| proxy.is_open(n)) {
        assert!(
            Instant::now() < deadline,
            "connection 1 never ended after its release"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        target.cmd(&["GET", "c"]),
        "20",
        "the abandoned connection's late batch ran after the new session's first EXEC"
    );
    // And it goes on from there, exactly once.
    let last = append(&wal, &incr(10)).await;
    applier.wait_applied(last).await;
    assert_eq!(target.cmd(&["GET", "c"]), "30");
    assert_eq!(checkpoint(target.port), "applied=30 epoch=0");
    let report = applier.stop().await.snapshot();
    assert_eq!(report.fence.as_deref(), Some("client-kill"), "{report:?}");
    wal.close().await.unwrap();
}

/// A target user without `CLIENT LIST`/`KILL` (`-@admin`): the applier
/// still applies, guarded by `WATCH` alone, and its status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_client_permissions_the_fence_falls_back_to_watch() {
    let target = RedisServer::start(&[]);
    target.cmd(&[
        "ACL",
        "SETUSER",
        "applier",
        "on",
        ">secret-pw",
        "~*",
        "&*",
        "+@all",
        "-@admin",
    ]);
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let records: Vec<Record> = (0..5).map(|_| single(0, &["INCR", "c"])).collect();
    let last = append(&wal, &records).await;
    let url = format!("redis://applier:secret-pw@127.0.0.1:{}", target.port);
    let applier = start(apply_config(&url, 2), &wal);
    applier.wait_applied(last).await;
    let report = applier.stop().await.snapshot();
    let fence = report.fence.unwrap_or_default();
    assert!(
        fence.starts_with("watch-only: CLIENT refused: NOPERM"),
        "{fence}"
    );
    assert_eq!(target.cmd(&["GET", "c"]), "5");
    wal.close().await.unwrap();
}

/// A fragment record of a streamed argument.
fn fragment(seq: u32, data: &[u8]) -> Record {
    Record::Fragment(ferry::record::Fragment {
        seq,
        data: Bytes::copy_from_slice(data),
    })
}

/// A write whose arguments at `streamed` (`(command, arg, len, fragments)`)
/// are in the fragments right before it.
fn streamed_write(
    commands: Vec<Command>,
    transaction: bool,
    streamed: &[(u32, u32, u64, u32)],
) -> Record {
    Record::Write(WriteRecord {
        db: 0,
        commands,
        transaction,
        streamed: streamed
            .iter()
            .map(
                |&(command, arg, len, fragments)| ferry::record::StreamedArg {
                    command,
                    arg,
                    len,
                    fragments,
                },
            )
            .collect(),
        tenure: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_arguments_are_written_from_their_fragments() {
    let target = RedisServer::start(&[]);
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let piece = |c: u8, n: usize| vec![c; n];
    let value = [piece(b'a', 100), piece(b'b', 100), piece(b'c', 50)].concat();
    let records = vec![
        single(0, &["SET", "before", "1"]),
        // An orphan run: a listener crashed in the middle of the entry...
        fragment(0, &piece(b'x', 100)),
        fragment(1, &piece(b'y', 100)),
        // ...and stored it again.
        fragment(0, &value[..100]),
        fragment(1, &value[100..200]),
        fragment(2, &value[200..]),
        streamed_write(
            vec![cmd(&["SET", "big", "", "EX", "1000"])],
            false,
            &[(0, 2, 250, 3)],
        ),
        // A transaction with two streamed arguments and a small one.
        fragment(0, b"first-"),
        fragment(1, b"part"),
        fragment(2, b"second"),
        streamed_write(
            vec![
                cmd(&["SET", "t", ""]),
                cmd(&["INCR", "n"]),
                cmd(&["APPEND", "t", ""]),
                cmd(&["APPEND", "t", "-third"]),
            ],
            true,
            &[(0, 2, 10, 2), (2, 2, 6, 1)],
        ),
        single(0, &["SET", "after", "1"]),
    ];
    let last = append(&wal, &records).await;
    // One entry per batch at most: a run and its write still go together.
    let applier = start(apply_config(&target.url(), 1), &wal);
    applier.wait_applied(last).await;
    let report = applier.stop().await.snapshot();
    assert_eq!(target.cmd(&["GET", "big"]).as_bytes(), &value[..]);
    assert!(target.cmd(&["TTL", "big"]).parse::<i64>().unwrap() > 900);
    assert_eq!(target.cmd(&["GET", "t"]), "first-partsecond-third");
    assert_eq!(target.cmd(&["GET", "n"]), "1");
    assert_eq!(target.cmd(&["GET", "after"]), "1");
    assert_eq!(report.commands_refused, 0);

    // A write whose fragments are not what it names is fatal, and nothing
    // of it reaches the target (the open MULTI dies with the connection).
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let bad = vec![
        single(0, &["SET", "ok", "1"]),
        fragment(0, &piece(b'a', 100)),
        fragment(0, &piece(b'b', 100)),
        streamed_write(vec![cmd(&["SET", "bad", ""])], false, &[(0, 2, 200, 2)]),
    ];
    append(&wal, &bad).await;
    target.cmd(&["FLUSHALL"]);
    let applier = start(apply_config(&target.url(), 100), &wal);
    let error = expect_fatal(applier).await;
    assert!(
        matches!(error, ApplyError::Inconsistent { .. })
            && error.to_string().contains("should be fragment 1"),
        "{error}"
    );
    assert_eq!(target.cmd(&["EXISTS", "bad"]), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_argument_over_the_targets_limit_holds_until_it_is_raised() {
    let target = RedisServer::start(&["--proto-max-bulk-len", "1mb"]);
    let wal_dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(wal_config(wal_dir.path())).await.unwrap();
    let value = vec![b'v'; 3 << 20];
    let records = vec![
        single(0, &["SET", "before", "1"]),
        fragment(0, &value[..2 << 20]),
        fragment(1, &value[2 << 20..]),
        streamed_write(vec![cmd(&["SET", "big", ""])], false, &[(0, 2, 3 << 20, 2)]),
        single(0, &["SET", "after", "1"]),
    ];
    let last = append(&wal, &records).await;
    let applier = start(apply_config(&target.url(), 100), &wal);
    // Held at the big entry with the reason, never sent (the target would
    // drop the connection on its header); what came before is applied.
    wait_for("the big entry blocked", || {
        applier
            .status
            .snapshot()
            .blocked
            .is_some_and(|blocked| blocked.log_id == LogId(4))
    })
    .await;
    let blocked = applier.status.snapshot().blocked.unwrap();
    assert!(
        blocked.error.contains("proto-max-bulk-len") && !blocked.transient,
        "{blocked:?}"
    );
    // The batch before it may still be committing when the hold shows
    // (the limit is found when the big entry is queued, after that batch
    // was sent).
    wait_for("the entry before it applied", || {
        target.cmd(&["GET", "before"]) == "1"
    })
    .await;
    assert_eq!(target.cmd(&["EXISTS", "big", "after"]), "0");
    // Raised on the target: the next attempt goes through.
    target.cmd(&["CONFIG", "SET", "proto-max-bulk-len", "512mb"]);
    applier.wait_applied(last).await;
    let report = applier.stop().await.snapshot();
    assert!(report.blocked.is_none(), "{report:?}");
    assert_eq!(target.cmd(&["STRLEN", "big"]), (3 << 20).to_string());
    assert_eq!(target.cmd(&["GET", "after"]), "1");

    // Under skip-and-record it is skipped, and its dead-letter record holds
    // the whole value, written from the fragments.
    target.cmd(&["FLUSHALL"]);
    target.cmd(&["CONFIG", "SET", "proto-max-bulk-len", "1mb"]);
    let dead_dir = tempfile::tempdir().unwrap();
    let cfg = ApplyConfig {
        dead_letter_dir: Some(dead_dir.path().to_path_buf()),
        on_refused: ferry::apply::OnRefused::SkipAndRecord,
        ..apply_config(&target.url(), 100)
    };
    let applier = start(cfg, &wal);
    applier.wait_applied(last).await;
    let report = applier.stop().await.snapshot();
    assert_eq!(report.entries_skipped, 1, "{report:?}");
    assert_eq!(target.cmd(&["EXISTS", "big"]), "0");
    assert_eq!(target.cmd(&["GET", "after"]), "1");
    let file = dead_dir.path().join("test-drainer-0.resp");
    assert_eq!(dead_letter_ids(&file), [4]);
    let record = std::fs::read(&file).unwrap();
    let mut command = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", value.len()).into_bytes();
    command.extend_from_slice(&value);
    command.extend_from_slice(b"\r\n");
    assert!(record.ends_with(&command), "the record lacks the value");
}
