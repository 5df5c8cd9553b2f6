//! Streaming RDB: a pull parser that turns an RDB byte stream (a file, or the
//! payload of a full resync while it arrives) into [`RdbEvent`]s, and the
//! consumers of those events.
//!
//! What flows in: any `std::io::Read` positioned at the `REDIS`/`VALKEY`
//! magic. What flows out: one [`RdbEvent`] per call to
//! [`RdbParser::next_event`], in file order.
//!
//! Memory is bounded: a key's value never comes out whole. Collections come
//! out as [`ValueChunk`]s of at most [`ParseOptions::chunk_items`] elements or
//! about [`ParseOptions::chunk_bytes`] bytes, whichever is reached first; a
//! string value is a single [`ValueChunk::String`] when it is at most
//! `chunk_bytes` long, else several, in order, of about `chunk_bytes` each
//! (an LZF-compressed one is decompressed as it is read, keeping 8 KiB of
//! history), which concatenate to the value. Elements inside collections
//! (a list item, a hash field) are each held whole, bounded by
//! [`ParseOptions::max_string_len`].
//! Every length read from the input is checked against those limits before
//! anything is allocated.
//!
//! A key is `KeyStart`, zero or more `Chunk`s, then `KeyEnd`. `KeyEnd` carries
//! the key's raw encoded value (type byte + value bytes exactly as in the
//! file) when it is no longer than [`ParseOptions::raw_capture_limit`]: the
//! body of a `DUMP`/`RESTORE` payload (see [`dump_payload`]).
//!
//! Errors name the byte offset from the start of the stream and what was
//! expected there.

pub mod dump_json;
pub mod encoding;
mod parser;
pub mod rebuild;

pub use parser::RdbParser;

use bytes::Bytes;

/// Oldest and newest `REDIS` RDB versions the parser reads.
pub const MIN_RDB_VERSION: u32 = 1;
pub const MAX_RDB_VERSION: u32 = 13;

/// Logical type of a key, independent of its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    String,
    List,
    Set,
    ZSet,
    Hash,
    Stream,
    Module,
}

impl ValueType {
    /// The name Redis's `TYPE` command answers with (`module` for modules).
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::String => "string",
            ValueType::List => "list",
            ValueType::Set => "set",
            ValueType::ZSet => "zset",
            ValueType::Hash => "hash",
            ValueType::Stream => "stream",
            ValueType::Module => "module",
        }
    }
}

/// Everything known about a key before its value.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyHeader {
    pub db: u32,
    pub key: Bytes,
    pub value_type: ValueType,
    /// The RDB type byte (`RDB_TYPE_*`), i.e. the on-disk encoding.
    pub encoding: u8,
    /// Absolute expiry, unix milliseconds.
    pub expire_ms: Option<i64>,
    /// `RDB_OPCODE_IDLE` (LRU idle seconds), when present.
    pub lru_idle: Option<u64>,
    /// `RDB_OPCODE_FREQ` (LFU counter), when present.
    pub lfu_freq: Option<u8>,
}

/// A field of a hash; `expire_ms` is the per-field TTL of Redis 7.4+ (RDB 12).
#[derive(Debug, Clone, PartialEq)]
pub struct HashField {
    pub field: Bytes,
    pub value: Bytes,
    pub expire_ms: Option<i64>,
}

/// A stream entry id `ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub id: StreamId,
    pub fields: Vec<(Bytes, Bytes)>,
}

