//! `ferry switchover` against real redis-servers (issue 11, item 3): under
//! a write load, every write the old source acknowledged is on the new one
//! exactly once, the reversed stream carries later writes back, a restart
//! with the original command line follows the switch, and a switchover
//! that cannot finish in time leaves the sync as it was.

mod common;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::{key_in_slot, Cluster};
use common::ferry::FerryProcess;
use common::resp::{connect, Conn, Resp};
use common::side::Side;
use common::RedisServer;

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// What a writer had acknowledged, per server.
#[derive(Debug, Default)]
struct Acked {
    /// `INCR counter` replies acknowledged.
    incrs: i64,
    /// `RPUSH log <n>` elements acknowledged, in order.
    pushed: Vec<String>,
}

/// Writes `INCR counter` and `RPUSH log n` (one round trip each) to
/// `first` until its connection is closed (the switchover closes the
/// clients its pause holds), then to `second` until `stop`.
fn writer(first: String, second: String, stop: Arc<AtomicBool>) -> (Acked, Acked) {
    let mut acked = (Acked::default(), Acked::default());
    let mut n = 0u64;
    let mut on_first = true;
    let mut conn = connect(&first);
    while !stop.load(Ordering::SeqCst) || on_first {
        n += 1;
        let element = format!("e{n}");
        let side = if on_first { &mut acked.0 } else { &mut acked.1 };
        let incr = conn.call(&["INCR", "counter"]);
        let push = incr
            .as_ref()
            .ok()
            .map(|_| conn.call(&["RPUSH", "log", &element]));
        match (incr, push) {
            (Ok(Resp::Int(_)), Some(Ok(Resp::Int(_)))) => {
                side.incrs += 1;
                side.pushed.push(element);
            }
            (Ok(Resp::Int(_)), _) => {
                // The INCR ran, the RPUSH did not (its connection closed).
                side.incrs += 1;
                assert!(on_first, "the new source closed a writer");
                on_first = false;
                conn = connect(&second);
            }
            (Err(_), _) => {
                assert!(on_first, "the new source closed a writer");
                on_first = false;
                conn = connect(&second);
            }
            other => panic!("unexpected replies {other:?}"),
        }
        if !on_first && acked.1.pushed.len() >= 300 {
            // Enough on the new source; keep going only until told.
            thread::sleep(Duration::from_millis(1));
        }
    }
    acked
}

fn counter_and_log(conn: &mut Conn) -> (i64, Vec<String>) {
    counter_and_log_of(conn, ["counter", "log"])
}

fn counter_and_log_of(conn: &mut Conn, keys: [&str; 2]) -> (i64, Vec<String>) {
    let counter = conn
        .call(&["GET", keys[0]])
        .unwrap()
        .text()
        .map_or(0, |t| t.parse().unwrap());
    let log = conn
        .call(&["LRANGE", keys[1], "0", "-1"])
        .unwrap()
        .items()
        .iter()
        .map(|item| item.text().unwrap())
        .collect();
    (counter, log)
}

/// Two servers and a one-way `ferry sync` between them, past its first
/// full sync.
struct Pair {
    a: RedisServer,
    b: RedisServer,
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
    sync: FerryProcess,
}

/// A backlog that holds what the writers of these tests send while ferry
/// restarts on a loaded machine (the 1 MB default may not: the source would
/// answer a full resync, as it should, and the tests count full syncs).
const BACKLOG: &str = "256mb";

