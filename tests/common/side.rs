//! Test support: one side of a sync, a standalone server or a Redis Cluster,
//! for the tests that run the same scenario over either kind.
#![allow(dead_code)]

use super::cluster::Cluster;
use super::resp::{connect, Resp};
use super::RedisServer;

/// One side of a pair.
#[derive(Clone, Copy)]
pub enum Side<'a> {
    Standalone(&'a RedisServer),
    Cluster(&'a Cluster),
}

impl Side<'_> {
    /// What ferry is given: the server's URL or the cluster's seed list.
    pub fn url(&self) -> String {
        match self {
            Side::Standalone(server) => server.url(),
            Side::Cluster(cluster) => cluster.seed_list(),
        }
    }

    /// The server that holds `key`.
    pub fn addr_for(&self, key: &str) -> String {
        match self {
            Side::Standalone(server) => server.addr(),
            Side::Cluster(cluster) => cluster.master_for_key(key).addr(),
        }
    }

    pub fn call_key(&self, key: &str, args: &[&str]) -> Resp {
        connect(&self.addr_for(key)).call(args).unwrap()
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.call_key(key, &["GET", key]).text()
    }

    /// The masters: the standalone server, or every master of the cluster.
    pub fn masters(&self) -> Vec<String> {
        match self {
            Side::Standalone(server) => vec![server.addr()],
            Side::Cluster(cluster) => cluster
                .master_ports()
                .into_iter()
                .map(|port| cluster.node(port).addr())
                .collect(),
        }
    }

    /// Every server: the standalone server, or every running node of the
    /// cluster (replicas too).
    pub fn servers(&self) -> Vec<String> {
        match self {
            Side::Standalone(server) => vec![server.addr()],
            Side::Cluster(cluster) => cluster.nodes().map(|node| node.addr()).collect(),
        }
    }

    /// How many partitions a sync with this side as its source has: one
    /// per master of a cluster, one for a standalone server.
    pub fn partitions(&self) -> usize {
        match self {
            Side::Standalone(_) => 1,
            Side::Cluster(cluster) => cluster.master_ports().len(),
        }
    }

    /// A key in a slot of each master (a standalone server: one key).
    pub fn key_per_master(&self, prefix: &str) -> Vec<String> {
        match self {
            Side::Standalone(_) => vec![format!("{prefix}:standalone")],
            Side::Cluster(cluster) => cluster
                .shards()
                .iter()
                .map(|shard| {
                    let slot = shard.master.slots.first().map(|r| r.0).unwrap();
                    super::cluster::key_in_slot(prefix, slot)
                })
                .collect(),
        }
    }

    /// Every `__ferry*` key of every server of the side (a cluster's
    /// replicas too), sorted.
    pub fn ferry_keys(&self) -> Vec<String> {
        match self {
            Side::Standalone(server) => {
                let mut keys: Vec<String> = connect(&server.addr())
                    .call(&["KEYS", "__ferry*"])
                    .unwrap()
                    .items()
                    .iter()
                    .filter_map(|k| k.text())
                    .collect();
                keys.sort();
                keys
            }
            Side::Cluster(cluster) => cluster.ferry_keys(),
        }
    }
}
