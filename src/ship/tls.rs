//! TLS of the `Ship` link (listener ↔ drainer gRPC), optional on both ends.
//!
//! In: the PEM files named by the drainer's `[drainer.tls]` ([`ServerTlsConfig`])
//! and by a listener's `https://` `[[drainers]]` entry ([`ClientTlsOptions`]).
//! Out: a stream of TLS connections for the drainer's tonic server
//! ([`ServerTls::incoming`]) and a connector for the shipper's tonic channel
//! ([`ClientTls::connector`]).
//!
//! - The drainer presents `cert-file`/`key-file`. With `client-ca-file` it
//!   asks every listener for a certificate and accepts only one signed by
//!   that CA (mutual TLS), on top of the per-listener secret of `Hello`.
//! - The listener verifies the drainer's certificate against `tls-ca-file`
//!   (else the system's roots) for `tls-server-name` (else the endpoint's
//!   host, which may be an IP address), and presents `tls-cert-file` and
//!   `tls-key-file` when given.
//! - rustls with the ring provider (as for Redis, `redis::tls`), ALPN `h2`.
//!
//! ferry does the handshakes itself rather than through tonic's `tls`
//! feature: the drainer runs each one under a timeout, off the accept loop,
//! and a failed one is logged and dropped, never the end of the server
//! (tonic 0.12's own TLS accept loop stops the server on some handshake
//! errors and waits for a silent client forever); the listener's handshake
//! errors stay typed ([`ConnectError::Handshake`]), so that `ferry status`
//! says TLS rather than "transport error".

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::Uri;
use tracing::{debug, warn};

use crate::redis::tls::{certificates, crypto_provider, private_key, root_store};

/// How long a connecting listener may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes the drainer runs at once; more connections wait to be
/// accepted (bounds what a flood of silent connections holds).
const MAX_CONCURRENT_HANDSHAKES: usize = 64;

/// ALPN of gRPC.
const ALPN_H2: &[u8] = b"h2";

/// A TLS file or option that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TlsConfigError {
    /// The config key at fault (`cert-file`, `tls-ca-file`, …).
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str) -> impl Fn(String) -> TlsConfigError {
    move |reason| TlsConfigError { field, reason }
}

/// `[drainer.tls]` of drainer.toml: TLS on the drainer's ship endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerTlsConfig {
    /// The drainer's certificate chain (PEM), leaf first. Required.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1). Required.
    pub key_file: PathBuf,
    /// CA certificates (PEM): when set, only listeners presenting a
    /// certificate signed by one of them are accepted (mutual TLS).
    /// Default: none (any listener may connect; the secret still applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// TLS options of one drainer a listener ships to (the `tls-*` keys of a
/// `[[drainers]]` entry with an `https://` endpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// CA certificates the drainer's certificate must chain to. Default:
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// This listener's certificate and key, for a drainer that requires one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the drainer's certificate must carry. Default: the
    /// endpoint's host.
    pub server_name: Option<String>,
}

