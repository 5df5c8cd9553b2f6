//! `ferry sync --two-way` against real redis-servers (issue 11, items 1 and
//! 5): concurrent writes to the same keys on both sides while ferry is
//! killed with SIGKILL again and again end with every increment counted
//! once and every pushed element present once, on both sides; nothing loops
//! once the writers stop; flushes are refused; the precheck covers both
//! directions.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::ferry::FerryProcess;
use common::resp::connect;
use common::side::Side;
use common::two_way::{
    expected, seeded_tags, side_state, side_writer, slot_writers, state, stop_and_wait_both_hold,
    wait_for, Done,
};
use common::RedisServer;

/// Both directions run: two appliers, both ONLINE.
fn established(sync: &FerryProcess) -> bool {
    let status = sync.status_json();
    status["drainers"]
        .as_array()
        .is_some_and(|d| d.len() == 2 && d.iter().all(|side| side["state"] == "ONLINE"))
}

fn counters(sync: &FerryProcess) -> Vec<(u64, u64)> {
    let status = sync.status_json();
    status["drainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|side| {
            (
                side["commands_applied"].as_u64().unwrap(),
                side["echoes"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Nothing loops: once at least `echoing` directions count echoes (each
/// side took the other's writes), idle, no applier applies anything and no
/// echo comes back. A few echoes may still be counted (held-back silent
/// batches written: one per partition per `SILENT_FLUSH`, 30 s, or when
/// data comes; seen as +1 to +4 on a loaded machine): a loop would count
/// them by the thousand.
fn assert_nothing_loops(sync: &FerryProcess, echoing: usize) {
    wait_for(
        "the directions to count echoes",
        Duration::from_secs(30),
        || {
            counters(sync)
                .iter()
                .filter(|(_, echoes)| *echoes > 0)
                .count()
                >= echoing
        },
    );
    thread::sleep(Duration::from_millis(1500));
    let settled = counters(sync);
    thread::sleep(Duration::from_secs(3));
    let now = counters(sync);
    for ((applied, echoes), (applied_then, echoes_then)) in now.iter().zip(&settled) {
        assert!(
            applied == applied_then && *echoes <= echoes_then + 10,
            "something went back and forth: {now:?}, settled {settled:?}"
        );
    }
}

/// `ferry sync --two-way` between `a` and `b`, established: its temp dir
/// (kept alive by the caller), data dir and process.
fn two_way_sync(
    a: &RedisServer,
    b: &RedisServer,
) -> (tempfile::TempDir, std::path::PathBuf, FerryProcess) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sync = FerryProcess::sync(&data, &a.url(), &b.url(), &["--two-way"]);
    wait_for(
        "two-way sync to be established",
        Duration::from_secs(60),
        || established(&sync),
    );
    (dir, data, sync)
}

#[test]
fn concurrent_writes_on_both_sides_converge_exactly_once_across_kill_9() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    a.cmd(&["SET", "seed", "1"]);
    a.cmd(&["INCRBY", "c", "100"]);
    let (_dir, data, mut sync) = two_way_sync(&a, &b);
    let (a_url, b_url) = (a.url(), b.url());
    assert_eq!(b.cmd(&["GET", "seed"]), "1");
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(log.contains("two-way sync established"), "{log}");

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = [(a.addr(), "a"), (b.addr(), "b")]
        .into_iter()
        .map(|(addr, name)| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || side_writer(addr, name, stop))
        })
        .collect();
    for round in 0..6u64 {
        thread::sleep(Duration::from_millis(350 + 70 * round));
        sync.kill9();
        std::fs::remove_file(data.join("admin.addr")).unwrap();
        sync = FerryProcess::sync(&data, &a_url, &b_url, &["--two-way"]);
    }
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let done: Vec<Done> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let (on_a, on_b) = (&done[0], &done[1]);
    assert!(
        on_a.incr > 100 && on_b.incr > 100,
        "too few writes: {on_a:?} {on_b:?}"
    );

    let want = expected(on_a, on_b);
    for server in [&a, &b] {
        wait_for(
            &format!("{} to hold every write of both sides once", server.addr()),
            Duration::from_secs(90),
            || state(server) == want,
        );
    }
    wait_for("both directions to run", Duration::from_secs(60), || {
        established(&sync)
    });

    // Since the last restart each side took the other's writes, so each
    // stream carries echoes (counted once read, held back or not).
    assert_nothing_loops(&sync, 2);
    for server in [&a, &b] {
        assert_eq!(state(server), want);
    }
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(!log.contains("full resync stored partition=1"), "{log}");
    sync.terminate(Duration::from_secs(20));
}

#[test]
fn two_way_refuses_flushes_and_a_target_with_data() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    a.cmd(&["SET", "k", "1"]);
    b.cmd(&["SET", "mine", "1"]);
    let dir = tempfile::tempdir().unwrap();

    // The first full sync A -> B would overwrite B's keys: refused.
    let mut refused = FerryProcess::sync(
        &dir.path().join("first"),
        &a.url(),
        &b.url(),
        &["--two-way"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !refused.has_exited() {
        assert!(Instant::now() < deadline, "{}", refused.log_tail(30));
        thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&refused.log).unwrap();
    assert!(log.contains("precheck") && log.contains("FAIL"), "{log}");
    assert_eq!(b.cmd(&["GET", "mine"]), "1");
    let _ = refused.try_exit();

    // A flush on one side is held, not carried to the other.
    b.cmd(&["DEL", "mine"]);
    let data = dir.path().join("data");
    let sync = FerryProcess::sync(&data, &a.url(), &b.url(), &["--two-way"]);
    wait_for(
        "two-way sync to be established",
        Duration::from_secs(60),
        || established(&sync),
    );
    b.cmd(&["SET", "from-b", "1"]);
    wait_for("a write of B on A", Duration::from_secs(30), || {
        a.cmd(&["GET", "from-b"]) == "1"
    });
    a.cmd(&["FLUSHDB"]);
    wait_for("the flush to be held", Duration::from_secs(30), || {
        let status = sync.status_json();
        status["drainers"][0]["state"] == "BLOCKED"
            && status["drainers"][0]["blocked"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("two-way sync refuses"))
    });
    assert_eq!(
        b.cmd(&["GET", "k"]),
        "1",
        "the flush reached the other side"
    );
    assert_eq!(b.cmd(&["GET", "from-b"]), "1");
    // The other direction goes on.
    b.cmd(&["SET", "after", "1"]);
    wait_for("B's next write on A", Duration::from_secs(30), || {
        a.cmd(&["GET", "after"]) == "1"
    });
    // And a switchover has nothing to switch.
    let admin = sync.admin_addr(Duration::from_secs(10));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["switchover", "--admin", &admin])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no direction to switch")
            || String::from_utf8_lossy(&out.stderr).contains("no direction to switch"),
        "{out:?}"
    );
}

