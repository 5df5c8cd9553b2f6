//! RDB events → JSON lines, streamed.
//!
//! What flows in: [`RdbEvent`]s in file order. What flows out: one JSON
//! object per line on a `Write`, written as the events arrive — a key's
//! elements are written chunk by chunk, so a big key is never held whole.
//!
//! # Format
//!
//! One line per key, fields in this order (`value` last, since it streams):
//!
//! ```text
//! {"db":0,"key":K,"type":T,"encoding":E,"expire_ms":null|MS[,"lru_idle":S][,"lfu_freq":F],"value":V}
//! ```
//!
//! `type` is what `TYPE` answers (`string list set zset hash stream module`);
//! `encoding` names the RDB type byte (see [`encoding_name`]). `V` by type:
//!
//! - string: a string;
//! - list, set: an array of strings, in file order;
//! - zset: an array of `[member, score]`; a score is a JSON number, or the
//!   string `"inf"`, `"-inf"` or `"nan"`;
//! - hash: an array of `{"field":F,"value":V}`, plus `"expire_ms":MS` for a
//!   field with a TTL (an array, not an object, so that non-UTF-8 field
//!   names and field TTLs stay lossless);
//! - stream: `{"entries":[{"id":"ms-seq","fields":[[F,V],...]},...],
//!   "meta":{"length","last_id","first_id","max_deleted_id","entries_added"},
//!   "groups":[{"name","last_id","entries_read","pending":[{"id",
//!   "delivery_time_ms","delivery_count"}],"consumers":[{"name",
//!   "seen_time_ms","active_time_ms","pending":[ids]}]}]}` (absent optional
//!   fields are `null`);
//! - module: `{"module":NAME,"module_id":ID}` (the value itself is opaque).
//!
//! Every byte string (key, element, field, name) is a JSON string when it is
//! valid UTF-8, else `{"escaped":"…"}` where the text keeps printable ASCII
//! as is, writes a backslash as `\\` and every other byte as `\xHH` (two
//! lowercase hex digits): readable, and [`unescape_bytes`] gives back the
//! exact bytes.
//!
//! Lines that are not keys, each written unless [`DumpOptions`] turns it
//! off: `{"rdb_version":N}` (the header) and `{"aux":{"key":K,"value":V}}`,
//! `{"module_aux":{"module":NAME,"module_id":ID}}`,
//! `{"slot_info":{"slot_id","slot_size","expires_slot_size"}}` with `aux`;
//! `{"function":CODE}` with `functions`. `SELECTDB`, `RESIZEDB` and the
//! end-of-file marker write nothing (each key line carries its db).
//!
//! After a parse error the caller stops with [`JsonDumper::abort`]: every
//! line before it is whole JSON; a key line that was being written is ended
//! with a newline and is not valid JSON.

use std::io::Write;

use bytes::Bytes;

use super::{
    HashField, KeyHeader, PendingEntry, RdbEvent, StreamConsumer, StreamEntry, StreamGroup,
    StreamId, StreamMeta, ValueChunk, ValueType,
};

/// Which non-key lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpOptions {
    /// The header's RDB version, aux fields, module aux records, slot info.
    pub aux: bool,
    /// Function libraries.
    pub functions: bool,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            aux: true,
            functions: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("cannot write the JSON dump: {0}")]
    Io(#[from] std::io::Error),
    #[error("RDB events out of order: {what}")]
    Sequence { what: &'static str },
}

/// Where the open key's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// A string (or module) value: written whole by its chunk.
    Scalar { written: bool },
    /// A string value: its pieces (one, or several for a big one) are held
    /// in `JsonDumper::string` and written at the key's end, where the
    /// choice of a plain or an escaped JSON string sees the whole value.
    String,
    /// An array (list, set, zset, hash); `first` until an element is written.
    Array { first: bool },
    /// Inside a stream's `entries` array.
    StreamEntries { first: bool },
    /// After the stream's `meta`, before any group.
    StreamMeta,
    /// Inside a stream's `groups` array.
    StreamGroups,
}

/// Streaming JSON-lines writer of an RDB.
pub struct JsonDumper<W: Write> {
    out: W,
    opts: DumpOptions,
    open: Option<Open>,
    keys: u64,
    /// The pieces of the string value being read ([`Open::String`]).
    string: Vec<Bytes>,
}

