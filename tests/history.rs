//! History identity between listeners and drainers, with real `ferry
//! listener` / `ferry drainer` processes between real redis-servers (module
//! doc of `src/ship/mod.rs`, "History"):
//!
//! - [`rebuilt_listener_wal_sends_a_snapshot_not_its_new_entries`]. The
//!   listener's WAL dir is deleted while the drainer holds entries of it;
//!   the restarted listener numbers a new log from 1, and the drainer gets a
//!   snapshot of it instead of that log's entries past its old ids (which
//!   would land on the old history: the writes made while the listener was
//!   away would never reach the target).
//! - [`a_partition_belongs_to_the_listener_that_claimed_it`]: a second
//!   listener id configured on the same drainer for the same partition is
//!   refused (PERMISSION_DENIED naming both ids, in logs and status), also
//!   while the owner is down, and never resets the partition.
//! - [`swapped_drainer_wals_get_snapshots_of_their_listeners`]: two relays
//!   whose listeners share an id (`ferry`'s default ids collide) get their
//!   drainers' WAL dirs swapped; each drainer gets a snapshot of its own
//!   listener's log (one above its ids, one below, so the drainer's id base
//!   moves), and each target ends equal to its source, never resumed from a
//!   checkpoint that counts the other WAL's ids.
//! - [`a_listener_refuses_a_wal_holding_another_listeners_log`]: it names
//!   both ids and writes nothing.
//! - [`old_protocol_and_foreign_streams_are_refused_before_any_write`]. Raw
//!   streams: a protocol-1 `Hello`, another listener's `Hello`, entries of
//!   another incarnation: typed errors, the drainer's WAL unchanged.
//!
//! Run: `cargo test --test history -- --test-threads 2`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use common::ferry::FerryProcess;
use common::workload::wait_converged;
use common::{free_port, RedisServer};
use ferry::position::{LogId, PartitionId, ReplOffset};
use ferry::record::pb::{self, ship_message, ship_reply};
use ferry::record::{Record, WriteRecord};
use ferry::redis::command::Command;
use ferry::ship::{wire, DrainerClient, PROTOCOL_VERSION};
use ferry::wal::{SourcePosition, Wal, WalConfig, WalEntry};

/// Longest wait for a target to equal its source.
const CONVERGE: Duration = Duration::from_secs(90);
const STOP: Duration = Duration::from_secs(30);
const SOURCE_ARGS: &[&str] = &["--repl-diskless-sync-delay", "0"];

// ---------------------------------------------------------------------------
// Plumbing.

fn listener_toml(
    data_dir: &Path,
    id: &str,
    source: &str,
    drainer_port: u16,
    secret: &str,
) -> String {
    format!(
        r#"data-dir = "{}"
admin = "127.0.0.1:0"

[listener]
id = "{id}"
source = "{source}"
heartbeat-interval = "500ms"
reconnect-backoff-max = "500ms"

[ship]
reconnect-min = "50ms"
reconnect-max = "500ms"

[[drainers]]
id = "drainer-1"
endpoint = "http://127.0.0.1:{drainer_port}"
secret = "{secret}"
"#,
        data_dir.display()
    )
}

fn drainer_toml(data_dir: &Path, port: u16, target: &str, listeners: &[(&str, &str)]) -> String {
    let mut text = format!(
        r#"data-dir = "{}"
admin = "127.0.0.1:0"
listen = "127.0.0.1:{port}"

[apply]
drainer-id = "drainer-1"
target = "{target}"
retry-backoff-min = "50ms"
retry-backoff-max = "500ms"
"#,
        data_dir.display()
    );
    for (id, secret) in listeners {
        text.push_str(&format!(
            r#"
[[drainer.listeners]]
id = "{id}"
secret = "{secret}"
"#
        ));
    }
    text
}

/// `ferry <verb> --config <dir>/<name>.toml`, data in `<dir>/<name>`.
fn start_node(dir: &Path, verb: &str, name: &str, toml: &str) -> FerryProcess {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml).expect("write config");
    FerryProcess::start(
        &dir.join(name),
        &[
            verb.to_string(),
            "--config".to_string(),
            config.to_str().expect("utf-8 path").to_string(),
        ],
    )
}

fn stop(process: &mut FerryProcess) {
    let status = process.terminate(STOP);
    assert!(
        status.success(),
        "exit {status:?}\n{}",
        process.log_tail(40)
    );
}

fn log_text(process: &FerryProcess) -> String {
    std::fs::read_to_string(&process.log).unwrap_or_default()
}

