//! Server-Sent Events framing (WHATWG HTML, "server-sent events", event stream
//! interpretation).
//!
//! The framing is written so that a spec-following parser gets back exactly the
//! data it was given, up to line-end normalisation: the parser splits on CRLF,
//! CR and LF alike and re-joins `data` lines with LF, so `"a\r\nb"` comes back as
//! `"a\nb"`. Every field is written as `name: value` (with the space) because the
//! parser strips one leading space from the value; a value that itself starts
//! with a space therefore survives.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBytes, PyString};

// ---------------------------------------------------------------------------
// Plain Rust
// ---------------------------------------------------------------------------

/// A field value that would end the line early or be ignored by the parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseError {
    /// `id` contains CR, LF or NUL (a parser ignores an id with NUL).
    BadId,
    /// `event` contains CR or LF (or NUL, refused for symmetry with `id`).
    BadEvent,
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = match self {
            Self::BadId => "id",
            Self::BadEvent => "event",
        };
        write!(f, "SSE {field} must not contain CR, LF or NUL")
    }
}

impl std::error::Error for SseError {}

fn is_clean_field(value: &str) -> bool {
    !value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// Splits on CRLF, lone CR and LF, as the parser does. A trailing line end
/// yields a final empty line, which the parser turns back into that line end.
fn for_each_line(text: &str, mut f: impl FnMut(&str)) {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                f(&text[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                f(&text[start..i]);
                i += if bytes.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            }
            _ => i += 1,
        }
    }
    f(&text[start..]);
}

/// Writes one event: optional `id`, optional `event`, one `data` line per line
/// of `data` (so empty data is a single `data: ` line, which a parser still
/// dispatches, with empty data) and the blank line that ends the event.
pub fn write_event(
    out: &mut Vec<u8>,
    data: &str,
    id: Option<&str>,
    event: Option<&str>,
) -> Result<(), SseError> {
    if id.is_some_and(|id| !is_clean_field(id)) {
        return Err(SseError::BadId);
    }
    if event.is_some_and(|event| !is_clean_field(event)) {
        return Err(SseError::BadEvent);
    }
    out.reserve(data.len() + 16 + id.map_or(0, str::len) + event.map_or(0, str::len));
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    if let Some(event) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event.as_bytes());
        out.push(b'\n');
    }
    for_each_line(data, |line| {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    });
    out.push(b'\n');
    Ok(())
}

