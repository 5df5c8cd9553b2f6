//! RDB events → Redis commands that recreate the data set on a target server.
//!
//! What flows in: [`RdbEvent`]s, one at a time, in file order (from
//! [`super::RdbParser`]). What flows out: [`Output`]s — commands tagged with
//! the db they apply to, db-less commands (`FUNCTION LOAD`), and warnings for
//! data the target cannot hold — pushed to a caller's `Vec` or callback, plus
//! running [`RebuildStats`].
//!
//! # How a key travels
//!
//! - Already expired (`expire_ms <= now_ms`): not brought back.
//! - Empty collection (no element survives): skipped, as Redis skips them on
//!   load. Streams are the exception: an empty stream is a real key.
//! - `RESTORE key ttl payload [REPLACE] [ABSTTL]` when the raw value
//!   ([`RdbEvent::KeyEnd`]'s `raw`) is at most `restore_max_bytes` long and
//!   its RDB type byte exists at the target's RDB version (see
//!   [`min_rdb_version_for_type`]). The payload is
//!   [`dump_payload`]`(raw, target RDB version)`: within one type byte the
//!   encoding never changed, so the payload is tagged with the highest
//!   version the target accepts.
//! - Otherwise rebuild commands, chunked to at most `chunk_items` elements /
//!   about `chunk_bytes` bytes of data per command: `SET` (a string the
//!   parser emits in several pieces: `SET` of the first, `APPEND` of each
//!   other, then `PEXPIREAT`); `RPUSH`; `SADD`;
//!   `ZADD`; `HSET` (`HMSET` before 4.0) then `HPEXPIREAT … FIELDS` for field
//!   TTLs on 7.4+; streams as `XADD` per entry, `XSETID` (with
//!   `ENTRIESADDED`/`MAXDELETEDID` on 7.0+), `XGROUP CREATE` (with
//!   `ENTRIESREAD` on 7.0+), `XGROUP CREATECONSUMER` (6.2+) and
//!   `XCLAIM … FORCE JUSTID` per pending entry; an empty stream is created
//!   with `XGROUP CREATE … MKSTREAM` + `XGROUP DESTROY` of a scratch group so
//!   that `max-deleted-entry-id` is not disturbed. Then `PEXPIREAT` when the
//!   key has an expiry. With `replace`, the first command is `DEL key`.
//! - Module values only ever go by `RESTORE`; when that is impossible a
//!   warning names the key.
//!
//! # Memory bound
//!
//! While a key could still go by `RESTORE`, its rebuild commands are
//! buffered, up to `restore_max_bytes` bytes of argument data. Past that the
//! key can no longer be restored: the buffer is flushed and the rest of the
//! key streams out as it is parsed. A key that cannot be restored streams
//! from its first element. So at most `restore_max_bytes + chunk_bytes`
//! bytes of one key are held here, whatever its size.
//!
//! # Target capabilities
//!
//! [`TargetCaps`] is the target's Redis version and the highest RDB version
//! its `RESTORE` accepts. Redis version → RDB version:
//!
//! | Redis          | RDB |
//! |----------------|-----|
//! | 2.6, 2.8, 3.0  | 6   |
//! | 3.2            | 7   |
//! | 4.0            | 8   |
//! | 5.0, 6.0, 6.2  | 9   |
//! | 7.0            | 10  |
//! | 7.2            | 11  |
//! | 7.4, 8.0 – 8.4 | 12  |
//! | 8.6 and later  | 13  |
//!
//! Features by target version: `RESTORE … ABSTTL` 5.0 (older targets get a
//! relative TTL computed against `now_ms`), `RESTORE … REPLACE` 3.0, streams
//! 5.0, `XGROUP CREATECONSUMER` 6.2, stream 7.0 metadata and functions 7.0,
//! hash field TTLs 7.4. What the target lacks is reported as a warning.
//!
//! Not carried (by design, not reported): aux fields (including pre-7.0 Lua
//! script backups, which Redis 7 ignores too), LRU/LFU hints, consumer
//! seen/active times (`XCLAIM` sets them to the load time). Known gap: a
//! pending entry whose message was deleted from the stream cannot be
//! recreated by `XCLAIM` and is dropped by the target without a warning.

use std::collections::HashMap;

use bytes::Bytes;

use super::{
    dump_payload, HashField, KeyHeader, RdbEvent, StreamEntry, StreamGroup, StreamId, StreamMeta,
    ValueChunk, ValueType,
};
use crate::redis::command::Command;

/// Name of the consumer group used to create an empty stream; it is
/// destroyed right after.
const SCRATCH_GROUP: &str = "__ferry_empty_stream__";

/// The lowest RDB version in which RDB type byte `type_byte` exists, or
/// `None` for bytes no target can `RESTORE` (the pre-GA module type 6, and
/// unknown bytes).
///
/// | type byte                                   | min RDB | Redis |
/// |---------------------------------------------|---------|-------|
/// | 0-4 string, list, set, zset, hash           | 1       |       |
/// | 9-12 zipmap, list ziplist, intset, zset zl  | 2       | 2.2   |
/// | 13 hash ziplist                             | 4       | 2.6   |
/// | 5 zset2, 7 module2                          | 8       | 4.0   |
/// | 14 list quicklist                           | 7       | 3.2   |
/// | 15 stream listpacks                         | 9       | 5.0   |
/// | 16-19 hash/zset listpack, quicklist2, stream listpacks 2 | 10 | 7.0 |
/// | 20 set listpack, 21 stream listpacks 3      | 11      | 7.2   |
/// | 22-25 hash with field TTLs (pre-GA and GA)  | 12      | 7.4   |
/// | 26 stream listpacks 4                       | 13      | 8.6   |
pub fn min_rdb_version_for_type(type_byte: u8) -> Option<u16> {
    match type_byte {
        0..=4 => Some(1),
        9..=12 => Some(2),
        13 => Some(4),
        14 => Some(7),
        5 | 7 => Some(8),
        15 => Some(9),
        16..=19 => Some(10),
        20 | 21 => Some(11),
        22..=25 => Some(12),
        26 => Some(13),
        _ => None,
    }
}

/// What the target server can accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetCaps {
    /// `major.minor.patch` of the target's `redis_version`.
    pub version: (u32, u32, u32),
    /// Highest RDB version its `RESTORE` accepts (table in the module docs).
    pub rdb_version: u16,
}

impl TargetCaps {
    /// Caps of a Redis `major.minor.patch`; `None` before 2.6 (no
    /// `PEXPIREAT`, no `RESTORE`).
    pub fn for_version(major: u32, minor: u32, patch: u32) -> Option<TargetCaps> {
        let rdb_version = match (major, minor) {
            (0..=1, _) | (2, 0..=5) => return None,
            (2, _) | (3, 0..=1) => 6,
            (3, _) => 7,
            (4, _) => 8,
            (5..=6, _) => 9,
            (7, 0..=1) => 10,
            (7, 2..=3) => 11,
            (7, _) | (8, 0..=5) => 12,
            _ => 13,
        };
        Some(TargetCaps {
            version: (major, minor, patch),
            rdb_version,
        })
    }

    /// Parses a `redis_version` string such as `7.0.15`.
    pub fn from_version_str(text: &str) -> Result<TargetCaps, RebuildError> {
        let bad = |why: &str| RebuildError::TargetVersion {
            found: text.to_string(),
            why: why.to_string(),
        };
        let mut parts = text.trim().split('.');
        let mut next = |name: &str, required: bool| -> Result<u32, RebuildError> {
            match parts.next() {
                Some(p) => p
                    .parse::<u32>()
                    .map_err(|_| bad(&format!("{name} is not a number"))),
                None if required => Err(bad(&format!("no {name} version"))),
                None => Ok(0),
            }
        };
        let major = next("major", true)?;
        let minor = next("minor", true)?;
        let patch = next("patch", false)?;
        TargetCaps::for_version(major, minor, patch)
            .ok_or_else(|| bad("targets older than Redis 2.6 are not supported"))
    }

