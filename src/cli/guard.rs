//! `ferry guard --target URL --ferry-user NAME`: a one-way target that only
//! ferry can write (NebulaGraph sets its secondary read-only). `--off` undoes
//! it.
//!
//! In: the target (a standalone Redis with ACLs, 6.0 or later, or any one
//! node of a Redis Cluster) and an admin login in its URL. Out: Redis ACLs
//! (on every node of a cluster), and a record of what was changed in the
//! target's own `__ferry:guard` hash (db 0), so that `--off` restores exactly
//! that, from any machine. The record is under ferry's `__ferry` prefix:
//! syncs never replicate such keys nor count them as target data, and their
//! flushes of db 0 keep them (`apply::keyspace`).
//!
//! # On
//!
//! 1. `ACL SETUSER <ferry-user> reset on >PASSWORD ~* &* +@all`: the user
//!    `ferry sync` then writes as (`--target redis://<ferry-user>@host:port`
//!    with its password in a file or `FERRY_TARGET_PASSWORD`).
//! 2. With `--app-user NAME`: a read-only user for applications,
//!    `reset on >PASSWORD ~* &* +@all -@write -@admin`.
//! 3. The connection authenticates as the ferry user, then one `MULTI`:
//!    record the `default` user's rules (its `ACL LIST` line) and the users
//!    made in `__ferry:guard`, and `ACL SETUSER default -@write -@admin
//!    +psync +replconf`: clients that do not log in keep reading, and get
//!    `NOPERM` for writes and for the commands that would lift the guard
//!    (`ACL`, `CONFIG`, …). Scripts and functions run their commands with
//!    the caller's rights. `PSYNC` and `REPLCONF` stay (they are `@admin`):
//!    a replica logs in to its master as `default` unless it has a
//!    `masteruser`, and without them it could not resync after its link
//!    broke or a failover (the price: a client without a login may stream
//!    the data as a replica would, which it can read anyway, and acknowledge
//!    offsets, which `WAIT` counts).
//! 4. `ACL SAVE` in the same `MULTI` when the server has an `aclfile`;
//!    without one the ACLs live in memory and a restart of the target
//!    drops the guard (the command says so).
//!
//! Guarding a guarded target keeps the rules recorded the first time (they
//! are what `--off` goes back to) and sets the users' passwords again. A
//! user that exists and was not made by the guard is refused: `--off`
//! would delete it.
//!
//! # Off
//!
//! Logged in as the ferry user (the only one left with `ACL` rights), one
//! `MULTI`: the `default` user back to its recorded rules (laid over it:
//! their command rules start from `+@all` or `-@all`),
//! `__ferry:guard` deleted, the other users the guard made deleted, `ACL
//! SAVE` when there is an `aclfile`; then a second one deleting the login's
//! own user (and saving again), whose reply Redis does not send: it closes
//! the connections of a deleted user once the transaction ran, a running
//! `ferry sync` logged in as the ferry user included.
//!
//! # Cluster
//!
//! Every node of a Redis Cluster has its own ACLs, and applications read
//! from replicas too (`READONLY`); a replica promoted by a failover must
//! already be guarded. So the guard reads `CLUSTER NODES` from the node
//! given and guards every node listed, masters and replicas, each
//! connected with the same login (`Topology::url_for`). The guarded users
//! keep what applications need to route and read: `CLUSTER SLOTS`/`SHARDS`/
//! `NODES`/`INFO`, `READONLY`, `ASKING` are neither `@admin` nor `@write`.
//! `CLUSTER FAILOVER`/`SETSLOT`/`MEET`/`FORGET`/`REPLICATE` are `@admin`
//! and `MIGRATE` is `@write`, so an operator changing the cluster
//! (`redis-cli --cluster reshard`, a manual failover) logs in as a user
//! with those rights (the ferry user, or their own: other users keep their
//! rights). `redis-cli --cluster add-node` without a login works: it only
//! reads the guarded nodes, and the new node is not guarded yet. The
//! cluster bus is not subject to ACLs, and ferry itself reads the topology
//! as the ferry user.
//!
//! **The record.** A key lives on the master serving its slot, so there is
//! one record for the whole cluster: `__ferry:guard` on that master (and,
//! replicated, on its replicas; a failover keeps it, a resharding moves it
//! with its slot), with the field `users` (the users the guard made, on
//! every node) and one field `default-rules:<node id>` per node guarded
//! (its `default` rules before the guard). Node ids survive failovers and
//! restarts, addresses need not. Any node finds it the way a client does:
//! `CLUSTER NODES`, then the master serving its slot.
//!
//! **On, check first.** Nothing changes until every node listed answered
//! with the login (one flagged failing, unreachable, or refusing `ACL LIST`
//! / `CONFIG GET aclfile` is named, and nothing changed) and no node has a
//! user of the guard's names that the record does not list. Then the
//! record is written (whole, in one `MULTI`: existing fields kept, a node
//! added since gets its own), and the nodes are guarded one by one as in
//! "On", the record's master last; each node saves to its own `aclfile`
//! when it has one, and the report names the nodes without one. If a node
//! refuses or fails part way, what this run changed is put back: the
//! record as it was, and on each node changed the `default` user's rules
//! and the users it set as `ACL LIST` showed them before (the error says
//! so, or names what could not be put back). A guard killed part way
//! leaves the record naming every node, so `--off` restores them all (on a
//! node not guarded yet, restoring its recorded rules changes nothing).
//!
//! Guarding again through the ferry user's login needs that user on every
//! node: a node added since (or restarted without an `aclfile`) does not
//! have it, and is named; log in as a user that exists everywhere, or
//! create the ferry user there first (the record says the guard made it).
//!
//! **Off, node by node.** Every node the record lists must answer before
//! anything changes; nodes it does not list (added since) are named and
//! left alone, and recorded nodes no longer in the cluster are named. Each
//! node is restored as in "Off", then its field leaves the record at once,
//! so a run that stops part way leaves the record naming exactly the nodes
//! still guarded, and `--off` again finishes them; the record's master is
//! restored last, the record deleted in the same `MULTI`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use crate::redis::client::{Client, ClientError};
use crate::redis::cluster::{read_topology, NodeInfo, Topology, TopologyError};
use crate::redis::command::key_hash_slot;
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;
use crate::secret::{read_secret_file, url_from_flags, FlagUrlError, SecretError, SecretUrl};

