//! One side of a verify that is a Redis Cluster: a connection per master,
//! each command routed to the master serving its key's slot, redirects
//! followed, and the walk of every key over every master.
//!
//! In: the side's seed addresses (any node, or a seed list) and commands
//! about keys. Out: their replies in order, the pages of keys of a walk,
//! and how many masters were walked.
//!
//! # Routing
//!
//! The slot map comes from `CLUSTER NODES` ([`crate::redis::cluster`]),
//! with each master's migration marks from its own `CLUSTER NODES` (a node
//! shows only its own). A
//! pipeline is split per master and each part sent to its master as one
//! write, the parts concurrently; every server keeps its own rate limiter.
//! A reply `MOVED slot addr` reads the topology again (from `addr` first)
//! and resends the command to the slot's owner (to `addr` while the
//! topology read disagrees with it); `ASK addr` (a slot being migrated
//! whose key has left) resends `ASKING` then the command to `addr`;
//! `TRYAGAIN` resends after a short pause. A command that names a key but
//! that the server runs wherever it is sent (`DEBUG DIGEST-VALUE`, which
//! would digest a key absent there as an empty one) goes right after an
//! `EXISTS` of its key on the same connection, and follows that one's
//! redirect. A command redirected more than
//! [`MAX_REDIRECTS`] times ends the verify ([`VerifyError::Redirects`]).
//!
//! # Walk
//!
//! Every master is walked with `SCAN` (a cluster node scans only its own
//! keys). A key a master holds for a slot it neither serves nor imports
//! (left behind, unreachable by clients) is skipped; a key of a slot it
//! imports (already migrated, reached through `ASK`) is kept. Keys of a
//! slot being migrated only go from the migrating master to the importing
//! one, so the migrating one is scanned first: a key that left it before
//! its turn is found on the other. A key that moves in a way the round did
//! not see coming (a migration that began or ended during the round, a
//! failover) could be missed by both `SCAN`s, so the walk goes in rounds:
//! after a round, the slot map is read again, and the slots whose owner or
//! migration marks changed since the round began are walked again on the
//! masters that then serve or import them (only those slots' keys kept),
//! after [`super::VerifyConfig::pass_interval`]. The walk ends after a
//! round in which no slot changed; a key present during that whole round
//! was seen. A key may be seen twice (a `SCAN` may return it twice too).
//! When slots still change after [`UNSETTLED_LIMIT`] of rounds, the verify
//! ends with [`VerifyError::Unsettled`].
//!
//! A cluster has db 0 only: comparing any other db with a cluster side is
//! refused ([`VerifyError::ClusterDb`]).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::conn::{at, bad_reply, parse_scan, scan_command, KeyCommand, NodeConn};
use super::{Side, VerifyConfig, VerifyError};
use crate::redis::cluster::{discover, NodeInfo, SlotRanges, Topology};
use crate::redis::command::{key_hash_slot, Command, CLUSTER_SLOTS};
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;

/// Most times one command is redirected (`MOVED`, `ASK`, `TRYAGAIN`).
pub const MAX_REDIRECTS: usize = 16;

/// How long a walk keeps walking again the slots that moved under it.
pub const UNSETTLED_LIMIT: Duration = Duration::from_secs(600);

/// Pause before resending a command answered `TRYAGAIN`, or one whose slot
/// the topology just read still routes to the node that said `MOVED`.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A cluster side's connections and slot map.
pub(crate) struct ClusterConn {
    side: Side,
    qps: u32,
    /// The addresses given: the first one's credentials are every node's.
    seeds: Vec<RedisUrl>,
    topology: Topology,
    /// Owners named by `MOVED` where the topology read since disagreed
    /// (the node read from had not learned of the move yet); cleared by the
    /// next read.
    moved: BTreeMap<u16, String>,
    /// By `host:port`.
    nodes: BTreeMap<String, NodeConn>,
    /// Whether every node connected so far answers `DEBUG DIGEST-VALUE`.
    pub digest: bool,
    /// Ids of the masters walked.
    scanned: BTreeSet<String>,
    /// Rounds of walks that walked again slots which had changed.
    pub rewalks: u32,
}

