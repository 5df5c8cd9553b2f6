//! Test support shared by the crash tests (`tests/crash.rs`,
//! `tests/early_apply.rs`): real `ferry` processes killed and restarted
//! between real redis-servers under a write load ([`super::load`]).
//!
//! - [`Rng`]: the seeded kill schedule (`FERRY_CRASH_SEED` replays one).
//! - [`wait_until`], [`kill9_running`]: waits that name what they wait for
//!   and show the ferry logs when they time out, kills of a process that
//!   must still run.
//! - [`Sampler`]: reads the target while the load runs (a transaction split,
//!   a counter ahead of the source).
//! - [`wait_for_fence`], [`assert_converged`], [`assert_no_fatal`]: the end
//!   of a run (every counter exact, every key equal, `ferry verify` clean).
//! - [`Runs`], [`assert_full_syncs`], [`stored_stats`]: the source's full
//!   syncs counted against the runs of a listener.
//! - [`checkpoint_reader`], [`read_checkpoint`]: the applier's checkpoint on
//!   the target.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::ferry::assert_verify_clean;
use super::ferry::log::{FULL_SYNC_STARTED, FULL_SYNC_STORED, PARTIAL_RESYNC};
use super::ferry::FerryProcess;
use super::load::{assert_counters, Load, LoadReport};
use super::resp::{connect, Conn, Resp};
use super::workload::differences_now;
use super::RedisServer;

/// No diskless delay (7.0 waits 5 s for more replicas by default) and a
/// backlog that covers every outage here, so that a restart never needs a
/// full resync.
pub const SOURCE_ARGS: &[&str] = &[
    "--repl-diskless-sync-delay",
    "0",
    "--repl-backlog-size",
    "256mb",
];

pub fn info_stat(server: &RedisServer, field: &str) -> u64 {
    server
        .info_field(field)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO"))
}

// ---------------------------------------------------------------------------
// Seeded randomness.

pub struct Rng(u64);

impl Rng {
    /// From `FERRY_CRASH_SEED` or the clock; prints the seed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("FERRY_CRASH_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        println!("{test}: FERRY_CRASH_SEED={seed}");
        Rng(seed)
    }

    /// xorshift64.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }

    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

// ---------------------------------------------------------------------------
// Waiting with the logs of the processes involved in the message.

pub fn tails(processes: &[&FerryProcess]) -> String {
    processes
        .iter()
        .map(|process| process.log_tail(40))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn wait_until(
    what: &str,
    timeout: Duration,
    processes: &[&FerryProcess],
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            tails(processes)
        );
        assert!(
            !processes.iter().any(|process| process.has_exited()),
            "a ferry process exited on its own while waiting for {what}\n{}",
            tails(processes)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills `process` with SIGKILL; it must still be running (a process that
/// exited on its own is a crash this test did not cause).
pub fn kill9_running(process: &mut FerryProcess, what: &str) {
    if let Some(status) = process.try_exit() {
        panic!(
            "{what} exited on its own ({status}) before the kill\n{}",
            process.log_tail(60)
        );
    }
    process.kill9();
}

// ---------------------------------------------------------------------------
// The write load and the sampler.

/// What the sampler saw.
#[derive(Debug, Default)]
pub struct Samples {
    /// Samples of a target not loading a snapshot (`a == b` was checked).
    pub consistent: u64,
    /// Samples taken while a snapshot was being loaded (only the
    /// counters' upper bounds were checked).
    pub loading: u64,
    /// Samples the target did not answer (down, paused).
    pub unanswered: u64,
    pub violations: Vec<String>,
}

pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Samples>,
}

impl Sampler {
    /// Samples the target every ~25 ms. `checkpoint_key` tells whether the
    /// target is loading a snapshot (then its data set is partial by design).
    pub fn start(source: &str, target: &str, checkpoint_key: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (source, target, key) = (
            source.to_string(),
            target.to_string(),
            checkpoint_key.to_string(),
        );
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut samples = Samples::default();
                let mut source_conn = connect(&source);
                let mut target_conn: Option<Conn> = None;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(25));
                    let conn = match target_conn.as_mut() {
                        Some(conn) => conn,
                        None => match Conn::connect(&target, Duration::from_millis(500)) {
                            Ok(conn) => target_conn.insert(conn),
                            Err(_) => {
                                samples.unanswered += 1;
                                continue;
                            }
                        },
                    };
                    conn.queue(&["MULTI"]);
                    conn.queue(&["GET", &key]);
                    conn.queue(&["MGET", "a", "b", "counter"]);
                    conn.queue(&["LLEN", "list"]);
                    conn.queue(&["XLEN", "stream"]);
                    conn.queue(&["EXEC"]);
                    let exec = match conn.replies() {
                        Ok(mut replies) => match replies.swap_remove(5) {
                            exec @ Resp::Array(Some(_)) => exec,
                            // -LOADING while a restarted target reads its AOF.
                            _ => {
                                samples.unanswered += 1;
                                continue;
                            }
                        },
                        Err(_) => {
                            // Timed out or refused: a new connection next time.
                            target_conn = None;
                            samples.unanswered += 1;
                            continue;
                        }
                    };
                    // Read the source after the target: the source's values
                    // only grow, so a target ahead of them applied twice.
                    source_conn.queue(&["GET", "counter"]);
                    source_conn.queue(&["LLEN", "list"]);
                    source_conn.queue(&["XLEN", "stream"]);
                    let source_values = source_conn.replies().expect("the source answers");
                    let items = exec.items();
                    let checkpoint = items[0].text();
                    let values = items[1].items();
                    let int =
                        |reply: &Resp| reply.text().map_or(0, |t| t.parse::<i64>().unwrap_or(-1));
                    let (a, b, counter) = (int(&values[0]), int(&values[1]), int(&values[2]));
                    let (llen, xlen) = (items[2].int(), items[3].int());
                    let source_counter = int(&source_values[0]);
                    let (source_llen, source_xlen) =
                        (source_values[1].int(), source_values[2].int());
                    let loading = checkpoint
                        .as_deref()
                        .is_some_and(|c| c.contains("loading="));
                    if loading {
                        samples.loading += 1;
                    } else {
                        samples.consistent += 1;
                        if a != b {
                            samples.violations.push(format!(
                                "a={a} b={b} on the target (checkpoint {checkpoint:?}): a transaction was split"
                            ));
                        }
                    }
                    for (what, on_target, on_source) in [
                        ("counter", counter, source_counter),
                        ("LLEN list", llen, source_llen),
                        ("XLEN stream", xlen, source_xlen),
                    ] {
                        if on_target > on_source {
                            samples.violations.push(format!(
                                "{what} is {on_target} on the target but {on_source} on the source (checkpoint {checkpoint:?}): applied twice"
                            ));
                        }
                    }
                }
                samples
            }
        });
        Sampler { stop, thread }
    }

    pub fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler thread")
    }
}

