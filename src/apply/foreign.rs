//! Writes on a target that ferry did not make, sampled (the
//! "guarded target" of a one-way sync: only ferry should write it).
//!
//! In: the target's address, `foreign-writes-every` and
//! `foreign-writes-window` (`[apply]`). Out: in the applier's status, the
//! writes seen, the windows watched and the latest few (db, key, client),
//! and a warning per window that saw any.
//!
//! Every `foreign-writes-every` the applier watches its target for
//! `foreign-writes-window` through `MONITOR`, on a connection of its own
//! (named `ferry-monitor`). A command seen is a foreign write when:
//!
//! - it writes (ferry's command table);
//! - its client's name does not start with `ferry-` (appliers name their
//!   connections `ferry-apply:<drainer-id>:<partition>`, other syncs'
//!   appliers too). Names come from `CLIENT LIST` before the window and
//!   from the `CLIENT SETNAME` commands seen in it; a client that connected
//!   during the window and is still there is looked up again after it;
//! - not all of its keys are ferry's own (`__ferry*`).
//!
//! Commands a script runs (`[db lua]`) belong to the script's caller, the
//! client of the line before them.
//!
//! A cluster target is watched master by master, each as above, for as
//! long as an applier's session uses that master.
//!
//! One applier per target watches it in a process ([`claim`]): the
//! appliers of a cluster source's partitions, writing one standalone
//! target, would each count the same writes. The first to start takes it;
//! the others show none, and take it over when it stops.
//!
//! It is a sample: writes between the windows are not seen, so a count of 0
//! proves nothing, and a count above 0 proves such writes happen. `MONITOR`
//! costs the target some throughput while it runs, so windows are short and
//! rare by default (200 ms every minute). `ferry guard` keeps other clients
//! from writing at all.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::status::ApplyStatus;
use crate::redis::client::{Client, ClientError};
use crate::redis::command::{self, Command};
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;

/// Foreign writes kept as samples in the status.
pub const SAMPLES_KEPT: usize = 5;

/// The name of the sampler's own connection.
const MONITOR_CLIENT_NAME: &str = "ferry-monitor";

/// Lines and bytes of one window read at most (a busy target's MONITOR is
/// a flood, and a line holds a whole command): the window ends early.
const MAX_LINES: usize = 100_000;
const MAX_BYTES: usize = 16 << 20;

/// One foreign write seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignWrite {
    pub db: u32,
    /// The command's name and its first key (or none: `FLUSHALL`).
    pub command: String,
    pub key: Option<String>,
    /// The client's address, and its name if it has one.
    pub client: String,
}

impl std::fmt::Display for ForeignWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "db {} {}", self.db, self.command)?;
        if let Some(key) = &self.key {
            write!(f, " {key:?}")?;
        }
        write!(f, " by {}", self.client)
    }
}

/// What one window saw.
#[derive(Debug, Default)]
pub struct Window {
    pub writes: u64,
    pub samples: Vec<ForeignWrite>,
    /// MONITOR lines read.
    pub lines: usize,
}

/// The targets an applier of this process watches.
static WATCHED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn watched() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    WATCHED.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// The right to watch one target in this process; given up when dropped.
#[derive(Debug)]
pub struct Claim(String);

impl Drop for Claim {
    fn drop(&mut self) {
        watched().remove(&self.0);
    }
}

/// Claims watching `target` (`host:port`); `None` when another applier of
/// this process watches it.
pub fn claim(target: &str) -> Option<Claim> {
    watched()
        .insert(target.to_string())
        .then(|| Claim(target.to_string()))
}

/// Runs windows every `every` until `cancel`; errors are logged and the
/// next window tries again. The caller holds the target's [`Claim`] while
/// it runs.
pub async fn run(
    url: RedisUrl,
    every: Duration,
    window: Duration,
    status: Arc<ApplyStatus>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let seen = tokio::select! {
            _ = cancel.cancelled() => return,
            seen = watch(&url, window) => seen,
        };
        match seen {
            Ok(seen) => {
                if seen.writes > 0 {
                    warn!(
                        partition = %status.partition(),
                        writes = seen.writes,
                        window = ?window,
                        samples = %seen.samples.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                        "writes on the target that ferry did not make (a one-way target should only be written by ferry: see ferry guard)"
                    );
                }
                status.add_foreign_window(seen.writes, seen.samples);
            }
            Err(error) => {
                debug!(partition = %status.partition(), %error, "cannot watch the target for foreign writes");
            }
        }
    }
}

