//! Positions in the replicated streams, as newtypes so that a replication
//! offset is never mistaken for a log id.
//!
//! - [`ReplOffset`]: a byte offset in a Redis master's replication stream
//!   (`master_repl_offset`). The offset carried by an entry is the offset
//!   *after* that entry, the value a replica reports with `REPLCONF ACK`.
//! - [`ReplId`]: a master's 40-character replication id (`master_replid`);
//!   an offset only means something together with the id of its history.
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

/// A Redis replication id: exactly 40 ASCII hex digits (`master_replid`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplId(String);

impl ReplId {
    /// Length of a replication id (`CONFIG_RUN_ID_SIZE` in Redis).
    pub const LEN: usize = 40;

    /// Checks `text` is 40 hex digits; `None` otherwise.
    pub fn parse(text: &str) -> Option<ReplId> {
        (text.len() == Self::LEN && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| ReplId(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ReplId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReplId::parse(s).ok_or_else(|| format!("bad replication id {s:?}: expected 40 hex digits"))
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

/// Milliseconds since the Unix epoch by the wall clock (0 if the clock is
/// before 1970): entry creation times, heartbeats and latencies use it.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}
