//! Conformance suite: the streaming RDB parser, `ferry rdb dump` and
//! `ferry rdb load` against the public fixture corpus (files written by
//! many Redis versions and other tools, described by its `INDEX.tsv`) and
//! the corpus's expectation files.
//!
//! The corpus is not part of the repository: it is the directory named by
//! `FERRY_RDB_CORPUS` (in this project's CI, `../shared/fixtures/rdb`). So
//! a plain `cargo test` lists these tests as ignored, and every one of them
//! fails naming the variable when run without it:
//!
//! ```sh
//! FERRY_RDB_CORPUS=../shared/fixtures/rdb cargo test --test rdb_corpus -- --ignored
//! ```
//!
//! `tools/test.sh` runs them whenever the corpus is there, `.ci/run`
//! requires it. The default suite covers the same format families with
//! dumps it makes itself (`rdb_formats`, `rdb_cli`, `rdb_roundtrip`).
//!
//! Every fixture of kind `rdb` / `rdb-preamble-aof` either parses to `End`
//! or, when INDEX marks it as intentionally broken, is refused with the
//! matching typed error. Parsed content is compared with librdb's
//! `*_data.json`, redis's `encodings-expected.csv` and the facts that
//! redis-rdb-tools' tests assert (recorded in INDEX's contents column).
mod common;
mod rdb_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use bytes::Bytes;
use ferry::redis::rdb::{dump_payload, ParseOptions, RdbError, RdbParser, ValueType};
use rdb_support::{
    b, check_chunk_limits, check_tiny_reads, check_truncations, model, now_ms, parse_events,
    parse_ok, Content, Key, Value,
};

/// The corpus directory (`FERRY_RDB_CORPUS`); fails, naming the variable,
/// when it is not set or does not hold the corpus.
fn corpus_dir() -> PathBuf {
    let Some(dir) = std::env::var_os("FERRY_RDB_CORPUS") else {
        panic!(
            "FERRY_RDB_CORPUS is not set: these tests need the public RDB fixture corpus \
             (in this project: FERRY_RDB_CORPUS=../shared/fixtures/rdb)"
        );
    };
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("INDEX.tsv").is_file(),
        "FERRY_RDB_CORPUS={} holds no INDEX.tsv",
        dir.display()
    );
    dir
}

// ---------------------------------------------------------------------------
// INDEX.tsv

struct Fixture {
    path: String,
    rdb_version: String,
    contents: String,
    kind: String,
    summary: String,
}

fn fixtures() -> Vec<Fixture> {
    let index = std::fs::read_to_string(corpus_dir().join("INDEX.tsv")).expect("INDEX.tsv");
    index
        .lines()
        .skip(1)
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            Fixture {
                path: cols[0].to_string(),
                rdb_version: cols[2].to_string(),
                contents: cols[3].to_string(),
                kind: cols[7].to_string(),
                summary: cols.get(11).unwrap_or(&"").to_string(),
            }
        })
        .collect()
}

fn rdb_fixtures() -> Vec<Fixture> {
    let all: Vec<Fixture> = fixtures()
        .into_iter()
        .filter(|f| f.kind == "rdb" || f.kind == "rdb-preamble-aof")
        .collect();
    assert!(all.len() >= 80, "INDEX lists {} RDB fixtures", all.len());
    all
}

