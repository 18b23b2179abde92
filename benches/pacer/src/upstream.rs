//! The paced upstream: `POST /v1/chat/completions` (and `/chat/completions`) with `"stream": true`
//! answers `200 text/event-stream`, chunked (close-delimited for an HTTP/1.0 request), in exactly
//! the OpenAI wire format tests/fake_upstream.py sends: the role chunk with the head, one
//! `chat.completion.chunk` per token, the `finish_reason` chunk, the usage chunk when
//! `stream_options.include_usage` is set, then `data: [DONE]`. Connections are kept alive (pwachat
//! pools them) unless the request says `Connection: close`.
//!
//! The schedule: a stream's head is written as soon as its request has been read, at `head`; let
//! `tick` be `head` rounded up to the next millisecond boundary of `CLOCK_MONOTONIC`. Token k (0
//! based) is due at `tick + (k + 1) * period`, and its text is `" <due>"`: that time in microseconds
//! of `CLOCK_MONOTONIC`, so whoever reads the token knows when it was meant to leave (see
//! clock.rs). The request says the pace with a `[pace <period_us>us x<tokens>]` marker anywhere in
//! its body (the load client puts it in the message, which pwachat forwards as the user message);
//! without one, the defaults of `pacer serve`.
//!
//! Pacing costs one timer for all streams: a timerfd fires on every millisecond boundary while any
//! stream is running, and each firing writes every token due in the milliseconds up to now, from a
//! wheel of one slot per millisecond, straight to its socket (`try_write`). Only what a socket does
//! not take at once is queued, for the connection's own task to flush when the socket is writable:
//! the tokens behind it queue too, in order. A token is never written before its due time.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::clock::{Tick, now_us};
use crate::text::{content_words, field_is_true, field_str, field_u64, find, leading_u64};

/// How a stream is paced: a token every `period_us`, `tokens` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    pub period_us: u64,
    pub tokens: u32,
}

/// The wheel has one slot per millisecond for this many milliseconds: periods must be shorter.
const SLOTS: usize = 1 << 14;
pub const MAX_PERIOD_US: u64 = (SLOTS as u64 - 2) * 1_000;
pub const MIN_PERIOD_US: u64 = 1_000;

impl Pace {
    /// The marker a request carries to ask for this pace.
    pub fn marker(self) -> String {
        format!("[pace {}us x{}]", self.period_us, self.tokens)
    }

    pub fn from_marker(body: &[u8]) -> Option<Self> {
        let at = find(body, b"[pace ")?;
        let rest = &body[at + 6..];
        let (period_us, n) = leading_u64(rest)?;
        let rest = rest[n..].strip_prefix(b"us x")?;
        let (tokens, _) = leading_u64(rest)?;
        Some(Self {
            period_us: period_us.clamp(MIN_PERIOD_US, MAX_PERIOD_US),
            tokens: u32::try_from(tokens).ok()?,
        })
    }
}

/// What the upstream did since the last `take_stats`.
#[derive(Default, Clone, Debug)]
pub struct Stats {
    pub requests: u64,
    pub streams: u64,
    pub completed: u64,
    pub dropped: u64,
    pub tokens: u64,
    /// Writes the socket did not take whole at once (queued for the connection's task).
    pub queued_writes: u64,
    /// Milliseconds of the wheel that had tokens due, and how late after its boundary each was
    /// started on (the timer's wake-up plus the slots before it).
    pub busy_ticks: u64,
    pub tick_late_sum_us: u64,
    pub tick_late_max_us: u64,
}