/// The hash on the target recording what the guard changed.
pub const GUARD_KEY: &str = "__ferry:guard";

/// What the guard lays over the `default` user: no writes, no admin, but
/// the two commands a replica runs on its master (as `default` unless it
/// has a `masteruser`), so that replication survives a reconnect or a
/// failover.
pub const GUARDED_DEFAULT: [&str; 4] = ["-@write", "-@admin", "+psync", "+replconf"];

/// The application user's command rules.
const APP_RULES: [&str; 3] = ["+@all", "-@write", "-@admin"];

/// How long one command on a node may take before the guard gives up on
/// it (a node that hangs is named, not waited for).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// `ferry guard` flags.
#[derive(Debug, Clone, Args)]
pub struct GuardArgs {
    /// The target: `redis://[user[:password]@]host:port`, logged in as a
    /// user allowed to run `ACL` (to turn the guard off: the ferry user).
    /// Of a Redis Cluster any one node: every node it lists is guarded,
    /// with this same login. A password here shows in `ps`: prefer
    /// --target-password-file or FERRY_TARGET_PASSWORD.
    #[arg(long)]
    pub target: SecretUrl,
    /// A file holding the target login's password.
    #[arg(long, value_name = "FILE")]
    pub target_password_file: Option<PathBuf>,
    /// The ACL user ferry writes as (made or updated, all rights).
    #[arg(long, value_name = "NAME", default_value = "ferry")]
    pub ferry_user: String,
    /// A file holding the ferry user's password (required to turn the
    /// guard on).
    #[arg(long, value_name = "FILE")]
    pub ferry_password_file: Option<PathBuf>,
    /// Also make a read-only user for applications.
    #[arg(long, value_name = "NAME", requires = "app_password_file")]
    pub app_user: Option<String>,
    /// A file holding the application user's password.
    #[arg(long, value_name = "FILE")]
    pub app_password_file: Option<PathBuf>,
    /// Undo the guard: the `default` user's rules as they were, the users
    /// the guard made deleted.
    #[arg(long, conflicts_with_all = ["ferry_password_file", "app_user", "app_password_file"])]
    pub off: bool,
}

/// Why `ferry guard` failed.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Url(#[from] FlagUrlError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("target {addr}: {source}")]
    Redis {
        addr: String,
        #[source]
        source: ClientError,
    },
    #[error("target {addr}: {reason}")]
    Refused { addr: String, reason: String },
    #[error("target {addr}: no answer in {}s to {what}", CALL_TIMEOUT.as_secs())]
    Timeout { addr: String, what: String },
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A cluster guard failed on one node and every node it had changed
    /// was put back.
    #[error("{failed}\nnothing was left changed: {undone}")]
    Undone {
        failed: Box<GuardError>,
        undone: String,
    },
    /// A cluster guard (or `--off`) stopped part way, and putting back what
    /// it had done failed too: the nodes named are left changed.
    #[error("{failed}\n{undo}\nleft changed: {left}")]
    LeftChanged {
        failed: Box<GuardError>,
        undo: String,
        left: String,
    },
    #[error("{0}")]
    Usage(String),
}

/// What the guard recorded on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardRecord {
    /// The `default` user's rules before the guard (`ACL LIST`, without
    /// `user default`).
    pub default_rules: String,
    /// The users the guard made.
    pub users: Vec<String>,
}

/// Runs `ferry guard`.
pub fn guard(args: &GuardArgs) -> Result<(), GuardError> {
    let target = url_from_flags("target", &args.target, args.target_password_file.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(GuardError::Runtime)?;
    if args.off {
        let report = runtime.block_on(guard_off(&target))?;
        println!("{report}");
        return Ok(());
    }
    let Some(file) = &args.ferry_password_file else {
        return Err(GuardError::Usage(
            "ferry guard needs --ferry-password-file: the password of the user ferry writes as"
                .to_string(),
        ));
    };
    let ferry_password = read_password("the ferry user's password", file)?;
    let app = match (&args.app_user, &args.app_password_file) {
        (Some(user), Some(file)) => Some((
            user.clone(),
            read_password("the application user's password", file)?,
        )),
        _ => None,
    };
    let report = runtime.block_on(guard_on(
        &target,
        &args.ferry_user,
        &ferry_password,
        app.as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str())),
    ))?;
    println!("{report}");
    Ok(())
}

/// A password from `file`; an empty one is refused (`ACL SETUSER` would
/// take it, and anyone could log in).
fn read_password(what: &str, file: &std::path::Path) -> Result<String, GuardError> {
    let password = read_secret_file(what, file)?;
    if password.is_empty() {
        return Err(GuardError::Usage(format!(
            "{what} file {} is empty",
            file.display()
        )));
    }
    Ok(password)
}