impl<W: Write> JsonDumper<W> {
    pub fn new(out: W, opts: DumpOptions) -> JsonDumper<W> {
        JsonDumper {
            out,
            opts,
            open: None,
            keys: 0,
            string: Vec::new(),
        }
    }

    /// Key lines written so far.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// Writes what `event` contributes.
    pub fn feed(&mut self, event: &RdbEvent) -> Result<(), DumpError> {
        match event {
            RdbEvent::Header { version } if self.opts.aux => {
                writeln!(self.out, "{{\"rdb_version\":{version}}}")?;
            }
            RdbEvent::Aux { key, value } if self.opts.aux => {
                self.out.write_all(b"{\"aux\":{\"key\":")?;
                write_bytes(&mut self.out, key)?;
                self.out.write_all(b",\"value\":")?;
                write_bytes(&mut self.out, value)?;
                self.out.write_all(b"}}\n")?;
            }
            RdbEvent::ModuleAux { module_id, name } if self.opts.aux => {
                self.out.write_all(b"{\"module_aux\":{\"module\":")?;
                write_str(&mut self.out, name)?;
                writeln!(self.out, ",\"module_id\":{module_id}}}}}")?;
            }
            RdbEvent::SlotInfo {
                slot_id,
                slot_size,
                expires_slot_size,
            } if self.opts.aux => {
                writeln!(
                    self.out,
                    "{{\"slot_info\":{{\"slot_id\":{slot_id},\"slot_size\":{slot_size},\"expires_slot_size\":{expires_slot_size}}}}}"
                )?;
            }
            RdbEvent::Function { code } if self.opts.functions => {
                self.out.write_all(b"{\"function\":")?;
                write_bytes(&mut self.out, code)?;
                self.out.write_all(b"}\n")?;
            }
            RdbEvent::KeyStart(header) => self.key_start(header)?,
            RdbEvent::Chunk(chunk) => self.chunk(chunk)?,
            RdbEvent::KeyEnd { .. } => self.key_end()?,
            _ => {}
        }
        Ok(())
    }

    /// Flushes and returns the writer; fails when a key was left open.
    pub fn finish(mut self) -> Result<W, DumpError> {
        if self.open.is_some() {
            return Err(DumpError::Sequence {
                what: "stream ended inside a key",
            });
        }
        self.out.flush()?;
        Ok(self.out)
    }

    /// Stops after an error: ends a partly written key line with a newline
    /// (that line is not valid JSON), flushes, and returns the writer.
    pub fn abort(mut self) -> Result<W, DumpError> {
        if self.open.take().is_some() {
            self.out.write_all(b"\n")?;
        }
        self.out.flush()?;
        Ok(self.out)
    }

    fn key_start(&mut self, h: &KeyHeader) -> Result<(), DumpError> {
        if self.open.is_some() {
            return Err(DumpError::Sequence {
                what: "KeyStart before the previous key's KeyEnd",
            });
        }
        let out = &mut self.out;
        write!(out, "{{\"db\":{},\"key\":", h.db)?;
        write_bytes(out, &h.key)?;
        write!(
            out,
            ",\"type\":\"{}\",\"encoding\":\"{}\",\"expire_ms\":",
            h.value_type.as_str(),
            encoding_name(h.encoding)
        )?;
        match h.expire_ms {
            Some(ms) => write!(out, "{ms}")?,
            None => out.write_all(b"null")?,
        }
        if let Some(idle) = h.lru_idle {
            write!(out, ",\"lru_idle\":{idle}")?;
        }
        if let Some(freq) = h.lfu_freq {
            write!(out, ",\"lfu_freq\":{freq}")?;
        }
        out.write_all(b",\"value\":")?;
        self.open = Some(match h.value_type {
            ValueType::String => Open::String,
            ValueType::Module => Open::Scalar { written: false },
            ValueType::Stream => {
                out.write_all(b"{\"entries\":[")?;
                Open::StreamEntries { first: true }
            }
            ValueType::List | ValueType::Set | ValueType::ZSet | ValueType::Hash => {
                out.write_all(b"[")?;
                Open::Array { first: true }
            }
        });
        Ok(())
    }