impl ClusterConn {
    /// Reads the topology and connects to every master. `first` is the
    /// connection already open to the seed that said it is a cluster, and
    /// its `host:port`.
    pub async fn connect(
        side: Side,
        seeds: &[RedisUrl],
        (first_addr, first): (String, NodeConn),
        qps: u32,
    ) -> Result<ClusterConn, VerifyError> {
        let topology = discover(seeds)
            .await
            .map_err(|source| VerifyError::Topology { side, source })?;
        let mut cluster = ClusterConn {
            side,
            qps,
            seeds: seeds.to_vec(),
            topology,
            moved: BTreeMap::new(),
            nodes: BTreeMap::new(),
            digest: true,
            scanned: BTreeSet::new(),
            rewalks: 0,
        };
        // The seed's connection is kept for its commands count; it is used
        // like any other when the seed is a master.
        cluster.nodes.insert(first_addr, first);
        for addr in cluster.master_addrs() {
            cluster.node(&addr).await?;
        }
        cluster.learn_marks().await?;
        Ok(cluster)
    }

    pub fn commands(&self) -> u64 {
        self.nodes.values().map(|n| n.commands).sum()
    }

    pub fn masters_scanned(&self) -> u32 {
        u32::try_from(self.scanned.len()).unwrap_or(u32::MAX)
    }

    /// Masters serving slots, by their first slot.
    fn master_addrs(&self) -> Vec<String> {
        self.topology
            .shards()
            .into_iter()
            .map(|s| s.master.addr)
            .collect()
    }

