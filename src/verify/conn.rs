//! The connections of one side of a verify: one rate-limited connection to
//! a standalone server, or one per master of a Redis Cluster
//! ([`super::cluster`]), found out when the side is connected.
//!
//! In: commands for one side, most of them about one key ([`KeyCommand`]:
//! on a cluster side it goes to the master serving the key's slot), and the
//! walk of every key of a db ([`KeyWalk`]). Out: their replies, or a
//! [`VerifyError`] naming the side, the db, the key and the command. Every
//! command, pipelined or not, first takes a token from the rate limiter of
//! the server it goes to ([`RateLimiter`], one per server).

use bytes::Bytes;

use super::cluster::{ClusterConn, ClusterWalk};
use super::rate::RateLimiter;
use super::report::escape_key;
use super::{Side, VerifyConfig, VerifyError};
use crate::redis::client::{parse_info, Client, ClientError};
use crate::redis::command::Command;
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;

/// Key probed with `DEBUG DIGEST-VALUE` to learn whether DEBUG is allowed
/// (a missing key digests to zeros; nothing is written).
const DIGEST_PROBE_KEY: &str = "__ferry:verify:digest-probe";

/// A command about one key: on a cluster side it goes to the master
/// serving the key's slot.
#[derive(Debug, Clone)]
pub(crate) struct KeyCommand {
    pub key: Bytes,
    pub cmd: Command,
    /// A cluster node runs it without checking that it serves the key
    /// (`DEBUG DIGEST-VALUE`): no `MOVED`/`ASK` would say it went astray.
    pub unrouted: bool,
}

impl KeyCommand {
    /// `name key`.
    pub fn on(name: &'static [u8], key: &Bytes) -> KeyCommand {
        KeyCommand {
            key: key.clone(),
            cmd: Command::new(vec![Bytes::from_static(name), key.clone()]),
            unrouted: false,
        }
    }
}

/// One rate-limited connection to one server.
pub(crate) struct NodeConn {
    client: Client,
    limiter: RateLimiter,
    /// Commands sent, for the report.
    pub commands: u64,
}

impl NodeConn {
    pub async fn connect(side: Side, url: &RedisUrl, qps: u32) -> Result<NodeConn, VerifyError> {
        let client = Client::connect(url)
            .await
            .map_err(|source| VerifyError::Connect {
                side,
                url: url.to_string(),
                source,
            })?;
        Ok(NodeConn {
            client,
            limiter: RateLimiter::new(qps),
            commands: 0,
        })
    }

    /// Whether the server answers `DEBUG DIGEST-VALUE`: refused when
    /// enable-debug-command is off (or DEBUG is renamed), and values are
    /// then compared by walking them.
    pub async fn allows_digest(&mut self, side: Side) -> Result<bool, VerifyError> {
        let probe = self
            .send(
                side,
                &Command::from_parts(["DEBUG", "DIGEST-VALUE", DIGEST_PROBE_KEY]),
            )
            .await?;
        Ok(probe.error_message().is_none())
    }

    /// Whether the server runs with `cluster-enabled yes` (`INFO cluster`).
    pub async fn cluster_enabled(&mut self, side: Side, db: u32) -> Result<bool, VerifyError> {
        let reply = self
            .send(side, &Command::from_parts(["INFO", "cluster"]))
            .await?;
        if let Some(message) = reply.error_message() {
            return Err(VerifyError::Server {
                side,
                at: format!("db {db}"),
                command: "INFO".to_string(),
                message,
            });
        }
        let text = reply.as_bytes().map(|b| String::from_utf8_lossy(b));
        Ok(text.is_some_and(|t| t.lines().any(|l| l.trim() == "cluster_enabled:1")))
    }

    /// Sends one command; error replies come back as frames.
    pub async fn send(&mut self, side: Side, cmd: &Command) -> Result<Frame, VerifyError> {
        self.limiter.acquire(1).await;
        self.commands += 1;
        self.client
            .call_command(cmd)
            .await
            .or_else(|error| match error {
                ClientError::Server { message, .. } => Ok(Frame::Error(Bytes::from(message))),
                source => Err(VerifyError::Link {
                    side,
                    command: command_name(cmd),
                    source,
                }),
            })
    }

