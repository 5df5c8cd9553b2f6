//! Redis Cluster topology: which nodes there are, which masters own which
//! slots, and which replicas follow them.
//!
//! What flows in: one or more seed addresses (any node of the cluster, or a
//! comma-separated seed list). What flows out: a [`Topology`] read from one
//! node's `CLUSTER NODES`: its shards (a master, its replicas, the slots it
//! serves) and the slots being migrated. Nothing here keeps a connection:
//! callers discover again when a node stops answering (a failover) or
//! answers `MOVED`/`ASK` (a resharding).
//!
//! `CLUSTER NODES` is used rather than `CLUSTER SHARDS` because it is the one
//! form every cluster-enabled Redis (3.0 onwards) answers, and it carries the
//! migration state of each slot.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use super::client::{Client, ClientError};
use super::command::{key_hash_slot, CLUSTER_SLOTS};
use super::resp::Frame;
use super::url::{RedisUrl, UrlError};

/// Why a topology could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("bad CLUSTER NODES reply from {addr}, line {line}: {reason}")]
    Parse {
        addr: String,
        line: usize,
        reason: String,
    },
    #[error("{addr} is not a cluster node (cluster_enabled:0)")]
    NotCluster { addr: String },
    #[error("cannot read the cluster topology from {addr}: {source}")]
    Client {
        addr: String,
        #[source]
        source: ClientError,
    },
    #[error("the cluster as seen from {addr} serves {covered} of 16384 slots")]
    Incomplete { addr: String, covered: usize },
    #[error("no seed answered: {0}")]
    NoSeed(String),
    #[error(transparent)]
    Url(#[from] UrlError),
}

/// A set of hash slots, as sorted, disjoint, inclusive ranges.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct SlotRanges(Vec<(u16, u16)>);

impl SlotRanges {
    pub fn new() -> SlotRanges {
        SlotRanges(Vec::new())
    }

    /// Every slot.
    pub fn all() -> SlotRanges {
        SlotRanges(vec![(0, CLUSTER_SLOTS - 1)])
    }

    /// Builds from any ranges (overlapping or unordered ones are merged).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u16, u16)>) -> SlotRanges {
        let mut set = SlotRanges(
            ranges
                .into_iter()
                .map(|(a, b)| (a.min(b), a.max(b)))
                .collect(),
        );
        set.normalize();
        set
    }

    pub fn insert_range(&mut self, first: u16, last: u16) {
        self.0.push((first.min(last), first.max(last)));
        self.normalize();
    }

    fn normalize(&mut self) {
        self.0.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(self.0.len());
        for &(a, b) in &self.0 {
            match merged.last_mut() {
                Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.0 = merged;
    }

    pub fn contains(&self, slot: u16) -> bool {
        self.0.iter().any(|&(a, b)| a <= slot && slot <= b)
    }

    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.contains(key_hash_slot(key))
    }

    /// How many slots.
    pub fn count(&self) -> usize {
        self.0.iter().map(|&(a, b)| usize::from(b - a) + 1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.0
    }

    pub fn first(&self) -> Option<u16> {
        self.0.first().map(|r| r.0)
    }

    /// Parses the [`Display`](fmt::Display) form: `0-5460,5462` (empty: no slot).
    pub fn parse(text: &str) -> Result<SlotRanges, String> {
        let mut set = SlotRanges::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (parse_slot(a)?, parse_slot(b)?),
                None => {
                    let s = parse_slot(part)?;
                    (s, s)
                }
            };
            if a > b {
                return Err(format!("slot range {part:?} ends before it starts"));
            }
            set.insert_range(a, b);
        }
        Ok(set)
    }
}

fn parse_slot(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(s) if s < CLUSTER_SLOTS => Ok(s),
        _ => Err(format!("bad slot {text:?} (0..=16383)")),
    }
}

impl fmt::Display for SlotRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(a, b)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for SlotRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SlotRanges({self})")
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    /// `host:port` for clients (the cluster bus port and hostname dropped).
    pub addr: String,
    pub host: String,
    pub port: u16,
    pub myself: bool,
    pub master: bool,
    /// `fail` (agreed) or `fail?` (suspected by the node asked).
    pub failing: bool,
    /// The master this node replicates, when it is a replica.
    pub master_id: Option<String>,
    pub connected: bool,
    pub slots: SlotRanges,
    /// Slots this node is handing to another node (`[slot->-id]`).
    pub migrating: Vec<(u16, String)>,
    /// Slots this node is taking from another node (`[slot-<-id]`).
    pub importing: Vec<(u16, String)>,
}

