//! [`DrainerService`]: the drainer's end of the `Ship` stream (tonic server).
//!
//! In: `Ship` streams from configured listeners. Out: their entries appended
//! to the drainer's WAL at the listener's ids, snapshot chunks stored,
//! markers turned into partition resets, and `Ack`s of what is durable.
//! Rules in `ship/mod.rs`.

use crate::position::now_unix_ms;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use super::tls::{ServerTls, ServerTlsConfig};
use super::wire::{self, DecodedEntry};
use super::{secrets_match, ShipError, ShipLimits, PROTOCOL_VERSION};
use crate::config_units::HumanDuration;
use crate::position::{LogId, PartitionId};
use crate::record::pb::drainer_server::{Drainer, DrainerServer};
use crate::record::pb::{self, ship_message, ship_reply};
use crate::record::{Record, SnapshotMarker};
use crate::secret::Secret;
use crate::wal::{
    NewEntry, PartitionHistory, PendingAppend, SnapshotPhase, SnapshotState, Wal, WalError,
};

/// A listener allowed to ship to this drainer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AllowedListener {
    /// The listener's id (its `Hello.listener_id`).
    pub id: String,
    /// The shared secret it must present (at least 8 bytes). Give it here,
    /// or in `secret-file` or `secret-env`.
    #[serde(default)]
    pub secret: Secret,
    /// A file holding the secret (one trailing newline dropped), read when
    /// the config is loaded. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// The name of an environment variable holding the secret. Default:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
}

impl AllowedListener {
    pub fn new(id: impl Into<String>, secret: impl Into<Secret>) -> AllowedListener {
        AllowedListener {
            id: id.into(),
            secret: secret.into(),
            ..AllowedListener::default()
        }
    }
}

/// Configuration of the drainer's `Ship` endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DrainerServiceConfig {
    /// Listeners allowed to ship; every other one is refused. Default: none.
    pub listeners: Vec<AllowedListener>,
    /// How long a new stream may take to send its `Hello`. Default: `"10s"`.
    pub hello_timeout: HumanDuration,
    /// How long a replacing stream waits for the one it replaces to stop.
    /// Default: `"30s"`.
    pub replace_timeout: HumanDuration,
    /// Transport keepalive: pings every interval, a dead peer is dropped
    /// after another interval without answer. Default: `"10s"`.
    pub keepalive: HumanDuration,
    /// Largest gRPC message accepted, bytes. Default: enough for one
    /// entry of the WAL's largest payload (about 77MiB).
    pub max_message_bytes: usize,
    /// Largest decompressed batch. Default: 65MiB.
    pub max_batch_raw_bytes: usize,
    /// Most entries per batch. Default: 65536.
    pub max_batch_entries: u32,
    /// Largest decompressed snapshot chunk. Default: 8MiB.
    pub max_chunk_raw_bytes: usize,
    /// TLS on the endpoint (`[drainer.tls]`): the drainer's certificate and
    /// key, and optionally the CA that listeners' certificates must chain to
    /// (mutual TLS). Default: none (plain gRPC; listeners use `http://`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsConfig>,
}

impl Default for DrainerServiceConfig {
    fn default() -> Self {
        let limits = ShipLimits::default();
        DrainerServiceConfig {
            listeners: Vec::new(),
            hello_timeout: HumanDuration(Duration::from_secs(10)),
            replace_timeout: HumanDuration(Duration::from_secs(30)),
            keepalive: HumanDuration(Duration::from_secs(10)),
            max_message_bytes: limits.max_message_bytes,
            max_batch_raw_bytes: limits.max_batch_raw_bytes,
            max_batch_entries: limits.max_batch_entries,
            max_chunk_raw_bytes: limits.max_chunk_raw_bytes,
            tls: None,
        }
    }
}

