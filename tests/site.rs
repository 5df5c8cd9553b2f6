//! `ferry site` against real redis-servers (issue 11, item 1, in conf/ for
//! listener/drainer deployments): two processes, one per site, each the
//! listener of its server and the drainer into it. Concurrent writes to
//! the same keys on both sides while either site is killed with SIGKILL
//! again and again end with every increment counted once and every pushed
//! element present once on both sides, and nothing loops; side b's site
//! finds conflicts and, under a winner policy, makes both sides converge.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::ferry::FerryProcess;
use common::pki::Pki;
use common::side::Side;
use common::two_way::{
    expected, seeded_tags, side_writer, slot_writers, state, stop_and_wait_both_hold, wait_for,
    Done,
};
use common::{free_port, RedisServer};

/// A site's config: side `side` ("a" or "b") with its server `url`, its
/// drainer endpoint on `listen`, shipping to the other site's on
/// `peer_listen`; `site_extra` goes in `[site]`.
fn site_config(
    dir: &Path,
    side: &str,
    url: &str,
    listen: u16,
    peer_listen: u16,
    site_extra: &str,
    tls: Option<&Pki>,
) -> (PathBuf, PathBuf) {
    let other = if side == "a" { "b" } else { "a" };
    let data = dir.join(format!("site-{side}"));
    // Mutual TLS between the sites: each drainer endpoint presents the
    // server certificate and wants a client certificate of the CA; each
    // shipper trusts the CA and presents the client certificate.
    let (scheme, ship_tls, drainer_tls) = match tls {
        None => ("http", String::new(), String::new()),
        Some(pki) => (
            "https",
            format!(
                "tls-ca-file = \"{}\"\ntls-cert-file = \"{}\"\ntls-key-file = \"{}\"\n",
                pki.file("ca.pem"),
                pki.file("client.pem"),
                pki.file("client.key")
            ),
            format!(
                "[drainer.tls]\ncert-file = \"{}\"\nkey-file = \"{}\"\nclient-ca-file = \"{}\"\n",
                pki.file("server.pem"),
                pki.file("server.key"),
                pki.file("ca.pem")
            ),
        ),
    };
    let text = format!(
        r#"data-dir = "{data}"
admin = "127.0.0.1:0"
listen = "127.0.0.1:{listen}"

[site]
side = "{side}"
{site_extra}

[listener]
id = "listener-{side}"
source = "{url}"
heartbeat-interval = "200ms"

[ship]
reconnect-min = "50ms"
reconnect-max = "500ms"

[[drainers]]
id = "drainer-{other}"
endpoint = "{scheme}://127.0.0.1:{peer_listen}"
secret = "secret-{side}-to-{other}"
{ship_tls}
[drainer]
[[drainer.listeners]]
id = "listener-{other}"
secret = "secret-{other}-to-{side}"

{drainer_tls}

[apply]
drainer-id = "drainer-{side}"
retry-backoff-max = "500ms"
"#,
        data = data.display()
    );
    let path = dir.join(format!("site-{side}.toml"));
    std::fs::write(&path, text).unwrap();
    (path, data)
}

/// Both sites of a two-way sync between `a` and `b`.
struct Sites {
    _dir: tempfile::TempDir,
    a: FerryProcess,
    b: FerryProcess,
    b_data: PathBuf,
    /// Side a's partitions (from 0) and side b's (1 between standalone
    /// servers, else from 1000).
    forward: Vec<u64>,
    backward: Vec<u64>,
}

impl Sites {
    /// Starts both sites between two standalone servers; `b_extra` goes in
    /// side b's `[site]`.
    fn start(a: &RedisServer, b: &RedisServer, b_extra: &str) -> Sites {
        Sites::start_with(a, b, b_extra, None)
    }

