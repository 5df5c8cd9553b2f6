//! The Redis wire-format layer end to end, against real redis-server 7.0
//! processes: a source master's full sync is taken with the replication
//! client ([`PsyncSource`], `PSYNC ? -1`), its RDB parsed while it arrives
//! ([`spawn_rdb_parser`]), turned into commands by a [`Rebuilder`] and
//! pipelined into an empty target; then the command stream is applied entry
//! by entry (a transaction inside `MULTI`/`EXEC`); then a session is dropped
//! and resumed from its saved position.
//!
//! Convergence is checked on the whole data set, not on chosen keys:
//! `DEBUG DIGEST` (every key's value, whether it has a TTL, and its db),
//! `DBSIZE` of all 16 dbs, the exact `PEXPIRETIME` of every key, the stream
//! state the digest does not see (metadata, consumer groups, consumers and
//! PELs) of every stream, and the function libraries. After the command
//! stream the target is also compared with a real `--replicaof` replica of
//! the source: Redis 7.0's own replicas differ from their master in consumer
//! groups' `entries-read`/`lag` (see [`GroupCounters`]), and so must ferry's
//! target.
//!
//! Run: `cargo test --test replication_e2e` (about 15 s, most of it the
//! four full syncs of a 4.6 MB RDB in the first test).

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::RedisServer;
use ferry::position::ReplOffset;
use ferry::redis::client::Client;
use ferry::redis::command::{Command, SEED_SYNC_COMMANDS};
use ferry::redis::psync::{PsyncSource, ReplEntry, ReplEvent, ReplicaConfig};
use ferry::redis::rdb::rebuild::{Output, RebuildOptions, RebuildStats, Rebuilder, TargetCaps};
use ferry::redis::rdb_stream::{spawn_rdb_parser, RdbStreamConfig};
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;

use common::workload::{
    array, call, cmd, connect, field, fill_source, find_error, info_u64, integer, pipeline,
    run_workload, show_args, stream_state, text, DB_COUNT, SOURCE_ENCODING_CONFIG, WORKLOAD,
};

/// Longest wait for one replication or RDB event.
const EVENT_WAIT: Duration = Duration::from_secs(15);
/// Longest wait for the client to reach the source's offset.
const CATCH_UP_WAIT: Duration = Duration::from_secs(20);
/// `ReplicaConfig::rdb_chunk_size` unless a test says otherwise.
const DEFAULT_CHUNK: usize = 64 * 1024;
/// Commands awaiting a reply on the target before replies are read.
const PIPELINE_DEPTH: usize = 256;
/// Bytes of commands awaiting a reply on the target before replies are read.
const PIPELINE_BYTES: usize = 4 << 20;

// ---------------------------------------------------------------------------
// The target: commands pipelined on one connection, every reply checked.

struct Target {
    client: Client,
    /// Db the connection is in once everything queued has run.
    db: u32,
    /// Commands sent whose reply was not read yet (shown, for messages).
    in_flight: VecDeque<String>,
    /// Warnings of the rebuild (none are expected from 7.0 to 7.0).
    warnings: Vec<String>,
}

impl Target {
    async fn connect(server: &RedisServer) -> Target {
        Target {
            client: connect(server).await,
            db: 0,
            in_flight: VecDeque::new(),
            warnings: Vec::new(),
        }
    }

    fn queue(&mut self, cmd: &Command) {
        self.client.queue(cmd);
        self.in_flight.push_back(show_args(&cmd.args));
        if cmd.is("SELECT") {
            let db = cmd
                .args
                .get(1)
                .and_then(|a| std::str::from_utf8(a).ok())
                .and_then(|a| a.parse().ok());
            self.db = db.unwrap_or_else(|| panic!("bad SELECT: {}", show_args(&cmd.args)));
        }
    }

    /// Queues `cmd` to run in `db` (`None`: in whatever db is selected).
    async fn send(&mut self, db: Option<u32>, cmd: &Command) {
        if let Some(db) = db.filter(|&db| db != self.db) {
            self.queue(&Command::from_parts(["SELECT".to_string(), db.to_string()]));
        }
        self.queue(cmd);
        if self.in_flight.len() >= PIPELINE_DEPTH || self.client.queued_bytes() >= PIPELINE_BYTES {
            self.drain().await;
        }
    }

