//! Tests of [`Wal`] on both storages, and a model test: random operations on
//! the in-memory and the RocksDB storage must give the same observable
//! results, and reads must return exactly what was appended. The model also
//! holds back the release of trimmed entries for a while (as a crash between
//! a trim and its release does) and reopens with that garbage stored.

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::config_units::{ByteSize, HumanDuration};
use crate::position::{LogId, PartitionId, ReplOffset};

fn source(offset: u64) -> SourcePosition {
    SourcePosition {
        replid: "a".repeat(40).into(),
        offset: ReplOffset(offset),
        db: 0,
    }
}

fn entry(payload: &[u8], created_unix_ms: u64) -> NewEntry {
    NewEntry {
        flags: 0,
        created_unix_ms: Some(created_unix_ms),
        source: source(created_unix_ms),
        payload: Bytes::copy_from_slice(payload),
    }
}

fn test_config(dir: &std::path::Path) -> WalConfig {
    WalConfig {
        // The tests drive retention themselves.
        retention_interval: HumanDuration(std::time::Duration::from_secs(3600)),
        ..WalConfig::with_dir(dir)
    }
}

/// Runs `body` once on the in-memory and once on the RocksDB storage.
async fn on_both<F, Fut>(config: impl Fn(&std::path::Path) -> WalConfig, body: F)
where
    F: Fn(Wal) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let mem = Wal::with_storage(Arc::new(MemWalStorage::new()), config(dir.path()))
        .await
        .unwrap();
    body(mem.clone()).await;
    mem.close().await.unwrap();
    let rocks = Wal::open(config(dir.path())).await.unwrap();
    body(rocks.clone()).await;
    rocks.close().await.unwrap();
}

const P1: PartitionId = PartitionId(1);
const P2: PartitionId = PartitionId(2);

#[tokio::test]
async fn appends_get_dense_ids_per_partition_and_read_back() {
    on_both(test_config, |wal| async move {
        let range = wal
            .append(P1, vec![entry(b"a", 10), entry(b"b", 11), entry(b"c", 12)])
            .await
            .unwrap();
        assert_eq!((range.first, range.last), (LogId(1), LogId(3)));
        let range = wal.append(P2, vec![entry(b"x", 5)]).await.unwrap();
        assert_eq!((range.first, range.last), (LogId(1), LogId(1)));
        let range = wal.append(P1, vec![entry(b"d", 9)]).await.unwrap();
        assert_eq!(range.first, LogId(4));

        let entries = wal.read(P1, LogId(2), ReadLimits::default()).unwrap();
        let payloads: Vec<&[u8]> = entries.iter().map(|e| &e.payload[..]).collect();
        assert_eq!(payloads, vec![&b"b"[..], b"c", b"d"]);
        // Creation times never go backwards within a partition.
        assert_eq!(entries[2].created_unix_ms, 12);
        assert_eq!(entries[2].source, source(9));
        assert!(wal
            .read(P1, LogId(5), ReadLimits::default())
            .unwrap()
            .is_empty());
        assert_eq!(wal.first_log_id(P1).unwrap(), Some(LogId(1)));
        assert_eq!(wal.last_log_id(P1).unwrap(), Some(LogId(4)));
        assert_eq!(wal.last_log_id(PartitionId(9)).unwrap(), None);
        assert_eq!(wal.partitions(), vec![P1, P2]);

        let positions = wal.positions(P1).unwrap().unwrap();
        assert_eq!(positions.durable, LogId(4));
        assert_eq!(positions.received, LogId(4));
        assert_eq!(positions.source, Some(source(9)));
        let expected_bytes: u64 = entries.iter().map(|e| e.stored_len).sum::<u64>()
            + wal.read(P1, LogId(1), ReadLimits::default()).unwrap()[0].stored_len;
        assert_eq!(positions.stored_bytes, expected_bytes);
    })
    .await;
}