fn read_fixture(rel: &str) -> Vec<u8> {
    std::fs::read(corpus_dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// What INDEX says should happen to a fixture.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Parses,
    Corrupt,
    UnsupportedVersion,
    ChecksumMismatch,
}

fn expectation(f: &Fixture) -> Expect {
    let c = &f.contents;
    if c.starts_with("INTENTIONALLY CORRUPT") {
        Expect::Corrupt
    } else if c.starts_with("INTENTIONALLY UNSUPPORTED") {
        Expect::UnsupportedVersion
    } else if c.starts_with("INTENTIONALLY BAD CHECKSUM") {
        Expect::ChecksumMismatch
    } else if c.starts_with("INTENTIONALLY") {
        // corrupt_empty_keys: "Redis skips all -> dbsize 0", i.e. it loads.
        assert!(c.contains("Redis skips all"), "unhandled INDEX marker: {c}");
        Expect::Parses
    } else {
        Expect::Parses
    }
}

fn summary_field<'a>(summary: &'a str, name: &str) -> Option<&'a str> {
    summary
        .split("; ")
        .find_map(|part| part.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn every_fixture_parses_or_is_refused_with_the_right_error() {
    let mut parsed = 0;
    for f in rdb_fixtures() {
        let data = read_fixture(&f.path);
        let (events, end) = parse_events(&data[..], ParseOptions::default());
        match (expectation(&f), end) {
            (Expect::Parses, Ok(offset)) => {
                parsed += 1;
                let content = model(&events);
                assert_eq!(
                    content.version.to_string(),
                    f.rdb_version.trim_start_matches('0'),
                    "{}",
                    f.path
                );
                let checksum = content
                    .checksum
                    .unwrap_or_else(|| panic!("{}: no End", f.path));
                let crc = summary_field(&f.summary, "crc").unwrap_or("");
                if crc.starts_with("n/a") {
                    assert_eq!(checksum, None, "{}", f.path);
                } else if crc.starts_with("disabled") {
                    assert_eq!(checksum, Some(0), "{}", f.path);
                } else {
                    assert!(
                        checksum.is_some_and(|c| c != 0),
                        "{}: checksum {checksum:?}",
                        f.path
                    );
                }
                let trailing = summary_field(&f.summary, "trailing_bytes_after_crc")
                    .map_or(0, |n| n.parse::<u64>().expect("trailing count"));
                assert_eq!(
                    offset + trailing,
                    data.len() as u64,
                    "{}: End offset",
                    f.path
                );
                // The skim's type counts and expiry counts, where it finished.
                if !f.summary.contains("walker stopped") {
                    let types = summary_field(&f.summary, "types").unwrap_or("-");
                    let key_count: usize = if types == "-" {
                        0
                    } else {
                        types
                            .split(',')
                            .map(|t| {
                                t.rsplit_once(':')
                                    .expect("type:count")
                                    .1
                                    .parse::<usize>()
                                    .expect("count")
                            })
                            .sum()
                    };
                    assert_eq!(content.keys.len(), key_count, "{}: key count", f.path);
                    let expires: usize = summary_field(&f.summary, "expires")
                        .map_or(0, |n| n.parse().expect("expires"));
                    let with_expiry = content
                        .keys
                        .values()
                        .filter(|k| k.header.expire_ms.is_some())
                        .count();
                    assert_eq!(with_expiry, expires, "{}: keys with expiry", f.path);
                }
            }
            (Expect::Corrupt, Err(RdbError::Corrupt { offset, what })) => {
                assert!(
                    offset > 9 && (offset as usize) < data.len(),
                    "{}: offset {offset}",
                    f.path
                );
                assert!(
                    what.contains("key"),
                    "{}: error names the key: {what}",
                    f.path
                );
            }
            (Expect::UnsupportedVersion, Err(RdbError::UnsupportedVersion { found, max })) => {
                assert_eq!(found, format!("REDIS{:0>4}", f.rdb_version), "{}", f.path);
                assert_eq!(max, 13);
            }
            (Expect::ChecksumMismatch, Err(RdbError::ChecksumMismatch { expected, computed })) => {
                assert_ne!(expected, computed);
                // And it parses when verification is off.
                let opts = ParseOptions {
                    verify_checksum: false,
                    ..ParseOptions::default()
                };
                parse_ok(&data, opts);
            }
            (expect, end) => panic!("{}: expected {expect:?}, got {end:?}", f.path),
        }
    }
    assert!(parsed >= 80, "only {parsed} fixtures parsed");
}

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn empty_collections_come_out_without_chunks() {
    for path in [
        "redis/tests__assets__corrupt_empty_keys.rdb",
        "redis/6.2-branch__tests__assets__corrupt_empty_keys.rdb",
    ] {
        let content = model(&parse_ok(&read_fixture(path), ParseOptions::default()));
        assert!(content.keys.len() >= 8, "{path}");
        for key in content.keys.values() {
            assert_eq!(key.chunks, 0, "{path}: {:?} has chunks", key.header.key);
        }
    }
}

// ---------------------------------------------------------------------------
// Streaming: tiny reads, truncation, chunk limits.

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn tiny_reads_give_identical_events() {
    for f in rdb_fixtures() {
        check_tiny_reads(&f.path, &read_fixture(&f.path));
    }
}

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn truncated_fixtures_fail_cleanly() {
    for f in rdb_fixtures() {
        if expectation(&f) == Expect::Parses {
            check_truncations(&f.path, &read_fixture(&f.path));
        }
    }
}

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn chunk_limits_hold_and_do_not_change_content() {
    for f in rdb_fixtures() {
        if expectation(&f) == Expect::Parses {
            check_chunk_limits(&f.path, &read_fixture(&f.path));
        }
    }
}

// ---------------------------------------------------------------------------
// librdb expectation files (`*_data.json` and friends).

/// librdb writes a JSON object body without the braces (or an array of them,
/// one per db); wrap and parse it.
fn librdb_json(rel: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(corpus_dir().join(rel)).expect("json");
    let text = text.trim();
    if text.is_empty() {
        return vec![serde_json::Map::new()];
    }
    if text.starts_with('[') {
        let dbs: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_str(text).expect("json array");
        return dbs;
    }
    let obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&format!("{{{text}}}")).unwrap_or_else(|e| panic!("{rel}: {e}"));
    vec![obj]
}

fn json_str(v: &serde_json::Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a JSON string, got {v}"))
}

fn json_score(v: &serde_json::Value) -> f64 {
    let s = json_str(v);
    match s {
        "inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        _ => s.parse().unwrap_or_else(|_| panic!("score {s}")),
    }
}

