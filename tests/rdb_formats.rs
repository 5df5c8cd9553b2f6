//! The streaming RDB parser against every format family it reads, with
//! dumps this suite makes itself (nothing outside the repository is read):
//!
//! - dumps built byte by byte ([`rdb_support::writer`]) for what no Redis
//!   here writes: RDB versions 2 to 13, strings raw / int-encoded / LZF with
//!   every length form, linked lists, ziplists (every integer and string
//!   encoding, prevlen boundaries), quicklists of ziplists and of listpacks
//!   (packed, LZF and plain nodes), plain and intset (16/32/64-bit) and
//!   listpack sets, text-score and binary-score zsets, ziplist and listpack
//!   zsets, plain, zipmap, ziplist and listpack hashes, the four field-TTL
//!   hash forms of 7.4, streams of all four types (deleted entries,
//!   SAMEFIELDS, groups, PELs, consumers, IDMP), module values and module
//!   aux, functions (GA and pre-GA), slot info, aux fields, EXPIRETIME in
//!   seconds and ms, IDLE, FREQ and Redis Enterprise hints (RAM_LRU,
//!   SLOT_NUM), checksums present, absent, disabled and wrong, files with
//!   nothing but aux fields or nothing at all;
//! - each is parsed and compared with what it was built from (values,
//!   headers, raw captures), read again 1..7 bytes at a time, cut at every
//!   byte, and parsed with tiny chunk limits;
//! - each one a Redis 7.0 can load (RDB <= 10, no modules) is loaded into a
//!   real redis-server with `sanitize-dump-payload yes`, and what Redis
//!   holds is compared key by key with what ferry parsed: the hand-built
//!   bytes are what Redis means by those formats;
//! - real redis-server 7.0 dumps with every type and encoding it writes
//!   (config tweaks for intsets, listpacks, quicklist node sizes,
//!   compressed and plain quicklist nodes, LFU and LRU hints, functions,
//!   several dbs);
//! - refused input: corrupt blobs, wrong checksums, unknown versions and
//!   types, pre-GA modules, lying lengths, with typed errors naming where.
//!
//! The public fixture corpus (`rdb_corpus`, run by `tools/test.sh` when
//! `FERRY_RDB_CORPUS` names it) checks the same parser against files other
//! writers produced.
mod common;
mod rdb_support;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ferry::redis::client::Client;
use ferry::redis::rdb::{
    dump_payload, ParseOptions, RdbError, RdbEvent, RdbParser, StreamConsumer, StreamGroup,
    StreamId, ValueType,
};
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;
use rdb_support::writer::*;
use rdb_support::{
    b, check_streaming, model, now_ms, parse_err, parse_events, parse_ok, Content, Value,
};

/// One self-made dump and what it holds.
struct Case {
    name: &'static str,
    data: Vec<u8>,
    expected: Content,
    /// Whether redis-server 7.0 can load it (RDB <= 10, no module data,
    /// no pre-GA function).
    redis_loads: bool,
}

fn case(name: &'static str, dump: Dump, trailer: Trailer) -> Case {
    let redis_loads = dump.version() <= 10;
    let (data, expected) = dump.finish(trailer);
    Case {
        name,
        data,
        expected,
        redis_loads,
    }
}

/// Far enough in the future for Redis not to drop the key on load, and a
/// whole number of seconds below 2^31.
const FUTURE_MS: i64 = 2_100_000_000_000;

fn big(prefix: &str, len: usize) -> Bytes {
    let mut s = prefix.to_string();
    let mut i = 0u32;
    while s.len() < len {
        // Varied enough that LZF does not shrink it much.
        i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        s.push(char::from(b'a' + (i >> 16) as u8 % 26));
    }
    s.truncate(len);
    Bytes::from(s)
}

/// RDB 2 (Redis 2.4): the oldest encodings: linked list, ziplist list
/// (plain and LZF), plain and intset sets of each width, zipmap hashes
/// (plain, LZF, free bytes, 253/254-byte values), plain hash, text-score and
/// ziplist zsets, int-encoded and LZF keys, EXPIRETIME in seconds, two dbs.
fn rdb2_oldest_encodings() -> Case {
    let mut d = Dump::new(2);
    d.select_db(0);
    d.string("k1", b"ssssssss", StrForm::Plain);
    for (key, value) in [
        ("125", "positive 8 bit integer key"),
        ("-123", "negative 8 bit integer key"),
        ("1000", "positive 16 bit integer key"),
        ("-29477", "negative 16 bit integer key"),
        ("183358245", "positive 32 bit integer key"),
        ("-183358245", "negative 32 bit integer key"),
    ] {
        d.string_with(
            key.as_bytes(),
            StrForm::Int,
            KeyMeta::default(),
            value.as_bytes(),
            StrForm::Plain,
        );
    }
    d.string_with(
        "a".repeat(200).as_bytes(),
        StrForm::Lzf,
        KeyMeta::default(),
        b"Key that redis should compress easily",
        StrForm::Plain,
    );
    d.string("compressible", "abcd".repeat(50).as_bytes(), StrForm::Lzf);
    d.string("number", b"10", StrForm::Int);
    d.string_with(
        b"expires_in_seconds",
        StrForm::Plain,
        KeyMeta {
            expire_ms: Some(FUTURE_MS),
            expire_secs: true,
            ..KeyMeta::default()
        },
        b"v",
        StrForm::Plain,
    );
    let linked: Vec<Bytes> = (0..300).map(|i| big(&format!("{i}:"), 50)).collect();
    d.list_linked("force_linkedlist", &linked);
    d.list_ziplist(
        "ziplist_doesnt_compress",
        &strs(&[
            "aj2410",
            "cc953a17a8e096e76a44169ad3f9ac87c5f8248a403274416179aa9fbd852344",
        ]),
        StrForm::Plain,
    );
    let easy: Vec<Bytes> = [6, 12, 18, 24, 30, 36]
        .iter()
        .map(|n| Bytes::from("a".repeat(*n)))
        .collect();
    d.list_ziplist("ziplist_compresses_easily", &easy, StrForm::Lzf);
    d.set_plain(
        "regular_set",
        &strs(&["alpha", "beta", "gamma", "delta", "phi", "kappa"]),
    );
    d.set_intset("intset_16", &[32766, 32765, 32764, -5]);
    d.set_intset("intset_32", &[0x7ffefffe, 0x7ffefffd, -0x7ffefffc]);
    d.set_intset(
        "intset_64",
        &[0x7ffefffefffefffe, 0x7ffefffefffefffd, -0x7ffefffefffefffc],
    );
    d.hash_zipmap(
        "zipmap_doesnt_compress",
        &pairs(&[("MKD1G6", "2"), ("YNNXK", "F7TI")]),
        0,
        StrForm::Plain,
    );
    d.hash_zipmap(
        "zipmap_compresses_easily",
        &pairs(&[("a", "aa"), ("aa", "aaaa"), ("aaaaa", "aaaaaaaaaaaaaa")]),
        0,
        StrForm::Lzf,
    );
    d.hash_zipmap(
        "zipmap_with_big_values",
        &[
            (b("253"), big("", 253)),
            (b("254"), big("", 254)),
            (b("300"), big("", 300)),
            (b("empty"), Bytes::new()),
        ],
        3,
        StrForm::Plain,
    );
    let fields: Vec<(Bytes, Bytes)> = (0..200)
        .map(|i| (big(&format!("f{i}:"), 30), big(&format!("v{i}:"), 30)))
        .collect();
    d.hash_plain("force_dictionary", &fields);
    d.zset_text(
        "zset_text_scores",
        &[
            ("one", "1"),
            ("e", "2.718"),
            ("neg", "-3.423"),
            ("big", "1.000033e+25"),
            ("top", "inf"),
            ("bottom", "-inf"),
        ],
    );
    d.zset_compact(
        "sorted_set_as_ziplist",
        false,
        &[
            ("8b6ba6718a786daefa69438148361901", "1"),
            ("cb7a24bb7528f934b841b34c3a73e0c7", "2.37"),
            ("523af537946b79c4f8369ed39ba78605", "3.423"),
        ],
    );
    d.select_db(2);
    d.string("key_in_second_database", b"second", StrForm::Plain);
    case("rdb2_oldest_encodings", d, Trailer::None)
}

