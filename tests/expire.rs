//! Expiry like a replica (`[apply] expire-grace`, src/apply/expire.rs),
//! against real redis-server 7.0 processes.
//!
//! - What 7.0 sends ([`redis_7_0_stream_deadlines_reach_the_target_later_by_the_grace`]):
//!   for every command that sets, keeps or drops a TTL (`SET` with each
//!   option, `SETEX`, `PSETEX`, `GETEX`, `EXPIRE` and friends with
//!   `NX`/`XX`/`GT`/`LT`, `PERSIST`, `RESTORE` with and without `ABSTTL`,
//!   `COPY`, `RENAME`, `MULTI`/`EXEC`, a script, a function, past and
//!   extreme deadlines), a replica-side tap (ferry's own PSYNC client)
//!   records what a 7.0 master propagates; the entries go through
//!   [`ExpireGrace::rewrite`] into a second server, and every key's
//!   `PEXPIRETIME` there must be the source's plus the grace, exactly. It
//!   also checks that no relative time is ever on the stream, which is what
//!   the rewrite rules assume.
//! - A refresh near the deadline
//!   ([`a_refresh_near_the_deadline_survives_a_stopped_sync`]): the real
//!   `ferry sync` with keys of a short TTL replicated, `ferry stop-sync`, on
//!   the source an `EXPIRE` and a `PERSIST` shortly before the deadline, a
//!   wait past it, `ferry restart-sync`: both keys are on the target with
//!   the source's new TTL (plus the grace), and a third key that expired on
//!   the source while stopped leaves the target by the source's `DEL`,
//!   though its deadline there is minutes away.
//! - The full sync ([`a_full_sync_loads_deadlines_with_the_grace`]): keys
//!   with a TTL carry the source's deadline plus the grace, and a key
//!   already expired on the source (not yet reclaimed) is loaded too and
//!   leaves by the source's `DEL`.
//! - No grace ([`a_zero_grace_writes_the_sources_deadlines`]):
//!   `expire-grace = "0s"` in the config file of `ferry sync` gives the
//!   source's deadlines.
//!
//! The first two `ferry sync` tests run with the default grace, 5 minutes
//! ([`DEFAULT_GRACE_MS`]); on a build without the grace they fail (the
//! target drops the refreshed key, and loads the source's deadlines).
//!
//! Run: `cargo test --test expire -- --test-threads 2` (about 15 s).

mod common;

use std::process::Command as Process;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::ferry::{assert_verify_clean, ferry_bin, FerryProcess};
use common::workload::{call, connect, find_error, info_u64, integer, show_args, show_frame};
use common::{output_within, RedisServer};
use ferry::apply::expire::{ExpireGrace, DEFAULT_EXPIRE_GRACE};
use ferry::redis::client::Client;
use ferry::redis::command::Command;
use ferry::redis::psync::{PsyncSource, ReplEntry, ReplEvent, ReplicaConfig};
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;

/// `[apply] expire-grace` by default, in ms.
const DEFAULT_GRACE_MS: i64 = 300_000;
/// Longest wait for a replication event, a sync, a state on the target.
const WAIT: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .expect("clock after 1970")
}

/// `PEXPIRETIME key`: unix ms, -1 without a TTL, -2 without the key.
async fn expire_time(client: &mut Client, key: &str) -> i64 {
    integer(&call(client, &["PEXPIRETIME", key]).await)
}

// ---------------------------------------------------------------------------
// What a 7.0 master propagates, through the rewrite, into a target.

/// A replica-side tap on the source: entries as ferry's listener gets them.
struct Tap {
    session: PsyncSource,
    admin: Client,
}

impl Tap {
    /// `PSYNC ? -1` and the (empty) RDB.
    async fn open(source: &RedisServer) -> Tap {
        let cfg = ReplicaConfig::new(RedisUrl::parse(&source.url()).expect("source url"));
        let mut session = PsyncSource::connect(&cfg, None)
            .await
            .unwrap_or_else(|e| panic!("PSYNC ? -1: {e}"));
        loop {
            let event = tokio::time::timeout(WAIT, session.next_event())
                .await
                .expect("a replication event in time")
                .unwrap_or_else(|e| panic!("replication client: {e}"));
            match event {
                ReplEvent::RdbEnd { .. } => break,
                ReplEvent::FullResync { .. } | ReplEvent::RdbChunk(_) => {}
                other => panic!("unexpected event during the full sync: {other:?}"),
            }
        }
        Tap {
            session,
            admin: connect(source).await,
        }
    }

