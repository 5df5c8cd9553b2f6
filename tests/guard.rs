//! `ferry guard` against real redis-servers: a target only ferry writes,
//! `ferry sync` writing through the guard as its user, and `--off` putting
//! back exactly what was there (issue 11, "guarded target").

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use common::cluster::Cluster;
use common::ferry::FerryProcess;
use common::resp::{Conn, Resp};
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
    let target_url = format!("redis://ferry@127.0.0.1:{}", target.port);
    let (_data, mut sync) = sync_as_ferry(&source.url(), &target_url, &ferry_pw);
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
    // A lone cluster node serves no slot: no place for the record.
    let node = RedisServer::start(&["--cluster-enabled", "yes"]);
    refused(&node.url(), &ferry_pw, "no master serves slot");
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

// ---------------------------------------------------------------------------
// A Redis Cluster target: every node (masters and replicas) guarded.

/// A connection to the node on `port`, logged in as `login` (`None`: the
/// default user, no `AUTH`).
fn node_conn(port: u16, login: Option<(&str, &str)>) -> Conn {
    let addr = format!("127.0.0.1:{port}");
    let mut conn = Conn::connect(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    if let Some((user, password)) = login {
        let reply = conn.call(&["AUTH", user, password]).expect("AUTH");
        assert_eq!(reply, Resp::Simple("OK".into()), "AUTH {user} on {addr}");
    }
    conn
}

fn call(conn: &mut Conn, args: &[&str]) -> Resp {
    conn.call(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn is_noperm(reply: &Resp) -> bool {
    matches!(reply, Resp::Error(message) if message.starts_with("NOPERM"))
}

/// Every running node's `ACL LIST` (one line per user), by port.
fn acl_lists(cluster: &Cluster) -> BTreeMap<u16, String> {
    cluster
        .nodes()
        .map(|node| (node.port, cli_at(node.port, None, &["ACL", "LIST"])))
        .collect()
}

/// `redis-cli -p port` as `user` (`None`: no login).
fn cli_at(port: u16, user: Option<(&str, &str)>, args: &[&str]) -> String {
    let mut cmd = Command::new(redis_cli_bin());
    cmd.args(["-p", &port.to_string()]);
    if let Some((user, password)) = user {
        cmd.args(["--user", user, "--pass", password, "--no-auth-warning"]);
    }
    let output = cmd.args(args).output().expect("run redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The node's role (`INFO replication`), readable by any user.
fn is_master(port: u16) -> bool {
    cli_at(port, None, &["INFO", "replication"]).contains("role:master")
}

/// Whether `__ferry:guard` exists on the master serving it.
fn record_exists(cluster: &Cluster) -> bool {
    cluster
        .call_key("__ferry:guard", &["EXISTS", "__ferry:guard"])
        .int()
        == 1
}

/// One node as a guard must leave it for applications: reads (a replica
/// after `READONLY`), routing (`CLUSTER SLOTS`/`SHARDS`/`NODES`), and no
/// writes, `ACL` or `CONFIG`, for `login` (`None`: no login).
fn assert_read_only(port: u16, login: Option<(&str, &str)>, keys: &[(String, String)]) {
    let who = format!("{:?} on node {port}", login.map(|(user, _)| user));
    let mut conn = node_conn(port, login);
    if !is_master(port) {
        assert_eq!(
            call(&mut conn, &["READONLY"]),
            Resp::Simple("OK".into()),
            "{who}"
        );
    }
    for routing in [&["CLUSTER", "SLOTS"][..], &["CLUSTER", "SHARDS"]] {
        let reply = call(&mut conn, routing);
        assert!(
            matches!(&reply, Resp::Array(Some(items)) if !items.is_empty()),
            "{routing:?} {who}: {reply:?}"
        );
    }
    let nodes = call(&mut conn, &["CLUSTER", "NODES"]);
    assert!(
        matches!(nodes, Resp::Bulk(Some(_))),
        "CLUSTER NODES {who}: {nodes:?}"
    );
    // The keys this node's shard serves read back (the others: MOVED).
    let mut own = None;
    for (key, value) in keys {
        match call(&mut conn, &["GET", key]) {
            Resp::Bulk(Some(got)) => {
                assert_eq!(String::from_utf8_lossy(&got), *value, "GET {key} {who}");
                own = Some(key.as_str());
            }
            Resp::Error(message) if message.starts_with("MOVED") => {}
            other => panic!("GET {key} {who}: {other:?}"),
        }
    }
    let own = own.unwrap_or_else(|| panic!("no key of its shard read {who}"));
    for refused in [
        &["SET", own, "x"][..],
        &["DEL", own],
        &["ACL", "SETUSER", "default", "+@all"],
        &["CONFIG", "SET", "maxmemory", "1"],
        &["CLUSTER", "FAILOVER"],
    ] {
        let reply = call(&mut conn, refused);
        assert!(is_noperm(&reply), "{refused:?} {who}: {reply:?}");
    }
    // A script runs its commands with the caller's rights (a replica sends
    // a script that may write to its master).
    let script = &["EVAL", "return redis.call('SET',KEYS[1],'x')", "1", own];
    let reply = call(&mut conn, script);
    let refused = match &reply {
        Resp::Error(message) if message.contains("can't run this command") => true,
        Resp::Error(message) if message.starts_with("MOVED") => !is_master(port),
        _ => false,
    };
    assert!(refused, "{script:?} {who}: {reply:?}");
}

/// Waits until every replica has every one of `keys` (replication is
/// asynchronous).
fn wait_replicated(cluster: &Cluster, keys: &[(String, String)]) {
    for node in cluster.nodes() {
        if is_master(node.port) {
            continue;
        }
        wait_for("the keys on the replicas", || {
            let mut conn = node_conn(node.port, None);
            call(&mut conn, &["READONLY"]);
            keys.iter()
                .all(|(key, value)| match call(&mut conn, &["GET", key]) {
                    Resp::Bulk(Some(got)) => got == value.as_bytes(),
                    Resp::Error(message) => message.starts_with("MOVED"),
                    _ => false,
                })
        });
    }
}

#[test]
fn a_guarded_cluster_takes_writes_only_from_ferry_on_every_node_and_off_restores_it() {
    let source = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let cluster = Cluster::start(3, 1);
    let secrets = tempfile::tempdir().unwrap();
    let ferry_pw = write_file(secrets.path(), "ferry.pw", "s3cret-ferry\n");
    let app_pw = write_file(secrets.path(), "app.pw", "s3cret-app\n");
    let keys: Vec<(String, String)> = (0..30)
        .map(|i| (format!("before:{i}"), format!("v{i}")))
        .collect();
    cluster.set_all(&keys);
    wait_replicated(&cluster, &keys);
    let rules_before = acl_lists(&cluster);
    assert_eq!(rules_before.len(), 6);

    // Guarded through one node's URL: every node, masters and replicas.
    let out = ferry(&[
        "guard",
        "--target",
        &cluster.url(),
        "--ferry-password-file",
        &ferry_pw,
        "--app-user",
        "app",
        "--app-password-file",
        &app_pw,
    ]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("6 nodes (3 masters, 3 replicas)"), "{said}");
    assert!(said.contains("no aclfile"), "{said}");
    assert!(!said.contains("s3cret"), "a password in the output: {said}");
    for port in rules_before.keys() {
        assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
    }
    let ferry_login = Some(("ferry", "s3cret-ferry"));
    let app_login = Some(("app", "s3cret-app"));
    for node in cluster.nodes() {
        for login in [None, app_login] {
            assert_read_only(node.port, login, &keys);
        }
    }
    // The ferry user writes every master.
    for port in cluster.master_ports() {
        let mut conn = node_conn(port, ferry_login);
        let key = keys
            .iter()
            .map(|(key, _)| key)
            .find(|key| cluster.master_for_key(key).port == port)
            .expect("a key of every master");
        assert_eq!(
            call(&mut conn, &["SET", key, "by-ferry"]),
            Resp::Simple("OK".into())
        );
        let (_, value) = keys.iter().find(|(k, _)| k == key).unwrap();
        assert_eq!(
            call(&mut conn, &["SET", key, value]),
            Resp::Simple("OK".into())
        );
    }
    let record_before = cluster.call_key("__ferry:guard", &["HGETALL", "__ferry:guard"]);
    assert_eq!(
        record_before.items().len(),
        2 * (1 + 6),
        "{record_before:?}"
    );

    // ferry sync writes through the guard as its user, to every master.
    source.cmd(&["SET", "replicated", "a"]);
    let target_url = format!(
        "redis://ferry@{}",
        cluster.url().trim_start_matches("redis://")
    );
    let (_data, mut sync) = sync_as_ferry(&source.url(), &target_url, &ferry_pw);
    wait_for("the full sync through the guard", || {
        cluster
            .call_key("replicated", &["GET", "replicated"])
            .text()
            == Some("a".into())
    });
    source.cmd(&["INCR", "counter"]);
    wait_for("a stream write through the guard", || {
        cluster.call_key("counter", &["GET", "counter"]).text() == Some("1".into())
    });
    assert!(
        sync.try_exit().is_none(),
        "ferry sync ended: {}",
        sync.log_tail(30)
    );
    sync.terminate(Duration::from_secs(30));

    // A failover (as the ferry user: CLUSTER FAILOVER is @admin): the
    // promoted replica stays guarded, and the old master replicates from
    // it (PSYNC as the default user) once the cluster settled.
    let old_master = cluster.master_ports()[0];
    let replica = cluster.shard_of_master(old_master).replicas[0].port;
    let mut conn = node_conn(replica, ferry_login);
    assert_eq!(
        call(&mut conn, &["CLUSTER", "FAILOVER"]),
        Resp::Simple("OK".into())
    );
    wait_for("the replica promoted", || is_master(replica));
    cluster.wait_settled();
    assert!(!is_master(old_master));
    assert_read_only(replica, None, &keys);
    assert_read_only(old_master, app_login, &keys);

    // Guarding again (as the ferry user) keeps the first record.
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
    let record = cluster.call_key("__ferry:guard", &["HGETALL", "__ferry:guard"]);
    let as_map = |reply: &Resp| -> BTreeMap<String, String> {
        reply
            .items()
            .chunks(2)
            .map(|pair| (pair[0].text().unwrap(), pair[1].text().unwrap()))
            .collect()
    };
    assert_eq!(as_map(&record), as_map(&record_before));
    for node in cluster.nodes() {
        let recorded = as_map(&record)[&format!("default-rules:{}", node.id())].clone();
        assert_eq!(format!("user default {recorded}"), rules_before[&node.port]);
    }
    assert_eq!(as_map(&record)["users"], "ferry app");

    // Off, through another node: every node's ACL LIST as it was.
    let other = cluster.nodes().last().unwrap().port;
    let out = ferry(&[
        "guard",
        "--off",
        "--target",
        &format!("redis://ferry@127.0.0.1:{other}"),
        "--target-password-file",
        &ferry_pw,
    ]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("guard off on 6 node(s)"), "{said}");
    assert_eq!(acl_lists(&cluster), rules_before);
    assert!(!record_exists(&cluster));
    for port in cluster.master_ports() {
        let key = keys
            .iter()
            .map(|(key, _)| key)
            .find(|key| cluster.master_for_key(key).port == port)
            .unwrap();
        assert_eq!(cli_at(port, None, &["SET", key, "after"]), "OK");
    }
    assert_eq!(
        cluster
            .call_key("replicated", &["GET", "replicated"])
            .text(),
        Some("a".into())
    );

    // Nothing to undo any more: said, and nothing changes.
    let out = ferry(&["guard", "--off", "--target", &cluster.url()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not guarded"), "{}", text(&out));
    assert_eq!(acl_lists(&cluster), rules_before);
}

#[test]
fn a_cluster_guard_refused_on_one_node_leaves_every_node_unchanged() {
    let mut cluster = Cluster::start(3, 1);
    let dir = tempfile::tempdir().unwrap();
    let ferry_pw = write_file(dir.path(), "ferry.pw", "pw-ferry");
    let ops_pw = write_file(dir.path(), "ops.pw", "pw-ops");
    let guard = |url: &str, extra: &[&str]| {
        let mut args = vec!["guard", "--target", url, "--ferry-password-file", &ferry_pw];
        args.extend_from_slice(extra);
        ferry(&args)
    };
    let record_at = cluster.master_for_key("__ferry:guard").port;
    let mut others: Vec<u16> = cluster
        .nodes()
        .map(|n| n.port)
        .filter(|port| *port != record_at)
        .collect();
    others.sort();

    // An operator's user named like the ferry user, on one replica only:
    // refused, naming that node, before any node changed.
    let replica = cluster.nodes().find(|n| !is_master(n.port)).unwrap().port;
    cli_at(
        replica,
        None,
        &["ACL", "SETUSER", "ferry", "on", ">ops", "~ops:*", "+get"],
    );
    let before = acl_lists(&cluster);
    let out = guard(&cluster.url(), &[]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("was not made by ferry guard"), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{replica}")), "{said}");
    assert_eq!(acl_lists(&cluster), before);
    assert!(!record_exists(&cluster));
    cli_at(replica, None, &["ACL", "DELUSER", "ferry"]);

    // A login that may read ACLs everywhere but not set users on the last
    // node the guard changes before the record's own: the record and the
    // nodes already guarded are put back.
    let restricted = *others.last().unwrap();
    for node in cluster.nodes() {
        let commands = if node.port == restricted {
            "-acl|setuser"
        } else {
            "+@all"
        };
        cli_at(
            node.port,
            None,
            &[
                "ACL", "SETUSER", "ops", "on", ">pw-ops", "~*", "&*", "+@all", commands,
            ],
        );
    }
    let before = acl_lists(&cluster);
    let out = ferry(&[
        "guard",
        "--target",
        &format!("redis://ops@127.0.0.1:{record_at}"),
        "--target-password-file",
        &ops_pw,
        "--ferry-password-file",
        &ferry_pw,
    ]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{restricted}")), "{said}");
    assert!(said.contains("nothing was left changed"), "{said}");
    assert_eq!(acl_lists(&cluster), before);
    assert!(!record_exists(&cluster));

    // Guarded; then a node added: --off restores the guarded ones and
    // names the new one, which keeps its rules.
    let out = guard(&cluster.url(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let added = cluster.add_replica(record_at);
    let added_rules = cli_at(added, None, &["ACL", "LIST"]);
    let out = ferry(&[
        "guard",
        "--off",
        "--target",
        &format!("redis://ferry@127.0.0.1:{record_at}"),
        "--target-password-file",
        &ferry_pw,
    ]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("not guarded"), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{added}")), "{said}");
    let mut expected = before.clone();
    expected.insert(added, added_rules);
    assert_eq!(acl_lists(&cluster), expected);
    assert!(!record_exists(&cluster));

    // One node down: refused, naming it, and no running node changed.
    cluster.kill9(added);
    let out = guard(&cluster.url(), &[]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{added}")), "{said}");
    expected.remove(&added);
    assert_eq!(acl_lists(&cluster), expected);
    assert!(!record_exists(&cluster));
}

/// `ferry sync` into a guarded target as the ferry user (the target keeps
/// what it has), with its data dir.
fn sync_as_ferry(
    source_url: &str,
    target_url: &str,
    ferry_pw: &str,
) -> (tempfile::TempDir, FerryProcess) {
    let data = tempfile::tempdir().unwrap();
    let sync = FerryProcess::sync(
        &data.path().join("sync"),
        source_url,
        target_url,
        &[
            "--target-password-file",
            ferry_pw,
            "--existing-data",
            "keep",
        ],
    );
    (data, sync)
}
