//! The admin API of a ferry process: status and sync control over gRPC,
//! and Prometheus metrics over plain HTTP on the same port.
//!
//! In (server side, [`serve_admin`]): requests of `ferry status`,
//! `ferry stop-sync`, `ferry restart-sync` and `ferry skip`, answered by
//! the process's [`NodeControl`](crate::status::NodeControl). Out:
//! [`NodeStatus`] readings, the number of shippers a control request
//! changed, and what a skip did. The client side ([`fetch_status`],
//! [`stop_sync`], [`restart_sync`], [`skip`]) is what the CLI verbs call.
//!
//! # Wire protocol (`proto/ferry.proto`, service `Admin`)
//!
//! Unary calls on HTTP/2, plain or over TLS (see Access below):
//!
//! ```text
//! Status(StatusRequest {})                      -> StatusReply { status: NodeStatus }
//! StopSync(SyncControlRequest { selector })     -> SyncControlReply { changed }
//! RestartSync(SyncControlRequest { selector })  -> SyncControlReply { changed }
//! Skip(SkipRequest { partition, log_id, drainer_id? })
//!                                               -> SkipReply { dead_letter_file, done }
//! ```
//!
//! - The status messages mirror `src/status.rs` field for field
//!   ([`convert`]); an absent `selector` matches every shipper.
//! - Control errors map to codes in one place ([`control_error_status`]):
//!   `NoListener`, `NoDrainer`, `Refused` → `FAILED_PRECONDITION`,
//!   `NoMatch`, `NoApplier` → `NOT_FOUND`, `Failed` → `INTERNAL`; the
//!   message is the error's text, shown to the operator as is.
//! - `Skip` waits (at most [`SKIP_WAIT`]) for the applier to have skipped
//!   the entry; `done: false` means it will when it next gets to it.
//! - The same port answers HTTP/1.1 (and HTTP/2) `GET /metrics` with the
//!   process's status in Prometheus text format 0.0.4
//!   ([`crate::metrics`]); any other path is `404`, and a gRPC request of
//!   an unknown method gets `UNIMPLEMENTED` ([`admin_routes`]).
//! - Limits: requests are at most [`MAX_REQUEST_BYTES`], replies at most
//!   [`MAX_MESSAGE_BYTES`] on both ends, so a hostile peer cannot make the
//!   other side allocate more. The client bounds connecting by
//!   [`CONNECT_TIMEOUT`] and a whole call by [`CONNECT_TIMEOUT`] +
//!   [`REQUEST_TIMEOUT`]: a silent or garbage-speaking peer is an error,
//!   never a hang.
//!
//! # Access
//!
//! A node's config may give the admin API a bearer token
//! (`admin-token-file`, required when the admin address is not loopback)
//! and TLS (`admin-tls-cert-file`, `admin-tls-key-file`): [`AdminAccess`].
//! With a token, every gRPC call must carry the metadata `authorization:
//! Bearer <token>` and every HTTP request (`GET /metrics`) the same header;
//! a missing or wrong one gets `UNAUTHENTICATED` (gRPC) or `401` (HTTP)
//! and nothing else, whatever the path. With TLS the port speaks TLS only
//! ([`crate::tls`], ALPN `h2` and `http/1.1`). The client verbs take
//! `https://HOST:PORT` for TLS, a CA file and a token file
//! ([`ClientAccess`]); the server's certificate is always verified.
//!
//! # Address file
//!
//! Once serving, a node writes the address it is bound to into
//! `<data-dir>/admin.addr` ([`ADDR_FILE_NAME`]): one line `HOST:PORT\n`,
//! written to a temp file, fsync'd and renamed over the old one, so a
//! reader sees the old or the new address, never a partial one. An
//! unspecified bind address (`0.0.0.0`, `::`) is written as the loopback of
//! its family, which is what a local `ferry status --data-dir DIR` connects
//! to. Next to it, `admin.url` ([`URL_FILE_NAME`]) holds the same address
//! with its scheme (`http://` or `https://`), which `--data-dir` prefers
//! ([`read_admin_url`]).

