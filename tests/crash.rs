//! Crash tests of real `ferry` processes between real redis-servers, under a
//! continuous mixed write load of every seed command (issue 3, "Tests"
//! bullet 2 and deliverable 5; issue 4, deliverable 2).
//!
//! - `sync_survives_random_sigkills`: `ferry sync` SIGKILLed 10 times at
//!   random moments, first during the initial full sync, then while the
//!   applier loads the snapshot or applies batches.
//! - `listener_and_drainer_survive_random_sigkills`: `ferry listener` and
//!   `ferry drainer` as two processes, each SIGKILLed 4 times.
//! - `paused_target_resumes_without_loss`: the target frozen
//!   (SIGSTOP/SIGCONT) for 3 s, twice.
//! - `aof_always_target_survives_sigkills` / `aof_everysec_target_survives_
//!   sigkills`: the target (AOF, `appendfsync always` / `everysec`)
//!   SIGKILLed at random moments and started again on its port, twice each.
//!   Meanwhile `ferry status --json` must show the applier OFFLINE with the
//!   error, then ONLINE again. (A SIGKILL of the process loses nothing even
//!   with `everysec`: the kernel keeps what Redis wrote.)
//! - `target_losing_its_last_second_gets_it_again`: what `everysec` may
//!   lose in a machine crash, simulated by restarting the target from a copy
//!   of its AOF taken up to 1.2 s earlier: the applier must send exactly the
//!   lost batches again (this needs the drainer's `retain-applied`).
//! - `empty_target_after_restart_stops_the_node`: a target without
//!   persistence comes back empty; pinned: the node stops with exit 1 and
//!   the gap error ("the target needs a snapshot"), writing nothing to it.
//! - Long variants, ignored by default (each attribute names its command):
//!   `sync_survives_many_sigkills_long` (30 kills),
//!   `listener_and_drainer_survive_many_sigkills_long` (12 + 12),
//!   `aof_target_sigkill_loops_long` (10 `always` + 10 `everysec`),
//!   `target_losing_its_last_second_many_times_long` (10 rounds),
//!   `frozen_target_during_catch_up` (the target frozen while the applier
//!   catches up with ~2 MiB batches, five times).
//!
//! Run: `cargo test --test crash` (the tests run in parallel), `cargo test
//! --test crash -- --ignored` for all the long ones. `--nocapture` prints
//! what every kill interrupted.
//!
//! The load is [`common::load`] (one connection to the source): every
//! iteration `INCR counter`, `LPUSH list <i>`, `XADD stream * i <i>`,
//! `HINCRBY`, `SET`/`DEL`, `SET .. EX`, every 4th `MULTI; INCR a; INCR b;
//! EXEC`, and one step of a rotation through every seed command (strings,
//! bits, HyperLogLog, geo, expiry, lists with blocking pops, hashes, sets,
//! sorted sets, `RENAME`/`RESTORE`/`UNLINK`, `MOVE`/`SWAPDB`, `EVAL`/
//! `EVALSHA`/`FCALL`, a `MULTI`/`EXEC` across types and dbs, streams with a
//! consumer group, other dbs). While it runs, a sampler reads the target in
//! one `MULTI`/`EXEC` and checks that `a == b` (source transactions stay
//! atomic) whenever the target is not in the middle of a snapshot load, and
//! that no counter on the target is ahead of the source (an entry applied
//! twice). At the end: the load's counters (`counter`, `a`, `b`, the `EVAL`
//! and `FCALL` counters, `LLEN list`) equal on both sides, the list and the
//! stream IDs equal, every key of every db equal (type, `DEBUG
//! DIGEST-VALUE`, expiry time, stream groups and PELs, function libraries;
//! `__ferry*` keys aside), `ferry verify` clean (the real binary, exit 0 and
//! no difference in its JSON), and the source's `sync_full` must not have
//! moved after the first full sync was stored.
//!
//! The kill schedule comes from a seeded RNG; the seed is printed and
//! `FERRY_CRASH_SEED=<seed>` replays it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::crash::{
    assert_converged, assert_full_syncs, assert_no_fatal, checkpoint_reader, differences,
    finish_converged, info_stat, kill9_running, read_checkpoint, stored_stats,
    wait_first_snapshot_stored, wait_for_fence, wait_until, Rng, Runs, Sampler, SETTLE,
    SOURCE_ARGS,
};
use common::ferry::log::{
    APPLYING, APPLY_BACK, APPLY_FAILED, ASKS_FALLBACK, FALLBACK_SNAPSHOT, FALLBACK_TAKEN,
    FALLBACK_WAS_LOADING, FULL_SYNC_STARTED, FULL_SYNC_STORED, GAP, PARTIAL_RESYNC, PRELOAD,
    TARGET_BEHIND,
};
use common::ferry::{assert_verify_clean, signal, FerryProcess};
use common::load::{assert_counters, Load};
use common::resp::{connect, get_int};
use common::{free_port, FixedPortRedis, RedisServer};

// ---------------------------------------------------------------------------
// The tests (the helpers they share with tests/early_apply.rs are in
// tests/common/crash.rs).

/// The end of a run under `load`: the load stops, the target catches up,
/// nothing fatal was logged, the counters are exact and `ferry verify`
/// finds no difference.
fn assert_exact_end(
    what: &str,
    load: Load,
    source: &RedisServer,
    target: &FixedPortRedis,
    ferry: &FerryProcess,
) {
    let report = load.finish();
    wait_for_fence(&source.addr(), &target.addr(), &[ferry]);
    assert_no_fatal(ferry);
    assert_counters(what, &report, &source.addr(), &target.addr());
    assert_verify_clean(what, &source.url(), &target.url(), || ferry.log_tail(40));
}

/// A source with 2000 keys under the write load, and an empty target.
fn servers_under_load() -> (RedisServer, FixedPortRedis, Load) {
    let source = RedisServer::start(SOURCE_ARGS);
    let target = FixedPortRedis::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "2000", "pre", "100"]);
    let load = Load::start(&source.addr());
    (source, target, load)
}