    /// Every entry the source has propagated so far.
    async fn entries(&mut self) -> Vec<ReplEntry> {
        let mut entries = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout(Duration::from_millis(50), self.session.next_event()).await {
                Ok(Ok(ReplEvent::Entry(entry))) => {
                    entries.push(entry);
                    continue;
                }
                Ok(Ok(ReplEvent::Progress { .. })) => continue,
                Ok(Ok(other)) => panic!("unexpected event in the stream: {other:?}"),
                Ok(Err(e)) => panic!("replication client: {e}"),
                Err(_idle) => {}
            }
            let master = info_u64(&mut self.admin, "master_repl_offset").await;
            if self.session.position().offset.0 >= master {
                return entries;
            }
            assert!(Instant::now() < deadline, "the tap never caught up");
        }
    }
}

/// Applies `entries` to `target` the way the applier does: each command
/// through the rewrite, a transaction inside `MULTI`/`EXEC`.
async fn apply(target: &mut Client, grace: ExpireGrace, entries: &[ReplEntry]) {
    for entry in entries {
        let mut cmds = vec![Command::from_parts([
            "SELECT".to_string(),
            entry.db.to_string(),
        ])];
        if entry.transaction {
            cmds.push(Command::from_parts(["MULTI"]));
        }
        cmds.extend(entry.commands.iter().map(|cmd| grace.rewrite(cmd.clone())));
        if entry.transaction {
            cmds.push(Command::from_parts(["EXEC"]));
        }
        let replies = target.pipeline(&cmds).await.expect("target pipeline");
        for (cmd, reply) in cmds.iter().zip(&replies) {
            if let Some(error) = find_error(reply) {
                panic!("the target refused {}: {error}", show_args(&cmd.args));
            }
        }
    }
}

/// Why a propagated command carries a relative time, if it does.
fn relative_time(cmd: &Command) -> Option<String> {
    let upper = |a: &Bytes| a.to_ascii_uppercase();
    let name = upper(&cmd.args[0]);
    let shown = show_args(&cmd.args);
    match name.as_slice() {
        b"EXPIRE" | b"PEXPIRE" | b"EXPIREAT" | b"SETEX" | b"PSETEX" | b"GETEX" => Some(shown),
        b"SET"
            if cmd
                .args
                .iter()
                .skip(3)
                .any(|a| matches!(upper(a).as_slice(), b"EX" | b"PX" | b"EXAT")) =>
        {
            Some(shown)
        }
        b"RESTORE"
            if cmd.args.get(2).is_some_and(|ttl| ttl.as_ref() != b"0")
                && !cmd.args.iter().any(|a| upper(a) == b"ABSTTL") =>
        {
            Some(shown)
        }
        _ => None,
    }
}

/// One step: commands for the source, and the key whose deadline is then
/// compared.
struct Case {
    what: &'static str,
    commands: Vec<Vec<Bytes>>,
    key: &'static str,
}

fn args(parts: &[&str]) -> Vec<Bytes> {
    parts
        .iter()
        .map(|p| Bytes::copy_from_slice(p.as_bytes()))
        .collect()
}

