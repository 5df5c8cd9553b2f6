//! Slot tenures of a Redis Cluster source on the target: the owner map and
//! the decisions the applier takes from it (docs/cluster.md, "The rule:
//! slot tenures", rules 4 to 6).
//!
//! In: a write's [`SlotTenure`] tag, a [`SlotHandoff`] record, a snapshot
//! marker's `tenures` and `handoffs`, and the owner map read from the
//! target. Out: what to do with the entry ([`decide`]), what a load does
//! per slot ([`plan_load`]), and the command that raises the map
//! ([`raise_command`]), which the applier sends inside the `MULTI` that
//! moves its checkpoint past the record (or writes `loading=M`).
//!
//! # The owner map
//!
//! Key `__ferry:slots:<drainer-id>` ([`owner_map_key`]) in db 0, a hash:
//! field = the slot in decimal, value = `<partition> <gen>`. Absent: the
//! slot was never loaded by any partition of this drainer. It is shared by
//! every partition of the drainer (they apply into the same target) and is
//! only ever *raised*: [`RAISE_SCRIPT`] sets a slot only when its stored
//! generation is lower or absent, so a handoff or a load applied twice
//! (a crash between the `EXEC` and the applier learning about it, a
//! duplicate record) changes nothing. A value that is not `<partition>
//! <gen>` makes the script fail (inside `EXEC`: the applier's own command
//! refused, which stops it) and the applier's read refuse it: a map
//! damaged by hand is never guessed at.
//!
//! # Why an in-memory copy is enough
//!
//! The applier reads the map at the start of every session and keeps a
//! copy, raised by its own handoffs as it batches them. A write of
//! partition P tagged for slot `s` is applied when the map names P as the
//! owner of `s`, else held (HANDOFF) while the slot is read again every
//! [`HOLD_POLL`] (rule 4: the owner decides, not the tag's generation).
//! The copy is exact for these decisions: P's entries of `s` all precede
//! P's own handoff of `s`, so while P is at one of them only a handoff *to*
//! P can change what the map says for `s` (which the hold reads), and
//! nothing can take `s` from P before P passes its handoff. A batch
//! replayed after a crash is therefore decided the same way.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use crate::record::{SlotHandoff, SlotTenure, SnapshotMarker, INTERNAL_PREFIX};
use crate::redis::cluster::SlotRanges;
use crate::redis::command::{Command, CLUSTER_SLOTS};
use crate::redis::resp::Frame;

/// How often a partition held for a handoff reads the map again.
pub const HOLD_POLL: Duration = Duration::from_millis(200);

/// Longest map value accepted (`<u32> <u64>`).
const MAX_VALUE_LEN: usize = 32;

/// How far a partition held for a handoff reads ahead for handoff records
/// it can apply (the applier's `raise_handoffs_ahead`): entries held in
/// memory, and their bytes.
pub const HOLD_LOOKAHEAD_ENTRIES: usize = 100_000;
pub const HOLD_LOOKAHEAD_BYTES: usize = 64 << 20;

/// Raises slots of the owner map `KEYS[1]`: `ARGV` is a list of triples
/// `slot partition gen`; each slot is set to `"<partition> <gen>"` unless
/// its stored generation is already `gen` or more. Returns how many slots
/// it set. A stored value that is not `<partition> <gen>` is an error.
pub const RAISE_SCRIPT: &str = r#"
local set = 0
for i = 1, #ARGV, 3 do
  local gen = tonumber(ARGV[i + 2])
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  local stored_gen = nil
  if stored then
    stored_gen = tonumber(string.match(stored, '^%d+ (%d+)$'))
    if not stored_gen then
      return redis.error_reply('ERR ferry owner map: slot ' .. ARGV[i] .. ' holds ' .. stored)
    end
  end
  if not stored_gen or stored_gen < gen then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[i + 2])
    set = set + 1
  end
end
return set
"#;

/// A slot's owner on the target: the partition and the generation of its
/// tenure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub partition: u32,
    pub gen: u64,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "partition {} generation {}", self.partition, self.gen)
    }
}