fn synced_pair() -> Pair {
    let a = RedisServer::start(&["--repl-backlog-size", BACKLOG]);
    let b = RedisServer::start(&["--repl-backlog-size", BACKLOG]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sync = FerryProcess::sync(&data, &a.url(), &b.url(), &[]);
    a.cmd(&["SET", "before", "1"]);
    wait_for("the first full sync", Duration::from_secs(60), || {
        b.cmd(&["GET", "before"]) == "1"
    });
    Pair {
        a,
        b,
        dir,
        data,
        sync,
    }
}

#[test]
fn a_switchover_under_load_loses_nothing_writes_nothing_twice_and_reverses() {
    let Pair {
        a,
        b,
        dir: _dir,
        data,
        mut sync,
    } = synced_pair();
    let (a_url, b_url) = (a.url(), b.url());

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (a_addr, b_addr, stop) = (a.addr(), b.addr(), Arc::clone(&stop));
        thread::spawn(move || writer(a_addr, b_addr, stop))
    };
    thread::sleep(Duration::from_millis(700));
    let admin = sync.admin_addr(Duration::from_secs(10));
    let out = ferry(&["switchover", "--admin", &admin, "--timeout", "20s"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}\n{}", sync.log_tail(40));
    for step in [
        "check",
        "pause writes on the source",
        "wait for the target",
        "stop the old direction",
        "mark the switch point on the target",
        "store the reversed start",
        "start the reversed direction",
        "release the old source",
    ] {
        assert!(shown.contains(step), "no step {step:?} in {shown}");
    }
    assert!(
        shown.contains(&format!("now replicates {} -> {}", b.addr(), a.addr())),
        "{shown}"
    );
    wait_for("writes on the new source", Duration::from_secs(60), || {
        load.is_finished() || counter_and_log(&mut connect(&b.addr())).1.len() > 400
    });
    stop.store(true, Ordering::SeqCst);
    let (on_a, on_b) = load.join().unwrap();
    assert!(
        on_a.incrs > 50,
        "too few writes before the switch: {on_a:?}"
    );
    assert!(!on_b.pushed.is_empty(), "no writes after the switch");

    // Every write acknowledged by either side, once, on both.
    let want_counter = on_a.incrs + on_b.incrs;
    let want_log: Vec<String> = on_a.pushed.iter().chain(&on_b.pushed).cloned().collect();
    let converged = |server: &RedisServer| {
        let mut conn = connect(&server.addr());
        counter_and_log(&mut conn) == (want_counter, want_log.clone())
    };
    wait_for(
        "the reversed stream to deliver",
        Duration::from_secs(60),
        || converged(&a),
    );
    assert!(converged(&b), "the new source lacks acknowledged writes");
    let status = sync.status_json();
    assert_eq!(status["listeners"][0]["source"], b_url.as_str(), "{status}");
    assert_eq!(status["listeners"][0]["full_syncs"], 0, "{status}");

    // A restart with the original command line follows the record: B -> A,
    // resumed by PSYNC, no full sync.
    sync.kill9();
    let mut sync = FerryProcess::sync(&data, &a_url, &b_url, &[]);
    b.cmd(&["INCR", "counter"]);
    wait_for("a write after the restart", Duration::from_secs(60), || {
        a.cmd(&["GET", "counter"]) == (want_counter + 1).to_string()
    });
    let status = sync.status_json();
    assert_eq!(status["listeners"][0]["source"], b_url.as_str(), "{status}");
    assert_eq!(status["listeners"][0]["full_syncs"], 0, "{status}");
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(log.contains("this data dir was switched over"), "{log}");
    sync.terminate(Duration::from_secs(20));

    // Servers the record does not name are refused, naming the record.
    let c = RedisServer::start(&[]);
    let out = ferry(&[
        "sync",
        "--source",
        &a_url,
        "--target",
        &c.url(),
        "--data-dir",
        data.to_str().unwrap(),
        "--admin",
        "127.0.0.1:0",
    ]);
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(
        shown.contains("direction") && shown.contains(&b.addr()) && shown.contains(&c.addr()),
        "{shown}"
    );

    // And switching back works the same way: A is the source again.
    let mut sync = FerryProcess::sync(&data, &a_url, &b_url, &[]);
    wait_for("the sync to run", Duration::from_secs(30), || {
        sync.status_json()["drainers"][0]["state"] == "ONLINE"
    });
    let admin = sync.admin_addr(Duration::from_secs(10));
    let out = ferry(&["switchover", "--admin", &admin]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        sync.log_tail(40)
    );
    a.cmd(&["SET", "back", "home"]);
    wait_for("the second reversal", Duration::from_secs(60), || {
        b.cmd(&["GET", "back"]) == "home"
    });
    let status = sync.status_json();
    assert_eq!(status["listeners"][0]["source"], a_url.as_str(), "{status}");
    assert_eq!(status["drainers"][0]["fallback_snapshots"], 0, "{status}");
    assert_eq!(
        counter_and_log(&mut connect(&b.addr())).0,
        want_counter + 1,
        "the second switchover applied something twice"
    );
    sync.terminate(Duration::from_secs(20));
}

#[test]
fn a_switchover_that_times_out_unpauses_the_source_and_keeps_the_direction() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut sync = FerryProcess::sync(&data, &a.url(), &b.url(), &[]);
    a.cmd(&["SET", "k", "0"]);
    wait_for("the first full sync", Duration::from_secs(60), || {
        b.cmd(&["GET", "k"]) == "0"
    });
    // The target takes no writes for a while: the applier cannot catch up.
    b.cmd(&["CLIENT", "PAUSE", "6000", "WRITE"]);
    a.cmd(&["SET", "k", "1"]);
    let admin = sync.admin_addr(Duration::from_secs(10));
    let started = Instant::now();
    let out = ferry(&["switchover", "--admin", &admin, "--timeout", "1s"]);
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains("timed out"), "{shown}");
    assert!(shown.contains("runs on in its old direction"), "{shown}");
    // Given up at the timeout, not at the pause's own end (timeout + 10 s):
    // the steps before the wait (the pause note's fsync) took up to 5.8 s
    // on a loaded machine.
    assert!(started.elapsed() < Duration::from_secs(10), "{shown}");
    // The source takes writes again at once.
    let mut conn = common::resp::Conn::connect(&a.addr(), Duration::from_secs(1)).unwrap();
    assert_eq!(
        conn.call(&["SET", "k", "2"]).unwrap(),
        Resp::Simple("OK".into())
    );
    // Nothing of the switchover is left; the old direction goes on once
    // the target takes writes again.
    assert!(!data.join("direction").exists());
    assert!(!data.join("listener.g1").exists());
    b.cmd(&["CLIENT", "UNPAUSE"]);
    wait_for(
        "the old direction to go on",
        Duration::from_secs(60),
        || b.cmd(&["GET", "k"]) == "2",
    );
    let status = sync.status_json();
    assert_eq!(
        status["listeners"][0]["source"],
        a.url().as_str(),
        "{status}"
    );
    assert_eq!(
        a.cmd(&["EXISTS", "__ferry:checkpoint:ferry:0"]),
        "0",
        "the prepared checkpoint was left on the source"
    );
    sync.terminate(Duration::from_secs(20));
}

/// Writes `INCR counter` and `RPUSH log n` to whichever of `addrs` it is
/// on, moving to the other one when its connection is closed (a
/// switchover closes the writers its pause holds on the old source);
/// returns the acknowledged increments and elements, in order.
fn following_writer(addrs: [String; 2], stop: Arc<AtomicBool>) -> Acked {
    following_writer_of(["counter", "log"], addrs, stop).0
}