fn compare_librdb(rdb: &str, json: &str) {
    let content = model(&parse_ok(&read_fixture(rdb), ParseOptions::default()));
    let dbs = librdb_json(json);
    let multi_db = dbs.len() > 1;
    let mut expected_keys = BTreeSet::new();
    for (db_index, db) in dbs.iter().enumerate() {
        for (name, expected) in db {
            match name.as_str() {
                "__aux__" => {
                    for (k, v) in expected.as_object().expect("aux object") {
                        assert!(
                            content
                                .aux
                                .iter()
                                .any(|(ak, av)| ak == k.as_bytes() && av == json_str(v).as_bytes()),
                            "{rdb}: aux {k}={v} missing"
                        );
                    }
                    continue;
                }
                "__func__" => {
                    let mut want: Vec<&str> = expected
                        .as_object()
                        .expect("func")
                        .values()
                        .map(json_str)
                        .collect();
                    let mut have: Vec<String> = content
                        .functions
                        .iter()
                        .map(|c| String::from_utf8_lossy(c).into_owned())
                        .collect();
                    want.sort();
                    have.sort();
                    assert_eq!(have, want, "{rdb}: functions");
                    continue;
                }
                "__slotinfo__" => {
                    let o = expected.as_object().expect("slotinfo");
                    let want = (
                        o["slotId"].as_u64().expect("id"),
                        o["slotSize"].as_u64().expect("size"),
                        o["slotSExpiresSize"].as_u64().expect("expires"),
                    );
                    assert_eq!(content.slot_info, vec![want], "{rdb}");
                    continue;
                }
                "__dbsize__" => {
                    let o = expected.as_object().expect("dbsize");
                    let want = (
                        o["size"].as_u64().expect("size"),
                        o["expires"].as_u64().expect("expires"),
                    );
                    assert_eq!(content.resize, vec![want], "{rdb}");
                    continue;
                }
                _ => {}
            }
            let key = content
                .keys
                .iter()
                .find(|((db, k), _)| {
                    k.as_ref() == name.as_bytes() && (!multi_db || *db as usize == db_index)
                })
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("{rdb}: key {name} missing"));
            expected_keys.insert((key.header.db, Bytes::copy_from_slice(name.as_bytes())));
            compare_value(rdb, name, &key.value, expected);
        }
    }
    // librdb leaves out keys that had already expired.
    for (id, key) in &content.keys {
        if !expected_keys.contains(id) {
            let expire = key.header.expire_ms;
            assert!(
                expire.is_some_and(|e| e < now_ms()),
                "{rdb}: unexpected key {:?}",
                id.1
            );
        }
    }
}