    /// From the fields of `INFO server` (its `redis_version`).
    pub fn from_info(info: &HashMap<String, String>) -> Result<TargetCaps, RebuildError> {
        match info.get("redis_version") {
            Some(v) => TargetCaps::from_version_str(v),
            None => Err(RebuildError::TargetVersion {
                found: String::new(),
                why: "INFO server has no redis_version field".to_string(),
            }),
        }
    }

    /// True when the target is at least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.version.0, self.version.1) >= (major, minor)
    }

    /// True when the target's `RESTORE` knows RDB type byte `type_byte`.
    pub fn can_restore_type(&self, type_byte: u8) -> bool {
        min_rdb_version_for_type(type_byte).is_some_and(|min| min <= self.rdb_version)
    }

    fn version_string(&self) -> String {
        format!("{}.{}.{}", self.version.0, self.version.1, self.version.2)
    }
}

/// How keys are turned into commands.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    pub target: TargetCaps,
    /// Longest raw value sent with `RESTORE`; 0 disables `RESTORE`. Also the
    /// most bytes of a key's rebuild commands buffered while deciding.
    pub restore_max_bytes: usize,
    /// Most elements in one rebuild command (at least 1).
    pub chunk_items: usize,
    /// Approximate most bytes of element data in one rebuild command.
    pub chunk_bytes: usize,
    /// `RESTORE … REPLACE`, and `DEL key` before a rebuild.
    pub replace: bool,
    /// "Now" in unix milliseconds: keys expiring at or before it are skipped.
    pub now_ms: i64,
    /// String keys go as one `SET key value [PXAT ms]` instead of
    /// `RESTORE`: the same effect (`SET` replaces any value and TTL, like
    /// `RESTORE … REPLACE`), cheaper for the target (~1.6 vs 1.9 µs per
    /// 100-byte key) and for ferry (no dump payload, no CRC64). Targets
    /// before 6.2 (no `PXAT`) get `PEXPIREAT` after the `SET`.
    pub strings_by_set: bool,
}

impl RebuildOptions {
    /// Defaults for `target`: 1 MiB `RESTORE` limit, 1000 items / 1 MiB per
    /// command, no replace, now = the system clock.
    pub fn new(target: TargetCaps) -> RebuildOptions {
        RebuildOptions {
            target,
            restore_max_bytes: 1024 * 1024,
            chunk_items: 1000,
            chunk_bytes: 1024 * 1024,
            replace: false,
            now_ms: unix_now_ms(),
            strings_by_set: false,
        }
    }
}

/// The current system time in unix milliseconds.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One thing to do (or to tell) on the target.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A command to run with `db` selected.
    Command { db: u32, cmd: Command },
    /// A command that does not depend on the selected db (`FUNCTION LOAD`).
    Global { cmd: Command },
    /// Data the target cannot hold. `key` is None for things that are not
    /// keys (functions, module aux data).
    Warning {
        db: u32,
        key: Option<Bytes>,
        what: String,
    },
}

/// Running totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildStats {
    pub keys_restored: u64,
    pub keys_rebuilt: u64,
    /// Commands emitted (including `RESTORE`, `DEL`, `PEXPIREAT`).
    pub commands: u64,
    pub expired_skipped: u64,
    pub empty_skipped: u64,
    /// Keys not written at all because the target cannot hold them.
    pub unsupported_skipped: u64,
    pub functions: u64,
    pub warnings: u64,
}

impl RebuildStats {
    /// Keys written to the target.
    pub fn keys_loaded(&self) -> u64 {
        self.keys_restored + self.keys_rebuilt
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RebuildError {
    #[error("RDB events out of order: {what}")]
    Sequence { what: &'static str },
    #[error("cannot use target version {found:?}: {why}")]
    TargetVersion { found: String, why: String },
}

/// How the current key is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Nothing is written (expired, or the target cannot hold the type).
    Skip,
    /// Commands are generated; `RESTORE` may still win at `KeyEnd`.
    Rebuild,
    /// Only `RESTORE` is possible (module values).
    RestoreOnly,
}

/// The rebuild command being filled with elements.
struct PendingCommand {
    args: Vec<Bytes>,
    items: usize,
    bytes: usize,
}

struct KeyState {
    header: KeyHeader,
    plan: Plan,
    /// Commands go straight out (RESTORE is no longer possible).
    streaming: bool,
    buffer: Vec<Command>,
    buffered_bytes: usize,
    /// A rebuild command was produced (so `DEL` was placed first).
    started: bool,
    /// Some command of this key already left through the sink.
    emitted: bool,
    /// Elements that will exist on the target (fields, members, entries).
    items: u64,
    /// The stream's meta was seen: the stream exists even with no entries.
    stream_exists: bool,
    pending: Option<PendingCommand>,
    /// The value of a string key sent by `SET` at its end.
    set_value: Option<Bytes>,
    /// Field TTLs of the fields in `pending`, `(expire_ms, field)`.
    field_ttls: Vec<(i64, Bytes)>,
    dropped_field_ttls: u64,
    /// Warnings about the rebuild, emitted if the key is rebuilt.
    warnings: Vec<String>,
}

/// The borrowed pieces every emitting function needs.
struct Ctx<'a> {
    opts: &'a RebuildOptions,
    stats: &'a mut RebuildStats,
    sink: &'a mut dyn FnMut(Output),
}

impl Ctx<'_> {
    fn command(&mut self, db: u32, cmd: Command) {
        self.stats.commands += 1;
        (self.sink)(Output::Command { db, cmd });
    }

    fn warning(&mut self, db: u32, key: Option<Bytes>, what: String) {
        self.stats.warnings += 1;
        (self.sink)(Output::Warning { db, key, what });
    }
}

/// The state machine: feed it every event of an RDB stream in order.
pub struct Rebuilder {
    opts: RebuildOptions,
    db: u32,
    key: Option<KeyState>,
    stats: RebuildStats,
}

impl Rebuilder {
    pub fn new(mut opts: RebuildOptions) -> Rebuilder {
        opts.chunk_items = opts.chunk_items.max(1);
        opts.chunk_bytes = opts.chunk_bytes.max(1);
        Rebuilder {
            opts,
            db: 0,
            key: None,
            stats: RebuildStats::default(),
        }
    }

    pub fn options(&self) -> &RebuildOptions {
        &self.opts
    }

    pub fn stats(&self) -> &RebuildStats {
        &self.stats
    }

    /// The key being processed when some of its commands already went out:
    /// after a parse error, this key is partially written on the target.
    pub fn partial_key(&self) -> Option<(u32, &Bytes)> {
        self.key
            .as_ref()
            .filter(|k| k.emitted)
            .map(|k| (k.header.db, &k.header.key))
    }

    /// Feeds one event, appending what it produces to `out`.
    pub fn feed(&mut self, event: RdbEvent, out: &mut Vec<Output>) -> Result<(), RebuildError> {
        self.feed_with(event, &mut |o| out.push(o))
    }

