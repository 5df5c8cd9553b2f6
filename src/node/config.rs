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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apply::{ApplyConfig, ExistingData, FilterConfig};
use crate::listener::ListenerConfig;
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
    /// `http://host:port` of the drainer's ship endpoint.
    pub endpoint: String,
    /// The secret this drainer expects from this listener (at least 8
    /// bytes).
    pub secret: String,
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
    pub source: Option<String>,
    pub target: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub admin: Option<String>,
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
}

/// Everything `ferry sync` runs with, after flags and file are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    pub id: String,
    pub data_dir: PathBuf,
    pub admin: String,
    pub listener: ListenerConfig,
    /// The listener's WAL (`<data-dir>/listener`).
    pub listener_wal: WalConfig,
    pub ship: ShipperConfig,
    /// The drainer's WAL (`<data-dir>/drainer`).
    pub drainer_wal: WalConfig,
    pub apply: ApplyConfig,
}

/// `ferry sync` command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct SyncOverrides {
    pub source: Option<String>,
    pub target: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub admin: Option<String>,
    pub id: Option<String>,
    pub wal_ttl: Option<crate::config_units::HumanDuration>,
    /// `--dbs`: the owned dbs (`[filter] dbs`).
    pub dbs: Option<Vec<u32>>,
    /// `--existing-data` (`[apply] existing-data`).
    pub existing_data: Option<ExistingData>,
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
        // toml's message names the key, the line and the column.
        message: error.to_string().trim_end().to_string(),
    })
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
        let mut cfg: ListenerNodeConfig = parse(path, text)?;
        check_data_dir(path, &cfg.data_dir)?;
        check_admin(path, &cfg.admin)?;
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
            format!("{:?} must look like http://host:port", peer.endpoint),
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
        let mut cfg: DrainerNodeConfig = parse(path, text)?;
        check_data_dir(path, &cfg.data_dir)?;
        check_admin(path, &cfg.admin)?;
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
        cfg.drainer = cfg
            .drainer
            .validate()
            .map_err(|e| invalid(path, "drainer", e.to_string()))?;
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
        let id = flags.id.or(file_cfg.id).unwrap_or_else(|| "ferry".into());

        let mut listener = file_cfg.listener.unwrap_or_default();
        listener.source = source;
        listener.id = id.clone();
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
        apply.filter = file_cfg.filter.unwrap_or_default();
        if let Some(dbs) = flags.dbs {
            apply.filter.dbs = Some(dbs);
        }
        if let Some(existing_data) = flags.existing_data {
            apply.existing_data = existing_data;
        }
        let apply = dead_letter_in(apply, &data_dir)
            .validate()
            .map_err(|e| invalid(path, e.path(), e.reason))?;
        apply
            .target_url()
            .map_err(|e| invalid(path, e.path(), e.reason))?;
        Ok(SyncConfig {
            id,
            data_dir,
            admin,
            listener,
            listener_wal,
            ship,
            drainer_wal,
            apply,
        })
    }
}

/// Convenience for tests and docs: the allowed-listener entry of a peer.
pub fn allowed(id: &str, secret: &str) -> AllowedListener {
    AllowedListener {
        id: id.to_string(),
        secret: secret.to_string(),
    }
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
}
