//! `rdb load` against real redis-server 7.0 processes: a source filled with
//! every type × encoding is saved, its dump.rdb loaded into empty servers
//! (with RESTORE, and with rebuild commands only), and the data sets
//! compared (`DEBUG DIGEST`, which covers values and key expiries, plus
//! stream metadata, consumer groups, PELs, TTLs and functions). Dumps in
//! the formats of newer Redis versions (built byte by byte) are loaded into
//! 7.0 via rebuild commands.

mod common;
mod rdb_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::RedisServer;
use ferry::cli::rdb::{load, LoadConfig, LoadReport};
use ferry::redis::client::Client;
use ferry::redis::command::Command;
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;
use rdb_support::writer::*;

async fn connect(server: &RedisServer) -> Client {
    Client::connect(&RedisUrl::parse(&server.url()).unwrap())
        .await
        .unwrap()
}

async fn call(client: &mut Client, args: &[&[u8]]) -> Frame {
    client
        .call(args.iter().copied())
        .await
        .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(args[0])))
}

async fn call_s(client: &mut Client, args: &[&str]) -> Frame {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    call(client, &args).await
}

/// Sends commands pipelined; every reply must be a success.
async fn pipeline(client: &mut Client, cmds: Vec<Command>) {
    for chunk in cmds.chunks(500) {
        let replies = client.pipeline(chunk).await.unwrap();
        for (cmd, reply) in chunk.iter().zip(replies) {
            assert!(
                reply.error_message().is_none(),
                "{:?}: {reply:?}",
                String::from_utf8_lossy(cmd.name())
            );
        }
    }
}

fn cmd(parts: &[&str]) -> Command {
    Command::from_parts(parts.iter().map(|p| p.as_bytes()))
}

