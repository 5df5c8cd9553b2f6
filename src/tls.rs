//! TLS of ferry's own APIs: `ferry serve`'s HTTP API and the admin API of
//! `ferry sync`, `listener` and `drainer`, server and client side.
//!
//! In: PEM files (a server's certificate chain and key; a client's CA) and
//! accepted TCP connections. Out: rustls configs, with `ring` as the crypto
//! provider as for Redis ([`crate::redis::tls`], whose PEM loading this
//! reuses), and on the server side a stream of connections whose handshake
//! is done ([`accept`]).
//!
//! - Each handshake runs on its own task within [`HANDSHAKE_TIMEOUT`]: a
//!   slow or silent client holds no other one up, and one whose handshake
//!   fails (plain HTTP to the TLS port, an untrusted certificate on its
//!   side) is logged at debug and dropped; the server goes on.
//! - A client always verifies the server's certificate: against the CA file
//!   it is given, else the system's roots; the name it must carry is the
//!   host of the address (an IP address or a DNS name).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::redis::tls::{certificates, crypto_provider, private_key, root_store};

/// Longest a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections past their handshake that wait for the server to take them.
const ACCEPTED_QUEUE: usize = 64;
/// Handshakes run at once; more connections wait to be accepted.
const MAX_CONCURRENT_HANDSHAKES: usize = 64;
/// Pause after a failed `accept` (out of file descriptors): retrying at
/// once would spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// ALPN of an HTTP/1.1-only server (`ferry serve`).
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN of a server of gRPC (HTTP/2) and plain HTTP/1.1 (the admin port's
/// `GET /metrics`).
pub const ALPN_H2_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of a gRPC client.
pub const ALPN_H2: &[&[u8]] = &[b"h2"];

/// The certificate and key files of a server, with the names of the flags
/// or keys that gave them (for errors).
#[derive(Debug, Clone, Copy)]
pub struct ServerFiles<'a> {
    pub cert_what: &'a str,
    pub cert: &'a Path,
    pub key_what: &'a str,
    pub key: &'a Path,
}

/// A server config from a PEM certificate chain and its key, offering
/// `alpn`.
pub fn server_config(
    files: ServerFiles<'_>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = certificates(files.cert_what, files.cert)?;
    let key = private_key(files.key_what, files.key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "{} {} and {} {}: {e}",
                files.cert_what,
                files.cert.display(),
                files.key_what,
                files.key.display()
            )
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client config trusting the certificates of `ca_file` (named `ca_what`
/// in errors), else the system's roots; asking for `alpn`.
pub fn client_config(
    ca_what: &str,
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = root_store(ca_what, ca_file)?;
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The name a server's certificate must carry: the host of `HOST:PORT`
/// (`[::1]:7390` → `::1`).
pub fn server_name(host_port: &str) -> Result<ServerName<'static>, String> {
    let host = match host_port.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("server name {host:?}: {e}"))
}

/// Connects to `host_port` and does the handshake, the server's certificate
/// checked against `config` and [`server_name`].
pub async fn connect(
    host_port: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = server_name(host_port).map_err(io::Error::other)?;
    let tcp = TcpStream::connect(host_port).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|error| io::Error::new(error.kind(), format!("TLS handshake: {error}")))
}

/// A server's connection past its TLS handshake.
pub struct TlsConnection {
    stream: Box<tokio_rustls::server::TlsStream<TcpStream>>,
    peer: SocketAddr,
}

impl TlsConnection {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
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

/// The connections of `listener` past their handshake, until `shutdown`
/// (or until the stream is dropped). The accept loop and each handshake
/// run on their own tasks.
pub fn accept(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> impl Stream<Item = TlsConnection> + Send + 'static {
    let (accepted_tx, accepted_rx) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = accepted_tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_RETRY).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            // A flood of connections that never finish their handshake
            // holds at most this many tasks; the next accept waits.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return,
                permit = Arc::clone(&handshakes).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let acceptor = acceptor.clone();
            let accepted_tx = accepted_tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let connection = TlsConnection {
                            stream: Box::new(stream),
                            peer,
                        };
                        // A server gone away does not want it any more.
                        let _ = accepted_tx.send(connection).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(accepted_rx, |mut accepted_rx| async move {
        let connection = accepted_rx.recv().await?;
        Some((connection, accepted_rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_the_host() {
        let name = |s: &str| server_name(s).map(|n| n.to_str().into_owned());
        assert_eq!(name("127.0.0.1:7390").unwrap(), "127.0.0.1");
        assert_eq!(name("[::1]:7390").unwrap(), "::1");
        assert_eq!(name("ferry.example:443").unwrap(), "ferry.example");
        assert_eq!(name("ferry.example").unwrap(), "ferry.example");
        assert!(name("bad host:1").is_err());
    }
}
