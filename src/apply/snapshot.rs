//! Loading a snapshot marker: make the target equal to the RDB of the
//! marker's epoch (see the module doc of [`super`] for the protocol).
//!
//! In: the snapshot chunks `(partition, epoch, 0..n)` from the WAL. Out: a
//! flushed target holding the RDB's keys and functions, the checkpoint
//! `applied=M epoch=E`, and load progress in the status. A marker with a
//! slot scope flushes nothing: only the keys of its slots are deleted first
//! ([`Applier::start_scoped_load`]; module doc of [`super`], "Slot scopes").
//!
//! ```text
//! WAL chunks ──(feeder task, blocking reads, 1 MiB chunks)──▶ producer thread:
//!   RdbParser ─▶ Rebuilder ─▶ RESP encoding into one buffer per window
//!   ──(LOAD_QUEUE windows)──▶ writer ─▶ target socket ─▶ reply reader
//!                              └──(LOAD_QUEUE windows awaiting replies)──┘
//! ```
//!
//! # Why it is built this way
//!
//! The load is the longest step of a full sync. Everything per key (parse,
//! command building, encoding) runs on one blocking thread that hands over
//! a whole window at a time (`load-window` commands or `batch-max-bytes`
//! bytes, already encoded), so the threads meet once per window rather than
//! once per RDB event. The writer and the reply reader run at the same time
//! on the two halves of the target connection, so the target always has a
//! window queued while ferry checks the replies of an earlier one; at most
//! `2 × LOAD_QUEUE + 1` windows are between the parser and the replies.
//! Replies are checked one by one (`+OK` without building a frame); a
//! refused command is found again in its window's buffer by offset, so no
//! per-command bookkeeping is kept for the common case.
//!
//! String keys go as `SET` ([`RebuildOptions::strings_by_set`]), and runs of
//! plain `SET key value` (no TTL) in one db are joined into one `MSET` of up
//! to [`MSET_MAX_KEYS`] keys, sent before any other command so that the
//! order of commands per key is unchanged (on a flushed target, `MSET` of
//! distinct keys is the same as their `SET`s). The rest goes as
//! `RESTORE … REPLACE` where the target accepts it, else rebuild commands.
//!
//! Every key's deadline is moved by `expire-grace` before it is rebuilt
//! ([`super::expire`]): it is written as the source's deadline plus the
//! grace, and a key whose deadline passed less than the grace ago is still
//! loaded (the source propagates its `DEL`, which follows the marker).
//!
//! # Why the load waits for the marker (a drainer's WAL)
//!
//! On a drainer's WAL the load starts only at the marker, once the whole
//! epoch is durable there: the marker is what says the snapshot is complete
//! and at which log id `M` it holds, and the flush that starts the load
//! writes `loading=M` in the same transaction, so a crash or an aborted load
//! always restarts from the flush. A drainer's log cannot say where the
//! marker will be (a marker resets it, relay convention 5), and a failed
//! resync whose chunks were shipped early (`ship/mod.rs`) can be followed by
//! an ordinary entry (the listener resumed with `+CONTINUE`), after which a
//! target flushed for that transfer would wait with no data for the next
//! snapshot: a drainer has no fallback of its own to give it. The listener's
//! WAL has both, below.
//!
//! # Loading a resync while it is stored (`ferry sync`)
//!
//! An applier that reads the listener's WAL ([`super::run_direct`]) and is
//! caught up with the log when a full resync of a standalone source starts
//! being stored ([`crate::ship::SnapshotProvider::preload_epoch`]) does not
//! wait for the marker: the marker will be the log's next entry `M`
//! (nothing else is appended to a standalone source's log while its RDB is
//! received), so the load starts at once with the usual `loading=M` flush,
//! and the chunks are fed to the parser as they become durable. Once the
//! RDB is through, the load waits for entry `M`: the marker of that epoch,
//! with the chunk and byte counts fed, commits `applied=M` (and the reader's
//! copy of the marker is then dropped, [`super::Feed`]); anything else ends
//! the load with an error. Every way it can end is one the direct reader
//! already recovers from, since a `loading=M` checkpoint whose `M` is not a
//! loadable marker gets a fallback snapshot (`reader.rs`): a resync that
//! failed and was retried puts another epoch's marker at `M` (loaded from
//! the start), one the source continued with `+CONTINUE` puts an ordinary
//! entry there (a fallback snapshot), and a crash restarts from the flush.
//! The price of a failed resync is a target flushed early. A cluster source
//! or target, and a drainer's WAL, keep waiting for the marker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::checkpoint::Checkpoint;
use super::config::ExistingData;
use super::expire::ExpireGrace;
use super::keyspace::{self, OwnedKeyspace};
use super::scope::{self, ScopeConn};
use super::status::{HandoffWait, SnapshotLoadProgress};
use super::target::Target;
use super::tenure::{self, LoadPlan};
use super::{Applier, ApplyError};
use crate::position::{LogId, PartitionId};
use crate::record::{Record, RecordLimits, SnapshotMarker, INTERNAL_PREFIX};
use crate::redis::client::ClientError;
use crate::redis::cluster::SlotRanges;
use crate::redis::command::Command;
use crate::redis::rdb::rebuild::{Output, RebuildOptions, RebuildStats, Rebuilder, TargetCaps};
use crate::redis::rdb::{ParseOptions, RdbEvent, RdbParser};
use crate::redis::rdb_stream::ChannelReader;
use crate::redis::resp::{encode_command, Frame, RespDecoder, RespLimits};
use crate::wal::{ReadLimits, Wal};

