//! Test support: a continuous mixed write load on the source, covering every
//! command of the seeds' lists ([`ferry::redis::command::SEED_SYNC_COMMANDS`])
//! again and again, with effects that can be checked exactly at the end.
//!
//! In: the source's address. Out: a [`LoadReport`] of what the source
//! answered. The load runs on its own thread with its own blocking
//! connection ([`super::resp`]), so a test's runtime can be busy waiting.
//!
//! Every iteration sends, pipelined on one connection:
//! - the base: `INCR counter`, `LPUSH list <i>`, `XADD stream * i <i>`,
//!   `HINCRBY hash f<i % 10> 1`, a `SET` or `DEL` of `key:<i % 7>`, every
//!   10th a `SET ttl:<n> .. EX 3600`, every 4th `MULTI; INCR a; INCR b;
//!   EXEC`;
//! - one step of a rotation ([`STEPS`] of them) through strings, bits /
//!   HyperLogLog / geo, expiry, lists (blocking pops included, on lists
//!   known not to be empty), hashes, sets, sorted sets, key commands
//!   (`RENAME`, `UNLINK`, `RESTORE`, `PUBLISH`), db-moving commands (`MOVE`,
//!   `SWAPDB`), `EVAL`/`EVALSHA`/`FCALL`, a `MULTI`/`EXEC` across types and
//!   dbs, streams with a consumer group, and writes in another db.
//!
//! Counters that only ever grow (`counter`, `a`/`b`, `m:evc` by `EVAL`,
//! `m:fc` by `FCALL`) and the length of `list` are taken from the source's
//! replies (absolute values), so a second load on the same data set (a
//! promoted replica) continues them; [`assert_counters`] checks them on both
//! sides: an entry applied twice shows as a target ahead of the source.
//! Keys stay bounded (`LTRIM`, `MAXLEN`, modular names) except `list` and
//! `stream`, which grow by one per iteration. All TTLs are an hour or more:
//! nothing expires during a test, so the key-by-key comparison is exact.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::resp::{connect, get_int, Conn, Resp};

/// Steps of the rotation: iteration `i` runs step `i % STEPS`.
pub const STEPS: u64 = 13;

/// The library `FCALL` calls (loaded with `REPLACE` when a load starts).
pub const LOAD_LIBRARY: &str = "#!lua name=loadlib\n\
    redis.register_function('load_incr', function(keys, args) \
    redis.call('SET', keys[2], args[1]) return redis.call('INCR', keys[1]) end)";

/// The script `EVAL` runs: one counter, one capped list.
const EVAL_SCRIPT: &str = "redis.call('LPUSH', KEYS[2], ARGV[1]) \
    redis.call('LTRIM', KEYS[2], 0, 49) return redis.call('INCR', KEYS[1])";

/// The script `EVALSHA` runs (loaded when a load starts).
const EVALSHA_SCRIPT: &str = "return redis.call('SET', KEYS[1], ARGV[1])";

/// What the load did; counters are the source's own values at the last
/// reply (absolute).
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Iterations of this load.
    pub iterations: u64,
    /// `MULTI; INCR a; INCR b; EXEC` of this load.
    pub transactions: u64,
    /// `INCR counter`.
    pub counter: i64,
    /// `LLEN list` after the last `LPUSH`.
    pub list_len: i64,
    /// `INCR a` in the last transaction (0 if none yet).
    pub a: i64,
    /// `INCR m:evc` by the last `EVAL` (0 if none yet).
    pub script_counter: i64,
    /// `INCR m:fc` by the last `FCALL` (0 if none yet).
    pub function_counter: i64,
    /// Names of every command sent (uppercase; `SELECT` included).
    pub issued: BTreeSet<String>,
}

impl LoadReport {
    /// Seed commands this load never sent (empty after [`STEPS`]
    /// iterations).
    pub fn missing_seed_commands(&self) -> Vec<&'static str> {
        ferry::redis::command::SEED_SYNC_COMMANDS
            .iter()
            .filter(|name| !self.issued.contains(**name))
            .copied()
            .collect()
    }
}

/// The load thread.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<LoadReport>,
}

