//! Faults under load with a Redis Cluster on one side (issue 10, item 5):
//! real `ferry sync` processes, real clusters (tests/common/cluster.rs) and
//! real standalone servers, INCR counters written all along so that an
//! increment lost or applied twice shows.
//!
//! - [`kill_9_mid_full_sync_of_a_cluster_source`] (and
//!   [`kill_9_mid_full_sync_of_a_cluster_source_into_a_cluster`], 3 -> 3
//!   masters): one source shard holds far more data than the others, so its
//!   full sync is still running when the others' are stored; ferry is
//!   SIGKILLed right then and started again on the same data dir. Only that
//!   shard full-resyncs again (its master's `sync_full` goes 1 -> 2, the
//!   others' stay 1; ferry's log and rows say the same). Then ferry is
//!   SIGKILLed again while its applier loads that shard's new snapshot into
//!   the target (a load scoped to the shard's slots): the load runs again
//!   from the start, for that shard only, and nothing full-resyncs.
//! - [`a_target_master_paused_for_a_while`] and
//!   [`a_target_master_shut_down_for_a_while`]: one master of a 3-master
//!   cluster target (no replica: no failover) SIGSTOPped, or shut down
//!   (`SHUTDOWN SAVE`) and started again from its own dir, for ~10 s while
//!   the source is written. The applier shows the error in its status
//!   (OFFLINE with `last_error`) and **waits**: nothing more reaches the
//!   other masters while one is away (a session needs every master: it
//!   fences each at its start, and a batch's pieces go to all of them; after
//!   the cluster's node timeout the other masters answer `CLUSTERDOWN`
//!   anyway). Once the master is back it converges, without a full resync.
//!   ferry runs with `reply-timeout = "1s"` as in tests/crash.rs, so that
//!   the session ends and is retried. The status also names the target as
//!   the seed list it was given.
//! - [`a_standalone_target_shut_down_for_a_while`]: the same ~10 s outage
//!   (SIGSTOP, then `SHUTDOWN SAVE` and a restart) of a standalone target.
//!   tests/crash.rs covers shorter ones (`paused_target_resumes_without_loss`:
//!   3 s SIGSTOP twice; `aof_*_target_survives_sigkills`: kill -9 and down
//!   0.5 to 1.5 s).
//! - [`a_frozen_standalone_target_shows_stalled_then_applies_on`] and
//!   [`a_frozen_cluster_target_master_shows_stalled_then_applies_on`]: with
//!   the default `reply-timeout` (60 s) a target SIGSTOPped shows STALLED in
//!   `ferry status` (the target named, for how long) from 5 s on, and the
//!   applier goes on once it answers, within the same session.
//!
//! Every test ends with the target equal to the source, every counter equal
//! to the number of increments made, `ferry verify` clean (the real binary),
//! and the source's `sync_full` counters where the faults allow them.
//!
//! Run: `cargo test --test cluster_faults -- --test-threads 2` (each test
//! starts its own servers; well under a minute each on a loaded box).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{dump_cluster, dump_difference, dump_strings, spread_keys, Cluster};
use common::ferry::log::FULL_SYNC_STORED;
use common::ferry::{assert_verify_clean, signal, FerryProcess};
use common::resp::{self, Resp};
use common::{FixedPortRedis, RedisServer};
use ferry::redis::command::key_hash_slot;

/// Longest wait for ferry to reach a state or the target to converge.
const CONVERGE: Duration = Duration::from_secs(180);

/// Counters every writer round increments once each.
const COUNTERS: usize = 30;

/// How long a target stays away in the outage tests.
const OUTAGE: Duration = Duration::from_secs(10);

fn counter_keys() -> Vec<String> {
    spread_keys("ctr", COUNTERS)
}

// ---------------------------------------------------------------------------
// Reading both sides.

