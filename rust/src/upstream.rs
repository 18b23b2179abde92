//! Parsing a provider's streamed response body (`openai`: chat completions,
//! `anthropic`: messages) as it arrives off the socket: bytes in, text deltas
//! and totals out.
//!
//! Two layers. [`EventStream`] is the WHATWG "event stream interpretation"
//! (CR, LF and CRLF line ends, `field: value` with one optional space removed,
//! `data` lines joined with LF, dispatch on a blank line, comments ignored, a
//! leading BOM dropped). It keeps only the unfinished line between feeds and
//! scans every byte once, so a long line arriving in many small pieces costs
//! O(n), not O(n²). [`UpstreamState`] reads each dispatched event's JSON into
//! borrowed structs that name only the fields we need (serde skips the rest
//! without building them).
//!
//! Chunks may split anywhere, even inside a UTF-8 sequence: line ends are ASCII,
//! so a complete line is valid UTF-8 or the stream is broken, and an
//! unfinished line is only checked once it is complete.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};
use serde::Deserialize as DeriveDeserialize;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

// ---------------------------------------------------------------------------
// Plain Rust: errors
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Anthropic,
}

impl Provider {
    pub fn parse(kind: &str) -> Option<Self> {
        match kind {
            "openai" => Some(Self::OpenAi),
            "anthropic" => Some(Self::Anthropic),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
        }
    }
}

/// What was wrong with the stream. Positions are `serde_json`'s line/column in
/// the event's data; the messages never quote the body, which may hold the
/// user's conversation and ends up in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    InvalidUtf8 {
        provider: Provider,
    },
    BadJson {
        provider: Provider,
        line: usize,
        column: usize,
    },
    BadShape {
        provider: Provider,
        line: usize,
        column: usize,
    },
    /// An Anthropic `text_delta` whose `text` is missing or not a string.
    TextNotString {
        provider: Provider,
    },
    /// More than `MAX_BUFFERED` bytes of an unfinished line or event: no real
    /// provider sends that, and holding it would let one upstream grow our memory.
    TooLong {
        provider: Provider,
    },
}

/// The most an unfinished line plus an undispatched event may hold.
pub const MAX_BUFFERED: usize = 4 << 20;

impl UpstreamError {
    fn from_json(provider: Provider, err: &serde_json::Error) -> Self {
        let (line, column) = (err.line(), err.column());
        match err.classify() {
            serde_json::error::Category::Data => Self::BadShape {
                provider,
                line,
                column,
            },
            _ => Self::BadJson {
                provider,
                line,
                column,
            },
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::InvalidUtf8 { provider } => {
                write!(f, "{} stream is not valid UTF-8", provider.name())
            }
            Self::BadJson {
                provider,
                line,
                column,
            } => write!(
                f,
                "{} stream event data is not valid JSON (line {line}, column {column})",
                provider.name()
            ),
            Self::BadShape {
                provider,
                line,
                column,
            } => write!(
                f,
                "{} stream event data has an unexpected shape (line {line}, column {column})",
                provider.name()
            ),
            Self::TextNotString { provider } => write!(
                f,
                "{} stream text delta has no string text",
                provider.name()
            ),
            Self::TooLong { provider } => write!(
                f,
                "{} stream holds an event longer than {MAX_BUFFERED} bytes",
                provider.name()
            ),
        }
    }
}

impl std::error::Error for UpstreamError {}

// ---------------------------------------------------------------------------
// Plain Rust: the WHATWG event stream
// ---------------------------------------------------------------------------

const BOM: &[u8] = b"\xef\xbb\xbf";

/// Whether the caller wants more events after this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

#[derive(Debug, Default)]
pub struct EventStream {
    /// The unfinished line carried over to the next feed (before the BOM check,
    /// the first bytes of the stream).
    pending: Vec<u8>,
    /// The last line ended with CR: an LF at the start of the next feed belongs
    /// to it.
    after_cr: bool,
    bom_checked: bool,
    data: String,
    event: String,
}

impl EventStream {
    /// Bytes held for an event not yet complete.
    pub fn buffered(&self) -> usize {
        self.pending.len() + self.data.len() + self.event.len()
    }

