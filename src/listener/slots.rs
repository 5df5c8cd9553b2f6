//! The slot table of a cluster source: which partition each hash slot
//! belongs to in the log, and since which handoff (docs/cluster.md, "The
//! listener's slot table").
//!
//! In: the first topology (every slot owned by its shard's partition,
//! generation 0) and the handoff records made durable since. Out: the slot
//! tenure of each write a partition logs ([`SlotTable::tenure`]), the
//! tenures and handoffs of its snapshot markers, and the file
//! `<data-dir>/cluster-slots` that keeps it across restarts, replaced
//! atomically (like the shard map) each time a handoff is recorded.
//!
//! It also keeps the **receivers** of each slot (docs/cluster.md, rule 9):
//! the partitions that logged a write of the slot's next tenure without
//! owning it, each with that tenure, until the slot is handed to them or
//! their tenure is voided (their import was aborted). A void makes the
//! slot's next tenure one higher ([`SlotOwner::next`]).
//!
//! File format, one line per run of slots with the same owner, generation,
//! origin and next tenure, after a `v2` header line, then one line per
//! receiver:
//!
//! ```text
//! v2
//! 0-5460 0 0 - 0
//! 5461 2 1 1 5120
//! 5462 1 0 - 0 2
//! r 5462 2 1
//! ```
//!
//! (`first[-last] owner gen from log [next]`: `from` is `-` for none, `log`
//! the log id of the handoff record in `from`'s log, 0 for none, `next`
//! the next tenure when it is not `gen + 1`; `r slot partition gen`.) Every
//! slot appears exactly once; anything else is a typed error naming the
//! line. A `v1` file (no `next`, no receivers) is read too.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::record::{SlotHandoff, SlotVoid};
use crate::redis::cluster::SlotRanges;
use crate::redis::command::CLUSTER_SLOTS;

/// Name of the slot table file in the listener's data dir.
pub const SLOT_TABLE_FILE: &str = "cluster-slots";

/// Longest slot table file read (16384 single-slot lines of four numbers
/// fit in well under 1 MiB).
const MAX_TABLE_BYTES: u64 = 2 << 20;

const SLOTS: usize = CLUSTER_SLOTS as usize;

/// Why the slot table could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SlotTableError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// One slot's place in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotOwner {
    /// The partition whose log carries the slot now.
    pub owner: u32,
    /// Handoffs of the slot so far (its current tenure).
    pub gen: u64,
    /// The partition that handed it to `owner`, if any.
    pub from: Option<u32>,
    /// The log id of that handoff record in `from`'s log (0: none).
    pub log_id: u64,
    /// The tenure the next owner gets, and the tag of writes of partitions
    /// receiving the slot: `gen + 1`, higher after voids (rule 9).
    pub next: u64,
}

/// Every slot's owner (module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTable {
    slots: Vec<SlotOwner>,
    /// (slot, partition, tenure) of the partitions receiving a slot.
    receivers: std::collections::BTreeSet<(u16, u32, u64)>,
}

impl SlotTable {
    /// The table of a first start: each slot owned by `owner_of(slot)` at
    /// generation 0; `None` if some slot has no owner.
    pub fn initial(owner_of: impl Fn(u16) -> Option<u32>) -> Option<SlotTable> {
        let mut slots = Vec::with_capacity(SLOTS);
        for slot in 0..CLUSTER_SLOTS {
            slots.push(SlotOwner {
                owner: owner_of(slot)?,
                gen: 0,
                from: None,
                log_id: 0,
                next: 1,
            });
        }
        Some(SlotTable {
            slots,
            receivers: Default::default(),
        })
    }

    pub fn get(&self, slot: u16) -> SlotOwner {
        self.slots[usize::from(slot) % SLOTS]
    }

    /// The tenure a write of `slot` logged by `partition` belongs to: the
    /// current one when the partition owns the slot, else the one it has
    /// been receiving the slot in, if any, else the next one.
    pub fn tenure(&self, partition: u32, slot: u16) -> u64 {
        let owner = self.get(slot);
        if owner.owner == partition {
            owner.gen
        } else {
            self.receiving(slot, partition).unwrap_or(owner.next)
        }
    }

