//! The admin API end to end: a real `serve_admin` on a loopback port, the
//! real `ferry` binary as its client.
//!
//! The node behind the API is [`FixtureNode`], a small `NodeControl` that
//! holds a `NodeStatus` and flips its shippers' state on stop/restart: the
//! API under test serves whatever a node reports, so a fixed status is the
//! right input here (the real nodes' statuses are tested with the nodes).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::admin::{self, AdminError, AdminService};
use ferry::cli::status::{render_status, RenderStyle};
use ferry::status::{
    BlockedEntry, ControlError, DrainerSide, ListenerSide, NodeControl, NodeStatus, ShipSide,
    SkipOutcome, SkipRequest, SnapshotLoad, SyncSelector,
};
use tokio_util::sync::CancellationToken;

/// Upper bound for one CLI run; the client's own bound is 3 s + 5 s.
const RUN_LIMIT: Duration = Duration::from_secs(30);

struct FixtureNode {
    status: Mutex<NodeStatus>,
}

impl FixtureNode {
    fn set_state(&self, which: &SyncSelector, from: &str, to: &str) -> Result<usize, ControlError> {
        let mut status = self.status.lock().unwrap();
        if status.listeners.is_empty() {
            return Err(ControlError::NoListener("stop or restart"));
        }
        let mut matched = 0;
        let mut changed = 0;
        for listener in &mut status.listeners {
            if which.partition.is_some_and(|p| p != listener.partition) {
                continue;
            }
            for ship in &mut listener.shipping {
                if which
                    .drainer_id
                    .as_ref()
                    .is_some_and(|d| *d != ship.drainer_id)
                {
                    continue;
                }
                matched += 1;
                if ship.state != to && (from.is_empty() || ship.state == from) {
                    ship.state = to.to_string();
                    changed += 1;
                }
            }
        }
        if matched == 0 {
            return Err(ControlError::NoMatch {
                partition: which.partition,
                drainer_id: which.drainer_id.clone(),
            });
        }
        Ok(changed)
    }
}

impl NodeControl for FixtureNode {
    fn status(&self) -> NodeStatus {
        self.status.lock().unwrap().clone()
    }
    fn stop_sync(&self, which: &SyncSelector) -> Result<usize, ControlError> {
        self.set_state(which, "", "STOPPED")
    }
    fn restart_sync(&self, which: &SyncSelector) -> Result<usize, ControlError> {
        self.set_state(which, "STOPPED", "ONLINE")
    }
    /// Takes the skip of the blocking entry the way the real node does
    /// (src/node/run.rs), as far as the status shows.
    fn skip(&self, request: &SkipRequest) -> Result<SkipOutcome, ControlError> {
        let mut status = self.status.lock().unwrap();
        if status.drainers.is_empty() {
            return Err(ControlError::NoDrainer);
        }
        let side = status
            .drainers
            .iter_mut()
            .find(|side| {
                side.partition == request.partition
                    && request
                        .drainer_id
                        .as_ref()
                        .map_or(true, |id| *id == side.drainer_id)
            })
            .ok_or_else(|| ControlError::NoApplier {
                partition: request.partition,
                drainer_id: request.drainer_id.clone(),
            })?;
        let Some(blocked) = side.blocked.clone() else {
            return Err(ControlError::Refused(format!(
                "partition {} is not blocked (nothing to skip)",
                request.partition
            )));
        };
        if blocked.log_id != request.log_id {
            return Err(ControlError::Refused(format!(
                "partition {} is blocked on entry {}, not {}",
                request.partition, blocked.log_id, request.log_id
            )));
        }
        side.blocked = None;
        side.state = "ONLINE".into();
        side.entries_skipped += 1;
        side.last_skipped = Some(blocked.log_id);
        Ok(SkipOutcome {
            dead_letter_file: side.dead_letter_file.clone().unwrap_or_default(),
            done: true,
        })
    }
}

fn ship(drainer: &str, lag: u64) -> ShipSide {
    ShipSide {
        drainer_id: drainer.into(),
        endpoint: format!("http://127.0.0.1:9{drainer}"),
        state: "ONLINE".into(),
        acked: 100 - lag,
        lag,
        latency_ms: lag * 10,
        fallback_snapshots: 0,
        entries_sent: 100 - lag,
        bytes_sent: 4096,
        last_error: None,
        reconnects: 0,
    }
}