fn compare_value(rdb: &str, name: &str, value: &Value, expected: &serde_json::Value) {
    match (value, expected) {
        (Value::String(s), serde_json::Value::String(e)) => {
            assert_eq!(s, e.as_bytes(), "{rdb}: {name}")
        }
        (Value::Module(module), serde_json::Value::String(e)) => {
            assert!(
                e.contains(&format!("Module '{module}'")),
                "{rdb}: {name}: {module} vs {e}"
            )
        }
        (Value::List(items), serde_json::Value::Array(e)) => {
            let want: Vec<Bytes> = e.iter().map(|v| b(json_str(v))).collect();
            assert_eq!(items, &want, "{rdb}: {name}");
        }
        (Value::Set(members), serde_json::Value::Array(e)) => {
            let want: BTreeSet<Bytes> = e.iter().map(|v| b(json_str(v))).collect();
            assert_eq!(members, &want, "{rdb}: {name}");
        }
        (Value::ZSet(entries), serde_json::Value::Object(e)) => {
            assert_eq!(entries.len(), e.len(), "{rdb}: {name}");
            for (member, score) in entries {
                let want = json_score(&e[std::str::from_utf8(member).expect("utf8 member")]);
                assert!(
                    *score == want || (score - want).abs() <= want.abs() * 1e-15,
                    "{rdb}: {name}: {score} vs {want}"
                );
            }
        }
        (Value::Hash(fields), serde_json::Value::Object(e)) => {
            let have: BTreeMap<String, String> = fields
                .iter()
                .map(|(k, (v, _))| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect();
            let want: BTreeMap<String, String> = e
                .iter()
                .map(|(k, v)| (k.clone(), json_str(v).to_string()))
                .collect();
            assert_eq!(have, want, "{rdb}: {name}");
        }
        (
            Value::Stream {
                entries,
                meta,
                groups,
            },
            serde_json::Value::Object(e),
        ) => {
            let want: Vec<(String, BTreeMap<String, String>)> = e["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .map(|entry| {
                    let items = entry["items"]
                        .as_object()
                        .expect("items")
                        .iter()
                        .map(|(k, v)| (k.clone(), json_str(v).to_string()))
                        .collect();
                    (json_str(&entry["id"]).to_string(), items)
                })
                .collect();
            let have: Vec<(String, BTreeMap<String, String>)> = entries
                .iter()
                .map(|entry| {
                    let items = entry
                        .fields
                        .iter()
                        .map(|(k, v)| {
                            (
                                String::from_utf8_lossy(k).into_owned(),
                                String::from_utf8_lossy(v).into_owned(),
                            )
                        })
                        .collect();
                    (entry.id.to_string(), items)
                })
                .collect();
            assert_eq!(have, want, "{rdb}: {name} entries");
            let meta = meta.as_ref().expect("stream meta");
            if let Some(length) = e.get("length") {
                assert_eq!(Some(meta.length), length.as_u64(), "{rdb}: {name} length");
                assert_eq!(meta.last_id.to_string(), json_str(&e["lastID"]));
                assert_eq!(
                    meta.first_id.map(|i| i.to_string()).as_deref(),
                    e["firstID"].as_str()
                );
                assert_eq!(
                    meta.max_deleted_id.map(|i| i.to_string()).as_deref(),
                    e["maxDelEntryID"].as_str()
                );
                assert_eq!(meta.entries_added, e["entriesAdded"].as_u64());
                let want_groups = e["groups"].as_array().expect("groups");
                assert_eq!(groups.len(), want_groups.len());
                for (g, w) in groups.iter().zip(want_groups) {
                    assert_eq!(g.name, json_str(&w["name"]).as_bytes());
                    assert_eq!(g.last_id.to_string(), json_str(&w["lastid"]));
                    assert_eq!(g.entries_read, w["entriesRead"].as_u64());
                    let pel: Vec<(String, i64, u64)> = w["pending"]
                        .as_array()
                        .expect("pending")
                        .iter()
                        .map(|p| {
                            (
                                json_str(&p["id"]).to_string(),
                                p["sent"].as_i64().expect("sent"),
                                p["count"].as_u64().expect("count"),
                            )
                        })
                        .collect();
                    let have_pel: Vec<(String, i64, u64)> = g
                        .pending
                        .iter()
                        .map(|p| (p.id.to_string(), p.delivery_time_ms, p.delivery_count))
                        .collect();
                    assert_eq!(have_pel, pel);
                    let consumers = w["consumers"].as_array().expect("consumers");
                    assert_eq!(g.consumers.len(), consumers.len());
                    for (c, wc) in g.consumers.iter().zip(consumers) {
                        assert_eq!(c.name, json_str(&wc["name"]).as_bytes());
                        assert_eq!(Some(c.seen_time_ms), wc["seenTime"].as_i64());
                        assert_eq!(c.active_time_ms, wc["activeTime"].as_i64());
                        let want_ids: Vec<String> = wc
                            .get("pending")
                            .and_then(|p| p.as_array())
                            .map(|p| p.iter().map(|x| json_str(&x["id"]).to_string()).collect())
                            .unwrap_or_default();
                        let have_ids: Vec<String> =
                            c.pending.iter().map(|i| i.to_string()).collect();
                        assert_eq!(have_ids, want_ids);
                    }
                }
            }
        }
        (value, expected) => panic!("{rdb}: {name}: {value:?} does not match {expected}"),
    }
}

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn librdb_expectations_match() {
    let pairs = [
        ("single_key.rdb", "single_key_data.json"),
        (
            "multiple_lists_strings.rdb",
            "multiple_lists_strings_data.json",
        ),
        ("quicklist.rdb", "quicklist_data.json"),
        ("quicklist2_v11.rdb", "single_list_data.json"),
        ("ziplist_v3.rdb", "ziplist_data.json"),
        ("plain_list_v6.rdb", "plain_list_v6_data.json"),
        ("plain_set_v6.rdb", "plain_set_v6_data.json"),
        ("set_is_v11.rdb", "set_is_v11_data.json"),
        ("set_lp_v11.rdb", "set_lp_v11_data.json"),
        ("plain_zset_v6.rdb", "plain_zset_v6_data.json"),
        ("plain_zset_2_v11.rdb", "plain_zset_2_v11_data.json"),
        ("zset_zl_v6.rdb", "zset_zl_v6_data.json"),
        ("zset_lp_v11.rdb", "zset_lp_v11_data.json"),
        ("hash_v3.rdb", "hash_data.json"),
        ("hash_zl_v6.rdb", "hash_zl_v6_data.json"),
        ("hash_zm_v2.rdb", "hash_zm_v2_data.json"),
        ("hash_lp_v11.rdb", "hash_lp_v11_data.json"),
        ("hash_with_expire_v12.rdb", "hash_ex_v12_data.json"),
        ("hash_lp_with_hexpire_v12.rdb", "hash_lp_ex_v12_data.json"),
        ("multiple_dbs.rdb", "multiple_dbs_data.json"),
        ("string_int_encoded.rdb", "string_int_encoded.json"),
        ("mem_policy_lfu.rdb", "mem_policy_lfu.json"),
        ("mem_policy_lru.rdb", "mem_policy_lru.json"),
        ("set_expired_v11.rdb", "set_expired.json"),
        ("set_not_expired_v11.rdb", "set_not_expired.json"),
        ("module.rdb", "module_data.json"),
        ("module_aux.rdb", "module_aux_data.json"),
        ("cluster_slot_info.rdb", "cluster_slot_info.json"),
        ("function2.rdb", "function2.json"),
        ("stream_v11.rdb", "stream_data.json"),
        ("stream_v11.rdb", "stream_data_with_meta.json"),
        ("stream_v13_idmp.rdb", "stream_v13.json"),
    ];
    for (rdb, json) in pairs {
        compare_librdb(
            &format!("librdb/test__dumps__{rdb}"),
            &format!("librdb/test__dumps__{json}"),
        );
    }
}

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn librdb_metadata_opcodes() {
    let lfu = model(&parse_ok(
        &read_fixture("librdb/test__dumps__mem_policy_lfu.rdb"),
        ParseOptions::default(),
    ));
    assert_eq!(lfu.key("abcdefghijk").header.lfu_freq, Some(5));
    let lru = model(&parse_ok(
        &read_fixture("librdb/test__dumps__mem_policy_lru.rdb"),
        ParseOptions::default(),
    ));
    assert_eq!(lru.key("abcdefghijk").header.lru_idle, Some(24));
    // Field TTLs of both Redis 7.4 RC hash forms.
    for rdb in ["hash_with_expire_v12.rdb", "hash_lp_with_hexpire_v12.rdb"] {
        let c = model(&parse_ok(
            &read_fixture(&format!("librdb/test__dumps__{rdb}")),
            ParseOptions::default(),
        ));
        let Value::Hash(fields) = &c.key("myhash").value else {
            panic!("hash")
        };
        let ttls = fields
            .values()
            .filter(|(_, t)| t.is_some_and(|t| t > 1_700_000_000_000))
            .count();
        assert!(ttls >= 1, "{rdb}: {fields:?}");
    }
    let aux = model(&parse_ok(
        &read_fixture("librdb/test__dumps__module_aux.rdb"),
        ParseOptions::default(),
    ));
    assert_eq!(aux.module_aux.len(), 2);
    assert_eq!(aux.keys.keys().next().map(|(db, _)| *db), Some(9));
}