    /// Sends `cmds` in one write and reads their replies; error replies come
    /// back as frames, for the caller to judge key by key.
    pub async fn pipeline(
        &mut self,
        side: Side,
        cmds: &[&Command],
    ) -> Result<Vec<Frame>, VerifyError> {
        let Some(first) = cmds.first() else {
            return Ok(Vec::new());
        };
        self.limiter.acquire(cmds.len()).await;
        self.commands += cmds.len() as u64;
        let link = |source| VerifyError::Link {
            side,
            command: command_name(first),
            source,
        };
        for cmd in cmds {
            self.client.queue(cmd);
        }
        self.client.flush().await.map_err(link)?;
        let mut replies = Vec::with_capacity(cmds.len());
        for _ in cmds {
            replies.push(self.client.read_reply().await.map_err(link)?);
        }
        Ok(replies)
    }
}

/// How a side's commands reach it.
enum Route {
    Server(NodeConn),
    Cluster(Box<ClusterConn>),
}

/// One side of a verify.
pub(crate) struct Conn {
    pub side: Side,
    route: Route,
    /// The db the side has selected (always 0 on a cluster).
    pub db: u32,
    /// Whether every server of the side answers `DEBUG DIGEST-VALUE`.
    pub digest: bool,
}

impl Conn {
    /// Connects to the side at `seeds` (one address, or a cluster's seed
    /// list) and finds out whether it is a cluster.
    pub async fn connect(side: Side, seeds: &[RedisUrl], qps: u32) -> Result<Conn, VerifyError> {
        let mut last_error = None;
        for url in seeds {
            // A cluster node refuses SELECT: the db is selected once the
            // server is known to be standalone.
            let at_db0 = RedisUrl {
                db: 0,
                ..url.clone()
            };
            let mut node = match NodeConn::connect(side, &at_db0, qps).await {
                Ok(node) => node,
                // Another seed may answer.
                Err(error) => {
                    last_error = Some(match error {
                        VerifyError::Connect { side, source, .. } => VerifyError::Connect {
                            side,
                            url: url.to_string(),
                            source,
                        },
                        other => other,
                    });
                    continue;
                }
            };
            let digest = node.allows_digest(side).await?;
            if !node.cluster_enabled(side, url.db).await? {
                if seeds.len() > 1 {
                    return Err(VerifyError::NotCluster {
                        side,
                        url: url.to_string(),
                    });
                }
                if url.db != 0 {
                    let select = Command::from_parts(["SELECT".to_string(), url.db.to_string()]);
                    let reply = node.send(side, &select).await?;
                    if let Some(message) = reply.error_message() {
                        return Err(VerifyError::Server {
                            side,
                            at: at(url.db, None),
                            command: "SELECT".to_string(),
                            message,
                        });
                    }
                }
                return Ok(Conn {
                    side,
                    route: Route::Server(node),
                    db: url.db,
                    digest,
                });
            }
            if url.db != 0 {
                return Err(VerifyError::ClusterDb { side, db: url.db });
            }
            let cluster = ClusterConn::connect(side, seeds, (url.addr(), node), qps).await?;
            return Ok(Conn {
                side,
                db: 0,
                digest: digest && cluster.digest,
                route: Route::Cluster(Box::new(cluster)),
            });
        }
        Err(last_error.unwrap_or_else(|| VerifyError::Connect {
            side,
            url: "(no address)".to_string(),
            source: ClientError::Closed,
        }))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.route, Route::Cluster(_))
    }

    /// Commands sent to the side (all its servers), for the report.
    pub fn commands(&self) -> u64 {
        match &self.route {
            Route::Server(node) => node.commands,
            Route::Cluster(cluster) => cluster.commands(),
        }
    }

    /// Masters whose keys were walked (1 for a standalone server that was,
    /// 0 when no db was compared).
    pub fn masters_scanned(&self, walked: bool) -> u32 {
        match &self.route {
            Route::Server(_) => u32::from(walked),
            Route::Cluster(cluster) => cluster.masters_scanned(),
        }
    }

    /// Rounds of the walks that walked again slots which had moved under
    /// them (0 for a standalone server).
    pub fn rewalks(&self) -> u32 {
        match &self.route {
            Route::Server(_) => 0,
            Route::Cluster(cluster) => cluster.rewalks,
        }
    }

    /// Selects `db`. A cluster has db 0 alone: any other is refused.
    pub async fn select(&mut self, db: u32) -> Result<(), VerifyError> {
        if self.db == db {
            return Ok(());
        }
        if self.is_cluster() {
            return Err(VerifyError::ClusterDb {
                side: self.side,
                db,
            });
        }
        self.call(
            Command::from_parts(["SELECT".to_string(), db.to_string()]),
            None,
        )
        .await?;
        self.db = db;
        Ok(())
    }

    /// Sends one command (about `key`, when given: on a cluster it goes to
    /// the master serving the key); an error reply becomes
    /// [`VerifyError::Server`].
    pub async fn call(&mut self, cmd: Command, key: Option<&[u8]>) -> Result<Frame, VerifyError> {
        let side = self.side;
        let reply =
            match (&mut self.route, key) {
                (Route::Server(node), _) => node.send(side, &cmd).await?,
                (Route::Cluster(cluster), Some(key)) => {
                    let keyed = KeyCommand {
                        key: Bytes::copy_from_slice(key),
                        cmd: cmd.clone(),
                        unrouted: false,
                    };
                    cluster.pipeline(&[keyed]).await?.pop().ok_or_else(|| {
                        self.bad_reply(&command_name(&cmd), Some(key), &Frame::Null)
                    })?
                }
                (Route::Cluster(cluster), None) => cluster.send_any(&cmd).await?,
            };
        match reply.error_message() {
            Some(message) => Err(VerifyError::Server {
                side: self.side,
                at: self.at(key),
                command: command_name(&cmd),
                message,
            }),
            None => Ok(reply),
        }
    }

    /// Sends `cmds` pipelined (per master on a cluster) and returns their
    /// replies in order; error replies come back as frames, for the caller
    /// to judge key by key.
    pub async fn pipeline(&mut self, cmds: &[KeyCommand]) -> Result<Vec<Frame>, VerifyError> {
        match &mut self.route {
            Route::Server(node) => {
                let plain: Vec<&Command> = cmds.iter().map(|c| &c.cmd).collect();
                node.pipeline(self.side, &plain).await
            }
            Route::Cluster(cluster) => cluster.pipeline(cmds).await,
        }
    }

    /// Dbs with keys, from `INFO keyspace` (`db3:keys=10,expires=0,…`); on
    /// a cluster, of every master.
    pub async fn keyspace_dbs(&mut self) -> Result<Vec<u32>, VerifyError> {
        let cmd = Command::from_parts(["INFO", "keyspace"]);
        let replies = match &mut self.route {
            Route::Server(node) => vec![node.send(self.side, &cmd).await?],
            Route::Cluster(cluster) => cluster.send_masters(&cmd).await?,
        };
        let mut dbs = Vec::new();
        for reply in &replies {
            if let Some(message) = reply.error_message() {
                return Err(self.server_error("INFO", None, message));
            }
            let text = reply
                .as_bytes()
                .ok_or_else(|| self.bad_reply("INFO", None, reply))?;
            for (name, value) in parse_info(&String::from_utf8_lossy(text)) {
                let Some(db) = name.strip_prefix("db").and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let keys = value
                    .split(',')
                    .find_map(|part| part.strip_prefix("keys="))
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| self.bad_reply("INFO keyspace", None, reply))?;
                if keys > 0 {
                    dbs.push(db);
                }
            }
        }
        Ok(dbs)
    }

    /// A walk over every key of the selected db.
    pub fn walk(&self, config: &VerifyConfig) -> KeyWalk {
        match &self.route {
            Route::Server(_) => KeyWalk::Server {
                cursor: Some(Bytes::from_static(b"0")),
            },
            Route::Cluster(_) => KeyWalk::Cluster(Box::new(ClusterWalk::new(config))),
        }
    }

    /// The next page of `walk` (`SCAN MATCH --match COUNT --batch`), without
    /// ferry's internal keys and keys outside the key filter; `None` once
    /// the walk is over. A page may be
    /// empty.
    pub async fn next_page(
        &mut self,
        walk: &mut KeyWalk,
        config: &VerifyConfig,
    ) -> Result<Option<Vec<Bytes>>, VerifyError> {
        match (walk, &mut self.route) {
            (KeyWalk::Server { cursor }, Route::Server(node)) => {
                let Some(at) = cursor.take() else {
                    return Ok(None);
                };
                let reply = node.send(self.side, &scan_command(&at, config)).await?;
                if let Some(message) = reply.error_message() {
                    return Err(self.server_error("SCAN", None, message));
                }
                let (next, keys) =
                    parse_scan(&reply).ok_or_else(|| self.bad_reply("SCAN", None, &reply))?;
                if next.as_ref() != b"0" {
                    *cursor = Some(next);
                }
                Ok(Some(
                    keys.into_iter()
                        .filter(|key| super::compared(config, key))
                        .collect(),
                ))
            }
            (KeyWalk::Cluster(walk), Route::Cluster(cluster)) => {
                cluster.next_page(walk, config).await
            }
            // A walk of the other kind of side: nothing to walk here.
            _ => Ok(None),
        }
    }

    /// `db N` or `db N, key "k"`, for messages.
    pub fn at(&self, key: Option<&[u8]>) -> String {
        at(self.db, key)
    }

    /// A malformed or unexpected reply to `command` about `key`.
    pub fn bad_reply(&self, command: &str, key: Option<&[u8]>, reply: &Frame) -> VerifyError {
        bad_reply(self.side, self.at(key), command, reply)
    }

    /// A reply that is an error, as [`VerifyError::Server`].
    pub fn server_error(&self, command: &str, key: Option<&[u8]>, message: String) -> VerifyError {
        VerifyError::Server {
            side: self.side,
            at: self.at(key),
            command: command.to_string(),
            message,
        }
    }
}

