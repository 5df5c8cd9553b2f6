//! Shipping WAL entries from a listener's WAL to a drainer's WAL over gRPC.
//!
//! In (listener side, [`Shipper`]): durable entries and snapshot chunks of one
//! partition of the listener's [`Wal`](crate::wal::Wal), and fallback
//! snapshots from a [`SnapshotProvider`]. Out: the same entries, at the same
//! log ids, durable in the drainer's WAL ([`DrainerService`]), and the
//! drainer's acks recorded as the listener WAL's downstream acks (which is
//! what lets the listener's retention trim them).
//!
//! # Wire protocol (version 2, `proto/ferry.proto`, service `Drainer`)
//!
//! One bidirectional stream `Ship` per (listener, partition, drainer):
//!
//! ```text
//! listener                                         drainer
//!   Hello { listener_id, secret, partition,  ──▶   auth (constant-time secret compare)
//!           protocol_version, incarnation }        refuse: UNAUTHENTICATED (unknown id, bad secret)
//!                                                          FAILED_PRECONDITION (version)
//!                                                          PERMISSION_DENIED (partition owned by another listener)
//!                                                          ALREADY_EXISTS (partition held by another listener)
//!                                          ◀──   Welcome { durable_log_id = D, snapshot_epoch,
//!                                                          owner, incarnation }
//!   [SnapshotChunk { epoch, seq 0..n, data, last }]*   (before a marker entry; a full resync's
//!                                                         may start while it is being stored)
//!   EntryBatch { first_log_id, count, raw_len, snappy_entries } ──▶ append_at, fsync
//!                                          ◀──   Ack { durable_log_id }   (after each durable append)
//! ```
//!
//! - `EntryBatch.snappy_entries` is the snappy raw-block compression of
//!   `raw_len` bytes: `count` protobuf `WireEntry` messages (log id, created
//!   time, flags, source replid/offset/db, payload), each prefixed by its
//!   length as a varint. Entry `i` must carry `first_log_id + i`.
//! - The payload of every entry is a [`Record`](crate::record::Record); a
//!   `Record::Snapshot` payload is a *snapshot marker*: the partition's state
//!   at that id is the RDB of the marker's epoch. The chunks of that epoch
//!   (`seq` 0..`chunks`, `last` on the final one, each snappy-compressed) are
//!   sent on the same stream before the marker's batch; a marker is always
//!   alone in its batch. The chunks of a full resync the listener is storing
//!   ([`SnapshotProvider::resync_epoch`]) go as soon as they are durable, once
//!   the shipper has sent every entry: all but the newest, which is sent
//!   with `last` right before the marker, when its count is known. Entries
//!   may come between chunks of a transfer (rule 4 tracks the transfer
//!   alone). A resync that fails leaves its chunks in the drainer's
//!   `writing` epoch: they are never loaded (no marker names them) and the
//!   next transfer's `seq 0` deletes them.
//! - The stream carries nothing else. Either side ends it on any error; the
//!   listener reconnects and starts over with `Hello`.
//! - The transport is HTTP/2, plain or TLS (a drainer with `[drainer.tls]`,
//!   listeners with `https://` endpoints, optionally mutual TLS; module
//!   [`tls`]). The `Hello` secret is checked either way.
//!
//! # History
//!
//! Log ids only mean something within one history: one listener's log of a
//! partition, from the WAL dir that created it. A listener whose WAL dir was
//! deleted and started again numbers its new log from 1 again; a drainer
//! whose WAL dir was swapped for another drainer's holds ids of another
//! listener's log. So every WAL partition has a history record
//! ([`PartitionHistory`](crate::wal::PartitionHistory)):
//!
//! - On the listener: the listener id that created the log (the *owner*)
//!   and a random, non-zero *incarnation*, created with the log and kept
//!   across restarts. A listener refuses to start on a log another listener
//!   id created. `Hello.incarnation` carries it.
//! - On the drainer: the listener id that *claimed* the partition (the
//!   first one whose `Hello` it accepted for it, recorded durably before the
//!   `Welcome`) and the incarnation of that listener's log it holds.
//!   A `Hello` of any other listener id for the partition is refused with
//!   `PERMISSION_DENIED` naming both ids ([`ShipError::PartitionOwned`]),
//!   shown in the drainer's status, before it can end the owner's stream or
//!   write anything: another listener can never reset the partition.
//!   `Welcome` carries owner and incarnation.
//! - Same incarnation: the rules below, unchanged. Different (or none): the
//!   drainer's ids are not the listener's, so the listener ignores `D`,
//!   records no ack from it, and sends a snapshot first: its log's first
//!   marker if that is its first entry and its chunks are stored, a
//!   fallback snapshot otherwise. The drainer refuses any entry but a
//!   marker from such a stream (`FAILED_PRECONDITION`,
//!   [`ShipError::HistoryMismatch`]); the marker resets the partition and
//!   replaces its history record in one atomic write, so the drainer holds
//!   either the old log under the old history or the new marker under the
//!   new one, never entries of one spliced onto the other.
//! - A drainer's own ids must only grow (its appliers and the targets'
//!   checkpoints count on it), but a new history may start below them. So
//!   the drainer keeps local ids = listener ids + `id_base`, and local
//!   snapshot epochs = listener epochs + `epoch_base`, both stored in the
//!   history record: 0 while they can be (a drainer that only ever followed
//!   one log has the listener's ids), raised just enough at a history reset
//!   to stay above what the partition held. `Welcome`, acks and errors speak
//!   the listener's numbering; the drainer's WAL, its appliers and `ferry
//!   status`'s drainer rows the local one. A marker is stored with its local
//!   epoch.
//! - A drainer partition whose log is still empty adopts the incarnation of
//!   its owner's first `Hello` (nothing could be spliced onto it), so a new
//!   drainer streams from id 1 without a snapshot when the listener still
//!   holds its log from the start.
//!
//! Older peers and data dirs: a protocol-1 peer is refused
//! (`FAILED_PRECONDITION`, "protocol version 1 is not supported"): upgrade
//! both ends; the listener's WAL keeps the stream meanwhile (up to
//! `wal-ttl`). A listener WAL written before history records gets a new
//! incarnation on first start; a drainer partition written before them is
//! claimed by the first configured listener that connects and holds no
//! known incarnation: each such drainer partition gets one snapshot after
//! the upgrade, never an unchecked resume. (A drainer partition that old is
//! trusted to belong to the listener that claims it, the one thing that
//! cannot be checked.)
//!
//! # Rules (drainer side)
//!
//! 0. The partition's owner and history are checked first (section
//!    "History").
//! 1. One active stream per partition. A new stream of the same listener
//!    replaces the old one (the old one is cancelled between two messages,
//!    never in the middle of a WAL write, and the new one waits for it to
//!    finish); a stream of another listener is refused.
//! 2. Entries keep the listener's ids (relay convention 5, docs/ARCHITECTURE.md;
//!    plus the partition's id base, section "History"):
//!    [`Wal::append_at`](crate::wal::Wal::append_at) at exactly `durable + 1`.
//!    Entries at or below `durable` are duplicates of what a resumed stream
//!    re-sent and are skipped (acked again). A non-marker entry past
//!    `durable + 1` is a gap: refused with `OUT_OF_RANGE`, the listener
//!    reconnects and resumes from the new `Welcome`.
//! 3. A marker at `M > durable` (it may jump: that is the fallback snapshot)
//!    needs the complete chunk set of its epoch received earlier on the same
//!    stream; then [`Wal::reset_partition`](crate::wal::Wal::reset_partition)
//!    drops the old log and stores the marker as entry `M` in one atomic
//!    write, so no crash can leave a log whose entries lack their snapshot.
//! 4. Snapshot chunk `seq 0` of an epoch starts a transfer (stale partial
//!    chunks of an unfinished epoch are deleted, the epoch's state becomes
//!    `writing`); chunks must follow in order within the stream; `last` makes
//!    the epoch `complete`. Chunks are durable through the same group commit
//!    as entries, but only entries are acked.
//! 5. `Ack { durable_log_id }` is sent after every durable append, so the
//!    listener's downstream ack never passes what the drainer fsynced
//!    (`acked <= durable`, relay convention 8). A stream keeps up to 16
//!    appends queued in the WAL ([`Wal::submit_append_at`](crate::wal::Wal::submit_append_at))
//!    so that consecutive batches share a group commit; a marker or a chunk
//!    first waits for all of them. Duplicates and gaps are judged against
//!    the last *queued* id.
//! 6. Hostile input: message sizes are capped on both tonic endpoints;
//!    `raw_len` and the snappy header's length are checked against
//!    [`ShipLimits`] before anything is allocated; every length inside is
//!    bounded; every entry's payload must decode as a record. Malformed input
//!    is `INVALID_ARGUMENT` naming what and where, never a panic, and nothing
//!    of the offending batch past the last good run is written.
//!
//! # Rules (listener side)
//!
//! 1. The shipper registers the drainer as a WAL downstream, so retention
//!    keeps entries until it acked them (within `wal_ttl` and the size cap).
//! 2. After `Welcome { D }` of the listener's own incarnation: `D` past the
//!    listener's last id is refused (the drainer holds entries this log
//!    never had); otherwise the listener records `D` as the drainer's ack
//!    and sends from `D + 1`. Of another incarnation: a snapshot first
//!    (section "History").
//! 3. If `D + 1` is no longer stored (trimmed past `wal_ttl` or the size cap)
//!    the listener asks its [`SnapshotProvider`] for a fresh snapshot
//!    consistent with its log at `marker_log_id = M` (relay convention 4, docs/ARCHITECTURE.md),
//!    sends its chunks, a marker entry at `M`, and continues at `M + 1`. A
//!    drainer whose `D` is the listener's last id is up to date and never gets
//!    a snapshot, however much was trimmed.
//! 4. A marker already in the listener's log (convention 3) is shipped with
//!    its chunks read from the listener's WAL; if they are gone, the fallback
//!    snapshot of rule 3 replaces it.
//! 5. At most `max-unacked-bytes` / `max-unacked-batches` are in flight;
//!    acks release the window and are written to the listener's WAL
//!    (coalesced: one WAL ack per burst of replies). While behind (a read
//!    filled a whole batch), the next WAL read runs ahead on a blocking
//!    thread during the encoding and sending of the current batch; its
//!    result is used only if it starts where shipping continues.
//! 6. Any failure ends the session; the shipper reconnects with capped
//!    exponential backoff (reset by a `Welcome`), logging once per state
//!    change. On shutdown it stops sending, waits up to `shutdown-grace` for
//!    the outstanding acks, records them and closes the stream.

