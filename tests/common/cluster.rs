//! Test support: a local Redis Cluster of real `redis-server` processes
//! (`--cluster-enabled yes`) on loopback ports, created with
//! `redis-cli --cluster create`, changed the way operators change one
//! (`CLUSTER FAILOVER`, `redis-cli --cluster reshard`, `add-node`,
//! `del-node`, a slot migrated by hand for `ASK`), and killed on drop.
//!
//! Every change waits until the cluster has settled ([`Cluster::wait_settled`]):
//! every node says `cluster_state:ok` with all 16384 slots served, every
//! node knows exactly the running nodes and agrees with the others on who is
//! master of what (roles, masters, slots), no slot is migrating or importing,
//! no node is flagged failing, and every replica's link to its master is up.
//!
//! The harness reads the cluster with its own small parser of
//! `CLUSTER NODES` and routes by following `MOVED`/`ASK` itself, so that
//! tests of ferry's cluster code compare against a view that does not come
//! from that code.
//!
//! Ports: a node listens on P and its cluster bus on P + 10000. Both are
//! taken from 12000..32000, below the kernel's ephemeral range (32768 and
//! up here), where the ports of outgoing connections and of
//! [`super::free_port`] live, and checked free by binding both.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry::redis::command::key_hash_slot;

use super::resp::{Conn, Resp};
use super::{output_within, redis_cli_bin, redis_server_bin};

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// Longest any one change (create, failover, reshard, add, remove) may take
/// to settle: generous, the box is shared.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// `cluster-node-timeout` of the harness's nodes: how long a node must be
/// unreachable before it is flagged failing and a replica takes over.
pub const NODE_TIMEOUT_MS: u64 = 5000;