/// Makes `target` writable only by `ferry_user` (module doc, "On");
/// returns what it did, to print.
pub async fn guard_on(
    target: &RedisUrl,
    ferry_user: &str,
    ferry_password: &str,
    app: Option<(&str, &str)>,
) -> Result<String, GuardError> {
    let addr = format!("{}:{}", target.host, target.port);
    check_user_name(&addr, ferry_user)?;
    if let Some((user, _)) = app {
        check_user_name(&addr, user)?;
        if user == ferry_user || user == "default" {
            return Err(refused(
                &addr,
                format!("--app-user {user:?} must be another user"),
            ));
        }
    }
    if ferry_user == "default" {
        return Err(refused(
            &addr,
            "--ferry-user must not be the default user".to_string(),
        ));
    }
    let mut client = connect(target, &addr).await?;
    if server_is_cluster(&mut client, &addr).await? {
        drop(client);
        return cluster_on(target, ferry_user, ferry_password, app).await;
    }
    let existing = read_record(&mut client, &addr).await?;
    // Users the guard did not make are the operator's: `--off` would
    // delete them, so they are not taken over.
    let made = existing.as_ref().map_or(&[][..], |r| r.users.as_slice());
    for user in std::iter::once(ferry_user).chain(app.map(|(user, _)| user)) {
        if !made.iter().any(|u| u == user) && user_exists(&mut client, &addr, user).await? {
            return Err(refused(
                &addr,
                format!(
                    "the ACL user {user:?} exists and was not made by ferry guard (--off would \
                     delete it): name another user"
                ),
            ));
        }
    }
    set_user(&mut client, &addr, ferry_user, ferry_password, &["+@all"]).await?;
    if let Some((user, password)) = app {
        set_user(&mut client, &addr, user, password, &APP_RULES).await?;
    }
    // From here on the login may lose its rights (it may be `default`).
    call(&mut client, &addr, ["AUTH", ferry_user, ferry_password]).await?;
    let record = match existing {
        Some(record) => GuardRecord {
            users: merged_users(&record.users, ferry_user, app.map(|(user, _)| user)),
            ..record
        },
        None => GuardRecord {
            default_rules: default_rules(&mut client, &addr).await?,
            users: merged_users(&[], ferry_user, app.map(|(user, _)| user)),
        },
    };
    let saves = has_aclfile(&mut client, &addr).await?;
    let mut commands: Vec<Vec<String>> = vec![
        vec!["SELECT".into(), "0".into()],
        vec![
            "HSET".into(),
            GUARD_KEY.into(),
            "default-rules".into(),
            record.default_rules.clone(),
            "users".into(),
            record.users.join(" "),
        ],
        guarded_default(),
    ];
    if saves {
        commands.push(vec!["ACL".into(), "SAVE".into()]);
    }
    transaction(&mut client, &addr, &commands).await?;
    let mut report = format!(
        "target {addr} guarded: only {:?} writes (default user: {}{})",
        ferry_user,
        GUARDED_DEFAULT.join(" "),
        app.map(|(user, _)| format!("; read-only user {user:?}"))
            .unwrap_or_default()
    );
    report.push_str(if saves {
        "; saved to the server's aclfile"
    } else {
        "\nwarning: the server has no aclfile: these ACLs live in memory, and a restart of the target drops the guard (run ferry guard again, or configure an aclfile)"
    });
    report.push_str(&format!(
        "\nferry sync writes as --target redis://{ferry_user}@{addr} (password in --target-password-file or FERRY_TARGET_PASSWORD)"
    ));
    Ok(report)
}

