//! Test support shared by the end-to-end tests: a source data set holding
//! every Redis 7.0 type × encoding ([`fill_source`]), a command workload
//! covering every command of the seeds' lists ([`WORKLOAD`],
//! [`run_workload`]), and a key-by-key comparison of two servers
//! ([`server_state`], [`differences`], [`wait_converged`]).
//!
//! In: a source `RedisServer` (started with [`SOURCE_ENCODING_CONFIG`] so
//! that small collections take their big encodings) and a target. Out: the
//! data written, and the differences between the two as readable lines.
//!
//! The comparison looks at what a replica must reproduce, key by key, in
//! every db: `TYPE`, `DEBUG DIGEST-VALUE` (the value, whatever its
//! encoding), whether the key has a TTL and when it expires (the source's
//! deadline plus ferry's default expire grace on the target, within a
//! tolerance: ferry sends absolute expiry times, but a relative one may be
//! re-based on the way), the stream state the digest does not see
//! ([`stream_state`]), and the function libraries. Keys under ferry's
//! internal prefix (`__ferry`) are kept apart ([`ServerState::internal`]).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry::apply::expire::DEFAULT_EXPIRE_GRACE;
use ferry::record::INTERNAL_PREFIX;
use ferry::redis::client::{Client, ClientError};
use ferry::redis::command::Command;
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;

use super::RedisServer;

/// Databases of a default Redis.
pub const DB_COUNT: u32 = 16;

