//! `ferry serve` (the daemon) and `ferry task …` (its HTTP API's client).
//!
//! The client speaks HTTP/1.1 over a plain TCP connection, or over TLS for
//! an `https://` server (its certificate verified against `--ca-file`, else
//! the system's roots; the name it must carry is the server's host). The
//! API is JSON, one request per connection: a reply is read up to
//! [`REPLY_MAX`] bytes, within [`REQUEST_TIMEOUT`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::serve::{ServeConfig, DEFAULT_HTTP_ADDR};

/// Largest reply the client reads.
const REPLY_MAX: usize = 16 << 20;
/// A whole request, connect to last byte. A create waits for the precheck.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where the task store and every task's WAL live (created with mode
    /// 0700 if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address of the HTTP API, dashboard and metrics. Beyond loopback,
    /// --token-file is required.
    #[arg(long, default_value = DEFAULT_HTTP_ADDR)]
    pub http: String,
    /// A file holding a bearer token (at least 16 characters) that every
    /// API and metrics request must carry (`Authorization: Bearer TOKEN`).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve HTTPS (only) with this PEM certificate chain; needs
    /// --tls-key-file.
    #[arg(long, value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of --tls-cert-file.
    #[arg(long, value_name = "FILE")]
    pub tls_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TaskArgs {
    /// The `ferry serve` to talk to: http://HOST:PORT or https://HOST:PORT
    /// (as in the daemon's DATA_DIR/http.url).
    #[arg(long, global = true, default_value = "http://127.0.0.1:7380")]
    pub server: String,
    /// A file holding the daemon's bearer token.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// For https://: the PEM CA certificate(s) the daemon's certificate
    /// must chain to [default: the system's roots].
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: TaskCommand,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Create a task: prechecked, then started when nothing FAILs.
    Create(Box<CreateArgs>),
    /// List every task with its state and lag.
    List,
    /// Show one task: its state and per-partition status.
    Show { name: String },
    /// Stop a task's sync (its WAL and checkpoint stay).
    Stop { name: String },
    /// Start a stopped or failed task where it was.
    Start { name: String },
    /// Cancel a task: stop it, delete its WAL and the keys ferry wrote for
    /// it (never the target's data).
    Cancel {
        name: String,
        /// Cancel even when a server cannot be reached to remove the keys
        /// ferry wrote for the task (they are named in the reply).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The task's name (a-z, 0-9, '-').
    #[arg(long)]
    pub name: String,
    /// `redis://[user@]host:port` (a cluster: any node or a seed list).
    #[arg(long)]
    pub source: String,
    #[arg(long)]
    pub target: String,
    /// A file holding the source's password (sent to the daemon, which
    /// keeps it in a file of mode 0600 and never shows it).
    #[arg(long, value_name = "FILE")]
    pub source_password_file: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub target_password_file: Option<PathBuf>,
    /// Two-way sync between Redis 7 servers: two standalone servers, two
    /// Redis Clusters, or a standalone server and a cluster in either order.
    #[arg(long)]
    pub two_way: bool,
    #[arg(long)]
    pub wal_ttl: Option<String>,
    /// refuse | keep | flush.
    #[arg(long)]
    pub existing_data: Option<String>,
    /// Two-way: report | source-wins | target-wins.
    #[arg(long)]
    pub conflict: Option<String>,
    #[arg(long, value_delimiter = ',')]
    pub dbs: Option<Vec<u32>>,
    #[arg(long)]
    pub key_prefix: Vec<String>,
    #[arg(long)]
    pub exclude_key_prefix: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeCommandError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    #[error("{0}")]
    Client(String),
    /// The daemon answered with an error status.
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
}

fn runtime() -> Result<tokio::runtime::Runtime, ServeCommandError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServeCommandError::Runtime)
}

pub fn serve(args: ServeArgs) -> Result<(), ServeCommandError> {
    let cfg = ServeConfig {
        data_dir: args.data_dir,
        http: args.http,
        token_file: args.token_file,
        tls_cert_file: args.tls_cert_file,
        tls_key_file: args.tls_key_file,
    };
    runtime()?.block_on(async {
        let shutdown = super::node::shutdown_on_signal();
        crate::serve::serve(cfg, shutdown).await
    })?;
    Ok(())
}

/// Where the client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerAddr {
    /// `HOST:PORT`.
    host: String,
    /// A path prefix (`/ferry` of `http://h:1/ferry/`).
    prefix: String,
    tls: bool,
}

