//! RDB files built byte by byte, for the formats and opcodes a Redis 7.0
//! cannot be made to write (RDB versions below 10, zipmap, ziplists, linked
//! lists, text-score zsets, the RDB 11-13 types, module values and aux
//! data, slot info, pre-GA functions, Redis Enterprise hints, every length
//! and string encoding, checksums absent, disabled or wrong).
//!
//! [`RdbWriter`] writes the primitives (lengths, strings, opcodes);
//! [`Dump`] writes whole keys and records, next to the bytes, what a
//! correct reader must find: the expected [`Key`]s, aux fields, functions,
//! module aux names and slot infos, compared by `rdb_formats` with what the
//! parser makes of the bytes and with what a real redis-server 7.0 loads
//! from them. The compact blobs (listpack, ziplist, intset, zipmap, LZF)
//! come from ferry's encoders; that they are what Redis means by those
//! formats is checked by loading the dumps into redis-server.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ferry::redis::rdb::encoding::{crc64::crc64, intset, listpack, lzf, ziplist, zipmap, Element};
use ferry::redis::rdb::{
    KeyHeader, PendingEntry, StreamConsumer, StreamEntry, StreamGroup, StreamId, StreamMeta,
    ValueType,
};

use super::{b, Content, Key, Value};

pub const TYPE_STRING: u8 = 0;
pub const TYPE_LIST: u8 = 1;
pub const TYPE_SET: u8 = 2;
pub const TYPE_ZSET: u8 = 3;
pub const TYPE_HASH: u8 = 4;
pub const TYPE_ZSET_2: u8 = 5;
pub const TYPE_MODULE_PRE_GA: u8 = 6;
pub const TYPE_MODULE_2: u8 = 7;
pub const TYPE_HASH_ZIPMAP: u8 = 9;
pub const TYPE_LIST_ZIPLIST: u8 = 10;
pub const TYPE_SET_INTSET: u8 = 11;
pub const TYPE_ZSET_ZIPLIST: u8 = 12;
pub const TYPE_HASH_ZIPLIST: u8 = 13;
pub const TYPE_LIST_QUICKLIST: u8 = 14;
pub const TYPE_STREAM_LISTPACKS: u8 = 15;
pub const TYPE_HASH_LISTPACK: u8 = 16;
pub const TYPE_ZSET_LISTPACK: u8 = 17;
pub const TYPE_LIST_QUICKLIST_2: u8 = 18;
pub const TYPE_STREAM_LISTPACKS_2: u8 = 19;
pub const TYPE_SET_LISTPACK: u8 = 20;
pub const TYPE_STREAM_LISTPACKS_3: u8 = 21;
pub const TYPE_HASH_METADATA_PRE_GA: u8 = 22;
pub const TYPE_HASH_LISTPACK_EX_PRE_GA: u8 = 23;
pub const TYPE_HASH_METADATA: u8 = 24;
pub const TYPE_HASH_LISTPACK_EX: u8 = 25;
pub const TYPE_STREAM_LISTPACKS_4: u8 = 26;

pub const OPCODE_RAM_LRU: u8 = 107;
pub const OPCODE_SLOT_NUM: u8 = 121;
pub const OPCODE_SLOT_INFO: u8 = 244;
pub const OPCODE_FUNCTION2: u8 = 245;
pub const OPCODE_FUNCTION_PRE_GA: u8 = 246;
pub const OPCODE_MODULE_AUX: u8 = 247;
pub const OPCODE_IDLE: u8 = 248;
pub const OPCODE_FREQ: u8 = 249;
pub const OPCODE_AUX: u8 = 250;
pub const OPCODE_RESIZEDB: u8 = 251;
pub const OPCODE_EXPIRETIME_MS: u8 = 252;
pub const OPCODE_EXPIRETIME: u8 = 253;
pub const OPCODE_SELECTDB: u8 = 254;
pub const OPCODE_EOF: u8 = 255;

/// How a length is written: the smallest form, or a forced wide one (Redis
/// reads every form for every value).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LenForm {
    Smallest,
    Bits32,
    Bits64,
}

/// How a string is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StrForm {
    /// Length and bytes.
    Plain,
    /// `0xC0`/`0xC1`/`0xC2`: int8/16/32, the narrowest that holds the value
    /// (the string must be a canonical decimal in the i32 range).
    Int,
    /// `0xC3`: LZF-compressed (the compressor must gain at least one byte).
    Lzf,
}

/// What ends the file after `EOF`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trailer {
    /// The CRC64 of everything before it (RDB 5 and later), nothing before.
    Checksum,
    /// Eight zero bytes: "checksum disabled" (`rdbchecksum no`).
    Disabled,
    /// A checksum that does not match.
    Wrong,
    /// Nothing, whatever the version (a truncated or pre-5 file).
    None,
}

/// One module opcode of a module value or module aux payload.
#[derive(Debug, Clone)]
pub enum ModuleOp {
    Sint(u64),
    Uint(u64),
    Float(f32),
    Double(f64),
    String(Bytes),
}

/// The primitives.
pub struct RdbWriter {
    pub buf: Vec<u8>,
    pub version: u32,
}

