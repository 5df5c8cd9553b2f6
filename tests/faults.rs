//! Fault injection (issue 4, deliverable 2): real `ferry` processes between
//! real redis-servers, with a link-cutting proxy ([`common::proxy`]) on one
//! of their links, under a steady write load.
//!
//! - `proxy_*`: the proxy itself (bytes pass, delay delays, cut closes with
//!   FIN, reset with RST, blackhole stalls and heals, reset mid-stream).
//! - [`listener_drainer_link_faults`]: `ferry listener` and `ferry drainer`
//!   as two processes, the proxy between them: cut 2 s, 200 ms delay,
//!   blackhole longer than the 1 s ship keepalive (both sides must notice
//!   and reconnect), reset in the middle of a burst.
//! - [`source_link_faults`]: `ferry sync` reading the source through the
//!   proxy: cut, then blackhole (detected by the 3 s replica read timeout);
//!   each resumes with a partial resync.
//! - [`target_link_faults`]: `ferry sync` writing the target through the
//!   proxy: cut, blackhole (1 s reply timeout), reset in the middle of a
//!   burst of batches: nothing lost, nothing applied twice.
//! - [`sigstop_under_load`]: `ferry sync` frozen 2.5 s under load.
//! - [`source_failover`]: a replica of the source is promoted and the proxy
//!   the listener reads through is switched to it: the listener continues
//!   with a partial resync on the new replication id.
//! - [`drainer_disk_full`]: the drainer's data dir on a 64 MiB tmpfs filled
//!   up: the drainer names the disk error and stops (its policy on a failed
//!   WAL write); once space is back and it is restarted, nothing is lost.
//!   It needs to mount a tmpfs (root or CAP_SYS_ADMIN); where it cannot, it
//!   fails with the reason, it never passes by skipping.
//!
//! The load is [`common::load`]: a continuous mix of every seed command
//! (every type, expiry, blocking pops, `MOVE`/`SWAPDB`, `EVAL`/`FCALL`,
//! `MULTI`/`EXEC` across dbs, streams with a consumer group) with counters
//! taken from the source's replies.
//!
//! Every scenario ends with the target equal to the source key by key in
//! every db (`__ferry*` keys aside), the load's counters and list equal on
//! both (an `INCR` applied twice or lost shows there), `ferry verify` clean
//! (the real binary: exit 0, no difference in its JSON), and the source's
//! `sync_full` unchanged since the first full sync: no unexpected full
//! resync. `sync_partial_ok` grows exactly where the source link broke.
//!
//! Run: `cargo test --test faults` (about 45 s on two busy cores);
//! `cargo test --test faults -- --ignored` adds the long variant
//! (`sigstop_under_load_long`, ten stalls).
//! `--nocapture` prints what each fault did.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::ferry::log::{
    APPLY_BACK, APPLY_FAILED, DRAINER_OFFLINE, DRAINER_ONLINE, FULL_SYNC_STARTED, FULL_SYNC_STORED,
    LINK_LOST, NODE_STOPS, PARTIAL_RESYNC, STREAM_ACCEPTED,
};
use common::ferry::{assert_verify_clean, signal, FerryProcess};
use common::load::{assert_counters, Load, LoadReport};
use common::proxy::{Direction, Proxy};
use common::workload::{call, cmd, connect_url, text, wait_converged};
use common::{free_port, RedisServer};
use ferry::redis::resp::Frame;

/// No diskless delay, and a backlog that covers every outage here.
const SOURCE_ARGS: &[&str] = &[
    "--repl-diskless-sync-delay",
    "0",
    "--repl-backlog-size",
    "128mb",
];

/// Longest wait for the target to equal the source.
const CONVERGE: Duration = Duration::from_secs(60);
/// Longest wait for a fault to be noticed or healed.
const NOTICE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// The proxy itself, against a real redis-server.

/// A blocking connection with a read timeout.
fn raw_connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    stream
}

/// `ECHO payload` in RESP.
fn echo_request(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("*2\r\n$4\r\nECHO\r\n${}\r\n", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    out
}

/// Reads exactly `len` bytes.
fn read_len(stream: &mut TcpStream, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

fn ping(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"PING\r\n")?;
    let reply = read_len(stream, 7)?;
    assert_eq!(reply, b"+PONG\r\n");
    Ok(())
}

#[test]
fn proxy_passes_bytes_both_ways() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(&server.addr());
    let mut stream = raw_connect(&proxy.addr());
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let request = echo_request(&payload);
    stream.write_all(&request).expect("send");
    let header = format!("${}\r\n", payload.len());
    let reply = read_len(&mut stream, header.len() + payload.len() + 2).expect("reply");
    assert_eq!(&reply[..header.len()], header.as_bytes());
    assert!(reply[header.len()..header.len() + payload.len()] == payload[..]);
    // The counters move right after the writes.
    let deadline = Instant::now() + Duration::from_secs(2);
    while proxy.bytes(Direction::Down) < reply.len() as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(proxy.bytes(Direction::Up), request.len() as u64);
    assert_eq!(proxy.bytes(Direction::Down), reply.len() as u64);
    assert_eq!(proxy.connections(), 1);
}