    fn chunk(&mut self, chunk: &ValueChunk) -> Result<(), DumpError> {
        let open = self.open.ok_or(DumpError::Sequence {
            what: "value chunk outside a key",
        })?;
        let out = &mut self.out;
        let mismatch = DumpError::Sequence {
            what: "value chunk does not match the key's type",
        };
        let next = match (open, chunk) {
            (Open::String, ValueChunk::String(s)) => {
                self.string.push(s.clone());
                Open::String
            }
            (Open::Scalar { written: false }, ValueChunk::Module { module_id, name }) => {
                out.write_all(b"{\"module\":")?;
                write_str(out, name)?;
                write!(out, ",\"module_id\":{module_id}}}")?;
                Open::Scalar { written: true }
            }
            (Open::Array { mut first }, ValueChunk::ListItems(items))
            | (Open::Array { mut first }, ValueChunk::SetMembers(items)) => {
                for item in items {
                    comma(out, &mut first)?;
                    write_bytes(out, item)?;
                }
                Open::Array { first }
            }
            (Open::Array { mut first }, ValueChunk::ZSetEntries(entries)) => {
                for (member, score) in entries {
                    comma(out, &mut first)?;
                    out.write_all(b"[")?;
                    write_bytes(out, member)?;
                    out.write_all(b",")?;
                    write_score(out, *score)?;
                    out.write_all(b"]")?;
                }
                Open::Array { first }
            }
            (Open::Array { mut first }, ValueChunk::HashFields(fields)) => {
                for field in fields {
                    comma(out, &mut first)?;
                    write_hash_field(out, field)?;
                }
                Open::Array { first }
            }
            (Open::StreamEntries { mut first }, ValueChunk::StreamEntries(entries)) => {
                for entry in entries {
                    comma(out, &mut first)?;
                    write_stream_entry(out, entry)?;
                }
                Open::StreamEntries { first }
            }
            (Open::StreamEntries { .. }, ValueChunk::StreamMeta(meta)) => {
                out.write_all(b"],\"meta\":")?;
                write_stream_meta(out, meta)?;
                Open::StreamMeta
            }
            (Open::StreamEntries { .. }, ValueChunk::StreamGroup(group)) => {
                out.write_all(b"],\"meta\":null,\"groups\":[")?;
                write_stream_group(out, group)?;
                Open::StreamGroups
            }
            (Open::StreamMeta, ValueChunk::StreamGroup(group)) => {
                out.write_all(b",\"groups\":[")?;
                write_stream_group(out, group)?;
                Open::StreamGroups
            }
            (Open::StreamGroups, ValueChunk::StreamGroup(group)) => {
                out.write_all(b",")?;
                write_stream_group(out, group)?;
                Open::StreamGroups
            }
            _ => return Err(mismatch),
        };
        self.open = Some(next);
        Ok(())
    }

    fn key_end(&mut self) -> Result<(), DumpError> {
        let open = self.open.take().ok_or(DumpError::Sequence {
            what: "KeyEnd without KeyStart",
        })?;
        let tail: &[u8] = match open {
            Open::String => {
                let pieces = std::mem::take(&mut self.string);
                match pieces.as_slice() {
                    [] => b"null}\n",
                    [whole] => {
                        write_bytes(&mut self.out, whole)?;
                        b"}\n"
                    }
                    _ => {
                        write_bytes(&mut self.out, &pieces.concat())?;
                        b"}\n"
                    }
                }
            }
            Open::Scalar { written: true } => b"}\n",
            Open::Scalar { written: false } => b"null}\n",
            Open::Array { .. } => b"]}\n",
            Open::StreamEntries { .. } => b"],\"meta\":null,\"groups\":[]}}\n",
            Open::StreamMeta => b",\"groups\":[]}}\n",
            Open::StreamGroups => b"]}}\n",
        };
        self.out.write_all(tail)?;
        self.keys += 1;
        Ok(())
    }
}

/// The name of an RDB type byte as written in `"encoding"`.
pub fn encoding_name(type_byte: u8) -> &'static str {
    match type_byte {
        0 => "string",
        1 => "linkedlist",
        2 | 4 => "hashtable",
        3 | 5 => "skiplist",
        6 | 7 => "module",
        9 => "zipmap",
        10 | 12 | 13 => "ziplist",
        11 => "intset",
        14 => "quicklist",
        15 | 19 | 21 | 26 => "stream",
        16 | 17 | 20 => "listpack",
        18 => "quicklist2",
        22 | 24 => "hashtable-ex",
        23 | 25 => "listpack-ex",
        _ => "unknown",
    }
}

