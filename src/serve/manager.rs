//! The tasks of `ferry serve`: each a `ferry sync` run in this process
//! ([`crate::node::run_sync_hosted`]), with its record in the task store.
//!
//! - **Create:** the spec is checked (400 on a bad field), the task stored
//!   as CREATED, its passwords written to files of mode 0600 in its
//!   directory, then PRECHECK: the precheck of `ferry precheck` (and, for
//!   two-way, the other way round). A FAIL stores FAILED with the table;
//!   otherwise the sync starts (FULL_SYNC).
//! - **Phase:** once a second each running task's status is read. It is
//!   FULL_SYNC while a source partition receives a snapshot or an applier
//!   of the source's partitions has not loaded one (two-way: also until
//!   its second direction is established), INCREMENTAL otherwise. Which
//!   partitions carry the target into the source ([`established_pair`]): none
//!   until a two-way task is established (its status shows `two_way`),
//!   then partition 1 between standalone servers, and those from
//!   [`crate::node::two_way::CLUSTER_BACKWARD_BASE`] with a cluster on
//!   either side (the sync's data dir holds the pair). A lag sample (largest LogId Lag
//!   and Time Latency) is kept every 2 s, 10 minutes of them.
//! - **Stop / start:** stop ends the task's stages (as SIGTERM ends `ferry
//!   sync`); start runs them again from the WAL (PSYNC where the source
//!   still has the offset). A sync that ends with an error is FAILED with
//!   it, until started again.
//! - **Cancel:** stop, delete the task's keys on the servers
//!   ([`super::cleanup`]), its directory, then its record.
//! - **Restart of the daemon:** tasks whose state runs are started again;
//!   STOPPED and FAILED stay so.
//!
//! State changes are stored (synced) before the API answers.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::cleanup;
use super::store::{StoreError, TaskStore};
use super::task::{
    password_file, sync_dir, Mode, PrecheckSummary, Side, SpecError, TaskRecord, TaskSpec,
    TaskState,
};
use crate::node::two_way::Pair;
use crate::node::{run_sync_hosted, sync_precheck, ControlSlot};
use crate::position::now_unix_ms;
use crate::precheck::Report;
use crate::status::NodeStatus;

/// How often running tasks' phases are read.
const PHASE_EVERY: Duration = Duration::from_secs(1);
/// A lag sample every this many phase readings.
const SAMPLE_EVERY: u32 = 2;
/// Lag samples kept per task (10 minutes).
const HISTORY: usize = 300;
/// How long the precheck samples the source's write rate.
const PRECHECK_SAMPLE: Duration = Duration::from_millis(500);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections assign whole values.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Why a task request failed; the HTTP layer maps each to its status.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("no task named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Precheck(String),
}

/// One lag sample (docs/API.md, `lag_history`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LagSample {
    pub unix_ms: u64,
    pub lag_entries: u64,
    pub latency_ms: u64,
}

/// A running sync of a task.
struct Running {
    stop: CancellationToken,
    done: JoinHandle<()>,
}

struct TaskEntry {
    record: Mutex<TaskRecord>,
    slot: ControlSlot,
    /// Held across a stop or start, so that they happen one at a time.
    run: tokio::sync::Mutex<Option<Running>>,
    history: Mutex<VecDeque<LagSample>>,
}

impl TaskEntry {
    fn new(record: TaskRecord) -> Arc<TaskEntry> {
        Arc::new(TaskEntry {
            record: Mutex::new(record),
            slot: ControlSlot::default(),
            run: tokio::sync::Mutex::new(None),
            history: Mutex::new(VecDeque::new()),
        })
    }
}

/// A task as the API shows it: its record, and a status reading when it
/// runs.
#[derive(Debug, Clone)]
pub struct TaskReading {
    pub record: TaskRecord,
    pub status: Option<NodeStatus>,
    /// An established two-way task's pair: which of the status's
    /// partitions are the target into the source ([`established_pair`]).
    pub pair: Option<Pair>,
    pub history: Vec<LagSample>,
}

pub struct Manager {
    tasks_dir: PathBuf,
    store: TaskStore,
    tasks: Mutex<BTreeMap<String, Arc<TaskEntry>>>,
    /// Creates and cancels, one at a time (a name is taken or freed).
    naming: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
}

