//! Crash and corruption tests of the RocksDB WAL.
//!
//! `acknowledged_entries_survive_sigkill` re-executes this test binary as a
//! child process (the ignored `crash_child` test, selected with `--exact`
//! and told what to do through environment variables). The child appends to
//! several partitions with fsync group commit and prints every acknowledged
//! range, while a trimmer keeps trimming the logs (trims write only the
//! meta; the entries below `first` are released afterwards, so kills land
//! between trims and releases too); the parent SIGKILLs it at a random
//! moment, reopens the WAL and checks that every acknowledged entry at or
//! after the first id is there and intact, that the meta never points past
//! the entries, and that appends continue at the right id.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry::position::{LogId, PartitionId, ReplOffset};
use ferry::wal::{NewEntry, ReadLimits, SourcePosition, Wal, WalConfig, WalError};

const DIR_ENV: &str = "FERRY_WAL_CRASH_DIR";
const ROUND_ENV: &str = "FERRY_WAL_CRASH_ROUND";
const PARTITIONS: u32 = 4;
/// Entries the child's trimmer keeps below the last one.
const TRIM_KEEP: u64 = 40;

/// The payload of entry `log_id` of `partition` written in `round`; its size
/// varies so that batches and values of several sizes are exercised.
fn payload(round: u64, partition: u32, log_id: u64) -> Bytes {
    let tag = format!("round={round} partition={partition} id={log_id};");
    let repeat = 1 + (log_id % 13) as usize * 7;
    Bytes::from(tag.repeat(repeat))
}

fn new_entry(round: u64, partition: u32, log_id: u64) -> NewEntry {
    NewEntry::new(
        SourcePosition {
            replid: "c".repeat(40).into(),
            offset: ReplOffset(log_id * 100),
            db: partition,
        },
        payload(round, partition, log_id),
    )
}

fn config(dir: &Path) -> WalConfig {
    WalConfig {
        group_commit_linger: "200us".parse().unwrap(),
        ..WalConfig::with_dir(dir)
    }
}

/// Tiny xorshift generator: the test prints its seed so a failing run can be
/// reproduced with `FERRY_WAL_CRASH_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

