//! Two-way sync in a listener/drainer deployment (issue 11, item 1, "the
//! same in conf/"): `ferry site --config conf/site-a.toml` at one site and
//! `ferry site --config conf/site-b.toml` at the other, between two Redis 7
//! servers A and B, each a standalone server or a Redis Cluster
//! ("Clusters" below).
//!
//! In: a [`SiteNodeConfig`]. Out: the site's process: the listener of its
//! own server, shipping to the other site's drainer, and a drainer whose
//! endpoint takes the other site's stream and applies it to the same
//! server, both in one WAL (`<data-dir>/wal`); side b's site also finds
//! the conflicts.
//!
//! # Partitions and ids
//!
//! The partitions are those of `ferry sync --two-way` (`super::two_way`)
//! for the same pair; between two standalone servers (below; "Clusters"
//! for the others) A's stream is partition 0, B's partition 1, at both
//! sites. Site a's WAL
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
//! # Clusters
//!
//! With a cluster on either side the partitions are those of `ferry sync
//! --two-way` between such a pair (`super::two_way`, "Two clusters", "A
//! standalone server and a cluster"): A's one partition 0 or one per master
//! below [`CLUSTER_BACKWARD_BASE`], B's one partition
//! [`CLUSTER_BACKWARD_BASE`] or one per master from it (a cluster B's shard
//! map and slot table in [`CLUSTER_BACKWARD_DIR`]). Each site's drainer
//! applies the other site's range ([`Layout::other`]) and covers echoes of
//! its own ([`Layout::own`]). Side b needs `peer`, A's address: it counts
//! A's masters (the first full sync is in B once each of their partitions
//! is loaded), and establishing is `ferry sync --two-way`'s
//! (`super::two_way::seed_backward`): A prepared as the target of B's
//! partitions for site a's drainer (owner map, slot scopes, a floor per
//! partition, `applied=1` without a log tag: site a's WAL has its own tags
//! for those logs, and a checkpoint without one is taken as the reader's),
//! each master of B marked and its mark stored as its partition's entry 1,
//! then the established file. What a site runs between is asked once, at
//! the first start, and stored in [`LAYOUT_FILE`] (side a: whether A is a
//! cluster; side b: the pair, A's kind asked through `peer`). Without
//! `peer` side b pairs with a standalone A: a cluster B is a config error,
//! and a side a shipping more than partition 0 stops the establishing.
//!
//! # Refused
//!
//! Redis before 7.0 (on every master of a cluster), and what `ferry sync
//! --two-way` refuses: any snapshot load once established (the site stops
//! with the error), the flushes, `SWAPDB`, a switchover.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::config::{ConflictPolicy, SiteNodeConfig, SiteSide};
use super::conflicts;
use super::run::{
    create_data_dir, finish, open_wal, precheck_first_sync, redacted, reopen_wal, start_admin,
    start_drainer_part, start_listeners, write_atomically, Node, NodeError, Stages,
    PRECHECK_OUTAGE,
};
use super::switchover::{check_master, cluster_masters, connect, ensure_backlog, is_cluster};
use super::two_way::{
    retry_seeding, seed_backward, seed_partition, unreachable, wait_full_sync, Backward, Pair,
    Seeding, BACKWARD, CLUSTER_BACKWARD_BASE, CLUSTER_BACKWARD_DIR, CLUSTER_ESTABLISHED_FILE,
    ESTABLISH_RETRY, FORWARD, MIN_VERSION,
};
use crate::apply::{ApplyConfig, ExistingData};
use crate::config_units::HumanDuration;
use crate::listener::ListenerConfig;
use crate::position::{now_unix_ms, PartitionId};
use crate::redis::url::RedisUrl;
use crate::ship::tls::ServerTls;
use crate::status::{
    ControlError, NodeControl, NodeStatus, SkipOutcome, SkipRequest, SyncSelector,
};
use crate::wal::Wal;

/// What a site runs between, settled at its first start and stored in
/// [`LAYOUT_FILE`] (module doc, "Clusters"): side a knows its own server's
/// kind, side b the pair (A's kind asked through `peer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Side a: whether A runs Redis Cluster.
    A { cluster: bool },
    /// Side b: the pair of A and B.
    B(Pair),
}

/// The site's [`Layout`], in its data dir.
pub const LAYOUT_FILE: &str = "site.layout";

impl Layout {
    /// The partitions of this site's listener.
    fn own(self) -> RangeInclusive<u32> {
        match self {
            Layout::A { cluster } => Pair::of(cluster, false).forward(),
            Layout::B(pair) => pair.backward(),
        }
    }