/// Fills db 0, 1 and 5 of `source` with every type and encoding Redis 7.0
/// writes, and returns the names of keys with a TTL (db 0).
async fn fill_source(client: &mut Client) -> Vec<&'static str> {
    let mut cmds = vec![
        // Strings: int, embstr, raw, big (over the 1 MiB RESTORE limit), binary.
        cmd(&["SET", "str:int", "12345"]),
        cmd(&["SET", "str:neg", "-9223372036854775808"]),
        cmd(&["SET", "str:embstr", "hello"]),
        cmd(&["SET", "str:raw", &"r".repeat(200)]),
        cmd(&["SET", "str:big", &"0123456789abcdef".repeat(80_000)]),
        cmd(&["SET", "str:empty", ""]),
        // Lists: one listpack node, several nodes.
        cmd(&["RPUSH", "list:small", "a", "b", "1", "-2", "c"]),
        // Sets: intset, hashtable (strings), hashtable (too many ints).
        cmd(&["SADD", "set:intset", "1", "2", "3", "-100", "65536"]),
        cmd(&["SADD", "set:hashtable", "alpha", "beta", "gamma"]),
        // Zsets: listpack and skiplist, odd scores.
        cmd(&[
            "ZADD", "zset:listpack", "1.5", "a", "-inf", "b", "inf", "c", "0", "d", "-0", "e",
            "3.14159265358979", "f", "1e300", "g",
        ]),
        // Hashes: listpack; hashtable from a long value.
        cmd(&["HSET", "hash:listpack", "f1", "v1", "f2", "2", "f3", "v3"]),
        cmd(&["HSET", "hash:longvalue", "f", &"x".repeat(100)]),
        // Streams.
        cmd(&["XGROUP", "CREATE", "stream:mk", "g", "0", "MKSTREAM"]),
        cmd(&["XADD", "stream:emptied", "10-1", "f", "v"]),
        cmd(&["XDEL", "stream:emptied", "10-1"]),
        // Expiring keys of several types.
        cmd(&["SET", "ttl:str", "v", "PX", "3600000"]),
        cmd(&["RPUSH", "ttl:list", "a", "b"]),
        cmd(&["PEXPIRE", "ttl:list", "7200000"]),
        cmd(&["HSET", "ttl:hash", "a", "b"]),
        cmd(&["PEXPIRE", "ttl:hash", "7200000"]),
        cmd(&["ZADD", "ttl:zset", "1", "a"]),
        cmd(&["PEXPIRE", "ttl:zset", "7200000"]),
        cmd(&["SADD", "ttl:set", "1"]),
        cmd(&["PEXPIRE", "ttl:set", "7200000"]),
        // Functions.
        cmd(&[
            "FUNCTION",
            "LOAD",
            "#!lua name=ferrylib\nredis.register_function('ferry_echo', function(keys, args) return args[1] end)",
        ]),
        // Other dbs.
        cmd(&["SELECT", "1"]),
        cmd(&["SET", "db1:key", "one"]),
        cmd(&["RPUSH", "db1:list", "x", "y"]),
        cmd(&["SELECT", "5"]),
        cmd(&["SADD", "db5:set", "p", "q"]),
        cmd(&["SET", "db5:ttl", "v", "PX", "5000000"]),
        cmd(&["SELECT", "0"]),
    ];
    // Binary key and value.
    cmds.push(Command::from_parts([
        b"SET".as_ref(),
        b"bin:\xff\x00key",
        b"\x00\x01\xfe\xffvalue",
    ]));
    cmds.push(Command::from_parts([
        b"HSET".as_ref(),
        b"bin:hash",
        b"\xc3\x28",
        b"\x80",
    ]));
    // Big list: 200k elements in many quicklist nodes.
    for start in (0..200_000).step_by(1000) {
        let mut args = vec!["RPUSH".to_string(), "list:big".to_string()];
        args.extend((start..start + 1000).map(|i| format!("element-{i:07}")));
        cmds.push(Command::from_parts(args));
    }
    // Big hash: 100k fields (hashtable).
    for start in (0..100_000).step_by(1000) {
        let mut args = vec!["HSET".to_string(), "hash:big".to_string()];
        for i in start..start + 1000 {
            args.push(format!("field-{i:06}"));
            args.push(format!("value-{i}"));
        }
        cmds.push(Command::from_parts(args));
    }
    // Set over set-max-intset-entries (hashtable of ints); zset skiplist.
    let mut args = vec!["SADD".to_string(), "set:manyints".to_string()];
    args.extend((0..600).map(|i| (i * 7).to_string()));
    cmds.push(Command::from_parts(args));
    let mut args = vec!["ZADD".to_string(), "zset:skiplist".to_string()];
    for i in 0..300 {
        args.push(format!("{}", f64::from(i) / 3.0));
        args.push(format!("m{i}"));
    }
    cmds.push(Command::from_parts(args));
    // A list with many nodes that still fits RESTORE; a long hash in listpack.
    let mut args = vec!["RPUSH".to_string(), "list:nodes".to_string()];
    args.extend((0..3000).map(|i| format!("n{i}")));
    cmds.push(Command::from_parts(args));
    // Stream with entries, deletions, groups, consumers and a PEL.
    for i in 1..=60 {
        let id = format!("{}-{}", 1_000 + i, i % 3);
        let value = format!("value{i}");
        cmds.push(cmd(&[
            "XADD",
            "stream:full",
            &id,
            "field",
            &value,
            "n",
            "1",
        ]));
    }
    cmds.push(cmd(&["XDEL", "stream:full", "1005-2", "1060-0"]));
    cmds.push(cmd(&["XGROUP", "CREATE", "stream:full", "g1", "0"]));
    cmds.push(cmd(&["XGROUP", "CREATE", "stream:full", "g2", "$"]));
    cmds.push(cmd(&[
        "XGROUP",
        "CREATECONSUMER",
        "stream:full",
        "g1",
        "carol",
    ]));
    pipeline(client, cmds).await;
    // Deliveries: alice gets 10, bob 5; alice's first two are claimed again
    // by bob (delivery count 2); a few are acknowledged.
    call_s(
        client,
        &[
            "XREADGROUP",
            "GROUP",
            "g1",
            "alice",
            "COUNT",
            "10",
            "STREAMS",
            "stream:full",
            ">",
        ],
    )
    .await;
    call_s(
        client,
        &[
            "XREADGROUP",
            "GROUP",
            "g1",
            "bob",
            "COUNT",
            "5",
            "STREAMS",
            "stream:full",
            ">",
        ],
    )
    .await;
    call_s(
        client,
        &[
            "XCLAIM",
            "stream:full",
            "g1",
            "bob",
            "0",
            "1001-1",
            "1002-2",
        ],
    )
    .await;
    call_s(client, &["XACK", "stream:full", "g1", "1003-0", "1004-1"]).await;
    vec!["ttl:str", "ttl:list", "ttl:hash", "ttl:zset", "ttl:set"]
}