/// The log files of `processes` (held apart from them: tests restart them).
fn logs_of(processes: &[&FerryProcess]) -> Vec<std::path::PathBuf> {
    processes
        .iter()
        .map(|process| process.log.clone())
        .collect()
}

/// The last lines of every log in `logs`.
fn tails(logs: &[std::path::PathBuf]) -> String {
    logs.iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "ferry log {} ends:\n{}",
                path.display(),
                lines[lines.len().saturating_sub(30)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `count` pipelined `SET <prefix>:<i> <i>` on `server`.
fn write_keys(server: &RedisServer, prefix: &str, count: u64) {
    let mut conn = common::resp::connect(&server.addr());
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        for i in chunk {
            conn.queue(&["SET", &format!("{prefix}:{i}"), &i.to_string()]);
        }
        for reply in conn.replies().expect("SET replies") {
            assert_eq!(reply, common::resp::Resp::Simple("OK".into()));
        }
    }
}

/// The last durable log id of partition 0 in `process`'s status (listener
/// side: its own log; drainer side: the drainer's log).
fn drainer_durable(drainer: &FerryProcess) -> u64 {
    drainer.status_json()["drainers"][0]["durable"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits until `listener` stored its full sync and streams: writes from
/// then on are log entries, not part of the snapshot.
async fn wait_streaming(listener: &FerryProcess, context: impl Fn() -> String) {
    wait_until("the listener to stream", CONVERGE, context, || {
        listener.status_json()["listeners"][0]["source_state"] == "ONLINE"
    })
    .await;
}

fn listener_last(listener: &FerryProcess) -> u64 {
    listener.status_json()["listeners"][0]["last_log_id"]
        .as_u64()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// 1. A rebuilt listener WAL.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_listener_wal_sends_a_snapshot_not_its_new_entries() {
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let secret = "history-secret-1";
    let mut drainer = start_node(
        dir.path(),
        "drainer",
        "drainer",
        &drainer_toml(
            &dir.path().join("drainer"),
            port,
            &target.url(),
            &[("listener-1", secret)],
        ),
    );
    let listener_config = listener_toml(
        &dir.path().join("listener"),
        "listener-1",
        &source.url(),
        port,
        secret,
    );
    let mut listener = start_node(dir.path(), "listener", "listener", &listener_config);
    let logs = logs_of(&[&listener, &drainer]);
    let context = || tails(&logs);

    wait_streaming(&listener, context).await;
    write_keys(&source, "old", 1500);
    wait_converged(
        &source.url(),
        &target.url(),
        "the first history",
        CONVERGE,
        context,
    )
    .await;
    let held = drainer_durable(&drainer);
    assert!(held >= 1500, "the drainer holds {held} entries");

    // The listener's WAL goes; meanwhile the source changes in ways that only
    // a snapshot of the new history carries.
    stop(&mut listener);
    std::fs::remove_dir_all(dir.path().join("listener").join("wal")).expect("remove the wal");
    source.cmd(&["SET", "while-away", "1"]);
    source.cmd(&["DEL", "old:7", "old:8", "old:9"]);
    listener.spawn();
    let logs = logs_of(&[&listener, &drainer]);
    let context = || tails(&logs);
    wait_streaming(&listener, context).await;
    // The new log grows past the ids the drainer holds: entries spliced onto
    // the old history would now be accepted by id alone.
    write_keys(&source, "new", held + 500);
    wait_until(
        "the new log to pass the drainer's ids",
        CONVERGE,
        context,
        || listener_last(&listener) > held + 100,
    )
    .await;
    wait_converged(
        &source.url(),
        &target.url(),
        "the rebuilt history",
        CONVERGE,
        context,
    )
    .await;

    let drainer_log = log_text(&drainer);
    assert!(
        drainer_log.contains("snapshot of another history stored"),
        "{}",
        context()
    );
    assert!(
        log_text(&listener).contains("it holds another history of this partition"),
        "{}",
        context()
    );
    // Writes after the snapshot keep flowing as entries.
    source.cmd(&["SET", "after", "1"]);
    wait_converged(
        &source.url(),
        &target.url(),
        "after the snapshot",
        CONVERGE,
        context,
    )
    .await;
    stop(&mut listener);
    stop(&mut drainer);
}

// ---------------------------------------------------------------------------
// 2. Two listener ids for one partition.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_belongs_to_the_listener_that_claimed_it() {
    let source = RedisServer::start(SOURCE_ARGS);
    let intruder_source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    intruder_source.cmd(&["SET", "intruder", "1"]);
    intruder_source.cmd(&["DEBUG", "POPULATE", "200", "intruder", "10"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut drainer = start_node(
        dir.path(),
        "drainer",
        "drainer",
        &drainer_toml(
            &dir.path().join("drainer"),
            port,
            &target.url(),
            &[
                ("listener-1", "secret-of-one"),
                ("listener-2", "secret-of-two"),
            ],
        ),
    );
    let mut owner = start_node(
        dir.path(),
        "listener",
        "owner",
        &listener_toml(
            &dir.path().join("owner"),
            "listener-1",
            &source.url(),
            port,
            "secret-of-one",
        ),
    );
    wait_streaming(&owner, || tails(&logs_of(&[&owner, &drainer]))).await;
    write_keys(&source, "mine", 300);
    let logs = logs_of(&[&owner, &drainer]);
    let context = || tails(&logs);
    wait_converged(
        &source.url(),
        &target.url(),
        "the owner's data",
        CONVERGE,
        context,
    )
    .await;

    // The owner goes away: the partition is not busy, yet the second
    // listener must not take it.
    stop(&mut owner);
    let mut intruder = start_node(
        dir.path(),
        "listener",
        "intruder",
        &listener_toml(
            &dir.path().join("intruder"),
            "listener-2",
            &intruder_source.url(),
            port,
            "secret-of-two",
        ),
    );
    let logs = logs_of(&[&intruder, &drainer]);
    let context = || tails(&logs);
    wait_until("three refusals", CONVERGE, context, || {
        log_text(&drainer)
            .lines()
            .filter(|line| {
                line.contains("ship stream refused")
                    && line.contains("belongs to listener \"listener-1\"")
                    && line.contains("listener \"listener-2\" may not ship to it")
            })
            .count()
            >= 3
    })
    .await;
    let status = intruder.status_json();
    let shipping = &status["listeners"][0]["shipping"][0];
    assert_eq!(shipping["state"], "OFFLINE", "{status}");
    let error = shipping["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("PermissionDenied") && error.contains("\"listener-1\""),
        "{status}"
    );
    let status = drainer.status_json();
    let row = &status["drainers"][0]["last_error"];
    assert!(
        row.as_str()
            .is_some_and(|e| e.contains("\"listener-1\"") && e.contains("\"listener-2\"")),
        "the drainer's status does not show the refusal: {status}"
    );
    assert_eq!(target.cmd(&["EXISTS", "intruder"]), "0");

    // The owner comes back to its partition, untouched.
    owner.spawn();
    write_keys(&source, "more", 100);
    let logs = logs_of(&[&owner, &intruder, &drainer]);
    let context = || tails(&logs);
    wait_converged(
        &source.url(),
        &target.url(),
        "the owner again",
        CONVERGE,
        context,
    )
    .await;
    assert!(
        !log_text(&drainer).contains("snapshot of another history stored"),
        "{}",
        context()
    );
    stop(&mut intruder);
    stop(&mut owner);
    stop(&mut drainer);
}

// ---------------------------------------------------------------------------
// 3. Drainer WAL dirs swapped between two relays.

struct Relay {
    source: RedisServer,
    target: RedisServer,
    listener: FerryProcess,
    drainer: FerryProcess,
}

fn start_relay(dir: &Path, name: &str) -> Relay {
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    let port = free_port();
    // The same listener id and secret on both relays (as two `ferry sync`
    // runs with default ids would have).
    let secret = "shared-secret-of-both";
    let drainer = start_node(
        dir,
        "drainer",
        &format!("{name}-drainer"),
        &drainer_toml(
            &dir.join(format!("{name}-drainer")),
            port,
            &target.url(),
            &[("listener-1", secret)],
        ),
    );
    let listener = start_node(
        dir,
        "listener",
        &format!("{name}-listener"),
        &listener_toml(
            &dir.join(format!("{name}-listener")),
            "listener-1",
            &source.url(),
            port,
            secret,
        ),
    );
    Relay {
        source,
        target,
        listener,
        drainer,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_drainer_wals_get_snapshots_of_their_listeners() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut big = start_relay(dir.path(), "big");
    let mut small = start_relay(dir.path(), "small");
    // The big relay's log runs far ahead of the small one's.
    for relay in [&big, &small] {
        let logs = logs_of(&[&relay.listener, &relay.drainer]);
        wait_streaming(&relay.listener, || tails(&logs)).await;
    }
    write_keys(&big.source, "big", 3000);
    write_keys(&small.source, "small", 50);
    let logs = logs_of(&[&big.listener, &big.drainer, &small.listener, &small.drainer]);
    let context = || tails(&logs);
    wait_converged(
        &big.source.url(),
        &big.target.url(),
        "big",
        CONVERGE,
        context,
    )
    .await;
    wait_converged(
        &small.source.url(),
        &small.target.url(),
        "small",
        CONVERGE,
        context,
    )
    .await;

    stop(&mut big.drainer);
    stop(&mut small.drainer);
    let (big_dir, small_dir) = (
        dir.path().join("big-drainer"),
        dir.path().join("small-drainer"),
    );
    let swap = dir.path().join("swap");
    std::fs::rename(&big_dir, &swap).unwrap();
    std::fs::rename(&small_dir, &big_dir).unwrap();
    std::fs::rename(&swap, &small_dir).unwrap();
    // Changes the other relay's log never had.
    big.source.cmd(&["DEL", "big:1", "big:2"]);
    small.source.cmd(&["SET", "small:extra", "1"]);
    big.drainer.spawn();
    small.drainer.spawn();
    write_keys(&big.source, "big-after", 100);
    write_keys(&small.source, "small-after", 100);
    wait_converged(
        &big.source.url(),
        &big.target.url(),
        "big, swapped",
        CONVERGE,
        context,
    )
    .await;
    wait_converged(
        &small.source.url(),
        &small.target.url(),
        "small, swapped",
        CONVERGE,
        context,
    )
    .await;
    for drainer in [&big.drainer, &small.drainer] {
        let log = log_text(drainer);
        assert!(
            log.contains("snapshot of another history stored"),
            "{}",
            context()
        );
        // Each target's checkpoint counted the other WAL's ids: not resumed.
        assert!(
            log.contains("counts the log ids of another WAL")
                || log.contains("counts another WAL's log ids"),
            "{}",
            context()
        );
    }
    // The small relay's log lies below the ids its new drainer WAL held: the
    // drainer's ids moved up (a local id above the listener's).
    let moved = log_text(&small.drainer)
        .lines()
        .filter(|line| line.contains("snapshot of another history stored"))
        .any(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(name))
                    .and_then(|value| value.parse::<u64>().ok())
            };
            matches!((field("log_id="), field("local_id=")), (Some(l), Some(local)) if local > l)
        });
    assert!(moved, "{}", small.drainer.log_tail(60));
    for relay in [&mut big, &mut small] {
        stop(&mut relay.listener);
        stop(&mut relay.drainer);
    }
}

// ---------------------------------------------------------------------------
// 4. A listener on another listener's WAL.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_refuses_a_wal_holding_another_listeners_log() {
    use ferry::listener::{Listener, ListenerConfig, ListenerError, ListenerStatus};
    let dir = tempfile::tempdir().expect("temp dir");
    let wal = Wal::open(WalConfig::with_dir(dir.path())).await.unwrap();
    let config = |id: &str| ListenerConfig {
        id: id.into(),
        ..ListenerConfig::for_source("redis://127.0.0.1:1")
    };
    let status = || std::sync::Arc::new(ListenerStatus::new(PartitionId(0)));
    Listener::open(config("listener-a"), wal.clone(), status())
        .await
        .expect("a new WAL is the listener's");
    let history = wal.history(PartitionId(0)).unwrap().expect("created");
    assert_eq!(history.owner, "listener-a");
    assert_ne!(history.incarnation, 0);
    match Listener::open(config("listener-b"), wal.clone(), status()).await {
        Err(error @ ListenerError::ForeignLog { .. }) => {
            let text = error.to_string();
            assert!(
                text.contains("\"listener-a\"") && text.contains("\"listener-b\""),
                "{text}"
            );
        }
        Err(other) => panic!("expected ForeignLog, got {other}"),
        Ok(_) => panic!("listener-b opened listener-a's log"),
    }
    // Its own id again: the same history.
    Listener::open(config("listener-a"), wal.clone(), status())
        .await
        .expect("reopened");
    assert_eq!(wal.history(PartitionId(0)).unwrap(), Some(history));
    wal.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// 5. Raw streams against a drainer process.

const LISTENER: &str = "listener-1";
const SECRET: &str = "raw-secret-of-one";

fn hello(listener_id: &str, version: u32, incarnation: u64) -> pb::ShipMessage {
    pb::ShipMessage {
        kind: Some(ship_message::Kind::Hello(pb::Hello {
            listener_id: listener_id.into(),
            secret: Bytes::from_static(SECRET.as_bytes()),
            partition: 0,
            protocol_version: version,
            incarnation,
        })),
    }
}

fn entries(ids: std::ops::RangeInclusive<u64>) -> pb::ShipMessage {
    let entries: Vec<WalEntry> = ids
        .map(|i| WalEntry {
            log_id: LogId(i),
            flags: 0,
            created_unix_ms: 1_700_000_000_000 + i,
            bytes_end: 0,
            stored_len: 0,
            source: SourcePosition {
                replid: "0123456789abcdef0123456789abcdef01234567".into(),
                offset: ReplOffset(100 + i),
                db: 0,
            },
            payload: Record::Write(WriteRecord {
                db: 0,
                commands: vec![Command::from_parts(["SET", &format!("raw:{i}"), "v"])],
                transaction: false,
                streamed: vec![],
                tenure: None,
            })
            .encode(),
        })
        .collect();
    pb::ShipMessage {
        kind: Some(ship_message::Kind::Entries(wire::encode_batch(&entries))),
    }
}

/// Sends `messages` on one stream; returns the replies and how it ended.
async fn raw_ship(
    port: u16,
    messages: Vec<pb::ShipMessage>,
) -> Result<(Vec<pb::ShipReply>, Option<tonic::Status>), tonic::Status> {
    let mut client = DrainerClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
    let outbound = futures::stream::iter(messages).chain(
        futures::stream::once(async move {
            let _ = hold_rx.await;
            futures::stream::empty::<pb::ShipMessage>()
        })
        .flatten(),
    );
    let mut replies = client.ship(outbound).await?.into_inner();
    let mut got = Vec::new();
    let mut error = None;
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), replies.message()).await {
            Ok(Ok(Some(reply))) => got.push(reply),
            Ok(Ok(None)) => break,
            Ok(Err(status)) => {
                error = Some(status);
                break;
            }
            Err(_) => break,
        }
    }
    drop(hold_tx);
    Ok((got, error))
}