#[tokio::test]
async fn reads_respect_limits_but_always_make_progress() {
    on_both(test_config, |wal| async move {
        let big = vec![7u8; 1000];
        wal.append(P1, (0..10).map(|i| entry(&big, i)).collect())
            .await
            .unwrap();
        let limits = ReadLimits {
            max_entries: 3,
            max_bytes: usize::MAX,
        };
        assert_eq!(wal.read(P1, LogId(1), limits).unwrap().len(), 3);
        let limits = ReadLimits {
            max_entries: 100,
            max_bytes: 2500,
        };
        assert_eq!(wal.read(P1, LogId(1), limits).unwrap().len(), 3);
        let limits = ReadLimits {
            max_entries: 100,
            max_bytes: 1,
        };
        assert_eq!(wal.read(P1, LogId(9), limits).unwrap().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn acks_and_applied_cannot_pass_durable() {
    on_both(test_config, |wal| async move {
        let drainer = DownstreamId::new("drainer-a").unwrap();
        wal.append(P1, vec![entry(b"a", 1), entry(b"b", 2)])
            .await
            .unwrap();
        let err = wal.ack(P1, drainer.clone(), LogId(1)).await.unwrap_err();
        assert!(matches!(err, WalError::UnknownDownstream { .. }), "{err}");
        wal.register_downstream(P1, drainer.clone()).await.unwrap();
        let err = wal.ack(P1, drainer.clone(), LogId(3)).await.unwrap_err();
        assert!(
            matches!(
                err,
                WalError::AckBeyondDurable {
                    ack: LogId(3),
                    durable: LogId(2),
                    ..
                }
            ),
            "{err}"
        );
        wal.ack(P1, drainer.clone(), LogId(2)).await.unwrap();
        // A stale ack does not move the position back.
        wal.ack(P1, drainer.clone(), LogId(1)).await.unwrap();
        let err = wal.set_applied(P1, LogId(5)).await.unwrap_err();
        assert!(
            matches!(
                err,
                WalError::ApplyBeyondDurable {
                    applied: LogId(5),
                    ..
                }
            ),
            "{err}"
        );
        wal.set_applied(P1, LogId(2)).await.unwrap();
        let positions = wal.positions(P1).unwrap().unwrap();
        assert_eq!(positions.acked, vec![(drainer, LogId(2))]);
        assert_eq!(positions.applied, LogId(2));
        let err = wal.trim(P1, LogId(4)).await.unwrap_err();
        assert!(matches!(err, WalError::TrimBeyondDurable { .. }), "{err}");
    })
    .await;
}

#[tokio::test]
async fn an_ack_racing_its_own_append_is_rejected_not_lost() {
    on_both(test_config, |wal| async move {
        let drainer = DownstreamId::new("d").unwrap();
        wal.register_downstream(P1, drainer.clone()).await.unwrap();
        // Both requests may land in one batch: the ack must still be checked
        // against what was durable before that batch.
        let (append, ack) = tokio::join!(
            wal.append(P1, vec![entry(b"a", 1)]),
            wal.ack(P1, drainer.clone(), LogId(1))
        );
        append.unwrap();
        if let Err(err) = ack {
            assert!(matches!(err, WalError::AckBeyondDurable { .. }), "{err}");
        }
        wal.ack(P1, drainer, LogId(1)).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn retention_keeps_unacked_entries_and_reports_trimmed_reads() {
    on_both(test_config, |wal| async move {
        let a = DownstreamId::new("a").unwrap();
        let b = DownstreamId::new("b").unwrap();
        let now = 1_000_000;
        wal.append(P1, (1..=5).map(|i| entry(b"x", now - 10 + i)).collect())
            .await
            .unwrap();
        wal.register_downstream(P1, a.clone()).await.unwrap();
        wal.register_downstream(P1, b.clone()).await.unwrap();
        assert!(wal.enforce_retention(now).await.unwrap().is_empty());
        wal.ack(P1, a.clone(), LogId(4)).await.unwrap();
        wal.ack(P1, b.clone(), LogId(2)).await.unwrap();
        assert_eq!(
            wal.enforce_retention(now).await.unwrap(),
            vec![(P1, LogId(3))]
        );
        let err = wal.read(P1, LogId(2), ReadLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                WalError::Trimmed {
                    wanted: LogId(2),
                    first_available: LogId(3),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            wal.read(P1, LogId(3), ReadLimits::default()).unwrap().len(),
            3
        );
        // A newly registered downstream starts at the first available entry.
        let c = DownstreamId::new("c").unwrap();
        wal.register_downstream(P1, c.clone()).await.unwrap();
        let positions = wal.positions(P1).unwrap().unwrap();
        assert!(positions.acked.contains(&(c, LogId(2))));
        // Once everybody acked everything, the log is empty but ids go on.
        wal.unregister_downstream(P1, DownstreamId::new("c").unwrap())
            .await
            .unwrap();
        wal.ack(P1, a, LogId(5)).await.unwrap();
        wal.ack(P1, b, LogId(5)).await.unwrap();
        assert_eq!(
            wal.enforce_retention(now).await.unwrap(),
            vec![(P1, LogId(6))]
        );
        assert_eq!(wal.first_log_id(P1).unwrap(), None);
        assert_eq!(wal.positions(P1).unwrap().unwrap().stored_bytes, 0);
        let range = wal.append(P1, vec![entry(b"y", now)]).await.unwrap();
        assert_eq!(range.first, LogId(6));
    })
    .await;
}

#[tokio::test]
async fn ttl_trims_unacked_entries_by_creation_time() {
    let config = |dir: &std::path::Path| WalConfig {
        wal_ttl: HumanDuration(std::time::Duration::from_secs(1)),
        ..test_config(dir)
    };
    on_both(config, |wal| async move {
        wal.register_downstream(P1, DownstreamId::new("slow").unwrap())
            .await
            .unwrap();
        wal.append(
            P1,
            vec![
                entry(b"1", 1_000),
                entry(b"2", 2_000),
                entry(b"3", 3_000),
                entry(b"4", 4_000),
            ],
        )
        .await
        .unwrap();
        // cutoff = 3_500 - 1_000: entries created before 2_500 expire.
        assert_eq!(
            wal.enforce_retention(3_500).await.unwrap(),
            vec![(P1, LogId(3))]
        );
        assert_eq!(
            wal.enforce_retention(60_000).await.unwrap(),
            vec![(P1, LogId(5))]
        );
    })
    .await;
}

#[tokio::test]
async fn size_cap_trims_the_oldest_entries() {
    let config = |dir: &std::path::Path| WalConfig {
        partition_size_cap: Some(ByteSize::kib(64)),
        ..test_config(dir)
    };
    on_both(config, |wal| async move {
        let payload = vec![1u8; 16 * 1024];
        wal.append(P1, (0..10).map(|i| entry(&payload, i)).collect())
            .await
            .unwrap();
        let now = 5;
        assert_eq!(
            wal.enforce_retention(now).await.unwrap(),
            vec![(P1, LogId(8))]
        );
        let positions = wal.positions(P1).unwrap().unwrap();
        assert!(positions.stored_bytes <= 64 * 1024);
        assert!(positions.stored_bytes > 32 * 1024);
    })
    .await;
}

#[tokio::test]
async fn snapshot_chunks_round_trip_and_delete() {
    on_both(test_config, |wal| async move {
        for seq in 0..5u64 {
            wal.put_snapshot_chunk(P1, 3, seq, Bytes::from(vec![seq as u8; 10]))
                .await
                .unwrap();
        }
        wal.put_snapshot_chunk(P1, 4, 0, Bytes::from_static(b"next"))
            .await
            .unwrap();
        let state = SnapshotState {
            epoch: 3,
            phase: SnapshotPhase::Complete,
        };
        wal.set_snapshot_state(P1, state).await.unwrap();
        let chunks = wal.read_snapshot_chunks(P1, 3, 2, 10).unwrap();
        assert_eq!(
            chunks.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(&chunks[0].1[..], &[2u8; 10]);
        wal.delete_snapshot(P1, 3).await.unwrap();
        assert!(wal.read_snapshot_chunks(P1, 3, 0, 10).unwrap().is_empty());
        assert_eq!(wal.read_snapshot_chunks(P1, 4, 0, 10).unwrap().len(), 1);
        assert_eq!(wal.positions(P1).unwrap().unwrap().snapshot, state);
    })
    .await;
}

#[tokio::test]
async fn concurrent_appenders_share_group_commits() {
    on_both(test_config, |wal| async move {
        let mut tasks = Vec::new();
        for task in 0..16u32 {
            let wal = wal.clone();
            tasks.push(tokio::spawn(async move {
                let partition = PartitionId(task % 4);
                let mut ids = Vec::new();
                for i in 0..20 {
                    let range = wal
                        .append(partition, vec![entry(format!("{task}-{i}").as_bytes(), 1)])
                        .await
                        .unwrap();
                    ids.push(range.first);
                }
                (partition, ids)
            }));
        }
        let mut per_partition: std::collections::BTreeMap<PartitionId, Vec<LogId>> =
            Default::default();
        for task in tasks {
            let (partition, ids) = task.await.unwrap();
            per_partition.entry(partition).or_default().extend(ids);
        }
        for (partition, mut ids) in per_partition {
            ids.sort();
            assert_eq!(ids, (1..=80).map(LogId).collect::<Vec<_>>());
            assert_eq!(
                wal.read(partition, LogId(1), ReadLimits::default())
                    .unwrap()
                    .len(),
                80
            );
        }
    })
    .await;
}

#[tokio::test]
async fn invalid_appends_are_rejected_without_side_effects() {
    on_both(test_config, |wal| async move {
        let err = wal.append(P1, Vec::new()).await.unwrap_err();
        assert!(matches!(err, WalError::InvalidEntry { .. }), "{err}");
        let mut bad = entry(b"x", 1);
        bad.source.replid = "r".repeat(MAX_REPLID_LEN + 1).into();
        let err = wal
            .append(P1, vec![entry(b"ok", 1), bad])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("replid"), "{err}");
        assert_eq!(wal.last_log_id(P1).unwrap(), None);
        assert!(wal.partitions().is_empty());
    })
    .await;
}

/// A WAL on an in-memory storage, without a read tail (reads go to the
/// storage, which tests then damage behind its back).
async fn untailed_mem_wal() -> (Arc<MemWalStorage>, Wal, tempfile::TempDir) {
    let storage = Arc::new(MemWalStorage::new());
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig {
        tail_bytes: ByteSize(0),
        ..test_config(dir.path())
    };
    let wal = Wal::with_storage(storage.clone(), config).await.unwrap();
    (storage, wal, dir)
}

#[tokio::test]
async fn corrupt_entries_in_memory_are_typed_errors() {
    // The storage is corrupted behind the WAL's back: read it, not the tail.
    let (storage, wal, _dir) = untailed_mem_wal().await;
    wal.append(P2, vec![entry(b"a", 1), entry(b"b", 1)])
        .await
        .unwrap();
    storage.overwrite_raw_entry(P2, LogId(2), vec![1, 2, 3, 4, 5, 6]);
    let err = wal.read(P2, LogId(1), ReadLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            WalError::Corrupt {
                partition: P2,
                log_id: LogId(2),
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn rocks_state_survives_reopen_and_ids_continue() {
    let dir = tempfile::tempdir().unwrap();
    let drainer = DownstreamId::new("d1").unwrap();
    {
        let wal = Wal::open(test_config(dir.path())).await.unwrap();
        wal.append(P1, vec![entry(b"a", 1), entry(b"b", 2), entry(b"c", 3)])
            .await
            .unwrap();
        wal.register_downstream(P1, drainer.clone()).await.unwrap();
        wal.ack(P1, drainer.clone(), LogId(2)).await.unwrap();
        wal.set_applied(P1, LogId(1)).await.unwrap();
        wal.trim(P1, LogId(2)).await.unwrap();
        wal.close().await.unwrap();
    }
    let wal = Wal::open(test_config(dir.path())).await.unwrap();
    let positions = wal.positions(P1).unwrap().unwrap();
    assert_eq!(positions.first_available, LogId(2));
    assert_eq!(positions.durable, LogId(3));
    assert_eq!(positions.applied, LogId(1));
    assert_eq!(positions.acked, vec![(drainer, LogId(2))]);
    assert_eq!(positions.source, Some(source(3)));
    let range = wal.append(P1, vec![entry(b"d", 4)]).await.unwrap();
    assert_eq!(range.first, LogId(4));
    let payloads: Vec<Bytes> = wal
        .read(P1, LogId(2), ReadLimits::default())
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(
        payloads,
        vec![Bytes::from("b"), Bytes::from("c"), Bytes::from("d")]
    );
    wal.close().await.unwrap();
}

#[tokio::test]
async fn writes_after_close_fail_with_closed() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(test_config(dir.path())).await.unwrap();
    let other = wal.clone();
    wal.close().await.unwrap();
    let err = other.append(P1, vec![entry(b"a", 1)]).await.unwrap_err();
    assert!(matches!(err, WalError::Closed), "{err}");
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    Append {
        partition: u32,
        sizes: Vec<usize>,
    },
    Register {
        partition: u32,
        downstream: u8,
    },
    Unregister {
        partition: u32,
        downstream: u8,
    },
    Ack {
        partition: u32,
        downstream: u8,
        log_id: u64,
    },
    Apply {
        partition: u32,
        log_id: u64,
    },
    Trim {
        partition: u32,
        before: u64,
    },
    Retain {
        now: u64,
    },
    Read {
        partition: u32,
        from: u64,
        max_entries: usize,
    },
    /// Hold back (`true`) or let through releases of trimmed entries; held
    /// releases are lost, like those of a process killed before them.
    HoldReleases(bool),
    /// Flush and compact the RocksDB logs (runs the compaction filter).
    Compact,
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let partition = 0u32..3;
    prop_oneof![
        4 => (partition.clone(), prop::collection::vec(0usize..300, 1..4))
            .prop_map(|(partition, sizes)| Op::Append { partition, sizes }),
        1 => (partition.clone(), 0u8..2)
            .prop_map(|(partition, downstream)| Op::Register { partition, downstream }),
        1 => (partition.clone(), 0u8..2)
            .prop_map(|(partition, downstream)| Op::Unregister { partition, downstream }),
        2 => (partition.clone(), 0u8..2, 0u64..16)
            .prop_map(|(partition, downstream, log_id)| Op::Ack { partition, downstream, log_id }),
        1 => (partition.clone(), 0u64..16).prop_map(|(partition, log_id)| Op::Apply { partition, log_id }),
        2 => (partition.clone(), 0u64..16).prop_map(|(partition, before)| Op::Trim { partition, before }),
        1 => (0u64..40).prop_map(|now| Op::Retain { now }),
        3 => (partition, 0u64..16, 1usize..6)
            .prop_map(|(partition, from, max_entries)| Op::Read { partition, from, max_entries }),
        1 => any::<bool>().prop_map(Op::HoldReleases),
        1 => Just(Op::Compact),
        2 => Just(Op::Reopen),
    ]
}

fn model_config(dir: &std::path::Path) -> WalConfig {
    WalConfig {
        wal_ttl: HumanDuration(std::time::Duration::from_secs(1)),
        partition_size_cap: Some(ByteSize::kib(64)),
        ..test_config(dir)
    }
}

/// Applies `op` and renders everything observable about it.
async fn run_op(wal: &Wal, op: &Op, counter: &mut u64) -> String {
    let downstream = |d: u8| DownstreamId::new(format!("d{d}")).unwrap();
    let result = match op {
        Op::Append { partition, sizes } => {
            let entries = sizes
                .iter()
                .map(|size| {
                    *counter += 1;
                    // Creation times are in seconds of the model clock so
                    // that TTL retention (1s) trims some of them.
                    entry(&vec![*counter as u8; *size], *counter * 100)
                })
                .collect();
            format!("{:?}", wal.append(PartitionId(*partition), entries).await)
        }
        Op::Register {
            partition,
            downstream: d,
        } => format!(
            "{:?}",
            wal.register_downstream(PartitionId(*partition), downstream(*d))
                .await
        ),
        Op::Unregister {
            partition,
            downstream: d,
        } => format!(
            "{:?}",
            wal.unregister_downstream(PartitionId(*partition), downstream(*d))
                .await
        ),
        Op::Ack {
            partition,
            downstream: d,
            log_id,
        } => format!(
            "{:?}",
            wal.ack(PartitionId(*partition), downstream(*d), LogId(*log_id))
                .await
        ),
        Op::Apply { partition, log_id } => format!(
            "{:?}",
            wal.set_applied(PartitionId(*partition), LogId(*log_id))
                .await
        ),
        Op::Trim { partition, before } => format!(
            "{:?}",
            wal.trim(PartitionId(*partition), LogId(*before)).await
        ),
        Op::Retain { now } => format!("{:?}", wal.enforce_retention(now * 100).await),
        Op::Read {
            partition,
            from,
            max_entries,
        } => {
            let limits = ReadLimits {
                max_entries: *max_entries,
                max_bytes: 600,
            };
            format!(
                "{:?}",
                wal.read(PartitionId(*partition), LogId(*from), limits)
            )
        }
        Op::HoldReleases(_) | Op::Compact | Op::Reopen => String::new(),
    };
    let positions: Vec<_> = wal
        .partitions()
        .into_iter()
        .map(|partition| wal.positions(partition).map_err(|e| e.to_string()))
        .collect();
    format!("{result} {positions:?}")
}

/// A storage in front of a real one, for what tests must control: it drops
/// releases of trimmed entries while `hold` is set (so that garbage below
/// `first` stays stored, and is reopened with), and reports `buffered` as
/// its write buffers' size when set.
struct ReleaseGate {
    inner: Arc<dyn WalStorage>,
    hold: Arc<std::sync::atomic::AtomicBool>,
    buffered: Option<std::sync::atomic::AtomicU64>,
    /// Every write's `sync` flag, when recorded.
    syncs: Option<std::sync::Mutex<Vec<bool>>>,
}

impl WalStorage for ReleaseGate {
    fn write(&self, ops: &[WriteOp], sync: bool) -> Result<(), WalError> {
        if let Some(syncs) = &self.syncs {
            syncs.lock().unwrap().push(sync);
        }
        self.inner.write(ops, sync)
    }

    fn read_entries(
        &self,
        partition: PartitionId,
        from: LogId,
        to: LogId,
        limits: ReadLimits,
    ) -> Result<Vec<WalEntry>, WalError> {
        self.inner.read_entries(partition, from, to, limits)
    }

    fn stored_bounds(
        &self,
        partition: PartitionId,
        from: LogId,
    ) -> Result<Option<(LogId, LogId)>, WalError> {
        self.inner.stored_bounds(partition, from)
    }

    fn release_trimmed(&self, partition: PartitionId, below: LogId) -> Result<(), WalError> {
        if self.hold.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.release_trimmed(partition, below)
    }

    fn log_partitions(&self) -> Result<Vec<PartitionId>, WalError> {
        self.inner.log_partitions()
    }

    fn read_snapshot_chunks(
        &self,
        partition: PartitionId,
        epoch: u64,
        from_seq: u64,
        max_chunks: usize,
    ) -> Result<Vec<(u64, Bytes)>, WalError> {
        self.inner
            .read_snapshot_chunks(partition, epoch, from_seq, max_chunks)
    }

    fn snapshot_epochs(&self, partition: PartitionId) -> Result<Vec<u64>, WalError> {
        self.inner.snapshot_epochs(partition)
    }

    fn load_progress(&self) -> Result<Vec<StoredPartition>, WalError> {
        self.inner.load_progress()
    }

    fn buffered_bytes(&self) -> Result<u64, WalError> {
        match &self.buffered {
            Some(buffered) => Ok(buffered.load(std::sync::atomic::Ordering::SeqCst)),
            None => self.inner.buffered_bytes(),
        }
    }
}

/// Opens the RocksDB WAL of `config` behind a [`ReleaseGate`]; the storage
/// is returned too (drop it before reopening).
async fn open_gated_rocks(
    config: WalConfig,
    hold: &Arc<std::sync::atomic::AtomicBool>,
) -> (Wal, Arc<RocksWalStorage>) {
    let config = config.validate().unwrap();
    let storage = Arc::new(RocksWalStorage::open(&config).unwrap());
    let gate = ReleaseGate {
        inner: storage.clone(),
        hold: Arc::clone(hold),
        buffered: None,
        syncs: None,
    };
    let wal = Wal::with_storage(Arc::new(gate), config).await.unwrap();
    (wal, storage)
}

async fn open_gated_mem(
    storage: &Arc<MemWalStorage>,
    config: WalConfig,
    hold: &Arc<std::sync::atomic::AtomicBool>,
) -> Wal {
    let gate = ReleaseGate {
        inner: storage.clone(),
        hold: Arc::clone(hold),
        buffered: None,
        syncs: None,
    };
    Wal::with_storage(Arc::new(gate), config).await.unwrap()
}

fn run_model(ops: &[Op]) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mem_storage: Arc<MemWalStorage> = Arc::new(MemWalStorage::new());
        let mut mem = open_gated_mem(&mem_storage, model_config(dir.path()), &hold).await;
        let (mut rocks, mut rocks_storage) =
            open_gated_rocks(model_config(dir.path()), &hold).await;
        // Reference: every payload appended per partition, by log id.
        let mut appended: std::collections::BTreeMap<(u32, u64), Bytes> = Default::default();
        let (mut mem_counter, mut rocks_counter) = (0, 0);
        for (step, op) in ops.iter().enumerate() {
            match op {
                Op::Reopen => {
                    mem.close().await.unwrap();
                    mem = open_gated_mem(&mem_storage, model_config(dir.path()), &hold).await;
                    rocks.close().await.unwrap();
                    drop(rocks_storage);
                    (rocks, rocks_storage) =
                        open_gated_rocks(model_config(dir.path()), &hold).await;
                }
                Op::HoldReleases(on) => hold.store(*on, std::sync::atomic::Ordering::SeqCst),
                Op::Compact => {
                    for partition in rocks.partitions() {
                        rocks_storage.compact_log(partition).unwrap();
                    }
                }
                _ => {}
            }
            let from_mem = run_op(&mem, op, &mut mem_counter).await;
            let from_rocks = run_op(&rocks, op, &mut rocks_counter).await;
            prop_assert_eq!(&from_mem, &from_rocks, "step {} {:?}", step, op);

            if let Op::Append { partition, sizes } = op {
                if let Some(last) = mem.last_log_id(PartitionId(*partition)).unwrap() {
                    let first = last.0 + 1 - sizes.len() as u64;
                    for (index, log_id) in (first..=last.0).enumerate() {
                        let value = (mem_counter - sizes.len() as u64 + 1 + index as u64) as u8;
                        appended
                            .insert((*partition, log_id), Bytes::from(vec![value; sizes[index]]));
                    }
                }
            }
            if let Op::Read {
                partition,
                from,
                max_entries,
            } = op
            {
                let limits = ReadLimits {
                    max_entries: *max_entries,
                    max_bytes: 600,
                };
                if let Ok(entries) = rocks.read(PartitionId(*partition), LogId(*from), limits) {
                    for read in entries {
                        prop_assert_eq!(
                            Some(&read.payload),
                            appended.get(&(*partition, read.log_id.0)),
                            "payload of {}/{}",
                            partition,
                            read.log_id
                        );
                    }
                }
            }
        }
        // Garbage never hides a hole: with releases let through, a reopen
        // drops what it can and both storages still agree on every entry.
        hold.store(false, std::sync::atomic::Ordering::SeqCst);
        mem.close().await.unwrap();
        rocks.close().await.unwrap();
        drop(rocks_storage);
        let mem = open_gated_mem(&mem_storage, model_config(dir.path()), &hold).await;
        let (rocks, rocks_storage) = open_gated_rocks(model_config(dir.path()), &hold).await;
        for partition in mem.partitions() {
            let first = mem.positions(partition).unwrap().unwrap().first_available;
            // Below first the mem storage holds nothing once released but
            // the block holding first.
            let spans = mem_storage.stored_spans(partition);
            prop_assert!(
                spans.iter().all(|(_, last)| *last >= first),
                "below {}: {:?}",
                first,
                spans
            );
            let limits = ReadLimits {
                max_entries: usize::MAX,
                max_bytes: usize::MAX,
            };
            prop_assert_eq!(
                format!("{:?}", mem.read(partition, first, limits)),
                format!("{:?}", rocks.read(partition, first, limits))
            );
        }
        mem.close().await.unwrap();
        rocks.close().await.unwrap();
        drop(rocks_storage);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn memory_and_rocksdb_storages_agree(ops in prop::collection::vec(op_strategy(), 1..40)) {
        run_model(&ops)?;
    }
}

/// Acks and applied marks alone are written without a fsync of their own
/// (advisory; durable with the next synced write); anything with them in
/// the same group commit, and everything else, is synced.
#[tokio::test]
async fn marks_alone_are_written_without_a_fsync() {
    let storage = Arc::new(ReleaseGate {
        inner: Arc::new(MemWalStorage::new()),
        hold: Arc::default(),
        buffered: None,
        syncs: Some(Default::default()),
    });
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::with_storage(storage.clone(), test_config(dir.path()))
        .await
        .unwrap();
    let synced = |storage: &ReleaseGate| {
        std::mem::take(&mut *storage.syncs.as_ref().unwrap().lock().unwrap())
    };
    let downstream = DownstreamId::new("d").unwrap();
    wal.register_downstream(P1, downstream.clone())
        .await
        .unwrap();
    wal.append(P1, vec![entry(b"a", 1), entry(b"b", 2)])
        .await
        .unwrap();
    assert!(synced(&storage).iter().all(|sync| *sync));
    wal.ack(P1, downstream.clone(), LogId(1)).await.unwrap();
    wal.set_applied(P1, LogId(1)).await.unwrap();
    assert_eq!(synced(&storage), vec![false, false]);
    // An append is synced whatever else its commit holds.
    let (ack, append) = tokio::join!(
        wal.ack(P1, downstream.clone(), LogId(2)),
        wal.append(P1, vec![entry(b"c", 3)])
    );
    ack.unwrap();
    append.unwrap();
    let syncs = synced(&storage);
    assert!(syncs.contains(&true), "{syncs:?}");
    // What they say is kept like any write.
    let positions = wal.positions(P1).unwrap().unwrap();
    assert_eq!(positions.applied, LogId(1));
    assert_eq!(positions.acked, vec![(downstream, LogId(2))]);
    wal.close().await.unwrap();
}

#[tokio::test]
async fn appends_stall_while_write_buffers_exceed_twice_the_budget() {
    use std::sync::atomic::Ordering;
    let storage = Arc::new(ReleaseGate {
        inner: Arc::new(MemWalStorage::new()),
        hold: Arc::default(),
        buffered: Some(std::sync::atomic::AtomicU64::new(0)),
        syncs: None,
    });
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let limit = config.memtable_budget.as_u64() * 2;
    let wal = Wal::with_storage(storage.clone(), config).await.unwrap();
    wal.append(P1, vec![entry(b"a", 1)]).await.unwrap();

    storage
        .buffered
        .as_ref()
        .unwrap()
        .store(limit + 1, Ordering::SeqCst);
    // Let the writer notice on its next periodic measurement.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let stalled = wal.clone();
    let append = tokio::spawn(async move { stalled.append(P1, vec![entry(b"b", 2)]).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!append.is_finished(), "append went through over the limit");
    assert_eq!(wal.last_log_id(P1).unwrap(), Some(LogId(1)));

    storage
        .buffered
        .as_ref()
        .unwrap()
        .store(limit, Ordering::SeqCst);
    let range = tokio::time::timeout(std::time::Duration::from_secs(5), append)
        .await
        .expect("append resumes once buffers drain")
        .unwrap()
        .unwrap();
    assert_eq!(range.first, LogId(2));
}

#[tokio::test]
async fn append_at_keeps_the_given_ids_and_refuses_gaps_and_replays() {
    on_both(test_config, |wal| async move {
        // A fresh partition takes id 1 only.
        let gap = wal.append_at(P1, LogId(3), vec![entry(b"x", 1)]).await;
        assert!(matches!(
            gap,
            Err(WalError::NotContiguous {
                expected: LogId(1),
                got: LogId(3),
                ..
            })
        ));
        let range = wal
            .append_at(P1, LogId(1), vec![entry(b"a", 10), entry(b"b", 11)])
            .await
            .unwrap();
        assert_eq!((range.first, range.last), (LogId(1), LogId(2)));
        let replay = wal.append_at(P1, LogId(2), vec![entry(b"b", 11)]).await;
        assert!(matches!(
            replay,
            Err(WalError::NotContiguous {
                expected: LogId(3),
                got: LogId(2),
                ..
            })
        ));
        wal.append_at(P1, LogId(3), vec![entry(b"c", 12)])
            .await
            .unwrap();
        // Plain appends continue after append_at's ids.
        assert_eq!(
            wal.append(P1, vec![entry(b"d", 13)]).await.unwrap().first,
            LogId(4)
        );
        let payloads: Vec<Bytes> = wal
            .read(P1, LogId(1), ReadLimits::default())
            .unwrap()
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(payloads, vec!["a", "b", "c", "d"]);
        // Refused appends left nothing behind.
        assert_eq!(wal.positions(P1).unwrap().unwrap().durable, LogId(4));
    })
    .await;
}

#[tokio::test]
async fn reset_partition_replaces_the_log_with_its_marker_atomically() {
    on_both(test_config, |wal| async move {
        let downstream = DownstreamId::new("drainer-a").unwrap();
        wal.register_downstream(P1, downstream.clone())
            .await
            .unwrap();
        wal.append(P1, (0..5).map(|i| entry(b"old", 10 + i)).collect())
            .await
            .unwrap();
        wal.ack(P1, downstream.clone(), LogId(3)).await.unwrap();
        wal.set_applied(P1, LogId(2)).await.unwrap();

        // Not past the log: refused, nothing changed.
        let behind = wal.reset_partition(P1, LogId(5), entry(b"m", 20)).await;
        assert!(matches!(
            behind,
            Err(WalError::ResetBehindLog {
                start: LogId(5),
                last: LogId(5),
                ..
            })
        ));
        assert_eq!(wal.first_log_id(P1).unwrap(), Some(LogId(1)));

        let range = wal
            .reset_partition(P1, LogId(40), entry(b"marker", 20))
            .await
            .unwrap();
        assert_eq!((range.first, range.last), (LogId(40), LogId(40)));
        let positions = wal.positions(P1).unwrap().unwrap();
        assert_eq!(positions.first_available, LogId(40));
        assert_eq!(positions.durable, LogId(40));
        // Marks stay where they were: below durable, not moved backwards.
        assert_eq!(positions.applied, LogId(2));
        assert_eq!(positions.acked, vec![(downstream, LogId(3))]);
        assert!(matches!(
            wal.read(P1, LogId(5), ReadLimits::default()),
            Err(WalError::Trimmed {
                first_available: LogId(40),
                ..
            })
        ));
        let entries = wal.read(P1, LogId(40), ReadLimits::default()).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(&entries[0].payload[..], b"marker");
        assert_eq!(entries[0].source, source(20));
        // Entries continue after the marker; gaps are still refused.
        assert!(wal
            .append_at(P1, LogId(42), vec![entry(b"x", 21)])
            .await
            .is_err());
        wal.append_at(P1, LogId(41), vec![entry(b"next", 21)])
            .await
            .unwrap();
        assert_eq!(wal.last_log_id(P1).unwrap(), Some(LogId(41)));
        // A reset of an empty partition just places the marker.
        let range = wal
            .reset_partition(P2, LogId(7), entry(b"m2", 1))
            .await
            .unwrap();
        assert_eq!(range.first, LogId(7));
        assert_eq!(wal.first_log_id(P2).unwrap(), Some(LogId(7)));
    })
    .await;
}

#[tokio::test]
async fn reset_partition_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(test_config(dir.path())).await.unwrap();
        wal.append(P1, (0..3).map(|i| entry(b"old", i)).collect())
            .await
            .unwrap();
        wal.reset_partition(P1, LogId(10), entry(b"marker", 5))
            .await
            .unwrap();
        wal.append_at(P1, LogId(11), vec![entry(b"after", 6)])
            .await
            .unwrap();
        wal.close().await.unwrap();
    }
    // Reopening checks the recovery invariants against the stored keys.
    let wal = Wal::open(test_config(dir.path())).await.unwrap();
    let positions = wal.positions(P1).unwrap().unwrap();
    assert_eq!(
        (positions.first_available, positions.durable),
        (LogId(10), LogId(11))
    );
    let payloads: Vec<Bytes> = wal
        .read(P1, LogId(10), ReadLimits::default())
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(payloads, vec!["marker", "after"]);
    assert_eq!(
        wal.append(P1, vec![entry(b"more", 7)]).await.unwrap().first,
        LogId(12)
    );
    wal.close().await.unwrap();
}

#[tokio::test]
async fn a_listener_history_is_created_once_and_kept_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let wal = Wal::open(test_config(dir.path())).await.unwrap();
        assert_eq!(wal.history(P1).unwrap(), None);
        let created = wal.open_history(P1, "listener-a").await.unwrap();
        assert_eq!(created.owner, "listener-a");
        assert_ne!(created.incarnation, 0);
        assert_eq!((created.id_base, created.epoch_base), (0, 0));
        // Taken up again (by the shipper, or under another name): unchanged.
        assert_eq!(wal.open_history(P1, "listener-b").await.unwrap(), created);
        wal.close().await.unwrap();
        created
    };
    let wal = Wal::open(test_config(dir.path())).await.unwrap();
    assert_eq!(wal.history(P1).unwrap(), Some(first.clone()));
    assert_eq!(wal.open_history(P1, "listener-a").await.unwrap(), first);
    wal.close().await.unwrap();
    // A rebuilt WAL dir is another history.
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(test_config(dir.path())).await.unwrap();
    let rebuilt = wal.open_history(P1, "listener-a").await.unwrap();
    assert_ne!(rebuilt.incarnation, first.incarnation);
    wal.close().await.unwrap();
}

#[tokio::test]
async fn a_drainer_partition_is_claimed_once_and_adopts_only_into_an_empty_log() {
    on_both(test_config, |wal| async move {
        // An applier's look creates an unclaimed record with a log tag.
        let unclaimed = wal.follow_history(P1, None, 0).await.unwrap();
        assert_eq!((unclaimed.owner.as_str(), unclaimed.incarnation), ("", 0));
        assert_ne!(unclaimed.log_tag, 0);
        // Another listener cannot take the incarnation of a claimed log.
        let claimed = wal.follow_history(P1, Some("listener-a"), 7).await.unwrap();
        assert_eq!(
            (claimed.owner.as_str(), claimed.incarnation),
            ("listener-a", 7)
        );
        assert_eq!(claimed.log_tag, unclaimed.log_tag);
        let refused = wal.follow_history(P1, Some("listener-b"), 8).await.unwrap();
        assert_eq!(refused, claimed);
        // A log with entries keeps the history it has.
        let other = wal.follow_history(P2, Some("listener-a"), 0).await.unwrap();
        assert_eq!(other.incarnation, 0);
        wal.append_at(P2, LogId(1), vec![entry(b"x", 1)])
            .await
            .unwrap();
        let kept = wal.follow_history(P2, Some("listener-a"), 9).await.unwrap();
        assert_eq!(kept.incarnation, 0);
        // A reset replaces it atomically with the marker.
        let next = PartitionHistory {
            incarnation: 9,
            id_base: 4,
            epoch_base: 2,
            ..kept.clone()
        };
        wal.reset_partition_to(P2, LogId(5), entry(b"marker", 2), Some(next.clone()))
            .await
            .unwrap();
        assert_eq!(wal.history(P2).unwrap(), Some(next.clone()));
        assert_eq!(wal.positions(P2).unwrap().unwrap().history, Some(next));
        let too_long = PartitionHistory {
            owner: "x".repeat(MAX_OWNER_LEN + 1),
            ..PartitionHistory::default()
        };
        assert!(matches!(
            wal.reset_partition_to(P2, LogId(9), entry(b"m", 3), Some(too_long))
                .await,
            Err(WalError::InvalidHistory { .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn subscribers_wake_after_appends_and_chunks_only() {
    on_both(test_config, |wal| async move {
        let mut appended_rx = wal.subscribe_appends();
        appended_rx.borrow_and_update();
        wal.register_downstream(P1, DownstreamId::new("d").unwrap())
            .await
            .unwrap();
        assert!(!appended_rx.has_changed().unwrap());
        wal.append(P1, vec![entry(b"a", 1)]).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), appended_rx.changed())
            .await
            .unwrap()
            .unwrap();
        appended_rx.borrow_and_update();
        wal.append_at(P1, LogId(2), vec![entry(b"b", 2)])
            .await
            .unwrap();
        assert!(appended_rx.has_changed().unwrap());
        // The drainer's paths: queued appends and partition resets.
        appended_rx.borrow_and_update();
        let pending = wal
            .submit_append_at(P1, LogId(3), vec![entry(b"c", 3)])
            .await
            .unwrap();
        pending.await.unwrap();
        assert!(appended_rx.has_changed().unwrap());
        appended_rx.borrow_and_update();
        wal.reset_partition(P1, LogId(10), entry(b"marker", 4))
            .await
            .unwrap();
        assert!(appended_rx.has_changed().unwrap());
        // Acks, applied marks and trims do not wake readers.
        appended_rx.borrow_and_update();
        wal.ack(P1, DownstreamId::new("d").unwrap(), LogId(10))
            .await
            .unwrap();
        wal.set_applied(P1, LogId(10)).await.unwrap();
        wal.trim(P1, LogId(10)).await.unwrap();
        assert!(!appended_rx.has_changed().unwrap());
        // Snapshot chunks do: a shipper sends a full resync's chunks while
        // they are stored.
        wal.put_snapshot_chunk(P1, 1, 0, Bytes::from_static(b"c"))
            .await
            .unwrap();
        assert!(appended_rx.has_changed().unwrap());
    })
    .await;
}

#[tokio::test]
async fn submitted_appends_resolve_in_order_and_a_failure_fails_the_rest() {
    on_both(test_config, |wal| async move {
        let first = wal
            .submit_append_at(P1, LogId(1), vec![entry(b"a", 1), entry(b"b", 2)])
            .await
            .unwrap();
        let second = wal
            .submit_append_at(P1, LogId(3), vec![entry(b"c", 3)])
            .await
            .unwrap();
        let gap = wal
            .submit_append_at(P1, LogId(9), vec![entry(b"x", 4)])
            .await
            .unwrap();
        let after_gap = wal
            .submit_append_at(P1, LogId(10), vec![entry(b"y", 5)])
            .await
            .unwrap();
        assert_eq!(first.await.unwrap().last, LogId(2));
        assert_eq!(second.await.unwrap().last, LogId(3));
        assert!(matches!(
            gap.await,
            Err(WalError::NotContiguous {
                expected: LogId(4),
                ..
            })
        ));
        assert!(after_gap.await.is_err());
        assert_eq!(wal.last_log_id(P1).unwrap(), Some(LogId(3)));
    })
    .await;
}

#[tokio::test]
async fn snapshot_epochs_are_listed_and_collected_except_kept_and_pinned() {
    on_both(test_config, |wal| async move {
        for epoch in [2u64, 3, 5, 9] {
            for seq in 0..3u64 {
                wal.put_snapshot_chunk(P1, epoch, seq, Bytes::from_static(b"chunk"))
                    .await
                    .unwrap();
            }
        }
        wal.put_snapshot_chunk(P2, 4, 0, Bytes::from_static(b"other"))
            .await
            .unwrap();
        assert_eq!(wal.snapshot_epochs(P1).unwrap(), vec![2, 3, 5, 9]);
        let pin = wal.pin_snapshot(P1, 3);
        let deleted = wal.collect_snapshots(P1, |epoch| epoch >= 9).await.unwrap();
        assert_eq!(deleted, vec![2, 5]);
        assert_eq!(wal.snapshot_epochs(P1).unwrap(), vec![3, 9]);
        assert_eq!(wal.read_snapshot_chunks(P1, 3, 0, 10).unwrap().len(), 3);
        drop(pin);
        let deleted = wal.collect_snapshots(P1, |epoch| epoch >= 9).await.unwrap();
        assert_eq!(deleted, vec![3]);
        assert_eq!(wal.snapshot_epochs(P1).unwrap(), vec![9]);
        assert_eq!(wal.snapshot_epochs(P2).unwrap(), vec![4]);
    })
    .await;
}

#[tokio::test]
async fn trimmed_entries_stay_as_garbage_until_released_then_go() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (wal, storage) = open_gated_rocks(test_config(dir.path()), &hold).await;
    // Ten blocks of ten entries: 1..=10, 11..=20, ...
    for block in 0..10 {
        wal.append(
            P1,
            (0..10).map(|i| entry(b"entry", block * 10 + i)).collect(),
        )
        .await
        .unwrap();
    }
    // A reset on another partition turns its old log into garbage too.
    wal.append(P2, (0..10).map(|i| entry(b"old", i)).collect())
        .await
        .unwrap();
    wal.reset_partition(P2, LogId(50), entry(b"marker", 20))
        .await
        .unwrap();
    assert_eq!(wal.trim(P1, LogId(61)).await.unwrap(), LogId(61));
    assert!(matches!(
        wal.read(P1, LogId(10), ReadLimits::default()),
        Err(WalError::Trimmed {
            first_available: LogId(61),
            ..
        })
    ));
    // Not released: the trim wrote no delete, and compactions keep them.
    storage.compact_log(P1).unwrap();
    assert_eq!(
        storage.stored_bounds(P1, LogId(1)).unwrap(),
        Some((LogId(1), LogId(100)))
    );
    wal.close().await.unwrap();
    drop(storage);

    // Reopening with the garbage stored (a crash before the release) is
    // consistent: ids below first are ignored.
    let (wal, storage) = open_gated_rocks(test_config(dir.path()), &hold).await;
    let positions = wal.positions(P1).unwrap().unwrap();
    assert_eq!(
        (positions.first_available, positions.durable),
        (LogId(61), LogId(100))
    );
    assert_eq!(
        storage.stored_bounds(P2, LogId(1)).unwrap(),
        Some((LogId(1), LogId(50)))
    );
    wal.close().await.unwrap();
    drop(storage);

    // Released at open: files below first go, the compaction filter drops
    // the rest, and everything from first on is intact.
    hold.store(false, Ordering::SeqCst);
    let (wal, storage) = open_gated_rocks(test_config(dir.path()), &hold).await;
    storage.compact_log(P1).unwrap();
    storage.compact_log(P2).unwrap();
    assert_eq!(
        storage.stored_bounds(P1, LogId(1)).unwrap(),
        Some((LogId(61), LogId(100)))
    );
    assert_eq!(
        storage.stored_bounds(P2, LogId(1)).unwrap(),
        Some((LogId(50), LogId(50)))
    );
    let entries = wal.read(P1, LogId(61), ReadLimits::default()).unwrap();
    assert_eq!(
        entries.iter().map(|e| e.log_id.0).collect::<Vec<_>>(),
        (61..=100).collect::<Vec<_>>()
    );
    // A trim with releases let through drops them without a reopen, but
    // not the block holding the new first id (81..=90 holds 85).
    wal.trim(P1, LogId(85)).await.unwrap();
    let entries = wal.read(P1, LogId(85), ReadLimits::default()).unwrap();
    assert_eq!(
        entries.iter().map(|e| e.log_id.0).collect::<Vec<_>>(),
        (85..=100).collect::<Vec<_>>()
    );
    wal.close().await.unwrap();
    storage.compact_log(P1).unwrap();
    assert_eq!(
        storage.stored_bounds(P1, LogId(1)).unwrap(),
        Some((LogId(81), LogId(100)))
    );
    assert_eq!(
        storage.stored_bounds(P1, LogId(85)).unwrap(),
        Some((LogId(85), LogId(100)))
    );
}

/// Every read, from every id, with tight and loose limits, answers the same
/// from a WAL with a read tail as from one without, across appends, a trim,
/// a reset of the log past its end and a reset to the id right after it.
#[tokio::test]
async fn reads_from_the_tail_equal_reads_from_the_storage() {
    let dir = tempfile::tempdir().unwrap();
    let open = |tail_bytes| {
        let config = WalConfig {
            tail_bytes: ByteSize(tail_bytes),
            ..test_config(dir.path())
        };
        Wal::with_storage(Arc::new(MemWalStorage::new()), config)
    };
    let tailed = open(1000).await.unwrap();
    let plain = open(0).await.unwrap();
    let compare = |step: &str| {
        let last = plain.last_log_id(P1).unwrap().unwrap_or(LogId::ZERO).0;
        for from in 0..=last + 2 {
            for limits in [
                ReadLimits::default(),
                ReadLimits {
                    max_entries: 3,
                    max_bytes: usize::MAX,
                },
                ReadLimits {
                    max_entries: 100,
                    max_bytes: 25,
                },
            ] {
                let a = tailed.read(P1, LogId(from), limits);
                let b = plain.read(P1, LogId(from), limits);
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "{step}: from {from}");
                let cached = tailed.read_cached(P1, LogId(from), limits);
                if let Some(cached) = cached {
                    assert_eq!(
                        format!("{cached:?}"),
                        format!("{b:?}"),
                        "{step}: cached {from}"
                    );
                }
            }
        }
    };
    let mut served = 0;
    for round in 0..6u64 {
        let batch: Vec<NewEntry> = (0..5)
            .map(|i| entry(format!("entry-{round}-{i}").as_bytes(), 10 + round))
            .collect();
        tailed.append(P1, batch.clone()).await.unwrap();
        plain.append(P1, batch).await.unwrap();
        compare(&format!("append {round}"));
        let last = tailed.last_log_id(P1).unwrap().unwrap();
        served += usize::from(
            tailed
                .read_cached(P1, last, ReadLimits::default())
                .is_some(),
        );
    }
    // The newest entries are held; the oldest are past the 1000 B cap.
    assert_eq!(served, 6);
    assert!(tailed
        .read_cached(P1, LogId(1), ReadLimits::default())
        .is_none());
    for wal in [&tailed, &plain] {
        wal.trim(P1, LogId(27)).await.unwrap();
    }
    compare("trim");
    for wal in [&tailed, &plain] {
        wal.reset_partition(P1, LogId(40), entry(b"marker-a", 30))
            .await
            .unwrap();
        wal.append(P1, vec![entry(b"after-a", 30)]).await.unwrap();
    }
    compare("reset past the end");
    for wal in [&tailed, &plain] {
        wal.reset_partition(P1, LogId(42), entry(b"marker-b", 31))
            .await
            .unwrap();
        wal.append(P1, vec![entry(b"after-b", 31), entry(b"more", 31)])
            .await
            .unwrap();
    }
    compare("reset right after the end");
    tailed.close().await.unwrap();
    plain.close().await.unwrap();
}

/// Data dirs written before blocks hold one entry per log value (format
/// 1): they are read as before, next to the blocks appended after them,
/// trimmed and released with them.
#[tokio::test]
async fn single_entry_values_of_format_1_read_next_to_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config = WalConfig {
        tail_bytes: ByteSize(0),
        ..test_config(dir.path())
    };
    let (wal, storage) = open_gated_rocks(config.clone(), &hold).await;
    for i in 0..5 {
        wal.append(P1, vec![entry(format!("old {i}").as_bytes(), i)])
            .await
            .unwrap();
    }
    let old = wal.read(P1, LogId(1), ReadLimits::default()).unwrap();
    // What an older version stored for them: a value of its own each.
    for entry in &old {
        storage
            .put_raw_log_value(P1, entry.log_id, &codec::encode_entry(entry))
            .unwrap();
    }
    wal.close().await.unwrap();
    drop(storage);

    let (wal, storage) = open_gated_rocks(config, &hold).await;
    wal.append(P1, (5..25).map(|i| entry(b"new", i)).collect())
        .await
        .unwrap();
    let read = wal.read(P1, LogId(1), ReadLimits::default()).unwrap();
    assert_eq!(read.len(), 25);
    for (expected, got) in old.iter().zip(&read) {
        assert_eq!(expected.payload, got.payload);
        assert_eq!(expected.source, got.source);
        assert_eq!(expected.stored_len, got.stored_len);
        assert_eq!(expected.bytes_end, got.bytes_end);
    }
    // The new entries are one block, and account the same sizes.
    for pair in read.windows(2) {
        assert_eq!(pair[1].bytes_end, pair[0].bytes_end + pair[1].stored_len);
    }
    let mid = wal
        .read(
            P1,
            LogId(4),
            ReadLimits {
                max_entries: 4,
                max_bytes: usize::MAX,
            },
        )
        .unwrap();
    assert_eq!(
        mid.iter().map(|e| e.log_id.0).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
    wal.trim(P1, LogId(7)).await.unwrap();
    wal.close().await.unwrap();
    storage.compact_log(P1).unwrap();
    assert_eq!(
        storage.stored_bounds(P1, LogId(1)).unwrap(),
        Some((LogId(6), LogId(25)))
    );
}

/// A damaged block is reported under its first id, whichever of its entries
/// a read asks for.
#[tokio::test]
async fn a_damaged_block_is_corrupt_for_every_entry_in_it() {
    let (storage, wal, _dir) = untailed_mem_wal().await;
    wal.append(P1, (0..10).map(|i| entry(b"entry", i)).collect())
        .await
        .unwrap();
    let mut value = Vec::new();
    let entries = wal.read(P1, LogId(1), ReadLimits::default()).unwrap();
    codec::encode_block_into(&entries, &mut value);
    let flip = value.len() / 2;
    value[flip] ^= 1;
    storage.overwrite_raw_entry(P1, LogId(1), value);
    for from in [1, 5, 10] {
        let err = wal
            .read(P1, LogId(from), ReadLimits::default())
            .unwrap_err();
        assert!(
            matches!(
                err,
                WalError::Corrupt {
                    partition: P1,
                    log_id: LogId(1),
                    ..
                }
            ),
            "from {from}: {err}"
        );
    }
}
