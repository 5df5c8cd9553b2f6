//! A small async Redis client over [`super::resp`]: connect, authenticate,
//! select a db, send commands one at a time or pipelined.
//!
//! What flows in: [`Command`]s. What flows out: reply [`Frame`]s, in order.
//! Used for the target side (apply, `rdb load`), for admin look-ups (`INFO`)
//! and for the replication handshake before the connection is handed to
//! [`super::psync`] with [`Client::into_parts`].

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use super::tls::RedisStream;

use super::command::Command;
use super::resp::{encode_command, Frame, RespDecoder, RespError, RespLimits};
use super::url::RedisUrl;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub limits: RespLimits,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            limits: RespLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out connecting to {addr}")]
    ConnectTimeout { addr: String },
    #[error("i/o error talking to redis: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] RespError),
    #[error("redis replied with an error to {command}: {message}")]
    Server { command: String, message: String },
    #[error("redis closed the connection")]
    Closed,
    #[error("unexpected reply to {command}: {reply}")]
    UnexpectedReply { command: String, reply: String },
}

/// One connection to a Redis server.
pub struct Client {
    stream: RedisStream,
    read_buf: BytesMut,
    write_buf: BytesMut,
    decoder: RespDecoder,
    /// Replies owed for commands queued or sent and not yet read.
    pending: usize,
}

impl Client {
    /// Connects with default options, then AUTHs and SELECTs as `url` says.
    pub async fn connect(url: &RedisUrl) -> Result<Client, ClientError> {
        Client::connect_with(url, &ClientOptions::default()).await
    }

    pub async fn connect_with(url: &RedisUrl, opts: &ClientOptions) -> Result<Client, ClientError> {
        let stream = match super::tls::connect(url, opts.connect_timeout).await {
            Ok(stream) => stream,
            Err(super::tls::ConnectError::Timeout { addr }) => {
                return Err(ClientError::ConnectTimeout { addr })
            }
            Err(error) => {
                return Err(ClientError::Connect {
                    addr: url.addr(),
                    source: error.into_io(),
                })
            }
        };
        let mut client = Client {
            stream,
            read_buf: BytesMut::with_capacity(16 * 1024),
            write_buf: BytesMut::with_capacity(16 * 1024),
            decoder: RespDecoder::new(opts.limits),
            pending: 0,
        };
        if let Some(password) = &url.password {
            match &url.user {
                Some(user) => {
                    client
                        .call(["AUTH", user.as_str(), password.as_str()])
                        .await?
                }
                None => client.call(["AUTH", password.as_str()]).await?,
            };
        }
        if url.db != 0 {
            client
                .call(["SELECT".to_string(), url.db.to_string()])
                .await?;
        }
        Ok(client)
    }

