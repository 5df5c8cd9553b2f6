//! Key-by-key comparison of a batch of keys on the two sides.
//!
//! In: keys of one db (both connections have it selected). Out: for each key
//! that differs, its [`Difference`]s. See the module doc of [`super`] for
//! what is compared in each mode; the value walks here read at most one
//! chunk per side at a time: [`super::VerifyConfig::string_chunk`] bytes of
//! a string, or up to `batch` elements of a collection, fewer when its
//! elements are big ([`ChunkSize`]).

use bytes::Bytes;

use super::conn::{Conn, KeyCommand};
use super::report::show_value;
use super::{DiffKind, Difference, Mode, Side, VerifyConfig, VerifyError};
use crate::redis::command::Command;
use crate::redis::resp::Frame;

/// The two connections of a verify.
pub(crate) struct Pair {
    pub source: Conn,
    pub target: Conn,
}

impl Pair {
    fn side(&mut self, side: Side) -> &mut Conn {
        match side {
            Side::Source => &mut self.source,
            Side::Target => &mut self.target,
        }
    }
}

/// The type of a key, as `TYPE` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyType {
    None,
    String,
    List,
    Hash,
    Set,
    ZSet,
    Stream,
    /// A module type (or one this version does not know): compared by
    /// existence, type and TTL only.
    Other(String),
}

impl KeyType {
    fn parse(name: &[u8]) -> KeyType {
        match name {
            b"none" => KeyType::None,
            b"string" => KeyType::String,
            b"list" => KeyType::List,
            b"hash" => KeyType::Hash,
            b"set" => KeyType::Set,
            b"zset" => KeyType::ZSet,
            b"stream" => KeyType::Stream,
            other => KeyType::Other(String::from_utf8_lossy(other).into_owned()),
        }
    }

    fn name(&self) -> &str {
        match self {
            KeyType::None => "none",
            KeyType::String => "string",
            KeyType::List => "list",
            KeyType::Hash => "hash",
            KeyType::Set => "set",
            KeyType::ZSet => "zset",
            KeyType::Stream => "stream",
            KeyType::Other(name) => name,
        }
    }

    /// The command giving the length or cardinality.
    fn length_command(&self) -> Option<&'static str> {
        match self {
            KeyType::String => Some("STRLEN"),
            KeyType::List => Some("LLEN"),
            KeyType::Hash => Some("HLEN"),
            KeyType::Set => Some("SCARD"),
            KeyType::ZSet => Some("ZCARD"),
            KeyType::Stream => Some("XLEN"),
            KeyType::None | KeyType::Other(_) => None,
        }
    }
}

/// What one side says about a key: its type and absolute expiry (unix ms by
/// our clock, `None` without a TTL).
struct Head {
    kind: KeyType,
    expire_at_ms: Option<i64>,
}

/// A value walk's verdict: `Some(detail)` at the first difference.
type Walk = Result<Option<String>, VerifyError>;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn value(kind: DiffKind, detail: impl Into<String>) -> Difference {
    Difference {
        kind,
        detail: detail.into(),
    }
}

/// A key that changed type under a walk (`WRONGTYPE`) or vanished (`XINFO`
/// on a deleted stream: `no such key`) is in flight: a difference for now,
/// re-checked by the next pass.
fn in_flight(result: Result<Frame, VerifyError>) -> Result<Result<Frame, String>, VerifyError> {
    match result {
        Ok(frame) => Ok(Ok(frame)),
        Err(VerifyError::Server { side, message, .. }) if message.starts_with("WRONGTYPE") => Ok(
            Err(format!("changed type on the {side} while being compared")),
        ),
        Err(VerifyError::Server { side, message, .. })
            if message.starts_with("ERR no such key") =>
        {
            Ok(Err(format!(
                "vanished from the {side} while being compared"
            )))
        }
        Err(other) => Err(other),
    }
}

/// Compares `keys` on both sides; returns the keys that differ.
pub(crate) async fn check_keys(
    pair: &mut Pair,
    keys: &[Bytes],
    config: &VerifyConfig,
) -> Result<Vec<(Bytes, Vec<Difference>)>, VerifyError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let source_heads = heads(&mut pair.source, keys).await?;
    let target_heads = heads(&mut pair.target, keys).await?;
    let mut found: Vec<(Bytes, Vec<Difference>)> = Vec::new();
    // Keys of the same type on both sides, for the length and value checks.
    let mut same: Vec<(usize, KeyType)> = Vec::new();
    // DEBUG DIGEST-VALUE mixes in whether a key has a TTL: where only one
    // side has one, unequal digests say nothing about the value.
    let mut one_sided_ttl = vec![false; keys.len()];
    for (index, (source, target)) in source_heads.iter().zip(&target_heads).enumerate() {
        let mut diffs = Vec::new();
        match (&source.kind, &target.kind) {
            (KeyType::None, KeyType::None) => continue, // deleted (or expired) on both
            (KeyType::None, kind) => diffs.push(extra(kind, target, config)),
            (kind, KeyType::None) => diffs.push(value(
                DiffKind::Missing,
                format!("missing on the target ({} on the source)", kind.name()),
            )),
            (a, b) if a != b => diffs.push(value(
                DiffKind::Type,
                format!("{} on the source, {} on the target", a.name(), b.name()),
            )),
            (kind, _) => {
                one_sided_ttl[index] =
                    source.expire_at_ms.is_some() != target.expire_at_ms.is_some();
                if let Some(ttl) = ttl_difference(source, target, config) {
                    diffs.push(ttl);
                }
                same.push((index, kind.clone()));
            }
        }
        if !diffs.is_empty() {
            found.push((keys[index].clone(), diffs));
        }
    }
    let mut value_diffs = values(pair, keys, &same, &one_sided_ttl, config).await?;
    // Merge value differences into the per-key lists, keeping key order.
    for (index, diff) in value_diffs.drain(..) {
        let key = &keys[index];
        match found.iter_mut().find(|(k, _)| k == key) {
            Some((_, diffs)) => diffs.push(diff),
            None => found.push((key.clone(), vec![diff])),
        }
    }
    Ok(found)
}