mod drainer;
mod shipper;
pub mod tls;
pub mod wire;

use std::error::Error as StdError;

use futures::future::BoxFuture;
use tonic::{Code, Status};

use crate::position::{LogId, PartitionId};
use crate::record::SnapshotMarker;
use crate::wal::WalError;

pub use crate::record::pb::drainer_client::DrainerClient;
pub use crate::record::pb::drainer_server::{Drainer, DrainerServer};
pub use drainer::{
    serve_drainer, AllowedListener, DrainerPartitionStatus, DrainerService, DrainerServiceConfig,
};
pub use shipper::{
    DrainerTarget, Shipper, ShipperConfig, ShipperStatus, ShipperStatusHandle, SyncState,
};

/// The protocol version this build speaks (`Hello.protocol_version`).
/// 2: `Hello` and `Welcome` carry the history (module doc, "History").
pub const PROTOCOL_VERSION: u32 = 2;

/// Bounds on what one side accepts from the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipLimits {
    /// Largest gRPC message (tonic's encoding and decoding limit).
    pub max_message_bytes: usize,
    /// Largest `EntryBatch.raw_len` (decompressed batch).
    pub max_batch_raw_bytes: usize,
    /// Most entries in one batch.
    pub max_batch_entries: u32,
    /// Largest decompressed snapshot chunk.
    pub max_chunk_raw_bytes: usize,
}

