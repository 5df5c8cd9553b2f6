//! Replica-side replication client: ferry's listener connects to a Redis
//! master the way a replica does and receives its snapshot and its write
//! stream, with exact replication offsets.
//!
//! What flows in: a source address ([`ReplicaConfig`]) and, when resuming,
//! the last saved [`ReplPosition`]. What flows out: [`ReplEvent`]s from
//! [`PsyncSource::next_event`], in stream order; and `REPLCONF ACK`s to the
//! master carrying the offset the caller published through an [`AckHandle`].
//!
//! # Wire protocol (Redis 2.8 .. 7.x)
//!
//! Handshake, one command at a time, each answered by one line:
//! `AUTH [user] password` (when the URL has one), `PING`,
//! `REPLCONF listening-port <port>` (only when configured),
//! `REPLCONF ip-address <ip>` (only when configured),
//! `REPLCONF capa eof capa psync2`, `REPLCONF rdb-only 1` (only on a full
//! sync of a caller that wants the snapshot alone,
//! [`ReplicaConfig::rdb_only`]), then `PSYNC <replid> <offset+1>` to resume
//! from a saved position or `PSYNC ? -1` for a full sync. Errors to the
//! `REPLCONF`s are tolerated (old masters do not know every option), as Redis's
//! own replica does. The master may send bare `\n` keepalives before its PSYNC
//! reply and before the RDB header; they are skipped and never count in offsets.
//!
//! PSYNC replies:
//! - `+FULLRESYNC <replid> <offset>`: an RDB follows, either disk-based
//!   (`$<len>\r\n` then exactly `len` bytes) or diskless
//!   (`$EOF:<40-byte mark>\r\n`, the bytes, then the mark again). The command
//!   stream that follows starts at `<offset>`.
//! - `+CONTINUE` / `+CONTINUE <new replid>`: the stream resumes at the
//!   requested offset, with no RDB. A new id means the server is a promoted
//!   replica that kept our history under its new id; the id is adopted.
//! - `-NOMASTERLINK`, `-LOADING`: the server cannot serve now (retryable, see
//!   [`ReplError::is_retryable`]); any other error is [`ReplError::MasterError`].
//!
//! The command stream is RESP arrays of bulk strings. Every byte of it counts
//! in the replication offset, including `PING`, `SELECT` and
//! `REPLCONF GETACK *`. `SELECT` is only sent when the db changes and is not
//! re-sent after `+CONTINUE`, so the db is part of the resumable position.
//! `MULTI` .. `EXEC` (also how scripts and functions with several writes are
//! propagated) must be applied atomically, so it comes out as one entry.
//!
//! # Events and their offsets
//!
//! After every event, [`PsyncSource::position`] is the position just after
//! it; it is resumable (a later `PSYNC` from it is exact) once the snapshot
//! was taken in, i.e. after [`ReplEvent::RdbEnd`] on a full sync, and at any
//! time after [`ReplEvent::Continue`]. A transaction that is only partly
//! received never moves the position.
//!
//! - `FullResync { replid, offset }`: first event of a full sync; the RDB
//!   describes the dataset at `offset`.
//! - `RdbChunk(bytes)`: the next at most [`ReplicaConfig::rdb_chunk_size`]
//!   bytes of the RDB payload, as they arrive (the RDB is never held whole).
//! - `RdbEnd { len }`: the payload (of `len` bytes) is complete; the stream
//!   starts at the `FullResync` offset in db 0.
//! - `Continue { replid, offset, db }`: first event of a partial resync.
//! - `Fragment(bytes)`: the next piece of a *streamed* argument of the entry
//!   being received (see below); the position does not move.
//! - `Entry(ReplEntry)`: one command, or one whole transaction; its `offset`
//!   is the stream offset just after its last byte (after `EXEC`).
//! - `Progress { offset }`: bytes that carry no data (`PING`, `SELECT`,
//!   `REPLCONF ...`) were consumed; `offset` is just after them. Surfaced so
//!   that an idle or db-switching stream still moves the position the caller
//!   persists and acks.
//!
//! # Big arguments
//!
//! An entry is never buffered whole when it is big. A bulk argument (other
//! than a command name) is *streamed* when it is longer than
//! [`ReplicaConfig::stream_threshold`], or when holding it would take the
//! entry's buffered wire bytes past [`ReplicaConfig::max_transaction_bytes`]:
//! its bytes come out as [`ReplEvent::Fragment`]s of exactly
//! [`ReplicaConfig::fragment_size`] bytes (the last one shorter) as they
//! arrive, and the entry's [`ReplEntry`] then holds an empty argument in its
//! place and lists it in [`ReplEntry::streamed`] (with its length and
//! fragment count). The fragments of an entry come in `streamed` order,
//! right before the entry. An entry whose bytes (buffered and streamed)
//! exceed [`ReplicaConfig::max_entry_bytes`], or whose buffered part still
//! exceeds `max_transaction_bytes` (a transaction of millions of small
//! commands), is [`ReplError::EntryTooLarge`] /
//! [`ReplError::TransactionTooLarge`], found as soon as its headers say so;
//! [`ReplError::is_uncarriable`] tells them apart: reconnecting would only
//! receive the same entry again.
//!
//! # Acks
//!
//! Once the stream runs, a background task sends `REPLCONF ACK <offset>` every
//! [`ReplicaConfig::ack_interval`] and as soon as a `REPLCONF GETACK` is
//! consumed. `<offset>` is `min(AckHandle value, bytes received)`: the caller
//! publishes its durable offset through the handle, and the client never acks
//! beyond what it received. The first ack goes out right after the RDB: a
//! diskless master starts the command stream only on an ack that arrives once
//! it has seen its RDB child finish (so possibly only on the next periodic one).
//! The handle starts at 0 after `FULLRESYNC` (nothing is durable yet) and at
//! the resume offset after `CONTINUE` (the caller saved it, so it is durable).
//! A `GETACK` is answered when [`PsyncSource::next_event`] consumes it, with
//! what the handle allows then; if that does not cover everything the master
//! sent before the `GETACK` (the entries a `WAIT` on the master waits for are
//! usually not durable yet), another ack follows as soon as the handle rises
//! to cover it, so a `WAIT` returns after one fsync rather than at the next
//! periodic ack. A caller that stops reading delays `WAIT`s until it reads
//! the `GETACK`.
//!
//! # Failure
//!
//! Any error ends the session: later calls return [`ReplError::Failed`].
//! Reconnect with the last saved position; [`ReplError::is_retryable`] tells
//! lost links and not-ready masters from hostile or misconfigured ones.
//! `next_event` is cancel-safe, so it can sit in a `select!` with a shutdown
//! signal.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::tls::RedisStream;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type OwnedReadHalf = tokio::io::ReadHalf<RedisStream>;
type OwnedWriteHalf = tokio::io::WriteHalf<RedisStream>;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::command::Command;
use super::resp::{encode_command, Frame, RespDecoder, RespError, RespLimits};
use super::url::RedisUrl;
use crate::position::{ReplId, ReplOffset};

/// Length of the diskless transfer's end mark (`CONFIG_RUN_ID_SIZE`).
const EOF_MARK_LEN: usize = 40;
/// Longest handshake or RDB header line accepted.
const MAX_LINE_LEN: usize = 4096;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 64 * 1024;

/// How to reach the master and the limits of one replication session.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// The master; user/password are sent with `AUTH`. The URL's db is ignored
    /// (a replica receives every db).
    pub source: RedisUrl,
    /// Sent as `REPLCONF listening-port`. Default `None`: not sent, and the
    /// master lists the replica with `port=0`. Redis accepts any number here
    /// (it is only shown in `INFO`/`ROLE` and used by Sentinel to reach
    /// replicas); set it to a port of ferry's when Sentinel watches the source.
    pub listening_port: Option<u16>,
    /// Sent as `REPLCONF ip-address`. Default `None`: the master shows the
    /// connection's peer address.
    pub announce_ip: Option<String>,
    /// TCP connect timeout. Default 5 s.
    pub connect_timeout: Duration,
    /// A master that sends no byte for this long is considered dead
    /// ([`ReplError::Timeout`]). Masters send a `PING` every
    /// `repl-ping-replica-period` (10 s) and `\n` every second while preparing
    /// the RDB, so this should stay well above 10 s. Default 60 s (Redis's
    /// `repl-timeout`).
    pub read_timeout: Duration,
    /// Period of `REPLCONF ACK`. Default 1 s (as Redis replicas do). Keep it
    /// short: after a diskless transfer the master starts the command stream
    /// on the first ack it sees after reaping its RDB child, which can be a
    /// periodic one rather than the one sent right after the payload.
    pub ack_interval: Duration,
    /// Most wire bytes of one entry (a command, or a `MULTI` .. `EXEC`)
    /// held in memory; an argument that would take it past this is streamed
    /// (module doc, "Big arguments"). Only an entry whose headers alone pass
    /// it is [`ReplError::TransactionTooLarge`]. Default 256 MiB.
    pub max_transaction_bytes: usize,
    /// Bulk arguments longer than this are streamed. Default 4 MiB.
    pub stream_threshold: usize,
    /// Size of the [`ReplEvent::Fragment`]s of a streamed argument (the last
    /// one of an argument may be shorter). Default 1 MiB.
    pub fragment_size: usize,
    /// Largest entry, buffered and streamed bytes together, before
    /// [`ReplError::EntryTooLarge`]. Default 4 GiB.
    pub max_entry_bytes: u64,
    /// Largest [`ReplEvent::RdbChunk`]. Default 64 KiB.
    pub rdb_chunk_size: usize,
    /// Limits on each frame of the command stream (bulk length etc.).
    /// Default [`RespLimits::default`] (512 MiB bulk strings, like Redis's
    /// `proto-max-bulk-len`).
    pub resp_limits: RespLimits,
    /// On a full sync, ask for the RDB alone (`REPLCONF rdb-only 1`, Redis
    /// 7.0+): the master then keeps no replication buffer for this
    /// connection while it prepares and sends the RDB (so a long transfer
    /// cannot hit `client-output-buffer-limit replica`), sends no command
    /// stream after it and closes the connection. For callers that want a
    /// snapshot, not a replica link (fallback snapshots, `ferry rdb fetch`).
    /// A master that refuses the option is used as without it
    /// ([`PsyncSource::rdb_only`] says which). Default `false`.
    pub rdb_only: bool,
}

