//! The dead-letter file: entries the applier skipped, kept so that nothing
//! is skipped silently and so that they can be replayed by hand.
//!
//! In: a skipped WAL entry (its log id, db and commands) and why the target
//! refused it. Out: one record appended to
//! `<dead-letter-dir>/<drainer-id>-<partition>.resp` and fsync'd, before
//! the applier moves its checkpoint past the entry.
//!
//! # Format
//!
//! The file is a stream of RESP commands that `redis-cli --pipe` sends as
//! is (`redis-cli -h HOST -p PORT --pipe < FILE`). One record per skipped
//! entry:
//!
//! ```text
//! ECHO "ferry-dead-letter v1 log_id=<N> drainer=<id> partition=<P> db=<D> bytes=<B> \
//!       unix_ms=<T> by=<operator|on-refused> command=<NAME> error=<the target's error>"
//! SELECT <db of the first command>
//! [MULTI]            a source transaction stays one
//! <the entry's commands, as the applier would have sent them: translated
//!  for the keyspace this sync owns, a SELECT before each change of db>
//! [EXEC]
//! ```
//!
//! `db` in the header is the db the source ran the entry in. An entry the
//! applier refused itself (it could not be translated for the owned
//! keyspace) is recorded as the source sent it, each command in the target
//! db its source db maps to (`[filter] db-map`; the source's db when it maps
//! nowhere).
//!
//! The header is an `ECHO` so that a replay just prints it back; `bytes` is
//! the length of the rest of the record (from `SELECT` on), which is how a
//! reader finds the next header without parsing the commands. The error
//! text runs to the end of the header (newlines in it become spaces).
//!
//! # Durability and duplicates
//!
//! A record is written at the end of the file (with one `write`, unless it
//! carries a streamed argument: then in pieces as its fragments are read)
//! and `fsync`ed before [`DeadLetter::record`] returns; the applier moves the
//! checkpoint past the entry only after that, in a normal `MULTI`/`EXEC`,
//! so a skipped entry is recorded before it is skipped and skipped exactly
//! once. A crash after the record and before that `EXEC` brings the
//! applier back to the same entry: it is skipped again and not recorded a
//! second time (a record with the same log id and the same bytes is already
//! there). A crash in the middle of a write leaves a torn record at the
//! end, which the next open cuts off (its entry was not skipped). The
//! directory is created `0700` and the file `0600`: it holds data.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::BytesMut;

use super::batch::StreamedPlace;
use super::status::RefusedCommand;
use crate::position::{LogId, PartitionId};
use crate::redis::command::Command;
use crate::redis::resp::{encode_array_header, encode_bulk, encode_bulk_header, encode_command};

/// First word of every record's header.
pub const MAGIC: &str = "ferry-dead-letter";
/// Longest header accepted when reading a file back.
const MAX_HEADER: usize = 8 << 10;
/// Records remembered (log id, hash) to skip a scan of the file when the
/// same entry is recorded again.
const RECENT: usize = 64;

/// Who decided to skip an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SkippedBy {
    /// `ferry skip`.
    Operator,
    /// `on-refused = "skip-and-record"`.
    OnRefused,
}

impl SkippedBy {
    fn as_str(self) -> &'static str {
        match self {
            SkippedBy::Operator => "operator",
            SkippedBy::OnRefused => "on-refused",
        }
    }
}

/// One entry to record.
pub(crate) struct DeadEntry<'a> {
    pub log_id: LogId,
    /// The db the source ran it in.
    pub db: u32,
    /// The commands, each with the target db it runs in.
    pub commands: &'a [(u32, Command)],
    pub transaction: bool,
    pub by: SkippedBy,
    pub refused: &'a RefusedCommand,
    /// Streamed arguments of `commands` (empty placeholders there), in
    /// command and argument order; their bytes come from a [`Fill`].
    pub streams: &'a [StreamedPlace],
}

