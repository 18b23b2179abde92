//! The load client: `streams` connections to the target at once, one streamed request each, the
//! answer read and parsed as it arrives (HTTP/1.1 head, chunked, length or close-delimited body,
//! then the event stream). Each token's text is its scheduled send time (upstream.rs), so an
//! event's lateness is the time of the read that brought it minus that: `arrival - due`.
//!
//! Two targets: `pwachat` (`POST /api/chat/stream` with `{"message": ...}`; its `delta` events carry
//! the token text as `{"content":"..."}`, `done` ends the stream) and `openai` (the upstream itself,
//! `POST /v1/chat/completions`: every `chat.completion.chunk` with a content delta is a token,
//! `data: [DONE]` ends it). The pace goes in the message (`Pace::marker`).
//!
//! The figures, as benches/loadbench/scenarios.py `analyse` took them: lateness of every event
//! (`lateness_all_*`, the connection ramp included) and of the events due once every stream had
//! its head (`lateness_*`: the steady state; a stream's head time is its first token's due time
//! less one period), first byte (connect start to the first byte of the answer), streams complete
//! (every token, the terminal event, the end of the body), events.

use std::cell::RefCell;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::clock::now_us;
use crate::text::{Json, find, leading_u64, pct};
use crate::upstream::Pace;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Pwachat,
    OpenAi,
}

impl Api {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pwachat" => Some(Self::Pwachat),
            "openai" => Some(Self::OpenAi),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Pwachat => "pwachat",
            Self::OpenAi => "openai",
        }
    }
}

pub struct Load {
    pub target: SocketAddr,
    pub api: Api,
    pub streams: usize,
    pub pace: Pace,
    pub timeout: Duration,
    pub key: String,
}

impl Load {
    fn request(&self, i: usize) -> Vec<u8> {
        let message = format!("{} bench stream {i}", self.pace.marker());
        let (path, body, auth) = match self.api {
            Api::Pwachat => (
                "/api/chat/stream",
                format!(r#"{{"message":"{message}"}}"#),
                String::new(),
            ),
            Api::OpenAi => (
                "/v1/chat/completions",
                format!(
                    r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{message}"}}],"max_tokens":{},"stream":true,"stream_options":{{"include_usage":true}}}}"#,
                    self.pace.tokens + 10
                ),
                format!("Authorization: Bearer {}\r\n", self.key),
            ),
        };
        format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.target,
            body.len()
        )
        .into_bytes()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum End {
    #[default]
    None,
    Done,
    Error,
}

#[derive(Default)]
struct Rec {
    started: u64,
    connected: bool,
    connected_at: u64,
    first_byte: Option<u64>,
    status: u16,
    events: u32,
    first_due: Option<u64>,
    end: End,
    body_done: bool,
    /// What went wrong at the HTTP level (a status other than 200, a broken body, a reset).
    fault: Option<&'static str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Size,
    Ext,
    SizeLf,
    Data(usize),
    DataCr,
    DataLf,
    Trailer { line_start: bool },
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Chunked(Chunk),
    Length(usize),
    Close,
}

/// One answer, parsed as it arrives.
struct Reader {
    api: Api,
    head: Option<Vec<u8>>, // Some until the head is complete
    framing: Framing,
    chunk_size: usize,
    /// Decoded body bytes that do not end a line yet.
    line: Vec<u8>,
    event: Vec<u8>,
    /// What the event's `data` line says (read as it comes: no copy of the line).
    data: Data,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Data {
    None,
    Token(u64),
    Done,
    Error,
    Other,
}

impl Data {
    /// A `data` line: the token in its JSON (`"content":" <due>"`; the role and finish chunks
    /// have none), `[DONE]`, an error object. The formats read here put an event's data on one
    /// line; a second `data` line would replace the first.
    fn of(value: &[u8]) -> Self {
        const KEY: &[u8] = b"\"content\":\"";
        if value == b"[DONE]" {
            return Self::Done;
        }
        if value.starts_with(b"{\"error\"") {
            return Self::Error;
        }
        let Some(at) = rfind(value, KEY) else {
            return Self::Other;
        };
        let text = &value[at + KEY.len()..];
        let text = &text[text.iter().take_while(|&&b| b == b' ').count()..];
        leading_u64(text).map_or(Self::Other, |(due, _)| Self::Token(due))
    }
}

/// The last occurrence of `needle` (the content is near the end of an OpenAI chunk).
fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, _) = needle.split_first()?;
    let mut end = hay.len().checked_sub(needle.len())?;
    loop {
        let at = hay[..=end].iter().rposition(|&b| b == first)?;
        if hay[at..].starts_with(needle) {
            return Some(at);
        }
        end = at.checked_sub(1)?;
    }
}

/// One event's token, as `(due, arrival)` microseconds.
type Sample = (u64, u64);

impl Reader {
    fn new(api: Api) -> Self {
        Self {
            api,
            head: Some(Vec::new()),
            framing: Framing::Close,
            chunk_size: 0,
            line: Vec::new(),
            event: Vec::new(),
            data: Data::None,
        }
    }

