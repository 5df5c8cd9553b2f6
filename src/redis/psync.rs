//! Placeholder, replaced by the psync work.