/// RDB 3: every string length form (6, 14, 32 and 64-bit, forced wide
/// forms too), keys across the 14/32-bit boundary (one LZF), binary and
/// UTF-8 values, the empty string, and a millisecond expiry.
fn rdb3_strings_and_lengths() -> Case {
    let mut d = Dump::new(3);
    d.select_db(0);
    d.string("empty", b"", StrForm::Plain);
    for len in [1usize, 63, 64, 16383, 16384, 70000] {
        d.string(&format!("len_{len}"), &big("", len), StrForm::Plain);
    }
    d.string_len_form("len_forced_32", b"short", LenForm::Bits32);
    d.string_len_form("len_forced_64", b"short", LenForm::Bits64);
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    d.string("bin", &all_bytes, StrForm::Plain);
    d.string("utf8", "בדיקה𐀏123עברית".as_bytes(), StrForm::Plain);
    d.string_with(
        &big("", 16382),
        StrForm::Plain,
        KeyMeta::default(),
        b"14-bit key",
        StrForm::Plain,
    );
    d.string_with(
        "z".repeat(16386).as_bytes(),
        StrForm::Lzf,
        KeyMeta::default(),
        b"32-bit key, LZF",
        StrForm::Plain,
    );
    d.string_with(
        b"expires_ms_precision",
        StrForm::Plain,
        KeyMeta {
            expire_ms: Some(FUTURE_MS + 573),
            ..KeyMeta::default()
        },
        b"2022-12-25 10:11:12.573 mst",
        StrForm::Plain,
    );
    d.string(
        "lzf_value",
        "Hello Hello Hello Hello Hello World".as_bytes(),
        StrForm::Lzf,
    );
    for v in [
        "0",
        "-1",
        "127",
        "-128",
        "128",
        "32767",
        "-32768",
        "32768",
        "2147483647",
        "-2147483648",
    ] {
        d.string(&format!("int_{v}"), v.as_bytes(), StrForm::Int);
    }
    case("rdb3_strings_and_lengths", d, Trailer::None)
}

/// RDB 3 with nothing in it: the header and EOF.
fn rdb3_empty_database() -> Case {
    case("rdb3_empty_database", Dump::new(3), Trailer::None)
}

/// RDB 4: aux fields and no key.
fn rdb4_aux_only() -> Case {
    let mut d = Dump::new(4);
    d.aux("redis-ver", "3.0.0");
    d.aux(
        "\u{db}__lua_script__a0c38691e9fffe4563723c32ba77a34398e090e6__\u{db}",
        "return 1",
    );
    case("rdb4_aux_only", d, Trailer::None)
}

/// RDB 5 (the CRC64 appears): strings of every kind, checksum verified.
fn rdb5_checksum() -> Case {
    let mut d = Dump::new(5);
    d.select_db(0);
    for (k, v) in [
        ("abcd", "efgh"),
        ("foo", "bar"),
        ("bar", "baz"),
        ("abcdef", "abcdef"),
        ("longerstring", "thisisalongerstring.idontknowwhatitmeans"),
        ("a,\"b\",c", "comma"),
    ] {
        d.string(k, v.as_bytes(), StrForm::Plain);
    }
    d.string("+abc", b"-12", StrForm::Int);
    case("rdb5_checksum", d, Trailer::Checksum)
}

/// RDB 6: ziplists with every integer encoding
/// (4-bit immediates, 8/16/24/32/64-bit), string lengths across the 6/14/
/// 32-bit forms and prevlen across its 254-byte boundary, in a list, a
/// hash and a zset.
fn rdb6_ziplist_encodings() -> Case {
    let mut d = Dump::new(6);
    d.select_db(0);
    let mut ints: Vec<String> = (0..=12).map(|i: i64| i.to_string()).collect();
    for v in [
        -2i64,
        13,
        25,
        -61,
        63,
        127,
        -128,
        128,
        16380,
        -16000,
        32767,
        -32768,
        65535,
        -65523,
        4194304,
        8388607,
        -8388608,
        8388608,
        2147483647,
        -2147483648,
        2147483648,
        9223372036854775807,
        i64::MIN,
    ] {
        ints.push(v.to_string());
    }
    // Numbers that are not canonical decimals stay strings.
    for s in ["007", "+1", "-0", "1.5", "1e3", " 1"] {
        ints.push(s.to_string());
    }
    let ints: Vec<Bytes> = ints.into_iter().map(Bytes::from).collect();
    d.list_ziplist("ziplist_with_integers", &ints, StrForm::Plain);
    let lens: Vec<Bytes> = [
        0usize, 1, 63, 64, 250, 252, 253, 254, 255, 300, 16383, 16384, 20000, 5,
    ]
    .iter()
    .map(|n| big("", *n))
    .collect();
    d.list_ziplist("ziplist_string_lengths", &lens, StrForm::Plain);
    d.hash_compact(
        "hash_ziplist_big_values",
        false,
        &[
            (b("253"), big("", 253)),
            (b("254"), big("", 254)),
            (b("255"), big("", 255)),
            (b("300"), big("", 300)),
            (b("20000"), big("", 20000)),
            (b("small"), b("1")),
        ],
    );
    d.zset_compact(
        "zset_ziplist_scores",
        false,
        &[
            ("bottom", "-inf"),
            ("neg", "-1125899906842624"),
            ("a", "-2.5"),
            ("zero", "0"),
            ("int", "7"),
            ("pi", "3.1415926535897931"),
            ("big", "1.000033e+25"),
            ("top", "inf"),
        ],
    );
    case("rdb6_ziplist_encodings", d, Trailer::Checksum)
}

/// RDB 7 with `rdbchecksum no` (checksum 0): plain hash, set and zset with
/// text scores, big enough to need several chunks.
fn rdb7_checksum_disabled() -> Case {
    let mut d = Dump::new(7);
    d.aux("redis-ver", "3.2.1");
    d.aux("redis-bits", "64");
    d.select_db(0);
    d.resize_db(3, 0);
    let fields: Vec<(Bytes, Bytes)> = (0..500)
        .map(|i| (b(&format!("field{i}")), b(&format!("value{i}"))))
        .collect();
    d.hash_plain("myhash1", &fields);
    let members: Vec<Bytes> = (0..300).map(|i| b(&format!("member{i}"))).collect();
    d.set_plain("myset", &members);
    let scores: Vec<(String, String)> = (0..300)
        .map(|i| (format!("z{i}"), format!("{}", i as f64 / 7.0 - 20.0)))
        .collect();
    let scores: Vec<(&str, &str)> = scores
        .iter()
        .map(|(m, s)| (m.as_str(), s.as_str()))
        .collect();
    d.zset_text("force_sorted_set", &scores);
    case("rdb7_checksum_disabled", d, Trailer::Disabled)
}

/// RDB 8 (Redis 4.0): quicklists of ziplists (one node LZF-compressed),
/// binary-score zsets, 64-bit lengths.
fn rdb8_quicklist_zset2() -> Case {
    let mut d = Dump::new(8);
    d.aux("redis-ver", "4.0.9");
    d.select_db(0);
    d.string("x", b"7", StrForm::Int);
    let node = |from: usize, n: usize| -> Vec<Bytes> {
        (from..from + n).map(|i| b(&format!("item-{i}"))).collect()
    };
    let compressible: Vec<Bytes> = (0..40)
        .map(|i| Bytes::from(format!("{i:03}{}", "x".repeat(40))))
        .collect();
    d.list_quicklist(
        "list",
        &[
            (node(0, 7), false),
            (compressible, true),
            (node(100, 3), false),
        ],
    );
    let mut zset: Vec<(Bytes, f64)> = (0..1000)
        .map(|i| (b(&format!("m{i}")), i as f64 * 1.5 - 700.25))
        .collect();
    #[allow(clippy::approx_constant)]
    zset.push((b("finalfield"), 2.718));
    zset.push((b("minus_zero"), -0.0));
    zset.push((b("tiny"), f64::MIN_POSITIVE));
    zset.push((b("inf"), f64::INFINITY));
    d.zset_binary("bigset", &zset);
    d.custom(
        "list_64bit_lengths",
        TYPE_LIST,
        Value::List(strs(&["a", "bb"])),
        |w| {
            w.len_as(2, LenForm::Bits64);
            w.len_as(1, LenForm::Bits64).raw(b"a");
            w.len_as(2, LenForm::Bits32).raw(b"bb");
        },
    );
    case("rdb8_quicklist_zset2", d, Trailer::Checksum)
}

fn stream_group(
    name: &str,
    last_id: StreamId,
    entries_read: u64,
    pending: Vec<ferry::redis::rdb::PendingEntry>,
    consumers: Vec<StreamConsumer>,
) -> StreamGroup {
    StreamGroup {
        name: b(name),
        last_id,
        entries_read: Some(entries_read),
        pending,
        consumers,
    }
}

fn consumer(name: &str, seen: i64, active: i64, pending: Vec<StreamId>) -> StreamConsumer {
    StreamConsumer {
        name: b(name),
        seen_time_ms: seen,
        active_time_ms: Some(active),
        pending,
    }
}

