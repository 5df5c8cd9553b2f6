//! The daemon verbs: `ferry listener`, `ferry drainer`, `ferry sync`.
//!
//! Each builds a multi-threaded runtime, turns SIGINT/SIGTERM into the
//! node's shutdown token and runs the node until it stops (see
//! [`crate::node::run`]).

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::apply::ExistingData;
use crate::config_units::HumanDuration;
use crate::node::{
    self, DrainerNodeConfig, ListenerNodeConfig, NodeConfigError, NodeError, SiteNodeConfig,
    SyncConfig, SyncOverrides,
};
use crate::secret::SecretUrl;

/// Why a daemon verb failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeCommandError {
    #[error(transparent)]
    Config(#[from] NodeConfigError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// `ferry sync` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SyncArgs {
    /// The source Redis: `redis://[user[:password]@]host:port`. A Redis
    /// Cluster is detected: any node of it, or a comma-separated seed list
    /// (`redis://host:7000,host:7001`), and each shard is replicated into a
    /// partition of its own. A password here is visible in `ps`: prefer
    /// --source-password-file or the FERRY_SOURCE_PASSWORD environment
    /// variable.
    #[arg(long)]
    pub source: Option<SecretUrl>,
    /// The target Redis: `redis://[user[:password]@]host:port` (see
    /// --target-password-file, FERRY_TARGET_PASSWORD); a Redis Cluster is
    /// detected, given as any node or a comma-separated seed list.
    #[arg(long)]
    pub target: Option<SecretUrl>,
    /// A file holding the source's password (one trailing newline dropped).
    #[arg(long, value_name = "FILE")]
    pub source_password_file: Option<PathBuf>,
    /// A file holding the target's password (one trailing newline dropped).
    #[arg(long, value_name = "FILE")]
    pub target_password_file: Option<PathBuf>,
    /// Where the WALs and state files live (created with mode 0700 if
    /// missing).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address of the admin API (`ferry status`); `127.0.0.1:0` picks a
    /// free port (written to DATA_DIR/admin.addr). Default 127.0.0.1:7390.
    #[arg(long)]
    pub admin: Option<String>,
    /// A file holding the admin API's bearer token (at least 16
    /// characters): every admin call and `GET /metrics` must carry it.
    /// Required when --admin is not a loopback address.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the admin API over TLS (only) with this PEM certificate
    /// chain; needs --admin-tls-key-file.
    #[arg(long, value_name = "FILE")]
    pub admin_tls_cert_file: Option<PathBuf>,
    /// The PEM private key of --admin-tls-cert-file.
    #[arg(long, value_name = "FILE")]
    pub admin_tls_key_file: Option<PathBuf>,
    /// A TOML file with the same keys and the stage sections (see
    /// conf/sync.toml); flags win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Keep WAL entries at most this long (e.g. `30m`, `24h`).
    #[arg(long)]
    pub wal_ttl: Option<HumanDuration>,
    /// Name of this sync (listener id, drainer id, checkpoint key).
    #[arg(long)]
    pub id: Option<String>,
    /// The dbs this sync replicates and owns on the target, e.g. `0,5`
    /// (default: every db). Nothing in other dbs is ever written or
    /// flushed.
    #[arg(long, value_delimiter = ',')]
    pub dbs: Option<Vec<u32>>,
    /// Which source dbs go into which target dbs, and which keys this sync
    /// owns: nothing else on the target is ever written or flushed.
    #[command(flatten)]
    pub filter: super::FilterArgs,
    /// When the owned dbs of the target already hold keys at the first
    /// full sync: `refuse` (default; names the dbs and key counts), `keep`
    /// (load over them, keep the others), `flush` (delete them first).
    #[arg(long, value_name = "refuse|keep|flush")]
    pub existing_data: Option<ExistingData>,
    /// Two-way sync between Redis 7 servers: two standalone servers, two
    /// Redis Clusters (seed lists), or a standalone server and a cluster in
    /// either order: one full sync
    /// source -> target (the target passes the existing-data rule), then
    /// writes on either side replicate to the other. What ferry applies to
    /// one side is recognised in that side's stream and never sent back;
    /// flushes and SWAPDB are refused.
    #[arg(long)]
    pub two_way: bool,
    /// Two-way sync's conflict policy (one key written on both sides
    /// before either saw the other's write): `report` (default) appends
    /// each to DATA_DIR/conflicts.jsonl and counts it in `ferry status`;
    /// `source-wins` / `target-wins` also make both sides end with what
    /// that side's write left (the key written again where it was applied
    /// last, which carries it to the other side).
    #[arg(long, value_name = "POLICY")]
    pub conflict: Option<String>,
}

fn runtime() -> Result<tokio::runtime::Runtime, NodeCommandError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(NodeCommandError::Runtime)
}

/// A token cancelled by the first SIGINT or SIGTERM.
pub(crate) fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
            _ = terminate => info!("SIGTERM: stopping"),
        }
        cancel.cancel();
    });
    token
}

pub fn sync(args: SyncArgs) -> Result<(), NodeCommandError> {
    let cfg = SyncConfig::build(
        args.config.as_deref(),
        SyncOverrides {
            source: args.source,
            target: args.target,
            source_password_file: args.source_password_file,
            target_password_file: args.target_password_file,
            data_dir: args.data_dir,
            admin: args.admin,
            admin_token_file: args.admin_token_file,
            admin_tls_cert_file: args.admin_tls_cert_file,
            admin_tls_key_file: args.admin_tls_key_file,
            id: args.id,
            wal_ttl: args.wal_ttl,
            filter: args.filter.to_config(args.dbs),
            existing_data: args.existing_data,
            two_way: args.two_way,
            conflict: args.conflict,
            no_password_env: false,
        },
    )?;
    runtime()?.block_on(async {
        let shutdown = shutdown_on_signal();
        node::run_sync(cfg, shutdown).await
    })?;
    Ok(())
}

pub fn listener(config: PathBuf) -> Result<(), NodeCommandError> {
    let cfg = ListenerNodeConfig::load(&config)?;
    runtime()?.block_on(async {
        let shutdown = shutdown_on_signal();
        node::run_listener(cfg, shutdown).await
    })?;
    Ok(())
}

pub fn site(config: PathBuf) -> Result<(), NodeCommandError> {
    let cfg = SiteNodeConfig::load(&config)?;
    runtime()?.block_on(async {
        let shutdown = shutdown_on_signal();
        node::run_site(cfg, shutdown).await
    })?;
    Ok(())
}

pub fn drainer(config: PathBuf) -> Result<(), NodeCommandError> {
    let cfg = DrainerNodeConfig::load(&config)?;
    runtime()?.block_on(async {
        let shutdown = shutdown_on_signal();
        node::run_drainer(cfg, shutdown).await
    })?;
    Ok(())
}