/// Ports handed out in this process and not released: two nodes started
/// at the same time never get the same one.
static PORTS_TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port P for a cluster node such that P and its bus port P + 10000 are
/// both free on 127.0.0.1, P in 12000..22000.
pub fn cluster_port() -> u16 {
    let seed = std::process::id() as u64 * 7919
        + Instant::now().elapsed().subsec_nanos() as u64
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    let mut taken = PORTS_TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    for step in 0..10_000u64 {
        let port = 12000 + ((seed + step * 37) % 10_000) as u16;
        if taken.contains(&port) {
            continue;
        }
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port pair (P, P+10000) in 12000..32000");
}

/// One reply of a node, panicking on i/o errors.
fn call_at(port: u16, args: &[&str]) -> Resp {
    let addr = format!("127.0.0.1:{port}");
    let mut conn = Conn::connect(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    conn.call(args)
        .unwrap_or_else(|e| panic!("{args:?} on {addr}: {e}"))
}

/// One reply of a node, or the i/o error.
fn try_call_at(port: u16, args: &[&str]) -> std::io::Result<Resp> {
    let mut conn = Conn::connect(&format!("127.0.0.1:{port}"), Duration::from_secs(5))?;
    conn.call(args)
}

/// A bulk or simple string reply as text; anything else is `None`.
fn reply_text(reply: &Resp) -> Option<String> {
    match reply {
        Resp::Bulk(Some(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Resp::Simple(text) => Some(text.clone()),
        _ => None,
    }
}

/// A `field:value` of `INFO`/`CLUSTER INFO` text.
fn info_field(text: &str, field: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| *name == field)
        .map(|(_, value)| value.trim().to_string())
}

// ---------------------------------------------------------------------------
// One node.

/// A cluster-enabled `redis-server` that keeps its port and dir (and so its
/// `nodes.conf` and node id) across restarts.
pub struct ClusterNode {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ClusterNode {
    /// Starts a node on a fresh port pair; retries on another pair when the
    /// server does not come up (a port taken between the check and the bind).
    pub fn start() -> ClusterNode {
        for _attempt in 0..5 {
            let mut node = ClusterNode {
                port: cluster_port(),
                dir: tempfile::tempdir().expect("temp dir"),
                child: None,
            };
            if node.spawn() {
                return node;
            }
        }
        panic!("no cluster node started in 5 attempts");
    }

    /// Starts the server process; false if it did not answer `PING` in 30 s.
    pub fn spawn(&mut self) -> bool {
        assert!(self.child.is_none(), "node {} already running", self.port);
        let child = Command::new(redis_server_bin())
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            // A replica whose link to a crashed master was slow or down a
            // while on a loaded box still takes over (tests wait for it).
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--enable-debug-command", "yes"])
            .args(["--daemonize", "no", "--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", redis_server_bin()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))));
            if exited {
                self.child = None;
                return false;
            }
            if try_call_at(self.port, &["PING"]).is_ok_and(|r| r == Resp::Simple("PONG".into())) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node running").id()
    }

    /// One command's reply (panics on i/o errors).
    pub fn call(&self, args: &[&str]) -> Resp {
        call_at(self.port, args)
    }

    /// A connection to this node.
    pub fn conn(&self) -> Conn {
        super::resp::connect(&self.addr())
    }

    /// The node's id (`CLUSTER MYID`).
    pub fn id(&self) -> String {
        reply_text(&self.call(&["CLUSTER", "MYID"])).expect("CLUSTER MYID reply")
    }

    /// A field of `INFO`.
    pub fn info_field(&self, field: &str) -> Option<String> {
        let info = reply_text(&self.call(&["INFO", "everything"]))?;
        info_field(&info, field)
    }

    /// Keys in db 0.
    pub fn dbsize(&self) -> i64 {
        self.call(&["DBSIZE"]).int()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL, no save.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::ferry::signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node again on its port with its `nodes.conf` (its id, its
    /// view of the cluster); its data is gone (no persistence).
    pub fn restart(&mut self) {
        self.kill9();
        assert!(self.spawn(), "node {} did not restart", self.port);
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill9();
        PORTS_TAKEN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(HashSet::new)
            .remove(&self.port);
    }
}

// ---------------------------------------------------------------------------
// One node's view of the cluster (CLUSTER NODES).

/// A line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLine {
    pub id: String,
    pub port: u16,
    pub flags: BTreeSet<String>,
    /// The master's id for a replica.
    pub master: Option<String>,
    /// Served slots, as inclusive ranges.
    pub slots: Vec<(u16, u16)>,
    /// `[slot->-id]` / `[slot-<-id]` entries: a migration in progress.
    pub migrating: Vec<String>,
}

impl NodeLine {
    pub fn is_master(&self) -> bool {
        self.flags.contains("master")
    }

    pub fn slot_count(&self) -> usize {
        self.slots.iter().map(|(a, b)| usize::from(b - a) + 1).sum()
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }

    /// A flag that says the node is not usable as it stands.
    fn troubled(&self) -> bool {
        ["fail", "fail?", "handshake", "noaddr", "nofailover"]
            .iter()
            .any(|flag| self.flags.contains(*flag))
    }
}

/// Parses `CLUSTER NODES` text.
pub fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
    let mut nodes = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 8, "short CLUSTER NODES line: {line:?}");
        // ip:port@cport[,hostname]
        let address = fields[1].split(['@', ',']).next().unwrap_or("");
        let port = address
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or(0);
        let mut slots = Vec::new();
        let mut migrating = Vec::new();
        for slot in &fields[8..] {
            if slot.starts_with('[') {
                migrating.push(slot.to_string());
            } else if let Some((a, b)) = slot.split_once('-') {
                slots.push((a.parse().expect("slot"), b.parse().expect("slot")));
            } else {
                let s = slot.parse().expect("slot");
                slots.push((s, s));
            }
        }
        nodes.push(NodeLine {
            id: fields[0].to_string(),
            port,
            flags: fields[2].split(',').map(str::to_string).collect(),
            master: (fields[3] != "-").then(|| fields[3].to_string()),
            slots,
            migrating,
        });
    }
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    nodes
}

/// What nodes must agree on about one node: id, master or not, its master,
/// its slots.
type RoleSummary = (String, bool, Option<String>, Vec<(u16, u16)>);

/// A shard as the harness sees it: a master, its replicas, its slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardView {
    pub master: NodeLine,
    pub replicas: Vec<NodeLine>,
}