/// The key of `drainer_id`'s owner map (db 0).
pub fn owner_map_key(drainer_id: &str) -> Vec<u8> {
    let mut key = INTERNAL_PREFIX.to_vec();
    key.extend_from_slice(format!(":slots:{drainer_id}").as_bytes());
    key
}

/// Parses one map value, `<partition> <gen>`.
pub fn parse_owner(value: &[u8]) -> Result<Owner, String> {
    if value.len() > MAX_VALUE_LEN {
        return Err(format!("longer than {MAX_VALUE_LEN} bytes"));
    }
    let text = std::str::from_utf8(value).map_err(|_| "not UTF-8".to_string())?;
    let (partition, gen) = text
        .split_once(' ')
        .ok_or_else(|| format!("{text:?} is not \"<partition> <gen>\""))?;
    Ok(Owner {
        partition: partition
            .parse()
            .map_err(|_| format!("{text:?}: bad partition"))?,
        gen: gen
            .parse()
            .map_err(|_| format!("{text:?}: bad generation"))?,
    })
}

fn parse_slot(field: &[u8]) -> Result<u16, String> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|&s| s < CLUSTER_SLOTS)
        .ok_or_else(|| format!("field {:?} is not a slot", String::from_utf8_lossy(field)))
}

/// The applier's copy of the owner map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerMap(BTreeMap<u16, Owner>);

impl OwnerMap {
    /// Parses an `HGETALL` reply (a flat array in RESP2, a map in RESP3).
    pub fn from_reply(reply: &Frame) -> Result<OwnerMap, String> {
        let pairs: Vec<(&Frame, &Frame)> = match reply {
            Frame::Array(items) => {
                if items.len() % 2 != 0 {
                    return Err("HGETALL reply of odd length".into());
                }
                items.chunks(2).map(|p| (&p[0], &p[1])).collect()
            }
            Frame::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
            Frame::Null => Vec::new(),
            other => return Err(format!("HGETALL reply {other:?}")),
        };
        let mut map = OwnerMap::default();
        for (field, value) in pairs {
            let (Some(field), Some(value)) = (field.as_bytes(), value.as_bytes()) else {
                return Err("HGETALL reply holds a non-string".into());
            };
            map.0.insert(parse_slot(field)?, parse_owner(value)?);
        }
        Ok(map)
    }

    pub fn get(&self, slot: u16) -> Option<Owner> {
        self.0.get(&slot).copied()
    }

    /// Sets `slot` to `owner` unless it already has that generation or a
    /// later one (what [`RAISE_SCRIPT`] does on the target); returns
    /// whether it changed.
    pub fn raise(&mut self, slot: u16, owner: Owner) -> bool {
        match self.0.get(&slot) {
            Some(stored) if stored.gen >= owner.gen => false,
            _ => {
                self.0.insert(slot, owner);
                true
            }
        }
    }