async fn digest(client: &mut Client) -> Frame {
    call_s(client, &["DEBUG", "DIGEST"]).await
}

/// Stream state that `DEBUG DIGEST` does not cover.
async fn stream_state(client: &mut Client, key: &str) -> Vec<Frame> {
    let mut state = Vec::new();
    let info = call_s(client, &["XINFO", "STREAM", key]).await;
    // XINFO STREAM is a flat [name, value, ...] list; keep the metadata.
    if let Frame::Array(items) = info {
        for pair in items.chunks(2) {
            let name = pair[0].as_bytes().map(|b| b.to_vec()).unwrap_or_default();
            if [
                b"length".as_ref(),
                b"last-generated-id",
                b"max-deleted-entry-id",
                b"entries-added",
                b"recorded-first-entry-id",
                b"groups",
            ]
            .contains(&name.as_slice())
            {
                state.push(pair[0].clone());
                state.push(pair[1].clone());
            }
        }
    }
    state.push(call_s(client, &["XINFO", "GROUPS", key]).await);
    if let Frame::Array(groups) = state.last().cloned().unwrap() {
        for group in groups {
            let Frame::Array(fields) = group else {
                continue;
            };
            let name = fields[1].as_bytes().unwrap().clone();
            let name = String::from_utf8(name.to_vec()).unwrap();
            // Consumers: name and pending count (idle times differ).
            if let Frame::Array(consumers) =
                call_s(client, &["XINFO", "CONSUMERS", key, &name]).await
            {
                for c in consumers {
                    let Frame::Array(f) = c else { continue };
                    state.push(f[1].clone());
                    state.push(f[3].clone());
                }
            }
            // PEL: id, consumer, delivery count (idle differs by the load time).
            if let Frame::Array(pel) =
                call_s(client, &["XPENDING", key, &name, "-", "+", "1000"]).await
            {
                for p in pel {
                    let Frame::Array(f) = p else { continue };
                    state.push(f[0].clone());
                    state.push(f[1].clone());
                    state.push(f[3].clone());
                }
            }
        }
    }
    state
}

async fn pexpiretimes(client: &mut Client, keys: &[&str]) -> Vec<i64> {
    let mut times = Vec::new();
    for key in keys {
        let t = call_s(client, &["PEXPIRETIME", key]).await;
        times.push(t.as_integer().unwrap());
    }
    times
}

fn config(rdb: &Path, target: &RedisServer) -> LoadConfig {
    LoadConfig::new(rdb.to_path_buf(), RedisUrl::parse(&target.url()).unwrap())
}