    /// The connection to `addr`, opened (and probed for DEBUG) on first use.
    async fn node(&mut self, addr: &str) -> Result<&mut NodeConn, VerifyError> {
        let node = match self.nodes.entry(addr.to_string()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let url = node_url(&self.seeds, addr).ok_or_else(|| VerifyError::Reply {
                    side: self.side,
                    at: "cluster topology".to_string(),
                    command: "CLUSTER NODES".to_string(),
                    reply: format!("bad node address {addr:?}"),
                })?;
                let mut node = NodeConn::connect(self.side, &url, self.qps).await?;
                if !node.allows_digest(self.side).await? {
                    self.digest = false;
                }
                entry.insert(node)
            }
        };
        Ok(node)
    }

    /// Reads the topology again, from `first` when given (the node a
    /// `MOVED` named), then the masters known, then the seeds.
    async fn refresh(&mut self, first: Option<&str>) -> Result<(), VerifyError> {
        let mut candidates: Vec<RedisUrl> = Vec::new();
        let mut addrs: Vec<String> = first.map(str::to_string).into_iter().collect();
        addrs.extend(self.master_addrs());
        for addr in addrs {
            if let Some(url) = node_url(&self.seeds, &addr) {
                candidates.push(url);
            }
        }
        candidates.extend(self.seeds.iter().cloned());
        self.topology = discover(&candidates)
            .await
            .map_err(|source| VerifyError::Topology {
                side: self.side,
                source,
            })?;
        self.moved.clear();
        self.learn_marks().await
    }

    /// `CLUSTER NODES` shows a slot's migration marks (`[slot->-id]`,
    /// `[slot-<-id]`) on the line of the node answering only: each master
    /// is asked for its own, and they are put into the topology read.
    async fn learn_marks(&mut self) -> Result<(), VerifyError> {
        let side = self.side;
        let masters: Vec<(String, String)> = self
            .topology
            .nodes
            .iter()
            .filter(|n| n.master && !n.failing)
            .map(|n| (n.id.clone(), n.addr.clone()))
            .collect();
        let cmd = Command::from_parts(["CLUSTER", "NODES"]);
        for (id, addr) in masters {
            let reply = self.node(&addr).await?.send(side, &cmd).await?;
            let text = match &reply {
                Frame::Bulk(b) | Frame::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                Frame::Verbatim { text, .. } => String::from_utf8_lossy(text).into_owned(),
                other => {
                    return Err(bad_reply(
                        side,
                        format!("node {addr}"),
                        "CLUSTER NODES",
                        other,
                    ))
                }
            };
            let view = Topology::parse(&addr, &text)
                .map_err(|source| VerifyError::Topology { side, source })?;
            let Some(me) = view.nodes.iter().find(|n| n.myself && n.id == id) else {
                // Another node answers there now (restarted, replaced): the
                // next read of the topology will say.
                continue;
            };
            if let Some(node) = self.topology.nodes.iter_mut().find(|n| n.id == id) {
                node.migrating = me.migrating.clone();
                node.importing = me.importing.clone();
            }
        }
        Ok(())
    }

    /// The master serving `slot`, as far as we know.
    fn owner(&self, slot: u16) -> Option<String> {
        if let Some(addr) = self.moved.get(&slot) {
            return Some(addr.clone());
        }
        self.topology.master_for_slot(slot).map(|n| n.addr.clone())
    }

    /// One command to some master (for commands about no key).
    pub async fn send_any(&mut self, cmd: &Command) -> Result<Frame, VerifyError> {
        let addr = self
            .master_addrs()
            .into_iter()
            .next()
            .ok_or_else(|| VerifyError::Reply {
                side: self.side,
                at: "cluster topology".to_string(),
                command: "CLUSTER NODES".to_string(),
                reply: "no master serves a slot".to_string(),
            })?;
        let side = self.side;
        self.node(&addr).await?.send(side, cmd).await
    }

    /// One command to every master; the replies by master.
    pub async fn send_masters(&mut self, cmd: &Command) -> Result<Vec<Frame>, VerifyError> {
        let side = self.side;
        let mut replies = Vec::new();
        for addr in self.master_addrs() {
            replies.push(self.node(&addr).await?.send(side, cmd).await?);
        }
        Ok(replies)
    }

    /// Sends `cmds`, each to the master serving its key, one pipeline per
    /// master, following redirects (see the module doc); the replies in
    /// order, error replies as frames.
    pub async fn pipeline(&mut self, cmds: &[KeyCommand]) -> Result<Vec<Frame>, VerifyError> {
        let side = self.side;
        let mut replies: Vec<Option<Frame>> = vec![None; cmds.len()];
        // Commands still to send: their index, and the node that said ASK.
        let mut todo: Vec<(usize, Option<String>)> = (0..cmds.len()).map(|i| (i, None)).collect();
        let mut last_redirect = String::new();
        let asking_cmd = Command::from_parts(["ASKING"]);
        // Commands the server runs without looking where the key lives: an
        // EXISTS just before, on the same connection, is redirected for
        // them.
        let guards: Vec<Option<Command>> = cmds
            .iter()
            .map(|c| {
                c.unrouted
                    .then(|| Command::new(vec![Bytes::from_static(b"EXISTS"), c.key.clone()]))
            })
            .collect();
        for _round in 0..=MAX_REDIRECTS {
            if todo.is_empty() {
                break;
            }
            // Per node: (index, asking) in order.
            let mut groups: BTreeMap<String, Vec<(usize, bool)>> = BTreeMap::new();
            for (index, asked) in todo.drain(..) {
                let (addr, asking) = match asked {
                    Some(addr) => (addr, true),
                    None => {
                        let slot = key_hash_slot(&cmds[index].key);
                        let addr = self.owner(slot).ok_or_else(|| VerifyError::Reply {
                            side,
                            at: at(0, Some(cmds[index].key.as_ref())),
                            command: "CLUSTER NODES".to_string(),
                            reply: format!("no master serves slot {slot}"),
                        })?;
                        (addr, false)
                    }
                };
                groups.entry(addr).or_default().push((index, asking));
            }
            for addr in groups.keys() {
                self.node(addr).await?;
            }
            let sends = self
                .nodes
                .iter_mut()
                .filter_map(|(addr, node)| groups.get(addr).map(|group| (addr, node, group)))
                .map(|(addr, node, group)| {
                    let mut batch: Vec<&Command> = Vec::with_capacity(group.len());
                    for &(index, asking) in group {
                        if asking {
                            batch.push(&asking_cmd);
                        }
                        if let Some(guard) = &guards[index] {
                            batch.push(guard);
                        }
                        batch.push(&cmds[index].cmd);
                    }
                    async move {
                        let got = node.pipeline(side, &batch).await?;
                        Ok::<_, VerifyError>((addr.clone(), got))
                    }
                });
            let answered = futures::future::try_join_all(sends).await?;
            let mut moved_to: Option<String> = None;
            let mut try_again = false;
            for (addr, got) in answered {
                let Some(group) = groups.get(&addr) else {
                    continue;
                };
                let mut got = got.into_iter();
                for &(index, asking) in group {
                    if asking {
                        // `+OK` to ASKING; anything else shows in the
                        // command's own reply.
                        let _ = got.next();
                    }
                    let guard_reply = match guards[index] {
                        Some(_) => got.next(),
                        None => None,
                    };
                    let Some(reply) = got.next() else {
                        return Err(bad_reply(
                            side,
                            at(0, Some(cmds[index].key.as_ref())),
                            &super::conn::command_name(&cmds[index].cmd),
                            &Frame::Null,
                        ));
                    };
                    match redirect(guard_reply.as_ref().unwrap_or(&reply), &addr) {
                        None => replies[index] = Some(reply),
                        Some(Redirect::Moved { slot, to }) => {
                            last_redirect = format!("MOVED {slot} {to} from {addr}");
                            self.moved.insert(slot, to.clone());
                            moved_to.get_or_insert(to);
                            todo.push((index, None));
                        }
                        Some(Redirect::Ask { to }) => {
                            last_redirect = format!("ASK {to} from {addr}");
                            todo.push((index, Some(to)));
                        }
                        Some(Redirect::TryAgain) => {
                            last_redirect = format!("TRYAGAIN from {addr}");
                            try_again = true;
                            todo.push((index, None));
                        }
                    }
                }
            }
            if let Some(to) = moved_to {
                let learned: Vec<(u16, String)> =
                    std::mem::take(&mut self.moved).into_iter().collect();
                self.refresh(Some(&to)).await?;
                // Where the topology read still disagrees with a MOVED, the
                // MOVED wins until the next read.
                let mut stale = false;
                for (slot, addr) in learned {
                    if self.owner(slot).as_deref() != Some(addr.as_str()) {
                        self.moved.insert(slot, addr);
                        stale = true;
                    }
                }
                try_again |= stale;
            }
            if try_again {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        if let Some(&(index, _)) = todo.first() {
            return Err(VerifyError::Redirects {
                side,
                at: at(0, Some(cmds[index].key.as_ref())),
                command: super::conn::command_name(&cmds[index].cmd),
                limit: MAX_REDIRECTS,
                last: last_redirect,
            });
        }
        replies
            .into_iter()
            .zip(cmds)
            .map(|(reply, cmd)| {
                reply.ok_or_else(|| {
                    bad_reply(
                        side,
                        at(0, Some(cmd.key.as_ref())),
                        &super::conn::command_name(&cmd.cmd),
                        &Frame::Null,
                    )
                })
            })
            .collect()
    }

    /// The next page of `walk` (see the module doc): keys of the slots of
    /// the round that the scanned master serves or imports, without
    /// ferry's internal keys and keys outside the key filter; `None` once a
    /// round saw no slot move.
    pub async fn next_page(
        &mut self,
        walk: &mut ClusterWalk,
        config: &VerifyConfig,
    ) -> Result<Option<Vec<Bytes>>, VerifyError> {
        loop {
            if walk.done {
                return Ok(None);
            }
            if walk.start.is_none() {
                self.refresh(None).await?;
                walk.begin_round(self.topology.clone(), SlotRanges::all());
            }
            if walk.current.is_none() {
                match walk.queue.pop_front() {
                    Some(addr) => walk.current = Some((addr, Bytes::from_static(b"0"))),
                    None => {
                        let Some(start) = walk.start.take() else {
                            continue;
                        };
                        self.refresh(None).await?;
                        let moved = moved_slots(&start, &self.topology, &walk.unordered);
                        if moved.is_empty() {
                            walk.done = true;
                            return Ok(None);
                        }
                        let since = *walk.unsettled_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > UNSETTLED_LIMIT {
                            return Err(VerifyError::Unsettled {
                                side: self.side,
                                secs: UNSETTLED_LIMIT.as_secs(),
                            });
                        }
                        tracing::info!(
                            side = %self.side,
                            slots = %moved,
                            "slots moved during the walk: walking them again"
                        );
                        let now = self.topology.clone();
                        self.rewalks += 1;
                        tokio::time::sleep(walk.pause).await;
                        walk.begin_round(now, moved);
                        continue;
                    }
                }
            }
            let Some((addr, cursor)) = walk.current.take() else {
                continue;
            };
            let side = self.side;
            let reply = self
                .node(&addr)
                .await?
                .send(side, &scan_command(&cursor, config))
                .await?;
            if let Some(message) = reply.error_message() {
                return Err(VerifyError::Server {
                    side,
                    at: format!("db 0 on {addr}"),
                    command: "SCAN".to_string(),
                    message,
                });
            }
            let (next, keys) = parse_scan(&reply)
                .ok_or_else(|| bad_reply(side, format!("db 0 on {addr}"), "SCAN", &reply))?;
            let node = self.topology.nodes.iter().find(|n| n.addr == addr);
            if let Some(node) = node {
                self.scanned.insert(node.id.clone());
            }
            let keys = keys
                .into_iter()
                .filter(|key| {
                    let slot = key_hash_slot(key);
                    super::compared(config, key)
                        && walk.slots.contains(slot)
                        && node.is_some_and(|n| holds(n, slot))
                })
                .collect();
            if next.as_ref() != b"0" {
                walk.current = Some((addr, next));
            }
            return Ok(Some(keys));
        }
    }
}

/// Whether `node`'s keys of `slot` are the cluster's: it serves the slot,
/// or imports it (keys already migrated there).
fn holds(node: &NodeInfo, slot: u16) -> bool {
    node.slots.contains(slot) || node.importing.iter().any(|(s, _)| *s == slot)
}

/// Where a walk over a cluster side stands.
pub(crate) struct ClusterWalk {
    /// The slot map when the current round began; `None` before the first.
    start: Option<Topology>,
    /// Slots the current round covers.
    slots: SlotRanges,
    /// Slots being migrated between masters that could not be walked
    /// source before destination (migrations in a cycle): walked again.
    unordered: SlotRanges,
    /// Masters left to scan in this round (`host:port`).
    queue: VecDeque<String>,
    /// The master being scanned, and its next cursor.
    current: Option<(String, Bytes)>,
    /// When the first round in which slots moved ended.
    unsettled_since: Option<Instant>,
    pause: Duration,
    done: bool,
}

impl ClusterWalk {
    pub fn new(config: &VerifyConfig) -> ClusterWalk {
        ClusterWalk {
            start: None,
            slots: SlotRanges::new(),
            unordered: SlotRanges::new(),
            queue: VecDeque::new(),
            current: None,
            unsettled_since: None,
            pause: config.pass_interval,
            done: false,
        }
    }

    /// A round over `slots`: every master of `topology` serving or
    /// importing one of them, by first slot, except that a master
    /// migrating a slot comes before the master importing it (keys only go
    /// that way, so a key leaving one before it was scanned is found on the
    /// other).
    fn begin_round(&mut self, topology: Topology, slots: SlotRanges) {
        let mut masters: Vec<&NodeInfo> =
            topology
                .nodes
                .iter()
                .filter(|n| {
                    n.master
                        && (slots.ranges().iter().any(|&(a, b)| {
                            n.slots.ranges().iter().any(|&(c, d)| a.max(c) <= b.min(d))
                        }) || n.importing.iter().any(|(s, _)| slots.contains(*s)))
                })
                .collect();
        masters.sort_by_key(|n| n.slots.first().unwrap_or(CLUSTER_SLOTS));
        // Migrations among these masters: (from id, to id, slot).
        let edges: Vec<(&str, &str, u16)> = masters
            .iter()
            .flat_map(|n| {
                n.migrating
                    .iter()
                    .filter(|(slot, _)| slots.contains(*slot))
                    .map(|(slot, to)| (n.id.as_str(), to.as_str(), *slot))
            })
            .collect();
        let mut order: Vec<&NodeInfo> = Vec::with_capacity(masters.len());
        self.unordered = SlotRanges::new();
        while !masters.is_empty() {
            let waiting = |n: &NodeInfo| {
                edges.iter().any(|&(from, to, _)| {
                    to == n.id && masters.iter().any(|m| m.id == from && m.id != n.id)
                })
            };
            let pick = masters.iter().position(|n| !waiting(n)).unwrap_or(0);
            let node = masters.remove(pick);
            // In a cycle: what still had to come first is out of order.
            for &(from, to, slot) in &edges {
                if to == node.id && masters.iter().any(|m| m.id == from) {
                    self.unordered.insert_range(slot, slot);
                }
            }
            order.push(node);
        }
        self.queue = order.iter().map(|n| n.addr.clone()).collect();
        self.current = None;
        self.slots = slots;
        self.start = Some(topology);
    }
}

/// Slots to walk again after a round that began with `before` and ended
/// with `after`: those whose owner changed, or whose migration marks did
/// (a migration began or ended), plus `unordered`.
fn moved_slots(before: &Topology, after: &Topology, unordered: &SlotRanges) -> SlotRanges {
    let before = slot_map(before);
    let after = slot_map(after);
    let mut moved = unordered.clone();
    for slot in 0..CLUSTER_SLOTS {
        let i = usize::from(slot);
        if before.0[i] != after.0[i] || before.1.get(&slot) != after.1.get(&slot) {
            moved.insert_range(slot, slot);
        }
    }
    moved
}

/// A slot's migration marks: (node id, importing, peer id), sorted.
type Marks<'a> = Vec<(&'a str, bool, &'a str)>;

/// Per slot: the id of the master serving it; and the marked slots' marks.
fn slot_map(topology: &Topology) -> (Vec<Option<&str>>, BTreeMap<u16, Marks<'_>>) {
    let mut owners = vec![None; usize::from(CLUSTER_SLOTS)];
    let mut marks: BTreeMap<u16, Marks<'_>> = BTreeMap::new();
    for node in &topology.nodes {
        if node.master {
            for &(a, b) in node.slots.ranges() {
                for slot in a..=b {
                    owners[usize::from(slot)] = Some(node.id.as_str());
                }
            }
        }
        for (slot, peer) in &node.migrating {
            marks
                .entry(*slot)
                .or_default()
                .push((node.id.as_str(), false, peer.as_str()));
        }
        for (slot, peer) in &node.importing {
            marks
                .entry(*slot)
                .or_default()
                .push((node.id.as_str(), true, peer.as_str()));
        }
    }
    for list in marks.values_mut() {
        list.sort_unstable();
    }
    (owners, marks)
}

/// A redirect reply.
#[derive(Debug, PartialEq, Eq)]
enum Redirect {
    Moved { slot: u16, to: String },
    Ask { to: String },
    TryAgain,
}

/// `MOVED slot host:port`, `ASK slot host:port` or `TRYAGAIN …`; `from` is
/// the node that replied (an empty host means its host).
fn redirect(reply: &Frame, from: &str) -> Option<Redirect> {
    let message = reply.error_message()?;
    let mut parts = message.split_whitespace();
    let kind = parts.next()?;
    if kind == "TRYAGAIN" {
        return Some(Redirect::TryAgain);
    }
    if kind != "MOVED" && kind != "ASK" {
        return None;
    }
    let slot: u16 = parts.next()?.parse().ok()?;
    let endpoint = parts.next()?;
    let (host, port) = endpoint.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = match host.trim_start_matches('[').trim_end_matches(']') {
        "" => split_addr(from)?.0,
        host => host.to_string(),
    };
    let to = node_addr(&host, port);
    Some(match kind {
        "MOVED" => Redirect::Moved { slot, to },
        _ => Redirect::Ask { to },
    })
}

/// `host:port` as [`NodeInfo::addr`] writes it (`[v6]:port`).
fn node_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}