/// A stream of two nodes: SAMEFIELDS entries, entries with other fields,
/// one deleted entry; two groups, one with PEL entries owned by two
/// consumers and a consumer without any, one empty.
fn sample_stream() -> StreamSpec {
    let e = |ms: u64, seq: u64, fields: &[(&str, &str)], deleted: bool| NodeEntry {
        id: sid(ms, seq),
        fields: pairs(fields),
        deleted,
    };
    StreamSpec {
        nodes: vec![
            StreamNode {
                master: sid(1000, 0),
                master_fields: strs(&["f", "n"]),
                entries: vec![
                    e(1000, 0, &[("f", "v0"), ("n", "0")], false),
                    e(1000, 1, &[("f", "v1"), ("n", "-17")], false),
                    e(1001, 0, &[("f", "deleted"), ("n", "2")], true),
                    e(1002, 5, &[("other", "shape")], false),
                ],
            },
            StreamNode {
                master: sid(2000, 0),
                master_fields: strs(&["message"]),
                entries: vec![
                    e(2000, 0, &[("message", "Message1")], false),
                    e(2000, 1, &[("message", "")], false),
                    e(
                        2100,
                        0,
                        &[
                            ("field1", "value1"),
                            ("field2", "value2"),
                            ("field3", "300"),
                        ],
                        false,
                    ),
                ],
            },
        ],
        length: 6,
        last_id: sid(2100, 0),
        first_id: sid(1000, 0),
        max_deleted_id: sid(1001, 0),
        entries_added: 7,
        groups: vec![
            stream_group(
                "groupA",
                sid(2000, 0),
                4,
                vec![
                    pending(sid(1000, 1), 1_695_649_446_276, 1),
                    pending(sid(1002, 5), 1_695_649_446_300, 3),
                    pending(sid(2000, 0), 1_695_649_446_400, 2),
                ],
                vec![
                    consumer(
                        "consumerA1",
                        1_696_679_585_023,
                        1_696_679_585_020,
                        vec![sid(1000, 1)],
                    ),
                    consumer(
                        "consumerA2",
                        1_696_679_585_024,
                        1_696_679_585_021,
                        vec![sid(1002, 5), sid(2000, 0)],
                    ),
                    consumer("idle", 1_696_679_585_025, 1_696_679_585_022, vec![]),
                ],
            ),
            stream_group("groupB", sid(0, 0), 0, vec![], vec![]),
        ],
        idmp: StreamIdmp::default(),
    }
}

/// RDB 9 (Redis 5/6): aux fields, RESIZEDB, IDLE and FREQ hints, a stream
/// of the first type (no first id, no entries-added), keys in db 0 and 9.
fn rdb9_stream_and_hints() -> Case {
    let mut d = Dump::new(9);
    d.aux("redis-ver", "6.0.16");
    d.aux("redis-bits", "64");
    d.aux("ctime", "1713005699");
    d.aux("used-mem", "2550192");
    d.aux("aof-preamble", "0");
    d.select_db(0);
    d.resize_db(4, 0);
    d.meta(KeyMeta {
        lru_idle: Some(24),
        ..KeyMeta::default()
    });
    d.string("idle", b"012345789abcdefghik", StrForm::Plain);
    d.meta(KeyMeta {
        lfu_freq: Some(5),
        ..KeyMeta::default()
    });
    d.string("freq", b"012345789abcdefghik", StrForm::Plain);
    d.stream("mystream", TYPE_STREAM_LISTPACKS, &sample_stream());
    d.hash_compact(
        "myhash",
        false,
        &pairs(&[("1", "2"), ("3", "4"), ("7.0", "8.0"), ("str1", "str2")]),
    );
    d.select_db(9);
    d.resize_db(1, 1);
    d.meta(KeyMeta {
        expire_ms: Some(FUTURE_MS + 1),
        ..KeyMeta::default()
    });
    d.string("x", b"in db 9", StrForm::Plain);
    case("rdb9_stream_and_hints", d, Trailer::Checksum)
}

/// RDB 10 (Redis 7.0) forms written by hand: quicklist 2 with packed, LZF
/// and plain nodes, listpack hashes and zsets, a second-type stream, a
/// function library, the script aux Redis 7 ignores.
fn rdb10_listpacks_by_hand() -> Case {
    let mut d = Dump::new(10);
    d.aux("redis-ver", "7.0.0");
    d.aux("lua", "return redis.call('set', 'foo', 'bar')");
    d.function(
        "#!lua name=mylib\nredis.register_function('myfunc', function(keys, args) return args[1] end)",
    );
    d.select_db(0);
    let compressible: Vec<Bytes> = (0..30)
        .map(|i| Bytes::from(format!("{i:02}{}", "y".repeat(30))))
        .collect();
    d.list_quicklist2(
        "mylist",
        &[
            QuicklistNode::Packed {
                items: strs(&["val3", "val2", "-1", "-4097", "8191", "4097"]),
                lzf: false,
            },
            QuicklistNode::Plain(big("plain:", 5000)),
            QuicklistNode::Packed {
                items: compressible,
                lzf: true,
            },
            QuicklistNode::Packed {
                items: strs(&["32766", "-8388608", "2147483647", "-9223372036854775808"]),
                lzf: false,
            },
        ],
    );
    d.hash_compact(
        "hash_lp",
        true,
        &[
            (b("char_0"), Bytes::new()),
            (b("char_63"), big("", 63)),
            (b("char_64"), big("", 64)),
            (b("char_4095"), big("", 4095)),
            (b("char_4096"), big("", 4096)),
            (b("unsigned_7_bits"), b("107")),
            (b("13_bit"), b("-4097")),
        ],
    );
    d.zset_compact(
        "zset_lp",
        true,
        &[
            ("a10", "-inf"),
            ("a24", "-4.329000123123131e+28"),
            ("a12", "-9007199254740992"),
            ("a7", "2.2"),
            ("a9", "inf"),
        ],
    );
    d.stream("stream2", TYPE_STREAM_LISTPACKS_2, &sample_stream());
    case("rdb10_listpacks_by_hand", d, Trailer::Checksum)
}

/// RDB 11 (Redis 7.2): set listpack, third-type stream (consumer active
/// time), LZF keys and values.
fn rdb11_redis_7_2() -> Case {
    let mut d = Dump::new(11);
    d.aux("redis-ver", "7.2.0");
    d.select_db(0);
    d.set_listpack(
        "set_as_listpack",
        &strs(&["abc", "abcdefg", "abcdefghijklmn", "-3", "50", "-70", "1.1"]),
    );
    d.stream("mystream", TYPE_STREAM_LISTPACKS_3, &sample_stream());
    d.string_with(
        "lzf_key_".repeat(10).as_bytes(),
        StrForm::Lzf,
        KeyMeta::default(),
        "lzf_value_".repeat(10).as_bytes(),
        StrForm::Lzf,
    );
    d.meta(KeyMeta {
        expire_ms: Some(1),
        ..KeyMeta::default()
    });
    d.string("long_expired", b"gone", StrForm::Plain);
    case("rdb11_redis_7_2", d, Trailer::Checksum)
}

/// RDB 12 (Redis 7.4): the four field-TTL hash forms, slot info, module aux
/// and module values with every module opcode, Redis Enterprise's RAM_LRU
/// hint.
fn rdb12_redis_7_4() -> Case {
    let mut d = Dump::new(12);
    d.aux("redis-ver", "7.4.2");
    d.module_aux(
        "test__rdb",
        2,
        &[ModuleOp::Uint(1), ModuleOp::String(b("aux data"))],
    );
    d.select_db(0);
    d.slot_info(7638, 1, 0);
    let ttl_fields = [
        ("field1", "value1", Some(1_800_000_000_123)),
        ("field2", "value2", Some(1_800_000_000_000)),
        ("field3", "value3", None),
    ];
    d.hash_with_ttls("hash_meta_pre_ga", TYPE_HASH_METADATA_PRE_GA, &ttl_fields);
    d.hash_with_ttls(
        "hash_lpex_pre_ga",
        TYPE_HASH_LISTPACK_EX_PRE_GA,
        &ttl_fields,
    );
    d.hash_with_ttls("hash_meta", TYPE_HASH_METADATA, &ttl_fields);
    d.hash_with_ttls("hash_lpex", TYPE_HASH_LISTPACK_EX, &ttl_fields);
    d.module_value(
        "mykey",
        "ReJSON-RL",
        &[
            ModuleOp::Sint(7),
            ModuleOp::Uint(9),
            ModuleOp::Float(1.5),
            ModuleOp::Double(-2.25),
            ModuleOp::String(b("{\"a\":1}")),
        ],
    );
    d.meta(KeyMeta {
        ram_lru: Some(77),
        slot_num: Some(7638),
        ..KeyMeta::default()
    });
    d.string("abc", b"abc", StrForm::Plain);
    case("rdb12_redis_7_4", d, Trailer::Checksum)
}

/// RDB 13: the fourth stream type (idempotent-producer state after the
/// groups, skipped by the reader).
fn rdb13_stream_idmp() -> Case {
    let mut d = Dump::new(13);
    d.select_db(0);
    let mut spec = sample_stream();
    spec.idmp = StreamIdmp {
        duration: 100,
        max_entries: 1000,
        producers: vec![(
            b("producer-1"),
            vec![(b("iid-1"), sid(1000, 0)), (b("iid-2"), sid(2000, 1))],
        )],
        ids_added: 2,
        duplicates: 1,
    };
    d.stream("mystream", TYPE_STREAM_LISTPACKS_4, &spec);
    case("rdb13_stream_idmp", d, Trailer::Checksum)
}

