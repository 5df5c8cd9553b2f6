//! The applier's connection to the target Redis: connect, learn what the
//! target can take (`databases`, version), read the checkpoint, and read
//! replies with a timeout so that a hung target counts as a dead one. A
//! reply later than [`super::status::stall_after`] shows the applier
//! STALLED (naming the target) until it comes or the timeout ends the
//! session ([`StallWatch`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::checkpoint::Checkpoint;
use super::ApplyError;
use crate::redis::client::{Client, ClientOptions};
use crate::redis::cluster::SlotRanges;
use crate::redis::command::Command;
use crate::redis::rdb::rebuild::TargetCaps;
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;

/// Number of dbs assumed when `CONFIG GET databases` is not allowed (Redis'
/// default).
const DEFAULT_DATABASES: u32 = 16;

pub(crate) struct Target {
    pub client: Client,
    pub reply_timeout: Duration,
    /// `databases` of the target: records for higher dbs are refused.
    pub databases: u32,
    /// `None` when `INFO server` had no usable version (only snapshot loads
    /// need it).
    pub caps: Option<TargetCaps>,
    /// The target's `proto-max-bulk-len` (`None` when `CONFIG` is not
    /// allowed): a streamed argument longer than it is refused before it is
    /// sent, since the target would drop the connection on its header.
    pub max_bulk_len: Option<u64>,
    /// Where a late reply is shown (`None`: nowhere, e.g. before the
    /// applier's session owns the connection).
    pub stall_watch: Option<StallWatch>,
}

/// The applier status a late reply of one target is shown in.
#[derive(Debug, Clone)]
pub(crate) struct StallWatch {
    pub status: Arc<super::status::ApplyStatus>,
    /// The target's address, as shown.
    pub target: String,
}

/// Clears the stall it was made for when dropped (the reply came, the
/// timeout ended the wait, or the wait was cancelled).
struct StallShown<'a>(&'a StallWatch);

impl Drop for StallShown<'_> {
    fn drop(&mut self) {
        self.0.status.clear_stall();
    }
}

/// `io` bounded by `reply_timeout`; past [`super::status::stall_after`]
/// the wait is shown in `watch`'s status.
async fn bounded<T, E>(
    watch: Option<&StallWatch>,
    reply_timeout: Duration,
    io: impl Future<Output = Result<T, E>>,
) -> Result<T, ApplyError>
where
    ApplyError: From<E>,
{
    let timed_out = |_| ApplyError::Timeout(reply_timeout);
    let Some(watch) = watch else {
        return tokio::time::timeout(reply_timeout, io)
            .await
            .map_err(timed_out)?
            .map_err(ApplyError::from);
    };
    let mut io = std::pin::pin!(io);
    let first = super::status::stall_after(reply_timeout);
    if let Ok(done) = tokio::time::timeout(first, &mut io).await {
        return done.map_err(ApplyError::from);
    }
    let since = super::status::now_unix_ms().saturating_sub(first.as_millis() as u64);
    watch.status.set_stall(&watch.target, since, reply_timeout);
    let _shown = StallShown(watch);
    tokio::time::timeout(reply_timeout.saturating_sub(first), io)
        .await
        .map_err(timed_out)?
        .map_err(ApplyError::from)
}