/// The address of node `addr` with the first seed's credentials, db 0.
fn node_url(seeds: &[RedisUrl], addr: &str) -> Option<RedisUrl> {
    let template = seeds.first()?;
    let (host, port) = split_addr(addr)?;
    Some(RedisUrl {
        host,
        port,
        user: template.user.clone(),
        password: template.password.clone(),
        db: 0,
        tls: template.tls.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(text: &str) -> Topology {
        Topology::parse("127.0.0.1:1", text).unwrap()
    }

    const THREE: &str = "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:3@4 master - 0 0 2 connected 5461-10922
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383
";

    #[test]
    fn redirects_parse() {
        let moved = Frame::Error(Bytes::from_static(b"MOVED 3999 127.0.0.1:6381"));
        assert_eq!(
            redirect(&moved, "127.0.0.1:1"),
            Some(Redirect::Moved {
                slot: 3999,
                to: "127.0.0.1:6381".into()
            })
        );
        let ask = Frame::Error(Bytes::from_static(b"ASK 3999 :6381"));
        assert_eq!(
            redirect(&ask, "10.0.0.1:7000"),
            Some(Redirect::Ask {
                to: "10.0.0.1:6381".into()
            })
        );
        let v6 = Frame::Error(Bytes::from_static(b"ASK 1 ::1:6381"));
        assert_eq!(
            redirect(&v6, "x:1"),
            Some(Redirect::Ask {
                to: "[::1]:6381".into()
            })
        );
        let again = Frame::Error(Bytes::from_static(b"TRYAGAIN Multiple keys request"));
        assert_eq!(redirect(&again, "x:1"), Some(Redirect::TryAgain));
        for other in [
            Frame::Error(Bytes::from_static(b"ERR wrong")),
            Frame::Error(Bytes::from_static(b"MOVED x 127.0.0.1:1")),
            Frame::Error(Bytes::from_static(b"MOVED 1 nohostport")),
            Frame::bulk("MOVED 1 127.0.0.1:2"),
        ] {
            assert_eq!(redirect(&other, "x:1"), None, "{other:?}");
        }
    }

    #[test]
    fn moved_slots_are_new_owners_and_migrations() {
        let before = topology(THREE);
        let none = SlotRanges::new();
        assert!(moved_slots(&before, &before, &none).is_empty());
        let resharded = topology(
            "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5459
b 127.0.0.1:3@4 master - 0 0 2 connected 5460-10922 [10923-<-c]
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383 [10923->-b]
",
        );
        assert_eq!(
            moved_slots(&before, &resharded, &none).to_string(),
            "5460,10923"
        );
        assert_eq!(
            moved_slots(&resharded, &before, &none).to_string(),
            "5460,10923"
        );
        // A migration under way for the whole round is no move (keys went
        // from the migrating master, walked first, to the importing one).
        assert!(moved_slots(&resharded, &resharded, &none).is_empty());
        let other_peer = topology(
            "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5459 [10923-<-c]
b 127.0.0.1:3@4 master - 0 0 2 connected 5460-10922
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383 [10923->-a]
",
        );
        assert_eq!(
            moved_slots(&resharded, &other_peer, &none).to_string(),
            "10923"
        );
        let odd = SlotRanges::from_ranges([(7, 7)]);
        assert_eq!(moved_slots(&resharded, &resharded, &odd).to_string(), "7");
    }

    #[test]
    fn a_round_walks_the_masters_serving_or_importing_its_slots() {
        let t = topology(
            "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:3@4 master - 0 0 2 connected 5461-10922
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383 [10923->-d]
d 127.0.0.1:7@8 master - 0 0 4 connected [10923-<-c]
e 127.0.0.1:9@10 slave a 0 0 1 connected
",
        );
        let mut config = VerifyConfig::new(
            RedisUrl::parse("h:1").unwrap(),
            RedisUrl::parse("h:2").unwrap(),
        );
        config.pass_interval = Duration::ZERO;
        let mut walk = ClusterWalk::new(&config);
        walk.begin_round(t.clone(), SlotRanges::all());
        assert_eq!(
            Vec::from(walk.queue.clone()),
            ["127.0.0.1:1", "127.0.0.1:3", "127.0.0.1:5", "127.0.0.1:7"]
        );
        assert!(walk.unordered.is_empty());
        // The migrating master before the importing one.
        let backwards = topology(
            "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5460 [5461-<-b]
b 127.0.0.1:3@4 master - 0 0 2 connected 5461-10922 [5461->-a] [10923-<-c]
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383 [10923->-b]
",
        );
        walk.begin_round(backwards.clone(), SlotRanges::all());
        assert_eq!(
            Vec::from(walk.queue.clone()),
            ["127.0.0.1:5", "127.0.0.1:3", "127.0.0.1:1"]
        );
        assert!(walk.unordered.is_empty());
        // A cycle cannot be ordered: its slot is walked again.
        let cycle = topology(
            "\
a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5460 [5461-<-b] [0->-b]
b 127.0.0.1:3@4 master - 0 0 2 connected 5461-10922 [5461->-a] [0-<-a]
c 127.0.0.1:5@6 master - 0 0 3 connected 10923-16383
",
        );
        walk.begin_round(cycle, SlotRanges::all());
        assert_eq!(walk.queue.len(), 3);
        assert_eq!(walk.unordered.count(), 1);
        walk.begin_round(t.clone(), SlotRanges::from_ranges([(10923, 10923)]));
        assert_eq!(
            Vec::from(walk.queue.clone()),
            ["127.0.0.1:5", "127.0.0.1:7"]
        );
        walk.begin_round(t.clone(), SlotRanges::from_ranges([(100, 200)]));
        assert_eq!(Vec::from(walk.queue.clone()), ["127.0.0.1:1"]);
        let d = t.nodes.iter().find(|n| n.id == "d").unwrap();
        assert!(holds(d, 10923) && !holds(d, 10924));
    }

    #[test]
    fn nodes_take_the_first_seeds_credentials() {
        let seeds = vec![RedisUrl::parse("redis://app:pw@10.0.0.1:7000").unwrap()];
        let url = node_url(&seeds, "10.0.0.2:7001").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("10.0.0.2", 7001));
        assert_eq!(url.user.as_deref(), Some("app"));
        assert_eq!(url.password.as_deref(), Some("pw"));
        assert_eq!(node_url(&seeds, "[::1]:7002").unwrap().host, "::1");
        assert!(node_url(&seeds, "nohost").is_none());
        assert!(node_url(&[], "10.0.0.2:7001").is_none());
    }
}