/// Snapshot chunks read from the WAL at a time.
///
/// With the queue below, up to `CHUNKS_PER_READ + CHUNK_QUEUE + 1` chunks of
/// up to 1 MiB are alive at once: ~33 MiB with the earlier 16 + 16, which
/// the load step added on top of both WALs' memtables and block caches (the
/// memory case of `tools/bench --memory`, a 548 MB RDB, peaked at 189-245
/// MiB there; 181-213 MiB with 4 + 4). Eight chunks ahead still keep the
/// parser busy: it takes ~20 ms per 1 MiB chunk.
const CHUNKS_PER_READ: usize = 4;
/// Chunks queued between the WAL reader and the parser.
pub(super) const CHUNK_QUEUE: usize = 4;
/// Encoded windows queued before the writer, and written windows whose
/// replies are not read yet.
const LOAD_QUEUE: usize = 2;
/// Most keys in one `MSET` of consecutive plain `SET`s, and the most bytes
/// of their data: `MSET` of 100 keys costs the target ~0.9 µs per 100-byte
/// key against ~1.3 µs for `SET`s (`redis-cli --pipe`, 300k keys).
const MSET_MAX_KEYS: usize = 128;
const MSET_MAX_BYTES: usize = 64 << 10;
/// How long a failed parse waits for the feeder's own error, which names
/// the cause better (a missing chunk rather than an early end of the RDB).
const FEEDER_GRACE: Duration = Duration::from_secs(2);
/// Refused commands logged one by one per load; the rest are counted.
const LOGGED_REFUSALS: u64 = 10;

/// Commands of the load encoded back to back, as one write.
struct Window {
    wire: Bytes,
    /// Where each command starts in `wire` (one reply each).
    starts: Vec<u32>,
    /// Keys produced up to the end of this window.
    keys_loaded: u64,
}

/// Consecutive plain `SET key value` commands held to be sent as one `MSET`.
#[derive(Default)]
struct MsetRun {
    pairs: Vec<(Bytes, Bytes)>,
    bytes: usize,
}

impl MsetRun {
    /// Takes `cmd` into the run when it is a plain `SET key value`; gives it
    /// back otherwise.
    fn take(&mut self, cmd: Command) -> Option<Command> {
        let plain_set = cmd.args.len() == 3 && cmd.args[0].eq_ignore_ascii_case(b"SET");
        if !plain_set {
            return Some(cmd);
        }
        let mut args = cmd.args.into_iter().skip(1);
        if let (Some(key), Some(value)) = (args.next(), args.next()) {
            self.bytes += key.len() + value.len();
            self.pairs.push((key, value));
        }
        None
    }

    fn is_full(&self) -> bool {
        self.pairs.len() >= MSET_MAX_KEYS || self.bytes >= MSET_MAX_BYTES
    }

    /// Encodes the run (`SET` for a single key, else `MSET`) into `wire`.
    fn flush_into(&mut self, wire: &mut BytesMut, starts: &mut Vec<u32>) {
        let pairs = std::mem::take(&mut self.pairs);
        self.bytes = 0;
        if pairs.is_empty() {
            return;
        }
        starts.push(wire.len() as u32);
        let name: &'static [u8] = if pairs.len() == 1 { b"SET" } else { b"MSET" };
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + 2 * pairs.len());
        args.push(name);
        for (key, value) in &pairs {
            args.push(key);
            args.push(value);
        }
        encode_command(&args, wire);
    }
}

/// What the producer thread needs to turn the RDB into windows.
struct ProducerConfig {
    partition: PartitionId,
    parse: ParseOptions,
    rebuild: RebuildOptions,
    /// The target's `databases`: keys of higher dbs are not sent.
    databases: u32,
    /// Keys this sync does not own are not sent; the others go to the
    /// target db their source db maps to.
    keyspace: OwnedKeyspace,
    /// Only keys of these hash slots are sent (a marker with slot tenures:
    /// the slots it loads); `None`: every key.
    slots: Option<SlotRanges>,
    /// Added to every key's deadline before it is rebuilt.
    expire_grace: ExpireGrace,
    window_commands: usize,
    window_bytes: usize,
}

/// How the producer ended.
struct Produced {
    stats: RebuildStats,
    /// The db the last window left selected.
    db: u32,
    /// Commands not sent because their db is out of the target's range.
    refused_unsent: u64,
}

/// Reads the chunks of `epoch` in order into `chunk_tx`; checks them
/// against the marker.
pub(super) async fn feed_chunks(
    wal: Wal,
    partition: PartitionId,
    marker: SnapshotMarker,
    chunk_tx: mpsc::Sender<Bytes>,
    bytes_fed: Arc<AtomicU64>,
) -> Result<(), String> {
    feed_chunks_until(wal, partition, marker, None, chunk_tx, bytes_fed)
        .await
        .map(|_| ())
}

/// Where a preload's marker is awaited: how often to look again when no
/// append notification comes.
const PRELOAD_POLL: Duration = Duration::from_millis(100);

/// [`feed_chunks`]; with `preload` (module doc, "Loading a resync while it
/// is stored"), `marker` has only its epoch: chunks are fed as they are
/// stored, until the log's entry `preload` is that epoch's marker, which is
/// returned once every chunk it counts was fed.
async fn feed_chunks_until(
    wal: Wal,
    partition: PartitionId,
    mut marker: SnapshotMarker,
    preload: Option<LogId>,
    chunk_tx: mpsc::Sender<Bytes>,
    bytes_fed: Arc<AtomicU64>,
) -> Result<SnapshotMarker, String> {
    let mut seq = 0u64;
    let mut bytes = 0u64;
    let mut appended = wal.subscribe_appends();
    // A preload's marker, once it is in the log.
    let mut known = preload.is_none();
    loop {
        appended.borrow_and_update();
        let read_wal = wal.clone();
        let epoch = marker.epoch;
        let chunks = tokio::task::spawn_blocking(move || {
            read_wal.read_snapshot_chunks(partition, epoch, seq, CHUNKS_PER_READ)
        })
        .await
        .map_err(|error| format!("chunk reader failed: {error}"))?
        .map_err(|error| format!("reading chunk {seq}: {error}"))?;
        if chunks.is_empty() && known {
            break;
        }
        if chunks.is_empty() {
            let at = preload.unwrap_or(LogId::ZERO);
            match preload_marker(&wal, partition, at).await? {
                Some(Record::Snapshot(logged)) if logged.epoch == epoch => {
                    marker = logged;
                    known = true;
                    // Its chunks were all durable before it: read on.
                    continue;
                }
                Some(other) => {
                    return Err(format!(
                        "the resync loaded while it was stored did not end in its marker: entry \
                         {at} is {}",
                        match other {
                            Record::Snapshot(other) =>
                                format!("the marker of epoch {}", other.epoch),
                            _ => "not a snapshot marker".to_string(),
                        }
                    ))
                }
                None => {
                    // Not in the log yet: wait for the next chunk or entry
                    // (the load aborts this task if it ends first).
                    tokio::select! {
                        _ = appended.changed() => {}
                        _ = tokio::time::sleep(PRELOAD_POLL) => {}
                    }
                    continue;
                }
            }
        }
        for (chunk_seq, data) in chunks {
            if chunk_seq != seq {
                return Err(format!(
                    "chunk {seq} is missing (next stored is {chunk_seq})"
                ));
            }
            seq += 1;
            bytes += data.len() as u64;
            if data.is_empty() {
                continue;
            }
            if chunk_tx.send(data).await.is_err() {
                // The parser ended or failed; the producer says why. (A
                // preload's marker is not confirmed: never loaded as done.)
                return match known {
                    true => Ok(marker),
                    false => Err("the parser stopped before the resync was stored".into()),
                };
            }
            bytes_fed.store(bytes, Ordering::Relaxed);
        }
    }
    drop(chunk_tx);
    if seq != marker.chunks || bytes != marker.rdb_bytes {
        return Err(format!(
            "{seq} chunks / {bytes} bytes stored, the marker announces {} chunks / {} bytes",
            marker.chunks, marker.rdb_bytes
        ));
    }
    Ok(marker)
}

