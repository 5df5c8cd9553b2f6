//! The owned keyspace's scripts (`src/apply/keyspace.rs`) against a real
//! redis-server: what the applier sends for a replicated `FLUSHALL`,
//! `SWAPDB` and the start of a snapshot load under a key filter
//! (`[filter] key-prefix` / `exclude-key-prefix`) and a `db-map`, run inside
//! `MULTI`/`EXEC` as a batch runs them. Each must change exactly the owned
//! keys: never a key outside the filter (whatever glob characters the
//! prefixes hold), never ferry's own keys, never a db not owned.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use ferry::apply::keyspace::KeyClass;
use ferry::apply::{FilterConfig, OwnedKeyspace};
use ferry::redis::command::Command;

use common::resp::{connect, Conn, Resp};
use common::{redis_cli_bin, RedisServer};

fn keyspace(dbs: Option<Vec<u32>>, include: &[&str], exclude: &[&str]) -> OwnedKeyspace {
    let list = |l: &[&str]| (!l.is_empty()).then(|| l.iter().map(|p| p.to_string()).collect());
    FilterConfig {
        dbs,
        key_prefix: list(include),
        exclude_key_prefix: list(exclude),
        ..FilterConfig::default()
    }
    .keyspace()
    .expect("a valid filter")
}

/// Runs `placed` (db, command) as one `MULTI`/`EXEC` from db 0, with a
/// `SELECT` before each change of db and back to 0, as a batch does.
fn run_batch(conn: &mut Conn, placed: &[(u32, Command)]) -> Vec<Resp> {
    let mut db = 0;
    conn.queue(&["MULTI"]);
    let mut queued = 1;
    for (at, cmd) in placed {
        if *at != db {
            conn.queue(&["SELECT".to_string(), at.to_string()]);
            queued += 1;
            db = *at;
        }
        conn.queue(&cmd.args);
        queued += 1;
    }
    if db != 0 {
        conn.queue(&["SELECT", "0"]);
    }
    conn.queue(&["EXEC"]);
    let replies = conn.replies().expect("batch replies");
    assert!(
        replies[..queued]
            .iter()
            .all(|r| matches!(r, Resp::Simple(s) if s == "OK" || s == "QUEUED")),
        "a command was refused when queued: {replies:?}"
    );
    let exec = replies.last().expect("EXEC reply").items().to_vec();
    for reply in &exec {
        assert!(!matches!(reply, Resp::Error(_)), "inside EXEC: {exec:?}");
    }
    exec
}

fn translate(owned: &OwnedKeyspace, db: u32, parts: &[&str]) -> Vec<(u32, Command)> {
    owned
        .translate(db, vec![Command::from_parts(parts.iter())], 16)
        .expect("not refused")
        .commands
        .into_iter()
        .map(|p| (p.db, p.cmd))
        .collect()
}

/// Every key of `db` with its string value (`?` for other types) and
/// whether it has a TTL.
fn contents(conn: &mut Conn, db: u32) -> BTreeMap<String, (String, bool)> {
    conn.call(&["SELECT".to_string(), db.to_string()])
        .expect("SELECT");
    let keys = conn.call(&["KEYS", "*"]).expect("KEYS");
    let mut out = BTreeMap::new();
    for key in keys.items() {
        let key = key.text().expect("key");
        let kind = conn.call(&["TYPE", &key]).expect("TYPE").text().unwrap();
        let value = if kind == "string" {
            conn.call(&["GET", &key])
                .expect("GET")
                .text()
                .unwrap_or_default()
        } else {
            "?".into()
        };
        let ttl = conn.call(&["PTTL", &key]).expect("PTTL").int() > 0;
        out.insert(key, (value, ttl));
    }
    conn.call(&["SELECT", "0"]).expect("SELECT 0");
    out
}

fn keys(map: &BTreeMap<String, (String, bool)>) -> Vec<&str> {
    map.keys().map(String::as_str).collect()
}

