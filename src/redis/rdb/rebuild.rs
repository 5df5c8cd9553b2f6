//! Placeholder, replaced by the rebuild work.
