//! Prometheus metrics: status readings rendered in the text exposition
//! format 0.0.4 (what `GET /metrics` on a process's admin address serves).
//!
//! In: one or more [`NodeStatus`] readings, each with constant labels of its
//! own (`ferry sync` passes none; a daemon running many syncs passes e.g.
//! `task="orders"`). Out: the text, every metric family once (one `# HELP`,
//! one `# TYPE`, then the samples of every reading), as Prometheus requires.
//!
//! Rules the output keeps, whatever the readings hold:
//!
//! - names start with `ferry_`; counters end in `_total`; durations are in
//!   seconds, sizes in bytes;
//! - label values are escaped (`\\`, `\"`, `\n`); a constant label whose
//!   name is not a Prometheus label name is sanitized, one that collides
//!   with a label ferry sets is renamed `exported_<name>`;
//! - no free text (errors, keys, conflicts) and no credentials: the only
//!   addresses (`source`, `target`, `endpoint` of the `_info` metrics) lose
//!   any `user:password@` they carry, even though the status already
//!   redacts them;
//! - states are state sets: one series per known state, 1 for the current
//!   one, so a series does not vanish when its state changes;
//! - the WAL fsync histogram's buckets are cumulative and monotonic, `+Inf`
//!   equal to `_count`, even for a reading with inconsistent counts.
//!
//! The metrics (labels beyond `role` in brackets):
//!
//! ```text
//! source link      [listener_id, partition]   ferry_source_up, _state{state}, _info{source},
//!                  _received_offset, _durable_offset, _full_syncs_total, _partial_resyncs_total,
//!                  _reconnects_total, _full_sync_bytes, _full_sync_size_bytes,
//!                  _heartbeat_latency_seconds; ferry_listener_first_log_id, _last_log_id
//! shipping         [listener_id, partition, drainer_id]   ferry_ship_up, _state{state},
//!                  _info{endpoint}, _acked_log_id, _lag_entries, _lag_seconds, _entries_total,
//!                  _bytes_total, _fallback_snapshots_total, _reconnects_total
//! applier          [drainer_id, partition]   ferry_apply_up, _state{state}, _info{target},
//!                  _durable_log_id, _applied_log_id, _epoch, _lag_entries, _lag_seconds,
//!                  _commands_total, _refused_commands_total, _skipped_entries_total,
//!                  _split_entries_total, _echoes_total, _fallback_snapshots_total,
//!                  _foreign_writes_total, _foreign_windows_total, _reconnects_total,
//!                  _snapshot_loading, _snapshot_load_bytes, _snapshot_load_keys, _snapshot_size_bytes
//! two-way sync     []   ferry_two_way_conflicts_total, _unexamined_total, _repaired_total,
//!                  _repairs_owed
//! WAL              [wal]   ferry_wal_written_bytes_total, ferry_wal_batches_total,
//!                  ferry_wal_fsync_seconds (histogram)
//! ```

use std::fmt::Write as _;

use crate::status::{LatencyHistogram, NodeStatus};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// States of the source link, shipping and appliers (`src/status.rs`).
const SOURCE_STATES: &[&str] = &["CONNECTING", "FULL_SYNC", "ONLINE", "OFFLINE", "STOPPED"];
const SHIP_STATES: &[&str] = &["ONLINE", "OFFLINE", "STOPPED"];
const APPLY_STATES: &[&str] = &[
    "ONLINE", "OFFLINE", "BLOCKED", "HANDOFF", "STALLED", "STOPPED",
];

/// Renders the metrics of one reading without constant labels.
pub fn render_node(status: &NodeStatus) -> String {
    let mut out = String::new();
    render(&mut out, &[(Vec::new(), status)]);
    out
}

/// Appends the metrics of every reading to `out`, each sample labelled with
/// its reading's constant labels (first) and the reading's `role`.
pub fn render(out: &mut String, sets: &[(Vec<(&str, String)>, &NodeStatus)]) {
    let mut families = Families::default();
    for (constant, status) in sets {
        let base = Labels::constant(constant).with("role", &status.role);
        node(&mut families, &base, status);
    }
    families.write(out);
}

