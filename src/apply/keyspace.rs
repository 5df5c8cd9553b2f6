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
//! `[filter]` ([`FilterConfig`]) says which source dbs are replicated and
//! into which target db each goes, and which keys:
//!
//! - `dbs = [0, 5]`: those source dbs, each into the target db of the same
//!   number (default: every db);
//! - `db-map = { "0" = 3, "5" = 6 }`: source db 0 into target db 3, 5 into
//!   6, and no other db (instead of `dbs`; `"1" = 1` keeps a number). Two
//!   source dbs into one target db is refused at config time: the owner of
//!   a target db must be one source db;
//! - `key-prefix = ["app:"]`, `exclude-key-prefix = ["app:cache:"]`: only
//!   keys starting with one of `key-prefix` (default: every key) and with
//!   none of `exclude-key-prefix`.
//!
//! The sync owns those keys in the target dbs its source dbs land in,
//! minus ferry's internal keys (`__ferry*`: its own and other syncs'
//! checkpoints, heartbeats of a sync whose source this target is). Other
//! syncs may own the other dbs, or the other keys of the same dbs, and
//! their checkpoints always live in db 0, whoever owns db 0. Every rule
//! below follows from "never write, overwrite or delete a key this sync
//! does not own":
//!
//! - a command is placed in the target db its source db maps to (its
//!   `SELECT`s are consumed: the applier selects); one in a source db that
//!   is not replicated is left out (filtered), like a command on internal
//!   keys;
//! - keys ([`OwnedKeyspace::classify`]): a command whose keys are all
//!   outside the owned keys is left out; one naming owned keys with others
//!   goes without the others where each key stands alone (`DEL`, `UNLINK`,
//!   `EXISTS`, `TOUCH`, the pairs of `MSET`); `COPY` of an owned key to one
//!   outside changes nothing owned (left out), `RENAME`/`RENAMENX` of an
//!   owned key to one outside is a `DEL` of it; the other way round (a value
//!   this sync never received) and every other mixed command are refused
//!   ([`OwnedKeyspace::resolve_mixed`]). With a key filter, a command whose
//!   keys ferry's command table cannot tell (unknown, bad arity) and a
//!   script (`EVAL*`, `FCALL*`: it may touch keys it does not declare;
//!   Redis 7 replicates a script's effects, not the script) are refused;
//! - commands without keys that change no key (`FUNCTION LOAD`/`DELETE`,
//!   `PUBLISH`, ...) are applied when their db is replicated, whatever the
//!   key filter: they are not part of any keyspace;
//! - `FLUSHALL` becomes a flush of each owned target db, `FLUSHDB` a flush
//!   of the db it maps to. A flush of db 0 (or, with a key filter, of any
//!   db) runs as one script inside the batch's `MULTI`, so nothing can run
//!   in between: without a key filter it dumps the internal keys of db 0,
//!   flushes and restores them; with one it deletes exactly the owned keys
//!   (`KEYS` of each include prefix, each key checked against the filter
//!   in the script; `UNLINK` for an `ASYNC` flush). That is O(keys of the
//!   db) on the target, as `FLUSHDB` is, and it never deletes a key outside
//!   the filter;
//! - `SWAPDB a b` is applied (as `SWAPDB` of the target dbs they map to)
//!   when this sync replicates both dbs, left out when neither, and refused
//!   when only one: the owned db would take data this sync never received,
//!   or give its data to a db it does not own. With a key filter only the
//!   owned keys of the two dbs change places (one script: the owned keys of
//!   one db that the other also holds are renamed to owned temporary names
//!   neither db holds, the other db's are `MOVE`d over, the first db's
//!   moved back and renamed: O(owned keys), values are never copied); the
//!   other keys of both dbs stay where they are, as they do for the syncs
//!   that own them. Internal keys never move, and the script's replicated
//!   effects name only owned keys (a cascade's next hop applies them);
//! - `MOVE key n` and `COPY src dst DB n` name a source db: it is mapped.
//!   Out of the replicated dbs they are a `DEL` (`MOVE`) or nothing
//!   (`COPY`) for this sync; into them from a db it does not replicate they
//!   are refused (the value was never received). A key filter applies to
//!   the key's name, which `MOVE` keeps: an owned key stays owned. A
//!   `SWAPDB`/`MOVE`/`COPY` whose db maps past the target's `databases` is
//!   refused (it would fail only inside `EXEC`, and the swap script half
//!   way);
//! - `FUNCTION FLUSH` and `FUNCTION RESTORE ... FLUSH` (functions are
//!   server-wide) are applied only by a sync that owns the whole target
//!   (every db, no key filter), refused otherwise;
//! - a snapshot load loads only owned keys, each into the target db its
//!   source db maps to, and empties first (unless `existing-data = "keep"`)
//!   only the owned keys of the owned dbs (the same scripts as the
//!   flushes), keeping internal keys ([`OwnedKeyspace::load_start`]).
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
//!
//! Without a key filter nothing here allocates per command beyond what the
//! command table's key lookup already does.

use std::cell::RefCell;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::record::INTERNAL_PREFIX;
use crate::redis::command::{self, Command};

/// The `[filter]` section: what part of the target a sync owns.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct FilterConfig {
    /// The source dbs this sync replicates, each into the target db of the
    /// same number, which it owns; entries in other dbs are left out, and
    /// nothing in other dbs is ever flushed or overwritten. Default: every
    /// db. Not with `db-map`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dbs: Option<Vec<u32>>,
    /// Source db (a string, TOML keys are) to target db, e.g. `{ "0" = 3,
    /// "5" = 6 }`: only the dbs named are replicated, each into its target
    /// db (`"1" = 1` keeps a number); the owned dbs are the target dbs.
    /// Two source dbs into one target db are refused. Default: none (see
    /// `dbs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_map: Option<BTreeMap<String, u32>>,
    /// Only keys starting with one of these prefixes are replicated and
    /// owned. Default: every key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<Vec<String>>,
    /// Keys starting with one of these prefixes are neither replicated nor
    /// owned (applied after `key-prefix`). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude_key_prefix: Option<Vec<String>>,
}

/// A `[filter]` value that cannot work, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// `filter.dbs`, `filter.db-map`, `filter.key-prefix` or
    /// `filter.exclude-key-prefix`.
    pub field: &'static str,
    pub reason: String,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.reason)
    }
}

fn filter_error(field: &'static str, reason: impl Into<String>) -> FilterError {
    FilterError {
        field,
        reason: reason.into(),
    }
}

/// Parses a `--db-map` value: `0=3,5=6` (source=target pairs).
pub fn parse_db_map(text: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut map = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (source, target) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not SOURCE=TARGET (e.g. 0=3)"))?;
        let source: u32 = source
            .trim()
            .parse()
            .map_err(|_| format!("{pair:?}: {source:?} is not a db number"))?;
        let target: u32 = target
            .trim()
            .parse()
            .map_err(|_| format!("{pair:?}: {target:?} is not a db number"))?;
        if map.insert(source.to_string(), target).is_some() {
            return Err(format!("source db {source} is mapped twice"));
        }
    }
    if map.is_empty() {
        return Err("give at least one SOURCE=TARGET pair".into());
    }
    Ok(map)
}

impl FilterConfig {
    /// This (a file's `[filter]`) with the values `flags` give in its
    /// place: `dbs` or `db-map` from the flags replaces both of the file's
    /// (they are one choice), and each prefix list replaces the file's.
    pub fn overridden_by(mut self, flags: FilterConfig) -> FilterConfig {
        if flags.dbs.is_some() || flags.db_map.is_some() {
            self.dbs = flags.dbs;
            self.db_map = flags.db_map;
        }
        if flags.key_prefix.is_some() {
            self.key_prefix = flags.key_prefix;
        }
        if flags.exclude_key_prefix.is_some() {
            self.exclude_key_prefix = flags.exclude_key_prefix;
        }
        self
    }

