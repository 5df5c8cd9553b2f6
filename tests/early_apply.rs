//! Early apply (`[apply] early-apply`, on by default) of `ferry sync`: the
//! applier, reading the listener's WAL directly, may apply an entry to the
//! target while the WAL write holding it is still being fsynced; the source
//! is acked only once the entry is durable. A kill -9 can then leave the
//! target's checkpoint (`v3 applied=L ... src=<replid hash>:<offset>`)
//! ahead of the WAL's durable end. On restart the listener resumes the
//! source at its durable position and receives the same bytes again, and
//! the applier compares the source position the WAL now holds at `L` with
//! the checkpoint's `src=`: the same -> it resumes after `L` (exactly once,
//! no resync); another -> the source's history changed while ferry was down
//! and it takes a fallback snapshot of the source.
//!
//! - `sync_killed_while_applied_ahead_of_the_wal_applies_exactly_once`:
//!   the same history; kills land while the applier is ahead of the WAL,
//!   every restart resumes, nothing is lost or applied twice, no resync.
//! - `a_source_history_changed_while_down_gets_a_fallback_snapshot`: the
//!   entries applied ahead of the WAL never reach the replica that is
//!   promoted while ferry is down; ferry resumes on it (a partial resync)
//!   and must replace what it applied with a fallback snapshot.
//!
//! Both slow the WAL's fsyncs down with the test hook
//! `FERRY_TEST_WAL_SYNC_DELAY_MS` (the WAL writer sleeps that long before
//! each synced write), so that the applier is reliably ahead of durability.
//!
//! Run: `cargo test --test early_apply` (`--nocapture` prints every kill).
//! The kill schedule of the first test comes from a seeded RNG; the seed is
//! printed and `FERRY_CRASH_SEED=<seed>` replays it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::crash::{
    assert_full_syncs, assert_no_fatal, checkpoint_reader, differences, finish_converged,
    info_stat, kill9_running, stored_stats, wait_for_fence, wait_until, Rng, Runs, Sampler,
    SOURCE_ARGS,
};
use common::ferry::log::{
    ASKS_FALLBACK, EARLY_CHECKED, EARLY_OTHER, EARLY_SAME, FALLBACK_TAKEN, FULL_SYNC_STARTED,
    FULL_SYNC_STORED, PARTIAL_RESYNC,
};
use common::ferry::{assert_verify_clean, signal, FerryProcess};
use common::load::Load;
use common::resp::connect;
use common::RedisServer;

/// The checkpoint of `ferry sync`'s partition 0 (sync id `ferry`).
const CHECKPOINT_KEY: &str = "__ferry:checkpoint:ferry:0";

/// The WAL writer's sleep before each synced write (the test hook).
const SYNC_DELAY_ENV: &str = "FERRY_TEST_WAL_SYNC_DELAY_MS";

/// Writes `dir/sync.toml`: early apply on (the default, named so that the
/// tests do not depend on it) and `listener` lines in `[listener]`.
fn sync_config(dir: &Path, listener: &str) -> PathBuf {
    let config = dir.join("sync.toml");
    std::fs::write(
        &config,
        format!("[listener]\n{listener}\n[apply]\nearly-apply = true\n"),
    )
    .unwrap();
    config
}

/// `ferry sync` from `source` to `target` with the data dir `dir/sync`,
/// `config`, and the WAL's synced writes delayed by `delay_ms` (none:
/// not delayed).
fn early_sync(
    dir: &Path,
    config: &Path,
    source: &str,
    target: &str,
    delay_ms: Option<u64>,
) -> FerryProcess {
    let delay = delay_ms.map(|ms| ms.to_string());
    let env: Vec<(&str, &str)> = delay
        .as_deref()
        .map(|ms| (SYNC_DELAY_ENV, ms))
        .into_iter()
        .collect();
    FerryProcess::sync_with_env(
        &dir.join("sync"),
        source,
        target,
        &["--config", config.to_str().expect("utf-8 path")],
        &env,
    )
}

/// The value of `name=` in a checkpoint (`v3 applied=12 epoch=1 log=..
/// src=..:..`).
fn checkpoint_field<'a>(checkpoint: &'a str, name: &str) -> Option<&'a str> {
    checkpoint
        .split_whitespace()
        .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
}

