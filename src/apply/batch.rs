//! Turning WAL records into one `MULTI`/`EXEC` batch, and reading the
//! target's replies to it. Pure logic: no I/O, unit-tested here.
//!
//! A batch, as sent (the connection is in db 0 before and after it):
//!
//! ```text
//! MULTI
//! [SELECT <db>]  <commands of record a>      one record: its commands in its db
//! [SELECT <db>]  <commands of record b>      (a source transaction's commands
//! ...                                         stay together: one EXEC)
//! [SELECT 0]
//! SET __ferry:checkpoint:<drainer>:<partition> "v2 applied=<last id> epoch=<E> log=<tag>"
//! EXEC
//! ```
//!
//! A write with streamed arguments (`src/record.rs`, "Big entries") is
//! batched with the fragment run before it, as one unit: the run is covered
//! by the checkpoint but sends nothing itself, and the write's command is
//! sent with its big arguments streamed from the fragments
//! ([`Batch::streams`]). A batch never ends inside a run whose write is not
//! in it (it ends before the run, or waits for the write), so no checkpoint,
//! applied mark or ack ever lets retention trim fragments a later write
//! needs. A run followed by a snapshot marker (left by a crash mid-entry) is
//! covered like any other entry.
//!
//! Every data command goes through [`super::expire`] (expiry deadlines later
//! by `expire-grace`). Commands naming no key this sync owns (all internal,
//! `__ferry*`: heartbeats, another ferry's checkpoints; or outside the
//! `[filter]` key prefixes) are left out but still covered by the
//! checkpoint. The rest is translated for the keyspace this sync owns
//! ([`super::keyspace`]): commands in source dbs it does not replicate are
//! left out, the others placed in the target db theirs maps to, flushes
//! touch only owned keys of owned dbs and keep internal keys, and the
//! applier places every command with its own `SELECT`s (the source's are
//! consumed). A command naming keys it does not own with its own goes
//! without them when each key stands alone (`DEL`, `UNLINK`, `EXISTS`,
//! `TOUCH`, `MSET` pairs; [`OwnedKeyspace::resolve_mixed`]). A record that
//! cannot be applied without touching what is not owned (another mixed
//! command, one with streamed arguments among them, a script or unknown
//! command under a key filter), that names ferry's keys in any other
//! command, or that places a command in a db the target does not have, is
//! refused by the applier itself, whole and before anything of it is sent
//! (a failed `SELECT` inside `EXEC` would let the commands after it run in
//! the wrong db): it ends the batch before it and comes alone as
//! [`Batch::refused`], which the applier holds at like an entry the target
//! refused.
//!
//! In a partition with a slot scope ([`BatchBuilder::scope`]), an entry
//! with a `FLUSHALL`/`FLUSHDB` is not translated into flushes: it goes
//! alone, as [`Batch::scope_delete`] (the owned dbs whose scope keys the
//! applier deletes before sending the batch, once every batch before it
//! committed) and the commands after its last flush; the writes before the
//! flush are dropped when it erases them, else the entry is refused (module
//! doc of [`super`], "Slot scopes").
//!
//! The entry the applier is held at ([`Hold`]: the target refused it when
//! queued) never shares a batch: batches end before it, and it goes alone,
//! or, when it is to be skipped, a batch of only the checkpoint `SET`
//! naming it stands in for it ([`Batch::skip`], which keeps the commands
//! the applier would have sent, for the dead-letter file).

use std::collections::VecDeque;

use bytes::Bytes;

use super::checkpoint::{Checkpoint, SourceMark};
use super::dead_letter::SkippedBy;
use super::expire::ExpireGrace;
use super::keyspace::{KeyClass, OwnedKeyspace, Placed, Translated};
use super::status::RefusedCommand;
use super::tenure::{self, Decision, Owner, OwnerMap};
use crate::position::LogId;
use crate::record::{Record, SlotHandoff, SlotTenure, WriteRecord};
use crate::redis::cluster::SlotRanges;
use crate::redis::command::{self, Command};
use crate::redis::resp::Frame;

/// One decoded WAL entry waiting to be applied. A fragment's data is not
/// kept here: it is read again from the WAL when its write is sent.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub log_id: LogId,
    pub record: Record,
    /// Payload size, streamed bytes included, for the batch byte limit
    /// (0 for a fragment: its write counts them).
    pub size: usize,
    /// Read before it was durable (an early read of the listener's WAL):
    /// its source position, for a checkpoint that names it (`v3`).
    pub mark: Option<SourceMark>,
}

/// A streamed argument of a batch's command: its `len` bytes are the data
/// of the fragments `first .. first + fragments` of the WAL, whose `seq`s
/// start at `first_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamedPlace {
    /// Index in [`Batch::commands`].
    pub command: usize,
    /// Index in that command's arguments (which holds an empty argument).
    pub arg: usize,
    pub len: u64,
    pub first: LogId,
    pub fragments: u32,
    pub first_seq: u32,
}

/// What one command queued in a batch is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Slot {
    /// A `SELECT` or the checkpoint `SET` added by the applier.
    Internal,
    /// A command of the entry `log_id`.
    Data { log_id: LogId },
}

/// One `MULTI`/`EXEC` worth of records.
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    pub first: LogId,
    pub last: LogId,
    /// Commands between `MULTI` and `EXEC`, the checkpoint `SET` last.
    pub commands: Vec<Command>,
    /// What each of `commands` is.
    pub slots: Vec<Slot>,
    /// The entry this batch stops at because the applier refuses it itself,
    /// before sending anything (it cannot be applied without touching what
    /// this sync does not own, a db the target lacks, ferry's own keys):
    /// nothing of this batch is sent; the applier holds at it like at an
    /// entry the target refused (module doc of [`super`], "Refused
    /// entries"). It is the batch's only entry (after its fragment run).
    pub refused: Option<RefusedCommand>,
    /// The entry this batch skips (its only entry; `commands` is then just
    /// the checkpoint `SET`).
    pub skip: Option<Skip>,
    /// Commands left out: none of their keys is owned (internal, or outside
    /// the key filter), or they run in a db this sync does not replicate.
    pub skipped: u64,
    /// The checkpoint this batch writes.
    pub checkpoint: Checkpoint,
    /// Streamed arguments of `commands`, in command and argument order.
    pub streams: Vec<StreamedPlace>,
    /// The owned dbs in which the partition's slot scope is to be deleted
    /// before this batch is sent (a `FLUSHALL`/`FLUSHDB` of a partition with
    /// a scope: [`BatchBuilder::scope`]); empty: none. Such a batch holds
    /// only the flush's entry (its other commands, the checkpoint).
    pub scope_delete: Vec<u32>,
    /// Entries of a voided slot tenure this batch covers without sending
    /// anything (docs/cluster.md, rule 9), with their tags.
    pub voided: Vec<(LogId, SlotTenure)>,
    /// Two-way sync: entries this batch covers without sending anything
    /// because the other direction's applier wrote them ([`BatchBuilder::echo`]).
    pub echoes: u64,
    /// The slot handoff records of this batch, in log order (followed
    /// tenures only): their raises are also in `commands`; a cluster
    /// target applies them on their own, once every entry before each is
    /// below the floor ([`super::cluster`]).
    pub handoffs: Vec<(LogId, SlotHandoff)>,
}

/// A cluster source's slot tenures on the target ([`super::tenure`]):
/// the applier's copy of the owner map, raised by the handoffs it batches.
#[derive(Debug, Clone)]
pub(crate) struct Tenures {
    /// This applier's partition.
    pub partition: u32,
    /// The owner map's key.
    pub map_key: Bytes,
    pub map: OwnerMap,
    /// Tenures voided in this partition's log (docs/cluster.md, rule 9):
    /// (slot, gen) -> the log id of the latest `SlotVoid` record known.
    /// An entry of that tenure before it that would not be applied is
    /// voided.
    pub voids: VoidedTenures,
}

/// (slot, gen) -> the log id of the latest `SlotVoid` record of that tenure
/// known in the partition's log.
pub(crate) type VoidedTenures = std::collections::BTreeMap<(u16, u64), LogId>;

/// One write translated for the target ([`BatchBuilder::prepare`]).
struct Prepared {
    translated: Result<Translated, (String, String)>,
    /// Which of the write's commands each translated input command is.
    kept: Vec<usize>,
    /// Streamed argument places, by the write's command index.
    places: Vec<Vec<StreamedPlace>>,
    /// Commands left out for naming only keys this sync does not own
    /// (internal ones, or outside the key filter).
    left_out: u64,
}

/// An entry skipped instead of applied: what the dead-letter file records.
#[derive(Debug, Clone)]
pub(crate) struct Skip {
    pub log_id: LogId,
    /// The db the source ran it in.
    pub db: u32,
    /// The commands the applier would have sent, each in its target db.
    pub commands: Vec<(u32, Command)>,
    pub transaction: bool,
    pub by: SkippedBy,
    pub refused: RefusedCommand,
    /// Streamed arguments of `commands` (their bytes are written into the
    /// dead-letter record from the fragments).
    pub streams: Vec<StreamedPlace>,
}

/// The entry the applier is held at: the target refused it when queued.
#[derive(Debug, Clone)]
pub(crate) struct Hold {
    pub log_id: LogId,
    /// Skip it (and who decided), or send it alone again.
    pub skip: Option<SkippedBy>,
    /// Why it is held.
    pub refused: RefusedCommand,
}

/// Whether a refusal is about the target's state rather than the command:
/// those may clear by themselves (memory freed, a replica promoted, a load
/// finished), so the entry is retried, never skipped by itself.
pub(crate) fn refusal_is_transient(error: &str) -> bool {
    const TRANSIENT: [&str; 10] = [
        "OOM",
        "READONLY",
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "NOREPLICAS",
        "MISCONF",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOTREADY",
    ];
    let code = error.split(' ').next().unwrap_or("");
    TRANSIENT.contains(&code)
}

/// Limits and fixed parts of every batch.
#[derive(Debug, Clone)]
pub(crate) struct BatchBuilder {
    pub checkpoint_key: Bytes,
    pub max_entries: usize,
    pub max_bytes: usize,
    /// Number of dbs of the target (`databases`).
    pub databases: u32,
    /// What this sync owns on the target ([`super::keyspace`]).
    pub keyspace: OwnedKeyspace,
    /// Added to every expiry deadline ([`super::expire`]).
    pub expire_grace: ExpireGrace,
    /// Log tag of the WAL the batches come from (written into the
    /// checkpoint).
    pub log_tag: u64,
    /// The partition's slot scope (module doc of [`super`], "Slot scopes"):
    /// with one, a flush is not a flush but the deletion of the scope's
    /// keys, run before its batch ([`Batch::scope_delete`]).
    pub scope: Option<SlotRanges>,
    /// Slot tenures followed (docs/cluster.md, rules 4 and 5): a tagged
    /// write is applied when the owner map names this partition as its
    /// slot's owner, else held (the batch ends before it), and a handoff
    /// raises the map in the batch's `MULTI` (a cluster target's applier
    /// sends it on its own: [`Batch::handoffs`]). `None`: tags are
    /// ignored, a handoff is covered with nothing sent, and every
    /// `RESTORE-ASKING` of an owned key holds the partition.
    pub tenures: Option<Tenures>,
    /// Two-way sync: the checkpoint keys of the appliers that write this
    /// partition's source ([`BatchBuilder::echo`]). `None`: one-way.
    pub echo_of: Option<EchoRule>,
}