/// `TYPE` and `PTTL` of every key, pipelined.
async fn heads(conn: &mut Conn, keys: &[Bytes]) -> Result<Vec<Head>, VerifyError> {
    let mut cmds = Vec::with_capacity(keys.len() * 2);
    for key in keys {
        cmds.push(KeyCommand::on(b"TYPE", key));
        cmds.push(KeyCommand::on(b"PTTL", key));
    }
    let replies = conn.pipeline(&cmds).await?;
    let now = now_ms();
    if replies.len() != cmds.len() {
        return Err(conn.bad_reply("TYPE", None, &Frame::Array(Vec::new())));
    }
    let mut heads = Vec::with_capacity(keys.len());
    for (key, pair) in keys.iter().zip(replies.chunks(2)) {
        let (type_reply, ttl_reply) = (&pair[0], &pair[1]);
        if let Some(message) = type_reply.error_message() {
            return Err(conn.server_error("TYPE", Some(key), message));
        }
        if let Some(message) = ttl_reply.error_message() {
            return Err(conn.server_error("PTTL", Some(key), message));
        }
        let kind = match type_reply.as_bytes() {
            Some(name) => KeyType::parse(name),
            None => return Err(conn.bad_reply("TYPE", Some(key), type_reply)),
        };
        let ttl = ttl_reply
            .as_integer()
            .ok_or_else(|| conn.bad_reply("PTTL", Some(key), ttl_reply))?;
        // -1: no TTL; -2: gone since TYPE (its TYPE then says so next pass).
        let expire_at_ms = (ttl >= 0).then(|| now.saturating_add(ttl));
        heads.push(Head { kind, expire_at_ms });
    }
    Ok(heads)
}

/// A key on the target only. One that expires there within the expire
/// grace (plus the tolerance) is a key the source expired and the target
/// keeps until the source's `DEL` arrives ([`DiffKind::Expiring`]); any
/// other is extra.
fn extra(kind: &KeyType, target: &Head, config: &VerifyConfig) -> Difference {
    let now = now_ms();
    let window = config
        .expire_grace_ms
        .saturating_add(config.ttl_tolerance_ms);
    match target.expire_at_ms {
        Some(at) if at.saturating_sub(now) <= i64::try_from(window).unwrap_or(i64::MAX) => value(
            DiffKind::Expiring,
            format!(
                "on the target only ({}), expiring there in {} ms: expired on the source, kept \
                 by the expire grace ({} ms) until the source's DEL arrives",
                kind.name(),
                at.saturating_sub(now).max(0),
                config.expire_grace_ms
            ),
        ),
        _ => value(
            DiffKind::Extra,
            format!("exists on the target only ({})", kind.name()),
        ),
    }
}

/// The TTLs of a key on both sides: equal when the target's expiry is at
/// most the tolerance earlier, or the expire grace plus the tolerance later,
/// than the source's (the applier writes the source's deadline plus the
/// grace).
fn ttl_difference(source: &Head, target: &Head, config: &VerifyConfig) -> Option<Difference> {
    let tolerance_ms = config.ttl_tolerance_ms;
    let grace_ms = config.expire_grace_ms;
    let now = now_ms();
    let detail = match (source.expire_at_ms, target.expire_at_ms) {
        (None, None) => return None,
        (Some(at), None) => format!(
            "expires in {} ms on the source, no TTL on the target",
            at.saturating_sub(now).max(0)
        ),
        (None, Some(at)) => format!(
            "no TTL on the source, expires in {} ms on the target",
            at.saturating_sub(now).max(0)
        ),
        (Some(a), Some(b)) => {
            let apart = a.abs_diff(b);
            if b >= a {
                if apart <= grace_ms.saturating_add(tolerance_ms) {
                    return None;
                }
                format!(
                    "the target expires {apart} ms later (tolerance {tolerance_ms} ms plus the \
                     expire grace {grace_ms} ms)"
                )
            } else {
                if apart <= tolerance_ms {
                    return None;
                }
                format!("expiry times {apart} ms apart (tolerance {tolerance_ms} ms)")
            }
        }
    };
    Some(value(DiffKind::Ttl, detail))
}

