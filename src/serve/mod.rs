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
//!   without one. With `--tls-cert-file` and `--tls-key-file` it speaks
//!   HTTPS only ([`crate::tls`] does the handshakes, hyper serves each
//!   connection the handshake let through).
//!
//! Once listening, the daemon writes `<data-dir>/http.addr` (`HOST:PORT`,
//! as ever) and `<data-dir>/http.url` (`http://HOST:PORT` or
//! `https://HOST:PORT`: what `ferry task --server` takes).

pub mod cleanup;
pub mod http;
pub mod manager;
pub mod store;
pub mod task;
pub mod ui;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;

use futures::StreamExt;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::secret::Secret;

/// The default HTTP address of `ferry serve`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7380";

/// The file `ferry serve` writes its bound HTTP address to (as
/// `admin.addr`: one line, written atomically).
pub const HTTP_ADDR_FILE: &str = "http.addr";
/// The file `ferry serve` writes the URL of its API to: `http.addr` with
/// its scheme.
pub const HTTP_URL_FILE: &str = "http.url";
/// How long hyper waits for a request's head on an HTTPS connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What `ferry serve` runs with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub http: String,
    /// A file holding the bearer token (one trailing newline dropped).
    pub token_file: Option<PathBuf>,
    /// `--tls-cert-file`: the PEM certificate chain of the HTTPS API.
    pub tls_cert_file: Option<PathBuf>,
    /// `--tls-key-file`: its PEM private key.
    pub tls_key_file: Option<PathBuf>,
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
    crate::secret::read_token_file("--token-file", path).map_err(ServeError::Config)
}

/// The HTTPS config of `--tls-cert-file` and `--tls-key-file`, given both
/// or neither.
fn tls_config(cfg: &ServeConfig) -> Result<Option<Arc<ServerConfig>>, ServeError> {
    let (cert, key) = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(ServeError::Config(
                "--tls-cert-file needs --tls-key-file (its private key)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(ServeError::Config(
                "--tls-key-file needs --tls-cert-file (its certificate)".into(),
            ))
        }
    };
    let files = crate::tls::ServerFiles {
        cert_what: "--tls-cert-file",
        cert,
        key_what: "--tls-key-file",
        key,
    };
    crate::tls::server_config(files, crate::tls::ALPN_HTTP1)
        .map(Some)
        .map_err(ServeError::Config)
}

/// Runs the daemon until `shutdown`: tasks resumed, the API served; at the
/// end every task's sync is stopped (their states stay, for the next start).
pub async fn serve(cfg: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let token = cfg.token_file.as_deref().map(read_token).transpose()?;
    let tls = tls_config(&cfg)?;
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
    let scheme = if tls.is_some() { "https" } else { "http" };
    crate::admin::write_addr_file_named(&cfg.data_dir, HTTP_ADDR_FILE, bound)
        .and_then(|()| crate::admin::write_url_file(&cfg.data_dir, HTTP_URL_FILE, scheme, bound))
        .map_err(|error| ServeError::Io {
            what: format!("writing {}", cfg.data_dir.join(HTTP_ADDR_FILE).display()),
            error,
        })?;
    let api = http::Api {
        manager: Arc::clone(&manager),
        token: token.map(Arc::new),
    };
    let router = http::api_routes(api).merge(ui::routes());
    info!(http = %bound, scheme, data_dir = %cfg.data_dir.display(), "ferry serve listening");
    let served = match tls {
        Some(tls) => {
            serve_tls(socket, tls, router, shutdown.clone()).await;
            Ok(())
        }
        None => {
            let stopping = shutdown.clone();
            axum::serve(socket, router)
                .with_graceful_shutdown(async move { stopping.cancelled().await })
                .await
                .map_err(|error| ServeError::Io {
                    what: "serving the HTTP API".into(),
                    error,
                })
        }
    };
    info!("stopping every task");
    manager.shutdown().await;
    served
}

/// Serves `router` over HTTPS until `shutdown`, then lets each connection
/// finish the request it is on (idle ones close at once).
async fn serve_tls(
    socket: tokio::net::TcpListener,
    tls: Arc<ServerConfig>,
    router: axum::Router,
    shutdown: CancellationToken,
) {
    let incoming = crate::tls::accept(socket, tls, shutdown.clone());
    tokio::pin!(incoming);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let connection = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            next = incoming.next() => match next {
                Some(connection) => connection,
                None => break,
            },
        };
        let peer = connection.peer();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let stopping = shutdown.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let served =
                builder.serve_connection(hyper_util::rt::TokioIo::new(connection), service);
            tokio::pin!(served);
            let result = tokio::select! {
                result = served.as_mut() => result,
                _ = stopping.cancelled() => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(error) = result {
                debug!(%peer, %error, "HTTPS connection failed");
            }
        });
    }
    while connections.join_next().await.is_some() {}
}