impl RdbWriter {
    pub fn new(version: u32) -> RdbWriter {
        RdbWriter {
            buf: format!("REDIS{version:04}").into_bytes(),
            version,
        }
    }

    /// A writer after an arbitrary 9-byte header (`VALKEY080`, bad magic).
    pub fn with_header(header: &[u8], version: u32) -> RdbWriter {
        RdbWriter {
            buf: header.to_vec(),
            version,
        }
    }

    pub fn offset(&self) -> u64 {
        self.buf.len() as u64
    }

    pub fn byte(&mut self, b: u8) -> &mut Self {
        self.buf.push(b);
        self
    }

    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    pub fn len(&mut self, len: u64) -> &mut Self {
        self.len_as(len, LenForm::Smallest)
    }

    pub fn len_as(&mut self, len: u64, form: LenForm) -> &mut Self {
        match form {
            LenForm::Smallest if len < 64 => self.byte(len as u8),
            LenForm::Smallest if len < 16384 => self.raw(&[0x40 | (len >> 8) as u8, len as u8]),
            LenForm::Smallest | LenForm::Bits32 if len <= u32::MAX as u64 => {
                self.byte(0x80).raw(&(len as u32).to_be_bytes())
            }
            _ => self.byte(0x81).raw(&len.to_be_bytes()),
        }
    }

    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        self.string_as(s, StrForm::Plain)
    }

    pub fn string_as(&mut self, s: &[u8], form: StrForm) -> &mut Self {
        match form {
            StrForm::Plain => self.len(s.len() as u64).raw(s),
            StrForm::Int => {
                let text = std::str::from_utf8(s).expect("an int-encoded string is text");
                let v: i64 = text.parse().expect("an int-encoded string is a number");
                assert_eq!(v.to_string(), text, "not canonical: {text:?}");
                if let Ok(v) = i8::try_from(v) {
                    self.byte(0xC0).raw(&v.to_le_bytes())
                } else if let Ok(v) = i16::try_from(v) {
                    self.byte(0xC1).raw(&v.to_le_bytes())
                } else {
                    let v = i32::try_from(v).expect("int-encoded strings are at most 32 bits");
                    self.byte(0xC2).raw(&v.to_le_bytes())
                }
            }
            StrForm::Lzf => {
                let packed = lzf::compress(s);
                assert!(
                    packed.len() < s.len(),
                    "LZF does not shrink {} bytes",
                    s.len()
                );
                self.byte(0xC3)
                    .len(packed.len() as u64)
                    .len(s.len() as u64)
                    .raw(&packed)
            }
        }
    }

    pub fn millis(&mut self, ms: i64) -> &mut Self {
        self.raw(&ms.to_le_bytes())
    }

    /// `RDB_TYPE_ZSET`'s text score: a length byte (253 NaN, 254 +inf, 255
    /// -inf) then ASCII.
    pub fn text_double(&mut self, text: &str) -> &mut Self {
        match text {
            "nan" => self.byte(253),
            "inf" => self.byte(254),
            "-inf" => self.byte(255),
            _ => {
                assert!(text.len() < 253);
                self.byte(text.len() as u8).raw(text.as_bytes())
            }
        }
    }

    pub fn len_stream_id(&mut self, id: StreamId) -> &mut Self {
        self.len(id.ms).len(id.seq)
    }

    pub fn raw_stream_id(&mut self, id: StreamId) -> &mut Self {
        self.raw(&id.ms.to_be_bytes()).raw(&id.seq.to_be_bytes())
    }

    pub fn module_ops(&mut self, ops: &[ModuleOp]) -> &mut Self {
        for op in ops {
            match op {
                ModuleOp::Sint(v) => self.len(1).len(*v),
                ModuleOp::Uint(v) => self.len(2).len(*v),
                ModuleOp::Float(v) => self.len(3).raw(&v.to_le_bytes()),
                ModuleOp::Double(v) => self.len(4).raw(&v.to_le_bytes()),
                ModuleOp::String(s) => self.len(5).string(s),
            };
        }
        self.len(0)
    }

    /// `EOF` and the trailer.
    pub fn finish(&mut self, trailer: Trailer) -> Vec<u8> {
        self.buf.push(OPCODE_EOF);
        match trailer {
            Trailer::Checksum if self.version >= 5 => {
                let crc = crc64(0, &self.buf);
                self.buf.extend_from_slice(&crc.to_le_bytes());
            }
            Trailer::Disabled => self.buf.extend_from_slice(&[0; 8]),
            Trailer::Wrong => {
                let crc = crc64(0, &self.buf) ^ 0x5a5a;
                self.buf.extend_from_slice(&crc.to_le_bytes());
            }
            Trailer::Checksum | Trailer::None => {}
        }
        std::mem::take(&mut self.buf)
    }
}

/// The 64-bit module id of a 9-character module name and encoding version
/// (Redis `moduleTypeEncodeId`).
pub fn module_id(name: &str, encver: u64) -> u64 {
    const CHARSET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    assert_eq!(name.len(), 9, "module names are 9 characters");
    let id = name.bytes().fold(0u64, |acc, c| {
        let digit = CHARSET
            .iter()
            .position(|&x| x == c)
            .expect("module name charset") as u64;
        (acc << 6) | digit
    });
    (id << 10) | encver
}