impl ShardView {
    pub fn ports(&self) -> BTreeSet<u16> {
        std::iter::once(self.master.port)
            .chain(self.replicas.iter().map(|r| r.port))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The cluster.

/// A running local Redis Cluster.
pub struct Cluster {
    nodes: Vec<ClusterNode>,
}

impl Cluster {
    /// Starts `masters` masters with `replicas` replicas each and creates the
    /// cluster with `redis-cli --cluster create`; returns once it settled.
    pub fn start(masters: usize, replicas: usize) -> Cluster {
        assert!(masters >= 3, "redis-cli --cluster create needs 3 masters");
        let nodes: Vec<ClusterNode> = (0..masters * (replicas + 1))
            .map(|_| ClusterNode::start())
            .collect();
        let cluster = Cluster { nodes };
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(cluster.nodes.iter().map(ClusterNode::addr));
        args.extend([
            "--cluster-replicas".to_string(),
            replicas.to_string(),
            "--cluster-yes".to_string(),
        ]);
        cluster.redis_cli_cluster(&args);
        cluster.wait_settled();
        let shards = cluster.shards();
        assert_eq!(shards.len(), masters, "masters after create: {shards:?}");
        for shard in &shards {
            assert_eq!(shard.replicas.len(), replicas, "replicas: {shard:?}");
        }
        cluster
    }

    /// Starts `masters` masters without replicas and makes them a cluster
    /// by hand (`CLUSTER ADDSLOTSRANGE` of an even share each,
    /// `CLUSTER SET-CONFIG-EPOCH`, `CLUSTER MEET`), for the shapes
    /// `redis-cli --cluster create` refuses (fewer than 3 masters); returns
    /// once it settled.
    pub fn start_by_hand(masters: usize) -> Cluster {
        assert!((1..=16).contains(&masters), "{masters} masters");
        let nodes: Vec<ClusterNode> = (0..masters).map(|_| ClusterNode::start()).collect();
        let ok = Resp::Simple("OK".into());
        let share = usize::from(SLOTS) / masters;
        for (i, node) in nodes.iter().enumerate() {
            let first = i * share;
            let last = if i + 1 == masters {
                usize::from(SLOTS) - 1
            } else {
                first + share - 1
            };
            let (first, last) = (first.to_string(), last.to_string());
            assert_eq!(node.call(&["CLUSTER", "ADDSLOTSRANGE", &first, &last]), ok);
            let epoch = (i + 1).to_string();
            assert_eq!(node.call(&["CLUSTER", "SET-CONFIG-EPOCH", &epoch]), ok);
        }
        let first_port = nodes[0].port.to_string();
        for node in &nodes[1..] {
            assert_eq!(
                node.call(&["CLUSTER", "MEET", "127.0.0.1", &first_port]),
                ok
            );
        }
        let cluster = Cluster { nodes };
        cluster.wait_settled();
        assert_eq!(cluster.shards().len(), masters, "{}", cluster.logs());
        cluster
    }

    /// The running nodes, in start order.
    pub fn nodes(&self) -> impl Iterator<Item = &ClusterNode> {
        self.nodes.iter().filter(|n| n.is_running())
    }

    /// Every `__ferry*` key of every running node (masters and replicas),
    /// sorted.
    pub fn ferry_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .nodes()
            .flat_map(|node| {
                node.call(&["KEYS", "__ferry*"])
                    .items()
                    .iter()
                    .filter_map(|k| k.text())
                    .collect::<Vec<_>>()
            })
            .collect();
        keys.sort();
        keys
    }

    pub fn node(&self, port: u16) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    pub fn node_mut(&mut self, port: u16) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// A running node to ask.
    fn any_port(&self) -> u16 {
        self.nodes().next().expect("a running node").port
    }

    /// `redis://127.0.0.1:P` of the first running node.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.any_port())
    }

    /// Every running node as a comma-separated seed list
    /// (`redis://127.0.0.1:P1,127.0.0.1:P2,...`).
    pub fn seed_list(&self) -> String {
        let addrs: Vec<String> = self.nodes().map(ClusterNode::addr).collect();
        format!("redis://{}", addrs.join(","))
    }