impl Default for ShipLimits {
    fn default() -> Self {
        // One entry of the WAL's largest payload must fit in a batch, with
        // room for its header; the message limit then follows from snappy's
        // worst case for incompressible input.
        let max_batch_raw_bytes = crate::wal::MAX_PAYLOAD_LEN + (1 << 20);
        ShipLimits {
            max_message_bytes: snap::raw::max_compress_len(max_batch_raw_bytes) + (64 << 10),
            max_batch_raw_bytes,
            max_batch_entries: 1 << 16,
            max_chunk_raw_bytes: 8 << 20,
        }
    }
}

/// A snapshot taken for a drainer that needs entries the listener no longer
/// has (relay convention 4, docs/ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackSnapshot {
    /// Epoch whose chunks are stored (state complete) in the listener's WAL
    /// for this partition.
    pub epoch: u64,
    /// The marker to ship; `marker.epoch == epoch`, `marker.chunks` chunks.
    pub marker: SnapshotMarker,
    /// The last listener log id whose source offset is at most
    /// `marker.offset`: the snapshot is the state at this id.
    pub marker_log_id: LogId,
}

/// Error of a [`SnapshotProvider`].
pub type SnapshotProviderError = Box<dyn StdError + Send + Sync>;

/// Takes fallback snapshots (implemented by the listener: a second
/// replication connection to the source, stored as a new epoch).
pub trait SnapshotProvider: Send + Sync + 'static {
    /// Takes a snapshot of `partition`, stores its chunks in the listener's
    /// WAL and returns where it sits in the log. Several shippers may ask at
    /// once; an implementation may hand them the same recent snapshot.
    fn fallback_snapshot(
        &self,
        partition: PartitionId,
    ) -> BoxFuture<'_, Result<FallbackSnapshot, SnapshotProviderError>>;

    /// The epoch of a full resync of `partition` being stored in the
    /// listener's WAL right now, whose marker will follow in the log if it
    /// completes: a caught-up shipper sends its chunks as they are stored
    /// (all but the newest, which goes last, with the marker's count). `None`
    /// (the default): chunks go only once their marker is in the log.
    fn resync_epoch(&self, _partition: PartitionId) -> Option<u64> {
        None
    }

    /// [`SnapshotProvider::resync_epoch`] when nothing but its marker can
    /// be appended to the log before the resync ends: a standalone source
    /// (a cluster source's listener may log slot records meanwhile). An
    /// applier of `ferry sync` caught up with the log may then start loading
    /// it while it is stored, its marker expected as the next entry
    /// (`apply::snapshot`, "Loading a resync while it is stored").
    fn preload_epoch(&self, _partition: PartitionId) -> Option<u64> {
        None
    }
}

