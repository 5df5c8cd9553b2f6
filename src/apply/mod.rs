//! The drainer's applier: one partition of the drainer's WAL applied to the
//! target Redis, in log order, exactly once across crashes of the applier
//! and of the target. In `ferry sync` it reads the listener's WAL instead
//! ([`run_direct`]; [`reader`], "Reading the listener's WAL", has what that
//! changes: fallback snapshots for what the log lacks, and the listener's
//! rule for snapshot epochs). Everything below holds for both.
//!
//! In: durable WAL entries ([`crate::record::Record`]s at the listener's log
//! ids) and the snapshot chunks they refer to. Out: `MULTI`/`EXEC`
//! transactions on the target, the WAL's `applied` mark
//! ([`Wal::set_applied`]) and this applier's downstream ack (so retention
//! trims applied entries), deleted snapshot epochs it no longer needs, and
//! an [`ApplyStatus`] for `ferry status`.
//!
//! # Waking up
//!
//! Caught up, the WAL reader waits for the WAL's append notification
//! ([`Wal::subscribe_appends`]), with `idle-poll` (1s) as a fallback poll.
//!
//! # Retention and snapshot epochs
//!
//! The applier registers as a downstream of its partition (`wal-downstream`,
//! default `apply:<drainer-id>`) and acks every applied id once it has been
//! applied for `retain-applied` (default 5s); the `applied` mark moves at
//! once. The delay is for targets that lose their last acknowledged writes
//! but keep data and checkpoint consistent (an `appendfsync everysec` AOF
//! after a machine crash loses up to about 2 s): they come back with an
//! older checkpoint, and the entries after it must still be in the WAL to be
//! applied again (without them that is the fatal [`ApplyError::Gap`]).
//! Entries it has not applied are kept, but `wal-ttl`
//! (and the size cap) stay the hard limit: entries that expire before they
//! are applied, with no snapshot marker in their place, end [`run`] with the
//! fatal [`ApplyError::Gap`] naming the partition and the log id needed.
//! Snapshot epochs it has loaded are deleted by [`collect_drainer_snapshots`]
//! (its doc has the rule).
//!
//! # Exactly once
//!
//! The target is the truth. Every batch of entries is one `MULTI … EXEC`
//! that also writes the checkpoint key
//! `__ferry:checkpoint:<drainer-id>:<partition>` in db 0 (format in
//! [`checkpoint`]): the commands of a batch and the checkpoint naming its
//! last log id commit together or not at all. The checkpoint also names
//! the log tag of the WAL partition whose ids it counts; one of another tag
//! (a rebuilt or swapped WAL dir) is not resumed after: the applier loads
//! the snapshot marker the WAL starts with, or waits for one
//! ([`ApplyError::ForeignCheckpoint`], retried). On start, and after every
//! reconnect, the applier reads the checkpoint back and resumes right after
//! it, so a batch whose `EXEC` ran is never sent again and one that did not
//! run is sent again. A target that persists (AOF) writes a `MULTI`/`EXEC`
//! atomically, so after its own crash it comes back with data and checkpoint
//! from the same moment and the applier continues from there.
//!
//! The WAL's `applied` mark is advisory (status, retention decisions): it is
//! set only after `EXEC`'s reply was read, so a crash between the two leaves
//! it *behind* the checkpoint, never ahead; the applier then moves it up to
//! the checkpoint. It can only be *ahead* when the target lost writes it had
//! acknowledged (restarted without persistence, restored from an older
//! backup, flushed by hand, or a different server behind the same address):
//! the applier logs a warning and re-applies from the target's checkpoint,
//! which is what the target needs.
//!
//! # Applying before the fsync
//!
//! An applier of the listener's own WAL (`ferry sync`) with `early-apply`
//! (the default) applies an entry while the WAL write holding it is being
//! fsynced, instead of after: the write is in the WAL's read tail when its
//! batch goes to the storage ([`Wal::read_written`]). A write then waits for
//! one fsync less (the one in flight, then its own). What stays as it was:
//!
//! - The listener acks the source (`REPLCONF ACK`) only for what is durable,
//!   so after a crash the source sends every entry that was not durable
//!   again, the same bytes at the same offsets.
//! - The WAL's `applied` mark and this applier's downstream ack move only
//!   over durable entries ([`keep_wal_marks`]).
//! - Only writes are applied early. A snapshot marker, a big value (its
//!   fragments and the write that streams them: a restart stores them
//!   again, at other ids), a slot handoff or void waits to be durable, and
//!   so does every entry after it. So the entries the target holds past the WAL's durable
//!   end after a crash are exactly one entry per command of the source's
//!   stream between the two.
//! - A batch whose last entry was read before it was durable writes a `v3`
//!   checkpoint: the entry's source position (replication id, offset after
//!   it) with its log id ([`checkpoint`]).
//!
//! On start, a `v3` checkpoint is checked before anything is applied
//! ([`reader`], "Early reads"), unless the WAL's own `applied` mark is at or
//! past it (then the WAL holds that entry durable, as this applier applied
//! it: the usual case of a target that restarted while ferry ran on, whose
//! entry may be trimmed by now). Once the WAL is durable up to the log id
//! it names, the entry there must have the same source position. A replication
//! id and an offset name one history of the source (that is what `PSYNC`
//! relies on), and the same number of commands of it ends at the same log
//! id only if they are the same commands, so the applier resumes after it.
//! Anything else (the listener full-synced meanwhile: a snapshot marker
//! before it is loaded; a promoted replica that lacked those writes: another
//! replication id there) is a history that the target's data did not come
//! from, and a fallback snapshot of the source replaces it. Both outcomes are
//! logged, and tests/early_apply.rs kills `ferry sync` ahead of its WAL
//! (with `FERRY_TEST_WAL_SYNC_DELAY_MS` slowing every fsync) for each.
//!
//! A drainer's applier and a cluster target's never apply early: a drainer's
//! WAL is fed by a listener that re-sends by log id, not by source position,
//! and a cluster target's per-slot checkpoints have no `v3`.
//!
//! A connection the applier gave up on (a reply timeout, a stalled target,
//! a slow network) may still have a whole batch on its way to the target
//! or unread in the target's query buffer, which the target would run once
//! it gets to it, possibly after the next connection read the checkpoint.
//! Two guards keep such a late batch out:
//!
//! - **The fence** ([`fence`]). Every connection names itself `CLIENT
//!   SETNAME ferry-apply:<drainer-id>:<partition>` before it sends any
//!   batch, and a new session, before it reads the checkpoint, lists the
//!   target's clients and `CLIENT KILL ID`s every other one with that name.
//!   What a killed connection had sent can never run afterwards (Redis 7.0
//!   `src/networking.c`): `CLIENT KILL` calls `freeClient` at once (the
//!   connection is not the caller), which frees the query buffer with
//!   whatever it still holds unparsed, frees the `MULTI` state with the
//!   commands queued so far (`freeClientMultiState`), and `unlinkClient`
//!   removes it from the client list and from the io-threads'
//!   pending-read list (so a read already done by an I/O thread is not
//!   processed either) and closes the socket (`connClose`): bytes still in
//!   flight then meet a closed socket (the kernel answers with a reset).
//!   Only a client marked `CLIENT_PROTECTED` (one whose script runs long,
//!   while the target answers everyone else `-BUSY`, so the kill itself
//!   waits) is freed asynchronously instead, and `processInputBuffer` runs
//!   nothing more for a client marked `CLIENT_CLOSE_ASAP`. Commands are run by the one main thread,
//!   so no command of the killed connection is half-way through meanwhile;
//!   an `EXEC` of it that ran before the kill is visible to the checkpoint
//!   read that follows. A connection only sends a batch after its
//!   `SETNAME` was answered, so any connection with a batch in flight is
//!   named at the target when the next session lists the clients.
//! - **`WATCH`**. Every connection `WATCH`es the checkpoint key before it
//!   reads it, and every batch is `WATCH checkpoint; MULTI …; EXEC`: if a
//!   late batch moved the checkpoint, the next `EXEC` is refused (a null
//!   reply), the session ends ([`ApplyError::CheckpointMoved`]) and the
//!   next one resumes after the checkpoint the late batch wrote. This alone
//!   does not cover a late batch that commits *after* this connection's
//!   first `EXEC`.
//!
//! A target user that may not run `CLIENT SETNAME`/`LIST`/`KILL` (ACL
//! without `@admin`, a renamed command) gets the session anyway, guarded
//! by `WATCH` alone: a warning is logged and `ferry status` shows the
//! fence as `watch-only: <why>` instead of `client-kill`. Refusing to run
//! would stop every managed Redis that forbids `CLIENT KILL`; the window
//! left open needs a batch held back longer than `reply-timeout` and then
//! delivered (tests/apply.rs drives it through a proxy). Grant the user
//! `+client` to close it.
//!
//! # Batches and pipelining
//!
//! A batch ([`batch`]) holds up to `batch-max-entries` entries /
//! `batch-max-bytes`; a source transaction (one record) is never split, so
//! it stays atomic. While the `EXEC` of batch *k* runs, the `MULTI` and
//! commands of batch *k + 1* are already sent and queued on the server; its
//! `EXEC` is sent only once *k*'s `EXEC` reply says it committed. Sending
//! several `EXEC`s ahead would not be safe: if *k* were discarded at queue
//! time (`EXECABORT`: out of memory, a read-only replica, a command the
//! target does not know) a later batch could still commit and move the
//! checkpoint past *k*'s entries. With one `EXEC` in flight, the batches that
//! committed are always a prefix of those sent.
//!
//! Commands whose keys are all internal (`__ferry*`: the listener's
//! heartbeats, another ferry's checkpoints) are not applied but are covered
//! by the checkpoint.
//!
//! # Expiry
//!
//! Every deadline written to the target, by the stream and by snapshot
//! loads, is the source's plus `expire-grace` ([`expire`] has the rules and
//! why): keys leave the target by the source's `DEL`, as on a replica, and
//! the target's own expiry is only a late backstop.
//!
//! # Failures
//!
//! - A command the target refuses *inside* `EXEC` (a runtime error such as
//!   `WRONGTYPE`) is not retried: the source refused or would refuse the
//!   same. It is counted, logged with its log id and name, and shown in the
//!   status. A record the applier refuses itself, without sending it (it
//!   names a db the target does not have, or would touch what this sync
//!   does not own: [`keyspace`]), is counted and shown the same way.
//! - `EXECABORT` explained by a data command refused when queued: see
//!   "Refused entries".
//! - `EXECABORT` otherwise (the applier's own checkpoint `SET` refused,
//!   `OOM` on a batch of only deletions), a refused `MULTI`, a connection
//!   error, a reply timeout: the connection is dropped (which discards a
//!   queued `MULTI`), the status goes OFFLINE with the error, and after a
//!   capped exponential backoff the applier reconnects, re-reads the
//!   checkpoint and resends from there.
//! - A corrupt entry or snapshot in the WAL, or the applier's own `SELECT` or
//!   checkpoint `SET` refused inside `EXEC`, ends [`run`] with an error: no
//!   retry can fix them.
//!
//! # Refused entries
//!
//! When the target refuses a data command *when it is queued* (`ERR
//! unknown command` on an older target, wrong arguments, `NOPERM`, `OOM`,
//! `READONLY`, ...) its `EXEC` returns `EXECABORT` and nothing of the batch
//! ran. The reply to each queued command names the refused one, so its
//! entry is known ([`ApplyError::Refused`]). The applier then holds at
//! that entry: the status says BLOCKED with its log
//! id, command and error ([`BlockedEntry`]), batches end before it (so the
//! entries before it are applied) and it is sent alone. An entry the
//! applier refuses itself, before sending it (it cannot be applied without
//! touching what this sync does not own, it names a db the target lacks, or
//! ferry's own keys among data keys: [`batch`]), is held the same way, as
//! an entry refusal (`transient` false). What happens next
//! depends on the refusal and on `on-refused` ([`OnRefused`]):
//!
//! | refusal | `stop` (default) | `skip-and-record` |
//! |---|---|---|
//! | about the entry (`ERR`, `NOPERM`) | tried again every `retry-backoff-max` until it applies (the target was fixed) or `ferry skip` skips it | skipped and recorded at once |
//! | about the target's state (`OOM`, `READONLY`, `LOADING`, `BUSY`, `MASTERDOWN`, `MISCONF`, ...; `transient` in the status) | retried with backoff until it clears, or `ferry skip` | the same: never skipped by itself (it would skip everything while it lasts) |
//!
//! `ferry skip --partition P --log-id N` ([`ApplyStatus::request_skip`])
//! is taken only for the entry the partition is blocked on, and wakes the
//! applier out of its wait. A skipped entry is appended to the dead-letter
//! file and fsync'd ([`dead_letter`]: `<data-dir>/dead-letter/<drainer-id>-
//! <partition>.resp`, replayable with `redis-cli --pipe`) *before* the
//! batch that moves the checkpoint past it is sent; that batch is a normal
//! `WATCH`/`MULTI`/`EXEC` of only the checkpoint `SET`, so the entry is
//! skipped exactly once, and a crash between the record and the `EXEC`
//! skips it again without recording it twice. Nothing is skipped without a
//! record: with no dead-letter dir, `skip-and-record` is a config error and
//! `ferry skip` is refused.
//!
//! A write with streamed arguments (`src/record.rs`, "Big entries") is held
//! together with its fragment run (the batch before it ends before the run),
//! and when it is skipped its record in the dead-letter file carries the
//! whole values, written from the fragments as they are read. An argument
//! longer than the target's `proto-max-bulk-len` (read with `CONFIG GET` on
//! every connection; the target would drop the connection on its header) is
//! refused by the applier itself before anything of the entry is sent, as
//! an entry refusal (`ERR`, not transient): it holds until the target's
//! limit is raised, or it is skipped.
//!
//! # Snapshots
//!
//! A [`crate::record::Record::Snapshot`] marker at log id `M` means "the
//! state at `M` is the RDB of epoch `E`" (relay conventions 3 and 4, docs/ARCHITECTURE.md). The
//! applier waits for the batches before it, then in one transaction deletes
//! the keys this sync owns in the dbs it owns, keeping ferry's own keys and
//! every key outside its key filter ([`keyspace`]; on the first load into
//! the target, `existing-data` decides what happens to keys already there),
//! and writes the checkpoint `loading=M` (a sync that owns the whole target
//! also flushes functions, on 7.0+); it then streams the
//! RDB from the WAL's snapshot chunks through the parser and a
//! [`crate::redis::rdb::rebuild::Rebuilder`] (strings by `SET`/`MSET`, other
//! keys by `RESTORE … REPLACE` where the target accepts it), pipelined with
//! writes and reply reads overlapping (`snapshot.rs` has the details),
//! skipping internal keys, keys outside the key filter and source dbs not
//! replicated (the others go to the target db theirs maps to), and finally
//! writes
//! `applied=M epoch=E`. A crash during the load finds `loading=M` and loads
//! again from the flush. When the entries after the checkpoint were trimmed
//! from the WAL and the first entry still stored is a snapshot marker, the
//! applier continues from that marker.
//!
//! # Slot scopes
//!
//! A marker may carry a slot `scope` (a Redis Cluster source: one partition
//! per shard, the shard's hash slots). All partitions of a sync apply into
//! the same target, so a partition with a scope owns, within the owned dbs,
//! only the keys of its slots, and never empties a db. Its scope is the one
//! of the last marker it loaded, kept in the target next to the checkpoint
//! ([`scope::scope_key`], written in the transaction that writes
//! `loading=M`, read back by every session; dropped when an unscoped marker
//! is loaded), since the marker itself is trimmed from the log once applied.
//!
//! Loading a scoped marker ([`scope`] has the deletion and why it is not
//! one script):
//!
//! 1. first load of the partition (no checkpoint of it) with
//!    `existing-data = "refuse"`: `WATCH` the checkpoint, then count the keys
//!    *of the scope* in the owned dbs with `SCAN` ([`scope::count_scope`]);
//!    any refuse the load ([`ApplyError::ExistingData`], nothing written).
//!    Keys another partition loaded are of other slots: they never refuse
//!    it;
//! 2. one `MULTI` (the `WATCH` still on) writes `loading=M` and the scope;
//! 3. unless `existing-data = "keep"`, or step 1 counted no key, the
//!    scope's keys are deleted from every owned db in bounded steps
//!    ([`scope::delete_scope`]: `SCAN … COUNT`, `UNLINK` of at most 1000
//!    keys, `__ferry*` kept);
//! 4. the RDB is loaded as above, every key whatever its slot (a shard's RDB
//!    holds the keys of slots it is importing), then `applied=M`.
//!
//! Atomic: step 2 alone; its `EXEC` is refused if another connection of
//! this applier moved the checkpoint after step 1 began (the `WATCH`). Not
//! atomic: the count of step 1 is not a snapshot (a key of the scope that
//! someone else writes after the `SCAN` passed its place and before step
//! 2's `EXEC` is not counted); the deletion is visible to readers key by
//! key. Crash-safe: nothing is deleted or loaded before `loading=M` is
//! written, and a session that finds `loading=M` starts again at step 2
//! (no count: it is not a first load), so the deletion is run again from
//! the start, which is idempotent.
//!
//! A `FLUSHALL`/`FLUSHDB` in a scoped partition's stream (a shard's flush
//! empties only that shard) is the deletion of the scope's keys in the
//! owned dbs it covers ([`batch`]): its entry `L` is never batched with
//! others, and is applied once every batch before it committed as the
//! deletion (outside `MULTI`: a big scope cannot be one script), then one
//! `WATCH`/`MULTI`/`EXEC` with the rest of the entry and `applied=L`. A
//! crash in between leaves the checkpoint at `L - 1`, and the next session
//! runs the deletion again: from the state at `L - 1`, deleting the scope's
//! keys ends in the same state however much of it ran before, so `L` is
//! applied exactly once. Commands before the flush in the same entry are
//! dropped when the flush erases them (keyed commands in a db it covers),
//! and the entry is refused otherwise (held at like any entry the applier
//! refuses). Keys of the scope's slots are the partition's own; keys of
//! slots outside it that the shard held (slots it was importing) are not
//! deleted by its flush: they belong to another partition's scope. The
//! scope is the last marker's: slots migrated away from the shard after
//! its snapshot are still deleted by its flush, until its next snapshot.
//!
//! # Slot tenures (a cluster source's resharding)
//!
//! A cluster source's writes carry their slot's tenure, its handoff
//! records move a slot to another partition, and its markers carry the
//! tenures of their slots and the handoffs before them (docs/cluster.md,
//! "The rule: slot tenures"). The partitions of the drainer share the
//! owner map `__ferry:slots:<drainer-id>` on the target ([`tenure`]), read
//! at every session's start. A tagged write is applied when the map names
//! its partition as the owner of its slot, else held (HANDOFF: the batch
//! before it commits, then the slot is read again every 200 ms, shutdown
//! still answered). A handoff record raises the map in the `MULTI` that
//! covers it ([`batch`]). A marker with tenures takes its handoffs, waits
//! until the map names it for every slot it loads (or claims them), and
//! loads only those slots ([`snapshot`]). Untagged entries are applied as
//! before; an untagged `RESTORE-ASKING` holds (BLOCKED). A cluster target
//! follows the same rules ([`cluster`], "Slot tenures").
//!
//! # Cluster targets
//!
//! A target that is a Redis Cluster (any node or a seed list) is applied by
//! [`cluster`]: the same batches, cut into one `MULTI`/`EXEC` per target
//! slot, each with its own slot checkpoint, plus a partition floor written
//! once every piece of a batch committed; entries over several slots split
//! and counted; `MOVED`/`ASK`/`TRYAGAIN`/`CLUSTERDOWN` followed or waited
//! out. Its module doc has the design and the recovery rules.
//!
//! # Two-way sync
//!
//! With `two_way_peers` (set by `ferry sync --two-way` and `ferry site`;
//! src/node/two_way.rs and src/node/site.rs have the design), this
//! applier's source is also written by the appliers of the peer partitions
//! (this drainer's, or `two_way_echo_of`'s). Their batches come back in the
//! source's stream as entries that write one of their checkpoint keys (a standalone target's
//! checkpoint, a cluster target's slot checkpoints and floor): the batch
//! builder covers them without sending anything (`echo`, counted as
//! `echoes`). A batch that
//! covers only entries that apply nothing (heartbeats, echoes) is *silent*:
//! it is not written at once, or each side's checkpoint write would be echoed
//! by the other for ever; it waits for the next batch with data (whose
//! checkpoint covers it) or [`SILENT_FLUSH`] (a quarter of `wal-ttl` at
//! most, so retention never trims entries the target's checkpoint is
//! before). Until then the target's checkpoint is behind entries that apply
//! nothing, which a restart covers again. `FLUSHALL`/`FLUSHDB`/`SWAPDB` are
//! refused like an entry that would reach outside the owned keyspace, and
//! with `refuse_loads` any snapshot load is [`ApplyError::TwoWayLoad`].
//! Into a cluster the same holds (the silent batch moves no floor), and a
//! command without keys other than `PUBLISH` (`FUNCTION ...`) is refused:
//! run on every master, it would come back from the masters whose
//! transaction holds no checkpoint.

