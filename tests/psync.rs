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
    PsyncSource, ReplEntry, ReplError, ReplEvent, ReplPosition, ReplicaConfig, StreamedArg,
};
use ferry::redis::resp::{encode_command, encoded_command_len, RespDecoder, RespError};
use ferry::redis::url::RedisUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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

/// Like [`next`], but abandons `next_event` every millisecond (as a
/// `select!` with a shutdown signal would); nothing may be lost.
async fn next_cancelling(source: &mut PsyncSource) -> ReplEvent {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        if let Ok(result) =
            tokio::time::timeout(Duration::from_millis(1), source.next_event()).await
        {
            return result.unwrap_or_else(|e| panic!("next_event: {e}"));
        }
        assert!(Instant::now() < deadline, "no event in time");
    }
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
    assert_eq!(
        source.position().offset.0,
        target,
        "offset overshoots master"
    );
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
            && entry
                .commands
                .iter()
                .zip(patterns)
                .all(|(c, p)| matches(c, p)),
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
    let target = if diskless {
        "target: replicas sockets"
    } else {
        "target: disk"
    };
    assert!(
        log.contains(target),
        "master did not do a {target} sync:\n{log}"
    );

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
        .map(|e| {
            (
                e.db,
                e.transaction,
                e.commands.iter().map(words).collect::<Vec<_>>(),
            )
        })
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
    cfg.announce_ip = Some("10.1.2.3".into());
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
    assert!(info_line.contains("ip=10.1.2.3,port=7777"), "{info_line}");
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
    // Disk-based: a diskless master may ignore an ack that beats its own
    // bookkeeping of the finished transfer and start streaming only on the
    // next periodic one, which this test turns off.
    let server = master(false, &[]);
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
    assert_eq!(
        reply.as_integer(),
        Some(1),
        "WAIT timed out: GETACK unanswered"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    driver.abort();
}

#[tokio::test]
async fn a_big_value_streams_from_a_real_master() {
    let server = master(false, &[]);
    let mut cfg = config(&server.url());
    cfg.stream_threshold = 1 << 20;
    cfg.fragment_size = 256 << 10;
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    take_full_sync(&mut source, cfg.rdb_chunk_size).await;
    read_to_rest(&mut source, &server).await;
    let value = incompressible(12 << 20);
    let mut c3 = client(&server, 3).await;
    call(&mut c3, &["SET", "big", &value]).await;
    let mut start = None;
    let mut fragments = Vec::new();
    let entry = loop {
        match next(&mut source).await {
            ReplEvent::Fragment(piece) => {
                assert!(piece.len() <= 256 << 10);
                fragments.extend_from_slice(&piece);
                // Fragments stay at the entry's start (after its SELECT).
                let at = start.get_or_insert_with(|| source.position());
                assert_eq!(&source.position(), at);
                assert_eq!(at.db, 3);
            }
            ReplEvent::Entry(entry) => break entry,
            ReplEvent::Progress { .. } => {}
            other => panic!("unexpected event: {other:?}"),
        }
    };
    assert!(
        fragments == value.as_bytes(),
        "the fragments are not the value"
    );
    assert_entry(&entry, 3, false, &["SET big "]);
    assert_eq!(
        entry.streamed,
        [StreamedArg {
            command: 0,
            arg: 2,
            len: 12 << 20,
            fragments: 48
        }]
    );
    read_to_rest(&mut source, &server).await;
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
    // No listening port configured: the master lists the replica with port 0.
    let line = info(&server).await["slave0"].clone();
    assert!(line.contains(",port=0,"), "{line}");
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

// ---------------------------------------------------------------------------
// A fake master under the test's control, for input a real one never sends.

const REPLID: &str = "0123456789abcdef0123456789abcdef01234567";
const MARK: &[u8; 40] = b"fedcba9876543210fedcba9876543210fedcba98";

enum Step {
    Write(Vec<u8>),
    Sleep(u64),
    Close,
}

fn w(bytes: impl AsRef<[u8]>) -> Step {
    Step::Write(bytes.as_ref().to_vec())
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_command(args, &mut buf);
    buf.to_vec()
}

/// What the client sent: the handshake commands, then the raw bytes after PSYNC.
struct FakeLog {
    handshake: Vec<Vec<String>>,
    after_psync: Vec<u8>,
}

/// Answers the handshake (`+PONG`, `+OK`; `ping_reply` instead for PING when
/// given) until `PSYNC`, plays `steps`, then records what the client sends
/// until it hangs up.
async fn fake_master(
    ping_reply: Option<&'static [u8]>,
    steps: Vec<Step>,
) -> (String, tokio::task::JoinHandle<FakeLog>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut log = FakeLog {
            handshake: Vec::new(),
            after_psync: Vec::new(),
        };
        let mut buf = BytesMut::new();
        let mut decoder = RespDecoder::default();
        'handshake: loop {
            while let Some((frame, _)) = decoder.decode_frame(&mut buf).unwrap() {
                let ferry::redis::resp::Frame::Array(items) = frame else {
                    panic!("client sent a non-array");
                };
                let args: Vec<String> = items
                    .iter()
                    .map(|f| String::from_utf8_lossy(f.as_bytes().unwrap()).into_owned())
                    .collect();
                let name = args[0].to_ascii_uppercase();
                log.handshake.push(args);
                match name.as_str() {
                    "PSYNC" => break 'handshake,
                    "PING" => {
                        let reply = ping_reply.unwrap_or(b"+PONG\r\n");
                        stream.write_all(reply).await.unwrap();
                    }
                    _ => stream.write_all(b"+OK\r\n").await.unwrap(),
                }
            }
            if stream.read_buf(&mut buf).await.unwrap() == 0 {
                return log;
            }
        }
        for step in steps {
            match step {
                Step::Write(bytes) => stream.write_all(&bytes).await.unwrap(),
                Step::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Step::Close => return log,
            }
        }
        log.after_psync.extend_from_slice(&buf);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(n) = stream.read_buf(&mut log.after_psync).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        log
    });
    (url, task)
}

