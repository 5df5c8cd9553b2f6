//! The heartbeat task: writes `SET __ferry:heartbeat:<listener-id> <unix_ms>`
//! to the source every interval over its own connection. For a shard of a
//! cluster source the key is `__ferry:heartbeat:<listener-id>:<tag>`, the
//! hash tag of the shard's first slot ([`crate::redis::cluster::tag_for_slot`]),
//! written to the shard's current master, so that it comes back in that
//! shard's stream; an idle shard (no slot) gets none.
//!
//! In: the source URL, the interval, a shutdown token. Out: writes on the
//! source, which come back through the replication stream into the WAL, so
//! that downstream latency stays measurable while the source is idle (the
//! listener's loop turns the round trip into
//! [`super::ListenerStatusSnapshot::heartbeat_latency_ms`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::cluster::ShardRoute;
use super::status::ListenerStatus;
use super::unix_ms;
use crate::redis::client::{Client, ClientOptions};
use crate::redis::url::RedisUrl;

/// Where the heartbeat goes.
pub(crate) enum HeartbeatTarget {
    /// A standalone source: one key, one address.
    Fixed { source: RedisUrl, key: String },
    /// A cluster shard: `<key_base>:<tag of its first slot>` on its master.
    Shard {
        route: Arc<ShardRoute>,
        key_base: String,
    },
}

impl HeartbeatTarget {
    /// The address and key of the next beat (`None`: nowhere to write now).
    fn current(&self) -> Option<(RedisUrl, String)> {
        match self {
            HeartbeatTarget::Fixed { source, key } => Some((source.clone(), key.clone())),
            HeartbeatTarget::Shard { route, key_base } => {
                let state = route.state();
                let slot = state.slots.first()?;
                let master = state.master?;
                let tag = crate::redis::cluster::tag_for_slot(slot);
                Some((master, format!("{key_base}:{tag}")))
            }
        }
    }
}

/// Runs until `shutdown`; failures are logged once per change of error and
/// retried at the next tick with a fresh connection.
pub(crate) async fn run_heartbeat(
    target: HeartbeatTarget,
    interval: Duration,
    connect_timeout: Duration,
    status: Arc<ListenerStatus>,
    shutdown: CancellationToken,
) {
    let options = ClientOptions {
        connect_timeout,
        ..ClientOptions::default()
    };
    let mut client: Option<(String, Client)> = None;
    let mut last_error: Option<String> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some((source, key)) = target.current() else {
            continue;
        };
        let beat = async {
            if client
                .as_ref()
                .is_some_and(|(addr, _)| *addr != source.addr())
            {
                client = None;
            }
            if client.is_none() {
                client = Some((
                    source.addr(),
                    Client::connect_with(&source, &options).await?,
                ));
            }
            let Some((_, connection)) = client.as_mut() else {
                return Ok(());
            };
            let value = unix_ms().to_string();
            // The db of the URL is selected on connect; the key is internal
            // (`__ferry` prefix), never applied as data downstream.
            connection
                .call(["SET", key.as_str(), value.as_str()])
                .await?;
            Ok::<(), crate::redis::client::ClientError>(())
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            // A hung source must not stall the ticker forever.
            outcome = tokio::time::timeout(interval.max(connect_timeout), beat) => outcome,
        };
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some("heartbeat write timed out".to_string()),
        };
        match (&error, &last_error) {
            (None, Some(_)) => info!(source = %source, "heartbeat writes resumed"),
            (Some(now), previous) if previous.as_ref() != Some(now) => {
                warn!(source = %source, error = %now, "heartbeat write failed; retrying")
            }
            (Some(now), _) => {
                debug!(source = %source, error = %now, "heartbeat write failed again")
            }
            (None, None) => {}
        }
        if error.is_some() {
            client = None;
        }
        status.update(|s| s.heartbeat_error = error.clone());
        last_error = error;
    }
}