fn check_clean(report: &LoadReport) {
    assert!(
        report.is_success(),
        "load failed:\n{report}\n{:?}",
        report.parse_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_with_restore_and_with_rebuild() {
    let source = RedisServer::start(&[
        "--hash-max-listpack-entries",
        "16",
        "--hash-max-listpack-value",
        "64",
        "--list-max-listpack-size",
        "-1",
        "--set-max-intset-entries",
        "512",
        "--zset-max-listpack-entries",
        "64",
    ]);
    let mut src = connect(&source).await;
    let ttl_keys = fill_source(&mut src).await;
    // A key that is logically expired when saved: active expiry is off, so
    // it is still in the dump; loading must not bring it back.
    call_s(&mut src, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]).await;
    call_s(&mut src, &["SET", "gone", "v", "PX", "1"]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    call_s(&mut src, &["SAVE"]).await;
    // Touching it makes the source drop it too.
    assert_eq!(
        call_s(&mut src, &["EXISTS", "gone"]).await,
        Frame::Integer(0)
    );
    let rdb: PathBuf = source.dir.path().join("dump.rdb");
    let want_digest = digest(&mut src).await;
    assert_ne!(
        want_digest.as_bytes().unwrap().as_ref(),
        b"0000000000000000000000000000000000000000"
    );
    let want_stream = stream_state(&mut src, "stream:full").await;
    let want_emptied = stream_state(&mut src, "stream:emptied").await;
    let want_mk = stream_state(&mut src, "stream:mk").await;
    let want_ttls = pexpiretimes(&mut src, &ttl_keys).await;
    let want_functions = call_s(&mut src, &["FUNCTION", "LIST", "WITHCODE"]).await;
    let dbsize = call_s(&mut src, &["DBSIZE"]).await.as_integer().unwrap() as u64;
    // db 1 has 2 keys, db 5 has 2.
    let total_keys = dbsize + 4;

    // 1. Library call, RESTORE enabled (default 1 MiB limit).
    let target = RedisServer::start(&[]);
    let report = load(&config(&rdb, &target)).await.unwrap();
    check_clean(&report);
    let s = &report.stats;
    assert_eq!(s.expired_skipped, 1, "{report}");
    assert_eq!(s.keys_loaded(), total_keys, "{report}");
    // Over 1 MiB raw: the big string, list and hash are rebuilt.
    assert!(s.keys_rebuilt >= 3, "{report}");
    assert!(s.keys_restored > 20, "{report}");
    assert_eq!(s.functions, 1);
    assert_eq!(s.warnings, 0, "{report}");
    let mut tgt = connect(&target).await;
    assert_eq!(digest(&mut tgt).await, want_digest);
    assert_eq!(stream_state(&mut tgt, "stream:full").await, want_stream);
    assert_eq!(stream_state(&mut tgt, "stream:emptied").await, want_emptied);
    assert_eq!(stream_state(&mut tgt, "stream:mk").await, want_mk);
    assert_eq!(pexpiretimes(&mut tgt, &ttl_keys).await, want_ttls);
    assert_eq!(
        call_s(&mut tgt, &["FUNCTION", "LIST", "WITHCODE"]).await,
        want_functions
    );
    assert_eq!(
        call_s(&mut tgt, &["EXISTS", "gone"]).await,
        Frame::Integer(0)
    );

    // Loading again without --replace: every RESTORE hits BUSYKEY, and the
    // failures are reported, not hidden.
    let again = load(&config(&rdb, &target)).await.unwrap();
    assert!(!again.is_success());
    assert!(again.failures_total >= s.keys_restored, "{again}");
    assert!(again.failures[0].message.contains("BUSYKEY"), "{again}");
    // With --replace the data set ends up identical again.
    let mut cfg = config(&rdb, &target);
    cfg.replace = true;
    let replaced = load(&cfg).await.unwrap();
    check_clean(&replaced);
    assert_eq!(digest(&mut tgt).await, want_digest);

    // 2. The binary, RESTORE disabled: everything goes as rebuild commands,
    // in small chunks and a small pipeline window.
    let target2 = RedisServer::start(&[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["rdb", "load"])
        .arg(&rdb)
        .args(["--target", &target2.url(), "--restore-max-bytes", "0"])
        .args(["--pipeline", "64", "--chunk-items", "100"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains(&format!("keys: 0 restored, {total_keys} rebuilt")),
        "{stdout}"
    );
    assert!(stdout.contains("1 expired"), "{stdout}");
    let mut tgt2 = connect(&target2).await;
    assert_eq!(digest(&mut tgt2).await, want_digest);
    assert_eq!(stream_state(&mut tgt2, "stream:full").await, want_stream);
    assert_eq!(
        stream_state(&mut tgt2, "stream:emptied").await,
        want_emptied
    );
    assert_eq!(stream_state(&mut tgt2, "stream:mk").await, want_mk);
    assert_eq!(pexpiretimes(&mut tgt2, &ttl_keys).await, want_ttls);
    assert_eq!(
        call_s(&mut tgt2, &["FUNCTION", "LIST", "WITHCODE"]).await,
        want_functions
    );
    assert_eq!(
        call_s(&mut tgt2, &["LLEN", "list:big"]).await,
        Frame::Integer(200_000)
    );
    assert_eq!(
        call_s(&mut tgt2, &["HLEN", "hash:big"]).await,
        Frame::Integer(100_000)
    );
}

/// Writes a dump built by `build` (db 0 selected) to `dir/name`.
fn built(dir: &Path, name: &str, version: u32, build: impl FnOnce(&mut Dump)) -> PathBuf {
    let mut d = Dump::new(version);
    d.select_db(0);
    build(&mut d);
    let (data, _) = d.finish(Trailer::Checksum);
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

fn bulk_strings(frame: &Frame) -> Vec<String> {
    match frame {
        Frame::Array(items) => items
            .iter()
            .map(|f| String::from_utf8_lossy(f.as_bytes().unwrap()).into_owned())
            .collect(),
        other => panic!("not an array: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_formats_load_into_7_0_by_rebuild() {
    let target = RedisServer::start(&[]);
    let mut tgt = connect(&target).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();

    // RDB 11 set listpack (type 20, unknown to 7.0): rebuilt.
    let set_lp = built(dir, "set_lp.rdb", 11, |d| {
        d.set_listpack(
            "myset",
            &strs(&["1", "2", "3", "1.1", "1.2", "1.3", "a", "b", "c"]),
        );
    });
    let report = load(&config(&set_lp, &target)).await.unwrap();
    check_clean(&report);
    assert_eq!(
        (report.stats.keys_rebuilt, report.stats.keys_restored),
        (1, 0)
    );
    let mut members = bulk_strings(&call_s(&mut tgt, &["SMEMBERS", "myset"]).await);
    members.sort();
    assert_eq!(members, ["1", "1.1", "1.2", "1.3", "2", "3", "a", "b", "c"]);

    // RDB 12 hashes with field TTLs (types 22 to 25): fields kept, TTLs
    // dropped with a warning naming the key.
    for type_byte in [
        TYPE_HASH_METADATA_PRE_GA,
        TYPE_HASH_LISTPACK_EX_PRE_GA,
        TYPE_HASH_METADATA,
        TYPE_HASH_LISTPACK_EX,
    ] {
        let path = built(dir, &format!("hash_{type_byte}.rdb"), 12, |d| {
            d.hash_with_ttls(
                "myhash",
                type_byte,
                &[
                    ("field2", "value2", Some(70368744107663)),
                    ("field1", "value1", Some(70368744177663)),
                    ("field3", "value3", None),
                ],
            );
        });
        let mut cfg = config(&path, &target);
        cfg.replace = true;
        let report = load(&cfg).await.unwrap();
        check_clean(&report);
        assert_eq!(report.stats.keys_rebuilt, 1, "{report}");
        assert_eq!(report.stats.warnings, 1, "{report}");
        let w = &report.warnings[0];
        assert_eq!(w.key.as_deref(), Some(b"myhash".as_ref()));
        assert!(
            w.what.contains("TTLs of 2 hash fields dropped"),
            "{}",
            w.what
        );
        let mut pairs: Vec<(String, String)> =
            bulk_strings(&call_s(&mut tgt, &["HGETALL", "myhash"]).await)
                .chunks(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect();
        pairs.sort();
        let want: Vec<(String, String)> = (1..=3)
            .map(|i| (format!("field{i}"), format!("value{i}")))
            .collect();
        assert_eq!(pairs, want);
        assert_eq!(
            call_s(&mut tgt, &["PTTL", "myhash"]).await,
            Frame::Integer(-1)
        );
    }

    // RDB 11 stream (type 21) with groups: rebuilt, metadata exact.
    let stream = built(dir, "stream_v3.rdb", 11, |d| {
        d.stream("mystream", TYPE_STREAM_LISTPACKS_3, &two_group_stream());
    });
    let report = load(&config(&stream, &target)).await.unwrap();
    check_clean(&report);
    assert_eq!(report.stats.keys_rebuilt, 1);
    assert_eq!(
        call_s(&mut tgt, &["XLEN", "mystream"]).await,
        Frame::Integer(6)
    );
    let state = stream_state(&mut tgt, "mystream").await;
    let text = format!("{state:?}");
    for want in [
        "1695893015933-0",
        "groupA",
        "groupB",
        "consumerA1",
        "consumerA2",
        "consumerB1",
        "1695649446276-0",
    ] {
        assert!(text.contains(want), "{want} missing from {text}");
    }
    let pel = call_s(
        &mut tgt,
        &["XPENDING", "mystream", "groupA", "-", "+", "10"],
    )
    .await;
    let Frame::Array(pel) = pel else { panic!() };
    assert_eq!(pel.len(), 1);
    let Frame::Array(entry) = &pel[0] else {
        panic!()
    };
    assert_eq!(entry[0].as_bytes().unwrap().as_ref(), b"1695649446276-0");
    assert_eq!(entry[1].as_bytes().unwrap().as_ref(), b"consumerA2");
    assert_eq!(entry[3], Frame::Integer(1));
    let info = call_s(&mut tgt, &["XINFO", "STREAM", "mystream"]).await;
    let info = format!("{info:?}");
    assert!(info.contains("entries-added"), "{info}");

    // RDB 11 zset listpack (type 17 exists in 7.0): RESTOREd with a payload
    // tagged RDB 10, scores exact.
    let zset = built(dir, "zset_lp.rdb", 11, |d| {
        d.zset_compact("myzset", true, &SCORES_24);
    });
    let report = load(&config(&zset, &target)).await.unwrap();
    check_clean(&report);
    assert_eq!(report.stats.keys_restored, 1);
    let scores =
        bulk_strings(&call_s(&mut tgt, &["ZRANGE", "myzset", "0", "-1", "WITHSCORES"]).await);
    // Redis 7.0 prints scores with %.17g: compare the doubles.
    let parsed: Vec<(String, f64)> = scores
        .chunks(2)
        .map(|p| (p[0].clone(), p[1].parse::<f64>().unwrap()))
        .collect();
    assert_eq!(parsed.len(), 24);
    assert_eq!(parsed[0], ("a10".to_string(), f64::NEG_INFINITY));
    assert_eq!(parsed[1], ("a24".to_string(), -4.329000123123131e28));
    assert_eq!(parsed[15], ("a7".to_string(), 2.2));
    assert_eq!(parsed[23], ("a9".to_string(), f64::INFINITY));

    // RDB 12 functions and strings.
    let functions = built(dir, "function2.rdb", 12, |d| {
        d.function("#!lua name=mylib\nredis.register_function('myfunc', function(keys, args) return args[1] end)");
        d.function("#!lua name=mylib2\nredis.register_function('myfunc2', function(keys, args) return 2 end)");
        for i in 90..100 {
            d.string(
                &format!("key_{i}"),
                format!("value_{i}").as_bytes(),
                StrForm::Plain,
            );
        }
    });
    let report = load(&config(&functions, &target)).await.unwrap();
    check_clean(&report);
    assert_eq!(report.stats.functions, 2);
    assert_eq!(report.stats.keys_loaded(), 10);
    assert_eq!(
        call_s(&mut tgt, &["GET", "key_93"]).await,
        Frame::Bulk("value_93".into())
    );
    let libs = format!("{:?}", call_s(&mut tgt, &["FUNCTION", "LIST"]).await);
    assert!(libs.contains("mylib2") && libs.contains("mylib"), "{libs}");

    // Empty collections are skipped, as Redis does.
    let empty = built(dir, "empty_keys.rdb", 10, |d| {
        d.set_plain("set", &[]);
        d.list_quicklist("list_quicklist", &[]);
        d.list_quicklist("list_quicklist_empty_ziplist", &[(vec![], false)]);
        d.list_ziplist("list_ziplist", &[], StrForm::Plain);
        d.hash_plain("hash", &[]);
        d.hash_compact("hash_ziplist", false, &[]);
        d.zset_text("zset", &[]);
        d.zset_compact("zset_ziplist", false, &[]);
        d.zset_compact("zset_listpack", true, &[]);
    });
    let report = load(&config(&empty, &target)).await.unwrap();
    check_clean(&report);
    assert_eq!(report.stats.empty_skipped, 9, "{report}");
    assert_eq!(report.stats.keys_loaded(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_error_mid_file_reports_keys_loaded() {
    let target = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let corrupt = built(dir.path(), "corrupt.rdb", 7, |d| {
        for i in 0..20 {
            d.string(&format!("good:{i}"), b"v", StrForm::Plain);
        }
        let mut zl = ferry::redis::rdb::encoding::ziplist::encode(&[
            ferry::redis::rdb::encoding::Element::Str(bytes::Bytes::from_static(b"abc")),
        ]);
        zl[11] = 40; // the first entry runs past the end of the blob
        d.custom(
            "bad",
            TYPE_LIST_ZIPLIST,
            rdb_support::Value::List(vec![]),
            |w| {
                w.string(&zl);
            },
        );
    });
    let report = load(&config(&corrupt, &target)).await.unwrap();
    let failed = report
        .parse_error
        .as_ref()
        .expect("the corrupt ziplist is refused");
    assert_eq!(failed.keys_loaded, 20);
    let text = failed.to_string();
    assert!(text.contains("at byte"), "{text}");
    assert!(
        text.contains(&format!("{} keys were loaded", failed.keys_loaded)),
        "{text}"
    );
    // What was loaded is really there.
    let mut tgt = connect(&target).await;
    assert_eq!(
        call_s(&mut tgt, &["DBSIZE"]).await,
        Frame::Integer(failed.keys_loaded as i64)
    );
}