#[test]
fn proxy_delay_delays_each_way() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(&server.addr());
    let mut stream = raw_connect(&proxy.addr());
    ping(&mut stream).expect("ping");
    proxy.delay_each(Duration::from_millis(300), Duration::from_millis(200));
    let started = Instant::now();
    ping(&mut stream).expect("delayed ping");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "a round trip through 300 + 200 ms took {took:?}"
    );
    // Latency, not bandwidth: ten pipelined pings take one round trip.
    let started = Instant::now();
    for _ in 0..10 {
        stream.write_all(b"PING\r\n").expect("send");
        std::thread::sleep(Duration::from_millis(5));
    }
    read_len(&mut stream, 70).expect("ten pongs");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1200),
        "ten pipelined pings took {took:?}"
    );
    proxy.pass();
    let started = Instant::now();
    ping(&mut stream).expect("ping");
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[test]
fn proxy_cut_closes_with_fin_and_refuses() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(&server.addr());
    let mut stream = raw_connect(&proxy.addr());
    ping(&mut stream).expect("ping");
    proxy.cut();
    let mut buf = [0u8; 16];
    // A FIN: a clean end of stream, not an error.
    assert_eq!(stream.read(&mut buf).expect("EOF after a cut"), 0);
    let mut refused = raw_connect(&proxy.addr());
    assert_eq!(refused.read(&mut buf).expect("EOF at once"), 0);
    proxy.pass();
    let mut again = raw_connect(&proxy.addr());
    ping(&mut again).expect("ping after the cut");
}

#[test]
fn proxy_reset_sends_rst() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(&server.addr());
    let mut stream = raw_connect(&proxy.addr());
    ping(&mut stream).expect("ping");
    proxy.reset();
    let mut buf = [0u8; 16];
    let error = stream.read(&mut buf).expect_err("a reset");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
    proxy.pass();
    ping(&mut raw_connect(&proxy.addr())).expect("ping after the reset");
}

#[test]
fn proxy_blackhole_stalls_then_heals() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(&server.addr());
    let mut stream = raw_connect(&proxy.addr());
    ping(&mut stream).expect("ping");
    proxy.blackhole();
    stream
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    stream
        .write_all(b"PING\r\n")
        .expect("a blackhole accepts writes");
    let mut buf = [0u8; 16];
    let error = stream
        .read(&mut buf)
        .expect_err("no reply through a blackhole");
    assert!(
        matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{error}"
    );
    // A new connection is accepted, then silent.
    let mut silent = raw_connect(&proxy.addr());
    silent
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    silent.write_all(b"PING\r\n").expect("send");
    assert!(
        silent.read(&mut buf).is_err(),
        "a reply through a blackhole"
    );
    let up_before = proxy.bytes(Direction::Up);
    proxy.pass();
    // What waited goes through once it heals.
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(read_len(&mut stream, 7).expect("held reply"), b"+PONG\r\n");
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(read_len(&mut silent, 7).expect("held reply"), b"+PONG\r\n");
    assert_eq!(proxy.bytes(Direction::Up), up_before + 12);
}

#[test]
fn proxy_reset_after_bytes_cuts_mid_stream() {
    let server = RedisServer::start(&[]);
    let proxy = Proxy::start(&server.addr());
    let mut stream = raw_connect(&proxy.addr());
    ping(&mut stream).expect("ping");
    let up_before = proxy.bytes(Direction::Up);
    proxy.reset_after_bytes(10);
    assert!(proxy.armed());
    let _ = stream.write_all(&echo_request(&[b'x'; 1000]));
    assert!(proxy.wait_fired(0, Duration::from_secs(5)), "never fired");
    let mut buf = [0u8; 16];
    let error = stream.read(&mut buf).expect_err("a reset");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}");
    assert_eq!(proxy.bytes(Direction::Up), up_before + 10);
    assert!(!proxy.armed());
    ping(&mut raw_connect(&proxy.addr())).expect("one shot: new connections pass");
}

// ---------------------------------------------------------------------------
// Plumbing of the ferry scenarios.

