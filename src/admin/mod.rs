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
//! Four unary calls on plain HTTP/2 (the API is meant for loopback):
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
//! # Address file
//!
//! Once serving, a node writes the address it is bound to into
//! `<data-dir>/admin.addr` ([`ADDR_FILE_NAME`]): one line `HOST:PORT\n`,
//! written to a temp file, fsync'd and renamed over the old one, so a
//! reader sees the old or the new address, never a partial one. An
//! unspecified bind address (`0.0.0.0`, `::`) is written as the loopback of
//! its family, which is what a local `ferry status --data-dir DIR` connects
//! to.

pub mod convert;
mod server;

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::record::pb;
use crate::status::{NodeStatus, SkipOutcome, SkipRequest, SwitchoverReport, SyncSelector};

pub use crate::record::pb::admin_client::AdminClient;
pub use crate::record::pb::admin_server::{Admin, AdminServer};
pub use server::{admin_routes, control_error_status, serve_admin, AdminService};

/// Where a node serves the admin API unless told otherwise.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:7390";
/// Name of the address file in a node's data dir.
pub const ADDR_FILE_NAME: &str = "admin.addr";
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

/// Appends `error` and its sources to `text` as `: a: b`, skipping a level
/// whose text the previous one already contains (transport errors repeat
/// themselves down the chain) and tonic's bare "transport error" wrapper,
/// which says nothing its sources do not.
fn append_chain(text: &mut String, error: &(dyn std::error::Error + 'static)) {
    let mut next = Some(error);
    while let Some(error) = next {
        let level = error.to_string();
        if !level.is_empty() && level != "transport error" && !text.contains(&level) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&level);
        }
        next = error.source();
    }
}

pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    append_chain(&mut text, error);
    text
}

/// Writes `addr` into `<data_dir>/admin.addr` atomically (temp file, fsync,
/// rename). An unspecified IP is written as the loopback of its family.
pub fn write_addr_file(data_dir: &Path, addr: SocketAddr) -> io::Result<()> {
    write_addr_file_named(data_dir, ADDR_FILE_NAME, addr)
}

/// [`write_addr_file`] under another name (`ferry serve`'s `http.addr`).
pub fn write_addr_file_named(data_dir: &Path, name: &str, addr: SocketAddr) -> io::Result<()> {
    let addr = connectable(addr);
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

/// Reads the address a node wrote into `<data_dir>/admin.addr`.
pub fn read_addr_file(data_dir: &Path) -> Result<SocketAddr, AdminError> {
    let path = data_dir.join(ADDR_FILE_NAME);
    let fail = |reason: String| AdminError::AddrFile {
        path: path.clone(),
        dir: data_dir.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(&path).map_err(|error| fail(error.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_ADDR_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| fail(error.to_string()))?;
    if bytes.len() as u64 > MAX_ADDR_FILE_BYTES {
        return Err(fail(format!(
            "longer than {MAX_ADDR_FILE_BYTES} bytes, not an address file"
        )));
    }
    let text = String::from_utf8_lossy(&bytes);
    let line = text.trim();
    line.parse::<SocketAddr>().map_err(|_| {
        let shown: String = line.chars().take(64).collect();
        fail(format!("{shown:?} is not a HOST:PORT address"))
    })
}

/// Asks the node at `addr` (`HOST:PORT`) for its status.
pub async fn fetch_status(addr: &str) -> Result<NodeStatus, AdminError> {
    let reply = call(addr, |mut client| async move {
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
pub async fn stop_sync(addr: &str, which: &SyncSelector) -> Result<u32, AdminError> {
    let request = pb::SyncControlRequest {
        selector: Some(which.clone().into()),
    };
    let reply = call(
        addr,
        |mut client| async move { client.stop_sync(request).await },
    )
    .await?;
    Ok(reply.changed)
}

/// Resumes shipping to the drainers `which` selects on the node at `addr`;
/// returns how many syncs changed.
pub async fn restart_sync(addr: &str, which: &SyncSelector) -> Result<u32, AdminError> {
    let request = pb::SyncControlRequest {
        selector: Some(which.clone().into()),
    };
    let reply = call(addr, |mut client| async move {
        client.restart_sync(request).await
    })
    .await?;
    Ok(reply.changed)
}

/// Asks the node at `addr` to skip the entry a partition's applier is
/// blocked on.
pub async fn skip(addr: &str, request: &SkipRequest) -> Result<SkipOutcome, AdminError> {
    let request: pb::SkipRequest = request.clone().into();
    let reply = call(addr, |mut client| async move { client.skip(request).await }).await?;
    Ok(reply.into())
}

/// Asks the node at `addr` to switch its sync over, letting writes on the
/// source stay paused at most `timeout`; the report lists every step.
pub async fn switchover(addr: &str, timeout: Duration) -> Result<SwitchoverReport, AdminError> {
    let request = pb::SwitchoverRequest {
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    // The node stops and starts its stages around the pause.
    let limit = timeout + Duration::from_secs(120);
    let reply = call_within(addr, limit, |mut client| async move {
        client.switchover(request).await
    })
    .await?;
    Ok(reply.into())
}

/// Connects to `addr` and runs one call, the whole bounded in time.
async fn call<T, F, Fut>(addr: &str, request: F) -> Result<T, AdminError>
where
    F: FnOnce(AdminClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    call_within(addr, REQUEST_TIMEOUT, request).await
}

/// [`call`] with `request_timeout` for the answer.
async fn call_within<T, F, Fut>(
    addr: &str,
    request_timeout: Duration,
    request: F,
) -> Result<T, AdminError>
where
    F: FnOnce(AdminClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let endpoint = endpoint(addr)?.timeout(request_timeout);
    let work = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| AdminError::Unreachable {
                addr: addr.to_string(),
                reason: error_chain(&error),
            })?;
        let client = AdminClient::new(channel)
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

/// The endpoint for `addr`: `HOST:PORT`, optionally prefixed by `http://`.
fn endpoint(addr: &str) -> Result<Endpoint, AdminError> {
    let bad = |reason: String| AdminError::BadAddress {
        addr: addr.to_string(),
        reason,
    };
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|error| bad(error_chain(&error)))?;
    let parsed = endpoint.uri();
    if parsed.scheme_str() != Some("http") {
        return Err(bad("only http:// is served".into()));
    }
    if parsed.port_u16().is_none() {
        return Err(bad("no port".into()));
    }
    if !matches!(parsed.path(), "" | "/") {
        return Err(bad(format!("unexpected path {:?}", parsed.path())));
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true))
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
        assert!(endpoint("127.0.0.1:7390").is_ok());
        assert!(endpoint("http://localhost:7390").is_ok());
        assert!(endpoint("[::1]:7390").is_ok());
        for bad in [
            "127.0.0.1",
            "https://127.0.0.1:7390",
            "127.0.0.1:7390/x",
            "",
            "a b:1",
        ] {
            let error = endpoint(bad).unwrap_err();
            assert!(
                matches!(error, AdminError::BadAddress { .. }),
                "{bad:?}: {error}"
            );
        }
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