/// `ferry sync` whose applied entries leave the WAL 200 ms after they were
/// applied and whose unapplied ones expire after 2 s (`wal-ttl`).
fn short_ttl_sync(dir: &Path, source: &RedisServer, target: &FixedPortRedis) -> FerryProcess {
    sync_with_config(
        dir,
        source,
        target,
        "retain-applied = \"200ms\"",
        "wal-ttl = \"2s\"\nretention-interval = \"200ms\"",
    )
}

#[test]
fn sync_survives_random_sigkills() {
    sync_kill_loop("sync_survives_random_sigkills", 10);
}

/// Long variant: 30 kills of `ferry sync` (the last 23 while it applies).
/// Run: `cargo test --test crash -- --ignored sync_survives_many_sigkills_long`.
#[test]
#[ignore = "long: cargo test --test crash -- --ignored sync_survives_many_sigkills_long"]
fn sync_survives_many_sigkills_long() {
    sync_kill_loop("sync_survives_many_sigkills_long", 30);
}

/// `ferry sync` SIGKILLed `kills` (at least 8) times: see the module doc.
fn sync_kill_loop(test: &str, kills: usize) {
    let mut rng = Rng::from_env(test);
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    // Big enough that the first full syncs are killed while the RDB streams
    // in, and that the applier is killed while it loads the snapshot.
    source.cmd(&["DEBUG", "POPULATE", "200000", "pre", "100"]);
    let full_start = info_stat(&source, "sync_full");
    let load = Load::start(&source.addr());
    let sampler = Sampler::start(&source.addr(), &target.addr(), "__ferry:checkpoint:ferry:0");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let mut ferry = FerryProcess::sync(&data, &source.url(), &target.url(), &[]);
    let mut runs = Runs::first();
    let mut stored = None;
    let mut checkpoint = checkpoint_reader(&target.addr(), "__ferry:checkpoint:ferry:0");
    // Kills 0-1 aim at the RDB transfer, 2-3 at what follows the stored
    // snapshot (shipping its chunks, the applier loading it), 4-9 at the
    // stream applied batch after batch: 4-6 counted from the start (some
    // land while the process starts), 7-9 from the applier's first batch.
    let mut mid_stream = 0;
    // On a loaded machine a restart can take longer than the kill's delay,
    // so that no batch commits in it: up to 6 more kills (each once the
    // applier applies) until two landed mid-stream.
    let mut kill = 0;
    while kill < kills || (mid_stream < 2 && kill < kills + 6) {
        let (delay, after) = if kill < 2 && stored.is_none() {
            wait_until(
                "the listener to start the full sync",
                Duration::from_secs(30),
                &[&ferry],
                || runs.current(&ferry).contains(FULL_SYNC_STARTED),
            );
            let delay = if kill == 0 {
                rng.millis(50, 300)
            } else {
                rng.millis(50, 800)
            };
            (delay, "the full sync started")
        } else if kill < 4 {
            if stored.is_none() {
                wait_until(
                    "the first full sync to be stored",
                    Duration::from_secs(60),
                    &[&ferry],
                    || runs.current(&ferry).contains(FULL_SYNC_STORED),
                );
            }
            (rng.millis(50, 800), "the snapshot was stored")
        } else {
            wait_until(
                "the applier to finish loading the snapshot",
                Duration::from_secs(90),
                &[&ferry],
                || checkpoint().contains("applied="),
            );
            if kill >= 7 {
                wait_until(
                    "the applier to start applying",
                    Duration::from_secs(30),
                    &[&ferry],
                    || runs.current(&ferry).contains(APPLYING),
                );
                (rng.millis(50, 800), "the applier started")
            } else {
                (rng.millis(50, 800), "the start")
            }
        };
        let before = checkpoint();
        std::thread::sleep(delay);
        let at_kill = checkpoint();
        kill9_running(&mut ferry, "ferry sync");
        // Batches were committing when the kill came.
        if kill >= 4 && at_kill.contains("applied=") && at_kill != before {
            mid_stream += 1;
        }
        let log = runs.current(&ferry);
        println!(
            "kill {kill}: {delay:?} after {after}; stored={} resumed={}; target checkpoint {before:?} -> {at_kill:?}",
            log.contains(FULL_SYNC_STORED),
            log.contains(PARTIAL_RESYNC),
        );
        stored = stored.or_else(|| stored_stats(&runs, &ferry, &source));
        runs.starting(&ferry);
        ferry.spawn();
        kill += 1;
    }
    if stored.is_none() {
        wait_until(
            "the first full sync to be stored",
            Duration::from_secs(60),
            &[&ferry],
            || runs.current(&ferry).contains(FULL_SYNC_STORED),
        );
        stored = stored_stats(&runs, &ferry, &source);
    }
    let (full_at_stored, partial_at_stored) = stored.expect("stored above");
    finish_converged(load, sampler, &source.addr(), &target.addr(), &[&ferry]);
    let (killed_mid_transfer, resumed) = assert_full_syncs(
        &runs,
        &ferry,
        full_start,
        full_at_stored,
        partial_at_stored,
        &source,
    );
    assert!(
        killed_mid_transfer >= 1,
        "no kill landed while the RDB was being stored"
    );
    assert!(resumed >= 3, "only {resumed} runs resumed a stored stream");
    assert!(
        mid_stream >= 2,
        "only {mid_stream} kills landed while batches were being applied"
    );
    let status = ferry.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}; {}", ferry.log_tail(30));
    assert_no_fatal(&ferry);
}

/// Writes `ferry listener` and `ferry drainer` configs into `dir`.
fn write_split_configs(dir: &Path, source: &str, target: &str) -> (PathBuf, PathBuf) {
    let port = free_port();
    let secret = "crash-test-secret";
    let listener = dir.join("listener.toml");
    std::fs::write(
        &listener,
        format!(
            r#"data-dir = "{data}"
admin = "127.0.0.1:0"

[listener]
id = "crash-listener"
source = "{source}"
reconnect-backoff-min = "50ms"
reconnect-backoff-max = "500ms"

[ship]
reconnect-min = "50ms"
reconnect-max = "500ms"

[[drainers]]
id = "crash-drainer"
endpoint = "http://127.0.0.1:{port}"
secret = "{secret}"
"#,
            data = dir.join("listener").display()
        ),
    )
    .unwrap();
    let drainer = dir.join("drainer.toml");
    std::fs::write(
        &drainer,
        format!(
            r#"data-dir = "{data}"
admin = "127.0.0.1:0"
listen = "127.0.0.1:{port}"

[[drainer.listeners]]
id = "crash-listener"
secret = "{secret}"

[apply]
drainer-id = "crash-drainer"
target = "{target}"
retry-backoff-min = "50ms"
retry-backoff-max = "500ms"
"#,
            data = dir.join("drainer").display()
        ),
    )
    .unwrap();
    (listener, drainer)
}

