//! Shipping between real WALs over a real tonic server on loopback: ids,
//! payloads and positions arrive unchanged, acks release listener retention,
//! drainer restarts (clean and kill -9) resume without gaps or duplicates,
//! refused listeners and hostile frames leave the drainer WAL untouched, and
//! a drainer that fell behind the listener's retention gets a fallback
//! snapshot taken from a real redis-server over a second PSYNC connection
//! while an up-to-date drainer keeps streaming.

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ferry::config_units::HumanDuration;
use ferry::position::{LogId, PartitionId, ReplOffset};
use ferry::record::pb::{self, ship_message, ship_reply};
use ferry::record::{Record, SnapshotMarker, WriteRecord};
use ferry::redis::command::Command;
use ferry::redis::psync::{PsyncSource, ReplEvent, ReplicaConfig};
use ferry::redis::rdb::{ParseOptions, RdbEvent, RdbParser};
use ferry::redis::url::RedisUrl;
use ferry::ship::{
    serve_drainer, wire, AllowedListener, DrainerClient, DrainerService, DrainerServiceConfig,
    DrainerTarget, FallbackSnapshot, Shipper, ShipperConfig, ShipperStatusHandle, SnapshotProvider,
    SnapshotProviderError, SyncState, PROTOCOL_VERSION,
};
use ferry::wal::{
    DownstreamId, NewEntry, ReadLimits, SnapshotPhase, SnapshotState, SourcePosition, Wal,
    WalConfig, WalEntry,
};

const P: PartitionId = PartitionId(0);
const LISTENER: &str = "listener-1";
const SECRET: &str = "correct horse battery";
const REPLID: &str = "0123456789abcdef0123456789abcdef01234567";

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn wal_config(dir: &Path) -> WalConfig {
    WalConfig {
        // Tests that need retention run it themselves or set it.
        retention_interval: HumanDuration(Duration::from_secs(3600)),
        // Off by default; these tests ship through it (caught-up shippers
        // read from the listener's tail, the drainer fills its own).
        tail_bytes: ferry::config_units::ByteSize::mib(1),
        ..WalConfig::with_dir(dir)
    }
}

fn write_payload(key: &str, value: &str) -> Bytes {
    Record::Write(WriteRecord {
        db: 0,
        commands: vec![Command::from_parts(["SET", key, value])],
        transaction: false,
        streamed: vec![],
        tenure: None,
    })
    .encode()
}

/// Entry `i` of a synthetic listener stream.
fn entry(i: u64) -> NewEntry {
    NewEntry {
        flags: (i % 3) as u16,
        created_unix_ms: Some(now_unix_ms()),
        source: SourcePosition {
            replid: REPLID.into(),
            offset: ReplOffset(1000 + 37 * i),
            db: (i % 4) as u32,
        },
        payload: write_payload(&format!("key:{i}"), &"v".repeat((i % 50) as usize)),
    }
}

fn read_all(wal: &Wal, from: LogId) -> Vec<WalEntry> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let page = wal.read(P, next, ReadLimits::default()).unwrap();
        let Some(last) = page.last() else { break };
        next = last.log_id.next();
        out.extend(page);
    }
    out
}

