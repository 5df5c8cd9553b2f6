//! [`WalConfig`]: where the WAL lives, how it group-commits, how long it keeps
//! entries and how much memory RocksDB may use.
//!
//! In: the `[wal]` section of a config file (serde, kebab-case, unknown fields
//! rejected). Out: a checked config from [`WalConfig::validate`], whose error
//! names the offending field.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_units::{ByteSize, HumanDuration};

/// A config value that cannot work, naming the field (`wal.<field>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid wal.{field}: {reason}")]
pub struct WalConfigError {
    pub field: &'static str,
    pub reason: String,
}

/// Configuration of one WAL (one RocksDB instance per process data dir).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct WalConfig {
    /// Directory of the RocksDB instance. Default: `"data/wal"`.
    pub dir: PathBuf,
    /// fsync every group commit before acknowledging its appends. Default:
    /// `true`. `false` exists for benchmarks only: acknowledged entries may
    /// then be lost on a machine crash (not on a process crash).
    pub sync: bool,
    /// How long the group-commit writer waits for more work after the first
    /// request of a batch. Work that arrives while a batch is being written
    /// joins the next batch anyway, so this only matters at low load.
    /// Below 1ms (tokio's timer granularity) the writer waits by yielding to
    /// other tasks rather than sleeping. Default: `"200us"`.
    pub group_commit_linger: HumanDuration,
    /// Stop collecting a batch once its payload reaches this many bytes.
    /// Default: `"4MiB"`.
    pub group_commit_max_bytes: ByteSize,
    /// Requests that may wait for the writer before `append` applies
    /// backpressure. Default: `4096`.
    pub queue_depth: usize,
    /// Entries older than this (by their creation time) are trimmed even if
    /// a downstream has not acked them. Default: `"24h"`.
    pub wal_ttl: HumanDuration,
    /// Optional cap on the stored bytes of one partition's log; the oldest
    /// entries beyond it are trimmed even if unacked. Default: none.
    pub partition_size_cap: Option<ByteSize>,
    /// How often the retention task trims acked and expired entries. Often
    /// enough that acked entries are usually trimmed while still in RocksDB's
    /// memtables or first files, before a compaction rewrites them.
    /// Default: `"1s"`.
    pub retention_interval: HumanDuration,
    /// Memtable memory shared by all column families (RocksDB's
    /// `db_write_buffer_size`, a write buffer manager, which triggers flushes
    /// but does not stall writers). Immutable memtables waiting for flush come
    /// on top, so the WAL writer itself stalls while all memtables hold more
    /// than twice this. Default: `"64MiB"`.
    pub memtable_budget: ByteSize,
    /// Memtable size of one column family before it is flushed. Default:
    /// `"4MiB"`.
    pub cf_write_buffer_size: ByteSize,
    /// RocksDB's own write-ahead log is rolled and old column families
    /// flushed once it exceeds this. Default: `"256MiB"`.
    pub max_rocksdb_wal_size: ByteSize,
    /// LRU block cache shared by all column families. Default: `"64MiB"`.
    pub block_cache_size: ByteSize,
    /// RocksDB flush and compaction threads. Default: `2`.
    pub max_background_jobs: u32,
    /// Free space the WAL's file system must keep: below it, writes pause
    /// (appends wait: backpressure up to the source) and a warning says so,
    /// until space returns. RocksDB must never run out of space mid-write
    /// (it cannot recover in-process). `"0B"` turns the check off. Default:
    /// `"256MiB"`.
    pub min_free_space: ByteSize,
    /// Memory for the latest committed entries (payload, replid and 128
    /// bytes each), shared by the partitions (each gets at least 64 KiB),
    /// so that readers that keep up (shippers, appliers) read them without
    /// a storage read and without a blocking-thread hop: lower latency at a
    /// moderate rate (benches/README.md, issue 13, third round). `"0B"`
    /// keeps none. Default: `"2MiB"`.
    pub tail_bytes: ByteSize,
    /// RocksDB writes table files (flushes, compactions) to disk every this
    /// many bytes as it writes them (`bytes_per_sync`), instead of leaving
    /// them to the kernel's write-back: a burst of dirty pages written back
    /// at once delays the WAL's own fsyncs behind it. `"0B"` leaves it to
    /// the kernel. Default: `"1MiB"`.
    pub bytes_per_sync: ByteSize,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            dir: PathBuf::from("data/wal"),
            sync: true,
            group_commit_linger: HumanDuration(Duration::from_micros(200)),
            group_commit_max_bytes: ByteSize::mib(4),
            queue_depth: 4096,
            wal_ttl: HumanDuration(Duration::from_secs(24 * 3600)),
            partition_size_cap: None,
            retention_interval: HumanDuration(Duration::from_secs(1)),
            memtable_budget: ByteSize::mib(64),
            cf_write_buffer_size: ByteSize::mib(4),
            max_rocksdb_wal_size: ByteSize::mib(256),
            block_cache_size: ByteSize::mib(64),
            max_background_jobs: 2,
            min_free_space: ByteSize::mib(256),
            tail_bytes: ByteSize::mib(2),
            bytes_per_sync: ByteSize::mib(1),
        }
    }
}