#[test]
#[ignore = "helper process of acknowledged_entries_survive_sigkill"]
fn crash_child() {
    let dir = std::env::var(DIR_ENV).expect("crash_child runs only as a helper process");
    let round: u64 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let wal = Wal::open(config(Path::new(&dir))).await.unwrap();
        let mut tasks = Vec::new();
        let trimmer = wal.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(15)).await;
                for partition in 0..PARTITIONS {
                    let id = PartitionId(partition);
                    let Some(last) = trimmer.last_log_id(id).unwrap() else {
                        continue;
                    };
                    trimmer
                        .trim(id, LogId(last.0.saturating_sub(TRIM_KEEP).max(1)))
                        .await
                        .unwrap();
                }
            }
        }));
        for partition in 0..PARTITIONS {
            let wal = wal.clone();
            tasks.push(tokio::spawn(async move {
                let id = PartitionId(partition);
                let mut next = wal.last_log_id(id).unwrap().unwrap_or(LogId::ZERO).next();
                loop {
                    let count = 1 + (next.0 % 5);
                    let entries = (next.0..next.0 + count)
                        .map(|log_id| new_entry(round, partition, log_id))
                        .collect();
                    let range = wal.append(id, entries).await.unwrap();
                    // Appends continue right after what is durable.
                    assert_eq!(range.first, next, "partition {partition}");
                    let mut stdout = std::io::stdout().lock();
                    writeln!(
                        stdout,
                        "ack {partition} {} {} {round}",
                        range.first, range.last
                    )
                    .unwrap();
                    stdout.flush().unwrap();
                    next = range.last.next();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

/// One acknowledged range: partition, first, last, round.
fn parse_ack(line: &str) -> Option<(u32, u64, u64, u64)> {
    let mut fields = line.strip_prefix("ack ")?.split_whitespace();
    let mut next = || fields.next()?.parse::<u64>().ok();
    Some((next()? as u32, next()?, next()?, next()?))
}

#[test]
fn acknowledged_entries_survive_sigkill() {
    let seed = std::env::var("FERRY_WAL_CRASH_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("FERRY_WAL_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    // (partition, log id) -> round that wrote it, for every acked entry.
    let mut acked: BTreeMap<(u32, u64), u64> = BTreeMap::new();
    let mut highest_first = LogId(1);
    let rounds = 6;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            // Read until EOF: lines printed before the kill are still in the
            // pipe. A line cut by the kill has no newline and is not an ack.
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if line.ends_with('\n') {
                    lines.push(line.trim_end().to_string());
                }
                line.clear();
            }
            lines
        });
        // Some rounds die while RocksDB is still opening or recovering.
        let delay = Duration::from_millis(if round % 3 == 0 {
            rng.below(60)
        } else {
            150 + rng.below(600)
        });
        let started = Instant::now();
        std::thread::sleep(delay);
        let exited_early = child.try_wait().unwrap();
        assert!(
            exited_early.is_none(),
            "child exited on its own: {exited_early:?}"
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let mut round_acks = 0;
        for (partition, first, last, ack_round) in lines.iter().filter_map(|l| parse_ack(l)) {
            assert_eq!(ack_round, round);
            for log_id in first..=last {
                let previous = acked.insert((partition, log_id), round);
                assert!(
                    previous.is_none(),
                    "id {partition}/{log_id} acknowledged twice (rounds {previous:?} and {round})"
                );
                round_acks += 1;
            }
        }
        println!(
            "round {round}: killed after {:?}, {round_acks} entries acknowledged",
            started.elapsed()
        );
        highest_first = highest_first.max(verify(dir.path(), &acked, round));
    }
    assert!(
        acked.len() > 100,
        "only {} entries were acknowledged over {rounds} rounds",
        acked.len()
    );
    assert!(
        highest_first > LogId(1),
        "the child never trimmed, so trims were not crash-tested"
    );
}

/// Reopens the WAL after a kill and checks it against the acknowledged ids;
/// returns the highest first id of a partition (how far trims got).
fn verify(dir: &Path, acked: &BTreeMap<(u32, u64), u64>, round: u64) -> LogId {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Open checks that meta.last equals the greatest stored entry.
        let wal = Wal::open(config(dir)).await.unwrap();
        let mut highest_first = LogId(1);
        for partition in 0..PARTITIONS {
            let id = PartitionId(partition);
            let max_acked = acked
                .range((partition, 0)..=(partition, u64::MAX))
                .map(|((_, log_id), _)| *log_id)
                .max();
            let last = wal.last_log_id(id).unwrap();
            assert!(
                last.map(|l| l.0) >= max_acked,
                "partition {partition}: last {last:?} is behind acknowledged {max_acked:?}"
            );
            let Some(last) = last else { continue };
            let positions = wal.positions(id).unwrap().unwrap();
            assert_eq!(positions.durable, last);
            let first = positions.first_available;
            highest_first = highest_first.max(first);
            assert!(
                first <= last,
                "partition {partition}: first {first} last {last}"
            );
            let bounds = wal.storage().stored_bounds(id, first).unwrap();
            assert_eq!(bounds, Some((first, last)), "partition {partition}");

            // Every entry from first to last is readable, contiguous and
            // intact; acknowledged ones carry exactly the acknowledged
            // payload. Below first they were trimmed.
            assert!(
                matches!(
                    wal.read(id, first.prev(), ReadLimits::default()),
                    Err(WalError::Trimmed { .. })
                ) || first == LogId(1)
            );
            let mut from = first;
            let mut bytes_end = None;
            while from <= last {
                let entries = wal.read(id, from, ReadLimits::default()).unwrap();
                assert!(
                    !entries.is_empty(),
                    "partition {partition}: nothing at {from}"
                );
                for entry in entries {
                    assert_eq!(entry.log_id, from);
                    if let Some(bytes_end) = bytes_end {
                        assert_eq!(entry.bytes_end, bytes_end + entry.stored_len);
                    }
                    bytes_end = Some(entry.bytes_end);
                    assert_eq!(entry.source.offset, ReplOffset(from.0 * 100));
                    if let Some(ack_round) = acked.get(&(partition, from.0)) {
                        assert_eq!(entry.payload, payload(*ack_round, partition, from.0));
                    } else {
                        // Durable but unacknowledged (in flight at the kill):
                        // written by this round or an earlier one.
                        let text = String::from_utf8(entry.payload.to_vec()).unwrap();
                        let wrote_round: u64 = text
                            .strip_prefix("round=")
                            .and_then(|rest| rest.split(' ').next())
                            .and_then(|n| n.parse().ok())
                            .unwrap();
                        assert!(wrote_round <= round);
                        assert_eq!(entry.payload, payload(wrote_round, partition, from.0));
                    }
                    from = from.next();
                }
            }
            assert_eq!(
                positions.source.map(|source| source.offset),
                Some(ReplOffset(last.0 * 100)),
                "meta source position matches the last entry"
            );
        }
        // A plain append continues at last + 1.
        let id = PartitionId(0);
        let expected = wal.last_log_id(id).unwrap().unwrap_or(LogId::ZERO).next();
        let range = wal
            .append(id, vec![new_entry(round, 0, expected.0)])
            .await
            .unwrap();
        assert_eq!(range.first, expected);
        wal.close().await.unwrap();
        highest_first
    })
}

fn raw_db(dir: &Path) -> rocksdb::DB {
    let options = rocksdb::Options::default();
    let names = rocksdb::DB::list_cf(&options, dir).unwrap();
    rocksdb::DB::open_cf(&options, dir, names).unwrap()
}

/// Appends entries 1..=count, one append each: each is stored as a block
/// of its own (a log value per entry).
fn append_some(dir: &Path, partition: u32, count: u64) {
    append_blocks(dir, partition, count, 1);
}

/// Appends entries 1..=count, `per_append` per append (a block each).
fn append_blocks(dir: &Path, partition: u32, count: u64, per_append: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let wal = Wal::open(config(dir)).await.unwrap();
        let ids: Vec<u64> = (1..=count).collect();
        for chunk in ids.chunks(per_append as usize) {
            let entries = chunk
                .iter()
                .map(|id| new_entry(0, partition, *id))
                .collect();
            wal.append(PartitionId(partition), entries).await.unwrap();
        }
        wal.close().await.unwrap();
    });
}

