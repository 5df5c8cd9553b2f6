//! [`RocksWalStorage`]: the [`WalStorage`] on RocksDB (format in `wal/mod.rs`).
//!
//! In: batches of [`WriteOp`]s, written as one `WriteBatch` (fsynced when
//! asked). Out: entries, snapshot chunks and progress read back, with
//! corruption reported as typed errors.
//!
//! Memory stays bounded with many partitions: all column families share one
//! memtable budget (`db_write_buffer_size`, RocksDB's write buffer manager),
//! have small memtables of their own, share one LRU block cache, and RocksDB's
//! own WAL is capped (`max_total_wal_size`), which forces flushes of column
//! families that pin old WAL files.
//!
//! Trims write no range tombstones (module doc of `wal/mod.rs`, invariant
//! 2): once a trim is durable and published, [`WalStorage::release_trimmed`]
//! raises the partition's `trimmed_below` mark, which a compaction filter on
//! its log column family uses to drop the ids below it, and drops the SST
//! files that hold only such ids. Log keys only grow, so without tombstones
//! the flushed files of a log do not overlap and compactions move them down
//! instead of rewriting them.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rocksdb::compaction_filter::{CompactionFilter, Decision};
use rocksdb::compaction_filter_factory::{CompactionFilterContext, CompactionFilterFactory};
use rocksdb::{
    BlockBasedOptions, BoundColumnFamily, Cache, ColumnFamilyDescriptor, DBCompressionType,
    DBRecoveryMode, DBWithThreadMode, MultiThreaded, Options, ReadOptions, WriteBatch,
    WriteOptions,
};
use tracing::{info, warn};

use super::codec;
use super::storage::{
    decode_meta_records, start_key, stored_ops, EntryCollector, Stored, StoredPartition,
    WalStorage, WriteOp,
};
use super::{ReadLimits, WalConfig, WalEntry, WalError};
use crate::position::{LogId, PartitionId};

type Db = DBWithThreadMode<MultiThreaded>;

const META_CF: &str = "meta";
const ARENA_BLOCK_SIZE: usize = 64 << 10;
/// Table files kept open; more are reopened through the table cache, so the
/// process stays well within common file descriptor limits.
const MAX_OPEN_FILES: i32 = 512;
/// L0 files of a log column family before they are compacted.
const LOG_L0_COMPACTION_TRIGGER: i32 = 8;

/// RocksDB-backed WAL storage; one instance per data dir.
pub struct RocksWalStorage {
    db: Db,
    cf_options: Options,
    /// What the options of a new log column family are built from (each
    /// gets its own compaction filter).
    config: WalConfig,
    cache: Cache,
    /// Partitions with a log column family; guarded so that creation is
    /// check-then-create without races.
    log_partitions: Mutex<BTreeSet<PartitionId>>,
    /// Per partition, the id below which stored entries are garbage (the
    /// durable first id last released); read by the compaction filter.
    trimmed_below: Mutex<HashMap<PartitionId, Arc<AtomicU64>>>,
    /// Whether a batch was written without sync since the last release:
    /// then the trim's meta may not be on disk yet, and dropping entries
    /// before it is would break invariant 2 after a crash.
    unsynced_writes: AtomicBool,
    path: PathBuf,
}

/// Makes one [`TrimmedFilter`] per compaction of a log column family.
struct TrimmedFilterFactory {
    trimmed_below: Arc<AtomicU64>,
}

/// Drops log entries below the partition's released first id. The mark is
/// read once per compaction: a mark raised meanwhile only means some
/// garbage survives until the next compaction or file deletion.
struct TrimmedFilter {
    below: u64,
}

const TRIMMED_FILTER_NAME: &CStr = c"ferry-trimmed-log-entries";

impl CompactionFilterFactory for TrimmedFilterFactory {
    type Filter = TrimmedFilter;

    fn create(&mut self, _context: CompactionFilterContext) -> TrimmedFilter {
        TrimmedFilter {
            below: self.trimmed_below.load(Ordering::Acquire),
        }
    }

    fn name(&self) -> &CStr {
        TRIMMED_FILTER_NAME
    }
}

