//! The replication client against real redis-server 7.0 masters (disk-based
//! and diskless), and against a hand-driven fake master for hostile input.
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::RedisServer;
use ferry::position::{ReplId, ReplOffset};
use ferry::redis::client::Client;
use ferry::redis::command::Command;
use ferry::redis::psync::{
    PsyncSource, ReplEntry, ReplError, ReplEvent, ReplPosition, ReplicaConfig,
};
use ferry::redis::resp::{encode_command, encoded_command_len, RespDecoder, RespError};
use ferry::redis::url::RedisUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const EVENT_WAIT: Duration = Duration::from_secs(15);

fn config(url: &str) -> ReplicaConfig {
    ReplicaConfig::new(RedisUrl::parse(url).unwrap())
}

fn master(diskless: bool, extra: &[&str]) -> RedisServer {
    let mut args = vec![
        "--repl-diskless-sync",
        if diskless { "yes" } else { "no" },
        "--repl-diskless-sync-delay",
        "0",
    ];
    args.extend_from_slice(extra);
    RedisServer::start(&args)
}

async fn client(server: &RedisServer, db: u32) -> Client {
    let url = RedisUrl::parse(&format!("{}/{db}", server.url())).unwrap();
    Client::connect(&url).await.unwrap()
}

async fn call(client: &mut Client, args: &[&str]) {
    client
        .call(args)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

async fn info(server: &RedisServer) -> HashMap<String, String> {
    client(server, 0).await.info("everything").await.unwrap()
}

async fn info_u64(server: &RedisServer, field: &str) -> u64 {
    info(server).await[field].parse().unwrap()
}

async fn next(source: &mut PsyncSource) -> ReplEvent {
    tokio::time::timeout(EVENT_WAIT, source.next_event())
        .await
        .expect("an event in time")
        .unwrap_or_else(|e| panic!("next_event: {e}"))
}

async fn next_err(source: &mut PsyncSource) -> ReplError {
    loop {
        match tokio::time::timeout(EVENT_WAIT, source.next_event())
            .await
            .expect("an outcome in time")
        {
            Ok(_) => continue,
            Err(e) => return e,
        }
    }
}

/// Reads a full sync to its end; returns the FULLRESYNC position and the RDB.
async fn take_full_sync(source: &mut PsyncSource, chunk_limit: usize) -> (ReplId, u64, Vec<u8>) {
    let ReplEvent::FullResync { replid, offset } = next(source).await else {
        panic!("expected FULLRESYNC");
    };
    let mut rdb = Vec::new();
    loop {
        match next(source).await {
            ReplEvent::RdbChunk(chunk) => {
                assert!(!chunk.is_empty() && chunk.len() <= chunk_limit);
                rdb.extend_from_slice(&chunk);
            }
            ReplEvent::RdbEnd { len } => {
                assert_eq!(len, rdb.len() as u64);
                break;
            }
            other => panic!("unexpected event during the RDB: {other:?}"),
        }
    }
    assert_eq!(source.position().offset, offset);
    (replid, offset.0, rdb)
}

/// Reads until the client's position reaches `target`; returns the entries
/// and the Progress offsets seen.
async fn read_until(source: &mut PsyncSource, target: u64) -> (Vec<ReplEntry>, Vec<u64>) {
    let mut entries = Vec::new();
    let mut progress = Vec::new();
    while source.position().offset.0 < target {
        match next(source).await {
            ReplEvent::Entry(entry) => {
                assert_eq!(entry.offset, source.position().offset);
                entries.push(entry);
            }
            ReplEvent::Progress { offset } => {
                assert_eq!(offset, source.position().offset);
                progress.push(offset.0);
            }
            other => panic!("unexpected event in the stream: {other:?}"),
        }
    }
    (entries, progress)
}

/// Reads to the master's current offset and checks it lands exactly on it.
async fn read_to_rest(source: &mut PsyncSource, server: &RedisServer) -> Vec<ReplEntry> {
    let target = info_u64(server, "master_repl_offset").await;
    let (entries, _) = read_until(source, target).await;
    assert_eq!(source.position().offset.0, target, "offset overshoots master");
    entries
}

fn words(cmd: &Command) -> Vec<String> {
    cmd.args
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `pattern` is space-separated arguments; `?` matches any one argument.
fn matches(cmd: &Command, pattern: &str) -> bool {
    let actual = words(cmd);
    let expected: Vec<&str> = pattern.split(' ').collect();
    actual.len() == expected.len()
        && actual
            .iter()
            .zip(&expected)
            .all(|(a, e)| *e == "?" || a.eq_ignore_ascii_case(e))
}

fn assert_entry(entry: &ReplEntry, db: u32, transaction: bool, patterns: &[&str]) {
    let shown: Vec<Vec<String>> = entry.commands.iter().map(words).collect();
    assert!(
        entry.db == db
            && entry.transaction == transaction
            && entry.commands.len() == patterns.len()
            && entry.commands.iter().zip(patterns).all(|(c, p)| matches(c, p)),
        "expected db {db} tx {transaction} {patterns:?}, got db {} tx {} {shown:?}",
        entry.db,
        entry.transaction
    );
}

/// Text that LZF cannot shrink (so the RDB really is as large as the data).
fn incompressible(len: usize) -> String {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            char::from(b'!' + ((state >> 33) % 90) as u8)
        })
        .collect()
}