/// A master, the slots it serves, and its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub master: NodeInfo,
    pub replicas: Vec<NodeInfo>,
}

impl Shard {
    pub fn slots(&self) -> &SlotRanges {
        &self.master.slots
    }
}

/// The cluster as one node sees it.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The node whose view this is.
    pub seen_from: String,
    pub nodes: Vec<NodeInfo>,
}

impl Topology {
    /// Parses a `CLUSTER NODES` reply; `addr` names the node it came from.
    pub fn parse(addr: &str, text: &str) -> Result<Topology, TopologyError> {
        let mut nodes = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let node = parse_node_line(line).map_err(|reason| TopologyError::Parse {
                addr: addr.to_string(),
                line: i + 1,
                reason,
            })?;
            nodes.push(node);
        }
        if nodes.is_empty() {
            return Err(TopologyError::Parse {
                addr: addr.to_string(),
                line: 0,
                reason: "no node listed".to_string(),
            });
        }
        Ok(Topology {
            seen_from: addr.to_string(),
            nodes,
        })
    }

    /// Masters that serve at least one slot, with their replicas, ordered by
    /// their first slot.
    pub fn shards(&self) -> Vec<Shard> {
        let mut shards: Vec<Shard> = self
            .nodes
            .iter()
            .filter(|n| n.master && !n.slots.is_empty())
            .map(|m| Shard {
                master: m.clone(),
                replicas: self
                    .nodes
                    .iter()
                    .filter(|r| r.master_id.as_deref() == Some(m.id.as_str()))
                    .cloned()
                    .collect(),
            })
            .collect();
        shards.sort_by_key(|s| s.master.slots.first());
        shards
    }

    /// How many slots some master serves.
    pub fn covered(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.master)
            .map(|n| n.slots.count())
            .sum()
    }

    pub fn node(&self, id: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The master serving `slot`.
    pub fn master_for_slot(&self, slot: u16) -> Option<&NodeInfo> {
        self.nodes
            .iter()
            .find(|n| n.master && n.slots.contains(slot))
    }

    /// Whether any slot is being migrated.
    pub fn migrating(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| !n.migrating.is_empty() || !n.importing.is_empty())
    }

    /// The address of `node` with the credentials (and db 0) of `template`.
    pub fn url_for(node: &NodeInfo, template: &RedisUrl) -> RedisUrl {
        RedisUrl {
            host: node.host.clone(),
            port: node.port,
            user: template.user.clone(),
            password: template.password.clone(),
            db: 0,
            tls: template.tls.clone(),
        }
    }
}

fn parse_node_line(line: &str) -> Result<NodeInfo, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return Err(format!("{} fields, at least 8 expected", fields.len()));
    }
    let id = fields[0].to_string();
    if id.is_empty() || id.len() > 64 {
        return Err(format!("bad node id {id:?}"));
    }
    // ip:port@cport[,hostname]
    let addr_field = fields[1].split(',').next().unwrap_or("");
    let client_addr = addr_field.split('@').next().unwrap_or("");
    let (host, port) = client_addr
        .rsplit_once(':')
        .ok_or_else(|| format!("bad address {:?}", fields[1]))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad port in address {:?}", fields[1]))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let flags: Vec<&str> = fields[2].split(',').collect();
    let master_id = match fields[3] {
        "-" => None,
        other => Some(other.to_string()),
    };
    let mut node = NodeInfo {
        addr: if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        },
        id,
        host,
        port,
        myself: flags.contains(&"myself"),
        master: flags.contains(&"master"),
        failing: flags.contains(&"fail") || flags.contains(&"fail?"),
        master_id,
        connected: fields[7] == "connected",
        slots: SlotRanges::new(),
        migrating: Vec::new(),
        importing: Vec::new(),
    };
    for field in &fields[8..] {
        if let Some(inner) = field.strip_prefix('[').and_then(|f| f.strip_suffix(']')) {
            if let Some((slot, peer)) = inner.split_once("->-") {
                node.migrating.push((parse_slot(slot)?, peer.to_string()));
            } else if let Some((slot, peer)) = inner.split_once("-<-") {
                node.importing.push((parse_slot(slot)?, peer.to_string()));
            } else {
                return Err(format!("bad slot migration field {field:?}"));
            }
            continue;
        }
        let (a, b) = match field.split_once('-') {
            Some((a, b)) => (parse_slot(a)?, parse_slot(b)?),
            None => {
                let s = parse_slot(field)?;
                (s, s)
            }
        };
        if a > b {
            return Err(format!("slot range {field:?} ends before it starts"));
        }
        node.slots.insert_range(a, b);
    }
    Ok(node)
}