/// One node of a quicklist 2 (`RDB_TYPE_LIST_QUICKLIST_2`).
#[derive(Debug, Clone)]
pub enum QuicklistNode {
    /// A listpack of elements; `lzf` stores it LZF-compressed.
    Packed { items: Vec<Bytes>, lzf: bool },
    /// One big element stored as is.
    Plain(Bytes),
}

/// One entry of a stream listpack node.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub id: StreamId,
    pub fields: Vec<(Bytes, Bytes)>,
    /// Flagged deleted: in the node, not in the stream.
    pub deleted: bool,
}

/// One listpack node of a stream: its master entry's id and fields, and
/// its entries (those with exactly the master fields are written with the
/// SAMEFIELDS flag, values only).
#[derive(Debug, Clone)]
pub struct StreamNode {
    pub master: StreamId,
    pub master_fields: Vec<Bytes>,
    pub entries: Vec<NodeEntry>,
}

/// Idempotent-producer state of `RDB_TYPE_STREAM_LISTPACKS_4`.
#[derive(Debug, Clone, Default)]
pub struct StreamIdmp {
    pub duration: u64,
    pub max_entries: u64,
    pub producers: Vec<(Bytes, Vec<(Bytes, StreamId)>)>,
    pub ids_added: u64,
    pub duplicates: u64,
}

/// A whole stream value; the metadata fields a type does not store are
/// left out of the bytes and expected as `None`.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub nodes: Vec<StreamNode>,
    pub length: u64,
    pub last_id: StreamId,
    pub first_id: StreamId,
    pub max_deleted_id: StreamId,
    pub entries_added: u64,
    pub groups: Vec<StreamGroup>,
    pub idmp: StreamIdmp,
}

pub fn sid(ms: u64, seq: u64) -> StreamId {
    StreamId { ms, seq }
}

/// Per-key metadata written before a key.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyMeta {
    pub expire_ms: Option<i64>,
    /// Written with the seconds opcode (`EXPIRETIME`); must be whole seconds.
    pub expire_secs: bool,
    pub lru_idle: Option<u64>,
    pub lfu_freq: Option<u8>,
    /// Redis Enterprise's RAM_LRU hint (skipped by readers).
    pub ram_lru: Option<u64>,
    /// Redis Enterprise's SLOT_NUM hint (skipped by readers).
    pub slot_num: Option<u64>,
}

fn bytes_of(items: &[&str]) -> Vec<Bytes> {
    items
        .iter()
        .map(|s| Bytes::copy_from_slice(s.as_bytes()))
        .collect()
}

fn elements(items: &[Bytes]) -> Vec<Element> {
    items.iter().cloned().map(Element::Str).collect()
}

/// A dump under construction and what it must be read as.
pub struct Dump {
    pub w: RdbWriter,
    pub db: u32,
    pub expected: Content,
    /// Byte offset where each key's type byte was written.
    pub key_offsets: BTreeMap<(u32, Bytes), u64>,
    /// The key being written: its id, type byte and where its value starts
    /// (to record the raw capture `type byte ++ value` when it ends).
    open: Option<((u32, Bytes), u8, usize)>,
    /// Metadata for the next key written through the short forms.
    next_meta: KeyMeta,
}

impl Dump {
    pub fn new(version: u32) -> Dump {
        Dump {
            w: RdbWriter::new(version),
            db: 0,
            expected: Content {
                version,
                ..Content::default()
            },
            key_offsets: BTreeMap::new(),
            open: None,
            next_meta: KeyMeta::default(),
        }
    }

    /// Ends the value being written: its expected raw capture is the type
    /// byte and every byte after the key name.
    fn close(&mut self) {
        if let Some((id, type_byte, start)) = self.open.take() {
            let mut raw = vec![type_byte];
            raw.extend_from_slice(&self.w.buf[start..]);
            self.expected.keys.get_mut(&id).expect("open key").raw = Some(Bytes::from(raw));
        }
    }

    pub fn version(&self) -> u32 {
        self.w.version
    }

    pub fn aux(&mut self, key: &str, value: &str) -> &mut Self {
        self.close();
        self.w.byte(OPCODE_AUX).string(key.as_bytes());
        self.w.string(value.as_bytes());
        self.expected.aux.push((super::b(key), super::b(value)));
        self
    }

    pub fn select_db(&mut self, db: u32) -> &mut Self {
        self.close();
        self.w.byte(OPCODE_SELECTDB).len(db as u64);
        self.db = db;
        self
    }

    pub fn resize_db(&mut self, size: u64, expires: u64) -> &mut Self {
        self.close();
        self.w.byte(OPCODE_RESIZEDB).len(size).len(expires);
        self.expected.resize.push((size, expires));
        self
    }

    pub fn slot_info(&mut self, slot: u64, size: u64, expires: u64) -> &mut Self {
        self.close();
        self.w
            .byte(OPCODE_SLOT_INFO)
            .len(slot)
            .len(size)
            .len(expires);
        self.expected.slot_info.push((slot, size, expires));
        self
    }

