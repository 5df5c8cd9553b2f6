//! Config files of the nodes: `conf/listener.toml`, `conf/drainer.toml`,
//! `conf/sync.toml`.
//!
//! In: TOML text (kebab-case keys; unknown keys refused) and, for `ferry
//! sync`, command-line overrides. Out: checked configs whose errors name the
//! file, the field and why ([`NodeConfigError`]). Each section reuses the
//! config struct of the stage it tunes ([`ListenerConfig`],
//! [`ShipperConfig`], [`WalConfig`], [`ApplyConfig`],
//! [`DrainerServiceConfig`]); their docs are the reference of every key.
//!
//! The WAL of a node lives in `<data-dir>/wal` unless `[wal] dir` says
//! otherwise; `<data-dir>` also holds `admin.addr` (the bound admin address),
//! `stopped-syncs` (shippers stopped by `ferry stop-sync`) and, on a
//! drainer, `dead-letter/` (entries skipped by `ferry skip` or `on-refused
//! = "skip-and-record"`) unless `[apply] dead-letter-dir` says otherwise.
//!
//! Secrets (passwords in the source and target URLs, the listener ↔
//! drainer `secret`) may be written inline or come from a file or an
//! environment variable (`*-file`, `*-env` keys; see [`crate::secret`]);
//! they are read when the config is loaded, given twice they are refused,
//! and `Debug`/`Serialize` of every config show them as `***`. A TOML error
//! names the file, the line, the column and the key, and never quotes the
//! file's text (whose bad line may hold a secret).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::admin::AdminAccess;
use crate::apply::{ApplyConfig, ExistingData, FilterConfig};
use crate::listener::ListenerConfig;
use crate::secret::{PasswordSource, Secret, SecretUrl, SOURCE_PASSWORD_ENV, TARGET_PASSWORD_ENV};
use crate::ship::tls::{ClientTls, ClientTlsOptions, ServerTls};
use crate::ship::{AllowedListener, DrainerServiceConfig, ShipperConfig};
use crate::wal::WalConfig;

/// Default address of the admin API.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:7390";

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    #[error("cannot read config {path}: {error}")]
    Read {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: invalid {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

/// A drainer a listener ships to (`[[drainers]]` of listener.toml).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DrainerPeer {
    /// The drainer's name: the listener's WAL keeps entries until this
    /// drainer has them (up to `wal-ttl`).
    pub id: String,
    /// `http://host:port` of the drainer's ship endpoint; `https://host:port`
    /// for a drainer with `[drainer.tls]`.
    pub endpoint: String,
    /// The secret this drainer expects from this listener (at least 8
    /// bytes). Give it here, or in `secret-file` or `secret-env`.
    #[serde(default)]
    pub secret: Secret,
    /// A file holding the secret (one trailing newline dropped), read when
    /// the config is loaded. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// The name of an environment variable holding the secret. Default:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// CA certificates (PEM) the drainer's certificate must chain to
    /// (`https://` only). Default: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// This listener's certificate (PEM), for a drainer with
    /// `client-ca-file` (mutual TLS); with `tls-key-file`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `tls-cert-file`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// The name the drainer's certificate must carry. Default: the
    /// endpoint's host (a DNS name or an IP address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
}

impl DrainerPeer {
    /// The TLS options of an `https://` endpoint; `None` for `http://`.
    pub fn tls_options(&self) -> Option<ClientTlsOptions> {
        self.endpoint
            .starts_with("https://")
            .then(|| ClientTlsOptions {
                ca_file: self.tls_ca_file.clone(),
                cert_file: self.tls_cert_file.clone(),
                key_file: self.tls_key_file.clone(),
                server_name: self.tls_server_name.clone(),
            })
    }

    /// The `tls-*` keys that are set, by name.
    fn tls_keys_set(&self) -> Vec<&'static str> {
        [
            ("tls-ca-file", self.tls_ca_file.is_some()),
            ("tls-cert-file", self.tls_cert_file.is_some()),
            ("tls-key-file", self.tls_key_file.is_some()),
            ("tls-server-name", self.tls_server_name.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

/// `ferry listener --config FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ListenerNodeConfig {
    /// Directory of the WAL and of the node's state files. Required.
    pub data_dir: PathBuf,
    /// Address of the admin API. Default: `"127.0.0.1:7390"`.
    #[serde(default = "default_admin")]
    pub admin: String,
    /// A file holding the admin API's bearer token (at least 16
    /// characters, read when the config is loaded): every admin call and
    /// `GET /metrics` must carry it. Required when `admin` is not a
    /// loopback address. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin API's TLS certificate chain (PEM); with
    /// `admin-tls-key-file`, the admin port speaks TLS only. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `admin-tls-cert-file`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_tls_key_file: Option<PathBuf>,
    /// What the `admin-*-file` keys give, once loaded.
    #[serde(skip)]
    pub admin_access: AdminAccess,
    /// The source and how it is replicated (`source` is required).
    pub listener: ListenerConfig,
    #[serde(default)]
    pub wal: WalConfig,
    /// Tuning of every shipper.
    #[serde(default)]
    pub ship: ShipperConfig,
    /// Where the partition is shipped; at least one.
    pub drainers: Vec<DrainerPeer>,
}

/// `ferry drainer --config FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DrainerNodeConfig {
    pub data_dir: PathBuf,
    #[serde(default = "default_admin")]
    pub admin: String,
    /// A file holding the admin API's bearer token (at least 16
    /// characters, read when the config is loaded): every admin call and
    /// `GET /metrics` must carry it. Required when `admin` is not a
    /// loopback address. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin API's TLS certificate chain (PEM); with
    /// `admin-tls-key-file`, the admin port speaks TLS only. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `admin-tls-cert-file`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_tls_key_file: Option<PathBuf>,
    /// What the `admin-*-file` keys give, once loaded.
    #[serde(skip)]
    pub admin_access: AdminAccess,
    /// Address the ship endpoint listens on, e.g. `"0.0.0.0:7391"`.
    pub listen: String,
    /// The endpoint's limits and the listeners allowed to ship here.
    pub drainer: DrainerServiceConfig,
    #[serde(default)]
    pub wal: WalConfig,
    /// How every partition is applied to the target (`partition` is set per
    /// applier and ignored here).
    pub apply: ApplyConfig,
    /// The part of the target this drainer owns (default: every db).
    #[serde(default)]
    pub filter: FilterConfig,
}

/// `ferry sync --config FILE` (every key optional; command-line flags win).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SyncFileConfig {
    pub source: Option<SecretUrl>,
    /// A file holding the source's password (instead of writing it in
    /// `source`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_password_file: Option<PathBuf>,
    /// An environment variable holding the source's password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_password_env: Option<String>,
    pub target: Option<SecretUrl>,
    /// A file holding the target's password (instead of writing it in
    /// `target`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_password_file: Option<PathBuf>,
    /// An environment variable holding the target's password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_password_env: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub admin: Option<String>,
    /// A file holding the admin API's bearer token (at least 16
    /// characters, read when the config is loaded): every admin call and
    /// `GET /metrics` must carry it. Required when `admin` is not a
    /// loopback address. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin API's TLS certificate chain (PEM); with
    /// `admin-tls-key-file`, the admin port speaks TLS only. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `admin-tls-cert-file`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_tls_key_file: Option<PathBuf>,
    /// Name of this sync: the listener id, the drainer id and so the
    /// checkpoint key `__ferry:checkpoint:<id>:<partition>`. Default:
    /// `"ferry"`.
    pub id: Option<String>,
    #[serde(default)]
    pub listener: Option<ListenerConfig>,
    #[serde(default)]
    pub wal: Option<WalConfig>,
    #[serde(default)]
    pub ship: Option<ShipperConfig>,
    #[serde(default)]
    pub apply: Option<ApplyConfig>,
    #[serde(default)]
    pub filter: Option<FilterConfig>,
    /// Which WAL the appliers read (default `"auto"`).
    #[serde(default)]
    pub apply_from: Option<ApplyFrom>,
    /// Two-way sync (`--two-way`): the target's writes replicate back to
    /// the source (default false).
    #[serde(default)]
    pub two_way: Option<bool>,
    /// Two-way sync's conflict policy: `"report"` (the default and, for
    /// now, the only one built).
    #[serde(default)]
    pub conflict: Option<String>,
}

/// Which WAL the appliers of `ferry sync` read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApplyFrom {
    /// `"listener-wal"` unless the data dir holds a drainer WAL from an
    /// earlier ferry, which keeps `"drainer-wal"`.
    #[default]
    Auto,
    /// The listener's WAL, directly: each entry written and fsynced once.
    ListenerWal,
    /// The relayed path: shipped over gRPC on 127.0.0.1 into a second WAL
    /// (`<data-dir>/drainer`), as between `ferry listener` and `ferry
    /// drainer`.
    DrainerWal,
}

