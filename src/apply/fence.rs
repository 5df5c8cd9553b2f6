//! The fence against late batches of abandoned connections: every applier
//! connection names itself, and a new session closes every other
//! connection of the same name before it reads the checkpoint.
//!
//! In: a fresh [`Target`] connection. Out: [`Fence::Closed`] (how many
//! earlier connections the target closed), or [`Fence::Unavailable`] when
//! the target user may not use `CLIENT` (the session goes on, guarded by
//! `WATCH` alone; the module doc of [`super`] says what that leaves open).
//!
//! The name is `ferry-apply:<drainer-id>:<partition>` (drainer ids are
//! `[A-Za-z0-9._-]`, so it has no space, which `CLIENT SETNAME` refuses).
//! The steps, each one command:
//!
//! ```text
//! CLIENT SETNAME ferry-apply:<drainer-id>:<partition>
//! CLIENT ID                    -> our own id
//! CLIENT LIST                  -> id=.. name=.. per line
//! CLIENT KILL ID <id>          for every other client with our name
//! ```
//!
//! A connection only sends a batch after the reply to its `SETNAME` came
//! back, so a connection that has a batch in flight is named at the
//! target. Two appliers running for the same drainer id and partition (a
//! misconfiguration: they would share one checkpoint) close each other's
//! connections and keep retrying.

use super::target::Target;
use super::ApplyError;
use crate::position::PartitionId;
use crate::redis::client::ClientError;

/// The name every connection of one applier gives itself.
pub(crate) fn client_name(drainer_id: &str, partition: PartitionId) -> String {
    format!("ferry-apply:{drainer_id}:{partition}")
}

/// What the fence did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fence {
    /// The target closed this many earlier connections of this applier.
    Closed(u64),
    /// The target does not let this user name, list or close clients; why.
    Unavailable(String),
}

/// True for refusals that say the target will not let us use `CLIENT` at
/// all (ACL, a renamed or missing command), as opposed to a passing state
/// (`LOADING`, `BUSY`) that a retry gets past.
fn is_not_allowed(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    message.starts_with("NOPERM")
        || lower.contains("unknown command")
        || lower.contains("unknown subcommand")
}

/// Names the connection and closes the earlier connections of the same
/// name. Errors other than "not allowed" end the session (retried).
pub(crate) async fn fence(target: &mut Target, name: &str) -> Result<Fence, ApplyError> {
    let steps: Result<Fence, ApplyError> = async {
        target.call(&["CLIENT", "SETNAME", name]).await?;
        let own = target
            .call(&["CLIENT", "ID"])
            .await?
            .as_integer()
            .ok_or_else(|| unexpected("CLIENT ID", "not an integer"))?;
        let list = target.call(&["CLIENT", "LIST"]).await?;
        let text = list
            .as_bytes()
            .map(|bytes| String::from_utf8_lossy(bytes))
            .ok_or_else(|| unexpected("CLIENT LIST", "not a string"))?;
        let mut closed = 0;
        for id in same_name(&text, name) {
            if id == own as u64 {
                continue;
            }
            let id = id.to_string();
            let killed = target.call(&["CLIENT", "KILL", "ID", &id]).await?;
            closed += killed.as_integer().unwrap_or(0).max(0) as u64;
        }
        Ok(Fence::Closed(closed))
    }
    .await;
    match steps {
        Err(ApplyError::Client(ClientError::Server { command, message }))
            if is_not_allowed(&message) =>
        {
            Ok(Fence::Unavailable(format!("{command} refused: {message}")))
        }
        other => other,
    }
}

fn unexpected(command: &str, reply: &str) -> ApplyError {
    ApplyError::Client(ClientError::UnexpectedReply {
        command: command.to_string(),
        reply: reply.to_string(),
    })
}

/// The ids of the clients named `name` in a `CLIENT LIST` reply (one
/// client per line, `key=value` fields separated by spaces; a name never
/// holds a space).
fn same_name(list: &str, name: &str) -> Vec<u64> {
    list.lines()
        .filter_map(|line| {
            let mut id = None;
            let mut named = false;
            for field in line.split(' ') {
                if let Some(value) = field.strip_prefix("id=") {
                    id = value.parse::<u64>().ok();
                } else if let Some(value) = field.strip_prefix("name=") {
                    named = value == name;
                }
            }
            id.filter(|_| named)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_clients_by_exact_name() {
        let list = "\
id=3 addr=127.0.0.1:50000 laddr=127.0.0.1:6379 fd=8 name=ferry-apply:d:0 age=9 cmd=exec\r
id=4 addr=127.0.0.1:50002 laddr=127.0.0.1:6379 fd=9 name=ferry-apply:d:01 age=1 cmd=get\r
id=7 addr=127.0.0.1:50004 laddr=127.0.0.1:6379 fd=10 name= age=1 cmd=client|list\r
id=9 addr=127.0.0.1:50006 laddr=127.0.0.1:6379 fd=11 name=ferry-apply:d:0 age=0 cmd=client|id\r
";
        assert_eq!(same_name(list, "ferry-apply:d:0"), [3, 9]);
        assert_eq!(same_name(list, "ferry-apply:d:1"), Vec::<u64>::new());
        assert_eq!(
            same_name("garbage\nid=x name=ferry-apply:d:0", "ferry-apply:d:0"),
            Vec::<u64>::new()
        );
        assert_eq!(
            client_name("blue.1", PartitionId(3)),
            "ferry-apply:blue.1:3"
        );
    }

    #[test]
    fn tells_refusals_that_do_not_pass() {
        assert!(is_not_allowed(
            "NOPERM this user has no permissions to run the 'client|list' command"
        ));
        assert!(is_not_allowed(
            "ERR unknown command 'CLIENT', with args beginning with: "
        ));
        assert!(is_not_allowed(
            "ERR unknown subcommand 'kill'. Try CLIENT HELP."
        ));
        assert!(!is_not_allowed(
            "LOADING Redis is loading the dataset in memory"
        ));
        assert!(!is_not_allowed("BUSY Redis is busy running a script."));
    }
}