    /// Feeds `chunk`; calls `on_event(type, data)` for every event it completes.
    /// `type` is the `event` field, or `"message"` when there was none. Stops
    /// (dropping the rest of the chunk) when `on_event` says so or fails.
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        mut on_event: impl FnMut(&str, &str) -> Result<Flow, E>,
        invalid_utf8: impl Fn() -> E,
    ) -> Result<Flow, E> {
        if !self.bom_checked {
            self.pending.extend_from_slice(chunk);
            if self.pending.len() < BOM.len() && BOM.starts_with(&self.pending) {
                return Ok(Flow::Continue);
            }
            self.bom_checked = true;
            let first = std::mem::take(&mut self.pending);
            let rest = first.strip_prefix(BOM).unwrap_or(&first);
            return self.feed_lines(rest, &mut on_event, &invalid_utf8);
        }
        self.feed_lines(chunk, &mut on_event, &invalid_utf8)
    }

    fn feed_lines<E>(
        &mut self,
        chunk: &[u8],
        on_event: &mut impl FnMut(&str, &str) -> Result<Flow, E>,
        invalid_utf8: &impl Fn() -> E,
    ) -> Result<Flow, E> {
        let mut pos = 0;
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                pos = 1;
            }
        }
        // Only the new bytes are searched; `pending` never is again.
        while let Some(offset) = memchr::memchr2(b'\r', b'\n', &chunk[pos..]) {
            let end = pos + offset;
            let flow = if self.pending.is_empty() {
                let line = std::str::from_utf8(&chunk[pos..end]).map_err(|_| invalid_utf8())?;
                Self::line(&mut self.data, &mut self.event, line, on_event)?
            } else {
                self.pending.extend_from_slice(&chunk[pos..end]);
                let line = std::str::from_utf8(&self.pending).map_err(|_| invalid_utf8())?;
                let flow = Self::line(&mut self.data, &mut self.event, line, on_event)?;
                self.pending.clear();
                flow
            };
            if flow == Flow::Stop {
                return Ok(Flow::Stop);
            }
            pos = end + 1;
            if chunk[end] == b'\r' {
                match chunk.get(pos) {
                    Some(b'\n') => pos += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.pending.extend_from_slice(&chunk[pos..]);
        Ok(Flow::Continue)
    }

    fn line<E>(
        data: &mut String,
        event: &mut String,
        line: &str,
        on_event: &mut impl FnMut(&str, &str) -> Result<Flow, E>,
    ) -> Result<Flow, E> {
        if line.is_empty() {
            if data.is_empty() {
                event.clear();
                return Ok(Flow::Continue);
            }
            data.pop(); // the LF after the last data line
            let kind = if event.is_empty() {
                "message"
            } else {
                event.as_str()
            };
            let flow = on_event(kind, data);
            data.clear();
            event.clear();
            return flow;
        }
        if line.starts_with(':') {
            return Ok(Flow::Continue);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "event" => {
                event.clear();
                event.push_str(value);
            }
            // `id` and `retry` matter to a reconnecting browser, not to a relay.
            _ => {}
        }
        Ok(Flow::Continue)
    }
}

// ---------------------------------------------------------------------------
// Plain Rust: the providers' events
// ---------------------------------------------------------------------------

/// Deserialises `T` only from a JSON object. `serde_json` otherwise also fills a
/// struct from an array, by position, which would read `["x"]` as a delta.
struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Obj)
            }
        }
        deserializer.deserialize_map(ObjVisitor(PhantomData))
    }
}

/// The first element of an array, the rest skipped without being built (no
/// `Vec` for `choices`).
struct First<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for First<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FirstVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for FirstVisitor<T> {
            type Value = First<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(First(first))
            }
        }
        deserializer.deserialize_seq(FirstVisitor(PhantomData))
    }
}

/// A string, or any other JSON value (skipped). For fields whose type only
/// matters in one case, e.g. `text` of a `text_delta`, so that an unknown
/// delta type with a non-string `text` is not an error.
enum MaybeStr<'a> {
    Str(Cow<'a, str>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for MaybeStr<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MaybeStrVisitor;
        impl<'de> Visitor<'de> for MaybeStrVisitor {
            type Value = MaybeStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MaybeStr::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MaybeStr::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(MaybeStr::Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeStr::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeStr::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeStr::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeStr::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(MaybeStr::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeStr::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeStr::Other)
            }
        }
        deserializer.deserialize_any(MaybeStrVisitor)
    }
}

impl<'a> MaybeStr<'a> {
    fn into_str(self) -> Option<Cow<'a, str>> {
        match self {
            Self::Str(s) => Some(s),
            Self::Other => None,
        }
    }
}

type Text<'a> = Option<Cow<'a, str>>;

#[derive(DeriveDeserialize)]
struct OpenAiChunk<'a> {
    #[serde(borrow, default)]
    choices: Option<First<Obj<OpenAiChoice<'a>>>>,
    #[serde(default)]
    usage: Option<Obj<OpenAiUsage>>,
    #[serde(borrow, default)]
    error: Option<Obj<ErrorBody<'a>>>,
}

#[derive(DeriveDeserialize)]
struct OpenAiChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<Obj<OpenAiDelta<'a>>>,
    #[serde(borrow, default)]
    finish_reason: Text<'a>,
}

