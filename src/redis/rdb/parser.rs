//! Placeholder, replaced by the RDB parser work.
use super::{ParseOptions, RdbError, RdbEvent};
use std::io::Read;

/// Pull parser over an RDB byte stream.
pub struct RdbParser<R: Read> {
    _reader: R,
    _opts: ParseOptions,
}

impl<R: Read> RdbParser<R> {
    pub fn new(reader: R, opts: ParseOptions) -> Self {
        RdbParser {
            _reader: reader,
            _opts: opts,
        }
    }

    /// The next event, or `None` after [`RdbEvent::End`].
    pub fn next_event(&mut self) -> Result<Option<RdbEvent>, RdbError> {
        todo!("parser")
    }

    /// Bytes consumed from the reader so far.
    pub fn offset(&self) -> u64 {
        todo!("parser")
    }

    /// The RDB version from the header (0 before it is read).
    pub fn version(&self) -> u32 {
        todo!("parser")
    }
}