/// The readable, lossless text of bytes that are not UTF-8 (see the module
/// docs): printable ASCII kept, `\` as `\\`, other bytes as `\xHH`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() + bytes.len() / 2);
    for &byte in bytes {
        match byte {
            b'\\' => text.push_str("\\\\"),
            0x20..=0x7e => text.push(char::from(byte)),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                text.push_str("\\x");
                text.push(char::from(HEX[usize::from(byte >> 4)]));
                text.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
        }
    }
    text
}

/// Why an escaped text is not one [`escape_bytes`] writes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad escaped text at character {at}: {what}")]
pub struct UnescapeError {
    pub at: usize,
    pub what: &'static str,
}

/// The inverse of [`escape_bytes`].
pub fn unescape_bytes(text: &str) -> Result<Vec<u8>, UnescapeError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => match bytes.get(i + 1) {
                Some(b'\\') => {
                    out.push(b'\\');
                    i += 2;
                }
                Some(b'x') => {
                    let hex = |at: usize| {
                        bytes
                            .get(at)
                            .and_then(|&c| char::from(c).to_digit(16))
                            .ok_or(UnescapeError {
                                at,
                                what: "expected a hex digit",
                            })
                    };
                    let value = hex(i + 2)? * 16 + hex(i + 3)?;
                    out.push(value as u8);
                    i += 4;
                }
                _ => {
                    return Err(UnescapeError {
                        at: i,
                        what: "backslash not followed by \\ or x",
                    })
                }
            },
            c @ 0x20..=0x7e => {
                out.push(c);
                i += 1;
            }
            _ => {
                return Err(UnescapeError {
                    at: i,
                    what: "not printable ASCII",
                })
            }
        }
    }
    Ok(out)
}

/// Bytes as a JSON string, or `{"escaped":…}` when they are not UTF-8.
pub fn write_bytes<W: Write>(out: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    match std::str::from_utf8(bytes) {
        Ok(text) => write_str(out, text),
        Err(_) => {
            out.write_all(b"{\"escaped\":")?;
            write_str(out, &escape_bytes(bytes))?;
            out.write_all(b"}")
        }
    }
}

fn write_str<W: Write>(out: &mut W, text: &str) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, text).map_err(std::io::Error::from)
}

fn comma<W: Write>(out: &mut W, first: &mut bool) -> std::io::Result<()> {
    if *first {
        *first = false;
        Ok(())
    } else {
        out.write_all(b",")
    }
}

fn write_score<W: Write>(out: &mut W, score: f64) -> std::io::Result<()> {
    if score.is_nan() {
        out.write_all(b"\"nan\"")
    } else if score == f64::INFINITY {
        out.write_all(b"\"inf\"")
    } else if score == f64::NEG_INFINITY {
        out.write_all(b"\"-inf\"")
    } else {
        serde_json::to_writer(&mut *out, &score).map_err(std::io::Error::from)
    }
}

fn write_opt<W: Write, T: std::fmt::Display>(out: &mut W, v: Option<T>) -> std::io::Result<()> {
    match v {
        Some(v) => write!(out, "{v}"),
        None => out.write_all(b"null"),
    }
}

fn write_id<W: Write>(out: &mut W, id: StreamId) -> std::io::Result<()> {
    write!(out, "\"{id}\"")
}

fn write_opt_id<W: Write>(out: &mut W, id: Option<StreamId>) -> std::io::Result<()> {
    match id {
        Some(id) => write_id(out, id),
        None => out.write_all(b"null"),
    }
}

fn write_hash_field<W: Write>(out: &mut W, field: &HashField) -> std::io::Result<()> {
    out.write_all(b"{\"field\":")?;
    write_bytes(out, &field.field)?;
    out.write_all(b",\"value\":")?;
    write_bytes(out, &field.value)?;
    if let Some(ms) = field.expire_ms {
        write!(out, ",\"expire_ms\":{ms}")?;
    }
    out.write_all(b"}")
}

