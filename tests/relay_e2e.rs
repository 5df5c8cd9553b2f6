//! The relay end to end: real `ferry` processes (`ferry sync`, `ferry
//! listener`, `ferry drainer`) between real redis-servers.
//!
//! - [`sync_replicates_every_type_and_seed_command`] (and
//!   [`sync_replicates_the_full_size_data_set`]): full sync of every type ×
//!   encoding, then every command of the seeds' lists; the target equals the
//!   source key by key, and the only internal keys are where they belong.
//! - [`drainer_down_past_wal_ttl_gets_a_fallback_snapshot`]: a drainer down
//!   longer than the listener's `wal-ttl` comes back to a snapshot that
//!   includes the deletions of the gap (and the writes made while it loads,
//!   once each), while a second drainer keeps streaming and never gets one.
//! - [`listener_with_a_wrong_secret_is_refused`]: refused, named, retried,
//!   nothing applied; converges once the secret is fixed.
//! - [`sync_waits_for_an_unreachable_source_and_target`]: no crash loop; it
//!   converges once both come up.
//! - [`bad_configs_are_refused_naming_file_and_field`].
//! - [`stop_sync_holds_the_target_and_restart_sync_delivers`]: through the
//!   admin API; stopped survives a restart of the process; and
//!   [`restart_sync_after_wal_ttl_sends_a_snapshot`].
//!
//! Every wait is bounded; failures show the tail of the ferry logs involved.
//! Run: `cargo test --test relay_e2e` (20 to 50 s on two busy cores).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::ferry::{ferry_bin, FerryProcess};
use common::workload::{
    connect, differences, fill_source, run_workload, server_state, wait_converged, ServerState,
    SOURCE_ENCODING_CONFIG,
};
use common::{free_port, output_within, FixedPortRedis, RedisServer};
use ferry::redis::command::SEED_SYNC_COMMANDS;

/// Longest wait for a target to equal its source.
const CONVERGE: Duration = Duration::from_secs(60);
/// Longest wait for a process to stop after SIGTERM.
const STOP: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Plumbing.

/// The log files of some ferry processes, whose tails go into failure
/// messages (held apart from the processes, which tests stop and restart).
struct Logs(Vec<PathBuf>);

impl Logs {
    fn of(processes: &[&FerryProcess]) -> Logs {
        Logs(
            processes
                .iter()
                .map(|process| process.log.clone())
                .collect(),
        )
    }