/// Everything `ferry sync` runs with, after flags and file are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    pub id: String,
    pub data_dir: PathBuf,
    pub admin: String,
    /// The admin API's token and TLS.
    pub admin_access: AdminAccess,
    pub listener: ListenerConfig,
    /// The listener's WAL (`<data-dir>/listener`).
    pub listener_wal: WalConfig,
    pub ship: ShipperConfig,
    /// The drainer's WAL (`<data-dir>/drainer`), with `apply_from` the
    /// relayed path.
    pub drainer_wal: WalConfig,
    pub apply: ApplyConfig,
    pub apply_from: ApplyFrom,
    /// Two-way sync: partition 0 replicates the source into the target,
    /// partition 1 the target into the source (`run::run_direct`).
    pub two_way: bool,
    /// Two-way sync's conflict policy (`super::conflicts`).
    pub conflict: ConflictPolicy,
}

/// What two-way sync does with a conflict (`super::conflicts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// Logged and counted; both writes applied as they came.
    #[default]
    Report,
    /// Also: once the target applied the source's write, the key as the
    /// target holds it then is written again on the target, which carries
    /// it to the source: both sides end with what the source's write left.
    SourceWins,
    /// The same the other way round.
    TargetWins,
}

impl ConflictPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::Report => "report",
            ConflictPolicy::SourceWins => "source-wins",
            ConflictPolicy::TargetWins => "target-wins",
        }
    }
}

/// `ferry sync` command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct SyncOverrides {
    pub source: Option<SecretUrl>,
    pub target: Option<SecretUrl>,
    /// `--source-password-file`.
    pub source_password_file: Option<PathBuf>,
    /// `--target-password-file`.
    pub target_password_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub admin: Option<String>,
    /// `--admin-token-file`.
    pub admin_token_file: Option<PathBuf>,
    /// `--admin-tls-cert-file`.
    pub admin_tls_cert_file: Option<PathBuf>,
    /// `--admin-tls-key-file`.
    pub admin_tls_key_file: Option<PathBuf>,
    pub id: Option<String>,
    pub wal_ttl: Option<crate::config_units::HumanDuration>,
    /// `--dbs`, `--db-map`, `--key-prefix`, `--exclude-key-prefix`: laid
    /// over the file's `[filter]` ([`FilterConfig::overridden_by`]).
    pub filter: FilterConfig,
    /// `--existing-data` (`[apply] existing-data`).
    pub existing_data: Option<ExistingData>,
    /// `--two-way` (set: on; unset: the file decides).
    pub two_way: bool,
    /// `--conflict`.
    pub conflict: Option<String>,
    /// Leave `FERRY_SOURCE_PASSWORD` / `FERRY_TARGET_PASSWORD` unread even
    /// when set (`ferry serve`: each task has its own passwords).
    pub no_password_env: bool,
}

fn default_admin() -> String {
    DEFAULT_ADMIN_ADDR.to_string()
}

