//! Test support: a small blocking RESP client for the threads of the fault
//! and crash tests (the load, the sampler, comparisons), which pipeline
//! thousands of commands: `redis-cli` per command would be far too slow, and
//! a thread of its own keeps them off the test's runtime.
//!
//! In: RESP2 replies from a real redis-server. Out: [`Resp`] values. Bulk
//! strings over 64 MiB and arrays over 1M items are refused as
//! `InvalidData` before anything is allocated for them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    pub fn int(&self) -> i64 {
        match self {
            Resp::Int(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    /// A bulk or simple string as text (`None` for a nil bulk).
    pub fn text(&self) -> Option<String> {
        match self {
            Resp::Bulk(Some(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
            Resp::Simple(text) => Some(text.clone()),
            Resp::Bulk(None) => None,
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(Some(items)) => items,
            other => panic!("expected an array reply, got {other:?}"),
        }
    }
}

pub struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    out: Vec<u8>,
    queued: usize,
}

impl Conn {
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<Conn> {
        let socket = addr
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
        let stream = TcpStream::connect_timeout(&socket, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            out: Vec::new(),
            queued: 0,
        })
    }

    pub fn queue<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            let arg = arg.as_ref();
            self.out
                .extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            self.out.extend_from_slice(arg);
            self.out.extend_from_slice(b"\r\n");
        }
        self.queued += 1;
    }

    /// Sends what was queued and reads one reply per queued command.
    pub fn replies(&mut self) -> std::io::Result<Vec<Resp>> {
        self.writer.write_all(&self.out)?;
        self.out.clear();
        let count = std::mem::take(&mut self.queued);
        (0..count).map(|_| self.read()).collect()
    }

    pub fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> std::io::Result<Resp> {
        self.queue(args);
        Ok(self.replies()?.remove(0))
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches("\r\n").to_string())
    }

    fn read(&mut self) -> std::io::Result<Resp> {
        let line = self.line()?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, line.clone());
        let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        let number = || rest.parse::<i64>().map_err(|_| bad());
        Ok(match kind {
            "+" => Resp::Simple(rest.to_string()),
            "-" => Resp::Error(rest.to_string()),
            ":" => Resp::Int(number()?),
            "$" => match number()? {
                -1 => Resp::Bulk(None),
                len if (0..=(64 << 20)).contains(&len) => {
                    let mut data = vec![0; len as usize + 2];
                    self.reader.read_exact(&mut data)?;
                    data.truncate(len as usize);
                    Resp::Bulk(Some(data))
                }
                _ => return Err(bad()),
            },
            "*" => match number()? {
                -1 => Resp::Array(None),
                len if (0..=(1 << 20)).contains(&len) => {
                    let mut items = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        items.push(self.read()?);
                    }
                    Resp::Array(Some(items))
                }
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        })
    }
}

/// A connection that must open (30 s timeouts).
pub fn connect(addr: &str) -> Conn {
    Conn::connect(addr, Duration::from_secs(30)).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// An integer string value (0 for a missing key).
pub fn get_int(conn: &mut Conn, key: &str) -> i64 {
    conn.call(&["GET", key])
        .expect("GET")
        .text()
        .map_or(0, |text| text.parse().expect("an integer value"))
}