pub mod convert;
mod server;

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_rustls::rustls;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use crate::secret::Secret;

use crate::errors::{append_chain, error_chain};
use crate::record::pb;
use crate::status::{NodeStatus, SkipOutcome, SkipRequest, SwitchoverReport, SyncSelector};

pub use crate::record::pb::admin_client::AdminClient;
pub use crate::record::pb::admin_server::{Admin, AdminServer};
pub use server::{admin_routes, control_error_status, serve_admin, AdminService};

/// Where a node serves the admin API unless told otherwise.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:7390";
/// Name of the address file in a node's data dir.
pub const ADDR_FILE_NAME: &str = "admin.addr";
/// Name of the file holding the admin API's URL (its address and scheme).
pub const URL_FILE_NAME: &str = "admin.url";
/// Longest wait for the TCP connection to the admin API.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for an answer once connected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a skip request waits for the applier to have skipped the entry
/// (well within [`REQUEST_TIMEOUT`]).
pub const SKIP_WAIT: Duration = Duration::from_secs(3);
/// How long `ferry switchover` lets writes on the source stay paused
/// unless told otherwise.
pub const SWITCHOVER_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `--timeout` a switchover takes.
pub const SWITCHOVER_MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest reply either side encodes or decodes.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Largest request the server decodes (requests are a few bytes).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Largest address file read back (a `HOST:PORT` line is far shorter).
const MAX_ADDR_FILE_BYTES: u64 = 1024;

/// Errors of the admin API, both ends.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "bad admin address {addr:?}: {reason} (expected HOST:PORT, e.g. {DEFAULT_ADMIN_ADDR})"
    )]
    BadAddress { addr: String, reason: String },
    #[error("cannot reach the ferry admin API at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("the ferry admin API at {addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    /// The node understood the request and refused it (a [`ControlError`](crate::status::ControlError)).
    #[error("ferry at {addr}: {message}")]
    Refused {
        addr: String,
        code: Code,
        message: String,
    },
    /// The call failed some other way: a broken connection, a peer that
    /// does not speak the protocol, an internal error of the node.
    #[error("the ferry admin API at {addr} failed ({code:?}): {message}")]
    Call {
        addr: String,
        code: Code,
        message: String,
    },
    /// The node wants a bearer token and the call had none or another.
    #[error(
        "the ferry admin API at {addr} refused the call: UNAUTHENTICATED ({message}); give \
         --token-file with the node's admin-token-file"
    )]
    Unauthenticated { addr: String, message: String },
    /// The client's TLS or token cannot be used (a CA file missing, a
    /// token that is not ASCII).
    #[error("the ferry admin API at {addr}: {reason}")]
    Access { addr: String, reason: String },
    #[error("malformed reply from the ferry admin API at {addr}: {reason}")]
    BadReply { addr: String, reason: String },
    #[error("cannot read {}: {reason}; is ferry running with --data-dir {}?", path.display(), dir.display())]
    AddrFile {
        path: PathBuf,
        dir: PathBuf,
        reason: String,
    },
    /// Serving failed (callers add the "admin API" context).
    #[error("{0}")]
    Serve(String),
}

impl AdminError {
    fn from_status(addr: &str, status: Status) -> AdminError {
        let code = status.code();
        let mut message = status.message().to_string();
        if let Some(source) = std::error::Error::source(&status) {
            append_chain(&mut message, source);
        }
        // The client's own request deadline (`Endpoint::timeout`) surfaces
        // as CANCELLED with tonic's `TimeoutExpired` text.
        if code == Code::Cancelled && status.message() == tonic::TimeoutExpired(()).to_string() {
            return AdminError::Timeout {
                addr: addr.to_string(),
                after: REQUEST_TIMEOUT,
            };
        }
        match code {
            Code::Unauthenticated => AdminError::Unauthenticated {
                addr: addr.to_string(),
                message,
            },
            Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument => {
                AdminError::Refused {
                    addr: addr.to_string(),
                    code,
                    message,
                }
            }
            _ => AdminError::Call {
                addr: addr.to_string(),
                code,
                message,
            },
        }
    }
}

