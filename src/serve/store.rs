//! The task store of `ferry serve`: one RocksDB in `<data-dir>/tasks.db`,
//! key `task/<name>`, value the task's [`TaskRecord`] as JSON. Every write
//! is synced before it returns, so a task the API acknowledged, and every
//! state change it reported, survive a kill -9 of the daemon.

use std::path::{Path, PathBuf};

use rocksdb::{Options, WriteOptions, DB};

use super::task::{TaskRecord, RECORD_VERSION};

const KEY_PREFIX: &[u8] = b"task/";

/// Largest stored record read back (a record is well under 64 KiB: names
/// and addresses are bounded by the spec's checks).
const RECORD_MAX: usize = 1 << 20;

/// Why the store failed, naming the store and the task.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task store {dir}: {error}")]
    Rocks {
        dir: PathBuf,
        #[source]
        error: rocksdb::Error,
    },
    #[error("task store {dir}: record {key:?}: {reason}")]
    Corrupt {
        dir: PathBuf,
        key: String,
        reason: String,
    },
}

pub struct TaskStore {
    db: DB,
    dir: PathBuf,
}

impl TaskStore {
    pub fn open(dir: &Path) -> Result<TaskStore, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, dir).map_err(|error| StoreError::Rocks {
            dir: dir.to_path_buf(),
            error,
        })?;
        Ok(TaskStore {
            db,
            dir: dir.to_path_buf(),
        })
    }

    fn rocks(&self, error: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            dir: self.dir.clone(),
            error,
        }
    }

    fn key(name: &str) -> Vec<u8> {
        [KEY_PREFIX, name.as_bytes()].concat()
    }

    /// Stores `record` (synced).
    pub fn put(&self, record: &TaskRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(|error| StoreError::Corrupt {
            dir: self.dir.clone(),
            key: record.name.clone(),
            reason: format!("cannot encode: {error}"),
        })?;
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db
            .put_opt(Self::key(&record.name), value, &sync)
            .map_err(|e| self.rocks(e))
    }

    /// Removes a task's record (synced).
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db
            .delete_opt(Self::key(name), &sync)
            .map_err(|e| self.rocks(e))
    }

    /// Every stored task, by name. A record that cannot be read is an
    /// error naming it: the daemon does not start with a task it would
    /// silently drop.
    pub fn load(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let mut records = Vec::new();
        let iter = self.db.iterator(rocksdb::IteratorMode::From(
            KEY_PREFIX,
            rocksdb::Direction::Forward,
        ));
        for item in iter {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            if !key.starts_with(KEY_PREFIX) {
                break;
            }
            let name = String::from_utf8_lossy(&key[KEY_PREFIX.len()..]).into_owned();
            let corrupt = |reason: String| StoreError::Corrupt {
                dir: self.dir.clone(),
                key: name.clone(),
                reason,
            };
            if value.len() > RECORD_MAX {
                return Err(corrupt(format!("{} bytes", value.len())));
            }
            let record: TaskRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt(e.to_string()))?;
            if record.version != RECORD_VERSION {
                return Err(corrupt(format!(
                    "record version {} (this ferry reads {RECORD_VERSION})",
                    record.version
                )));
            }
            if record.name != name {
                return Err(corrupt(format!("holds task {:?}", record.name)));
            }
            records.push(record);
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::task::TaskSpec;

    fn record(name: &str) -> TaskRecord {
        TaskSpec {
            name: name.into(),
            source: "redis://127.0.0.1:1".into(),
            target: "redis://127.0.0.1:2".into(),
            ..TaskSpec::default()
        }
        .record(7)
    }

    #[test]
    fn records_survive_a_reopen_and_deletes_too() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = TaskStore::open(dir.path()).unwrap();
            store.put(&record("b")).unwrap();
            store.put(&record("a")).unwrap();
            store.put(&record("c")).unwrap();
            store.delete("c").unwrap();
        }
        let store = TaskStore::open(dir.path()).unwrap();
        let names: Vec<String> = store.load().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = TaskStore::open(dir.path()).unwrap();
            store.put(&record("a")).unwrap();
            store.db.put(b"task/b", b"{not json").unwrap();
        }
        let store = TaskStore::open(dir.path()).unwrap();
        let error = store.load().unwrap_err().to_string();
        assert!(error.contains("\"b\""), "{error}");
    }
}