/// The drainer's TLS: the rustls config built from [`ServerTlsConfig`].
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files of `config`.
    pub fn new(config: &ServerTlsConfig) -> Result<ServerTls, TlsConfigError> {
        let chain = certificates("cert-file", &config.cert_file).map_err(bad("cert-file"))?;
        let key = private_key("key-file", &config.key_file).map_err(bad("key-file"))?;
        let builder = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("cert-file")(e.to_string()))?;
        let builder = match &config.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots =
                    root_store("client-ca-file", Some(path)).map_err(bad("client-ca-file"))?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    crypto_provider(),
                )
                .build()
                .map_err(|e| bad("client-ca-file")(format!("{}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder.with_single_cert(chain, key).map_err(|e| {
            bad("key-file")(format!(
                "{} does not go with cert-file {}: {e}",
                config.key_file.display(),
                config.cert_file.display()
            ))
        })?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// The TLS connections of the TCP connections `listener` accepts: each
    /// handshake runs under a timeout; a failed one is logged and dropped.
    /// The stream never ends on its own and never yields an error.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<TlsConnection, io::Error>> + Send + 'static {
        let tls = self.clone();
        let accepted = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await;
            Some((accepted, listener))
        });
        accepted
            .map(move |accepted| {
                let tls = tls.clone();
                async move { tls.handshake(accepted).await }
            })
            .buffer_unordered(MAX_CONCURRENT_HANDSHAKES)
            .filter_map(|connection| futures::future::ready(connection.map(Ok)))
    }

    async fn handshake(
        &self,
        accepted: io::Result<(TcpStream, std::net::SocketAddr)>,
    ) -> Option<TlsConnection> {
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause this slot a
                // little rather than spin on the error.
                warn!(%error, "ship endpoint: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return None;
            }
        };
        // Without Nagle, as tonic's plain TCP connections are.
        let _ = tcp.set_nodelay(true);
        match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Some(TlsConnection(Box::new(tls))),
            Ok(Err(error)) if error.kind() == io::ErrorKind::InvalidData => {
                // A client that speaks TLS badly or not at all (a listener
                // with an http:// endpoint, a wrong certificate).
                warn!(%peer, %error, hint = "a listener needs an https:// endpoint and, with client-ca-file, a certificate that CA signed", "ship endpoint: TLS handshake failed");
                None
            }
            Ok(Err(error)) => {
                debug!(%peer, %error, "ship endpoint: connection closed during the TLS handshake");
                None
            }
            Err(_) => {
                warn!(%peer, timeout = ?self.handshake_timeout, "ship endpoint: TLS handshake timed out");
                None
            }
        }
    }
}

/// A TLS connection accepted by the drainer (for tonic: [`Connected`], so
/// that requests know their peer's address).
pub struct TlsConnection(Box<tokio_rustls::server::TlsStream<TcpStream>>);

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        let (tcp, _) = self.0.get_ref();
        TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: tcp.peer_addr().ok(),
        }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_shutdown(cx)
    }
}

/// A listener's TLS to one drainer: the rustls config built from
/// [`ClientTlsOptions`] and the name the drainer's certificate must carry.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The host of `endpoint` (`https://host:port`), without an IPv6 address's
/// brackets.
pub fn endpoint_host(endpoint: &str) -> Option<String> {
    let uri: Uri = endpoint.parse().ok()?;
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(host.to_string())
}

impl ClientTls {
    /// Reads and checks the files of `options` for `endpoint`.
    pub fn new(endpoint: &str, options: &ClientTlsOptions) -> Result<ClientTls, TlsConfigError> {
        let name = match &options.server_name {
            Some(name) => name.clone(),
            None => endpoint_host(endpoint)
                .ok_or_else(|| bad("endpoint")(format!("{endpoint:?} names no host")))?,
        };
        let identity = match (&options.cert_file, &options.key_file) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(bad("tls-key-file")(
                    "is required with tls-cert-file".to_string(),
                ))
            }
            (None, Some(_)) => {
                return Err(bad("tls-cert-file")(
                    "is required with tls-key-file".to_string(),
                ))
            }
        };
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| bad("tls-server-name")(format!("{name:?}: {e}")))?;
        let roots =
            root_store("tls-ca-file", options.ca_file.as_deref()).map_err(bad("tls-ca-file"))?;
        let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls-ca-file")(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => {
                let chain = certificates("tls-cert-file", cert).map_err(bad("tls-cert-file"))?;
                let key_der = private_key("tls-key-file", key).map_err(bad("tls-key-file"))?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    bad("tls-key-file")(format!(
                        "{} does not go with tls-cert-file {}: {e}",
                        key.display(),
                        cert.display()
                    ))
                })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ClientTls {
            config: Arc::new(config),
            server_name: server_name.to_owned(),
        })
    }

    /// A tonic connector: TCP to the URI's authority, then the handshake.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector { tls: self.clone() }
    }
}

/// Why the shipper's TLS connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Tcp {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The drainer's certificate is not trusted or not for this name, the
    /// drainer refused ours, or it does not speak TLS.
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("endpoint {uri} names no host and port")]
    NoAddress { uri: String },
}

