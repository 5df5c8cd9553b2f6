//! Connections to Redis, plain or TLS (`rediss://`): [`connect`] gives a
//! [`RedisStream`] that the client ([`super::client`]) and the replication
//! link ([`super::psync`]) read and write.
//!
//! TLS options ride on the address ([`TlsOptions`], parsed by
//! [`super::url`]): a CA file (else the system's roots), a client
//! certificate and key (for servers with `tls-auth-clients yes`), and the
//! name the server's certificate must carry (default: the host, which may
//! be an IP address). The server's certificate is always verified. A
//! config is built once per distinct set of options and shared
//! (`rustls`, with `ring` as the crypto provider).

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::url::{RedisUrl, TlsOptions};

/// A connection to a Redis server.
pub enum RedisStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for RedisStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RedisStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            RedisStream::Plain(s) => s.is_write_vectored(),
            RedisStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_flush(cx),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {addr}: timed out")]
    Timeout { addr: String },
    /// The TLS options cannot be used (a file missing or not PEM).
    #[error("TLS for {addr}: {reason}")]
    Config { addr: String, reason: String },
    /// The handshake failed (an untrusted certificate, a name mismatch, a
    /// client certificate refused).
    #[error("TLS handshake with {addr}: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: io::Error,
    },
}

impl ConnectError {
    /// As an `io::Error` (for callers whose error type wraps one).
    pub fn into_io(self) -> io::Error {
        match self {
            ConnectError::Io { source, .. } => source,
            ConnectError::Timeout { .. } => {
                io::Error::new(io::ErrorKind::TimedOut, self.to_string())
            }
            other => io::Error::other(other.to_string()),
        }
    }
}

type Configs = Mutex<HashMap<TlsOptions, Arc<rustls::ClientConfig>>>;

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| Mutex::new(HashMap::new()))
}

pub(crate) fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    // PEM files of certificates and keys are small; a bigger one is not one.
    const PEM_MAX: u64 = 1 << 20;
    let meta = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if meta.len() > PEM_MAX {
        return Err(format!(
            "{what} {}: {} bytes, more than a PEM file holds",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The PEM certificates of `path`; errors name `what` (the key or flag that
/// gave the file) and the file.
pub(crate) fn certificates(
    what: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(what, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The PEM private key of `path`; errors name `what` and the file.
pub(crate) fn private_key(what: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_pem(what, path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .ok_or_else(|| format!("{what} {}: no PEM private key in it", path.display()))
}

/// The roots a client trusts: the certificates of `ca_file` (named `what`
/// in errors), else the system's.
pub(crate) fn root_store(
    what: &str,
    ca_file: Option<&Path>,
) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(what, path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{what} {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system root rustls cannot use is passed over.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(format!(
                    "no {what} given and no system root certificate found"
                ));
            }
        }
    }
    Ok(roots)
}

/// The crypto provider of every TLS config ferry builds: ring, not
/// aws-lc-rs (which needs cmake to build); rustls deprecates ring's provider
/// only for its lack of post-quantum key exchange.
pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client config of `options`, built on first use.
fn client_config(options: &TlsOptions) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut cache = configs().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(config) = cache.get(options) {
        return Ok(Arc::clone(config));
    }
    let roots = root_store("tls-ca-file", options.ca_file.as_deref())?;
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (&options.cert_file, &options.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                certificates("tls-cert-file", cert)?,
                private_key("tls-key-file", key)?,
            )
            .map_err(|e| format!("tls-cert-file {}: {e}", cert.display()))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("tls-cert-file and tls-key-file go together".to_string()),
    };
    let config = Arc::new(config);
    cache.insert(options.clone(), Arc::clone(&config));
    Ok(config)
}

/// Connects to `url` (TCP, then the TLS handshake for `rediss://`), all
/// within `timeout`. Sets `TCP_NODELAY`.
pub async fn connect(url: &RedisUrl, timeout: Duration) -> Result<RedisStream, ConnectError> {
    let addr = url.addr();
    let work = async {
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| ConnectError::Io {
                addr: addr.clone(),
                source,
            })?;
        tcp.set_nodelay(true).map_err(|source| ConnectError::Io {
            addr: addr.clone(),
            source,
        })?;
        let Some(options) = &url.tls else {
            return Ok(RedisStream::Plain(tcp));
        };
        let config = client_config(options).map_err(|reason| ConnectError::Config {
            addr: addr.clone(),
            reason,
        })?;
        let name = options
            .server_name
            .clone()
            .unwrap_or_else(|| url.host.clone());
        let name = ServerName::try_from(name.clone()).map_err(|e| ConnectError::Config {
            addr: addr.clone(),
            reason: format!("server name {name:?}: {e}"),
        })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: addr.clone(),
                source,
            })?;
        Ok(RedisStream::Tls(Box::new(tls)))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout { addr }),
    }
}