    /// Sends what is queued and checks every reply.
    async fn drain(&mut self) {
        self.client.flush().await.expect("write to the target");
        while let Some(sent) = self.in_flight.pop_front() {
            let reply = self
                .client
                .read_reply()
                .await
                .unwrap_or_else(|e| panic!("reply to {sent}: {e}"));
            if let Some(error) = find_error(&reply) {
                panic!("the target refused {sent}: {error}");
            }
            if sent.starts_with("EXEC") && reply == Frame::Null {
                panic!("the target aborted a transaction");
            }
        }
    }

    async fn output(&mut self, output: Output) {
        match output {
            Output::Command { db, cmd } => self.send(Some(db), &cmd).await,
            Output::Global { cmd } => self.send(None, &cmd).await,
            Output::Warning { db, key, what } => self.warnings.push(format!(
                "db {db} key {:?}: {what}",
                key.map(|k| String::from_utf8_lossy(&k).into_owned())
            )),
        }
    }

    /// Applies one entry of the command stream: its commands in its db, a
    /// transaction inside `MULTI`/`EXEC` (a `SELECT` inside it is kept).
    async fn apply(&mut self, entry: &ReplEntry) {
        let multi = Command::from_parts(["MULTI"]);
        if entry.transaction {
            self.send(Some(entry.db), &multi).await;
        }
        for (i, cmd) in entry.commands.iter().enumerate() {
            let db = (i == 0 && !entry.transaction).then_some(entry.db);
            self.send(db, cmd).await;
        }
        if entry.transaction {
            self.send(None, &Command::from_parts(["EXEC"])).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Whole data set state.

/// Everything compared between source and target.
#[derive(Debug, PartialEq)]
struct DataSet {
    digest: String,
    db_sizes: Vec<i64>,
    /// `PEXPIRETIME` of every key (-1: no TTL), by db and key.
    expiry: BTreeMap<(u32, Vec<u8>), i64>,
    /// [`stream_state`] of every stream, by db and key.
    streams: BTreeMap<(u32, Vec<u8>), Vec<String>>,
    /// `(library_name, library_code)`, sorted.
    functions: Vec<(String, String)>,
}

impl DataSet {
    fn keys(&self) -> i64 {
        self.db_sizes.iter().sum()
    }
}

async fn data_set(client: &mut Client) -> DataSet {
    let digest = text(&call(client, &["DEBUG", "DIGEST"]).await);
    let mut db_sizes = Vec::new();
    let mut expiry = BTreeMap::new();
    let mut streams = BTreeMap::new();
    for db in 0..DB_COUNT {
        call(client, &["SELECT", &db.to_string()]).await;
        let size = integer(&call(client, &["DBSIZE"]).await);
        db_sizes.push(size);
        if size == 0 {
            continue;
        }
        let keys: Vec<Bytes> = array(&call(client, &["KEYS", "*"]).await)
            .iter()
            .map(|k| k.as_bytes().cloned().expect("a key"))
            .collect();
        let mut cmds = Vec::new();
        for key in &keys {
            cmds.push(Command::new(vec![
                Bytes::from_static(b"PEXPIRETIME"),
                key.clone(),
            ]));
            cmds.push(Command::new(vec![Bytes::from_static(b"TYPE"), key.clone()]));
        }
        let replies = client.pipeline(&cmds).await.expect("pipeline");
        for (key, pair) in keys.iter().zip(replies.chunks(2)) {
            expiry.insert((db, key.to_vec()), integer(&pair[0]));
            if text(&pair[1]) == "stream" {
                streams.insert((db, key.to_vec()), stream_state(client, key).await);
            }
        }
    }
    call(client, &["SELECT", "0"]).await;
    let mut functions: Vec<(String, String)> =
        array(&call(client, &["FUNCTION", "LIST", "WITHCODE"]).await)
            .iter()
            .map(|lib| {
                (
                    text(field(lib, "library_name")),
                    text(field(lib, "library_code")),
                )
            })
            .collect();
    functions.sort();
    DataSet {
        digest,
        db_sizes,
        expiry,
        streams,
        functions,
    }
}

/// How consumer groups' `entries-read` and `lag` are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupCounters {
    Compare,
    /// Redis 7.0 propagates `XREADGROUP` as `XCLAIM … LASTID` without the
    /// group's `entries-read`, so its own replicas end up with
    /// `entries-read`/`lag` nil where the master has numbers. A target fed
    /// from the stream can only match a real replica there (which
    /// [`stream_of_every_seed_command_converges`] checks), not the master.
    Ignore,
}

/// `reference` and `target` hold the same data set; returns it.
async fn assert_converged(
    reference: &mut Client,
    target: &mut Client,
    what: &str,
    counters: GroupCounters,
) -> DataSet {
    let want = data_set(reference).await;
    assert_same(&want, &data_set(target).await, what, counters);
    want
}

/// `got` equals `want`, field by field (for readable failures).
fn assert_same(want: &DataSet, got: &DataSet, what: &str, counters: GroupCounters) {
    assert_eq!(got.db_sizes, want.db_sizes, "{what}: DBSIZE of dbs 0..16");
    for (key, time) in &want.expiry {
        assert_eq!(
            got.expiry.get(key),
            Some(time),
            "{what}: PEXPIRETIME of {:?} in db {}",
            String::from_utf8_lossy(&key.1),
            key.0
        );
    }
    assert_eq!(got.expiry.len(), want.expiry.len(), "{what}: key sets");
    let comparable = |state: &Vec<String>| -> Vec<String> {
        state
            .iter()
            .filter(|line| {
                counters == GroupCounters::Compare
                    || !(line.contains(" entries-read=") || line.contains(" lag="))
            })
            .cloned()
            .collect()
    };
    for (key, state) in &want.streams {
        assert_eq!(
            got.streams.get(key).map(comparable),
            Some(comparable(state)),
            "{what}: stream {:?} in db {}",
            String::from_utf8_lossy(&key.1),
            key.0
        );
    }
    assert_eq!(got.functions, want.functions, "{what}: function libraries");
    assert_eq!(got.digest, want.digest, "{what}: DEBUG DIGEST");
    assert_ne!(
        want.digest,
        "0".repeat(40),
        "{what}: the reference is empty"
    );
}

/// Waits until a real replica (`--replicaof`) of the source has everything
/// the source wrote.
async fn wait_for_replica(source: &mut Client, replica: &RedisServer) {
    let mut client = connect(replica).await;
    let deadline = Instant::now() + CATCH_UP_WAIT;
    loop {
        let master = info_u64(source, "master_repl_offset").await;
        let info = client.info("replication").await.expect("INFO replication");
        let link = info.get("master_link_status").cloned().unwrap_or_default();
        let applied: Option<u64> = info.get("slave_repl_offset").and_then(|o| o.parse().ok());
        if link == "up" && applied == Some(master) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica not caught up within {CATCH_UP_WAIT:?}: link {link}, \
             at {applied:?}, source at {master}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_empty(target: &mut Client) {
    let empty = data_set(target).await;
    assert_eq!(empty.keys(), 0, "the target is not empty");
    assert!(empty.functions.is_empty(), "the target has functions");
}

// ---------------------------------------------------------------------------
// Replication: full sync into the target, then the stream.

fn replica_config(source: &RedisServer) -> ReplicaConfig {
    ReplicaConfig::new(RedisUrl::parse(&source.url()).expect("source url"))
}

/// What a full sync did.
struct FullSync {
    source: PsyncSource,
    /// The stream offset the RDB describes.
    start: ReplOffset,
    rdb_len: u64,
    chunks: u64,
    stats: RebuildStats,
}

/// `PSYNC ? -1`: the RDB goes from the replication client (on its own task)
/// through the parser bridge and a [`Rebuilder`] into `target`.
async fn full_sync(
    source: &RedisServer,
    target: &mut Target,
    restore_max_bytes: usize,
    rdb_chunk_size: usize,
) -> FullSync {
    let mut cfg = replica_config(source);
    cfg.rdb_chunk_size = rdb_chunk_size;
    let mut session = PsyncSource::connect(&cfg, None)
        .await
        .unwrap_or_else(|e| panic!("PSYNC ? -1 to {}: {e}", source.addr()));
    let (feeder, mut events) = spawn_rdb_parser(RdbStreamConfig::default());
    // Feeding and consuming happen on different tasks (the bridge's queues
    // are bounded in both directions).
    let feeding = tokio::spawn(async move {
        let mut start = None;
        let mut chunks = 0u64;
        let mut fed = 0u64;
        loop {
            let event = tokio::time::timeout(EVENT_WAIT, session.next_event())
                .await
                .expect("a replication event in time")
                .unwrap_or_else(|e| panic!("replication client: {e}"));
            match event {
                ReplEvent::FullResync { offset, .. } => start = Some(offset),
                ReplEvent::RdbChunk(chunk) => {
                    assert!(!chunk.is_empty() && chunk.len() <= rdb_chunk_size);
                    chunks += 1;
                    fed += chunk.len() as u64;
                    feeder.feed(chunk).await.expect("the parser takes the RDB");
                }
                ReplEvent::RdbEnd { len } => {
                    assert_eq!(len, fed, "RdbEnd length vs chunk bytes");
                    feeder.finish();
                    let start = start.expect("FullResync before the RDB");
                    return (session, start, len, chunks);
                }
                other => panic!("unexpected event during a full sync: {other:?}"),
            }
        }
    });

    let server_info = target.client.info("server").await.expect("INFO server");
    let caps = TargetCaps::from_info(&server_info).expect("target version");
    let mut opts = RebuildOptions::new(caps);
    opts.restore_max_bytes = restore_max_bytes;
    let mut rebuilder = Rebuilder::new(opts);
    let mut outputs = Vec::new();
    let mut ended = false;
    loop {
        let event = match tokio::time::timeout(EVENT_WAIT, events.next())
            .await
            .expect("an RDB event in time")
        {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(error) => {
                // A failed replication client also ends the parser's input:
                // report its panic rather than the parser's end of input.
                if let Ok(Err(join)) = tokio::time::timeout(Duration::from_secs(1), feeding).await {
                    panic!("replication client failed: {join}");
                }
                panic!("RDB parse failed: {error}");
            }
        };
        ended |= matches!(event, ferry::redis::rdb::RdbEvent::End { .. });
        rebuilder
            .feed(event, &mut outputs)
            .unwrap_or_else(|e| panic!("rebuild: {e}"));
        for output in outputs.drain(..) {
            target.output(output).await;
        }
    }
    assert!(ended, "the RDB ended without End");
    target.drain().await;
    let stats = rebuilder.finish().expect("rebuild finished between keys");
    assert!(
        target.warnings.is_empty(),
        "rebuild warnings: {:?}",
        target.warnings
    );
    let (session, start, rdb_len, chunks) = feeding.await.expect("replication client task");
    assert_eq!(session.position().offset, start, "position after RdbEnd");
    assert_eq!(session.position().db, 0, "db after RdbEnd");
    FullSync {
        source: session,
        start,
        rdb_len,
        chunks,
        stats,
    }
}

/// Applies one replication event; entries are also kept in `seen`.
async fn apply_event(event: ReplEvent, target: &mut Target, seen: &mut Vec<ReplEntry>) {
    match event {
        ReplEvent::Entry(entry) => {
            target.apply(&entry).await;
            seen.push(entry);
        }
        ReplEvent::Progress { .. } => {}
        other => panic!("unexpected event in the command stream: {other:?}"),
    }
}

/// Reads and applies the stream until the client has received, and handed
/// out, everything the source wrote: `received_offset()` and `position()`
/// equal the source's `master_repl_offset`. The target has then run all of
/// it.
async fn catch_up(
    session: &mut PsyncSource,
    admin: &mut Client,
    target: &mut Target,
    seen: &mut Vec<ReplEntry>,
) {
    let deadline = Instant::now() + CATCH_UP_WAIT;
    loop {
        // Take events while they come; look at the source's offset when idle.
        match tokio::time::timeout(Duration::from_millis(100), session.next_event()).await {
            Ok(Ok(event)) => {
                apply_event(event, target, seen).await;
                continue;
            }
            Ok(Err(e)) => panic!("replication client: {e}"),
            Err(_idle) => {}
        }
        let master = info_u64(admin, "master_repl_offset").await;
        let received = session.received_offset().0;
        let position = session.position().offset.0;
        assert!(
            received <= master,
            "received offset {received} is past the source's {master}"
        );
        if received == master && position == master {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no catch-up within {CATCH_UP_WAIT:?}: source at {master}, \
             received {received}, position {position}"
        );
    }
    target.drain().await;
    session.ack_handle().set(session.position().offset);
}

// ---------------------------------------------------------------------------
// 1. Full sync of every type × encoding, disk-based and diskless.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdb_through_replication_client_matches_digest() {
    let mut args = vec!["--repl-diskless-sync-delay", "0"];
    args.extend_from_slice(SOURCE_ENCODING_CONFIG);
    let source = RedisServer::start(&args);
    let mut admin = connect(&source).await;
    let started = Instant::now();
    fill_source(&mut admin, true).await;
    eprintln!("source filled in {:?}", started.elapsed());
    // The source does not change from here on (its digest alone costs a
    // second with the big keys, so it is taken once).
    let want = data_set(&mut admin).await;
    let full_before = info_u64(&mut admin, "sync_full").await;

    let mut runs = 0;
    for diskless in [false, true] {
        let mode = if diskless { "yes" } else { "no" };
        call(&mut admin, &["CONFIG", "SET", "repl-diskless-sync", mode]).await;
        // Diskless transfers come in odd-sized small chunks, so that the end
        // mark search and the parser bridge see many chunk boundaries.
        let chunk_size = if diskless { 1000 } else { DEFAULT_CHUNK };
        for restore_max_bytes in [RebuildOptions::new(caps_7_0()).restore_max_bytes, 0] {
            let what = format!("diskless={diskless} restore_max_bytes={restore_max_bytes}");
            let started = Instant::now();
            let target_server = RedisServer::start(&[]);
            let mut target = Target::connect(&target_server).await;
            assert_empty(&mut target.client).await;
            let log_before = std::fs::read_to_string(source.log_path()).unwrap_or_default();

            let sync = full_sync(&source, &mut target, restore_max_bytes, chunk_size).await;
            runs += 1;
            let elapsed = started.elapsed();

            // The master really did the kind of transfer asked for.
            let log = std::fs::read_to_string(source.log_path()).expect("source log");
            let new_log = &log[log_before.len().min(log.len())..];
            let kind = if diskless {
                "target: replicas sockets"
            } else {
                "target: disk"
            };
            assert!(
                new_log.contains(kind),
                "{what}: no {kind} sync in:\n{new_log}"
            );

            let mut checker = connect(&target_server).await;
            let got = data_set(&mut checker).await;
            assert_same(&want, &got, &what, GroupCounters::Compare);
            let stats = &sync.stats;
            assert_eq!(
                stats.keys_loaded(),
                u64::try_from(want.keys()).unwrap(),
                "{what}: {stats:?}"
            );
            assert_eq!(stats.functions, 1, "{what}: {stats:?}");
            assert_eq!(stats.expired_skipped + stats.empty_skipped, 0, "{what}");
            if restore_max_bytes == 0 {
                assert_eq!(stats.keys_restored, 0, "{what}: {stats:?}");
            } else {
                // Only str:big, list:big and hash:big are over the RESTORE
                // limit.
                assert_eq!(stats.keys_rebuilt, 3, "{what}: {stats:?}");
            }
            assert!(
                sync.rdb_len > 3_000_000,
                "{what}: RDB of {} bytes",
                sync.rdb_len
            );
            let min_chunks = sync.rdb_len / chunk_size as u64;
            assert!(
                sync.chunks > min_chunks,
                "{what}: RDB in {} chunks",
                sync.chunks
            );
            eprintln!(
                "{what}: RDB {} bytes in {} chunks at offset {}, {} commands, {:?}",
                sync.rdb_len, sync.chunks, sync.start, stats.commands, elapsed
            );
            drop(sync.source);
        }
    }
    let unchanged = data_set(&mut admin).await;
    assert_same(
        &want,
        &unchanged,
        "source after the runs",
        GroupCounters::Compare,
    );
    assert_eq!(
        info_u64(&mut admin, "sync_full").await,
        full_before + runs,
        "one full sync per run"
    );
}

fn caps_7_0() -> TargetCaps {
    TargetCaps::for_version(7, 0, 0).expect("7.0 is supported")
}

// ---------------------------------------------------------------------------
// 2. The command stream: every seed command, applied entry by entry.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_of_every_seed_command_converges() {
    let started = Instant::now();
    let mut args = vec![
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
    ];
    args.extend_from_slice(SOURCE_ENCODING_CONFIG);
    let source = RedisServer::start(&args);
    let mut admin = connect(&source).await;
    fill_source(&mut admin, false).await;
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &source.port.to_string()]);
    let target_server = RedisServer::start(&[]);
    let mut target = Target::connect(&target_server).await;
    let mut checker = connect(&target_server).await;
    assert_empty(&mut checker).await;

