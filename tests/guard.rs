//! `ferry guard` against real redis-servers: a target only ferry writes,
//! `ferry sync` writing through the guard as its user, and `--off` putting
//! back exactly what was there (issue 11, "guarded target").

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::ferry::FerryProcess;
use common::{redis_cli_bin, RedisServer};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("FERRY_TARGET_PASSWORD")
        .output()
        .expect("run ferry")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `redis-cli` as `user` (`None`: the default user, no login).
fn cli_as(server: &RedisServer, user: Option<(&str, &str)>, args: &[&str]) -> String {
    let mut cmd = Command::new(redis_cli_bin());
    cmd.args(["-p", &server.port.to_string()]);
    if let Some((user, password)) = user {
        cmd.args(["--user", user, "--pass", password, "--no-auth-warning"]);
    }
    let output = cmd.args(args).output().expect("run redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn write_file(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.to_str().unwrap().to_string()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_guarded_target_takes_writes_only_from_ferry_and_off_restores_it() {
    let source = RedisServer::start(&[]);
    let target = RedisServer::start(&[]);
    let secrets = tempfile::tempdir().unwrap();
    let ferry_pw = write_file(secrets.path(), "ferry.pw", "s3cret-ferry\n");
    let app_pw = write_file(secrets.path(), "app.pw", "s3cret-app\n");
    let rules_before = cli_as(&target, None, &["ACL", "LIST"]);
    target.cmd(&["SET", "before", "1"]);

    let out = ferry(&[
        "guard",
        "--target",
        &target.url(),
        "--ferry-password-file",
        &ferry_pw,
        "--app-user",
        "app",
        "--app-password-file",
        &app_pw,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("guarded"), "{said}");
    assert!(said.contains("no aclfile"), "{said}");
    assert!(!said.contains("s3cret"), "a password in the output: {said}");

    // Applications (no login, or the app user) read, and cannot write nor
    // lift the guard.
    let ferry_login = Some(("ferry", "s3cret-ferry"));
    let app_login = Some(("app", "s3cret-app"));
    for login in [None, app_login] {
        assert_eq!(cli_as(&target, login, &["GET", "before"]), "1");
        assert!(cli_as(&target, login, &["SET", "k", "v"]).contains("NOPERM"));
        let script = cli_as(
            &target,
            login,
            &["EVAL", "return redis.call('SET','k','v')", "0"],
        );
        assert!(script.contains("can't run this command"), "{script}");
        assert!(cli_as(&target, login, &["ACL", "SETUSER", "default", "+@all"]).contains("NOPERM"));
        assert!(cli_as(&target, login, &["CONFIG", "SET", "maxmemory", "1"]).contains("NOPERM"));
    }
    assert_eq!(
        cli_as(&target, ferry_login, &["SET", "by-ferry", "1"]),
        "OK"
    );
    assert_eq!(cli_as(&target, ferry_login, &["DEL", "by-ferry"]), "1");

    // ferry sync writes through the guard as its user.
    source.cmd(&["SET", "replicated", "a"]);
    let data = tempfile::tempdir().unwrap();
    let target_url = format!("redis://ferry@127.0.0.1:{}", target.port);
    let mut sync = FerryProcess::sync(
        &data.path().join("sync"),
        &source.url(),
        &target_url,
        &[
            "--target-password-file",
            &ferry_pw,
            "--existing-data",
            "keep",
        ],
    );
    wait_for("the full sync through the guard", || {
        cli_as(&target, None, &["GET", "replicated"]) == "a"
    });
    source.cmd(&["INCR", "counter"]);
    wait_for("a stream write through the guard", || {
        cli_as(&target, None, &["GET", "counter"]) == "1"
    });
    assert!(sync.try_exit().is_none(), "ferry sync ended");
    sync.terminate(Duration::from_secs(30));

    // Guarding again keeps the first record (what --off goes back to).
    let out = ferry(&[
        "guard",
        "--target",
        &target_url,
        "--target-password-file",
        &ferry_pw,
        "--ferry-password-file",
        &ferry_pw,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let recorded = cli_as(&target, None, &["HGET", "__ferry:guard", "default-rules"]);
    assert_eq!(format!("user default {recorded}"), rules_before);
    assert_eq!(
        cli_as(&target, None, &["HGET", "__ferry:guard", "users"]),
        "ferry app"
    );

    // Off: from the ferry user's login, back to the rules there were.
    let out = ferry(&[
        "guard",
        "--off",
        "--target",
        &target_url,
        "--target-password-file",
        &ferry_pw,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(cli_as(&target, None, &["ACL", "LIST"]), rules_before);
    assert_eq!(cli_as(&target, None, &["SET", "k", "v"]), "OK");
    assert_eq!(cli_as(&target, None, &["EXISTS", "__ferry:guard"]), "0");
    assert_eq!(cli_as(&target, None, &["GET", "replicated"]), "a");

    // Nothing to undo any more: said, and nothing changes.
    let out = ferry(&["guard", "--off", "--target", &target.url()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not guarded"), "{}", text(&out));
    assert_eq!(cli_as(&target, None, &["ACL", "LIST"]), rules_before);
}

#[test]
fn a_guard_is_saved_to_the_aclfile_and_refused_where_it_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let aclfile = dir.path().join("users.acl");
    std::fs::write(&aclfile, "user default on nopass ~* &* +@all\n").unwrap();
    let target = RedisServer::start(&["--aclfile", aclfile.to_str().unwrap()]);
    let rules_before = target.cmd(&["ACL", "LIST"]);
    let ferry_pw = write_file(dir.path(), "ferry.pw", "pw1");
    let out = ferry(&[
        "guard",
        "--target",
        &target.url(),
        "--ferry-password-file",
        &ferry_pw,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("aclfile"), "{}", text(&out));
    let saved = std::fs::read_to_string(&aclfile).unwrap();
    assert!(saved.contains("user ferry on"), "{saved}");
    assert!(saved.contains("-@write"), "{saved}");
    let out = ferry(&[
        "guard",
        "--off",
        "--target",
        &format!("redis://ferry@127.0.0.1:{}", target.port),
        "--target-password-file",
        &ferry_pw,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let saved = std::fs::read_to_string(&aclfile).unwrap();
    assert!(!saved.contains("user ferry"), "{saved}");
    assert!(!saved.contains("-@write"), "{saved}");

    assert_eq!(target.cmd(&["ACL", "LIST"]), rules_before);

    // Without a password for the ferry user, with an empty one, and on a
    // cluster node: refused, and nothing changes.
    let out = ferry(&["guard", "--target", &target.url()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--ferry-password-file"),
        "{}",
        text(&out)
    );
    let refused = |url: &str, password_file: &str, why: &str| {
        let out = ferry(&[
            "guard",
            "--target",
            url,
            "--ferry-password-file",
            password_file,
        ]);
        assert!(!out.status.success());
        assert!(text(&out).contains(why), "{}", text(&out));
    };
    let empty = write_file(dir.path(), "empty.pw", "\n");
    refused(&target.url(), &empty, "is empty");
    assert_eq!(target.cmd(&["ACL", "LIST"]), rules_before);
    let node = RedisServer::start(&["--cluster-enabled", "yes"]);
    refused(&node.url(), &ferry_pw, "Redis Cluster");
    // An operator's own user of that name is not taken over (nor, later,
    // deleted by --off).
    target.cmd(&["ACL", "SETUSER", "ferry", "on", ">ops", "~ops:*", "+get"]);
    let operators = target.cmd(&["ACL", "LIST"]);
    refused(&target.url(), &ferry_pw, "was not made by ferry guard");
    assert_eq!(target.cmd(&["ACL", "LIST"]), operators);
    assert!(!node.cmd(&["ACL", "LIST"]).contains("ferry"));
}

/// `ferry sync` from `source` into `target` with short foreign-write
/// sampling windows (every 300 ms for 250 ms).
fn sampling_sync(source: &RedisServer, target: &str) -> (tempfile::TempDir, FerryProcess) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sync.toml");
    std::fs::write(
        &config,
        "[apply]\nforeign-writes-every = \"300ms\"\nforeign-writes-window = \"250ms\"\n",
    )
    .unwrap();
    let sync = FerryProcess::sync(
        &dir.path().join("sync"),
        &source.url(),
        target,
        &["--config", config.to_str().unwrap()],
    );
    (dir, sync)
}

/// An unguarded target written by someone else: `ferry sync` notices it in
/// its sampling windows (count, samples, a warning in the log and in `ferry
/// status`), never counting its own writes.
#[test]
fn writes_ferry_did_not_make_are_noticed() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let target = RedisServer::start(&[]);
    let (_dir, sync) = sampling_sync(&source, &target.url());
    let side = |field: &str| sync.status_json()["drainers"][0][field].clone();
    // Only ferry writes: windows pass, nothing counted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, port) = (stop.clone(), source.port);
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = Command::new(redis_cli_bin())
                    .args(["-p", &port.to_string(), "INCR", "from-source"])
                    .output();
                i += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            i
        })
    };
    // The full sync is done before anyone else writes the target (keys
    // there would stop it: existing-data = "refuse").
    wait_for("the full sync", || {
        !cli_as(&target, None, &["GET", "from-source"]).is_empty()
    });
    let before = side("foreign_windows").as_u64().unwrap_or(0);
    wait_for("a few sampling windows", || {
        side("foreign_windows").as_u64().unwrap_or(0) >= before + 4
    });
    assert_eq!(
        side("foreign_writes").as_u64(),
        Some(0),
        "ferry's own writes counted"
    );

    // Someone else writes the target: noticed, with the key and client.
    let app = {
        let (stop, port) = (stop.clone(), target.port);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = Command::new(redis_cli_bin())
                    .args(["-p", &port.to_string(), "SET", "app:x", "1"])
                    .output();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    wait_for("the foreign writes noticed", || {
        side("foreign_writes").as_u64().unwrap_or(0) > 0
    });
    let samples = side("foreign_samples").to_string();
    assert!(samples.contains(r#"SET \"app:x\""#), "{samples}");
    assert!(!samples.contains("from-source"), "{samples}");
    let log = std::fs::read_to_string(&sync.log).unwrap();
    assert!(
        log.contains("writes on the target that ferry did not make"),
        "{log}"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    app.join().unwrap();
    assert!(writer.join().unwrap() > 0);
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["status", "--data-dir", sync.data_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        text(&out).contains("writes on the target that ferry did not make"),
        "{}",
        text(&out)
    );
    let expected = source.cmd(&["GET", "from-source"]);
    wait_for("ferry's own writes on the target", || {
        cli_as(&target, None, &["GET", "from-source"]) == expected
    });
}

#[test]
fn writes_ferry_did_not_make_are_noticed_on_every_master_of_a_cluster_target() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    source.cmd(&["SET", "from-source", "1"]);
    let cluster = common::cluster::Cluster::start(3, 0);
    let (_dir, sync) = sampling_sync(&source, &cluster.url());
    let side = |field: &str| sync.status_json()["drainers"][0][field].clone();
    wait_for("the full sync", || {
        cluster
            .call_key("from-source", &["GET", "from-source"])
            .text()
            == Some("1".into())
    });
    wait_for("sampling windows on the masters", || {
        side("foreign_windows").as_u64().unwrap_or(0) >= 6
    });
    assert_eq!(
        side("foreign_writes").as_u64(),
        Some(0),
        "ferry's own writes counted"
    );
    // Someone else writes keys of every master: noticed.
    let keys: Vec<String> = (0..30).map(|i| format!("app:{i}")).collect();
    wait_for("the foreign writes noticed", || {
        for key in &keys {
            cluster.call_key(key, &["SET", key, "1"]);
        }
        side("foreign_writes").as_u64().unwrap_or(0) > 0
    });
    let samples = side("foreign_samples").to_string();
    assert!(samples.contains("app:"), "{samples}");
}