/// Lengths (both modes) and values (full mode) of keys whose types match.
async fn values(
    pair: &mut Pair,
    keys: &[Bytes],
    same: &[(usize, KeyType)],
    one_sided_ttl: &[bool],
    config: &VerifyConfig,
) -> Result<Vec<(usize, Difference)>, VerifyError> {
    let measured: Vec<&(usize, KeyType)> = same
        .iter()
        .filter(|(_, kind)| kind.length_command().is_some())
        .collect();
    let cmds: Vec<KeyCommand> = measured
        .iter()
        .map(|(index, kind)| {
            let name = kind.length_command().unwrap_or("EXISTS");
            KeyCommand::on(name.as_bytes(), &keys[*index])
        })
        .collect();
    let source_lengths = lengths(&mut pair.source, keys, &measured, &cmds).await?;
    let target_lengths = lengths(&mut pair.target, keys, &measured, &cmds).await?;
    let mut out = Vec::new();
    let mut walk: Vec<(usize, KeyType, u64)> = Vec::new();
    for ((&(index, ref kind), source), target) in measured
        .iter()
        .copied()
        .zip(source_lengths)
        .zip(target_lengths)
    {
        match (source, target) {
            (Err(detail), _) | (_, Err(detail)) => {
                out.push((index, value(DiffKind::Value, detail)));
            }
            (Ok(a), Ok(b)) if a != b => out.push((
                index,
                value(
                    DiffKind::Value,
                    format!(
                        "{} {a} on the source, {b} on the target",
                        kind.length_command().unwrap_or("length")
                    ),
                ),
            )),
            (Ok(length), Ok(_)) => walk.push((index, kind.clone(), length)),
        }
    }
    if config.mode == Mode::Outline {
        return Ok(out);
    }
    let verdicts = digests(pair, keys, &walk, config).await?;
    for ((index, kind, length), verdict) in walk.into_iter().zip(verdicts) {
        let key = &keys[index];
        let equal = verdict == Some(true);
        let detail = if equal && kind != KeyType::Stream {
            None
        } else {
            let walks_elements = match kind {
                KeyType::List | KeyType::Hash | KeyType::Set | KeyType::ZSet => true,
                KeyType::Stream => !equal,
                KeyType::String | KeyType::None | KeyType::Other(_) => false,
            };
            let size = if walks_elements {
                chunk_size(&mut pair.source, key, length, config).await?
            } else {
                ChunkSize::new(config)
            };
            let found = match kind {
                KeyType::String => walk_string(pair, key, length, config.string_chunk).await?,
                KeyType::List => walk_list(pair, key, length, size).await?,
                KeyType::Hash => walk_unordered(pair, key, Unordered::Hash, size).await?,
                KeyType::Set => walk_unordered(pair, key, Unordered::Set, size).await?,
                KeyType::ZSet => walk_zset(pair, key, length, size).await?,
                KeyType::Stream => {
                    let found = if equal {
                        None
                    } else {
                        walk_stream(pair, key, size).await?
                    };
                    match found {
                        Some(detail) => Some(detail),
                        None => stream_metadata(pair, key).await?,
                    }
                }
                KeyType::None | KeyType::Other(_) => None,
            };
            // The digests differ, yet no walk step saw it: say so rather
            // than call the key equal.
            match found {
                None if verdict == Some(false) && !one_sided_ttl[index] => {
                    Some("DEBUG DIGEST-VALUE differs".to_string())
                }
                other => other,
            }
        };
        if let Some(detail) = detail {
            out.push((index, value(DiffKind::Value, detail)));
        }
    }
    Ok(out)
}

/// Length replies, pipelined; a `WRONGTYPE` reply (the key changed type
/// since `TYPE`) is an in-flight difference.
async fn lengths(
    conn: &mut Conn,
    keys: &[Bytes],
    measured: &[&(usize, KeyType)],
    cmds: &[KeyCommand],
) -> Result<Vec<Result<u64, String>>, VerifyError> {
    let replies = conn.pipeline(cmds).await?;
    let mut out = Vec::with_capacity(replies.len());
    for (&&(index, ref kind), reply) in measured.iter().zip(&replies) {
        let key = &keys[index];
        let command = kind.length_command().unwrap_or("length");
        match reply.error_message() {
            Some(message) if message.starts_with("WRONGTYPE") => out.push(Err(format!(
                "changed type on the {} while being compared",
                conn.side
            ))),
            Some(message) => return Err(conn.server_error(command, Some(key), message)),
            None => match reply.as_integer().and_then(|n| u64::try_from(n).ok()) {
                Some(n) => out.push(Ok(n)),
                None => return Err(conn.bad_reply(command, Some(key), reply)),
            },
        }
    }
    Ok(out)
}