impl CompactionFilter for TrimmedFilter {
    fn filter(&mut self, _level: u32, key: &[u8], value: &[u8]) -> Decision {
        // A block goes once its last entry is below the mark. A key that is
        // not a log id, or a value without a header, is left alone: reads
        // and open report it.
        let Ok(first) = <[u8; 8]>::try_from(key) else {
            return Decision::Keep;
        };
        match codec::value_last_id(LogId(u64::from_be_bytes(first)), value) {
            Some(last) if last.0 < self.below => Decision::Remove,
            _ => Decision::Keep,
        }
    }

    fn name(&self) -> &CStr {
        TRIMMED_FILTER_NAME
    }
}

fn cf_options(config: &WalConfig, cache: &Cache) -> Options {
    let mut options = Options::default();
    options.set_write_buffer_size(config.cf_write_buffer_size.as_usize());
    options.set_max_write_buffer_number(2);
    // Every memtable that received a write holds at least one arena block,
    // charged to the shared budget; RocksDB's default (an eighth of the write
    // buffer) would let hundreds of partitions exhaust the budget with
    // near-empty memtables and cause flush storms.
    options.set_arena_block_size(ARENA_BLOCK_SIZE.min(config.cf_write_buffer_size.as_usize() / 8));
    options.set_compression_type(DBCompressionType::Lz4);
    options.set_level_compaction_dynamic_level_bytes(true);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Index and filter blocks count against the shared cache instead of
    // growing with the number of files.
    table.set_cache_index_and_filter_blocks(true);
    options.set_block_based_table_factory(&table);
    options
}

/// Options of the `p<id>.log` column families. Log entries are short-lived
/// (trimmed once every downstream acked them, usually seconds after they
/// were written), so they are stored uncompressed: compressing them on
/// every flush and compaction cost more CPU than anything else RocksDB did
/// under load, for data that is mostly deleted before it is read from disk.
/// L0 holds more files before compacting, so that trims usually drop whole
/// files before a compaction reaches them. A long backlog (a drainer away
/// for hours) takes correspondingly more disk. `trimmed_below` feeds the
/// compaction filter that drops trimmed entries.
fn log_cf_options(config: &WalConfig, cache: &Cache, trimmed_below: Arc<AtomicU64>) -> Options {
    let mut options = cf_options(config, cache);
    options.set_compaction_filter_factory(TrimmedFilterFactory { trimmed_below });
    options.set_compression_type(DBCompressionType::None);
    options.set_level_zero_file_num_compaction_trigger(LOG_L0_COMPACTION_TRIGGER);
    options.set_level_zero_slowdown_writes_trigger(LOG_L0_COMPACTION_TRIGGER * 3);
    options.set_level_zero_stop_writes_trigger(LOG_L0_COMPACTION_TRIGGER * 5);
    options
}

fn db_options(config: &WalConfig, cache: &Cache) -> Options {
    let mut options = cf_options(config, cache);
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_db_write_buffer_size(config.memtable_budget.as_usize());
    options.set_max_total_wal_size(config.max_rocksdb_wal_size.as_u64());
    options.set_max_background_jobs(config.max_background_jobs as i32);
    // Replay RocksDB's WAL up to the first damaged record: batches stay atomic
    // and everything synced before it is recovered.
    options.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
    options.set_max_open_files(MAX_OPEN_FILES);
    options.set_keep_log_file_num(4);
    options.set_max_log_file_size(16 << 20);
    options.set_bytes_per_sync(config.bytes_per_sync.as_u64());
    options
}

fn parse_log_key(partition: PartitionId, key: &[u8]) -> Result<LogId, WalError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| WalError::Inconsistent {
        partition,
        what: format!("log key of {} bytes, expected 8", key.len()),
    })?;
    Ok(LogId(u64::from_be_bytes(bytes)))
}

impl RocksWalStorage {
    /// The key a read of `from` starts at: the block holding `from`, else
    /// `from` ([`start_key`]).
    fn start_key(
        &self,
        cf: &Arc<BoundColumnFamily<'_>>,
        partition: PartitionId,
        from: LogId,
    ) -> Result<LogId, WalError> {
        let mut read_options = ReadOptions::default();
        read_options.fill_cache(false);
        let mut iter = self.db.raw_iterator_cf_opt(cf, read_options);
        iter.seek_for_prev(codec::log_key(from));
        let below = match (iter.key(), iter.value()) {
            (Some(key), Some(value)) if iter.valid() => {
                Some((parse_log_key(partition, key)?, value))
            }
            _ => {
                iter.status()?;
                None
            }
        };
        Ok(start_key(from, below))
    }

