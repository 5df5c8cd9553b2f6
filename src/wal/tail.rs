//! The read tail: each partition's most recently committed entries, kept in
//! memory so that readers that are caught up (a shipper, an applier's
//! reader) get them without a storage read, its checksum and its copy.
//!
//! In: the entries of a batch, when the batch is handed to the storage
//! (before its fsync). Out: a read of `from..=until` within [`ReadLimits`],
//! answered exactly as the storage would answer it, or nothing when `from`
//! is not in the tail. Readers bound `until` by the durable end; only an
//! early reader ([`super::Wal::read_written`]) reads past it.
//!
//! The tail holds a contiguous run of ids ending at the partition's last
//! written id (an append that does not follow its last id, after a reset of
//! the log, starts it afresh). It is bounded in bytes per partition
//! ([`Tails::cap`]: payload, replid and a fixed overhead per entry); the
//! oldest entries leave first. A drainer's payloads are slices of the batch
//! they arrived in: the writer copies them before the tail keeps them, so
//! that it never keeps a whole batch alive. It never decides what
//! is readable: [`super::Wal::read`] checks the trimmed and durable bounds
//! first, so an entry the tail still holds below the log's first id is never
//! returned.

use std::collections::{HashMap, VecDeque};

use super::{ReadLimits, WalEntry};
use crate::position::{LogId, PartitionId};

/// The smallest share of the budget a partition gets, however many there
/// are: a caught-up reader of a busy partition reads a few batches behind.
const MIN_PARTITION_CAP: usize = 64 << 10;

/// What one entry counts against the budget besides its payload: the entry
/// itself, its replid and the allocator's share.
const ENTRY_OVERHEAD: usize = 128;

/// The bytes `entry` counts for.
fn charge(entry: &WalEntry) -> usize {
    entry.payload.len() + entry.source.replid.len() + ENTRY_OVERHEAD
}

/// One partition's tail.
#[derive(Debug, Default)]
struct Tail {
    entries: VecDeque<WalEntry>,
    /// What `entries` count for ([`charge`]).
    bytes: usize,
}

impl Tail {
    fn push(&mut self, entry: WalEntry) {
        if self
            .entries
            .back()
            .is_some_and(|last| last.log_id.next() != entry.log_id)
        {
            self.entries.clear();
            self.bytes = 0;
        }
        self.bytes += charge(&entry);
        self.entries.push_back(entry);
    }

    /// Drops the oldest entries while over `cap` bytes, and every entry below
    /// `first` (trimmed).
    fn shrink(&mut self, cap: usize, first: LogId) {
        while let Some(front) = self.entries.front() {
            if self.bytes <= cap && front.log_id >= first {
                break;
            }
            self.bytes -= charge(front);
            self.entries.pop_front();
        }
    }

    fn read(&self, from: LogId, until: LogId, limits: ReadLimits) -> Option<Vec<WalEntry>> {
        let first = self.entries.front()?.log_id;
        if from < first || from > until {
            return None;
        }
        let skip = usize::try_from(from.0 - first.0).ok()?;
        if skip >= self.entries.len() {
            return None;
        }
        // The storage's rule (`EntryCollector::is_done`): at most
        // `max_entries`, and no entry after `max_bytes` were reached.
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in self.entries.iter().skip(skip) {
            if entry.log_id > until
                || out.len() >= limits.max_entries
                || (!out.is_empty() && bytes >= limits.max_bytes)
            {
                break;
            }
            bytes += entry.payload.len();
            out.push(entry.clone());
        }
        Some(out)
    }
}

/// The tails of every partition of one WAL, within one byte budget.
#[derive(Debug, Default)]
pub(crate) struct Tails {
    budget: usize,
    tails: HashMap<PartitionId, Tail>,
}

impl Tails {
    /// Tails sharing `budget` bytes ([`charge`]); 0 keeps none.
    pub(crate) fn new(budget: usize) -> Tails {
        Tails {
            budget,
            tails: HashMap::new(),
        }
    }

    /// The bytes one partition's tail may hold.
    fn cap(&self) -> usize {
        let shares = self.tails.len().max(1);
        (self.budget / shares).max(MIN_PARTITION_CAP.min(self.budget))
    }

    /// Adds the committed `entries` of `partition` (in id order), then keeps
    /// the tail within its cap and at or above `first`.
    pub(crate) fn extend(
        &mut self,
        partition: PartitionId,
        entries: impl IntoIterator<Item = WalEntry>,
        first: LogId,
    ) {
        if self.budget == 0 {
            return;
        }
        let cap = self.cap();
        let tail = self.tails.entry(partition).or_default();
        for entry in entries {
            tail.push(entry);
        }
        tail.shrink(cap, first);
    }

