//! The `ferry rdb dump|load` binary on dumps built here byte by byte: exact
//! JSON lines for each type and encoding, non-UTF-8 escaping, aux, slot
//! info, function and module lines, and refusals (corrupt, future version,
//! Valkey, bad checksum) with a non-zero exit and the byte offset.

mod common;
mod rdb_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::RedisServer;
use rdb_support::b;
use rdb_support::writer::*;

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

/// Writes `data` as `name` in `dir`; its path.
fn write(dir: &Path, name: &str, data: &[u8]) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, data).expect("write the dump");
    path.to_string_lossy().into_owned()
}

/// `ferry rdb dump FILE --format json EXTRA`, which must succeed; its stdout
/// lines, each checked to be JSON.
fn dump_lines(data: &[u8], extra: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "dump.rdb", data);
    let mut args = vec!["rdb", "dump", path.as_str(), "--format", "json"];
    args.extend_from_slice(extra);
    let out = ferry(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("dump output is UTF-8");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    text.lines().map(str::to_string).collect()
}

fn check(dump: Dump, want: &[&str]) {
    let (data, _) = dump.finish(Trailer::Checksum);
    assert_eq!(dump_lines(&data, &["--no-aux"]), want);
}

fn dump(version: u32) -> Dump {
    let mut d = Dump::new(version);
    d.select_db(0);
    d
}

#[test]
fn dump_strings_expiry_and_memory_hints() {
    let mut d = dump(11);
    d.string("xxx", b"111", StrForm::Int);
    check(
        d,
        &[
            r#"{"db":0,"key":"xxx","type":"string","encoding":"string","expire_ms":null,"value":"111"}"#,
        ],
    );
    let mut d = dump(11);
    d.meta(KeyMeta {
        expire_ms: Some(3_692_539_827_000),
        ..KeyMeta::default()
    });
    d.string("mykey", b"myval", StrForm::Plain);
    check(
        d,
        &[
            r#"{"db":0,"key":"mykey","type":"string","encoding":"string","expire_ms":3692539827000,"value":"myval"}"#,
        ],
    );
    let mut d = dump(11);
    d.meta(KeyMeta {
        lfu_freq: Some(5),
        ..KeyMeta::default()
    });
    d.string("abcdefghijk", b"012345789abcdefghik", StrForm::Plain);
    check(
        d,
        &[
            r#"{"db":0,"key":"abcdefghijk","type":"string","encoding":"string","expire_ms":null,"lfu_freq":5,"value":"012345789abcdefghik"}"#,
        ],
    );
    let mut d = dump(11);
    d.meta(KeyMeta {
        lru_idle: Some(24),
        ..KeyMeta::default()
    });
    d.string("abcdefghijk", b"012345789abcdefghik", StrForm::Plain);
    check(
        d,
        &[
            r#"{"db":0,"key":"abcdefghijk","type":"string","encoding":"string","expire_ms":null,"lru_idle":24,"value":"012345789abcdefghik"}"#,
        ],
    );
    let mut d = dump(11);
    d.string("x", b"0", StrForm::Int);
    d.select_db(1);
    d.string("y", b"1", StrForm::Int);
    d.select_db(2);
    d.string("z", b"2", StrForm::Plain);
    check(
        d,
        &[
            r#"{"db":0,"key":"x","type":"string","encoding":"string","expire_ms":null,"value":"0"}"#,
            r#"{"db":1,"key":"y","type":"string","encoding":"string","expire_ms":null,"value":"1"}"#,
            r#"{"db":2,"key":"z","type":"string","encoding":"string","expire_ms":null,"value":"2"}"#,
        ],
    );
}

