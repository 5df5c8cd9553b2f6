//! Two-way test support (tests/two_way.rs, tests/site.rs): writers that
//! run `INCR`, `INCRBY`, `HINCRBY` and `LPUSH` on the same keys of one side
//! and count what was acknowledged, and what a server then holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::cluster::key_in_slot;
use super::ferry::FerryProcess;
use super::resp::{connect, Resp};
use super::side::Side;
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
    keys_state(&server.addr(), ["c", "c2", "h", "l"])
}

/// (the counter, the `INCRBY` counter, the hash's field `f`, the list
/// sorted) of the four keys `keys` at `addr`.
fn keys_state(addr: &str, keys: [&str; 4]) -> (i64, i64, i64, Vec<String>) {
    let mut conn = connect(addr);
    let number = |reply: Resp| reply.text().map_or(0, |t| t.parse::<i64>().unwrap());
    let c = number(conn.call(&["GET", keys[0]]).unwrap());
    let c2 = number(conn.call(&["GET", keys[1]]).unwrap());
    let hf = number(conn.call(&["HGET", keys[2], "f"]).unwrap());
    let mut list: Vec<String> = conn
        .call(&["LRANGE", keys[3], "0", "-1"])
        .unwrap()
        .items()
        .iter()
        .map(|item| item.text().unwrap())
        .collect();
    list.sort();
    (c, c2, hf, list)
}

/// One slot in each third of the range: every master of a 3-master cluster
/// made by `redis-cli --cluster create` gets one.
pub const CLUSTER_SLOTS: [u16; 3] = [100, 6000, 12000];

/// The writer of `side_writer` on the keys of one slot (`c:{t}`, ...) at
/// the master serving it.
pub fn slot_writer(addr: String, tag: String, name: String, stop: Arc<AtomicBool>) -> Done {
    let mut conn = connect(&addr);
    let mut done = Done::default();
    let mut n = 0u64;
    let (c, c2, h, l) = (
        format!("c:{tag}"),
        format!("c2:{tag}"),
        format!("h:{tag}"),
        format!("l:{tag}"),
    );
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        int(conn.call(&["INCR", &c]), "INCR");
        done.incr += 1;
        int(conn.call(&["INCRBY", &c2, "3"]), "INCRBY");
        done.incrby += 3;
        int(conn.call(&["HINCRBY", &h, "f", "2"]), "HINCRBY");
        done.hincrby += 2;
        let element = format!("{name}-{n}");
        int(conn.call(&["LPUSH", &l, &element]), "LPUSH");
        done.pushed.push(element);
        thread::sleep(Duration::from_millis(2));
    }
    done
}

/// The hash tags of [`CLUSTER_SLOTS`] (one per master of a 3-master
/// cluster), each tag's counter `c:{tag}` set to 100 on `a` (what
/// [`expected`] counts from).
pub fn seeded_tags(a: Side) -> Vec<String> {
    let tags: Vec<String> = CLUSTER_SLOTS
        .iter()
        .map(|&slot| key_in_slot("x", slot).trim_start_matches("x:").to_string())
        .collect();
    for tag in &tags {
        let key = format!("c:{tag}");
        a.call_key(&key, &["INCRBY", &key, "100"]);
    }
    tags
}

/// A [`slot_writer`] on each side for each of `tags`, at the master
/// serving it: A's and B's writers of `tags[i]` are the joined `2i` and
/// `2i + 1`.
pub fn slot_writers(
    a: Side,
    b: Side,
    tags: &[String],
    stop: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<Done>> {
    let mut writers = Vec::new();
    for tag in tags {
        let key = format!("c:{tag}");
        for (cluster, side) in [(a, "a"), (b, "b")] {
            let addr = cluster.addr_for(&key);
            let (tag, name, stop) = (tag.clone(), format!("{side}{tag}"), Arc::clone(stop));
            writers.push(thread::spawn(move || slot_writer(addr, tag, name, stop)));
        }
    }
    writers
}

/// Waits until both sides hold `want` for the keys of `tag`.
pub fn wait_both_hold(
    a: Side,
    b: Side,
    tag: &str,
    want: &(i64, i64, i64, Vec<String>),
    ferries: &[&FerryProcess],
) {
    for (cluster, side) in [(a, "A"), (b, "B")] {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let have = side_state(cluster, tag);
            if have == *want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{side}, keys {tag}: have {:?}, want {:?} (lists {} vs {})\n{}",
                (have.0, have.1, have.2),
                (want.0, want.1, want.2),
                have.3.len(),
                want.3.len(),
                ferries
                    .iter()
                    .map(|ferry| ferry.log_tail(40))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// (c, c2, h.f, l sorted) of the keys of `tag` on `side`.
pub fn side_state(side: Side, tag: &str) -> (i64, i64, i64, Vec<String>) {
    let keys = ["c", "c2", "h", "l"].map(|name| format!("{name}:{tag}"));
    keys_state(
        &side.addr_for(&keys[0]),
        [&keys[0], &keys[1], &keys[2], &keys[3]],
    )
}

/// Stops the [`slot_writers`] (`stop`, then joins them), then waits until
/// both sides hold, for each of `tags`, what both sides' writers of it
/// acknowledged; each writer must have made more than `min_incr` `INCR`s.
/// Returns what each writer acknowledged.
pub fn stop_and_wait_both_hold(
    (a, b): (Side, Side),
    tags: &[String],
    (stop, writers): (&AtomicBool, Vec<thread::JoinHandle<Done>>),
    min_incr: i64,
    ferries: &[&FerryProcess],
) -> Vec<Done> {
    stop.store(true, Ordering::SeqCst);
    let done: Vec<Done> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for (i, tag) in tags.iter().enumerate() {
        let (on_a, on_b) = (&done[2 * i], &done[2 * i + 1]);
        assert!(
            on_a.incr > min_incr && on_b.incr > min_incr,
            "too few writes: {on_a:?} {on_b:?}"
        );
        wait_both_hold(a, b, tag, &expected(on_a, on_b), ferries);
    }
    done
}
