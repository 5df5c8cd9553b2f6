//! [`ApplyConfig`]: which partition of the drainer's WAL is applied to which
//! target, in what batch sizes, and how failures are retried.
//!
//! In: the `[apply]` section of a drainer config (serde, kebab-case, unknown
//! fields rejected). Out: a checked config from [`ApplyConfig::validate`],
//! whose error names the offending field. The target's password is in its
//! URL, or in a file or an environment variable ([`crate::secret`]);
//! `Debug` and `Serialize` show it as `***`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::keyspace::{FilterConfig, OwnedKeyspace};
use crate::config_units::{ByteSize, HumanDuration};
use crate::position::PartitionId;
use crate::redis::url::RedisUrl;
use crate::secret::{PasswordSource, SecretUrl};
use crate::wal::{DownstreamId, MAX_DOWNSTREAM_ID_LEN};

/// Longest drainer id (it is part of the checkpoint key).
pub const MAX_DRAINER_ID_LEN: usize = 64;

/// A config value that cannot work, naming the field (`apply.<field>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {}: {reason}", qualified(field))]
pub struct ApplyConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl ApplyConfigError {
    /// The field with its section: `apply.<field>`, or `filter.dbs`.
    pub fn path(&self) -> String {
        qualified(self.field)
    }
}

