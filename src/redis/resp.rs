//! RESP2/RESP3 frames: an incremental decoder, an encoder and a tokio codec.
//!
//! What flows in: bytes from a socket, split at any byte. What flows out:
//! whole [`Frame`]s together with their exact length on the wire (replication
//! offsets are counted in those bytes).
//!
//! Decoding is two passes over the buffered bytes: a cheap scan that decides
//! whether a whole frame is there (and checks every length against
//! [`RespLimits`] before anything is allocated), then a build pass that
//! slices bulk strings out of the frozen buffer without copying.
//!
//! Inline commands are not accepted: ferry only ever reads from servers,
//! which always answer in RESP.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::command::Command;

/// One RESP value. RESP2 null bulk strings and null arrays, and the RESP3
/// null, are all [`Frame::Null`].
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Simple(Bytes),
    Error(Bytes),
    Integer(i64),
    Bulk(Bytes),
    Null,
    Array(Vec<Frame>),
    // RESP3 only.
    Double(f64),
    Boolean(bool),
    BigNumber(Bytes),
    BulkError(Bytes),
    Verbatim { format: [u8; 3], text: Bytes },
    Map(Vec<(Frame, Frame)>),
    Set(Vec<Frame>),
    Attribute(Vec<(Frame, Frame)>),
    Push(Vec<Frame>),
}

impl Frame {
    /// A bulk-string frame.
    pub fn bulk(data: impl Into<Bytes>) -> Frame {
        Frame::Bulk(data.into())
    }

    /// The bytes of a simple string, bulk string or verbatim string.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Frame::Simple(b) | Frame::Bulk(b) => Some(b),
            Frame::Verbatim { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The integer of an integer frame, or of a string frame holding one.
    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Frame::Integer(i) => Some(*i),
            other => other
                .as_bytes()
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.parse().ok()),
        }
    }

    /// The message of an error reply (`-ERR ...` or RESP3 `!`).
    pub fn error_message(&self) -> Option<String> {
        match self {
            Frame::Error(b) | Frame::BulkError(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// Appends the RESP encoding of this frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Frame::Simple(s) => put_line(dst, b'+', s),
            Frame::Error(s) => put_line(dst, b'-', s),
            Frame::Integer(i) => put_int(dst, b':', *i),
            Frame::Bulk(b) => put_bulk(dst, b'$', b),
            Frame::Null => dst.put_slice(b"$-1\r\n"),
            Frame::Array(items) => {
                put_len(dst, b'*', items.len());
                items.iter().for_each(|f| f.encode(dst));
            }
            Frame::Double(d) => {
                let text = if d.is_infinite() {
                    if *d > 0.0 {
                        "inf".to_string()
                    } else {
                        "-inf".to_string()
                    }
                } else if d.is_nan() {
                    "nan".to_string()
                } else {
                    format!("{d}")
                };
                put_line(dst, b',', text.as_bytes());
            }
            Frame::Boolean(b) => dst.put_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            Frame::BigNumber(n) => put_line(dst, b'(', n),
            Frame::BulkError(b) => put_bulk(dst, b'!', b),
            Frame::Verbatim { format, text } => {
                put_len(dst, b'=', text.len() + 4);
                dst.put_slice(format);
                dst.put_u8(b':');
                dst.put_slice(text);
                dst.put_slice(b"\r\n");
            }
            Frame::Map(pairs) | Frame::Attribute(pairs) => {
                let tag = if matches!(self, Frame::Map(_)) {
                    b'%'
                } else {
                    b'|'
                };
                put_len(dst, tag, pairs.len());
                for (k, v) in pairs {
                    k.encode(dst);
                    v.encode(dst);
                }
            }
            Frame::Set(items) | Frame::Push(items) => {
                let tag = if matches!(self, Frame::Set(_)) {
                    b'~'
                } else {
                    b'>'
                };
                put_len(dst, tag, items.len());
                items.iter().for_each(|f| f.encode(dst));
            }
        }
    }
}

