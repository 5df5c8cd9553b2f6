//! `ferry verify` with a Redis Cluster on either side or both, against real
//! clusters (tests/common/cluster.rs) and real standalone servers:
//!
//! - a cluster and a standalone server holding the same data are equal,
//!   either way round, found out from any node or a seed list, with every
//!   master scanned; then a difference of each kind (missing, extra, value,
//!   type, ttl) on every shard is found and named, either way round, also
//!   by the binary (text and `--json`);
//! - clusters of 3 and of 2 masters: equal, then differences on keys over
//!   all the shards of both;
//! - a slot half migrated by hand (keys on both masters, `ASK` for the
//!   moved ones): equal, differences in that slot found on both masters;
//! - a resharding between two passes (the keys re-checked have moved:
//!   `MOVED`), and a resharding during the walk (slots walked again), end
//!   clean on equal data, and find every difference on keys that moved.
//!
//! Run: `cargo test --test verify_cluster -- --test-threads 2` (each test
//! starts its own clusters; a few minutes on a loaded box).

mod common;

use std::collections::BTreeSet;
use std::process::Command as Process;
use std::time::{Duration, Instant};

use common::cluster::{key_in_slot, Cluster};
use common::ferry::ferry_bin;
use common::resp::Resp;
use common::{output_within, RedisServer};
use ferry::redis::url::RedisUrl;
use ferry::verify::{
    self, DiffKind, KeyReport, PassEvent, SideTopology, VerifyConfig, VerifyError, VerifyReport,
};

/// A command about one key: `(key, args)`.
type KeyedCommand = (String, Vec<String>);

fn keyed(key: &str, args: &[&str]) -> KeyedCommand {
    (
        key.to_string(),
        args.iter().map(|a| a.to_string()).collect(),
    )
}

/// Where test data goes: a cluster (routed by the harness itself) or a
/// standalone server.
#[derive(Clone, Copy)]
enum Store<'a> {
    Cluster(&'a Cluster),
    Server(&'a RedisServer),
}

impl Store<'_> {
    /// Runs `cmds`; every reply must be a success.
    fn write(&self, cmds: &[KeyedCommand]) {
        let replies = match self {
            Store::Cluster(cluster) => cluster.pipeline_keys(cmds),
            Store::Server(server) => {
                let mut conn = common::resp::connect(&server.addr());
                let mut replies = Vec::new();
                for window in cmds.chunks(500) {
                    for (_, args) in window {
                        conn.queue(args);
                    }
                    replies.extend(conn.replies().expect("pipeline"));
                }
                replies
            }
        };
        for ((_, args), reply) in cmds.iter().zip(&replies) {
            assert!(!matches!(reply, Resp::Error(_)), "{args:?}: {reply:?}");
        }
    }
}

/// `count` keys `<prefix>:<i>` of every type (some with a TTL), spread over
/// all slots.
fn dataset(prefix: &str, count: usize) -> Vec<KeyedCommand> {
    (0..count)
        .map(|i| {
            let key = format!("{prefix}:{i}");
            let n = i.to_string();
            let value = format!("value-{i}");
            match i % 7 {
                0 => keyed(&key, &["SET", &key, &value]),
                1 => keyed(&key, &["RPUSH", &key, "a", "b", &n]),
                2 => keyed(&key, &["HSET", &key, "f1", "v1", "f2", &n]),
                3 => keyed(&key, &["SADD", &key, "m1", "m2", &n]),
                4 => keyed(&key, &["ZADD", &key, "1", "a", "2", &n]),
                5 => keyed(&key, &["XADD", &key, "1-0", "f", &n]),
                _ => keyed(&key, &["SET", &key, &value, "EX", "3600"]),
            }
        })
        .collect()
}