/// Two-way sync: which checkpoint keys the other direction's appliers write
/// on this partition's source, so that an entry writing one is their echo.
/// A key is `__ferry:checkpoint:<drainer>:<p>` (a standalone target's
/// checkpoint, a cluster target's floor) or that followed by `:{ferry:N}`
/// (a cluster target's slot checkpoint), with `p` among the other
/// direction's partitions. Both directions share the drainer id, and the
/// checkpoint keys of a side are written only by the applier that targets
/// it, so the partitions tell them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoRule {
    /// `__ferry:checkpoint:<drainer>:`
    prefix: Bytes,
    partitions: std::ops::RangeInclusive<u32>,
}

impl EchoRule {
    pub fn new(drainer_id: &str, partitions: std::ops::RangeInclusive<u32>) -> EchoRule {
        let mut prefix = crate::record::INTERNAL_PREFIX.to_vec();
        prefix.extend_from_slice(format!(":checkpoint:{drainer_id}:").as_bytes());
        EchoRule {
            prefix: Bytes::from(prefix),
            partitions,
        }
    }

    /// The partition of the other direction whose checkpoint `key` is, if
    /// it is one.
    pub fn partition_of(&self, key: &[u8]) -> Option<u32> {
        let rest = key.strip_prefix(&self.prefix[..])?;
        let end = rest.iter().position(|b| *b == b':').unwrap_or(rest.len());
        let (digits, tail) = rest.split_at(end);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        if !(tail.is_empty() || tail.starts_with(b":{")) {
            return None;
        }
        let partition: u32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
        self.partitions.contains(&partition).then_some(partition)
    }

    pub fn matches(&self, key: &[u8]) -> bool {
        self.partition_of(key).is_some()
    }
}

/// The commands a two-way sync refuses: they cannot be applied to the other
/// side without destroying what its own writers did there meanwhile
/// (module doc of [`super`], "Two-way sync").
const TWO_WAY_REFUSED: [&str; 3] = ["FLUSHALL", "FLUSHDB", "SWAPDB"];

/// The slot tenure an applier holds its partition for: the next entry to
/// batch waits until the owner map reaches `gen` for `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TenureWait {
    pub log_id: LogId,
    pub slot: u16,
    pub gen: u64,
    pub current: Option<Owner>,
}

/// Whether `write` holds a `FLUSHALL` or `FLUSHDB`.
fn flushes(write: &WriteRecord) -> bool {
    write
        .commands
        .iter()
        .any(|cmd| cmd.is("FLUSHALL") || cmd.is("FLUSHDB"))
}

/// Upper-case command name for logs and status, at most 64 bytes.
pub(crate) fn command_name(cmd: &Command) -> String {
    super::keyspace::upper(cmd.name())
}

/// The source's commands of an entry starting in `db`, each in the target
/// db its source db maps to (the source's db when it maps nowhere; its
/// `SELECT`s consumed): what a refused entry's dead-letter record holds.
/// `index[i]` is where command `i` went (`None`: a `SELECT`).
fn placed_as_received(
    keyspace: &OwnedKeyspace,
    db: u32,
    commands: &[Command],
) -> (Vec<(u32, Command)>, Vec<Option<usize>>) {
    let mut db = db;
    let mut placed = Vec::with_capacity(commands.len());
    let mut index = Vec::with_capacity(commands.len());
    for cmd in commands {
        if cmd.is("SELECT") {
            if let Some(to) = cmd
                .args
                .get(1)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| d.parse().ok())
            {
                db = to;
                index.push(None);
                continue;
            }
        }
        index.push(Some(placed.len()));
        placed.push((keyspace.target_db(db).unwrap_or(db), cmd.clone()));
    }
    (placed, index)
}

fn select(db: u32) -> Command {
    Command::new(vec![
        Bytes::from_static(b"SELECT"),
        Bytes::from(db.to_string()),
    ])
}

/// The places of `write`'s streamed arguments (at `log_id`), by command
/// index; `command` is filled in when the command is placed in a batch.
/// Empty (no allocation) for an ordinary write.
fn stream_places(log_id: LogId, write: &WriteRecord) -> Vec<Vec<StreamedPlace>> {
    if write.streamed.is_empty() {
        return Vec::new();
    }
    let mut places = vec![Vec::new(); write.commands.len()];
    let run_start = log_id.0.saturating_sub(write.fragment_count());
    let mut next_fragment = run_start;
    for arg in &write.streamed {
        if let Some(at) = places.get_mut(arg.command as usize) {
            at.push(StreamedPlace {
                command: 0,
                arg: arg.arg as usize,
                len: arg.len,
                first: LogId(next_fragment),
                fragments: arg.fragments,
                first_seq: (next_fragment - run_start) as u32,
            });
        }
        next_fragment += u64::from(arg.fragments);
    }
    places
}

/// A command with streamed arguments that the owned keyspace or the expiry
/// rewrite did not pass through unchanged (its empty placeholders must still
/// be where they were), named with why: it is refused rather than sent
/// without its bytes.
fn rewritten_streamed(
    translated: &Translated,
    kept: &[usize],
    places: &[Vec<StreamedPlace>],
    expire_grace: ExpireGrace,
) -> Option<(String, String)> {
    translated
        .commands
        .iter()
        .zip(&translated.origins)
        .find_map(|(placed, &origin)| {
            let places = places.get(*kept.get(origin)?)?;
            if places.is_empty() {
                return None;
            }
            // As it will be sent (the expiry rewrite only changes times).
            let sent = expire_grace.rewrite(placed.cmd.clone());
            let intact = places
                .iter()
                .all(|place| sent.args.get(place.arg).is_some_and(|a| a.is_empty()));
            (!intact).then(|| {
                (
                    command_name(&placed.cmd),
                    "a command with streamed arguments was rewritten for the owned keyspace"
                        .to_string(),
                )
            })
        })
}

/// The log id of the first entry of `pending` that is not a fragment: the
/// write the front run (if any) belongs with.
pub(crate) fn next_unit(pending: &VecDeque<Pending>) -> Option<LogId> {
    pending
        .iter()
        .find(|p| !matches!(p.record, Record::Fragment(_)))
        .map(|p| p.log_id)
}

