//! [`Shipper`]: the listener's end of the `Ship` stream, one task per
//! (partition, drainer).
//!
//! In: durable entries and snapshot chunks of one partition of the
//! listener's WAL (a full resync's chunks while the listener stores them,
//! once the stream is caught up), fallback snapshots from a
//! [`SnapshotProvider`], a shutdown token. Out: `Ship` messages to one
//! drainer, its acks recorded as the listener WAL's downstream acks, and a
//! [`ShipperStatus`] readable at any time. Rules in `ship/mod.rs`.

use crate::position::now_unix_ms;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::Streaming;
use tracing::{debug, info, warn, Instrument};

use super::tls::{tls_cause, ClientTls, ClientTlsOptions};
use super::wire;
use super::{ShipError, ShipLimits, SnapshotProvider, PROTOCOL_VERSION};
use crate::backoff::Backoff;
use crate::config_units::{ByteSize, HumanDuration};
use crate::position::{LogId, PartitionId, ReplOffset};
use crate::record::pb::drainer_client::DrainerClient;
use crate::record::pb::{self, ship_message, ship_reply};
use crate::record::{Record, SnapshotMarker};
use crate::secret::Secret;
use crate::wal::{DownstreamId, ReadLimits, SourcePosition, Wal, WalEntry, WalError};

/// Tuning of a shipper (the `[ship]` section of the listener's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ShipperConfig {
    /// Most entries per batch. Default: `8192`.
    pub max_batch_entries: usize,
    /// Target size of a batch before compression (one bigger entry still
    /// goes alone). Default: `"2MiB"`.
    pub max_batch_bytes: ByteSize,
    /// Uncompressed bytes sent but not yet acked before sending pauses.
    /// Default: `"32MiB"`.
    pub max_unacked_bytes: ByteSize,
    /// Batches sent but not yet acked before sending pauses (bounds the acks
    /// the drainer may have to queue). Default: `256`.
    pub max_unacked_batches: usize,
    /// TCP connect timeout. Default: `"5s"`.
    pub connect_timeout: HumanDuration,
    /// Time from connecting to the drainer's `Welcome`. Default: `"60s"`
    /// (a drainer replacing an old stream of ours may wait for it).
    pub handshake_timeout: HumanDuration,
    /// First retry delay after a failure; doubles up to `reconnect-max`,
    /// back to this after a `Welcome`. Default: `"100ms"`.
    pub reconnect_min: HumanDuration,
    /// Longest retry delay. Default: `"10s"`.
    pub reconnect_max: HumanDuration,
    /// When caught up, look for new entries at least this often even without
    /// the WAL's append notification. Default: `"1s"`.
    pub idle_poll: HumanDuration,
    /// On shutdown, how long to wait for the acks of what was sent.
    /// Default: `"2s"`.
    pub shutdown_grace: HumanDuration,
    /// HTTP/2 keepalive interval and timeout. Default: `"10s"`.
    pub keepalive: HumanDuration,
    /// Largest gRPC message sent or received, bytes. Default: as
    /// the drainer's default (about 77MiB).
    pub max_message_bytes: usize,
}

impl Default for ShipperConfig {
    fn default() -> Self {
        ShipperConfig {
            max_batch_entries: 8192,
            max_batch_bytes: ByteSize::mib(2),
            max_unacked_bytes: ByteSize::mib(32),
            max_unacked_batches: 256,
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            handshake_timeout: HumanDuration(Duration::from_secs(60)),
            reconnect_min: HumanDuration(Duration::from_millis(100)),
            reconnect_max: HumanDuration(Duration::from_secs(10)),
            idle_poll: HumanDuration(Duration::from_secs(1)),
            shutdown_grace: HumanDuration(Duration::from_secs(2)),
            keepalive: HumanDuration(Duration::from_secs(10)),
            max_message_bytes: ShipLimits::default().max_message_bytes,
        }
    }
}

impl ShipperConfig {
    /// Checks the config; errors name the field.
    pub fn validate(self) -> Result<ShipperConfig, ShipError> {
        let bad =
            |field: &str, reason: String| ShipError::Config(format!("ship.{field}: {reason}"));
        let defaults = ShipLimits::default();
        if self.max_batch_entries == 0
            || self.max_batch_entries > defaults.max_batch_entries as usize
        {
            return Err(bad(
                "max-batch-entries",
                format!("must be between 1 and {}", defaults.max_batch_entries),
            ));
        }
        if self.max_batch_bytes.as_usize() == 0 || self.max_batch_bytes.as_usize() > 16 << 20 {
            return Err(bad(
                "max-batch-bytes",
                "must be between 1B and 16MiB".into(),
            ));
        }
        if self.max_unacked_bytes.as_usize() < self.max_batch_bytes.as_usize() {
            return Err(bad(
                "max-unacked-bytes",
                format!(
                    "must be at least max-batch-bytes ({})",
                    self.max_batch_bytes
                ),
            ));
        }
        if self.max_unacked_batches == 0 || self.max_unacked_batches > 4096 {
            return Err(bad(
                "max-unacked-batches",
                "must be between 1 and 4096".into(),
            ));
        }
        if self.reconnect_min.0.is_zero() || self.reconnect_min.0 > self.reconnect_max.0 {
            return Err(bad(
                "reconnect-min",
                format!(
                    "must be above 0 and at most reconnect-max ({})",
                    self.reconnect_max
                ),
            ));
        }
        if self.idle_poll.0 < Duration::from_millis(1) {
            return Err(bad("idle-poll", "must be at least 1ms".into()));
        }
        if self.max_message_bytes < snap::raw::max_compress_len(crate::wal::MAX_PAYLOAD_LEN) {
            return Err(bad(
                "max-message-bytes",
                "must hold one entry of the largest WAL payload (64MiB) uncompressed".into(),
            ));
        }
        Ok(self)
    }
}