#[test]
fn listener_and_drainer_survive_random_sigkills() {
    split_kill_loop("listener_and_drainer_survive_random_sigkills", 4, 4);
}

/// Long variant: 12 kills of `ferry listener`, then 12 of `ferry drainer`.
/// Run: `cargo test --test crash -- --ignored listener_and_drainer_survive_many_sigkills_long`.
#[test]
#[ignore = "long: cargo test --test crash -- --ignored listener_and_drainer_survive_many_sigkills_long"]
fn listener_and_drainer_survive_many_sigkills_long() {
    split_kill_loop("listener_and_drainer_survive_many_sigkills_long", 12, 12);
}

/// `ferry listener` SIGKILLed `listener_kills` times, then `ferry drainer`
/// `drainer_kills` times (both at least 3), under the load.
fn split_kill_loop(test: &str, listener_kills: usize, drainer_kills: usize) {
    let mut rng = Rng::from_env(test);
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    // Large enough for the first kill to have a chance to land while the
    // RDB streams in (not asserted here: sync_survives_random_sigkills does).
    source.cmd(&["DEBUG", "POPULATE", "60000", "pre", "100"]);
    let full_start = info_stat(&source, "sync_full");
    let load = Load::start(&source.addr());
    let sampler = Sampler::start(
        &source.addr(),
        &target.addr(),
        "__ferry:checkpoint:crash-drainer:0",
    );
    let dir = tempfile::tempdir().unwrap();
    let (listener_toml, drainer_toml) =
        write_split_configs(dir.path(), &source.url(), &target.url());
    let mut drainer =
        FerryProcess::with_config("drainer", &drainer_toml, &dir.path().join("drainer"));
    let mut listener =
        FerryProcess::with_config("listener", &listener_toml, &dir.path().join("listener"));
    let mut runs = Runs::first();
    let mut stored = None;
    for kill in 0..listener_kills {
        let (delay, after) = if kill == 0 {
            wait_until(
                "the listener to start the full sync",
                Duration::from_secs(30),
                &[&listener, &drainer],
                || runs.current(&listener).contains(FULL_SYNC_STARTED),
            );
            (rng.millis(50, 250), "the full sync started")
        } else if kill >= 2 {
            wait_until(
                "the listener to resume",
                Duration::from_secs(30),
                &[&listener, &drainer],
                || runs.current(&listener).contains(PARTIAL_RESYNC),
            );
            (rng.millis(50, 800), "the partial resync")
        } else {
            if stored.is_none() {
                wait_until(
                    "the first full sync to be stored",
                    Duration::from_secs(60),
                    &[&listener, &drainer],
                    || runs.current(&listener).contains(FULL_SYNC_STORED),
                );
            }
            (rng.millis(50, 800), "the start")
        };
        std::thread::sleep(delay);
        kill9_running(&mut listener, "ferry listener");
        let log = runs.current(&listener);
        println!(
            "listener kill {kill}: {delay:?} after {after}; stored={} resumed={}",
            log.contains(FULL_SYNC_STORED),
            log.contains(PARTIAL_RESYNC)
        );
        stored = stored.or_else(|| stored_stats(&runs, &listener, &source));
        runs.starting(&listener);
        listener.spawn();
    }
    let (full_at_stored, partial_at_stored) = stored.expect("stored before kill 1");
    // Drainer kill 0 counted from its start (it may land in the snapshot
    // load), 1-3 from its applier's first batch.
    let mut checkpoint = checkpoint_reader(&target.addr(), "__ferry:checkpoint:crash-drainer:0");
    let mut drainer_run = 0;
    let mut mid_stream = 0;
    // Two kills must land while batches commit. On a loaded box the applier
    // may not move within the delay of a planned kill: up to
    // EXTRA_DRAINER_KILLS more are made (with longer delays) until two did.
    const EXTRA_DRAINER_KILLS: usize = 6;
    let mut kills = 0;
    // The target's checkpoint when the running drainer was started.
    let mut at_spawn = String::new();
    while kills < drainer_kills || (mid_stream < 2 && kills < drainer_kills + EXTRA_DRAINER_KILLS) {
        let kill = kills;
        kills += 1;
        let after = if kill == 0 {
            "the start"
        } else {
            // Started, and its first batch committed: the stream flows
            // again (its shipper reconnected), so the kill below lands
            // among batches being applied, not before the first one.
            wait_until(
                "the drainer's applier to apply its first batch",
                Duration::from_secs(60),
                &[&listener, &drainer],
                || {
                    drainer.log_since(drainer_run).contains(APPLYING) && {
                        let now = checkpoint();
                        now.contains("applied=") && now != at_spawn
                    }
                },
            );
            "the applier's first batch"
        };
        let delay = if kill < drainer_kills {
            rng.millis(50, 800)
        } else {
            rng.millis(400, 1500)
        };
        let before = checkpoint();
        std::thread::sleep(delay);
        let at_kill = checkpoint();
        kill9_running(&mut drainer, "ferry drainer");
        if kill >= 1 && at_kill.contains("applied=") && at_kill != before {
            mid_stream += 1;
        }
        println!("drainer kill {kill}: {delay:?} after {after}; target checkpoint {before:?} -> {at_kill:?}");
        drainer_run = drainer.log_len();
        at_spawn = checkpoint();
        drainer.spawn();
    }
    finish_converged(
        load,
        sampler,
        &source.addr(),
        &target.addr(),
        &[&listener, &drainer],
    );
    let (_, resumed) = assert_full_syncs(
        &runs,
        &listener,
        full_start,
        full_at_stored,
        partial_at_stored,
        &source,
    );
    assert!(resumed >= 2, "only {resumed} listener runs resumed");
    assert!(
        mid_stream >= 2,
        "only {mid_stream} of {kills} drainer kills landed while batches were being applied"
    );
    let drainer_restarts = drainer.log_since(0).matches("ship stream accepted").count();
    assert!(
        drainer_restarts > kills,
        "the listener reached the drainer only {drainer_restarts} times"
    );
    for process in [&mut listener, &mut drainer] {
        let status = process.terminate(Duration::from_secs(30));
        assert!(status.success(), "{status:?}; {}", process.log_tail(30));
        assert_no_fatal(process);
    }
}