struct Conn {
    sock: TcpStream,
    /// Bytes the socket has not taken yet, flushed by the connection's task.
    pending: RefCell<Vec<u8>>,
    dead: Cell<bool>,
    finished: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Conn {
    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Write now what the socket takes, queue the rest (and what comes after it) for the task.
    fn send(&self, bytes: &[u8], stats: &mut Stats) -> bool {
        if self.dead.get() {
            return false;
        }
        let mut pending = self.pending.borrow_mut();
        if !pending.is_empty() {
            pending.extend_from_slice(bytes);
            return true;
        }
        let taken = match self.sock.try_write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(_) => {
                drop(pending);
                self.dead.set(true);
                self.wake();
                return false;
            }
        };
        if taken < bytes.len() {
            pending.extend_from_slice(&bytes[taken..]);
            drop(pending);
            stats.queued_writes += 1;
            self.wake();
        }
        true
    }
}

struct Stream {
    conn: Rc<Conn>,
    k: u32,
    n: u32,
    tick_us: u64,
    period_us: u64,
    chunked: bool,
    /// A token's event is `prefix` + JSON string + `suffix`.
    prefix: Rc<[u8]>,
    suffix: Rc<[u8]>,
    /// The `finish_reason` chunk, the usage chunk, `[DONE]`.
    tail: Vec<u8>,
}

impl Stream {
    fn due_us(&self, k: u32) -> u64 {
        self.tick_us + (u64::from(k) + 1) * self.period_us
    }

    /// Token k's frame (with the tail after the last token) into `out`.
    fn frame(&self, out: &mut Vec<u8>) {
        let mut digits = [0u8; 20];
        let text = decimal(self.due_us(self.k), &mut digits);
        let len = self.prefix.len() + text.len() + 3 + self.suffix.len();
        if self.chunked {
            chunk_size(out, len);
        }
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(b"\" ");
        out.extend_from_slice(text);
        out.push(b'"');
        out.extend_from_slice(&self.suffix);
        if self.chunked {
            out.extend_from_slice(b"\r\n");
        }
        if self.k + 1 == self.n {
            frame_tail(out, &self.tail, self.chunked);
        }
    }
}

fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

fn chunk_size(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(HEX[(len >> (4 * i)) & 15]);
    }
    out.extend_from_slice(b"\r\n");
}

fn frame_tail(out: &mut Vec<u8>, tail: &[u8], chunked: bool) {
    if chunked {
        chunk_size(out, tail.len());
        out.extend_from_slice(tail);
        out.extend_from_slice(b"\r\n0\r\n\r\n");
    } else {
        out.extend_from_slice(tail);
    }
}

struct Wheel {
    slots: Vec<Vec<u32>>,
    streams: Vec<Option<Stream>>,
    free: Vec<u32>,
    active: usize,
    /// The next millisecond whose slot is due.
    next_ms: u64,
}

impl Wheel {
    fn slot(ms: u64) -> usize {
        (ms as usize) & (SLOTS - 1)
    }

    fn schedule(&mut self, id: u32) {
        let s = self.streams[id as usize].as_ref().expect("a live stream");
        let ms = s.due_us(s.k).div_ceil(1_000);
        self.slots[Self::slot(ms)].push(id);
    }

    fn insert(&mut self, stream: Stream) -> u32 {
        self.active += 1;
        if let Some(id) = self.free.pop() {
            self.streams[id as usize] = Some(stream);
            id
        } else {
            self.streams.push(Some(stream));
            (self.streams.len() - 1) as u32
        }
    }

    fn remove(&mut self, id: u32) -> Stream {
        self.active -= 1;
        self.free.push(id);
        self.streams[id as usize].take().expect("a live stream")
    }
}

pub struct Upstream {
    wheel: RefCell<Wheel>,
    tick: Tick,
    stats: RefCell<Stats>,
    seq: Cell<u64>,
    defaults: Pace,
    scratch: RefCell<Vec<u8>>,
}