/// Undoes [`guard_on`] (module doc, "Off"); returns what it did.
pub async fn guard_off(target: &RedisUrl) -> Result<String, GuardError> {
    let addr = format!("{}:{}", target.host, target.port);
    let mut client = connect(target, &addr).await?;
    if server_is_cluster(&mut client, &addr).await? {
        drop(client);
        return cluster_off(target).await;
    }
    let Some(record) = read_record(&mut client, &addr).await? else {
        return Err(refused(
            &addr,
            format!("not guarded: no {GUARD_KEY} record (nothing to undo)"),
        ));
    };
    let saves = has_aclfile(&mut client, &addr).await?;
    let restore = restore_default(&addr, &record.default_rules)?;
    let mut commands = vec![vec!["SELECT".to_string(), "0".into()], restore];
    commands.push(vec!["DEL".into(), GUARD_KEY.into()]);
    // The login's own user goes last, alone: Redis closes the connection of
    // a deleted user without the transaction's reply (it runs it whole).
    let login = target.user.as_deref().unwrap_or("default");
    for user in record.users.iter().filter(|user| *user != login) {
        commands.push(vec!["ACL".into(), "DELUSER".into(), user.clone()]);
    }
    if saves {
        commands.push(vec!["ACL".into(), "SAVE".into()]);
    }
    transaction(&mut client, &addr, &commands).await?;
    if record.users.iter().any(|user| user == login) {
        let mut last = vec![vec!["ACL".to_string(), "DELUSER".into(), login.to_string()]];
        if saves {
            last.push(vec!["ACL".into(), "SAVE".into()]);
        }
        match transaction(&mut client, &addr, &last).await {
            Ok(())
            | Err(GuardError::Redis {
                source: ClientError::Closed,
                ..
            }) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(format!(
        "target {addr}: guard off: default user back to \"{}\", deleted users {}{}",
        record.default_rules,
        record.users.join(", "),
        if saves {
            "; saved to the server's aclfile"
        } else {
            ""
        }
    ))
}

// ---------------------------------------------------------------------------
// A Redis Cluster target (module doc, "Cluster").

/// What the guard recorded on a cluster: one `__ferry:guard` hash, on the
/// master serving its slot (and so on that master's replicas).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterRecord {
    /// Each guarded node's `default` rules before the guard (`ACL LIST`,
    /// without `user default`), by node id: field `default-rules:<id>`.
    pub default_rules: BTreeMap<String, String>,
    /// The users the guard made, on every node: field `users`.
    pub users: Vec<String>,
}

/// The prefix of a cluster record's per-node fields.
const NODE_RULES_FIELD: &str = "default-rules:";

impl ClusterRecord {
    /// `HSET __ferry:guard users … default-rules:<id> … …`.
    fn hset(&self) -> Vec<String> {
        let mut command = vec![
            "HSET".to_string(),
            GUARD_KEY.to_string(),
            "users".to_string(),
            self.users.join(" "),
        ];
        for (id, rules) in &self.default_rules {
            command.push(format!("{NODE_RULES_FIELD}{id}"));
            command.push(rules.clone());
        }
        command
    }

    /// The record from an `HGETALL` reply; `None` when there is none.
    fn parse(addr: &str, reply: &Frame) -> Result<Option<ClusterRecord>, GuardError> {
        let text = |frame: &Frame| {
            frame
                .as_bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let pairs: Vec<(Option<String>, Option<String>)> = match reply {
            Frame::Array(items) => items
                .chunks(2)
                .map(|pair| (text(&pair[0]), pair.get(1).and_then(text)))
                .collect(),
            Frame::Map(items) => items.iter().map(|(k, v)| (text(k), text(v))).collect(),
            other => return Err(refused(addr, format!("HGETALL {GUARD_KEY}: {other:?}"))),
        };
        if pairs.is_empty() {
            return Ok(None);
        }
        let mut record = ClusterRecord::default();
        let mut users = None;
        for pair in pairs {
            let (Some(field), Some(value)) = pair else {
                return Err(refused(addr, format!("HGETALL {GUARD_KEY}: {reply:?}")));
            };
            if field == "users" {
                users = Some(value.split_whitespace().map(String::from).collect());
            } else if let Some(id) = field.strip_prefix(NODE_RULES_FIELD) {
                record.default_rules.insert(id.to_string(), value);
            } else if field == "default-rules" {
                return Err(refused(
                    addr,
                    format!(
                        "{GUARD_KEY} is a standalone server's record (field default-rules) on a \
                         cluster node: not touching the ACLs"
                    ),
                ));
            }
        }
        match users {
            Some(users) if !record.default_rules.is_empty() => {
                record.users = users;
                Ok(Some(record))
            }
            _ => Err(refused(
                addr,
                format!(
                    "{GUARD_KEY} is incomplete (fields users and {NODE_RULES_FIELD}<node id>): \
                     not touching the ACLs"
                ),
            )),
        }
    }
}

/// A node as errors and reports name it: `host:port (node <id prefix>)`.
fn node_label(node: &NodeInfo) -> String {
    format!(
        "{} (node {})",
        node.addr,
        node.id.get(..8).unwrap_or(&node.id)
    )
}

/// One node of the cluster, connected with the operator's login.
struct GuardNode {
    id: String,
    label: String,
    master: bool,
    client: Client,
    /// Every user's rules when this run started (`ACL LIST`).
    acl_before: BTreeMap<String, String>,
    /// The node has an `aclfile` (`ACL SAVE` after each change).
    saves: bool,
    /// The users this run set here (or may have: no reply).
    users_set: Vec<String>,
    /// This run guarded `default` here (or may have).
    default_set: bool,
    /// The connection is logged in as the ferry user.
    as_ferry: bool,
}

/// The cluster `target` belongs to, as that node sees it, and the master
/// serving the record's slot.
async fn cluster_topology(target: &RedisUrl) -> Result<(Topology, NodeInfo), GuardError> {
    let topology = read_topology(target).await?;
    let slot = key_hash_slot(GUARD_KEY.as_bytes());
    let Some(record_master) = topology.master_for_slot(slot).cloned() else {
        return Err(refused(
            &topology.seen_from,
            format!(
                "no master serves slot {slot}, where the guard's record {GUARD_KEY} lives: \
                 fix the cluster first"
            ),
        ));
    };
    Ok((topology, record_master))
}

/// A connection to `node` with the login of `target`, checked to be a
/// cluster node with ACLs.
async fn connect_node(target: &RedisUrl, node: &NodeInfo) -> Result<Client, GuardError> {
    let label = node_label(node);
    if node.failing {
        return Err(refused(
            &label,
            "flagged failing in the cluster (fail or fail?): every node is needed; bring it \
             back, or CLUSTER FORGET it on every node, then run this again"
                .to_string(),
        ));
    }
    let mut client = connect(&Topology::url_for(node, target), &label).await?;
    if !server_is_cluster(&mut client, &label).await? {
        return Err(refused(
            &label,
            "listed in CLUSTER NODES but not a cluster node".to_string(),
        ));
    }
    Ok(client)
}

/// The record on the master serving its slot.
async fn read_cluster_record(
    client: &mut Client,
    label: &str,
) -> Result<Option<ClusterRecord>, GuardError> {
    let reply = call(client, label, ["HGETALL", GUARD_KEY]).await?;
    ClusterRecord::parse(label, &reply)
}

/// [`guard_on`] of a cluster (module doc, "Cluster").
async fn cluster_on(
    target: &RedisUrl,
    ferry_user: &str,
    ferry_password: &str,
    app: Option<(&str, &str)>,
) -> Result<String, GuardError> {
    let (topology, record_master) = cluster_topology(target).await?;
    // 1. Every node checked, nothing changed: reachable with this login,
    //    a cluster node with ACLs, its users and aclfile read. The node
    //    holding the record goes last.
    let mut infos: Vec<&NodeInfo> = topology
        .nodes
        .iter()
        .filter(|n| n.id != record_master.id)
        .collect();
    infos.sort_by(|a, b| a.addr.cmp(&b.addr));
    infos.push(&record_master);
    let mut nodes = Vec::with_capacity(infos.len());
    for info in infos {
        let label = node_label(info);
        let mut client = connect_node(target, info).await?;
        let acl_before = acl_list(&mut client, &label).await?;
        if !acl_before.contains_key("default") {
            return Err(refused(
                &label,
                "ACL LIST names no default user".to_string(),
            ));
        }
        let saves = has_aclfile(&mut client, &label).await?;
        nodes.push(GuardNode {
            id: info.id.clone(),
            label,
            master: info.master,
            client,
            acl_before,
            saves,
            users_set: Vec::new(),
            default_set: false,
            as_ferry: false,
        });
    }
    let record_at = nodes.len() - 1;
    let existing = {
        let holder = &mut nodes[record_at];
        read_cluster_record(&mut holder.client, &holder.label).await?
    };
    let users: Vec<&str> = std::iter::once(ferry_user)
        .chain(app.map(|(user, _)| user))
        .collect();
    let made = existing.as_ref().map_or(&[][..], |r| r.users.as_slice());
    for node in &nodes {
        for user in &users {
            if !made.iter().any(|u| u == user) && node.acl_before.contains_key(*user) {
                return Err(refused(
                    &node.label,
                    format!(
                        "the ACL user {user:?} exists and was not made by ferry guard (--off \
                         would delete it): name another user"
                    ),
                ));
            }
        }
    }
    // Recorded rules are kept (they are what --off goes back to); a node
    // the record does not know yet (added since) adds its own.
    let mut record = existing.clone().unwrap_or_default();
    for node in &nodes {
        if let Some(rules) = node.acl_before.get("default") {
            record
                .default_rules
                .entry(node.id.clone())
                .or_insert_with(|| rules.clone());
        }
    }
    record.users = merged_users(&record.users, ferry_user, app.map(|(user, _)| user));
    // 2. The record, then 3. node by node; a failure puts everything back.
    let mut record_written = false;
    let result = async {
        let holder = &mut nodes[record_at];
        transaction(
            &mut holder.client,
            &holder.label,
            &[vec!["DEL".into(), GUARD_KEY.into()], record.hset()],
        )
        .await
        .inspect_err(|error| record_written = outcome_unknown(error))?;
        record_written = true;
        for node in nodes.iter_mut() {
            guard_node(node, ferry_user, ferry_password, app).await?;
        }
        Ok::<(), GuardError>(())
    }
    .await;
    if let Err(failed) = result {
        return Err(undo_cluster_on(
            failed,
            &mut nodes,
            record_at,
            record_written.then_some(existing.as_ref()),
            ferry_user,
            target.user.as_deref().unwrap_or("default"),
        )
        .await);
    }
    let masters = nodes.iter().filter(|n| n.master).count();
    let mut report = format!(
        "cluster of {} guarded: {} nodes ({masters} masters, {} replicas): only {ferry_user:?} \
         writes (default user: {}{})",
        topology.seen_from,
        nodes.len(),
        nodes.len() - masters,
        GUARDED_DEFAULT.join(" "),
        app.map(|(user, _)| format!("; read-only user {user:?}"))
            .unwrap_or_default()
    );
    for node in &nodes {
        report.push_str(&format!(
            "\n  {} {}: {}",
            node.label,
            if node.master { "master" } else { "replica" },
            if node.saves {
                "saved to its aclfile"
            } else {
                "no aclfile"
            }
        ));
    }
    let unsaved: Vec<&str> = nodes
        .iter()
        .filter(|n| !n.saves)
        .map(|n| n.label.as_str())
        .collect();
    if !unsaved.is_empty() {
        report.push_str(&format!(
            "\nwarning: {} of {} nodes have no aclfile: their ACLs live in memory, and a restart \
             of one drops its guard (run ferry guard again, or configure an aclfile): {}",
            unsaved.len(),
            nodes.len(),
            unsaved.join(", ")
        ));
    }
    report.push_str(&format!(
        "\nrecorded in {GUARD_KEY} on {} (slot {}) and its replicas",
        nodes[record_at].label,
        key_hash_slot(GUARD_KEY.as_bytes())
    ));
    report.push_str(&format!(
        "\nferry sync writes as --target redis://{ferry_user}@{} (password in \
         --target-password-file or FERRY_TARGET_PASSWORD)",
        topology.seen_from
    ));
    Ok(report)
}

/// Guards one cluster node: the users, then (logged in as the ferry user)
/// the `default` user and `ACL SAVE` in one `MULTI`.
async fn guard_node(
    node: &mut GuardNode,
    ferry_user: &str,
    ferry_password: &str,
    app: Option<(&str, &str)>,
) -> Result<(), GuardError> {
    let mut users = vec![(ferry_user, ferry_password, &["+@all"][..])];
    if let Some((user, password)) = app {
        users.push((user, password, &APP_RULES[..]));
    }
    for (user, password, rules) in users {
        let set = set_user(&mut node.client, &node.label, user, password, rules).await;
        if set.as_ref().map_or_else(outcome_unknown, |_| true) {
            node.users_set.push(user.to_string());
        }
        set?;
    }
    call(
        &mut node.client,
        &node.label,
        ["AUTH", ferry_user, ferry_password],
    )
    .await?;
    node.as_ferry = true;
    let mut commands = vec![guarded_default()];
    if node.saves {
        commands.push(vec!["ACL".into(), "SAVE".into()]);
    }
    // A failed `ACL SAVE` inside the transaction leaves `default` guarded.
    node.default_set = true;
    transaction(&mut node.client, &node.label, &commands).await
}

/// Whether a failed command may still have run: no reply came (a timeout,
/// a closed connection), rather than an error reply or a refusal.
fn outcome_unknown(error: &GuardError) -> bool {
    !matches!(
        error,
        GuardError::Refused { .. }
            | GuardError::Redis {
                source: ClientError::Server { .. },
                ..
            }
    )
}

/// Puts back what a failed [`cluster_on`] changed: the record as it was
/// (`record`: `Some(previous)` once it was written), then every touched
/// node's `default` user and the guard's users as `ACL LIST` showed them
/// before; the error says what was, or what was left changed.
async fn undo_cluster_on(
    failed: GuardError,
    nodes: &mut [GuardNode],
    record_at: usize,
    record: Option<Option<&ClusterRecord>>,
    ferry_user: &str,
    login: &str,
) -> GuardError {
    let mut errors = Vec::new();
    let mut left = Vec::new();
    if let Some(previous) = record {
        let holder = &mut nodes[record_at];
        let mut commands = vec![vec!["DEL".to_string(), GUARD_KEY.into()]];
        if let Some(previous) = previous {
            commands.push(previous.hset());
        }
        if let Err(error) = transaction(&mut holder.client, &holder.label, &commands).await {
            errors.push(format!("putting back {GUARD_KEY}: {error}"));
            left.push(format!("{GUARD_KEY} on {}", holder.label));
        }
    }
    let mut undone = 0;
    for node in nodes
        .iter_mut()
        .rev()
        .filter(|n| n.default_set || !n.users_set.is_empty())
    {
        let me = if node.as_ferry { ferry_user } else { login };
        match undo_node(node, me).await {
            Ok(()) => undone += 1,
            Err(error) => {
                errors.push(format!("putting back {}: {error}", node.label));
                left.push(node.label.clone());
            }
        }
    }
    if errors.is_empty() {
        GuardError::Undone {
            failed: Box::new(failed),
            undone: format!(
                "{undone} node(s) put back as they were{}",
                if record.is_some() {
                    format!(", {GUARD_KEY} too")
                } else {
                    String::new()
                }
            ),
        }
    } else {
        GuardError::LeftChanged {
            failed: Box::new(failed),
            undo: errors.join("\n"),
            left: format!(
                "{} (see each node's ACL LIST; ferry guard --off restores what {GUARD_KEY} \
                 records)",
                left.join(", ")
            ),
        }
    }
}

/// One node back to its `ACL LIST` of before: `default` laid over with its
/// rules (if this run guarded it), each user this run set deleted or reset
/// to its rules; the login's own user (`me`) last and alone (Redis closes
/// the connection of a deleted user without the reply).
async fn undo_node(node: &mut GuardNode, me: &str) -> Result<(), GuardError> {
    let mut first = Vec::new();
    if node.default_set {
        let default = node.acl_before.get("default").cloned().unwrap_or_default();
        first.push(restore_default(&node.label, &default)?);
    }
    let mut last = Vec::new();
    for user in &node.users_set {
        let command = match node.acl_before.get(user) {
            None => vec!["ACL".to_string(), "DELUSER".into(), user.to_string()],
            Some(rules) => {
                let mut command = vec![
                    "ACL".to_string(),
                    "SETUSER".into(),
                    user.to_string(),
                    "reset".into(),
                ];
                command.extend(split_rules(rules).map_err(|reason| refused(&node.label, reason))?);
                command
            }
        };
        if user == me {
            last.push(command);
        } else {
            first.push(command);
        }
    }
    if node.saves {
        first.push(vec!["ACL".into(), "SAVE".into()]);
    }
    if first.len() > usize::from(node.saves) {
        transaction(&mut node.client, &node.label, &first).await?;
    }
    if !last.is_empty() {
        if node.saves {
            last.push(vec!["ACL".into(), "SAVE".into()]);
        }
        last_transaction(&mut node.client, &node.label, &last).await?;
    }
    Ok(())
}

/// A transaction that may delete the connection's own user: Redis runs it
/// whole and closes the connection without its reply.
async fn last_transaction(
    client: &mut Client,
    addr: &str,
    commands: &[Vec<String>],
) -> Result<(), GuardError> {
    match transaction(client, addr, commands).await {
        Ok(())
        | Err(GuardError::Redis {
            source: ClientError::Closed,
            ..
        }) => Ok(()),
        Err(error) => Err(error),
    }
}

/// [`guard_off`] of a cluster (module doc, "Cluster").
async fn cluster_off(target: &RedisUrl) -> Result<String, GuardError> {
    let login = target.user.as_deref().unwrap_or("default");
    let (topology, record_master) = cluster_topology(target).await?;
    let holder_label = node_label(&record_master);
    let mut holder = connect_node(target, &record_master).await?;
    let Some(mut record) = read_cluster_record(&mut holder, &holder_label).await? else {
        return Err(refused(
            &holder_label,
            format!("not guarded: no {GUARD_KEY} record in the cluster (nothing to undo)"),
        ));
    };
    // Every recorded node reachable before anything changes; the others
    // are named and left alone.
    let mut nodes = Vec::new();
    let mut unrecorded = Vec::new();
    for info in &topology.nodes {
        if info.id == record_master.id {
            continue;
        }
        let label = node_label(info);
        if !record.default_rules.contains_key(&info.id) {
            unrecorded.push(label);
            continue;
        }
        let mut client = connect_node(target, info).await?;
        let saves = has_aclfile(&mut client, &label).await?;
        nodes.push((info.id.clone(), label, client, saves));
    }
    nodes.sort_by(|a, b| a.1.cmp(&b.1));
    let holder_saves = has_aclfile(&mut holder, &holder_label).await?;
    let gone: Vec<String> = record
        .default_rules
        .keys()
        .filter(|id| topology.node(id).is_none())
        .cloned()
        .collect();
    // Node by node, each one leaving the record as soon as it is restored
    // (a run that stops part way leaves the record naming exactly the
    // nodes still guarded); the node holding the record last.
    let mut restored = Vec::new();
    let total = nodes.len();
    for (i, (id, label, mut client, saves)) in nodes.into_iter().enumerate() {
        let rules = record.default_rules.get(&id).cloned().unwrap_or_default();
        let step = async {
            off_node(
                &mut client,
                &label,
                Some(&rules),
                &record.users,
                login,
                saves,
                Vec::new(),
            )
            .await?;
            call(
                &mut holder,
                &holder_label,
                ["HDEL", GUARD_KEY, &format!("{NODE_RULES_FIELD}{id}")],
            )
            .await
            .map(|_| ())
        }
        .await;
        if let Err(failed) = step {
            return Err(GuardError::LeftChanged {
                failed: Box::new(failed),
                undo: format!(
                    "guard off stopped after {} of {} nodes{}",
                    restored.len(),
                    total + 1,
                    if restored.is_empty() {
                        String::new()
                    } else {
                        format!(" (restored: {})", restored.join(", "))
                    }
                ),
                left: format!(
                    "{} node(s) still guarded, recorded in {GUARD_KEY} on {holder_label}: run \
                     ferry guard --off again",
                    total - i + 1
                ),
            });
        }
        record.default_rules.remove(&id);
        restored.push(label);
    }
    let holder_rules = record.default_rules.get(&record_master.id).cloned();
    off_node(
        &mut holder,
        &holder_label,
        holder_rules.as_deref(),
        &record.users,
        login,
        holder_saves,
        vec![vec!["DEL".into(), GUARD_KEY.into()]],
    )
    .await
    .map_err(|failed| GuardError::LeftChanged {
        failed: Box::new(failed),
        undo: format!("restored: {}", restored.join(", ")),
        left: format!("{holder_label}, which holds {GUARD_KEY}: run ferry guard --off again"),
    })?;
    if holder_rules.is_some() {
        restored.push(holder_label.clone());
    } else {
        unrecorded.push(holder_label.clone());
    }
    let mut report = format!(
        "cluster of {}: guard off on {} node(s): default user back to its recorded rules, \
         deleted users {}",
        topology.seen_from,
        restored.len(),
        record.users.join(", ")
    );
    for label in &restored {
        report.push_str(&format!("\n  {label}: restored"));
    }
    if !unrecorded.is_empty() {
        report.push_str(&format!(
            "\nnot guarded (not in {GUARD_KEY}, e.g. added to the cluster after the guard), not \
             touched: {}",
            unrecorded.join(", ")
        ));
    }
    if !gone.is_empty() {
        report.push_str(&format!(
            "\nrecorded nodes no longer in the cluster, not touched: {}",
            gone.join(", ")
        ));
    }
    Ok(report)
}

/// One node's guard off: `default` laid over with `rules` (if recorded),
/// `extra` commands, the guard's users deleted, `ACL SAVE`; the login's own
/// user last and alone.
async fn off_node(
    client: &mut Client,
    label: &str,
    rules: Option<&str>,
    users: &[String],
    login: &str,
    saves: bool,
    extra: Vec<Vec<String>>,
) -> Result<(), GuardError> {
    let mut first = Vec::new();
    if let Some(rules) = rules {
        first.push(restore_default(label, rules)?);
    }
    first.extend(extra);
    for user in users.iter().filter(|user| *user != login) {
        first.push(vec!["ACL".into(), "DELUSER".into(), user.clone()]);
    }
    if saves {
        first.push(vec!["ACL".into(), "SAVE".into()]);
    }
    transaction(client, label, &first).await?;
    if users.iter().any(|user| user == login) {
        let mut last = vec![vec!["ACL".to_string(), "DELUSER".into(), login.to_string()]];
        if saves {
            last.push(vec!["ACL".into(), "SAVE".into()]);
        }
        last_transaction(client, label, &last).await?;
    }
    Ok(())
}

/// `ACL SETUSER default -@write -@admin +psync +replconf`.
fn guarded_default() -> Vec<String> {
    ["ACL", "SETUSER", "default"]
        .into_iter()
        .chain(GUARDED_DEFAULT)
        .map(String::from)
        .collect()
}

/// The `ACL SETUSER default …` that puts back `rules` (an `ACL LIST` line)
/// over the guarded user, without `reset` (which would also set flags the
/// user may not have had): their command rules start from `+@all` or
/// `-@all`, so they replace the guard's; everything else the guard did not
/// touch, and selectors (which would be added twice) are left out.
fn restore_default(addr: &str, rules: &str) -> Result<Vec<String>, GuardError> {
    let mut restore = vec!["ACL".to_string(), "SETUSER".into(), "default".into()];
    restore.extend(
        split_rules(rules)
            .map_err(|reason| refused(addr, reason))?
            .into_iter()
            .filter(|rule| !rule.starts_with('(')),
    );
    Ok(restore)
}

/// `ACL SETUSER <user> reset on ><password> ~* &* <commands>`.
async fn set_user(
    client: &mut Client,
    addr: &str,
    user: &str,
    password: &str,
    commands: &[&str],
) -> Result<(), GuardError> {
    let password_rule = format!(">{password}");
    let mut args = vec![
        "ACL",
        "SETUSER",
        user,
        "reset",
        "on",
        &password_rule,
        "~*",
        "&*",
    ];
    args.extend_from_slice(commands);
    call(client, addr, args).await.map(|_| ())
}

fn refused(addr: &str, reason: String) -> GuardError {
    GuardError::Refused {
        addr: addr.to_string(),
        reason,
    }
}

/// ACL user names the guard makes: no spaces or rule syntax (they are
/// recorded space-separated).
fn check_user_name(addr: &str, user: &str) -> Result<(), GuardError> {
    let fine = !user.is_empty()
        && user.len() <= 128
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if fine {
        Ok(())
    } else {
        Err(refused(
            addr,
            format!("user name {user:?}: 1 to 128 of [A-Za-z0-9._-]"),
        ))
    }
}

fn merged_users(recorded: &[String], ferry_user: &str, app: Option<&str>) -> Vec<String> {
    let mut users: Vec<String> = recorded.to_vec();
    for user in std::iter::once(ferry_user).chain(app) {
        if !users.iter().any(|u| u == user) {
            users.push(user.to_string());
        }
    }
    users
}

async fn connect(target: &RedisUrl, addr: &str) -> Result<Client, GuardError> {
    match tokio::time::timeout(CALL_TIMEOUT, Client::connect(target)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(source)) => Err(GuardError::Redis {
            addr: addr.to_string(),
            source,
        }),
        Err(_) => Err(GuardError::Timeout {
            addr: addr.to_string(),
            what: "connecting and logging in".to_string(),
        }),
    }
}

/// One command, its error reply an error naming `addr`, given up on after
/// [`CALL_TIMEOUT`].
async fn call<I, T>(client: &mut Client, addr: &str, args: I) -> Result<Frame, GuardError>
where
    I: IntoIterator<Item = T>,
    T: AsRef<[u8]>,
{
    let args: Vec<T> = args.into_iter().collect();
    let what = args
        .iter()
        .take(2)
        .map(|a| String::from_utf8_lossy(a.as_ref()).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    match tokio::time::timeout(CALL_TIMEOUT, client.call(args)).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(source)) => Err(GuardError::Redis {
            addr: addr.to_string(),
            source,
        }),
        Err(_) => Err(GuardError::Timeout {
            addr: addr.to_string(),
            what,
        }),
    }
}