/// The pair of a two-way task whose status shows it established (its
/// conflicts are counted from then on); `None` for a one-way task or one
/// not yet established, whose partitions all carry the source into the
/// target. The sync's data dir (`sync_dir`) holds the pair
/// ([`crate::node::two_way::stored_pair`]).
pub fn established_pair(mode: Mode, status: &NodeStatus, sync_dir: &Path) -> Option<Pair> {
    if mode != Mode::TwoWay || status.two_way.is_none() {
        return None;
    }
    match crate::node::two_way::stored_pair(sync_dir, None) {
        Ok(Some(pair)) => Some(pair),
        // Established means it was stored (or, from an older ferry, a
        // standalone pair's data dir without a shard map).
        Ok(None) => Some(Pair::Standalone),
        Err(error) => {
            warn!(dir = %sync_dir.display(), %error, "cannot read the two-way pair");
            None
        }
    }
}

/// Whether `partition` carries the target into the source (a two-way
/// task's backward direction, `pair` from [`established_pair`]).
pub fn is_backward(pair: Option<Pair>, partition: u32) -> bool {
    pair.is_some_and(|pair| pair.is_backward(crate::position::PartitionId(partition)))
}

/// The phase a running task's status shows (`pair` from [`established_pair`]).
pub fn phase(mode: Mode, status: &NodeStatus, pair: Option<Pair>) -> TaskState {
    let receiving = status
        .listeners
        .iter()
        .any(|l| l.source_state == "FULL_SYNC");
    let forward: Vec<_> = status
        .drainers
        .iter()
        .filter(|d| !is_backward(pair, d.partition))
        .collect();
    let loading = forward.is_empty()
        || forward
            .iter()
            .any(|d| d.epoch == 0 || d.snapshot_load.as_ref().is_some_and(|l| !l.done));
    let established = mode == Mode::OneWay || pair.is_some();
    match receiving || loading || !established {
        true => TaskState::FullSync,
        false => TaskState::Incremental,
    }
}