    /// Feeds one event, handing what it produces to `sink`.
    pub fn feed_with(
        &mut self,
        event: RdbEvent,
        sink: &mut dyn FnMut(Output),
    ) -> Result<(), RebuildError> {
        let mut ctx = Ctx {
            opts: &self.opts,
            stats: &mut self.stats,
            sink,
        };
        match event {
            RdbEvent::SelectDb(db) => {
                if self.key.is_some() {
                    return Err(RebuildError::Sequence {
                        what: "SELECTDB inside a key",
                    });
                }
                self.db = db;
            }
            RdbEvent::Function { code } => {
                if ctx.opts.target.at_least(7, 0) {
                    ctx.stats.functions += 1;
                    (ctx.sink)(Output::Global {
                        cmd: Command::new(vec![
                            Bytes::from_static(b"FUNCTION"),
                            Bytes::from_static(b"LOAD"),
                            Bytes::from_static(b"REPLACE"),
                            code,
                        ]),
                    });
                    ctx.stats.commands += 1;
                } else {
                    let what = format!(
                        "function library not loaded: target {} has no functions (needs 7.0)",
                        ctx.opts.target.version_string()
                    );
                    ctx.warning(self.db, None, what);
                }
            }
            RdbEvent::ModuleAux { name, .. } => {
                let what = format!("aux data of module {name} is not transferred");
                ctx.warning(self.db, None, what);
            }
            RdbEvent::KeyStart(header) => {
                if self.key.is_some() {
                    return Err(RebuildError::Sequence {
                        what: "KeyStart before the previous key's KeyEnd",
                    });
                }
                self.key = Some(start_key(&mut ctx, header));
            }
            RdbEvent::Chunk(chunk) => {
                let key = self.key.as_mut().ok_or(RebuildError::Sequence {
                    what: "value chunk outside a key",
                })?;
                key.chunk(&mut ctx, chunk);
            }
            RdbEvent::KeyEnd { raw } => {
                let key = self.key.take().ok_or(RebuildError::Sequence {
                    what: "KeyEnd without KeyStart",
                })?;
                key.end(&mut ctx, raw);
            }
            RdbEvent::Header { .. }
            | RdbEvent::Aux { .. }
            | RdbEvent::ResizeDb { .. }
            | RdbEvent::SlotInfo { .. }
            | RdbEvent::End { .. } => {}
        }
        Ok(())
    }

    /// Ends the stream; fails when a key was left open.
    pub fn finish(self) -> Result<RebuildStats, RebuildError> {
        if self.key.is_some() {
            return Err(RebuildError::Sequence {
                what: "stream ended inside a key",
            });
        }
        Ok(self.stats)
    }
}

fn start_key(ctx: &mut Ctx<'_>, header: KeyHeader) -> KeyState {
    let target = ctx.opts.target;
    let restorable = ctx.opts.restore_max_bytes > 0 && target.can_restore_type(header.encoding);
    let mut plan = match header.value_type {
        ValueType::Module => Plan::RestoreOnly,
        _ => Plan::Rebuild,
    };
    if header.expire_ms.is_some_and(|ms| ms <= ctx.opts.now_ms) {
        ctx.stats.expired_skipped += 1;
        plan = Plan::Skip;
    } else if header.value_type == ValueType::Stream && !target.at_least(5, 0) {
        ctx.stats.unsupported_skipped += 1;
        let what = format!(
            "stream not loaded: target {} has no streams (needs 5.0)",
            target.version_string()
        );
        ctx.warning(header.db, Some(header.key.clone()), what);
        plan = Plan::Skip;
    }
    KeyState {
        header,
        plan,
        streaming: !restorable,
        buffer: Vec::new(),
        buffered_bytes: 0,
        started: false,
        emitted: false,
        items: 0,
        stream_exists: false,
        pending: None,
        set_value: None,
        field_ttls: Vec::new(),
        dropped_field_ttls: 0,
        warnings: Vec::new(),
    }
}

impl KeyState {
    fn key(&self) -> Bytes {
        self.header.key.clone()
    }

    /// Places one rebuild command: buffered while RESTORE is still possible,
    /// else straight out. The first one is preceded by `DEL` with `replace`.
    fn emit(&mut self, ctx: &mut Ctx<'_>, cmd: Command) {
        if !self.started {
            self.started = true;
            if ctx.opts.replace {
                let del = Command::new(vec![Bytes::from_static(b"DEL"), self.key()]);
                self.place(ctx, del);
            }
        }
        self.place(ctx, cmd);
    }

    fn place(&mut self, ctx: &mut Ctx<'_>, cmd: Command) {
        if self.streaming {
            self.emitted = true;
            ctx.command(self.header.db, cmd);
            return;
        }
        self.buffered_bytes += cmd.data_len();
        self.buffer.push(cmd);
        if self.buffered_bytes > ctx.opts.restore_max_bytes {
            // Too big to RESTORE: stop holding it back.
            self.streaming = true;
            self.emitted = true;
            for cmd in std::mem::take(&mut self.buffer) {
                ctx.command(self.header.db, cmd);
            }
            self.buffered_bytes = 0;
        }
    }