    /// The partitions the site's drainer applies: the other site's.
    fn other(self) -> RangeInclusive<u32> {
        match self {
            // B's partitions are above A's, whatever B is.
            Layout::A { .. } => self.own().end().saturating_add(1)..=u32::MAX,
            Layout::B(pair) => pair.forward(),
        }
    }

    fn as_string(self) -> String {
        match self {
            Layout::A { cluster: false } => "a standalone".into(),
            Layout::A { cluster: true } => "a cluster".into(),
            Layout::B(pair) => format!("b {}", pair.as_str()),
        }
    }

    fn parse(text: &str) -> Option<Layout> {
        match text.split_once(' ')? {
            ("a", "standalone") => Some(Layout::A { cluster: false }),
            ("a", "cluster") => Some(Layout::A { cluster: true }),
            ("b", pair) => Pair::parse(pair).map(Layout::B),
            _ => None,
        }
    }
}

/// The layout stored in the data dir; without the file, a WAL holding a
/// log is a site of a ferry before clusters, which ran between standalone
/// servers only. `Ok(None)`: not settled yet.
fn stored_layout(cfg: &SiteNodeConfig, wal: &Wal) -> Result<Option<Layout>, NodeError> {
    if let Some(layout) = layout_file(&cfg.listener.data_dir, cfg.site.side)? {
        return Ok(Some(layout));
    }
    let holds_log = wal
        .partitions()
        .into_iter()
        .any(|p| matches!(wal.last_log_id(p), Ok(Some(_))));
    Ok(holds_log.then_some(match cfg.site.side {
        SiteSide::A => Layout::A { cluster: false },
        SiteSide::B => Layout::B(Pair::Standalone),
    }))
}

/// [`LAYOUT_FILE`] in `data_dir`, if there is one, checked against the
/// config's `side`.
fn layout_file(data_dir: &std::path::Path, side: SiteSide) -> Result<Option<Layout>, NodeError> {
    let path = data_dir.join(LAYOUT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let layout = Layout::parse(text.trim()).ok_or_else(|| {
                NodeError::Config(format!(
                    "{}: {:?} is not a site layout (\"a standalone\", \"a cluster\", or \"b \" \
                     and a two-way pair)",
                    path.display(),
                    text.trim()
                ))
            })?;
            let stored = match layout {
                Layout::A { .. } => SiteSide::A,
                Layout::B(_) => SiteSide::B,
            };
            if stored != side {
                return Err(NodeError::Config(format!(
                    "{} is side {}'s data dir; this config is side {}'s",
                    data_dir.display(),
                    stored.as_str(),
                    side.as_str()
                )));
            }
            Ok(Some(layout))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(NodeError::Io {
            what: format!("reading {}", path.display()),
            error,
        }),
    }
}

/// How often the first start asks the servers again what they are.
const LAYOUT_RETRY: Duration = Duration::from_secs(1);

