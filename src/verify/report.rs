//! The outcome of a verify: per-db counts and the differing keys, rendered
//! as a table ([`render_report`]) or serialised as one JSON object (the
//! serde form of [`VerifyReport`]).
//!
//! Keys are shown escaped ([`escape_key`]): valid UTF-8 text stays as is,
//! control characters and bytes that are not UTF-8 become `\xNN`, so a
//! report is always one line per key and valid JSON.

use crate::table::table;
use std::fmt::Write as _;

use serde::Serialize;

use super::{DiffKind, Mode};

/// The whole outcome.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The source, without its password.
    pub source: String,
    pub target: String,
    pub mode: Mode,
    /// Passes allowed per db.
    pub passes_max: u32,
    /// No difference remained after the last pass, in any db.
    pub equal: bool,
    pub dbs: Vec<DbReport>,
    /// Keys that differ after the last pass, all dbs.
    pub differences_total: u64,
    /// The first of them (sorted by db, then key), at most the configured cap.
    pub differences: Vec<KeyReport>,
    /// Differing keys left out of [`VerifyReport::differences`].
    pub differences_omitted: u64,
    /// Commands sent to the source and to the target (all their servers).
    pub source_commands: u64,
    pub target_commands: u64,
    /// What each side is, and how many masters were walked.
    pub source_topology: SideTopology,
    pub target_topology: SideTopology,
    pub elapsed_ms: u64,
}

/// One side: a standalone server or a Redis Cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SideTopology {
    /// A Redis Cluster (`cluster_enabled:1`).
    pub cluster: bool,
    /// Masters whose keys were walked with `SCAN` (a standalone server
    /// counts as one; 0 when no db was compared).
    pub masters_scanned: u32,
    /// Rounds of the walk that walked again the slots whose owner or
    /// migration changed under it (a resharding during the verify).
    pub rewalks: u32,
}

impl SideTopology {
    fn describe(&self) -> String {
        if self.cluster && self.rewalks > 0 {
            format!(
                "cluster, {} masters scanned, slots that moved walked again {} times",
                self.masters_scanned, self.rewalks
            )
        } else if self.cluster {
            format!("cluster, {} masters scanned", self.masters_scanned)
        } else {
            "standalone".to_string()
        }
    }
}

/// One db.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DbReport {
    /// The source db.
    pub db: u32,
    /// The target db compared with it (`db` unless `--db-map`).
    pub target_db: u32,
    /// Keys compared in the first pass (scanned on the source, plus keys
    /// found on the target only; SCAN may return a key twice).
    pub keys_checked: u64,
    /// Keys with each kind of difference after the last pass (a key with a
    /// TTL and a value difference counts in both).
    pub missing: u64,
    pub extra: u64,
    #[serde(rename = "type")]
    pub type_: u64,
    pub ttl: u64,
    pub value: u64,
    /// Keys on the target only that still expire there within the expire
    /// grace after the last pass (expired on the source, waiting for its
    /// `DEL`): not differences.
    pub expiring: u64,
    /// Passes run (stops early once nothing differs).
    pub passes: u32,
    /// Keys differing after each pass.
    pub differing_after_pass: Vec<u64>,
    pub elapsed_ms: u64,
}

/// One differing key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyReport {
    pub db: u32,
    /// The key, escaped (see [`escape_key`], without the quotes).
    pub key: String,
    pub kinds: Vec<DiffKind>,
    /// What differs, one clause per kind, `; `-separated.
    pub detail: String,
}

/// `"key"` with `\\`, `\"`, control characters and non-UTF-8 bytes escaped.
pub fn escape_key(key: &[u8]) -> String {
    format!("\"{}\"", escape_bytes(key))
}

/// [`escape_key`] without the quotes.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// A value for a message: escaped and quoted, cut after 40 bytes.
pub fn show_value(value: &[u8]) -> String {
    const SHOWN: usize = 40;
    if value.len() <= SHOWN {
        escape_key(value)
    } else {
        format!(
            "\"{}…\" ({} bytes)",
            escape_bytes(&value[..SHOWN]),
            value.len()
        )
    }
}