    /// One running node's `CLUSTER NODES`, parsed.
    pub fn view(&self, port: u16) -> Vec<NodeLine> {
        let text = reply_text(&call_at(port, &["CLUSTER", "NODES"])).expect("CLUSTER NODES");
        parse_cluster_nodes(&text)
    }

    /// The shards (a master with slots or not, and its replicas), as a
    /// running node sees them, sorted by their first slot.
    pub fn shards(&self) -> Vec<ShardView> {
        let view = self.view(self.any_port());
        let mut shards: Vec<ShardView> = view
            .iter()
            .filter(|n| n.is_master() && !n.troubled())
            .map(|master| ShardView {
                master: master.clone(),
                replicas: view
                    .iter()
                    .filter(|r| r.master.as_deref() == Some(master.id.as_str()))
                    .cloned()
                    .collect(),
            })
            .collect();
        shards.sort_by_key(|s| s.master.slots.first().map_or(u16::MAX, |r| r.0));
        shards
    }

    /// The masters' ports, sorted by their first slot.
    pub fn master_ports(&self) -> Vec<u16> {
        self.shards().iter().map(|s| s.master.port).collect()
    }

    /// The shard whose master is on `port`.
    pub fn shard_of_master(&self, port: u16) -> ShardView {
        self.shards()
            .into_iter()
            .find(|s| s.master.port == port)
            .unwrap_or_else(|| panic!("no master on port {port}"))
    }