/// The Redis 7.0 release candidates' function record, and module aux data
/// in an RDB 9 file (Redis 6 with a module).
fn rdb9_modules_and_pre_ga_function() -> Case {
    let mut d = Dump::new(9);
    d.aux("redis-ver", "999.999.999");
    d.module_aux("ReJSON-RL", 2, &[ModuleOp::Sint(3), ModuleOp::Double(0.5)]);
    d.function_pre_ga(
        "mylib",
        Some("a description"),
        "redis.register_function('f', function() return 1 end)",
    );
    d.function_pre_ga(
        "other",
        None,
        "redis.register_function('g', function() return 2 end)",
    );
    d.select_db(0);
    d.module_value("foo", "ReJSON-RL", &[ModuleOp::String(b("bar"))]);
    let mut c = case("rdb9_modules_and_pre_ga_function", d, Trailer::Checksum);
    c.redis_loads = false;
    c
}

const EMPTY_COLLECTIONS: &str = "rdb10_empty_collections";

/// Empty collections of every kind: a reader must skip them (Redis does,
/// "empty keys skipped"). An empty intset is left out: Redis refuses it as
/// corrupt.
fn rdb10_empty_collections() -> Case {
    let mut d = Dump::new(10);
    d.select_db(0);
    d.list_linked("empty_linked", &[]);
    d.list_ziplist("empty_ziplist", &[], StrForm::Plain);
    d.list_quicklist2("empty_quicklist", &[]);
    d.list_quicklist2(
        "quicklist_of_empty_listpack",
        &[QuicklistNode::Packed {
            items: vec![],
            lzf: false,
        }],
    );
    d.set_plain("empty_set", &[]);
    d.zset_text("empty_zset", &[]);
    d.zset_compact("empty_zset_ziplist", false, &[]);
    d.zset_compact("empty_zset_listpack", true, &[]);
    d.hash_plain("empty_hash", &[]);
    d.hash_compact("empty_hash_ziplist", false, &[]);
    d.hash_compact("empty_hash_listpack", true, &[]);
    case(EMPTY_COLLECTIONS, d, Trailer::Checksum)
}

fn cases() -> Vec<Case> {
    vec![
        rdb2_oldest_encodings(),
        rdb3_empty_database(),
        rdb3_strings_and_lengths(),
        rdb4_aux_only(),
        rdb5_checksum(),
        rdb6_ziplist_encodings(),
        rdb7_checksum_disabled(),
        rdb8_quicklist_zset2(),
        rdb9_stream_and_hints(),
        rdb9_modules_and_pre_ga_function(),
        rdb10_listpacks_by_hand(),
        rdb10_empty_collections(),
        rdb11_redis_7_2(),
        rdb12_redis_7_4(),
        rdb13_stream_idmp(),
    ]
}

/// `have` parsed from `case` equals what it was built from.
fn assert_content(name: &str, have: &Content, want: &Content) {
    assert_eq!(have.version, want.version, "{name}: version");
    assert_eq!(have.aux, want.aux, "{name}: aux");
    assert_eq!(have.functions, want.functions, "{name}: functions");
    assert_eq!(have.module_aux, want.module_aux, "{name}: module aux");
    assert_eq!(have.slot_info, want.slot_info, "{name}: slot info");
    assert_eq!(have.resize, want.resize, "{name}: resizedb");
    assert_eq!(have.checksum, want.checksum, "{name}: checksum");
    let have_ids: Vec<_> = have.keys.keys().collect();
    let want_ids: Vec<_> = want.keys.keys().collect();
    assert_eq!(have_ids, want_ids, "{name}: keys");
    for (id, want_key) in &want.keys {
        let key = &have.keys[id];
        let label = format!(
            "{name}: key {:?} (db {})",
            String::from_utf8_lossy(&id.1),
            id.0
        );
        assert_eq!(key.header, want_key.header, "{label}: header");
        assert_eq!(key.value, want_key.value, "{label}: value");
        assert_eq!(key.raw, want_key.raw, "{label}: raw capture");
        let empty = match &key.value {
            Value::List(v) => v.is_empty(),
            Value::Set(v) => v.is_empty(),
            Value::ZSet(v) => v.is_empty(),
            Value::Hash(v) => v.is_empty(),
            _ => false,
        };
        assert_eq!(key.chunks == 0, empty, "{label}: {} chunks", key.chunks);
    }
}

#[test]
fn every_format_parses_to_what_it_was_built_from() {
    let cases = cases();
    let mut types = BTreeSet::new();
    let mut versions = BTreeSet::new();
    for case in &cases {
        let content = model(&parse_ok(&case.data, ParseOptions::default()));
        assert_content(case.name, &content, &case.expected);
        // The parser stops exactly at the end: nothing left unread.
        let (_, end) = parse_events(&case.data[..], ParseOptions::default());
        assert_eq!(end.unwrap(), case.data.len() as u64, "{}", case.name);
        versions.insert(content.version);
        types.extend(content.keys.values().map(|k| k.header.encoding));
    }
    // Every value type byte the parser reads, in every RDB version family.
    let all: BTreeSet<u8> = (0..=26).filter(|t| ![6, 8].contains(t)).collect();
    assert_eq!(types, all, "type bytes covered");
    assert_eq!(
        versions,
        [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
            .into_iter()
            .collect()
    );
}

#[test]
fn every_format_streams_in_tiny_reads_truncations_and_small_chunks() {
    for case in cases() {
        check_streaming(case.name, &case.data);
    }
}

// ---------------------------------------------------------------------------
// Real redis-server 7.0: the hand-built dumps load into it and hold what the
// parser read; its own dumps parse to what it holds.

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn connect(server: &common::RedisServer) -> Client {
    Client::connect(&RedisUrl::parse(&server.url()).expect("url"))
        .await
        .expect("connect")
}

fn frame_bytes(f: &Frame) -> Bytes {
    f.as_bytes()
        .cloned()
        .unwrap_or_else(|| panic!("not a string: {f:?}"))
}

fn frame_array(f: &Frame) -> &[Frame] {
    match f {
        Frame::Array(a) => a,
        other => panic!("not an array: {other:?}"),
    }
}

fn frame_map(f: &Frame) -> BTreeMap<String, Frame> {
    frame_array(f)
        .chunks(2)
        .map(|p| {
            (
                String::from_utf8_lossy(&frame_bytes(&p[0])).into_owned(),
                p[1].clone(),
            )
        })
        .collect()
}

async fn call(c: &mut Client, args: &[&[u8]]) -> Frame {
    c.call(args.iter().copied())
        .await
        .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(args[0])))
}

