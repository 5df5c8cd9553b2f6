//! [`ListenerConfig`]: which source a listener replicates, into which
//! partition, and how it batches, reconnects and heartbeats.
//!
//! In: the `[listener]` section of a config file (serde, kebab-case, unknown
//! fields rejected). Out: a [`CheckedListenerConfig`] from
//! [`ListenerConfig::validate`], whose error names the offending field. The
//! source's password is in its URL, or in a file or an environment variable
//! ([`crate::secret`]); `Debug` and `Serialize` show it as `***`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_units::{ByteSize, HumanDuration};
use crate::position::PartitionId;
use crate::redis::psync::ReplicaConfig;
use crate::redis::url::RedisUrl;
use crate::secret::{PasswordSource, SecretUrl};
use crate::wal::MAX_PAYLOAD_LEN;

/// Longest listener id (it is part of the heartbeat key).
pub const MAX_LISTENER_ID_LEN: usize = 64;
/// Largest `replica.fragment-size`: a fragment is one WAL entry, and a few
/// of them make one append batch and one ship batch.
pub const MAX_FRAGMENT_SIZE: usize = 16 << 20;

/// A config value that cannot work, naming the field (`listener.<field>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid listener.{field}: {reason}")]
pub struct ListenerConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ListenerConfigError {
    ListenerConfigError {
        field,
        reason: reason.into(),
    }
}

/// Configuration of one listener (one source Redis, one partition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ListenerConfig {
    /// Name of this listener, 1 to 64 bytes of `[A-Za-z0-9._:-]`; the
    /// heartbeat key is `__ferry:heartbeat:<id>`. Default: `"listener"`.
    pub id: String,
    /// The source Redis, `redis://[user[:password]@]host:port`. Required.
    /// A Redis Cluster (`cluster_enabled:1`) is detected: then any node of
    /// it, or a comma-separated seed list of its nodes (the first address
    /// in full, the others `host:port`, taking its credentials), and each
    /// shard is replicated into a partition of its own.
    pub source: SecretUrl,
    /// A file holding the source's password (its content, one trailing
    /// newline dropped), instead of writing it in `source`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_password_file: Option<PathBuf>,
    /// The name of an environment variable holding the source's password.
    /// At most one of a password in `source`, `source-password-file` and
    /// `source-password-env`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_password_env: Option<String>,
    /// The WAL partition this source is stored in (a standalone Redis is
    /// partition 0). Must stay `0` for a cluster source, whose shards get
    /// their partitions by themselves (stable across restarts and
    /// failovers, kept in `<data-dir>/cluster-shards`). Default: `0`.
    pub partition: u32,
    /// How often the heartbeat key is written to the source; `"0s"` turns
    /// the heartbeat off. Default: `"1s"`.
    pub heartbeat_interval: HumanDuration,
    /// Most replication entries appended to the WAL in one batch (one
    /// batch is in flight while the next one fills). Default: `16384`.
    pub batch_max_entries: usize,
    /// Most payload bytes appended to the WAL in one batch (a single larger
    /// entry still goes alone). Default: `"4MiB"`.
    pub batch_max_bytes: ByteSize,
    /// First pause before reconnecting after a lost link; doubled after each
    /// failed attempt. Default: `"100ms"`.
    pub reconnect_backoff_min: HumanDuration,
    /// Longest pause between reconnect attempts. Default: `"5s"`.
    pub reconnect_backoff_max: HumanDuration,
    /// How long a fallback snapshot waits for the listener's durable stream
    /// to reach the snapshot's offset. Default: `"60s"`.
    pub fallback_wait_timeout: HumanDuration,
    /// The replication link itself.
    pub replica: ReplicaSettings,
}