/// Fills dbs 0, 2 and 3: owned keys (`app:`, the glob-laden `a*b:`),
/// excluded ones (`app:tmp:`), other syncs' keys (`other:`, `aXb:` which an
/// unescaped `a*b:*` would match), ferry's own keys.
fn seed(conn: &mut Conn) {
    for db in ["0", "2", "3"] {
        conn.call(&["SELECT", db]).expect("SELECT");
        for key in ["app:1", "a*b:1", "app:tmp:1", "other:1", "aXb:1"] {
            conn.call(&["SET", key, &format!("{db}-{key}")])
                .expect("SET");
        }
        conn.call(&["SET", "app:ttl", &format!("{db}-ttl"), "PX", "600000"])
            .expect("SET PX");
        conn.call(&["RPUSH", "app:list", "x"]).expect("RPUSH");
    }
    conn.call(&["SELECT", "0"]).expect("SELECT");
    conn.call(&["SET", "__ferry:checkpoint:other:0", "v2 applied=7"])
        .expect("SET");
    conn.call(&["SET", "__ferry:heartbeat:x", "1"])
        .expect("SET");
}

#[test]
fn a_flush_under_a_key_filter_deletes_only_owned_keys() {
    let server = RedisServer::start(&[]);
    let mut conn = connect(&server.addr());
    seed(&mut conn);
    let owned = keyspace(Some(vec![0, 2]), &["app:", "a*b:"], &["app:tmp:"]);

    // FLUSHALL: dbs 0 and 2, owned keys only.
    run_batch(&mut conn, &translate(&owned, 0, &["FLUSHALL"]));
    let kept = [
        "__ferry:checkpoint:other:0",
        "__ferry:heartbeat:x",
        "aXb:1",
        "app:tmp:1",
        "other:1",
    ];
    assert_eq!(keys(&contents(&mut conn, 0)), kept);
    assert_eq!(
        keys(&contents(&mut conn, 2)),
        ["aXb:1", "app:tmp:1", "other:1"]
    );
    assert_eq!(contents(&mut conn, 3).len(), 7, "db 3 is not owned");

    // FLUSHDB ASYNC of db 3 (owned this time, exclusions only).
    let owned = keyspace(Some(vec![3]), &[], &["other:", "aXb:"]);
    run_batch(&mut conn, &translate(&owned, 3, &["FLUSHDB", "ASYNC"]));
    assert_eq!(keys(&contents(&mut conn, 3)), ["aXb:1", "other:1"]);
    assert_eq!(contents(&mut conn, 0).len(), 5, "db 0 untouched");
}

