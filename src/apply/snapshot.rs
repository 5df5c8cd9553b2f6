//! Loading a snapshot marker: make the target equal to the RDB of the
//! marker's epoch (see the module doc of [`super`] for the protocol).
//!
//! In: the snapshot chunks `(partition, epoch, 0..n)` from the WAL. Out: a
//! flushed target holding the RDB's keys and functions, the checkpoint
//! `applied=M epoch=E`, and load progress in the status.
//!
//! ```text
//! WAL chunks ──(feeder task, blocking reads)──▶ rdb_stream parser thread
//!   ──events──▶ Rebuilder ──commands──▶ target, `load-window` per round trip
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{info, warn};

use super::batch::command_name;
use super::checkpoint::Checkpoint;
use super::status::SnapshotLoadProgress;
use super::target::Target;
use super::{Applier, ApplyError};
use crate::position::{LogId, PartitionId};
use crate::record::{SnapshotMarker, INTERNAL_PREFIX};
use crate::redis::command::Command;
use crate::redis::rdb::rebuild::{Output, RebuildOptions, Rebuilder};
use crate::redis::rdb::{ParseOptions, RdbEvent};
use crate::redis::rdb_stream::{spawn_rdb_parser, RdbFeeder, RdbStreamConfig, RdbStreamError};
use crate::redis::resp::Frame;
use crate::wal::Wal;

/// Snapshot chunks read from the WAL at a time.
const CHUNKS_PER_READ: usize = 16;
/// How long a failed parse waits for the feeder's own error, which names
/// the cause better (a missing chunk rather than an early end of the RDB).
const FEEDER_GRACE: Duration = Duration::from_secs(2);
/// Refused commands logged one by one per load; the rest are counted.
const LOGGED_REFUSALS: u64 = 10;

/// A command sent during the load whose reply is still owed.
enum InFlight {
    /// The loader's own `SELECT`.
    Select(u32),
    /// A command of the RDB: its name and key, for the log.
    Data { name: String, key: Option<Bytes> },
}

/// Reads the chunks of `epoch` in order into `feeder`; checks them against
/// the marker. Returns the bytes fed.
async fn feed_chunks(
    wal: Wal,
    partition: PartitionId,
    marker: SnapshotMarker,
    feeder: RdbFeeder,
    bytes_fed: Arc<AtomicU64>,
) -> Result<(), String> {
    let mut seq = 0u64;
    let mut bytes = 0u64;
    loop {
        let read_wal = wal.clone();
        let epoch = marker.epoch;
        let chunks = tokio::task::spawn_blocking(move || {
            read_wal.read_snapshot_chunks(partition, epoch, seq, CHUNKS_PER_READ)
        })
        .await
        .map_err(|error| format!("chunk reader failed: {error}"))?
        .map_err(|error| format!("reading chunk {seq}: {error}"))?;
        if chunks.is_empty() {
            break;
        }
        for (chunk_seq, data) in chunks {
            if chunk_seq != seq {
                return Err(format!(
                    "chunk {seq} is missing (next stored is {chunk_seq})"
                ));
            }
            seq += 1;
            bytes += data.len() as u64;
            match feeder.feed(data).await {
                Ok(()) => {}
                // The parser ended or failed; its events say why.
                Err(RdbStreamError::ParserStopped) => return Ok(()),
                Err(error) => return Err(error.to_string()),
            }
            bytes_fed.store(bytes, Ordering::Relaxed);
        }
    }
    feeder.finish();
    if seq != marker.chunks || bytes != marker.rdb_bytes {
        return Err(format!(
            "{seq} chunks / {bytes} bytes stored, the marker announces {} chunks / {} bytes",
            marker.chunks, marker.rdb_bytes
        ));
    }
    Ok(())
}

