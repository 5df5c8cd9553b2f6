//! TLS and tokens on ferry's own APIs, with certificates made here (a CA
//! and a server certificate for 127.0.0.1, and another CA that signed
//! nothing): `ferry serve` over HTTPS and `ferry task` trusting its CA;
//! `ferry sync`'s admin API over TLS with a token and `ferry status`
//! bringing both; a client trusting another CA, a missing or wrong token,
//! and plain HTTP to a TLS port get nothing; an admin API beyond loopback
//! without a token is refused at start.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::ferry::{ferry_bin, FerryProcess};
use common::pki::Pki;
use common::{free_port, output_within, RedisServer};

const TOKEN: &str = "api-tls-test-token-0123456789";

/// The test's certificates (`common::pki`), with a token file and a
/// wrong one beside them.
fn pki_with_tokens() -> Pki {
    let pki = Pki::new();
    std::fs::write(pki.path("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(pki.path("wrong-token"), "a-wrong-token-0123456789\n").unwrap();
    pki
}

fn ferry(args: &[&str]) -> Output {
    output_within(
        Command::new(ferry_bin()).args(args).env("RUST_LOG", "warn"),
        Duration::from_secs(60),
    )
    .expect("run ferry")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits for `<dir>/<name>` to hold a whole line; returns it.
fn read_line_file(dir: &Path, name: &str, process: &FerryProcess) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
            if text.ends_with('\n') {
                return text.trim().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {name}: {}",
            process.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Plain HTTP to a TLS port: what comes back (never an HTTP reply).
fn plain_http_to(addr: &str) -> Vec<u8> {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let _ = stream.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

#[test]
fn ferry_serve_over_https() {
    let pki = pki_with_tokens();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("serve");
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let args: Vec<String> = [
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--http",
        &http,
        "--token-file",
        &pki.file("token"),
        "--tls-cert-file",
        &pki.file("server.pem"),
        "--tls-key-file",
        &pki.file("server.key"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = FerryProcess::start(&data, &args);
    let url = read_line_file(&data, "http.url", &daemon);
    assert_eq!(url, format!("https://{http}"));
    assert_eq!(read_line_file(&data, "http.addr", &daemon), http);

    let list = |ca: &str, token: &str| {
        ferry(&[
            "task",
            "list",
            "--json",
            "--server",
            &url,
            "--ca-file",
            &pki.file(ca),
            "--token-file",
            &pki.file(token),
        ])
    };
    let out = list("ca.pem", "token");
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["tasks"], serde_json::json!([]));

    // A client trusting another CA: a TLS error, and nothing sent.
    let out = list("other-ca.pem", "token");
    let error = stderr(&out);
    assert!(!out.status.success(), "{error}");
    assert!(
        error.contains("TLS") && error.contains("certificate"),
        "{error}"
    );
    // The right CA, the wrong token: 401.
    let out = list("ca.pem", "wrong-token");
    let error = stderr(&out);
    assert!(!out.status.success() && error.contains("401"), "{error}");

    // Plain HTTP to the HTTPS port: no HTTP reply, nothing of the API.
    let reply = plain_http_to(&http);
    assert!(!reply.starts_with(b"HTTP/"), "{reply:?}");
    assert!(
        !String::from_utf8_lossy(&reply).contains("ferry_"),
        "{reply:?}"
    );
    // Neither failed handshake stopped the daemon.
    let reply = common::http::get_tls(
        &http,
        "/metrics",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        &pki.path("ca.pem"),
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("ferry_task_state"), "{}", reply.body);
    let reply = common::http::get_tls(&http, "/metrics", &[], &pki.path("ca.pem")).unwrap();
    assert_eq!(reply.status, 401, "{reply:?}");
    let out = list("ca.pem", "token");
    assert!(out.status.success(), "{}", stderr(&out));
    drop(daemon);

    // A key without its certificate, and the reverse: refused, named.
    for (given, missing) in [
        ("--tls-key-file", "--tls-cert-file"),
        ("--tls-cert-file", "--tls-key-file"),
    ] {
        let file = if given == "--tls-key-file" {
            pki.file("server.key")
        } else {
            pki.file("server.pem")
        };
        let out = ferry(&[
            "serve",
            "--data-dir",
            dir.path().join("other").to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            given,
            &file,
        ]);
        let error = stderr(&out);
        assert!(
            !out.status.success() && error.contains(missing),
            "{given}: {error}"
        );
    }
}

#[test]
fn the_admin_api_over_tls_with_a_token() {
    let pki = pki_with_tokens();
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    source.cmd(&["SET", "k", "v"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let ferry_sync = FerryProcess::sync(
        &data,
        &source.url(),
        &target.url(),
        &[
            "--admin-token-file",
            &pki.file("token"),
            "--admin-tls-cert-file",
            &pki.file("server.pem"),
            "--admin-tls-key-file",
            &pki.file("server.key"),
        ],
    );
    let url = read_line_file(&data, "admin.url", &ferry_sync);
    let addr = url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("admin.url {url:?} is not https://"))
        .to_string();

    let status = |extra: &[&str]| {
        let mut args = vec!["status", "--json"];
        args.extend_from_slice(extra);
        ferry(&args)
    };
    let (ca, other_ca, token, wrong) = (
        pki.file("ca.pem"),
        pki.file("other-ca.pem"),
        pki.file("token"),
        pki.file("wrong-token"),
    );
    let out = status(&["--admin", &url, "--ca-file", &ca, "--token-file", &token]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["role"], "sync", "{json}");
    // --data-dir reads admin.url: TLS and all.
    let data_arg = data.to_str().unwrap();
    let out = status(&[
        "--data-dir",
        data_arg,
        "--ca-file",
        &ca,
        "--token-file",
        &token,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // No token, a wrong one: UNAUTHENTICATED, and the token never shown.
    for extra in [vec![], vec!["--token-file", wrong.as_str()]] {
        let mut args = vec!["--admin", url.as_str(), "--ca-file", ca.as_str()];
        args.extend(extra);
        let out = status(&args);
        let error = stderr(&out);
        assert!(
            !out.status.success() && error.contains("UNAUTHENTICATED"),
            "{error}"
        );
        assert!(!error.contains(TOKEN), "{error}");
        let out = ferry(&[&["stop-sync"][..], &args[..]].concat());
        let error = stderr(&out);
        assert!(
            !out.status.success() && error.contains("UNAUTHENTICATED"),
            "{error}"
        );
    }
    // Another CA: a TLS error.
    let out = status(&[
        "--admin",
        &url,
        "--ca-file",
        &other_ca,
        "--token-file",
        &token,
    ]);
    let error = stderr(&out);
    assert!(
        !out.status.success() && error.contains("certificate"),
        "{error}"
    );
    // The same address without https://: no gRPC answer.
    let out = status(&["--admin", &addr, "--token-file", &token]);
    assert!(!out.status.success(), "{}", stderr(&out));

    // GET /metrics: 401 without the token, the metrics with it; plain HTTP
    // gets nothing.
    let ca_path = pki.path("ca.pem");
    let reply = common::http::get_tls(&addr, "/metrics", &[], &ca_path).unwrap();
    assert_eq!(reply.status, 401, "{reply:?}");
    assert!(!reply.body.contains("ferry_"), "{reply:?}");
    let bearer = format!("Bearer {TOKEN}");
    let reply =
        common::http::get_tls(&addr, "/metrics", &[("Authorization", &bearer)], &ca_path).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("ferry_"), "{}", reply.body);
    assert!(!reply.body.contains(TOKEN));
    let reply = plain_http_to(&addr);
    assert!(!reply.starts_with(b"HTTP/"), "{reply:?}");
    // The node took no harm from any of it.
    let out = status(&["--admin", &url, "--ca-file", &ca, "--token-file", &token]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = std::fs::read_to_string(&ferry_sync.log).unwrap_or_default();
    assert!(!log.contains(TOKEN), "the token is in the log");
}

#[test]
fn an_admin_api_beyond_loopback_needs_a_token() {
    let pki = pki_with_tokens();
    let dir = tempfile::tempdir().unwrap();
    let base = |admin: &str| -> Vec<String> {
        [
            "sync",
            "--source",
            "redis://127.0.0.1:1",
            "--target",
            "redis://127.0.0.1:2",
            "--data-dir",
            dir.path().join("sync").to_str().unwrap(),
            "--admin",
            admin,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = base("0.0.0.0:0");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ferry(&args);
    let error = stderr(&out);
    assert!(
        !out.status.success() && error.contains("admin-token-file"),
        "{error}"
    );
    // A TLS key without its certificate: refused, named.
    let mut args = base("127.0.0.1:0");
    args.extend(["--admin-tls-key-file".to_string(), pki.file("server.key")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ferry(&args);
    let error = stderr(&out);
    assert!(
        !out.status.success() && error.contains("admin-tls-cert-file"),
        "{error}"
    );
    // The same beyond loopback in listener.toml: refused, naming the key.
    let config = dir.path().join("listener.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = {:?}\nadmin = \"0.0.0.0:7390\"\n\n[listener]\nsource = \
             \"redis://127.0.0.1:1\"\n\n[[drainers]]\nid = \"d\"\nendpoint = \
             \"http://127.0.0.1:2\"\nsecret = \"12345678\"\n",
            dir.path().join("listener").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = ferry(&["listener", "--config", config.to_str().unwrap()]);
    let error = stderr(&out);
    assert!(
        !out.status.success() && error.contains("admin-token-file"),
        "{error}"
    );
}