/// For each key, whether its `DEBUG DIGEST-VALUE` is the same on both
/// sides; `None` where no digest was compared: either side refuses DEBUG, or
/// the key is too big for one command ([`digest_allowed`]).
async fn digests(
    pair: &mut Pair,
    keys: &[Bytes],
    walk: &[(usize, KeyType, u64)],
    config: &VerifyConfig,
) -> Result<Vec<Option<bool>>, VerifyError> {
    let mut verdicts = vec![None; walk.len()];
    if !(pair.source.digest && pair.target.digest) {
        return Ok(verdicts);
    }
    let eligible: Vec<usize> = (0..walk.len())
        .filter(|&i| digest_allowed(&walk[i].1, walk[i].2, config))
        .collect();
    if eligible.is_empty() {
        return Ok(verdicts);
    }
    let cmds: Vec<KeyCommand> = eligible
        .iter()
        .map(|&i| {
            let key = &keys[walk[i].0];
            KeyCommand {
                key: key.clone(),
                cmd: Command::new(vec![
                    Bytes::from_static(b"DEBUG"),
                    Bytes::from_static(b"DIGEST-VALUE"),
                    key.clone(),
                ]),
                unrouted: true,
            }
        })
        .collect();
    let mut per_side = Vec::with_capacity(2);
    for side in [Side::Source, Side::Target] {
        let replies = pair.side(side).pipeline(&cmds).await?;
        // [digest] in 7.x; a refused DEBUG (config changed since the probe)
        // or an odd reply means "walk it".
        let digests: Vec<Option<Bytes>> = replies
            .iter()
            .map(|reply| match reply {
                Frame::Array(items) if items.len() == 1 => items[0].as_bytes().cloned(),
                other => other.as_bytes().cloned(),
            })
            .collect();
        per_side.push(digests);
    }
    if let [source, target] = per_side.as_slice() {
        for ((&i, a), b) in eligible.iter().zip(source).zip(target) {
            if let (Some(a), Some(b)) = (a, b) {
                verdicts[i] = Some(a == b);
            }
        }
    }
    Ok(verdicts)
}

/// `DEBUG DIGEST-VALUE` reads a whole value in one command, blocking the
/// server meanwhile (about 0.75 s for a 1M-element list): bigger keys are
/// walked in chunks instead.
fn digest_allowed(kind: &KeyType, length: u64, config: &VerifyConfig) -> bool {
    match kind {
        KeyType::String => length <= config.digest_max_bytes,
        _ => length <= config.digest_max_elements,
    }
}

/// Sends the same command to both sides.
async fn both(
    pair: &mut Pair,
    args: Vec<Bytes>,
    key: &[u8],
) -> Result<Result<(Frame, Frame), String>, VerifyError> {
    let cmd = Command::new(args);
    let source = match in_flight(pair.source.call(cmd.clone(), Some(key)).await)? {
        Ok(frame) => frame,
        Err(detail) => return Ok(Err(detail)),
    };
    let target = match in_flight(pair.target.call(cmd, Some(key)).await)? {
        Ok(frame) => frame,
        Err(detail) => return Ok(Err(detail)),
    };
    Ok(Ok((source, target)))
}

fn num(n: u64) -> Bytes {
    Bytes::from(n.to_string())
}

fn items<'a>(
    conn: &Conn,
    command: &str,
    key: &[u8],
    reply: &'a Frame,
) -> Result<&'a [Frame], VerifyError> {
    match reply {
        Frame::Array(items) | Frame::Set(items) => Ok(items),
        other => Err(conn.bad_reply(command, Some(key), other)),
    }
}

fn bulk<'a>(
    conn: &Conn,
    command: &str,
    key: &[u8],
    reply: &'a Frame,
) -> Result<&'a Bytes, VerifyError> {
    reply
        .as_bytes()
        .ok_or_else(|| conn.bad_reply(command, Some(key), reply))
}

/// Strings: `GETRANGE` chunks of `chunk` bytes.
async fn walk_string(pair: &mut Pair, key: &Bytes, length: u64, chunk: usize) -> Walk {
    let chunk = chunk.max(1) as u64;
    let mut offset = 0u64;
    while offset < length {
        let last = offset.saturating_add(chunk - 1);
        let args = vec![
            Bytes::from_static(b"GETRANGE"),
            key.clone(),
            num(offset),
            num(last),
        ];
        let (a, b) = match both(pair, args, key).await? {
            Ok(replies) => replies,
            Err(detail) => return Ok(Some(detail)),
        };
        let a = bulk(&pair.source, "GETRANGE", key, &a)?;
        let b = bulk(&pair.target, "GETRANGE", key, &b)?;
        if a != b {
            let at = a.iter().zip(b.iter()).take_while(|(x, y)| x == y).count() as u64;
            return Ok(Some(format!("bytes differ from offset {}", offset + at)));
        }
        if a.is_empty() {
            break; // shortened while being read: the next pass decides
        }
        offset += a.len() as u64;
    }
    Ok(None)
}

/// Elements per chunk of a walk: `batch`, fewer while the elements are so
/// big that a chunk would exceed the byte budget
/// ([`VerifyConfig::chunk_budget`]), so memory stays near the budget per
/// side (a single element bigger than the budget is still read whole).
struct ChunkSize {
    count: u64,
    max: u64,
    budget: u64,
}

impl ChunkSize {
    fn new(config: &VerifyConfig) -> ChunkSize {
        let max = config.batch.max(1) as u64;
        ChunkSize {
            count: max,
            max,
            budget: config.chunk_budget.max(1) as u64,
        }
    }

    /// Adjusts to the chunk just read: `elements` taking `bytes`.
    fn observe(&mut self, elements: usize, bytes: usize) {
        if elements == 0 {
            return;
        }
        let per_element = (bytes / elements).max(1) as u64;
        self.count = (self.budget / per_element).clamp(1, self.max);
    }
}