// ---------------------------------------------------------------------------
// redis tests/integration/rdb.tcl: encodings-expected.csv

/// Parses csvdump lines: `"db","key","type",elements...`.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let mut fields = Vec::new();
            let mut rest = line;
            while let Some(start) = rest.find('"') {
                let after = &rest[start + 1..];
                let end = after.find('"').expect("closing quote");
                fields.push(after[..end].to_string());
                rest = &after[end + 1..];
            }
            fields
        })
        .collect()
}

/// Our content in csvdump's form: hashes and sets sorted, zsets by score.
fn csv_form(key: &Key) -> (String, Vec<String>) {
    let s = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
    match &key.value {
        Value::String(v) => ("string".into(), vec![s(v)]),
        Value::List(items) => ("list".into(), items.iter().map(s).collect()),
        Value::Set(members) => {
            let mut m: Vec<String> = members.iter().map(s).collect();
            m.sort();
            ("set".into(), m)
        }
        Value::ZSet(entries) => {
            let mut e = entries.clone();
            e.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            (
                "zset".into(),
                e.iter()
                    .flat_map(|(m, sc)| [s(m), format!("{sc}")])
                    .collect(),
            )
        }
        Value::Hash(fields) => (
            "hash".into(),
            fields.iter().flat_map(|(k, (v, _))| [s(k), s(v)]).collect(),
        ),
        other => panic!("not in encodings.rdb: {other:?}"),
    }
}

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn redis_encodings_match_expected_csv() {
    let text = std::fs::read_to_string(
        corpus_dir().join("redis/tests__integration__rdb.tcl.encodings-expected.csv"),
    )
    .expect("csv");
    let rows = csv_rows(&text);
    assert_eq!(rows.len(), 13);
    let encodings = model(&parse_ok(
        &read_fixture("redis/tests__assets__encodings.rdb"),
        ParseOptions::default(),
    ));
    // redis-rdb-tools' redis_50_with_streams holds the same keys plus a stream.
    let with_streams = model(&parse_ok(
        &read_fixture("redis-rdb-tools/tests__dumps__redis_50_with_streams.rdb"),
        ParseOptions::default(),
    ));
    for content in [&encodings, &with_streams] {
        for row in &rows {
            let key = content.key(&row[1]);
            assert_eq!(key.header.db.to_string(), row[0]);
            let (kind, elements) = csv_form(key);
            assert_eq!(kind, row[2], "{}", row[1]);
            // Sorted hashes: csvdump sorts by field; BTreeMap already does.
            assert_eq!(elements, row[3..].to_vec(), "{}", row[1]);
        }
    }
    assert_eq!(encodings.keys.len(), rows.len());
    let Value::Stream { entries, .. } = &with_streams.key("mystream").value else {
        panic!("stream")
    };
    assert_eq!(entries.len(), 4);
}