impl Load {
    /// Starts the load against `source` (`host:port`), 1 ms between
    /// iterations.
    pub fn start(source: &str) -> Load {
        Load::with_pause(source, Duration::from_millis(1))
    }

    /// Starts the load with `pause` between iterations.
    pub fn with_pause(source: &str, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut conn = connect(source);
        let setup = Setup::run(&mut conn);
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut writer = Writer {
                    conn,
                    setup,
                    report: LoadReport::default(),
                    last_xadd: None,
                    queued: 0,
                };
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    writer.iteration(i);
                    i += 1;
                    std::thread::sleep(pause);
                }
                // One more, sent after the stop: its replies come after
                // anything the test wrote before stopping the load (a
                // burst), so the counters are final.
                writer.iteration(i);
                writer.report
            }
        });
        Load { stop, thread }
    }

    /// Stops the load (after one last iteration) and returns its report.
    pub fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(report) => report,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// What the steps need from the source, taken once per load.
struct Setup {
    evalsha: String,
    /// `DUMP` of a small hash, restored again and again.
    dump: Vec<u8>,
}

impl Setup {
    fn run(conn: &mut Conn) -> Setup {
        let must = |reply: Resp, what: &str| -> Resp {
            assert!(
                !matches!(reply, Resp::Error(_)),
                "load setup {what}: {reply:?}"
            );
            reply
        };
        must(
            conn.call(&["FUNCTION", "LOAD", "REPLACE", LOAD_LIBRARY])
                .expect("FUNCTION LOAD"),
            "FUNCTION LOAD",
        );
        let evalsha = must(
            conn.call(&["SCRIPT", "LOAD", EVALSHA_SCRIPT])
                .expect("SCRIPT LOAD"),
            "SCRIPT LOAD",
        )
        .text()
        .expect("a SHA1");
        // The group exists once per data set (a second load on a promoted
        // replica finds it).
        let groups = conn.call(&["EXISTS", "m:x"]).expect("EXISTS").int();
        if groups == 0 {
            must(
                conn.call(&["XGROUP", "CREATE", "m:x", "g", "$", "MKSTREAM"])
                    .expect("XGROUP CREATE"),
                "XGROUP CREATE",
            );
        }
        must(
            conn.call(&["HSET", "m:dumped", "f", "v", "g", "w"])
                .expect("HSET"),
            "HSET",
        );
        let dump = match conn.call(&["DUMP", "m:dumped"]).expect("DUMP") {
            Resp::Bulk(Some(bytes)) => bytes,
            other => panic!("DUMP m:dumped: {other:?}"),
        };
        Setup { evalsha, dump }
    }
}

struct Writer {
    conn: Conn,
    setup: Setup,
    report: LoadReport,
    /// The id of the last `XADD m:x`, acknowledged by the next stream step.
    last_xadd: Option<String>,
    /// Commands queued in this iteration.
    queued: usize,
}

/// Where the counters' replies are in one iteration's pipeline.
#[derive(Default)]
struct Slots {
    counter: usize,
    list: usize,
    exec: Option<usize>,
    eval: Option<usize>,
    fcall: Option<usize>,
    xadd: Option<usize>,
}

impl Writer {
    /// Queues one command; returns the index of its reply.
    fn q<A: AsRef<[u8]>>(&mut self, args: &[A]) -> usize {
        self.report
            .issued
            .insert(String::from_utf8_lossy(args[0].as_ref()).to_ascii_uppercase());
        self.conn.queue(args);
        self.queued += 1;
        self.queued - 1
    }