    pub fn function(&mut self, code: &str) -> &mut Self {
        self.close();
        self.w.byte(OPCODE_FUNCTION2).string(code.as_bytes());
        self.expected.functions.push(super::b(code));
        self
    }

    /// The Redis 7.0 release candidates' function record.
    pub fn function_pre_ga(
        &mut self,
        name: &str,
        description: Option<&str>,
        code: &str,
    ) -> &mut Self {
        self.close();
        self.w
            .byte(OPCODE_FUNCTION_PRE_GA)
            .string(name.as_bytes())
            .string(b"LUA");
        match description {
            Some(d) => self.w.len(1).string(d.as_bytes()),
            None => self.w.len(0),
        };
        self.w.string(code.as_bytes());
        self.expected.functions.push(super::b(code));
        self
    }

    pub fn module_aux(&mut self, name: &str, when: u64, ops: &[ModuleOp]) -> &mut Self {
        self.close();
        self.w
            .byte(OPCODE_MODULE_AUX)
            .len(module_id(name, 1))
            .len(2)
            .len(when)
            .module_ops(ops);
        self.expected.module_aux.push(name.to_string());
        self
    }

    /// Writes the per-key opcodes and the type byte and key name; records
    /// the expected key.
    fn start(&mut self, key: &[u8], key_form: StrForm, meta: KeyMeta, type_byte: u8, value: Value) {
        self.close();
        let pending = std::mem::take(&mut self.next_meta);
        let meta = KeyMeta {
            expire_ms: meta.expire_ms.or(pending.expire_ms),
            expire_secs: meta.expire_secs || pending.expire_secs,
            lru_idle: meta.lru_idle.or(pending.lru_idle),
            lfu_freq: meta.lfu_freq.or(pending.lfu_freq),
            ram_lru: meta.ram_lru.or(pending.ram_lru),
            slot_num: meta.slot_num.or(pending.slot_num),
        };
        if let Some(n) = meta.ram_lru {
            self.w.byte(OPCODE_RAM_LRU).len(n);
        }
        if let Some(n) = meta.slot_num {
            self.w.byte(OPCODE_SLOT_NUM).len(n);
        }
        match meta.expire_ms {
            Some(ms) if meta.expire_secs => {
                assert_eq!(ms % 1000, 0);
                let secs = i32::try_from(ms / 1000).expect("EXPIRETIME holds 32-bit seconds");
                self.w.byte(OPCODE_EXPIRETIME).raw(&secs.to_le_bytes());
            }
            Some(ms) => {
                self.w.byte(OPCODE_EXPIRETIME_MS).millis(ms);
            }
            None => {}
        }
        if let Some(idle) = meta.lru_idle {
            self.w.byte(OPCODE_IDLE).len(idle);
        }
        if let Some(freq) = meta.lfu_freq {
            self.w.byte(OPCODE_FREQ).byte(freq);
        }
        let id = (self.db, Bytes::copy_from_slice(key));
        self.key_offsets.insert(id.clone(), self.w.offset());
        self.w.byte(type_byte).string_as(key, key_form);
        self.open = Some((id.clone(), type_byte, self.w.buf.len()));
        let value_type = match type_byte {
            TYPE_STRING => ValueType::String,
            TYPE_LIST | TYPE_LIST_ZIPLIST | TYPE_LIST_QUICKLIST | TYPE_LIST_QUICKLIST_2 => {
                ValueType::List
            }
            TYPE_SET | TYPE_SET_INTSET | TYPE_SET_LISTPACK => ValueType::Set,
            TYPE_ZSET | TYPE_ZSET_2 | TYPE_ZSET_ZIPLIST | TYPE_ZSET_LISTPACK => ValueType::ZSet,
            TYPE_HASH
            | TYPE_HASH_ZIPMAP
            | TYPE_HASH_ZIPLIST
            | TYPE_HASH_LISTPACK
            | TYPE_HASH_METADATA_PRE_GA
            | TYPE_HASH_LISTPACK_EX_PRE_GA
            | TYPE_HASH_METADATA
            | TYPE_HASH_LISTPACK_EX => ValueType::Hash,
            TYPE_STREAM_LISTPACKS
            | TYPE_STREAM_LISTPACKS_2
            | TYPE_STREAM_LISTPACKS_3
            | TYPE_STREAM_LISTPACKS_4 => ValueType::Stream,
            TYPE_MODULE_2 => ValueType::Module,
            other => panic!("no value type for {other}"),
        };
        let header = KeyHeader {
            db: self.db,
            key: id.1.clone(),
            value_type,
            encoding: type_byte,
            expire_ms: meta.expire_ms,
            lru_idle: meta.lru_idle,
            lfu_freq: meta.lfu_freq,
        };
        let key = Key {
            header,
            value,
            chunks: 0,
            raw: None,
        };
        assert!(
            self.expected.keys.insert(id, key).is_none(),
            "key written twice"
        );
    }

    // -- strings ----------------------------------------------------------