// ---------------------------------------------------------------------------
// Convergence and the key-by-key comparison.

/// Waits until a fresh `ferry sync` stored its first full sync.
pub fn wait_first_snapshot_stored(ferry: &FerryProcess) {
    wait_until(
        "the first full sync to be stored",
        Duration::from_secs(60),
        &[ferry],
        || ferry.log_since(0).contains(FULL_SYNC_STORED),
    );
}

/// Writes a fence key to the source and waits until the target has it: the
/// log is applied in order, so everything written before is applied too.
pub fn wait_for_fence(source: &str, target: &str, processes: &[&FerryProcess]) {
    let fence = format!(
        "{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    connect(source)
        .call(&["SET", "crash:fence", &fence])
        .expect("SET fence");
    let mut target_conn: Option<Conn> = None;
    wait_until(
        "the target to apply the fence key (everything written before it)",
        Duration::from_secs(60),
        processes,
        || {
            if target_conn.is_none() {
                target_conn = Conn::connect(target, Duration::from_secs(2)).ok();
            }
            let Some(conn) = target_conn.as_mut() else {
                return false;
            };
            // The fence can also arrive inside a snapshot (a fallback taken
            // after it was written), whose other keys may still be loading:
            // then only a checkpoint past `loading=` says all of it is there.
            let seen = conn
                .call(&["GET", "crash:fence"])
                .map(|reply| reply.text().as_deref() == Some(fence.as_str()))
                .and_then(|seen| Ok(seen && !loading(conn)?));
            match seen {
                Ok(seen) => seen,
                Err(_) => {
                    target_conn = None;
                    false
                }
            }
        },
    );
}

/// Whether a ferry checkpoint on the target says a snapshot is loading.
pub fn loading(conn: &mut Conn) -> std::io::Result<bool> {
    let keys = conn.call(&["KEYS", "__ferry:checkpoint:*"])?;
    for key in keys.items() {
        let Some(key) = key.text() else { continue };
        if conn
            .call(&["GET", &key])?
            .text()
            .is_some_and(|value| value.contains("loading="))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Differences between source and target in every db (type, digest, TTL,
/// stream state, function libraries; `__ferry*` keys aside), at most 20.
pub fn differences(source: &str, target: &str) -> Vec<String> {
    let mut found = differences_now(&format!("redis://{source}"), &format!("redis://{target}"));
    let total = found.len();
    found.truncate(20);
    if total > found.len() {
        found.push(format!("... {total} differences in all"));
    }
    found
}

/// Load after the last restart, before the fence.
pub const SETTLE: Duration = Duration::from_millis(500);

/// The end of a kill loop: the load runs [`SETTLE`] more and stops, the
/// fence arrives, and everything [`assert_converged`] checks holds.
pub fn finish_converged(
    load: Load,
    sampler: Sampler,
    source: &str,
    target: &str,
    processes: &[&FerryProcess],
) -> LoadReport {
    std::thread::sleep(SETTLE);
    let report = load.finish();
    wait_for_fence(source, target, processes);
    let samples = sampler.finish();
    println!("{report:?}; {samples:?}");
    assert_converged(source, target, &report, &samples, processes);
    report
}

/// Everything that must hold once the load stopped and the fence arrived:
/// the load's counters (none lost, none applied twice), the list and the
/// stream entry by entry, every key of every db equal, the sampler's
/// observations, and `ferry verify` clean.
pub fn assert_converged(
    source: &str,
    target: &str,
    load: &LoadReport,
    samples: &Samples,
    processes: &[&FerryProcess],
) {
    assert_counters("crash", load, source, target);
    let (mut s, mut t) = (connect(source), connect(target));
    let range = |conn: &mut Conn, args: &[&str]| conn.call(args).expect("range").items().to_vec();
    let source_list = range(&mut s, &["LRANGE", "list", "0", "-1"]);
    let target_list = range(&mut t, &["LRANGE", "list", "0", "-1"]);
    assert_eq!(
        source_list.len() as u64,
        load.iterations,
        "one LPUSH per iteration"
    );
    assert!(
        source_list == target_list,
        "the list differs: {} elements on the source, {} on the target",
        source_list.len(),
        target_list.len()
    );
    let stream_ids = |conn: &mut Conn| -> Vec<String> {
        range(conn, &["XRANGE", "stream", "-", "+"])
            .iter()
            .map(|entry| entry.items()[0].text().expect("stream id"))
            .collect()
    };
    let (source_ids, target_ids) = (stream_ids(&mut s), stream_ids(&mut t));
    assert_eq!(
        source_ids.len() as u64,
        load.iterations,
        "one XADD per iteration"
    );
    assert!(
        source_ids == target_ids,
        "the stream differs: {} entries on the source, {} on the target",
        source_ids.len(),
        target_ids.len()
    );
    let found = differences(source, target);
    assert!(
        found.is_empty(),
        "the target differs from the source:\n{}\n{}",
        found.join("\n"),
        tails(processes)
    );
    assert!(
        samples.violations.is_empty(),
        "the sampler saw:\n{}\n{}",
        samples.violations[..samples.violations.len().min(20)].join("\n"),
        tails(processes)
    );
    assert!(
        samples.consistent >= 20,
        "too few samples of the target to mean anything: {samples:?}"
    );
    assert_verify_clean(
        "crash",
        &format!("redis://{source}"),
        &format!("redis://{target}"),
        || tails(processes),
    );
}

/// Fatal errors and panics in a node's log (a node that stopped itself
/// would be restarted by the next spawn and go unnoticed otherwise).
pub fn assert_no_fatal(process: &FerryProcess) {
    let log = process.log_since(0);
    for needle in ["stopping the node", "panicked", " ERROR "] {
        assert!(
            !log.contains(needle),
            "{needle:?} in the log of a node\n{}",
            log.lines()
                .filter(|line| line.contains(needle))
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// The full-sync accounting of a listener killed and restarted.

/// The runs of a listener process: the log mark taken before each start.
pub struct Runs {
    marks: Vec<u64>,
}

impl Runs {
    /// The first run starts with the log.
    pub fn first() -> Runs {
        Runs { marks: vec![0] }
    }

    /// Call right before every (re)start of the listener.
    pub fn starting(&mut self, process: &FerryProcess) {
        self.marks.push(process.log_len());
    }

    /// The log of every run so far, in order.
    pub fn logs(&self, process: &FerryProcess) -> Vec<String> {
        let all = process.log_since(0).into_bytes();
        self.marks
            .iter()
            .enumerate()
            .map(|(index, &start)| {
                let end = self.marks.get(index + 1).map_or(all.len(), |&m| m as usize);
                String::from_utf8_lossy(&all[start as usize..end]).into_owned()
            })
            .collect()
    }

    pub fn current(&self, process: &FerryProcess) -> String {
        process.log_since(*self.marks.last().expect("started"))
    }
}

/// Checks what the source's `sync_full` may have done, given which runs of
/// the listener started, stored or resumed a full sync:
///
/// - A run without a stored snapshot asks `PSYNC ? -1`: `sync_full` + 1 if
///   it got that far (a run killed before it asked adds nothing, one killed
///   after the source counted but before the listener logged adds 1
///   without a log line). So before the first stored snapshot,
///   `sync_full` grew by at least the runs that logged a full resync and at
///   most the runs started.
/// - From the run that stored the first snapshot on, every start resumes
///   with `PSYNC <replid> <offset>`: `sync_full` does not move and
///   `sync_partial_ok` grows by at least the runs that logged a partial
///   resync.
///
/// Returns (runs killed while the RDB was being stored, resumed runs).
pub fn assert_full_syncs(
    runs: &Runs,
    listener: &FerryProcess,
    full_start: u64,
    full_at_stored: u64,
    partial_at_stored: u64,
    source: &RedisServer,
) -> (usize, usize) {
    let logs = runs.logs(listener);
    let stored_run = logs
        .iter()
        .position(|log| log.contains(FULL_SYNC_STORED))
        .unwrap_or_else(|| panic!("no run stored a full sync\n{}", listener.log_tail(40)));
    let logged_full = logs[..=stored_run]
        .iter()
        .filter(|log| log.contains(FULL_SYNC_STARTED))
        .count() as u64;
    let killed_mid_transfer = logs[..stored_run]
        .iter()
        .filter(|log| log.contains(FULL_SYNC_STARTED))
        .count();
    let grew = full_at_stored - full_start;
    println!(
        "full syncs: {} runs before the first stored snapshot, {logged_full} logged a full resync, sync_full +{grew}",
        stored_run + 1
    );
    assert!(
        (logged_full..=stored_run as u64 + 1).contains(&grew),
        "sync_full grew by {grew} before the first snapshot was stored, with {logged_full} runs \
         logging a full resync out of {} started",
        stored_run + 1
    );
    let after = &logs[stored_run][logs[stored_run]
        .find(FULL_SYNC_STORED)
        .expect("found above")..];
    let later: Vec<&String> = logs[stored_run + 1..].iter().collect();
    assert!(
        !after.contains(FULL_SYNC_STARTED)
            && !later.iter().any(|log| log.contains(FULL_SYNC_STARTED)),
        "a full resync after the first snapshot was stored\n{}",
        listener.log_tail(60)
    );
    assert_eq!(
        info_stat(source, "sync_full"),
        full_at_stored,
        "sync_full moved after the first snapshot was stored"
    );
    let resumed = later
        .iter()
        .filter(|log| log.contains(PARTIAL_RESYNC))
        .count();
    let partial_grew = info_stat(source, "sync_partial_ok") - partial_at_stored;
    println!(
        "resumes: {} runs after the first snapshot, {resumed} logged a partial resync, sync_partial_ok +{partial_grew}",
        later.len()
    );
    assert!(
        partial_grew >= resumed as u64,
        "sync_partial_ok grew by {partial_grew}, fewer than the {resumed} runs that resumed"
    );
    assert!(
        later.last().is_some_and(|log| log.contains(PARTIAL_RESYNC)),
        "the last run did not resume with a partial resync\n{}",
        listener.log_tail(40)
    );
    (killed_mid_transfer, resumed)
}

/// The source's `sync_full` / `sync_partial_ok` once the current run's log
/// says the first full sync is stored (None before).
pub fn stored_stats(
    runs: &Runs,
    listener: &FerryProcess,
    source: &RedisServer,
) -> Option<(u64, u64)> {
    runs.current(listener).contains(FULL_SYNC_STORED).then(|| {
        (
            info_stat(source, "sync_full"),
            info_stat(source, "sync_partial_ok"),
        )
    })
}

// ---------------------------------------------------------------------------
// The target's checkpoint.

/// Reads the applier's checkpoint key on the target ("" when absent).
pub fn checkpoint_reader(target: &str, key: &str) -> impl FnMut() -> String {
    let mut conn = connect(target);
    let key = key.to_string();
    move || {
        conn.call(&["GET", &key])
            .expect("GET checkpoint")
            .text()
            .unwrap_or_default()
    }
}

/// The checkpoint of `ferry sync`'s partition 0 on the target at `addr`,
/// empty when there is none or the target does not answer (it is killed
/// in between: a new connection each time).
pub fn read_checkpoint(addr: &str) -> String {
    Conn::connect(addr, Duration::from_secs(1))
        .and_then(|mut conn| conn.call(&["GET", "__ferry:checkpoint:ferry:0"]))
        .ok()
        .and_then(|reply| reply.text())
        .unwrap_or_default()
}