mod batch;
pub mod checkpoint;
mod cluster;
pub mod config;
pub mod dead_letter;
pub mod expire;
mod fence;
pub mod foreign;
pub mod keyspace;
mod reader;
pub mod scope;
mod snapshot;
pub mod status;
mod target;
pub mod tenure;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::position::{LogId, PartitionId};
use crate::record::RecordLimits;
use crate::record::{Record, RecordError};
use crate::redis::client::ClientError;
use crate::redis::cluster::SlotRanges;
use crate::redis::command::Command;
use crate::redis::rdb_stream::RdbStreamError;
use crate::redis::resp::{encode_array_header, encode_bulk, encode_bulk_header, Frame};
use crate::ship::SnapshotProvider;
use crate::wal::{DownstreamId, ReadLimits, SnapshotPhase, Wal, WalError};

use batch::{Batch, BatchBuilder, BatchOutcome, Hold, Pending, StreamedPlace, TenureWait};
use checkpoint::{checkpoint_key, Checkpoint, CheckpointError, SourceMark};
use dead_letter::{DeadEntry, DeadLetter, DeadLetterError, SkippedBy};
use fence::Fence;
use reader::{spawn_reader, ReadResult, ReaderConfig};
use target::Target;

pub use batch::{EchoRule, ReplyError};
pub(crate) use cluster::slot_checkpoint_key;
pub use config::{ApplyConfig, ApplyConfigError, ExistingData, OnRefused};
pub use keyspace::{FilterConfig, OwnedKeyspace};
pub use status::{
    ApplyReport, ApplyStatus, BlockedEntry, HandoffWait, RefusedCommand, SkipRefused,
    SnapshotLoadProgress, SyncState,
};

