//! A sync task of `ferry serve`: what an operator asks for ([`TaskSpec`]),
//! what the task store keeps ([`TaskRecord`], never a password), and the
//! `ferry sync` config a run is built from ([`TaskRecord::sync_config`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apply::{ExistingData, FilterConfig};
use crate::config_units::HumanDuration;
use crate::node::config::ConflictPolicy;
use crate::node::{SyncConfig, SyncOverrides};
use crate::redis::url::RedisUrl;
use crate::secret::SecretUrl;

/// Longest task name.
pub const NAME_MAX: usize = 48;

/// Longest source or target address list, and password.
const FIELD_MAX: usize = 4096;

/// Version of the stored [`TaskRecord`] layout.
pub const RECORD_VERSION: u32 = 1;

/// Which way a task replicates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    OneWay,
    TwoWay,
}

/// Where a task is (docs/API.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Created,
    Precheck,
    FullSync,
    Incremental,
    Stopped,
    Failed,
    Canceled,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Created,
        TaskState::Precheck,
        TaskState::FullSync,
        TaskState::Incremental,
        TaskState::Stopped,
        TaskState::Failed,
        TaskState::Canceled,
    ];

    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Created => "CREATED",
            TaskState::Precheck => "PRECHECK",
            TaskState::FullSync => "FULL_SYNC",
            TaskState::Incremental => "INCREMENTAL",
            TaskState::Stopped => "STOPPED",
            TaskState::Failed => "FAILED",
            TaskState::Canceled => "CANCELED",
        }
    }
}

/// A task's options (the `ferry sync` flags it takes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbs: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_key_prefix: Option<Vec<String>>,
}

/// What `POST /api/v1/tasks` and `POST /api/v1/precheck` take.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub source_password: Option<String>,
    #[serde(default)]
    pub target_password: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub options: TaskOptions,
}

impl std::fmt::Debug for TaskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskSpec")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("target", &self.target)
            .field(
                "source_password",
                &self.source_password.as_ref().map(|_| "***"),
            )
            .field(
                "target_password",
                &self.target_password.as_ref().map(|_| "***"),
            )
            .field("mode", &self.mode)
            .field("options", &self.options)
            .finish()
    }
}

/// A spec that cannot become a task: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn spec_error(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The last precheck of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecheckSummary {
    /// `PASS`, `WARN` or `FAIL`.
    pub verdict: String,
    /// The table `ferry precheck` prints.
    pub table: String,
}

/// What the task store keeps of a task. No password: those are files in
/// the task's directory ([`password_file`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub version: u32,
    pub name: String,
    pub source: String,
    pub target: String,
    pub mode: Mode,
    pub options: TaskOptions,
    pub state: TaskState,
    pub error: Option<String>,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub precheck: Option<PrecheckSummary>,
    pub source_password: bool,
    pub target_password: bool,
    /// Its sync was started once (so it may have written keys to cancel).
    #[serde(default)]
    pub started: bool,
}

/// Which side a password belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

/// Where a task's password for `side` is kept (mode 0600).
pub fn password_file(task_dir: &Path, side: Side) -> PathBuf {
    task_dir.join(match side {
        Side::Source => "source.password",
        Side::Target => "target.password",
    })
}

/// The directory of the sync a task runs (its WAL, admin.addr, conflict
/// log) inside the task's directory.
pub fn sync_dir(task_dir: &Path) -> PathBuf {
    task_dir.join("sync")
}

fn check_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    match ok {
        true => Ok(()),
        false => Err(spec_error(
            "name",
            format!(
                "{name:?}: 1 to {NAME_MAX} of a-z, 0-9 and '-', starting with a letter or digit"
            ),
        )),
    }
}

/// Checks one side's address list: `redis://[user@]host:port`, or a
/// cluster's comma-separated seeds; never a password.
fn check_address(field: &str, value: &str) -> Result<(), SpecError> {
    if value.trim().is_empty() {
        return Err(spec_error(field, "missing: give redis://host:port"));
    }
    if value.len() > FIELD_MAX {
        return Err(spec_error(field, format!("longer than {FIELD_MAX} bytes")));
    }
    for address in value.split(',') {
        let url = RedisUrl::parse(address.trim()).map_err(|e| spec_error(field, e.to_string()))?;
        if url.password.is_some() {
            return Err(spec_error(
                field,
                format!("holds a password: give it in {field}_password, which is never shown"),
            ));
        }
    }
    Ok(())
}