/// Configuration of one applier (one partition of one drainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ApplyConfig {
    /// Name of the drainer, 1 to 64 bytes of `[A-Za-z0-9._-]`; part of the
    /// checkpoint key `__ferry:checkpoint:<drainer-id>:<partition>`, so two
    /// drainers writing to one target must have different ids. Default:
    /// `"drainer"`.
    pub drainer_id: String,
    /// The target Redis, `redis://[user[:password]@]host[:port]`. No db in
    /// the URL: every record carries the db it was written in. A Redis
    /// Cluster target is detected; it may be any node or a comma-separated
    /// seed list ([`ApplyConfig::target_seeds`]). Default:
    /// `"redis://127.0.0.1:6379"`.
    pub target: SecretUrl,
    /// A file holding the target's password (its content, one trailing
    /// newline dropped), instead of writing it in `target`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_password_file: Option<PathBuf>,
    /// The name of an environment variable holding the target's password.
    /// At most one of a password in `target`, `target-password-file` and
    /// `target-password-env`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_password_env: Option<String>,
    /// The partition of the WAL to apply. Default: `0`.
    pub partition: u32,
    /// The applier's name as a downstream of the drainer's WAL: entries are
    /// kept until it acks them as applied (within `wal-ttl`, which stays the
    /// hard limit), and become trimmable once it does. Two appliers of one
    /// partition of one WAL need different names. Default:
    /// `"apply:<drainer-id>"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_downstream: Option<String>,
    /// How long an applied entry stays in the drainer's WAL before the
    /// applier acks it for retention (the `applied` mark moves at once). A
    /// target that loses its last acknowledged writes but keeps data and
    /// checkpoint consistent (an `appendfsync everysec` AOF after a machine
    /// crash: up to about 2 s) comes back with an older checkpoint and gets
    /// the entries after it again; lost for longer than this, they may be
    /// gone (fatal `Gap`: the target needs a snapshot). `"0s"` acks at once.
    /// Default: `"5s"`, at most `"1h"` (`wal-ttl` stays the hard limit).
    pub retain_applied: HumanDuration,
    /// Most WAL entries in one `MULTI`/`EXEC` batch. Default: `4000`.
    pub batch_max_entries: usize,
    /// Most command bytes in one batch (an entry larger than this still goes,
    /// alone). Default: `"2MiB"`.
    pub batch_max_bytes: ByteSize,
    /// First wait after a failure; it doubles per consecutive failure.
    /// Default: `"100ms"`.
    pub retry_backoff_min: HumanDuration,
    /// Longest wait between retries. Default: `"10s"`.
    pub retry_backoff_max: HumanDuration,
    /// While everything is applied the applier waits for the WAL's append
    /// notification; this is how often it looks for new entries anyway (a
    /// fallback, not the normal wake-up). Default: `"1s"`, at most `"60s"`.
    pub idle_poll: HumanDuration,
    /// How often the applier of a standalone target watches it for writes
    /// ferry did not make ([`super::foreign`]: `MONITOR` for
    /// `foreign-writes-window`, counted in status, a warning when any).
    /// `"0s"` never. Default: `"60s"`.
    pub foreign_writes_every: HumanDuration,
    /// How long each of those windows lasts (`MONITOR` slows the target
    /// while it runs). Default: `"200ms"`, at most `"10s"`.
    pub foreign_writes_window: HumanDuration,
    /// Two-way sync (`ferry sync --two-way`; never read from a file): the
    /// partitions whose appliers write this applier's source (one for
    /// standalone servers, the other direction's range between clusters).
    /// An entry of the source that writes one of their checkpoint keys is
    /// an echo, covered and never sent back; flushes and `SWAPDB` are
    /// refused (and, into a cluster, every command without keys but
    /// `PUBLISH`).
    #[serde(skip)]
    pub two_way_peers: Option<std::ops::RangeInclusive<u32>>,
    /// Two-way sync: the drainer whose checkpoints of `two_way_peers` mark
    /// an echo. None: this applier's own `drainer-id` (`ferry sync
    /// --two-way`, both directions one drainer); `ferry site`: the other
    /// site's drainer. Never read from a file.
    #[serde(skip)]
    pub two_way_echo_of: Option<String>,
    /// Two-way sync once established: any snapshot load is refused
    /// ([`super::ApplyError::TwoWayLoad`]); never read from a file.
    #[serde(skip)]
    pub refuse_loads: bool,
    /// Applying the listener's own WAL (`ferry sync`, `apply-from =
    /// "listener-wal"`): apply an entry while the WAL write holding it is
    /// being fsynced, instead of after. The source is still acked only once
    /// it is durable; after a crash the applier checks that the entry its
    /// checkpoint names is the one the source sent again ([`super`] module
    /// doc, "Applying before the fsync"). No effect on a drainer's WAL.
    /// Default: `true`.
    pub early_apply: bool,
    /// Timeout of a connection attempt to the target. Default: `"5s"`.
    pub connect_timeout: HumanDuration,
    /// Longest wait for one reply of the target before the connection is
    /// considered dead (a `FLUSHALL` of a big target counts). Default:
    /// `"60s"`.
    pub reply_timeout: HumanDuration,
    /// Most commands in one window of a snapshot load (a window also ends
    /// at `batch-max-bytes`); the parser thread hands windows over already
    /// encoded, and up to five are between it and the target's replies.
    /// Default: `8192`.
    pub load_window: usize,
    /// Keys other than strings whose serialized value is at most this long
    /// are loaded with `RESTORE`; bigger ones are rebuilt element by element
    /// (strings always go by `SET`/`MSET`). Default: `"1MiB"`.
    pub restore_max_bytes: ByteSize,
    /// Added to every expiry deadline written to the target (replicated
    /// `SET … PXAT`, `PEXPIREAT`, `RESTORE … ABSTTL`, and keys of a snapshot
    /// load), so that a key leaves the target by the source's own `DEL`, as
    /// on a Redis replica, and the target's own expiry only acts when that
    /// `DEL` has not come within the grace (see `src/apply/expire.rs`).
    /// Without it a source `EXPIRE`/`PERSIST` that refreshes a key shortly
    /// before its deadline is lost whenever it reaches the target after
    /// the deadline (lag, a stopped sync, a target clock ahead). Readers of
    /// the target see `TTL`/`PTTL` longer by the grace, and a key whose `DEL`
    /// does not come (the sync stopped) up to the grace after its deadline.
    /// Raise it towards `wal-ttl` to ride out longer stops. `"0s"` writes
    /// the source's deadlines unchanged. Default: `"5m"` (reconnects,
    /// restarts, link flaps and clock skew), at most `"30d"`.
    pub expire_grace: HumanDuration,
    /// What the first full sync does when the dbs this sync owns already
    /// hold keys on the target (ferry's own `__ferry*` keys do not count):
    /// `"refuse"` stops before writing anything and names the dbs and their
    /// key counts; `"keep"` loads over them (same-named keys are replaced,
    /// the others kept; every later snapshot load keeps them too, so keys
    /// the source deleted while a snapshot was due may stay on the target:
    /// `ferry verify` lists them); `"flush"` deletes the owned dbs' keys
    /// first. A partition whose snapshot has a slot scope (a Redis Cluster
    /// source shard) counts and deletes only the keys of its hash slots, on
    /// its own first load: another shard's keys never refuse it and are
    /// never deleted by it. Default: `"refuse"`.
    pub existing_data: ExistingData,
    /// `"stop"` or `"skip-and-record"`: what to do with an entry the target
    /// refuses when it is queued ([`OnRefused`]). Default: `"stop"`.
    pub on_refused: OnRefused,
    /// Where skipped entries are recorded, one file per drainer and
    /// partition: `<dir>/<drainer-id>-<partition>.resp`, replayable with
    /// `redis-cli --pipe` (format in `src/apply/dead_letter.rs`). Default:
    /// `<data-dir>/dead-letter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_dir: Option<PathBuf>,
    /// The keyspace this sync owns: set from the node config's `[filter]`
    /// section, not from `[apply]`.
    #[serde(skip)]
    pub filter: FilterConfig,
}