/// Errors at the applier boundary. [`ApplyError::is_fatal`] tells which end
/// [`run`]; the others are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Config(#[from] ApplyConfigError),
    #[error("wal: {0}")]
    Wal(#[from] WalError),
    #[error("partition {partition}: entry {log_id} does not decode: {error}")]
    Record {
        partition: PartitionId,
        log_id: LogId,
        error: RecordError,
    },
    /// Entries the target still needs were trimmed from the drainer's WAL
    /// (past `wal-ttl` or the size cap) before they were applied, and no
    /// snapshot marker replaces them. Fatal: nothing in this WAL can bring
    /// them back.
    #[error(
        "partition {partition}: entry {wanted} is needed but the WAL starts at {first_available} \
         without a snapshot marker there (trimmed past wal-ttl or the size cap before it was \
         applied); the target needs a snapshot: restore the target, or stop the drainer, move its \
         WAL dir away and start it again (a drainer without data gets a fresh snapshot from the \
         listener)"
    )]
    Gap {
        partition: PartitionId,
        wanted: LogId,
        first_available: LogId,
    },
    #[error(
        "partition {partition}: two-way sync must not load a snapshot (the marker at {marker}: \
         the source's stream broke, by a full resync after its backlog was overrun or entries \
         expired past wal-ttl): it would overwrite the writes on this side that the other \
         direction has not carried yet. Two-way sync stops here; compare both sides (ferry \
         verify) and start it again from a new data dir"
    )]
    TwoWayLoad {
        partition: PartitionId,
        marker: LogId,
    },
    #[error("partition {partition}: {what}")]
    Inconsistent {
        partition: PartitionId,
        what: String,
    },
    /// The target's checkpoint counts the ids of another WAL's log (this
    /// WAL dir was deleted and started again, or swapped for another
    /// drainer's), and the WAL does not start with a snapshot marker that
    /// could replace what the target holds. Retried: the listener sends a
    /// snapshot to a drainer that holds none of its log.
    #[error(
        "partition {partition}: the target's checkpoint counts the log ids of another WAL (log \
         {checkpoint:016x}; this WAL's is {wal:016x}), so it cannot resume after it; waiting for \
         a snapshot marker to load (if none comes, stop the drainer and move its WAL dir away: a \
         drainer without data gets a snapshot)"
    )]
    ForeignCheckpoint {
        partition: PartitionId,
        checkpoint: u64,
        wal: u64,
    },
    #[error("target: {0}")]
    Client(#[from] ClientError),
    #[error("target did not answer within {0:?}")]
    Timeout(Duration),
    #[error("target checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("batch of entries {first}..={last} was not applied: {error}")]
    Aborted {
        first: LogId,
        last: LogId,
        error: String,
    },
    #[error("target: {0}")]
    Reply(#[from] ReplyError),
    /// The snapshot cannot be loaded now (chunks missing, the flush refused).
    #[error("snapshot epoch {epoch} (marker {log_id}): {what}")]
    Snapshot {
        log_id: LogId,
        epoch: u64,
        what: String,
    },
    /// The snapshot's RDB does not parse or rebuild.
    #[error("snapshot epoch {epoch} (marker {log_id}) does not load: {error}")]
    SnapshotData {
        log_id: LogId,
        epoch: u64,
        error: String,
    },
    #[error("applier task failed: {0}")]
    Task(String),
    /// The first full sync into this target found keys this sync owns in
    /// the dbs it owns (of the partition's hash slots, when its snapshot has
    /// a slot scope), and `existing-data = "refuse"`: nothing was written.
    #[error(
        "partition {partition}: the target already holds keys in the dbs this sync owns ({}{}); \
         nothing was written. Choose existing-data = \"keep\" (load over them, keep the others) \
         or \"flush\" (delete them first), or empty those dbs, or own other dbs or keys \
         ([filter] dbs, db-map, key-prefix)",
        .dbs.iter().map(|(db, keys)| format!("db {db}: {keys} keys")).collect::<Vec<_>>().join(", "),
        .slots.as_ref().map(|slots| format!(" in hash slots {slots}")).unwrap_or_default()
    )]
    ExistingData {
        partition: PartitionId,
        dbs: Vec<(u32, u64)>,
        /// The partition's slot scope, when only its keys were counted.
        slots: Option<SlotRanges>,
    },
    /// `EXEC` was refused because the checkpoint key changed after this
    /// connection `WATCH`ed it: a batch of an earlier, abandoned connection
    /// (its `EXEC` still queued at the target when the applier gave up on
    /// it) ran in between. Retried: the next session reads the checkpoint
    /// again, so that batch is not applied twice.
    #[error(
        "batch of entries {first}..={last} not applied: the checkpoint changed under it (an \
         earlier connection's batch ran late); reading the checkpoint again"
    )]
    CheckpointMoved { first: LogId, last: LogId },
    /// The target refused a command of entry `refused.log_id` when it was
    /// queued: its batch did not run. The applier holds at that entry (module doc,
    /// "Refused entries").
    #[error("entry {} refused by the target: {}: {}", refused.log_id, refused.command, refused.error)]
    Refused {
        refused: RefusedCommand,
        /// About the target's state ([`batch::refusal_is_transient`]).
        transient: bool,
    },
    /// A skipped entry could not be recorded, so it is not skipped.
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    /// A cluster target's topology cannot be read, or changed in a way the
    /// session cannot follow (a master it did not fence at its start).
    /// Retried: the next session discovers the cluster again.
    #[error("target cluster: {0}")]
    Topology(String),
    /// (`ferry sync`, reading the listener's WAL) the log lacks what the
    /// target needs and the listener could not take the fallback snapshot
    /// that replaces it yet (the source unreachable, say). Retried.
    #[error(
        "partition {partition}: a fallback snapshot is needed and could not be taken: {error}"
    )]
    Fallback {
        partition: PartitionId,
        error: String,
    },
}

impl ApplyError {
    /// True for errors no retry can fix (bad config, corrupt WAL data, the
    /// target refusing the applier's own commands).
    pub fn is_fatal(&self) -> bool {
        match self {
            ApplyError::Config(_)
            | ApplyError::Record { .. }
            | ApplyError::Inconsistent { .. }
            | ApplyError::SnapshotData { .. }
            | ApplyError::Gap { .. }
            | ApplyError::TwoWayLoad { .. }
            | ApplyError::ExistingData { .. }
            | ApplyError::Task(_) => true,
            ApplyError::Wal(error) => !matches!(error, WalError::Trimmed { .. }),
            ApplyError::Reply(error) => matches!(error, ReplyError::InternalRefused { .. }),
            ApplyError::Client(_)
            | ApplyError::ForeignCheckpoint { .. }
            | ApplyError::Timeout(_)
            | ApplyError::Checkpoint(_)
            | ApplyError::Aborted { .. }
            | ApplyError::CheckpointMoved { .. }
            | ApplyError::Refused { .. }
            | ApplyError::DeadLetter(_)
            | ApplyError::Topology(_)
            | ApplyError::Fallback { .. }
            | ApplyError::Snapshot { .. } => false,
        }
    }
}

impl From<RdbStreamError> for ApplyError {
    fn from(error: RdbStreamError) -> Self {
        ApplyError::Task(format!("rdb stream: {error}"))
    }
}

/// Applies `cfg.partition` of `wal` to `cfg.target` until `shutdown`.
///
/// Returns `Ok(())` on shutdown (after the batch whose `EXEC` was sent is
/// answered; a batch only queued is discarded with the connection and sent
/// again on the next start). Returns an error only for fatal errors
/// ([`ApplyError::is_fatal`]); everything else is retried with backoff
/// while `status` shows OFFLINE and the error.
pub async fn run(
    cfg: ApplyConfig,
    wal: Wal,
    status: Arc<ApplyStatus>,
    shutdown: CancellationToken,
) -> Result<(), ApplyError> {
    run_inner(cfg, wal, status, shutdown, None).await
}

/// [`run`] on the listener's own WAL (`ferry sync`): no drainer WAL in
/// between. What the log cannot give (entries trimmed before they were
/// applied, a snapshot epoch the listener no longer keeps) is replaced by a
/// fallback snapshot from `snapshots` ([`reader`], "Reading the listener's
/// WAL"), and the listener's rules keep and delete its snapshot epochs.
pub async fn run_direct(
    cfg: ApplyConfig,
    wal: Wal,
    status: Arc<ApplyStatus>,
    shutdown: CancellationToken,
    snapshots: Arc<dyn SnapshotProvider>,
) -> Result<(), ApplyError> {
    run_inner(cfg, wal, status, shutdown, Some(snapshots)).await
}

async fn run_inner(
    cfg: ApplyConfig,
    wal: Wal,
    status: Arc<ApplyStatus>,
    shutdown: CancellationToken,
    direct: Option<Arc<dyn SnapshotProvider>>,
) -> Result<(), ApplyError> {
    let cfg = cfg.validate()?;
    let partition = cfg.partition_id();
    let span = tracing::info_span!("apply", partition = %partition, drainer = %cfg.drainer_id);
    async move {
        let downstream = cfg.downstream_id()?;
        wal.register_downstream(partition, downstream.clone())
            .await?;
        let (applied_tx, applied_rx) = watch::channel(LogId::ZERO);
        let (loaded_tx, loaded_rx) = watch::channel(0u64);
        let marker = tokio::spawn(keep_wal_marks(
            wal.clone(),
            partition,
            downstream,
            cfg.retain_applied.0,
            applied_rx,
            // The listener keeps and deletes its own epochs.
            direct.is_none().then_some(loaded_rx),
        ));
        let dead_letter = cfg
            .dead_letter_dir
            .as_ref()
            .map(|dir| DeadLetter::new(dead_letter::file_path(dir, &cfg.drainer_id, partition)));
        status.set_dead_letter_file(
            dead_letter
                .as_ref()
                .map(|file| file.path().display().to_string()),
        );
        let mut applier = Applier {
            loaded_tx,
            url: cfg.target_url()?,
            key: Bytes::from(checkpoint_key(&cfg.drainer_id, partition)),
            client_name: fence::client_name(&cfg.drainer_id, partition),
            dead_letter,
            fence_warned: None,
            partition,
            wal,
            status,
            shutdown,
            applied_tx,
            epoch: 0,
            log_tag: 0,
            progressed: false,
            keyspace: cfg.keyspace()?,
            first_load: false,
            cluster: None,
            cluster_nodes: Vec::new(),
            scope: None,
            scope_key: Bytes::from(scope::scope_key(&cfg.drainer_id, partition)),
            owners: tenure::OwnerMap::default(),
            owners_key: Bytes::from(tenure::owner_map_key(&cfg.drainer_id)),
            voids: batch::VoidedTenures::new(),
            void_scan: LogId::ZERO,
            verify: None,
            direct,
            foreign: None,
            cfg,
        };
        let result = applier.run().await;
        // Lets the marker task write the last applied id, then end.
        drop(applier);
        let marker_result = marker
            .await
            .map_err(|error| ApplyError::Task(error.to_string()))?;
        result.and(marker_result)
    }
    .instrument(span)
    .await
}

/// How often the WAL's `applied` mark is written at most while entries
/// are applied (it is advisory: the target's checkpoint is what counts),
/// so that a moderate rate of small batches does not cost a WAL write each.
const APPLIED_MARK_EVERY: Duration = Duration::from_millis(50);

/// Two-way sync: the longest a silent batch waits to be written (at most a
/// quarter of `wal-ttl`).
pub(super) const SILENT_FLUSH: Duration = Duration::from_secs(30);