/// Where and as whom a shipper ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainerTarget {
    /// The drainer's name as a downstream of the listener's WAL (its acks
    /// hold back retention).
    pub drainer_id: DownstreamId,
    /// `http://host:port` of the drainer's `Ship` endpoint, or
    /// `https://host:port` for TLS.
    pub endpoint: String,
    /// This listener's id and the secret the drainer expects from it.
    pub listener_id: String,
    pub secret: Secret,
    /// TLS options of an `https://` endpoint (`None`: the system's roots,
    /// no client certificate); an `http://` endpoint takes none.
    pub tls: Option<ClientTlsOptions>,
}

/// Sync status of one (partition, drainer) pair, as `ferry status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// A stream is established (the drainer said `Welcome`).
    Online,
    Offline,
}

impl std::fmt::Display for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncState::Online => "ONLINE",
            SyncState::Offline => "OFFLINE",
        })
    }
}

/// Listener-side status of one (partition, drainer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipperStatus {
    pub partition: PartitionId,
    pub drainer_id: String,
    pub endpoint: String,
    pub state: SyncState,
    /// Last id the drainer made durable.
    pub acked: LogId,
    /// Last durable id of the listener's log.
    pub last_log_id: LogId,
    /// `last_log_id - acked`: entries the drainer does not have yet.
    pub lag: u64,
    /// Ms from now back to the creation of the oldest entry not acked yet;
    /// 0 when nothing is pending.
    pub latency_ms: u64,
    /// Fallback snapshots sent to this drainer.
    pub fallback_snapshots: u64,
    pub batches_sent: u64,
    pub entries_sent: u64,
    /// Compressed bytes of entry batches and chunks sent.
    pub bytes_sent: u64,
    /// The same before compression.
    pub raw_bytes_sent: u64,
    /// Why the last session ended, if it failed.
    pub last_error: Option<String>,
    /// Sessions that ended in a failure (or never started), each followed
    /// by a reconnect.
    pub reconnects: u64,
}

#[derive(Debug, Default)]
struct StatusCell {
    online: bool,
    acked: LogId,
    oldest_unacked_created_ms: Option<u64>,
    fallback_snapshots: u64,
    batches_sent: u64,
    entries_sent: u64,
    bytes_sent: u64,
    raw_bytes_sent: u64,
    last_error: Option<String>,
    reconnects: u64,
}

/// Reads a shipper's status; cheap to clone, usable from any task.
#[derive(Clone)]
pub struct ShipperStatusHandle {
    cell: Arc<Mutex<StatusCell>>,
    wal: Wal,
    partition: PartitionId,
    drainer_id: String,
    endpoint: String,
}

fn lock_cell(cell: &Mutex<StatusCell>) -> MutexGuard<'_, StatusCell> {
    // Plain counters: a poisoned lock still guards usable values.
    cell.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl ShipperStatusHandle {
    pub fn snapshot(&self) -> ShipperStatus {
        let cell = lock_cell(&self.cell);
        let last_log_id = self
            .wal
            .last_log_id(self.partition)
            .ok()
            .flatten()
            .unwrap_or(LogId::ZERO);
        let lag = last_log_id.0.saturating_sub(cell.acked.0);
        let latency_ms = match cell.oldest_unacked_created_ms {
            Some(created) if lag > 0 => now_unix_ms().saturating_sub(created),
            _ => 0,
        };
        ShipperStatus {
            partition: self.partition,
            drainer_id: self.drainer_id.clone(),
            endpoint: self.endpoint.clone(),
            state: if cell.online {
                SyncState::Online
            } else {
                SyncState::Offline
            },
            acked: cell.acked,
            last_log_id,
            lag,
            latency_ms,
            fallback_snapshots: cell.fallback_snapshots,
            batches_sent: cell.batches_sent,
            entries_sent: cell.entries_sent,
            bytes_sent: cell.bytes_sent,
            raw_bytes_sent: cell.raw_bytes_sent,
            last_error: cell.last_error.clone(),
            reconnects: cell.reconnects,
        }
    }
}