/// Writes `addr` into `<data_dir>/admin.addr` atomically (temp file, fsync,
/// rename). An unspecified IP is written as the loopback of its family.
pub fn write_addr_file(data_dir: &Path, addr: SocketAddr) -> io::Result<()> {
    write_addr_file_named(data_dir, ADDR_FILE_NAME, addr)
}

/// [`write_addr_file`] under another name (`ferry serve`'s `http.addr`).
pub fn write_addr_file_named(data_dir: &Path, name: &str, addr: SocketAddr) -> io::Result<()> {
    write_line_file(data_dir, name, &connectable(addr).to_string())
}

/// Writes `<scheme>://HOST:PORT` of `addr` into `<data_dir>/<name>` as
/// [`write_addr_file`] does (`ferry serve`'s `http.url`, a node's
/// `admin.url`): the address with how to speak to it.
pub fn write_url_file(
    data_dir: &Path,
    name: &str,
    scheme: &str,
    addr: SocketAddr,
) -> io::Result<()> {
    write_line_file(data_dir, name, &format!("{scheme}://{}", connectable(addr)))
}

/// Writes `line` and a newline into `<data_dir>/<name>`: a temp file,
/// fsync'd and renamed over the old one.
fn write_line_file(data_dir: &Path, name: &str, line: &str) -> io::Result<()> {
    let addr = line;
    let path = data_dir.join(name);
    let tmp = data_dir.join(format!("{name}.tmp.{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        writeln!(file, "{addr}")?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// The one line of an address file, read up to [`MAX_ADDR_FILE_BYTES`].
fn read_addr_line(file: std::fs::File) -> Result<String, String> {
    let mut bytes = Vec::new();
    file.take(MAX_ADDR_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| error.to_string())?;
    if bytes.len() as u64 > MAX_ADDR_FILE_BYTES {
        return Err(format!(
            "longer than {MAX_ADDR_FILE_BYTES} bytes, not an address file"
        ));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Reads the address a node wrote into `<data_dir>/admin.addr`.
pub fn read_addr_file(data_dir: &Path) -> Result<SocketAddr, AdminError> {
    let path = data_dir.join(ADDR_FILE_NAME);
    let fail = |reason: String| AdminError::AddrFile {
        path: path.clone(),
        dir: data_dir.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(&path).map_err(|error| fail(error.to_string()))?;
    let text = read_addr_line(file).map_err(fail)?;
    let line = text.trim();
    line.parse::<SocketAddr>().map_err(|_| {
        let shown: String = line.chars().take(64).collect();
        fail(format!("{shown:?} is not a HOST:PORT address"))
    })
}

/// The admin address a node wrote into its data dir: `admin.url`
/// (`http://HOST:PORT` or `https://HOST:PORT`) when there, else
/// `admin.addr` (written by every ferry, older ones too).
pub fn read_admin_url(data_dir: &Path) -> Result<String, AdminError> {
    let path = data_dir.join(URL_FILE_NAME);
    let fail = |reason: String| AdminError::AddrFile {
        path: path.clone(),
        dir: data_dir.to_path_buf(),
        reason,
    };
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return read_addr_file(data_dir).map(|addr| addr.to_string())
        }
        Err(error) => return Err(fail(error.to_string())),
    };
    let text = read_addr_line(file).map_err(fail)?;
    let line = text.trim();
    let addr = line
        .strip_prefix("http://")
        .or_else(|| line.strip_prefix("https://"));
    match addr.map(str::parse::<SocketAddr>) {
        Some(Ok(_)) => Ok(line.to_string()),
        _ => {
            let shown: String = line.chars().take(64).collect();
            Err(fail(format!(
                "{shown:?} is not an http://HOST:PORT or https://HOST:PORT address"
            )))
        }
    }
}

/// The access a node's config gives its admin API: a bearer token
/// (`admin-token-file`) and TLS (`admin-tls-cert-file`,
/// `admin-tls-key-file`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdminAccess {
    /// Every call must carry `authorization: Bearer <token>`.
    pub token: Option<Secret>,
    /// The PEM certificate chain of the admin API's TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub tls_key_file: Option<PathBuf>,
}

impl AdminAccess {
    /// The TLS config, when TLS is given (errors name the keys).
    pub fn tls_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => {
                let files = crate::tls::ServerFiles {
                    cert_what: "admin-tls-cert-file",
                    cert,
                    key_what: "admin-tls-key-file",
                    key,
                };
                crate::tls::server_config(files, crate::tls::ALPN_H2_HTTP1).map(Some)
            }
            (Some(_), None) => Err("admin-tls-cert-file needs admin-tls-key-file".into()),
            (None, Some(_)) => Err("admin-tls-key-file needs admin-tls-cert-file".into()),
        }
    }

    /// `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        match self.tls_cert_file.is_some() {
            true => "https",
            false => "http",
        }
    }
}