/// Keeps the drainer's WAL informed of the applier's progress, until the
/// applier ends (then it writes the last applied id, acks what is due, and
/// returns):
///
/// - the latest applied id as the WAL's `applied` mark, at most every
///   [`APPLIED_MARK_EVERY`] (the mark is advisory), coalescing ids that
///   arrive meanwhile and while a write is in progress (each write waits
///   for a group commit; the applier does not);
/// - as this applier's downstream ack (which lets retention trim it) only
///   once it has been applied for `retain_applied`, so that a target that
///   comes back from a crash with an older checkpoint still finds the
///   entries after it (module doc, "Retention");
/// - on a drainer's WAL (not the listener's, whose own rule keeps its
///   epochs), snapshot epochs this applier no longer needs
///   ([`collect_drainer_snapshots`]), after every load and every
///   `retention-interval` (retention trimming a snapshot marker is what
///   makes the latest epoch collectable).
async fn keep_wal_marks(
    wal: Wal,
    partition: PartitionId,
    downstream: DownstreamId,
    retain_applied: Duration,
    mut applied_rx: watch::Receiver<LogId>,
    loaded_rx: Option<watch::Receiver<u64>>,
) -> Result<(), ApplyError> {
    let collects = loaded_rx.is_some();
    // Without collection the receiver's sender is dropped, never changed.
    let (_never, idle_rx) = watch::channel(0u64);
    let mut loaded_rx = loaded_rx.unwrap_or(idle_rx);
    let mut written = LogId::ZERO;
    let mut acked = LogId::ZERO;
    // Applied ids and when they were applied, oldest first, waiting to be
    // acked; ids applied within ACK_COALESCE of each other share a slot.
    const ACK_COALESCE: Duration = Duration::from_millis(50);
    let mut waiting: VecDeque<(Instant, LogId)> = VecDeque::new();
    let mut collect = tokio::time::interval(wal.config().retention_interval.0);
    collect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the applied mark was last written, and the newest id seen.
    let mut marked_at: Option<Instant> = None;
    let mut latest = LogId::ZERO;
    // The newest id applied; `latest` is the durable part of it (an entry
    // applied before it was durable is marked and acked once it is).
    let mut seen = LogId::ZERO;
    let mut appended_rx = wal.subscribe_appends();
    loop {
        let mut ended = false;
        let ack_due = waiting.front().map(|(at, _)| *at + retain_applied);
        let mark_due = (latest > written)
            .then(|| marked_at.map_or_else(Instant::now, |at| at + APPLIED_MARK_EVERY));
        tokio::select! {
            changed = applied_rx.changed() => ended = changed.is_err(),
            changed = appended_rx.changed(), if seen > latest => {
                if changed.is_err() {
                    return Ok(()); // the WAL is gone
                }
            }
            _ = tokio::time::sleep_until(ack_due.unwrap_or_else(Instant::now)), if ack_due.is_some() => {}
            _ = tokio::time::sleep_until(mark_due.unwrap_or_else(Instant::now)), if mark_due.is_some() => {}
            changed = loaded_rx.changed(), if !loaded_rx.is_closed() => {
                if changed.is_ok() {
                    collect.reset_immediately();
                }
            }
            _ = collect.tick(), if collects => {
                let loaded_epoch = *loaded_rx.borrow();
                match collect_drainer_snapshots(&wal, partition, loaded_epoch).await {
                    Ok(deleted) if !deleted.is_empty() => {
                        info!(partition = %partition, epochs = ?deleted, "deleted snapshot epochs no longer needed");
                    }
                    Ok(_) => {}
                    Err(WalError::Closed) => return Ok(()),
                    Err(error) => {
                        warn!(partition = %partition, %error, "cannot delete old snapshot epochs");
                    }
                }
                continue;
            }
        }
        seen = seen.max(*applied_rx.borrow_and_update());
        appended_rx.borrow_and_update();
        let durable = match wal.last_log_id(partition) {
            Ok(durable) => durable.unwrap_or(LogId::ZERO),
            Err(WalError::Closed) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        latest = latest.max(seen.min(durable));
        let now = Instant::now();
        let newest_waiting = waiting.back().map_or(acked, |(_, id)| *id);
        if latest > newest_waiting {
            match waiting.back_mut() {
                Some((at, id)) if now.duration_since(*at) < ACK_COALESCE => *id = latest,
                _ => waiting.push_back((now, latest)),
            }
        }
        let mut ack = None;
        while let Some(&(at, id)) = waiting.front() {
            if now.duration_since(at) < retain_applied {
                break;
            }
            ack = Some(id);
            waiting.pop_front();
        }
        let mark_due = ended
            || ack.is_some()
            || marked_at.map_or(true, |at| now.duration_since(at) >= APPLIED_MARK_EVERY);
        let applied = (latest > written && mark_due).then_some(latest);
        if applied.is_some() || ack.is_some() {
            match mark_applied(&wal, partition, &downstream, applied, ack).await {
                Ok(()) => {
                    if applied.is_some() {
                        written = written.max(latest);
                        marked_at = Some(now);
                    }
                    acked = ack.unwrap_or(acked);
                }
                // A WAL closed during shutdown: nothing more to mark.
                Err(WalError::Closed) => return Ok(()),
                Err(error) => {
                    error!(partition = %partition, %error, "cannot mark entries applied in the wal");
                    return Err(error.into());
                }
            }
        }
        if ended {
            return Ok(());
        }
    }
}

/// Sets the `applied` mark to `applied` and acks `acked` as `downstream`
/// (either may be absent), in one group commit.
async fn mark_applied(
    wal: &Wal,
    partition: PartitionId,
    downstream: &DownstreamId,
    applied: Option<LogId>,
    acked: Option<LogId>,
) -> Result<(), WalError> {
    let ack = async {
        let Some(log_id) = acked else {
            return Ok(());
        };
        match wal.ack(partition, downstream.clone(), log_id).await {
            // Unregistered behind our back (by hand): hold retention again.
            Err(WalError::UnknownDownstream { .. }) => {
                wal.register_downstream(partition, downstream.clone())
                    .await?;
                wal.ack(partition, downstream.clone(), log_id).await
            }
            other => other,
        }
    };
    let set = async {
        match applied {
            Some(log_id) => wal.set_applied(partition, log_id).await,
            None => Ok(()),
        }
    };
    tokio::try_join!(set, ack).map(|_| ())
}

/// Deletes the snapshot epochs of `partition` that no reader of the
/// drainer's WAL can need any more, given that this applier's target holds
/// (at least) epoch `loaded_epoch` fully loaded; returns them.
///
/// A drainer's log holds at most one snapshot marker, as its first entry
/// (a marker resets the log, relay convention 5). An epoch is kept if
/// - it is newer than `loaded_epoch` (being received, waiting for its
///   marker, or its marker waits to be applied), or
/// - the first entry of the log is its marker (another applier of the
///   partition, or this one after a crash mid-load or with a target that
///   lost its data, may still load it; retention keeps the marker until
///   every registered applier acked it), or
/// - it is being received (snapshot state `writing`).
///
/// Everything else (epochs up to `loaded_epoch` whose marker was trimmed
/// after every applier applied it, or replaced by a newer marker) is
/// deleted. With `loaded_epoch == 0` nothing is.
pub(crate) async fn collect_drainer_snapshots(
    wal: &Wal,
    partition: PartitionId,
    loaded_epoch: u64,
) -> Result<Vec<u64>, WalError> {
    if loaded_epoch == 0 {
        return Ok(Vec::new());
    }
    let state = wal.snapshot_state(partition)?;
    let read_wal = wal.clone();
    let first = tokio::task::spawn_blocking(move || -> Result<Option<Record>, WalError> {
        let Some(first) = read_wal.first_log_id(partition)? else {
            return Ok(None);
        };
        let one = ReadLimits {
            max_entries: 1,
            max_bytes: 1,
        };
        let entries = match read_wal.read(partition, first, one) {
            Ok(entries) => entries,
            // Trimmed meanwhile: look again next time.
            Err(WalError::Trimmed { .. }) => {
                return Err(WalError::Trimmed {
                    partition,
                    wanted: first,
                    first_available: first.next(),
                })
            }
            Err(error) => return Err(error),
        };
        Ok(entries
            .first()
            .and_then(|entry| Record::decode(&entry.payload, RecordLimits::default()).ok()))
    })
    .await
    .map_err(|error| WalError::Io(std::io::Error::other(error.to_string())));
    let first_marker = match first {
        Ok(Ok(Some(Record::Snapshot(marker)))) => Some(marker.epoch),
        Ok(Ok(_)) => None,
        // Unsure what the log starts with: keep everything this round.
        Ok(Err(WalError::Trimmed { .. })) => return Ok(Vec::new()),
        Ok(Err(error)) | Err(error) => return Err(error),
    };
    let writing = (state.phase == SnapshotPhase::Writing).then_some(state.epoch);
    wal.collect_snapshots(partition, |epoch| {
        epoch > loaded_epoch || Some(epoch) == first_marker || Some(epoch) == writing
    })
    .await
}

pub(crate) struct Applier {
    cfg: ApplyConfig,
    url: crate::redis::url::RedisUrl,
    partition: PartitionId,
    /// The checkpoint key.
    key: Bytes,
    /// The name every connection of this applier gives itself ([`fence`]).
    client_name: String,
    /// Where skipped entries are recorded; `None`: nothing can be skipped.
    dead_letter: Option<DeadLetter>,
    /// The last reason the fence was unavailable, once warned about.
    fence_warned: Option<String>,
    wal: Wal,
    status: Arc<ApplyStatus>,
    shutdown: CancellationToken,
    applied_tx: watch::Sender<LogId>,
    /// The snapshot epoch the target holds fully loaded, once known (for
    /// [`collect_drainer_snapshots`]).
    loaded_tx: watch::Sender<u64>,
    /// Snapshot epoch of the target's data set.
    epoch: u64,
    /// Log tag of the WAL partition (written into every checkpoint).
    log_tag: u64,
    /// Something was applied since the last failure (resets the backoff).
    progressed: bool,
    /// What this sync owns on the target (`[filter]`).
    keyspace: OwnedKeyspace,
    /// The target held no checkpoint of this sync when the session began:
    /// the next snapshot load is the first, and `existing-data` applies.
    first_load: bool,
    /// Whether the target is a Redis Cluster (`None` until a session found
    /// out): its sessions are [`cluster`]'s.
    cluster: Option<bool>,
    /// Every node of the cluster target seen so far: where the next session
    /// discovers it when the seeds do not answer.
    cluster_nodes: Vec<crate::redis::url::RedisUrl>,
    /// The hash slots this partition holds on the target (the scope of the
    /// last snapshot marker loaded, read back from [`Applier::scope_key`]);
    /// `None`: the whole owned keyspace (a standalone source).
    scope: Option<SlotRanges>,
    /// Where the scope is kept in the target ([`scope::scope_key`]).
    scope_key: Bytes,
    /// The target's slot owner map as last read ([`tenure`]; a cluster
    /// source's slot tenures), shared by the drainer's partitions.
    owners: tenure::OwnerMap,
    /// Where the owner map is kept ([`tenure::owner_map_key`]).
    owners_key: Bytes,
    /// Reading the listener's WAL (`ferry sync`): where fallback snapshots
    /// come from ([`run_direct`]).
    direct: Option<Arc<dyn SnapshotProvider>>,
    /// The foreign-writes sampler of a standalone target ([`foreign`]),
    /// once started: cancelled when the applier is dropped.
    foreign: Option<(foreign::Claim, tokio_util::sync::DropGuard)>,
    /// Slot tenures voided in this partition's log, as far as read
    /// (docs/cluster.md, rule 9; [`Applier::find_voids`]).
    voids: batch::VoidedTenures,
    /// Where the search of the WAL for `SlotVoid` records goes on.
    void_scan: LogId,
    /// The target's checkpoint named an entry applied before it was durable
    /// (`v3`): the next reader checks it first ([`reconcile`](Self::reconcile)).
    verify: Option<reader::Verify>,
}

impl Applier {
    async fn run(&mut self) -> Result<(), ApplyError> {
        let mut backoff = Backoff::new(self.cfg.retry_backoff_min.0, self.cfg.retry_backoff_max.0);
        let mut last_error: Option<String> = None;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            self.progressed = false;
            let error = match self.session(&mut last_error).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let text = error.to_string();
            self.status.set_offline(text.clone());
            if error.is_fatal() {
                error!(partition = %self.partition, %error, "apply stopped");
                return Err(error);
            }
            if self.progressed {
                backoff.reset();
            }
            let mut delay = backoff.next_delay();
            if let ApplyError::Refused { refused, transient } = &error {
                self.status.set_blocked(
                    BlockedEntry {
                        log_id: refused.log_id,
                        command: refused.command.clone(),
                        error: refused.error.clone(),
                        transient: *transient,
                        since_unix_ms: status::now_unix_ms(),
                    },
                    text.clone(),
                );
                if !*transient {
                    delay = match self.cfg.on_refused {
                        // Skipped by the next session.
                        OnRefused::SkipAndRecord if self.dead_letter.is_some() => Duration::ZERO,
                        // Until the target is fixed or `ferry skip`.
                        _ => self.cfg.retry_backoff_max.0,
                    };
                }
            }
            if last_error.as_deref() != Some(text.as_str()) {
                match &error {
                    ApplyError::Refused {
                        refused,
                        transient: false,
                    } => warn!(
                        partition = %self.partition,
                        log_id = %refused.log_id,
                        command = %refused.command,
                        error = %refused.error,
                        on_refused = ?self.cfg.on_refused,
                        "the target refuses an entry; the entries after it wait until it is \
                         applied or skipped (ferry skip)"
                    ),
                    _ => warn!(partition = %self.partition, %error, "apply failed; retrying"),
                }
            } else {
                debug!(partition = %self.partition, %error, "apply failed again");
            }
            last_error = Some(text);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
                // `ferry skip`: no need to wait out the backoff.
                _ = self.status.woken() => {}
            }
        }
    }

    /// The entry the batches must hold at, and whether to skip it now.
    fn hold(&self) -> Option<Hold> {
        let blocked = self.status.blocked()?;
        let skip = if self.dead_letter.is_none() {
            None
        } else if self.status.skip_requested(blocked.log_id) {
            Some(SkippedBy::Operator)
        } else if !blocked.transient && self.cfg.on_refused == OnRefused::SkipAndRecord {
            Some(SkippedBy::OnRefused)
        } else {
            None
        };
        Some(Hold {
            log_id: blocked.log_id,
            skip,
            refused: RefusedCommand {
                log_id: blocked.log_id,
                command: blocked.command,
                error: blocked.error,
            },
        })
    }

    /// The applier got to `resume` (the first id still to apply): a block
    /// before it is over.
    fn passed(&self, resume: LogId) {
        if self
            .status
            .blocked()
            .is_some_and(|blocked| blocked.log_id < resume)
        {
            self.status.clear_blocked();
        }
    }

    /// Names the connection and closes this applier's earlier connections
    /// (see [`fence`]); where the target does not allow it, the session goes
    /// on guarded by `WATCH` alone, and status and log say so.
    async fn fence(&mut self, target: &mut Target) -> Result<(), ApplyError> {
        match fence::fence(target, &self.client_name).await? {
            Fence::Closed(closed) => {
                if closed > 0 {
                    info!(partition = %self.partition, closed, "closed earlier connections of this applier at the target");
                }
                self.status.set_fence("client-kill".to_string());
                self.fence_warned = None;
            }
            Fence::Unavailable(why) => {
                if self.fence_warned.as_deref() != Some(why.as_str()) {
                    warn!(
                        partition = %self.partition,
                        reason = %why,
                        "cannot close earlier connections at the target (CLIENT SETNAME/LIST/KILL \
                         not allowed); guarded by WATCH alone, which misses a batch of an \
                         abandoned connection that runs after this session's first EXEC"
                    );
                    self.fence_warned = Some(why.clone());
                }
                self.status.set_fence(format!("watch-only: {why}"));
            }
        }
        Ok(())
    }

    /// Records a skipped entry in the dead-letter file (fsync'd) before the
    /// batch that moves the checkpoint past it is sent.
    async fn record_skip(&mut self, batch: &Batch) -> Result<(), ApplyError> {
        let Some(skip) = batch.skip.clone() else {
            return Ok(());
        };
        let Some(mut letters) = self.dead_letter.take() else {
            return Err(ApplyError::Task("no dead-letter file for a skip".into()));
        };
        let drainer_id = self.cfg.drainer_id.clone();
        let partition = self.partition;
        let wal = self.wal.clone();
        let (letters, written) = tokio::task::spawn_blocking(move || {
            let entry = DeadEntry {
                log_id: skip.log_id,
                db: skip.db,
                commands: &skip.commands,
                transaction: skip.transaction,
                by: skip.by,
                refused: &skip.refused,
                streams: &skip.streams,
            };
            // A streamed argument's bytes, from its fragments in the WAL.
            let mut fill =
                |place: &StreamedPlace, out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>| {
                    for seq in 0..place.fragments {
                        let log_id = LogId(place.first.0 + u64::from(seq));
                        let data = read_fragment(&wal, partition, log_id, place.first_seq + seq)
                            .map_err(|error| std::io::Error::other(error.to_string()))?;
                        out(&data)?;
                    }
                    Ok(())
                };
            let fill: Option<dead_letter::Fill<'_>> =
                (!skip.streams.is_empty()).then_some(&mut fill);
            let written =
                letters.record(&entry, fill, &drainer_id, partition, status::now_unix_ms());
            (letters, written)
        })
        .await
        .map_err(|error| ApplyError::Task(error.to_string()))?;
        self.dead_letter = Some(letters);
        if !written? {
            debug!(partition = %self.partition, log_id = %batch.first, "entry already in the dead-letter file");
        }
        Ok(())
    }

    /// One connection to the target: read the checkpoint, then apply until
    /// shutdown or the first error.
    async fn session(&mut self, last_error: &mut Option<String>) -> Result<(), ApplyError> {
        if self.cluster.is_none() {
            let seeds = self.cfg.target_seeds()?;
            let detect = cluster::detect(&seeds);
            let found = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                found = tokio::time::timeout(self.cfg.reply_timeout.0, detect) => found,
            };
            let found = found.map_err(|_| ApplyError::Timeout(self.cfg.reply_timeout.0))??;
            if found {
                info!(partition = %self.partition, "the target is a Redis Cluster: applying by slot");
            }
            self.cluster = Some(found);
        }
        if self.cluster == Some(true) {
            return self.cluster_session(last_error).await;
        }
        let claim = (self.foreign.is_none() && !self.cfg.foreign_writes_every.0.is_zero())
            .then(|| foreign::claim(&self.url.addr()))
            .flatten();
        if let Some(claim) = claim {
            // Ends with the applier (the guard cancels it when dropped).
            let cancel = self.shutdown.child_token();
            tokio::spawn(foreign::run(
                self.url.clone(),
                self.cfg.foreign_writes_every.0,
                self.cfg.foreign_writes_window.0,
                Arc::clone(&self.status),
                cancel.clone(),
            ));
            self.foreign = Some((claim, cancel.drop_guard()));
        }
        let shutdown = self.shutdown.clone();
        let connect = async {
            let mut target = Target::connect(
                &self.url,
                self.cfg.connect_timeout.0,
                self.cfg.reply_timeout.0,
            )
            .await?;
            target.stall_watch = Some(target::StallWatch {
                status: Arc::clone(&self.status),
                target: self.url.addr(),
            });
            // Before the checkpoint is read: whatever an earlier connection
            // still has unread or queued at the target is discarded.
            self.fence(&mut target).await?;
            // Watched before it is read: if a batch of an abandoned earlier
            // connection still runs after this read (the fence unavailable),
            // this session's first EXEC is refused instead of applying that
            // batch a second time.
            let watch = Command::new(vec![Bytes::from_static(b"WATCH"), self.key.clone()]);
            if let Some(error) = target.call_command(&watch).await?.error_message() {
                return Err(ApplyError::Aborted {
                    first: LogId::ZERO,
                    last: LogId::ZERO,
                    error: format!("WATCH refused: {error}"),
                });
            }
            let checkpoint = target.read_checkpoint(&self.key).await?;
            let scope = target.read_scope(&self.scope_key).await?;
            self.owners = target.read_owner_map(&self.owners_key).await?;
            Ok::<_, ApplyError>((target, checkpoint, scope))
        };
        // Nothing is in flight yet: shutdown need not wait for a slow target.
        let (mut target, checkpoint, scope) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            connected = connect => connected?,
        };
        // Only with a checkpoint of this partition: its scope goes with the
        // data the checkpoint describes.
        self.scope = if checkpoint.is_some() { scope } else { None };
        let (resume, marker_first) = self.reconcile(checkpoint).await?;
        self.passed(resume);
        self.status.clear_handoff();
        self.status.set_online();
        if last_error.take().is_some() {
            info!(partition = %self.partition, resume = %resume, "target reachable again; applying");
        } else {
            info!(partition = %self.partition, resume = %resume, ?checkpoint, "applying");
        }
        let cancel = self.shutdown.child_token();
        // Stops the reader whenever this session ends.
        let _stop_reader = cancel.clone().drop_guard();
        let early = self.cfg.early_apply && self.direct.is_some();
        let (mut feed, _reader) = self.start_feed(resume, marker_first, early, cancel);
        self.apply_loop(&mut target, &mut feed).await
    }

    /// Starts this session's WAL reader at `resume` (stopped by `cancel`)
    /// and the feed that takes its runs. `early`: the reader reads entries
    /// being fsynced (module doc, "Applying before the fsync"; the batches
    /// then keep their source positions in the checkpoint).
    fn start_feed(
        &mut self,
        resume: LogId,
        marker_first: bool,
        early: bool,
        cancel: CancellationToken,
    ) -> (Feed, tokio::task::JoinHandle<()>) {
        let limits = ReadLimits {
            max_entries: self.cfg.batch_max_entries,
            max_bytes: self.cfg.batch_max_bytes.as_usize(),
        };
        let (runs, reader) = spawn_reader(
            self.wal.clone(),
            self.partition,
            resume,
            marker_first,
            ReaderConfig {
                limits,
                idle_poll: self.cfg.idle_poll.0,
                direct: self.direct.clone(),
                status: Arc::clone(&self.status),
                early,
                verify: self.verify.take(),
            },
            cancel,
        );
        let feed = Feed {
            runs,
            pending: VecDeque::new(),
            expected: resume,
            marker_first,
            fallbacks: self.direct.is_some(),
            skip_marker: None,
            partition: self.partition,
            max_pending: self.cfg.batch_max_entries.saturating_mul(2),
            marks: VecDeque::new(),
        };
        (feed, reader)
    }

    /// Compares the target's checkpoint with the WAL's applied mark; returns
    /// the first log id to apply, and whether it must be a snapshot marker.
    async fn reconcile(
        &mut self,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(LogId, bool), ApplyError> {
        let wal = self.wal.clone();
        let partition = self.partition;
        self.verify = None;
        self.log_tag = wal.follow_history(partition, None, 0).await?.log_tag;
        if let Some(foreign) = checkpoint.filter(|c| c.log() != 0 && c.log() != self.log_tag) {
            return self.reconcile_foreign(foreign).await;
        }
        let positions = tokio::task::spawn_blocking(move || wal.positions(partition))
            .await
            .map_err(|error| ApplyError::Task(error.to_string()))??;
        let (wal_applied, durable) = positions
            .map(|p| (p.applied, p.durable))
            .unwrap_or((LogId::ZERO, LogId::ZERO));
        let target_applied = checkpoint.map(|c| c.applied()).unwrap_or(LogId::ZERO);
        // The WAL's own applied mark at or past the entry says this WAL holds
        // it durable, as applied by this applier: nothing to check (the mark
        // moves over durable ids only, and a durable entry never changes).
        self.verify = match (checkpoint, &self.direct) {
            (
                Some(Checkpoint::Applied {
                    log_id,
                    source: Some(mark),
                    ..
                }),
                Some(_),
            ) if wal_applied < log_id => {
                info!(
                    partition = %self.partition,
                    log_id = %log_id,
                    durable = %durable,
                    "the target's checkpoint names an entry applied before it was durable; checking the log's entry there before resuming"
                );
                Some(reader::Verify {
                    at: log_id,
                    mark,
                    scan_from: durable.next(),
                })
            }
            _ => None,
        };
        self.first_load = checkpoint.is_none();
        self.epoch = checkpoint.map(|c| c.epoch()).unwrap_or(0);
        self.status.set_applied(target_applied, self.epoch);
        if wal_applied > target_applied {
            warn!(
                partition = %self.partition,
                wal_applied = %wal_applied,
                checkpoint = ?checkpoint,
                "the target is behind the wal's applied mark (it lost acknowledged writes, or it \
                 is another server); applying again from its checkpoint"
            );
        } else if target_applied > durable && self.verify.is_none() {
            warn!(
                partition = %self.partition,
                durable = %durable,
                checkpoint = ?checkpoint,
                "the target's checkpoint is ahead of the wal; waiting for the wal to reach it"
            );
        } else if target_applied > wal_applied {
            // A crash between EXEC and set_applied.
            let _ = self.applied_tx.send(target_applied);
        }
        if let Some(Checkpoint::Applied { epoch, .. }) = checkpoint {
            if target_applied <= durable {
                // This WAL holds what the target loaded (not so for a
                // checkpoint ahead of it: a WAL wiped and started again).
                self.loaded_tx.send_if_modified(|loaded| {
                    let newer = epoch > *loaded;
                    *loaded = (*loaded).max(epoch);
                    newer
                });
            }
        }
        let marker_first = matches!(checkpoint, Some(Checkpoint::Loading { .. }));
        Ok((
            checkpoint.map(|c| c.resume_at()).unwrap_or(LogId(1)),
            marker_first,
        ))
    }

    /// The target's checkpoint counts another WAL's log ids: nothing it
    /// says about this WAL holds. Only a snapshot marker can bring the target
    /// onto this log, so resume at the WAL's first entry if it is one.
    async fn reconcile_foreign(
        &mut self,
        checkpoint: Checkpoint,
    ) -> Result<(LogId, bool), ApplyError> {
        let (wal, partition) = (self.wal.clone(), self.partition);
        let first = tokio::task::spawn_blocking(move || -> Result<Option<LogId>, WalError> {
            let Some(first) = wal.first_log_id(partition)? else {
                return Ok(None);
            };
            let one = ReadLimits {
                max_entries: 1,
                max_bytes: 1,
            };
            let entries = wal.read(partition, first, one)?;
            let is_marker = entries.first().is_some_and(|entry| {
                matches!(
                    Record::decode(&entry.payload, RecordLimits::default()),
                    Ok(Record::Snapshot(_))
                )
            });
            Ok(is_marker.then_some(first))
        })
        .await
        .map_err(|error| ApplyError::Task(error.to_string()))?;
        let marker = match first {
            Ok(marker) => marker,
            Err(WalError::Trimmed { .. }) => None,
            Err(error) => return Err(error.into()),
        };
        let marker = match (marker, &self.direct) {
            (Some(marker), _) => {
                warn!(
                    partition = %self.partition,
                    ?checkpoint,
                    wal_log = format_args!("{:016x}", self.log_tag),
                    %marker,
                    "the target's checkpoint counts another WAL's log ids; loading the snapshot this WAL starts with"
                );
                marker
            }
            // The listener's WAL: its reader replaces the marker the log
            // lacks with a fallback snapshot (a target that was applied
            // from a drainer WAL, say, before `apply-from` changed).
            (None, Some(_)) => {
                warn!(
                    partition = %self.partition,
                    ?checkpoint,
                    wal_log = format_args!("{:016x}", self.log_tag),
                    "the target's checkpoint counts another WAL's log ids; loading a fallback snapshot of the source in place of what it holds"
                );
                LogId(1)
            }
            (None, None) => {
                return Err(ApplyError::ForeignCheckpoint {
                    partition: self.partition,
                    checkpoint: checkpoint.log(),
                    wal: self.log_tag,
                })
            }
        };
        self.epoch = 0;
        // The target's data is this sync's (its checkpoint says so), not
        // data that was there before it: not a first load.
        self.first_load = false;
        self.status.set_applied(LogId::ZERO, 0);
        Ok((marker, true))
    }

    fn builder(&self, target: &Target) -> BatchBuilder {
        BatchBuilder {
            checkpoint_key: self.key.clone(),
            max_entries: self.cfg.batch_max_entries,
            max_bytes: self.cfg.batch_max_bytes.as_usize(),
            databases: target.databases,
            keyspace: self.keyspace.clone(),
            expire_grace: expire::ExpireGrace::new(self.cfg.expire_grace.0),
            log_tag: self.log_tag,
            scope: self.scope.clone(),
            tenures: Some(batch::Tenures {
                partition: self.partition.0,
                map_key: self.owners_key.clone(),
                map: self.owners.clone(),
                voids: self.voids.clone(),
            }),
            echo_of: self.cfg.two_way_peers.clone().map(|peers| {
                let of = self.cfg.two_way_echo_of.as_deref();
                batch::EchoRule::new(of.unwrap_or(&self.cfg.drainer_id), peers)
            }),
        }
    }

    /// Queues `WATCH <checkpoint>`, `MULTI` and the batch's commands (not
    /// `EXEC`). The `WATCH` makes the target refuse the `EXEC` if anything
    /// else wrote the checkpoint since (see [`ApplyError::CheckpointMoved`]).
    /// A command with streamed arguments is sent at once, with what was
    /// queued before it, its big arguments written as they are read from
    /// the WAL's fragments ([`stream_command`]).
    async fn queue_batch(
        target: &mut Target,
        batch: &Batch,
        key: &Bytes,
        wal: &Wal,
        partition: PartitionId,
    ) -> Result<(), ApplyError> {
        // The target drops the connection on a bulk header over its limit:
        // such an entry is refused here, before anything of it is sent.
        if let Some(limit) = target.max_bulk_len {
            if let Some(place) = batch.streams.iter().find(|place| place.len > limit) {
                let log_id = match batch.slots.get(place.command) {
                    Some(batch::Slot::Data { log_id }) => *log_id,
                    _ => batch.last,
                };
                let command = batch
                    .commands
                    .get(place.command)
                    .map(batch::command_name)
                    .unwrap_or_default();
                return Err(ApplyError::Refused {
                    refused: RefusedCommand {
                        log_id,
                        command,
                        error: format!(
                            "ERR an argument of {} bytes is over the target's proto-max-bulk-len \
                             ({limit}); raise it on the target (CONFIG SET proto-max-bulk-len)",
                            place.len
                        ),
                    },
                    transient: false,
                });
            }
        }
        target.client.queue(&Command::new(vec![
            Bytes::from_static(b"WATCH"),
            key.clone(),
        ]));
        target.client.queue(&Command::from_parts(["MULTI"]));
        let mut streams = batch.streams.iter().peekable();
        for (index, cmd) in batch.commands.iter().enumerate() {
            let mut places = Vec::new();
            while let Some(place) = streams.next_if(|place| place.command == index) {
                places.push(place);
            }
            if places.is_empty() {
                target.client.queue(cmd);
            } else {
                stream_command(target, cmd, &places, wal, partition).await?;
            }
        }
        Ok(())
    }

    async fn apply_loop(&mut self, target: &mut Target, feed: &mut Feed) -> Result<(), ApplyError> {
        let mut builder = self.builder(target);
        // Only a direct applier looks for resyncs to load early.
        let mut appended = self.direct.as_ref().map(|_| self.wal.subscribe_appends());
        let exec = Command::from_parts(["EXEC"]);
        // MULTI and commands sent, EXEC not yet.
        let mut open: Option<Batch> = None;
        // EXEC sent, replies not read yet.
        let mut executing: Option<Batch> = None;
        // Two-way sync: a silent batch not written yet, and since when
        // (module doc, "Two-way sync").
        let mut silent: Option<(Batch, Instant)> = None;
        let silent_flush = SILENT_FLUSH.min(self.wal.config().wal_ttl.0 / 4);
        loop {
            feed.take_ready()?;
            if executing.is_none() {
                if self.shutdown.is_cancelled() {
                    return Ok(());
                }
                if open.is_none() {
                    self.find_voids(&mut builder, &feed.pending)?;
                    let hold = self.hold();
                    if let Some(mut batch) =
                        feed.build(&mut builder, &self.key, self.epoch, hold.as_ref())
                    {
                        if self.cfg.two_way_peers.is_some() && batch.is_silent() {
                            // Writing it would be echoed by the other side,
                            // whose silent batch would be echoed here: kept
                            // back until a batch with data covers it, or
                            // `silent_flush` passed (the WAL must not trim
                            // entries the target's checkpoint is before).
                            // Its echoes are counted now, as the cluster
                            // applier does: a later batch covers it whole.
                            self.status.add_echoes(std::mem::take(&mut batch.echoes));
                            let since = silent.take().map_or_else(Instant::now, |(_, at)| at);
                            self.status.set_applied(batch.last, self.epoch);
                            silent = Some((batch, since));
                            continue;
                        }
                        // A batch with data covers a silent one before it.
                        silent = None;
                        if batch.refused.is_none() {
                            // Every batch before it committed: a flush of a
                            // scoped partition deletes its scope now.
                            if !batch.scope_delete.is_empty()
                                && !self.delete_scope_for(target, &batch).await?
                            {
                                return Ok(()); // shut down during the deletion
                            }
                            self.record_skip(&batch).await?;
                            Self::queue_batch(target, &batch, &self.key, &self.wal, self.partition)
                                .await?;
                        }
                        open = Some(batch);
                    }
                }
                if let Some(batch) = open.take() {
                    // Refused by the applier itself: nothing of it was
                    // queued, everything before it committed.
                    if let Some(refused) = batch.refused {
                        self.status.set_last_refused(refused.clone());
                        return Err(ApplyError::Refused {
                            refused,
                            transient: false,
                        });
                    }
                    target.client.queue(&exec);
                    executing = Some(batch);
                    // The next batch waits on the server behind this EXEC.
                    feed.take_ready()?;
                    // A held entry waits for the batch before it: it is
                    // recorded as skipped only once everything before it
                    // committed.
                    let hold = self.hold();
                    // (A held write's fragment run goes with it.)
                    let held_next = hold
                        .as_ref()
                        .is_some_and(|hold| batch::next_unit(&feed.pending) == Some(hold.log_id));
                    // (A scoped flush's deletion waits for this EXEC.)
                    if !held_next && !builder.scoped_flush_next(&feed.pending) {
                        if let Some(batch) =
                            feed.build(&mut builder, &self.key, self.epoch, hold.as_ref())
                        {
                            // A batch the applier refuses is not queued: it
                            // is turned into the error once the one before
                            // it committed.
                            if batch.refused.is_none() {
                                Self::queue_batch(
                                    target,
                                    &batch,
                                    &self.key,
                                    &self.wal,
                                    self.partition,
                                )
                                .await?;
                            }
                            open = Some(batch);
                        }
                    }
                }
            }
            if let Some(batch) = executing.take() {
                target.flush().await?;
                self.finish_batch(target, &batch).await?;
                continue;
            }
            if let Some(front) = feed.pending.front() {
                if let Record::Snapshot(marker) = &front.record {
                    let (log_id, marker) = (front.log_id, marker.clone());
                    feed.pending.pop_front();
                    if !self.load_snapshot(target, log_id, marker).await? {
                        return Ok(()); // shut down during the load
                    }
                    // The marker's scope is the partition's from now on,
                    // and the load may have changed the owner map.
                    builder.scope = self.scope.clone();
                    if let Some(tenures) = &mut builder.tenures {
                        tenures.map = self.owners.clone();
                    }
                    self.passed(log_id.next());
                    continue;
                }
            }
            // Everything before it is applied: the next entry waits for a
            // slot handoff of another partition.
            if let Some(wait) = builder.tenure_wait(&feed.pending) {
                feed.take_ahead(tenure::HOLD_LOOKAHEAD_ENTRIES, tenure::HOLD_LOOKAHEAD_BYTES)?;
                self.raise_handoffs_ahead(target, &mut builder, &feed.pending, wait.log_id)
                    .await?;
                if !self.wait_for_tenure(target, &mut builder, wait).await? {
                    return Ok(()); // shut down while held
                }
                continue;
            }
            // Everything read is applied: a full resync being stored may be
            // loaded at once (`snapshot`, "Loading a resync while it is
            // stored"); else wait for more.
            if let Some((log_id, epoch)) = self.preload_due(feed)? {
                if !self.preload_snapshot(target, log_id, epoch).await? {
                    return Ok(()); // shut down during the load
                }
                feed.skip_marker = Some((log_id, epoch));
                builder.scope = self.scope.clone();
                self.passed(log_id.next());
                continue;
            }
            let flush_at = silent.as_ref().map(|(_, since)| *since + silent_flush);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = sleep_until_some(flush_at) => {
                    if let Some((batch, _)) = silent.take() {
                        Self::queue_batch(target, &batch, &self.key, &self.wal, self.partition)
                            .await?;
                        open = Some(batch);
                    }
                }
                run = feed.runs.recv() => {
                    // The reader also stops on shutdown.
                    if run.is_none() && self.shutdown.is_cancelled() {
                        return Ok(());
                    }
                    feed.accept(run)?
                }
                // Chunks stored (a resync begins) wake the WAL's appends.
                _ = wait_appended(&mut appended) => {}
            }
        }
    }

    /// (Reading the listener's WAL) the next log id and the epoch of a full
    /// resync the listener is storing, when this applier, idle, is caught
    /// up with the log, so that the marker will be its next entry.
    fn preload_due(&self, feed: &Feed) -> Result<Option<(LogId, u64)>, ApplyError> {
        let Some(epoch) = self
            .direct
            .as_ref()
            .and_then(|direct| direct.preload_epoch(self.partition))
        else {
            return Ok(None);
        };
        if epoch <= self.epoch || !feed.pending.is_empty() || feed.skip_marker.is_some() {
            return Ok(None);
        }
        let durable = self.wal.last_log_id(self.partition)?.unwrap_or(LogId::ZERO);
        Ok((durable.next() == feed.expected).then_some((feed.expected, epoch)))
    }

    /// Rule 9 (docs/cluster.md): when the next entry to batch is tagged
    /// with a tenure it would not be applied in (wait or blocked), looks
    /// for a `SlotVoid` of that tenure after it in this partition's log:
    /// in the entries read ahead, then in the WAL from where the last
    /// search stopped (a bounded read per call, so a void far ahead is
    /// found over a few hold polls, with no more memory). What it finds
    /// goes into `builder`, which then voids the entry.
    fn find_voids(
        &mut self,
        builder: &mut BatchBuilder,
        pending: &VecDeque<Pending>,
    ) -> Result<(), ApplyError> {
        let Some(tenures) = builder.tenures.as_mut() else {
            return Ok(());
        };
        let Some(next) = pending
            .iter()
            .find(|p| !matches!(p.record, Record::Fragment(_)))
        else {
            return Ok(());
        };
        let Record::Write(write) = &next.record else {
            return Ok(());
        };
        let Some(tag) = write.tenure else {
            return Ok(());
        };
        let known = |voids: &batch::VoidedTenures| {
            voids
                .get(&(tag.slot, tag.gen))
                .is_some_and(|at| *at > next.log_id)
        };
        if tenure::decide(&tenures.map, tenures.partition, tag) == tenure::Decision::Apply
            || known(&tenures.voids)
        {
            return Ok(());
        }
        for entry in pending.iter().filter(|p| p.log_id > next.log_id) {
            if let Record::Void(void) = entry.record {
                note_void(&mut self.voids, void, entry.log_id);
            }
        }
        // The WAL beyond what is held here.
        let from = pending.back().map_or(next.log_id, |p| p.log_id).next();
        self.scan_voids(from, SCAN_ENTRIES, |voids| known(voids))?;
        tenures.voids = self.voids.clone();
        if known(&self.voids) {
            info!(partition = %self.partition, log_id = %next.log_id, slot = tag.slot, gen = tag.gen, "the slot's import into this shard was aborted in the source (a void of its tenure follows in the log): its entries of that tenure are skipped, never applied");
        }
        Ok(())
    }

    /// Logs and counts the entries of voided tenures `batch` covered.
    fn report_voided(&self, batch: &Batch) {
        if let Some(&(last, tag)) = batch.voided.last() {
            warn!(
                partition = %self.partition,
                entries = batch.voided.len(),
                last = %last,
                slot = tag.slot,
                gen = tag.gen,
                "entries of an aborted slot import voided (skipped, never applied; docs/cluster.md rule 9)"
            );
            self.status
                .add_voided(batch.voided.len() as u64, last, tag.slot, tag.gen);
        }
    }

    /// The (slot, tenure) pairs of `marker`'s tenures (at `log_id`) voided
    /// by a `SlotVoid` after it in this partition's log, as far as read.
    fn voided_after(
        &self,
        log_id: LogId,
        marker: &crate::record::SnapshotMarker,
    ) -> Vec<(u16, u64)> {
        marker
            .tenures
            .iter()
            .flat_map(|(ranges, gen)| {
                ranges
                    .ranges()
                    .iter()
                    .flat_map(|&(first, last)| first..=last)
                    .map(move |slot| (slot, *gen))
            })
            .filter(|key| self.voids.get(key).is_some_and(|at| *at > log_id))
            .collect()
    }

    /// Reads this partition's WAL from `from` (or from where the last scan
    /// stopped, if further) for `SlotVoid` records, up to `max` entries or
    /// until `done`; notes them in [`Applier::voids`].
    pub(crate) fn scan_voids(
        &mut self,
        from: LogId,
        max: usize,
        done: impl Fn(&batch::VoidedTenures) -> bool,
    ) -> Result<(), ApplyError> {
        let mut from = self.void_scan.max(from);
        let mut read = 0;
        while read < max && !done(&self.voids) {
            let limits = ReadLimits {
                max_entries: 1024,
                max_bytes: 16 << 20,
            };
            let entries = match self.wal.read(self.partition, from, limits) {
                Ok(entries) => entries,
                Err(WalError::Trimmed {
                    first_available, ..
                }) => {
                    from = first_available;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let Some(last) = entries.last() else {
                break;
            };
            from = last.log_id.next();
            read += entries.len();
            for entry in entries {
                // A record that does not decode is reported by the feed
                // when it gets there.
                if let Ok(Record::Void(void)) =
                    Record::decode_shared(&entry.payload, RecordLimits::default())
                {
                    note_void(&mut self.voids, void, entry.log_id);
                }
            }
        }
        self.void_scan = from;
        Ok(())
    }

    /// While held at `held`, applies each slot handoff record read ahead in
    /// `pending` that no entry of its slot precedes (from `held` on): every
    /// entry of that slot before it is then applied, so the next owner may
    /// go on now rather than when this partition reaches the record (two
    /// partitions each held before a handoff the other waits for would wait
    /// forever: a slot handed over while the shard already received
    /// another). The record raises the map again when reached, changing
    /// nothing. A write whose keys are unknown ends the scan.
    async fn raise_handoffs_ahead(
        &mut self,
        target: &mut Target,
        builder: &mut BatchBuilder,
        pending: &VecDeque<Pending>,
        held: LogId,
    ) -> Result<(), ApplyError> {
        let mut touched: std::collections::BTreeSet<u16> = Default::default();
        let mut raises: Vec<(u16, tenure::Owner)> = Vec::new();
        for entry in pending.iter().filter(|p| p.log_id >= held) {
            match &entry.record {
                Record::Write(write) => match write.tenure {
                    Some(t) => {
                        touched.insert(t.slot);
                    }
                    None => {
                        let mut known = true;
                        for cmd in &write.commands {
                            match crate::redis::command::keys(cmd) {
                                Ok(keys) => touched.extend(
                                    keys.iter().map(|k| crate::redis::command::key_hash_slot(k)),
                                ),
                                Err(_) => known = false,
                            }
                        }
                        if !known {
                            break;
                        }
                    }
                },
                Record::Handoff(h) => {
                    let owner = tenure::Owner {
                        partition: h.to,
                        gen: h.gen,
                    };
                    if !touched.contains(&h.slot)
                        && self.owners.get(h.slot).map_or(true, |o| o.gen < h.gen)
                        && !raises.iter().any(|(slot, _)| *slot == h.slot)
                    {
                        raises.push((h.slot, owner));
                    }
                }
                Record::Snapshot(_) => break,
                Record::Fragment(_) | Record::Void(_) => {}
            }
        }
        if raises.is_empty() {
            return Ok(());
        }
        target
            .call_command(&tenure::raise_command(&self.owners_key, &raises))
            .await?;
        for &(slot, owner) in &raises {
            self.owners.raise(slot, owner);
            if let Some(tenures) = &mut builder.tenures {
                tenures.map.raise(slot, owner);
            }
        }
        info!(partition = %self.partition, held = %held, handoffs = ?raises, "slot handoffs applied ahead of a hold (no entry of their slots before them)");
        Ok(())
    }

    /// Holds the partition at `wait`'s entry (everything before it
    /// committed) for one [`tenure::HOLD_POLL`], then reads the slot's
    /// owner again into `builder`'s copy of the map. Returns `false` on
    /// shutdown.
    async fn wait_for_tenure(
        &mut self,
        target: &mut Target,
        builder: &mut BatchBuilder,
        wait: TenureWait,
    ) -> Result<bool, ApplyError> {
        // A hold of another kind at this entry (BLOCKED: the tenure was
        // another partition's) turned into a wait for the handoff.
        if self
            .status
            .blocked()
            .is_some_and(|blocked| blocked.log_id == wait.log_id)
        {
            self.status.clear_blocked();
        }
        let shown = HandoffWait {
            log_id: wait.log_id,
            slot: wait.slot,
            gen: wait.gen,
            current: wait.current.map(|owner| (owner.partition, owner.gen)),
            since_unix_ms: status::now_unix_ms(),
        };
        if self.status.snapshot().handoff.map_or(true, |old| {
            old.log_id != wait.log_id || old.current != shown.current
        }) {
            info!(
                partition = %self.partition,
                log_id = %wait.log_id,
                slot = wait.slot,
                gen = wait.gen,
                current = ?wait.current,
                "held for a slot handoff of another partition"
            );
        }
        self.status.set_handoff(shown);
        tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(tenure::HOLD_POLL) => {}
        }
        let current = target.read_owner(&self.owners_key, wait.slot).await?;
        self.owners.set_read(wait.slot, current);
        if let Some(tenures) = &mut builder.tenures {
            tenures.map.set_read(wait.slot, current);
        }
        Ok(true)
    }

    /// Deletes the partition's slot scope in the owned dbs of `batch` (a
    /// flush of a scoped partition; module doc, "Slot scopes"), before the
    /// batch with the rest of its entry and its checkpoint is sent. Every
    /// batch before it committed, so running this again after a crash, from
    /// any point, ends in the same state. Returns `false` on shutdown.
    async fn delete_scope_for(
        &mut self,
        target: &mut Target,
        batch: &Batch,
    ) -> Result<bool, ApplyError> {
        let Some(scope) = self.scope.clone() else {
            return Err(ApplyError::Task("a scoped flush without a scope".into()));
        };
        // With slot tenures the shard's keys are those of the slots the
        // owner map gives this partition now: slots it handed over since
        // its marker are another's, slots it received are its own.
        self.owners = target.read_owner_map(&self.owners_key).await?;
        let scope = tenure::flush_slots(&scope, &self.owners, self.partition.0);
        let conn = scope::ScopeConn {
            reply_timeout: target.reply_timeout,
            unlink: target.caps.is_some_and(|caps| caps.at_least(4, 0)),
        };
        let mut total = scope::ScopeDeletion::default();
        for &db in &batch.scope_delete {
            let done = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(false),
                done = scope::delete_scope(&mut target.client, db, &scope, &self.keyspace, conn) => done?,
            };
            total.scanned += done.scanned;
            total.deleted += done.deleted;
        }
        info!(
            partition = %self.partition,
            log_id = %batch.last,
            %scope,
            dbs = ?batch.scope_delete,
            scanned = total.scanned,
            deleted = total.deleted,
            "a flush of the source shard: deleted the keys of its slots"
        );
        Ok(true)
    }

    /// Reads the replies of `batch` (whose `EXEC` was sent) and records the
    /// outcome.
    async fn finish_batch(&mut self, target: &mut Target, batch: &Batch) -> Result<(), ApplyError> {
        let watch = target.reply().await?;
        if let Some(error) = watch.error_message() {
            return Err(ApplyError::Aborted {
                first: batch.first,
                last: batch.last,
                error: format!("WATCH refused: {error}"),
            });
        }
        let mut replies = Vec::with_capacity(batch.reply_count().min(1 << 16));
        for _ in 0..batch.reply_count() {
            replies.push(target.reply().await?);
        }
        if matches!(replies.last(), Some(Frame::Null)) {
            return Err(ApplyError::CheckpointMoved {
                first: batch.first,
                last: batch.last,
            });
        }
        let (applied, refused) = match batch.outcome(&replies)? {
            BatchOutcome::Committed { applied, refused } => (applied, refused),
            BatchOutcome::Aborted {
                refused: Some(refused),
                ..
            } => {
                let transient = batch::refusal_is_transient(&refused.error);
                return Err(ApplyError::Refused { refused, transient });
            }
            BatchOutcome::Aborted {
                error,
                refused: None,
            } => {
                return Err(ApplyError::Aborted {
                    first: batch.first,
                    last: batch.last,
                    error,
                })
            }
        };
        if let Some(skip) = &batch.skip {
            warn!(
                partition = %self.partition,
                log_id = %skip.log_id,
                command = %skip.refused.command,
                error = %skip.refused.error,
                by = ?skip.by,
                file = %self.dead_letter.as_ref().map(|d| d.path().display().to_string()).unwrap_or_default(),
                "entry skipped; it is recorded in the dead-letter file"
            );
            self.status.add_skipped(skip.log_id);
        }
        self.passed(batch.last.next());
        let refused_count = refused.len() as u64;
        for refused in &refused {
            warn!(
                partition = %self.partition,
                log_id = %refused.log_id,
                command = %refused.command,
                error = %refused.error,
                "the target refused a command; it is not retried"
            );
            self.status.set_last_refused(refused.clone());
        }
        self.status
            .add_counts(applied, refused_count, batch.skipped);
        self.report_voided(batch);
        self.status.add_echoes(batch.echoes);
        self.status.clear_handoff();
        self.status.set_applied(batch.last, self.epoch);
        self.status.set_online();
        let _ = self.applied_tx.send(batch.last);
        self.progressed = true;
        Ok(())
    }
}

