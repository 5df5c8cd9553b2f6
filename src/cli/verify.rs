//! `ferry verify --source URL --target URL`: compare two servers key by key
//! ([`crate::verify`]).
//!
//! In: the flags of [`VerifyArgs`]. Out: on stdout, the summary table and
//! the differing keys ([`crate::verify::render_report`]) or, with `--json`,
//! the report as one JSON object (the serde form of
//! [`crate::verify::VerifyReport`]); progress after each pass on stderr
//! (`RUST_LOG=info`). The verb fails with [`VerifyCommandError::Differences`]
//! when keys still differ after the last pass (exit code 1) and with another
//! [`VerifyCommandError`] when it cannot finish (exit code 2).

use std::io::{self, Write as _};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;

use std::path::{Path, PathBuf};

use crate::apply::expire::DEFAULT_EXPIRE_GRACE;
use crate::apply::keyspace::FilterError;
use crate::config_units::HumanDuration;
use crate::redis::cluster::parse_seed_list;
use crate::redis::url::RedisUrl;
use crate::secret::{url_from_flags, FlagUrlError, SecretError, SecretUrl};
use crate::verify::{self, Mode, VerifyConfig, VerifyError};

/// `ferry verify` arguments.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The reference server: `redis://[user[:password]@]host:port` (a
    /// password here shows in `ps`: prefer --source-password-file or
    /// FERRY_SOURCE_PASSWORD). A Redis Cluster is found out by itself: give
    /// any node, or a comma-separated seed list (`redis://a:7000,b:7001`,
    /// the others taking the first one's credentials); every master is
    /// scanned and each key read from the master serving its slot.
    #[arg(long)]
    pub source: SecretUrl,
    /// The server checked against it, standalone or a cluster like
    /// --source (see --target-password-file, FERRY_TARGET_PASSWORD).
    #[arg(long)]
    pub target: SecretUrl,
    /// A file holding the source's password.
    #[arg(long, value_name = "FILE")]
    pub source_password_file: Option<PathBuf>,
    /// A file holding the target's password.
    #[arg(long, value_name = "FILE")]
    pub target_password_file: Option<PathBuf>,
    /// A db to compare (repeatable) [default: every db holding keys on
    /// either side]. A cluster has db 0 only.
    #[arg(long = "db", value_name = "N")]
    pub dbs: Vec<u32>,
    /// Only keys matching this SCAN MATCH pattern.
    #[arg(long = "match", value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// One sync's keyspace: the same --db-map, --key-prefix and
    /// --exclude-key-prefix as the sync (its other keys on a shared target
    /// are not extra).
    #[command(flatten)]
    pub filter: super::FilterArgs,
    /// full: values too; outline: existence, type, TTL and lengths.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    pub mode: Mode,
    /// Passes per db; later passes re-check only the keys that differed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub passes: u32,
    /// Commands per second sent to each server; 0 for no limit.
    #[arg(long, default_value_t = 5000)]
    pub qps: u32,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Largest gap between the expiry times of a key that is still equal (ms).
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub ttl_tolerance: u64,
    /// How much later a target's expiry may be than the source's, and how
    /// long a key expired on the source may stay on the target: the
    /// drainer's `[apply] expire-grace` (e.g. "5m", "0s").
    #[arg(long, value_name = "DURATION", default_value_t = HumanDuration(DEFAULT_EXPIRE_GRACE))]
    pub expire_grace: HumanDuration,
    /// Keys per SCAN page and pipeline, elements per chunk of a big key.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
    /// Pause before each pass after the first (ms).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub pass_interval: u64,
    /// Most differing keys listed (the rest are counted).
    #[arg(long, default_value_t = 1000)]
    pub max_listed: usize,
}

impl VerifyArgs {
    pub fn config(&self) -> Result<VerifyConfig, VerifyCommandError> {
        let (source, source_seeds) =
            seeds_from_flags("source", &self.source, self.source_password_file.as_deref())?;
        let (target, target_seeds) =
            seeds_from_flags("target", &self.target, self.target_password_file.as_deref())?;
        let mut config = VerifyConfig::new(source, target);
        config.source_seeds = source_seeds;
        config.target_seeds = target_seeds;
        let keyspace = self
            .filter
            .to_config(None)
            .keyspace()
            .map_err(VerifyCommandError::Filter)?;
        config.db_map = keyspace.db_map().unwrap_or_default();
        config.key_filter = keyspace.key_filter().cloned();
        config.dbs = self.dbs.clone();
        config.pattern = self.pattern.clone().map(Bytes::from);
        config.mode = self.mode;
        config.passes = self.passes;
        config.qps = self.qps;
        config.ttl_tolerance_ms = self.ttl_tolerance;
        config.expire_grace_ms = u64::try_from(self.expire_grace.0.as_millis()).unwrap_or(u64::MAX);
        config.batch = usize::try_from(self.batch).unwrap_or(usize::MAX);
        config.pass_interval = Duration::from_millis(self.pass_interval);
        config.max_listed = self.max_listed;
        Ok(config)
    }
}