    /// Adds one element (`args`, `bytes` of data) to the pending command
    /// named `name`, flushing it when it is full.
    fn push_element<const N: usize>(
        &mut self,
        ctx: &mut Ctx<'_>,
        name: &'static [u8],
        args: [Bytes; N],
    ) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.args[0].as_ref() != name)
        {
            self.flush_pending(ctx);
        }
        let key = self.key();
        let pending = self.pending.get_or_insert_with(|| PendingCommand {
            args: vec![Bytes::from_static(name), key],
            items: 0,
            bytes: 0,
        });
        for arg in args {
            pending.bytes += arg.len();
            pending.args.push(arg);
        }
        pending.items += 1;
        self.items += 1;
        if pending.items >= ctx.opts.chunk_items || pending.bytes >= ctx.opts.chunk_bytes {
            self.flush_pending(ctx);
        }
    }

    /// Emits the pending element command, then the field TTLs of its fields.
    fn flush_pending(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(pending) = self.pending.take() {
            self.emit(ctx, Command::new(pending.args));
        }
        if self.field_ttls.is_empty() {
            return;
        }
        let mut ttls = std::mem::take(&mut self.field_ttls);
        ttls.sort_by_key(|(ms, _)| *ms);
        // One HPEXPIREAT per distinct expiry time, chunked like elements.
        let mut start = 0;
        while start < ttls.len() {
            let ms = ttls[start].0;
            let mut end = start;
            while end < ttls.len() && ttls[end].0 == ms && end - start < ctx.opts.chunk_items {
                end += 1;
            }
            let mut args = Vec::with_capacity(5 + end - start);
            args.push(Bytes::from_static(b"HPEXPIREAT"));
            args.push(self.key());
            args.push(Bytes::from(ms.to_string()));
            args.push(Bytes::from_static(b"FIELDS"));
            args.push(Bytes::from((end - start).to_string()));
            args.extend(ttls[start..end].iter().map(|(_, f)| f.clone()));
            self.emit(ctx, Command::new(args));
            start = end;
        }
    }

    fn note(&mut self, what: String) {
        if !self.warnings.contains(&what) {
            self.warnings.push(what);
        }
    }

    fn chunk(&mut self, ctx: &mut Ctx<'_>, chunk: ValueChunk) {
        match (self.plan, chunk) {
            (Plan::Skip, _) | (Plan::RestoreOnly, _) => {}
            (Plan::Rebuild, ValueChunk::String(value)) if self.items == 0 => {
                self.items = 1;
                if ctx.opts.strings_by_set {
                    self.set_value = Some(value);
                } else {
                    let cmd = Command::new(vec![Bytes::from_static(b"SET"), self.key(), value]);
                    self.emit(ctx, cmd);
                }
            }
            (Plan::Rebuild, ValueChunk::String(value)) => {
                // A later piece of a string too big for one chunk: the first
                // piece by SET, the others appended.
                if let Some(first) = self.set_value.take() {
                    let cmd = Command::new(vec![Bytes::from_static(b"SET"), self.key(), first]);
                    self.emit(ctx, cmd);
                }
                let cmd = Command::new(vec![Bytes::from_static(b"APPEND"), self.key(), value]);
                self.emit(ctx, cmd);
            }
            (Plan::Rebuild, ValueChunk::ListItems(items)) => {
                for item in items {
                    self.push_element(ctx, b"RPUSH", [item]);
                }
            }
            (Plan::Rebuild, ValueChunk::SetMembers(members)) => {
                for member in members {
                    self.push_element(ctx, b"SADD", [member]);
                }
            }
            (Plan::Rebuild, ValueChunk::ZSetEntries(entries)) => {
                for (member, score) in entries {
                    if score.is_nan() {
                        self.note("a member with a NaN score was dropped".to_string());
                        continue;
                    }
                    let score = Bytes::from(format_score(score));
                    self.push_element(ctx, b"ZADD", [score, member]);
                }
            }
            (Plan::Rebuild, ValueChunk::HashFields(fields)) => self.hash_fields(ctx, fields),
            (Plan::Rebuild, ValueChunk::StreamEntries(entries)) => {
                self.stream_entries(ctx, entries)
            }
            (Plan::Rebuild, ValueChunk::StreamMeta(meta)) => self.stream_meta(ctx, meta),
            (Plan::Rebuild, ValueChunk::StreamGroup(group)) => self.stream_group(ctx, group),
            (Plan::Rebuild, ValueChunk::Module { .. }) => {}
        }
    }

    fn hash_fields(&mut self, ctx: &mut Ctx<'_>, fields: Vec<HashField>) {
        let name: &'static [u8] = if ctx.opts.target.at_least(4, 0) {
            b"HSET"
        } else {
            b"HMSET"
        };
        let field_ttls = ctx.opts.target.at_least(7, 4);
        for HashField {
            field,
            value,
            expire_ms,
        } in fields
        {
            match expire_ms {
                Some(ms) if ms <= ctx.opts.now_ms => continue,
                Some(ms) if field_ttls => self.field_ttls.push((ms, field.clone())),
                Some(_) => self.dropped_field_ttls += 1,
                None => {}
            }
            self.push_element(ctx, name, [field, value]);
        }
    }

    fn stream_entries(&mut self, ctx: &mut Ctx<'_>, entries: Vec<StreamEntry>) {
        for StreamEntry { id, fields } in entries {
            let mut args = Vec::with_capacity(3 + fields.len().min(1 << 16) * 2);
            args.push(Bytes::from_static(b"XADD"));
            args.push(self.key());
            args.push(Bytes::from(id.to_string()));
            for (f, v) in fields {
                args.push(f);
                args.push(v);
            }
            self.items += 1;
            self.emit(ctx, Command::new(args));
        }
    }

    fn stream_meta(&mut self, ctx: &mut Ctx<'_>, meta: StreamMeta) {
        let target = ctx.opts.target;
        self.stream_exists = true;
        if self.items == 0 {
            let key = self.key();
            self.emit(
                ctx,
                Command::from_parts([
                    b"XGROUP".as_ref(),
                    b"CREATE",
                    &key,
                    SCRATCH_GROUP.as_bytes(),
                    b"0",
                    b"MKSTREAM",
                ]),
            );
            self.emit(
                ctx,
                Command::from_parts([
                    b"XGROUP".as_ref(),
                    b"DESTROY",
                    &key,
                    SCRATCH_GROUP.as_bytes(),
                ]),
            );
        }
        let mut args = vec![
            Bytes::from_static(b"XSETID"),
            self.key(),
            Bytes::from(meta.last_id.to_string()),
        ];
        let entries_added = meta.entries_added.unwrap_or(meta.length).max(meta.length);
        let max_deleted = meta.max_deleted_id.unwrap_or_default();
        if target.at_least(7, 0) {
            args.push(Bytes::from_static(b"ENTRIESADDED"));
            args.push(Bytes::from(entries_added.to_string()));
            args.push(Bytes::from_static(b"MAXDELETEDID"));
            args.push(Bytes::from(max_deleted.to_string()));
        } else if entries_added != meta.length || max_deleted != StreamId::default() {
            self.note(format!(
                "stream entries-added/max-deleted-entry-id dropped: target {} lacks them (needs 7.0)",
                target.version_string()
            ));
        }
        self.emit(ctx, Command::new(args));
    }

    fn stream_group(&mut self, ctx: &mut Ctx<'_>, group: StreamGroup) {
        let target = ctx.opts.target;
        let key = self.key();
        let mut args = vec![
            Bytes::from_static(b"XGROUP"),
            Bytes::from_static(b"CREATE"),
            key.clone(),
            group.name.clone(),
            Bytes::from(group.last_id.to_string()),
        ];
        if let Some(read) = group.entries_read {
            if target.at_least(7, 0) {
                // The RDB stores "unknown" (-1) as the u64 of -1.
                let read = i64::try_from(read).unwrap_or(-1);
                args.push(Bytes::from_static(b"ENTRIESREAD"));
                args.push(Bytes::from(read.to_string()));
            } else {
                self.note(format!(
                    "consumer group entries-read dropped: target {} lacks it (needs 7.0)",
                    target.version_string()
                ));
            }
        }
        self.emit(ctx, Command::new(args));

        let pel: HashMap<StreamId, (i64, u64)> = group
            .pending
            .iter()
            .map(|p| (p.id, (p.delivery_time_ms, p.delivery_count)))
            .collect();
        let mut owned = 0usize;
        for consumer in &group.consumers {
            if target.at_least(6, 2) {
                self.emit(
                    ctx,
                    Command::new(vec![
                        Bytes::from_static(b"XGROUP"),
                        Bytes::from_static(b"CREATECONSUMER"),
                        key.clone(),
                        group.name.clone(),
                        consumer.name.clone(),
                    ]),
                );
            } else if consumer.pending.is_empty() {
                self.note(format!(
                    "consumers without pending entries dropped: target {} lacks XGROUP CREATECONSUMER (needs 6.2)",
                    target.version_string()
                ));
            }
            for id in &consumer.pending {
                let Some(&(time_ms, count)) = pel.get(id) else {
                    self.note(
                        "a consumer's pending id missing from the group PEL was dropped"
                            .to_string(),
                    );
                    continue;
                };
                owned += 1;
                self.emit(
                    ctx,
                    Command::new(vec![
                        Bytes::from_static(b"XCLAIM"),
                        key.clone(),
                        group.name.clone(),
                        consumer.name.clone(),
                        Bytes::from_static(b"0"),
                        Bytes::from(id.to_string()),
                        Bytes::from_static(b"TIME"),
                        Bytes::from(time_ms.to_string()),
                        Bytes::from_static(b"RETRYCOUNT"),
                        Bytes::from(count.to_string()),
                        Bytes::from_static(b"FORCE"),
                        Bytes::from_static(b"JUSTID"),
                    ]),
                );
            }
        }
        if owned < pel.len() {
            self.note(format!(
                "{} pending entries of group {} have no consumer and were dropped",
                pel.len() - owned,
                String::from_utf8_lossy(&group.name)
            ));
        }
    }

    fn end(mut self, ctx: &mut Ctx<'_>, raw: Option<Bytes>) {
        let db = self.header.db;
        match self.plan {
            Plan::Skip => return,
            Plan::RestoreOnly => {
                match raw.filter(|r| self.restore_fits(ctx, r)) {
                    Some(raw) => self.restore(ctx, &raw),
                    None => {
                        ctx.stats.unsupported_skipped += 1;
                        let what = self.restore_refusal(ctx, "module value not loaded");
                        ctx.warning(db, Some(self.key()), what);
                    }
                }
                return;
            }
            Plan::Rebuild => {}
        }
        if self.items == 0 && !self.stream_exists {
            ctx.stats.empty_skipped += 1;
            return;
        }
        if let Some(value) = self.set_value.take() {
            self.set_string(ctx, value);
            return;
        }
        if !self.streaming {
            if let Some(raw) = raw.filter(|r| self.restore_fits(ctx, r)) {
                self.restore(ctx, &raw);
                return;
            }
            self.streaming = true;
        }
        self.flush_pending(ctx);
        for cmd in std::mem::take(&mut self.buffer) {
            ctx.command(db, cmd);
        }
        if let Some(ms) = self.header.expire_ms {
            let cmd = Command::new(vec![
                Bytes::from_static(b"PEXPIREAT"),
                self.key(),
                Bytes::from(ms.to_string()),
            ]);
            ctx.command(db, cmd);
        }
        ctx.stats.keys_rebuilt += 1;
        if self.dropped_field_ttls > 0 {
            let n = self.dropped_field_ttls;
            self.note(format!(
                "TTLs of {n} hash fields dropped (fields kept without TTL): target {} has no hash field expiry (needs 7.4)",
                ctx.opts.target.version_string()
            ));
        }
        for what in std::mem::take(&mut self.warnings) {
            ctx.warning(db, Some(self.key()), what);
        }
    }

    /// A string key by `SET` ([`RebuildOptions::strings_by_set`]).
    fn set_string(&self, ctx: &mut Ctx<'_>, value: Bytes) {
        let db = self.header.db;
        let pxat = ctx.opts.target.at_least(6, 2);
        let mut args = Vec::with_capacity(5);
        args.extend([Bytes::from_static(b"SET"), self.key(), value]);
        if let (Some(ms), true) = (self.header.expire_ms, pxat) {
            args.push(Bytes::from_static(b"PXAT"));
            args.push(Bytes::from(ms.to_string()));
        }
        ctx.command(db, Command::new(args));
        if let (Some(ms), false) = (self.header.expire_ms, pxat) {
            let cmd = Command::new(vec![
                Bytes::from_static(b"PEXPIREAT"),
                self.key(),
                Bytes::from(ms.to_string()),
            ]);
            ctx.command(db, cmd);
        }
        ctx.stats.keys_rebuilt += 1;
    }

    fn restore_fits(&self, ctx: &Ctx<'_>, raw: &Bytes) -> bool {
        raw.len() <= ctx.opts.restore_max_bytes
            && ctx.opts.target.can_restore_type(self.header.encoding)
    }

    fn restore_refusal(&self, ctx: &Ctx<'_>, prefix: &str) -> String {
        let target = ctx.opts.target;
        if !target.can_restore_type(self.header.encoding) {
            format!(
                "{prefix}: RDB type {} cannot be restored on target {} (RDB {})",
                self.header.encoding,
                target.version_string(),
                target.rdb_version
            )
        } else if ctx.opts.restore_max_bytes == 0 {
            format!("{prefix}: RESTORE is disabled")
        } else {
            format!(
                "{prefix}: its encoded size is over the RESTORE limit of {} bytes",
                ctx.opts.restore_max_bytes
            )
        }
    }

    fn restore(&self, ctx: &mut Ctx<'_>, raw: &[u8]) {
        let target = ctx.opts.target;
        let payload = Bytes::from(dump_payload(raw, target.rdb_version));
        let mut args = vec![Bytes::from_static(b"RESTORE"), self.key()];
        let abs_ttl = target.at_least(5, 0);
        let ttl = match self.header.expire_ms {
            None => 0,
            Some(ms) if abs_ttl => ms,
            Some(ms) => (ms - ctx.opts.now_ms).max(1),
        };
        args.push(Bytes::from(ttl.to_string()));
        args.push(payload);
        if ctx.opts.replace {
            args.push(Bytes::from_static(b"REPLACE"));
        }
        if abs_ttl && self.header.expire_ms.is_some() {
            args.push(Bytes::from_static(b"ABSTTL"));
        }
        ctx.command(self.header.db, Command::new(args));
        ctx.stats.keys_restored += 1;
    }
}