/// Sends `cmd`, whose arguments at `places` are streamed: everything queued
/// so far, then the command piece by piece, each big argument's bytes read
/// from its fragments in the WAL one at a time (the next one read while the
/// current one is written), so a value of any size costs two fragments of
/// memory. The fragments must be exactly what the write names (rule 1 of
/// `src/record.rs`, "Big entries"); anything else is fatal, and since the
/// command is then cut short the connection is dropped with the error,
/// which discards the open `MULTI` on the target.
async fn stream_command(
    target: &mut Target,
    cmd: &Command,
    places: &[&StreamedPlace],
    wal: &Wal,
    partition: PartitionId,
) -> Result<(), ApplyError> {
    let mut head = BytesMut::new();
    encode_array_header(cmd.args.len(), &mut head);
    let mut places = places.iter().peekable();
    for (index, arg) in cmd.args.iter().enumerate() {
        let Some(place) = places.next_if(|place| place.arg == index) else {
            encode_bulk(arg, &mut head);
            continue;
        };
        encode_bulk_header(place.len, &mut head);
        target.client.queue_raw(&head);
        head.clear();
        let read = |seq: u32| {
            let wal = wal.clone();
            let log_id = LogId(place.first.0 + u64::from(seq));
            let expected_seq = place.first_seq + seq;
            tokio::task::spawn_blocking(move || {
                read_fragment(&wal, partition, log_id, expected_seq)
            })
        };
        let mut left = place.len;
        let mut next = (place.fragments > 0).then(|| read(0));
        for seq in 0..place.fragments {
            let Some(reading) = next.take() else { break };
            let data = reading
                .await
                .map_err(|error| ApplyError::Task(error.to_string()))??;
            if seq + 1 < place.fragments {
                next = Some(read(seq + 1));
            }
            let fragment_id = LogId(place.first.0 + u64::from(seq));
            if data.len() as u64 > left || (seq + 1 == place.fragments && data.len() as u64 != left)
            {
                return Err(ApplyError::Inconsistent {
                    partition,
                    what: format!(
                        "fragment {fragment_id} holds {} bytes where {left} of a {}-byte argument \
                         remain in {} fragments",
                        data.len(),
                        place.len,
                        place.fragments - seq
                    ),
                });
            }
            left -= data.len() as u64;
            tokio::time::timeout(target.reply_timeout, target.client.write_through(&data))
                .await
                .map_err(|_| ApplyError::Timeout(target.reply_timeout))??;
        }
        head.extend_from_slice(b"\r\n");
    }
    target.client.queue_raw(&head);
    target.client.expect_reply();
    Ok(())
}

