//! `ferry precheck` against real redis-servers: every row's verdict follows
//! the servers' real settings, the exit code is 1 on a FAIL, `--json` says
//! the same as the table.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::ferry::ferry_bin;
use common::{output_within, RedisServer};

/// `ferry precheck ... --json`: the exit code and `check -> (verdict,
/// detail)`.
fn precheck(
    source: &str,
    target: &str,
    extra: &[&str],
) -> (i32, BTreeMap<String, (String, String)>) {
    let out = output_within(
        Command::new(ferry_bin())
            .args(["precheck", "--source", source, "--target", target, "--json"])
            .args(["--sample", "300ms"])
            .args(extra),
        Duration::from_secs(60),
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
            (
                c["check"].as_str().expect("check").to_string(),
                (
                    c["verdict"].as_str().expect("verdict").to_string(),
                    c["detail"].as_str().expect("detail").to_string(),
                ),
            )
        })
        .collect();
    (out.status.code().expect("exit code"), rows)
}

fn verdict<'a>(rows: &'a BTreeMap<String, (String, String)>, check: &str) -> &'a str {
    &rows
        .get(check)
        .unwrap_or_else(|| panic!("no row {check:?} in {rows:#?}"))
        .0
}

#[test]
fn a_good_pair_passes_and_the_table_says_so() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&["--appendonly", "yes"]);
    source.cmd(&["DEBUG", "POPULATE", "1000"]);
    let (code, rows) = precheck(&source.url(), &target.url(), &[]);
    assert_eq!(code, 0, "{rows:#?}");
    for check in [
        "source reachable",
        "target reachable",
        "source cluster mode",
        "target cluster mode",
        "source version",
        "source backlog",
        "source replica output buffer",
        "target role",
        "target maxmemory-policy",
        "target persistence",
        "target data",
        "versions",
        "write commands",
        "databases",
        "target memory",
    ] {
        assert_eq!(verdict(&rows, check), "PASS", "{check}: {rows:#?}");
    }
    // The table form, for people.
    let out = output_within(
        Command::new(ferry_bin()).args([
            "precheck",
            "--source",
            &source.url(),
            "--target",
            &target.url(),
            "--sample",
            "100ms",
        ]),
        Duration::from_secs(60),
    )
    .expect("ferry precheck");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("| target persistence"), "{table}");
    assert!(
        table.contains("precheck: PASS (15 checks, 0 WARN, 0 FAIL)"),
        "{table}"
    );
}