fn put_line(dst: &mut BytesMut, tag: u8, line: &[u8]) {
    dst.reserve(line.len() + 3);
    dst.put_u8(tag);
    dst.put_slice(line);
    dst.put_slice(b"\r\n");
}

fn put_int(dst: &mut BytesMut, tag: u8, i: i64) {
    // The whole line in one copy: the tag, a sign, at most 19 digits, CRLF.
    let mut line = [0u8; 24];
    line[22..].copy_from_slice(b"\r\n");
    let mut pos = 22;
    let mut n = i.unsigned_abs();
    loop {
        pos -= 1;
        line[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if i < 0 {
        pos -= 1;
        line[pos] = b'-';
    }
    pos -= 1;
    line[pos] = tag;
    dst.put_slice(&line[pos..]);
}

fn put_len(dst: &mut BytesMut, tag: u8, len: usize) {
    put_int(dst, tag, len as i64);
}

fn put_bulk(dst: &mut BytesMut, tag: u8, data: &[u8]) {
    // The header (a tag, at most 20 digits, CRLF) and the data at once.
    dst.reserve(data.len() + 25);
    put_len(dst, tag, data.len());
    dst.put_slice(data);
    dst.put_slice(b"\r\n");
}

/// Appends a command as a RESP array of bulk strings.
pub fn encode_command<T: AsRef<[u8]>>(args: &[T], dst: &mut BytesMut) {
    // Room for every header at its longest: one reservation per command.
    let data: usize = args.iter().map(|arg| arg.as_ref().len()).sum();
    dst.reserve(data.saturating_add((args.len() + 1).saturating_mul(25)));
    put_len(dst, b'*', args.len());
    for arg in args {
        put_bulk(dst, b'$', arg.as_ref());
    }
}

/// The start of a command of `args` arguments (`*<args>\r\n`), for a
/// command encoded piece by piece (one whose big arguments are streamed).
pub fn encode_array_header(args: usize, dst: &mut BytesMut) {
    put_len(dst, b'*', args);
}

/// An argument encoded whole (`$<len>\r\n<data>\r\n`).
pub fn encode_bulk(data: &[u8], dst: &mut BytesMut) {
    put_bulk(dst, b'$', data);
}

/// The header of an argument of `len` bytes whose bytes, then `\r\n`,
/// the caller writes itself.
pub fn encode_bulk_header(len: u64, dst: &mut BytesMut) {
    put_int(dst, b'$', i64::try_from(len).unwrap_or(i64::MAX));
}

/// Wire length of a command encoded by [`encode_command`].
pub fn encoded_command_len<T: AsRef<[u8]>>(args: &[T]) -> usize {
    fn digits(mut n: usize) -> usize {
        let mut d = 1;
        while n >= 10 {
            n /= 10;
            d += 1;
        }
        d
    }
    let mut len = 3 + digits(args.len());
    for arg in args {
        let n = arg.as_ref().len();
        len += 3 + digits(n) + n + 2;
    }
    len
}

/// Bounds on what the decoder accepts; beyond them it fails with
/// [`RespError::TooLarge`] / [`RespError::TooDeep`] instead of allocating.
#[derive(Debug, Clone, Copy)]
pub struct RespLimits {
    /// Longest bulk string (Redis's own `proto-max-bulk-len` default is 512 MiB).
    pub max_bulk_len: usize,
    /// Most elements in one aggregate (array, map, set, push).
    pub max_aggregate_len: usize,
    /// Deepest nesting of aggregates.
    pub max_depth: usize,
    /// Longest simple line (`+`, `-`, `:`, `,`, `(`, and length headers).
    pub max_line_len: usize,
}

impl Default for RespLimits {
    fn default() -> Self {
        RespLimits {
            max_bulk_len: 512 * 1024 * 1024,
            max_aggregate_len: 64 * 1024 * 1024,
            max_depth: 32,
            max_line_len: 64 * 1024,
        }
    }
}

/// A decode failure, with the offset (from the start of the stream the
/// decoder has seen) where the bad input starts.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    #[error("invalid RESP at byte {offset}: {what}")]
    Invalid { offset: u64, what: String },
    #[error("RESP {what} of length {len} at byte {offset} exceeds the limit of {limit}")]
    TooLarge {
        offset: u64,
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("RESP nesting deeper than {limit} at byte {offset}")]
    TooDeep { offset: u64, limit: usize },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Internal scan result: the frame is not all there yet, or is bad.
enum ScanError {
    Incomplete,
    Bad(RespError),
}

type ScanResult<T> = Result<T, ScanError>;

/// Incremental RESP decoder. Keeps the count of bytes consumed so that errors
/// name absolute stream offsets.
#[derive(Debug, Clone, Default)]
pub struct RespDecoder {
    limits: RespLimits,
    consumed: u64,
}

impl RespDecoder {
    pub fn new(limits: RespLimits) -> RespDecoder {
        RespDecoder {
            limits,
            consumed: 0,
        }
    }

    /// Bytes consumed by decoded frames (and by [`RespDecoder::skip`]) so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Accounts for `n` bytes the caller consumed from the stream itself
    /// (e.g. an RDB payload read raw between frames).
    pub fn skip(&mut self, n: u64) {
        self.consumed += n;
    }

    /// Decodes one frame from the front of `buf`, removing its bytes.
    /// Returns the frame and its length on the wire, or `None` when `buf`
    /// does not yet hold a whole frame (nothing is removed then).
    pub fn decode_frame(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<(Frame, usize)>, RespError> {
        let len = match scan(buf, 0, 0, &self.limits, self.consumed) {
            Ok(end) => end,
            Err(ScanError::Incomplete) => return Ok(None),
            Err(ScanError::Bad(e)) => return Err(e),
        };
        let bytes = buf.split_to(len).freeze();
        let (frame, end) = build(&bytes, 0);
        debug_assert_eq!(end, len);
        self.consumed += len as u64;
        Ok(Some((frame, len)))
    }
}

fn bad(offset: u64, what: impl Into<String>) -> ScanError {
    ScanError::Bad(RespError::Invalid {
        offset,
        what: what.into(),
    })
}

/// Finds the CRLF-terminated line starting at `pos`; returns (line end, next pos).
fn scan_line(buf: &[u8], pos: usize, limits: &RespLimits, base: u64) -> ScanResult<(usize, usize)> {
    let window_end = buf.len().min(pos.saturating_add(limits.max_line_len + 2));
    match buf[pos..window_end].iter().position(|&b| b == b'\r') {
        Some(i) => {
            let cr = pos + i;
            if cr + 1 >= buf.len() {
                return Err(ScanError::Incomplete);
            }
            if buf[cr + 1] != b'\n' {
                return Err(bad(base + cr as u64 + 1, "expected LF after CR"));
            }
            Ok((cr, cr + 2))
        }
        None if window_end - pos > limits.max_line_len => {
            Err(ScanError::Bad(RespError::TooLarge {
                offset: base + pos as u64,
                what: "line",
                len: (window_end - pos) as u64,
                limit: limits.max_line_len as u64,
            }))
        }
        None => Err(ScanError::Incomplete),
    }
}

/// An integer as `str::parse::<i64>` reads one (an optional sign, then
/// ASCII digits), without its UTF-8 check: every length header of the
/// replication stream goes through here.
fn parse_i64(text: &[u8]) -> Option<i64> {
    if text.is_empty() || text.len() > 20 {
        return None;
    }
    let (negative, digits) = match text[0] {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    // Accumulated negative: i64::MIN has no positive counterpart.
    let mut value: i64 = 0;
    for &byte in digits {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_sub(i64::from(digit))?;
    }
    if negative {
        Some(value)
    } else {
        value.checked_neg()
    }
}

/// Reads a length header (`-1` allowed for nulls); checks it against `limit`.
fn scan_len(
    buf: &[u8],
    pos: usize,
    limits: &RespLimits,
    base: u64,
    limit: usize,
    what: &'static str,
) -> ScanResult<(Option<usize>, usize)> {
    let (line_end, next) = scan_line(buf, pos, limits, base)?;
    let text = &buf[pos..line_end];
    let n = parse_i64(text).ok_or_else(|| {
        bad(
            base + pos as u64,
            format!("bad {what} length {:?}", String::from_utf8_lossy(text)),
        )
    })?;
    if n == -1 {
        return Ok((None, next));
    }
    if n < 0 {
        return Err(bad(
            base + pos as u64,
            format!("negative {what} length {n}"),
        ));
    }
    if n as u64 > limit as u64 {
        return Err(ScanError::Bad(RespError::TooLarge {
            offset: base + pos as u64,
            what,
            len: n as u64,
            limit: limit as u64,
        }));
    }
    Ok((Some(n as usize), next))
}

/// Checks that a whole frame starts at `pos`; returns the position after it.
fn scan(buf: &[u8], pos: usize, depth: usize, limits: &RespLimits, base: u64) -> ScanResult<usize> {
    if pos >= buf.len() {
        return Err(ScanError::Incomplete);
    }
    let tag = buf[pos];
    let body = pos + 1;
    match tag {
        b'+' | b'-' | b'(' => Ok(scan_line(buf, body, limits, base)?.1),
        b':' => {
            let (end, next) = scan_line(buf, body, limits, base)?;
            parse_i64(&buf[body..end]).ok_or_else(|| bad(base + body as u64, "bad integer"))?;
            Ok(next)
        }
        b',' => {
            let (end, next) = scan_line(buf, body, limits, base)?;
            parse_double(&buf[body..end]).ok_or_else(|| bad(base + body as u64, "bad double"))?;
            Ok(next)
        }
        b'#' => {
            let (end, next) = scan_line(buf, body, limits, base)?;
            match &buf[body..end] {
                b"t" | b"f" => Ok(next),
                _ => Err(bad(base + body as u64, "bad boolean")),
            }
        }
        b'_' => {
            let (end, next) = scan_line(buf, body, limits, base)?;
            if end != body {
                return Err(bad(base + body as u64, "null with a payload"));
            }
            Ok(next)
        }
        b'$' | b'!' | b'=' => {
            let (len, next) =
                scan_len(buf, body, limits, base, limits.max_bulk_len, "bulk string")?;
            let Some(len) = len else {
                if tag != b'$' {
                    return Err(bad(base + body as u64, "null length on a non-bulk string"));
                }
                return Ok(next);
            };
            if tag == b'=' && len < 4 {
                return Err(bad(
                    base + body as u64,
                    "verbatim string shorter than its format",
                ));
            }
            let end = next + len;
            if buf.len() < end + 2 {
                return Err(ScanError::Incomplete);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(bad(base + end as u64, "bulk string not followed by CRLF"));
            }
            if tag == b'=' && buf[next + 3] != b':' {
                return Err(bad(
                    base + next as u64 + 3,
                    "verbatim string format not followed by ':'",
                ));
            }
            Ok(end + 2)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            if depth >= limits.max_depth {
                return Err(ScanError::Bad(RespError::TooDeep {
                    offset: base + pos as u64,
                    limit: limits.max_depth,
                }));
            }
            let (len, mut next) = scan_len(
                buf,
                body,
                limits,
                base,
                limits.max_aggregate_len,
                "aggregate",
            )?;
            let Some(len) = len else {
                if tag != b'*' {
                    return Err(bad(
                        base + body as u64,
                        "null length on a non-array aggregate",
                    ));
                }
                return Ok(next);
            };
            let items = if matches!(tag, b'%' | b'|') {
                len.saturating_mul(2)
            } else {
                len
            };
            for _ in 0..items {
                next = scan(buf, next, depth + 1, limits, base)?;
            }
            Ok(next)
        }
        other => Err(bad(
            base + pos as u64,
            format!("unknown frame type byte 0x{other:02x}"),
        )),
    }
}

fn parse_double(text: &[u8]) -> Option<f64> {
    match text {
        b"inf" | b"+inf" => Some(f64::INFINITY),
        b"-inf" => Some(f64::NEG_INFINITY),
        b"nan" => Some(f64::NAN),
        _ => std::str::from_utf8(text).ok()?.parse().ok(),
    }
}

/// Builds the frame at `pos` of a buffer that [`scan`] accepted.
fn build(bytes: &Bytes, pos: usize) -> (Frame, usize) {
    let buf = &bytes[..];
    let line = |start: usize| -> (usize, usize) {
        let cr = start + buf[start..].iter().position(|&b| b == b'\r').unwrap_or(0);
        (cr, cr + 2)
    };
    let tag = buf[pos];
    let body = pos + 1;
    match tag {
        b'+' | b'-' | b'(' => {
            let (end, next) = line(body);
            let text = bytes.slice(body..end);
            let frame = match tag {
                b'+' => Frame::Simple(text),
                b'-' => Frame::Error(text),
                _ => Frame::BigNumber(text),
            };
            (frame, next)
        }
        b':' => {
            let (end, next) = line(body);
            (
                Frame::Integer(parse_i64(&buf[body..end]).unwrap_or(0)),
                next,
            )
        }
        b',' => {
            let (end, next) = line(body);
            (
                Frame::Double(parse_double(&buf[body..end]).unwrap_or(f64::NAN)),
                next,
            )
        }
        b'#' => {
            let (_, next) = line(body);
            (Frame::Boolean(buf[body] == b't'), next)
        }
        b'_' => (Frame::Null, line(body).1),
        b'$' | b'!' | b'=' => {
            let (end, next) = line(body);
            let n = parse_i64(&buf[body..end]).unwrap_or(-1);
            if n < 0 {
                return (Frame::Null, next);
            }
            let data_end = next + n as usize;
            let frame = match tag {
                b'$' => Frame::Bulk(bytes.slice(next..data_end)),
                b'!' => Frame::BulkError(bytes.slice(next..data_end)),
                _ => {
                    let mut format = [0u8; 3];
                    format.copy_from_slice(&buf[next..next + 3]);
                    Frame::Verbatim {
                        format,
                        text: bytes.slice(next + 4..data_end),
                    }
                }
            };
            (frame, data_end + 2)
        }
        _ => {
            // Aggregates; scan() already rejected everything else.
            let (end, mut next) = line(body);
            let n = parse_i64(&buf[body..end]).unwrap_or(-1);
            if n < 0 {
                return (Frame::Null, next);
            }
            let n = n as usize;
            if matches!(tag, b'%' | b'|') {
                let mut pairs = Vec::with_capacity(n);
                for _ in 0..n {
                    let (k, after_k) = build(bytes, next);
                    let (v, after_v) = build(bytes, after_k);
                    pairs.push((k, v));
                    next = after_v;
                }
                let frame = if tag == b'%' {
                    Frame::Map(pairs)
                } else {
                    Frame::Attribute(pairs)
                };
                (frame, next)
            } else {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let (item, after) = build(bytes, next);
                    items.push(item);
                    next = after;
                }
                let frame = match tag {
                    b'*' => Frame::Array(items),
                    b'~' => Frame::Set(items),
                    _ => Frame::Push(items),
                };
                (frame, next)
            }
        }
    }
}

/// Tokio codec: decodes [`Frame`]s, encodes [`Frame`]s and [`Command`]s.
#[derive(Debug, Clone, Default)]
pub struct RespCodec {
    decoder: RespDecoder,
}

impl RespCodec {
    pub fn new(limits: RespLimits) -> RespCodec {
        RespCodec {
            decoder: RespDecoder::new(limits),
        }
    }

    pub fn decoder_mut(&mut self) -> &mut RespDecoder {
        &mut self.decoder
    }
}

impl Decoder for RespCodec {
    type Item = Frame;
    type Error = RespError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, RespError> {
        Ok(self.decoder.decode_frame(src)?.map(|(frame, _)| frame))
    }
}

impl Encoder<Frame> for RespCodec {
    type Error = RespError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), RespError> {
        frame.encode(dst);
        Ok(())
    }
}

impl Encoder<&Command> for RespCodec {
    type Error = RespError;

    fn encode(&mut self, cmd: &Command, dst: &mut BytesMut) -> Result<(), RespError> {
        encode_command(&cmd.args, dst);
        Ok(())
    }
}

impl Encoder<Command> for RespCodec {
    type Error = RespError;

    fn encode(&mut self, cmd: Command, dst: &mut BytesMut) -> Result<(), RespError> {
        encode_command(&cmd.args, dst);
        Ok(())
    }
}

/// Decodes every whole frame in `data` (a convenience for tests and tools).
pub fn decode_all(data: &[u8], limits: RespLimits) -> Result<(Vec<Frame>, usize), RespError> {
    let mut buf = BytesMut::from(data);
    let mut decoder = RespDecoder::new(limits);
    let mut frames = Vec::new();
    while let Some((frame, _)) = decoder.decode_frame(&mut buf)? {
        frames.push(frame);
    }
    let rest = buf.remaining();
    Ok((frames, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(data: &[u8]) -> Frame {
        let (mut frames, rest) = decode_all(data, RespLimits::default()).unwrap();
        assert_eq!(rest, 0, "trailing bytes");
        assert_eq!(frames.len(), 1);
        frames.pop().unwrap()
    }

    #[test]
    fn decodes_resp2_types() {
        assert_eq!(one(b"+OK\r\n"), Frame::Simple(Bytes::from_static(b"OK")));
        assert_eq!(
            one(b"-ERR no\r\n"),
            Frame::Error(Bytes::from_static(b"ERR no"))
        );
        assert_eq!(one(b":-42\r\n"), Frame::Integer(-42));
        assert_eq!(one(b"$3\r\na\r\n\r\n"), Frame::bulk(&b"a\r\n"[..]));
        assert_eq!(one(b"$-1\r\n"), Frame::Null);
        assert_eq!(one(b"*-1\r\n"), Frame::Null);
        assert_eq!(
            one(b"*2\r\n$1\r\nx\r\n:1\r\n"),
            Frame::Array(vec![Frame::bulk(&b"x"[..]), Frame::Integer(1)])
        );
    }

    #[test]
    fn decodes_resp3_types() {
        assert_eq!(one(b"_\r\n"), Frame::Null);
        assert_eq!(one(b"#t\r\n"), Frame::Boolean(true));
        assert_eq!(one(b",1.5\r\n"), Frame::Double(1.5));
        assert_eq!(one(b",-inf\r\n"), Frame::Double(f64::NEG_INFINITY));
        assert_eq!(
            one(b"(123456789012345678901234\r\n"),
            Frame::BigNumber(Bytes::from_static(b"123456789012345678901234"))
        );
        assert_eq!(
            one(b"!3\r\nbad\r\n"),
            Frame::BulkError(Bytes::from_static(b"bad"))
        );
        assert_eq!(
            one(b"=7\r\ntxt:abc\r\n"),
            Frame::Verbatim {
                format: *b"txt",
                text: Bytes::from_static(b"abc")
            }
        );
        assert_eq!(
            one(b"%1\r\n+k\r\n:1\r\n"),
            Frame::Map(vec![(
                Frame::Simple(Bytes::from_static(b"k")),
                Frame::Integer(1)
            )])
        );
        assert_eq!(one(b"~1\r\n:1\r\n"), Frame::Set(vec![Frame::Integer(1)]));
        assert_eq!(one(b">1\r\n:1\r\n"), Frame::Push(vec![Frame::Integer(1)]));
    }

    #[test]
    fn incomplete_input_consumes_nothing() {
        let data = b"*2\r\n$5\r\nhello\r\n$5\r\nworld\r\n";
        for cut in 0..data.len() {
            let mut buf = BytesMut::from(&data[..cut]);
            let mut dec = RespDecoder::default();
            assert!(
                dec.decode_frame(&mut buf).unwrap().is_none(),
                "cut at {cut}"
            );
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn reports_wire_length_and_offset() {
        let mut buf = BytesMut::from(&b"+OK\r\n*1\r\n$4\r\nPING\r\n?"[..]);
        let mut dec = RespDecoder::default();
        assert_eq!(dec.decode_frame(&mut buf).unwrap().unwrap().1, 5);
        assert_eq!(dec.decode_frame(&mut buf).unwrap().unwrap().1, 14);
        match dec.decode_frame(&mut buf) {
            Err(RespError::Invalid { offset, .. }) => assert_eq!(offset, 19),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn limits_are_enforced_before_allocation() {
        let limits = RespLimits {
            max_bulk_len: 10,
            max_aggregate_len: 3,
            max_depth: 2,
            max_line_len: 16,
        };
        let err = |data: &[u8]| {
            let mut dec = RespDecoder::new(limits);
            dec.decode_frame(&mut BytesMut::from(data)).unwrap_err()
        };
        assert!(matches!(
            err(b"$11\r\n"),
            RespError::TooLarge {
                what: "bulk string",
                len: 11,
                ..
            }
        ));
        assert!(matches!(
            err(b"*4\r\n"),
            RespError::TooLarge {
                what: "aggregate",
                ..
            }
        ));
        assert!(matches!(
            err(b"*1\r\n*1\r\n*1\r\n:1\r\n"),
            RespError::TooDeep { offset: 8, .. }
        ));
        assert!(matches!(
            err(b"+0123456789abcdefXYZ"),
            RespError::TooLarge { what: "line", .. }
        ));
        let mut dec = RespDecoder::default();
        assert!(matches!(
            dec.decode_frame(&mut BytesMut::from(&b"$99999999999999999999999\r\n"[..])),
            Err(RespError::Invalid { .. })
        ));
    }

    #[test]
    fn rejects_malformed_frames() {
        for data in [
            &b"?x\r\n"[..],
            b":12a\r\n",
            b"$3\r\nabcd\r\n",
            b"*-2\r\n",
            b"#x\r\n",
            b"_x\r\n",
            b"+a\rb",
            b"%-1\r\n",
        ] {
            let mut dec = RespDecoder::default();
            assert!(
                dec.decode_frame(&mut BytesMut::from(data)).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn encode_round_trips() {
        let frames = vec![
            Frame::Simple(Bytes::from_static(b"OK")),
            Frame::Error(Bytes::from_static(b"ERR x")),
            Frame::Integer(i64::MIN),
            Frame::bulk(&b""[..]),
            Frame::Null,
            Frame::Array(vec![Frame::Integer(1), Frame::Array(vec![])]),
            Frame::Double(2.5),
            Frame::Boolean(false),
            Frame::BigNumber(Bytes::from_static(b"-1")),
            Frame::BulkError(Bytes::from_static(b"E")),
            Frame::Verbatim {
                format: *b"mkd",
                text: Bytes::from_static(b"# hi"),
            },
            Frame::Map(vec![(Frame::Integer(1), Frame::Null)]),
            Frame::Set(vec![Frame::Integer(2)]),
            Frame::Attribute(vec![]),
            Frame::Push(vec![Frame::bulk(&b"message"[..])]),
        ];
        let mut buf = BytesMut::new();
        frames.iter().for_each(|f| f.encode(&mut buf));
        let (decoded, rest) = decode_all(&buf, RespLimits::default()).unwrap();
        assert_eq!(rest, 0);
        assert_eq!(decoded, frames);
    }

    #[test]
    fn command_encoding_and_length_agree() {
        let args = ["SET", "key", "a value with spaces", ""];
        let mut buf = BytesMut::new();
        encode_command(&args, &mut buf);
        assert_eq!(buf.len(), encoded_command_len(&args));
        assert_eq!(
            &buf[..],
            b"*4\r\n$3\r\nSET\r\n$3\r\nkey\r\n$19\r\na value with spaces\r\n$0\r\n\r\n"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn bytes() -> impl Strategy<Value = Bytes> {
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
        }

        fn line() -> impl Strategy<Value = Bytes> {
            proptest::collection::vec(
                any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
                0..20,
            )
            .prop_map(Bytes::from)
        }

        fn frame() -> impl Strategy<Value = Frame> {
            let leaf = prop_oneof![
                line().prop_map(Frame::Simple),
                line().prop_map(Frame::Error),
                any::<i64>().prop_map(Frame::Integer),
                bytes().prop_map(Frame::Bulk),
                Just(Frame::Null),
                any::<f64>()
                    .prop_filter("NaN never equals itself", |d| !d.is_nan())
                    .prop_map(Frame::Double),
                any::<bool>().prop_map(Frame::Boolean),
                bytes().prop_map(Frame::BulkError),
                (proptest::array::uniform3(b'a'..=b'z'), bytes())
                    .prop_map(|(format, text)| Frame::Verbatim { format, text }),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Frame::Array),
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Frame::Set),
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Frame::Push),
                    proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Frame::Map),
                ]
            })
        }

        proptest! {
            /// The length parser reads what `str::parse::<i64>` reads.
            #[test]
            fn integers_parse_as_std_does(text in prop_oneof![
                proptest::collection::vec(prop_oneof![Just(b'-'), Just(b'+'), b'0'..=b'9', any::<u8>()], 0..22),
                any::<i64>().prop_map(|i| i.to_string().into_bytes()),
                any::<u64>().prop_map(|i| format!("+{i}").into_bytes()),
            ]) {
                let std = if text.is_empty() || text.len() > 20 {
                    None
                } else {
                    std::str::from_utf8(&text).ok().and_then(|t| t.parse::<i64>().ok())
                };
                prop_assert_eq!(parse_i64(&text), std);
            }

            /// Any split of a valid stream into reads decodes to the same frames
            /// with the same wire lengths.
            #[test]
            fn any_split_decodes_the_same(frames in proptest::collection::vec(frame(), 1..6),
                                          cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
                let mut wire = BytesMut::new();
                let mut lens = Vec::new();
                for f in &frames {
                    let before = wire.len();
                    f.encode(&mut wire);
                    lens.push(wire.len() - before);
                }
                let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
                points.push(wire.len());
                points.sort_unstable();
                let mut dec = RespDecoder::default();
                let mut buf = BytesMut::new();
                let mut got = Vec::new();
                let mut fed = 0;
                for p in points {
                    buf.extend_from_slice(&wire[fed..p]);
                    fed = p;
                    while let Some((f, len)) = dec.decode_frame(&mut buf).unwrap() {
                        got.push((f, len));
                    }
                }
                prop_assert_eq!(buf.len(), 0);
                prop_assert_eq!(dec.consumed(), wire.len() as u64);
                let expected: Vec<(Frame, usize)> = frames.into_iter().zip(lens).collect();
                prop_assert_eq!(got, expected);
            }

            /// Arbitrary bytes never panic the decoder, and every error names an
            /// offset inside the input.
            #[test]
            fn garbage_is_an_error_not_a_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
                let mut dec = RespDecoder::new(RespLimits { max_bulk_len: 1 << 20, max_aggregate_len: 1 << 10, max_depth: 8, max_line_len: 128 });
                let mut buf = BytesMut::from(&data[..]);
                loop {
                    match dec.decode_frame(&mut buf) {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(RespError::Invalid { offset, .. }) | Err(RespError::TooLarge { offset, .. }) | Err(RespError::TooDeep { offset, .. }) => {
                            prop_assert!(offset <= data.len() as u64);
                            break;
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
                    }
                }
            }
        }
    }
}