/// Connects a tonic channel over TLS ([`ClientTls::connector`]).
#[derive(Debug, Clone)]
pub struct TlsConnector {
    tls: ClientTls,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<TokioIo<ClientConnection>, ConnectError>> + Send>>;

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TokioIo<ClientConnection>;
    type Error = ConnectError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> ConnectFuture {
        let tls = self.tls.clone();
        Box::pin(async move {
            let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
                return Err(ConnectError::NoAddress {
                    uri: uri.to_string(),
                });
            };
            let addr = format!("{host}:{port}");
            let tcp =
                TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
                    .await
                    .map_err(|source| ConnectError::Tcp {
                        addr: addr.clone(),
                        source,
                    })?;
            tcp.set_nodelay(true).map_err(|source| ConnectError::Tcp {
                addr: addr.clone(),
                source,
            })?;
            let mut stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
                .connect(tls.server_name.clone(), tcp)
                .await
                .map_err(|source| ConnectError::Handshake {
                    addr: addr.clone(),
                    source,
                })?;
            // A drainer refuses a client certificate (or its absence) after
            // the client's side of a TLS 1.3 handshake is done, with an
            // alert that tonic would report as a cancelled call. The
            // drainer's first bytes (its HTTP/2 SETTINGS, which it sends
            // unasked) carry that verdict: read them here and hand them to
            // HTTP/2 first.
            let mut first = vec![0u8; 4096];
            let read = stream
                .read(&mut first)
                .await
                .map_err(|source| ConnectError::Handshake {
                    addr: addr.clone(),
                    source,
                })?;
            if read == 0 {
                return Err(ConnectError::Handshake {
                    addr,
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the drainer closed the connection after the handshake",
                    ),
                });
            }
            first.truncate(read);
            Ok(TokioIo::new(ClientConnection {
                stream: Box::new(stream),
                first,
            }))
        })
    }
}

/// A listener's TLS connection to a drainer, with the drainer's first
/// bytes read ahead (by the connector).
pub struct ClientConnection {
    stream: Box<tokio_rustls::client::TlsStream<TcpStream>>,
    /// Read ahead and not yet returned.
    first: Vec<u8>,
}

impl AsyncRead for ClientConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.first.is_empty() {
            let n = this.first.len().min(buf.remaining());
            buf.put_slice(&this.first[..n]);
            this.first.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(this.stream.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().stream.as_mut()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().stream.as_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream.as_mut()).poll_shutdown(cx)
    }
}

/// The TLS cause of a failed connection or call, if its error chain has
/// one (the reason of a [`ShipError::Tls`](super::ShipError::Tls)): a
/// handshake error of [`TlsConnector`], or a rustls error.
pub fn tls_cause(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(ConnectError::Handshake { source, .. }) = error.downcast_ref::<ConnectError>() {
            return Some(format!("handshake failed: {source}"));
        }
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = error.downcast_ref::<io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                return Some(tls.to_string());
            }
        }
        next = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hosts() {
        assert_eq!(
            endpoint_host("https://drainer.example:7391").as_deref(),
            Some("drainer.example")
        );
        assert_eq!(
            endpoint_host("https://127.0.0.1:7391").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(endpoint_host("https://[::1]:7391").as_deref(), Some("::1"));
        assert_eq!(endpoint_host("not a uri"), None);
    }

    #[test]
    fn missing_and_non_pem_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem\n").unwrap();
        let missing = dir.path().join("missing.pem");

        let error = ServerTls::new(&ServerTlsConfig {
            cert_file: missing.clone(),
            key_file: junk.clone(),
            client_ca_file: None,
        })
        .unwrap_err();
        assert_eq!(error.field, "cert-file", "{error}");
        assert!(error.reason.contains("missing.pem"), "{error}");

        let error = ServerTls::new(&ServerTlsConfig {
            cert_file: junk.clone(),
            key_file: junk.clone(),
            client_ca_file: None,
        })
        .unwrap_err();
        assert_eq!(error.field, "cert-file", "{error}");
        assert!(error.reason.contains("no PEM certificate"), "{error}");

        let options = ClientTlsOptions {
            ca_file: Some(junk.clone()),
            ..ClientTlsOptions::default()
        };
        let error = ClientTls::new("https://127.0.0.1:1", &options).unwrap_err();
        assert_eq!(error.field, "tls-ca-file", "{error}");

        let options = ClientTlsOptions {
            ca_file: None,
            cert_file: Some(junk),
            key_file: None,
            server_name: None,
        };
        let error = ClientTls::new("https://127.0.0.1:1", &options).unwrap_err();
        assert_eq!(error.field, "tls-key-file", "{error}");
    }
}