fn read(path: &Path) -> Result<String, NodeConfigError> {
    std::fs::read_to_string(path).map_err(|error| NodeConfigError::Read {
        path: path.to_path_buf(),
        error,
    })
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, NodeConfigError> {
    toml::from_str(text).map_err(|error| NodeConfigError::Parse {
        path: path.to_path_buf(),
        message: toml_error_message(text, &error),
    })
}

/// A TOML error as one line: where (line, column), the key, what is wrong.
/// toml's own rendering quotes the offending line of the file, which may
/// hold a secret or a password; this never quotes the file, and masks in
/// toml's message (serde's "invalid type: integer `…`") every secret value
/// the file holds.
fn toml_error_message(text: &str, error: &toml::de::Error) -> String {
    // Without its input, toml renders the message and "in `key.path`" only.
    let mut bare = error.clone();
    bare.set_input(None);
    let rendered = bare.to_string();
    let mut lines = rendered.lines();
    let mut message = lines.next().unwrap_or("invalid TOML").trim().to_string();
    let mut key = lines
        .find_map(|l| l.strip_prefix("in `").and_then(|k| k.strip_suffix('`')))
        .map(str::to_string);
    for secret in secret_values(text) {
        message = message.replace(&secret, crate::secret::REDACTED);
    }
    let mut out = String::new();
    if let Some(span) = error.span() {
        let before = &text.as_bytes()[..span.start.min(text.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        out.push_str(&format!("line {line}, column {column}"));
        if key.is_none() {
            key = key_at_line(text, line);
        }
    }
    if let Some(key) = key {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("(key {key})"));
    }
    if out.is_empty() {
        message
    } else {
        format!("{out}: {message}")
    }
}

/// Whether a key holds a secret value itself (not a `*-file` path or a
/// `*-env` variable name).
fn is_secret_key(key: &str) -> bool {
    let key = key
        .trim()
        .trim_matches(|c| c == '"' || c == '\'')
        .to_ascii_lowercase();
    (key.contains("secret") || key.contains("password"))
        && !key.ends_with("-file")
        && !key.ends_with("-env")
}

/// The secret values written in `text`: values of secret keys, and the
/// passwords of URLs (`scheme://user:password@…`), found line by line
/// whether or not the file parses.
fn secret_values(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        if let Some((key, value)) = line.split_once('=') {
            if is_secret_key(key) {
                let value = value.trim();
                let token = match value.chars().next() {
                    Some(q @ ('"' | '\'')) => value[1..].split(q).next().unwrap_or(""),
                    _ => value
                        .split(|c: char| c.is_whitespace() || c == '#')
                        .next()
                        .unwrap_or(""),
                };
                if !token.is_empty() {
                    found.push(token.to_string());
                }
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("://") {
            rest = &rest[at + 3..];
            let authority = rest
                .split(|c: char| c == '/' || c == '"' || c == '\'' || c.is_whitespace())
                .next()
                .unwrap_or("");
            if let Some((userinfo, _)) = authority.rsplit_once('@') {
                if let Some((_, password)) = userinfo.split_once(':') {
                    if !password.is_empty() {
                        found.push(password.to_string());
                    }
                }
            }
        }
    }
    // Longest first, so that a secret containing another is masked whole.
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    found
}

/// The key written on line `line` (1-based) of `text`, with the table it is
/// in: `drainers.secret`, `listener.source`.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?.trim();
    let table = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = here
        .split_once('=')
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('#'));
    match (table, key) {
        (Some(table), Some(key)) => Some(format!("{table}.{key}")),
        (None, Some(key)) => Some(key),
        (Some(table), None) if here.starts_with('[') => Some(table),
        _ => None,
    }
}

fn invalid(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> NodeConfigError {
    NodeConfigError::Invalid {
        path: path.to_path_buf(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// The WAL dir: `[wal] dir` if set, else `<data-dir>/<default_sub>`.
fn wal_in(mut wal: WalConfig, data_dir: &Path, default_sub: &str) -> WalConfig {
    if wal.dir == WalConfig::default().dir {
        wal.dir = data_dir.join(default_sub);
    }
    wal
}

/// The dead-letter dir: `[apply] dead-letter-dir` if set, else
/// `<data-dir>/dead-letter`.
fn dead_letter_in(mut apply: ApplyConfig, data_dir: &Path) -> ApplyConfig {
    if apply.dead_letter_dir.is_none() {
        apply.dead_letter_dir = Some(data_dir.join("dead-letter"));
    }
    apply
}

fn check_wal(path: &Path, section: &str, wal: WalConfig) -> Result<WalConfig, NodeConfigError> {
    wal.validate()
        .map_err(|e| invalid(path, format!("{section}.{}", e.field), e.reason))
}

fn check_admin(path: &Path, admin: &str) -> Result<(), NodeConfigError> {
    admin
        .parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|e| invalid(path, "admin", format!("{admin:?} is not ip:port ({e})")))
}

/// The admin API's access from its keys: the token read, the TLS files
/// checked; a token is required when `admin` is not loopback.
fn admin_access(
    path: &Path,
    admin: &str,
    token_file: Option<&Path>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
) -> Result<AdminAccess, NodeConfigError> {
    let token = token_file
        .map(|file| crate::secret::read_token_file("admin-token-file", file))
        .transpose()
        .map_err(|reason| invalid(path, "admin-token-file", reason))?;
    let field = match (&tls_cert_file, &tls_key_file) {
        (None, Some(_)) => "admin-tls-cert-file",
        (Some(_), None) => "admin-tls-key-file",
        _ => "admin-tls-cert-file",
    };
    let access = AdminAccess {
        token,
        tls_cert_file,
        tls_key_file,
    };
    access
        .tls_config()
        .map_err(|reason| invalid(path, field, reason))?;
    let beyond_loopback = admin
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|addr| !addr.ip().is_loopback());
    if beyond_loopback && access.token.is_none() {
        return Err(invalid(
            path,
            "admin-token-file",
            format!(
                "admin {admin} listens beyond loopback: give admin-token-file \
                 (--admin-token-file), a bearer token every admin call must carry"
            ),
        ));
    }
    Ok(access)
}

fn check_data_dir(path: &Path, data_dir: &Path) -> Result<(), NodeConfigError> {
    if data_dir.as_os_str().is_empty() {
        return Err(invalid(path, "data-dir", "must not be empty"));
    }
    Ok(())
}

impl ListenerNodeConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<ListenerNodeConfig, NodeConfigError> {
        Self::from_toml(path, &read(path)?)
    }

    /// Parses and checks `text` (`path` only names it in errors).
    pub fn from_toml(path: &Path, text: &str) -> Result<ListenerNodeConfig, NodeConfigError> {
        parse::<ListenerNodeConfig>(path, text)?.checked(path)
    }

    /// Checks a parsed config (`path` only names it in errors).
    fn checked(self, path: &Path) -> Result<ListenerNodeConfig, NodeConfigError> {
        let mut cfg = self;
        check_data_dir(path, &cfg.data_dir)?;
        check_admin(path, &cfg.admin)?;
        cfg.admin_access = admin_access(
            path,
            &cfg.admin,
            cfg.admin_token_file.as_deref(),
            cfg.admin_tls_cert_file.clone(),
            cfg.admin_tls_key_file.clone(),
        )?;
        cfg.listener
            .validate()
            .map_err(|e| invalid(path, format!("listener.{}", e.field), e.reason))?;
        cfg.wal = check_wal(path, "wal", wal_in(cfg.wal, &cfg.data_dir, "wal"))?;
        cfg.ship = cfg
            .ship
            .validate()
            .map_err(|e| invalid(path, "ship", e.to_string()))?;
        if cfg.drainers.is_empty() {
            return Err(invalid(path, "drainers", "name at least one [[drainers]]"));
        }
        for (index, peer) in cfg.drainers.iter_mut().enumerate() {
            PasswordSource::from_keys(
                "secret",
                peer.secret_file.as_deref(),
                peer.secret_env.as_deref(),
            )
            .resolve_into(&mut peer.secret, "secret")
            .map_err(|e| invalid(path, format!("drainers[{index}].secret"), e.to_string()))?;
        }
        for (index, peer) in cfg.drainers.iter().enumerate() {
            check_peer(path, index, peer)?;
            if cfg.drainers[..index].iter().any(|p| p.id == peer.id) {
                return Err(invalid(
                    path,
                    format!("drainers[{index}].id"),
                    format!("{:?} is listed twice", peer.id),
                ));
            }
        }
        Ok(cfg)
    }
}

fn check_peer(path: &Path, index: usize, peer: &DrainerPeer) -> Result<(), NodeConfigError> {
    crate::wal::DownstreamId::new(peer.id.clone()).map_err(|_| {
        invalid(
            path,
            format!("drainers[{index}].id"),
            format!("{:?} must be 1 to 64 bytes of [A-Za-z0-9._:-]", peer.id),
        )
    })?;
    if !(peer.endpoint.starts_with("http://") || peer.endpoint.starts_with("https://")) {
        return Err(invalid(
            path,
            format!("drainers[{index}].endpoint"),
            format!(
                "{:?} must look like http://host:port (or https://host:port for TLS)",
                peer.endpoint
            ),
        ));
    }
    match peer.tls_options() {
        Some(options) => {
            ClientTls::new(&peer.endpoint, &options)
                .map_err(|e| invalid(path, format!("drainers[{index}].{}", e.field), e.reason))?;
        }
        None => {
            if let Some(key) = peer.tls_keys_set().first() {
                return Err(invalid(
                    path,
                    format!("drainers[{index}].{key}"),
                    format!("TLS needs an https:// endpoint, not {:?}", peer.endpoint),
                ));
            }
        }
    }
    if peer.secret.is_empty() {
        return Err(invalid(
            path,
            format!("drainers[{index}].secret"),
            "is required: give secret, secret-file or secret-env",
        ));
    }
    if peer.secret.len() < 8 {
        return Err(invalid(
            path,
            format!("drainers[{index}].secret"),
            "must be at least 8 bytes",
        ));
    }
    Ok(())
}

impl DrainerNodeConfig {
    pub fn load(path: &Path) -> Result<DrainerNodeConfig, NodeConfigError> {
        Self::from_toml(path, &read(path)?)
    }

    pub fn from_toml(path: &Path, text: &str) -> Result<DrainerNodeConfig, NodeConfigError> {
        parse::<DrainerNodeConfig>(path, text)?.checked(path)
    }

    /// Checks a parsed config (`path` only names it in errors).
    fn checked(self, path: &Path) -> Result<DrainerNodeConfig, NodeConfigError> {
        let mut cfg = self;
        check_data_dir(path, &cfg.data_dir)?;
        check_admin(path, &cfg.admin)?;
        cfg.admin_access = admin_access(
            path,
            &cfg.admin,
            cfg.admin_token_file.as_deref(),
            cfg.admin_tls_cert_file.clone(),
            cfg.admin_tls_key_file.clone(),
        )?;
        cfg.listen.parse::<std::net::SocketAddr>().map_err(|e| {
            invalid(
                path,
                "listen",
                format!("{:?} is not ip:port ({e})", cfg.listen),
            )
        })?;
        if cfg.drainer.listeners.is_empty() {
            return Err(invalid(
                path,
                "drainer.listeners",
                "name at least one [[drainer.listeners]] allowed to ship here",
            ));
        }
        for (index, allowed) in cfg.drainer.listeners.iter_mut().enumerate() {
            let field = format!("drainer.listeners[{index}].secret");
            PasswordSource::from_keys(
                "secret",
                allowed.secret_file.as_deref(),
                allowed.secret_env.as_deref(),
            )
            .resolve_into(&mut allowed.secret, "secret")
            .map_err(|e| invalid(path, field.clone(), e.to_string()))?;
            if allowed.secret.is_empty() {
                return Err(invalid(
                    path,
                    field,
                    "is required: give secret, secret-file or secret-env",
                ));
            }
        }
        cfg.drainer = cfg
            .drainer
            .validate()
            .map_err(|e| invalid(path, "drainer", e.to_string()))?;
        if let Some(tls) = &cfg.drainer.tls {
            ServerTls::new(tls)
                .map_err(|e| invalid(path, format!("drainer.tls.{}", e.field), e.reason))?;
        }
        cfg.wal = check_wal(path, "wal", wal_in(cfg.wal, &cfg.data_dir, "wal"))?;
        cfg.apply.filter = cfg.filter.clone();
        cfg.apply = dead_letter_in(cfg.apply, &cfg.data_dir)
            .validate()
            .map_err(|e| invalid(path, e.path(), e.reason))?;
        cfg.apply
            .target_url()
            .map_err(|e| invalid(path, e.path(), e.reason))?;
        Ok(cfg)
    }
}

/// Which side of a two-way pair a site is (`ferry site`, `[site] side`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteSide {
    /// Its server's data is the first full sync's: it is copied to side b,
    /// then both directions stream. Its listener is partition 0.
    A,
    /// Its server receives the first full sync (the drainer's
    /// `existing-data` rule applies), then its own writes go to side a from
    /// the exact end of that sync. Its listener is partition 1.
    B,
}

impl SiteSide {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteSide::A => "a",
            SiteSide::B => "b",
        }
    }
}

