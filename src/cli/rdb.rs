//! `ferry rdb dump` and `ferry rdb load`.
//!
//! What flows in: an RDB file. What flows out: JSON lines on a writer
//! ([`dump`]), or commands on a Redis connection and a [`LoadReport`]
//! ([`load`]).
//!
//! `load` runs the parse and the command generation
//! ([`crate::redis::rdb::rebuild`]) on a blocking thread and sends batches of
//! outputs over a bounded channel to the async sender, so memory stays
//! bounded whatever the file size: the channel holds at most
//! [`CHANNEL_BATCHES`] batches of at most [`BATCH_OUTPUTS`] outputs /
//! [`BATCH_BYTES`] bytes, and the connection at most `pipeline` commands or
//! `pipeline_bytes` bytes awaiting replies. Every reply is checked; an error
//! reply is a [`CommandFailure`] naming the command and key, and loading goes
//! on. `SELECT` is sent whenever the db of the next command changes (the
//! target URL's db is not used: keys keep the db the RDB gives them).

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::redis::client::{Client, ClientError};
use crate::redis::command::Command;
use crate::redis::rdb::dump_json::{escape_bytes, DumpError, DumpOptions, JsonDumper};
use crate::redis::rdb::rebuild::{
    unix_now_ms, Output, RebuildError, RebuildOptions, RebuildStats, Rebuilder, TargetCaps,
};
use crate::redis::rdb::{ParseOptions, RdbError, RdbParser};
use crate::redis::resp::encoded_command_len;
use crate::redis::url::{RedisUrl, UrlError};

/// Batches in flight between the parse thread and the sender.
pub const CHANNEL_BATCHES: usize = 4;
/// Most outputs in one batch.
pub const BATCH_OUTPUTS: usize = 512;
/// Approximate most bytes of command data in one batch.
pub const BATCH_BYTES: usize = 1 << 20;
/// Warnings and failures kept with details (all are counted).
pub const KEEP_DETAILS: usize = 100;

// ---------------------------------------------------------------- dump ----

#[derive(Debug, thiserror::Error)]
pub enum DumpCommandError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("RDB refused: {error}{} ({keys} keys were written before it)", where_refused(.error, *.offset))]
    Rdb {
        #[source]
        error: RdbError,
        keys: u64,
        /// Bytes the parser had consumed.
        offset: u64,
    },
    #[error(transparent)]
    Dump(#[from] DumpError),
}

/// Writes `file` as JSON lines to `out`; returns the number of keys.
pub fn dump<W: Write>(file: &Path, opts: DumpOptions, out: W) -> Result<u64, DumpCommandError> {
    let reader = File::open(file).map_err(|source| DumpCommandError::Open {
        path: file.to_path_buf(),
        source,
    })?;
    let mut parser = RdbParser::new(BufReader::new(reader), ParseOptions::default());
    let mut dumper = JsonDumper::new(out, opts);
    loop {
        match parser.next_event() {
            Ok(Some(event)) => dumper.feed(&event)?,
            Ok(None) => break,
            Err(error) => {
                let keys = dumper.keys();
                let offset = parser.offset();
                // Whole lines stay valid JSON; a partly written key line is
                // ended so the error does not run into it.
                let _ = dumper.abort();
                return Err(DumpCommandError::Rdb {
                    error,
                    keys,
                    offset,
                });
            }
        }
    }
    let keys = dumper.keys();
    dumper.finish()?;
    Ok(keys)
}