/// The largest LogId Lag and Time Latency of any applier.
pub fn lag(status: &NodeStatus) -> (u64, u64) {
    status.drainers.iter().fold((0, 0), |(lag, latency), d| {
        (lag.max(d.lag), latency.max(d.latency_ms))
    })
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

impl Manager {
    /// Opens the task store in `data_dir` and starts every task whose
    /// state runs.
    pub fn open(data_dir: &Path, shutdown: CancellationToken) -> Result<Arc<Manager>, TaskError> {
        create_private_dir(data_dir)
            .map_err(|e| TaskError::Io(format!("creating {}: {e}", data_dir.display())))?;
        let tasks_dir = data_dir.join("tasks");
        create_private_dir(&tasks_dir)
            .map_err(|e| TaskError::Io(format!("creating {}: {e}", tasks_dir.display())))?;
        let store = TaskStore::open(&data_dir.join("tasks.db"))?;
        let records = store.load()?;
        let manager = Arc::new(Manager {
            tasks_dir,
            store,
            tasks: Mutex::new(BTreeMap::new()),
            naming: tokio::sync::Mutex::new(()),
            shutdown,
        });
        for mut record in records {
            let name = record.name.clone();
            let resume = match record.state {
                TaskState::Stopped | TaskState::Failed => false,
                // Canceled but not yet removed when the daemon died: the
                // cancel is finished at the next one (`cancel`).
                TaskState::Canceled => false,
                // Stored before the precheck ended: it runs again, as
                // `ferry sync` prechecks a first full sync itself.
                TaskState::Created | TaskState::Precheck => {
                    record.state = TaskState::FullSync;
                    true
                }
                TaskState::FullSync | TaskState::Incremental => true,
            };
            let entry = TaskEntry::new(record);
            lock(&manager.tasks).insert(name.clone(), Arc::clone(&entry));
            if resume {
                info!(task = %name, "resuming task");
                let mut run = entry
                    .run
                    .try_lock()
                    .map_err(|_| TaskError::Conflict(format!("task {name:?} is being changed")))?;
                *run = Some(manager.spawn_run(&entry)?);
            }
        }
        let watcher = Arc::clone(&manager);
        tokio::spawn(async move { watcher.watch().await });
        Ok(manager)
    }

    fn task_dir(&self, name: &str) -> PathBuf {
        self.tasks_dir.join(name)
    }

    fn entry(&self, name: &str) -> Result<Arc<TaskEntry>, TaskError> {
        lock(&self.tasks)
            .get(name)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(name.to_string()))
    }

    /// Stores a change of `entry`'s record, then shows it.
    fn update(
        &self,
        entry: &TaskEntry,
        change: impl FnOnce(&mut TaskRecord),
    ) -> Result<TaskRecord, TaskError> {
        let mut record = lock(&entry.record).clone();
        change(&mut record);
        record.updated_unix_ms = now_unix_ms();
        self.store.put(&record)?;
        *lock(&entry.record) = record.clone();
        Ok(record)
    }

    /// Starts the task's sync; its end is recorded by [`Manager::ended`].
    fn spawn_run(self: &Arc<Self>, entry: &Arc<TaskEntry>) -> Result<Running, TaskError> {
        let mut record = lock(&entry.record).clone();
        let cfg = record.sync_config(&self.task_dir(&record.name))?;
        if !record.started {
            record = self.update(entry, |r| r.started = true)?;
        }
        let stop = self.shutdown.child_token();
        let manager = Arc::clone(self);
        let task = Arc::clone(entry);
        let token = stop.clone();
        let slot = entry.slot.clone();
        let span = tracing::info_span!("task", name = %record.name);
        let done = tokio::spawn(
            async move {
                let result = run_sync_hosted(cfg, token.clone(), slot).await;
                manager.ended(&task, result, &token);
            }
            .instrument(span),
        );
        Ok(Running { stop, done })
    }

    /// A task's sync ended: by a stop (whoever stopped it records the
    /// state), by the daemon's shutdown (the state stays, for the next
    /// start), or by itself (FAILED, with the error).
    fn ended(
        &self,
        entry: &TaskEntry,
        result: Result<(), crate::node::NodeError>,
        stop: &CancellationToken,
    ) {
        if stop.is_cancelled() && result.is_ok() {
            return;
        }
        let why = match result {
            Ok(()) => "the sync ended by itself".to_string(),
            Err(error) => error.to_string(),
        };
        if self.shutdown.is_cancelled() {
            warn!(%why, "task ended while the daemon stops");
            return;
        }
        error!(%why, "task failed");
        if let Err(error) = self.update(entry, |r| {
            r.state = TaskState::Failed;
            r.error = Some(why);
        }) {
            error!(%error, "cannot record a task's failure");
        }
    }

    /// Reads running tasks' phases and lag, once a second.
    async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PHASE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round: u32 = 0;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            round = round.wrapping_add(1);
            let entries: Vec<Arc<TaskEntry>> = lock(&self.tasks).values().cloned().collect();
            for entry in entries {
                let Some(control) = entry.slot.get() else {
                    continue;
                };
                let Ok(status) = tokio::task::spawn_blocking(move || control.status()).await else {
                    continue;
                };
                let record = lock(&entry.record).clone();
                if round % SAMPLE_EVERY == 0 {
                    let (lag_entries, latency_ms) = lag(&status);
                    let mut history = lock(&entry.history);
                    if history.len() == HISTORY {
                        history.pop_front();
                    }
                    history.push_back(LagSample {
                        unix_ms: status.taken_unix_ms,
                        lag_entries,
                        latency_ms,
                    });
                }
                let pair = established_pair(record.mode, &status, &self.sync_dir(&record.name));
                let now = phase(record.mode, &status, pair);
                let moving = matches!(record.state, TaskState::FullSync | TaskState::Incremental);
                if moving && now != record.state {
                    info!(task = %record.name, from = ?record.state, to = ?now, "task state");
                    if let Err(error) = self.update(&entry, |r| {
                        if matches!(r.state, TaskState::FullSync | TaskState::Incremental) {
                            r.state = now;
                        }
                    }) {
                        error!(%error, "cannot record a task's state");
                    }
                }
            }
        }
    }

    /// Every task, by name.
    pub async fn list(&self) -> Vec<TaskReading> {
        let entries: Vec<Arc<TaskEntry>> = lock(&self.tasks).values().cloned().collect();
        let mut readings = Vec::new();
        for entry in entries {
            readings.push(self.reading(&entry).await);
        }
        readings
    }

    /// One task.
    pub async fn get(&self, name: &str) -> Result<TaskReading, TaskError> {
        let entry = self.entry(name)?;
        Ok(self.reading(&entry).await)
    }

    async fn reading(&self, entry: &TaskEntry) -> TaskReading {
        let record = lock(&entry.record).clone();
        let status = match entry.slot.get() {
            Some(control) => tokio::task::spawn_blocking(move || control.status())
                .await
                .ok(),
            None => None,
        };
        let pair = status
            .as_ref()
            .and_then(|status| established_pair(record.mode, status, &self.sync_dir(&record.name)));
        TaskReading {
            record,
            status,
            pair,
            history: lock(&entry.history).iter().copied().collect(),
        }
    }

    /// Runs the precheck of a spec; nothing is stored.
    pub async fn precheck(&self, spec: &TaskSpec) -> Result<Report, TaskError> {
        spec.check(&self.tasks_dir)?;
        // The passwords go to a private scratch dir, for the config to read.
        let scratch = tempfile::Builder::new()
            .prefix(".precheck-")
            .tempdir_in(&self.tasks_dir)
            .map_err(|e| {
                TaskError::Io(format!(
                    "a scratch dir in {}: {e}",
                    self.tasks_dir.display()
                ))
            })?;
        self.write_passwords(scratch.path(), spec)?;
        let record = spec.record(now_unix_ms());
        let cfg = record.sync_config(scratch.path())?;
        sync_precheck(&cfg, PRECHECK_SAMPLE)
            .await
            .map_err(|e| TaskError::Precheck(e.to_string()))
    }

    fn write_passwords(&self, dir: &Path, spec: &TaskSpec) -> Result<(), TaskError> {
        create_private_dir(dir)
            .map_err(|e| TaskError::Io(format!("creating {}: {e}", dir.display())))?;
        for (side, password) in [
            (Side::Source, &spec.source_password),
            (Side::Target, &spec.target_password),
        ] {
            if let Some(password) = password {
                let path = password_file(dir, side);
                write_secret(&path, password)
                    .map_err(|e| TaskError::Io(format!("writing {}: {e}", path.display())))?;
            }
        }
        Ok(())
    }

    /// Creates a task: stored, prechecked, started when the precheck has
    /// no FAIL. Returns the task and the precheck (`None`: the precheck
    /// could not run; the task is FAILED with why).
    pub async fn create(
        self: &Arc<Self>,
        spec: TaskSpec,
    ) -> Result<(TaskReading, Option<Report>), TaskError> {
        spec.check(&self.tasks_dir)?;
        let naming = self.naming.lock().await;
        if lock(&self.tasks).contains_key(&spec.name) {
            return Err(TaskError::Conflict(format!(
                "a task named {:?} exists",
                spec.name
            )));
        }
        let dir = self.task_dir(&spec.name);
        if dir.exists() {
            // Left by a task whose record was never stored (a daemon that
            // died between the two): nothing of it ran.
            std::fs::remove_dir_all(&dir)
                .map_err(|e| TaskError::Io(format!("removing {}: {e}", dir.display())))?;
        }
        self.write_passwords(&dir, &spec)?;
        let record = spec.record(now_unix_ms());
        self.store.put(&record)?;
        let entry = TaskEntry::new(record);
        lock(&self.tasks).insert(spec.name.clone(), Arc::clone(&entry));
        drop(naming);
        info!(task = %spec.name, source = %spec.source, target = %spec.target, "task created");

        let mut run = entry.run.lock().await;
        self.update(&entry, |r| r.state = TaskState::Precheck)?;
        let cfg = lock(&entry.record)
            .clone()
            .sync_config(&self.task_dir(&spec.name))?;
        let report = match sync_precheck(&cfg, PRECHECK_SAMPLE).await {
            Ok(report) => report,
            Err(error) => {
                self.update(&entry, |r| {
                    r.state = TaskState::Failed;
                    r.error = Some(format!("the precheck cannot run: {error}"));
                })?;
                drop(run);
                return Ok((self.reading(&entry).await, None));
            }
        };
        let summary = PrecheckSummary {
            verdict: report.verdict().as_str().to_string(),
            table: report.render(),
        };
        if report.failed() {
            self.update(&entry, |r| {
                r.state = TaskState::Failed;
                r.error = Some(format!("precheck failed:\n{}", summary.table));
                r.precheck = Some(summary);
            })?;
        } else {
            self.update(&entry, |r| {
                r.state = TaskState::FullSync;
                r.precheck = Some(summary);
            })?;
            *run = Some(self.spawn_run(&entry)?);
        }
        drop(run);
        Ok((self.reading(&entry).await, Some(report)))
    }

    /// Stops a task's sync and waits for it to end.
    async fn halt(run: &mut Option<Running>) {
        if let Some(running) = run.take() {
            running.stop.cancel();
            if let Err(error) = running.done.await {
                error!(%error, "a task's sync panicked");
            }
        }
    }

    pub async fn stop(&self, name: &str) -> Result<TaskReading, TaskError> {
        let entry = self.entry(name)?;
        let mut run = entry.run.lock().await;
        Self::halt(&mut run).await;
        self.update(&entry, |r| {
            r.state = TaskState::Stopped;
            r.error = None;
        })?;
        drop(run);
        info!(task = %name, "task stopped");
        Ok(self.reading(&entry).await)
    }

    pub async fn start(self: &Arc<Self>, name: &str) -> Result<TaskReading, TaskError> {
        let entry = self.entry(name)?;
        let mut run = entry.run.lock().await;
        if run.as_ref().is_some_and(|r| !r.done.is_finished()) {
            return Err(TaskError::Conflict(format!("task {name:?} runs already")));
        }
        self.update(&entry, |r| {
            r.state = TaskState::FullSync;
            r.error = None;
        })?;
        *run = Some(self.spawn_run(&entry)?);
        drop(run);
        info!(task = %name, "task started");
        Ok(self.reading(&entry).await)
    }

    /// Cancels a task: stops it, removes its keys from the servers, its
    /// directory and its record. The keys go first: a cancel that cannot
    /// reach a server fails (409, naming it) and can be asked again, or
    /// `force`d: then the keys left are named in the reply and the log.
    pub async fn cancel(
        &self,
        name: &str,
        force: bool,
    ) -> Result<(TaskReading, Vec<String>), TaskError> {
        let entry = self.entry(name)?;
        let naming = self.naming.lock().await;
        let mut run = entry.run.lock().await;
        Self::halt(&mut run).await;
        let record = self.update(&entry, |r| r.state = TaskState::Canceled)?;
        let dir = self.task_dir(name);
        let cfg = record.sync_config(&dir)?;
        let mut servers = vec![(
            "target",
            cfg.apply.target_seeds().map_err(|e| {
                TaskError::Spec(SpecError {
                    field: "target".into(),
                    reason: e.to_string(),
                })
            }),
        )];
        servers.push((
            "source",
            cfg.listener
                .validate()
                .map(|checked| checked.seeds)
                .map_err(|e| {
                    TaskError::Spec(SpecError {
                        field: "source".into(),
                        reason: format!("{}: {}", e.field, e.reason),
                    })
                }),
        ));
        let mut left = Vec::new();
        // A task whose sync never started wrote nothing.
        let servers = match record.started {
            true => servers,
            false => Vec::new(),
        };
        for (side, seeds) in servers {
            let seeds = seeds?;
            match cleanup::remove_task_keys(&seeds, name).await {
                Ok(removed) => info!(task = %name, side, removed, "removed the task's keys"),
                Err(why) if force => {
                    let note = format!(
                        "the keys ferry wrote for {name:?} on the {side} (__ferry:*:{name}*) \
                         are left there: {why}"
                    );
                    warn!(task = %name, "{note}");
                    left.push(note);
                }
                Err(why) => {
                    return Err(TaskError::Conflict(format!(
                        "task {name:?} is stopped, but its keys on the {side} cannot be removed \
                         ({why}); cancel it again once the {side} answers, or with ?force=true \
                         to leave them"
                    )))
                }
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| TaskError::Io(format!("removing {}: {e}", dir.display())))?;
        }
        self.store.delete(name)?;
        lock(&self.tasks).remove(name);
        drop(run);
        drop(naming);
        info!(task = %name, "task canceled");
        Ok((
            TaskReading {
                record,
                status: None,
                pair: None,
                history: Vec::new(),
            },
            left,
        ))
    }

    /// Where a task's sync keeps its WAL and admin address.
    pub fn sync_dir(&self, name: &str) -> PathBuf {
        sync_dir(&self.task_dir(name))
    }

    /// Stops every task's sync (the daemon is shutting down; their states
    /// stay, for the next start).
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let entries: Vec<Arc<TaskEntry>> = lock(&self.tasks).values().cloned().collect();
        for entry in entries {
            let mut run = entry.run.lock().await;
            Self::halt(&mut run).await;
        }
    }
}
