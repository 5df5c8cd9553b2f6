//! The Redis wire-format layer end to end, against real redis-server 7.0
//! processes: a source master's full sync is taken with the replication
//! client ([`PsyncSource`], `PSYNC ? -1`), its RDB parsed while it arrives
//! ([`spawn_rdb_parser`]), turned into commands by a [`Rebuilder`] and
//! pipelined into an empty target; then the command stream is applied entry
//! by entry (a transaction inside `MULTI`/`EXEC`); then a session is dropped
//! and resumed from its saved position.
//!
//! Convergence is checked on the whole data set, not on chosen keys:
//! `DEBUG DIGEST` (every key's value, whether it has a TTL, and its db),
//! `DBSIZE` of all 16 dbs, the exact `PEXPIRETIME` of every key, the stream
//! state the digest does not see (metadata, consumer groups, consumers and
//! PELs) of every stream, and the function libraries. After the command
//! stream the target is also compared with a real `--replicaof` replica of
//! the source: Redis 7.0's own replicas differ from their master in consumer
//! groups' `entries-read`/`lag` (see [`GroupCounters`]), and so must ferry's
//! target.
//!
//! Run: `cargo test --test replication_e2e` (about 15 s, most of it the
//! four full syncs of a 4.6 MB RDB in the first test).

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::RedisServer;
use ferry::position::ReplOffset;
use ferry::redis::client::Client;
use ferry::redis::command::{Command, SEED_SYNC_COMMANDS};
use ferry::redis::psync::{PsyncSource, ReplEntry, ReplEvent, ReplicaConfig};
use ferry::redis::rdb::rebuild::{Output, RebuildOptions, RebuildStats, Rebuilder, TargetCaps};
use ferry::redis::rdb_stream::{spawn_rdb_parser, RdbStreamConfig};
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;

/// Longest wait for one replication or RDB event.
const EVENT_WAIT: Duration = Duration::from_secs(15);
/// Longest wait for the client to reach the source's offset.
const CATCH_UP_WAIT: Duration = Duration::from_secs(20);
/// `ReplicaConfig::rdb_chunk_size` unless a test says otherwise.
const DEFAULT_CHUNK: usize = 64 * 1024;
/// Databases of a default Redis.
const DB_COUNT: u32 = 16;
/// Commands awaiting a reply on the target before replies are read.
const PIPELINE_DEPTH: usize = 256;
/// Bytes of commands awaiting a reply on the target before replies are read.
const PIPELINE_BYTES: usize = 4 << 20;

/// Source settings that make collections change encoding early, and that
/// LZF-compress the inner nodes of lists in the RDB.
const SOURCE_ENCODING_CONFIG: &[&str] = &[
    "--hash-max-listpack-entries",
    "32",
    "--hash-max-listpack-value",
    "64",
    "--zset-max-listpack-entries",
    "32",
    "--zset-max-listpack-value",
    "64",
    "--set-max-intset-entries",
    "32",
    "--list-max-listpack-size",
    "128",
    "--list-compress-depth",
    "1",
];

/// Elements of the big list and fields of the big hash in the full-size data
/// set; both are far over the 1 MiB `RESTORE` limit.
const BIG_LIST_LEN: usize = 300_000;
const BIG_HASH_LEN: usize = 200_000;

/// The function library of the data set.
const DATASET_LIBRARY: &str = "#!lua name=ferrylib\n\
    redis.register_function('ferry_hset', function(keys, args) \
    return redis.call('HSET', keys[1], args[1], args[2]) end)";

// ---------------------------------------------------------------------------
// Plumbing: connections, calls, display.

async fn connect(server: &RedisServer) -> Client {
    let url = RedisUrl::parse(&server.url()).expect("server url");
    Client::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.addr()))
}

/// One command that must succeed.
async fn call<T: AsRef<[u8]>>(client: &mut Client, args: &[T]) -> Frame {
    client
        .call(args)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", show_args(args)))
}

fn cmd<T: AsRef<[u8]>>(args: &[T]) -> Command {
    Command::from_parts(args)
}

/// Sends `cmds` pipelined in windows; every reply must be a success.
async fn pipeline(client: &mut Client, cmds: &[Command]) {
    for window in cmds.chunks(200) {
        let replies = client.pipeline(window).await.expect("pipeline");
        for (sent, reply) in window.iter().zip(&replies) {
            if let Some(error) = find_error(reply) {
                panic!("{}: {error}", show_args(&sent.args));
            }
        }
    }
}