    /// The last lines of every log.
    fn tail(&self) -> String {
        self.0
            .iter()
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
}

/// The whole log of `process`.
fn log_text(process: &FerryProcess) -> String {
    std::fs::read_to_string(&process.log).unwrap_or_default()
}

/// Lines of `process`'s log containing every one of `parts`.
fn log_lines(process: &FerryProcess, parts: &[&str]) -> Vec<String> {
    log_text(process)
        .lines()
        .filter(|line| parts.iter().all(|part| line.contains(part)))
        .map(str::to_string)
        .collect()
}

/// Polls `check` until it holds; panics after `timeout` with `context()`.
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process must still be running (not crashed, not exited).
fn assert_alive(process: &mut FerryProcess, when: &str) {
    if let Some(status) = process.try_exit() {
        panic!("ferry exited ({status:?}) {when}\n{}", process.log_tail(40));
    }
}

/// SIGTERM; the process must exit cleanly.
fn stop(process: &mut FerryProcess) {
    let status = process.terminate(STOP);
    assert!(
        status.success(),
        "exit {status:?}\n{}",
        process.log_tail(40)
    );
}

/// The snapshot epoch in `drainer_id`'s checkpoint on `target` (partition 0).
fn checkpoint_epoch(target: &RedisServer, drainer_id: &str) -> Option<u64> {
    let value = target.cmd(&["GET", &format!("__ferry:checkpoint:{drainer_id}:0")]);
    value
        .split_whitespace()
        .find_map(|field| field.strip_prefix("epoch="))
        .and_then(|epoch| epoch.parse().ok())
}

/// Writes `text` to `path` (a config file).
fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `ferry listener --config <dir>/<name>.toml` with data in `<dir>/<name>`.
fn start_node(dir: &Path, verb: &str, name: &str, toml: &str) -> FerryProcess {
    let config = dir.join(format!("{name}.toml"));
    write_config(&config, toml);
    FerryProcess::start(
        &dir.join(name),
        &[
            verb.to_string(),
            "--config".to_string(),
            config.to_str().expect("utf-8 path").to_string(),
        ],
    )
}

/// A listener config shipping to `drainers` (`(id, port, secret)`).
fn listener_toml(
    data_dir: &Path,
    source: &str,
    wal_extra: &str,
    drainers: &[(&str, u16, &str)],
) -> String {
    let mut text = format!(
        r#"data-dir = "{}"
admin = "127.0.0.1:0"

[listener]
id = "listener-1"
source = "{source}"
heartbeat-interval = "500ms"
reconnect-backoff-max = "500ms"

[wal]
{wal_extra}

[ship]
reconnect-min = "50ms"
reconnect-max = "500ms"
"#,
        data_dir.display()
    );
    for (id, port, secret) in drainers {
        text.push_str(&format!(
            r#"
[[drainers]]
id = "{id}"
endpoint = "http://127.0.0.1:{port}"
secret = "{secret}"
"#
        ));
    }
    text
}

/// A drainer config accepting `listener-1` with `secret`.
fn drainer_toml(data_dir: &Path, id: &str, port: u16, secret: &str, target: &str) -> String {
    format!(
        r#"data-dir = "{}"
admin = "127.0.0.1:0"
listen = "127.0.0.1:{port}"

[[drainer.listeners]]
id = "listener-1"
secret = "{secret}"

[apply]
drainer-id = "{id}"
target = "{target}"
retry-backoff-min = "50ms"
retry-backoff-max = "500ms"
"#,
        data_dir.display()
    )
}

/// Settings of the servers started on a port chosen before they run (for a
/// ferry started while nothing listens there yet).
const ON_PORT_ARGS: &[&str] = &["--appendonly", "no", "--repl-diskless-sync-delay", "0"];

/// How many data keys `state` holds.
fn key_count(state: &ServerState) -> usize {
    state.keys.len()
}

// ---------------------------------------------------------------------------
// 1. Every type × encoding, then every seed command, through `ferry sync`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replicates_every_type_and_seed_command() {
    every_type_and_seed_command(false).await;
}

/// The same with the full-size data set: a 300 000-element list and a
/// 200 000-field hash, rebuilt in chunks rather than restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replicates_the_full_size_data_set() {
    every_type_and_seed_command(true).await;
}

/// Test 1: `big` selects the full-size data set ([`fill_source`]).
async fn every_type_and_seed_command(big: bool) {
    let mut args = vec!["--repl-diskless-sync-delay", "0"];
    args.extend_from_slice(SOURCE_ENCODING_CONFIG);
    let source = RedisServer::start(&args);
    let target = RedisServer::start(&[]);
    fill_source(&mut connect(&source).await, big).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ferry = FerryProcess::sync(
        &dir.path().join("sync"),
        &source.url(),
        &target.url(),
        &["--id", "e2e"],
    );

    let full = wait_converged(&source.url(), &target.url(), "full sync", CONVERGE, || {
        ferry.log_tail(40)
    })
    .await;
    assert!(
        key_count(&full) > 30 && full.functions.len() == 1,
        "the data set is not there: {} keys, {} libraries",
        key_count(&full),
        full.functions.len()
    );

    let issued = run_workload(connect(&source).await).await;
    let missing: Vec<&str> = SEED_SYNC_COMMANDS
        .iter()
        .copied()
        .filter(|name| !issued.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "the workload lacks seed commands {missing:?}"
    );
    let after = wait_converged(
        &source.url(),
        &target.url(),
        "after every seed command",
        CONVERGE,
        || ferry.log_tail(40),
    )
    .await;
    assert_ne!(after.keys, full.keys, "the workload changed nothing");
    // Every db the workload writes holds data on the target too.
    for db in [0, 2, 3, 4, 15] {
        assert!(
            after.keys.keys().any(|(key_db, _)| *key_db == db),
            "no keys in db {db}"
        );
    }

    let on_target = server_state(&mut connect(&target).await).await;
    assert_eq!(
        on_target.internal_names(),
        ["0:__ferry:checkpoint:e2e:0"],
        "internal keys on the target (the heartbeat must not be applied)"
    );
    let on_source = server_state(&mut connect(&source).await).await;
    assert!(
        on_source
            .internal_names()
            .iter()
            .any(|name| name.starts_with("0:__ferry:heartbeat:")),
        "no heartbeat key on the source: {:?}",
        on_source.internal_names()
    );
    assert_eq!(
        source.info_field("sync_full").as_deref(),
        Some("1"),
        "one full sync only\n{}",
        ferry.log_tail(40)
    );
    assert_alive(&mut ferry, "after the workload");
    stop(&mut ferry);

    // The comparison itself sees a value, a TTL and an extra key.
    target.cmd(&["APPEND", "w:str", "!"]);
    target.cmd(&["EXPIRE", "w:m2", "100000"]);
    let mut client = connect(&target).await;
    common::workload::call(&mut client, &["SELECT", "4"]).await;
    common::workload::call(&mut client, &["SET", "only-on-target", "x"]).await;
    let changed = server_state(&mut connect(&target).await).await;
    let diffs = differences(&after, &changed);
    assert_eq!(diffs.len(), 3, "{diffs:#?}");
    for (diff, want) in diffs.iter().zip([
        "db 0 \"w:m2\": expires at",
        "db 0 \"w:str\": DEBUG DIGEST-VALUE",
        "db 4 \"only-on-target\": should not exist",
    ]) {
        assert!(diff.starts_with(want), "{diff} is not {want}...");
    }
}