    /// The node that serves `slot` (by a running node's view).
    pub fn master_for_slot(&self, slot: u16) -> &ClusterNode {
        let port = self
            .view(self.any_port())
            .into_iter()
            .find(|n| n.is_master() && n.serves(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
            .port;
        self.node(port)
    }

    /// The node that serves `key`'s slot.
    pub fn master_for_key(&self, key: &str) -> &ClusterNode {
        self.master_for_slot(key_hash_slot(key.as_bytes()))
    }

    /// Runs a command on the node that serves `key`, following `MOVED` and
    /// `ASK` (as `redis-cli -c` would); the reply that is not a redirect.
    pub fn call_key(&self, key: &str, args: &[&str]) -> Resp {
        let mut port = self.master_for_key(key).port;
        let mut asking = false;
        for _hop in 0..10 {
            let mut conn = super::resp::connect(&format!("127.0.0.1:{port}"));
            if asking {
                conn.queue(&["ASKING"]);
            }
            conn.queue(args);
            let reply = conn
                .replies()
                .unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
                .pop()
                .expect("a reply");
            match redirect(&reply) {
                Some((kind, to)) => {
                    port = to;
                    asking = kind == "ASK";
                }
                None => return reply,
            }
        }
        panic!("{args:?} for {key}: more than 10 redirects");
    }

    /// Runs `(key, command)` pairs pipelined per master; a reply that is a
    /// redirect (the map moved under us) is redone with [`Cluster::call_key`].
    /// Returns the replies in order.
    pub fn pipeline_keys(&self, commands: &[(String, Vec<String>)]) -> Vec<Resp> {
        let any = self.any_port();
        let view = self.view(any);
        // A view with no master for the slot (a node of a loaded cluster
        // flagged failing for a moment): any node, whose redirect is
        // followed below.
        let owner = |slot: u16| {
            view.iter()
                .find(|n| n.is_master() && n.serves(slot))
                .map_or(any, |n| n.port)
        };
        let mut by_port: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (index, (key, _)) in commands.iter().enumerate() {
            by_port
                .entry(owner(key_hash_slot(key.as_bytes())))
                .or_default()
                .push(index);
        }
        let mut replies: Vec<Option<Resp>> = vec![None; commands.len()];
        for (port, indices) in by_port {
            let mut conn = super::resp::connect(&format!("127.0.0.1:{port}"));
            for chunk in indices.chunks(1000) {
                for &index in chunk {
                    conn.queue(&commands[index].1);
                }
                let got = conn
                    .replies()
                    .unwrap_or_else(|e| panic!("pipeline on {port}: {e}"));
                for (&index, reply) in chunk.iter().zip(got) {
                    replies[index] = Some(reply);
                }
            }
        }
        replies
            .into_iter()
            .zip(commands)
            .map(|(reply, (key, args))| match reply {
                Some(reply) if redirect(&reply).is_none() => reply,
                _ => {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    self.call_key(key, &args)
                }
            })
            .collect()
    }

    /// `SET key value` for each pair, pipelined per master.
    pub fn set_all(&self, pairs: &[(String, String)]) {
        let commands: Vec<(String, Vec<String>)> = pairs
            .iter()
            .map(|(k, v)| (k.clone(), vec!["SET".into(), k.clone(), v.clone()]))
            .collect();
        for reply in self.pipeline_keys(&commands) {
            assert_eq!(reply, Resp::Simple("OK".into()), "SET reply");
        }
    }

    /// `GET` of each key, pipelined per master (`None` for a missing key).
    pub fn get_all(&self, keys: &[String]) -> Vec<Option<String>> {
        let commands: Vec<(String, Vec<String>)> = keys
            .iter()
            .map(|k| (k.clone(), vec!["GET".into(), k.clone()]))
            .collect();
        self.pipeline_keys(&commands)
            .iter()
            .map(|reply| match reply {
                Resp::Bulk(value) => value
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
                other => panic!("GET reply {other:?}"),
            })
            .collect()
    }

    /// Keys in all masters together.
    pub fn total_keys(&self) -> i64 {
        self.master_ports()
            .iter()
            .map(|&port| self.node(port).dbsize())
            .sum()
    }

    /// Runs `redis-cli --cluster <args>` and requires success; returns its
    /// output (stdout and stderr).
    fn redis_cli_cluster(&self, args: &[String]) -> String {
        let out = output_within(
            Command::new(redis_cli_bin()).args(args),
            Duration::from_secs(300),
        )
        .unwrap_or_else(|e| panic!("redis-cli {args:?}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("[ERR]"),
            "redis-cli {args:?} failed ({:?}):\n{text}\n{}",
            out.status,
            self.logs()
        );
        text
    }

    /// The log tails of every node, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} ---\n{}", n.port, n.log_tail(15)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Why the cluster has not settled yet, or `None` once it has (see the
    /// module doc).
    pub fn unsettled_reason(&self) -> Option<String> {
        let mut ids = BTreeSet::new();
        for node in self.nodes() {
            match try_call_at(node.port, &["CLUSTER", "MYID"]) {
                Ok(reply) => ids.insert(reply_text(&reply).unwrap_or_default()),
                Err(e) => return Some(format!("node {}: {e}", node.port)),
            };
        }
        let mut agreed: Option<(u16, Vec<RoleSummary>)> = None;
        for node in self.nodes() {
            let info = match try_call_at(node.port, &["CLUSTER", "INFO"]) {
                Ok(reply) => reply_text(&reply).unwrap_or_default(),
                Err(e) => return Some(format!("node {}: {e}", node.port)),
            };
            for (field, want) in [
                ("cluster_state", "ok"),
                ("cluster_slots_assigned", "16384"),
                ("cluster_slots_ok", "16384"),
            ] {
                let got = info_field(&info, field);
                if got.as_deref() != Some(want) {
                    return Some(format!("node {}: {field} is {got:?}", node.port));
                }
            }
            let text = match try_call_at(node.port, &["CLUSTER", "NODES"]) {
                Ok(reply) => reply_text(&reply).unwrap_or_default(),
                Err(e) => return Some(format!("node {}: {e}", node.port)),
            };
            let view = parse_cluster_nodes(&text);
            let known: BTreeSet<String> = view.iter().map(|n| n.id.clone()).collect();
            if known != ids {
                return Some(format!(
                    "node {} knows {} nodes, {} running",
                    node.port,
                    known.len(),
                    ids.len()
                ));
            }
            if let Some(line) = view
                .iter()
                .find(|n| n.troubled() || !n.migrating.is_empty())
            {
                return Some(format!("node {} sees {line:?}", node.port));
            }
            let summary: Vec<_> = view
                .iter()
                .map(|n| {
                    (
                        n.id.clone(),
                        n.is_master(),
                        n.master.clone(),
                        n.slots.clone(),
                    )
                })
                .collect();
            match &agreed {
                None => agreed = Some((node.port, summary)),
                Some((first, first_summary)) if *first_summary != summary => {
                    return Some(format!("nodes {first} and {} disagree", node.port));
                }
                Some(_) => {}
            }
            let me = view.iter().find(|n| n.flags.contains("myself"));
            if me.is_some_and(|me| !me.is_master()) {
                let replication = match try_call_at(node.port, &["INFO", "replication"]) {
                    Ok(reply) => reply_text(&reply).unwrap_or_default(),
                    Err(e) => return Some(format!("node {}: {e}", node.port)),
                };
                let link = info_field(&replication, "master_link_status");
                let syncing = info_field(&replication, "master_sync_in_progress");
                if link.as_deref() != Some("up") || syncing.as_deref() != Some("0") {
                    return Some(format!(
                        "replica {}: master_link_status {link:?}, sync in progress {syncing:?}",
                        node.port
                    ));
                }
            }
        }
        None
    }

    /// Waits until the cluster has settled (see the module doc); panics with
    /// the reason and the node logs after [`SETTLE_TIMEOUT`].
    pub fn wait_settled(&self) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let Some(reason) = self.unsettled_reason() else {
                return;
            };
            assert!(
                Instant::now() < deadline,
                "cluster not settled after {SETTLE_TIMEOUT:?}: {reason}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Promotes a replica of the master on `master_port` with
    /// `CLUSTER FAILOVER` (coordinated: no write is lost), waits for it to
    /// take over and for the cluster to settle; returns the new master's port.
    pub fn failover(&self, master_port: u16) -> u16 {
        let shard = self.shard_of_master(master_port);
        let replica = shard
            .replicas
            .first()
            .unwrap_or_else(|| panic!("master {master_port} has no replica"))
            .port;
        self.failover_to(replica);
        replica
    }

    /// `CLUSTER FAILOVER` on the replica on `replica_port` (repeated when a
    /// manual failover times out on a busy box), then waits to settle.
    pub fn failover_to(&self, replica_port: u16) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        'attempts: loop {
            let reply = call_at(replica_port, &["CLUSTER", "FAILOVER"]);
            assert_eq!(reply, Resp::Simple("OK".into()), "CLUSTER FAILOVER");
            // A manual failover gives up after 5 s (CLUSTER_MF_TIMEOUT).
            let attempt_end = Instant::now() + Duration::from_secs(15);
            while Instant::now() < attempt_end {
                let role = self.node(replica_port).info_field("role");
                if role.as_deref() == Some("master") {
                    break 'attempts;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                Instant::now() < deadline,
                "replica {replica_port} not promoted\n{}",
                self.logs()
            );
        }
        self.wait_settled();
    }

    /// Moves `slots` slots (the lowest ones the source has) and their keys
    /// from the master on `from_port` to the master on `to_port` with
    /// `redis-cli --cluster reshard`, then waits to settle.
    pub fn reshard(&self, from_port: u16, to_port: u16, slots: usize) {
        let from = self.node(from_port).id();
        let to = self.node(to_port).id();
        self.redis_cli_cluster(&[
            "--cluster".into(),
            "reshard".into(),
            self.node(from_port).addr(),
            "--cluster-from".into(),
            from,
            "--cluster-to".into(),
            to,
            "--cluster-slots".into(),
            slots.to_string(),
            "--cluster-yes".into(),
        ]);
        self.wait_settled();
    }

    /// `redis-cli --cluster rebalance` with `threshold` (percent of a
    /// master's expected slots it may differ by before slots move); returns
    /// what redis-cli printed, once settled.
    pub fn rebalance(&self, threshold: &str) -> String {
        let text = self.redis_cli_cluster(&[
            "--cluster".into(),
            "rebalance".into(),
            self.node(self.any_port()).addr(),
            "--cluster-threshold".into(),
            threshold.into(),
            "--cluster-yes".into(),
        ]);
        self.wait_settled();
        text
    }

    /// Starts a node and adds it as a master without slots
    /// (`redis-cli --cluster add-node`); returns its port once settled.
    pub fn add_master(&mut self) -> u16 {
        self.add_node(None)
    }

    /// Starts a node and adds it as a replica of the master on `master_port`.
    pub fn add_replica(&mut self, master_port: u16) -> u16 {
        let master_id = self.node(master_port).id();
        self.add_node(Some(master_id))
    }

    fn add_node(&mut self, master_id: Option<String>) -> u16 {
        let node = ClusterNode::start();
        let port = node.port;
        let mut args = vec![
            "--cluster".to_string(),
            "add-node".to_string(),
            node.addr(),
            format!("127.0.0.1:{}", self.any_port()),
        ];
        if let Some(master_id) = master_id {
            args.extend([
                "--cluster-slave".into(),
                "--cluster-master-id".into(),
                master_id,
            ]);
        }
        self.nodes.push(node);
        self.redis_cli_cluster(&args);
        self.wait_settled();
        port
    }

    /// Removes the node on `port` (a replica, or a master without slots) with
    /// `redis-cli --cluster del-node`, stops it, and waits to settle.
    pub fn remove_node(&mut self, port: u16) {
        let id = self.node(port).id();
        let via = self
            .nodes()
            .find(|n| n.port != port)
            .expect("another node")
            .addr();
        self.redis_cli_cluster(&["--cluster".into(), "del-node".into(), via, id]);
        let index = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .expect("node");
        // Dropping kills it (del-node already shut it down).
        self.nodes.remove(index);
        self.wait_settled();
    }

    /// Starts migrating `slot` from the master on `from_port` to the master on
    /// `to_port` by hand (`CLUSTER SETSLOT IMPORTING/MIGRATING`), the state in
    /// which the source answers `ASK` for keys it no longer has.
    pub fn begin_slot_migration(&self, slot: u16, from_port: u16, to_port: u16) {
        let from = self.node(from_port).id();
        let to = self.node(to_port).id();
        let slot = slot.to_string();
        let ok = Resp::Simple("OK".into());
        assert_eq!(
            call_at(to_port, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from]),
            ok
        );
        assert_eq!(
            call_at(from_port, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to]),
            ok
        );
    }

    /// Moves one key of a slot being migrated (`MIGRATE`).
    pub fn migrate_key(&self, key: &str, from_port: u16, to_port: u16) {
        let reply = call_at(
            from_port,
            &[
                "MIGRATE",
                "127.0.0.1",
                &to_port.to_string(),
                key,
                "0",
                "10000",
            ],
        );
        assert_eq!(reply, Resp::Simple("OK".into()), "MIGRATE {key}");
    }

    /// Moves every key still in `slot` on the master on `from_port` to the
    /// master on `to_port` (`CLUSTER GETKEYSINSLOT`, `MIGRATE`).
    pub fn migrate_slot_keys(&self, slot: u16, from_port: u16, to_port: u16) {
        loop {
            let reply = call_at(
                from_port,
                &["CLUSTER", "GETKEYSINSLOT", &slot.to_string(), "100"],
            );
            let keys: Vec<String> = reply.items().iter().filter_map(reply_text).collect();
            if keys.is_empty() {
                return;
            }
            for key in keys {
                self.migrate_key(&key, from_port, to_port);
            }
        }
    }

    /// Ends a migration: `CLUSTER SETSLOT slot NODE <to>` on the target, the
    /// source and every other master, then waits to settle.
    pub fn finish_slot_migration(&self, slot: u16, from_port: u16, to_port: u16) {
        let to = self.node(to_port).id();
        let slot_text = slot.to_string();
        let mut order = vec![to_port, from_port];
        order.extend(
            self.master_ports()
                .into_iter()
                .filter(|p| *p != to_port && *p != from_port),
        );
        for port in order {
            let reply = call_at(port, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to]);
            assert_eq!(reply, Resp::Simple("OK".into()), "SETSLOT NODE on {port}");
        }
        self.wait_settled();
    }

