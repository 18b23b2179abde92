//! Sanitising chat text, as the contract's "Sanitising text" section says:
//!
//! 1. `\r\n` and lone `\r` become `\n`;
//! 2. C0 controls (U+0000..U+001F) other than `\n` and `\t`, and C1 controls
//!    with DEL (U+007F..U+009F), are removed;
//! 3. the bidi embeddings/overrides U+202A..U+202E and isolates U+2066..U+2069
//!    are removed;
//! 4. the text is normalised to NFC;
//! 5. leading and trailing white space is trimmed, where white space is the
//!    Unicode `White_Space` property (`char::is_whitespace`). Python's
//!    `str.strip()` differs from it only in U+001C..U+001F, which step 2 has
//!    already removed, so the two agree on every sanitised text;
//! 6. length is counted in code points.
//!
//! Lone surrogates cannot exist in a Rust `str`; they are caught where the
//! Python `str` is read (see [`py_text`]).

use std::borrow::Cow;
use std::fmt;

use pyo3::exceptions::{PyUnicodeEncodeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

// ---------------------------------------------------------------------------
// Plain Rust
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    LoneSurrogate,
    Empty,
    TooLong { max_chars: usize },
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Self::LoneSurrogate => "lone_surrogate",
            Self::Empty => "empty",
            Self::TooLong { .. } => "too_long",
        }
    }
}

/// Which item failed and why. `index` is -1 for the message, `i` for
/// `history[i]`. The message never echoes the text: it ends up in error
/// bodies and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SanitizeFailure {
    pub index: isize,
    pub reason: Reason,
}

impl fmt::Display for SanitizeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.index < 0 {
            f.write_str("message")?;
        } else {
            write!(f, "history[{}].content", self.index)?;
        }
        match self.reason {
            Reason::LoneSurrogate => f.write_str(" contains a lone surrogate"),
            Reason::Empty => f.write_str(" is empty after sanitising"),
            Reason::TooLong { max_chars } => {
                write!(f, " is longer than {max_chars} characters")
            }
        }
    }
}

impl std::error::Error for SanitizeFailure {}

