//! Positions in the replicated streams, as newtypes so that a replication
//! offset is never mistaken for a log id.
//!
//! - [`ReplOffset`]: a byte offset in a Redis master's replication stream
//!   (`master_repl_offset`). The offset carried by an entry is the offset
//!   *after* that entry, the value a replica reports with `REPLCONF ACK`.

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