/// Whether the server is a Redis Cluster node; one without ACLs (before
/// 6.0) is refused.
async fn server_is_cluster(client: &mut Client, addr: &str) -> Result<bool, GuardError> {
    let info = match tokio::time::timeout(CALL_TIMEOUT, client.info("server")).await {
        Ok(Ok(info)) => info,
        Ok(Err(source)) => {
            return Err(GuardError::Redis {
                addr: addr.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(GuardError::Timeout {
                addr: addr.to_string(),
                what: "INFO server".to_string(),
            })
        }
    };
    let version = info.get("redis_version").cloned().unwrap_or_default();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if major < 6 {
        return Err(refused(
            addr,
            format!("Redis {version} has no ACLs (6.0 or later is needed)"),
        ));
    }
    Ok(info.get("redis_mode").map(String::as_str) == Some("cluster"))
}

/// The guard's record on the target, if it is guarded.
async fn read_record(client: &mut Client, addr: &str) -> Result<Option<GuardRecord>, GuardError> {
    call(client, addr, ["SELECT", "0"]).await?;
    let reply = call(client, addr, ["HMGET", GUARD_KEY, "default-rules", "users"]).await?;
    let Frame::Array(fields) = reply else {
        return Err(refused(addr, format!("HMGET {GUARD_KEY}: {reply:?}")));
    };
    let text = |frame: Option<&Frame>| {
        frame
            .and_then(Frame::as_bytes)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    match (text(fields.first()), text(fields.get(1))) {
        (Some(default_rules), Some(users)) => Ok(Some(GuardRecord {
            default_rules,
            users: users.split_whitespace().map(String::from).collect(),
        })),
        (None, None) => Ok(None),
        _ => Err(refused(
            addr,
            format!(
                "{GUARD_KEY} is incomplete (fields default-rules and users): not touching the ACLs"
            ),
        )),
    }
}

/// The `default` user's rules as `ACL LIST` shows them.
async fn default_rules(client: &mut Client, addr: &str) -> Result<String, GuardError> {
    acl_list(client, addr)
        .await?
        .remove("default")
        .ok_or_else(|| refused(addr, "ACL LIST names no default user".to_string()))
}

/// `ACL LIST`: each user's rules (the line without `user <name> `).
async fn acl_list(client: &mut Client, addr: &str) -> Result<BTreeMap<String, String>, GuardError> {
    let reply = call(client, addr, ["ACL", "LIST"]).await?;
    let Frame::Array(lines) = reply else {
        return Err(refused(addr, format!("ACL LIST: {reply:?}")));
    };
    Ok(lines
        .iter()
        .filter_map(Frame::as_bytes)
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .filter_map(|line| {
            let rest = line.strip_prefix("user ")?;
            let (name, rules) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((name.to_string(), rules.to_string()))
        })
        .collect())
}

/// Whether the ACL user `user` exists (`ACL GETUSER` answers nil when not).
async fn user_exists(client: &mut Client, addr: &str, user: &str) -> Result<bool, GuardError> {
    let reply = call(client, addr, ["ACL", "GETUSER", user]).await?;
    Ok(!matches!(reply, Frame::Null))
}

async fn has_aclfile(client: &mut Client, addr: &str) -> Result<bool, GuardError> {
    let reply = call(client, addr, ["CONFIG", "GET", "aclfile"]).await?;
    Ok(match reply {
        Frame::Array(items) => items
            .get(1)
            .and_then(Frame::as_bytes)
            .is_some_and(|file| !file.is_empty()),
        _ => false,
    })
}

/// Runs `commands` in one `MULTI`/`EXEC`; any refused command is an error
/// (and, refused at queueing, nothing runs).
async fn transaction(
    client: &mut Client,
    addr: &str,
    commands: &[Vec<String>],
) -> Result<(), GuardError> {
    call(client, addr, ["MULTI"]).await?;
    for command in commands {
        if let Err(error) = call(client, addr, command).await {
            let _ = call(client, addr, ["DISCARD"]).await;
            return Err(error);
        }
    }
    let reply = call(client, addr, ["EXEC"]).await?;
    let Frame::Array(replies) = reply else {
        return Err(refused(addr, format!("EXEC: {reply:?}")));
    };
    for (command, reply) in commands.iter().zip(&replies) {
        if let Some(message) = reply.error_message() {
            return Err(refused(
                addr,
                format!(
                    "{} failed inside the transaction: {message}",
                    command[..2].join(" ")
                ),
            ));
        }
    }
    Ok(())
}

/// Splits an `ACL LIST` rule line into `ACL SETUSER` arguments: on spaces,
/// except inside a selector's parentheses.
pub fn split_rules(rules: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut depth = 0u32;
    for c in rules.chars() {
        match c {
            '(' => {
                depth += 1;
                current.push(c);
            }
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' in the recorded rules {rules:?}"))?;
                current.push(c);
            }
            ' ' if depth == 0 => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in the recorded rules {rules:?}"));
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_split_on_spaces_but_not_inside_selectors() {
        assert_eq!(
            split_rules("on nopass sanitize-payload ~* &* +@all").unwrap(),
            vec!["on", "nopass", "sanitize-payload", "~*", "&*", "+@all"]
        );
        assert_eq!(
            split_rules("on #abc ~app:* resetchannels -@all +get (~x:* +@read +set)").unwrap(),
            vec![
                "on",
                "#abc",
                "~app:*",
                "resetchannels",
                "-@all",
                "+get",
                "(~x:* +@read +set)"
            ]
        );
        assert!(split_rules("on (~x").is_err());
        assert!(split_rules("on ~x)").is_err());
    }

    #[test]
    fn user_names_are_checked() {
        assert!(check_user_name("h:1", "ferry-writer.1").is_ok());
        assert!(check_user_name("h:1", "").is_err());
        assert!(check_user_name("h:1", "a b").is_err());
        assert!(check_user_name("h:1", ">pw").is_err());
    }
}