/// Arguments for messages: lossy text, long arguments cut.
fn show_args<T: AsRef<[u8]>>(args: &[T]) -> String {
    args.iter()
        .map(|a| {
            let text = String::from_utf8_lossy(a.as_ref());
            if text.chars().count() > 60 {
                format!("{}...", text.chars().take(60).collect::<String>())
            } else {
                text.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn show_frame(frame: &Frame) -> String {
    match frame {
        Frame::Array(items) | Frame::Set(items) | Frame::Push(items) => format!(
            "[{}]",
            items.iter().map(show_frame).collect::<Vec<_>>().join(", ")
        ),
        Frame::Null => "nil".to_string(),
        Frame::Integer(i) => i.to_string(),
        other => match other.as_bytes() {
            Some(b) => String::from_utf8_lossy(b).into_owned(),
            None => format!("{other:?}"),
        },
    }
}

/// The first error in a reply, looking inside arrays (an `EXEC` reply holds
/// one reply per queued command).
fn find_error(frame: &Frame) -> Option<String> {
    match frame {
        Frame::Array(items) => items.iter().find_map(find_error),
        other => other.error_message(),
    }
}

fn text(frame: &Frame) -> String {
    frame
        .as_bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_else(|| panic!("expected a string reply, got {}", show_frame(frame)))
}

fn integer(frame: &Frame) -> i64 {
    frame
        .as_integer()
        .unwrap_or_else(|| panic!("expected an integer reply, got {}", show_frame(frame)))
}

async fn info_u64(client: &mut Client, field: &str) -> u64 {
    let info = client.info("everything").await.expect("INFO");
    let value = info
        .get(field)
        .unwrap_or_else(|| panic!("INFO has no {field}"));
    value
        .parse()
        .unwrap_or_else(|_| panic!("INFO {field} is not a number: {value:?}"))
}

// ---------------------------------------------------------------------------
// The target: commands pipelined on one connection, every reply checked.

struct Target {
    client: Client,
    /// Db the connection is in once everything queued has run.
    db: u32,
    /// Commands sent whose reply was not read yet (shown, for messages).
    in_flight: VecDeque<String>,
    /// Warnings of the rebuild (none are expected from 7.0 to 7.0).
    warnings: Vec<String>,
}

impl Target {
    async fn connect(server: &RedisServer) -> Target {
        Target {
            client: connect(server).await,
            db: 0,
            in_flight: VecDeque::new(),
            warnings: Vec::new(),
        }
    }

    fn queue(&mut self, cmd: &Command) {
        self.client.queue(cmd);
        self.in_flight.push_back(show_args(&cmd.args));
        if cmd.is("SELECT") {
            let db = cmd
                .args
                .get(1)
                .and_then(|a| std::str::from_utf8(a).ok())
                .and_then(|a| a.parse().ok());
            self.db = db.unwrap_or_else(|| panic!("bad SELECT: {}", show_args(&cmd.args)));
        }
    }

    /// Queues `cmd` to run in `db` (`None`: in whatever db is selected).
    async fn send(&mut self, db: Option<u32>, cmd: &Command) {
        if let Some(db) = db.filter(|&db| db != self.db) {
            self.queue(&Command::from_parts(["SELECT".to_string(), db.to_string()]));
        }
        self.queue(cmd);
        if self.in_flight.len() >= PIPELINE_DEPTH || self.client.queued_bytes() >= PIPELINE_BYTES {
            self.drain().await;
        }
    }

    /// Sends what is queued and checks every reply.
    async fn drain(&mut self) {
        self.client.flush().await.expect("write to the target");
        while let Some(sent) = self.in_flight.pop_front() {
            let reply = self
                .client
                .read_reply()
                .await
                .unwrap_or_else(|e| panic!("reply to {sent}: {e}"));
            if let Some(error) = find_error(&reply) {
                panic!("the target refused {sent}: {error}");
            }
            if sent.starts_with("EXEC") && reply == Frame::Null {
                panic!("the target aborted a transaction");
            }
        }
    }

    async fn output(&mut self, output: Output) {
        match output {
            Output::Command { db, cmd } => self.send(Some(db), &cmd).await,
            Output::Global { cmd } => self.send(None, &cmd).await,
            Output::Warning { db, key, what } => self.warnings.push(format!(
                "db {db} key {:?}: {what}",
                key.map(|k| String::from_utf8_lossy(&k).into_owned())
            )),
        }
    }

    /// Applies one entry of the command stream: its commands in its db, a
    /// transaction inside `MULTI`/`EXEC` (a `SELECT` inside it is kept).
    async fn apply(&mut self, entry: &ReplEntry) {
        let multi = Command::from_parts(["MULTI"]);
        if entry.transaction {
            self.send(Some(entry.db), &multi).await;
        }
        for (i, cmd) in entry.commands.iter().enumerate() {
            let db = (i == 0 && !entry.transaction).then_some(entry.db);
            self.send(db, cmd).await;
        }
        if entry.transaction {
            self.send(None, &Command::from_parts(["EXEC"])).await;
        }
    }
}

// ---------------------------------------------------------------------------
// The source data set: every type × encoding Redis 7.0 writes.

/// `(db, key, OBJECT ENCODING)` of the data set: checked on the source, so
/// that a change of Redis defaults cannot quietly drop an encoding.
const ENCODINGS: &[(u32, &str, &str)] = &[
    (0, "str:int", "int"),
    (0, "str:neg", "int"),
    (0, "str:embstr", "embstr"),
    (0, "str:raw", "raw"),
    (0, "str:incompressible", "raw"),
    (0, "str:bignum", "embstr"),
    (0, "str:empty", "embstr"),
    (0, "str:big", "raw"),
    (0, "list:small", "quicklist"),
    (0, "list:ints", "quicklist"),
    (0, "list:big", "quicklist"),
    (0, "list:bigitems", "quicklist"),
    (0, "set:intset", "intset"),
    (0, "set:intset64", "intset"),
    (0, "set:hashtable", "hashtable"),
    (0, "set:manyints", "hashtable"),
    (0, "zset:listpack", "listpack"),
    (0, "zset:skiplist", "skiplist"),
    (0, "hash:listpack", "listpack"),
    (0, "hash:big", "hashtable"),
    (0, "hash:longvalue", "hashtable"),
    (3, "stream:groups", "stream"),
    (3, "stream:big", "stream"),
    (3, "stream:mk", "stream"),
    (3, "stream:emptied", "stream"),
    (3, "ttl:str", "embstr"),
    (3, "ttl:list", "quicklist"),
    (3, "ttl:hash", "listpack"),
    (3, "ttl:zset", "skiplist"),
    (3, "ttl:set", "intset"),
    (3, "ttl:stream", "stream"),
    (15, "db15:str", "embstr"),
    (15, "db15:pxat", "embstr"),
];

/// Text that LZF cannot shrink.
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

/// Fills db 0, 3 and 15 of the source (see [`ENCODINGS`]) and loads
/// [`DATASET_LIBRARY`]. `big` makes `list:big` and `hash:big` full size;
/// otherwise they are just large enough for their encoding.
async fn fill_source(client: &mut Client, big: bool) {
    let (list_len, hash_len) = if big {
        (BIG_LIST_LEN, BIG_HASH_LEN)
    } else {
        (3_000, 2_000)
    };
    let mut cmds = vec![
        cmd(&["SELECT", "0"]),
        cmd(&["SET", "str:int", "12345"]),
        cmd(&["SET", "str:neg", "-9223372036854775808"]),
        cmd(&["SET", "str:embstr", "short value"]),
        cmd(&["SET", "str:raw", &"compressible ".repeat(40)]),
        cmd(&["SET", "str:incompressible", &incompressible(5_000)]),
        cmd(&["SET", "str:bignum", "123456789012345678901234567890"]),
        cmd(&["SET", "str:empty", ""]),
        // Over the 1 MiB RESTORE limit; LZF-compressed in the RDB.
        cmd(&["SET", "str:big", &"0123456789abcdef".repeat(128 * 1024)]),
        cmd(&["SET", &format!("key:{}", "k".repeat(10_000)), "long key"]),
        Command::from_parts([
            &b"SET"[..],
            b"bin:\x00\xff\xfekey",
            b"\x00\x01\xfe\xffvalue",
        ]),
        cmd(&["RPUSH", "list:small", "a", "b", "1", "-2", "c"]),
        // Elements over the node size limit get a node each.
        cmd(&[
            "RPUSH",
            "list:bigitems",
            &incompressible(20_000),
            "small",
            &"z".repeat(30_000),
        ]),
        cmd(&["SADD", "set:intset", "1", "2", "3", "-100", "65536"]),
        cmd(&["SADD", "set:intset64", "1", "5000000000", "-5000000000"]),
        cmd(&["SADD", "set:hashtable", "alpha", "beta", "gamma", "1"]),
        cmd(&[
            "ZADD",
            "zset:listpack",
            "1.5",
            "a",
            "-inf",
            "b",
            "inf",
            "c",
            "0",
            "d",
            "0.1",
            "e",
            "3.14159265358979",
            "f",
            "1e300",
            "g",
            "-2.5e-7",
            "h",
        ]),
        cmd(&["HSET", "hash:listpack", "f1", "v1", "f2", "2", "f3", "-3"]),
        cmd(&["HSET", "hash:longvalue", "f", &"x".repeat(100)]),
        Command::from_parts([&b"HSET"[..], b"hash:binary", b"\xc3\x28", b"\x80\x00"]),
        cmd(&["FUNCTION", "LOAD", DATASET_LIBRARY]),
    ];
    let mut args = vec!["RPUSH".to_string(), "list:ints".to_string()];
    args.extend((0..100).map(|i| (i * 1_000_003 - 50_000_000).to_string()));
    // Every listpack integer width (7, 13, 16, 24, 32 and 64 bits).
    args.extend(
        [
            "0",
            "127",
            "-1",
            "4095",
            "-4096",
            "32767",
            "-32768",
            "8388607",
            "-8388608",
            "2147483647",
            "-2147483648",
            "12345678901",
            "9223372036854775807",
            "-9223372036854775808",
        ]
        .map(String::from),
    );
    cmds.push(cmd(&args));
    for start in (0..list_len).step_by(1000) {
        let mut args = vec!["RPUSH".to_string(), "list:big".to_string()];
        args.extend((start..(start + 1000).min(list_len)).map(|i| format!("item:{i:07}")));
        cmds.push(cmd(&args));
    }
    for start in (0..hash_len).step_by(1000) {
        let mut args = vec!["HSET".to_string(), "hash:big".to_string()];
        for i in start..(start + 1000).min(hash_len) {
            args.push(format!("f{i}"));
            args.push(format!("v{i}"));
        }
        cmds.push(cmd(&args));
    }
    let mut args = vec!["SADD".to_string(), "set:manyints".to_string()];
    args.extend((0..100).map(|i| (i * 7).to_string()));
    cmds.push(cmd(&args));
    let mut args = vec!["ZADD".to_string(), "zset:skiplist".to_string()];
    for i in 0..100 {
        args.push(format!("{}", f64::from(i) / 3.0));
        args.push(format!("m{i}"));
    }
    cmds.push(cmd(&args));

    // db 3: streams of every shape, keys with TTLs.
    cmds.push(cmd(&["SELECT", "3"]));
    for i in 1..=20 {
        let id = format!("{i}-0");
        let value = format!("v{i}");
        // Entries with the master entry's fields, and entries with others.
        if i % 4 == 0 {
            cmds.push(cmd(&["XADD", "stream:groups", &id, "other", &value]));
        } else {
            cmds.push(cmd(&["XADD", "stream:groups", &id, "f", &value, "n", "1"]));
        }
    }
    cmds.push(cmd(&["XDEL", "stream:groups", "15-0"]));
    cmds.push(cmd(&["XGROUP", "CREATE", "stream:groups", "g1", "0"]));
    cmds.push(cmd(&["XGROUP", "CREATE", "stream:groups", "g2", "$"]));
    cmds.push(cmd(&[
        "XGROUP",
        "CREATE",
        "stream:groups",
        "g3",
        "10-0",
        "ENTRIESREAD",
        "9",
    ]));
    cmds.push(cmd(&[
        "XGROUP",
        "CREATECONSUMER",
        "stream:groups",
        "g2",
        "carol",
    ]));
    for i in 0..2_000 {
        let value = format!("payload-{i}");
        cmds.push(cmd(&["XADD", "stream:big", "*", "field", &value]));
    }
    cmds.push(cmd(&["XTRIM", "stream:big", "MAXLEN", "1500"]));
    cmds.push(cmd(&[
        "XGROUP",
        "CREATE",
        "stream:mk",
        "g",
        "0",
        "MKSTREAM",
    ]));
    cmds.push(cmd(&["XADD", "stream:emptied", "10-1", "f", "v"]));
    cmds.push(cmd(&["XDEL", "stream:emptied", "10-1"]));
    cmds.push(cmd(&["SET", "ttl:str", "v", "EX", "3600"]));
    cmds.push(cmd(&["RPUSH", "ttl:list", "a", "b"]));
    cmds.push(cmd(&["EXPIREAT", "ttl:list", "4102444800"]));
    cmds.push(cmd(&["HSET", "ttl:hash", "a", "b"]));
    cmds.push(cmd(&["PEXPIRE", "ttl:hash", "7200000"]));
    let mut args = vec!["ZADD".to_string(), "ttl:zset".to_string()];
    for i in 0..40 {
        args.push(i.to_string());
        args.push(format!("member{i}"));
    }
    cmds.push(cmd(&args));
    cmds.push(cmd(&["PEXPIRE", "ttl:zset", "7200000"]));
    cmds.push(cmd(&["SADD", "ttl:set", "1", "2"]));
    cmds.push(cmd(&["EXPIRE", "ttl:set", "5000"]));
    cmds.push(cmd(&["XADD", "ttl:stream", "1-1", "a", "b"]));
    cmds.push(cmd(&["EXPIRE", "ttl:stream", "5000"]));

    // db 15.
    cmds.push(cmd(&["SELECT", "15"]));
    cmds.push(cmd(&["SET", "db15:str", "fifteen"]));
    cmds.push(cmd(&["SET", "db15:pxat", "v", "PXAT", "4102444800123"]));
    cmds.push(cmd(&["SELECT", "0"]));
    pipeline(client, &cmds).await;

    // Deliveries: alice gets 5 entries and reads her own again (delivery
    // count 2), bob gets 3, two are acknowledged; g3 gets one.
    call(client, &["SELECT", "3"]).await;
    for (group, consumer, count, from) in [
        ("g1", "alice", "5", ">"),
        ("g1", "bob", "3", ">"),
        ("g1", "alice", "10", "0"),
        ("g3", "erin", "1", ">"),
    ] {
        call(
            client,
            &[
                "XREADGROUP",
                "GROUP",
                group,
                consumer,
                "COUNT",
                count,
                "STREAMS",
                "stream:groups",
                from,
            ],
        )
        .await;
    }
    call(client, &["XACK", "stream:groups", "g1", "2-0", "7-0"]).await;
    call(client, &["SELECT", "0"]).await;

    for (db, key, encoding) in ENCODINGS {
        call(client, &["SELECT", &db.to_string()]).await;
        let found = text(&call(client, &["OBJECT", "ENCODING", key]).await);
        assert_eq!(found, *encoding, "encoding of {key} in db {db}");
    }
    call(client, &["SELECT", "0"]).await;
}

// ---------------------------------------------------------------------------
// Whole data set state.

/// Everything compared between source and target.
#[derive(Debug, PartialEq)]
struct DataSet {
    digest: String,
    db_sizes: Vec<i64>,
    /// `PEXPIRETIME` of every key (-1: no TTL), by db and key.
    expiry: BTreeMap<(u32, Vec<u8>), i64>,
    /// [`stream_state`] of every stream, by db and key.
    streams: BTreeMap<(u32, Vec<u8>), Vec<String>>,
    /// `(library_name, library_code)`, sorted.
    functions: Vec<(String, String)>,
}

impl DataSet {
    fn keys(&self) -> i64 {
        self.db_sizes.iter().sum()
    }
}

/// The value of `name` in a flat `[name, value, ...]` reply.
fn field<'a>(reply: &'a Frame, name: &str) -> &'a Frame {
    let Frame::Array(items) = reply else {
        panic!("expected a field list, got {}", show_frame(reply));
    };
    items
        .chunks(2)
        .find(|pair| pair[0].as_bytes().is_some_and(|b| b == name.as_bytes()))
        .and_then(|pair| pair.get(1))
        .unwrap_or_else(|| panic!("no {name} in {}", show_frame(reply)))
}

fn array(frame: &Frame) -> &[Frame] {
    match frame {
        Frame::Array(items) => items,
        other => panic!("expected an array, got {}", show_frame(other)),
    }
}

/// What `DEBUG DIGEST` does not cover of a stream (it hashes the entries
/// only): metadata, groups, consumers and PELs, without times that depend
/// on when the state was written (idle, seen and delivery times).
async fn stream_state(client: &mut Client, key: &[u8]) -> Vec<String> {
    let mut state = Vec::new();
    let info = call(client, &[&b"XINFO"[..], b"STREAM", key]).await;
    for name in [
        "length",
        "last-generated-id",
        "max-deleted-entry-id",
        "entries-added",
        "recorded-first-entry-id",
        "groups",
    ] {
        state.push(format!("{name}={}", show_frame(field(&info, name))));
    }
    let groups = call(client, &[&b"XINFO"[..], b"GROUPS", key]).await;
    for group in array(&groups) {
        let name = text(field(group, "name"));
        for attr in [
            "consumers",
            "pending",
            "last-delivered-id",
            "entries-read",
            "lag",
        ] {
            state.push(format!(
                "group {name} {attr}={}",
                show_frame(field(group, attr))
            ));
        }
        let consumers = call(client, &[&b"XINFO"[..], b"CONSUMERS", key, name.as_bytes()]).await;
        for consumer in array(&consumers) {
            state.push(format!(
                "group {name} consumer {} pending={}",
                text(field(consumer, "name")),
                show_frame(field(consumer, "pending"))
            ));
        }
        let pel = call(
            client,
            &[
                &b"XPENDING"[..],
                key,
                name.as_bytes(),
                b"-",
                b"+",
                b"100000",
            ],
        )
        .await;
        for pending in array(&pel) {
            // [id, consumer, idle ms, delivery count]
            let p = array(pending);
            state.push(format!(
                "group {name} pel {} {} deliveries={}",
                text(&p[0]),
                text(&p[1]),
                integer(&p[3])
            ));
        }
    }
    state
}

async fn data_set(client: &mut Client) -> DataSet {
    let digest = text(&call(client, &["DEBUG", "DIGEST"]).await);
    let mut db_sizes = Vec::new();
    let mut expiry = BTreeMap::new();
    let mut streams = BTreeMap::new();
    for db in 0..DB_COUNT {
        call(client, &["SELECT", &db.to_string()]).await;
        let size = integer(&call(client, &["DBSIZE"]).await);
        db_sizes.push(size);
        if size == 0 {
            continue;
        }
        let keys: Vec<Bytes> = array(&call(client, &["KEYS", "*"]).await)
            .iter()
            .map(|k| k.as_bytes().cloned().expect("a key"))
            .collect();
        let mut cmds = Vec::new();
        for key in &keys {
            cmds.push(Command::new(vec![
                Bytes::from_static(b"PEXPIRETIME"),
                key.clone(),
            ]));
            cmds.push(Command::new(vec![Bytes::from_static(b"TYPE"), key.clone()]));
        }
        let replies = client.pipeline(&cmds).await.expect("pipeline");
        for (key, pair) in keys.iter().zip(replies.chunks(2)) {
            expiry.insert((db, key.to_vec()), integer(&pair[0]));
            if text(&pair[1]) == "stream" {
                streams.insert((db, key.to_vec()), stream_state(client, key).await);
            }
        }
    }
    call(client, &["SELECT", "0"]).await;
    let mut functions: Vec<(String, String)> =
        array(&call(client, &["FUNCTION", "LIST", "WITHCODE"]).await)
            .iter()
            .map(|lib| {
                (
                    text(field(lib, "library_name")),
                    text(field(lib, "library_code")),
                )
            })
            .collect();
    functions.sort();
    DataSet {
        digest,
        db_sizes,
        expiry,
        streams,
        functions,
    }
}

/// How consumer groups' `entries-read` and `lag` are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupCounters {
    Compare,
    /// Redis 7.0 propagates `XREADGROUP` as `XCLAIM … LASTID` without the
    /// group's `entries-read`, so its own replicas end up with
    /// `entries-read`/`lag` nil where the master has numbers. A target fed
    /// from the stream can only match a real replica there (which
    /// [`stream_of_every_seed_command_converges`] checks), not the master.
    Ignore,
}

/// `reference` and `target` hold the same data set; returns it.
async fn assert_converged(
    reference: &mut Client,
    target: &mut Client,
    what: &str,
    counters: GroupCounters,
) -> DataSet {
    let want = data_set(reference).await;
    assert_same(&want, &data_set(target).await, what, counters);
    want
}

/// `got` equals `want`, field by field (for readable failures).
fn assert_same(want: &DataSet, got: &DataSet, what: &str, counters: GroupCounters) {
    assert_eq!(got.db_sizes, want.db_sizes, "{what}: DBSIZE of dbs 0..16");
    for (key, time) in &want.expiry {
        assert_eq!(
            got.expiry.get(key),
            Some(time),
            "{what}: PEXPIRETIME of {:?} in db {}",
            String::from_utf8_lossy(&key.1),
            key.0
        );
    }
    assert_eq!(got.expiry.len(), want.expiry.len(), "{what}: key sets");
    let comparable = |state: &Vec<String>| -> Vec<String> {
        state
            .iter()
            .filter(|line| {
                counters == GroupCounters::Compare
                    || !(line.contains(" entries-read=") || line.contains(" lag="))
            })
            .cloned()
            .collect()
    };
    for (key, state) in &want.streams {
        assert_eq!(
            got.streams.get(key).map(comparable),
            Some(comparable(state)),
            "{what}: stream {:?} in db {}",
            String::from_utf8_lossy(&key.1),
            key.0
        );
    }
    assert_eq!(got.functions, want.functions, "{what}: function libraries");
    assert_eq!(got.digest, want.digest, "{what}: DEBUG DIGEST");
    assert_ne!(
        want.digest,
        "0".repeat(40),
        "{what}: the reference is empty"
    );
}

/// Waits until a real replica (`--replicaof`) of the source has everything
/// the source wrote.
async fn wait_for_replica(source: &mut Client, replica: &RedisServer) {
    let mut client = connect(replica).await;
    let deadline = Instant::now() + CATCH_UP_WAIT;
    loop {
        let master = info_u64(source, "master_repl_offset").await;
        let info = client.info("replication").await.expect("INFO replication");
        let link = info.get("master_link_status").cloned().unwrap_or_default();
        let applied: Option<u64> = info.get("slave_repl_offset").and_then(|o| o.parse().ok());
        if link == "up" && applied == Some(master) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica not caught up within {CATCH_UP_WAIT:?}: link {link}, \
             at {applied:?}, source at {master}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_empty(target: &mut Client) {
    let empty = data_set(target).await;
    assert_eq!(empty.keys(), 0, "the target is not empty");
    assert!(empty.functions.is_empty(), "the target has functions");
}

// ---------------------------------------------------------------------------
// Replication: full sync into the target, then the stream.

fn replica_config(source: &RedisServer) -> ReplicaConfig {
    ReplicaConfig::new(RedisUrl::parse(&source.url()).expect("source url"))
}

/// What a full sync did.
struct FullSync {
    source: PsyncSource,
    /// The stream offset the RDB describes.
    start: ReplOffset,
    rdb_len: u64,
    chunks: u64,
    stats: RebuildStats,
}

/// `PSYNC ? -1`: the RDB goes from the replication client (on its own task)
/// through the parser bridge and a [`Rebuilder`] into `target`.
async fn full_sync(
    source: &RedisServer,
    target: &mut Target,
    restore_max_bytes: usize,
    rdb_chunk_size: usize,
) -> FullSync {
    let mut cfg = replica_config(source);
    cfg.rdb_chunk_size = rdb_chunk_size;
    let mut session = PsyncSource::connect(&cfg, None)
        .await
        .unwrap_or_else(|e| panic!("PSYNC ? -1 to {}: {e}", source.addr()));
    let (feeder, mut events) = spawn_rdb_parser(RdbStreamConfig::default());
    // Feeding and consuming happen on different tasks (the bridge's queues
    // are bounded in both directions).
    let feeding = tokio::spawn(async move {
        let mut start = None;
        let mut chunks = 0u64;
        let mut fed = 0u64;
        loop {
            let event = tokio::time::timeout(EVENT_WAIT, session.next_event())
                .await
                .expect("a replication event in time")
                .unwrap_or_else(|e| panic!("replication client: {e}"));
            match event {
                ReplEvent::FullResync { offset, .. } => start = Some(offset),
                ReplEvent::RdbChunk(chunk) => {
                    assert!(!chunk.is_empty() && chunk.len() <= rdb_chunk_size);
                    chunks += 1;
                    fed += chunk.len() as u64;
                    feeder.feed(chunk).await.expect("the parser takes the RDB");
                }
                ReplEvent::RdbEnd { len } => {
                    assert_eq!(len, fed, "RdbEnd length vs chunk bytes");
                    feeder.finish();
                    let start = start.expect("FullResync before the RDB");
                    return (session, start, len, chunks);
                }
                other => panic!("unexpected event during a full sync: {other:?}"),
            }
        }
    });

    let server_info = target.client.info("server").await.expect("INFO server");
    let caps = TargetCaps::from_info(&server_info).expect("target version");
    let mut opts = RebuildOptions::new(caps);
    opts.restore_max_bytes = restore_max_bytes;
    let mut rebuilder = Rebuilder::new(opts);
    let mut outputs = Vec::new();
    let mut ended = false;
    loop {
        let event = match tokio::time::timeout(EVENT_WAIT, events.next())
            .await
            .expect("an RDB event in time")
        {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(error) => {
                // A failed replication client also ends the parser's input:
                // report its panic rather than the parser's end of input.
                if let Ok(Err(join)) = tokio::time::timeout(Duration::from_secs(1), feeding).await {
                    panic!("replication client failed: {join}");
                }
                panic!("RDB parse failed: {error}");
            }
        };
        ended |= matches!(event, ferry::redis::rdb::RdbEvent::End { .. });
        rebuilder
            .feed(event, &mut outputs)
            .unwrap_or_else(|e| panic!("rebuild: {e}"));
        for output in outputs.drain(..) {
            target.output(output).await;
        }
    }
    assert!(ended, "the RDB ended without End");
    target.drain().await;
    let stats = rebuilder.finish().expect("rebuild finished between keys");
    assert!(
        target.warnings.is_empty(),
        "rebuild warnings: {:?}",
        target.warnings
    );
    let (session, start, rdb_len, chunks) = feeding.await.expect("replication client task");
    assert_eq!(session.position().offset, start, "position after RdbEnd");
    assert_eq!(session.position().db, 0, "db after RdbEnd");
    FullSync {
        source: session,
        start,
        rdb_len,
        chunks,
        stats,
    }
}

/// Applies one replication event; entries are also kept in `seen`.
async fn apply_event(event: ReplEvent, target: &mut Target, seen: &mut Vec<ReplEntry>) {
    match event {
        ReplEvent::Entry(entry) => {
            target.apply(&entry).await;
            seen.push(entry);
        }
        ReplEvent::Progress { .. } => {}
        other => panic!("unexpected event in the command stream: {other:?}"),
    }
}

/// Reads and applies the stream until the client has received, and handed
/// out, everything the source wrote: `received_offset()` and `position()`
/// equal the source's `master_repl_offset`. The target has then run all of
/// it.
async fn catch_up(
    session: &mut PsyncSource,
    admin: &mut Client,
    target: &mut Target,
    seen: &mut Vec<ReplEntry>,
) {
    let deadline = Instant::now() + CATCH_UP_WAIT;
    loop {
        // Take events while they come; look at the source's offset when idle.
        match tokio::time::timeout(Duration::from_millis(100), session.next_event()).await {
            Ok(Ok(event)) => {
                apply_event(event, target, seen).await;
                continue;
            }
            Ok(Err(e)) => panic!("replication client: {e}"),
            Err(_idle) => {}
        }
        let master = info_u64(admin, "master_repl_offset").await;
        let received = session.received_offset().0;
        let position = session.position().offset.0;
        assert!(
            received <= master,
            "received offset {received} is past the source's {master}"
        );
        if received == master && position == master {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no catch-up within {CATCH_UP_WAIT:?}: source at {master}, \
             received {received}, position {position}"
        );
    }
    target.drain().await;
    session.ack_handle().set(session.position().offset);
}

// ---------------------------------------------------------------------------
// 1. Full sync of every type × encoding, disk-based and diskless.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdb_through_replication_client_matches_digest() {
    let mut args = vec!["--repl-diskless-sync-delay", "0"];
    args.extend_from_slice(SOURCE_ENCODING_CONFIG);
    let source = RedisServer::start(&args);
    let mut admin = connect(&source).await;
    let started = Instant::now();
    fill_source(&mut admin, true).await;
    eprintln!("source filled in {:?}", started.elapsed());
    // The source does not change from here on (its digest alone costs a
    // second with the big keys, so it is taken once).
    let want = data_set(&mut admin).await;
    let full_before = info_u64(&mut admin, "sync_full").await;

    let mut runs = 0;
    for diskless in [false, true] {
        let mode = if diskless { "yes" } else { "no" };
        call(&mut admin, &["CONFIG", "SET", "repl-diskless-sync", mode]).await;
        // Diskless transfers come in odd-sized small chunks, so that the end
        // mark search and the parser bridge see many chunk boundaries.
        let chunk_size = if diskless { 1000 } else { DEFAULT_CHUNK };
        for restore_max_bytes in [RebuildOptions::new(caps_7_0()).restore_max_bytes, 0] {
            let what = format!("diskless={diskless} restore_max_bytes={restore_max_bytes}");
            let started = Instant::now();
            let target_server = RedisServer::start(&[]);
            let mut target = Target::connect(&target_server).await;
            assert_empty(&mut target.client).await;
            let log_before = std::fs::read_to_string(source.log_path()).unwrap_or_default();

            let sync = full_sync(&source, &mut target, restore_max_bytes, chunk_size).await;
            runs += 1;
            let elapsed = started.elapsed();

            // The master really did the kind of transfer asked for.
            let log = std::fs::read_to_string(source.log_path()).expect("source log");
            let new_log = &log[log_before.len().min(log.len())..];
            let kind = if diskless {
                "target: replicas sockets"
            } else {
                "target: disk"
            };
            assert!(
                new_log.contains(kind),
                "{what}: no {kind} sync in:\n{new_log}"
            );

            let mut checker = connect(&target_server).await;
            let got = data_set(&mut checker).await;
            assert_same(&want, &got, &what, GroupCounters::Compare);
            let stats = &sync.stats;
            assert_eq!(
                stats.keys_loaded(),
                u64::try_from(want.keys()).unwrap(),
                "{what}: {stats:?}"
            );
            assert_eq!(stats.functions, 1, "{what}: {stats:?}");
            assert_eq!(stats.expired_skipped + stats.empty_skipped, 0, "{what}");
            if restore_max_bytes == 0 {
                assert_eq!(stats.keys_restored, 0, "{what}: {stats:?}");
            } else {
                // Only str:big, list:big and hash:big are over the RESTORE
                // limit.
                assert_eq!(stats.keys_rebuilt, 3, "{what}: {stats:?}");
            }
            assert!(
                sync.rdb_len > 3_000_000,
                "{what}: RDB of {} bytes",
                sync.rdb_len
            );
            let min_chunks = sync.rdb_len / chunk_size as u64;
            assert!(
                sync.chunks > min_chunks,
                "{what}: RDB in {} chunks",
                sync.chunks
            );
            eprintln!(
                "{what}: RDB {} bytes in {} chunks at offset {}, {} commands, {:?}",
                sync.rdb_len, sync.chunks, sync.start, stats.commands, elapsed
            );
            drop(sync.source);
        }
    }
    let unchanged = data_set(&mut admin).await;
    assert_same(
        &want,
        &unchanged,
        "source after the runs",
        GroupCounters::Compare,
    );
    assert_eq!(
        info_u64(&mut admin, "sync_full").await,
        full_before + runs,
        "one full sync per run"
    );
}

fn caps_7_0() -> TargetCaps {
    TargetCaps::for_version(7, 0, 0).expect("7.0 is supported")
}

// ---------------------------------------------------------------------------
// 2. The command stream: every seed command, applied entry by entry.

/// SHA1 placeholder in [`WORKLOAD`]: replaced by the SHA1 of
/// [`EVALSHA_SCRIPT`], loaded before the workload runs.
const SHA: &str = "$SHA";
/// Prefix of a [`WORKLOAD`] argument replaced by the `DUMP` of the key that
/// follows it, taken when the step runs.
const DUMP_OF: &str = "$DUMP:";
/// Placeholder in [`WORKLOAD`] for a value of [`BIG_VALUE_LEN`] bytes: one
/// command of the stream far larger than a socket read.
const BIG: &str = "$BIG";
const BIG_VALUE_LEN: usize = 3_000_000;

const EVALSHA_SCRIPT: &str = "return redis.call('SET', KEYS[1], 'by-evalsha')";

const WORKLOAD_LIBRARY: &str = "#!lua name=wlib\n\
    redis.register_function('w_set_incr', function(keys, args) \
    redis.call('SET', keys[1], args[1]) return redis.call('INCR', keys[2]) end)";

/// `(db, command)`, in order, on one connection (`SELECT` is sent when the
/// db changes; inside `MULTI` the db is the one the command runs in). It
/// touches keys of the data set as well as new ones, and must cover
/// [`SEED_SYNC_COMMANDS`] (checked).
const WORKLOAD: &[(u32, &[&str])] = &[
    // Strings.
    (0, &["SET", "w:str", "hello"]),
    (0, &["APPEND", "w:str", " world"]),
    (0, &["SETRANGE", "w:str", "0", "J"]),
    (0, &["GETSET", "w:str", "replaced"]),
    (0, &["SETNX", "w:nx", "first"]),
    (0, &["SETNX", "w:nx", "second"]),
    (0, &["SETEX", "w:ex", "3600", "v"]),
    (0, &["PSETEX", "w:px", "3600000", "v"]),
    (0, &["MSET", "w:m1", "1", "w:m2", "2"]),
    (0, &["MSETNX", "w:m3", "3", "w:m4", "4"]),
    (0, &["SET", "w:n", "10"]),
    (0, &["INCR", "w:n"]),
    (0, &["INCRBY", "w:n", "5"]),
    (0, &["DECR", "w:n"]),
    (0, &["DECRBY", "w:n", "3"]),
    (0, &["INCRBYFLOAT", "w:f", "1.5"]),
    (0, &["INCRBYFLOAT", "w:f", "0.25"]),
    (0, &["INCR", "str:int"]),
    (0, &["SET", "w:big", BIG]),
    (0, &["APPEND", "w:big", "tail"]),
    (0, &["SETBIT", "w:bits:a", "7", "1"]),
    (0, &["SETBIT", "w:bits:b", "3", "1"]),
    (0, &["BITOP", "OR", "w:bits:or", "w:bits:a", "w:bits:b"]),
    (0, &["PFADD", "w:hll:a", "x", "y", "z"]),
    (0, &["PFADD", "w:hll:b", "z", "w"]),
    (0, &["PFMERGE", "w:hll:ab", "w:hll:a", "w:hll:b"]),
    (
        0,
        &[
            "GEOADD",
            "w:geo",
            "13.361389",
            "38.115556",
            "Palermo",
            "15.087269",
            "37.502669",
            "Catania",
        ],
    ),
    // Expiry.
    (0, &["EXPIRE", "w:str", "3600"]),
    (0, &["PEXPIRE", "w:m1", "3600000"]),
    (0, &["EXPIREAT", "w:m2", "4102444800"]),
    (0, &["PEXPIREAT", "w:m3", "4102444800000"]),
    (0, &["PERSIST", "w:ex"]),
    // Lists.
    (0, &["RPUSH", "w:l1", "a", "b", "c", "d", "e", "f"]),
    (0, &["LPUSH", "w:l1", "z"]),
    (0, &["LPUSHX", "w:l1", "y"]),
    (0, &["RPUSHX", "w:l1", "g"]),
    (0, &["LPUSHX", "w:absent", "never"]),
    (0, &["LINSERT", "w:l1", "BEFORE", "c", "bb"]),
    (0, &["LSET", "w:l1", "0", "first"]),
    (0, &["LREM", "w:l1", "1", "d"]),
    (0, &["LTRIM", "w:l1", "0", "6"]),
    (0, &["LPOP", "w:l1"]),
    (0, &["RPOP", "w:l1"]),
    (0, &["RPUSH", "w:l2", "1", "2", "3", "4", "5"]),
    (0, &["RPOPLPUSH", "w:l2", "w:l3"]),
    (0, &["BLPOP", "w:l2", "1"]),
    (0, &["BRPOP", "w:l2", "1"]),
    (0, &["BRPOPLPUSH", "w:l2", "w:l3", "1"]),
    (0, &["LPUSH", "list:small", "from-the-stream"]),
    (0, &["RPOP", "list:big"]),
    // Hashes.
    (0, &["HSET", "w:h", "a", "1", "b", "2", "c", "3"]),
    (0, &["HMSET", "w:h", "d", "4", "e", "5"]),
    (0, &["HSETNX", "w:h", "f", "6"]),
    (0, &["HSETNX", "w:h", "a", "9"]),
    (0, &["HINCRBY", "w:h", "a", "10"]),
    (0, &["HINCRBYFLOAT", "w:h", "b", "0.5"]),
    (0, &["HDEL", "w:h", "c"]),
    (0, &["HSET", "hash:listpack", "added", "x"]),
    (0, &["HDEL", "hash:big", "f1"]),
    // Sets.
    (0, &["SADD", "w:s1", "1", "2", "3", "4", "x"]),
    (0, &["SADD", "w:s2", "3", "4", "5", "y", "z"]),
    (0, &["SREM", "w:s1", "x"]),
    (0, &["SMOVE", "w:s1", "w:s2", "1"]),
    (0, &["SPOP", "w:s2"]),
    (0, &["SPOP", "w:s2", "2"]),
    (0, &["SINTERSTORE", "w:si", "w:s1", "w:s2"]),
    (0, &["SUNIONSTORE", "w:su", "w:s1", "w:s2"]),
    (0, &["SDIFFSTORE", "w:sd", "w:s1", "w:s2"]),
    (0, &["SADD", "set:intset", "7"]),
    // Sorted sets.
    (
        0,
        &[
            "ZADD", "w:z1", "1", "a", "2", "b", "3", "c", "4", "d", "5", "e", "6", "f",
        ],
    ),
    (0, &["ZINCRBY", "w:z1", "2.5", "a"]),
    (0, &["ZREM", "w:z1", "f"]),
    (0, &["ZADD", "w:z2", "1", "a", "1", "x"]),
    (
        0,
        &[
            "ZUNIONSTORE",
            "w:zu",
            "2",
            "w:z1",
            "w:z2",
            "WEIGHTS",
            "1",
            "2",
        ],
    ),
    (
        0,
        &[
            "ZINTERSTORE",
            "w:zi",
            "2",
            "w:z1",
            "w:z2",
            "AGGREGATE",
            "MAX",
        ],
    ),
    (
        0,
        &[
            "ZADD", "w:zlex", "0", "a", "0", "b", "0", "c", "0", "d", "0", "e",
        ],
    ),
    (0, &["ZREMRANGEBYLEX", "w:zlex", "[b", "[c"]),
    (0, &["ZREMRANGEBYRANK", "w:z1", "0", "0"]),
    (0, &["ZREMRANGEBYSCORE", "w:z1", "4", "4.5"]),
    (0, &["ZINCRBY", "zset:skiplist", "0.5", "m7"]),
    // Keys.
    (0, &["RENAME", "w:m4", "w:renamed"]),
    (0, &["RENAMENX", "w:renamed", "w:renamed2"]),
    (0, &["DEL", "w:nx"]),
    (0, &["UNLINK", "w:px"]),
    (0, &["MOVE", "w:renamed2", "3"]),
    (0, &["RESTORE", "w:restored", "0", "$DUMP:w:h"]),
    (0, &["RESTORE", "w:restored-ttl", "3600000", "$DUMP:w:z1"]),
    (0, &["PUBLISH", "w:channel", "message"]),
    // Scripts, functions, transactions.
    (
        0,
        &[
            "EVAL",
            "redis.call('SET', KEYS[1], ARGV[1]) return redis.call('INCR', KEYS[2])",
            "2",
            "w:ev1",
            "w:ev2",
            "val",
        ],
    ),
    (0, &["EVALSHA", SHA, "1", "w:ev3"]),
    (0, &["MULTI"]),
    (0, &["SET", "w:tx1", "1"]),
    (0, &["INCR", "w:tx2"]),
    (0, &["LPUSH", "w:txl", "a"]),
    (0, &["EXEC"]),
    (0, &["FUNCTION", "LOAD", WORKLOAD_LIBRARY]),
    (0, &["FCALL", "w_set_incr", "2", "w:fc1", "w:fc2", "val"]),
    (0, &["FCALL", "ferry_hset", "1", "w:fh", "field", "value"]),
    // Streams.
    (0, &["XADD", "w:stream", "1-1", "a", "1"]),
    (0, &["XADD", "w:stream", "2-1", "b", "2"]),
    (0, &["XADD", "w:stream", "3-1", "c", "3"]),
    (0, &["XGROUP", "CREATE", "w:stream", "wg", "0"]),
    (
        0,
        &[
            "XREADGROUP",
            "GROUP",
            "wg",
            "alice",
            "COUNT",
            "2",
            "STREAMS",
            "w:stream",
            ">",
        ],
    ),
    (0, &["XACK", "w:stream", "wg", "1-1"]),
    (
        3,
        &[
            "XREADGROUP",
            "GROUP",
            "g1",
            "dave",
            "COUNT",
            "2",
            "STREAMS",
            "stream:groups",
            ">",
        ],
    ),
    (3, &["XACK", "stream:groups", "g1", "1-0"]),
    // Other dbs.
    (3, &["SET", "w:db3", "x"]),
    (3, &["INCR", "w:renamed2"]),
    (4, &["SET", "w:db4", "y"]),
    (4, &["SWAPDB", "3", "4"]),
    (3, &["RPUSH", "w:after-swap", "a"]),
    (15, &["HSET", "w:db15", "f", "v"]),
    // A transaction that changes db half way.
    (15, &["MULTI"]),
    (15, &["SET", "w:tx15", "a"]),
    (15, &["SELECT", "2"]),
    (2, &["SET", "w:tx2", "b"]),
    (2, &["EXEC"]),
    (2, &["SET", "w:db2", "c"]),
    (0, &["SET", "w:back-in-0", "d"]),
];

/// Runs the workload on its own connection to the source; returns the
/// uppercase names of every command sent (`SELECT`s included).
async fn run_workload(mut client: Client) -> BTreeSet<String> {
    let mut issued = BTreeSet::new();
    let sha = text(&call(&mut client, &["SCRIPT", "LOAD", EVALSHA_SCRIPT]).await);
    let mut db = 0;
    for (step_db, args) in WORKLOAD {
        if *step_db != db {
            call(&mut client, &["SELECT", &step_db.to_string()]).await;
            issued.insert("SELECT".to_string());
            db = *step_db;
        }
        let mut resolved: Vec<Bytes> = Vec::with_capacity(args.len());
        for arg in *args {
            if *arg == SHA {
                resolved.push(Bytes::from(sha.clone()));
            } else if *arg == BIG {
                resolved.push(Bytes::from(incompressible(BIG_VALUE_LEN)));
            } else if let Some(key) = arg.strip_prefix(DUMP_OF) {
                let dump = call(&mut client, &["DUMP", key]).await;
                resolved.push(dump.as_bytes().cloned().expect("DUMP of an existing key"));
            } else {
                resolved.push(Bytes::copy_from_slice(arg.as_bytes()));
            }
        }
        call(&mut client, &resolved[..]).await;
        issued.insert(args[0].to_ascii_uppercase());
        if args[0].eq_ignore_ascii_case("SELECT") {
            db = args[1].parse().expect("SELECT index");
        }
    }
    // A key that expires on the source: its DEL comes down the stream.
    call(&mut client, &["SELECT", "2"]).await;
    call(&mut client, &["SET", "w:short", "v", "PX", "50"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Expired by now; touching it makes sure the DEL was propagated.
    let exists = call(&mut client, &["EXISTS", "w:short"]).await;
    assert_eq!(exists, Frame::Integer(0), "w:short should have expired");
    issued
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_of_every_seed_command_converges() {
    let started = Instant::now();
    let mut args = vec![
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
    ];
    args.extend_from_slice(SOURCE_ENCODING_CONFIG);
    let source = RedisServer::start(&args);
    let mut admin = connect(&source).await;
    fill_source(&mut admin, false).await;
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &source.port.to_string()]);
    let target_server = RedisServer::start(&[]);
    let mut target = Target::connect(&target_server).await;
    let mut checker = connect(&target_server).await;
    assert_empty(&mut checker).await;

    let sync = full_sync(&source, &mut target, 1024 * 1024, DEFAULT_CHUNK).await;
    let mut session = sync.source;
    let before = assert_converged(
        &mut admin,
        &mut checker,
        "after the full sync",
        GroupCounters::Compare,
    )
    .await;

    // The workload runs while the stream is read and applied.
    let mut workload = tokio::spawn(run_workload(connect(&source).await));
    let mut seen = Vec::new();
    let issued = loop {
        tokio::select! {
            done = &mut workload => break done.expect("workload task"),
            event = session.next_event() => {
                let event = event.unwrap_or_else(|e| panic!("replication client: {e}"));
                apply_event(event, &mut target, &mut seen).await;
            }
        }
    };
    catch_up(&mut session, &mut admin, &mut target, &mut seen).await;

    let missing: Vec<&str> = SEED_SYNC_COMMANDS
        .iter()
        .copied()
        .filter(|name| !issued.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "the workload lacks seed commands {missing:?}"
    );
    // The stream carried the shapes this test is about.
    assert!(seen.iter().any(|e| e.transaction), "no transaction entry");
    assert!(
        seen.iter().any(|e| e.db == 2
            && e.commands
                .iter()
                .any(|c| c.is("DEL") && c.args[1] == "w:short")),
        "no DEL of the expired key"
    );
    assert!(
        seen.iter()
            .any(|e| e.transaction && e.commands.iter().any(|c| c.is("SELECT"))),
        "no transaction switching db"
    );
    let after = assert_converged(
        &mut admin,
        &mut checker,
        "target vs source after the stream",
        GroupCounters::Ignore,
    )
    .await;
    // Against a real replica of the source, everything matches.
    wait_for_replica(&mut admin, &replica).await;
    let mut replica_client = connect(&replica).await;
    assert_converged(
        &mut replica_client,
        &mut checker,
        "target vs a real replica after the stream",
        GroupCounters::Compare,
    )
    .await;
    assert_ne!(after.digest, before.digest, "the workload changed nothing");
    eprintln!(
        "{} entries applied, {} commands issued; {:?} in all",
        seen.len(),
        WORKLOAD.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 3. Resume from a saved position.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_disconnect_continues_without_full_sync() {
    let started = Instant::now();
    let mut args = vec!["--repl-diskless-sync", "no"];
    args.extend_from_slice(SOURCE_ENCODING_CONFIG);
    let source = RedisServer::start(&args);
    let mut admin = connect(&source).await;
    fill_source(&mut admin, false).await;
    let target_server = RedisServer::start(&[]);
    let mut target = Target::connect(&target_server).await;
    let mut checker = connect(&target_server).await;

    let sync = full_sync(&source, &mut target, 0, DEFAULT_CHUNK).await;
    let mut session = sync.source;
    let mut seen = Vec::new();

    // Some entries before the disconnect, the last ones in db 5.
    let mut writer = connect(&source).await;
    call(&mut writer, &["SET", "r:before", "1"]).await;
    call(&mut writer, &["SELECT", "5"]).await;
    for _ in 0..10 {
        call(&mut writer, &["INCR", "r:counter"]).await;
    }
    catch_up(&mut session, &mut admin, &mut target, &mut seen).await;
    assert!(
        seen.len() >= 11,
        "{} entries before the disconnect",
        seen.len()
    );
    assert_converged(
        &mut admin,
        &mut checker,
        "before the disconnect",
        GroupCounters::Compare,
    )
    .await;
    let saved = session.position();
    assert_eq!(saved.db, 5, "the saved position keeps the db");
    drop(session);

    let full_before = info_u64(&mut admin, "sync_full").await;
    let partial_before = info_u64(&mut admin, "sync_partial_ok").await;
    // Writes while disconnected, first in db 5 (no SELECT needed on the
    // source's side), then in db 0.
    let incrs: Vec<Command> = (0..300).map(|_| cmd(&["INCR", "r:counter"])).collect();
    pipeline(&mut writer, &incrs).await;
    call(&mut writer, &["LPUSH", "r:list", "a", "b", "c"]).await;
    call(&mut writer, &["MULTI"]).await;
    call(&mut writer, &["INCR", "r:counter"]).await;
    call(&mut writer, &["LPUSH", "r:list", "d"]).await;
    call(&mut writer, &["EXEC"]).await;
    call(&mut writer, &["SELECT", "0"]).await;
    call(&mut writer, &["XADD", "stream:resumed", "*", "f", "v"]).await;
    let incrs: Vec<Command> = (0..100).map(|_| cmd(&["INCR", "r:counter0"])).collect();
    pipeline(&mut writer, &incrs).await;

    let mut session = PsyncSource::connect(&replica_config(&source), Some(saved.clone()))
        .await
        .unwrap_or_else(|e| panic!("PSYNC from {saved:?}: {e}"));
    let first = tokio::time::timeout(EVENT_WAIT, session.next_event())
        .await
        .expect("first event in time")
        .expect("first event");
    assert_eq!(
        first,
        ReplEvent::Continue {
            replid: saved.replid.clone(),
            offset: saved.offset,
            db: 5
        }
    );
    let resumed_from = seen.len();
    catch_up(&mut session, &mut admin, &mut target, &mut seen).await;
    let resumed = &seen[resumed_from..];
    // 300 + 100 INCRs, LPUSH, XADD and the transaction: nothing else.
    assert_eq!(resumed.len(), 403, "entries after the resume");
    assert_eq!(
        resumed[0].db, 5,
        "first entry after the resume: {:?}",
        resumed[0]
    );
    assert!(
        resumed.windows(2).all(|w| w[0].offset < w[1].offset) && resumed[0].offset > saved.offset,
        "offsets after the resume must grow from the saved one"
    );

    for (db, key, want) in [(5, "r:counter", 311), (0, "r:counter0", 100)] {
        call(&mut admin, &["SELECT", &db.to_string()]).await;
        call(&mut checker, &["SELECT", &db.to_string()]).await;
        let on_source = integer(&call(&mut admin, &["GET", key]).await);
        let on_target = integer(&call(&mut checker, &["GET", key]).await);
        assert_eq!(on_source, want, "{key} on the source");
        assert_eq!(on_target, on_source, "{key}: applied twice or skipped");
    }
    call(&mut admin, &["SELECT", "0"]).await;
    call(&mut checker, &["SELECT", "0"]).await;
    assert_converged(
        &mut admin,
        &mut checker,
        "after the resume",
        GroupCounters::Compare,
    )
    .await;
    assert_eq!(
        info_u64(&mut admin, "sync_full").await,
        full_before,
        "the resume must not be a full sync"
    );
    assert_eq!(
        info_u64(&mut admin, "sync_partial_ok").await,
        partial_before + 1,
        "the resume is one partial sync"
    );
    eprintln!("resume test in {:?}", started.elapsed());
}