    /// Takes what the target says about `slot` (`None`: absent).
    pub fn set_read(&mut self, slot: u16, owner: Option<Owner>) {
        match owner {
            Some(owner) => {
                self.0.insert(slot, owner);
            }
            None => {
                self.0.remove(&slot);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The `HGET` of one slot of the map.
pub fn read_slot_command(key: &Bytes, slot: u16) -> Command {
    Command::new(vec![
        Bytes::from_static(b"HGET"),
        key.clone(),
        Bytes::from(slot.to_string()),
    ])
}

/// The `EVAL` of [`RAISE_SCRIPT`] for `raises` (at least one).
pub fn raise_command(key: &Bytes, raises: &[(u16, Owner)]) -> Command {
    let mut args = Vec::with_capacity(4 + 3 * raises.len());
    args.push(Bytes::from_static(b"EVAL"));
    args.push(Bytes::from_static(RAISE_SCRIPT.as_bytes()));
    args.push(Bytes::from_static(b"1"));
    args.push(key.clone());
    for (slot, owner) in raises {
        args.push(Bytes::from(slot.to_string()));
        args.push(Bytes::from(owner.partition.to_string()));
        args.push(Bytes::from(owner.gen.to_string()));
    }
    Command::new(args)
}

/// What to do with a write of `partition` tagged `tenure` (rule 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The map names the partition as the slot's owner: apply it.
    Apply,
    /// The map is behind the write's tenure, or has none (`current`): hold
    /// until the handoff that opens it.
    Wait { current: Option<Owner> },
    /// The map is at or past the write's tenure and gives it to another
    /// partition, or is past it: the slot passed through this shard in a
    /// tenure the listener did not record (it moved on faster than the
    /// topology was read). Never applied out of order: held BLOCKED.
    Foreign { current: Owner },
}

/// Rule 4 for a write of `partition` tagged `tenure`, with `map`.
pub fn decide(map: &OwnerMap, partition: u32, tenure: SlotTenure) -> Decision {
    match map.get(tenure.slot) {
        Some(owner) if owner.partition == partition && owner.gen == tenure.gen => Decision::Apply,
        Some(owner) if owner.gen >= tenure.gen => Decision::Foreign { current: owner },
        current => Decision::Wait { current },
    }
}

/// A slot a load waits for (rule 6): the map does not name the partition
/// (and the slot is not claimed: absent with tenure 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadWait {
    pub slot: u16,
    pub gen: u64,
    pub current: Option<Owner>,
}

/// What the load of a marker with tenures does, slot by slot (rule 6).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadPlan {
    /// The first slot the load must wait for, if any: nothing else of the
    /// plan holds until it is gone.
    pub wait: Option<LoadWait>,
    /// Slots whose keys the load deletes and writes (claimed ones
    /// included); the RDB's keys of other slots are not written.
    pub load: SlotRanges,
    /// Slots of `handoffs` the map has not taken yet: their keys are
    /// deleted, then the map takes `handoffs`, before anything else of
    /// the load (so that a marker that hands a slot over and waits for it
    /// back does not wait for itself).
    pub handed_off: SlotRanges,
    pub handoffs: Vec<(u16, Owner)>,
    /// The slots claimed (absent, tenure 0), written with `loading=M`.
    pub claims: Vec<(u16, Owner)>,
}

/// Rule 6 for `marker` of `partition` (its `tenures` non-empty), with
/// `map`.
pub fn plan_load(map: &OwnerMap, partition: u32, marker: &SnapshotMarker) -> LoadPlan {
    let mut plan = LoadPlan::default();
    let mut load = Vec::new();
    for (ranges, gen) in &marker.tenures {
        for &(first, last) in ranges.ranges() {
            for slot in first..=last {
                match map.get(slot) {
                    Some(owner) if owner.partition == partition => load.push((slot, slot)),
                    None if *gen == 0 => {
                        plan.claims.push((slot, Owner { partition, gen: 0 }));
                        load.push((slot, slot));
                    }
                    current => {
                        plan.wait.get_or_insert(LoadWait {
                            slot,
                            gen: *gen,
                            current,
                        });
                    }
                }
            }
        }
    }
    let mut handed_off = Vec::new();
    for handoff in &marker.handoffs {
        let SlotHandoff { slot, to, gen } = *handoff;
        if !matches!(map.get(slot), Some(owner) if owner.gen >= gen) {
            handed_off.push((slot, slot));
            plan.handoffs.push((slot, Owner { partition: to, gen }));
        }
    }
    plan.load = SlotRanges::from_ranges(load);
    plan.handed_off = SlotRanges::from_ranges(handed_off);
    plan
}

/// `marker` without the slots of `voided` (slot, tenure) in its tenures:
/// their import was aborted after the marker (docs/cluster.md, rule 9), so
/// a load neither waits for them nor loads them.
pub fn without_voided(marker: &SnapshotMarker, voided: &[(u16, u64)]) -> SnapshotMarker {
    let mut out = marker.clone();
    out.tenures = marker
        .tenures
        .iter()
        .map(|(ranges, gen)| {
            let kept = ranges
                .ranges()
                .iter()
                .flat_map(|&(first, last)| first..=last)
                .filter(|slot| !voided.contains(&(*slot, *gen)))
                .map(|slot| (slot, slot));
            (SlotRanges::from_ranges(kept), *gen)
        })
        .filter(|(ranges, _)| !ranges.ranges().is_empty())
        .collect();
    out
}

/// The slots a flush of `partition`'s shard deletes: those of its
/// `scope` (its last marker's) that the map gives no other partition, and
/// every slot the map gives it. Without map entries: `scope`.
pub fn flush_slots(scope: &SlotRanges, map: &OwnerMap, partition: u32) -> SlotRanges {
    if map.is_empty() {
        return scope.clone();
    }
    SlotRanges::from_ranges((0..CLUSTER_SLOTS).filter_map(|slot| {
        let ours = match map.get(slot) {
            Some(owner) => owner.partition == partition,
            None => scope.contains(slot),
        };
        ours.then_some((slot, slot))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(partition: u32, gen: u64) -> Owner {
        Owner { partition, gen }
    }

    fn tag(slot: u16, gen: u64) -> SlotTenure {
        SlotTenure { slot, gen }
    }

    #[test]
    fn entries_are_decided_by_their_exact_tenure() {
        let mut map = OwnerMap::default();
        assert_eq!(decide(&map, 0, tag(7, 0)), Decision::Wait { current: None });
        map.raise(7, owner(0, 0));
        assert_eq!(decide(&map, 0, tag(7, 0)), Decision::Apply);
        // P1 receiving the slot waits for P0's handoff.
        assert_eq!(
            decide(&map, 1, tag(7, 1)),
            Decision::Wait {
                current: Some(owner(0, 0))
            }
        );
        // Another partition's tenure of the same generation: blocked.
        assert_eq!(
            decide(&map, 1, tag(7, 0)),
            Decision::Foreign {
                current: owner(0, 0)
            }
        );
        // P0's handoff to P1.
        assert!(map.raise(7, owner(1, 1)));
        assert!(
            !map.raise(7, owner(1, 1)),
            "a handoff twice changes nothing"
        );
        assert!(!map.raise(7, owner(0, 0)), "never lowered");
        assert_eq!(decide(&map, 1, tag(7, 1)), Decision::Apply);
        // A write of a tenure the map has passed (one the listener did
        // not record) is never applied, even by the owner of a later one.
        assert_eq!(
            decide(&map, 0, tag(7, 0)),
            Decision::Foreign {
                current: owner(1, 1)
            }
        );
        map.raise(7, owner(1, 3));
        assert_eq!(
            decide(&map, 1, tag(7, 2)),
            Decision::Foreign {
                current: owner(1, 3)
            }
        );
    }

    #[test]
    fn map_replies_parse_and_bad_ones_are_named() {
        let bulk = |s: &str| Frame::Bulk(Bytes::from(s.to_string()));
        let reply = Frame::Array(vec![bulk("7"), bulk("1 3"), bulk("16383"), bulk("0 0")]);
        let map = OwnerMap::from_reply(&reply).unwrap();
        assert_eq!(map.get(7), Some(owner(1, 3)));
        assert_eq!(map.get(16383), Some(owner(0, 0)));
        assert!(
            OwnerMap::from_reply(&Frame::Array(vec![bulk("16384"), bulk("0 0")]))
                .unwrap_err()
                .contains("not a slot")
        );
        assert!(
            OwnerMap::from_reply(&Frame::Array(vec![bulk("1"), bulk("0")]))
                .unwrap_err()
                .contains("<partition> <gen>")
        );
        assert!(OwnerMap::from_reply(&Frame::Array(vec![bulk("1")])).is_err());
        assert!(parse_owner(&[b'1'; 64]).unwrap_err().contains("longer"));
    }

    fn marker(tenures: Vec<(SlotRanges, u64)>, handoffs: Vec<SlotHandoff>) -> SnapshotMarker {
        SnapshotMarker {
            epoch: 1,
            rdb_bytes: 0,
            chunks: 0,
            replid: String::new(),
            offset: 0,
            scope: None,
            tenures,
            handoffs,
        }
    }

    #[test]
    fn a_load_waits_claims_and_loads_per_slot() {
        let mut map = OwnerMap::default();
        map.raise(3, owner(1, 0));
        map.raise(4, owner(1, 2));
        map.raise(5, owner(0, 1));
        let m = marker(
            vec![
                (SlotRanges::from_ranges([(0, 2)]), 0),
                (SlotRanges::from_ranges([(3, 3)]), 0),
                (SlotRanges::from_ranges([(4, 4)]), 1),
            ],
            vec![SlotHandoff {
                slot: 9,
                to: 2,
                gen: 1,
            }],
        );
        let plan = plan_load(&map, 1, &m);
        assert_eq!(plan.wait, None);
        // 0-2 claimed; 3 and 4 name partition 1 (whatever the
        // generation): loaded.
        assert_eq!(plan.load, SlotRanges::from_ranges([(0, 4)]));
        assert_eq!(plan.handed_off, SlotRanges::from_ranges([(9, 9)]));
        assert_eq!(
            plan.claims,
            [(0, owner(1, 0)), (1, owner(1, 0)), (2, owner(1, 0))]
        );
        assert_eq!(plan.handoffs, [(9, owner(2, 1))]);
        // Another partition's, or absent with a tenure above 0: wait.
        let m = marker(vec![(SlotRanges::from_ranges([(5, 5)]), 2)], vec![]);
        assert_eq!(
            plan_load(&map, 1, &m).wait,
            Some(LoadWait {
                slot: 5,
                gen: 2,
                current: Some(owner(0, 1))
            })
        );
        let m = marker(vec![(SlotRanges::from_ranges([(8, 8)]), 1)], vec![]);
        assert_eq!(
            plan_load(&map, 1, &m).wait,
            Some(LoadWait {
                slot: 8,
                gen: 1,
                current: None
            })
        );
        // A handoff the map already took is not done again.
        map.raise(9, owner(2, 1));
        let m = marker(
            vec![],
            vec![SlotHandoff {
                slot: 9,
                to: 2,
                gen: 1,
            }],
        );
        assert_eq!(plan_load(&map, 1, &m), LoadPlan::default());
    }

    #[test]
    fn a_load_neither_waits_for_nor_loads_a_voided_slot() {
        let mut map = OwnerMap::default();
        map.raise(5, owner(0, 0));
        // Partition 1's marker was taken while it imported slot 5 (tenure
        // 1); the import was aborted after it.
        let m = marker(
            vec![
                (SlotRanges::from_ranges([(0, 2)]), 0),
                (SlotRanges::from_ranges([(5, 5)]), 1),
            ],
            vec![],
        );
        assert_eq!(plan_load(&map, 1, &m).wait.map(|w| w.slot), Some(5));
        let plan = plan_load(&map, 1, &without_voided(&m, &[(5, 1)]));
        assert_eq!(plan.wait, None);
        assert_eq!(plan.load, SlotRanges::from_ranges([(0, 2)]));
        // Another tenure of the slot is not voided by it.
        assert_eq!(
            plan_load(&map, 1, &without_voided(&m, &[(5, 2)]))
                .wait
                .map(|w| w.slot),
            Some(5)
        );
    }

    #[test]
    fn a_flush_deletes_the_slots_the_map_gives_the_partition() {
        let scope = SlotRanges::from_ranges([(0, 9)]);
        let mut map = OwnerMap::default();
        assert_eq!(flush_slots(&scope, &map, 0), scope);
        map.raise(3, owner(1, 1)); // handed over
        map.raise(20, owner(0, 1)); // received
        map.raise(5, owner(0, 0));
        assert_eq!(
            flush_slots(&scope, &map, 0),
            SlotRanges::from_ranges([(0, 2), (4, 9), (20, 20)])
        );
    }

    #[test]
    fn the_raise_command_carries_triples() {
        let key = Bytes::from(owner_map_key("d"));
        assert_eq!(&key[..], b"__ferry:slots:d");
        let cmd = raise_command(&key, &[(7, owner(1, 2)), (8, owner(0, 0))]);
        let args: Vec<&[u8]> = cmd.args.iter().map(|a| a.as_ref()).collect();
        assert_eq!(args[0], b"EVAL");
        assert_eq!(
            &args[2..],
            [
                b"1".as_slice(),
                b"__ferry:slots:d",
                b"7",
                b"1",
                b"2",
                b"8",
                b"0",
                b"0"
            ]
        );
    }
}