// ---------------------------------------------------------------------------
// 2. A drainer down longer than wal-ttl.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drainer_down_past_wal_ttl_gets_a_fallback_snapshot() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target_a = RedisServer::start(&[]);
    let target_b = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "300", "base", "20"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let (port_a, port_b) = (free_port(), free_port());
    let (secret_a, secret_b) = ("secret-for-a-0123", "secret-for-b-4567");
    let mut drainer_a = start_node(
        dir.path(),
        "drainer",
        "drainer-a",
        &drainer_toml(
            &dir.path().join("drainer-a"),
            "drainer-a",
            port_a,
            secret_a,
            &target_a.url(),
        ),
    );
    let mut drainer_b = start_node(
        dir.path(),
        "drainer",
        "drainer-b",
        &drainer_toml(
            &dir.path().join("drainer-b"),
            "drainer-b",
            port_b,
            secret_b,
            &target_b.url(),
        ),
    );
    let mut listener = start_node(
        dir.path(),
        "listener",
        "listener",
        &listener_toml(
            &dir.path().join("listener"),
            &source.url(),
            "wal-ttl = \"2s\"\nretention-interval = \"200ms\"",
            &[
                ("drainer-a", port_a, secret_a),
                ("drainer-b", port_b, secret_b),
            ],
        ),
    );
    let logs = Logs::of(&[&listener, &drainer_a, &drainer_b]);
    let context = || logs.tail();
    wait_converged(
        &source.url(),
        &target_a.url(),
        "drainer A",
        CONVERGE,
        context,
    )
    .await;
    wait_converged(
        &source.url(),
        &target_b.url(),
        "drainer B",
        CONVERGE,
        context,
    )
    .await;
    let epoch_a = checkpoint_epoch(&target_a, "drainer-a").expect("A's checkpoint");
    let epoch_b = checkpoint_epoch(&target_b, "drainer-b").expect("B's checkpoint");

    stop(&mut drainer_a);
    // Writes and deletions for longer than wal-ttl: the entries A needs
    // expire from the listener's WAL while B keeps taking them.
    let mut writer = connect(&source).await;
    let gap = Instant::now();
    let mut round = 0;
    while gap.elapsed() < Duration::from_millis(3_500) {
        let new_key = format!("gap:new:{round}");
        let deleted = format!("base:{round}");
        common::workload::call(&mut writer, &["SET", &new_key, "v"]).await;
        common::workload::call(&mut writer, &["DEL", &deleted]).await;
        common::workload::call(&mut writer, &["INCR", "gap:counter"]).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(round > 20, "only {round} rounds of writes in the gap");
    let during_gap = wait_converged(
        &source.url(),
        &target_b.url(),
        "drainer B while A is down",
        CONVERGE,
        context,
    )
    .await;
    assert!(!during_gap.has(0, "base:0") && during_gap.has(0, "gap:new:0"));
    // A still holds the keys deleted during the gap.
    assert_eq!(target_a.cmd(&["EXISTS", "base:0"]), "1");
    assert_alive(&mut listener, "while drainer A is down");

    drainer_a.spawn();
    // Writes go on while A's snapshot is taken, shipped and loaded: the
    // stream after the snapshot must carry on from exactly its position.
    let during_snapshot = tokio::spawn({
        let mut writer = connect(&source).await;
        async move {
            let started = Instant::now();
            let mut incrs = 0u64;
            while started.elapsed() < Duration::from_millis(2_000) {
                common::workload::call(&mut writer, &["INCR", "gap:during-snapshot"]).await;
                common::workload::call(&mut writer, &["LPUSH", "gap:list", "x"]).await;
                incrs += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            incrs
        }
    });
    let incrs = during_snapshot.await.expect("writer task");
    let logs = Logs::of(&[&listener, &drainer_a, &drainer_b]);
    let context = || logs.tail();
    let converged = wait_converged(
        &source.url(),
        &target_a.url(),
        "drainer A after the gap",
        CONVERGE,
        context,
    )
    .await;
    assert!(!converged.has(0, "base:0") && converged.has(0, "base:299"));
    for target in [&target_a, &target_b] {
        assert_eq!(
            target.cmd(&["GET", "gap:during-snapshot"]),
            incrs.to_string(),
            "INCRs during the snapshot applied once each\n{}",
            context()
        );
        assert_eq!(target.cmd(&["LLEN", "gap:list"]), incrs.to_string());
    }
    for deleted in 0..round {
        assert_eq!(
            target_a.cmd(&["EXISTS", &format!("base:{deleted}")]),
            "0",
            "base:{deleted} was deleted during the gap\n{}",
            context()
        );
    }
    let fallback_a = log_lines(
        &listener,
        &[
            "drainer=drainer-a",
            "drainer needs trimmed entries, sending a fallback snapshot",
        ],
    );
    assert!(
        !fallback_a.is_empty(),
        "no fallback snapshot for A\n{}",
        context()
    );
    assert!(
        !log_lines(&listener, &["drainer=drainer-a", "fallback snapshot sent"]).is_empty(),
        "the fallback snapshot was not sent to A\n{}",
        context()
    );
    let new_epoch_a = checkpoint_epoch(&target_a, "drainer-a").expect("A's checkpoint");
    assert!(
        new_epoch_a > epoch_a,
        "A's target is still on epoch {new_epoch_a} (was {epoch_a})\n{}",
        context()
    );
    // B kept streaming: no snapshot, same epoch, still equal.
    assert!(
        log_lines(&listener, &["drainer=drainer-b", "fallback snapshot"]).is_empty(),
        "B got a fallback snapshot\n{}",
        context()
    );
    assert_eq!(
        checkpoint_epoch(&target_b, "drainer-b"),
        Some(epoch_b),
        "B's target changed epoch\n{}",
        context()
    );
    // The listener's status says the same: one snapshot for A, none for B.
    let status = listener.status_json();
    let shippers = status["listeners"][0]["shipping"]
        .as_array()
        .unwrap_or_else(|| panic!("no shippers in {status}"));
    let fallbacks = |drainer: &str| {
        shippers
            .iter()
            .find(|shipper| shipper["drainer_id"] == drainer)
            .and_then(|shipper| shipper["fallback_snapshots"].as_u64())
            .unwrap_or_else(|| panic!("no fallback_snapshots of {drainer} in {status}"))
    };
    assert_eq!(fallbacks("drainer-a"), 1, "{status}");
    assert_eq!(fallbacks("drainer-b"), 0, "{status}");
    let drainer_status = drainer_a.status_json();
    assert_eq!(
        drainer_status["drainers"][0]["epoch"].as_u64(),
        Some(new_epoch_a),
        "{drainer_status}"
    );
    common::workload::call(&mut writer, &["SET", "gap:after", "1"]).await;
    wait_converged(
        &source.url(),
        &target_b.url(),
        "drainer B at the end",
        CONVERGE,
        context,
    )
    .await;
    wait_converged(
        &source.url(),
        &target_a.url(),
        "drainer A at the end",
        CONVERGE,
        context,
    )
    .await;
    assert_eq!(
        source.info_field("sync_full").as_deref(),
        Some("2"),
        "the listener's own full sync and one fallback snapshot\n{}",
        context()
    );
    stop(&mut listener);
    stop(&mut drainer_a);
    stop(&mut drainer_b);
}

// ---------------------------------------------------------------------------
// 3. A listener with the wrong secret.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_with_a_wrong_secret_is_refused() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "100", "key", "10"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let right = "the-right-secret-42";
    let mut drainer = start_node(
        dir.path(),
        "drainer",
        "drainer",
        &drainer_toml(
            &dir.path().join("drainer"),
            "drainer-1",
            port,
            right,
            &target.url(),
        ),
    );
    let listener_config = |secret: &str| {
        listener_toml(
            &dir.path().join("listener"),
            &source.url(),
            "",
            &[("drainer-1", port, secret)],
        )
    };
    let mut listener = start_node(
        dir.path(),
        "listener",
        "listener",
        &listener_config("a-wrong-secret-17"),
    );
    let logs = Logs::of(&[&listener, &drainer]);
    let context = || logs.tail();
    // Refused again and again (the listener retries), each time named.
    wait_until("three refusals", CONVERGE, context, || {
        log_lines(
            &drainer,
            &["ship stream refused", "listener-1", "secret does not match"],
        )
        .len()
            >= 3
    })
    .await;
    let refused = log_lines(
        &listener,
        &[
            "drainer offline",
            "drainer=drainer-1",
            "listener \"listener-1\" refused: secret does not match",
        ],
    );
    assert!(
        !refused.is_empty(),
        "the listener does not say why it is refused\n{}",
        context()
    );
    assert!(
        refused.len() <= 2,
        "the refusal is logged at every retry: {refused:#?}"
    );
    assert_alive(&mut listener, "while refused");
    // The refusal is visible in the listener's status too.
    let status = listener.status_json();
    let shipper = &status["listeners"][0]["shipping"][0];
    assert_eq!(shipper["state"], "OFFLINE", "{status}");
    assert!(
        shipper["last_error"]
            .as_str()
            .is_some_and(|error| error.contains("secret does not match")),
        "{status}"
    );
    assert_alive(&mut drainer, "while refusing");
    let on_target = server_state(&mut connect(&target).await).await;
    assert!(
        on_target.keys.is_empty() && on_target.internal.is_empty(),
        "a refused listener's data reached the target: {} keys, internal {:?}",
        on_target.keys.len(),
        on_target.internal_names()
    );

    stop(&mut listener);
    write_config(&dir.path().join("listener.toml"), &listener_config(right));
    listener.spawn();
    wait_converged(
        &source.url(),
        &target.url(),
        "after the fix",
        CONVERGE,
        context,
    )
    .await;
    stop(&mut listener);
    stop(&mut drainer);
}