/// `ferry sync` against `target` with an applier that gives up on a silent
/// target after 1 s and retries quickly.
fn sync_with_fast_retries(
    dir: &Path,
    source: &RedisServer,
    target: &FixedPortRedis,
) -> FerryProcess {
    sync_with_config(dir, source, target, "", "")
}

/// [`sync_with_fast_retries`] with more `[apply]` lines and a `[wal]`
/// section.
fn sync_with_config(
    dir: &Path,
    source: &RedisServer,
    target: &FixedPortRedis,
    apply: &str,
    wal: &str,
) -> FerryProcess {
    sync_from(dir, source, target, "", apply, wal)
}

/// [`sync_with_config`] with `top` (top-level keys, e.g. `apply-from`).
fn sync_from(
    dir: &Path,
    source: &RedisServer,
    target: &FixedPortRedis,
    top: &str,
    apply: &str,
    wal: &str,
) -> FerryProcess {
    let config = dir.join("sync.toml");
    std::fs::write(
        &config,
        format!(
            r#"{top}
[apply]
reply-timeout = "1s"
connect-timeout = "1s"
retry-backoff-min = "50ms"
retry-backoff-max = "500ms"
{apply}
[wal]
{wal}
"#
        ),
    )
    .unwrap();
    FerryProcess::sync(
        &dir.join("sync"),
        &source.url(),
        &target.url(),
        &["--config", config.to_str().expect("utf-8 path")],
    )
}

/// Runs `outage` (which takes the target away and brings it back) under
/// load, checks that the applier reported it and came back, then that
/// nothing was lost or applied twice.
fn target_outage(
    test: &str,
    target_args: &[&str],
    rounds: usize,
    mut outage: impl FnMut(&mut FixedPortRedis, &FerryProcess, &mut Rng),
) {
    let mut rng = Rng::from_env(test);
    let source = RedisServer::start(SOURCE_ARGS);
    let mut target = FixedPortRedis::start(target_args);
    source.cmd(&["DEBUG", "POPULATE", "5000", "pre", "100"]);
    let load = Load::start(&source.addr());
    let sampler = Sampler::start(&source.addr(), &target.addr(), "__ferry:checkpoint:ferry:0");
    let dir = tempfile::tempdir().unwrap();
    // The entries a restored target lost are applied again from the WAL,
    // which keeps them `retain-applied` after they were applied (5 s by
    // default): a loaded box that takes longer than that to restart and
    // reload the target would trim them and make this a fallback snapshot
    // (a full resync, which the test refuses): the likely cause of one CI
    // failure, where the target spent long loading.
    let mut ferry = sync_with_config(dir.path(), &source, &target, "retain-applied = \"60s\"", "");
    wait_first_snapshot_stored(&ferry);
    let full_at_stored = info_stat(&source, "sync_full");
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    for round in 0..rounds {
        std::thread::sleep(rng.millis(50, 800));
        let mark = ferry.log_len();
        outage(&mut target, &ferry, &mut rng);
        wait_until(
            "the applier to report the target back",
            Duration::from_secs(30),
            &[&ferry],
            || ferry.log_since(mark).contains(APPLY_BACK),
        );
        wait_until(
            "ferry status to show the applier ONLINE again",
            Duration::from_secs(30),
            &[&ferry],
            || applier_state(&ferry).0 == "ONLINE",
        );
        let log = ferry.log_since(mark);
        let failure = log
            .lines()
            .find(|line| line.contains(APPLY_FAILED))
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: no {APPLY_FAILED:?} logged\n{}",
                    ferry.log_tail(40)
                )
            });
        println!("round {round}: {failure}");
    }
    std::thread::sleep(SETTLE);
    let report = load.finish();
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    let samples = sampler.finish();
    println!("{report:?}; {samples:?}");
    assert!(
        samples.unanswered > 0,
        "the sampler never saw the target away: {samples:?}"
    );
    assert_converged(&source.addr(), &target.addr(), &report, &samples, &[&ferry]);
    assert_eq!(
        info_stat(&source, "sync_full"),
        full_at_stored,
        "a full resync"
    );
    let status = ferry.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}; {}", ferry.log_tail(30));
    assert_no_fatal(&ferry);
}

/// What `ferry status --json` says of the applier: (state, last error).
fn applier_state(ferry: &FerryProcess) -> (String, Option<String>) {
    assert!(
        !ferry.has_exited(),
        "ferry exited on its own\n{}",
        ferry.log_tail(40)
    );
    let status = ferry.status_json();
    let drainer = &status["drainers"][0];
    (
        drainer["state"].as_str().unwrap_or_default().to_string(),
        drainer["last_error"].as_str().map(str::to_string),
    )
}