/// Errors of shipping, on both sides. Drainer-side ones become the stream's
/// [`Status`] through the one `From` impl below.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("invalid {what}")]
    InvalidFrame { what: String },
    #[error("listener {listener_id:?} refused: {reason}")]
    Unauthenticated { listener_id: String, reason: String },
    #[error(
        "protocol version {got} is not supported (this drainer speaks {supported}); run the \
         same ferry version on both ends"
    )]
    UnsupportedVersion { got: u32, supported: u32 },
    #[error(
        "partition {partition} belongs to listener {owner:?} (it claimed the drainer's log \
         first); listener {listener:?} may not ship to it nor reset it"
    )]
    PartitionOwned {
        partition: PartitionId,
        owner: String,
        listener: String,
    },
    #[error(
        "partition {partition}: the drainer holds incarnation {held:016x} of listener {owner:?}'s \
         log, this stream ships incarnation {shipped:016x}: a snapshot must come before any entry"
    )]
    HistoryMismatch {
        partition: PartitionId,
        owner: String,
        held: u64,
        shipped: u64,
    },
    #[error(
        "partition {partition}: this WAL holds the log of listener {owner:?}, not of \
         {listener:?}; run it under id {owner:?}, or give listener {listener:?} a new WAL dir"
    )]
    ForeignLog {
        partition: PartitionId,
        owner: String,
        listener: String,
    },
    #[error(
        "partition {partition}: gap: entry {got} does not follow entry {last}; \
         resume from the Welcome point"
    )]
    Gap {
        partition: PartitionId,
        last: LogId,
        got: LogId,
    },
    #[error("partition {partition} is being shipped by listener {owner:?}")]
    PartitionBusy {
        partition: PartitionId,
        owner: String,
    },
    #[error("stream replaced by a newer stream of the same listener")]
    Replaced,
    #[error("no Hello within {0:?}")]
    HelloTimeout(std::time::Duration),
    #[error("drainer is shutting down")]
    ShuttingDown,
    #[error("wal: {0}")]
    Wal(#[from] WalError),
    #[error("connecting to {endpoint}: {}", crate::errors::error_chain(.error))]
    Connect {
        endpoint: String,
        #[source]
        error: tonic::transport::Error,
    },
    /// The TLS handshake with the drainer failed, or the drainer ended the
    /// TLS session (an untrusted certificate either way, a drainer that does
    /// not speak TLS).
    #[error("TLS with {endpoint}: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("drainer answered {:?}: {}", .0.code(), status_text(.0))]
    Remote(Box<Status>),
    #[error("drainer closed the stream")]
    StreamClosed,
    #[error("protocol error from the drainer: {0}")]
    Protocol(String),
    #[error(
        "partition {partition}: drainer holds entries up to {drainer_durable} \
         but this listener's log ends at {listener_last}"
    )]
    DrainerAhead {
        partition: PartitionId,
        drainer_durable: LogId,
        listener_last: LogId,
    },
    #[error("partition {partition}: fallback snapshot failed: {reason}")]
    Snapshot {
        partition: PartitionId,
        reason: String,
    },
    #[error("invalid ship config: {0}")]
    Config(String),
    #[error("shutting down")]
    Shutdown,
}