/// A sorted-set score as Redis parses it back exactly: `inf`/`-inf`, else
/// the shortest decimal that round-trips (exponent form when shorter).
pub fn format_score(score: f64) -> String {
    if score == f64::INFINITY {
        return "inf".to_string();
    }
    if score == f64::NEG_INFINITY {
        return "-inf".to_string();
    }
    let plain = format!("{score}");
    let exp = format!("{score:e}");
    if exp.len() < plain.len() {
        exp
    } else {
        plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::rdb::{PendingEntry, StreamConsumer};

    fn caps(v: &str) -> TargetCaps {
        TargetCaps::from_version_str(v).unwrap()
    }

    fn opts(v: &str) -> RebuildOptions {
        RebuildOptions {
            target: caps(v),
            restore_max_bytes: 1024,
            chunk_items: 1000,
            chunk_bytes: 1 << 20,
            replace: false,
            now_ms: 1_700_000_000_000,
            strings_by_set: false,
        }
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn header(key: &str, value_type: ValueType, encoding: u8) -> KeyHeader {
        KeyHeader {
            db: 0,
            key: b(key),
            value_type,
            encoding,
            expire_ms: None,
            lru_idle: None,
            lfu_freq: None,
        }
    }

    /// Feeds a whole key and returns everything it produced.
    fn run_key(
        rebuilder: &mut Rebuilder,
        header: KeyHeader,
        chunks: Vec<ValueChunk>,
        raw: Option<&[u8]>,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        rebuilder
            .feed(RdbEvent::KeyStart(header), &mut out)
            .unwrap();
        for chunk in chunks {
            rebuilder.feed(RdbEvent::Chunk(chunk), &mut out).unwrap();
        }
        rebuilder
            .feed(
                RdbEvent::KeyEnd {
                    raw: raw.map(Bytes::copy_from_slice),
                },
                &mut out,
            )
            .unwrap();
        out
    }

    /// Commands as readable strings (lossy), warnings as `WARN key: what`.
    fn render(out: &[Output]) -> Vec<String> {
        out.iter()
            .map(|o| match o {
                Output::Command { db, cmd } => format!(
                    "{db}: {}",
                    cmd.args
                        .iter()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                Output::Global { cmd } => format!(
                    "*: {}",
                    cmd.args
                        .iter()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                Output::Warning { key, what, .. } => format!(
                    "WARN {}: {what}",
                    key.as_ref()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default()
                ),
            })
            .collect()
    }

    fn commands(out: &[Output]) -> Vec<&Command> {
        out.iter()
            .filter_map(|o| match o {
                Output::Command { cmd, .. } => Some(cmd),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn version_table() {
        let rdb = |v: &str| caps(v).rdb_version;
        assert_eq!(rdb("2.6.17"), 6);
        assert_eq!(rdb("2.8.24"), 6);
        assert_eq!(rdb("3.0.7"), 6);
        assert_eq!(rdb("3.2.12"), 7);
        assert_eq!(rdb("4.0.14"), 8);
        assert_eq!(rdb("5.0.14"), 9);
        assert_eq!(rdb("6.2.14"), 9);
        assert_eq!(rdb("7.0.15"), 10);
        assert_eq!(rdb("7.2.4"), 11);
        assert_eq!(rdb("7.4.1"), 12);
        assert_eq!(rdb("8.0.2"), 12);
        assert_eq!(rdb("8.4.0"), 12);
        assert_eq!(rdb("8.6.0"), 13);
        assert!(TargetCaps::from_version_str("2.4.1").is_err());
        assert!(TargetCaps::from_version_str("seven").is_err());
        assert!(TargetCaps::from_version_str("7").is_err());
        let mut info = HashMap::new();
        info.insert("redis_version".to_string(), "7.0.15".to_string());
        assert_eq!(
            TargetCaps::from_info(&info).unwrap(),
            TargetCaps {
                version: (7, 0, 15),
                rdb_version: 10
            }
        );
        assert!(TargetCaps::from_info(&HashMap::new()).is_err());
    }

    #[test]
    fn strings_by_set_send_one_set_with_pxat_instead_of_restore() {
        let mut o = opts("7.0.15");
        o.strings_by_set = true;
        o.replace = true;
        let mut r = Rebuilder::new(o);
        let plain = run_key(
            &mut r,
            header("a", ValueType::String, 0),
            vec![ValueChunk::String(b("v1"))],
            Some(b"\x00\x02v1"),
        );
        assert_eq!(render(&plain), ["0: SET a v1"]);
        let mut h = header("b", ValueType::String, 0);
        h.expire_ms = Some(1_800_000_000_000);
        let expiring = run_key(
            &mut r,
            h,
            vec![ValueChunk::String(b(""))],
            Some(b"\x00\x00"),
        );
        assert_eq!(render(&expiring), ["0: SET b  PXAT 1800000000000"]);
        // Other types still go by RESTORE.
        let list = run_key(
            &mut r,
            header("l", ValueType::List, 18),
            vec![ValueChunk::ListItems(vec![b("x")])],
            Some(b"raw"),
        );
        assert_eq!(commands(&list)[0].name(), b"RESTORE");
        let stats = r.finish().unwrap();
        assert_eq!((stats.keys_rebuilt, stats.keys_restored), (2, 1));
    }

    #[test]
    fn a_string_in_pieces_is_set_then_appended() {
        let pieces = || {
            ["aaaa", "bbbb", "cc"]
                .map(|p| ValueChunk::String(b(p)))
                .to_vec()
        };
        for strings_by_set in [false, true] {
            let mut o = opts("7.0.15");
            o.strings_by_set = strings_by_set;
            o.restore_max_bytes = 4;
            let mut r = Rebuilder::new(o);
            let mut h = header("big", ValueType::String, 0);
            h.expire_ms = Some(1_800_000_000_000);
            let out = run_key(&mut r, h, pieces(), None);
            assert_eq!(
                render(&out),
                [
                    "0: SET big aaaa",
                    "0: APPEND big bbbb",
                    "0: APPEND big cc",
                    "0: PEXPIREAT big 1800000000000"
                ],
                "strings_by_set {strings_by_set}"
            );
            assert_eq!(r.finish().unwrap().keys_rebuilt, 1);
        }
    }

    #[test]
    fn strings_by_set_use_pexpireat_before_6_2() {
        let mut o = opts("6.0.9");
        o.strings_by_set = true;
        let mut r = Rebuilder::new(o);
        let mut h = header("k", ValueType::String, 0);
        h.expire_ms = Some(1_800_000_000_000);
        let out = run_key(
            &mut r,
            h,
            vec![ValueChunk::String(b("v"))],
            Some(b"\x00\x01v"),
        );
        assert_eq!(render(&out), ["0: SET k v", "0: PEXPIREAT k 1800000000000"]);
    }

    #[test]
    fn type_minimum_versions() {
        let c70 = caps("7.0.0");
        assert!(c70.can_restore_type(0));
        assert!(c70.can_restore_type(18));
        assert!(c70.can_restore_type(19));
        assert!(!c70.can_restore_type(20));
        assert!(!c70.can_restore_type(21));
        assert!(!c70.can_restore_type(25));
        assert!(!c70.can_restore_type(6));
        assert!(caps("7.2.0").can_restore_type(21));
        assert!(!caps("7.2.0").can_restore_type(22));
        assert!(caps("7.4.0").can_restore_type(25));
        assert!(!caps("8.0.0").can_restore_type(26));
        assert!(!caps("6.2.0").can_restore_type(16));
        assert!(caps("6.2.0").can_restore_type(15));
        assert!(!caps("4.0.0").can_restore_type(15));
    }

    #[test]
    fn string_rebuilt_with_set_and_pexpireat_when_restore_disabled() {
        let mut o = opts("7.0.15");
        o.restore_max_bytes = 0;
        let mut r = Rebuilder::new(o);
        let mut h = header("k", ValueType::String, 0);
        h.expire_ms = Some(1_800_000_000_000);
        let out = run_key(
            &mut r,
            h,
            vec![ValueChunk::String(b("v"))],
            Some(b"\x00\x01v"),
        );
        assert_eq!(render(&out), ["0: SET k v", "0: PEXPIREAT k 1800000000000"]);
        assert_eq!(r.stats().keys_rebuilt, 1);
        assert_eq!(r.stats().commands, 2);
    }

    #[test]
    fn restore_uses_target_version_abs_ttl_and_replace() {
        let mut o = opts("7.0.15");
        o.replace = true;
        let mut r = Rebuilder::new(o);
        let mut h = header("k", ValueType::String, 0);
        h.expire_ms = Some(1_800_000_000_000);
        let raw = b"\x00\x01v";
        let out = run_key(&mut r, h, vec![ValueChunk::String(b("v"))], Some(raw));
        let cmds = commands(&out);
        assert_eq!(cmds.len(), 1);
        let expected = Command::new(vec![
            b("RESTORE"),
            b("k"),
            b("1800000000000"),
            Bytes::from(dump_payload(raw, 10)),
            b("REPLACE"),
            b("ABSTTL"),
        ]);
        assert_eq!(cmds[0], &expected);
        assert_eq!(r.stats().keys_restored, 1);
        assert_eq!(r.stats().keys_rebuilt, 0);
    }

    #[test]
    fn restore_on_old_target_uses_relative_ttl() {
        let o = opts("4.0.14");
        let now = o.now_ms;
        let mut r = Rebuilder::new(o);
        let mut h = header("k", ValueType::String, 0);
        h.expire_ms = Some(now + 5000);
        let raw = b"\x00\x01v";
        let out = run_key(&mut r, h, vec![ValueChunk::String(b("v"))], Some(raw));
        let cmds = commands(&out);
        assert_eq!(
            cmds[0].args,
            vec![
                b("RESTORE"),
                b("k"),
                b("5000"),
                Bytes::from(dump_payload(raw, 8))
            ]
        );
    }

    #[test]
    fn restore_chosen_by_type_version_and_size() {
        let raw = b"\x14\x01\x02\x03";
        let chunks = || vec![ValueChunk::SetMembers(vec![b("a"), b("b")])];
        // Set listpack (type 20) is RDB 11: rebuilt on 7.0, restored on 7.2.
        let mut r = Rebuilder::new(opts("7.0.15"));
        let out = run_key(&mut r, header("s", ValueType::Set, 20), chunks(), Some(raw));
        assert_eq!(render(&out), ["0: SADD s a b"]);
        let mut r = Rebuilder::new(opts("7.2.4"));
        let out = run_key(&mut r, header("s", ValueType::Set, 20), chunks(), Some(raw));
        assert_eq!(commands(&out)[0].args[0], b("RESTORE"));
        assert_eq!(
            commands(&out)[0].args[3],
            Bytes::from(dump_payload(raw, 11))
        );
        // Over restore_max_bytes: rebuilt even though the type is known.
        let mut o = opts("7.2.4");
        o.restore_max_bytes = 3;
        let mut r = Rebuilder::new(o);
        let out = run_key(&mut r, header("s", ValueType::Set, 20), chunks(), Some(raw));
        assert_eq!(render(&out), ["0: SADD s a b"]);
        // No raw captured: rebuilt.
        let mut r = Rebuilder::new(opts("7.2.4"));
        let out = run_key(&mut r, header("s", ValueType::Set, 20), chunks(), None);
        assert_eq!(render(&out), ["0: SADD s a b"]);
    }

    #[test]
    fn expired_and_empty_keys_are_skipped() {
        let o = opts("7.0.15");
        let now = o.now_ms;
        let mut r = Rebuilder::new(o);
        let mut h = header("gone", ValueType::String, 0);
        h.expire_ms = Some(now);
        let out = run_key(
            &mut r,
            h,
            vec![ValueChunk::String(b("v"))],
            Some(b"\x00\x01v"),
        );
        assert!(out.is_empty());
        let out = run_key(
            &mut r,
            header("e", ValueType::Set, 2),
            vec![],
            Some(b"\x02\x00"),
        );
        assert!(out.is_empty());
        let out = run_key(
            &mut r,
            header("e2", ValueType::List, 18),
            vec![ValueChunk::ListItems(vec![])],
            None,
        );
        assert!(out.is_empty());
        let s = r.stats();
        assert_eq!((s.expired_skipped, s.empty_skipped, s.commands), (1, 2, 0));
        assert_eq!(s.keys_loaded(), 0);
    }

    #[test]
    fn big_list_is_chunked_and_streams_out_with_del_first() {
        let mut o = opts("7.0.15");
        o.restore_max_bytes = 4096;
        o.chunk_items = 1000;
        o.replace = true;
        let mut r = Rebuilder::new(o);
        let mut out = Vec::new();
        r.feed(
            RdbEvent::KeyStart(header("l", ValueType::List, 18)),
            &mut out,
        )
        .unwrap();
        // 2500 items of 10 bytes in parser chunks of 100.
        for c in 0..25 {
            let items = (0..100)
                .map(|i| b(&format!("item{:06}", c * 100 + i)))
                .collect();
            r.feed(RdbEvent::Chunk(ValueChunk::ListItems(items)), &mut out)
                .unwrap();
        }
        // Far more than restore_max_bytes went in: commands are already out.
        let before_end = out.len();
        assert_eq!(before_end, 3, "DEL + two full RPUSH before KeyEnd");
        r.feed(RdbEvent::KeyEnd { raw: None }, &mut out).unwrap();
        let cmds = commands(&out);
        assert_eq!(cmds[0].args, vec![b("DEL"), b("l")]);
        let sizes: Vec<usize> = cmds[1..].iter().map(|c| c.args.len() - 2).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        assert!(cmds[1..].iter().all(|c| c.is("RPUSH")));
        assert_eq!(cmds[1].args[2], b("item000000"));
        assert_eq!(cmds[3].args.last().unwrap(), &b("item002499"));
        assert_eq!(r.partial_key(), None);
        assert_eq!(r.stats().keys_rebuilt, 1);
    }

    #[test]
    fn chunk_bytes_bounds_commands() {
        let mut o = opts("7.0.15");
        o.restore_max_bytes = 0;
        o.chunk_bytes = 100;
        let mut r = Rebuilder::new(o);
        let fields = (0..50)
            .map(|i| HashField {
                field: b(&format!("f{i:04}")),
                value: b(&format!("v{i:04}")),
                expire_ms: None,
            })
            .collect();
        let out = run_key(
            &mut r,
            header("h", ValueType::Hash, 16),
            vec![ValueChunk::HashFields(fields)],
            None,
        );
        let cmds = commands(&out);
        // 10 bytes per field: a command closes once it holds >= 100 bytes.
        assert_eq!(cmds.len(), 5);
        for c in &cmds {
            assert!(c.is("HSET"));
            assert_eq!(c.args.len(), 2 + 20);
        }
    }

    #[test]
    fn partial_key_is_reported_while_streaming() {
        let mut o = opts("7.0.15");
        o.restore_max_bytes = 0;
        o.chunk_items = 2;
        let mut r = Rebuilder::new(o);
        let mut out = Vec::new();
        r.feed(
            RdbEvent::KeyStart(header("l", ValueType::List, 18)),
            &mut out,
        )
        .unwrap();
        assert_eq!(r.partial_key(), None);
        r.feed(
            RdbEvent::Chunk(ValueChunk::ListItems(vec![b("a"), b("b"), b("c")])),
            &mut out,
        )
        .unwrap();
        assert_eq!(r.partial_key(), Some((0, &b("l"))));
        assert!(r.finish().is_err());
    }

    #[test]
    fn zset_scores_round_trip() {
        for (score, text) in [
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (1.5, "1.5"),
            (-0.0, "-0"),
            (0.1, "0.1"),
            (1e300, "1e300"),
            (-4.329000123123131e28, "-4.329000123123131e28"),
            (9007199254740992.0, "9007199254740992"),
            (5e-324, "5e-324"),
        ] {
            assert_eq!(format_score(score), text);
            if score.is_finite() {
                assert_eq!(text.parse::<f64>().unwrap().to_bits(), score.to_bits());
            }
        }
        let mut o = opts("7.0.15");
        o.restore_max_bytes = 0;
        let mut r = Rebuilder::new(o);
        let out = run_key(
            &mut r,
            header("z", ValueType::ZSet, 17),
            vec![ValueChunk::ZSetEntries(vec![
                (b("a"), f64::NEG_INFINITY),
                (b("b"), 2.5),
                (b("c"), f64::NAN),
            ])],
            None,
        );
        assert_eq!(
            render(&out),
            [
                "0: ZADD z -inf a 2.5 b",
                "WARN z: a member with a NaN score was dropped"
            ]
        );
    }

    fn ttl_hash(now: i64) -> Vec<ValueChunk> {
        vec![ValueChunk::HashFields(vec![
            HashField {
                field: b("a"),
                value: b("1"),
                expire_ms: Some(now + 1000),
            },
            HashField {
                field: b("b"),
                value: b("2"),
                expire_ms: None,
            },
            HashField {
                field: b("c"),
                value: b("3"),
                expire_ms: Some(now + 1000),
            },
            HashField {
                field: b("old"),
                value: b("4"),
                expire_ms: Some(now - 1),
            },
        ])]
    }

    #[test]
    fn hash_field_ttls_warn_on_7_0() {
        let o = opts("7.0.15");
        let now = o.now_ms;
        let mut r = Rebuilder::new(o);
        // Type 25 (hash listpack ex) is unknown to 7.0: rebuilt.
        let out = run_key(
            &mut r,
            header("h", ValueType::Hash, 25),
            ttl_hash(now),
            Some(b"\x19xx"),
        );
        assert_eq!(
            render(&out),
            [
                "0: HSET h a 1 b 2 c 3",
                "WARN h: TTLs of 2 hash fields dropped (fields kept without TTL): target 7.0.15 has no hash field expiry (needs 7.4)"
            ]
        );
        assert_eq!(r.stats().warnings, 1);
    }

    #[test]
    fn hash_field_ttls_become_hpexpireat_on_7_4() {
        let mut o = opts("7.4.0");
        o.restore_max_bytes = 0;
        let now = o.now_ms;
        let mut r = Rebuilder::new(o);
        let out = run_key(
            &mut r,
            header("h", ValueType::Hash, 25),
            ttl_hash(now),
            None,
        );
        assert_eq!(
            render(&out),
            [
                "0: HSET h a 1 b 2 c 3".to_string(),
                format!("0: HPEXPIREAT h {} FIELDS 2 a c", now + 1000)
            ]
        );
    }

    fn sample_stream() -> Vec<ValueChunk> {
        let id = |ms, seq| StreamId { ms, seq };
        vec![
            ValueChunk::StreamEntries(vec![
                StreamEntry {
                    id: id(1, 0),
                    fields: vec![(b("f"), b("v1"))],
                },
                StreamEntry {
                    id: id(3, 0),
                    fields: vec![(b("f"), b("v3")), (b("g"), b("w"))],
                },
            ]),
            ValueChunk::StreamMeta(StreamMeta {
                length: 2,
                last_id: id(3, 0),
                first_id: Some(id(1, 0)),
                max_deleted_id: Some(id(2, 0)),
                entries_added: Some(3),
            }),
            ValueChunk::StreamGroup(StreamGroup {
                name: b("g1"),
                last_id: id(3, 0),
                entries_read: Some(3),
                pending: vec![
                    PendingEntry {
                        id: id(1, 0),
                        delivery_time_ms: 1000,
                        delivery_count: 2,
                    },
                    PendingEntry {
                        id: id(3, 0),
                        delivery_time_ms: 3000,
                        delivery_count: 1,
                    },
                ],
                consumers: vec![
                    StreamConsumer {
                        name: b("alice"),
                        seen_time_ms: 5,
                        active_time_ms: Some(5),
                        pending: vec![id(1, 0), id(3, 0)],
                    },
                    StreamConsumer {
                        name: b("bob"),
                        seen_time_ms: 6,
                        active_time_ms: None,
                        pending: vec![],
                    },
                ],
            }),
        ]
    }

    #[test]
    fn stream_rebuild_on_7_0() {
        let mut o = opts("7.0.15");
        o.restore_max_bytes = 0;
        let mut r = Rebuilder::new(o);
        let out = run_key(
            &mut r,
            header("s", ValueType::Stream, 19),
            sample_stream(),
            None,
        );
        assert_eq!(
            render(&out),
            [
                "0: XADD s 1-0 f v1",
                "0: XADD s 3-0 f v3 g w",
                "0: XSETID s 3-0 ENTRIESADDED 3 MAXDELETEDID 2-0",
                "0: XGROUP CREATE s g1 3-0 ENTRIESREAD 3",
                "0: XGROUP CREATECONSUMER s g1 alice",
                "0: XCLAIM s g1 alice 0 1-0 TIME 1000 RETRYCOUNT 2 FORCE JUSTID",
                "0: XCLAIM s g1 alice 0 3-0 TIME 3000 RETRYCOUNT 1 FORCE JUSTID",
                "0: XGROUP CREATECONSUMER s g1 bob",
            ]
        );
    }

    #[test]
    fn stream_rebuild_on_6_0_warns_about_missing_features() {
        let mut r = Rebuilder::new(opts("6.0.16"));
        // Type 19 is RDB 10: not restorable on 6.0.
        let out = run_key(
            &mut r,
            header("s", ValueType::Stream, 19),
            sample_stream(),
            Some(b"\x13x"),
        );
        let text = render(&out);
        assert_eq!(text[2], "0: XSETID s 3-0");
        assert_eq!(text[3], "0: XGROUP CREATE s g1 3-0");
        assert!(text
            .iter()
            .all(|l| l.starts_with("WARN") || !l.contains("CREATECONSUMER")));
        let warnings: Vec<_> = text.iter().filter(|l| l.starts_with("WARN")).collect();
        assert_eq!(warnings.len(), 3, "{text:?}");
        assert!(warnings[0].contains("entries-added"));
        assert!(warnings[1].contains("entries-read"));
        assert!(warnings[2].contains("CREATECONSUMER"));
    }

    #[test]
    fn empty_stream_still_exists() {
        let mut o = opts("7.0.15");
        o.restore_max_bytes = 0;
        o.replace = true;
        let mut r = Rebuilder::new(o);
        let meta = ValueChunk::StreamMeta(StreamMeta {
            length: 0,
            last_id: StreamId { ms: 7, seq: 1 },
            first_id: None,
            max_deleted_id: Some(StreamId { ms: 7, seq: 1 }),
            entries_added: Some(4),
        });
        let out = run_key(&mut r, header("s", ValueType::Stream, 19), vec![meta], None);
        assert_eq!(
            render(&out),
            [
                "0: DEL s",
                "0: XGROUP CREATE s __ferry_empty_stream__ 0 MKSTREAM",
                "0: XGROUP DESTROY s __ferry_empty_stream__",
                "0: XSETID s 7-1 ENTRIESADDED 4 MAXDELETEDID 7-1",
            ]
        );
        assert_eq!(r.stats().keys_rebuilt, 1);
        assert_eq!(r.stats().empty_skipped, 0);
    }

    #[test]
    fn module_values_restore_or_warn() {
        let module = || {
            vec![ValueChunk::Module {
                module_id: 42,
                name: "ReJSON-RL".to_string(),
            }]
        };
        let mut r = Rebuilder::new(opts("7.0.15"));
        let out = run_key(
            &mut r,
            header("m", ValueType::Module, 7),
            module(),
            Some(b"\x07abc"),
        );
        assert_eq!(commands(&out)[0].args[0], b("RESTORE"));
        let mut o = opts("7.0.15");
        o.restore_max_bytes = 0;
        let mut r = Rebuilder::new(o);
        let out = run_key(
            &mut r,
            header("m", ValueType::Module, 7),
            module(),
            Some(b"\x07abc"),
        );
        assert_eq!(
            render(&out),
            ["WARN m: module value not loaded: RESTORE is disabled"]
        );
        assert_eq!(r.stats().unsupported_skipped, 1);
        let mut r = Rebuilder::new(opts("7.0.15"));
        let out = run_key(
            &mut r,
            header("m", ValueType::Module, 6),
            module(),
            Some(b"\x06abc"),
        );
        assert!(render(&out)[0].contains("RDB type 6 cannot be restored"));
    }

    #[test]
    fn functions_dbs_and_sequence() {
        let mut r = Rebuilder::new(opts("7.0.15"));
        let mut out = Vec::new();
        r.feed(
            RdbEvent::Function {
                code: b("#!lua name=x"),
            },
            &mut out,
        )
        .unwrap();
        r.feed(RdbEvent::SelectDb(3), &mut out).unwrap();
        out.extend(run_key(
            &mut r,
            KeyHeader {
                db: 3,
                ..header("k", ValueType::String, 0)
            },
            vec![ValueChunk::String(b("v"))],
            None,
        ));
        assert_eq!(
            render(&out),
            ["*: FUNCTION LOAD REPLACE #!lua name=x", "3: SET k v"]
        );
        assert_eq!(r.stats().functions, 1);
        assert!(r.feed(RdbEvent::KeyEnd { raw: None }, &mut out).is_err());
        assert!(r
            .feed(RdbEvent::Chunk(ValueChunk::String(b("x"))), &mut out)
            .is_err());

        let mut r = Rebuilder::new(opts("6.2.6"));
        let mut out = Vec::new();
        r.feed(RdbEvent::Function { code: b("x") }, &mut out)
            .unwrap();
        assert!(render(&out)[0].contains("has no functions"));
    }

    #[test]
    fn callback_sink_sees_the_same_outputs() {
        let mut r = Rebuilder::new(opts("7.0.15"));
        let mut seen = 0;
        r.feed_with(
            RdbEvent::KeyStart(header("k", ValueType::String, 0)),
            &mut |_| seen += 1,
        )
        .unwrap();
        r.feed_with(RdbEvent::Chunk(ValueChunk::String(b("v"))), &mut |_| {
            seen += 1
        })
        .unwrap();
        r.feed_with(RdbEvent::KeyEnd { raw: None }, &mut |_| seen += 1)
            .unwrap();
        assert_eq!(seen, 1);
    }
}