    /// Opens (or creates) the RocksDB instance in `config.dir`.
    pub fn open(config: &WalConfig) -> Result<RocksWalStorage, WalError> {
        crate::secret::create_private_dir(&config.dir)?;
        let cache = Cache::new_lru_cache(config.block_cache_size.as_usize())?;
        let options = db_options(config, &cache);
        let cf_options = cf_options(config, &cache);
        let mut trimmed_below = HashMap::new();
        let mut names = vec![
            rocksdb::DEFAULT_COLUMN_FAMILY_NAME.to_string(),
            META_CF.to_string(),
        ];
        if config.dir.join("CURRENT").exists() {
            for name in Db::list_cf(&options, &config.dir)? {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        let descriptors = names.iter().map(|name| {
            let options = match codec::parse_cf_name(name) {
                Some((partition, true)) => {
                    // 0 until open releases the recovered first id: a low
                    // mark only keeps garbage longer.
                    let mark = Arc::new(AtomicU64::new(0));
                    trimmed_below.insert(partition, Arc::clone(&mark));
                    log_cf_options(config, &cache, mark)
                }
                _ => cf_options.clone(),
            };
            ColumnFamilyDescriptor::new(name, options)
        });
        let db = Db::open_cf_descriptors(&options, &config.dir, descriptors)?;
        let log_partitions = names
            .iter()
            .filter_map(|name| codec::parse_cf_name(name))
            .filter(|(_, is_log)| *is_log)
            .map(|(partition, _)| partition)
            .collect();
        info!(dir = %config.dir.display(), column_families = names.len(), "wal opened");
        Ok(RocksWalStorage {
            db,
            cf_options,
            config: config.clone(),
            cache,
            log_partitions: Mutex::new(log_partitions),
            trimmed_below: Mutex::new(trimmed_below),
            unsynced_writes: AtomicBool::new(false),
            path: config.dir.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A RocksDB property (e.g. `rocksdb.cur-size-all-mem-tables`), for
    /// metrics.
    pub fn property_int(&self, name: &str) -> Result<Option<u64>, WalError> {
        Ok(self.db.property_int_value(name)?)
    }

    /// Memory held by the memtables of all column families, mutable,
    /// immutable and pinned (`rocksdb.size-all-mem-tables` summed). Costs a
    /// property lookup per column family.
    pub fn memtable_bytes(&self) -> Result<u64, WalError> {
        let partitions = self.log_partitions()?;
        let mut names = vec![
            rocksdb::DEFAULT_COLUMN_FAMILY_NAME.to_string(),
            META_CF.to_string(),
        ];
        for partition in partitions {
            names.push(codec::log_cf_name(partition));
            names.push(codec::snap_cf_name(partition));
        }
        let mut total = 0;
        for name in names {
            if let Some(cf) = self.cf(&name) {
                total += self
                    .db
                    .property_int_value_cf(&cf, "rocksdb.size-all-mem-tables")?
                    .unwrap_or(0);
            }
        }
        Ok(total)
    }

    fn cf(&self, name: &str) -> Option<Arc<BoundColumnFamily<'_>>> {
        self.db.cf_handle(name)
    }

    fn meta_cf(&self) -> Result<Arc<BoundColumnFamily<'_>>, WalError> {
        self.cf(META_CF).ok_or_else(|| WalError::Inconsistent {
            partition: PartitionId(0),
            what: "meta column family missing".into(),
        })
    }

    /// The column family `name`, created if missing.
    fn cf_or_create(&self, name: &str) -> Result<Arc<BoundColumnFamily<'_>>, WalError> {
        if let Some(cf) = self.cf(name) {
            return Ok(cf);
        }
        let mut log_partitions = self
            .log_partitions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if self.cf(name).is_none() {
            match codec::parse_cf_name(name) {
                Some((partition, true)) => {
                    let options =
                        log_cf_options(&self.config, &self.cache, self.trimmed_mark(partition));
                    self.db.create_cf(name, &options)?;
                }
                _ => self.db.create_cf(name, &self.cf_options)?,
            }
        }
        if let Some((partition, true)) = codec::parse_cf_name(name) {
            log_partitions.insert(partition);
        }
        self.cf(name).ok_or_else(|| WalError::Inconsistent {
            partition: PartitionId(0),
            what: format!("column family {name} missing after creation"),
        })
    }

    /// The `trimmed_below` mark of `partition`, created at 0 if missing.
    fn trimmed_mark(&self, partition: PartitionId) -> Arc<AtomicU64> {
        let mut marks = self
            .trimmed_below
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Arc::clone(marks.entry(partition).or_default())
    }

    /// Flushes the memtable of `partition`'s log and compacts the whole log
    /// column family, which runs the compaction filter over every file
    /// (trivial moves skip it). Maintenance and tests; the data path never
    /// needs it.
    pub fn compact_log(&self, partition: PartitionId) -> Result<(), WalError> {
        let Some(cf) = self.cf(&codec::log_cf_name(partition)) else {
            return Ok(());
        };
        self.db.flush_cf(&cf)?;
        self.db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Stores `value` as the log value under `log_id`, bypassing the
    /// encoder (tests of values older versions wrote).
    #[cfg(test)]
    pub fn put_raw_log_value(
        &self,
        partition: PartitionId,
        log_id: LogId,
        value: &[u8],
    ) -> Result<(), WalError> {
        let cf = self.log_cf(partition)?;
        self.db.put_cf(&cf, codec::log_key(log_id), value)?;
        Ok(())
    }

    fn log_cf(&self, partition: PartitionId) -> Result<Arc<BoundColumnFamily<'_>>, WalError> {
        self.cf_or_create(&codec::log_cf_name(partition))
    }

    fn snap_cf(&self, partition: PartitionId) -> Result<Arc<BoundColumnFamily<'_>>, WalError> {
        self.cf_or_create(&codec::snap_cf_name(partition))
    }
}

impl WalStorage for RocksWalStorage {
    fn write(&self, ops: &[WriteOp], sync: bool) -> Result<(), WalError> {
        let meta = self.meta_cf()?;
        let mut batch = WriteBatch::default();
        // Per batch, not per block: the last log column family used (a batch
        // holds runs of one partition) and one encoding buffer (the batch
        // copies each value).
        let mut log_cf: Option<(PartitionId, Arc<BoundColumnFamily<'_>>)> = None;
        let mut value = Vec::new();
        for stored in stored_ops(ops) {
            let op = match stored {
                Stored::Block { partition, entries } => {
                    let cf = match &log_cf {
                        Some((cached, cf)) if *cached == partition => cf,
                        _ => &log_cf.insert((partition, self.log_cf(partition)?)).1,
                    };
                    let first = entries[0].log_id;
                    codec::encode_block_into(entries, &mut value);
                    batch.put_cf(cf, codec::log_key(first), &value);
                    continue;
                }
                Stored::Other(op) => op,
            };
            match op {
                // Stored as blocks above.
                WriteOp::Entry { .. } => {}
                WriteOp::LogMeta {
                    partition,
                    meta: log_meta,
                } => batch.put_cf(
                    &meta,
                    codec::meta_key(codec::META_LOG, *partition),
                    codec::encode_log_meta(*partition, log_meta),
                ),
                WriteOp::Applied { partition, log_id } => {
                    let key = codec::meta_key(codec::META_APPLIED, *partition);
                    let value = codec::encode_log_id(&key, *log_id);
                    batch.put_cf(&meta, key, value);
                }
                WriteOp::Ack {
                    partition,
                    downstream,
                    log_id,
                } => {
                    let key = codec::downstream_key(*partition, downstream);
                    let value = codec::encode_log_id(&key, *log_id);
                    batch.put_cf(&meta, key, value);
                }
                WriteOp::RemoveDownstream {
                    partition,
                    downstream,
                } => batch.delete_cf(&meta, codec::downstream_key(*partition, downstream)),
                WriteOp::SnapshotChunk {
                    partition,
                    epoch,
                    seq,
                    data,
                } => {
                    let cf = self.snap_cf(*partition)?;
                    batch.put_cf(
                        &cf,
                        codec::snap_key(*epoch, *seq),
                        codec::encode_snapshot_chunk(*epoch, *seq, data),
                    );
                }
                WriteOp::SnapshotState { partition, state } => batch.put_cf(
                    &meta,
                    codec::meta_key(codec::META_SNAPSHOT, *partition),
                    codec::encode_snapshot_state(*partition, state),
                ),
                WriteOp::DeleteSnapshot { partition, epoch } => {
                    let cf = self.snap_cf(*partition)?;
                    let last = codec::snap_key(*epoch, u64::MAX);
                    batch.delete_range_cf(&cf, codec::snap_key(*epoch, 0), last);
                    batch.delete_cf(&cf, last);
                }
                WriteOp::History { partition, history } => batch.put_cf(
                    &meta,
                    codec::meta_key(codec::META_HISTORY, *partition),
                    codec::encode_history(*partition, history),
                ),
            }
        }
        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        if !sync {
            self.unsynced_writes.store(true, Ordering::Release);
        }
        self.db.write_opt(batch, &write_options)?;
        Ok(())
    }

    fn release_trimmed(&self, partition: PartitionId, below: LogId) -> Result<(), WalError> {
        if below <= LogId(1) {
            return Ok(());
        }
        let Some(cf) = self.cf(&codec::log_cf_name(partition)) else {
            return Ok(());
        };
        // Without fsync'd batches the meta that moved `first` may still be
        // in RocksDB's log buffer; once entries are gone it must not be lost.
        if self.unsynced_writes.swap(false, Ordering::AcqRel) {
            self.db.flush_wal(true)?;
        }
        self.trimmed_mark(partition)
            .fetch_max(below.0, Ordering::AcqRel);
        // Whole files of garbage go at once, up to the block holding
        // `below` (its live entries stay); the compaction filter takes the
        // rest when a compaction rewrites the file holding it.
        let keep = self.start_key(&cf, partition, below)?;
        if keep <= LogId(1) {
            return Ok(());
        }
        if let Err(error) = self.db.delete_file_in_range_cf(
            &cf,
            codec::log_key(LogId::ZERO),
            codec::log_key(keep.prev()),
        ) {
            warn!(partition = %partition, %error, "dropping trimmed sst files failed");
        }
        Ok(())
    }

    fn read_entries(
        &self,
        partition: PartitionId,
        from: LogId,
        to: LogId,
        limits: ReadLimits,
    ) -> Result<Vec<WalEntry>, WalError> {
        let Some(cf) = self.cf(&codec::log_cf_name(partition)) else {
            return Ok(Vec::new());
        };
        let mut read_options = ReadOptions::default();
        // The bound lets RocksDB stop at `to` instead of reading ahead.
        read_options.set_iterate_upper_bound(codec::log_key(to.next()).to_vec());
        // Entries are read once each (shipping, applying), so their blocks
        // would only push other data out of the cache and grow the RSS.
        read_options.fill_cache(false);
        let mut iter = self.db.raw_iterator_cf_opt(&cf, read_options);
        let from_key = codec::log_key(from);
        iter.seek(from_key);
        // A read mostly goes on where the last one ended: at a block's
        // first id. Only otherwise can `from` lie inside a block stored
        // under a smaller id, and is the costlier backward seek needed (it
        // positions in every table file, reading their last blocks).
        if !(iter.valid() && iter.key() == Some(&from_key[..])) {
            iter.status()?;
            iter.seek_for_prev(from_key);
            let holds = match (iter.key(), iter.value()) {
                (Some(key), Some(value)) if iter.valid() => {
                    let key = parse_log_key(partition, key)?;
                    start_key(from, Some((key, value))) == key
                }
                _ => false,
            };
            if !holds {
                iter.status()?;
                iter.seek(from_key);
            }
        }
        let mut collector = EntryCollector::new(partition, from, to, limits);
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let log_id = parse_log_key(partition, key)?;
            if collector.is_done(log_id) {
                break;
            }
            collector.push(log_id, value)?;
            iter.next();
        }
        iter.status()?;
        Ok(collector.finish())
    }

