//! The generated command table and the key/slot functions of
//! `ferry::redis::command`, checked against a real redis-server 7.0:
//! `COMMAND` (arity, flags, legacy positions, key specs of every command),
//! `COMMAND GETKEYS` (keys of generated and hand-written invocations, and of
//! pseudo-random ones) and `CLUSTER KEYSLOT` (hash slots).
mod common;

use bytes::Bytes;
use ferry::redis::client::Client;
use ferry::redis::command::{
    command_slot, commands, is_write, key_hash_slot, key_indices, keys, lookup, lookup_name,
    resolve, table_redis_version, BeginSearch, Command, CommandError, CommandFlags, CommandSpec,
    FindKeys, KeySpecFlags, SEED_SYNC_COMMANDS,
};
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;
use proptest::prelude::*;

async fn connect(server: &common::RedisServer) -> Client {
    let url = RedisUrl::parse(&server.url()).expect("server url");
    Client::connect(&url).await.expect("connect")
}

/// What `COMMAND GETKEYS` answered.
#[derive(Debug, Clone, PartialEq)]
enum ServerKeys {
    Keys(Vec<Bytes>),
    /// "Invalid arguments specified for command": the key layout is wrong.
    InvalidArguments,
    /// "The command has no key arguments".
    NoKeyArguments,
    /// "Invalid number of arguments specified for command".
    WrongArity,
    /// "Invalid command specified".
    InvalidCommand,
}

fn parse_getkeys(reply: &Frame) -> ServerKeys {
    match reply {
        Frame::Array(items) => ServerKeys::Keys(
            items
                .iter()
                .map(|f| f.as_bytes().expect("GETKEYS key is a string").clone())
                .collect(),
        ),
        other => {
            let message = other
                .error_message()
                .unwrap_or_else(|| panic!("unexpected GETKEYS reply {other:?}"));
            if message.contains("Invalid arguments specified") {
                ServerKeys::InvalidArguments
            } else if message.contains("has no key arguments") {
                ServerKeys::NoKeyArguments
            } else if message.contains("Invalid number of arguments") {
                ServerKeys::WrongArity
            } else if message.contains("Invalid command specified") {
                ServerKeys::InvalidCommand
            } else {
                panic!("unexpected GETKEYS error {message:?}")
            }
        }
    }
}

/// `COMMAND GETKEYS` for many commands, pipelined in batches.
async fn server_keys(client: &mut Client, cmds: &[Command]) -> Vec<ServerKeys> {
    let mut answers = Vec::with_capacity(cmds.len());
    for batch in cmds.chunks(500) {
        let requests: Vec<Command> = batch
            .iter()
            .map(|cmd| {
                let mut args = vec![
                    Bytes::from_static(b"COMMAND"),
                    Bytes::from_static(b"GETKEYS"),
                ];
                args.extend(cmd.args.iter().cloned());
                Command::new(args)
            })
            .collect();
        let replies = client.pipeline(&requests).await.expect("GETKEYS pipeline");
        answers.extend(replies.iter().map(parse_getkeys));
    }
    answers
}

fn has_real_key_specs(spec: &CommandSpec) -> bool {
    spec.key_specs
        .iter()
        .any(|k| !k.flags.contains(KeySpecFlags::NOT_KEY))
}

/// Checks ferry's answer against the server's; `Err` describes a mismatch.
///
/// The allowed differences are documented in `command.rs`; both are key
/// counts that the command itself rejects:
/// - a count the strict integer parser of the command refuses but C `atoi`
///   reads as positive (`01`, `2x`): GETKEYS' fallback uses `atoi` and
///   reports keys;
/// - for a command flagged `no_mandatory_keys` (EVAL, FCALL, ...), a count
///   that is not an integer or exceeds the arguments: GETKEYS answers "no
///   keys".
///
/// ferry reports the bad count in both cases.
fn compare(cmd: &Command, server: &ServerKeys) -> Result<(), String> {
    let ours = keys(cmd);
    let no_mandatory_keys =
        || lookup(cmd).is_some_and(|s| s.flags.contains(CommandFlags::NO_MANDATORY_KEYS));
    let ok = match (server, &ours) {
        (ServerKeys::Keys(expected), Ok(found)) => expected == found,
        (ServerKeys::Keys(expected), Err(CommandError::InvalidNumkeys { index, .. })) => {
            (expected.is_empty() && no_mandatory_keys()) || atoi(&cmd.args[*index]) > 0
        }
        (ServerKeys::Keys(expected), Err(CommandError::NumkeysOutOfRange { .. })) => {
            expected.is_empty() && no_mandatory_keys()
        }
        (ServerKeys::InvalidArguments, Err(e)) => matches!(
            e,
            CommandError::InvalidNumkeys { .. }
                | CommandError::NumkeysOutOfRange { .. }
                | CommandError::KeysOutOfRange { .. }
                | CommandError::InvalidKeyLayout { .. }
                | CommandError::MissingKeys { .. }
        ),
        (ServerKeys::NoKeyArguments, Ok(found)) => {
            found.is_empty() && lookup(cmd).is_some_and(|s| !has_real_key_specs(s))
        }
        // Redis checks "has keys" before the arity.
        (ServerKeys::NoKeyArguments, Err(CommandError::WrongArity { .. })) => {
            lookup(cmd).is_some_and(|s| !has_real_key_specs(s))
        }
        (ServerKeys::WrongArity, Err(CommandError::WrongArity { .. })) => true,
        (ServerKeys::InvalidCommand, Err(CommandError::Unknown { .. }))
        | (ServerKeys::InvalidCommand, Err(CommandError::UnknownSubcommand { .. })) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{}: server {server:?}, ferry {ours:?}", show(cmd)))
    }
}