impl WalConfig {
    /// A default config rooted at `dir`.
    pub fn with_dir(dir: impl Into<PathBuf>) -> WalConfig {
        WalConfig {
            dir: dir.into(),
            ..WalConfig::default()
        }
    }

    /// Checks values that would make the WAL misbehave rather than fail.
    pub fn validate(self) -> Result<WalConfig, WalConfigError> {
        fn bad(field: &'static str, reason: impl Into<String>) -> WalConfigError {
            WalConfigError {
                field,
                reason: reason.into(),
            }
        }
        if self.dir.as_os_str().is_empty() {
            return Err(bad("dir", "must not be empty"));
        }
        if self.group_commit_linger.0 > Duration::from_secs(1) {
            return Err(bad(
                "group-commit-linger",
                format!(
                    "{} delays every append; at most 1s",
                    self.group_commit_linger
                ),
            ));
        }
        if self.group_commit_max_bytes.0 < 4096 {
            return Err(bad("group-commit-max-bytes", "must be at least 4KiB"));
        }
        if self.queue_depth == 0 || self.queue_depth > 1_000_000 {
            return Err(bad("queue-depth", "must be between 1 and 1000000"));
        }
        if self.wal_ttl.0 < Duration::from_secs(1) {
            return Err(bad("wal-ttl", "must be at least 1s"));
        }
        if let Some(cap) = self.partition_size_cap {
            if cap.0 < 64 * 1024 {
                return Err(bad("partition-size-cap", "must be at least 64KiB"));
            }
        }
        if self.retention_interval.0 < Duration::from_millis(100) {
            return Err(bad("retention-interval", "must be at least 100ms"));
        }
        if self.cf_write_buffer_size.0 < 64 * 1024 {
            return Err(bad("cf-write-buffer-size", "must be at least 64KiB"));
        }
        if self.memtable_budget.0 < self.cf_write_buffer_size.0 {
            return Err(bad(
                "memtable-budget",
                format!(
                    "{} is below cf-write-buffer-size {}",
                    self.memtable_budget, self.cf_write_buffer_size
                ),
            ));
        }
        if self.max_rocksdb_wal_size.0 < self.cf_write_buffer_size.0 {
            return Err(bad(
                "max-rocksdb-wal-size",
                "must be at least cf-write-buffer-size",
            ));
        }
        if self.max_background_jobs == 0 || self.max_background_jobs > 64 {
            return Err(bad("max-background-jobs", "must be between 1 and 64"));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kebab_case_with_units_and_defaults() {
        let json = r#"{"dir": "/tmp/x", "wal-ttl": "4h", "partition-size-cap": "1GiB",
                       "group-commit-linger": "500us"}"#;
        let config: WalConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.wal_ttl.0, Duration::from_secs(4 * 3600));
        assert_eq!(config.partition_size_cap, Some(ByteSize(1 << 30)));
        assert_eq!(config.group_commit_linger.0, Duration::from_micros(500));
        assert_eq!(config.memtable_budget, ByteSize::mib(64));
        assert!(config.validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<WalConfig>(r#"{"wal_ttl": "4h"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn validate_names_the_field() {
        let config = WalConfig {
            memtable_budget: ByteSize::kib(128),
            cf_write_buffer_size: ByteSize::mib(1),
            ..WalConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert_eq!(err.field, "memtable-budget");
        assert!(err.to_string().starts_with("invalid wal.memtable-budget"));

        let err = WalConfig {
            queue_depth: 0,
            ..WalConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "queue-depth");
    }
}