    /// The tenure `partition` has been receiving `slot` in (its writes of
    /// the slot are tagged with it until it owns the slot or the tenure is
    /// voided): the lowest of its receivers' above the owner's.
    pub fn receiving(&self, slot: u16, partition: u32) -> Option<u64> {
        self.receiving_above(slot, partition, self.get(slot).gen)
    }

    /// The lowest tenure above `gen` `partition` has been receiving `slot`
    /// in.
    pub fn receiving_above(&self, slot: u16, partition: u32, gen: u64) -> Option<u64> {
        self.receivers
            .range((slot, partition, gen + 1)..=(slot, partition, u64::MAX))
            .next()
            .map(|&(_, _, gen)| gen)
    }

    /// Records that `partition` logs a write of `slot` in tenure `gen`
    /// without owning it; returns whether it is new (the table must then
    /// be saved before that write is appended).
    pub fn add_receiver(&mut self, slot: u16, partition: u32, gen: u64) -> bool {
        self.receivers.insert((slot, partition, gen))
    }

    /// The receivers the table does not name as the owner of their slot:
    /// (slot, partition, tenure).
    pub fn receivers(&self) -> Vec<(u16, u32, u64)> {
        self.receivers
            .iter()
            .copied()
            .filter(|&(slot, partition, _)| self.get(slot).owner != partition)
            .collect()
    }

    /// Voids tenure `void.gen` of `void.slot` for `partition` (rule 9): the
    /// slot's next tenure goes past it. Returns whether the table changed.
    pub fn void(&mut self, partition: u32, void: &SlotVoid) -> bool {
        let index = usize::from(void.slot) % SLOTS;
        let mut changed = self.receivers.remove(&(void.slot, partition, void.gen));
        let owner = &mut self.slots[index];
        if owner.next <= void.gen {
            owner.next = void.gen + 1;
            changed = true;
        }
        changed
    }

    /// The slots `partition` owns.
    pub fn owned_by(&self, partition: u32) -> SlotRanges {
        self.ranges_where(|_, o| o.owner == partition)
    }

    /// The tenures of `scope`'s slots for a marker of `partition`, grouped
    /// by generation.
    pub fn tenures(&self, partition: u32, scope: &SlotRanges) -> Vec<(SlotRanges, u64)> {
        let mut by_gen: std::collections::BTreeMap<u64, SlotRanges> = Default::default();
        for &(first, last) in scope.ranges() {
            for slot in first..=last {
                by_gen
                    .entry(self.tenure(partition, slot))
                    .or_default()
                    .insert_range(slot, slot);
            }
        }
        by_gen
            .into_iter()
            .map(|(gen, slots)| (slots, gen))
            .collect()
    }

    /// The slots `partition` handed over last with a record at or below log
    /// id `up_to`, as the handoffs a load of its marker at `up_to` applies
    /// (a record after the marker is applied after the load, in log order).
    pub fn handoffs_from(&self, partition: u32, up_to: u64) -> Vec<SlotHandoff> {
        (0..CLUSTER_SLOTS)
            .filter_map(|slot| {
                let o = self.get(slot);
                (o.from == Some(partition) && o.log_id <= up_to).then_some(SlotHandoff {
                    slot,
                    to: o.owner,
                    gen: o.gen,
                })
            })
            .collect()
    }

    /// Records a durable handoff made by `from`, its record at `log_id` in
    /// `from`'s log. Returns whether the table changed: a handoff of a
    /// generation already recorded (a record made again after a crash)
    /// changes nothing.
    pub fn hand_off(&mut self, from: u32, handoff: &SlotHandoff, log_id: u64) -> bool {
        let index = usize::from(handoff.slot) % SLOTS;
        let current = self.slots[index];
        if handoff.gen <= current.gen {
            return false;
        }
        self.slots[index] = SlotOwner {
            owner: handoff.to,
            gen: handoff.gen,
            from: Some(from),
            log_id,
            // A tenure voided for another receiver stays passed.
            next: current.next.max(handoff.gen + 1),
        };
        // The new owner's writes of the tenure it got are its own now.
        self.receivers.retain(|&(slot, partition, gen)| {
            !(slot == handoff.slot && partition == handoff.to && gen <= handoff.gen)
        });
        true
    }

