//! Command-line verbs. `main.rs` parses arguments into [`Cli`] and calls
//! [`run`]; each verb lives in its own module and is callable as a library
//! function (integration tests do).
//!
//! - `ferry rdb dump FILE [--format json] [--no-aux] [--no-functions]`:
//!   the RDB as JSON lines on stdout ([`rdb::dump`]).
//! - `ferry rdb load FILE --target redis://… [--replace]
//!   [--restore-max-bytes N] [--pipeline N] [--chunk-items N]`: load an RDB
//!   into a running server ([`rdb::load`]).
//! - `ferry rdb fetch --source redis://… FILE`: take a snapshot of a live
//!   source through the replication protocol ([`fetch::fetch`]).
//! - `ferry sync --source … --target … --data-dir DIR`, `ferry listener
//!   --config FILE`, `ferry drainer --config FILE`: the daemons ([`node`]).
//! - `ferry status [--admin ADDR | --data-dir DIR] [--json] [--watch SECS]`,
//!   `ferry stop-sync` / `ferry restart-sync [--admin ADDR | --data-dir DIR]
//!   [--partition N] [--drainer ID]`, `ferry skip --partition P --log-id N
//!   [--drainer ID] [--admin ADDR | --data-dir DIR]`: the admin API's
//!   client ([`status`]).
//! - `ferry precheck --source … --target … [--dbs N,…] [--existing-data
//!   refuse|keep|flush] [--outage DUR] [--json]`: checks before a sync
//!   ([`precheck`]; exit code 1 on a FAIL).
//! - `ferry verify --source … --target … [--db N]… [--match PATTERN]
//!   [--mode full|outline] [--passes N] [--qps N] [--json]`: compare two
//!   servers key by key ([`verify`]; exit code 1 on a difference, 2 on an
//!   error).
//! - `ferry guard --target URL [--ferry-user NAME] --ferry-password-file F
//!   [--app-user NAME --app-password-file F] [--off]`: a target only ferry
//!   writes, standalone or every node of a cluster ([`guard`]).
//! - `ferry serve --data-dir DIR [--http ADDR] [--token-file F]`: many
//!   sync tasks in one daemon, with an HTTP API and a dashboard;
//!   `ferry task create|list|show|stop|start|cancel --server URL`: its
//!   client ([`serve`]).
//! - Every verb takes `--log-format text|json` (or `FERRY_LOG_FORMAT`):
//!   log lines on stderr as text or as JSON objects, one per line
//!   ([`LogFormat`]; `main.rs` installs it).
//! - `sync`, `precheck` and `verify` take a sync's keyspace ([`FilterArgs`]:
//!   `--db-map S=T,…`, `--key-prefix P`, `--exclude-key-prefix P`).

pub mod fetch;
pub mod guard;
pub mod node;
pub mod precheck;
pub mod rdb;
pub mod serve;
pub mod status;
pub mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::apply::FilterConfig;

use crate::secret::{url_from_flags, SecretUrl};