/// Settings of the replication connection (see
/// [`crate::redis::psync::ReplicaConfig`] for their meaning on the wire).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ReplicaSettings {
    /// Sent as `REPLCONF listening-port` (shown by the source in `INFO
    /// replication`). Default: none (not sent).
    pub listening_port: Option<u16>,
    /// Sent as `REPLCONF ip-address`. Default: none.
    pub announce_ip: Option<String>,
    /// TCP connect timeout. Default: `"5s"`.
    pub connect_timeout: HumanDuration,
    /// The source is considered gone after this long without a byte; keep it
    /// above the source's `repl-ping-replica-period` (10 s). Default: `"60s"`.
    pub read_timeout: HumanDuration,
    /// Period of `REPLCONF ACK`; a source's `REPLCONF GETACK` (sent by
    /// `WAIT`) is answered as soon as the durable offset covers it, not at
    /// this period. Default: `"1s"`.
    pub ack_interval: HumanDuration,
    /// Most wire bytes of one replication entry (a command, or a `MULTI` ..
    /// `EXEC`) held in memory and stored in its WAL record; an argument that
    /// would take an entry past it is streamed into fragments instead (see
    /// `stream-threshold`). At most the WAL's largest entry (64 MiB).
    /// Default: `"64MiB"`.
    pub max_transaction_bytes: ByteSize,
    /// Arguments longer than this are not buffered: they are stored as they
    /// arrive, in WAL fragments of `fragment-size`, and written to the target
    /// as a stream (src/record.rs, "Big entries"). Default: `"4MiB"`.
    pub stream_threshold: ByteSize,
    /// Size of one fragment of a streamed argument, 1 byte to 16 MiB.
    /// Default: `"1MiB"`.
    pub fragment_size: ByteSize,
    /// Largest replication entry carried (a `SET` of one value, or a whole
    /// `MULTI` .. `EXEC`), streamed arguments included; it must fit twice on
    /// disk (listener and drainer WALs). A bigger entry stops replication
    /// with the listener `STOPPED` and the error in `ferry status`, never a
    /// reconnect loop: raise this and restart to go on. Default: `"4GiB"`.
    pub max_entry_bytes: ByteSize,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            id: "listener".into(),
            source: SecretUrl::default(),
            source_password_file: None,
            source_password_env: None,
            partition: 0,
            heartbeat_interval: HumanDuration(Duration::from_secs(1)),
            batch_max_entries: 16384,
            batch_max_bytes: ByteSize::mib(4),
            reconnect_backoff_min: HumanDuration(Duration::from_millis(100)),
            reconnect_backoff_max: HumanDuration(Duration::from_secs(5)),
            fallback_wait_timeout: HumanDuration(Duration::from_secs(60)),
            replica: ReplicaSettings::default(),
        }
    }
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        ReplicaSettings {
            listening_port: None,
            announce_ip: None,
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            read_timeout: HumanDuration(Duration::from_secs(60)),
            ack_interval: HumanDuration(Duration::from_secs(1)),
            max_transaction_bytes: ByteSize(MAX_PAYLOAD_LEN as u64),
            stream_threshold: ByteSize::mib(4),
            fragment_size: ByteSize::mib(1),
            max_entry_bytes: ByteSize(4 << 30),
        }
    }
}

/// A validated [`ListenerConfig`], with the source URL parsed and the
/// replication client's config built.
#[derive(Debug, Clone)]
pub struct CheckedListenerConfig {
    pub id: String,
    /// The first address of `source`.
    pub source: RedisUrl,
    /// Every address of `source` (more than one: seeds of a cluster).
    pub seeds: Vec<RedisUrl>,
    pub partition: PartitionId,
    /// `None` when the heartbeat is off.
    pub heartbeat_interval: Option<Duration>,
    pub batch_max_entries: usize,
    pub batch_max_bytes: usize,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    pub fallback_wait_timeout: Duration,
    pub replica: ReplicaConfig,
}

impl CheckedListenerConfig {
    /// The heartbeat key this listener writes to its source.
    pub fn heartbeat_key(&self) -> String {
        format!("{}{}", super::HEARTBEAT_KEY_PREFIX, self.id)
    }
}

impl ListenerConfig {
    /// A default config for `source`.
    pub fn for_source(source: impl Into<String>) -> ListenerConfig {
        ListenerConfig {
            source: SecretUrl::new(source),
            ..ListenerConfig::default()
        }
    }

    /// Where the source's password comes from, besides its URL.
    pub fn password_source(&self) -> PasswordSource {
        PasswordSource::from_keys(
            "source-password",
            self.source_password_file.as_deref(),
            self.source_password_env.as_deref(),
        )
    }