/// Watches the applier while the target is away: it must log the failure
/// and `ferry status` must show it OFFLINE with the error. Keeps the target
/// away for at least `pause` (the outage the caller wants) and at most
/// [`NOTICE_GRACE`] more while the failure is not seen yet: on a loaded box
/// the applier may have no batch in flight for a while (the stages before
/// it stall too), and it only finds the target gone when it next writes.
/// Returns the error status showed.
fn applier_failure_seen(
    ferry: &FerryProcess,
    mark: u64,
    pause: Duration,
) -> Result<String, String> {
    let start = Instant::now();
    let mut logged = false;
    let mut shown = None;
    let mut last_state = None;
    loop {
        logged = logged || ferry.log_since(mark).contains(APPLY_FAILED);
        if shown.is_none() {
            let state = applier_state(ferry);
            if let ("OFFLINE", Some(error)) = (state.0.as_str(), &state.1) {
                shown = Some(error.clone());
            }
            last_state = Some(state);
        }
        let waited = start.elapsed();
        if waited >= pause && ((logged && shown.is_some()) || waited >= pause + NOTICE_GRACE) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match (logged, shown) {
        (true, Some(error)) => Ok(error),
        (logged, shown) => Err(format!(
            "within {:?}: {APPLY_FAILED:?} logged: {logged}; status OFFLINE with an error: \
             {shown:?} (last state {last_state:?})\n{}",
            pause + NOTICE_GRACE,
            ferry.log_tail(40)
        )),
    }
}

/// How much longer than the planned outage [`applier_failure_seen`] keeps
/// the target away for the applier to notice it.
const NOTICE_GRACE: Duration = Duration::from_secs(10);

#[test]
fn paused_target_resumes_without_loss() {
    target_outage(
        "paused_target_resumes_without_loss",
        &[],
        2,
        |target, ferry, _rng| {
            let mark = ferry.log_len();
            signal(target.pid(), "STOP");
            let seen = applier_failure_seen(ferry, mark, Duration::from_secs(3));
            signal(target.pid(), "CONT");
            let error = seen.unwrap_or_else(|why| panic!("the frozen target: {why}"));
            println!("status showed OFFLINE: {error}");
        },
    );
}

/// The target SIGKILLed `kills` times at random moments under the mixed
/// load, down 0.5 to 1.5 s each time, and started again on its port from
/// its AOF (`appendfsync` = `fsync`). With `always` it comes back with
/// everything it acknowledged; with `everysec` it may come back without its
/// last second, but data and checkpoint still from the same moment (one
/// `MULTI`/`EXEC`), so the applier must send exactly what it lost again.
fn aof_target_sigkill_loop(test: &str, fsync: &str, kills: usize) {
    target_outage(
        test,
        &["--appendonly", "yes", "--appendfsync", fsync],
        kills,
        |target, ferry, rng| {
            let mark = ferry.log_len();
            target.kill9();
            let down = rng.millis(500, 1500);
            let seen = applier_failure_seen(ferry, mark, down);
            target.spawn();
            let error = seen.unwrap_or_else(|why| panic!("the target down: {why}"));
            println!("status showed OFFLINE: {error}");
        },
    );
}

#[test]
fn aof_always_target_survives_sigkills() {
    aof_target_sigkill_loop("aof_always_target_survives_sigkills", "always", 2);
}

#[test]
fn aof_everysec_target_survives_sigkills() {
    aof_target_sigkill_loop("aof_everysec_target_survives_sigkills", "everysec", 2);
}

/// Long variant: ten kills of an `appendfsync always` target, then ten of
/// an `everysec` one.
/// Run: `cargo test --test crash -- --ignored aof_target_sigkill_loops_long`.
#[test]
#[ignore = "long: cargo test --test crash -- --ignored aof_target_sigkill_loops_long"]
fn aof_target_sigkill_loops_long() {
    aof_target_sigkill_loop("aof_target_sigkill_loops_long/always", "always", 10);
    aof_target_sigkill_loop("aof_target_sigkill_loops_long/everysec", "everysec", 10);
}

/// Copies the target's AOF directory aside (`cp -a`, as a backup taken
/// while it runs: the last command may be cut, which `aof-load-truncated`
/// drops on load).
fn copy_aof(target: &FixedPortRedis) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("temp dir");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(target.dir.path().join("appendonlydir"))
        .arg(copy.path())
        .status()
        .expect("cp");
    assert!(status.success(), "cp -a appendonlydir: {status}");
    copy
}

/// Replaces the (stopped) target's AOF directory with `copy`.
fn restore_aof(target: &FixedPortRedis, copy: &tempfile::TempDir) {
    let live = target.dir.path().join("appendonlydir");
    std::fs::remove_dir_all(&live).expect("remove appendonlydir");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(copy.path().join("appendonlydir"))
        .arg(target.dir.path())
        .status()
        .expect("cp");
    assert!(status.success(), "cp -a appendonlydir back: {status}");
}

/// What `appendfsync everysec` allows a target to lose in a machine crash:
/// the target killed and started again from a copy of its AOF taken
/// 0.3 to 1.2 s earlier (a SIGKILL of the process alone loses nothing, the
/// kernel still writes what Redis wrote). Its data and checkpoint are from
/// the copy's moment (one `MULTI`/`EXEC`), behind what the drainer saw
/// acknowledged; the applier must notice, send exactly the lost batches
/// again, and nothing twice. Two rounds.
///
/// Without `retain-applied` (entries acked for retention at once) the
/// entries after the restored checkpoint are trimmed already and the node
/// stops with the fatal gap error instead.
#[test]
fn target_losing_its_last_second_gets_it_again() {
    target_rollback_loop("target_losing_its_last_second_gets_it_again", 2);
}

/// Long variant: ten rounds.
/// Run: `cargo test --test crash -- --ignored target_losing_its_last_second_many_times_long`.
#[test]
#[ignore = "long: cargo test --test crash -- --ignored target_losing_its_last_second_many_times_long"]
fn target_losing_its_last_second_many_times_long() {
    target_rollback_loop("target_losing_its_last_second_many_times_long", 10);
}

fn target_rollback_loop(test: &str, rounds: usize) {
    let mut behind = 0;
    target_outage(
        test,
        &["--appendonly", "yes", "--appendfsync", "everysec"],
        rounds,
        |target, ferry, rng| {
            let copy = copy_aof(target);
            std::thread::sleep(rng.millis(300, 1200));
            let mark = ferry.log_len();
            target.kill9();
            restore_aof(target, &copy);
            let seen = applier_failure_seen(ferry, mark, rng.millis(500, 1000));
            target.spawn();
            let error = seen.unwrap_or_else(|why| panic!("the target down: {why}"));
            println!("status showed OFFLINE: {error}");
            wait_until(
                "the applier to report the target back",
                Duration::from_secs(30),
                &[ferry],
                || ferry.log_since(mark).contains(APPLY_BACK),
            );
            if ferry.log_since(mark).contains(TARGET_BEHIND) {
                behind += 1;
            }
        },
    );
    println!("the target came back behind the applied mark {behind} times of {rounds}");
    assert!(
        behind >= 1,
        "the restored copies never put the target behind: the test proves nothing"
    );
}