/// `[site]` of `ferry site --config FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SiteSection {
    /// `"a"` or `"b"` (see [`SiteSide`]). Required.
    pub side: SiteSide,
    /// Two-way sync's conflict policy (`super::conflicts`): side b's site
    /// finds the conflicts (both logs count the ids its checkpoints
    /// count), so only its file sets it. Default: `"report"`.
    #[serde(default)]
    pub conflict: ConflictPolicy,
    /// Side b: side a's server (`redis://[user[:password]@]host[:port]`; a
    /// cluster: any node). Needed for `source-wins`/`target-wins` (a repair
    /// may write A) and when either side is a Redis Cluster (side b counts
    /// A's masters and prepares A as the target of B's partitions).
    /// Default: none (A is a standalone server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SecretUrl>,
    /// A file holding `peer`'s password. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_password_file: Option<PathBuf>,
    /// An environment variable holding `peer`'s password. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_password_env: Option<String>,
}

/// `ferry site --config FILE`, as written: one site of a two-way sync
/// between two servers (each standalone or a Redis Cluster) in a
/// listener/drainer deployment (see conf/site-a.toml).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SiteFile {
    data_dir: PathBuf,
    #[serde(default = "default_admin")]
    admin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    admin_token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    admin_tls_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    admin_tls_key_file: Option<PathBuf>,
    listen: String,
    site: SiteSection,
    listener: ListenerConfig,
    #[serde(default)]
    wal: WalConfig,
    #[serde(default)]
    ship: ShipperConfig,
    drainers: Vec<DrainerPeer>,
    drainer: DrainerServiceConfig,
    #[serde(default)]
    apply: ApplyConfig,
    #[serde(default)]
    filter: FilterConfig,
}

/// `ferry site --config FILE`, checked: the site's listener (its server as
/// the source, shipping to the other site's drainer) and its drainer (the
/// other site's stream applied to its server), one data dir, one WAL.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteNodeConfig {
    pub site: SiteSection,
    /// `peer` with its password, parsed.
    pub peer: Option<crate::redis::url::RedisUrl>,
    /// The listener's half: `data-dir`, `admin`, `[listener]` (partition
    /// 0 on side a, 1 on side b; `super::site` sets side b's by the pair),
    /// `[wal]`, `[ship]`, `[[drainers]]`.
    pub listener: ListenerNodeConfig,
    /// The drainer's half: `listen`, `[drainer]`, `[apply]` (its target
    /// the listener's source), `[filter]`; the same data dir and WAL.
    pub drainer: DrainerNodeConfig,
}

impl SiteNodeConfig {
    pub fn load(path: &Path) -> Result<SiteNodeConfig, NodeConfigError> {
        Self::from_toml(path, &read(path)?)
    }

    pub fn from_toml(path: &Path, text: &str) -> Result<SiteNodeConfig, NodeConfigError> {
        let file: SiteFile = parse(path, text)?;
        let table: toml::Table = parse(path, text)?;
        let given = |section: &str, key: &str| {
            table
                .get(section)
                .and_then(|s| s.as_table())
                .is_some_and(|s| s.contains_key(key))
        };
        for key in ["target", "target-password-file", "target-password-env"] {
            if given("apply", key) {
                return Err(invalid(
                    path,
                    format!("apply.{key}"),
                    "leave it out: a site's drainer writes its own server, the listener's source",
                ));
            }
        }
        if given("listener", "partition") {
            return Err(invalid(
                path,
                "listener.partition",
                "leave it out: side a's partitions are 0 and up, side b's 1 (two standalone \
                 servers) or 1000 and up",
            ));
        }
        if file.drainers.len() != 1 {
            return Err(invalid(
                path,
                "drainers",
                "name exactly one [[drainers]]: the other site's drainer",
            ));
        }
        if file.drainer.listeners.len() != 1 {
            return Err(invalid(
                path,
                "drainer.listeners",
                "name exactly one [[drainer.listeners]]: the other site's listener",
            ));
        }
        let side = file.site.side;
        let mut listener = file.listener;
        listener.partition = match side {
            SiteSide::A => 0,
            SiteSide::B => 1,
        };
        let mut apply = file.apply;
        apply.target = listener.source.clone();
        apply.target_password_file = listener.source_password_file.clone();
        apply.target_password_env = listener.source_password_env.clone();
        if side == SiteSide::A {
            // Side a's drainer never loads a snapshot (two-way refuses any
            // load into a side that takes writes): its server's data stays.
            apply.existing_data = ExistingData::Keep;
        }
        if file.drainer.listeners[0].id == listener.id {
            return Err(invalid(
                path,
                "drainer.listeners[0].id",
                format!(
                    "{:?} is this site's own listener; name the other site's",
                    listener.id
                ),
            ));
        }
        let peer = match (&file.site.peer, side, file.site.conflict) {
            (Some(_), SiteSide::A, _) => {
                return Err(invalid(
                    path,
                    "site.peer",
                    "only side b's site repairs conflicts; leave it out on side a",
                ))
            }
            (_, SiteSide::A, policy) if policy != ConflictPolicy::Report => {
                return Err(invalid(
                    path,
                    "site.conflict",
                    "side b's site finds and repairs conflicts; set the policy in its file",
                ))
            }
            (None, SiteSide::B, policy) if policy != ConflictPolicy::Report => {
                return Err(invalid(
                    path,
                    "site.peer",
                    format!(
                        "conflict = \"{}\" writes the key again on either side: name side \
                         a's server",
                        policy.as_str()
                    ),
                ))
            }
            (Some(url), _, _) => Some(
                url.parse_with(&PasswordSource::from_keys(
                    "peer-password",
                    file.site.peer_password_file.as_deref(),
                    file.site.peer_password_env.as_deref(),
                ))
                .map_err(|e| invalid(path, "site.peer", e.to_string()))?,
            ),
            (None, _, _) => None,
        };
        let listener = ListenerNodeConfig {
            data_dir: file.data_dir.clone(),
            admin: file.admin.clone(),
            admin_token_file: file.admin_token_file.clone(),
            admin_tls_cert_file: file.admin_tls_cert_file.clone(),
            admin_tls_key_file: file.admin_tls_key_file.clone(),
            admin_access: AdminAccess::default(),
            listener,
            wal: file.wal.clone(),
            ship: file.ship,
            drainers: file.drainers,
        }
        .checked(path)?;
        let drainer = DrainerNodeConfig {
            data_dir: file.data_dir,
            admin: file.admin,
            admin_token_file: file.admin_token_file,
            admin_tls_cert_file: file.admin_tls_cert_file,
            admin_tls_key_file: file.admin_tls_key_file,
            admin_access: AdminAccess::default(),
            listen: file.listen,
            drainer: file.drainer,
            wal: file.wal,
            apply,
            filter: file.filter,
        }
        .checked(path)?;
        Ok(SiteNodeConfig {
            site: file.site,
            peer,
            listener,
            drainer,
        })
    }
}