fn listener(partition: u32) -> ListenerSide {
    ListenerSide {
        listener_id: "l1".into(),
        partition,
        source: "127.0.0.1:6379".into(),
        shard: None,
        source_state: "ONLINE".into(),
        source_error: None,
        replid: Some("0123456789abcdef0123456789abcdef01234567".into()),
        received_offset: 5000 + u64::from(partition),
        durable_offset: 4990,
        first_log_id: 1,
        last_log_id: 100,
        full_syncs: 1,
        partial_resyncs: 0,
        full_sync_bytes_received: 2048,
        full_sync_bytes_total: Some(2048),
        heartbeat_latency_ms: Some(2),
        reconnects: 0,
        shipping: vec![ship("d1", 0), ship("d2", 7)],
    }
}

fn sync_status() -> NodeStatus {
    NodeStatus {
        two_way: None,
        role: "sync".into(),
        taken_unix_ms: 1_700_000_000_000,
        listeners: vec![listener(0), listener(1)],
        drainers: vec![DrainerSide {
            drainer_id: "d1".into(),
            partition: 0,
            target: "127.0.0.1:6380".into(),
            state: "OFFLINE".into(),
            last_error: Some("connection refused".into()),
            connected_listener: Some("l1".into()),
            durable: 100,
            applied: 93,
            lag: 7,
            latency_ms: 1234,
            epoch: 1,
            commands_applied: 93,
            commands_refused: 0,
            snapshot_load: Some(SnapshotLoad {
                epoch: 1,
                rdb_bytes: 2048,
                bytes_loaded: 2048,
                keys_loaded: 3,
                done: true,
            }),
            blocked: None,
            entries_skipped: 0,
            last_skipped: None,
            dead_letter_file: Some("/data/dead-letter/d1-0.resp".into()),
            fence: Some("client-kill".into()),
            last_refused: None,
            split_entries: 0,
            echoes: 0,
            fallback_snapshots: 0,
            foreign_writes: 0,
            foreign_windows: 0,
            foreign_samples: Vec::new(),
            handoff: None,
            voided: None,
            cluster: None,
            reconnects: 0,
        }],
        wals: Vec::new(),
    }
}

/// `serve_admin` on 127.0.0.1:0 in its own runtime; stopped on drop, and
/// the drop checks that it stopped promptly and cleanly.
struct AdminFixture {
    runtime: tokio::runtime::Runtime,
    node: Arc<FixtureNode>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<Result<(), AdminError>>>,
}

impl AdminFixture {
    fn start(status: NodeStatus) -> AdminFixture {
        AdminFixture::start_with(status, admin::AdminAccess::default())
    }

    /// With a token and/or TLS.
    fn start_with(status: NodeStatus, access: admin::AdminAccess) -> AdminFixture {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let node = Arc::new(FixtureNode {
            status: Mutex::new(status),
        });
        let shutdown = CancellationToken::new();
        let (addr, served) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let control: Arc<dyn NodeControl> = node.clone();
            let served = tokio::spawn(admin::serve_admin(
                listener,
                control,
                access,
                shutdown.clone(),
            ));
            (addr, served)
        });
        AdminFixture {
            runtime,
            node,
            addr,
            shutdown,
            served: Some(served),
        }
    }

    fn admin(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for AdminFixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let Some(served) = self.served.take() else {
            return;
        };
        let result = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), served).await });
        if !std::thread::panicking() {
            let served = result.expect("serve_admin did not stop within 5 s of shutdown");
            served.unwrap().unwrap();
        }
    }
}