/// The report as text: a header, the per-db table, the differing keys and a
/// verdict line.
pub fn render_report(report: &VerifyReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ferry verify: {} → {}, mode {}, up to {} passes, {} ms",
        report.source,
        report.target,
        report.mode.name(),
        report.passes_max,
        report.elapsed_ms
    );
    if report.source_topology.cluster || report.target_topology.cluster {
        let _ = writeln!(
            out,
            "source: {}; target: {}",
            report.source_topology.describe(),
            report.target_topology.describe()
        );
    }
    let headers = [
        "Db",
        "Keys Checked",
        "Missing",
        "Extra",
        "Type",
        "TTL",
        "Value",
        "Expiring",
        "Passes",
        "Time (ms)",
    ];
    let rows: Vec<Vec<String>> = report
        .dbs
        .iter()
        .map(|db| {
            vec![
                if db.db == db.target_db {
                    db.db.to_string()
                } else {
                    format!("{} → {}", db.db, db.target_db)
                },
                db.keys_checked.to_string(),
                db.missing.to_string(),
                db.extra.to_string(),
                db.type_.to_string(),
                db.ttl.to_string(),
                db.value.to_string(),
                db.expiring.to_string(),
                db.passes.to_string(),
                db.elapsed_ms.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("(no db holds keys on either side)\n");
    } else {
        table(&mut out, &headers, &rows);
    }
    if report.differences_total > 0 {
        let _ = writeln!(out, "\nDiffering keys ({}):", report.differences_total);
        for key in &report.differences {
            let kinds: Vec<&str> = key.kinds.iter().map(|k| k.name()).collect();
            let _ = writeln!(
                out,
                "  db {} \"{}\" [{}]: {}",
                key.db,
                key.key,
                kinds.join(", "),
                key.detail
            );
        }
        if report.differences_omitted > 0 {
            let _ = writeln!(out, "  … and {} more", report.differences_omitted);
        }
    }
    let checked: u64 = report.dbs.iter().map(|db| db.keys_checked).sum();
    let expiring: u64 = report.dbs.iter().map(|db| db.expiring).sum();
    if expiring > 0 {
        let _ = writeln!(
            out,
            "\n{expiring} keys on the target only are expiring within the expire grace (expired on \
             the source, waiting for its DEL): not differences"
        );
    }
    if report.equal {
        let _ = writeln!(out, "\nequal: {checked} keys checked, no difference");
    } else {
        let _ = writeln!(
            out,
            "\ndifferent: {} of {checked} keys differ after the last pass",
            report.differences_total
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_escaped() {
        assert_eq!(escape_key(b"plain:key"), "\"plain:key\"");
        assert_eq!(escape_key("café".as_bytes()), "\"café\"");
        assert_eq!(escape_key(b"a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(escape_key(b"\xff\xfe\n"), "\"\\xff\\xfe\\x0a\"");
        assert_eq!(escape_key(b"caf\xc3"), "\"caf\\xc3\"");
        assert_eq!(
            show_value(&[b'x'; 50]),
            format!("\"{}…\" (50 bytes)", "x".repeat(40))
        );
    }

    #[test]
    fn renders_a_table_and_the_keys() {
        let report = VerifyReport {
            source: "redis://127.0.0.1:1".into(),
            target: "redis://127.0.0.1:2".into(),
            mode: Mode::Full,
            passes_max: 3,
            equal: false,
            dbs: vec![DbReport {
                db: 0,
                keys_checked: 12,
                missing: 1,
                value: 1,
                expiring: 2,
                passes: 3,
                differing_after_pass: vec![3, 2, 2],
                elapsed_ms: 7,
                ..DbReport::default()
            }],
            differences_total: 3,
            differences: vec![
                KeyReport {
                    db: 0,
                    key: "a".into(),
                    kinds: vec![DiffKind::Missing],
                    detail: "missing on the target (string on the source)".into(),
                },
                KeyReport {
                    db: 0,
                    key: "b\\xff".into(),
                    kinds: vec![DiffKind::Value],
                    detail: "bytes differ from offset 3".into(),
                },
            ],
            differences_omitted: 1,
            source_commands: 10,
            target_commands: 10,
            source_topology: SideTopology {
                cluster: false,
                masters_scanned: 1,
                rewalks: 0,
            },
            target_topology: SideTopology {
                cluster: false,
                masters_scanned: 1,
                rewalks: 0,
            },
            elapsed_ms: 9,
        };
        let expected = "\
ferry verify: redis://127.0.0.1:1 → redis://127.0.0.1:2, mode full, up to 3 passes, 9 ms
+----+--------------+---------+-------+------+-----+-------+----------+--------+-----------+
| Db | Keys Checked | Missing | Extra | Type | TTL | Value | Expiring | Passes | Time (ms) |
+----+--------------+---------+-------+------+-----+-------+----------+--------+-----------+
| 0  | 12           | 1       | 0     | 0    | 0   | 1     | 2        | 3      | 7         |
+----+--------------+---------+-------+------+-----+-------+----------+--------+-----------+

Differing keys (3):
  db 0 \"a\" [missing]: missing on the target (string on the source)
  db 0 \"b\\xff\" [value]: bytes differ from offset 3
  … and 1 more

2 keys on the target only are expiring within the expire grace (expired on the source, waiting for its DEL): not differences

different: 3 of 12 keys differ after the last pass
";
        assert_eq!(render_report(&report), expected);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["dbs"][0]["type"], 0);
        assert_eq!(json["dbs"][0]["expiring"], 2);
        assert_eq!(json["differences"][1]["kinds"][0], "value");
        assert_eq!(json["mode"], "full");
        assert_eq!(json["source_topology"]["cluster"], false);
        assert_eq!(json["target_topology"]["masters_scanned"], 1);

        // A cluster side says so on a line of its own, after the header.
        let mut clustered = report.clone();
        clustered.source_topology = SideTopology {
            cluster: true,
            masters_scanned: 3,
            rewalks: 0,
        };
        let text = render_report(&clustered);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "source: cluster, 3 masters scanned; target: standalone"
        );
        assert_eq!(text.replace(&format!("{}\n", lines[1]), ""), expected);
    }
}