/// What a client of the admin API brings: the node's token, the CA its
/// certificate chains to (`https://` addresses; default: the system's
/// roots).
#[derive(Debug, Clone, Default)]
pub struct ClientAccess {
    pub token: Option<Secret>,
    pub ca_file: Option<PathBuf>,
}

/// Asks the node at `addr` (`HOST:PORT`) for its status.
pub async fn fetch_status(addr: &str, access: &ClientAccess) -> Result<NodeStatus, AdminError> {
    let reply = call(addr, access, |mut client| async move {
        client.status(pb::StatusRequest {}).await
    })
    .await?;
    let status = reply.status.ok_or_else(|| AdminError::BadReply {
        addr: addr.to_string(),
        reason: "status reply without a status".into(),
    })?;
    Ok(status.into())
}

/// Stops shipping to the drainers `which` selects on the node at `addr`;
/// returns how many syncs changed.
pub async fn stop_sync(
    addr: &str,
    access: &ClientAccess,
    which: &SyncSelector,
) -> Result<u32, AdminError> {
    let request = pb::SyncControlRequest {
        selector: Some(which.clone().into()),
    };
    let reply = call(addr, access, |mut client| async move {
        client.stop_sync(request).await
    })
    .await?;
    Ok(reply.changed)
}

/// Resumes shipping to the drainers `which` selects on the node at `addr`;
/// returns how many syncs changed.
pub async fn restart_sync(
    addr: &str,
    access: &ClientAccess,
    which: &SyncSelector,
) -> Result<u32, AdminError> {
    let request = pb::SyncControlRequest {
        selector: Some(which.clone().into()),
    };
    let reply = call(addr, access, |mut client| async move {
        client.restart_sync(request).await
    })
    .await?;
    Ok(reply.changed)
}

/// Asks the node at `addr` to skip the entry a partition's applier is
/// blocked on.
pub async fn skip(
    addr: &str,
    access: &ClientAccess,
    request: &SkipRequest,
) -> Result<SkipOutcome, AdminError> {
    let request: pb::SkipRequest = request.clone().into();
    let reply = call(addr, access, |mut client| async move {
        client.skip(request).await
    })
    .await?;
    Ok(reply.into())
}

/// Asks the node at `addr` to switch its sync over, letting writes on the
/// source stay paused at most `timeout`; the report lists every step.
pub async fn switchover(
    addr: &str,
    access: &ClientAccess,
    timeout: Duration,
) -> Result<SwitchoverReport, AdminError> {
    let request = pb::SwitchoverRequest {
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    // The node stops and starts its stages around the pause.
    let limit = timeout + Duration::from_secs(120);
    let reply = call_within(addr, access, limit, |mut client| async move {
        client.switchover(request).await
    })
    .await?;
    Ok(reply.into())
}

/// The client of one call: the admin API's stub with the token added to
/// every request.
type Client = AdminClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every request, when there is a
/// token.
#[derive(Clone)]
struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Connects over TLS to one address, whatever the URI asked for (the
/// endpoint's URI says `http://`: the TLS is this connector's).
#[derive(Clone)]
struct TlsConnector {
    host_port: String,
    config: Arc<rustls::ClientConfig>,
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let host_port = self.host_port.clone();
        let config = Arc::clone(&self.config);
        Box::pin(async move {
            crate::tls::connect(&host_port, config)
                .await
                .map(hyper_util::rt::TokioIo::new)
        })
    }
}

/// Connects to `addr` and runs one call, the whole bounded in time.
async fn call<T, F, Fut>(addr: &str, access: &ClientAccess, request: F) -> Result<T, AdminError>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    call_within(addr, access, REQUEST_TIMEOUT, request).await
}