fn is_removed(c: char) -> bool {
    matches!(c,
        '\0'..='\u{8}' | '\u{b}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Printable ASCII plus `\n` and `\t`: nothing to replace or remove, and NFC
/// is the identity, so only trimming can change such text.
fn is_plain_ascii(text: &str) -> bool {
    text.bytes()
        .all(|b| matches!(b, b' '..=b'~' | b'\n' | b'\t'))
}

/// Whether steps 1-3 change anything, decided on the UTF-8 bytes (a byte loop
/// is several times faster than decoding chars): C0 and DEL are single bytes,
/// C1 is `C2 80..9F`, the bidi controls are `E2 80 AA..AE` and `E2 81 A6..A9`.
fn needs_strip(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| match b {
        b'\n' | b'\t' => false,
        0..=0x1f | 0x7f => true,
        0xc2 => matches!(bytes.get(i + 1), Some(0x80..=0x9f)),
        0xe2 => matches!(
            (bytes.get(i + 1), bytes.get(i + 2)),
            (Some(0x80), Some(0xaa..=0xae)) | (Some(0x81), Some(0xa6..=0xa9))
        ),
        _ => false,
    })
}

/// Code points in `text`: every byte that does not continue a sequence.
fn code_points(text: &str) -> usize {
    text.bytes().filter(|&b| b & 0xc0 != 0x80).count()
}

/// Steps 1-3. Borrows when nothing is to be replaced or removed.
fn strip_controls(text: &str) -> Cow<'_, str> {
    if !needs_strip(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' {
            chars.next_if_eq(&'\n');
            out.push('\n');
        } else if !is_removed(c) {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn nfc(text: Cow<'_, str>) -> Cow<'_, str> {
    if is_nfc_quick(text.chars()) == IsNormalized::Yes {
        text
    } else {
        Cow::Owned(text.nfc().collect())
    }
}

fn trim(text: Cow<'_, str>) -> Cow<'_, str> {
    match text {
        Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
        Cow::Owned(s) => {
            let trimmed = s.trim();
            if trimmed.len() == s.len() {
                Cow::Owned(s)
            } else {
                Cow::Owned(trimmed.to_owned())
            }
        }
    }
}

/// The sanitised text; borrows from `text` whenever it is a sub-slice of it.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    if is_plain_ascii(text) {
        return Cow::Borrowed(text.trim());
    }
    trim(nfc(strip_controls(text)))
}

/// Sanitises and checks one chat item (1..=`max_chars` code points).
pub fn sanitize_item(
    text: &str,
    index: isize,
    max_chars: usize,
) -> Result<Cow<'_, str>, SanitizeFailure> {
    let clean = sanitize(text);
    let fail = |reason| SanitizeFailure { index, reason };
    if clean.is_empty() {
        return Err(fail(Reason::Empty));
    }
    // Bytes >= code points, so most texts need no count at all.
    if clean.len() > max_chars && code_points(&clean) > max_chars {
        return Err(fail(Reason::TooLong { max_chars }));
    }
    Ok(clean)
}

// ---------------------------------------------------------------------------
// Python layer
// ---------------------------------------------------------------------------

pyo3::create_exception!(
    pwachat._native,
    SanitizeError,
    PyValueError,
    "A chat text was refused; `index` (-1 for the message) and `reason` say which and why."
);

impl From<SanitizeFailure> for PyErr {
    fn from(failure: SanitizeFailure) -> Self {
        let err = SanitizeError::new_err(failure.to_string());
        Python::attach(|py| {
            let value = err.value(py);
            // Setting attributes on a fresh exception instance cannot fail
            // short of memory exhaustion, which will surface on its own.
            let _ = value.setattr(intern!(py, "index"), failure.index);
            let _ = value.setattr(intern!(py, "reason"), failure.reason.code());
        });
        err
    }
}

/// Reads the UTF-8 of a Python `str`, mapping the one way it can fail (a lone
/// surrogate, which UTF-8 cannot hold) to `SanitizeError`.
fn py_text<'a>(text: &'a Bound<'_, PyString>, index: isize) -> PyResult<&'a str> {
    text.to_str().map_err(|err| {
        if err.is_instance_of::<PyUnicodeEncodeError>(text.py()) {
            SanitizeFailure {
                index,
                reason: Reason::LoneSurrogate,
            }
            .into()
        } else {
            err
        }
    })
}

/// The original object when sanitising changed nothing, so that clean text
/// (the common case) costs no new `str`.
fn to_py<'py>(original: &Bound<'py, PyString>, raw: &str, clean: &str) -> Bound<'py, PyString> {
    if clean.as_ptr() == raw.as_ptr() && clean.len() == raw.len() {
        original.clone()
    } else {
        PyString::new(original.py(), clean)
    }
}

fn sanitize_one<'py>(
    text: &Bound<'py, PyString>,
    index: isize,
    max_chars: Option<usize>,
) -> PyResult<Bound<'py, PyString>> {
    let raw = py_text(text, index)?;
    let clean = match max_chars {
        Some(max) => sanitize_item(raw, index, max)?,
        None => sanitize(raw),
    };
    Ok(to_py(text, raw, &clean))
}

#[pyfunction(name = "sanitize")]
pub fn py_sanitize<'py>(text: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyString>> {
    sanitize_one(text, -1, None)
}

/// The message and every history content in one crossing; the first failure
/// (message first, then history in order) is raised.
#[pyfunction]
pub fn sanitize_chat<'py>(
    message: &Bound<'py, PyString>,
    history: Vec<Bound<'py, PyString>>,
    max_chars: usize,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = message.py();
    let message = sanitize_one(message, -1, Some(max_chars))?;
    let mut items = Vec::with_capacity(history.len());
    for (i, item) in history.iter().enumerate() {
        items.push(sanitize_one(item, i.cast_signed(), Some(max_chars))?);
    }
    let history = PyList::new(py, items)?;
    PyTuple::new(py, [message.into_any(), history.into_any()])
}