    fn stored_bounds(
        &self,
        partition: PartitionId,
        from: LogId,
    ) -> Result<Option<(LogId, LogId)>, WalError> {
        let Some(cf) = self.cf(&codec::log_cf_name(partition)) else {
            return Ok(None);
        };
        let start = self.start_key(&cf, partition, from)?;
        let mut iter = self.db.raw_iterator_cf(&cf);
        iter.seek(codec::log_key(start));
        let first = match iter.key() {
            Some(key) if iter.valid() => parse_log_key(partition, key)?.max(from),
            _ => {
                iter.status()?;
                return Ok(None);
            }
        };
        iter.seek_to_last();
        let last = match (iter.key(), iter.value()) {
            (Some(key), Some(value)) if iter.valid() => {
                let key = parse_log_key(partition, key)?;
                codec::value_last_id(key, value).ok_or_else(|| WalError::Corrupt {
                    partition,
                    log_id: key,
                    what: "log value without a block header".to_string(),
                })?
            }
            _ => {
                iter.status()?;
                return Ok(None);
            }
        };
        Ok(Some((first, last)))
    }

    fn log_partitions(&self) -> Result<Vec<PartitionId>, WalError> {
        let log_partitions = self
            .log_partitions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Ok(log_partitions.iter().copied().collect())
    }

