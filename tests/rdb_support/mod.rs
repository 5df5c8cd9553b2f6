//! Support shared by the RDB test targets (`rdb_formats`, `rdb_corpus`,
//! `rdb_cli`, `rdb_roundtrip`): the parser's events folded into a content
//! model whose event grammar is checked on the way, the streaming checks
//! every dump goes through (tiny reads, every truncation, chunk limits), and
//! [`writer`], which builds RDB files byte by byte.
#![allow(dead_code)]

pub mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use bytes::Bytes;
use ferry::redis::rdb::{
    KeyHeader, ParseOptions, RdbError, RdbEvent, RdbParser, StreamEntry, StreamGroup, StreamMeta,
    ValueChunk, ValueType,
};

// ---------------------------------------------------------------------------
// Parsing helpers and the content model built from events.

pub fn parse_events<R: Read>(
    reader: R,
    opts: ParseOptions,
) -> (Vec<RdbEvent>, Result<u64, RdbError>) {
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

pub fn parse_ok(data: &[u8], opts: ParseOptions) -> Vec<RdbEvent> {
    let (events, end) = parse_events(data, opts);
    if let Err(e) = end {
        panic!("parse failed: {e}");
    }
    events
}

/// The error a dump that must be refused is refused with.
pub fn parse_err(data: &[u8]) -> RdbError {
    match parse_events(data, ParseOptions::default()).1 {
        Ok(end) => panic!("parsed to the end (byte {end}) instead of being refused"),
        Err(e) => e,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
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
pub struct Key {
    pub header: KeyHeader,
    pub value: Value,
    pub chunks: usize,
    pub raw: Option<Bytes>,
}

#[derive(Debug, Default)]
pub struct Content {
    pub version: u32,
    pub aux: Vec<(Bytes, Bytes)>,
    pub functions: Vec<Bytes>,
    pub module_aux: Vec<String>,
    pub slot_info: Vec<(u64, u64, u64)>,
    pub resize: Vec<(u64, u64)>,
    pub keys: BTreeMap<(u32, Bytes), Key>,
    pub checksum: Option<Option<u64>>,
}

/// Folds events into content, checking the event grammar on the way:
/// Header first, KeyStart (Chunk)* KeyEnd, chunk kinds matching the key
/// type, End last.
pub fn model(events: &[RdbEvent]) -> Content {
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
    pub fn key(&self, name: &str) -> &Key {
        self.keys
            .iter()
            .find(|((_, k), _)| k.as_ref() == name.as_bytes())
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("key {name:?} not found; have {:?}", self.key_names()))
    }

    pub fn key_names(&self) -> Vec<String> {
        self.keys
            .keys()
            .map(|(_, k)| String::from_utf8_lossy(k).into_owned())
            .collect()
    }
}

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

// ---------------------------------------------------------------------------
// Streaming: tiny reads, truncation, chunk limits.

/// Returns 1..=7 bytes per read call, cycling.
pub struct Dribble<'a> {
    pub data: &'a [u8],
    pub pos: usize,
    pub step: usize,
}

impl<'a> Dribble<'a> {
    pub fn new(data: &'a [u8]) -> Dribble<'a> {
        Dribble {
            data,
            pos: 0,
            step: 0,
        }
    }
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

/// Bytes of one element as the parser counts them for `chunk_bytes`.
pub fn chunk_sizes(chunk: &ValueChunk) -> Vec<usize> {
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

pub fn assert_chunk_limits(events: &[RdbEvent], opts: &ParseOptions, label: &str) {
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

/// Reading `data` 1..7 bytes at a time gives the same events and the same
/// end (or the same error) as reading it whole.
pub fn check_tiny_reads(label: &str, data: &[u8]) {
    let (whole, whole_end) = parse_events(data, ParseOptions::default());
    let (dribbled, dribbled_end) = parse_events(Dribble::new(data), ParseOptions::default());
    assert_eq!(whole, dribbled, "{label}");
    match (whole_end, dribbled_end) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{label}"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{label}"),
        (a, b) => panic!("{label}: {a:?} vs {b:?}"),
    }
}

/// Every prefix of a dump that parses (at most ~300 spread cuts for big ones)
/// fails with `UnexpectedEof` at exactly the cut.
pub fn check_truncations(label: &str, data: &[u8]) {
    let (_, end) = parse_events(data, ParseOptions::default());
    let rdb_len = end.unwrap_or_else(|e| panic!("{label}: {e}")) as usize;
    let step = (rdb_len / 300).max(1);
    let mut cut = 0;
    while cut < rdb_len {
        let (_, end) = parse_events(&data[..cut], ParseOptions::default());
        match end {
            Err(RdbError::UnexpectedEof { offset, .. }) => {
                assert_eq!(offset, cut as u64, "{label} cut at {cut}")
            }
            other => panic!("{label} cut at {cut}: {other:?}"),
        }
        cut += step;
    }
}

/// Tiny chunk limits hold, and change neither the content nor the raw
/// captures.
pub fn check_chunk_limits(label: &str, data: &[u8]) {
    let small = ParseOptions {
        chunk_items: 3,
        chunk_bytes: 40,
        ..ParseOptions::default()
    };
    let big = model(&parse_ok(data, ParseOptions::default()));
    let events = parse_ok(data, small.clone());
    assert_chunk_limits(&events, &small, label);
    let chunked = model(&events);
    assert_eq!(big.keys.len(), chunked.keys.len(), "{label}");
    for (id, key) in &big.keys {
        assert_eq!(key.value, chunked.keys[id].value, "{label}: {:?}", id.1);
        assert_eq!(key.raw, chunked.keys[id].raw, "{label}: {:?}", id.1);
    }
}

/// All three streaming checks.
pub fn check_streaming(label: &str, data: &[u8]) {
    check_tiny_reads(label, data);
    check_truncations(label, data);
    check_chunk_limits(label, data);
}