impl Upstream {
    /// Listen on `addr` (a large backlog: thousands of streams connect at once) and start pacing.
    pub fn start(addr: SocketAddr, defaults: Pace) -> io::Result<(Rc<Self>, SocketAddr)> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(8192)?;
        let local = listener.local_addr()?;
        let up = Rc::new(Self {
            wheel: RefCell::new(Wheel {
                slots: (0..SLOTS).map(|_| Vec::new()).collect(),
                streams: Vec::new(),
                free: Vec::new(),
                active: 0,
                next_ms: 0,
            }),
            tick: Tick::new()?,
            stats: RefCell::new(Stats::default()),
            seq: Cell::new(0),
            defaults,
            scratch: RefCell::new(Vec::with_capacity(4096)),
        });
        tokio::task::spawn_local(up.clone().ticker());
        tokio::task::spawn_local(up.clone().accept(listener));
        Ok((up, local))
    }

    pub fn take_stats(&self) -> Stats {
        std::mem::take(&mut *self.stats.borrow_mut())
    }

    async fn accept(self: Rc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    tokio::task::spawn_local(self.clone().connection(sock));
                }
                // Out of descriptors, most likely: let some close.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    async fn ticker(self: Rc<Self>) {
        loop {
            if self.tick.wait().await.is_err() {
                return;
            }
            self.on_tick();
        }
    }

    fn on_tick(&self) {
        let now = now_us();
        let now_ms = now / 1_000;
        let mut wheel = self.wheel.borrow_mut();
        let wheel = &mut *wheel;
        let mut stats = self.stats.borrow_mut();
        let mut out = self.scratch.borrow_mut();
        while wheel.next_ms <= now_ms {
            let ms = wheel.next_ms;
            wheel.next_ms += 1;
            let slot = Wheel::slot(ms);
            let mut ids = std::mem::take(&mut wheel.slots[slot]);
            if ids.is_empty() {
                wheel.slots[slot] = ids;
                continue;
            }
            let late = now_us().saturating_sub(ms * 1_000);
            stats.busy_ticks += 1;
            stats.tick_late_sum_us += late;
            stats.tick_late_max_us = stats.tick_late_max_us.max(late);
            for &id in &ids {
                let (alive, last) = {
                    let s = wheel.streams[id as usize].as_mut().expect("a live stream");
                    out.clear();
                    s.frame(&mut out);
                    let alive = s.conn.send(&out, &mut stats);
                    s.k += 1;
                    if alive && s.k == s.n {
                        s.conn.finished.set(true);
                        s.conn.wake();
                    }
                    (alive, s.k == s.n)
                };
                if !alive {
                    wheel.remove(id);
                    stats.dropped += 1;
                    continue;
                }
                stats.tokens += 1;
                if last {
                    wheel.remove(id);
                    stats.completed += 1;
                } else {
                    wheel.schedule(id);
                }
            }
            // Periods are at least a millisecond: nothing was scheduled into this slot meanwhile.
            ids.clear();
            wheel.slots[slot] = ids;
        }
        if wheel.active == 0 {
            self.tick.disarm();
        }
    }

    fn begin_stream(&self, stream: Stream) {
        let mut wheel = self.wheel.borrow_mut();
        if !self.tick.is_armed() {
            wheel.next_ms = now_us() / 1_000 + 1;
            self.tick.arm();
        }
        let id = wheel.insert(stream);
        wheel.schedule(id);
        self.stats.borrow_mut().streams += 1;
    }

    async fn connection(self: Rc<Self>, sock: TcpStream) {
        let conn = Rc::new(Conn {
            sock,
            pending: RefCell::new(Vec::new()),
            dead: Cell::new(false),
            finished: Cell::new(false),
            waker: Cell::new(None),
        });
        let mut buf = Vec::new();
        loop {
            let Some(req) = read_request(&conn, &mut buf).await else {
                return;
            };
            self.stats.borrow_mut().requests += 1;
            let paced = self.respond(&conn, &req);
            if !drive(&conn, &mut buf, paced).await {
                return;
            }
            if req.close {
                if !req.http10 {
                    // The answer's end is in its framing: let the client close first (so that its
                    // close, not ours, falls where it chose), then close.
                    linger(&conn).await;
                }
                return;
            }
            conn.finished.set(false);
        }
    }

    /// Send the answer's head (all of it when it is not a paced stream); true if it is paced.
    fn respond(&self, conn: &Rc<Conn>, req: &Request) -> bool {
        let mut stats = self.stats.borrow_mut();
        let completions = req.path == b"/v1/chat/completions" || req.path == b"/chat/completions";
        if req.method != b"POST" || !completions {
            let message = format!(
                "Invalid URL ({} {})",
                String::from_utf8_lossy(&req.method),
                String::from_utf8_lossy(&req.path).replace(['"', '\\'], "")
            );
            let body = format!(
                r#"{{"error":{{"message":"{message}","type":"invalid_request_error","param":null,"code":null}}}}"#
            );
            conn.send(
                &json_response(404, "Not Found", &body, req.close),
                &mut stats,
            );
            return false;
        }
        let n = self.seq.get() + 1;
        self.seq.set(n);
        let answer = Answer::of(&req.body, n, self.defaults);
        if !field_is_true(&req.body, "stream") {
            conn.send(
                &json_response(200, "OK", &answer.message(), req.close),
                &mut stats,
            );
            return false;
        }
        let chunked = !req.http10;
        let mut head = format!(
            "HTTP/1.1 200 OK\r\nx-request-id: req_pacer{n:08}\r\nopenai-processing-ms: 1\r\n\
             Content-Type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
        );
        if chunked {
            head.push_str("Transfer-Encoding: chunked\r\n");
        }
        if req.close || req.http10 {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        let role = answer.role_chunk();
        if chunked {
            chunk_size(&mut out, role.len());
            out.extend_from_slice(&role);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(&role);
        }
        let (prefix, suffix) = answer.delta_parts();
        let tail = answer.tail();
        if answer.tokens == 0 {
            frame_tail(&mut out, &tail, chunked);
            conn.send(&out, &mut stats);
            stats.streams += 1;
            stats.completed += 1;
            conn.finished.set(true);
            return true;
        }
        if !conn.send(&out, &mut stats) {
            return true;
        }
        drop(stats);
        let now = now_us();
        self.begin_stream(Stream {
            conn: conn.clone(),
            k: 0,
            n: answer.tokens,
            tick_us: now.div_ceil(1_000) * 1_000,
            period_us: answer.pace.period_us,
            chunked,
            prefix: prefix.into(),
            suffix: suffix.into(),
            tail,
        });
        true
    }
}