fn node(families: &mut Families, base: &Labels, status: &NodeStatus) {
    for listener in &status.listeners {
        let part = base
            .with("listener_id", &listener.listener_id)
            .with("partition", &listener.partition.to_string());
        let up = u64::from(listener.source_state == "ONLINE");
        families.gauge(
            "ferry_source_up",
            "1 while the replication link to the source is ONLINE.",
            &part,
            up,
        );
        families.states(
            "ferry_source_state",
            "State of the replication link to the source (1 for the current state).",
            &part,
            SOURCE_STATES,
            &listener.source_state,
        );
        families.gauge(
            "ferry_source_info",
            "The source address a partition replicates (credentials removed).",
            &part.with("source", &without_userinfo(&listener.source)),
            1,
        );
        families.gauge(
            "ferry_source_received_offset",
            "Source replication offset after the last whole frame received.",
            &part,
            listener.received_offset,
        );
        families.gauge(
            "ferry_source_durable_offset",
            "Source replication offset acknowledged to the source (durable in the WAL).",
            &part,
            listener.durable_offset,
        );
        families.gauge(
            "ferry_listener_first_log_id",
            "First log id held in the listener's WAL partition.",
            &part,
            listener.first_log_id,
        );
        families.gauge(
            "ferry_listener_last_log_id",
            "Last durable log id of the listener's WAL partition.",
            &part,
            listener.last_log_id,
        );
        families.counter(
            "ferry_source_full_syncs_total",
            "Full resyncs received from the source by this process.",
            &part,
            listener.full_syncs,
        );
        families.counter(
            "ferry_source_partial_resyncs_total",
            "Partial resyncs (+CONTINUE) by this process.",
            &part,
            listener.partial_resyncs,
        );
        families.counter(
            "ferry_source_reconnects_total",
            "Times the link to the source was lost or could not be made, and ferry reconnected.",
            &part,
            listener.reconnects,
        );
        families.gauge(
            "ferry_source_full_sync_bytes",
            "RDB bytes received by the current (or last) full sync.",
            &part,
            listener.full_sync_bytes_received,
        );
        if let Some(total) = listener.full_sync_bytes_total {
            families.gauge(
                "ferry_source_full_sync_size_bytes",
                "Size of the last completed full sync's RDB.",
                &part,
                total,
            );
        }
        if let Some(ms) = listener.heartbeat_latency_ms {
            families.gauge(
                "ferry_source_heartbeat_latency_seconds",
                "Heartbeat round trip: written to the source until durable in the WAL.",
                &part,
                Seconds::from_millis(ms),
            );
        }
        for ship in &listener.shipping {
            let link = part.with("drainer_id", &ship.drainer_id);
            families.gauge(
                "ferry_ship_up",
                "1 while the stream to the drainer is ONLINE.",
                &link,
                u64::from(ship.state == "ONLINE"),
            );
            families.states(
                "ferry_ship_state",
                "State of the stream to the drainer (1 for the current state).",
                &link,
                SHIP_STATES,
                &ship.state,
            );
            families.gauge(
                "ferry_ship_info",
                "The drainer endpoint a partition ships to (credentials removed).",
                &link.with("endpoint", &without_userinfo(&ship.endpoint)),
                1,
            );
            families.gauge(
                "ferry_ship_acked_log_id",
                "Last log id the drainer made durable.",
                &link,
                ship.acked,
            );
            families.gauge(
                "ferry_ship_lag_entries",
                "Entries the drainer does not have yet.",
                &link,
                ship.lag,
            );
            families.gauge(
                "ferry_ship_lag_seconds",
                "Age of the oldest entry the drainer does not have yet (0 if none).",
                &link,
                Seconds::from_millis(ship.latency_ms),
            );
            families.counter(
                "ferry_ship_entries_total",
                "Entries sent to the drainer.",
                &link,
                ship.entries_sent,
            );
            families.counter(
                "ferry_ship_bytes_total",
                "Compressed bytes of entry batches and snapshot chunks sent to the drainer.",
                &link,
                ship.bytes_sent,
            );
            families.counter(
                "ferry_ship_fallback_snapshots_total",
                "Fallback snapshots sent to the drainer.",
                &link,
                ship.fallback_snapshots,
            );
            families.counter(
                "ferry_ship_reconnects_total",
                "Times a stream to the drainer ended or could not be made, and the shipper reconnected.",
                &link,
                ship.reconnects,
            );
        }
    }
    for applier in &status.drainers {
        let part = base
            .with("drainer_id", &applier.drainer_id)
            .with("partition", &applier.partition.to_string());
        families.gauge(
            "ferry_apply_up",
            "1 while the applier is ONLINE (applying to the target).",
            &part,
            u64::from(applier.state == "ONLINE"),
        );
        families.states(
            "ferry_apply_state",
            "State of the applier (1 for the current state).",
            &part,
            APPLY_STATES,
            &applier.state,
        );
        families.gauge(
            "ferry_apply_info",
            "The target address an applier writes to (credentials removed).",
            &part.with("target", &without_userinfo(&applier.target)),
            1,
        );
        families.gauge(
            "ferry_apply_durable_log_id",
            "Last log id durable in the WAL the applier reads.",
            &part,
            applier.durable,
        );
        families.gauge(
            "ferry_apply_applied_log_id",
            "Last log id applied to the target (its checkpoint).",
            &part,
            applier.applied,
        );
        families.gauge(
            "ferry_apply_epoch",
            "Snapshot epoch the target's data is based on.",
            &part,
            applier.epoch,
        );
        families.gauge(
            "ferry_apply_lag_entries",
            "Entries durable but not applied to the target yet.",
            &part,
            applier.lag,
        );
        families.gauge(
            "ferry_apply_lag_seconds",
            "Age of the oldest entry not applied to the target yet (0 if none).",
            &part,
            Seconds::from_millis(applier.latency_ms),
        );
        let counters: [(&'static str, &'static str, u64); 9] = [
            (
                "ferry_apply_commands_total",
                "Data commands the target ran.",
                applier.commands_applied,
            ),
            (
                "ferry_apply_refused_commands_total",
                "Commands the target refused inside a committed batch (not retried).",
                applier.commands_refused,
            ),
            (
                "ferry_apply_skipped_entries_total",
                "Entries skipped (ferry skip, on-refused = skip-and-record), recorded in the dead-letter file.",
                applier.entries_skipped,
            ),
            (
                "ferry_apply_split_entries_total",
                "Entries applied as several transactions (keys in several slots of a cluster target).",
                applier.split_entries,
            ),
            (
                "ferry_apply_echoes_total",
                "Two-way sync: entries the other direction wrote, covered and never sent back.",
                applier.echoes,
            ),
            (
                "ferry_apply_fallback_snapshots_total",
                "Fallback snapshots loaded in place of entries the log lacked.",
                applier.fallback_snapshots,
            ),
            (
                "ferry_apply_foreign_writes_total",
                "Writes on the target that ferry did not make, seen in the sampling windows.",
                applier.foreign_writes,
            ),
            (
                "ferry_apply_foreign_windows_total",
                "Sampling windows watched for foreign writes.",
                applier.foreign_windows,
            ),
            (
                "ferry_apply_reconnects_total",
                "Times the applier lost the target (ONLINE to OFFLINE) and reconnected.",
                applier.reconnects,
            ),
        ];
        for (name, help, value) in counters {
            families.counter(name, help, &part, value);
        }
        if let Some(load) = &applier.snapshot_load {
            families.gauge(
                "ferry_apply_snapshot_loading",
                "1 while a snapshot (full sync) is being loaded into the target.",
                &part,
                u64::from(!load.done),
            );
            families.gauge(
                "ferry_apply_snapshot_load_bytes",
                "RDB bytes of the latest snapshot load parsed so far.",
                &part,
                load.bytes_loaded,
            );
            families.gauge(
                "ferry_apply_snapshot_load_keys",
                "Keys of the latest snapshot load written to the target so far.",
                &part,
                load.keys_loaded,
            );
            families.gauge(
                "ferry_apply_snapshot_size_bytes",
                "Size of the RDB of the latest snapshot load.",
                &part,
                load.rdb_bytes,
            );
        }
    }
    if let Some(two_way) = &status.two_way {
        families.counter(
            "ferry_two_way_conflicts_total",
            "Two-way sync: keys written on both sides before either saw the other's write.",
            base,
            two_way.conflicts,
        );
        families.counter(
            "ferry_two_way_unexamined_total",
            "Two-way sync: entries the conflict detector could not examine.",
            base,
            two_way.unexamined,
        );
        families.counter(
            "ferry_two_way_repaired_total",
            "Two-way sync: repairs a winner policy made (a key's conflicts share one).",
            base,
            two_way.repaired,
        );
        families.gauge(
            "ferry_two_way_repairs_owed",
            "Two-way sync: repairs waiting for their side to apply the winner's write.",
            base,
            two_way.repairs_owed,
        );
    }
    for wal in &status.wals {
        let labels = base.with("wal", &wal.wal);
        families.counter(
            "ferry_wal_written_bytes_total",
            "Bytes of entries and snapshot chunks written to the WAL.",
            &labels,
            wal.bytes_written,
        );
        families.counter(
            "ferry_wal_batches_total",
            "Write batches of the WAL (one RocksDB write each).",
            &labels,
            wal.batches_written,
        );
        families.histogram(
            "ferry_wal_fsync_seconds",
            "Duration of the WAL's synced writes (the batch's fsync).",
            &labels,
            &wal.fsync,
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: its header and its sample lines so far.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: String,
}

/// The families in the order they first got a sample.
#[derive(Default)]
struct Families {
    families: Vec<Family>,
}

impl Families {
    fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut String {
        let index = match self.families.iter().position(|f| f.name == name) {
            Some(index) => index,
            None => {
                self.families.push(Family {
                    name,
                    help,
                    kind,
                    samples: String::new(),
                });
                self.families.len() - 1
            }
        };
        &mut self.families[index].samples
    }

    fn sample(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &Labels,
        value: impl std::fmt::Display,
    ) {
        let samples = self.family(name, help, kind);
        sample_line(samples, name, "", labels, None, value);
    }

    fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &Labels,
        value: impl std::fmt::Display,
    ) {
        self.sample(name, help, Kind::Gauge, labels, value);
    }

    fn counter(&mut self, name: &'static str, help: &'static str, labels: &Labels, value: u64) {
        self.sample(name, help, Kind::Counter, labels, value);
    }

    /// A state set: one series per known state (and the current one if it
    /// is not known), 1 for the current one.
    fn states(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &Labels,
        known: &[&str],
        current: &str,
    ) {
        for state in known {
            let value = u64::from(*state == current);
            self.gauge(name, help, &labels.with("state", state), value);
        }
        if !known.contains(&current) {
            self.gauge(name, help, &labels.with("state", current), 1);
        }
    }

    fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &Labels,
        histogram: &LatencyHistogram,
    ) {
        let samples = self.family(name, help, Kind::Histogram);
        let mut cumulative: u64 = 0;
        let mut last_bound: Option<u64> = None;
        for (index, bound) in histogram.bounds_us.iter().enumerate() {
            cumulative =
                cumulative.saturating_add(histogram.counts.get(index).copied().unwrap_or(0));
            // A bound that does not increase (a garbled reading) folds its
            // count into the next bucket instead of breaking the order.
            if last_bound.is_some_and(|last| *bound <= last) {
                continue;
            }
            last_bound = Some(*bound);
            let le = Seconds::from_micros(*bound).to_string();
            sample_line(samples, name, "_bucket", labels, Some(&le), cumulative);
        }
        // Counts past the bounds are above the last one.
        for extra in histogram.counts.iter().skip(histogram.bounds_us.len()) {
            cumulative = cumulative.saturating_add(*extra);
        }
        sample_line(samples, name, "_bucket", labels, Some("+Inf"), cumulative);
        let sum = Seconds::from_micros(histogram.sum_us);
        sample_line(samples, name, "_sum", labels, None, sum);
        sample_line(samples, name, "_count", labels, None, cumulative);
    }

    fn write(self, out: &mut String) {
        for family in self.families {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {} {}", family.name, escape_help(family.help));
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind.name());
            out.push_str(&family.samples);
        }
    }
}