impl TaskSpec {
    /// Checks every field that can be checked without the servers: the
    /// name, the addresses, the options (by building the sync's config).
    pub fn check(&self, tasks_dir: &Path) -> Result<(), SpecError> {
        check_name(&self.name)?;
        check_address("source", &self.source)?;
        check_address("target", &self.target)?;
        for (field, password) in [
            ("source_password", &self.source_password),
            ("target_password", &self.target_password),
        ] {
            if let Some(password) = password {
                if password.is_empty() || password.len() > FIELD_MAX || password.contains('\n') {
                    return Err(spec_error(
                        field,
                        format!("must be 1 to {FIELD_MAX} bytes, without a newline"),
                    ));
                }
            }
        }
        // Every other field as `ferry sync` checks it; the passwords are
        // not written yet, so the config is built without them.
        let mut overrides = self.record(0).overrides(&tasks_dir.join(&self.name))?;
        overrides.source_password_file = None;
        overrides.target_password_file = None;
        SyncConfig::build(None, overrides).map_err(build_error)?;
        Ok(())
    }

    /// The record of a new task (state CREATED), without its passwords.
    pub fn record(&self, now_unix_ms: u64) -> TaskRecord {
        TaskRecord {
            version: RECORD_VERSION,
            name: self.name.clone(),
            source: self.source.trim().to_string(),
            target: self.target.trim().to_string(),
            mode: self.mode,
            options: self.options.clone(),
            state: TaskState::Created,
            error: None,
            created_unix_ms: now_unix_ms,
            updated_unix_ms: now_unix_ms,
            precheck: None,
            source_password: self.source_password.is_some(),
            target_password: self.target_password.is_some(),
            started: false,
        }
    }
}

/// `ferry sync`'s refusal of a task's config, by field.
fn build_error(error: crate::node::NodeConfigError) -> SpecError {
    match error {
        crate::node::NodeConfigError::Invalid { field, reason, .. } => spec_error(field, reason),
        other => spec_error("task", other.to_string()),
    }
}

impl TaskRecord {
    /// The `ferry sync` flags of this task, its sync living in `task_dir`.
    fn overrides(&self, task_dir: &Path) -> Result<SyncOverrides, SpecError> {
        let options = &self.options;
        let wal_ttl = options
            .wal_ttl
            .as_deref()
            .map(|text| text.parse::<HumanDuration>())
            .transpose()
            .map_err(|e| spec_error("options.wal_ttl", e.to_string()))?;
        let existing_data = options
            .existing_data
            .as_deref()
            .map(|text| text.parse::<ExistingData>())
            .transpose()
            .map_err(|e| spec_error("options.existing_data", e))?;
        if let Some(conflict) = &options.conflict {
            let known = [
                ConflictPolicy::Report,
                ConflictPolicy::SourceWins,
                ConflictPolicy::TargetWins,
            ];
            if !known.iter().any(|p| p.as_str() == conflict) {
                return Err(spec_error(
                    "options.conflict",
                    format!("{conflict:?}: report, source-wins or target-wins"),
                ));
            }
            if self.mode != Mode::TwoWay {
                return Err(spec_error(
                    "options.conflict",
                    "only a two-way task has conflicts",
                ));
            }
        }
        let password = |side, given: bool| given.then(|| password_file(task_dir, side));
        Ok(SyncOverrides {
            source: Some(SecretUrl::new(self.source.clone())),
            target: Some(SecretUrl::new(self.target.clone())),
            source_password_file: password(Side::Source, self.source_password),
            target_password_file: password(Side::Target, self.target_password),
            data_dir: Some(sync_dir(task_dir)),
            // Each task's own admin API, on a free loopback port (in
            // <task dir>/sync/admin.addr): `ferry status --data-dir` works.
            admin: Some("127.0.0.1:0".into()),
            // Internal, on loopback: neither token nor TLS.
            admin_token_file: None,
            admin_tls_cert_file: None,
            admin_tls_key_file: None,
            id: Some(self.name.clone()),
            wal_ttl,
            filter: FilterConfig {
                dbs: options.dbs.clone(),
                db_map: None,
                key_prefix: options.key_prefix.clone(),
                exclude_key_prefix: options.exclude_key_prefix.clone(),
            },
            existing_data,
            two_way: self.mode == Mode::TwoWay,
            conflict: options.conflict.clone(),
            no_password_env: true,
        })
    }