/// [`dump`] to stdout; a closed stdout (`| head`) ends the dump quietly.
pub fn dump_to_stdout(file: &Path, opts: DumpOptions) -> Result<(), DumpCommandError> {
    let stdout = std::io::stdout().lock();
    match dump(
        file,
        opts,
        std::io::BufWriter::with_capacity(1 << 16, stdout),
    ) {
        Err(DumpCommandError::Dump(DumpError::Io(e)))
            if e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

// ---------------------------------------------------------------- load ----

/// Settings of one `rdb load`.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub file: PathBuf,
    pub target: RedisUrl,
    /// See [`RebuildOptions::replace`].
    pub replace: bool,
    /// See [`RebuildOptions::restore_max_bytes`]; default 1 MiB.
    pub restore_max_bytes: usize,
    /// Most commands awaiting a reply; default 1000.
    pub pipeline: usize,
    /// Most bytes of commands awaiting a reply; default 4 MiB.
    pub pipeline_bytes: usize,
    /// Most elements per rebuild command; default 1000.
    pub chunk_items: usize,
    /// Approximate most bytes per rebuild command; default 1 MiB.
    pub chunk_bytes: usize,
    /// "Now" for expiry decisions, unix ms; default the clock at start.
    pub now_ms: Option<i64>,
}

impl LoadConfig {
    pub fn new(file: PathBuf, target: RedisUrl) -> LoadConfig {
        LoadConfig {
            file,
            target,
            replace: false,
            restore_max_bytes: 1 << 20,
            pipeline: 1000,
            pipeline_bytes: 4 << 20,
            chunk_items: 1000,
            chunk_bytes: 1 << 20,
            now_ms: None,
        }
    }
}

/// What stopped a load before the end of the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("target {target}: {source}")]
    Client {
        target: String,
        #[source]
        source: ClientError,
    },
    #[error("target {target}: {source}")]
    TargetVersion {
        target: String,
        #[source]
        source: RebuildError,
    },
    #[error("the RDB parse thread died: {0}")]
    ParseThread(String),
    /// The file was refused part-way (or at its header).
    #[error("{0}")]
    Refused(Box<ParseFailed>),
    #[error("{failed} of {sent} commands failed on the target (see the summary)")]
    CommandsFailed { failed: u64, sent: u64 },
}

/// A parse (or event-order) error, and how far the load had got.
#[derive(Debug)]
pub struct ParseFailed {
    pub error: ParseFailure,
    /// Keys fully written (and acknowledged) before the error.
    pub keys_loaded: u64,
    /// The key whose commands had partly gone out when the error came.
    pub partial_key: Option<(u32, Bytes)>,
    /// Bytes the parser had consumed.
    pub offset: u64,
}