    fn iteration(&mut self, i: u64) {
        self.queued = 0;
        let n = i.to_string();
        let mut slots = Slots {
            counter: self.q(&["INCR", "counter"]),
            list: self.q(&["LPUSH", "list", &n]),
            ..Slots::default()
        };
        self.q(&["XADD", "stream", "*", "i", &n]);
        self.q(&["HINCRBY", "hash", &format!("f{}", i % 10), "1"]);
        if i % 3 == 0 {
            self.q(&["DEL", &format!("key:{}", (i / 3) % 7)]);
        } else {
            self.q(&["SET", &format!("key:{}", i % 7), &n]);
        }
        if i % 10 == 0 {
            self.q(&["SET", &format!("ttl:{}", i % 5), &n, "EX", "3600"]);
        }
        if i % 4 == 0 {
            self.q(&["MULTI"]);
            self.q(&["INCR", "a"]);
            self.q(&["INCR", "b"]);
            slots.exec = Some(self.q(&["EXEC"]));
        }
        self.step(i, &n, &mut slots);
        let replies = self.conn.replies().expect("the source answers the load");
        for reply in &replies {
            let inner = match reply {
                Resp::Array(Some(items)) => items.iter().find(|r| matches!(r, Resp::Error(_))),
                other => Some(other),
            };
            if let Some(Resp::Error(error)) = inner {
                panic!("load iteration {i}: the source refused a command: {error}");
            }
        }
        self.report.counter = replies[slots.counter].int();
        self.report.list_len = replies[slots.list].int();
        if let Some(exec) = slots.exec {
            let items = replies[exec].items();
            assert_eq!(items[0], items[1], "a and b diverged on the source");
            self.report.a = items[0].int();
            self.report.transactions += 1;
        }
        if let Some(eval) = slots.eval {
            self.report.script_counter = replies[eval].int();
        }
        if let Some(fcall) = slots.fcall {
            self.report.function_counter = replies[fcall].int();
        }
        if let Some(xadd) = slots.xadd {
            self.last_xadd = replies[xadd].text();
        }
        self.report.iterations = i + 1;
    }