// ---------------------------------------------------------------------------
// 4. Source and target unreachable when `ferry sync` starts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_waits_for_an_unreachable_source_and_target() {
    let (source_port, target_port) = (free_port(), free_port());
    let source_url = format!("redis://127.0.0.1:{source_port}");
    let target_url = format!("redis://127.0.0.1:{target_port}");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ferry = FerryProcess::sync(&dir.path().join("sync"), &source_url, &target_url, &[]);
    let logs = Logs::of(&[&ferry]);
    let context = || logs.tail();
    let source_address = format!("127.0.0.1:{source_port}");
    let target_address = format!("127.0.0.1:{target_port}");
    wait_until("the source's retry line", CONVERGE, context, || {
        !log_lines(
            &ferry,
            &["replication link lost; reconnecting", &source_address],
        )
        .is_empty()
    })
    .await;
    wait_until("the target's retry line", CONVERGE, context, || {
        !log_lines(&ferry, &["apply failed; retrying", &target_address]).is_empty()
    })
    .await;
    // Retrying quietly for a while: alive, the same failure logged once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_alive(&mut ferry, "while source and target are down");
    // ferry status says what it waits for.
    let status = ferry.status_json();
    let listener = &status["listeners"][0];
    assert_ne!(listener["source_state"], "ONLINE", "{status}");
    assert!(
        listener["source_error"]
            .as_str()
            .is_some_and(|error| !error.is_empty()),
        "no source error in {status}"
    );
    let applier = &status["drainers"][0];
    assert_eq!(applier["state"], "OFFLINE", "{status}");
    assert!(
        applier["last_error"]
            .as_str()
            .is_some_and(|error| error.contains(&target_address)),
        "the applier's error does not name the target: {status}"
    );
    assert_eq!(
        log_lines(&ferry, &["replication link lost"]).len(),
        1,
        "the same source failure is logged at every retry\n{}",
        context()
    );
    assert_eq!(
        log_lines(&ferry, &["apply failed"]).len(),
        1,
        "the same target failure is logged at every retry\n{}",
        context()
    );

    let source = FixedPortRedis::start_on(source_port, ON_PORT_ARGS);
    source.cmd(&["DEBUG", "POPULATE", "500", "key", "10"]);
    wait_until("the source's full sync", CONVERGE, context, || {
        !log_lines(&ferry, &["full resync stored"]).is_empty()
    })
    .await;
    source.cmd(&["INCR", "counter"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_alive(&mut ferry, "while the target is down");

    let target = FixedPortRedis::start_on(target_port, ON_PORT_ARGS);
    wait_converged(
        &source.url(),
        &target.url(),
        "once both are up",
        CONVERGE,
        context,
    )
    .await;
    assert_eq!(target.cmd(&["GET", "counter"]), "1");
    assert!(
        !log_lines(&ferry, &["target reachable again"]).is_empty(),
        "no line saying the target is back\n{}",
        context()
    );
    stop(&mut ferry);
}

// ---------------------------------------------------------------------------
// 5. Bad configs.

/// Runs `ferry <verb> --config <path>`; it must fail at once naming the file
/// and every one of `names` on stderr.
fn assert_refused(verb: &str, path: &Path, names: &[&str]) {
    let out = output_within(
        Command::new(ferry_bin()).args([verb, "--config", path.to_str().expect("utf-8 path")]),
        Duration::from_secs(20),
    )
    .expect("ferry ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "ferry {verb} accepted {}:\n{stderr}",
        path.display()
    );
    assert!(
        stderr.contains(&path.display().to_string()),
        "stderr does not name {}:\n{stderr}",
        path.display()
    );
    for name in names {
        assert!(
            stderr.contains(name),
            "stderr does not name {name:?}:\n{stderr}"
        );
    }
}

#[test]
fn bad_configs_are_refused_naming_file_and_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data: PathBuf = dir.path().join("data");
    let good = listener_toml(
        &data,
        "redis://127.0.0.1:6379",
        "wal-ttl = \"1h\"",
        &[("drainer-1", 7391, "long-enough-secret")],
    );
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown-key",
            good.replace("[listener]\n", "[listener]\nsorce = \"redis://x:1\"\n"),
            vec!["sorce"],
        ),
        (
            "bad-duration",
            good.replace("wal-ttl = \"1h\"", "wal-ttl = \"soon\""),
            vec!["wal-ttl", "soon"],
        ),
        (
            "missing-source",
            good.replace("source = \"redis://127.0.0.1:6379\"\n", ""),
            vec!["source"],
        ),
        (
            "short-secret",
            good.replace("long-enough-secret", "short"),
            vec!["drainers[0].secret"],
        ),
    ];
    for (name, text, names) in &cases {
        let path = dir.path().join(format!("{name}.toml"));
        write_config(&path, text);
        assert_refused("listener", &path, names);
    }
    assert!(!data.exists(), "a refused config created its data dir");
    let drainer = drainer_toml(
        &data,
        "drainer-1",
        7391,
        "long-enough-secret",
        "redis://127.0.0.1:1",
    );
    let path = dir.path().join("drainer-unknown.toml");
    write_config(
        &path,
        &drainer.replace("[apply]\n", "[apply]\nbatch-size = 3\n"),
    );
    assert_refused("drainer", &path, &["batch-size"]);
    let path = dir.path().join("drainer-no-listeners.toml");
    let without_listeners = drainer.replace(
        "[[drainer.listeners]]\nid = \"listener-1\"\nsecret = \"long-enough-secret\"\n",
        "",
    );
    assert_ne!(without_listeners, drainer);
    write_config(&path, &without_listeners);
    assert_refused("drainer", &path, &["drainer"]);
    // ferry sync --config: the file's keys are checked the same way.
    let path = dir.path().join("sync-unknown.toml");
    write_config(&path, "[wal]\nwal-ttl = \"1h\"\nretention = \"1s\"\n");
    let out = output_within(
        Command::new(ferry_bin()).args([
            "sync",
            "--config",
            path.to_str().expect("utf-8 path"),
            "--source",
            "redis://127.0.0.1:1",
            "--target",
            "redis://127.0.0.1:2",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ]),
        Duration::from_secs(20),
    )
    .expect("ferry ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&path.display().to_string())
            && stderr.contains("retention"),
        "ferry sync with an unknown key: {:?}\n{stderr}",
        out.status
    );
    assert!(!data.exists(), "a refused config created its data dir");
}