/// Produces the bytes of a streamed argument, piece by piece, into the sink
/// it is given (the applier reads them from the WAL's fragments); exactly
/// `place.len` bytes, or an error.
pub(crate) type Fill<'a> =
    &'a mut dyn FnMut(&StreamedPlace, &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()>;

/// Encodes the record body (from `SELECT` on) into `out`, in pieces: a big
/// argument's bytes go through as `fill` produces them, never held whole.
fn encode_body(
    entry: &DeadEntry<'_>,
    fill: &mut Option<Fill<'_>>,
    out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut body = BytesMut::new();
    let select = |db: u32, body: &mut BytesMut| {
        encode_command(
            &Command::from_parts(["SELECT".to_string(), db.to_string()]).args,
            body,
        );
    };
    let mut db = entry.commands.first().map_or(entry.db, |(db, _)| *db);
    select(db, &mut body);
    if entry.transaction {
        encode_command(&Command::from_parts(["MULTI"]).args, &mut body);
    }
    let mut streams = entry.streams.iter().peekable();
    for (index, (cmd_db, cmd)) in entry.commands.iter().enumerate() {
        if *cmd_db != db {
            select(*cmd_db, &mut body);
            db = *cmd_db;
        }
        if !streams.peek().is_some_and(|place| place.command == index) {
            encode_command(&cmd.args, &mut body);
            continue;
        }
        encode_array_header(cmd.args.len(), &mut body);
        for (arg_index, arg) in cmd.args.iter().enumerate() {
            let Some(place) =
                streams.next_if(|place| place.command == index && place.arg == arg_index)
            else {
                encode_bulk(arg, &mut body);
                continue;
            };
            encode_bulk_header(place.len, &mut body);
            out(&body)?;
            body.clear();
            let Some(fill) = fill.as_mut() else {
                return Err(io::Error::other("no source for a streamed argument"));
            };
            let mut produced = 0u64;
            fill(place, &mut |piece: &[u8]| {
                produced += piece.len() as u64;
                out(piece)
            })?;
            if produced != place.len {
                return Err(io::Error::other(format!(
                    "a streamed argument of {} bytes produced {produced}",
                    place.len
                )));
            }
            body.extend_from_slice(b"\r\n");
        }
    }
    if entry.transaction {
        encode_command(&Command::from_parts(["EXEC"]).args, &mut body);
    }
    out(&body)
}

/// Why an entry could not be recorded (so it is not skipped).
#[derive(Debug, thiserror::Error)]
#[error("dead-letter file {}: {what}", path.display())]
pub struct DeadLetterError {
    pub path: PathBuf,
    pub what: String,
}

/// The dead-letter file of one applier, opened on first use.
pub(crate) struct DeadLetter {
    path: PathBuf,
    open: Option<Opened>,
}

struct Opened {
    file: File,
    /// Length of the complete records.
    len: u64,
    /// Highest log id recorded in the file.
    max_recorded: Option<LogId>,
    /// The latest records: log id, body length and hash.
    recent: VecDeque<(LogId, u64, u64)>,
}

/// A record's header, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    log_id: LogId,
    bytes: u64,
}

/// The file of `drainer_id`'s applier of `partition` in `dir`.
pub(crate) fn file_path(dir: &Path, drainer_id: &str, partition: PartitionId) -> PathBuf {
    dir.join(format!("{drainer_id}-{partition}.resp"))
}