    /// Step `i % STEPS` of the rotation. Leaves the connection in db 0.
    fn step(&mut self, i: u64, n: &str, slots: &mut Slots) {
        let j = i / STEPS;
        match i % STEPS {
            0 => {
                self.q(&["SET", "m:s", n]);
                self.q(&["APPEND", "m:s", "-tail"]);
                self.q(&["SETRANGE", "m:s", "0", "ab"]);
                self.q(&["GETSET", "m:gs", n]);
                self.q(&["SETNX", &format!("m:nx{}", j % 5), n]);
                self.q(&["SETEX", "m:ex", "3600", n]);
                self.q(&["PSETEX", "m:px", "3600000", n]);
                self.q(&["MSET", "m:m1", n, "m:m2", n]);
                self.q(&["MSETNX", &format!("m:mx{}a", j % 5), "1", "m:mxb", "2"]);
                self.q(&["INCRBY", "m:n", "5"]);
                self.q(&["DECR", "m:n"]);
                self.q(&["DECRBY", "m:n", "2"]);
                self.q(&["INCRBYFLOAT", "m:f", "0.5"]);
            }
            1 => {
                self.q(&["SETBIT", "m:bits:a", &(i % 64).to_string(), "1"]);
                self.q(&["SETBIT", "m:bits:b", &(j % 32).to_string(), "1"]);
                self.q(&["BITOP", "XOR", "m:bits:x", "m:bits:a", "m:bits:b"]);
                self.q(&["PFADD", "m:hll:a", &format!("e{}", i % 100)]);
                self.q(&["PFADD", "m:hll:b", "x", "y"]);
                self.q(&["PFMERGE", "m:hll:ab", "m:hll:a", "m:hll:b"]);
                let lon = format!("13.{}", 100 + j % 800);
                self.q(&["GEOADD", "m:geo", &lon, "38.1", &format!("p{}", j % 20)]);
            }
            2 => {
                for e in 0..4 {
                    self.q(&["SET", &format!("m:e{e}"), n]);
                }
                self.q(&["EXPIRE", "m:e0", "3600"]);
                self.q(&["PEXPIRE", "m:e1", "3600000"]);
                self.q(&["EXPIREAT", "m:e2", "4102444800"]);
                self.q(&["PEXPIREAT", "m:e3", "4102444800000"]);
                self.q(&["PERSIST", &format!("m:e{}", j % 4)]);
            }
            3 => {
                // Nine pushed, at most seven popped: the blocking pops never
                // find the list empty (they would block the pipeline).
                self.q(&["RPUSH", "m:l", "a", "b", "c", "d", "e"]);
                self.q(&["LPUSH", "m:l", n]);
                self.q(&["LPUSHX", "m:l", "y"]);
                self.q(&["RPUSHX", "m:l", "g"]);
                self.q(&["LINSERT", "m:l", "BEFORE", "c", "bb"]);
                self.q(&["LSET", "m:l", "0", "first"]);
                self.q(&["LREM", "m:l", "1", "d"]);
                self.q(&["LPOP", "m:l"]);
                self.q(&["RPOP", "m:l"]);
                self.q(&["RPOPLPUSH", "m:l", "m:l2"]);
                self.q(&["BLPOP", "m:l", "1"]);
                self.q(&["BRPOP", "m:l", "1"]);
                self.q(&["BRPOPLPUSH", "m:l", "m:l2", "1"]);
                self.q(&["LTRIM", "m:l", "0", "30"]);
                self.q(&["LTRIM", "m:l2", "0", "30"]);
            }
            4 => {
                self.q(&["HSET", "m:h", "a", n, "b", "2", "c", "3"]);
                self.q(&["HMSET", "m:h", "d", n]);
                self.q(&["HSETNX", "m:h", &format!("nx{}", j % 10), n]);
                self.q(&["HINCRBY", "m:h", "n", "1"]);
                self.q(&["HINCRBYFLOAT", "m:h", "b", "0.5"]);
                self.q(&["HDEL", "m:h", "c"]);
            }
            5 => {
                let member = format!("x{}", j % 10);
                self.q(&["SADD", "m:s1", "1", "2", "3", &member]);
                self.q(&["SADD", "m:s2", "3", "4", "y", n]);
                self.q(&["SREM", "m:s1", &format!("x{}", (j + 5) % 10)]);
                self.q(&["SMOVE", "m:s1", "m:s2", "1"]);
                self.q(&["SPOP", "m:s2"]);
                self.q(&["SPOP", "m:s2", "1"]);
                self.q(&["SINTERSTORE", "m:si", "m:s1", "m:s2"]);
                self.q(&["SUNIONSTORE", "m:su", "m:s1", "m:s2"]);
                self.q(&["SDIFFSTORE", "m:sd", "m:s1", "m:s2"]);
            }
            6 => {
                let score = (j % 7).to_string();
                self.q(&["ZADD", "m:z", "1", "a", "2", "b", "3", "c", &score, "d"]);
                self.q(&["ZINCRBY", "m:z", "1.5", "a"]);
                self.q(&["ZREM", "m:z", "c"]);
                self.q(&["ZADD", "m:z2", "1", "a", "5", "x"]);
                self.q(&[
                    "ZUNIONSTORE",
                    "m:zu",
                    "2",
                    "m:z",
                    "m:z2",
                    "WEIGHTS",
                    "1",
                    "2",
                ]);
                self.q(&[
                    "ZINTERSTORE",
                    "m:zi",
                    "2",
                    "m:z",
                    "m:z2",
                    "AGGREGATE",
                    "MAX",
                ]);
                self.q(&["ZADD", "m:zl", "0", "a", "0", "b", "0", "c", "0", "d"]);
                self.q(&["ZREMRANGEBYLEX", "m:zl", "[b", "[c"]);
                self.q(&["ZREMRANGEBYRANK", "m:z", "0", "0"]);
                self.q(&["ZREMRANGEBYSCORE", "m:z", "100", "200"]);
            }
            7 => {
                self.q(&["SET", "m:r", n]);
                self.q(&["RENAME", "m:r", "m:r2"]);
                self.q(&["RENAMENX", "m:r2", &format!("m:r3:{}", j % 3)]);
                self.q(&["DEL", "m:r2"]);
                self.q(&["SET", "m:u", n]);
                self.q(&["UNLINK", "m:u"]);
                let dump = self.setup.dump.clone();
                self.q(&[&b"RESTORE"[..], b"m:rs", b"0", &dump, b"REPLACE"]);
                self.q(&[&b"RESTORE"[..], b"m:rst", b"3600000", &dump, b"REPLACE"]);
                self.q(&["PUBLISH", "m:ch", n]);
            }
            8 => {
                // MOVE succeeds every time: the key is gone from db 5 first.
                self.q(&["SELECT", "5"]);
                self.q(&["DEL", "m:mv"]);
                self.q(&["SELECT", "0"]);
                self.q(&["SET", "m:mv", n]);
                self.q(&["MOVE", "m:mv", "5"]);
                self.q(&["SELECT", "6"]);
                self.q(&["INCR", "m:sw"]);
                self.q(&["SELECT", "0"]);
                self.q(&["SWAPDB", "6", "7"]);
            }
            9 => {
                let eval = self.q(&["EVAL", EVAL_SCRIPT, "2", "m:evc", "m:evl", n]);
                slots.eval = Some(eval);
                let sha = self.setup.evalsha.clone();
                self.q(&["EVALSHA", &sha, "1", "m:evsha", n]);
                slots.fcall = Some(self.q(&["FCALL", "load_incr", "2", "m:fc", "m:fcs", n]));
            }
            10 => {
                self.q(&["MULTI"]);
                self.q(&["INCR", "m:tx"]);
                self.q(&["LPUSH", "m:txl", n]);
                self.q(&["LTRIM", "m:txl", "0", "49"]);
                self.q(&["HINCRBY", "m:txh", &format!("f{}", j % 5), "1"]);
                self.q(&["SADD", "m:txs", &(j % 20).to_string()]);
                self.q(&["ZINCRBY", "m:txz", "1", &format!("m{}", j % 5)]);
                self.q(&["XADD", "m:txx", "MAXLEN", "50", "*", "i", n]);
                self.q(&["SELECT", "3"]);
                self.q(&["INCR", "m:tx3"]);
                self.q(&["EXEC"]);
                self.q(&["SELECT", "0"]);
            }
            11 => {
                slots.xadd = Some(self.q(&["XADD", "m:x", "MAXLEN", "200", "*", "f", n]));
                let consumer = format!("c{}", j % 3);
                self.q(&[
                    "XREADGROUP",
                    "GROUP",
                    "g",
                    &consumer,
                    "COUNT",
                    "1",
                    "STREAMS",
                    "m:x",
                    ">",
                ]);
                if let Some(id) = self.last_xadd.clone() {
                    self.q(&["XACK", "m:x", "g", &id]);
                }
            }
            _ => {
                self.q(&["SELECT", "2"]);
                self.q(&["SET", "m:d2", n]);
                self.q(&["HINCRBY", "m:d2h", &format!("f{}", j % 5), "1"]);
                self.q(&["SELECT", "0"]);
            }
        }
    }
}

