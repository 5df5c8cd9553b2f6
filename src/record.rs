//! The replication record: what one WAL entry holds, on the listener and on
//! the drainer, and what is shipped between them (see `proto/ferry.proto`).
//!
//! What flows in: a [`ReplEntry`] from the source's replication stream, or a
//! snapshot marker. What flows out: the protobuf bytes stored as the WAL
//! entry's payload, and back.
//!
//! Decoding checks the payload against [`RecordLimits`] (a corrupt or
//! hostile payload cannot ask for more than its own length anyway, prost
//! only allocates what is present), that a write carries at least one
//! non-empty command, and that its streamed arguments are well formed.
//!
//! # Big entries
//!
//! An entry may be bigger than any buffer ferry holds (Redis accepts 512 MB
//! arguments, and a `MULTI` of several of them). Its big arguments are
//! *streamed*: the listener stores their bytes, as they arrive, in
//! [`Record::Fragment`] entries of at most `fragment-size` bytes each
//! (`seq` 0, 1, ... within the entry), then the entry's [`Record::Write`],
//! whose [`WriteRecord::streamed`] lists each streamed argument (command
//! and argument index, length, number of fragments) and holds an empty
//! argument in its place. The rules every reader relies on:
//!
//! 1. The fragments of a write are the `n` entries right before it, `n` the
//!    sum of its `streamed[i].fragments`, in `streamed` order, with `seq`
//!    `0..n`: write `W` needs exactly the log ids `W - n ..= W - 1`.
//! 2. A fragment carries the source position of its entry's *start* (the
//!    position after the entry before it): durable fragments never make the
//!    listener acknowledge the entry, and a restart resumes the source's
//!    stream at the entry's first byte.
//! 3. Fragments no write follows (a crash or a lost link in the middle of
//!    an entry; the entry is received again and stored again after them)
//!    are never referenced: by rule 1 a write reaches back only over its
//!    own run, and a run starts at `seq` 0.
//! 4. A position that cuts the log (an applier's checkpoint, a fallback
//!    snapshot's marker id M) is never a fragment whose write follows it:
//!    so whatever retention trims below such a cut, no write after it needs.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_varint, encoded_len_varint};
use prost::Message;

use crate::redis::cluster::SlotRanges;
use crate::redis::command::{Command, CLUSTER_SLOTS};
use crate::redis::psync::ReplEntry;
pub use crate::redis::psync::StreamedArg;

/// Every key ferry itself writes into a source or a target starts with this
/// (heartbeats, checkpoints); such keys are never replicated as data.
pub const INTERNAL_PREFIX: &[u8] = b"__ferry";

/// The generated protobuf types of `proto/ferry.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ferry.v1");
}

/// One record, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Write(WriteRecord),
    Snapshot(SnapshotMarker),
    Fragment(Fragment),
    /// A slot of a cluster source handed over to another partition
    /// (docs/cluster.md, rule 2).
    Handoff(SlotHandoff),
    /// A tenure of a cluster source's slot never opened for this partition:
    /// its import was aborted (docs/cluster.md, rule 9).
    Void(SlotVoid),
}

/// The tenure of a cluster source's write: its keys' slot and the
/// generation of that slot's ownership it belongs to (docs/cluster.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotTenure {
    pub slot: u16,
    pub gen: u64,
}

/// `slot` handed over by the partition whose log holds the record to
/// partition `to`, opening tenure `gen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotHandoff {
    pub slot: u16,
    pub to: u32,
    pub gen: u64,
}

/// Tenure `gen` of `slot` voided for the partition whose log holds the
/// record: its entries of that tenure before the record are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotVoid {
    pub slot: u16,
    pub gen: u64,
}

/// One entry of the source's stream: a command, or one MULTI/EXEC's commands.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteRecord {
    pub db: u32,
    pub commands: Vec<Command>,
    pub transaction: bool,
    /// Arguments stored apart in the fragments before this record (module
    /// doc, "Big entries"), in command and argument order; their places in
    /// `commands` hold empty arguments. Empty for an ordinary entry.
    pub streamed: Vec<StreamedArg>,
    /// The slot tenure of a cluster source's entry (docs/cluster.md, rule
    /// 1); `None`: keyless, ferry's own key, or a standalone source.
    pub tenure: Option<SlotTenure>,
}

impl WriteRecord {
    /// Fragments this write needs: the entries right before it.
    pub fn fragment_count(&self) -> u64 {
        self.streamed.iter().map(|s| u64::from(s.fragments)).sum()
    }

    /// Bytes of its streamed arguments.
    pub fn streamed_bytes(&self) -> u64 {
        self.streamed.iter().map(|s| s.len).sum()
    }
}

/// A piece of a streamed argument of the write that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// Position among the fragments of its entry, from 0.
    pub seq: u32,
    pub data: Bytes,
}

