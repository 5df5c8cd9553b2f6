//! The `ferry rdb dump|load` binary on the shared fixtures: exact JSON lines
//! for each type, non-UTF-8 escaping, and refusals (corrupt, future version,
//! Valkey, bad checksum) with a non-zero exit and the byte offset.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fixtures_dir, RedisServer};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn fixture(name: &str) -> String {
    fixtures_dir().join(name).to_string_lossy().into_owned()
}

/// `ferry rdb dump FILE --no-aux`, which must succeed; its stdout lines.
fn dump_lines(name: &str, extra: &[&str]) -> Vec<String> {
    let path = fixture(name);
    let mut args = vec!["rdb", "dump", path.as_str(), "--format", "json"];
    args.extend_from_slice(extra);
    let out = ferry(&args);
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("dump output is UTF-8");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {line}"));
    }
    text.lines().map(str::to_string).collect()
}

fn check(name: &str, want: &[&str]) {
    assert_eq!(dump_lines(name, &["--no-aux"]), want, "{name}");
}

#[test]
fn dump_strings_expiry_and_memory_hints() {
    check(
        "librdb/test__dumps__single_key.rdb",
        &[
            r#"{"db":0,"key":"xxx","type":"string","encoding":"string","expire_ms":null,"value":"111"}"#,
        ],
    );
    check(
        "librdb/test__dumps__set_not_expired_v11.rdb",
        &[
            r#"{"db":0,"key":"mykey","type":"string","encoding":"string","expire_ms":3692539827000,"value":"myval"}"#,
        ],
    );
    check(
        "librdb/test__dumps__mem_policy_lfu.rdb",
        &[
            r#"{"db":0,"key":"abcdefghijk","type":"string","encoding":"string","expire_ms":null,"lfu_freq":5,"value":"012345789abcdefghik"}"#,
        ],
    );
    check(
        "librdb/test__dumps__mem_policy_lru.rdb",
        &[
            r#"{"db":0,"key":"abcdefghijk","type":"string","encoding":"string","expire_ms":null,"lru_idle":24,"value":"012345789abcdefghik"}"#,
        ],
    );
    check(
        "librdb/test__dumps__multiple_dbs.rdb",
        &[
            r#"{"db":0,"key":"x","type":"string","encoding":"string","expire_ms":null,"value":"0"}"#,
            r#"{"db":1,"key":"y","type":"string","encoding":"string","expire_ms":null,"value":"1"}"#,
            r#"{"db":2,"key":"z","type":"string","encoding":"string","expire_ms":null,"value":"2"}"#,
        ],
    );
}