// ---------------------------------------------------------------------------
// redis-rdb-tools: what its tests/parser_tests.py asserts (INDEX contents).

fn rdbtools(name: &str) -> Content {
    model(&parse_ok(
        &read_fixture(&format!("redis-rdb-tools/tests__dumps__{name}.rdb")),
        ParseOptions::default(),
    ))
}

fn set_of(values: &[&str]) -> Value {
    Value::Set(values.iter().map(|v| b(v)).collect())
}

fn list_of(values: &[&str]) -> Value {
    Value::List(values.iter().map(|v| b(v)).collect())
}

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn redis_rdb_tools_expectations_match() {
    assert_eq!(
        rdbtools("intset_16").key("intset_16").value,
        set_of(&["32764", "32765", "32766"])
    );
    let i32s = [0x7ffefffci64, 0x7ffefffd, 0x7ffefffe].map(|v| v.to_string());
    assert_eq!(
        rdbtools("intset_32").key("intset_32").value,
        set_of(&i32s.iter().map(String::as_str).collect::<Vec<_>>())
    );
    let i64s = [
        0x7ffefffefffefffci64,
        0x7ffefffefffefffd,
        0x7ffefffefffefffe,
    ]
    .map(|v| v.to_string());
    assert_eq!(
        rdbtools("intset_64").key("intset_64").value,
        set_of(&i64s.iter().map(String::as_str).collect::<Vec<_>>())
    );

    let ints = rdbtools("integer_keys");
    for (key, value) in [
        ("125", "Positive 8 bit integer"),
        ("43947", "Positive 16 bit integer"),
        ("183358245", "Positive 32 bit integer"),
        ("-123", "Negative 8 bit integer"),
        ("-29477", "Negative 16 bit integer"),
        ("-183358245", "Negative 32 bit integer"),
    ] {
        assert_eq!(ints.key(key).value, Value::String(b(value)), "{key}");
    }

    let expiry = rdbtools("keys_with_expiry");
    let expire = expiry
        .key("expires_ms_precision")
        .header
        .expire_ms
        .expect("expiry");
    // 2022-12-25 10:11:12.573 in some local time zone.
    assert_eq!(expire % 1000, 573);
    assert!(
        (expire - 1_671_963_072_573).abs() <= 14 * 3_600_000,
        "{expire}"
    );

    let zl = rdbtools("ziplist_with_integers");
    let mut want: Vec<String> = (0..=12).map(|i: i64| i.to_string()).collect();
    want.extend(
        [
            "-2",
            "13",
            "25",
            "-61",
            "63",
            "16380",
            "-16000",
            "65535",
            "-65523",
            "4194304",
            "9223372036854775807",
        ]
        .map(String::from),
    );
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    assert_eq!(zl.key("ziplist_with_integers").value, list_of(&want));

    assert_eq!(
        rdbtools("ziplist_that_compresses_easily")
            .key("ziplist_compresses_easily")
            .value,
        list_of(
            &[6, 12, 18, 24, 30, 36]
                .map(|n| "a".repeat(n))
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        )
    );
    assert_eq!(
        rdbtools("ziplist_that_doesnt_compress")
            .key("ziplist_doesnt_compress")
            .value,
        list_of(&[
            "aj2410",
            "cc953a17a8e096e76a44169ad3f9ac87c5f8248a403274416179aa9fbd852344"
        ])
    );

    let zipmap = rdbtools("zipmap_that_compresses_easily");
    let Value::Hash(h) = &zipmap.key("zipmap_compresses_easily").value else {
        panic!("hash")
    };
    assert_eq!(h[&b("a")].0, b("aa"));
    assert_eq!(h[&b("aa")].0, b("aaaa"));
    assert_eq!(h[&b("aaaaa")].0, b("aaaaaaaaaaaaaa"));
    let Value::Hash(h) = rdbtools("zipmap_that_doesnt_compress")
        .key("zimap_doesnt_compress")
        .value
        .clone()
    else {
        panic!("hash")
    };
    assert_eq!(h[&b("MKD1G6")].0, b("2"));
    assert_eq!(h[&b("YNNXK")].0, b("F7TI"));
    let Value::Hash(h) = rdbtools("zipmap_with_big_values")
        .key("zipmap_with_big_values")
        .value
        .clone()
    else {
        panic!("hash")
    };
    let mut lens: Vec<usize> = h.values().map(|(v, _)| v.len()).collect();
    lens.sort();
    assert_eq!(lens, vec![253, 254, 255, 300, 20000]);

    let Value::Hash(h) = rdbtools("dictionary").key("force_dictionary").value.clone() else {
        panic!("hash")
    };
    assert_eq!(h.len(), 1000);
    assert_eq!(
        h[&b("ZMU5WEJDG7KU89AOG5LJT6K7HMNB3DEI43M6EYTJ83VRJ6XNXQ")].0,
        b("T63SOS8DQJF0Q0VJEZ0D1IQFCYTIPSBOUIAI9SB0OV57MQR1FI")
    );
    assert_eq!(
        h[&b("UHS5ESW4HLK8XOGTM39IK1SJEUGVV9WOPK6JYA5QBZSJU84491")].0,
        b("6VULTCV52FXJ8MGVSFTZVAGK2JXZMGQ5F8OVJI0X6GEDDR27RZ")
    );
    let Value::List(l) = rdbtools("linkedlist").key("force_linkedlist").value.clone() else {
        panic!("list")
    };
    assert_eq!(l.len(), 1000);
    assert!(l.contains(&b("JYY4GIFI0ETHKP4VAJF5333082J4R1UPNPLE329YT0EYPGHSJQ")));
    let Value::ZSet(z) = rdbtools("regular_sorted_set")
        .key("force_sorted_set")
        .value
        .clone()
    else {
        panic!("zset")
    };
    assert_eq!(z.len(), 500);
    let Value::ZSet(z) = rdbtools("rdb_version_8_with_64b_length_and_scores")
        .key("bigset")
        .value
        .clone()
    else {
        panic!("zset")
    };
    assert_eq!(z.len(), 1000);
    // The fixture stores 2.718 (not e): what rdb-tools asserts.
    #[allow(clippy::approx_constant)]
    let final_score = 2.718;
    assert!(z.contains(&(b("finalfield"), final_score)));
    let Value::ZSet(z) = rdbtools("sorted_set_as_ziplist")
        .key("sorted_set_as_ziplist")
        .value
        .clone()
    else {
        panic!("zset")
    };
    assert_eq!(
        z,
        vec![
            (b("8b6ba6718a786daefa69438148361901"), 1.0),
            (b("cb7a24bb7528f934b841b34c3a73e0c7"), 2.37),
            (b("523af537946b79c4f8369ed39ba78605"), 3.423)
        ]
    );
    assert_eq!(
        rdbtools("regular_set").key("regular_set").value,
        set_of(&["alpha", "beta", "gamma", "delta", "phi", "kappa"])
    );
    let multi = rdbtools("multiple_databases");
    assert_eq!(
        multi.keys[&(0, b("key_in_zeroth_database"))].value,
        Value::String(b("zero"))
    );
    assert_eq!(
        multi.keys[&(2, b("key_in_second_database"))].value,
        Value::String(b("second"))
    );
    let long_keys = rdbtools("uncompressible_string_keys");
    let mut lens: Vec<usize> = long_keys.keys.keys().map(|(_, k)| k.len()).collect();
    lens.sort();
    assert_eq!(lens, vec![60, 16382, 16386]);
    assert_eq!(
        rdbtools("easily_compressible_string_key")
            .key(&"a".repeat(200))
            .value,
        Value::String(b("Key that redis should compress easily"))
    );
    let v5 = rdbtools("rdb_version_5_with_checksum");
    for (k, v) in [
        ("abcd", "efgh"),
        ("foo", "bar"),
        ("bar", "baz"),
        ("abcdef", "abcdef"),
    ] {
        assert_eq!(v5.key(k).value, Value::String(b(v)));
    }
    assert_eq!(
        rdbtools("listpack_multibyte_encodings_13_bit_signed_integer")
            .keys
            .values()
            .next()
            .map(|k| k.value.clone()),
        Some(list_of(&["-1", "-4097", "8191", "4097"]))
    );
    let Value::List(ints) = rdbtools("listpack_multibyte_encodings_integer")
        .keys
        .values()
        .next()
        .expect("key")
        .value
        .clone()
    else {
        panic!("list")
    };
    let mut have: Vec<i64> = ints
        .iter()
        .map(|v| std::str::from_utf8(v).expect("utf8").parse().expect("int"))
        .collect();
    have.sort();
    let mut want: Vec<i64> = [0x7ffe, 0x7ffeff, 0x7ffefffe, 0x7ffefffefffefffe]
        .iter()
        .flat_map(|&v: &i64| [v, -v])
        .collect();
    want.sort();
    assert_eq!(have, want);
    let Value::Hash(h) = &rdbtools("listpack_small_numbers")
        .keys
        .values()
        .next()
        .expect("key")
        .value
        .clone()
    else {
        panic!("hash")
    };
    let mut nums: Vec<&[u8]> = h.values().map(|(v, _)| v.as_ref()).collect();
    nums.sort();
    assert_eq!(
        nums,
        vec![&b"1"[..], b"107", b"13", b"26", b"3", b"53", b"6"]
    );
    assert_eq!(
        rdbtools("set_as_listpack").key("set_as_listpack").value,
        set_of(&["abc", "abcdefg", "abcdefghijklmn", "-3", "50", "-70"])
    );
    let Value::Stream { entries, .. } = &rdbtools("streams")
        .keys
        .values()
        .next()
        .expect("key")
        .value
        .clone()
    else {
        panic!("stream")
    };
    assert_eq!(entries.len(), 3);
    let module = rdbtools("redis_40_with_module");
    assert_eq!(module.key("foo").value, Value::Module("ReJSON-RL".into()));
    assert_eq!(rdbtools("redis_60_with_module_aux").module_aux.len(), 1);
}

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn rdb_preamble_stops_at_the_rdb_end() {
    let data = read_fixture("redis/tests__assets__rdb-preamble.aof");
    let mut parser = RdbParser::new(&data[..], ParseOptions::default());
    let mut events = Vec::new();
    while let Some(ev) = parser.next_event().expect("parses") {
        events.push(ev);
    }
    let content = model(&events);
    assert_eq!(content.key("k1").value, Value::String(b("v1")));
    assert_eq!(content.key("k2").value, Value::String(b("v2")));
    let end = parser.offset() as usize;
    let (_, rest) = parser.into_parts();
    assert_eq!(&rest[..], &data[end..]);
    assert!(rest.starts_with(b"*"), "the AOF tail follows");
}