/// What must survive shipping unchanged.
fn shipped_view(entries: &[WalEntry]) -> Vec<(LogId, u16, u64, SourcePosition, Bytes)> {
    entries
        .iter()
        .map(|e| {
            (
                e.log_id,
                e.flags,
                e.created_unix_ms,
                e.source.clone(),
                e.payload.clone(),
            )
        })
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn last_id(wal: &Wal) -> LogId {
    wal.last_log_id(P).unwrap().unwrap_or(LogId::ZERO)
}

fn drainer_config() -> DrainerServiceConfig {
    DrainerServiceConfig {
        listeners: vec![AllowedListener::new(LISTENER, SECRET)],
        ..DrainerServiceConfig::default()
    }
}

/// A drainer served on loopback.
struct DrainerServer {
    addr: SocketAddr,
    wal: Wal,
    service: DrainerService,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl DrainerServer {
    async fn start(dir: &Path, addr: Option<SocketAddr>) -> DrainerServer {
        let wal = Wal::open(wal_config(dir)).await.unwrap();
        let listener = bind(addr).await;
        let addr = listener.local_addr().unwrap();
        let service = DrainerService::new(wal.clone(), drainer_config()).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (service, shutdown) = (service.clone(), shutdown.clone());
            async move {
                serve_drainer(listener, service, None, shutdown)
                    .await
                    .unwrap()
            }
        });
        DrainerServer {
            addr,
            wal,
            service,
            shutdown,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving, ends every stream and closes the WAL.
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        drop(self.service);
        self.wal.close().await.unwrap();
    }
}

async fn bind(addr: Option<SocketAddr>) -> tokio::net::TcpListener {
    let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
    // The port of a stopped drainer may linger briefly.
    for _ in 0..100 {
        if let Ok(listener) = tokio::net::TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr}");
}

fn shipper_config() -> ShipperConfig {
    ShipperConfig {
        max_batch_entries: 64,
        reconnect_min: HumanDuration(Duration::from_millis(20)),
        reconnect_max: HumanDuration(Duration::from_millis(300)),
        idle_poll: HumanDuration(Duration::from_millis(200)),
        ..ShipperConfig::default()
    }
}

struct RunningShipper {
    status: ShipperStatusHandle,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ferry::ship::ShipError>>,
}

impl RunningShipper {
    fn start(
        wal: &Wal,
        drainer_id: &str,
        endpoint: String,
        secret: &str,
        provider: Arc<dyn SnapshotProvider>,
    ) -> RunningShipper {
        let target = DrainerTarget {
            drainer_id: DownstreamId::new(drainer_id).unwrap(),
            endpoint,
            listener_id: LISTENER.into(),
            secret: secret.into(),
            tls: None,
        };
        let shipper = Shipper::new(wal.clone(), P, target, shipper_config(), provider).unwrap();
        let status = shipper.status_handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(shipper.run(shutdown.clone()));
        RunningShipper {
            status,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// For tests where a snapshot must never be needed: fails loudly.
struct NoSnapshots;

impl SnapshotProvider for NoSnapshots {
    fn fallback_snapshot(
        &self,
        partition: PartitionId,
    ) -> BoxFuture<'_, Result<FallbackSnapshot, SnapshotProviderError>> {
        Box::pin(async move {
            Err(format!("test: no fallback snapshot expected for partition {partition}").into())
        })
    }
}

fn acked_by(wal: &Wal, drainer: &str) -> LogId {
    wal.positions(P)
        .unwrap()
        .unwrap()
        .acked
        .into_iter()
        .find(|(d, _)| d.as_str() == drainer)
        .map(|(_, id)| id)
        .unwrap_or(LogId::ZERO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_arrive_unchanged_and_acks_release_retention() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let listener_wal = Wal::open(wal_config(dirs.0.path())).await.unwrap();
    for chunk in (1..=500u64).collect::<Vec<_>>().chunks(100) {
        listener_wal
            .append(P, chunk.iter().map(|i| entry(*i)).collect())
            .await
            .unwrap();
    }
    let drainer = DrainerServer::start(dirs.1.path(), None).await;
    let shipper = RunningShipper::start(
        &listener_wal,
        "drainer-a",
        drainer.endpoint(),
        SECRET,
        Arc::new(NoSnapshots),
    );
    wait_until(
        "500 entries on the drainer",
        Duration::from_secs(30),
        || last_id(&drainer.wal) == LogId(500),
    )
    .await;
    // Entries appended while the shipper is caught up arrive too (the WAL's
    // append notification wakes it).
    for i in 501..=600u64 {
        listener_wal.append(P, vec![entry(i)]).await.unwrap();
    }
    wait_until(
        "600 entries on the drainer",
        Duration::from_secs(30),
        || last_id(&drainer.wal) == LogId(600),
    )
    .await;
    assert_eq!(
        shipped_view(&read_all(&drainer.wal, LogId(1))),
        shipped_view(&read_all(&listener_wal, LogId(1)))
    );
    wait_until(
        "the listener WAL to record the ack",
        Duration::from_secs(10),
        || acked_by(&listener_wal, "drainer-a") == LogId(600),
    )
    .await;

    let status = shipper.status.snapshot();
    assert_eq!(status.state, SyncState::Online);
    assert_eq!(
        (status.acked, status.last_log_id, status.lag),
        (LogId(600), LogId(600), 0)
    );
    assert_eq!(status.latency_ms, 0);
    assert_eq!(status.entries_sent, 600);
    assert_eq!(status.fallback_snapshots, 0);
    assert!(status.bytes_sent > 0 && status.bytes_sent < status.raw_bytes_sent);
    let drainer_status = drainer.service.status();
    assert_eq!(drainer_status.len(), 1);
    assert_eq!(
        drainer_status[0].connected_listener.as_deref(),
        Some(LISTENER)
    );
    assert_eq!(drainer_status[0].durable, LogId(600));

    // Retention on the listener now trims everything the drainer acked.
    listener_wal.enforce_retention(now_unix_ms()).await.unwrap();
    assert_eq!(
        listener_wal.positions(P).unwrap().unwrap().first_available,
        LogId(601)
    );

    shipper.stop().await;
    drainer.stop().await;
    listener_wal.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_and_latency_show_while_the_drainer_is_down() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let listener_wal = Wal::open(wal_config(dirs.0.path())).await.unwrap();
    // Nobody listens on this port.
    let port = common::free_port();
    let shipper = RunningShipper::start(
        &listener_wal,
        "drainer-a",
        format!("http://127.0.0.1:{port}"),
        SECRET,
        Arc::new(NoSnapshots),
    );
    listener_wal
        .append(P, (1..=10).map(entry).collect())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let status = shipper.status.snapshot();
    assert_eq!(status.state, SyncState::Offline);
    assert_eq!(status.lag, 10);
    assert!(status.latency_ms >= 500, "latency {}", status.latency_ms);
    assert!(status.last_error.unwrap().contains("connecting"));

    // The drainer comes up on that port: the shipper reconnects by itself.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let drainer = DrainerServer::start(dirs.1.path(), Some(addr)).await;
    wait_until("the drainer to catch up", Duration::from_secs(30), || {
        let status = shipper.status.snapshot();
        status.state == SyncState::Online && status.lag == 0
    })
    .await;
    assert_eq!(shipper.status.snapshot().latency_ms, 0);
    shipper.stop().await;
    drainer.stop().await;
    listener_wal.close().await.unwrap();
}

/// Appends entries 1..=total to the listener WAL in small bursts.
fn spawn_appender(wal: Wal, total: u64) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 1;
        while i <= total {
            let burst: Vec<NewEntry> = (i..(i + 7).min(total + 1)).map(entry).collect();
            i += burst.len() as u64;
            wal.append(P, burst).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drainer_restart_mid_stream_resumes_without_gaps_or_duplicates() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let listener_wal = Wal::open(wal_config(dirs.0.path())).await.unwrap();
    let drainer = DrainerServer::start(dirs.1.path(), None).await;
    let addr = drainer.addr;
    let shipper = RunningShipper::start(
        &listener_wal,
        "drainer-a",
        drainer.endpoint(),
        SECRET,
        Arc::new(NoSnapshots),
    );
    let total = 3000;
    let appender = spawn_appender(listener_wal.clone(), total);
    let mut drainer = Some(drainer);
    for round in 0..2 {
        let running = drainer.take().unwrap();
        let threshold = LogId(400 + 900 * round);
        wait_until(
            "progress before the restart",
            Duration::from_secs(30),
            || last_id(&running.wal) >= threshold,
        )
        .await;
        running.stop().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(shipper.status.snapshot().state, SyncState::Offline);
        drainer = Some(DrainerServer::start(dirs.1.path(), Some(addr)).await);
    }
    appender.await.unwrap();
    let running = drainer.take().unwrap();
    wait_until("everything on the drainer", Duration::from_secs(60), || {
        last_id(&running.wal) == LogId(total)
    })
    .await;
    let shipped = read_all(&running.wal, LogId(1));
    assert_eq!(shipped.len() as u64, total);
    assert_eq!(
        shipped_view(&shipped),
        shipped_view(&read_all(&listener_wal, LogId(1)))
    );
    assert!(running.service.status()[0].sessions >= 1);
    shipper.stop().await;
    running.stop().await;
    listener_wal.close().await.unwrap();
}

const CHILD_DIR_ENV: &str = "FERRY_SHIP_TEST_CHILD_DIR";
const CHILD_ADDR_ENV: &str = "FERRY_SHIP_TEST_CHILD_ADDR";

/// Not a test on its own: the drainer process of
/// `drainer_killed_with_sigkill_resumes_without_gaps`, which runs this test
/// binary again with `--ignored --exact drainer_child_process`.
#[test]
#[ignore]
fn drainer_child_process() {
    let (Ok(dir), Ok(addr)) = (std::env::var(CHILD_DIR_ENV), std::env::var(CHILD_ADDR_ENV)) else {
        // `--ignored` runs without the parent: nothing to serve.
        eprintln!(
            "drainer_child_process is started by drainer_killed_with_sigkill_resumes_without_gaps"
        );
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let addr: SocketAddr = addr.parse().unwrap();
        let drainer = DrainerServer::start(Path::new(&dir), Some(addr)).await;
        println!("READY {}", drainer.addr);
        // Runs until killed.
        drainer.task.await.unwrap();
    });
}

struct ChildDrainer(std::process::Child);

impl ChildDrainer {
    fn spawn(dir: &Path, addr: SocketAddr) -> ChildDrainer {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "drainer_child_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir)
            .env(CHILD_ADDR_ENV, addr.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        loop {
            let line = lines
                .next()
                .expect("child drainer exited before it was ready")
                .unwrap();
            if line.contains("READY") {
                break;
            }
        }
        ChildDrainer(child)
    }

    fn kill9(mut self) {
        // Child::kill is SIGKILL on Unix.
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for ChildDrainer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drainer_killed_with_sigkill_resumes_without_gaps() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let listener_wal = Wal::open(wal_config(dirs.0.path())).await.unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let mut child = Some(ChildDrainer::spawn(dirs.1.path(), addr));
    let shipper = RunningShipper::start(
        &listener_wal,
        "drainer-a",
        format!("http://{addr}"),
        SECRET,
        Arc::new(NoSnapshots),
    );
    let total = 3000;
    let appender = spawn_appender(listener_wal.clone(), total);
    for round in 0..3u64 {
        let threshold = LogId(300 + 800 * round);
        wait_until("acks before the kill", Duration::from_secs(30), || {
            shipper.status.snapshot().acked >= threshold
        })
        .await;
        // Mid-stream: entries are flowing while the process dies.
        child.take().unwrap().kill9();
        tokio::time::sleep(Duration::from_millis(200)).await;
        child = Some(ChildDrainer::spawn(dirs.1.path(), addr));
    }
    appender.await.unwrap();
    wait_until("everything acked", Duration::from_secs(60), || {
        shipper.status.snapshot().acked == LogId(total)
    })
    .await;
    shipper.stop().await;
    child.take().unwrap().kill9();

    let drainer_wal = Wal::open(wal_config(dirs.1.path())).await.unwrap();
    let shipped = read_all(&drainer_wal, LogId(1));
    assert_eq!(shipped.len() as u64, total);
    assert_eq!(
        shipped_view(&shipped),
        shipped_view(&read_all(&listener_wal, LogId(1)))
    );
    drainer_wal.close().await.unwrap();
    listener_wal.close().await.unwrap();
}

/// A hand-written client: sends `messages`, collects replies until the
/// stream ends. `Err` when the call itself is refused.
async fn raw_ship(
    addr: SocketAddr,
    messages: Vec<pb::ShipMessage>,
) -> Result<(Vec<pb::ShipReply>, Option<tonic::Status>), tonic::Status> {
    let mut client = DrainerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // Keep the request stream open until the drainer ended its side, so
    // that every message is handled before the stream closes.
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
        match tokio::time::timeout(Duration::from_millis(800), replies.message()).await {
            Ok(Ok(Some(reply))) => got.push(reply),
            Ok(Ok(None)) => break,
            Ok(Err(status)) => {
                error = Some(status);
                break;
            }
            // Nothing more is coming: every message was handled.
            Err(_) => break,
        }
    }
    drop(hold_tx);
    Ok((got, error))
}

/// The incarnation raw streams claim for their (made-up) log.
const RAW_INCARNATION: u64 = 0x5eed;

fn hello(listener_id: &str, secret: &str, version: u32) -> pb::ShipMessage {
    pb::ShipMessage {
        kind: Some(ship_message::Kind::Hello(pb::Hello {
            listener_id: listener_id.into(),
            secret: Bytes::copy_from_slice(secret.as_bytes()),
            partition: P.0,
            protocol_version: version,
            incarnation: RAW_INCARNATION,
        })),
    }
}

fn wal_entries(ids: std::ops::RangeInclusive<u64>) -> Vec<WalEntry> {
    ids.map(|i| {
        let e = entry(i);
        WalEntry {
            log_id: LogId(i),
            flags: e.flags,
            // Fixed, so that frames sent twice compare equal.
            created_unix_ms: 1_700_000_000_000 + i,
            bytes_end: 0,
            stored_len: 0,
            source: e.source,
            payload: e.payload,
        }
    })
    .collect()
}

fn batch_message(batch: pb::EntryBatch) -> pb::ShipMessage {
    pb::ShipMessage {
        kind: Some(ship_message::Kind::Entries(batch)),
    }
}

fn acks(replies: &[pb::ShipReply]) -> Vec<u64> {
    replies
        .iter()
        .filter_map(|r| match &r.kind {
            Some(ship_reply::Kind::Ack(ack)) => Some(ack.durable_log_id),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_and_unknown_listener_are_refused_and_nothing_is_written() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let drainer = DrainerServer::start(dirs.1.path(), None).await;
    let valid_batch = batch_message(wire::encode_batch(&wal_entries(1..=3)));

    for (listener, secret, code, needle) in [
        (
            LISTENER,
            "wrong secret!",
            tonic::Code::Unauthenticated,
            "secret does not match",
        ),
        (
            "stranger",
            SECRET,
            tonic::Code::Unauthenticated,
            "not configured",
        ),
    ] {
        let refused = raw_ship(
            drainer.addr,
            vec![
                hello(listener, secret, PROTOCOL_VERSION),
                valid_batch.clone(),
            ],
        )
        .await
        .expect_err("must be refused");
        assert_eq!(refused.code(), code, "{refused:?}");
        assert!(refused.message().contains(needle), "{refused:?}");
    }
    let refused = raw_ship(drainer.addr, vec![hello(LISTENER, SECRET, 99), valid_batch])
        .await
        .expect_err("must be refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("protocol version 99"));

    // A real shipper with a wrong secret stays offline with a clear error.
    let listener_wal = Wal::open(wal_config(dirs.0.path())).await.unwrap();
    listener_wal
        .append(P, (1..=5).map(entry).collect())
        .await
        .unwrap();
    let shipper = RunningShipper::start(
        &listener_wal,
        "drainer-a",
        drainer.endpoint(),
        "not the secret",
        Arc::new(NoSnapshots),
    );
    wait_until("the refusal", Duration::from_secs(10), || {
        shipper.status.snapshot().last_error.is_some()
    })
    .await;
    let status = shipper.status.snapshot();
    assert_eq!(status.state, SyncState::Offline);
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("secret does not match"),
        "{status:?}"
    );
    assert_eq!(status.acked, LogId::ZERO);
    assert!(drainer.wal.partitions().is_empty(), "nothing written");
    shipper.stop().await;
    drainer.stop().await;
    listener_wal.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_typed_errors_and_leave_the_wal_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let drainer = DrainerServer::start(dir.path(), None).await;
    let good = |ids| batch_message(wire::encode_batch(&wal_entries(ids)));

    let (replies, error) = raw_ship(
        drainer.addr,
        vec![hello(LISTENER, SECRET, PROTOCOL_VERSION), good(1..=3)],
    )
    .await
    .unwrap();
    assert!(error.is_none(), "{error:?}");
    assert!(matches!(
        replies[0].kind,
        Some(ship_reply::Kind::Welcome(pb::Welcome {
            durable_log_id: 0,
            ..
        }))
    ));
    assert_eq!(acks(&replies), vec![3]);
    let before = shipped_view(&read_all(&drainer.wal, LogId(1)));

    let valid = wire::encode_batch(&wal_entries(4..=6));
    let garbage_raw = b"\x0agarbage-garbage-garbage".to_vec();
    let marker = Record::Snapshot(SnapshotMarker {
        epoch: 5,
        rdb_bytes: 10,
        chunks: 1,
        replid: REPLID.into(),
        offset: 1,
        scope: None,
        tenures: Vec::new(),
        handoffs: Vec::new(),
    })
    .encode();
    let mut marker_entry = wal_entries(4..=4);
    marker_entry[0].payload = marker;
    let chunk = |epoch, seq| pb::ShipMessage {
        kind: Some(ship_message::Kind::SnapshotChunk(wire::encode_chunk(
            epoch, seq, b"rdb", false,
        ))),
    };
    let cases: Vec<(&str, Vec<pb::ShipMessage>, tonic::Code, &str)> = vec![
        (
            "bad snappy",
            vec![batch_message(pb::EntryBatch {
                snappy_entries: Bytes::from_static(b"\x20\x01not snappy at all"),
                raw_len: 32,
                ..valid.clone()
            })],
            tonic::Code::InvalidArgument,
            "snappy",
        ),
        (
            "raw_len over the limit",
            vec![batch_message(pb::EntryBatch {
                raw_len: 1 << 40,
                ..valid.clone()
            })],
            tonic::Code::InvalidArgument,
            "raw_len",
        ),
        (
            "gap",
            vec![good(5..=6)],
            tonic::Code::OutOfRange,
            "gap: entry 5 does not follow entry 3",
        ),
        (
            "garbage entries",
            vec![batch_message(pb::EntryBatch {
                first_log_id: 4,
                count: 1,
                raw_len: garbage_raw.len() as u64,
                snappy_entries: Bytes::from(
                    snap::raw::Encoder::new()
                        .compress_vec(&garbage_raw)
                        .unwrap(),
                ),
            })],
            tonic::Code::InvalidArgument,
            "entry 4",
        ),
        (
            "marker without its chunks",
            vec![batch_message(wire::encode_batch(&marker_entry))],
            tonic::Code::InvalidArgument,
            "chunks must precede their marker",
        ),
        (
            "chunks out of order",
            vec![chunk(5, 0), chunk(5, 2)],
            tonic::Code::InvalidArgument,
            "out of order",
        ),
        (
            "message without a kind",
            vec![pb::ShipMessage { kind: None }],
            tonic::Code::InvalidArgument,
            "without a kind",
        ),
        (
            "second hello",
            vec![hello(LISTENER, SECRET, PROTOCOL_VERSION)],
            tonic::Code::InvalidArgument,
            "Hello after the stream started",
        ),
    ];
    for (name, messages, code, needle) in cases {
        let mut stream = vec![hello(LISTENER, SECRET, PROTOCOL_VERSION)];
        stream.extend(messages);
        let (replies, error) = raw_ship(drainer.addr, stream).await.unwrap();
        let error = error.unwrap_or_else(|| panic!("{name}: no error, replies {replies:?}"));
        assert_eq!(error.code(), code, "{name}: {error:?}");
        assert!(error.message().contains(needle), "{name}: {error:?}");
        assert!(acks(&replies).is_empty(), "{name}: acked {replies:?}");
        assert_eq!(
            shipped_view(&read_all(&drainer.wal, LogId(1))),
            before,
            "{name}: drainer wal changed"
        );
    }
    // A first message that is not Hello is refused before anything else.
    let refused = raw_ship(drainer.addr, vec![good(4..=6)]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // Still serving: a replay of 1..=3 is skipped and acked again, then
    // 4..=6 is appended.
    let (replies, error) = raw_ship(
        drainer.addr,
        vec![
            hello(LISTENER, SECRET, PROTOCOL_VERSION),
            good(1..=3),
            good(2..=6),
        ],
    )
    .await
    .unwrap();
    assert!(error.is_none(), "{error:?}");
    assert_eq!(acks(&replies), vec![3, 6]);
    let after = read_all(&drainer.wal, LogId(1));
    assert_eq!(shipped_view(&after), shipped_view(&wal_entries(1..=6)),);
    drainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_of_the_same_listener_replaces_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let drainer = DrainerServer::start(dir.path(), None).await;
    let mut client = DrainerClient::connect(drainer.endpoint()).await.unwrap();
    let (first_tx, first_rx) = tokio::sync::mpsc::channel(4);
    first_tx
        .send(hello(LISTENER, SECRET, PROTOCOL_VERSION))
        .await
        .unwrap();
    let first_out = futures::stream::unfold(first_rx, |mut rx| async move {
        rx.recv().await.map(|m| (m, rx))
    });
    let mut first = client.ship(first_out).await.unwrap().into_inner();
    assert!(matches!(
        first.message().await.unwrap().unwrap().kind,
        Some(ship_reply::Kind::Welcome(_))
    ));
    // The second stream gets its Welcome; the first one is ended.
    let (replies, error) = raw_ship(
        drainer.addr,
        vec![
            hello(LISTENER, SECRET, PROTOCOL_VERSION),
            batch_message(wire::encode_batch(&wal_entries(1..=2))),
        ],
    )
    .await
    .unwrap();
    assert!(error.is_none(), "{error:?}");
    assert_eq!(acks(&replies), vec![2]);
    let ended = first.message().await.expect_err("first stream must end");
    assert_eq!(ended.code(), tonic::Code::Aborted);
    assert!(ended.message().contains("replaced"));
    drop(first_tx);
    drainer.stop().await;
}

// ---------------------------------------------------------------------------
// Fallback snapshot with a real source.

/// A minimal listener for the test: replicates `source` into `wal` the way
/// RELAY.md conventions 2 and 3 describe (initial snapshot as epoch 1 chunks
/// plus a marker entry, then one record per replication entry), and
/// publishes the source offset up to which everything is durable.
async fn run_test_listener(
    source: RedisUrl,
    wal: Wal,
    processed_tx: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let config = ReplicaConfig::new(source);
    let mut psync = PsyncSource::connect(&config, None).await.unwrap();
    let ReplEvent::FullResync { replid, offset } = psync.next_event().await.unwrap() else {
        panic!("expected a full resync");
    };
    let epoch = 1;
    wal.set_snapshot_state(
        P,
        SnapshotState {
            epoch,
            phase: SnapshotPhase::Writing,
        },
    )
    .await
    .unwrap();
    let (mut seq, mut bytes) = (0u64, 0u64);
    loop {
        match psync.next_event().await.unwrap() {
            ReplEvent::RdbChunk(chunk) => {
                bytes += chunk.len() as u64;
                wal.put_snapshot_chunk(P, epoch, seq, chunk).await.unwrap();
                seq += 1;
            }
            ReplEvent::RdbEnd { .. } => break,
            other => panic!("unexpected {other:?} in the RDB"),
        }
    }
    wal.set_snapshot_state(
        P,
        SnapshotState {
            epoch,
            phase: SnapshotPhase::Complete,
        },
    )
    .await
    .unwrap();
    let marker = Record::Snapshot(SnapshotMarker {
        epoch,
        rdb_bytes: bytes,
        chunks: seq,
        replid: replid.to_string(),
        offset: offset.0,
        scope: None,
        tenures: Vec::new(),
        handoffs: Vec::new(),
    });
    let position = |offset: ReplOffset, db| SourcePosition {
        replid: replid.as_str().into(),
        offset,
        db,
    };
    wal.append(P, vec![NewEntry::new(position(offset, 0), marker.encode())])
        .await
        .unwrap();
    processed_tx.send_replace(offset.0);
    let ack = psync.ack_handle();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = psync.next_event() => event.unwrap(),
        };
        match event {
            ReplEvent::Entry(repl_entry) => {
                let payload = Record::from_repl_entry(&repl_entry).encode();
                wal.append(
                    P,
                    vec![NewEntry::new(
                        position(repl_entry.offset, repl_entry.db),
                        payload,
                    )],
                )
                .await
                .unwrap();
                ack.set(repl_entry.offset);
                processed_tx.send_replace(repl_entry.offset.0);
            }
            ReplEvent::Progress { offset } => {
                ack.set(offset);
                processed_tx.send_replace(offset.0);
            }
            other => panic!("unexpected {other:?} in the command stream"),
        }
    }
}

/// The fallback of RELAY.md convention 4, for real: a second replication
/// connection takes a fresh RDB at source offset X, stored as a new epoch;
/// the marker goes at the last log id whose offset is at most X, once the
/// listener has everything up to X durable.
struct PsyncSnapshotProvider {
    source: RedisUrl,
    wal: Wal,
    processed_rx: watch::Receiver<u64>,
}

impl PsyncSnapshotProvider {
    async fn take(
        &self,
        partition: PartitionId,
    ) -> Result<FallbackSnapshot, SnapshotProviderError> {
        let epoch = self.wal.snapshot_state(partition)?.epoch + 1;
        let mut psync =
            PsyncSource::connect(&ReplicaConfig::new(self.source.clone()), None).await?;
        let ReplEvent::FullResync { replid, offset } = psync.next_event().await? else {
            return Err("source did not answer with a full resync".into());
        };
        self.wal
            .set_snapshot_state(
                partition,
                SnapshotState {
                    epoch,
                    phase: SnapshotPhase::Writing,
                },
            )
            .await?;
        let (mut seq, mut bytes) = (0u64, 0u64);
        loop {
            match psync.next_event().await? {
                ReplEvent::RdbChunk(chunk) => {
                    bytes += chunk.len() as u64;
                    self.wal
                        .put_snapshot_chunk(partition, epoch, seq, chunk)
                        .await?;
                    seq += 1;
                }
                ReplEvent::RdbEnd { .. } => break,
                other => return Err(format!("unexpected {other:?} in the RDB").into()),
            }
        }
        drop(psync);
        self.wal
            .set_snapshot_state(
                partition,
                SnapshotState {
                    epoch,
                    phase: SnapshotPhase::Complete,
                },
            )
            .await?;
        let mut processed_rx = self.processed_rx.clone();
        tokio::time::timeout(
            Duration::from_secs(30),
            processed_rx.wait_for(|processed| *processed >= offset.0),
        )
        .await
        .map_err(|_| "listener did not reach the snapshot offset")??;
        let wal = self.wal.clone();
        let marker_log_id = tokio::task::spawn_blocking(move || -> Result<LogId, String> {
            let positions = wal
                .positions(partition)
                .map_err(|e| e.to_string())?
                .ok_or("empty listener wal")?;
            let mut marker = None;
            for stored in read_all(&wal, positions.first_available) {
                if stored.source.offset > offset {
                    break;
                }
                marker = Some(stored.log_id);
            }
            match marker {
                Some(id) => Ok(id),
                None if positions.first_available > positions.durable => Ok(positions.durable),
                None => Err(format!("no listener entry at or before offset {offset}")),
            }
        })
        .await??;
        Ok(FallbackSnapshot {
            epoch,
            marker: SnapshotMarker {
                epoch,
                rdb_bytes: bytes,
                chunks: seq,
                replid: replid.to_string(),
                offset: offset.0,
                scope: None,
                tenures: Vec::new(),
                handoffs: Vec::new(),
            },
            marker_log_id,
        })
    }
}

impl SnapshotProvider for PsyncSnapshotProvider {
    fn fallback_snapshot(
        &self,
        partition: PartitionId,
    ) -> BoxFuture<'_, Result<FallbackSnapshot, SnapshotProviderError>> {
        Box::pin(self.take(partition))
    }
}

fn chunks_of(wal: &Wal, epoch: u64) -> Vec<u8> {
    let mut rdb = Vec::new();
    for (_, chunk) in wal.read_snapshot_chunks(P, epoch, 0, usize::MAX).unwrap() {
        rdb.extend_from_slice(&chunk);
    }
    rdb
}

fn rdb_keys(rdb: &[u8]) -> std::collections::BTreeSet<String> {
    let mut parser = RdbParser::new(rdb, ParseOptions::default());
    let mut keys = std::collections::BTreeSet::new();
    while let Some(event) = parser.next_event().unwrap() {
        if let RdbEvent::KeyStart(header) = event {
            keys.insert(String::from_utf8_lossy(&header.key).into_owned());
        }
    }
    keys
}

fn first_entry_marker(wal: &Wal) -> Option<(LogId, SnapshotMarker)> {
    let first = wal.first_log_id(P).unwrap()?;
    let entries = wal.read(P, first, ReadLimits::default()).unwrap();
    let entry = entries.first()?;
    wire::peek_marker(&entry.payload).map(|marker| (entry.log_id, marker))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_drainer_gets_a_fallback_snapshot_and_an_up_to_date_one_does_not() {
    // No delay before a diskless transfer: each full sync would wait 5s.
    let source = common::RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    for i in 0..100 {
        source.cmd(&["SET", &format!("k{i}"), "initial"]);
    }
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let listener_wal = Wal::open(WalConfig {
        wal_ttl: HumanDuration(Duration::from_secs(1)),
        retention_interval: HumanDuration(Duration::from_millis(200)),
        ..WalConfig::with_dir(dirs[0].path())
    })
    .await
    .unwrap();
    let source_url = RedisUrl::parse(&source.url()).unwrap();
    let (processed_tx, processed_rx) = watch::channel(0u64);
    let listener_shutdown = CancellationToken::new();
    let listener_task = tokio::spawn(run_test_listener(
        source_url.clone(),
        listener_wal.clone(),
        processed_tx,
        listener_shutdown.clone(),
    ));
    let provider = Arc::new(PsyncSnapshotProvider {
        source: source_url,
        wal: listener_wal.clone(),
        processed_rx,
    });

    let drainer_a = DrainerServer::start(dirs[1].path(), None).await;
    let addr_a = drainer_a.addr;
    let drainer_b = DrainerServer::start(dirs[2].path(), None).await;
    let shipper_a = RunningShipper::start(
        &listener_wal,
        "drainer-a",
        drainer_a.endpoint(),
        SECRET,
        provider.clone(),
    );
    let shipper_b = RunningShipper::start(
        &listener_wal,
        "drainer-b",
        drainer_b.endpoint(),
        SECRET,
        provider.clone(),
    );
    for i in 0..50 {
        source.cmd(&["SET", &format!("a{i}"), "before the gap"]);
    }
    wait_until("both drainers up to date", Duration::from_secs(30), || {
        let last = last_id(&listener_wal);
        last >= LogId(51) && last_id(&drainer_a.wal) == last && last_id(&drainer_b.wal) == last
    })
    .await;
    // Both got the listener's own snapshot (marker at id 1 with its chunks).
    for drainer in [&drainer_a, &drainer_b] {
        let (id, marker) = first_entry_marker(&drainer.wal).expect("log starts with a marker");
        assert_eq!((id, marker.epoch), (LogId(1), 1));
        assert_eq!(chunks_of(&drainer.wal, 1), chunks_of(&listener_wal, 1));
        assert!(rdb_keys(&chunks_of(&drainer.wal, 1)).contains("k99"));
    }

    // Drainer A goes away; the source changes, deletions included; the
    // listener's retention trims past A's position (wal_ttl = 1s).
    let a_durable = last_id(&drainer_a.wal);
    drainer_a.stop().await;
    for i in 0..50 {
        source.cmd(&["SET", &format!("b{i}"), "during the gap"]);
    }
    for i in 0..10 {
        source.cmd(&["DEL", &format!("k{i}")]);
    }
    wait_until(
        "the listener to trim past drainer A",
        Duration::from_secs(30),
        || {
            listener_wal
                .first_log_id(P)
                .unwrap()
                .unwrap_or(LogId(u64::MAX))
                > a_durable.next()
        },
    )
    .await;
    wait_until("drainer B up to date", Duration::from_secs(30), || {
        last_id(&drainer_b.wal) == last_id(&listener_wal)
    })
    .await;

    let drainer_a = DrainerServer::start(dirs[1].path(), Some(addr_a)).await;
    for i in 0..20 {
        source.cmd(&["SET", &format!("c{i}"), "after the gap"]);
    }
    wait_until(
        "the fallback snapshot on drainer A",
        Duration::from_secs(60),
        || first_entry_marker(&drainer_a.wal).is_some_and(|(_, marker)| marker.epoch >= 2),
    )
    .await;
    // Entries after the snapshot flow on top of it.
    for i in 0..20 {
        source.cmd(&["SET", &format!("d{i}"), "after the snapshot"]);
    }
    let has_d19 = |wal: &Wal| {
        let first = wal.first_log_id(P).unwrap().unwrap_or(LogId(1));
        read_all(wal, first)
            .iter()
            .any(|e| e.payload.windows(3).any(|w| w == b"d19"))
    };
    wait_until(
        "the d-writes on both drainers",
        Duration::from_secs(60),
        || {
            has_d19(&drainer_a.wal)
                && has_d19(&drainer_b.wal)
                && last_id(&drainer_a.wal) == last_id(&drainer_b.wal)
        },
    )
    .await;

    // A: its log now starts with the fallback marker (epoch 2), whose RDB
    // already reflects the gap, and continues with the listener's entries.
    let (marker_id, marker) = first_entry_marker(&drainer_a.wal).expect("marker first");
    // Epoch 2 unless the 1s wal_ttl trimmed A's next entry once more on a
    // slow machine, which takes another (equally valid) fallback.
    assert!(marker.epoch >= 2, "{marker:?}");
    assert!(marker_id > a_durable.next());
    assert_eq!(
        drainer_a.wal.snapshot_state(P).unwrap(),
        SnapshotState {
            epoch: marker.epoch,
            phase: SnapshotPhase::Complete
        }
    );
    assert!(
        chunks_of(&drainer_a.wal, 1).is_empty(),
        "superseded epoch deleted"
    );
    let rdb = chunks_of(&drainer_a.wal, marker.epoch);
    assert_eq!(rdb.len() as u64, marker.rdb_bytes);
    assert_eq!(rdb, chunks_of(&listener_wal, marker.epoch));
    let keys = rdb_keys(&rdb);
    assert!(keys.contains("b49") && keys.contains("k10"), "{keys:?}");
    assert!(
        !keys.contains("k0") && !keys.contains("k9"),
        "deleted during the gap"
    );
    let a_entries = read_all(&drainer_a.wal, marker_id.next());
    let b_entries = read_all(&drainer_b.wal, marker_id.next());
    assert!(!a_entries.is_empty());
    assert_eq!(shipped_view(&a_entries), shipped_view(&b_entries));
    assert_eq!(
        shipper_a.status.snapshot().fallback_snapshots,
        marker.epoch - 1
    );

    // B: never got a snapshot beyond the listener's own; its log is dense.
    assert_eq!(shipper_b.status.snapshot().fallback_snapshots, 0);
    assert_eq!(drainer_b.wal.snapshot_state(P).unwrap().epoch, 1);
    let b_all = read_all(&drainer_b.wal, LogId(1));
    assert_eq!(b_all.len() as u64, last_id(&drainer_b.wal).0);
    assert!(b_all[1..]
        .iter()
        .all(|e| wire::peek_marker(&e.payload).is_none()));

    shipper_a.stop().await;
    shipper_b.stop().await;
    listener_shutdown.cancel();
    listener_task.await.unwrap();
    drainer_a.stop().await;
    drainer_b.stop().await;
    listener_wal.close().await.unwrap();
}

/// Figures, not a check: `cargo test --release --test ship throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let listener_wal = Wal::open(wal_config(dirs.0.path())).await.unwrap();
    let total = 200_000u64;
    let value = "x".repeat(100);
    for start in (1..=total).step_by(1000) {
        let burst = (start..start + 1000)
            .map(|i| NewEntry {
                payload: write_payload(&format!("key:{i}"), &value),
                ..entry(i)
            })
            .collect();
        listener_wal.append(P, burst).await.unwrap();
    }
    let payload_bytes: usize = read_all(&listener_wal, LogId(1))
        .iter()
        .map(|e| e.payload.len())
        .sum();
    let drainer = DrainerServer::start(dirs.1.path(), None).await;
    let started = Instant::now();
    let target = DrainerTarget {
        drainer_id: DownstreamId::new("drainer-a").unwrap(),
        endpoint: drainer.endpoint(),
        listener_id: LISTENER.into(),
        secret: SECRET.into(),
        tls: None,
    };
    // Default batching (the other tests use small batches to cut streams
    // mid-way more often).
    let shipper = Shipper::new(
        listener_wal.clone(),
        P,
        target,
        ShipperConfig::default(),
        Arc::new(NoSnapshots),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let shipper = RunningShipper {
        status: shipper.status_handle(),
        shutdown: shutdown.clone(),
        task: tokio::spawn(shipper.run(shutdown)),
    };
    wait_until("everything acked", Duration::from_secs(300), || {
        shipper.status.snapshot().acked == LogId(total)
    })
    .await;
    let elapsed = started.elapsed();
    let status = shipper.status.snapshot();
    println!(
        "shipped {total} entries ({:.1} MB payload) in {elapsed:.2?}: {:.0} entries/s, {:.1} MB/s; \
         wire {:.1} MB compressed from {:.1} MB",
        payload_bytes as f64 / 1e6,
        total as f64 / elapsed.as_secs_f64(),
        payload_bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        status.bytes_sent as f64 / 1e6,
        status.raw_bytes_sent as f64 / 1e6,
    );
    shipper.stop().await;
    drainer.stop().await;
    listener_wal.close().await.unwrap();
}

/// A provider that says a full resync of epoch `resync` is being stored (as
/// the listener does while it receives the source's RDB); no fallbacks.
struct ResyncInProgress {
    resync: std::sync::Mutex<Option<u64>>,
}

impl SnapshotProvider for ResyncInProgress {
    fn fallback_snapshot(
        &self,
        partition: PartitionId,
    ) -> BoxFuture<'_, Result<FallbackSnapshot, SnapshotProviderError>> {
        static NONE: NoSnapshots = NoSnapshots;
        NONE.fallback_snapshot(partition)
    }

    fn resync_epoch(&self, partition: PartitionId) -> Option<u64> {
        (partition == P)
            .then(|| *self.resync.lock().unwrap())
            .flatten()
    }
}

fn chunk_bytes(epoch: u64, seq: u64) -> Bytes {
    Bytes::from(format!("epoch {epoch} chunk {seq} ").repeat(1000))
}

/// The chunks of a full resync reach the drainer while the listener stores
/// them, all but the newest; the marker's transfer continues from there and
/// the drainer ends with the whole epoch, then the marker and the entries
/// after it. A resync that fails halfway leaves its chunks in the drainer's
/// `Writing` epoch, replaced by the next resync's transfer; nothing is
/// loaded without a marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_resync_is_shipped_while_the_listener_stores_it() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let listener_wal = Wal::open(wal_config(dirs.0.path())).await.unwrap();
    let drainer = DrainerServer::start(dirs.1.path(), None).await;
    let provider = Arc::new(ResyncInProgress {
        resync: std::sync::Mutex::new(None),
    });
    let shipper = RunningShipper::start(
        &listener_wal,
        "drainer-a",
        drainer.endpoint(),
        SECRET,
        provider.clone(),
    );
    let drainer_chunks = |wal: &Wal| -> Vec<(u64, usize)> {
        wal.snapshot_epochs(P)
            .unwrap()
            .into_iter()
            .map(|epoch| {
                let count = wal
                    .read_snapshot_chunks(P, epoch, 0, usize::MAX)
                    .unwrap()
                    .len();
                (epoch, count)
            })
            .collect()
    };
    let writing = |epoch| SnapshotState {
        epoch,
        phase: SnapshotPhase::Writing,
    };

    // Epoch 1: a resync that fails after 3 chunks.
    listener_wal
        .set_snapshot_state(P, writing(1))
        .await
        .unwrap();
    *provider.resync.lock().unwrap() = Some(1);
    for seq in 0..3 {
        listener_wal
            .put_snapshot_chunk(P, 1, seq, chunk_bytes(1, seq))
            .await
            .unwrap();
    }
    wait_until(
        "2 chunks of the failing resync on the drainer",
        Duration::from_secs(30),
        || drainer_chunks(&drainer.wal).iter().any(|(_, n)| *n == 2),
    )
    .await;
    *provider.resync.lock().unwrap() = None;
    listener_wal.delete_snapshot(P, 1).await.unwrap();

    // Epoch 2: stored chunk by chunk; the drainer follows one behind.
    listener_wal
        .set_snapshot_state(P, writing(2))
        .await
        .unwrap();
    *provider.resync.lock().unwrap() = Some(2);
    let chunks = 6u64;
    let mut rdb = Vec::new();
    for seq in 0..chunks {
        let data = chunk_bytes(2, seq);
        rdb.extend_from_slice(&data);
        listener_wal
            .put_snapshot_chunk(P, 2, seq, data)
            .await
            .unwrap();
        if seq > 0 {
            wait_until(
                &format!(
                    "chunk {} of the resync on the drainer before its marker",
                    seq - 1
                ),
                Duration::from_secs(30),
                || {
                    drainer_chunks(&drainer.wal)
                        .iter()
                        .any(|(_, n)| *n == seq as usize)
                },
            )
            .await;
        }
    }
    assert_eq!(last_id(&drainer.wal), LogId::ZERO, "nothing but chunks yet");
    // The newest chunk is held back until the marker says it is the last.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !drainer_chunks(&drainer.wal)
            .iter()
            .any(|(_, n)| *n == chunks as usize),
        "{:?}",
        drainer_chunks(&drainer.wal)
    );
    listener_wal
        .set_snapshot_state(
            P,
            SnapshotState {
                epoch: 2,
                phase: SnapshotPhase::Complete,
            },
        )
        .await
        .unwrap();
    let marker = Record::Snapshot(SnapshotMarker {
        epoch: 2,
        rdb_bytes: rdb.len() as u64,
        chunks,
        replid: REPLID.into(),
        offset: 1000,
        scope: None,
        tenures: Vec::new(),
        handoffs: Vec::new(),
    });
    listener_wal
        .append(
            P,
            vec![NewEntry::new(
                SourcePosition {
                    replid: REPLID.into(),
                    offset: ReplOffset(1000),
                    db: 0,
                },
                marker.encode(),
            )],
        )
        .await
        .unwrap();
    *provider.resync.lock().unwrap() = None;
    listener_wal
        .append(P, (2..=10).map(entry).collect())
        .await
        .unwrap();
    wait_until(
        "the marker and 9 entries on the drainer",
        Duration::from_secs(30),
        || last_id(&drainer.wal) == LogId(10),
    )
    .await;
    let (marker_id, stored) = first_entry_marker(&drainer.wal).expect("a marker first");
    assert_eq!(marker_id, LogId(1));
    assert_eq!(stored.chunks, chunks);
    assert_eq!(
        chunks_of(&drainer.wal, stored.epoch),
        rdb,
        "the epoch's bytes"
    );
    // The failed resync's chunks went with the transfer that replaced them.
    assert_eq!(
        drainer_chunks(&drainer.wal),
        vec![(stored.epoch, chunks as usize)]
    );
    assert_eq!(
        shipped_view(&read_all(&drainer.wal, LogId(2))),
        shipped_view(&read_all(&listener_wal, LogId(2)))
    );
    shipper.stop().await;
    drainer.stop().await;
    listener_wal.close().await.unwrap();
}