    fn read_snapshot_chunks(
        &self,
        partition: PartitionId,
        epoch: u64,
        from_seq: u64,
        max_chunks: usize,
    ) -> Result<Vec<(u64, Bytes)>, WalError> {
        let Some(cf) = self.cf(&codec::snap_cf_name(partition)) else {
            return Ok(Vec::new());
        };
        let mut read_options = ReadOptions::default();
        // A snapshot is read once per consumer (one ship, one load), in
        // 1 MiB chunks: caching them only grows the RSS (the memory-bound
        // case in benches/README.md).
        read_options.fill_cache(false);
        let mut iter = self.db.raw_iterator_cf_opt(&cf, read_options);
        iter.seek(codec::snap_key(epoch, from_seq));
        let mut chunks = Vec::new();
        while iter.valid() && chunks.len() < max_chunks {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let corrupt = |seq: u64, what: String| WalError::CorruptSnapshot {
                partition,
                epoch,
                seq,
                what,
            };
            let key: [u8; 16] = key
                .try_into()
                .map_err(|_| corrupt(0, format!("snapshot key of {} bytes", key.len())))?;
            let (key_epoch, key_seq) = key.split_at(8);
            let key_epoch = u64::from_be_bytes(key_epoch.try_into().unwrap_or([0xff; 8]));
            let seq = u64::from_be_bytes(key_seq.try_into().unwrap_or([0xff; 8]));
            if key_epoch != epoch {
                break;
            }
            let data = codec::decode_snapshot_chunk(epoch, seq, value)
                .map_err(|what| corrupt(seq, what))?;
            chunks.push((seq, data));
            iter.next();
        }
        iter.status()?;
        Ok(chunks)
    }