/// Stream metadata that follows the entries in the RDB.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamMeta {
    pub length: u64,
    pub last_id: StreamId,
    /// RDB_TYPE_STREAM_LISTPACKS_2 and later.
    pub first_id: Option<StreamId>,
    pub max_deleted_id: Option<StreamId>,
    pub entries_added: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PendingEntry {
    pub id: StreamId,
    pub delivery_time_ms: i64,
    pub delivery_count: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamConsumer {
    pub name: Bytes,
    pub seen_time_ms: i64,
    /// RDB_TYPE_STREAM_LISTPACKS_3 and later.
    pub active_time_ms: Option<i64>,
    /// Ids of the group PEL entries this consumer owns.
    pub pending: Vec<StreamId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamGroup {
    pub name: Bytes,
    pub last_id: StreamId,
    /// RDB_TYPE_STREAM_LISTPACKS_2 and later.
    pub entries_read: Option<u64>,
    pub pending: Vec<PendingEntry>,
    pub consumers: Vec<StreamConsumer>,
}

/// A bounded piece of a key's value.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueChunk {
    /// A string value, or the next piece of one longer than `chunk_bytes`.
    String(Bytes),
    ListItems(Vec<Bytes>),
    SetMembers(Vec<Bytes>),
    ZSetEntries(Vec<(Bytes, f64)>),
    HashFields(Vec<HashField>),
    StreamEntries(Vec<StreamEntry>),
    /// Comes after all of the stream's entries.
    StreamMeta(StreamMeta),
    /// Comes after the stream's meta, one per consumer group.
    StreamGroup(StreamGroup),
    /// A module value, kept opaque: only the module id (64-bit, encodes the
    /// 9-character module name and encoding version) is decoded. Module keys
    /// are only ever moved with RESTORE, from [`RdbEvent::KeyEnd`]'s `raw`.
    Module {
        module_id: u64,
        name: String,
    },
}

/// One event of the RDB stream, in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum RdbEvent {
    /// The magic and version were read.
    Header {
        version: u32,
    },
    /// `RDB_OPCODE_AUX`.
    Aux {
        key: Bytes,
        value: Bytes,
    },
    /// `RDB_OPCODE_SELECTDB`.
    SelectDb(u32),
    /// `RDB_OPCODE_RESIZEDB`.
    ResizeDb {
        db_size: u64,
        expires_size: u64,
    },
    /// `RDB_OPCODE_SLOT_INFO` (Redis 7.4+ cluster dumps).
    SlotInfo {
        slot_id: u64,
        slot_size: u64,
        expires_slot_size: u64,
    },
    /// A function library (`RDB_OPCODE_FUNCTION2`, or the pre-GA
    /// `RDB_OPCODE_FUNCTION_PRE_GA` whose name/engine/description are dropped
    /// and whose code is kept). Loaded with `FUNCTION LOAD REPLACE code`.
    Function {
        code: Bytes,
    },
    /// `RDB_OPCODE_MODULE_AUX`, kept opaque.
    ModuleAux {
        module_id: u64,
        name: String,
    },
    KeyStart(KeyHeader),
    Chunk(ValueChunk),
    /// End of the current key. `raw` is `type byte ++ encoded value` when the
    /// encoded value fitted in [`ParseOptions::raw_capture_limit`].
    KeyEnd {
        raw: Option<Bytes>,
    },
    /// `RDB_OPCODE_EOF` and the checksum were read. `checksum` is the one in
    /// the file (None before RDB 5; Some(0) means the writer disabled it). It
    /// was verified unless it is 0 or verification was turned off.
    End {
        checksum: Option<u64>,
    },
}

/// Limits and switches of the parser. Every limit bounds an allocation.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Longest string (key, value, member, listpack blob) accepted.
    pub max_string_len: u64,
    /// Most elements in one emitted chunk.
    pub chunk_items: usize,
    /// Approximate most bytes of element data in one emitted chunk.
    pub chunk_bytes: usize,
    /// Longest raw value kept for `KeyEnd { raw }`; 0 disables capture.
    pub raw_capture_limit: usize,
    /// Verify the CRC64 trailer (RDB >= 5) when it is not 0.
    pub verify_checksum: bool,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            max_string_len: 512 * 1024 * 1024,
            chunk_items: 1024,
            chunk_bytes: 1024 * 1024,
            raw_capture_limit: 1024 * 1024,
            verify_checksum: true,
        }
    }
}

/// What went wrong where while reading an RDB stream.
#[derive(Debug, thiserror::Error)]
pub enum RdbError {
    #[error("i/o error at byte {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected end of RDB at byte {offset}: expected {expected}")]
    UnexpectedEof { offset: u64, expected: &'static str },
    #[error("not an RDB stream: bad magic {found:?} at byte 0")]
    BadMagic { found: String },
    #[error("unsupported RDB version {found:?} (this parser reads REDIS0001..REDIS{max:04})")]
    UnsupportedVersion { found: String, max: u32 },
    #[error("unknown RDB type or opcode {byte} (0x{byte:02x}) at byte {offset}")]
    UnknownType { byte: u8, offset: u64 },
    #[error("corrupt RDB at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    /// Well-formed input this parser deliberately does not read (e.g. module
    /// values of the Redis 4.0 release candidates, which Redis refuses too).
    #[error("unsupported RDB content at byte {offset}: {what}")]
    Unsupported { offset: u64, what: String },
    #[error("length {len} at byte {offset} exceeds the limit of {limit} for {what}")]
    TooLarge {
        offset: u64,
        len: u64,
        limit: u64,
        what: &'static str,
    },
    #[error(
        "RDB checksum mismatch: file says {expected:#018x}, content hashes to {computed:#018x}"
    )]
    ChecksumMismatch { expected: u64, computed: u64 },
}

/// The `DUMP`/`RESTORE` payload for a raw value (`type byte ++ value`, as in
/// [`RdbEvent::KeyEnd`]): the value, then the RDB version as 2 little-endian
/// bytes, then the CRC64 of everything before it as 8 little-endian bytes.
pub fn dump_payload(raw: &[u8], rdb_version: u16) -> Vec<u8> {
    let mut payload = Vec::with_capacity(raw.len() + 10);
    payload.extend_from_slice(raw);
    payload.extend_from_slice(&rdb_version.to_le_bytes());
    let crc = encoding::crc64::crc64(0, &payload);
    payload.extend_from_slice(&crc.to_le_bytes());
    payload
}