/// FNV-1a: a stable hash to compare record bodies without holding them.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Text safe for the one-line header.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl DeadLetter {
    pub fn new(path: PathBuf) -> DeadLetter {
        DeadLetter { path, open: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, what: impl Into<String>) -> DeadLetterError {
        DeadLetterError {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// Appends `entry` and fsyncs, unless the file already holds it (same
    /// log id, same commands). Returns whether it wrote. Blocking. The bytes
    /// of its streamed arguments come from `fill` (twice: once to hash the
    /// body, once to write it).
    pub fn record(
        &mut self,
        entry: &DeadEntry<'_>,
        mut fill: Option<Fill<'_>>,
        drainer_id: &str,
        partition: PartitionId,
        now_unix_ms: u64,
    ) -> Result<bool, DeadLetterError> {
        if self.open.is_none() {
            self.open = Some(self.open_file()?);
        }
        let mut hash = Fnv::new();
        let mut body_len = 0u64;
        encode_body(entry, &mut fill, &mut |piece| {
            hash.update(piece);
            body_len += piece.len() as u64;
            Ok(())
        })
        .map_err(|error| self.fail(format!("reading entry {}: {error}", entry.log_id)))?;
        let key = (entry.log_id, body_len, hash.0);
        if self.holds(key)? {
            return Ok(false);
        }
        let header = format!(
            "{MAGIC} v1 log_id={} drainer={drainer_id} partition={partition} db={} bytes={} \
             unix_ms={now_unix_ms} by={} command={} error={}",
            entry.log_id,
            entry.db,
            body_len,
            entry.by.as_str(),
            one_line(&entry.refused.command).replace(' ', "_"),
            one_line(&entry.refused.error),
        );
        let mut head = BytesMut::with_capacity(header.len() + 32);
        encode_command(
            &Command::from_parts(["ECHO", header.as_str()]).args,
            &mut head,
        );
        let path = self.path.clone();
        let Some(open) = self.open.as_mut() else {
            return Err(self.fail("not open"));
        };
        // A small entry is one write; a big one goes in pieces (a torn
        // record is cut off at the next open either way).
        let mut written_len = head.len() as u64;
        let mut pending = head;
        let file = &mut open.file;
        let written = encode_body(entry, &mut fill, &mut |piece| {
            written_len += piece.len() as u64;
            if pending.len() + piece.len() <= 1 << 20 {
                pending.extend_from_slice(piece);
                return Ok(());
            }
            file.write_all(&pending)?;
            pending.clear();
            file.write_all(piece)
        })
        .and_then(|()| file.write_all(&pending))
        .and_then(|()| file.sync_data());
        if let Err(error) = written {
            // Leave no torn record behind if the file system lets us.
            let _ = open.file.set_len(open.len);
            let _ = open.file.sync_data();
            self.open = None;
            return Err(DeadLetterError {
                path,
                what: format!("writing entry {}: {error}", entry.log_id),
            });
        }
        open.len += written_len;
        open.max_recorded = open.max_recorded.max(Some(entry.log_id));
        open.recent.push_back(key);
        if open.recent.len() > RECENT {
            open.recent.pop_front();
        }
        Ok(true)
    }

    /// Whether the file holds a record with this log id, body length and
    /// hash.
    fn holds(&mut self, key: (LogId, u64, u64)) -> Result<bool, DeadLetterError> {
        let Some(open) = self.open.as_mut() else {
            return Ok(false);
        };
        if open.max_recorded.map_or(true, |max| key.0 > max) {
            return Ok(false);
        }
        if open.recent.contains(&key) {
            return Ok(true);
        }
        let mut found = false;
        let len = open.len;
        let scanned = scan(&mut open.file, len, |file, header| {
            if header.log_id != key.0 || header.bytes != key.1 {
                return Ok(());
            }
            let mut hash = Fnv::new();
            let mut left = header.bytes;
            let mut buf = vec![0u8; 64 << 10];
            while left > 0 {
                let n = buf.len().min(left as usize);
                file.read_exact(&mut buf[..n])?;
                hash.update(&buf[..n]);
                left -= n as u64;
            }
            found |= hash.0 == key.2;
            Ok(())
        });
        match scanned {
            Ok(_) => Ok(found),
            Err(error) => Err(self.fail(format!("reading it back: {error}"))),
        }
    }

    /// Creates the dir (0700) and the file (0600) if missing, reads the
    /// records back and cuts off a torn one at the end.
    fn open_file(&self) -> Result<Opened, DeadLetterError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |error: io::Error| self.fail(format!("{what}: {error}"))
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("creating its directory"))?;
        }
        let existed = self.path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(io("opening"))?;
        if !existed {
            File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io("syncing its directory"))?;
        }
        let file_len = file.metadata().map_err(io("reading its size"))?.len();
        let mut max_recorded = None;
        let complete = scan(&mut file, file_len, |_, header| {
            max_recorded = max_recorded.max(Some(header.log_id));
            Ok(())
        })
        .map_err(|error| self.fail(error.to_string()))?;
        if complete < file_len {
            tracing::warn!(
                file = %self.path.display(),
                at = complete,
                "cutting off a torn dead-letter record (its entry was not skipped)"
            );
            file.set_len(complete)
                .map_err(io("cutting off a torn record"))?;
            file.sync_all().map_err(io("syncing"))?;
        }
        Ok(Opened {
            file,
            len: complete,
            max_recorded,
            recent: VecDeque::new(),
        })
    }
}

