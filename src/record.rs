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

use bytes::{Bytes, BytesMut};
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

    pub fn encode(&self) -> Bytes {
        let message = self.to_pb();
        let mut buf = BytesMut::with_capacity(message.encoded_len());
        // Encoding into a buffer with enough capacity cannot fail.
        let _ = message.encode(&mut buf);
        buf.freeze()
    }

    pub fn decode(payload: &[u8], limits: RecordLimits) -> Result<Record, RecordError> {
        if payload.len() > limits.max_payload {
            return Err(RecordError::TooLarge {
                len: payload.len(),
                limit: limits.max_payload,
            });
        }
        let message =
            pb::Record::decode(payload).map_err(|e| RecordError::Decode(e.to_string()))?;
        match message.kind.ok_or(RecordError::Empty)? {
            pb::record::Kind::Write(w) => {
                if w.commands.is_empty() || w.commands.len() > limits.max_commands {
                    return Err(RecordError::BadCommandCount(
                        w.commands.len(),
                        limits.max_commands,
                    ));
                }
                let mut commands = Vec::with_capacity(w.commands.len());
                for (i, c) in w.commands.into_iter().enumerate() {
                    if c.args.is_empty() {
                        return Err(RecordError::EmptyCommand(i));
                    }
                    commands.push(Command::new(c.args));
                }
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
    }
}
