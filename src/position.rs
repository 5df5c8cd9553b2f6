//! Positions in the replicated streams, as newtypes so that a replication
//! offset is never mistaken for a log id.
//!
//! - [`ReplOffset`]: a byte offset in a Redis master's replication stream
//!   (`master_repl_offset`). The offset carried by an entry is the offset
//!   *after* that entry, the value a replica reports with `REPLCONF ACK`.
//! - [`LogId`]: the position of an entry in one partition of a ferry WAL.
//! - [`PartitionId`]: which partition of the WAL.

use std::fmt;

/// Byte offset in a Redis replication stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ReplOffset(pub u64);

impl ReplOffset {
    /// The offset `len` bytes further on.
    pub fn advance(self, len: u64) -> ReplOffset {
        ReplOffset(self.0 + len)
    }
}

impl fmt::Display for ReplOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Position of an entry in one partition of a ferry WAL. Ids are dense and
/// start at 1; `LogId(0)` means "before the first entry" (nothing appended,
/// nothing acked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogId(pub u64);

impl LogId {
    /// The position before any entry.
    pub const ZERO: LogId = LogId(0);

    /// The id after this one.
    pub fn next(self) -> LogId {
        LogId(self.0.saturating_add(1))
    }

    /// The id before this one (`ZERO` stays `ZERO`).
    pub fn prev(self) -> LogId {
        LogId(self.0.saturating_sub(1))
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A partition of the replicated keyspace: each has its own log, snapshot and
/// progress in the WAL, and is shipped and applied independently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