/// ferry: durable cross-cluster replication relay.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    /// Log lines on stderr: `text`, or `json` (one JSON object per line:
    /// timestamp, level, target, fields, spans). The level filter is
    /// RUST_LOG.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "FERRY_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub verb: Verb,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Replicate a source Redis into a target Redis: a listener and its
    /// appliers in one process, one WAL under --data-dir.
    Sync(node::SyncArgs),
    /// Run a listener: replicate a source, persist, ship to drainers.
    Listener {
        /// Its TOML config (see conf/listener.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a drainer: accept streams from listeners, persist, apply to the
    /// target.
    Drainer {
        /// Its TOML config (see conf/drainer.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run one site of a two-way sync between two Redis servers (each a
    /// standalone server or a Redis Cluster) in a listener/drainer
    /// deployment: the listener of this site's server,
    /// shipping to the other site, and the drainer applying the other
    /// site's stream to it, in one WAL.
    Site {
        /// Its TOML config (see conf/site-a.toml and conf/site-b.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Read RDB files: dump them as JSON, or load them into a Redis server.
    Rdb {
        #[command(subcommand)]
        command: RdbCommand,
    },
    /// Show the sync status of a running ferry process (listener → drainer,
    /// drainer → target).
    Status(status::StatusArgs),
    /// Stop shipping to drainers (ferry sync: stop applying); the listener
    /// keeps replicating and its WAL accumulates (within wal-ttl).
    StopSync(status::SyncControlArgs),
    /// Resume what stop-sync stopped: the target gets what accumulated, or
    /// a snapshot if it expired.
    RestartSync(status::SyncControlArgs),
    /// Skip the entry a partition is BLOCKED on (the target refuses it),
    /// recording it in the dead-letter file first (replay it with
    /// `redis-cli --pipe < FILE`).
    Skip(status::SkipArgs),
    /// Compare a source and a target key by key (type, TTL, value), in
    /// passes; exit code 1 when they differ.
    Verify(verify::VerifyArgs),
    /// Check a source and a target before a sync (reachability, versions,
    /// cluster mode and slots, target data, eviction policy, persistence,
    /// backlog and output buffer against the write rate; every master of a
    /// Redis Cluster): a PASS / WARN / FAIL table; exit code 1 on any FAIL.
    Precheck(precheck::PrecheckArgs),
    /// Make a target writable only by ferry: an ACL user ferry writes as,
    /// the default user read-only (-@write -@admin, keeping +psync
    /// +replconf for replicas), optionally a read-only user for
    /// applications; --off restores what it changed (recorded on the target
    /// in __ferry:guard). A standalone Redis 6 or later, or a Redis Cluster
    /// given by any one node: every node, masters and replicas.
    Guard(guard::GuardArgs),
    /// Reverse a running `ferry sync` with no full sync: pause writes on the
    /// source, wait until the target has applied everything, replicate the
    /// old target into the old source from that exact point, unpause
    /// (closing the clients whose writes the pause held). Prints each step
    /// and its duration; on timeout or error the sync runs on as before.
    /// Two standalone servers, two Redis Clusters (every source master
    /// paused, every shard reversed), or a standalone server and a cluster
    /// in either order.
    Switchover(status::SwitchoverArgs),
    /// Run many sync tasks in one daemon, managed over an HTTP API
    /// (docs/API.md) and a web dashboard at http://ADDR/; tasks survive a
    /// restart of the daemon.
    Serve(serve::ServeArgs),
    /// Manage the tasks of a `ferry serve`: create, list, show, stop,
    /// start, cancel.
    Task(serve::TaskArgs),
}

#[derive(Debug, Subcommand)]
pub enum RdbCommand {
    /// Write the keys of an RDB file to stdout, one JSON object per line.
    Dump {
        /// The RDB file.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = DumpFormat::Json)]
        format: DumpFormat,
        /// Leave out the header, aux field, module aux and slot info lines.
        #[arg(long)]
        no_aux: bool,
        /// Leave out function library lines.
        #[arg(long)]
        no_functions: bool,
    },
    /// Take an RDB snapshot of a live Redis the way a replica does
    /// (PSYNC), verify it, and write it to FILE.
    Fetch {
        /// The server to snapshot: `redis://[user[:password]@]host:port`
        /// (a password here shows in `ps`: prefer --source-password-file or
        /// FERRY_SOURCE_PASSWORD).
        #[arg(long)]
        source: SecretUrl,
        /// A file holding the source's password.
        #[arg(long, value_name = "FILE")]
        source_password_file: Option<PathBuf>,
        /// Where to write the RDB (written to FILE.partial, renamed when verified).
        file: PathBuf,
    },
    /// Load an RDB file into a running Redis server.
    Load {
        /// The RDB file.
        file: PathBuf,
        /// The server to load into: `redis://[user[:password]@]host:port`
        /// (a password here shows in `ps`: prefer --target-password-file or
        /// FERRY_TARGET_PASSWORD).
        #[arg(long)]
        target: SecretUrl,
        /// A file holding the target's password.
        #[arg(long, value_name = "FILE")]
        target_password_file: Option<PathBuf>,
        /// Overwrite keys that already exist (RESTORE … REPLACE, DEL before
        /// a rebuild). Without it a RESTORE of an existing key fails and a
        /// rebuilt key merges into the existing one.
        #[arg(long)]
        replace: bool,
        /// Largest encoded value sent with RESTORE (bytes; KiB/MiB/GiB
        /// suffixes accepted); 0 rebuilds every key with commands.
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        restore_max_bytes: usize,
        /// Most commands awaiting a reply at once.
        #[arg(long, default_value_t = 1000)]
        pipeline: usize,
        /// Most elements per rebuild command.
        #[arg(long, default_value_t = 1000)]
        chunk_items: usize,
    },
}

/// The `[filter]` flags beyond `--dbs`, shared by `ferry sync`, `ferry
/// precheck` and `ferry verify` (a verify of one sync's keyspace takes the
/// same values as the sync).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct FilterArgs {
    /// Source db to target db, e.g. `0=3,5=6`: only these source dbs, each
    /// into its target db ([filter] db-map; not with --dbs; two source dbs
    /// into one target db are refused). `verify` compares each source db
    /// with its target db.
    #[arg(long, value_name = "SRC=DST,...", value_parser = crate::apply::keyspace::parse_db_map)]
    pub db_map: Option<BTreeMap<String, u32>>,
    /// Only keys starting with PREFIX are replicated and owned (repeatable;
    /// [filter] key-prefix): other keys are never written, flushed or
    /// compared.
    #[arg(long = "key-prefix", value_name = "PREFIX")]
    pub key_prefix: Vec<String>,
    /// Keys starting with PREFIX are neither replicated nor owned
    /// (repeatable; [filter] exclude-key-prefix).
    #[arg(long = "exclude-key-prefix", value_name = "PREFIX")]
    pub exclude_key_prefix: Vec<String>,
}

impl FilterArgs {
    /// The flags as a `[filter]` (with `--dbs`, where the verb has it), to
    /// lay over a file's with [`FilterConfig::overridden_by`].
    pub fn to_config(&self, dbs: Option<Vec<u32>>) -> FilterConfig {
        let list = |prefixes: &Vec<String>| (!prefixes.is_empty()).then(|| prefixes.clone());
        FilterConfig {
            dbs,
            db_map: self.db_map.clone(),
            key_prefix: list(&self.key_prefix),
            exclude_key_prefix: list(&self.exclude_key_prefix),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DumpFormat {
    Json,
}

/// Why a verb failed; `main` prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Dump(#[from] rdb::DumpCommandError),
    #[error(transparent)]
    Load(#[from] rdb::LoadError),
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error(transparent)]
    Url(#[from] crate::redis::url::UrlError),
    #[error(transparent)]
    Password(#[from] crate::secret::FlagUrlError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Node(#[from] node::NodeCommandError),
    #[error(transparent)]
    Status(#[from] status::StatusCommandError),
    #[error(transparent)]
    Verify(#[from] verify::VerifyCommandError),
    #[error(transparent)]
    Precheck(#[from] precheck::PrecheckCommandError),
    #[error(transparent)]
    Guard(#[from] guard::GuardError),
    #[error(transparent)]
    Serve(#[from] serve::ServeCommandError),
}

impl CliError {
    /// The process exit code: `ferry verify` tells differences (1) from
    /// errors (2); every other failure is 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Verify(error) => error.exit_code(),
            _ => 1,
        }
    }
}

impl Verb {
    /// Whether the verb is a long-running daemon (logs at `info` by default).
    pub fn is_daemon(&self) -> bool {
        matches!(
            self,
            Verb::Sync(_)
                | Verb::Listener { .. }
                | Verb::Drainer { .. }
                | Verb::Site { .. }
                | Verb::Serve(_)
        )
    }
}

/// Runs the verb `cli` names.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.verb {
        Verb::Sync(args) => Ok(node::sync(args)?),
        Verb::Listener { config } => Ok(node::listener(config)?),
        Verb::Drainer { config } => Ok(node::drainer(config)?),
        Verb::Site { config } => Ok(node::site(config)?),
        Verb::Rdb { command } => match command {
            RdbCommand::Dump {
                file,
                format: DumpFormat::Json,
                no_aux,
                no_functions,
            } => {
                let opts = crate::redis::rdb::dump_json::DumpOptions {
                    aux: !no_aux,
                    functions: !no_functions,
                };
                rdb::dump_to_stdout(&file, opts)?;
                Ok(())
            }
            RdbCommand::Fetch {
                source,
                source_password_file,
                file,
            } => {
                let source = url_from_flags("source", &source, source_password_file.as_deref())?;
                let report = runtime()?.block_on(fetch::fetch(&source, &file))?;
                println!("{report}");
                Ok(())
            }
            RdbCommand::Load {
                file,
                target,
                target_password_file,
                replace,
                restore_max_bytes,
                pipeline,
                chunk_items,
            } => {
                let target = url_from_flags("target", &target, target_password_file.as_deref())?;
                let mut config = rdb::LoadConfig::new(file, target);
                config.replace = replace;
                config.restore_max_bytes = restore_max_bytes;
                config.pipeline = pipeline.max(1);
                config.chunk_items = chunk_items.max(1);
                runtime()?.block_on(rdb::load_and_report(&config))?;
                Ok(())
            }
        },
        Verb::Status(args) => Ok(status::status(&args)?),
        Verb::StopSync(args) => Ok(status::stop_sync(&args)?),
        Verb::RestartSync(args) => Ok(status::restart_sync(&args)?),
        Verb::Skip(args) => Ok(status::skip(&args)?),
        Verb::Verify(args) => Ok(verify::verify(&args)?),
        Verb::Precheck(args) => Ok(precheck::precheck(&args)?),
        Verb::Guard(args) => Ok(guard::guard(&args)?),
        Verb::Switchover(args) => Ok(status::switchover(&args)?),
        Verb::Serve(args) => Ok(serve::serve(args)?),
        Verb::Task(args) => Ok(serve::task(args)?),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

/// Parses a byte size for a flag, with the same grammar as the config files
/// (`crate::config_units::parse_size`: `1048576`, `512KiB`, `8MiB`, `1GB`).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let bytes = crate::config_units::parse_size(text).map_err(|e| e.to_string())?;
    usize::try_from(bytes).map_err(|_| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn parses_load_arguments() {
        let cli = Cli::try_parse_from([
            "ferry",
            "rdb",
            "load",
            "dump.rdb",
            "--target",
            "redis://127.0.0.1:6379",
            "--replace",
            "--restore-max-bytes",
            "0",
            "--pipeline",
            "10",
        ])
        .unwrap();
        match cli.verb {
            Verb::Rdb {
                command:
                    RdbCommand::Load {
                        replace,
                        restore_max_bytes,
                        pipeline,
                        ..
                    },
            } => {
                assert!(replace);
                assert_eq!(restore_max_bytes, 0);
                assert_eq!(pipeline, 10);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["ferry", "rdb", "load", "x.rdb"]).is_err());
        assert!(Cli::try_parse_from(["ferry", "rdb", "dump", "x.rdb", "--format", "xml"]).is_err());
    }

    #[test]
    fn debug_of_arguments_hides_passwords() {
        let argvs: [&[&str]; 5] = [
            &[
                "ferry",
                "sync",
                "--source",
                "redis://:hunter2@h:1",
                "--target",
                "redis://app:hunter2@h:2",
                "--data-dir",
                "d",
            ],
            &[
                "ferry",
                "rdb",
                "fetch",
                "--source",
                "redis://:hunter2@h:1",
                "f",
            ],
            &[
                "ferry",
                "rdb",
                "load",
                "f",
                "--target",
                "redis://:hunter2@h:1",
            ],
            &[
                "ferry",
                "verify",
                "--source",
                "redis://:hunter2@h:1",
                "--target",
                "redis://app:hunter2@h:2",
            ],
            &[
                "ferry",
                "precheck",
                "--source",
                "redis://:hunter2@h:1",
                "--target",
                "redis://app:hunter2@h:2",
            ],
        ];
        for argv in argvs {
            let cli = Cli::try_parse_from(argv).unwrap();
            let shown = format!("{cli:?}");
            assert!(
                !shown.contains("hunter2") && shown.contains("***"),
                "{shown}"
            );
        }
    }
}
