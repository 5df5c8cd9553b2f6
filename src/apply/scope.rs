//! The slot scope of a partition: the hash slots its snapshot marker holds
//! (a Redis Cluster source shard's slots), and deleting or counting exactly
//! those keys on a target, in bounded steps over one connection.
//!
//! In: a connection to one target (a standalone Redis or one cluster node),
//! a db, a [`SlotRanges`]. Out: the target without the keys of the db whose
//! hash slot ([`key_hash_slot`]) is in the scope, ferry's own `__ferry*`
//! keys kept ([`delete_scope`]); or their number ([`count_scope`]).
//!
//! # Why not one script
//!
//! Several partitions of one sync (one per source shard) apply into the same
//! target, each owning the keys of its slots there. Emptying "what this
//! partition owns" therefore cannot be a `FLUSHDB` (it would delete the
//! other shards' keys), and a standalone target has no per-slot index to
//! ask. One Lua script over `KEYS *` would block the target for the whole
//! keyspace, and Lua cannot compute the CRC16 slot cheaply. So the keys are
//! found with `SCAN … COUNT` [`SCAN_COUNT`] and their slots computed here;
//! the in-scope ones are deleted with `UNLINK` (`DEL` before Redis 4.0) in
//! batches of at most [`SCAN_COUNT`] keys, each batch sent with the next
//! `SCAN` (one round trip per step). The deletion is therefore **not
//! atomic**: readers of the target see the scope's keys disappear over
//! time, and a crash stops it half way. Callers make that safe by making the
//! deletion idempotent and recording first that it is due (the applier:
//! `loading=M` before a scoped load, the checkpoint before a scoped flush
//! entry; module doc of [`super`], "Slot scopes"): running it again from
//! any point ends in the same state, since it only removes keys of the
//! scope, which nothing else writes meanwhile.
//!
//! What `SCAN` guarantees (Redis `dict.c`): every key present for the
//! whole iteration is returned at least once. A key of the scope created
//! during the iteration by someone else may survive it; nothing of this
//! sync writes the scope's keys while it runs (the applier of the scope is
//! the one deleting, and other partitions own other slots).
//!
//! The scope of a partition is kept in the target next to its checkpoint
//! ([`scope_key`], written in the same `MULTI` as `loading=M`), so that an
//! applier that restarts after its log's first marker was trimmed still
//! knows which slots are its own.

use std::time::Duration;

use bytes::Bytes;

use super::keyspace::OwnedKeyspace;
use super::ApplyError;
use crate::position::PartitionId;
use crate::record::INTERNAL_PREFIX;
use crate::redis::client::{Client, ClientError};
use crate::redis::cluster::SlotRanges;
use crate::redis::command::{key_hash_slot, Command};
use crate::redis::resp::Frame;

/// `COUNT` of every `SCAN` step, and the most keys of one `UNLINK`.
pub const SCAN_COUNT: usize = 1000;

/// Longest scope value accepted when reading it back (16384 single slots
/// written as `n,` take under 90 KiB).
pub const MAX_SCOPE_LEN: usize = 128 << 10;

/// What one [`delete_scope`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeDeletion {
    /// Keys `SCAN` returned (every slot, duplicates included).
    pub scanned: u64,
    /// Keys of the scope deleted (`UNLINK` replies summed).
    pub deleted: u64,
}

/// How to talk to the target: the reply timeout of every round trip, and
/// whether it has `UNLINK` (Redis 4.0+).
#[derive(Debug, Clone, Copy)]
pub struct ScopeConn {
    pub reply_timeout: Duration,
    pub unlink: bool,
}

/// The key holding the slot scope of `drainer_id`'s applier of
/// `partition` (db 0, next to its checkpoint).
pub fn scope_key(drainer_id: &str, partition: PartitionId) -> Vec<u8> {
    let mut key = INTERNAL_PREFIX.to_vec();
    key.extend_from_slice(format!(":scope:{drainer_id}:{partition}").as_bytes());
    key
}

/// The value of [`scope_key`]: `v1 <ranges>` (`0-5460,16383`).
pub fn encode_scope(scope: &SlotRanges) -> String {
    format!("v1 {scope}")
}

