//! Entries the target refuses, end to end: a real `ferry sync` between two
//! real redis-servers, the target "older" than the source (it does not
//! know `LPUSH`: `rename-command` hides it), driven through the real `ferry
//! status --json` and `ferry skip`.
//!
//! - [`a_refused_entry_blocks_until_ferry_skip_and_the_dead_letter_replays`]
//!   (`on-refused = "stop"`, the default): the partition is BLOCKED on the
//!   entry with its log id and error, the entries before it are applied
//!   and those after it wait; `ferry skip` takes only that entry, the
//!   dead-letter file holds it (0600 in a 0700 dir) and `redis-cli --pipe`
//!   replays it into a server that knows the command.
//! - [`skip_and_record_goes_on_by_itself`]: each refused entry is recorded
//!   and skipped without anyone asking; nothing applied twice.
//!
//! Run: `cargo test --test refused_e2e -- --test-threads 2`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ferry::{ferry_bin, FerryProcess};
use common::{output_within, redis_cli_bin, RedisServer};

/// Longest wait for anything the sync does.
const WAIT: Duration = Duration::from_secs(60);
/// Longest wait for a process to stop after SIGTERM.
const STOP: Duration = Duration::from_secs(30);
/// The target does not know `LPUSH` under this name.
const HIDE_LPUSH: [&str; 3] = ["--rename-command", "LPUSH", "LPUSH_IS_NOT_HERE"];