/// The log id of an `applied=` checkpoint.
fn applied_id(checkpoint: &str) -> Option<u64> {
    checkpoint_field(checkpoint, "applied")?.parse().ok()
}

/// The source offset of a checkpoint's `src=<replid hash>:<offset>`.
fn src_offset(checkpoint: &str) -> Option<u64> {
    checkpoint_field(checkpoint, "src")?
        .rsplit_once(':')?
        .1
        .parse()
        .ok()
}

/// A string key (None when absent).
fn get(addr: &str, key: &str) -> Option<String> {
    connect(addr).call(&["GET", key]).expect("GET").text()
}

/// Sends `count` copies of `args` to `addr` in one pipeline; every reply
/// must be a success.
fn pipeline(addr: &str, args: &[&str], count: usize) {
    let mut conn = connect(addr);
    for _ in 0..count {
        conn.queue(args);
    }
    for reply in conn.replies().expect("pipeline") {
        assert!(
            !matches!(reply, common::resp::Resp::Error(_)),
            "{args:?} on {addr}: {reply:?}"
        );
    }
}

// ---------------------------------------------------------------------------

/// Proves that early apply keeps exactly-once across kill -9 when the
/// source's history did not change: `ferry sync` (WAL fsyncs delayed
/// 150 ms) under the mixed write load of `tests/crash.rs`, killed at random
/// moments 6 times (more, up to 10, while fewer than 2 kills found the
/// applier ahead of the WAL) after the first full sync was applied, each
/// run killed only once it applied past the previous kill's checkpoint.
///
/// A broken implementation shows as:
/// - no early apply at all (or no `src=` in the checkpoint): fewer than 2
///   kills with a `src=` checkpoint;
/// - the restart not checking the entry (or not logging it): no run logs
///   `applied before it was durable` then `the log holds the same entry`;
/// - entries applied ahead of the WAL applied again after the restart, or
///   skipped: a counter on the target ahead of the source in the sampler,
///   or a counter / the list / the stream / a key differing at the end
///   (`assert_converged`, `ferry verify` included);
/// - the check taking the same entry for another: `the log holds another
///   entry there`, a fallback snapshot in the log or the status, or the
///   source's `sync_full` moving after the first full sync.
#[test]
fn sync_killed_while_applied_ahead_of_the_wal_applies_exactly_once() {
    const KILLS: usize = 6;
    const EXTRA_KILLS: usize = 4;
    let mut rng = Rng::from_env("sync_killed_while_applied_ahead_of_the_wal_applies_exactly_once");
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "2000", "pre", "100"]);
    let full_start = info_stat(&source, "sync_full");
    let load = Load::start(&source.addr());
    let sampler = Sampler::start(&source.addr(), &target.addr(), CHECKPOINT_KEY);
    let dir = tempfile::tempdir().unwrap();
    let config = sync_config(dir.path(), "");
    let mut ferry = early_sync(dir.path(), &config, &source.url(), &target.url(), Some(150));
    let mut runs = Runs::first();
    let mut checkpoint = checkpoint_reader(&target.addr(), CHECKPOINT_KEY);
    wait_until(
        "the first full sync to be stored",
        Duration::from_secs(90),
        &[&ferry],
        || runs.current(&ferry).contains(FULL_SYNC_STORED),
    );
    let (full_at_stored, partial_at_stored) =
        stored_stats(&runs, &ferry, &source).expect("stored above");
    // The log id the running process must apply past before it is killed:
    // then it has resumed (its check of an early checkpoint is done).
    let mut killed_at = 0;
    let mut ahead = 0;
    let mut kill = 0;
    while kill < KILLS || (ahead < 2 && kill < KILLS + EXTRA_KILLS) {
        wait_until(
            &format!("the run to apply past log id {killed_at}"),
            Duration::from_secs(90),
            &[&ferry],
            || applied_id(&checkpoint()).is_some_and(|id| id > killed_at),
        );
        let delay = rng.millis(50, 600);
        std::thread::sleep(delay);
        let before = checkpoint();
        kill9_running(&mut ferry, "ferry sync");
        // What the dead process had sent may still be running on the
        // target: read the checkpoint the restart will find once it ran.
        std::thread::sleep(Duration::from_millis(100));
        let at_kill = checkpoint();
        if at_kill.contains("src=") {
            ahead += 1;
        }
        killed_at = applied_id(&at_kill).unwrap_or(killed_at);
        println!(
            "kill {kill}: {delay:?} after the run applied; checkpoint {before:?} -> {at_kill:?}"
        );
        runs.starting(&ferry);
        ferry.spawn();
        kill += 1;
    }
    finish_converged(load, sampler, &source.addr(), &target.addr(), &[&ferry]);
    assert_full_syncs(
        &runs,
        &ferry,
        full_start,
        full_at_stored,
        partial_at_stored,
        &source,
    );

    let logs = runs.logs(&ferry);
    let mut resumed_early = 0;
    for (run, log) in logs.iter().enumerate().skip(1) {
        let (checked, same, other) = (
            log.contains(EARLY_CHECKED),
            log.contains(EARLY_SAME),
            log.contains(EARLY_OTHER),
        );
        println!("run {run}: checked an early checkpoint: {checked}, the same entry: {same}");
        assert!(
            !other,
            "run {run} found another entry at its checkpoint's log id, with the source's \
             history unchanged\n{}",
            ferry.log_tail(60)
        );
        // Every run but the last was killed only after it applied past
        // its checkpoint, and the last one reached the fence.
        assert!(
            !checked || same,
            "run {run} checked an early checkpoint but never found the same entry there\n{}",
            ferry.log_tail(60)
        );
        if checked && same {
            resumed_early += 1;
        }
    }
    assert!(
        ahead >= 2,
        "only {ahead} of {kill} kills found a checkpoint with src= (applied ahead of the WAL)"
    );
    assert!(
        resumed_early >= 1,
        "no restart logged {EARLY_CHECKED:?} and {EARLY_SAME:?} ({ahead} kills found a \
         checkpoint with src=)\n{}",
        ferry.log_tail(60)
    );
    let log = ferry.log_since(0);
    for needle in [ASKS_FALLBACK, FALLBACK_TAKEN, EARLY_OTHER] {
        assert!(
            !log.contains(needle),
            "{needle:?} logged: a fallback snapshot with the source's history unchanged\n{}",
            ferry.log_tail(60)
        );
    }
    assert_eq!(
        ferry.fallback_snapshots(),
        0,
        "fallback snapshots in the status\n{}",
        ferry.log_tail(40)
    );
    let status = ferry.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}; {}", ferry.log_tail(30));
    assert_no_fatal(&ferry);
}