impl fmt::Display for ParseFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RDB refused: {}", self.error)?;
        match &self.error {
            ParseFailure::Rdb(e) => write!(f, "{}; ", where_refused(e, self.offset))?,
            ParseFailure::Rebuild(_) => write!(f, " at byte {}; ", self.offset)?,
        }
        match self.keys_loaded {
            0 => write!(f, "no key was loaded")?,
            1 => write!(f, "1 key was loaded before the error")?,
            n => write!(f, "{n} keys were loaded before the error")?,
        }
        if let Some((db, key)) = &self.partial_key {
            write!(
                f,
                ", and key {} in db {db} is partly written",
                show_key(key)
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParseFailure {
    #[error(transparent)]
    Rdb(#[from] RdbError),
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
}

/// A warning from [`Output::Warning`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoadWarning {
    pub db: u32,
    pub key: Option<Bytes>,
    pub what: String,
}

/// A command the target answered with an error.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandFailure {
    pub db: Option<u32>,
    pub command: String,
    pub key: Option<Bytes>,
    pub message: String,
}

/// The outcome of a load that reached the target.
#[derive(Debug)]
pub struct LoadReport {
    pub target: TargetCaps,
    pub stats: RebuildStats,
    /// The first [`KEEP_DETAILS`] warnings; `stats.warnings` counts all.
    pub warnings: Vec<LoadWarning>,
    /// The first [`KEEP_DETAILS`] failures; `failures_total` counts all.
    pub failures: Vec<CommandFailure>,
    pub failures_total: u64,
    /// Commands sent, including `SELECT`s.
    pub commands_sent: u64,
    pub parse_error: Option<ParseFailed>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn is_success(&self) -> bool {
        self.parse_error.is_none() && self.failures_total == 0
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        let (major, minor, patch) = self.target.version;
        writeln!(
            f,
            "target redis {major}.{minor}.{patch} (RESTORE up to RDB {})",
            self.target.rdb_version
        )?;
        writeln!(
            f,
            "keys: {} restored, {} rebuilt; skipped: {} expired, {} empty, {} unsupported; functions: {}",
            s.keys_restored,
            s.keys_rebuilt,
            s.expired_skipped,
            s.empty_skipped,
            s.unsupported_skipped,
            s.functions
        )?;
        writeln!(
            f,
            "commands: {} sent, {} failed; {:.2}s",
            self.commands_sent,
            self.failures_total,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "warnings: {}", s.warnings)?;
        for w in &self.warnings {
            match &w.key {
                Some(key) => writeln!(
                    f,
                    "  warning: db {} key {}: {}",
                    w.db,
                    show_key(key),
                    w.what
                )?,
                None => writeln!(f, "  warning: {}", w.what)?,
            }
        }
        if s.warnings > self.warnings.len() as u64 {
            writeln!(
                f,
                "  … and {} more warnings",
                s.warnings - self.warnings.len() as u64
            )?;
        }
        for e in &self.failures {
            write!(f, "  failed: {}", e.command)?;
            if let Some(key) = &e.key {
                write!(f, " {}", show_key(key))?;
            }
            if let Some(db) = e.db {
                write!(f, " (db {db})")?;
            }
            writeln!(f, ": {}", e.message)?;
        }
        if self.failures_total > self.failures.len() as u64 {
            writeln!(
                f,
                "  … and {} more failures",
                self.failures_total - self.failures.len() as u64
            )?;
        }
        Ok(())
    }
}

/// Where a refusal happened, for the errors whose message does not say.
fn where_refused(error: &RdbError, parser_offset: u64) -> String {
    match error {
        RdbError::UnsupportedVersion { .. } => " at byte 0 (the 9-byte header)".to_string(),
        RdbError::ChecksumMismatch { .. } => {
            format!(" (checksum trailer ending at byte {parser_offset})")
        }
        _ => String::new(),
    }
}

/// A key for humans: as text when UTF-8, else escaped (see `dump_json`).
fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => format!("{text:?}"),
        Err(_) => format!("\"{}\"", escape_bytes(key)),
    }
}

/// Runs [`load`], prints its summary to stdout, and turns a refused file or
/// failed commands into an error.
pub async fn load_and_report(config: &LoadConfig) -> Result<LoadReport, LoadError> {
    let mut report = load(config).await?;
    print!("{report}");
    if let Some(failed) = report.parse_error.take() {
        return Err(LoadError::Refused(Box::new(failed)));
    }
    if report.failures_total > 0 {
        return Err(LoadError::CommandsFailed {
            failed: report.failures_total,
            sent: report.commands_sent,
        });
    }
    Ok(report)
}

/// How the parse thread stopped early: the error, the partly written key,
/// and the parser's byte offset.
type StreamFailure = (ParseFailure, Option<(u32, Bytes)>, u64);

/// Messages from the parse thread.
enum Feed {
    Batch(Vec<Output>),
    Done {
        stats: RebuildStats,
        error: Option<StreamFailure>,
    },
}