impl BatchBuilder {
    /// Takes records from the front of `pending` into a batch, up to the
    /// limits, stopping before a snapshot marker and before the entry held
    /// by `hold` (which goes alone, or skipped). `None` when the front is a
    /// snapshot marker or `pending` is empty.
    pub fn build(
        &mut self,
        pending: &mut VecDeque<Pending>,
        epoch: u64,
        hold: Option<&Hold>,
    ) -> Option<Batch> {
        let mut batch: Option<Batch> = None;
        let mut db = 0u32;
        let mut bytes = 0usize;
        let mut entries = 0usize;
        while let Some(front) = pending.front() {
            if matches!(front.record, Record::Fragment(_)) {
                // A run and the entry after it go together, or not at all.
                let Some(end) = pending
                    .iter()
                    .position(|p| !matches!(p.record, Record::Fragment(_)))
                else {
                    break;
                };
                let after = &pending[end];
                if let Record::Write(write) = &after.record {
                    // A voided write's run is covered with it, and so is
                    // an echo's.
                    let voided = self.voided(after.log_id, write).is_some() || self.echo(write);
                    // A held write's run waits with it.
                    if !voided && matches!(self.decision(write), Some(Decision::Wait { .. })) {
                        break;
                    }
                    let alone = !voided
                        && (hold.is_some_and(|hold| hold.log_id == after.log_id)
                            || (self.scope.is_some() && flushes(write))
                            || self.check(after.log_id, write).is_err());
                    if entries >= self.max_entries
                        || (entries > 0 && (alone || bytes + after.size > self.max_bytes))
                    {
                        break;
                    }
                }
                for fragment in pending.drain(..end) {
                    let batch = batch.get_or_insert_with(|| {
                        Batch::starting_at(fragment.log_id, epoch, self.log_tag)
                    });
                    batch.last = fragment.log_id;
                }
                continue;
            }
            if let Record::Handoff(handoff) = front.record {
                // A slot handoff of a cluster source (docs/cluster.md, rule
                // 5): the owner map takes it in this batch's MULTI, with the
                // checkpoint that covers it. Without tenures it is covered
                // with nothing sent.
                let Some(Pending { log_id, .. }) = pending.pop_front() else {
                    break;
                };
                let batch =
                    batch.get_or_insert_with(|| Batch::starting_at(log_id, epoch, self.log_tag));
                batch.last = log_id;
                if let Some(tenures) = &mut self.tenures {
                    let owner = Owner {
                        partition: handoff.to,
                        gen: handoff.gen,
                    };
                    tenures.map.raise(handoff.slot, owner);
                    batch.handoffs.push((log_id, handoff));
                    if db != 0 {
                        batch.commands.push(select(0));
                        batch.slots.push(Slot::Internal);
                        db = 0;
                    }
                    batch.commands.push(tenure::raise_command(
                        &tenures.map_key,
                        &[(handoff.slot, owner)],
                    ));
                    batch.slots.push(Slot::Internal);
                }
                entries += 1;
                continue;
            }
            if let Record::Void(void) = front.record {
                // A tenure voided (docs/cluster.md, rule 9): covered with
                // nothing sent; the entries it voids are before it.
                let Some(Pending { log_id, .. }) = pending.pop_front() else {
                    break;
                };
                let batch =
                    batch.get_or_insert_with(|| Batch::starting_at(log_id, epoch, self.log_tag));
                batch.last = log_id;
                if let Some(tenures) = &mut self.tenures {
                    let known = tenures.voids.entry((void.slot, void.gen)).or_insert(log_id);
                    *known = (*known).max(log_id);
                }
                entries += 1;
                continue;
            }
            let Record::Write(write) = &front.record else {
                break;
            };
            if entries >= self.max_entries || (entries > 0 && bytes + front.size > self.max_bytes) {
                break;
            }
            if self.echo(write) {
                // What the other direction applied to this side, back in
                // its stream: covered, never sent back.
                let Some(Pending { log_id, .. }) = pending.pop_front() else {
                    break;
                };
                let batch =
                    batch.get_or_insert_with(|| Batch::starting_at(log_id, epoch, self.log_tag));
                batch.last = log_id;
                batch.echoes += 1;
                entries += 1;
                continue;
            }
            if let Some(tenure) = self.voided(front.log_id, write) {
                // An entry of an aborted import: covered, never applied.
                let Some(Pending { log_id, .. }) = pending.pop_front() else {
                    break;
                };
                let batch =
                    batch.get_or_insert_with(|| Batch::starting_at(log_id, epoch, self.log_tag));
                batch.last = log_id;
                batch.voided.push((log_id, tenure));
                entries += 1;
                continue;
            }
            let held = hold.filter(|hold| hold.log_id == front.log_id);
            if held.is_some() && entries > 0 {
                break;
            }
            // Held until the owner map names this partition (the applier
            // waits).
            if matches!(self.decision(write), Some(Decision::Wait { .. })) {
                break;
            }
            // A flush of a partition with a slot scope goes alone, as the
            // deletion of the scope and the rest of its entry (a skipped
            // one is recorded as received). Two-way sync refuses it
            // instead (`check`).
            let mut scope_delete = None;
            if self.scope.is_some()
                && self.echo_of.is_none()
                && flushes(write)
                && !held.is_some_and(|hold| hold.skip.is_some())
            {
                if entries > 0 {
                    break;
                }
                match self.split_scoped_flush(write) {
                    Ok((dbs, rest)) => {
                        scope_delete = Some(dbs);
                        if let Some(front) = pending.front_mut() {
                            front.record = Record::Write(rest);
                        }
                    }
                    Err((command, why)) => {
                        let Some(Pending { log_id, .. }) = pending.pop_front() else {
                            break;
                        };
                        let batch = batch
                            .get_or_insert_with(|| Batch::starting_at(log_id, epoch, self.log_tag));
                        batch.last = log_id;
                        batch.refused = Some(RefusedCommand {
                            log_id,
                            command,
                            error: why,
                        });
                        break;
                    }
                }
            }
            let Some(front) = pending.front() else {
                break;
            };
            let Record::Write(write) = &front.record else {
                break;
            };
            let classes = match self.check(front.log_id, write) {
                Ok(classes) => classes,
                Err((command, why)) => {
                    // Refused by the applier itself: alone, like an entry
                    // the target refused.
                    if entries > 0 {
                        break;
                    }
                    let Some(Pending {
                        log_id,
                        record: Record::Write(write),
                        ..
                    }) = pending.pop_front()
                    else {
                        break;
                    };
                    let batch = batch
                        .get_or_insert_with(|| Batch::starting_at(log_id, epoch, self.log_tag));
                    batch.last = log_id;
                    let refused = RefusedCommand {
                        log_id,
                        command,
                        error: why,
                    };
                    match held.and_then(|hold| hold.skip.map(|by| (hold, by))) {
                        Some((hold, by)) => {
                            let (commands, index) =
                                placed_as_received(&self.keyspace, write.db, &write.commands);
                            let mut streams = Vec::new();
                            for (at, places) in
                                stream_places(log_id, &write).into_iter().enumerate()
                            {
                                if let Some(Some(command)) = index.get(at) {
                                    streams.extend(places.into_iter().map(|mut place| {
                                        place.command = *command;
                                        place
                                    }));
                                }
                            }
                            batch.skip = Some(Skip {
                                log_id,
                                db: write.db,
                                commands,
                                transaction: write.transaction,
                                by,
                                refused: hold.refused.clone(),
                                streams,
                            });
                        }
                        None => batch.refused = Some(refused),
                    }
                    break;
                }
            };
            // Taken by value: its commands move into the batch uncloned.
            let Some(Pending {
                log_id,
                record: Record::Write(write),
                size,
                ..
            }) = pending.pop_front()
            else {
                break;
            };
            let batch =
                batch.get_or_insert_with(|| Batch::starting_at(log_id, epoch, self.log_tag));
            batch.last = log_id;
            entries += 1;
            bytes += size;
            let (db_of, transaction) = (write.db, write.transaction);
            let prepared = self.prepare(log_id, write, &classes);
            batch.skipped += prepared.left_out;
            // `check` translated the entries that can be refused.
            let Ok(translated) = prepared.translated else {
                debug_assert!(false, "an entry refused after check passed");
                break;
            };
            let (kept, mut places) = (prepared.kept, prepared.places);
            match held.and_then(|hold| hold.skip.map(|by| (hold, by))) {
                Some((hold, by)) => {
                    let mut streams = Vec::new();
                    let mut commands = Vec::with_capacity(translated.commands.len());
                    // Empty unless the write has streamed arguments.
                    let mut origins = translated.origins.into_iter();
                    for placed in translated.commands {
                        let origin = origins.next().and_then(|origin| kept.get(origin));
                        if let Some(places) = origin.and_then(|&i| places.get_mut(i)) {
                            for mut place in places.drain(..) {
                                place.command = commands.len();
                                streams.push(place);
                            }
                        }
                        commands.push((placed.db, self.expire_grace.rewrite(placed.cmd)));
                    }
                    batch.skip = Some(Skip {
                        log_id,
                        db: db_of,
                        commands,
                        transaction,
                        by,
                        refused: hold.refused.clone(),
                        streams,
                    });
                }
                None => {
                    batch.skipped += translated.filtered;
                    // Empty unless the write has streamed arguments.
                    let mut origins = translated.origins.into_iter();
                    for placed in translated.commands {
                        if placed.db != db {
                            batch.commands.push(select(placed.db));
                            batch.slots.push(Slot::Internal);
                            db = placed.db;
                        }
                        let origin = origins.next().and_then(|origin| kept.get(origin));
                        if let Some(places) = origin.and_then(|&i| places.get_mut(i)) {
                            for mut place in places.drain(..) {
                                place.command = batch.commands.len();
                                batch.streams.push(place);
                            }
                        }
                        batch.commands.push(self.expire_grace.rewrite(placed.cmd));
                        batch.slots.push(Slot::Data { log_id });
                    }
                }
            }
            if let Some(dbs) = scope_delete {
                if batch.refused.is_none() {
                    batch.scope_delete = dbs;
                }
                break;
            }
            if held.is_some() {
                break;
            }
        }
        let mut batch = batch?;
        if db != 0 {
            batch.commands.push(select(0));
            batch.slots.push(Slot::Internal);
        }
        batch.checkpoint = Checkpoint::Applied {
            log_id: batch.last,
            epoch,
            log: self.log_tag,
            source: None,
        };
        batch.commands.push(Command::new(vec![
            Bytes::from_static(b"SET"),
            self.checkpoint_key.clone(),
            Bytes::from(batch.checkpoint.encode()),
        ]));
        batch.slots.push(Slot::Internal);
        Some(batch)
    }

    /// Splits an entry that flushes, of a partition with a slot scope, into
    /// the owned dbs whose scope keys its flushes delete and the write of
    /// what follows its last flush (applied after the deletion, in the
    /// batch's `MULTI`). What comes before the last flush is dropped: the
    /// source's flush erased it, which holds for a keyed command in a db a
    /// later flush of the entry covers; anything else there (a keyless
    /// command, a write in another db, streamed arguments) cannot be
    /// ordered around a deletion that runs outside `MULTI`, and refuses
    /// the entry (the command and why).
    fn split_scoped_flush(
        &self,
        write: &WriteRecord,
    ) -> Result<(Vec<u32>, WriteRecord), (String, String)> {
        let refuse = |name: String, what: String| {
            Err((
                name,
                format!(
                    "in a partition with a slot scope a flush is the deletion of the scope's keys, run outside the batch's MULTI; {what}"
                ),
            ))
        };
        let mut db = write.db;
        // The db each command runs in, and the owned dbs each flush covers.
        let mut dbs_at = Vec::with_capacity(write.commands.len());
        let mut covers: Vec<Option<Vec<u32>>> = Vec::with_capacity(write.commands.len());
        for cmd in &write.commands {
            if cmd.is("SELECT") {
                match cmd
                    .args
                    .get(1)
                    .and_then(|d| std::str::from_utf8(d).ok()?.parse().ok())
                {
                    Some(to) => db = to,
                    None => {
                        return refuse(
                            "SELECT".into(),
                            "it has a SELECT with a bad db index".into(),
                        )
                    }
                }
            }
            dbs_at.push(db);
            // Target dbs (the db map applied).
            covers.push(if cmd.is("FLUSHALL") {
                Some(self.keyspace.owned_target_dbs(self.databases))
            } else if cmd.is("FLUSHDB") {
                Some(self.keyspace.target_db(db).into_iter().collect())
            } else {
                None
            });
        }
        let Some(last) = covers.iter().rposition(Option::is_some) else {
            return Err(("?".into(), "no flush in the entry".into()));
        };
        if let Some(streamed) = write.streamed.first() {
            let name = write
                .commands
                .get(streamed.command as usize)
                .map(command_name)
                .unwrap_or_else(|| "?".into());
            return refuse(name, "the same entry streams big arguments".into());
        }
        let mut covered: Vec<u32> = covers[last].clone().unwrap_or_default();
        let mut all: Vec<u32> = covered.clone();
        for index in (0..last).rev() {
            let cmd = &write.commands[index];
            if let Some(dbs) = &covers[index] {
                covered.extend(dbs);
                all.extend(dbs);
                continue;
            }
            let at = dbs_at[index];
            let Some(target_at) = self.keyspace.target_db(at) else {
                continue;
            };
            if cmd.is("SELECT") {
                continue;
            }
            let keyed = command::key_indices(cmd).is_ok_and(|keys| !keys.is_empty());
            if !keyed || !covered.contains(&target_at) {
                return refuse(
                    command_name(cmd),
                    format!(
                        "{} in db {at} before the flush in the same entry is not erased by it",
                        command_name(cmd)
                    ),
                );
            }
        }
        all.sort_unstable();
        all.dedup();
        let rest = WriteRecord {
            db: dbs_at[last],
            commands: write.commands[last + 1..].to_vec(),
            transaction: write.transaction,
            streamed: Vec::new(),
            tenure: write.tenure,
        };
        Ok((all, rest))
    }

    /// Rule 9: the tag of `write` (at `log_id`) when it is voided: it would
    /// not be applied (rule 4: wait or blocked), and a `SlotVoid` of its
    /// tenure follows it in the partition's log.
    pub fn voided(&self, log_id: LogId, write: &WriteRecord) -> Option<SlotTenure> {
        let tenures = self.tenures.as_ref()?;
        let tag = write.tenure?;
        let void_at = tenures.voids.get(&(tag.slot, tag.gen))?;
        (*void_at > log_id
            && tenure::decide(&tenures.map, tenures.partition, tag) != Decision::Apply)
            .then_some(tag)
    }

    /// Two-way sync: whether `write` is what the other direction's applier
    /// wrote to this partition's source, coming back in its stream. That
    /// applier writes every batch as one `MULTI`/`EXEC` ending with its
    /// checkpoint `SET` (into a cluster, each piece ends with its slot
    /// checkpoint's, and the floor is a `SET` alone: [`EchoRule`]), which
    /// the source propagates as one transaction
    /// (one entry) holding that `SET`; no other writer writes that key
    /// (`__ferry*` keys are ferry's), so an entry that writes it is an echo,
    /// whole, and one that does not is not.
    pub fn echo(&self, write: &WriteRecord) -> bool {
        let Some(rule) = &self.echo_of else {
            return false;
        };
        write
            .commands
            .iter()
            .any(|cmd| cmd.is("SET") && cmd.args.get(1).is_some_and(|k| rule.matches(k)))
    }

    /// Rule 4 for `write`, when tenures are followed and it is tagged.
    fn decision(&self, write: &WriteRecord) -> Option<Decision> {
        let tenures = self.tenures.as_ref()?;
        Some(tenure::decide(
            &tenures.map,
            tenures.partition,
            write.tenure?,
        ))
    }

    /// The tenure the next entry to batch (after a fragment run) waits for,
    /// if it is held for a handoff.
    pub fn tenure_wait(&self, pending: &VecDeque<Pending>) -> Option<TenureWait> {
        let next = pending
            .iter()
            .find(|p| !matches!(p.record, Record::Fragment(_)))?;
        let Record::Write(write) = &next.record else {
            return None;
        };
        if self.voided(next.log_id, write).is_some() {
            return None;
        }
        match self.decision(write)? {
            Decision::Wait { current } => {
                let tenure = write.tenure?;
                Some(TenureWait {
                    log_id: next.log_id,
                    slot: tenure.slot,
                    gen: tenure.gen,
                    current,
                })
            }
            _ => None,
        }
    }