fn sample_line(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &Labels,
    le: Option<&str>,
    value: impl std::fmt::Display,
) {
    out.push_str(name);
    out.push_str(suffix);
    let pairs = labels.pairs.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    let le_pair = le.map(|le| ("le", le));
    let mut first = true;
    for (label, value) in pairs.chain(le_pair) {
        out.push(if first { '{' } else { ',' });
        first = false;
        out.push_str(label);
        out.push_str("=\"");
        escape_label_value(out, value);
        out.push('"');
    }
    if !first {
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A sample's labels, in order, names valid and distinct.
#[derive(Debug, Clone, Default)]
struct Labels {
    pairs: Vec<(String, String)>,
}

impl Labels {
    /// The caller's constant labels: names sanitized, later duplicates
    /// dropped.
    fn constant(constant: &[(&str, String)]) -> Labels {
        let mut labels = Labels::default();
        for (name, value) in constant {
            let name = label_name(name);
            if !labels.pairs.iter().any(|(n, _)| *n == name) {
                labels.pairs.push((name, value.clone()));
            }
        }
        labels
    }

    /// These labels and `name="value"`; a constant label of that name is
    /// renamed `exported_<name>` (Prometheus's convention).
    fn with(&self, name: &str, value: &str) -> Labels {
        let mut labels = self.clone();
        if let Some(index) = labels.pairs.iter().position(|(n, _)| n == name) {
            let mut renamed = format!("exported_{name}");
            while labels.pairs.iter().any(|(n, _)| *n == renamed) {
                renamed.insert_str(0, "exported_");
            }
            labels.pairs[index].0 = renamed;
        }
        labels.pairs.push((name.to_string(), value.to_string()));
        labels
    }
}

/// `name` as a Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`, not
/// starting with `__` (reserved) nor named `le`.
fn label_name(name: &str) -> String {
    let mut sanitized: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if sanitized.is_empty() || sanitized.starts_with(|c: char| c.is_ascii_digit()) {
        sanitized.insert(0, '_');
    }
    while sanitized.starts_with("__") {
        sanitized.remove(0);
    }
    if sanitized == "le" || sanitized == "_" {
        sanitized.insert_str(0, "exported_");
    }
    sanitized
}

fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// An address without the `user:password@` of its authority, whether it
/// is a URL (`redis://u:p@h:1/0`) or a bare `u:p@h:1`.
fn without_userinfo(address: &str) -> String {
    let (scheme, rest) = match address.find("://") {
        Some(at) => address.split_at(at + 3),
        None => ("", address),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}{}{tail}", &authority[at + 1..]),
        None => address.to_string(),
    }
}

/// A duration in seconds, printed exactly from whole microseconds
/// (`0.00025`, `1`, `12.5`).
#[derive(Debug, Clone, Copy)]
struct Seconds {
    micros: u64,
}

impl Seconds {
    fn from_micros(micros: u64) -> Seconds {
        Seconds { micros }
    }

    fn from_millis(millis: u64) -> Seconds {
        Seconds {
            micros: millis.saturating_mul(1000),
        }
    }
}

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let whole = self.micros / 1_000_000;
        let fraction = self.micros % 1_000_000;
        if fraction == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{fraction:06}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::status::{
        DrainerSide, ListenerSide, ShipSide, SnapshotLoad, TwoWayStatus, WalStatus,
    };

    fn status() -> NodeStatus {
        NodeStatus {
            role: "sync".into(),
            taken_unix_ms: 1,
            listeners: vec![ListenerSide {
                listener_id: "l1".into(),
                partition: 0,
                source: "redis://app:hunter2@10.0.0.1:6379/0".into(),
                source_state: "ONLINE".into(),
                received_offset: 100,
                durable_offset: 90,
                last_log_id: 7,
                full_syncs: 1,
                full_sync_bytes_received: 1234,
                full_sync_bytes_total: Some(1234),
                heartbeat_latency_ms: Some(3),
                reconnects: 2,
                shipping: vec![ShipSide {
                    drainer_id: "d1".into(),
                    endpoint: "http://u:pw@127.0.0.1:9000".into(),
                    state: "ONLINE".into(),
                    lag: 4,
                    latency_ms: 1500,
                    entries_sent: 10,
                    ..ShipSide::default()
                }],
                ..ListenerSide::default()
            }],
            drainers: vec![DrainerSide {
                drainer_id: "d1".into(),
                partition: 0,
                target: "ops:s3cret@10.0.0.2:6379".into(),
                state: "BLOCKED".into(),
                applied: 5,
                durable: 7,
                lag: 2,
                latency_ms: 20,
                commands_applied: 42,
                commands_refused: 1,
                last_error: Some("ERR auth failed for redis://x:leaked@h".into()),
                snapshot_load: Some(SnapshotLoad {
                    epoch: 1,
                    rdb_bytes: 10,
                    bytes_loaded: 10,
                    keys_loaded: 3,
                    done: true,
                }),
                ..DrainerSide::default()
            }],
            two_way: Some(TwoWayStatus {
                conflicts: 3,
                last_conflict: Some("db 0 \"secret-key\"".into()),
                ..TwoWayStatus::default()
            }),
            wals: vec![WalStatus {
                wal: "listener".into(),
                bytes_written: 999,
                batches_written: 9,
                fsync: LatencyHistogram {
                    bounds_us: vec![250, 1000, 1_000_000],
                    counts: vec![1, 2, 3, 4],
                    sum_us: 1_500_250,
                },
            }],
        }
    }

    /// A parsed sample: name, labels, value.
    type Sample = (String, BTreeMap<String, String>, String);

    /// Every `# TYPE` line's family, and every sample as (name, labels,
    /// value); checks the basic grammar of each line on the way.
    fn parse(text: &str) -> (Vec<(String, String)>, Vec<Sample>) {
        let mut types = Vec::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.push((name.to_string(), kind.to_string()));
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{line}");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}').unwrap()),
                None => (series, ""),
            };
            assert!(name.starts_with("ferry_"), "{line}");
            let mut map = BTreeMap::new();
            let mut rest = labels;
            while !rest.is_empty() {
                let (label, after) = rest.split_once("=\"").unwrap();
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    let (at, c) = chars.next().unwrap();
                    match c {
                        '\\' => match chars.next().unwrap().1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        '"' => break at,
                        c => value.push(c),
                    }
                };
                assert!(
                    map.insert(label.to_string(), value).is_none(),
                    "duplicate label: {line}"
                );
                rest = after[end + 1..]
                    .strip_prefix(',')
                    .unwrap_or(&after[end + 1..]);
            }
            samples.push((name.to_string(), map, value.to_string()));
        }
        (types, samples)
    }

    #[test]
    fn each_family_has_one_header_across_readings() {
        let one = status();
        let mut two = status();
        two.role = "listener".into();
        let mut out = String::new();
        render(
            &mut out,
            &[
                (vec![("task", "orders".to_string())], &one),
                (vec![("task", "users".to_string())], &two),
            ],
        );
        let (types, samples) = parse(&out);
        let mut names: Vec<&String> = types.iter().map(|(name, _)| name).collect();
        let before = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), before, "a family is declared twice:\n{out}");
        let helps = out.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(helps, before);
        // The samples of a family follow its header, with no other family
        // in between.
        let mut seen = Vec::new();
        let mut current = String::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
                seen.push(current.clone());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| *b == current))
                    .unwrap_or(name);
                assert_eq!(base, current, "{line}");
            }
        }
        for kind in types.iter().map(|(_, kind)| kind) {
            assert!(["counter", "gauge", "histogram"].contains(&kind.as_str()));
        }
        for (name, kind) in &types {
            assert_eq!(name.ends_with("_total"), kind == "counter", "{name} {kind}");
        }
        let applied: Vec<_> = samples
            .iter()
            .filter(|(name, _, _)| name == "ferry_apply_commands_total")
            .collect();
        assert_eq!(applied.len(), 2);
        assert_eq!(applied[0].1["task"], "orders");
        assert_eq!(applied[0].1["role"], "sync");
        assert_eq!(applied[1].1["task"], "users");
        assert_eq!(applied[1].1["role"], "listener");
        assert_eq!(applied[0].2, "42");
    }

    #[test]
    fn label_values_are_escaped_and_names_sanitized() {
        let mut status = status();
        status.listeners[0].listener_id = "a\\b\"c\nd".into();
        let mut out = String::new();
        render(
            &mut out,
            &[(
                vec![
                    ("task", "x\"y".to_string()),
                    ("role", "mine".to_string()),
                    ("9bad-name", "v".to_string()),
                    ("__reserved", "r".to_string()),
                ],
                &status,
            )],
        );
        assert!(out.contains(r#"listener_id="a\\b\"c\nd""#), "{out}");
        assert!(out.contains(r#"task="x\"y""#), "{out}");
        let (_, samples) = parse(&out);
        let up = samples
            .iter()
            .find(|(name, _, _)| name == "ferry_source_up")
            .unwrap();
        assert_eq!(up.1["listener_id"], "a\\b\"c\nd");
        assert_eq!(up.1["role"], "sync");
        assert_eq!(up.1["exported_role"], "mine");
        assert_eq!(up.1["_9bad_name"], "v");
        assert_eq!(up.1["_reserved"], "r");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_monotonic() {
        let mut status = status();
        // A garbled reading: a bound that goes back, counts beyond bounds.
        status.wals[0].fsync = LatencyHistogram {
            bounds_us: vec![250, 100, 5000],
            counts: vec![1, 2, 3, 4, 5],
            sum_us: 10,
        };
        status.wals.push(WalStatus {
            wal: "drainer".into(),
            ..WalStatus::default()
        });
        let out = render_node(&status);
        let (_, samples) = parse(&out);
        for wal in ["listener", "drainer"] {
            let buckets: Vec<(String, u64)> = samples
                .iter()
                .filter(|(name, labels, _)| {
                    name == "ferry_wal_fsync_seconds_bucket" && labels["wal"] == wal
                })
                .map(|(_, labels, value)| (labels["le"].clone(), value.parse().unwrap()))
                .collect();
            let bounds: Vec<f64> = buckets
                .iter()
                .map(|(le, _)| {
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    }
                })
                .collect();
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{wal}: {buckets:?}");
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{wal}: {buckets:?}"
            );
            let (last_le, last) = buckets.last().unwrap();
            assert_eq!(last_le, "+Inf");
            let count = samples
                .iter()
                .find(|(name, labels, _)| {
                    name == "ferry_wal_fsync_seconds_count" && labels["wal"] == wal
                })
                .unwrap();
            assert_eq!(count.2.parse::<u64>().unwrap(), *last);
        }
        assert!(
            out.contains(
                "ferry_wal_fsync_seconds_bucket{role=\"sync\",wal=\"listener\",le=\"0.00025\"} 1\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "ferry_wal_fsync_seconds_bucket{role=\"sync\",wal=\"listener\",le=\"0.005\"} 6\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "ferry_wal_fsync_seconds_bucket{role=\"sync\",wal=\"listener\",le=\"+Inf\"} 15\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("ferry_wal_fsync_seconds_sum{role=\"sync\",wal=\"listener\"} 0.00001\n"),
            "{out}"
        );
    }

    #[test]
    fn no_credentials_and_no_free_text() {
        let out = render_node(&status());
        for secret in [
            "hunter2",
            "app:",
            "pw@",
            "s3cret",
            "ops:",
            "leaked",
            "secret-key",
            "@",
        ] {
            assert!(!out.contains(secret), "{secret:?} in:\n{out}");
        }
        assert!(out.contains("source=\"redis://10.0.0.1:6379/0\""), "{out}");
        assert!(out.contains("target=\"10.0.0.2:6379\""), "{out}");
        assert!(out.contains("endpoint=\"http://127.0.0.1:9000\""), "{out}");
    }

    #[test]
    fn userinfo_is_removed_from_any_address() {
        for (address, shown) in [
            ("redis://u:p@h:1/2", "redis://h:1/2"),
            ("rediss://:p@h:1", "rediss://h:1"),
            ("u:p@h:1", "h:1"),
            ("u:p@x@h:1", "h:1"),
            ("h:1", "h:1"),
            ("redis://h:1/a@b", "redis://h:1/a@b"),
            ("", ""),
            ("@", ""),
        ] {
            assert_eq!(without_userinfo(address), shown, "{address}");
        }
    }

    #[test]
    fn states_are_state_sets_and_values_are_exact() {
        let out = render_node(&status());
        assert!(out.contains("ferry_apply_state{role=\"sync\",drainer_id=\"d1\",partition=\"0\",state=\"BLOCKED\"} 1\n"), "{out}");
        assert!(out.contains("ferry_apply_state{role=\"sync\",drainer_id=\"d1\",partition=\"0\",state=\"ONLINE\"} 0\n"), "{out}");
        assert!(out.contains("ferry_ship_lag_seconds{role=\"sync\",listener_id=\"l1\",partition=\"0\",drainer_id=\"d1\"} 1.5\n"), "{out}");
        assert!(out.contains("ferry_source_heartbeat_latency_seconds{role=\"sync\",listener_id=\"l1\",partition=\"0\"} 0.003\n"), "{out}");
        let mut odd = status();
        odd.listeners[0].source_state = "SOMETHING_NEW".into();
        let out = render_node(&odd);
        assert!(out.contains("state=\"SOMETHING_NEW\"} 1\n"), "{out}");
        assert_eq!(Seconds::from_micros(0).to_string(), "0");
        assert_eq!(
            Seconds::from_micros(u64::MAX).to_string(),
            "18446744073709.551615"
        );
        assert_eq!(
            Seconds::from_millis(u64::MAX).to_string(),
            "18446744073709.551615"
        );
    }

    #[test]
    fn an_empty_reading_renders_only_what_it_has() {
        let out = render_node(&NodeStatus::default());
        assert_eq!(out, "");
        let mut out = String::new();
        render(&mut out, &[]);
        assert_eq!(out, "");
    }
}