/// The state at this log id is snapshot `epoch`, consistent with the source
/// at (`replid`, `offset`). The default is an empty marker of epoch 0 (a
/// preload's stand-in until the real marker is read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotMarker {
    pub epoch: u64,
    pub rdb_bytes: u64,
    pub chunks: u64,
    pub replid: String,
    pub offset: u64,
    /// The hash slots the snapshot holds (one shard of a cluster source);
    /// `None`: the whole keyspace. Loading it replaces only these slots' keys.
    pub scope: Option<SlotRanges>,
    /// Cluster sources: the tenure generation of the scope's slots
    /// (docs/cluster.md, rule 3); empty for a standalone source.
    pub tenures: Vec<(SlotRanges, u64)>,
    /// Cluster sources: the slots this partition handed over last, to be
    /// applied by a load of the marker (docs/cluster.md, rule 6).
    pub handoffs: Vec<SlotHandoff>,
}

/// Bounds checked when decoding.
#[derive(Debug, Clone, Copy)]
pub struct RecordLimits {
    pub max_payload: usize,
    pub max_commands: usize,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            max_payload: crate::wal::MAX_PAYLOAD_LEN,
            max_commands: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    #[error("record of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("record does not decode: {0}")]
    Decode(String),
    #[error("record has no kind")]
    Empty,
    #[error("write record has {0} commands (must have 1..={1})")]
    BadCommandCount(usize, usize),
    #[error("write record has an empty command at index {0}")]
    EmptyCommand(usize),
    #[error("write record has a bad streamed argument at index {index}: {what}")]
    BadStreamedArg { index: usize, what: String },
    #[error("fragment {seq} is empty")]
    EmptyFragment { seq: u32 },
    #[error("snapshot marker has a bad slot range {first}-{last} (0 <= first <= last <= 16383)")]
    BadSlotRange { first: u32, last: u32 },
    #[error("{what} names slot {slot} (slots are 0..=16383)")]
    BadSlot { what: &'static str, slot: u32 },
}

impl Record {
    /// The record for an entry of the source's replication stream.
    pub fn from_repl_entry(entry: &ReplEntry) -> Record {
        Record::Write(WriteRecord {
            db: entry.db,
            commands: entry.commands.clone(),
            transaction: entry.transaction,
            streamed: entry.streamed.clone(),
            tenure: None,
        })
    }

    /// The encoded record of a write, built straight from borrowed commands:
    /// the same bytes as `Record::Write(..).encode()` (prost's field order,
    /// defaults left out), without cloning the commands into messages first.
    pub fn encode_write(db: u32, commands: &[Command], transaction: bool) -> Bytes {
        Record::encode_write_into(&mut BytesMut::new(), db, commands, transaction, &[], None)
    }

    /// [`Record::encode_write`] with streamed arguments and a slot tenure,
    /// encoded at the end of `arena` and split off it. The listener encodes
    /// every entry this way (once per replication entry), into one arena:
    /// consecutive payloads share one buffer, so an entry costs no
    /// allocation of its own, and cloning its payload (for the WAL's read
    /// tail) only counts a reference.
    pub fn encode_write_into(
        arena: &mut BytesMut,
        db: u32,
        commands: &[Command],
        transaction: bool,
        streamed: &[StreamedArg],
        tenure: Option<SlotTenure>,
    ) -> Bytes {
        use tag::*;
        let field_len = |len: usize| 1 + encoded_len_varint(len as u64) + len;
        let command_len = |command: &Command| -> usize {
            command.args.iter().map(|arg| field_len(arg.len())).sum()
        };
        let streamed_pb: Vec<pb::StreamedArg> =
            streamed.iter().copied().map(StreamedArg::to_pb).collect();
        let mut write_len: usize = commands
            .iter()
            .map(|command| field_len(command_len(command)))
            .sum();
        if db != 0 {
            write_len += 1 + encoded_len_varint(u64::from(db));
        }
        if transaction {
            write_len += 2;
        }
        write_len += streamed_pb
            .iter()
            .map(|arg| field_len(arg.encoded_len()))
            .sum::<usize>();
        let tenure_pb = tenure.map(|t| pb::SlotTenure {
            slot: u32::from(t.slot),
            gen: t.gen,
        });
        if let Some(t) = &tenure_pb {
            write_len += field_len(t.encoded_len());
        }
        // Written into the arena's free room, or a new block of it.
        const ARENA_BLOCK: usize = 64 * 1024;
        debug_assert!(arena.is_empty(), "every record is split off its arena");
        let len = field_len(write_len);
        if arena.capacity() < len {
            *arena = BytesMut::with_capacity(len.max(ARENA_BLOCK));
        }
        let buf = arena;
        buf.put_u8(RECORD_WRITE);
        encode_varint(write_len as u64, buf);
        if db != 0 {
            buf.put_u8(WRITE_DB);
            encode_varint(u64::from(db), buf);
        }
        for command in commands {
            buf.put_u8(WRITE_COMMAND);
            encode_varint(command_len(command) as u64, buf);
            for arg in &command.args {
                buf.put_u8(COMMAND_ARG);
                encode_varint(arg.len() as u64, buf);
                buf.put_slice(arg);
            }
        }
        if transaction {
            buf.put_u8(WRITE_TRANSACTION);
            buf.put_u8(1);
        }
        for arg in &streamed_pb {
            buf.put_u8(WRITE_STREAMED);
            encode_varint(arg.encoded_len() as u64, buf);
            // `buf` was sized for it: encoding cannot fail.
            let _ = arg.encode(buf);
        }
        if let Some(t) = &tenure_pb {
            buf.put_u8(WRITE_TENURE);
            encode_varint(t.encoded_len() as u64, buf);
            let _ = t.encode(buf);
        }
        buf.split().freeze()
    }