    /// Whether the next entry to batch (after a fragment run) flushes in a
    /// partition with a slot scope: its batch must be built only once every
    /// batch before it committed (its deletion runs first).
    pub fn scoped_flush_next(&self, pending: &VecDeque<Pending>) -> bool {
        self.scope.is_some()
            && pending
                .iter()
                .find(|p| !matches!(p.record, Record::Fragment(_)))
                .is_some_and(|p| matches!(&p.record, Record::Write(write) if flushes(write)))
    }

    /// Whether the applier itself must refuse `write` (at `log_id`), with
    /// the refused command's name and why; else the key class of each of
    /// its commands. Entries that can be refused (a `SELECT`, a command
    /// reaching across dbs, a db the target lacks, streamed arguments, a
    /// command naming keys this sync does not own with its own) are
    /// translated on a copy.
    fn check(&self, log_id: LogId, write: &WriteRecord) -> Result<Vec<KeyClass>, (String, String)> {
        // A cluster source's shard writes RESTORE-ASKING for each key moved
        // into it by a resharding (the shard it left writes a DEL). Applied
        // as it comes, in no order with the other shard's DEL, that key
        // could be lost or resurrected on the target. A tagged one is
        // ordered by its slot tenure (above: it is applied only once the
        // shard it left handed the slot over, after its DEL); an untagged
        // one (a listener that does not tag, or an applier that does not
        // follow tenures) holds the partition here. Keys this sync does not
        // own (ferry's heartbeats moving with their slot, keys outside the
        // key filter) are left out as usual.
        if let Some(Decision::Foreign { current }) = self.decision(write) {
            let tenure = write.tenure.map(|t| (t.slot, t.gen)).unwrap_or_default();
            return Err((
                write.commands.first().map(command_name).unwrap_or_default(),
                format!(
                    "a write of slot {} in tenure generation {} of this partition, but the target's \
                     owner map gives the slot to {current}: the slot passed through this \
                     shard in a tenure the listener did not record (it moved on before the topology \
                     was read, docs/cluster.md), so the write is held rather than applied out of \
                     order. Sync again from a new data dir once the resharding is over",
                    tenure.0, tenure.1
                ),
            ));
        }
        let ordered = write.tenure.is_some() && self.tenures.is_some();
        if let Some(cmd) = write.commands.iter().filter(|_| !ordered).find(|c| {
            c.is("RESTORE-ASKING") && c.args.get(1).is_some_and(|key| self.keyspace.owns_key(key))
        }) {
            return Err((
                command_name(cmd),
                "a key moved into this shard by a resharding of the cluster source; ferry does not \
                 carry a source resharding yet (docs/cluster.md), so the partition holds here rather \
                 than lose or resurrect keys. Once the resharding is over, sync again from a new \
                 data dir (ferry skip loses the key; the dead-letter file keeps the command)"
                    .into(),
            ));
        }
        if self.echo_of.is_some() {
            if let Some(cmd) = write
                .commands
                .iter()
                .find(|c| TWO_WAY_REFUSED.iter().any(|name| c.is(name)))
            {
                return Err((
                    command_name(cmd),
                    "two-way sync refuses flushes and SWAPDB: applied to the other side they \
                     would destroy what its writers did there meanwhile. The entry is held (ferry \
                     skip passes it over, recorded in the dead-letter file); flush both sides by \
                     hand if that is what was meant"
                        .into(),
                ));
            }
        }
        let classes: Vec<KeyClass> = write
            .commands
            .iter()
            .map(|cmd| self.keyspace.classify(cmd))
            .collect();
        for (cmd, class) in write.commands.iter().zip(&classes) {
            match class {
                KeyClass::Mixed => {
                    if let Err(why) = self.keyspace.resolve_mixed(cmd) {
                        return Err((command_name(cmd), why));
                    }
                }
                KeyClass::Unknown => {
                    return Err((command_name(cmd), self.keyspace.unknown_keys_reason(cmd)))
                }
                _ => {}
            }
        }
        const ACROSS_DBS: [&str; 7] = [
            "SELECT", "FLUSHALL", "FLUSHDB", "SWAPDB", "MOVE", "COPY", "FUNCTION",
        ];
        let may_refuse = self
            .keyspace
            .target_db(write.db)
            .is_some_and(|db| db >= self.databases)
            || !write.streamed.is_empty()
            || write
                .commands
                .iter()
                .any(|cmd| ACROSS_DBS.iter().any(|name| cmd.is(name)));
        if may_refuse {
            self.prepare(log_id, write.clone(), &classes).translated?;
        }
        Ok(classes)
    }

    /// Translates `write`'s commands for the target: keys this sync does
    /// not own left out ([`KeyClass`]), the owned keyspace, the db range,
    /// streamed arguments still in place.
    fn prepare(&self, log_id: LogId, write: WriteRecord, classes: &[KeyClass]) -> Prepared {
        // The places of its streamed arguments, by command: its fragments
        // are the entries right before it.
        let places = stream_places(log_id, &write);
        let mut left_out = 0;
        let mut refusal = None;
        let mut commands = Vec::with_capacity(write.commands.len());
        // Which of the write's commands each of `commands` is (only needed
        // to place streamed arguments).
        let mut kept = Vec::new();
        for ((index, cmd), class) in write.commands.into_iter().enumerate().zip(classes) {
            let cmd = match class {
                KeyClass::Data => cmd,
                KeyClass::Internal | KeyClass::Outside => {
                    left_out += 1;
                    continue;
                }
                // Dropping keys would move its streamed arguments.
                KeyClass::Mixed if places.get(index).is_some_and(|p| !p.is_empty()) => {
                    refusal = Some((
                        command_name(&cmd),
                        "a command with streamed arguments names keys this sync does not own"
                            .to_string(),
                    ));
                    break;
                }
                KeyClass::Mixed => match self.keyspace.resolve_mixed(&cmd) {
                    Ok(Some(resolved)) => resolved,
                    Ok(None) => {
                        left_out += 1;
                        continue;
                    }
                    Err(why) => {
                        refusal = Some((command_name(&cmd), why));
                        break;
                    }
                },
                KeyClass::Unknown => {
                    refusal = Some((command_name(&cmd), self.keyspace.unknown_keys_reason(&cmd)));
                    break;
                }
            };
            commands.push(cmd);
            if !places.is_empty() {
                kept.push(index);
            }
        }
        let translated = match refusal {
            Some(refusal) => Err(refusal),
            None if places.is_empty() => self
                .keyspace
                .translate(write.db, commands, self.databases)
                .map_err(|refusal| (refusal.command, refusal.reason)),
            None => self
                .keyspace
                .translate_tracked(write.db, commands, self.databases)
                .map_err(|refusal| (refusal.command, refusal.reason)),
        };
        let translated = translated
            .and_then(
                |translated| match self.db_out_of_range(&translated.commands) {
                    Some((command, why)) => Err((command, why)),
                    None => Ok(translated),
                },
            )
            .and_then(|translated| {
                match places.is_empty() {
                    true => None,
                    false => rewritten_streamed(&translated, &kept, &places, self.expire_grace),
                }
                .map_or(Ok(translated), Err)
            });
        Prepared {
            translated,
            kept,
            places,
            left_out,
        }
    }

    /// The command and why, when a placed command names a db the target
    /// does not have (a failed `SELECT` inside `EXEC` would let the commands
    /// after it run in the wrong db).
    fn db_out_of_range(&self, placed: &[Placed]) -> Option<(String, String)> {
        let bad = placed.iter().find(|p| p.db >= self.databases)?;
        Some((
            command_name(&bad.cmd),
            format!(
                "db {} is out of range: the target has {} databases",
                bad.db, self.databases
            ),
        ))
    }
}

/// How the target took a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BatchOutcome {
    /// `EXEC` ran: the checkpoint moved to the batch's last id. `refused`
    /// lists the data commands that failed inside it (not retried).
    Committed {
        applied: u64,
        refused: Vec<RefusedCommand>,
    },
    /// Nothing ran (a queue-time error, `EXECABORT`). `refused` is the
    /// first data command the target refused when queued, which names the
    /// entry that made it abort (none when the refusal was of the
    /// applier's own commands, or no queued reply explains it).
    Aborted {
        error: String,
        refused: Option<RefusedCommand>,
    },
}

/// What cannot be explained by the target refusing data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The applier's own `SELECT` or checkpoint `SET` failed inside `EXEC`:
    /// the commands after it may have run in the wrong db.
    #[error("the target refused the applier's own {command} inside EXEC: {error}")]
    InternalRefused { command: String, error: String },
    #[error("unexpected reply to {what}: {reply}")]
    Unexpected { what: String, reply: String },
}