    let sync = full_sync(&source, &mut target, 1024 * 1024, DEFAULT_CHUNK).await;
    let mut session = sync.source;
    let before = assert_converged(
        &mut admin,
        &mut checker,
        "after the full sync",
        GroupCounters::Compare,
    )
    .await;

    // The workload runs while the stream is read and applied.
    let mut workload = tokio::spawn(run_workload(connect(&source).await));
    let mut seen = Vec::new();
    let issued = loop {
        tokio::select! {
            done = &mut workload => break done.expect("workload task"),
            event = session.next_event() => {
                let event = event.unwrap_or_else(|e| panic!("replication client: {e}"));
                apply_event(event, &mut target, &mut seen).await;
            }
        }
    };
    catch_up(&mut session, &mut admin, &mut target, &mut seen).await;

    let missing: Vec<&str> = SEED_SYNC_COMMANDS
        .iter()
        .copied()
        .filter(|name| !issued.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "the workload lacks seed commands {missing:?}"
    );
    // The stream carried the shapes this test is about.
    assert!(seen.iter().any(|e| e.transaction), "no transaction entry");
    assert!(
        seen.iter().any(|e| e.db == 2
            && e.commands
                .iter()
                .any(|c| c.is("DEL") && c.args[1] == "w:short")),
        "no DEL of the expired key"
    );
    assert!(
        seen.iter()
            .any(|e| e.transaction && e.commands.iter().any(|c| c.is("SELECT"))),
        "no transaction switching db"
    );
    let after = assert_converged(
        &mut admin,
        &mut checker,
        "target vs source after the stream",
        GroupCounters::Ignore,
    )
    .await;
    // Against a real replica of the source, everything matches.
    wait_for_replica(&mut admin, &replica).await;
    let mut replica_client = connect(&replica).await;
    assert_converged(
        &mut replica_client,
        &mut checker,
        "target vs a real replica after the stream",
        GroupCounters::Compare,
    )
    .await;
    assert_ne!(after.digest, before.digest, "the workload changed nothing");
    eprintln!(
        "{} entries applied, {} commands issued; {:?} in all",
        seen.len(),
        WORKLOAD.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 3. Resume from a saved position.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_disconnect_continues_without_full_sync() {
    let started = Instant::now();
    let mut args = vec!["--repl-diskless-sync", "no"];
    args.extend_from_slice(SOURCE_ENCODING_CONFIG);
    let source = RedisServer::start(&args);
    let mut admin = connect(&source).await;
    fill_source(&mut admin, false).await;
    let target_server = RedisServer::start(&[]);
    let mut target = Target::connect(&target_server).await;
    let mut checker = connect(&target_server).await;

    let sync = full_sync(&source, &mut target, 0, DEFAULT_CHUNK).await;
    let mut session = sync.source;
    let mut seen = Vec::new();

    // Some entries before the disconnect, the last ones in db 5.
    let mut writer = connect(&source).await;
    call(&mut writer, &["SET", "r:before", "1"]).await;
    call(&mut writer, &["SELECT", "5"]).await;
    for _ in 0..10 {
        call(&mut writer, &["INCR", "r:counter"]).await;
    }
    catch_up(&mut session, &mut admin, &mut target, &mut seen).await;
    assert!(
        seen.len() >= 11,
        "{} entries before the disconnect",
        seen.len()
    );
    assert_converged(
        &mut admin,
        &mut checker,
        "before the disconnect",
        GroupCounters::Compare,
    )
    .await;
    let saved = session.position();
    assert_eq!(saved.db, 5, "the saved position keeps the db");
    drop(session);

    let full_before = info_u64(&mut admin, "sync_full").await;
    let partial_before = info_u64(&mut admin, "sync_partial_ok").await;
    // Writes while disconnected, first in db 5 (no SELECT needed on the
    // source's side), then in db 0.
    let incrs: Vec<Command> = (0..300).map(|_| cmd(&["INCR", "r:counter"])).collect();
    pipeline(&mut writer, &incrs).await;
    call(&mut writer, &["LPUSH", "r:list", "a", "b", "c"]).await;
    call(&mut writer, &["MULTI"]).await;
    call(&mut writer, &["INCR", "r:counter"]).await;
    call(&mut writer, &["LPUSH", "r:list", "d"]).await;
    call(&mut writer, &["EXEC"]).await;
    call(&mut writer, &["SELECT", "0"]).await;
    call(&mut writer, &["XADD", "stream:resumed", "*", "f", "v"]).await;
    let incrs: Vec<Command> = (0..100).map(|_| cmd(&["INCR", "r:counter0"])).collect();
    pipeline(&mut writer, &incrs).await;

    let mut session = PsyncSource::connect(&replica_config(&source), Some(saved.clone()))
        .await
        .unwrap_or_else(|e| panic!("PSYNC from {saved:?}: {e}"));
    let first = tokio::time::timeout(EVENT_WAIT, session.next_event())
        .await
        .expect("first event in time")
        .expect("first event");
    assert_eq!(
        first,
        ReplEvent::Continue {
            replid: saved.replid.clone(),
            offset: saved.offset,
            db: 5
        }
    );
    let resumed_from = seen.len();
    catch_up(&mut session, &mut admin, &mut target, &mut seen).await;
    let resumed = &seen[resumed_from..];
    // 300 + 100 INCRs, LPUSH, XADD and the transaction: nothing else.
    assert_eq!(resumed.len(), 403, "entries after the resume");
    assert_eq!(
        resumed[0].db, 5,
        "first entry after the resume: {:?}",
        resumed[0]
    );
    assert!(
        resumed.windows(2).all(|w| w[0].offset < w[1].offset) && resumed[0].offset > saved.offset,
        "offsets after the resume must grow from the saved one"
    );

    for (db, key, want) in [(5, "r:counter", 311), (0, "r:counter0", 100)] {
        call(&mut admin, &["SELECT", &db.to_string()]).await;
        call(&mut checker, &["SELECT", &db.to_string()]).await;
        let on_source = integer(&call(&mut admin, &["GET", key]).await);
        let on_target = integer(&call(&mut checker, &["GET", key]).await);
        assert_eq!(on_source, want, "{key} on the source");
        assert_eq!(on_target, on_source, "{key}: applied twice or skipped");
    }
    call(&mut admin, &["SELECT", "0"]).await;
    call(&mut checker, &["SELECT", "0"]).await;
    assert_converged(
        &mut admin,
        &mut checker,
        "after the resume",
        GroupCounters::Compare,
    )
    .await;
    assert_eq!(
        info_u64(&mut admin, "sync_full").await,
        full_before,
        "the resume must not be a full sync"
    );
    assert_eq!(
        info_u64(&mut admin, "sync_partial_ok").await,
        partial_before + 1,
        "the resume is one partial sync"
    );
    eprintln!("resume test in {:?}", started.elapsed());
}