/// Loads `config.file` into `config.target`. Setup problems and a lost
/// connection are errors; a refused file and failed commands are in the
/// report.
pub async fn load(config: &LoadConfig) -> Result<LoadReport, LoadError> {
    let started = Instant::now();
    let file = File::open(&config.file).map_err(|source| LoadError::Open {
        path: config.file.clone(),
        source,
    })?;
    let target_name = config.target.to_string();
    let client_err = |source| LoadError::Client {
        target: target_name.clone(),
        source,
    };
    let mut client = Client::connect(&config.target).await.map_err(client_err)?;
    let info = client.info("server").await.map_err(client_err)?;
    let caps = TargetCaps::from_info(&info).map_err(|source| LoadError::TargetVersion {
        target: target_name.clone(),
        source,
    })?;
    info!(file = %config.file.display(), target = %target_name, ?caps, "rdb load starting");

    let rebuild_opts = RebuildOptions {
        target: caps,
        restore_max_bytes: config.restore_max_bytes,
        chunk_items: config.chunk_items,
        chunk_bytes: config.chunk_bytes,
        replace: config.replace,
        now_ms: config.now_ms.unwrap_or_else(unix_now_ms),
        strings_by_set: false,
    };
    let parse_opts = ParseOptions {
        raw_capture_limit: config.restore_max_bytes,
        ..ParseOptions::default()
    };
    let (feed_tx, mut feed_rx) = mpsc::channel::<Feed>(CHANNEL_BATCHES);
    let parse_thread = tokio::task::spawn_blocking(move || {
        parse_and_rebuild(BufReader::new(file), parse_opts, rebuild_opts, &feed_tx)
    });

    let mut sender = Sender {
        client,
        db: None,
        in_flight: VecDeque::new(),
        in_flight_bytes: 0,
        max_in_flight: config.pipeline.max(1),
        max_in_flight_bytes: config.pipeline_bytes.max(1),
        warnings: Vec::new(),
        failures: Vec::new(),
        failures_total: 0,
        sent: 0,
    };
    let mut outcome = None;
    let result: Result<(), ClientError> = async {
        while let Some(feed) = feed_rx.recv().await {
            match feed {
                Feed::Batch(outputs) => {
                    for output in outputs {
                        sender.output(output).await?;
                    }
                }
                Feed::Done { stats, error } => outcome = Some((stats, error)),
            }
        }
        sender.drain(0).await
    }
    .await;
    // On a lost connection the receiver is dropped here, which stops the
    // parse thread at its next send.
    drop(feed_rx);
    parse_thread
        .await
        .map_err(|e| LoadError::ParseThread(e.to_string()))?;
    result.map_err(client_err)?;
    let (stats, error) =
        outcome.ok_or_else(|| LoadError::ParseThread("ended without a result".into()))?;
    let parse_error = error.map(|(error, partial_key, offset)| ParseFailed {
        error,
        keys_loaded: stats.keys_loaded(),
        partial_key,
        offset,
    });
    let report = LoadReport {
        target: caps,
        stats,
        warnings: sender.warnings,
        failures: sender.failures,
        failures_total: sender.failures_total,
        commands_sent: sender.sent,
        parse_error,
        elapsed: started.elapsed(),
    };
    info!(
        restored = report.stats.keys_restored,
        rebuilt = report.stats.keys_rebuilt,
        failed = report.failures_total,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "rdb load finished"
    );
    Ok(report)
}

/// The parse thread: events → outputs → batches on `feed_tx`.
fn parse_and_rebuild<R: std::io::Read>(
    reader: R,
    parse_opts: ParseOptions,
    rebuild_opts: RebuildOptions,
    feed_tx: &mpsc::Sender<Feed>,
) {
    let mut parser = RdbParser::new(reader, parse_opts);
    let mut rebuilder = Rebuilder::new(rebuild_opts);
    let mut batch = Vec::new();
    let mut batch_bytes = 0usize;
    let error = loop {
        let event = match parser.next_event() {
            Ok(Some(event)) => event,
            Ok(None) => break None,
            Err(e) => break Some(ParseFailure::from(e)),
        };
        let fed = rebuilder.feed_with(event, &mut |output| {
            if let Output::Command { cmd, .. } | Output::Global { cmd } = &output {
                batch_bytes += cmd.data_len();
            }
            batch.push(output);
        });
        if let Err(e) = fed {
            break Some(ParseFailure::from(e));
        }
        if batch.len() >= BATCH_OUTPUTS || batch_bytes >= BATCH_BYTES {
            batch_bytes = 0;
            if feed_tx
                .blocking_send(Feed::Batch(std::mem::take(&mut batch)))
                .is_err()
            {
                // The sender gave up (connection lost); it reports why.
                return;
            }
        }
    };
    if !batch.is_empty() && feed_tx.blocking_send(Feed::Batch(batch)).is_err() {
        return;
    }
    let partial = rebuilder.partial_key().map(|(db, key)| (db, key.clone()));
    let stats = rebuilder.stats().clone();
    let offset = parser.offset();
    let error = match error {
        Some(e) => Some((e, partial, offset)),
        None => rebuilder
            .finish()
            .err()
            .map(|e| (ParseFailure::from(e), partial, offset)),
    };
    let _ = feed_tx.blocking_send(Feed::Done { stats, error });
}