#[derive(DeriveDeserialize)]
struct OpenAiDelta<'a> {
    #[serde(borrow, default)]
    content: Text<'a>,
}

#[derive(DeriveDeserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// `openai`'s `{"error": {...}}` and `anthropic`'s `{"type":"error","error":{...}}`.
#[derive(DeriveDeserialize)]
struct ErrorBody<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<MaybeStr<'a>>,
    #[serde(borrow, default)]
    code: Option<MaybeStr<'a>>,
    #[serde(borrow, default)]
    message: Option<MaybeStr<'a>>,
}

impl ErrorBody<'_> {
    /// `(type or code or "error", message or "")`, where only non-empty strings
    /// count: error bodies are the one place to be lenient, since failing to
    /// parse one would hide the provider's reason.
    fn pair(self) -> (String, String) {
        fn text(v: Option<MaybeStr<'_>>) -> Option<Cow<'_, str>> {
            v.and_then(MaybeStr::into_str).filter(|s| !s.is_empty())
        }
        let kind = text(self.kind)
            .or_else(|| text(self.code))
            .map_or_else(|| "error".to_owned(), Cow::into_owned);
        let message = text(self.message).map_or_else(String::new, Cow::into_owned);
        (kind, message)
    }
}

#[derive(DeriveDeserialize)]
struct AnthropicType<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<MaybeStr<'a>>,
}

#[derive(DeriveDeserialize)]
struct MessageStart {
    #[serde(default)]
    message: Option<Obj<MessageStartBody>>,
}

#[derive(DeriveDeserialize)]
struct MessageStartBody {
    #[serde(default)]
    usage: Option<Obj<AnthropicUsage>>,
}

#[derive(DeriveDeserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

#[derive(DeriveDeserialize)]
struct BlockDelta<'a> {
    #[serde(borrow, default)]
    delta: Option<Obj<BlockDeltaBody<'a>>>,
}

#[derive(DeriveDeserialize)]
struct BlockDeltaBody<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<MaybeStr<'a>>,
    #[serde(borrow, default)]
    text: Option<MaybeStr<'a>>,
}

#[derive(DeriveDeserialize)]
struct MessageDelta<'a> {
    #[serde(borrow, default)]
    delta: Option<Obj<MessageDeltaBody<'a>>>,
    #[serde(default)]
    usage: Option<Obj<AnthropicUsage>>,
}

#[derive(DeriveDeserialize)]
struct MessageDeltaBody<'a> {
    #[serde(borrow, default)]
    stop_reason: Text<'a>,
}

#[derive(DeriveDeserialize)]
struct AnthropicError<'a> {
    #[serde(borrow, default)]
    error: Option<Obj<ErrorBody<'a>>>,
}

/// What the stream said so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub done: bool,
    pub finish_reason: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `output_tokens` came where a provider puts its final count (`openai`'s
    /// usage chunk, Anthropic's `message_delta`), not from `message_start`,
    /// whose `output_tokens` is a placeholder (1, or 0 from llama.cpp).
    pub output_final: bool,
    pub error: Option<(String, String)>,
}

/// One provider stream: the event layer plus what its events said.
#[derive(Debug)]
pub struct UpstreamState {
    provider: Provider,
    events: EventStream,
    totals: Totals,
    /// A malformed stream stays failed: later feeds report the same error
    /// rather than resynchronising somewhere in the middle of it.
    failed: Option<UpstreamError>,
    /// The UTF-8 bytes of every delta handed out: the server's own count of
    /// the output when the provider reports none (`usage.rs`).
    text_bytes: u64,
}

fn json<'a, T: Deserialize<'a>>(provider: Provider, data: &'a str) -> Result<T, UpstreamError> {
    serde_json::from_str::<Obj<T>>(data)
        .map(|obj| obj.0)
        .map_err(|e| UpstreamError::from_json(provider, &e))
}