/// Starts a redis-server 7.0 on `data` as its dump.rdb, with deep payload
/// checks; `redis-check-rdb` first, so that a refusal names its reason
/// (except for dumps of empty collections, which redis-check-rdb refuses
/// while the server skips them).
fn redis_with_dump(name: &str, data: &[u8]) -> common::RedisServer {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dump.rdb");
    std::fs::write(&path, data).expect("write dump.rdb");
    if name == EMPTY_COLLECTIONS {
        return common::RedisServer::start_in(dir, &["--sanitize-dump-payload", "yes"]);
    }
    let check = common::output_within(
        std::process::Command::new("redis-check-rdb").arg(&path),
        common::CLI_TIMEOUT,
    )
    .expect("redis-check-rdb");
    assert!(
        check.status.success(),
        "{name}: redis-check-rdb refuses it:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
    common::RedisServer::start_in(dir, &["--sanitize-dump-payload", "yes"])
}

/// What `c` holds equals `content` key by key: type, value, expiry, stream
/// metadata, groups, PELs and consumers, functions; empty collections and
/// keys that expired are absent; every db has no other key.
async fn assert_redis_holds(name: &str, c: &mut Client, content: &Content) {
    let mut per_db: BTreeMap<u32, i64> = BTreeMap::new();
    let mut current_db = u32::MAX;
    for ((db, key_name), key) in &content.keys {
        if *db != current_db {
            call(c, &[b"SELECT", db.to_string().as_bytes()]).await;
            current_db = *db;
        }
        let label = format!(
            "{name}: db {db} key {:?}",
            String::from_utf8_lossy(key_name)
        );
        let n = key_name.as_ref();
        let empty = key.chunks == 0
            && !matches!(key.header.value_type, ValueType::String | ValueType::Stream);
        let gone = empty || key.header.expire_ms.is_some_and(|e| e <= now_ms());
        let exists = call(c, &[b"EXISTS", n]).await;
        if gone {
            assert_eq!(exists, Frame::Integer(0), "{label}: should not be loaded");
            continue;
        }
        assert_eq!(exists, Frame::Integer(1), "{label}: missing");
        *per_db.entry(*db).or_default() += 1;
        let kind = call(c, &[b"TYPE", n]).await;
        assert_eq!(
            frame_bytes(&kind),
            key.header.value_type.as_str(),
            "{label}"
        );
        let pexpiretime = call(c, &[b"PEXPIRETIME", n]).await;
        assert_eq!(
            pexpiretime,
            Frame::Integer(key.header.expire_ms.unwrap_or(-1)),
            "{label}: expiry"
        );
        match &key.value {
            Value::String(v) => {
                assert_eq!(&frame_bytes(&call(c, &[b"GET", n]).await), v, "{label}");
            }
            Value::List(items) => {
                let got = call(c, &[b"LRANGE", n, b"0", b"-1"]).await;
                let got: Vec<Bytes> = frame_array(&got).iter().map(frame_bytes).collect();
                assert_eq!(&got, items, "{label}");
            }
            Value::Set(members) => {
                let got = call(c, &[b"SMEMBERS", n]).await;
                let got: BTreeSet<Bytes> = frame_array(&got).iter().map(frame_bytes).collect();
                assert_eq!(&got, members, "{label}");
            }
            Value::ZSet(entries) => {
                let got = call(c, &[b"ZRANGE", n, b"0", b"-1", b"WITHSCORES"]).await;
                let got: Vec<(Bytes, f64)> = frame_array(&got)
                    .chunks(2)
                    .map(|p| {
                        let score = ferry::redis::rdb::encoding::parse_f64(&frame_bytes(&p[1]))
                            .expect("score");
                        (frame_bytes(&p[0]), score)
                    })
                    .collect();
                let mut mine = entries.clone();
                mine.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
                // Redis orders -0 and 0 as equal scores, by member.
                let norm = |v: Vec<(Bytes, f64)>| -> Vec<(Bytes, u64)> {
                    let mut v: Vec<(Bytes, u64)> = v
                        .into_iter()
                        .map(|(m, s)| (m, if s == 0.0 { 0 } else { s.to_bits() }))
                        .collect();
                    v.sort();
                    v
                };
                assert_eq!(norm(got), norm(mine), "{label}");
            }
            Value::Hash(fields) => {
                let got = call(c, &[b"HGETALL", n]).await;
                let got: BTreeMap<Bytes, (Bytes, Option<i64>)> = frame_array(&got)
                    .chunks(2)
                    .map(|p| (frame_bytes(&p[0]), (frame_bytes(&p[1]), None)))
                    .collect();
                assert_eq!(&got, fields, "{label}");
            }
            Value::Stream {
                entries,
                meta,
                groups,
            } => {
                let got = call(c, &[b"XRANGE", n, b"-", b"+"]).await;
                let got: Vec<(String, Vec<(Bytes, Bytes)>)> = frame_array(&got)
                    .iter()
                    .map(|e| {
                        let e = frame_array(e);
                        let fields = frame_array(&e[1])
                            .chunks(2)
                            .map(|p| (frame_bytes(&p[0]), frame_bytes(&p[1])))
                            .collect();
                        (
                            String::from_utf8_lossy(&frame_bytes(&e[0])).into_owned(),
                            fields,
                        )
                    })
                    .collect();
                let mine: Vec<(String, Vec<(Bytes, Bytes)>)> = entries
                    .iter()
                    .map(|e| (e.id.to_string(), e.fields.clone()))
                    .collect();
                assert_eq!(got, mine, "{label}: entries");
                let meta = meta.as_ref().expect("meta");
                let info = frame_map(&call(c, &[b"XINFO", b"STREAM", n]).await);
                assert_eq!(
                    info["length"].as_integer(),
                    Some(meta.length as i64),
                    "{label}"
                );
                assert_eq!(
                    frame_bytes(&info["last-generated-id"]),
                    meta.last_id.to_string().as_bytes(),
                    "{label}"
                );
                if let Some(max_deleted) = meta.max_deleted_id {
                    assert_eq!(
                        frame_bytes(&info["max-deleted-entry-id"]),
                        max_deleted.to_string().as_bytes(),
                        "{label}"
                    );
                }
                if let Some(added) = meta.entries_added {
                    assert_eq!(
                        info["entries-added"].as_integer(),
                        Some(added as i64),
                        "{label}"
                    );
                }
                assert_eq!(info["groups"].as_integer(), Some(groups.len() as i64));
                let xgroups = call(c, &[b"XINFO", b"GROUPS", n]).await;
                for (g, info) in groups.iter().zip(frame_array(&xgroups)) {
                    let info = frame_map(info);
                    assert_eq!(frame_bytes(&info["name"]), g.name, "{label}");
                    assert_eq!(
                        frame_bytes(&info["last-delivered-id"]),
                        g.last_id.to_string().as_bytes(),
                        "{label}"
                    );
                    if let Some(read) = g.entries_read.filter(|&v| v != u64::MAX) {
                        assert_eq!(info["entries-read"].as_integer(), Some(read as i64));
                    }
                    let pel =
                        call(c, &[b"XPENDING", n, g.name.as_ref(), b"-", b"+", b"1000"]).await;
                    let pel: Vec<(String, Bytes, i64)> = frame_array(&pel)
                        .iter()
                        .map(|p| {
                            let p = frame_array(p);
                            (
                                String::from_utf8_lossy(&frame_bytes(&p[0])).into_owned(),
                                frame_bytes(&p[1]),
                                p[3].as_integer().expect("count"),
                            )
                        })
                        .collect();
                    let mine: Vec<(String, Bytes, i64)> = g
                        .pending
                        .iter()
                        .map(|p| {
                            let owner = g
                                .consumers
                                .iter()
                                .find(|c| c.pending.contains(&p.id))
                                .map(|c| c.name.clone())
                                .expect("owner");
                            (p.id.to_string(), owner, p.delivery_count as i64)
                        })
                        .collect();
                    assert_eq!(pel, mine, "{label}: PEL of {:?}", g.name);
                    let consumers = call(c, &[b"XINFO", b"CONSUMERS", n, g.name.as_ref()]).await;
                    let names: BTreeSet<Bytes> = frame_array(&consumers)
                        .iter()
                        .map(|c| frame_bytes(&frame_map(c)["name"]))
                        .collect();
                    let mine: BTreeSet<Bytes> =
                        g.consumers.iter().map(|c| c.name.clone()).collect();
                    assert_eq!(names, mine, "{label}: consumers");
                }
            }
            Value::Module(_) => panic!("{label}: no module is loaded"),
        }
    }
    let keyspace =
        String::from_utf8_lossy(&frame_bytes(&call(c, &[b"INFO", b"keyspace"]).await)).into_owned();
    let have: BTreeMap<u32, i64> = keyspace
        .lines()
        .filter_map(|l| {
            let (db, rest) = l.strip_prefix("db")?.split_once(':')?;
            let keys = rest.split(',').next()?.strip_prefix("keys=")?;
            Some((db.parse().ok()?, keys.parse().ok()?))
        })
        .collect();
    assert_eq!(have, per_db, "{name}: keys per db");
    let libraries = call(c, &[b"FUNCTION", b"LIST", b"WITHCODE"]).await;
    let codes: BTreeSet<Bytes> = frame_array(&libraries)
        .iter()
        .map(|lib| frame_bytes(&frame_map(lib)["library_code"]))
        .collect();
    let want: BTreeSet<Bytes> = content.functions.iter().cloned().collect();
    assert_eq!(codes, want, "{name}: function libraries");
}

#[test]
fn redis_7_loads_the_hand_built_dumps_as_parsed() {
    let rt = runtime();
    let mut loaded = 0;
    for case in cases().into_iter().filter(|c| c.redis_loads) {
        let server = redis_with_dump(case.name, &case.data);
        let content = model(&parse_ok(&case.data, ParseOptions::default()));
        rt.block_on(async {
            let mut c = connect(&server).await;
            assert_redis_holds(case.name, &mut c, &content).await;
        });
        loaded += 1;
    }
    assert_eq!(loaded, 11, "dumps Redis 7.0 can read");
}

#[test]
fn raw_captures_restore_into_redis_7() {
    let server = common::RedisServer::start(&["--sanitize-dump-payload", "yes"]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = connect(&server).await;
        let mut restored = 0;
        for case in cases().into_iter().filter(|c| c.redis_loads) {
            let content = model(&parse_ok(&case.data, ParseOptions::default()));
            for key in content.keys.values() {
                // Redis refuses empty collections.
                if key.chunks == 0 && key.header.value_type != ValueType::String {
                    continue;
                }
                let raw = key.raw.as_ref().expect("small values are captured");
                let payload = dump_payload(raw, content.version as u16);
                let name = format!("restored:{restored}");
                c.call([
                    b"RESTORE".as_ref(),
                    name.as_bytes(),
                    b"0",
                    payload.as_slice(),
                    b"REPLACE",
                ])
                .await
                .unwrap_or_else(|e| panic!("{}: RESTORE {:?}: {e}", case.name, key.header.key));
                let kind = c.call(["TYPE", name.as_str()]).await.expect("TYPE");
                assert_eq!(
                    frame_bytes(&kind),
                    key.header.value_type.as_str(),
                    "{}",
                    case.name
                );
                let (cmd, want) = match &key.value {
                    Value::String(s) => ("STRLEN", s.len()),
                    Value::List(l) => ("LLEN", l.len()),
                    Value::Set(s) => ("SCARD", s.len()),
                    Value::ZSet(z) => ("ZCARD", z.len()),
                    Value::Hash(h) => ("HLEN", h.len()),
                    Value::Stream { entries, .. } => ("XLEN", entries.len()),
                    Value::Module(_) => unreachable!("not in a dump Redis loads"),
                };
                let len = c.call([cmd, name.as_str()]).await.expect("len");
                assert_eq!(len.as_integer(), Some(want as i64), "{}: {cmd}", case.name);
                restored += 1;
            }
        }
        assert!(restored >= 60, "restored {restored} keys");
    });
}