async fn full_sync_then_stream(diskless: bool) {
    let server = master(diskless, &[]);
    let mut c0 = client(&server, 0).await;
    call(&mut c0, &["SET", "before", "1"]).await;
    call(&mut c0, &["RPUSH", "list", "a", "b", "c"]).await;
    let big = incompressible(200_000);
    call(&mut c0, &["SET", "big", &big]).await;
    let mut c1 = client(&server, 1).await;
    call(&mut c1, &["HSET", "h1", "f", "v"]).await;

    let mut cfg = config(&server.url());
    cfg.rdb_chunk_size = 4096;
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    let (replid, start, rdb) = take_full_sync(&mut source, 4096).await;
    assert_eq!(replid.as_str(), info(&server).await["master_replid"]);
    assert!(rdb.starts_with(b"REDIS0010"), "{:?}", &rdb[..9]);
    // The payload ends with the EOF opcode and an 8-byte CRC64, nothing else
    // (in particular not the diskless end mark).
    assert_eq!(rdb[rdb.len() - 9], 0xFF);
    assert!(rdb.len() > big.len());
    assert!(rdb.windows(6).any(|w| w == b"before"));
    assert_eq!(source.position().db, 0);
    let _ = start;
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    let target = if diskless { "target: replicas sockets" } else { "target: disk" };
    assert!(log.contains(target), "master did not do a {target} sync:\n{log}");

    // A wide mix of writes, each kind once.
    call(&mut c0, &["SET", "k1", "v1"]).await;
    call(&mut c0, &["INCR", "counter"]).await;
    call(&mut c0, &["LPUSH", "l", "a", "b"]).await;
    call(&mut c0, &["HSET", "h", "f", "v"]).await;
    call(&mut c0, &["ZADD", "z", "1", "m"]).await;
    call(&mut c0, &["XADD", "s", "*", "f", "v"]).await;
    call(&mut c0, &["EXPIRE", "k1", "1000"]).await;
    let mut c2 = client(&server, 2).await;
    call(&mut c2, &["SET", "k2", "v2"]).await;
    call(&mut c2, &["MOVE", "k2", "3"]).await;
    call(&mut c0, &["SWAPDB", "0", "1"]).await;
    call(&mut c2, &["MULTI"]).await;
    call(&mut c2, &["SET", "t1", "1"]).await;
    call(&mut c2, &["INCR", "t2"]).await;
    call(&mut c2, &["EXEC"]).await;
    call(
        &mut c0,
        &[
            "EVAL",
            "redis.call('SET', KEYS[1], 'x'); redis.call('SET', KEYS[2], 'y')",
            "2",
            "e1",
            "e2",
        ],
    )
    .await;
    let library = "#!lua name=lib\nredis.register_function('f2', function(keys, args) \
                   redis.call('SET', keys[1], args[1]); return redis.call('INCR', keys[2]) end)";
    call(&mut c0, &["FUNCTION", "LOAD", library]).await;
    call(&mut c2, &["FCALL", "f2", "2", "fk1", "fk2", "val"]).await;
    call(&mut c0, &["PUBLISH", "chan", "msg"]).await;
    let mut c5 = client(&server, 5).await;
    call(&mut c5, &["SET", "short", "v", "PX", "30"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Expired by now; reading it makes sure the DEL was propagated.
    call(&mut c5, &["EXISTS", "short"]).await;
    // A transaction that switches db in the middle.
    call(&mut c0, &["MULTI"]).await;
    call(&mut c0, &["SET", "m0", "a"]).await;
    call(&mut c0, &["SELECT", "4"]).await;
    call(&mut c0, &["SET", "m4", "b"]).await;
    call(&mut c0, &["EXEC"]).await;
    call(&mut c0, &["SET", "end", "1"]).await;

    let entries = read_to_rest(&mut source, &server).await;
    let expected: Vec<(u32, bool, Vec<&str>)> = vec![
        (0, false, vec!["SET k1 v1"]),
        (0, false, vec!["INCR counter"]),
        (0, false, vec!["LPUSH l a b"]),
        (0, false, vec!["HSET h f v"]),
        (0, false, vec!["ZADD z 1 m"]),
        (0, false, vec!["XADD s ? f v"]),
        // Redis 7 propagates relative expiries as absolute ones.
        (0, false, vec!["PEXPIREAT k1 ?"]),
        (2, false, vec!["SET k2 v2"]),
        (2, false, vec!["MOVE k2 3"]),
        (0, false, vec!["SWAPDB 0 1"]),
        (2, true, vec!["SET t1 1", "INCR t2"]),
        (0, true, vec!["SET e1 x", "SET e2 y"]),
        (0, false, vec!["FUNCTION LOAD ?"]),
        (2, true, vec!["SET fk1 val", "INCR fk2"]),
        (0, false, vec!["PUBLISH chan msg"]),
        (5, false, vec!["SET short v PXAT ?"]),
        (5, false, vec!["DEL short"]),
        (0, true, vec!["SET m0 a", "SELECT 4", "SET m4 b"]),
        (4, false, vec!["SET end 1"]),
    ];
    let shown: Vec<_> = entries
        .iter()
        .map(|e| (e.db, e.transaction, e.commands.iter().map(words).collect::<Vec<_>>()))
        .collect();
    assert_eq!(entries.len(), expected.len(), "{shown:#?}");
    for (entry, (db, tx, patterns)) in entries.iter().zip(&expected) {
        assert_entry(entry, *db, *tx, patterns);
    }
    assert_eq!(entries[12].commands[0].args[2], library.as_bytes());
    assert_eq!(source.position().db, 4);
    // Offsets grow strictly, entry by entry.
    assert!(entries.windows(2).all(|w| w[0].offset < w[1].offset));
}

#[tokio::test]
async fn full_sync_then_stream_disk_based() {
    full_sync_then_stream(false).await;
}

#[tokio::test]
async fn full_sync_then_stream_diskless() {
    full_sync_then_stream(true).await;
}

/// The `slave0:` line of the master's INFO: its acked offset.
async fn replica_ack(server: &RedisServer) -> Option<u64> {
    let line = info(server).await.get("slave0")?.clone();
    line.split(',')
        .find_map(|kv| kv.strip_prefix("offset="))
        .and_then(|v| v.parse().ok())
}

async fn wait_for_ack(server: &RedisServer, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ack = replica_ack(server).await.unwrap_or(0);
        if ack == want || Instant::now() > deadline {
            return ack;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_carry_the_offset_the_caller_chose() {
    let server = master(false, &[]);
    let mut cfg = config(&server.url());
    cfg.listening_port = Some(7777);
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    take_full_sync(&mut source, cfg.rdb_chunk_size).await;
    let acks = source.ack_handle();

    let mut writer = client(&server, 0).await;
    for i in 0..3 {
        call(&mut writer, &["SET", &format!("k{i}"), "v"]).await;
    }
    let entries = read_to_rest(&mut source, &server).await;
    assert_eq!(entries.len(), 3);
    let received = source.position().offset.0;

    // Not yet durable past the first entry: that is all the master hears.
    let first = entries[0].offset.0;
    acks.set(ReplOffset(first));
    assert_eq!(wait_for_ack(&server, first).await, first);
    let info_line = info(&server).await["slave0"].clone();
    assert!(info_line.contains("port=7777"), "{info_line}");
    // WAIT on the writer's last write cannot be satisfied.
    let reply = writer.call(["WAIT", "1", "1500"]).await.unwrap();
    assert_eq!(reply.as_integer(), Some(0));
    assert_eq!(replica_ack(&server).await, Some(first));

    // The caller allows everything: the client still acks only what it received.
    acks.set(ReplOffset(u64::MAX));
    assert_eq!(wait_for_ack(&server, received).await, received);
    let reply = writer.call(["WAIT", "1", "5000"]).await.unwrap();
    assert_eq!(reply.as_integer(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn getack_is_answered_at_once() {
    let server = master(true, &[]);
    let mut cfg = config(&server.url());
    // No periodic ack after the first: only GETACK answers can satisfy WAIT.
    cfg.ack_interval = Duration::from_secs(3600);
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    take_full_sync(&mut source, cfg.rdb_chunk_size).await;
    let acks = source.ack_handle();
    // The caller stores every event before asking for the next one.
    let driver = tokio::spawn(async move {
        loop {
            match source.next_event().await {
                Ok(_) => acks.set(source.position().offset),
                Err(e) => return e,
            }
        }
    });
    let mut writer = client(&server, 0).await;
    call(&mut writer, &["SET", "k", "v"]).await;
    let started = Instant::now();
    let reply = writer.call(["WAIT", "1", "10000"]).await.unwrap();
    assert_eq!(reply.as_integer(), Some(1), "WAIT timed out: GETACK unanswered");
    assert!(started.elapsed() < Duration::from_secs(5));
    driver.abort();
}

#[tokio::test]
async fn resume_continues_after_the_saved_offset_and_db() {
    let server = master(false, &[]);
    let cfg = config(&server.url());
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    let (replid, _, _) = take_full_sync(&mut source, cfg.rdb_chunk_size).await;
    let mut c3 = client(&server, 3).await;
    call(&mut c3, &["SET", "a", "1"]).await;
    read_to_rest(&mut source, &server).await;
    let saved = source.position();
    assert_eq!(saved.db, 3);
    assert_eq!(saved.replid, replid);
    drop(source);

    let full_before = info_u64(&server, "sync_full").await;
    let partial_before = info_u64(&server, "sync_partial_ok").await;
    call(&mut c3, &["SET", "r1", "v"]).await;
    call(&mut c3, &["INCR", "r2"]).await;

    let mut source = PsyncSource::connect(&cfg, Some(saved.clone()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut source).await,
        ReplEvent::Continue {
            replid: replid.clone(),
            offset: saved.offset,
            db: 3
        }
    );
    assert_eq!(source.position(), saved);
    let before_first = saved.offset.0;
    let (entries, progress) = read_until(&mut source, before_first + 1).await;
    // SELECT is not re-sent after CONTINUE: the saved db is what applies.
    assert!(progress.iter().all(|&p| p < entries[0].offset.0));
    let last_before = progress.last().copied().unwrap_or(before_first);
    assert_entry(&entries[0], 3, false, &["SET r1 v"]);
    assert_eq!(
        entries[0].offset.0,
        last_before + encoded_command_len(&["SET", "r1", "v"]) as u64
    );
    let rest = read_to_rest(&mut source, &server).await;
    assert_entry(rest.last().unwrap(), 3, false, &["INCR r2"]);
    assert_eq!(info_u64(&server, "sync_full").await, full_before);
    assert_eq!(
        info_u64(&server, "sync_partial_ok").await,
        partial_before + 1
    );
}

#[tokio::test]
async fn resume_outside_the_backlog_falls_back_to_full_sync() {
    let server = master(true, &["--repl-backlog-size", "16384"]);
    let cfg = config(&server.url());
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    take_full_sync(&mut source, cfg.rdb_chunk_size).await;
    let mut c0 = client(&server, 0).await;
    call(&mut c0, &["SET", "a", "1"]).await;
    read_to_rest(&mut source, &server).await;
    let saved = source.position();
    drop(source);
    let value = incompressible(10_000);
    for i in 0..100 {
        call(&mut c0, &["SET", &format!("k{i}"), &value]).await;
    }
    let mut source = PsyncSource::connect(&cfg, Some(saved.clone()))
        .await
        .unwrap();
    let (replid, offset, rdb) = take_full_sync(&mut source, cfg.rdb_chunk_size).await;
    assert_eq!(replid, saved.replid, "same history, just too far behind");
    assert!(offset > saved.offset.0 + 1_000_000);
    assert!(rdb.len() > 1_000_000);
    assert_eq!(source.position().db, 0);
    read_to_rest(&mut source, &server).await;
}

#[tokio::test]
async fn failover_to_a_promoted_replica_continues_with_its_new_replid() {
    let a = master(false, &[]);
    let b = master(false, &["--replicaof", "127.0.0.1", &a.port.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while info(&b).await["master_link_status"] != "up" {
        assert!(Instant::now() < deadline, "replica B never linked to A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg_a = config(&a.url());
    let mut source = PsyncSource::connect(&cfg_a, None).await.unwrap();
    let (a_replid, _, _) = take_full_sync(&mut source, cfg_a.rdb_chunk_size).await;
    let mut ca = client(&a, 6).await;
    call(&mut ca, &["SET", "x", "1"]).await;
    call(&mut ca, &["LPUSH", "y", "1"]).await;
    read_to_rest(&mut source, &a).await;
    let saved = source.position();
    drop(source);
    let a_offset = info_u64(&a, "master_repl_offset").await;
    while info_u64(&b, "master_repl_offset").await < a_offset {
        assert!(Instant::now() < deadline, "replica B never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    call(&mut client(&b, 0).await, &["REPLICAOF", "NO", "ONE"]).await;
    let b_replid = info(&b).await["master_replid"].clone();
    assert_ne!(b_replid, a_replid.as_str());
    let mut cb = client(&b, 6).await;
    call(&mut cb, &["SET", "after", "failover"]).await;

    let cfg_b = config(&b.url());
    let mut source = PsyncSource::connect(&cfg_b, Some(saved.clone()))
        .await
        .unwrap();
    let ReplEvent::Continue { replid, offset, db } = next(&mut source).await else {
        panic!("expected +CONTINUE from the promoted replica");
    };
    assert_eq!(replid.as_str(), b_replid);
    assert_eq!((offset, db), (saved.offset, 6));
    let entries = read_to_rest(&mut source, &b).await;
    assert_entry(entries.last().unwrap(), 6, false, &["SET after failover"]);
    assert_eq!(source.position().replid.as_str(), b_replid);
    assert_eq!(info_u64(&b, "sync_full").await, 0);
    assert_eq!(info_u64(&b, "sync_partial_ok").await, 1);
}

#[tokio::test]
async fn authentication() {
    let server = master(false, &["--requirepass", "s3cret"]);
    let port = server.port;
    let wrong = config(&format!("redis://:nope@127.0.0.1:{port}"));
    let err = PsyncSource::connect(&wrong, None).await.err().unwrap();
    assert!(matches!(err, ReplError::Auth { step: "AUTH", .. }), "{err}");
    assert!(!err.is_retryable());
    let missing = config(&format!("redis://127.0.0.1:{port}"));
    let err = PsyncSource::connect(&missing, None).await.err().unwrap();
    assert!(matches!(err, ReplError::Auth { step: "PING", .. }), "{err}");

    let right = config(&format!("redis://default:s3cret@127.0.0.1:{port}"));
    let mut source = PsyncSource::connect(&right, None).await.unwrap();
    take_full_sync(&mut source, right.rdb_chunk_size).await;
    let right = config(&format!("redis://:s3cret@127.0.0.1:{port}"));
    let mut source = PsyncSource::connect(&right, None).await.unwrap();
    take_full_sync(&mut source, right.rdb_chunk_size).await;
}

#[tokio::test]
async fn replica_without_master_link_is_retryable() {
    let nowhere = common::free_port().to_string();
    let server = master(false, &["--replicaof", "127.0.0.1", &nowhere]);
    let err = PsyncSource::connect(&config(&server.url()), None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, ReplError::MasterError { step: "PSYNC", message } if message.starts_with("NOMASTERLINK")),
        "{err}"
    );
    assert!(err.is_retryable());
}
