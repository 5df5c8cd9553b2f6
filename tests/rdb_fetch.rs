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

/// Writes `w:0`, `w:1`, ... (1 KiB values) one after the other until `stop`.
fn write_sequence(
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut conn = common::resp::connect(&addr);
        let value = "x".repeat(1024);
        let mut written = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            conn.call(&["SET", &format!("w:{written}"), &value])
                .expect("SET");
            written += 1;
        }
        written
    })
}

fn fetched_position(stdout: &str) -> (String, u64) {
    let rest = stdout
        .split("consistent with replid ")
        .nth(1)
        .unwrap_or_else(|| panic!("no position in {stdout}"));
    let mut words = rest.split_whitespace();
    let replid = words.next().unwrap().to_string();
    assert_eq!(words.next(), Some("offset"), "{stdout}");
    (replid, words.next().unwrap().parse().unwrap())
}

/// `rdb fetch` asks for the RDB only (`REPLCONF rdb-only 1`): the source
/// keeps no replication buffer for it, so writes during a long BGSAVE do not
/// overflow a small `client-output-buffer-limit replica` (a replica taking
/// the same snapshot is cut off after 256 KiB of them), nothing is streamed
/// after the RDB, and the snapshot is still consistent with the position it
/// names: a prefix of the sequence of writes, at an offset between the
/// source's offsets before and after.
#[test]
fn fetch_takes_the_rdb_only_so_writes_during_the_transfer_cannot_cut_it() {
    let source = RedisServer::start(&[
        "--repl-diskless-sync",
        "no",
        "--client-output-buffer-limit",
        "replica 256kb 0 0",
        // 10000 keys: a BGSAVE of about 2 s.
        "--rdb-key-save-delay",
        "200",
    ]);
    source.cmd(&["DEBUG", "POPULATE", "10000", "k", "50"]);
    let offset_before: u64 = source
        .info_field("master_repl_offset")
        .unwrap()
        .parse()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = write_sequence(source.addr(), std::sync::Arc::clone(&stop));
    std::thread::sleep(std::time::Duration::from_millis(100));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.rdb");
    let out = ferry(&[
        "rdb",
        "fetch",
        "--source",
        &source.url(),
        file.to_str().unwrap(),
    ]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(source.log_path()).unwrap();
    assert!(
        out.status.success(),
        "fetch failed: {stdout} {}\nsource log:\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("rdb only replica"), "source log:\n{log}");
    assert!(!log.contains("overcoming of output buffer limits"), "{log}");
    assert_eq!(source.info_field("connected_slaves").as_deref(), Some("0"));

    let (replid, offset) = fetched_position(&stdout);
    let offset_after: u64 = source
        .info_field("master_repl_offset")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(replid, source.info_field("master_replid").unwrap());
    assert!(
        offset_before <= offset && offset <= offset_after,
        "{offset_before} <= {offset} <= {offset_after}"
    );
    let target = RedisServer::start(&[]);
    let out = ferry(&[
        "rdb",
        "load",
        file.to_str().unwrap(),
        "--target",
        &target.url(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: u64 = target.cmd(&["DBSIZE"]).parse().unwrap();
    let sequence = keys - 10000;
    assert!(
        sequence > 0 && sequence < written,
        "{sequence} of {written}"
    );
    assert_eq!(target.cmd(&["EXISTS", &format!("w:{}", sequence - 1)]), "1");
    assert_eq!(target.cmd(&["EXISTS", &format!("w:{sequence}")]), "0");
}

/// A source that refuses `REPLCONF rdb-only` (here an ACL; a Redis before
/// 7.0 does not know it) is fetched from as a replica would, and the
/// snapshot is the same.
#[test]
fn fetch_without_rdb_only_falls_back_to_a_plain_replica_transfer() {
    let source = RedisServer::start(&["--repl-diskless-sync", "no"]);
    populate(&source);
    source.cmd(&[
        "ACL",
        "SETUSER",
        "fetcher",
        "on",
        ">fetcher-password",
        "+@all",
        "-replconf",
        "+replconf|capa",
        "+replconf|ack",
        "+replconf|listening-port",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.rdb");
    let url = format!("redis://fetcher:fetcher-password@{}", source.addr());
    let out = ferry(&["rdb", "fetch", "--source", &url, file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fetch failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2007 keys"), "{stdout}");
    let log = std::fs::read_to_string(source.log_path()).unwrap();
    assert!(!log.contains("rdb only replica"), "{log}");
    let target = RedisServer::start(&[]);
    let out = ferry(&[
        "rdb",
        "load",
        file.to_str().unwrap(),
        "--target",
        &target.url(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        source.cmd(&["DEBUG", "DIGEST"]),
        target.cmd(&["DEBUG", "DIGEST"])
    );
}