/// The node forms of a quicklist 2 raw capture (`type byte ++ value`):
/// "plain" (LZF-compressed or not), "packed" or "lzf" (a packed node stored
/// LZF-compressed).
fn quicklist_node_forms(raw: &[u8]) -> Vec<&'static str> {
    assert_eq!(raw[0], TYPE_LIST_QUICKLIST_2);
    let mut pos = 1;
    let len = |pos: &mut usize| -> u64 {
        let first = raw[*pos];
        *pos += 1;
        match first >> 6 {
            0 => u64::from(first & 0x3f),
            1 => {
                *pos += 1;
                (u64::from(first & 0x3f) << 8) | u64::from(raw[*pos - 1])
            }
            2 if first == 0x80 => {
                *pos += 4;
                u64::from(u32::from_be_bytes(raw[*pos - 4..*pos].try_into().unwrap()))
            }
            _ => panic!("length form {first:#x} at {}", *pos - 1),
        }
    };
    let nodes = len(&mut pos);
    let mut forms = Vec::new();
    for _ in 0..nodes {
        let container = len(&mut pos);
        if raw[pos] == 0xC3 {
            pos += 1;
            let compressed = len(&mut pos);
            len(&mut pos);
            pos += compressed as usize;
            forms.push(if container == 1 { "plain" } else { "lzf" });
        } else {
            let n = len(&mut pos);
            pos += n as usize;
            forms.push(if container == 1 { "plain" } else { "packed" });
        }
    }
    assert_eq!(pos, raw.len(), "the whole value");
    forms
}

fn redis_dump(server: &common::RedisServer) -> Vec<u8> {
    std::fs::read(server.dir.path().join("dump.rdb")).expect("dump.rdb")
}

/// Sends `cmds` pipelined; every reply must be a success.
async fn run_all(c: &mut Client, cmds: Vec<Vec<String>>) {
    for cmd in &cmds {
        c.queue(&ferry::redis::command::Command::from_parts(cmd.clone()));
    }
    c.flush().await.expect("flush");
    for cmd in &cmds {
        let reply = c.read_reply().await.expect("reply");
        assert!(reply.error_message().is_none(), "{cmd:?}: {reply:?}");
    }
}