/// What a reply will be matched against.
struct InFlight {
    db: Option<u32>,
    command: String,
    key: Option<Bytes>,
    bytes: usize,
}

/// The pipelined writer to the target.
struct Sender {
    client: Client,
    db: Option<u32>,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
    max_in_flight: usize,
    max_in_flight_bytes: usize,
    warnings: Vec<LoadWarning>,
    failures: Vec<CommandFailure>,
    failures_total: u64,
    sent: u64,
}

impl Sender {
    async fn output(&mut self, output: Output) -> Result<(), ClientError> {
        match output {
            Output::Command { db, cmd } => {
                if self.db != Some(db) {
                    let select = Command::from_parts([b"SELECT".to_vec(), db.to_string().into()]);
                    self.send(Some(db), &select).await?;
                    self.db = Some(db);
                }
                self.send(Some(db), &cmd).await
            }
            Output::Global { cmd } => self.send(None, &cmd).await,
            Output::Warning { db, key, what } => {
                debug!(db, key = ?key.as_ref().map(|k| show_key(k)), what, "rdb load warning");
                if self.warnings.len() < KEEP_DETAILS {
                    self.warnings.push(LoadWarning { db, key, what });
                }
                Ok(())
            }
        }
    }

    async fn send(&mut self, db: Option<u32>, cmd: &Command) -> Result<(), ClientError> {
        let bytes = encoded_command_len(&cmd.args);
        let command = String::from_utf8_lossy(cmd.name()).to_uppercase();
        // The key is the first argument, except for the two-word commands.
        let key_at = if cmd.is("XGROUP") { 2 } else { 1 };
        let key = match command.as_str() {
            "SELECT" | "FUNCTION" => None,
            _ => cmd.args.get(key_at).cloned(),
        };
        self.client.queue(cmd);
        self.sent += 1;
        self.in_flight.push_back(InFlight {
            db,
            command,
            key,
            bytes,
        });
        self.in_flight_bytes += bytes;
        if self.in_flight.len() >= self.max_in_flight
            || self.in_flight_bytes >= self.max_in_flight_bytes
        {
            // Read down to half the window so that writes and reads overlap
            // in large steps rather than one reply at a time.
            self.drain(self.max_in_flight / 2).await?;
        }
        Ok(())
    }

    /// Flushes, then reads replies until at most `keep` commands (and half
    /// the byte window) await one.
    async fn drain(&mut self, keep: usize) -> Result<(), ClientError> {
        self.client.flush().await?;
        while self.in_flight.len() > keep
            || (keep > 0 && self.in_flight_bytes > self.max_in_flight_bytes / 2)
        {
            let reply = self.client.read_reply().await?;
            let Some(sent) = self.in_flight.pop_front() else {
                break;
            };
            self.in_flight_bytes -= sent.bytes;
            if let Some(message) = reply.error_message() {
                self.failures_total += 1;
                if self.failures.len() < KEEP_DETAILS {
                    self.failures.push(CommandFailure {
                        db: sent.db,
                        command: sent.command,
                        key: sent.key,
                        message,
                    });
                }
            }
        }
        Ok(())
    }
}