impl Applier {
    /// Loads the snapshot of `marker` (at `log_id`). Returns `false` when
    /// shutdown interrupted it (the checkpoint still says `loading`, so the
    /// next start loads again).
    pub(super) async fn load_snapshot(
        &mut self,
        target: &mut Target,
        log_id: LogId,
        marker: SnapshotMarker,
    ) -> Result<bool, ApplyError> {
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
        // Refuse to flush the target for a snapshot that is not there.
        let wal = self.wal.clone();
        let partition = self.partition;
        let first =
            tokio::task::spawn_blocking(move || wal.read_snapshot_chunks(partition, epoch, 0, 1))
                .await
                .map_err(|error| ApplyError::Task(error.to_string()))??;
        if first.is_empty() && marker.chunks > 0 {
            return Err(snapshot_error("its chunks are not in the wal".into()));
        }
        info!(
            partition = %self.partition,
            marker = %log_id,
            epoch,
            rdb_bytes = marker.rdb_bytes,
            "loading snapshot: flushing the target"
        );

        // Flush and mark the load in one transaction.
        let loading = Checkpoint::Loading { log_id, epoch };
        let mut flush = vec![Command::from_parts(["FLUSHALL"])];
        if caps.at_least(7, 0) {
            flush.push(Command::from_parts(["FUNCTION", "FLUSH"]));
        }
        flush.push(Command::new(vec![
            Bytes::from_static(b"SET"),
            self.key.clone(),
            Bytes::from(loading.encode()),
        ]));
        target.client.queue(&Command::from_parts(["MULTI"]));
        for cmd in &flush {
            target.client.queue(cmd);
        }
        target.client.queue(&Command::from_parts(["EXEC"]));
        target.flush().await?;
        let mut replies = Vec::with_capacity(flush.len() + 2);
        for _ in 0..flush.len() + 2 {
            replies.push(target.reply().await?);
        }
        // FLUSHALL and the checkpoint must have run; a refused FUNCTION FLUSH
        // (functions disabled on a managed target) only leaves functions.
        let committed = match replies.last() {
            Some(Frame::Array(results)) if results.len() == flush.len() => {
                for (result, cmd) in results.iter().zip(&flush) {
                    if let (Some(error), true) = (result.error_message(), cmd.is("FUNCTION")) {
                        warn!(partition = %self.partition, %error, "the target refused FUNCTION FLUSH");
                    }
                }
                results
                    .iter()
                    .zip(&flush)
                    .all(|(result, cmd)| result.error_message().is_none() || cmd.is("FUNCTION"))
            }
            _ => false,
        };
        if !committed {
            let why = replies
                .iter()
                .find_map(Frame::error_message)
                .unwrap_or_else(|| format!("{:?}", replies.last()));
            return Err(snapshot_error(format!(
                "the target refused the flush: {why}"
            )));
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
        let (feeder, mut events) = spawn_rdb_parser(RdbStreamConfig {
            parse: ParseOptions {
                raw_capture_limit: restore_max_bytes,
                ..ParseOptions::default()
            },
            ..RdbStreamConfig::default()
        });
        let bytes_fed = Arc::new(AtomicU64::new(0));
        let feeding = tokio::spawn(feed_chunks(
            self.wal.clone(),
            self.partition,
            marker.clone(),
            feeder,
            Arc::clone(&bytes_fed),
        ));
        // Stops the feeder if this load ends early.
        let abort_feeding = feeding.abort_handle();
        let _abort = scopeguard(move || abort_feeding.abort());

        let mut opts = RebuildOptions::new(caps);
        opts.replace = true;
        opts.restore_max_bytes = restore_max_bytes;
        let mut rebuilder = Rebuilder::new(opts);
        let mut outputs = Vec::new();
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut db = 0u32;
        let mut skipping_internal = false;
        let mut out_of_range_dbs: Vec<u32> = Vec::new();
        // Replies owed for commands already flushed.
        let mut unread_before_flush = 0usize;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(false);
            }
            let event = match events.next().await {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(error) => {
                    // A feeder failure also ends the parser's input: report it
                    // rather than the parser's end of input.
                    // The feeder ends right after its input does (a feed
                    // into a stopped parser fails at once).
                    if let Ok(Ok(Err(why))) = tokio::time::timeout(FEEDER_GRACE, feeding).await {
                        return Err(snapshot_error(why));
                    }
                    return Err(data_error(error.to_string()));
                }
            };
            match &event {
                RdbEvent::KeyStart(header) if header.key.starts_with(INTERNAL_PREFIX) => {
                    skipping_internal = true;
                    continue;
                }
                RdbEvent::KeyEnd { .. } if skipping_internal => {
                    skipping_internal = false;
                    continue;
                }
                _ if skipping_internal => continue,
                _ => {}
            }
            rebuilder
                .feed(event, &mut outputs)
                .map_err(|error| data_error(error.to_string()))?;
            for output in outputs.drain(..) {
                let (cmd_db, cmd) = match output {
                    Output::Command { db, cmd } => (Some(db), cmd),
                    Output::Global { cmd } => (None, cmd),
                    Output::Warning { db, key, what } => {
                        warn!(
                            partition = %self.partition,
                            db,
                            key = ?key.as_ref().map(|k| String::from_utf8_lossy(k)),
                            what,
                            "snapshot data the target cannot hold"
                        );
                        continue;
                    }
                };
                if let Some(cmd_db) = cmd_db {
                    if cmd_db >= target.databases {
                        progress.commands_refused += 1;
                        if !out_of_range_dbs.contains(&cmd_db) {
                            out_of_range_dbs.push(cmd_db);
                            warn!(
                                partition = %self.partition,
                                db = cmd_db,
                                databases = target.databases,
                                "snapshot keys of a db the target does not have are not loaded"
                            );
                        }
                        continue;
                    }
                    if cmd_db != db {
                        target.client.queue(&Command::new(vec![
                            Bytes::from_static(b"SELECT"),
                            Bytes::from(cmd_db.to_string()),
                        ]));
                        in_flight.push_back(InFlight::Select(cmd_db));
                        db = cmd_db;
                    }
                }
                target.client.queue(&cmd);
                in_flight.push_back(InFlight::Data {
                    name: command_name(&cmd),
                    key: cmd.args.get(1).cloned(),
                });
            }
            let window = self.cfg.load_window;
            if in_flight.len() >= unread_before_flush + window
                || target.client.queued_bytes() >= self.cfg.batch_max_bytes.as_usize()
            {
                // The window just sent runs while the replies of the one
                // before it are read.
                target.flush().await?;
                self.read_load_replies(target, &mut in_flight, &mut progress, window)
                    .await?;
                unread_before_flush = in_flight.len();
                progress.bytes_loaded = bytes_fed.load(Ordering::Relaxed);
                progress.keys_loaded = rebuilder.stats().keys_loaded();
                self.status.set_snapshot_load(progress.clone());
            }
        }
        target.flush().await?;
        self.read_load_replies(target, &mut in_flight, &mut progress, 0)
            .await?;
        let stats = rebuilder
            .finish()
            .map_err(|error| data_error(error.to_string()))?;
        match feeding.await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(snapshot_error(why)),
            Err(error) => return Err(ApplyError::Task(error.to_string())),
        }
        if db != 0 {
            target.call(&["SELECT", "0"]).await?;
        }
        let applied = Checkpoint::Applied { log_id, epoch };
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

    /// Reads replies of the load until at most `keep` are owed.
    async fn read_load_replies(
        &mut self,
        target: &mut Target,
        in_flight: &mut VecDeque<InFlight>,
        progress: &mut SnapshotLoadProgress,
        keep: usize,
    ) -> Result<(), ApplyError> {
        while in_flight.len() > keep {
            let Some(sent) = in_flight.pop_front() else {
                break;
            };
            let reply = target.reply().await?;
            let Some(error) = reply.error_message() else {
                continue;
            };
            match sent {
                InFlight::Select(db) => {
                    return Err(ApplyError::Snapshot {
                        log_id: progress.log_id,
                        epoch: progress.epoch,
                        what: format!("the target refused SELECT {db}: {error}"),
                    })
                }
                InFlight::Data { name, key } => {
                    progress.commands_refused += 1;
                    if progress.commands_refused <= LOGGED_REFUSALS {
                        warn!(
                            partition = %self.partition,
                            marker = %progress.log_id,
                            command = %name,
                            key = ?key.as_ref().map(|k| String::from_utf8_lossy(k)),
                            %error,
                            "the target refused a snapshot command"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
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