    fn ranges_where(&self, keep: impl Fn(u16, &SlotOwner) -> bool) -> SlotRanges {
        let mut ranges = SlotRanges::new();
        for slot in 0..CLUSTER_SLOTS {
            if keep(slot, &self.get(slot)) {
                ranges.insert_range(slot, slot);
            }
        }
        ranges
    }

    /// Reads the table; a missing file is `None`.
    pub fn load(path: &Path) -> Result<Option<SlotTable>, SlotTableError> {
        use std::io::Read;
        let io = |error| SlotTableError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io(error)),
        };
        let mut text = String::new();
        file.take(MAX_TABLE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        let parse_error = |line, reason: String| SlotTableError::Parse {
            path: path.to_path_buf(),
            line,
            reason,
        };
        if text.len() as u64 > MAX_TABLE_BYTES {
            return Err(parse_error(
                0,
                format!("longer than {MAX_TABLE_BYTES} bytes"),
            ));
        }
        SlotTable::parse(&text)
            .map(Some)
            .map_err(|(line, reason)| parse_error(line, reason))
    }

    fn parse(text: &str) -> Result<SlotTable, (usize, String)> {
        let mut lines = text.lines().enumerate();
        let v2 = match lines.next() {
            Some((_, "v1")) => false,
            Some((_, "v2")) => true,
            Some((_, other)) => {
                return Err((1, format!("expected the header v1 or v2, found {other:?}")))
            }
            None => return Err((1, "empty".into())),
        };
        let mut slots: Vec<Option<SlotOwner>> = vec![None; SLOTS];
        let mut receivers = std::collections::BTreeSet::new();
        for (i, line) in lines {
            let number = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(' ').collect();
            if v2 && fields.first() == Some(&"r") {
                let [_, slot, partition, gen] = fields[..] else {
                    return Err((
                        number,
                        format!("expected `r slot partition gen`, found {line:?}"),
                    ));
                };
                let slot = slot
                    .parse::<u16>()
                    .ok()
                    .filter(|s| *s < CLUSTER_SLOTS)
                    .ok_or_else(|| (number, format!("receiver slot {slot:?} is not a slot")))?;
                let partition: u32 = partition.parse().map_err(|_| {
                    (
                        number,
                        format!("receiver {partition:?} is not a partition id"),
                    )
                })?;
                let gen: u64 = gen.parse().map_err(|_| {
                    (
                        number,
                        format!("receiver generation {gen:?} is not a number"),
                    )
                })?;
                receivers.insert((slot, partition, gen));
                continue;
            }
            let (range, owner, gen, from, log_id, next) = match fields[..] {
                [range, owner, gen, from, log_id] => (range, owner, gen, from, log_id, None),
                [range, owner, gen, from, log_id, next] if v2 => {
                    (range, owner, gen, from, log_id, Some(next))
                }
                _ => return Err((number, format!("expected 5 fields, found {}", fields.len()))),
            };
            let log_id: u64 = log_id
                .parse()
                .map_err(|_| (number, format!("log id {log_id:?} is not a number")))?;
            let range = SlotRanges::parse(range).map_err(|e| (number, e))?;
            let owner: u32 = owner
                .parse()
                .map_err(|_| (number, format!("owner {owner:?} is not a partition id")))?;
            let gen: u64 = gen
                .parse()
                .map_err(|_| (number, format!("generation {gen:?} is not a number")))?;
            let from = match from {
                "-" => None,
                from => Some(
                    from.parse::<u32>()
                        .map_err(|_| (number, format!("from {from:?} is not a partition id")))?,
                ),
            };
            let next = match next {
                None => gen + 1,
                Some(next) => next
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > gen)
                    .ok_or_else(|| (number, format!("next tenure {next:?} is not above {gen}")))?,
            };
            for &(first, last) in range.ranges() {
                for slot in first..=last {
                    let place = &mut slots[usize::from(slot)];
                    if place.is_some() {
                        return Err((number, format!("slot {slot} appears twice")));
                    }
                    *place = Some(SlotOwner {
                        owner,
                        gen,
                        from,
                        log_id,
                        next,
                    });
                }
            }
        }
        let mut out = Vec::with_capacity(SLOTS);
        for (slot, owner) in slots.into_iter().enumerate() {
            out.push(owner.ok_or_else(|| (0, format!("slot {slot} is missing")))?);
        }
        Ok(SlotTable {
            slots: out,
            receivers,
        })
    }

    fn render(&self) -> String {
        let mut text = String::from("v2\n");
        let mut start = 0usize;
        while start < SLOTS {
            let owner = self.slots[start];
            let mut end = start;
            while end + 1 < SLOTS && self.slots[end + 1] == owner {
                end += 1;
            }
            let range = if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            };
            let from = owner.from.map_or("-".to_string(), |f| f.to_string());
            let next = if owner.next == owner.gen + 1 {
                String::new()
            } else {
                format!(" {}", owner.next)
            };
            let _ = writeln!(
                text,
                "{range} {} {} {from} {}{next}",
                owner.owner, owner.gen, owner.log_id
            );
            start = end + 1;
        }
        for (slot, partition, gen) in &self.receivers {
            let _ = writeln!(text, "r {slot} {partition} {gen}");
        }
        text
    }

    /// Replaces the file atomically (temporary file, fsync, rename, dir
    /// fsync).
    pub fn save(&self, path: &Path) -> Result<(), SlotTableError> {
        super::cluster::write_atomically(path, self.render().as_bytes()).map_err(|error| {
            SlotTableError::Io {
                path: path.to_path_buf(),
                error,
            }
        })
    }
}