// ---------------------------------------------------------------------------
// 6. stop-sync / restart-sync through the admin API.

/// `ferry <verb> --admin ADDR`; must succeed. Returns stdout.
fn control(verb: &str, admin: &str, logs: &Logs) -> String {
    let out = output_within(
        Command::new(ferry_bin()).args([verb, "--admin", admin]),
        Duration::from_secs(20),
    )
    .expect("ferry ran");
    assert!(
        out.status.success(),
        "ferry {verb} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs.tail()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The state of the only sync in `status` (`ferry status --json`): its
/// shipper's, or with no shipper (`ferry sync` applying from the listener's
/// WAL) its applier's.
fn ship_state(status: &serde_json::Value) -> String {
    let shipper = &status["listeners"][0]["shipping"][0];
    let row = if shipper.is_null() {
        &status["drainers"][0]
    } else {
        shipper
    };
    row["state"]
        .as_str()
        .unwrap_or_else(|| panic!("no sync state in {status}"))
        .to_string()
}

/// The only sync's lag (its shipper's, or its applier's).
fn sync_lag(status: &serde_json::Value) -> Option<u64> {
    let shipper = &status["listeners"][0]["shipping"][0];
    match shipper.is_null() {
        true => status["drainers"][0]["lag"].as_u64(),
        false => shipper["lag"].as_u64(),
    }
}

/// The `--config` of a `ferry sync` on `apply_from` with `extra` keys.
fn sync_config(dir: &std::path::Path, apply_from: &str, extra: &str) -> String {
    let config = dir.join("sync.toml");
    write_config(&config, &format!("apply-from = \"{apply_from}\"\n{extra}"));
    config.to_str().expect("utf-8 path").to_string()
}

/// Waits until what was in flight when a sync stopped has landed: the
/// target's checkpoint `key` unchanged for a second and the applier caught
/// up with its WAL. Returns the checkpoint.
async fn wait_quiet(
    ferry: &FerryProcess,
    target: &RedisServer,
    key: &str,
    context: impl Fn() -> String,
) -> String {
    let deadline = Instant::now() + CONVERGE;
    let mut last = target.cmd(&["GET", key]);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = target.cmd(&["GET", key]);
        if now != last {
            last = now;
            since = Instant::now();
        }
        let applier = &ferry.status_json()["drainers"][0];
        let caught_up = applier["lag"].as_u64() == Some(0) || applier["state"] == "STOPPED";
        if caught_up && since.elapsed() >= Duration::from_secs(1) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "the target kept changing after stop-sync\n{}",
            context()
        );
    }
}

