//! `rediss://`: ferry replicates from a source and into a target that speak
//! TLS, with certificates made here (a CA, the servers' certificates, a
//! client certificate for a source that requires one); a wrong CA or a
//! missing client certificate fails the handshake, named in the status,
//! and nothing is replicated in the clear.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::ferry::{assert_verify_clean, FerryProcess};
use common::pki::Pki;
use common::{free_port, RedisServer};

/// A redis-server with a plain port (for the test's own redis-cli) and a
/// TLS port (the only one ferry is given).
struct TlsRedis {
    server: RedisServer,
    tls_port: u16,
}

impl TlsRedis {
    fn start(pki: &Pki, require_client_cert: bool) -> TlsRedis {
        let tls_port = free_port();
        let port = tls_port.to_string();
        let (cert, key, ca) = (
            pki.file("server.pem"),
            pki.file("server.key"),
            pki.file("ca.pem"),
        );
        let auth = if require_client_cert { "yes" } else { "no" };
        let server = RedisServer::start(&[
            "--tls-port",
            &port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            auth,
            "--repl-diskless-sync-delay",
            "0",
        ]);
        TlsRedis { server, tls_port }
    }

    fn url(&self, query: &str) -> String {
        format!("rediss://127.0.0.1:{}?{query}", self.tls_port)
    }
}

fn wait_for(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn query(pki: &Pki, ca: &str, client: bool) -> String {
    let mut q = format!("tls-ca-file={}", pki.file(ca));
    if client {
        q.push_str(&format!(
            "&tls-cert-file={}&tls-key-file={}",
            pki.file("client.pem"),
            pki.file("client.key")
        ));
    }
    q
}

fn sync(dir: &Path, source: &str, target: &str) -> FerryProcess {
    FerryProcess::sync(dir, source, target, &[])
}

#[test]
fn a_sync_over_tls_with_a_client_certificate_replicates_and_verifies() {
    let pki = Pki::new();
    let source = TlsRedis::start(&pki, true);
    let target = TlsRedis::start(&pki, false);
    source
        .server
        .cmd(&["DEBUG", "POPULATE", "5000", "key", "30"]);
    let dir = tempfile::tempdir().unwrap();
    let source_url = source.url(&query(&pki, "ca.pem", true));
    let target_url = target.url(&query(&pki, "ca.pem", false));
    let ferry = sync(&dir.path().join("sync"), &source_url, &target_url);
    wait_for(
        "the full sync over TLS",
        Duration::from_secs(60),
        || ferry.log_tail(30),
        || target.server.cmd(&["DBSIZE"]) == "5001",
    );
    for i in 0..100 {
        source.server.cmd(&["INCR", "counter"]);
        source.server.cmd(&["RPUSH", "list", &i.to_string()]);
    }
    wait_for(
        "the stream over TLS",
        Duration::from_secs(30),
        || ferry.log_tail(30),
        || target.server.cmd(&["LLEN", "list"]) == "100",
    );
    assert_eq!(target.server.cmd(&["GET", "counter"]), "100");
    // ferry's replica link is on the TLS port: the source has one replica,
    // and the status names the source as rediss://.
    assert_eq!(
        source.server.info_field("connected_slaves").as_deref(),
        Some("1")
    );
    let status = ferry.status_json();
    assert!(
        status["listeners"][0]["source"]
            .as_str()
            .unwrap()
            .starts_with("rediss://")
            || status["listeners"][0]["source"]
                .as_str()
                .unwrap()
                .contains(&source.tls_port.to_string()),
        "{status}"
    );
    assert_verify_clean("verify over TLS", &source_url, &target_url, || {
        ferry.log_tail(30)
    });
}

#[test]
fn a_wrong_ca_or_a_missing_client_certificate_fails_the_handshake() {
    let pki = Pki::new();
    let source = TlsRedis::start(&pki, true);
    let target = TlsRedis::start(&pki, false);
    source.server.cmd(&["SET", "k", "v"]);
    let dir = tempfile::tempdir().unwrap();
    let target_url = target.url(&query(&pki, "ca.pem", false));
    let cases = [
        (
            "an untrusted server certificate",
            query(&pki, "other-ca.pem", true),
        ),
        ("no client certificate", query(&pki, "ca.pem", false)),
    ];
    for (i, (what, source_query)) in cases.into_iter().enumerate() {
        let ferry = sync(
            &dir.path().join(format!("sync{i}")),
            &source.url(&source_query),
            &target_url,
        );
        wait_for(
            what,
            Duration::from_secs(30),
            || ferry.log_tail(30),
            || {
                let status = ferry.status_json();
                let error = status["listeners"][0]["source_error"]
                    .as_str()
                    .unwrap_or("")
                    .to_lowercase();
                error.contains("tls") || error.contains("certificate")
            },
        );
        assert_eq!(target.server.cmd(&["DBSIZE"]), "0", "{what}");
    }
    // Plain text to a TLS port is refused too (never a silent success).
    let ferry = sync(
        &dir.path().join("plain"),
        &format!("redis://127.0.0.1:{}", source.tls_port),
        &target_url,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(target.server.cmd(&["DBSIZE"]), "0");
    drop(ferry);
}