/// Polls `check` until it returns a value; panics after [`WAIT`] with the
/// process's log tail.
fn wait_for<T>(what: &str, sync: &FerryProcess, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            sync.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ferry sync` from `source` to `target` with `[apply]` settings `apply`.
fn start_sync(dir: &Path, source: &RedisServer, target: &RedisServer, apply: &str) -> FerryProcess {
    let config = dir.join("sync.toml");
    std::fs::write(
        &config,
        format!("[apply]\nretry-backoff-max = \"1s\"\n{apply}\n"),
    )
    .unwrap();
    FerryProcess::sync(
        &dir.join("sync"),
        &source.url(),
        &target.url(),
        &["--config", config.to_str().unwrap()],
    )
}

/// The sync's one applier row of `ferry status --json`.
fn applier(sync: &FerryProcess) -> serde_json::Value {
    sync.status_json()["drainers"][0].clone()
}

/// Waits until the target got the initial snapshot (its checkpoint) and
/// the applier is ONLINE.
fn wait_online(sync: &FerryProcess, target: &RedisServer) {
    wait_for("the initial sync", sync, || {
        let checkpoint = target.cmd(&["GET", "__ferry:checkpoint:ferry:0"]);
        (checkpoint.contains(" applied=") && applier(sync)["state"] == "ONLINE").then_some(())
    });
}

fn ferry(args: &[&str]) -> std::process::Output {
    output_within(
        Command::new(ferry_bin()).args(args),
        Duration::from_secs(30),
    )
    .unwrap()
}

/// The `log_id=` of every record of a dead-letter file.
fn dead_letter_ids(path: &Path) -> Vec<u64> {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
    text.split("ferry-dead-letter v1 log_id=")
        .skip(1)
        .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn a_refused_entry_blocks_until_ferry_skip_and_the_dead_letter_replays() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&HIDE_LPUSH);
    let dir = tempfile::tempdir().unwrap();
    let mut sync = start_sync(dir.path(), &source, &target, "");
    wait_online(&sync, &target);

    source.cmd(&["INCR", "c"]);
    source.cmd(&["LPUSH", "l", "x"]);
    source.cmd(&["INCR", "c"]);
    source.cmd(&["SET", "after", "1"]);
    let blocked = wait_for("the LPUSH to block the partition", &sync, || {
        let row = applier(&sync);
        (!row["blocked"].is_null()).then_some(row)
    });
    assert_eq!(blocked["state"], "BLOCKED", "{blocked}");
    let entry = &blocked["blocked"];
    let log_id = entry["log_id"].as_u64().unwrap();
    assert_eq!(entry["command"], "LPUSH", "{blocked}");
    assert!(
        entry["error"].as_str().unwrap().contains("unknown command"),
        "{blocked}"
    );
    assert_eq!(entry["transient"], false, "{blocked}");
    // The entries before it are applied, the ones after it wait (the
    // applier tries it again every retry-backoff-max: 1 s).
    wait_for("the INCR before it", &sync, || {
        (applier(&sync)["applied"].as_u64() == Some(log_id - 1)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(2500));
    let row = applier(&sync);
    assert_eq!(row["state"], "BLOCKED", "{row}");
    assert_eq!(row["applied"].as_u64(), Some(log_id - 1), "{row}");
    assert_eq!(target.cmd(&["GET", "c"]), "1");
    assert_eq!(target.cmd(&["EXISTS", "after"]), "0");

    let data_dir = dir.path().join("sync");
    let data_dir = data_dir.to_str().unwrap();
    let wrong = ferry(&[
        "skip",
        "--data-dir",
        data_dir,
        "--partition",
        "0",
        "--log-id",
        &(log_id + 1).to_string(),
    ]);
    assert!(!wrong.status.success());
    let error = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        error.contains(&format!("blocked on entry {log_id}, not {}", log_id + 1)),
        "{error}"
    );
    let skipped = ferry(&[
        "skip",
        "--data-dir",
        data_dir,
        "--partition",
        "0",
        "--log-id",
        &log_id.to_string(),
    ]);
    let out = String::from_utf8_lossy(&skipped.stdout);
    assert!(
        skipped.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&skipped.stderr)
    );
    let file = dir.path().join("sync/dead-letter/ferry-0.resp");
    assert!(
        out.contains(&format!("entry {log_id} of partition 0"))
            && out.contains(&file.display().to_string()),
        "{out}"
    );
    wait_for("the entries after it", &sync, || {
        (target.cmd(&["GET", "after"]) == "1").then_some(())
    });
    assert_eq!(target.cmd(&["GET", "c"]), "2", "nothing applied twice");
    assert_eq!(target.cmd(&["EXISTS", "l"]), "0");
    let row = applier(&sync);
    assert_eq!(row["state"], "ONLINE", "{row}");
    assert!(row["blocked"].is_null(), "{row}");
    assert_eq!(row["entries_skipped"], 1, "{row}");
    assert_eq!(row["last_skipped"].as_u64(), Some(log_id), "{row}");
    assert_eq!(row["fence"], "client-kill", "{row}");

    assert_eq!(dead_letter_ids(&file), [log_id]);
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(file.parent().unwrap()), 0o700);
    // Replayed into a server that knows LPUSH.
    let replay = RedisServer::start(&[]);
    let piped = Command::new(redis_cli_bin())
        .args(["-h", "127.0.0.1", "-p", &replay.port.to_string(), "--pipe"])
        .stdin(Stdio::from(std::fs::File::open(&file).unwrap()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&piped.stdout);
    assert!(
        piped.status.success() && said.contains("errors: 0"),
        "{said}"
    );
    assert_eq!(replay.cmd(&["LRANGE", "l", "0", "-1"]), "x");
    let status = sync.terminate(STOP);
    assert!(status.success(), "{}", sync.log_tail(40));
}

#[test]
fn skip_and_record_goes_on_by_itself() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&HIDE_LPUSH);
    let dir = tempfile::tempdir().unwrap();
    let mut sync = start_sync(
        dir.path(),
        &source,
        &target,
        "on-refused = \"skip-and-record\"",
    );
    wait_online(&sync, &target);
    for _ in 0..2 {
        source.cmd(&["INCR", "c"]);
        source.cmd(&["LPUSH", "l", "x"]);
    }
    source.cmd(&["INCR", "c"]);
    source.cmd(&["SET", "after", "1"]);
    wait_for("the entries after the refused ones", &sync, || {
        (target.cmd(&["GET", "after"]) == "1").then_some(())
    });
    assert_eq!(target.cmd(&["GET", "c"]), "3", "nothing applied twice");
    let row = applier(&sync);
    assert_eq!(row["entries_skipped"], 2, "{row}");
    assert!(row["blocked"].is_null(), "{row}");
    let file = dir.path().join("sync/dead-letter/ferry-0.resp");
    let ids = dead_letter_ids(&file);
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(row["last_skipped"].as_u64(), ids.last().copied(), "{row}");
    let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
    assert_eq!(
        text.matches("by=on-refused command=LPUSH").count(),
        2,
        "{text}"
    );
    let log = std::fs::read_to_string(&sync.log).unwrap_or_default();
    assert_eq!(
        log.matches("entry skipped; it is recorded in the dead-letter file")
            .count(),
        2,
        "{}",
        sync.log_tail(40)
    );
    let status = sync.terminate(STOP);
    assert!(status.success(), "{}", sync.log_tail(40));
}