    /// Kills the node on `port` with SIGKILL (a crash; its replica takes over
    /// after [`NODE_TIMEOUT_MS`]). The cluster is not settled afterwards.
    pub fn kill9(&mut self, port: u16) {
        self.node_mut(port).kill9();
    }

    /// Waits until a replica of the (killed) master on `master_port` was
    /// promoted and serves its slots; returns the new master's port.
    pub fn wait_promoted_after_crash(&self, master_port: u16, slot: u16) -> u16 {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let serving = self.nodes().find_map(|n| {
                let view = parse_cluster_nodes(
                    &try_call_at(n.port, &["CLUSTER", "NODES"])
                        .ok()
                        .and_then(|r| reply_text(&r))?,
                );
                let me = view.iter().find(|l| l.flags.contains("myself"))?;
                (me.is_master() && me.serves(slot) && me.port != master_port).then_some(me.port)
            });
            if let Some(port) = serving {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "no replica of {master_port} promoted\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The dir of the node on `port` (its `nodes.conf`, its log).
    pub fn node_dir(&self, port: u16) -> &Path {
        self.node(port).dir.path()
    }
}

/// `("MOVED" | "ASK", port)` of a redirect reply.
fn redirect(reply: &Resp) -> Option<(&'static str, u16)> {
    let Resp::Error(message) = reply else {
        return None;
    };
    let mut parts = message.split_whitespace();
    let kind = match parts.next()? {
        "MOVED" => "MOVED",
        "ASK" => "ASK",
        _ => return None,
    };
    let _slot = parts.next()?;
    let port = parts.next()?.rsplit_once(':')?.1.parse().ok()?;
    Some((kind, port))
}

/// `count` keys `<prefix>:<i>` that spread over all slots.
pub fn spread_keys(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}:{i}")).collect()
}

/// A key whose slot is `slot` (`<prefix>:{<tag>}` with a searched tag).
pub fn key_in_slot(prefix: &str, slot: u16) -> String {
    (0u64..)
        .map(|tag| format!("{prefix}:{{t{tag}}}"))
        .find(|key| key_hash_slot(key.as_bytes()) == slot)
        .expect("a tag for every slot")
}

/// Every data key of one server (`__ferry*` keys left out) and its string
/// value (read with `KEYS` and `GET`: string keys of test data sets).
pub fn dump_strings(addr: &str) -> BTreeMap<String, String> {
    let mut conn = super::resp::connect(addr);
    let keys: Vec<String> = conn
        .call(&["KEYS", "*"])
        .unwrap_or_else(|e| panic!("KEYS on {addr}: {e}"))
        .items()
        .iter()
        .filter_map(Resp::text)
        .filter(|key| !key.starts_with("__ferry"))
        .collect();
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(1000) {
        for key in chunk {
            conn.queue(&["GET", key.as_str()]);
        }
        let replies = conn
            .replies()
            .unwrap_or_else(|e| panic!("GET on {addr}: {e}"));
        for (key, reply) in chunk.iter().zip(replies) {
            if let Some(value) = reply.text() {
                out.insert(key.clone(), value);
            }
        }
    }
    out
}

/// Every data key of the cluster, read from each master.
pub fn dump_cluster(cluster: &Cluster) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    for port in cluster.master_ports() {
        all.extend(dump_strings(&format!("127.0.0.1:{port}")));
    }
    all
}

/// What differs between the two dumps (a few keys named).
pub fn dump_difference(
    source: &BTreeMap<String, String>,
    target: &BTreeMap<String, String>,
) -> String {
    let mut out = Vec::new();
    for (key, value) in source {
        match target.get(key) {
            None => out.push(format!("{key} missing on the target")),
            Some(other) if other != value => {
                out.push(format!("{key}: source {value:?}, target {other:?}"))
            }
            Some(_) => {}
        }
    }
    for key in target.keys().filter(|k| !source.contains_key(*k)) {
        out.push(format!("{key} only on the target"));
    }
    let count = out.len();
    out.truncate(8);
    format!("{count} differences: {}", out.join("; "))
}