/// Until the connection's answer is all written (and, when `paced`, its stream has finished):
/// flushes what the ticker queued, notices the client leaving. False when the connection is gone.
async fn drive(conn: &Conn, buf: &mut Vec<u8>, paced: bool) -> bool {
    enum Ev {
        Dead,
        Done,
        Write,
        Read,
    }
    loop {
        let ev = poll_fn(|cx| {
            if conn.dead.get() {
                return Poll::Ready(Ev::Dead);
            }
            if conn.pending.borrow().is_empty() {
                if !paced || conn.finished.get() {
                    return Poll::Ready(Ev::Done);
                }
            } else if conn.sock.poll_write_ready(cx).is_ready() {
                return Poll::Ready(Ev::Write);
            }
            if conn.sock.poll_read_ready(cx).is_ready() {
                return Poll::Ready(Ev::Read);
            }
            conn.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        match ev {
            Ev::Dead => return false,
            Ev::Done => return true,
            Ev::Write => {
                let mut pending = conn.pending.borrow_mut();
                match conn.sock.try_write(&pending) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => conn.dead.set(true),
                }
            }
            Ev::Read => {
                let mut tmp = [0u8; 4096];
                match conn.sock.try_read(&mut tmp) {
                    // The client left (or half-closed: no HTTP client does while it waits).
                    Ok(0) => conn.dead.set(true),
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => conn.dead.set(true),
                }
            }
        }
    }
}

/// Until the client closes the connection (what it sends meanwhile is dropped).
async fn linger(conn: &Conn) {
    let mut tmp = [0u8; 4096];
    loop {
        if conn.sock.readable().await.is_err() {
            return;
        }
        match conn.sock.try_read(&mut tmp) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

struct Request {
    method: Vec<u8>,
    path: Vec<u8>,
    http10: bool,
    close: bool,
    body: Vec<u8>,
}

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;

/// The next request on the connection (None: closed, or not HTTP/1.x we can read).
async fn read_request(conn: &Conn, buf: &mut Vec<u8>) -> Option<Request> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let mut parts = lines.next()?.split(' ');
            let method = parts.next()?.as_bytes().to_vec();
            let path = parts.next()?.as_bytes().to_vec();
            let version = parts.next()?;
            if !version.starts_with("HTTP/1.") {
                return None;
            }
            let http10 = version == "HTTP/1.0";
            let mut length = 0usize;
            let mut close = http10;
            for line in lines {
                let (name, value) = line.split_once(':')?;
                let value = value.trim();
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse().ok()?,
                    "connection" => {
                        let v = value.to_ascii_lowercase();
                        close = v.contains("close") || (http10 && !v.contains("keep-alive"));
                    }
                    "transfer-encoding" => return None, // no client of this tool sends one
                    _ => {}
                }
            }
            if length > MAX_BODY {
                return None;
            }
            let start = end + 4;
            if buf.len() >= start + length {
                let body = buf[start..start + length].to_vec();
                buf.drain(..start + length);
                return Some(Request {
                    method,
                    path,
                    http10,
                    close,
                    body,
                });
            }
        } else if buf.len() > MAX_HEAD {
            return None;
        }
        conn.sock.readable().await.ok()?;
        let mut tmp = [0u8; 16384];
        match conn.sock.try_read(&mut tmp) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
    }
}