/// Reads fragment `log_id` (blocking) and checks it is the `seq`th of its
/// write's run.
fn read_fragment(
    wal: &Wal,
    partition: PartitionId,
    log_id: LogId,
    seq: u32,
) -> Result<Bytes, ApplyError> {
    let one = ReadLimits {
        max_entries: 1,
        max_bytes: 1,
    };
    let entries = match wal.read(partition, log_id, one) {
        Ok(entries) => entries,
        Err(WalError::Trimmed {
            first_available, ..
        }) => {
            return Err(ApplyError::Gap {
                partition,
                wanted: log_id,
                first_available,
            })
        }
        Err(error) => return Err(error.into()),
    };
    let Some(entry) = entries.into_iter().find(|entry| entry.log_id == log_id) else {
        return Err(ApplyError::Inconsistent {
            partition,
            what: format!("fragment {log_id} of a write is not in the wal"),
        });
    };
    match Record::decode_shared(&entry.payload, RecordLimits::default()) {
        Ok(Record::Fragment(fragment)) if fragment.seq == seq => Ok(fragment.data),
        Ok(other) => Err(ApplyError::Inconsistent {
            partition,
            what: format!(
                "entry {log_id} should be fragment {seq} of the write after it, but is {}",
                match other {
                    Record::Fragment(fragment) => format!("fragment {}", fragment.seq),
                    Record::Write(_) => "a write".to_string(),
                    Record::Snapshot(_) => "a snapshot marker".to_string(),
                    Record::Handoff(_) => "a slot handoff".to_string(),
                    Record::Void(_) => "a slot tenure void".to_string(),
                }
            ),
        }),
        Err(error) => Err(ApplyError::Record {
            partition,
            log_id,
            error,
        }),
    }
}