// ---------------------------------------------------------------------------
// Real redis-server 7.0: RESTORE of raw captures, and SAVE -> parse.

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

use ferry::redis::client::Client;
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;

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

#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn raw_captures_restore_into_redis_7() {
    let server = common::RedisServer::start(&[]);
    let rt = runtime();
    rt.block_on(async {
        let mut client = connect(&server).await;
        let mut restored = 0;
        for f in rdb_fixtures() {
            if expectation(&f) != Expect::Parses
                || f.rdb_version.parse::<u32>().map_or(true, |v| v > 10)
            {
                continue;
            }
            let content = model(&parse_ok(&read_fixture(&f.path), ParseOptions::default()));
            for key in content.keys.values() {
                // Redis refuses empty collections and modules it has not loaded.
                if key.chunks == 0 || key.header.value_type == ValueType::Module {
                    continue;
                }
                let raw = key.raw.as_ref().expect("small values are captured");
                let payload = dump_payload(raw, content.version as u16);
                let name = format!("restored:{restored}");
                client
                    .call([
                        b"RESTORE".as_ref(),
                        name.as_bytes(),
                        b"0",
                        payload.as_slice(),
                        b"REPLACE",
                    ])
                    .await
                    .unwrap_or_else(|e| panic!("{}: RESTORE {:?}: {e}", f.path, key.header.key));
                let kind = client.call(["TYPE", name.as_str()]).await.expect("TYPE");
                assert_eq!(
                    frame_bytes(&kind),
                    key.header.value_type.as_str(),
                    "{}",
                    f.path
                );
                let (cmd, want) = match &key.value {
                    Value::String(s) => ("STRLEN", s.len()),
                    Value::List(l) => ("LLEN", l.len()),
                    Value::Set(s) => ("SCARD", s.len()),
                    Value::ZSet(z) => ("ZCARD", z.len()),
                    Value::Hash(h) => ("HLEN", h.len()),
                    Value::Stream { entries, .. } => ("XLEN", entries.len()),
                    Value::Module(_) => unreachable!("skipped"),
                };
                let len = client.call([cmd, name.as_str()]).await.expect("len");
                assert_eq!(
                    len.as_integer(),
                    Some(want as i64),
                    "{}: {cmd} {:?}",
                    f.path,
                    key.header.key
                );
                restored += 1;
            }
        }
        assert!(restored >= 100, "restored {restored} keys");
    });
}