impl SyncConfig {
    /// Merges `--config FILE` (if any) with the flags, then checks it.
    pub fn build(file: Option<&Path>, flags: SyncOverrides) -> Result<SyncConfig, NodeConfigError> {
        let (path, file_cfg) = match file {
            Some(path) => (path.to_path_buf(), parse(path, &read(path)?)?),
            None => (PathBuf::from("<command line>"), SyncFileConfig::default()),
        };
        let path = path.as_path();
        let source = flags
            .source
            .or(file_cfg.source)
            .ok_or_else(|| invalid(path, "source", "give --source redis://host:port"))?;
        let target = flags
            .target
            .or(file_cfg.target)
            .ok_or_else(|| invalid(path, "target", "give --target redis://host:port"))?;
        let data_dir = flags
            .data_dir
            .or(file_cfg.data_dir)
            .ok_or_else(|| invalid(path, "data-dir", "give --data-dir DIR"))?;
        check_data_dir(path, &data_dir)?;
        let admin = flags.admin.or(file_cfg.admin).unwrap_or_else(default_admin);
        check_admin(path, &admin)?;
        let admin_access = admin_access(
            path,
            &admin,
            flags
                .admin_token_file
                .or(file_cfg.admin_token_file)
                .as_deref(),
            flags.admin_tls_cert_file.or(file_cfg.admin_tls_cert_file),
            flags.admin_tls_key_file.or(file_cfg.admin_tls_key_file),
        )?;
        let id = flags.id.or(file_cfg.id).unwrap_or_else(|| "ferry".into());

        let mut listener = file_cfg.listener.unwrap_or_default();
        listener.source = source;
        listener.id = id.clone();
        let (file, env) = one_password_source(
            path,
            "source",
            [
                (
                    "source-password-file",
                    file_cfg.source_password_file.map(PasswordRef::File),
                ),
                (
                    "source-password-env",
                    file_cfg.source_password_env.map(PasswordRef::Env),
                ),
                (
                    "listener.source-password-file",
                    listener.source_password_file.take().map(PasswordRef::File),
                ),
                (
                    "listener.source-password-env",
                    listener.source_password_env.take().map(PasswordRef::Env),
                ),
                (
                    "--source-password-file",
                    flags.source_password_file.map(PasswordRef::File),
                ),
                (
                    SOURCE_PASSWORD_ENV,
                    implicit_env(SOURCE_PASSWORD_ENV).filter(|_| !flags.no_password_env),
                ),
            ],
        )?;
        listener.source_password_file = file;
        listener.source_password_env = env;
        let listener_checked = listener
            .validate()
            .map_err(|e| invalid(path, format!("listener.{}", e.field), e.reason))?;
        drop(listener_checked);

        let mut wal = file_cfg.wal.unwrap_or_default();
        if let Some(ttl) = flags.wal_ttl {
            wal.wal_ttl = ttl;
        }
        if wal.dir != WalConfig::default().dir {
            return Err(invalid(
                path,
                "wal.dir",
                "ferry sync keeps its two WALs in <data-dir>/listener and <data-dir>/drainer",
            ));
        }
        let listener_wal = check_wal(path, "wal", wal_in(wal.clone(), &data_dir, "listener"))?;
        let drainer_wal = check_wal(path, "wal", wal_in(wal, &data_dir, "drainer"))?;

        let ship = file_cfg
            .ship
            .unwrap_or_default()
            .validate()
            .map_err(|e| invalid(path, "ship", e.to_string()))?;

        let mut apply = file_cfg.apply.unwrap_or_default();
        apply.target = target;
        apply.drainer_id = id.clone();
        apply.filter = file_cfg
            .filter
            .unwrap_or_default()
            .overridden_by(flags.filter);
        if let Some(existing_data) = flags.existing_data {
            apply.existing_data = existing_data;
        }
        let (file, env) = one_password_source(
            path,
            "target",
            [
                (
                    "target-password-file",
                    file_cfg.target_password_file.map(PasswordRef::File),
                ),
                (
                    "target-password-env",
                    file_cfg.target_password_env.map(PasswordRef::Env),
                ),
                (
                    "apply.target-password-file",
                    apply.target_password_file.take().map(PasswordRef::File),
                ),
                (
                    "apply.target-password-env",
                    apply.target_password_env.take().map(PasswordRef::Env),
                ),
                (
                    "--target-password-file",
                    flags.target_password_file.map(PasswordRef::File),
                ),
                (
                    TARGET_PASSWORD_ENV,
                    implicit_env(TARGET_PASSWORD_ENV).filter(|_| !flags.no_password_env),
                ),
            ],
        )?;
        apply.target_password_file = file;
        apply.target_password_env = env;
        let apply = dead_letter_in(apply, &data_dir)
            .validate()
            .map_err(|e| invalid(path, e.path(), e.reason))?;
        apply
            .target_url()
            .map_err(|e| invalid(path, e.path(), e.reason))?;
        let apply_from = file_cfg.apply_from.unwrap_or_default();
        let two_way = flags.two_way || file_cfg.two_way.unwrap_or(false);
        let conflict = match flags.conflict.or(file_cfg.conflict).as_deref() {
            None | Some("report") => ConflictPolicy::Report,
            Some("source-wins") => ConflictPolicy::SourceWins,
            Some("target-wins") => ConflictPolicy::TargetWins,
            Some(other) => {
                return Err(invalid(
                    path,
                    "conflict",
                    format!("{other:?} is not a policy (report, source-wins, target-wins)"),
                ))
            }
        };
        if two_way {
            if apply_from == ApplyFrom::DrainerWal {
                return Err(invalid(
                    path,
                    "apply-from",
                    "two-way sync applies from the listener's WAL (leave apply-from unset)",
                ));
            }
            if apply.filter.db_map.is_some() {
                return Err(invalid(
                    path,
                    "filter.db-map",
                    "two-way sync replicates each db into the db of the same number both ways \
                     (use dbs)",
                ));
            }
        }
        Ok(SyncConfig {
            id,
            data_dir,
            admin,
            admin_access,
            listener,
            listener_wal,
            ship,
            drainer_wal,
            apply,
            apply_from,
            two_way,
            conflict,
        })
    }
}

/// One place a `ferry sync` password may come from besides the URL.
enum PasswordRef {
    File(PathBuf),
    Env(String),
}

/// `Some(Env(name))` when the variable `name` is set (the command-line
/// verbs read `FERRY_SOURCE_PASSWORD` / `FERRY_TARGET_PASSWORD` when set).
fn implicit_env(name: &str) -> Option<PasswordRef> {
    std::env::var_os(name).map(|_| PasswordRef::Env(name.to_string()))
}

/// The one file or variable the `what` password comes from, among the
/// places `ferry sync` accepts (config keys, flag, implicit variable); two
/// of them are refused, naming both.
fn one_password_source<const N: usize>(
    path: &Path,
    what: &str,
    places: [(&str, Option<PasswordRef>); N],
) -> Result<(Option<PathBuf>, Option<String>), NodeConfigError> {
    let mut given = places
        .into_iter()
        .filter_map(|(name, p)| p.map(|p| (name, p)));
    let Some((first, place)) = given.next() else {
        return Ok((None, None));
    };
    if let Some((second, _)) = given.next() {
        return Err(invalid(
            path,
            what,
            format!("its password is given by {first} and by {second}; give it once"),
        ));
    }
    Ok(match place {
        PasswordRef::File(file) => (Some(file), None),
        PasswordRef::Env(name) => (None, Some(name)),
    })
}