/// [`call`] with `request_timeout` for the answer.
async fn call_within<T, F, Fut>(
    addr: &str,
    access: &ClientAccess,
    request_timeout: Duration,
    request: F,
) -> Result<T, AdminError>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let target = target(addr)?;
    let refused = |reason: String| AdminError::Access {
        addr: addr.to_string(),
        reason,
    };
    let token = match &access.token {
        Some(token) => {
            let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.expose())
                .parse()
                .map_err(|_| refused("the token is not printable ASCII".into()))?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    let tls = match &target.tls_host {
        Some(host_port) => Some(TlsConnector {
            host_port: host_port.clone(),
            config: crate::tls::client_config(
                "--ca-file",
                access.ca_file.as_deref(),
                crate::tls::ALPN_H2,
            )
            .map_err(refused)?,
        }),
        None => None,
    };
    let endpoint = target.endpoint.timeout(request_timeout);
    let work = async {
        let connected = match tls {
            Some(connector) => endpoint.connect_with_connector(connector).await,
            None => endpoint.connect().await,
        };
        let channel = connected.map_err(|error| AdminError::Unreachable {
            addr: addr.to_string(),
            reason: error_chain(&error),
        })?;
        let client = AdminClient::with_interceptor(channel, BearerToken(token))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        request(client)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| AdminError::from_status(addr, status))
    };
    let limit = CONNECT_TIMEOUT + request_timeout;
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(AdminError::Timeout {
            addr: addr.to_string(),
            after: limit,
        })
    })
}

/// Where a call goes.
struct Target {
    /// Always an `http://` URI: TLS, when asked for, is done by
    /// [`TlsConnector`].
    endpoint: Endpoint,
    /// `HOST:PORT` of an `https://` address.
    tls_host: Option<String>,
}