    pub fn string(&mut self, key: &str, value: &[u8], form: StrForm) -> &mut Self {
        self.string_with(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            value,
            form,
        )
    }

    pub fn string_with(
        &mut self,
        key: &[u8],
        key_form: StrForm,
        meta: KeyMeta,
        value: &[u8],
        form: StrForm,
    ) -> &mut Self {
        let v = Value::String(Bytes::copy_from_slice(value));
        self.start(key, key_form, meta, TYPE_STRING, v);
        self.w.string_as(value, form);
        self
    }

    /// A string whose length is written in `form` (e.g. a 5-byte string
    /// with a 64-bit length).
    pub fn string_len_form(&mut self, key: &str, value: &[u8], form: LenForm) -> &mut Self {
        let v = Value::String(Bytes::copy_from_slice(value));
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_STRING,
            v,
        );
        self.w.len_as(value.len() as u64, form).raw(value);
        self
    }

    /// Anything else, written by `write` after the key name: the caller
    /// states what it must read as.
    pub fn custom(
        &mut self,
        key: &str,
        type_byte: u8,
        value: Value,
        write: impl FnOnce(&mut RdbWriter),
    ) -> &mut Self {
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            type_byte,
            value,
        );
        write(&mut self.w);
        self
    }

    /// Sets the per-key metadata of the next key (see [`KeyMeta`]).
    pub fn meta(&mut self, meta: KeyMeta) -> &mut Self {
        self.next_meta = meta;
        self
    }

    // -- lists ------------------------------------------------------------

    pub fn list_linked(&mut self, key: &str, items: &[Bytes]) -> &mut Self {
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_LIST,
            Value::List(items.to_vec()),
        );
        self.w.len(items.len() as u64);
        for item in items {
            self.w.string(item);
        }
        self
    }

    pub fn list_ziplist(&mut self, key: &str, items: &[Bytes], form: StrForm) -> &mut Self {
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_LIST_ZIPLIST,
            Value::List(items.to_vec()),
        );
        self.w.string_as(&ziplist::encode(&elements(items)), form);
        self
    }

    /// `RDB_TYPE_LIST_QUICKLIST`: ziplist nodes, each optionally LZF.
    pub fn list_quicklist(&mut self, key: &str, nodes: &[(Vec<Bytes>, bool)]) -> &mut Self {
        let all: Vec<Bytes> = nodes.iter().flat_map(|(n, _)| n.iter().cloned()).collect();
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_LIST_QUICKLIST,
            Value::List(all),
        );
        self.w.len(nodes.len() as u64);
        for (items, compressed) in nodes {
            let form = if *compressed {
                StrForm::Lzf
            } else {
                StrForm::Plain
            };
            self.w.string_as(&ziplist::encode(&elements(items)), form);
        }
        self
    }

    pub fn list_quicklist2(&mut self, key: &str, nodes: &[QuicklistNode]) -> &mut Self {
        let all: Vec<Bytes> = nodes
            .iter()
            .flat_map(|n| match n {
                QuicklistNode::Packed { items, .. } => items.clone(),
                QuicklistNode::Plain(item) => vec![item.clone()],
            })
            .collect();
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_LIST_QUICKLIST_2,
            Value::List(all),
        );
        self.w.len(nodes.len() as u64);
        for node in nodes {
            match node {
                QuicklistNode::Plain(item) => {
                    self.w.len(1).string(item);
                }
                QuicklistNode::Packed { items, lzf } => {
                    let form = if *lzf { StrForm::Lzf } else { StrForm::Plain };
                    self.w
                        .len(2)
                        .string_as(&listpack::encode(&elements(items)), form);
                }
            }
        }
        self
    }

    // -- sets ---------------------------------------------------------------

    pub fn set_plain(&mut self, key: &str, members: &[Bytes]) -> &mut Self {
        let set: BTreeSet<Bytes> = members.iter().cloned().collect();
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_SET,
            Value::Set(set),
        );
        self.w.len(members.len() as u64);
        for m in members {
            self.w.string(m);
        }
        self
    }

    pub fn set_intset(&mut self, key: &str, members: &[i64]) -> &mut Self {
        let set: BTreeSet<Bytes> = members.iter().map(|m| Bytes::from(m.to_string())).collect();
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_SET_INTSET,
            Value::Set(set),
        );
        self.w.string(&intset::encode(members));
        self
    }

    pub fn set_listpack(&mut self, key: &str, members: &[Bytes]) -> &mut Self {
        let set: BTreeSet<Bytes> = members.iter().cloned().collect();
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_SET_LISTPACK,
            Value::Set(set),
        );
        self.w.string(&listpack::encode(&elements(members)));
        self
    }

    // -- sorted sets --------------------------------------------------------

    /// `RDB_TYPE_ZSET`: scores as text (`"inf"`, `"-inf"`, `"nan"` use the
    /// special length bytes).
    pub fn zset_text(&mut self, key: &str, entries: &[(&str, &str)]) -> &mut Self {
        let want = entries
            .iter()
            .map(|(m, s)| {
                (
                    super::b(m),
                    ferry::redis::rdb::encoding::parse_f64(s.as_bytes()).expect("score"),
                )
            })
            .collect();
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_ZSET,
            Value::ZSet(want),
        );
        self.w.len(entries.len() as u64);
        for (m, s) in entries {
            self.w.string(m.as_bytes()).text_double(s);
        }
        self
    }

    pub fn zset_binary(&mut self, key: &str, entries: &[(Bytes, f64)]) -> &mut Self {
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_ZSET_2,
            Value::ZSet(entries.to_vec()),
        );
        self.w.len(entries.len() as u64);
        for (m, s) in entries {
            self.w.string(m).raw(&s.to_le_bytes());
        }
        self
    }

    /// Ziplist (`compact = false`) or listpack zset: member, score pairs;
    /// the score as written (`"2.5"`, `"7"` is stored as an integer).
    pub fn zset_compact(
        &mut self,
        key: &str,
        listpack_form: bool,
        entries: &[(&str, &str)],
    ) -> &mut Self {
        let want = entries
            .iter()
            .map(|(m, s)| {
                (
                    super::b(m),
                    ferry::redis::rdb::encoding::parse_f64(s.as_bytes()).expect("score"),
                )
            })
            .collect();
        let flat: Vec<Bytes> = entries
            .iter()
            .flat_map(|(m, s)| [super::b(m), super::b(s)])
            .collect();
        let (type_byte, blob) = if listpack_form {
            (TYPE_ZSET_LISTPACK, listpack::encode(&elements(&flat)))
        } else {
            (TYPE_ZSET_ZIPLIST, ziplist::encode(&elements(&flat)))
        };
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            type_byte,
            Value::ZSet(want),
        );
        self.w.string(&blob);
        self
    }

    // -- hashes -------------------------------------------------------------

    fn hash_value(pairs: &[(Bytes, Bytes)]) -> Value {
        Value::Hash(
            pairs
                .iter()
                .map(|(f, v)| (f.clone(), (v.clone(), None)))
                .collect(),
        )
    }

    pub fn hash_plain(&mut self, key: &str, pairs: &[(Bytes, Bytes)]) -> &mut Self {
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_HASH,
            Self::hash_value(pairs),
        );
        self.w.len(pairs.len() as u64);
        for (f, v) in pairs {
            self.w.string(f).string(v);
        }
        self
    }

    pub fn hash_zipmap(
        &mut self,
        key: &str,
        pairs: &[(Bytes, Bytes)],
        free: u8,
        form: StrForm,
    ) -> &mut Self {
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_HASH_ZIPMAP,
            Self::hash_value(pairs),
        );
        self.w.string_as(&zipmap::encode(pairs, free), form);
        self
    }

    /// Ziplist (`listpack_form = false`) or listpack hash.
    pub fn hash_compact(
        &mut self,
        key: &str,
        listpack_form: bool,
        pairs: &[(Bytes, Bytes)],
    ) -> &mut Self {
        let flat: Vec<Bytes> = pairs
            .iter()
            .flat_map(|(f, v)| [f.clone(), v.clone()])
            .collect();
        let (type_byte, blob) = if listpack_form {
            (TYPE_HASH_LISTPACK, listpack::encode(&elements(&flat)))
        } else {
            (TYPE_HASH_ZIPLIST, ziplist::encode(&elements(&flat)))
        };
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            type_byte,
            Self::hash_value(pairs),
        );
        self.w.string(&blob);
        self
    }

    /// The field-TTL hashes of Redis 7.4: `type_byte` is one of the four
    /// `HASH_METADATA*` / `HASH_LISTPACK_EX*` types; fields carry absolute
    /// expiries in ms (None: no TTL).
    pub fn hash_with_ttls(
        &mut self,
        key: &str,
        type_byte: u8,
        fields: &[(&str, &str, Option<i64>)],
    ) -> &mut Self {
        let want = Value::Hash(
            fields
                .iter()
                .map(|(f, v, t)| (super::b(f), (super::b(v), *t)))
                .collect(),
        );
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            type_byte,
            want,
        );
        let min = fields.iter().filter_map(|(_, _, t)| *t).min();
        match type_byte {
            TYPE_HASH_METADATA_PRE_GA | TYPE_HASH_METADATA => {
                let relative = type_byte == TYPE_HASH_METADATA;
                if relative {
                    self.w.millis(min.unwrap_or(0));
                }
                self.w.len(fields.len() as u64);
                for (f, v, t) in fields {
                    let ttl = match (t, relative) {
                        (None, _) => 0,
                        (Some(t), false) => *t as u64,
                        (Some(t), true) => (*t - min.expect("a TTL") + 1) as u64,
                    };
                    self.w.len(ttl).string(f.as_bytes()).string(v.as_bytes());
                }
            }
            TYPE_HASH_LISTPACK_EX_PRE_GA | TYPE_HASH_LISTPACK_EX => {
                if type_byte == TYPE_HASH_LISTPACK_EX {
                    self.w.millis(min.unwrap_or(0));
                }
                let flat: Vec<Element> = fields
                    .iter()
                    .flat_map(|(f, v, t)| {
                        [
                            Element::Str(super::b(f)),
                            Element::Str(super::b(v)),
                            Element::Int(t.unwrap_or(0)),
                        ]
                    })
                    .collect();
                self.w.string(&listpack::encode(&flat));
            }
            other => panic!("{other} is not a field-TTL hash type"),
        }
        self
    }

    // -- streams ------------------------------------------------------------

    pub fn stream(&mut self, key: &str, type_byte: u8, spec: &StreamSpec) -> &mut Self {
        let v2 = type_byte >= TYPE_STREAM_LISTPACKS_2;
        let v3 = type_byte >= TYPE_STREAM_LISTPACKS_3;
        let entries: Vec<StreamEntry> = spec
            .nodes
            .iter()
            .flat_map(|n| n.entries.iter())
            .filter(|e| !e.deleted)
            .map(|e| StreamEntry {
                id: e.id,
                fields: e.fields.clone(),
            })
            .collect();
        let meta = StreamMeta {
            length: spec.length,
            last_id: spec.last_id,
            first_id: v2.then_some(spec.first_id),
            max_deleted_id: v2.then_some(spec.max_deleted_id),
            entries_added: v2.then_some(spec.entries_added),
        };
        let groups: Vec<StreamGroup> = spec
            .groups
            .iter()
            .map(|g| StreamGroup {
                entries_read: if v2 { g.entries_read } else { None },
                consumers: g
                    .consumers
                    .iter()
                    .map(|c| StreamConsumer {
                        active_time_ms: if v3 { c.active_time_ms } else { None },
                        ..c.clone()
                    })
                    .collect(),
                ..g.clone()
            })
            .collect();
        let value = Value::Stream {
            entries,
            meta: Some(meta),
            groups,
        };
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            type_byte,
            value,
        );
        self.w.len(spec.nodes.len() as u64);
        for node in &spec.nodes {
            let mut master = Vec::with_capacity(16);
            master.extend_from_slice(&node.master.ms.to_be_bytes());
            master.extend_from_slice(&node.master.seq.to_be_bytes());
            self.w.string(&master);
            self.w.string(&stream_listpack(node));
        }
        self.w.len(spec.length).len_stream_id(spec.last_id);
        if v2 {
            self.w
                .len_stream_id(spec.first_id)
                .len_stream_id(spec.max_deleted_id)
                .len(spec.entries_added);
        }
        self.w.len(spec.groups.len() as u64);
        for g in &spec.groups {
            self.w.string(&g.name).len_stream_id(g.last_id);
            if v2 {
                self.w
                    .len(g.entries_read.expect("entries_read for a v2 stream"));
            }
            self.w.len(g.pending.len() as u64);
            for p in &g.pending {
                self.w
                    .raw_stream_id(p.id)
                    .millis(p.delivery_time_ms)
                    .len(p.delivery_count);
            }
            self.w.len(g.consumers.len() as u64);
            for c in &g.consumers {
                self.w.string(&c.name).millis(c.seen_time_ms);
                if v3 {
                    self.w
                        .millis(c.active_time_ms.expect("active time for a v3 stream"));
                }
                self.w.len(c.pending.len() as u64);
                for id in &c.pending {
                    self.w.raw_stream_id(*id);
                }
            }
        }
        if type_byte >= TYPE_STREAM_LISTPACKS_4 {
            let idmp = &spec.idmp;
            self.w
                .len(idmp.duration)
                .len(idmp.max_entries)
                .len(idmp.producers.len() as u64);
            for (producer, ids) in &idmp.producers {
                self.w.string(producer).len(ids.len() as u64);
                for (iid, entry) in ids {
                    self.w.string(iid).len_stream_id(*entry);
                }
            }
            self.w.len(idmp.ids_added).len(idmp.duplicates);
        }
        self
    }

    // -- modules ------------------------------------------------------------

    pub fn module_value(&mut self, key: &str, name: &str, ops: &[ModuleOp]) -> &mut Self {
        self.start(
            key.as_bytes(),
            StrForm::Plain,
            KeyMeta::default(),
            TYPE_MODULE_2,
            Value::Module(name.to_string()),
        );
        self.w.len(module_id(name, 1)).module_ops(ops);
        self
    }

    /// Ends the file; the bytes, and what they must be read as.
    pub fn finish(mut self, trailer: Trailer) -> (Vec<u8>, Content) {
        self.close();
        let data = self.w.finish(trailer);
        let checksum = match trailer {
            _ if self.w.version < 5 => None,
            Trailer::Checksum | Trailer::Wrong => {
                let crc = u64::from_le_bytes(data[data.len() - 8..].try_into().expect("8 bytes"));
                Some(crc)
            }
            Trailer::Disabled => Some(0),
            Trailer::None => None,
        };
        self.expected.checksum = Some(checksum);
        (data, self.expected)
    }
}