    /// Drops the entries of `partition` below `first` (a trim or a reset
    /// raised it).
    pub(crate) fn trim(&mut self, partition: PartitionId, first: LogId) {
        let cap = self.cap();
        if let Some(tail) = self.tails.get_mut(&partition) {
            tail.shrink(cap, first);
        }
    }

    /// Entries `from..=until` within `limits`, if the tail of `partition`
    /// holds `from`. The caller checked that `from` is at or above the log's
    /// first id, and bounds `until` (the durable end, or for an early reader
    /// the last written id).
    pub(crate) fn read(
        &self,
        partition: PartitionId,
        from: LogId,
        until: LogId,
        limits: ReadLimits,
    ) -> Option<Vec<WalEntry>> {
        self.tails.get(&partition)?.read(from, until, limits)
    }

    /// Bytes held ([`charge`]), over every partition.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.tails.values().map(|tail| tail.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::SourcePosition;
    use bytes::Bytes;

    fn entry(id: u64, len: usize) -> WalEntry {
        WalEntry {
            log_id: LogId(id),
            flags: 0,
            created_unix_ms: id,
            bytes_end: 0,
            stored_len: 0,
            source: SourcePosition::default(),
            payload: Bytes::from(vec![id as u8; len]),
        }
    }

    fn ids(entries: &[WalEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.0).collect()
    }

    const P: PartitionId = PartitionId(0);

    /// No bound on the last id read.
    const ALL: LogId = LogId(u64::MAX);

    fn limits(max_entries: usize, max_bytes: usize) -> ReadLimits {
        ReadLimits {
            max_entries,
            max_bytes,
        }
    }

    #[test]
    fn reads_follow_the_storage_limits() {
        let mut tails = Tails::new(1 << 20);
        tails.extend(P, (1..=10).map(|id| entry(id, 10)), LogId(1));
        let read = |from, l| tails.read(P, LogId(from), ALL, l).map(|e| ids(&e));
        assert_eq!(read(3, limits(4, 1000)), Some(vec![3, 4, 5, 6]));
        // Stops once max_bytes were reached, never before the first entry.
        assert_eq!(read(3, limits(100, 25)), Some(vec![3, 4, 5]));
        assert_eq!(read(3, limits(100, 1)), Some(vec![3]));
        assert_eq!(read(10, limits(100, 1000)), Some(vec![10]));
        // Not held: the caller goes to the storage.
        assert_eq!(read(11, limits(100, 1000)), None);
        assert_eq!(
            tails.read(PartitionId(1), LogId(1), ALL, limits(1, 1)),
            None
        );
        // Bounded by `until` (the durable end, for every reader but an
        // early one): nothing past it, and nothing at all from past it.
        assert_eq!(
            tails
                .read(P, LogId(3), LogId(5), limits(100, 1000))
                .map(|e| ids(&e)),
            Some(vec![3, 4, 5])
        );
        assert_eq!(tails.read(P, LogId(6), LogId(5), limits(100, 1000)), None);
    }

    #[test]
    fn the_oldest_entries_leave_past_the_cap_and_below_first() {
        let mut tails = Tails::new(MIN_PARTITION_CAP);
        let big = MIN_PARTITION_CAP / 4 - ENTRY_OVERHEAD;
        tails.extend(P, (1..=6).map(|id| entry(id, big)), LogId(1));
        assert_eq!(tails.bytes(), MIN_PARTITION_CAP);
        assert_eq!(tails.read(P, LogId(2), ALL, limits(10, usize::MAX)), None);
        assert_eq!(
            tails
                .read(P, LogId(3), ALL, limits(10, usize::MAX))
                .map(|e| ids(&e)),
            Some(vec![3, 4, 5, 6])
        );
        tails.trim(P, LogId(5));
        assert_eq!(tails.bytes(), MIN_PARTITION_CAP / 2);
        assert_eq!(tails.read(P, LogId(4), ALL, limits(10, usize::MAX)), None);
    }

    #[test]
    fn an_append_that_does_not_follow_starts_the_tail_afresh() {
        let mut tails = Tails::new(1 << 20);
        tails.extend(P, (1..=5).map(|id| entry(id, 1)), LogId(1));
        // A reset of the log to id 3: the old 3..=5 must never be served.
        tails.extend(P, [entry(3, 2)], LogId(3));
        let read = tails.read(P, LogId(3), ALL, limits(10, 1000)).unwrap();
        assert_eq!(ids(&read), vec![3]);
        assert_eq!(read[0].payload.len(), 2);
        assert_eq!(tails.read(P, LogId(1), ALL, limits(10, 1000)), None);
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let mut tails = Tails::new(0);
        tails.extend(P, (1..=3).map(|id| entry(id, 1)), LogId(1));
        assert_eq!(tails.read(P, LogId(1), ALL, limits(10, 1000)), None);
        assert_eq!(tails.bytes(), 0);
    }
}