/// [`following_writer`] on the keys `keys` (counter, list); also returns
/// how often it moved to the other server.
fn following_writer_of(
    keys: [&str; 2],
    addrs: [String; 2],
    stop: Arc<AtomicBool>,
) -> (Acked, usize) {
    let mut acked = Acked::default();
    let mut moves = 0;
    let mut side = 0;
    let mut conn = connect(&addrs[side]);
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let element = format!("e{n}");
        match conn.call(&["INCR", keys[0]]) {
            Ok(Resp::Int(_)) => acked.incrs += 1,
            Ok(other) => panic!("INCR answered {other:?}"),
            Err(_) => {
                side = 1 - side;
                moves += 1;
                conn = connect(&addrs[side]);
                continue;
            }
        }
        match conn.call(&["RPUSH", keys[1], &element]) {
            Ok(Resp::Int(_)) => acked.pushed.push(element),
            Ok(other) => panic!("RPUSH answered {other:?}"),
            Err(_) => {
                side = 1 - side;
                moves += 1;
                conn = connect(&addrs[side]);
            }
        }
        thread::sleep(Duration::from_micros(200));
    }
    (acked, moves)
}

#[test]
fn kill_9_of_ferry_at_any_step_of_a_switchover_loses_and_repeats_nothing() {
    let Pair {
        a,
        b,
        dir: _dir,
        data,
        mut sync,
    } = synced_pair();
    let (a_url, b_url) = (a.url(), b.url());
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (addrs, stop) = ([a.addr(), b.addr()], Arc::clone(&stop));
        thread::spawn(move || following_writer(addrs, stop))
    };
    // Kills spread over the steps (a switchover takes some tens of ms
    // here), the last after it ended (`None`: once the command returned,
    // however long a loaded machine made it).
    for delay_ms in [
        Some(20u64),
        Some(35),
        Some(45),
        Some(55),
        Some(65),
        Some(80),
        Some(120),
        None,
    ] {
        thread::sleep(Duration::from_millis(300));
        let admin = sync.admin_addr(Duration::from_secs(10));
        let mut asked = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["switchover", "--admin", &admin, "--timeout", "10s"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        match delay_ms {
            Some(ms) => thread::sleep(Duration::from_millis(ms)),
            None => {
                let ended = asked.wait().unwrap();
                assert!(ended.success(), "the last switchover failed: {ended}");
            }
        }
        sync.kill9();
        let _ = asked.wait();
        std::fs::remove_file(data.join("admin.addr")).unwrap();
        // The command line keeps the first order; the record decides.
        sync = FerryProcess::sync(&data, &a_url, &b_url, &[]);
        wait_for("the sync to run again", Duration::from_secs(60), || {
            sync.status_json()["drainers"][0]["state"] == "ONLINE"
        });
    }
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let acked = load.join().unwrap();
    assert!(acked.incrs > 100, "too few writes: {acked:?}");
    let want = (acked.incrs, acked.pushed.clone());
    for server in [&a, &b] {
        wait_for(
            &format!("{} to hold every acknowledged write once", server.addr()),
            Duration::from_secs(60),
            || counter_and_log(&mut connect(&server.addr())) == want,
        );
    }
    let status = sync.status_json();
    assert_eq!(status["drainers"][0]["fallback_snapshots"], 0, "{status}");
    assert_eq!(status["listeners"][0]["full_syncs"], 0, "{status}");
    sync.terminate(Duration::from_secs(20));
    // Where the kills landed, for the record of a run.
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(
        log.contains("step=store the reversed start"),
        "no switchover committed at all"
    );
    for what in [
        "step=pause writes on the source",
        "step=store the reversed start",
        "step=release the old source",
        "released the old source of an unfinished switchover",
        "this data dir was switched over",
        "full resync stored",
    ] {
        eprintln!("{what}: {}", log.matches(what).count());
    }
}

/// Slots of the writers of the cluster tests: two in each third of the
/// slot range, so every master of a 3-master cluster made by
/// `redis-cli --cluster create` gets some.
const WRITER_SLOTS: [u16; 6] = [100, 4000, 6000, 9000, 12000, 16000];

/// The counter and list keys of writer `i`, in its slot.
fn writer_keys(i: usize) -> (String, String) {
    let tag = key_in_slot("w", WRITER_SLOTS[i]);
    // `w:{tN}`: the same tag for both keys.
    let tag = tag.trim_start_matches("w:");
    (format!("counter:{tag}"), format!("log:{tag}"))
}

/// Two 3-master clusters and a one-way `ferry sync` between them, every
/// partition online past its first full sync.
struct ClusterPair {
    a: Cluster,
    b: Cluster,
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
    sync: FerryProcess,
}

fn synced_clusters() -> ClusterPair {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    let (dir, data, sync) = synced(Side::Cluster(&a), Side::Cluster(&b));
    ClusterPair {
        a,
        b,
        dir,
        data,
        sync,
    }
}

/// A standalone server and a 3-master cluster with a one-way `ferry sync`
/// between them (`standalone_source`: the server is the source), every
/// partition online past its first full sync.
struct MixedPair {
    server: RedisServer,
    cluster: Cluster,
    standalone_source: bool,
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
    sync: FerryProcess,
}