/// Parses a seed list: comma-separated addresses, the first in full
/// (`redis://user:pass@host:port`), the others may be bare `host:port` and
/// then take the first one's credentials.
pub fn parse_seed_list(text: &str) -> Result<Vec<RedisUrl>, UrlError> {
    let mut seeds: Vec<RedisUrl> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut url = RedisUrl::parse(part)?;
        if let Some(first) = seeds.first() {
            if url.user.is_none() && url.password.is_none() {
                url.user = first.user.clone();
                url.password = first.password.clone();
            }
            // A seed list is one cluster: TLS for one is TLS for all.
            if url.tls.is_none() {
                url.tls = first.tls.clone();
            }
        }
        seeds.push(url);
    }
    if seeds.is_empty() {
        return Err(UrlError {
            input: text.to_string(),
            reason: "no address".to_string(),
        });
    }
    Ok(seeds)
}

/// Whether the server at `url` runs with `cluster-enabled yes`.
pub async fn is_cluster(url: &RedisUrl) -> Result<bool, TopologyError> {
    let addr = url.addr();
    let mut client = Client::connect(url)
        .await
        .map_err(|source| TopologyError::Client {
            addr: addr.clone(),
            source,
        })?;
    let reply = client
        .call(["INFO", "cluster"])
        .await
        .map_err(|source| TopologyError::Client {
            addr: addr.clone(),
            source,
        })?;
    let text = reply
        .as_bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    Ok(text.lines().any(|l| l.trim() == "cluster_enabled:1"))
}

/// Reads the topology from one node.
pub async fn read_topology(url: &RedisUrl) -> Result<Topology, TopologyError> {
    let addr = url.addr();
    let client_err = |source| TopologyError::Client {
        addr: addr.clone(),
        source,
    };
    let mut client = Client::connect(url).await.map_err(client_err)?;
    let reply = match client.call(["CLUSTER", "NODES"]).await {
        Ok(reply) => reply,
        Err(ClientError::Server { message, .. })
            if message.contains("cluster support disabled") =>
        {
            return Err(TopologyError::NotCluster { addr })
        }
        Err(e) => return Err(client_err(e)),
    };
    let text = match &reply {
        Frame::Bulk(b) | Frame::Simple(b) => String::from_utf8_lossy(b).into_owned(),
        Frame::Verbatim { text, .. } => String::from_utf8_lossy(text).into_owned(),
        other => {
            return Err(TopologyError::Parse {
                addr,
                line: 0,
                reason: format!("expected a bulk string, got {other:?}"),
            })
        }
    };
    Topology::parse(&addr, &text)
}