fn cmd(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// A real Redis 7.0 writes every encoding it has: strings raw, int and
/// LZF; quicklists with several listpack nodes, LZF-compressed nodes
/// (`list-compress-depth`) and plain nodes (elements above the packed
/// threshold); intsets of each width, hashtable sets; listpack and skiplist
/// zsets and hashes; a stream with groups; a function; keys in several
/// dbs; LFU counters. Its dump parses to exactly what it holds.
#[test]
fn redis_7_dump_of_every_encoding_parses_to_what_it_holds() {
    for policy in ["allkeys-lfu", "allkeys-lru"] {
        let server = common::RedisServer::start(&[
            "--list-max-listpack-size",
            "4",
            "--list-compress-depth",
            "1",
            "--set-max-intset-entries",
            "16",
            "--hash-max-listpack-entries",
            "16",
            "--zset-max-listpack-entries",
            "16",
            "--rdbcompression",
            "yes",
            "--maxmemory-policy",
            policy,
        ]);
        let rt = runtime();
        let data = rt.block_on(async {
            let mut c = connect(&server).await;
            call(&mut c, &[b"DEBUG", b"QUICKLIST-PACKED-THRESHOLD", b"1000"]).await;
            let mut cmds = vec![
                cmd(&["SET", "str:raw", "hello world"]),
                cmd(&["SET", "str:int", "-12345"]),
                cmd(&["SET", "str:lzf", &"compress me ".repeat(20)]),
                cmd(&["SET", "str:ttl", "v", "PX", "100000000"]),
                cmd(&["SADD", "set:intset16", "1", "-2", "300"]),
                cmd(&["SADD", "set:intset32", "1", "70000", "-2147483648"]),
                cmd(&["SADD", "set:intset64", "1", "9223372036854775807"]),
                cmd(&["SADD", "set:ht", "a", "b", "7"]),
                cmd(&["ZADD", "zset:lp", "1.5", "a", "-2", "b", "inf", "c"]),
                cmd(&["HSET", "hash:lp", "f1", "v1", "f2", "2"]),
                cmd(&[
                    "FUNCTION",
                    "LOAD",
                    "#!lua name=lib\nredis.register_function('f', function() return 1 end)",
                ]),
                cmd(&["SELECT", "5"]),
                cmd(&["SET", "db5:key", "in db 5"]),
                cmd(&["SELECT", "0"]),
            ];
            let mut list = cmd(&["RPUSH", "list:quicklist"]);
            list.extend((0..40).map(|i| format!("item-{i}-{}", "z".repeat(20 + i % 7))));
            list.push("p".repeat(3000));
            list.extend((0..10).map(|i| i.to_string()));
            cmds.push(list);
            let mut set = cmd(&["SADD", "set:big"]);
            set.extend((0..100).map(|i| format!("m{i}")));
            cmds.push(set);
            let mut zset = cmd(&["ZADD", "zset:skiplist"]);
            zset.extend((0..50).flat_map(|i| [format!("{}", i as f64 / 7.0), format!("z{i}")]));
            cmds.push(zset);
            let mut hash = cmd(&["HSET", "hash:ht"]);
            hash.extend((0..50).flat_map(|i| [format!("field{i}"), format!("value{i}")]));
            cmds.push(hash);
            for i in 0..12 {
                cmds.push(vec![
                    "XADD".into(),
                    "stream".into(),
                    format!("{}-{}", 1000 + i / 3, i % 3),
                    "f".into(),
                    format!("v{i}"),
                ]);
            }
            cmds.push(cmd(&["XADD", "stream", "2000-0", "other", "shape"]));
            cmds.push(cmd(&["XDEL", "stream", "1001-1"]));
            cmds.push(cmd(&["XGROUP", "CREATE", "stream", "g1", "0"]));
            cmds.push(cmd(&[
                "XREADGROUP",
                "GROUP",
                "g1",
                "alice",
                "COUNT",
                "3",
                "STREAMS",
                "stream",
                ">",
            ]));
            run_all(&mut c, cmds).await;
            // Touch some keys so that LFU counters and idle times differ.
            for _ in 0..20 {
                call(&mut c, &[b"GET", b"str:raw"]).await;
            }
            call(&mut c, &[b"SAVE"]).await;
            let data = redis_dump(&server);
            let content = model(&parse_ok(&data, ParseOptions::default()));
            assert_redis_holds(policy, &mut c, &content).await;
            let enc = |k: &str| content.key(k).header.encoding;
            assert_eq!(enc("list:quicklist"), TYPE_LIST_QUICKLIST_2);
            let forms = quicklist_node_forms(content.key("list:quicklist").raw.as_ref().unwrap());
            for form in ["plain", "packed", "lzf"] {
                assert!(forms.contains(&form), "{form} node in {forms:?}");
            }
            let lzf = content.key("str:lzf").raw.as_ref().unwrap();
            assert_eq!(lzf[1], 0xC3, "an LZF-compressed string value");
            assert_eq!(enc("set:intset16"), TYPE_SET_INTSET);
            assert_eq!(enc("set:intset64"), TYPE_SET_INTSET);
            assert_eq!(enc("set:ht"), TYPE_SET);
            assert_eq!(enc("zset:lp"), TYPE_ZSET_LISTPACK);
            assert_eq!(enc("zset:skiplist"), TYPE_ZSET_2);
            assert_eq!(enc("hash:lp"), TYPE_HASH_LISTPACK);
            assert_eq!(enc("hash:ht"), TYPE_HASH);
            assert_eq!(enc("stream"), TYPE_STREAM_LISTPACKS_2);
            assert_eq!(content.functions.len(), 1);
            let hints = &content.key("str:raw").header;
            match policy {
                "allkeys-lfu" => assert!(hints.lfu_freq.is_some_and(|f| f > 0), "{hints:?}"),
                _ => assert!(hints.lru_idle.is_some(), "{hints:?}"),
            }
            data
        });
        check_streaming(policy, &data);
    }
}

fn redis_content(server: &common::RedisServer, opts: ParseOptions) -> (Content, Vec<RdbEvent>) {
    let path = server.dir.path().join("dump.rdb");
    let file = std::fs::File::open(&path).expect("dump.rdb");
    let (events, end) = parse_events(std::io::BufReader::new(file), opts);
    end.expect("redis dump parses");
    (model(&events), events)
}

/// Big collections from a real Redis 7.0 come out in bounded chunks, and
/// stream groups' content (PEL owners, delivery counts, consumers) is what
/// Redis reports.
#[test]
fn redis_7_dump_matches_what_redis_reports() {
    let server = common::RedisServer::start(&[
        "--hash-max-listpack-entries",
        "16",
        "--set-max-intset-entries",
        "16",
        "--zset-max-listpack-entries",
        "16",
        "--list-max-listpack-size",
        "8",
    ]);
    let rt = runtime();
    let opts = ParseOptions {
        chunk_items: 100,
        chunk_bytes: 4096,
        ..ParseOptions::default()
    };
    rt.block_on(async {
        let mut c = connect(&server).await;
        let s = |v: &str| v.to_string();
        let mut cmds = vec![
            cmd(&["SET", "str:raw", "hello world"]),
            cmd(&["SET", "str:int", "-12345"]),
            vec![s("SET"), s("str:big"), "x".repeat(100_000)],
            cmd(&["SET", "str:ttl", "v", "PX", "100000000"]),
            cmd(&["RPUSH", "list:small", "a", "1", "b"]),
        ];
        let mut big_list = cmd(&["RPUSH", "list:big"]);
        big_list.extend((0..3000).map(|i| format!("item-{i}")));
        cmds.push(big_list);
        let mut intset = cmd(&["SADD", "set:intset"]);
        intset.extend((0..10).map(|i| (i * 1000 - 3000).to_string()));
        cmds.push(intset);
        cmds.push(cmd(&["SADD", "set:listpack", "a", "b", "7"]));
        let mut set_ht = cmd(&["SADD", "set:ht"]);
        set_ht.extend((0..500).map(|i| format!("m{i}")));
        cmds.push(set_ht);
        cmds.push(cmd(&[
            "ZADD",
            "zset:small",
            "1.5",
            "a",
            "-2",
            "b",
            "inf",
            "c",
        ]));
        let mut zset_big = cmd(&["ZADD", "zset:big"]);
        zset_big.extend((0..300).flat_map(|i| [format!("{}", i as f64 / 7.0), format!("z{i}")]));
        cmds.push(zset_big);
        cmds.push(cmd(&["HSET", "hash:small", "f1", "v1", "f2", "2"]));
        let mut hash_big = cmd(&["HSET", "hash:big"]);
        hash_big.extend((0..2000).flat_map(|i| [format!("field{i}"), format!("value{i}")]));
        cmds.push(hash_big);
        for i in 0..20 {
            cmds.push(vec![
                s("XADD"),
                s("stream"),
                format!("{}-{}", 1000 + i / 3, i % 3),
                s("f"),
                format!("v{i}"),
                s("n"),
                i.to_string(),
            ]);
        }
        cmds.push(cmd(&["XADD", "stream", "2000-0", "other", "shape"]));
        cmds.push(cmd(&["XDEL", "stream", "1001-1"]));
        cmds.push(cmd(&["XGROUP", "CREATE", "stream", "g1", "0"]));
        cmds.push(cmd(&["XGROUP", "CREATE", "stream", "g2", "$"]));
        cmds.push(cmd(&[
            "XREADGROUP",
            "GROUP",
            "g1",
            "alice",
            "COUNT",
            "3",
            "STREAMS",
            "stream",
            ">",
        ]));
        cmds.push(cmd(&[
            "XREADGROUP",
            "GROUP",
            "g1",
            "bob",
            "COUNT",
            "2",
            "STREAMS",
            "stream",
            ">",
        ]));
        cmds.push(cmd(&["XACK", "stream", "g1", "1000-1"]));
        cmds.push(cmd(&["XGROUP", "CREATECONSUMER", "stream", "g2", "carol"]));
        cmds.push(cmd(&["XADD", "stream:empty", "1-1", "a", "b"]));
        cmds.push(cmd(&["XDEL", "stream:empty", "1-1"]));
        run_all(&mut c, cmds).await;
        call(&mut c, &[b"SAVE"]).await;

        let (content, events) = redis_content(&server, opts.clone());
        rdb_support::assert_chunk_limits(&events, &opts, "redis 7 dump");
        assert_eq!(content.version, 10);
        assert_eq!(content.keys.len(), 15);
        let enc = |k: &str| content.key(k).header.encoding;
        assert_eq!(enc("list:small"), 18);
        assert_eq!(enc("set:intset"), 11);
        // Redis 7.0 has no set listpack (7.2 does): a small non-integer set is a hashtable.
        assert_eq!(enc("set:listpack"), 2);
        assert_eq!(enc("set:ht"), 2);
        assert_eq!(enc("zset:small"), 17);
        assert_eq!(enc("zset:big"), 5);
        assert_eq!(enc("hash:small"), 16);
        assert_eq!(enc("hash:big"), 4);
        assert_eq!(enc("stream"), 19);
        let chunks_of = |k: &str| content.key(k).chunks;
        assert!(chunks_of("list:big") >= 30, "3000 items in chunks of 100");
        assert!(chunks_of("hash:big") >= 20);
        let ttl = content.key("str:ttl").header.expire_ms.expect("ttl");
        assert!((ttl - now_ms() - 100_000_000).abs() < 60_000);
        assert_redis_holds("redis 7 dump", &mut c, &content).await;
        // Group content the commands above do not show directly.
        let Value::Stream {
            groups, entries, ..
        } = &content.key("stream").value
        else {
            panic!("stream")
        };
        assert_eq!(entries.len(), 20, "21 added, 1 deleted");
        let g1 = &groups[0];
        assert_eq!(g1.pending.len(), 4);
        assert_eq!(
            g1.consumers.iter().map(|c| c.pending.len()).sum::<usize>(),
            4
        );
        assert_eq!(groups[1].consumers[0].name, b("carol"));
        let Value::Stream { entries, meta, .. } = &content.key("stream:empty").value else {
            panic!("stream")
        };
        assert!(entries.is_empty());
        assert_eq!(meta.as_ref().map(|m| m.length), Some(0));
    });
}

// ---------------------------------------------------------------------------
// Refused input: typed errors naming where.

#[test]
fn headers_are_checked() {
    let refuse = |data: &[u8]| parse_err(data);
    assert!(
        matches!(refuse(b"VALKEY080\xff"), RdbError::UnsupportedVersion { found, .. } if found == "VALKEY080")
    );
    let future = Dump::new(99);
    let (data, _) = {
        let mut d = future;
        d.string("x", b"future", StrForm::Plain);
        d.finish(Trailer::Wrong)
    };
    assert!(matches!(
        refuse(&data),
        RdbError::UnsupportedVersion { found, max: 13 } if found == "REDIS0099"
    ));
    assert!(matches!(
        refuse(b"REDIS0000\xff"),
        RdbError::UnsupportedVersion { .. }
    ));
    assert!(matches!(
        refuse(b"*1\r\n$4\r\nPING\r\n"),
        RdbError::BadMagic { .. }
    ));
    assert!(matches!(
        refuse(b"REDIS00x1\xff"),
        RdbError::BadMagic { .. }
    ));
    assert!(matches!(refuse(b""), RdbError::UnexpectedEof { .. }));
    assert!(matches!(refuse(b"RED"), RdbError::UnexpectedEof { .. }));
    assert!(matches!(
        refuse(b"REDIS0011\x08"),
        RdbError::UnknownType { byte: 8, offset: 9 }
    ));
}

/// 15 good keys, then a list ziplist whose first entry claims more bytes
/// than the blob has; returns the bytes and the offset of the bad blob.
pub fn corrupt_ziplist_dump() -> (Vec<u8>, u64) {
    let mut d = Dump::new(9);
    d.select_db(0);
    for i in 0..15 {
        d.string(
            &format!("good:{i:02}"),
            format!("value {i}").as_bytes(),
            StrForm::Plain,
        );
    }
    let mut zl = ferry::redis::rdb::encoding::ziplist::encode(&[
        ferry::redis::rdb::encoding::Element::Str(b("abc")),
        ferry::redis::rdb::encoding::Element::Str(b("def")),
    ]);
    zl[11] = 40; // the first string's length, past the end of the blob
    d.custom("mylist", TYPE_LIST_ZIPLIST, Value::List(vec![]), |w| {
        w.string(&zl);
    });
    let blob_at = d.key_offsets[&(0, b("mylist"))] + 1 + 1 + "mylist".len() as u64;
    d.string("after", b"never read", StrForm::Plain);
    (d.finish(Trailer::Disabled).0, blob_at)
}

#[test]
fn corrupt_blobs_are_refused_naming_the_key_and_offset() {
    let (data, blob_at) = corrupt_ziplist_dump();
    let (events, end) = parse_events(&data[..], ParseOptions::default());
    match end {
        Err(RdbError::Corrupt { offset, what }) => {
            assert_eq!(offset, blob_at);
            assert!(
                what.contains("\"mylist\"") && what.contains("ziplist"),
                "{what}"
            );
        }
        other => panic!("{other:?}"),
    }
    let keys = events
        .iter()
        .filter(|e| matches!(e, RdbEvent::KeyEnd { .. }))
        .count();
    assert_eq!(keys, 15, "the keys before it came out whole");

    let corrupt = |name: &str, build: &dyn Fn(&mut Dump)| -> (u64, String) {
        let mut d = Dump::new(11);
        d.select_db(0);
        build(&mut d);
        let (data, _) = d.finish(Trailer::Checksum);
        match parse_err(&data) {
            RdbError::Corrupt { offset, what } => {
                assert!(
                    offset > 9 && (offset as usize) < data.len(),
                    "{name}: {offset}"
                );
                (offset, what)
            }
            other => panic!("{name}: {other:?}"),
        }
    };
    // An intset that is not sorted.
    let (_, what) = corrupt("intset", &|d| {
        let mut blob = ferry::redis::rdb::encoding::intset::encode(&[1, 2, 3]);
        blob[8] = 9;
        d.custom("is", TYPE_SET_INTSET, Value::Set(BTreeSet::new()), |w| {
            w.string(&blob);
        });
    });
    assert!(what.contains("\"is\"") && what.contains("intset"), "{what}");
    // A quicklist node container that does not exist.
    let (_, what) = corrupt("container", &|d| {
        d.custom("ql", TYPE_LIST_QUICKLIST_2, Value::List(vec![]), |w| {
            w.len(1).len(3).string(b"x");
        });
    });
    assert!(
        what.contains("\"ql\"") && what.contains("container 3"),
        "{what}"
    );
    // A stream entry whose lp-count does not match its fields.
    let (_, what) = corrupt("lp-count", &|d| {
        let node = StreamNode {
            master: sid(1, 0),
            master_fields: strs(&["f"]),
            entries: vec![NodeEntry {
                id: sid(1, 0),
                fields: pairs(&[("f", "v")]),
                deleted: false,
            }],
        };
        let mut lp_elements = ferry::redis::rdb::encoding::listpack::ListpackIter::new(
            Bytes::from(stream_listpack(&node)),
        )
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
        *lp_elements.last_mut().unwrap() = ferry::redis::rdb::encoding::Element::Int(9);
        let lp = ferry::redis::rdb::encoding::listpack::encode(&lp_elements);
        d.custom("s", TYPE_STREAM_LISTPACKS_3, Value::List(vec![]), |w| {
            w.len(1)
                .string(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
                .string(&lp);
        });
    });
    assert!(what.contains("lp-count 9"), "{what}");
    // A consumer owning an entry its group's PEL does not hold.
    let (_, what) = corrupt("consumer PEL", &|d| {
        let mut spec = sample_stream();
        spec.groups[0].consumers[2].pending = vec![sid(5, 5)];
        d.stream("s", TYPE_STREAM_LISTPACKS_3, &spec);
    });
    assert!(what.contains("owns 5-5"), "{what}");
    // A zset ziplist score that is not a number.
    let (_, what) = corrupt("score", &|d| {
        d.zset_compact("z", true, &[("m", "1")]);
        let zl = ferry::redis::rdb::encoding::listpack::encode(&[
            ferry::redis::rdb::encoding::Element::Str(b("m")),
            ferry::redis::rdb::encoding::Element::Str(b("not a score")),
        ]);
        d.custom("z2", TYPE_ZSET_LISTPACK, Value::ZSet(vec![]), |w| {
            w.string(&zl);
        });
    });
    assert!(what.contains("not a number"), "{what}");
}

#[test]
fn checksums_are_verified_unless_disabled() {
    let build = |trailer| {
        let mut d = Dump::new(8);
        d.select_db(0);
        d.string("x", b"1", StrForm::Plain);
        d.string("x2", b"2", StrForm::Plain);
        d.finish(trailer)
    };
    let (wrong, _) = build(Trailer::Wrong);
    match parse_err(&wrong) {
        RdbError::ChecksumMismatch { expected, computed } => assert_ne!(expected, computed),
        other => panic!("{other:?}"),
    }
    // And it parses when verification is off.
    let opts = ParseOptions {
        verify_checksum: false,
        ..ParseOptions::default()
    };
    let content = model(&parse_ok(&wrong, opts));
    assert_eq!(content.keys.len(), 2);
    let (disabled, _) = build(Trailer::Disabled);
    assert_eq!(
        model(&parse_ok(&disabled, ParseOptions::default())).checksum,
        Some(Some(0))
    );
    // A file cut right after EOF lacks its checksum.
    let (good, _) = build(Trailer::Checksum);
    assert!(matches!(
        parse_err(&good[..good.len() - 3]),
        RdbError::UnexpectedEof { .. }
    ));
}

#[test]
fn pre_ga_module_values_are_refused() {
    let mut w = RdbWriter::new(8);
    w.byte(TYPE_MODULE_PRE_GA).string(b"k").len(1);
    let data = w.finish(Trailer::Checksum);
    match parse_err(&data) {
        RdbError::Unsupported { offset: 9, what } => assert!(what.contains("\"k\""), "{what}"),
        other => panic!("{other:?}"),
    }
}

/// An AOF with an RDB preamble: the parser stops after EOF and the
/// checksum, and hands back what follows unread.
#[test]
fn rdb_preamble_stops_at_the_rdb_end() {
    let mut d = Dump::new(10);
    d.select_db(0);
    d.string("k1", b"v1", StrForm::Plain);
    d.string("k2", b"v2", StrForm::Plain);
    let (mut data, _) = d.finish(Trailer::Checksum);
    let rdb_len = data.len();
    let tail = b"*3\r\n$3\r\nSET\r\n$2\r\nk3\r\n$2\r\nv3\r\n";
    data.extend_from_slice(tail);
    let mut parser = RdbParser::new(&data[..], ParseOptions::default());
    let mut events = Vec::new();
    while let Some(ev) = parser.next_event().expect("parses") {
        events.push(ev);
    }
    let content = model(&events);
    assert_eq!(content.key("k1").value, Value::String(b("v1")));
    assert_eq!(content.key("k2").value, Value::String(b("v2")));
    assert_eq!(parser.offset() as usize, rdb_len);
    let (_, rest) = parser.into_parts();
    assert_eq!(&rest[..], &tail[..]);
}

#[test]
fn raw_capture_respects_its_limit() {
    let case = rdb2_oldest_encodings();
    let data = &case.data;
    let full = model(&parse_ok(data, ParseOptions::default()));
    let raw = full.key("force_linkedlist").raw.clone().expect("captured");
    assert!(raw.len() > 15_000);
    let with_limit = |limit: usize| {
        let opts = ParseOptions {
            raw_capture_limit: limit,
            ..ParseOptions::default()
        };
        model(&parse_ok(data, opts))
            .key("force_linkedlist")
            .raw
            .clone()
    };
    assert_eq!(with_limit(raw.len() - 1), None);
    assert_eq!(with_limit(raw.len()), Some(raw));
    assert_eq!(with_limit(0), None);
}

#[test]
fn string_limit_is_checked_before_reading() {
    let case = rdb3_strings_and_lengths();
    let opts = ParseOptions {
        max_string_len: 1000,
        ..ParseOptions::default()
    };
    let (_, end) = parse_events(&case.data[..], opts);
    assert!(
        matches!(end, Err(RdbError::TooLarge { limit: 1000, len, .. }) if len > 1000),
        "{end:?}"
    );
    // A 4 GiB claim in a tiny file is refused by the limit, not allocated.
    let mut w = RdbWriter::new(9);
    w.byte(TYPE_STRING)
        .string(b"k")
        .raw(&[0x80, 0xFF, 0xFF, 0xFF, 0xF0]);
    let data = w.finish(Trailer::Checksum);
    assert!(matches!(parse_err(&data), RdbError::TooLarge { .. }));
    // And an LZF string whose declared size is beyond the limit too.
    let mut w = RdbWriter::new(9);
    w.byte(TYPE_STRING)
        .string(b"k")
        .byte(0xC3)
        .len(3)
        .len(1 << 40)
        .raw(b"abc");
    let data = w.finish(Trailer::Checksum);
    assert!(
        matches!(parse_err(&data), RdbError::TooLarge { .. }),
        "{:?}",
        parse_err(&data)
    );
}