/// What the applier does with an entry the target refuses when it is
/// queued (an unknown command, wrong arguments, `NOPERM`): its `MULTI` is
/// discarded (`EXECABORT`), so it and everything after it would wait
/// forever. Refusals about the target's state (`OOM`, `READONLY`,
/// `LOADING`, `BUSY`, `MASTERDOWN`, `MISCONF`, ...) may clear by
/// themselves: they are retried with backoff under both, never skipped by
/// themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRefused {
    /// Stop applying the partition at that entry (state BLOCKED, the entry
    /// and the error in `ferry status`); it is tried again every
    /// `retry-backoff-max` (so fixing the target unblocks it) until `ferry
    /// skip` skips it.
    #[default]
    Stop,
    /// Record the entry in the dead-letter file and go on after it.
    SkipAndRecord,
}

/// `existing-data`: see [`ApplyConfig::existing_data`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExistingData {
    #[default]
    Refuse,
    Keep,
    Flush,
}

impl ExistingData {
    pub fn as_str(self) -> &'static str {
        match self {
            ExistingData::Refuse => "refuse",
            ExistingData::Keep => "keep",
            ExistingData::Flush => "flush",
        }
    }
}

impl std::str::FromStr for ExistingData {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "refuse" => Ok(ExistingData::Refuse),
            "keep" => Ok(ExistingData::Keep),
            "flush" => Ok(ExistingData::Flush),
            other => Err(format!(
                "{other:?} is not one of \"refuse\", \"keep\", \"flush\""
            )),
        }
    }
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            drainer_id: "drainer".to_string(),
            target: SecretUrl::from("redis://127.0.0.1:6379"),
            target_password_file: None,
            target_password_env: None,
            partition: 0,
            wal_downstream: None,
            retain_applied: HumanDuration(Duration::from_secs(5)),
            batch_max_entries: 4000,
            batch_max_bytes: ByteSize::mib(2),
            retry_backoff_min: HumanDuration(Duration::from_millis(100)),
            retry_backoff_max: HumanDuration(Duration::from_secs(10)),
            idle_poll: HumanDuration(Duration::from_secs(1)),
            foreign_writes_every: HumanDuration(Duration::from_secs(60)),
            foreign_writes_window: HumanDuration(Duration::from_millis(200)),
            two_way_peers: None,
            two_way_echo_of: None,
            refuse_loads: false,
            early_apply: true,
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            reply_timeout: HumanDuration(Duration::from_secs(60)),
            load_window: 8192,
            restore_max_bytes: ByteSize::mib(1),
            existing_data: ExistingData::Refuse,
            on_refused: OnRefused::Stop,
            dead_letter_dir: None,
            filter: FilterConfig::default(),
            expire_grace: HumanDuration(super::expire::DEFAULT_EXPIRE_GRACE),
        }
    }
}