/// Ships one partition of the listener's WAL to one drainer.
pub struct Shipper {
    wal: Wal,
    partition: PartitionId,
    target: DrainerTarget,
    config: ShipperConfig,
    provider: Arc<dyn SnapshotProvider>,
    status: Arc<Mutex<StatusCell>>,
    /// The TLS of an `https://` endpoint.
    tls: Option<ClientTls>,
}

fn join_error(error: tokio::task::JoinError) -> ShipError {
    ShipError::Wal(WalError::Io(std::io::Error::other(error)))
}

impl Shipper {
    /// A shipper of `partition` to `target`; the config is validated.
    pub fn new(
        wal: Wal,
        partition: PartitionId,
        target: DrainerTarget,
        config: ShipperConfig,
        provider: Arc<dyn SnapshotProvider>,
    ) -> Result<Shipper, ShipError> {
        let config = config.validate()?;
        Endpoint::from_shared(target.endpoint.clone()).map_err(|error| {
            ShipError::Config(format!("drainer endpoint {:?}: {error}", target.endpoint))
        })?;
        let tls = if target.endpoint.starts_with("https://") {
            let options = target.tls.clone().unwrap_or_default();
            let tls = ClientTls::new(&target.endpoint, &options).map_err(|error| {
                ShipError::Config(format!("drainer endpoint {:?}: {error}", target.endpoint))
            })?;
            Some(tls)
        } else if target.tls.is_some() {
            return Err(ShipError::Config(format!(
                "drainer endpoint {:?}: TLS options need an https:// endpoint",
                target.endpoint
            )));
        } else {
            None
        };
        Ok(Shipper {
            wal,
            partition,
            target,
            config,
            provider,
            status: Arc::new(Mutex::new(StatusCell::default())),
            tls,
        })
    }

    pub fn status_handle(&self) -> ShipperStatusHandle {
        ShipperStatusHandle {
            cell: Arc::clone(&self.status),
            wal: self.wal.clone(),
            partition: self.partition,
            drainer_id: self.target.drainer_id.to_string(),
            endpoint: self.target.endpoint.clone(),
        }
    }

