//! The replication record: what one WAL entry holds, on the listener and on
//! the drainer, and what is shipped between them (see `proto/ferry.proto`).
//!
//! What flows in: a [`ReplEntry`] from the source's replication stream, or a
//! snapshot marker. What flows out: the protobuf bytes stored as the WAL
//! entry's payload, and back.
//!
//! Decoding checks the payload against [`RecordLimits`] (a corrupt or
//! hostile payload cannot ask for more than its own length anyway, prost
//! only allocates what is present) and that a write carries at least one
//! non-empty command.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_varint, encoded_len_varint};
use prost::Message;

use crate::redis::command::Command;
use crate::redis::psync::ReplEntry;

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
}

/// One entry of the source's stream: a command, or one MULTI/EXEC's commands.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteRecord {
    pub db: u32,
    pub commands: Vec<Command>,
    pub transaction: bool,
}

/// The state at this log id is snapshot `epoch`, consistent with the source
/// at (`replid`, `offset`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMarker {
    pub epoch: u64,
    pub rdb_bytes: u64,
    pub chunks: u64,
    pub replid: String,
    pub offset: u64,
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
}

impl Record {
    /// The record for an entry of the source's replication stream.
    pub fn from_repl_entry(entry: &ReplEntry) -> Record {
        Record::Write(WriteRecord {
            db: entry.db,
            commands: entry.commands.clone(),
            transaction: entry.transaction,
        })
    }

    /// The encoded record of a write, built straight from borrowed commands:
    /// the same bytes as `Record::Write(..).encode()` (prost's field order,
    /// defaults left out), without cloning the commands into messages first.
    /// This runs once per replication entry on the listener.
    pub fn encode_write(db: u32, commands: &[Command], transaction: bool) -> Bytes {
        // Protobuf tags: field number << 3 | wire type (0 varint, 2 bytes).
        const RECORD_WRITE: u8 = 1 << 3 | 2;
        const WRITE_DB: u8 = 1 << 3;
        const WRITE_COMMAND: u8 = 2 << 3 | 2;
        const WRITE_TRANSACTION: u8 = 3 << 3;
        const COMMAND_ARG: u8 = 1 << 3 | 2;
        let field_len = |len: usize| 1 + encoded_len_varint(len as u64) + len;
        let command_len = |command: &Command| -> usize {
            command.args.iter().map(|arg| field_len(arg.len())).sum()
        };
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
        let mut buf = BytesMut::with_capacity(field_len(write_len));
        buf.put_u8(RECORD_WRITE);
        encode_varint(write_len as u64, &mut buf);
        if db != 0 {
            buf.put_u8(WRITE_DB);
            encode_varint(u64::from(db), &mut buf);
        }
        for command in commands {
            buf.put_u8(WRITE_COMMAND);
            encode_varint(command_len(command) as u64, &mut buf);
            for arg in &command.args {
                buf.put_u8(COMMAND_ARG);
                encode_varint(arg.len() as u64, &mut buf);
                buf.put_slice(arg);
            }
        }
        if transaction {
            buf.put_u8(WRITE_TRANSACTION);
            buf.put_u8(1);
        }
        buf.freeze()
    }

    pub fn encode(&self) -> Bytes {
        if let Record::Write(write) = self {
            return Record::encode_write(write.db, &write.commands, write.transaction);
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
                Ok(None)
            }
            kind => match Record::from_pb(pb::Record { kind: Some(kind) }, limits)? {
                Record::Snapshot(marker) => Ok(Some(marker)),
                Record::Write(_) => Ok(None),
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
                let commands = w
                    .commands
                    .into_iter()
                    .map(|c| Command::new(c.args))
                    .collect();
                Ok(Record::Write(WriteRecord {
                    db: w.db,
                    commands,
                    transaction: w.transaction,
                }))
            }
            pb::record::Kind::Snapshot(s) => Ok(Record::Snapshot(SnapshotMarker {
                epoch: s.epoch,
                rdb_bytes: s.rdb_bytes,
                chunks: s.chunks,
                replid: s.replid,
                offset: s.offset,
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
            }),
            Record::Snapshot(s) => pb::record::Kind::Snapshot(pb::SnapshotMarker {
                epoch: s.epoch,
                rdb_bytes: s.rdb_bytes,
                chunks: s.chunks,
                replid: s.replid.clone(),
                offset: s.offset,
            }),
        };
        pb::Record { kind: Some(kind) }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
            }),
            Record::Snapshot(SnapshotMarker {
                epoch: 7,
                rdb_bytes: 1 << 30,
                chunks: 16384,
                replid: "a".repeat(40),
                offset: 12345,
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
        });
        assert_eq!(
            Record::decode(&three.encode(), limits),
            Err(RecordError::BadCommandCount(3, 2))
        );
        let empty = Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::new(vec![])],
            transaction: false,
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
}