/// C `atoi`: optional spaces and sign, then leading digits; 0 if none.
fn atoi(raw: &[u8]) -> i64 {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_start();
    let (sign, rest) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.strip_prefix('+').unwrap_or(text)),
    };
    let digits: String = rest
        .chars()
        .take_while(char::is_ascii_digit)
        .take(18)
        .collect();
    sign * digits.parse::<i64>().unwrap_or(0)
}

fn show(cmd: &Command) -> String {
    cmd.args
        .iter()
        .map(|a| format!("{:?}", String::from_utf8_lossy(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts ferry agrees with GETKEYS on every command; returns the server's
/// answers for coverage checks.
async fn assert_all_match(client: &mut Client, cmds: &[Command]) -> Vec<ServerKeys> {
    let answers = server_keys(client, cmds).await;
    let mismatches: Vec<String> = cmds
        .iter()
        .zip(&answers)
        .filter_map(|(cmd, answer)| compare(cmd, answer).err())
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} invocations differ from COMMAND GETKEYS:\n{}",
        mismatches.len(),
        cmds.len(),
        mismatches.join("\n")
    );
    answers
}

/// Names of the table entries for which the server found at least one key.
fn entries_with_keys_found(cmds: &[Command], answers: &[ServerKeys]) -> Vec<String> {
    let mut names: Vec<String> = cmds
        .iter()
        .zip(answers)
        .filter(|(_, a)| matches!(a, ServerKeys::Keys(k) if !k.is_empty()))
        .filter_map(|(cmd, _)| lookup(cmd).map(|s| s.to_string()))
        .collect();
    names.sort();
    names.dedup();
    names
}

fn c(parts: &[&str]) -> Command {
    Command::from_parts(parts)
}

/// Every table entry (subcommands included, containers excluded), with the
/// argument prefix that names it.
fn all_entries() -> Vec<(Vec<String>, &'static CommandSpec)> {
    let mut out = Vec::new();
    for spec in commands() {
        if spec.is_container() {
            for sub in spec.subcommands {
                let name = vec![
                    spec.name.to_string(),
                    sub.subcommand.unwrap_or("").to_string(),
                ];
                out.push((name, sub));
            }
        } else {
            out.push((vec![spec.name.to_string()], spec));
        }
    }
    out
}

/// Generated invocations of one table entry: every argument count from the
/// minimum to a few more, with arguments that are (a) their own index, so a
/// key count names a position, (b) non-numeric, (c) with each key-count
/// position set to 0..=3, (d) with each keyword of a keyword key spec placed at
/// every position it could be searched at; plus one argument too few.
fn generated_invocations(prefix: &[String], spec: &CommandSpec) -> Vec<Command> {
    let min = spec.arity.unsigned_abs() as usize;
    let counts: Vec<usize> = if spec.arity >= 0 {
        vec![min]
    } else {
        (min..min + 6).collect()
    };
    let mut out = Vec::new();
    let build = |argc: usize, fill: &dyn Fn(usize) -> String| -> Command {
        let mut args: Vec<String> = prefix.to_vec();
        args.extend((prefix.len()..argc).map(fill));
        Command::from_parts(args)
    };
    for &argc in &counts {
        // GETKEYS needs the command name and at least one argument.
        if argc < prefix.len() || argc < 2 {
            continue;
        }
        out.push(build(argc, &|i| i.to_string()));
        out.push(build(argc, &|i| format!("k{i}")));
        for key_spec in spec.key_specs {
            if let (BeginSearch::Index { pos }, FindKeys::Keynum { keynumidx, .. }) =
                (key_spec.begin_search, key_spec.find_keys)
            {
                let at = (pos + keynumidx) as usize;
                for n in 0..=3 {
                    out.push(build(argc, &|i| {
                        if i == at {
                            n.to_string()
                        } else {
                            format!("k{i}")
                        }
                    }));
                }
            }
            if let BeginSearch::Keyword { keyword, .. } = key_spec.begin_search {
                for at in prefix.len()..argc {
                    out.push(build(argc, &|i| {
                        if i == at {
                            keyword.to_string()
                        } else {
                            format!("k{i}")
                        }
                    }));
                }
            }
        }
    }
    // One argument too few (GETKEYS itself needs at least one argument).
    if min > 2 {
        out.push(build(min - 1, &|i| format!("k{i}")));
    }
    out
}

#[tokio::test]
async fn keys_of_every_command_match_command_getkeys() {
    let server = common::RedisServer::start(&[]);
    let mut client = connect(&server).await;
    let mut cmds = Vec::new();
    let mut with_keys = 0;
    for (prefix, spec) in all_entries() {
        if spec.has_key_specs() {
            with_keys += 1;
        }
        if spec.arity == 1 {
            // GETKEYS cannot be asked about these; they take no keys.
            assert!(!spec.has_key_specs(), "{spec}");
            assert_eq!(key_indices(&Command::from_parts(&prefix)), Ok(vec![]));
        }
        cmds.extend(generated_invocations(&prefix, spec));
    }
    assert!(with_keys > 150, "only {with_keys} commands with keys");
    assert!(cmds.len() > 2000, "only {} invocations", cmds.len());
    let answers = assert_all_match(&mut client, &cmds).await;

    // Coverage: every command with keys was seen with keys, not only errors.
    let covered = entries_with_keys_found(&cmds, &answers);
    let missing: Vec<String> = all_entries()
        .into_iter()
        .filter(|(_, spec)| has_real_key_specs(spec))
        .map(|(_, spec)| spec.to_string())
        .filter(|name| !covered.contains(name))
        .collect();
    assert!(missing.is_empty(), "never saw keys for {missing:?}");
}

/// The tricky layouts, each in several forms.
fn tricky_invocations() -> Vec<Command> {
    let mut v = vec![
        // numkeys: ZUNIONSTORE / ZINTERSTORE / ZDIFFSTORE
        c(&["ZUNIONSTORE", "d", "1", "a"]),
        c(&["ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"]),
        c(&["zunionstore", "d", "3", "a", "b", "c", "AGGREGATE", "MAX"]),
        c(&["ZUNIONSTORE", "d", "0", "a"]),
        c(&["ZUNIONSTORE", "d", "5", "a", "b"]),
        c(&["ZUNIONSTORE", "d", "x", "a"]),
        c(&["ZUNIONSTORE", "d", "-1", "a"]),
        c(&["ZINTERSTORE", "d", "2", "a", "b"]),
        c(&[
            "ZINTERSTORE",
            "{t}d",
            "3",
            "{t}a",
            "{t}b",
            "{t}c",
            "WEIGHTS",
            "1",
            "2",
            "3",
        ]),
        c(&["ZDIFFSTORE", "d", "2", "a", "b"]),
        c(&["ZDIFFSTORE", "d", "1", "a"]),
        c(&["ZUNION", "2", "a", "b", "WITHSCORES"]),
        c(&["ZINTER", "1", "a"]),
        c(&["ZDIFF", "3", "a", "b", "c"]),
        c(&["ZINTERCARD", "2", "a", "b", "LIMIT", "1"]),
        // EVAL family and FCALL
        c(&["EVAL", "return 1", "0"]),
        c(&["EVAL", "return 1", "1", "a"]),
        c(&["EVAL", "return 1", "2", "a", "b", "argv1", "argv2"]),
        c(&["EVAL", "return 1", "3", "a"]),
        c(&["EVAL", "return 1", "abc", "a"]),
        c(&[
            "EVALSHA",
            "0123456789abcdef0123456789abcdef01234567",
            "2",
            "a",
            "b",
        ]),
        c(&["EVAL_RO", "return 1", "1", "a", "x"]),
        c(&["EVALSHA_RO", "sha", "0", "x"]),
        c(&["FCALL", "f", "2", "a", "b", "x"]),
        c(&["FCALL", "f", "0"]),
        c(&["FCALL_RO", "f", "1", "a"]),
        // LMPOP / ZMPOP / BLMPOP / BZMPOP / SINTERCARD
        c(&["LMPOP", "2", "a", "b", "LEFT"]),
        c(&["LMPOP", "1", "a", "RIGHT", "COUNT", "2"]),
        c(&["LMPOP", "0", "a", "LEFT"]),
        c(&["ZMPOP", "3", "a", "b", "c", "MIN"]),
        c(&["BLMPOP", "0.5", "2", "a", "b", "LEFT"]),
        c(&["BLMPOP", "0", "1", "a", "RIGHT", "COUNT", "3"]),
        c(&["BZMPOP", "1", "2", "a", "b", "MAX"]),
        c(&["BZMPOP", "1", "9", "a", "b", "MAX"]),
        c(&["SINTERCARD", "2", "a", "b"]),
        c(&["SINTERCARD", "3", "a", "b", "c", "LIMIT", "5"]),
        c(&["SINTERCARD", "0", "a"]),
        // XREAD / XREADGROUP: STREAMS keyword, half the rest are keys
        c(&["XREAD", "STREAMS", "a", "0"]),
        c(&["XREAD", "COUNT", "2", "STREAMS", "a", "b", "0", "0"]),
        c(&[
            "XREAD", "BLOCK", "0", "COUNT", "1", "STREAMS", "a", "b", "c", "1", "2", "3",
        ]),
        c(&["XREAD", "STREAMS", "a", "b", "0"]),
        c(&["XREAD", "COUNT", "1", "a", "0"]),
        c(&["XREAD", "STREAMS", "STREAMS", "0"]),
        c(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"]),
        c(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "c",
            "COUNT",
            "1",
            "NOACK",
            "STREAMS",
            "s1",
            "s2",
            ">",
            ">",
        ]),
        c(&["XREADGROUP", "GROUP", "STREAMS", "c", "STREAMS", "s", ">"]),
        // SORT / SORT_RO: STORE after skipping LIMIT/GET/BY arguments
        c(&["SORT", "k"]),
        c(&["SORT", "k", "STORE", "d"]),
        c(&[
            "SORT", "k", "BY", "w_*", "LIMIT", "0", "10", "GET", "#", "STORE", "d",
        ]),
        c(&["SORT", "k", "GET", "store", "STORE", "d1", "STORE", "d2"]),
        c(&["SORT", "k", "BY", "STORE"]),
        c(&["SORT", "k", "LIMIT", "STORE", "x", "ALPHA"]),
        c(&["SORT", "k", "LIMIT", "0", "STORE", "d"]),
        c(&["SORT", "k", "LIMIT", "0", "1", "STORE", "d"]),
        c(&["SORT", "k", "STORE"]),
        c(&["SORT_RO", "k", "BY", "w_*", "GET", "#"]),
        // GEORADIUS / GEORADIUSBYMEMBER STORE / STOREDIST, GEOSEARCHSTORE
        c(&["GEORADIUS", "k", "0", "0", "10", "km"]),
        c(&["GEORADIUS", "k", "0", "0", "10", "km", "STORE", "d"]),
        c(&[
            "GEORADIUS",
            "k",
            "0",
            "0",
            "10",
            "km",
            "WITHDIST",
            "STOREDIST",
            "d",
        ]),
        c(&[
            "GEORADIUS",
            "k",
            "0",
            "0",
            "10",
            "km",
            "STORE",
            "d",
            "STOREDIST",
            "e",
        ]),
        c(&["GEORADIUSBYMEMBER", "k", "m", "10", "km", "STORE", "d"]),
        c(&[
            "GEORADIUSBYMEMBER",
            "k",
            "m",
            "10",
            "km",
            "COUNT",
            "3",
            "STOREDIST",
            "d",
        ]),
        c(&["GEORADIUS_RO", "k", "0", "0", "10", "km"]),
        c(&[
            "GEOSEARCHSTORE",
            "d",
            "src",
            "FROMMEMBER",
            "m",
            "BYRADIUS",
            "1",
            "km",
        ]),
        // MIGRATE: key 3, or KEYS with an empty key argument
        c(&["MIGRATE", "h", "6379", "k", "0", "1000"]),
        c(&["MIGRATE", "h", "6379", "k", "0", "1000", "COPY", "REPLACE"]),
        c(&[
            "MIGRATE", "h", "6379", "", "0", "1000", "KEYS", "a", "b", "c",
        ]),
        c(&[
            "MIGRATE", "h", "6379", "", "0", "1000", "COPY", "AUTH", "keys", "KEYS", "a",
        ]),
        c(&[
            "MIGRATE", "h", "6379", "", "0", "1000", "AUTH2", "u", "keys", "KEYS", "a", "b",
        ]),
        c(&["MIGRATE", "h", "6379", "k", "0", "1000", "KEYS", "a"]),
        c(&["MIGRATE", "h", "6379", "", "0", "1000", "KEYS"]),
        // Two-key and step layouts
        c(&["LMOVE", "a", "b", "LEFT", "RIGHT"]),
        c(&["BLMOVE", "a", "b", "LEFT", "RIGHT", "0"]),
        c(&["RPOPLPUSH", "a", "b"]),
        c(&["BRPOPLPUSH", "a", "b", "0"]),
        c(&["COPY", "a", "b"]),
        c(&["COPY", "a", "b", "DB", "1", "REPLACE"]),
        c(&["RENAME", "a", "b"]),
        c(&["RENAMENX", "a", "b"]),
        c(&["SMOVE", "a", "b", "m"]),
        c(&["MSET", "a", "1"]),
        c(&["MSET", "a", "1", "b", "2", "c", "3"]),
        c(&["MSET", "a", "1", "b"]),
        c(&["MSETNX", "a", "1", "b", "2"]),
        c(&["BITOP", "AND", "d", "a", "b", "c"]),
        c(&["BITOP", "NOT", "d", "a"]),
        c(&["PFMERGE", "d"]),
        c(&["PFMERGE", "d", "a", "b"]),
        c(&["SETRANGE", "k", "0", "v"]),
        c(&["BLPOP", "a", "b", "0"]),
        c(&["BRPOP", "a", "0"]),
        c(&["BZPOPMIN", "a", "b", "0"]),
        c(&["DEL", "a", "b", "c"]),
        c(&["UNLINK", "a"]),
        c(&["SDIFFSTORE", "d", "a", "b"]),
        c(&["SINTERSTORE", "d", "a"]),
        c(&["SUNIONSTORE", "d", "a", "b"]),
        c(&["LCS", "a", "b", "LEN"]),
        c(&["SET", "k", "v", "GET"]),
        c(&["SET", "k", "v", "EX", "10"]),
        c(&["BITFIELD", "k", "GET", "u8", "0"]),
        c(&["BITFIELD_RO", "k", "GET", "u8", "0"]),
        c(&["RESTORE", "k", "0", "payload", "REPLACE"]),
        // Keyless, or one key, by design
        c(&["SWAPDB", "0", "1"]),
        c(&["MOVE", "k", "1"]),
        c(&["SELECT", "1"]),
        c(&["PUBLISH", "chan", "msg"]),
        c(&["SPUBLISH", "chan", "msg"]),
        c(&["MULTI", "x"]),
        c(&["FLUSHALL", "ASYNC"]),
        // Subcommands
        c(&["OBJECT", "ENCODING", "k"]),
        c(&["object", "freq", "k"]),
        c(&["OBJECT", "HELP"]),
        c(&["MEMORY", "USAGE", "k"]),
        c(&["MEMORY", "USAGE", "k", "SAMPLES", "5"]),
        c(&["MEMORY", "STATS"]),
        c(&["XGROUP", "CREATE", "s", "g", "$", "MKSTREAM"]),
        c(&["XGROUP", "DESTROY", "s", "g"]),
        c(&["XGROUP", "CREATECONSUMER", "s", "g", "c"]),
        c(&["XGROUP", "SETID", "s", "g", "0"]),
        c(&["XINFO", "STREAM", "s", "FULL"]),
        c(&["XINFO", "GROUPS", "s"]),
        c(&["FUNCTION", "LOAD", "code"]),
        c(&["FUNCTION", "DELETE", "lib"]),
        c(&["SCRIPT", "LOAD", "return 1"]),
        c(&["CONFIG", "SET", "maxmemory", "1"]),
        c(&["CONFIG", "GET", "maxmemory"]),
        c(&["CLIENT", "LIST"]),
        c(&["CLIENT", "KILL", "ID", "1"]),
        c(&["CLUSTER", "KEYSLOT", "k"]),
        c(&["CLUSTER", "COUNTKEYSINSLOT", "1"]),
        c(&["CLUSTER", "GETKEYSINSLOT", "1", "10"]),
        c(&["PUBSUB", "CHANNELS"]),
        // Errors: unknown command / subcommand, wrong arity
        c(&["NOSUCHCOMMAND", "k"]),
        c(&["CONFIG", "NOSUCH", "x"]),
        c(&["OBJECT", "ENCODING"]),
        c(&["OBJECT", "ENCODING", "a", "b"]),
        c(&["GET", "a", "b"]),
        c(&["SET", "k"]),
        c(&["XGROUP", "CREATE", "s"]),
    ];
    // Binary-safe arguments: keys with NUL, CR LF, braces, invalid UTF-8.
    v.push(Command::new(vec![
        Bytes::from_static(b"MSET"),
        Bytes::from_static(b"a\0b"),
        Bytes::from_static(b"1"),
        Bytes::from_static(b"\r\n{x}"),
        Bytes::from_static(b"2"),
        Bytes::from_static(b"\xff\xfe"),
        Bytes::from_static(b"3"),
    ]));
    v.push(Command::new(vec![
        Bytes::from_static(b"EVAL"),
        Bytes::from_static(b"return 1"),
        Bytes::from_static(b"2"),
        Bytes::from_static(b"\0"),
        Bytes::from_static(b""),
    ]));
    v
}

#[tokio::test]
async fn keys_of_tricky_invocations_match_command_getkeys() {
    let server = common::RedisServer::start(&[]);
    let mut client = connect(&server).await;
    let cmds = tricky_invocations();
    assert_all_match(&mut client, &cmds).await;

    // And the positions themselves for a few, so a shared mistake in both the
    // table and the comparison cannot pass unnoticed.
    assert_eq!(
        key_indices(&c(&[
            "ZUNIONSTORE",
            "d",
            "2",
            "a",
            "b",
            "WEIGHTS",
            "1",
            "2"
        ])),
        Ok(vec![1, 3, 4])
    );
    assert_eq!(
        key_indices(&c(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "c",
            "COUNT",
            "1",
            "STREAMS",
            "s1",
            "s2",
            ">",
            ">"
        ])),
        Ok(vec![7, 8])
    );
    assert_eq!(
        key_indices(&c(&["GEORADIUS", "k", "0", "0", "10", "km", "STORE", "d"])),
        Ok(vec![1, 7])
    );
    assert_eq!(
        key_indices(&c(&["MSET", "a", "1", "b", "2"])),
        Ok(vec![1, 3])
    );
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Words that steer key extraction: keywords of key specs and procedures,
/// counts, and junk.
const VOCABULARY: &[&str] = &[
    "STREAMS",
    "STORE",
    "STOREDIST",
    "KEYS",
    "LIMIT",
    "GET",
    "BY",
    "AUTH",
    "AUTH2",
    "COPY",
    "GROUP",
    "COUNT",
    "BLOCK",
    "0",
    "1",
    "2",
    "3",
    "4",
    "-1",
    "01",
    "x",
    "",
    "{t}",
    "k",
];

fn random_invocation(rng: &mut Rng, entries: &[(Vec<String>, &'static CommandSpec)]) -> Command {
    let (prefix, spec) = &entries[rng.below(entries.len())];
    let min = spec.arity.unsigned_abs() as usize;
    let argc = if spec.arity >= 0 && rng.below(4) != 0 {
        min
    } else {
        (min + rng.below(8)).saturating_sub(1).max(2)
    };
    let mut args: Vec<String> = prefix.clone();
    args.truncate(argc);
    while args.len() < argc {
        let word = VOCABULARY[rng.below(VOCABULARY.len())];
        args.push(if word == "k" {
            format!("k{}", args.len())
        } else {
            word.to_string()
        });
    }
    Command::from_parts(args)
}

#[tokio::test]
async fn keys_of_random_invocations_match_command_getkeys() {
    let server = common::RedisServer::start(&[]);
    let mut client = connect(&server).await;
    let entries: Vec<_> = all_entries()
        .into_iter()
        .filter(|(_, spec)| spec.has_key_specs())
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let cmds: Vec<Command> = (0..5000)
        .map(|_| random_invocation(&mut rng, &entries))
        .collect();
    let answers = assert_all_match(&mut client, &cmds).await;
    let with_keys = answers
        .iter()
        .filter(|a| matches!(a, ServerKeys::Keys(k) if !k.is_empty()))
        .count();
    let invalid = answers
        .iter()
        .filter(|a| **a == ServerKeys::InvalidArguments)
        .count();
    // Both outcomes are exercised in bulk.
    assert!(
        with_keys > 2000 && invalid > 200,
        "keys {with_keys}, invalid {invalid}"
    );
}

/// `COMMAND` reply entry -> (name, arity, flags, first, last, step, key specs
/// rendered as text, subcommands).
struct ServerCommand {
    name: String,
    arity: i64,
    flags: Vec<String>,
    legacy: (i64, i64, i64),
    key_specs: Vec<String>,
    subcommands: Vec<ServerCommand>,
}

fn text(frame: &Frame) -> String {
    String::from_utf8_lossy(
        frame
            .as_bytes()
            .unwrap_or_else(|| panic!("not a string: {frame:?}")),
    )
    .into_owned()
}

fn items(frame: &Frame) -> &[Frame] {
    match frame {
        Frame::Array(items) => items,
        other => panic!("not an array: {other:?}"),
    }
}

/// RESP2 renders maps as flat key/value arrays.
fn field<'a>(map: &'a Frame, key: &str) -> &'a Frame {
    let flat = items(map);
    flat.chunks(2)
        .find(|kv| text(&kv[0]) == key)
        .map(|kv| &kv[1])
        .unwrap_or_else(|| panic!("no {key} in {map:?}"))
}

fn int(frame: &Frame) -> i64 {
    frame
        .as_integer()
        .unwrap_or_else(|| panic!("not an integer: {frame:?}"))
}

fn server_key_spec(frame: &Frame) -> String {
    let mut flags: Vec<String> = items(field(frame, "flags")).iter().map(text).collect();
    flags.sort();
    let bs = field(frame, "begin_search");
    let begin = match text(field(bs, "type")).as_str() {
        "index" => format!("index({})", int(field(field(bs, "spec"), "index"))),
        "keyword" => {
            let spec = field(bs, "spec");
            format!(
                "keyword({},{})",
                text(field(spec, "keyword")),
                int(field(spec, "startfrom"))
            )
        }
        other => other.to_string(),
    };
    let fk = field(frame, "find_keys");
    let find = match text(field(fk, "type")).as_str() {
        "range" => {
            let spec = field(fk, "spec");
            format!(
                "range({},{},{})",
                int(field(spec, "lastkey")),
                int(field(spec, "keystep")),
                int(field(spec, "limit"))
            )
        }
        "keynum" => {
            let spec = field(fk, "spec");
            format!(
                "keynum({},{},{})",
                int(field(spec, "keynumidx")),
                int(field(spec, "firstkey")),
                int(field(spec, "keystep"))
            )
        }
        other => other.to_string(),
    };
    format!("{begin} {find} {flags:?}")
}

fn table_key_spec(spec: &ferry::redis::command::KeySpec) -> String {
    let mut flags: Vec<String> = spec.flags.names().map(str::to_string).collect();
    flags.sort();
    let begin = match spec.begin_search {
        BeginSearch::Index { pos } => format!("index({pos})"),
        BeginSearch::Keyword { keyword, startfrom } => format!("keyword({keyword},{startfrom})"),
        BeginSearch::Unknown => "unknown".to_string(),
    };
    let find = match spec.find_keys {
        FindKeys::Range {
            lastkey,
            keystep,
            limit,
        } => format!("range({lastkey},{keystep},{limit})"),
        FindKeys::Keynum {
            keynumidx,
            firstkey,
            keystep,
        } => format!("keynum({keynumidx},{firstkey},{keystep})"),
        FindKeys::Unknown => "unknown".to_string(),
    };
    format!("{begin} {find} {flags:?}")
}

fn parse_server_command(frame: &Frame) -> ServerCommand {
    let e = items(frame);
    let mut flags: Vec<String> = items(&e[2]).iter().map(text).collect();
    flags.sort();
    ServerCommand {
        name: text(&e[0]).to_ascii_uppercase(),
        arity: int(&e[1]),
        flags,
        legacy: (int(&e[3]), int(&e[4]), int(&e[5])),
        key_specs: items(&e[8]).iter().map(server_key_spec).collect(),
        subcommands: items(&e[9]).iter().map(parse_server_command).collect(),
    }
}

fn compare_info(server: &ServerCommand, table: &CommandSpec, problems: &mut Vec<String>) {
    let mut flags: Vec<String> = table.flags.names().map(str::to_string).collect();
    flags.sort();
    let table_specs: Vec<String> = table.key_specs.iter().map(table_key_spec).collect();
    let name = table.to_string();
    if server.name != name {
        problems.push(format!("name: server {} table {name}", server.name));
    }
    if server.arity != i64::from(table.arity) {
        problems.push(format!(
            "{name} arity: server {} table {}",
            server.arity, table.arity
        ));
    }
    if server.flags != flags {
        problems.push(format!(
            "{name} flags: server {:?} table {flags:?}",
            server.flags
        ));
    }
    let legacy = (
        i64::from(table.first_key),
        i64::from(table.last_key),
        i64::from(table.key_step),
    );
    if server.legacy != legacy {
        problems.push(format!(
            "{name} first/last/step: server {:?} table {legacy:?}",
            server.legacy
        ));
    }
    if server.key_specs != table_specs {
        problems.push(format!(
            "{name} key specs: server {:?} table {table_specs:?}",
            server.key_specs
        ));
    }
    if server.subcommands.len() != table.subcommands.len() {
        problems.push(format!(
            "{name}: server has {} subcommands, table {}",
            server.subcommands.len(),
            table.subcommands.len()
        ));
    }
    for sub in &server.subcommands {
        let sub_name = sub.name.split_once('|').map(|(_, s)| s).unwrap_or("");
        match lookup(&c(&[table.name, sub_name])) {
            Some(found) if found.subcommand.is_some() => compare_info(sub, found, problems),
            _ => problems.push(format!("{}: missing from the table", sub.name)),
        }
    }
}

#[tokio::test]
async fn table_matches_command_info_of_the_live_server() {
    let server = common::RedisServer::start(&[]);
    let mut client = connect(&server).await;
    let info = client.info("server").await.expect("INFO");
    assert_eq!(
        info.get("redis_version").map(String::as_str),
        Some(table_redis_version()),
        "table generated from another Redis version: run tools/gen-command-table --start"
    );
    let reply = client.call(["COMMAND"]).await.expect("COMMAND");
    let server_commands: Vec<ServerCommand> =
        items(&reply).iter().map(parse_server_command).collect();
    assert_eq!(server_commands.len(), commands().len(), "command count");
    let mut problems = Vec::new();
    for sc in &server_commands {
        match lookup_name(sc.name.as_bytes()) {
            Some(spec) => compare_info(sc, spec, &mut problems),
            None => problems.push(format!("{}: missing from the table", sc.name)),
        }
    }
    assert!(
        problems.is_empty(),
        "table drifted from COMMAND:\n{}",
        problems.join("\n")
    );

    // And COMMAND INFO by name for every entry of the table, subcommands
    // addressed as `container|sub`, each checked on its own.
    let mut names: Vec<String> = vec!["COMMAND".into(), "INFO".into()];
    names.extend(all_entries().iter().map(|(_, spec)| spec.to_string()));
    let reply = client.call(&names).await.expect("COMMAND INFO");
    let entries = items(&reply);
    assert_eq!(entries.len(), names.len() - 2);
    for (name, entry) in names[2..].iter().zip(entries) {
        if *entry == Frame::Null {
            problems.push(format!("{name}: unknown to COMMAND INFO"));
            continue;
        }
        let sc = parse_server_command(entry);
        let args: Vec<&str> = sc.name.split('|').collect();
        match lookup(&Command::from_parts(&args)) {
            Some(spec) if spec.to_string() == *name => compare_info(&sc, spec, &mut problems),
            other => problems.push(format!(
                "{name}: COMMAND INFO says {}, table {other:?}",
                sc.name
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "table drifted from COMMAND INFO:\n{}",
        problems.join("\n")
    );
}

#[tokio::test]
async fn hash_slots_match_cluster_keyslot() {
    // CLUSTER KEYSLOT needs cluster mode; a lone node with no slots will do.
    let server = common::RedisServer::start(&["--cluster-enabled", "yes"]);
    let mut client = connect(&server).await;
    let mut keys: Vec<Vec<u8>> = [
        "",
        "a",
        "foo",
        "bar",
        "hello",
        "123456789",
        "{}",
        "{}a",
        "a{}",
        "{a}{b}",
        "{b}{a}",
        "a{",
        "}{a}",
        "}a{",
        "{",
        "}",
        "{{a}}",
        "{{}}",
        "a{b}c{d}",
        "{user1}.following",
        "{user1}.followers",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "foo{bar}{zap}",
        "{a",
    ]
    .iter()
    .map(|k| k.as_bytes().to_vec())
    .collect();
    keys.push(b"\0".to_vec());
    keys.push(b"\xff\x00{\x01}\x02".to_vec());
    keys.push(b"\r\n{\r\n}".to_vec());
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for _ in 0..3000 {
        let len = rng.below(24);
        let key: Vec<u8> = (0..len)
            .map(|_| match rng.below(6) {
                // Braces often, so tags of every shape appear.
                0 => b'{',
                1 => b'}',
                _ => rng.next() as u8,
            })
            .collect();
        keys.push(key);
    }
    let requests: Vec<Command> = keys
        .iter()
        .map(|k| {
            Command::new(vec![
                Bytes::from_static(b"CLUSTER"),
                Bytes::from_static(b"KEYSLOT"),
                Bytes::copy_from_slice(k),
            ])
        })
        .collect();
    let replies = client.pipeline(&requests).await.expect("CLUSTER KEYSLOT");
    for (key, reply) in keys.iter().zip(&replies) {
        let expected = reply
            .as_integer()
            .unwrap_or_else(|| panic!("CLUSTER KEYSLOT {key:?}: {reply:?}"));
        assert_eq!(i64::from(key_hash_slot(key)), expected, "key {key:?}");
    }

    // command_slot agrees with the slots of the keys the server reports.
    let cmd = c(&["MSET", "{t}a", "1", "{t}b", "2"]);
    assert_eq!(command_slot(&cmd), Ok(Some(key_hash_slot(b"t"))));
    assert!(matches!(
        command_slot(&c(&["RENAME", "a", "b"])),
        Err(CommandError::CrossSlot {
            first_index: 1,
            other_index: 2,
            ..
        })
    ));
    assert_eq!(command_slot(&c(&["SWAPDB", "0", "1"])), Ok(None));
    assert_eq!(command_slot(&c(&["EVAL", "s", "0"])), Ok(None));
}

#[test]
fn seed_sync_commands_are_known_writes_or_replicated_control() {
    // Commands that are not flagged `write` but still reach the replication
    // stream: scripts (their effects), transactions, db selection, PUBLISH.
    const REPLICATED_NON_WRITES: &[&str] =
        &["EVAL", "EVALSHA", "EXEC", "MULTI", "SELECT", "PUBLISH"];
    assert_eq!(SEED_SYNC_COMMANDS.len(), 72);
    for name in SEED_SYNC_COMMANDS {
        let spec = lookup_name(name.as_bytes()).unwrap_or_else(|| panic!("{name} not in table"));
        assert_eq!(
            spec.is_write(),
            !REPLICATED_NON_WRITES.contains(name),
            "{name}: write flag"
        );
        let minimal = Command::from_parts(
            std::iter::once(name.to_string())
                .chain((1..spec.arity.unsigned_abs() as usize).map(|i| format!("{i}"))),
        );
        assert_eq!(is_write(&minimal), spec.is_write(), "{name}");
        assert!(resolve(&minimal).is_ok(), "{name}: minimal arity rejected");
    }
}

#[test]
fn write_flag_of_subcommands() {
    assert!(is_write(&c(&["FUNCTION", "LOAD", "code"])));
    assert!(is_write(&c(&["XGROUP", "CREATE", "s", "g", "$"])));
    assert!(!is_write(&c(&["CONFIG", "SET", "maxmemory", "1"])));
    assert!(!is_write(&c(&["SCRIPT", "LOAD", "return 1"])));
    assert!(!is_write(&c(&["OBJECT", "ENCODING", "k"])));
    assert!(!is_write(&c(&["NOSUCH"])));
    assert!(is_write(&c(&["set", "k", "v"])));
    assert!(!is_write(&c(&["XGROUP"])));
}

fn arg_strategy() -> impl Strategy<Value = Vec<u8>> {
    let names: Vec<Vec<u8>> = commands()
        .iter()
        .flat_map(|s| {
            std::iter::once(s.name).chain(s.subcommands.iter().filter_map(|x| x.subcommand))
        })
        .chain(VOCABULARY.iter().copied())
        .chain([
            "99999999999999999999",
            "-9223372036854775808",
            "9223372036854775807",
        ])
        .map(|s| s.as_bytes().to_vec())
        .collect();
    prop_oneof![
        proptest::sample::select(names),
        proptest::collection::vec(any::<u8>(), 0..6),
        (0u32..300).prop_map(|n| n.to_string().into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Random argument vectors never panic, and any keys found are in range.
    #[test]
    fn random_arguments_never_panic(args in proptest::collection::vec(arg_strategy(), 0..14)) {
        let cmd = Command::from_parts(&args);
        let _ = lookup(&cmd);
        let _ = is_write(&cmd);
        let resolved = resolve(&cmd);
        match key_indices(&cmd) {
            Ok(indices) => {
                prop_assert!(resolved.is_ok());
                prop_assert!(indices.iter().all(|&i| i >= 1 && i < args.len()));
                prop_assert_eq!(keys(&cmd).map(|k| k.len()), Ok(indices.len()));
                match command_slot(&cmd) {
                    Ok(_) | Err(CommandError::CrossSlot { .. }) => {}
                    Err(other) => prop_assert!(false, "slot error {other:?} with keys {indices:?}"),
                }
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                prop_assert!(keys(&cmd).is_err());
            }
        }
    }
}