impl UpstreamState {
    pub fn new(provider: Provider) -> Self {
        Self {
            provider,
            events: EventStream::default(),
            totals: Totals::default(),
            failed: None,
            text_bytes: 0,
        }
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// The UTF-8 bytes of the text deltas handed out so far.
    pub fn text_bytes(&self) -> u64 {
        self.text_bytes
    }

    /// Feeds the next bytes of the body; calls `on_delta` with every non-empty
    /// text delta of the events they complete, in order. After the end marker
    /// or an in-stream error, the rest is ignored.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on_delta: impl FnMut(&str),
    ) -> Result<(), UpstreamError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        if self.totals.done {
            return Ok(());
        }
        let provider = self.provider;
        let totals = &mut self.totals;
        let text_bytes = &mut self.text_bytes;
        // Counted here, where each delta passes anyway: no crossing and no pass over the text.
        let mut on_delta = |text: &str| {
            *text_bytes += text.len() as u64;
            on_delta(text);
        };
        let result = self.events.feed(
            chunk,
            |kind, data| {
                match provider {
                    Provider::OpenAi => openai_event(totals, data, &mut on_delta)?,
                    Provider::Anthropic => anthropic_event(totals, kind, data, &mut on_delta)?,
                }
                Ok(if totals.done {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            },
            || UpstreamError::InvalidUtf8 { provider },
        );
        let result = result.and_then(|_| {
            if self.events.buffered() > MAX_BUFFERED {
                Err(UpstreamError::TooLong { provider })
            } else {
                Ok(())
            }
        });
        if let Err(err) = result {
            self.failed = Some(err);
        }
        result
    }
}

fn push_text(text: Option<Cow<'_, str>>, on_delta: &mut impl FnMut(&str)) {
    if let Some(text) = text.filter(|t| !t.is_empty()) {
        on_delta(&text);
    }
}

/// `openai` names no event types; every event is a chunk, an error or `[DONE]`.
fn openai_event(
    totals: &mut Totals,
    data: &str,
    on_delta: &mut impl FnMut(&str),
) -> Result<(), UpstreamError> {
    if data == "[DONE]" {
        totals.done = true;
        return Ok(());
    }
    let chunk: OpenAiChunk<'_> = json(Provider::OpenAi, data)?;
    if let Some(Obj(error)) = chunk.error {
        totals.error = Some(error.pair());
        totals.done = true;
        return Ok(());
    }
    if let Some(Obj(choice)) = chunk.choices.and_then(|first| first.0) {
        push_text(choice.delta.and_then(|d| d.0.content), on_delta);
        if let Some(reason) = choice.finish_reason {
            totals.finish_reason = Some(reason.into_owned());
        }
    }
    if let Some(Obj(usage)) = chunk.usage {
        if let Some(n) = usage.prompt_tokens {
            totals.input_tokens = n;
        }
        if let Some(n) = usage.completion_tokens {
            totals.output_tokens = n;
            totals.output_final = true;
        }
    }
    Ok(())
}

fn anthropic_usage(totals: &mut Totals, usage: Option<Obj<AnthropicUsage>>, last: bool) {
    if let Some(Obj(usage)) = usage {
        if let Some(n) = usage.input_tokens {
            totals.input_tokens = n;
        }
        if let Some(n) = usage.output_tokens {
            totals.output_tokens = n;
            totals.output_final = last;
        }
    }
}

/// Dispatches on the `event` field, or on the data's own `type` without one.
fn anthropic_event(
    totals: &mut Totals,
    kind: &str,
    data: &str,
    on_delta: &mut impl FnMut(&str),
) -> Result<(), UpstreamError> {
    const P: Provider = Provider::Anthropic;
    let own_type;
    let kind = if kind == "message" {
        own_type = json::<AnthropicType<'_>>(P, data)?.kind;
        match &own_type {
            Some(MaybeStr::Str(s)) => s.as_ref(),
            _ => "",
        }
    } else {
        kind
    };
    match kind {
        "content_block_delta" => {
            let Some(Obj(delta)) = json::<BlockDelta<'_>>(P, data)?.delta else {
                return Ok(());
            };
            if matches!(&delta.kind, Some(MaybeStr::Str(k)) if k == "text_delta") {
                let text = delta.text.and_then(MaybeStr::into_str);
                if text.is_none() {
                    return Err(UpstreamError::TextNotString { provider: P });
                }
                push_text(text, on_delta);
            }
        }
        "message_start" => {
            let start: MessageStart = json(P, data)?;
            anthropic_usage(totals, start.message.and_then(|m| m.0.usage), false);
        }
        "message_delta" => {
            let delta: MessageDelta<'_> = json(P, data)?;
            if let Some(reason) = delta.delta.and_then(|d| d.0.stop_reason) {
                totals.finish_reason = Some(reason.into_owned());
            }
            anthropic_usage(totals, delta.usage, true);
        }
        "message_stop" => {
            json::<IgnoredAny>(P, data)?;
            totals.done = true;
        }
        "error" => {
            let error: AnthropicError<'_> = json(P, data)?;
            totals.error = Some(
                error
                    .error
                    .map_or_else(|| ("error".to_owned(), String::new()), |e| e.0.pair()),
            );
            totals.done = true;
        }
        // ping, content_block_start/stop and types yet to come: checked to be
        // JSON objects like every payload, otherwise ignored.
        _ => {
            json::<IgnoredAny>(P, data)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Python layer
// ---------------------------------------------------------------------------

pyo3::create_exception!(
    pwachat._native,
    UpstreamFormatError,
    PyValueError,
    "A provider stream is malformed (bad JSON, wrong shape, invalid UTF-8); never echoes the body."
);

impl From<UpstreamError> for PyErr {
    fn from(err: UpstreamError) -> Self {
        UpstreamFormatError::new_err(err.to_string())
    }
}

/// Reads one provider response body, fed as it arrives. Not frozen: `feed`
/// mutates, and one stream belongs to one task.
#[pyclass(module = "pwachat._native")]
pub struct UpstreamParser {
    state: UpstreamState,
}

#[pymethods]
impl UpstreamParser {
    #[new]
    fn new(kind: &str) -> PyResult<Self> {
        let provider = Provider::parse(kind).ok_or_else(|| {
            PyValueError::new_err("upstream kind must be \"openai\" or \"anthropic\"")
        })?;
        Ok(Self {
            state: UpstreamState::new(provider),
        })
    }

    /// The text deltas of the events this chunk completes, as `str`s made
    /// straight from the borrowed JSON strings.
    ///
    /// When a malformed event follows good ones in the same chunk, the good
    /// ones' deltas are still returned (they arrived first and belong to the
    /// client) and `failed` turns true; the next `feed` raises.
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyList>> {
        let mut deltas = Vec::new();
        let result = self
            .state
            .feed(data, |text| deltas.push(PyString::new(py, text)));
        match result {
            Err(err) if deltas.is_empty() => Err(err.into()),
            _ => PyList::new(py, deltas),
        }
    }

    /// The stream was found malformed; `feed` raises from now on.
    #[getter]
    fn failed(&self) -> bool {
        self.state.is_failed()
    }

    #[getter]
    fn done(&self) -> bool {
        self.state.totals().done
    }

    #[getter]
    fn finish_reason(&self) -> Option<&str> {
        self.state.totals().finish_reason.as_deref()
    }

    #[getter]
    fn input_tokens(&self) -> u64 {
        self.state.totals().input_tokens
    }

    #[getter]
    fn output_tokens(&self) -> u64 {
        self.state.totals().output_tokens
    }

    /// `output_tokens` is the provider's final count, not `message_start`'s placeholder.
    #[getter]
    fn output_final(&self) -> bool {
        self.state.totals().output_final
    }

    /// `estimate_output_tokens` of the text of every delta returned so far.
    #[getter]
    fn estimated_output_tokens(&self) -> u64 {
        crate::usage::output_tokens(self.state.text_bytes())
    }

    #[getter]
    fn error(&self) -> Option<(&str, &str)> {
        self.state
            .totals()
            .error
            .as_ref()
            .map(|(kind, message)| (kind.as_str(), message.as_str()))
    }

    fn __repr__(&self) -> String {
        let totals = self.state.totals();
        let finish_reason = totals
            .finish_reason
            .as_ref()
            .map_or_else(|| "None".to_owned(), |r| format!("{r:?}"));
        format!(
            "UpstreamParser({:?}, done={}, finish_reason={finish_reason}, input_tokens={}, output_tokens={})",
            self.state.provider().name(),
            if totals.done { "True" } else { "False" },
            totals.input_tokens,
            totals.output_tokens,
        )
    }
}

pub fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add(
        "UpstreamFormatError",
        m.py().get_type::<UpstreamFormatError>(),
    )?;
    m.add_class::<UpstreamParser>()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded `gpt-4o-mini` stream (ids shortened), with the optional usage chunk.
    const OPENAI: &str = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" w\u{f6}rld \\\"\\ud83d\\ude00\\\"\\n\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\u{1f600}\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n",
        "data: [DONE]\n\n",
    );

    /// A recorded `claude` stream, CRLF line ends as some proxies send them.
    const ANTHROPIC: &str = concat!(
        "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n",
        "event: content_block_start\r\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\r\n\r\n",
        "event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n",
        "event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\r\n\r\n",
        "event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\"}}\r\n\r\n",
        "event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"text\":\" w\u{f6}rld\\r\\n\\u00e9\",\"type\":\"text_delta\"}}\r\n\r\n",
        "event: content_block_stop\r\ndata: {\"type\":\"content_block_stop\",\"index\":0}\r\n\r\n",
        "event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\r\n\r\n",
        "event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n",
    );

    fn run(provider: Provider, chunks: &[&[u8]]) -> Result<(Vec<String>, Totals), UpstreamError> {
        let mut state = UpstreamState::new(provider);
        let mut deltas = Vec::new();
        for chunk in chunks {
            state.feed(chunk, |d| deltas.push(d.to_owned()))?;
        }
        Ok((deltas, state.totals().clone()))
    }

    fn whole(provider: Provider, body: &str) -> Result<(Vec<String>, Totals), UpstreamError> {
        run(provider, &[body.as_bytes()])
    }

    fn totals(reason: &str, input: u64, output: u64) -> Totals {
        Totals {
            done: true,
            finish_reason: Some(reason.to_owned()),
            input_tokens: input,
            output_tokens: output,
            output_final: true,
            error: None,
        }
    }

    #[test]
    fn openai_recorded_stream() {
        let (deltas, got) = whole(Provider::OpenAi, OPENAI).unwrap();
        assert_eq!(deltas, ["Hello", " wörld \"😀\"\n", "😀"]);
        assert_eq!(got, totals("stop", 9, 12));
    }

    #[test]
    fn anthropic_recorded_stream() {
        let (deltas, got) = whole(Provider::Anthropic, ANTHROPIC).unwrap();
        assert_eq!(deltas, ["Hello", " wörld\r\né"]);
        assert_eq!(got, totals("end_turn", 25, 15));
    }

    #[test]
    fn message_start_output_is_a_placeholder_until_message_delta() {
        let start = ANTHROPIC
            .split("event: content_block_start")
            .next()
            .unwrap();
        let (_, got) = whole(Provider::Anthropic, start).unwrap();
        assert_eq!((got.input_tokens, got.output_tokens), (25, 1));
        assert!(!got.output_final);
        // A message_delta without usage (some compatible servers) leaves it a placeholder.
        let body = format!(
            "{start}event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}}}}\n\n"
        );
        let (_, got) = whole(Provider::Anthropic, &body).unwrap();
        assert_eq!((got.output_tokens, got.output_final), (1, false));
        // OpenAI's usage chunk is its final count; a chunk without one is not.
        let (_, got) = whole(
            Provider::OpenAi,
            "data: {\"choices\":[],\"usage\":null}\n\n",
        )
        .unwrap();
        assert!(!got.output_final);
        let (_, got) = whole(Provider::OpenAi, OPENAI).unwrap();
        assert!(got.output_final);
    }

    #[test]
    fn the_bytes_of_the_deltas_handed_out_are_counted_at_every_split() {
        for (provider, body) in [(Provider::OpenAi, OPENAI), (Provider::Anthropic, ANTHROPIC)] {
            let (deltas, _) = whole(provider, body).unwrap();
            let expected: usize = deltas.iter().map(String::len).sum();
            for split in 0..=body.len() {
                let mut state = UpstreamState::new(provider);
                state.feed(&body.as_bytes()[..split], |_| {}).unwrap();
                state.feed(&body.as_bytes()[split..], |_| {}).unwrap();
                assert_eq!(state.text_bytes(), expected as u64, "split at {split}");
            }
        }
        // Nothing after the end marker is read, nor counted.
        let mut state = UpstreamState::new(Provider::OpenAi);
        let body =
            format!("{OPENAI}data: {{\"choices\":[{{\"delta\":{{\"content\":\"x\"}}}}]}}\n\n");
        state.feed(body.as_bytes(), |_| {}).unwrap();
        assert_eq!(state.text_bytes(), "Hello wörld \"😀\"\n😀".len() as u64);
    }

    #[test]
    fn every_split_point_and_every_byte_alone_give_the_same_result() {
        for (provider, body) in [(Provider::OpenAi, OPENAI), (Provider::Anthropic, ANTHROPIC)] {
            let bytes = body.as_bytes();
            let expected = whole(provider, body).unwrap();
            for i in 0..=bytes.len() {
                let (a, b) = bytes.split_at(i);
                assert_eq!(run(provider, &[a, b]).unwrap(), expected, "split at {i}");
            }
            let singles: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(run(provider, &singles).unwrap(), expected);
        }
    }

    #[test]
    fn crlf_split_across_feeds_is_one_line_end() {
        let chunks: [&[u8]; 4] = [b"data: [DO", b"NE]\r", b"\n\r", b"\n"];
        let (_, got) = run(Provider::OpenAi, &chunks).unwrap();
        assert!(got.done);
        // A lone CR followed by a non-LF byte in the next feed.
        let chunks: [&[u8]; 3] = [
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r",
            b"\r",
            b"data: [DONE]\r\r",
        ];
        let (deltas, got) = run(Provider::OpenAi, &chunks).unwrap();
        assert_eq!(deltas, ["a"]);
        assert!(got.done);
        // CR, then an empty feed, then LF: still one line end, not a blank line.
        let mut state = UpstreamState::new(Provider::OpenAi);
        for chunk in [b"data: [DONE]\r" as &[u8], b"", b"\n"] {
            state.feed(chunk, |_| {}).unwrap();
        }
        assert!(!state.totals().done);
        state.feed(b"\n", |_| {}).unwrap();
        assert!(state.totals().done);
    }

    #[test]
    fn bom_only_at_the_very_start_and_possibly_split() {
        let body = "\u{feff}data: [DONE]\n\n".as_bytes();
        for i in 0..=4 {
            let (a, b) = body.split_at(i);
            assert!(
                run(Provider::OpenAi, &[a, b]).unwrap().1.done,
                "split at {i}"
            );
        }
        // A second BOM is part of the field name, which is then unknown.
        let body = "\u{feff}\u{feff}data: [DONE]\n\n";
        assert!(!whole(Provider::OpenAi, body).unwrap().1.done);
        // The BOM's first bytes followed by something else are kept (U+FEC0).
        let (_, got) = whole(Provider::OpenAi, "\u{fec0}: c\ndata: [DONE]\n\n").unwrap();
        assert!(got.done);
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        let body = "data: {\"choices\":\ndata:[{\"delta\":\ndata: {\"content\":\"x\"}}]}\n\ndata:[DONE]\n\n";
        let (deltas, got) = whole(Provider::OpenAi, body).unwrap();
        assert_eq!(deltas, ["x"]);
        assert!(got.done);
    }

    #[test]
    fn comments_fields_without_colon_and_unknown_fields_are_ignored() {
        let body = ": keep-alive\nid: 4\nretry: 10\nnonsense\n\n:\n\ndata\n\n";
        // `data` alone is a data line with an empty value: an event with empty
        // data, which is not JSON.
        assert!(matches!(
            whole(Provider::OpenAi, body),
            Err(UpstreamError::BadJson { .. })
        ));
        let body = ": keep-alive\nid: 4\nretry: 10\nnonsense\n\n:\n\nevent: x\n\ndata: [DONE]\n\n";
        assert!(whole(Provider::OpenAi, body).unwrap().1.done);
    }

    #[test]
    fn one_space_after_the_colon_is_removed_not_two() {
        let body = "event:  message_stop\ndata: {}\n\nevent:message_stop\ndata:{}\n\n";
        let (_, got) = whole(Provider::Anthropic, body).unwrap();
        assert!(got.done);
        let mut state = UpstreamState::new(Provider::Anthropic);
        state
            .feed(b"event:  message_stop\ndata: {}\n\n", |_| {})
            .unwrap();
        assert!(!state.totals().done);
    }

    #[test]
    fn nothing_after_the_end_marker_is_read() {
        let body = b"data: [DONE]\n\ndata: {not json\n\n\xff\xfe";
        let (deltas, got) = run(
            Provider::OpenAi,
            &[
                body,
                b"data: {\"choices\":[{\"delta\":{\"content\":\"late\"}}]}\n\n",
            ],
        )
        .unwrap();
        assert!(deltas.is_empty());
        assert!(got.done);
        let body = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\nevent: content_block_delta\ndata: {\"delta\":{\"type\":\"text_delta\",\"text\":\"late\"}}\n\n";
        let (deltas, got) = whole(Provider::Anthropic, body).unwrap();
        assert!(deltas.is_empty());
        assert!(got.done);
    }

    #[test]
    fn unfinished_event_is_not_dispatched() {
        let (deltas, got) = whole(
            Provider::OpenAi,
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n",
        )
        .unwrap();
        assert!(deltas.is_empty());
        assert!(!got.done);
    }

    #[test]
    fn anthropic_error_event() {
        let body = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"details\":null,\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"late\"}}\n\n";
        let (deltas, got) = whole(Provider::Anthropic, body).unwrap();
        assert_eq!(deltas, ["Hi"]);
        assert!(got.done);
        assert_eq!(
            got.error,
            Some(("overloaded_error".to_owned(), "Overloaded".to_owned()))
        );
    }

    #[test]
    fn openai_error_chunk() {
        let cases = [
            (
                r#"{"error":{"message":"Rate limit","type":"requests","code":"rate_limit_exceeded"}}"#,
                ("requests", "Rate limit"),
            ),
            (
                r#"{"error":{"message":"Bad","type":null,"code":"server_error"}}"#,
                ("server_error", "Bad"),
            ),
            (
                r#"{"error":{"message":"Bad","type":"","code":null}}"#,
                ("error", "Bad"),
            ),
            (r#"{"error":{"code":500}}"#, ("error", "")),
        ];
        for (data, (kind, message)) in cases {
            let (_, got) = whole(Provider::OpenAi, &format!("data: {data}\n\n")).unwrap();
            assert!(got.done);
            assert_eq!(got.error, Some((kind.to_owned(), message.to_owned())));
        }
        // `"error": null` is no error.
        let (_, got) = whole(
            Provider::OpenAi,
            "data: {\"error\":null,\"choices\":[]}\n\n",
        )
        .unwrap();
        assert!(!got.done);
        assert_eq!(got.error, None);
    }

    #[test]
    fn anthropic_type_from_data_when_no_event_field() {
        let body = concat!(
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
            "data: {\"delta\":{\"type\":\"text_delta\",\"text\":\"x\"},\"type\":\"content_block_delta\"}\n\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"input_tokens\":4,\"output_tokens\":7}}\n\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        let (deltas, got) = whole(Provider::Anthropic, body).unwrap();
        assert_eq!(deltas, ["x"]);
        assert_eq!(got, totals("max_tokens", 4, 7));
    }

    #[test]
    fn anthropic_unknown_events_and_delta_types_are_ignored() {
        let body = concat!(
            "event: brand_new\ndata: {\"type\":\"brand_new\",\"delta\":[1,2],\"text\":5}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hm\",\"text\":{\"a\":[1]}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"\"}}\n\n",
        );
        let (deltas, got) = whole(Provider::Anthropic, body).unwrap();
        assert!(deltas.is_empty());
        assert!(!got.done);
    }

    #[test]
    fn malformed_payloads_are_refused_without_echoing_them() {
        let openai = [
            "{\"choices\":[{\"delta\":{\"content\":\"secret\"}}]",
            "[\"secret\"]",
            "\"secret\"",
            "",
            "{\"choices\":[{\"delta\":{\"content\":7}}]}",
            "{\"choices\":[{\"delta\":[\"secret\"]}]}",
            "{\"choices\":{\"secret\":1}}",
            "{\"usage\":{\"prompt_tokens\":-1}}",
            "{\"usage\":{\"prompt_tokens\":\"secret\"}}",
        ];
        for data in openai {
            let err = whole(Provider::OpenAi, &format!("data: {data}\n\n")).unwrap_err();
            assert!(!err.to_string().contains("secret"), "{err}");
            assert!(err.to_string().starts_with("openai stream"));
        }
        let anthropic = [
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":[\"secret\"]}}",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\"}}",
            "event: ping\ndata: {\"type\":\"ping\"",
            "event: message_delta\ndata: {\"delta\":{\"stop_reason\":[\"secret\"]}}",
            "data: [\"secret\"]",
        ];
        for event in anthropic {
            let err = whole(Provider::Anthropic, &format!("{event}\n\n")).unwrap_err();
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn invalid_utf8_is_refused_but_a_split_sequence_is_not() {
        let err = run(Provider::OpenAi, &[b": \xff\n"]).unwrap_err();
        assert_eq!(
            err,
            UpstreamError::InvalidUtf8 {
                provider: Provider::OpenAi
            }
        );
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"é😀\"}}]}\n\n".as_bytes();
        let at = body.iter().position(|&b| b >= 0x80).unwrap();
        for i in at..at + 6 {
            let (a, b) = body.split_at(i);
            assert_eq!(run(Provider::OpenAi, &[a, b]).unwrap().0, ["é😀"]);
        }
    }

    #[test]
    fn an_endless_line_is_refused_not_held() {
        let mut state = UpstreamState::new(Provider::OpenAi);
        let chunk = vec![b'x'; 1 << 20];
        let mut result = Ok(());
        for _ in 0..5 {
            result = state.feed(&chunk, |_| {});
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(UpstreamError::TooLong { .. })));
        assert!(state.feed(b"data: [DONE]\n\n", |_| {}).is_err());
    }

    #[test]
    fn a_failed_stream_stays_failed() {
        let mut state = UpstreamState::new(Provider::OpenAi);
        let err = state.feed(b"data: {\n\n", |_| {}).unwrap_err();
        assert_eq!(state.feed(b"data: [DONE]\n\n", |_| {}), Err(err));
    }

    #[test]
    fn a_long_line_in_tiny_pieces_is_linear() {
        // 3 MB of content (under MAX_BUFFERED) in 1-byte feeds; quadratic
        // re-scanning would take minutes.
        let content = "ab".repeat(3 << 19);
        let body =
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{content}\"}}}}]}}\n\n");
        let mut state = UpstreamState::new(Provider::OpenAi);
        let mut got = String::new();
        for byte in body.as_bytes().chunks(1) {
            state.feed(byte, |d| got.push_str(d)).unwrap();
        }
        assert_eq!(got, content);
    }

    #[test]
    fn kinds() {
        assert_eq!(Provider::parse("openai"), Some(Provider::OpenAi));
        assert_eq!(Provider::parse("anthropic"), Some(Provider::Anthropic));
        assert_eq!(Provider::parse("OpenAI"), None);
    }
}