/// The record at `log_id` once it is durable (`None` before).
async fn preload_marker(
    wal: &Wal,
    partition: PartitionId,
    log_id: LogId,
) -> Result<Option<Record>, String> {
    let wal = wal.clone();
    tokio::task::spawn_blocking(move || {
        let last = wal.last_log_id(partition).map_err(|e| e.to_string())?;
        if last.unwrap_or(LogId::ZERO) < log_id {
            return Ok(None);
        }
        let one = ReadLimits {
            max_entries: 1,
            max_bytes: 1,
        };
        let entries = wal
            .read(partition, log_id, one)
            .map_err(|e| e.to_string())?;
        match entries.into_iter().find(|entry| entry.log_id == log_id) {
            Some(entry) => Record::decode(&entry.payload, RecordLimits::default())
                .map(Some)
                .map_err(|error| format!("entry {log_id} does not decode: {error}")),
            None => Ok(None),
        }
    })
    .await
    .map_err(|error| format!("reading entry {log_id}: {error}"))?
    .map_err(|error: String| format!("reading entry {log_id}: {error}"))
}

/// The producer thread: parses the RDB from `chunk_rx`, rebuilds commands,
/// encodes them into [`Window`]s sent on `window_tx`. Returns the parse or
/// rebuild error as text; a closed `window_tx` (the load ended early) ends
/// it quietly.
fn produce_windows(
    cfg: ProducerConfig,
    chunk_rx: mpsc::Receiver<Bytes>,
    window_tx: mpsc::Sender<Window>,
) -> Result<Produced, String> {
    let mut parser = RdbParser::new(ChannelReader::new(chunk_rx), cfg.parse);
    let mut rebuilder = Rebuilder::new(cfg.rebuild);
    let mut outputs = Vec::new();
    let mut wire = BytesMut::with_capacity(cfg.window_bytes + (64 << 10));
    let mut starts: Vec<u32> = Vec::with_capacity(cfg.window_commands);
    let mut db = 0u32;
    let mut skipping = false;
    let mut out_of_range_dbs: Vec<u32> = Vec::new();
    let mut refused_unsent = 0u64;
    let mut mset = MsetRun::default();
    loop {
        let mut event = match parser.next_event() {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(error) => return Err(error.to_string()),
        };
        cfg.expire_grace.shift_key_start(&mut event);
        let end = matches!(event, RdbEvent::End { .. });
        match &event {
            RdbEvent::KeyStart(header)
                if header.key.starts_with(INTERNAL_PREFIX)
                    || !cfg.keyspace.replicates(header.db, &header.key)
                    || cfg
                        .slots
                        .as_ref()
                        .is_some_and(|slots| !slots.contains_key(&header.key)) =>
            {
                skipping = true;
                continue;
            }
            RdbEvent::KeyEnd { .. } if skipping => {
                skipping = false;
                continue;
            }
            _ if skipping => continue,
            _ => {}
        }
        rebuilder
            .feed(event, &mut outputs)
            .map_err(|error| error.to_string())?;
        for output in outputs.drain(..) {
            let (cmd_db, cmd) = match output {
                // Into the target db its source db maps to (keys of other
                // dbs were skipped above).
                Output::Command { db, cmd } => match cfg.keyspace.target_db(db) {
                    Some(target) => (Some(target), cmd),
                    None => continue,
                },
                Output::Global { cmd } => (None, cmd),
                Output::Warning { db, key, what } => {
                    warn!(
                        partition = %cfg.partition,
                        db,
                        key = ?key.as_ref().map(|k| String::from_utf8_lossy(k)),
                        what,
                        "snapshot data the target cannot hold"
                    );
                    continue;
                }
            };
            if let Some(cmd_db) = cmd_db {
                if cmd_db >= cfg.databases {
                    refused_unsent += 1;
                    if !out_of_range_dbs.contains(&cmd_db) {
                        out_of_range_dbs.push(cmd_db);
                        warn!(
                            partition = %cfg.partition,
                            db = cmd_db,
                            databases = cfg.databases,
                            "snapshot keys of a db the target does not have are not loaded"
                        );
                    }
                    continue;
                }
                if cmd_db != db {
                    mset.flush_into(&mut wire, &mut starts);
                    starts.push(wire.len() as u32);
                    let db_arg = cmd_db.to_string();
                    encode_command(&[b"SELECT".as_slice(), db_arg.as_bytes()], &mut wire);
                    db = cmd_db;
                }
                // Only db commands join a run (a global one is sent alone).
                let Some(cmd) = mset.take(cmd) else {
                    if mset.is_full() {
                        mset.flush_into(&mut wire, &mut starts);
                    }
                    continue;
                };
                mset.flush_into(&mut wire, &mut starts);
                starts.push(wire.len() as u32);
                encode_command(&cmd.args, &mut wire);
                continue;
            }
            mset.flush_into(&mut wire, &mut starts);
            starts.push(wire.len() as u32);
            encode_command(&cmd.args, &mut wire);
        }
        // `starts` holds u32 offsets: a window ends well before 4 GiB
        // (`batch-max-bytes` is at most 1 GiB, one command at most 512 MiB
        // for the target to accept it).
        let full = starts.len() >= cfg.window_commands || wire.len() >= cfg.window_bytes;
        if full || end {
            mset.flush_into(&mut wire, &mut starts);
        }
        if (full || end) && !starts.is_empty() {
            let window = Window {
                wire: wire.split().freeze(),
                starts: std::mem::replace(&mut starts, Vec::with_capacity(cfg.window_commands)),
                keys_loaded: rebuilder.stats().keys_loaded(),
            };
            wire.reserve(cfg.window_bytes + (64 << 10));
            if window_tx.blocking_send(window).is_err() {
                return Err("the load ended early".into());
            }
        }
    }
    let stats = rebuilder.finish().map_err(|error| error.to_string())?;
    // `End` sent everything; this only guards against a parser that stops
    // without it.
    mset.flush_into(&mut wire, &mut starts);
    if !starts.is_empty() {
        let window = Window {
            wire: wire.split().freeze(),
            starts,
            keys_loaded: stats.keys_loaded(),
        };
        if window_tx.blocking_send(window).is_err() {
            return Err("the load ended early".into());
        }
    }
    Ok(Produced {
        stats,
        db,
        refused_unsent,
    })
}