fn welcome(replies: &[pb::ShipReply]) -> &pb::Welcome {
    match replies.first().and_then(|reply| reply.kind.as_ref()) {
        Some(ship_reply::Kind::Welcome(welcome)) => welcome,
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_protocol_and_foreign_streams_are_refused_before_any_write() {
    let target = RedisServer::start(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut drainer = start_node(
        dir.path(),
        "drainer",
        "drainer",
        &drainer_toml(
            &dir.path().join("drainer"),
            port,
            &target.url(),
            &[(LISTENER, SECRET), ("listener-2", SECRET)],
        ),
    );
    drainer.admin_addr(Duration::from_secs(30));

    // A listener of protocol 1 (no history): refused, nothing claimed.
    let refused = raw_ship(port, vec![hello(LISTENER, 1, 0), entries(1..=3)])
        .await
        .expect_err("protocol 1 must be refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("protocol version 1"),
        "{refused:?}"
    );

    // The owner's incarnation 7: an empty partition adopts it.
    let (replies, error) = raw_ship(
        port,
        vec![hello(LISTENER, PROTOCOL_VERSION, 7), entries(1..=3)],
    )
    .await
    .expect("accepted");
    assert!(error.is_none(), "{error:?}");
    let first = welcome(&replies);
    assert_eq!((first.owner.as_str(), first.incarnation), (LISTENER, 7));
    assert_eq!(first.durable_log_id, 0);
    wait_until(
        "the entries",
        CONVERGE,
        || drainer.log_tail(30),
        || target.cmd(&["EXISTS", "raw:3"]) == "1",
    )
    .await;

    // Another incarnation (a rebuilt listener log): its Welcome says so, and
    // entries are refused until a snapshot came.
    let (replies, error) = raw_ship(
        port,
        vec![hello(LISTENER, PROTOCOL_VERSION, 8), entries(4..=5)],
    )
    .await
    .expect("accepted");
    let other = welcome(&replies);
    assert_eq!((other.incarnation, other.durable_log_id), (7, 0));
    let error = error.expect("entries of another history must be refused");
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    assert!(
        error
            .message()
            .contains("a snapshot must come before any entry"),
        "{error:?}"
    );

    // Another listener id: refused before anything, naming both.
    let refused = raw_ship(
        port,
        vec![hello("listener-2", PROTOCOL_VERSION, 9), entries(4..=5)],
    )
    .await
    .expect_err("another listener must be refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("\"listener-1\"")
            && refused.message().contains("\"listener-2\""),
        "{refused:?}"
    );

    // Nothing of the refused streams reached the drainer's WAL.
    stop(&mut drainer);
    let wal = Wal::open(WalConfig::with_dir(dir.path().join("drainer").join("wal")))
        .await
        .expect("open the drainer's wal");
    let partition = PartitionId(0);
    assert_eq!(wal.last_log_id(partition).unwrap(), Some(LogId(3)));
    let history = wal.history(partition).unwrap().expect("a history record");
    assert_eq!((history.owner.as_str(), history.incarnation), (LISTENER, 7));
    wal.close().await.unwrap();
}