/// Reads the topology from the first seed that answers with every slot
/// served. A seed that answers with slots missing is passed over while
/// another may know better; if none does, the last such view is the error.
pub async fn discover(seeds: &[RedisUrl]) -> Result<Topology, TopologyError> {
    let mut errors = Vec::new();
    let mut incomplete = None;
    for seed in seeds {
        match read_topology(seed).await {
            Ok(t) if t.covered() == usize::from(CLUSTER_SLOTS) => return Ok(t),
            Ok(t) => {
                incomplete = Some(TopologyError::Incomplete {
                    addr: t.seen_from.clone(),
                    covered: t.covered(),
                })
            }
            Err(e @ TopologyError::NotCluster { .. }) => return Err(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(incomplete.unwrap_or_else(|| TopologyError::NoSeed(errors.join("; "))))
}

/// A short hash tag whose keys map to `slot` (taken modulo 16384):
/// `{ferry:N}` for the smallest N that lands there. The table of all 16384
/// is found in one pass on first use (every slot has one below 100000).
pub fn tag_for_slot(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let slots = usize::from(CLUSTER_SLOTS);
        let mut tags: Vec<Option<String>> = vec![None; slots];
        let mut left = slots;
        let mut n: u32 = 0;
        while left > 0 {
            let tag = format!("ferry:{n}");
            let at = usize::from(key_hash_slot(tag.as_bytes()));
            if tags[at].is_none() {
                tags[at] = Some(format!("{{{tag}}}"));
                left -= 1;
            }
            n += 1;
        }
        tags.into_iter().map(Option::unwrap_or_default).collect()
    });
    &tags[usize::from(slot & (CLUSTER_SLOTS - 1))]
}

/// Groups keys by slot, keeping their order within a slot.
pub fn by_slot<'a, I: IntoIterator<Item = &'a [u8]>>(keys: I) -> BTreeMap<u16, Vec<&'a [u8]>> {
    let mut map: BTreeMap<u16, Vec<&[u8]>> = BTreeMap::new();
    for k in keys {
        map.entry(key_hash_slot(k)).or_default().push(k);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383 [10924->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005,host-5 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006 slave 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238317741 6 disconnected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
";

    #[test]
    fn parses_shards_replicas_and_migrations() {
        let t = Topology::parse("127.0.0.1:30001", NODES).unwrap();
        assert_eq!(t.nodes.len(), 6);
        assert_eq!(t.covered(), 16384);
        let shards = t.shards();
        assert_eq!(shards.len(), 3);
        assert_eq!(shards[0].master.addr, "127.0.0.1:30001");
        assert!(shards[0].master.myself);
        assert_eq!(shards[0].replicas[0].addr, "127.0.0.1:30004");
        assert_eq!(shards[1].slots().to_string(), "5461-10922");
        assert_eq!(shards[1].replicas[0].addr, "127.0.0.1:30005");
        assert_eq!(
            shards[2].master.migrating,
            vec![(
                10924,
                "67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1".to_string()
            )]
        );
        assert!(!shards[2].replicas[0].connected);
        assert!(t.migrating());
        assert_eq!(t.master_for_slot(0).unwrap().port, 30001);
        assert_eq!(t.master_for_slot(16383).unwrap().port, 30003);
    }

    #[test]
    fn bad_lines_are_typed_errors_naming_the_line() {
        let err = Topology::parse(
            "n:1",
            "abc 127.0.0.1:1@2 master - 0 0 1 connected 0-99999\n",
        )
        .unwrap_err();
        assert!(
            matches!(err, TopologyError::Parse { line: 1, ref reason, .. } if reason.contains("99999")),
            "{err}"
        );
        let err = Topology::parse("n:1", "x y\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = Topology::parse("n:1", "abc nohost master - 0 0 1 connected\n").unwrap_err();
        assert!(err.to_string().contains("bad address"), "{err}");
        assert!(Topology::parse("n:1", "\n").is_err());
    }

    #[test]
    fn slot_ranges_merge_count_and_round_trip() {
        let s = SlotRanges::from_ranges([(10, 20), (0, 5), (6, 9), (100, 100)]);
        assert_eq!(s.to_string(), "0-20,100");
        assert_eq!(s.count(), 22);
        assert!(s.contains(100) && !s.contains(21));
        assert_eq!(SlotRanges::parse("0-20,100").unwrap(), s);
        assert!(SlotRanges::parse("5-1").is_err());
        assert!(SlotRanges::parse("16384").is_err());
        assert_eq!(SlotRanges::all().count(), 16384);
    }

    #[test]
    fn seed_lists_share_the_first_credentials() {
        let seeds = parse_seed_list("redis://:pw@10.0.0.1:7000, 10.0.0.2:7001").unwrap();
        assert_eq!(seeds.len(), 2);
        assert_eq!(seeds[1].password.as_deref(), Some("pw"));
        assert_eq!(seeds[1].port, 7001);
        assert!(parse_seed_list(" , ").is_err());
    }

    #[test]
    fn tags_land_on_their_slot() {
        for slot in [0u16, 1, 5461, 12182, 16383] {
            let tag = tag_for_slot(slot);
            assert_eq!(
                key_hash_slot(format!("__ferry:heartbeat:{tag}").as_bytes()),
                slot
            );
        }
    }
}