/// The target of `addr`: `HOST:PORT`, optionally prefixed by `http://`, or
/// `https://HOST:PORT` for TLS.
fn target(addr: &str) -> Result<Target, AdminError> {
    let bad = |reason: String| AdminError::BadAddress {
        addr: addr.to_string(),
        reason,
    };
    let (rest, tls) = match addr.split_once("://") {
        None => (addr, false),
        Some(("http", rest)) => (rest, false),
        Some(("https", rest)) => (rest, true),
        Some((scheme, _)) => {
            return Err(bad(format!(
                "{scheme}:// is not served (http:// or https://)"
            )))
        }
    };
    let endpoint = Endpoint::from_shared(format!("http://{rest}"))
        .map_err(|error| bad(error_chain(&error)))?;
    let parsed = endpoint.uri();
    let Some(port) = parsed.port_u16() else {
        return Err(bad("no port".into()));
    };
    if !matches!(parsed.path(), "" | "/") {
        return Err(bad(format!("unexpected path {:?}", parsed.path())));
    }
    let tls_host = match (tls, parsed.host()) {
        (false, _) => None,
        (true, Some(host)) => Some(format!("{host}:{port}")),
        (true, None) => return Err(bad("no host".into())),
    };
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true);
    Ok(Target { endpoint, tls_host })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_file_round_trips_and_rewrites_unspecified() {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "127.0.0.1:45678".parse().unwrap();
        write_addr_file(dir.path(), addr).unwrap();
        let text = std::fs::read_to_string(dir.path().join(ADDR_FILE_NAME)).unwrap();
        assert_eq!(text, "127.0.0.1:45678\n");
        assert_eq!(read_addr_file(dir.path()).unwrap(), addr);

        write_addr_file(dir.path(), "0.0.0.0:7390".parse().unwrap()).unwrap();
        assert_eq!(
            read_addr_file(dir.path()).unwrap(),
            "127.0.0.1:7390".parse::<SocketAddr>().unwrap()
        );
        write_addr_file(dir.path(), "[::]:7390".parse().unwrap()).unwrap();
        assert_eq!(
            read_addr_file(dir.path()).unwrap(),
            "[::1]:7390".parse::<SocketAddr>().unwrap()
        );
        // Only the address file is left behind, no temp file.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, [ADDR_FILE_NAME]);
    }

    #[test]
    fn addr_file_errors_name_the_file_and_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let missing = read_addr_file(dir.path()).unwrap_err().to_string();
        let path = dir.path().join(ADDR_FILE_NAME);
        assert!(missing.contains(&path.display().to_string()), "{missing}");
        assert!(
            missing.contains(&format!(
                "is ferry running with --data-dir {}?",
                dir.path().display()
            )),
            "{missing}"
        );

        std::fs::write(&path, "not an address\n").unwrap();
        let garbled = read_addr_file(dir.path()).unwrap_err().to_string();
        assert!(
            garbled.contains("\"not an address\" is not a HOST:PORT address"),
            "{garbled}"
        );
        assert!(garbled.contains("--data-dir"), "{garbled}");

        std::fs::write(&path, vec![b'7'; 5000]).unwrap();
        let huge = read_addr_file(dir.path()).unwrap_err().to_string();
        assert!(huge.contains("longer than 1024 bytes"), "{huge}");
    }

    #[test]
    fn endpoints_need_host_and_port() {
        assert!(target("127.0.0.1:7390").unwrap().tls_host.is_none());
        assert!(target("http://localhost:7390").unwrap().tls_host.is_none());
        assert!(target("[::1]:7390").is_ok());
        assert_eq!(
            target("https://127.0.0.1:7390")
                .unwrap()
                .tls_host
                .as_deref(),
            Some("127.0.0.1:7390")
        );
        assert_eq!(
            target("https://[::1]:7390").unwrap().tls_host.as_deref(),
            Some("[::1]:7390")
        );
        for bad in [
            "127.0.0.1",
            "https://127.0.0.1",
            "ftp://127.0.0.1:7390",
            "127.0.0.1:7390/x",
            "",
            "a b:1",
        ] {
            let error = target(bad).err().unwrap();
            assert!(
                matches!(error, AdminError::BadAddress { .. }),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn the_url_file_wins_over_the_addr_file() {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "127.0.0.1:45678".parse().unwrap();
        write_addr_file(dir.path(), addr).unwrap();
        assert_eq!(read_admin_url(dir.path()).unwrap(), "127.0.0.1:45678");
        write_url_file(dir.path(), URL_FILE_NAME, "https", addr).unwrap();
        assert_eq!(
            read_admin_url(dir.path()).unwrap(),
            "https://127.0.0.1:45678"
        );
        std::fs::write(dir.path().join(URL_FILE_NAME), "gopher://x\n").unwrap();
        let error = read_admin_url(dir.path()).unwrap_err().to_string();
        assert!(error.contains("not an http://HOST:PORT"), "{error}");
    }

    #[test]
    fn tls_needs_both_files() {
        let access = AdminAccess {
            tls_cert_file: Some("c.pem".into()),
            ..AdminAccess::default()
        };
        let error = access.tls_config().unwrap_err();
        assert!(error.contains("admin-tls-key-file"), "{error}");
        let access = AdminAccess {
            tls_key_file: Some("k.pem".into()),
            ..AdminAccess::default()
        };
        let error = access.tls_config().unwrap_err();
        assert!(error.contains("admin-tls-cert-file"), "{error}");
        assert!(AdminAccess::default().tls_config().unwrap().is_none());
    }

    #[test]
    fn error_chains_skip_repeated_levels() {
        let inner = io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused");
        let outer = ChainError(inner);
        assert_eq!(error_chain(&outer), "tcp connect error: connection refused");
    }

    #[derive(Debug)]
    struct ChainError(io::Error);

    impl std::fmt::Display for ChainError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp connect error")
        }
    }

    impl std::error::Error for ChainError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