fn wait_for(what: &str, ferry: &FerryProcess, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let error = match check() {
            Ok(()) => return,
            Err(error) => error,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in {CONVERGE:?}: {error}\n{}",
            ferry.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A side of a sync: a standalone server or a cluster.
enum Side {
    Standalone(RedisServer),
    Cluster(Cluster),
}

impl Side {
    /// The URL ferry is given (a cluster: every node as a seed list).
    fn url(&self) -> String {
        match self {
            Side::Standalone(server) => server.url(),
            Side::Cluster(cluster) => cluster.seed_list(),
        }
    }

    fn dump(&self) -> BTreeMap<String, String> {
        match self {
            Side::Standalone(server) => dump_strings(&server.addr()),
            Side::Cluster(cluster) => dump_cluster(cluster),
        }
    }
}

/// Waits until `target` holds exactly `source`'s keys and values.
fn wait_converged(
    source: impl Fn() -> BTreeMap<String, String>,
    target: impl Fn() -> BTreeMap<String, String>,
    ferry: &FerryProcess,
    when: &str,
) {
    wait_for(&format!("target converged {when}"), ferry, || {
        let (source, target) = (source(), target());
        if source == target {
            Ok(())
        } else {
            Err(dump_difference(&source, &target))
        }
    });
}

/// Every counter equal to `rounds` on the source and on the target.
fn assert_counters(
    source: &BTreeMap<String, String>,
    target: &BTreeMap<String, String>,
    rounds: usize,
) {
    for key in counter_keys() {
        assert_eq!(
            source.get(&key).map(String::as_str),
            Some(rounds.to_string().as_str()),
            "source {key}"
        );
        assert_eq!(
            target.get(&key),
            source.get(&key),
            "target {key}: an INCR lost or applied twice"
        );
    }
}

/// The listener rows of `ferry status --json`.
fn listeners(ferry: &FerryProcess) -> Vec<serde_json::Value> {
    ferry.status_json()["listeners"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The applier rows of `ferry status --json`.
fn appliers(ferry: &FerryProcess) -> Vec<serde_json::Value> {
    ferry.status_json()["drainers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `INFO stats` `sync_full` of the node on `port`: full resyncs it served.
fn sync_full(port: u16) -> u64 {
    let mut conn = resp::connect(&format!("127.0.0.1:{port}"));
    let info = conn
        .call(&["INFO", "stats"])
        .expect("INFO stats")
        .text()
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix("sync_full:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sync_full in INFO of {port}"))
}

/// Sets its flag when dropped: a writer thread of a scope stops when the
/// test panics in the scope (else the scope would wait for it forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs a writer of counter rounds (`write` once per round, then a short
/// pause) until `done`; the rounds written are counted in `rounds`.
fn writer_loop(rounds: &AtomicUsize, done: &AtomicBool, mut write: impl FnMut()) {
    while !done.load(Ordering::Relaxed) {
        write();
        rounds.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(30));
    }
}

// ---------------------------------------------------------------------------
// 1. kill -9 of ferry in the middle of a cluster source's full sync.

/// Keys written to the big shard: its full sync (the listener storing the
/// RDB) takes seconds where the others' take a fraction of one.
const BIG_KEYS: usize = 200_000;

/// A 3-master cluster source (no replicas: ferry is each master's only
/// replica, so `sync_full` counts ferry's full resyncs) with a backlog that
/// holds what the writer sends while ferry is down.
fn start_source_cluster() -> Cluster {
    let cluster = Cluster::start(3, 0);
    for node in cluster.nodes() {
        assert_eq!(
            node.call(&["CONFIG", "SET", "repl-backlog-size", "256mb"]),
            Resp::Simple("OK".into())
        );
    }
    cluster
}

/// `SET` of `count` keys `<prefix>:<i>` whose slots the master on `port`
/// serves, values of 200 pseudo-random hex digits (the RDB's LZF would
/// shrink a repeated value to nothing).
fn fill_shard(cluster: &Cluster, port: u16, prefix: &str, count: usize) {
    let shard = cluster.shard_of_master(port);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(port);
    let mut value = || {
        (0..25)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                format!("{:08x}", state as u32)
            })
            .collect::<String>()
    };
    let keys = (0..)
        .map(|i| format!("{prefix}:{i}"))
        .filter(|key| shard.master.serves(key_hash_slot(key.as_bytes())))
        .take(count);
    let mut batch = Vec::with_capacity(10_000);
    let flush = |batch: &mut Vec<(String, Vec<String>)>| {
        for reply in cluster.pipeline_keys(batch) {
            assert_eq!(reply, Resp::Simple("OK".into()), "SET reply");
        }
        batch.clear();
    };
    for key in keys {
        batch.push((key.clone(), vec!["SET".into(), key, value()]));
        if batch.len() == 10_000 {
            flush(&mut batch);
        }
    }
    flush(&mut batch);
}

/// One `INCR` of every counter, pipelined per master.
fn incr_round(cluster: &Cluster) {
    let commands: Vec<(String, Vec<String>)> = counter_keys()
        .into_iter()
        .map(|k| (k.clone(), vec!["INCR".to_string(), k]))
        .collect();
    for reply in cluster.pipeline_keys(&commands) {
        assert!(matches!(reply, Resp::Int(_)), "INCR reply {reply:?}");
    }
}

/// The partitions that logged `full resync stored` in `log`.
fn stored_partitions(log: &str) -> Vec<u64> {
    let mut out: Vec<u64> = log
        .lines()
        .filter(|line| line.contains(FULL_SYNC_STORED))
        .filter_map(|line| {
            let rest = line.split("partition=").nth(1)?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    out.sort_unstable();
    out
}

/// Whether a ferry log line is an applier starting a snapshot load
/// (src/apply/snapshot.rs, src/apply/cluster.rs: scoped or not, into a
/// standalone server or a cluster).
fn is_load_start(line: &str) -> bool {
    line.contains("loading snapshot") || line.contains("loading a snapshot")
}

/// See the module doc. Returns nothing; panics with what went wrong.
fn kill_9_mid_full_sync(target: Side) {
    let cluster = start_source_cluster();
    let masters = cluster.master_ports();
    let big = masters[1];
    for &port in &masters {
        assert_eq!(sync_full(port), 0, "a full sync before ferry started");
    }
    let filled = Instant::now();
    fill_shard(&cluster, big, "big", BIG_KEYS);
    for &port in &masters {
        fill_shard(&cluster, port, &format!("small{port}"), 1000);
    }
    eprintln!(
        "kill -9 mid full sync: {BIG_KEYS} keys written to the big shard in {:?}",
        filled.elapsed()
    );
    // Every master holds counters.
    for &port in &masters {
        let shard = cluster.shard_of_master(port);
        assert!(
            counter_keys()
                .iter()
                .any(|k| shard.master.serves(key_hash_slot(k.as_bytes()))),
            "no counter on master {port}"
        );
    }
    let big_id = cluster.node(big).id();
    let dir = tempfile::tempdir().expect("temp dir");
    let rounds = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let mut ferry =
        FerryProcess::sync(&dir.path().join("sync"), &cluster.url(), &target.url(), &[]);
    let (big_partition, killed_at, killed_again_at) = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&done);
        let writer = scope.spawn(|| writer_loop(&rounds, &done, || incr_round(&cluster)));
        // Wait for the big shard's partition in its full sync while the
        // others' full syncs are stored (ONLINE after one full sync).
        let deadline = Instant::now() + CONVERGE;
        let (big_partition, rows) = loop {
            let rows = listeners(&ferry);
            let big_row = rows
                .iter()
                .find(|r| r["shard"]["master_id"] == big_id.as_str());
            let others_stored = rows.len() == 3
                && rows
                    .iter()
                    .filter(|r| r["shard"]["master_id"] != big_id.as_str())
                    .all(|r| r["source_state"] == "ONLINE" && r["full_syncs"] == 1);
            if let Some(row) = big_row {
                assert!(
                    row["source_state"] != "ONLINE",
                    "the big shard's full sync ended before the others were stored \
                     (write more keys to it): {rows:?}"
                );
                if row["source_state"] == "FULL_SYNC" && others_stored {
                    break (row["partition"].as_u64().expect("partition"), rows);
                }
            }
            assert!(
                Instant::now() < deadline,
                "never saw the big shard in its full sync with the others stored: {rows:?}\n{}",
                ferry.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        ferry.kill9();
        let log = std::fs::read_to_string(&ferry.log).unwrap_or_default();
        let killed_at = ferry.log_len();
        let stored = stored_partitions(&log);
        let big_row = rows
            .iter()
            .find(|r| r["partition"] == big_partition)
            .expect("big row");
        eprintln!(
            "kill -9 mid full sync: killed with partition {big_partition} at {} of its rdb \
             received, full syncs stored before the kill: {stored:?}",
            big_row["full_sync_bytes_received"]
        );
        assert!(
            !stored.contains(&big_partition) && stored.len() == 2,
            "the full syncs stored before the kill: {stored:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
        ferry.spawn();
        wait_for("every partition ONLINE after the restart", &ferry, || {
            let rows = listeners(&ferry);
            if rows.len() == 3 && rows.iter().all(|r| r["source_state"] == "ONLINE") {
                Ok(())
            } else {
                Err(format!("{rows:?}"))
            }
        });
        // Second kill: while the applier loads the big shard's new snapshot
        // into the target (a scoped load: only that shard's slots are
        // deleted and loaded again).
        let deadline = Instant::now() + CONVERGE;
        let load = loop {
            let row = appliers(&ferry)
                .into_iter()
                .find(|r| r["partition"] == big_partition);
            let load = row.as_ref().map(|r| r["snapshot_load"].clone());
            if let Some(load) = load.filter(|l| l.is_object()) {
                assert!(
                    load["done"] != true,
                    "the big shard's load ended before the kill: {load}"
                );
                if load["keys_loaded"].as_u64() > Some(1000) {
                    break load;
                }
            }
            assert!(
                Instant::now() < deadline,
                "never saw the big shard's snapshot load: {row:?}\n{}",
                ferry.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        ferry.kill9();
        let killed_again_at = ferry.log_len();
        eprintln!("kill -9 mid full sync: killed again mid load: {load}");
        std::thread::sleep(Duration::from_secs(1));
        ferry.spawn();
        wait_for(
            "every partition ONLINE after the second restart",
            &ferry,
            || {
                let rows = listeners(&ferry);
                if rows.len() == 3 && rows.iter().all(|r| r["source_state"] == "ONLINE") {
                    Ok(())
                } else {
                    Err(format!("{rows:?}"))
                }
            },
        );
        // Writes go on a little after the restart.
        std::thread::sleep(Duration::from_secs(2));
        done.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        (big_partition, killed_at, killed_again_at)
    });
    let rounds = rounds.load(Ordering::Relaxed);
    assert!(rounds > 5, "the writer ran only {rounds} rounds");

    wait_converged(
        || dump_cluster(&cluster),
        || target.dump(),
        &ferry,
        "after kill -9 mid full sync",
    );
    assert_counters(&dump_cluster(&cluster), &target.dump(), rounds);

    // Only the shard whose full sync the kill cut full-resynced again.
    for &port in &masters {
        let want = if port == big { 2 } else { 1 };
        assert_eq!(
            sync_full(port),
            want,
            "master {port} (big: {big}) served {} full syncs",
            sync_full(port)
        );
    }
    // The last process resumed every shard with a partial resync.
    for row in listeners(&ferry) {
        assert_eq!(
            row["full_syncs"], 0,
            "a full sync after the second restart: {row}"
        );
        assert!(row["partial_resyncs"].as_u64() >= Some(1), "{row}");
    }
    let log = ferry.log_since(killed_at);
    assert_eq!(
        stored_partitions(&log),
        vec![big_partition],
        "full syncs stored after the first kill"
    );
    // The big shard's load started after the first kill, was cut by the
    // second and ran again; after the second kill no other shard's load
    // ran again (theirs may have run again after the first kill: a load
    // that had not finished then starts over, from the same stored
    // snapshot).
    let snapshot_lines = |log: &str| {
        log.lines()
            .filter(|line| line.contains("snapshot"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let big_field = format!("partition={big_partition} ");
    let big_loads = log
        .lines()
        .filter(|line| is_load_start(line) && line.contains(&big_field))
        .count();
    assert!(
        big_loads >= 2,
        "{big_loads} loads of the big shard after the first kill:\n{}",
        snapshot_lines(&log)
    );
    let log = ferry.log_since(killed_again_at);
    let loads: Vec<&str> = log.lines().filter(|line| is_load_start(line)).collect();
    assert!(
        !loads.is_empty() && loads.iter().all(|line| line.contains(&big_field)),
        "snapshot loads after the second kill:\n{}",
        snapshot_lines(&log)
    );
    assert_verify_clean(
        "kill -9 mid full sync",
        &cluster.url(),
        &target.url(),
        || ferry.log_tail(40),
    );
}

/// See the module doc.
#[test]
fn kill_9_mid_full_sync_of_a_cluster_source() {
    kill_9_mid_full_sync(Side::Standalone(RedisServer::start(&[])));
}

/// See the module doc: the same into a 3-master cluster target.
#[test]
fn kill_9_mid_full_sync_of_a_cluster_source_into_a_cluster() {
    kill_9_mid_full_sync(Side::Cluster(Cluster::start(3, 0)));
}

// ---------------------------------------------------------------------------
// 2. A target (a cluster's master, or a standalone server) away ~10 s.

/// How a target node is taken away and brought back.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outage {
    /// SIGSTOP, SIGCONT after [`OUTAGE`].
    Paused,
    /// `SHUTDOWN SAVE`, started again from its own dir after [`OUTAGE`].
    ShutDown,
}

/// `ferry sync` whose applier gives up on a silent target after 1 s and
/// retries quickly (as tests/crash.rs runs it): with the default
/// `reply-timeout` of 60 s, a frozen target is only seen as the applier's
/// growing latency and lag until then.
fn sync_with_fast_retries(dir: &std::path::Path, source: &str, target: &str) -> FerryProcess {
    let config = dir.join("sync.toml");
    std::fs::write(
        &config,
        "[apply]\nreply-timeout = \"1s\"\nconnect-timeout = \"1s\"\n\
         retry-backoff-min = \"50ms\"\nretry-backoff-max = \"500ms\"\n",
    )
    .expect("write sync.toml");
    FerryProcess::sync(
        &dir.join("sync"),
        source,
        target,
        &["--config", config.to_str().expect("utf-8 path")],
    )
}

/// A standalone source with a backlog that holds every outage here.
fn start_source() -> RedisServer {
    RedisServer::start(&[
        "--repl-diskless-sync-delay",
        "0",
        "--repl-backlog-size",
        "256mb",
    ])
}

/// One `INCR` of every counter on a standalone server.
fn incr_standalone(conn: &mut resp::Conn) {
    for key in counter_keys() {
        conn.queue(&["INCR", key.as_str()]);
    }
    for reply in conn.replies().expect("INCR replies") {
        assert!(matches!(reply, Resp::Int(_)), "INCR reply {reply:?}");
    }
}

/// `SHUTDOWN SAVE` of the server on `port`: returns once it closed the
/// connection (it saved its RDB and exits).
fn shutdown_save(port: u16) {
    let mut conn = resp::connect(&format!("127.0.0.1:{port}"));
    match conn.call(&["SHUTDOWN", "SAVE"]) {
        Err(_) => {}
        Ok(reply) => panic!("SHUTDOWN SAVE on {port} answered {reply:?}"),
    }
}

/// The single applier's row once it is OFFLINE with an error, waited for
/// while the target is away.
fn wait_applier_offline(ferry: &FerryProcess, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let rows = appliers(ferry);
        if let [row] = rows.as_slice() {
            if row["state"] == "OFFLINE" && row["last_error"].is_string() {
                return row.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the applier never showed OFFLINE with an error in {within:?}: {rows:?}\n{}",
            ferry.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the single applier is ONLINE again.
fn wait_applier_online(ferry: &FerryProcess) {
    wait_for("the applier ONLINE again", ferry, || {
        match appliers(ferry).as_slice() {
            [row] if row["state"] == "ONLINE" => Ok(()),
            rows => Err(format!("{rows:?}")),
        }
    });
}

/// `INCR`s executed by each master other than `down` (`INFO
/// commandstats`: a command refused with `CLUSTERDOWN` or in a discarded
/// `MULTI` is not counted as a call; the keys themselves cannot be read
/// while the cluster is down).
fn incrs_elsewhere(masters: &[u16], down: u16) -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for &port in masters.iter().filter(|&&p| p != down) {
        let mut conn = resp::connect(&format!("127.0.0.1:{port}"));
        let info = conn
            .call(&["INFO", "commandstats"])
            .expect("INFO commandstats")
            .text()
            .unwrap_or_default();
        let calls = info
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_incr:calls="))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0);
        out.insert(port, calls);
    }
    out
}

/// One master of a 3-master cluster target away for [`OUTAGE`] under
/// writes; see the module doc.
fn target_master_outage(outage: Outage) {
    let source = start_source();
    let mut cluster = Cluster::start(3, 0);
    let masters = cluster.master_ports();
    let victim = masters[1];
    for &port in &masters {
        let shard = cluster.shard_of_master(port);
        assert!(
            counter_keys()
                .iter()
                .any(|k| shard.master.serves(key_hash_slot(k.as_bytes()))),
            "no counter on target master {port}"
        );
    }
    let mut conn = resp::connect(&source.addr());
    for i in 0..2000 {
        conn.queue(&["SET", &format!("pre:{i}"), &format!("v{i}")]);
    }
    conn.replies().expect("SET replies");
    let dir = tempfile::tempdir().expect("temp dir");
    let ferry = sync_with_fast_retries(dir.path(), &source.url(), &cluster.seed_list());
    wait_converged(
        || dump_strings(&source.addr()),
        || dump_cluster(&cluster),
        &ferry,
        "before the outage",
    );
    let epoch = appliers(&ferry)[0]["epoch"].clone();
    // The status names the target as the seed list it was given, address
    // by address (a seed list read as one URL showed as
    // `redis://[h1:p1,h2:p2,h3]:p3`).
    let seeds: Vec<String> = cluster
        .nodes()
        .map(|node| format!("redis://{}", node.addr()))
        .collect();
    assert_eq!(appliers(&ferry)[0]["target"], seeds.join(","));
    let mark = ferry.log_len();

    let rounds = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let (frozen_from, frozen_to) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut conn = resp::connect(&source.addr());
            writer_loop(&rounds, &done, || incr_standalone(&mut conn))
        });
        let _stop = StopOnDrop(&done);
        std::thread::sleep(Duration::from_secs(1));
        let away = Instant::now();
        match outage {
            Outage::Paused => signal(cluster.node(victim).pid(), "STOP"),
            Outage::ShutDown => {
                shutdown_save(victim);
                // Reaps the exited process (nothing left to kill).
                cluster.node_mut(victim).kill9();
            }
        }
        let row = wait_applier_offline(&ferry, OUTAGE + Duration::from_secs(20));
        eprintln!(
            "target master {outage:?}: the applier OFFLINE after {:?}: {}",
            away.elapsed(),
            row["last_error"]
        );
        // What reaches the other masters while one is away: sampled once
        // the applier showed the error (plus a little for a batch in
        // flight), and at the end of the outage.
        std::thread::sleep(Duration::from_secs(2));
        let frozen_from = incrs_elsewhere(&masters, victim);
        let left = OUTAGE.saturating_sub(away.elapsed());
        std::thread::sleep(left.max(Duration::from_secs(3)));
        let frozen_to = incrs_elsewhere(&masters, victim);
        let row = &appliers(&ferry)[0];
        assert!(
            row["state"] == "OFFLINE" && row["last_error"].is_string(),
            "the applier not OFFLINE at the end of the outage: {row}"
        );
        match outage {
            Outage::Paused => signal(cluster.node(victim).pid(), "CONT"),
            Outage::ShutDown => {
                assert!(
                    cluster.node_mut(victim).spawn(),
                    "master {victim} did not start again"
                );
            }
        }
        eprintln!(
            "target master {outage:?}: back after {:?}, {} writer rounds so far",
            away.elapsed(),
            rounds.load(Ordering::Relaxed)
        );
        cluster.wait_settled();
        std::thread::sleep(Duration::from_secs(2));
        done.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        (frozen_from, frozen_to)
    });
    let rounds = rounds.load(Ordering::Relaxed);
    // It waits: the other masters got nothing more while one was away.
    assert!(
        frozen_from.values().all(|&calls| calls > 0),
        "no INCR on the other masters before the outage: {frozen_from:?}"
    );
    assert_eq!(
        frozen_from, frozen_to,
        "the other masters were written while one was away"
    );

    let back = Instant::now();
    wait_converged(
        || dump_strings(&source.addr()),
        || dump_cluster(&cluster),
        &ferry,
        "after the outage",
    );
    eprintln!(
        "target master {outage:?}: converged {:?} after the cluster settled, {rounds} rounds",
        back.elapsed()
    );
    assert_counters(
        &dump_strings(&source.addr()),
        &dump_cluster(&cluster),
        rounds,
    );
    let row = &appliers(&ferry)[0];
    assert_eq!(row["state"], "ONLINE", "{row}");
    assert_eq!(row["epoch"], epoch, "a snapshot was loaded again: {row}");
    assert_eq!(sync_full_of(&source), 1, "the source full-resynced again");
    let log = ferry.log_since(mark);
    assert!(
        !log.lines().any(is_load_start),
        "a snapshot load after the outage:\n{log}"
    );
    assert_verify_clean(
        "target master away",
        &source.url(),
        &cluster.seed_list(),
        || ferry.log_tail(40),
    );
}

fn sync_full_of(server: &RedisServer) -> u64 {
    sync_full(server.port)
}

/// See the module doc.
#[test]
fn a_target_master_paused_for_a_while() {
    target_master_outage(Outage::Paused);
}

/// See the module doc.
#[test]
fn a_target_master_shut_down_for_a_while() {
    target_master_outage(Outage::ShutDown);
}

/// A standalone target away for [`OUTAGE`], paused then shut down and
/// started again from its RDB, under writes; see the module doc.
#[test]
fn a_standalone_target_shut_down_for_a_while() {
    let source = start_source();
    let mut target = FixedPortRedis::start(&["--appendonly", "no"]);
    let mut conn = resp::connect(&source.addr());
    for i in 0..2000 {
        conn.queue(&["SET", &format!("pre:{i}"), &format!("v{i}")]);
    }
    conn.replies().expect("SET replies");
    let dir = tempfile::tempdir().expect("temp dir");
    let ferry = sync_with_fast_retries(dir.path(), &source.url(), &target.url());
    wait_converged(
        || dump_strings(&source.addr()),
        || dump_strings(&target.addr()),
        &ferry,
        "before the outages",
    );
    let epoch = appliers(&ferry)[0]["epoch"].clone();
    let mark = ferry.log_len();
    let rounds = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut conn = resp::connect(&source.addr());
            writer_loop(&rounds, &done, || incr_standalone(&mut conn))
        });
        let _stop = StopOnDrop(&done);
        for outage in [Outage::Paused, Outage::ShutDown] {
            std::thread::sleep(Duration::from_secs(1));
            let away = Instant::now();
            match outage {
                Outage::Paused => signal(target.pid(), "STOP"),
                Outage::ShutDown => {
                    shutdown_save(target.port);
                    target.kill9();
                }
            }
            let row = wait_applier_offline(&ferry, OUTAGE + Duration::from_secs(20));
            eprintln!(
                "standalone target {outage:?}: the applier OFFLINE after {:?}: {}",
                away.elapsed(),
                row["last_error"]
            );
            std::thread::sleep(OUTAGE.saturating_sub(away.elapsed()));
            match outage {
                Outage::Paused => signal(target.pid(), "CONT"),
                Outage::ShutDown => target.spawn(),
            }
            wait_applier_online(&ferry);
        }
        std::thread::sleep(Duration::from_secs(2));
        done.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
    });
    let rounds = rounds.load(Ordering::Relaxed);
    wait_converged(
        || dump_strings(&source.addr()),
        || dump_strings(&target.addr()),
        &ferry,
        "after the outages",
    );
    assert_counters(
        &dump_strings(&source.addr()),
        &dump_strings(&target.addr()),
        rounds,
    );
    assert_eq!(
        appliers(&ferry)[0]["epoch"],
        epoch,
        "a snapshot was loaded again"
    );
    assert_eq!(sync_full_of(&source), 1, "the source full-resynced again");
    let log = ferry.log_since(mark);
    assert!(
        !log.lines().any(is_load_start),
        "a snapshot load after the outages:\n{log}"
    );
    assert_verify_clean(
        "standalone target away",
        &source.url(),
        &target.url(),
        || ferry.log_tail(40),
    );
}

// ---------------------------------------------------------------------------
// 3. A frozen target with the default `reply-timeout` (60 s): the applier
// shows STALLED, naming the target that is late and for how long, from 5 s
// on, instead of ONLINE with no error until the minute is up; it applies on
// once the target answers, exactly once, without ending its session.

fn frozen_target_shows_stalled(target: Side) {
    let source = start_source();
    let victim = match &target {
        Side::Standalone(server) => (server.addr(), server.pid()),
        Side::Cluster(cluster) => {
            let port = cluster.master_ports()[0];
            (cluster.node(port).addr(), cluster.node(port).pid())
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let ferry = FerryProcess::sync(&dir.path().join("sync"), &source.url(), &target.url(), &[]);
    let mut conn = resp::connect(&source.addr());
    incr_standalone(&mut conn);
    wait_converged(
        || dump_strings(&source.addr()),
        || target.dump(),
        &ferry,
        "before the freeze",
    );
    let mark = ferry.log_len();
    let rounds = AtomicUsize::new(1);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut conn = resp::connect(&source.addr());
            writer_loop(&rounds, &done, || incr_standalone(&mut conn))
        });
        let _stop = StopOnDrop(&done);
        std::thread::sleep(Duration::from_millis(500));
        signal(victim.1, "STOP");
        let frozen = Instant::now();
        let mut seen = None;
        while frozen.elapsed() < Duration::from_secs(15) {
            if let [row] = appliers(&ferry).as_slice() {
                if row["state"] == "STALLED" {
                    // As the operator reads it, while still frozen.
                    seen = Some((frozen.elapsed(), row.clone(), ferry_status_text(&ferry)));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        signal(victim.1, "CONT");
        let (after, row, text) = seen.unwrap_or_else(|| {
            panic!(
                "the applier never showed STALLED while the target was frozen: {:?}\n{}",
                appliers(&ferry),
                ferry.log_tail(40)
            )
        });
        eprintln!("STALLED after {after:?}: {}", row["last_error"]);
        let error = row["last_error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with(&format!("the target {} has not answered for", victim.0)),
            "{row}"
        );
        assert!(
            text.contains("| STALLED ") && text.contains("has not answered for"),
            "{text}"
        );
        wait_applier_online(&ferry);
        std::thread::sleep(Duration::from_secs(1));
        done.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
    });
    let rounds = rounds.load(Ordering::Relaxed);
    wait_converged(
        || dump_strings(&source.addr()),
        || target.dump(),
        &ferry,
        "after the freeze",
    );
    assert_counters(&dump_strings(&source.addr()), &target.dump(), rounds);
    // The late reply came within the session: no error, no new session.
    let log = ferry.log_since(mark);
    assert!(
        !log.contains("reachable again"),
        "the session ended while the target was frozen:\n{log}"
    );
    assert_verify_clean("after the freeze", &source.url(), &target.url(), || {
        ferry.log_tail(40)
    });
}

/// `ferry status` as the operator reads it.
fn ferry_status_text(ferry: &FerryProcess) -> String {
    let out = std::process::Command::new(common::ferry::ferry_bin())
        .args(["status", "--data-dir"])
        .arg(&ferry.data_dir)
        .output()
        .expect("ferry status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_frozen_standalone_target_shows_stalled_then_applies_on() {
    frozen_target_shows_stalled(Side::Standalone(RedisServer::start(&[])));
}

#[test]
fn a_frozen_cluster_target_master_shows_stalled_then_applies_on() {
    frozen_target_shows_stalled(Side::Cluster(Cluster::start(3, 0)));
}
