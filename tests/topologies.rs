//! Topologies beyond one source into one target, with real redis-servers
//! and real `ferry sync` processes, each ending `ferry verify` clean for
//! each sync's keyspace, with counters exact (every `INCR` applied exactly
//! once across everything the test does):
//!
//! - [`one_source_into_two_targets`]: two syncs of one source, each into
//!   its own target; both converge, a fallback snapshot of one leaves the
//!   other alone, and each sync's heartbeat stays on the source and its
//!   checkpoint on its own target.
//! - [`cascade_a_to_b_to_c`]: sync 1 A → B, sync 2 B → C. C equals A for
//!   data keys through a `FLUSHALL` and fallback snapshots on both hops, and
//!   no `__ferry*` key of sync 1 (its checkpoint on B) or of sync 2 (its
//!   heartbeat on B) reaches C: ferry's own keys never propagate. Expiry
//!   deadlines on C are later than A's by the two hops' expire graces.
//! - [`cascade_with_a_key_filter_carries_a_swapdb`]: A → B with
//!   `--key-prefix`, B → C whole; a `SWAPDB` on A swaps only A's keys on
//!   B, and its replicated effects (owned keys only) reach C unrefused.
//! - [`two_sources_into_one_target_by_db_map`]: two sources both writing
//!   db 0, mapped to target dbs 1 and 2 (`--db-map`); each one's fallback
//!   snapshot and `FLUSHALL` leave the other's db alone.
//! - [`two_sources_into_one_target_db_by_key_prefix`]: two sources writing
//!   different prefixes (and each other's, which must not arrive) into the
//!   same target dbs (`--key-prefix`, `--exclude-key-prefix`); each one's
//!   fallback snapshot, `FLUSHALL` and mixed multi-key commands touch only
//!   its own keys.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ferry::{ferry_bin, FerryProcess};
use common::{output_within, redis_cli_bin, RedisServer};

const CONVERGE: Duration = Duration::from_secs(90);

/// One sync's keyspace as seen on its source and its target.
#[derive(Clone)]
struct View {
    /// (source db, target db).
    dbs: Vec<(u32, u32)>,
    include: Vec<&'static str>,
    exclude: Vec<&'static str>,
}

impl View {
    fn same_dbs(dbs: &[u32]) -> View {
        View {
            dbs: dbs.iter().map(|&db| (db, db)).collect(),
            include: Vec::new(),
            exclude: Vec::new(),
        }
    }

    fn owns(&self, key: &str) -> bool {
        !key.starts_with("__ferry")
            && (self.include.is_empty() || self.include.iter().any(|p| key.starts_with(p)))
            && !self.exclude.iter().any(|p| key.starts_with(p))
    }

    /// The `ferry verify` flags of this keyspace.
    fn verify_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.dbs.iter().any(|(s, t)| s != t) {
            let map: Vec<String> = self.dbs.iter().map(|(s, t)| format!("{s}={t}")).collect();
            args.push("--db-map".into());
            args.push(map.join(","));
        } else {
            for (db, _) in &self.dbs {
                args.push("--db".into());
                args.push(db.to_string());
            }
        }
        for prefix in &self.include {
            args.push("--key-prefix".into());
            args.push(prefix.to_string());
        }
        for prefix in &self.exclude {
            args.push("--exclude-key-prefix".into());
            args.push(prefix.to_string());
        }
        args
    }
}