    /// The owned keyspace; `Err` names the field that is wrong.
    pub fn keyspace(&self) -> Result<OwnedKeyspace, FilterError> {
        let dbs = match (&self.dbs, &self.db_map) {
            (Some(_), Some(_)) => {
                return Err(filter_error(
                    "filter.db-map",
                    "give either dbs or db-map: db-map names every replicated db \
                     (map a db to itself to keep its number)",
                ))
            }
            (None, None) => DbPlan::Every,
            (Some(dbs), None) if dbs.is_empty() => {
                return Err(filter_error(
                    "filter.dbs",
                    "must name at least one db (leave it out to own every db)",
                ))
            }
            (Some(dbs), None) => {
                let mut dbs = dbs.clone();
                dbs.sort_unstable();
                dbs.dedup();
                DbPlan::Same(dbs)
            }
            (None, Some(map)) => {
                let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(map.len());
                for (source, &target) in map {
                    let source: u32 = source.trim().parse().map_err(|_| {
                        filter_error(
                            "filter.db-map",
                            format!("{source:?} is not a source db number"),
                        )
                    })?;
                    if pairs.iter().any(|&(s, _)| s == source) {
                        return Err(filter_error(
                            "filter.db-map",
                            format!("source db {source} is mapped twice"),
                        ));
                    }
                    pairs.push((source, target));
                }
                if pairs.is_empty() {
                    return Err(filter_error(
                        "filter.db-map",
                        "must map at least one db (leave it out to keep every db's number)",
                    ));
                }
                pairs.sort_unstable();
                for (i, &(source, target)) in pairs.iter().enumerate() {
                    if let Some(&(other, _)) = pairs[..i].iter().find(|&&(_, t)| t == target) {
                        return Err(filter_error(
                            "filter.db-map",
                            format!(
                                "source dbs {other} and {source} both map to target db \
                                 {target}: a target db takes one source db"
                            ),
                        ));
                    }
                }
                DbPlan::Mapped(pairs)
            }
        };
        let prefixes = |field: &'static str, list: &Option<Vec<String>>| match list {
            None => Ok(Vec::new()),
            Some(list) if list.is_empty() => Err(filter_error(
                field,
                "must name at least one prefix (leave it out for none)",
            )),
            Some(list) => list
                .iter()
                .map(|prefix| {
                    if prefix.is_empty() {
                        Err(filter_error(
                            field,
                            "an empty prefix matches every key; leave it out instead",
                        ))
                    } else if prefix.as_bytes().starts_with(INTERNAL_PREFIX) {
                        // A shorter one (`_`, `__f`) is fine: ferry's own
                        // keys are never owned whatever the filter says.
                        Err(filter_error(
                            field,
                            format!(
                                "{prefix:?} names only ferry's own keys ({}*), which are never \
                                 replicated",
                                String::from_utf8_lossy(INTERNAL_PREFIX)
                            ),
                        ))
                    } else {
                        Ok(Bytes::from(prefix.clone().into_bytes()))
                    }
                })
                .collect::<Result<Vec<Bytes>, FilterError>>(),
        };
        let include = prefixes("filter.key-prefix", &self.key_prefix)?;
        let exclude = prefixes("filter.exclude-key-prefix", &self.exclude_key_prefix)?;
        let keys =
            (!include.is_empty() || !exclude.is_empty()).then(|| KeyFilter { include, exclude });
        Ok(OwnedKeyspace { dbs, keys })
    }
}

/// Which keys of a db a sync owns: those starting with one of `include`
/// (any key when it is empty) and with none of `exclude`, never ferry's
/// internal keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFilter {
    include: Vec<Bytes>,
    exclude: Vec<Bytes>,
}

impl KeyFilter {
    /// Keys starting with one of `include` (any key when empty) and none of
    /// `exclude`. Prefixes overlapping `__ferry` are for the config to
    /// refuse; ferry's own keys are never owned anyway.
    pub fn new(include: Vec<Bytes>, exclude: Vec<Bytes>) -> KeyFilter {
        KeyFilter { include, exclude }
    }

    /// Whether `key` is owned (internal keys never are).
    pub fn owns(&self, key: &[u8]) -> bool {
        !key.starts_with(INTERNAL_PREFIX)
            && (self.include.is_empty() || self.include.iter().any(|p| key.starts_with(p)))
            && !self.exclude.iter().any(|p| key.starts_with(p))
    }

    pub fn include(&self) -> &[Bytes] {
        &self.include
    }

    pub fn exclude(&self) -> &[Bytes] {
        &self.exclude
    }

    /// `SCAN`/`KEYS` patterns that together match every owned key (and
    /// maybe others: check each with [`KeyFilter::owns`]): each include
    /// prefix with its glob characters escaped, then `*`; `*` without
    /// include prefixes.
    pub fn patterns(&self) -> Vec<Bytes> {
        if self.include.is_empty() {
            return vec![Bytes::from_static(b"*")];
        }
        self.include
            .iter()
            .map(|prefix| {
                let mut pattern = Vec::with_capacity(prefix.len() + 2);
                for &b in prefix.iter() {
                    if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
                        pattern.push(b'\\');
                    }
                    pattern.push(b);
                }
                pattern.push(b'*');
                Bytes::from(pattern)
            })
            .collect()
    }

    /// The script arguments of the filter: the include count, the includes,
    /// the excludes (read by [`FILTER_LUA`]'s `filter_from`).
    fn script_args(&self, parts: &mut Vec<Bytes>) {
        parts.push(Bytes::from(self.include.len().to_string()));
        parts.extend(self.include.iter().cloned());
        parts.extend(self.exclude.iter().cloned());
    }
}

impl std::fmt::Display for KeyFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |p: &Bytes| format!("{}*", String::from_utf8_lossy(p));
        if self.include.is_empty() {
            f.write_str("every key")?;
        } else {
            let list: Vec<String> = self.include.iter().map(shown).collect();
            write!(f, "keys {}", list.join(", "))?;
        }
        if !self.exclude.is_empty() {
            let list: Vec<String> = self.exclude.iter().map(shown).collect();
            write!(f, " but {}", list.join(", "))?;
        }
        Ok(())
    }
}

/// Which source dbs are replicated, and into which target dbs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DbPlan {
    /// Every db, into the same number.
    Every,
    /// These (sorted, no duplicates), into the same number.
    Same(Vec<u32>),
    /// `(source, target)`, sorted by source; no two share a target.
    Mapped(Vec<(u32, u32)>),
}

/// What a sync owns on its target: dbs (with where each source db lands)
/// and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedKeyspace {
    dbs: DbPlan,
    /// `None`: every key (but ferry's internal ones).
    keys: Option<KeyFilter>,
}

impl Default for OwnedKeyspace {
    fn default() -> Self {
        OwnedKeyspace::all()
    }
}

impl std::fmt::Display for OwnedKeyspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.dbs {
            DbPlan::Every => f.write_str("every db")?,
            DbPlan::Same(dbs) => {
                let list: Vec<String> = dbs.iter().map(u32::to_string).collect();
                write!(f, "db {}", list.join(", "))?;
            }
            DbPlan::Mapped(pairs) => {
                let list: Vec<String> = pairs
                    .iter()
                    .map(|(source, target)| format!("{target} (source db {source})"))
                    .collect();
                write!(f, "db {}", list.join(", "))?;
            }
        }
        if let Some(keys) = &self.keys {
            write!(f, ", {keys}")?;
        }
        Ok(())
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