/// The replication offset the source's one replica acknowledged.
fn replica_ack_offset(source: &RedisServer) -> Option<u64> {
    let info = source.cmd(&["INFO", "replication"]);
    let line = info.lines().find(|line| line.starts_with("slave0:"))?;
    line.split(',')
        .find_map(|field| field.strip_prefix("offset="))
        .and_then(|offset| offset.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sync_holds_the_target_and_restart_sync_delivers() {
    stop_and_restart("listener-wal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sync_of_a_relayed_sync_holds_the_target_and_restart_sync_delivers() {
    stop_and_restart("drainer-wal").await;
}

async fn stop_and_restart(apply_from: &str) {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "200", "key", "10"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = sync_config(dir.path(), apply_from, "");
    let mut ferry = FerryProcess::sync(
        &dir.path().join("sync"),
        &source.url(),
        &target.url(),
        &["--id", "ctl", "--config", &config],
    );
    let logs = Logs::of(&[&ferry]);
    let context = || logs.tail();
    wait_converged(&source.url(), &target.url(), "full sync", CONVERGE, context).await;
    let admin = ferry.admin_addr(CONVERGE);

    let said = control("stop-sync", &admin, &logs);
    assert!(said.starts_with("stopped 1 sync"), "{said}");
    assert_eq!(ship_state(&ferry.status_json()), "STOPPED", "{}", context());
    let checkpoint_key = "__ferry:checkpoint:ctl:0";
    let held_checkpoint = wait_quiet(&ferry, &target, checkpoint_key, context).await;
    let held = server_state(&mut connect(&target).await).await;

    let mut writer = connect(&source).await;
    for i in 0..100 {
        common::workload::call(&mut writer, &["INCR", "counter"]).await;
        common::workload::call(&mut writer, &["SET", &format!("held:{i}"), "v"]).await;
    }
    // The listener keeps replicating and acking the source while stopped.
    let written = source
        .info_field("master_repl_offset")
        .and_then(|offset| offset.parse::<u64>().ok())
        .expect("master_repl_offset");
    wait_until(
        "the listener's ack of every write",
        CONVERGE,
        context,
        || replica_ack_offset(&source).is_some_and(|acked| acked >= written),
    )
    .await;
    let status = ferry.status_json();
    assert!(
        status["listeners"][0]["durable_offset"]
            .as_u64()
            .is_some_and(|durable| durable >= written),
        "the listener is not durable up to the writes: {status}"
    );
    assert!(
        sync_lag(&status).is_some_and(|lag| lag >= 200),
        "the stopped sync shows no lag: {status}"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let still = server_state(&mut connect(&target).await).await;
    assert!(
        differences(&held, &still).is_empty() && still.internal == held.internal,
        "the target changed while the sync was stopped: {:?}\n{}",
        differences(&held, &still),
        context()
    );
    assert_eq!(target.cmd(&["GET", checkpoint_key]), held_checkpoint);

    // Stopped stays stopped across a restart of the process.
    stop(&mut ferry);
    ferry.spawn();
    assert_eq!(ship_state(&ferry.status_json()), "STOPPED", "{}", context());
    common::workload::call(&mut writer, &["INCR", "counter"]).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(target.cmd(&["GET", checkpoint_key]), held_checkpoint);
    assert_eq!(target.cmd(&["EXISTS", "counter"]), "0", "{}", context());

    let admin = ferry.admin_addr(CONVERGE);
    let said = control("restart-sync", &admin, &logs);
    assert!(said.starts_with("restarted 1 sync"), "{said}");
    wait_converged(
        &source.url(),
        &target.url(),
        "after restart-sync",
        CONVERGE,
        context,
    )
    .await;
    assert_eq!(target.cmd(&["GET", "counter"]), "101");
    wait_until("the sync back ONLINE", CONVERGE, context, || {
        ship_state(&ferry.status_json()) == "ONLINE"
    })
    .await;
    assert_eq!(
        source.info_field("sync_full").as_deref(),
        Some("1"),
        "stop/restart must not cost a full sync\n{}",
        context()
    );
    stop(&mut ferry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_sync_after_wal_ttl_loads_a_snapshot() {
    restart_past_wal_ttl("listener-wal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_sync_of_a_relayed_sync_after_wal_ttl_sends_a_snapshot() {
    restart_past_wal_ttl("drainer-wal").await;
}

async fn restart_past_wal_ttl(apply_from: &str) {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "200", "key", "10"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = sync_config(
        dir.path(),
        apply_from,
        "[wal]\nretention-interval = \"200ms\"\n",
    );
    let mut ferry = FerryProcess::sync(
        &dir.path().join("sync"),
        &source.url(),
        &target.url(),
        &["--id", "ttl", "--wal-ttl", "2s", "--config", &config],
    );
    let logs = Logs::of(&[&ferry]);
    let context = || logs.tail();
    wait_converged(&source.url(), &target.url(), "full sync", CONVERGE, context).await;
    let epoch = checkpoint_epoch(&target, "ttl").expect("checkpoint");
    let admin = ferry.admin_addr(CONVERGE);
    control("stop-sync", &admin, &logs);
    wait_quiet(&ferry, &target, "__ferry:checkpoint:ttl:0", context).await;
    for i in 0..50 {
        source.cmd(&["DEL", &format!("key:{i}")]);
    }
    source.cmd(&["SET", "while-stopped", "1"]);
    // Past wal-ttl: what accumulated is gone from the WAL.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(target.cmd(&["EXISTS", "key:0"]), "1", "{}", context());
    control("restart-sync", &admin, &logs);
    wait_converged(
        &source.url(),
        &target.url(),
        "after restart-sync past wal-ttl",
        CONVERGE,
        context,
    )
    .await;
    let status = ferry.status_json();
    let fallbacks = match apply_from {
        "drainer-wal" => &status["listeners"][0]["shipping"][0]["fallback_snapshots"],
        _ => &status["drainers"][0]["fallback_snapshots"],
    };
    assert_eq!(fallbacks.as_u64(), Some(1), "{status}");
    assert!(
        checkpoint_epoch(&target, "ttl").is_some_and(|now| now > epoch),
        "the target did not load a new snapshot epoch\n{}",
        context()
    );
    stop(&mut ferry);
}