    /// Checks every value and builds the checked config (reading the
    /// source's password from its file or variable).
    pub fn validate(&self) -> Result<CheckedListenerConfig, ListenerConfigError> {
        let valid_char =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
        if self.id.is_empty()
            || self.id.len() > MAX_LISTENER_ID_LEN
            || !self.id.bytes().all(valid_char)
        {
            return Err(bad(
                "id",
                format!(
                    "{:?} must be 1 to {MAX_LISTENER_ID_LEN} bytes of [A-Za-z0-9._:-]",
                    self.id
                ),
            ));
        }
        if self.source.is_empty() {
            return Err(bad("source", "is required (redis://host:port)"));
        }
        // A comma-separated seed list names nodes of one cluster: the first
        // in full, the others taking its credentials.
        let mut addresses = self
            .source
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty());
        let first = addresses.next().unwrap_or_default();
        let source = crate::secret::SecretUrl::new(first)
            .parse_with(&self.password_source())
            .map_err(|e| bad("source", e.to_string()))?;
        let mut seeds = vec![source.clone()];
        for address in addresses {
            let mut seed = RedisUrl::parse(address).map_err(|e| bad("source", e.to_string()))?;
            if seed.user.is_none() && seed.password.is_none() {
                seed.user = source.user.clone();
                seed.password = source.password.clone();
            }
            seeds.push(seed);
        }
        if self.batch_max_entries == 0 {
            return Err(bad("batch-max-entries", "must be at least 1"));
        }
        if self.batch_max_bytes.as_u64() == 0 {
            return Err(bad("batch-max-bytes", "must be at least 1 byte"));
        }
        let backoff_min = self.reconnect_backoff_min.as_duration();
        let backoff_max = self.reconnect_backoff_max.as_duration();
        if backoff_min.is_zero() {
            return Err(bad(
                "reconnect-backoff-min",
                "must not be 0 (a down source would be hammered)",
            ));
        }
        if backoff_max < backoff_min {
            return Err(bad(
                "reconnect-backoff-max",
                format!(
                    "{} is below reconnect-backoff-min {}",
                    self.reconnect_backoff_max, self.reconnect_backoff_min
                ),
            ));
        }
        if self.fallback_wait_timeout.as_duration().is_zero() {
            return Err(bad("fallback-wait-timeout", "must not be 0"));
        }
        let replica = &self.replica;
        let max_transaction = replica.max_transaction_bytes.as_u64();
        if max_transaction == 0 || max_transaction > MAX_PAYLOAD_LEN as u64 {
            return Err(bad(
                "replica.max-transaction-bytes",
                format!(
                    "{} must be between 1 byte and the WAL's largest entry ({})",
                    replica.max_transaction_bytes,
                    ByteSize(MAX_PAYLOAD_LEN as u64)
                ),
            ));
        }
        let fragment = replica.fragment_size.as_u64();
        if fragment == 0 || fragment > MAX_FRAGMENT_SIZE as u64 {
            return Err(bad(
                "replica.fragment-size",
                format!(
                    "{} must be between 1 byte and {}",
                    replica.fragment_size,
                    ByteSize(MAX_FRAGMENT_SIZE as u64)
                ),
            ));
        }
        if replica.max_entry_bytes.as_u64() < max_transaction {
            return Err(bad(
                "replica.max-entry-bytes",
                format!(
                    "{} is below replica.max-transaction-bytes {}",
                    replica.max_entry_bytes, replica.max_transaction_bytes
                ),
            ));
        }
        for (field, value) in [
            ("replica.connect-timeout", replica.connect_timeout),
            ("replica.read-timeout", replica.read_timeout),
            ("replica.ack-interval", replica.ack_interval),
        ] {
            if value.as_duration().is_zero() {
                return Err(bad(field, "must not be 0"));
            }
        }
        if replica.read_timeout.as_duration() <= replica.ack_interval.as_duration() {
            return Err(bad(
                "replica.read-timeout",
                "must be longer than replica.ack-interval",
            ));
        }
        let mut repl = ReplicaConfig::new(source.clone());
        repl.listening_port = replica.listening_port;
        repl.announce_ip = replica.announce_ip.clone();
        repl.connect_timeout = replica.connect_timeout.as_duration();
        repl.read_timeout = replica.read_timeout.as_duration();
        repl.ack_interval = replica.ack_interval.as_duration();
        repl.max_transaction_bytes = replica.max_transaction_bytes.as_usize();
        repl.stream_threshold = replica.stream_threshold.as_usize();
        repl.fragment_size = replica.fragment_size.as_usize();
        repl.max_entry_bytes = replica.max_entry_bytes.as_u64();
        // Bulk strings a frame holds whole are within the entry's budget
        // (bigger ones are streamed, never decoded whole).
        repl.resp_limits.max_bulk_len = repl
            .resp_limits
            .max_bulk_len
            .min(replica.max_transaction_bytes.as_usize());
        repl.validate().map_err(|e| bad("replica", e.to_string()))?;
        let heartbeat = self.heartbeat_interval.as_duration();
        Ok(CheckedListenerConfig {
            id: self.id.clone(),
            source,
            seeds,
            partition: PartitionId(self.partition),
            heartbeat_interval: (!heartbeat.is_zero()).then_some(heartbeat),
            batch_max_entries: self.batch_max_entries,
            batch_max_bytes: self.batch_max_bytes.as_usize(),
            reconnect_backoff_min: backoff_min,
            reconnect_backoff_max: backoff_max,
            fallback_wait_timeout: self.fallback_wait_timeout.as_duration(),
            replica: repl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let checked = ListenerConfig::for_source("redis://127.0.0.1:6379")
            .validate()
            .unwrap();
        assert_eq!(checked.partition, PartitionId(0));
        assert_eq!(checked.heartbeat_interval, Some(Duration::from_secs(1)));
        assert_eq!(checked.batch_max_entries, 16384);
        assert_eq!(checked.batch_max_bytes, 4 << 20);
        assert_eq!(checked.replica.max_transaction_bytes, MAX_PAYLOAD_LEN);
        assert_eq!(checked.replica.resp_limits.max_bulk_len, MAX_PAYLOAD_LEN);
        assert_eq!(checked.replica.stream_threshold, 4 << 20);
        assert_eq!(checked.replica.fragment_size, 1 << 20);
        assert_eq!(checked.replica.max_entry_bytes, 4 << 30);
        assert_eq!(checked.heartbeat_key(), "__ferry:heartbeat:listener");
    }

    #[test]
    fn parses_kebab_case_with_units_and_refuses_unknown_fields() {
        let json = r#"{"id": "east-1", "source": "redis://h:1", "partition": 3,
            "heartbeat-interval": "0s", "batch-max-bytes": "1MiB",
            "replica": {"listening-port": 7000, "read-timeout": "30s"}}"#;
        let config: ListenerConfig = serde_json::from_str(json).unwrap();
        let checked = config.validate().unwrap();
        assert_eq!(checked.heartbeat_interval, None);
        assert_eq!(checked.batch_max_bytes, 1 << 20);
        assert_eq!(checked.partition, PartitionId(3));
        assert_eq!(checked.replica.listening_port, Some(7000));
        assert_eq!(checked.replica.read_timeout, Duration::from_secs(30));

        let unknown = r#"{"source": "redis://h:1", "batch-size": 3}"#;
        let error = serde_json::from_str::<ListenerConfig>(unknown).unwrap_err();
        assert!(error.to_string().contains("batch-size"), "{error}");
        let nested = r#"{"source": "redis://h:1", "replica": {"port": 3}}"#;
        assert!(serde_json::from_str::<ListenerConfig>(nested).is_err());
    }