/// `: <line>` per line of `text`, then the blank line. A parser ignores
/// comments; proxies see traffic.
pub fn write_comment(out: &mut Vec<u8>, text: &str) {
    for_each_line(text, |line| {
        out.extend_from_slice(b": ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    });
    out.push(b'\n');
}

/// Extra bytes that JSON escaping adds for each byte, as `json.dumps(...,
/// ensure_ascii=False)` does: two-character escapes for `"`, `\\`, `\b`, `\f`,
/// `\n`, `\r`, `\t`; `\u00XX` for the other C0 controls; nothing else is escaped
/// (non-ASCII, DEL, U+2028/U+2029 stay raw, as in `json.dumps`).
const JSON_EXTRA: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = 5;
        b += 1;
    }
    table[b'"' as usize] = 1;
    table[b'\\' as usize] = 1;
    table[0x08] = 1;
    table[0x0c] = 1;
    table[b'\n' as usize] = 1;
    table[b'\r' as usize] = 1;
    table[b'\t' as usize] = 1;
    table
};

/// Length of `text` once JSON-escaped, without the quotes.
pub fn json_escaped_len(text: &str) -> usize {
    text.len()
        + text
            .bytes()
            .map(|b| usize::from(JSON_EXTRA[usize::from(b)]))
            .sum::<usize>()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes the escaped form of `text` at the start of `out`, which must hold
/// exactly `json_escaped_len(text)` bytes; returns the bytes written.
fn write_json_escaped(out: &mut [u8], text: &str) -> usize {
    let mut pos = 0;
    let bytes = text.as_bytes();
    let mut run_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if JSON_EXTRA[usize::from(b)] == 0 {
            continue;
        }
        // Copy the run of bytes that need no escaping in one go.
        let run = &bytes[run_start..i];
        out[pos..pos + run.len()].copy_from_slice(run);
        pos += run.len();
        run_start = i + 1;
        let short = match b {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            0x08 => Some(b'b'),
            0x0c => Some(b'f'),
            b'\n' => Some(b'n'),
            b'\r' => Some(b'r'),
            b'\t' => Some(b't'),
            _ => None,
        };
        if let Some(c) = short {
            out[pos] = b'\\';
            out[pos + 1] = c;
            pos += 2;
        } else {
            out[pos..pos + 6].copy_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
            pos += 6;
        }
    }
    let run = &bytes[run_start..];
    out[pos..pos + run.len()].copy_from_slice(run);
    pos + run.len()
}

/// Decimal digits of `n`, written at the end of a stack buffer.
fn decimal(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

const DELTA_HEAD: &[u8] = b"\nevent: delta\ndata: {\"content\":\"";
const DELTA_TAIL: &[u8] = b"\"}\n\n";

/// Exact size of the delta frame for `id` and `content`.
pub fn delta_len(id: u64, content: &str) -> usize {
    let mut buf = [0u8; 20];
    4 + decimal(id, &mut buf).len()
        + DELTA_HEAD.len()
        + json_escaped_len(content)
        + DELTA_TAIL.len()
}

/// Writes `id: N\nevent: delta\ndata: {"content":"..."}\n\n` into `out`, which
/// must be exactly `delta_len(id, content)` bytes long, so that the caller can
/// hand over a buffer it allocated once at the right size.
pub fn write_delta(out: &mut [u8], id: u64, content: &str) {
    let mut buf = [0u8; 20];
    let digits = decimal(id, &mut buf);
    let mut pos = 0;
    for part in [b"id: " as &[u8], digits, DELTA_HEAD] {
        out[pos..pos + part.len()].copy_from_slice(part);
        pos += part.len();
    }
    pos += write_json_escaped(&mut out[pos..], content);
    out[pos..].copy_from_slice(DELTA_TAIL);
}

/// Convenience for tests and non-Python callers.
pub fn delta_frame(id: u64, content: &str) -> Vec<u8> {
    let mut out = vec![0; delta_len(id, content)];
    write_delta(&mut out, id, content);
    out
}

// ---------------------------------------------------------------------------
// Python layer
// ---------------------------------------------------------------------------

pyo3::create_exception!(
    pwachat._native,
    SseFieldError,
    PyValueError,
    "An SSE id or event name contains CR, LF or NUL."
);

impl From<SseError> for PyErr {
    fn from(err: SseError) -> Self {
        SseFieldError::new_err(err.to_string())
    }
}

/// `id` as the caller may give it: an int (the usual case) or any clean str.
#[derive(FromPyObject)]
pub enum EventId {
    Int(i128),
    Str(String),
}

/// Borrows the UTF-8 of a `str` or checks a `bytes`; no copy either way.
fn with_data<R>(data: &Bound<'_, PyAny>, f: impl FnOnce(&str) -> R) -> PyResult<R> {
    if let Ok(s) = data.cast::<PyString>() {
        return Ok(f(s.to_str()?));
    }
    if let Ok(b) = data.cast::<PyBytes>() {
        let text = std::str::from_utf8(b.as_bytes())
            .map_err(|e| PyValueError::new_err(format!("SSE data is not valid UTF-8: {e}")))?;
        return Ok(f(text));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "SSE data must be str or bytes, not {}",
        data.get_type().name()?
    )))
}

fn event_bytes<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    id: Option<&str>,
    event: Option<&str>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut out = Vec::new();
    with_data(data, |text| write_event(&mut out, text, id, event))??;
    Ok(PyBytes::new(py, &out))
}

/// One SSE event as bytes.
#[pyfunction]
#[pyo3(signature = (data, *, id = None, event = None))]
pub fn sse_event<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    id: Option<EventId>,
    event: Option<&str>,
) -> PyResult<Bound<'py, PyBytes>> {
    let id_text = id.map(|id| match id {
        EventId::Int(n) => n.to_string(),
        EventId::Str(s) => s,
    });
    event_bytes(py, data, id_text.as_deref(), event)
}

/// A comment frame, e.g. the heartbeat `: ping`.
#[pyfunction]
#[pyo3(signature = (text = "ping"))]
pub fn sse_comment<'py>(py: Python<'py>, text: &str) -> Bound<'py, PyBytes> {
    let mut out = Vec::with_capacity(text.len() + 4);
    write_comment(&mut out, text);
    PyBytes::new(py, &out)
}

/// Numbers the events of one stream. Frozen with an atomic counter so that it
/// is safe to share without the GIL (free-threaded builds) and costs no borrow
/// check per call.
#[pyclass(frozen, module = "pwachat._native")]
pub struct SseEncoder {
    next_id: AtomicU64,
}

impl SseEncoder {
    fn take_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

#[pymethods]
impl SseEncoder {
    #[new]
    #[pyo3(signature = (start_id = 0))]
    fn new(start_id: u64) -> Self {
        Self {
            next_id: AtomicU64::new(start_id),
        }
    }

    #[getter]
    fn next_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// An event with the next id. The id is only used up when the frame is
    /// made, so a refused event name leaves no gap in the ids.
    fn event<'py>(
        &self,
        py: Python<'py>,
        event: &str,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        if !is_clean_field(event) {
            return Err(SseError::BadEvent.into());
        }
        let mut out = Vec::new();
        with_data(data, |text| -> Result<(), SseError> {
            let mut buf = [0u8; 20];
            let id = self.take_id();
            // The digits are ASCII, so this cannot fail.
            let id_text = std::str::from_utf8(decimal(id, &mut buf)).unwrap_or("0");
            write_event(&mut out, text, Some(id_text), Some(event))
        })??;
        Ok(PyBytes::new(py, &out))
    }

