//! `ferry serve` as a process between real redis-servers: tasks created,
//! watched, stopped, started and canceled through the HTTP API and `ferry
//! task`, a kill -9 of the daemon survived, passwords never shown, bad
//! requests answered with their error, and the bearer token enforced.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::ferry::{ferry_bin, FerryProcess};
use common::{free_port, output_within, RedisServer};
use serde_json::{json, Value};

const TARGET_PASSWORD: &str = "t4rget-s3cret-pw";

/// One HTTP/1.1 request; (status, body as JSON or a string).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to ferry serve");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = body.unwrap_or(b"");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/json\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body.
    let _ = stream.write_all(body);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP reply: {:?}", String::from_utf8_lossy(&reply)));
    let head = String::from_utf8_lossy(&reply[..split]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let text = &reply[split + 4..];
    let value = serde_json::from_slice(text)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(text).into_owned()));
    (status, value)
}

fn ferry_cli(args: &[&str]) -> Output {
    output_within(
        Command::new(ferry_bin()).args(args).env("RUST_LOG", "warn"),
        Duration::from_secs(150),
    )
    .expect("run ferry")
}

struct Daemon {
    process: FerryProcess,
    http: String,
    data: std::path::PathBuf,
}

impl Daemon {
    /// Starts `ferry serve` on an ephemeral port (its bound address read
    /// from `<data>/http.addr`: a port picked free beforehand could be
    /// taken meanwhile by a parallel test's Redis, which closes an HTTP
    /// request without a reply).
    fn start(data: &Path, extra: &[&str]) -> Daemon {
        let _ = std::fs::remove_file(data.join("http.addr"));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data.to_str().unwrap().into(),
            "--http".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = FerryProcess::start(data, &args);
        let mut daemon = Daemon {
            process,
            http: String::new(),
            data: data.to_path_buf(),
        };
        daemon.wait_up();
        daemon
    }

