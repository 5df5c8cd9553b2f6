//! A sync touches only the keyspace it owns (issue "Own only what is ours"),
//! with real redis-servers and real `ferry sync` processes:
//!
//! - [`two_syncs_share_one_target_in_their_own_dbs`]: sync A owns dbs 0
//!   and 1 of a target, sync B owns db 5 of the same target (its checkpoint
//!   in db 0, which A owns). Each survives the other's fallback snapshot,
//!   the other source's `FLUSHALL`, `FLUSHDB 0` and `SWAPDB 0 1`; a `SWAPDB`
//!   that would reach into the other's db is refused and shown in status;
//!   counters stay exact (nothing applied twice, nothing lost) and `ferry
//!   verify` is clean for each sync's dbs.
//! - [`existing_data_is_refused_kept_or_flushed`]: `ferry sync` onto a
//!   target whose owned dbs hold keys refuses with the precheck table and
//!   writes nothing; `--existing-data keep` loads over them and keeps the
//!   others; `--existing-data flush` deletes the owned dbs' keys and nothing
//!   else.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ferry::{ferry_bin, FerryProcess};
use common::{output_within, redis_cli_bin, RedisServer};

const CONVERGE: Duration = Duration::from_secs(60);

/// `key -> digest` of the data keys of `db` (ferry's own keys left out).
fn db_state(server: &RedisServer, db: u32) -> BTreeMap<String, String> {
    let db = db.to_string();
    let keys: Vec<String> = server
        .cmd(&["-n", &db, "--scan"])
        .lines()
        .filter(|k| !k.is_empty() && !k.starts_with("__ferry"))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        return BTreeMap::new();
    }
    let mut child = Command::new(redis_cli_bin())
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string(), "-n", &db])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for key in &keys {
            writeln!(stdin, "DEBUG DIGEST-VALUE {key}").expect("write");
        }
    }
    let out = child.wait_with_output().expect("redis-cli output");
    let digests: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(digests.len(), keys.len(), "one digest per key");
    keys.into_iter().zip(digests).collect()
}