fn url(text: &str) -> RedisUrl {
    RedisUrl::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn config(source: &str, target: &str) -> VerifyConfig {
    let mut config = VerifyConfig::new(url(source), url(target));
    config.qps = 0;
    config.pass_interval = Duration::from_millis(100);
    config
}

/// `config` whose `side` is given as the seed list of every running node
/// of `cluster`, the first node as `source`/`target` and the others as
/// seeds.
fn with_seed_list(mut config: VerifyConfig, side: verify::Side, cluster: &Cluster) -> VerifyConfig {
    let mut seeds: Vec<RedisUrl> = cluster.nodes().map(|n| url(&n.url())).collect();
    let first = seeds.remove(0);
    match side {
        verify::Side::Source => {
            config.source = first;
            config.source_seeds = seeds;
        }
        verify::Side::Target => {
            config.target = first;
            config.target_seeds = seeds;
        }
    }
    config
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn run(config: &VerifyConfig) -> VerifyReport {
    runtime()
        .block_on(verify::run(config))
        .unwrap_or_else(|e| panic!("verify failed: {e}"))
}

fn assert_equal(report: &VerifyReport, what: &str) {
    assert!(
        report.equal && report.differences_total == 0,
        "{what}: {}",
        verify::render_report(report)
    );
}

fn cluster_side(masters: u32) -> SideTopology {
    SideTopology {
        cluster: true,
        masters_scanned: masters,
        rewalks: 0,
    }
}

fn standalone_side() -> SideTopology {
    SideTopology {
        cluster: false,
        masters_scanned: 1,
        rewalks: 0,
    }
}

fn listed<'a>(report: &'a VerifyReport, key: &str) -> Option<&'a KeyReport> {
    report
        .differences
        .iter()
        .find(|k| k.db == 0 && k.key == key)
}

/// One key per kind of difference, in `slot`: `(key, kind as seen from
/// `source` → `target`)`; written on top of equal data.
fn make_differences(source: Store, target: Store, slots: &[u16]) -> Vec<(String, DiffKind)> {
    let mut on_source = Vec::new();
    let mut on_target = Vec::new();
    let mut expected = Vec::new();
    for (i, &slot) in slots.iter().enumerate() {
        let key = |kind: &str| key_in_slot(&format!("d{i}:{kind}"), slot);
        let missing = key("missing");
        on_source.push(keyed(&missing, &["SET", &missing, "only on the source"]));
        expected.push((missing, DiffKind::Missing));
        let extra = key("extra");
        on_target.push(keyed(&extra, &["SET", &extra, "only on the target"]));
        expected.push((extra, DiffKind::Extra));
        let value = key("value");
        on_source.push(keyed(&value, &["SET", &value, "abc"]));
        on_target.push(keyed(&value, &["SET", &value, "abd"]));
        expected.push((value, DiffKind::Value));
        let kind = key("type");
        on_source.push(keyed(&kind, &["SET", &kind, "a string"]));
        on_target.push(keyed(&kind, &["RPUSH", &kind, "a list"]));
        expected.push((kind, DiffKind::Type));
        let ttl = key("ttl");
        on_source.push(keyed(&ttl, &["SET", &ttl, "v", "EX", "3600"]));
        on_target.push(keyed(&ttl, &["SET", &ttl, "v"]));
        expected.push((ttl, DiffKind::Ttl));
    }
    source.write(&on_source);
    target.write(&on_target);
    expected
}

/// Every expected difference is listed with its kind, and nothing else.
fn assert_differences(report: &VerifyReport, expected: &[(String, DiffKind)], what: &str) {
    let shown = verify::render_report(report);
    assert!(!report.equal, "{what}: {shown}");
    for (key, kind) in expected {
        let found =
            listed(report, key).unwrap_or_else(|| panic!("{what}: {key} not listed:\n{shown}"));
        assert_eq!(found.kinds, [*kind], "{what}: {key}: {found:?}");
    }
    assert_eq!(
        report.differences_total,
        expected.len() as u64,
        "{what}: {shown}"
    );
}

/// The same with missing and extra swapped: the view from the other side.
fn swapped(expected: &[(String, DiffKind)]) -> Vec<(String, DiffKind)> {
    expected
        .iter()
        .map(|(key, kind)| {
            let kind = match kind {
                DiffKind::Missing => DiffKind::Extra,
                DiffKind::Extra => DiffKind::Missing,
                other => *other,
            };
            (key.clone(), kind)
        })
        .collect()
}