    /// The hot path: one `delta` event, JSON built here, written straight into
    /// the `bytes` object allocated at its final size.
    fn delta<'py>(&self, py: Python<'py>, content: &str) -> PyResult<Bound<'py, PyBytes>> {
        let id = self.take_id();
        PyBytes::new_with(py, delta_len(id, content), |buf| {
            write_delta(buf, id, content);
            Ok(())
        })
    }

    /// `delta` for each non-empty content, ids consecutive, in one `bytes`:
    /// the relay's second crossing per network read, after
    /// `UpstreamParser.feed`. The ids are taken in one step once every item
    /// has been read, so a bad item uses none and another thread's events
    /// cannot land in between.
    fn deltas<'py>(
        &self,
        py: Python<'py>,
        contents: Vec<PyBackedStr>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let texts = || contents.iter().map(|c| &**c).filter(|c| !c.is_empty());
        let count = texts().count() as u64;
        let first = self.next_id.fetch_add(count, Ordering::Relaxed);
        let total = (first..)
            .zip(texts())
            .map(|(id, text)| delta_len(id, text))
            .sum();
        PyBytes::new_with(py, total, |buf| {
            let mut pos = 0;
            for (id, text) in (first..).zip(texts()) {
                let len = delta_len(id, text);
                write_delta(&mut buf[pos..pos + len], id, text);
                pos += len;
            }
            Ok(())
        })
    }

    fn __repr__(&self) -> String {
        format!("SseEncoder(next_id={})", self.next_id())
    }
}

pub fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SseFieldError", m.py().get_type::<SseFieldError>())?;
    m.add_function(wrap_pyfunction!(sse_event, m)?)?;
    m.add_function(wrap_pyfunction!(sse_comment, m)?)?;
    m.add_class::<SseEncoder>()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str, id: Option<&str>, name: Option<&str>) -> Result<String, SseError> {
        let mut out = Vec::new();
        write_event(&mut out, data, id, name)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn event_with_all_fields() {
        assert_eq!(
            event("hi", Some("3"), Some("delta")).unwrap(),
            "id: 3\nevent: delta\ndata: hi\n\n"
        );
    }

    #[test]
    fn empty_data_is_one_empty_data_line() {
        assert_eq!(event("", None, None).unwrap(), "data: \n\n");
    }

    #[test]
    fn every_line_end_splits_and_trailing_end_adds_an_empty_line() {
        assert_eq!(
            event("a\r\nb\rc\nd\n", None, None).unwrap(),
            "data: a\ndata: b\ndata: c\ndata: d\ndata: \n\n"
        );
        // CR LF split across nothing: "\r\r\n" is two line ends, not three.
        assert_eq!(
            event("\r\r\n", None, None).unwrap(),
            "data: \ndata: \ndata: \n\n"
        );
    }

    #[test]
    fn leading_space_in_data_survives_the_parser_strip() {
        assert_eq!(event(" x", None, None).unwrap(), "data:  x\n\n");
    }

    #[test]
    fn injection_through_id_or_event_is_refused() {
        for bad in ["1\n", "1\r", "a\0b", "\r\n"] {
            assert_eq!(event("x", Some(bad), None), Err(SseError::BadId));
            assert_eq!(event("x", None, Some(bad)), Err(SseError::BadEvent));
        }
    }

    #[test]
    fn comment_lines() {
        let mut out = Vec::new();
        write_comment(&mut out, "ping");
        assert_eq!(out, b": ping\n\n");
        out.clear();
        write_comment(&mut out, "a\r\nb");
        assert_eq!(out, b": a\n: b\n\n");
    }

    #[test]
    fn delta_escapes_like_json_dumps() {
        let frame = delta_frame(7, "q\"b\\s\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é\u{2028}😀");
        assert_eq!(
            String::from_utf8(frame).unwrap(),
            "id: 7\nevent: delta\ndata: {\"content\":\"q\\\"b\\\\s\\n\\r\\t\\b\\f\\u0001\\u001f\u{7f}é\u{2028}😀\"}\n\n"
        );
    }

    #[test]
    fn delta_sizes_are_exact() {
        for (id, text) in [(0, ""), (9, "x"), (10, "\0"), (u64::MAX, "\"\"")] {
            let frame = delta_frame(id, text);
            assert_eq!(frame.len(), delta_len(id, text));
            assert!(frame.ends_with(b"\"}\n\n"));
        }
        assert!(delta_frame(u64::MAX, "").starts_with(b"id: 18446744073709551615\n"));
    }
}