    /// The encoded record of a fragment (one copy of `data`).
    pub fn encode_fragment(seq: u32, data: &[u8]) -> Bytes {
        let message = pb::Record {
            kind: Some(pb::record::Kind::Fragment(pb::Fragment {
                seq,
                data: Bytes::copy_from_slice(data),
            })),
        };
        let mut buf = BytesMut::with_capacity(message.encoded_len());
        let _ = message.encode(&mut buf);
        buf.freeze()
    }

    pub fn encode(&self) -> Bytes {
        if let Record::Write(write) = self {
            return Record::encode_write_into(
                &mut BytesMut::new(),
                write.db,
                &write.commands,
                write.transaction,
                &write.streamed,
                write.tenure,
            );
        }
        let message = self.to_pb();
        let mut buf = BytesMut::with_capacity(message.encoded_len());
        // Encoding into a buffer with enough capacity cannot fail.
        let _ = message.encode(&mut buf);
        buf.freeze()
    }

    /// Decodes a record; its arguments are copied out of `payload`.
    pub fn decode(payload: &[u8], limits: RecordLimits) -> Result<Record, RecordError> {
        Record::check_len(payload.len(), limits)?;
        let message =
            pb::Record::decode(payload).map_err(|e| RecordError::Decode(e.to_string()))?;
        Record::from_pb(message, limits)
    }

    /// Decodes a record whose arguments share `payload`'s buffer (slices of
    /// it, no copies): the form for payloads already held as [`Bytes`].
    pub fn decode_shared(payload: &Bytes, limits: RecordLimits) -> Result<Record, RecordError> {
        Record::check_len(payload.len(), limits)?;
        if let Some(write) = plain_write(payload, limits) {
            return Ok(Record::Write(write));
        }
        let message =
            pb::Record::decode(payload.clone()).map_err(|e| RecordError::Decode(e.to_string()))?;
        Record::from_pb(message, limits)
    }

    /// Checks that `payload` decodes as a valid record, as [`Record::decode`]
    /// would, without building it; returns the snapshot marker if it is one.
    /// Write records are checked zero-copy (their arguments are slices of
    /// `payload`, dropped right away).
    pub fn check_shared(
        payload: &Bytes,
        limits: RecordLimits,
    ) -> Result<Option<SnapshotMarker>, RecordError> {
        Record::check_len(payload.len(), limits)?;
        let message =
            pb::Record::decode(payload.clone()).map_err(|e| RecordError::Decode(e.to_string()))?;
        match message.kind.ok_or(RecordError::Empty)? {
            pb::record::Kind::Write(w) => {
                check_commands(&w.commands, limits)?;
                check_streamed(&w.streamed, &w.commands)?;
                w.tenure.map(tenure_from_pb).transpose()?;
                Ok(None)
            }
            pb::record::Kind::Fragment(f) => {
                check_fragment(&f)?;
                Ok(None)
            }
            kind => match Record::from_pb(pb::Record { kind: Some(kind) }, limits)? {
                Record::Snapshot(marker) => Ok(Some(marker)),
                Record::Write(_) | Record::Fragment(_) | Record::Handoff(_) | Record::Void(_) => {
                    Ok(None)
                }
            },
        }
    }

    fn check_len(len: usize, limits: RecordLimits) -> Result<(), RecordError> {
        if len > limits.max_payload {
            return Err(RecordError::TooLarge {
                len,
                limit: limits.max_payload,
            });
        }
        Ok(())
    }

    fn from_pb(message: pb::Record, limits: RecordLimits) -> Result<Record, RecordError> {
        match message.kind.ok_or(RecordError::Empty)? {
            pb::record::Kind::Write(w) => {
                check_commands(&w.commands, limits)?;
                check_streamed(&w.streamed, &w.commands)?;
                let commands = w
                    .commands
                    .into_iter()
                    .map(|c| Command::new(c.args))
                    .collect();
                Ok(Record::Write(WriteRecord {
                    db: w.db,
                    commands,
                    transaction: w.transaction,
                    streamed: w.streamed.iter().map(StreamedArg::from_pb).collect(),
                    tenure: w.tenure.map(tenure_from_pb).transpose()?,
                }))
            }
            pb::record::Kind::Fragment(f) => {
                check_fragment(&f)?;
                Ok(Record::Fragment(Fragment {
                    seq: f.seq,
                    data: f.data,
                }))
            }
            pb::record::Kind::Snapshot(s) => {
                let scope = s.scope.map(scope_from_pb).transpose()?;
                if s.tenures.len() > usize::from(CLUSTER_SLOTS)
                    || s.handoffs.len() > usize::from(CLUSTER_SLOTS)
                {
                    return Err(RecordError::Decode(format!(
                        "snapshot marker has {} tenure ranges and {} handoffs (at most {CLUSTER_SLOTS} each)",
                        s.tenures.len(),
                        s.handoffs.len()
                    )));
                }
                let tenures = s
                    .tenures
                    .into_iter()
                    .map(|t| Ok((scope_from_pb(t.slots.unwrap_or_default())?, t.gen)))
                    .collect::<Result<Vec<_>, RecordError>>()?;
                let handoffs = s
                    .handoffs
                    .into_iter()
                    .map(handoff_from_pb)
                    .collect::<Result<Vec<_>, RecordError>>()?;
                Ok(Record::Snapshot(SnapshotMarker {
                    epoch: s.epoch,
                    rdb_bytes: s.rdb_bytes,
                    chunks: s.chunks,
                    replid: s.replid,
                    offset: s.offset,
                    scope,
                    tenures,
                    handoffs,
                }))
            }
            pb::record::Kind::Handoff(h) => Ok(Record::Handoff(handoff_from_pb(h)?)),
            pb::record::Kind::Void(v) => Ok(Record::Void(SlotVoid {
                slot: slot_from_pb("slot void", v.slot)?,
                gen: v.gen,
            })),
        }
    }

