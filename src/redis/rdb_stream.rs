//! Parses an RDB while it arrives: the bridge between the async replication
//! client ([`super::psync`], which yields the payload as
//! [`super::psync::ReplEvent::RdbChunk`]s) and the blocking pull parser
//! [`RdbParser`].
//!
//! What flows in: `Bytes` chunks through an [`RdbFeeder`], then
//! [`RdbFeeder::finish`] (or drop) at the end of the payload. What flows out:
//! the parser's [`RdbEvent`]s, in file order, from [`RdbEvents::next`].
//!
//! ```text
//! feeder ──(bounded: chunk_queue chunks)──▶ ChannelReader: io::Read
//!                                            │  RdbParser on a spawn_blocking thread
//! events ◀──(bounded: event_queue events)───┘
//! ```
//!
//! Memory is bounded by both queues (plus the parser's own bounded chunks):
//! a slow consumer of events stops the parser, which stops taking chunks,
//! which makes [`RdbFeeder::feed`] wait, which stops reading the socket.
//! Feed and consume from different tasks (or `select!` over both): with both
//! queues full, a single task that only feeds would wait forever.
//!
//! The parser thread ends after [`RdbEvent::End`], after its first error, or
//! when [`RdbEvents`] is dropped; a later [`RdbFeeder::feed`] then fails with
//! [`RdbStreamError::ParserStopped`] (the reason comes out of the events).

use std::io::{self, Read};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::rdb::{ParseOptions, RdbError, RdbEvent, RdbParser};

/// Queue sizes of the bridge.
#[derive(Debug, Clone)]
pub struct RdbStreamConfig {
    /// Chunks queued for the parser. Default 16 (1 MiB of 64 KiB chunks).
    pub chunk_queue: usize,
    /// Events queued for the consumer. Default 64.
    pub event_queue: usize,
    pub parse: ParseOptions,
}

impl Default for RdbStreamConfig {
    fn default() -> Self {
        RdbStreamConfig {
            chunk_queue: 16,
            event_queue: 64,
            parse: ParseOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RdbStreamError {
    #[error(transparent)]
    Rdb(#[from] RdbError),
    #[error("the RDB parser stopped taking input (it ended or failed; see its events)")]
    ParserStopped,
    #[error("the RDB parser ended without End or an error: {reason}")]
    ParserGone { reason: String },
}

/// Sends RDB payload bytes to the parser thread.
#[derive(Debug)]
pub struct RdbFeeder {
    chunk_tx: mpsc::Sender<Bytes>,
}

impl RdbFeeder {
    /// Queues `chunk`, waiting while the queue is full.
    pub async fn feed(&self, chunk: Bytes) -> Result<(), RdbStreamError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.chunk_tx
            .send(chunk)
            .await
            .map_err(|_| RdbStreamError::ParserStopped)
    }

    /// Marks the end of the payload: the parser sees end of input.
    pub fn finish(self) {}
}

/// The parser's events.
pub struct RdbEvents {
    event_rx: mpsc::Receiver<Result<RdbEvent, RdbError>>,
    task: Option<JoinHandle<()>>,
    finished: bool,
}

impl RdbEvents {
    /// The next event; `Ok(None)` after [`RdbEvent::End`]. An error ends the
    /// stream too (later calls return `Ok(None)`).
    pub async fn next(&mut self) -> Result<Option<RdbEvent>, RdbStreamError> {
        if self.finished {
            return Ok(None);
        }
        match self.event_rx.recv().await {
            Some(Ok(event)) => {
                self.finished = matches!(event, RdbEvent::End { .. });
                Ok(Some(event))
            }
            Some(Err(e)) => {
                self.finished = true;
                Err(e.into())
            }
            None => {
                self.finished = true;
                let reason = match self.task.take() {
                    Some(task) => match task.await {
                        Ok(()) => "the parser thread returned early".to_string(),
                        Err(e) => format!("the parser thread failed: {e}"),
                    },
                    None => "the parser thread is gone".to_string(),
                };
                Err(RdbStreamError::ParserGone { reason })
            }
        }
    }
}

/// Starts the parser on a blocking thread. Must be called inside a tokio
/// runtime.
pub fn spawn_rdb_parser(cfg: RdbStreamConfig) -> (RdbFeeder, RdbEvents) {
    let (chunk_tx, chunk_rx) = mpsc::channel(cfg.chunk_queue.max(1));
    let (event_tx, event_rx) = mpsc::channel(cfg.event_queue.max(1));
    let opts = cfg.parse;
    let task = tokio::task::spawn_blocking(move || {
        let mut parser = RdbParser::new(ChannelReader::new(chunk_rx), opts);
        loop {
            let (item, last) = match parser.next_event() {
                Ok(Some(event)) => {
                    let last = matches!(event, RdbEvent::End { .. });
                    (Ok(event), last)
                }
                // Only after End, which already ended the loop.
                Ok(None) => return,
                Err(e) => (Err(e), true),
            };
            // A dropped consumer wants nothing more.
            if event_tx.blocking_send(item).is_err() || last {
                return;
            }
        }
    });
    (
        RdbFeeder { chunk_tx },
        RdbEvents {
            event_rx,
            task: Some(task),
            finished: false,
        },
    )
}

/// `std::io::Read` over a channel of chunks; end of input when every sender
/// is gone. Blocks the calling thread: use it on a blocking thread only.
pub struct ChannelReader {
    chunk_rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    pub fn new(chunk_rx: mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader {
            chunk_rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.current.is_empty() {
            match self.chunk_rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_reader_joins_chunks_across_reads() {
        let (tx, rx) = mpsc::channel(2);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<Bytes> = data
            .chunks(777)
            .map(Bytes::copy_from_slice)
            .chain([Bytes::new()])
            .collect();
        let feeder = std::thread::spawn(move || {
            for chunk in chunks {
                tx.blocking_send(chunk).unwrap();
            }
        });
        let mut reader = ChannelReader::new(rx);
        let mut out = Vec::new();
        let mut buf = [0u8; 100];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        feeder.join().unwrap();
        assert_eq!(out, data);
        assert_eq!(reader.read(&mut buf).unwrap(), 0, "end of input stays");
    }

    #[test]
    fn read_exact_past_the_end_is_an_eof_error() {
        let (tx, rx) = mpsc::channel(1);
        tx.blocking_send(Bytes::from_static(b"abc")).unwrap();
        drop(tx);
        let mut reader = ChannelReader::new(rx);
        let mut buf = [0u8; 5];
        let err = reader.read_exact(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
