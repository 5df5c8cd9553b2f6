//! What a canceled task leaves behind on the servers, removed: the keys
//! ferry wrote for that task and no other key.
//!
//! A task named `N` runs a `ferry sync` whose listener id and drainer id
//! are `N`. It writes, under ferry's own prefix (`__ferry`, which no sync
//! ever replicates or owns), `<p>` a partition id (digits) and `<tag>` a
//! slot's hash tag `{ferry:<k>}` ([`crate::redis::cluster::tag_for_slot`]):
//! - `__ferry:checkpoint:N:<p>`: each applier's checkpoint on its target
//!   (a cluster target's floor), and `__ferry:checkpoint:N:<p>:<tag>`: the
//!   slot checkpoints of an applier into a cluster;
//! - `__ferry:scope:N:<p>`: the slot scope of an applier of one source
//!   shard, next to its floor;
//! - `__ferry:slots:N`: the owner map of a cluster source's partitions, on
//!   the target;
//! - `__ferry:heartbeat:N` and `__ferry:heartbeat:N:<tag>`: the listener's
//!   heartbeat on its source (a cluster's, one per shard);
//! - `__ferry:two-way:N` (a standalone target) and `__ferry:two-way:<tag>:N`
//!   (a cluster target, one per master): the marks where two-way sync
//!   established its second direction.
//!
//! A two-way task writes all of these on both sides: its backward
//! direction's appliers (partition 1 between standalone servers, else
//! partitions from [`crate::node::two_way::CLUSTER_BACKWARD_BASE`]) keep
//! their checkpoints, scopes and owner map on the source, its backward
//! listener its heartbeats on the target. A standalone server paired with
//! a cluster gets the same shapes as either end of a one-way sync of its
//! kind: plain checkpoints of the cluster's partitions with their owner
//! map and scopes, or slot checkpoints and floors of its one partition on
//! the cluster. `__ferry:switchover:*` (kept by
//! `ferry switchover`, which a task does not run) and every other
//! `__ferry*` key (`__ferry:guard`, other syncs' keys) are left alone.
//!
//! Each master of the server (all of a Redis Cluster's) is scanned in every
//! db that holds keys, with `SCAN … MATCH __ferry:*`; only keys that are
//! exactly one of the above are deleted, one `DEL` per key (keys of
//! different slots on one master cannot share a command in a cluster), a
//! SCAN page's worth pipelined at once.

use crate::redis::client::Client;
use crate::redis::cluster;
use crate::redis::command::Command;
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;

/// How many keys one `SCAN` step asks for.
const SCAN_COUNT: &str = "1000";