fn json_response(status: u16, reason: &str, body: &str, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\n{connection}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What one request is answered with, in the fake's OpenAI format.
struct Answer {
    id: String,
    created: u64,
    model: String,
    pace: Pace,
    tokens: u32,
    finish: &'static str,
    include_usage: bool,
    prompt_tokens: u64,
}

impl Answer {
    fn of(body: &[u8], n: u64, defaults: Pace) -> Self {
        let pace = Pace::from_marker(body).unwrap_or(defaults);
        let limit =
            field_u64(body, "max_completion_tokens").or_else(|| field_u64(body, "max_tokens"));
        // As the fake does: an answer as long as the limit, or longer, is cut to it ("length").
        let (tokens, finish) = match limit {
            Some(limit) if u64::from(pace.tokens) >= limit => (limit as u32, "length"),
            _ => (pace.tokens, "stop"),
        };
        Self {
            id: format!("chatcmpl-pacer{n:08}"),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: field_str(body, "model").map_or_else(
                || "gpt-4o-mini".to_owned(),
                |m| String::from_utf8_lossy(m).into_owned(),
            ),
            pace,
            tokens,
            finish,
            include_usage: field_is_true(body, "include_usage"),
            prompt_tokens: content_words(body),
        }
    }

    fn common(&self) -> String {
        format!(
            r#""id":"{}","object":"chat.completion.chunk","created":{},"model":"{}","service_tier":"default","system_fingerprint":"fp_fake""#,
            self.id, self.created, self.model
        )
    }

    fn chunk(&self, delta: &str, finish: &str) -> String {
        let usage = if self.include_usage {
            r#","usage":null"#
        } else {
            ""
        };
        format!(
            r#"data: {{{},"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]{usage}}}"#,
            self.common()
        ) + "\n\n"
    }

    fn role_chunk(&self) -> Vec<u8> {
        self.chunk(
            r#"{"role":"assistant","content":"","refusal":null}"#,
            "null",
        )
        .into_bytes()
    }

    /// A token's event, split where its JSON string goes.
    fn delta_parts(&self) -> (Vec<u8>, Vec<u8>) {
        let whole = self.chunk(r#"{"content":@}"#, "null");
        let (prefix, suffix) = whole.split_once('@').expect("the placeholder");
        (prefix.as_bytes().to_vec(), suffix.as_bytes().to_vec())
    }

    fn usage(&self) -> String {
        let (p, c) = (self.prompt_tokens, u64::from(self.tokens));
        format!(
            r#"{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#,
            p + c
        )
    }

    fn tail(&self) -> Vec<u8> {
        let mut out = self.chunk("{}", &format!("\"{}\"", self.finish));
        if self.include_usage {
            out += &format!(
                "data: {{{},\"choices\":[],\"usage\":{}}}\n\n",
                self.common(),
                self.usage()
            );
        }
        out += "data: [DONE]\n\n";
        out.into_bytes()
    }

    /// The non-streamed answer (not paced: at once).
    fn message(&self) -> String {
        format!(
            r#"{{"id":"{}","object":"chat.completion","created":{},"model":"{}","choices":[{{"index":0,"message":{{"role":"assistant","content":"pacer","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{},"service_tier":"default","system_fingerprint":"fp_fake"}}"#,
            self.id,
            self.created,
            self.model,
            self.usage()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi there [pace 33000us x2]"}],"max_tokens":1000,"stream":true,"stream_options":{"include_usage":true}}"#;

    #[test]
    fn marker_round_trip() {
        let pace = Pace {
            period_us: 33_000,
            tokens: 120,
        };
        assert_eq!(
            Pace::from_marker(format!("x {} y", pace.marker()).as_bytes()),
            Some(pace)
        );
        assert_eq!(Pace::from_marker(b"no marker"), None);
    }

    /// Byte for byte what tests/fake_upstream.py sends (a capture of it, `created` aside).
    #[test]
    fn the_fakes_wire_format() {
        let mut a = Answer::of(
            BODY,
            1,
            Pace {
                period_us: 1_000,
                tokens: 1,
            },
        );
        a.created = 1_796_165_890;
        a.id = "chatcmpl-fake00000001".into();
        let common = r#"{"id":"chatcmpl-fake00000001","object":"chat.completion.chunk","created":1796165890,"model":"gpt-4o-mini","service_tier":"default","system_fingerprint":"fp_fake","#;
        assert_eq!(
            String::from_utf8(a.role_chunk()).unwrap(),
            format!(
                "data: {common}\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            )
        );
        let (prefix, suffix) = a.delta_parts();
        let delta = [prefix, b"\" 17\"".to_vec(), suffix].concat();
        assert_eq!(
            String::from_utf8(delta).unwrap(),
            format!(
                "data: {common}\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" 17\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            )
        );
        assert_eq!(a.tokens, 2);
        assert_eq!(a.prompt_tokens, 5);
        assert_eq!(
            String::from_utf8(a.tail()).unwrap(),
            format!(
                "data: {common}\"choices\":[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null}}\n\n\
                 data: {common}\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7,\"prompt_tokens_details\":{{\"cached_tokens\":0,\"audio_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}}}\n\n\
                 data: [DONE]\n\n"
            )
        );
    }

    #[test]
    fn a_limit_cuts_like_the_fake() {
        let body = br#"{"max_tokens":5,"messages":[{"content":"[pace 33000us x5]"}]}"#;
        let a = Answer::of(
            body,
            1,
            Pace {
                period_us: 1_000,
                tokens: 1,
            },
        );
        assert_eq!((a.tokens, a.finish), (5, "length"));
        assert!(!a.include_usage);
        assert!(!String::from_utf8(a.tail()).unwrap().contains("usage"));
    }

    #[test]
    fn chunk_sizes_in_hex() {
        for len in [0, 1, 15, 16, 0x10f, 0x2ca, 0xffff_ffff] {
            let mut out = Vec::new();
            chunk_size(&mut out, len);
            assert_eq!(out, format!("{len:x}\r\n").into_bytes());
        }
    }

    #[test]
    fn decimal_digits() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(u64::MAX, &mut b), u64::MAX.to_string().as_bytes());
    }
}
