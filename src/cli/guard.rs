//! `ferry guard --target URL --ferry-user NAME`: a one-way target that only
//! ferry can write (NebulaGraph sets its secondary read-only). `--off` undoes
//! it.
//!
//! In: the target (a standalone Redis with ACLs, 6.0 or later) and an admin
//! login in its URL. Out: Redis ACLs, and a record of what was changed in the
//! target's own `__ferry:guard` hash (db 0), so that `--off` restores exactly
//! that, from any machine.
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
//!    made in `__ferry:guard`, and `ACL SETUSER default -@write -@admin`:
//!    clients that do not log in keep reading, and get `NOPERM` for writes
//!    and for the commands that would lift the guard (`ACL`, `CONFIG`, …).
//!    Scripts and functions run their commands with the caller's rights.
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
//! A Redis Cluster target is refused: every node has its own ACLs, and
//! guarding them one by one is not done yet.

use std::path::PathBuf;

use clap::Args;

use crate::redis::client::{Client, ClientError};
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;
use crate::secret::{read_secret_file, url_from_flags, FlagUrlError, SecretError, SecretUrl};

/// The hash on the target recording what the guard changed.
pub const GUARD_KEY: &str = "__ferry:guard";

/// `ferry guard` flags.
#[derive(Debug, Clone, Args)]
pub struct GuardArgs {
    /// The target: `redis://[user[:password]@]host:port`, logged in as a
    /// user allowed to run `ACL` (to turn the guard off: the ferry user). A
    /// password here shows in `ps`: prefer --target-password-file or
    /// FERRY_TARGET_PASSWORD.
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
    check_standalone(&mut client, &addr).await?;
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
    let redis = |source| GuardError::Redis {
        addr: addr.clone(),
        source,
    };
    set_user(&mut client, &addr, ferry_user, ferry_password, &["+@all"]).await?;
    if let Some((user, password)) = app {
        set_user(
            &mut client,
            &addr,
            user,
            password,
            &["+@all", "-@write", "-@admin"],
        )
        .await?;
    }
    // From here on the login may lose its rights (it may be `default`).
    client
        .call(["AUTH", ferry_user, ferry_password])
        .await
        .map_err(redis)?;
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
        ["ACL", "SETUSER", "default", "-@write", "-@admin"]
            .map(String::from)
            .to_vec(),
    ];
    if saves {
        commands.push(vec!["ACL".into(), "SAVE".into()]);
    }
    transaction(&mut client, &addr, &commands).await?;
    let mut report = format!(
        "target {addr} guarded: only {:?} writes (default user: -@write -@admin{})",
        ferry_user,
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
    check_standalone(&mut client, &addr).await?;
    let Some(record) = read_record(&mut client, &addr).await? else {
        return Err(refused(
            &addr,
            format!("not guarded: no {GUARD_KEY} record (nothing to undo)"),
        ));
    };
    let saves = has_aclfile(&mut client, &addr).await?;
    // The recorded rules laid over the guarded user, without `reset`
    // (which would also set flags the user may not have had): their
    // command rules start from `+@all` or `-@all`, so they replace the
    // guard's `-@write -@admin`; everything else the guard did not touch,
    // and selectors (which would be added twice) are left out.
    let mut restore = vec!["ACL".to_string(), "SETUSER".into(), "default".into()];
    restore.extend(
        split_rules(&record.default_rules)
            .map_err(|reason| refused(&addr, reason))?
            .into_iter()
            .filter(|rule| !rule.starts_with('(')),
    );
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
    client
        .call(args)
        .await
        .map(|_| ())
        .map_err(|source| GuardError::Redis {
            addr: addr.to_string(),
            source,
        })
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
    Client::connect(target)
        .await
        .map_err(|source| GuardError::Redis {
            addr: addr.to_string(),
            source,
        })
}

async fn check_standalone(client: &mut Client, addr: &str) -> Result<(), GuardError> {
    let info = client
        .info("server")
        .await
        .map_err(|source| GuardError::Redis {
            addr: addr.to_string(),
            source,
        })?;
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
    if info.get("redis_mode").map(String::as_str) == Some("cluster") {
        return Err(refused(
            addr,
            "a Redis Cluster node: every node has its own ACLs, and guarding a cluster is not done yet".to_string(),
        ));
    }
    Ok(())
}

/// The guard's record on the target, if it is guarded.
async fn read_record(client: &mut Client, addr: &str) -> Result<Option<GuardRecord>, GuardError> {
    let redis = |source| GuardError::Redis {
        addr: addr.to_string(),
        source,
    };
    client.call(["SELECT", "0"]).await.map_err(redis)?;
    let reply = client
        .call(["HMGET", GUARD_KEY, "default-rules", "users"])
        .await
        .map_err(redis)?;
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
    let reply = client
        .call(["ACL", "LIST"])
        .await
        .map_err(|source| GuardError::Redis {
            addr: addr.to_string(),
            source,
        })?;
    let Frame::Array(lines) = reply else {
        return Err(refused(addr, format!("ACL LIST: {reply:?}")));
    };
    lines
        .iter()
        .filter_map(Frame::as_bytes)
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .find_map(|line| line.strip_prefix("user default ").map(String::from))
        .ok_or_else(|| refused(addr, "ACL LIST names no default user".to_string()))
}

/// Whether the ACL user `user` exists (`ACL GETUSER` answers nil when not).
async fn user_exists(client: &mut Client, addr: &str, user: &str) -> Result<bool, GuardError> {
    let reply = client
        .call(["ACL", "GETUSER", user])
        .await
        .map_err(|source| GuardError::Redis {
            addr: addr.to_string(),
            source,
        })?;
    Ok(!matches!(reply, Frame::Null))
}

async fn has_aclfile(client: &mut Client, addr: &str) -> Result<bool, GuardError> {
    let reply = client
        .call(["CONFIG", "GET", "aclfile"])
        .await
        .map_err(|source| GuardError::Redis {
            addr: addr.to_string(),
            source,
        })?;
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
    let redis = |source| GuardError::Redis {
        addr: addr.to_string(),
        source,
    };
    client.call(["MULTI"]).await.map_err(redis)?;
    for command in commands {
        if let Err(source) = client.call(command).await {
            let _ = client.call(["DISCARD"]).await;
            return Err(redis(source));
        }
    }
    let reply = client.call(["EXEC"]).await.map_err(redis)?;
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