    /// Sends one command and waits for its reply; an error reply is
    /// [`ClientError::Server`].
    pub async fn call<I, T>(&mut self, args: I) -> Result<Frame, ClientError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        let cmd = Command::from_parts(args);
        self.call_command(&cmd).await
    }

    pub async fn call_command(&mut self, cmd: &Command) -> Result<Frame, ClientError> {
        self.queue(cmd);
        self.flush().await?;
        let reply = self.read_reply().await?;
        match reply.error_message() {
            Some(message) => Err(ClientError::Server {
                command: command_name(cmd),
                message,
            }),
            None => Ok(reply),
        }
    }

    /// Buffers a command; it is sent by the next [`Client::flush`].
    pub fn queue(&mut self, cmd: &Command) {
        encode_command(&cmd.args, &mut self.write_buf);
        self.pending += 1;
    }

    /// Buffers raw bytes of a command the caller encodes itself (one whose
    /// big arguments it streams with [`Client::write_through`]); it counts
    /// its reply with [`Client::expect_reply`].
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.write_buf.extend_from_slice(bytes);
    }

    /// Counts one more reply owed, for a command sent with
    /// [`Client::queue_raw`].
    pub fn expect_reply(&mut self) {
        self.pending += 1;
    }

    /// Sends what is buffered, then `bytes` straight from the caller's
    /// buffer (a piece of a streamed argument: never copied into ours).
    pub async fn write_through(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.flush().await?;
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Bytes queued and not yet flushed.
    pub fn queued_bytes(&self) -> usize {
        self.write_buf.len()
    }

    /// Replies owed for commands sent or queued.
    pub fn pending_replies(&self) -> usize {
        self.pending
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.write_buf.is_empty() {
            self.stream.write_all(&self.write_buf).await?;
            self.stream.flush().await?;
            self.write_buf.clear();
        }
        Ok(())
    }

    /// Reads the next reply; error replies come back as frames, not errors.
    pub async fn read_reply(&mut self) -> Result<Frame, ClientError> {
        let frame = self.read_frame().await?;
        self.pending = self.pending.saturating_sub(1);
        Ok(frame)
    }

    /// The next reply if it is already buffered whole, without reading:
    /// `Ok(None)` when a read is needed. Replies to a pipeline mostly arrive
    /// together, and a caller that bounds each read with a timer needs one
    /// only when this says a read is needed.
    pub fn buffered_reply(&mut self) -> Result<Option<Frame>, ClientError> {
        let Some((frame, _)) = self.decoder.decode_frame(&mut self.read_buf)? else {
            return Ok(None);
        };
        self.pending = self.pending.saturating_sub(1);
        Ok(Some(frame))
    }

    /// Reads the next frame without counting it as a reply (push messages,
    /// or a stream the server writes on its own).
    pub async fn read_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some((frame, _)) = self.decoder.decode_frame(&mut self.read_buf)? {
                return Ok(frame);
            }
            self.read_buf.reserve(16 * 1024);
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Sends all commands in one write and reads all their replies.
    pub async fn pipeline(&mut self, cmds: &[Command]) -> Result<Vec<Frame>, ClientError> {
        for cmd in cmds {
            self.queue(cmd);
        }
        self.flush().await?;
        let mut replies = Vec::with_capacity(cmds.len());
        for _ in cmds {
            replies.push(self.read_reply().await?);
        }
        Ok(replies)
    }

    /// `INFO [section]` as a map of `field -> value`.
    pub async fn info(&mut self, section: &str) -> Result<HashMap<String, String>, ClientError> {
        let reply = self.call(["INFO", section]).await?;
        let text = reply
            .as_bytes()
            .ok_or_else(|| ClientError::UnexpectedReply {
                command: "INFO".into(),
                reply: format!("{reply:?}"),
            })?;
        Ok(parse_info(&String::from_utf8_lossy(text)))
    }

    /// Splits the connection for one long pipeline whose writes and reply
    /// reads run at the same time (a bulk load): the caller writes encoded
    /// commands on the [`WriteHalf`] and reads their replies with the
    /// [`ReplyReader`]. Nothing may be queued or owed when it is called;
    /// the split bypasses [`Client::queue`], so the caller must read every
    /// reply it caused before using the client again.
    pub fn split_pipeline(&mut self, idle_timeout: Duration) -> (WriteHalf<'_>, ReplyReader<'_>) {
        debug_assert!(self.write_buf.is_empty() && self.pending == 0);
        let (read, write) = tokio::io::split(&mut self.stream);
        let reader = ReplyReader {
            read,
            read_buf: &mut self.read_buf,
            decoder: &mut self.decoder,
            idle_timeout,
        };
        (write, reader)
    }

    /// The socket, the bytes read past the last decoded frame, and the decoder
    /// (whose `consumed()` counts every byte decoded so far).
    pub fn into_parts(self) -> (RedisStream, BytesMut, RespDecoder) {
        (self.stream, self.read_buf, self.decoder)
    }
}

/// Reads replies from the read half of a [`Client::split_pipeline`].
/// The write half of a [`Client::split_pipeline`].
pub type WriteHalf<'a> = tokio::io::WriteHalf<&'a mut RedisStream>;
type ReadHalf<'a> = tokio::io::ReadHalf<&'a mut RedisStream>;

pub struct ReplyReader<'a> {
    read: ReadHalf<'a>,
    read_buf: &'a mut BytesMut,
    decoder: &'a mut RespDecoder,
    /// Longest wait for any byte while a reply is owed.
    idle_timeout: Duration,
}