    fn snapshot_epochs(&self, partition: PartitionId) -> Result<Vec<u64>, WalError> {
        let Some(cf) = self.cf(&codec::snap_cf_name(partition)) else {
            return Ok(Vec::new());
        };
        // One seek per epoch: jump past every chunk of the epoch just found.
        let mut iter = self.db.raw_iterator_cf(&cf);
        let mut epochs = Vec::new();
        iter.seek(codec::snap_key(0, 0));
        while iter.valid() {
            let Some(key) = iter.key() else { break };
            let epoch_bytes: [u8; 8] = key
                .get(..8)
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| WalError::CorruptSnapshot {
                    partition,
                    epoch: 0,
                    seq: 0,
                    what: format!("snapshot key of {} bytes", key.len()),
                })?;
            let epoch = u64::from_be_bytes(epoch_bytes);
            epochs.push(epoch);
            let Some(next) = epoch.checked_add(1) else {
                break;
            };
            iter.seek(codec::snap_key(next, 0));
        }
        iter.status()?;
        Ok(epochs)
    }

    fn buffered_bytes(&self) -> Result<u64, WalError> {
        self.memtable_bytes()
    }

    fn background_errors(&self) -> Result<u64, WalError> {
        Ok(self
            .db
            .property_int_value("rocksdb.background-errors")?
            .unwrap_or(0))
    }

    fn load_progress(&self) -> Result<Vec<StoredPartition>, WalError> {
        let meta = self.meta_cf()?;
        let mut records = Vec::new();
        for item in self.db.iterator_cf(&meta, rocksdb::IteratorMode::Start) {
            records.push(item?);
        }
        decode_meta_records(records.iter().map(|(key, value)| (&key[..], &value[..])))
    }
}