fn fake_config(url: &str) -> ReplicaConfig {
    let mut cfg = config(url);
    cfg.read_timeout = Duration::from_secs(5);
    cfg
}

fn saved(offset: u64, db: u32) -> ReplPosition {
    ReplPosition {
        replid: ReplId::parse(REPLID).unwrap(),
        offset: ReplOffset(offset),
        db,
    }
}

#[tokio::test]
async fn fake_diskless_transfer_with_keepalives_and_a_split_mark() {
    let body: Vec<u8> = (0..3000u32).map(|i| (i * 31 % 256) as u8).collect();
    let ping = resp(&["PING"]);
    let set = resp(&["SET", "k", "v"]);
    let mut tail = MARK[17..].to_vec();
    tail.extend_from_slice(&ping);
    tail.extend_from_slice(&set);
    let (url, fake) = fake_master(
        None,
        vec![
            w("\n"),
            Step::Sleep(20),
            w(format!("\n+FULLRESYNC {REPLID} 100\r\n")),
            w("\n\n"),
            w([b"$EOF:".as_slice(), MARK, b"\r\n"].concat()),
            w(&body[..1000]),
            Step::Sleep(20),
            w([&body[1000..], &MARK[..17]].concat()),
            Step::Sleep(20),
            Step::Write(tail),
        ],
    )
    .await;
    let mut cfg = fake_config(&url);
    cfg.rdb_chunk_size = 700;
    cfg.listening_port = Some(6390);
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    let (replid, offset, rdb) = take_full_sync(&mut source, 700).await;
    assert_eq!((replid.as_str(), offset), (REPLID, 100));
    assert_eq!(rdb, body, "payload must exclude the end mark");
    assert_eq!(
        next(&mut source).await,
        ReplEvent::Progress {
            offset: ReplOffset(100 + ping.len() as u64)
        }
    );
    let ReplEvent::Entry(entry) = next(&mut source).await else {
        panic!("expected the SET");
    };
    assert_entry(&entry, 0, false, &["SET k v"]);
    assert_eq!(entry.offset.0, 100 + (ping.len() + set.len()) as u64);
    source.ack_handle().set(entry.offset);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(source);

    let log = fake.await.unwrap();
    let handshake: Vec<String> = log.handshake.iter().map(|c| c.join(" ")).collect();
    assert_eq!(
        handshake,
        [
            "PING",
            "REPLCONF listening-port 6390",
            "REPLCONF capa eof capa psync2",
            "PSYNC ? -1"
        ]
    );
    // Acks: the first one right after the RDB (nothing durable yet, or the
    // entry if the caller was quicker), then the caller's offset.
    let (frames, rest) =
        ferry::redis::resp::decode_all(&log.after_psync, Default::default()).unwrap();
    assert_eq!(rest, 0);
    let acks: Vec<u64> = frames
        .iter()
        .map(|f| {
            let ferry::redis::resp::Frame::Array(items) = f else {
                panic!("client sent {f:?}");
            };
            let words: Vec<_> = items
                .iter()
                .map(|i| i.as_bytes().unwrap().clone())
                .collect();
            assert_eq!(&words[..2], [&b"REPLCONF"[..], b"ACK"]);
            std::str::from_utf8(&words[2]).unwrap().parse().unwrap()
        })
        .collect();
    assert!(acks.len() >= 2, "{acks:?}");
    assert!(
        acks.iter().all(|&a| a == 0 || a == entry.offset.0),
        "{acks:?}"
    );
    assert_eq!(acks.last(), Some(&entry.offset.0));
}

