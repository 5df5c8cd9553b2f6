//! Append throughput of the RocksDB WAL with group commit.
//!
//! Each iteration appends `ENTRIES_PER_ITERATION` entries of `PAYLOAD_LEN`
//! bytes, spread evenly over `partitions` concurrent appenders (one per
//! partition), each awaiting appends of `ENTRIES_PER_APPEND` entries in
//! turn. With one partition every append waits for its own fsync; with many,
//! the writer folds concurrent appends into one fsynced batch.
//!
//! Run: `CARGO_TARGET_DIR=... cargo bench --bench wal_append` (one case:
//! append `-- partitions=16/fsync=true`). Besides criterion's figures each
//! case prints entries/s and the peak RSS (VmHWM) reached while it ran.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry::position::{PartitionId, ReplOffset};
use ferry::wal::{NewEntry, RocksWalStorage, SourcePosition, Wal, WalConfig};

const ENTRIES_PER_ITERATION: usize = 4096;
const ENTRIES_PER_APPEND: usize = 16;
const PAYLOAD_LEN: usize = 256;

/// A `/proc/self/status` field in KiB (`VmHWM`: peak RSS, `VmRSS`: current).
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets VmHWM to the current RSS so each case reports its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

async fn append_workload(wal: &Wal, partitions: u32, payload: &Bytes) {
    let per_partition = ENTRIES_PER_ITERATION / partitions as usize;
    let mut tasks = Vec::with_capacity(partitions as usize);
    for partition in 0..partitions {
        let wal = wal.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut remaining = per_partition;
            while remaining > 0 {
                let count = remaining.min(ENTRIES_PER_APPEND);
                let entries = (0..count)
                    .map(|i| {
                        NewEntry::new(
                            SourcePosition {
                                replid: "b".repeat(40).into(),
                                offset: ReplOffset(i as u64),
                                db: 0,
                            },
                            payload.clone(),
                        )
                    })
                    .collect();
                wal.append(PartitionId(partition), entries)
                    .await
                    .expect("append");
                remaining -= count;
            }
        }));
    }
    for task in tasks {
        task.await.expect("appender task");
    }
}

fn bench_append(c: &mut Criterion) {
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime"),
    );
    let payload = Bytes::from(vec![0x5a; PAYLOAD_LEN]);
    let mut group = c.benchmark_group("wal_append");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Bytes(
        (ENTRIES_PER_ITERATION * PAYLOAD_LEN) as u64,
    ));
    // Cases the command line filters out are not set up at all, so that a
    // single-case run measures only its own peak RSS.
    let filter = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-'))
        .map(|arg| arg.trim_end_matches('$').to_string());
    for fsync in [true, false] {
        for partitions in [1u32, 16, 256] {
            let case = format!("partitions={partitions}/fsync={fsync}");
            if filter
                .as_ref()
                .is_some_and(|filter| !case.contains(filter.as_str()))
            {
                continue;
            }
            let dir = tempfile::tempdir().expect("tempdir");
            let config = WalConfig {
                sync: fsync,
                ..WalConfig::with_dir(dir.path())
            };
            reset_peak_rss();
            let storage = Arc::new(RocksWalStorage::open(&config).expect("open rocksdb"));
            let wal = runtime
                .block_on(Wal::with_storage(storage.clone(), config))
                .expect("open wal");
            // Samples memtable memory while the case runs.
            let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let sampler = {
                let storage = Arc::clone(&storage);
                let sampling = Arc::clone(&sampling);
                std::thread::spawn(move || {
                    let mut peak = 0;
                    while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                        peak = peak.max(storage.memtable_bytes().unwrap_or(0));
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    peak
                })
            };
            // Creating the column families of new partitions (one MANIFEST
            // write each) is a one-time cost, not part of append throughput.
            runtime.block_on(append_workload(&wal, partitions, &payload));
            let setup_rss_mib = status_kib("VmRSS:").map_or(0, |kib| kib / 1024);
            let mut total_entries = 0u64;
            let mut total_time = Duration::ZERO;
            let id = BenchmarkId::from_parameter(&case);
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    runtime.block_on(async {
                        for _ in 0..iters {
                            append_workload(&wal, partitions, &payload).await;
                        }
                    });
                    let elapsed = started.elapsed();
                    total_entries += iters * ENTRIES_PER_ITERATION as u64;
                    total_time += elapsed;
                    elapsed
                })
            });
            sampling.store(false, std::sync::atomic::Ordering::Relaxed);
            let peak_memtables_mib = sampler.join().unwrap_or(0) >> 20;
            let entries_per_sec = total_entries as f64 / total_time.as_secs_f64();
            println!(
                "wal_append/{case}: {entries_per_sec:.0} entries/s, \
                 {:.2} MB/s payload, RSS after creating the partitions {setup_rss_mib} MiB, \
                 peak RSS {} MiB, peak memtables {peak_memtables_mib} MiB",
                entries_per_sec * PAYLOAD_LEN as f64 / 1e6,
                status_kib("VmHWM:").map_or(0, |kib| kib / 1024),
            );
            runtime.block_on(wal.close()).expect("close wal");
        }
    }
    group.finish();
}

criterion_group!(benches, bench_append);
criterion_main!(benches);