/// Source settings that make collections change encoding early, and that
/// LZF-compress the inner nodes of lists in the RDB.
pub const SOURCE_ENCODING_CONFIG: &[&str] = &[
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
pub const BIG_LIST_LEN: usize = 300_000;
pub const BIG_HASH_LEN: usize = 200_000;

/// The function library of the data set.
pub const DATASET_LIBRARY: &str = "#!lua name=ferrylib\n\
    redis.register_function('ferry_hset', function(keys, args) \
    return redis.call('HSET', keys[1], args[1], args[2]) end)";

// ---------------------------------------------------------------------------
// Plumbing: connections, calls, display.

pub async fn connect(server: &RedisServer) -> Client {
    connect_url(&server.url()).await
}

/// A client of the server at `url` (`redis://host:port`).
pub async fn connect_url(url: &str) -> Client {
    let parsed = RedisUrl::parse(url).unwrap_or_else(|e| panic!("url {url}: {e}"));
    Client::connect(&parsed)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// One command that must succeed.
pub async fn call<T: AsRef<[u8]>>(client: &mut Client, args: &[T]) -> Frame {
    client
        .call(args)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", show_args(args)))
}

pub fn cmd<T: AsRef<[u8]>>(args: &[T]) -> Command {
    Command::from_parts(args)
}

/// Sends `cmds` pipelined in windows; every reply must be a success.
pub async fn pipeline(client: &mut Client, cmds: &[Command]) {
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
pub fn show_args<T: AsRef<[u8]>>(args: &[T]) -> String {
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

pub fn show_frame(frame: &Frame) -> String {
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
pub fn find_error(frame: &Frame) -> Option<String> {
    match frame {
        Frame::Array(items) => items.iter().find_map(find_error),
        other => other.error_message(),
    }
}

pub fn text(frame: &Frame) -> String {
    frame
        .as_bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_else(|| panic!("expected a string reply, got {}", show_frame(frame)))
}

pub fn integer(frame: &Frame) -> i64 {
    frame
        .as_integer()
        .unwrap_or_else(|| panic!("expected an integer reply, got {}", show_frame(frame)))
}

pub async fn info_u64(client: &mut Client, field: &str) -> u64 {
    let info = client.info("everything").await.expect("INFO");
    let value = info
        .get(field)
        .unwrap_or_else(|| panic!("INFO has no {field}"));
    value
        .parse()
        .unwrap_or_else(|_| panic!("INFO {field} is not a number: {value:?}"))
}

// ---------------------------------------------------------------------------
// The source data set: every type × encoding Redis 7.0 writes.

/// `(db, key, OBJECT ENCODING)` of the data set: checked on the source, so
/// that a change of Redis defaults cannot quietly drop an encoding.
pub const ENCODINGS: &[(u32, &str, &str)] = &[
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
pub fn incompressible(len: usize) -> String {
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
pub async fn fill_source(client: &mut Client, big: bool) {
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
// Stream state the digests do not cover.

/// The value of `name` in a flat `[name, value, ...]` reply.
pub fn field<'a>(reply: &'a Frame, name: &str) -> &'a Frame {
    let Frame::Array(items) = reply else {
        panic!("expected a field list, got {}", show_frame(reply));
    };
    items
        .chunks(2)
        .find(|pair| pair[0].as_bytes().is_some_and(|b| b == name.as_bytes()))
        .and_then(|pair| pair.get(1))
        .unwrap_or_else(|| panic!("no {name} in {}", show_frame(reply)))
}

pub fn array(frame: &Frame) -> &[Frame] {
    match frame {
        Frame::Array(items) => items,
        other => panic!("expected an array, got {}", show_frame(other)),
    }
}

/// What `DEBUG DIGEST` does not cover of a stream (it hashes the entries
/// only): metadata, groups, consumers and PELs, without times that depend
/// on when the state was written (idle, seen and delivery times).
pub async fn stream_state(client: &mut Client, key: &[u8]) -> Vec<String> {
    try_stream_state(client, key)
        .await
        .unwrap_or_else(|error| panic!("stream {:?}: {error}", String::from_utf8_lossy(key)))
}

/// [`stream_state`], or the error reply if the key is gone or no longer a
/// stream (a target read while it is being written).
pub async fn try_stream_state(client: &mut Client, key: &[u8]) -> Result<Vec<String>, String> {
    async fn ask(client: &mut Client, args: &[&[u8]]) -> Result<Frame, String> {
        // The client returns an error reply as `ClientError::Server`: that
        // is the "gone or replaced" case, not a failure of the test.
        let reply = match client.call(args).await {
            Ok(reply) => reply,
            Err(ClientError::Server { message, .. }) => {
                return Err(format!("{}: {message}", show_args(args)))
            }
            Err(error) => panic!("{}: {error}", show_args(args)),
        };
        match reply.error_message() {
            Some(error) => Err(format!("{}: {error}", show_args(args))),
            None => Ok(reply),
        }
    }
    let mut state = Vec::new();
    let info = ask(client, &[&b"XINFO"[..], b"STREAM", key]).await?;
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
    let groups = ask(client, &[&b"XINFO"[..], b"GROUPS", key]).await?;
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
        let consumers = ask(client, &[&b"XINFO"[..], b"CONSUMERS", key, name.as_bytes()]).await?;
        for consumer in array(&consumers) {
            state.push(format!(
                "group {name} consumer {} pending={}",
                text(field(consumer, "name")),
                show_frame(field(consumer, "pending"))
            ));
        }
        let pel = ask(
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
        .await?;
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
    Ok(state)
}

// ---------------------------------------------------------------------------
// The command workload: every seed command.

/// SHA1 placeholder in [`WORKLOAD`]: replaced by the SHA1 of
/// [`EVALSHA_SCRIPT`], loaded before the workload runs.
pub const SHA: &str = "$SHA";
/// Prefix of a [`WORKLOAD`] argument replaced by the `DUMP` of the key that
/// follows it, taken when the step runs.
pub const DUMP_OF: &str = "$DUMP:";
/// Placeholder in [`WORKLOAD`] for a value of [`BIG_VALUE_LEN`] bytes: one
/// command of the stream far larger than a socket read.
pub const BIG: &str = "$BIG";
pub const BIG_VALUE_LEN: usize = 3_000_000;

pub const EVALSHA_SCRIPT: &str = "return redis.call('SET', KEYS[1], 'by-evalsha')";

pub const WORKLOAD_LIBRARY: &str = "#!lua name=wlib\n\
    redis.register_function('w_set_incr', function(keys, args) \
    redis.call('SET', keys[1], args[1]) return redis.call('INCR', keys[2]) end)";

/// `(db, command)`, in order, on one connection (`SELECT` is sent when the
/// db changes; inside `MULTI` the db is the one the command runs in). It
/// touches keys of the data set as well as new ones, and must cover
/// [`SEED_SYNC_COMMANDS`] (checked).
pub const WORKLOAD: &[(u32, &[&str])] = &[
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
pub async fn run_workload(mut client: Client) -> BTreeSet<String> {
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

// ---------------------------------------------------------------------------
// Key-by-key comparison of two servers.

/// Largest difference between the expiry times of a key on two servers.
pub const TTL_TOLERANCE_MS: i64 = 3_000;

/// How much later a key expires on a target ferry wrote than on its source:
/// the applier's default `expire-grace` (src/apply/expire.rs), which the
/// tests' syncs run with.
pub const EXPIRE_GRACE_MS: i64 = DEFAULT_EXPIRE_GRACE.as_millis() as i64;

/// What one data key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// `TYPE`.
    pub kind: String,
    /// `DEBUG DIGEST-VALUE`.
    pub digest: String,
    /// `PEXPIRETIME`: unix ms, or -1 for a key without a TTL.
    pub expire_at_ms: i64,
    /// Streams only: [`stream_state`] without the consumer groups'
    /// `entries-read` and `lag`, which Redis 7.0 does not replicate (it
    /// propagates `XREADGROUP` as `XCLAIM` without them, so its own replicas
    /// differ from their master there too).
    pub stream: Vec<String>,
}

/// Everything [`differences`] compares of one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerState {
    /// Every key not under the internal prefix, by `(db, key)`.
    pub keys: BTreeMap<(u32, Vec<u8>), KeyState>,
    /// Keys under the internal prefix (`__ferry…`), by `(db, key)`.
    pub internal: BTreeSet<(u32, Vec<u8>)>,
    /// `(library_name, library_code)`, sorted.
    pub functions: Vec<(String, String)>,
}

impl ServerState {
    /// Internal keys as `db:key` text, for assertions and messages.
    pub fn internal_names(&self) -> Vec<String> {
        self.internal
            .iter()
            .map(|(db, key)| format!("{db}:{}", String::from_utf8_lossy(key)))
            .collect()
    }

    /// Whether `key` exists in `db` (a data key).
    pub fn has(&self, db: u32, key: &str) -> bool {
        self.keys.contains_key(&(db, key.as_bytes().to_vec()))
    }
}

/// A key for messages: `db 3 "name"`.
fn show_key(db: u32, key: &[u8]) -> String {
    format!("db {db} {:?}", String::from_utf8_lossy(key))
}

/// Reads every key of every db of the server behind `client` (leaves it in
/// db 0). Keys that vanish while being read (expired, or deleted by a
/// writer) are left out.
pub async fn server_state(client: &mut Client) -> ServerState {
    let mut state = ServerState::default();
    for db in 0..DB_COUNT {
        call(client, &["SELECT", &db.to_string()]).await;
        let keys: Vec<Bytes> = array(&call(client, &["KEYS", "*"]).await)
            .iter()
            .map(|k| k.as_bytes().cloned().expect("KEYS returns strings"))
            .collect();
        let mut data_keys = Vec::new();
        for key in keys {
            if key.starts_with(INTERNAL_PREFIX) {
                state.internal.insert((db, key.to_vec()));
            } else {
                data_keys.push(key);
            }
        }
        let mut cmds = Vec::with_capacity(data_keys.len() * 3);
        for key in &data_keys {
            for name in ["TYPE", "PEXPIRETIME", "DEBUG"] {
                let mut args = vec![Bytes::from_static(name.as_bytes())];
                if name == "DEBUG" {
                    args.push(Bytes::from_static(b"DIGEST-VALUE"));
                }
                args.push(key.clone());
                cmds.push(Command::new(args));
            }
        }
        let replies = client.pipeline(&cmds).await.expect("pipeline");
        for (key, replies) in data_keys.iter().zip(replies.chunks(3)) {
            if let Some(error) = replies.iter().find_map(find_error) {
                panic!("reading {}: {error}", show_key(db, key));
            }
            let kind = text(&replies[0]);
            if kind == "none" {
                continue;
            }
            let digest = match &replies[2] {
                Frame::Array(items) if items.len() == 1 => text(&items[0]),
                other => text(other),
            };
            let stream = if kind == "stream" {
                match try_stream_state(client, key).await {
                    Ok(lines) => lines
                        .into_iter()
                        .filter(|line| !(line.contains(" entries-read=") || line.contains(" lag=")))
                        .collect(),
                    // Gone or replaced since TYPE: the next reading decides.
                    Err(error) => vec![format!("unreadable: {error}")],
                }
            } else {
                Vec::new()
            };
            state.keys.insert(
                (db, key.to_vec()),
                KeyState {
                    kind,
                    digest,
                    expire_at_ms: integer(&replies[1]),
                    stream,
                },
            );
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
    state.functions = functions;
    state
}

/// How `got` differs from `want`, one line per key (empty: equal). Internal
/// keys are not compared.
pub fn differences(want: &ServerState, got: &ServerState) -> Vec<String> {
    let mut out = Vec::new();
    for ((db, key), want_key) in &want.keys {
        let name = show_key(*db, key);
        let Some(got_key) = got.keys.get(&(*db, key.clone())) else {
            out.push(format!("{name}: missing ({})", want_key.kind));
            continue;
        };
        if got_key.kind != want_key.kind {
            out.push(format!(
                "{name}: type {} instead of {}",
                got_key.kind, want_key.kind
            ));
            continue;
        }
        if got_key.digest != want_key.digest {
            out.push(format!(
                "{name}: DEBUG DIGEST-VALUE {} instead of {}",
                got_key.digest, want_key.digest
            ));
        }
        match (want_key.expire_at_ms, got_key.expire_at_ms) {
            (-1, -1) => {}
            (-1, at) => out.push(format!(
                "{name}: has a TTL (expires at {at}) but should not"
            )),
            (at, -1) => out.push(format!("{name}: has no TTL but should expire at {at}")),
            (want_at, got_at)
                if (want_at.saturating_add(EXPIRE_GRACE_MS) - got_at).abs() > TTL_TOLERANCE_MS =>
            {
                out.push(format!(
                    "{name}: expires at {got_at} instead of {want_at} plus the expire grace \
                     {EXPIRE_GRACE_MS} (ms since the epoch)"
                ))
            }
            _ => {}
        }
        if got_key.stream != want_key.stream {
            out.push(format!(
                "{name}: stream state {:?} instead of {:?}",
                got_key.stream, want_key.stream
            ));
        }
    }
    for (db, key) in got.keys.keys() {
        if !want.keys.contains_key(&(*db, key.clone())) {
            out.push(format!("{}: should not exist", show_key(*db, key)));
        }
    }
    if got.functions != want.functions {
        let names = |state: &ServerState| -> Vec<String> {
            state
                .functions
                .iter()
                .map(|(name, _)| name.clone())
                .collect()
        };
        out.push(format!(
            "function libraries {:?} instead of {:?} (or their code differs)",
            names(got),
            names(want)
        ));
    }
    out
}

/// Polls both servers until the target equals the source (see
/// [`differences`]); returns the source's state. After `timeout`, panics
/// with the remaining differences and `context()` (e.g. ferry's log tail).
pub async fn wait_converged(
    source_url: &str,
    target_url: &str,
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
) -> ServerState {
    let mut source_client = connect_url(source_url).await;
    let mut target_client = connect_url(target_url).await;
    let deadline = Instant::now() + timeout;
    loop {
        let want = server_state(&mut source_client).await;
        let got = server_state(&mut target_client).await;
        let diffs = differences(&want, &got);
        if diffs.is_empty() {
            return want;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: the target did not converge within {timeout:?}; {} differences, first ones:\n  {}\n{}",
                diffs.len(),
                diffs.iter().take(20).cloned().collect::<Vec<_>>().join("\n  "),
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`differences`] between the servers at `source_url` and `target_url`
/// right now, for blocking tests (it runs its own small runtime; not to be
/// called from inside one).
pub fn differences_now(source_url: &str, target_url: &str) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("comparison runtime");
    runtime.block_on(async {
        let want = server_state(&mut connect_url(source_url).await).await;
        let got = server_state(&mut connect_url(target_url).await).await;
        differences(&want, &got)
    })
}
