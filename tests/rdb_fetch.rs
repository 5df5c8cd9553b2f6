//! `ferry rdb fetch` against real redis-servers: the snapshot taken through
//! the replication protocol loads into an empty server with an equal digest.
mod common;

use std::process::Command;

use common::RedisServer;

fn ferry(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn populate(source: &RedisServer) {
    source.cmd(&["DEBUG", "POPULATE", "2000", "k", "50"]);
    source.cmd(&["RPUSH", "list", "a", "b", "c"]);
    source.cmd(&["HSET", "hash", "f1", "v1", "f2", "v2"]);
    source.cmd(&["ZADD", "zset", "1.5", "m1", "-inf", "m2"]);
    source.cmd(&["SADD", "set", "1", "2", "3"]);
    source.cmd(&["XADD", "stream", "1-1", "f", "v"]);
    source.cmd(&["SET", "ttl", "v", "EX", "1000"]);
    source.cmd(&["-n", "3", "SET", "in-db3", "v"]);
}

fn fetch_and_load(extra: &[&str]) {
    let source = RedisServer::start(extra);
    populate(&source);
    let target = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.rdb");
    let file = file.to_str().unwrap();

    let out = ferry(&["rdb", "fetch", "--source", &source.url(), file]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fetch failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The source may have sent PINGs since, so its offset can only be ahead.
    let offset: u64 = source
        .info_field("master_repl_offset")
        .unwrap()
        .parse()
        .unwrap();
    let replid = source.info_field("master_replid").unwrap();
    let fetched_offset: u64 = stdout
        .split(&format!("replid {replid} offset "))
        .nth(1)
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no replid {replid} / offset in {stdout}"));
    assert!(fetched_offset <= offset, "{fetched_offset} > {offset}");
    assert!(stdout.contains("2007 keys"), "{stdout}");
    assert!(!std::path::Path::new(&format!("{file}.partial")).exists());

    let out = ferry(&["rdb", "load", file, "--target", &target.url()]);
    assert!(
        out.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        source.cmd(&["DEBUG", "DIGEST"]),
        target.cmd(&["DEBUG", "DIGEST"])
    );
    assert_eq!(target.cmd(&["-n", "3", "GET", "in-db3"]), "v");
}

#[test]
fn fetch_disk_based_snapshot_loads_with_equal_digest() {
    fetch_and_load(&["--repl-diskless-sync", "no"]);
}

#[test]
fn fetch_diskless_snapshot_loads_with_equal_digest() {
    fetch_and_load(&[
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
    ]);
}

#[test]
fn fetch_from_unreachable_source_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.rdb");
    let port = common::free_port();
    let out = ferry(&[
        "rdb",
        "fetch",
        "--source",
        &format!("redis://127.0.0.1:{port}"),
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(!file.exists());
}