/// A target without persistence SIGKILLed and started again comes back
/// empty, its checkpoint gone, on the relayed path (`apply-from =
/// "drainer-wal"`). What a non-persistent target lost is not re-sent
/// from the drainer's WAL (docs/ARCHITECTURE.md, "Recovery rules"); pinned
/// here: the applier notices (no checkpoint while the WAL says applied),
/// finds the entries it would need trimmed with no snapshot marker in their
/// place, and the node stops with exit 1 and the fatal gap error saying the
/// target needs a snapshot. Nothing is applied to the empty target: applying
/// the entries still in the WAL on an empty data set would be a silent loss.
/// Then the way out the error names: with the drainer's WAL dir moved away,
/// `ferry sync` starts again, the fresh drainer gets a fallback snapshot
/// from the listener, and the target ends equal to the source.
#[test]
fn empty_target_after_restart_stops_a_relayed_sync() {
    let source = RedisServer::start(SOURCE_ARGS);
    let mut target = FixedPortRedis::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "2000", "pre", "100"]);
    let load = Load::start(&source.addr());
    let dir = tempfile::tempdir().unwrap();
    // Acked (and so trimmable) 200 ms after being applied, trimmed every
    // 200 ms: the snapshot marker is long gone when the target restarts.
    let start = |target: &FixedPortRedis| {
        sync_from(
            dir.path(),
            &source,
            target,
            "apply-from = \"drainer-wal\"",
            "retain-applied = \"200ms\"",
            "retention-interval = \"200ms\"",
        )
    };
    let mut ferry = start(&target);
    wait_first_snapshot_stored(&ferry);
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    std::thread::sleep(Duration::from_millis(1500));
    let mark = ferry.log_len();
    assert!(
        ferry.log_since(0).contains("apply_from=\"drainer-wal\""),
        "{}",
        ferry.log_tail(40)
    );
    target.kill9();
    target.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = ferry.try_exit() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ferry still runs 30 s after its target came back empty\n{}",
            ferry.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let report = load.finish();
    println!("{status}; load {} iterations", report.iterations);
    let log = ferry.log_since(mark);
    assert_eq!(status.code(), Some(1), "{}", ferry.log_tail(40));
    for needle in [
        TARGET_BEHIND,
        GAP,
        "the target needs a snapshot",
        "stopping the node",
    ] {
        assert!(
            log.contains(needle),
            "{needle:?} not logged\n{}",
            ferry.log_tail(40)
        );
    }
    let mut conn = connect(&target.addr());
    assert_eq!(
        conn.call(&["DBSIZE"]).expect("DBSIZE").int(),
        0,
        "something was applied to the empty target"
    );
    drop(ferry);

    let lost = dir.path().join("drainer-wal-of-the-lost-target");
    std::fs::rename(dir.path().join("sync").join("drainer"), &lost).unwrap();
    let ferry = start(&target);
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    assert!(
        ferry.log_since(0).contains(FALLBACK_SNAPSHOT),
        "the fresh drainer was not sent a fallback snapshot\n{}",
        ferry.log_tail(40)
    );
    // Seen failing once in CI (a counter short after the fallback
    // snapshot) and never since: keep the whole run's log of a failure.
    let counted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_counters("target resynced", &report, &source.addr(), &target.addr())
    }));
    if let Err(panic) = counted {
        eprintln!(
            "ferry's log of the resync:\n{}\nthe run before it ({}):\n{}",
            ferry.log_tail(400),
            lost.display(),
            log.lines()
                .rev()
                .take(200)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::panic::resume_unwind(panic);
    }
    assert_verify_clean("target resynced", &source.url(), &target.url(), || {
        ferry.log_tail(40)
    });
}

/// The same target loss with `ferry sync` applying from the listener's WAL
/// (the default): the log no longer holds what the empty target needs, so
/// the applier asks the listener for a fallback snapshot and loads it in
/// place of the lost data, and the sync goes on without an operator. Then
/// ferry is SIGKILLed while such a load runs (the target's checkpoint says
/// `loading=M`, and `M` is no marker in the listener's log): the next run
/// takes another fallback snapshot instead of applying entries on a
/// half-loaded target. Every counter exact, the target equal to the source.
#[test]
fn empty_target_after_restart_gets_a_fallback_snapshot() {
    let source = RedisServer::start(SOURCE_ARGS);
    let mut target = FixedPortRedis::start(&[]);
    // Big enough that a load takes a while to catch in the middle.
    source.cmd(&["DEBUG", "POPULATE", "300000", "pre", "100"]);
    let load = Load::start(&source.addr());
    let dir = tempfile::tempdir().unwrap();
    let start = |target: &FixedPortRedis| {
        sync_with_config(
            dir.path(),
            &source,
            target,
            "retain-applied = \"200ms\"",
            "retention-interval = \"200ms\"",
        )
    };
    let mut ferry = start(&target);
    wait_first_snapshot_stored(&ferry);
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    assert!(
        ferry.log_since(0).contains("apply_from=\"listener-wal\""),
        "{}",
        ferry.log_tail(40)
    );
    std::thread::sleep(Duration::from_millis(1500));

    // 1. The target comes back empty: a fallback snapshot, no stop.
    let mark = ferry.log_len();
    target.kill9();
    target.spawn();
    wait_until(
        "a fallback snapshot taken for the empty target",
        Duration::from_secs(60),
        &[&ferry],
        || ferry.log_since(mark).contains(FALLBACK_TAKEN),
    );
    let log = ferry.log_since(mark);
    for needle in [TARGET_BEHIND, ASKS_FALLBACK] {
        assert!(
            log.contains(needle),
            "{needle:?} not logged\n{}",
            ferry.log_tail(40)
        );
    }
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    assert_no_fatal(&ferry);

    // 2. Empty again, and ferry killed in the middle of the load.
    // Connects anew each time: the target is killed in between.
    let target_addr = target.addr();
    let checkpoint = || read_checkpoint(&target_addr);
    let mut caught = 0;
    for round in 0..3 {
        let mark = ferry.log_len();
        target.kill9();
        target.spawn();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if checkpoint().contains("loading=") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no load seen\n{}",
                ferry.log_since(mark)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        kill9_running(&mut ferry, "ferry mid-load");
        let value = checkpoint();
        println!("round {round}: killed with the checkpoint at {value:?}");
        ferry = start(&target);
        wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
        if value.contains("loading=") {
            caught += 1;
            assert!(
                ferry.log_since(0).contains(FALLBACK_WAS_LOADING),
                "round {round}: the restarted sync did not replace the fallback that was loading\n{}",
                ferry.log_tail(40)
            );
        }
        assert_no_fatal(&ferry);
    }
    assert!(
        caught > 0,
        "no kill landed mid-load: the test proves nothing"
    );
    assert_exact_end("target reloaded", load, &source, &target, &ferry);
}

