//! `GET /metrics` on the admin address of real ferry processes between real
//! redis-servers, and JSON logs:
//!
//! - [`sync_serves_metrics_and_json_logs`]: `ferry sync` (a target that
//!   needs a password, given in its URL): lag per partition, the applied
//!   commands counter growing with more writes, the WAL's fsync histogram,
//!   the whole text accepted by `promtool check metrics`, the password in
//!   neither the metrics nor the JSON log lines;
//! - [`listener_and_drainer_serve_metrics`]: the same of a `ferry listener`
//!   and `ferry drainer` pair (shipping on one side, applying on the other);
//! - [`log_format_is_checked`]: a bad `--log-format` / `FERRY_LOG_FORMAT`.
//!
//! promtool comes with Debian's `prometheus` package (tools/setup.sh); a
//! machine without it fails these tests, saying so.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::ferry::FerryProcess;
use common::RedisServer;

const TARGET_PASSWORD: &str = "tgt-Pa55word-5e2d";

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /metrics` of `ferry`, checked by promtool.
fn scrape(ferry: &FerryProcess) -> String {
    let addr = ferry.admin_addr(Duration::from_secs(30));
    let reply = common::http::get(&addr, "/metrics").expect("GET /metrics");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    if let Err(error) = common::http::promtool_check(&reply.body) {
        panic!("{error}\nthe text:\n{}", reply.body);
    }
    reply.body
}

/// The values of the samples of `name` whose labels include `labels`
/// (label values without escapes).
fn values(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (sample, label_text) = match series.split_once('{') {
                Some((sample, rest)) => (sample, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let matches = sample == name
                && labels
                    .iter()
                    .all(|(label, value)| label_text.contains(&format!("{label}=\"{value}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .collect()
}

/// The one sample of `name` with `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = values(text, name, labels);
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?} in\n{text}");
    found[0]
}

fn target_cmd(target: &RedisServer, args: &[&str]) -> String {
    let mut all = vec!["-a", TARGET_PASSWORD, "--no-auth-warning"];
    all.extend_from_slice(args);
    target.cli(&all).expect("redis-cli").trim().to_string()
}

