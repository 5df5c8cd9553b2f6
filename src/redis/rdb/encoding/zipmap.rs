//! Placeholder, replaced by the RDB parser work.