/// Parses [`encode_scope`]'s form; `Err` says what is wrong.
pub fn decode_scope(value: &[u8]) -> Result<SlotRanges, String> {
    if value.len() > MAX_SCOPE_LEN {
        return Err(format!("longer than {MAX_SCOPE_LEN} bytes"));
    }
    let text = std::str::from_utf8(value).map_err(|_| "not UTF-8".to_string())?;
    let Some(ranges) = text.strip_prefix("v1 ") else {
        return Err("no v1 prefix".into());
    };
    SlotRanges::parse(ranges)
}

/// Whether `key` is one of the scope's data keys (ferry's own keys never
/// are).
pub fn in_scope(scope: &SlotRanges, key: &[u8]) -> bool {
    !key.starts_with(INTERNAL_PREFIX) && scope.contains(key_hash_slot(key))
}

async fn timed<T>(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ApplyError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ApplyError::Timeout(timeout))?
        .map_err(ApplyError::from)
}

fn unexpected(what: &str, reply: &Frame) -> ApplyError {
    ApplyError::Client(ClientError::UnexpectedReply {
        command: what.to_string(),
        reply: format!("{reply:?}"),
    })
}

/// A `SCAN` reply: the next cursor and the keys.
fn scan_reply(reply: Frame) -> Result<(Bytes, Vec<Bytes>), ApplyError> {
    let shown = || unexpected("SCAN", &reply);
    let Frame::Array(parts) = &reply else {
        return Err(shown());
    };
    let (Some(cursor), Some(Frame::Array(keys))) =
        (parts.first().and_then(Frame::as_bytes), parts.get(1))
    else {
        return Err(shown());
    };
    let keys = keys
        .iter()
        .map(|k| k.as_bytes().cloned().ok_or_else(shown))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((cursor.clone(), keys))
}

fn select(db: u32) -> Command {
    Command::new(vec![
        Bytes::from_static(b"SELECT"),
        Bytes::from(db.to_string()),
    ])
}

/// Selects `db` (when not 0), runs `step` for every `SCAN` reply's keys
/// (it may queue commands, whose replies it names by count), and selects
/// db 0 again. The connection must be in db 0 with no reply pending.
async fn scan_db(
    client: &mut Client,
    db: u32,
    conn: ScopeConn,
    mut step: impl FnMut(&mut Client, Vec<Bytes>) -> usize,
    mut replies: impl FnMut(Frame) -> Result<(), ApplyError>,
) -> Result<u64, ApplyError> {
    if db != 0 {
        timed(conn.reply_timeout, client.call_command(&select(db))).await?;
    }
    let count = SCAN_COUNT.to_string();
    let mut cursor = Bytes::from_static(b"0");
    let mut queued = 0usize;
    let mut scanned = 0u64;
    loop {
        client.queue(&Command::new(vec![
            Bytes::from_static(b"SCAN"),
            cursor.clone(),
            Bytes::from_static(b"COUNT"),
            Bytes::from(count.clone()),
        ]));
        timed(conn.reply_timeout, client.flush()).await?;
        // The replies of what the last step queued come before the SCAN's.
        for _ in 0..queued {
            let reply = timed(conn.reply_timeout, client.read_reply()).await?;
            replies(reply)?;
        }
        let reply = timed(conn.reply_timeout, client.read_reply()).await?;
        if let Some(error) = reply.error_message() {
            return Err(ApplyError::Client(ClientError::Server {
                command: "SCAN".into(),
                message: error,
            }));
        }
        let (next, keys) = scan_reply(reply)?;
        scanned += keys.len() as u64;
        queued = step(client, keys);
        cursor = next;
        if cursor.as_ref() == b"0" {
            break;
        }
    }
    if queued > 0 {
        timed(conn.reply_timeout, client.flush()).await?;
        for _ in 0..queued {
            let reply = timed(conn.reply_timeout, client.read_reply()).await?;
            replies(reply)?;
        }
    }
    if db != 0 {
        timed(conn.reply_timeout, client.call_command(&select(0))).await?;
    }
    Ok(scanned)
}

