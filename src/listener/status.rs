//! [`ListenerStatus`]: what a running listener reports about its source link,
//! readable at any time from any task (`ferry status`, the admin API).
//!
//! In: updates from the listener's replication loop and heartbeat task. Out:
//! consistent copies ([`ListenerStatusSnapshot`]) of the whole state.

use std::fmt;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::position::PartitionId;

/// State of the replication link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncState {
    /// Connecting or waiting for the source's PSYNC answer.
    #[default]
    Connecting,
    /// Receiving an RDB snapshot (full resync).
    FullSync,
    /// Streaming commands.
    Online,
    /// The link is down; reconnecting after a backoff. `last_error` says why.
    Offline,
    /// Replication stopped on an entry ferry cannot carry (bigger than the
    /// configured limits); no reconnect until ferry is restarted with
    /// higher limits. `last_error` names the entry and the limit.
    Stopped,
}

impl fmt::Display for SyncState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncState::Connecting => "CONNECTING",
            SyncState::FullSync => "FULL_SYNC",
            SyncState::Online => "ONLINE",
            SyncState::Offline => "OFFLINE",
            SyncState::Stopped => "STOPPED",
        })
    }
}

/// A copy of a listener's status at one moment.
///
/// Positions: `durable_offset <= received_offset`; `durable_offset` is the
/// offset acknowledged to the source (the source offset of the last durable
/// WAL entry, or of later data-free bytes such as `PING` once every entry
/// before them is durable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ListenerStatusSnapshot {
    pub partition: u32,
    pub state: SyncState,
    /// The last replication error (kept after recovery, for diagnosis).
    pub last_error: Option<String>,
    /// The source's replication id the stream is on.
    pub replid: Option<String>,
    /// Source offset after the last whole frame received.
    pub received_offset: u64,
    /// Source offset acknowledged to the source (everything before it is durable).
    pub durable_offset: u64,
    /// Last durable log id of the partition.
    pub last_log_id: u64,
    /// Full resyncs received by this process (fallback snapshots excluded).
    pub full_syncs: u64,
    /// Partial resyncs (`+CONTINUE`) by this process.
    pub partial_resyncs: u64,
    /// RDB payload bytes received in the current (or last) full resync.
    pub full_sync_bytes_received: u64,
    /// Size of the last completed full resync's RDB payload.
    pub full_sync_bytes_total: Option<u64>,
    /// Milliseconds from writing the last heartbeat to the source until it
    /// was durable in the WAL (through the replication stream).
    pub heartbeat_latency_ms: Option<u64>,
    /// Unix ms when the last heartbeat that came back was written.
    pub heartbeat_unix_ms: Option<u64>,
    /// Why the last heartbeat write failed, while it keeps failing.
    pub heartbeat_error: Option<String>,
    /// Times the link was lost (or could not be made) and the listener
    /// reconnected.
    pub reconnects: u64,
}

/// The live status of one listener; share it as `Arc<ListenerStatus>`.
#[derive(Debug, Default)]
pub struct ListenerStatus {
    inner: Mutex<ListenerStatusSnapshot>,
}

impl ListenerStatus {
    pub fn new(partition: PartitionId) -> ListenerStatus {
        ListenerStatus {
            inner: Mutex::new(ListenerStatusSnapshot {
                partition: partition.0,
                ..ListenerStatusSnapshot::default()
            }),
        }
    }

    /// A consistent copy of the current status.
    pub fn snapshot(&self) -> ListenerStatusSnapshot {
        self.lock().clone()
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut ListenerStatusSnapshot)) {
        change(&mut self.lock());
    }

    fn lock(&self) -> MutexGuard<'_, ListenerStatusSnapshot> {
        // Updates assign plain fields, so a poisoned lock still holds
        // consistent data.
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}