/// The tenure of a write of a slot by `partition`, which does not own it
/// in the table (`owner` does): the next one (`owner.next`, past any
/// voided tenure), or, when `owner`'s handoff of
/// the slot to another partition is detected but not logged yet
/// (`pending`), the one after it. A slot moved A → B → C, C's first writes
/// arriving while A's handoff to B still waits for A's stream to reach its
/// offset, are C's tenure (gen + 2), not B's: tagged gen + 1 they would be
/// held for a tenure that never comes (docs/cluster.md, rule 1).
///
/// A partition already receiving the slot keeps its tenure (`receiving`,
/// [`SlotTable::receiving`]): one run of writes into a shard is one
/// tenure, even when another receiver's void moves the slot's next tenure
/// meanwhile (A -> B -> C with B's pass voided: C's first and later writes
/// alike are C's tenure, which the handoff to C opens).
pub fn receiving_tenure(
    owner: SlotOwner,
    pending: Option<SlotHandoff>,
    partition: u32,
    receiving: Option<u64>,
) -> u64 {
    if let Some(gen) = receiving {
        return gen;
    }
    match pending {
        Some(handoff) if handoff.gen > owner.gen && handoff.to != u32::MAX => {
            if handoff.to == partition {
                handoff.gen
            } else {
                handoff.gen + 1
            }
        }
        _ => owner.next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_shards() -> SlotTable {
        SlotTable::initial(|slot| Some(u32::from(slot / 5462))).unwrap()
    }

    #[test]
    fn tenures_follow_handoffs_and_repeated_records_change_nothing() {
        let mut table = three_shards();
        assert_eq!(table.tenure(0, 10), 0);
        // Partition 1 receiving slot 10 writes in the next tenure.
        assert_eq!(table.tenure(1, 10), 1);
        let handoff = SlotHandoff {
            slot: 10,
            to: 1,
            gen: 1,
        };
        assert!(table.hand_off(0, &handoff, 40));
        assert!(!table.hand_off(0, &handoff, 41));
        assert_eq!(table.tenure(1, 10), 1);
        // The old owner would only get it back in a later tenure.
        assert_eq!(table.tenure(0, 10), 2);
        assert_eq!(table.handoffs_from(0, u64::MAX), [handoff]);
        assert_eq!(table.handoffs_from(0, 40), [handoff]);
        // A marker before the record leaves it to the log.
        assert!(table.handoffs_from(0, 39).is_empty());
        assert!(table.handoffs_from(1, u64::MAX).is_empty());
        assert!(!table.owned_by(0).contains(10));
        assert!(table.owned_by(1).contains(10));
        let scope = SlotRanges::from_ranges([(9, 11)]);
        assert_eq!(
            table.tenures(0, &scope),
            [
                (SlotRanges::from_ranges([(9, 9), (11, 11)]), 0),
                (SlotRanges::from_ranges([(10, 10)]), 2)
            ]
        );
    }

    #[test]
    fn a_void_moves_the_next_tenure_past_it_and_the_file_keeps_it() {
        let mut table = three_shards();
        // Partition 1 receives slot 10 in tenure 1.
        assert_eq!(table.tenure(1, 10), 1);
        assert!(table.add_receiver(10, 1, 1));
        assert!(!table.add_receiver(10, 1, 1));
        assert_eq!(table.receivers(), [(10, 1, 1)]);
        let text = table.render();
        assert!(text.ends_with("r 10 1 1\n"), "{text}");
        assert_eq!(SlotTable::parse(&text).unwrap(), table);
        // Its import is aborted: tenure 1 is voided, receivers tag 2 now,
        // the owner keeps its tenure, and the next handoff opens 2.
        let void = SlotVoid { slot: 10, gen: 1 };
        assert!(table.void(1, &void));
        assert!(!table.void(1, &void), "a void twice changes nothing");
        assert!(table.receivers().is_empty());
        assert_eq!(table.tenure(0, 10), 0);
        assert_eq!(table.tenure(1, 10), 2);
        assert_eq!(table.tenure(2, 10), 2);
        let text = table.render();
        assert!(text.contains("\n10 0 0 - 0 2\n"), "{text}");
        assert_eq!(SlotTable::parse(&text).unwrap(), table);
        // A handoff to a receiver drops it; others stay.
        table.add_receiver(10, 1, 2);
        table.add_receiver(10, 2, 2);
        assert!(table.hand_off(
            0,
            &SlotHandoff {
                slot: 10,
                to: 1,
                gen: 2
            },
            9
        ));
        assert_eq!(table.receivers(), [(10, 2, 2)]);
        assert_eq!(table.tenure(2, 10), 3);
        // A v1 file (before receivers) is read.
        let v1 = "v1\n0-16383 0 0 - 0\n";
        assert_eq!(SlotTable::parse(v1).unwrap().tenure(1, 5), 1);
    }

    #[test]
    fn a_receiver_counts_the_owners_handoff_still_to_be_logged() {
        let mut table = three_shards();
        let owner = table.get(10);
        // Nothing pending: the next tenure.
        assert_eq!(receiving_tenure(owner, None, 1, None), 1);
        // 0 -> 1 detected, not logged yet: 1 receives in tenure 1, and 2,
        // receiving after 1 (a slot moved 0 -> 1 -> 2), in tenure 2.
        let to_1 = SlotHandoff {
            slot: 10,
            to: 1,
            gen: 1,
        };
        assert_eq!(receiving_tenure(owner, Some(to_1), 1, None), 1);
        assert_eq!(receiving_tenure(owner, Some(to_1), 2, None), 2);
        // Once logged the table says the same.
        assert!(table.hand_off(0, &to_1, 40));
        assert_eq!(table.tenure(2, 10), 2);
        assert_eq!(receiving_tenure(table.get(10), None, 2, None), 2);
        // A pending handoff of an older generation (already in the table)
        // or with no receiver known counts for nothing.
        assert_eq!(receiving_tenure(table.get(10), Some(to_1), 2, None), 2);
        let unknown = SlotHandoff {
            slot: 10,
            to: u32::MAX,
            gen: 2,
        };
        assert_eq!(receiving_tenure(table.get(10), Some(unknown), 2, None), 2);
    }

    #[test]
    fn a_receiver_keeps_its_tenure_and_its_handoff_opens_it_past_anothers_void() {
        let mut table = three_shards();
        // Slot 10 went 0 -> 1 -> 2 before the listener saw it on 1: both
        // received it in tenure 1.
        assert!(table.add_receiver(10, 1, table.tenure(1, 10)));
        assert!(table.add_receiver(10, 2, table.tenure(2, 10)));
        assert_eq!(table.receiving(10, 2), Some(1));
        // 1 gave every key on: its pass is voided, the next tenure is 2 ...
        assert!(table.void(1, &SlotVoid { slot: 10, gen: 1 }));
        assert_eq!(table.get(10).next, 2);
        // ... but 2 goes on writing in the tenure it has been receiving in,
        // a newcomer takes the next one,
        assert_eq!(table.tenure(2, 10), 1);
        assert_eq!(
            receiving_tenure(table.get(10), None, 2, table.receiving(10, 2)),
            1
        );
        assert_eq!(table.tenure(0, 10), 0);
        assert_eq!(table.receiving(10, 1), None);
        // and the handoff to 2 opens tenure 1 without lowering the next.
        let handoff = SlotHandoff {
            slot: 10,
            to: 2,
            gen: 1,
        };
        assert!(table.hand_off(0, &handoff, 7));
        assert_eq!(table.get(10).next, 2);
        assert_eq!(table.tenure(2, 10), 1);
        assert_eq!(table.receiving(10, 2), None, "an owner receives no more");
        assert_eq!(table.tenure(1, 10), 2);
    }

    #[test]
    fn the_file_round_trips_and_bad_files_name_the_line() {
        let mut table = three_shards();
        table.hand_off(
            2,
            &SlotHandoff {
                slot: 16383,
                to: 0,
                gen: 1,
            },
            77,
        );
        let text = table.render();
        assert!(text.starts_with("v2\n0-5461 0 0 - 0\n"), "{text}");
        assert!(
            text.ends_with("10924-16382 2 0 - 0\n16383 0 1 2 77\n"),
            "{text}"
        );
        assert_eq!(SlotTable::parse(&text).unwrap(), table);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SLOT_TABLE_FILE);
        assert!(SlotTable::load(&path).unwrap().is_none());
        table.save(&path).unwrap();
        assert_eq!(SlotTable::load(&path).unwrap(), Some(table));

        for (text, line, why) in [
            ("v3\n", 1, "header"),
            ("v1\n0-16383 0 0 - 0 2\n", 2, "5 fields"),
            ("v1\n0-16383 0 0 - 0\nr 1 2 3\n", 3, "5 fields"),
            ("v2\n0-16383 0 0 - 0 0\n", 2, "not above"),
            ("v2\n0-16383 0 0 - 0\nr 16384 2 3\n", 3, "not a slot"),
            ("v2\n0-16383 0 0 - 0\nr 1 x 3\n", 3, "partition id"),
            ("v1\n0-16383 0 0 -\n", 2, "5 fields"),
            ("v1\n0-16383 x 0 - 0\n", 2, "partition id"),
            ("v1\n0-16383 0 0 - x\n", 2, "log id"),
            ("v1\n0-16383 0 0 - 0\n5 1 0 - 0\n", 3, "twice"),
            ("v1\n0-16382 0 0 - 0\n", 0, "slot 16383 is missing"),
            ("v1\n0-16384 0 0 - 0\n", 2, ""),
        ] {
            let (at, reason) = SlotTable::parse(text).unwrap_err();
            assert_eq!(at, line, "{text:?}: {reason}");
            assert!(reason.contains(why), "{text:?}: {reason}");
        }
    }
}
