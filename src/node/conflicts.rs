//! Two-way sync conflicts (issue 11, item 2): the same key written on both
//! sides before either saw the other's write.
//!
//! In: partitions 0 (the source A's stream) and 1 (the target B's stream)
//! of a two-way sync's WAL (`super::two_way`), or with a cluster on either
//! side every partition of both directions. Out: every conflict
//! appended to `<data-dir>/conflicts.jsonl` (one JSON object per line) and
//! counted in `ferry status`; the state that lets a restart go on where
//! it stopped, `<data-dir>/conflicts.state`; under a winner policy, the
//! repairs that make both sides converge ("Policies").
//!
//! # What the logs tell
//!
//! Each side's log holds that side's own writes and its echoes (the other
//! direction's batches, each carrying that applier's checkpoint
//! `applied=N`: the side had applied the other log up to N). So a write of
//! A at id `x` of partition 0 was made having seen B's writes up to
//! `seen(x)`, the `applied` of the last echo before `x` in partition 0 (and
//! the same for B's writes at `y` in partition 1). Writes `x` and `y` of
//! one key (db and name) conflict when neither saw the other:
//! `y > seen(x)` and `x > seen(y)`.
//!
//! # Finding them
//!
//! The detector reads both logs in order, each at its own pace. It keeps,
//! per side, the writes the other side may not have seen yet (a window,
//! indexed by key): a write `x` of A leaves A's window once an echo in B's
//! log says B applied `x`, because every later write of B has seen it.
//! Only keys the sync owns count (its `[filter]`): a key outside it is
//! neither carried nor, under a winner policy, ever written by a repair.
//! Reading a write checks the other side's window for its keys. A pair is
//! found when the later of its two writes is read, whichever side goes
//! first, and only then. A window holds the writes within the replication
//! lag; past [`WINDOW_CAP`] writes per side the oldest go (counted as
//! `unexamined`, like entries the WAL trimmed before the detector read
//! them).
//!
//! # Policies
//!
//! - `report`: both writes are applied as they come, so a key written
//!   with two different values may end different on the two sides (`ferry
//!   verify` lists it).
//! - `source-wins`: the source's write `x` left its value where it was
//!   applied last, on the target (the target's own write `y` came first
//!   there). Once the target's checkpoint of partition 0 is at `x` or past
//!   it, the key is written again on the target as it is there
//!   ([`TOUCH`]: `RESTORE … REPLACE` of its own `DUMP`, or a `SET` and
//!   `DEL` for a key that is not there). The target's stream carries that
//!   write to the source after `y`, so both sides end with what `x` left.
//!   The write is an ordinary one of the target: if someone writes the key
//!   on the source meanwhile, that is a new conflict, handled the same way.
//! - `target-wins`: the same with the sides swapped (the source's
//!   checkpoint of partition 1 at `y`, the key written again on the
//!   source).
//!
//! A key owes at most one repair per side and winner's partition: a
//! later conflict of it only moves that repair's wait to the later
//! winner's write, since the key written again then holds what every
//! earlier winner's write left, overwritten (a repair done at an earlier
//! wait would be undone by the later write, and done again after it). So
//! `repaired` in `ferry status` counts keys written again, at most one per
//! conflict, and a hot key written on both sides at once is written again
//! once per round of repairs, not once per pair. Owed repairs are in the
//! saved state; one done twice after a crash writes the same value again.
//!
//! # Two clusters
//!
//! Between clusters (`super::two_way`, "Two clusters") each side has a log
//! per master. A key lives in one slot, so its writes on A are in the log
//! of the A-master serving it and its writes on B in the log of the
//! B-master serving it; the echoes that tell what a side has applied are
//! the pieces of that slot, in the same log as the key's writes (each
//! writes the slot checkpoint of its partition `q`, `applied=N`: the side
//! has applied `q`'s log up to `N` in that slot). So `seen` is kept per
//! (other side's partition, slot), and a write `x` of partition `p` and
//! `y` of partition `q` of one key conflict when `y > seen_q(x)` and
//! `x > seen_p(y)` in the key's slot. Floors are not used: written on one
//! master, they say nothing of where another shard's log was. Between
//! standalone servers there is one slot (0) and one partition per side.
//!
//! # A standalone server and a cluster
//!
//! With one standalone side and one cluster side, the two sides' echoes
//! are of two kinds. The cluster side's are slot checkpoints, as between
//! clusters: what it has seen is per (partition, slot), floors ignored.
//! The standalone side applies each of the cluster's partitions with one
//! checkpoint on its one server, and every echo of it is in its one log:
//! `applied=N` there says it has applied that partition through `N` in
//! every slot, so what it has seen is per partition (kept under slot 0).
//! A write's `seen` is read by its own side's rule, and it waits in its
//! side's window by the other side's rule (the other side's echoes make it
//! leave): the slot of the key when the other side is a cluster, slot 0
//! when it is standalone.
//!
//! A winner policy's repair waits for the touched side's checkpoint of the
//! winner's partition (the A- or B-master's log that holds the winning
//! write) in the key's slot: its floor, or above it the slot checkpoint of
//! the floor's epoch and log (the apply module, "Applying into a Redis
//! Cluster target"). The slot checkpoint lives in the key's slot, so it is
//! read from the master that then runs the repair; each round of repairs
//! reads each side's topology once, and a repair whose slot is moving
//! (`MOVED`, `ASK`, `TRYAGAIN`) waits for the next round. A standalone
//! side (paired with a cluster) is repaired on its server, after its
//! plain checkpoint of the winner's partition.
//!
//! # The log
//!
//! One JSON object per conflict, appended and fsynced before the state
//! that counts it is saved. Crossing writes of one hot key make many pairs
//! (each write against every one of the other side's it did not see), so
//! the log is bounded: past [`LOG_MAX_BYTES`] it is renamed to
//! [`ROTATED_LOG`] (replacing the one before) and a new one begun, at most
//! about twice that on disk. The count in `ferry status` is of every
//! conflict, rotated away or not.
//!
//! # Restarts
//!
//! The state (positions, what each side has seen, the windows) is saved
//! atomically every second, after the conflicts found before it are in
//! the log (appended and fsynced). A restart goes on from the state; the
//! pairs found again between the state and the crash are recognised in the
//! log's tail and not appended twice, but counted (the saved count is from
//! before them). Without a state (a data dir of an older ferry, whose
//! state version this one does not read), detection starts at the logs'
//! ends. A pass appends at most 50 000 conflicts
//! before it saves and goes on (conflicts are pairs: many concurrent writes
//! of one key on both sides make many), and stops at once on shutdown.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::ConflictPolicy;
use super::two_way::Pair;
use crate::apply::checkpoint::{checkpoint_key, Checkpoint};
use crate::apply::{EchoRule, OwnedKeyspace};
use crate::position::{now_unix_ms, LogId, PartitionId};
use crate::record::{Record, RecordLimits, INTERNAL_PREFIX};
use crate::redis::client::Client;
use crate::redis::cluster::{discover, Topology};
use crate::redis::command::{self, key_hash_slot, Command};
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;
use crate::status::TwoWayStatus;
use crate::wal::{ReadLimits, Wal, WalEntry, WalError};

/// The conflict log, in the data dir.
pub const CONFLICT_LOG: &str = "conflicts.jsonl";
/// The detector's state, in the data dir.
const STATE_FILE: &str = "conflicts.state";
const STATE_VERSION: u32 = 2;
/// Writes kept per side (module doc, "Finding them").
pub const WINDOW_CAP: usize = 200_000;
/// Conflicts a pass holds at most before it appends them (a pass ends
/// after the entry that reaches it; the next goes on from there).
const FOUND_PER_PASS: usize = 50_000;
/// Conflicts logged one by one per pass of the detector (all are in the
/// conflict log).
const WARN_PER_PASS: usize = 20;
/// How often the detector looks for new entries when no append woke it.
const POLL: Duration = Duration::from_millis(200);
/// How often the state is saved when it changed.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// How much of the log's end a restart reads to skip pairs already logged.
const LOG_TAIL_BYTES: u64 = 4 << 20;
/// The conflict log's size at which it is rotated (module doc, "The log").
pub const LOG_MAX_BYTES: u64 = 256 << 20;
/// The rotated log: the one before the current, in the data dir.
pub const ROTATED_LOG: &str = "conflicts.jsonl.1";
const READ: ReadLimits = ReadLimits {
    max_entries: 4096,
    max_bytes: 16 << 20,
};

