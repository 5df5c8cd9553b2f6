//! `ferry rdb fetch`: take a point-in-time RDB snapshot of a live source the
//! way a replica does (`PSYNC ? -1`), write it to a file, and verify it.
//!
//! What flows in: a source address. What flows out: an RDB file, written to
//! `FILE.partial`, fsync'd and renamed into place only once the transfer is
//! complete and the file parses to its end with a valid checksum, plus the
//! replication position (replid, offset) the snapshot is consistent with.
//! The source does a BGSAVE (or a diskless transfer) exactly as for a new
//! replica; nothing is written to it. The connection asks for the RDB only
//! (`REPLCONF rdb-only 1`, Redis 7.0+: no replication buffer is kept for it,
//! nothing is streamed after the RDB); a source that refuses the option is
//! fetched from the same way, and the link dropped after the RDB.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::position::{ReplId, ReplOffset};
use crate::redis::psync::{PsyncSource, ReplError, ReplEvent, ReplicaConfig};
use crate::redis::rdb::{ParseOptions, RdbError, RdbEvent, RdbParser};
use crate::redis::url::RedisUrl;

/// How long to wait for an rdb-only source to close the link after the RDB.
const RDB_ONLY_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What a successful fetch produced.
#[derive(Debug, Clone)]
pub struct FetchReport {
    pub file: PathBuf,
    pub replid: ReplId,
    /// The source's replication offset the snapshot is consistent with.
    pub offset: ReplOffset,
    pub bytes: u64,
    pub rdb_version: u32,
    pub keys: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for FetchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fetched {} bytes (RDB version {}, {} keys) into {} in {:.2?}; consistent with replid {} offset {}",
            self.bytes,
            self.rdb_version,
            self.keys,
            self.file.display(),
            self.elapsed,
            self.replid,
            self.offset
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("replication from {source_url} failed: {error}")]
    Replication {
        source_url: String,
        #[source]
        error: ReplError,
    },
    #[error("source {source_url} answered PSYNC ? -1 with {what} instead of a full resync")]
    NotFullResync { source_url: String, what: String },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("the fetched RDB in {path} does not verify: {error}")]
    Verify {
        path: PathBuf,
        #[source]
        error: RdbError,
    },
}

/// Fetches a snapshot of `source` into `file`.
pub async fn fetch(source: &RedisUrl, file: &Path) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let source_url = source.to_string();
    let repl_err = |error| FetchError::Replication {
        source_url: source_url.clone(),
        error,
    };
    let partial = partial_path(file);
    let write_err = |error| FetchError::Write {
        path: partial.clone(),
        error,
    };

    // The snapshot alone (Redis 7.0+): no replication buffer is kept for
    // this connection, so writes during a long transfer cannot overflow the
    // source's `client-output-buffer-limit replica`; an older source streams
    // after the RDB as to any replica, and leaving ends that.
    let config = ReplicaConfig {
        rdb_only: true,
        ..ReplicaConfig::new(source.clone())
    };
    let mut psync = PsyncSource::connect(&config, None)
        .await
        .map_err(repl_err)?;
    let (replid, offset) = match psync.next_event().await.map_err(repl_err)? {
        ReplEvent::FullResync { replid, offset } => (replid, offset),
        other => {
            return Err(FetchError::NotFullResync {
                source_url,
                what: format!("{other:?}"),
            })
        }
    };
    let mut out = tokio::fs::File::create(&partial).await.map_err(write_err)?;
    let mut bytes = 0u64;
    loop {
        match psync.next_event().await.map_err(repl_err)? {
            ReplEvent::RdbChunk(chunk) => {
                out.write_all(&chunk).await.map_err(write_err)?;
                bytes += chunk.len() as u64;
            }
            ReplEvent::RdbEnd { .. } => break,
            other => {
                return Err(FetchError::NotFullResync {
                    source_url,
                    what: format!("{other:?} in the middle of the RDB"),
                })
            }
        }
    }
    // The snapshot is all we want. An rdb-only source closes the link
    // itself; from any other, leaving now ends the replica link.
    psync.wait_closed(RDB_ONLY_CLOSE_WAIT).await;
    drop(psync);
    out.sync_all().await.map_err(write_err)?;
    drop(out);

    let check_path = partial.clone();
    let verified = tokio::task::spawn_blocking(move || verify(&check_path))
        .await
        .map_err(|join| write_err(std::io::Error::other(join.to_string())))?;
    let (rdb_version, keys) = match verified {
        Ok(v) => v,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    tokio::fs::rename(&partial, file)
        .await
        .map_err(|error| FetchError::Write {
            path: file.to_path_buf(),
            error,
        })?;
    sync_parent_dir(file);
    Ok(FetchReport {
        file: file.to_path_buf(),
        replid,
        offset,
        bytes,
        rdb_version,
        keys,
        elapsed: started.elapsed(),
    })
}

/// Parses the file to its end (checksum verified); returns (version, keys).
fn verify(path: &Path) -> Result<(u32, u64), FetchError> {
    let file = std::fs::File::open(path).map_err(|error| FetchError::Write {
        path: path.to_path_buf(),
        error,
    })?;
    let opts = ParseOptions {
        raw_capture_limit: 0,
        ..ParseOptions::default()
    };
    let mut parser = RdbParser::new(std::io::BufReader::with_capacity(1 << 20, file), opts);
    let mut keys = 0;
    let verify_err = |error| FetchError::Verify {
        path: path.to_path_buf(),
        error,
    };
    while let Some(event) = parser.next_event().map_err(verify_err)? {
        if matches!(event, RdbEvent::KeyStart(_)) {
            keys += 1;
        }
    }
    Ok((parser.version(), keys))
}

fn partial_path(file: &Path) -> PathBuf {
    let mut name = file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    file.with_file_name(name)
}

/// Makes the rename durable; best effort (not every filesystem allows it).
fn sync_parent_dir(file: &Path) {
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = std::fs::File::open(parent) {
        let _ = dir.sync_all();
    }
}