    fn status(&self) -> MutexGuard<'_, StatusCell> {
        lock_cell(&self.status)
    }

    /// Ships until `shutdown`; reconnects after every failure. Returns an
    /// error only when the listener's own WAL fails (closed or poisoned) or
    /// holds another listener's log ([`ShipError::ForeignLog`]).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ShipError> {
        let span = tracing::info_span!(
            "shipper",
            partition = %self.partition,
            drainer = %self.target.drainer_id
        );
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(self, shutdown: CancellationToken) -> Result<(), ShipError> {
        let (partition, drainer_id) = (self.partition, self.target.drainer_id.clone());
        let history = self
            .wal
            .open_history(partition, &self.target.listener_id)
            .await?;
        if history.owner != self.target.listener_id {
            return Err(ShipError::ForeignLog {
                partition,
                owner: history.owner,
                listener: self.target.listener_id.clone(),
            });
        }
        let incarnation = history.incarnation;
        self.wal
            .register_downstream(partition, drainer_id.clone())
            .await?;
        let wal = self.wal.clone();
        let registered = tokio::task::spawn_blocking(move || wal.positions(partition))
            .await
            .map_err(join_error)??
            .and_then(|positions| {
                positions
                    .acked
                    .into_iter()
                    .find(|(downstream, _)| *downstream == drainer_id)
            })
            .map_or(LogId::ZERO, |(_, acked)| acked);
        self.status().acked = registered;
        self.refresh_offline_latency().await;

        let mut backoff = Backoff::new(self.config.reconnect_min.0, self.config.reconnect_max.0);
        let mut logged_kind: Option<&'static str> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let mut welcomed = false;
            let result = self.session(&shutdown, incarnation, &mut welcomed).await;
            let was_online = std::mem::replace(&mut self.status().online, false);
            if welcomed {
                backoff.reset();
                logged_kind = None;
            }
            let error = match result {
                Ok(()) | Err(ShipError::Shutdown) => break,
                Err(ShipError::Wal(error @ (WalError::Closed | WalError::Poisoned(_)))) => {
                    warn!(partition = %partition, %error, "listener wal failed, shipper stops");
                    return Err(ShipError::Wal(error));
                }
                Err(error) => error,
            };
            if was_online || logged_kind != Some(error.kind()) {
                warn!(partition = %partition, endpoint = %self.target.endpoint, %error, retry_in = ?backoff.current(), "drainer offline");
                logged_kind = Some(error.kind());
            } else {
                debug!(partition = %partition, %error, retry_in = ?backoff.current(), "drainer still offline");
            }
            {
                let mut status = self.status();
                status.last_error = Some(error.to_string());
                status.reconnects += 1;
            }
            self.refresh_offline_latency().await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        self.status().online = false;
        info!(partition = %partition, "shipper stopped");
        Ok(())
    }

    /// A failed call as a [`ShipError`]: over TLS, a status caused by the
    /// TLS session (a drainer that refused this listener's certificate) is
    /// [`ShipError::Tls`].
    fn remote_error(&self, status: tonic::Status) -> ShipError {
        if self.tls.is_some() {
            if let Some(reason) = tls_cause(&status) {
                return ShipError::Tls {
                    endpoint: self.target.endpoint.clone(),
                    reason,
                };
            }
        }
        ShipError::remote(status)
    }

    async fn refresh_offline_latency(&self) {
        let wal = self.wal.clone();
        let partition = self.partition;
        let from = self.status().acked.next();
        let oldest =
            tokio::task::spawn_blocking(move || wal.oldest_created(partition, from).ok().flatten())
                .await
                .ok()
                .flatten();
        self.status().oldest_unacked_created_ms = oldest;
    }

    /// One connection: handshake, then stream until failure or shutdown.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        incarnation: u64,
        welcomed: &mut bool,
    ) -> Result<(), ShipError> {
        let endpoint = &self.target.endpoint;
        let connect_error = |error| ShipError::Connect {
            endpoint: endpoint.clone(),
            error,
        };
        let keepalive = self.config.keepalive.0;
        // Over TLS, ferry's connector does the handshake and tonic sees
        // plain HTTP/2 on it (with tonic's own `tls` feature on, an https://
        // URI would make it want to do the handshake itself).
        let uri = match &self.tls {
            Some(_) => endpoint.replacen("https://", "http://", 1),
            None => endpoint.clone(),
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(connect_error)?
            .connect_timeout(self.config.connect_timeout.0)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(keepalive)
            .keep_alive_timeout(keepalive)
            .keep_alive_while_idle(true);
        let connect = async {
            match &self.tls {
                Some(tls) => channel
                    .connect_with_connector(tls.connector())
                    .await
                    .map_err(|error| match tls_cause(&error) {
                        Some(reason) => ShipError::Tls {
                            endpoint: endpoint.clone(),
                            reason,
                        },
                        None => connect_error(error),
                    }),
                None => channel.connect().await.map_err(connect_error),
            }
        };
        let channel = tokio::select! {
            _ = shutdown.cancelled() => return Err(ShipError::Shutdown),
            channel = connect => channel?,
        };
        let limit = self.config.max_message_bytes;
        let mut client = DrainerClient::new(channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);

        let (out_tx, out_rx) = mpsc::channel::<pb::ShipMessage>(8);
        let hello = pb::ShipMessage {
            kind: Some(ship_message::Kind::Hello(pb::Hello {
                listener_id: self.target.listener_id.clone(),
                secret: bytes::Bytes::copy_from_slice(self.target.secret.expose().as_bytes()),
                partition: self.partition.0,
                protocol_version: PROTOCOL_VERSION,
                incarnation,
            })),
        };
        // The channel is empty and its receiver alive: this cannot fail.
        let _ = out_tx.try_send(hello);
        let outbound = futures::stream::unfold(out_rx, |mut out_rx| async move {
            out_rx.recv().await.map(|message| (message, out_rx))
        });
        let handshake = async {
            let response = client
                .ship(outbound)
                .await
                .map_err(|status| self.remote_error(status))?;
            let mut replies = response.into_inner();
            match replies.message().await {
                Ok(Some(pb::ShipReply {
                    kind: Some(ship_reply::Kind::Welcome(welcome)),
                })) => Ok((replies, welcome)),
                Ok(Some(other)) => Err(ShipError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                ))),
                Ok(None) => Err(ShipError::StreamClosed),
                Err(status) => Err(self.remote_error(status)),
            }
        };
        let timeout = self.config.handshake_timeout.0;
        let (replies, welcome) = tokio::select! {
            _ = shutdown.cancelled() => return Err(ShipError::Shutdown),
            result = tokio::time::timeout(timeout, handshake) => result.map_err(|_| {
                ShipError::Protocol(format!("no Welcome within {timeout:?}"))
            })??,
        };
        *welcomed = true;
        if welcome.owner != self.target.listener_id {
            return Err(ShipError::Protocol(format!(
                "Welcome names owner {:?}, not this listener {:?}",
                welcome.owner, self.target.listener_id
            )));
        }

        // The drainer's ids are this log's only if it holds this incarnation
        // of it (module doc, "History"); otherwise a snapshot goes first and
        // nothing of the Welcome counts as an ack.
        let follows = welcome.incarnation == incarnation;
        let durable = if follows {
            LogId(welcome.durable_log_id)
        } else {
            LogId::ZERO
        };
        let listener_last = self.wal.last_log_id(self.partition)?.unwrap_or(LogId::ZERO);
        if durable > listener_last {
            return Err(ShipError::DrainerAhead {
                partition: self.partition,
                drainer_durable: durable,
                listener_last,
            });
        }
        if durable > LogId::ZERO {
            self.wal
                .ack(self.partition, self.target.drainer_id.clone(), durable)
                .await?;
        }
        {
            let mut status = self.status();
            status.acked = durable;
            status.online = true;
            status.last_error = None;
        }
        if follows {
            info!(partition = %self.partition, endpoint = %endpoint, drainer_durable = %durable, snapshot_epoch = welcome.snapshot_epoch, "drainer online");
        } else {
            info!(
                partition = %self.partition,
                endpoint = %endpoint,
                held = format_args!("{:016x}", welcome.incarnation),
                ours = format_args!("{:016x}", incarnation),
                "drainer online; it holds another history of this partition, sending a snapshot first"
            );
        }
        // Where shipping starts: after the drainer's durable id, or, for a
        // snapshot first, at this log's first entry (a marker there is sent
        // with its chunks; anything else makes it a fallback snapshot).
        let read_next = if follows {
            durable.next()
        } else {
            self.wal.first_log_id(self.partition)?.unwrap_or(LogId(1))
        };

        let mut stream = ActiveStream {
            shipper: self,
            out_tx,
            replies,
            appended_rx: self.wal.subscribe_appends(),
            inflight: VecDeque::new(),
            unacked_bytes: 0,
            pending: VecDeque::new(),
            read_next,
            read_ahead: None,
            last_sent: durable,
            acked_remote: durable,
            acked_wal: durable,
            needs_snapshot: !follows,
            transfer: None,
            newest_epoch_sent: 0,
        };
        let result = stream.pump(shutdown).await;
        // A read ahead holds a handle of the WAL: let it end before the
        // caller may close the WAL.
        if let Some((_, read)) = stream.read_ahead.take() {
            let _ = read.await;
        }
        match result {
            Err(ShipError::Shutdown) => stream.finish().await,
            other => other,
        }
    }
}

