//! The streaming RDB parser against the shared public fixtures
//! (`../shared/fixtures/rdb`, described by its `INDEX.tsv`) and their
//! expectation files, and against dumps written by a real redis-server 7.0.
//!
//! Every fixture of kind `rdb` / `rdb-preamble-aof` either parses to `End`
//! or, when INDEX marks it as intentionally broken, is refused with the
//! matching typed error. Parsed content is compared with librdb's
//! `*_data.json`, redis's `encodings-expected.csv` and the facts that
//! redis-rdb-tools' tests assert (recorded in INDEX's contents column).
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use ferry::redis::rdb::{
    dump_payload, KeyHeader, ParseOptions, RdbError, RdbEvent, RdbParser, StreamEntry, StreamGroup,
    StreamMeta, ValueChunk, ValueType,
};

// ---------------------------------------------------------------------------
// Parsing helpers and the content model built from events.

fn parse_events<R: Read>(reader: R, opts: ParseOptions) -> (Vec<RdbEvent>, Result<u64, RdbError>) {
    let mut parser = RdbParser::new(reader, opts);
    let mut events = Vec::new();
    loop {
        match parser.next_event() {
            Ok(Some(ev)) => events.push(ev),
            Ok(None) => return (events, Ok(parser.offset())),
            Err(e) => return (events, Err(e)),
        }
    }
}