/// Where a walk over a side's keys stands.
pub(crate) enum KeyWalk {
    /// The next `SCAN` cursor; `None` once the scan came back to 0.
    Server {
        cursor: Option<Bytes>,
    },
    Cluster(Box<ClusterWalk>),
}

/// `db N` or `db N, key "k"`, for messages.
pub(crate) fn at(db: u32, key: Option<&[u8]>) -> String {
    match key {
        Some(key) => format!("db {db}, key {}", escape_key(key)),
        None => format!("db {db}"),
    }
}

/// A malformed or unexpected reply, shown cut to 200 bytes.
pub(crate) fn bad_reply(side: Side, at: String, command: &str, reply: &Frame) -> VerifyError {
    let mut shown = format!("{reply:?}");
    if shown.len() > 200 {
        let mut cut = 200;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push('…');
    }
    VerifyError::Reply {
        side,
        at,
        command: command.to_string(),
        reply: shown,
    }
}

/// `SCAN cursor [MATCH pattern] COUNT batch`.
pub(crate) fn scan_command(cursor: &Bytes, config: &VerifyConfig) -> Command {
    let mut args = vec![Bytes::from_static(b"SCAN"), cursor.clone()];
    if let Some(pattern) = super::scan_pattern(config) {
        args.push(Bytes::from_static(b"MATCH"));
        args.push(pattern);
    }
    args.push(Bytes::from_static(b"COUNT"));
    args.push(Bytes::from(config.batch.max(1).to_string()));
    Command::new(args)
}

/// `[cursor, [key…]]` of a `SCAN` reply.
pub(crate) fn parse_scan(reply: &Frame) -> Option<(Bytes, Vec<Bytes>)> {
    let Frame::Array(parts) = reply else {
        return None;
    };
    let [next, Frame::Array(page)] = parts.as_slice() else {
        return None;
    };
    let keys = page
        .iter()
        .map(|item| item.as_bytes().cloned())
        .collect::<Option<Vec<Bytes>>>()?;
    Some((next.as_bytes()?.clone(), keys))
}

pub(crate) fn command_name(cmd: &Command) -> String {
    String::from_utf8_lossy(cmd.name()).to_uppercase()
}
