//! `ferry precheck` of Redis Cluster sources and targets, against real local
//! clusters: every master of a side is checked (its settings, its keys), a
//! master that does not answer and slots that nobody serves are FAILs naming
//! them, and `--json` names the node of each per-master verdict.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{key_in_slot, Cluster, SLOTS};
use common::ferry::{ferry_bin, FerryProcess};
use common::resp::Resp;
use common::{output_within, RedisServer};

/// One row of the JSON report.
#[derive(Debug)]
struct Row {
    verdict: String,
    detail: String,
    /// `node -> verdict` of a per-master row of a cluster.
    nodes: BTreeMap<String, String>,
}

/// `ferry precheck ... --json`: the exit code and the rows by check name.
fn precheck(source: &str, target: &str, extra: &[&str]) -> (i32, BTreeMap<String, Row>) {
    let out = output_within(
        Command::new(ferry_bin())
            .args(["precheck", "--source", source, "--target", target, "--json"])
            .args(["--sample", "300ms"])
            .args(extra),
        Duration::from_secs(90),
    )
    .expect("ferry precheck");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let rows = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            let nodes = c["nodes"]
                .as_array()
                .map(|nodes| {
                    nodes
                        .iter()
                        .map(|n| {
                            (
                                n["node"].as_str().expect("node").to_string(),
                                n["verdict"].as_str().expect("verdict").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            (
                c["check"].as_str().expect("check").to_string(),
                Row {
                    verdict: c["verdict"].as_str().expect("verdict").to_string(),
                    detail: c["detail"].as_str().expect("detail").to_string(),
                    nodes,
                },
            )
        })
        .collect();
    (out.status.code().expect("exit code"), rows)
}

fn row<'a>(rows: &'a BTreeMap<String, Row>, check: &str) -> &'a Row {
    rows.get(check)
        .unwrap_or_else(|| panic!("no row {check:?} in {rows:#?}"))
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Waits until the node on `port` says `cluster_state:fail`.
fn wait_cluster_fail(cluster: &Cluster, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = cluster
            .node(port)
            .call(&["CLUSTER", "INFO"])
            .text()
            .unwrap_or_default();
        if info.lines().any(|l| l.trim() == "cluster_state:fail") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{port} never said cluster_state:fail\n{info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A 3-master target whose keys are all on its third master is refused
/// (the first node, the one named, is empty); the key filter still narrows
/// what counts; a setting of one master is that master's verdict; slots
/// nobody serves and a master that is down are FAILs naming them.
#[test]
fn every_master_of_a_cluster_target_is_checked() {
    let source = RedisServer::start(&[]);
    let target = Cluster::start(3, 0);
    let masters = target.master_ports();
    let (first, second, third) = (masters[0], masters[1], masters[2]);
    assert!(target.url().ends_with(&format!(":{first}")), "{masters:?}");
    let theirs = key_in_slot("theirs", SLOTS - 1);
    assert_eq!(
        target.node(third).call(&["SET", &theirs, "x"]),
        Resp::Simple("OK".into())
    );
    assert_eq!(target.node(first).dbsize(), 0);

    let (code, rows) = precheck(&source.url(), &target.url(), &[]);
    let data = row(&rows, "target data");
    assert_eq!((code, data.verdict.as_str()), (1, "FAIL"), "{rows:#?}");
    assert!(
        data.detail
            .contains(&format!("db 0: 1 keys on {}", addr(third))),
        "{rows:#?}"
    );
    assert_eq!(
        data.nodes.get(&addr(third)).map(String::as_str),
        Some("FAIL")
    );
    assert_eq!(
        data.nodes.get(&addr(first)).map(String::as_str),
        Some("PASS")
    );
    let reachable = row(&rows, "target reachable");
    assert_eq!(reachable.verdict, "PASS", "{rows:#?}");
    for port in [first, second, third] {
        assert!(reachable.detail.contains(&addr(port)), "{rows:#?}");
    }
    assert_eq!(row(&rows, "target cluster slots").verdict, "PASS");
    // Every check of the target reads every master.
    for check in [
        "target role",
        "target persistence",
        "target maxmemory-policy",
    ] {
        assert_eq!(row(&rows, check).nodes.len(), 3, "{check}: {rows:#?}");
    }

    // keep: a WARN; a key filter that does not own the key: a PASS.
    let (code, rows) = precheck(&source.url(), &target.url(), &["--existing-data", "keep"]);
    assert_eq!(
        (code, row(&rows, "target data").verdict.as_str()),
        (0, "WARN"),
        "{rows:#?}"
    );
    let (code, rows) = precheck(&source.url(), &target.url(), &["--key-prefix", "mine:"]);
    assert_eq!(
        (code, row(&rows, "target data").verdict.as_str()),
        (0, "PASS"),
        "{rows:#?}"
    );
    let (_, rows) = precheck(&source.url(), &target.url(), &["--key-prefix", "theirs:"]);
    assert_eq!(row(&rows, "target data").verdict, "FAIL", "{rows:#?}");

    // The eviction policy of the second master alone.
    target
        .node(second)
        .call(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let (_, rows) = precheck(&source.url(), &target.url(), &["--existing-data", "keep"]);
    let policy = row(&rows, "target maxmemory-policy");
    assert_eq!(policy.verdict, "WARN", "{rows:#?}");
    assert!(
        policy
            .detail
            .contains(&format!("{}: allkeys-lru", addr(second))),
        "{rows:#?}"
    );
    assert_eq!(
        policy.nodes.get(&addr(second)).map(String::as_str),
        Some("WARN")
    );
    assert_eq!(
        policy.nodes.get(&addr(first)).map(String::as_str),
        Some("PASS")
    );

    // Slots nobody serves, as the first master sees them.
    target
        .node(first)
        .call(&["CLUSTER", "DELSLOTSRANGE", "0", "99"]);
    let (code, rows) = precheck(&source.url(), &target.url(), &["--existing-data", "keep"]);
    let slots = row(&rows, "target cluster slots");
    assert_eq!((code, slots.verdict.as_str()), (1, "FAIL"), "{rows:#?}");
    assert!(slots.detail.contains("0-99"), "{rows:#?}");

    // A master that does not answer.
    let mut target = target;
    target.kill9(third);
    let (code, rows) = precheck(&source.url(), &target.url(), &["--existing-data", "keep"]);
    let reachable = row(&rows, "target reachable");
    assert_eq!((code, reachable.verdict.as_str()), (1, "FAIL"), "{rows:#?}");
    assert!(
        reachable
            .detail
            .contains(&format!("{}: master of slots", addr(third))),
        "{rows:#?}"
    );
    assert_eq!(
        reachable.nodes.get(&addr(third)).map(String::as_str),
        Some("FAIL")
    );
    assert_eq!(
        reachable.nodes.get(&addr(second)).map(String::as_str),
        Some("PASS")
    );
}

/// A small backlog or output buffer of one source master (not the one
/// named) is that master's WARN, while the others pass.
#[test]
fn every_master_of_a_cluster_source_is_checked() {
    let source = Cluster::start(3, 0);
    let target = RedisServer::start(&["--appendonly", "yes"]);
    let masters = source.master_ports();
    let (first, second, third) = (masters[0], masters[1], masters[2]);
    assert!(source.url().ends_with(&format!(":{first}")), "{masters:?}");
    source
        .node(second)
        .call(&["CONFIG", "SET", "repl-backlog-size", "16kb"]);
    source.node(third).call(&[
        "CONFIG",
        "SET",
        "client-output-buffer-limit",
        "replica 1 1 0",
    ]);
    // A few MB of dataset on the third master, so that even the precheck's
    // own traffic there would overflow a 1-byte buffer during its sync.
    let slot = source.shard_of_master(third).master.slots[0].0;
    let tag = key_in_slot("data", slot);
    let mut conn = source.node(third).conn();
    let value = "d".repeat(100);
    for i in 0..20_000 {
        conn.queue(&["SET", &format!("{tag}:{i}"), &value]);
    }
    let replies = conn.replies().expect("SET replies");
    assert!(replies.iter().all(|r| *r == Resp::Simple("OK".into())));
    // A steady writer on the second and third masters: ~200 KB/s each,
    // which a 16 KiB backlog covers for a fraction of a second and the
    // default 1 MiB one for seconds.
    let writing = Arc::new(AtomicBool::new(true));
    let writers: Vec<_> = [second, third]
        .into_iter()
        .map(|port| {
            let writing = Arc::clone(&writing);
            let slot = source
                .shard_of_master(port)
                .master
                .slots
                .first()
                .expect("slots")
                .0;
            let key = key_in_slot("w", slot);
            let mut conn = source.node(port).conn();
            std::thread::spawn(move || {
                let value = "v".repeat(2000);
                while writing.load(Ordering::Relaxed) {
                    let reply = conn.call(&["SET", key.as_str(), value.as_str()]);
                    assert_eq!(reply.expect("SET"), Resp::Simple("OK".into()));
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();
    // Let the writers run before the sample.
    std::thread::sleep(Duration::from_millis(300));
    let (code, rows) = precheck(&source.url(), &target.url(), &["--outage", "2s"]);
    writing.store(false, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("writer");
    }
    assert_eq!(code, 0, "{rows:#?}");
    let backlog = row(&rows, "source backlog");
    assert_eq!(backlog.verdict, "WARN", "{rows:#?}");
    assert!(
        backlog
            .detail
            .contains(&format!("{}: repl-backlog-size 16.0 KiB", addr(second))),
        "{rows:#?}"
    );
    let verdicts = |row: &Row| {
        [first, second, third].map(|p| row.nodes.get(&addr(p)).cloned().unwrap_or_default())
    };
    assert_eq!(verdicts(backlog), ["PASS", "WARN", "PASS"], "{rows:#?}");
    let buffer = row(&rows, "source replica output buffer");
    assert_eq!(buffer.verdict, "WARN", "{rows:#?}");
    assert!(
        buffer
            .detail
            .contains(&format!("{}: limit replica hard 1 B", addr(third))),
        "{rows:#?}"
    );
    assert_eq!(verdicts(buffer), ["PASS", "PASS", "WARN"], "{rows:#?}");
    assert_eq!(verdicts(row(&rows, "source version")), ["PASS"; 3]);
    assert_eq!(row(&rows, "source cluster slots").verdict, "PASS");
}

/// A source master killed (no replica to take over): FAIL naming it, also
/// through a seed list whose first address is that master; once the cluster
/// marks it failed, its slots are named as not served.
#[test]
fn a_killed_source_master_is_a_fail_naming_it() {
    let mut source = Cluster::start(3, 0);
    let target = RedisServer::start(&[]);
    let masters = source.master_ports();
    let (first, second) = (masters[0], masters[1]);
    let second_slots = source.shard_of_master(second).master.slots[0];
    source.kill9(second);

    let (code, rows) = precheck(&source.url(), &target.url(), &[]);
    let reachable = row(&rows, "source reachable");
    assert_eq!((code, reachable.verdict.as_str()), (1, "FAIL"), "{rows:#?}");
    assert!(reachable.detail.contains(&addr(second)), "{rows:#?}");
    // The other masters are still checked.
    assert_eq!(row(&rows, "source version").nodes.len(), 2, "{rows:#?}");

    let seeds = format!("redis://{},{}", addr(second), addr(first));
    let (code, rows) = precheck(&seeds, &target.url(), &[]);
    let reachable = row(&rows, "source reachable");
    assert_eq!((code, reachable.verdict.as_str()), (1, "FAIL"), "{rows:#?}");
    assert!(reachable.detail.contains(&addr(second)), "{rows:#?}");
    assert_eq!(row(&rows, "source cluster mode").verdict, "PASS");

    wait_cluster_fail(&source, first);
    let (code, rows) = precheck(&source.url(), &target.url(), &[]);
    let slots = row(&rows, "source cluster slots");
    assert_eq!((code, slots.verdict.as_str()), (1, "FAIL"), "{rows:#?}");
    let range = format!("{}-{}", second_slots.0, second_slots.1);
    assert!(slots.detail.contains(&range), "{range}: {rows:#?}");
    assert!(slots.detail.contains("cluster_state:fail"), "{rows:#?}");
}

/// `ferry sync` into a cluster target whose third master holds keys refuses
/// to start, with the precheck table naming that master.
#[test]
fn sync_refuses_a_cluster_target_with_keys_on_a_later_master() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    source.cmd(&["SET", "mine", "1"]);
    let target = Cluster::start(3, 0);
    let third = target.master_ports()[2];
    let theirs = key_in_slot("theirs", SLOTS - 1);
    target.node(third).call(&["SET", &theirs, "x"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sync = FerryProcess::sync(dir.path(), &source.url(), &target.url(), &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = sync.try_exit() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ferry sync did not refuse\n{}",
            sync.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = sync.log_tail(60);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("precheck failed")
            && log.contains(&format!("db 0: 1 keys on {}", addr(third))),
        "{log}"
    );
    assert_eq!(target.node(third).dbsize(), 1);
    assert_eq!(target.total_keys(), 1);
}

/// Every master down, a replica named: the precheck says so and ends (no
/// master left to read is not a crash).
#[test]
fn a_cluster_with_every_master_down_fails_naming_them() {
    let mut target = Cluster::start(3, 1);
    let source = RedisServer::start(&[]);
    let shards = target.shards();
    let replica = shards[0].replicas[0].port;
    let masters: Vec<u16> = shards.iter().map(|s| s.master.port).collect();
    for &port in &masters {
        target.kill9(port);
    }
    let url = format!("redis://{}", addr(replica));
    let (code, rows) = precheck(&source.url(), &url, &[]);
    let reachable = row(&rows, "target reachable");
    assert_eq!((code, reachable.verdict.as_str()), (1, "FAIL"), "{rows:#?}");
    for &port in &masters {
        assert_eq!(
            reachable.nodes.get(&addr(port)).map(String::as_str),
            Some("FAIL"),
            "{rows:#?}"
        );
    }
    assert!(reachable.detail.contains("answering: none"), "{rows:#?}");
    assert!(!rows.contains_key("target data"), "{rows:#?}");
}