/// Name and key of an encoded command (`wire` holds exactly one), for
/// the log.
fn describe_command(wire: &[u8]) -> (String, Option<Bytes>) {
    let mut buf = BytesMut::from(wire);
    match RespDecoder::new(RespLimits::default()).decode_frame(&mut buf) {
        Ok(Some((Frame::Array(args), _))) => {
            let name = args
                .first()
                .and_then(Frame::as_bytes)
                .map(|n| String::from_utf8_lossy(n).to_uppercase())
                .unwrap_or_else(|| "?".into());
            let key = args.get(1).and_then(Frame::as_bytes).cloned();
            (name, key)
        }
        _ => ("?".into(), None),
    }
}

pub(super) fn client_error(error: ClientError, reply_timeout: Duration) -> ApplyError {
    match error {
        ClientError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            ApplyError::Timeout(reply_timeout)
        }
        other => ApplyError::Client(other),
    }
}

impl Applier {
    /// Starts the load of `marker` (at `log_id`) in one transaction: the
    /// owned keys of the owned dbs are deleted (internal keys kept) unless
    /// `existing-data = "keep"`, and the checkpoint says `loading=M`. On the
    /// first load into this target (no checkpoint of this sync was there)
    /// with `existing-data = "refuse"`, owned dbs that hold owned keys
    /// refuse it before anything changes ([`ApplyError::ExistingData`]).
    /// Functions are server-wide: only a sync that owns the whole target
    /// (every db, no key filter) flushes them (after the transaction; a
    /// crash in between loads again from the flush).
    async fn start_load(
        &mut self,
        target: &mut Target,
        log_id: LogId,
        marker: &SnapshotMarker,
        caps: TargetCaps,
    ) -> Result<(), ApplyError> {
        let epoch = marker.epoch;
        let policy = self.cfg.existing_data;
        let check = self.first_load && policy == ExistingData::Refuse;
        let flush = policy != ExistingData::Keep;
        info!(
            partition = %self.partition,
            marker = %log_id,
            epoch,
            rdb_bytes = marker.rdb_bytes,
            owned = %self.keyspace,
            first_load = self.first_load,
            existing_data = policy.as_str(),
            "loading snapshot: {}",
            if flush { "emptying the owned dbs of the target" } else { "loading over the target's keys (existing-data = keep)" }
        );
        let loading = Checkpoint::Loading {
            log_id,
            epoch,
            log: self.log_tag,
        };
        let start = self.keyspace.load_start(
            target.databases,
            check,
            flush,
            &self.key,
            loading.encode().as_bytes(),
        );
        // WATCHed like every batch: a late batch of an abandoned connection
        // that moved the checkpoint makes this EXEC null.
        target.client.queue(&Command::new(vec![
            Bytes::from_static(b"WATCH"),
            self.key.clone(),
        ]));
        target.client.queue(&Command::from_parts(["MULTI"]));
        target.client.queue(&start);
        // A partition that held a slot scope and now loads the whole
        // keyspace (its source is no longer a cluster shard) drops it.
        let drop_scope = self.scope.is_some();
        if drop_scope {
            target.client.queue(&Command::new(vec![
                Bytes::from_static(b"DEL"),
                self.scope_key.clone(),
            ]));
        }
        target.client.queue(&Command::from_parts(["EXEC"]));
        target.flush().await?;
        let queued = if drop_scope { 2 } else { 1 };
        let mut replies = Vec::with_capacity(3 + queued);
        for _ in 0..3 + queued {
            replies.push(target.reply().await?);
        }
        let result = match replies.last() {
            Some(Frame::Array(results)) if results.len() == queued => results[0].clone(),
            // The checkpoint this connection watched moved: a late batch of
            // an abandoned connection ran; start again from the checkpoint.
            Some(Frame::Null) => {
                return Err(ApplyError::CheckpointMoved {
                    first: log_id,
                    last: log_id,
                })
            }
            _ => {
                let why = replies
                    .iter()
                    .find_map(Frame::error_message)
                    .unwrap_or_else(|| format!("{:?}", replies.last()));
                return Err(ApplyError::Snapshot {
                    log_id,
                    epoch,
                    what: format!("the target refused the start of the load: {why}"),
                });
            }
        };
        if let Some(error) = result.error_message() {
            if let Some(dbs) = keyspace::parse_existing_data(&error) {
                return Err(ApplyError::ExistingData {
                    partition: self.partition,
                    dbs,
                    slots: None,
                });
            }
            return Err(ApplyError::Snapshot {
                log_id,
                epoch,
                what: format!("the target refused the start of the load: {error}"),
            });
        }
        self.first_load = false;
        self.scope = None;
        if flush && caps.at_least(7, 0) && self.keyspace.owns_whole_target(target.databases) {
            // A refused FUNCTION FLUSH (functions disabled on a managed
            // target) only leaves functions.
            if let Err(error) = target.call(&["FUNCTION", "FLUSH"]).await {
                warn!(partition = %self.partition, %error, "the target refused FUNCTION FLUSH");
            }
        }
        Ok(())
    }

