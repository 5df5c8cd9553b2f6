//! What a canceled task leaves behind on the servers, removed: the keys
//! ferry wrote for that task and no other key.
//!
//! A task named `N` writes, under ferry's own prefix (`__ferry`, which no
//! sync ever replicates or owns):
//! - `__ferry:checkpoint:N:<partition>`: each applier's checkpoint, on the
//!   target (two-way: partition 1's on the source);
//! - `__ferry:heartbeat:N` and `__ferry:heartbeat:N:<hash tag>`: the
//!   listener's heartbeat on the source (a cluster's, one per shard; two-way:
//!   also on the target);
//! - `__ferry:slots:N`: the owner map of a cluster source's partitions, on
//!   the target;
//! - `__ferry:two-way:N`: the mark where two-way sync established its second
//!   direction.
//!
//! Each master of the server (all of a Redis Cluster's) is scanned in every
//! db that holds keys, with `SCAN … MATCH`; only keys that are exactly one
//! of the above are deleted.

use crate::redis::client::Client;
use crate::redis::cluster;
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;

/// Whether `key` is one ferry wrote for task `name`.
pub fn is_task_key(name: &str, key: &[u8]) -> bool {
    let Ok(key) = std::str::from_utf8(key) else {
        return false;
    };
    let Some(rest) = key.strip_prefix("__ferry:") else {
        return false;
    };
    let after = |kind: &str| {
        rest.strip_prefix(kind)
            .and_then(|r| r.strip_prefix(name))
            .map(str::to_string)
    };
    if let Some(tail) = after("checkpoint:") {
        return tail
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    }
    if let Some(tail) = after("heartbeat:") {
        return tail.is_empty() || tail.starts_with(':');
    }
    after("slots:").is_some_and(|t| t.is_empty()) || after("two-way:").is_some_and(|t| t.is_empty())
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
                        "1000",
                    ])
                    .await
                    .map_err(fail)?;
                let Frame::Array(parts) = reply else {
                    return Err(format!("{addr}: SCAN answered {reply:?}"));
                };
                let (Some(next), Some(Frame::Array(keys))) = (parts.first(), parts.get(1)) else {
                    return Err(format!("{addr}: SCAN answered {} parts", parts.len()));
                };
                let keys: Vec<&[u8]> = keys
                    .iter()
                    .filter_map(|k| match k {
                        Frame::Bulk(b) => Some(&b[..]),
                        _ => None,
                    })
                    .filter(|k| is_task_key(name, k))
                    .collect();
                if !keys.is_empty() {
                    let mut del: Vec<&[u8]> = vec![b"DEL"];
                    del.extend(keys);
                    if let Frame::Integer(n) = client.call(del).await.map_err(fail)? {
                        removed += u64::try_from(n).unwrap_or(0);
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
            "__ferry:heartbeat:orders",
            "__ferry:heartbeat:orders:{ferry:17}",
            "__ferry:slots:orders",
            "__ferry:two-way:orders",
        ] {
            assert!(is_task_key("orders", key.as_bytes()), "{key}");
        }
        for key in [
            "orders",
            "__ferry:checkpoint:orders2:0",
            "__ferry:checkpoint:orders:",
            "__ferry:checkpoint:orders:0x",
            "__ferry:checkpoint:other:0",
            "__ferry:heartbeat:orders-b",
            "__ferry:slots:orders:x",
            "__ferry:switchover:orders",
            "__ferry:guard",
            "app:__ferry:checkpoint:orders:0",
        ] {
            assert!(!is_task_key("orders", key.as_bytes()), "{key}");
        }
    }
}