fn show(frame: &Frame) -> String {
    let mut text = format!("{frame:?}");
    if text.len() > 200 {
        let mut end = 200;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

impl Batch {
    /// The entry this batch's checkpoint names was applied before it was
    /// durable: the checkpoint keeps its source position (`v3`, checked
    /// after a crash), in the `SET` that ends the batch.
    pub fn mark_source(&mut self, checkpoint_key: &Bytes, mark: SourceMark) {
        let Checkpoint::Applied { source, .. } = &mut self.checkpoint else {
            return;
        };
        *source = Some(mark);
        let set = Command::new(vec![
            Bytes::from_static(b"SET"),
            checkpoint_key.clone(),
            Bytes::from(self.checkpoint.encode()),
        ]);
        // `build` ends every batch with its checkpoint's SET.
        debug_assert!(matches!(self.slots.last(), Some(Slot::Internal)));
        if let Some(last) = self.commands.last_mut() {
            *last = set;
        }
    }

    fn starting_at(log_id: LogId, epoch: u64, log: u64) -> Batch {
        Batch {
            first: log_id,
            last: log_id,
            commands: Vec::new(),
            slots: Vec::new(),
            refused: None,
            skip: None,
            skipped: 0,
            checkpoint: Checkpoint::Applied {
                log_id,
                epoch,
                log,
                source: None,
            },
            streams: Vec::new(),
            scope_delete: Vec::new(),
            voided: Vec::new(),
            echoes: 0,
            handoffs: Vec::new(),
        }
    }

    /// Whether the batch only moves the checkpoint: its entries apply
    /// nothing (heartbeats, other syncs' keys, a two-way sync's echoes) and
    /// it records, holds or raises nothing.
    pub fn is_silent(&self) -> bool {
        self.commands.len() == 1
            && self.refused.is_none()
            && self.skip.is_none()
            && self.scope_delete.is_empty()
            && self.handoffs.is_empty()
    }

    /// Number of replies the target sends for this batch: `MULTI`, one per
    /// queued command, `EXEC`.
    pub fn reply_count(&self) -> usize {
        self.commands.len() + 2
    }

    /// Interprets the replies to `MULTI`, each queued command and `EXEC`.
    pub fn outcome(&self, replies: &[Frame]) -> Result<BatchOutcome, ReplyError> {
        let unexpected = |what: &str, reply: &Frame| ReplyError::Unexpected {
            what: what.to_string(),
            reply: show(reply),
        };
        let [multi, queued @ .., exec] = replies else {
            return Err(ReplyError::Unexpected {
                what: "a batch".into(),
                reply: format!("{} replies", replies.len()),
            });
        };
        if queued.len() != self.commands.len() {
            return Err(ReplyError::Unexpected {
                what: "a batch".into(),
                reply: format!(
                    "{} replies for {} queued commands",
                    queued.len(),
                    self.commands.len()
                ),
            });
        }
        if let Some(error) = multi.error_message() {
            // Not in a transaction: what followed ran, or failed, one by one.
            return Ok(BatchOutcome::Aborted {
                error: format!("MULTI refused: {error}"),
                refused: None,
            });
        }
        // The first queue-time refusal explains an EXECABORT.
        let first_refusal = queued
            .iter()
            .zip(&self.commands)
            .zip(&self.slots)
            .find_map(|((reply, cmd), slot)| Some((reply.error_message()?, cmd, slot)));
        let queue_error = first_refusal.as_ref().map(|(error, cmd, slot)| match slot {
            Slot::Data { log_id } => {
                format!("entry {log_id}: {} refused: {error}", command_name(cmd))
            }
            Slot::Internal => format!("{} refused: {error}", command_name(cmd)),
        });
        let refused = first_refusal.and_then(|(error, cmd, slot)| match slot {
            Slot::Data { log_id } => Some(RefusedCommand {
                log_id: *log_id,
                command: command_name(cmd),
                error,
            }),
            Slot::Internal => None,
        });
        let results = match exec {
            Frame::Array(results) => results,
            Frame::Error(_) | Frame::BulkError(_) => {
                let exec_error = exec.error_message().unwrap_or_default();
                let error = match queue_error {
                    Some(queue_error) => format!("{exec_error} ({queue_error})"),
                    None => exec_error,
                };
                return Ok(BatchOutcome::Aborted { error, refused });
            }
            // A null (the watched checkpoint changed) is handled before
            // this by the applier; anything else here is unexpected.
            other => return Err(unexpected("EXEC", other)),
        };
        if results.len() != self.commands.len() {
            return Err(ReplyError::Unexpected {
                what: "EXEC".into(),
                reply: format!(
                    "{} results for {} queued commands",
                    results.len(),
                    self.commands.len()
                ),
            });
        }
        let mut applied = 0;
        let mut refused = Vec::new();
        for ((result, cmd), slot) in results.iter().zip(&self.commands).zip(&self.slots) {
            match (result.error_message(), slot) {
                (None, Slot::Data { .. }) => applied += 1,
                (None, Slot::Internal) => {}
                (Some(error), Slot::Data { log_id }) => refused.push(RefusedCommand {
                    log_id: *log_id,
                    command: command_name(cmd),
                    error,
                }),
                (Some(error), Slot::Internal) => {
                    return Err(ReplyError::InternalRefused {
                        command: command_name(cmd),
                        error,
                    })
                }
            }
        }
        Ok(BatchOutcome::Committed { applied, refused })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{SnapshotMarker, WriteRecord};

    fn write(log_id: u64, db: u32, commands: &[&[&str]], transaction: bool) -> Pending {
        let record = Record::Write(WriteRecord {
            db,
            commands: commands
                .iter()
                .map(|c| Command::from_parts(c.iter()))
                .collect(),
            transaction,
            streamed: vec![],
            tenure: None,
        });
        Pending {
            mark: None,
            log_id: LogId(log_id),
            size: record.encode().len(),
            record,
        }
    }

    fn builder(max_entries: usize) -> BatchBuilder {
        BatchBuilder {
            checkpoint_key: Bytes::from_static(b"__ferry:checkpoint:d:0"),
            max_entries,
            max_bytes: 1 << 20,
            databases: 16,
            keyspace: OwnedKeyspace::all(),
            expire_grace: ExpireGrace::default(),
            log_tag: 0xab,
            scope: None,
            tenures: None,
            echo_of: None,
        }
    }

    fn shown(batch: &Batch) -> Vec<String> {
        batch
            .commands
            .iter()
            .map(|c| {
                c.args
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn a_slot_handoff_is_passed_in_the_batch_with_nothing_sent() {
        let handoff = Record::Handoff(crate::record::SlotHandoff {
            slot: 7,
            to: 2,
            gen: 1,
        });
        let mut pending: VecDeque<Pending> = [
            write(5, 0, &[&["SET", "a", "1"]], false),
            Pending {
                mark: None,
                log_id: LogId(6),
                size: handoff.encode().len(),
                record: handoff.clone(),
            },
            write(7, 0, &[&["SET", "b", "1"]], false),
        ]
        .into();
        let batch = builder(10).build(&mut pending, 1, None).unwrap();
        assert_eq!((batch.first, batch.last), (LogId(5), LogId(7)));
        assert_eq!(shown(&batch)[..2], ["SET a 1", "SET b 1"]);
        assert!(pending.is_empty());
        // Alone, it still moves the checkpoint.
        let mut pending: VecDeque<Pending> = [Pending {
            mark: None,
            log_id: LogId(8),
            size: 1,
            record: handoff,
        }]
        .into();
        let batch = builder(10).build(&mut pending, 1, None).unwrap();
        assert_eq!(
            shown(&batch),
            ["SET __ferry:checkpoint:d:0 v2 applied=8 epoch=1 log=00000000000000ab"]
        );
    }

    fn tagged(log_id: u64, args: &[&str], slot: u16, gen: u64) -> Pending {
        let record = Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::from_parts(args)],
            transaction: false,
            streamed: vec![],
            tenure: Some(crate::record::SlotTenure { slot, gen }),
        });
        Pending {
            mark: None,
            log_id: LogId(log_id),
            size: record.encode().len(),
            record,
        }
    }

    fn handoff(log_id: u64, slot: u16, to: u32, gen: u64) -> Pending {
        let record = Record::Handoff(crate::record::SlotHandoff { slot, to, gen });
        Pending {
            mark: None,
            log_id: LogId(log_id),
            size: record.encode().len(),
            record,
        }
    }

    /// Partition 1's builder with the owner map `owners`.
    fn tenured(owners: &[(u16, u32, u64)]) -> BatchBuilder {
        let mut map = OwnerMap::default();
        for &(slot, partition, gen) in owners {
            map.raise(slot, Owner { partition, gen });
        }
        BatchBuilder {
            tenures: Some(Tenures {
                partition: 1,
                map_key: Bytes::from_static(b"__ferry:slots:d"),
                map,
                voids: VoidedTenures::new(),
            }),
            ..builder(10)
        }
    }

    fn void(log_id: u64, slot: u16, gen: u64) -> Pending {
        let record = Record::Void(crate::record::SlotVoid { slot, gen });
        Pending {
            mark: None,
            log_id: LogId(log_id),
            size: record.encode().len(),
            record,
        }
    }

    #[test]
    fn entries_of_a_voided_tenure_are_covered_never_sent_and_counted() {
        // Slot 7 is partition 0's; partition 1 received it in tenure 1, then
        // the import was aborted: a void of (7, 1) follows in its log.
        let mut builder = tenured(&[(7, 0, 0)]);
        let mut pending: VecDeque<Pending> = [
            write(1, 0, &[&["SET", "c", "1"]], false),
            tagged(2, &["RESTORE-ASKING", "k", "0", "x"], 7, 1),
            tagged(3, &["SET", "new", "1"], 7, 1),
            write(4, 0, &[&["SET", "d", "1"]], false),
            tagged(5, &["DEL", "k"], 7, 1),
            void(6, 7, 1),
            write(7, 0, &[&["SET", "e", "1"]], false),
            // A later import of the slot, after the void: held again.
            tagged(8, &["RESTORE-ASKING", "k", "0", "y"], 7, 2),
        ]
        .into();
        // Not known yet: held at entry 2 (the applier looks for the void).
        let batch = builder.build(&mut pending, 0, None).unwrap();
        assert_eq!(batch.last, LogId(1));
        assert_eq!(
            builder.tenure_wait(&pending).map(|w| w.log_id),
            Some(LogId(2))
        );
        if let Some(tenures) = &mut builder.tenures {
            tenures.voids.insert((7, 1), LogId(6));
        }
        assert_eq!(builder.tenure_wait(&pending), None);
        let batch = builder.build(&mut pending, 0, None).unwrap();
        assert_eq!(
            shown(&batch),
            [
                "SET d 1",
                "SET e 1",
                "SET __ferry:checkpoint:d:0 v2 applied=7 epoch=0 log=00000000000000ab"
            ]
        );
        assert_eq!(
            batch.voided,
            [
                (LogId(2), crate::record::SlotTenure { slot: 7, gen: 1 }),
                (LogId(3), crate::record::SlotTenure { slot: 7, gen: 1 }),
                (LogId(5), crate::record::SlotTenure { slot: 7, gen: 1 }),
            ]
        );
        assert_eq!(
            builder.tenure_wait(&pending).map(|w| (w.log_id, w.gen)),
            Some((LogId(8), 2))
        );
        // An entry of the voided tenure after the void record is not voided
        // by it, nor one the map would apply.
        let mut pending: VecDeque<Pending> = [tagged(9, &["SET", "x", "1"], 7, 1)].into();
        assert!(builder.build(&mut pending, 0, None).is_none());
        let mut builder = tenured(&[(7, 1, 1)]);
        if let Some(tenures) = &mut builder.tenures {
            tenures.voids.insert((7, 1), LogId(6));
        }
        let mut pending: VecDeque<Pending> = [tagged(2, &["SET", "x", "1"], 7, 1)].into();
        let batch = builder.build(&mut pending, 0, None).unwrap();
        assert_eq!(shown(&batch)[0], "SET x 1");
        assert!(batch.voided.is_empty());
    }

    #[test]
    fn a_voided_write_of_a_tenure_the_map_has_passed_is_voided_not_refused() {
        // The slot went on to partition 2 in generation 1 while partition
        // 1's import of it was aborted: blocked without the void, voided
        // with it.
        let mut builder = tenured(&[(7, 2, 1)]);
        let mut pending: VecDeque<Pending> =
            [tagged(1, &["INCR", "a"], 7, 1), void(2, 7, 1)].into();
        if let Some(tenures) = &mut builder.tenures {
            tenures.voids.insert((7, 1), LogId(2));
        }
        let batch = builder.build(&mut pending, 0, None).unwrap();
        assert!(batch.refused.is_none());
        assert_eq!(batch.voided.len(), 1);
        assert_eq!(batch.last, LogId(2));
    }

    #[test]
    fn a_write_of_a_tenure_the_map_has_passed_is_refused_not_applied() {
        // Slot 7 is partition 1's in generation 3; a write of its
        // generation 1 (a tenure the listener did not record) is held
        // BLOCKED, never applied after the later tenure's writes.
        let mut builder = tenured(&[(7, 1, 3)]);
        let mut pending: VecDeque<Pending> = [tagged(1, &["INCR", "a"], 7, 1)].into();
        let batch = builder.build(&mut pending, 0, None).unwrap();
        let refused = batch.refused.expect("refused");
        assert!(
            refused.error.contains("did not record"),
            "{}",
            refused.error
        );
        assert!(builder.tenure_wait(&pending).is_none());
    }

    #[test]
    fn tagged_writes_are_applied_or_held_by_the_owner_map() {
        let mut builder = tenured(&[(7, 1, 1), (8, 0, 2), (9, 0, 0)]);
        let mut pending: VecDeque<Pending> = [
            tagged(1, &["INCR", "a"], 7, 1),
            write(2, 0, &[&["SET", "c", "1"]], false),
            tagged(3, &["RESTORE-ASKING", "d", "0", "x"], 7, 1),
            tagged(4, &["INCR", "b"], 7, 1),
            tagged(5, &["INCR", "e"], 9, 1),
            tagged(6, &["INCR", "f"], 7, 1),
        ]
        .into();
        let batch = builder.build(&mut pending, 0, None).unwrap();
        // A tagged RESTORE-ASKING of a slot the partition owns is applied.
        assert_eq!(
            shown(&batch),
            [
                "INCR a",
                "SET c 1",
                "RESTORE-ASKING d 0 x",
                "INCR b",
                "SET __ferry:checkpoint:d:0 v2 applied=4 epoch=0 log=00000000000000ab"
            ]
        );
        // Slot 9 is partition 0's: entry 5 waits.
        assert!(builder.build(&mut pending, 0, None).is_none());
        assert_eq!(
            builder.tenure_wait(&pending),
            Some(TenureWait {
                log_id: LogId(5),
                slot: 9,
                gen: 1,
                current: Some(Owner {
                    partition: 0,
                    gen: 0
                })
            })
        );
        assert_eq!(pending.len(), 2);
        // Partition 0's handoff reaches the map.
        if let Some(tenures) = &mut builder.tenures {
            tenures.map.raise(
                9,
                Owner {
                    partition: 1,
                    gen: 1,
                },
            );
        }
        assert_eq!(builder.tenure_wait(&pending), None);
        let batch = builder.build(&mut pending, 0, None).unwrap();
        assert_eq!(shown(&batch)[..2], ["INCR e", "INCR f"]);
        // Slot 8 is partition 0's at a later generation: held too.
        let mut pending: VecDeque<Pending> = [tagged(7, &["INCR", "g"], 8, 3)].into();
        assert!(builder.build(&mut pending, 0, None).is_none());
        assert_eq!(builder.tenure_wait(&pending).map(|w| w.slot), Some(8));
    }

    #[test]
    fn an_untagged_restore_asking_holds_and_tags_are_ignored_without_tenures() {
        for mut builder in [tenured(&[]), builder(10)] {
            let mut pending: VecDeque<Pending> =
                [write(1, 0, &[&["RESTORE-ASKING", "d", "0", "x"]], false)].into();
            let refused = builder.build(&mut pending, 0, None).unwrap();
            assert_eq!(refused.refused.expect("held").command, "RESTORE-ASKING");
        }
        // Without tenures (a cluster target) a tag changes nothing, and a
        // tagged RESTORE-ASKING still holds.
        let mut pending: VecDeque<Pending> = [
            tagged(1, &["INCR", "a"], 7, 5),
            tagged(2, &["RESTORE-ASKING", "d", "0", "x"], 7, 5),
        ]
        .into();
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(shown(&batch)[0], "INCR a");
        let refused = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(refused.refused.expect("held").command, "RESTORE-ASKING");
    }

    #[test]
    fn a_handoff_raises_the_map_in_the_batch() {
        let mut builder = tenured(&[(7, 0, 0)]);
        let mut pending: VecDeque<Pending> = [
            write(1, 3, &[&["SET", "a", "1"]], false),
            handoff(2, 7, 1, 1),
            // Its own tenure, opened by the handoff just batched.
            tagged(3, &["INCR", "b"], 7, 1),
        ]
        .into();
        let batch = builder.build(&mut pending, 0, None).unwrap();
        let shown = shown(&batch);
        assert_eq!(shown[..2], ["SELECT 3", "SET a 1"]);
        assert_eq!(shown[2], "SELECT 0");
        assert!(shown[3].starts_with("EVAL "), "{}", shown[3]);
        assert!(
            shown[3].ends_with(" 1 __ferry:slots:d 7 1 1"),
            "{}",
            shown[3]
        );
        assert_eq!(shown[4], "INCR b");
        assert_eq!(batch.slots[3], Slot::Internal);
        assert_eq!(batch.last, LogId(3));
    }

    #[test]
    fn a_flush_of_a_scoped_partition_goes_alone_as_a_scope_deletion() {
        let mut scoped = BatchBuilder {
            keyspace: OwnedKeyspace::dbs([0, 1]),
            scope: Some(SlotRanges::from_ranges([(0, 8191)])),
            ..builder(10)
        };
        let mut pending: VecDeque<Pending> = [
            write(5, 0, &[&["SET", "a", "1"]], false),
            write(6, 0, &[&["FLUSHALL"]], false),
            write(
                7,
                0,
                &[&["SET", "x", "1"], &["FLUSHDB"], &["SET", "z", "1"]],
                true,
            ),
            write(8, 0, &[&["SET", "b", "1"]], false),
        ]
        .into();
        let first = scoped.build(&mut pending, 1, None).unwrap();
        assert_eq!((first.first, first.last), (LogId(5), LogId(5)));
        assert!(first.scope_delete.is_empty());
        // While the batch before it executes, the flush is not built.
        assert!(scoped.scoped_flush_next(&pending));
        assert!(!builder(10).scoped_flush_next(&pending));
        let flush = scoped.build(&mut pending, 1, None).unwrap();
        assert_eq!((flush.first, flush.last), (LogId(6), LogId(6)));
        assert_eq!(flush.scope_delete, [0, 1]);
        assert_eq!(
            shown(&flush),
            ["SET __ferry:checkpoint:d:0 v2 applied=6 epoch=1 log=00000000000000ab"]
        );
        // What the flush erases is dropped; what follows it is applied.
        let mixed = scoped.build(&mut pending, 1, None).unwrap();
        assert_eq!((mixed.first, mixed.last), (LogId(7), LogId(7)));
        assert_eq!(mixed.scope_delete, [0]);
        assert_eq!(shown(&mixed)[0], "SET z 1");
        assert_eq!(mixed.commands.len(), 2);
        let last = scoped.build(&mut pending, 1, None).unwrap();
        assert_eq!(shown(&last)[0], "SET b 1");
        assert!(last.scope_delete.is_empty());

        // A write in another db before a FLUSHDB, or a keyless command
        // before the flush, cannot be ordered around the deletion.
        for refused in [
            write(
                9,
                0,
                &[
                    &["SELECT", "1"],
                    &["SET", "y", "1"],
                    &["SELECT", "0"],
                    &["FLUSHDB"],
                ],
                true,
            ),
            write(9, 0, &[&["FUNCTION", "LOAD", "code"], &["FLUSHALL"]], true),
        ] {
            let mut pending: VecDeque<Pending> = [refused].into();
            let batch = scoped.build(&mut pending, 1, None).unwrap();
            let why = batch.refused.expect("refused").error;
            assert!(why.contains("slot scope"), "{why}");
            assert!(batch.scope_delete.is_empty());
        }
        // Without a scope a flush is a flush, batched like any entry.
        let mut pending: VecDeque<Pending> = [
            write(5, 0, &[&["SET", "a", "1"]], false),
            write(6, 0, &[&["FLUSHDB"]], false),
        ]
        .into();
        let plain = builder(10).build(&mut pending, 1, None).unwrap();
        assert_eq!(plain.last, LogId(6));
        assert!(plain.scope_delete.is_empty());
    }

    #[test]
    fn the_echo_rule_knows_the_other_directions_checkpoint_keys() {
        let standalone = EchoRule::new("d", 1..=1);
        assert!(standalone.matches(b"__ferry:checkpoint:d:1"));
        assert!(!standalone.matches(b"__ferry:checkpoint:d:0"));
        assert!(!standalone.matches(b"__ferry:checkpoint:d:11"));
        assert!(!standalone.matches(b"__ferry:checkpoint:dd:1"));
        let backward = EchoRule::new("d", 1000..=u32::MAX);
        assert_eq!(
            backward.partition_of(b"__ferry:checkpoint:d:1002:{ferry:17}"),
            Some(1002)
        );
        assert!(backward.matches(b"__ferry:checkpoint:d:1000"));
        assert!(!backward.matches(b"__ferry:checkpoint:d:2:{ferry:17}"));
        assert!(!backward.matches(b"__ferry:checkpoint:d:1000x"));
        assert!(!backward.matches(b"__ferry:checkpoint:d:"));
        assert!(!backward.matches(b"__ferry:checkpoint:d:99999999999"));
        let forward = EchoRule::new("d", 0..=999);
        assert!(forward.matches(b"__ferry:checkpoint:d:2:{ferry:17}"));
        assert!(!forward.matches(b"__ferry:heartbeat:d:2"));
    }

    #[test]
    fn two_way_echoes_are_covered_whole_and_flushes_refused() {
        let peer = "__ferry:checkpoint:d:1";
        let mut two_way = BatchBuilder {
            echo_of: Some(EchoRule::new("d", 1..=1)),
            ..builder(10)
        };
        let echoed = &[
            &["INCR", "a"][..],
            &["LPUSH", "l", "from-the-other-side"],
            &["SET", peer, "v2 applied=9 epoch=0 log=00000000000000aa"],
        ];
        let mut pending: VecDeque<Pending> = [
            write(5, 0, &[&["INCR", "a"]], false),
            write(6, 0, echoed, true),
            // The peer's checkpoint alone (its batch's data changed nothing).
            write(
                7,
                0,
                &[&["SET", peer, "v2 applied=10 epoch=0 log=00000000000000aa"]],
                false,
            ),
            write(8, 2, &[&["HINCRBY", "h", "f", "2"]], false),
            write(9, 0, &[&["FLUSHDB"]], false),
            write(10, 0, &[&["INCR", "a"]], false),
        ]
        .into();
        let batch = two_way.build(&mut pending, 0, None).unwrap();
        assert_eq!((batch.first, batch.last), (LogId(5), LogId(8)));
        assert_eq!(batch.echoes, 2);
        assert_eq!(
            shown(&batch),
            [
                "INCR a",
                "SELECT 2",
                "HINCRBY h f 2",
                "SELECT 0",
                "SET __ferry:checkpoint:d:0 v2 applied=8 epoch=0 log=00000000000000ab",
            ]
        );
        let refused = two_way.build(&mut pending, 0, None).unwrap();
        let why = refused.refused.expect("FLUSHDB refused");
        assert_eq!((why.log_id, why.command.as_str()), (LogId(9), "FLUSHDB"));
        assert!(why.error.contains("two-way sync refuses"), "{}", why.error);
        // One-way, the same entries are applied as they are.
        let mut pending: VecDeque<Pending> = [write(6, 0, echoed, true)].into();
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(batch.echoes, 0);
        assert_eq!(
            shown(&batch)[..2],
            ["INCR a", "LPUSH l from-the-other-side"]
        );
    }

    #[test]
    fn selects_dbs_skips_internal_keys_and_ends_in_db_0() {
        let mut pending: VecDeque<Pending> = [
            write(5, 0, &[&["SET", "a", "1"]], false),
            write(6, 3, &[&["SET", "__ferry:heartbeat:l", "9"]], false),
            write(
                7,
                3,
                &[&["INCR", "c"], &["SELECT", "4"], &["LPUSH", "l", "x"]],
                true,
            ),
            write(8, 4, &[&["DEL", "l"]], false),
        ]
        .into();
        let batch = builder(10).build(&mut pending, 2, None).unwrap();
        assert!(pending.is_empty());
        assert_eq!((batch.first, batch.last), (LogId(5), LogId(8)));
        assert_eq!(
            shown(&batch),
            [
                "SET a 1",
                "SELECT 3",
                "INCR c",
                "SELECT 4",
                "LPUSH l x",
                "DEL l",
                "SELECT 0",
                "SET __ferry:checkpoint:d:0 v2 applied=8 epoch=2 log=00000000000000ab",
            ]
        );
        assert_eq!(batch.skipped, 1);
        assert_eq!(batch.slots[1], Slot::Internal);
        // The source's SELECT is consumed; the applier selects db 4 itself.
        assert_eq!(batch.slots[3], Slot::Internal);
        assert_eq!(batch.slots[4], Slot::Data { log_id: LogId(7) });
    }

    #[test]
    fn stops_at_limits_and_snapshot_markers() {
        let marker = Pending {
            mark: None,
            log_id: LogId(3),
            size: 10,
            record: Record::Snapshot(SnapshotMarker {
                epoch: 1,
                ..SnapshotMarker::default()
            }),
        };
        let mut pending: VecDeque<Pending> = [
            write(1, 0, &[&["SET", "a", "1"]], false),
            write(2, 0, &[&["SET", "b", "1"]], false),
            marker,
            write(4, 0, &[&["SET", "c", "1"]], false),
        ]
        .into();
        let one = builder(1).build(&mut pending, 0, None).unwrap();
        assert_eq!((one.first, one.last), (LogId(1), LogId(1)));
        let two = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!((two.first, two.last), (LogId(2), LogId(2)));
        assert!(builder(10).build(&mut pending, 0, None).is_none());
        assert_eq!(pending.len(), 2);
    }

    #[test]
    fn entries_the_applier_refuses_go_alone_and_are_not_sent() {
        let mut pending: VecDeque<Pending> = [
            write(1, 2, &[&["SET", "ok", "1"]], false),
            write(2, 16, &[&["SET", "a", "1"]], false),
            write(3, 0, &[&["SELECT", "20"], &["SET", "b", "1"]], true),
            write(
                4,
                0,
                &[&["DEL", "x", "__ferry:checkpoint:other:0", "y"]],
                false,
            ),
            write(
                5,
                0,
                &[&["RENAME", "x", "__ferry:checkpoint:other:0"]],
                false,
            ),
            write(6, 2, &[&["SET", "c", "1"]], false),
        ]
        .into();
        // A key moved in by a resharding of a cluster source is held.
        let mut moved: VecDeque<Pending> = [write(
            9,
            0,
            &[&["RESTORE-ASKING", "k", "0", "payload"]],
            false,
        )]
        .into();
        let batch = builder(10).build(&mut moved, 0, None).unwrap();
        let held = batch.refused.clone().expect("refused");
        assert_eq!(held.command, "RESTORE-ASKING");
        assert!(held.error.contains("resharding"), "{}", held.error);
        // The batch ends before the first refused entry...
        let first = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(
            (first.first, first.last, first.refused.clone()),
            (LogId(1), LogId(1), None)
        );
        // ...which is a batch of its own, refused, with nothing to send.
        let refused = |pending: &mut VecDeque<Pending>| {
            let batch = builder(10).build(pending, 0, None).unwrap();
            assert_eq!(batch.first, batch.last);
            let refused = batch.refused.clone().expect("refused");
            assert_eq!(refused.log_id, batch.last);
            refused
        };
        let out_of_range = refused(&mut pending);
        assert_eq!(out_of_range.command, "SET");
        assert!(out_of_range.error.contains("db 16 is out of range"));
        let selected = refused(&mut pending);
        assert!(selected.error.contains("db 20 is out of range"));
        // A DEL naming ferry's keys among others goes without them...
        let del = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(del.refused, None);
        assert_eq!(shown(&del)[0], "DEL x y");
        // ...any other command naming them is refused.
        let rename = refused(&mut pending);
        assert_eq!(rename.command, "RENAME");
        assert!(
            rename.error.contains("ferry's own keys"),
            "{}",
            rename.error
        );
        let last = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(
            shown(&last),
            [
                "SELECT 2",
                "SET c 1",
                "SELECT 0",
                "SET __ferry:checkpoint:d:0 v2 applied=6 epoch=0 log=00000000000000ab"
            ]
        );
        // Held and skipped: recorded as the source sent it, the SELECT
        // placing the command.
        let mut pending: VecDeque<Pending> =
            [write(3, 0, &[&["SELECT", "20"], &["SET", "b", "1"]], true)].into();
        let hold = Hold {
            log_id: LogId(3),
            skip: Some(SkippedBy::Operator),
            refused: selected.clone(),
        };
        let skipped = builder(10).build(&mut pending, 0, Some(&hold)).unwrap();
        assert_eq!(skipped.refused, None);
        let skip = skipped.skip.clone().expect("skip");
        assert_eq!(skip.commands.len(), 1);
        assert_eq!(skip.commands[0].0, 20);
        assert_eq!(
            shown(&skipped),
            ["SET __ferry:checkpoint:d:0 v2 applied=3 epoch=0 log=00000000000000ab"]
        );
    }

    #[test]
    fn a_held_entry_goes_alone_or_is_skipped() {
        let mut pending: VecDeque<Pending> = (1..=5)
            .map(|id| write(id, 0, &[&["INCR", "c"]], false))
            .collect();
        let refused = RefusedCommand {
            log_id: LogId(3),
            command: "INCR".into(),
            error: "OOM command not allowed".into(),
        };
        let mut hold = Hold {
            log_id: LogId(3),
            skip: None,
            refused,
        };
        let build = |pending: &mut VecDeque<Pending>, hold: &Hold| {
            builder(10).build(pending, 0, Some(hold)).expect("a batch")
        };
        let before = build(&mut pending, &hold);
        assert_eq!((before.first, before.last), (LogId(1), LogId(2)));
        let alone = build(&mut pending, &hold);
        assert_eq!((alone.first, alone.last), (LogId(3), LogId(3)));
        assert_eq!(shown(&alone)[0], "INCR c");
        assert!(alone.skip.is_none());
        let after = build(&mut pending, &hold);
        assert_eq!((after.first, after.last), (LogId(4), LogId(5)));
        // Skipped: a transaction of its own holding only the checkpoint,
        // and the commands as they would have been sent, each in its db.
        let mut pending: VecDeque<Pending> = [
            write(
                3,
                5,
                &[&["INCR", "c"], &["SELECT", "6"], &["DEL", "d"]],
                true,
            ),
            write(4, 0, &[&["INCR", "c"]], false),
        ]
        .into();
        hold.skip = Some(SkippedBy::OnRefused);
        let skip = build(&mut pending, &hold);
        assert_eq!(
            shown(&skip),
            ["SET __ferry:checkpoint:d:0 v2 applied=3 epoch=0 log=00000000000000ab"]
        );
        let skipped = skip.skip.expect("skip");
        assert!(skipped.transaction && skipped.db == 5);
        let placed: Vec<(u32, String)> = skipped
            .commands
            .iter()
            .map(|(db, cmd)| (*db, command_name(cmd)))
            .collect();
        assert_eq!(placed, [(5, "INCR".to_string()), (6, "DEL".to_string())]);
        assert_eq!(skipped.by, SkippedBy::OnRefused);
        assert_eq!(pending.len(), 1);
    }

    #[test]
    fn transient_refusals_are_the_targets_state() {
        for error in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "READONLY You can't write against a read only replica.",
            "LOADING Redis is loading the dataset in memory",
            "MISCONF Redis is configured to save RDB snapshots",
        ] {
            assert!(refusal_is_transient(error), "{error}");
        }
        for error in [
            "ERR unknown command 'LPUSH', with args beginning with: ",
            "ERR wrong number of arguments for 'set' command",
            "NOPERM this user has no permissions to run the 'flushall' command",
            "OOMPH",
        ] {
            assert!(!refusal_is_transient(error), "{error}");
        }
    }

    #[test]
    fn reads_commits_refusals_and_aborts() {
        let mut pending: VecDeque<Pending> = [
            write(1, 1, &[&["SET", "k", "v"]], false),
            write(2, 1, &[&["LPUSH", "k", "x"]], false),
        ]
        .into();
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(batch.reply_count(), 7);
        let ok = || Frame::Simple(Bytes::from_static(b"OK"));
        let queued = || Frame::Simple(Bytes::from_static(b"QUEUED"));
        let wrongtype = Frame::Error(Bytes::from_static(b"WRONGTYPE Operation"));
        let mut replies = vec![ok(), queued(), queued(), queued(), queued(), queued()];
        replies.push(Frame::Array(vec![
            ok(),
            ok(),
            wrongtype.clone(),
            ok(),
            ok(),
        ]));
        match batch.outcome(&replies).unwrap() {
            BatchOutcome::Committed { applied, refused } => {
                assert_eq!(applied, 1);
                assert_eq!(refused.len(), 1);
                assert_eq!(refused[0].log_id, LogId(2));
                assert_eq!(refused[0].command, "LPUSH");
            }
            other => panic!("{other:?}"),
        }
        replies[3] = Frame::Error(Bytes::from_static(b"ERR wrong number of arguments"));
        replies[6] = Frame::Error(Bytes::from_static(b"EXECABORT Transaction discarded"));
        match batch.outcome(&replies).unwrap() {
            BatchOutcome::Aborted { error, refused } => {
                assert!(error.starts_with("EXECABORT"), "{error}");
                assert!(error.contains("entry 2: LPUSH refused"), "{error}");
                let refused = refused.expect("the refused entry");
                assert_eq!(
                    (refused.log_id, refused.command.as_str()),
                    (LogId(2), "LPUSH")
                );
                assert!(refused.error.starts_with("ERR wrong number"), "{refused:?}");
            }
            other => panic!("{other:?}"),
        }
        replies[6] = Frame::Array(vec![ok(), ok(), ok(), ok(), wrongtype]);
        assert!(matches!(
            batch.outcome(&replies),
            Err(ReplyError::InternalRefused { .. })
        ));
        replies[6] = Frame::Null;
        assert!(matches!(
            batch.outcome(&replies),
            Err(ReplyError::Unexpected { .. })
        ));
        assert!(batch.outcome(&replies[1..]).is_err());
    }

    fn fragment(log_id: u64, seq: u32) -> Pending {
        Pending {
            mark: None,
            log_id: LogId(log_id),
            size: 0,
            record: Record::Fragment(crate::record::Fragment {
                seq,
                data: Bytes::new(),
            }),
        }
    }

    /// A write of `SET <key> <streamed>` whose value is in `fragments`
    /// fragments right before it.
    fn big_write(log_id: u64, key: &str, len: u64, fragments: u32) -> Pending {
        let record = Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::from_parts(["SET", key, ""])],
            transaction: false,
            streamed: vec![crate::record::StreamedArg {
                command: 0,
                arg: 2,
                len,
                fragments,
            }],
            tenure: None,
        });
        Pending {
            mark: None,
            log_id: LogId(log_id),
            size: record.encode().len() + len as usize,
            record,
        }
    }

    #[test]
    fn a_fragment_run_and_its_write_are_one_unit() {
        let place = |command, first, fragments, first_seq| StreamedPlace {
            command,
            arg: 2,
            len: 100,
            first: LogId(first),
            fragments,
            first_seq,
        };
        // A write, a run of two, its write.
        let mut pending: VecDeque<Pending> = [
            write(1, 3, &[&["SET", "a", "1"]], false),
            fragment(2, 0),
            fragment(3, 1),
            big_write(4, "big", 100, 2),
        ]
        .into();
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!((batch.first, batch.last), (LogId(1), LogId(4)));
        assert_eq!(
            shown(&batch)[..4],
            ["SELECT 3", "SET a 1", "SELECT 0", "SET big "]
        );
        assert_eq!(batch.streams, [place(3, 2, 2, 0)]);

        // The write is not there yet: the batch ends before the run, which
        // waits whole.
        let mut pending: VecDeque<Pending> = [
            write(1, 0, &[&["SET", "a", "1"]], false),
            fragment(2, 0),
            fragment(3, 1),
        ]
        .into();
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(batch.last, LogId(1));
        assert!(builder(10).build(&mut pending, 0, None).is_none());
        assert_eq!(pending.len(), 2);
        pending.push_back(big_write(4, "big", 100, 2));
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!((batch.first, batch.last), (LogId(2), LogId(4)));
        assert_eq!(batch.streams, [place(0, 2, 2, 0)]);

        // An orphan run (a crash mid-entry) before the run received again:
        // covered, never streamed.
        let mut pending: VecDeque<Pending> = [
            fragment(5, 0),
            fragment(6, 1),
            fragment(7, 0),
            big_write(8, "big", 100, 1),
        ]
        .into();
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!((batch.first, batch.last), (LogId(5), LogId(8)));
        assert_eq!(batch.streams, [place(0, 7, 1, 0)]);

        // An orphan run right before a snapshot marker: a batch of its own.
        let marker = Pending {
            mark: None,
            log_id: LogId(11),
            size: 10,
            record: Record::Snapshot(SnapshotMarker {
                epoch: 1,
                ..SnapshotMarker::default()
            }),
        };
        let mut pending: VecDeque<Pending> = [fragment(9, 0), fragment(10, 1), marker].into();
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!((batch.first, batch.last), (LogId(9), LogId(10)));
        assert_eq!(
            shown(&batch),
            ["SET __ferry:checkpoint:d:0 v2 applied=10 epoch=0 log=00000000000000ab"]
        );
        assert!(builder(10).build(&mut pending, 0, None).is_none());

        // Its streamed bytes count against the batch limit: a big write
        // after a small one starts the next batch, with its run.
        let mut pending: VecDeque<Pending> = [
            write(1, 0, &[&["SET", "a", "1"]], false),
            fragment(2, 0),
            big_write(3, "big", 10 << 20, 1),
            write(4, 0, &[&["SET", "b", "1"]], false),
        ]
        .into();
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(batch.last, LogId(1));
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!((batch.first, batch.last), (LogId(2), LogId(3)));
        let batch = builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!((batch.first, batch.last), (LogId(4), LogId(4)));
    }

    #[test]
    fn a_held_big_write_keeps_its_run_and_is_skipped_with_its_places() {
        let hold = Hold {
            log_id: LogId(4),
            skip: Some(SkippedBy::Operator),
            refused: RefusedCommand {
                log_id: LogId(4),
                command: "SET".into(),
                error: "ERR no".into(),
            },
        };
        let mut pending: VecDeque<Pending> = [
            write(1, 0, &[&["SET", "a", "1"]], false),
            fragment(2, 0),
            fragment(3, 1),
            big_write(4, "big", 100, 2),
        ]
        .into();
        assert_eq!(next_unit(&pending), Some(LogId(1)));
        // The batch before the held write ends before its run...
        let batch = builder(10).build(&mut pending, 0, Some(&hold)).unwrap();
        assert_eq!(batch.last, LogId(1));
        assert_eq!(next_unit(&pending), Some(LogId(4)));
        // ...which goes with it, skipped: only the checkpoint is sent, and
        // the skip names where the value's bytes are.
        let batch = builder(10).build(&mut pending, 0, Some(&hold)).unwrap();
        assert_eq!((batch.first, batch.last), (LogId(2), LogId(4)));
        assert!(batch.streams.is_empty());
        let skip = batch.skip.expect("a skip");
        assert_eq!(skip.log_id, LogId(4));
        assert_eq!(
            skip.streams,
            [StreamedPlace {
                command: 0,
                arg: 2,
                len: 100,
                first: LogId(2),
                fragments: 2,
                first_seq: 0,
            }]
        );
    }

    #[test]
    fn streamed_arguments_follow_their_command_through_the_keyspace() {
        // A transaction: a streamed SET in db 1 (not owned: left out), a
        // SELECT, then a streamed SET with a TTL in db 2 (owned).
        let write = Record::Write(WriteRecord {
            db: 1,
            commands: vec![
                Command::from_parts(["SET", "x", ""]),
                Command::from_parts(["SELECT", "2"]),
                Command::from_parts(["SET", "y", "", "PXAT", "1000"]),
            ],
            transaction: true,
            streamed: vec![
                crate::record::StreamedArg {
                    command: 0,
                    arg: 2,
                    len: 10,
                    fragments: 2,
                },
                crate::record::StreamedArg {
                    command: 2,
                    arg: 2,
                    len: 5,
                    fragments: 1,
                },
            ],
            tenure: None,
        });
        let mut pending: VecDeque<Pending> = [
            fragment(1, 0),
            fragment(2, 1),
            fragment(3, 2),
            Pending {
                mark: None,
                log_id: LogId(4),
                size: 100,
                record: write,
            },
        ]
        .into();
        let mut builder = builder(10);
        builder.keyspace = OwnedKeyspace::dbs([0, 2]);
        builder.expire_grace = ExpireGrace::new(std::time::Duration::from_secs(1));
        let batch = builder.build(&mut pending, 0, None).unwrap();
        assert_eq!(
            shown(&batch)[..3],
            ["SELECT 2", "SET y  PXAT 2000", "SELECT 0"]
        );
        assert_eq!(batch.skipped, 1);
        // The kept command's argument is the run's third fragment (seq 2).
        assert_eq!(
            batch.streams,
            [StreamedPlace {
                command: 1,
                arg: 2,
                len: 5,
                first: LogId(3),
                fragments: 1,
                first_seq: 2,
            }]
        );
    }

    fn key_filtered(include: &[&str]) -> OwnedKeyspace {
        crate::apply::FilterConfig {
            key_prefix: Some(include.iter().map(|p| p.to_string()).collect()),
            ..crate::apply::FilterConfig::default()
        }
        .keyspace()
        .unwrap()
    }

    #[test]
    fn keys_outside_the_key_filter_are_left_out_or_refused() {
        let mut pending: VecDeque<Pending> = [
            write(
                1,
                0,
                &[&["SET", "app:a", "1"], &["SET", "other", "1"]],
                true,
            ),
            write(2, 0, &[&["DEL", "app:a", "other", "app:b"]], false),
            write(3, 0, &[&["MSET", "other", "1", "app:c", "2"]], false),
            write(4, 0, &[&["RENAME", "app:c", "other"]], false),
            write(5, 0, &[&["COPY", "app:a", "other"]], false),
            write(6, 0, &[&["PUBLISH", "channel", "m"]], false),
            write(7, 0, &[&["SUNIONSTORE", "app:d", "other"]], false),
            write(8, 0, &[&["EVAL", "return 1", "1", "app:a"]], false),
            write(9, 0, &[&["INCR", "app:n"]], false),
        ]
        .into();
        let mut builder = builder(10);
        builder.keyspace = key_filtered(&["app:"]);
        let batch = builder.build(&mut pending, 0, None).unwrap();
        assert_eq!(
            shown(&batch),
            [
                "SET app:a 1",
                "DEL app:a app:b",
                "MSET app:c 2",
                "DEL app:c",
                "PUBLISH channel m",
                "SET __ferry:checkpoint:d:0 v2 applied=6 epoch=0 log=00000000000000ab",
            ]
        );
        // SET other, COPY out of the owned keys.
        assert_eq!(batch.skipped, 2);
        // A mixed command whose keys do not stand alone, then a script:
        // each refused alone, nothing of it sent.
        for name in ["SUNIONSTORE", "EVAL"] {
            let refused = builder.build(&mut pending, 0, None).unwrap();
            let why = refused.refused.clone().expect("refused");
            assert_eq!(why.command, name);
            assert_eq!(refused.first, refused.last);
        }
        let last = builder.build(&mut pending, 0, None).unwrap();
        assert_eq!(shown(&last)[0], "INCR app:n");
        // Without a key filter the same entries all go (scripts too).
        let mut pending: VecDeque<Pending> = [
            write(7, 0, &[&["SUNIONSTORE", "app:d", "other"]], false),
            write(8, 0, &[&["EVAL", "return 1", "1", "app:a"]], false),
        ]
        .into();
        let batch = self::builder(10).build(&mut pending, 0, None).unwrap();
        assert_eq!(batch.refused, None);
        assert_eq!(batch.last, LogId(8));
    }

    #[test]
    fn a_mixed_command_with_streamed_arguments_is_refused() {
        let record = Record::Write(WriteRecord {
            db: 0,
            commands: vec![Command::from_parts(["MSET", "other", "", "app:b", "x"])],
            transaction: false,
            streamed: vec![crate::record::StreamedArg {
                command: 0,
                arg: 2,
                len: 10,
                fragments: 1,
            }],
            tenure: None,
        });
        let mut pending: VecDeque<Pending> = [
            fragment(1, 0),
            Pending {
                mark: None,
                log_id: LogId(2),
                size: 100,
                record,
            },
        ]
        .into();
        let mut builder = builder(10);
        builder.keyspace = key_filtered(&["app:"]);
        let batch = builder.build(&mut pending, 0, None).unwrap();
        let refused = batch.refused.expect("refused");
        assert_eq!(refused.command, "MSET");
        assert!(refused.error.contains("streamed"), "{}", refused.error);
        assert!(!batch.slots.iter().any(|s| matches!(s, Slot::Data { .. })));
    }

    #[test]
    fn entries_follow_the_db_map() {
        let mut pending: VecDeque<Pending> = [
            write(1, 0, &[&["SET", "a", "1"]], false),
            write(2, 1, &[&["SET", "b", "1"]], false),
            write(
                3,
                5,
                &[&["INCR", "c"], &["SELECT", "0"], &["DEL", "a"]],
                true,
            ),
            write(4, 7, &[&["SET", "d", "1"]], false),
        ]
        .into();
        let mut builder = builder(10);
        builder.keyspace = OwnedKeyspace::mapped([(0, 3), (5, 6), (7, 40)]).unwrap();
        let batch = builder.build(&mut pending, 0, None).unwrap();
        assert_eq!(
            shown(&batch),
            [
                "SELECT 3",
                "SET a 1",
                "SELECT 6",
                "INCR c",
                "SELECT 3",
                "DEL a",
                "SELECT 0",
                "SET __ferry:checkpoint:d:0 v2 applied=3 epoch=0 log=00000000000000ab",
            ]
        );
        assert_eq!(batch.skipped, 1, "db 1 is not replicated");
        // Source db 7 maps to a db the target does not have: refused, and
        // recorded (when skipped) in the db it maps to.
        let refused = builder.build(&mut pending, 0, None).unwrap();
        let why = refused.refused.clone().expect("refused");
        assert!(why.error.contains("db 40 is out of range"), "{}", why.error);
        let mut pending: VecDeque<Pending> = [write(4, 7, &[&["SET", "d", "1"]], false)].into();
        let hold = Hold {
            log_id: LogId(4),
            skip: Some(SkippedBy::Operator),
            refused: why,
        };
        let skipped = builder.build(&mut pending, 0, Some(&hold)).unwrap();
        assert_eq!(skipped.skip.expect("skip").commands[0].0, 40);
    }
}