#[test]
fn sync_serves_metrics_and_json_logs() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&["--requirepass", TARGET_PASSWORD]);
    source.cmd(&["DEBUG", "POPULATE", "1000", "key", "20"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let target_url = format!("redis://:{TARGET_PASSWORD}@127.0.0.1:{}", target.port);
    let mut ferry =
        FerryProcess::sync(&data, &source.url(), &target_url, &["--log-format", "json"]);
    for _ in 0..20 {
        source.cmd(&["INCR", "counter"]);
    }
    wait_for("20 increments", Duration::from_secs(60), || {
        target_cmd(&target, &["GET", "counter"]) == "20"
    });

    let first = scrape(&ferry);
    assert!(!first.contains(TARGET_PASSWORD), "{first}");
    let partition = [("role", "sync"), ("partition", "0")];
    assert_eq!(value(&first, "ferry_source_up", &partition), 1.0);
    assert_eq!(value(&first, "ferry_apply_up", &partition), 1.0);
    value(&first, "ferry_apply_lag_entries", &partition);
    value(&first, "ferry_apply_lag_seconds", &partition);
    let state = [("partition", "0"), ("state", "ONLINE")];
    assert_eq!(value(&first, "ferry_apply_state", &state), 1.0);
    assert_eq!(
        value(&first, "ferry_source_full_syncs_total", &partition),
        1.0
    );
    let applied = value(&first, "ferry_apply_commands_total", &partition);
    assert!(applied >= 20.0, "{applied}");
    let listener_wal = [("role", "sync"), ("wal", "listener")];
    let fsyncs = value(&first, "ferry_wal_fsync_seconds_count", &listener_wal);
    assert!(fsyncs > 0.0, "{first}");
    let inf = value(
        &first,
        "ferry_wal_fsync_seconds_bucket",
        &[("wal", "listener"), ("le", "+Inf")],
    );
    assert_eq!(inf, fsyncs);
    assert!(value(&first, "ferry_wal_written_bytes_total", &listener_wal) > 0.0);
    let target_addr = format!("redis://127.0.0.1:{}", target.port);
    assert_eq!(
        value(&first, "ferry_apply_info", &[("target", &target_addr)]),
        1.0
    );

    for _ in 0..20 {
        source.cmd(&["INCR", "counter"]);
    }
    wait_for("40 increments", Duration::from_secs(30), || {
        target_cmd(&target, &["GET", "counter"]) == "40"
    });
    let second = scrape(&ferry);
    let applied_after = value(&second, "ferry_apply_commands_total", &partition);
    assert!(
        applied_after >= applied + 20.0,
        "{applied} -> {applied_after}"
    );
    assert!(value(&second, "ferry_wal_fsync_seconds_count", &listener_wal) > fsyncs);

    let status = ferry.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}; {}", ferry.log_tail(30));
    let log = std::fs::read_to_string(&ferry.log).unwrap();
    assert!(!log.contains(TARGET_PASSWORD), "the password is in the log");
    let mut messages = Vec::new();
    for line in log.lines().filter(|line| !line.trim().is_empty()) {
        let parsed: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}"));
        assert!(parsed["timestamp"].is_string(), "{line}");
        assert!(parsed["level"].is_string(), "{line}");
        messages.push(
            parsed["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    assert!(messages.len() >= 3, "{log}");
    assert!(
        messages.iter().any(|m| m == "admin API listening"),
        "{messages:?}"
    );
}

/// `ferry <verb> --config <dir>/<name>.toml` with data in `<dir>/<name>`,
/// JSON logs asked before the verb.
fn start_node(dir: &Path, verb: &str, name: &str, toml: &str) -> FerryProcess {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml).unwrap();
    FerryProcess::start(
        &dir.join(name),
        &[
            "--log-format".to_string(),
            "json".to_string(),
            verb.to_string(),
            "--config".to_string(),
            config.to_str().expect("utf-8 path").to_string(),
        ],
    )
}

#[test]
fn listener_and_drainer_serve_metrics() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let ship_port = common::free_port();
    let secret = "ship-secret-41c9";
    let drainer = start_node(
        dir.path(),
        "drainer",
        "drainer",
        &format!(
            r#"data-dir = "{}"
admin = "127.0.0.1:0"
listen = "127.0.0.1:{ship_port}"

[[drainer.listeners]]
id = "listener-1"
secret = "{secret}"

[apply]
drainer-id = "d1"
target = "{}"
"#,
            dir.path().join("drainer").display(),
            target.url()
        ),
    );
    let listener = start_node(
        dir.path(),
        "listener",
        "listener",
        &format!(
            r#"data-dir = "{}"
admin = "127.0.0.1:0"

[listener]
id = "listener-1"
source = "{}"

[ship]
reconnect-min = "50ms"
reconnect-max = "500ms"

[[drainers]]
id = "d1"
endpoint = "http://127.0.0.1:{ship_port}"
secret = "{secret}"
"#,
            dir.path().join("listener").display(),
            source.url()
        ),
    );
    for n in 0..30 {
        source.cmd(&["SET", &format!("k{n}"), "v"]);
    }
    wait_for("30 keys on the target", Duration::from_secs(60), || {
        target.cmd(&["EXISTS", "k29"]) == "1"
    });

    let shipped = scrape(&listener);
    assert!(!shipped.contains(secret), "{shipped}");
    let link = [
        ("role", "listener"),
        ("listener_id", "listener-1"),
        ("partition", "0"),
        ("drainer_id", "d1"),
    ];
    assert_eq!(value(&shipped, "ferry_ship_up", &link), 1.0);
    value(&shipped, "ferry_ship_lag_entries", &link);
    value(&shipped, "ferry_ship_lag_seconds", &link);
    // Some of the keys may have come with the full sync.
    assert!(value(&shipped, "ferry_ship_entries_total", &link) > 0.0);
    let wal = [("role", "listener"), ("wal", "listener")];
    assert!(value(&shipped, "ferry_wal_fsync_seconds_count", &wal) > 0.0);
    assert!(
        values(&shipped, "ferry_apply_up", &[]).is_empty(),
        "{shipped}"
    );

    let applied = scrape(&drainer);
    let part = [
        ("role", "drainer"),
        ("drainer_id", "d1"),
        ("partition", "0"),
    ];
    assert_eq!(value(&applied, "ferry_apply_up", &part), 1.0);
    value(&applied, "ferry_apply_lag_entries", &part);
    assert!(value(&applied, "ferry_apply_commands_total", &part) > 0.0);
    let wal = [("role", "drainer"), ("wal", "drainer")];
    assert!(value(&applied, "ferry_wal_fsync_seconds_count", &wal) > 0.0);
    assert!(
        values(&applied, "ferry_source_up", &[]).is_empty(),
        "{applied}"
    );

    for process in [&listener, &drainer] {
        let log = std::fs::read_to_string(&process.log).unwrap();
        let first = log.lines().next().unwrap_or_default();
        let parsed: serde_json::Value = serde_json::from_str(first)
            .unwrap_or_else(|error| panic!("not a JSON line ({error}): {first}"));
        assert!(parsed["fields"]["message"].is_string(), "{first}");
        assert!(!log.contains(secret), "the ship secret is in the log");
    }
}

#[test]
fn log_format_is_checked() {
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(common::ferry::ferry_bin());
        cmd.args(args).env_remove("FERRY_LOG_FORMAT");
        if let Some(format) = env {
            cmd.env("FERRY_LOG_FORMAT", format);
        }
        common::output_within(&mut cmd, Duration::from_secs(20)).unwrap()
    };
    let bad_flag = run(&["--log-format", "xml", "status"], None);
    assert_eq!(bad_flag.status.code(), Some(2));
    let said = String::from_utf8_lossy(&bad_flag.stderr);
    assert!(said.contains("invalid value 'xml'"), "{said}");
    let bad_env = run(&["status"], Some("xml"));
    assert_eq!(bad_env.status.code(), Some(2));
    let said = String::from_utf8_lossy(&bad_env.stderr);
    assert!(said.contains("invalid value 'xml'"), "{said}");
    let help = run(&["--help"], None);
    let said = String::from_utf8_lossy(&help.stdout);
    assert!(said.contains("--log-format"), "{said}");
    assert!(said.contains("FERRY_LOG_FORMAT"), "{said}");
}