/// What `ferry status` shows of the detector.
#[derive(Debug, Default)]
pub struct ConflictStats {
    inner: Mutex<TwoWayStatus>,
}

impl ConflictStats {
    pub fn snapshot(&self) -> TwoWayStatus {
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut TwoWayStatus)) {
        f(&mut self
            .inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()));
    }
}

/// A write of one side the other side may not have seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    /// The partition of the side's log it is in, and its id there.
    #[serde(default)]
    partition: u32,
    id: u64,
    /// What this side had applied of the other side's partitions in the
    /// key's slot when it wrote: (partition, log id).
    seen: Vec<(u32, u64)>,
    db: u32,
    /// The key, hex.
    key: String,
    unix_ms: u64,
    offset: u64,
}

impl Seen {
    /// What this write had seen of the other side's `partition`.
    fn seen_of(&self, partition: u32) -> u64 {
        self.seen
            .iter()
            .find(|(p, _)| *p == partition)
            .map_or(0, |(_, id)| *id)
    }
}

/// A repair a winner policy owes: the key written again on side `touch`
/// once that side's checkpoint of partition `wait_partition` reached
/// `wait_id` (module doc, "Policies").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Repair {
    db: u32,
    /// The key, hex.
    key: String,
    touch: usize,
    wait_partition: u32,
    wait_id: u64,
}

/// The repairs owed, one per key, side and wait partition: a key's
/// later conflict only moves its repair's wait further (module doc,
/// "Policies"). Ordered by side, partition, db and key (repairs of
/// different keys do not depend on each other's order).
#[derive(Debug, Default)]
struct Owed {
    /// (touch, wait partition, db, key hex) to the highest wait id owed.
    by_key: BTreeMap<(usize, u32, u32, String), u64>,
}

impl Owed {
    fn from_repairs(repairs: Vec<Repair>) -> Owed {
        let mut owed = Owed::default();
        for repair in repairs {
            owed.owe(repair);
        }
        owed
    }

    /// Owes `repair`; one owed already for its key keeps the higher wait.
    fn owe(&mut self, repair: Repair) {
        let wait = self
            .by_key
            .entry((repair.touch, repair.wait_partition, repair.db, repair.key))
            .or_insert(repair.wait_id);
        *wait = (*wait).max(repair.wait_id);
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    fn repair(
        ((touch, wait_partition, db, key), wait_id): ((usize, u32, u32, String), u64),
    ) -> Repair {
        Repair {
            db,
            key,
            touch,
            wait_partition,
            wait_id,
        }
    }

    fn to_vec(&self) -> Vec<Repair> {
        self.by_key
            .iter()
            .map(|(key, id)| Owed::repair((key.clone(), *id)))
            .collect()
    }

    /// Every owed repair, leaving none owed.
    fn take(&mut self) -> Vec<Repair> {
        std::mem::take(&mut self.by_key)
            .into_iter()
            .map(Owed::repair)
            .collect()
    }

    /// (side touched, wait partition, wait id) of each owed repair.
    #[cfg(test)]
    fn waits(&self) -> Vec<(usize, u32, u64)> {
        self.to_vec()
            .iter()
            .map(|r| (r.touch, r.wait_partition, r.wait_id))
            .collect()
    }
}

/// A winner policy and the two sides' servers (A, B): each side's URL,
/// or between clusters its seed list.
pub struct Resolution {
    pub policy: ConflictPolicy,
    pub sides: [Vec<RedisUrl>; 2],
    pub pair: Pair,
}

/// Writes a key again as it is, so that the server's stream carries its
/// value (or its absence) to the other side: `RESTORE … REPLACE` of its
/// own `DUMP` with its TTL, or, for a key that is not there, a `SET` and a
/// `DEL` (a `DEL` of nothing would not be propagated). Redis 7 propagates a
/// script's effects, so the other side gets these commands.
const TOUCH: &str = "local v = redis.call('DUMP', KEYS[1]) \
if v then \
  local ttl = redis.call('PTTL', KEYS[1]) \
  if ttl < 0 then ttl = 0 end \
  redis.call('RESTORE', KEYS[1], ttl, v, 'REPLACE') \
  return 1 \
end \
redis.call('SET', KEYS[1], '') \
redis.call('DEL', KEYS[1]) \
return 0";

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    version: u32,
    /// Next log id to read, per side and partition: (partition, id).
    next: [Vec<(u32, u64)>; 2],
    /// What each side has applied of the other's partitions, per slot
    /// (from its echoes): (partition, slot, log id).
    seen: [Vec<(u32, u16, u64)>; 2],
    windows: [Vec<Seen>; 2],
    conflicts: u64,
    unexamined: u64,
    #[serde(default)]
    repairs: Vec<Repair>,
    #[serde(default)]
    repaired: u64,
}

/// (log id, db, key) of a write in a window, in log order.
type WindowEntry = (u64, u32, Bytes);

/// One side: where its logs are read, what it has seen, its window.
#[derive(Default)]
struct Side {
    /// Next log id to read, per partition of this side.
    next: BTreeMap<u32, u64>,
    /// (the other side's partition, slot) -> the log id this side has
    /// applied it up to (module doc, "Two clusters": per slot; 0 for
    /// standalone servers).
    seen: HashMap<(u32, u16), u64>,
    /// Per (partition, slot), in log order (for leaving the window).
    order: HashMap<(u32, u16), VecDeque<WindowEntry>>,
    by_key: HashMap<(u32, Bytes), Vec<Seen>>,
    len: usize,
}

impl Side {
    fn seen(&self, partition: u32, slot: u16) -> u64 {
        self.seen.get(&(partition, slot)).copied().unwrap_or(0)
    }

    /// What this side has seen in `slot`, of every partition.
    fn seen_in(&self, slot: u16) -> Vec<(u32, u64)> {
        let mut seen: Vec<(u32, u64)> = self
            .seen
            .iter()
            .filter(|((_, s), _)| *s == slot)
            .map(|((p, _), id)| (*p, *id))
            .collect();
        seen.sort_unstable();
        seen
    }

    fn insert(&mut self, slot: u16, seen: Seen, key: Bytes) {
        self.order
            .entry((seen.partition, slot))
            .or_default()
            .push_back((seen.id, seen.db, key.clone()));
        self.by_key.entry((seen.db, key)).or_default().push(seen);
        self.len += 1;
    }

    /// Drops the writes of `partition` in `slot` up to `id` (the other side
    /// has seen them).
    fn leave_through(&mut self, partition: u32, slot: u16, id: u64) {
        let Some(order) = self.order.get_mut(&(partition, slot)) else {
            return;
        };
        let mut gone = Vec::new();
        while order.front().is_some_and(|(first, _, _)| *first <= id) {
            if let Some(front) = order.pop_front() {
                gone.push(front);
            }
        }
        if order.is_empty() {
            self.order.remove(&(partition, slot));
        }
        for (id, db, key) in gone {
            self.forget(partition, id, db, key);
        }
    }

    /// Drops the oldest write of `partition` in `slot` (the window is full).
    fn drop_front(&mut self, partition: u32, slot: u16) -> bool {
        let Some(order) = self.order.get_mut(&(partition, slot)) else {
            return false;
        };
        let Some((id, db, key)) = order.pop_front() else {
            return false;
        };
        if order.is_empty() {
            self.order.remove(&(partition, slot));
        }
        self.forget(partition, id, db, key);
        true
    }