/// A stream node's listpack: the master entry, then each entry as flags,
/// id deltas, fields (or, with SAMEFIELDS, values only) and lp-count.
pub fn stream_listpack(node: &StreamNode) -> Vec<u8> {
    let live = node.entries.iter().filter(|e| !e.deleted).count() as i64;
    let deleted = node.entries.len() as i64 - live;
    let mut el = vec![
        Element::Int(live),
        Element::Int(deleted),
        Element::Int(node.master_fields.len() as i64),
    ];
    el.extend(node.master_fields.iter().cloned().map(Element::Str));
    el.push(Element::Int(0));
    for e in &node.entries {
        let same = e.fields.len() == node.master_fields.len()
            && e.fields
                .iter()
                .zip(&node.master_fields)
                .all(|((f, _), m)| f == m);
        let flags = i64::from(e.deleted) | if same { 2 } else { 0 };
        el.push(Element::Int(flags));
        el.push(Element::Int(e.id.ms.wrapping_sub(node.master.ms) as i64));
        el.push(Element::Int(e.id.seq.wrapping_sub(node.master.seq) as i64));
        if same {
            el.extend(e.fields.iter().map(|(_, v)| Element::Str(v.clone())));
            el.push(Element::Int(3 + e.fields.len() as i64));
        } else {
            el.push(Element::Int(e.fields.len() as i64));
            for (f, v) in &e.fields {
                el.push(Element::Str(f.clone()));
                el.push(Element::Str(v.clone()));
            }
            el.push(Element::Int(4 + 2 * e.fields.len() as i64));
        }
    }
    listpack::encode(&el)
}