// ---------------------------------------------------------------------------

/// The address (`laddr=`) of `replica`'s link to its master, as its master
/// lists the link (`addr=`).
fn master_link_addr(replica: &RedisServer) -> String {
    let clients = replica.cmd(&["CLIENT", "LIST", "TYPE", "master"]);
    clients
        .split_whitespace()
        .find_map(|field| field.strip_prefix("laddr="))
        .unwrap_or_else(|| panic!("no link to a master in CLIENT LIST: {clients:?}"))
        .to_string()
}

/// `ferry status`: (the listener's durable offset, its last durable log
/// id, the applier's applied log id).
fn positions(ferry: &FerryProcess) -> (u64, u64, u64) {
    let status = ferry.status_json();
    let listener = &status["listeners"][0];
    let number = |value: &serde_json::Value| value.as_u64().unwrap_or(0);
    (
        number(&listener["durable_offset"]),
        number(&listener["last_log_id"]),
        number(&status["drainers"][0]["applied"]),
    )
}

/// Proves that an early checkpoint is not trusted blindly: the entries
/// ferry applied ahead of its WAL are gone from the source's history when
/// it restarts, and it must notice and replace them with a fallback
/// snapshot.
///
/// A source S with a native replica R, a target T, `ferry sync` S -> T
/// (WAL fsyncs delayed 3 s, no heartbeat: the only writes on S are the
/// test's). Once the first full sync is applied and durable and R caught
/// up: R frozen and its link cut on S (R keeps nothing S writes after
/// this: a frozen process would still find the bytes in its socket once
/// thawed), W1 = 50 `INCR k1` on S, applied early (k1 = 50 on T, a `src=`
/// checkpoint), then ferry kill -9 within the delay (W1 never durable),
/// S kill -9, R thawed and promoted (`REPLICAOF NO ONE`), W2 on R: 200
/// `INCR k2` and `SET k1 from-r` (more entries than W1, so that the log
/// reaches the checkpoint's id again). ferry restarts with R as its source
/// and the same data dir: it resumes on R (a partial resync at its durable
/// position, which R's history holds), and the WAL's entry at the
/// checkpoint's id is now one of W2.
///
/// A broken implementation shows as: W1 never applied ahead of the WAL
/// (the wait for k1 = 50 with a `src=` checkpoint times out); the early
/// checkpoint trusted (T keeps k1 = 50, or the missing `the log holds
/// another entry there`, or a log claiming the same entry); no fallback
/// snapshot counted; T not equal to R (`ferry verify` R vs T).
///
/// The setup checks itself: R must lack W1 (its offset below S's after W1,
/// no k1), the checkpoint's `src=` offset must be beyond R's history, and
/// the restart must resume on R with a partial resync. A full resync there
/// (R refused ferry's position, e.g. a kill that came after W1 was already
/// durable) fails the test: it would not exercise the check.
#[test]
fn a_source_history_changed_while_down_gets_a_fallback_snapshot() {
    const DELAY_MS: u64 = 3000;
    const W1: usize = 50;
    const W2: usize = 200;
    let s = RedisServer::start(SOURCE_ARGS);
    // Before R starts: `DEBUG POPULATE` is not replicated, R gets the keys
    // with its full sync.
    s.cmd(&["DEBUG", "POPULATE", "1000", "pre", "20"]);
    let s_port = s.port.to_string();
    let mut replica_args = SOURCE_ARGS.to_vec();
    replica_args.extend(["--replicaof", "127.0.0.1", s_port.as_str()]);
    let r = RedisServer::start(&replica_args);
    let t = RedisServer::start(&[]);
    wait_until("R to replicate S", Duration::from_secs(30), &[], || {
        r.info_field("master_link_status").as_deref() == Some("up")
    });
    let dir = tempfile::tempdir().unwrap();
    let config = sync_config(dir.path(), "heartbeat-interval = \"0s\"");
    let mut ferry = early_sync(dir.path(), &config, &s.url(), &t.url(), Some(DELAY_MS));
    let mut checkpoint = checkpoint_reader(&t.addr(), CHECKPOINT_KEY);
    wait_until(
        "the first full sync to be stored",
        Duration::from_secs(120),
        &[&ferry],
        || ferry.log_since(0).contains(FULL_SYNC_STORED),
    );
    wait_until(
        "the first full sync to be applied",
        Duration::from_secs(120),
        &[&ferry],
        || checkpoint().contains("applied="),
    );
    // Entries of S's history that R and ferry's WAL share.
    pipeline(&s.addr(), &["INCR", "k0"], 20);
    // S is idle: wait until the WAL holds everything durably (its writes
    // take DELAY_MS each), the applier applied all of it, and R has all of
    // it too.
    wait_until(
        "the WAL to be durable up to S's offset and applied, and R to catch up",
        Duration::from_secs(60),
        &[&ferry],
        || {
            let s_offset = info_stat(&s, "master_repl_offset");
            let (durable, last, applied) = positions(&ferry);
            durable == s_offset
                && applied == last
                && applied_id(&checkpoint()) == Some(last)
                && info_stat(&r, "master_repl_offset") == s_offset
        },
    );
    let s_replid = s.info_field("master_replid").expect("master_replid");

    // R keeps nothing of what follows.
    let link = master_link_addr(&r);
    signal(r.pid(), "STOP");
    assert_eq!(
        s.cmd(&["CLIENT", "KILL", "ADDR", &link]),
        "1",
        "CLIENT KILL of R's link"
    );
    wait_until(
        "S to drop R's link",
        Duration::from_secs(10),
        &[&ferry],
        || {
            !s.cmd(&["CLIENT", "LIST", "TYPE", "replica"])
                .contains(&format!("addr={link} "))
        },
    );
    let before_w1 = info_stat(&s, "master_repl_offset");
    pipeline(&s.addr(), &["INCR", "k1"], W1);
    let after_w1 = info_stat(&s, "master_repl_offset");
    let mut t_conn = connect(&t.addr());
    let w1 = W1.to_string();
    wait_until(
        "ferry to apply W1 ahead of its WAL (k1 = 50 on T, a checkpoint with src=)",
        Duration::from_secs(20),
        &[&ferry],
        || {
            t_conn.call(&["GET", "k1"]).expect("GET k1").text() == Some(w1.clone())
                && checkpoint().contains("src=")
        },
    );
    kill9_running(&mut ferry, "ferry sync, W1 applied ahead of the WAL");
    std::thread::sleep(Duration::from_millis(100));
    let at_kill = checkpoint();
    println!(
        "S's offset {before_w1} before W1, {after_w1} after; checkpoint at the kill {at_kill:?}"
    );
    drop(s);

    // R promoted without W1.
    signal(r.pid(), "CONT");
    assert_eq!(r.cmd(&["REPLICAOF", "NO", "ONE"]), "OK");
    let r_offset = info_stat(&r, "master_repl_offset");
    println!("R promoted at offset {r_offset}");
    assert!(
        (before_w1..after_w1).contains(&r_offset) && get(&r.addr(), "k1").is_none(),
        "R was to lack W1: its offset is {r_offset} (S's: {before_w1} before W1, {after_w1} \
         after), k1 = {:?}",
        get(&r.addr(), "k1")
    );
    assert_eq!(
        r.info_field("master_replid2").as_deref(),
        Some(s_replid.as_str()),
        "R does not remember S's history"
    );
    let src = src_offset(&at_kill)
        .unwrap_or_else(|| panic!("no src=<replid>:<offset> in the checkpoint {at_kill:?}"));
    assert!(
        src > r_offset,
        "the checkpoint names an entry at S's offset {src}, which R holds (up to {r_offset}): \
         the restart would find the same entry"
    );
    pipeline(&r.addr(), &["INCR", "k2"], W2);
    assert_eq!(r.cmd(&["SET", "k1", "from-r"]), "OK");
    let r_partial = info_stat(&r, "sync_partial_ok");

    // ferry again, the same data dir, R as its source (the delay off: what
    // is checked is the checkpoint the kill left).
    let mark = ferry.log_len();
    let ferry = early_sync(dir.path(), &config, &r.url(), &t.url(), None);
    wait_until(
        "the listener to resume on R",
        Duration::from_secs(60),
        &[&ferry],
        || {
            let log = ferry.log_since(mark);
            log.contains(PARTIAL_RESYNC) || log.contains(FULL_SYNC_STARTED)
        },
    );
    assert!(
        !ferry.log_since(mark).contains(FULL_SYNC_STARTED),
        "R answered ferry's PSYNC with a full resync, not a partial one: ferry's durable \
         position is not in R's history (was W1 durable before the kill?), so the test does \
         not exercise the check of an early checkpoint\n{}",
        ferry.log_tail(60)
    );
    wait_for_fence(&r.addr(), &t.addr(), &[&ferry]);

    // The data first: what a broken check leaves behind.
    assert_eq!(
        get(&t.addr(), "k1").as_deref(),
        Some("from-r"),
        "T keeps what ferry applied from S\n{}",
        ferry.log_tail(40)
    );
    assert_eq!(get(&t.addr(), "k2"), Some(W2.to_string()));
    let found = differences(&r.addr(), &t.addr());
    assert!(
        found.is_empty(),
        "T differs from R:\n{}\n{}",
        found.join("\n"),
        ferry.log_tail(40)
    );
    let log = ferry.log_since(mark);
    for needle in [EARLY_CHECKED, EARLY_OTHER] {
        assert!(
            log.contains(needle),
            "{needle:?} not logged by the restart\n{}",
            ferry.log_tail(60)
        );
    }
    assert!(
        !log.contains(EARLY_SAME),
        "the restart took an entry of R for the one applied from S\n{}",
        ferry.log_tail(60)
    );
    assert!(
        !log.contains(FULL_SYNC_STARTED),
        "a full resync of the listener\n{}",
        ferry.log_tail(60)
    );
    assert!(
        info_stat(&r, "sync_partial_ok") > r_partial,
        "R counted no partial resync"
    );
    let fallbacks = ferry.fallback_snapshots();
    assert!(
        fallbacks >= 1,
        "no fallback snapshot in the status\n{}",
        ferry.log_tail(60)
    );
    assert_verify_clean("R vs T", &r.url(), &t.url(), || ferry.log_tail(40));
    let mut ferry = ferry;
    let status = ferry.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}; {}", ferry.log_tail(30));
    assert_no_fatal(&ferry);
}