/// `http://host:port[/prefix]` or `https://…` → [`ServerAddr`].
fn server_addr(server: &str) -> Result<ServerAddr, ServeCommandError> {
    let (rest, tls) = match (
        server.strip_prefix("http://"),
        server.strip_prefix("https://"),
    ) {
        (Some(rest), _) => (rest, false),
        (None, Some(rest)) => (rest, true),
        (None, None) => {
            return Err(ServeCommandError::Client(format!(
                "--server {server:?}: give http://HOST:PORT or https://HOST:PORT (the daemon's \
                 --http address)"
            )))
        }
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if host.is_empty() {
        return Err(ServeCommandError::Client(format!(
            "--server {server:?}: no host"
        )));
    }
    Ok(ServerAddr {
        host: host.to_string(),
        prefix: path.to_string(),
        tls,
    })
}

/// Sends `head` and `body` on `stream` and reads the reply to its end (at
/// most [`REPLY_MAX`] bytes).
async fn exchange<S>(mut stream: S, server: &str, head: &str, body: &str) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(body.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    let read = (&mut stream)
        .take(REPLY_MAX as u64 + 1)
        .read_to_end(&mut reply)
        .await;
    match read {
        Ok(_) => {}
        // A server that closes without TLS's close_notify once it has
        // answered (`Connection: close`) has still answered.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !reply.is_empty() => {}
        Err(e) => return Err(format!("reading the reply of {server}: {e}")),
    }
    if reply.len() > REPLY_MAX {
        return Err(format!("the reply of {server} is over {REPLY_MAX} bytes"));
    }
    Ok(reply)
}

/// The body of a reply: after the head, de-chunked when chunked.
fn reply_body(head: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line without its end")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size + 2 {
            return Err("a chunk cut short".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// One request; Ok((status, JSON body)).
async fn request(
    args: &TaskArgs,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ServeCommandError> {
    let ServerAddr { host, prefix, tls } = server_addr(&args.server)?;
    let token = match &args.token_file {
        Some(path) => Some(
            crate::secret::read_secret_file("token", path)
                .map_err(|e| ServeCommandError::Client(e.to_string()))?,
        ),
        None => None,
    };
    let tls_config = match tls {
        true => Some(
            crate::tls::client_config("--ca-file", args.ca_file.as_deref(), crate::tls::ALPN_HTTP1)
                .map_err(ServeCommandError::Client)?,
        ),
        false => None,
    };
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {prefix}{path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(token) = &token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    let server = args.server.clone();
    let work = async {
        match tls_config {
            Some(config) => {
                let stream = crate::tls::connect(&host, config)
                    .await
                    .map_err(|e| format!("connecting to {server}: {e}"))?;
                exchange(stream, &server, &head, &body).await
            }
            None => {
                let stream = tokio::net::TcpStream::connect(&host)
                    .await
                    .map_err(|e| format!("connecting to {server}: {e}"))?;
                exchange(stream, &server, &head, &body).await
            }
        }
    };
    let reply = tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| {
            ServeCommandError::Client(format!(
                "{} gave no reply within {REQUEST_TIMEOUT:?}",
                args.server
            ))
        })?
        .map_err(ServeCommandError::Client)?;
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ServeCommandError::Client(format!("{}: not an HTTP reply", args.server)))?;
    let head = String::from_utf8_lossy(&reply[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            ServeCommandError::Client(format!("{}: no status in {head:?}", args.server))
        })?;
    let body = reply_body(&head, &reply[split + 4..]).map_err(ServeCommandError::Client)?;
    let value = match body.is_empty() {
        true => Value::Null,
        false => serde_json::from_slice(&body).map_err(|e| {
            ServeCommandError::Client(format!("{}: the reply is not JSON: {e}", args.server))
        })?,
    };
    Ok((status, value))
}

/// The reply, or the API's error.
fn ok(status: u16, value: Value) -> Result<Value, ServeCommandError> {
    if (200..300).contains(&status) {
        return Ok(value);
    }
    let message = value
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("no error message")
        .to_string();
    Err(ServeCommandError::Api { status, message })
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn task_rows(tasks: &[Value]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            [
                "name",
                "state",
                "mode",
                "lag_entries",
                "latency_ms",
                "source",
                "target",
            ]
            .iter()
            .map(|k| cell(&t[*k]))
            .collect()
        })
        .collect();
    let mut out = String::new();
    crate::table::table(
        &mut out,
        &[
            "Name",
            "State",
            "Mode",
            "LogId Lag",
            "Latency ms",
            "Source",
            "Target",
        ],
        &rows,
    );
    out
}

fn show_task(task: &Value) -> String {
    let mut out = task_rows(std::slice::from_ref(task));
    if let Some(error) = task["error"].as_str() {
        out.push_str(&format!("error: {error}\n"));
    }
    if let Some(parts) = task["partitions"].as_array() {
        let rows: Vec<Vec<String>> = parts
            .iter()
            .map(|p| {
                [
                    "part_id",
                    "side",
                    "direction",
                    "sync_status",
                    "log_id_lag",
                    "time_latency_ms",
                ]
                .iter()
                .map(|k| cell(&p[*k]))
                .collect()
            })
            .collect();
        crate::table::table(
            &mut out,
            &[
                "PartId",
                "Side",
                "Direction",
                "Sync Status",
                "LogId Lag",
                "Time Latency ms",
            ],
            &rows,
        );
    }
    if let Some(conflicts) = task["conflicts"].as_u64() {
        out.push_str(&format!("two-way conflicts: {conflicts}\n"));
    }
    out
}

pub fn task(args: TaskArgs) -> Result<(), ServeCommandError> {
    runtime()?.block_on(task_async(&args))
}

async fn task_async(args: &TaskArgs) -> Result<(), ServeCommandError> {
    let print = |value: &Value, text: String| {
        match args.json {
            true => println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            ),
            false => print!("{text}"),
        };
    };
    match &args.command {
        TaskCommand::Create(create) => {
            let read = |path: &Option<PathBuf>| {
                path.as_ref()
                    .map(|p| crate::secret::read_secret_file("password", p))
                    .transpose()
                    .map_err(|e| ServeCommandError::Client(e.to_string()))
            };
            let list = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
            let spec = json!({
                "name": create.name,
                "source": create.source,
                "target": create.target,
                "source_password": read(&create.source_password_file)?,
                "target_password": read(&create.target_password_file)?,
                "mode": if create.two_way { "two-way" } else { "one-way" },
                "options": {
                    "wal_ttl": create.wal_ttl,
                    "existing_data": create.existing_data,
                    "conflict": create.conflict,
                    "dbs": create.dbs,
                    "key_prefix": list(&create.key_prefix),
                    "exclude_key_prefix": list(&create.exclude_key_prefix),
                },
            });
            // Absent options are left out, not sent as null.
            let spec = strip_nulls(spec);
            let (status, value) = request(args, "POST", "/api/v1/tasks", Some(&spec)).await?;
            let table = value["precheck"]["table"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if status == 422 && !args.json {
                print!("{table}");
            }
            let value = ok(status, value)?;
            print(
                &value,
                format!("{table}{}", task_rows(&[value["task"].clone()])),
            );
        }
        TaskCommand::List => {
            let (status, value) = request(args, "GET", "/api/v1/tasks", None).await?;
            let value = ok(status, value)?;
            let tasks = value["tasks"].as_array().cloned().unwrap_or_default();
            print(&value, task_rows(&tasks));
        }
        TaskCommand::Show { name } => {
            let (status, value) =
                request(args, "GET", &format!("/api/v1/tasks/{name}"), None).await?;
            let value = ok(status, value)?;
            print(&value, show_task(&value));
        }
        TaskCommand::Stop { name } | TaskCommand::Start { name } => {
            let verb = match &args.command {
                TaskCommand::Stop { .. } => "stop",
                _ => "start",
            };
            let (status, value) =
                request(args, "POST", &format!("/api/v1/tasks/{name}/{verb}"), None).await?;
            let value = ok(status, value)?;
            print(&value, task_rows(std::slice::from_ref(&value)));
        }
        TaskCommand::Cancel { name, force } => {
            let path = match force {
                true => format!("/api/v1/tasks/{name}?force=true"),
                false => format!("/api/v1/tasks/{name}"),
            };
            let (status, value) = request(args, "DELETE", &path, None).await?;
            let value = ok(status, value)?;
            let mut text = task_rows(&[value["task"].clone()]);
            for left in value["keys_left"].as_array().into_iter().flatten() {
                text.push_str(&format!("warning: {}\n", cell(left)));
            }
            print(&value, text);
        }
    }
    Ok(())
}

fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        let addr = |host: &str, prefix: &str, tls: bool| ServerAddr {
            host: host.into(),
            prefix: prefix.into(),
            tls,
        };
        assert_eq!(
            server_addr("http://127.0.0.1:7380").unwrap(),
            addr("127.0.0.1:7380", "", false)
        );
        assert_eq!(
            server_addr("http://h:1/ferry/").unwrap(),
            addr("h:1", "/ferry", false)
        );
        assert_eq!(server_addr("https://h:1").unwrap(), addr("h:1", "", true));
        assert!(server_addr("ftp://h:1").is_err());
        assert!(server_addr("h:1").is_err());
        assert!(server_addr("http://").is_err());
        assert!(server_addr("https://").is_err());
    }

    #[test]
    fn chunked_replies() {
        let body = b"4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked";
        assert_eq!(reply_body(head, body).unwrap(), b"{\"a\":1}");
        assert!(reply_body(head, b"zz\r\n").is_err());
        assert!(reply_body(head, b"9\r\nab").is_err());
        assert_eq!(reply_body("HTTP/1.1 200 OK", b"xy").unwrap(), b"xy");
    }

    #[test]
    fn nulls_are_left_out() {
        let v = strip_nulls(json!({"a": null, "b": {"c": null, "d": 1}}));
        assert_eq!(v, json!({"b": {"d": 1}}));
    }
}