/// The load's counters, equal on the source and the target (call once the
/// load stopped and the target caught up): `counter`, `LLEN list`, `a` and
/// `b`, `m:evc`, `m:fc`. Panics naming which one was lost or applied twice.
pub fn assert_counters(what: &str, report: &LoadReport, source: &str, target: &str) {
    let (mut s, mut t) = (connect(source), connect(target));
    let llen = |conn: &mut Conn| conn.call(&["LLEN", "list"]).expect("LLEN").int();
    let checks = [
        (
            "INCR counter",
            report.counter,
            get_int(&mut s, "counter"),
            get_int(&mut t, "counter"),
        ),
        ("LPUSH list", report.list_len, llen(&mut s), llen(&mut t)),
        (
            "MULTI/EXEC INCR a",
            report.a,
            get_int(&mut s, "a"),
            get_int(&mut t, "a"),
        ),
        (
            "MULTI/EXEC INCR b",
            report.a,
            get_int(&mut s, "b"),
            get_int(&mut t, "b"),
        ),
        (
            "EVAL INCR m:evc",
            report.script_counter,
            get_int(&mut s, "m:evc"),
            get_int(&mut t, "m:evc"),
        ),
        (
            "FCALL INCR m:fc",
            report.function_counter,
            get_int(&mut s, "m:fc"),
            get_int(&mut t, "m:fc"),
        ),
    ];
    for (name, reported, on_source, on_target) in checks {
        assert_eq!(
            on_source, reported,
            "{what}: {name} on the source vs the load's last reply"
        );
        assert_eq!(
            on_target,
            on_source,
            "{what}: {name} is {on_target} on the target, {on_source} on the source ({})",
            if on_target > on_source {
                "applied twice"
            } else {
                "lost"
            }
        );
    }
    let missing = report.missing_seed_commands();
    assert!(
        report.iterations < STEPS || missing.is_empty(),
        "{what}: the load never sent {missing:?}"
    );
}