/// A slot inside each shard of `cluster` (away from the range ends).
fn a_slot_per_shard(cluster: &Cluster) -> Vec<u16> {
    cluster
        .shards()
        .iter()
        .map(|shard| shard.master.slots[0].0 + 17)
        .collect()
}

/// The masters (ports) serving `keys`.
fn masters_of(cluster: &Cluster, keys: &[(String, DiffKind)]) -> BTreeSet<u16> {
    keys.iter()
        .map(|(key, _)| cluster.master_for_key(key).port)
        .collect()
}

const KEYS: usize = 700;

#[test]
fn cluster_and_standalone_are_compared_either_way() {
    let cluster = Cluster::start(3, 0);
    let server = RedisServer::start(&[]);
    let data = dataset("k", KEYS);
    Store::Cluster(&cluster).write(&data);
    Store::Server(&server).write(&data);

    // Cluster → standalone, the cluster given by one node.
    let report = run(&config(&cluster.url(), &server.url()));
    assert_equal(&report, "cluster → standalone");
    println!(
        "cluster → standalone, {KEYS} keys, no rate limit: {} ms, {} + {} commands",
        report.elapsed_ms, report.source_commands, report.target_commands
    );
    assert_eq!(report.source_topology, cluster_side(3));
    assert_eq!(report.target_topology, standalone_side());
    assert_eq!(report.dbs.len(), 1);
    assert_eq!(report.dbs[0].keys_checked, KEYS as u64);

    // Standalone → cluster, the cluster given as a seed list whose first
    // address does not answer.
    let mut config_back = with_seed_list(
        config(&server.url(), &cluster.url()),
        verify::Side::Target,
        &cluster,
    );
    config_back
        .target_seeds
        .insert(0, config_back.target.clone());
    config_back.target = url(&format!("redis://127.0.0.1:{}", common::free_port()));
    let report = run(&config_back);
    assert_equal(&report, "standalone → cluster");
    assert_eq!(report.source_topology, standalone_side());
    assert_eq!(report.target_topology, cluster_side(3));
    assert_eq!(report.dbs[0].keys_checked, KEYS as u64);

    // A difference of each kind on every shard.
    let slots = a_slot_per_shard(&cluster);
    let expected = make_differences(Store::Cluster(&cluster), Store::Server(&server), &slots);
    assert_eq!(masters_of(&cluster, &expected).len(), 3);
    let report = run(&config(&cluster.url(), &server.url()));
    assert_differences(&report, &expected, "cluster → standalone");
    let db = &report.dbs[0];
    assert_eq!(
        (db.missing, db.extra, db.value, db.type_, db.ttl, db.passes),
        (3, 3, 3, 3, 3, 3)
    );
    let report = run(&config(&server.url(), &cluster.url()));
    assert_differences(&report, &swapped(&expected), "standalone → cluster");

    // The binary, text and JSON, the cluster given as a seed list.
    let verify_bin = |extra: &[&str]| {
        let mut process = Process::new(ferry_bin());
        process
            .args([
                "verify",
                "--source",
                &cluster.seed_list(),
                "--target",
                &server.url(),
                "--passes",
                "1",
            ])
            .args(extra);
        output_within(&mut process, Duration::from_secs(120)).expect("ferry verify")
    };
    let text = verify_bin(&[]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("source: cluster, 3 masters scanned; target: standalone"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "different: 15 of {} keys differ after the last pass",
            KEYS + 15
        )),
        "{stdout}"
    );
    let json = verify_bin(&["--json"]);
    assert_eq!(json.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("one JSON object");
    assert_eq!(json["source_topology"]["cluster"], true);
    assert_eq!(json["source_topology"]["masters_scanned"], 3);
    assert_eq!(json["target_topology"]["cluster"], false);
    assert_eq!(json["differences_total"], 15);
    assert_eq!(json["dbs"][0]["missing"], 3);
    assert_eq!(json["dbs"][0]["extra"], 3);
    assert!(
        json["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("redis://127.0.0.1:") && s.contains(',')),
        "{json}"
    );
}

#[test]
fn clusters_of_three_and_two_masters_are_compared() {
    let three = Cluster::start(3, 0);
    let two = Cluster::start_by_hand(2);
    let data = dataset("k", KEYS);
    Store::Cluster(&three).write(&data);
    Store::Cluster(&two).write(&data);

    let report = run(&config(&three.url(), &two.url()));
    assert_equal(&report, "3 → 2");
    assert_eq!(report.source_topology, cluster_side(3));
    assert_eq!(report.target_topology, cluster_side(2));
    assert_eq!(report.dbs[0].keys_checked, KEYS as u64);
    let report = run(&with_seed_list(
        config(&two.url(), &three.url()),
        verify::Side::Source,
        &two,
    ));
    assert_equal(&report, "2 → 3");
    assert_eq!(report.source_topology, cluster_side(2));
    assert_eq!(report.target_topology, cluster_side(3));

    // Differences on every shard of both.
    let mut slots = a_slot_per_shard(&three);
    slots.extend(a_slot_per_shard(&two));
    let expected = make_differences(Store::Cluster(&three), Store::Cluster(&two), &slots);
    assert_eq!(masters_of(&three, &expected).len(), 3);
    assert_eq!(masters_of(&two, &expected).len(), 2);
    let report = run(&config(&three.url(), &two.url()));
    assert_differences(&report, &expected, "3 → 2");
    let report = run(&config(&two.url(), &three.url()));
    assert_differences(&report, &swapped(&expected), "2 → 3");
}

#[test]
fn a_slot_half_migrated_is_walked_on_both_masters_and_read_through_ask() {
    let cluster = Cluster::start(3, 0);
    let server = RedisServer::start(&[]);
    let mut data = dataset("k", KEYS);
    let ports = cluster.master_ports();
    let slot = cluster.shard_of_master(ports[0]).master.slots[0].0 + 5;
    let in_slot: Vec<String> = (0..20)
        .map(|i| key_in_slot(&format!("m{i}"), slot))
        .collect();
    for key in &in_slot {
        data.push(keyed(key, &["SET", key, "before"]));
    }
    Store::Cluster(&cluster).write(&data);
    Store::Server(&server).write(&data);

    cluster.begin_slot_migration(slot, ports[0], ports[1]);
    for key in &in_slot[..10] {
        cluster.migrate_key(key, ports[0], ports[1]);
    }
    let owner_keys = |port: u16| {
        cluster
            .node(port)
            .call(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
            .int()
    };
    assert_eq!((owner_keys(ports[0]), owner_keys(ports[1])), (10, 10));

    let total = (KEYS + in_slot.len()) as u64;
    let report = run(&config(&cluster.url(), &server.url()));
    assert_equal(&report, "cluster (slot migrating) → standalone");
    assert_eq!(report.dbs[0].keys_checked, total);
    assert_eq!(report.source_topology, cluster_side(3));
    let report = run(&config(&server.url(), &cluster.url()));
    assert_equal(&report, "standalone → cluster (slot migrating)");
    assert_eq!(report.dbs[0].keys_checked, total);

    // Values differ on keys of that slot on both masters, and keys exist on
    // one side only on both masters.
    let mut expected = Vec::new();
    let mut on_server = Vec::new();
    for key in [&in_slot[0], &in_slot[15]] {
        on_server.push(keyed(key, &["SET", key, "after"]));
        expected.push((key.clone(), DiffKind::Value));
    }
    for key in [&in_slot[1], &in_slot[16]] {
        on_server.push(keyed(key, &["DEL", key]));
        expected.push((key.clone(), DiffKind::Missing));
    }
    Store::Server(&server).write(&on_server);
    let report = run(&config(&cluster.url(), &server.url()));
    assert_differences(&report, &expected, "cluster (slot migrating) → standalone");
    let report = run(&config(&server.url(), &cluster.url()));
    assert_differences(
        &report,
        &swapped(&expected),
        "standalone → cluster (slot migrating)",
    );

    // The migration done: equal again once the data is.
    cluster.migrate_slot_keys(slot, ports[0], ports[1]);
    cluster.finish_slot_migration(slot, ports[0], ports[1]);
    let restore: Vec<KeyedCommand> = [&in_slot[0], &in_slot[15], &in_slot[1], &in_slot[16]]
        .iter()
        .map(|key| keyed(key, &["SET", key, "before"]))
        .collect();
    Store::Server(&server).write(&restore);
    assert_equal(
        &run(&config(&cluster.url(), &server.url())),
        "after the migration",
    );
}

#[test]
fn a_resharding_between_passes_ends_clean() {
    let cluster = Cluster::start(3, 0);
    let server = RedisServer::start(&[]);
    let data = dataset("k", KEYS);
    Store::Cluster(&cluster).write(&data);
    Store::Server(&server).write(&data);
    // Keys the target lacks at first (lag), in the slots about to move.
    let ports = cluster.master_ports();
    let first = cluster.shard_of_master(ports[0]).master.slots[0].0;
    let lagging: Vec<KeyedCommand> = (0..30u16)
        .map(|i| {
            let key = key_in_slot(&format!("lag{i}"), first + i * 10);
            keyed(&key, &["SET", &key, "late"])
        })
        .collect();
    Store::Cluster(&cluster).write(&lagging);

    let mut passes = Vec::new();
    let mut observer = |event: &PassEvent| {
        passes.push(event.clone());
        if event.pass == 1 {
            // Between pass 1 and pass 2: the slots of the lagging keys move
            // to another master, and the target catches up.
            cluster.reshard(ports[0], ports[1], 400);
            Store::Server(&server).write(&lagging);
        }
    };
    let mut config = config(&cluster.url(), &server.url());
    config.passes = 3;
    let report = runtime()
        .block_on(verify::run_observed(&config, &mut observer))
        .unwrap_or_else(|e| panic!("verify failed: {e}"));
    assert_equal(&report, "after a resharding between passes");
    assert_eq!(report.dbs[0].differing_after_pass, [30, 0]);
    assert_eq!(passes.len(), 2);
    for (key, _) in &lagging {
        assert_eq!(cluster.master_for_key(key).port, ports[1], "{key} moved");
    }
}

/// Runs `verify` on `config` while `change` runs on another thread, the
/// verify slowed by `qps` so that it overlaps; returns the report once
/// both ended, and checks they overlapped.
fn verify_during(config: &VerifyConfig, change: impl FnOnce() + Send) -> VerifyReport {
    std::thread::scope(|scope| {
        let started = Instant::now();
        let changer = scope.spawn(move || {
            change();
            started.elapsed()
        });
        let report = run(config);
        let verified_in = started.elapsed();
        let changed_in = changer.join().expect("change thread");
        println!(
            "verify took {verified_in:?} (the change ended after {changed_in:?}): {} keys \
             checked, slots walked again in {} + {} rounds, {} + {} commands",
            report.dbs.iter().map(|db| db.keys_checked).sum::<u64>(),
            report.source_topology.rewalks,
            report.target_topology.rewalks,
            report.source_commands,
            report.target_commands
        );
        report
    })
}

#[test]
fn a_resharding_during_the_walk_ends_clean_and_misses_nothing() {
    let cluster = Cluster::start(3, 0);
    let server = RedisServer::start(&[]);
    let data = dataset("k", 3000);
    Store::Cluster(&cluster).write(&data);
    Store::Server(&server).write(&data);
    let ports = cluster.master_ports();

    // Values differ on keys of the last master's lowest slots, which move
    // to the first master once the walk (rate-limited: ~3 s per master)
    // has scanned it: walked in one round only, they would be missed.
    let last_first = cluster.shard_of_master(ports[2]).master.slots[0].0;
    let moving: Vec<String> = (0..40u16)
        .map(|i| key_in_slot(&format!("mv{i}"), last_first + i * 2))
        .collect();
    let source_side: Vec<KeyedCommand> = moving
        .iter()
        .map(|key| keyed(key, &["SET", key, "source"]))
        .collect();
    let target_side: Vec<KeyedCommand> = moving
        .iter()
        .map(|key| keyed(key, &["SET", key, "target"]))
        .collect();
    Store::Cluster(&cluster).write(&source_side);
    Store::Server(&server).write(&target_side);
    let expected: Vec<(String, DiffKind)> = moving
        .iter()
        .map(|key| (key.clone(), DiffKind::Value))
        .collect();
    let reshard_after = |pause: Duration, from: u16, to: u16| {
        let cluster = &cluster;
        move || {
            std::thread::sleep(pause);
            cluster.reshard(from, to, 100);
        }
    };

    let mut slow = config(&cluster.url(), &server.url());
    slow.qps = 1500;
    slow.passes = 1;
    let report = verify_during(
        &slow,
        reshard_after(Duration::from_millis(3500), ports[2], ports[0]),
    );
    assert_differences(&report, &expected, "during a resharding");
    assert!(
        report.source_topology.rewalks > 0,
        "the walk did not see the slots move: {}",
        verify::render_report(&report)
    );
    for key in &moving {
        assert_eq!(cluster.master_for_key(key).port, ports[0], "{key} moved");
    }

    // Equal data, slots moving while the walk runs: clean, either way round.
    Store::Server(&server).write(&source_side);
    let report = verify_during(
        &slow,
        reshard_after(Duration::from_millis(3500), ports[1], ports[0]),
    );
    assert_equal(&report, "cluster → standalone during a resharding");
    assert!(report.source_topology.rewalks > 0);
    assert!(report.dbs[0].keys_checked >= 3040);
    let mut back = config(&server.url(), &cluster.url());
    back.qps = 1500;
    back.passes = 1;
    let report = verify_during(
        &back,
        reshard_after(Duration::from_millis(2000), ports[1], ports[2]),
    );
    assert_equal(&report, "standalone → cluster during a resharding");
    assert_eq!(report.dbs[0].keys_checked, 3040);
}

#[test]
fn what_a_cluster_cannot_hold_is_a_typed_error() {
    let cluster = Cluster::start(3, 0);
    let server = RedisServer::start(&[]);
    let other = RedisServer::start(&[]);
    let fails = |config: &VerifyConfig| {
        runtime()
            .block_on(verify::run(config))
            .expect_err("the verify cannot finish")
    };

    // A db other than 0 asked for, or holding keys on the standalone side.
    let mut asked = config(&server.url(), &cluster.url());
    asked.dbs = vec![5];
    let error = fails(&asked);
    assert!(
        matches!(
            error,
            VerifyError::ClusterDb {
                side: verify::Side::Target,
                db: 5
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("--db 0"), "{error}");
    Store::Server(&server).write(&[keyed("x", &["SET", "x", "1"])]);
    let mut conn = common::resp::connect(&server.addr());
    conn.call(&["MOVE", "x", "3"]).expect("MOVE");
    let error = fails(&config(&cluster.url(), &server.url()));
    assert!(
        matches!(
            error,
            VerifyError::ClusterDb {
                side: verify::Side::Source,
                db: 3
            }
        ),
        "{error}"
    );
    let error = fails(&config(&format!("{}/2", cluster.url()), &server.url()));
    assert!(
        matches!(
            error,
            VerifyError::ClusterDb {
                side: verify::Side::Source,
                db: 2
            }
        ),
        "{error}"
    );
    // With --db 0 the same pair compares.
    let mut db0 = config(&cluster.url(), &server.url());
    db0.dbs = vec![0];
    assert_equal(&run(&db0), "db 0 alone");

    // A seed list of standalone servers.
    let mut seeds = config(&server.url(), &cluster.url());
    seeds.source_seeds = vec![url(&other.url())];
    let error = fails(&seeds);
    assert!(
        matches!(
            error,
            VerifyError::NotCluster {
                side: verify::Side::Source,
                ..
            }
        ),
        "{error}"
    );
}
