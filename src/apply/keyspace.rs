//! The keyspace a sync owns on its target, and the translation of the
//! source's commands into commands that touch nothing else.
//!
//! In: the commands of one replication entry (with the db the source ran
//! them in), or the start of a snapshot load. Out: commands placed in target
//! dbs ([`Placed`]), the count of commands left out because they touch only
//! what this sync does not own, or the reason the entry cannot be applied
//! without touching what is not ours ([`Refusal`]).
//!
//! # What a sync owns
//!
//! A sync owns the dbs of `[filter] dbs` (default: every db) on its target,
//! minus ferry's internal keys (`__ferry*`: its own and other syncs'
//! checkpoints, heartbeats of a sync whose source this target is). Other
//! syncs may own the other dbs of the same target, and their checkpoints
//! always live in db 0, whoever owns db 0. Hence:
//!
//! - a command that runs in a db this sync does not own is left out
//!   (filtered), like a command on internal keys;
//! - `FLUSHALL` becomes a flush of each owned db, and a flush of db 0
//!   (replicated `FLUSHALL`/`FLUSHDB`, or the start of a snapshot load) keeps
//!   every internal key: it runs as one script that dumps them, flushes and
//!   restores them, inside the batch's `MULTI`, so nothing can run in
//!   between;
//! - `SWAPDB a b` is applied when this sync owns both dbs (keeping db 0's
//!   internal keys in db 0), left out when it owns neither, and refused when
//!   it owns only one: the owned db would have to take data this sync never
//!   received, or give its data to a db it does not own;
//! - `MOVE`/`COPY ... DB` out of the owned keyspace is a `DEL` (`MOVE`) or
//!   nothing (`COPY`) for it; into it from a db it does not own they are
//!   refused (the value was never received);
//! - `FUNCTION FLUSH` and `FUNCTION RESTORE ... FLUSH` (functions are
//!   server-wide) are applied only by a sync that owns every db of the
//!   target, refused otherwise.
//!
//! Within the owned dbs, a partition whose snapshot has a slot scope (one
//! Redis Cluster source shard) owns only the keys of its hash slots: its
//! loads and its flushes do not empty dbs but delete those keys
//! ([`super::scope`]; the batch builder takes its flushes before they reach
//! [`OwnedKeyspace::translate`]).
//!
//! A refused entry is not sent at all (a transaction stays all or nothing);
//! the applier holds at it like at an entry the target refused: blocked
//! until `ferry skip` (or skipped at once with `on-refused =
//! "skip-and-record"`), and recorded in the dead-letter file when skipped.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::redis::command::Command;

/// The `[filter]` section: what part of the target a sync owns.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct FilterConfig {
    /// The dbs this sync replicates and owns on the target (the same db
    /// numbers on both sides); entries in other dbs are left out, and
    /// nothing in other dbs is ever flushed or overwritten. Default: every
    /// db.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dbs: Option<Vec<u32>>,
}

impl FilterConfig {
    /// The owned keyspace; `Err` names what is wrong (field `filter.dbs`).
    pub fn keyspace(&self) -> Result<OwnedKeyspace, String> {
        match &self.dbs {
            None => Ok(OwnedKeyspace::all()),
            Some(dbs) if dbs.is_empty() => {
                Err("must name at least one db (leave it out to own every db)".into())
            }
            Some(dbs) => Ok(OwnedKeyspace::dbs(dbs.iter().copied())),
        }
    }
}

/// The dbs a sync owns on its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedKeyspace {
    /// Sorted, without duplicates; `None` is every db.
    dbs: Option<Vec<u32>>,
}

impl Default for OwnedKeyspace {
    fn default() -> Self {
        OwnedKeyspace::all()
    }
}

impl std::fmt::Display for OwnedKeyspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.dbs {
            None => f.write_str("every db"),
            Some(dbs) => {
                let list: Vec<String> = dbs.iter().map(u32::to_string).collect();
                write!(f, "db {}", list.join(", "))
            }
        }
    }
}

/// Why an entry cannot be applied without touching what this sync does not
/// own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Upper-case name of the command that cannot be applied.
    pub command: String,
    pub reason: String,
}

/// A command to run on the target with `db` selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub db: u32,
    pub cmd: Command,
}