/// The address of `--source` or `--target` (`which`): one address, or a
/// cluster's comma-separated seed list, whose first address takes its
/// password as [`url_from_flags`] says and whose other addresses without
/// credentials take the first one's ([`parse_seed_list`]). Returns the first
/// address and the others.
pub(crate) fn seeds_from_flags(
    which: &'static str,
    text: &SecretUrl,
    password_file: Option<&Path>,
) -> Result<(RedisUrl, Vec<RedisUrl>), FlagUrlError> {
    let Some((first_text, rest)) = text.split_once(',') else {
        return Ok((url_from_flags(which, text, password_file)?, Vec::new()));
    };
    let first = url_from_flags(which, &SecretUrl::new(first_text.trim()), password_file)?;
    let as_given = RedisUrl::parse(first_text.trim()).map_err(|e| FlagUrlError {
        which,
        error: SecretError::Url(e),
    })?;
    let mut others = Vec::new();
    for mut seed in parse_seed_list(&format!("{first_text},{rest}"))
        .map_err(|e| FlagUrlError {
            which,
            error: SecretError::Url(e),
        })?
        .into_iter()
        .skip(1)
    {
        // Inherited from the address as written: take the credentials the
        // first one ended up with (its password may come from a file).
        if seed.user == as_given.user && seed.password == as_given.password {
            seed.user = first.user.clone();
            seed.password = first.password.clone();
        }
        if seed.user.is_some() && seed.password.is_none() {
            return Err(FlagUrlError {
                which,
                error: SecretError::UserWithoutPassword {
                    url: format!("redis://***@{}", seed.addr()),
                },
            });
        }
        others.push(seed);
    }
    Ok((first, others))
}