fn case(what: &'static str, key: &'static str, commands: &[&[&str]]) -> Case {
    Case {
        what,
        commands: commands.iter().map(|c| args(c)).collect(),
        key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_7_0_stream_deadlines_reach_the_target_later_by_the_grace() {
    assert_eq!(
        DEFAULT_EXPIRE_GRACE.as_millis() as i64,
        DEFAULT_GRACE_MS,
        "the ferry sync tests below assume the default grace"
    );
    let grace = ExpireGrace::new(DEFAULT_EXPIRE_GRACE);
    let source_server = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target_server = RedisServer::start(&[]);
    let mut tap = Tap::open(&source_server).await;
    let mut source = connect(&source_server).await;
    let mut target = connect(&target_server).await;

    call(&mut source, &["SET", "dumped", "a value"]).await;
    let dump = call(&mut source, &["DUMP", "dumped"])
        .await
        .as_bytes()
        .cloned()
        .expect("DUMP payload");
    let setup = tap.entries().await;
    apply(&mut target, grace, &setup).await;
    let in_s = |secs: i64| (now_ms() / 1000 + secs).to_string();
    let in_ms = |ms: i64| (now_ms() + ms).to_string();
    let max = i64::MAX.to_string();
    let library = "#!lua name=ttllib\n\
        redis.register_function('ttl_set', function(keys, args) \
        redis.call('SET', keys[1], 'x', 'PX', 40000) \
        return redis.call('EXPIRE', keys[1], 80) end)";
    let script = "redis.call('SET', KEYS[1], 'x', 'EX', 50) \
        return redis.call('PEXPIRE', KEYS[1], 70000)";
    let mut cases = vec![
        case("SET EX", "k1", &[&["SET", "k1", "v", "EX", "100"]]),
        case("SET PX", "k2", &[&["SET", "k2", "v", "PX", "100000"]]),
        case(
            "SET EXAT",
            "k3",
            &[&["SET", "k3", "v", "EXAT", &in_s(1000)]],
        ),
        case(
            "SET PXAT",
            "k4",
            &[&["SET", "k4", "v", "PXAT", &in_ms(1_000_000)]],
        ),
        case("SET KEEPTTL", "k4", &[&["SET", "k4", "w", "KEEPTTL"]]),
        case(
            "SET GET EX",
            "k5",
            &[&["SET", "k5", "v"], &["SET", "k5", "w", "GET", "EX", "100"]],
        ),
        case(
            "SET NX EX, then one refused by NX",
            "k6",
            &[
                &["SET", "k6", "v", "NX", "EX", "100"],
                &["SET", "k6", "w", "NX", "EX", "5"],
            ],
        ),
        case(
            "SET XX PX",
            "k6",
            &[&["SET", "k6", "x", "XX", "PX", "200000"]],
        ),
        case("SET without TTL drops it", "k6", &[&["SET", "k6", "y"]]),
        case("SETEX", "k7", &[&["SETEX", "k7", "100", "v"]]),
        case("PSETEX", "k8", &[&["PSETEX", "k8", "100000", "v"]]),
        case("GETEX EX", "k7", &[&["GETEX", "k7", "EX", "200"]]),
        case("GETEX PX", "k7", &[&["GETEX", "k7", "PX", "300000"]]),
        case("GETEX EXAT", "k7", &[&["GETEX", "k7", "EXAT", &in_s(400)]]),
        case(
            "GETEX PXAT",
            "k7",
            &[&["GETEX", "k7", "PXAT", &in_ms(500_000)]],
        ),
        case("GETEX PERSIST", "k7", &[&["GETEX", "k7", "PERSIST"]]),
        case("GETEX without option", "k8", &[&["GETEX", "k8"]]),
        case(
            "EXPIRE",
            "e",
            &[&["SET", "e", "v"], &["EXPIRE", "e", "100"]],
        ),
        case("PEXPIRE", "e", &[&["PEXPIRE", "e", "200000"]]),
        case("EXPIREAT", "e", &[&["EXPIREAT", "e", &in_s(2000)]]),
        case("PEXPIREAT", "e", &[&["PEXPIREAT", "e", &in_ms(3_000_000)]]),
        case(
            "pexpireat as typed",
            "e",
            &[&["pexpireat", "e", &in_ms(3_100_000)]],
        ),
        case("EXPIRE NX refused", "e", &[&["EXPIRE", "e", "10", "NX"]]),
        case("EXPIRE XX", "e", &[&["EXPIRE", "e", "500", "XX"]]),
        case("EXPIRE GT", "e", &[&["EXPIRE", "e", "600", "GT"]]),
        case("EXPIRE GT refused", "e", &[&["EXPIRE", "e", "60", "GT"]]),
        case("EXPIRE LT", "e", &[&["EXPIRE", "e", "60", "LT"]]),
        case("PERSIST", "e", &[&["PERSIST", "e"]]),
        case("EXPIRE NX", "e", &[&["EXPIRE", "e", "70", "NX"]]),
        case(
            "PEXPIRE far away",
            "e",
            &[&["PEXPIRE", "e", "9000000000000000000"]],
        ),
        case("PEXPIREAT i64::MAX", "e", &[&["PEXPIREAT", "e", &max]]),
        case(
            "EXPIREAT in the past deletes",
            "p",
            &[&["SET", "p", "v"], &["EXPIREAT", "p", "1"]],
        ),
        case(
            "SET PXAT in the past",
            "q",
            &[&["SET", "q", "v", "PXAT", "1000"]],
        ),
        case("COPY keeps the TTL", "c1", &[&["COPY", "k1", "c1"]]),
        case("RENAME keeps the TTL", "c2", &[&["RENAME", "c1", "c2"]]),
        case(
            "MULTI/EXEC",
            "t",
            &[
                &["MULTI"],
                &["SET", "t", "v", "EX", "100"],
                &["EXPIRE", "t", "300"],
                &["EXPIRE", "t", "10", "NX"],
                &["EXEC"],
            ],
        ),
        case("EVAL", "s", &[&["EVAL", script, "1", "s"]]),
        case(
            "FCALL",
            "f",
            &[
                &["FUNCTION", "LOAD", library],
                &["FCALL", "ttl_set", "1", "f"],
            ],
        ),
    ];
    let restore = |key: &'static str, ttl: String, extra: &[&str]| {
        let mut cmd = args(&["RESTORE", key, &ttl]);
        cmd.push(dump.clone());
        cmd.extend(args(extra));
        cmd
    };
    cases.extend([
        Case {
            what: "RESTORE with a relative TTL",
            commands: vec![restore("r1", "50000".into(), &[])],
            key: "r1",
        },
        Case {
            what: "RESTORE ABSTTL",
            commands: vec![restore("r2", in_ms(60_000), &["ABSTTL"])],
            key: "r2",
        },
        Case {
            what: "RESTORE without TTL",
            commands: vec![restore("r3", "0".into(), &[])],
            key: "r3",
        },
        Case {
            what: "RESTORE REPLACE IDLETIME",
            commands: vec![restore(
                "r1",
                "70000".into(),
                &["REPLACE", "IDLETIME", "10"],
            )],
            key: "r1",
        },
    ]);

    let mut propagated = Vec::new();
    for case in &cases {
        for cmd in &case.commands {
            let reply = call(&mut source, &cmd[..]).await;
            assert!(
                find_error(&reply).is_none(),
                "{}: the source refused {}: {}",
                case.what,
                show_args(cmd),
                show_frame(&reply)
            );
        }
        let entries = tap.entries().await;
        apply(&mut target, grace, &entries).await;
        let on_stream: Vec<String> = entries
            .iter()
            .flat_map(|entry| entry.commands.iter())
            .map(|cmd| {
                if let Some(relative) = relative_time(cmd) {
                    panic!("{}: a relative time on the stream: {relative}", case.what);
                }
                let shown: Vec<&[u8]> = cmd
                    .args
                    .iter()
                    .map(|arg| {
                        if *arg == dump {
                            b"<dump>"
                        } else {
                            arg.as_ref()
                        }
                    })
                    .collect();
                show_args(&shown)
            })
            .collect();
        // Reading the source's deadline may expire the key there, which
        // propagates a DEL: the target gets it before its deadline is read.
        let at_source = expire_time(&mut source, case.key).await;
        let entries = tap.entries().await;
        apply(&mut target, grace, &entries).await;
        let at_target = expire_time(&mut target, case.key).await;
        let expected = if at_source < 0 {
            at_source
        } else {
            at_source.saturating_add(DEFAULT_GRACE_MS)
        };
        assert_eq!(
            at_target,
            expected,
            "{}: PEXPIRETIME {} on the source ({} on the stream)",
            case.what,
            at_source,
            on_stream.join(" | ")
        );
        propagated.push(format!("{:<40} {}", case.what, on_stream.join(" | ")));
    }
    println!("what Redis 7.0 propagates:\n{}", propagated.join("\n"));
}

// ---------------------------------------------------------------------------
// The real `ferry sync`.

/// `ferry <verb> --admin ADDR`, which must succeed.
fn control(verb: &str, ferry: &FerryProcess) {
    let admin = ferry.admin_addr(WAIT);
    let out = output_within(
        Process::new(ferry_bin()).args([verb, "--admin", &admin]),
        Duration::from_secs(20),
    )
    .expect("ferry ran");
    assert!(
        out.status.success(),
        "ferry {verb}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ferry.log_tail(30)
    );
}

/// Polls the async condition `$check` every 50 ms; panics naming `$what`,
/// with the ferry log, after [`WAIT`].
macro_rules! wait_for {
    ($what:expr, $ferry:expr, $check:expr) => {{
        let deadline = Instant::now() + WAIT;
        while !$check {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {}\n{}",
                $what,
                $ferry.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

/// After `stop-sync`: waits until the applier stopped (`ferry sync` applies
/// from the listener's WAL: its row says STOPPED) or, on the relayed path,
/// the drainer has applied everything it holds, and the target's
/// checkpoint has not moved for a second.
async fn wait_stopped(ferry: &FerryProcess, target: &mut Client, checkpoint: &str) {
    let deadline = Instant::now() + WAIT;
    let mut last = call(target, &["GET", checkpoint]).await;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = call(target, &["GET", checkpoint]).await;
        if now != last {
            last = now;
            since = Instant::now();
        }
        let applier = &ferry.status_json()["drainers"][0];
        let caught_up = applier["lag"].as_u64() == Some(0) || applier["state"] == "STOPPED";
        if caught_up && last != Frame::Null && since.elapsed() >= Duration::from_secs(1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the applier did not settle\n{}",
            ferry.log_tail(40)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_near_the_deadline_survives_a_stopped_sync() {
    let source_server = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target_server = RedisServer::start(&[]);
    let mut source = connect(&source_server).await;
    let mut target = connect(&target_server).await;
    call(&mut source, &["SET", "control", "1"]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ferry = FerryProcess::sync(
        &dir.path().join("sync"),
        &source_server.url(),
        &target_server.url(),
        &["--id", "exp"],
    );
    let checkpoint = "__ferry:checkpoint:exp:0";
    wait_for!(
        "the full sync",
        ferry,
        call(&mut target, &["EXISTS", "control"]).await == Frame::Integer(1)
    );

    // Keys with a short TTL, replicated by the stream.
    const KEYS: [&str; 3] = ["refreshed", "persisted", "expired"];
    for key in KEYS {
        call(&mut source, &["SET", key, "v", "PX", "8000"]).await;
    }
    let mut deadlines = Vec::new();
    for key in KEYS {
        deadlines.push(expire_time(&mut source, key).await);
    }
    let mut replicated = Vec::new();
    for key in KEYS {
        wait_for!(
            format!("{key} on the target"),
            ferry,
            call(&mut target, &["EXISTS", key]).await == Frame::Integer(1)
        );
        replicated.push(expire_time(&mut target, key).await);
    }
    let original = deadlines[0];

    control("stop-sync", &ferry);
    wait_stopped(&ferry, &mut target, checkpoint).await;
    let held = call(&mut target, &["GET", checkpoint]).await;

    // Shortly before the deadline, the source refreshes two of the keys.
    wait_for!(
        "the last 2.5 s before the deadline",
        ferry,
        now_ms() >= original - 2_500
    );
    let left = integer(&call(&mut source, &["PTTL", "refreshed"]).await);
    assert!(
        left > 0,
        "the box was too slow: the key expired on the source before its refresh"
    );
    assert_eq!(
        call(&mut source, &["EXPIRE", "refreshed", "30"]).await,
        Frame::Integer(1)
    );
    assert_eq!(
        call(&mut source, &["PERSIST", "persisted"]).await,
        Frame::Integer(1)
    );
    let refreshed_at = expire_time(&mut source, "refreshed").await;

    // Past the original deadline (plus a margin): the source has expired
    // the third key by itself (its DEL waits in the listener's WAL), the
    // target still holds all three, by the grace.
    wait_for!(
        "the source to expire the third key",
        ferry,
        now_ms() > original + 1_500 && info_u64(&mut source, "expired_keys").await >= 1
    );
    assert_eq!(
        call(&mut target, &["GET", checkpoint]).await,
        held,
        "the target moved while the sync was stopped"
    );
    for key in KEYS {
        assert_eq!(
            call(&mut target, &["EXISTS", key]).await,
            Frame::Integer(1),
            "{key} left the target on its own clock while the sync was stopped"
        );
    }

    control("restart-sync", &ferry);
    wait_for!(
        "the source's DEL of the expired key",
        ferry,
        call(&mut target, &["EXISTS", "expired"]).await == Frame::Integer(0)
    );
    // Caught up: the applier applied what the listener has (heartbeats
    // keep the log moving, so the lags are read at once; with the relayed
    // path, the shipper's too).
    wait_for!("the sync to catch up", ferry, {
        let status = ferry.status_json();
        let shipped = status["listeners"][0]["shipping"]
            .as_array()
            .is_some_and(|ships| ships.iter().all(|s| s["lag"].as_u64() == Some(0)));
        shipped && status["drainers"][0]["lag"].as_u64() == Some(0)
    });
    assert_eq!(
        call(&mut target, &["GET", "refreshed"]).await,
        Frame::bulk("v"),
        "the refreshed key is gone from the target"
    );
    assert_eq!(
        expire_time(&mut target, "refreshed").await,
        refreshed_at + DEFAULT_GRACE_MS,
        "the refreshed key has not the source's new deadline plus the grace"
    );
    assert_eq!(
        call(&mut target, &["GET", "persisted"]).await,
        Frame::bulk("v"),
        "the persisted key is gone from the target"
    );
    assert_eq!(expire_time(&mut target, "persisted").await, -1);
    let with_grace: Vec<i64> = deadlines.iter().map(|at| at + DEFAULT_GRACE_MS).collect();
    assert_eq!(
        replicated, with_grace,
        "the deadlines the stream brought, against the source's plus the grace"
    );
    assert_verify_clean(
        "after restart-sync",
        &source_server.url(),
        &target_server.url(),
        || ferry.log_tail(30),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_loads_deadlines_with_the_grace() {
    let source_server = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target_server = RedisServer::start(&[]);
    let mut source = connect(&source_server).await;
    let mut target = connect(&target_server).await;
    // Nothing reclaims an expired key on the source until it is touched.
    call(&mut source, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]).await;
    let far = now_ms() + 3_600_000;
    let gone = now_ms() + 100;
    call(
        &mut source,
        &["SET", "snap:ttl", "v", "PXAT", &far.to_string()],
    )
    .await;
    call(&mut source, &["RPUSH", "snap:list", "a", "b"]).await;
    call(&mut source, &["PEXPIREAT", "snap:list", &far.to_string()]).await;
    call(
        &mut source,
        &["SET", "snap:expired", "v", "PXAT", &gone.to_string()],
    )
    .await;
    call(&mut source, &["SET", "control", "1"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(now_ms() > gone);

    let dir = tempfile::tempdir().expect("temp dir");
    let ferry = FerryProcess::sync(
        &dir.path().join("sync"),
        &source_server.url(),
        &target_server.url(),
        &["--id", "snap"],
    );
    wait_for!(
        "the full sync",
        ferry,
        call(&mut target, &["EXISTS", "control"]).await == Frame::Integer(1)
    );
    assert_eq!(
        expire_time(&mut target, "snap:ttl").await,
        far + DEFAULT_GRACE_MS,
        "a string loaded by SET"
    );
    assert_eq!(
        expire_time(&mut target, "snap:list").await,
        far + DEFAULT_GRACE_MS,
        "a list loaded by RESTORE"
    );
    assert_eq!(
        expire_time(&mut target, "snap:expired").await,
        gone + DEFAULT_GRACE_MS,
        "a key the source expired but has not deleted yet must be loaded"
    );
    // Touched on the source, the key expires there, and its DEL follows.
    assert_eq!(
        call(&mut source, &["GET", "snap:expired"]).await,
        Frame::Null
    );
    wait_for!(
        "the source's DEL",
        ferry,
        call(&mut target, &["EXISTS", "snap:expired"]).await == Frame::Integer(0)
    );
    call(&mut source, &["DEBUG", "SET-ACTIVE-EXPIRE", "1"]).await;
    assert_verify_clean(
        "after the full sync",
        &source_server.url(),
        &target_server.url(),
        || ferry.log_tail(30),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_grace_writes_the_sources_deadlines() {
    let source_server = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target_server = RedisServer::start(&[]);
    let mut source = connect(&source_server).await;
    let mut target = connect(&target_server).await;
    let far = now_ms() + 3_600_000;
    call(
        &mut source,
        &["SET", "loaded", "v", "PXAT", &far.to_string()],
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("sync.toml");
    std::fs::write(&config, "[apply]\nexpire-grace = \"0s\"\n").expect("write config");
    let ferry = FerryProcess::sync(
        &dir.path().join("sync"),
        &source_server.url(),
        &target_server.url(),
        &[
            "--id",
            "zero",
            "--config",
            config.to_str().expect("utf-8 path"),
        ],
    );
    wait_for!(
        "the full sync",
        ferry,
        call(&mut target, &["EXISTS", "loaded"]).await == Frame::Integer(1)
    );
    assert_eq!(expire_time(&mut target, "loaded").await, far);
    call(&mut source, &["SET", "streamed", "v", "PX", "600000"]).await;
    let at = expire_time(&mut source, "streamed").await;
    wait_for!(
        "the streamed key",
        ferry,
        call(&mut target, &["EXISTS", "streamed"]).await == Frame::Integer(1)
    );
    assert_eq!(expire_time(&mut target, "streamed").await, at);
}
