//! The heartbeat task: writes `SET __ferry:heartbeat:<listener-id> <unix_ms>`
//! to the source every interval over its own connection.
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

use super::status::ListenerStatus;
use super::unix_ms;
use crate::redis::client::{Client, ClientOptions};
use crate::redis::url::RedisUrl;

/// Runs until `shutdown`; failures are logged once per change of error and
/// retried at the next tick with a fresh connection.
pub(crate) async fn run_heartbeat(
    source: RedisUrl,
    key: String,
    interval: Duration,
    connect_timeout: Duration,
    status: Arc<ListenerStatus>,
    shutdown: CancellationToken,
) {
    let options = ClientOptions {
        connect_timeout,
        ..ClientOptions::default()
    };
    let mut client: Option<Client> = None;
    let mut last_error: Option<String> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let beat = async {
            if client.is_none() {
                client = Some(Client::connect_with(&source, &options).await?);
            }
            let Some(connection) = client.as_mut() else {
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
