//! Redis Cluster against real `redis-server` processes: the test harness
//! itself (tests/common/cluster.rs: create, failover, reshard, add and
//! remove nodes, with keys written across slots and read back after each
//! change).
//!
//! Run: `cargo test --test cluster -- --test-threads 2` (each test starts
//! its own cluster of 6 or more nodes; about a minute).

mod common;

use std::collections::BTreeSet;

use common::cluster::{spread_keys, Cluster, SLOTS};
use ferry::redis::command::key_hash_slot;

/// Values of the harness keys: the key itself, reversed.
fn value_of(key: &str) -> String {
    key.chars().rev().collect()
}

fn write_keys(cluster: &Cluster, keys: &[String]) {
    let pairs: Vec<(String, String)> = keys.iter().map(|k| (k.clone(), value_of(k))).collect();
    cluster.set_all(&pairs);
}

/// Every key reads back with its value (through the harness's own routing).
fn assert_all_readable(cluster: &Cluster, keys: &[String], when: &str) {
    let values = cluster.get_all(keys);
    for (key, value) in keys.iter().zip(values) {
        assert_eq!(value, Some(value_of(key)), "{key} {when}");
    }
    assert_eq!(
        cluster.total_keys(),
        keys.len() as i64,
        "keys in all masters {when}"
    );
}

#[test]
fn harness_creates_fails_over_and_reshards_a_cluster() {
    let cluster = Cluster::start(3, 1);
    let shards = cluster.shards();
    let covered: usize = shards.iter().map(|s| s.master.slot_count()).sum();
    assert_eq!(covered, usize::from(SLOTS));

    let keys = spread_keys("harness", 3000);
    write_keys(&cluster, &keys);
    for shard in &shards {
        let keys_here = cluster.node(shard.master.port).dbsize();
        assert!(
            keys_here > 500,
            "shard {:?} holds {keys_here} keys",
            shard.master.port
        );
        let key = keys
            .iter()
            .find(|k| shard.master.serves(key_hash_slot(k.as_bytes())))
            .expect("a key in every shard");
        assert_eq!(cluster.master_for_key(key).port, shard.master.port);
    }
    assert_all_readable(&cluster, &keys, "after create");

    // Failover of the first shard: its replica becomes master of the same
    // slots, the old master its replica.
    let old = shards[0].clone();
    let promoted = cluster.failover(old.master.port);
    let after = cluster.shard_of_master(promoted);
    assert_eq!(after.master.slots, old.master.slots);
    assert_eq!(
        after.replicas.iter().map(|r| r.port).collect::<Vec<_>>(),
        vec![old.master.port]
    );
    assert_eq!(after.ports(), old.ports());
    assert_eq!(
        cluster.node(old.master.port).info_field("role").as_deref(),
        Some("slave")
    );
    assert_all_readable(&cluster, &keys, "after failover");

    // Reshard 500 slots, with their keys, from the promoted master to the
    // second shard.
    let from_before = cluster.shard_of_master(promoted).master.slot_count();
    let to_port = shards[1].master.port;
    let to_before = cluster.shard_of_master(to_port).master.slot_count();
    let to_keys_before = cluster.node(to_port).dbsize();
    cluster.reshard(promoted, to_port, 500);
    assert_eq!(
        cluster.shard_of_master(promoted).master.slot_count(),
        from_before - 500
    );
    assert_eq!(
        cluster.shard_of_master(to_port).master.slot_count(),
        to_before + 500
    );
    assert!(
        cluster.node(to_port).dbsize() > to_keys_before + 50,
        "keys moved with the slots"
    );
    assert_all_readable(&cluster, &keys, "after reshard");
}

#[test]
fn harness_adds_and_removes_nodes_and_migrates_a_slot_by_hand() {
    let mut cluster = Cluster::start(3, 1);
    let keys = spread_keys("grow", 1000);
    write_keys(&cluster, &keys);

    // A new master gets 200 slots with their keys, and a replica.
    let first = cluster.master_ports()[0];
    let added = cluster.add_master();
    assert_eq!(cluster.shards().len(), 4);
    assert_eq!(cluster.shard_of_master(added).master.slot_count(), 0);
    cluster.reshard(first, added, 200);
    assert_eq!(cluster.shard_of_master(added).master.slot_count(), 200);
    let replica = cluster.add_replica(added);
    let shard = cluster.shard_of_master(added);
    assert_eq!(
        shard.replicas.iter().map(|r| r.port).collect::<Vec<_>>(),
        vec![replica]
    );
    assert!(cluster.node(added).dbsize() > 0);
    assert_all_readable(&cluster, &keys, "after adding a shard");

    // A slot of the second original master migrated by hand to the third:
    // while it migrates, the source answers ASK for the key already moved
    // and still serves the other.
    let slot = 8000;
    let from = cluster.master_for_slot(slot).port;
    let to = cluster.master_for_slot(SLOTS - 1).port;
    assert!(from != added && to != added && from != to);
    let moved = common::cluster::key_in_slot("moved", slot);
    let stays = common::cluster::key_in_slot("stays", slot);
    cluster.set_all(&[
        (moved.clone(), value_of(&moved)),
        (stays.clone(), value_of(&stays)),
    ]);
    cluster.begin_slot_migration(slot, from, to);
    cluster.migrate_key(&moved, from, to);
    let ask = cluster.node(from).call(&["GET", &moved]);
    assert!(
        matches!(&ask, common::resp::Resp::Error(e) if e.starts_with("ASK ")),
        "{ask:?}"
    );
    assert_eq!(
        cluster.call_key(&moved, &["GET", &moved]).text(),
        Some(value_of(&moved))
    );
    assert_eq!(
        cluster.node(from).call(&["GET", &stays]).text(),
        Some(value_of(&stays))
    );
    cluster.migrate_slot_keys(slot, from, to);
    cluster.finish_slot_migration(slot, from, to);
    assert_eq!(cluster.master_for_slot(slot).port, to);

    // The added shard's slots go back, then both its nodes leave.
    cluster.reshard(added, first, 200);
    let mut all: Vec<String> = keys.clone();
    all.extend([moved, stays]);
    assert_all_readable(&cluster, &all, "after emptying the added shard");
    // An emptied master may have become a replica (replica migration of
    // 7.0); either way it has no slots now and can leave.
    cluster.remove_node(replica);
    cluster.remove_node(added);
    let ports: BTreeSet<u16> = cluster.nodes().map(|n| n.port).collect();
    assert!(!ports.contains(&added) && !ports.contains(&replica));
    assert_eq!(cluster.shards().len(), 3);
    assert_all_readable(&cluster, &all, "after removing the added shard");
}