impl ReplicaConfig {
    /// The defaults documented on each field.
    pub fn new(source: RedisUrl) -> ReplicaConfig {
        ReplicaConfig {
            source,
            listening_port: None,
            announce_ip: None,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            ack_interval: Duration::from_secs(1),
            max_transaction_bytes: 256 * 1024 * 1024,
            stream_threshold: 4 << 20,
            fragment_size: 1 << 20,
            max_entry_bytes: 4 << 30,
            rdb_chunk_size: 64 * 1024,
            resp_limits: RespLimits::default(),
            rdb_only: false,
        }
    }

    /// Rejects values the client cannot work with, naming the field.
    pub fn validate(&self) -> Result<(), ReplError> {
        let fail = |what: &str| Err(ReplError::Config(what.to_string()));
        if self.rdb_chunk_size == 0 {
            return fail("rdb_chunk_size must be at least 1 byte");
        }
        if self.max_transaction_bytes == 0 {
            return fail("max_transaction_bytes must be at least 1 byte");
        }
        if self.fragment_size == 0 {
            return fail("fragment_size must be at least 1 byte");
        }
        if self.max_entry_bytes < self.max_transaction_bytes as u64 {
            return fail("max_entry_bytes must be at least max_transaction_bytes");
        }
        // Fragments are counted in u32 (per argument and per entry).
        if self.max_entry_bytes.div_ceil(self.fragment_size as u64) > u64::from(u32::MAX) {
            return fail("max_entry_bytes must fit in 2^32 - 1 fragments of fragment_size");
        }
        if self.read_timeout.is_zero() || self.connect_timeout.is_zero() {
            return fail("read_timeout and connect_timeout must not be 0");
        }
        if self.ack_interval.is_zero() {
            return fail("ack_interval must not be 0");
        }
        if let Some(ip) = &self.announce_ip {
            if ip.is_empty() || ip.bytes().any(|b| b.is_ascii_whitespace()) {
                return fail("announce_ip must be a non-empty address without spaces");
            }
        }
        Ok(())
    }
}

/// Where a replica stands in a master's history: resumable with
/// `PSYNC <replid> <offset+1>`, in db `db` (the last `SELECT` before `offset`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplPosition {
    pub replid: ReplId,
    pub offset: ReplOffset,
    pub db: u32,
}

/// One unit of data of the command stream.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplEntry {
    /// The db `commands[0]` runs in. Inside a transaction that switches db
    /// between commands (a client's `MULTI` with a `SELECT` inside), the
    /// `SELECT` is kept in `commands`; a `SELECT` before the first command is
    /// folded into `db`.
    pub db: u32,
    /// Stream offset just after the entry's last byte (after `EXEC`).
    pub offset: ReplOffset,
    /// The commands, exactly as propagated; without `MULTI`/`EXEC`.
    pub commands: Vec<Command>,
    /// True for a `MULTI` .. `EXEC` block, to be applied atomically.
    pub transaction: bool,
    /// The streamed arguments, in command and argument order; their bytes
    /// were the [`ReplEvent::Fragment`]s before this entry, in this order.
    pub streamed: Vec<StreamedArg>,
}

/// An argument of an entry whose bytes were streamed as fragments:
/// `commands[command].args[arg]` is empty in the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamedArg {
    pub command: u32,
    pub arg: u32,
    /// Its length in bytes.
    pub len: u64,
    /// How many fragments hold it.
    pub fragments: u32,
}

/// What [`PsyncSource::next_event`] yields; see the module docs for offsets.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplEvent {
    FullResync {
        replid: ReplId,
        offset: ReplOffset,
    },
    RdbChunk(Bytes),
    RdbEnd {
        len: u64,
    },
    Fragment(Bytes),
    Continue {
        replid: ReplId,
        offset: ReplOffset,
        db: u32,
    },
    Entry(ReplEntry),
    Progress {
        offset: ReplOffset,
    },
}