/// The first chunk size of a walk: from the key's `MEMORY USAGE` on the
/// source (sampled, so an estimate) divided by its length, so that even the
/// first chunk of a list of huge elements stays near the budget. Without
/// `MEMORY USAGE` (refused, or the key vanished): `batch`.
async fn chunk_size(
    conn: &mut Conn,
    key: &Bytes,
    length: u64,
    config: &VerifyConfig,
) -> Result<ChunkSize, VerifyError> {
    let mut size = ChunkSize::new(config);
    if length <= 1 {
        return Ok(size);
    }
    let cmd = Command::new(vec![
        Bytes::from_static(b"MEMORY"),
        Bytes::from_static(b"USAGE"),
        key.clone(),
    ]);
    match conn.call(cmd, Some(key)).await {
        Ok(Frame::Integer(bytes)) => {
            let bytes = usize::try_from(bytes).unwrap_or(0);
            let elements = usize::try_from(length).unwrap_or(usize::MAX);
            size.observe(elements, bytes);
        }
        Ok(_) | Err(VerifyError::Server { .. }) => {}
        Err(other) => return Err(other),
    }
    Ok(size)
}

/// Bytes of payload in a reply (strings, plus a little per element).
fn frame_bytes(frame: &Frame) -> usize {
    match frame {
        Frame::Array(items) | Frame::Set(items) | Frame::Push(items) => {
            items.iter().map(frame_bytes).sum::<usize>() + 16
        }
        Frame::Map(entries) | Frame::Attribute(entries) => entries
            .iter()
            .map(|(k, v)| frame_bytes(k) + frame_bytes(v))
            .sum::<usize>()
            .saturating_add(16),
        other => other.as_bytes().map_or(16, |b| b.len() + 16),
    }
}

/// Lists: `LRANGE` chunks, compared in order.
async fn walk_list(pair: &mut Pair, key: &Bytes, length: u64, mut size: ChunkSize) -> Walk {
    let mut start = 0u64;
    while start < length {
        let args = vec![
            Bytes::from_static(b"LRANGE"),
            key.clone(),
            num(start),
            num(start + size.count - 1),
        ];
        let (a, b) = match both(pair, args, key).await? {
            Ok(replies) => replies,
            Err(detail) => return Ok(Some(detail)),
        };
        let bytes = frame_bytes(&a).max(frame_bytes(&b));
        let a = items(&pair.source, "LRANGE", key, &a)?;
        let b = items(&pair.target, "LRANGE", key, &b)?;
        size.observe(a.len().max(b.len()), bytes);
        for (offset, (x, y)) in a.iter().zip(b).enumerate() {
            if x != y {
                return Ok(Some(format!(
                    "element {} differs: {} on the source, {} on the target",
                    start + offset as u64,
                    show_frame_value(x),
                    show_frame_value(y)
                )));
            }
        }
        if a.len() != b.len() {
            return Ok(Some(format!(
                "length changed while being read (at element {})",
                start + a.len().min(b.len()) as u64
            )));
        }
        if a.is_empty() {
            break;
        }
        start += a.len() as u64;
    }
    Ok(None)
}

fn show_frame_value(frame: &Frame) -> String {
    match frame.as_bytes() {
        Some(bytes) => show_value(bytes),
        None => format!("{frame:?}"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Unordered {
    Hash,
    Set,
}

impl Unordered {
    fn scan(self) -> &'static str {
        match self {
            Unordered::Hash => "HSCAN",
            Unordered::Set => "SSCAN",
        }
    }

    fn lookup(self) -> &'static str {
        match self {
            Unordered::Hash => "HMGET",
            Unordered::Set => "SMISMEMBER",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Unordered::Hash => "field",
            Unordered::Set => "member",
        }
    }
}

/// Hashes and sets: scan one side in pages, look each page up on the other
/// side (`HMGET` / `SMISMEMBER`), then the same the other way round.
async fn walk_unordered(
    pair: &mut Pair,
    key: &Bytes,
    shape: Unordered,
    mut size: ChunkSize,
) -> Walk {
    for (scanned, other) in [(Side::Source, Side::Target), (Side::Target, Side::Source)] {
        let mut cursor = Bytes::from_static(b"0");
        loop {
            let args = vec![
                Bytes::from(shape.scan()),
                key.clone(),
                cursor.clone(),
                Bytes::from_static(b"COUNT"),
                num(size.count),
            ];
            let reply =
                match in_flight(pair.side(scanned).call(Command::new(args), Some(key)).await)? {
                    Ok(reply) => reply,
                    Err(detail) => return Ok(Some(detail)),
                };
            let conn = pair.side(scanned);
            let (next, page) = scan_page(conn, shape.scan(), key, &reply)?;
            let page = page.to_vec();
            let step = if shape == Unordered::Hash { 2 } else { 1 };
            size.observe(page.len() / step, frame_bytes(&reply));
            if page.len() % step != 0 {
                return Err(conn.bad_reply(shape.scan(), Some(key), &reply));
            }
            if !page.is_empty() {
                let mut args = Vec::with_capacity(2 + page.len() / step);
                args.push(Bytes::from(shape.lookup()));
                args.push(key.clone());
                for entry in page.chunks(step) {
                    args.push(bulk(pair.side(scanned), shape.scan(), key, &entry[0])?.clone());
                }
                let looked_up =
                    match in_flight(pair.side(other).call(Command::new(args), Some(key)).await)? {
                        Ok(reply) => reply,
                        Err(detail) => return Ok(Some(detail)),
                    };
                let answers = items(pair.side(other), shape.lookup(), key, &looked_up)?;
                if answers.len() != page.len() / step {
                    return Err(pair
                        .side(other)
                        .bad_reply(shape.lookup(), Some(key), &looked_up));
                }
                for (entry, answer) in page.chunks(step).zip(answers) {
                    let name = show_frame_value(&entry[0]);
                    let detail = match shape {
                        Unordered::Hash if *answer == Frame::Null => Some(format!(
                            "{} {name} exists on the {scanned} only",
                            shape.noun()
                        )),
                        Unordered::Hash if answer.as_bytes() != entry[1].as_bytes() => {
                            let (on_source, on_target) = match scanned {
                                Side::Source => (&entry[1], answer),
                                Side::Target => (answer, &entry[1]),
                            };
                            Some(format!(
                                "field {name}: {} on the source, {} on the target",
                                show_frame_value(on_source),
                                show_frame_value(on_target)
                            ))
                        }
                        Unordered::Set if answer.as_integer() != Some(1) => {
                            if answer.as_integer() != Some(0) {
                                return Err(pair.side(other).bad_reply(
                                    shape.lookup(),
                                    Some(key),
                                    &looked_up,
                                ));
                            }
                            Some(format!("member {name} exists on the {scanned} only"))
                        }
                        _ => None,
                    };
                    if detail.is_some() {
                        return Ok(detail);
                    }
                }
            }
            if next.as_ref() == b"0" {
                break;
            }
            cursor = next;
        }
    }
    Ok(None)
}

/// `[cursor, [items…]]` of a SCAN-family reply.
fn scan_page<'a>(
    conn: &Conn,
    command: &str,
    key: &[u8],
    reply: &'a Frame,
) -> Result<(Bytes, &'a [Frame]), VerifyError> {
    if let Frame::Array(parts) = reply {
        if let [cursor, Frame::Array(page)] = parts.as_slice() {
            if let Some(cursor) = cursor.as_bytes() {
                return Ok((cursor.clone(), page));
            }
        }
    }
    Err(conn.bad_reply(command, Some(key), reply))
}