    fn finished(&self) -> bool {
        matches!(
            self.framing,
            Framing::Chunked(Chunk::End) | Framing::Length(0)
        ) && self.head.is_none()
    }

    /// Feed bytes read at `now`. Err: the answer is not one this client can read.
    fn feed(
        &mut self,
        data: &[u8],
        now: u64,
        rec: &mut Rec,
        out: &mut Vec<Sample>,
    ) -> Result<(), &'static str> {
        if let Some(head) = self.head.as_mut() {
            let from = head.len().saturating_sub(3);
            head.extend_from_slice(data);
            let Some(end) = find(&head[from..], b"\r\n\r\n").map(|e| e + from) else {
                return if head.len() > 65536 {
                    Err("head too long")
                } else {
                    Ok(())
                };
            };
            let head = self.head.take().expect("the head");
            self.parse_head(&head[..end], rec)?;
            let rest = head[end + 4..].to_vec();
            return self.body(&rest, now, rec, out);
        }
        self.body(data, now, rec, out)
    }

    fn parse_head(&mut self, head: &[u8], rec: &mut Rec) -> Result<(), &'static str> {
        let text = std::str::from_utf8(head).map_err(|_| "head not UTF-8")?;
        let mut lines = text.split("\r\n");
        let status = lines.next().unwrap_or("");
        let mut parts = status.split(' ');
        if !parts.next().unwrap_or("").starts_with("HTTP/1.") {
            return Err("not HTTP/1.x");
        }
        rec.status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or("no status")?;
        self.framing = Framing::Close;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                return Err("header without colon");
            };
            let name = name.trim().to_ascii_lowercase();
            if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                self.framing = Framing::Chunked(Chunk::Size);
            } else if name == "content-length" && !matches!(self.framing, Framing::Chunked(_)) {
                self.framing = Framing::Length(value.trim().parse().map_err(|_| "bad length")?);
            }
        }
        if rec.status != 200 {
            rec.fault = Some("status");
        }
        Ok(())
    }

    fn body(
        &mut self,
        data: &[u8],
        now: u64,
        rec: &mut Rec,
        out: &mut Vec<Sample>,
    ) -> Result<(), &'static str> {
        match self.framing {
            Framing::Close => {
                self.sse(data, now, rec, out);
                Ok(())
            }
            Framing::Length(left) => {
                let take = left.min(data.len());
                self.framing = Framing::Length(left - take);
                self.sse(&data[..take], now, rec, out);
                Ok(())
            }
            Framing::Chunked(_) => self.chunked(data, now, rec, out),
        }
    }

    fn chunked(
        &mut self,
        data: &[u8],
        now: u64,
        rec: &mut Rec,
        out: &mut Vec<Sample>,
    ) -> Result<(), &'static str> {
        let Framing::Chunked(mut phase) = self.framing else {
            unreachable!()
        };
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match phase {
                Chunk::Data(left) => {
                    let take = left.min(data.len() - i);
                    self.sse(&data[i..i + take], now, rec, out);
                    i += take;
                    phase = if take == left {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left - take)
                    };
                    continue;
                }
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.chunk_size > 1 << 40 {
                            return Err("chunk too large");
                        }
                        self.chunk_size =
                            self.chunk_size * 16 + (b as char).to_digit(16).unwrap_or(0) as usize;
                    }
                    b';' | b' ' | b'\t' => phase = Chunk::Ext,
                    b'\r' => phase = Chunk::SizeLf,
                    _ => return Err("bad chunk size"),
                },
                Chunk::Ext => {
                    if b == b'\r' {
                        phase = Chunk::SizeLf;
                    }
                }
                Chunk::SizeLf => {
                    if b != b'\n' {
                        return Err("bad chunk line");
                    }
                    phase = if self.chunk_size == 0 {
                        Chunk::Trailer { line_start: true }
                    } else {
                        Chunk::Data(self.chunk_size)
                    };
                    self.chunk_size = 0;
                }
                Chunk::DataCr => {
                    if b != b'\r' {
                        return Err("chunk without CRLF");
                    }
                    phase = Chunk::DataLf;
                }
                Chunk::DataLf => {
                    if b != b'\n' {
                        return Err("chunk without CRLF");
                    }
                    phase = Chunk::Size;
                }
                Chunk::Trailer { line_start } => match b {
                    b'\r' => {}
                    b'\n' if line_start => phase = Chunk::End,
                    b'\n' => phase = Chunk::Trailer { line_start: true },
                    _ => phase = Chunk::Trailer { line_start: false },
                },
                Chunk::End => break,
            }
            i += 1;
        }
        self.framing = Framing::Chunked(phase);
        Ok(())
    }

    /// Decoded body bytes into the event stream (LF or CRLF line ends).
    fn sse(&mut self, mut data: &[u8], now: u64, rec: &mut Rec, out: &mut Vec<Sample>) {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() {
                self.line_done(&data[..nl], now, rec, out);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&data[..nl]);
                self.line_done(&line, now, rec, out);
                line.clear();
                self.line = line;
            }
            data = &data[nl + 1..];
        }
        self.line.extend_from_slice(data);
    }

    fn line_done(&mut self, line: &[u8], now: u64, rec: &mut Rec, out: &mut Vec<Sample>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(now, rec, out);
            return;
        }
        if line[0] == b':' {
            return; // a comment (pwachat's heartbeat)
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(c) => (&line[..c], &line[c + 1..]),
            None => (line, &b""[..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match name {
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"data" => self.data = Data::of(value),
            _ => {}
        }
    }

    fn dispatch(&mut self, now: u64, rec: &mut Rec, out: &mut Vec<Sample>) {
        let data = std::mem::replace(&mut self.data, Data::None);
        let what = match self.api {
            Api::Pwachat => match (self.event.as_slice(), data) {
                (b"delta", Data::Token(due)) => Data::Token(due),
                (b"done", _) => Data::Done,
                (b"error", _) => Data::Error,
                _ => Data::None,
            },
            Api::OpenAi => data,
        };
        match what {
            Data::Token(due) => {
                rec.events += 1;
                rec.first_due.get_or_insert(due);
                out.push((due, now));
            }
            Data::Done => rec.end = End::Done,
            Data::Error => rec.end = End::Error,
            Data::None | Data::Other => {}
        }
        self.event.clear();
    }
}

/// One read. A short read also clears the socket's readiness, so that the next wait is for new data,
/// not for a read that would find nothing: one recv per arrival instead of two (the socket is
/// edge-triggered; tokio keeps readiness that came in meanwhile).
fn read_some(sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let fd = sock.as_raw_fd();
    let mut got = None;
    let r = sock.try_io(Interest::READABLE, || {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writing; `fd` is the stream's socket.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        got = Some(n);
        if n > 0 && n < buf.len() {
            Err(ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    got.map_or(r, Ok)
}

struct Shared {
    recs: RefCell<Vec<Rec>>,
    samples: RefCell<Vec<Sample>>,
    /// One read buffer for every connection (one thread: reads never overlap).
    buf: RefCell<Vec<u8>>,
    /// The connections of finished streams, closed at the end of the run.
    keep: RefCell<Vec<TcpStream>>,
}

async fn one(i: usize, request: Vec<u8>, target: SocketAddr, api: Api, shared: Rc<Shared>) {
    shared.recs.borrow_mut()[i].started = now_us();
    let Ok(sock) = TcpStream::connect(target).await else {
        return;
    };
    let _ = sock.set_nodelay(true);
    {
        let mut recs = shared.recs.borrow_mut();
        recs[i].connected = true;
        recs[i].connected_at = now_us();
    }
    exchange(i, &sock, &request, api, &shared).await;
    // Closed when the run ends, not now: a close costs tens of microseconds (and the server's
    // close of its side), which would otherwise fall among the last tokens of the other streams.
    shared.keep.borrow_mut().push(sock);
}

async fn exchange(i: usize, sock: &TcpStream, request: &[u8], api: Api, shared: &Shared) {
    let mut sent = 0;
    while sent < request.len() {
        if sock.writable().await.is_err() {
            return;
        }
        match sock.try_write(&request[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
    let mut reader = Reader::new(api);
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let mut buf = shared.buf.borrow_mut();
        let n = match read_some(sock, &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(_) => {
                shared.recs.borrow_mut()[i].fault.get_or_insert("reset");
                return;
            }
        };
        let now = now_us();
        let mut recs = shared.recs.borrow_mut();
        let rec = &mut recs[i];
        if n == 0 {
            if reader.head.is_none() && reader.framing == Framing::Close {
                rec.body_done = true;
            } else if !reader.finished() {
                rec.fault.get_or_insert("closed early");
            }
            return;
        }
        rec.first_byte.get_or_insert(now);
        let mut samples = shared.samples.borrow_mut();
        if let Err(e) = reader.feed(&buf[..n], now, rec, &mut samples) {
            rec.fault.get_or_insert(e);
            return;
        }
        if reader.finished() {
            rec.body_done = true;
            return;
        }
    }
}

/// Run the load; its figures, for one JSON line.
pub async fn run(load: &Load) -> Json {
    let shared = Rc::new(Shared {
        recs: RefCell::new((0..load.streams).map(|_| Rec::default()).collect()),
        samples: RefCell::new(Vec::with_capacity(load.streams * load.pace.tokens as usize)),
        buf: RefCell::new(vec![0; 256 * 1024]),
        keep: RefCell::new(Vec::with_capacity(load.streams)),
    });
    let t0 = now_us();
    let usage0 = crate::clock::usage();
    let deadline = tokio::time::Instant::now() + load.timeout;
    let handles: Vec<_> = (0..load.streams)
        .map(|i| {
            tokio::task::spawn_local(one(
                i,
                load.request(i),
                load.target,
                load.api,
                shared.clone(),
            ))
        })
        .collect();
    let mut timed_out = 0u64;
    for mut h in handles {
        if tokio::time::timeout_at(deadline, &mut h).await.is_err() {
            h.abort();
            timed_out += 1;
        }
    }
    let elapsed = now_us() - t0;
    let usage1 = crate::clock::usage();
    tokio::task::yield_now().await; // let the aborted tasks go (their sockets close)
    shared.keep.borrow_mut().clear(); // now close them
    let mut j = figures(load, &shared, timed_out, elapsed);
    // The whole process (with `serve` or `direct`, the upstream too) during the run.
    j.ms(
        "process_cpu_ms",
        Some((usage1.cpu_us - usage0.cpu_us) as i64),
    )
    .ms(
        "process_runqueue_wait_ms",
        Some((usage1.wait_us - usage0.wait_us) as i64),
    )
    .int(
        "process_involuntary_switches",
        usage1.nivcsw - usage0.nivcsw,
    );
    j
}

fn figures(load: &Load, shared: &Shared, timed_out: u64, elapsed_us: u64) -> Json {
    let recs = shared.recs.borrow();
    let samples = shared.samples.borrow();
    let period = load.pace.period_us;
    // Once every stream has its head, no connection is being opened any more.
    let ramp_end = recs
        .iter()
        .filter_map(|r| r.first_due.map(|d| d.saturating_sub(period)))
        .max()
        .unwrap_or(0);
    let mut all: Vec<i64> = samples
        .iter()
        .map(|&(due, at)| at as i64 - due as i64)
        .collect();
    let mut steady: Vec<i64> = samples
        .iter()
        .filter(|&&(due, _)| due > ramp_end)
        .map(|&(due, at)| at as i64 - due as i64)
        .collect();
    all.sort_unstable();
    steady.sort_unstable();
    let mut first: Vec<i64> = recs
        .iter()
        .filter_map(|r| r.first_byte.map(|f| (f - r.started) as i64))
        .collect();
    first.sort_unstable();
    let mut connect: Vec<i64> = recs
        .iter()
        .filter(|r| r.connected)
        .map(|r| (r.connected_at - r.started) as i64)
        .collect();
    connect.sort_unstable();
    let complete = recs
        .iter()
        .filter(|r| {
            r.body_done && r.end == End::Done && r.events == load.pace.tokens && r.fault.is_none()
        })
        .count();
    let count = |f: &dyn Fn(&Rec) -> bool| recs.iter().filter(|r| f(r)).count() as u64;
    let mut j = Json::default();
    j.str("api", load.api.name())
        .int("streams", load.streams as u64)
        .int("period_us", period)
        .int("tokens", u64::from(load.pace.tokens))
        .int("connected", count(&|r| r.connected))
        .int("status_200", count(&|r| r.status == 200))
        .int("complete", complete as u64)
        .int("events", samples.len() as u64)
        .int("steady_events", steady.len() as u64)
        .int("error_events", count(&|r| r.end == End::Error))
        .int("faults", count(&|r| r.fault.is_some()))
        .int("timed_out", timed_out)
        .ms("lateness_p50_ms", pct(&steady, 50.0))
        .ms("lateness_p99_ms", pct(&steady, 99.0))
        .ms("lateness_max_ms", steady.last().copied())
        .ms("lateness_all_p50_ms", pct(&all, 50.0))
        .ms("lateness_all_p99_ms", pct(&all, 99.0))
        .ms("lateness_all_max_ms", all.last().copied())
        .ms("lateness_min_ms", all.first().copied())
        .ms("first_byte_p50_ms", pct(&first, 50.0))
        .ms("first_byte_p99_ms", pct(&first, 99.0))
        .ms("first_byte_max_ms", first.last().copied())
        .ms("connect_p50_ms", pct(&connect, 50.0))
        .ms("connect_max_ms", connect.last().copied())
        .ms(
            "ramp_ms",
            (ramp_end > 0).then(|| ramp_end as i64 - t0_of(&recs) as i64),
        )
        .ms("elapsed_ms", Some(elapsed_us as i64));
    j
}

fn t0_of(recs: &[Rec]) -> u64 {
    recs.iter()
        .map(|r| r.started)
        .filter(|&s| s > 0)
        .min()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(api: Api, pieces: &[&[u8]]) -> (Rec, Vec<Sample>, bool) {
        let mut r = Reader::new(api);
        let mut rec = Rec::default();
        let mut out = Vec::new();
        for p in pieces {
            r.feed(p, 5, &mut rec, &mut out).unwrap();
        }
        let done = r.finished();
        (rec, out, done)
    }

    #[test]
    fn pwachat_chunked_split_anywhere() {
        let body = b"id: 0\nevent: start\ndata: {\"chat_id\":\"x\"}\n\n: ping\n\nid: 1\nevent: delta\ndata: {\"content\":\" 123\"}\n\nid: 2\nevent: delta\ndata: {\"content\":\" 456\"}\n\nid: 3\nevent: done\ndata: {}\n\n";
        let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for part in body.chunks(37) {
            wire.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            wire.extend_from_slice(part);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        for split in [1, 2, 7, 50, wire.len()] {
            let pieces: Vec<&[u8]> = wire.chunks(split).collect();
            let (rec, out, done) = read_all(Api::Pwachat, &pieces);
            assert_eq!(rec.status, 200);
            assert_eq!(out, vec![(123, 5), (456, 5)], "split {split}");
            assert_eq!(rec.end, End::Done);
            assert!(done);
        }
    }

    #[test]
    fn openai_chunks_role_and_finish_are_not_tokens() {
        let body = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\" 77\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
                    data: [DONE]\n\n";
        let wire = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (rec, out, done) = read_all(Api::OpenAi, &[wire.as_bytes()]);
        assert_eq!(out, vec![(77, 5)]);
        assert_eq!(rec.end, End::Done);
        assert!(done);
    }

    #[test]
    fn rfind_finds_the_last() {
        assert_eq!(rfind(b"abcabc", b"bc"), Some(4));
        assert_eq!(rfind(b"abcabc", b"abc"), Some(3));
        assert_eq!(rfind(b"abc", b"x"), None);
        assert_eq!(rfind(b"ab", b"abc"), None);
        assert_eq!(rfind(b"aaa", b"aa"), Some(1));
    }

    #[test]
    fn a_refusal_is_a_fault() {
        let (rec, out, _) = read_all(
            Api::Pwachat,
            &[b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}"],
        );
        assert_eq!(rec.status, 429);
        assert_eq!(rec.fault, Some("status"));
        assert!(out.is_empty());
    }
}
