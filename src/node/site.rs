//! Two-way sync in a listener/drainer deployment (issue 11, item 1, "the
//! same in conf/"): `ferry site --config conf/site-a.toml` at one site and
//! `ferry site --config conf/site-b.toml` at the other, between two
//! standalone Redis 7 servers A and B.
//!
//! In: a [`SiteNodeConfig`]. Out: the site's process: the listener of its
//! own server, shipping to the other site's drainer, and a drainer whose
//! endpoint takes the other site's stream and applies it to the same
//! server, both in one WAL (`<data-dir>/wal`); side b's site also finds
//! the conflicts.
//!
//! # Partitions and ids
//!
//! The partitions are those of `ferry sync --two-way` (`super::two_way`):
//! A's stream is partition 0, B's partition 1, at both sites. Site a's WAL
//! holds partition 0 as its listener logs it and partition 1 as its drainer
//! receives it; site b's the other way round. Each drainer has its own id,
//! and its checkpoint on its server is `__ferry:checkpoint:<its id>:<the
//! other side's partition>`.
//!
//! # No loops
//!
//! The echo rule of `ferry sync --two-way` with the other drainer's id: a
//! site's drainer covers every entry of the other side's stream that
//! writes the other site's drainer's checkpoint of this site's own
//! partition (`ApplyConfig::two_way_echo_of`: the one `[[drainers]]` the
//! site ships to). Batches that apply nothing are held back, flushes and
//! `SWAPDB` refused, as in `ferry sync --two-way`.
//!
//! # Establishing
//!
//! Site a runs its listener and its drainer from the start; its drainer
//! never loads a snapshot (`refuse_loads`: A takes writes). Site b runs
//! only its drainer at first: the first full sync A → B arrives through it
//! (B passes the drainer's `existing-data` rule). Once B holds it (the
//! drainer's partition 0 online in a loaded epoch, and its checkpoint on B
//! `applied` in that epoch), site b marks B's stream as `ferry sync
//! --two-way` does (`MULTI; SET __ferry:two-way:<listener id> …; INFO
//! replication; EXEC`) and stores the mark as entry 1 of partition 1;
//! then its stages start again with the listener of B, its shipper to site
//! a, and a drainer that refuses loads from then on. Site a's drainer gets
//! partition 1 from entry 1 with no checkpoint on A: it applies from entry
//! 1, the mark, which writes only a `__ferry` key, so A gets exactly B's
//! writes after the point B held the full sync. A kill -9 before entry 1
//! is durable does it again from a new mark; after, partition 1 resumes
//! like any. What each side's drainer applied is its checkpoint on its own
//! server, so every kill -9 resumes each direction exactly once, as a
//! one-way listener/drainer pair does.
//!
//! # Conflicts
//!
//! Side b's site finds them (`super::conflicts`) from the two logs in its
//! WAL: partition 0 counts the ids its own drainer's checkpoints count
//! (the ids it received, after any reset of the first full sync), and
//! partition 1 the ids site a's drainer counts (its log started with
//! entry 1 and is never reset: it takes no snapshot). Site a's partition 0
//! would count the listener's ids instead, which a reset of the drainer's
//! log moves apart. So `conflict` is side b's setting, and a winner policy
//! needs `peer`, side a's server, which a repair may write.
//!
//! # Refused
//!
//! A Redis Cluster on either side (a site runs between standalone
//! servers), Redis before 7.0, and what `ferry sync --two-way` refuses: any
//! snapshot load once established (the site stops with the error), the
//! flushes, `SWAPDB`, a switchover.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::config::{ConflictPolicy, SiteNodeConfig, SiteSide};
use super::conflicts;
use super::run::{
    create_data_dir, finish, open_wal, precheck_first_sync, redacted, reopen_wal, start_admin,
    start_drainer_part, start_listeners, Node, NodeError, Stages, PRECHECK_OUTAGE,
};
use super::switchover::{check_master, connect, ensure_backlog};
use super::two_way::{
    seed_partition, unreachable, wait_full_sync, Pair, Seeding, BACKWARD, ESTABLISH_RETRY, FORWARD,
    MIN_VERSION,
};
use crate::apply::{ApplyConfig, ExistingData};
use crate::config_units::HumanDuration;
use crate::position::{now_unix_ms, PartitionId};
use crate::redis::url::RedisUrl;
use crate::ship::tls::ServerTls;
use crate::status::{
    ControlError, NodeControl, NodeStatus, SkipOutcome, SkipRequest, SyncSelector,
};
use crate::wal::Wal;