#[test]
fn dump_collections() {
    let mut d = dump(6);
    d.list_linked("ll", &vec![b("1"); 513]);
    let list = format!(
        r#"{{"db":0,"key":"ll","type":"list","encoding":"linkedlist","expire_ms":null,"value":[{}]}}"#,
        vec![r#""1""#; 513].join(",")
    );
    let (data, _) = d.finish(Trailer::Checksum);
    assert_eq!(dump_lines(&data, &["--no-aux"]), [list]);

    let mut d = dump(11);
    d.set_intset("myintest", &[1, 2, 3, 4, 5, 1234567890]);
    check(
        d,
        &[
            r#"{"db":0,"key":"myintest","type":"set","encoding":"intset","expire_ms":null,"value":["1","2","3","4","5","1234567890"]}"#,
        ],
    );
    let mut d = dump(11);
    d.set_listpack(
        "myset",
        &strs(&["1", "2", "3", "1.1", "1.2", "1.3", "a", "b", "c"]),
    );
    check(
        d,
        &[
            r#"{"db":0,"key":"myset","type":"set","encoding":"listpack","expire_ms":null,"value":["1","2","3","1.1","1.2","1.3","a","b","c"]}"#,
        ],
    );
    let mut d = dump(6);
    d.zset_compact("myzset", false, &SCORES_24);
    check(
        d,
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
    let mut d = dump(9);
    d.hash_compact(
        "myhash",
        false,
        &pairs(&[
            ("1", "2"),
            ("3", "4"),
            ("5", "6"),
            ("7.0", "8.0"),
            ("str1", "str2"),
            ("str3", "str4"),
        ]),
    );
    check(
        d,
        &[concat!(
            r#"{"db":0,"key":"myhash","type":"hash","encoding":"ziplist","expire_ms":null,"value":["#,
            r#"{"field":"1","value":"2"},{"field":"3","value":"4"},{"field":"5","value":"6"},"#,
            r#"{"field":"7.0","value":"8.0"},{"field":"str1","value":"str2"},{"field":"str3","value":"str4"}]}"#
        )],
    );
    let mut d = dump(3);
    d.hash_zipmap(
        "hash",
        &pairs(&[("f1", "v1"), ("f2", "v2")]),
        0,
        StrForm::Plain,
    );
    check(
        d,
        &[
            r#"{"db":0,"key":"hash","type":"hash","encoding":"zipmap","expire_ms":null,"value":[{"field":"f1","value":"v1"},{"field":"f2","value":"v2"}]}"#,
        ],
    );
    // Field TTLs (Redis 7.4 pre-GA listpack-ex).
    let mut d = dump(12);
    d.hash_with_ttls(
        "myhash",
        TYPE_HASH_LISTPACK_EX_PRE_GA,
        &[
            ("field2", "value2", Some(70368744107663)),
            ("field1", "value1", Some(70368744177663)),
            ("field3", "value3", None),
        ],
    );
    check(
        d,
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
    let spec = two_group_stream();
    let mut d = dump(11);
    d.stream("mystream", TYPE_STREAM_LISTPACKS_3, &spec);
    check(
        d,
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
    let mut d = dump(7);
    d.string("int_value", b"123", StrForm::Int);
    d.string("ascii", b"\x00! ~0\n\t\rAb", StrForm::Plain);
    d.string("bin", b"\x00$ ~0\x7f\xff\n\xaa\t\x80\rAb", StrForm::Plain);
    d.string("printable", b"!+ Ab^~", StrForm::Plain);
    d.string_with(
        b"378",
        StrForm::Int,
        KeyMeta::default(),
        b"int_key_name",
        StrForm::Plain,
    );
    d.string("utf8", "בדיקה𐀏123עברית".as_bytes(), StrForm::Plain);
    let (data, _) = d.finish(Trailer::Checksum);
    let lines = dump_lines(&data, &["--no-aux"]);
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
    let mut d = Dump::new(12);
    for (k, v) in [
        ("redis-ver", "255.255.255"),
        ("redis-bits", "64"),
        ("ctime", "1713005699"),
        ("used-mem", "2550192"),
        ("repl-stream-db", "0"),
        ("repl-id", "734638bff92ee423e11e46e417b47acbd2d9c896"),
        ("repl-offset", "390"),
        ("aof-base", "0"),
    ] {
        d.aux(k, v);
    }
    d.select_db(0);
    d.slot_info(7638, 1, 0);
    d.string("abc", b"abc", StrForm::Plain);
    let (data, _) = d.finish(Trailer::Checksum);
    assert_eq!(
        dump_lines(&data, &[]),
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
    let mut d = Dump::new(11);
    d.function(
        "#!lua name=mylib \n redis.register_function('myfunc', function(keys, args) return args[1] end)",
    );
    let (data, _) = d.finish(Trailer::Checksum);
    assert_eq!(
        dump_lines(&data, &["--no-aux"]),
        [
            r##"{"function":"#!lua name=mylib \n redis.register_function('myfunc', function(keys, args) return args[1] end)"}"##
        ]
    );
    assert!(dump_lines(&data, &["--no-aux", "--no-functions"]).is_empty());
    let mut d = dump(11);
    d.module_value(
        "key1",
        "test__rdb",
        &[ModuleOp::Uint(1), ModuleOp::String(b("x"))],
    );
    assert_eq!(module_id("test__rdb", 1), 13108621717840686081);
    check(
        d,
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

/// 15 good keys, then a list ziplist whose first entry runs past the blob;
/// the file and the offset of the bad blob.
fn corrupt_dump() -> (Vec<u8>, u64) {
    let mut d = dump(7);
    for i in 0..15 {
        d.string(
            &format!("good:{i:02}"),
            format!("value {i}").as_bytes(),
            StrForm::Plain,
        );
    }
    let mut zl =
        ferry::redis::rdb::encoding::ziplist::encode(&[ferry::redis::rdb::encoding::Element::Str(
            b("abc"),
        )]);
    zl[11] = 40;
    d.custom(
        "mylist",
        TYPE_LIST_ZIPLIST,
        rdb_support::Value::List(vec![]),
        |w| {
            w.string(&zl);
        },
    );
    let blob_at = d.key_offsets[&(0, b("mylist"))] + 1 + 1 + 6;
    d.string("after", b"x", StrForm::Plain);
    (d.finish(Trailer::Disabled).0, blob_at)
}

fn future_dump() -> Vec<u8> {
    let mut d = Dump::new(99);
    d.select_db(0);
    d.string("x", b"from the future", StrForm::Plain);
    d.finish(Trailer::Wrong).0
}

fn single_key_dump() -> Vec<u8> {
    let mut d = dump(11);
    d.string("xxx", b"111", StrForm::Plain);
    d.finish(Trailer::Checksum).0
}

#[test]
fn dump_refuses_bad_files_with_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (corrupt, blob_at) = corrupt_dump();
    let corrupt = write(dir.path(), "corrupt.rdb", &corrupt);
    let (stdout, stderr) = refused(&["rdb", "dump", &corrupt, "--no-aux"]);
    assert!(
        stderr.contains(&format!("corrupt RDB at byte {blob_at}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("15 keys were written before it"),
        "{stderr}"
    );
    // The 15 keys before the corrupt one are whole JSON lines.
    let lines: Vec<&str> = stdout.lines().collect();
    for line in &lines[..15] {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }

    let future = write(dir.path(), "future.rdb", &future_dump());
    let (stdout, stderr) = refused(&["rdb", "dump", &future]);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("REDIS0099"), "{stderr}");
    assert!(stderr.contains("at byte 0"), "{stderr}");

    // A Valkey 9 header followed by EOF and a zero checksum.
    let valkey = write(dir.path(), "valkey9.rdb", b"VALKEY080\xff\0\0\0\0\0\0\0\0");
    let (_, stderr) = refused(&["rdb", "dump", &valkey]);
    assert!(stderr.contains("VALKEY080"), "{stderr}");
    assert!(stderr.contains("at byte 0"), "{stderr}");

    let mut d = dump(8);
    d.string("x", b"1", StrForm::Plain);
    d.string("x2", b"2", StrForm::Plain);
    let (bad_sum, _) = d.finish(Trailer::Wrong);
    let len = bad_sum.len();
    let checksum = write(dir.path(), "checksum.rdb", &bad_sum);
    let (_, stderr) = refused(&["rdb", "dump", &checksum]);
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(stderr.contains(&format!("at byte {len}")), "{stderr}");

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
    let dir = tempfile::tempdir().unwrap();

    let future = write(dir.path(), "future.rdb", &future_dump());
    let (_, stderr) = refused(&["rdb", "load", &future, "--target", &url]);
    assert!(stderr.contains("REDIS0099"), "{stderr}");
    assert!(stderr.contains("at byte 0"), "{stderr}");
    assert!(stderr.contains("no key was loaded"), "{stderr}");
    assert_eq!(target.cmd(&["DBSIZE"]), "0");

    let (corrupt, blob_at) = corrupt_dump();
    let corrupt = write(dir.path(), "corrupt.rdb", &corrupt);
    let (stdout, stderr) = refused(&["rdb", "load", &corrupt, "--target", &url]);
    assert!(
        stderr.contains(&format!("corrupt RDB at byte {blob_at}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("15 keys were loaded before the error"),
        "{stderr}"
    );
    assert!(stdout.contains("keys: 15 restored, 0 rebuilt"), "{stdout}");
    assert_eq!(target.cmd(&["DBSIZE"]), "15");

    // A good file into the same keys without --replace: BUSYKEY failures
    // are reported and the exit code says so.
    let single = write(dir.path(), "single.rdb", &single_key_dump());
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