/// `apply.<field>`, or the field itself when it is another section's
/// (`filter.dbs`).
fn qualified(field: &str) -> String {
    if field.contains('.') {
        field.to_string()
    } else {
        format!("apply.{field}")
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> ApplyConfigError {
    ApplyConfigError {
        field,
        reason: reason.into(),
    }
}

impl ApplyConfig {
    pub fn partition_id(&self) -> PartitionId {
        PartitionId(self.partition)
    }

    /// The downstream name under which the applier acks the drainer's WAL.
    pub fn downstream_id(&self) -> Result<DownstreamId, ApplyConfigError> {
        match &self.wal_downstream {
            Some(name) => DownstreamId::new(name.clone()).map_err(|_| {
                bad(
                    "wal-downstream",
                    format!(
                        "{name:?} must be 1 to {MAX_DOWNSTREAM_ID_LEN} bytes of [A-Za-z0-9._:-]"
                    ),
                )
            }),
            None => DownstreamId::new(format!("apply:{}", self.drainer_id)).map_err(|_| {
                bad(
                    "wal-downstream",
                    format!(
                        "the default \"apply:{}\" is longer than {MAX_DOWNSTREAM_ID_LEN} bytes; \
                         set a shorter one",
                        self.drainer_id
                    ),
                )
            }),
        }
    }

    /// The keyspace this sync owns on the target (`[filter]`).
    pub fn keyspace(&self) -> Result<OwnedKeyspace, ApplyConfigError> {
        self.filter.keyspace().map_err(|error| ApplyConfigError {
            field: error.field,
            reason: error.reason,
        })
    }

    /// Where the target's password comes from, besides its URL.
    pub fn password_source(&self) -> PasswordSource {
        PasswordSource::from_keys(
            "target-password",
            self.target_password_file.as_deref(),
            self.target_password_env.as_deref(),
        )
    }

    /// The parsed target address, with its password read from its file or
    /// variable: the first of the seed list when `target` is one.
    pub fn target_url(&self) -> Result<RedisUrl, ApplyConfigError> {
        let mut seeds = self.target_seeds()?;
        Ok(seeds.swap_remove(0))
    }

    /// Every address of `target`: one, or a comma-separated seed list of a
    /// Redis Cluster (`redis://user:pass@host1:port,host2:port`: the first
    /// in full, the others may be bare `host:port` and then take the first
    /// one's credentials).
    pub fn target_seeds(&self) -> Result<Vec<RedisUrl>, ApplyConfigError> {
        let mut parts = self.target.split(',').map(str::trim);
        let first = SecretUrl::from(parts.next().unwrap_or(""));
        let url = first
            .parse_with(&self.password_source())
            .map_err(|e| bad("target", e.to_string()))?;
        let mut seeds = vec![url.clone()];
        for part in parts.filter(|p| !p.is_empty()) {
            let mut seed = RedisUrl::parse(part).map_err(|e| bad("target", e.to_string()))?;
            if seed.user.is_none() && seed.password.is_none() {
                seed.user = url.user.clone();
                seed.password = url.password.clone();
            }
            if seed.db != 0 {
                return Err(bad("target", "a db in a seed address is not supported"));
            }
            seeds.push(seed);
        }
        let url = seeds[0].clone();
        if url.db != 0 {
            return Err(bad(
                "target",
                format!(
                    "a db in the URL (/{}) is not supported: records are applied in the db they were written in",
                    url.db
                ),
            ));
        }
        Ok(seeds)
    }

    /// Checks values that would make the applier misbehave rather than fail.
    pub fn validate(self) -> Result<ApplyConfig, ApplyConfigError> {
        let id_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
        if self.drainer_id.is_empty()
            || self.drainer_id.len() > MAX_DRAINER_ID_LEN
            || !self.drainer_id.bytes().all(id_char)
        {
            return Err(bad(
                "drainer-id",
                format!(
                    "{:?} must be 1 to {MAX_DRAINER_ID_LEN} bytes of [A-Za-z0-9._-]",
                    self.drainer_id
                ),
            ));
        }
        self.target_url()?;
        self.downstream_id()?;
        self.keyspace()?;
        if self.foreign_writes_window.0.is_zero()
            || self.foreign_writes_window.0 > Duration::from_secs(10)
        {
            return Err(bad("foreign-writes-window", "must be from 1ms to 10s"));
        }
        if !self.foreign_writes_every.0.is_zero()
            && self.foreign_writes_every.0 < self.foreign_writes_window.0
        {
            return Err(bad(
                "foreign-writes-every",
                "must be 0s (never) or at least foreign-writes-window",
            ));
        }
        if self.retain_applied.0 > Duration::from_secs(3600) {
            return Err(bad("retain-applied", "must be at most 1h"));
        }
        if self.batch_max_entries == 0 || self.batch_max_entries > 1_000_000 {
            return Err(bad("batch-max-entries", "must be 1 to 1000000"));
        }
        if self.batch_max_bytes.0 == 0 || self.batch_max_bytes.0 > 1 << 30 {
            return Err(bad("batch-max-bytes", "must be 1B to 1GiB"));
        }
        if self.retry_backoff_min.0.is_zero() {
            return Err(bad("retry-backoff-min", "must be more than 0"));
        }
        if self.retry_backoff_max.0 < self.retry_backoff_min.0 {
            return Err(bad(
                "retry-backoff-max",
                format!(
                    "{} is shorter than retry-backoff-min {}",
                    self.retry_backoff_max, self.retry_backoff_min
                ),
            ));
        }
        if self.idle_poll.0.is_zero() || self.idle_poll.0 > Duration::from_secs(60) {
            return Err(bad("idle-poll", "must be more than 0 and at most 60s"));
        }
        if self.connect_timeout.0.is_zero() {
            return Err(bad("connect-timeout", "must be more than 0"));
        }
        if self.reply_timeout.0.is_zero() {
            return Err(bad("reply-timeout", "must be more than 0"));
        }
        if self.load_window == 0 || self.load_window > 1_000_000 {
            return Err(bad("load-window", "must be 1 to 1000000"));
        }
        if self
            .dead_letter_dir
            .as_ref()
            .is_some_and(|dir| dir.as_os_str().is_empty())
        {
            return Err(bad("dead-letter-dir", "must not be empty"));
        }
        if self.on_refused == OnRefused::SkipAndRecord && self.dead_letter_dir.is_none() {
            return Err(bad(
                "on-refused",
                "\"skip-and-record\" needs a dead-letter-dir to record what it skips",
            ));
        }
        if self.restore_max_bytes.0 > 512 << 20 {
            return Err(bad(
                "restore-max-bytes",
                "at most 512MiB (Redis' largest bulk string)",
            ));
        }
        if self.expire_grace.0 > super::expire::MAX_EXPIRE_GRACE {
            return Err(bad("expire-grace", "must be at most 30d"));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ApplyConfig, String> {
        let cfg: ApplyConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let cfg = ApplyConfig::default().validate().unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"batch-max-bytes\":\"2MiB\""), "{json}");
        assert!(json.contains("\"expire-grace\":\"5m\""), "{json}");
        let back: ApplyConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn errors_name_the_field() {
        let unknown = parse(r#"{"batch-size": 3}"#).unwrap_err();
        assert!(unknown.contains("batch-size"), "{unknown}");
        let cases = [
            (r#"{"drainer-id": "a:b"}"#, "apply.drainer-id"),
            (r#"{"drainer-id": ""}"#, "apply.drainer-id"),
            (r#"{"target": "http://x"}"#, "apply.target"),
            (r#"{"target": "redis://h:1/3"}"#, "apply.target"),
            (r#"{"batch-max-entries": 0}"#, "apply.batch-max-entries"),
            (r#"{"batch-max-bytes": "0B"}"#, "apply.batch-max-bytes"),
            (
                r#"{"retry-backoff-min": "2s", "retry-backoff-max": "1s"}"#,
                "apply.retry-backoff-max",
            ),
            (r#"{"idle-poll": "0ms"}"#, "apply.idle-poll"),
            (r#"{"retain-applied": "2h"}"#, "apply.retain-applied"),
            (r#"{"load-window": 0}"#, "apply.load-window"),
            (r#"{"wal-downstream": "a b"}"#, "apply.wal-downstream"),
            (r#"{"expire-grace": "31d"}"#, "apply.expire-grace"),
        ];
        for (text, field) in cases {
            let error = parse(text).unwrap_err();
            assert!(
                error.starts_with(&format!("invalid {field}:")),
                "{text}: {error}"
            );
        }
        let long_id = parse(&format!(r#"{{"drainer-id": "{}"}}"#, "d".repeat(60))).unwrap_err();
        assert!(
            long_id.starts_with("invalid apply.wal-downstream:"),
            "{long_id}"
        );
        let cfg = ApplyConfig::default();
        assert_eq!(cfg.downstream_id().unwrap().as_str(), "apply:drainer");
        let named = parse(r#"{"wal-downstream": "apply:blue"}"#).unwrap();
        assert_eq!(named.downstream_id().unwrap().as_str(), "apply:blue");
        let bad_unit = parse(r#"{"reply-timeout": "10"}"#).unwrap_err();
        assert!(bad_unit.contains("unknown unit"), "{bad_unit}");
        let skip = parse(r#"{"on-refused": "skip-and-record", "dead-letter-dir": "/x"}"#).unwrap();
        assert_eq!(skip.on_refused, OnRefused::SkipAndRecord);
        let unknown = parse(r#"{"on-refused": "ignore"}"#).unwrap_err();
        assert!(unknown.contains("unknown variant"), "{unknown}");
        let no_dir = parse(r#"{"on-refused": "skip-and-record"}"#).unwrap_err();
        assert!(no_dir.starts_with("invalid apply.on-refused:"), "{no_dir}");
        let empty = parse(r#"{"dead-letter-dir": ""}"#).unwrap_err();
        assert!(
            empty.starts_with("invalid apply.dead-letter-dir:"),
            "{empty}"
        );
    }
}
