//! `ferry serve`: one daemon that runs many sync tasks, with an HTTP API
//! (docs/API.md), a web dashboard and Prometheus metrics.
//!
//! In: a data dir and an HTTP address. Out: each task is the stages of
//! `ferry sync` run in this process ([`manager`]), with its own directory
//! `<data-dir>/tasks/<name>/` (its WAL under `sync/`, its passwords in
//! files of mode 0600) and its record in the task store
//! `<data-dir>/tasks.db` ([`store`], RocksDB, every write synced).
//!
//! - [`task`]: the spec a task is created from, its stored record, and the
//!   `ferry sync` config it runs with.
//! - [`http`]: the routes; [`cleanup`]: the keys a canceled task leaves.
//! - Access: the API and the metrics take a bearer token
//!   (`--token-file`); the daemon refuses to listen beyond loopback
//!   without one.

pub mod cleanup;
pub mod http;
pub mod manager;
pub mod store;
pub mod task;
pub mod ui;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::secret::Secret;

/// The default HTTP address of `ferry serve`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7380";

/// The file `ferry serve` writes its bound HTTP address to (as
/// `admin.addr`: one line, written atomically).
pub const HTTP_ADDR_FILE: &str = "http.addr";

/// What `ferry serve` runs with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub http: String,
    /// A file holding the bearer token (one trailing newline dropped).
    pub token_file: Option<PathBuf>,
}

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("{what}: {error}")]
    Io {
        what: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{0}")]
    Task(#[from] manager::TaskError),
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Reads the token file: at least 16 bytes, so that a guess is no way in.
fn read_token(path: &Path) -> Result<Secret, ServeError> {
    let token = crate::secret::read_secret_file("token", path)
        .map_err(|e| ServeError::Config(e.to_string()))?;
    if token.len() < 16 || token.contains(char::is_whitespace) {
        return Err(ServeError::Config(format!(
            "token file {}: the token must be at least 16 characters, without spaces",
            path.display()
        )));
    }
    Ok(Secret::new(token))
}

/// Runs the daemon until `shutdown`: tasks resumed, the API served; at the
/// end every task's sync is stopped (their states stay, for the next start).
pub async fn serve(cfg: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let token = cfg.token_file.as_deref().map(read_token).transpose()?;
    let socket = tokio::net::TcpListener::bind(&cfg.http)
        .await
        .map_err(|error| ServeError::Io {
            what: format!("binding the HTTP API on {}", cfg.http),
            error,
        })?;
    let bound = socket.local_addr().map_err(|error| ServeError::Io {
        what: "reading the HTTP address".into(),
        error,
    })?;
    if !is_loopback(&bound) && token.is_none() {
        return Err(ServeError::Config(format!(
            "--http {} listens beyond loopback: give --token-file FILE (a bearer token every \
             request must carry)",
            cfg.http
        )));
    }
    let tasks = shutdown.child_token();
    let manager = manager::Manager::open(&cfg.data_dir, tasks)?;
    crate::admin::write_addr_file_named(&cfg.data_dir, HTTP_ADDR_FILE, bound).map_err(|error| {
        ServeError::Io {
            what: format!("writing {}", cfg.data_dir.join(HTTP_ADDR_FILE).display()),
            error,
        }
    })?;
    let api = http::Api {
        manager: Arc::clone(&manager),
        token: token.map(Arc::new),
    };
    let router = http::api_routes(api).merge(ui::routes());
    info!(http = %bound, data_dir = %cfg.data_dir.display(), "ferry serve listening");
    let stopping = shutdown.clone();
    let served = axum::serve(socket, router)
        .with_graceful_shutdown(async move { stopping.cancelled().await })
        .await
        .map_err(|error| ServeError::Io {
            what: "serving the HTTP API".into(),
            error,
        });
    info!("stopping every task");
    manager.shutdown().await;
    served
}