    /// [`Sites::start`], the link between the sites over mutual TLS with
    /// `tls`'s certificates when given.
    fn start_with(a: &RedisServer, b: &RedisServer, b_extra: &str, tls: Option<&Pki>) -> Sites {
        let shape = (vec![0], vec![1]);
        Sites::start_urls(&a.url(), &b.url(), b_extra, tls, shape)
    }

    /// Both sites between `a` and `b` (a cluster side: a seed list), side
    /// b's `[site]` naming A as its `peer`; with `a_masters` and
    /// `b_masters` partitions on each side (1 for a standalone server).
    fn start_sides(a: Side, b: Side, b_extra: &str) -> Sites {
        let count = |side: Side| match side {
            Side::Standalone(_) => 1,
            Side::Cluster(cluster) => cluster.master_ports().len() as u64,
        };
        let peer = match a {
            Side::Standalone(server) => server.url(),
            Side::Cluster(cluster) => cluster.url(),
        };
        let extra = format!("peer = \"{peer}\"\n{b_extra}");
        let shape = ((0..count(a)).collect(), (1000..1000 + count(b)).collect());
        Sites::start_urls(&a.url(), &b.url(), &extra, None, shape)
    }

    fn start_urls(
        a: &str,
        b: &str,
        b_extra: &str,
        tls: Option<&Pki>,
        (forward, backward): (Vec<u64>, Vec<u64>),
    ) -> Sites {
        let dir = tempfile::tempdir().unwrap();
        let (listen_a, listen_b) = (free_port(), free_port());
        let (a_cfg, a_data) = site_config(dir.path(), "a", a, listen_a, listen_b, "", tls);
        let (b_cfg, b_data) = site_config(dir.path(), "b", b, listen_b, listen_a, b_extra, tls);
        let site_a = FerryProcess::with_config("site", &a_cfg, &a_data);
        let site_b = FerryProcess::with_config("site", &b_cfg, &b_data);
        Sites {
            _dir: dir,
            a: site_a,
            b: site_b,
            b_data,
            forward,
            backward,
        }
    }

    /// Both directions run: site b's listener of B (each of its
    /// partitions) and its drainer of A's, site a's drainer of B's, every
    /// applier ONLINE.
    fn established(&self) -> bool {
        let online = |status: &serde_json::Value, partitions: &[u64]| {
            partitions.iter().all(|&partition| {
                status["drainers"].as_array().is_some_and(|d| {
                    d.iter()
                        .any(|s| s["partition"] == partition && s["state"] == "ONLINE")
                })
            })
        };
        let b = self.b.status_json();
        let b_listens = self.backward.iter().all(|&partition| {
            b["listeners"]
                .as_array()
                .is_some_and(|l| l.iter().any(|s| s["partition"] == partition))
        });
        b_listens && online(&b, &self.forward) && online(&self.a.status_json(), &self.backward)
    }