/// `key -> digest` of the keys of `db` that `owned` accepts.
fn db_state(
    server: &RedisServer,
    db: u32,
    owned: &dyn Fn(&str) -> bool,
) -> BTreeMap<String, String> {
    let db = db.to_string();
    let keys: Vec<String> = server
        .cmd(&["-n", &db, "--scan"])
        .lines()
        .filter(|k| !k.is_empty() && owned(k))
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

/// The source dbs of `view` whose owned keys differ on the target.
fn differing(source: &RedisServer, target: &RedisServer, view: &View) -> Vec<(u32, u32)> {
    let owned = |key: &str| view.owns(key);
    view.dbs
        .iter()
        .copied()
        .filter(|&(s, t)| db_state(source, s, &owned) != db_state(target, t, &owned))
        .collect()
}

/// Waits until `target` holds in `view` what `source` holds there.
fn wait_equal(
    source: &RedisServer,
    target: &RedisServer,
    view: &View,
    what: &str,
    context: &dyn Fn() -> String,
) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let differ = differing(source, target, view);
        let Some(&(s, t)) = differ.first() else {
            return;
        };
        let owned = |key: &str| view.owns(key);
        assert!(
            Instant::now() < deadline,
            "{what}: dbs {differ:?} still differ after {CONVERGE:?}\nsource db {s}: {:?}\n\
             target db {t}: {:?}\n{}",
            db_state(source, s, &owned),
            db_state(target, t, &owned),
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The real `ferry verify` of `view`'s keyspace (and `extra` flags): clean,
/// and it checked keys.
fn verify_clean(
    source: &RedisServer,
    target: &RedisServer,
    view: &View,
    extra: &[&str],
    what: &str,
) {
    let mut args: Vec<String> = [
        "verify",
        "--source",
        &source.url(),
        "--target",
        &target.url(),
        "--json",
        "--passes",
        "3",
        "--qps",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(view.verify_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = output_within(
        Command::new(ferry_bin()).args(&args),
        Duration::from_secs(120),
    )
    .expect("ferry verify");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: no JSON from verify {args:?} ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && report["equal"] == true,
        "{what}: verify {args:?} found differences: {report}"
    );
    let checked: u64 = report["dbs"]
        .as_array()
        .map(|dbs| dbs.iter().filter_map(|d| d["keys_checked"].as_u64()).sum())
        .unwrap_or(0);
    assert!(checked > 0, "{what}: verify checked no key: {report}");
    for (db, (source_db, target_db)) in report["dbs"].as_array().unwrap().iter().zip(&view.dbs) {
        assert_eq!(
            (db["db"].as_u64(), db["target_db"].as_u64()),
            (Some(u64::from(*source_db)), Some(u64::from(*target_db))),
            "{what}: verify compared other dbs: {report}"
        );
    }
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

fn fallback_snapshots(ferry: &FerryProcess) -> u64 {
    ferry.fallback_snapshots()
}

/// Stops the sync, runs `change` on the source for longer than wal-ttl,
/// restarts: the applier gets a fallback snapshot, which it loads.
fn force_fallback_snapshot(ferry: &FerryProcess, change: &dyn Fn(), what: &str) {
    let before = fallback_snapshots(ferry);
    admin(ferry, "stop-sync");
    change();
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

/// `ferry sync` with a short wal-ttl (fallback snapshots on demand), entries
/// it must refuse skipped and recorded, and `flags`.
fn sync_with(
    dir: &Path,
    name: &str,
    source: &RedisServer,
    target: &RedisServer,
    flags: &[&str],
) -> FerryProcess {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        "[wal]\nretention-interval = \"200ms\"\n[apply]\non-refused = \"skip-and-record\"\n",
    )
    .expect("config");
    let mut args = vec![
        "--id",
        name,
        "--wal-ttl",
        "2s",
        "--config",
        config.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(flags);
    FerryProcess::sync(&dir.join(name), &source.url(), &target.url(), &args)
}

/// A few keys of every type under `prefix` in `db`.
fn seed(server: &RedisServer, db: u32, prefix: &str, tag: &str) {
    let db = db.to_string();
    for i in 0..20 {
        server.cmd(&[
            "-n",
            &db,
            "SET",
            &format!("{prefix}seed:{i}"),
            &format!("{tag}-{i}"),
        ]);
    }
    server.cmd(&["-n", &db, "RPUSH", &format!("{prefix}list"), "a", "b", tag]);
    server.cmd(&["-n", &db, "HSET", &format!("{prefix}hash"), "f", tag]);
    server.cmd(&["-n", &db, "SADD", &format!("{prefix}set"), "x", tag]);
    server.cmd(&["-n", &db, "ZADD", &format!("{prefix}zset"), "1", tag]);
    server.cmd(&["-n", &db, "SET", &format!("{prefix}ttl"), tag, "EX", "3600"]);
}

fn incr(server: &RedisServer, db: u32, key: &str, times: usize) {
    let db = db.to_string();
    for _ in 0..times {
        server.cmd(&["-n", &db, "INCR", key]);
    }
}

/// Every `__ferry*` key of `server`, as `db:key`.
fn internal_keys(server: &RedisServer) -> Vec<String> {
    let mut found = Vec::new();
    for db in 0..16 {
        let db = db.to_string();
        for key in server
            .cmd(&["-n", &db, "--scan", "--pattern", "__ferry*"])
            .lines()
        {
            if !key.is_empty() {
                found.push(format!("{db}:{key}"));
            }
        }
    }
    found.sort();
    found
}

fn entries_skipped(ferry: &FerryProcess) -> u64 {
    ferry.status_json()["drainers"][0]["entries_skipped"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn one_source_into_two_targets() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target1 = RedisServer::start(&[]);
    let target2 = RedisServer::start(&[]);
    seed(&source, 0, "", "s0");
    seed(&source, 2, "", "s2");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut one = sync_with(dir.path(), "one", &source, &target1, &[]);
    let mut two = sync_with(dir.path(), "two", &source, &target2, &[]);
    let context = || format!("{}\n{}", one.log_tail(30), two.log_tail(30));
    let every = View::same_dbs(&[0, 2]);
    wait_equal(&source, &target1, &every, "one's full sync", &context);
    wait_equal(&source, &target2, &every, "two's full sync", &context);

    incr(&source, 0, "counter", 30);
    source.cmd(&["-n", "2", "DEL", "seed:1", "seed:2"]);
    source.cmd(&["-n", "2", "LPUSH", "list", "new"]);
    incr(&source, 2, "counter", 10);
    wait_equal(&source, &target1, &every, "one streaming", &context);
    wait_equal(&source, &target2, &every, "two streaming", &context);

    // A fallback snapshot of one: two goes on streaming, untouched.
    let two_loads = two.status_json()["drainers"][0].to_string();
    force_fallback_snapshot(
        &one,
        &|| {
            incr(&source, 0, "counter", 20);
            source.cmd(&["DEL", "seed:3"]);
        },
        "one's fallback",
    );
    incr(&source, 0, "counter", 10);
    wait_equal(
        &source,
        &target1,
        &every,
        "one after its fallback",
        &context,
    );
    wait_equal(
        &source,
        &target2,
        &every,
        "two after one's fallback",
        &context,
    );
    assert_eq!(
        fallback_snapshots(&two),
        0,
        "two needed no snapshot: {two_loads}"
    );

    // Heartbeats on the source, one per sync; each checkpoint on its own
    // target only; nothing else of ferry's anywhere.
    let deadline = Instant::now() + CONVERGE;
    while internal_keys(&source).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no heartbeats: {:?}",
            internal_keys(&source)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        internal_keys(&source),
        ["0:__ferry:heartbeat:one", "0:__ferry:heartbeat:two"]
    );
    assert_eq!(internal_keys(&target1), ["0:__ferry:checkpoint:one:0"]);
    assert_eq!(internal_keys(&target2), ["0:__ferry:checkpoint:two:0"]);

    let expected = source.cmd(&["GET", "counter"]);
    assert_eq!(expected, "60");
    assert_eq!(target1.cmd(&["GET", "counter"]), expected);
    assert_eq!(target2.cmd(&["GET", "counter"]), expected);
    verify_clean(&source, &target1, &every, &[], "one");
    verify_clean(&source, &target2, &every, &[], "two");
    one.terminate(Duration::from_secs(30));
    two.terminate(Duration::from_secs(30));
}

#[test]
fn cascade_a_to_b_to_c() {
    let a = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let b = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let c = RedisServer::start(&[]);
    seed(&a, 0, "", "a0");
    seed(&a, 4, "", "a4");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ab = sync_with(dir.path(), "ab", &a, &b, &[]);
    let every = View::same_dbs(&[0, 4]);
    let context_ab = || ab.log_tail(30);
    wait_equal(&a, &b, &every, "A → B full sync", &context_ab);
    // B → C starts on a B that holds A's data and sync ab's checkpoint.
    let mut bc = sync_with(dir.path(), "bc", &b, &c, &[]);
    let context = || format!("{}\n{}", ab.log_tail(30), bc.log_tail(30));
    wait_equal(&a, &c, &every, "A → B → C full sync", &context);

    // Streaming through both hops: a transaction, TTLs, deletes.
    incr(&a, 0, "counter", 20);
    a.cmd(&["-n", "4", "EXPIRE", "seed:5", "600"]);
    a.cmd(&["-n", "4", "DEL", "seed:6"]);
    let multi =
        Command::new(redis_cli_bin())
            .args(["-h", "127.0.0.1", "-p", &a.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().expect("stdin").write_all(
                    b"MULTI\nINCR counter\nSET in-tx 1\nSELECT 4\nINCR counter\nEXEC\n",
                )?;
                child.wait()
            })
            .expect("redis-cli transaction");
    assert!(multi.success());
    wait_equal(&a, &c, &every, "A → C streaming", &context);

    // A FLUSHALL on A: B flushes keeping ab's checkpoint and bc's
    // heartbeat, and C gets B's flush (ferry's own keys in B's stream are
    // left out).
    a.cmd(&["FLUSHALL"]);
    seed(&a, 0, "", "a0-again");
    incr(&a, 0, "counter", 5);
    wait_equal(&a, &b, &every, "B after FLUSHALL", &context);
    wait_equal(&a, &c, &every, "C after FLUSHALL", &context);

    // A fallback snapshot on each hop.
    force_fallback_snapshot(
        &ab,
        &|| {
            incr(&a, 0, "counter", 10);
            a.cmd(&["DEL", "seed:7"]);
        },
        "ab's fallback",
    );
    wait_equal(&a, &c, &every, "C after ab's fallback", &context);
    force_fallback_snapshot(
        &bc,
        &|| {
            incr(&a, 0, "counter", 10);
            a.cmd(&["-n", "4", "SET", "late", "1"]);
        },
        "bc's fallback",
    );
    incr(&a, 4, "counter", 5);
    wait_equal(&a, &b, &every, "B at the end", &context);
    wait_equal(&a, &c, &every, "C at the end", &context);

    // ferry's own keys: A has ab's heartbeat, B ab's checkpoint and bc's
    // heartbeat, C bc's checkpoint and nothing else.
    assert_eq!(internal_keys(&a), ["0:__ferry:heartbeat:ab"]);
    assert_eq!(
        internal_keys(&b),
        ["0:__ferry:checkpoint:ab:0", "0:__ferry:heartbeat:bc"]
    );
    assert_eq!(internal_keys(&c), ["0:__ferry:checkpoint:bc:0"]);

    assert_eq!(a.cmd(&["GET", "counter"]), "25");
    assert_eq!(c.cmd(&["GET", "counter"]), "25");
    assert_eq!(c.cmd(&["-n", "4", "GET", "counter"]), "5");
    verify_clean(&a, &b, &every, &[], "A → B");
    // Each hop writes deadlines later by its expire grace (5m by default):
    // C's are later than A's by both.
    let pttl =
        |server: &RedisServer| -> i64 { server.cmd(&["PTTL", "ttl"]).parse().expect("PTTL") };
    let stacked = pttl(&c) - pttl(&a);
    assert!(
        (stacked - 600_000).abs() < 30_000,
        "C's deadline is {stacked} ms after A's, not two graces"
    );
    verify_clean(&a, &c, &every, &["--expire-grace", "10m"], "A → C");
    ab.terminate(Duration::from_secs(30));
    bc.terminate(Duration::from_secs(30));
}

#[test]
fn two_sources_into_one_target_by_db_map() {
    let source_a = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let source_b = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    // Both write db 0, with the same key names; A also has db 3, which it
    // does not replicate.
    seed(&source_a, 0, "", "a");
    seed(&source_a, 3, "", "a3-not-replicated");
    seed(&source_b, 0, "", "b");
    let view_a = View {
        dbs: vec![(0, 1)],
        include: vec![],
        exclude: vec![],
    };
    let view_b = View {
        dbs: vec![(0, 2)],
        ..view_a.clone()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sync_a = sync_with(dir.path(), "a", &source_a, &target, &["--db-map", "0=1"]);
    let context_a = || sync_a.log_tail(30);
    wait_equal(&source_a, &target, &view_a, "A's full sync", &context_a);
    // B's first full sync finds its target db 2 empty (A's keys are in
    // db 1, its checkpoint in db 0, neither owned by B).
    let mut sync_b = sync_with(dir.path(), "b", &source_b, &target, &["--db-map", "0=2"]);
    let context = || format!("{}\n{}", sync_a.log_tail(30), sync_b.log_tail(30));
    wait_equal(&source_b, &target, &view_b, "B's full sync", &context);
    wait_equal(&source_a, &target, &view_a, "A after B's", &context);
    assert_eq!(target.cmd(&["-n", "1", "GET", "seed:0"]), "a-0");
    assert_eq!(target.cmd(&["-n", "2", "GET", "seed:0"]), "b-0");
    assert_eq!(target.cmd(&["-n", "3", "DBSIZE"]), "0", "A's db 3 leaked");

    let bump = |n: usize| {
        incr(&source_a, 0, "counter", n);
        incr(&source_b, 0, "counter", n);
    };
    bump(10);

    // Each one's fallback snapshot empties its own target db only.
    force_fallback_snapshot(
        &sync_a,
        &|| {
            incr(&source_a, 0, "counter", 10);
            source_a.cmd(&["DEL", "seed:1"]);
        },
        "A's fallback",
    );
    bump(5);
    wait_equal(
        &source_a,
        &target,
        &view_a,
        "A after its fallback",
        &context,
    );
    wait_equal(
        &source_b,
        &target,
        &view_b,
        "B after A's fallback",
        &context,
    );
    force_fallback_snapshot(
        &sync_b,
        &|| {
            incr(&source_b, 0, "counter", 10);
            source_b.cmd(&["DEL", "seed:2"]);
        },
        "B's fallback",
    );
    bump(5);
    wait_equal(
        &source_b,
        &target,
        &view_b,
        "B after its fallback",
        &context,
    );
    wait_equal(
        &source_a,
        &target,
        &view_a,
        "A after B's fallback",
        &context,
    );

    // FLUSHALL on each source: its own target db only; both checkpoints
    // (db 0, owned by neither) stay.
    source_a.cmd(&["FLUSHALL"]);
    bump(5);
    wait_equal(&source_a, &target, &view_a, "after FLUSHALL on A", &context);
    wait_equal(
        &source_b,
        &target,
        &view_b,
        "B after FLUSHALL on A",
        &context,
    );
    assert_eq!(target.cmd(&["-n", "2", "GET", "seed:5"]), "b-5");
    seed(&source_a, 0, "", "a-again");
    source_b.cmd(&["FLUSHDB"]);
    seed(&source_b, 0, "", "b-again");
    bump(5);
    wait_equal(&source_b, &target, &view_b, "after FLUSHDB on B", &context);
    wait_equal(
        &source_a,
        &target,
        &view_a,
        "A after FLUSHDB on B",
        &context,
    );
    assert_eq!(target.cmd(&["-n", "1", "GET", "seed:5"]), "a-again-5");
    assert_eq!(
        internal_keys(&target),
        ["0:__ferry:checkpoint:a:0", "0:__ferry:checkpoint:b:0"]
    );
    assert_eq!(target.cmd(&["-n", "0", "DBSIZE"]), "2");

    // Counters exact: every INCR once (A's flushed ones are gone with it).
    assert_eq!(source_a.cmd(&["GET", "counter"]), "10");
    assert_eq!(target.cmd(&["-n", "1", "GET", "counter"]), "10");
    assert_eq!(source_b.cmd(&["GET", "counter"]), "5");
    assert_eq!(target.cmd(&["-n", "2", "GET", "counter"]), "5");
    assert_eq!(entries_skipped(&sync_a), 0);
    assert_eq!(entries_skipped(&sync_b), 0);
    verify_clean(&source_a, &target, &view_a, &[], "sync A");
    verify_clean(&source_b, &target, &view_b, &[], "sync B");
    sync_a.terminate(Duration::from_secs(30));
    sync_b.terminate(Duration::from_secs(30));
}

#[test]
fn two_sources_into_one_target_db_by_key_prefix() {
    let source_a = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let source_b = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    // A owns `a:` but not `a:tmp:`, B owns `b:`; each source also holds the
    // other's prefix and keys of neither, which must never arrive.
    for (source, own, other, tag) in [(&source_a, "a:", "b:", "A"), (&source_b, "b:", "a:", "B")] {
        seed(source, 0, own, tag);
        seed(source, 1, own, tag);
        seed(source, 0, other, &format!("{tag}-foreign"));
        seed(source, 0, "n:", &format!("{tag}-nobody"));
    }
    seed(&source_a, 0, "a:tmp:", "A-excluded");
    let view_a = View {
        dbs: vec![(0, 0), (1, 1)],
        include: vec!["a:"],
        exclude: vec!["a:tmp:"],
    };
    let view_b = View {
        dbs: vec![(0, 0), (1, 1)],
        include: vec!["b:"],
        exclude: vec![],
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sync_a = sync_with(
        dir.path(),
        "a",
        &source_a,
        &target,
        &["--key-prefix", "a:", "--exclude-key-prefix", "a:tmp:"],
    );
    let context_a = || sync_a.log_tail(30);
    wait_equal(&source_a, &target, &view_a, "A's full sync", &context_a);
    // B's first full sync: target db 0 holds A's keys, but none of B's
    // prefix, so it starts (no --existing-data needed).
    let mut sync_b = sync_with(dir.path(), "b", &source_b, &target, &["--key-prefix", "b:"]);
    let context = || format!("{}\n{}", sync_a.log_tail(30), sync_b.log_tail(30));
    wait_equal(&source_b, &target, &view_b, "B's full sync", &context);
    wait_equal(&source_a, &target, &view_a, "A after B's", &context);
    let nobody = |target: &RedisServer| {
        (0..2)
            .map(|db| {
                db_state(target, db, &|k: &str| {
                    k.starts_with("n:") || k.starts_with("a:tmp:")
                })
            })
            .filter(|state| !state.is_empty())
            .count()
    };
    assert_eq!(nobody(&target), 0, "keys of neither sync arrived");

    let bump = |n: usize| {
        incr(&source_a, 0, "a:counter", n);
        incr(&source_b, 0, "b:counter", n);
    };
    bump(10);

    // Commands naming both prefixes: keys that stand alone go without the
    // other's; a rename out of the prefix deletes; a COPY out changes
    // nothing owned.
    source_a.cmd(&["DEL", "a:seed:0", "b:seed:0", "n:seed:0"]);
    source_a.cmd(&["MSET", "a:m", "1", "b:m", "2", "n:m", "3"]);
    source_a.cmd(&["RENAME", "a:seed:1", "n:renamed"]);
    source_a.cmd(&["COPY", "a:seed:2", "b:copied"]);
    source_b.cmd(&["UNLINK", "a:seed:3", "b:seed:3"]);
    // A mixed command whose keys do not stand alone is refused, skipped
    // (on-refused = skip-and-record) and recorded; A drops the key it made
    // so both sides agree again.
    source_a.cmd(&["SUNIONSTORE", "a:union", "a:set", "b:set"]);
    source_a.cmd(&["DEL", "a:union"]);
    bump(5);
    wait_equal(
        &source_a,
        &target,
        &view_a,
        "A after mixed commands",
        &context,
    );
    wait_equal(
        &source_b,
        &target,
        &view_b,
        "B after mixed commands",
        &context,
    );
    assert_eq!(
        target.cmd(&["GET", "b:seed:0"]),
        "B-0",
        "A's DEL reached B's key"
    );
    assert_eq!(target.cmd(&["GET", "b:m"]), "", "A's MSET wrote B's prefix");
    assert_eq!(target.cmd(&["EXISTS", "b:copied", "n:renamed", "n:m"]), "0");
    assert_eq!(
        target.cmd(&["GET", "a:seed:3"]),
        "A-3",
        "B's UNLINK reached A's key"
    );
    let deadline = Instant::now() + CONVERGE;
    while entries_skipped(&sync_a) < 1 {
        assert!(
            Instant::now() < deadline,
            "SUNIONSTORE not skipped\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = sync_a.status_json();
    let refused = status["drainers"][0]["last_refused"].to_string();
    assert!(refused.contains("SUNIONSTORE"), "{status}");
    let letters = status["drainers"][0]["dead_letter_file"]
        .as_str()
        .expect("dead-letter file");
    let recorded = std::fs::read_to_string(letters).expect("dead-letter file");
    assert!(recorded.contains("SUNIONSTORE"), "{recorded}");

    // Each one's fallback snapshot reloads its own keys only.
    force_fallback_snapshot(
        &sync_a,
        &|| {
            incr(&source_a, 0, "a:counter", 10);
            source_a.cmd(&["DEL", "a:seed:4"]);
            source_a.cmd(&["SET", "b:during-a-fallback", "x"]);
        },
        "A's fallback",
    );
    bump(5);
    wait_equal(
        &source_a,
        &target,
        &view_a,
        "A after its fallback",
        &context,
    );
    wait_equal(
        &source_b,
        &target,
        &view_b,
        "B after A's fallback",
        &context,
    );
    force_fallback_snapshot(
        &sync_b,
        &|| {
            incr(&source_b, 0, "b:counter", 10);
            source_b.cmd(&["-n", "1", "DEL", "b:seed:5"]);
        },
        "B's fallback",
    );
    bump(5);
    wait_equal(
        &source_b,
        &target,
        &view_b,
        "B after its fallback",
        &context,
    );
    wait_equal(
        &source_a,
        &target,
        &view_a,
        "A after B's fallback",
        &context,
    );

    // FLUSHALL on each source: only its own prefix, in every db.
    source_a.cmd(&["FLUSHALL"]);
    bump(5);
    wait_equal(&source_a, &target, &view_a, "after FLUSHALL on A", &context);
    wait_equal(
        &source_b,
        &target,
        &view_b,
        "B after FLUSHALL on A",
        &context,
    );
    assert_eq!(target.cmd(&["-n", "1", "GET", "b:seed:6"]), "B-6");
    seed(&source_a, 0, "a:", "A-again");
    source_b.cmd(&["FLUSHALL", "ASYNC"]);
    seed(&source_b, 1, "b:", "B-again");
    bump(5);
    wait_equal(&source_b, &target, &view_b, "after FLUSHALL on B", &context);
    wait_equal(
        &source_a,
        &target,
        &view_a,
        "A after FLUSHALL on B",
        &context,
    );
    assert_eq!(target.cmd(&["GET", "a:seed:6"]), "A-again-6");
    assert_eq!(nobody(&target), 0, "keys of neither sync arrived");
    assert_eq!(
        internal_keys(&target),
        ["0:__ferry:checkpoint:a:0", "0:__ferry:checkpoint:b:0"]
    );

    // Counters exact.
    assert_eq!(source_a.cmd(&["GET", "a:counter"]), "10");
    assert_eq!(target.cmd(&["GET", "a:counter"]), "10");
    assert_eq!(source_b.cmd(&["GET", "b:counter"]), "5");
    assert_eq!(target.cmd(&["GET", "b:counter"]), "5");
    assert_eq!(entries_skipped(&sync_a), 1, "only the SUNIONSTORE");
    assert_eq!(entries_skipped(&sync_b), 0);
    verify_clean(&source_a, &target, &view_a, &[], "sync A");
    verify_clean(&source_b, &target, &view_b, &[], "sync B");
    sync_a.terminate(Duration::from_secs(30));
    sync_b.terminate(Duration::from_secs(30));
}

/// A cascade whose first hop has a key filter: a `SWAPDB` on A is applied
/// on B as a swap of the owned keys only (a script), and Redis replicates
/// the script's effects to the next hop. Those must name only owned keys
/// (no `__ferry*` temporary names), so B → C applies them and C follows B:
/// nothing refused or skipped on either hop, B's own keys stay in their
/// dbs on B and on C, and ferry's own keys never reach C.
#[test]
fn cascade_with_a_key_filter_carries_a_swapdb() {
    let a = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let b = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let c = RedisServer::start(&[]);
    // The same key names in both dbs (the swap must exchange values of
    // keys both dbs hold), keys A → B does not own, and B's own keys.
    for db in [0, 1] {
        seed(&a, db, "app:", &format!("a{db}"));
        seed(&a, db, "other:", &format!("a{db}-not-replicated"));
        seed(&b, db, "local:", &format!("b{db}"));
    }
    a.cmd(&["-n", "1", "SET", "app:only-in-1", "x"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ab = sync_with(dir.path(), "ab", &a, &b, &["--key-prefix", "app:"]);
    let hop1 = View {
        dbs: vec![(0, 0), (1, 1)],
        include: vec!["app:"],
        exclude: vec![],
    };
    let every = View::same_dbs(&[0, 1]);
    let context_ab = || ab.log_tail(30);
    wait_equal(&a, &b, &hop1, "A → B full sync", &context_ab);
    let mut bc = sync_with(dir.path(), "bc", &b, &c, &["--existing-data", "refuse"]);
    let context = || format!("{}\n{}", ab.log_tail(30), bc.log_tail(30));
    wait_equal(&b, &c, &every, "B → C full sync", &context);

    incr(&a, 0, "app:counter", 10);
    a.cmd(&["SWAPDB", "0", "1"]);
    incr(&a, 0, "app:counter", 3);
    incr(&a, 1, "app:counter", 5);
    wait_equal(&a, &b, &hop1, "B after SWAPDB on A", &context);
    wait_equal(&b, &c, &every, "C after SWAPDB on A", &context);
    // The swap moved A's owned keys on B; B's own keys stayed put.
    assert_eq!(b.cmd(&["GET", "app:seed:0"]), "a1-0");
    assert_eq!(b.cmd(&["-n", "1", "GET", "app:seed:0"]), "a0-0");
    assert_eq!(b.cmd(&["GET", "app:only-in-1"]), "x");
    assert_eq!(b.cmd(&["GET", "local:seed:0"]), "b0-0");
    assert_eq!(c.cmd(&["GET", "local:seed:0"]), "b0-0");
    assert_eq!(c.cmd(&["-n", "1", "GET", "app:counter"]), "15");
    assert_eq!(c.cmd(&["GET", "app:counter"]), "3");
    for server in [&b, &c] {
        for db in ["0", "1"] {
            let stray = server.cmd(&["-n", db, "--scan", "--pattern", "*ferry-swap*"]);
            assert!(stray.trim().is_empty(), "temporary names left: {stray}");
        }
    }
    assert_eq!(entries_skipped(&ab), 0);
    assert_eq!(entries_skipped(&bc), 0, "{}", bc.status_json());
    assert_eq!(internal_keys(&c), ["0:__ferry:checkpoint:bc:0"]);
    verify_clean(&a, &b, &hop1, &[], "A → B");
    verify_clean(&b, &c, &every, &[], "B → C");
    verify_clean(&a, &c, &hop1, &["--expire-grace", "10m"], "A → C");
    ab.terminate(Duration::from_secs(30));
    bc.terminate(Duration::from_secs(30));
}