#[tokio::test]
async fn fake_disk_transfer_split_into_chunks() {
    let body: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    let set = resp(&["SET", "k", "v"]);
    let (url, _fake) = fake_master(
        None,
        vec![
            w(format!("+FULLRESYNC {REPLID} 7\r\n\n$50")),
            Step::Sleep(30),
            w("00\r\n"),
            w(&body[..10]),
            Step::Sleep(30),
            // The command stream follows the payload with no separator.
            w([&body[10..], &set[..]].concat()),
        ],
    )
    .await;
    let mut cfg = fake_config(&url);
    cfg.rdb_chunk_size = 1024;
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    assert!(matches!(
        next_cancelling(&mut source).await,
        ReplEvent::FullResync { .. }
    ));
    let mut rdb = Vec::new();
    loop {
        match next_cancelling(&mut source).await {
            ReplEvent::RdbChunk(chunk) => {
                assert!(chunk.len() <= 1024);
                rdb.extend_from_slice(&chunk);
            }
            ReplEvent::RdbEnd { len } => {
                assert_eq!(len, 5000);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(rdb, body);
    let ReplEvent::Entry(entry) = next_cancelling(&mut source).await else {
        panic!("expected the SET");
    };
    assert_eq!(entry.offset.0, 7 + set.len() as u64);
}

async fn fake_error(
    steps: Vec<Step>,
    from: Option<ReplPosition>,
    cfg: impl Fn(&mut ReplicaConfig),
) -> ReplError {
    let (url, _fake) = fake_master(None, steps).await;
    let mut config = fake_config(&url);
    cfg(&mut config);
    let mut source = match PsyncSource::connect(&config, from).await {
        Ok(source) => source,
        Err(e) => return e,
    };
    let err = next_err(&mut source).await;
    assert!(
        matches!(source.next_event().await, Err(ReplError::Failed)),
        "a failed session stays failed"
    );
    err
}

#[tokio::test]
async fn fake_truncated_and_oversized_rdb_transfers() {
    let fullresync = format!("+FULLRESYNC {REPLID} 0\r\n");
    let err = fake_error(
        vec![w(&fullresync), w("$100\r\n"), w([7u8; 50]), Step::Close],
        None,
        |_| {},
    )
    .await;
    assert!(
        matches!(
            err,
            ReplError::RdbTruncated {
                received: 50,
                expected: Some(100)
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());

    // A length no one could hold is streamed, never allocated.
    let err = fake_error(
        vec![
            w(&fullresync),
            w("$1000000000000\r\n"),
            w([7u8; 10]),
            Step::Close,
        ],
        None,
        |_| {},
    )
    .await;
    assert!(
        matches!(
            err,
            ReplError::RdbTruncated {
                received: 10,
                expected: Some(1_000_000_000_000)
            }
        ),
        "{err}"
    );

    let err = fake_error(
        vec![w(&fullresync), w("$99999999999999999999999\r\n")],
        None,
        |_| {},
    )
    .await;
    assert!(matches!(err, ReplError::RdbTransfer { .. }), "{err}");

    let err = fake_error(
        vec![
            w(&fullresync),
            w([b"$EOF:".as_slice(), MARK, b"\r\n"].concat()),
            w([1u8; 100]),
            Step::Close,
        ],
        None,
        |_| {},
    )
    .await;
    assert!(
        matches!(err, ReplError::RdbTruncated { received, expected: None } if received <= 100),
        "{err}"
    );

    let err = fake_error(vec![w(&fullresync), w("hello\r\n")], None, |_| {}).await;
    assert!(matches!(err, ReplError::RdbTransfer { .. }), "{err}");

    let err = fake_error(vec![w(&fullresync), w("\n")], None, |c| {
        c.read_timeout = Duration::from_millis(300)
    })
    .await;
    assert!(matches!(err, ReplError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn fake_bad_command_streams() {
    let cont = || w("+CONTINUE\r\n");
    let err = fake_error(vec![cont(), w(":5\r\n")], Some(saved(1000, 0)), |_| {}).await;
    assert!(
        matches!(err, ReplError::Protocol { offset: 1000, .. }),
        "{err}"
    );

    let err = fake_error(
        vec![cont(), w(resp(&["PING"])), w("*1\r\n$3\r\nabcd\r\n")],
        Some(saved(1000, 0)),
        |_| {},
    )
    .await;
    assert!(
        matches!(
            err,
            ReplError::Resp(RespError::Invalid { offset: 1025, .. })
        ),
        "{err}"
    );

    let err = fake_error(
        vec![cont(), w("*1\r\n$99999999999\r\n")],
        Some(saved(1000, 0)),
        |_| {},
    )
    .await;
    assert!(
        matches!(
            err,
            ReplError::Resp(RespError::TooLarge { offset: 1005, .. })
        ),
        "{err}"
    );

    let err = fake_error(
        vec![cont(), w(resp(&["SELECT", "banana"]))],
        Some(saved(1000, 0)),
        |_| {},
    )
    .await;
    assert!(
        matches!(err, ReplError::Protocol { offset: 1000, .. }),
        "{err}"
    );

    let err = fake_error(
        vec![cont(), w(resp(&["EXEC"]))],
        Some(saved(1000, 0)),
        |_| {},
    )
    .await;
    assert!(
        matches!(err, ReplError::Protocol { offset: 1000, .. }),
        "{err}"
    );

    // Cut in the middle of a frame: the position stays before it.
    let (url, _fake) = fake_master(
        None,
        vec![
            cont(),
            w(resp(&["SET", "a", "b"])),
            w("*3\r\n$3\r\nSET"),
            Step::Close,
        ],
    )
    .await;
    let mut source = PsyncSource::connect(&fake_config(&url), Some(saved(1000, 2)))
        .await
        .unwrap();
    next(&mut source).await;
    let ReplEvent::Entry(entry) = next(&mut source).await else {
        panic!("expected the SET");
    };
    assert_entry(&entry, 2, false, &["SET a b"]);
    let err = next_err(&mut source).await;
    assert!(matches!(err, ReplError::Closed { .. }), "{err}");
    assert_eq!(source.position().offset, entry.offset);
}

/// Collects the fragments before the next entry (which must come with
/// them), checking the position does not move meanwhile.
async fn fragments_then_entry(source: &mut PsyncSource, size: usize) -> (Vec<Vec<u8>>, ReplEntry) {
    let before = source.position();
    let mut fragments = Vec::new();
    loop {
        match next_cancelling(source).await {
            ReplEvent::Fragment(piece) => {
                assert!(!piece.is_empty() && piece.len() <= size, "{}", piece.len());
                assert_eq!(source.position(), before, "a fragment moved the position");
                fragments.push(piece.to_vec());
            }
            ReplEvent::Entry(entry) => return (fragments, entry),
            other => panic!("unexpected event: {other:?}"),
        }
    }
}

#[tokio::test]
async fn fake_big_arguments_stream_as_fragments() {
    let big: String = (0..1000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let second = "y".repeat(150);
    let third = "z".repeat(64);
    let set = resp(&["SET", "big", &big, "EX", "100"]);
    let tx = [
        resp(&["MULTI"]),
        resp(&["SET", "k", &second]),
        resp(&["SELECT", "5"]),
        resp(&["APPEND", "k", &third]),
        resp(&["EXEC"]),
    ]
    .concat();
    let small = resp(&["SET", "a", "b"]);
    let (url, _fake) = fake_master(
        None,
        vec![
            w("+CONTINUE\r\n"),
            w(&small),
            // The big command arrives in uneven pieces.
            w(&set[..30]),
            Step::Sleep(10),
            w(&set[30..500]),
            Step::Sleep(10),
            w(&set[500..]),
            w(&tx),
        ],
    )
    .await;
    let mut cfg = fake_config(&url);
    cfg.stream_threshold = 100;
    cfg.fragment_size = 64;
    let mut source = PsyncSource::connect(&cfg, Some(saved(1000, 3)))
        .await
        .unwrap();
    next(&mut source).await;
    let ReplEvent::Entry(a) = next(&mut source).await else {
        panic!("expected SET a b");
    };
    assert_entry(&a, 3, false, &["SET a b"]);

    let (fragments, entry) = fragments_then_entry(&mut source, 64).await;
    assert_eq!(fragments.len(), 16);
    assert!(fragments[..15].iter().all(|f| f.len() == 64));
    assert_eq!(fragments.concat(), big.as_bytes());
    assert_entry(&entry, 3, false, &["SET big  EX 100"]);
    assert_eq!(
        entry.streamed,
        [StreamedArg {
            command: 0,
            arg: 2,
            len: 1000,
            fragments: 16
        }]
    );
    assert_eq!(entry.offset.0, a.offset.0 + set.len() as u64);
    assert_eq!(source.position().offset, entry.offset);

    // In a transaction: each big argument in order, named by its command;
    // a small one (64 bytes, under the threshold) stays inline.
    let (fragments, entry) = fragments_then_entry(&mut source, 64).await;
    assert_eq!(fragments.concat(), second.as_bytes());
    assert_entry(
        &entry,
        3,
        true,
        &["SET k ", "SELECT 5", &format!("APPEND k {third}")],
    );
    assert_eq!(
        entry.streamed,
        [StreamedArg {
            command: 0,
            arg: 2,
            len: 150,
            fragments: 3
        }]
    );
    let end = 1000 + (small.len() + set.len() + tx.len()) as u64;
    assert_eq!(entry.offset.0, end);
    assert_eq!(source.position().offset.0, end);
    assert_eq!(source.position().db, 5);
}

#[tokio::test]
async fn fake_entries_over_the_limits_are_uncarriable() {
    // Over max-entry-bytes: refused at its header, before any byte of it.
    let big = "v".repeat(2000);
    let (url, _fake) = fake_master(
        None,
        vec![
            w("+CONTINUE\r\n"),
            w(resp(&["SET", "small", "1"])),
            w(resp(&["MULTI"])),
            w(resp(&["SET", "k", &big])),
            w(resp(&["EXEC"])),
        ],
    )
    .await;
    let mut cfg = fake_config(&url);
    cfg.stream_threshold = 100;
    cfg.max_transaction_bytes = 500;
    cfg.max_entry_bytes = 1000;
    let mut source = PsyncSource::connect(&cfg, Some(saved(0, 0))).await.unwrap();
    next(&mut source).await;
    let ReplEvent::Entry(small) = next(&mut source).await else {
        panic!("expected the small SET");
    };
    let err = next_err(&mut source).await;
    assert!(
        matches!(err, ReplError::EntryTooLarge { offset, limit: 1000, .. } if offset == small.offset.0),
        "{err}"
    );
    assert!(err.is_uncarriable() && !err.is_retryable());
    assert_eq!(source.position().offset, small.offset);

    // An argument over max-transaction-bytes is streamed, not refused...
    let value = "v".repeat(200);
    let many: Vec<u8> = std::iter::once(resp(&["MULTI"]))
        .chain(std::iter::repeat_with(|| resp(&["INCR", "k"])).take(40))
        .chain([resp(&["EXEC"])])
        .flatten()
        .collect();
    let (url, _fake) = fake_master(
        None,
        vec![w("+CONTINUE\r\n"), w(resp(&["SET", "k", &value])), w(&many)],
    )
    .await;
    let mut cfg = fake_config(&url);
    cfg.max_transaction_bytes = 100;
    let mut source = PsyncSource::connect(&cfg, Some(saved(0, 0))).await.unwrap();
    next(&mut source).await;
    let (fragments, entry) = fragments_then_entry(&mut source, 1 << 20).await;
    assert_eq!(fragments.concat(), value.as_bytes());
    assert_entry(&entry, 0, false, &["SET k "]);
    // ...but a transaction whose command names alone pass it cannot be
    // carried.
    let err = next_err(&mut source).await;
    assert!(
        matches!(err, ReplError::TransactionTooLarge { offset, limit: 100 } if offset == entry.offset.0),
        "{err}"
    );
    assert!(err.is_uncarriable());
    assert_eq!(source.position().offset, entry.offset);

    // A command of many empty arguments (none can be streamed) is counted
    // with what each takes once decoded: refused, not buffered without end.
    let mut args = vec!["RPUSH", "k"];
    args.extend(std::iter::repeat("").take(5000));
    let (url, _fake) = fake_master(
        None,
        vec![
            w("+CONTINUE\r\n"),
            w(resp(&["SET", "small", "1"])),
            w(resp(&args)),
        ],
    )
    .await;
    let mut cfg = fake_config(&url);
    // 5000 × 6 wire bytes fit, the decoded arguments past the first 1024
    // (48 bytes each) do not.
    cfg.max_transaction_bytes = 100_000;
    let mut source = PsyncSource::connect(&cfg, Some(saved(0, 0))).await.unwrap();
    next(&mut source).await;
    let ReplEvent::Entry(small) = next(&mut source).await else {
        panic!("expected the small SET");
    };
    let err = next_err(&mut source).await;
    assert!(
        matches!(err, ReplError::TransactionTooLarge { offset, limit: 100_000 } if offset == small.offset.0),
        "{err}"
    );
    assert!(err.is_uncarriable());
}

#[tokio::test]
async fn fake_handshake_failures() {
    let (url, _fake) = fake_master(Some(b"hello\r\n"), vec![]).await;
    let err = PsyncSource::connect(&fake_config(&url), None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ReplError::Handshake { step: "PING", .. }),
        "{err}"
    );

    let err = fake_error(
        vec![w("-LOADING Redis is loading the dataset in memory\r\n")],
        None,
        |_| {},
    )
    .await;
    assert!(
        matches!(err, ReplError::MasterError { step: "PSYNC", .. }),
        "{err}"
    );
    assert!(err.is_retryable());

    let err = fake_error(vec![w("-ERR something else\r\n")], None, |_| {}).await;
    assert!(!err.is_retryable(), "{err}");

    // CONTINUE to a PSYNC ? -1 makes no sense.
    let err = fake_error(vec![w("+CONTINUE\r\n")], None, |_| {}).await;
    assert!(
        matches!(
            err,
            ReplError::Handshake {
                step: "PSYNC ? -1",
                ..
            }
        ),
        "{err}"
    );

    let err = fake_error(vec![w("+FULLRESYNC notanid 12\r\n")], None, |_| {}).await;
    assert!(
        matches!(err, ReplError::Handshake { step: "PSYNC", .. }),
        "{err}"
    );

    // A reply line that never ends is refused, not buffered forever.
    let err = fake_error(vec![w(vec![b'+'; 100_000])], None, |_| {}).await;
    assert!(matches!(err, ReplError::Handshake { .. }), "{err}");

    let err = PsyncSource::connect(&config("redis://127.0.0.1:1"), None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ReplError::Connect { .. }) && err.is_retryable(),
        "{err}"
    );
}

#[tokio::test]
async fn continue_with_a_new_replid_is_adopted() {
    let new_id = "ffffffffffffffffffffffffffffffffffffffff";
    let (url, _fake) = fake_master(
        None,
        vec![
            w(format!("+CONTINUE {new_id}\r\n")),
            w(resp(&["SET", "k", "v"])),
        ],
    )
    .await;
    let mut source = PsyncSource::connect(&fake_config(&url), Some(saved(500, 9)))
        .await
        .unwrap();
    assert_eq!(
        next(&mut source).await,
        ReplEvent::Continue {
            replid: ReplId::parse(new_id).unwrap(),
            offset: ReplOffset(500),
            db: 9
        }
    );
    let ReplEvent::Entry(entry) = next(&mut source).await else {
        panic!("expected the SET");
    };
    assert_entry(&entry, 9, false, &["SET k v"]);
    assert_eq!(source.position().replid.as_str(), new_id);
}

// ---------------------------------------------------------------------------
// The RDB bridge: a live full sync parsed while it arrives.

async fn parse_live_full_sync(diskless: bool) {
    use ferry::redis::rdb::{RdbEvent, ValueChunk};
    use ferry::redis::rdb_stream::{spawn_rdb_parser, RdbStreamConfig};

    let server = master(diskless, &[]);
    let mut c0 = client(&server, 0).await;
    let big = incompressible(300_000);
    call(&mut c0, &["SET", "big", &big]).await;
    call(&mut c0, &["RPUSH", "list", "a", "b", "c"]).await;
    let mut c7 = client(&server, 7).await;
    call(&mut c7, &["HSET", "h", "f1", "v1", "f2", "v2"]).await;
    call(&mut c7, &["ZADD", "z", "1.5", "m"]).await;

    let mut cfg = config(&server.url());
    cfg.rdb_chunk_size = 8 * 1024;
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    let (feeder, mut events) = spawn_rdb_parser(RdbStreamConfig {
        chunk_queue: 2,
        event_queue: 2,
        ..RdbStreamConfig::default()
    });
    // Feed from one task while this one consumes the events.
    let feeding = tokio::spawn(async move {
        let mut chunks = 0;
        loop {
            match source.next_event().await.unwrap() {
                ReplEvent::FullResync { .. } => {}
                ReplEvent::RdbChunk(chunk) => {
                    chunks += 1;
                    feeder.feed(chunk).await.unwrap();
                }
                ReplEvent::RdbEnd { .. } => {
                    feeder.finish();
                    return (source, chunks);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    let mut keys: Vec<(u32, String)> = Vec::new();
    let mut big_value = Vec::new();
    let mut db = 0;
    let mut ended = false;
    while let Some(event) = events.next().await.unwrap() {
        match event {
            RdbEvent::SelectDb(d) => db = d,
            RdbEvent::KeyStart(header) => {
                assert_eq!(header.db, db);
                keys.push((db, String::from_utf8_lossy(&header.key).into_owned()));
            }
            RdbEvent::Chunk(ValueChunk::String(s)) if keys.last().unwrap().1 == "big" => {
                big_value.extend_from_slice(&s)
            }
            RdbEvent::End { .. } => ended = true,
            _ => {}
        }
    }
    assert!(ended);
    let (mut source, chunks) = feeding.await.unwrap();
    assert!(chunks > 30, "the RDB came in {chunks} chunks");
    keys.sort();
    let expected: Vec<(u32, String)> = [(0, "big"), (0, "list"), (7, "h"), (7, "z")]
        .iter()
        .map(|(d, k)| (*d, k.to_string()))
        .collect();
    assert_eq!(keys, expected);
    assert_eq!(big_value, big.as_bytes());
    // The stream goes on after the snapshot.
    call(&mut c7, &["SET", "after", "1"]).await;
    let entries = read_to_rest(&mut source, &server).await;
    assert_entry(entries.last().unwrap(), 7, false, &["SET after 1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_rdb_parsed_while_it_arrives_disk_based() {
    parse_live_full_sync(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_rdb_parsed_while_it_arrives_diskless() {
    parse_live_full_sync(true).await;
}

#[tokio::test]
async fn rdb_bridge_reports_a_truncated_rdb() {
    use ferry::redis::rdb_stream::{spawn_rdb_parser, RdbStreamConfig, RdbStreamError};

    let (feeder, mut events) = spawn_rdb_parser(RdbStreamConfig::default());
    feeder
        .feed(bytes::Bytes::from_static(b"REDIS0010\xfa"))
        .await
        .unwrap();
    feeder.finish();
    let mut outcome = Ok(None);
    for _ in 0..10 {
        outcome = events.next().await;
        if !matches!(outcome, Ok(Some(_))) {
            break;
        }
    }
    assert!(
        matches!(outcome, Err(RdbStreamError::Rdb(_))),
        "{outcome:?}"
    );
    assert!(matches!(events.next().await, Ok(None)));
}

/// Figures, not a check: `cargo test --release --test psync throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let server = master(false, &[]);
    let mut c0 = client(&server, 0).await;
    call(&mut c0, &["DEBUG", "POPULATE", "500000", "key", "100"]).await;
    let cfg = config(&server.url());
    let started = Instant::now();
    let mut source = PsyncSource::connect(&cfg, None).await.unwrap();
    let (_, _, rdb) = take_full_sync(&mut source, cfg.rdb_chunk_size).await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "full sync: {} MB RDB in {secs:.2} s ({:.0} MB/s, incl. the master's BGSAVE)",
        rdb.len() / 1_000_000,
        rdb.len() as f64 / 1e6 / secs
    );

    let port = server.port.to_string();
    let bench = std::thread::spawn(move || {
        std::process::Command::new("redis-benchmark")
            .args([
                "-p", &port, "-t", "set", "-n", "300000", "-P", "64", "-d", "100", "-r", "100000",
                "-q",
            ])
            .output()
            .unwrap()
    });
    let started = Instant::now();
    let start_offset = source.position().offset.0;
    let mut entries = 0u64;
    while !bench.is_finished() {
        if let Ok(Ok(ReplEvent::Entry(_))) =
            tokio::time::timeout(Duration::from_millis(200), source.next_event()).await
        {
            entries += 1;
        }
    }
    let target = info_u64(&server, "master_repl_offset").await;
    let (rest, _) = read_until(&mut source, target).await;
    entries += rest.len() as u64;
    let secs = started.elapsed().as_secs_f64();
    let bytes = source.position().offset.0 - start_offset;
    println!(
        "stream: {entries} entries, {:.1} MB in {secs:.2} s ({:.0} entries/s, {:.1} MB/s; bounded by redis-benchmark)",
        bytes as f64 / 1e6,
        entries as f64 / secs,
        bytes as f64 / 1e6 / secs
    );

    // One very wide command: the decoder rescans a partial frame on each read.
    let mut args = vec!["RPUSH".to_string(), "wide".to_string()];
    args.extend((0..1_000_000).map(|i| format!("element-{i}")));
    c0.call(&args).await.unwrap();
    let started = Instant::now();
    let target = info_u64(&server, "master_repl_offset").await;
    let (wide, _) = read_until(&mut source, target).await;
    assert_eq!(wide.last().unwrap().commands[0].args.len(), 1_000_002);
    println!(
        "one RPUSH of 1M elements ({:.1} MB): received in {:.2} s",
        encoded_command_len(&args) as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
}
