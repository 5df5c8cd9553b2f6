//! `ferry sync` as a process between two real redis-servers: full sync,
//! streaming, kill -9 and restart without a full resync, clean SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::ferry::FerryProcess;
use common::RedisServer;

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sync_resumes_after_kill9_without_full_resync() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    source.cmd(&["DEBUG", "POPULATE", "20000", "key", "50"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sync");
    let mut ferry = FerryProcess::sync(&data, &source.url(), &target.url(), &[]);
    wait_for("the full sync", Duration::from_secs(60), || {
        target.cmd(&["EXISTS", "key:19999"]) == "1"
    });
    for _ in 0..50 {
        source.cmd(&["INCR", "counter"]);
    }
    wait_for("50 increments", Duration::from_secs(30), || {
        target.cmd(&["GET", "counter"]) == "50"
    });
    ferry.kill9();
    for _ in 0..50 {
        source.cmd(&["INCR", "counter"]);
    }
    ferry.spawn();
    wait_for("100 increments", Duration::from_secs(30), || {
        target.cmd(&["GET", "counter"]) == "100"
    });
    assert_eq!(source.info_field("sync_full").as_deref(), Some("1"));
    assert_eq!(source.info_field("sync_partial_ok").as_deref(), Some("1"));
    let status = ferry.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}; {}", ferry.log_tail(30));
    // Nothing more than the data and the checkpoint key on the target.
    assert_eq!(target.cmd(&["DBSIZE"]), "20002");
    assert_eq!(
        target.cmd(&["KEYS", "__ferry*"]),
        "__ferry:checkpoint:ferry:0"
    );
}
