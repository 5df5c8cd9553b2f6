//! The exactly-once checkpoint an applier keeps in its target.
//!
//! Key: `__ferry:checkpoint:<drainer-id>:<partition>` in db 0 (under
//! [`crate::record::INTERNAL_PREFIX`], so it is never taken for data).
//! Value, ASCII, one of:
//!
//! ```text
//! v2 applied=<log id> epoch=<epoch> log=<16 hex digits>
//! v2 loading=<log id> epoch=<epoch> log=<16 hex digits>
//! v3 applied=<log id> epoch=<epoch> log=<16 hex digits> src=<16 hex digits>:<offset>
//! ```
//!
//! - `log=T`: the log tag of the drainer WAL partition whose ids these are
//!   ([`crate::wal::PartitionHistory::log_tag`]). A WAL dir deleted and
//!   started again, or swapped for another drainer's, has another tag: its
//!   log ids are not the ones the checkpoint counts, so the applier does not
//!   resume after them (it loads the snapshot marker the WAL starts with,
//!   or waits for one).
//! - `v1` values (written before the log tag existed, without the field)
//!   are read as counting the WAL's ids, as they always were; the applier
//!   writes `v2` from then on. An older ferry refuses a `v2` value
//!   ("unsupported version v2").
//! - `v3`, `src=H:O`: the entry at the applied log id was applied before the
//!   WAL write holding it was durable (`apply` module doc, "Applying before
//!   the fsync"). `H` is [`SourceMark::replid`] (a hash of the source's
//!   replication id) and `O` the source offset after that entry: after a
//!   crash the applier resumes after it only if the WAL holds an entry with
//!   this source position there. Written only then: every other value is
//!   `v2`, which an older ferry still reads.
//!
//! - `applied=L epoch=E`: every WAL entry up to and including `L` is applied,
//!   on top of snapshot epoch `E` (0: no snapshot was ever loaded; the data
//!   came from the log alone). The applier resumes at `L + 1`.
//! - `loading=M epoch=E`: the snapshot marker at log id `M` (epoch `E`) is
//!   being loaded: the target was flushed in the same transaction that wrote
//!   this value and holds a partial data set. The applier resumes by loading
//!   the marker at `M` again, from the flush.
//!
//! The version prefix changes if the fields ever do; an unknown version or a
//! malformed value is [`CheckpointError`], never guessed at.

use std::fmt;

use crate::position::{LogId, PartitionId};
use crate::record::INTERNAL_PREFIX;
use crate::wal::SourcePosition;

/// Longest value accepted when reading a checkpoint back.
pub const MAX_CHECKPOINT_LEN: usize = 256;

/// Where in the source's replication stream an entry ends: what a `v3`
/// checkpoint keeps of the entry it names (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceMark {
    /// FNV-1a (64 bits) of the source's replication id: the same stream
    /// gives the same hash, and another id a different one but by a 2^-64
    /// chance.
    pub replid: u64,
    /// The replication offset after the entry.
    pub offset: u64,
}

impl SourceMark {
    /// The mark of an entry at `source`.
    pub fn of(source: &SourcePosition) -> SourceMark {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in source.replid.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        SourceMark {
            replid: hash,
            offset: source.offset.0,
        }
    }
}

/// What the target's data set is, as far as this applier is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Entries up to and including `log_id` are applied. `source`: the entry
    /// at `log_id` was applied before it was durable (module doc, `v3`).
    Applied {
        log_id: LogId,
        epoch: u64,
        log: u64,
        source: Option<SourceMark>,
    },
    /// The snapshot marker at `log_id` is being loaded.
    Loading { log_id: LogId, epoch: u64, log: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("checkpoint value {value:?} is not valid: {why}")]
pub struct CheckpointError {
    pub value: String,
    pub why: String,
}

/// The checkpoint key of `drainer_id`'s applier of `partition`.
pub fn checkpoint_key(drainer_id: &str, partition: PartitionId) -> Vec<u8> {
    let mut key = INTERNAL_PREFIX.to_vec();
    key.extend_from_slice(format!(":checkpoint:{drainer_id}:{partition}").as_bytes());
    key
}

impl Checkpoint {
    /// The first log id still to be applied.
    pub fn resume_at(&self) -> LogId {
        match *self {
            Checkpoint::Applied { log_id, .. } => log_id.next(),
            Checkpoint::Loading { log_id, .. } => log_id,
        }
    }

    /// The log tag of the WAL whose ids this counts; 0 for a `v1` value
    /// (no tag).
    pub fn log(&self) -> u64 {
        match *self {
            Checkpoint::Applied { log, .. } | Checkpoint::Loading { log, .. } => log,
        }
    }