/// Sorted sets: `ZRANGE … WITHSCORES` by index in chunks, in order; scores
/// compared as numbers.
async fn walk_zset(pair: &mut Pair, key: &Bytes, length: u64, mut size: ChunkSize) -> Walk {
    let mut start = 0u64;
    while start < length {
        let args = vec![
            Bytes::from_static(b"ZRANGE"),
            key.clone(),
            num(start),
            num(start + size.count - 1),
            Bytes::from_static(b"WITHSCORES"),
        ];
        let (a, b) = match both(pair, args, key).await? {
            Ok(replies) => replies,
            Err(detail) => return Ok(Some(detail)),
        };
        let bytes = frame_bytes(&a).max(frame_bytes(&b));
        let a_items = items(&pair.source, "ZRANGE", key, &a)?;
        let b_items = items(&pair.target, "ZRANGE", key, &b)?;
        size.observe(a_items.len().max(b_items.len()) / 2, bytes);
        if a_items.len() % 2 != 0 {
            return Err(pair.source.bad_reply("ZRANGE", Some(key), &a));
        }
        if b_items.len() % 2 != 0 {
            return Err(pair.target.bad_reply("ZRANGE", Some(key), &b));
        }
        for (x, y) in a_items.chunks(2).zip(b_items.chunks(2)) {
            let same_member = x[0] == y[0];
            if same_member && score(&x[1]) == score(&y[1]) && score(&x[1]).is_some() {
                continue;
            }
            let member = show_frame_value(&x[0]);
            if same_member {
                return Ok(Some(format!(
                    "member {member}: score {} on the source, {} on the target",
                    show_frame_value(&x[1]),
                    show_frame_value(&y[1])
                )));
            }
            // Out of step: name the source's member and its fate.
            let args = vec![
                Bytes::from_static(b"ZSCORE"),
                key.clone(),
                x[0].as_bytes().cloned().unwrap_or_default(),
            ];
            let there = match in_flight(pair.target.call(Command::new(args), Some(key)).await)? {
                Ok(reply) => reply,
                Err(detail) => return Ok(Some(detail)),
            };
            return Ok(Some(match there {
                Frame::Null => format!("member {member} is missing on the target"),
                other => format!(
                    "member {member}: score {} on the source, {} on the target",
                    show_frame_value(&x[1]),
                    show_frame_value(&other)
                ),
            }));
        }
        if a_items.len() != b_items.len() {
            return Ok(Some("length changed while being read".to_string()));
        }
        if a_items.is_empty() {
            break;
        }
        start += (a_items.len() / 2) as u64;
    }
    Ok(None)
}

fn score(frame: &Frame) -> Option<f64> {
    match frame {
        Frame::Double(d) => Some(*d),
        other => other
            .as_bytes()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<f64>().ok()),
    }
}

