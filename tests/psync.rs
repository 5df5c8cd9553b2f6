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