    fn to_pb(&self) -> pb::Record {
        let kind = match self {
            Record::Write(w) => pb::record::Kind::Write(pb::Write {
                db: w.db,
                commands: w
                    .commands
                    .iter()
                    .map(|c| pb::Command {
                        args: c.args.clone(),
                    })
                    .collect(),
                transaction: w.transaction,
                streamed: w.streamed.iter().copied().map(StreamedArg::to_pb).collect(),
                tenure: w.tenure.map(|t| pb::SlotTenure {
                    slot: u32::from(t.slot),
                    gen: t.gen,
                }),
            }),
            Record::Handoff(h) => pb::record::Kind::Handoff(handoff_to_pb(h)),
            Record::Void(v) => pb::record::Kind::Void(pb::SlotVoid {
                slot: u32::from(v.slot),
                gen: v.gen,
            }),
            Record::Fragment(f) => pb::record::Kind::Fragment(pb::Fragment {
                seq: f.seq,
                data: f.data.clone(),
            }),
            Record::Snapshot(s) => pb::record::Kind::Snapshot(pb::SnapshotMarker {
                epoch: s.epoch,
                rdb_bytes: s.rdb_bytes,
                chunks: s.chunks,
                replid: s.replid.clone(),
                offset: s.offset,
                scope: s.scope.as_ref().map(scope_to_pb),
                tenures: s
                    .tenures
                    .iter()
                    .map(|(slots, gen)| pb::TenureRange {
                        slots: Some(scope_to_pb(slots)),
                        gen: *gen,
                    })
                    .collect(),
                handoffs: s.handoffs.iter().map(handoff_to_pb).collect(),
            }),
        };
        pb::Record { kind: Some(kind) }
    }
}

fn scope_to_pb(slots: &SlotRanges) -> pb::SlotScope {
    pb::SlotScope {
        ranges: slots
            .ranges()
            .iter()
            .map(|&(first, last)| pb::SlotRange {
                first: u32::from(first),
                last: u32::from(last),
            })
            .collect(),
    }
}

fn slot_from_pb(what: &'static str, slot: u32) -> Result<u16, RecordError> {
    if slot >= u32::from(CLUSTER_SLOTS) {
        return Err(RecordError::BadSlot { what, slot });
    }
    // Below CLUSTER_SLOTS: fits in u16.
    Ok(slot as u16)
}

fn tenure_from_pb(t: pb::SlotTenure) -> Result<SlotTenure, RecordError> {
    Ok(SlotTenure {
        slot: slot_from_pb("write tenure", t.slot)?,
        gen: t.gen,
    })
}

fn handoff_from_pb(h: pb::SlotHandoff) -> Result<SlotHandoff, RecordError> {
    Ok(SlotHandoff {
        slot: slot_from_pb("slot handoff", h.slot)?,
        to: h.to,
        gen: h.gen,
    })
}

fn handoff_to_pb(h: &SlotHandoff) -> pb::SlotHandoff {
    pb::SlotHandoff {
        slot: u32::from(h.slot),
        to: h.to,
        gen: h.gen,
    }
}

fn scope_from_pb(scope: pb::SlotScope) -> Result<SlotRanges, RecordError> {
    let mut ranges = Vec::with_capacity(scope.ranges.len().min(usize::from(CLUSTER_SLOTS)));
    for r in scope.ranges {
        if r.first > r.last || r.last >= u32::from(CLUSTER_SLOTS) {
            return Err(RecordError::BadSlotRange {
                first: r.first,
                last: r.last,
            });
        }
        // Both fit in u16: checked against CLUSTER_SLOTS above.
        ranges.push((r.first as u16, r.last as u16));
    }
    Ok(SlotRanges::from_ranges(ranges))
}

/// The protobuf tags (field number << 3 | wire type: 0 varint, 2 bytes) of
/// the write record's fields, for the hand-written encoder and decoder
/// (`proto/ferry.proto`).
mod tag {
    pub const RECORD_WRITE: u8 = 1 << 3 | 2;
    pub const WRITE_DB: u8 = 1 << 3;
    pub const WRITE_COMMAND: u8 = 2 << 3 | 2;
    pub const WRITE_TRANSACTION: u8 = 3 << 3;
    pub const WRITE_STREAMED: u8 = 4 << 3 | 2;
    pub const WRITE_TENURE: u8 = 5 << 3 | 2;
    pub const COMMAND_ARG: u8 = 1 << 3 | 2;
    pub const TENURE_SLOT: u8 = 1 << 3;
    pub const TENURE_GEN: u8 = 2 << 3;
}

/// The write record of `payload` when it is laid out as
/// [`Record::encode_write_into`] lays out a write without streamed
/// arguments, and valid; `None` for anything else (another kind, streamed
/// arguments, another field order, an unknown field, an invalid write), which
/// the caller decodes with prost instead, errors included.
///
/// This runs once per entry an applier reads. Prost builds each command's
/// arguments by pushing onto a vector that starts empty; this counts them
/// first, so each command costs one allocation. Whatever it accepts, prost
/// decodes to the same record (a test checks it on mutated payloads).
fn plain_write(payload: &Bytes, limits: RecordLimits) -> Option<WriteRecord> {
    use tag::*;
    let bytes = &payload[..];
    let mut pos = 0;
    if *bytes.first()? != RECORD_WRITE {
        return None;
    }
    pos += 1;
    let len = plain_len(bytes, &mut pos)?;
    if len != bytes.len() - pos {
        return None;
    }
    let mut write = WriteRecord {
        db: 0,
        commands: Vec::with_capacity(1),
        transaction: false,
        streamed: Vec::new(),
        tenure: None,
    };
    if bytes.get(pos) == Some(&WRITE_DB) {
        pos += 1;
        write.db = u32::try_from(varint(bytes, &mut pos)?).ok()?;
    }
    while bytes.get(pos) == Some(&WRITE_COMMAND) {
        pos += 1;
        let len = plain_len(bytes, &mut pos)?;
        let end = pos.checked_add(len).filter(|&end| end <= bytes.len())?;
        // First pass: count and check the arguments.
        let (mut at, mut count) = (pos, 0usize);
        while at < end {
            if bytes[at] != COMMAND_ARG {
                return None;
            }
            at += 1;
            let len = plain_len(&bytes[..end], &mut at)?;
            at = at.checked_add(len).filter(|&next| next <= end)?;
            count += 1;
        }
        if count == 0 || write.commands.len() == limits.max_commands {
            return None;
        }
        let mut args = Vec::with_capacity(count);
        while pos < end {
            pos += 1;
            // Read above: within `end`.
            let len = plain_len(bytes, &mut pos)?;
            args.push(payload.slice(pos..pos + len));
            pos += len;
        }
        write.commands.push(Command::new(args));
    }
    if write.commands.is_empty() {
        return None;
    }
    if bytes.get(pos) == Some(&WRITE_TRANSACTION) {
        pos += 1;
        write.transaction = varint(bytes, &mut pos)? != 0;
    }
    if bytes.get(pos) == Some(&WRITE_TENURE) {
        pos += 1;
        let len = plain_len(bytes, &mut pos)?;
        let end = pos.checked_add(len).filter(|&end| end == bytes.len())?;
        let (mut slot, mut gen) = (0u64, 0u64);
        if bytes.get(pos) == Some(&TENURE_SLOT) && pos < end {
            pos += 1;
            slot = varint(&bytes[..end], &mut pos)?;
        }
        if bytes.get(pos) == Some(&TENURE_GEN) && pos < end {
            pos += 1;
            gen = varint(&bytes[..end], &mut pos)?;
        }
        if pos != end {
            return None;
        }
        write.tenure = Some(SlotTenure {
            slot: u16::try_from(slot)
                .ok()
                .filter(|&slot| slot < CLUSTER_SLOTS)?,
            gen,
        });
    }
    (pos == bytes.len()).then_some(write)
}

/// A varint as protobuf writes it (at most 10 bytes, no bits past 64).
fn varint(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in 0..10 {
        let byte = *bytes.get(*pos)?;
        *pos += 1;
        if shift == 9 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << (7 * shift);
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// A length prefix that fits in what is left of `bytes`.
fn plain_len(bytes: &[u8], pos: &mut usize) -> Option<usize> {
    let len = usize::try_from(varint(bytes, pos)?).ok()?;
    (len <= bytes.len() - *pos).then_some(len)
}

/// A write must carry 1..=`max_commands` commands, none of them empty.
fn check_commands(commands: &[pb::Command], limits: RecordLimits) -> Result<(), RecordError> {
    if commands.is_empty() || commands.len() > limits.max_commands {
        return Err(RecordError::BadCommandCount(
            commands.len(),
            limits.max_commands,
        ));
    }
    if let Some(index) = commands.iter().position(|c| c.args.is_empty()) {
        return Err(RecordError::EmptyCommand(index));
    }
    Ok(())
}

impl StreamedArg {
    fn to_pb(self) -> pb::StreamedArg {
        pb::StreamedArg {
            command: self.command,
            arg: self.arg,
            len: self.len,
            fragments: self.fragments,
        }
    }

    fn from_pb(arg: &pb::StreamedArg) -> StreamedArg {
        StreamedArg {
            command: arg.command,
            arg: arg.arg,
            len: arg.len,
            fragments: arg.fragments,
        }
    }
}

/// Streamed arguments name existing, empty, non-first arguments, in strictly
/// increasing (command, arg) order, each with 1..=len fragments.
fn check_streamed(
    streamed: &[pb::StreamedArg],
    commands: &[pb::Command],
) -> Result<(), RecordError> {
    let mut previous: Option<(u32, u32)> = None;
    let mut fragments = 0u64;
    for (index, arg) in streamed.iter().enumerate() {
        let bad = |what: String| RecordError::BadStreamedArg { index, what };
        let place = commands
            .get(arg.command as usize)
            .and_then(|command| command.args.get(arg.arg as usize));
        match place {
            None => {
                return Err(bad(format!(
                    "argument {} of command {} does not exist",
                    arg.arg, arg.command
                )))
            }
            Some(_) if arg.arg == 0 => return Err(bad("a command name is never streamed".into())),
            Some(held) if !held.is_empty() => {
                return Err(bad(format!(
                    "its place holds {} bytes instead of none",
                    held.len()
                )))
            }
            Some(_) => {}
        }
        if previous.is_some_and(|p| p >= (arg.command, arg.arg)) {
            return Err(bad("out of order".into()));
        }
        previous = Some((arg.command, arg.arg));
        if arg.fragments == 0 || u64::from(arg.fragments) > arg.len {
            return Err(bad(format!(
                "{} fragments for {} bytes",
                arg.fragments, arg.len
            )));
        }
        fragments += u64::from(arg.fragments);
    }
    if fragments > u64::from(u32::MAX) {
        return Err(RecordError::BadStreamedArg {
            index: streamed.len().saturating_sub(1),
            what: format!("{fragments} fragments in one entry"),
        });
    }
    Ok(())
}

fn check_fragment(fragment: &pb::Fragment) -> Result<(), RecordError> {
    if fragment.data.is_empty() {
        return Err(RecordError::EmptyFragment { seq: fragment.seq });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_with_a_bad_slot_range_is_a_typed_error() {
        for (first, last) in [(5, 4), (0, 16384), (u32::MAX, u32::MAX)] {
            let pb = pb::Record {
                kind: Some(pb::record::Kind::Snapshot(pb::SnapshotMarker {
                    epoch: 1,
                    scope: Some(pb::SlotScope {
                        ranges: vec![pb::SlotRange { first, last }],
                    }),
                    ..Default::default()
                })),
            };
            let err = Record::decode(&pb.encode_to_vec(), RecordLimits::default()).unwrap_err();
            assert_eq!(err, RecordError::BadSlotRange { first, last });
        }
    }

    #[test]
    fn a_slot_void_with_a_bad_slot_is_a_typed_error() {
        for slot in [16384, u32::MAX] {
            let pb = pb::Record {
                kind: Some(pb::record::Kind::Void(pb::SlotVoid { slot, gen: 1 })),
            };
            let payload = Bytes::from(pb.encode_to_vec());
            let expected = || RecordError::BadSlot {
                what: "slot void",
                slot,
            };
            assert_eq!(
                Record::decode(&payload, RecordLimits::default()),
                Err(expected())
            );
            assert_eq!(
                Record::check_shared(&payload, RecordLimits::default()),
                Err(expected())
            );
        }
        // A record of a kind this build does not know (a newer WAL read by
        // an older ferry decodes so) is the typed "no kind" error.
        let unknown = [0x32u8, 0x00]; // field 6, an empty message
        assert_eq!(
            Record::decode(&unknown, RecordLimits::default()),
            Err(RecordError::Empty)
        );
    }

    #[test]
    fn round_trips() {
        let records = [
            Record::Write(WriteRecord {
                db: 3,
                commands: vec![
                    Command::from_parts(["INCR", "counter"]),
                    Command::from_parts([&b"SET"[..], b"k\xff\x00", b""]),
                ],
                transaction: true,
                streamed: vec![],
                tenure: Some(SlotTenure {
                    slot: 16383,
                    gen: 7,
                }),
            }),
            Record::Handoff(SlotHandoff {
                slot: 42,
                to: 3,
                gen: 2,
            }),
            Record::Void(SlotVoid {
                slot: 16383,
                gen: 5,
            }),
            Record::Write(WriteRecord {
                db: 0,
                commands: vec![
                    Command::from_parts(["SET", "big", "", "EX", "10"]),
                    Command::from_parts(["APPEND", "k", ""]),
                ],
                transaction: true,
                streamed: vec![
                    StreamedArg {
                        command: 0,
                        arg: 2,
                        len: 300,
                        fragments: 3,
                    },
                    StreamedArg {
                        command: 1,
                        arg: 2,
                        len: 1,
                        fragments: 1,
                    },
                ],
                tenure: None,
            }),
            Record::Fragment(Fragment {
                seq: 4,
                data: Bytes::from_static(b"piece"),
            }),
            Record::Snapshot(SnapshotMarker {
                epoch: 7,
                rdb_bytes: 1 << 30,
                chunks: 16384,
                replid: "a".repeat(40),
                offset: 12345,
                scope: Some(SlotRanges::from_ranges([(0, 5460), (16383, 16383)])),
                tenures: Vec::new(),
                handoffs: Vec::new(),
            }),
        ];
        for record in records {
            let bytes = record.encode();
            assert_eq!(Record::decode(&bytes, RecordLimits::default()), Ok(record));
        }
    }

    #[test]
    fn direct_write_encoding_matches_prost() {
        let big_arg = Bytes::from(vec![7u8; 300]);
        let writes = [
            (0, vec![Command::from_parts(["SET", "k", "v"])], false),
            (
                3,
                vec![
                    Command::from_parts(["INCR", "counter"]),
                    Command::new(vec![
                        Bytes::from_static(b"SET"),
                        big_arg.clone(),
                        Bytes::new(),
                    ]),
                ],
                true,
            ),
            (u32::MAX, vec![Command::new(vec![big_arg; 200])], false),
        ];
        for (db, commands, transaction) in writes {
            let record = Record::Write(WriteRecord {
                db,
                commands,
                transaction,
                streamed: vec![],
                tenure: None,
            });
            let direct = record.encode();
            assert_eq!(&direct[..], &record.to_pb().encode_to_vec()[..]);
            let shared = Record::decode_shared(&direct, RecordLimits::default());
            assert_eq!(shared.as_ref(), Ok(&record));
            assert_eq!(
                Record::check_shared(&direct, RecordLimits::default()),
                Ok(None)
            );
        }
        let marker = SnapshotMarker {
            epoch: 2,
            rdb_bytes: 9,
            chunks: 1,
            replid: "r".repeat(40),
            offset: 5,
            scope: None,
            tenures: Vec::new(),
            handoffs: Vec::new(),
        };
        let payload = Record::Snapshot(marker.clone()).encode();
        assert_eq!(
            Record::check_shared(&payload, RecordLimits::default()),
            Ok(Some(marker))
        );
    }

    #[test]
    fn refuses_bad_payloads() {
        let limits = RecordLimits {
            max_payload: 64,
            max_commands: 2,
        };
        assert!(matches!(
            Record::decode(&[0u8; 65], limits),
            Err(RecordError::TooLarge { .. })
        ));
        assert_eq!(Record::decode(&[], limits), Err(RecordError::Empty));
        assert!(matches!(
            Record::decode(&[0x0a, 0x05, 0x01], limits),
            Err(RecordError::Decode(_))
        ));
        let three = Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::from_parts(["PING"]); 3],
            transaction: true,
            streamed: vec![],
            tenure: None,
        });
        assert_eq!(
            Record::decode(&three.encode(), limits),
            Err(RecordError::BadCommandCount(3, 2))
        );
        let empty = Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::new(vec![])],
            transaction: false,
            streamed: vec![],
            tenure: None,
        });
        assert_eq!(
            Record::decode(&empty.encode(), limits),
            Err(RecordError::EmptyCommand(0))
        );
        // The shared forms refuse exactly the same payloads.
        let bad: [Bytes; 5] = [
            Bytes::from(vec![0u8; 65]),
            Bytes::new(),
            Bytes::from_static(&[0x0a, 0x05, 0x01]),
            three.encode(),
            empty.encode(),
        ];
        for payload in bad {
            let copied = Record::decode(&payload, limits).map(|_| ());
            assert!(copied.is_err());
            assert_eq!(Record::decode_shared(&payload, limits).map(|_| ()), copied);
            assert_eq!(Record::check_shared(&payload, limits).map(|_| ()), copied);
        }
    }

    #[test]
    fn refuses_bad_streamed_arguments_and_fragments() {
        let write = |args: &[&str], streamed: Vec<StreamedArg>| {
            Record::Write(WriteRecord {
                db: 0,
                commands: vec![Command::from_parts(args)],
                transaction: false,
                streamed,
                tenure: None,
            })
            .encode()
        };
        let arg = |arg: u32, len: u64, fragments: u32| StreamedArg {
            command: 0,
            arg,
            len,
            fragments,
        };
        let good = write(&["SET", "k", ""], vec![arg(2, 10, 2)]);
        assert!(Record::decode(&good, RecordLimits::default()).is_ok());
        // The direct encoding is prost's.
        let decoded = Record::decode(&good, RecordLimits::default()).unwrap();
        assert_eq!(&good[..], &decoded.to_pb().encode_to_vec()[..]);
        let bad = [
            write(&["SET", "k", ""], vec![arg(3, 10, 1)]),
            write(&["SET", "k", "v"], vec![arg(2, 10, 1)]),
            write(&["", "k", "v"], vec![arg(0, 10, 1)]),
            write(&["SET", "", ""], vec![arg(2, 10, 1), arg(1, 10, 1)]),
            write(&["SET", "k", ""], vec![arg(2, 10, 0)]),
            write(&["SET", "k", ""], vec![arg(2, 2, 3)]),
            Record::encode_fragment(3, b""),
        ];
        for payload in bad {
            let error = Record::decode(&payload, RecordLimits::default()).unwrap_err();
            assert!(
                matches!(
                    error,
                    RecordError::BadStreamedArg { .. } | RecordError::EmptyFragment { .. }
                ),
                "{error}"
            );
            let shared = Record::check_shared(&payload, RecordLimits::default());
            assert_eq!(shared.map(|_| ()), Err(error));
        }
        let fragment = Record::encode_fragment(7, b"data");
        assert_eq!(
            Record::decode_shared(&fragment, RecordLimits::default()),
            Ok(Record::Fragment(Fragment {
                seq: 7,
                data: Bytes::from_static(b"data")
            }))
        );
    }

    mod plain {
        use super::*;
        use proptest::prelude::*;

        fn writes() -> impl Strategy<Value = WriteRecord> {
            let arg = proptest::collection::vec(any::<u8>(), 0..200).prop_map(Bytes::from);
            let command = proptest::collection::vec(arg, 1..6).prop_map(Command::new);
            let tenure = proptest::option::of(
                (0..CLUSTER_SLOTS, any::<u64>()).prop_map(|(slot, gen)| SlotTenure { slot, gen }),
            );
            (
                prop_oneof![Just(0u32), any::<u32>()],
                proptest::collection::vec(command, 1..5),
                any::<bool>(),
                tenure,
            )
                .prop_map(|(db, commands, transaction, tenure)| WriteRecord {
                    db,
                    commands,
                    transaction,
                    streamed: Vec::new(),
                    tenure,
                })
        }

        /// What prost makes of `payload`, as `decode_shared` did before the
        /// plain path.
        fn by_prost(payload: &Bytes, limits: RecordLimits) -> Result<Record, RecordError> {
            Record::check_len(payload.len(), limits)?;
            let message = pb::Record::decode(payload.clone())
                .map_err(|e| RecordError::Decode(e.to_string()))?;
            Record::from_pb(message, limits)
        }

        proptest! {
            #[test]
            fn every_encoded_write_takes_the_plain_path(write in writes()) {
                let payload = Record::Write(write.clone()).encode();
                prop_assert_eq!(plain_write(&payload, RecordLimits::default()), Some(write.clone()));
                prop_assert_eq!(by_prost(&payload, RecordLimits::default()), Ok(Record::Write(write)));
            }

            #[test]
            fn what_the_plain_path_accepts_prost_reads_the_same(
                write in writes(),
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
            ) {
                let mut bytes = Record::Write(write).encode().to_vec();
                for (at, byte, how) in edits {
                    if bytes.is_empty() {
                        break;
                    }
                    let at = at.index(bytes.len());
                    match how {
                        0 => bytes[at] = byte,
                        1 => bytes.truncate(at),
                        _ => bytes.insert(at, byte),
                    }
                }
                let payload = Bytes::from(bytes);
                let limits = RecordLimits { max_payload: 1 << 20, max_commands: 3 };
                if let Some(write) = plain_write(&payload, limits) {
                    prop_assert_eq!(by_prost(&payload, limits), Ok(Record::Write(write)));
                }
                prop_assert_eq!(Record::decode_shared(&payload, limits), by_prost(&payload, limits));
            }
        }

        #[test]
        fn other_layouts_go_to_prost() {
            let limits = RecordLimits::default();
            let streamed = Record::Write(WriteRecord {
                db: 0,
                commands: vec![Command::from_parts(["SET", "k", ""])],
                transaction: false,
                streamed: vec![StreamedArg {
                    command: 0,
                    arg: 2,
                    len: 10,
                    fragments: 1,
                }],
                tenure: None,
            });
            let set = Command::from_parts(["SET", "k", "v"]);
            // The fields in another order than ours: db after the command.
            let mut reordered = pb::Write {
                commands: vec![pb::Command {
                    args: set.args.clone(),
                }],
                ..Default::default()
            }
            .encode_to_vec();
            reordered.extend_from_slice(&[0x08, 0x05]);
            let mut reordered_record = vec![0x0a, reordered.len() as u8];
            reordered_record.extend_from_slice(&reordered);
            let reordered_record = Bytes::from(reordered_record);
            for payload in [
                streamed.encode(),
                Record::encode_fragment(0, b"x"),
                Record::Handoff(SlotHandoff {
                    slot: 1,
                    to: 2,
                    gen: 3,
                })
                .encode(),
                reordered_record.clone(),
            ] {
                assert_eq!(plain_write(&payload, limits), None);
            }
            assert_eq!(
                Record::decode_shared(&streamed.encode(), limits),
                Ok(streamed)
            );
            assert_eq!(
                Record::decode_shared(&reordered_record, limits),
                Ok(Record::Write(WriteRecord {
                    db: 5,
                    commands: vec![set],
                    transaction: false,
                    streamed: Vec::new(),
                    tenure: None,
                }))
            );
        }
    }
}