/// Streams: `XRANGE … COUNT` chunks, compared in order.
async fn walk_stream(pair: &mut Pair, key: &Bytes, mut size: ChunkSize) -> Walk {
    let mut start = Bytes::from_static(b"-");
    loop {
        let args = vec![
            Bytes::from_static(b"XRANGE"),
            key.clone(),
            start.clone(),
            Bytes::from_static(b"+"),
            Bytes::from_static(b"COUNT"),
            num(size.count),
        ];
        let asked = size.count;
        let (a, b) = match both(pair, args, key).await? {
            Ok(replies) => replies,
            Err(detail) => return Ok(Some(detail)),
        };
        let bytes = frame_bytes(&a).max(frame_bytes(&b));
        let a = items(&pair.source, "XRANGE", key, &a)?;
        let b = items(&pair.target, "XRANGE", key, &b)?;
        size.observe(a.len().max(b.len()), bytes);
        for (x, y) in a.iter().zip(b) {
            if x != y {
                let id = |conn: &Conn, entry: &Frame| -> Result<String, VerifyError> {
                    match entry {
                        Frame::Array(parts) if !parts.is_empty() => Ok(show_frame_value(&parts[0])),
                        other => Err(conn.bad_reply("XRANGE", Some(key), other)),
                    }
                };
                let (x_id, y_id) = (id(&pair.source, x)?, id(&pair.target, y)?);
                return Ok(Some(if x_id == y_id {
                    format!("entry {x_id} has other fields on the target")
                } else {
                    format!("entry {x_id} on the source where the target has {y_id}")
                }));
            }
        }
        if a.len() != b.len() {
            return Ok(Some("length changed while being read".to_string()));
        }
        let Some(last) = a.last() else { break };
        let last_id = match last {
            Frame::Array(parts) if !parts.is_empty() => {
                bulk(&pair.source, "XRANGE", key, &parts[0])?.clone()
            }
            other => return Err(pair.source.bad_reply("XRANGE", Some(key), other)),
        };
        // Exclusive start (Redis 6.2+): the entry after the last one read.
        let mut next = Vec::with_capacity(last_id.len() + 1);
        next.push(b'(');
        next.extend_from_slice(&last_id);
        start = Bytes::from(next);
        if (a.len() as u64) < asked {
            break;
        }
    }
    Ok(None)
}

/// Streams, full mode: what `XRANGE` does not show, from `XINFO STREAM` and
/// `XINFO GROUPS` (without `entries-read` and `lag`, which Redis 7.0 does not
/// replicate).
async fn stream_metadata(pair: &mut Pair, key: &Bytes) -> Walk {
    const STREAM_FIELDS: &[&str] = &[
        "length",
        "last-generated-id",
        "max-deleted-entry-id",
        "entries-added",
        "groups",
    ];
    const GROUP_FIELDS: &[&str] = &["name", "consumers", "pending", "last-delivered-id"];
    let args = vec![
        Bytes::from_static(b"XINFO"),
        Bytes::from_static(b"STREAM"),
        key.clone(),
    ];
    let (a, b) = match both(pair, args, key).await? {
        Ok(replies) => replies,
        Err(detail) => return Ok(Some(detail)),
    };
    let a = fields(&pair.source, "XINFO STREAM", key, &a)?;
    let b = fields(&pair.target, "XINFO STREAM", key, &b)?;
    for name in STREAM_FIELDS {
        if let (Some(x), Some(y)) = (lookup(&a, name), lookup(&b, name)) {
            if x != y {
                return Ok(Some(format!(
                    "XINFO STREAM {name}: {} on the source, {} on the target",
                    show_frame_value(x),
                    show_frame_value(y)
                )));
            }
        }
    }
    let args = vec![
        Bytes::from_static(b"XINFO"),
        Bytes::from_static(b"GROUPS"),
        key.clone(),
    ];
    let (a, b) = match both(pair, args, key).await? {
        Ok(replies) => replies,
        Err(detail) => return Ok(Some(detail)),
    };
    let a = items(&pair.source, "XINFO GROUPS", key, &a)?;
    let b = items(&pair.target, "XINFO GROUPS", key, &b)?;
    if a.len() != b.len() {
        return Ok(Some(format!(
            "{} consumer groups on the source, {} on the target",
            a.len(),
            b.len()
        )));
    }
    for (x, y) in a.iter().zip(b) {
        let x = fields(&pair.source, "XINFO GROUPS", key, x)?;
        let y = fields(&pair.target, "XINFO GROUPS", key, y)?;
        for name in GROUP_FIELDS {
            let (gx, gy) = (lookup(&x, name), lookup(&y, name));
            if gx != gy {
                let group = lookup(&x, "name").map(show_frame_value).unwrap_or_default();
                return Ok(Some(format!(
                    "group {group} {name}: {} on the source, {} on the target",
                    gx.map(show_frame_value).unwrap_or_else(|| "absent".into()),
                    gy.map(show_frame_value).unwrap_or_else(|| "absent".into())
                )));
            }
        }
    }
    Ok(None)
}

/// A flat `[name, value, …]` reply (RESP2) or a map (RESP3) as pairs.
fn fields<'a>(
    conn: &Conn,
    command: &str,
    key: &[u8],
    reply: &'a Frame,
) -> Result<Vec<(&'a [u8], &'a Frame)>, VerifyError> {
    match reply {
        Frame::Array(items) if items.len() % 2 == 0 => items
            .chunks(2)
            .map(|pair| match pair[0].as_bytes() {
                Some(name) => Ok((name.as_ref(), &pair[1])),
                None => Err(conn.bad_reply(command, Some(key), reply)),
            })
            .collect(),
        Frame::Map(entries) => entries
            .iter()
            .map(|(name, value)| match name.as_bytes() {
                Some(name) => Ok((name.as_ref(), value)),
                None => Err(conn.bad_reply(command, Some(key), reply)),
            })
            .collect(),
        other => Err(conn.bad_reply(command, Some(key), other)),
    }
}

