//! TLS on the listener → drainer gRPC link, with real `ferry listener` and
//! `ferry drainer` processes between real redis-servers and certificates
//! made here (a CA, the drainer's server certificate for 127.0.0.1, a
//! listener's client certificate, and another CA that signed nothing).
//!
//! - [`mutual_tls_refuses_a_listener_without_a_certificate_and_relays_with_one`]:
//!   a drainer with `client-ca-file` refuses a listener that presents no
//!   certificate (its status names TLS, the target gets nothing); with its
//!   certificate the same listener relays a full sync and a stream of INCRs
//!   exactly once.
//! - [`untrusted_or_plain_peers_fail_naming_tls`]: a listener trusting the
//!   wrong CA, one with an `http://` endpoint to the TLS drainer, and one
//!   with an `https://` endpoint to a plain drainer all fail, each shown in
//!   the listener's status; the drainers keep serving and nothing reaches
//!   the target.
//!
//! Run: `cargo test --test ship_tls`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::ferry::FerryProcess;
use common::pki::Pki;
use common::workload::{call, connect, wait_converged};
use common::{free_port, RedisServer};

/// Longest wait for a target to equal its source, or for a status.
const CONVERGE: Duration = Duration::from_secs(60);
/// Longest wait for a process to stop after SIGTERM.
const STOP: Duration = Duration::from_secs(30);
const SECRET: &str = "a-listener-secret-42";

/// Writes `<dir>/<name>.toml` and starts `ferry <verb>` on it, data in
/// `<dir>/<name>`.
fn start_node(dir: &Path, verb: &str, name: &str, toml: &str) -> FerryProcess {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, toml).expect("write config");
    FerryProcess::start(
        &dir.join(name),
        &[
            verb.to_string(),
            "--config".to_string(),
            config.to_str().expect("utf-8 path").to_string(),
        ],
    )
}

/// A drainer config accepting `listener-1`; `tls` is the `[drainer.tls]`
/// section's keys (empty: plain gRPC).
fn drainer_toml(data_dir: &Path, id: &str, port: u16, target: &str, tls: &str) -> String {
    let tls = if tls.is_empty() {
        String::new()
    } else {
        format!("[drainer.tls]\n{tls}\n")
    };
    format!(
        r#"data-dir = "{}"
admin = "127.0.0.1:0"
listen = "127.0.0.1:{port}"

[[drainer.listeners]]
id = "listener-1"
secret = "{SECRET}"

{tls}
[apply]
drainer-id = "{id}"
target = "{target}"
retry-backoff-min = "50ms"
retry-backoff-max = "500ms"
"#,
        data_dir.display()
    )
}

/// A listener config shipping to `drainers`: `(id, endpoint, extra keys)`.
fn listener_toml(data_dir: &Path, source: &str, drainers: &[(&str, String, String)]) -> String {
    let mut text = format!(
        r#"data-dir = "{}"
admin = "127.0.0.1:0"

[listener]
id = "listener-1"
source = "{source}"
heartbeat-interval = "500ms"
reconnect-backoff-max = "500ms"

[ship]
reconnect-min = "50ms"
reconnect-max = "500ms"
"#,
        data_dir.display()
    );
    for (id, endpoint, extra) in drainers {
        text.push_str(&format!(
            "\n[[drainers]]\nid = \"{id}\"\nendpoint = \"{endpoint}\"\nsecret = \"{SECRET}\"\n{extra}\n"
        ));
    }
    text
}

/// Polls `check` until it holds; panics after `timeout` with `context()`.
async fn wait_until(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM; the process must exit cleanly.
fn stop(process: &mut FerryProcess) {
    let status = process.terminate(STOP);
    assert!(
        status.success(),
        "exit {status:?}\n{}",
        process.log_tail(40)
    );
}

/// The process must still be running.
fn assert_alive(process: &mut FerryProcess, when: &str) {
    if let Some(status) = process.try_exit() {
        panic!("ferry exited ({status:?}) {when}\n{}", process.log_tail(40));
    }
}

/// The listener's shipping row of `drainer_id` in `ferry status --json`.
fn shipping_row(listener: &FerryProcess, drainer_id: &str) -> serde_json::Value {
    let status = listener.status_json();
    status["listeners"][0]["shipping"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|row| row["drainer_id"] == drainer_id)
                .cloned()
        })
        .unwrap_or_else(|| panic!("no shipping row of {drainer_id} in {status}"))
}