/// Watches `url` for `window` (module doc).
pub async fn watch(url: &RedisUrl, window: Duration) -> Result<Window, ClientError> {
    let mut client = Client::connect(url).await?;
    client
        .call(["CLIENT", "SETNAME", MONITOR_CLIENT_NAME])
        .await?;
    let mut names = client_names(&mut client).await?;
    client.call(["MONITOR"]).await?;
    let deadline = tokio::time::Instant::now() + window;
    let mut lines = Vec::new();
    let mut bytes = 0;
    while lines.len() < MAX_LINES && bytes < MAX_BYTES {
        match tokio::time::timeout_at(deadline, client.read_frame()).await {
            Err(_) => break,
            Ok(frame) => {
                if let Some(line) = frame?.as_bytes() {
                    bytes += line.len();
                    lines.push(line.clone());
                }
            }
        }
    }
    drop(client);
    let parsed: Vec<MonitorLine> = lines.iter().filter_map(|l| parse_line(l)).collect();
    // Names set during the window.
    for line in &parsed {
        if line.args.len() == 3
            && line.args[0].eq_ignore_ascii_case(b"CLIENT")
            && line.args[1].eq_ignore_ascii_case(b"SETNAME")
        {
            names.insert(
                line.addr.clone(),
                String::from_utf8_lossy(&line.args[2]).into_owned(),
            );
        }
    }
    if parsed
        .iter()
        .any(|line| line.addr != "lua" && !names.contains_key(&line.addr))
    {
        let mut again = Client::connect(url).await?;
        for (addr, name) in client_names(&mut again).await? {
            names.entry(addr).or_insert(name);
        }
    }
    let mut seen = classify(&parsed, &names);
    seen.lines = lines.len();
    Ok(seen)
}

/// `CLIENT LIST`: address → name (empty for none).
async fn client_names(client: &mut Client) -> Result<HashMap<String, String>, ClientError> {
    let reply = client.call(["CLIENT", "LIST"]).await?;
    let text = match &reply {
        Frame::Verbatim { text, .. } => String::from_utf8_lossy(text).into_owned(),
        other => other
            .as_bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default(),
    };
    Ok(text
        .lines()
        .filter_map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            };
            Some((field("addr")?.to_string(), field("name")?.to_string()))
        })
        .collect())
}

/// One `MONITOR` line: `<time> [<db> <addr>] "<arg>" ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorLine {
    pub db: u32,
    /// The client's `ip:port`, `unix:<path>`, or `lua` (a script's command).
    pub addr: String,
    pub args: Vec<Vec<u8>>,
}

/// Parses a `MONITOR` line; `None` for anything else (the `OK`).
pub fn parse_line(line: &[u8]) -> Option<MonitorLine> {
    let open = line.iter().position(|&b| b == b'[')?;
    let close = open + line[open..].iter().position(|&b| b == b']')?;
    let inside = std::str::from_utf8(&line[open + 1..close]).ok()?;
    let (db, addr) = inside.split_once(' ')?;
    let db = db.parse().ok()?;
    let mut args = Vec::new();
    let mut rest = &line[close + 1..];
    loop {
        while let [b' ', tail @ ..] = rest {
            rest = tail;
        }
        if rest.is_empty() {
            break;
        }
        let (arg, tail) = parse_quoted(rest)?;
        args.push(arg);
        rest = tail;
    }
    if args.is_empty() {
        return None;
    }
    Some(MonitorLine {
        db,
        addr: addr.to_string(),
        args,
    })
}

/// One `"..."` argument as Redis quotes it (`sdscatrepr`): `\\`, `\"`,
/// `\n`, `\r`, `\t`, `\a`, `\b` and `\xHH` escapes.
fn parse_quoted(text: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut rest: &[u8] = text.strip_prefix(b"\"")?;
    let mut out = Vec::new();
    loop {
        match rest {
            [b'"', tail @ ..] => return Some((out, tail)),
            [b'\\', b'x', h, l, tail @ ..] => {
                let hex = |c: u8| (c as char).to_digit(16);
                out.push((hex(*h)? * 16 + hex(*l)?) as u8);
                rest = tail;
            }
            [b'\\', c, tail @ ..] => {
                out.push(match c {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'a' => 0x07,
                    b'b' => 0x08,
                    other => *other,
                });
                rest = tail;
            }
            [c, tail @ ..] => {
                out.push(*c);
                rest = tail;
            }
            [] => return None,
        }
    }
}