fn lookup<'a>(fields: &[(&[u8], &'a Frame)], name: &str) -> Option<&'a Frame> {
    fields
        .iter()
        .find(|(n, _)| *n == name.as_bytes())
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(grace_ms: u64) -> VerifyConfig {
        let mut config = VerifyConfig::new(
            crate::redis::url::RedisUrl::parse("h:1").unwrap(),
            crate::redis::url::RedisUrl::parse("h:2").unwrap(),
        );
        config.ttl_tolerance_ms = 2000;
        config.expire_grace_ms = grace_ms;
        config
    }

    fn head(at: Option<i64>) -> Head {
        Head {
            kind: KeyType::String,
            expire_at_ms: at,
        }
    }

    #[test]
    fn ttl_within_tolerance_is_equal() {
        let config = config(0);
        assert!(ttl_difference(&head(None), &head(None), &config).is_none());
        assert!(ttl_difference(&head(Some(10_000)), &head(Some(11_999)), &config).is_none());
        assert!(ttl_difference(&head(Some(10_000)), &head(Some(8_001)), &config).is_none());
        let far = ttl_difference(&head(Some(10_000)), &head(Some(7_999)), &config).unwrap();
        assert_eq!(far.kind, DiffKind::Ttl);
        assert!(far.detail.contains("2001 ms apart"), "{}", far.detail);
        let later = ttl_difference(&head(Some(10_000)), &head(Some(12_001)), &config).unwrap();
        assert!(later.detail.contains("2001 ms later"), "{}", later.detail);
        let one_sided = ttl_difference(&head(Some(i64::MAX)), &head(None), &config).unwrap();
        assert!(one_sided.detail.contains("no TTL on the target"));
        let other_side = ttl_difference(&head(None), &head(Some(5)), &config).unwrap();
        assert!(other_side.detail.contains("no TTL on the source"));
    }

    #[test]
    fn the_target_may_expire_later_by_the_grace() {
        let config = config(300_000);
        let source = head(Some(10_000));
        assert!(ttl_difference(&source, &head(Some(310_000)), &config).is_none());
        assert!(ttl_difference(&source, &head(Some(312_000)), &config).is_none());
        let beyond = ttl_difference(&source, &head(Some(312_001)), &config).unwrap();
        assert!(
            beyond.detail.contains("302001 ms later") && beyond.detail.contains("grace 300000"),
            "{}",
            beyond.detail
        );
        // Never earlier than the tolerance allows: an early target expiry is
        // what the grace exists to prevent.
        assert!(ttl_difference(&source, &head(Some(7_999)), &config).is_some());
        assert!(ttl_difference(&head(Some(i64::MAX)), &head(Some(i64::MIN)), &config).is_some());
    }

    #[test]
    fn a_target_only_key_expiring_within_the_grace_is_expiring() {
        let config = config(300_000);
        let now = now_ms();
        let soon = extra(&KeyType::List, &head(Some(now + 200_000)), &config);
        assert_eq!(soon.kind, DiffKind::Expiring, "{}", soon.detail);
        assert!(soon.detail.contains("list"), "{}", soon.detail);
        let late = extra(&KeyType::List, &head(Some(now + 400_000)), &config);
        assert_eq!(late.kind, DiffKind::Extra);
        assert_eq!(
            extra(&KeyType::List, &head(None), &config).kind,
            DiffKind::Extra
        );
        let no_grace = extra(&KeyType::List, &head(Some(now + 60_000)), &self::config(0));
        assert_eq!(no_grace.kind, DiffKind::Extra);
    }

    #[test]
    fn chunks_shrink_for_big_elements_and_grow_back() {
        let mut config = VerifyConfig::new(
            crate::redis::url::RedisUrl::parse("h:1").unwrap(),
            crate::redis::url::RedisUrl::parse("h:2").unwrap(),
        );
        config.batch = 100;
        config.chunk_budget = 1 << 20;
        let mut size = ChunkSize::new(&config);
        assert_eq!(size.count, 100);
        size.observe(100, 100 * 100 * 1024); // 100 KiB elements
        assert_eq!(size.count, 10);
        size.observe(10, 10 << 20); // 1 MiB elements
        assert_eq!(size.count, 1);
        size.observe(1, 600 << 20); // one element over the budget
        assert_eq!(size.count, 1);
        size.observe(1, 10);
        assert_eq!(size.count, 100);
        size.observe(0, 0);
        assert_eq!(size.count, 100);
        let reply = Frame::Array(vec![
            Frame::bulk("abc"),
            Frame::Array(vec![Frame::bulk("de")]),
        ]);
        assert_eq!(frame_bytes(&reply), (3 + 16) + (2 + 16 + 16) + 16);
    }

    #[test]
    fn types_and_scores_parse() {
        assert_eq!(KeyType::parse(b"zset"), KeyType::ZSet);
        assert_eq!(
            KeyType::parse(b"ReJSON-RL"),
            KeyType::Other("ReJSON-RL".into())
        );
        assert_eq!(KeyType::parse(b"ReJSON-RL").length_command(), None);
        assert_eq!(score(&Frame::bulk("1.5")), Some(1.5));
        assert_eq!(score(&Frame::bulk("inf")), Some(f64::INFINITY));
        assert_eq!(score(&Frame::bulk("x")), None);
        assert_eq!(score(&Frame::Null), None);
    }
}