/// Why `ferry verify` did not end with "equal".
#[derive(Debug, thiserror::Error)]
pub enum VerifyCommandError {
    #[error("{keys} keys differ between the source and the target after the last pass")]
    Differences { keys: u64 },
    #[error(transparent)]
    Url(#[from] FlagUrlError),
    #[error("{0}")]
    Filter(FilterError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("cannot write to stdout: {0}")]
    Output(#[source] io::Error),
    #[error("cannot encode the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

impl VerifyCommandError {
    /// 1 when the servers differ, 2 when the verify could not finish.
    pub fn exit_code(&self) -> u8 {
        match self {
            VerifyCommandError::Differences { .. } => 1,
            _ => 2,
        }
    }
}

/// `ferry verify`.
pub fn verify(args: &VerifyArgs) -> Result<(), VerifyCommandError> {
    let config = args.config()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(VerifyCommandError::Runtime)?;
    let report = runtime.block_on(verify::run_observed(&config, &mut |event| {
        tracing::info!(
            db = event.db,
            pass = event.pass,
            differing = event.differing,
            another_pass = event.another_pass,
            "verify pass done"
        );
    }))?;
    let text = if args.json {
        serde_json::to_string(&report)? + "\n"
    } else {
        verify::render_report(&report)
    };
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(VerifyCommandError::Output)?;
    if report.equal {
        Ok(())
    } else {
        Err(VerifyCommandError::Differences {
            keys: report.differences_total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Verb};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<VerifyArgs, clap::Error> {
        let mut argv = vec!["ferry", "verify"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.verb {
            Verb::Verify(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_flags_into_a_config() {
        let args = parse(&[
            "--source",
            "redis://:pw@127.0.0.1:7000",
            "--target",
            "127.0.0.1:7001",
            "--db",
            "3",
            "--db",
            "0",
            "--match",
            "user:*",
            "--mode",
            "outline",
            "--passes",
            "5",
            "--qps",
            "0",
            "--ttl-tolerance",
            "500",
            "--expire-grace",
            "90s",
            "--batch",
            "1000",
            "--json",
        ])
        .unwrap();
        assert!(args.json);
        let config = args.config().unwrap();
        assert_eq!(config.dbs, [3, 0]);
        assert_eq!(config.pattern.as_deref(), Some(&b"user:*"[..]));
        assert_eq!(config.mode, Mode::Outline);
        assert_eq!(
            (
                config.passes,
                config.qps,
                config.ttl_tolerance_ms,
                config.batch
            ),
            (5, 0, 500, 1000)
        );
        assert_eq!(config.expire_grace_ms, 90_000);
        assert_eq!(config.source.password.as_deref(), Some("pw"));

        let defaults = parse(&["--source", "a:1", "--target", "b:2"]).unwrap();
        let config = defaults.config().unwrap();
        assert_eq!(config.mode, Mode::Full);
        assert_eq!((config.passes, config.qps, config.batch), (3, 5000, 100));
        assert_eq!(config.expire_grace_ms, 300_000);
        assert!(config.dbs.is_empty() && config.pattern.is_none());
    }

    #[test]
    fn a_syncs_filter_narrows_the_comparison() {
        let args = parse(&[
            "--source",
            "a:1",
            "--target",
            "b:2",
            "--db-map",
            "0=3,5=6",
            "--key-prefix",
            "app:",
            "--key-prefix",
            "web:",
            "--exclude-key-prefix",
            "app:tmp:",
        ])
        .unwrap();
        let config = args.config().unwrap();
        assert_eq!(config.db_map, [(0, 3), (5, 6)]);
        let filter = config.key_filter.expect("a key filter");
        assert!(filter.owns(b"web:1") && !filter.owns(b"app:tmp:1") && !filter.owns(b"x"));
        let clash = parse(&["--source", "a:1", "--target", "b:2", "--db-map", "0=1,2=1"])
            .unwrap()
            .config()
            .unwrap_err();
        assert!(clash.to_string().contains("filter.db-map"), "{clash}");
        assert_eq!(clash.exit_code(), 2);
        assert!(parse(&["--source", "a:1", "--target", "b:2", "--db-map", "x"]).is_err());
    }

    #[test]
    fn a_seed_list_shares_the_first_addresss_credentials() {
        let args = parse(&[
            "--source",
            "redis://:pw@10.0.0.1:7000, 10.0.0.2:7001,redis://other:secret@10.0.0.3:7002",
            "--target",
            "127.0.0.1:7001",
        ])
        .unwrap();
        let config = args.config().unwrap();
        assert_eq!(config.source.addr(), "10.0.0.1:7000");
        let seeds: Vec<(String, Option<&str>)> = config
            .source_seeds
            .iter()
            .map(|u| (u.addr(), u.password.as_deref()))
            .collect();
        assert_eq!(
            seeds,
            [
                ("10.0.0.2:7001".to_string(), Some("pw")),
                ("10.0.0.3:7002".to_string(), Some("secret"))
            ]
        );
        assert!(config.target_seeds.is_empty());
        assert_eq!(
            config.describe(crate::verify::Side::Source),
            "redis://:***@10.0.0.1:7000,10.0.0.2:7001,10.0.0.3:7002"
        );

        // The first address's password from a file goes to the others too.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let args = parse(&[
            "--source",
            "a:1",
            "--target",
            "redis://10.0.0.1:7000,10.0.0.2:7001",
            "--target-password-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        let config = args.config().unwrap();
        assert_eq!(config.target.password.as_deref(), Some("from-file"));
        assert_eq!(
            config.target_seeds[0].password.as_deref(),
            Some("from-file")
        );

        for bad in [
            "redis://a:1,http://b:2",
            "redis://a:1,b:x",
            "redis://:pw@a:1,app@b:2",
        ] {
            let args = parse(&["--source", bad, "--target", "b:2"]).unwrap();
            let error = args.config().unwrap_err();
            assert!(error.to_string().starts_with("--source"), "{bad}: {error}");
            assert!(!error.to_string().contains("pw"), "{error}");
        }
    }

    #[test]
    fn refuses_bad_flags() {
        assert!(parse(&["--source", "a:1"]).is_err());
        assert!(parse(&["--source", "a:1", "--target", "b:2", "--passes", "0"]).is_err());
        assert!(parse(&["--source", "a:1", "--target", "b:2", "--batch", "0"]).is_err());
        assert!(parse(&["--source", "a:1", "--target", "b:2", "--mode", "deep"]).is_err());
        assert!(parse(&["--source", "a:1", "--target", "b:2", "--expire-grace", "5"]).is_err());
        let bad_url = parse(&["--source", "http://a:1", "--target", "b:2"]).unwrap();
        assert!(bad_url.config().is_err());
        assert_eq!(VerifyCommandError::Differences { keys: 1 }.exit_code(), 1);
        assert_eq!(bad_url.config().unwrap_err().exit_code(), 2);
    }
}