/// Chunks of a full resync read at a time while it is being stored.
const RESYNC_CHUNKS_PER_READ: usize = 17;

/// A WAL read running on a blocking thread.
type WalRead = JoinHandle<Result<Vec<WalEntry>, WalError>>;

/// A batch sent and not yet acked.
struct Inflight {
    last: LogId,
    raw_bytes: usize,
    first_created_ms: u64,
}

/// The sending state of one established stream.
struct ActiveStream<'a> {
    shipper: &'a Shipper,
    out_tx: mpsc::Sender<pb::ShipMessage>,
    replies: Streaming<pb::ShipReply>,
    appended_rx: watch::Receiver<u64>,
    inflight: VecDeque<Inflight>,
    unacked_bytes: usize,
    /// Entries read from the WAL and not sent yet, from `last_sent + 1` on.
    pending: VecDeque<WalEntry>,
    /// Next id to read from the WAL.
    read_next: LogId,
    /// A read started while the previous batch is encoded and sent, and the
    /// id it starts at (discarded if `read_next` moved elsewhere).
    read_ahead: Option<(LogId, WalRead)>,
    last_sent: LogId,
    /// Latest ack from the drainer, and the latest one written to the WAL.
    acked_remote: LogId,
    acked_wal: LogId,
    /// The drainer holds another history: the next thing sent must be a
    /// snapshot (its marker resets the drainer's partition).
    needs_snapshot: bool,
    /// A chunk transfer this stream started and has not finished: the epoch
    /// and the next chunk to send. Chunks of a full resync go while the
    /// listener stores them ([`ActiveStream::send_resync_chunks`]), all but
    /// the newest; its marker's transfer continues from here.
    transfer: Option<(u64, u64)>,
    /// The newest epoch this stream sent chunks of: a resync's chunks go
    /// early only if their epoch is not older (the drainer refuses a transfer
    /// older than the epoch it holds).
    newest_epoch_sent: u64,
}

