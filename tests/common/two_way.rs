//! Two-way test support (tests/two_way.rs, tests/site.rs): writers that
//! run `INCR`, `INCRBY`, `HINCRBY` and `LPUSH` on the same keys of one side
//! and count what was acknowledged, and what a server then holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::resp::{connect, Resp};
use super::RedisServer;

/// Waits until `check` holds, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// What one side's writer had acknowledged.
#[derive(Debug, Default)]
pub struct Done {
    pub incr: i64,
    pub incrby: i64,
    pub hincrby: i64,
    pub pushed: Vec<String>,
}

/// What both sides must hold once both writers' work arrived: the
/// counter (from 100), `INCRBY` and `HINCRBY` sums, and every pushed
/// element once (sorted).
pub fn expected(on_a: &Done, on_b: &Done) -> (i64, i64, i64, Vec<String>) {
    let mut pushed: Vec<String> = on_a.pushed.iter().chain(&on_b.pushed).cloned().collect();
    pushed.sort();
    (
        100 + on_a.incr + on_b.incr,
        on_a.incrby + on_b.incrby,
        on_a.hincrby + on_b.hincrby,
        pushed,
    )
}

pub fn int(reply: std::io::Result<Resp>, what: &str) {
    match reply {
        Ok(Resp::Int(_)) => {}
        other => panic!("{what}: {other:?}"),
    }
}

/// `INCR c`, `INCRBY c2 3`, `HINCRBY h f 2`, `LPUSH l <name>-<n>` on one
/// side, one round trip each, until `stop`.
pub fn side_writer(addr: String, name: &'static str, stop: Arc<AtomicBool>) -> Done {
    let mut conn = connect(&addr);
    let mut done = Done::default();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        int(conn.call(&["INCR", "c"]), "INCR");
        done.incr += 1;
        int(conn.call(&["INCRBY", "c2", "3"]), "INCRBY");
        done.incrby += 3;
        int(conn.call(&["HINCRBY", "h", "f", "2"]), "HINCRBY");
        done.hincrby += 2;
        let element = format!("{name}-{n}");
        int(conn.call(&["LPUSH", "l", &element]), "LPUSH");
        done.pushed.push(element);
        thread::sleep(Duration::from_millis(1));
    }
    done
}

/// (c, c2, h.f, l sorted) of a server.
pub fn state(server: &RedisServer) -> (i64, i64, i64, Vec<String>) {
    let mut conn = connect(&server.addr());
    let number = |reply: Resp| reply.text().map_or(0, |t| t.parse::<i64>().unwrap());
    let c = number(conn.call(&["GET", "c"]).unwrap());
    let c2 = number(conn.call(&["GET", "c2"]).unwrap());
    let hf = number(conn.call(&["HGET", "h", "f"]).unwrap());
    let mut list: Vec<String> = conn
        .call(&["LRANGE", "l", "0", "-1"])
        .unwrap()
        .items()
        .iter()
        .map(|item| item.text().unwrap())
        .collect();
    list.sort();
    (c, c2, hf, list)
}