    /// Starts the load of `marker`, whose `scope` holds only the hash slots
    /// `scope` (one cluster shard of the source), without touching the keys
    /// of other slots, which other partitions of this sync may own on the
    /// same target (module doc of [`super`], "Slot scopes"):
    ///
    /// 1. on the first load of this partition (no checkpoint of it) with
    ///    `existing-data = "refuse"`, the owned dbs' keys *of the scope* are
    ///    counted with `SCAN` while the checkpoint is `WATCH`ed; any there
    ///    refuse the load ([`ApplyError::ExistingData`], nothing written);
    /// 2. `WATCH`ed, one `MULTI` writes `loading=M` and the scope
    ///    ([`super::scope::scope_key`]);
    /// 3. unless `existing-data = "keep"` (or step 1 just counted no key of
    ///    the scope), the scope's keys are deleted from each owned db
    ///    ([`super::scope::delete_scope`], bounded steps, not atomic); a
    ///    crash here finds `loading=M` and starts again at step 2.
    ///
    /// Functions (server-wide, in every shard's RDB) are not flushed.
    /// Returns `false` when shutdown interrupted the deletion (the
    /// checkpoint says `loading=M`: the next start deletes again).
    async fn start_scoped_load(
        &mut self,
        target: &mut Target,
        log_id: LogId,
        marker: &SnapshotMarker,
        scope: SlotRanges,
        caps: TargetCaps,
        plan: Option<&LoadPlan>,
    ) -> Result<bool, ApplyError> {
        let epoch = marker.epoch;
        // With slot tenures only the slots the load takes are counted and
        // deleted; `scope` is still what is recorded as the partition's.
        let deleted = plan.map_or_else(|| scope.clone(), |plan| plan.load.clone());
        let policy = self.cfg.existing_data;
        let check = self.first_load && policy == ExistingData::Refuse;
        let conn = ScopeConn {
            reply_timeout: target.reply_timeout,
            unlink: caps.at_least(4, 0),
        };
        let owned = self.keyspace.owned_target_dbs(target.databases);
        info!(
            partition = %self.partition,
            marker = %log_id,
            epoch,
            rdb_bytes = marker.rdb_bytes,
            owned = %self.keyspace,
            %scope,
            first_load = self.first_load,
            existing_data = policy.as_str(),
            "loading a snapshot of slots {scope}: {}",
            if policy == ExistingData::Keep { "loading over the target's keys (existing-data = keep)" } else { "deleting the keys of those slots first" }
        );
        let watch = Command::new(vec![Bytes::from_static(b"WATCH"), self.key.clone()]);
        target.call_command(&watch).await?;
        if check {
            let mut busy = Vec::new();
            for &db in &owned {
                let count = tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(false),
                    count = scope::count_scope(&mut target.client, db, &deleted, &self.keyspace, conn) => count?,
                };
                if count > 0 {
                    busy.push((db, count));
                }
            }
            if !busy.is_empty() {
                return Err(ApplyError::ExistingData {
                    partition: self.partition,
                    dbs: busy,
                    slots: Some(deleted),
                });
            }
        }
        let claims = plan.map(|plan| plan.claims.as_slice()).unwrap_or_default();
        let loading = Checkpoint::Loading {
            log_id,
            epoch,
            log: self.log_tag,
        };
        target.client.queue(&Command::from_parts(["MULTI"]));
        target.client.queue(&Command::new(vec![
            Bytes::from_static(b"SET"),
            self.key.clone(),
            Bytes::from(loading.encode()),
        ]));
        target.client.queue(&Command::new(vec![
            Bytes::from_static(b"SET"),
            self.scope_key.clone(),
            Bytes::from(scope::encode_scope(&scope)),
        ]));
        // The slots the load claims, with `loading=M`.
        if !claims.is_empty() {
            target
                .client
                .queue(&tenure::raise_command(&self.owners_key, claims));
        }
        target.client.queue(&Command::from_parts(["EXEC"]));
        target.flush().await?;
        let expected = if claims.is_empty() { 4 } else { 5 };
        read_watched_exec(target, expected, log_id, epoch, "the start of the load").await?;
        self.first_load = false;
        self.scope = Some(scope.clone());
        for &(slot, owner) in claims {
            self.owners.raise(slot, owner);
        }
        // A first load that counted no key of the scope has nothing to
        // delete (a key written there since by someone else is not ours).
        if policy == ExistingData::Keep || check {
            return Ok(true);
        }
        let mut total = scope::ScopeDeletion::default();
        for &db in &owned {
            let done = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(false),
                done = scope::delete_scope(&mut target.client, db, &deleted, &self.keyspace, conn) => done?,
            };
            total.scanned += done.scanned;
            total.deleted += done.deleted;
        }
        info!(
            partition = %self.partition,
            marker = %log_id,
            scope = %deleted,
            scanned = total.scanned,
            deleted = total.deleted,
            "deleted the keys of the snapshot's slots"
        );
        Ok(true)
    }

    /// Reads the owner map and plans the load of `marker` (at `log_id`),
    /// whose slot tenures say which slots it takes (docs/cluster.md, rule
    /// 6); while a slot's tenure is not open yet (another partition's
    /// handoff is not applied), holds (status HANDOFF) and reads the map
    /// again every [`tenure::HOLD_POLL`]. Nothing is written before the
    /// plan holds no wait. `None` on shutdown.
    async fn plan_tenured_load(
        &mut self,
        target: &mut Target,
        log_id: LogId,
        marker: &SnapshotMarker,
    ) -> Result<Option<LoadPlan>, ApplyError> {
        loop {
            self.owners = target.read_owner_map(&self.owners_key).await?;
            let unvoided = self.marker_without_voids(log_id, marker)?;
            let marker = unvoided.as_ref().unwrap_or(marker);
            let plan = tenure::plan_load(&self.owners, self.partition.0, marker);
            if !plan.handoffs.is_empty() {
                if !self
                    .take_handoffs(target, log_id, marker.epoch, &plan)
                    .await?
                {
                    return Ok(None);
                }
                continue;
            }
            let Some(wait) = plan.wait else {
                self.status.clear_handoff();
                return Ok(Some(plan));
            };
            if !self.wait_load_handoff(target, log_id, wait).await? {
                return Ok(None);
            }
        }
    }

    /// `marker` (at `log_id`) without the slots whose tenure of it is
    /// voided after it in this partition's log (an aborted import,
    /// docs/cluster.md rule 9): they are neither awaited nor loaded, the
    /// shard gave their keys back to the owner. `None`: none is.
    pub(super) fn marker_without_voids(
        &mut self,
        log_id: LogId,
        marker: &SnapshotMarker,
    ) -> Result<Option<SnapshotMarker>, ApplyError> {
        self.scan_voids(log_id.next(), super::SCAN_ENTRIES, |_| false)?;
        let voided = self.voided_after(log_id, marker);
        Ok((!voided.is_empty()).then(|| tenure::without_voided(marker, &voided)))
    }

    /// Holds the load of the marker at `log_id` (status HANDOFF) until the
    /// owner map, at `target` (the master of its slot on a cluster), names
    /// this partition for `wait`'s slot, reading only that slot every
    /// [`tenure::HOLD_POLL`]. `false` on shutdown.
    pub(super) async fn wait_load_handoff(
        &mut self,
        target: &mut Target,
        log_id: LogId,
        wait: tenure::LoadWait,
    ) -> Result<bool, ApplyError> {
        info!(
            partition = %self.partition,
            marker = %log_id,
            slot = wait.slot,
            gen = wait.gen,
            current = ?wait.current,
            "the snapshot load waits for a slot handoff of another partition"
        );
        let mut current = wait.current;
        while current.map_or(true, |owner| owner.partition != self.partition.0) {
            self.status.set_handoff(HandoffWait {
                log_id,
                slot: wait.slot,
                gen: wait.gen,
                current: current.map(|owner| (owner.partition, owner.gen)),
                since_unix_ms: super::status::now_unix_ms(),
            });
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(tenure::HOLD_POLL) => {}
            }
            current = target.read_owner(&self.owners_key, wait.slot).await?;
            // The slot's tenure voided after the marker (rule 9): the load
            // is planned again without it.
            self.scan_voids(log_id.next(), super::SCAN_ENTRIES, |_| false)?;
            if self
                .voids
                .get(&(wait.slot, wait.gen))
                .is_some_and(|at| *at > log_id)
            {
                break;
            }
        }
        Ok(true)
    }

    /// Takes the `handoffs` of a marker (at `log_id`) that the owner map
    /// has not taken yet (rule 6): deletes the target's keys of those
    /// slots (the owned keyspace only, `__ferry*` kept), which are all of
    /// this partition's tenure since the next owner is held until the map
    /// moves, then raises the map in one `MULTI`. A crash during the
    /// deletion finds the map unmoved and deletes again; one after the
    /// `EXEC` finds the handoffs taken. Like the handoff records they
    /// replace (which are before the marker in the log), they are taken
    /// before the load, and before it waits for any slot: a marker that
    /// hands a slot over and waits for it back must not wait for itself.
    /// Returns `false` on shutdown.
    async fn take_handoffs(
        &mut self,
        target: &mut Target,
        log_id: LogId,
        epoch: u64,
        plan: &LoadPlan,
    ) -> Result<bool, ApplyError> {
        let conn = ScopeConn {
            reply_timeout: target.reply_timeout,
            unlink: target.caps.is_some_and(|caps| caps.at_least(4, 0)),
        };
        let mut total = scope::ScopeDeletion::default();
        for db in self.keyspace.owned_target_dbs(target.databases) {
            let done = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(false),
                done = scope::delete_scope(&mut target.client, db, &plan.handed_off, &self.keyspace, conn) => done?,
            };
            total.scanned += done.scanned;
            total.deleted += done.deleted;
        }
        // WATCHed like every batch: a late batch of an abandoned
        // connection that moved the checkpoint makes this EXEC null.
        target.client.queue(&Command::new(vec![
            Bytes::from_static(b"WATCH"),
            self.key.clone(),
        ]));
        target.client.queue(&Command::from_parts(["MULTI"]));
        target
            .client
            .queue(&tenure::raise_command(&self.owners_key, &plan.handoffs));
        target.client.queue(&Command::from_parts(["EXEC"]));
        target.flush().await?;
        read_watched_exec(target, 4, log_id, epoch, "the owner map's handoffs").await?;
        info!(
            partition = %self.partition,
            marker = %log_id,
            slots = %plan.handed_off,
            deleted = total.deleted,
            "took the handoffs of the snapshot: deleted the keys of the slots handed over, moved the owner map"
        );
        Ok(true)
    }

    /// Loads the snapshot of `marker` (at `log_id`). Returns `false` when
    /// shutdown interrupted it (the checkpoint still says `loading`, so the
    /// next start loads again).
    pub(super) async fn load_snapshot(
        &mut self,
        target: &mut Target,
        log_id: LogId,
        marker: SnapshotMarker,
    ) -> Result<bool, ApplyError> {
        self.load_snapshot_of(target, log_id, marker, false).await
    }

    /// Loads the full resync of epoch `epoch` while the listener stores it,
    /// its marker expected at `log_id` (module doc, "Loading a resync while
    /// it is stored"). `Ok(false)` on shutdown.
    pub(super) async fn preload_snapshot(
        &mut self,
        target: &mut Target,
        log_id: LogId,
        epoch: u64,
    ) -> Result<bool, ApplyError> {
        info!(
            partition = %self.partition,
            marker = %log_id,
            epoch,
            "a full resync of the source is being stored: loading it as it comes, its marker expected at the next entry"
        );
        let marker = SnapshotMarker {
            epoch,
            ..SnapshotMarker::default()
        };
        self.load_snapshot_of(target, log_id, marker, true).await
    }

    async fn load_snapshot_of(
        &mut self,
        target: &mut Target,
        log_id: LogId,
        marker: SnapshotMarker,
        preload: bool,
    ) -> Result<bool, ApplyError> {
        if self.cfg.refuse_loads {
            // Two-way sync, established: a load would overwrite this side's
            // writes the other direction has not carried yet.
            return Err(ApplyError::TwoWayLoad {
                partition: self.partition,
                marker: log_id,
            });
        }
        let epoch = marker.epoch;
        let snapshot_error = |what: String| ApplyError::Snapshot {
            log_id,
            epoch,
            what,
        };
        let data_error = |error: String| ApplyError::SnapshotData {
            log_id,
            epoch,
            error,
        };
        let caps = target.caps.ok_or_else(|| {
            snapshot_error("the target's INFO server gave no usable redis_version".into())
        })?;
        // Kept while it loads: the listener's WAL (`ferry sync`) deletes
        // epochs by its own rule (`listener/snapshot.rs`).
        let _pin = self.wal.pin_snapshot(self.partition, epoch);
        // Refuse to flush the target for a snapshot that is not there.
        let wal = self.wal.clone();
        let partition = self.partition;
        let first =
            tokio::task::spawn_blocking(move || wal.read_snapshot_chunks(partition, epoch, 0, 1))
                .await
                .map_err(|error| ApplyError::Task(error.to_string()))??;
        if first.is_empty() && marker.chunks > 0 && !preload {
            return Err(snapshot_error("its chunks are not in the wal".into()));
        }
        // A cluster source's marker with slot tenures (rule 6): waits until
        // every slot's tenure is open, then loads only the slots it takes.
        let tenured = !marker.tenures.is_empty() || !marker.handoffs.is_empty();
        let plan = match tenured {
            true => match self.plan_tenured_load(target, log_id, &marker).await? {
                Some(plan) => Some(plan),
                None => return Ok(false), // shut down while held
            },
            false => None,
        };
        let scope = marker.scope.clone().or_else(|| {
            tenured.then(|| {
                SlotRanges::from_ranges(
                    marker
                        .tenures
                        .iter()
                        .flat_map(|(ranges, _)| ranges.ranges().iter().copied()),
                )
            })
        });
        match scope {
            Some(scope) => {
                if !self
                    .start_scoped_load(target, log_id, &marker, scope, caps, plan.as_ref())
                    .await?
                {
                    return Ok(false); // shut down during the deletion
                }
            }
            None => self.start_load(target, log_id, &marker, caps).await?,
        }
        self.status.set_applied(log_id.prev(), epoch);
        let mut progress = SnapshotLoadProgress {
            log_id,
            epoch,
            rdb_bytes: marker.rdb_bytes,
            ..SnapshotLoadProgress::default()
        };
        self.status.set_snapshot_load(progress.clone());

        let restore_max_bytes = self.cfg.restore_max_bytes.as_usize();
        let mut rebuild = RebuildOptions::new(caps);
        rebuild.replace = true;
        rebuild.restore_max_bytes = restore_max_bytes;
        rebuild.strings_by_set = true;
        let producer_cfg = ProducerConfig {
            partition: self.partition,
            parse: ParseOptions {
                raw_capture_limit: restore_max_bytes,
                ..ParseOptions::default()
            },
            rebuild,
            databases: target.databases,
            keyspace: self.keyspace.clone(),
            slots: plan.map(|plan| plan.load),
            expire_grace: ExpireGrace::new(self.cfg.expire_grace.0),
            window_commands: self.cfg.load_window,
            window_bytes: self.cfg.batch_max_bytes.as_usize(),
        };
        let (chunk_tx, chunk_rx) = mpsc::channel(CHUNK_QUEUE);
        let (window_tx, mut window_rx) = mpsc::channel::<Window>(LOAD_QUEUE);
        let producer =
            tokio::task::spawn_blocking(move || produce_windows(producer_cfg, chunk_rx, window_tx));
        let bytes_fed = Arc::new(AtomicU64::new(0));
        let feeding = tokio::spawn(feed_chunks_until(
            self.wal.clone(),
            self.partition,
            marker.clone(),
            preload.then_some(log_id),
            chunk_tx,
            Arc::clone(&bytes_fed),
        ));
        // Stops the feeder if this load ends early (the producer stops when
        // its input or its output closes).
        let abort_feeding = feeding.abort_handle();
        let _abort = scopeguard(move || abort_feeding.abort());

        let reply_timeout = target.reply_timeout;
        let (mut writer, mut replies) = target.client.split_pipeline(reply_timeout);
        let (written_tx, mut written_rx) = mpsc::channel::<Window>(LOAD_QUEUE);
        // Writes windows as the producer makes them. A window goes to the
        // reader before it is written, so that its replies are read while
        // it is being written: a target whose reply buffer fills stops
        // reading, which would otherwise block the write forever.
        let write = async move {
            while let Some(window) = window_rx.recv().await {
                let wire = window.wire.clone();
                if written_tx.send(window).await.is_err() {
                    break; // the reader failed; its error is the one to report
                }
                tokio::time::timeout(reply_timeout, writer.write_all(&wire))
                    .await
                    .map_err(|_| ApplyError::Timeout(reply_timeout))?
                    .map_err(|error| ApplyError::Client(ClientError::Io(error)))?;
            }
            Ok::<_, ApplyError>(())
        };
        // Checks the replies of each written window, in order.
        let partition = self.partition;
        let status = Arc::clone(&self.status);
        let progress_ref = &mut progress;
        let bytes_fed_ref = &bytes_fed;
        let read = async move {
            while let Some(window) = written_rx.recv().await {
                for (i, &start) in window.starts.iter().enumerate() {
                    let reply = replies
                        .next_unless_ok()
                        .await
                        .map_err(|error| client_error(error, reply_timeout))?;
                    let Some(error) = reply.as_ref().and_then(Frame::error_message) else {
                        continue;
                    };
                    let end = window
                        .starts
                        .get(i + 1)
                        .map_or(window.wire.len(), |&next| next as usize);
                    let (name, key) = describe_command(&window.wire[start as usize..end]);
                    if name == "SELECT" {
                        return Err(ApplyError::Snapshot {
                            log_id,
                            epoch,
                            what: format!("the target refused {name}: {error}"),
                        });
                    }
                    progress_ref.commands_refused += 1;
                    if progress_ref.commands_refused <= LOGGED_REFUSALS {
                        warn!(
                            partition = %partition,
                            marker = %log_id,
                            command = %name,
                            key = ?key.as_ref().map(|k| String::from_utf8_lossy(k)),
                            %error,
                            "the target refused a snapshot command"
                        );
                    }
                }
                progress_ref.bytes_loaded = bytes_fed_ref.load(Ordering::Relaxed);
                progress_ref.keys_loaded = window.keys_loaded;
                status.set_snapshot_load(progress_ref.clone());
            }
            Ok::<_, ApplyError>(())
        };
        let streamed = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(false),
            streamed = async { tokio::try_join!(write, read) } => streamed,
        };
        // The writer ends when the producer does: its own result says
        // whether the whole RDB went out.
        let produced = producer
            .await
            .map_err(|error| ApplyError::Task(error.to_string()))?;
        let produced = match (streamed, produced) {
            (Err(error), _) => return Err(error),
            (Ok(_), Ok(produced)) => produced,
            (Ok(_), Err(why)) => {
                // A feeder failure also ends the parser's input: report it
                // rather than the parser's end of input. The feeder ends
                // right after its input does (a send to a stopped parser
                // fails at once).
                if let Ok(Ok(Err(feed_error))) = tokio::time::timeout(FEEDER_GRACE, feeding).await {
                    return Err(snapshot_error(feed_error));
                }
                return Err(data_error(why));
            }
        };
        // A preload waits here for its marker to be logged.
        let fed = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(false),
            fed = feeding => fed,
        };
        let marker = match fed {
            Ok(Ok(marker)) => marker,
            Ok(Err(why)) => return Err(snapshot_error(why)),
            Err(error) => return Err(ApplyError::Task(error.to_string())),
        };
        progress.rdb_bytes = marker.rdb_bytes;
        progress.commands_refused += produced.refused_unsent;
        let stats = produced.stats;
        if produced.db != 0 {
            target.call(&["SELECT", "0"]).await?;
        }
        let applied = Checkpoint::Applied {
            log_id,
            epoch,
            log: self.log_tag,
            source: None,
        };
        target
            .call_command(&Command::new(vec![
                Bytes::from_static(b"SET"),
                self.key.clone(),
                Bytes::from(applied.encode()),
            ]))
            .await?;
        self.epoch = epoch;
        progress.bytes_loaded = bytes_fed.load(Ordering::Relaxed);
        progress.keys_loaded = stats.keys_loaded();
        progress.done = true;
        info!(
            partition = %self.partition,
            marker = %log_id,
            epoch,
            keys = progress.keys_loaded,
            bytes = progress.bytes_loaded,
            refused = progress.commands_refused,
            expired_skipped = stats.expired_skipped,
            "snapshot loaded"
        );
        self.status.set_snapshot_load(progress.clone());
        self.status
            .add_counts(stats.commands, progress.commands_refused, 0);
        self.status.set_applied(log_id, epoch);
        let _ = self.applied_tx.send(log_id);
        self.loaded_tx.send_replace(epoch);
        self.progressed = true;
        Ok(true)
    }
}