    /// The config the task's sync runs with. Err: a field of the task that
    /// `ferry sync` refuses, named. (A missing password file is found when
    /// the sync starts, and fails it.)
    pub fn sync_config(&self, task_dir: &Path) -> Result<SyncConfig, SpecError> {
        let overrides = self.overrides(task_dir)?;
        SyncConfig::build(None, overrides).map_err(build_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TaskSpec {
        TaskSpec {
            name: "orders".into(),
            source: "redis://127.0.0.1:6379".into(),
            target: "redis://127.0.0.1:6380".into(),
            ..TaskSpec::default()
        }
    }

    #[test]
    fn names_are_checked() {
        let dir = Path::new("/tmp/tasks");
        for bad in ["", "-a", "A", "a b", "a/b", "..", &"a".repeat(NAME_MAX + 1)] {
            let spec = TaskSpec {
                name: bad.into(),
                ..spec()
            };
            assert_eq!(spec.check(dir).unwrap_err().field, "name", "{bad:?}");
        }
        assert!(spec().check(dir).is_ok());
    }

    #[test]
    fn a_password_in_an_address_is_refused_without_showing_it() {
        let spec = TaskSpec {
            source: "redis://:hunter2@127.0.0.1:6379".into(),
            ..spec()
        };
        let error = spec.check(Path::new("/tmp/t")).unwrap_err();
        assert_eq!(error.field, "source");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn options_are_checked_by_field() {
        let dir = Path::new("/tmp/t");
        let cases = [
            (
                TaskOptions {
                    wal_ttl: Some("soon".into()),
                    ..TaskOptions::default()
                },
                "options.wal_ttl",
            ),
            (
                TaskOptions {
                    existing_data: Some("merge".into()),
                    ..TaskOptions::default()
                },
                "options.existing_data",
            ),
            (
                TaskOptions {
                    conflict: Some("report".into()),
                    ..TaskOptions::default()
                },
                "options.conflict",
            ),
        ];
        for (options, field) in cases {
            let spec = TaskSpec { options, ..spec() };
            assert_eq!(spec.check(dir).unwrap_err().field, field);
        }
    }

    #[test]
    fn the_sync_config_follows_the_task() {
        let spec = TaskSpec {
            source_password: Some("pw".into()),
            options: TaskOptions {
                wal_ttl: Some("30m".into()),
                dbs: Some(vec![0, 2]),
                ..TaskOptions::default()
            },
            ..spec()
        };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(password_file(dir, Side::Source), "pw").unwrap();
        let cfg = spec.record(1).sync_config(dir).unwrap();
        assert_eq!(cfg.id, "orders");
        assert_eq!(cfg.data_dir, dir.join("sync"));
        assert_eq!(cfg.admin, "127.0.0.1:0");
        assert_eq!(
            cfg.listener.source_password_file,
            Some(dir.join("source.password"))
        );
        assert_eq!(cfg.apply.target_password_file, None);
        assert_eq!(cfg.apply.filter.dbs, Some(vec![0, 2]));
        assert!(!cfg.two_way);
    }

    #[test]
    fn states_are_spelled_as_serde_spells_them() {
        for state in TaskState::ALL {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
        }
    }

    #[test]
    fn debug_never_shows_a_password() {
        let spec = TaskSpec {
            source_password: Some("hunter2".into()),
            ..spec()
        };
        assert!(!format!("{spec:?}").contains("hunter2"));
    }
}