impl MixedPair {
    fn start(standalone_source: bool) -> MixedPair {
        let server = RedisServer::start(&[]);
        let cluster = Cluster::start(3, 0);
        let (dir, data, sync) = {
            let (server, cluster) = (Side::Standalone(&server), Side::Cluster(&cluster));
            match standalone_source {
                true => synced(server, cluster),
                false => synced(cluster, server),
            }
        };
        MixedPair {
            server,
            cluster,
            standalone_source,
            dir,
            data,
            sync,
        }
    }

    /// Runs `scenario` on the source (A), the target (B), the data dir and
    /// the sync.
    fn run(self, scenario: impl FnOnce(Side, Side, &std::path::Path, FerryProcess)) {
        let MixedPair {
            server,
            cluster,
            standalone_source,
            dir: _dir,
            data,
            sync,
        } = self;
        let (server, cluster) = (Side::Standalone(&server), Side::Cluster(&cluster));
        match standalone_source {
            true => scenario(server, cluster, &data, sync),
            false => scenario(cluster, server, &data, sync),
        }
    }
}

/// A one-way `ferry sync` of `a` into `b` (every server given a backlog of
/// [`BACKLOG`]) past its first full sync, every partition online; returns
/// the temp dir, the data dir and the process.
fn synced(a: Side, b: Side) -> (tempfile::TempDir, std::path::PathBuf, FerryProcess) {
    for addr in a.servers().into_iter().chain(b.servers()) {
        assert_eq!(
            connect(&addr)
                .call(&["CONFIG", "SET", "repl-backlog-size", BACKLOG])
                .unwrap(),
            Resp::Simple("OK".into())
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sync = FerryProcess::sync(&data, &a.url(), &b.url(), &[]);
    let keys: Vec<String> = WRITER_SLOTS
        .iter()
        .map(|&slot| key_in_slot("before", slot))
        .collect();
    for key in &keys {
        a.call_key(key, &["SET", key, "1"]);
    }
    wait_for("the first full sync", Duration::from_secs(60), || {
        keys.iter().all(|key| b.get(key).as_deref() == Some("1"))
    });
    wait_for("every partition online", Duration::from_secs(30), || {
        online(&sync.status_json(), a.partitions())
    });
    (dir, data, sync)
}

/// Whether `status` shows `partitions` listeners and appliers, all online.
fn online(status: &serde_json::Value, partitions: usize) -> bool {
    let online = |side: &str, field: &str| {
        status[side].as_array().is_some_and(|parts| {
            parts.len() == partitions && parts.iter().all(|p| p[field] == "ONLINE")
        })
    };
    online("listeners", "source_state") && online("drainers", "state")
}

/// `sync_full` (full syncs served to replicas) of every master of `side`.
fn sync_fulls(side: Side) -> Vec<(String, String)> {
    side.masters()
        .into_iter()
        .map(|addr| {
            let info = connect(&addr)
                .call(&["INFO", "stats"])
                .unwrap()
                .text()
                .unwrap_or_default();
            let fulls = info
                .lines()
                .find_map(|line| line.strip_prefix("sync_full:"))
                .unwrap_or_default()
                .trim()
                .to_string();
            (addr, fulls)
        })
        .collect()
}

fn values_of(side: Side, keys: &(String, String)) -> (i64, Vec<String>) {
    let mut conn = connect(&side.addr_for(&keys.0));
    counter_and_log_of(&mut conn, [&keys.0, &keys.1])
}

/// A Redis Cluster -> Redis Cluster sync switched over under a load on
/// every shard: every acknowledged write once on both sides, the reversed
/// stream carrying the later writes back to every shard of the old source,
/// and a kill -9 and restart with the original command line resuming by
/// PSYNC.
#[test]
fn a_cluster_switchover_under_load_loses_nothing_and_reverses_on_every_shard() {
    let ClusterPair {
        a,
        b,
        dir: _dir,
        data,
        mut sync,
    } = synced_clusters();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITER_SLOTS.len())
        .map(|i| {
            let keys = writer_keys(i);
            let addrs = [
                a.master_for_key(&keys.0).addr(),
                b.master_for_key(&keys.0).addr(),
            ];
            let stop = Arc::clone(&stop);
            thread::spawn(move || following_writer_of([&keys.0, &keys.1], addrs, stop))
        })
        .collect();
    thread::sleep(Duration::from_millis(700));
    let admin = sync.admin_addr(Duration::from_secs(10));
    let out = ferry(&["switchover", "--admin", &admin, "--timeout", "20s"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}\n{}", sync.log_tail(60));
    eprintln!("{shown}");
    for step in [
        "check",
        "prepare the reverse",
        "pause writes on the source",
        "wait for the target",
        "stop the old direction",
        "mark the switch point on the target",
        "store the reversed start",
        "release the old source",
        "start the reversed direction",
    ] {
        assert!(shown.contains(step), "no step {step:?} in {shown}");
    }
    let record = std::fs::read_to_string(data.join("direction")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(
        record["partitions"].as_array().map(Vec::len),
        Some(3),
        "{record}"
    );
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let results: Vec<(Acked, usize)> = writers.into_iter().map(|w| w.join().unwrap()).collect();

    for (i, (acked, moves)) in results.iter().enumerate() {
        assert_eq!(*moves, 1, "writer {i} did not move to the new source once");
        assert!(acked.incrs > 10, "writer {i}: too few writes: {acked:?}");
        let keys = writer_keys(i);
        let want = (acked.incrs, acked.pushed.clone());
        wait_for(
            &format!("writer {i}'s writes back on the old source"),
            Duration::from_secs(30),
            || values_of(Side::Cluster(&a), &keys) == want,
        );
        assert_eq!(
            values_of(Side::Cluster(&b), &keys),
            want,
            "writer {i}: the new source differs from what was acknowledged"
        );
    }
    let status = sync.status_json();
    let listeners = status["listeners"].as_array().cloned().unwrap_or_default();
    assert_eq!(listeners.len(), 3, "{status}");
    for listener in &listeners {
        assert_eq!(listener["full_syncs"], 0, "{status}");
    }
    let fulls = sync_fulls(Side::Cluster(&b));

    // kill -9, restart with the original command line: B -> A resumed by
    // PSYNC on every shard.
    sync.kill9();
    let _ = std::fs::remove_file(data.join("admin.addr"));
    let mut sync = FerryProcess::sync(&data, &a.seed_list(), &b.seed_list(), &[]);
    let after: Vec<String> = WRITER_SLOTS
        .iter()
        .map(|&slot| key_in_slot("after", slot))
        .collect();
    for key in &after {
        b.call_key(key, &["SET", key, "restarted"]);
    }
    wait_for(
        "writes after the restart on every shard of A",
        Duration::from_secs(40),
        || {
            after
                .iter()
                .all(|key| a.call_key(key, &["GET", key]).text().as_deref() == Some("restarted"))
        },
    );
    let status = sync.status_json();
    let listeners = status["listeners"].as_array().cloned().unwrap_or_default();
    assert_eq!(listeners.len(), 3, "{status}");
    for listener in &listeners {
        assert_eq!(listener["full_syncs"], 0, "{status}");
    }
    assert_eq!(
        sync_fulls(Side::Cluster(&b)),
        fulls,
        "a full sync of the new source"
    );
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(log.contains("this data dir was switched over"), "{log}");
    sync.terminate(Duration::from_secs(20));
}

/// A cluster switchover that cannot finish in time (one master of the
/// target takes no writes) unpauses every master of the source, leaves
/// nothing of itself, and the old direction goes on.
#[test]
fn a_cluster_switchover_that_times_out_unpauses_every_source_master() {
    let ClusterPair {
        a,
        b,
        dir: _dir,
        data,
        sync,
    } = synced_clusters();
    switchover_times_out(Side::Cluster(&a), Side::Cluster(&b), &data, sync);
}

/// The same with a standalone source and a cluster target.
#[test]
fn a_mixed_switchover_that_times_out_unpauses_the_source() {
    MixedPair::start(true).run(switchover_times_out);
}

/// A switchover of `sync` (`a` into `b`) that cannot finish in time (the
/// master of B's first writer slot takes no writes): every master of A
/// unpaused, nothing of the switchover left, the old direction goes on.
fn switchover_times_out(a: Side, b: Side, data: &std::path::Path, sync: FerryProcess) {
    let keys: Vec<String> = WRITER_SLOTS
        .iter()
        .map(|&slot| key_in_slot("k", slot))
        .collect();
    // The master of the first slot on B takes no writes for a while.
    let held = b.addr_for(&keys[0]);
    connect(&held)
        .call(&["CLIENT", "PAUSE", "8000", "WRITE"])
        .unwrap();
    for key in &keys {
        a.call_key(key, &["SET", key, "1"]);
    }
    let admin = sync.admin_addr(Duration::from_secs(10));
    let started = Instant::now();
    let out = ferry(&["switchover", "--admin", &admin, "--timeout", "1s"]);
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains("timed out"), "{shown}");
    assert!(shown.contains("runs on in its old direction"), "{shown}");
    assert!(started.elapsed() < Duration::from_secs(8), "{shown}");
    // Every master of the source takes writes again at once.
    for key in &keys {
        let master = a.addr_for(key);
        let mut conn = Conn::connect(&master, Duration::from_secs(1)).unwrap();
        assert_eq!(
            conn.call(&["SET", key, "2"]).unwrap(),
            Resp::Simple("OK".into()),
            "{master} is still paused"
        );
    }
    // Nothing of the switchover is left; the old direction goes on once
    // the target's master takes writes again.
    for left in [
        "direction",
        "listener.g1",
        "cluster.g1",
        "switchover.paused",
    ] {
        assert!(!data.join(left).exists(), "{left} was left");
    }
    connect(&held).call(&["CLIENT", "UNPAUSE"]).unwrap();
    wait_for(
        "the old direction to go on",
        Duration::from_secs(40),
        || keys.iter().all(|key| b.get(key).as_deref() == Some("2")),
    );
    let status = sync.status_json();
    assert!(online(&status, a.partitions()), "{status}");
    for partition in 0..b.partitions() {
        let key = format!("__ferry:checkpoint:ferry:{partition}");
        assert_eq!(
            a.call_key(&key, &["EXISTS", &key]),
            Resp::Int(0),
            "a prepared checkpoint was left on the source"
        );
    }
    let mut sync = sync;
    sync.terminate(Duration::from_secs(20));
}

/// A standalone server switched over with a 3-master cluster it syncs
/// into, under a load on every writer slot ([`switchover_under_load`]).
#[test]
fn a_standalone_into_cluster_switchover_under_load_loses_nothing_and_reverses() {
    MixedPair::start(true).run(switchover_under_load);
}

/// A 3-master cluster switched over with the standalone server it syncs
/// into, under a load on every writer slot ([`switchover_under_load`]).
#[test]
fn a_cluster_into_standalone_switchover_under_load_loses_nothing_and_reverses() {
    MixedPair::start(false).run(switchover_under_load);
}

/// `ferry switchover` of `sync` (`a` into `b`) under a writer per slot of
/// [`WRITER_SLOTS`], each moving from A to B once the release closes it:
/// every step reported, the record with B's partitions and the reversed
/// pair, every acknowledged write once on both sides (the writes on B
/// carried back to A), no full sync; then a kill -9 and a restart with the
/// original command line resume B -> A by PSYNC on every partition, and a
/// switch back runs A -> B again with nothing applied twice.
fn switchover_under_load(a: Side, b: Side, data: &std::path::Path, mut sync: FerryProcess) {
    let fulls_a = sync_fulls(a);
    let writers = ClusterWriters::start(a, b);
    thread::sleep(Duration::from_millis(700));
    let admin = sync.admin_addr(Duration::from_secs(10));
    let out = ferry(&["switchover", "--admin", &admin, "--timeout", "20s"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}\n{}", sync.log_tail(60));
    eprintln!("{shown}");
    for step in [
        "check",
        "prepare the reverse",
        "pause writes on the source",
        "wait for the target",
        "stop the old direction",
        "mark the switch point on the target",
        "store the reversed start",
        "release the old source",
        "start the reversed direction",
    ] {
        assert!(shown.contains(step), "no step {step:?} in {shown}");
    }
    let record = record_of(data).unwrap();
    assert_eq!(record["generation"], 1, "{record}");
    assert_eq!(record["released"], true, "{record}");
    let (partitions, pair) = match (a, b) {
        (Side::Standalone(_), Side::Cluster(_)) => (Some(3), "cluster-standalone"),
        (Side::Cluster(_), Side::Standalone(_)) => (None, "standalone-cluster"),
        _ => panic!("switchover_under_load runs a mixed pair"),
    };
    assert_eq!(
        record["partitions"].as_array().map(Vec::len),
        partitions,
        "{record}"
    );
    assert_eq!(record["pair"], pair, "{record}");
    wait_online(&sync, b.partitions());
    thread::sleep(Duration::from_millis(1500));
    let results = writers.stop();
    for (i, (_, moves)) in results.iter().enumerate() {
        assert_eq!(*moves, 1, "writer {i} did not move to the new source once");
    }
    assert_exactly_once(a, b, &results, &sync);
    let fulls = sync_fulls(b);

    // kill -9, restart with the original command line: B -> A resumed by
    // PSYNC on every partition.
    sync.respawn_with_env(&[]);
    wait_online(&sync, b.partitions());
    assert_flows(b, a, "restarted", &sync);
    assert_eq!(sync_fulls(b), fulls, "a full sync of the new source");
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(log.contains("this data dir was switched over"), "{log}");
    assert_eq!(
        log.matches(common::ferry::log::FULL_SYNC_STORED).count(),
        a.partitions(),
        "full syncs other than the first (one per partition of A)"
    );

    // Switching back (generation 2): A -> B again from the exact point,
    // nothing of either generation applied again.
    let admin = sync.admin_addr(Duration::from_secs(10));
    let out = ferry(&["switchover", "--admin", &admin, "--timeout", "20s"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        sync.log_tail(60)
    );
    let record = record_of(data).unwrap();
    assert_eq!(record["generation"], 2, "{record}");
    assert_eq!(record["released"], true, "{record}");
    wait_online(&sync, a.partitions());
    assert_flows(a, b, "switched-back", &sync);
    assert_exactly_once(a, b, &results, &sync);
    assert_eq!(sync_fulls(a), fulls_a, "a full sync of A");
    sync.terminate(Duration::from_secs(20));
}

/// The writers of the cluster tests, one per slot of [`WRITER_SLOTS`],
/// each following its slot from one side to the other as its connection
/// is closed ([`following_writer_of`]).
struct ClusterWriters {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<(Acked, usize)>>,
}

impl ClusterWriters {
    fn start(a: Side, b: Side) -> ClusterWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..WRITER_SLOTS.len())
            .map(|i| {
                let keys = writer_keys(i);
                let addrs = [a.addr_for(&keys.0), b.addr_for(&keys.0)];
                let stop = Arc::clone(&stop);
                thread::spawn(move || following_writer_of([&keys.0, &keys.1], addrs, stop))
            })
            .collect();
        ClusterWriters { stop, threads }
    }

    fn stop(self) -> Vec<(Acked, usize)> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect()
    }
}

/// Every writer's acknowledged writes, exactly once, on both sides.
fn assert_exactly_once(a: Side, b: Side, results: &[(Acked, usize)], sync: &FerryProcess) {
    for (i, (acked, _)) in results.iter().enumerate() {
        assert!(acked.incrs > 10, "writer {i}: too few writes: {acked:?}");
        let keys = writer_keys(i);
        let want = (acked.incrs, acked.pushed.clone());
        for (name, side) in [("A", a), ("B", b)] {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let have = values_of(side, &keys);
                if have == want {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "writer {i} on {name}: counter {} and {} elements, acknowledged {} and {} \
                     (missing {:?}, extra {:?})\n{}",
                    have.0,
                    have.1.len(),
                    want.0,
                    want.1.len(),
                    want.1
                        .iter()
                        .filter(|e| !have.1.contains(e))
                        .take(5)
                        .collect::<Vec<_>>(),
                    have.1
                        .iter()
                        .filter(|e| !want.1.contains(e))
                        .take(5)
                        .collect::<Vec<_>>(),
                    sync.log_tail(40)
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Writes a key in every slot of [`WRITER_SLOTS`] on `from` (whose masters
/// may still be paused for a while: each write waits) and waits for all of
/// them on `to`: the sync carries `from` into `to` on every partition.
fn assert_flows(from: Side, to: Side, what: &str, sync: &FerryProcess) {
    let keys: Vec<String> = WRITER_SLOTS
        .iter()
        .map(|&slot| key_in_slot(&format!("flow:{what}"), slot))
        .collect();
    for key in &keys {
        assert_eq!(
            from.call_key(key, &["SET", key, what]),
            Resp::Simple("OK".into())
        );
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    while !keys.iter().all(|key| to.get(key).as_deref() == Some(what)) {
        assert!(
            Instant::now() < deadline,
            "{what}: the writes did not reach the other side on every partition\n{}",
            sync.log_tail(60)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Every master of `side` takes a write within `within` (a master still
/// paused holds it).
fn assert_masters_take_writes(side: Side, within: Duration, what: &str) {
    for key in side.key_per_master("probe") {
        let addr = side.addr_for(&key);
        let mut conn = Conn::connect(&addr, within).unwrap();
        let reply = conn.call(&["SET", &key, "1"]);
        assert!(
            matches!(reply, Ok(Resp::Simple(ref ok)) if ok == "OK"),
            "{what}: the master {addr} did not take a write within {within:?}: {reply:?}"
        );
    }
}

/// Waits until every partition is online (`partitions` listeners and
/// appliers), none after a full sync.
fn wait_online(sync: &FerryProcess, partitions: usize) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let status = sync.status_json();
        if online(&status, partitions) {
            for listener in status["listeners"].as_array().unwrap() {
                assert_eq!(listener["full_syncs"], 0, "{status}");
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the partitions did not come online: {status}\n{}",
            sync.log_tail(60)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `ferry switchover` on `sync` (held by the hook at `point`,
/// [`HOLD_ENV`] set on the running process), waits for the hold, and kills
/// ferry with SIGKILL there.
fn kill_held_switchover(sync: &mut FerryProcess, point: &str) {
    let mark = sync.log_len();
    let admin = sync.admin_addr(Duration::from_secs(10));
    let mut asked = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["switchover", "--admin", &admin, "--timeout", "2s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = sync.log_since(mark);
        if log.contains("ferry holds here") && log.contains(&format!("\"{point}\"")) {
            break;
        }
        assert!(
            asked.try_wait().unwrap().is_none(),
            "the switchover ended before the hold at {point}\n{log}"
        );
        assert!(Instant::now() < deadline, "no hold at {point}\n{log}");
        thread::sleep(Duration::from_millis(10));
    }
    sync.kill9();
    let _ = asked.wait();
}

/// The crash tests' hook in src/node/switchover.rs.
const HOLD_ENV: &str = "FERRY_TEST_SWITCHOVER_HOLD";

fn record_of(data: &std::path::Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(data.join("direction")).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

/// kill -9 of ferry at three moments of cluster switchovers
/// ([`kill_9_mid_switchover`]).
#[test]
fn kill_9_of_ferry_mid_cluster_switchover_rolls_back_or_releases_and_repeats_nothing() {
    let ClusterPair {
        a,
        b,
        dir: _dir,
        data,
        sync,
    } = synced_clusters();
    kill_9_mid_switchover(Side::Cluster(&a), Side::Cluster(&b), &data, sync);
}

/// The same for a cluster syncing into a standalone server: the restart
/// unpauses every master of the cluster, then releases them (partition
/// 0's floor on the cluster, B -> A) and, switching back, the server (the
/// owner map, scopes and a checkpoint per partition on it, A -> B).
#[test]
fn kill_9_of_ferry_mid_mixed_switchover_rolls_back_or_releases_and_repeats_nothing() {
    MixedPair::start(false).run(kill_9_mid_switchover);
}

/// The same for a standalone server syncing into a cluster: the restart
/// unpauses the server, then releases it (the owner map, scopes and a
/// checkpoint per partition on it, B -> A) and, switching back, every
/// master of the cluster (partition 0's floor on the cluster, A -> B).
#[test]
fn kill_9_of_ferry_mid_mixed_switchover_the_other_way_round() {
    MixedPair::start(true).run(kill_9_mid_switchover);
}

/// kill -9 of ferry at three moments of switchovers of `sync` (`a` into
/// `b`), under a load on every writer slot, each followed by a restart
/// with the original command line: after the pause with the target caught
/// up (before the commit: rolled back, the restart unpauses every master
/// of A, A -> B goes on, the writes the pause held included), after the
/// commit and before the release (the restart releases every master of A,
/// B -> A runs), and, switching back, after the old source's masters were
/// unpaused and before its checkpoints were written (the restart writes
/// them, A -> B runs). Every acknowledged write once on both sides, no full
/// sync anywhere.
fn kill_9_mid_switchover(a: Side, b: Side, data: &std::path::Path, mut sync: FerryProcess) {
    let fulls_a = sync_fulls(a);
    let writers = ClusterWriters::start(a, b);

    // 1. Before the commit: the switchover is rolled back.
    sync.respawn_with_env(&[(HOLD_ENV, "drained")]);
    wait_online(&sync, a.partitions());
    // B's masters are given a backlog by the first switchover's check.
    thread::sleep(Duration::from_millis(300));
    kill_held_switchover(&mut sync, "drained");
    let killed = Instant::now();
    assert!(record_of(data).is_none(), "a record before the commit");
    sync.respawn_with_env(&[]);
    wait_online(&sync, a.partitions());
    for left in ["direction", "listener.g1", "cluster.g1"] {
        assert!(!data.join(left).exists(), "{left} was left");
    }
    // The restart unpaused A (its pause, 2 s timeout + 10 s, lasts on).
    assert_masters_take_writes(a, Duration::from_secs(2), "after a kill before the commit");
    eprintln!("A took writes again {:?} after the kill", killed.elapsed());
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(
        log.contains("unpaused the source of a switchover that a stop interrupted"),
        "{}",
        sync.log_tail(60)
    );
    assert!(!data.join("switchover.paused").exists());
    assert_flows(a, b, "rolled-back", &sync);
    let fulls_b = sync_fulls(b);

    // 2. After the commit, before the release: the restart releases A.
    sync.respawn_with_env(&[(HOLD_ENV, "committed")]);
    wait_online(&sync, a.partitions());
    thread::sleep(Duration::from_millis(300));
    kill_held_switchover(&mut sync, "committed");
    let record = record_of(data).expect("the record of the commit");
    assert_eq!(record["generation"], 1, "{record}");
    assert_eq!(record["released"], false, "{record}");
    sync.respawn_with_env(&[]);
    wait_online(&sync, b.partitions());
    let record = record_of(data).unwrap();
    assert_eq!(record["released"], true, "{record}");
    assert!(!data.join("switchover.paused").exists());
    // Released at the restart, not by the pause's end.
    assert_masters_take_writes(a, Duration::from_secs(2), "after a restart past the commit");
    assert_flows(b, a, "committed", &sync);
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(
        log.contains("released the old source of an unfinished switchover"),
        "{}",
        sync.log_tail(60)
    );

    // 3. Switching back, after the unpause of B's masters and before
    // their checkpoints: the restart writes them, A -> B runs.
    sync.respawn_with_env(&[(HOLD_ENV, "unpaused")]);
    wait_online(&sync, b.partitions());
    thread::sleep(Duration::from_millis(300));
    kill_held_switchover(&mut sync, "unpaused");
    let record = record_of(data).unwrap();
    assert_eq!(record["generation"], 2, "{record}");
    assert_eq!(record["released"], false, "{record}");
    sync.respawn_with_env(&[]);
    wait_online(&sync, a.partitions());
    assert_eq!(record_of(data).unwrap()["released"], true);
    assert_masters_take_writes(b, Duration::from_secs(2), "after a restart mid-release");
    assert_flows(a, b, "switched-back", &sync);

    thread::sleep(Duration::from_millis(500));
    let results = writers.stop();
    for (i, (_, moves)) in results.iter().enumerate() {
        assert_eq!(*moves, 2, "writer {i} did not follow both switches");
    }
    assert_exactly_once(a, b, &results, &sync);
    assert_eq!(sync_fulls(a), fulls_a, "a full sync of A");
    assert_eq!(sync_fulls(b), fulls_b, "a full sync of B");
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert_eq!(
        log.matches(common::ferry::log::FULL_SYNC_STORED).count(),
        a.partitions(),
        "full syncs other than the first (one per partition of A)"
    );
    sync.terminate(Duration::from_secs(20));
}

/// A cluster switched over and back (generation 2) under a load on every
/// shard: the original direction carries new writes on every shard, the
/// counters are exact on both sides, and a restart with the original
/// command line resumes generation 2 without a full sync.
#[test]
fn a_cluster_switched_over_and_back_runs_its_first_direction_again() {
    let ClusterPair {
        a,
        b,
        dir: _dir,
        data,
        mut sync,
    } = synced_clusters();
    let (a, b) = (Side::Cluster(&a), Side::Cluster(&b));
    let fulls_a = sync_fulls(a);
    let writers = ClusterWriters::start(a, b);
    let mut fulls_b = None;
    for (generation, (from, to)) in [(b, a), (a, b)].into_iter().enumerate() {
        thread::sleep(Duration::from_millis(700));
        let admin = sync.admin_addr(Duration::from_secs(10));
        let out = ferry(&["switchover", "--admin", &admin, "--timeout", "20s"]);
        let shown = text(&out);
        assert!(out.status.success(), "{shown}\n{}", sync.log_tail(60));
        eprintln!("generation {}: {shown}", generation + 1);
        let record = record_of(&data).unwrap();
        assert_eq!(record["generation"], generation + 1, "{record}");
        assert_eq!(record["released"], true, "{record}");
        wait_online(&sync, 3);
        assert_flows(from, to, &format!("generation-{}", generation + 1), &sync);
        fulls_b.get_or_insert_with(|| sync_fulls(b));
    }
    assert!(!data.join("listener.g1").exists() && !data.join("cluster.g1").exists());
    thread::sleep(Duration::from_millis(700));
    let results = writers.stop();
    for (i, (_, moves)) in results.iter().enumerate() {
        assert_eq!(*moves, 2, "writer {i} did not follow both switches");
    }
    assert_exactly_once(a, b, &results, &sync);

    // A restart with the original command line resumes generation 2.
    sync.respawn_with_env(&[]);
    wait_online(&sync, 3);
    assert_flows(a, b, "restarted", &sync);
    assert_masters_take_writes(a, Duration::from_secs(2), "the end");
    assert_eq!(sync_fulls(a), fulls_a, "a full sync of A");
    assert_eq!(sync_fulls(b), fulls_b.unwrap(), "a full sync of B");
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert_eq!(
        log.matches(common::ferry::log::FULL_SYNC_STORED).count(),
        3,
        "full syncs other than the first (one per partition)"
    );
    sync.terminate(Duration::from_secs(20));
}