fn tails(processes: &[&FerryProcess]) -> String {
    processes
        .iter()
        .map(|process| process.log_tail(40))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `check` every 50 ms; panics after `timeout`, or when one of
/// `processes` exits on its own, with their log tails.
async fn wait_until(
    what: &str,
    timeout: Duration,
    processes: &[&FerryProcess],
    mut check: impl FnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}\n{}",
            tails(processes)
        );
        assert!(
            !processes.iter().any(|process| process.has_exited()),
            "a ferry process exited on its own while waiting for {what}\n{}",
            tails(processes)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Occurrences of `needle` in `process`'s log since `mark`.
fn logged_since(process: &FerryProcess, mark: u64, needle: &str) -> usize {
    process.log_since(mark).matches(needle).count()
}

fn info_stat(server: &RedisServer, field: &str) -> u64 {
    server
        .info_field(field)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO"))
}

/// Writes a fence key to the source and waits until the target has it: the
/// log is applied in order, so everything written before is applied too.
async fn wait_for_fence(source_url: &str, target: &RedisServer, processes: &[&FerryProcess]) {
    let fence = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string();
    let mut source = connect_url(source_url).await;
    call(&mut source, &["SET", "faults:fence", &fence]).await;
    let mut target_client = connect_url(&target.url()).await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let got = call(&mut target_client, &["GET", "faults:fence"]).await;
        if got.as_bytes().is_some_and(|b| b == fence.as_bytes()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the target did not get the fence key within {CONVERGE:?}\n{}",
            tails(processes)
        );
        assert!(
            !processes.iter().any(|process| process.has_exited()),
            "a ferry process exited on its own while waiting for the fence\n{}",
            tails(processes)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `iterations` of `INCR counter`, `LPUSH list burst:<i>` and a 1 KiB `SET`
/// pipelined at once: big ship and apply batches.
async fn burst(source_url: &str, iterations: u64) {
    let mut client = connect_url(source_url).await;
    let value = "v".repeat(1024);
    let mut cmds = Vec::new();
    for i in 0..iterations {
        cmds.push(cmd(&["INCR", "counter"]));
        cmds.push(cmd(&["LPUSH", "list", &format!("burst:{i}")]));
        cmds.push(cmd(&["SET", &format!("big:{}", i % 200), &value]));
    }
    for window in cmds.chunks(3000) {
        let replies = client.pipeline(window).await.expect("burst");
        assert!(replies.iter().all(|r| r.error_message().is_none()));
    }
}

async fn get_int(url: &str, key: &str) -> i64 {
    let mut client = connect_url(url).await;
    match call(&mut client, &["GET", key]).await {
        Frame::Null => 0,
        reply => text(&reply).parse().expect("an integer value"),
    }
}

/// The target equals the source key by key in every db, the load's
/// counters tell that every write arrived once (a burst while the load ran
/// is in them: they are the source's own values), the list is equal element
/// by element, and `ferry verify` finds no difference.
async fn assert_converged(
    what: &str,
    source_url: &str,
    target: &RedisServer,
    load: LoadReport,
    processes: &[&FerryProcess],
) {
    let target_url = target.url();
    wait_converged(source_url, &target_url, what, CONVERGE, || tails(processes)).await;
    let source_addr = source_url.trim_start_matches("redis://");
    assert_counters(what, &load, source_addr, &target.addr());
    let (mut s, mut t) = (
        connect_url(source_url).await,
        connect_url(&target_url).await,
    );
    let source_list = call(&mut s, &["LRANGE", "list", "0", "-1"]).await;
    let target_list = call(&mut t, &["LRANGE", "list", "0", "-1"]).await;
    assert!(
        source_list == target_list,
        "{what}: the list differs ({:?} elements on the source)",
        load.list_len
    );
    assert_verify_clean(what, source_url, &target_url, || tails(processes));
}

/// Fatal errors and panics in a node's log.
fn assert_no_fatal(process: &FerryProcess) {
    let log = process.log_since(0);
    for needle in [NODE_STOPS, "panicked"] {
        assert!(
            !log.contains(needle),
            "{needle:?} in the log\n{}",
            process.log_tail(40)
        );
    }
}

fn stop(process: &mut FerryProcess) {
    let status = process.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", process.log_tail(40));
}

fn write_config(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_path_buf()
}

/// `ferry sync` with `config` (TOML) from `dir/sync.toml`, data in
/// `dir/sync`.
fn start_sync(dir: &Path, source_url: &str, target_url: &str, config: &str) -> FerryProcess {
    let path = write_config(&dir.join("sync.toml"), config);
    FerryProcess::sync(
        &dir.join("sync"),
        source_url,
        target_url,
        &["--config", path.to_str().expect("utf-8 path")],
    )
}

/// Waits for the first full sync to be stored and applied; returns the
/// source's (`sync_full`, `sync_partial_ok`) from then on.
async fn initial_sync(
    listener: &FerryProcess,
    source_url: &str,
    source: &RedisServer,
    target: &RedisServer,
    processes: &[&FerryProcess],
) -> (u64, u64) {
    wait_until(
        "the first full sync to be stored",
        CONVERGE,
        processes,
        || listener.log_since(0).contains(FULL_SYNC_STORED),
    )
    .await;
    wait_for_fence(source_url, target, processes).await;
    (
        info_stat(source, "sync_full"),
        info_stat(source, "sync_partial_ok"),
    )
}

/// No full resync since the first one; `sync_partial_ok` as expected.
fn assert_resyncs(
    what: &str,
    source: &RedisServer,
    listener: &FerryProcess,
    (full, partial): (u64, u64),
    partial_growth: std::ops::RangeInclusive<u64>,
) {
    assert_eq!(
        info_stat(source, "sync_full"),
        full,
        "{what}: an unexpected full resync\n{}",
        listener.log_tail(40)
    );
    assert_eq!(
        listener.log_since(0).matches(FULL_SYNC_STARTED).count(),
        1,
        "{what}: more than one full resync logged"
    );
    let grew = info_stat(source, "sync_partial_ok") - partial;
    assert!(
        partial_growth.contains(&grew),
        "{what}: sync_partial_ok grew by {grew}, expected {partial_growth:?}\n{}",
        listener.log_tail(40)
    );
}

// ---------------------------------------------------------------------------
// a. Between the listener and the drainer.

/// `(listener.toml, drainer.toml)` in `dir`: the listener ships to
/// `endpoint`, the drainer listens on `drainer_port`; 1 s keepalives on
/// both sides. `drainer_wal` is extra `[wal]` text for the drainer.
fn split_configs(
    dir: &Path,
    source_url: &str,
    target_url: &str,
    endpoint: &str,
    drainer_port: u16,
    drainer_data: &Path,
    drainer_wal: &str,
) -> (PathBuf, PathBuf) {
    let secret = "faults-test-secret";
    let listener = write_config(
        &dir.join("listener.toml"),
        &format!(
            r#"data-dir = "{data}"
admin = "127.0.0.1:0"

[listener]
id = "faults-listener"
source = "{source_url}"
heartbeat-interval = "500ms"
reconnect-backoff-min = "50ms"
reconnect-backoff-max = "500ms"

[ship]
reconnect-min = "50ms"
reconnect-max = "500ms"
connect-timeout = "1s"
handshake-timeout = "3s"
keepalive = "1s"

[[drainers]]
id = "faults-drainer"
endpoint = "http://{endpoint}"
secret = "{secret}"
"#,
            data = dir.join("listener").display()
        ),
    );
    let drainer = write_config(
        &dir.join("drainer.toml"),
        &format!(
            r#"data-dir = "{data}"
admin = "127.0.0.1:0"
listen = "127.0.0.1:{drainer_port}"

[drainer]
hello-timeout = "2s"
replace-timeout = "5s"
keepalive = "1s"

[[drainer.listeners]]
id = "faults-listener"
secret = "{secret}"

[wal]
{drainer_wal}

[apply]
drainer-id = "faults-drainer"
target = "{target_url}"
retry-backoff-min = "50ms"
retry-backoff-max = "500ms"
"#,
            data = drainer_data.display()
        ),
    );
    (listener, drainer)
}

/// Who the drainer says is connected (`ferry status --json`).
fn connected_listener(drainer: &FerryProcess) -> Option<String> {
    drainer.status_json()["drainers"][0]["connected_listener"]
        .as_str()
        .map(str::to_string)
}

/// `ferry status --json`, retried until it answers (at most `timeout`).
fn status_within(process: &FerryProcess, timeout: Duration) -> serde_json::Value {
    let addr = process.admin_addr(timeout);
    let started = Instant::now();
    loop {
        let out = common::output_within(
            Command::new(common::ferry::ferry_bin()).args(["status", "--admin", &addr, "--json"]),
            Duration::from_secs(20),
        )
        .expect("ferry status");
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).expect("status JSON");
        }
        assert!(
            started.elapsed() < timeout,
            "ferry status did not answer for {timeout:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            process.log_tail(30)
        );
        println!(
            "ferry status failed after {:?}: {}",
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

fn ship_state(listener: &FerryProcess) -> String {
    listener.status_json()["listeners"][0]["shipping"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_drainer_link_faults() {
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "20000", "pre", "100"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let drainer_port = free_port();
    let proxy = Proxy::start(&format!("127.0.0.1:{drainer_port}"));
    let (listener_toml, drainer_toml) = split_configs(
        dir.path(),
        &source.url(),
        &target.url(),
        &proxy.addr(),
        drainer_port,
        &dir.path().join("drainer"),
        "",
    );
    let mut drainer =
        FerryProcess::with_config("drainer", &drainer_toml, &dir.path().join("drainer"));
    let mut listener =
        FerryProcess::with_config("listener", &listener_toml, &dir.path().join("listener"));
    let both = [&listener, &drainer];
    let stats = initial_sync(&listener, &source.url(), &source, &target, &both).await;
    let load = Load::start(&source.addr());

    // Cut for 2 s.
    let mark = listener.log_len();
    proxy.cut();
    wait_until("the listener to see the cut", NOTICE, &both, || {
        logged_since(&listener, mark, DRAINER_OFFLINE) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let healed = listener.log_len();
    proxy.pass();
    let took = wait_until(
        "the listener to reconnect after the cut",
        NOTICE,
        &both,
        || logged_since(&listener, healed, DRAINER_ONLINE) > 0,
    )
    .await;
    println!("cut 2 s: reconnected {took:?} after the heal");
    wait_for_fence(&source.url(), &target, &both).await;

    // 200 ms each way for 2 s.
    proxy.delay(Duration::from_millis(200));
    let started = Instant::now();
    wait_for_fence(&source.url(), &target, &both).await;
    let fence_took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(fence_took)).await;
    proxy.pass();
    println!("delay 200 ms: a fence took {fence_took:?}");
    assert!(
        fence_took >= Duration::from_millis(200),
        "a fence shipped through a 200 ms delay took {fence_took:?}"
    );

    // Blackhole for longer than the keepalives: both sides must notice.
    let (listener_mark, drainer_mark) = (listener.log_len(), drainer.log_len());
    proxy.blackhole();
    let listener_noticed = wait_until(
        "the listener to notice the blackhole",
        NOTICE,
        &both,
        || logged_since(&listener, listener_mark, DRAINER_OFFLINE) > 0,
    )
    .await;
    let drainer_noticed = wait_until(
        "the drainer to drop the blackholed stream",
        NOTICE,
        &both,
        || connected_listener(&drainer).is_none(),
    )
    .await;
    println!(
        "blackhole: the listener noticed after {listener_noticed:?}, the drainer after {:?}",
        drainer_noticed + listener_noticed
    );
    assert_eq!(
        ship_state(&listener),
        "OFFLINE",
        "{}",
        listener.log_tail(20)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let healed = listener.log_len();
    proxy.pass();
    wait_until(
        "the listener and the drainer to reconnect after the blackhole",
        NOTICE,
        &both,
        || {
            logged_since(&listener, healed, DRAINER_ONLINE) > 0
                && logged_since(&drainer, drainer_mark, STREAM_ACCEPTED) > 0
                && connected_listener(&drainer).is_some()
        },
    )
    .await;
    wait_for_fence(&source.url(), &target, &both).await;

    // Reset in the middle of a burst's batches.
    let fired = proxy.resets_fired();
    let mark = listener.log_len();
    proxy.reset_after_bytes(300_000);
    burst(&source.url(), 20_000).await;
    assert!(
        proxy.wait_fired(fired, NOTICE),
        "no 300 kB went to the drainer during a burst\n{}",
        tails(&both)
    );
    wait_until(
        "the listener to reconnect after the reset",
        NOTICE,
        &both,
        || logged_since(&listener, mark, DRAINER_ONLINE) > 0,
    )
    .await;

    let report = load.finish();
    println!("{report:?}; proxy saw {} connections", proxy.connections());
    assert_converged(
        "listener/drainer link faults",
        &source.url(),
        &target,
        report,
        &both,
    )
    .await;
    // The source link never broke.
    assert_resyncs(
        "listener/drainer link faults",
        &source,
        &listener,
        stats,
        0..=0,
    );
    for process in [&mut listener, &mut drainer] {
        stop(process);
        assert_no_fatal(process);
    }
}

// ---------------------------------------------------------------------------
// b. Between ferry and the source.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_link_faults() {
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "20000", "pre", "100"]);
    let proxy = Proxy::start(&source.addr());
    let proxied = format!("redis://{}", proxy.addr());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ferry = start_sync(
        dir.path(),
        &proxied,
        &target.url(),
        r#"[listener]
heartbeat-interval = "500ms"
reconnect-backoff-min = "50ms"
reconnect-backoff-max = "500ms"

[listener.replica]
connect-timeout = "1s"
read-timeout = "3s"
ack-interval = "500ms"
"#,
    );
    let stats = initial_sync(&ferry, &source.url(), &source, &target, &[&ferry]).await;
    let load = Load::start(&source.addr());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Cut: the listener resumes with a partial resync.
    let mark = ferry.log_len();
    let partial = info_stat(&source, "sync_partial_ok");
    proxy.cut();
    wait_until("the listener to lose the source", NOTICE, &[&ferry], || {
        logged_since(&ferry, mark, LINK_LOST) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.pass();
    wait_until("a partial resync after the cut", NOTICE, &[&ferry], || {
        logged_since(&ferry, mark, PARTIAL_RESYNC) > 0
    })
    .await;
    assert!(
        info_stat(&source, "sync_partial_ok") > partial,
        "sync_partial_ok after the cut"
    );
    wait_for_fence(&source.url(), &target, &[&ferry]).await;

    // Blackhole: only the replica read timeout (3 s) can tell.
    let mark = ferry.log_len();
    let partial = info_stat(&source, "sync_partial_ok");
    proxy.blackhole();
    let noticed = wait_until("the read timeout to fire", NOTICE, &[&ferry], || {
        logged_since(&ferry, mark, LINK_LOST) > 0
    })
    .await;
    println!("blackhole: the listener gave up on the source after {noticed:?}");
    assert!(
        noticed >= Duration::from_millis(2500),
        "the link was declared lost after {noticed:?}, before the 3 s read timeout\n{}",
        ferry.log_tail(20)
    );
    proxy.pass();
    wait_until(
        "a partial resync after the blackhole",
        NOTICE,
        &[&ferry],
        || logged_since(&ferry, mark, PARTIAL_RESYNC) > 0,
    )
    .await;
    assert!(
        info_stat(&source, "sync_partial_ok") > partial,
        "sync_partial_ok after the blackhole"
    );

    let report = load.finish();
    assert_converged(
        "source link faults",
        &source.url(),
        &target,
        report,
        &[&ferry],
    )
    .await;
    // At least the two resumes; a reconnect attempt made during the
    // blackhole may complete as a third once it heals.
    assert_resyncs("source link faults", &source, &ferry, stats, 2..=4);
    stop(&mut ferry);
    assert_no_fatal(&ferry);
}

// ---------------------------------------------------------------------------
// c. Between ferry and the target.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_link_faults() {
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "20000", "pre", "100"]);
    let proxy = Proxy::start(&target.addr());
    let proxied = format!("redis://{}", proxy.addr());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ferry = start_sync(
        dir.path(),
        &source.url(),
        &proxied,
        r#"[apply]
reply-timeout = "1s"
connect-timeout = "1s"
retry-backoff-min = "50ms"
retry-backoff-max = "500ms"
"#,
    );
    let stats = initial_sync(&ferry, &source.url(), &source, &target, &[&ferry]).await;
    let load = Load::start(&source.addr());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Cut for 1.5 s.
    let mark = ferry.log_len();
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.pass();
    wait_until(
        "the applier to fail and come back after the cut",
        NOTICE,
        &[&ferry],
        || {
            let log = ferry.log_since(mark);
            log.contains(APPLY_FAILED) && log.contains(APPLY_BACK)
        },
    )
    .await;

    // Blackhole for 2.5 s: the 1 s reply timeout gives up.
    let mark = ferry.log_len();
    proxy.blackhole();
    let noticed = wait_until("the applier to time out", NOTICE, &[&ferry], || {
        logged_since(&ferry, mark, APPLY_FAILED) > 0
    })
    .await;
    println!("blackhole: the applier gave up after {noticed:?}");
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(noticed)).await;
    proxy.pass();
    wait_until(
        "the applier to come back after the blackhole",
        NOTICE,
        &[&ferry],
        || logged_since(&ferry, mark, APPLY_BACK) > 0,
    )
    .await;

    // Reset in the middle of a batch (a burst makes ~2 MiB MULTI/EXECs).
    let fired = proxy.resets_fired();
    let mark = ferry.log_len();
    proxy.reset_after_bytes(500_000);
    burst(&source.url(), 20_000).await;
    assert!(
        proxy.wait_fired(fired, NOTICE),
        "no 500 kB went to the target during a burst\n{}",
        ferry.log_tail(40)
    );
    wait_until(
        "the applier to come back after the reset",
        NOTICE,
        &[&ferry],
        || logged_since(&ferry, mark, APPLY_BACK) > 0,
    )
    .await;

    let report = load.finish();
    assert_converged(
        "target link faults",
        &source.url(),
        &target,
        report,
        &[&ferry],
    )
    .await;
    assert_resyncs("target link faults", &source, &ferry, stats, 0..=0);
    stop(&mut ferry);
    assert_no_fatal(&ferry);
}

// ---------------------------------------------------------------------------
// d. SIGSTOP / SIGCONT.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_under_load() {
    sigstop_rounds(2).await;
}

/// Long variant: ten stalls.
/// Run: `cargo test --test faults -- --ignored sigstop_under_load_long`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: cargo test --test faults -- --ignored sigstop_under_load_long"]
async fn sigstop_under_load_long() {
    sigstop_rounds(10).await;
}

/// `ferry sync` frozen 2.5 s, `rounds` times, under the load.
async fn sigstop_rounds(rounds: usize) {
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "20000", "pre", "100"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ferry = start_sync(dir.path(), &source.url(), &target.url(), "");
    let stats = initial_sync(&ferry, &source.url(), &source, &target, &[&ferry]).await;
    let load = Load::start(&source.addr());
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(700)).await;
        signal(ferry.pid(), "STOP");
        // A batch ferry sent just before the signal may still commit.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = get_int(&target.url(), "counter").await;
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let frozen = get_int(&target.url(), "counter").await;
        signal(ferry.pid(), "CONT");
        assert_eq!(
            before, frozen,
            "round {round}: a stopped ferry applied writes"
        );
        wait_for_fence(&source.url(), &target, &[&ferry]).await;
    }
    let report = load.finish();
    assert_converged("SIGSTOP/SIGCONT", &source.url(), &target, report, &[&ferry]).await;
    // 2.5 s is far below the source's repl-timeout: the link holds.
    assert_resyncs("SIGSTOP/SIGCONT", &source, &ferry, stats, 0..=0);
    stop(&mut ferry);
    assert_no_fatal(&ferry);
}