/// Waits until `target` holds in each of `dbs` what `source` holds there.
fn wait_dbs_equal(
    source: &RedisServer,
    target: &RedisServer,
    dbs: &[u32],
    what: &str,
    context: &dyn Fn() -> String,
) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let differing: Vec<u32> = dbs
            .iter()
            .copied()
            .filter(|&db| db_state(source, db) != db_state(target, db))
            .collect();
        if differing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: dbs {differing:?} still differ after {CONVERGE:?}\nsource: {:?}\ntarget: {:?}\n{}",
            differing.first().map(|&db| db_state(source, db)),
            differing.first().map(|&db| db_state(target, db)),
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ferry verify` restricted to `dbs`, which must be clean.
fn verify_dbs(source: &RedisServer, target: &RedisServer, dbs: &[u32], what: &str) {
    let mut args = vec![
        "verify".to_string(),
        "--source".into(),
        source.url(),
        "--target".into(),
        target.url(),
        "--json".into(),
        "--passes".into(),
        "2".into(),
        "--qps".into(),
        "0".into(),
    ];
    for db in dbs {
        args.push("--db".into());
        args.push(db.to_string());
    }
    let out = output_within(
        Command::new(ferry_bin()).args(&args),
        Duration::from_secs(60),
    )
    .expect("ferry verify");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: no JSON from verify ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && report["equal"] == true,
        "{what}: verify of dbs {dbs:?} found differences: {report}"
    );
}

fn ferry_cmd(args: &[&str]) -> std::process::Output {
    output_within(
        Command::new(ferry_bin()).args(args),
        Duration::from_secs(30),
    )
    .expect("ferry")
}

fn admin(ferry: &FerryProcess, verb: &str) {
    let addr = ferry.admin_addr(CONVERGE);
    let out = ferry_cmd(&[verb, "--admin", &addr]);
    assert!(
        out.status.success(),
        "ferry {verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the sync, changes the source for longer than wal-ttl, restarts:
/// the applier gets a fallback snapshot, which it loads.
fn force_fallback_snapshot(ferry: &FerryProcess, source: &RedisServer, db: u32, what: &str) {
    let before = fallback_snapshots(ferry);
    admin(ferry, "stop-sync");
    let db = db.to_string();
    for i in 0..20 {
        source.cmd(&["-n", &db, "DEL", &format!("seed:{i}")]);
        source.cmd(&["-n", &db, "INCR", "counter"]);
    }
    // Past wal-ttl (2 s) and a retention pass: the entries are gone.
    std::thread::sleep(Duration::from_millis(3_500));
    admin(ferry, "restart-sync");
    let deadline = Instant::now() + CONVERGE;
    while fallback_snapshots(ferry) <= before {
        assert!(
            Instant::now() < deadline,
            "{what}: no fallback snapshot\n{}",
            ferry.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fallback_snapshots(ferry: &FerryProcess) -> u64 {
    ferry.fallback_snapshots()
}

fn sync_with(
    dir: &Path,
    name: &str,
    source: &RedisServer,
    target: &RedisServer,
    dbs: &str,
) -> FerryProcess {
    let config = dir.join(format!("{name}.toml"));
    // Entries that cannot be applied inside the owned keyspace are skipped
    // and recorded in the dead-letter file.
    std::fs::write(
        &config,
        "[wal]\nretention-interval = \"200ms\"\n[apply]\non-refused = \"skip-and-record\"\n",
    )
    .expect("config");
    FerryProcess::sync(
        &dir.join(name),
        &source.url(),
        &target.url(),
        &[
            "--id",
            name,
            "--dbs",
            dbs,
            "--wal-ttl",
            "2s",
            "--config",
            config.to_str().expect("utf-8"),
        ],
    )
}

fn seed(source: &RedisServer, db: u32, prefix: &str) {
    let db = db.to_string();
    for i in 0..30 {
        source.cmd(&[
            "-n",
            &db,
            "SET",
            &format!("seed:{i}"),
            &format!("{prefix}-{i}"),
        ]);
    }
    source.cmd(&["-n", &db, "RPUSH", "list", "a", "b", "c"]);
    source.cmd(&["-n", &db, "HSET", "hash", "f", prefix]);
}

/// The checkpoint of sync `id` (`v2 applied=…`, or `v3 applied=… src=…`
/// when its last entry was applied before it was durable).
fn checkpoint(target: &RedisServer, id: &str) -> String {
    target.cmd(&["GET", &format!("__ferry:checkpoint:{id}:0")])
}

#[test]
fn two_syncs_share_one_target_in_their_own_dbs() {
    let source_a = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let source_b = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    // A owns dbs 0 and 1; B owns db 5. Each source also has data in a db it
    // does not own on the target: it must never arrive there.
    seed(&source_a, 0, "a0");
    seed(&source_a, 1, "a1");
    seed(&source_a, 5, "a-not-owned");
    seed(&source_b, 5, "b5");
    seed(&source_b, 0, "b-not-owned");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sync_a = sync_with(dir.path(), "a", &source_a, &target, "0,1");
    // B starts once A holds db 0: its precheck accepts a target whose other
    // dbs hold another sync's keys.
    let context_a = || sync_a.log_tail(40);
    wait_dbs_equal(&source_a, &target, &[0, 1], "A's full sync", &context_a);
    let mut sync_b = sync_with(dir.path(), "b", &source_b, &target, "5");
    let context = || format!("{}\n{}", sync_a.log_tail(30), sync_b.log_tail(30));
    wait_dbs_equal(&source_b, &target, &[5], "B's full sync", &context);
    wait_dbs_equal(
        &source_a,
        &target,
        &[0, 1],
        "A after B's full sync",
        &context,
    );
    assert_eq!(target.cmd(&["-n", "5", "EXISTS", "seed:0"]), "1");
    assert_eq!(
        target.cmd(&["-n", "5", "GET", "seed:0"]),
        "b5-0",
        "A's db 5 leaked into the target"
    );
    assert_eq!(target.cmd(&["GET", "seed:0"]), "a0-0", "B's db 0 leaked");

    // Counters on both sides, incremented between every step: exact at the
    // end means nothing was applied twice or lost across all of it.
    let bump = |n: usize| {
        for _ in 0..n {
            source_a.cmd(&["INCR", "counter"]);
            source_b.cmd(&["-n", "5", "INCR", "counter"]);
        }
    };
    bump(10);

    // 1. A's fallback snapshot empties A's dbs only: B's db 5 and B's
    //    checkpoint (in db 0, which A owns) survive it.
    let b_checkpoint = checkpoint(&target, "b");
    assert!(b_checkpoint.contains(" applied="), "{b_checkpoint}");
    force_fallback_snapshot(&sync_a, &source_a, 0, "A's fallback");
    wait_dbs_equal(&source_a, &target, &[0, 1], "after A's fallback", &context);
    assert!(checkpoint(&target, "b").contains(" applied="));
    bump(10);
    wait_dbs_equal(&source_b, &target, &[5], "B after A's fallback", &context);

    // 2. B's fallback snapshot empties db 5 only.
    force_fallback_snapshot(&sync_b, &source_b, 5, "B's fallback");
    wait_dbs_equal(&source_b, &target, &[5], "after B's fallback", &context);
    wait_dbs_equal(
        &source_a,
        &target,
        &[0, 1],
        "A after B's fallback",
        &context,
    );
    bump(10);

    // 3. FLUSHALL on A's source: A's dbs are emptied, B's keys and
    //    checkpoint are not.
    source_a.cmd(&["FLUSHALL"]);
    bump(5);
    wait_dbs_equal(&source_a, &target, &[0, 1], "after FLUSHALL on A", &context);
    wait_dbs_equal(&source_b, &target, &[5], "B after FLUSHALL on A", &context);
    assert!(checkpoint(&target, "b").contains(" applied="));
    assert_eq!(target.cmd(&["-n", "5", "GET", "seed:25"]), "b5-25");

    // 4. FLUSHDB 0 on A's source (db 0 holds both syncs' checkpoints).
    seed(&source_a, 0, "a0-again");
    seed(&source_a, 1, "a1-again");
    source_a.cmd(&["FLUSHDB"]);
    bump(5);
    wait_dbs_equal(
        &source_a,
        &target,
        &[0, 1],
        "after FLUSHDB 0 on A",
        &context,
    );
    assert_eq!(target.cmd(&["-n", "1", "GET", "seed:3"]), "a1-again-3");
    assert!(checkpoint(&target, "b").contains(" applied="));

    // 5. SWAPDB 0 1 on A's source: both owned by A, swapped on the target;
    //    the checkpoints stay in db 0.
    seed(&source_a, 0, "a0-third");
    source_a.cmd(&["SWAPDB", "0", "1"]);
    bump(5);
    wait_dbs_equal(
        &source_a,
        &target,
        &[0, 1],
        "after SWAPDB 0 1 on A",
        &context,
    );
    assert_eq!(target.cmd(&["-n", "1", "GET", "seed:3"]), "a0-third-3");
    assert!(checkpoint(&target, "a").contains(" applied="));
    assert!(checkpoint(&target, "b").contains(" applied="));
    assert_eq!(
        target.cmd(&["-n", "1", "EXISTS", "__ferry:checkpoint:b:0"]),
        "0"
    );

    // 6. FLUSHALL on B's source: only db 5.
    source_b.cmd(&["FLUSHALL"]);
    bump(5);
    wait_dbs_equal(&source_b, &target, &[5], "after FLUSHALL on B", &context);
    wait_dbs_equal(
        &source_a,
        &target,
        &[0, 1],
        "A after FLUSHALL on B",
        &context,
    );
    assert!(checkpoint(&target, "a").contains(" applied="));

    // 7. SWAPDB 0 5 on B's source would give B's db 5 what B's source has
    //    in db 0 (never replicated) and write into A's db 0: refused before
    //    anything is sent, skipped (on-refused = skip-and-record) and
    //    recorded in the dead-letter file; the target's dbs are untouched.
    //    Swapped back on the source right away (refused too), so both sides
    //    agree again.
    seed(&source_b, 5, "b5-again");
    wait_dbs_equal(&source_b, &target, &[5], "B reseeded", &context);
    let target_db0 = db_state(&target, 0);
    let target_db5 = db_state(&target, 5);
    source_b.cmd(&["SWAPDB", "0", "5"]);
    source_b.cmd(&["SWAPDB", "0", "5"]);
    // A fence written after them: once it is on the target, the SWAPDBs
    // were dealt with.
    source_b.cmd(&["-n", "5", "SET", "fence", "after-swapdb"]);
    let deadline = Instant::now() + CONVERGE;
    while target.cmd(&["-n", "5", "GET", "fence"]) != "after-swapdb" {
        assert!(
            Instant::now() < deadline,
            "the fence never arrived\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let target_db5 = {
        let mut before = target_db5;
        before.insert(
            "fence".into(),
            target.cmd(&["-n", "5", "DEBUG", "DIGEST-VALUE", "fence"]),
        );
        before
    };
    let status = sync_b.status_json();
    let applier = &status["drainers"][0];
    assert_eq!(
        applier["entries_skipped"].as_u64(),
        Some(2),
        "the refused SWAPDBs are not skipped: {status}"
    );
    let refused = applier["last_refused"].to_string();
    assert!(
        refused.contains("SWAPDB") && refused.contains("does not own"),
        "last_refused does not name the SWAPDB: {status}"
    );
    let letters = applier["dead_letter_file"]
        .as_str()
        .expect("dead-letter file");
    let recorded = std::fs::read_to_string(letters).expect("read the dead-letter file");
    assert!(
        recorded.matches("SWAPDB 0 5").count() >= 2,
        "the dead-letter file does not hold both SWAPDBs: {recorded}"
    );
    assert_eq!(db_state(&target, 5), target_db5, "B's SWAPDB changed db 5");
    assert_eq!(
        db_state(&target, 0),
        target_db0,
        "B's SWAPDB reached A's db 0"
    );
    bump(5);

    // Exact counters: every INCR applied exactly once on each side.
    wait_dbs_equal(&source_a, &target, &[0, 1], "A at the end", &context);
    wait_dbs_equal(&source_b, &target, &[5], "B at the end", &context);
    assert_eq!(
        target.cmd(&["GET", "counter"]),
        source_a.cmd(&["GET", "counter"])
    );
    assert_eq!(
        target.cmd(&["-n", "5", "GET", "counter"]),
        source_b.cmd(&["-n", "5", "GET", "counter"])
    );
    verify_dbs(&source_a, &target, &[0, 1], "sync A");
    verify_dbs(&source_b, &target, &[5], "sync B");
    sync_a.terminate(Duration::from_secs(30));
    sync_b.terminate(Duration::from_secs(30));
}

#[test]
fn existing_data_is_refused_kept_or_flushed() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    seed(&source, 0, "src");
    let dir = tempfile::tempdir().expect("temp dir");

    // Refused: exit 1 with the precheck table naming the dbs and counts;
    // nothing written.
    let target = RedisServer::start(&[]);
    target.cmd(&["SET", "seed:1", "theirs"]);
    target.cmd(&["SET", "unrelated", "theirs"]);
    target.cmd(&["-n", "3", "SET", "other-db", "theirs"]);
    let mut refused = FerryProcess::sync(
        &dir.path().join("refused"),
        &source.url(),
        &target.url(),
        &[],
    );
    let deadline = Instant::now() + CONVERGE;
    let status = loop {
        if let Some(status) = refused.try_exit() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ferry sync did not refuse\n{}",
            refused.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "{}", refused.log_tail(30));
    let log = refused.log_tail(60);
    assert!(
        log.contains("precheck failed")
            && log.contains("| target data")
            && log.contains("db 0: 2 keys, db 3: 1 keys")
            && log.contains("FAIL"),
        "{log}"
    );
    assert_eq!(target.cmd(&["GET", "seed:1"]), "theirs");
    assert_eq!(target.cmd(&["GET", "__ferry:checkpoint:ferry:0"]), "");
    assert_eq!(target.cmd(&["DBSIZE"]), "2");

    // Owning only db 3 (`--dbs 3`): refused for db 3's one key.
    let mut only3 = FerryProcess::sync(
        &dir.path().join("only3"),
        &source.url(),
        &target.url(),
        &["--dbs", "3"],
    );
    let deadline = Instant::now() + CONVERGE;
    while only3.try_exit().is_none() {
        assert!(
            Instant::now() < deadline,
            "--dbs 3 was not refused\n{}",
            only3.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        only3.log_tail(60).contains("db 3: 1 keys"),
        "{}",
        only3.log_tail(60)
    );

    // keep: same-named keys replaced, the others kept, other dbs untouched.
    let mut keep = FerryProcess::sync(
        &dir.path().join("keep"),
        &source.url(),
        &target.url(),
        &["--existing-data", "keep", "--dbs", "0"],
    );
    let context = || keep.log_tail(30);
    let deadline = Instant::now() + CONVERGE;
    while target.cmd(&["GET", "seed:1"]) != "src-1" {
        assert!(Instant::now() < deadline, "keep: not loaded\n{}", context());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(target.cmd(&["GET", "unrelated"]), "theirs");
    assert_eq!(target.cmd(&["-n", "3", "GET", "other-db"]), "theirs");
    source.cmd(&["SET", "live", "1"]);
    let deadline = Instant::now() + CONVERGE;
    while target.cmd(&["GET", "live"]) != "1" {
        assert!(
            Instant::now() < deadline,
            "keep: not streaming\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    keep.terminate(Duration::from_secs(30));

    // flush: the owned db's keys go, other dbs stay.
    let target2 = RedisServer::start(&[]);
    target2.cmd(&["SET", "unrelated", "theirs"]);
    target2.cmd(&["-n", "3", "SET", "other-db", "theirs"]);
    let mut flush = FerryProcess::sync(
        &dir.path().join("flush"),
        &source.url(),
        &target2.url(),
        &["--existing-data", "flush", "--dbs", "0"],
    );
    let context = || flush.log_tail(30);
    wait_dbs_equal(&source, &target2, &[0], "flush", &context);
    assert_eq!(target2.cmd(&["EXISTS", "unrelated"]), "0");
    assert_eq!(target2.cmd(&["-n", "3", "GET", "other-db"]), "theirs");
    verify_dbs(&source, &target2, &[0], "flush");
    flush.terminate(Duration::from_secs(30));
}