impl DrainerServiceConfig {
    /// Checks the config; errors name the field.
    pub fn validate(self) -> Result<DrainerServiceConfig, ShipError> {
        let bad = |field: &str, reason: &str| ShipError::Config(format!("{field}: {reason}"));
        for (index, listener) in self.listeners.iter().enumerate() {
            if listener.id.is_empty() {
                return Err(bad(&format!("listeners[{index}].id"), "must not be empty"));
            }
            if listener.secret.len() < 8 {
                return Err(bad(
                    &format!("listeners[{index}].secret"),
                    "must be at least 8 bytes",
                ));
            }
            if self.listeners[..index].iter().any(|l| l.id == listener.id) {
                return Err(bad(&format!("listeners[{index}].id"), "is listed twice"));
            }
        }
        if self.max_batch_raw_bytes < crate::wal::MAX_PAYLOAD_LEN + 4096 {
            return Err(bad(
                "max-batch-raw-bytes",
                "must hold one entry of the largest WAL payload (64MiB + 4KiB)",
            ));
        }
        if self.max_message_bytes < snap::raw::max_compress_len(self.max_batch_raw_bytes) {
            return Err(bad(
                "max-message-bytes",
                "must hold a batch of max-batch-raw-bytes that does not compress",
            ));
        }
        if self.max_batch_entries == 0 {
            return Err(bad("max-batch-entries", "must be at least 1"));
        }
        if self.max_chunk_raw_bytes < 64 << 10 {
            return Err(bad("max-chunk-raw-bytes", "must be at least 64KiB"));
        }
        Ok(self)
    }

    fn limits(&self) -> ShipLimits {
        ShipLimits {
            max_message_bytes: self.max_message_bytes,
            max_batch_raw_bytes: self.max_batch_raw_bytes,
            max_batch_entries: self.max_batch_entries,
            max_chunk_raw_bytes: self.max_chunk_raw_bytes,
        }
    }
}

/// What the drainer side shows for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainerPartitionStatus {
    pub partition: PartitionId,
    /// The listener whose stream is active, if one is.
    pub connected_listener: Option<String>,
    pub peer: Option<SocketAddr>,
    /// Last durable id of the drainer's log of this partition.
    pub durable: LogId,
    /// Latest snapshot epoch and its phase.
    pub snapshot: SnapshotState,
    /// When the last batch or chunk arrived (unix ms, 0 if never).
    pub last_received_unix_ms: u64,
    /// Streams accepted for this partition since start.
    pub sessions: u64,
    /// The latest `Hello` refused for this partition because another
    /// listener owns it, and when (unix ms).
    pub refused: Option<(u64, String)>,
}

/// Who currently ships a partition.
struct Owner {
    listener_id: String,
    session: u64,
    cancel: CancellationToken,
    peer: Option<SocketAddr>,
}

#[derive(Default)]
struct PartitionSlot {
    owner: Option<Owner>,
    /// Held by the running session: a replacing one waits for it.
    running: Arc<tokio::sync::Mutex<()>>,
    last_received_unix_ms: u64,
    sessions: u64,
    refused: Option<(u64, String)>,
}