/// The foreign writes among `lines` (module doc), given client names.
pub fn classify(lines: &[MonitorLine], names: &HashMap<String, String>) -> Window {
    let mut seen = Window::default();
    let mut caller: Option<&str> = None;
    for line in lines {
        let addr = if line.addr == "lua" {
            match caller {
                Some(addr) => addr,
                None => continue,
            }
        } else {
            caller = Some(line.addr.as_str());
            line.addr.as_str()
        };
        let name = names.get(addr).map(String::as_str).unwrap_or("");
        if name.starts_with("ferry-") {
            continue;
        }
        let cmd = Command::from_parts(line.args.iter());
        if !command::is_write(&cmd) {
            continue;
        }
        let keys = command::keys(&cmd).unwrap_or_default();
        if !keys.is_empty()
            && keys
                .iter()
                .all(|key| key.starts_with(crate::record::INTERNAL_PREFIX))
        {
            continue;
        }
        seen.writes += 1;
        if seen.samples.len() < SAMPLES_KEPT {
            seen.samples.push(ForeignWrite {
                db: line.db,
                command: String::from_utf8_lossy(&line.args[0]).to_uppercase(),
                key: keys
                    .first()
                    .map(|key| String::from_utf8_lossy(key).into_owned()),
                client: match name {
                    "" => addr.to_string(),
                    name => format!("{addr} ({name})"),
                },
            });
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_applier_per_target_watches_it() {
        let first = claim("claim-test:1").expect("free");
        assert!(
            claim("claim-test:1").is_none(),
            "a second applier of the same target"
        );
        let other = claim("claim-test:2").expect("another target");
        drop(first);
        assert!(claim("claim-test:1").is_some(), "taken over once given up");
        drop(other);
    }

    #[test]
    fn monitor_lines_parse_with_escapes() {
        let line =
            parse_line(br#"1733512345.123456 [3 127.0.0.1:5555] "SET" "a \"b\"\\" "\x00\xff\n""#)
                .unwrap();
        assert_eq!(line.db, 3);
        assert_eq!(line.addr, "127.0.0.1:5555");
        assert_eq!(
            line.args,
            vec![b"SET".to_vec(), b"a \"b\"\\".to_vec(), vec![0, 0xff, b'\n']]
        );
        assert_eq!(parse_line(b"OK"), None);
        assert_eq!(parse_line(br#"1.0 [0 lua] "SET" "unterminated"#), None);
        assert_eq!(parse_line(br#"1.0 [x 1.2.3.4:5] "SET""#), None);
    }

    #[test]
    fn only_other_clients_writes_to_keys_not_ferrys_count() {
        let lines: Vec<MonitorLine> = [
            br#"1.0 [0 10.0.0.1:1] "SET" "mine" "1""#.as_slice(),
            br#"1.0 [0 10.0.0.2:2] "SET" "app:1" "1""#,
            br#"1.0 [0 10.0.0.2:2] "GET" "app:1""#,
            br#"1.0 [0 10.0.0.2:2] "SET" "__ferry:guard" "x""#,
            br#"1.0 [0 10.0.0.3:3] "EVAL" "redis.call('del', KEYS[1])" "1" "k""#,
            br#"1.0 [0 lua] "del" "k""#,
            br#"1.0 [1 10.0.0.1:1] "EVAL" "..." "0""#,
            br#"1.0 [1 lua] "incr" "ferrys-own""#,
            br#"1.0 [2 10.0.0.2:2] "FLUSHDB""#,
        ]
        .iter()
        .map(|l| parse_line(l).unwrap())
        .collect();
        let names = HashMap::from([
            ("10.0.0.1:1".to_string(), "ferry-apply:d:0".to_string()),
            ("10.0.0.2:2".to_string(), "app".to_string()),
            ("10.0.0.3:3".to_string(), String::new()),
        ]);
        let seen = classify(&lines, &names);
        let shown: Vec<String> = seen.samples.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "db 0 SET \"app:1\" by 10.0.0.2:2 (app)",
                "db 0 DEL \"k\" by 10.0.0.3:3",
                "db 2 FLUSHDB by 10.0.0.2:2 (app)",
            ]
        );
        assert_eq!(seen.writes, 3);
    }
}