fn ferry(args: &[&str]) -> Output {
    common::output_within(
        Command::new(env!("CARGO_BIN_EXE_ferry")).args(args),
        RUN_LIMIT,
    )
    .unwrap()
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "ferry failed: {:?}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr_of_failure(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "ferry succeeded: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn json_status(addr_args: &[&str]) -> serde_json::Value {
    let mut args = vec!["status"];
    args.extend_from_slice(addr_args);
    args.push("--json");
    let text = stdout_of(&ferry(&args));
    assert_eq!(
        text.lines().count(),
        1,
        "one JSON object on one line: {text}"
    );
    serde_json::from_str(&text).unwrap()
}

fn ship_states(status: &serde_json::Value) -> Vec<(u64, String, String)> {
    let mut states = Vec::new();
    for listener in status["listeners"].as_array().unwrap() {
        for ship in listener["shipping"].as_array().unwrap() {
            states.push((
                listener["partition"].as_u64().unwrap(),
                ship["drainer_id"].as_str().unwrap().to_string(),
                ship["state"].as_str().unwrap().to_string(),
            ));
        }
    }
    states
}

fn states(list: &[(u64, &str, &str)]) -> Vec<(u64, String, String)> {
    list.iter()
        .map(|(p, d, s)| (*p, d.to_string(), s.to_string()))
        .collect()
}

#[test]
fn status_json_is_the_node_status() {
    let fixture = AdminFixture::start(sync_status());
    let json = json_status(&["--admin", &fixture.admin()]);
    assert_eq!(json, serde_json::to_value(sync_status()).unwrap());
    // Stable names the scripts rely on.
    assert_eq!(json["listeners"][1]["shipping"][1]["lag"], 7);
    assert_eq!(json["drainers"][0]["snapshot_load"]["done"], true);
}

#[test]
fn status_table_shows_both_sections() {
    let fixture = AdminFixture::start(sync_status());
    let text = stdout_of(&ferry(&["status", "--admin", &fixture.admin()]));
    // Everything but the first line (the reading's age) is what the pure
    // renderer makes of the same status.
    let expected = render_status(&sync_status(), 0, RenderStyle::default());
    let body = |text: &str| text.split_once('\n').map(|(_, rest)| rest.to_string());
    assert_eq!(body(&text), body(&expected), "{text}");
    assert!(text.starts_with("ferry sync: status taken "), "{text}");
    for row in [
        "| 0      | d1      | ONLINE      | 0         | 0                 | 100   | 0                  |",
        "| 1      | d2      | ONLINE      | 7         | 70                | 93    | 0                  |",
        "| 0      | 127.0.0.1:6380 | OFFLINE     | 7         | 1234              | 93      | 1     |",
        "  part 0 → 127.0.0.1:6380: last error: connection refused",
    ] {
        assert!(text.contains(row), "missing {row:?} in\n{text}");
    }
}

#[test]
fn stop_and_restart_sync_flip_the_selected_shippers() {
    let fixture = AdminFixture::start(sync_status());
    let admin = fixture.admin();

    let out = stdout_of(&ferry(&[
        "stop-sync",
        "--admin",
        &admin,
        "--partition",
        "0",
    ]));
    assert_eq!(out, "stopped 2 syncs (selected: partition 0)\n");
    assert_eq!(
        ship_states(&json_status(&["--admin", &admin])),
        states(&[
            (0, "d1", "STOPPED"),
            (0, "d2", "STOPPED"),
            (1, "d1", "ONLINE"),
            (1, "d2", "ONLINE"),
        ])
    );
    let table = stdout_of(&ferry(&["status", "--admin", &admin]));
    assert!(
        table.contains("| 0      | d2      | STOPPED     | 7         | 70 "),
        "{table}"
    );

    let out = stdout_of(&ferry(&[
        "restart-sync",
        "--admin",
        &admin,
        "--drainer",
        "d2",
    ]));
    assert_eq!(out, "restarted 1 sync (selected: drainer d2)\n");
    assert_eq!(
        ship_states(&json_status(&["--admin", &admin])),
        states(&[
            (0, "d1", "STOPPED"),
            (0, "d2", "ONLINE"),
            (1, "d1", "ONLINE"),
            (1, "d2", "ONLINE"),
        ])
    );

    // Without a selector: everything.
    let out = stdout_of(&ferry(&["stop-sync", "--admin", &admin]));
    assert_eq!(out, "stopped 3 syncs (selected: all)\n");
    assert!(fixture
        .node
        .status()
        .listeners
        .iter()
        .flat_map(|l| &l.shipping)
        .all(|s| s.state == "STOPPED"));

    // A selection that matches nothing is the node's NOT_FOUND, shown as is.
    let error = stderr_of_failure(&ferry(&[
        "restart-sync",
        "--admin",
        &admin,
        "--partition",
        "9",
    ]));
    assert!(
        error.contains(&format!(
            "ferry at {admin}: no sync matches partition Some(9)"
        )),
        "{error}"
    );
}

/// `ferry skip` through the API: only the blocking entry, named by
/// partition (and drainer), errors as the operator sees them.
#[test]
fn skip_takes_only_the_blocking_entry() {
    let mut status = sync_status();
    status.drainers[0].state = "BLOCKED".into();
    status.drainers[0].blocked = Some(BlockedEntry {
        log_id: 94,
        command: "LPUSH".into(),
        error: "ERR unknown command 'LPUSH'".into(),
        transient: false,
        since_unix_ms: 1_700_000_000_000,
    });
    let fixture = AdminFixture::start(status);
    let admin = fixture.admin();
    let json = json_status(&["--admin", &admin]);
    assert_eq!(json["drainers"][0]["state"], "BLOCKED");
    assert_eq!(json["drainers"][0]["blocked"]["log_id"], 94);
    assert_eq!(json["drainers"][0]["blocked"]["transient"], false);

    let skip = |args: &[&str]| {
        let mut all = vec!["skip", "--admin", &admin];
        all.extend_from_slice(args);
        ferry(&all)
    };
    let error = stderr_of_failure(&skip(&["--partition", "0", "--log-id", "95"]));
    assert!(
        error.contains("partition 0 is blocked on entry 94, not 95"),
        "{error}"
    );
    let error = stderr_of_failure(&skip(&["--partition", "3", "--log-id", "94"]));
    assert!(error.contains("no applier of partition 3"), "{error}");
    let error = stderr_of_failure(&skip(&[
        "--partition",
        "0",
        "--log-id",
        "94",
        "--drainer",
        "d9",
    ]));
    assert!(error.contains("no applier of partition 0"), "{error}");
    let error = stderr_of_failure(&skip(&["--partition", "0"]));
    assert!(error.contains("--log-id"), "{error}");
    let out = stdout_of(&skip(&[
        "--partition",
        "0",
        "--log-id",
        "94",
        "--drainer",
        "d1",
    ]));
    assert_eq!(
        out,
        "skipped entry 94 of partition 0; recorded in /data/dead-letter/d1-0.resp\n"
    );
    let json = json_status(&["--admin", &admin]);
    assert_eq!(json["drainers"][0]["blocked"], serde_json::Value::Null);
    assert_eq!(json["drainers"][0]["entries_skipped"], 1);
    let error = stderr_of_failure(&skip(&["--partition", "0", "--log-id", "94"]));
    assert!(error.contains("partition 0 is not blocked"), "{error}");
}

#[test]
fn control_of_a_process_without_listener_is_refused() {
    let mut status = sync_status();
    status.role = "drainer".into();
    status.listeners.clear();
    let fixture = AdminFixture::start(status);
    let error = stderr_of_failure(&ferry(&["stop-sync", "--admin", &fixture.admin()]));
    assert!(error.contains("this process runs no listener"), "{error}");
    let mut no_drainer = sync_status();
    no_drainer.drainers.clear();
    let listener_only = AdminFixture::start(no_drainer);
    let error = stderr_of_failure(&ferry(&[
        "skip",
        "--admin",
        &listener_only.admin(),
        "--partition",
        "0",
        "--log-id",
        "1",
    ]));
    assert!(error.contains("this process runs no drainer"), "{error}");
    // Status still works and says so.
    let text = stdout_of(&ferry(&["status", "--admin", &fixture.admin()]));
    assert!(
        text.contains("Listener → drainer\n  (no listener in this process)\n"),
        "{text}"
    );
}

#[test]
fn status_by_data_dir_reads_the_addr_file() {
    let fixture = AdminFixture::start(sync_status());
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();

    let error = stderr_of_failure(&ferry(&["status", "--data-dir", data_dir]));
    assert!(error.contains(&format!("{data_dir}/admin.addr")), "{error}");
    assert!(
        error.contains(&format!("is ferry running with --data-dir {data_dir}?")),
        "{error}"
    );

    admin::write_addr_file(dir.path(), fixture.addr).unwrap();
    let json = json_status(&["--data-dir", data_dir]);
    assert_eq!(json["role"], "sync");
    let out = stdout_of(&ferry(&[
        "stop-sync",
        "--data-dir",
        data_dir,
        "--drainer",
        "d1",
    ]));
    assert_eq!(out, "stopped 2 syncs (selected: drainer d1)\n");

    // One or the other, not both.
    let both = ferry(&[
        "status",
        "--data-dir",
        data_dir,
        "--admin",
        &fixture.admin(),
    ]);
    let error = stderr_of_failure(&both);
    assert!(error.contains("cannot be used with"), "{error}");
}

#[test]
fn nothing_listening_is_a_clear_error() {
    let port = common::free_port();
    let admin = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let error = stderr_of_failure(&ferry(&["status", "--admin", &admin]));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        error.contains(&format!("cannot reach the ferry admin API at {admin}: ")),
        "{error}"
    );
    assert!(error.to_lowercase().contains("refused"), "{error}");
    let error = stderr_of_failure(&ferry(&["stop-sync", "--admin", &admin]));
    assert!(
        error.contains("cannot reach the ferry admin API"),
        "{error}"
    );
    let error = stderr_of_failure(&ferry(&["status", "--admin", "localhost"]));
    assert!(
        error.contains("bad admin address \"localhost\": no port"),
        "{error}"
    );
}