/// Waits until the row of `drainer_id` is OFFLINE with a `last_error`
/// containing every one of `parts`; returns that error.
async fn wait_offline_with(
    listener: &FerryProcess,
    drainer_id: &str,
    parts: &[&str],
    context: impl Fn() -> String,
) -> String {
    let last = std::cell::RefCell::new(String::new());
    wait_until(
        &format!("{drainer_id}: an error naming {parts:?}"),
        CONVERGE,
        || format!("last status row: {}\n{}", last.borrow(), context()),
        || {
            let row = shipping_row(listener, drainer_id);
            *last.borrow_mut() = row.to_string();
            let error = row["last_error"].as_str().unwrap_or("");
            row["state"] == "OFFLINE" && parts.iter().all(|part| error.contains(part))
        },
    )
    .await;
    shipping_row(listener, drainer_id)["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn log_tails(processes: &[&FerryProcess]) -> String {
    processes
        .iter()
        .map(|process| process.log_tail(30))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Data keys on `target` (ferry's own `__ferry*` keys left out).
fn data_keys(target: &RedisServer) -> Vec<String> {
    target
        .cmd(&["KEYS", "*"])
        .lines()
        .filter(|key| !key.is_empty() && !key.starts_with("__ferry"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_a_listener_without_a_certificate_and_relays_with_one() {
    let pki = Pki::new();
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "2000", "key", "20"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut drainer = start_node(
        dir.path(),
        "drainer",
        "drainer",
        &drainer_toml(
            &dir.path().join("drainer"),
            "drainer-1",
            port,
            &target.url(),
            &format!(
                "cert-file = \"{}\"\nkey-file = \"{}\"\nclient-ca-file = \"{}\"",
                pki.file("server.pem"),
                pki.file("server.key"),
                pki.file("ca.pem")
            ),
        ),
    );
    let endpoint = format!("https://127.0.0.1:{port}");
    let trust = format!("tls-ca-file = \"{}\"", pki.file("ca.pem"));
    let listener_config = |with_certificate: bool| {
        let mut extra = trust.clone();
        if with_certificate {
            extra.push_str(&format!(
                "\ntls-cert-file = \"{}\"\ntls-key-file = \"{}\"",
                pki.file("client.pem"),
                pki.file("client.key")
            ));
        }
        listener_toml(
            &dir.path().join("listener"),
            &source.url(),
            &[("drainer-1", endpoint.clone(), extra)],
        )
    };

    // No client certificate: refused by the TLS layer, named in the status.
    let mut listener = start_node(dir.path(), "listener", "listener", &listener_config(false));
    let error = wait_offline_with(&listener, "drainer-1", &["TLS"], || {
        log_tails(&[&listener, &drainer])
    })
    .await;
    assert!(
        { true } && error.contains(&endpoint) && error.to_lowercase().contains("certificate"),
        "the error should name the endpoint and the certificate: {error}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_alive(
        &mut drainer,
        "while refusing a listener without a certificate",
    );
    assert_alive(&mut listener, "while refused");
    assert!(
        data_keys(&target).is_empty(),
        "a refused listener's data reached the target"
    );
    stop(&mut listener);

    // With its certificate: the full sync, then INCRs, each applied once.
    std::fs::write(dir.path().join("listener.toml"), listener_config(true)).expect("config");
    listener.spawn();
    let context = || log_tails(&[&listener, &drainer]);
    let mut source_client = connect(&source).await;
    for _ in 0..300 {
        call(&mut source_client, &["INCR", "counter"]).await;
    }
    wait_until("the full sync over TLS", CONVERGE, context, || {
        data_keys(&target).len() >= 2001
    })
    .await;
    for _ in 0..700 {
        call(&mut source_client, &["INCR", "counter"]).await;
    }
    wait_converged(
        &source.url(),
        &target.url(),
        "relayed over mutual TLS",
        CONVERGE,
        context,
    )
    .await;
    assert_eq!(
        target.cmd(&["GET", "counter"]),
        "1000",
        "every INCR exactly once"
    );
    let row = shipping_row(&listener, "drainer-1");
    assert_eq!(row["state"], "ONLINE", "{row}");
    assert_eq!(row["endpoint"], endpoint.as_str(), "{row}");
    stop(&mut listener);
    stop(&mut drainer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_or_plain_peers_fail_naming_tls() {
    let pki = Pki::new();
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "100", "key", "10"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let (tls_port, plain_port) = (free_port(), free_port());
    let mut tls_drainer = start_node(
        dir.path(),
        "drainer",
        "tls-drainer",
        &drainer_toml(
            &dir.path().join("tls-drainer"),
            "tls-drainer",
            tls_port,
            &target.url(),
            &format!(
                "cert-file = \"{}\"\nkey-file = \"{}\"",
                pki.file("server.pem"),
                pki.file("server.key")
            ),
        ),
    );
    let mut plain_drainer = start_node(
        dir.path(),
        "drainer",
        "plain-drainer",
        &drainer_toml(
            &dir.path().join("plain-drainer"),
            "plain-drainer",
            plain_port,
            &target.url(),
            "",
        ),
    );
    let trust = |ca: &str| format!("tls-ca-file = \"{}\"", pki.file(ca));
    let mut listener = start_node(
        dir.path(),
        "listener",
        "listener",
        &listener_toml(
            &dir.path().join("listener"),
            &source.url(),
            &[
                (
                    "wrong-ca",
                    format!("https://127.0.0.1:{tls_port}"),
                    trust("other-ca.pem"),
                ),
                (
                    "plain-to-tls",
                    format!("http://127.0.0.1:{tls_port}"),
                    String::new(),
                ),
                (
                    "tls-to-plain",
                    format!("https://127.0.0.1:{plain_port}"),
                    trust("ca.pem"),
                ),
            ],
        ),
    );
    let context = || log_tails(&[&listener, &tls_drainer, &plain_drainer]);

    let error = wait_offline_with(&listener, "wrong-ca", &["TLS", "handshake"], context).await;
    assert!(
        { error.contains("certificate") },
        "the error should say the certificate is not trusted: {error}"
    );
    // The TLS drainer cannot understand a plain HTTP/2 client: the stream
    // never starts, whatever the error text on the listener's side.
    let error = wait_offline_with(&listener, "plain-to-tls", &[], context).await;
    assert!(
        !error.is_empty(),
        "no error shown for http:// to a TLS drainer"
    );
    let error = wait_offline_with(&listener, "tls-to-plain", &["TLS", "handshake"], context).await;
    assert!(
        { error.contains(&format!("https://127.0.0.1:{plain_port}")) },
        "{error}"
    );

    // Several retries later, nothing got through and every process runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for row in ["wrong-ca", "plain-to-tls", "tls-to-plain"] {
        let row = shipping_row(&listener, row);
        assert_eq!(row["state"], "OFFLINE", "{row}");
        assert_eq!(row["acked"].as_u64().unwrap_or(0), 0, "{row}");
    }
    assert_alive(&mut tls_drainer, "after failed handshakes");
    assert_alive(&mut plain_drainer, "after a TLS client");
    assert_alive(&mut listener, "while every drainer fails");
    assert!(
        data_keys(&target).is_empty(),
        "data reached the target over a failed link"
    );
    let handshakes = std::fs::read_to_string(&tls_drainer.log).unwrap_or_default();
    assert!(
        handshakes.contains("TLS handshake failed"),
        "the TLS drainer does not log the failed handshakes\n{}",
        tls_drainer.log_tail(30)
    );
    stop(&mut listener);
    stop(&mut tls_drainer);
    stop(&mut plain_drainer);
}