fn ferry_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap()
}

fn conflict_lines(data: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data.join("conflicts.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn one_key_written_on_both_sides_before_either_saw_the_other_is_a_conflict() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    let (_dir, data, mut sync) = two_way_sync(&a, &b);
    let (a_url, b_url) = (a.url(), b.url());
    // One side after the other saw it: no conflict.
    a.cmd(&["SET", "turns", "a"]);
    wait_for("A's write on B", Duration::from_secs(30), || {
        b.cmd(&["GET", "turns"]) == "a"
    });
    b.cmd(&["SET", "turns", "b"]);
    wait_for("B's write on A", Duration::from_secs(30), || {
        a.cmd(&["GET", "turns"]) == "b"
    });
    // Both sides before either saw the other's: the appliers are held
    // while both write.
    let admin = sync.admin_addr(Duration::from_secs(10));
    let out = ferry_cli(&["stop-sync", "--admin", &admin]);
    assert!(out.status.success(), "{out:?}");
    a.cmd(&["SET", "both:key", "from-a"]);
    b.cmd(&["SET", "both:key", "from-b"]);
    a.cmd(&["INCR", "both:n"]);
    b.cmd(&["INCR", "both:n"]);
    b.cmd(&["SET", "only-b", "1"]);
    let out = ferry_cli(&["restart-sync", "--admin", &admin]);
    assert!(out.status.success(), "{out:?}");
    wait_for("two conflicts", Duration::from_secs(30), || {
        sync.status_json()["two_way"]["conflicts"] == 2
    });
    wait_for("the counter on both sides", Duration::from_secs(30), || {
        a.cmd(&["GET", "both:n"]) == "2" && b.cmd(&["GET", "both:n"]) == "2"
    });
    wait_for("B's other write on A", Duration::from_secs(30), || {
        a.cmd(&["GET", "only-b"]) == "1"
    });
    let lines = conflict_lines(&data);
    let mut keys: Vec<&str> = lines.iter().map(|l| l["key"].as_str().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, ["both:key", "both:n"], "{lines:?}");
    for line in &lines {
        assert_eq!(line["source"]["partition"], 0, "{line}");
        assert_eq!(line["target"]["partition"], 1, "{line}");
        assert!(line["source"]["log_id"].as_u64().unwrap() > 0, "{line}");
        assert!(line["target"]["unix_ms"].as_u64().unwrap() > 0, "{line}");
    }
    // The SETs crossed: each side holds the other's value, which verify
    // lists; nothing else differs.
    wait_for("the SETs to cross", Duration::from_secs(30), || {
        a.cmd(&["GET", "both:key"]) == "from-b" && b.cmd(&["GET", "both:key"]) == "from-a"
    });
    let out = ferry_cli(&["verify", "--source", &a_url, "--target", &b_url]);
    let shown =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains("both:key"), "{shown}");
    assert!(
        !shown.contains("both:n") && !shown.contains("only-b"),
        "{shown}"
    );
    // A restart goes on from the saved state: nothing is logged twice.
    thread::sleep(Duration::from_millis(1500));
    sync.kill9();
    std::fs::remove_file(data.join("admin.addr")).unwrap();
    let mut sync = FerryProcess::sync(&data, &a_url, &b_url, &["--two-way"]);
    a.cmd(&["SET", "after", "1"]);
    wait_for("a write after the restart", Duration::from_secs(30), || {
        b.cmd(&["GET", "after"]) == "1"
    });
    thread::sleep(Duration::from_millis(500));
    assert_eq!(sync.status_json()["two_way"]["conflicts"], 2);
    assert_eq!(conflict_lines(&data).len(), 2);
    sync.terminate(Duration::from_secs(20));
}