// ---------------------------------------------------------------------------
// The `ferry rdb dump` binary on every fixture.

/// Every fixture that parses dumps to JSON lines, one per key; every one
/// INDEX marks broken makes `ferry rdb dump` exit non-zero naming the byte.
#[test]
#[ignore = "conformance suite: needs FERRY_RDB_CORPUS, run by tools/test.sh"]
fn ferry_rdb_dump_reads_every_fixture() {
    let mut dumped = 0;
    for f in rdb_fixtures() {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["rdb", "dump", "--no-aux"])
            .arg(corpus_dir().join(&f.path))
            .output()
            .expect("run ferry");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match expectation(&f) {
            Expect::Parses => {
                assert!(out.status.success(), "{}: {stderr}", f.path);
                let content = model(&parse_ok(&read_fixture(&f.path), ParseOptions::default()));
                let mut keys = 0;
                for line in stdout.lines() {
                    let json: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", f.path));
                    keys += usize::from(json.get("key").is_some());
                }
                assert_eq!(keys, content.keys.len(), "{}", f.path);
                dumped += 1;
            }
            _ => {
                assert!(!out.status.success(), "{}: {stdout}", f.path);
                assert!(stderr.contains("at byte"), "{}: {stderr}", f.path);
            }
        }
    }
    assert!(dumped >= 80, "{dumped} fixtures dumped");
}