/// Runs `f` when dropped.
pub(super) fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Reads the `expected` replies of a `WATCH … MULTI … EXEC` sent for the
/// load of the marker at `log_id`: `Ok` when every queued command ran; a
/// null `EXEC` is [`ApplyError::CheckpointMoved`] (a late batch moved the
/// checkpoint), any error reply [`ApplyError::Snapshot`] naming `what`.
async fn read_watched_exec(
    target: &mut Target,
    expected: usize,
    log_id: LogId,
    epoch: u64,
    what: &str,
) -> Result<(), ApplyError> {
    let mut replies = Vec::with_capacity(expected);
    for _ in 0..expected {
        replies.push(target.reply().await?);
    }
    match replies.last() {
        Some(Frame::Array(results)) if results.iter().all(|r| r.error_message().is_none()) => {
            Ok(())
        }
        Some(Frame::Null) => Err(ApplyError::CheckpointMoved {
            first: log_id,
            last: log_id,
        }),
        _ => {
            let why = replies
                .iter()
                .find_map(|reply| match reply {
                    Frame::Array(results) => results.iter().find_map(Frame::error_message),
                    other => other.error_message(),
                })
                .unwrap_or_else(|| format!("{:?}", replies.last()));
            Err(ApplyError::Snapshot {
                log_id,
                epoch,
                what: format!("the target refused {what}: {why}"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_command_is_found_again_in_its_window() {
        let mut wire = BytesMut::new();
        encode_command(&[b"SELECT".as_slice(), b"3"], &mut wire);
        let second = wire.len();
        encode_command(&[b"set".as_slice(), b"key:1", b"value"], &mut wire);
        let (name, key) = describe_command(&wire[second..]);
        assert_eq!(name, "SET");
        assert_eq!(key.as_deref(), Some(b"key:1".as_slice()));
        let (name, key) = describe_command(&wire[..second]);
        assert_eq!(
            (name.as_str(), key.as_deref()),
            ("SELECT", Some(b"3".as_slice()))
        );
        assert_eq!(describe_command(b"*2\r\n$3\r\nSE").0, "?");
    }

    fn set(key: &str, value: &str) -> Command {
        Command::from_parts(["SET", key, value])
    }

    #[test]
    fn plain_sets_join_into_mset_and_others_pass_through() {
        let mut run = MsetRun::default();
        assert!(run.take(set("a", "1")).is_none());
        assert!(run.take(set("b", "2")).is_none());
        let with_ttl = Command::from_parts(["SET", "c", "3", "PXAT", "9"]);
        let back = run
            .take(with_ttl.clone())
            .expect("a SET with options is not joined");
        assert_eq!(back, with_ttl);
        let (mut wire, mut starts) = (BytesMut::new(), Vec::new());
        run.flush_into(&mut wire, &mut starts);
        run.flush_into(&mut wire, &mut starts); // nothing left: no command
        assert_eq!(starts, [0]);
        assert_eq!(
            &wire[..],
            b"*5\r\n$4\r\nMSET\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n"
        );
        // A run of one stays a SET.
        assert!(run.take(set("d", "4")).is_none());
        run.flush_into(&mut wire, &mut starts);
        assert_eq!(describe_command(&wire[starts[1] as usize..]).0, "SET");
        for i in 0..MSET_MAX_KEYS {
            assert!(!run.is_full());
            assert!(run.take(set(&format!("k{i}"), "v")).is_none());
        }
        assert!(run.is_full());
    }
}