fn open_and_read(dir: &Path, partition: u32, from: u64) -> Result<usize, WalError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let wal = Wal::open(config(dir)).await?;
        let result = wal.read(PartitionId(partition), LogId(from), ReadLimits::default());
        wal.close().await?;
        result.map(|entries| entries.len())
    })
}

#[test]
fn a_flipped_byte_is_reported_as_corrupt_with_partition_and_log_id() {
    let dir = tempfile::tempdir().unwrap();
    append_some(dir.path(), 7, 5);
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle("p7.log").unwrap();
        let key = 3u64.to_be_bytes();
        let mut value = db.get_cf(cf, key).unwrap().unwrap();
        let middle = value.len() / 2;
        value[middle] ^= 0x01;
        db.put_cf(cf, key, value).unwrap();
    }
    match open_and_read(dir.path(), 7, 1) {
        Err(WalError::Corrupt {
            partition,
            log_id,
            what,
        }) => {
            assert_eq!(partition, PartitionId(7));
            assert_eq!(log_id, LogId(3));
            assert!(what.contains("checksum"), "{what}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Entries after the corrupt one are still readable.
    assert_eq!(open_and_read(dir.path(), 7, 4).unwrap(), 2);
}

/// A flipped byte in a block of entries is reported under the block's first
/// id for a read of any entry it holds; the blocks around it stay readable.
#[test]
fn a_flipped_byte_in_a_block_is_corrupt_for_each_of_its_entries() {
    let dir = tempfile::tempdir().unwrap();
    append_blocks(dir.path(), 7, 15, 5);
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle("p7.log").unwrap();
        let key = 6u64.to_be_bytes();
        let mut value = db.get_cf(cf, key).unwrap().unwrap();
        let middle = value.len() / 2;
        value[middle] ^= 0x01;
        db.put_cf(cf, key, value).unwrap();
    }
    for from in 6..=10 {
        match open_and_read(dir.path(), 7, from) {
            Err(WalError::Corrupt {
                partition,
                log_id,
                what,
            }) => {
                assert_eq!((partition, log_id), (PartitionId(7), LogId(6)));
                assert!(what.contains("checksum"), "{what}");
            }
            other => panic!("from {from}: expected Corrupt, got {other:?}"),
        }
    }
    assert_eq!(open_and_read(dir.path(), 7, 11).unwrap(), 5);
    assert!(matches!(
        open_and_read(dir.path(), 7, 1),
        Err(WalError::Corrupt {
            log_id: LogId(6),
            ..
        })
    ));
}

#[test]
fn a_missing_tail_entry_makes_open_fail_as_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    append_some(dir.path(), 2, 4);
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle("p2.log").unwrap();
        db.delete_cf(cf, 4u64.to_be_bytes()).unwrap();
    }
    match open_and_read(dir.path(), 2, 1) {
        Err(WalError::Inconsistent { partition, what }) => {
            assert_eq!(partition, PartitionId(2));
            assert!(what.contains("greatest stored entry is 3"), "{what}");
        }
        other => panic!("expected Inconsistent, got {other:?}"),
    }
}