#[test]
fn dump_collections() {
    // 513 elements, as librdb's plain_list_v6_data.json lists them.
    let list = format!(
        r#"{{"db":0,"key":"ll","type":"list","encoding":"linkedlist","expire_ms":null,"value":[{}]}}"#,
        vec![r#""1""#; 513].join(",")
    );
    assert_eq!(
        dump_lines("librdb/test__dumps__plain_list_v6.rdb", &["--no-aux"]),
        [list]
    );
    check(
        "librdb/test__dumps__set_is_v11.rdb",
        &[
            r#"{"db":0,"key":"myintest","type":"set","encoding":"intset","expire_ms":null,"value":["1","2","3","4","5","1234567890"]}"#,
        ],
    );
    check(
        "librdb/test__dumps__set_lp_v11.rdb",
        &[
            r#"{"db":0,"key":"myset","type":"set","encoding":"listpack","expire_ms":null,"value":["1","2","3","1.1","1.2","1.3","a","b","c"]}"#,
        ],
    );
    check(
        "librdb/test__dumps__zset_zl_v6.rdb",
        &[concat!(
            r#"{"db":0,"key":"myzset","type":"zset","encoding":"ziplist","expire_ms":null,"value":["#,
            r#"["a10","-inf"],["a24",-4.329000123123131e+28],["a12",-9007199254740992.0],"#,
            r#"["a22",-1125899906842624.0],["a18",-65536.0],["a16",-255.0],["a14",-9.99999],"#,
            r#"["a20",-1.1],["a19",-1.0],["a1",0.0],["a2",0.0],["a3",-0.0],["a4",-0.0],["a5",0.0],"#,
            r#"["a6",0.0],["a7",2.2],["a13",8.888888],["a15",255.0],["a17",65536.0],"#,
            r#"["a21",1125899906842624.0],["a11",9007199254740992.0],["a23",1.000033e+25],"#,
            r#"["a8","inf"],["a9","inf"]]}"#
        )],
    );
    check(
        "librdb/test__dumps__hash_zl_v6.rdb",
        &[concat!(
            r#"{"db":0,"key":"myhash","type":"hash","encoding":"ziplist","expire_ms":null,"value":["#,
            r#"{"field":"1","value":"2"},{"field":"3","value":"4"},{"field":"5","value":"6"},"#,
            r#"{"field":"7.0","value":"8.0"},{"field":"str1","value":"str2"},{"field":"str3","value":"str4"}]}"#
        )],
    );
    check(
        "redis/tests__assets__hash-zipmap.rdb",
        &[
            r#"{"db":0,"key":"hash","type":"hash","encoding":"zipmap","expire_ms":null,"value":[{"field":"f1","value":"v1"},{"field":"f2","value":"v2"}]}"#,
        ],
    );
    // Field TTLs (Redis 7.4 pre-GA listpack-ex).
    check(
        "librdb/test__dumps__hash_lp_with_hexpire_v12.rdb",
        &[concat!(
            r#"{"db":0,"key":"myhash","type":"hash","encoding":"listpack-ex","expire_ms":null,"value":["#,
            r#"{"field":"field2","value":"value2","expire_ms":70368744107663},"#,
            r#"{"field":"field1","value":"value1","expire_ms":70368744177663},"#,
            r#"{"field":"field3","value":"value3"}]}"#
        )],
    );
}

#[test]
fn dump_stream_with_groups() {
    check(
        "librdb/test__dumps__stream_v11.rdb",
        &[concat!(
            r#"{"db":0,"key":"mystream","type":"stream","encoding":"stream","expire_ms":null,"value":{"entries":["#,
            r#"{"id":"1695649068107-0","fields":[["message","Message1"]]},"#,
            r#"{"id":"1695649068110-0","fields":[["message","Message2"]]},"#,
            r#"{"id":"1695649069139-0","fields":[["message","Message3"]]},"#,
            r#"{"id":"1695649446276-0","fields":[["message","Message4"]]},"#,
            r#"{"id":"1695649456516-0","fields":[["message","Message5"]]},"#,
            r#"{"id":"1695893015933-0","fields":[["field1","value1"],["field2","value2"],["field3","value3"]]}],"#,
            r#""meta":{"length":6,"last_id":"1695893015933-0","first_id":"1695649068107-0","max_deleted_id":"0-0","entries_added":6},"#,
            r#""groups":[{"name":"groupA","last_id":"1695649446276-0","entries_read":4,"#,
            r#""pending":[{"id":"1695649446276-0","delivery_time_ms":1695649446276,"delivery_count":1}],"#,
            r#""consumers":[{"name":"consumerA1","seen_time_ms":1696679585023,"active_time_ms":1696679585023,"pending":[]},"#,
            r#"{"name":"consumerA2","seen_time_ms":1696679585024,"active_time_ms":1696679585024,"pending":["1695649446276-0"]}]},"#,
            r#"{"name":"groupB","last_id":"1695649069139-0","entries_read":3,"#,
            r#""pending":[{"id":"1695649069139-0","delivery_time_ms":1695649069139,"delivery_count":1}],"#,
            r#""consumers":[{"name":"consumerB1","seen_time_ms":1696679585026,"active_time_ms":1696679585026,"pending":["1695649069139-0"]}]}]}}"#
        )],
    );
}

#[test]
fn dump_non_utf8_is_escaped_losslessly() {
    let lines = dump_lines(
        "redis-rdb-tools/tests__dumps__non_ascii_values.rdb",
        &["--no-aux"],
    );
    assert_eq!(
        lines,
        [
            r#"{"db":0,"key":"int_value","type":"string","encoding":"string","expire_ms":null,"value":"123"}"#,
            r#"{"db":0,"key":"ascii","type":"string","encoding":"string","expire_ms":null,"value":"\u0000! ~0\n\t\rAb"}"#,
            r#"{"db":0,"key":"bin","type":"string","encoding":"string","expire_ms":null,"value":{"escaped":"\\x00$ ~0\\x7f\\xff\\x0a\\xaa\\x09\\x80\\x0dAb"}}"#,
            r#"{"db":0,"key":"printable","type":"string","encoding":"string","expire_ms":null,"value":"!+ Ab^~"}"#,
            r#"{"db":0,"key":"378","type":"string","encoding":"string","expire_ms":null,"value":"int_key_name"}"#,
            r#"{"db":0,"key":"utf8","type":"string","encoding":"string","expire_ms":null,"value":"בדיקה𐀏123עברית"}"#,
        ]
    );
    let bin: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    let escaped = bin["value"]["escaped"].as_str().unwrap();
    assert_eq!(
        ferry::redis::rdb::dump_json::unescape_bytes(escaped).unwrap(),
        b"\x00$ ~0\x7f\xff\n\xaa\t\x80\rAb"
    );
}

#[test]
fn dump_aux_function_and_module_lines() {
    assert_eq!(
        dump_lines("librdb/test__dumps__cluster_slot_info.rdb", &[]),
        [
            r#"{"rdb_version":12}"#,
            r#"{"aux":{"key":"redis-ver","value":"255.255.255"}}"#,
            r#"{"aux":{"key":"redis-bits","value":"64"}}"#,
            r#"{"aux":{"key":"ctime","value":"1713005699"}}"#,
            r#"{"aux":{"key":"used-mem","value":"2550192"}}"#,
            r#"{"aux":{"key":"repl-stream-db","value":"0"}}"#,
            r#"{"aux":{"key":"repl-id","value":"734638bff92ee423e11e46e417b47acbd2d9c896"}}"#,
            r#"{"aux":{"key":"repl-offset","value":"390"}}"#,
            r#"{"aux":{"key":"aof-base","value":"0"}}"#,
            r#"{"slot_info":{"slot_id":7638,"slot_size":1,"expires_slot_size":0}}"#,
            r#"{"db":0,"key":"abc","type":"string","encoding":"string","expire_ms":null,"value":"abc"}"#,
        ]
    );
    assert_eq!(
        dump_lines("librdb/test__dumps__function.rdb", &["--no-aux"]),
        [
            r##"{"function":"#!lua name=mylib \n redis.register_function('myfunc', function(keys, args) return args[1] end)"}"##
        ]
    );
    assert!(dump_lines(
        "librdb/test__dumps__function.rdb",
        &["--no-aux", "--no-functions"]
    )
    .is_empty());
    check(
        "librdb/test__dumps__module.rdb",
        &[
            r#"{"db":0,"key":"key1","type":"module","encoding":"module","expire_ms":null,"value":{"module":"test__rdb","module_id":13108621717840686081}}"#,
        ],
    );
}

/// Runs a command that must fail; returns (stdout, stderr).
fn refused(args: &[&str]) -> (String, String) {
    let out = ferry(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{args:?} succeeded:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

#[test]
fn dump_refuses_bad_files_with_the_offset() {
    let corrupt = fixture("redis/tests__assets__corrupt_ziplist.rdb");
    let (stdout, stderr) = refused(&["rdb", "dump", &corrupt, "--no-aux"]);
    assert!(stderr.contains("corrupt RDB at byte 488"), "{stderr}");
    assert!(
        stderr.contains("15 keys were written before it"),
        "{stderr}"
    );
    // The 15 keys before the corrupt one are whole JSON lines.
    let lines: Vec<&str> = stdout.lines().collect();
    for line in &lines[..15] {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }

    let future = fixture("librdb/test__dumps__future_v19.rdb");
    let (stdout, stderr) = refused(&["rdb", "dump", &future]);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("REDIS0099"), "{stderr}");
    assert!(stderr.contains("at byte 0"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let valkey = dir.path().join("valkey9.rdb");
    // A Valkey 9 header followed by EOF and a zero checksum.
    std::fs::write(&valkey, b"VALKEY080\xff\0\0\0\0\0\0\0\0").unwrap();
    let (_, stderr) = refused(&["rdb", "dump", &valkey.to_string_lossy()]);
    assert!(stderr.contains("VALKEY080"), "{stderr}");
    assert!(stderr.contains("at byte 0"), "{stderr}");

    let checksum = fixture("librdb/test__dumps__invalid_chksum_v8.rdb");
    let (_, stderr) = refused(&["rdb", "dump", &checksum]);
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(stderr.contains("at byte 209"), "{stderr}");

    let (_, stderr) = refused(&["rdb", "dump", "/nonexistent/dump.rdb"]);
    assert!(
        stderr.contains("cannot open /nonexistent/dump.rdb"),
        "{stderr}"
    );
}

#[test]
fn load_refuses_bad_files_and_says_what_was_loaded() {
    let target = RedisServer::start(&[]);
    let url = target.url();

    let future = fixture("librdb/test__dumps__future_v19.rdb");
    let (_, stderr) = refused(&["rdb", "load", &future, "--target", &url]);
    assert!(stderr.contains("REDIS0099"), "{stderr}");
    assert!(stderr.contains("at byte 0"), "{stderr}");
    assert!(stderr.contains("no key was loaded"), "{stderr}");
    assert_eq!(target.cmd(&["DBSIZE"]), "0");

    let corrupt = fixture("redis/tests__assets__corrupt_ziplist.rdb");
    let (stdout, stderr) = refused(&["rdb", "load", &corrupt, "--target", &url]);
    assert!(stderr.contains("corrupt RDB at byte 488"), "{stderr}");
    assert!(
        stderr.contains("15 keys were loaded before the error"),
        "{stderr}"
    );
    assert!(stdout.contains("keys: 15 restored, 0 rebuilt"), "{stdout}");
    assert_eq!(target.cmd(&["DBSIZE"]), "15");

    // A good file into the same keys without --replace: BUSYKEY failures
    // are reported and the exit code says so.
    let single = fixture("librdb/test__dumps__single_key.rdb");
    let out = ferry(&["rdb", "load", &single, "--target", &url]);
    assert!(out.status.success());
    let (stdout, stderr) = refused(&["rdb", "load", &single, "--target", &url]);
    assert!(
        stdout.contains("failed: RESTORE \"xxx\" (db 0): BUSYKEY"),
        "{stdout}"
    );
    assert!(stderr.contains("1 of 2 commands failed"), "{stderr}");

    // An unreachable target is a clear error.
    let closed = format!("redis://127.0.0.1:{}", common::free_port());
    let (_, stderr) = refused(&["rdb", "load", &single, "--target", &closed]);
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(Path::new(&single).exists());
}
