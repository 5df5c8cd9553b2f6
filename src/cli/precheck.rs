//! `ferry precheck --source URL --target URL [--json]`: the checks of
//! [`crate::precheck`] as a PASS / WARN / FAIL table (or JSON); exit code 1
//! when any check FAILs. Either URL may be a Redis Cluster's seed list.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::apply::keyspace::FilterError;
use crate::apply::ExistingData;
use crate::config_units::HumanDuration;
use crate::precheck::{self, PrecheckConfig, Report};
use crate::secret::{FlagUrlError, SecretUrl};

/// `ferry precheck` flags.
#[derive(Debug, Clone, Args)]
pub struct PrecheckArgs {
    /// The source Redis: `redis://[user[:password]@]host:port`, or any node
    /// of a Redis Cluster, or a comma-separated seed list of its nodes
    /// (`redis://host1:port,host2:port`; the others take the first one's
    /// credentials): every master is checked. A password here shows in
    /// `ps`: prefer --source-password-file or FERRY_SOURCE_PASSWORD.
    #[arg(long)]
    pub source: SecretUrl,
    /// The target Redis: `redis://[user[:password]@]host:port`, or any node
    /// or a seed list of a Redis Cluster, as --source (see
    /// --target-password-file, FERRY_TARGET_PASSWORD).
    #[arg(long)]
    pub target: SecretUrl,
    /// A file holding the source's password.
    #[arg(long, value_name = "FILE")]
    pub source_password_file: Option<PathBuf>,
    /// A file holding the target's password.
    #[arg(long, value_name = "FILE")]
    pub target_password_file: Option<PathBuf>,
    /// The dbs the sync will own on the target, e.g. `0,5` (default: every
    /// db).
    #[arg(long, value_delimiter = ',')]
    pub dbs: Option<Vec<u32>>,
    /// The source dbs and keys the sync will own (as `ferry sync`).
    #[command(flatten)]
    pub filter: super::FilterArgs,
    /// What the sync will do with keys already in the owned dbs:
    /// `refuse` (default: FAIL if there are any), `keep`, `flush`.
    #[arg(long, value_name = "refuse|keep|flush", default_value = "refuse")]
    pub existing_data: ExistingData,
    /// The outage of the listener (or its link to the source) that must not
    /// force a full sync: the source's backlog is checked against it.
    #[arg(long, default_value = "60s")]
    pub outage: HumanDuration,
    /// The sync's id: its checkpoint on the target means it resumes.
    #[arg(long)]
    pub id: Option<String>,
    /// How long the source's write rate is measured.
    #[arg(long, default_value = "1s")]
    pub sample: HumanDuration,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PrecheckCommandError {
    #[error(transparent)]
    Url(#[from] FlagUrlError),
    #[error("{0}")]
    Filter(FilterError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// At least one check failed (the report was printed).
    #[error("precheck failed")]
    Failed,
}

/// Runs the checks and prints the report.
pub fn precheck(args: &PrecheckArgs) -> Result<(), PrecheckCommandError> {
    let side = |which, text, file| {
        super::verify::seeds_from_flags(which, text, file).map(|(first, others)| {
            let mut seeds = vec![first];
            seeds.extend(others);
            seeds
        })
    };
    let mut cfg = PrecheckConfig::new(
        side("source", &args.source, args.source_password_file.as_deref())?,
        side("target", &args.target, args.target_password_file.as_deref())?,
    );
    cfg.keyspace = args
        .filter
        .to_config(args.dbs.clone())
        .keyspace()
        .map_err(PrecheckCommandError::Filter)?;
    cfg.existing_data = args.existing_data;
    cfg.outage = args.outage.0;
    cfg.id = args.id.clone();
    cfg.sample = args.sample.0.max(Duration::from_millis(10));
    let report: Report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PrecheckCommandError::Runtime)?
        .block_on(precheck::run(&cfg));
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render());
    }
    if report.failed() {
        return Err(PrecheckCommandError::Failed);
    }
    Ok(())
}