    /// The last log id whose effect the target fully holds (entries before a
    /// snapshot being loaded no longer count: the flush removed them).
    pub fn applied(&self) -> LogId {
        match *self {
            Checkpoint::Applied { log_id, .. } => log_id,
            Checkpoint::Loading { log_id, .. } => log_id.prev(),
        }
    }

    /// The source position of the applied entry, when it was applied
    /// before it was durable (`v3`).
    pub fn source(&self) -> Option<SourceMark> {
        match *self {
            Checkpoint::Applied { source, .. } => source,
            Checkpoint::Loading { .. } => None,
        }
    }

    pub fn epoch(&self) -> u64 {
        match *self {
            Checkpoint::Applied { epoch, .. } | Checkpoint::Loading { epoch, .. } => epoch,
        }
    }

    pub fn encode(&self) -> String {
        self.to_string()
    }

    pub fn decode(value: &[u8]) -> Result<Checkpoint, CheckpointError> {
        let shown = String::from_utf8_lossy(&value[..value.len().min(MAX_CHECKPOINT_LEN)]);
        let fail = |why: &str| CheckpointError {
            value: shown.to_string(),
            why: why.to_string(),
        };
        if value.len() > MAX_CHECKPOINT_LEN {
            return Err(fail(&format!("longer than {MAX_CHECKPOINT_LEN} bytes")));
        }
        let text = std::str::from_utf8(value).map_err(|_| fail("not UTF-8"))?;
        let mut fields = text.split(' ');
        let (tagged, marked) = match fields.next() {
            Some("v1") => (false, false),
            Some("v2") => (true, false),
            Some("v3") => (true, true),
            Some(v) if v.starts_with('v') => {
                return Err(fail(&format!(
                    "unsupported version {v} (this ferry reads v1, v2 and v3)"
                )))
            }
            _ => return Err(fail("no version prefix")),
        };
        let number = |field: Option<&str>, name: &str| -> Result<(String, u64), CheckpointError> {
            let field = field.ok_or_else(|| fail(&format!("no {name} field")))?;
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| fail(&format!("{name} field {field:?} has no '='")))?;
            let value = value
                .parse::<u64>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| fail(&format!("{key} is not a number")))?;
            Ok((key.to_string(), value))
        };
        let (phase, log_id) = number(fields.next(), "phase")?;
        let (epoch_key, epoch) = number(fields.next(), "epoch")?;
        if epoch_key != "epoch" {
            return Err(fail(&format!("expected epoch=, found {epoch_key}=")));
        }
        let log = if tagged {
            let field = fields.next().ok_or_else(|| fail("no log field"))?;
            let hex = field
                .strip_prefix("log=")
                .ok_or_else(|| fail(&format!("expected log=, found {field:?}")))?;
            u64::from_str_radix(hex, 16)
                .ok()
                .filter(|log| *log != 0 && hex.len() == 16)
                .ok_or_else(|| fail("log is not 16 hex digits of a non-zero tag"))?
        } else {
            0
        };
        let source = if marked {
            let field = fields.next().ok_or_else(|| fail("no src field"))?;
            let (hash, offset) = field
                .strip_prefix("src=")
                .and_then(|mark| mark.split_once(':'))
                .ok_or_else(|| fail(&format!("expected src=H:O, found {field:?}")))?;
            let replid = u64::from_str_radix(hash, 16)
                .ok()
                .filter(|_| hash.len() == 16)
                .ok_or_else(|| fail("src's hash is not 16 hex digits"))?;
            let offset = offset
                .parse::<u64>()
                .ok()
                .filter(|_| offset.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| fail("src's offset is not a number"))?;
            Some(SourceMark { replid, offset })
        } else {
            None
        };
        if fields.next().is_some() {
            return Err(fail("trailing fields"));
        }
        let log_id = LogId(log_id);
        match phase.as_str() {
            "applied" if marked && log_id == LogId::ZERO => {
                Err(fail("a v3 value names an entry (applied=0)"))
            }
            "applied" => Ok(Checkpoint::Applied {
                log_id,
                epoch,
                log,
                source,
            }),
            "loading" if marked => Err(fail("a v3 value is always applied=")),
            "loading" if log_id > LogId::ZERO => Ok(Checkpoint::Loading { log_id, epoch, log }),
            "loading" => Err(fail("loading a snapshot at log id 0")),
            other => Err(fail(&format!("unknown phase {other:?}"))),
        }
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (phase, log_id, epoch, log, source) = match *self {
            Checkpoint::Applied {
                log_id,
                epoch,
                log,
                source,
            } => ("applied", log_id, epoch, log, source),
            Checkpoint::Loading { log_id, epoch, log } => ("loading", log_id, epoch, log, None),
        };
        if let Some(SourceMark { replid, offset }) = source.filter(|_| log != 0) {
            write!(
                f,
                "v3 {phase}={log_id} epoch={epoch} log={log:016x} src={replid:016x}:{offset}"
            )
        } else if log == 0 {
            // Only a value read as v1 has no tag; it is written back as it was.
            write!(f, "v1 {phase}={log_id} epoch={epoch}")
        } else {
            write!(f, "v2 {phase}={log_id} epoch={epoch} log={log:016x}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_resumes() {
        let applied = Checkpoint::Applied {
            log_id: LogId(1234),
            epoch: 7,
            log: 0xab,
            source: None,
        };
        assert_eq!(
            applied.encode(),
            "v2 applied=1234 epoch=7 log=00000000000000ab"
        );
        assert_eq!(Checkpoint::decode(applied.encode().as_bytes()), Ok(applied));
        assert_eq!(applied.resume_at(), LogId(1235));
        assert_eq!(applied.applied(), LogId(1234));
        assert_eq!(applied.log(), 0xab);
        // Written before the log tag: no tag, and written back the same.
        let legacy = Checkpoint::decode(b"v1 applied=1234 epoch=7").unwrap();
        assert_eq!(legacy.log(), 0);
        assert_eq!(legacy.encode(), "v1 applied=1234 epoch=7");
        // Applied before it was durable: its source position goes with it.
        let mark = SourceMark::of(&SourcePosition {
            replid: "8a1b".into(),
            offset: crate::position::ReplOffset(99),
            db: 0,
        });
        assert_ne!(
            mark.replid,
            SourceMark::of(&SourcePosition {
                replid: "8a1c".into(),
                ..SourcePosition::default()
            })
            .replid
        );
        let early = Checkpoint::Applied {
            log_id: LogId(1234),
            epoch: 7,
            log: 0xab,
            source: Some(mark),
        };
        assert_eq!(
            early.encode(),
            format!(
                "v3 applied=1234 epoch=7 log=00000000000000ab src={:016x}:99",
                mark.replid
            )
        );
        assert_eq!(Checkpoint::decode(early.encode().as_bytes()), Ok(early));
        assert_eq!(early.source(), Some(mark));
        assert_eq!(early.resume_at(), LogId(1235));
        let loading = Checkpoint::Loading {
            log_id: LogId(40),
            epoch: 2,
            log: u64::MAX,
        };
        assert_eq!(Checkpoint::decode(loading.encode().as_bytes()), Ok(loading));
        assert_eq!(loading.resume_at(), LogId(40));
        assert_eq!(loading.applied(), LogId(39));
        assert_eq!(
            checkpoint_key("d1", PartitionId(3)),
            b"__ferry:checkpoint:d1:3".to_vec()
        );
    }

    #[test]
    fn refuses_malformed_values() {
        let long = vec![b'v'; MAX_CHECKPOINT_LEN + 1];
        let cases: [&[u8]; 22] = [
            b"",
            b"v3 applied=0 epoch=0 log=00000000000000ab src=00000000000000ab:5",
            b"v4 applied=1 epoch=0",
            b"v3 applied=1 epoch=0 log=00000000000000ab",
            b"v3 applied=1 epoch=0 log=00000000000000ab src=12:5",
            b"v3 applied=1 epoch=0 log=00000000000000ab src=00000000000000ab",
            b"v3 applied=1 epoch=0 log=00000000000000ab src=00000000000000ab:x",
            b"v3 loading=1 epoch=0 log=00000000000000ab src=00000000000000ab:5",
            b"v3 applied=1 epoch=0 log=00000000000000ab src=00000000000000ab:5 more",
            b"v2 applied=1 epoch=0",
            b"v2 applied=1 epoch=0 log=0000000000000000",
            b"v2 applied=1 epoch=0 log=abc",
            b"v2 applied=1 epoch=0 tag=00000000000000ab",
            b"applied=1 epoch=0",
            b"v1 applied=1",
            b"v1 applied=x epoch=0",
            b"v1 applied=+1 epoch=0",
            b"v1 done=1 epoch=0",
            b"v1 applied=1 epoch=0 more",
            b"v1 applied=1 era=0",
            b"v1 loading=0 epoch=0",
            &long,
        ];
        for value in cases {
            assert!(
                Checkpoint::decode(value).is_err(),
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        let error = Checkpoint::decode(b"v4 applied=1 epoch=0").unwrap_err();
        assert!(error.why.contains("unsupported version v4"), "{error}");
    }
}