/// A TCP server on 127.0.0.1 that answers every connection with `reply`
/// (nothing if empty) and then keeps it open, reading, until the test ends.
fn raw_server(reply: &'static [u8]) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let _ = stream.write_all(reply);
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

#[test]
fn a_garbage_server_is_an_error_not_a_hang() {
    let addr = raw_server(b"HTTP/1.1 400 Bad Request\r\n\r\n\x00\xff\x13junk junk junk");
    let started = Instant::now();
    let error = stderr_of_failure(&ferry(&["status", "--admin", &addr.to_string()]));
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        error.contains(&format!("ferry admin API at {addr}")),
        "{error}"
    );
}

#[test]
fn a_silent_server_times_out() {
    let addr = raw_server(b"");
    let started = Instant::now();
    let error = stderr_of_failure(&ferry(&["status", "--admin", &addr.to_string()]));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(12), "took {took:?}");
    assert!(
        error.contains(&format!(
            "the ferry admin API at {addr} did not answer within 5s"
        )),
        "{error}"
    );
}

#[test]
fn oversized_replies_are_refused_by_the_client() {
    // A server without the admin API's own encoding limit, sending a status
    // larger than the client accepts.
    let mut status = sync_status();
    status.listeners[0].source_error = Some("x".repeat(admin::MAX_MESSAGE_BYTES + 1));
    let node: Arc<dyn NodeControl> = Arc::new(FixtureNode {
        status: Mutex::new(status),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming =
            tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(admin::AdminServer::new(AdminService::new(node)))
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
        );
        let error = admin::fetch_status(&addr, &admin::ClientAccess::default())
            .await
            .unwrap_err();
        match &error {
            AdminError::Call { message, .. } => {
                assert!(message.contains("too large"), "{error}")
            }
            other => panic!("expected a failed call, got {other}"),
        }
        shutdown.cancel();
        server.await.unwrap().unwrap();
    });
}