    #[test]
    fn validate_names_the_field() {
        let base = ListenerConfig::for_source("redis://127.0.0.1:6379");
        let cases: Vec<(ListenerConfig, &str)> = vec![
            (
                ListenerConfig {
                    source: SecretUrl::default(),
                    ..base.clone()
                },
                "source",
            ),
            (
                ListenerConfig {
                    source: "http://x".into(),
                    ..base.clone()
                },
                "source",
            ),
            (
                ListenerConfig {
                    id: "has space".into(),
                    ..base.clone()
                },
                "id",
            ),
            (
                ListenerConfig {
                    batch_max_entries: 0,
                    ..base.clone()
                },
                "batch-max-entries",
            ),
            (
                ListenerConfig {
                    reconnect_backoff_max: HumanDuration(Duration::from_millis(1)),
                    ..base.clone()
                },
                "reconnect-backoff-max",
            ),
            (
                ListenerConfig {
                    replica: ReplicaSettings {
                        max_transaction_bytes: ByteSize::mib(65),
                        ..ReplicaSettings::default()
                    },
                    ..base.clone()
                },
                "replica.max-transaction-bytes",
            ),
            (
                ListenerConfig {
                    replica: ReplicaSettings {
                        fragment_size: ByteSize::mib(17),
                        ..ReplicaSettings::default()
                    },
                    ..base.clone()
                },
                "replica.fragment-size",
            ),
            (
                ListenerConfig {
                    replica: ReplicaSettings {
                        max_entry_bytes: ByteSize::mib(8),
                        ..ReplicaSettings::default()
                    },
                    ..base.clone()
                },
                "replica.max-entry-bytes",
            ),
            (
                ListenerConfig {
                    replica: ReplicaSettings {
                        read_timeout: HumanDuration(Duration::ZERO),
                        ..ReplicaSettings::default()
                    },
                    ..base.clone()
                },
                "replica.read-timeout",
            ),
        ];
        for (config, field) in cases {
            let error = config.validate().unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(error
                .to_string()
                .starts_with(&format!("invalid listener.{field}")));
        }
    }
}