impl ActiveStream<'_> {
    fn partition(&self) -> PartitionId {
        self.shipper.partition
    }

    async fn pump(&mut self, shutdown: &CancellationToken) -> Result<(), ShipError> {
        let config = &self.shipper.config;
        loop {
            if shutdown.is_cancelled() {
                return Err(ShipError::Shutdown);
            }
            while let Some(reply) = self.replies.message().now_or_never() {
                self.on_reply(reply)?;
            }
            self.record_ack().await?;
            if self.unacked_bytes >= config.max_unacked_bytes.as_usize()
                || self.inflight.len() >= config.max_unacked_batches
            {
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(ShipError::Shutdown),
                    reply = self.replies.message() => self.on_reply(reply)?,
                }
                continue;
            }
            if self.pending.is_empty() {
                self.appended_rx.borrow_and_update();
                match self.read_more().await {
                    Ok(0) => {
                        self.note_oldest();
                        if self.send_resync_chunks(shutdown).await? {
                            continue;
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return Err(ShipError::Shutdown),
                            reply = self.replies.message() => self.on_reply(reply)?,
                            changed = self.appended_rx.changed() => {
                                changed.map_err(|_| ShipError::Wal(WalError::Closed))?;
                            }
                            _ = tokio::time::sleep(config.idle_poll.0) => {}
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(ShipError::Wal(WalError::Trimmed {
                        wanted,
                        first_available,
                        ..
                    })) => {
                        info!(partition = %self.partition(), %wanted, %first_available, "drainer needs trimmed entries, sending a fallback snapshot");
                        self.fallback(shutdown).await?;
                        continue;
                    }
                    Err(error) => return Err(error),
                }
            }
            if let Some(marker) = self
                .pending
                .front()
                .and_then(|e| wire::peek_marker(&e.payload))
            {
                self.ship_log_marker(marker, shutdown).await?;
                continue;
            }
            if self.needs_snapshot {
                info!(partition = %self.partition(), "the log does not start with a snapshot marker; sending a fallback snapshot");
                self.fallback(shutdown).await?;
                continue;
            }
            let batch = self.take_batch();
            self.send_batch(batch, shutdown).await?;
        }
    }

    /// Reads the next entries into `pending`; returns how many.
    ///
    /// After a full read (the shipper is behind), the next read starts at
    /// once on a blocking thread, so that reading the WAL overlaps encoding,
    /// compressing and sending the batch just read instead of alternating
    /// with them.
    async fn read_more(&mut self) -> Result<usize, ShipError> {
        let from = self.read_next;
        let limits = ReadLimits {
            max_entries: self.shipper.config.max_batch_entries,
            max_bytes: self.shipper.config.max_batch_bytes.as_usize(),
        };
        let read_ahead = match self.read_ahead.take() {
            Some((start, read)) if start == from => Some(read.await.map_err(join_error)?),
            // A read ahead of a position given up (fallback snapshot) is
            // dropped; its thread finishes on its own.
            _ => None,
        };
        let entries = match read_ahead {
            Some(Ok(entries)) if !entries.is_empty() => entries,
            // Nothing or an error (e.g. `Trimmed`): read again now, so that
            // what is returned is as fresh as without the read ahead (the
            // caller marked the append notification seen just before).
            _ => {
                let wal = self.shipper.wal.clone();
                let partition = self.partition();
                // A shipper that keeps up finds its entries in the read tail.
                match wal.read_cached(partition, from, limits) {
                    Some(read) => read?,
                    None => tokio::task::spawn_blocking(move || wal.read(partition, from, limits))
                        .await
                        .map_err(join_error)??,
                }
            }
        };
        if let Some(last) = entries.last() {
            self.read_next = last.log_id.next();
        }
        let payload_bytes: usize = entries.iter().map(|entry| entry.payload.len()).sum();
        if entries.len() >= limits.max_entries || payload_bytes >= limits.max_bytes {
            let wal = self.shipper.wal.clone();
            let partition = self.partition();
            let next = self.read_next;
            let read = tokio::task::spawn_blocking(move || wal.read(partition, next, limits));
            self.read_ahead = Some((next, read));
        }
        let count = entries.len();
        self.pending.extend(entries);
        Ok(count)
    }

    /// Consecutive non-marker entries from the front of `pending`, within the
    /// batch limits (at least one).
    fn take_batch(&mut self) -> Vec<WalEntry> {
        let config = &self.shipper.config;
        let mut batch = Vec::new();
        let mut raw = 0;
        while let Some(front) = self.pending.front() {
            if !batch.is_empty() && wire::peek_marker(&front.payload).is_some() {
                break;
            }
            let len = wire::wire_entry_len(front);
            if !batch.is_empty()
                && (raw + len > config.max_batch_bytes.as_usize()
                    || batch.len() >= config.max_batch_entries)
            {
                break;
            }
            raw += len;
            if let Some(entry) = self.pending.pop_front() {
                batch.push(entry);
            }
        }
        batch
    }

    /// Sends `message`, handling replies while the channel is full.
    async fn send(
        &mut self,
        message: pb::ShipMessage,
        shutdown: &CancellationToken,
    ) -> Result<(), ShipError> {
        // A clone, so that the permit does not borrow `self`.
        let out_tx = self.out_tx.clone();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(ShipError::Shutdown),
                reply = self.replies.message() => self.on_reply(reply)?,
                permit = out_tx.reserve() => {
                    // The request stream is gone: the reply stream says why.
                    let Ok(permit) = permit else {
                        let reply = self.replies.message().await;
                        self.on_reply(reply)?;
                        return Err(ShipError::StreamClosed);
                    };
                    permit.send(message);
                    return Ok(());
                }
            }
        }
    }

    async fn send_batch(
        &mut self,
        entries: Vec<WalEntry>,
        shutdown: &CancellationToken,
    ) -> Result<(), ShipError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let (last_id, first_created_ms, count) =
            (last.log_id, first.created_unix_ms, entries.len() as u64);
        let batch = wire::encode_batch(&entries);
        let (raw_bytes, bytes) = (batch.raw_len as usize, batch.snappy_entries.len());
        let message = pb::ShipMessage {
            kind: Some(ship_message::Kind::Entries(batch)),
        };
        self.send(message, shutdown).await?;
        self.inflight.push_back(Inflight {
            last: last_id,
            raw_bytes,
            first_created_ms,
        });
        self.unacked_bytes += raw_bytes;
        self.last_sent = last_id;
        self.note_oldest();
        let mut status = self.shipper.status();
        status.batches_sent += 1;
        status.entries_sent += count;
        status.bytes_sent += bytes as u64;
        status.raw_bytes_sent += raw_bytes as u64;
        Ok(())
    }

    /// Sends the chunks of the full resync the listener is storing, as far
    /// as they are stored, but the newest one (the last chunk of a transfer
    /// says so, and only the marker tells which one is last); `true` if it
    /// sent any. The drainer keeps them in its `Writing` epoch: the marker,
    /// once in the log, continues the transfer ([`ActiveStream::send_chunks`]);
    /// a resync that fails leaves them to the next transfer, whose first
    /// chunk deletes them (relay convention: a snapshot is loaded only from
    /// its marker).
    async fn send_resync_chunks(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<bool, ShipError> {
        let partition = self.partition();
        let Some(epoch) = self.shipper.provider.resync_epoch(partition) else {
            return Ok(false);
        };
        if epoch < self.newest_epoch_sent {
            return Ok(false);
        }
        let from = match self.transfer {
            Some((sending, next)) if sending == epoch => next,
            _ => 0,
        };
        let _pin = self.shipper.wal.pin_snapshot(partition, epoch);
        let wal = self.shipper.wal.clone();
        let read = tokio::task::spawn_blocking(move || {
            wal.read_snapshot_chunks(partition, epoch, from, RESYNC_CHUNKS_PER_READ)
        })
        .await
        .map_err(join_error)??;
        // Contiguous from `from`, the newest held back.
        let stored = read
            .iter()
            .enumerate()
            .take_while(|(i, (seq, _))| *seq == from + *i as u64)
            .count();
        let sendable = stored.saturating_sub(1);
        for (seq, data) in read.into_iter().take(sendable) {
            self.send_chunk(epoch, seq, &data, false, shutdown).await?;
            self.transfer = Some((epoch, seq + 1));
        }
        Ok(sendable > 0)
    }

    async fn send_chunk(
        &mut self,
        epoch: u64,
        seq: u64,
        data: &[u8],
        last: bool,
        shutdown: &CancellationToken,
    ) -> Result<(), ShipError> {
        let chunk = wire::encode_chunk(epoch, seq, data, last);
        let bytes = chunk.data.len() as u64;
        let message = pb::ShipMessage {
            kind: Some(ship_message::Kind::SnapshotChunk(chunk)),
        };
        self.send(message, shutdown).await?;
        self.newest_epoch_sent = self.newest_epoch_sent.max(epoch);
        let mut status = self.shipper.status();
        status.bytes_sent += bytes;
        status.raw_bytes_sent += data.len() as u64;
        Ok(())
    }

    /// Sends chunks `0..chunks` of `epoch` from the listener's WAL (from
    /// where this stream's transfer of `epoch` got to, if it began early);
    /// `false` if some are missing there.
    async fn send_chunks(
        &mut self,
        epoch: u64,
        chunks: u64,
        shutdown: &CancellationToken,
    ) -> Result<bool, ShipError> {
        // The listener's snapshot collection leaves an epoch being sent alone.
        let _pin = self.shipper.wal.pin_snapshot(self.partition(), epoch);
        let mut seq = match self.transfer.take() {
            Some((sending, next)) if sending == epoch && next < chunks => next,
            _ => 0,
        };
        while seq < chunks {
            let wal = self.shipper.wal.clone();
            let partition = self.partition();
            let from = seq;
            let read = tokio::task::spawn_blocking(move || {
                wal.read_snapshot_chunks(partition, epoch, from, 16)
            })
            .await
            .map_err(join_error)??;
            if read.is_empty() {
                return Ok(false);
            }
            for (stored_seq, data) in read {
                if stored_seq != seq {
                    return Ok(false);
                }
                if seq >= chunks {
                    break;
                }
                self.send_chunk(epoch, seq, &data, seq + 1 == chunks, shutdown)
                    .await?;
                seq += 1;
            }
        }
        Ok(true)
    }

    /// Ships a marker of the listener's own log (convention 3) with its
    /// chunks, or a fallback snapshot if the chunks are gone.
    async fn ship_log_marker(
        &mut self,
        marker: SnapshotMarker,
        shutdown: &CancellationToken,
    ) -> Result<(), ShipError> {
        if marker.chunks > 0
            && self
                .send_chunks(marker.epoch, marker.chunks, shutdown)
                .await?
        {
            if let Some(entry) = self.pending.pop_front() {
                self.send_batch(vec![entry], shutdown).await?;
                self.needs_snapshot = false;
            }
            return Ok(());
        }
        warn!(partition = %self.partition(), epoch = marker.epoch, "chunks of a logged snapshot are gone, sending a fallback snapshot");
        self.fallback(shutdown).await
    }

    /// Sends a fresh snapshot from the provider: chunks, then its marker at
    /// `marker_log_id`; shipping continues after it.
    async fn fallback(&mut self, shutdown: &CancellationToken) -> Result<(), ShipError> {
        let partition = self.partition();
        let failed = |reason: String| ShipError::Snapshot { partition, reason };
        let snapshot = tokio::select! {
            _ = shutdown.cancelled() => return Err(ShipError::Shutdown),
            snapshot = self.shipper.provider.fallback_snapshot(partition) => {
                snapshot.map_err(|error| failed(error.to_string()))?
            }
        };
        let marker_id = snapshot.marker_log_id;
        let listener_last = self
            .shipper
            .wal
            .last_log_id(partition)?
            .unwrap_or(LogId::ZERO);
        if snapshot.marker.epoch != snapshot.epoch || snapshot.marker.chunks == 0 {
            return Err(failed(format!(
                "provider returned epoch {} with a marker of epoch {} and {} chunks",
                snapshot.epoch, snapshot.marker.epoch, snapshot.marker.chunks
            )));
        }
        if marker_id <= self.last_sent || marker_id > listener_last {
            return Err(failed(format!(
                "marker log id {marker_id} must be past the last sent id {} and at most the \
                 listener's last id {listener_last}",
                self.last_sent
            )));
        }
        if !self
            .send_chunks(snapshot.epoch, snapshot.marker.chunks, shutdown)
            .await?
        {
            return Err(failed(format!(
                "chunks of epoch {} are missing from the listener's wal",
                snapshot.epoch
            )));
        }
        // The marker stands for entry `marker_id`: it takes that entry's
        // creation time, so the drainer's WAL (which keeps creation times
        // non-decreasing) does not raise the times of the entries after it.
        let wal = self.shipper.wal.clone();
        let created_unix_ms = tokio::task::spawn_blocking(move || {
            wal.oldest_created(partition, marker_id).ok().flatten()
        })
        .await
        .map_err(join_error)?
        .unwrap_or_else(now_unix_ms);
        let entry = WalEntry {
            log_id: marker_id,
            flags: 0,
            created_unix_ms,
            bytes_end: 0,
            stored_len: 0,
            source: SourcePosition {
                replid: snapshot.marker.replid.as_str().into(),
                offset: ReplOffset(snapshot.marker.offset),
                db: 0,
            },
            payload: Record::Snapshot(snapshot.marker.clone()).encode(),
        };
        self.send_batch(vec![entry], shutdown).await?;
        self.pending.clear();
        self.read_next = marker_id.next();
        self.needs_snapshot = false;
        self.shipper.status().fallback_snapshots += 1;
        info!(partition = %partition, epoch = snapshot.epoch, %marker_id, "fallback snapshot sent");
        Ok(())
    }

    fn on_reply(
        &mut self,
        reply: Result<Option<pb::ShipReply>, tonic::Status>,
    ) -> Result<(), ShipError> {
        let reply = match reply {
            Ok(Some(reply)) => reply,
            Ok(None) => return Err(ShipError::StreamClosed),
            Err(status) => return Err(self.shipper.remote_error(status)),
        };
        match reply.kind {
            Some(ship_reply::Kind::Ack(ack)) => {
                let acked = LogId(ack.durable_log_id);
                if acked > self.last_sent {
                    return Err(ShipError::Protocol(format!(
                        "ack of {acked} beyond the last sent entry {}",
                        self.last_sent
                    )));
                }
                if acked > self.acked_remote {
                    self.acked_remote = acked;
                    while let Some(front) = self.inflight.front() {
                        if front.last > acked {
                            break;
                        }
                        self.unacked_bytes -= front.raw_bytes;
                        self.inflight.pop_front();
                    }
                }
                Ok(())
            }
            Some(ship_reply::Kind::Welcome(_)) => {
                Err(ShipError::Protocol("a second Welcome".into()))
            }
            None => Err(ShipError::Protocol("reply without a kind".into())),
        }
    }

    /// Writes the drainer's latest ack to the listener's WAL.
    async fn record_ack(&mut self) -> Result<(), ShipError> {
        if self.acked_remote <= self.acked_wal {
            return Ok(());
        }
        self.shipper
            .wal
            .ack(
                self.partition(),
                self.shipper.target.drainer_id.clone(),
                self.acked_remote,
            )
            .await?;
        self.acked_wal = self.acked_remote;
        self.shipper.status().acked = self.acked_wal;
        self.note_oldest();
        Ok(())
    }

    fn note_oldest(&self) {
        let oldest = self
            .inflight
            .front()
            .map(|inflight| inflight.first_created_ms)
            .or_else(|| self.pending.front().map(|entry| entry.created_unix_ms));
        self.shipper.status().oldest_unacked_created_ms = oldest;
    }

    /// Stops sending; waits up to the grace period for the outstanding acks
    /// and records them.
    async fn finish(mut self) -> Result<(), ShipError> {
        let deadline = tokio::time::Instant::now() + self.shipper.config.shutdown_grace.0;
        while self.acked_remote < self.last_sent {
            match tokio::time::timeout_at(deadline, self.replies.message()).await {
                Ok(reply) => {
                    if let Err(error) = self.on_reply(reply) {
                        debug!(%error, "stream ended while waiting for the last acks");
                        break;
                    }
                }
                Err(_) => {
                    warn!(
                        partition = %self.partition(),
                        acked = %self.acked_remote,
                        sent = %self.last_sent,
                        "shutdown: drainer did not ack everything sent in time"
                    );
                    break;
                }
            }
        }
        self.record_ack().await?;
        Ok(())
    }
}