#[test]
fn the_server_refuses_an_oversized_status_too() {
    let mut status = sync_status();
    status.drainers[0].last_error = Some("y".repeat(admin::MAX_MESSAGE_BYTES + 1));
    let fixture = AdminFixture::start(status);
    let error = stderr_of_failure(&ferry(&["status", "--admin", &fixture.admin()]));
    assert!(error.contains("ferry admin API at"), "{error}");
}

/// Runs `ferry ARGS` for `run_for`, then interrupts it (SIGINT, like
/// Ctrl-C) and returns its output; it must exit promptly and cleanly.
fn ferry_interrupted(args: &[&str], run_for: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(run_for);
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    if !common::wait_exit_within(&mut child, Duration::from_secs(5)) {
        let _ = child.kill();
        panic!("ferry {args:?} still running 5 s after SIGINT");
    }
    child.wait_with_output().unwrap()
}

#[test]
fn watch_repeats_readings_until_interrupted() {
    let fixture = AdminFixture::start(sync_status());
    let admin = fixture.admin();

    let out = ferry_interrupted(
        &["status", "--admin", &admin, "--json", "--watch", "0.2"],
        Duration::from_millis(1500),
    );
    let text = stdout_of(&out);
    let readings: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(readings.len() >= 3, "{text}");
    assert!(readings.iter().all(|r| r["role"] == "sync"));

    // Not a terminal: plain readings one after the other, no screen control.
    let out = ferry_interrupted(
        &["status", "--admin", &admin, "--watch", "0.2"],
        Duration::from_millis(1500),
    );
    let text = stdout_of(&out);
    assert!(
        text.matches("ferry sync: status taken ").count() >= 3,
        "{text}"
    );
    assert!(!text.contains('\x1b'), "{text}");
    assert!(!text.contains("%"), "no bars off a terminal: {text}");
}