/// The first start (nothing stored): asks this site's server, and on side
/// b `peer`, whether they run Redis Cluster until they answer, and stores
/// the layout before any stage starts. Side b without `peer` pairs with a
/// standalone A (establishing refuses a side a that ships more than one
/// partition); a cluster B needs `peer`. `Ok(None)`: `stop` fired first.
async fn settle_layout(
    cfg: &SiteNodeConfig,
    wal: &Wal,
    stop: &CancellationToken,
) -> Result<Option<Layout>, NodeError> {
    let own = servers(cfg)?;
    loop {
        if let Some(layout) = stored_layout(cfg, wal)? {
            return Ok(Some(layout));
        }
        let asked = match is_cluster(&own, "this site's server").await {
            Err(why) => Err(why),
            Ok(cluster) if cfg.site.side == SiteSide::A => Ok(Layout::A { cluster }),
            Ok(b_cluster) => match &cfg.peer {
                Some(peer) => is_cluster(std::slice::from_ref(peer), "side a's server (peer)")
                    .await
                    .map(|a_cluster| Layout::B(Pair::of(a_cluster, b_cluster))),
                None if b_cluster => {
                    return Err(NodeError::Config(format!(
                        "site.peer: {} runs Redis Cluster; side b prepares side a's server \
                         as the target of B's shards, so name it (peer = \"redis://…\")",
                        own[0].addr()
                    )))
                }
                None => Ok(Layout::B(Pair::Standalone)),
            },
        };
        match asked {
            Ok(layout) => {
                let path = cfg.listener.data_dir.join(LAYOUT_FILE);
                write_atomically(&path, &format!("{}\n", layout.as_string())).map_err(|error| {
                    NodeError::Io {
                        what: format!("writing {}", path.display()),
                        error,
                    }
                })?;
                info!(layout = %layout.as_string(), "two-way site: the layout is stored in the data dir");
                return Ok(Some(layout));
            }
            Err(why) => {
                warn!(%why, "two-way site: waiting for the servers to answer whether they run Redis Cluster (the first start stores it)")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(LAYOUT_RETRY) => {}
        }
    }
}

/// This site's server: its listener's source and its drainer's target (a
/// cluster's seeds).
fn servers(cfg: &SiteNodeConfig) -> Result<Vec<RedisUrl>, NodeError> {
    cfg.listener
        .listener
        .validate()
        .map(|checked| checked.seeds)
        .map_err(|e| NodeError::Config(format!("listener.{}: {}", e.field, e.reason)))
}

/// The site's listener: partition 0 on side a (a cluster A: a partition
/// per master from 0, its shard map in the data dir); on side b B's
/// partition of the pair (a cluster B: a partition per master from
/// [`CLUSTER_BACKWARD_BASE`], its shard map in [`CLUSTER_BACKWARD_DIR`],
/// written at establishing). Returns it with the dir of its shard map.
fn site_listener(cfg: &SiteNodeConfig, layout: Layout) -> (ListenerConfig, PathBuf) {
    let mut listener = cfg.listener.listener.clone();
    let data_dir = &cfg.listener.data_dir;
    match layout {
        Layout::A { .. } => {
            listener.partition = FORWARD.0;
            (listener, data_dir.clone())
        }
        Layout::B(pair) => {
            listener.partition = match pair {
                Pair::Standalone => BACKWARD.0,
                Pair::ClusterStandalone => CLUSTER_BACKWARD_BASE,
                Pair::Clusters | Pair::StandaloneCluster => 0,
            };
            let dir = match pair.is_cluster(1) {
                true => data_dir.join(CLUSTER_BACKWARD_DIR),
                false => data_dir.clone(),
            };
            (listener, dir)
        }
    }
}

/// Whether this site runs both directions: always on side a; on side b
/// once B's partitions' entries 1 (its marks) are durable.
fn established(cfg: &SiteNodeConfig, wal: &Wal, layout: Layout) -> Result<bool, NodeError> {
    match layout {
        Layout::A { .. } => Ok(true),
        Layout::B(pair) => match pair {
            Pair::Standalone => wal
                .last_log_id(BACKWARD)
                .map(|last| last.is_some())
                .map_err(|error| NodeError::Fatal(format!("reading the WAL: {error}"))),
            _ => Ok(cfg
                .listener
                .data_dir
                .join(CLUSTER_ESTABLISHED_FILE)
                .exists()),
        },
    }
}

/// The drainer's applier config: two-way's echo rule with the other
/// site's drainer, silent batches held, loads refused once this side takes
/// writes, no foreign-write sampler.
fn site_apply(cfg: &SiteNodeConfig, layout: Layout, established: bool) -> ApplyConfig {
    ApplyConfig {
        two_way_peers: Some(layout.own()),
        two_way_echo_of: cfg.listener.drainers.first().map(|peer| peer.id.clone()),
        refuse_loads: established,
        foreign_writes_every: HumanDuration(Duration::ZERO),
        ..cfg.drainer.apply.clone()
    }
}

/// The checks before a site's first start (its WAL is empty): its server
/// as a source and as a target (side a's data stays: it never loads), Redis
/// 7.0 or later on every master. A server that does not answer yet is left
/// to the stages, which wait for it (and side b's establishing checks again).
async fn precheck(cfg: &SiteNodeConfig, wal: &Wal) -> Result<(), NodeError> {
    let own = servers(cfg)?;
    precheck_first_sync(wal, Some(&cfg.listener.listener), None, PRECHECK_OUTAGE).await?;
    let mut apply = cfg.drainer.apply.clone();
    if cfg.site.side == SiteSide::A {
        apply.existing_data = ExistingData::Keep;
    }
    precheck_first_sync(wal, None, Some(&apply), PRECHECK_OUTAGE).await?;
    match check_server(&own).await {
        Err(why) if !unreachable(&why) => Err(NodeError::Precheck(why)),
        Err(why) => {
            warn!(%why, "site precheck: the server does not answer yet");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// A master of Redis 7.0 or later (a cluster: every master, every slot
/// served, none moving).
async fn check_server(own: &[RedisUrl]) -> Result<(), String> {
    let why = |why: String| {
        format!(
            "two-way sync: {why} (before 7.0 a script may be replicated verbatim instead of \
             by its effects, and ferry's echo rule rests on how 7.0 propagates transactions)"
        )
    };
    if is_cluster(own, "this site's server").await? {
        return cluster_masters(own, "this site's server", MIN_VERSION)
            .await
            .map(|_| ())
            .map_err(why);
    }
    let url = own.first().ok_or("no server")?;
    let mut client = connect(url).await?;
    check_master(&mut client, &url.addr(), "this site's server", MIN_VERSION)
        .await
        .map(|_| ())
        .map_err(why)
}

/// Starts this site's stages: the listener (side b: once established),
/// the drainer, and on side b once established the conflict detector.
async fn start_site_stages(
    cfg: &SiteNodeConfig,
    wal: Wal,
    layout: Layout,
    established: bool,
    stages: &mut Stages,
) -> Result<Arc<Node>, NodeError> {
    let own = servers(cfg)?;
    let data_dir = &cfg.listener.data_dir;
    let mut listeners = Vec::new();
    if established {
        let (listener, cluster_dir) = site_listener(cfg, layout);
        listeners.push(
            start_listeners(
                data_dir,
                &cluster_dir,
                &listener,
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
    let other = layout.other();
    info!(listen = %cfg.drainer.listen, side = cfg.site.side.as_str(), partitions = ?other, tls = tls.is_some(), mutual_tls = cfg.drainer.drainer.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()), "ship endpoint listening for the other site's stream");
    let drainer = start_drainer_part(
        socket,
        tls,
        cfg.drainer.drainer.clone(),
        wal.clone(),
        site_apply(cfg, layout, established),
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
    if let (true, Layout::B(pair)) = (established, layout) {
        let resolution = match (cfg.site.conflict, &cfg.peer) {
            (ConflictPolicy::Report, _) | (_, None) => None,
            (policy, Some(a)) => Some(conflicts::Resolution {
                policy,
                sides: [vec![a.clone()], own.clone()],
                pair,
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
            pair,
        )));
        node.conflicts = Some(stats);
    }
    info!(side = cfg.site.side.as_str(), server = %redacted(&cfg.listener.listener.source), layout = %layout.as_string(), partitions = ?layout.own(), established, "site running");
    Ok(Arc::new(node))
}

/// Side b: waits for the first full sync in B, then marks B's stream (a
/// cluster B: each master's) and stores each mark as its partition's entry
/// 1 (module doc, "Establishing", "Clusters"). `Ok(())` once established,
/// or when `stop` fires (the caller sees which); `Err` for a refusal no
/// retry fixes.
async fn establish(
    cfg: &SiteNodeConfig,
    wal: &Wal,
    pair: Pair,
    node: &Arc<dyn NodeControl>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let b = servers(cfg).map_err(|e| e.to_string())?;
    let a: Vec<RedisUrl> = cfg.peer.iter().cloned().collect();
    let drainer_id = &cfg.drainer.apply.drainer_id;
    let Some(expected) = forward_partitions(&a, pair, stop).await else {
        return Ok(());
    };
    if !wait_full_sync(node, drainer_id, &b, pair, Some(expected), stop).await? {
        return Ok(());
    }
    let plan = Backward {
        a: &a,
        b: &b,
        pair,
        listener_id: &cfg.listener.listener.id,
        a_drainer: cfg
            .listener
            .drainers
            .first()
            .map_or("", |peer| peer.id.as_str()),
        same_wal: false,
        mark_id: &cfg.listener.listener.id,
        data_dir: &cfg.listener.data_dir,
    };
    let attempt = || async {
        match pair {
            Pair::Standalone => seed(cfg, wal, &b[0]).await,
            _ => seed_backward(&plan, wal).await,
        }
    };
    retry_seeding(
        stop,
        "two-way sync established: this site's writes replicate to the other site",
        "two-way site: cannot start this side's direction yet; retrying",
        attempt,
    )
    .await
}

/// How many partitions side a's stream has: a cluster A's masters (asked
/// through `peer` until it answers), else one. `None`: `stop` fired first.
async fn forward_partitions(a: &[RedisUrl], pair: Pair, stop: &CancellationToken) -> Option<usize> {
    if !pair.is_cluster(0) {
        return Some(1);
    }
    loop {
        match cluster_masters(a, "side a's", MIN_VERSION).await {
            Ok((masters, _)) => return Some(masters.len()),
            Err(why) => {
                warn!(%why, "two-way site: cannot count side a's masters yet (the first full sync waits for each); retrying")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(ESTABLISH_RETRY) => {}
        }
    }
}

/// Between standalone servers: B checked, its backlog made, partition 1's
/// history, then B marked and the mark stored as entry 1. Refused when side
/// a ships more than partition 0 (A runs Redis Cluster, which this side
/// learns from `peer` only).
async fn seed(cfg: &SiteNodeConfig, wal: &Wal, b: &RedisUrl) -> Result<String, Seeding> {
    let own = &cfg.listener.listener.id;
    let foreign = |p: PartitionId| {
        p != FORWARD && !matches!(wal.history(p), Ok(Some(history)) if history.owner == *own)
    };
    if let Some(partition) = wal.partitions().into_iter().find(|p| foreign(*p)) {
        return Err(Seeding::Refused(format!(
            "side a ships partition {partition}: A runs Redis Cluster; name side a's server in \
             [site] peer (side b pairs with a cluster through it) and give this site a new data dir"
        )));
    }
    check_server(std::slice::from_ref(b))
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
    let layout = match settle_layout(&cfg, &wal, &shutdown).await {
        Ok(Some(layout)) => layout,
        Ok(None) => {
            let _ = wal.close().await;
            for task in admin.tasks {
                let _ = task.await;
            }
            return Ok(());
        }
        Err(error) => {
            let _ = wal.close().await;
            shutdown.cancel();
            for task in admin.tasks {
                let _ = task.await;
            }
            return Err(error);
        }
    };
    let result = loop {
        let running = shutdown.child_token();
        let mut stages = Stages::new(running.clone());
        let both = match established(&cfg, &wal, layout) {
            Ok(both) => both,
            Err(error) => break Err(error),
        };
        let node = match start_site_stages(&cfg, wal.clone(), layout, both, &mut stages).await {
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
        let Layout::B(pair) = layout else {
            break ended.await;
        };
        let done = {
            let establishing = establish(&cfg, &wal, pair, &control, &running);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// For every pair, each site's drainer applies exactly the other
    /// site's partitions and covers echoes of its own, the two ranges
    /// never meet, and a layout reads back as written.
    #[test]
    fn the_layouts_keep_the_sites_apart() {
        for (a_cluster, b_cluster) in [(false, false), (true, true), (false, true), (true, false)] {
            let pair = Pair::of(a_cluster, b_cluster);
            let (a, b) = (Layout::A { cluster: a_cluster }, Layout::B(pair));
            let (a_parts, b_parts) = (pair.forward(), pair.backward());
            assert_eq!(a.own(), a_parts, "{pair:?}");
            assert_eq!(b.own(), b_parts, "{pair:?}");
            assert_eq!(b.other(), a_parts, "{pair:?}");
            // Side a does not know B's kind: its drainer takes every
            // partition above its own, which holds each of B's.
            for p in [*b_parts.start(), *b_parts.start() + 2] {
                assert!(
                    a.other().contains(&p) || !b_parts.contains(&p),
                    "{pair:?} {p}"
                );
            }
            for p in [0, 1, 2, 999, 1000, 1001] {
                assert!(
                    !(a.own().contains(&p) && a.other().contains(&p)),
                    "{pair:?} {p}"
                );
                assert!(
                    !(b.own().contains(&p) && b.other().contains(&p)),
                    "{pair:?} {p}"
                );
            }
            for layout in [a, b] {
                assert_eq!(Layout::parse(&layout.as_string()), Some(layout));
            }
        }
        assert_eq!(Layout::parse("c clusters"), None);
        assert_eq!(Layout::parse("b nothing"), None);
    }

    /// The stored layout is read back on its side; another side's data dir
    /// and a damaged file are config errors naming them.
    #[test]
    fn a_stored_layout_is_checked_against_the_config() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(layout_file(dir.path(), SiteSide::B), Ok(None)));
        std::fs::write(dir.path().join(LAYOUT_FILE), "b clusters\n").unwrap();
        assert_eq!(
            layout_file(dir.path(), SiteSide::B).unwrap(),
            Some(Layout::B(Pair::Clusters))
        );
        match layout_file(dir.path(), SiteSide::A) {
            Err(NodeError::Config(why)) => {
                assert!(why.contains("side b's data dir"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.path().join(LAYOUT_FILE), "b\n").unwrap();
        match layout_file(dir.path(), SiteSide::B) {
            Err(NodeError::Config(why)) => {
                assert!(
                    why.contains(LAYOUT_FILE) && why.contains("not a site layout"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
