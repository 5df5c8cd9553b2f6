//! `ferry status`, `ferry stop-sync`, `ferry restart-sync` and `ferry
//! skip`: the admin API's client verbs.
//!
//! In: the address of a running ferry process (`--admin ADDR`, or
//! `--data-dir DIR` whose `admin.url` or `admin.addr` the process wrote;
//! default [`DEFAULT_ADMIN_ADDR`]; `https://HOST:PORT` for an admin API
//! with TLS, verified against `--ca-file`), and its bearer token
//! (`--token-file`). Out: on stdout, the process's status as two
//! tables in the style of NebulaGraph's `SHOW SYNC STATUS` /
//! `SHOW DRAINER SYNC STATUS` ([`render_status`]) or as one JSON object per
//! reading (`--json`: the serde form of [`NodeStatus`], field names as in
//! `src/status.rs`); for the control verbs, how many syncs changed (shippers, or the appliers of a `ferry sync` reading the listener's WAL); for
//! `ferry skip`, whether the entry was skipped and the dead-letter file
//! that holds it.
//!
//! `--watch SECS` repeats the reading; on a terminal it redraws the screen
//! and shows full-sync progress as bars, elsewhere it appends plain
//! readings (JSON: one object per line). A failed reading while watching is
//! printed and retried at the next tick; without `--watch` it is the verb's
//! error (non-zero exit).

use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::admin::{self, AdminError, DEFAULT_ADMIN_ADDR};
use crate::config_units::HumanDuration;
use crate::status::{
    DrainerSide, ListenerSide, NodeStatus, SkipOutcome, SkipRequest, SwitchoverReport, SyncSelector,
};
use crate::table::table;

/// Which process to talk to.
#[derive(Debug, Clone, Default, Args)]
pub struct AdminTarget {
    /// Admin API address of the ferry process, HOST:PORT, or
    /// https://HOST:PORT for one with TLS [default: 127.0.0.1:7390].
    #[arg(long, value_name = "ADDR", conflicts_with = "data_dir")]
    pub admin: Option<String>,
    /// Data dir of the ferry process: its admin address is read from
    /// DIR/admin.url (else DIR/admin.addr).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A file holding the admin API's bearer token (the process's
    /// admin-token-file).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// For https:// addresses: the PEM CA certificate(s) the process's
    /// certificate must chain to [default: the system's roots].
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl AdminTarget {
    /// The address to connect to.
    pub fn resolve(&self) -> Result<String, AdminError> {
        match (&self.admin, &self.data_dir) {
            (Some(addr), _) => Ok(addr.clone()),
            (None, Some(dir)) => admin::read_admin_url(dir),
            (None, None) => Ok(DEFAULT_ADMIN_ADDR.to_string()),
        }
    }

    /// The token and CA the calls go with.
    pub fn access(&self) -> Result<admin::ClientAccess, StatusCommandError> {
        let token = self
            .token_file
            .as_deref()
            .map(|path| crate::secret::read_secret_file("--token-file", path))
            .transpose()
            .map_err(|error| StatusCommandError::Access(error.to_string()))?;
        Ok(admin::ClientAccess {
            token: token.map(crate::secret::Secret::new),
            ca_file: self.ca_file.clone(),
        })
    }
}

/// `ferry status` arguments.
#[derive(Debug, Clone, Default, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print the status as one JSON object (one per line with --watch).
    #[arg(long)]
    pub json: bool,
    /// Repeat every SECS seconds (fractions allowed) until interrupted.
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    pub watch: Option<Duration>,
}

/// `ferry stop-sync` / `ferry restart-sync` arguments.
#[derive(Debug, Clone, Default, Args)]
pub struct SyncControlArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Only this listener partition [default: every partition].
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// Only the sync to this drainer id (ferry sync: its --id) [default:
    /// every drainer].
    #[arg(long = "drainer", value_name = "ID")]
    pub drainer: Option<String>,
}

impl SyncControlArgs {
    pub fn selector(&self) -> SyncSelector {
        SyncSelector {
            partition: self.partition,
            drainer_id: self.drainer.clone(),
        }
    }
}

/// `ferry skip` arguments.
#[derive(Debug, Clone, Default, Args)]
pub struct SkipArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The partition whose applier is blocked.
    #[arg(long, value_name = "P")]
    pub partition: u32,
    /// The entry it is blocked on (`blocked.log_id` in `ferry status --json`);
    /// any other is refused.
    #[arg(long, value_name = "N")]
    pub log_id: u64,
    /// The drainer whose applier it is [default: the process's only one].
    #[arg(long = "drainer", value_name = "ID")]
    pub drainer: Option<String>,
}

/// `ferry switchover` arguments.
#[derive(Debug, Clone, Args)]
pub struct SwitchoverArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Longest time writes on the source stay paused waiting for the target
    /// to catch up; past it the switchover is undone, the source unpaused,
    /// and the sync goes on in its old direction (at most 600s).
    #[arg(long, default_value = "30s")]
    pub timeout: HumanDuration,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}
/// Why a status or control verb failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusCommandError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("cannot write to stdout: {0}")]
    Output(#[source] io::Error),
    #[error("cannot encode the status as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("switchover failed, the sync runs on in its old direction: {0}")]
    Switchover(String),
    #[error("{0}")]
    Access(String),
}

/// How [`render_status`] draws progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenderStyle {
    /// Draw `[#####.....] 42%` bars for full syncs in progress.
    pub progress_bars: bool,
}