#[test]
fn every_fail_and_warn_names_its_cause() {
    let source = RedisServer::start(&["--repl-backlog-size", "16kb"]);
    let target = RedisServer::start(&["--maxmemory-policy", "allkeys-lru"]);
    target.cmd(&["SET", "theirs", "1"]);
    target.cmd(&["-n", "4", "SET", "theirs", "1"]);
    // A steady writer: ~1 MB/s against a 16 KiB backlog.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = Arc::clone(&writing);
        let port = source.port;
        std::thread::spawn(move || {
            let value = "v".repeat(10_000);
            while writing.load(Ordering::Relaxed) {
                let _ = Command::new(common::redis_cli_bin())
                    .args(["-p", &port.to_string(), "SET", "w", &value])
                    .output();
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let (code, rows) = precheck(&source.url(), &target.url(), &["--outage", "10s"]);
    writing.store(false, Ordering::Relaxed);
    writer.join().expect("writer");
    assert_eq!(code, 1, "{rows:#?}");
    assert_eq!(verdict(&rows, "target data"), "FAIL");
    assert!(
        rows["target data"].1.contains("db 0: 1 keys, db 4: 1 keys"),
        "{rows:#?}"
    );
    assert_eq!(verdict(&rows, "source backlog"), "WARN", "{rows:#?}");
    assert!(rows["source backlog"].1.contains("16.0 KiB"), "{rows:#?}");
    assert_eq!(verdict(&rows, "target maxmemory-policy"), "WARN");
    assert!(rows["target maxmemory-policy"].1.contains("allkeys-lru"));
    assert_eq!(verdict(&rows, "target persistence"), "WARN");

    // The same target data is a WARN with keep or flush, and PASS when the
    // sync owns other dbs.
    let (code, rows) = precheck(&source.url(), &target.url(), &["--existing-data", "keep"]);
    assert_eq!(
        (code, verdict(&rows, "target data")),
        (0, "WARN"),
        "{rows:#?}"
    );
    let (_, rows) = precheck(&source.url(), &target.url(), &["--dbs", "1,2"]);
    assert_eq!(verdict(&rows, "target data"), "PASS", "{rows:#?}");

    // A replica target refuses writes.
    let replica = RedisServer::start(&[]);
    replica.cmd(&["REPLICAOF", "127.0.0.1", &source.port.to_string()]);
    let (code, rows) = precheck(&source.url(), &replica.url(), &[]);
    assert_eq!(
        (code, verdict(&rows, "target role")),
        (1, "FAIL"),
        "{rows:#?}"
    );

    // The same server on both sides.
    let (code, rows) = precheck(&source.url(), &source.url(), &[]);
    assert_eq!(
        (code, verdict(&rows, "distinct servers")),
        (1, "FAIL"),
        "{rows:#?}"
    );

    // Wrong password: the connection row fails with the server's error.
    let locked = RedisServer::start(&["--requirepass", "right-password"]);
    let wrong = format!("redis://:wrong-password@127.0.0.1:{}", locked.port);
    let (code, rows) = precheck(&wrong, &target.url(), &[]);
    assert_eq!(code, 1);
    assert_eq!(verdict(&rows, "source reachable"), "FAIL");
    assert!(
        rows["source reachable"].1.contains("WRONGPASS"),
        "{rows:#?}"
    );
    assert!(
        !rows["source reachable"].1.contains("wrong-password"),
        "{rows:#?}"
    );

    // Nobody listening.
    let port = common::free_port();
    let (code, rows) = precheck(&source.url(), &format!("redis://127.0.0.1:{port}"), &[]);
    assert_eq!(
        (code, verdict(&rows, "target reachable")),
        (1, "FAIL"),
        "{rows:#?}"
    );
}

#[test]
fn a_cluster_source_passes_the_cluster_check_and_a_cluster_target_fails_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("nodes.conf");
    let node = RedisServer::start(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        conf.to_str().expect("utf-8"),
    ]);
    let target = RedisServer::start(&[]);
    let (_, rows) = precheck(&node.url(), &target.url(), &[]);
    assert_eq!(verdict(&rows, "source cluster mode"), "PASS", "{rows:#?}");
    assert!(rows["source cluster mode"].1.contains("cluster_enabled:1"));
    assert_eq!(verdict(&rows, "target cluster mode"), "PASS");
    let (code, rows) = precheck(&target.url(), &node.url(), &[]);
    assert_eq!(code, 1, "{rows:#?}");
    assert_eq!(verdict(&rows, "target cluster mode"), "FAIL");
}

/// A sync that owns some keys of a shared target: only its own keys count as
/// existing data; a db map names the target db a source db lands in.
#[test]
fn a_key_filter_and_a_db_map_narrow_the_target_data_check() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    source.cmd(&["-n", "2", "SET", "a:1", "x"]);
    for i in 0..5 {
        target.cmd(&["SET", &format!("a:{i}"), "another sync's"]);
    }
    target.cmd(&["-n", "3", "SET", "b:1", "x"]);
    target.cmd(&["SET", "a*b", "x"]);
    // Another sync's keys (prefix a:) do not stop a sync of prefix b:.
    let (code, rows) = precheck(&source.url(), &target.url(), &["--key-prefix", "b:"]);
    assert_eq!(verdict(&rows, "target data"), "FAIL", "{rows:#?}");
    assert!(rows["target data"].1.contains("db 3: 1 keys"), "{rows:#?}");
    assert_eq!(code, 1);
    let (code, rows) = precheck(
        &source.url(),
        &target.url(),
        &["--key-prefix", "b:", "--dbs", "0,1,2"],
    );
    assert_eq!(
        (code, verdict(&rows, "target data")),
        (0, "PASS"),
        "{rows:#?}"
    );
    // Its own prefix does; exclusions and glob characters are honoured.
    let (_, rows) = precheck(
        &source.url(),
        &target.url(),
        &[
            "--key-prefix",
            "a",
            "--exclude-key-prefix",
            "a:4",
            "--dbs",
            "0",
        ],
    );
    assert!(rows["target data"].1.contains("db 0: 5 keys"), "{rows:#?}");
    let (_, rows) = precheck(
        &source.url(),
        &target.url(),
        &["--key-prefix", "a*", "--dbs", "0"],
    );
    assert!(rows["target data"].1.contains("db 0: 1 keys"), "{rows:#?}");
    // Source db 2 into target db 20 of a 16-db target.
    let (code, rows) = precheck(
        &source.url(),
        &target.url(),
        &["--db-map", "2=20", "--existing-data", "keep"],
    );
    assert_eq!(
        (code, verdict(&rows, "databases")),
        (1, "FAIL"),
        "{rows:#?}"
    );
    assert!(
        rows["databases"]
            .1
            .contains("db 2 (1 keys, into target db 20)"),
        "{rows:#?}"
    );
    let (code, rows) = precheck(&source.url(), &target.url(), &["--db-map", "2=5"]);
    assert_eq!(
        (code, verdict(&rows, "target data")),
        (0, "PASS"),
        "{rows:#?}"
    );
    // Two source dbs into one target db: refused before any check.
    let out = output_within(
        Command::new(ferry_bin()).args([
            "precheck",
            "--source",
            &source.url(),
            "--target",
            &target.url(),
            "--db-map",
            "0=1,2=1",
        ]),
        Duration::from_secs(60),
    )
    .expect("ferry precheck");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("both map to target db 1"), "{stderr}");
}