fn write_stream_entry<W: Write>(out: &mut W, entry: &StreamEntry) -> std::io::Result<()> {
    out.write_all(b"{\"id\":")?;
    write_id(out, entry.id)?;
    out.write_all(b",\"fields\":[")?;
    let mut first = true;
    for (field, value) in &entry.fields {
        comma(out, &mut first)?;
        out.write_all(b"[")?;
        write_bytes(out, field)?;
        out.write_all(b",")?;
        write_bytes(out, value)?;
        out.write_all(b"]")?;
    }
    out.write_all(b"]}")
}

fn write_stream_meta<W: Write>(out: &mut W, meta: &StreamMeta) -> std::io::Result<()> {
    write!(out, "{{\"length\":{},\"last_id\":", meta.length)?;
    write_id(out, meta.last_id)?;
    out.write_all(b",\"first_id\":")?;
    write_opt_id(out, meta.first_id)?;
    out.write_all(b",\"max_deleted_id\":")?;
    write_opt_id(out, meta.max_deleted_id)?;
    out.write_all(b",\"entries_added\":")?;
    write_opt(out, meta.entries_added)?;
    out.write_all(b"}")
}

fn write_stream_group<W: Write>(out: &mut W, group: &StreamGroup) -> std::io::Result<()> {
    out.write_all(b"{\"name\":")?;
    write_bytes(out, &group.name)?;
    out.write_all(b",\"last_id\":")?;
    write_id(out, group.last_id)?;
    out.write_all(b",\"entries_read\":")?;
    // The RDB stores "unknown" as the u64 of -1.
    write_opt(
        out,
        group.entries_read.map(|n| i64::try_from(n).unwrap_or(-1)),
    )?;
    out.write_all(b",\"pending\":[")?;
    let mut first = true;
    for PendingEntry {
        id,
        delivery_time_ms,
        delivery_count,
    } in &group.pending
    {
        comma(out, &mut first)?;
        out.write_all(b"{\"id\":")?;
        write_id(out, *id)?;
        write!(
            out,
            ",\"delivery_time_ms\":{delivery_time_ms},\"delivery_count\":{delivery_count}}}"
        )?;
    }
    out.write_all(b"],\"consumers\":[")?;
    let mut first = true;
    for StreamConsumer {
        name,
        seen_time_ms,
        active_time_ms,
        pending,
    } in &group.consumers
    {
        comma(out, &mut first)?;
        out.write_all(b"{\"name\":")?;
        write_bytes(out, name)?;
        write!(out, ",\"seen_time_ms\":{seen_time_ms},\"active_time_ms\":")?;
        write_opt(out, *active_time_ms)?;
        out.write_all(b",\"pending\":[")?;
        let mut first_id = true;
        for id in pending {
            comma(out, &mut first_id)?;
            write_id(out, *id)?;
        }
        out.write_all(b"]}")?;
    }
    out.write_all(b"]}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn header(key: &[u8], value_type: ValueType, encoding: u8) -> KeyHeader {
        KeyHeader {
            db: 0,
            key: Bytes::copy_from_slice(key),
            value_type,
            encoding,
            expire_ms: None,
            lru_idle: None,
            lfu_freq: None,
        }
    }

    fn dump(events: &[RdbEvent], opts: DumpOptions) -> String {
        let mut d = JsonDumper::new(Vec::new(), opts);
        for e in events {
            d.feed(e).unwrap();
        }
        String::from_utf8(d.finish().unwrap()).unwrap()
    }

    fn key(h: KeyHeader, chunks: Vec<ValueChunk>) -> Vec<RdbEvent> {
        let mut v = vec![RdbEvent::KeyStart(h)];
        v.extend(chunks.into_iter().map(RdbEvent::Chunk));
        v.push(RdbEvent::KeyEnd { raw: None });
        v
    }

    /// Every line must be valid JSON.
    fn check_json(text: &str) {
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    #[test]
    fn a_string_in_pieces_is_written_whole() {
        // The split cuts a two-byte character: each piece alone is not
        // UTF-8, the value is.
        let pieces = vec![
            ValueChunk::String(Bytes::from_static(b"ab\xc3")),
            ValueChunk::String(Bytes::from_static(b"\xa9cd")),
        ];
        let text = dump(
            &key(header(b"k", ValueType::String, 0), pieces),
            DumpOptions::default(),
        );
        check_json(&text);
        assert!(text.contains("\"value\":\"abécd\""), "{text}");
    }

    #[test]
    fn each_type() {
        let mut events = vec![
            RdbEvent::Header { version: 11 },
            RdbEvent::Aux {
                key: b("redis-ver"),
                value: b("7.2.0"),
            },
            RdbEvent::Function {
                code: b("#!lua name=f\n"),
            },
            RdbEvent::SelectDb(0),
        ];
        let mut h = header(b"s", ValueType::String, 0);
        h.expire_ms = Some(1234);
        h.lfu_freq = Some(5);
        events.extend(key(h, vec![ValueChunk::String(b("v"))]));
        events.extend(key(
            header(b"l", ValueType::List, 18),
            vec![
                ValueChunk::ListItems(vec![b("a"), b("b")]),
                ValueChunk::ListItems(vec![b("c")]),
            ],
        ));
        events.extend(key(
            header(b"z", ValueType::ZSet, 17),
            vec![ValueChunk::ZSetEntries(vec![
                (b("m"), 1.5),
                (b("n"), f64::INFINITY),
                (b("o"), -0.0),
            ])],
        ));
        events.extend(key(
            header(b"h", ValueType::Hash, 25),
            vec![ValueChunk::HashFields(vec![
                HashField {
                    field: b("f"),
                    value: b("v"),
                    expire_ms: Some(99),
                },
                HashField {
                    field: b("g"),
                    value: b("w"),
                    expire_ms: None,
                },
            ])],
        ));
        events.extend(key(header(b"e", ValueType::Set, 2), vec![]));
        events.extend(key(
            header(b"m", ValueType::Module, 7),
            vec![ValueChunk::Module {
                module_id: 7,
                name: "ReJSON-RL".into(),
            }],
        ));
        let text = dump(&events, DumpOptions::default());
        check_json(&text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                r#"{"rdb_version":11}"#,
                r#"{"aux":{"key":"redis-ver","value":"7.2.0"}}"#,
                r##"{"function":"#!lua name=f\n"}"##,
                r#"{"db":0,"key":"s","type":"string","encoding":"string","expire_ms":1234,"lfu_freq":5,"value":"v"}"#,
                r#"{"db":0,"key":"l","type":"list","encoding":"quicklist2","expire_ms":null,"value":["a","b","c"]}"#,
                r#"{"db":0,"key":"z","type":"zset","encoding":"listpack","expire_ms":null,"value":[["m",1.5],["n","inf"],["o",-0.0]]}"#,
                r#"{"db":0,"key":"h","type":"hash","encoding":"listpack-ex","expire_ms":null,"value":[{"field":"f","value":"v","expire_ms":99},{"field":"g","value":"w"}]}"#,
                r#"{"db":0,"key":"e","type":"set","encoding":"hashtable","expire_ms":null,"value":[]}"#,
                r#"{"db":0,"key":"m","type":"module","encoding":"module","expire_ms":null,"value":{"module":"ReJSON-RL","module_id":7}}"#,
            ]
        );
        let quiet = dump(
            &events,
            DumpOptions {
                aux: false,
                functions: false,
            },
        );
        assert_eq!(quiet.lines().count(), 6);
        assert!(quiet.starts_with(r#"{"db":0,"key":"s""#));
    }

    #[test]
    fn stream_value() {
        let id = |ms, seq| StreamId { ms, seq };
        let events = key(
            header(b"st", ValueType::Stream, 21),
            vec![
                ValueChunk::StreamEntries(vec![StreamEntry {
                    id: id(1, 0),
                    fields: vec![(b("f"), b("v"))],
                }]),
                ValueChunk::StreamEntries(vec![StreamEntry {
                    id: id(2, 5),
                    fields: vec![(b("f"), b("w")), (b("g"), b("x"))],
                }]),
                ValueChunk::StreamMeta(StreamMeta {
                    length: 2,
                    last_id: id(2, 5),
                    first_id: Some(id(1, 0)),
                    max_deleted_id: None,
                    entries_added: Some(2),
                }),
                ValueChunk::StreamGroup(StreamGroup {
                    name: b("g"),
                    last_id: id(1, 0),
                    entries_read: Some(u64::MAX),
                    pending: vec![PendingEntry {
                        id: id(1, 0),
                        delivery_time_ms: 10,
                        delivery_count: 1,
                    }],
                    consumers: vec![StreamConsumer {
                        name: b("c"),
                        seen_time_ms: 11,
                        active_time_ms: None,
                        pending: vec![id(1, 0)],
                    }],
                }),
                ValueChunk::StreamGroup(StreamGroup {
                    name: b("g2"),
                    last_id: id(0, 0),
                    entries_read: None,
                    pending: vec![],
                    consumers: vec![],
                }),
            ],
        );
        let text = dump(&events, DumpOptions::default());
        check_json(&text);
        assert_eq!(
            text.trim_end(),
            concat!(
                r#"{"db":0,"key":"st","type":"stream","encoding":"stream","expire_ms":null,"value":{"#,
                r#""entries":[{"id":"1-0","fields":[["f","v"]]},{"id":"2-5","fields":[["f","w"],["g","x"]]}],"#,
                r#""meta":{"length":2,"last_id":"2-5","first_id":"1-0","max_deleted_id":null,"entries_added":2},"#,
                r#""groups":[{"name":"g","last_id":"1-0","entries_read":-1,"pending":[{"id":"1-0","delivery_time_ms":10,"delivery_count":1}],"#,
                r#""consumers":[{"name":"c","seen_time_ms":11,"active_time_ms":null,"pending":["1-0"]}]},"#,
                r#"{"name":"g2","last_id":"0-0","entries_read":null,"pending":[],"consumers":[]}]}}"#
            )
        );
        // A stream with no meta and no groups still closes into valid JSON.
        let text = dump(
            &key(header(b"st", ValueType::Stream, 15), vec![]),
            DumpOptions::default(),
        );
        check_json(&text);
    }

    #[test]
    fn non_utf8_is_escaped() {
        let events = key(
            header(b"k\xff", ValueType::String, 0),
            vec![ValueChunk::String(Bytes::from_static(
                b"a\\b\x00\x7f\xff\"",
            ))],
        );
        let text = dump(&events, DumpOptions::default());
        check_json(&text);
        assert_eq!(
            text.trim_end(),
            r#"{"db":0,"key":{"escaped":"k\\xff"},"type":"string","encoding":"string","expire_ms":null,"value":{"escaped":"a\\\\b\\x00\\x7f\\xff\""}}"#
        );
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        let escaped = v["value"]["escaped"].as_str().unwrap();
        assert_eq!(escaped, "a\\\\b\\x00\\x7f\\xff\"");
        assert_eq!(unescape_bytes(escaped).unwrap(), b"a\\b\x00\x7f\xff\"");
        // Valid UTF-8 stays a plain string.
        let mut out = Vec::new();
        write_bytes(&mut out, "é\n".as_bytes()).unwrap();
        assert_eq!(out, b"\"\xc3\xa9\\n\"");
    }

    #[test]
    fn unescape_rejects_garbage() {
        assert!(unescape_bytes("\\q").is_err());
        assert!(unescape_bytes("\\x4").is_err());
        assert!(unescape_bytes("\\xzz").is_err());
        assert!(unescape_bytes("é").is_err());
    }

    #[test]
    fn sequence_errors() {
        let mut d = JsonDumper::new(Vec::new(), DumpOptions::default());
        assert!(d.feed(&RdbEvent::KeyEnd { raw: None }).is_err());
        assert!(d
            .feed(&RdbEvent::Chunk(ValueChunk::String(b("x"))))
            .is_err());
        d.feed(&RdbEvent::KeyStart(header(b"l", ValueType::List, 18)))
            .unwrap();
        assert!(d
            .feed(&RdbEvent::Chunk(ValueChunk::String(b("x"))))
            .is_err());
        assert!(d
            .feed(&RdbEvent::KeyStart(header(b"l", ValueType::List, 18)))
            .is_err());
        assert!(d.finish().is_err());
    }

    proptest! {
        #[test]
        fn escaping_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let text = escape_bytes(&bytes);
            prop_assert!(text.bytes().all(|c| (0x20..=0x7e).contains(&c)));
            prop_assert_eq!(unescape_bytes(&text).unwrap(), bytes.clone());
            // And through JSON.
            let mut out = Vec::new();
            write_bytes(&mut out, &bytes).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let back = match &v {
                serde_json::Value::String(s) => s.as_bytes().to_vec(),
                other => unescape_bytes(other["escaped"].as_str().unwrap()).unwrap(),
            };
            prop_assert_eq!(back, bytes);
        }
    }
}