/// A conflict under a winner policy: both sides end with what the winner's
/// write left.
fn a_winner_policy_makes_both_sides_converge(policy: &str, winner_value: &str) {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sync = FerryProcess::sync(
        &data,
        &a.url(),
        &b.url(),
        &["--two-way", "--conflict", policy],
    );
    wait_for(
        "two-way sync to be established",
        Duration::from_secs(60),
        || established(&sync),
    );
    let admin = sync.admin_addr(Duration::from_secs(10));
    assert!(ferry_cli(&["stop-sync", "--admin", &admin])
        .status
        .success());
    a.cmd(&["SET", "both:key", "from-a"]);
    b.cmd(&["SET", "both:key", "from-b"]);
    a.cmd(&["SADD", "both:set", "a"]);
    b.cmd(&["DEL", "both:set"]);
    a.cmd(&["SET", "both:gone", "a"]);
    b.cmd(&["SET", "both:gone", "b"]);
    b.cmd(&["DEL", "both:gone"]);
    // In another db: the repair's connection goes back to db 0, where the
    // checkpoints it reads for the next repairs are.
    a.cmd(&["-n", "2", "SET", "both:db2", "from-a"]);
    b.cmd(&["-n", "2", "SET", "both:db2", "from-b"]);
    assert!(ferry_cli(&["restart-sync", "--admin", &admin])
        .status
        .success());
    wait_for("the repairs", Duration::from_secs(60), || {
        // Four pairs (both:gone's SET against B's SET and its DEL; B's DEL
        // of both:set deleted nothing, so Redis did not propagate it) and
        // three keys: both:gone's two pairs share one repair.
        let status = sync.status_json();
        status["two_way"]["conflicts"] == 4
            && status["two_way"]["repairs_owed"] == 0
            && status["two_way"]["repaired"] == 3
    });
    wait_for("both sides to agree", Duration::from_secs(60), || {
        let (on_a, on_b) = (a.cmd(&["GET", "both:key"]), b.cmd(&["GET", "both:key"]));
        let db2 = |s: &RedisServer| s.cmd(&["-n", "2", "GET", "both:db2"]);
        on_a == on_b
            && a.cmd(&["EXISTS", "both:gone"]) == b.cmd(&["EXISTS", "both:gone"])
            && db2(&a) == db2(&b)
    });
    assert_eq!(a.cmd(&["GET", "both:key"]), winner_value);
    assert_eq!(a.cmd(&["-n", "2", "GET", "both:db2"]), winner_value);
    let out = ferry_cli(&["verify", "--source", &a.url(), "--target", &b.url()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = conflict_lines(&data);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines.iter().all(|l| l["policy"] == policy), "{lines:?}");
}

#[test]
fn source_wins_makes_both_sides_end_with_the_sources_write() {
    a_winner_policy_makes_both_sides_converge("source-wins", "from-a");
}

#[test]
fn target_wins_makes_both_sides_end_with_the_targets_write() {
    a_winner_policy_makes_both_sides_converge("target-wins", "from-b");
}

#[test]
fn kill_9_while_two_way_is_being_established_establishes_it_once() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    for i in 0..2000 {
        a.cmd(&["SET", &format!("k{i}"), "v"]);
    }
    a.cmd(&["SET", "n", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (a_url, b_url) = (a.url(), b.url());
    // Killed at moments spread over the first full sync and the start of
    // the other direction.
    for delay_ms in [150u64, 300, 450, 600, 800] {
        let mut sync = FerryProcess::sync(&data, &a_url, &b_url, &["--two-way"]);
        thread::sleep(Duration::from_millis(delay_ms));
        sync.kill9();
        let _ = std::fs::remove_file(data.join("admin.addr"));
    }
    let sync = FerryProcess::sync(&data, &a_url, &b_url, &["--two-way"]);
    wait_for(
        "two-way sync to be established",
        Duration::from_secs(60),
        || established(&sync),
    );
    assert!(b.cmd(&["DBSIZE"]).parse::<i64>().unwrap() >= 2001);
    a.cmd(&["INCR", "n"]);
    b.cmd(&["INCR", "n"]);
    wait_for(
        "both increments on both sides",
        Duration::from_secs(30),
        || a.cmd(&["GET", "n"]) == "2" && b.cmd(&["GET", "n"]) == "2",
    );
    let out = ferry_cli(&["verify", "--source", &a_url, "--target", &b_url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(
        !log.contains("full resync stored partition=1"),
        "partition 1 never full-syncs: {log}"
    );
}

// ---------------------------------------------------------------------------
// Two Redis Clusters

use common::cluster::{key_in_slot, Cluster};

/// Both directions run between clusters: an applier per master of each
/// side, all ONLINE.
fn clusters_established(sync: &FerryProcess, masters: usize) -> bool {
    established_with(sync, masters, masters)
}

/// Both directions run: `forward` appliers below partition 1000 and
/// `backward` from it, all ONLINE.
fn established_with(sync: &FerryProcess, forward: usize, backward: usize) -> bool {
    let status = sync.status_json();
    status["drainers"].as_array().is_some_and(|d| {
        d.len() == forward + backward
            && d.iter().all(|side| side["state"] == "ONLINE")
            && d.iter()
                .filter(|side| side["partition"].as_u64() >= Some(1000))
                .count()
                == backward
    })
}

fn two_way_clusters(
    a: &Cluster,
    b: &Cluster,
) -> (tempfile::TempDir, std::path::PathBuf, FerryProcess) {
    two_way_clusters_with(a, b, &[])
}

fn two_way_clusters_with(
    a: &Cluster,
    b: &Cluster,
    extra: &[&str],
) -> (tempfile::TempDir, std::path::PathBuf, FerryProcess) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args = vec!["--two-way"];
    args.extend_from_slice(extra);
    let sync = FerryProcess::sync(&data, &a.seed_list(), &b.seed_list(), &args);
    let masters = a.master_ports().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !clusters_established(&sync, masters) {
        assert!(
            Instant::now() < deadline,
            "not established: {}",
            sync.log_tail(40)
        );
        thread::sleep(Duration::from_millis(100));
    }
    (dir, data, sync)
}

/// The test between two 3-master clusters: concurrent `INCR`,
/// `INCRBY`, `HINCRBY`, `LPUSH` on keys of every shard from both sides
/// while ferry is killed with SIGKILL again and again: every increment
/// counted once and every element present once on both clusters, and
/// nothing moves once idle (no echo goes back and forth).
#[test]
fn clusters_concurrent_writes_on_both_sides_converge_exactly_once_across_kill_9() {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    let tags = seeded_tags(Side::Cluster(&a));
    let (_dir, data, mut sync) = two_way_clusters(&a, &b);
    let (a_seeds, b_seeds) = (a.seed_list(), b.seed_list());
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(log.contains("two-way sync established"), "{log}");

    let stop = Arc::new(AtomicBool::new(false));
    let writers = slot_writers(Side::Cluster(&a), Side::Cluster(&b), &tags, &stop);
    for round in 0..4u64 {
        thread::sleep(Duration::from_millis(600 + 150 * round));
        sync.kill9();
        let _ = std::fs::remove_file(data.join("admin.addr"));
        sync = FerryProcess::sync(&data, &a_seeds, &b_seeds, &["--two-way"]);
    }
    thread::sleep(Duration::from_millis(700));
    stop_and_wait_both_hold(
        (Side::Cluster(&a), Side::Cluster(&b)),
        &tags,
        (&stop, writers),
        20,
        &[&sync],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !clusters_established(&sync, 3) {
        assert!(Instant::now() < deadline, "{}", sync.log_tail(40));
        thread::sleep(Duration::from_millis(100));
    }
    assert_nothing_loops(&sync, 2);
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(!log.contains("full resync stored partition=10"), "{log}");
    sync.terminate(Duration::from_secs(20));
    let conflicts = std::fs::metadata(data.join("conflicts.jsonl")).map_or(0, |m| m.len());
    eprintln!("conflict log: {conflicts} bytes");
}

/// kill -9 at each step of establishing two-way between clusters: once
/// the first master of B is marked (its partition's entry 1 durable, the
/// others not marked yet), and once every master is marked (the
/// established file not written). Each restart keeps the marks made and
/// marks the rest; the sync is established once: no backward partition
/// ever full-syncs, B holds A's data, and writes on both sides then
/// converge exactly once.
#[test]
fn clusters_kill_9_while_two_way_is_being_established_establishes_it_once() {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    for i in 0..600 {
        let key = format!("k{i}");
        a.call_key(&key, &["SET", &key, "v"]);
    }
    let tags = seeded_tags(Side::Cluster(&a));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (a_seeds, b_seeds) = (a.seed_list(), b.seed_list());
    let mut sync = FerryProcess::sync(&data, &a_seeds, &b_seeds, &["--two-way"]);
    for point in ["two-way-marked-one", "two-way-marked-all"] {
        let mark = sync.log_len();
        sync.respawn_with_env(&[("FERRY_TEST_SWITCHOVER_HOLD", point)]);
        wait_for(
            &format!("the hold at {point}"),
            Duration::from_secs(90),
            || {
                let log = sync.log_since(mark);
                log.contains("ferry holds here") && log.contains(point)
            },
        );
        let log = sync.log_since(mark);
        assert!(!log.contains("two-way sync established"), "{log}");
        sync.kill9();
        let _ = std::fs::remove_file(data.join("admin.addr"));
    }
    let mark = sync.log_len();
    sync.respawn_with_env(&[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !clusters_established(&sync, 3) {
        assert!(
            Instant::now() < deadline,
            "not established: {}",
            sync.log_tail(40)
        );
        thread::sleep(Duration::from_millis(100));
    }
    // The restart marked no master again: every backward partition had
    // its entry 1 already.
    let restart = sync.log_since(mark);
    let established = restart
        .lines()
        .find(|line| line.contains("two-way sync established"))
        .unwrap_or_else(|| panic!("{restart}"));
    assert!(!established.contains(" at 127.0.0.1:"), "{established}");
    for i in 0..600 {
        let key = format!("k{i}");
        assert_eq!(
            b.call_key(&key, &["GET", &key]).text().as_deref(),
            Some("v")
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers = slot_writers(Side::Cluster(&a), Side::Cluster(&b), &tags, &stop);
    thread::sleep(Duration::from_millis(1500));
    stop_and_wait_both_hold(
        (Side::Cluster(&a), Side::Cluster(&b)),
        &tags,
        (&stop, writers),
        0,
        &[&sync],
    );
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(!log.contains("full resync stored partition=10"), "{log}");
}

/// One key written on both clusters before either saw the other's write:
/// one conflict with both positions, `ferry verify` lists exactly that key.
#[test]
fn clusters_one_key_written_on_both_sides_is_a_conflict() {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    let (_dir, data, sync) = two_way_clusters(&a, &b);
    let key = key_in_slot("both", 7000);
    let other = key_in_slot("only-b", 13000);
    let turns = key_in_slot("turns", 200);
    a.call_key(&turns, &["SET", &turns, "a"]);
    wait_for("A's write on B", Duration::from_secs(30), || {
        b.call_key(&turns, &["GET", &turns]).text().as_deref() == Some("a")
    });
    b.call_key(&turns, &["SET", &turns, "b"]);
    wait_for("B's write on A", Duration::from_secs(30), || {
        a.call_key(&turns, &["GET", &turns]).text().as_deref() == Some("b")
    });
    let admin = sync.admin_addr(Duration::from_secs(10));
    let out = ferry_cli(&["stop-sync", "--admin", &admin]);
    assert!(out.status.success(), "{out:?}");
    a.call_key(&key, &["SET", &key, "from-a"]);
    b.call_key(&key, &["SET", &key, "from-b"]);
    b.call_key(&other, &["SET", &other, "1"]);
    let out = ferry_cli(&["restart-sync", "--admin", &admin]);
    assert!(out.status.success(), "{out:?}");
    wait_for("one conflict", Duration::from_secs(30), || {
        sync.status_json()["two_way"]["conflicts"] == 1
    });
    wait_for("the SETs to cross", Duration::from_secs(30), || {
        a.call_key(&key, &["GET", &key]).text().as_deref() == Some("from-b")
            && b.call_key(&key, &["GET", &key]).text().as_deref() == Some("from-a")
    });
    wait_for("B's other write on A", Duration::from_secs(30), || {
        a.call_key(&other, &["GET", &other]).text().as_deref() == Some("1")
    });
    let lines = conflict_lines(&data);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["key"], key.as_str(), "{line}");
    assert!(
        line["source"]["partition"].as_u64().unwrap() < 1000,
        "{line}"
    );
    assert!(
        line["target"]["partition"].as_u64().unwrap() >= 1000,
        "{line}"
    );
    assert!(line["source"]["log_id"].as_u64().unwrap() > 0, "{line}");
    assert!(line["target"]["log_id"].as_u64().unwrap() > 0, "{line}");
    let out = ferry_cli(&[
        "verify",
        "--source",
        &a.seed_list(),
        "--target",
        &b.seed_list(),
    ]);
    let shown =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains(&key), "{shown}");
    assert!(
        !shown.contains(&other) && !shown.contains(&turns),
        "{shown}"
    );
}

/// Between clusters under a winner policy: conflicts on keys of every
/// shard, repaired once the winner's shard is applied on the side where it
/// was applied last, leave both clusters with what the winner's writes
/// left (`ferry verify` clean).
fn clusters_a_winner_policy_makes_both_sides_converge(policy: &str, winner: &str) {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    let (_dir, data, sync) = two_way_clusters_with(&a, &b, &["--conflict", policy]);
    winner_policy_converges(
        Side::Cluster(&a),
        Side::Cluster(&b),
        &data,
        &sync,
        policy,
        winner,
    );
}

#[test]
fn clusters_source_wins_makes_both_sides_end_with_the_sources_writes() {
    clusters_a_winner_policy_makes_both_sides_converge("source-wins", "from-a");
}

#[test]
fn clusters_target_wins_makes_both_sides_end_with_the_targets_writes() {
    clusters_a_winner_policy_makes_both_sides_converge("target-wins", "from-b");
}

/// Waits until an applier is BLOCKED by an entry whose error contains
/// `error` (`what` names the entry).
fn wait_held(sync: &FerryProcess, error: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = sync.status_json();
        let held = status["drainers"].as_array().unwrap().iter().any(|d| {
            d["state"] == "BLOCKED"
                && d["blocked"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(error))
        });
        if held {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} is not held: {status:#}\n{}",
            sync.log_tail(30)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Between clusters a flush is held.
#[test]
fn clusters_two_way_refuses_flushes() {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    let (_dir, _data, sync) = two_way_clusters(&a, &b);
    let key = key_in_slot("k", 300);
    a.call_key(&key, &["SET", &key, "1"]);
    wait_for("A's write on B", Duration::from_secs(30), || {
        b.call_key(&key, &["GET", &key]).text().as_deref() == Some("1")
    });
    // A flush on one master of B: held by the applier of its partition.
    b.master_for_key(&key).call(&["FLUSHALL"]);
    wait_held(&sync, "two-way sync refuses", "the flush");
    assert_eq!(
        a.call_key(&key, &["GET", &key]).text().as_deref(),
        Some("1"),
        "the flush reached the other side"
    );
}

// ---------------------------------------------------------------------------
// A standalone server and a Redis Cluster, either way round

/// A standalone server and a 3-master cluster, `standalone_source` saying
/// which is A (`--source`).
struct MixedPair {
    server: RedisServer,
    cluster: Cluster,
    standalone_source: bool,
}

impl MixedPair {
    fn start(standalone_source: bool) -> MixedPair {
        MixedPair {
            server: RedisServer::start(&[]),
            cluster: Cluster::start(3, 0),
            standalone_source,
        }
    }

    fn a(&self) -> Side<'_> {
        match self.standalone_source {
            true => Side::Standalone(&self.server),
            false => Side::Cluster(&self.cluster),
        }
    }

    fn b(&self) -> Side<'_> {
        match self.standalone_source {
            true => Side::Cluster(&self.cluster),
            false => Side::Standalone(&self.server),
        }
    }

    /// The partitions of A (from 0) and of B (from 1000).
    fn partitions(&self) -> (usize, usize) {
        match self.standalone_source {
            true => (1, 3),
            false => (3, 1),
        }
    }

    /// What the data dir stores as the pair.
    fn stored(&self) -> &'static str {
        match self.standalone_source {
            true => "standalone-cluster",
            false => "cluster-standalone",
        }
    }

    fn sync(&self, data: &std::path::Path, extra: &[&str]) -> FerryProcess {
        let mut args = vec!["--two-way"];
        args.extend_from_slice(extra);
        FerryProcess::sync(data, &self.a().url(), &self.b().url(), &args)
    }

    /// Both directions run: an applier per partition of each side, the
    /// backward ones from 1000, all ONLINE.
    fn established(&self, sync: &FerryProcess) -> bool {
        let (forward, backward) = self.partitions();
        established_with(sync, forward, backward)
    }

    fn wait_established(&self, sync: &FerryProcess) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.established(sync) {
            assert!(
                Instant::now() < deadline,
                "not established: {}",
                sync.log_tail(40)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The test for a mixed pair: concurrent `INCR`, `INCRBY`,
/// `HINCRBY`, `LPUSH` on keys of every shard of the cluster from both
/// sides while ferry is killed with SIGKILL again and again: every
/// increment counted once and every element present once on both sides,
/// and nothing moves once idle.
fn mixed_concurrent_writes_converge_exactly_once_across_kill_9(standalone_source: bool) {
    let pair = MixedPair::start(standalone_source);
    let tags = seeded_tags(pair.a());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut sync = pair.sync(&data, &[]);
    pair.wait_established(&sync);
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(log.contains("two-way sync established"), "{log}");
    assert_eq!(
        std::fs::read_to_string(data.join("two-way.pair")).unwrap(),
        format!("{}\n", pair.stored())
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writers = slot_writers(pair.a(), pair.b(), &tags, &stop);
    for round in 0..4u64 {
        thread::sleep(Duration::from_millis(600 + 150 * round));
        sync.kill9();
        let _ = std::fs::remove_file(data.join("admin.addr"));
        sync = pair.sync(&data, &[]);
    }
    thread::sleep(Duration::from_millis(700));
    let done = stop_and_wait_both_hold((pair.a(), pair.b()), &tags, (&stop, writers), 20, &[&sync]);
    pair.wait_established(&sync);
    assert_nothing_loops(&sync, 2);
    for (i, tag) in tags.iter().enumerate() {
        let want = expected(&done[2 * i], &done[2 * i + 1]);
        assert_eq!(side_state(pair.a(), tag), want);
        assert_eq!(side_state(pair.b(), tag), want);
    }
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(!log.contains("full resync stored partition=10"), "{log}");
    sync.terminate(Duration::from_secs(20));
}

#[test]
fn standalone_with_cluster_concurrent_writes_converge_exactly_once_across_kill_9() {
    mixed_concurrent_writes_converge_exactly_once_across_kill_9(true);
}

#[test]
fn cluster_with_standalone_concurrent_writes_converge_exactly_once_across_kill_9() {
    mixed_concurrent_writes_converge_exactly_once_across_kill_9(false);
}

/// kill -9 of a mixed pair's ferry while the backward direction is being
/// established: during the first full sync, once A is prepared as the
/// backward appliers' target (nothing marked), once B's first master is
/// marked, and once every master is (a standalone B: its one mark), the
/// established file not written. Each restart keeps the marks made; the sync is established
/// once, no backward partition full-syncs, and writes converge.
fn mixed_kill_9_while_establishing_establishes_it_once(standalone_source: bool) {
    let pair = MixedPair::start(standalone_source);
    for i in 0..600 {
        let key = format!("k{i}");
        pair.a().call_key(&key, &["SET", &key, "v"]);
    }
    let tags = seeded_tags(pair.a());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Killed at moments spread over the first full sync first, each run
    // held before B's first mark at the latest (a small full sync takes
    // less than the delays), the last one at that hold: A prepared as the
    // backward appliers' target, nothing marked.
    let mut sync = pair.sync(&data, &[]);
    let prepared = [("FERRY_TEST_SWITCHOVER_HOLD", "two-way-prepared")];
    for delay_ms in [0u64, 200, 500] {
        thread::sleep(Duration::from_millis(delay_ms));
        let _ = std::fs::remove_file(data.join("admin.addr"));
        sync.respawn_with_env(&prepared);
    }
    for point in [
        "two-way-prepared",
        "two-way-marked-one",
        "two-way-marked-all",
    ] {
        let mark = sync.log_len();
        sync.respawn_with_env(&[("FERRY_TEST_SWITCHOVER_HOLD", point)]);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let log = sync.log_since(mark);
            if log.contains("ferry holds here") && log.contains(point) {
                break;
            }
            assert!(Instant::now() < deadline, "no hold at {point}: {log}");
            thread::sleep(Duration::from_millis(50));
        }
        let log = sync.log_since(mark);
        assert!(!log.contains("two-way sync established"), "{log}");
        sync.kill9();
        let _ = std::fs::remove_file(data.join("admin.addr"));
    }
    let mark = sync.log_len();
    sync.respawn_with_env(&[]);
    pair.wait_established(&sync);
    // The restart marked nothing again: every backward partition had its
    // entry 1 already.
    let restart = sync.log_since(mark);
    let established = restart
        .lines()
        .find(|line| line.contains("two-way sync established"))
        .unwrap_or_else(|| panic!("{restart}"));
    assert!(!established.contains(" at 127.0.0.1:"), "{established}");
    for i in 0..600 {
        let key = format!("k{i}");
        assert_eq!(pair.b().get(&key).as_deref(), Some("v"), "{key}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers = slot_writers(pair.a(), pair.b(), &tags, &stop);
    thread::sleep(Duration::from_millis(1500));
    stop_and_wait_both_hold((pair.a(), pair.b()), &tags, (&stop, writers), 0, &[&sync]);
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(!log.contains("full resync stored partition=10"), "{log}");
}

#[test]
fn standalone_with_cluster_kill_9_while_establishing_establishes_it_once() {
    mixed_kill_9_while_establishing_establishes_it_once(true);
}

#[test]
fn cluster_with_standalone_kill_9_while_establishing_establishes_it_once() {
    mixed_kill_9_while_establishing_establishes_it_once(false);
}

/// A standalone source and a cluster target: one key written on both
/// sides before either saw the other's write is one conflict with both
/// positions (A's partition 0, B's master's from 1000); `ferry verify`
/// lists exactly that key.
#[test]
fn standalone_with_cluster_one_key_written_on_both_sides_is_a_conflict() {
    let pair = MixedPair::start(true);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sync = pair.sync(&data, &[]);
    pair.wait_established(&sync);
    let (a, b) = (pair.a(), pair.b());
    let key = key_in_slot("both", 7000);
    let other = key_in_slot("only-b", 13000);
    let turns = key_in_slot("turns", 200);
    a.call_key(&turns, &["SET", &turns, "a"]);
    wait_for("A's write on B", Duration::from_secs(30), || {
        b.get(&turns).as_deref() == Some("a")
    });
    b.call_key(&turns, &["SET", &turns, "b"]);
    wait_for("B's write on A", Duration::from_secs(30), || {
        a.get(&turns).as_deref() == Some("b")
    });
    let admin = sync.admin_addr(Duration::from_secs(10));
    let out = ferry_cli(&["stop-sync", "--admin", &admin]);
    assert!(out.status.success(), "{out:?}");
    a.call_key(&key, &["SET", &key, "from-a"]);
    b.call_key(&key, &["SET", &key, "from-b"]);
    b.call_key(&other, &["SET", &other, "1"]);
    let out = ferry_cli(&["restart-sync", "--admin", &admin]);
    assert!(out.status.success(), "{out:?}");
    wait_for("one conflict", Duration::from_secs(30), || {
        sync.status_json()["two_way"]["conflicts"] == 1
    });
    wait_for("the SETs to cross", Duration::from_secs(30), || {
        a.get(&key).as_deref() == Some("from-b") && b.get(&key).as_deref() == Some("from-a")
    });
    wait_for("B's other write on A", Duration::from_secs(30), || {
        a.get(&other).as_deref() == Some("1")
    });
    // Nothing else: the turns, seen by each side before it wrote, are no
    // conflict.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(sync.status_json()["two_way"]["conflicts"], 1);
    let lines = conflict_lines(&data);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["key"], key.as_str(), "{line}");
    assert_eq!(line["source"]["partition"], 0, "{line}");
    assert!(
        line["target"]["partition"].as_u64().unwrap() >= 1000,
        "{line}"
    );
    let out = ferry_cli(&["verify", "--source", &a.url(), "--target", &b.url()]);
    let shown =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains(&key), "{shown}");
    assert!(
        !shown.contains(&other) && !shown.contains(&turns),
        "{shown}"
    );
}

/// Conflicts on keys of three slots (a string, a set, a key one side
/// deleted), written on both sides while the appliers are stopped: once
/// every repair is done both sides hold what the winner's writes left, and
/// `ferry verify` is clean.
fn winner_policy_converges(
    a: Side,
    b: Side,
    data: &std::path::Path,
    sync: &FerryProcess,
    policy: &str,
    winner: &str,
) {
    let (key, set, gone) = (
        key_in_slot("both", 100),
        key_in_slot("set", 7000),
        key_in_slot("gone", 13000),
    );
    let admin = sync.admin_addr(Duration::from_secs(10));
    assert!(ferry_cli(&["stop-sync", "--admin", &admin])
        .status
        .success());
    a.call_key(&key, &["SET", &key, "from-a"]);
    b.call_key(&key, &["SET", &key, "from-b"]);
    a.call_key(&set, &["SADD", &set, "a"]);
    b.call_key(&set, &["DEL", &set]);
    b.call_key(&set, &["SADD", &set, "b"]);
    a.call_key(&gone, &["SET", &gone, "a"]);
    b.call_key(&gone, &["SET", &gone, "b"]);
    b.call_key(&gone, &["DEL", &gone]);
    assert!(ferry_cli(&["restart-sync", "--admin", &admin])
        .status
        .success());
    wait_for("the repairs", Duration::from_secs(60), || {
        let status = sync.status_json();
        // The set's two conflicts (A's add against B's delete and B's add)
        // share one repair: at least one per key, never more than found.
        let repaired = status["two_way"]["repaired"].as_u64();
        status["two_way"]["conflicts"].as_u64() >= Some(3)
            && status["two_way"]["repairs_owed"] == 0
            && repaired >= Some(3)
            && repaired <= status["two_way"]["conflicts"].as_u64()
    });
    let members = |side: Side| {
        let reply = side.call_key(&set, &["SMEMBERS", &set]);
        let mut members: Vec<Option<String>> = reply.items().iter().map(|m| m.text()).collect();
        members.sort();
        members
    };
    let exists = |side: Side| side.call_key(&gone, &["EXISTS", &gone]).int();
    wait_for("both sides to agree", Duration::from_secs(60), || {
        a.get(&key) == b.get(&key) && members(a) == members(b) && exists(a) == exists(b)
    });
    assert_eq!(a.get(&key).as_deref(), Some(winner));
    assert_eq!(exists(a), i64::from(policy == "source-wins"));
    let out = ferry_cli(&["verify", "--source", &a.url(), "--target", &b.url()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = conflict_lines(data);
    let mut keys: Vec<&str> = lines.iter().map(|l| l["key"].as_str().unwrap()).collect();
    keys.sort();
    keys.dedup();
    let mut want = vec![key.as_str(), set.as_str(), gone.as_str()];
    want.sort();
    assert_eq!(keys, want, "{lines:?}");
    assert!(lines.iter().all(|l| l["policy"] == policy), "{lines:?}");
}

/// A mixed pair under a winner policy: conflicts on keys of every shard of
/// the cluster, each repaired on the side where the winner's write was
/// applied last (the standalone server, or the cluster master of the
/// key's slot), leave both sides with what the winner's writes left
/// (`ferry verify` clean).
fn mixed_a_winner_policy_makes_both_sides_converge(
    standalone_source: bool,
    policy: &str,
    winner: &str,
) {
    let pair = MixedPair::start(standalone_source);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sync = pair.sync(&data, &["--conflict", policy]);
    pair.wait_established(&sync);
    winner_policy_converges(pair.a(), pair.b(), &data, &sync, policy, winner);
}

/// The repairs touch the cluster B, by slot.
#[test]
fn standalone_with_cluster_source_wins_makes_both_sides_end_with_the_sources_writes() {
    mixed_a_winner_policy_makes_both_sides_converge(true, "source-wins", "from-a");
}

/// The repairs touch the standalone A.
#[test]
fn standalone_with_cluster_target_wins_makes_both_sides_end_with_the_targets_writes() {
    mixed_a_winner_policy_makes_both_sides_converge(true, "target-wins", "from-b");
}

/// The repairs touch the standalone B.
#[test]
fn cluster_with_standalone_source_wins_makes_both_sides_end_with_the_sources_writes() {
    mixed_a_winner_policy_makes_both_sides_converge(false, "source-wins", "from-a");
}

/// A cluster has db 0 only: a standalone side holding keys in another db
/// fails the precheck, whichever side it is (for a standalone target, the
/// check the other way round), and nothing is written; `--dbs 0` leaves
/// them out; a write in another db once running is held by the applier
/// into the cluster.
#[test]
fn mixed_pairs_refuse_a_standalone_side_with_keys_in_other_dbs() {
    for standalone_source in [true, false] {
        let pair = MixedPair::start(standalone_source);
        let mut conn = connect(&pair.server.addr());
        conn.call(&["SELECT", "3"]).unwrap();
        conn.call(&["SET", "in-db-3", "1"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // A standalone target's keys in db 3 would also be existing data.
        let mut sync = pair.sync(&data, &["--existing-data", "keep"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !sync.has_exited() {
            assert!(Instant::now() < deadline, "{}", sync.log_tail(30));
            thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(&sync.log).unwrap();
        assert!(
            log.contains("FAIL") && log.contains("db 3 (1 keys)") && log.contains("db 0 only"),
            "{log}"
        );
        let _ = sync.try_exit();
        for side in [pair.a(), pair.b()] {
            assert_eq!(side.ferry_keys(), Vec::<String>::new());
        }
        // The other dbs left out: the pair runs.
        let data = dir.path().join("data-db0");
        let sync = pair.sync(&data, &["--existing-data", "keep", "--dbs", "0"]);
        pair.wait_established(&sync);
        let key = key_in_slot("after", 9000);
        pair.b().call_key(&key, &["SET", &key, "1"]);
        wait_for("B's write on A", Duration::from_secs(30), || {
            pair.a().get(&key).as_deref() == Some("1")
        });
        assert_eq!(
            conn.call(&["GET", "in-db-3"]).unwrap().text().as_deref(),
            Some("1")
        );
        let mut sync = sync;
        sync.terminate(Duration::from_secs(20));
        // Every db owned, none but db 0 holding keys at the start: a later
        // write of the standalone side in db 3 is held by the applier into
        // the cluster.
        conn.call(&["DEL", "in-db-3"]).unwrap();
        let data = dir.path().join("data-all");
        let sync = pair.sync(&data, &["--existing-data", "keep"]);
        pair.wait_established(&sync);
        conn.call(&["SET", "late-in-db-3", "1"]).unwrap();
        wait_held(&sync, "db 3 is out of range", "the write in db 3");
        // The held entry holds its partition (the standalone side's
        // later writes wait behind it); the cluster's writes still come.
        let (cluster, standalone) = (Side::Cluster(&pair.cluster), Side::Standalone(&pair.server));
        let key = key_in_slot("still", 3000);
        cluster.call_key(&key, &["SET", &key, "1"]);
        wait_for(
            "the cluster's write on the standalone server",
            Duration::from_secs(30),
            || standalone.get(&key).as_deref() == Some("1"),
        );
    }
}