/// A target paused for longer than `wal-ttl` while the source keeps
/// writing (`ferry sync`, applying from the listener's WAL): the entries
/// it needs are trimmed before it is back, so the applier loads a fallback
/// snapshot instead (a stopped relay would have shipped one), and the
/// counters come out exact.
#[test]
fn a_target_paused_past_wal_ttl_gets_a_fallback_snapshot() {
    let (source, target, load) = servers_under_load();
    let dir = tempfile::tempdir().unwrap();
    let ferry = short_ttl_sync(dir.path(), &source, &target);
    wait_first_snapshot_stored(&ferry);
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    let mark = ferry.log_len();
    signal(target.pid(), "STOP");
    std::thread::sleep(Duration::from_secs(5));
    signal(target.pid(), "CONT");
    wait_until(
        "a fallback snapshot after the pause",
        Duration::from_secs(60),
        &[&ferry],
        || ferry.log_since(mark).contains(FALLBACK_TAKEN),
    );
    assert!(
        !ferry.log_since(mark).contains(TARGET_BEHIND),
        "the paused target kept its data: {}",
        ferry.log_tail(40)
    );
    assert_exact_end("after the pause", load, &source, &target, &ferry);
}

/// `ferry stop-sync` on a `ferry sync` that applies from the listener's
/// WAL stops the applier (the listener goes on); the stop survives a
/// SIGKILL and restart of ferry; the source writes meanwhile for longer
/// than `wal-ttl`, so after `ferry restart-sync` the entries the target
/// needs are gone and a fallback snapshot replaces them. Counters exact.
#[test]
fn a_stopped_sync_past_wal_ttl_restarts_with_a_fallback_snapshot() {
    let (source, target, load) = servers_under_load();
    let dir = tempfile::tempdir().unwrap();
    let start = || short_ttl_sync(dir.path(), &source, &target);
    let mut ferry = start();
    wait_first_snapshot_stored(&ferry);
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    let control = |verb: &str, ferry: &FerryProcess| {
        let out = std::process::Command::new(common::ferry::ferry_bin())
            .args([verb, "--admin", &ferry.admin_addr(Duration::from_secs(10))])
            .output()
            .expect("ferry control");
        assert!(
            out.status.success(),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let state = |ferry: &FerryProcess| ferry.status_json()["drainers"][0]["state"].clone();
    assert_eq!(
        control("stop-sync", &ferry),
        "stopped 1 sync (selected: all)\n"
    );
    assert_eq!(state(&ferry), "STOPPED");
    // Let the batch in flight land, then the target must stand still.
    std::thread::sleep(Duration::from_millis(500));
    let mut checkpoint = checkpoint_reader(&target.addr(), "__ferry:checkpoint:ferry:0");
    let held = checkpoint();
    std::thread::sleep(Duration::from_secs(2));
    kill9_running(&mut ferry, "ferry, stopped");
    let mark = ferry.log_len();
    ferry = start();
    wait_until(
        "the restarted ferry to say the sync is stopped",
        Duration::from_secs(30),
        &[&ferry],
        || ferry.log_since(mark).contains("sync is stopped"),
    );
    assert_eq!(state(&ferry), "STOPPED");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        checkpoint(),
        held,
        "the target moved while the sync was stopped"
    );
    let mark = ferry.log_len();
    assert_eq!(
        control("restart-sync", &ferry),
        "restarted 1 sync (selected: all)\n"
    );
    wait_until(
        "a fallback snapshot for the expired entries",
        Duration::from_secs(60),
        &[&ferry],
        || ferry.log_since(mark).contains(FALLBACK_TAKEN),
    );
    assert!(ferry.log_since(mark).contains(ASKS_FALLBACK));
    assert_exact_end("after restart-sync", load, &source, &target, &ferry);
}

/// A data dir made by a ferry that relayed through a drainer WAL (here:
/// `apply-from = "drainer-wal"`) keeps that path when started with the
/// default `apply-from = "auto"`: its target's checkpoints count the drainer
/// WAL's log, so switching would need a full sync. It resumes where it was,
/// without one. Then `apply-from = "listener-wal"` switches it: the
/// target's checkpoint counts the drainer WAL's log ids, so the applier
/// loads a snapshot (the marker the listener's log starts with, or a
/// fallback) instead of resuming by id. The counters come out exact.
#[test]
fn a_relayed_data_dir_keeps_its_path() {
    let source = RedisServer::start(SOURCE_ARGS);
    let target = FixedPortRedis::start(&[]);
    let load = Load::start(&source.addr());
    let dir = tempfile::tempdir().unwrap();
    let mut ferry = sync_from(
        dir.path(),
        &source,
        &target,
        "apply-from = \"drainer-wal\"",
        "",
        "",
    );
    wait_first_snapshot_stored(&ferry);
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    kill9_running(&mut ferry, "ferry, relayed");
    let mark = ferry.log_len();
    let ferry = sync_with_config(dir.path(), &source, &target, "", "");
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    let log = ferry.log_since(mark);
    for needle in ["keeping the relayed path", "apply_from=\"drainer-wal\""] {
        assert!(
            log.contains(needle),
            "{needle:?} not logged\n{}",
            ferry.log_tail(40)
        );
    }
    assert!(!log.contains(FULL_SYNC_STARTED), "{}", ferry.log_tail(40));
    let mut ferry = ferry;
    kill9_running(&mut ferry, "ferry, relayed again");
    let mark = ferry.log_len();
    let ferry = sync_from(
        dir.path(),
        &source,
        &target,
        "apply-from = \"listener-wal\"",
        "",
        "",
    );
    // The listener's log may still start with its first marker (loaded
    // then), or not any more (a fallback snapshot then).
    let replaced = [
        "loading the snapshot this WAL starts with",
        "loading a fallback snapshot of the source in place of what it holds",
    ];
    wait_until(
        "a snapshot in place of the drainer WAL's checkpoint",
        Duration::from_secs(60),
        &[&ferry],
        || {
            let log = ferry.log_since(mark);
            replaced.iter().any(|needle| log.contains(needle)) && log.contains("snapshot loaded")
        },
    );
    assert!(
        ferry
            .log_since(mark)
            .contains("the drainer WAL of the relayed path is no longer used and was moved aside"),
        "{}",
        ferry.log_tail(40)
    );
    assert!(!dir.path().join("sync").join("drainer").exists());
    let report = load.finish();
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    assert_no_fatal(&ferry);
    assert_counters("after the switch", &report, &source.addr(), &target.addr());
}

/// A full resync loaded while the listener stores it (`ferry sync`, a
/// standalone source): the target fills before the listener has the whole
/// RDB. ferry is SIGKILLed in the middle of such a load, three times: each
/// restart finds `loading=1` on the target with no marker there (the epoch
/// it was loading was never finished), the listener takes the source's full
/// resync again and the applier loads the new epoch, again as it comes.
/// Under a write load; the counters come out exact.
#[test]
fn a_full_resync_is_loaded_while_it_is_stored() {
    // The source makes its RDB slowly (20 us per key), sent as it is made.
    let mut args = SOURCE_ARGS.to_vec();
    args.extend(["--rdb-key-save-delay", "20"]);
    let source = RedisServer::start(&args);
    let target = FixedPortRedis::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "100000", "pre", "100"]);
    let load = Load::start(&source.addr());
    let dir = tempfile::tempdir().unwrap();
    let start = || sync_with_config(dir.path(), &source, &target, "", "");
    let target_addr = target.addr();
    let checkpoint = || read_checkpoint(&target_addr);
    let mut ferry = start();
    let mut overlapped = 0;
    for round in 0..4 {
        let mark = ferry.log_len();
        // Keys loaded by this run while its listener is still receiving
        // the RDB.
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = loop {
            let stored = ferry.log_since(mark).contains(FULL_SYNC_STORED);
            let load = ferry.status_json()["drainers"][0]["snapshot_load"].clone();
            let keys = load["keys_loaded"].as_u64().unwrap_or(0);
            if keys > 1000 {
                break !stored && load["done"] == false;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no load seen ({keys} keys, stored: {stored})\n{}",
                ferry.log_since(mark)
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            ferry.log_since(mark).contains(PRELOAD),
            "round {round}: {}",
            ferry.log_tail(40)
        );
        assert!(checkpoint().contains("loading=1 "), "{}", checkpoint());
        println!("round {round}: keys on the target before the RDB was stored: {seen}");
        overlapped += u32::from(seen);
        if round == 3 {
            break;
        }
        kill9_running(&mut ferry, "ferry mid-load");
        let log = ferry.log_since(mark);
        println!(
            "{}",
            log.lines()
                .filter(|l| [
                    FULL_SYNC_STARTED,
                    FULL_SYNC_STORED,
                    PRELOAD,
                    "snapshot loaded"
                ]
                .iter()
                .any(|n| l.contains(n)))
                .collect::<Vec<_>>()
                .join("\n")
        );
        if log.contains(FULL_SYNC_STORED) {
            // The RDB was stored in the moment before the kill: the next
            // run resumes the stream, there is no resync to load.
            ferry = start();
            break;
        }
        ferry = start();
    }
    assert!(overlapped > 0, "the load never ran ahead of the transfer");
    assert_exact_end("after the loads", load, &source, &target, &ferry);
}

