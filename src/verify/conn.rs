//! One rate-limited connection per side of a verify.
//!
//! In: commands for one server. Out: their replies, or a [`VerifyError`]
//! naming the side, the db, the key and the command. Every command, pipelined
//! or not, first takes a token from the side's [`RateLimiter`].

use bytes::Bytes;

use super::rate::RateLimiter;
use super::report::escape_key;
use super::{Side, VerifyError};
use crate::redis::client::{Client, ClientError};
use crate::redis::command::Command;
use crate::redis::resp::Frame;
use crate::redis::url::RedisUrl;

/// Key probed with `DEBUG DIGEST-VALUE` to learn whether DEBUG is allowed
/// (a missing key digests to zeros; nothing is written).
const DIGEST_PROBE_KEY: &str = "__ferry:verify:digest-probe";

pub(crate) struct Conn {
    pub side: Side,
    client: Client,
    limiter: RateLimiter,
    /// The db the connection has selected.
    pub db: u32,
    /// Whether the server answers `DEBUG DIGEST-VALUE`.
    pub digest: bool,
    /// Commands sent, for the report.
    pub commands: u64,
}

impl Conn {
    pub async fn connect(side: Side, url: &RedisUrl, qps: u32) -> Result<Conn, VerifyError> {
        let client = Client::connect(url)
            .await
            .map_err(|source| VerifyError::Connect {
                side,
                url: url.to_string(),
                source,
            })?;
        let mut conn = Conn {
            side,
            client,
            limiter: RateLimiter::new(qps),
            db: url.db,
            digest: false,
            commands: 0,
        };
        let probe = conn
            .send(&Command::from_parts([
                "DEBUG",
                "DIGEST-VALUE",
                DIGEST_PROBE_KEY,
            ]))
            .await?;
        // Refused when enable-debug-command is off (or DEBUG is renamed):
        // values are then compared by walking them.
        conn.digest = probe.error_message().is_none();
        Ok(conn)
    }

    pub async fn select(&mut self, db: u32) -> Result<(), VerifyError> {
        if self.db != db {
            self.call(
                Command::from_parts(["SELECT".to_string(), db.to_string()]),
                None,
            )
            .await?;
            self.db = db;
        }
        Ok(())
    }

    /// Sends one command; an error reply becomes [`VerifyError::Server`].
    pub async fn call(&mut self, cmd: Command, key: Option<&[u8]>) -> Result<Frame, VerifyError> {
        let reply = self.send(&cmd).await?;
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

    /// Sends one command; error replies come back as frames.
    async fn send(&mut self, cmd: &Command) -> Result<Frame, VerifyError> {
        self.limiter.acquire(1).await;
        self.commands += 1;
        let side = self.side;
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
    pub async fn pipeline(&mut self, cmds: &[Command]) -> Result<Vec<Frame>, VerifyError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        self.limiter.acquire(cmds.len()).await;
        self.commands += cmds.len() as u64;
        let side = self.side;
        self.client
            .pipeline(cmds)
            .await
            .map_err(|source| VerifyError::Link {
                side,
                command: command_name(&cmds[0]),
                source,
            })
    }

    /// `db N` or `db N, key "k"`, for messages.
    pub fn at(&self, key: Option<&[u8]>) -> String {
        match key {
            Some(key) => format!("db {}, key {}", self.db, escape_key(key)),
            None => format!("db {}", self.db),
        }
    }

    /// A malformed or unexpected reply to `command` about `key`.
    pub fn bad_reply(&self, command: &str, key: Option<&[u8]>, reply: &Frame) -> VerifyError {
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
            side: self.side,
            at: self.at(key),
            command: command.to_string(),
            reply: shown,
        }
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

fn command_name(cmd: &Command) -> String {
    String::from_utf8_lossy(cmd.name()).to_uppercase()
}