/// Whether `text` is a partition id: digits, not empty.
fn is_partition(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `text` is a slot's hash tag, `{ferry:<digits>}`.
fn is_tag(text: &str) -> bool {
    text.strip_prefix("{ferry:")
        .and_then(|t| t.strip_suffix('}'))
        .is_some_and(is_partition)
}

/// Whether `key` is one ferry wrote for task `name` (module doc).
pub fn is_task_key(name: &str, key: &[u8]) -> bool {
    let Ok(key) = std::str::from_utf8(key) else {
        return false;
    };
    let Some(rest) = key.strip_prefix("__ferry:") else {
        return false;
    };
    // `<kind>N` and what follows it.
    let after = |kind: &str| rest.strip_prefix(kind).and_then(|r| r.strip_prefix(name));
    if let Some(tail) = after("checkpoint:") {
        let Some(tail) = tail.strip_prefix(':') else {
            return false;
        };
        return match tail.split_once(':') {
            None => is_partition(tail),
            Some((partition, tag)) => is_partition(partition) && is_tag(tag),
        };
    }
    if let Some(tail) = after("scope:") {
        return tail.strip_prefix(':').is_some_and(is_partition);
    }
    if let Some(tail) = after("heartbeat:") {
        return tail.is_empty() || tail.strip_prefix(':').is_some_and(is_tag);
    }
    if let Some(tail) = after("slots:") {
        return tail.is_empty();
    }
    if let Some(tail) = after("two-way:") {
        return tail.is_empty();
    }
    // A cluster's mark: `two-way:<tag>:N`.
    rest.strip_prefix("two-way:")
        .and_then(|r| r.strip_suffix(name))
        .and_then(|r| r.strip_suffix(':'))
        .is_some_and(is_tag)
}

fn text(frame: &Frame) -> Option<String> {
    match frame {
        Frame::Bulk(b) | Frame::Simple(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Frame::Verbatim { text, .. } => Some(String::from_utf8_lossy(text).into_owned()),
        _ => None,
    }
}

/// The masters to scan: every master of a cluster, else the server itself.
async fn masters(seeds: &[RedisUrl]) -> Result<Vec<RedisUrl>, String> {
    let Some(first) = seeds.first() else {
        return Ok(Vec::new());
    };
    match cluster::is_cluster(first).await {
        Ok(false) => Ok(vec![first.clone()]),
        Ok(true) => {
            let topology = cluster::discover(seeds).await.map_err(|e| e.to_string())?;
            Ok(topology
                .shards()
                .iter()
                .map(|shard| cluster::Topology::url_for(&shard.master, first))
                .collect())
        }
        Err(error) => Err(error.to_string()),
    }
}

/// Deletes task `name`'s keys from the server `seeds` name (one, or a
/// cluster's seed list). Returns how many were deleted.
pub async fn remove_task_keys(seeds: &[RedisUrl], name: &str) -> Result<u64, String> {
    let mut removed = 0;
    for server in masters(seeds).await? {
        let addr = server.addr();
        let fail = |e: crate::redis::client::ClientError| format!("{addr}: {e}");
        let mut client = Client::connect(&server).await.map_err(fail)?;
        let info = client.call(["INFO", "keyspace"]).await.map_err(fail)?;
        let dbs: Vec<String> = text(&info)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.strip_prefix("db")?.split(':').next().map(String::from))
            .filter(|db| db.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        for db in dbs {
            client.call(["SELECT", db.as_str()]).await.map_err(fail)?;
            let mut cursor = "0".to_string();
            loop {
                let reply = client
                    .call([
                        "SCAN",
                        cursor.as_str(),
                        "MATCH",
                        "__ferry:*",
                        "COUNT",
                        SCAN_COUNT,
                    ])
                    .await
                    .map_err(fail)?;
                let Frame::Array(parts) = reply else {
                    return Err(format!("{addr}: SCAN answered {reply:?}"));
                };
                let (Some(next), Some(Frame::Array(keys))) = (parts.first(), parts.get(1)) else {
                    return Err(format!("{addr}: SCAN answered {} parts", parts.len()));
                };
                let deletes: Vec<Command> = keys
                    .iter()
                    .filter_map(|k| match k {
                        Frame::Bulk(b) => Some(&b[..]),
                        _ => None,
                    })
                    .filter(|k| is_task_key(name, k))
                    .map(|k| Command::from_parts([b"DEL".as_slice(), k]))
                    .collect();
                if !deletes.is_empty() {
                    for reply in client.pipeline(&deletes).await.map_err(fail)? {
                        match reply {
                            Frame::Integer(n) => removed += u64::try_from(n).unwrap_or(0),
                            Frame::Error(error) => {
                                return Err(format!(
                                    "{addr}: DEL answered {}",
                                    String::from_utf8_lossy(&error)
                                ))
                            }
                            _ => {}
                        }
                    }
                }
                cursor = text(next).unwrap_or_else(|| "0".into());
                if cursor == "0" {
                    break;
                }
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::is_task_key;

    #[test]
    fn only_the_tasks_own_keys() {
        for key in [
            "__ferry:checkpoint:orders:0",
            "__ferry:checkpoint:orders:12",
            "__ferry:checkpoint:orders:1002",
            "__ferry:checkpoint:orders:0:{ferry:17}",
            "__ferry:checkpoint:orders:1001:{ferry:0}",
            "__ferry:scope:orders:1",
            "__ferry:scope:orders:1000",
            "__ferry:heartbeat:orders",
            "__ferry:heartbeat:orders:{ferry:17}",
            "__ferry:slots:orders",
            "__ferry:two-way:orders",
            "__ferry:two-way:{ferry:3}:orders",
        ] {
            assert!(is_task_key("orders", key.as_bytes()), "{key}");
        }
        for key in [
            "orders",
            "__ferry:checkpoint:orders2:0",
            "__ferry:checkpoint:orders:",
            "__ferry:checkpoint:orders:0x",
            "__ferry:checkpoint:other:0",
            "__ferry:checkpoint:orders:0:",
            "__ferry:checkpoint:orders:0:{ferry:}",
            "__ferry:checkpoint:orders:0:{app:1}",
            "__ferry:checkpoint:orders:0:{ferry:1}:x",
            "__ferry:checkpoint:orders-b:0:{ferry:1}",
            "__ferry:scope:orders",
            "__ferry:scope:orders:",
            "__ferry:scope:orders-b:1",
            "__ferry:heartbeat:orders-b",
            "__ferry:heartbeat:orders:x",
            "__ferry:heartbeat:orders-b:{ferry:17}",
            "__ferry:slots:orders:x",
            "__ferry:two-way:orders-b",
            "__ferry:two-way:{ferry:3}:orders-b",
            "__ferry:two-way:{ferry:3}:xorders",
            "__ferry:two-way:{ferry:3}orders",
            "__ferry:two-way:x:orders",
            "__ferry:switchover:orders",
            "__ferry:switchover:{ferry:3}:orders",
            "__ferry:guard",
            "app:__ferry:checkpoint:orders:0",
        ] {
            assert!(!is_task_key("orders", key.as_bytes()), "{key}");
        }
    }

    #[test]
    fn the_keys_ferry_writes_are_recognised() {
        use crate::apply::checkpoint::checkpoint_key;
        use crate::apply::scope::scope_key;
        use crate::apply::tenure::owner_map_key;
        use crate::position::PartitionId;
        use crate::redis::cluster::tag_for_slot;
        for partition in [0, 1, 2, 1000, 1002] {
            let floor = checkpoint_key("orders", PartitionId(partition));
            assert!(is_task_key("orders", &floor));
            for slot in [0, 5461, 16383] {
                let mut key = floor.clone();
                key.push(b':');
                key.extend_from_slice(tag_for_slot(slot).as_bytes());
                assert!(is_task_key("orders", &key));
            }
            assert!(is_task_key(
                "orders",
                &scope_key("orders", PartitionId(partition))
            ));
        }
        assert!(is_task_key("orders", &owner_map_key("orders")));
        for slot in [0, 12182] {
            let mark = format!("__ferry:two-way:{}:orders", tag_for_slot(slot));
            assert!(is_task_key("orders", mark.as_bytes()));
            let heartbeat = format!("__ferry:heartbeat:orders:{}", tag_for_slot(slot));
            assert!(is_task_key("orders", heartbeat.as_bytes()));
        }
    }
}