/// This site's listener's partition, and the other site's.
fn partitions(cfg: &SiteNodeConfig) -> (PartitionId, PartitionId) {
    match cfg.site.side {
        SiteSide::A => (FORWARD, BACKWARD),
        SiteSide::B => (BACKWARD, FORWARD),
    }
}

/// This site's server: its listener's source and its drainer's target.
fn server(cfg: &SiteNodeConfig) -> Result<RedisUrl, NodeError> {
    let checked = cfg
        .listener
        .listener
        .validate()
        .map_err(|e| NodeError::Config(format!("listener.{}: {}", e.field, e.reason)))?;
    if checked.seeds.len() > 1 {
        return Err(not_standalone(&checked.source));
    }
    Ok(checked.source)
}

fn not_standalone(url: &RedisUrl) -> NodeError {
    NodeError::Config(format!(
        "{} runs Redis Cluster: `ferry site` runs two-way sync between two standalone servers \
         (between clusters, use `ferry sync --two-way`)",
        url.addr()
    ))
}

/// Whether this site runs both directions: always on side a; on side b
/// once partition 1's entry 1 (B's mark) is durable.
fn established(cfg: &SiteNodeConfig, wal: &Wal) -> Result<bool, NodeError> {
    match cfg.site.side {
        SiteSide::A => Ok(true),
        SiteSide::B => wal
            .last_log_id(BACKWARD)
            .map(|last| last.is_some())
            .map_err(|error| NodeError::Fatal(format!("reading the WAL: {error}"))),
    }
}

/// The drainer's applier config: two-way's echo rule with the other
/// site's drainer, silent batches held, loads refused once this side takes
/// writes, no foreign-write sampler.
fn site_apply(cfg: &SiteNodeConfig, established: bool) -> ApplyConfig {
    let (own, _) = partitions(cfg);
    ApplyConfig {
        two_way_peers: Some(own.0..=own.0),
        two_way_echo_of: cfg.listener.drainers.first().map(|peer| peer.id.clone()),
        refuse_loads: established,
        foreign_writes_every: HumanDuration(Duration::ZERO),
        ..cfg.drainer.apply.clone()
    }
}