/// Parses `--watch`: positive seconds, fractions allowed, at least 0.1.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !secs.is_finite() || !(0.1..=86_400.0).contains(&secs) {
        return Err(format!(
            "{text:?}: the interval must be 0.1 to 86400 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `ferry status`.
pub fn status(args: &StatusArgs) -> Result<(), StatusCommandError> {
    let runtime = runtime()?;
    match args.watch {
        None => {
            let access = args.target.access()?;
            let status = runtime.block_on(fetch(&args.target, &access))?;
            let text = if args.json {
                serde_json::to_string(&status)? + "\n"
            } else {
                let style = RenderStyle::default();
                render_status(&status, crate::position::now_unix_ms(), style)
            };
            write_stdout(&text)
        }
        Some(interval) => runtime.block_on(watch(args, interval)),
    }
}

/// `ferry stop-sync`.
pub fn stop_sync(args: &SyncControlArgs) -> Result<(), StatusCommandError> {
    let selector = args.selector();
    let access = args.target.access()?;
    let changed = runtime()?.block_on(async {
        let addr = args.target.resolve()?;
        admin::stop_sync(&addr, &access, &selector).await
    })?;
    write_stdout(&control_summary("stopped", changed, &selector))
}

/// `ferry restart-sync`.
pub fn restart_sync(args: &SyncControlArgs) -> Result<(), StatusCommandError> {
    let selector = args.selector();
    let access = args.target.access()?;
    let changed = runtime()?.block_on(async {
        let addr = args.target.resolve()?;
        admin::restart_sync(&addr, &access, &selector).await
    })?;
    write_stdout(&control_summary("restarted", changed, &selector))
}

/// `ferry skip`.
pub fn skip(args: &SkipArgs) -> Result<(), StatusCommandError> {
    let request = SkipRequest {
        partition: args.partition,
        log_id: args.log_id,
        drainer_id: args.drainer.clone(),
    };
    let access = args.target.access()?;
    let outcome = runtime()?.block_on(async {
        let addr = args.target.resolve()?;
        admin::skip(&addr, &access, &request).await
    })?;
    write_stdout(&skip_summary(&request, &outcome))
}

/// `ferry switchover`: prints every step; exit code 1 when it failed.
pub fn switchover(args: &SwitchoverArgs) -> Result<(), StatusCommandError> {
    let access = args.target.access()?;
    let report = runtime()?.block_on(async {
        let addr = args.target.resolve()?;
        admin::switchover(&addr, &access, args.timeout.0).await
    })?;
    let text = if args.json {
        serde_json::to_string(&report)? + "\n"
    } else {
        render_switchover(&report)
    };
    write_stdout(&text)?;
    match report.error {
        Some(error) => Err(StatusCommandError::Switchover(clean(&error))),
        None => Ok(()),
    }
}

fn render_switchover(report: &SwitchoverReport) -> String {
    let rows: Vec<Vec<String>> = report
        .steps
        .iter()
        .map(|step| {
            vec![
                clean(&step.name),
                step.millis.to_string(),
                clean(&step.detail),
            ]
        })
        .collect();
    let mut out = String::new();
    table(&mut out, &["step", "ms", "detail"], &rows);
    let direction = format!("{} -> {}", clean(&report.source), clean(&report.target));
    match &report.error {
        None => {
            let _ = writeln!(
                out,
                "switched over: the sync now replicates {direction}; writes on the old source were \
                 paused {} ms. Point writers at {}.",
                report.write_pause_ms,
                clean(&report.source)
            );
        }
        Some(_) if report.write_pause_ms > 0 => {
            let _ = writeln!(
                out,
                "not switched over: the sync replicates {direction}; writes on the source were \
                 paused {} ms and are unpaused.",
                report.write_pause_ms
            );
        }
        Some(_) => {
            let _ = writeln!(out, "not switched over: the sync replicates {direction}.");
        }
    }
    out
}

fn skip_summary(request: &SkipRequest, outcome: &SkipOutcome) -> String {
    let file = clean(&outcome.dead_letter_file);
    let (partition, log_id) = (request.partition, request.log_id);
    if outcome.done {
        format!("skipped entry {log_id} of partition {partition}; recorded in {file}\n")
    } else {
        format!(
            "entry {log_id} of partition {partition} will be skipped when the applier next gets \
             to it (ferry status shows it); it is recorded in {file} first\n"
        )
    }
}

fn control_summary(done: &str, changed: u32, selector: &SyncSelector) -> String {
    let noun = if changed == 1 { "sync" } else { "syncs" };
    let mut which = String::new();
    if let Some(partition) = selector.partition {
        let _ = write!(which, " partition {partition}");
    }
    if let Some(drainer) = &selector.drainer_id {
        let _ = write!(which, " drainer {}", clean(drainer));
    }
    if which.is_empty() {
        which.push_str(" all");
    }
    format!("{done} {changed} {noun} (selected:{which})\n")
}

async fn fetch(
    target: &AdminTarget,
    access: &admin::ClientAccess,
) -> Result<NodeStatus, AdminError> {
    let addr = target.resolve()?;
    admin::fetch_status(&addr, access).await
}

async fn watch(args: &StatusArgs, interval: Duration) -> Result<(), StatusCommandError> {
    let redraw = io::stdout().is_terminal() && !args.json;
    let style = RenderStyle {
        progress_bars: redraw,
    };
    let access = args.target.access()?;
    loop {
        // The address is resolved on every tick: a restarted process may
        // have written a new one into its data dir.
        let reading = fetch(&args.target, &access).await;
        let now = crate::position::now_unix_ms();
        let text = match (&reading, args.json) {
            (Ok(status), true) => serde_json::to_string(status)? + "\n",
            (Ok(status), false) => render_status(status, now, style),
            (Err(error), true) => {
                eprintln!("error: {error}");
                String::new()
            }
            (Err(error), false) => format!("error: {error}\n"),
        };
        if redraw {
            // Home the cursor and clear the screen, then the new reading.
            write_stdout(&format!(
                "\x1b[H\x1b[2Jevery {:.1} s (Ctrl-C to stop)\n\n{text}",
                interval.as_secs_f64()
            ))?;
        } else if args.json {
            write_stdout(&text)?;
        } else {
            write_stdout(&format!("{text}\n"))?;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

fn write_stdout(text: &str) -> Result<(), StatusCommandError> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `ferry status | head` is not a failure of ferry.
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(StatusCommandError::Output),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, StatusCommandError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StatusCommandError::Runtime)
}

/// The status as text: a heading, then the listener → drainer section and
/// the drainer → target section, each with one line per partition (link
/// state, positions, full-sync progress), a table in the style of
/// NebulaGraph's `SHOW SYNC STATUS`, and the errors last. `now_unix_ms`
/// only dates the reading. Strings from the node are shown with control
/// characters escaped, so a hostile status cannot drive the terminal.
pub fn render_status(status: &NodeStatus, now_unix_ms: u64, style: RenderStyle) -> String {
    let mut out = String::new();
    let role = if status.role.is_empty() {
        "unknown".to_string()
    } else {
        clean(&status.role)
    };
    let age = now_unix_ms.saturating_sub(status.taken_unix_ms);
    let _ = writeln!(out, "ferry {role}: status taken {age} ms ago");
    out.push('\n');
    // A `ferry sync` whose appliers read the listener's WAL: no shipper.
    let direct = status.role == "sync"
        && !status.listeners.is_empty()
        && status.listeners.iter().all(|side| side.shipping.is_empty());
    render_listeners(&mut out, &status.listeners, style, direct);
    out.push('\n');
    render_drainers(&mut out, &status.drainers, style, direct);
    if let Some(two_way) = &status.two_way {
        let (a, b) = match status.role.as_str() {
            "site" => ("side a", "side b"),
            _ => ("source", "target"),
        };
        let (forward, backward) = match two_way.pair.as_str() {
            "clusters" => ("partitions below 1000", "partitions from 1000"),
            "standalone-cluster" => ("partition 0", "partitions from 1000"),
            "cluster-standalone" => ("partitions below 1000", "partition 1000"),
            _ => ("partition 0", "partition 1"),
        };
        let directions = format!("{forward} {a} → {b}, {backward} {b} → {a}");
        let _ = write!(
            out,
            "\nTwo-way: {directions}; {} conflict(s) (one key written on both sides before \
             either saw the other's write), logged in {}",
            two_way.conflicts,
            clean(&two_way.conflict_log)
        );
        if let Some(last) = &two_way.last_conflict {
            let _ = write!(out, "; latest: {}", clean(last));
        }
        if two_way.policy != "report" && !two_way.policy.is_empty() {
            let _ = write!(
                out,
                "; policy {}: {} repaired, {} waiting",
                clean(&two_way.policy),
                two_way.repaired,
                two_way.repairs_owed
            );
        }
        if two_way.unexamined > 0 {
            let _ = write!(
                out,
                "; WARNING: {} entries not examined (trimmed before the detector read them, or a \
                 full window)",
                two_way.unexamined
            );
        }
        out.push('\n');
    }
    out
}

fn render_listeners(
    out: &mut String,
    listeners: &[ListenerSide],
    style: RenderStyle,
    direct: bool,
) {
    out.push_str(match direct {
        true => "Source → listener WAL\n",
        false => "Listener → drainer\n",
    });
    if listeners.is_empty() {
        out.push_str("  (no listener in this process)\n");
        return;
    }
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    // A cluster source: each partition is a shard, shown next to its state.
    let sharded = listeners.iter().any(|side| side.shard.is_some());
    for side in listeners {
        let part = side.partition;
        let mut line = format!(
            "  part {part} (listener {}): source {} {}",
            clean(&side.listener_id),
            clean(&side.source),
            clean(&side.source_state)
        );
        if let Some(shard) = &side.shard {
            if shard.slot_count == 0 {
                let _ = write!(line, ", shard idle (no slots)");
            } else {
                let _ = write!(
                    line,
                    ", shard slots {} ({} slots)",
                    clean(&shard.slots),
                    shard.slot_count
                );
            }
            for pending in &shard.pending_handoffs {
                let _ = write!(line, ", handing over {}", clean(pending));
            }
        }
        if let Some(replid) = &side.replid {
            let _ = write!(line, ", replid {}", clean(replid));
        }
        let _ = write!(
            line,
            ", durable offset {} (received {}), log ids {}..{}, full syncs {}, partial resyncs {}",
            side.durable_offset,
            side.received_offset,
            side.first_log_id,
            side.last_log_id,
            side.full_syncs,
            side.partial_resyncs
        );
        if let Some(latency) = side.heartbeat_latency_ms {
            let _ = write!(line, ", heartbeat {latency} ms");
        }
        out.push_str(&line);
        out.push('\n');
        if side.source_state == "FULL_SYNC" {
            let received = side.full_sync_bytes_received;
            let progress = match side.full_sync_bytes_total {
                Some(total) => format!(
                    "{}{} of {} MiB received",
                    bar(style, received, total),
                    mib(received),
                    mib(total)
                ),
                None => format!("{} MiB received", mib(received)),
            };
            let _ = writeln!(out, "  part {part}: full sync: {progress}");
        }
        if let Some(error) = &side.source_error {
            errors.push(format!("  part {part}: source error: {}", clean(error)));
        }
        let shard_cells = || match &side.shard {
            Some(shard) if shard.slot_count == 0 => vec![clean(&side.source), "idle".into()],
            Some(shard) => vec![
                clean(&side.source),
                format!("{} ({})", clean(&shard.slots), shard.slot_count),
            ],
            None => vec![clean(&side.source), String::new()],
        };
        if direct {
            let mut row = vec![part.to_string()];
            if sharded {
                row.extend(shard_cells());
            }
            row.extend([
                clean(&side.source_state),
                side.durable_offset.to_string(),
                side.last_log_id.to_string(),
            ]);
            rows.push(row);
        }
        for ship in &side.shipping {
            let mut row = vec![part.to_string()];
            if sharded {
                row.extend(shard_cells());
            }
            row.extend([
                clean(&ship.drainer_id),
                clean(&ship.state),
                ship.lag.to_string(),
                ship.latency_ms.to_string(),
                ship.acked.to_string(),
                ship.fallback_snapshots.to_string(),
            ]);
            rows.push(row);
            if let Some(error) = &ship.last_error {
                errors.push(format!(
                    "  part {part} → {} ({}): last error: {}",
                    clean(&ship.drainer_id),
                    clean(&ship.endpoint),
                    clean(error)
                ));
            }
        }
    }
    if rows.is_empty() {
        out.push_str("  (no drainer configured)\n");
    } else if direct {
        let mut headers = vec!["PartId"];
        if sharded {
            headers.extend(["Source Shard", "Slots"]);
        }
        headers.extend(["Source Status", "Durable Offset", "Last LogId"]);
        table(out, &headers, &rows);
    } else {
        let mut headers = vec!["PartId"];
        if sharded {
            headers.extend(["Source Shard", "Slots"]);
        }
        headers.extend([
            "Drainer",
            "Sync Status",
            "LogId Lag",
            "Time Latency (ms)",
            "Acked",
            "Fallback Snapshots",
        ]);
        table(out, &headers, &rows);
    }
    for error in errors {
        out.push_str(&error);
        out.push('\n');
    }
}

fn render_drainers(out: &mut String, drainers: &[DrainerSide], style: RenderStyle, direct: bool) {
    out.push_str(match direct {
        true => "Listener WAL → target\n",
        false => "Drainer → target\n",
    });
    if drainers.is_empty() {
        out.push_str("  (no drainer in this process)\n");
        return;
    }
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for side in drainers {
        let part = side.partition;
        let listener = match &side.connected_listener {
            _ if direct => "applying from the listener's WAL".to_string(),
            Some(listener) => format!("listener {} connected", clean(listener)),
            None => "no listener connected".to_string(),
        };
        let _ = writeln!(
            out,
            "  part {part} (drainer {}): {listener}, durable {}, commands applied {}, refused {}, \
             entries skipped {}",
            clean(&side.drainer_id),
            side.durable,
            side.commands_applied,
            side.commands_refused,
            side.entries_skipped
        );
        if let Some(blocked) = &side.blocked {
            let next = if blocked.transient {
                "retried until the target takes it".to_string()
            } else {
                format!(
                    "`ferry skip --partition {part} --log-id {}` skips it",
                    blocked.log_id
                )
            };
            let _ = writeln!(
                out,
                "  part {part}: BLOCKED at entry {}: the target refuses {}: {} ({next})",
                blocked.log_id,
                clean(&blocked.command),
                clean(&blocked.error)
            );
        }
        if let Some(fence) = side.fence.as_ref().filter(|f| f.as_str() != "client-kill") {
            let _ = writeln!(out, "  part {part}: exactly-once fence: {}", clean(fence));
        }
        if let Some(cluster) = &side.cluster {
            let _ = writeln!(out, "  part {part}: target {}", clean(cluster));
        }
        if let Some(handoff) = &side.handoff {
            let _ = writeln!(out, "  part {part}: HANDOFF: {}", clean(handoff));
        }
        if let Some(voided) = &side.voided {
            let _ = writeln!(out, "  part {part}: voided: {}", clean(voided));
        }
        if side.fallback_snapshots > 0 {
            let _ = writeln!(
                out,
                "  part {part}: {} fallback snapshots loaded (entries it needed had expired)",
                side.fallback_snapshots
            );
        }
        if side.foreign_writes > 0 {
            let _ = writeln!(
                out,
                "  part {part}: WARNING {} writes on the target that ferry did not make, seen in {} \
                 sampling windows (latest: {}); see ferry guard",
                side.foreign_writes,
                side.foreign_windows,
                clean(&side.foreign_samples.join("; "))
            );
        }
        if side.echoes > 0 {
            let _ = writeln!(
                out,
                "  part {part}: two-way, {} entries the other direction wrote on its source covered, not sent back",
                side.echoes
            );
        }
        if side.split_entries > 0 {
            let _ = writeln!(
                out,
                "  part {part}: {} entries split over several target slots (not atomic there)",
                side.split_entries
            );
        }
        if let Some(load) = side.snapshot_load.as_ref().filter(|load| !load.done) {
            let _ = writeln!(
                out,
                "  part {part}: loading snapshot epoch {}: {}{} of {} MiB, {} keys",
                load.epoch,
                bar(style, load.bytes_loaded, load.rdb_bytes),
                mib(load.bytes_loaded),
                mib(load.rdb_bytes),
                load.keys_loaded
            );
        }
        rows.push(vec![
            part.to_string(),
            clean(&side.target),
            clean(&side.state),
            side.lag.to_string(),
            side.latency_ms.to_string(),
            side.applied.to_string(),
            side.epoch.to_string(),
        ]);
        if let Some(error) = &side.last_error {
            errors.push(format!(
                "  part {part} → {}: last error: {}",
                clean(&side.target),
                clean(error)
            ));
        }
        if let Some(refused) = &side.last_refused {
            errors.push(format!(
                "  part {part} → {}: last refused in EXEC: entry {} {}: {}",
                clean(&side.target),
                refused.log_id,
                clean(&refused.command),
                clean(&refused.error)
            ));
        }
        if side.entries_skipped > 0 {
            if let Some(file) = &side.dead_letter_file {
                errors.push(format!(
                    "  part {part}: {} skipped entries (last {}) recorded in {}",
                    side.entries_skipped,
                    side.last_skipped.unwrap_or(0),
                    clean(file)
                ));
            }
        }
    }
    table(
        out,
        &[
            "PartId",
            "Target",
            "Sync Status",
            "LogId Lag",
            "Time Latency (ms)",
            "Applied",
            "Epoch",
        ],
        &rows,
    );
    for error in errors {
        out.push_str(&error);
        out.push('\n');
    }
}

/// `[########............]  42% ` when bars are on and the total is known.
fn bar(style: RenderStyle, done: u64, total: u64) -> String {
    const WIDTH: u64 = 20;
    if !style.progress_bars || total == 0 {
        return String::new();
    }
    let percent = (u128::from(done) * 100 / u128::from(total)).min(100) as u64;
    let filled = (percent * WIDTH / 100) as usize;
    format!(
        "[{}{}] {percent:>3}% ",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled)
    )
}

/// Bytes as MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// `text` with control characters escaped (`\u{1b}`), everything else as is.
fn clean(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            cleaned.extend(c.escape_default());
        } else {
            cleaned.push(c);
        }
    }
    cleaned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ShipSide, SnapshotLoad};

    const NOW: u64 = 1_700_000_000_250;

    fn online() -> NodeStatus {
        NodeStatus {
            role: "sync".into(),
            taken_unix_ms: NOW - 12,
            two_way: None,
            listeners: vec![ListenerSide {
                listener_id: "l1".into(),
                partition: 0,
                source: "127.0.0.1:6379".into(),
                shard: None,
                source_state: "ONLINE".into(),
                source_error: None,
                replid: Some("5f1c0e3b9d2a47e8a1b6c0d9e8f7a6b5c4d3e2f1".into()),
                received_offset: 1300,
                durable_offset: 1234,
                first_log_id: 1,
                last_log_id: 57,
                full_syncs: 1,
                partial_resyncs: 2,
                full_sync_bytes_received: 4096,
                full_sync_bytes_total: Some(4096),
                heartbeat_latency_ms: Some(3),
                reconnects: 0,
                shipping: vec![ShipSide {
                    drainer_id: "d1".into(),
                    endpoint: "http://127.0.0.1:9000".into(),
                    state: "ONLINE".into(),
                    acked: 57,
                    lag: 0,
                    latency_ms: 0,
                    fallback_snapshots: 0,
                    entries_sent: 57,
                    bytes_sent: 9000,
                    last_error: None,
                    reconnects: 0,
                }],
            }],
            drainers: vec![DrainerSide {
                drainer_id: "d1".into(),
                partition: 0,
                target: "127.0.0.1:6380".into(),
                state: "ONLINE".into(),
                last_error: None,
                connected_listener: Some("l1".into()),
                durable: 57,
                applied: 57,
                lag: 0,
                latency_ms: 0,
                epoch: 1,
                commands_applied: 1000,
                commands_refused: 0,
                snapshot_load: Some(SnapshotLoad {
                    epoch: 1,
                    rdb_bytes: 4096,
                    bytes_loaded: 4096,
                    keys_loaded: 10,
                    done: true,
                }),
                blocked: None,
                entries_skipped: 0,
                last_skipped: None,
                dead_letter_file: Some("/d/dead-letter/d1-0.resp".into()),
                split_entries: 0,
                echoes: 0,
                fallback_snapshots: 0,
                foreign_writes: 0,
                foreign_windows: 0,
                foreign_samples: Vec::new(),
                cluster: None,
                handoff: None,
                voided: None,
                fence: Some("client-kill".into()),
                last_refused: None,
                reconnects: 0,
            }],
            wals: Vec::new(),
        }
    }

    #[test]
    fn renders_a_handoff() {
        let mut status = online();
        let drainer = &mut status.drainers[0];
        drainer.state = "HANDOFF".into();
        drainer.handoff = Some("entry 9 waits for slot 7 to be handed to this partition (tenure generation 1); the target's owner map has partition 0 generation 0".into());
        let text = render_status(&status, NOW, RenderStyle::default());
        assert!(
            text.contains("  part 0: HANDOFF: entry 9 waits for slot 7 to be handed to this partition (tenure generation 1); the target's owner map has partition 0 generation 0\n"),
            "{text}"
        );
    }

    #[test]
    fn renders_foreign_writes() {
        let mut status = online();
        assert!(!render_status(&status, NOW, RenderStyle::default()).contains("did not make"));
        status.drainers[0].foreign_writes = 2;
        status.drainers[0].foreign_windows = 5;
        status.drainers[0].foreign_samples = vec!["db 0 SET \"k\" by 10.0.0.2:2 (app)".into()];
        let text = render_status(&status, NOW, RenderStyle::default());
        assert!(
            text.contains("  part 0: WARNING 2 writes on the target that ferry did not make, seen in 5 sampling windows (latest: db 0 SET \"k\" by 10.0.0.2:2 (app)); see ferry guard\n"),
            "{text}"
        );
    }

    #[test]
    fn renders_voided_entries() {
        let mut status = online();
        status.drainers[0].voided = Some("2 entries of aborted slot imports skipped, never applied (the shard gave the keys back to the slot's owner); last: entry 40, slot 7 tenure generation 1".into());
        let text = render_status(&status, NOW, RenderStyle::default());
        assert!(
            text.contains("  part 0: voided: 2 entries of aborted slot imports skipped, never applied (the shard gave the keys back to the slot's owner); last: entry 40, slot 7 tenure generation 1\n"),
            "{text}"
        );
    }

    #[test]
    fn renders_a_cluster_target_and_its_split_entries() {
        let mut status = online();
        let drainer = &mut status.drainers[0];
        drainer.cluster = Some("cluster: 3 masters (127.0.0.1:7000, 127.0.0.1:7001, 127.0.0.1:7002); waiting on slot 12: ASK 12 127.0.0.1:7001".into());
        drainer.split_entries = 17;
        let text = render_status(&status, NOW, RenderStyle::default());
        assert!(
            text.contains("  part 0: target cluster: 3 masters (127.0.0.1:7000, 127.0.0.1:7001, 127.0.0.1:7002); waiting on slot 12: ASK 12 127.0.0.1:7001\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "  part 0: 17 entries split over several target slots (not atomic there)\n"
            ),
            "{text}"
        );
        let plain = render_status(&online(), NOW, RenderStyle::default());
        assert!(!plain.contains("split over"), "{plain}");
    }

    #[test]
    fn renders_a_blocked_partition_and_what_was_skipped() {
        let mut status = online();
        let drainer = &mut status.drainers[0];
        drainer.state = "BLOCKED".into();
        drainer.applied = 41;
        drainer.lag = 16;
        drainer.blocked = Some(crate::status::BlockedEntry {
            log_id: 42,
            command: "LPUSH".into(),
            error: "ERR unknown command 'LPUSH'".into(),
            transient: false,
            since_unix_ms: NOW - 5000,
        });
        drainer.entries_skipped = 2;
        drainer.last_skipped = Some(30);
        drainer.fence = Some("watch-only: CLIENT refused: NOPERM".into());
        drainer.last_refused = Some(crate::status::RefusedCommand {
            log_id: 12,
            command: "LPUSH".into(),
            error: "WRONGTYPE Operation".into(),
        });
        let text = render_status(&status, NOW, RenderStyle::default());
        let expected = "\
Drainer → target
  part 0 (drainer d1): listener l1 connected, durable 57, commands applied 1000, refused 0, entries skipped 2
  part 0: BLOCKED at entry 42: the target refuses LPUSH: ERR unknown command 'LPUSH' (`ferry skip --partition 0 --log-id 42` skips it)
  part 0: exactly-once fence: watch-only: CLIENT refused: NOPERM
+--------+----------------+-------------+-----------+-------------------+---------+-------+
| PartId | Target         | Sync Status | LogId Lag | Time Latency (ms) | Applied | Epoch |
+--------+----------------+-------------+-----------+-------------------+---------+-------+
| 0      | 127.0.0.1:6380 | BLOCKED     | 16        | 0                 | 41      | 1     |
+--------+----------------+-------------+-----------+-------------------+---------+-------+
  part 0 → 127.0.0.1:6380: last refused in EXEC: entry 12 LPUSH: WRONGTYPE Operation
  part 0: 2 skipped entries (last 30) recorded in /d/dead-letter/d1-0.resp
";
        assert!(text.ends_with(expected), "{text}");
        let drainer = &mut status.drainers[0];
        drainer.blocked.as_mut().unwrap().transient = true;
        let text = render_status(&status, NOW, RenderStyle::default());
        assert!(
            text.contains("(retried until the target takes it)\n"),
            "{text}"
        );
    }

    #[test]
    fn skip_summaries_say_whether_it_is_done() {
        let request = SkipRequest {
            partition: 2,
            log_id: 9,
            drainer_id: None,
        };
        let mut outcome = SkipOutcome {
            dead_letter_file: "/d/x.resp".into(),
            done: true,
        };
        assert_eq!(
            skip_summary(&request, &outcome),
            "skipped entry 9 of partition 2; recorded in /d/x.resp\n"
        );
        outcome.done = false;
        assert!(
            skip_summary(&request, &outcome).starts_with("entry 9 of partition 2 will be skipped")
        );
    }

    #[test]
    fn renders_an_online_sync_node() {
        let expected = "\
ferry sync: status taken 12 ms ago

Listener → drainer
  part 0 (listener l1): source 127.0.0.1:6379 ONLINE, replid 5f1c0e3b9d2a47e8a1b6c0d9e8f7a6b5c4d3e2f1, durable offset 1234 (received 1300), log ids 1..57, full syncs 1, partial resyncs 2, heartbeat 3 ms
+--------+---------+-------------+-----------+-------------------+-------+--------------------+
| PartId | Drainer | Sync Status | LogId Lag | Time Latency (ms) | Acked | Fallback Snapshots |
+--------+---------+-------------+-----------+-------------------+-------+--------------------+
| 0      | d1      | ONLINE      | 0         | 0                 | 57    | 0                  |
+--------+---------+-------------+-----------+-------------------+-------+--------------------+

Drainer → target
  part 0 (drainer d1): listener l1 connected, durable 57, commands applied 1000, refused 0, entries skipped 0
+--------+----------------+-------------+-----------+-------------------+---------+-------+
| PartId | Target         | Sync Status | LogId Lag | Time Latency (ms) | Applied | Epoch |
+--------+----------------+-------------+-----------+-------------------+---------+-------+
| 0      | 127.0.0.1:6380 | ONLINE      | 0         | 0                 | 57      | 1     |
+--------+----------------+-------------+-----------+-------------------+---------+-------+
";
        assert_eq!(
            render_status(&online(), NOW, RenderStyle::default()),
            expected
        );
    }

    #[test]
    fn renders_a_sync_node_applying_from_the_listener_wal() {
        let mut status = online();
        status.listeners[0].shipping.clear();
        status.drainers[0].connected_listener = None;
        let text = render_status(&status, NOW, RenderStyle::default());
        let expected = "\
ferry sync: status taken 12 ms ago

Source → listener WAL
  part 0 (listener l1): source 127.0.0.1:6379 ONLINE, replid 5f1c0e3b9d2a47e8a1b6c0d9e8f7a6b5c4d3e2f1, durable offset 1234 (received 1300), log ids 1..57, full syncs 1, partial resyncs 2, heartbeat 3 ms
+--------+---------------+----------------+------------+
| PartId | Source Status | Durable Offset | Last LogId |
+--------+---------------+----------------+------------+
| 0      | ONLINE        | 1234           | 57         |
+--------+---------------+----------------+------------+

Listener WAL → target
  part 0 (drainer d1): applying from the listener's WAL, durable 57, commands applied 1000, refused 0, entries skipped 0
+--------+----------------+-------------+-----------+-------------------+---------+-------+
| PartId | Target         | Sync Status | LogId Lag | Time Latency (ms) | Applied | Epoch |
+--------+----------------+-------------+-----------+-------------------+---------+-------+
| 0      | 127.0.0.1:6380 | ONLINE      | 0         | 0                 | 57      | 1     |
+--------+----------------+-------------+-----------+-------------------+---------+-------+
";
        assert_eq!(text, expected);
    }

    #[test]
    fn renders_offline_links_with_their_errors() {
        let mut status = online();
        let listener = &mut status.listeners[0];
        listener.source_state = "OFFLINE".into();
        listener.source_error = Some("connection refused".into());
        listener.heartbeat_latency_ms = None;
        listener.replid = None;
        let ship = &mut listener.shipping[0];
        ship.state = "OFFLINE".into();
        ship.lag = 1523;
        ship.latency_ms = 48213;
        ship.acked = 40;
        ship.last_error = Some("transport error: connection refused".into());
        let drainer = &mut status.drainers[0];
        drainer.state = "OFFLINE".into();
        drainer.connected_listener = None;
        drainer.durable = 40;
        drainer.applied = 31;
        drainer.lag = 9;
        drainer.latency_ms = 7001;
        drainer.last_error = Some("MISCONF \x1b[2Jdisk full".into());
        let expected = "\
ferry sync: status taken 12 ms ago

Listener → drainer
  part 0 (listener l1): source 127.0.0.1:6379 OFFLINE, durable offset 1234 (received 1300), log ids 1..57, full syncs 1, partial resyncs 2
+--------+---------+-------------+-----------+-------------------+-------+--------------------+
| PartId | Drainer | Sync Status | LogId Lag | Time Latency (ms) | Acked | Fallback Snapshots |
+--------+---------+-------------+-----------+-------------------+-------+--------------------+
| 0      | d1      | OFFLINE     | 1523      | 48213             | 40    | 0                  |
+--------+---------+-------------+-----------+-------------------+-------+--------------------+
  part 0: source error: connection refused
  part 0 → d1 (http://127.0.0.1:9000): last error: transport error: connection refused

Drainer → target
  part 0 (drainer d1): no listener connected, durable 40, commands applied 1000, refused 0, entries skipped 0
+--------+----------------+-------------+-----------+-------------------+---------+-------+
| PartId | Target         | Sync Status | LogId Lag | Time Latency (ms) | Applied | Epoch |
+--------+----------------+-------------+-----------+-------------------+---------+-------+
| 0      | 127.0.0.1:6380 | OFFLINE     | 9         | 7001              | 31      | 1     |
+--------+----------------+-------------+-----------+-------------------+---------+-------+
  part 0 → 127.0.0.1:6380: last error: MISCONF \\u{1b}[2Jdisk full
";
        assert_eq!(
            render_status(&status, NOW, RenderStyle::default()),
            expected
        );
    }

    #[test]
    fn renders_a_row_per_source_shard() {
        let mut status = online();
        let mut second = status.listeners[0].clone();
        status.listeners[0].shard = Some(crate::status::SourceShard {
            master_id: "a".repeat(40),
            slots: "0-5460".into(),
            slot_count: 5461,
            pending_handoffs: vec![
                "slot 5461 to partition 1 (generation 1) at source offset 7".into()
            ],
        });
        second.partition = 1;
        second.source = "127.0.0.1:30002".into();
        second.shard = Some(crate::status::SourceShard {
            master_id: String::new(),
            slots: String::new(),
            slot_count: 0,
            pending_handoffs: Vec::new(),
        });
        status.listeners.push(second);
        let text = render_status(&status, NOW, RenderStyle::default());
        assert!(
            text.contains("part 0 (listener l1): source 127.0.0.1:6379 ONLINE, shard slots 0-5460 (5461 slots), handing over slot 5461 to partition 1 (generation 1) at source offset 7, replid"),
            "{text}"
        );
        assert!(
            text.contains(
                "part 1 (listener l1): source 127.0.0.1:30002 ONLINE, shard idle (no slots)"
            ),
            "{text}"
        );
        let header = text
            .lines()
            .find(|line| line.contains("PartId") && line.contains("Drainer"))
            .expect("a table");
        assert!(
            header.contains("Source Shard") && header.contains("Slots"),
            "{text}"
        );
        let row = |part: &str| {
            text.lines()
                .find(|line| line.starts_with(&format!("| {part}")) && line.contains("d1"))
                .unwrap_or_else(|| panic!("no row {part}: {text}"))
                .to_string()
        };
        assert!(
            row("0 ").contains("127.0.0.1:6379") && row("0 ").contains("0-5460 (5461)"),
            "{text}"
        );
        assert!(
            row("1 ").contains("127.0.0.1:30002") && row("1 ").contains("idle"),
            "{text}"
        );
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["listeners"][0]["shard"]["slot_count"], 5461);
        assert_eq!(json["listeners"][1]["shard"]["slots"], "");
    }

    #[test]
    fn renders_a_stopped_listener_node() {
        let mut status = online();
        status.role = "listener".into();
        status.taken_unix_ms = NOW + 5; // a clock ahead of ours: age 0, not a wrap
        status.drainers.clear();
        let mut second = status.listeners[0].shipping[0].clone();
        second.drainer_id = "dr-east-2".into();
        second.state = "STOPPED".into();
        second.lag = 310;
        second.latency_ms = 65000;
        second.acked = 0;
        second.fallback_snapshots = 2;
        status.listeners[0].shipping.push(second);
        let expected = "\
ferry listener: status taken 0 ms ago

Listener → drainer
  part 0 (listener l1): source 127.0.0.1:6379 ONLINE, replid 5f1c0e3b9d2a47e8a1b6c0d9e8f7a6b5c4d3e2f1, durable offset 1234 (received 1300), log ids 1..57, full syncs 1, partial resyncs 2, heartbeat 3 ms
+--------+-----------+-------------+-----------+-------------------+-------+--------------------+
| PartId | Drainer   | Sync Status | LogId Lag | Time Latency (ms) | Acked | Fallback Snapshots |
+--------+-----------+-------------+-----------+-------------------+-------+--------------------+
| 0      | d1        | ONLINE      | 0         | 0                 | 57    | 0                  |
| 0      | dr-east-2 | STOPPED     | 310       | 65000             | 0     | 2                  |
+--------+-----------+-------------+-----------+-------------------+-------+--------------------+

Drainer → target
  (no drainer in this process)
";
        assert_eq!(
            render_status(&status, NOW, RenderStyle::default()),
            expected
        );
    }

    fn full_sync_in_progress() -> NodeStatus {
        let mut status = online();
        let listener = &mut status.listeners[0];
        listener.source_state = "FULL_SYNC".into();
        listener.full_sync_bytes_received = 44 << 20;
        listener.full_sync_bytes_total = Some(100 << 20);
        listener.shipping[0].lag = 0;
        let drainer = &mut status.drainers[0];
        drainer.epoch = 2;
        drainer.snapshot_load = Some(SnapshotLoad {
            epoch: 2,
            rdb_bytes: 8 << 20,
            bytes_loaded: 3 << 20,
            keys_loaded: 123_456,
            done: false,
        });
        status
    }

    #[test]
    fn renders_full_sync_progress_as_lines_or_bars() {
        let status = full_sync_in_progress();
        let plain = render_status(&status, NOW, RenderStyle::default());
        assert!(
            plain.contains("\n  part 0: full sync: 44.0 of 100.0 MiB received\n"),
            "{plain}"
        );
        assert!(
            plain.contains("\n  part 0: loading snapshot epoch 2: 3.0 of 8.0 MiB, 123456 keys\n"),
            "{plain}"
        );
        let bars = render_status(
            &status,
            NOW,
            RenderStyle {
                progress_bars: true,
            },
        );
        let expected_listener = "\
  part 0 (listener l1): source 127.0.0.1:6379 FULL_SYNC, replid 5f1c0e3b9d2a47e8a1b6c0d9e8f7a6b5c4d3e2f1, durable offset 1234 (received 1300), log ids 1..57, full syncs 1, partial resyncs 2, heartbeat 3 ms
  part 0: full sync: [########............]  44% 44.0 of 100.0 MiB received
+--------+";
        assert!(bars.contains(expected_listener), "{bars}");
        let expected_drainer = "\
  part 0 (drainer d1): listener l1 connected, durable 57, commands applied 1000, refused 0, entries skipped 0
  part 0: loading snapshot epoch 2: [#######.............]  37% 3.0 of 8.0 MiB, 123456 keys
+--------+";
        assert!(bars.contains(expected_drainer), "{bars}");
        // Unknown total: no bar, no percentage, just the bytes.
        let mut unknown = status.clone();
        unknown.listeners[0].full_sync_bytes_total = None;
        let text = render_status(
            &unknown,
            NOW,
            RenderStyle {
                progress_bars: true,
            },
        );
        assert!(
            text.contains("\n  part 0: full sync: 44.0 MiB received\n"),
            "{text}"
        );
        // Finished loads and other states show no progress line.
        assert!(!render_status(
            &online(),
            NOW,
            RenderStyle {
                progress_bars: true
            }
        )
        .contains('['));
    }

    #[test]
    fn bars_clamp_and_fill() {
        let on = RenderStyle {
            progress_bars: true,
        };
        assert_eq!(bar(on, 0, 10), "[....................]   0% ");
        assert_eq!(bar(on, 10, 10), "[####################] 100% ");
        assert_eq!(bar(on, 25, 10), "[####################] 100% ");
        assert_eq!(bar(on, u64::MAX, u64::MAX), "[####################] 100% ");
        assert_eq!(bar(on, 5, 0), "");
        assert_eq!(bar(RenderStyle::default(), 5, 10), "");
    }

    #[test]
    fn empty_node_renders_both_sections() {
        let text = render_status(&NodeStatus::default(), 0, RenderStyle::default());
        assert_eq!(
            text,
            "ferry unknown: status taken 0 ms ago\n\nListener → drainer\n  (no listener in this process)\n\nDrainer → target\n  (no drainer in this process)\n"
        );
    }

    #[test]
    fn json_field_names_are_stable() {
        let json: serde_json::Value = serde_json::to_value(full_sync_in_progress()).unwrap();
        assert_eq!(json["role"], "sync");
        assert_eq!(json["listeners"][0]["shipping"][0]["drainer_id"], "d1");
        assert_eq!(json["listeners"][0]["full_sync_bytes_total"], 100 << 20);
        assert_eq!(json["drainers"][0]["snapshot_load"]["keys_loaded"], 123_456);
        assert_eq!(json["drainers"][0]["last_error"], serde_json::Value::Null);
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("-1").is_err());
        assert!(parse_interval("NaN").is_err());
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn control_summaries_name_the_selection() {
        assert_eq!(
            control_summary("stopped", 1, &SyncSelector::default()),
            "stopped 1 sync (selected: all)\n"
        );
        let selector = SyncSelector {
            partition: Some(3),
            drainer_id: Some("d\n2".into()),
        };
        assert_eq!(
            control_summary("restarted", 0, &selector),
            "restarted 0 syncs (selected: partition 3 drainer d\\n2)\n"
        );
    }
}