impl Target {
    pub async fn connect(
        url: &RedisUrl,
        connect_timeout: Duration,
        reply_timeout: Duration,
    ) -> Result<Target, ApplyError> {
        let opts = ClientOptions {
            connect_timeout,
            ..ClientOptions::default()
        };
        let client = tokio::time::timeout(reply_timeout, Client::connect_with(url, &opts))
            .await
            .map_err(|_| ApplyError::Timeout(reply_timeout))??;
        let mut target = Target {
            client,
            reply_timeout,
            databases: DEFAULT_DATABASES,
            caps: None,
            max_bulk_len: None,
            stall_watch: None,
        };
        let info = target.call(&["INFO", "server"]).await?;
        let text = info
            .as_bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned());
        let fields = crate::redis::client::parse_info(text.as_deref().unwrap_or(""));
        target.caps = TargetCaps::from_info(&fields).ok();
        // Managed Redis often forbids CONFIG: then assume the default.
        if let Ok(Frame::Array(pair)) = target.call(&["CONFIG", "GET", "databases"]).await {
            if let Some(databases) = pair.get(1).and_then(Frame::as_integer) {
                target.databases = u32::try_from(databases).unwrap_or(DEFAULT_DATABASES);
            }
        }
        if let Ok(Frame::Array(pair)) = target.call(&["CONFIG", "GET", "proto-max-bulk-len"]).await
        {
            target.max_bulk_len = pair
                .get(1)
                .and_then(Frame::as_integer)
                .and_then(|limit| u64::try_from(limit).ok());
        }
        Ok(target)
    }

    /// The next reply, or [`ApplyError::Timeout`].
    pub async fn reply(&mut self) -> Result<Frame, ApplyError> {
        // Already buffered (most replies of a batch): no timer to set.
        if let Some(frame) = self.client.buffered_reply()? {
            return Ok(frame);
        }
        bounded(
            self.stall_watch.as_ref(),
            self.reply_timeout,
            self.client.read_reply(),
        )
        .await
    }

    pub async fn flush(&mut self) -> Result<(), ApplyError> {
        bounded(
            self.stall_watch.as_ref(),
            self.reply_timeout,
            self.client.flush(),
        )
        .await
    }

    /// Sends one command and waits for its reply; an error reply is
    /// [`ApplyError::Client`] (`ClientError::Server`).
    pub async fn call_command(&mut self, cmd: &Command) -> Result<Frame, ApplyError> {
        bounded(
            self.stall_watch.as_ref(),
            self.reply_timeout,
            self.client.call_command(cmd),
        )
        .await
    }

    pub async fn call(&mut self, args: &[&str]) -> Result<Frame, ApplyError> {
        self.call_command(&Command::from_parts(args)).await
    }

    /// Reads the checkpoint at `key` (the connection is in db 0).
    pub async fn read_checkpoint(&mut self, key: &Bytes) -> Result<Option<Checkpoint>, ApplyError> {
        let get = Command::new(vec![Bytes::from_static(b"GET"), key.clone()]);
        match self.call_command(&get).await? {
            Frame::Null => Ok(None),
            Frame::Bulk(value) => Ok(Some(Checkpoint::decode(&value)?)),
            other => Err(ApplyError::Client(
                crate::redis::client::ClientError::UnexpectedReply {
                    command: "GET checkpoint".into(),
                    reply: format!("{other:?}"),
                },
            )),
        }
    }

    /// Reads the slot scope at `key` ([`super::scope::scope_key`]; the
    /// connection is in db 0).
    pub async fn read_scope(&mut self, key: &Bytes) -> Result<Option<SlotRanges>, ApplyError> {
        let get = Command::new(vec![Bytes::from_static(b"GET"), key.clone()]);
        match self.call_command(&get).await? {
            Frame::Null => Ok(None),
            Frame::Bulk(value) => super::scope::decode_scope(&value).map(Some).map_err(|why| {
                ApplyError::Checkpoint(super::checkpoint::CheckpointError {
                    value: format!("{} ({} bytes)", String::from_utf8_lossy(key), value.len()),
                    why: format!("not a slot scope: {why}"),
                })
            }),
            other => Err(ApplyError::Client(
                crate::redis::client::ClientError::UnexpectedReply {
                    command: "GET scope".into(),
                    reply: format!("{other:?}"),
                },
            )),
        }
    }

    /// Reads the slot owner map at `key` ([`super::tenure`]; the
    /// connection is in db 0).
    pub async fn read_owner_map(
        &mut self,
        key: &Bytes,
    ) -> Result<super::tenure::OwnerMap, ApplyError> {
        let get = Command::new(vec![Bytes::from_static(b"HGETALL"), key.clone()]);
        let reply = self.call_command(&get).await?;
        super::tenure::OwnerMap::from_reply(&reply).map_err(|why| bad_owner_map(key, why))
    }

    /// Reads one slot of the owner map at `key` (`None`: absent).
    pub async fn read_owner(
        &mut self,
        key: &Bytes,
        slot: u16,
    ) -> Result<Option<super::tenure::Owner>, ApplyError> {
        let reply = self
            .call_command(&super::tenure::read_slot_command(key, slot))
            .await?;
        match reply {
            Frame::Null => Ok(None),
            Frame::Bulk(value) => super::tenure::parse_owner(&value)
                .map(Some)
                .map_err(|why| bad_owner_map(key, format!("slot {slot}: {why}"))),
            other => Err(ApplyError::Client(
                crate::redis::client::ClientError::UnexpectedReply {
                    command: "HGET owner map".into(),
                    reply: format!("{other:?}"),
                },
            )),
        }
    }
}

fn bad_owner_map(key: &Bytes, why: String) -> ApplyError {
    ApplyError::Checkpoint(super::checkpoint::CheckpointError {
        value: String::from_utf8_lossy(key).into_owned(),
        why: format!("not a slot owner map: {why}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::status::{ApplyStatus, SyncState};
    use crate::position::PartitionId;
    use crate::redis::client::ClientError;

    fn watched() -> StallWatch {
        let status = Arc::new(ApplyStatus::new(PartitionId(0)));
        status.set_online();
        StallWatch {
            status,
            target: "127.0.0.1:7000".into(),
        }
    }

    #[tokio::test]
    async fn a_late_reply_is_shown_while_it_is_awaited_and_cleared_when_it_comes() {
        let watch = watched();
        let status = Arc::clone(&watch.status);
        // Stalled after 1 s of the 2 s timeout; the reply comes at 1.8 s.
        let wait = tokio::spawn(async move {
            bounded(Some(&watch), Duration::from_secs(2), async {
                tokio::time::sleep(Duration::from_millis(1800)).await;
                Ok::<_, ClientError>(7)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(status.snapshot().state, SyncState::Online);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let report = status.snapshot();
        assert_eq!(report.state, SyncState::Stalled, "{report:?}");
        assert!(report
            .last_error
            .is_some_and(|e| e.starts_with("the target 127.0.0.1:7000 has not answered for")));
        assert_eq!(wait.await.expect("join").expect("reply"), 7);
        assert_eq!(status.snapshot().state, SyncState::Online);
    }

    #[tokio::test]
    async fn a_reply_that_never_comes_times_out_and_clears_the_stall() {
        let watch = watched();
        let outcome = bounded(
            Some(&watch),
            Duration::from_millis(300),
            std::future::pending::<Result<(), ClientError>>(),
        )
        .await;
        assert!(
            matches!(outcome, Err(ApplyError::Timeout(_))),
            "{outcome:?}"
        );
        assert_eq!(watch.status.snapshot().state, SyncState::Online);
        // Unwatched, the same bound holds.
        let outcome = bounded(
            None,
            Duration::from_millis(100),
            std::future::pending::<Result<(), ClientError>>(),
        )
        .await;
        assert!(
            matches!(outcome, Err(ApplyError::Timeout(_))),
            "{outcome:?}"
        );
    }
}