    fn forget(&mut self, partition: u32, id: u64, db: u32, key: Bytes) {
        let slot = (db, key);
        if let Some(list) = self.by_key.get_mut(&slot) {
            let before = list.len();
            list.retain(|w| !(w.id == id && w.partition == partition));
            self.len -= before - list.len();
            if list.is_empty() {
                self.by_key.remove(&slot);
            }
        }
    }
}

/// One conflict, as a line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The key, as text where it is UTF-8 (else lossy; `key_hex` is exact).
    pub key: String,
    pub key_hex: String,
    pub db: u32,
    /// The source's write (partition 0) and the target's (partition 1).
    pub source: WritePosition,
    pub target: WritePosition,
    pub detected_unix_ms: u64,
    /// The policy it was handled by (`report`, `source-wins`, `target-wins`).
    #[serde(default)]
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritePosition {
    pub partition: u32,
    pub log_id: u64,
    /// The side's replication offset after the write.
    pub offset: u64,
    /// When ferry logged it.
    pub unix_ms: u64,
    /// The other side's log id this side had applied when it wrote.
    pub seen: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Bytes> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

/// The detector of one two-way sync.
struct Detector {
    sides: [Side; 2],
    pair: Pair,
    /// The other direction's checkpoint keys, per side: in A's logs the
    /// echoes write the backward partitions' checkpoints, and the reverse.
    echo_rules: [EchoRule; 2],
    conflicts: u64,
    unexamined: u64,
    /// Pairs the log's tail held when this run began (found again after a
    /// restart: counted, not appended again). A pair is found once per run
    /// (when the later of its writes is read), so each leaves the set when
    /// found and the set only shrinks.
    logged: HashSet<LoggedPair>,
    /// Pairs of [`Self::logged`] found again since the last pass counted
    /// them: conflicts the saved count did not have yet.
    refound: u64,
    policy: ConflictPolicy,
    repairs: Owed,
    repaired: u64,
    /// The keys the sync owns (the same both ways: no `db-map`).
    keyspace: OwnedKeyspace,
}

/// (source partition, id, target partition, id, db, key hex).
type LoggedPair = (u32, u64, u32, u64, u32, String);

impl Detector {
    /// `drainer_ids`: the drainer applying into A (its checkpoints mark
    /// the echoes in A's log), and the one applying into B.
    fn new(drainer_ids: [&str; 2], keyspace: OwnedKeyspace, pair: Pair) -> Detector {
        Detector {
            sides: [Side::default(), Side::default()],
            pair,
            echo_rules: [
                EchoRule::new(drainer_ids[0], pair.backward()),
                EchoRule::new(drainer_ids[1], pair.forward()),
            ],
            conflicts: 0,
            unexamined: 0,
            logged: HashSet::new(),
            refound: 0,
            policy: ConflictPolicy::Report,
            repairs: Owed::default(),
            repaired: 0,
            keyspace,
        }
    }

    /// The side whose logs partition `partition` is.
    fn side_of(&self, partition: PartitionId) -> usize {
        usize::from(self.pair.is_backward(partition))
    }

    /// The slot side `side`'s echoes speak of for `key` (module doc, "A
    /// standalone server and a cluster"): the key's on a cluster side (its
    /// echoes are slot checkpoints), one for every key on a standalone side
    /// (its echoes are whole checkpoints).
    fn slot_in(&self, side: usize, key: &[u8]) -> u16 {
        slot_in(self.pair, side, key)
    }

    fn state(&self) -> State {
        let window = |side: &Side| {
            let mut all: Vec<Seen> = side.by_key.values().flatten().cloned().collect();
            all.sort_by_key(|w| (w.partition, w.id));
            all
        };
        let next = |side: &Side| side.next.iter().map(|(p, id)| (*p, *id)).collect();
        let seen = |side: &Side| {
            let mut seen: Vec<(u32, u16, u64)> =
                side.seen.iter().map(|((p, s), id)| (*p, *s, *id)).collect();
            seen.sort_unstable();
            seen
        };
        State {
            version: STATE_VERSION,
            next: [next(&self.sides[0]), next(&self.sides[1])],
            seen: [seen(&self.sides[0]), seen(&self.sides[1])],
            windows: [window(&self.sides[0]), window(&self.sides[1])],
            conflicts: self.conflicts,
            unexamined: self.unexamined,
            repairs: self.repairs.to_vec(),
            repaired: self.repaired,
        }
    }

    fn restore(&mut self, state: State) {
        for (index, window) in state.windows.into_iter().enumerate() {
            // A side's window leaves by the other side's echoes.
            let pair = self.pair;
            let slot_of = |key: &[u8]| slot_in(pair, 1 - index, key);
            let side = &mut self.sides[index];
            side.next = state.next[index].iter().copied().collect();
            side.seen = state.seen[index]
                .iter()
                .map(|(p, s, id)| ((*p, *s), *id))
                .collect();
            for seen in window {
                if let Some(key) = unhex(&seen.key) {
                    let slot = slot_of(&key);
                    side.insert(slot, seen, key);
                }
            }
        }
        self.conflicts = state.conflicts;
        self.unexamined = state.unexamined;
        self.repairs = Owed::from_repairs(state.repairs);
        self.repaired = state.repaired;
    }

    /// Takes one entry of `partition` (read in log order); returns the
    /// conflicts it completes.
    fn take(&mut self, partition: PartitionId, entry: &WalEntry) -> Vec<Conflict> {
        let x = self.side_of(partition);
        let y = 1 - x;
        let p = partition.0;
        let mut found = Vec::new();
        let Ok(Record::Write(write)) = Record::decode(&entry.payload, RecordLimits::default())
        else {
            return found;
        };
        // An echo: the side has applied the other side's partition `q` up
        // to its `applied` (between clusters, in the slot of the key).
        let mut echoed = false;
        for cmd in write.commands.iter().filter(|cmd| cmd.is("SET")) {
            let Some(key) = cmd.args.get(1) else {
                continue;
            };
            let Some(q) = self.echo_rules[x].partition_of(key) else {
                continue;
            };
            echoed = true;
            let slot = match self.pair.is_cluster(x) {
                // A standalone side's checkpoint of `q`: every slot.
                false => 0,
                // A floor covers no slot of this log in particular.
                true if !key.ends_with(b"}") => continue,
                true => key_hash_slot(key),
            };
            let applied = cmd
                .args
                .get(2)
                .and_then(|value| Checkpoint::decode(value).ok())
                .map(|c| c.applied().0);
            if let Some(applied) = applied {
                let seen = self.sides[x].seen.entry((q, slot)).or_insert(0);
                if applied > *seen {
                    *seen = applied;
                    self.sides[y].leave_through(q, slot, applied);
                }
            }
        }
        if echoed {
            return found;
        }
        let mut db = write.db;
        for cmd in &write.commands {
            if cmd.is("SELECT") {
                if let Some(n) = cmd
                    .args
                    .get(1)
                    .and_then(|a| std::str::from_utf8(a).ok()?.parse().ok())
                {
                    db = n;
                }
                continue;
            }
            let Ok(keys) = command::keys(cmd) else {
                continue;
            };
            for key in keys {
                if key.starts_with(INTERNAL_PREFIX)
                    || self.keyspace.target_db(db).is_none()
                    || !self.keyspace.owns_key(&key)
                {
                    continue;
                }
                // What this side had seen, by its own echoes' slot; the
                // window, by the other side's (which make the write leave).
                let slot = self.slot_in(y, &key);
                let mine = Seen {
                    partition: p,
                    id: entry.log_id.0,
                    seen: self.sides[x].seen_in(self.slot_in(x, &key)),
                    db,
                    key: hex(&key),
                    unix_ms: entry.created_unix_ms,
                    offset: entry.source.offset.0,
                };
                if let Some(theirs) = self.sides[y].by_key.get(&(db, key.clone())) {
                    for other in theirs.iter().filter(|other| {
                        other.id > mine.seen_of(other.partition) && other.seen_of(p) < mine.id
                    }) {
                        let (source, target) = if x == 0 {
                            (&mine, other)
                        } else {
                            (other, &mine)
                        };
                        let conflict = Conflict {
                            key: String::from_utf8_lossy(&key).into_owned(),
                            key_hex: mine.key.clone(),
                            db,
                            source: position(source, target.partition),
                            target: position(target, source.partition),
                            detected_unix_ms: now_unix_ms(),
                            policy: self.policy.as_str().to_string(),
                        };
                        let tag = (
                            source.partition,
                            source.id,
                            target.partition,
                            target.id,
                            db,
                            mine.key.clone(),
                        );
                        // A winner's write left its value where it was
                        // applied last: the other side, once it has
                        // applied it. (Owed again for a pair found again
                        // after a restart: the repair may not have been
                        // saved; done twice, it writes the same value.)
                        // Between clusters the winner's partition is the
                        // A- or B-master's log that holds its write.
                        let repair = match self.policy {
                            ConflictPolicy::Report => None,
                            ConflictPolicy::SourceWins => Some((1, source.partition, source.id)),
                            ConflictPolicy::TargetWins => Some((0, target.partition, target.id)),
                        };
                        if let Some((touch, partition, id)) = repair {
                            self.repairs.owe(Repair {
                                db,
                                key: mine.key.clone(),
                                touch,
                                wait_partition: partition,
                                wait_id: id,
                            });
                        }
                        if self.logged.remove(&tag) {
                            // In the log already, found before the crash
                            // and after the last saved count.
                            self.refound += 1;
                        } else {
                            found.push(conflict);
                        }
                    }
                }
                // Writes the other side has seen already need no window.
                if mine.id > self.sides[y].seen(p, slot) {
                    if self.sides[x].len >= WINDOW_CAP && self.sides[x].drop_front(p, slot) {
                        self.unexamined += 1;
                    }
                    self.sides[x].insert(slot, mine, key);
                }
            }
        }
        found
    }
}

/// [`Detector::slot_in`] of `pair`.
fn slot_in(pair: Pair, side: usize, key: &[u8]) -> u16 {
    match pair.is_cluster(side) {
        true => key_hash_slot(key),
        false => 0,
    }
}

/// A write's position, with what it had seen of the other write's
/// partition `other`.
fn position(seen: &Seen, other: u32) -> WritePosition {
    WritePosition {
        partition: seen.partition,
        log_id: seen.id,
        offset: seen.offset,
        unix_ms: seen.unix_ms,
        seen: seen.seen_of(other),
    }
}

/// The pairs in the last [`LOG_TAIL_BYTES`] of the conflict log (reaching
/// into the rotated one when the current is shorter).
fn logged_pairs(path: &Path) -> HashSet<LoggedPair> {
    let mut pairs = HashSet::new();
    let current = read_tail(path, LOG_TAIL_BYTES);
    let left = LOG_TAIL_BYTES.saturating_sub(current.len() as u64);
    let rotated = match left {
        0 => String::new(),
        left => read_tail(&rotated_path(path), left),
    };
    for line in rotated.lines().chain(current.lines()) {
        if let Ok(c) = serde_json::from_str::<Conflict>(line) {
            pairs.insert((
                c.source.partition,
                c.source.log_id,
                c.target.partition,
                c.target.log_id,
                c.db,
                c.key_hex,
            ));
        }
    }
    pairs
}

/// The last `bytes` of the file at `path` (empty when it cannot be read;
/// a line cut at the start does not parse and is skipped).
fn read_tail(path: &Path, bytes: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut raw = Vec::new();
    if file
        .seek(SeekFrom::Start(len.saturating_sub(bytes)))
        .is_err()
        || file.take(bytes).read_to_end(&mut raw).is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&raw).into_owned()
}