#[test]
fn a_swap_under_a_key_filter_exchanges_only_owned_keys() {
    let server = RedisServer::start(&[]);
    let mut conn = connect(&server.addr());
    seed(&mut conn);
    conn.call(&["SELECT", "2"]).expect("SELECT");
    conn.call(&["SET", "app:only-in-2", "x"]).expect("SET");
    conn.call(&["DEL", "app:1"]).expect("DEL");
    conn.call(&["SELECT", "0"]).expect("SELECT");
    let before0 = contents(&mut conn, 0);
    let before2 = contents(&mut conn, 2);
    let owned = keyspace(Some(vec![0, 2]), &["app:", "a*b:"], &["app:tmp:"]);
    let placed = translate(&owned, 5, &["SWAPDB", "2", "0"]);
    run_batch(&mut conn, &placed);
    let after0 = contents(&mut conn, 0);
    let after2 = contents(&mut conn, 2);
    let is_owned = |key: &str| {
        (key.starts_with("app:") || key.starts_with("a*b:")) && !key.starts_with("app:tmp:")
    };
    for (before_here, before_there, after) in
        [(&before0, &before2, &after0), (&before2, &before0, &after2)]
    {
        let expected: BTreeMap<String, (String, bool)> = before_here
            .iter()
            .filter(|(k, _)| !is_owned(k))
            .chain(before_there.iter().filter(|(k, _)| is_owned(k)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(after, &expected);
    }
    // TTLs moved with their keys; nothing was left under a temporary name.
    assert_eq!(after0["app:ttl"], ("2-ttl".to_string(), true));
    assert!(after0.keys().all(|k| !k.contains("ferry-swap")));
    assert!(after2.keys().all(|k| !k.starts_with("__ferry:")));
    assert_eq!(contents(&mut conn, 3).len(), 7, "db 3 is not owned");
}

#[test]
fn a_load_start_under_a_key_filter_counts_and_empties_only_owned_keys() {
    let server = RedisServer::start(&[]);
    let mut conn = connect(&server.addr());
    seed(&mut conn);
    let owned = keyspace(Some(vec![0, 2]), &["app:", "a*b:"], &["app:tmp:"]);
    let key = Bytes::from_static(b"__ferry:checkpoint:me:0");
    // check: refused with the owned keys counted, nothing changed.
    let start = owned.load_start(16, true, true, &key, b"v2 loading=5");
    let reply = run_batch_raw(&mut conn, &start);
    assert_eq!(
        reply,
        Resp::Error("FERRYEXISTING 0:4 2:4".into()),
        "app:1, a*b:1, app:ttl, app:list in each"
    );
    assert_eq!(contents(&mut conn, 0).len(), 9);
    // flush: owned keys go, the others and ferry's keys stay.
    let start = owned.load_start(16, false, true, &key, b"v2 loading=5");
    assert_eq!(
        run_batch_raw(&mut conn, &start),
        Resp::Bulk(Some(b"OK".to_vec()))
    );
    assert_eq!(
        keys(&contents(&mut conn, 0)),
        [
            "__ferry:checkpoint:me:0",
            "__ferry:checkpoint:other:0",
            "__ferry:heartbeat:x",
            "aXb:1",
            "app:tmp:1",
            "other:1"
        ]
    );
    assert_eq!(
        keys(&contents(&mut conn, 2)),
        ["aXb:1", "app:tmp:1", "other:1"]
    );
    assert_eq!(contents(&mut conn, 3).len(), 7);
    // keep: nothing deleted, the checkpoint written.
    let start = owned.load_start(16, false, false, &key, b"v2 loading=9");
    run_batch_raw(&mut conn, &start);
    assert_eq!(
        conn.call(&["GET", "__ferry:checkpoint:me:0"]).unwrap(),
        Resp::Bulk(Some(b"v2 loading=9".to_vec()))
    );
}

#[test]
fn a_load_start_and_flushall_under_a_db_map_touch_only_the_target_dbs() {
    let server = RedisServer::start(&[]);
    let mut conn = connect(&server.addr());
    seed(&mut conn);
    // Source dbs 0 and 5 into target dbs 2 and 0.
    let owned = OwnedKeyspace::mapped([(0, 2), (5, 0)]).expect("a valid map");
    let key = Bytes::from_static(b"__ferry:checkpoint:me:0");
    let start = owned.load_start(16, true, false, &key, b"v2 loading=5");
    assert_eq!(
        run_batch_raw(&mut conn, &start),
        Resp::Error("FERRYEXISTING 0:7 2:7".into())
    );
    run_batch(&mut conn, &translate(&owned, 0, &["FLUSHALL"]));
    assert_eq!(
        keys(&contents(&mut conn, 0)),
        ["__ferry:checkpoint:other:0", "__ferry:heartbeat:x"]
    );
    assert!(contents(&mut conn, 2).is_empty());
    assert_eq!(contents(&mut conn, 3).len(), 7, "db 3 is not a target db");
    // A SWAPDB of the source dbs swaps their target dbs.
    conn.call(&["SELECT", "2"]).unwrap();
    conn.call(&["SET", "in-2", "x"]).unwrap();
    conn.call(&["SELECT", "0"]).unwrap();
    run_batch(&mut conn, &translate(&owned, 0, &["SWAPDB", "0", "5"]));
    assert_eq!(
        keys(&contents(&mut conn, 0)),
        ["__ferry:checkpoint:other:0", "__ferry:heartbeat:x", "in-2"]
    );
    assert!(contents(&mut conn, 2).is_empty());
}

/// Runs one load-start command (in db 0) as `MULTI cmd EXEC`; its result.
fn run_batch_raw(conn: &mut Conn, cmd: &Command) -> Resp {
    conn.queue(&["MULTI"]);
    conn.queue(&cmd.args);
    conn.queue(&["EXEC"]);
    let replies = conn.replies().expect("replies");
    replies.last().expect("EXEC").items()[0].clone()
}

/// `db-map` and a key filter together: every flush, swap and load start
/// touches only the owned keys, and only in the target dbs the replicated
/// source dbs land in (here source 0 → target 3, source 5 → target 0;
/// target db 2 belongs to nobody of this sync, whatever its keys).
#[test]
fn a_db_map_with_a_key_filter_touches_only_owned_keys_of_the_target_dbs() {
    let server = RedisServer::start(&[]);
    let mut conn = connect(&server.addr());
    seed(&mut conn);
    let mut map = BTreeMap::new();
    map.insert("0".to_string(), 3);
    map.insert("5".to_string(), 0);
    let owned = FilterConfig {
        db_map: Some(map),
        key_prefix: Some(vec!["app:".into(), "a*b:".into()]),
        exclude_key_prefix: Some(vec!["app:tmp:".into()]),
        ..FilterConfig::default()
    }
    .keyspace()
    .expect("a valid filter");
    let others = |db: u32| -> Vec<&'static str> {
        let mut kept = vec!["aXb:1", "app:tmp:1", "other:1"];
        if db == 0 {
            kept.splice(0..0, ["__ferry:checkpoint:other:0", "__ferry:heartbeat:x"]);
        }
        kept
    };
    let untouched_2 = contents(&mut conn, 2);
    assert_eq!(untouched_2.len(), 7);

    // The load start counts the owned keys of target dbs 0 and 3 only.
    let key = Bytes::from_static(b"__ferry:checkpoint:me:0");
    let start = owned.load_start(16, true, true, &key, b"v2 loading=5");
    assert_eq!(
        run_batch_raw(&mut conn, &start),
        Resp::Error("FERRYEXISTING 0:4 3:4".into()),
        "app:1, a*b:1, app:ttl, app:list in each"
    );

    // FLUSHDB in source db 5: the owned keys of target db 0, nothing else.
    run_batch(&mut conn, &translate(&owned, 5, &["FLUSHDB"]));
    assert_eq!(keys(&contents(&mut conn, 0)), others(0));
    assert_eq!(contents(&mut conn, 3).len(), 7, "db 3 is source db 0's");
    assert_eq!(contents(&mut conn, 2), untouched_2);

    // SWAPDB 0 5 (source dbs): the owned keys of target dbs 3 and 0 change
    // places (db 0 had none left), the others stay, values and all.
    let before0 = contents(&mut conn, 0);
    let before3 = contents(&mut conn, 3);
    run_batch(&mut conn, &translate(&owned, 0, &["SWAPDB", "0", "5"]));
    let is_owned = |key: &str| {
        (key.starts_with("app:") || key.starts_with("a*b:")) && !key.starts_with("app:tmp:")
    };
    for (before_here, before_there, db) in [(&before0, &before3, 0), (&before3, &before0, 3)] {
        let expected: BTreeMap<String, (String, bool)> = before_here
            .iter()
            .filter(|(k, _)| !is_owned(k))
            .chain(before_there.iter().filter(|(k, _)| is_owned(k)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(contents(&mut conn, db), expected, "db {db} after SWAPDB");
    }
    assert_eq!(contents(&mut conn, 0)["app:1"].0, "3-app:1");
    assert_eq!(contents(&mut conn, 0)["other:1"].0, "0-other:1");
    assert_eq!(keys(&contents(&mut conn, 3)), others(3));
    assert_eq!(contents(&mut conn, 2), untouched_2);

    // FLUSHALL: the owned keys of target dbs 0 and 3.
    run_batch(&mut conn, &translate(&owned, 0, &["FLUSHALL"]));
    assert_eq!(keys(&contents(&mut conn, 0)), others(0));
    assert_eq!(keys(&contents(&mut conn, 3)), others(3));
    assert_eq!(contents(&mut conn, 2), untouched_2);

    // A load start that flushes leaves the same keys and writes the
    // checkpoint.
    conn.call(&["SELECT", "3"]).unwrap();
    conn.call(&["SET", "app:again", "x"]).unwrap();
    conn.call(&["SELECT", "0"]).unwrap();
    let start = owned.load_start(16, false, true, &key, b"v2 loading=7");
    assert_eq!(
        run_batch_raw(&mut conn, &start),
        Resp::Bulk(Some(b"OK".to_vec()))
    );
    assert_eq!(keys(&contents(&mut conn, 3)), others(3));
    let mut expected0 = others(0);
    expected0.insert(0, "__ferry:checkpoint:me:0");
    assert_eq!(keys(&contents(&mut conn, 0)), expected0);
    assert_eq!(contents(&mut conn, 2), untouched_2);
}

/// The swap script under a key filter selects both dbs before it changes
/// anything: a script stopped by an error keeps what it did, so a db the
/// target lacks must stop it before the first `RENAME` (the applier also
/// refuses such a `SWAPDB` up front; this is for a target whose
/// `databases` shrank after it was read).
#[test]
fn a_swap_with_a_db_the_target_lacks_changes_nothing() {
    let server = RedisServer::start(&[]);
    let mut conn = connect(&server.addr());
    seed(&mut conn);
    let mut map = BTreeMap::new();
    map.insert("0".to_string(), 0);
    map.insert("5".to_string(), 20);
    let owned = FilterConfig {
        db_map: Some(map),
        key_prefix: Some(vec!["app:".into()]),
        ..FilterConfig::default()
    }
    .keyspace()
    .expect("a valid filter");
    let before = contents(&mut conn, 0);
    // Translated for a target of 32 dbs; this one has 16.
    let placed: Vec<(u32, Command)> = owned
        .translate(0, vec![Command::from_parts(["SWAPDB", "5", "0"])], 32)
        .expect("in range for 32 dbs")
        .commands
        .into_iter()
        .map(|p| (p.db, p.cmd))
        .collect();
    assert_eq!(placed.len(), 1);
    conn.queue(&["MULTI"]);
    conn.queue(&placed[0].1.args);
    conn.queue(&["EXEC"]);
    let replies = conn.replies().expect("replies");
    let exec = replies.last().expect("EXEC").items().to_vec();
    assert!(
        matches!(&exec[0], Resp::Error(e) if e.contains("out of range")),
        "{exec:?}"
    );
    assert_eq!(contents(&mut conn, 0), before, "db 0 changed");
}

/// A prefix that ferry's own keys also start with (`__`) owns the other
/// keys it matches, never ferry's: counted, flushed and swapped without
/// them.
#[test]
fn a_prefix_matching_ferrys_keys_too_never_owns_them() {
    let server = RedisServer::start(&[]);
    let mut conn = connect(&server.addr());
    seed(&mut conn);
    conn.call(&["SET", "__mine", "x"]).unwrap();
    conn.call(&["SELECT", "2"]).unwrap();
    conn.call(&["SET", "__theirs", "y"]).unwrap();
    conn.call(&["SELECT", "0"]).unwrap();
    let owned = keyspace(Some(vec![0, 2]), &["__"], &[]);
    let key = Bytes::from_static(b"__ferry:checkpoint:me:0");
    let start = owned.load_start(16, true, false, &key, b"v2 loading=1");
    assert_eq!(
        run_batch_raw(&mut conn, &start),
        Resp::Error("FERRYEXISTING 0:1 2:1".into())
    );
    run_batch(&mut conn, &translate(&owned, 0, &["SWAPDB", "0", "2"]));
    let db0 = contents(&mut conn, 0);
    assert_eq!(db0["__theirs"].0, "y");
    assert!(
        db0.contains_key("__ferry:checkpoint:other:0") && db0.contains_key("__ferry:heartbeat:x")
    );
    assert!(!contents(&mut conn, 2)
        .keys()
        .any(|k| k.starts_with("__ferry")));
    run_batch(&mut conn, &translate(&owned, 0, &["FLUSHALL"]));
    let db0 = contents(&mut conn, 0);
    assert_eq!(
        keys(&db0)[..2],
        ["__ferry:checkpoint:other:0", "__ferry:heartbeat:x"]
    );
    assert!(!db0.contains_key("__theirs") && db0.len() == 9, "{db0:?}");
    assert_eq!(contents(&mut conn, 2).len(), 7);
}

/// One argument list of a `MONITOR` line (`sdscatrepr` quoting).
fn monitor_args(line: &str) -> Vec<Vec<u8>> {
    let mut args = Vec::new();
    let bytes = line.as_bytes();
    let mut i = match line.find("] ") {
        Some(at) => at + 2,
        None => return args,
    };
    while i < bytes.len() {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        i += 1;
        let mut arg = Vec::new();
        while i < bytes.len() && bytes[i] != b'"' {
            if bytes[i] == b'\\' && i + 1 < bytes.len() {
                i += 1;
                match bytes[i] {
                    b'n' => arg.push(b'\n'),
                    b'r' => arg.push(b'\r'),
                    b't' => arg.push(b'\t'),
                    b'a' => arg.push(7),
                    b'b' => arg.push(8),
                    b'x' => {
                        let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("hex");
                        arg.push(u8::from_str_radix(hex, 16).expect("hex"));
                        i += 2;
                    }
                    other => arg.push(other),
                }
            } else {
                arg.push(bytes[i]);
            }
            i += 1;
        }
        i += 1;
        args.push(arg);
    }
    args
}

/// What Redis replicates of the swap script is its effects: every write it
/// makes must name only owned keys, so that a ferry syncing from this
/// target (a cascade) applies them like any `RENAME`/`MOVE` instead of
/// meeting ferry's own key names. Here with temporary names that must
/// step aside: `app:1!ferry-swap-0` is held (an owned key of db 2) and
/// `a*b:1!` is excluded.
#[test]
fn a_swaps_replicated_effects_name_only_owned_keys() {
    use std::io::BufRead as _;

    let server = RedisServer::start(&[]);
    let mut conn = connect(&server.addr());
    seed(&mut conn);
    conn.call(&["SELECT", "2"]).unwrap();
    conn.call(&["SET", "app:1!ferry-swap-0", "held"]).unwrap();
    conn.call(&["SELECT", "0"]).unwrap();
    let owned = keyspace(Some(vec![0, 2]), &["app:", "a*b:"], &["app:tmp:", "a*b:1!"]);
    let before0 = contents(&mut conn, 0);
    let before2 = contents(&mut conn, 2);

    let mut monitor = std::process::Command::new(redis_cli_bin())
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string(), "MONITOR"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli MONITOR");
    let mut lines = std::io::BufReader::new(monitor.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("MONITOR OK").expect("line"), "OK");
    run_batch(&mut conn, &translate(&owned, 0, &["SWAPDB", "0", "2"]));
    conn.call(&["ECHO", "monitor-end"]).unwrap();
    let mut writes: Vec<Vec<Vec<u8>>> = Vec::new();
    for line in lines {
        let line = line.expect("MONITOR line");
        if line.contains("monitor-end") {
            break;
        }
        let args = monitor_args(&line);
        let is_write = args.first().is_some_and(|name| {
            let name = String::from_utf8_lossy(name).to_uppercase();
            name == "RENAME" || name == "MOVE"
        });
        if line.contains(" lua] ") && is_write {
            writes.push(args);
        }
    }
    monitor.kill().ok();
    monitor.wait().ok();

    let shown: Vec<String> = writes
        .iter()
        .map(|args| {
            args.iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert!(
        shown.contains(&"RENAME app:1 app:1!ferry-swap-1".to_string())
            && shown.contains(&"RENAME a*b:1 a*b:1\"ferry-swap-0".to_string()),
        "{shown:#?}"
    );
    for args in &writes {
        let cmd = Command::new(args.iter().map(|a| Bytes::from(a.clone())).collect());
        for downstream in [&OwnedKeyspace::all(), &owned] {
            assert_eq!(
                downstream.classify(&cmd),
                KeyClass::Data,
                "a replicated effect names keys not owned: {shown:#?}"
            );
        }
    }

    // And the swap itself: owned keys changed places, nothing else moved,
    // no temporary name left.
    let is_owned = |key: &str| {
        (key.starts_with("app:") || key.starts_with("a*b:"))
            && !key.starts_with("app:tmp:")
            && !key.starts_with("a*b:1!")
    };
    for (before_here, before_there, db) in [(&before0, &before2, 0), (&before2, &before0, 2)] {
        let expected: BTreeMap<String, (String, bool)> = before_here
            .iter()
            .filter(|(k, _)| !is_owned(k))
            .chain(before_there.iter().filter(|(k, _)| is_owned(k)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(contents(&mut conn, db), expected, "db {db} after SWAPDB");
    }
    assert_eq!(contents(&mut conn, 0)["app:1!ferry-swap-0"].0, "held");
}