/// Entries read from the WAL per [`Applier::scan_voids`] call while held.
const SCAN_ENTRIES: usize = 16 * 1024;

/// Waits for the WAL's next append notification; forever without one.
/// Sleeps until `at`; forever when `None`.
pub(super) async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending::<()>().await,
    }
}

async fn wait_appended(appended: &mut Option<watch::Receiver<u64>>) {
    match appended {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Notes a `SlotVoid` record at `at` (the latest one of each tenure).
fn note_void(voids: &mut batch::VoidedTenures, void: crate::record::SlotVoid, at: LogId) {
    let known = voids.entry((void.slot, void.gen)).or_insert(at);
    *known = (*known).max(at);
}

/// Entries from the reader, checked for order, waiting to be batched.
struct Feed {
    runs: mpsc::Receiver<ReadResult>,
    pending: VecDeque<Pending>,
    /// The log id the next entry must have.
    expected: LogId,
    /// The checkpoint said `loading`: the first entry must be a snapshot
    /// marker (the one being loaded, or a later one after a trim).
    marker_first: bool,
    /// Reading the listener's WAL: the reader may hand over a fallback
    /// snapshot's marker, at any log id ([`reader`]).
    fallbacks: bool,
    /// The marker (log id, epoch) of a resync loaded while it was stored
    /// (`snapshot`, "Loading a resync while it is stored"): already loaded,
    /// so the reader's copy is dropped.
    skip_marker: Option<(LogId, u64)>,
    partition: PartitionId,
    /// Entries held here at most (the reader's channel holds more).
    max_pending: usize,
    /// The source positions of entries read before they were durable, in
    /// log order, until a batch's checkpoint names them or passes them.
    marks: VecDeque<(LogId, SourceMark)>,
}

impl Feed {
    /// The source position of `log_id` if it was read before it was
    /// durable; forgets those of the entries before it.
    fn take_mark(&mut self, log_id: LogId) -> Option<SourceMark> {
        while let Some(&(id, mark)) = self.marks.front() {
            if id > log_id {
                break;
            }
            self.marks.pop_front();
            if id == log_id {
                return Some(mark);
            }
        }
        None
    }

    /// The next batch `builder` makes of the pending entries; a checkpoint
    /// that names an entry read before it was durable keeps its source
    /// position (`v3`).
    fn build(
        &mut self,
        builder: &mut BatchBuilder,
        checkpoint_key: &Bytes,
        epoch: u64,
        hold: Option<&Hold>,
    ) -> Option<Batch> {
        let mut batch = builder.build(&mut self.pending, epoch, hold)?;
        if let Some(mark) = self.take_mark(batch.last) {
            batch.mark_source(checkpoint_key, mark);
        }
        Some(batch)
    }

    /// Takes what the reader has ready, without waiting, up to
    /// `max_entries` entries and `max_bytes` bytes held (a partition held
    /// for a handoff reads ahead this far for handoffs it can apply).
    fn take_ahead(&mut self, max_entries: usize, max_bytes: usize) -> Result<(), ApplyError> {
        let mut bytes: usize = self.pending.iter().map(|p| p.size).sum();
        while self.pending.len() < max_entries && bytes < max_bytes {
            match self.runs.try_recv() {
                Ok(run) => {
                    let before = self.pending.len();
                    self.accept(Some(run))?;
                    bytes += self
                        .pending
                        .iter()
                        .skip(before)
                        .map(|p| p.size)
                        .sum::<usize>();
                }
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Takes what the reader has ready, without waiting.
    fn take_ready(&mut self) -> Result<(), ApplyError> {
        while self.pending.len() < self.max_pending {
            match self.runs.try_recv() {
                Ok(run) => self.accept(Some(run))?,
                // A stopped reader is noticed when entries are awaited.
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn accept(&mut self, run: Option<ReadResult>) -> Result<(), ApplyError> {
        let Some(run) = run else {
            return Err(ApplyError::Task("the wal reader stopped".into()));
        };
        for entry in run? {
            if let Some((log_id, epoch)) = self.skip_marker {
                if entry.log_id == log_id {
                    match &entry.record {
                        Record::Snapshot(marker) if marker.epoch == epoch => {
                            self.skip_marker = None;
                            self.marker_first = false;
                            self.expected = log_id.next();
                            continue;
                        }
                        _ => {
                            return Err(ApplyError::Inconsistent {
                                partition: self.partition,
                                what: format!(
                                    "entry {log_id} was confirmed as the marker of epoch {epoch} \
                                     when it was loaded, but is something else now"
                                ),
                            })
                        }
                    }
                }
            }
            let is_marker = matches!(entry.record, Record::Snapshot(_));
            // Only a snapshot marker may follow a gap (it replaces what was
            // trimmed before it).
            let placed = entry.log_id == self.expected
                || (is_marker && (entry.log_id > self.expected || self.fallbacks));
            if !placed {
                return Err(ApplyError::Inconsistent {
                    partition: self.partition,
                    what: format!(
                        "the wal reader returned entry {} where {} was expected",
                        entry.log_id, self.expected
                    ),
                });
            }
            if self.marker_first && !is_marker {
                return Err(ApplyError::Inconsistent {
                    partition: self.partition,
                    what: format!(
                        "the target's checkpoint says a snapshot is loading at entry {}, but that \
                         entry is not a snapshot marker",
                        entry.log_id
                    ),
                });
            }
            self.marker_first = false;
            self.expected = entry.log_id.next();
            if let Some(mark) = entry.mark {
                self.marks.push_back((entry.log_id, mark));
            }
            self.pending.push_back(entry);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_errors_are_the_unfixable_ones() {
        assert!(ApplyError::Task("x".into()).is_fatal());
        assert!(ApplyError::Reply(ReplyError::InternalRefused {
            command: "SELECT".into(),
            error: "ERR".into()
        })
        .is_fatal());
        assert!(!ApplyError::Timeout(Duration::from_secs(1)).is_fatal());
        assert!(!ApplyError::Aborted {
            first: LogId(1),
            last: LogId(2),
            error: "EXECABORT".into()
        }
        .is_fatal());
        assert!(!ApplyError::Wal(WalError::Trimmed {
            partition: PartitionId(0),
            wanted: LogId(1),
            first_available: LogId(5)
        })
        .is_fatal());
        assert!(ApplyError::Wal(WalError::Closed).is_fatal());
    }
}