/// Garbage below `first` is ignored, but a hole at `first` is still caught.
#[test]
fn a_missing_first_entry_makes_open_fail_even_with_garbage_below() {
    let dir = tempfile::tempdir().unwrap();
    append_some(dir.path(), 2, 6);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let wal = Wal::open(config(dir.path())).await.unwrap();
        wal.trim(PartitionId(2), LogId(3)).await.unwrap();
        wal.close().await.unwrap();
    });
    {
        // Entries 1 and 2 may still be stored as garbage (memtable); put
        // one back for sure, and punch the hole at first.
        let db = raw_db(dir.path());
        let cf = db.cf_handle("p2.log").unwrap();
        db.put_cf(cf, 1u64.to_be_bytes(), b"garbage").unwrap();
        db.delete_cf(cf, 3u64.to_be_bytes()).unwrap();
    }
    match open_and_read(dir.path(), 2, 4) {
        Err(WalError::Inconsistent { partition, what }) => {
            assert_eq!(partition, PartitionId(2));
            assert!(what.contains("is 4 but meta says first is 3"), "{what}");
        }
        other => panic!("expected Inconsistent, got {other:?}"),
    }
    // The same garbage without the hole opens and reads fine.
    let fresh = tempfile::tempdir().unwrap();
    append_some(fresh.path(), 2, 6);
    runtime.block_on(async {
        let wal = Wal::open(config(fresh.path())).await.unwrap();
        wal.trim(PartitionId(2), LogId(3)).await.unwrap();
        wal.close().await.unwrap();
    });
    {
        let db = raw_db(fresh.path());
        let cf = db.cf_handle("p2.log").unwrap();
        db.put_cf(cf, 1u64.to_be_bytes(), b"garbage").unwrap();
    }
    assert_eq!(open_and_read(fresh.path(), 2, 3).unwrap(), 4);
}

#[test]
fn a_corrupt_meta_record_makes_open_fail() {
    let dir = tempfile::tempdir().unwrap();
    append_some(dir.path(), 1, 2);
    {
        let db = raw_db(dir.path());
        let cf = db.cf_handle("meta").unwrap();
        let key = [b'L', 0, 0, 0, 1];
        let mut value = db.get_cf(cf, key).unwrap().unwrap();
        value[2] ^= 0x80;
        db.put_cf(cf, key, value).unwrap();
    }
    match open_and_read(dir.path(), 1, 1) {
        Err(WalError::CorruptMeta { partition, what }) => {
            assert_eq!(partition, PartitionId(1));
            assert!(what.contains("checksum"), "{what}");
        }
        other => panic!("expected CorruptMeta, got {other:?}"),
    }
}