impl ReplyReader<'_> {
    /// The next reply; `None` when it is `+OK`, the reply of nearly every
    /// command of a bulk load, which is then skipped without building a
    /// frame. Waiting longer than the idle timeout for the next bytes is an
    /// [`std::io::ErrorKind::TimedOut`] error.
    pub async fn next_unless_ok(&mut self) -> Result<Option<Frame>, ClientError> {
        const OK: &[u8] = b"+OK\r\n";
        loop {
            if self.read_buf.starts_with(OK) {
                self.read_buf.advance(OK.len());
                self.decoder.skip(OK.len() as u64);
                return Ok(None);
            }
            // A buffer shorter than `+OK\r\n` that could still become one.
            let maybe_ok = self.read_buf.len() < OK.len() && OK.starts_with(self.read_buf);
            if !maybe_ok {
                if let Some((frame, _)) = self.decoder.decode_frame(self.read_buf)? {
                    return Ok(Some(frame));
                }
            }
            self.read_buf.reserve(64 * 1024);
            let read = tokio::time::timeout(self.idle_timeout, self.read.read_buf(self.read_buf));
            match read.await {
                Ok(Ok(0)) => return Err(ClientError::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(error.into()),
                Err(_) => {
                    return Err(ClientError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no reply within {:?}", self.idle_timeout),
                    )))
                }
            }
        }
    }
}

/// Parses `INFO` text (`field:value` lines, `#` section headers).
pub fn parse_info(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn command_name(cmd: &Command) -> String {
    String::from_utf8_lossy(cmd.name()).to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client connected to a local socket whose other end writes
    /// `pieces` one after the other, with a pause between them.
    async fn client_fed_with(pieces: Vec<&'static [u8]>) -> Client {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            for piece in pieces {
                socket.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Hold the connection open: the reader must time out, not see EOF.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let url = RedisUrl::parse(&format!("redis://127.0.0.1:{port}")).unwrap();
        Client::connect(&url).await.unwrap()
    }

    #[tokio::test]
    async fn reply_reader_skips_ok_and_decodes_the_rest_across_reads() {
        let pieces: Vec<&'static [u8]> = vec![b"+OK\r\n:5\r\n+O", b"K\r\n-ERR no\r\n+OKAY\r\n"];
        let mut client = client_fed_with(pieces).await;
        let (_write, mut replies) = client.split_pipeline(Duration::from_millis(300));
        assert_eq!(replies.next_unless_ok().await.unwrap(), None);
        assert_eq!(
            replies.next_unless_ok().await.unwrap(),
            Some(Frame::Integer(5))
        );
        assert_eq!(replies.next_unless_ok().await.unwrap(), None);
        let error = replies.next_unless_ok().await.unwrap();
        assert_eq!(
            error.and_then(|f| f.error_message()).as_deref(),
            Some("ERR no")
        );
        let okay = replies.next_unless_ok().await.unwrap();
        assert_eq!(
            okay,
            Some(Frame::Simple(bytes::Bytes::from_static(b"OKAY")))
        );
        match replies.next_unless_ok().await {
            Err(ClientError::Io(error)) => assert_eq!(error.kind(), std::io::ErrorKind::TimedOut),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn buffered_replies_are_taken_without_a_read() {
        let mut client = client_fed_with(vec![b"+QUEUED\r\n+QUEUED\r\n*2\r\n:1"]).await;
        client.pending = 3;
        assert_eq!(client.buffered_reply().unwrap(), None);
        let queued = Frame::Simple(bytes::Bytes::from_static(b"QUEUED"));
        assert_eq!(client.read_reply().await.unwrap(), queued);
        assert_eq!(client.buffered_reply().unwrap(), Some(queued));
        // Half an EXEC reply: a read is needed, and nothing was taken.
        assert_eq!(client.buffered_reply().unwrap(), None);
        assert_eq!(client.pending_replies(), 1);
    }

    #[test]
    fn parses_info_text() {
        let info = parse_info("# Replication\r\nrole:master\r\nmaster_repl_offset:42\r\n\r\n");
        assert_eq!(info.get("role").map(String::as_str), Some("master"));
        assert_eq!(
            info.get("master_repl_offset").map(String::as_str),
            Some("42")
        );
    }
}