#[test]
fn watch_on_a_terminal_redraws_with_progress_bars() {
    let mut status = sync_status();
    status.listeners[0].source_state = "FULL_SYNC".into();
    status.listeners[0].full_sync_bytes_received = 21 << 20;
    status.listeners[0].full_sync_bytes_total = Some(50 << 20);
    let fixture = AdminFixture::start(status);
    // `script` (util-linux, Debian's essential bsdutils) gives ferry a
    // pseudo-terminal as stdout; `timeout -s INT` is the operator's Ctrl-C.
    let inner = format!(
        "timeout -s INT 1.5 {} status --admin {} --watch 0.3",
        env!("CARGO_BIN_EXE_ferry"),
        fixture.admin()
    );
    let out = common::output_within(
        Command::new("script").args(["-qec", &inner, "/dev/null"]),
        RUN_LIMIT,
    )
    .expect("script(1) from util-linux runs ferry on a pseudo-terminal");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("\x1b[H\x1b[2J").count() >= 3, "{text:?}");
    assert!(text.contains("every 0.3 s (Ctrl-C to stop)"), "{text:?}");
    assert!(
        text.contains("part 0: full sync: [########............]  42% 21.0 of 50.0 MiB received"),
        "{text:?}"
    );
}

#[test]
fn metrics_are_served_over_http_next_to_grpc() {
    let fixture = AdminFixture::start(sync_status());
    let addr = fixture.admin();
    let reply = common::http::get(&addr, "/metrics").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some(ferry::metrics::CONTENT_TYPE)
    );
    assert!(
        reply
            .body
            .contains("ferry_ship_lag_entries{role=\"sync\",listener_id=\"l1\",partition=\"1\",drainer_id=\"d2\"} 7\n"),
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains(
            "ferry_apply_lag_seconds{role=\"sync\",drainer_id=\"d1\",partition=\"0\"} 1.234\n"
        ),
        "{}",
        reply.body
    );
    common::http::promtool_check(&reply.body).unwrap();

    for path in ["/", "/metrics/x", "/status"] {
        let reply = common::http::get(&addr, path).unwrap();
        assert_eq!(reply.status, 404, "{path}: {reply:?}");
    }
    // gRPC on the same port, after and between the HTTP requests.
    let status = json_status(&["--admin", &addr]);
    assert_eq!(status["drainers"][0]["applied"], 93);
    assert_eq!(common::http::get(&addr, "/metrics").unwrap().status, 200);
}

#[test]
fn a_token_guards_every_call_and_the_metrics() {
    let token = "admin-token-0123456789";
    let fixture = AdminFixture::start_with(
        sync_status(),
        admin::AdminAccess {
            token: Some(token.into()),
            ..admin::AdminAccess::default()
        },
    );
    let addr = fixture.admin();
    let dir = tempfile::tempdir().unwrap();
    let right = dir.path().join("token");
    std::fs::write(&right, format!("{token}\n")).unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-token-0123456789\n").unwrap();

    for given in [None, Some(&wrong)] {
        let mut args = vec!["status", "--admin", &addr];
        if let Some(file) = given {
            args.extend(["--token-file", file.to_str().unwrap()]);
        }
        let out = ferry(&args);
        let stderr = stderr_of_failure(&out);
        assert!(stderr.contains("UNAUTHENTICATED"), "{given:?}: {stderr}");
        assert!(!stderr.contains(token), "{stderr}");
        let mut control = vec!["stop-sync", "--admin", &addr];
        if let Some(file) = given {
            control.extend(["--token-file", file.to_str().unwrap()]);
        }
        let stderr = stderr_of_failure(&ferry(&control));
        assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    }
    assert_eq!(
        fixture.node.status().listeners[0].shipping[0].state,
        "ONLINE",
        "a refused stop-sync stopped nothing"
    );
    let status = json_status(&["--admin", &addr, "--token-file", right.to_str().unwrap()]);
    assert_eq!(status["drainers"][0]["applied"], 93);

    // HTTP: 401 on every path without the token, the metrics with it.
    let bearer = format!("Bearer {token}");
    for (path, headers) in [
        ("/metrics", vec![]),
        (
            "/metrics",
            vec![("Authorization", "Bearer not-the-token-0123456789")],
        ),
        ("/metrics", vec![("Authorization", token)]),
        ("/nowhere", vec![]),
    ] {
        let reply = common::http::get_with(&addr, path, &headers).unwrap();
        assert_eq!(reply.status, 401, "{path} {headers:?}: {reply:?}");
        assert!(!reply.body.contains("ferry_"), "{reply:?}");
    }
    let reply =
        common::http::get_with(&addr, "/metrics", &[("Authorization", bearer.as_str())]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply.body.contains("ferry_ship_lag_entries"),
        "{}",
        reply.body
    );
}