/// Where the log at `path` is rotated to ([`ROTATED_LOG`] beside it).
fn rotated_path(path: &Path) -> PathBuf {
    path.with_file_name(ROTATED_LOG)
}

/// Appends `conflicts` to the log at `path` and fsyncs it. A log that
/// would pass `max_bytes` is first rotated: renamed to [`ROTATED_LOG`]
/// (replacing the one before it) and the directory fsynced, so the two
/// files hold at most twice `max_bytes` (plus one append).
fn append(path: &Path, conflicts: &[Conflict], max_bytes: u64) -> std::io::Result<()> {
    let mut text = String::new();
    for conflict in conflicts {
        text.push_str(&serde_json::to_string(conflict).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    let rotate = len > 0 && len + text.len() as u64 > max_bytes;
    if rotate {
        std::fs::rename(path, rotated_path(path))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_data()?;
    // A file made here (first, or after the rotation) lasts a crash only
    // with its directory entry.
    if rotate || len == 0 {
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

fn load_state(path: &Path) -> Option<State> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str::<State>(&text) {
        Ok(state) if state.version == STATE_VERSION => Some(state),
        Ok(state) => {
            warn!(path = %path.display(), version = state.version, "unknown conflict state version; detection starts at the logs' ends");
            None
        }
        Err(error) => {
            warn!(path = %path.display(), %error, "unreadable conflict state; detection starts at the logs' ends");
            None
        }
    }
}

/// One round of repairs: a connection per server, between clusters each
/// side's topology read once (module doc, "Policies").
struct Repairs<'a> {
    resolution: &'a Resolution,
    /// The drainer applying into each side (its checkpoints there).
    drainer_ids: &'a [String; 2],
    clients: HashMap<String, Client>,
    topologies: [Option<Topology>; 2],
    /// What each (side, partition, slot) was read to have applied this
    /// round: the many repairs of one hot key read it once. A value that
    /// grows meanwhile only moves a repair to the next round.
    applied: HashMap<(usize, u32, u16), u64>,
}

/// Whether a server's error reply says the slot is served elsewhere (a
/// slot moving on that side): the repair waits for the next round.
fn redirected(message: &str) -> bool {
    ["MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN"]
        .iter()
        .any(|prefix| message.starts_with(prefix))
}

impl<'a> Repairs<'a> {
    fn new(resolution: &'a Resolution, drainer_ids: &'a [String; 2]) -> Repairs<'a> {
        Repairs {
            resolution,
            drainer_ids,
            clients: HashMap::new(),
            topologies: [None, None],
            applied: HashMap::new(),
        }
    }

    /// The server of side `side` that serves `slot` (a standalone side's
    /// only one).
    async fn server(&mut self, side: usize, slot: u16) -> Result<RedisUrl, String> {
        let seeds = &self.resolution.sides[side];
        let first = seeds
            .first()
            .ok_or_else(|| format!("side {side} has no server"))?;
        if !self.resolution.pair.is_cluster(side) {
            return Ok(first.clone());
        }
        if self.topologies[side].is_none() {
            let topology = discover(seeds)
                .await
                .map_err(|error| format!("reading the cluster's topology: {error}"))?;
            self.topologies[side] = Some(topology);
        }
        let topology = self.topologies[side].as_ref().expect("read above");
        let master = topology
            .master_for_slot(slot)
            .ok_or_else(|| format!("no master of slot {slot} on {}", topology.seen_from))?;
        Ok(Topology::url_for(master, first))
    }

    /// A connection to `url`'s server, in db 0 (where checkpoints live)
    /// between calls.
    async fn client(&mut self, url: &RedisUrl) -> Result<&mut Client, String> {
        let addr = url.addr();
        if !self.clients.contains_key(&addr) {
            let in_db0 = RedisUrl {
                db: 0,
                ..url.clone()
            };
            let client = Client::connect(&in_db0)
                .await
                .map_err(|error| format!("connecting to {addr}: {error}"))?;
            self.clients.insert(addr.clone(), client);
        }
        Ok(self.clients.get_mut(&addr).expect("inserted above"))
    }

    /// The checkpoint `key` of side `side` (on the master of its slot);
    /// `Ok(None)` when it is not there, or its slot is moving.
    async fn checkpoint(&mut self, side: usize, key: &[u8]) -> Result<Option<Checkpoint>, String> {
        let url = self.server(side, key_hash_slot(key)).await?;
        let client = self.client(&url).await?;
        match client.call([b"GET".as_slice(), key]).await {
            Ok(Frame::Bulk(value)) => Checkpoint::decode(&value)
                .map(Some)
                .map_err(|error| format!("a checkpoint on {}: {error}", url.addr())),
            Ok(_) => Ok(None),
            Err(crate::redis::client::ClientError::Server { message, .. })
                if redirected(&message) =>
            {
                Ok(None)
            }
            Err(error) => {
                self.clients.remove(&url.addr());
                Err(format!("GET of a checkpoint on {}: {error}", url.addr()))
            }
        }
    }

    /// How far side `side` has applied `partition`'s log in `slot`: its
    /// checkpoint; between clusters the floor, or the slot's checkpoint
    /// above it when of the floor's epoch and log (apply module,
    /// "Applying into a Redis Cluster target").
    async fn applied(&mut self, side: usize, partition: u32, slot: u16) -> Result<u64, String> {
        let slot = match self.resolution.pair.is_cluster(side) {
            true => slot,
            false => 0,
        };
        if let Some(applied) = self.applied.get(&(side, partition, slot)) {
            return Ok(*applied);
        }
        let applied = self.read_applied(side, partition, slot).await?;
        self.applied.insert((side, partition, slot), applied);
        Ok(applied)
    }

    /// [`Self::applied`], read from the side.
    async fn read_applied(
        &mut self,
        side: usize,
        partition: u32,
        slot: u16,
    ) -> Result<u64, String> {
        let floor_key = checkpoint_key(&self.drainer_ids[side], PartitionId(partition));
        let floor = self.checkpoint(side, &floor_key).await?;
        let Some(floor) = floor else {
            return Ok(0);
        };
        let Checkpoint::Applied {
            log_id, epoch, log, ..
        } = floor
        else {
            return Ok(floor.applied().0);
        };
        if !self.resolution.pair.is_cluster(side) {
            return Ok(log_id.0);
        }
        let slot_key = crate::apply::slot_checkpoint_key(&floor_key, slot);
        Ok(match self.checkpoint(side, &slot_key).await? {
            Some(Checkpoint::Applied {
                log_id: in_slot,
                epoch: e,
                log: l,
                ..
            }) if e == epoch && l == log => log_id.max(in_slot).0,
            _ => log_id.0,
        })
    }

    /// Carries out `repair` if its side has applied what it waits for:
    /// `Ok(true)` when done.
    async fn run(&mut self, repair: &Repair) -> Result<bool, String> {
        let name = unhex(&repair.key).ok_or("a repair's key is not hex")?;
        let slot = key_hash_slot(&name);
        let applied = self
            .applied(repair.touch, repair.wait_partition, slot)
            .await?;
        if applied < repair.wait_id {
            return Ok(false);
        }
        let url = self.server(repair.touch, slot).await?;
        let addr = url.addr();
        let db = repair.db.to_string();
        let commands = [
            Command::from_parts([b"SELECT".as_slice(), db.as_bytes()]),
            Command::from_parts([b"EVAL".as_slice(), TOUCH.as_bytes(), b"1", &name]),
            Command::from_parts([b"SELECT".as_slice(), b"0"]),
        ];
        let client = self.client(&url).await?;
        let replies = match client.pipeline(&commands).await {
            Ok(replies) => replies,
            Err(error) => {
                self.clients.remove(&addr);
                return Err(format!("the repair on {addr}: {error}"));
            }
        };
        match replies.iter().find_map(|r| r.error_message()) {
            Some(message) if redirected(&message) => Ok(false),
            Some(message) => Err(format!("the repair on {addr}: {message}")),
            None => Ok(true),
        }
    }
}

/// How often owed repairs are tried.
const REPAIR_EVERY: Duration = Duration::from_millis(200);

/// Runs the detector until `stop`; with `resolution`, also carries out the
/// repairs its winner policy owes (module doc, "Policies").
#[allow(clippy::too_many_arguments)]
pub async fn run(
    wal: Wal,
    data_dir: PathBuf,
    drainer_ids: [String; 2],
    keyspace: OwnedKeyspace,
    stats: Arc<ConflictStats>,
    stop: CancellationToken,
    resolution: Option<Resolution>,
    pair: Pair,
) {
    let log_path = data_dir.join(CONFLICT_LOG);
    let state_path = data_dir.join(STATE_FILE);
    let mut detector = Detector::new(
        [drainer_ids[0].as_str(), drainer_ids[1].as_str()],
        keyspace,
        pair,
    );
    match load_state(&state_path) {
        Some(state) => detector.restore(state),
        None => {
            for partition in wal.partitions() {
                let last = wal
                    .last_log_id(partition)
                    .ok()
                    .flatten()
                    .unwrap_or(LogId::ZERO);
                // The backward partitions start with the two-way marks:
                // read them all; the forward ones from their ends.
                let index = detector.side_of(partition);
                let next = if index == 1 { 1 } else { last.0 + 1 };
                detector.sides[index].next.insert(partition.0, next);
            }
        }
    }
    detector.logged = logged_pairs(&log_path);
    detector.policy = resolution
        .as_ref()
        .map_or(ConflictPolicy::Report, |r| r.policy);
    stats.update(|s| {
        s.conflicts = detector.conflicts;
        s.unexamined = detector.unexamined;
        s.conflict_log = log_path.display().to_string();
        s.policy = detector.policy.as_str().to_string();
        s.pair = pair.as_str().to_string();
        s.repaired = detector.repaired;
        s.repairs_owed = detector.repairs.len() as u64;
    });
    let mut repaired_at = Instant::now();
    let mut appended = wal.subscribe_appends();
    let mut saved = Instant::now();
    let mut dirty = true;
    loop {
        let mut found = Vec::new();
        let mut progressed = false;
        for partition in wal.partitions() {
            // Many conflicts make a pass long: a stop does not wait for it.
            if stop.is_cancelled() {
                break;
            }
            tokio::task::yield_now().await;
            let index = detector.side_of(partition);
            // A partition that appeared since (a new shard): all of it.
            let next = *detector.sides[index].next.entry(partition.0).or_insert(1);
            let from = LogId(next.max(1));
            let read_wal = wal.clone();
            let read =
                tokio::task::spawn_blocking(move || read_wal.read(partition, from, READ)).await;
            let entries = match read {
                Ok(Ok(entries)) => entries,
                Ok(Err(WalError::Trimmed {
                    first_available, ..
                })) => {
                    let skipped = first_available.0.saturating_sub(from.0);
                    warn!(partition = %partition, from = %from, to = %first_available, "conflict detection: entries trimmed before they were read; not examined");
                    detector.unexamined += skipped;
                    detector.sides[index]
                        .next
                        .insert(partition.0, first_available.0);
                    dirty = true;
                    continue;
                }
                Ok(Err(error)) => {
                    warn!(%error, "conflict detection: reading the WAL");
                    continue;
                }
                Err(error) => {
                    warn!(%error, "conflict detection: reading the WAL");
                    continue;
                }
            };
            // Off the runtime: many conflicts make it long.
            let stopping = stop.clone();
            let mut taken = std::mem::take(&mut found);
            let took = tokio::task::spawn_blocking(move || {
                let mut any = false;
                for entry in &entries {
                    if stopping.is_cancelled() || taken.len() >= FOUND_PER_PASS {
                        break;
                    }
                    taken.extend(detector.take(partition, entry));
                    detector.sides[index]
                        .next
                        .insert(partition.0, entry.log_id.0 + 1);
                    any = true;
                }
                (detector, taken, any)
            })
            .await;
            match took {
                Ok((back, taken, any)) => {
                    detector = back;
                    found = taken;
                    progressed |= any;
                }
                Err(error) => {
                    warn!(%error, "conflict detection stopped");
                    return;
                }
            }
            if found.len() >= FOUND_PER_PASS {
                break;
            }
        }
        if detector.refound > 0 {
            detector.conflicts += std::mem::take(&mut detector.refound);
            stats.update(|s| s.conflicts = detector.conflicts);
        }
        if !found.is_empty() {
            for conflict in found.iter().take(WARN_PER_PASS) {
                warn!(key = %conflict.key, db = conflict.db, source_log_id = conflict.source.log_id, target_log_id = conflict.target.log_id, "two-way conflict: the key was written on both sides before either saw the other's write");
            }
            if found.len() > WARN_PER_PASS {
                warn!(
                    conflicts = found.len(),
                    "two-way conflicts: more than are logged here; every one is in the conflict log"
                );
            }
            if let Err(error) = append(&log_path, &found, LOG_MAX_BYTES) {
                warn!(path = %log_path.display(), %error, "cannot append to the conflict log");
            }
            detector.conflicts += found.len() as u64;
            let last = found.last().map(|c| format!("db {} {:?}", c.db, c.key));
            stats.update(|s| {
                s.conflicts = detector.conflicts;
                s.last_conflict = last;
            });
        }
        if let Some(resolution) = resolution
            .as_ref()
            .filter(|_| !detector.repairs.is_empty() && repaired_at.elapsed() >= REPAIR_EVERY)
        {
            repaired_at = Instant::now();
            let owed = detector.repairs.take();
            let mut round = Repairs::new(resolution, &drainer_ids);
            for owed in owed {
                match round.run(&owed).await {
                    Ok(true) => {
                        info!(db = owed.db, key_hex = %owed.key, side = owed.touch, policy = detector.policy.as_str(), "two-way conflict repaired: the key written again where the winner's write was applied last");
                        detector.repaired += 1;
                        dirty = true;
                    }
                    Ok(false) => detector.repairs.owe(owed),
                    Err(error) => {
                        warn!(%error, "two-way conflict repair failed; retrying");
                        detector.repairs.owe(owed);
                    }
                }
            }
        }
        dirty |= progressed;
        stats.update(|s| {
            s.unexamined = detector.unexamined;
            s.repaired = detector.repaired;
            s.repairs_owed = detector.repairs.len() as u64;
        });
        if dirty && (saved.elapsed() >= SAVE_EVERY || stop.is_cancelled()) {
            let state = detector.state();
            match serde_json::to_string(&state) {
                Ok(text) => {
                    if let Err(error) = super::run::write_atomically(&state_path, &text) {
                        warn!(path = %state_path.display(), %error, "cannot save the conflict state");
                    }
                }
                Err(error) => warn!(%error, "cannot encode the conflict state"),
            }
            saved = Instant::now();
            dirty = false;
        }
        if stop.is_cancelled() {
            info!(conflicts = detector.conflicts, "conflict detection stopped");
            return;
        }
        if progressed {
            continue;
        }
        let poll = if detector.repairs.is_empty() {
            POLL
        } else {
            REPAIR_EVERY
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = appended.changed() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::two_way::{BACKWARD, FORWARD};
    use super::*;
    use crate::record::WriteRecord;
    use crate::redis::command::Command;
    use crate::wal::SourcePosition;

    pub(super) fn entry(id: u64, commands: &[&[&str]], transaction: bool) -> WalEntry {
        let write = WriteRecord {
            db: 0,
            commands: commands
                .iter()
                .map(|c| Command::from_parts(c.iter()))
                .collect(),
            transaction,
            streamed: vec![],
            tenure: None,
        };
        WalEntry {
            log_id: LogId(id),
            flags: 0,
            created_unix_ms: 1000 + id,
            bytes_end: 0,
            stored_len: 0,
            source: SourcePosition {
                replid: "r".into(),
                offset: crate::position::ReplOffset(100 * id),
                db: 0,
            },
            payload: Record::Write(write).encode(),
        }
    }

    /// An echo in side `x`'s log: the other direction applied up to `applied`.
    fn echo(id: u64, x: usize, applied: u64) -> WalEntry {
        let key = if x == 0 {
            "__ferry:checkpoint:d:1"
        } else {
            "__ferry:checkpoint:d:0"
        };
        let value = format!("v2 applied={applied} epoch=0 log=00000000000000aa");
        entry(id, &[&["INCR", "k"], &["SET", key, &value]], true)
    }

    #[test]
    fn writes_neither_side_saw_conflict_and_seen_ones_do_not() {
        let mut d = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Standalone);
        // A writes k at 1; B writes k at 1 without having seen A's: conflict.
        assert!(d
            .take(FORWARD, &entry(1, &[&["SET", "k", "a"]], false))
            .is_empty());
        let found = d.take(BACKWARD, &entry(1, &[&["SET", "k", "b"]], false));
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].source.log_id, found[0].target.log_id), (1, 1));
        assert_eq!(found[0].key, "k");
        // B applies A's log up to 1 (an echo in B's log): A's write leaves
        // the window; B's next write of k saw it.
        assert!(d.take(BACKWARD, &echo(2, 1, 1)).is_empty());
        assert!(d
            .take(BACKWARD, &entry(3, &[&["SET", "k", "c"]], false))
            .is_empty());
        // A's write at 2, before A saw B's 1 and 3: conflicts with both.
        let found = d.take(FORWARD, &entry(2, &[&["SET", "k", "d"]], false));
        let pairs: Vec<(u64, u64)> = found
            .iter()
            .map(|c| (c.source.log_id, c.target.log_id))
            .collect();
        assert_eq!(pairs, [(2, 1), (2, 3)]);
        // A applies B's log through 3: A's later write saw everything.
        assert!(d.take(FORWARD, &echo(3, 0, 3)).is_empty());
        assert!(d
            .take(FORWARD, &entry(4, &[&["SET", "k", "e"]], false))
            .is_empty());
        // Other keys, other dbs and ferry's keys never conflict.
        assert!(d
            .take(
                BACKWARD,
                &entry(
                    4,
                    &[&["SET", "other", "x"], &["SET", "__ferry:x", "1"]],
                    true
                )
            )
            .is_empty());
    }

    #[test]
    fn keys_the_sync_does_not_own_never_conflict() {
        let owned = crate::apply::FilterConfig {
            key_prefix: Some(vec!["app:".into()]),
            ..Default::default()
        }
        .keyspace()
        .unwrap();
        let mut d = Detector::new(["d", "d"], owned, Pair::Standalone);
        d.policy = ConflictPolicy::SourceWins;
        d.take(
            FORWARD,
            &entry(1, &[&["SET", "other", "a"], &["SET", "app:k", "a"]], true),
        );
        let found = d.take(
            BACKWARD,
            &entry(1, &[&["SET", "other", "b"], &["SET", "app:k", "b"]], true),
        );
        let keys: Vec<&str> = found.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["app:k"]);
        assert_eq!(d.repairs.len(), 1, "a repair only of the owned key");
    }

    #[test]
    fn the_order_the_two_logs_are_read_in_does_not_matter() {
        let a = [
            entry(1, &[&["SET", "k", "a"]], false),
            echo(2, 0, 2),
            entry(3, &[&["INCR", "n"]], false),
        ];
        let b = [
            entry(1, &[&["INCR", "n"]], false),
            entry(2, &[&["SET", "k", "b"]], false),
            echo(3, 1, 1),
            entry(4, &[&["INCR", "n"]], false),
        ];
        let pairs = |order: &[(usize, usize)]| {
            let mut d = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Standalone);
            let mut found: Vec<(u64, u64, String)> = order
                .iter()
                .flat_map(|&(side, i)| {
                    d.take(
                        PartitionId(side as u32),
                        if side == 0 { &a[i] } else { &b[i] },
                    )
                })
                .map(|c| (c.source.log_id, c.target.log_id, c.key))
                .collect();
            found.sort();
            found
        };
        let a_first = pairs(&[(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]);
        let b_first = pairs(&[(1, 0), (1, 1), (1, 2), (1, 3), (0, 0), (0, 1), (0, 2)]);
        let mixed = pairs(&[(1, 0), (0, 0), (1, 1), (0, 1), (1, 2), (0, 2), (1, 3)]);
        // k: A's 1 (seen 0) and B's 2 (seen 0). n: A's 3 (seen 2: B's 1 and
        // 2) against B's 1 (seen) and B's 4 (seen 1 < 3): a conflict.
        let want = vec![(1, 2, "k".to_string()), (3, 4, "n".to_string())];
        assert_eq!(a_first, want);
        assert_eq!(b_first, want);
        assert_eq!(mixed, want);
    }

    #[test]
    fn a_hot_keys_conflicts_owe_one_repair_that_waits_for_the_latest_winner() {
        // A writes k at 1, 2 and 3, B at 1 and 2, none seeing the other:
        // six pairs, and under source-wins one repair of k on B, once B
        // applied A's 3 (its earlier ones would be overwritten by then).
        for (policy, want) in [
            (ConflictPolicy::SourceWins, (1, 0, 3)),
            (ConflictPolicy::TargetWins, (0, 1, 2)),
        ] {
            let mut d = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Standalone);
            d.policy = policy;
            let mut found = 0;
            for id in 1..=3 {
                found += d
                    .take(FORWARD, &entry(id, &[&["SET", "k", "a"]], false))
                    .len();
            }
            for id in 1..=2 {
                found += d
                    .take(BACKWARD, &entry(id, &[&["SET", "k", "b"]], false))
                    .len();
            }
            found += d
                .take(BACKWARD, &entry(3, &[&["SET", "other", "b"]], false))
                .len();
            assert_eq!(found, 6, "{policy:?}");
            assert_eq!(d.repairs.waits(), [want], "{policy:?}");
            // Saved and restored (a state of an older ferry may list a key
            // more than once): still one, at the highest wait.
            let mut state = d.state();
            state.repairs.push(Repair {
                wait_id: 1,
                ..state.repairs[0].clone()
            });
            let mut restored = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Standalone);
            restored.restore(state);
            assert_eq!(restored.repairs.to_vec(), d.repairs.to_vec());
        }
    }

    #[test]
    fn the_log_is_rotated_past_its_size_and_a_restart_reads_both_tails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFLICT_LOG);
        let conflict = |n: u64| Conflict {
            key: format!("k{n}"),
            key_hex: hex(format!("k{n}").as_bytes()),
            db: 0,
            source: WritePosition {
                partition: 0,
                log_id: n,
                offset: n,
                unix_ms: 1,
                seen: 0,
            },
            target: WritePosition {
                partition: 1,
                log_id: n,
                offset: n,
                unix_ms: 1,
                seen: 0,
            },
            detected_unix_ms: 1,
            policy: "report".into(),
        };
        let line = serde_json::to_string(&conflict(10)).unwrap().len() as u64 + 1;
        // Room for three lines a file: the fourth append rotates.
        let max = 3 * line + line / 2;
        for n in 10..14 {
            append(&path, &[conflict(n)], max).unwrap();
        }
        let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
        let rotated = dir.path().join(ROTATED_LOG);
        assert_eq!((lines(&rotated), lines(&path)), (3, 1));
        for n in 14..17 {
            append(&path, &[conflict(n)], max).unwrap();
        }
        // The rotated log is replaced, never grown: two files at most.
        assert_eq!((lines(&rotated), lines(&path)), (3, 1));
        assert!(std::fs::metadata(&rotated).unwrap().len() <= max);
        let logged = logged_pairs(&path);
        let ids: std::collections::BTreeSet<u64> = logged.iter().map(|p| p.1).collect();
        assert_eq!(ids, (13..17).collect());
    }

    #[test]
    fn state_round_trips_and_a_restart_does_not_log_a_pair_twice() {
        let mut d = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Standalone);
        d.take(FORWARD, &entry(1, &[&["SET", "k", "a"]], false));
        d.sides[0].next.insert(0, 2);
        let state = serde_json::to_string(&d.state()).unwrap();
        let mut again = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Standalone);
        again.restore(serde_json::from_str(&state).unwrap());
        assert_eq!(again.sides[0].next.get(&0), Some(&2));
        let found = again.take(BACKWARD, &entry(1, &[&["SET", "k", "b"]], false));
        assert_eq!(found.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(CONFLICT_LOG);
        append(&log, &found, LOG_MAX_BYTES).unwrap();
        let mut third = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Standalone);
        third.restore(serde_json::from_str(&state).unwrap());
        third.logged = logged_pairs(&log);
        assert_eq!(third.logged.len(), 1);
        assert!(third
            .take(BACKWARD, &entry(1, &[&["SET", "k", "b"]], false))
            .is_empty());
        // Not appended again, but counted: the saved count was from before.
        assert_eq!(third.refound, 1);
        assert!(third.logged.is_empty(), "the restart's set only shrinks");
        assert_eq!(
            unhex(&hex(b"\x00\xffk")).unwrap(),
            Bytes::from_static(b"\x00\xffk")
        );
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;
    use crate::redis::cluster::tag_for_slot;

    fn entry(id: u64, commands: &[&[&str]]) -> WalEntry {
        super::tests::entry(id, commands, commands.len() > 1)
    }

    /// A piece of the other direction's partition `q` in `key`'s slot,
    /// applied through `applied`.
    fn piece(id: u64, q: u32, key: &str, applied: u64) -> WalEntry {
        let slot = key_hash_slot(key.as_bytes());
        let checkpoint = format!("__ferry:checkpoint:d:{q}:{}", tag_for_slot(slot));
        let value = format!("v2 applied={applied} epoch=1 log=00000000000000aa");
        entry(id, &[&["INCR", key], &["SET", &checkpoint, &value]])
    }

    #[test]
    fn between_clusters_seen_is_per_partition_and_slot() {
        let mut d = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Clusters);
        let (a0, a1) = (PartitionId(0), PartitionId(1));
        let (b0, b1) = (PartitionId(1000), PartitionId(1001));
        // k on A's shard 0 and B's shard 1001; other on A's 1 and B's 1000.
        assert!(d.take(a0, &entry(1, &[&["SET", "k", "a"]])).is_empty());
        assert!(d.take(a1, &entry(1, &[&["SET", "other", "a"]])).is_empty());
        // B applied A0 through 1 in k's slot: B's later write of k saw it.
        assert!(d.take(b1, &piece(1, 0, "k", 1)).is_empty());
        assert!(d.take(b1, &entry(2, &[&["SET", "k", "b"]])).is_empty());
        // B's write of other did not see A1's (B applied A1 in another
        // slot only): a conflict, whatever B's shard 1001 saw.
        assert!(d.take(b0, &piece(1, 1, "elsewhere", 5)).is_empty());
        let found = d.take(b0, &entry(2, &[&["SET", "other", "b"]]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "other");
        assert_eq!((found[0].source.partition, found[0].source.log_id), (1, 1));
        assert_eq!(
            (found[0].target.partition, found[0].target.log_id),
            (1000, 2)
        );
        // A's shard 0 writes k again having applied B1001 through 1 only
        // in k's slot (not B's write at 2): a conflict with it.
        assert!(d.take(a0, &piece(2, 1001, "k", 1)).is_empty());
        let found = d.take(a0, &entry(3, &[&["SET", "k", "a2"]]));
        let pairs: Vec<(u64, u32, u64)> = found
            .iter()
            .map(|c| (c.source.log_id, c.target.partition, c.target.log_id))
            .collect();
        assert_eq!(pairs, [(3, 1001, 2)]);
        // A floor (no slot) is no echo of a slot.
        assert!(d
            .take(
                a0,
                &entry(
                    4,
                    &[&[
                        "SET",
                        "__ferry:checkpoint:d:1001",
                        "v2 applied=99 epoch=1 log=00000000000000aa"
                    ]]
                )
            )
            .is_empty());
        assert_eq!(d.sides[0].seen(1001, key_hash_slot(b"k")), 1);
        // State round trip.
        let state = serde_json::to_string(&d.state()).unwrap();
        let mut again = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Clusters);
        again.restore(serde_json::from_str(&state).unwrap());
        assert_eq!(again.sides[0].seen(1001, key_hash_slot(b"k")), 1);
        assert_eq!(again.sides[1].len, d.sides[1].len);
    }
    /// A whole checkpoint of the other direction's partition `q`: a
    /// standalone side's echo (a cluster side's floor has the same shape).
    fn whole(id: u64, q: u32, key: &str, applied: u64) -> WalEntry {
        let checkpoint = format!("__ferry:checkpoint:d:{q}");
        let value = format!("v2 applied={applied} epoch=0 log=00000000000000aa");
        entry(id, &[&["INCR", key], &["SET", &checkpoint, &value]])
    }

    /// A standalone A and a cluster B: what A has seen of each of B's
    /// partitions is one number for every slot (its echoes are whole
    /// checkpoints), what B has seen of A's one partition is per slot (its
    /// echoes are slot checkpoints; its floors say nothing).
    #[test]
    fn a_standalone_source_and_a_cluster_target() {
        assert_ne!(key_hash_slot(b"k"), key_hash_slot(b"other"));
        assert_ne!(key_hash_slot(b"other"), key_hash_slot(b"elsewhere"));
        let mut d = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::StandaloneCluster);
        let a = PartitionId(0);
        let (b0, b1) = (PartitionId(1000), PartitionId(1001));
        assert!(d.take(a, &entry(1, &[&["SET", "k", "a"]])).is_empty());
        assert!(d.take(a, &entry(2, &[&["SET", "other", "a"]])).is_empty());
        // B's shard 1001 applied A through 2 in k's slot: its write of k
        // saw A's.
        assert!(d.take(b1, &piece(1, 0, "k", 2)).is_empty());
        assert!(d.take(b1, &entry(2, &[&["SET", "k", "b"]])).is_empty());
        // B's shard 1000 applied A through 2 in another slot only (and a
        // floor says nothing): its write of other did not see A's.
        assert!(d.take(b0, &piece(1, 0, "elsewhere", 2)).is_empty());
        assert!(d.take(b0, &whole(2, 0, "elsewhere", 2)).is_empty());
        let found = d.take(b0, &entry(3, &[&["SET", "other", "b"]]));
        let pairs: Vec<(u64, u32, u64)> = found
            .iter()
            .map(|c| (c.source.log_id, c.target.partition, c.target.log_id))
            .collect();
        assert_eq!(pairs, [(2, 1000, 3)]);
        // A applied B's 1000 through 3, one checkpoint for every slot: its
        // next write of other saw B's.
        assert!(d.take(a, &whole(3, 1000, "x", 3)).is_empty());
        assert!(d.take(a, &entry(4, &[&["SET", "other", "a2"]])).is_empty());
        // A has applied nothing of 1001: its write of k conflicts with B's.
        let found = d.take(a, &entry(5, &[&["SET", "k", "a3"]]));
        let pairs: Vec<(u64, u32, u64)> = found
            .iter()
            .map(|c| (c.source.log_id, c.target.partition, c.target.log_id))
            .collect();
        assert_eq!(pairs, [(5, 1001, 2)]);
        assert_eq!(d.sides[0].seen(1000, 0), 3);
        assert_eq!(d.sides[1].seen(0, key_hash_slot(b"k")), 2);
        assert_eq!(d.sides[1].seen(0, 0), 0);
        // A's echo of 1001 makes B's write of k leave B's window, whatever
        // its slot.
        assert_eq!(d.sides[1].len, 1);
        assert!(d.take(a, &whole(6, 1001, "y", 2)).is_empty());
        assert_eq!(d.sides[1].len, 0);
        // State round trip: A's window by B's slots.
        let state = serde_json::to_string(&d.state()).unwrap();
        let mut again = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::StandaloneCluster);
        again.restore(serde_json::from_str(&state).unwrap());
        assert_eq!(again.sides[0].len, d.sides[0].len);
        again.sides[0].leave_through(0, key_hash_slot(b"k"), 5);
        assert!(again.sides[0]
            .by_key
            .keys()
            .all(|(_, key)| key.as_ref() != b"k"));
    }

    /// A cluster A and a standalone B: the same rule the other way round.
    #[test]
    fn a_cluster_source_and_a_standalone_target() {
        let mut d = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::ClusterStandalone);
        let (a0, a1) = (PartitionId(0), PartitionId(1));
        let b = PartitionId(1000);
        assert!(!d.pair.is_backward(a1) && d.pair.is_backward(b));
        assert!(d.take(a0, &entry(1, &[&["SET", "k", "a"]])).is_empty());
        assert!(d.take(a1, &entry(1, &[&["SET", "other", "a"]])).is_empty());
        // B applied A's shard 0 through 1 (whole): B's write of k saw A's,
        // its write of other did not see A's shard 1.
        assert!(d.take(b, &whole(1, 0, "x", 1)).is_empty());
        assert!(d.take(b, &entry(2, &[&["SET", "k", "b"]])).is_empty());
        let found = d.take(b, &entry(3, &[&["SET", "other", "b"]]));
        let pairs: Vec<(u32, u64, u64)> = found
            .iter()
            .map(|c| (c.source.partition, c.source.log_id, c.target.log_id))
            .collect();
        assert_eq!(pairs, [(1, 1, 3)]);
        // A's shard 1 applied B through 3 in other's slot: its next write
        // of other saw B's; A's shard 0 saw nothing of B in k's slot.
        assert!(d.take(a1, &piece(2, 1000, "other", 3)).is_empty());
        assert!(d.take(a1, &entry(3, &[&["SET", "other", "a2"]])).is_empty());
        let found = d.take(a0, &entry(2, &[&["SET", "k", "a2"]]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].source.log_id, found[0].target.log_id), (2, 2));
        // A floor on the cluster side A is no echo of a slot.
        assert!(d.take(a0, &whole(3, 1000, "y", 9)).is_empty());
        assert_eq!(d.sides[0].seen(1000, key_hash_slot(b"k")), 0);
        assert_eq!(d.sides[1].seen(0, 0), 1);
    }

    /// A winner policy's repair between clusters waits for the winner's
    /// own partition (the master's log holding the winning write), on the
    /// side where that write was applied last.
    #[test]
    fn between_clusters_a_repair_waits_for_the_winners_partition() {
        for (policy, want) in [
            (ConflictPolicy::SourceWins, (1, 2, 7)),
            (ConflictPolicy::TargetWins, (0, 1001, 4)),
        ] {
            let mut d = Detector::new(["d", "d"], OwnedKeyspace::all(), Pair::Clusters);
            d.policy = policy;
            assert!(d
                .take(PartitionId(2), &entry(7, &[&["SET", "k", "a"]]))
                .is_empty());
            let found = d.take(PartitionId(1001), &entry(4, &[&["SET", "k", "b"]]));
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(d.repairs.waits(), [want], "{policy:?}");
            assert_eq!(
                unhex(&d.repairs.to_vec()[0].key).unwrap(),
                Bytes::from_static(b"k")
            );
        }
    }
}
