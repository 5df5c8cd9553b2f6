//! [`WalMetrics`]: what a WAL's writer task wrote and how long its fsyncs
//! took, counted with atomics so the writer never waits for a reader.
//!
//! In: one observation per committed batch from the group-commit writer
//! ([`WalMetrics::record_batch`]). Out: a [`WalStatus`] reading (bytes and
//! batches written, the fsync latency histogram) for the process's status
//! and its `/metrics`.
//!
//! The histogram's buckets are fixed ([`FSYNC_BOUNDS_US`]) and each counts
//! only its own observations; a reader adds them up into Prometheus's
//! cumulative buckets, so a reading taken during an observation is still
//! monotonic (at worst it misses that observation, or has it in a bucket
//! but not yet in the sum).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::status::{LatencyHistogram, WalStatus};

/// Upper bounds of the fsync latency buckets, microseconds: 0.25 ms to 1 s.
pub const FSYNC_BOUNDS_US: [u64; 12] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
];

/// Counters of one WAL; shared by its writer task and its handles.
#[derive(Debug, Default)]
pub struct WalMetrics {
    bytes_written: AtomicU64,
    batches_written: AtomicU64,
    /// One per bound, plus one above the last.
    fsync_buckets: [AtomicU64; FSYNC_BOUNDS_US.len() + 1],
    fsync_sum_us: AtomicU64,
}

impl WalMetrics {
    /// Counts a written batch of `bytes`, and its duration if it was synced.
    pub fn record_batch(&self, bytes: u64, synced: Option<Duration>) {
        self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        self.batches_written.fetch_add(1, Ordering::Relaxed);
        if let Some(took) = synced {
            self.record_fsync(took);
        }
    }

    fn record_fsync(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = FSYNC_BOUNDS_US.partition_point(|bound| *bound < micros);
        if let Some(counter) = self.fsync_buckets.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.fsync_sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// A reading, as `wal` (`listener` or `drainer`).
    pub fn reading(&self, wal: &str) -> WalStatus {
        WalStatus {
            wal: wal.to_string(),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            batches_written: self.batches_written.load(Ordering::Relaxed),
            fsync: LatencyHistogram {
                bounds_us: FSYNC_BOUNDS_US.to_vec(),
                counts: self
                    .fsync_buckets
                    .iter()
                    .map(|count| count.load(Ordering::Relaxed))
                    .collect(),
                sum_us: self.fsync_sum_us.load(Ordering::Relaxed),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket() {
        let metrics = WalMetrics::default();
        metrics.record_batch(100, Some(Duration::from_micros(250)));
        metrics.record_batch(10, Some(Duration::from_micros(251)));
        metrics.record_batch(1, None);
        metrics.record_batch(0, Some(Duration::from_secs(5)));
        let reading = metrics.reading("listener");
        assert_eq!(reading.wal, "listener");
        assert_eq!(reading.bytes_written, 111);
        assert_eq!(reading.batches_written, 4);
        let counts = &reading.fsync.counts;
        assert_eq!(counts.len(), FSYNC_BOUNDS_US.len() + 1);
        assert_eq!(counts[0], 1, "{counts:?}");
        assert_eq!(counts[1], 1, "{counts:?}");
        assert_eq!(counts[FSYNC_BOUNDS_US.len()], 1, "{counts:?}");
        assert_eq!(counts.iter().sum::<u64>(), 3);
        assert_eq!(reading.fsync.sum_us, 250 + 251 + 5_000_000);
    }
}