/// The checks before a site's first start (its WAL is empty): its server
/// as a source and as a target (side a's data stays: it never loads), Redis
/// 7.0 or later, not a cluster. A server that does not answer yet is left
/// to the stages, which wait for it (and side b's establishing checks again).
async fn precheck(cfg: &SiteNodeConfig, wal: &Wal) -> Result<(), NodeError> {
    let url = server(cfg)?;
    precheck_first_sync(wal, Some(&cfg.listener.listener), None, PRECHECK_OUTAGE).await?;
    let mut apply = cfg.drainer.apply.clone();
    if cfg.site.side == SiteSide::A {
        apply.existing_data = ExistingData::Keep;
    }
    precheck_first_sync(wal, None, Some(&apply), PRECHECK_OUTAGE).await?;
    match check_server(&url).await {
        Err(why) if !unreachable(&why) => Err(NodeError::Precheck(why)),
        Err(why) => {
            warn!(%why, "site precheck: the server does not answer yet");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Redis 7.0 or later, a master, not a cluster.
async fn check_server(url: &RedisUrl) -> Result<(), String> {
    match crate::redis::cluster::is_cluster(url).await {
        Ok(true) => return Err(not_standalone(url).to_string()),
        Ok(false) => {}
        Err(error) => return Err(format!("connecting to {}: {error}", url.addr())),
    }
    let mut client = connect(url).await?;
    check_master(&mut client, &url.addr(), "this site's server", MIN_VERSION)
        .await
        .map(|_| ())
        .map_err(|why| {
            format!(
                "two-way sync: {why} (before 7.0 a script may be replicated verbatim instead of \
                 by its effects, and ferry's echo rule rests on how 7.0 propagates transactions)"
            )
        })
}

/// Starts this site's stages: the listener (side b: once established),
/// the drainer, and on side b once established the conflict detector.
async fn start_site_stages(
    cfg: &SiteNodeConfig,
    wal: Wal,
    established: bool,
    stages: &mut Stages,
) -> Result<Arc<Node>, NodeError> {
    let url = server(cfg)?;
    if let Ok(true) = crate::redis::cluster::is_cluster(&url).await {
        return Err(not_standalone(&url));
    }
    let data_dir = &cfg.listener.data_dir;
    let (own, other) = partitions(cfg);
    let mut listeners = Vec::new();
    if established {
        listeners.push(
            start_listeners(
                data_dir,
                data_dir,
                &cfg.listener.listener,
                wal.clone(),
                cfg.listener.ship.clone(),
                &cfg.listener.drainers,
                stages,
            )
            .await?,
        );
    }
    let tls = cfg
        .drainer
        .drainer
        .tls
        .as_ref()
        .map(ServerTls::new)
        .transpose()
        .map_err(|e| NodeError::Config(format!("drainer.tls.{e}")))?;
    let socket = tokio::net::TcpListener::bind(&cfg.drainer.listen)
        .await
        .map_err(|error| NodeError::Io {
            what: format!("binding the ship endpoint on {}", cfg.drainer.listen),
            error,
        })?;
    info!(listen = %cfg.drainer.listen, side = cfg.site.side.as_str(), partition = %other, tls = tls.is_some(), mutual_tls = cfg.drainer.drainer.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()), "ship endpoint listening for the other site's stream");
    let drainer = start_drainer_part(
        socket,
        tls,
        cfg.drainer.drainer.clone(),
        wal.clone(),
        site_apply(cfg, established),
        Some(other),
        stages,
    )?;
    let mut node = Node {
        role: "site",
        listeners,
        drainers: vec![drainer],
        conflicts: None,
        wals: vec![("site", wal.clone())],
    };
    if established && cfg.site.side == SiteSide::B {
        let resolution = match (cfg.site.conflict, &cfg.peer) {
            (ConflictPolicy::Report, _) | (_, None) => None,
            (policy, Some(a)) => Some(conflicts::Resolution {
                policy,
                sides: [vec![a.clone()], vec![url.clone()]],
                pair: Pair::Standalone,
            }),
        };
        let peer_drainer = cfg
            .listener
            .drainers
            .first()
            .map(|peer| peer.id.clone())
            .unwrap_or_default();
        let stats = Arc::new(conflicts::ConflictStats::default());
        stages.tasks.push(tokio::spawn(conflicts::run(
            wal,
            data_dir.clone(),
            // Into A: site a's drainer; into B: this site's.
            [peer_drainer, cfg.drainer.apply.drainer_id.clone()],
            cfg.drainer
                .apply
                .keyspace()
                .map_err(|error| NodeError::Config(error.to_string()))?,
            Arc::clone(&stats),
            stages.shutdown.clone(),
            resolution,
            Pair::Standalone,
        )));
        node.conflicts = Some(stats);
    }
    info!(side = cfg.site.side.as_str(), server = %redacted(&cfg.listener.listener.source), partition = %own, established, "site running");
    Ok(Arc::new(node))
}

/// Side b: waits for the first full sync in B, then marks B's stream and
/// stores the mark as partition 1's entry 1 (module doc, "Establishing").
/// `Ok(())` once it is durable, or when `stop` fires (the caller sees
/// which); `Err` for a refusal no retry fixes.
async fn establish(
    cfg: &SiteNodeConfig,
    wal: &Wal,
    node: &Arc<dyn NodeControl>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let b = server(cfg).map_err(|e| e.to_string())?;
    let drainer_id = &cfg.drainer.apply.drainer_id;
    if !wait_full_sync(
        node,
        drainer_id,
        std::slice::from_ref(&b),
        Pair::Standalone,
        stop,
    )
    .await?
    {
        return Ok(());
    }
    loop {
        let started = Instant::now();
        match seed(cfg, wal, &b).await {
            Ok(detail) => {
                info!(
                    ms = started.elapsed().as_millis() as u64,
                    %detail,
                    "two-way sync established: this site's writes replicate to the other site"
                );
                return Ok(());
            }
            Err(Seeding::Refused(why)) => return Err(why),
            Err(Seeding::Failed(why)) => {
                warn!(%why, "two-way site: cannot start this side's direction yet; retrying")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(ESTABLISH_RETRY) => {}
        }
    }
}

/// B checked, its backlog made, partition 1's history, then B marked and
/// the mark stored as entry 1.
async fn seed(cfg: &SiteNodeConfig, wal: &Wal, b: &RedisUrl) -> Result<String, Seeding> {
    check_server(b)
        .await
        .map_err(|why| match unreachable(&why) {
            true => Seeding::Failed(why),
            false => Seeding::Refused(why),
        })?;
    ensure_backlog(b).await.map_err(Seeding::Failed)?;
    let history = wal
        .open_history(BACKWARD, &cfg.listener.listener.id)
        .await
        .map_err(|error| Seeding::Failed(format!("partition 1's history: {error}")))?;
    let note = format!(
        "{{\"unix-ms\":{},\"site\":\"b\",\"drainer\":\"{}\"}}",
        now_unix_ms(),
        cfg.drainer.apply.drainer_id
    );
    let name = format!("two-way:{}", cfg.listener.listener.id);
    let (replid, offset) = seed_partition(wal, BACKWARD, b, &name, &note).await?;
    Ok(format!(
        "partition 1 starts at {} replid {replid} offset {offset}, log {:016x}",
        b.addr(),
        history.log_tag
    ))
}

/// What answers a site's admin API: the node of the stages running (none
/// while side b restarts them once established).
#[derive(Default)]
struct SiteHost {
    node: Mutex<Option<Arc<Node>>>,
}

impl SiteHost {
    fn current(&self) -> Result<Arc<Node>, ControlError> {
        self.node
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or_else(|| {
                ControlError::Refused(
                    "the site is starting both directions; try again in a moment".into(),
                )
            })
    }

    fn set(&self, node: Option<Arc<Node>>) {
        *self
            .node
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = node;
    }
}

impl NodeControl for SiteHost {
    fn status(&self) -> NodeStatus {
        match self.current() {
            Ok(node) => node.status(),
            Err(_) => NodeStatus {
                role: "site".into(),
                taken_unix_ms: now_unix_ms(),
                ..NodeStatus::default()
            },
        }
    }

    fn stop_sync(&self, which: &SyncSelector) -> Result<usize, ControlError> {
        self.current()?.stop_sync(which)
    }

    fn restart_sync(&self, which: &SyncSelector) -> Result<usize, ControlError> {
        self.current()?.restart_sync(which)
    }

    fn skip(&self, request: &SkipRequest) -> Result<SkipOutcome, ControlError> {
        self.current()?.skip(request)
    }
}

/// `ferry site`: runs until `shutdown` is cancelled.
pub async fn run_site(cfg: SiteNodeConfig, shutdown: CancellationToken) -> Result<(), NodeError> {
    let data_dir = cfg.listener.data_dir.clone();
    create_data_dir(&data_dir)?;
    let mut wal = open_wal(cfg.listener.wal.clone()).await?;
    if wal.partitions().is_empty() {
        if let Err(error) = precheck(&cfg, &wal).await {
            let _ = wal.close().await;
            return Err(error);
        }
    }
    let host = Arc::new(SiteHost::default());
    let control: Arc<dyn NodeControl> = host.clone();
    let mut admin = Stages::new(shutdown.clone());
    start_admin(
        &data_dir,
        &cfg.listener.admin,
        &cfg.listener.admin_access,
        control.clone(),
        &mut admin,
    )
    .await?;
    let result = loop {
        let running = shutdown.child_token();
        let mut stages = Stages::new(running.clone());
        let both = match established(&cfg, &wal) {
            Ok(both) => both,
            Err(error) => break Err(error),
        };
        let node = match start_site_stages(&cfg, wal.clone(), both, &mut stages).await {
            Ok(node) => node,
            Err(error) => {
                running.cancel();
                for task in stages.tasks {
                    let _ = task.await;
                }
                let _ = wal.close().await;
                break Err(error);
            }
        };
        host.set(Some(Arc::clone(&node)));
        let ended = finish(stages, node, vec![wal.clone()]);
        if both {
            break ended.await;
        }
        tokio::pin!(ended);
        let done = {
            let establishing = establish(&cfg, &wal, &control, &running);
            tokio::pin!(establishing);
            tokio::select! {
                result = &mut ended => break result,
                done = &mut establishing => done,
            }
        };
        match done {
            // Stopping: `ended` follows.
            Ok(()) if running.is_cancelled() => break ended.await,
            Ok(()) => {
                host.set(None);
                running.cancel();
                if let Err(error) = ended.await {
                    break Err(error);
                }
                if shutdown.is_cancelled() {
                    break Ok(());
                }
                // The last handle: RocksDB's lock goes with it.
                drop(wal);
                wal = match reopen_wal(cfg.listener.wal.clone()).await {
                    Ok(wal) => wal,
                    Err(error) => break Err(error),
                };
            }
            Err(why) => {
                error!(%why, "two-way site cannot start this side's direction");
                running.cancel();
                let _ = ended.await;
                break Err(NodeError::Fatal(why));
            }
        }
    };
    host.set(None);
    shutdown.cancel();
    for task in admin.tasks {
        let _ = task.await;
    }
    result
}
