//! [`NodeStatus`] and [`SyncSelector`] to their protobuf messages and back.
//!
//! Both directions are lossless: every field maps to a field of the same
//! name and type, `Option` to proto3 `optional`. The conversions destructure
//! the Rust structs without `..`, so a field added to `src/status.rs`
//! without a wire counterpart is a compile error here rather than a silently
//! dropped column.

use crate::record::pb;
use crate::status::{
    BlockedEntry, DrainerSide, LatencyHistogram, ListenerSide, NodeStatus, RefusedCommand,
    ShipSide, SkipOutcome, SkipRequest, SnapshotLoad, SourceShard, SwitchStep, SwitchoverReport,
    SyncSelector, TwoWayStatus, WalStatus,
};

impl From<NodeStatus> for pb::NodeStatus {
    fn from(status: NodeStatus) -> Self {
        let NodeStatus {
            role,
            taken_unix_ms,
            listeners,
            drainers,
            two_way,
            wals,
        } = status;
        pb::NodeStatus {
            role,
            taken_unix_ms,
            listeners: listeners.into_iter().map(Into::into).collect(),
            drainers: drainers.into_iter().map(Into::into).collect(),
            two_way: two_way.map(|t| pb::TwoWayStatus {
                conflicts: t.conflicts,
                last_conflict: t.last_conflict,
                conflict_log: t.conflict_log,
                unexamined: t.unexamined,
                policy: t.policy,
                repaired: t.repaired,
                repairs_owed: t.repairs_owed,
                pair: t.pair,
            }),
            wals: wals.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::NodeStatus> for NodeStatus {
    fn from(status: pb::NodeStatus) -> Self {
        let pb::NodeStatus {
            role,
            taken_unix_ms,
            listeners,
            drainers,
            two_way,
            wals,
        } = status;
        NodeStatus {
            role,
            taken_unix_ms,
            listeners: listeners.into_iter().map(Into::into).collect(),
            drainers: drainers.into_iter().map(Into::into).collect(),
            two_way: two_way.map(|t| TwoWayStatus {
                conflicts: t.conflicts,
                last_conflict: t.last_conflict,
                conflict_log: t.conflict_log,
                unexamined: t.unexamined,
                policy: t.policy,
                repaired: t.repaired,
                repairs_owed: t.repairs_owed,
                pair: t.pair,
            }),
            wals: wals.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<WalStatus> for pb::WalStatus {
    fn from(wal: WalStatus) -> Self {
        let WalStatus {
            wal,
            bytes_written,
            batches_written,
            fsync,
        } = wal;
        let LatencyHistogram {
            bounds_us,
            counts,
            sum_us,
        } = fsync;
        pb::WalStatus {
            wal,
            bytes_written,
            batches_written,
            fsync: Some(pb::LatencyHistogram {
                bounds_us,
                counts,
                sum_us,
            }),
        }
    }
}

impl From<pb::WalStatus> for WalStatus {
    fn from(wal: pb::WalStatus) -> Self {
        let pb::WalStatus {
            wal,
            bytes_written,
            batches_written,
            fsync,
        } = wal;
        let fsync = fsync.unwrap_or_default();
        WalStatus {
            wal,
            bytes_written,
            batches_written,
            fsync: LatencyHistogram {
                bounds_us: fsync.bounds_us,
                counts: fsync.counts,
                sum_us: fsync.sum_us,
            },
        }
    }
}

impl From<ListenerSide> for pb::ListenerSide {
    fn from(side: ListenerSide) -> Self {
        let ListenerSide {
            listener_id,
            partition,
            source,
            source_state,
            source_error,
            replid,
            received_offset,
            durable_offset,
            first_log_id,
            last_log_id,
            full_syncs,
            partial_resyncs,
            full_sync_bytes_received,
            full_sync_bytes_total,
            heartbeat_latency_ms,
            reconnects,
            shipping,
            shard,
        } = side;
        pb::ListenerSide {
            shard: shard.map(|shard| pb::SourceShard {
                master_id: shard.master_id,
                slots: shard.slots,
                slot_count: shard.slot_count,
                pending_handoffs: shard.pending_handoffs,
            }),
            listener_id,
            partition,
            source,
            source_state,
            source_error,
            replid,
            received_offset,
            durable_offset,
            first_log_id,
            last_log_id,
            full_syncs,
            partial_resyncs,
            full_sync_bytes_received,
            full_sync_bytes_total,
            heartbeat_latency_ms,
            reconnects,
            shipping: shipping.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::ListenerSide> for ListenerSide {
    fn from(side: pb::ListenerSide) -> Self {
        let pb::ListenerSide {
            listener_id,
            partition,
            source,
            source_state,
            source_error,
            replid,
            received_offset,
            durable_offset,
            first_log_id,
            last_log_id,
            full_syncs,
            partial_resyncs,
            full_sync_bytes_received,
            full_sync_bytes_total,
            heartbeat_latency_ms,
            reconnects,
            shipping,
            shard,
        } = side;
        ListenerSide {
            shard: shard.map(|shard| SourceShard {
                master_id: shard.master_id,
                slots: shard.slots,
                slot_count: shard.slot_count,
                pending_handoffs: shard.pending_handoffs,
            }),
            listener_id,
            partition,
            source,
            source_state,
            source_error,
            replid,
            received_offset,
            durable_offset,
            first_log_id,
            last_log_id,
            full_syncs,
            partial_resyncs,
            full_sync_bytes_received,
            full_sync_bytes_total,
            heartbeat_latency_ms,
            reconnects,
            shipping: shipping.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<ShipSide> for pb::ShipSide {
    fn from(side: ShipSide) -> Self {
        let ShipSide {
            drainer_id,
            endpoint,
            state,
            acked,
            lag,
            latency_ms,
            fallback_snapshots,
            entries_sent,
            bytes_sent,
            last_error,
            reconnects,
        } = side;
        pb::ShipSide {
            drainer_id,
            endpoint,
            state,
            acked,
            lag,
            latency_ms,
            fallback_snapshots,
            entries_sent,
            bytes_sent,
            last_error,
            reconnects,
        }
    }
}

impl From<pb::ShipSide> for ShipSide {
    fn from(side: pb::ShipSide) -> Self {
        let pb::ShipSide {
            drainer_id,
            endpoint,
            state,
            acked,
            lag,
            latency_ms,
            fallback_snapshots,
            entries_sent,
            bytes_sent,
            last_error,
            reconnects,
        } = side;
        ShipSide {
            drainer_id,
            endpoint,
            state,
            acked,
            lag,
            latency_ms,
            fallback_snapshots,
            entries_sent,
            bytes_sent,
            last_error,
            reconnects,
        }
    }
}

impl From<DrainerSide> for pb::DrainerSide {
    fn from(side: DrainerSide) -> Self {
        let DrainerSide {
            drainer_id,
            partition,
            target,
            state,
            last_error,
            connected_listener,
            durable,
            applied,
            lag,
            latency_ms,
            epoch,
            commands_applied,
            commands_refused,
            snapshot_load,
            blocked,
            entries_skipped,
            last_skipped,
            dead_letter_file,
            fence,
            last_refused,
            split_entries,
            echoes,
            cluster,
            handoff,
            voided,
            fallback_snapshots,
            foreign_writes,
            foreign_windows,
            foreign_samples,
            reconnects,
        } = side;
        pb::DrainerSide {
            drainer_id,
            partition,
            target,
            state,
            last_error,
            connected_listener,
            durable,
            applied,
            lag,
            latency_ms,
            epoch,
            commands_applied,
            commands_refused,
            snapshot_load: snapshot_load.map(Into::into),
            blocked: blocked.map(Into::into),
            entries_skipped,
            last_skipped,
            dead_letter_file,
            fence,
            last_refused: last_refused.map(Into::into),
            split_entries,
            echoes,
            cluster,
            handoff,
            voided,
            fallback_snapshots,
            foreign_writes,
            foreign_windows,
            foreign_samples,
            reconnects,
        }
    }
}

impl From<pb::DrainerSide> for DrainerSide {
    fn from(side: pb::DrainerSide) -> Self {
        let pb::DrainerSide {
            drainer_id,
            partition,
            target,
            state,
            last_error,
            connected_listener,
            durable,
            applied,
            lag,
            latency_ms,
            epoch,
            commands_applied,
            commands_refused,
            snapshot_load,
            blocked,
            entries_skipped,
            last_skipped,
            dead_letter_file,
            fence,
            last_refused,
            split_entries,
            echoes,
            cluster,
            handoff,
            voided,
            fallback_snapshots,
            foreign_writes,
            foreign_windows,
            foreign_samples,
            reconnects,
        } = side;
        DrainerSide {
            drainer_id,
            partition,
            target,
            state,
            last_error,
            connected_listener,
            durable,
            applied,
            lag,
            latency_ms,
            epoch,
            commands_applied,
            commands_refused,
            snapshot_load: snapshot_load.map(Into::into),
            blocked: blocked.map(Into::into),
            entries_skipped,
            last_skipped,
            dead_letter_file,
            fence,
            last_refused: last_refused.map(Into::into),
            split_entries,
            echoes,
            cluster,
            handoff,
            voided,
            fallback_snapshots,
            foreign_writes,
            foreign_windows,
            foreign_samples,
            reconnects,
        }
    }
}

impl From<SnapshotLoad> for pb::SnapshotLoad {
    fn from(load: SnapshotLoad) -> Self {
        let SnapshotLoad {
            epoch,
            rdb_bytes,
            bytes_loaded,
            keys_loaded,
            done,
        } = load;
        pb::SnapshotLoad {
            epoch,
            rdb_bytes,
            bytes_loaded,
            keys_loaded,
            done,
        }
    }
}

impl From<pb::SnapshotLoad> for SnapshotLoad {
    fn from(load: pb::SnapshotLoad) -> Self {
        let pb::SnapshotLoad {
            epoch,
            rdb_bytes,
            bytes_loaded,
            keys_loaded,
            done,
        } = load;
        SnapshotLoad {
            epoch,
            rdb_bytes,
            bytes_loaded,
            keys_loaded,
            done,
        }
    }
}

impl From<BlockedEntry> for pb::BlockedEntry {
    fn from(entry: BlockedEntry) -> Self {
        let BlockedEntry {
            log_id,
            command,
            error,
            transient,
            since_unix_ms,
        } = entry;
        pb::BlockedEntry {
            log_id,
            command,
            error,
            transient,
            since_unix_ms,
        }
    }
}

impl From<pb::BlockedEntry> for BlockedEntry {
    fn from(entry: pb::BlockedEntry) -> Self {
        let pb::BlockedEntry {
            log_id,
            command,
            error,
            transient,
            since_unix_ms,
        } = entry;
        BlockedEntry {
            log_id,
            command,
            error,
            transient,
            since_unix_ms,
        }
    }
}

impl From<RefusedCommand> for pb::RefusedCommand {
    fn from(refused: RefusedCommand) -> Self {
        let RefusedCommand {
            log_id,
            command,
            error,
        } = refused;
        pb::RefusedCommand {
            log_id,
            command,
            error,
        }
    }
}

impl From<pb::RefusedCommand> for RefusedCommand {
    fn from(refused: pb::RefusedCommand) -> Self {
        let pb::RefusedCommand {
            log_id,
            command,
            error,
        } = refused;
        RefusedCommand {
            log_id,
            command,
            error,
        }
    }
}

impl From<SkipRequest> for pb::SkipRequest {
    fn from(request: SkipRequest) -> Self {
        let SkipRequest {
            partition,
            log_id,
            drainer_id,
        } = request;
        pb::SkipRequest {
            partition,
            log_id,
            drainer_id,
        }
    }
}

impl From<pb::SkipRequest> for SkipRequest {
    fn from(request: pb::SkipRequest) -> Self {
        let pb::SkipRequest {
            partition,
            log_id,
            drainer_id,
        } = request;
        SkipRequest {
            partition,
            log_id,
            drainer_id,
        }
    }
}

impl From<SkipOutcome> for pb::SkipReply {
    fn from(outcome: SkipOutcome) -> Self {
        let SkipOutcome {
            dead_letter_file,
            done,
        } = outcome;
        pb::SkipReply {
            dead_letter_file,
            done,
        }
    }
}

impl From<SwitchoverReport> for pb::SwitchoverReply {
    fn from(report: SwitchoverReport) -> Self {
        let SwitchoverReport {
            steps,
            error,
            source,
            target,
            write_pause_ms,
        } = report;
        pb::SwitchoverReply {
            steps: steps
                .into_iter()
                .map(
                    |SwitchStep {
                         name,
                         millis,
                         detail,
                     }| pb::SwitchStep {
                        name,
                        millis,
                        detail,
                    },
                )
                .collect(),
            error,
            source,
            target,
            write_pause_ms,
        }
    }
}

impl From<pb::SwitchoverReply> for SwitchoverReport {
    fn from(reply: pb::SwitchoverReply) -> Self {
        let pb::SwitchoverReply {
            steps,
            error,
            source,
            target,
            write_pause_ms,
        } = reply;
        SwitchoverReport {
            steps: steps
                .into_iter()
                .map(
                    |pb::SwitchStep {
                         name,
                         millis,
                         detail,
                     }| SwitchStep {
                        name,
                        millis,
                        detail,
                    },
                )
                .collect(),
            error,
            source,
            target,
            write_pause_ms,
        }
    }
}

impl From<pb::SkipReply> for SkipOutcome {
    fn from(reply: pb::SkipReply) -> Self {
        let pb::SkipReply {
            dead_letter_file,
            done,
        } = reply;
        SkipOutcome {
            dead_letter_file,
            done,
        }
    }
}

impl From<SyncSelector> for pb::SyncSelector {
    fn from(selector: SyncSelector) -> Self {
        let SyncSelector {
            partition,
            drainer_id,
        } = selector;
        pb::SyncSelector {
            partition,
            drainer_id,
        }
    }
}

impl From<pb::SyncSelector> for SyncSelector {
    fn from(selector: pb::SyncSelector) -> Self {
        let pb::SyncSelector {
            partition,
            drainer_id,
        } = selector;
        SyncSelector {
            partition,
            drainer_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// A status with every field set to a distinct non-default value, and
    /// every `Option` both ways across the rows.
    fn full_status() -> NodeStatus {
        NodeStatus {
            role: "sync".into(),
            taken_unix_ms: 1_700_000_000_123,
            two_way: Some(TwoWayStatus {
                conflicts: 4,
                last_conflict: Some("db 0 \"k\"".into()),
                conflict_log: "/d/conflicts.jsonl".into(),
                unexamined: 1,
                policy: "source-wins".into(),
                repaired: 3,
                repairs_owed: 1,
                pair: "clusters".into(),
            }),
            listeners: vec![
                ListenerSide {
                    listener_id: "l1".into(),
                    partition: 3,
                    source: "127.0.0.1:6379".into(),
                    shard: Some(SourceShard {
                        master_id: "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca".into(),
                        slots: "0-5460,5462".into(),
                        slot_count: 5462,
                        pending_handoffs: vec![
                            "slot 42 to partition 1 (generation 1) at source offset 9".into(),
                        ],
                    }),
                    source_state: "FULL_SYNC".into(),
                    source_error: Some("connection reset".into()),
                    replid: Some("8f3c".repeat(10)),
                    received_offset: 11,
                    durable_offset: 10,
                    first_log_id: 2,
                    last_log_id: 9,
                    full_syncs: 4,
                    partial_resyncs: 5,
                    full_sync_bytes_received: 6,
                    full_sync_bytes_total: Some(7),
                    heartbeat_latency_ms: Some(8),
                    reconnects: 9,
                    shipping: vec![
                        ShipSide {
                            drainer_id: "d1".into(),
                            endpoint: "http://127.0.0.1:9000".into(),
                            state: "STOPPED".into(),
                            acked: 12,
                            lag: 13,
                            latency_ms: 14,
                            fallback_snapshots: 15,
                            entries_sent: 16,
                            bytes_sent: 17,
                            last_error: Some("refused".into()),
                            reconnects: 18,
                        },
                        ShipSide {
                            drainer_id: "d2".into(),
                            state: "ONLINE".into(),
                            last_error: None,
                            ..ShipSide::default()
                        },
                    ],
                },
                ListenerSide {
                    listener_id: "l1".into(),
                    partition: u32::MAX,
                    received_offset: u64::MAX,
                    source_error: None,
                    replid: None,
                    full_sync_bytes_total: None,
                    heartbeat_latency_ms: None,
                    ..ListenerSide::default()
                },
            ],
            drainers: vec![
                DrainerSide {
                    drainer_id: "d1".into(),
                    partition: 3,
                    target: "127.0.0.1:6380".into(),
                    state: "OFFLINE".into(),
                    last_error: Some("READONLY".into()),
                    connected_listener: Some("l1".into()),
                    durable: 21,
                    applied: 20,
                    lag: 1,
                    latency_ms: 22,
                    epoch: 23,
                    commands_applied: 24,
                    commands_refused: 25,
                    snapshot_load: Some(SnapshotLoad {
                        epoch: 23,
                        rdb_bytes: 26,
                        bytes_loaded: 27,
                        keys_loaded: 28,
                        done: true,
                    }),
                    blocked: Some(BlockedEntry {
                        log_id: 29,
                        command: "LPUSH".into(),
                        error: "ERR unknown command 'LPUSH'".into(),
                        transient: true,
                        since_unix_ms: 30,
                    }),
                    entries_skipped: 31,
                    last_skipped: Some(32),
                    dead_letter_file: Some("/d/dead-letter/d1-3.resp".into()),
                    fence: Some("client-kill".into()),
                    split_entries: 34,
                    echoes: 35,
                    fallback_snapshots: 2,
                    foreign_writes: 3,
                    foreign_windows: 7,
                    foreign_samples: vec!["db 0 SET \"k\" by 10.0.0.2:2 (app)".into()],
                    cluster: Some("cluster: 3 masters".into()),
                    handoff: Some("entry 35 waits for slot 7".into()),
                    voided: Some("3 entries of aborted slot imports skipped".into()),
                    last_refused: Some(RefusedCommand {
                        log_id: 33,
                        command: "SET".into(),
                        error: "WRONGTYPE".into(),
                    }),
                    reconnects: 36,
                },
                DrainerSide {
                    drainer_id: "d1".into(),
                    partition: 0,
                    last_error: None,
                    connected_listener: None,
                    snapshot_load: None,
                    blocked: None,
                    last_skipped: None,
                    dead_letter_file: None,
                    fence: None,
                    last_refused: None,
                    ..DrainerSide::default()
                },
            ],
            wals: vec![
                WalStatus {
                    wal: "listener".into(),
                    bytes_written: 40,
                    batches_written: 41,
                    fsync: LatencyHistogram {
                        bounds_us: vec![250, 1000],
                        counts: vec![42, 43, 44],
                        sum_us: 45,
                    },
                },
                WalStatus {
                    wal: "drainer".into(),
                    ..WalStatus::default()
                },
            ],
        }
    }

    #[test]
    fn status_round_trips_through_protobuf_bytes() {
        let status = full_status();
        let wire = pb::NodeStatus::from(status.clone()).encode_to_vec();
        let decoded = pb::NodeStatus::decode(wire.as_slice()).unwrap();
        assert_eq!(NodeStatus::from(decoded), status);
    }

    #[test]
    fn optional_fields_stay_distinct_from_defaults() {
        // `Some(0)` / `Some("")` must not collapse into `None` on the wire.
        let mut status = full_status();
        status.listeners[0].full_sync_bytes_total = Some(0);
        status.listeners[0].replid = Some(String::new());
        status.drainers[0].snapshot_load = Some(SnapshotLoad::default());
        let wire = pb::NodeStatus::from(status.clone()).encode_to_vec();
        let back = NodeStatus::from(pb::NodeStatus::decode(wire.as_slice()).unwrap());
        assert_eq!(back, status);
        assert_eq!(back.listeners[0].full_sync_bytes_total, Some(0));
        assert_eq!(back.listeners[1].full_sync_bytes_total, None);
    }

    #[test]
    fn skip_request_and_reply_round_trip() {
        for request in [
            SkipRequest {
                partition: 3,
                log_id: 42,
                drainer_id: Some("d1".into()),
            },
            SkipRequest {
                partition: 0,
                log_id: u64::MAX,
                drainer_id: None,
            },
        ] {
            let wire = pb::SkipRequest::from(request.clone()).encode_to_vec();
            let back = SkipRequest::from(pb::SkipRequest::decode(wire.as_slice()).unwrap());
            assert_eq!(back, request);
        }
        let outcome = SkipOutcome {
            dead_letter_file: "/d/x.resp".into(),
            done: true,
        };
        let wire = pb::SkipReply::from(outcome.clone()).encode_to_vec();
        let back = SkipOutcome::from(pb::SkipReply::decode(wire.as_slice()).unwrap());
        assert_eq!(back, outcome);
    }

    #[test]
    fn selector_round_trips() {
        for selector in [
            SyncSelector::default(),
            SyncSelector {
                partition: Some(0),
                drainer_id: None,
            },
            SyncSelector {
                partition: None,
                drainer_id: Some(String::new()),
            },
            SyncSelector {
                partition: Some(7),
                drainer_id: Some("d1".into()),
            },
        ] {
            let wire = pb::SyncSelector::from(selector.clone()).encode_to_vec();
            let back = SyncSelector::from(pb::SyncSelector::decode(wire.as_slice()).unwrap());
            assert_eq!(back, selector);
        }
    }
}
