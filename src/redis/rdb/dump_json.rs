//! Placeholder, replaced by the rdb dump work.