fn parse_ok(data: &[u8], opts: ParseOptions) -> Vec<RdbEvent> {
    let (events, end) = parse_events(data, opts);
    if let Err(e) = end {
        panic!("parse failed: {e}");
    }
    events
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    String(Bytes),
    List(Vec<Bytes>),
    Set(BTreeSet<Bytes>),
    ZSet(Vec<(Bytes, f64)>),
    Hash(BTreeMap<Bytes, (Bytes, Option<i64>)>),
    Stream {
        entries: Vec<StreamEntry>,
        meta: Option<StreamMeta>,
        groups: Vec<StreamGroup>,
    },
    Module(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Key {
    header: KeyHeader,
    value: Value,
    chunks: usize,
    raw: Option<Bytes>,
}

#[derive(Debug, Default)]
struct Content {
    version: u32,
    aux: Vec<(Bytes, Bytes)>,
    functions: Vec<Bytes>,
    module_aux: Vec<String>,
    slot_info: Vec<(u64, u64, u64)>,
    resize: Vec<(u64, u64)>,
    keys: BTreeMap<(u32, Bytes), Key>,
    checksum: Option<Option<u64>>,
}

/// Folds events into content, checking the event grammar on the way:
/// Header first, KeyStart (Chunk)* KeyEnd, chunk kinds matching the key
/// type, End last.
fn model(events: &[RdbEvent]) -> Content {
    let mut content = Content::default();
    let mut current: Option<Key> = None;
    for (i, ev) in events.iter().enumerate() {
        match ev {
            RdbEvent::Header { version } => {
                assert_eq!(i, 0, "Header must come first");
                content.version = *version;
            }
            RdbEvent::KeyStart(header) => {
                assert!(current.is_none(), "KeyStart inside a key");
                let value = match header.value_type {
                    ValueType::String => Value::String(Bytes::new()),
                    ValueType::List => Value::List(Vec::new()),
                    ValueType::Set => Value::Set(BTreeSet::new()),
                    ValueType::ZSet => Value::ZSet(Vec::new()),
                    ValueType::Hash => Value::Hash(BTreeMap::new()),
                    ValueType::Stream => Value::Stream {
                        entries: Vec::new(),
                        meta: None,
                        groups: Vec::new(),
                    },
                    ValueType::Module => Value::Module(String::new()),
                };
                current = Some(Key {
                    header: header.clone(),
                    value,
                    chunks: 0,
                    raw: None,
                });
            }
            RdbEvent::Chunk(chunk) => {
                let key = current.as_mut().expect("Chunk outside a key");
                key.chunks += 1;
                match (&mut key.value, chunk) {
                    (Value::String(s), ValueChunk::String(b)) => {
                        // One chunk, or the pieces of one longer than
                        // `chunk_bytes`.
                        *s = if s.is_empty() {
                            b.clone()
                        } else {
                            Bytes::from([&s[..], &b[..]].concat())
                        };
                    }
                    (Value::List(l), ValueChunk::ListItems(items)) => {
                        l.extend(items.iter().cloned())
                    }
                    (Value::Set(s), ValueChunk::SetMembers(items)) => {
                        for item in items {
                            assert!(s.insert(item.clone()), "duplicate set member {item:?}");
                        }
                    }
                    (Value::ZSet(z), ValueChunk::ZSetEntries(items)) => {
                        z.extend(items.iter().cloned())
                    }
                    (Value::Hash(h), ValueChunk::HashFields(fields)) => {
                        for f in fields {
                            let dup = h.insert(f.field.clone(), (f.value.clone(), f.expire_ms));
                            assert!(dup.is_none(), "duplicate hash field {:?}", f.field);
                        }
                    }
                    (
                        Value::Stream {
                            entries,
                            meta,
                            groups,
                        },
                        ValueChunk::StreamEntries(e),
                    ) => {
                        assert!(meta.is_none() && groups.is_empty(), "entries after meta");
                        entries.extend(e.iter().cloned());
                    }
                    (Value::Stream { meta, groups, .. }, ValueChunk::StreamMeta(m)) => {
                        assert!(
                            meta.is_none() && groups.is_empty(),
                            "meta twice or after groups"
                        );
                        *meta = Some(m.clone());
                    }
                    (Value::Stream { meta, groups, .. }, ValueChunk::StreamGroup(g)) => {
                        assert!(meta.is_some(), "group before meta");
                        groups.push(g.clone());
                    }
                    (Value::Module(name), ValueChunk::Module { name: n, .. }) => *name = n.clone(),
                    (value, chunk) => panic!("chunk {chunk:?} does not fit {value:?}"),
                }
            }
            RdbEvent::KeyEnd { raw } => {
                let mut key = current.take().expect("KeyEnd outside a key");
                key.raw = raw.clone();
                if let Some(raw) = raw {
                    assert_eq!(raw[0], key.header.encoding, "raw starts with the type byte");
                }
                let id = (key.header.db, key.header.key.clone());
                assert!(
                    !content.keys.contains_key(&id),
                    "duplicate key {:?}",
                    key.header.key
                );
                content.keys.insert(id, key);
            }
            RdbEvent::Aux { key, value } => content.aux.push((key.clone(), value.clone())),
            RdbEvent::Function { code } => content.functions.push(code.clone()),
            RdbEvent::ModuleAux { name, .. } => content.module_aux.push(name.clone()),
            RdbEvent::SlotInfo {
                slot_id,
                slot_size,
                expires_slot_size,
            } => content
                .slot_info
                .push((*slot_id, *slot_size, *expires_slot_size)),
            RdbEvent::ResizeDb {
                db_size,
                expires_size,
            } => content.resize.push((*db_size, *expires_size)),
            RdbEvent::SelectDb(_) => {}
            RdbEvent::End { checksum } => {
                assert_eq!(i, events.len() - 1, "End must be last");
                assert!(current.is_none(), "End inside a key");
                content.checksum = Some(*checksum);
            }
        }
    }
    content
}

impl Content {
    fn key(&self, name: &str) -> &Key {
        self.keys
            .iter()
            .find(|((_, k), _)| k.as_ref() == name.as_bytes())
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("key {name:?} not found; have {:?}", self.key_names()))
    }

    fn key_names(&self) -> Vec<String> {
        self.keys
            .keys()
            .map(|(_, k)| String::from_utf8_lossy(k).into_owned())
            .collect()
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
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
    let index =
        std::fs::read_to_string(common::fixtures_dir().join("INDEX.tsv")).expect("INDEX.tsv");
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
    std::fs::read(common::fixtures_dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
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

#[test]
fn headers_are_checked() {
    let refuse = |data: &[u8]| {
        parse_events(data, ParseOptions::default())
            .1
            .expect_err("refused")
    };
    assert!(
        matches!(refuse(b"VALKEY080\xff"), RdbError::UnsupportedVersion { found, .. } if found == "VALKEY080")
    );
    assert!(matches!(
        refuse(b"REDIS0099\xff"),
        RdbError::UnsupportedVersion { .. }
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

// ---------------------------------------------------------------------------
// Streaming: tiny reads, truncation, chunk limits.

/// Returns 1..=7 bytes per read call, cycling.
struct Dribble<'a> {
    data: &'a [u8],
    pos: usize,
    step: usize,
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = self.step % 7 + 1;
        let n = self.step.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn tiny_reads_give_identical_events() {
    for f in rdb_fixtures() {
        let data = read_fixture(&f.path);
        let (whole, whole_end) = parse_events(&data[..], ParseOptions::default());
        let reader = Dribble {
            data: &data,
            pos: 0,
            step: 0,
        };
        let (dribbled, dribbled_end) = parse_events(reader, ParseOptions::default());
        assert_eq!(whole, dribbled, "{}", f.path);
        match (whole_end, dribbled_end) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{}", f.path),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{}", f.path),
            (a, b) => panic!("{}: {a:?} vs {b:?}", f.path),
        }
    }
}

#[test]
fn truncated_fixtures_fail_cleanly() {
    for f in rdb_fixtures() {
        if expectation(&f) != Expect::Parses {
            continue;
        }
        let data = read_fixture(&f.path);
        let (_, end) = parse_events(&data[..], ParseOptions::default());
        let rdb_len = end.expect("parses") as usize;
        // Every cut for small files, ~300 spread cuts for big ones.
        let step = (rdb_len / 300).max(1);
        let mut cut = 0;
        while cut < rdb_len {
            let (_, end) = parse_events(&data[..cut], ParseOptions::default());
            match end {
                Err(RdbError::UnexpectedEof { offset, .. }) => {
                    assert_eq!(offset, cut as u64, "{} cut at {cut}", f.path)
                }
                other => panic!("{} cut at {cut}: {other:?}", f.path),
            }
            cut += step;
        }
    }
}

/// Bytes of one element as the parser counts them for `chunk_bytes`.
fn chunk_sizes(chunk: &ValueChunk) -> Vec<usize> {
    match chunk {
        ValueChunk::ListItems(v) | ValueChunk::SetMembers(v) => v.iter().map(|b| b.len()).collect(),
        ValueChunk::ZSetEntries(v) => v.iter().map(|(m, _)| m.len() + 8).collect(),
        ValueChunk::HashFields(v) => v
            .iter()
            .map(|f| f.field.len() + f.value.len() + if f.expire_ms.is_some() { 8 } else { 0 })
            .collect(),
        ValueChunk::StreamEntries(v) => v
            .iter()
            .map(|e| {
                16 + e
                    .fields
                    .iter()
                    .map(|(f, v)| f.len() + v.len())
                    .sum::<usize>()
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn assert_chunk_limits(events: &[RdbEvent], opts: &ParseOptions, label: &str) {
    for ev in events {
        if let RdbEvent::Chunk(chunk) = ev {
            let sizes = chunk_sizes(chunk);
            if sizes.is_empty() {
                continue;
            }
            assert!(
                sizes.len() <= opts.chunk_items,
                "{label}: {} items",
                sizes.len()
            );
            // The byte budget may be crossed by the last element only.
            let before_last: usize = sizes[..sizes.len() - 1].iter().sum();
            assert!(
                before_last < opts.chunk_bytes,
                "{label}: {before_last} bytes before the last item"
            );
        }
    }
}

#[test]
fn chunk_limits_hold_and_do_not_change_content() {
    let small = ParseOptions {
        chunk_items: 3,
        chunk_bytes: 40,
        ..ParseOptions::default()
    };
    for f in rdb_fixtures() {
        if expectation(&f) != Expect::Parses {
            continue;
        }
        let data = read_fixture(&f.path);
        let big = model(&parse_ok(&data, ParseOptions::default()));
        let events = parse_ok(&data, small.clone());
        assert_chunk_limits(&events, &small, &f.path);
        let chunked = model(&events);
        assert_eq!(big.keys.len(), chunked.keys.len(), "{}", f.path);
        for (id, key) in &big.keys {
            assert_eq!(key.value, chunked.keys[id].value, "{}: {:?}", f.path, id.1);
            assert_eq!(key.raw, chunked.keys[id].raw, "{}: {:?}", f.path, id.1);
        }
    }
}

#[test]
fn raw_capture_respects_its_limit() {
    let data = read_fixture("redis-rdb-tools/tests__dumps__linkedlist.rdb");
    let full = model(&parse_ok(&data, ParseOptions::default()));
    let raw = full.key("force_linkedlist").raw.clone().expect("captured");
    assert!(raw.len() > 50_000);
    let limited = ParseOptions {
        raw_capture_limit: raw.len() - 1,
        ..ParseOptions::default()
    };
    assert_eq!(
        model(&parse_ok(&data, limited)).key("force_linkedlist").raw,
        None
    );
    let exact = ParseOptions {
        raw_capture_limit: raw.len(),
        ..ParseOptions::default()
    };
    assert_eq!(
        model(&parse_ok(&data, exact)).key("force_linkedlist").raw,
        Some(raw)
    );
    let off = ParseOptions {
        raw_capture_limit: 0,
        ..ParseOptions::default()
    };
    assert_eq!(
        model(&parse_ok(&data, off)).key("force_linkedlist").raw,
        None
    );
}

#[test]
fn string_limit_is_checked_before_reading() {
    let data = read_fixture("redis-rdb-tools/tests__dumps__uncompressible_string_keys.rdb");
    let opts = ParseOptions {
        max_string_len: 1000,
        ..ParseOptions::default()
    };
    let (_, end) = parse_events(&data[..], opts);
    assert!(
        matches!(end, Err(RdbError::TooLarge { limit: 1000, len, .. }) if len > 1000),
        "{end:?}"
    );
}

// ---------------------------------------------------------------------------
// librdb expectation files (`*_data.json` and friends).

/// librdb writes a JSON object body without the braces (or an array of them,
/// one per db); wrap and parse it.
fn librdb_json(rel: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(common::fixtures_dir().join(rel)).expect("json");
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
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
fn redis_encodings_match_expected_csv() {
    let text = std::fs::read_to_string(
        common::fixtures_dir().join("redis/tests__integration__rdb.tcl.encodings-expected.csv"),
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

fn frame_array(f: &Frame) -> &[Frame] {
    match f {
        Frame::Array(a) => a,
        other => panic!("not an array: {other:?}"),
    }
}

#[test]
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

fn redis_content(server: &common::RedisServer, opts: ParseOptions) -> (Content, Vec<RdbEvent>) {
    let path = server.dir.path().join("dump.rdb");
    let file = std::fs::File::open(&path).expect("dump.rdb");
    let (events, end) = parse_events(std::io::BufReader::new(file), opts);
    end.expect("redis dump parses");
    (model(&events), events)
}

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
        let mut run = |args: Vec<String>| {
            let cmd = ferry::redis::command::Command::from_parts(args);
            c.queue(&cmd);
        };
        let s = |v: &str| v.to_string();
        run(vec![s("SET"), s("str:raw"), s("hello world")]);
        run(vec![s("SET"), s("str:int"), s("-12345")]);
        run(vec![s("SET"), s("str:big"), "x".repeat(100_000)]);
        run(vec![
            s("SET"),
            s("str:ttl"),
            s("v"),
            s("PX"),
            s("100000000"),
        ]);
        run(vec![s("RPUSH"), s("list:small"), s("a"), s("1"), s("b")]);
        let mut big_list = vec![s("RPUSH"), s("list:big")];
        big_list.extend((0..3000).map(|i| format!("item-{i}")));
        run(big_list);
        let mut intset = vec![s("SADD"), s("set:intset")];
        intset.extend((0..10).map(|i| (i * 1000 - 3000).to_string()));
        run(intset);
        run(vec![s("SADD"), s("set:listpack"), s("a"), s("b"), s("7")]);
        let mut set_ht = vec![s("SADD"), s("set:ht")];
        set_ht.extend((0..500).map(|i| format!("m{i}")));
        run(set_ht);
        run(vec![
            s("ZADD"),
            s("zset:small"),
            s("1.5"),
            s("a"),
            s("-2"),
            s("b"),
            s("inf"),
            s("c"),
        ]);
        let mut zset_big = vec![s("ZADD"), s("zset:big")];
        zset_big.extend((0..300).flat_map(|i| [format!("{}", i as f64 / 7.0), format!("z{i}")]));
        run(zset_big);
        run(vec![
            s("HSET"),
            s("hash:small"),
            s("f1"),
            s("v1"),
            s("f2"),
            s("2"),
        ]);
        let mut hash_big = vec![s("HSET"), s("hash:big")];
        hash_big.extend((0..2000).flat_map(|i| [format!("field{i}"), format!("value{i}")]));
        run(hash_big);
        for i in 0..20 {
            run(vec![
                s("XADD"),
                s("stream"),
                format!("{}-{}", 1000 + i / 3, i % 3),
                s("f"),
                format!("v{i}"),
                s("n"),
                i.to_string(),
            ]);
        }
        run(vec![
            s("XADD"),
            s("stream"),
            s("2000-0"),
            s("other"),
            s("shape"),
        ]);
        run(vec![s("XDEL"), s("stream"), s("1001-1")]);
        run(vec![s("XGROUP"), s("CREATE"), s("stream"), s("g1"), s("0")]);
        run(vec![s("XGROUP"), s("CREATE"), s("stream"), s("g2"), s("$")]);
        run(vec![
            s("XREADGROUP"),
            s("GROUP"),
            s("g1"),
            s("alice"),
            s("COUNT"),
            s("3"),
            s("STREAMS"),
            s("stream"),
            s(">"),
        ]);
        run(vec![
            s("XREADGROUP"),
            s("GROUP"),
            s("g1"),
            s("bob"),
            s("COUNT"),
            s("2"),
            s("STREAMS"),
            s("stream"),
            s(">"),
        ]);
        run(vec![s("XACK"), s("stream"), s("g1"), s("1000-1")]);
        run(vec![
            s("XGROUP"),
            s("CREATECONSUMER"),
            s("stream"),
            s("g2"),
            s("carol"),
        ]);
        run(vec![s("XADD"), s("stream:empty"), s("1-1"), s("a"), s("b")]);
        run(vec![s("XDEL"), s("stream:empty"), s("1-1")]);
        c.flush().await.expect("flush");
        for _ in 0..c.pending_replies() {
            let reply = c.read_reply().await.expect("reply");
            assert!(reply.error_message().is_none(), "{reply:?}");
        }
        c.call(["SAVE"]).await.expect("SAVE");

        let (content, events) = redis_content(&server, opts.clone());
        assert_chunk_limits(&events, &opts, "redis 7 dump");
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

        for ((_, name), key) in &content.keys {
            let name = name.clone();
            let n = name.as_ref();
            match &key.value {
                Value::String(v) => {
                    assert_eq!(
                        &frame_bytes(&c.call([b"GET".as_ref(), n]).await.expect("GET")),
                        v
                    );
                }
                Value::List(items) => {
                    let got = c
                        .call([b"LRANGE".as_ref(), n, b"0", b"-1"])
                        .await
                        .expect("LRANGE");
                    let got: Vec<Bytes> = frame_array(&got).iter().map(frame_bytes).collect();
                    assert_eq!(&got, items);
                }
                Value::Set(members) => {
                    let got = c.call([b"SMEMBERS".as_ref(), n]).await.expect("SMEMBERS");
                    let got: BTreeSet<Bytes> = frame_array(&got).iter().map(frame_bytes).collect();
                    assert_eq!(&got, members);
                }
                Value::ZSet(entries) => {
                    let got = c
                        .call([b"ZRANGE".as_ref(), n, b"0", b"-1", b"WITHSCORES"])
                        .await
                        .expect("ZRANGE");
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
                    assert_eq!(got, mine);
                }
                Value::Hash(fields) => {
                    let got = c.call([b"HGETALL".as_ref(), n]).await.expect("HGETALL");
                    let got: BTreeMap<Bytes, (Bytes, Option<i64>)> = frame_array(&got)
                        .chunks(2)
                        .map(|p| (frame_bytes(&p[0]), (frame_bytes(&p[1]), None)))
                        .collect();
                    assert_eq!(&got, fields);
                }
                Value::Stream {
                    entries,
                    meta,
                    groups,
                } => {
                    let got = c
                        .call([b"XRANGE".as_ref(), n, b"-", b"+"])
                        .await
                        .expect("XRANGE");
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
                    assert_eq!(got, mine);
                    let meta = meta.as_ref().expect("meta");
                    let info = c
                        .call([b"XINFO".as_ref(), b"STREAM", n])
                        .await
                        .expect("XINFO STREAM");
                    let info: BTreeMap<String, Frame> = frame_array(&info)
                        .chunks(2)
                        .map(|p| {
                            (
                                String::from_utf8_lossy(&frame_bytes(&p[0])).into_owned(),
                                p[1].clone(),
                            )
                        })
                        .collect();
                    assert_eq!(info["length"].as_integer(), Some(meta.length as i64));
                    assert_eq!(
                        frame_bytes(&info["last-generated-id"]),
                        meta.last_id.to_string().as_bytes()
                    );
                    assert_eq!(
                        frame_bytes(&info["max-deleted-entry-id"]),
                        meta.max_deleted_id.expect("v2").to_string().as_bytes()
                    );
                    assert_eq!(
                        info["entries-added"].as_integer(),
                        meta.entries_added.map(|v| v as i64)
                    );
                    assert_eq!(info["groups"].as_integer(), Some(groups.len() as i64));
                    for g in groups {
                        let pel = c
                            .call([
                                b"XPENDING".as_ref(),
                                n,
                                g.name.as_ref(),
                                b"-",
                                b"+",
                                b"1000",
                            ])
                            .await
                            .expect("XPENDING");
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
                        assert_eq!(pel, mine);
                        let consumers = c
                            .call([b"XINFO".as_ref(), b"CONSUMERS", n, g.name.as_ref()])
                            .await
                            .expect("XINFO CONSUMERS");
                        let names: BTreeSet<Bytes> = frame_array(&consumers)
                            .iter()
                            .map(|c| frame_bytes(&frame_array(c)[1]))
                            .collect();
                        let mine: BTreeSet<Bytes> =
                            g.consumers.iter().map(|c| c.name.clone()).collect();
                        assert_eq!(names, mine);
                    }
                    let xgroups = c
                        .call([b"XINFO".as_ref(), b"GROUPS", n])
                        .await
                        .expect("XINFO GROUPS");
                    for (g, info) in groups.iter().zip(frame_array(&xgroups)) {
                        let info: BTreeMap<String, Frame> = frame_array(info)
                            .chunks(2)
                            .map(|p| {
                                (
                                    String::from_utf8_lossy(&frame_bytes(&p[0])).into_owned(),
                                    p[1].clone(),
                                )
                            })
                            .collect();
                        assert_eq!(frame_bytes(&info["name"]), g.name);
                        assert_eq!(
                            frame_bytes(&info["last-delivered-id"]),
                            g.last_id.to_string().as_bytes()
                        );
                        // Redis stores "unknown" (-1) as u64::MAX and shows it as nil.
                        let entries_read =
                            g.entries_read.filter(|&v| v != u64::MAX).map(|v| v as i64);
                        assert_eq!(info["entries-read"].as_integer(), entries_read);
                    }
                }
                Value::Module(_) => panic!("no modules loaded"),
            }
        }
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
    assert!(Path::new(&server.dir.path().join("dump.rdb")).exists());
}