pub fn strs(items: &[&str]) -> Vec<Bytes> {
    bytes_of(items)
}

pub fn pairs(items: &[(&str, &str)]) -> Vec<(Bytes, Bytes)> {
    items
        .iter()
        .map(|(f, v)| (super::b(f), super::b(v)))
        .collect()
}

pub fn pending(id: StreamId, delivery_time_ms: i64, delivery_count: u64) -> PendingEntry {
    PendingEntry {
        id,
        delivery_time_ms,
        delivery_count,
    }
}

/// A stream like librdb's `stream_v11.rdb`: six entries in one node (the
/// last with other fields), two groups with a PEL entry each, three
/// consumers.
pub fn two_group_stream() -> StreamSpec {
    let id = |ms: u64| sid(ms, 0);
    let message = |ms: u64, text: &str| NodeEntry {
        id: id(ms),
        fields: pairs(&[("message", text)]),
        deleted: false,
    };
    StreamSpec {
        nodes: vec![StreamNode {
            master: id(1695649068107),
            master_fields: strs(&["message"]),
            entries: vec![
                message(1695649068107, "Message1"),
                message(1695649068110, "Message2"),
                message(1695649069139, "Message3"),
                message(1695649446276, "Message4"),
                message(1695649456516, "Message5"),
                NodeEntry {
                    id: id(1695893015933),
                    fields: pairs(&[
                        ("field1", "value1"),
                        ("field2", "value2"),
                        ("field3", "value3"),
                    ]),
                    deleted: false,
                },
            ],
        }],
        length: 6,
        last_id: id(1695893015933),
        first_id: id(1695649068107),
        max_deleted_id: sid(0, 0),
        entries_added: 6,
        groups: vec![
            StreamGroup {
                name: b("groupA"),
                last_id: id(1695649446276),
                entries_read: Some(4),
                pending: vec![pending(id(1695649446276), 1695649446276, 1)],
                consumers: vec![
                    StreamConsumer {
                        name: b("consumerA1"),
                        seen_time_ms: 1696679585023,
                        active_time_ms: Some(1696679585023),
                        pending: vec![],
                    },
                    StreamConsumer {
                        name: b("consumerA2"),
                        seen_time_ms: 1696679585024,
                        active_time_ms: Some(1696679585024),
                        pending: vec![id(1695649446276)],
                    },
                ],
            },
            StreamGroup {
                name: b("groupB"),
                last_id: id(1695649069139),
                entries_read: Some(3),
                pending: vec![pending(id(1695649069139), 1695649069139, 1)],
                consumers: vec![StreamConsumer {
                    name: b("consumerB1"),
                    seen_time_ms: 1696679585026,
                    active_time_ms: Some(1696679585026),
                    pending: vec![id(1695649069139)],
                }],
            },
        ],
        idmp: StreamIdmp::default(),
    }
}

/// 24 zset entries whose scores cover -inf, inf, -0, integers stored as
/// such, big and tiny decimals (librdb's `zset_zl_v6` content).
pub const SCORES_24: [(&str, &str); 24] = [
    ("a10", "-inf"),
    ("a24", "-4.329000123123131e+28"),
    ("a12", "-9007199254740992"),
    ("a22", "-1125899906842624"),
    ("a18", "-65536"),
    ("a16", "-255"),
    ("a14", "-9.99999"),
    ("a20", "-1.1"),
    ("a19", "-1"),
    ("a1", "0"),
    ("a2", "0"),
    ("a3", "-0"),
    ("a4", "-0"),
    ("a5", "0"),
    ("a6", "0"),
    ("a7", "2.2"),
    ("a13", "8.888888"),
    ("a15", "255"),
    ("a17", "65536"),
    ("a21", "1125899906842624"),
    ("a11", "9007199254740992"),
    ("a23", "1.000033e+25"),
    ("a8", "inf"),
    ("a9", "inf"),
];