/// One entry's commands, translated for the owned keyspace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translated {
    pub commands: Vec<Placed>,
    /// For each of `commands`, the index of the input command it comes from
    /// (the applier places streamed arguments by it); filled only by
    /// [`OwnedKeyspace::translate_tracked`].
    pub origins: Vec<usize>,
    /// Commands left out: they run in dbs this sync does not own.
    pub filtered: u64,
}

/// Lua run in db 0 by a flush or a swap involving db 0: keeps every
/// internal key (`__ferry*`) in db 0 across it. `ARGV[1]` is `flush` (with
/// `ARGV[2]` the `FLUSHDB` mode, or empty) or `swap` (with `ARGV[2]`,
/// `ARGV[3]` the dbs). Returns the number of keys kept.
const KEEP_INTERNAL_SCRIPT: &str = "\
local kept = {}
for _, key in ipairs(redis.call('KEYS', '__ferry*')) do
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then ttl = 0 end
  kept[#kept + 1] = {key, ttl, redis.call('DUMP', key)}
end
if ARGV[1] == 'flush' then
  if ARGV[2] == '' then redis.call('FLUSHDB') else redis.call('FLUSHDB', ARGV[2]) end
else
  for _, entry in ipairs(kept) do redis.call('DEL', entry[1]) end
  redis.call('SWAPDB', ARGV[2], ARGV[3])
end
for _, entry in ipairs(kept) do
  redis.call('RESTORE', entry[1], entry[2], entry[3], 'REPLACE')
end
return #kept";

/// Lua run in db 0 at the start of a snapshot load, atomically: with
/// `ARGV[1] == 'check'` it first counts the keys of the owned dbs (internal
/// keys excepted) and, if any db holds some, returns the error
/// `FERRYEXISTING <db>:<count> ...` having changed nothing; then, with
/// `ARGV[2] == 'flush'`, it empties each owned db keeping the internal keys
/// of db 0, and finally sets the checkpoint `ARGV[3]` to `ARGV[4]` in db 0.
/// `ARGV[5..]` are the owned dbs.
const LOAD_START_SCRIPT: &str = "\
local function internal(db)
  if db ~= '0' then return {} end
  local kept = {}
  for _, key in ipairs(redis.call('KEYS', '__ferry*')) do
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = 0 end
    kept[#kept + 1] = {key, ttl, redis.call('DUMP', key)}
  end
  return kept
end
if ARGV[1] == 'check' then
  local busy = {}
  for i = 5, #ARGV do
    redis.call('SELECT', ARGV[i])
    local n = redis.call('DBSIZE')
    if n > 0 and ARGV[i] == '0' then n = n - #redis.call('KEYS', '__ferry*') end
    if n > 0 then busy[#busy + 1] = ARGV[i] .. ':' .. n end
  end
  redis.call('SELECT', 0)
  if #busy > 0 then
    return redis.error_reply('FERRYEXISTING ' .. table.concat(busy, ' '))
  end
end
if ARGV[2] == 'flush' then
  for i = 5, #ARGV do
    redis.call('SELECT', ARGV[i])
    if redis.call('DBSIZE') > 0 then
      local kept = internal(ARGV[i])
      redis.call('FLUSHDB')
      for _, entry in ipairs(kept) do
        redis.call('RESTORE', entry[1], entry[2], entry[3], 'REPLACE')
      end
    end
  end
end
redis.call('SELECT', 0)
redis.call('SET', ARGV[3], ARGV[4])
return 'OK'";

/// The error prefix of [`OwnedKeyspace::load_start`] when the owned dbs
/// hold keys.
pub const EXISTING_DATA_ERROR: &str = "FERRYEXISTING";

/// Parses the `FERRYEXISTING 0:3 5:10` error of the load start into
/// `(db, keys)` pairs.
pub fn parse_existing_data(error: &str) -> Option<Vec<(u32, u64)>> {
    let rest = error.strip_prefix(EXISTING_DATA_ERROR)?;
    rest.split_whitespace()
        .map(|pair| {
            let (db, keys) = pair.split_once(':')?;
            Some((db.parse().ok()?, keys.parse().ok()?))
        })
        .collect()
}

/// `arg` upper-cased for logs and status, at most 64 bytes of it.
pub(crate) fn upper(arg: &[u8]) -> String {
    String::from_utf8_lossy(&arg[..arg.len().min(64)]).to_uppercase()
}

fn parse_db(arg: &[u8]) -> Option<u32> {
    std::str::from_utf8(arg).ok()?.parse().ok()
}

fn eval_keep_internal(args: &[&[u8]]) -> Command {
    let mut parts: Vec<Bytes> = vec![
        Bytes::from_static(b"EVAL"),
        Bytes::from_static(KEEP_INTERNAL_SCRIPT.as_bytes()),
        Bytes::from_static(b"0"),
    ];
    parts.extend(args.iter().map(|a| Bytes::copy_from_slice(a)));
    Command::new(parts)
}

impl OwnedKeyspace {
    /// Every db of the target.
    pub fn all() -> OwnedKeyspace {
        OwnedKeyspace { dbs: None }
    }

    /// Exactly `dbs`.
    pub fn dbs(dbs: impl IntoIterator<Item = u32>) -> OwnedKeyspace {
        let mut dbs: Vec<u32> = dbs.into_iter().collect();
        dbs.sort_unstable();
        dbs.dedup();
        OwnedKeyspace { dbs: Some(dbs) }
    }

    pub fn owns_db(&self, db: u32) -> bool {
        match &self.dbs {
            None => true,
            Some(dbs) => dbs.binary_search(&db).is_ok(),
        }
    }

    /// True when every db of a target with `databases` dbs is owned.
    pub fn owns_every_db(&self, databases: u32) -> bool {
        (0..databases).all(|db| self.owns_db(db))
    }

    /// The owned dbs of a target with `databases` dbs, ascending.
    pub fn owned_dbs(&self, databases: u32) -> Vec<u32> {
        (0..databases).filter(|&db| self.owns_db(db)).collect()
    }

    /// The commands that empty owned db `db` of the target (`mode`: the
    /// `FLUSHDB` option, e.g. `ASYNC`, if any), keeping internal keys.
    pub fn flush_db(db: u32, mode: Option<&[u8]>) -> Command {
        if db == 0 {
            return eval_keep_internal(&[b"flush", mode.unwrap_or(b"")]);
        }
        let mut parts = vec![Bytes::from_static(b"FLUSHDB")];
        if let Some(mode) = mode {
            parts.push(Bytes::copy_from_slice(mode));
        }
        Command::new(parts)
    }

    /// The command that starts a snapshot load on a target with `databases`
    /// dbs (run in db 0, atomic): refuses if `check` and an owned db holds
    /// keys (see [`parse_existing_data`]), empties the owned dbs if `flush`
    /// (internal keys kept), and sets `checkpoint_key` to `checkpoint`.
    pub fn load_start(
        &self,
        databases: u32,
        check: bool,
        flush: bool,
        checkpoint_key: &Bytes,
        checkpoint: &[u8],
    ) -> Command {
        let mut parts: Vec<Bytes> = vec![
            Bytes::from_static(b"EVAL"),
            Bytes::from_static(LOAD_START_SCRIPT.as_bytes()),
            Bytes::from_static(b"0"),
            Bytes::from_static(if check { b"check" } else { b"nocheck" }),
            Bytes::from_static(if flush { b"flush" } else { b"keep" }),
            checkpoint_key.clone(),
            Bytes::copy_from_slice(checkpoint),
        ];
        parts.extend(
            self.owned_dbs(databases)
                .into_iter()
                .map(|db| Bytes::from(db.to_string())),
        );
        Command::new(parts)
    }

    /// Translates the commands of one entry that starts in source db `db`,
    /// for a target with `databases` dbs. `SELECT`s are consumed (the
    /// placement says where each command runs). `origins` stays empty.
    pub fn translate(
        &self,
        db: u32,
        commands: Vec<Command>,
        databases: u32,
    ) -> Result<Translated, Refusal> {
        self.translate_as(db, commands, databases, false)
    }

    /// [`OwnedKeyspace::translate`], filling `origins` too.
    pub fn translate_tracked(
        &self,
        db: u32,
        commands: Vec<Command>,
        databases: u32,
    ) -> Result<Translated, Refusal> {
        self.translate_as(db, commands, databases, true)
    }

    fn translate_as(
        &self,
        db: u32,
        commands: Vec<Command>,
        databases: u32,
        track: bool,
    ) -> Result<Translated, Refusal> {
        let mut out = Translated::default();
        let mut db = db;
        for (index, cmd) in commands.into_iter().enumerate() {
            if cmd.is("SELECT") {
                match cmd.args.get(1).and_then(|d| parse_db(d)) {
                    Some(to) if cmd.args.len() == 2 => db = to,
                    _ => {
                        return Err(Refusal {
                            command: "SELECT".into(),
                            reason: "SELECT with a bad db index".into(),
                        })
                    }
                }
                continue;
            }
            let before = out.commands.len();
            self.translate_one(db, cmd, databases, &mut out)?;
            if track {
                let made = out.commands.len() - before;
                out.origins.extend(std::iter::repeat(index).take(made));
            }
        }
        Ok(out)
    }

    fn translate_one(
        &self,
        db: u32,
        cmd: Command,
        databases: u32,
        out: &mut Translated,
    ) -> Result<(), Refusal> {
        let name = upper(cmd.name());
        let refuse = |reason: String| Refusal {
            command: name.clone(),
            reason,
        };
        match name.as_str() {
            "FLUSHALL" => {
                let mode = cmd.args.get(1).map(|m| m.as_ref());
                for owned in self.owned_dbs(databases) {
                    out.commands.push(Placed {
                        db: owned,
                        cmd: Self::flush_db(owned, mode),
                    });
                }
                return Ok(());
            }
            "FLUSHDB" => {
                if self.owns_db(db) {
                    let mode = cmd.args.get(1).map(|m| m.as_ref());
                    out.commands.push(Placed {
                        db,
                        cmd: Self::flush_db(db, mode),
                    });
                } else {
                    out.filtered += 1;
                }
                return Ok(());
            }
            "SWAPDB" => {
                let (Some(a), Some(b)) = (
                    cmd.args.get(1).and_then(|d| parse_db(d)),
                    cmd.args.get(2).and_then(|d| parse_db(d)),
                ) else {
                    return Err(refuse("SWAPDB with a bad db index".into()));
                };
                return match (self.owns_db(a), self.owns_db(b)) {
                    (false, false) => {
                        out.filtered += 1;
                        Ok(())
                    }
                    (true, true) if a == 0 || b == 0 => {
                        let (a, b) = (a.to_string(), b.to_string());
                        out.commands.push(Placed {
                            db: 0,
                            cmd: eval_keep_internal(&[b"swap", a.as_bytes(), b.as_bytes()]),
                        });
                        Ok(())
                    }
                    (true, true) => {
                        out.commands.push(Placed { db, cmd });
                        Ok(())
                    }
                    (owns_a, _) => {
                        let (owned, other) = if owns_a { (a, b) } else { (b, a) };
                        Err(refuse(format!(
                            "SWAPDB {a} {b} would exchange owned db {owned} with db {other}, \
                             which this sync does not own (filter.dbs)"
                        )))
                    }
                };
            }
            "MOVE" => {
                let Some(to) = cmd.args.get(2).and_then(|d| parse_db(d)) else {
                    return Err(refuse("MOVE with a bad db index".into()));
                };
                return match (self.owns_db(db), self.owns_db(to)) {
                    (true, true) => {
                        out.commands.push(Placed { db, cmd });
                        Ok(())
                    }
                    (true, false) => {
                        // The key left the owned keyspace.
                        let key = cmd.args.get(1).cloned().unwrap_or_default();
                        out.commands.push(Placed {
                            db,
                            cmd: Command::new(vec![Bytes::from_static(b"DEL"), key]),
                        });
                        Ok(())
                    }
                    (false, true) => Err(refuse(format!(
                        "MOVE from db {db}, which this sync does not own, into owned db {to}: \
                         the value was never replicated"
                    ))),
                    (false, false) => {
                        out.filtered += 1;
                        Ok(())
                    }
                };
            }
            "COPY" => {
                let to = copy_destination_db(&cmd).unwrap_or(Some(db));
                let Some(to) = to else {
                    return Err(refuse("COPY with a bad DB index".into()));
                };
                return match (self.owns_db(db), self.owns_db(to)) {
                    (true, true) => {
                        out.commands.push(Placed { db, cmd });
                        Ok(())
                    }
                    (false, true) => Err(refuse(format!(
                        "COPY from db {db}, which this sync does not own, into owned db {to}: \
                         the value was never replicated"
                    ))),
                    // Nothing changes in the owned keyspace.
                    (_, false) => {
                        out.filtered += 1;
                        Ok(())
                    }
                };
            }
            "FUNCTION" => {
                let sub = cmd.args.get(1).map(|s| upper(s)).unwrap_or_default();
                let flushes = sub == "FLUSH"
                    || (sub == "RESTORE" && cmd.args[2..].iter().any(|a| upper(a) == "FLUSH"));
                if flushes && !self.owns_every_db(databases) {
                    return Err(refuse(format!(
                        "FUNCTION {sub} replaces the target's functions, which are server-wide; \
                         only a sync that owns every db applies it ({self} owned)"
                    )));
                }
                out.commands.push(Placed { db, cmd });
                return Ok(());
            }
            _ => {}
        }
        if self.owns_db(db) {
            out.commands.push(Placed { db, cmd });
        } else {
            out.filtered += 1;
        }
        Ok(())
    }
}

/// The db of `COPY src dst DB n`: `None` without a `DB` option,
/// `Some(None)` when it is malformed.
fn copy_destination_db(cmd: &Command) -> Option<Option<u32>> {
    let args = &cmd.args;
    let at = args.iter().skip(3).position(|a| upper(a) == "DB")? + 3;
    Some(args.get(at + 1).and_then(|d| parse_db(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(parts: &[&str]) -> Command {
        Command::from_parts(parts.iter())
    }

    fn shown(t: &Translated) -> Vec<String> {
        t.commands
            .iter()
            .map(|p| {
                let args: Vec<String> = p
                    .cmd
                    .args
                    .iter()
                    .map(|a| {
                        let s = String::from_utf8_lossy(a).into_owned();
                        if s.starts_with("\nlocal kept") || s.starts_with("local kept") {
                            "<keep-internal>".into()
                        } else {
                            s
                        }
                    })
                    .collect();
                format!("{}: {}", p.db, args.join(" "))
            })
            .collect()
    }

    #[test]
    fn commands_in_dbs_not_owned_are_filtered_and_selects_place_commands() {
        let owned = OwnedKeyspace::dbs([0, 2]);
        let t = owned
            .translate(
                0,
                vec![
                    cmd(&["SET", "a", "1"]),
                    cmd(&["SELECT", "1"]),
                    cmd(&["SET", "b", "1"]),
                    cmd(&["SELECT", "2"]),
                    cmd(&["INCR", "c"]),
                ],
                16,
            )
            .unwrap();
        assert_eq!(shown(&t), ["0: SET a 1", "2: INCR c"]);
        assert_eq!(t.filtered, 1);
        assert!(t.origins.is_empty());
        // Where each placed command comes from (SELECTs included in the
        // count).
        let t = owned
            .translate_tracked(
                0,
                vec![
                    cmd(&["SET", "a", "1"]),
                    cmd(&["SELECT", "1"]),
                    cmd(&["SET", "b", "1"]),
                    cmd(&["SELECT", "2"]),
                    cmd(&["INCR", "c"]),
                ],
                16,
            )
            .unwrap();
        assert_eq!(t.origins, [0, 4]);
        let t = owned
            .translate_tracked(0, vec![cmd(&["FLUSHALL"]), cmd(&["SET", "a", "1"])], 16)
            .unwrap();
        assert_eq!(t.origins, [0, 0, 1]);
    }

    #[test]
    fn flushall_flushes_owned_dbs_only_keeping_internal_keys_in_db_0() {
        let owned = OwnedKeyspace::dbs([0, 3, 20]);
        let t = owned
            .translate(5, vec![cmd(&["FLUSHALL", "ASYNC"])], 16)
            .unwrap();
        assert_eq!(
            shown(&t),
            ["0: EVAL <keep-internal> 0 flush ASYNC", "3: FLUSHDB ASYNC"]
        );
        let every = OwnedKeyspace::all().translate(0, vec![cmd(&["FLUSHALL"])], 3);
        assert_eq!(
            shown(&every.unwrap()),
            [
                "0: EVAL <keep-internal> 0 flush ",
                "1: FLUSHDB",
                "2: FLUSHDB"
            ]
        );
    }

    #[test]
    fn flushdb_follows_ownership() {
        let owned = OwnedKeyspace::dbs([1]);
        let t = owned
            .translate(
                0,
                vec![cmd(&["FLUSHDB"]), cmd(&["SELECT", "1"]), cmd(&["FLUSHDB"])],
                16,
            )
            .unwrap();
        assert_eq!(shown(&t), ["1: FLUSHDB"]);
        assert_eq!(t.filtered, 1);
    }

    #[test]
    fn swapdb_needs_both_dbs() {
        let owned = OwnedKeyspace::dbs([0, 1, 2]);
        let both = owned
            .translate(0, vec![cmd(&["SWAPDB", "1", "2"])], 16)
            .unwrap();
        assert_eq!(shown(&both), ["0: SWAPDB 1 2"]);
        let with_0 = owned
            .translate(4, vec![cmd(&["SWAPDB", "2", "0"])], 16)
            .unwrap();
        assert_eq!(shown(&with_0), ["0: EVAL <keep-internal> 0 swap 2 0"]);
        let neither = owned
            .translate(0, vec![cmd(&["SWAPDB", "5", "6"])], 16)
            .unwrap();
        assert_eq!((neither.commands.len(), neither.filtered), (0, 1));
        let one = owned
            .translate(
                0,
                vec![cmd(&["SET", "a", "1"]), cmd(&["SWAPDB", "0", "7"])],
                16,
            )
            .unwrap_err();
        assert_eq!(one.command, "SWAPDB");
        assert!(one.reason.contains("db 7"), "{}", one.reason);
        assert!(owned
            .translate(0, vec![cmd(&["SWAPDB", "x", "1"])], 16)
            .is_err());
    }

    #[test]
    fn move_and_copy_across_the_owned_boundary() {
        let owned = OwnedKeyspace::dbs([0]);
        let out = owned
            .translate(0, vec![cmd(&["MOVE", "k", "3"])], 16)
            .unwrap();
        assert_eq!(shown(&out), ["0: DEL k"]);
        let into = owned
            .translate(3, vec![cmd(&["MOVE", "k", "0"])], 16)
            .unwrap_err();
        assert_eq!(into.command, "MOVE");
        let copy_out = owned
            .translate(0, vec![cmd(&["COPY", "a", "b", "DB", "4", "REPLACE"])], 16)
            .unwrap();
        assert_eq!((copy_out.commands.len(), copy_out.filtered), (0, 1));
        let copy_in = owned.translate(4, vec![cmd(&["COPY", "a", "b", "db", "0"])], 16);
        assert!(copy_in.is_err());
        let copy_same = owned
            .translate(0, vec![cmd(&["COPY", "a", "b"])], 16)
            .unwrap();
        assert_eq!(shown(&copy_same), ["0: COPY a b"]);
        let moved_within = OwnedKeyspace::all()
            .translate(2, vec![cmd(&["MOVE", "k", "3"])], 16)
            .unwrap();
        assert_eq!(shown(&moved_within), ["2: MOVE k 3"]);
    }

    #[test]
    fn function_flush_needs_every_db() {
        let partial = OwnedKeyspace::dbs([0]);
        assert!(partial
            .translate(0, vec![cmd(&["FUNCTION", "FLUSH"])], 16)
            .is_err());
        assert!(partial
            .translate(0, vec![cmd(&["FUNCTION", "RESTORE", "x", "FLUSH"])], 16)
            .is_err());
        assert!(partial
            .translate(0, vec![cmd(&["FUNCTION", "LOAD", "code"])], 16)
            .is_ok());
        assert!(OwnedKeyspace::dbs(0..16)
            .translate(0, vec![cmd(&["FUNCTION", "FLUSH"])], 16)
            .is_ok());
    }

    #[test]
    fn existing_data_errors_parse() {
        assert_eq!(
            parse_existing_data("FERRYEXISTING 0:3 5:10"),
            Some(vec![(0, 3), (5, 10)])
        );
        assert_eq!(parse_existing_data("ERR other"), None);
        assert_eq!(parse_existing_data("FERRYEXISTING 0:x"), None);
    }

    #[test]
    fn filter_config() {
        assert_eq!(
            FilterConfig::default().keyspace().unwrap(),
            OwnedKeyspace::all()
        );
        let empty = FilterConfig { dbs: Some(vec![]) };
        assert!(empty.keyspace().is_err());
        let some = FilterConfig {
            dbs: Some(vec![5, 0, 5]),
        };
        let keyspace = some.keyspace().unwrap();
        assert_eq!(keyspace.owned_dbs(16), [0, 5]);
        assert_eq!(keyspace.to_string(), "db 0, 5");
        assert!(!keyspace.owns_every_db(16));
        assert!(OwnedKeyspace::dbs([0, 1]).owns_every_db(2));
    }
}