/// Whose keys a command names ([`OwnedKeyspace::classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyClass {
    /// Owned keys only, or no keys (or, without a key filter, keys unknown
    /// to the command table).
    Data,
    /// Only ferry's own keys (`__ferry*`): left out.
    Internal,
    /// No owned key, some outside the key filter: left out.
    Outside,
    /// Owned keys with others (internal, or outside the key filter):
    /// [`OwnedKeyspace::resolve_mixed`] says what is applied.
    Mixed,
    /// Under a key filter: keys ferry cannot tell (a command the table does
    /// not know or with a bad arity, a script): refused.
    Unknown,
}

/// Lua run in db 0 by a flush or a swap involving db 0 without a key
/// filter: keeps every internal key (`__ferry*`) in db 0 across it.
/// `ARGV[1]` is `flush` (with `ARGV[2]` the `FLUSHDB` mode, or empty) or
/// `swap` (with `ARGV[2]`, `ARGV[3]` the dbs). Returns the number of keys
/// kept.
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

/// Lua functions of the scripts that work under a key filter:
/// `filter_from(i)` reads the filter from `ARGV[i..]` (the include count,
/// the includes, the excludes: [`KeyFilter::script_args`]); `owned_keys`
/// lists the owned keys of the selected db (`KEYS` of each include prefix,
/// glob characters escaped, each key checked against the prefixes as
/// bytes; internal keys never); `delete` removes keys 1000 at a time.
macro_rules! filter_lua {
    () => {
        "\
local function filter_from(first)
  local n = tonumber(ARGV[first])
  local inc, exc = {}, {}
  for i = first + 1, first + n do inc[#inc + 1] = ARGV[i] end
  for i = first + n + 1, #ARGV do exc[#exc + 1] = ARGV[i] end
  return {inc = inc, exc = exc}
end
local function owned(key, filter)
  if string.sub(key, 1, 7) == '__ferry' then return false end
  local ok = #filter.inc == 0
  for _, p in ipairs(filter.inc) do
    if string.sub(key, 1, #p) == p then ok = true break end
  end
  if not ok then return false end
  for _, p in ipairs(filter.exc) do
    if string.sub(key, 1, #p) == p then return false end
  end
  return true
end
local function owned_keys(filter)
  local patterns = {}
  if #filter.inc == 0 then patterns[1] = '*' end
  for _, p in ipairs(filter.inc) do
    patterns[#patterns + 1] = (string.gsub(p, '[%*%?%[%]\\\\]', '\\\\%0')) .. '*'
  end
  local seen, found = {}, {}
  for _, pattern in ipairs(patterns) do
    for _, key in ipairs(redis.call('KEYS', pattern)) do
      if not seen[key] and owned(key, filter) then
        seen[key] = true
        found[#found + 1] = key
      end
    end
  end
  return found
end
local function delete(keys, mode)
  local cmd = 'DEL'
  if string.upper(mode) == 'ASYNC' then cmd = 'UNLINK' end
  for i = 1, #keys, 1000 do
    redis.call(cmd, unpack(keys, i, math.min(i + 999, #keys)))
  end
  return #keys
end
"
    };
}

/// The Lua library of the key-filter scripts, for tests.
#[cfg(test)]
const FILTER_LUA: &str = filter_lua!();

/// Lua run in the db to flush under a key filter: deletes its owned keys.
/// `ARGV[1]` is the `FLUSHDB` mode (or empty), the filter from `ARGV[2]`.
/// Returns the number of keys deleted.
const FILTERED_FLUSH_SCRIPT: &str = concat!(
    filter_lua!(),
    "return delete(owned_keys(filter_from(2)), ARGV[1])"
);

/// Lua swapping the owned keys of target dbs `ARGV[1]` and `ARGV[2]`
/// under a key filter (filter from `ARGV[3]`), leaving every other key
/// where it is. Both dbs are listed, and a temporary name chosen for each
/// key both hold, before anything changes (a script stopped by an error
/// keeps what it did). Then those keys of `b` are renamed to their
/// temporary names, the owned keys of `a` `MOVE`d to `b`, those of `b`
/// (under their temporary names where renamed) `MOVE`d to `a`, and the
/// temporary names renamed back. A temporary name extends its key
/// (`<key>!ferry-swap-0`, another byte or number where that is taken or
/// excluded) and is owned by the filter and held by neither db, so Redis
/// replicating the script's effects shows a ferry syncing from this target
/// (a cascade) only `RENAME`s and `MOVE`s of owned keys, never one of
/// ferry's own names. Keys keep their TTLs; no value is copied. Returns the
/// number of keys moved.
const FILTERED_SWAP_SCRIPT: &str = concat!(
    filter_lua!(),
    "\
local a, b = ARGV[1], ARGV[2]
local filter = filter_from(3)
redis.call('SELECT', a)
local in_a = owned_keys(filter)
redis.call('SELECT', b)
local in_b = owned_keys(filter)
local in_a_set = {}
for _, key in ipairs(in_a) do in_a_set[key] = true end
local taken = {}
local function held(name)
  redis.call('SELECT', a)
  local n = redis.call('EXISTS', name)
  redis.call('SELECT', b)
  return n + redis.call('EXISTS', name) > 0
end
local function temporary(key)
  for c = 33, 126 do
    for n = 0, 999 do
      local name = key .. string.char(c) .. 'ferry-swap-' .. n
      if owned(name, filter) and not taken[name] and not held(name) then
        taken[name] = true
        return name
      end
    end
  end
  error({err = 'FERRYSWAP no free temporary name for a key both dbs hold'})
end
local both, temp = {}, {}
for _, key in ipairs(in_b) do
  if in_a_set[key] then
    both[#both + 1] = key
    temp[key] = temporary(key)
  end
end
redis.call('SELECT', b)
for _, key in ipairs(both) do redis.call('RENAME', key, temp[key]) end
redis.call('SELECT', a)
for _, key in ipairs(in_a) do redis.call('MOVE', key, b) end
redis.call('SELECT', b)
for _, key in ipairs(in_b) do redis.call('MOVE', temp[key] or key, a) end
redis.call('SELECT', a)
for _, key in ipairs(both) do redis.call('RENAME', temp[key], key) end
return #in_a + #in_b"
);

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

/// [`LOAD_START_SCRIPT`] under a key filter: counts and deletes only the
/// owned keys of the owned dbs. `ARGV[5]` is the number `n` of owned dbs,
/// `ARGV[6..6+n]` the dbs, the filter from `ARGV[6+n]`.
const FILTERED_LOAD_START_SCRIPT: &str = concat!(
    filter_lua!(),
    "\
local ndbs = tonumber(ARGV[5])
local filter = filter_from(6 + ndbs)
if ARGV[1] == 'check' then
  local busy = {}
  for i = 6, 5 + ndbs do
    redis.call('SELECT', ARGV[i])
    local n = #owned_keys(filter)
    if n > 0 then busy[#busy + 1] = ARGV[i] .. ':' .. n end
  end
  redis.call('SELECT', 0)
  if #busy > 0 then
    return redis.error_reply('FERRYEXISTING ' .. table.concat(busy, ' '))
  end
end
if ARGV[2] == 'flush' then
  for i = 6, 5 + ndbs do
    redis.call('SELECT', ARGV[i])
    delete(owned_keys(filter), '')
  end
end
redis.call('SELECT', 0)
redis.call('SET', ARGV[3], ARGV[4])
return 'OK'"
);

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

fn eval(script: &'static str, args: Vec<Bytes>) -> Command {
    let mut parts: Vec<Bytes> = Vec::with_capacity(3 + args.len());
    parts.push(Bytes::from_static(b"EVAL"));
    parts.push(Bytes::from_static(script.as_bytes()));
    parts.push(Bytes::from_static(b"0"));
    parts.extend(args);
    Command::new(parts)
}

fn eval_keep_internal(args: &[&[u8]]) -> Command {
    eval(
        KEEP_INTERNAL_SCRIPT,
        args.iter().map(|a| Bytes::copy_from_slice(a)).collect(),
    )
}

/// Commands whose every argument after the name is a key of its own.
const KEY_LIST_COMMANDS: [&str; 4] = ["DEL", "UNLINK", "EXISTS", "TOUCH"];

/// Commands [`OwnedKeyspace::translate`] rewrites for the owned dbs.
const SPECIAL_COMMANDS: [&str; 6] = ["FLUSHALL", "FLUSHDB", "SWAPDB", "MOVE", "COPY", "FUNCTION"];

/// Scripts: they may touch keys they do not declare.
const SCRIPT_COMMANDS: [&str; 6] = [
    "EVAL",
    "EVALSHA",
    "EVAL_RO",
    "EVALSHA_RO",
    "FCALL",
    "FCALL_RO",
];

impl OwnedKeyspace {
    /// Every db of the target, every key.
    pub fn all() -> OwnedKeyspace {
        OwnedKeyspace {
            dbs: DbPlan::Every,
            keys: None,
        }
    }

    /// Exactly `dbs` (the same numbers on both sides), every key.
    pub fn dbs(dbs: impl IntoIterator<Item = u32>) -> OwnedKeyspace {
        let mut dbs: Vec<u32> = dbs.into_iter().collect();
        dbs.sort_unstable();
        dbs.dedup();
        OwnedKeyspace {
            dbs: DbPlan::Same(dbs),
            keys: None,
        }
    }

    /// Source db `s` into target db `t` for each `(s, t)`, every key; `Err`
    /// when two source dbs share a target db or a source db is mapped twice.
    pub fn mapped(pairs: impl IntoIterator<Item = (u32, u32)>) -> Result<OwnedKeyspace, String> {
        let mut map = BTreeMap::new();
        for (source, target) in pairs {
            if map.insert(source.to_string(), target).is_some() {
                return Err(format!("source db {source} is mapped twice"));
            }
        }
        FilterConfig {
            db_map: Some(map),
            ..FilterConfig::default()
        }
        .keyspace()
        .map_err(|e| e.reason)
    }

    /// The same, owning only the keys of `keys`.
    pub fn with_keys(mut self, keys: KeyFilter) -> OwnedKeyspace {
        self.keys = Some(keys);
        self
    }

    /// The `(source, target)` pairs of a `db-map`, sorted by source;
    /// `None` without one.
    pub fn db_map(&self) -> Option<Vec<(u32, u32)>> {
        match &self.dbs {
            DbPlan::Mapped(pairs) => Some(pairs.clone()),
            _ => None,
        }
    }

    /// The key filter, if any.
    pub fn key_filter(&self) -> Option<&KeyFilter> {
        self.keys.as_ref()
    }

    /// The target db source db `db` is applied to; `None` when it is not
    /// replicated.
    pub fn target_db(&self, db: u32) -> Option<u32> {
        match &self.dbs {
            DbPlan::Every => Some(db),
            DbPlan::Same(dbs) => dbs.binary_search(&db).is_ok().then_some(db),
            DbPlan::Mapped(pairs) => pairs
                .binary_search_by_key(&db, |&(source, _)| source)
                .ok()
                .map(|at| pairs[at].1),
        }
    }

    /// The source db applied to target db `db`, if any.
    pub fn source_db(&self, db: u32) -> Option<u32> {
        match &self.dbs {
            DbPlan::Mapped(pairs) => pairs
                .iter()
                .find(|&&(_, target)| target == db)
                .map(|&(source, _)| source),
            _ => self.target_db(db),
        }
    }

    /// Whether this sync owns (keys in) target db `db`.
    pub fn owns_target_db(&self, db: u32) -> bool {
        self.source_db(db).is_some()
    }

    /// Whether `key` is owned wherever its db is: not internal, and within
    /// the key filter.
    pub fn owns_key(&self, key: &[u8]) -> bool {
        match &self.keys {
            None => !key.starts_with(INTERNAL_PREFIX),
            Some(filter) => filter.owns(key),
        }
    }

    /// Whether `key` of source db `db` is replicated.
    pub fn replicates(&self, db: u32, key: &[u8]) -> bool {
        self.target_db(db).is_some() && self.owns_key(key)
    }

    /// True when this sync owns the whole target of `databases` dbs: every
    /// db, every key (server-wide state such as functions is then its to
    /// replace).
    pub fn owns_whole_target(&self, databases: u32) -> bool {
        self.keys.is_none() && (0..databases).all(|db| self.owns_target_db(db))
    }

    /// The owned target dbs of a target with `databases` dbs, ascending.
    pub fn owned_target_dbs(&self, databases: u32) -> Vec<u32> {
        (0..databases)
            .filter(|&db| self.owns_target_db(db))
            .collect()
    }

    /// The command that empties the owned keys of target db `db` (`mode`:
    /// the `FLUSHDB` option, e.g. `ASYNC`, if any), keeping internal keys
    /// and, under a key filter, every key outside it.
    pub fn flush_db(&self, db: u32, mode: Option<&[u8]>) -> Command {
        if let Some(filter) = &self.keys {
            let mut args = vec![mode.map_or(Bytes::new(), Bytes::copy_from_slice)];
            filter.script_args(&mut args);
            return eval(FILTERED_FLUSH_SCRIPT, args);
        }
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
    /// owned keys (see [`parse_existing_data`]), empties the owned keys of
    /// the owned dbs if `flush` (internal keys kept), and sets
    /// `checkpoint_key` to `checkpoint`.
    pub fn load_start(
        &self,
        databases: u32,
        check: bool,
        flush: bool,
        checkpoint_key: &Bytes,
        checkpoint: &[u8],
    ) -> Command {
        let owned = self.owned_target_dbs(databases);
        let mut args: Vec<Bytes> = Vec::with_capacity(6 + owned.len());
        args.push(Bytes::from_static(if check {
            b"check"
        } else {
            b"nocheck"
        }));
        args.push(Bytes::from_static(if flush { b"flush" } else { b"keep" }));
        args.push(checkpoint_key.clone());
        args.push(Bytes::copy_from_slice(checkpoint));
        let script = match &self.keys {
            None => LOAD_START_SCRIPT,
            Some(_) => {
                args.push(Bytes::from(owned.len().to_string()));
                FILTERED_LOAD_START_SCRIPT
            }
        };
        args.extend(owned.into_iter().map(|db| Bytes::from(db.to_string())));
        if let Some(filter) = &self.keys {
            filter.script_args(&mut args);
        }
        eval(script, args)
    }

    /// Whose keys `cmd` names. Without a key filter this is only ferry's
    /// internal keys against the others (no allocation beyond the command
    /// table's key lookup).
    pub fn classify(&self, cmd: &Command) -> KeyClass {
        if self.keys.is_some() && SCRIPT_COMMANDS.iter().any(|name| cmd.is(name)) {
            return KeyClass::Unknown;
        }
        // Once per replicated command: the key indices go into one buffer
        // per thread (kept small), and the keys are read in place.
        thread_local! {
            static INDICES: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
        }
        let counts = INDICES.with_borrow_mut(|indices| {
            let found = command::key_indices_into(cmd, indices);
            let (mut keys, mut internal, mut owned) = (0usize, 0usize, 0usize);
            for key in indices.iter().filter_map(|&i| cmd.args.get(i)) {
                keys += 1;
                if key.starts_with(INTERNAL_PREFIX) {
                    internal += 1;
                } else if self.keys.as_ref().map_or(true, |filter| filter.owns(key)) {
                    owned += 1;
                }
            }
            if indices.capacity() > 1024 {
                *indices = Vec::new();
            }
            found.map(|()| (keys, internal, owned))
        });
        match counts {
            Ok((0, _, _)) => KeyClass::Data,
            Ok((keys, _, owned)) if owned == keys => KeyClass::Data,
            Ok((keys, internal, _)) if internal == keys => KeyClass::Internal,
            Ok((_, _, 0)) => KeyClass::Outside,
            Ok(_) => KeyClass::Mixed,
            // Without a key filter: data, as far as we can tell.
            Err(_) if self.keys.is_none() => KeyClass::Data,
            Err(_) => KeyClass::Unknown,
        }
    }

    /// Why a [`KeyClass::Unknown`] command is refused.
    pub fn unknown_keys_reason(&self, cmd: &Command) -> String {
        let filter = self.keys.as_ref().map(ToString::to_string);
        let filter = filter.as_deref().unwrap_or("every key");
        if SCRIPT_COMMANDS.iter().any(|name| cmd.is(name)) {
            format!(
                "a script may touch keys it does not declare, outside the owned keys ({filter})"
            )
        } else {
            format!(
                "ferry's command table cannot tell its keys, which may be outside the owned \
                 keys ({filter})"
            )
        }
    }

    /// What is applied of a [`KeyClass::Mixed`] command: `Ok(Some(cmd))`
    /// the command without the keys this sync does not own (or what it
    /// amounts to for the owned keyspace), `Ok(None)` nothing (it changes
    /// no owned key), `Err(why)` refused.
    pub fn resolve_mixed(&self, cmd: &Command) -> Result<Option<Command>, String> {
        let Some(name) = cmd.args.first() else {
            return Ok(None);
        };
        if KEY_LIST_COMMANDS.iter().any(|list| cmd.is(list)) {
            let mut args = Vec::with_capacity(cmd.args.len());
            args.push(name.clone());
            args.extend(
                cmd.args[1..]
                    .iter()
                    .filter(|key| self.owns_key(key))
                    .cloned(),
            );
            return Ok((args.len() > 1).then(|| Command::new(args)));
        }
        if cmd.is("MSET") && cmd.args.len() % 2 == 1 {
            let mut args = Vec::with_capacity(cmd.args.len());
            args.push(name.clone());
            for pair in cmd.args[1..].chunks_exact(2) {
                if self.owns_key(&pair[0]) {
                    args.extend(pair.iter().cloned());
                }
            }
            return Ok((args.len() > 1).then(|| Command::new(args)));
        }
        let names_internal = command::keys(cmd)
            .map(|keys| keys.iter().any(|k| k.starts_with(INTERNAL_PREFIX)))
            .unwrap_or(false);
        if names_internal {
            return Err(format!(
                "it names ferry's own keys ({}*) together with data keys; applying it could \
                 change another sync's checkpoint",
                String::from_utf8_lossy(INTERNAL_PREFIX)
            ));
        }
        let filter = self.keys.as_ref().map(ToString::to_string);
        let filter = filter.as_deref().unwrap_or("every key");
        let two = match (cmd.args.get(1), cmd.args.get(2)) {
            (Some(source), Some(destination)) => {
                Some((self.owns_key(source), self.owns_key(destination), source))
            }
            _ => None,
        };
        let rename = cmd.is("RENAME") || cmd.is("RENAMENX");
        match two {
            // The owned key left the owned keyspace (a propagated RENAMENX
            // succeeded).
            Some((true, false, source)) if rename => Ok(Some(Command::new(vec![
                Bytes::from_static(b"DEL"),
                source.clone(),
            ]))),
            // A copy outside: nothing owned changes.
            Some((true, false, _)) if cmd.is("COPY") => Ok(None),
            Some((false, true, _)) if rename || cmd.is("COPY") => Err(format!(
                "it writes an owned key from a key outside the owned keys ({filter}): the value \
                 was never replicated"
            )),
            _ => Err(format!(
                "it names keys outside the owned keys ({filter}) together with owned keys, \
                 and they do not stand alone"
            )),
        }
    }

    /// Translates the commands of one entry that starts in source db `db`,
    /// for a target with `databases` dbs. `SELECT`s are consumed (the
    /// placement says where each command runs). `origins` stays empty. The
    /// commands' keys are [`OwnedKeyspace::classify`]'s concern, before.
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
        let mut out = Translated {
            commands: Vec::with_capacity(commands.len()),
            ..Translated::default()
        };
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
        // Ordinary commands go straight to their db, without building the
        // name.
        let Some(name) = SPECIAL_COMMANDS.into_iter().find(|name| cmd.is(name)) else {
            self.place(db, cmd, out);
            return Ok(());
        };
        let refuse = |reason: String| Refusal {
            command: name.to_string(),
            reason,
        };
        // A db argument the target lacks fails only when the command runs,
        // inside `EXEC` (and a script would stop half way): refused whole
        // before anything is sent, like a command placed in such a db.
        let in_range = |target: u32| {
            if target < databases {
                Ok(())
            } else {
                Err(refuse(format!(
                    "db {target} is out of range: the target has {databases} databases"
                )))
            }
        };
        match name {
            "FLUSHALL" => {
                let mode = cmd.args.get(1).map(|m| m.as_ref());
                for owned in self.owned_target_dbs(databases) {
                    out.commands.push(Placed {
                        db: owned,
                        cmd: self.flush_db(owned, mode),
                    });
                }
                Ok(())
            }
            "FLUSHDB" => {
                match self.target_db(db) {
                    Some(target) => {
                        let mode = cmd.args.get(1).map(|m| m.as_ref());
                        out.commands.push(Placed {
                            db: target,
                            cmd: self.flush_db(target, mode),
                        });
                    }
                    None => out.filtered += 1,
                }
                Ok(())
            }
            "SWAPDB" => {
                let (Some(a), Some(b)) = (
                    cmd.args.get(1).and_then(|d| parse_db(d)),
                    cmd.args.get(2).and_then(|d| parse_db(d)),
                ) else {
                    return Err(refuse("SWAPDB with a bad db index".into()));
                };
                match (self.target_db(a), self.target_db(b)) {
                    (None, None) => {
                        out.filtered += 1;
                        Ok(())
                    }
                    // Nothing moves.
                    _ if a == b => {
                        out.filtered += 1;
                        Ok(())
                    }
                    (Some(ta), Some(tb)) => {
                        in_range(ta)?;
                        in_range(tb)?;
                        let (ta_arg, tb_arg) = (ta.to_string(), tb.to_string());
                        // Any owned db will do (the current one if owned),
                        // but the script keeping internal keys reads db 0.
                        let mut at = self.target_db(db).unwrap_or(ta);
                        let cmd = match &self.keys {
                            Some(filter) => {
                                let mut args = vec![Bytes::from(ta_arg), Bytes::from(tb_arg)];
                                filter.script_args(&mut args);
                                eval(FILTERED_SWAP_SCRIPT, args)
                            }
                            None if ta == 0 || tb == 0 => {
                                at = 0;
                                eval_keep_internal(&[b"swap", ta_arg.as_bytes(), tb_arg.as_bytes()])
                            }
                            None if (ta, tb) == (a, b) => cmd,
                            None => Command::new(vec![
                                Bytes::from_static(b"SWAPDB"),
                                Bytes::from(ta_arg),
                                Bytes::from(tb_arg),
                            ]),
                        };
                        out.commands.push(Placed { db: at, cmd });
                        Ok(())
                    }
                    (owns_a, _) => {
                        let (owned, other) = if owns_a.is_some() { (a, b) } else { (b, a) };
                        Err(refuse(format!(
                            "SWAPDB {a} {b} would exchange owned db {owned} with db {other}, \
                             which this sync does not own ([filter] {})",
                            self.db_field()
                        )))
                    }
                }
            }
            "MOVE" => {
                let Some(to) = cmd.args.get(2).and_then(|d| parse_db(d)) else {
                    return Err(refuse("MOVE with a bad db index".into()));
                };
                match (self.target_db(db), self.target_db(to)) {
                    (Some(from), Some(target)) => {
                        in_range(target)?;
                        let cmd = if target == to {
                            cmd
                        } else {
                            let mut args = cmd.args;
                            args[2] = Bytes::from(target.to_string());
                            Command::new(args)
                        };
                        out.commands.push(Placed { db: from, cmd });
                        Ok(())
                    }
                    (Some(from), None) => {
                        // The key left the owned keyspace.
                        let key = cmd.args.get(1).cloned().unwrap_or_default();
                        out.commands.push(Placed {
                            db: from,
                            cmd: Command::new(vec![Bytes::from_static(b"DEL"), key]),
                        });
                        Ok(())
                    }
                    (None, Some(_)) => Err(refuse(format!(
                        "MOVE from db {db}, which this sync does not replicate, into \
                         replicated db {to}: the value was never replicated"
                    ))),
                    (None, None) => {
                        out.filtered += 1;
                        Ok(())
                    }
                }
            }
            "COPY" => {
                let to = match copy_destination_db(&cmd) {
                    None => Some(db),
                    Some((_, to)) => to,
                };
                let Some(to) = to else {
                    return Err(refuse("COPY with a bad DB index".into()));
                };
                match (self.target_db(db), self.target_db(to)) {
                    (Some(from), Some(target)) => {
                        in_range(target)?;
                        let cmd = match copy_destination_db(&cmd) {
                            Some((at, _)) if target != to => {
                                let mut args = cmd.args;
                                args[at] = Bytes::from(target.to_string());
                                Command::new(args)
                            }
                            _ => cmd,
                        };
                        out.commands.push(Placed { db: from, cmd });
                        Ok(())
                    }
                    (None, Some(_)) => Err(refuse(format!(
                        "COPY from db {db}, which this sync does not replicate, into \
                         replicated db {to}: the value was never replicated"
                    ))),
                    // Nothing changes in the owned keyspace.
                    (_, None) => {
                        out.filtered += 1;
                        Ok(())
                    }
                }
            }
            "FUNCTION" => {
                let sub = cmd.args.get(1).map(|s| upper(s)).unwrap_or_default();
                let flushes = sub == "FLUSH"
                    || (sub == "RESTORE" && cmd.args[2..].iter().any(|a| upper(a) == "FLUSH"));
                if flushes && !self.owns_whole_target(databases) {
                    return Err(refuse(format!(
                        "FUNCTION {sub} replaces the target's functions, which are server-wide; \
                         only a sync that owns the whole target (every db, every key) applies \
                         it ({self} owned)"
                    )));
                }
                self.place(db, cmd, out);
                Ok(())
            }
            _ => {
                self.place(db, cmd, out);
                Ok(())
            }
        }
    }

    /// Places `cmd` (run in source db `db`) in its target db, or counts it
    /// filtered.
    fn place(&self, db: u32, cmd: Command, out: &mut Translated) {
        match self.target_db(db) {
            Some(target) => out.commands.push(Placed { db: target, cmd }),
            None => out.filtered += 1,
        }
    }

    /// The `[filter]` key that chose the dbs, for messages.
    fn db_field(&self) -> &'static str {
        match self.dbs {
            DbPlan::Mapped(_) => "db-map",
            _ => "dbs",
        }
    }
}

/// The `DB n` option of `COPY src dst DB n`: `None` without one, else the
/// index of `n` among the arguments and `n` (`None` when malformed).
fn copy_destination_db(cmd: &Command) -> Option<(usize, Option<u32>)> {
    let args = &cmd.args;
    let at = args.iter().skip(3).position(|a| upper(a) == "DB")? + 3;
    Some((at + 1, args.get(at + 1).and_then(|d| parse_db(d))))
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
                        match s.as_str() {
                            KEEP_INTERNAL_SCRIPT => "<keep-internal>".into(),
                            FILTERED_FLUSH_SCRIPT => "<filtered-flush>".into(),
                            FILTERED_SWAP_SCRIPT => "<filtered-swap>".into(),
                            LOAD_START_SCRIPT => "<load-start>".into(),
                            FILTERED_LOAD_START_SCRIPT => "<filtered-load-start>".into(),
                            _ => s,
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
        let empty = FilterConfig {
            dbs: Some(vec![]),
            ..FilterConfig::default()
        };
        assert_eq!(empty.keyspace().unwrap_err().field, "filter.dbs");
        let some = FilterConfig {
            dbs: Some(vec![5, 0, 5]),
            ..FilterConfig::default()
        };
        let keyspace = some.keyspace().unwrap();
        assert_eq!(keyspace.owned_target_dbs(16), [0, 5]);
        assert_eq!(keyspace.to_string(), "db 0, 5");
        assert!(!keyspace.owns_whole_target(16));
        assert!(OwnedKeyspace::dbs([0, 1]).owns_whole_target(2));
    }

    fn mapped(pairs: &[(u32, u32)]) -> OwnedKeyspace {
        OwnedKeyspace::mapped(pairs.iter().copied()).unwrap()
    }

    fn prefixes(include: &[&str], exclude: &[&str]) -> KeyFilter {
        let bytes = |list: &[&str]| list.iter().map(|p| Bytes::from(p.to_string())).collect();
        KeyFilter::new(bytes(include), bytes(exclude))
    }

    #[test]
    fn db_map_config_is_checked() {
        let config = |map: &[(&str, u32)]| FilterConfig {
            db_map: Some(map.iter().map(|(s, t)| (s.to_string(), *t)).collect()),
            ..FilterConfig::default()
        };
        let keyspace = config(&[("0", 3), ("5", 6)]).keyspace().unwrap();
        assert_eq!(keyspace.target_db(0), Some(3));
        assert_eq!(keyspace.target_db(5), Some(6));
        assert_eq!(keyspace.target_db(3), None, "only the dbs named");
        assert_eq!(keyspace.source_db(6), Some(5));
        assert_eq!(keyspace.owned_target_dbs(16), [3, 6]);
        assert!(keyspace.owns_target_db(3) && !keyspace.owns_target_db(0));
        assert_eq!(keyspace.to_string(), "db 3 (source db 0), 6 (source db 5)");
        // Two source dbs into one target db.
        let clash = config(&[("0", 1), ("1", 1)]).keyspace().unwrap_err();
        assert_eq!(clash.field, "filter.db-map");
        assert!(
            clash
                .reason
                .contains("source dbs 0 and 1 both map to target db 1"),
            "{}",
            clash.reason
        );
        let twice = config(&[("0", 1), ("00", 2)]).keyspace().unwrap_err();
        assert!(twice.reason.contains("mapped twice"), "{}", twice.reason);
        assert!(config(&[("x", 1)]).keyspace().is_err());
        assert!(config(&[]).keyspace().is_err());
        let both = FilterConfig {
            dbs: Some(vec![0]),
            ..config(&[("0", 1)])
        };
        assert_eq!(both.keyspace().unwrap_err().field, "filter.db-map");
        // Identity entries keep a number.
        let keyspace = config(&[("1", 1), ("2", 0)]).keyspace().unwrap();
        assert_eq!(
            (keyspace.target_db(1), keyspace.target_db(2)),
            (Some(1), Some(0))
        );
        // The TOML shape.
        let parsed: FilterConfig =
            toml::from_str("db-map = { \"0\" = 3, \"5\" = 6 }\nkey-prefix = [\"app:\"]\n").unwrap();
        assert_eq!(parsed.keyspace().unwrap().target_db(5), Some(6));
        assert!(toml::from_str::<FilterConfig>("db_map = {}\n").is_err());
    }

    #[test]
    fn db_map_flag_parses() {
        let map = parse_db_map("0=3, 5=6").unwrap();
        assert_eq!(map.get("0"), Some(&3));
        assert_eq!(map.get("5"), Some(&6));
        assert!(parse_db_map("0=3,0=4").unwrap_err().contains("twice"));
        assert!(parse_db_map("0:3").is_err());
        assert!(parse_db_map("a=1").is_err());
        assert!(parse_db_map("").is_err());
    }

    #[test]
    fn commands_follow_the_db_map() {
        let keyspace = mapped(&[(0, 3), (5, 6), (7, 0)]);
        let t = keyspace
            .translate(
                0,
                vec![
                    cmd(&["SET", "a", "1"]),
                    cmd(&["SELECT", "5"]),
                    cmd(&["INCR", "b"]),
                    cmd(&["SELECT", "3"]),
                    cmd(&["SET", "not-replicated", "1"]),
                    cmd(&["SELECT", "7"]),
                    cmd(&["SET", "c", "1"]),
                ],
                16,
            )
            .unwrap();
        assert_eq!(shown(&t), ["3: SET a 1", "6: INCR b", "0: SET c 1"]);
        assert_eq!(t.filtered, 1);
        // Flushes: each owned target db; db 0 keeps the internal keys.
        let t = keyspace.translate(5, vec![cmd(&["FLUSHALL"])], 16).unwrap();
        assert_eq!(
            shown(&t),
            [
                "0: EVAL <keep-internal> 0 flush ",
                "3: FLUSHDB",
                "6: FLUSHDB"
            ]
        );
        let t = keyspace
            .translate(5, vec![cmd(&["FLUSHDB", "ASYNC"])], 16)
            .unwrap();
        assert_eq!(shown(&t), ["6: FLUSHDB ASYNC"]);
        let t = keyspace.translate(7, vec![cmd(&["FLUSHDB"])], 16).unwrap();
        assert_eq!(shown(&t), ["0: EVAL <keep-internal> 0 flush "]);
        let t = keyspace.translate(3, vec![cmd(&["FLUSHDB"])], 16).unwrap();
        assert_eq!((t.commands.len(), t.filtered), (0, 1));
        // SWAPDB of the target dbs; with target db 0, internal keys stay.
        let t = keyspace
            .translate(1, vec![cmd(&["SWAPDB", "0", "5"])], 16)
            .unwrap();
        assert_eq!(shown(&t), ["3: SWAPDB 3 6"], "run from an owned db");
        let t = keyspace
            .translate(1, vec![cmd(&["SWAPDB", "7", "0"])], 16)
            .unwrap();
        assert_eq!(shown(&t), ["0: EVAL <keep-internal> 0 swap 0 3"]);
        let refused = keyspace
            .translate(0, vec![cmd(&["SWAPDB", "0", "1"])], 16)
            .unwrap_err();
        assert!(refused.reason.contains("db-map"), "{}", refused.reason);
        // MOVE and COPY ... DB name source dbs: mapped.
        let t = keyspace
            .translate(0, vec![cmd(&["MOVE", "k", "5"])], 16)
            .unwrap();
        assert_eq!(shown(&t), ["3: MOVE k 6"]);
        let t = keyspace
            .translate(0, vec![cmd(&["MOVE", "k", "1"])], 16)
            .unwrap();
        assert_eq!(shown(&t), ["3: DEL k"]);
        assert!(keyspace
            .translate(1, vec![cmd(&["MOVE", "k", "0"])], 16)
            .is_err());
        let t = keyspace
            .translate(5, vec![cmd(&["COPY", "a", "b", "db", "7", "REPLACE"])], 16)
            .unwrap();
        assert_eq!(shown(&t), ["6: COPY a b db 0 REPLACE"]);
        let t = keyspace
            .translate(5, vec![cmd(&["COPY", "a", "b"])], 16)
            .unwrap();
        assert_eq!(shown(&t), ["6: COPY a b"]);
        let t = keyspace
            .translate(5, vec![cmd(&["COPY", "a", "b", "DB", "2"])], 16)
            .unwrap();
        assert_eq!((t.commands.len(), t.filtered), (0, 1));
        // A mapped keyspace never owns the whole target.
        assert!(!keyspace.owns_whole_target(16));
        assert!(keyspace
            .translate(0, vec![cmd(&["FUNCTION", "FLUSH"])], 16)
            .is_err());
        // The snapshot load empties the target dbs.
        let start = keyspace.load_start(16, true, true, &Bytes::from_static(b"ck"), b"v");
        assert_eq!(
            shown(&Translated {
                commands: vec![Placed { db: 0, cmd: start }],
                ..Translated::default()
            }),
            ["0: EVAL <load-start> 0 check flush ck v 0 3 6"]
        );
    }

    #[test]
    fn db_arguments_mapped_past_the_targets_dbs_are_refused() {
        // Source db 5 into target db 20 of a 16-db target.
        let keyspace = mapped(&[(0, 0), (5, 20)]);
        let filtered = keyspace
            .clone()
            .with_keys(KeyFilter::new(vec!["a:".into()], vec![]));
        for owned in [&keyspace, &filtered] {
            for (db, parts) in [
                (0, &["SWAPDB", "5", "0"][..]),
                (0, &["SWAPDB", "0", "5"]),
                (0, &["MOVE", "a:k", "5"]),
                (0, &["COPY", "a:k", "a:l", "DB", "5"]),
            ] {
                let refused = owned.translate(db, vec![cmd(parts)], 16).unwrap_err();
                assert!(
                    refused.reason.contains("db 20 is out of range"),
                    "{parts:?}: {}",
                    refused.reason
                );
            }
            // Within range it goes.
            assert!(owned
                .translate(0, vec![cmd(&["SWAPDB", "5", "0"])], 32)
                .is_ok());
        }
    }

    #[test]
    fn keys_are_classified_against_the_key_filter() {
        let every = OwnedKeyspace::all();
        let app = OwnedKeyspace::all().with_keys(prefixes(&["app:"], &["app:tmp:"]));
        let cases: [(&[&str], KeyClass, KeyClass); 10] = [
            (&["SET", "app:a", "1"], KeyClass::Data, KeyClass::Data),
            (&["SET", "other", "1"], KeyClass::Data, KeyClass::Outside),
            (
                &["SET", "app:tmp:x", "1"],
                KeyClass::Data,
                KeyClass::Outside,
            ),
            (
                &["SET", "__ferry:x", "1"],
                KeyClass::Internal,
                KeyClass::Internal,
            ),
            (&["DEL", "app:a", "b"], KeyClass::Data, KeyClass::Mixed),
            (
                &["DEL", "__ferry:x", "b"],
                KeyClass::Mixed,
                KeyClass::Outside,
            ),
            (&["PUBLISH", "chan", "m"], KeyClass::Data, KeyClass::Data),
            (&["FLUSHALL"], KeyClass::Data, KeyClass::Data),
            (
                &["NOSUCHCOMMAND", "app:a"],
                KeyClass::Data,
                KeyClass::Unknown,
            ),
            (
                &["EVAL", "return 1", "1", "app:a"],
                KeyClass::Data,
                KeyClass::Unknown,
            ),
        ];
        for (parts, without, with) in cases {
            assert_eq!(every.classify(&cmd(parts)), without, "{parts:?}");
            assert_eq!(app.classify(&cmd(parts)), with, "{parts:?} under a filter");
        }
        let script = app.unknown_keys_reason(&cmd(&["FCALL", "f", "0"]));
        assert!(script.contains("script"), "{script}");
        // Exclusions alone own every other key.
        let not_cache = OwnedKeyspace::all().with_keys(prefixes(&[], &["cache:"]));
        assert!(not_cache.owns_key(b"x") && !not_cache.owns_key(b"cache:x"));
        assert!(!not_cache.owns_key(b"__ferry:checkpoint:a:0"));
        assert!(not_cache.replicates(3, b"x"));
        assert!(!mapped(&[(0, 1)]).replicates(3, b"x"));
    }

    #[test]
    fn mixed_commands_keep_owned_keys_or_are_refused() {
        let app = OwnedKeyspace::all().with_keys(prefixes(&["app:", "b:"], &[]));
        let resolved = |parts: &[&str]| {
            app.resolve_mixed(&cmd(parts)).map(|c| {
                c.map(|c| {
                    c.args
                        .iter()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
            })
        };
        assert_eq!(
            resolved(&["DEL", "app:a", "x", "b:c", "__ferry:k"]),
            Ok(Some("DEL app:a b:c".into()))
        );
        assert_eq!(
            resolved(&["unlink", "x", "app:a"]),
            Ok(Some("unlink app:a".into()))
        );
        assert_eq!(
            resolved(&["MSET", "app:a", "1", "x", "2", "b:c", "3"]),
            Ok(Some("MSET app:a 1 b:c 3".into()))
        );
        // Out of the owned keys: a rename deletes, a copy changes nothing.
        assert_eq!(
            resolved(&["RENAME", "app:a", "x"]),
            Ok(Some("DEL app:a".into()))
        );
        assert_eq!(
            resolved(&["RENAMENX", "app:a", "x"]),
            Ok(Some("DEL app:a".into()))
        );
        assert_eq!(resolved(&["COPY", "app:a", "x", "REPLACE"]), Ok(None));
        // Into them: the value was never replicated.
        for parts in [&["RENAME", "x", "app:a"][..], &["COPY", "x", "app:a"]] {
            let why = resolved(parts).unwrap_err();
            assert!(why.contains("never replicated"), "{why}");
        }
        // Keys that do not stand alone.
        for parts in [
            &["MSETNX", "app:a", "1", "x", "2"][..],
            &["SUNIONSTORE", "app:d", "x", "app:s"],
            &["SMOVE", "app:a", "x", "m"],
        ] {
            let why = resolved(parts).unwrap_err();
            assert!(why.contains("do not stand alone"), "{parts:?}: {why}");
        }
        // Ferry's own keys among them keep their own message.
        let why = resolved(&["RENAME", "app:a", "__ferry:x"]).unwrap_err();
        assert!(why.contains("ferry's own keys"), "{why}");
    }

    #[test]
    fn flushes_and_swaps_under_a_key_filter_touch_only_owned_keys() {
        let app = OwnedKeyspace::dbs([0, 2]).with_keys(prefixes(&["app:"], &["app:tmp:"]));
        let t = app
            .translate(2, vec![cmd(&["FLUSHALL", "ASYNC"])], 16)
            .unwrap();
        assert_eq!(
            shown(&t),
            [
                "0: EVAL <filtered-flush> 0 ASYNC 1 app: app:tmp:",
                "2: EVAL <filtered-flush> 0 ASYNC 1 app: app:tmp:"
            ]
        );
        let t = app.translate(2, vec![cmd(&["FLUSHDB"])], 16).unwrap();
        assert_eq!(shown(&t), ["2: EVAL <filtered-flush> 0  1 app: app:tmp:"]);
        let t = app
            .translate(0, vec![cmd(&["SWAPDB", "2", "0"])], 16)
            .unwrap();
        assert_eq!(shown(&t), ["0: EVAL <filtered-swap> 0 2 0 1 app: app:tmp:"]);
        // MOVE keeps the key's name: the db rules decide.
        let t = app
            .translate(0, vec![cmd(&["MOVE", "app:k", "2"])], 16)
            .unwrap();
        assert_eq!(shown(&t), ["0: MOVE app:k 2"]);
        // Functions are server-wide: never with a key filter.
        let whole = OwnedKeyspace::all().with_keys(prefixes(&["app:"], &[]));
        assert!(!whole.owns_whole_target(16));
        assert!(whole
            .translate(0, vec![cmd(&["FUNCTION", "FLUSH"])], 16)
            .is_err());
        assert!(whole
            .translate(0, vec![cmd(&["FUNCTION", "LOAD", "code"])], 16)
            .is_ok());
        // The load start counts and deletes only owned keys.
        let start = app.load_start(16, false, true, &Bytes::from_static(b"ck"), b"v");
        assert_eq!(
            shown(&Translated {
                commands: vec![Placed { db: 0, cmd: start }],
                ..Translated::default()
            }),
            ["0: EVAL <filtered-load-start> 0 nocheck flush ck v 2 0 2 1 app: app:tmp:"]
        );
        // A flush without a key filter is unchanged.
        assert_eq!(OwnedKeyspace::all().flush_db(3, None), cmd(&["FLUSHDB"]));
    }

    #[test]
    fn key_filter_patterns_escape_glob_characters() {
        let filter = prefixes(&["a*b?", "[x]\\", "plain:"], &[]);
        let patterns: Vec<String> = filter
            .patterns()
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        assert_eq!(patterns, ["a\\*b\\?*", "\\[x\\]\\\\*", "plain:*"]);
        assert_eq!(prefixes(&[], &["x"]).patterns(), [Bytes::from_static(b"*")]);
        assert_eq!(filter.to_string(), "keys a*b?*, [x]\\*, plain:*");
        assert!(FILTER_LUA.contains("local function owned_keys"));
    }

    #[test]
    fn key_prefix_config_is_checked() {
        let config = |include: Option<&[&str]>, exclude: Option<&[&str]>| FilterConfig {
            key_prefix: include.map(|l| l.iter().map(|s| s.to_string()).collect()),
            exclude_key_prefix: exclude.map(|l| l.iter().map(|s| s.to_string()).collect()),
            ..FilterConfig::default()
        };
        let keyspace = config(Some(&["app:"]), Some(&["app:tmp:"]))
            .keyspace()
            .unwrap();
        assert_eq!(keyspace.to_string(), "every db, keys app:* but app:tmp:*");
        assert!(keyspace.owns_key(b"app:1") && !keyspace.owns_key(b"app:tmp:1"));
        assert_eq!(
            config(Some(&[]), None).keyspace().unwrap_err().field,
            "filter.key-prefix"
        );
        assert_eq!(
            config(None, Some(&[""])).keyspace().unwrap_err().field,
            "filter.exclude-key-prefix"
        );
        for internal in ["__ferry:x", "__ferry"] {
            let why = config(Some(&[internal]), None).keyspace().unwrap_err();
            assert!(why.reason.contains("ferry's own keys"), "{}", why.reason);
        }
        // A prefix of ferry's prefix owns the other keys it matches, never
        // ferry's own.
        let underscore = config(Some(&["__f"]), None).keyspace().unwrap();
        assert!(underscore.owns_key(b"__foo") && !underscore.owns_key(b"__ferry:x"));
        assert!(!underscore.owns_key(b"app:1"));
        assert_eq!(config(None, None).keyspace().unwrap(), OwnedKeyspace::all());
    }
}