struct Inner {
    wal: Wal,
    config: DrainerServiceConfig,
    limits: ShipLimits,
    secrets: HashMap<String, Vec<u8>>,
    slots: Mutex<HashMap<PartitionId, PartitionSlot>>,
    next_session: std::sync::atomic::AtomicU64,
    shutdown: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The drainer's `Ship` service; cheap to clone. Serve it with
/// [`serve_drainer`] or through [`DrainerService::into_server`].
#[derive(Clone)]
pub struct DrainerService {
    inner: Arc<Inner>,
}

impl DrainerService {
    /// A service appending to `wal`; the config is validated.
    pub fn new(wal: Wal, config: DrainerServiceConfig) -> Result<DrainerService, ShipError> {
        let config = config.validate()?;
        let secrets = config
            .listeners
            .iter()
            .map(|listener| {
                let secret = listener.secret.expose().as_bytes().to_vec();
                (listener.id.clone(), secret)
            })
            .collect();
        Ok(DrainerService {
            inner: Arc::new(Inner {
                wal,
                limits: config.limits(),
                config,
                secrets,
                slots: Mutex::new(HashMap::new()),
                next_session: std::sync::atomic::AtomicU64::new(1),
                shutdown: CancellationToken::new(),
                tasks: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The tonic service with this side's message size limits.
    pub fn into_server(self) -> DrainerServer<DrainerService> {
        let limit = self.inner.limits.max_message_bytes;
        DrainerServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    /// Per-partition status: every partition of the WAL plus every one a
    /// stream was opened for.
    pub fn status(&self) -> Vec<DrainerPartitionStatus> {
        let mut partitions = self.inner.wal.partitions();
        let slots = self.slots();
        partitions.extend(slots.keys().copied());
        partitions.sort();
        partitions.dedup();
        partitions
            .into_iter()
            .map(|partition| {
                let slot = slots.get(&partition);
                let owner = slot.and_then(|slot| slot.owner.as_ref());
                DrainerPartitionStatus {
                    partition,
                    connected_listener: owner.map(|owner| owner.listener_id.clone()),
                    peer: owner.and_then(|owner| owner.peer),
                    durable: self
                        .inner
                        .wal
                        .last_log_id(partition)
                        .ok()
                        .flatten()
                        .unwrap_or(LogId::ZERO),
                    snapshot: self.inner.wal.snapshot_state(partition).unwrap_or_default(),
                    last_received_unix_ms: slot.map_or(0, |slot| slot.last_received_unix_ms),
                    sessions: slot.map_or(0, |slot| slot.sessions),
                    refused: slot.and_then(|slot| slot.refused.clone()),
                }
            })
            .collect()
    }

    /// Ends every stream (between two messages) and waits for them; new
    /// streams are refused afterwards.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let tasks: Vec<JoinHandle<()>> = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        for task in tasks {
            let _ = task.await;
        }
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<PartitionId, PartitionSlot>> {
        // Slots are replaced field by field with no panics in between, so a
        // poisoned lock still guards consistent data.
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn authenticate(&self, hello: &pb::Hello) -> Result<(), ShipError> {
        let refuse = |reason: &str| ShipError::Unauthenticated {
            listener_id: hello.listener_id.clone(),
            reason: reason.to_string(),
        };
        let Some(expected) = self.inner.secrets.get(&hello.listener_id) else {
            return Err(refuse("listener id is not configured on this drainer"));
        };
        if !secrets_match(expected, &hello.secret) {
            return Err(refuse("secret does not match"));
        }
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ShipError::UnsupportedVersion {
                got: hello.protocol_version,
                supported: PROTOCOL_VERSION,
            });
        }
        Ok(())
    }

    /// Makes this stream the partition's owner, cancelling and waiting for
    /// a previous stream of the same listener.
    async fn take_partition(
        &self,
        partition: PartitionId,
        listener_id: &str,
        peer: Option<SocketAddr>,
    ) -> Result<(u64, CancellationToken, OwnedMutexGuard<()>), ShipError> {
        let session = self
            .inner
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = self.inner.shutdown.child_token();
        let running = {
            let mut slots = self.slots();
            let slot = slots.entry(partition).or_default();
            if let Some(owner) = &slot.owner {
                if owner.listener_id != listener_id {
                    return Err(ShipError::PartitionBusy {
                        partition,
                        owner: owner.listener_id.clone(),
                    });
                }
                owner.cancel.cancel();
            }
            slot.owner = Some(Owner {
                listener_id: listener_id.to_string(),
                session,
                cancel: cancel.clone(),
                peer,
            });
            slot.sessions += 1;
            Arc::clone(&slot.running)
        };
        let wait = self.inner.config.replace_timeout.0;
        match tokio::time::timeout(wait, running.lock_owned()).await {
            Ok(guard) => Ok((session, cancel, guard)),
            Err(_) => {
                self.release(partition, session);
                Err(ShipError::Remote(Box::new(Status::unavailable(format!(
                    "partition {partition}: the previous stream did not stop within {wait:?}"
                )))))
            }
        }
    }

    fn release(&self, partition: PartitionId, session: u64) {
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(&partition) {
            if slot.owner.as_ref().map(|owner| owner.session) == Some(session) {
                slot.owner = None;
            }
        }
    }

    /// Refuses `listener` for `partition`, owned by `owner`: logged and
    /// kept for the status.
    fn refuse_foreign(
        &self,
        partition: PartitionId,
        owner: &str,
        listener: &str,
        peer: Option<SocketAddr>,
    ) -> ShipError {
        let error = ShipError::PartitionOwned {
            partition,
            owner: owner.to_string(),
            listener: listener.to_string(),
        };
        warn!(partition = %partition, listener, owner, ?peer, %error, "ship stream refused");
        self.slots().entry(partition).or_default().refused =
            Some((now_unix_ms(), error.to_string()));
        error
    }

    fn touch(&self, partition: PartitionId) {
        if let Some(slot) = self.slots().get_mut(&partition) {
            slot.last_received_unix_ms = now_unix_ms();
        }
    }

    async fn open_stream(
        &self,
        request: Request<Streaming<pb::ShipMessage>>,
    ) -> Result<mpsc::Receiver<Result<pb::ShipReply, Status>>, ShipError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(ShipError::ShuttingDown);
        }
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let hello_timeout = self.inner.config.hello_timeout.0;
        let first = tokio::time::timeout(hello_timeout, inbound.message())
            .await
            .map_err(|_| ShipError::HelloTimeout(hello_timeout))?
            .map_err(ShipError::remote)?;
        let hello = match first.and_then(|message| message.kind) {
            Some(ship_message::Kind::Hello(hello)) => hello,
            Some(_) => return Err(ShipError::invalid("first message: expected Hello")),
            None => return Err(ShipError::invalid("first message: empty stream or message")),
        };
        if let Err(error) = self.authenticate(&hello) {
            warn!(listener = %hello.listener_id, ?peer, %error, "ship stream refused");
            return Err(error);
        }
        if hello.incarnation == 0 {
            return Err(ShipError::invalid("Hello without an incarnation"));
        }
        let partition = PartitionId(hello.partition);
        // Another listener's partition: refused before it can even end the
        // owner's stream.
        if let Some(history) = self.inner.wal.history(partition)? {
            if !history.owner.is_empty() && history.owner != hello.listener_id {
                return Err(self.refuse_foreign(
                    partition,
                    &history.owner,
                    &hello.listener_id,
                    peer,
                ));
            }
        }
        let (session, cancel, running) = self
            .take_partition(partition, &hello.listener_id, peer)
            .await?;
        // The only writer of the partition now: claim it (durably, before the
        // Welcome), and adopt the listener's incarnation if its log is empty.
        let history = match self
            .inner
            .wal
            .follow_history(partition, Some(&hello.listener_id), hello.incarnation)
            .await
        {
            Ok(history) if history.owner == hello.listener_id => history,
            Ok(history) => {
                self.release(partition, session);
                return Err(self.refuse_foreign(
                    partition,
                    &history.owner,
                    &hello.listener_id,
                    peer,
                ));
            }
            Err(error) => {
                self.release(partition, session);
                return Err(error.into());
            }
        };
        let wal = self.inner.wal.clone();
        let start = tokio::task::spawn_blocking(move || wal.positions(partition))
            .await
            .map_err(|error| ShipError::Wal(WalError::Io(std::io::Error::other(error))))
            .and_then(|positions| Ok(positions?));
        let positions = match start {
            Ok(positions) => positions,
            Err(error) => {
                self.release(partition, session);
                return Err(error);
            }
        };
        let (durable, snapshot) = positions
            .map(|positions| (positions.durable, positions.snapshot))
            .unwrap_or_default();
        let follows = history.incarnation == hello.incarnation;
        let (reply_tx, reply_rx) = mpsc::channel(64);
        let welcome = pb::ShipReply {
            kind: Some(ship_reply::Kind::Welcome(pb::Welcome {
                durable_log_id: if follows {
                    durable.0.saturating_sub(history.id_base)
                } else {
                    0
                },
                snapshot_epoch: if follows {
                    snapshot.epoch.saturating_sub(history.epoch_base)
                } else {
                    0
                },
                owner: history.owner.clone(),
                incarnation: history.incarnation,
            })),
        };
        // The channel is empty and its receiver alive: this cannot fail.
        let _ = reply_tx.try_send(Ok(welcome));
        if follows {
            info!(partition = %partition, listener = %hello.listener_id, ?peer, %durable, "ship stream accepted");
        } else {
            info!(
                partition = %partition,
                listener = %hello.listener_id,
                ?peer,
                %durable,
                held = format_args!("{:016x}", history.incarnation),
                shipped = format_args!("{:016x}", hello.incarnation),
                "ship stream accepted; it ships another history, a snapshot must come first"
            );
        }

        let stream = StreamSession {
            service: self.clone(),
            partition,
            epoch_base: follows.then_some(history.epoch_base),
            history,
            shipped: hello.incarnation,
            durable,
            received: durable,
            queued: VecDeque::new(),
            snapshot,
            transfer: None,
            received_snapshot: None,
            reply_tx,
        };
        let span =
            tracing::info_span!("ship", partition = %partition, listener = %hello.listener_id);
        let task = tokio::spawn(
            stream
                .run(inbound, cancel, running, session)
                .instrument(span),
        );
        let mut tasks = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        tasks.retain(|task| !task.is_finished());
        tasks.push(task);
        Ok(reply_rx)
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::ShipReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Drainer for DrainerService {
    type ShipStream = ReplyStream;

    async fn ship(
        &self,
        request: Request<Streaming<pb::ShipMessage>>,
    ) -> Result<Response<Self::ShipStream>, Status> {
        let reply_rx = self.open_stream(request).await?;
        let stream = futures::stream::unfold(reply_rx, |mut reply_rx| async move {
            reply_rx.recv().await.map(|reply| (reply, reply_rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A chunk transfer in progress on this stream.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    epoch: u64,
    next_seq: u64,
}

/// Appends a stream may have queued in the WAL before their acks: enough to
/// fill a group commit while one is being fsynced.
const MAX_QUEUED_APPENDS: usize = 16;

/// One accepted stream; the only writer of its partition while it runs.
///
/// Ids and epochs here are the drainer's own (local) ones unless named
/// otherwise; the listener's are local minus the history's bases (module
/// doc, "History").
struct StreamSession {
    service: DrainerService,
    partition: PartitionId,
    /// The partition's history record, as of the latest reset.
    history: PartitionHistory,
    /// Incarnation of the listener's log this stream ships.
    shipped: u64,
    /// Local epoch = listener epoch + this, for this stream's transfers:
    /// the history's base when the partition follows the stream's log;
    /// otherwise chosen at the stream's first transfer, above every epoch
    /// the partition has, and stored with the marker's reset.
    epoch_base: Option<u64>,
    /// Last id made durable (and acked).
    durable: LogId,
    /// Last id queued to the WAL (`durable <= received`).
    received: LogId,
    /// Queued appends, oldest first.
    queued: VecDeque<PendingAppend>,
    snapshot: SnapshotState,
    transfer: Option<Transfer>,
    /// (local epoch, chunk count) of the last complete transfer on this
    /// stream: a marker may only name that one.
    received_snapshot: Option<(u64, u64)>,
    reply_tx: mpsc::Sender<Result<pb::ShipReply, Status>>,
}

impl StreamSession {
    /// Whether the partition holds the log this stream ships.
    fn follows(&self) -> bool {
        self.history.incarnation == self.shipped
    }

    /// A local id in the listener's numbering (only meaningful while the
    /// partition follows the stream's log).
    fn listener_id(&self, local: LogId) -> LogId {
        LogId(local.0.saturating_sub(self.history.id_base))
    }

    fn local_id(&self, listener: LogId) -> Result<LogId, ShipError> {
        listener
            .0
            .checked_add(self.history.id_base)
            .map(LogId)
            .ok_or_else(|| ShipError::invalid(format!("entry id {listener} overflows")))
    }

    async fn run(
        mut self,
        mut inbound: Streaming<pb::ShipMessage>,
        cancel: CancellationToken,
        running: OwnedMutexGuard<()>,
        session: u64,
    ) {
        loop {
            let queue_full = self.queued.len() >= MAX_QUEUED_APPENDS;
            let step = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    let error = if self.service.inner.shutdown.is_cancelled() {
                        ShipError::ShuttingDown
                    } else {
                        ShipError::Replaced
                    };
                    debug!(%error, "ship stream ended");
                    // Appends already queued still become durable; the next
                    // stream's Welcome reports them.
                    let _ = self.reply_tx.send(Err(error.into())).await;
                    break;
                }
                durable = async {
                    match self.queued.front_mut() {
                        Some(pending) => pending.await,
                        None => std::future::pending().await,
                    }
                }, if !self.queued.is_empty() => {
                    self.queued.pop_front();
                    self.appended(durable).await
                }
                message = inbound.message(), if !queue_full => match message {
                    Ok(Some(message)) => {
                        self.service.touch(self.partition);
                        self.handle(message).await
                    }
                    Ok(None) => {
                        debug!("listener closed the ship stream");
                        break;
                    }
                    Err(status) => {
                        debug!(%status, "ship stream broke");
                        break;
                    }
                },
            };
            match step {
                Ok(()) => {}
                Err(ShipError::StreamClosed) => break,
                Err(error) => {
                    warn!(%error, "ship stream failed");
                    let _ = self.reply_tx.send(Err(error.into())).await;
                    break;
                }
            }
        }
        // Queued appends must be resolved before the next stream reads the
        // partition's positions for its Welcome.
        while let Some(pending) = self.queued.pop_front() {
            let _ = pending.await;
        }
        self.service.release(self.partition, session);
        drop(running);
    }

    /// A queued append became durable: ack it.
    async fn appended(
        &mut self,
        durable: Result<crate::wal::AppendedRange, WalError>,
    ) -> Result<(), ShipError> {
        self.durable = durable?.last;
        self.ack().await
    }

    async fn ack(&mut self) -> Result<(), ShipError> {
        // Nothing of the stream's log is here before its snapshot.
        let durable = if self.follows() {
            self.listener_id(self.durable)
        } else {
            LogId::ZERO
        };
        let reply = pb::ShipReply {
            kind: Some(ship_reply::Kind::Ack(pb::Ack {
                durable_log_id: durable.0,
            })),
        };
        self.reply_tx
            .send(Ok(reply))
            .await
            .map_err(|_| ShipError::StreamClosed)
    }

    /// Waits for every queued append and acks it (before anything that
    /// must see them durable: a reset, a snapshot transfer).
    async fn drain_queue(&mut self) -> Result<(), ShipError> {
        let mut acked = false;
        while let Some(pending) = self.queued.pop_front() {
            self.durable = pending.await?.last;
            acked = true;
        }
        if acked {
            self.ack().await?;
        }
        Ok(())
    }

    async fn handle(&mut self, message: pb::ShipMessage) -> Result<(), ShipError> {
        match message.kind {
            Some(ship_message::Kind::Entries(batch)) => self.entries(&batch).await,
            Some(ship_message::Kind::SnapshotChunk(chunk)) => {
                self.drain_queue().await?;
                self.chunk(chunk).await
            }
            Some(ship_message::Kind::Hello(_)) => {
                Err(ShipError::invalid("Hello after the stream started"))
            }
            None => Err(ShipError::invalid("message without a kind")),
        }
    }

    async fn entries(&mut self, batch: &pb::EntryBatch) -> Result<(), ShipError> {
        let limits = self.service.inner.limits;
        let entries = wire::decode_batch(batch, &limits)?;
        let wal = self.service.inner.wal.clone();
        let mut run: Vec<NewEntry> = Vec::new();
        let mut run_first = LogId::ZERO;
        let mut queued_any = false;
        for decoded in entries {
            let follows = self.follows();
            if follows && self.local_id(decoded.log_id)? <= self.received {
                // Re-sent by a resumed stream: already here.
                continue;
            }
            if let Some(marker) = decoded.marker().cloned() {
                if !run.is_empty() {
                    let pending = wal
                        .submit_append_at(self.partition, run_first, std::mem::take(&mut run))
                        .await?;
                    self.queued.push_back(pending);
                }
                self.drain_queue().await?;
                self.marker(decoded, marker).await?;
                self.ack().await?;
                continue;
            }
            if !follows {
                return Err(ShipError::HistoryMismatch {
                    partition: self.partition,
                    owner: self.history.owner.clone(),
                    held: self.history.incarnation,
                    shipped: self.shipped,
                });
            }
            let local = self.local_id(decoded.log_id)?;
            if local != self.received.next() {
                return Err(ShipError::Gap {
                    partition: self.partition,
                    last: self.listener_id(self.received),
                    got: decoded.log_id,
                });
            }
            if run.is_empty() {
                run_first = local;
            }
            run.push(decoded.entry);
            self.received = local;
        }
        if !run.is_empty() {
            let pending = wal.submit_append_at(self.partition, run_first, run).await?;
            self.queued.push_back(pending);
            queued_any = true;
        }
        if !queued_any && self.queued.is_empty() {
            // Nothing new (a replay): ack what is durable so the listener
            // moves on.
            self.ack().await?;
        }
        Ok(())
    }

    async fn marker(
        &mut self,
        decoded: DecodedEntry,
        marker: SnapshotMarker,
    ) -> Result<(), ShipError> {
        let log_id = decoded.log_id;
        if marker.chunks == 0 {
            return Err(ShipError::invalid(format!(
                "snapshot marker at {log_id}: epoch {} has 0 chunks",
                marker.epoch
            )));
        }
        let local_epoch = self
            .epoch_base
            .and_then(|base| marker.epoch.checked_add(base));
        let delivered = self
            .received_snapshot
            .zip(local_epoch)
            .is_some_and(|((epoch, chunks), local)| epoch == local && chunks == marker.chunks);
        if !delivered {
            return Err(ShipError::invalid(format!(
                "snapshot marker at {log_id} names epoch {} with {} chunks, but this stream \
                 delivered {} before it (chunks must precede their marker)",
                marker.epoch,
                marker.chunks,
                match (self.received_snapshot, self.epoch_base) {
                    (Some((epoch, chunks)), Some(base)) =>
                        format!("epoch {} with {chunks} chunks", epoch.saturating_sub(base)),
                    _ => "no complete snapshot".to_string(),
                }
            )));
        }
        let Some(epoch) = local_epoch else {
            return Err(ShipError::invalid("snapshot marker without a transfer"));
        };
        // A marker of another log starts following that log: its ids go
        // above everything the partition held (module doc, "History").
        let (start, history) = if self.follows() {
            (self.local_id(log_id)?, None)
        } else {
            let id_base = self.received.0.saturating_add(1).saturating_sub(log_id.0);
            let history = PartitionHistory {
                owner: self.history.owner.clone(),
                incarnation: self.shipped,
                id_base,
                epoch_base: self.epoch_base.unwrap_or(0),
                log_tag: self.history.log_tag,
            };
            let start = log_id
                .0
                .checked_add(id_base)
                .map(LogId)
                .ok_or_else(|| ShipError::invalid(format!("marker id {log_id} overflows")))?;
            (start, Some(history))
        };
        let mut entry = decoded.entry;
        if epoch != marker.epoch {
            entry.payload = Record::Snapshot(SnapshotMarker {
                epoch,
                ..marker.clone()
            })
            .encode();
        }
        let wal = &self.service.inner.wal;
        wal.reset_partition_to(self.partition, start, entry, history.clone())
            .await?;
        self.durable = start;
        self.received = start;
        if let Some(history) = history {
            info!(
                partition = %self.partition,
                %log_id,
                local_id = %start,
                incarnation = format_args!("{:016x}", history.incarnation),
                "snapshot of another history stored: the partition follows it now"
            );
            self.history = history;
        }
        info!(partition = %self.partition, %log_id, epoch, "snapshot marker stored, log reset");
        // The old log is gone, so nothing refers to an older epoch any more
        // (its marker, if it had one, was the old log's first entry; an
        // epoch whose marker never came is superseded too). An applier still
        // loading one fails on the missing chunks and moves on to this
        // marker.
        let deleted = wal
            .collect_snapshots(self.partition, |stored| stored >= epoch)
            .await?;
        if !deleted.is_empty() {
            debug!(epochs = ?deleted, "deleted superseded snapshot epochs");
        }
        Ok(())
    }

    async fn chunk(&mut self, chunk: pb::SnapshotChunk) -> Result<(), ShipError> {
        let data = wire::decode_chunk(&chunk, &self.service.inner.limits)?;
        let wal = &self.service.inner.wal;
        let seq = chunk.seq;
        let base = match self.epoch_base {
            Some(base) => base,
            // Another log's first transfer on this stream: its epochs go
            // above every epoch the partition has.
            None if seq == 0 => {
                let base = self
                    .snapshot
                    .epoch
                    .saturating_add(1)
                    .saturating_sub(chunk.epoch);
                self.epoch_base = Some(base);
                base
            }
            None => {
                return Err(ShipError::invalid(format!(
                    "snapshot chunk {}/{seq} without a transfer (seq 0 starts one)",
                    chunk.epoch
                )))
            }
        };
        let epoch = chunk.epoch.checked_add(base).ok_or_else(|| {
            ShipError::invalid(format!("snapshot epoch {} overflows", chunk.epoch))
        })?;
        if seq == 0 {
            if epoch < self.snapshot.epoch {
                return Err(ShipError::invalid(format!(
                    "snapshot chunk {epoch}/0: epoch is older than the drainer's epoch {}",
                    self.snapshot.epoch
                )));
            }
            let rewrite_complete = self.snapshot
                == (SnapshotState {
                    epoch,
                    phase: SnapshotPhase::Complete,
                });
            if !rewrite_complete {
                if self.snapshot.phase == SnapshotPhase::Writing {
                    // An unfinished transfer (this epoch or an older one)
                    // may have left chunks past the new transfer's end.
                    wal.delete_snapshot(self.partition, self.snapshot.epoch)
                        .await?;
                }
                self.snapshot = SnapshotState {
                    epoch,
                    phase: SnapshotPhase::Writing,
                };
                wal.set_snapshot_state(self.partition, self.snapshot)
                    .await?;
            }
            self.received_snapshot = None;
        } else {
            match self.transfer {
                Some(transfer) if transfer.epoch == epoch && transfer.next_seq == seq => {}
                Some(transfer) => {
                    return Err(ShipError::invalid(format!(
                        "snapshot chunk {epoch}/{seq} out of order: expected {}/{}",
                        transfer.epoch, transfer.next_seq
                    )))
                }
                None => {
                    return Err(ShipError::invalid(format!(
                        "snapshot chunk {epoch}/{seq} without a transfer (seq 0 starts one)"
                    )))
                }
            }
        }
        wal.put_snapshot_chunk(self.partition, epoch, seq, data)
            .await?;
        if chunk.last {
            self.transfer = None;
            self.snapshot = SnapshotState {
                epoch,
                phase: SnapshotPhase::Complete,
            };
            wal.set_snapshot_state(self.partition, self.snapshot)
                .await?;
            self.received_snapshot = Some((epoch, seq + 1));
            debug!(epoch, chunks = seq + 1, "snapshot received");
        } else {
            self.transfer = Some(Transfer {
                epoch,
                next_seq: seq + 1,
            });
        }
        Ok(())
    }
}

/// Serves `service` on `listener` until `shutdown` fires, over TLS when
/// `tls` is given; then ends every stream and waits for them (so the WAL can
/// be closed afterwards).
pub async fn serve_drainer(
    listener: tokio::net::TcpListener,
    service: DrainerService,
    tls: Option<ServerTls>,
    shutdown: CancellationToken,
) -> Result<(), ShipError> {
    let keepalive = service.inner.config.keepalive.0;
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive))
        .add_service(service.clone().into_server());
    let stop = shutdown.clone();
    let sessions = service.clone();
    let stopped = async move {
        stop.cancelled().await;
        // Long-lived streams would hold the graceful shutdown forever.
        sessions.shutdown().await;
    };
    let served = match tls {
        Some(tls) => {
            server
                .serve_with_incoming_shutdown(tls.incoming(listener), stopped)
                .await
        }
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from_listener(
                listener,
                true,
                Some(keepalive),
            )
            .map_err(|error| ShipError::Config(format!("listening socket: {error}")))?;
            server.serve_with_incoming_shutdown(incoming, stopped).await
        }
    };
    service.shutdown().await;
    served.map_err(|error| ShipError::Config(format!("serving: {error}")))
}