    /// Starts the killed daemon again (a new ephemeral port).
    fn respawn(&mut self) {
        let _ = std::fs::remove_file(self.data.join("http.addr"));
        self.process.spawn();
        self.wait_up();
    }

    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let file = self.data.join("http.addr");
        self.http = loop {
            match std::fs::read_to_string(&file) {
                Ok(addr) if !addr.trim().is_empty() => break addr.trim().to_string(),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "ferry serve wrote no {}: {}",
                file.display(),
                self.process.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        while std::net::TcpStream::connect(&self.http).is_err() {
            assert!(
                Instant::now() < deadline,
                "ferry serve did not listen: {}",
                self.process.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, path: &str) -> (u16, Value) {
        http(&self.http, "GET", path, None, None)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        http(
            &self.http,
            "POST",
            path,
            Some(body.to_string().as_bytes()),
            None,
        )
    }

    fn server(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Waits until task `name` is in `state`; returns its detail.
    fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, task) = self.get(&format!("/api/v1/tasks/{name}"));
            if status == 200 && task["state"] == state {
                return task;
            }
            assert!(
                Instant::now() < deadline,
                "task {name} not {state} after {timeout:?}: {status} {task}\n{}",
                self.process.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn target_cmd(target: &RedisServer, args: &[&str]) -> String {
    let mut all = vec!["-a", TARGET_PASSWORD, "--no-auth-warning"];
    all.extend_from_slice(args);
    target.cmd(&all)
}

#[test]
fn a_task_runs_stops_starts_survives_kill_9_and_cancels_cleanly() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&["--requirepass", TARGET_PASSWORD]);
    source.cmd(&["DEBUG", "POPULATE", "1000", "key", "20"]);
    for _ in 0..10 {
        source.cmd(&["INCR", "counter"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("serve");
    let mut daemon = Daemon::start(&data, &[]);
    let password_file = dir.path().join("target.pw");
    std::fs::write(&password_file, format!("{TARGET_PASSWORD}\n")).unwrap();

    // Created by the CLI: the precheck's table, then the task.
    let out = ferry_cli(&[
        "task",
        "create",
        "--server",
        &daemon.server(),
        "--name",
        "orders",
        "--source",
        &source.url(),
        "--target",
        &target.url(),
        "--target-password-file",
        password_file.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("target reachable") && stdout.contains("orders"),
        "{stdout}"
    );

    let task = daemon.wait_state("orders", "INCREMENTAL", Duration::from_secs(60));
    let parts = task["partitions"].as_array().unwrap();
    assert!(
        parts
            .iter()
            .any(|p| p["side"] == "listener" && p["part_id"] == 0)
            && parts
                .iter()
                .any(|p| p["side"] == "drainer" && p["part_id"] == 0),
        "{task}"
    );
    assert_eq!(
        task["precheck"]["verdict"].as_str().map(|v| v != "FAIL"),
        Some(true)
    );
    assert_eq!(task["full_sync"]["applied"], true, "{task}");
    wait_for("the counter", Duration::from_secs(30), || {
        target_cmd(&target, &["GET", "counter"]) == "10"
    });
    for _ in 0..10 {
        source.cmd(&["INCR", "counter"]);
    }
    wait_for("20 increments", Duration::from_secs(30), || {
        target_cmd(&target, &["GET", "counter"]) == "20"
    });
    // Lag samples accumulate (one every 2 s).
    wait_for("a lag sample", Duration::from_secs(10), || {
        daemon.get("/api/v1/tasks/orders").1["lag_history"]
            .as_array()
            .is_some_and(|h| !h.is_empty())
    });

    // Metrics: the task's state and its stages' series, labelled with
    // the task, valid for promtool.
    let (status, metrics) = daemon.get("/metrics");
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ferry_task_state{task=\"orders\",state=\"INCREMENTAL\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_apply_lag_entries{") && l.contains("task=\"orders\"")),
        "{metrics}"
    );
    if let Err(error) = common::http::promtool_check(&metrics) {
        panic!("promtool refuses ferry serve's /metrics: {error}\n{metrics}");
    }
    assert!(!metrics.contains(TARGET_PASSWORD));

    // The password is nowhere: views, list, the daemon's log.
    let (_, list) = daemon.get("/api/v1/tasks");
    let (_, detail) = daemon.get("/api/v1/tasks/orders");
    for shown in [
        list.to_string(),
        detail.to_string(),
        std::fs::read_to_string(&daemon.process.log).unwrap(),
    ] {
        assert!(
            !shown.contains(TARGET_PASSWORD),
            "the password shows: {shown}"
        );
    }
    let table =
        String::from_utf8_lossy(&ferry_cli(&["task", "list", "--server", &daemon.server()]).stdout)
            .into_owned();
    assert!(
        table.contains("orders") && table.contains("INCREMENTAL"),
        "{table}"
    );

    // Stopped: the source's writes wait in the source; started: they
    // arrive, by PSYNC (one full sync in all).
    let (status, stopped) = daemon.post("/api/v1/tasks/orders/stop", &json!({}));
    assert_eq!(
        (status, stopped["state"].as_str()),
        (200, Some("STOPPED")),
        "{stopped}"
    );
    for _ in 0..5 {
        source.cmd(&["INCR", "counter"]);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(target_cmd(&target, &["GET", "counter"]), "20");
    let out = ferry_cli(&["task", "start", "orders", "--server", &daemon.server()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.wait_state("orders", "INCREMENTAL", Duration::from_secs(30));
    wait_for("25 increments", Duration::from_secs(30), || {
        target_cmd(&target, &["GET", "counter"]) == "25"
    });

    // kill -9 of the daemon: the task resumes where it was.
    daemon.process.kill9();
    for _ in 0..5 {
        source.cmd(&["INCR", "counter"]);
    }
    daemon.respawn();
    daemon.wait_state("orders", "INCREMENTAL", Duration::from_secs(30));
    wait_for("30 increments", Duration::from_secs(30), || {
        target_cmd(&target, &["GET", "counter"]) == "30"
    });
    assert_eq!(source.info_field("sync_full").as_deref(), Some("1"));

    // Canceled: the task, its directory and ferry's keys go; the data stays.
    let out = ferry_cli(&["task", "cancel", "orders", "--server", &daemon.server()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CANCELED"),
        "{stdout}"
    );
    let (_, list) = daemon.get("/api/v1/tasks");
    assert_eq!(list["tasks"], json!([]));
    assert_eq!(daemon.get("/api/v1/tasks/orders").0, 404);
    assert!(!data.join("tasks").join("orders").exists());
    assert_eq!(target_cmd(&target, &["KEYS", "__ferry*"]), "");
    assert_eq!(source.cmd(&["KEYS", "__ferry*"]), "");
    assert_eq!(target_cmd(&target, &["DBSIZE"]), "1001");
    assert_eq!(target_cmd(&target, &["GET", "counter"]), "30");
    let status = daemon.process.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "{status:?} {}",
        daemon.process.log_tail(20)
    );
}

#[test]
fn bad_requests_get_their_error_and_a_failed_precheck_is_shown() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    target.cmd(&["SET", "someone-elses", "data"]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("serve"), &[]);
    let spec = |name: &str, target: &str| json!({ "name": name, "source": source.url(), "target": target });

    // Field errors name the field; nothing is stored.
    let (status, reply) = daemon.post("/api/v1/tasks", &spec("Bad Name", &target.url()));
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().starts_with("name:"),
        "{reply}"
    );
    let mut with_password = spec("a", "redis://:pw@127.0.0.1:1");
    with_password["mode"] = json!("one-way");
    let (status, reply) = daemon.post("/api/v1/tasks", &with_password);
    assert_eq!(status, 400);
    assert!(
        reply["error"].as_str().unwrap().starts_with("target:"),
        "{reply}"
    );
    let (status, reply) = daemon.post("/api/v1/tasks", &json!({"name": "x", "source": 1}));
    assert_eq!(status, 400, "{reply}");
    let (status, _) = http(
        &daemon.http,
        "POST",
        "/api/v1/tasks",
        Some(b"{not json"),
        None,
    );
    assert_eq!(status, 400);
    let huge = vec![b' '; 2 << 20];
    let (status, _) = http(&daemon.http, "POST", "/api/v1/tasks", Some(&huge), None);
    assert_eq!(status, 413);
    assert_eq!(daemon.get("/api/v1/tasks/nope").0, 404);
    assert_eq!(daemon.get("/api/v2/whatever").0, 404);
    assert_eq!(daemon.get("/api/v1/tasks").1["tasks"], json!([]));

    // A dry-run precheck: the target holds keys, refused by default.
    let (status, report) = daemon.post("/api/v1/precheck", &spec("p", &target.url()));
    assert_eq!(status, 200);
    assert_eq!(report["verdict"], "FAIL", "{report}");
    assert!(
        report["table"].as_str().unwrap().contains("target"),
        "{report}"
    );
    assert_eq!(daemon.get("/api/v1/tasks").1["tasks"], json!([]));

    // Created against it: 422, stored FAILED with the table, never started.
    let (status, reply) = daemon.post("/api/v1/tasks", &spec("refused", &target.url()));
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["task"]["state"], "FAILED");
    assert!(
        reply["error"].as_str().unwrap().contains("precheck failed"),
        "{reply}"
    );
    let (status, _) = daemon.post("/api/v1/tasks", &spec("refused", &target.url()));
    assert_eq!(status, 409, "the name is taken");

    // A target nothing listens on: FAIL, named.
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let (status, reply) = daemon.post("/api/v1/tasks", &spec("nowhere", &nowhere));
    assert_eq!(status, 422, "{reply}");
    assert!(
        reply["precheck"]["table"]
            .as_str()
            .unwrap()
            .contains("FAIL"),
        "{reply}"
    );

    // Failed tasks that never ran are canceled without touching a server.
    for name in ["refused", "nowhere"] {
        let (status, reply) = http(
            &daemon.http,
            "DELETE",
            &format!("/api/v1/tasks/{name}"),
            None,
            None,
        );
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["task"]["state"], "CANCELED");
    }
    assert_eq!(target.cmd(&["DBSIZE"]), "1");
}

#[test]
fn the_token_is_required_and_beyond_loopback_is_refused_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let token = "a-long-enough-test-token-1234";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let daemon = Daemon::start(
        &dir.path().join("serve"),
        &["--token-file", token_file.to_str().unwrap()],
    );
    let (status, reply) = http(&daemon.http, "GET", "/api/v1/tasks", None, None);
    assert_eq!(status, 401, "{reply}");
    let (status, _) = http(
        &daemon.http,
        "GET",
        "/api/v1/tasks",
        None,
        Some("wrong-token-wrong-token"),
    );
    assert_eq!(status, 401);
    let (status, _) = http(&daemon.http, "GET", "/api/v1/tasks/x", None, None);
    assert_eq!(status, 401, "no route is told apart without the token");
    let (status, reply) = http(&daemon.http, "GET", "/api/v1/tasks", None, Some(token));
    assert_eq!((status, &reply["tasks"]), (200, &json!([])));
    let out = ferry_cli(&[
        "task",
        "list",
        "--server",
        &daemon.server(),
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Beyond loopback without a token: refused at start.
    let out = ferry_cli(&[
        "serve",
        "--data-dir",
        dir.path().join("other").to_str().unwrap(),
        "--http",
        "0.0.0.0:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--token-file"),
        "{stderr}"
    );
}

#[test]
fn a_two_way_task_replicates_both_ways_and_cancels_on_both_sides() {
    let a = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let b = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    a.cmd(&["SET", "from-a", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("serve"), &[]);
    let spec = json!({
        "name": "pair",
        "source": a.url(),
        "target": b.url(),
        "mode": "two-way",
        "options": { "conflict": "report" },
    });
    let (status, reply) = daemon.post("/api/v1/tasks", &spec);
    assert_eq!(status, 201, "{reply}");
    // INCREMENTAL only once the second direction is established.
    let task = daemon.wait_state("pair", "INCREMENTAL", Duration::from_secs(60));
    let appliers: Vec<&Value> = task["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["side"] == "drainer")
        .collect();
    assert_eq!(appliers.len(), 2, "{task}");
    wait_for("a's key on b", Duration::from_secs(30), || {
        b.cmd(&["GET", "from-a"]) == "1"
    });
    for _ in 0..10 {
        a.cmd(&["INCR", "counter"]);
        b.cmd(&["INCR", "counter"]);
    }
    wait_for("20 increments on both", Duration::from_secs(30), || {
        a.cmd(&["GET", "counter"]) == "20" && b.cmd(&["GET", "counter"]) == "20"
    });
    let (status, reply) = http(&daemon.http, "DELETE", "/api/v1/tasks/pair", None, None);
    assert_eq!(status, 200, "{reply}");
    for side in [&a, &b] {
        assert_eq!(side.cmd(&["KEYS", "__ferry*"]), "");
        assert_eq!(side.cmd(&["GET", "counter"]), "20");
    }
}

// ---------------------------------------------------------------------------
// Two-way tasks between two Redis Clusters

use common::cluster::{key_in_slot, Cluster};

/// One slot in each third of the range: every master of a 3-master cluster
/// made by `redis-cli --cluster create` gets one.
const CLUSTER_SLOTS: [u16; 3] = [100, 6000, 12000];

/// The hash tags (`{…}`) of [`CLUSTER_SLOTS`].
fn slot_tags() -> Vec<String> {
    CLUSTER_SLOTS
        .iter()
        .map(|&slot| key_in_slot("x", slot).trim_start_matches("x:").to_string())
        .collect()
}

fn get_key(cluster: &Cluster, key: &str) -> Option<String> {
    cluster.call_key(key, &["GET", key]).text()
}

/// `sync_full` of every master of `cluster`, by port.
fn full_syncs(cluster: &Cluster) -> Vec<(u16, String)> {
    cluster
        .master_ports()
        .into_iter()
        .map(|port| {
            let syncs = cluster.node(port).info_field("sync_full");
            (port, syncs.unwrap_or_default())
        })
        .collect()
}

/// `n` increments of the counter `<counter>:{tag}` for every tag, on
/// `cluster`.
fn increments(cluster: &Cluster, counter: &str, tags: &[String], n: usize) {
    for tag in tags {
        let key = format!("{counter}:{tag}");
        for _ in 0..n {
            cluster.call_key(&key, &["INCR", &key]);
        }
    }
}

/// Waits until `<counter>:{tag}` is `want` on both clusters, for every tag.
fn wait_counters(
    daemon: &Daemon,
    (a, b): (&Cluster, &Cluster),
    counter: &str,
    tags: &[String],
    want: i64,
) {
    let want = want.to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have: Vec<(Option<String>, Option<String>)> = tags
            .iter()
            .map(|tag| {
                let key = format!("{counter}:{tag}");
                (get_key(a, &key), get_key(b, &key))
            })
            .collect();
        if have
            .iter()
            .all(|(on_a, on_b)| on_a.as_deref() == Some(&want) && on_b.as_deref() == Some(&want))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{counter}: {have:?}, want {want} on both sides\n{}",
            daemon.process.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Both directions shown: a listener and an applier per master of each
/// cluster, the target's from partition 1000, with their direction, all
/// ONLINE; the conflicts counted.
fn both_directions_shown(task: &Value, masters: usize) -> bool {
    mixed_directions_shown(task, masters, masters)
}

fn wait_both_directions(daemon: &Daemon, name: &str, masters: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task = daemon.wait_state(name, "INCREMENTAL", Duration::from_secs(90));
        if both_directions_shown(&task, masters) {
            return task;
        }
        assert!(
            Instant::now() < deadline,
            "both directions not shown: {task:#}\n{}",
            daemon.process.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A two-way task between two 3-master clusters, through the API: both
/// directions established and shown, writes on both sides carried exactly
/// once (counters), a conflict counted, stop/start and a kill -9 of the
/// daemon resumed without a full sync, and its cancel deletes every key
/// ferry wrote for it on every node of both clusters, and only those.
#[test]
fn a_two_way_cluster_task_converges_survives_kill_9_and_cancels_on_every_master() {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    let tags = slot_tags();
    for tag in &tags {
        let key = format!("c:{tag}");
        a.call_key(&key, &["INCRBY", &key, "100"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("serve");
    let mut daemon = Daemon::start(&data, &[]);
    let spec = json!({
        "name": "pair",
        "source": a.seed_list(),
        "target": b.seed_list(),
        "mode": "two-way",
        "options": { "conflict": "report" },
    });
    let (status, reply) = daemon.post("/api/v1/tasks", &spec);
    assert_eq!(status, 201, "{reply}");
    assert_ne!(reply["precheck"]["verdict"], "FAIL", "{reply}");
    let task = wait_both_directions(&daemon, "pair", 3);
    assert_eq!(task["conflicts"], 0, "{task}");
    // `ferry task show`: both directions' rows and the conflicts.
    let out = ferry_cli(&["task", "show", "pair", "--server", &daemon.server()]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert_eq!(shown.matches("target-to-source").count(), 6, "{shown}");
    assert_eq!(shown.matches("source-to-target").count(), 6, "{shown}");
    assert!(shown.contains("two-way conflicts: 0"), "{shown}");
    let sides = (&a, &b);
    wait_counters(&daemon, sides, "c", &tags, 100);
    // Keys of other owners under ferry's prefix: never deleted.
    let foreign_a = key_in_slot("__ferry:checkpoint:other:0", 7000);
    let foreign_b = "__ferry:two-way:{ferry:1}:pair-b".to_string();
    a.call_key(&foreign_a, &["SET", &foreign_a, "x"]);
    b.call_key(&foreign_b, &["SET", &foreign_b, "x"]);

    // Writes on both sides, carried once each way (each side writes once
    // it has seen the other's writes: no conflict).
    increments(&a, "c", &tags, 10);
    wait_counters(&daemon, sides, "c", &tags, 110);
    increments(&b, "c", &tags, 10);
    wait_counters(&daemon, sides, "c", &tags, 120);
    let (a_syncs, b_syncs) = (full_syncs(&a), full_syncs(&b));
    assert!(a_syncs.iter().all(|(_, n)| n == "1"), "{a_syncs:?}");
    // B's: the replica handshake that made each master keep a backlog
    // before its mark (hung up at once); its stream is read by PSYNC.
    assert!(b_syncs.iter().all(|(_, n)| n == "1"), "{b_syncs:?}");
    assert_eq!(daemon.get("/api/v1/tasks/pair").1["conflicts"], 0);

    // Stopped: both sides take writes, one key on both (a conflict);
    // started: each resumes from its WAL.
    let (status, stopped) = daemon.post("/api/v1/tasks/pair/stop", &json!({}));
    assert_eq!((status, stopped["state"].as_str()), (200, Some("STOPPED")));
    increments(&a, "c", &tags, 5);
    increments(&b, "d", &tags, 5);
    let both = key_in_slot("both", 9000);
    a.call_key(&both, &["SET", &both, "from-a"]);
    b.call_key(&both, &["SET", &both, "from-b"]);
    let (status, started) = daemon.post("/api/v1/tasks/pair/start", &json!({}));
    assert_eq!(status, 200, "{started}");
    wait_both_directions(&daemon, "pair", 3);
    wait_counters(&daemon, sides, "c", &tags, 125);
    wait_counters(&daemon, sides, "d", &tags, 5);
    wait_for("the SETs to cross", Duration::from_secs(30), || {
        get_key(&a, &both).as_deref() == Some("from-b")
            && get_key(&b, &both).as_deref() == Some("from-a")
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let task = daemon.get("/api/v1/tasks/pair").1;
        if task["conflicts"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not one conflict: {}\nconflict log: {:?}\n{}",
            task["status"]["two_way"],
            std::fs::read_to_string(data.join("tasks/pair/sync/conflicts.jsonl")),
            daemon.process.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // kill -9 of the daemon, writes on both sides meanwhile: resumed where
    // it was (the conflict still counted), no full sync on either side.
    // The detector saves its state, with the count, at most 1 s after a
    // change (`node::conflicts`); a pair found again after a crash before
    // that save is in the conflict log already and is not counted again.
    std::thread::sleep(Duration::from_millis(1500));
    daemon.process.kill9();
    increments(&a, "c", &tags, 5);
    increments(&b, "d", &tags, 5);
    daemon.respawn();
    let task = wait_both_directions(&daemon, "pair", 3);
    assert_eq!(task["conflicts"], 1, "{}", task["status"]["two_way"]);
    wait_counters(&daemon, sides, "c", &tags, 130);
    wait_counters(&daemon, sides, "d", &tags, 10);
    increments(&b, "c", &tags, 5);
    wait_counters(&daemon, sides, "c", &tags, 135);
    increments(&a, "d", &tags, 3);
    wait_counters(&daemon, sides, "d", &tags, 13);
    assert_eq!(full_syncs(&a), a_syncs);
    assert_eq!(full_syncs(&b), b_syncs);
    // One snapshot stored per master of A, at the first full sync only.
    let log = std::fs::read_to_string(&daemon.process.log).unwrap();
    assert_eq!(log.matches("full resync stored").count(), 3, "{log}");

    // The task's keys are on both sides while it runs: checkpoints, slot
    // checkpoints, owner maps, scopes, heartbeats, marks.
    let kept = |keys: &[String], kind: &str| keys.iter().any(|k| k.starts_with(kind));
    for (cluster, side) in [(&a, "A"), (&b, "B")] {
        let keys = cluster.ferry_keys();
        for kind in [
            "__ferry:checkpoint:pair:",
            "__ferry:heartbeat:pair:{ferry:",
            "__ferry:slots:pair",
            "__ferry:scope:pair:",
        ] {
            assert!(kept(&keys, kind), "{side}: no {kind}… in {keys:?}");
        }
    }
    assert!(kept(&b.ferry_keys(), "__ferry:two-way:{ferry:"));

    // Canceled: every key ferry wrote for it goes, on every node of both
    // clusters; the data and other owners' keys stay.
    let (status, reply) = http(&daemon.http, "DELETE", "/api/v1/tasks/pair", None, None);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["task"]["state"], "CANCELED", "{reply}");
    assert_eq!(a.ferry_keys(), vec![foreign_a]);
    assert_eq!(b.ferry_keys(), vec![foreign_b]);
    for (counter, want) in [("c", "135"), ("d", "13")] {
        for tag in &tags {
            let key = format!("{counter}:{tag}");
            assert_eq!(get_key(&a, &key).as_deref(), Some(want), "{key}");
            assert_eq!(get_key(&b, &key).as_deref(), Some(want), "{key}");
        }
    }
    assert_eq!(get_key(&a, &both).as_deref(), Some("from-b"));
    assert!(!data.join("tasks").join("pair").exists());
    let status = daemon.process.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", daemon.process.log_tail(20));
}

/// Both directions shown (for a task between a standalone server and a
/// cluster, or two clusters): `forward` listeners and appliers below 1000
/// and `backward` from 1000, with their direction, all ONLINE; the
/// conflicts counted.
fn mixed_directions_shown(task: &Value, forward: usize, backward: usize) -> bool {
    let Some(parts) = task["partitions"].as_array() else {
        return false;
    };
    let rows = |side: &str, is_backward: bool| {
        parts
            .iter()
            .filter(|p| p["side"] == side)
            .filter(|p| (p["part_id"].as_u64().unwrap_or(0) >= 1000) == is_backward)
            .filter(|p| {
                p["direction"]
                    == match is_backward {
                        true => "target-to-source",
                        false => "source-to-target",
                    }
            })
            .filter(|p| p["sync_status"] == "ONLINE")
            .count()
    };
    parts.len() == 2 * (forward + backward)
        && ["listener", "drainer"]
            .iter()
            .all(|side| rows(side, false) == forward && rows(side, true) == backward)
        && task["conflicts"].is_u64()
}

/// Two-way tasks between a standalone server and a 3-master cluster, in
/// both orders, through the API: the precheck passes (a winner policy
/// too), both directions are established and shown (the standalone side's
/// one partition, the cluster's per master, the target's from 1000),
/// increments on both sides are carried once, and the cancel deletes
/// every key ferry wrote for the task on both sides (the standalone
/// server, every node of the cluster) and only those.
#[test]
fn two_way_tasks_between_a_standalone_server_and_a_cluster() {
    let cluster = Cluster::start(3, 0);
    let tags = slot_tags();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("serve"), &[]);
    // Other owners' keys under ferry's prefix: never deleted.
    let foreign = key_in_slot("__ferry:checkpoint:other:0", 7000);
    cluster.call_key(&foreign, &["SET", &foreign, "x"]);
    for (name, standalone_source, counter) in [("mixed1", true, "c"), ("mixed2", false, "d")] {
        // A new standalone server each time: the second one, a target, must
        // pass the existing-data rule.
        let standalone = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
        standalone.cmd(&["SET", "__ferry:two-way:mixed1-b", "x"]);
        let standalone_keys = || {
            let mut keys: Vec<String> = standalone
                .cmd(&["KEYS", "__ferry*"])
                .lines()
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect();
            keys.sort();
            keys
        };
        let standalone_get = |key: &str| {
            let value = standalone.cmd(&["GET", key]);
            (!value.is_empty()).then_some(value)
        };
        let (source, target) = match standalone_source {
            true => (standalone.url(), cluster.seed_list()),
            false => (cluster.seed_list(), standalone.url()),
        };
        let winner = json!({
            "name": format!("{name}-winner"),
            "source": source,
            "target": target,
            "mode": "two-way",
            "options": { "conflict": "source-wins" },
        });
        let (status, report) = daemon.post("/api/v1/precheck", &winner);
        assert_eq!(status, 200, "{report}");
        assert_ne!(report["verdict"], "FAIL", "{name}: {report}");
        let spec = json!({
            "name": name,
            "source": source,
            "target": target,
            "mode": "two-way",
            "options": { "conflict": "report" },
        });
        let (status, reply) = daemon.post("/api/v1/tasks", &spec);
        assert_eq!(status, 201, "{name}: {reply}");
        let (forward, backward) = match standalone_source {
            true => (1, 3),
            false => (3, 1),
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let task = daemon.wait_state(name, "INCREMENTAL", Duration::from_secs(90));
            if mixed_directions_shown(&task, forward, backward) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: both directions not shown: {task:#}\n{}",
                daemon.process.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Each side writes once it has seen the other's writes.
        for round in 0..2 {
            for tag in &tags {
                let key = format!("{counter}:{tag}");
                for _ in 0..5 {
                    match (round == 0) == standalone_source {
                        true => {
                            standalone.cmd(&["INCR", &key]);
                        }
                        false => {
                            cluster.call_key(&key, &["INCR", &key]);
                        }
                    }
                }
            }
            let want = (5 * (round + 1)).to_string();
            wait_for(
                &format!("{name}: the counters at {want} on both sides"),
                Duration::from_secs(60),
                || {
                    tags.iter().all(|tag| {
                        let key = format!("{counter}:{tag}");
                        standalone_get(&key).as_deref() == Some(want.as_str())
                            && get_key(&cluster, &key).as_deref() == Some(want.as_str())
                    })
                },
            );
        }
        let keys = standalone_keys();
        assert!(
            keys.iter()
                .any(|k| k.starts_with(&format!("__ferry:checkpoint:{name}:"))),
            "{keys:?}"
        );
        assert!(
            cluster
                .ferry_keys()
                .iter()
                .any(|k| k.starts_with(&format!("__ferry:checkpoint:{name}:"))),
            "{:?}",
            cluster.ferry_keys()
        );
        let (status, reply) = http(
            &daemon.http,
            "DELETE",
            &format!("/api/v1/tasks/{name}"),
            None,
            None,
        );
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["task"]["state"], "CANCELED", "{reply}");
        assert_eq!(cluster.ferry_keys(), vec![foreign.clone()], "{name}");
        assert_eq!(
            standalone_keys(),
            vec!["__ferry:two-way:mixed1-b".to_string()],
            "{name}"
        );
        for tag in &tags {
            let key = format!("{counter}:{tag}");
            assert_eq!(standalone_get(&key).as_deref(), Some("10"), "{key}");
            assert_eq!(get_key(&cluster, &key).as_deref(), Some("10"), "{key}");
        }
    }
}