impl ShipError {
    fn remote(status: Status) -> ShipError {
        ShipError::Remote(Box::new(status))
    }

    fn invalid(what: impl Into<String>) -> ShipError {
        ShipError::InvalidFrame { what: what.into() }
    }

    /// A short name of the error's kind, to log state changes once rather
    /// than every retry.
    pub fn kind(&self) -> &'static str {
        match self {
            ShipError::InvalidFrame { .. } => "invalid-frame",
            ShipError::Unauthenticated { .. } => "unauthenticated",
            ShipError::UnsupportedVersion { .. } => "unsupported-version",
            ShipError::PartitionOwned { .. } => "partition-owned",
            ShipError::HistoryMismatch { .. } => "history-mismatch",
            ShipError::ForeignLog { .. } => "foreign-log",
            ShipError::Gap { .. } => "gap",
            ShipError::PartitionBusy { .. } => "partition-busy",
            ShipError::Replaced => "replaced",
            ShipError::HelloTimeout(_) => "hello-timeout",
            ShipError::ShuttingDown => "drainer-shutting-down",
            ShipError::Wal(_) => "wal",
            ShipError::Connect { .. } => "connect",
            ShipError::Tls { .. } => "tls",
            ShipError::Remote(status) => match status.code() {
                Code::Unauthenticated => "remote-unauthenticated",
                Code::PermissionDenied => "remote-permission-denied",
                Code::FailedPrecondition => "remote-failed-precondition",
                Code::InvalidArgument => "remote-invalid-argument",
                Code::Unavailable => "remote-unavailable",
                _ => "remote",
            },
            ShipError::StreamClosed => "stream-closed",
            ShipError::Protocol(_) => "protocol",
            ShipError::DrainerAhead { .. } => "drainer-ahead",
            ShipError::Snapshot { .. } => "snapshot",
            ShipError::Config(_) => "config",
            ShipError::Shutdown => "shutdown",
        }
    }
}