/// A target frozen while the applier catches up with big batches (about
/// 2 MiB each): the `EXEC` in flight on the connection the applier gives up
/// on still runs once the target wakes, so the new connection must not read
/// the checkpoint before it and send the same batch again. Five rounds of a
/// 30,000-entry burst, each frozen 150 ms in for 2.5 s.
#[test]
#[ignore = "long: cargo test --test crash -- --ignored"]
fn frozen_target_during_catch_up() {
    let source = RedisServer::start(SOURCE_ARGS);
    let target = FixedPortRedis::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut ferry = sync_with_fast_retries(dir.path(), &source, &target);
    wait_first_snapshot_stored(&ferry);
    wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
    let (mut s, mut t) = (connect(&source.addr()), connect(&target.addr()));
    let big = "x".repeat(2000);
    for round in 0..5 {
        for i in 0..30_000 {
            s.queue(&["INCR", "counter"]);
            s.queue(&["SET", &format!("big:{}", i % 50), &big]);
        }
        s.replies().expect("burst");
        std::thread::sleep(Duration::from_millis(150));
        let at_freeze = get_int(&mut t, "counter");
        let mark = ferry.log_len();
        signal(target.pid(), "STOP");
        let seen = applier_failure_seen(&ferry, mark, Duration::from_millis(2500));
        signal(target.pid(), "CONT");
        if let Err(why) = seen {
            panic!("round {round}: {why}");
        }
        wait_for_fence(&source.addr(), &target.addr(), &[&ferry]);
        let (on_source, on_target) = (get_int(&mut s, "counter"), get_int(&mut t, "counter"));
        println!("round {round}: counter {at_freeze} on the target at the freeze, then {on_target} (source {on_source})");
        assert_eq!(on_target, on_source, "{}", ferry.log_tail(40));
    }
    let found = differences(&source.addr(), &target.addr());
    assert!(found.is_empty(), "{}", found.join("\n"));
    assert_verify_clean(
        "frozen target during catch-up",
        &source.url(),
        &target.url(),
        || ferry.log_tail(40),
    );
    let status = ferry.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}; {}", ferry.log_tail(30));
    assert_no_fatal(&ferry);
}