// ---------------------------------------------------------------------------
// e. Source failover.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_failover() {
    let source = RedisServer::start(SOURCE_ARGS);
    let replica = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "20000", "pre", "100"]);
    replica.cmd(&["REPLICAOF", "127.0.0.1", &source.port.to_string()]);
    let proxy = Proxy::start(&source.addr());
    let proxied = format!("redis://{}", proxy.addr());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ferry = start_sync(
        dir.path(),
        &proxied,
        &target.url(),
        r#"[listener]
heartbeat-interval = "500ms"
reconnect-backoff-min = "50ms"
reconnect-backoff-max = "500ms"
"#,
    );
    let stats = initial_sync(&ferry, &source.url(), &source, &target, &[&ferry]).await;
    let load = Load::start(&source.addr());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = load.finish();

    // The old master is cut off ferry (its heartbeats stop too), then the
    // replica catches up with it and is promoted.
    let mark = ferry.log_len();
    proxy.cut();
    let mut old = connect_url(&source.url()).await;
    wait_until("the replica to catch up", NOTICE, &[&ferry], || {
        let master = info_stat(&source, "master_repl_offset");
        replica.info_field("master_link_status").as_deref() == Some("up")
            && info_stat(&replica, "master_repl_offset") == master
    })
    .await;
    let old_replid = text(&call(&mut old, &["INFO", "replication"]).await)
        .lines()
        .find_map(|line| line.strip_prefix("master_replid:").map(str::to_string))
        .expect("master_replid");
    replica.cmd(&["REPLICAOF", "NO", "ONE"]);
    let new_replid = replica.info_field("master_replid").expect("master_replid");
    assert_eq!(
        replica.info_field("master_replid2").as_deref(),
        Some(old_replid.trim()),
        "the promoted replica remembers the old replication id"
    );
    proxy.set_upstream(&replica.addr());
    proxy.pass();
    let load = Load::start(&replica.addr());
    wait_until(
        "the listener to continue on the promoted replica",
        NOTICE,
        &[&ferry],
        || logged_since(&ferry, mark, PARTIAL_RESYNC) > 0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = load.finish();
    let status = status_within(&ferry, NOTICE);
    assert_eq!(
        status["listeners"][0]["replid"].as_str(),
        Some(new_replid.as_str()),
        "the listener follows the new replication id\n{}",
        ferry.log_tail(20)
    );
    // The counters and the list continue on the new master (the second
    // load's values are the promoted replica's own, after the first's).
    assert!(second.counter > first.counter, "{first:?} then {second:?}");
    let report = second;
    assert_converged(
        "source failover",
        &replica.url(),
        &target,
        report,
        &[&ferry],
    )
    .await;
    assert_eq!(
        info_stat(&replica, "sync_full"),
        0,
        "a full resync from the promoted replica"
    );
    assert!(
        info_stat(&replica, "sync_partial_ok") >= 1,
        "no partial resync on the promoted replica"
    );
    // The replica's own full sync is counted before or after `stats` was
    // read, depending on how fast it finished; ferry adds none.
    let source_full = info_stat(&source, "sync_full");
    assert!(
        source_full == stats.0 || source_full == stats.0 + 1,
        "source sync_full {source_full}, {} when ferry's first sync was done: more than the replica's own",
        stats.0
    );
    assert_eq!(
        ferry.log_since(0).matches(FULL_SYNC_STARTED).count(),
        1,
        "a second full resync\n{}",
        ferry.log_tail(40)
    );
    stop(&mut ferry);
    assert_no_fatal(&ferry);
}