/// Reads the records of `file` (whose first `len` bytes count), calling
/// `visit` with the file positioned at each record's body (it may read
/// it). Returns the length of the complete records: less than `len` when
/// the last one is torn. A header that is not ours is an error naming its
/// offset.
fn scan(
    file: &mut File,
    len: u64,
    mut visit: impl FnMut(&mut File, &Header) -> io::Result<()>,
) -> io::Result<u64> {
    let mut at = 0u64;
    while at < len {
        file.seek(SeekFrom::Start(at))?;
        let mut head = vec![0u8; (MAX_HEADER + 64).min((len - at) as usize)];
        file.read_exact(&mut head)?;
        let (header, header_len) = match parse_header(&head) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(at), // torn
            Err(why) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("no dead-letter record at byte {at}: {why}"),
                ))
            }
        };
        let end = at + header_len as u64 + header.bytes;
        if end > len {
            return Ok(at); // torn
        }
        file.seek(SeekFrom::Start(at + header_len as u64))?;
        visit(file, &header)?;
        at = end;
    }
    Ok(at)
}

/// Parses the `ECHO` header at the start of `bytes`: `Ok(None)` when
/// `bytes` ends before it does, the header and its encoded length
/// otherwise.
fn parse_header(bytes: &[u8]) -> Result<Option<(Header, usize)>, String> {
    const PREFIX: &[u8] = b"*2\r\n$4\r\nECHO\r\n$";
    let n = PREFIX.len().min(bytes.len());
    if bytes[..n] != PREFIX[..n] {
        return Err("not an ECHO header".into());
    }
    if bytes.len() <= PREFIX.len() {
        return Ok(None);
    }
    let rest = &bytes[PREFIX.len()..];
    let Some(digits_end) = rest.iter().position(|b| *b == b'\r') else {
        return if rest.len() > 8 {
            Err("header length too long".into())
        } else {
            Ok(None)
        };
    };
    let text_len: usize = std::str::from_utf8(&rest[..digits_end])
        .ok()
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .filter(|len| *len <= MAX_HEADER)
        .ok_or("bad header length")?;
    let start = PREFIX.len() + digits_end + 2;
    let end = start + text_len + 2;
    if bytes.len() < end {
        return Ok(None);
    }
    if &bytes[start - 1..start] != b"\n" || &bytes[end - 2..end] != b"\r\n" {
        return Err("header not terminated".into());
    }
    let text = std::str::from_utf8(&bytes[start..end - 2]).map_err(|_| "header not UTF-8")?;
    let mut words = text.split(' ');
    if words.next() != Some(MAGIC) || words.next() != Some("v1") {
        return Err(format!("header is not a {MAGIC} v1 record"));
    }
    let (mut log_id, mut body) = (None, None);
    for word in words {
        if word.starts_with("error=") {
            break;
        }
        if let Some(value) = word.strip_prefix("log_id=") {
            log_id = value.parse().ok();
        } else if let Some(value) = word.strip_prefix("bytes=") {
            body = value.parse().ok();
        }
    }
    match (log_id, body) {
        (Some(log_id), Some(bytes)) => Ok(Some((
            Header {
                log_id: LogId(log_id),
                bytes,
            },
            end,
        ))),
        _ => Err("header without log_id= or bytes=".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn refused() -> RefusedCommand {
        RefusedCommand {
            log_id: LogId(7),
            command: "LPUSH".into(),
            error: "ERR unknown command 'LPUSH'\r\nsecond line".into(),
        }
    }

    fn entry<'a>(
        log_id: u64,
        commands: &'a [(u32, Command)],
        refused: &'a RefusedCommand,
    ) -> DeadEntry<'a> {
        DeadEntry {
            log_id: LogId(log_id),
            db: 3,
            commands,
            transaction: commands.len() > 1,
            by: SkippedBy::Operator,
            refused,
            streams: &[],
        }
    }

    #[test]
    fn records_replayable_commands_once_per_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_path(&dir.path().join("dead-letter"), "d1", PartitionId(0));
        let refused = refused();
        let one = [(3, Command::from_parts(["LPUSH", "l", "x y"]))];
        let two = [
            (3, Command::from_parts(["INCR", "c"])),
            (4, Command::from_parts(["LPUSH", "l", "z"])),
        ];
        let mut letters = DeadLetter::new(path.clone());
        assert!(letters
            .record(&entry(7, &one, &refused), None, "d1", PartitionId(0), 5)
            .unwrap());
        assert!(letters
            .record(&entry(9, &two, &refused), None, "d1", PartitionId(0), 6)
            .unwrap());
        // Again (a crash before the checkpoint moved): not written twice,
        // from memory or from the file.
        assert!(!letters
            .record(&entry(7, &one, &refused), None, "d1", PartitionId(0), 7)
            .unwrap());
        let mut reopened = DeadLetter::new(path.clone());
        assert!(!reopened
            .record(&entry(9, &two, &refused), None, "d1", PartitionId(0), 8)
            .unwrap());
        assert!(!reopened
            .record(&entry(7, &one, &refused), None, "d1", PartitionId(0), 8)
            .unwrap());
        // The same log id with other commands is another history: kept.
        assert!(reopened
            .record(&entry(7, &two, &refused), None, "d1", PartitionId(0), 9)
            .unwrap());

        let text = std::fs::read_to_string(&path).unwrap();
        let header = "ferry-dead-letter v1 log_id=7 drainer=d1 partition=0 db=3 bytes=54 \
                      unix_ms=5 by=operator command=LPUSH error=ERR unknown command 'LPUSH'  \
                      second line";
        let expected_start = format!(
            "*2\r\n$4\r\nECHO\r\n${}\r\n{header}\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n\
             *3\r\n$5\r\nLPUSH\r\n$1\r\nl\r\n$3\r\nx y\r\n*2\r\n$4\r\nECHO\r\n",
            header.len()
        );
        assert!(text.starts_with(&expected_start), "{text:?}");
        assert!(
            text.contains(
                "*1\r\n$5\r\nMULTI\r\n*2\r\n$4\r\nINCR\r\n$1\r\nc\r\n\
                 *2\r\n$6\r\nSELECT\r\n$1\r\n4\r\n*3\r\n$5\r\nLPUSH"
            ),
            "{text:?}"
        );
        assert_eq!(text.matches("ferry-dead-letter v1").count(), 3);

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }

    #[test]
    fn a_torn_record_is_cut_off_and_garbage_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_path(dir.path(), "d1", PartitionId(2));
        let refused = refused();
        let one = [(3, Command::from_parts(["SET", "k", "v"]))];
        let mut letters = DeadLetter::new(path.clone());
        letters
            .record(&entry(1, &one, &refused), None, "d1", PartitionId(2), 1)
            .unwrap();
        let whole = std::fs::read(&path).unwrap();
        letters
            .record(&entry(2, &one, &refused), None, "d1", PartitionId(2), 1)
            .unwrap();
        let both = std::fs::read(&path).unwrap();
        drop(letters);
        // Every cut inside the second record is torn: cut back to the first.
        for cut in [whole.len() + 1, whole.len() + 20, both.len() - 1] {
            std::fs::write(&path, &both[..cut]).unwrap();
            let mut letters = DeadLetter::new(path.clone());
            assert!(letters
                .record(&entry(3, &one, &refused), None, "d1", PartitionId(2), 1)
                .unwrap());
            let after = std::fs::read(&path).unwrap();
            assert_eq!(&after[..whole.len()], &whole[..], "cut at {cut}");
            assert_eq!(
                String::from_utf8_lossy(&after).matches("log_id=").count(),
                2,
                "cut at {cut}"
            );
        }
        std::fs::write(&path, b"*1\r\n$4\r\nPING\r\n").unwrap();
        let mut letters = DeadLetter::new(path.clone());
        let error = letters
            .record(&entry(4, &one, &refused), None, "d1", PartitionId(2), 1)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no dead-letter record at byte 0"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn streamed_arguments_are_written_from_their_source_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d1-0.resp");
        let refused = RefusedCommand {
            log_id: LogId(5),
            command: "SET".into(),
            error: "ERR refused".into(),
        };
        let commands = [(0, Command::from_parts(["SET", "big", "", "PXAT", "9"]))];
        let streams = [StreamedPlace {
            command: 0,
            arg: 2,
            len: 2_500_000,
            first: LogId(2),
            fragments: 3,
            first_seq: 0,
        }];
        let value: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
        let mut entry = entry(5, &commands, &refused);
        entry.streams = &streams;
        let mut fill = |place: &StreamedPlace, out: &mut dyn FnMut(&[u8]) -> io::Result<()>| {
            assert_eq!(place.len, value.len() as u64);
            for piece in value.chunks(1 << 20) {
                out(piece)?;
            }
            Ok(())
        };
        let mut letters = DeadLetter::new(path.clone());
        assert!(letters
            .record(&entry, Some(&mut fill), "d1", PartitionId(0), 1)
            .unwrap());
        // Recorded once: the same bytes are recognised.
        assert!(!letters
            .record(&entry, Some(&mut fill), "d1", PartitionId(0), 2)
            .unwrap());
        let file = std::fs::read(&path).unwrap();
        let mut body =
            b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n*5\r\n$3\r\nSET\r\n$3\r\nbig\r\n$2500000\r\n"
                .to_vec();
        body.extend_from_slice(&value);
        body.extend_from_slice(b"\r\n$4\r\nPXAT\r\n$1\r\n9\r\n");
        assert!(file.ends_with(&body));
        let header = String::from_utf8_lossy(&file[..200]).into_owned();
        assert!(
            header.contains(&format!("bytes={}", body.len())),
            "{header}"
        );

        // A source that gives the wrong length records nothing.
        let mut short =
            |_: &StreamedPlace, out: &mut dyn FnMut(&[u8]) -> io::Result<()>| out(b"too short");
        let other = entry_with_id(6, &commands, &refused, &streams);
        assert!(letters
            .record(&other, Some(&mut short), "d1", PartitionId(0), 3)
            .is_err());
        let reopened_len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(reopened_len, file.len() as u64);
    }

    fn entry_with_id<'a>(
        log_id: u64,
        commands: &'a [(u32, Command)],
        refused: &'a RefusedCommand,
        streams: &'a [StreamedPlace],
    ) -> DeadEntry<'a> {
        let mut made = entry(log_id, commands, refused);
        made.streams = streams;
        made
    }
}