/// Deletes every key of `db` whose hash slot is in `scope` and that
/// `keyspace`'s key filter owns (`db` is a target db), keeping `__ferry*`
/// keys, in steps of one `SCAN … COUNT` [`SCAN_COUNT`] and one
/// `UNLINK` of at most [`SCAN_COUNT`] keys (not atomic: see the module
/// doc). The connection must be in db 0 with no reply pending (outside
/// `MULTI`); it is left so.
pub async fn delete_scope(
    client: &mut Client,
    db: u32,
    scope: &SlotRanges,
    keyspace: &OwnedKeyspace,
    conn: ScopeConn,
) -> Result<ScopeDeletion, ApplyError> {
    let mut deleted = 0u64;
    let name: &'static [u8] = if conn.unlink { b"UNLINK" } else { b"DEL" };
    let step = |client: &mut Client, keys: Vec<Bytes>| {
        let mut queued = 0;
        let ours: Vec<Bytes> = keys
            .into_iter()
            .filter(|k| in_scope(scope, k) && keyspace.owns_key(k))
            .collect();
        for batch in ours.chunks(SCAN_COUNT) {
            let mut args = Vec::with_capacity(batch.len() + 1);
            args.push(Bytes::from_static(name));
            args.extend(batch.iter().cloned());
            client.queue(&Command::new(args));
            queued += 1;
        }
        queued
    };
    let replies = |reply: Frame| match reply.as_integer() {
        Some(n) => {
            deleted += n.max(0) as u64;
            Ok(())
        }
        None => Err(match reply.error_message() {
            Some(message) => ApplyError::Client(ClientError::Server {
                command: String::from_utf8_lossy(name).into_owned(),
                message,
            }),
            None => unexpected(&String::from_utf8_lossy(name), &reply),
        }),
    };
    let scanned = scan_db(client, db, conn, step, replies).await?;
    Ok(ScopeDeletion { scanned, deleted })
}

/// The number of keys of `db` whose hash slot is in `scope` and that
/// `keyspace`'s key filter owns, `__ferry*` keys excepted (a `SCAN` of the whole db; not a snapshot: see the module
/// doc). The connection must be in db 0 with no reply pending; it is left
/// so.
pub async fn count_scope(
    client: &mut Client,
    db: u32,
    scope: &SlotRanges,
    keyspace: &OwnedKeyspace,
    conn: ScopeConn,
) -> Result<u64, ApplyError> {
    let mut count = 0u64;
    let step = |_: &mut Client, keys: Vec<Bytes>| {
        count += keys
            .iter()
            .filter(|k| in_scope(scope, k) && keyspace.owns_key(k))
            .count() as u64;
        0
    };
    scan_db(client, db, conn, step, |_| Ok(())).await?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::command::CLUSTER_SLOTS;

    #[test]
    fn scope_values_round_trip_and_bad_ones_are_named() {
        let scope = SlotRanges::from_ranges([(0, 5460), (16383, 16383), (7000, 7001)]);
        let value = encode_scope(&scope);
        assert_eq!(value, "v1 0-5460,7000-7001,16383");
        assert_eq!(decode_scope(value.as_bytes()).unwrap(), scope);
        assert_eq!(decode_scope(b"v1 ").unwrap(), SlotRanges::new());
        assert!(decode_scope(b"0-5").unwrap_err().contains("v1"));
        assert!(decode_scope(b"v1 5-3").unwrap_err().contains("ends before"));
        assert!(decode_scope(b"v1 16384").unwrap_err().contains("bad slot"));
        assert!(decode_scope(&vec![b'1'; MAX_SCOPE_LEN + 1])
            .unwrap_err()
            .contains("longer"));
        let every_other: Vec<(u16, u16)> = (0..CLUSTER_SLOTS).step_by(2).map(|s| (s, s)).collect();
        let wide = SlotRanges::from_ranges(every_other);
        let value = encode_scope(&wide);
        assert!(value.len() <= MAX_SCOPE_LEN);
        assert_eq!(decode_scope(value.as_bytes()).unwrap(), wide);
    }

    #[test]
    fn internal_keys_are_never_in_scope() {
        let all = SlotRanges::all();
        assert!(in_scope(&all, b"user:1"));
        assert!(!in_scope(&all, b"__ferry:checkpoint:d:0"));
        let slot = key_hash_slot(b"user:1");
        let only = SlotRanges::from_ranges([(slot, slot)]);
        assert!(in_scope(&only, b"user:1"));
        assert!(in_scope(&only, b"{user:1}.other"));
        let other = SlotRanges::from_ranges([(
            slot.wrapping_add(1) % CLUSTER_SLOTS,
            slot.wrapping_add(1) % CLUSTER_SLOTS,
        )]);
        assert!(!in_scope(&other, b"user:1"));
    }
}