// ---------------------------------------------------------------------------
// f. Disk full on the drainer.

/// A tmpfs mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a `size` tmpfs on `dir`; the reason if that is not possible
    /// here (not root, no mount(8), a container without CAP_SYS_ADMIN).
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let out = common::output_within(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
            Duration::from_secs(10),
        )
        .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Fills the file system of `path` with a file until it reports ENOSPC.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("create filler");
    let block = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(28), "filling: {error}");
                break;
            }
        }
    }
    let _ = file.sync_all();
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drainer_disk_full() {
    let dir = tempfile::tempdir().expect("temp dir");
    // No skipping: a disk-full scenario that cannot be set up is a failure
    // with the reason (CI runs as root, where the mount works).
    let mount = Tmpfs::mount(&dir.path().join("mnt"), "64m").unwrap_or_else(|reason| {
        panic!(
            "drainer_disk_full needs a 64 MiB tmpfs and cannot mount one here: {reason} \
             (run as root, or with CAP_SYS_ADMIN)"
        )
    });
    let source = RedisServer::start(SOURCE_ARGS);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "5000", "pre", "100"]);
    let drainer_port = free_port();
    let drainer_data = mount.dir.join("drainer");
    let (listener_toml, drainer_toml) = split_configs(
        dir.path(),
        &source.url(),
        &target.url(),
        &format!("127.0.0.1:{drainer_port}"),
        drainer_port,
        &drainer_data,
        "memtable-budget = \"8MiB\"\ncf-write-buffer-size = \"1MiB\"\nmax-rocksdb-wal-size = \"8MiB\"\nblock-cache-size = \"4MiB\"\nmin-free-space = \"16MiB\"",
    );
    let mut drainer = FerryProcess::with_config("drainer", &drainer_toml, &drainer_data);
    let mut listener =
        FerryProcess::with_config("listener", &listener_toml, &dir.path().join("listener"));
    let stats = initial_sync(
        &listener,
        &source.url(),
        &source,
        &target,
        &[&listener, &drainer],
    )
    .await;
    let load = Load::start(&source.addr());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let filler = mount.dir.join("filler");
    let mark = drainer.log_len();
    let filled = fill(&filler);
    println!("filled the drainer's tmpfs with {} MiB", filled >> 20);
    let disk_error = |log: &str| log.contains("No space left on device") || log.contains("ENOSPC");
    let started = Instant::now();
    while !disk_error(&drainer.log_since(mark)) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the drainer did not report a full disk\n{}",
            tails(&[&listener, &drainer])
        );
        burst(&source.url(), 5_000).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let error_line = drainer
        .log_since(mark)
        .lines()
        .find(|line| disk_error(line))
        .unwrap_or_default()
        .to_string();
    println!("the drainer reported: {error_line}");
    // Its policy on a failed WAL write: stop (the state of the write is
    // unknown until the WAL is reopened). Give it the time to.
    let stopped = {
        let deadline = Instant::now() + Duration::from_secs(15);
        while drainer.try_exit().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drainer.try_exit()
    };
    match stopped {
        Some(status) => {
            println!("the drainer stopped: {status}");
            assert!(
                !status.success(),
                "a drainer stopped by a disk error exits 0"
            );
            assert!(
                drainer.log_since(mark).contains(NODE_STOPS),
                "the drainer exited without saying why\n{}",
                drainer.log_tail(30)
            );
        }
        None => {
            let status = drainer.status_json();
            println!(
                "the drainer kept running; status: {}",
                status["drainers"][0]
            );
            // Its WAL paused writes: status names the full disk.
            let error = status["drainers"][0]["last_error"].as_str().unwrap_or("");
            assert!(
                disk_error(error),
                "status does not name the full disk: {status}"
            );
        }
    }
    // The listener keeps everything meanwhile (backpressure, no loss).
    assert!(!listener.has_exited(), "{}", listener.log_tail(30));
    std::fs::remove_file(&filler).expect("free the space");
    // Once space is back the drainer writes on. If RocksDB itself hit the
    // full disk meanwhile (the filler takes every byte, faster than the
    // min-free-space check), Debian's librocksdb aborts on its next sync of
    // that file (an assertion), or the WAL stops the node when RocksDB
    // reported a background error: either way a restart recovers from what
    // was acknowledged, which is what is checked below.
    let mut restarted = stopped.is_some();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !restarted && Instant::now() < deadline {
        if let Some(status) = drainer.try_exit() {
            println!("the drainer stopped after the space came back: {status}");
            restarted = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if restarted {
        drainer.kill9();
        drainer.spawn();
    }
    let report = load.finish();
    assert_converged(
        "drainer disk full",
        &source.url(),
        &target,
        report,
        &[&listener, &drainer],
    )
    .await;
    assert_resyncs("drainer disk full", &source, &listener, stats, 0..=0);
    stop(&mut listener);
    stop(&mut drainer);
    assert_no_fatal(&listener);
}