    fn wait_established(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.established() {
            assert!(
                Instant::now() < deadline,
                "both sites do not run both directions:\n--- side a\n{}\n--- side b\n{}",
                self.a.log_tail(30),
                self.b.log_tail(30)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills site a, then site b, in turns, `rounds` times in all, with
    /// SIGKILL (each restarted at once), the `i`-th after `first_ms` + `i`
    /// x `step_ms`.
    fn kill_in_turns(&mut self, rounds: u64, first_ms: u64, step_ms: u64) {
        for round in 0..rounds {
            thread::sleep(Duration::from_millis(first_ms + step_ms * round));
            let site = if round % 2 == 0 {
                &mut self.a
            } else {
                &mut self.b
            };
            site.kill9();
            site.spawn();
        }
    }

    /// (commands applied, echoes) of site a's drainer, then site b's.
    fn counters(&self) -> Vec<(u64, u64)> {
        [&self.a, &self.b]
            .iter()
            .map(|site| {
                let status = site.status_json();
                let drainers = status["drainers"].as_array().cloned().unwrap_or_default();
                let sum = |field: &str| {
                    drainers
                        .iter()
                        .map(|d| d[field].as_u64().unwrap_or(0))
                        .sum()
                };
                (sum("commands_applied"), sum("echoes"))
            })
            .collect()
    }

    /// Nothing loops (as `tests/two_way.rs` checks a `ferry sync
    /// --two-way`): once both drainers count echoes, idle, no drainer
    /// applies anything and echoes stay within the held-back silent
    /// batches' few.
    fn assert_nothing_loops(&self) {
        wait_for(
            "both drainers to count echoes",
            Duration::from_secs(30),
            || self.counters().iter().all(|(_, echoes)| *echoes > 0),
        );
        thread::sleep(Duration::from_millis(1500));
        let settled = self.counters();
        thread::sleep(Duration::from_secs(3));
        let now = self.counters();
        for ((applied, echoes), (applied_then, echoes_then)) in now.iter().zip(&settled) {
            assert!(
                applied == applied_then && *echoes <= echoes_then + 10,
                "something went back and forth: {now:?}, settled {settled:?}"
            );
        }
    }
}

fn ferry_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap()
}

/// `ferry verify` finds both sides equal.
fn assert_verified(a: &str, b: &str) {
    let out = ferry_cli(&["verify", "--source", a, "--target", b]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Waits for `site` to stop by itself.
fn wait_exit(site: &mut FerryProcess, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = site.try_exit() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the site did not stop: {}",
            site.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn log_of(site: &FerryProcess) -> String {
    std::fs::read_to_string(&site.log).unwrap()
}

#[test]
fn two_sites_concurrent_writes_converge_exactly_once_across_kill_9_of_either() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    a.cmd(&["SET", "seed", "1"]);
    a.cmd(&["INCRBY", "c", "100"]);
    let mut sites = Sites::start(&a, &b, "");
    sites.wait_established();
    assert_eq!(b.cmd(&["GET", "seed"]), "1");
    assert!(log_of(&sites.b).contains("two-way sync established"));

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = [(a.addr(), "a"), (b.addr(), "b")]
        .into_iter()
        .map(|(addr, name)| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || side_writer(addr, name, stop))
        })
        .collect();
    // Each site killed three times, in turns, at moments spread out.
    sites.kill_in_turns(6, 400, 90);
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let done: Vec<Done> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let (on_a, on_b) = (&done[0], &done[1]);
    assert!(
        on_a.incr > 100 && on_b.incr > 100,
        "too few writes: {on_a:?} {on_b:?}"
    );
    let want = expected(on_a, on_b);
    for server in [&a, &b] {
        wait_for(
            &format!("{} to hold every write of both sides once", server.addr()),
            Duration::from_secs(90),
            || state(server) == want,
        );
    }
    sites.wait_established();
    sites.assert_nothing_loops();
    for server in [&a, &b] {
        assert_eq!(state(server), want);
    }
    // Partition 1 never full-syncs: B's stream starts at its mark, and
    // site a's drainer never loads (a load there would stop it).
    let b_log = log_of(&sites.b);
    assert!(!b_log.contains("full resync stored partition=1"), "{b_log}");
    assert!(!sites.a.has_exited() && !sites.b.has_exited());
    // (The list's order differs between the sides: concurrent `LPUSH`es
    // of one key are conflicts, applied as they came under `report`.)
    sites.a.terminate(Duration::from_secs(20));
    sites.b.terminate(Duration::from_secs(20));
}

/// Side b's site finds the conflicts from both logs and, under
/// `source-wins`, writes each conflicted key again where the winner's write
/// was applied last, through `peer` when that is A: both sides end with
/// side a's writes.
#[test]
fn side_b_finds_conflicts_and_a_winner_policy_makes_both_sides_converge() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    let extra = format!("conflict = \"source-wins\"\npeer = \"{}\"", a.url());
    let sites = Sites::start(&a, &b, &extra);
    sites.wait_established();
    // One side after the other saw it: no conflict.
    a.cmd(&["SET", "turns", "a"]);
    wait_for("A's write on B", Duration::from_secs(30), || {
        b.cmd(&["GET", "turns"]) == "a"
    });
    b.cmd(&["SET", "turns", "b"]);
    wait_for("B's write on A", Duration::from_secs(30), || {
        a.cmd(&["GET", "turns"]) == "b"
    });
    // Both streams held while both sides write.
    let admins: Vec<String> = [&sites.a, &sites.b]
        .iter()
        .map(|site| site.admin_addr(Duration::from_secs(10)))
        .collect();
    for admin in &admins {
        let out = ferry_cli(&["stop-sync", "--admin", admin]);
        assert!(out.status.success(), "{out:?}");
    }
    a.cmd(&["SET", "both:key", "from-a"]);
    b.cmd(&["SET", "both:key", "from-b"]);
    a.cmd(&["INCR", "both:n"]);
    b.cmd(&["INCR", "both:n"]);
    b.cmd(&["SET", "only-b", "1"]);
    for admin in &admins {
        let out = ferry_cli(&["restart-sync", "--admin", admin]);
        assert!(out.status.success(), "{out:?}");
    }
    wait_for(
        "two conflicts, two keys repaired",
        Duration::from_secs(60),
        || {
            let status = sites.b.status_json();
            status["two_way"]["conflicts"] == 2
                && status["two_way"]["repaired"] == 2
                && status["two_way"]["repairs_owed"] == 0
        },
    );
    wait_for("both sides to agree", Duration::from_secs(60), || {
        a.cmd(&["GET", "both:key"]) == "from-a" && b.cmd(&["GET", "both:key"]) == "from-a"
    });
    wait_for("the counter on both sides", Duration::from_secs(30), || {
        a.cmd(&["GET", "both:n"]) == "2" && b.cmd(&["GET", "both:n"]) == "2"
    });
    wait_for("B's other write on A", Duration::from_secs(30), || {
        a.cmd(&["GET", "only-b"]) == "1"
    });
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(sites.b_data.join("conflicts.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
    let mut keys: Vec<&str> = lines.iter().map(|l| l["key"].as_str().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, ["both:key", "both:n"], "{lines:?}");
    for line in &lines {
        assert_eq!(line["source"]["partition"], 0, "{line}");
        assert_eq!(line["target"]["partition"], 1, "{line}");
        assert_eq!(line["policy"], "source-wins", "{line}");
    }
    assert_verified(&a.url(), &b.url());
    // Site a finds none: it has no detector.
    assert!(sites.a.status_json()["two_way"].is_null());
}

/// Killed while being established (during the first full sync, and while
/// side b marks B), side b establishes its direction once: partition 1
/// never full-syncs, and writes on both sides after it carry both ways.
#[test]
fn kill_9_of_side_b_while_establishing_establishes_it_once() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    for i in 0..2000 {
        a.cmd(&["SET", &format!("k{i}"), "v"]);
    }
    a.cmd(&["SET", "n", "0"]);
    let mut sites = Sites::start(&a, &b, "");
    for delay_ms in [150u64, 300, 450, 600, 800] {
        thread::sleep(Duration::from_millis(delay_ms));
        sites.b.kill9();
        sites.b.spawn();
    }
    sites.wait_established();
    assert!(b.cmd(&["DBSIZE"]).parse::<i64>().unwrap() >= 2001);
    a.cmd(&["INCR", "n"]);
    b.cmd(&["INCR", "n"]);
    wait_for(
        "both increments on both sides",
        Duration::from_secs(30),
        || a.cmd(&["GET", "n"]) == "2" && b.cmd(&["GET", "n"]) == "2",
    );
    assert_verified(&a.url(), &b.url());
    let b_log = log_of(&sites.b);
    assert!(
        !b_log.contains("full resync stored partition=1"),
        "partition 1 never full-syncs: {b_log}"
    );
    // Logged once, or not at all when a kill came between entry 1
    // and the line.
    assert!(
        b_log.matches("two-way sync established").count() <= 1,
        "{b_log}"
    );
}

/// Side b's first start runs its drainer's precheck on B (the first full
/// sync's `existing-data = "refuse"`): a B that holds keys is refused and
/// nothing is written to it. Side a's server keeps its data: its drainer
/// never loads, so the same rule does not stop it.
#[test]
fn side_b_refuses_a_server_with_data_and_side_a_keeps_its_own() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    a.cmd(&["SET", "on-a", "1"]);
    b.cmd(&["SET", "on-b", "1"]);
    let mut sites = Sites::start(&a, &b, "");
    let status = wait_exit(&mut sites.b, Duration::from_secs(30));
    assert!(!status.success());
    let log = log_of(&sites.b);
    assert!(log.contains("precheck failed"), "{log}");
    assert!(log.contains("existing-data"), "{log}");
    assert_eq!(b.cmd(&["DBSIZE"]), "1");
    assert!(!sites.a.has_exited(), "{}", log_of(&sites.a));
    assert_eq!(a.cmd(&["GET", "on-a"]), "1");
}

/// A flush on one side is held by the other site's drainer (BLOCKED, the
/// two-way refusal), not carried over; the other direction goes on, and a
/// switchover is refused.
#[test]
fn a_flush_on_one_side_is_held_by_the_other_sites_drainer() {
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    a.cmd(&["SET", "k", "1"]);
    let sites = Sites::start(&a, &b, "");
    sites.wait_established();
    b.cmd(&["SET", "from-b", "1"]);
    wait_for("a write of B on A", Duration::from_secs(30), || {
        a.cmd(&["GET", "from-b"]) == "1"
    });
    a.cmd(&["FLUSHDB"]);
    wait_for(
        "site b's drainer to hold the flush",
        Duration::from_secs(30),
        || {
            let status = sites.b.status_json();
            status["drainers"][0]["state"] == "BLOCKED"
                && status["drainers"][0]["blocked"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("two-way sync refuses"))
        },
    );
    assert_eq!(b.cmd(&["GET", "k"]), "1", "the flush reached B");
    assert_eq!(b.cmd(&["GET", "from-b"]), "1");
    b.cmd(&["SET", "after", "1"]);
    wait_for("B's next write on A", Duration::from_secs(30), || {
        a.cmd(&["GET", "after"]) == "1"
    });
    let admin = sites.b.admin_addr(Duration::from_secs(10));
    let out = ferry_cli(&["switchover", "--admin", &admin]);
    assert!(!out.status.success(), "{out:?}");
}

/// The link between the sites over mutual TLS (`https://` endpoints,
/// `[drainer.tls]` with `client-ca-file`, each shipper's client
/// certificate): established, and writes carried both ways.
#[test]
fn two_sites_over_mutual_tls_carry_writes_both_ways() {
    let pki = Pki::new();
    let a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    a.cmd(&["SET", "seed", "1"]);
    let sites = Sites::start_with(&a, &b, "", Some(&pki));
    sites.wait_established();
    assert_eq!(b.cmd(&["GET", "seed"]), "1");
    a.cmd(&["INCR", "n"]);
    b.cmd(&["INCR", "n"]);
    wait_for(
        "both increments on both sides",
        Duration::from_secs(30),
        || a.cmd(&["GET", "n"]) == "2" && b.cmd(&["GET", "n"]) == "2",
    );
    for site in [&sites.a, &sites.b] {
        let log = log_of(site);
        assert!(log.contains("mutual_tls=true"), "{log}");
    }
}

// ---------------------------------------------------------------------------
// Sites beside Redis Clusters

/// The issue's test with a cluster on either side: concurrent `INCR`,
/// `INCRBY`, `HINCRBY`, `LPUSH` on keys of every shard from both sides
/// while the two sites are killed with SIGKILL in turns: every increment
/// counted once and every element present once on both sides, nothing
/// loops, no partition of B full-syncs, and side b's status names the
/// pair.
fn cluster_sites_converge_exactly_once_across_kill_9(a: Side, b: Side, pair: &str) {
    let tags = seeded_tags(a);
    let mut sites = Sites::start_sides(a, b, "");
    sites.wait_established();
    assert!(log_of(&sites.b).contains("two-way sync established"));
    let layout = std::fs::read_to_string(sites.b_data.join("site.layout")).unwrap();
    assert_eq!(layout.trim(), format!("b {pair}"));

    let stop = Arc::new(AtomicBool::new(false));
    let writers = slot_writers(a, b, &tags, &stop);
    sites.kill_in_turns(4, 600, 150);
    thread::sleep(Duration::from_millis(700));
    stop_and_wait_both_hold((a, b), &tags, (&stop, writers), 20, &[&sites.a, &sites.b]);
    sites.wait_established();
    sites.assert_nothing_loops();
    let b_log = log_of(&sites.b);
    assert!(
        !b_log.contains("full resync stored partition=10"),
        "{b_log}"
    );
    assert!(!sites.a.has_exited() && !sites.b.has_exited());
    assert_eq!(sites.b.status_json()["two_way"]["pair"], pair);
    sites.a.terminate(Duration::from_secs(20));
    sites.b.terminate(Duration::from_secs(20));
}

#[test]
fn two_cluster_sites_converge_exactly_once_across_kill_9_of_either() {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    cluster_sites_converge_exactly_once_across_kill_9(
        Side::Cluster(&a),
        Side::Cluster(&b),
        "clusters",
    );
}

#[test]
fn a_standalone_site_and_a_cluster_site_converge_exactly_once_across_kill_9() {
    let a = RedisServer::start(&[]);
    let b = Cluster::start(3, 0);
    cluster_sites_converge_exactly_once_across_kill_9(
        Side::Standalone(&a),
        Side::Cluster(&b),
        "standalone-cluster",
    );
}

#[test]
fn a_cluster_site_and_a_standalone_site_converge_exactly_once_across_kill_9() {
    let a = Cluster::start(3, 0);
    let b = RedisServer::start(&[]);
    cluster_sites_converge_exactly_once_across_kill_9(
        Side::Cluster(&a),
        Side::Standalone(&b),
        "cluster-standalone",
    );
}

/// Between cluster sites, side b finds conflicts in every shard and, under
/// `target-wins`, both clusters end with B's writes (a repair on A goes
/// to the master of the key's slot through `peer`); `ferry verify` agrees.
#[test]
fn cluster_sites_find_conflicts_and_a_winner_policy_converges() {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    let (a_side, b_side) = (Side::Cluster(&a), Side::Cluster(&b));
    let tags = seeded_tags(a_side);
    let sites = Sites::start_sides(a_side, b_side, "conflict = \"target-wins\"");
    sites.wait_established();
    let admins: Vec<String> = [&sites.a, &sites.b]
        .iter()
        .map(|site| site.admin_addr(Duration::from_secs(10)))
        .collect();
    for admin in &admins {
        let out = ferry_cli(&["stop-sync", "--admin", admin]);
        assert!(out.status.success(), "{out:?}");
    }
    for tag in &tags {
        let key = format!("k:{tag}");
        a_side.call_key(&key, &["SET", &key, "from-a"]);
        b_side.call_key(&key, &["SET", &key, "from-b"]);
    }
    for admin in &admins {
        let out = ferry_cli(&["restart-sync", "--admin", admin]);
        assert!(out.status.success(), "{out:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = sites.b.status_json();
        let two_way = &status["two_way"];
        if two_way["conflicts"] == 3 && two_way["repaired"] == 3 && two_way["repairs_owed"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{two_way}\n{}",
            sites.b.log_tail(40)
        );
        thread::sleep(Duration::from_millis(100));
    }
    for tag in &tags {
        let key = format!("k:{tag}");
        wait_for(
            &format!("{key} from B on both"),
            Duration::from_secs(60),
            || {
                a_side.get(&key).as_deref() == Some("from-b")
                    && b_side.get(&key).as_deref() == Some("from-b")
            },
        );
    }
    assert_verified(&a.seed_list(), &b.seed_list());
}

/// Side b learns that A is a cluster only through `peer`: a cluster B
/// without it is a config error naming `site.peer`; a standalone B without
/// it pairs with a standalone A, and a cluster A's site shipping more than
/// one partition stops side b's establishing with the reason. Neither
/// writes a mark on B.
#[test]
fn side_b_without_peer_refuses_what_needs_it() {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    let sites = Sites::start_urls(
        &a.seed_list(),
        &b.seed_list(),
        "",
        None,
        (vec![0, 1, 2], vec![1000, 1001, 1002]),
    );
    let mut b_site = sites.b;
    let status = wait_exit(&mut b_site, Duration::from_secs(30));
    assert!(!status.success());
    let log = log_of(&b_site);
    assert!(log.contains("site.peer"), "{log}");

    let server = RedisServer::start(&[]);
    let sites = Sites::start_urls(&a.seed_list(), &server.url(), "", None, (vec![0], vec![1]));
    let mut b_site = sites.b;
    let status = wait_exit(&mut b_site, Duration::from_secs(90));
    assert!(!status.success());
    let log = log_of(&b_site);
    assert!(log.contains("A runs Redis Cluster"), "{log}");
    assert_eq!(server.cmd(&["EXISTS", "__ferry:two-way:listener-b"]), "0");
}

/// kill -9 of side b at each step of establishing between clusters: A
/// prepared, the first master of B marked (its partition's entry 1
/// durable), every master marked (the established file not written). The
/// restart marks no master again, no partition of B full-syncs, and writes
/// on both sides then converge exactly once.
#[test]
fn cluster_sites_killed_while_establishing_establish_once() {
    let a = Cluster::start(3, 0);
    let b = Cluster::start(3, 0);
    let (a_side, b_side) = (Side::Cluster(&a), Side::Cluster(&b));
    let tags = seeded_tags(a_side);
    let mut sites = Sites::start_sides(a_side, b_side, "");
    for point in [
        "two-way-prepared",
        "two-way-marked-one",
        "two-way-marked-all",
    ] {
        let mark = sites.b.log_len();
        sites
            .b
            .respawn_with_env(&[("FERRY_TEST_SWITCHOVER_HOLD", point)]);
        wait_for(
            &format!("the hold at {point}"),
            Duration::from_secs(90),
            || {
                let log = sites.b.log_since(mark);
                log.contains("ferry holds here") && log.contains(point)
            },
        );
        assert!(!sites.b.log_since(mark).contains("two-way sync established"));
        sites.b.kill9();
    }
    let mark = sites.b.log_len();
    sites.b.respawn_with_env(&[]);
    sites.wait_established();
    let restart = sites.b.log_since(mark);
    let established = restart
        .lines()
        .find(|line| line.contains("two-way sync established"))
        .unwrap_or_else(|| panic!("{restart}"));
    assert!(!established.contains(" at 127.0.0.1:"), "{established}");

    let stop = Arc::new(AtomicBool::new(false));
    let writers = slot_writers(a_side, b_side, &tags, &stop);
    thread::sleep(Duration::from_millis(1500));
    stop_and_wait_both_hold(
        (a_side, b_side),
        &tags,
        (&stop, writers),
        0,
        &[&sites.a, &sites.b],
    );
    let b_log = log_of(&sites.b);
    assert!(
        !b_log.contains("full resync stored partition=10"),
        "{b_log}"
    );
}