pub fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SanitizeError", m.py().get_type::<SanitizeError>())?;
    m.add_function(wrap_pyfunction!(py_sanitize, m)?)?;
    m.add_function(wrap_pyfunction!(sanitize_chat, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_become_lf() {
        assert_eq!(sanitize("a\r\nb\rc\nd"), "a\nb\nc\nd");
        assert_eq!(sanitize("a\r\r\nb"), "a\n\nb");
    }

    #[test]
    fn controls_removed_but_lf_and_tab_kept() {
        assert_eq!(
            sanitize("a\0b\u{7}c\u{1b}[31m\u{7f}\u{85}\u{9f}d\te\nf"),
            "abc[31md\te\nf"
        );
    }

    #[test]
    fn bidi_controls_removed() {
        assert_eq!(sanitize("x\u{202e}y\u{2066}z\u{2069}\u{202a}"), "xyz");
        // Neighbours of the removed ranges stay.
        assert_eq!(sanitize("\u{2029}a\u{202f}b\u{2065}"), "a\u{202f}b\u{2065}");
    }

    #[test]
    fn nfc_composes() {
        assert_eq!(sanitize("e\u{301}"), "\u{e9}");
        // Removing a control in between lets the pair compose.
        assert_eq!(sanitize("e\u{0}\u{301}"), "\u{e9}");
        // Singleton decomposition: OHM SIGN becomes OMEGA.
        assert_eq!(sanitize("\u{2126}"), "\u{3a9}");
    }

    #[test]
    fn trims_unicode_white_space_after_everything_else() {
        assert_eq!(sanitize(" \t\n\u{3000}\u{a0} hi \u{2003}\r\n"), "hi");
        // A control between spaces goes first, then the spaces are trimmed.
        assert_eq!(sanitize(" \u{0} x"), "x");
        // U+200B ZERO WIDTH SPACE is not White_Space.
        assert_eq!(sanitize("\u{200b}x"), "\u{200b}x");
    }

    #[test]
    fn byte_scan_agrees_with_the_char_rules() {
        let samples = [
            "plain",
            "tab\tand\nlf",
            "cr\r",
            "\u{7f}",
            "\u{80}",
            "\u{9f}",
            "\u{a0}",
            "\u{202a}",
            "\u{202e}",
            "\u{202f}",
            "\u{2029}",
            "\u{2066}",
            "\u{2069}",
            "\u{206a}",
            "\u{2065}",
            "é€😀",
            "x\u{85}",
        ];
        for text in samples {
            let by_char = text.chars().any(|c| c == '\r' || is_removed(c));
            assert_eq!(needs_strip(text), by_char, "{text:?}");
            assert_eq!(code_points(text), text.chars().count());
        }
    }

    #[test]
    fn borrows_when_unchanged() {
        let text = "héllo wörld";
        assert!(matches!(sanitize(text), Cow::Borrowed(s) if s.len() == text.len()));
        assert!(matches!(sanitize("plain ascii"), Cow::Borrowed(_)));
    }

    #[test]
    fn item_checks_empty_and_length_in_code_points() {
        assert_eq!(
            sanitize_item(" \u{0}\r\n ", 2, 10).unwrap_err(),
            SanitizeFailure {
                index: 2,
                reason: Reason::Empty
            }
        );
        // Four two-byte code points fit a limit of four.
        assert_eq!(sanitize_item("éééé", -1, 4).unwrap(), "éééé");
        let err = sanitize_item("ééééé", -1, 4).unwrap_err();
        assert_eq!(err.reason, Reason::TooLong { max_chars: 4 });
        assert_eq!(err.to_string(), "message is longer than 4 characters");
        // Length is counted after NFC: e + combining acute is one code point.
        assert!(sanitize_item("e\u{301}e\u{301}", -1, 2).is_ok());
    }

    #[test]
    fn messages_do_not_echo_text() {
        let f = SanitizeFailure {
            index: 3,
            reason: Reason::TooLong { max_chars: 4000 },
        };
        assert_eq!(
            f.to_string(),
            "history[3].content is longer than 4000 characters"
        );
        let f = SanitizeFailure {
            index: -1,
            reason: Reason::Empty,
        };
        assert_eq!(f.to_string(), "message is empty after sanitising");
        let f = SanitizeFailure {
            index: -1,
            reason: Reason::LoneSurrogate,
        };
        assert_eq!(f.to_string(), "message contains a lone surrogate");
    }
}