impl From<ShipError> for Status {
    fn from(error: ShipError) -> Status {
        let message = error.to_string();
        match error {
            ShipError::InvalidFrame { .. } => Status::invalid_argument(message),
            ShipError::Unauthenticated { .. } => Status::unauthenticated(message),
            ShipError::UnsupportedVersion { .. }
            | ShipError::DrainerAhead { .. }
            | ShipError::HistoryMismatch { .. } => Status::failed_precondition(message),
            ShipError::PartitionOwned { .. } => Status::permission_denied(message),
            ShipError::Gap { .. } => Status::out_of_range(message),
            ShipError::PartitionBusy { .. } => Status::already_exists(message),
            ShipError::Replaced => Status::aborted(message),
            ShipError::HelloTimeout(_) => Status::deadline_exceeded(message),
            ShipError::ShuttingDown | ShipError::Shutdown => Status::unavailable(message),
            ShipError::Wal(WalError::Closed | WalError::Poisoned(_)) => {
                Status::unavailable(message)
            }
            ShipError::Remote(status) => *status,
            ShipError::Wal(_)
            | ShipError::Connect { .. }
            | ShipError::Tls { .. }
            | ShipError::StreamClosed
            | ShipError::Protocol(_)
            | ShipError::Snapshot { .. }
            | ShipError::ForeignLog { .. }
            | ShipError::Config(_) => Status::internal(message),
        }
    }
}

/// A status's message and, for one tonic made of a transport failure (whose
/// message alone is "transport error"), its causes.
fn status_text(status: &Status) -> String {
    let mut text = status.message().to_string();
    if let Some(source) = std::error::Error::source(status) {
        let causes = crate::errors::error_chain(source);
        if !causes.is_empty() && !text.contains(&causes) {
            text.push_str(": ");
            text.push_str(&causes);
        }
    }
    text
}

/// Compares secrets without an early exit on the first differing byte, so
/// response time does not reveal how much of a guess was right. (The length
/// is not secret enough to hide: a mismatch in length returns at once.)
fn secrets_match(expected: &[u8], given: &[u8]) -> bool {
    if expected.len() != given.len() {
        return false;
    }
    let difference = expected
        .iter()
        .zip(given)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_exactly() {
        assert!(secrets_match(b"s3cret", b"s3cret"));
        assert!(!secrets_match(b"s3cret", b"s3cres"));
        assert!(!secrets_match(b"s3cret", b"s3cre"));
        assert!(!secrets_match(b"", b"x"));
        assert!(secrets_match(b"", b""));
    }

    #[test]
    fn errors_map_to_their_status_codes() {
        let cases: Vec<(ShipError, Code)> = vec![
            (ShipError::invalid("x"), Code::InvalidArgument),
            (
                ShipError::Unauthenticated {
                    listener_id: "l".into(),
                    reason: "bad secret".into(),
                },
                Code::Unauthenticated,
            ),
            (
                ShipError::UnsupportedVersion {
                    got: 9,
                    supported: 1,
                },
                Code::FailedPrecondition,
            ),
            (
                ShipError::Gap {
                    partition: PartitionId(0),
                    last: LogId(3),
                    got: LogId(5),
                },
                Code::OutOfRange,
            ),
            (ShipError::Wal(WalError::Closed), Code::Unavailable),
            (
                ShipError::PartitionOwned {
                    partition: PartitionId(0),
                    owner: "a".into(),
                    listener: "b".into(),
                },
                Code::PermissionDenied,
            ),
            (
                ShipError::HistoryMismatch {
                    partition: PartitionId(0),
                    owner: "a".into(),
                    held: 1,
                    shipped: 2,
                },
                Code::FailedPrecondition,
            ),
            (
                ShipError::remote(Status::permission_denied("p")),
                Code::PermissionDenied,
            ),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{text}");
            assert!(!status.message().is_empty());
        }
    }
}