/// Convenience for tests and docs: the allowed-listener entry of a peer.
pub fn allowed(id: &str, secret: &str) -> AllowedListener {
    AllowedListener::new(id, secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("conf")
            .join(name)
    }

    #[test]
    fn the_admin_api_beyond_loopback_needs_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let flags = |admin: &str, token: Option<&str>| {
            let token_file = token.map(|t| {
                let file = dir.path().join("token");
                std::fs::write(&file, format!("{t}\n")).unwrap();
                file
            });
            SyncOverrides {
                source: Some("redis://127.0.0.1:7000".into()),
                target: Some("redis://127.0.0.1:7001".into()),
                data_dir: Some(dir.path().join("d")),
                admin: Some(admin.into()),
                admin_token_file: token_file,
                no_password_env: true,
                ..SyncOverrides::default()
            }
        };
        let error = SyncConfig::build(None, flags("0.0.0.0:7390", None))
            .unwrap_err()
            .to_string();
        assert!(error.contains("admin-token-file"), "{error}");
        let error = SyncConfig::build(None, flags("0.0.0.0:7390", Some("short")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("at least 16"), "{error}");
        let cfg =
            SyncConfig::build(None, flags("0.0.0.0:7390", Some("long-enough-token-123"))).unwrap();
        let token = cfg.admin_access.token.as_ref().unwrap();
        assert_eq!(token.expose(), "long-enough-token-123");
        assert!(!format!("{cfg:?}").contains("long-enough-token-123"));
        let cfg = SyncConfig::build(None, flags("127.0.0.1:0", None)).unwrap();
        assert_eq!(cfg.admin_access, AdminAccess::default());
    }

    /// The shipped site pair fits together: each ships to the other's
    /// drainer with the secret the other expects; each drainer writes its
    /// own server; the partitions and side a's existing-data are set.
    #[test]
    fn shipped_site_examples_load_and_pair_up() {
        let a = SiteNodeConfig::load(&conf("site-a.toml")).unwrap();
        let b = SiteNodeConfig::load(&conf("site-b.toml")).unwrap();
        assert_eq!((a.site.side, b.site.side), (SiteSide::A, SiteSide::B));
        assert_eq!(a.listener.listener.partition, 0);
        assert_eq!(b.listener.listener.partition, 1);
        for (this, other) in [(&a, &b), (&b, &a)] {
            assert_eq!(this.listener.drainers[0].id, other.drainer.apply.drainer_id);
            assert_eq!(
                this.listener.drainers[0].secret,
                other.drainer.drainer.listeners[0].secret
            );
            assert_eq!(
                this.drainer.drainer.listeners[0].id,
                other.listener.listener.id
            );
            assert_eq!(this.drainer.apply.target, this.listener.listener.source);
            assert_eq!(this.drainer.wal.dir, this.listener.wal.dir);
        }
        assert_eq!(a.drainer.apply.existing_data, ExistingData::Keep);
        assert_eq!(b.drainer.apply.existing_data, ExistingData::Refuse);
        assert_eq!(a.listener.wal.dir, Path::new("data/site-a/wal"));
        assert_eq!(b.site.conflict, ConflictPolicy::Report);
        assert!(b.peer.is_none());
    }

    /// A site file that would not pair up is refused, naming the key.
    #[test]
    fn a_site_config_refuses_what_would_not_pair_up() {
        let base = std::fs::read_to_string(conf("site-b.toml")).unwrap();
        let path = Path::new("site-b.toml");
        let refused = |text: &str, field: &str| {
            let error = SiteNodeConfig::from_toml(path, text)
                .unwrap_err()
                .to_string();
            assert!(error.contains(field), "{field}: {error}");
            error
        };
        refused(
            &base.replace("[apply]\n", "[apply]\ntarget = \"redis://127.0.0.1:1\"\n"),
            "apply.target",
        );
        refused(
            &base.replace("[listener]\n", "[listener]\npartition = 1\n"),
            "listener.partition",
        );
        let second = "[[drainers]]\nid = \"other\"\nendpoint = \"http://127.0.0.1:1\"\nsecret = \"12345678\"\n\n[drainer]";
        refused(&base.replacen("[drainer]", second, 1), "drainers");
        refused(
            &base.replace("id = \"listener-a\"", "id = \"listener-b\""),
            "drainer.listeners[0].id",
        );
        let winner = base.replace("conflict = \"report\"", "conflict = \"source-wins\"");
        refused(&winner, "site.peer");
        let with_peer = winner.replace(
            "# peer = \"redis://127.0.0.1:6379\"",
            "peer = \"redis://:pw@127.0.0.1:6379\"",
        );
        let cfg = SiteNodeConfig::from_toml(path, &with_peer).unwrap();
        assert_eq!(cfg.peer.as_ref().unwrap().addr(), "127.0.0.1:6379");
        assert!(!format!("{cfg:?}").contains("pw@"));
        let side_a = with_peer.replace("side = \"b\"", "side = \"a\"");
        refused(&side_a, "site.peer");
        refused(
            &winner.replace("side = \"b\"", "side = \"a\""),
            "site.conflict",
        );
        refused(&base.replace("side = \"b\"", "side = \"c\""), "side");
    }

    #[test]
    fn shipped_examples_load() {
        let listener = ListenerNodeConfig::load(&conf("listener.toml")).unwrap();
        assert_eq!(listener.wal.dir, Path::new("data/listener/wal"));
        assert_eq!(listener.drainers.len(), 1);
        let drainer = DrainerNodeConfig::load(&conf("drainer.toml")).unwrap();
        assert_eq!(drainer.drainer.listeners[0].id, listener.listener.id);
        assert_eq!(
            drainer.drainer.listeners[0].secret,
            listener.drainers[0].secret
        );
        let sync = SyncConfig::build(Some(&conf("sync.toml")), SyncOverrides::default()).unwrap();
        assert_eq!(sync.listener_wal.dir, Path::new("data/sync/listener"));
        assert_eq!(sync.drainer_wal.dir, Path::new("data/sync/drainer"));
        assert_eq!(sync.apply.drainer_id, "ferry");
        assert_eq!(sync.listener.id, "ferry");
        assert_eq!(
            sync.apply.dead_letter_dir.as_deref(),
            Some(Path::new("data/sync/dead-letter"))
        );
        assert_eq!(
            drainer.apply.dead_letter_dir.as_deref(),
            Some(Path::new("data/drainer/dead-letter"))
        );
    }

    fn listener_error(text: &str) -> String {
        ListenerNodeConfig::from_toml(Path::new("l.toml"), text)
            .unwrap_err()
            .to_string()
    }

    const LISTENER: &str = r#"
data-dir = "d"
[listener]
source = "redis://127.0.0.1:1"
[[drainers]]
id = "a"
endpoint = "http://127.0.0.1:2"
secret = "12345678"
"#;

    #[test]
    fn errors_name_the_file_and_field() {
        ListenerNodeConfig::from_toml(Path::new("l.toml"), LISTENER).unwrap();
        let unknown = listener_error(&LISTENER.replace("[listener]", "[listener]\nsorce = 1"));
        assert!(
            unknown.contains("l.toml") && unknown.contains("sorce"),
            "{unknown}"
        );
        let bad_ttl = listener_error(&format!("{LISTENER}\n[wal]\nwal-ttl = \"soon\""));
        assert!(bad_ttl.contains("wal-ttl"), "{bad_ttl}");
        let short = listener_error(&LISTENER.replace("12345678", "123"));
        assert!(short.contains("drainers[0].secret"), "{short}");
        let url = listener_error(&LISTENER.replace("redis://127.0.0.1:1", "http://x"));
        assert!(url.contains("listener.source"), "{url}");
        let admin = listener_error(
            &LISTENER.replace("data-dir = \"d\"", "data-dir = \"d\"\nadmin = \"nowhere\""),
        );
        assert!(admin.contains("invalid admin"), "{admin}");
        let missing = listener_error("data-dir = \"d\"");
        assert!(missing.contains("listener"), "{missing}");
    }

    #[test]
    fn tls_keys_are_checked_at_load_naming_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| dir.path().join(name).display().to_string();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not pem").unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("other.key"), other_key.serialize_pem()).unwrap();

        // Listener side.
        let https = LISTENER.replace("http://", "https://");
        let with = |text: &str, keys: &str| format!("{text}{keys}\n");
        let ca = format!("tls-ca-file = \"{}\"", file("cert.pem"));
        ListenerNodeConfig::from_toml(Path::new("l.toml"), &with(&https, &ca)).unwrap();
        let error = listener_error(&with(LISTENER, &ca));
        assert!(
            error.contains("l.toml") && error.contains("drainers[0].tls-ca-file"),
            "{error}"
        );
        assert!(error.contains("https://"), "{error}");
        let error = listener_error(&with(
            &https,
            &format!("tls-ca-file = \"{}\"", file("missing.pem")),
        ));
        assert!(
            error.contains("drainers[0].tls-ca-file") && error.contains("missing.pem"),
            "{error}"
        );
        let error = listener_error(&with(
            &https,
            &format!("{ca}\ntls-key-file = \"{}\"", file("key.pem")),
        ));
        assert!(error.contains("drainers[0].tls-cert-file"), "{error}");
        let error = listener_error(&with(
            &https,
            &format!(
                "{ca}\ntls-cert-file = \"{}\"\ntls-key-file = \"{}\"",
                file("cert.pem"),
                file("junk.pem")
            ),
        ));
        assert!(
            error.contains("drainers[0].tls-key-file") && error.contains("no PEM private key"),
            "{error}"
        );

        // Drainer side.
        let drainer = |tls: &str| {
            format!(
                "data-dir = \"d\"\nlisten = \"127.0.0.1:1\"\n[[drainer.listeners]]\n\
                 id = \"l\"\nsecret = \"12345678\"\n[drainer.tls]\n{tls}\n\
                 [apply]\ndrainer-id = \"d\"\ntarget = \"redis://127.0.0.1:2\"\n"
            )
        };
        let drainer_error = |tls: &str| {
            DrainerNodeConfig::from_toml(Path::new("d.toml"), &drainer(tls))
                .unwrap_err()
                .to_string()
        };
        let good = format!(
            "cert-file = \"{}\"\nkey-file = \"{}\"\nclient-ca-file = \"{}\"",
            file("cert.pem"),
            file("key.pem"),
            file("cert.pem")
        );
        let checked = DrainerNodeConfig::from_toml(Path::new("d.toml"), &drainer(&good)).unwrap();
        assert!(checked.drainer.tls.is_some());
        let error = drainer_error(&format!("key-file = \"{}\"", file("key.pem")));
        assert!(
            error.contains("d.toml") && error.contains("cert-file"),
            "{error}"
        );
        let error = drainer_error(&good.replace("cert.pem\"\nkey", "junk.pem\"\nkey"));
        assert!(
            error.contains("drainer.tls.cert-file") && error.contains("junk.pem"),
            "{error}"
        );
        let error = drainer_error(&good.replace("key.pem", "other.key"));
        assert!(error.contains("drainer.tls.key-file"), "{error}");
        let error = drainer_error(&good.replace(
            &format!("client-ca-file = \"{}\"", file("cert.pem")),
            &format!("client-ca-file = \"{}\"", file("missing-ca.pem")),
        ));
        assert!(
            error.contains("drainer.tls.client-ca-file") && error.contains("missing-ca.pem"),
            "{error}"
        );
        let error = drainer_error(&format!("{good}\ncert = 1"));
        assert!(error.contains("cert"), "{error}");
    }

    #[test]
    fn sync_needs_source_target_and_dir() {
        let err = SyncConfig::build(None, SyncOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("--source"), "{err}");
        let cfg = SyncConfig::build(
            None,
            SyncOverrides {
                source: Some("redis://127.0.0.1:1".into()),
                target: Some("redis://127.0.0.1:2".into()),
                data_dir: Some("x".into()),
                wal_ttl: Some("5s".parse().unwrap()),
                ..SyncOverrides::default()
            },
        )
        .unwrap();
        assert_eq!(
            cfg.listener_wal.wal_ttl.0,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(cfg.admin, DEFAULT_ADMIN_ADDR);
        let bad_target = SyncConfig::build(
            None,
            SyncOverrides {
                source: Some("redis://127.0.0.1:1".into()),
                target: Some("redis://127.0.0.1:2/3".into()),
                data_dir: Some("x".into()),
                ..SyncOverrides::default()
            },
        )
        .unwrap_err();
        assert!(
            bad_target.to_string().contains("apply.target"),
            "{bad_target}"
        );
    }

    #[test]
    fn filter_flags_lay_over_the_files_filter() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sync.toml");
        std::fs::write(
            &file,
            "[filter]\ndbs = [0, 5]\nkey-prefix = [\"app:\"]\nexclude-key-prefix = [\"app:tmp:\"]\n",
        )
        .unwrap();
        let base = || SyncOverrides {
            source: Some("redis://127.0.0.1:1".into()),
            target: Some("redis://127.0.0.1:2".into()),
            data_dir: Some(dir.path().join("data")),
            ..SyncOverrides::default()
        };
        let cfg = SyncConfig::build(Some(&file), base()).unwrap();
        let keyspace = cfg.apply.keyspace().unwrap();
        assert_eq!(keyspace.to_string(), "db 0, 5, keys app:* but app:tmp:*");
        // --db-map replaces the file's dbs; --key-prefix its prefixes.
        let flags = SyncOverrides {
            filter: FilterConfig {
                db_map: Some([("0".to_string(), 3)].into_iter().collect()),
                key_prefix: Some(vec!["web:".into()]),
                ..FilterConfig::default()
            },
            ..base()
        };
        let keyspace = SyncConfig::build(Some(&file), flags)
            .unwrap()
            .apply
            .keyspace()
            .unwrap();
        assert_eq!(
            keyspace.to_string(),
            "db 3 (source db 0), keys web:* but app:tmp:*"
        );
        // A map folding two source dbs into one target db stops the sync
        // at config time, naming the field.
        let flags = SyncOverrides {
            filter: FilterConfig {
                db_map: Some(
                    [("0".to_string(), 3), ("1".to_string(), 3)]
                        .into_iter()
                        .collect(),
                ),
                ..FilterConfig::default()
            },
            ..base()
        };
        let err = SyncConfig::build(Some(&file), flags)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("filter.db-map") && err.contains("both map to target db 3"),
            "{err}"
        );
        std::fs::write(&file, "[filter]\ndbs = [0]\ndb-map = { \"1\" = 2 }\n").unwrap();
        let err = SyncConfig::build(Some(&file), base())
            .unwrap_err()
            .to_string();
        assert!(err.contains("filter.db-map"), "{err}");
        std::fs::write(&file, "[filter]\nkey-prefixes = [\"a\"]\n").unwrap();
        assert!(SyncConfig::build(Some(&file), base()).is_err());
    }

    const SECRET: &str = "hunter2-s3cret-value";
    const PASSWORD: &str = "pa55-w0rd-XYZ";

    /// A listener config whose source URL holds a password and whose
    /// drainer secret is inline, with `bad` put on line `line` (replacing
    /// it).
    fn broken_listener(line: usize, bad: &str) -> String {
        let good = format!(
            "data-dir = \"d\"\n\
             [listener]\n\
             source = \"redis://app:{PASSWORD}@127.0.0.1:1\"\n\
             partition = 0\n\
             [[drainers]]\n\
             id = \"a\"\n\
             endpoint = \"http://127.0.0.1:2\"\n\
             secret = \"{SECRET}\"\n"
        );
        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        lines[line - 1] = bad.to_string();
        lines.join("\n") + "\n"
    }

    #[test]
    fn toml_errors_never_quote_a_secret_or_a_password() {
        let cases = [
            // A syntax error on the secret's line.
            (
                8,
                format!("secret = \"{SECRET}\" trailing"),
                "drainers.secret",
            ),
            // The secret unquoted.
            (8, format!("secret = {SECRET}"), "drainers.secret"),
            // A number where a string goes: serde quotes the value.
            (8, "secret = 987654321987".to_string(), "drainers.secret"),
            // A syntax error on the URL's line.
            (
                3,
                format!("source = \"redis://app:{PASSWORD}@127.0.0.1:1\" ,"),
                "listener.source",
            ),
            // A type error on the URL's line.
            (
                3,
                format!("source = [\"redis://app:{PASSWORD}@h:1\"]"),
                "listener.source",
            ),
            // An error elsewhere, in a file that holds both.
            (4, "partition = \"zero\"".to_string(), "listener.partition"),
        ];
        for (line, bad, key) in cases {
            let text = broken_listener(line, &bad);
            let error = listener_error(&text);
            for secret in [SECRET, PASSWORD, "987654321987", "trailing"] {
                assert!(!error.contains(secret), "{secret:?} quoted in: {error}");
            }
            assert!(error.contains("l.toml"), "{error}");
            assert!(error.contains(&format!("line {line}, column ")), "{error}");
            assert!(error.contains(key), "{key} not named in: {error}");
            assert!(!error.contains('\n'), "one line: {error}");
        }
        // The same for a drainer config's target URL and listener secret.
        let drainer = format!(
            "data-dir = \"d\"\nlisten = \"127.0.0.1:1\"\n\
             [drainer]\n[[drainer.listeners]]\nid = \"l\"\nsecret = {SECRET}\n\
             [apply]\ntarget = \"redis://:{PASSWORD}@h:1\"\n"
        );
        let error = DrainerNodeConfig::from_toml(Path::new("d.toml"), &drainer)
            .unwrap_err()
            .to_string();
        assert!(
            !error.contains(SECRET) && !error.contains(PASSWORD),
            "{error}"
        );
        assert!(
            error.contains("line 6, column") && error.contains("drainer.listeners.secret"),
            "{error}"
        );
    }

    #[test]
    fn debug_and_serialize_of_configs_redact_secrets() {
        let text = broken_listener(4, "partition = 0");
        let listener = ListenerNodeConfig::from_toml(Path::new("l.toml"), &text).unwrap();
        assert_eq!(listener.drainers[0].secret.expose(), SECRET);
        let checked = listener.listener.validate().unwrap();
        assert_eq!(checked.source.password.as_deref(), Some(PASSWORD));
        let drainer_text = format!(
            "data-dir = \"d\"\nlisten = \"127.0.0.1:1\"\n\
             [drainer]\n[[drainer.listeners]]\nid = \"l\"\nsecret = \"{SECRET}\"\n\
             [apply]\ntarget = \"redis://app:{PASSWORD}@h:1\"\n"
        );
        let drainer = DrainerNodeConfig::from_toml(Path::new("d.toml"), &drainer_text).unwrap();
        let sync = SyncConfig::build(
            None,
            SyncOverrides {
                source: Some(format!("redis://:{PASSWORD}@127.0.0.1:1").into()),
                target: Some(format!("redis://u:{PASSWORD}@127.0.0.1:2").into()),
                data_dir: Some("x".into()),
                ..SyncOverrides::default()
            },
        )
        .unwrap();
        let file: SyncFileConfig = toml::from_str(&format!(
            "source = \"redis://:{PASSWORD}@h:1\"\ntarget = \"redis://:{PASSWORD}@h:2\"\n"
        ))
        .unwrap();
        let overrides = SyncOverrides {
            source: Some(format!("redis://:{PASSWORD}@h:1").into()),
            ..SyncOverrides::default()
        };
        let shown = [
            format!("{listener:?}"),
            format!("{:?}", listener.drainers[0]),
            format!("{checked:?}"),
            format!("{drainer:?}"),
            format!("{:?}", drainer.drainer.listeners[0]),
            format!("{:?}", drainer.apply.target_url().unwrap()),
            format!("{sync:?}"),
            format!("{file:?}"),
            format!("{overrides:?}"),
            toml::to_string(&listener).unwrap(),
            toml::to_string(&drainer).unwrap(),
            toml::to_string(&file).unwrap(),
            serde_json::to_string(&listener).unwrap(),
            serde_json::to_string(&drainer).unwrap(),
            serde_json::to_string(&sync.listener).unwrap(),
            serde_json::to_string(&sync.apply).unwrap(),
            format!(
                "{:?}",
                crate::ship::DrainerTarget {
                    drainer_id: crate::wal::DownstreamId::new("d".to_string()).unwrap(),
                    endpoint: "http://h:1".into(),
                    listener_id: "l".into(),
                    secret: listener.drainers[0].secret.clone(),
                    tls: None,
                }
            ),
        ];
        for text in &shown {
            assert!(!text.contains(SECRET), "secret shown: {text}");
            assert!(!text.contains(PASSWORD), "password shown: {text}");
        }
        assert!(
            shown[0].contains("***") && shown[9].contains("***"),
            "{shown:?}"
        );
        assert!(shown[3].contains("redis://app:***@h:1"), "{}", shown[3]);
    }

    #[test]
    fn secrets_come_from_files_and_variables_once() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        // A variable every environment has (setting one in a threaded test
        // process would race with other threads' getenv).
        let password_var = "PATH";
        let path_value = std::env::var(password_var).unwrap();
        let text = format!(
            "data-dir = \"d\"\n[listener]\nsource = \"redis://app@127.0.0.1:1\"\n\
             source-password-env = \"{password_var}\"\n[[drainers]]\nid = \"a\"\n\
             endpoint = \"http://127.0.0.1:2\"\nsecret-file = \"{}\"\n",
            secret_file.display()
        );
        let listener = ListenerNodeConfig::from_toml(Path::new("l.toml"), &text).unwrap();
        assert_eq!(listener.drainers[0].secret.expose(), SECRET);
        let source = listener.listener.validate().unwrap().source;
        assert_eq!(source.user.as_deref(), Some("app"));
        assert_eq!(source.password.as_deref(), Some(path_value.as_str()));

        // Two places for one secret are refused, naming both.
        let twice = text.replace(
            "secret-file",
            &format!("secret = \"{SECRET}\"\nsecret-file"),
        );
        let error = listener_error(&twice);
        assert!(
            error.contains("drainers[0].secret") && error.contains("secret-file"),
            "{error}"
        );
        assert!(!error.contains(SECRET), "{error}");
        let in_url = text.replace("redis://app@", &format!("redis://app:{PASSWORD}@"));
        let error = listener_error(&in_url);
        assert!(
            error.contains("the URL") && error.contains("source-password-env"),
            "{error}"
        );
        assert!(!error.contains(PASSWORD), "{error}");
        let missing = text.replace(
            &format!("\"{password_var}\""),
            "\"FERRY_CONFIG_TEST_UNSET_2\"",
        );
        let error = listener_error(&missing);
        assert!(
            error.contains("FERRY_CONFIG_TEST_UNSET_2") && error.contains("not set"),
            "{error}"
        );
        let no_secret = text.replace("secret-file", "secret-file-x");
        assert!(listener_error(&no_secret).contains("secret-file-x"));

        // The drainer side: the allowed listener's secret from a variable,
        // the target's password from a file.
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, PASSWORD).unwrap();
        let secret_var = "PATH";
        let drainer_text = format!(
            "data-dir = \"d\"\nlisten = \"127.0.0.1:1\"\n[drainer]\n[[drainer.listeners]]\n\
             id = \"l\"\nsecret-env = \"{secret_var}\"\n[apply]\ntarget = \"redis://h:1\"\n\
             target-password-file = \"{}\"\n",
            password_file.display()
        );
        let drainer = DrainerNodeConfig::from_toml(Path::new("d.toml"), &drainer_text).unwrap();
        assert_eq!(drainer.drainer.listeners[0].secret.expose(), path_value);
        assert_eq!(
            drainer.apply.target_url().unwrap().password.as_deref(),
            Some(PASSWORD)
        );
        let no_secret = drainer_text.replace(&format!("secret-env = \"{secret_var}\"\n"), "");
        let error = DrainerNodeConfig::from_toml(Path::new("d.toml"), &no_secret)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("drainer.listeners[0].secret") && error.contains("secret-file"),
            "{error}"
        );

        // ferry sync: a file key and a flag for one password are refused.
        let sync_file = dir.path().join("sync.toml");
        std::fs::write(
            &sync_file,
            format!("source-password-file = \"{}\"\n", password_file.display()),
        )
        .unwrap();
        let flags = SyncOverrides {
            source: Some("redis://127.0.0.1:1".into()),
            target: Some("redis://127.0.0.1:2".into()),
            data_dir: Some("x".into()),
            ..SyncOverrides::default()
        };
        let sync = SyncConfig::build(Some(&sync_file), flags.clone()).unwrap();
        let source = sync.listener.validate().unwrap().source;
        assert_eq!(source.password.as_deref(), Some(PASSWORD));
        let error = SyncConfig::build(
            Some(&sync_file),
            SyncOverrides {
                source_password_file: Some(password_file.clone()),
                ..flags.clone()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("source-password-file") && error.contains("--source-password-file"),
            "{error}"
        );
        let error = SyncConfig::build(
            None,
            SyncOverrides {
                target: Some(format!("redis://:{PASSWORD}@127.0.0.1:2").into()),
                target_password_file: Some(password_file),
                ..flags
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("apply.target") && error.contains("the URL"),
            "{error}"
        );
        assert!(!error.contains(PASSWORD), "{error}");
    }
}