/// Everything that ends a replication session.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("invalid replica config: {0}")]
    Config(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("no byte from the master for {after:?} while {during}")]
    Timeout { during: String, after: Duration },
    #[error("master refused authentication at {step}: {message}")]
    Auth { step: &'static str, message: String },
    #[error("unexpected reply to {step}: {reply:?}")]
    Handshake { step: &'static str, reply: String },
    #[error("master answered {step} with an error: {message}")]
    MasterError { step: &'static str, message: String },
    #[error("bad RDB transfer after {received} payload bytes: {what}")]
    RdbTransfer { received: u64, what: String },
    #[error("RDB transfer cut after {received} payload bytes{}", expected.map(|e| format!(" of {e}")).unwrap_or_default())]
    RdbTruncated {
        received: u64,
        expected: Option<u64>,
    },
    #[error("protocol error in the replication stream at offset {offset}: {what}")]
    Protocol { offset: u64, what: String },
    /// Malformed or oversized RESP; its offsets are replication offsets.
    #[error("replication stream: {0}")]
    Resp(#[from] RespError),
    #[error("entry starting at offset {offset} holds more than {limit} bytes of headers and small arguments (max-transaction-bytes); ferry cannot carry it")]
    TransactionTooLarge { offset: u64, limit: usize },
    #[error("entry starting at offset {offset} is at least {len} bytes long, more than max-entry-bytes ({limit}); ferry cannot carry it")]
    EntryTooLarge { offset: u64, len: u64, limit: u64 },
    #[error("master closed the connection while {during}")]
    Closed { during: String },
    #[error("i/o error on the replication link: {0}")]
    Io(#[from] io::Error),
    #[error("the replication session failed earlier; reconnect from the saved position")]
    Failed,
    #[error("this session asked for the RDB only (REPLCONF rdb-only): nothing follows it")]
    RdbOnlyDone,
}

impl ReplError {
    /// True for an entry ferry cannot carry with its configured limits: the
    /// source would send it again on every reconnect.
    pub fn is_uncarriable(&self) -> bool {
        matches!(
            self,
            ReplError::TransactionTooLarge { .. } | ReplError::EntryTooLarge { .. }
        )
    }

    /// True when reconnecting (after a pause) may succeed without any change:
    /// lost links, timeouts, and masters that are loading or have lost their
    /// own master.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplError::Connect { .. }
            | ReplError::Timeout { .. }
            | ReplError::Closed { .. }
            | ReplError::RdbTruncated { .. }
            | ReplError::Io(_) => true,
            ReplError::MasterError { message, .. } => {
                let code = message.split_whitespace().next().unwrap_or("");
                matches!(
                    code,
                    "LOADING" | "NOMASTERLINK" | "MASTERDOWN" | "BUSY" | "TRYAGAIN"
                )
            }
            _ => false,
        }
    }
}

/// The offset the caller allows the client to acknowledge (typically its
/// durable offset). Cheap to clone; shared with the session's ack task.
#[derive(Debug, Clone, Default)]
pub struct AckHandle(Arc<AckCell>);

#[derive(Debug, Default)]
struct AckCell {
    offset: AtomicU64,
    /// Signalled whenever `offset` rises (the ack task waits on it while a
    /// `GETACK` is owed an answer).
    raised: Notify,
}

impl AckHandle {
    /// Raises the acknowledgeable offset to `offset` (never lowers it: the
    /// master keeps the highest ack anyway).
    pub fn set(&self, offset: ReplOffset) {
        if self.0.offset.fetch_max(offset.0, Ordering::AcqRel) < offset.0 {
            self.0.raised.notify_one();
        }
    }

    pub fn get(&self) -> ReplOffset {
        ReplOffset(self.0.offset.load(Ordering::Acquire))
    }
}

/// State shared between the session and its ack task.
struct AckShared {
    allowed: AckHandle,
    /// Offset after the last whole frame received.
    received: AtomicU64,
    /// Offset at which the latest `REPLCONF GETACK` starts: everything the
    /// master sent before it (what a `WAIT` waits for) is owed an ack.
    getack_at: AtomicU64,
    /// Signalled on `REPLCONF GETACK`.
    getack: Notify,
}

impl AckShared {
    fn ack_offset(&self) -> u64 {
        self.allowed
            .get()
            .0
            .min(self.received.load(Ordering::Acquire))
    }
}

/// A `MULTI` being collected.
struct PendingTransaction {
    /// Offset of the `MULTI`.
    start: u64,
    db: u32,
    commands: Vec<Command>,
    /// Wire bytes since (and including) `MULTI`, streamed arguments left out.
    bytes: usize,
    /// Streamed arguments of `commands`.
    streamed: Vec<StreamedArg>,
    /// Their bytes.
    streamed_bytes: u64,
}

/// A command frame received piecewise because one of its arguments is
/// streamed (module doc, "Big arguments").
struct StreamingFrame {
    /// Stream offset of the frame's first byte.
    start: u64,
    /// Wire bytes of the frame consumed so far.
    consumed: u64,
    /// Of which streamed argument bytes.
    streamed_bytes: u64,
    /// Elements not started yet.
    elements_left: u64,
    /// The arguments so far; empty in the place of a streamed one.
    args: Vec<Bytes>,
    /// `(arg, len, fragments)` of its streamed arguments.
    streamed: Vec<(u32, u64, u32)>,
    /// The streamed argument being received.
    current: Option<StreamingArg>,
}

struct StreamingArg {
    arg: u32,
    len: u64,
    left: u64,
    fragments: u32,
}

/// How the buffered bytes of an entry are bounded: when an argument is
/// streamed rather than buffered.
#[derive(Debug, Clone, Copy)]
struct StreamRule {
    threshold: usize,
    /// Wire bytes the entry may still buffer.
    budget_left: usize,
}

impl StreamRule {
    /// True when a bulk of `len` bytes whose header ends `header_end` bytes
    /// into the buffered part of its frame is streamed.
    fn streams(&self, len: u64, header_end: usize) -> bool {
        len > 0
            && (len > self.threshold as u64
                || (header_end as u64).saturating_add(len).saturating_add(2)
                    > self.budget_left as u64)
    }
}

enum Phase {
    /// Waiting for `$<len>` / `$EOF:<mark>`.
    RdbHeader,
    RdbSized {
        len: u64,
        received: u64,
    },
    RdbEof {
        mark: [u8; EOF_MARK_LEN],
        received: u64,
    },
    Stream,
    /// An rdb-only transfer ended: the master sends nothing more.
    RdbOnlyDone,
    Failed,
}

/// The read side of the link with its buffer.
struct Link {
    reader: OwnedReadHalf,
    buf: BytesMut,
    read_timeout: Duration,
}

enum ReadError {
    Closed,
    Timeout,
    Io(io::Error),
}

impl Link {
    /// Reads more bytes into the buffer. The room offered grows with what is
    /// already buffered: a partial frame is rescanned from its start after
    /// every read, so reads must grow with it for a huge command to cost
    /// O(len log len) rather than O(len^2 / READ_SIZE).
    async fn fill(&mut self) -> Result<(), ReadError> {
        let room = READ_SIZE.max(self.buf.len());
        if self.buf.capacity() - self.buf.len() < room / 4 {
            self.buf.reserve(room);
        }
        match tokio::time::timeout(self.read_timeout, self.reader.read_buf(&mut self.buf)).await {
            Err(_) => Err(ReadError::Timeout),
            Ok(Err(e)) => Err(ReadError::Io(e)),
            Ok(Ok(0)) => Err(ReadError::Closed),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Reads more bytes; errors name what was going on.
    async fn fill_or(&mut self, during: impl FnOnce() -> String) -> Result<(), ReplError> {
        self.fill().await.map_err(|e| match e {
            ReadError::Closed => ReplError::Closed { during: during() },
            ReadError::Timeout => ReplError::Timeout {
                during: during(),
                after: self.read_timeout,
            },
            ReadError::Io(e) => ReplError::Io(e),
        })
    }

    /// One `\n`-terminated line without its `\r\n`/`\n`.
    async fn read_line(&mut self, during: &str) -> Result<Bytes, ReplError> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line = self.buf.split_to(nl + 1).freeze();
                line.truncate(nl);
                if line.last() == Some(&b'\r') {
                    line.truncate(nl - 1);
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE_LEN {
                return Err(ReplError::Handshake {
                    step: "reading a reply line",
                    reply: format!(
                        "no end of line within {MAX_LINE_LEN} bytes: {}",
                        lossy(&self.buf[..64])
                    ),
                });
            }
            self.fill_or(|| during.to_string()).await?;
        }
    }

    /// The next non-empty line (bare `\n` keepalives are skipped).
    async fn read_nonempty_line(&mut self, during: &str) -> Result<Bytes, ReplError> {
        loop {
            let line = self.read_line(during).await?;
            if !line.is_empty() {
                return Ok(line);
            }
        }
    }
}

/// A replication session with one master.
pub struct PsyncSource {
    link: Link,
    /// Until the stream starts: then it moves into the ack task.
    writer: Option<OwnedWriteHalf>,
    ack_task: Option<JoinHandle<()>>,
    acks: Arc<AckShared>,
    ack_interval: Duration,
    phase: Phase,
    /// The first event, decided by the handshake.
    first_event: Option<ReplEvent>,
    replid: ReplId,
    /// Offset after the last event.
    offset: u64,
    /// Db at `offset`.
    db: u32,
    /// Offset after the last whole frame received (>= `offset`).
    received: u64,
    /// Db after the last frame received.
    current_db: u32,
    transaction: Option<PendingTransaction>,
    decoder: RespDecoder,
    /// How much of the partial frame at the front of the buffer is known.
    frame_scan: FrameScan,
    /// The frame being received piecewise, if any.
    streaming: Option<StreamingFrame>,
    resp_limits: RespLimits,
    max_transaction_bytes: usize,
    stream_threshold: usize,
    fragment_size: usize,
    max_entry_bytes: u64,
    rdb_chunk_size: usize,
    /// The master accepted `REPLCONF rdb-only 1`.
    rdb_only: bool,
}

impl Drop for PsyncSource {
    fn drop(&mut self) {
        if let Some(task) = self.ack_task.take() {
            task.abort();
        }
    }
}

impl PsyncSource {
    /// Connects, runs the handshake and sends `PSYNC`: from `from` when given
    /// (a resume), else `PSYNC ? -1`. Returns once the master answered; the
    /// first event is then `FullResync` or `Continue`.
    pub async fn connect(
        cfg: &ReplicaConfig,
        from: Option<ReplPosition>,
    ) -> Result<PsyncSource, ReplError> {
        cfg.validate()?;
        let addr = cfg.source.addr();
        let stream = super::tls::connect(&cfg.source, cfg.connect_timeout)
            .await
            .map_err(|error| ReplError::Connect {
                addr,
                source: error.into_io(),
            })?;
        let (reader, mut writer) = tokio::io::split(stream);
        let mut link = Link {
            reader,
            buf: BytesMut::with_capacity(READ_SIZE),
            read_timeout: cfg.read_timeout,
        };

        if let Some(password) = &cfg.source.password {
            let mut args = vec!["AUTH"];
            if let Some(user) = &cfg.source.user {
                args.push(user);
            }
            args.push(password);
            let reply = exchange(&mut link, &mut writer, &args, "AUTH").await?;
            if let Some(message) = reply.strip_prefix('-') {
                return Err(ReplError::Auth {
                    step: "AUTH",
                    message: message.to_string(),
                });
            }
            expect_ok(&reply, "AUTH")?;
        }

        let reply = exchange(&mut link, &mut writer, &["PING"], "PING").await?;
        if let Some(message) = reply.strip_prefix('-') {
            let code = message.split_whitespace().next().unwrap_or("");
            // Redis before 6 said "operation not permitted" instead of NOAUTH.
            if matches!(code, "NOAUTH" | "WRONGPASS" | "NOPERM")
                || message.contains("operation not permitted")
            {
                return Err(ReplError::Auth {
                    step: "PING",
                    message: message.to_string(),
                });
            }
            return Err(ReplError::MasterError {
                step: "PING",
                message: message.to_string(),
            });
        }
        expect_ok(&reply, "PING")?;

        let port = cfg.listening_port.map(|p| p.to_string());
        let mut replconfs: Vec<(&'static str, Vec<&str>)> = Vec::new();
        if let Some(port) = &port {
            replconfs.push(("REPLCONF listening-port", vec!["listening-port", port]));
        }
        if let Some(ip) = &cfg.announce_ip {
            replconfs.push(("REPLCONF ip-address", vec!["ip-address", ip]));
        }
        replconfs.push(("REPLCONF capa", vec!["capa", "eof", "capa", "psync2"]));
        for (step, tail) in replconfs {
            let mut args = vec!["REPLCONF"];
            args.extend(tail);
            let reply = exchange(&mut link, &mut writer, &args, step).await?;
            if let Some(message) = reply.strip_prefix('-') {
                // Redis's own replica goes on too: older masters lack options.
                warn!(master = %cfg.source, step, message, "master refused a replconf option");
                continue;
            }
            expect_ok(&reply, step)?;
        }
        let mut rdb_only = false;
        if cfg.rdb_only && from.is_none() {
            let step = "REPLCONF rdb-only";
            let reply =
                exchange(&mut link, &mut writer, &["REPLCONF", "rdb-only", "1"], step).await?;
            if let Some(message) = reply.strip_prefix('-') {
                // Before 7.0 (or a proxy that filters it): the master streams
                // after the RDB as for any replica; the caller drops the link.
                info!(master = %cfg.source, message, "master does not take REPLCONF rdb-only; taking the RDB as a replica would");
            } else {
                expect_ok(&reply, step)?;
                rdb_only = true;
            }
        }

        let request_offset;
        let psync_args: Vec<String> = match &from {
            Some(pos) => {
                request_offset = pos.offset.0.checked_add(1).ok_or_else(|| {
                    ReplError::Config(format!("resume offset {} overflows", pos.offset))
                })?;
                vec![
                    "PSYNC".into(),
                    pos.replid.to_string(),
                    request_offset.to_string(),
                ]
            }
            None => vec!["PSYNC".into(), "?".into(), "-1".into()],
        };
        send(&mut writer, &psync_args).await?;
        // Keepalive newlines may precede the answer while the master prepares.
        let reply = lossy(
            &link
                .read_nonempty_line("waiting for the PSYNC reply")
                .await?,
        );

        let (replid, start, first_event) = if let Some(rest) = reply.strip_prefix("+FULLRESYNC") {
            let mut words = rest.split_whitespace();
            let (Some(id), Some(offset), None) = (words.next(), words.next(), words.next()) else {
                return Err(handshake_error("PSYNC", &reply));
            };
            let replid = ReplId::parse(id).ok_or_else(|| handshake_error("PSYNC", &reply))?;
            let offset: u64 = offset
                .parse()
                .map_err(|_| handshake_error("PSYNC", &reply))?;
            info!(master = %cfg.source, %replid, offset, "full resync");
            let event = ReplEvent::FullResync {
                replid: replid.clone(),
                offset: ReplOffset(offset),
            };
            (replid, None, event)
        } else if let Some(rest) = reply.strip_prefix("+CONTINUE") {
            let Some(pos) = from else {
                return Err(handshake_error("PSYNC ? -1", &reply));
            };
            let replid = match rest.trim() {
                "" => pos.replid.clone(),
                id => ReplId::parse(id).ok_or_else(|| handshake_error("PSYNC", &reply))?,
            };
            if replid != pos.replid {
                info!(master = %cfg.source, old = %pos.replid, new = %replid, "master has a new replication id; adopting it");
            }
            info!(master = %cfg.source, %replid, offset = %pos.offset, db = pos.db, "partial resync");
            let event = ReplEvent::Continue {
                replid: replid.clone(),
                offset: pos.offset,
                db: pos.db,
            };
            (replid, Some(pos), event)
        } else if let Some(message) = reply.strip_prefix('-') {
            return Err(ReplError::MasterError {
                step: "PSYNC",
                message: message.to_string(),
            });
        } else {
            return Err(handshake_error("PSYNC", &reply));
        };

        let (offset, db) = match (&start, &first_event) {
            (Some(pos), _) => (pos.offset.0, pos.db),
            (None, ReplEvent::FullResync { offset, .. }) => (offset.0, 0),
            (None, _) => (0, 0),
        };
        let mut decoder = RespDecoder::new(cfg.resp_limits);
        // RESP errors then name replication offsets.
        decoder.skip(offset);
        let mut source = PsyncSource {
            link,
            writer: Some(writer),
            ack_task: None,
            acks: Arc::new(AckShared {
                allowed: AckHandle::default(),
                received: AtomicU64::new(offset),
                getack_at: AtomicU64::new(0),
                getack: Notify::new(),
            }),
            ack_interval: cfg.ack_interval,
            phase: Phase::RdbHeader,
            first_event: Some(first_event),
            replid,
            offset,
            db,
            received: offset,
            current_db: db,
            transaction: None,
            decoder,
            frame_scan: FrameScan::default(),
            streaming: None,
            resp_limits: cfg.resp_limits,
            max_transaction_bytes: cfg.max_transaction_bytes,
            stream_threshold: cfg.stream_threshold,
            fragment_size: cfg.fragment_size,
            max_entry_bytes: cfg.max_entry_bytes,
            rdb_chunk_size: cfg.rdb_chunk_size,
            rdb_only,
        };
        if let Some(pos) = start {
            // The resume position is the caller's saved (durable) one.
            source.acks.allowed.set(pos.offset);
            source.start_stream();
        }
        Ok(source)
    }

    /// The next event. Cancel-safe (e.g. in `select!` with a shutdown
    /// signal): its only await is a socket read into the session's buffer,
    /// and state changes happen between awaits, so a dropped call loses
    /// nothing and the next call picks up where it stopped.
    pub async fn next_event(&mut self) -> Result<ReplEvent, ReplError> {
        if let Some(event) = self.first_event.take() {
            return Ok(event);
        }
        match self.step().await {
            Ok(event) => Ok(event),
            Err(e) => {
                self.phase = Phase::Failed;
                Err(e)
            }
        }
    }

    /// The position after the last event returned (see the module docs for
    /// when it is resumable).
    pub fn position(&self) -> ReplPosition {
        ReplPosition {
            replid: self.replid.clone(),
            offset: ReplOffset(self.offset),
            db: self.db,
        }
    }

    /// [`PsyncSource::position`]'s offset and db, without the replid.
    pub fn offset_db(&self) -> (ReplOffset, u32) {
        (ReplOffset(self.offset), self.db)
    }

    /// Offset after the last whole frame received; ahead of
    /// [`PsyncSource::position`] while a transaction is being collected.
    pub fn received_offset(&self) -> ReplOffset {
        ReplOffset(self.received)
    }

    /// Whether the master accepted `REPLCONF rdb-only 1`
    /// ([`ReplicaConfig::rdb_only`]): after [`ReplEvent::RdbEnd`] it sends
    /// nothing and closes the connection; `next_event` then returns
    /// [`ReplError::RdbOnlyDone`].
    pub fn rdb_only(&self) -> bool {
        self.rdb_only
    }

    /// After an rdb-only transfer ([`PsyncSource::rdb_only`]): waits, at
    /// most `timeout`, for the master to close the connection, which it does
    /// once it counted the transfer done (a diskless one when its child
    /// exited). Leaving earlier works too, but the master then logs a lost
    /// replica instead of a finished transfer. Returns whether the master
    /// closed it; `false` at once for any other session.
    pub async fn wait_closed(&mut self, timeout: Duration) -> bool {
        if !matches!(self.phase, Phase::RdbOnlyDone) || !self.link.buf.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(timeout, self.link.reader.read(&mut byte)).await,
            Ok(Ok(0))
        )
    }

    /// The handle through which the caller sets the offset to acknowledge.
    pub fn ack_handle(&self) -> AckHandle {
        self.acks.allowed.clone()
    }

    /// Enters the command stream: hands the write side to the ack task,
    /// which acks at once (a diskless master starts streaming only on an ack).
    fn start_stream(&mut self) {
        self.phase = Phase::Stream;
        if let Some(writer) = self.writer.take() {
            self.ack_task = Some(tokio::spawn(ack_loop(
                writer,
                Arc::clone(&self.acks),
                self.ack_interval,
            )));
        }
    }

    async fn step(&mut self) -> Result<ReplEvent, ReplError> {
        loop {
            match &mut self.phase {
                Phase::Failed => return Err(ReplError::Failed),
                Phase::RdbOnlyDone => return Err(ReplError::RdbOnlyDone),
                Phase::RdbHeader => {
                    let line = self
                        .link
                        .read_nonempty_line("waiting for the RDB transfer")
                        .await?;
                    self.phase = parse_rdb_header(&line)?;
                }
                Phase::RdbSized { len, received } => {
                    let (len, got) = (*len, *received);
                    if got == len {
                        return Ok(self.finish_rdb(got));
                    }
                    if self.link.buf.is_empty() {
                        self.link.fill().await.map_err(|e| {
                            rdb_read_error(e, got, Some(len), self.link.read_timeout)
                        })?;
                    }
                    let want = (len - got).min(self.rdb_chunk_size as u64) as usize;
                    let n = want.min(self.link.buf.len());
                    let chunk = self.link.buf.split_to(n).freeze();
                    self.phase = Phase::RdbSized {
                        len,
                        received: got + n as u64,
                    };
                    return Ok(ReplEvent::RdbChunk(chunk));
                }
                Phase::RdbEof { mark, received } => {
                    let got = *received;
                    match eof_scan(&self.link.buf, mark, self.rdb_chunk_size) {
                        EofScan::Data(n) => {
                            let chunk = self.link.buf.split_to(n).freeze();
                            *received += n as u64;
                            return Ok(ReplEvent::RdbChunk(chunk));
                        }
                        EofScan::Mark => {
                            self.link.buf.advance(EOF_MARK_LEN);
                            return Ok(self.finish_rdb(got));
                        }
                        EofScan::NeedMore => {
                            self.link.fill().await.map_err(|e| {
                                rdb_read_error(e, got, None, self.link.read_timeout)
                            })?;
                        }
                    }
                }
                Phase::Stream => return self.next_stream_event().await,
            }
        }
    }

    fn finish_rdb(&mut self, len: u64) -> ReplEvent {
        debug!(len, rdb_only = self.rdb_only, "rdb transfer complete");
        if self.rdb_only {
            // No stream follows, so no ack is due either.
            self.phase = Phase::RdbOnlyDone;
        } else {
            self.start_stream();
        }
        ReplEvent::RdbEnd { len }
    }

    async fn next_stream_event(&mut self) -> Result<ReplEvent, ReplError> {
        loop {
            if self.streaming.is_some() {
                match self.advance_streaming()? {
                    Streamed::Event(event) => return Ok(event),
                    Streamed::Continue => continue,
                    Streamed::NeedMore => {
                        let offset = self.received;
                        self.link
                            .fill_or(|| format!("reading the command stream at offset {offset}"))
                            .await?;
                        continue;
                    }
                }
            }
            let rule = self.stream_rule();
            match self
                .frame_scan
                .complete(&self.link.buf, &self.resp_limits, &rule)
            {
                Scan::Incomplete => {
                    let offset = self.received;
                    self.link
                        .fill_or(|| format!("reading the command stream at offset {offset}"))
                        .await?;
                    continue;
                }
                Scan::Stream => {
                    self.frame_scan = FrameScan::default();
                    self.begin_streaming()?;
                    continue;
                }
                Scan::Complete => {}
            }
            if let Some((command, len)) = self.frame_scan.take_command(&mut self.link.buf) {
                self.frame_scan = FrameScan::default();
                self.decoder.skip(len as u64);
                let start = self.received;
                self.received += len as u64;
                self.acks.received.store(self.received, Ordering::Release);
                if let Some(event) = self.on_command(command, &[], 0, start, len)? {
                    return Ok(event);
                }
                continue;
            }
            let Some((frame, len)) = self.decoder.decode_frame(&mut self.link.buf)? else {
                self.frame_scan = FrameScan::default();
                let offset = self.received;
                self.link
                    .fill_or(|| format!("reading the command stream at offset {offset}"))
                    .await?;
                continue;
            };
            self.frame_scan = FrameScan::default();
            let start = self.received;
            self.received += len as u64;
            self.acks.received.store(self.received, Ordering::Release);
            if let Some(event) = self.on_frame(frame, start, len)? {
                return Ok(event);
            }
        }
    }

    /// When the next argument is streamed rather than buffered.
    fn stream_rule(&self) -> StreamRule {
        let buffered = self.transaction.as_ref().map_or(0, |tx| tx.bytes);
        StreamRule {
            threshold: self.stream_threshold,
            budget_left: self.max_transaction_bytes.saturating_sub(buffered),
        }
    }

    /// Starts receiving the frame at the front of the buffer piecewise: takes
    /// its array header (which [`FrameScan`] found well formed).
    fn begin_streaming(&mut self) -> Result<(), ReplError> {
        let start = self.received;
        let Header::Len { value, end } = read_header(
            &self.link.buf,
            0,
            b'*',
            self.resp_limits.max_aggregate_len as u64,
        ) else {
            return Err(ReplError::Protocol {
                offset: start,
                what: "expected a command array".into(),
            });
        };
        if value == 0 {
            return Err(ReplError::Protocol {
                offset: start,
                what: "empty command array".into(),
            });
        }
        self.link.buf.advance(end);
        self.streaming = Some(StreamingFrame {
            start,
            consumed: end as u64,
            streamed_bytes: 0,
            elements_left: value,
            args: Vec::with_capacity(value.min(1024) as usize),
            streamed: Vec::new(),
            current: None,
        });
        Ok(())
    }

    /// Moves the frame being streamed on with what is buffered.
    fn advance_streaming(&mut self) -> Result<Streamed, ReplError> {
        let rule = self.stream_rule();
        let (entry_buffered, entry_streamed) = self
            .transaction
            .as_ref()
            .map_or((0, 0), |tx| (tx.bytes as u64, tx.streamed_bytes));
        let entry_start = self.transaction.as_ref().map(|tx| tx.start);
        let Some(frame) = self.streaming.as_mut() else {
            return Ok(Streamed::Continue);
        };
        let buf = &mut self.link.buf;
        if let Some(current) = &mut frame.current {
            if current.left > 0 {
                let want = current.left.min(self.fragment_size as u64) as usize;
                if buf.len() < want {
                    return Ok(Streamed::NeedMore);
                }
                let piece = buf.split_to(want).freeze();
                current.left -= want as u64;
                current.fragments += 1;
                frame.consumed += want as u64;
                return Ok(Streamed::Event(ReplEvent::Fragment(piece)));
            }
            if buf.len() < 2 {
                return Ok(Streamed::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err(ReplError::Protocol {
                    offset: frame.start + frame.consumed,
                    what: "bulk string not followed by CRLF".into(),
                });
            }
            buf.advance(2);
            frame.consumed += 2;
            frame
                .streamed
                .push((current.arg, current.len, current.fragments));
            frame.current = None;
            return Ok(Streamed::Continue);
        }
        if frame.elements_left > 0 {
            let at = frame.start + frame.consumed;
            let (value, end) = match read_header(buf, 0, b'$', u64::MAX) {
                Header::Incomplete => return Ok(Streamed::NeedMore),
                Header::Other => {
                    return Err(ReplError::Protocol {
                        offset: at,
                        what: "command argument is not a bulk string".into(),
                    })
                }
                Header::Len { value, end } => (value, end),
            };
            let index = frame.args.len();
            let buffered = (frame.consumed - frame.streamed_bytes) as usize;
            if index > 0 && rule.streams(value, buffered + end) {
                // Saturating: a hostile length must not wrap under the limit.
                let entry_len = entry_buffered
                    .saturating_add(entry_streamed)
                    .saturating_add(frame.consumed)
                    .saturating_add(end as u64)
                    .saturating_add(value.saturating_add(2));
                if entry_len > self.max_entry_bytes {
                    return Err(ReplError::EntryTooLarge {
                        offset: entry_start.unwrap_or(frame.start),
                        len: entry_len,
                        limit: self.max_entry_bytes,
                    });
                }
                buf.advance(end);
                frame.consumed += end as u64;
                frame.streamed_bytes += value;
                frame.current = Some(StreamingArg {
                    arg: index as u32,
                    len: value,
                    left: value,
                    fragments: 0,
                });
                frame.args.push(Bytes::new());
                frame.elements_left -= 1;
                return Ok(Streamed::Continue);
            }
            if value > self.resp_limits.max_bulk_len as u64 {
                return Err(ReplError::Resp(RespError::TooLarge {
                    offset: at,
                    what: "bulk string",
                    len: value,
                    limit: self.resp_limits.max_bulk_len as u64,
                }));
            }
            let total = end + value as usize + 2;
            // What the frame holds buffered, each argument counted with the
            // memory it takes once decoded: a command of millions of empty
            // (never streamed) arguments must not grow without bound.
            let cost = (buffered + total) as u64 + args_overhead(index as u64 + 1);
            if cost > rule.budget_left as u64 {
                return Err(ReplError::TransactionTooLarge {
                    offset: entry_start.unwrap_or(frame.start),
                    limit: self.max_transaction_bytes,
                });
            }
            if buf.len() < total {
                return Ok(Streamed::NeedMore);
            }
            if &buf[total - 2..total] != b"\r\n" {
                return Err(ReplError::Protocol {
                    offset: at,
                    what: "bulk string not followed by CRLF".into(),
                });
            }
            let element = buf.split_to(total).freeze();
            frame.args.push(element.slice(end..total - 2));
            frame.consumed += total as u64;
            frame.elements_left -= 1;
            return Ok(Streamed::Continue);
        }
        let Some(frame) = self.streaming.take() else {
            return Ok(Streamed::Continue);
        };
        self.decoder.skip(frame.consumed);
        self.received = frame.start + frame.consumed;
        self.acks.received.store(self.received, Ordering::Release);
        let buffered = (frame.consumed - frame.streamed_bytes) as usize;
        let command = Command::new(frame.args);
        let event = self.on_command(
            command,
            &frame.streamed,
            frame.streamed_bytes,
            frame.start,
            buffered,
        )?;
        Ok(match event {
            Some(event) => Streamed::Event(event),
            None => Streamed::Continue,
        })
    }

    /// Folds one frame of `len` wire bytes starting at `start` into the state.
    fn on_frame(
        &mut self,
        frame: Frame,
        start: u64,
        len: usize,
    ) -> Result<Option<ReplEvent>, ReplError> {
        let command = frame_to_command(frame, start)?;
        self.on_command(command, &[], 0, start, len)
    }

    /// Folds one command starting at `start` into the state: `len` wire
    /// bytes buffered, plus the `streamed` arguments (`(arg, len,
    /// fragments)`, `streamed_bytes` in all) that came out as fragments.
    fn on_command(
        &mut self,
        command: Command,
        streamed: &[(u32, u64, u32)],
        streamed_bytes: u64,
        start: u64,
        len: usize,
    ) -> Result<Option<ReplEvent>, ReplError> {
        let end = self.received;
        if let Some(tx) = &mut self.transaction {
            tx.bytes = tx.bytes.saturating_add(len);
            tx.streamed_bytes = tx.streamed_bytes.saturating_add(streamed_bytes);
            if tx.bytes > self.max_transaction_bytes {
                return Err(ReplError::TransactionTooLarge {
                    offset: tx.start,
                    limit: self.max_transaction_bytes,
                });
            }
        }
        let control = ["SELECT", "PING", "REPLCONF", "MULTI", "EXEC"];
        if !streamed.is_empty() && control.iter().any(|name| command.is(name)) {
            return Err(ReplError::Protocol {
                offset: start,
                what: format!(
                    "{} with an argument of {} bytes",
                    String::from_utf8_lossy(command.name()),
                    streamed[0].1
                ),
            });
        }
        if command.is("SELECT") {
            let db = parse_select(&command, start)?;
            self.current_db = db;
            match &mut self.transaction {
                Some(tx) if tx.commands.is_empty() => tx.db = db,
                Some(tx) => tx.commands.push(command),
                None => return Ok(Some(self.progress(end))),
            }
            return Ok(None);
        }
        if command.is("PING") || command.is("REPLCONF") {
            if command.is("REPLCONF")
                && command
                    .args
                    .get(1)
                    .is_some_and(|a| a.eq_ignore_ascii_case(b"GETACK"))
            {
                self.acks.getack_at.fetch_max(start, Ordering::AcqRel);
                self.acks.getack.notify_one();
            }
            // Never inside MULTI from a real master; if so, it has no effect.
            if self.transaction.is_some() {
                return Ok(None);
            }
            return Ok(Some(self.progress(end)));
        }
        if command.is("MULTI") {
            if self.transaction.is_some() {
                return Err(ReplError::Protocol {
                    offset: start,
                    what: "MULTI inside a transaction".into(),
                });
            }
            self.transaction = Some(PendingTransaction {
                start,
                db: self.current_db,
                commands: Vec::new(),
                bytes: len,
                streamed: Vec::new(),
                streamed_bytes: 0,
            });
            if len > self.max_transaction_bytes {
                return Err(ReplError::TransactionTooLarge {
                    offset: start,
                    limit: self.max_transaction_bytes,
                });
            }
            return Ok(None);
        }
        if command.is("EXEC") {
            let Some(tx) = self.transaction.take() else {
                return Err(ReplError::Protocol {
                    offset: start,
                    what: "EXEC without MULTI".into(),
                });
            };
            if tx.commands.is_empty() {
                return Ok(Some(self.progress(end)));
            }
            self.offset = end;
            self.db = self.current_db;
            return Ok(Some(ReplEvent::Entry(ReplEntry {
                db: tx.db,
                offset: ReplOffset(end),
                commands: tx.commands,
                transaction: true,
                streamed: tx.streamed,
            })));
        }
        let place = |index: usize| {
            streamed
                .iter()
                .map(move |&(arg, len, fragments)| StreamedArg {
                    command: index as u32,
                    arg,
                    len,
                    fragments,
                })
        };
        if let Some(tx) = &mut self.transaction {
            tx.streamed.extend(place(tx.commands.len()));
            tx.commands.push(command);
            return Ok(None);
        }
        self.offset = end;
        self.db = self.current_db;
        Ok(Some(ReplEvent::Entry(ReplEntry {
            db: self.current_db,
            offset: ReplOffset(end),
            commands: vec![command],
            transaction: false,
            streamed: place(0).collect(),
        })))
    }

    fn progress(&mut self, end: u64) -> ReplEvent {
        self.offset = end;
        self.db = self.current_db;
        ReplEvent::Progress {
            offset: ReplOffset(end),
        }
    }
}

/// Sends `REPLCONF ACK` every `interval`, on each GETACK, and, while a
/// GETACK's answer did not cover everything before it, as soon as the
/// caller's handle does; until the link fails or the session is dropped
/// (which aborts this task).
async fn ack_loop(mut writer: OwnedWriteHalf, acks: Arc<AckShared>, interval: Duration) {
    // The first tick is immediate: the first ack goes out right away.
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    loop {
        let owed = acks.getack_at.load(Ordering::Acquire);
        tokio::select! {
            biased;
            _ = acks.getack.notified() => {}
            _ = acks.allowed.0.raised.notified(), if owed > sent => {
                // A `WAIT` on the master is satisfied by an ack of what was
                // sent before its GETACK: answer once durability covers it,
                // not at the next tick.
                if acks.ack_offset() < owed {
                    continue;
                }
            }
            _ = ticker.tick() => {}
        }
        let offset = acks.ack_offset();
        if let Err(error) = send_ack(&mut writer, offset).await {
            // The read side sees the broken link and reports it.
            debug!(%error, "ack write failed; ack task stops");
            return;
        }
        sent = sent.max(offset);
    }
}

async fn send_ack(writer: &mut OwnedWriteHalf, offset: u64) -> Result<(), ReplError> {
    send(writer, &["REPLCONF", "ACK", &offset.to_string()]).await
}

async fn send<T: AsRef<[u8]>>(writer: &mut OwnedWriteHalf, args: &[T]) -> Result<(), ReplError> {
    let mut buf = BytesMut::new();
    encode_command(args, &mut buf);
    writer.write_all(&buf).await?;
    writer.flush().await?;
    Ok(())
}

/// Sends one handshake command and reads its one-line reply.
async fn exchange(
    link: &mut Link,
    writer: &mut OwnedWriteHalf,
    args: &[&str],
    step: &'static str,
) -> Result<String, ReplError> {
    send(writer, args).await?;
    let line = link
        .read_line(&format!("waiting for the reply to {step}"))
        .await?;
    Ok(lossy(&line))
}

fn expect_ok(reply: &str, step: &'static str) -> Result<(), ReplError> {
    if reply.starts_with('+') {
        Ok(())
    } else {
        Err(handshake_error(step, reply))
    }
}

fn handshake_error(step: &'static str, reply: &str) -> ReplError {
    ReplError::Handshake {
        step,
        reply: reply.chars().take(200).collect(),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn rdb_read_error(
    e: ReadError,
    received: u64,
    expected: Option<u64>,
    after: Duration,
) -> ReplError {
    match e {
        ReadError::Closed => ReplError::RdbTruncated { received, expected },
        ReadError::Timeout => ReplError::Timeout {
            during: format!("receiving the RDB after {received} bytes"),
            after,
        },
        ReadError::Io(e) => ReplError::Io(e),
    }
}

/// `$<len>` or `$EOF:<mark>`; `-ERR ...` when the master gave up.
fn parse_rdb_header(line: &[u8]) -> Result<Phase, ReplError> {
    let bad = |what: String| ReplError::RdbTransfer { received: 0, what };
    if let Some(message) = line.strip_prefix(b"-") {
        return Err(ReplError::MasterError {
            step: "RDB transfer",
            message: lossy(message),
        });
    }
    let Some(rest) = line.strip_prefix(b"$") else {
        return Err(bad(format!(
            "expected $<len> or $EOF:<mark>, got {:?}",
            lossy(line)
        )));
    };
    if let Some(mark) = rest.strip_prefix(b"EOF:") {
        let mark: [u8; EOF_MARK_LEN] = mark.try_into().map_err(|_| {
            bad(format!(
                "EOF mark of {} bytes, expected {EOF_MARK_LEN}",
                mark.len()
            ))
        })?;
        return Ok(Phase::RdbEof { mark, received: 0 });
    }
    let len = std::str::from_utf8(rest)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| bad(format!("bad RDB length {:?}", lossy(rest))))?;
    Ok(Phase::RdbSized { len, received: 0 })
}

/// What the front of the buffer holds during a diskless transfer.
#[derive(Debug, PartialEq, Eq)]
enum EofScan {
    /// This many bytes are payload for sure (at most the chunk size).
    Data(usize),
    /// The buffer starts with the end mark.
    Mark,
    /// Too few bytes to tell payload from a split mark.
    NeedMore,
}

/// Finds how much of `buf` is payload. The payload ends at the first
/// occurrence of the mark (a random 40-char id the master chose for this
/// transfer); the last 39 bytes stay buffered until it is known they are not
/// the start of a mark split across reads.
fn eof_scan(buf: &[u8], mark: &[u8; EOF_MARK_LEN], chunk_size: usize) -> EofScan {
    let window = &buf[..buf.len().min(chunk_size.saturating_add(EOF_MARK_LEN))];
    match window.windows(EOF_MARK_LEN).position(|w| w == mark) {
        Some(0) => EofScan::Mark,
        Some(at) => EofScan::Data(at.min(chunk_size)),
        None => {
            let sure = window
                .len()
                .saturating_sub(EOF_MARK_LEN - 1)
                .min(chunk_size);
            if sure == 0 {
                EofScan::NeedMore
            } else {
                EofScan::Data(sure)
            }
        }
    }
}

/// Memory one buffered argument takes once decoded, beyond its bytes (its
/// `Bytes` handle and frame slot), counted against `max-transaction-bytes`
/// past the first [`FREE_ARGS`] arguments of a command.
const ARG_OVERHEAD: u64 = 48;
const FREE_ARGS: u64 = 1024;

/// The decoded overhead of `args` buffered arguments of one command.
fn args_overhead(args: u64) -> u64 {
    args.saturating_sub(FREE_ARGS).saturating_mul(ARG_OVERHEAD)
}

/// What [`FrameScan::complete`] found at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Certainly not a whole frame yet.
    Incomplete,
    /// May be a whole frame: ask the decoder.
    Complete,
    /// A command with an argument to stream: receive it piecewise.
    Stream,
}

/// What one step of a streamed frame gave.
enum Streamed {
    Event(ReplEvent),
    /// Progress was made; step again.
    Continue,
    NeedMore,
}

/// Incremental completeness check for the usual frame of a replication
/// stream, an array of bulk strings. [`RespDecoder::decode_frame`] rescans a
/// partial frame from its start on every call; this remembers how far the
/// frame at the front of the buffer is known to be whole, so a huge command
/// is scanned once overall rather than once per read. An argument the
/// [`StreamRule`] says to stream is [`Scan::Stream`]. Anything else (another
/// frame type, a bad header, a length over the limits) is reported complete
/// so that the decoder proper decodes it or names the error.
#[derive(Debug, Default, Clone, PartialEq)]
struct FrameScan {
    /// Bytes of the front frame known to be whole (header and elements).
    scanned: usize,
    /// Elements of the array still to be found; `None` before its header.
    elements_left: Option<u64>,
    /// Elements found whole.
    elements_seen: u64,
}

impl FrameScan {
    fn complete(&mut self, buf: &[u8], limits: &RespLimits, rule: &StreamRule) -> Scan {
        let Some(mut left) = self.elements_left else {
            match read_header(buf, 0, b'*', limits.max_aggregate_len as u64) {
                Header::Incomplete => return Scan::Incomplete,
                Header::Other => return Scan::Complete,
                Header::Len { value, end } => {
                    self.scanned = end;
                    self.elements_left = Some(value);
                    return self.complete(buf, limits, rule);
                }
            }
        };
        while left > 0 {
            match read_header(buf, self.scanned, b'$', u64::MAX) {
                Header::Incomplete => return Scan::Incomplete,
                Header::Other => return Scan::Complete,
                Header::Len { value, end } => {
                    if self.elements_seen > 0 && rule.streams(value, end) {
                        return Scan::Stream;
                    }
                    if value > limits.max_bulk_len as u64 {
                        return Scan::Complete;
                    }
                    // Past the budget with arguments that cannot stream (many
                    // small or empty ones): the piecewise path refuses it.
                    let cost = (end as u64)
                        .saturating_add(value)
                        .saturating_add(args_overhead(self.elements_seen + 1));
                    if cost > rule.budget_left as u64 {
                        return Scan::Stream;
                    }
                    let Some(after) = usize::try_from(value)
                        .ok()
                        .and_then(|v| end.checked_add(v)?.checked_add(2))
                    else {
                        return Scan::Complete;
                    };
                    if buf.len() < after {
                        return Scan::Incomplete;
                    }
                    self.scanned = after;
                    self.elements_seen += 1;
                    left -= 1;
                    self.elements_left = Some(left);
                }
            }
        }
        Scan::Complete
    }
}

impl FrameScan {
    /// The command at the front of `buf`, taken out of it, when the scan
    /// found it whole: a non-empty array of bulk strings within the limits,
    /// each followed by its CRLF. `None` leaves `buf` as it is, for the
    /// decoder proper (which names what is wrong, if anything).
    ///
    /// This is the usual frame of the stream: its arguments are slices of
    /// one buffer, without the decoder's second scan and its frame tree.
    fn take_command(&self, buf: &mut BytesMut) -> Option<(Command, usize)> {
        if self.elements_left != Some(0) || self.elements_seen == 0 || buf.len() < self.scanned {
            return None;
        }
        let count = usize::try_from(self.elements_seen).ok()?;
        // Each argument's data, after its header at `pos`: the scan checked
        // every header and length, and the terminators are checked here,
        // before anything is taken.
        let arg_at = |buf: &[u8], pos: usize| -> Option<std::ops::Range<usize>> {
            let Header::Len { value, end } = read_header(buf, pos, b'$', u64::MAX) else {
                return None;
            };
            let data_end = end.checked_add(usize::try_from(value).ok()?)?;
            (buf.get(data_end..data_end.checked_add(2)?)? == b"\r\n").then_some(end..data_end)
        };
        let Header::Len { end: first, .. } = read_header(buf, 0, b'*', u64::MAX) else {
            return None;
        };
        let mut pos = first;
        for _ in 0..count {
            pos = arg_at(buf, pos)?.end + 2;
        }
        if pos != self.scanned {
            return None;
        }
        let frame = buf.split_to(pos).freeze();
        // The same bytes as the first pass: the same ranges, all found.
        let mut args = Vec::with_capacity(count);
        let mut pos = first;
        while let Some(range) = (pos < frame.len()).then(|| arg_at(&frame, pos)).flatten() {
            pos = range.end + 2;
            args.push(frame.slice(range));
        }
        debug_assert_eq!((args.len(), pos), (count, frame.len()));
        Some((Command::new(args), frame.len()))
    }
}

enum Header {
    Incomplete,
    /// Not a well-formed `<tag><len>\r\n` within the limits.
    Other,
    Len {
        value: u64,
        end: usize,
    },
}

/// Reads `<tag><decimal>\r\n` at `pos`.
fn read_header(buf: &[u8], pos: usize, tag: u8, limit: u64) -> Header {
    let Some(&first) = buf.get(pos) else {
        return Header::Incomplete;
    };
    if first != tag {
        return Header::Other;
    }
    let digits_start = pos + 1;
    // u64 lengths have at most 20 digits.
    let window = &buf[digits_start..buf.len().min(digits_start + 22)];
    let Some(cr) = window.iter().position(|b| !b.is_ascii_digit()) else {
        return if window.len() >= 22 {
            Header::Other
        } else {
            Header::Incomplete
        };
    };
    if window[cr] != b'\r' {
        return Header::Other;
    }
    let Some(&lf) = window.get(cr + 1) else {
        return Header::Incomplete;
    };
    let digits = &window[..cr];
    // At most 21 digits, all ASCII (checked above): overflow is the only
    // way to fail.
    let value = (lf == b'\n' && !digits.is_empty())
        .then(|| {
            digits.iter().try_fold(0u64, |value, digit| {
                value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
            })
        })
        .flatten();
    match value {
        Some(value) if value <= limit => Header::Len {
            value,
            end: digits_start + cr + 2,
        },
        _ => Header::Other,
    }
}

/// A propagated command: a non-empty array of bulk strings.
fn frame_to_command(frame: Frame, offset: u64) -> Result<Command, ReplError> {
    let Frame::Array(items) = frame else {
        return Err(ReplError::Protocol {
            offset,
            what: format!("expected a command array, got {}", frame_kind(&frame)),
        });
    };
    if items.is_empty() {
        return Err(ReplError::Protocol {
            offset,
            what: "empty command array".into(),
        });
    }
    let mut args = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Frame::Bulk(b) => args.push(b),
            other => {
                return Err(ReplError::Protocol {
                    offset,
                    what: format!(
                        "command argument is {}, not a bulk string",
                        frame_kind(&other)
                    ),
                })
            }
        }
    }
    Ok(Command::new(args))
}

fn frame_kind(frame: &Frame) -> &'static str {
    match frame {
        Frame::Simple(_) => "a simple string",
        Frame::Error(_) | Frame::BulkError(_) => "an error",
        Frame::Integer(_) => "an integer",
        Frame::Bulk(_) => "a bulk string",
        Frame::Null => "a null",
        Frame::Array(_) => "an array",
        _ => "a RESP3 value",
    }
}

fn parse_select(command: &Command, offset: u64) -> Result<u32, ReplError> {
    match command.args.as_slice() {
        [_, db] => std::str::from_utf8(db)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| ReplError::Protocol {
                offset,
                what: format!("SELECT with a bad db index {:?}", lossy(db)),
            }),
        _ => Err(ReplError::Protocol {
            offset,
            what: format!("SELECT with {} arguments", command.args.len() - 1),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: &[u8; 40] = b"0123456789abcdef0123456789abcdef01234567";

    /// Feeds `data` to the EOF scanner in pieces of `step` bytes, as reads
    /// would, and returns the payload found and what is left after the mark.
    fn run_eof(data: &[u8], step: usize, chunk: usize) -> (Vec<u8>, Vec<u8>) {
        let mut buf = Vec::new();
        let mut payload = Vec::new();
        let mut fed = 0;
        loop {
            match eof_scan(&buf, MARK, chunk) {
                EofScan::Data(n) => {
                    assert!(n <= chunk);
                    payload.extend(buf.drain(..n));
                }
                EofScan::Mark => {
                    buf.drain(..EOF_MARK_LEN);
                    buf.extend_from_slice(&data[fed..]);
                    return (payload, buf);
                }
                EofScan::NeedMore => {
                    assert!(fed < data.len(), "ran out of input before the mark");
                    let n = step.min(data.len() - fed);
                    buf.extend_from_slice(&data[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn eof_mark_found_across_any_split() {
        let body: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut data = body.clone();
        data.extend_from_slice(MARK);
        data.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        for step in [1, 2, 39, 40, 41, 64, 1000] {
            for chunk in [1, 16, 64 * 1024] {
                let (payload, rest) = run_eof(&data, step, chunk);
                assert_eq!(payload, body, "step {step} chunk {chunk}");
                assert_eq!(rest, b"*1\r\n$4\r\nPING\r\n");
            }
        }
    }

    #[test]
    fn eof_mark_prefix_inside_payload_is_payload() {
        let mut data = MARK[..39].to_vec();
        data.extend_from_slice(b"xyz");
        data.extend_from_slice(MARK);
        let (payload, rest) = run_eof(&data, 5, 8);
        assert_eq!(payload, [&MARK[..39], b"xyz"].concat());
        assert!(rest.is_empty());
    }

    mod take_command {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the scan's fast path takes, the decoder reads as the
            /// same command, from the same bytes; what it leaves, it leaves
            /// untouched.
            #[test]
            fn agrees_with_the_decoder(
                args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6),
                edit in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut wire = BytesMut::new();
                crate::redis::resp::encode_command(&args, &mut wire);
                if let Some((at, byte)) = edit {
                    let at = at.index(wire.len());
                    wire[at] = byte;
                }
                // Followed by part of the next command.
                wire.extend_from_slice(&b"*1\r\n$4\r\nPI"[..cut.index(11)]);
                let limits = RespLimits::default();
                let rule = StreamRule { threshold: 1 << 20, budget_left: 1 << 20 };
                let mut scan = FrameScan::default();
                if scan.complete(&wire, &limits, &rule) != Scan::Complete {
                    return Ok(());
                }
                let mut fast_buf = wire.clone();
                let fast = scan.take_command(&mut fast_buf);
                let mut slow_buf = wire.clone();
                let slow = RespDecoder::new(limits)
                    .decode_frame(&mut slow_buf)
                    .ok()
                    .flatten()
                    .and_then(|(frame, len)| frame_to_command(frame, 0).ok().map(|c| (c, len)));
                match fast {
                    Some(fast) => {
                        prop_assert_eq!(Some(fast), slow);
                        prop_assert_eq!(fast_buf, slow_buf);
                    }
                    None => {
                        prop_assert_eq!(fast_buf, wire);
                        if edit.is_none() {
                            prop_assert!(false, "an intact command was left to the decoder");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn frame_scan_agrees_with_the_decoder_at_every_cut() {
        use crate::redis::resp::encode_command;
        let mut data = BytesMut::new();
        encode_command(&["SET", "key", "a value", ""], &mut data);
        encode_command(&["PING"], &mut data);
        let limits = RespLimits::default();
        let rule = StreamRule {
            threshold: 1 << 20,
            budget_left: 1 << 20,
        };
        for cut in 0..=data.len() {
            // Fed byte by byte up to `cut`, as reads would.
            let mut scan = FrameScan::default();
            let mut said_complete = false;
            for end in 0..=cut {
                said_complete = scan.complete(&data[..end], &limits, &rule) == Scan::Complete;
            }
            let decoded = RespDecoder::new(limits)
                .decode_frame(&mut BytesMut::from(&data[..cut]))
                .unwrap()
                .is_some();
            assert_eq!(said_complete, decoded, "cut at {cut}");
        }
        // Other shapes go to the decoder at once.
        for other in [
            &b":1\r\n"[..],
            b"*1\r\n:1\r\n",
            b"*x",
            b"*99999999999999999999999999",
        ] {
            assert_eq!(
                FrameScan::default().complete(other, &limits, &rule),
                Scan::Complete
            );
        }
        // An argument over the threshold, or over the budget, is streamed as
        // soon as its header is in; a command name never is.
        let tight = StreamRule {
            threshold: 4,
            budget_left: 1 << 20,
        };
        let mut scan = FrameScan::default();
        assert_eq!(
            scan.complete(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\n", &limits, &tight),
            Scan::Stream
        );
        let small_budget = StreamRule {
            threshold: 1 << 20,
            budget_left: 20,
        };
        let mut scan = FrameScan::default();
        assert_eq!(
            scan.complete(
                b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\n",
                &limits,
                &small_budget
            ),
            Scan::Stream
        );
        let mut scan = FrameScan::default();
        assert_eq!(
            scan.complete(b"*1\r\n$5\r\n", &limits, &tight),
            Scan::Incomplete
        );
    }

    #[test]
    fn rdb_headers() {
        assert!(matches!(
            parse_rdb_header(b"$12"),
            Ok(Phase::RdbSized { len: 12, .. })
        ));
        assert!(matches!(
            parse_rdb_header(&[b"$EOF:".as_slice(), MARK].concat()),
            Ok(Phase::RdbEof { .. })
        ));
        for bad in [
            &b"$"[..],
            b"$-1",
            b"$12a",
            b"$99999999999999999999999",
            b"$EOF:short",
            b"+OK",
        ] {
            assert!(
                matches!(parse_rdb_header(bad), Err(ReplError::RdbTransfer { .. })),
                "{:?}",
                lossy(bad)
            );
        }
        assert!(matches!(
            parse_rdb_header(b"-ERR bgsave failed"),
            Err(ReplError::MasterError { .. })
        ));
    }

    #[test]
    fn commands_must_be_bulk_arrays() {
        let ok = Frame::Array(vec![Frame::bulk("SET"), Frame::bulk("k")]);
        assert_eq!(
            frame_to_command(ok, 0).unwrap(),
            Command::from_parts(["SET", "k"])
        );
        for bad in [
            Frame::Integer(1),
            Frame::Array(vec![]),
            Frame::Array(vec![Frame::bulk("SET"), Frame::Integer(1)]),
        ] {
            assert!(matches!(
                frame_to_command(bad, 7),
                Err(ReplError::Protocol { offset: 7, .. })
            ));
        }
        let select = |db: &str| parse_select(&Command::from_parts(["SELECT", db]), 3);
        assert_eq!(select("15").unwrap(), 15);
        assert!(select("-1").is_err());
        assert!(select("x").is_err());
    }

    #[test]
    fn retryable_errors() {
        let master = |m: &str| ReplError::MasterError {
            step: "PSYNC",
            message: m.into(),
        };
        assert!(
            master("NOMASTERLINK Can't SYNC while not connected with my master").is_retryable()
        );
        assert!(master("LOADING Redis is loading the dataset in memory").is_retryable());
        assert!(!master("ERR unknown command").is_retryable());
        assert!(!ReplError::Auth {
            step: "AUTH",
            message: "WRONGPASS".into()
        }
        .is_retryable());
    }

    #[test]
    fn ack_handle_never_lowers() {
        let h = AckHandle::default();
        h.set(ReplOffset(10));
        h.set(ReplOffset(5));
        assert_eq!(h.get(), ReplOffset(10));
        let shared = AckShared {
            allowed: h.clone(),
            received: AtomicU64::new(7),
            getack_at: AtomicU64::new(0),
            getack: Notify::new(),
        };
        assert_eq!(shared.ack_offset(), 7, "never beyond what was received");
    }
}
