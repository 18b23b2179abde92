//! Byte-level helpers: the few JSON fields the upstream reads from a request body (no JSON parser:
//! the bodies are pwachat's and this tool's own, and a field that is not found takes its default),
//! and the one-line JSON results.

use std::fmt::Write as _;

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .count();
    &s[n..]
}

fn after_key(rest: &[u8]) -> Option<&[u8]> {
    Some(skip_ws(skip_ws(rest).strip_prefix(b":")?))
}

/// The raw JSON text after `"key":` (whitespace skipped), at the first occurrence of the key.
pub fn field<'a>(body: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let quoted = format!("\"{key}\"");
    let at = find(body, quoted.as_bytes())?;
    after_key(&body[at + quoted.len()..])
}

pub fn field_is_true(body: &[u8], key: &str) -> bool {
    field(body, key).is_some_and(|v| v.starts_with(b"true"))
}

/// Leading decimal digits as a number, and how many bytes they took.
pub fn leading_u64(s: &[u8]) -> Option<(u64, usize)> {
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 19 {
        return None;
    }
    let text = std::str::from_utf8(&s[..n]).ok()?;
    Some((text.parse().ok()?, n))
}

pub fn field_u64(body: &[u8], key: &str) -> Option<u64> {
    leading_u64(field(body, key)?).map(|(v, _)| v)
}

/// The raw (still JSON-escaped) text of the JSON string that `v` starts with.
fn string_at(v: &[u8]) -> Option<&[u8]> {
    let v = v.strip_prefix(b"\"")?;
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'\\' => i += 2,
            b'"' => return Some(&v[..i]),
            _ => i += 1,
        }
    }
    None
}

/// The raw (still JSON-escaped) text of a string field: safe to splice into JSON as it is.
pub fn field_str<'a>(body: &'a [u8], key: &str) -> Option<&'a [u8]> {
    string_at(field(body, key)?)
}

/// Words (whitespace-separated) in every `"content"` string of `body`, at least 1: the fake's
/// `prompt_tokens`.
pub fn content_words(body: &[u8]) -> u64 {
    const KEY: &[u8] = b"\"content\"";
    let mut n = 0;
    let mut rest = body;
    while let Some(at) = find(rest, KEY) {
        rest = &rest[at + KEY.len()..];
        if let Some(text) = after_key(rest).and_then(string_at) {
            n += text
                .split(|b| matches!(b, b' ' | b'\t' | b'\n'))
                .filter(|w| !w.is_empty())
                .count() as u64;
        }
    }
    n.max(1)
}

/// Percentile as the bench always took it (its Python `pct`): `sorted[min(n - 1, int(p / 100 * n))]`.
pub fn pct(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p / 100.0 * sorted.len() as f64) as usize).min(sorted.len() - 1);
    Some(sorted[i])
}

/// One JSON object on one line, built field by field.
#[derive(Default)]
pub struct Json(String);

impl Json {
    fn key(&mut self, k: &str) {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        let _ = write!(self.0, "\"{k}\":");
    }

    pub fn int(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k);
        let _ = write!(self.0, "{v}");
        self
    }

    pub fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        let _ = write!(
            self.0,
            "\"{}\"",
            v.replace('\\', "\\\\").replace('"', "\\\"")
        );
        self
    }

    /// Microseconds as milliseconds (3 decimals), or null.
    pub fn ms(&mut self, k: &str, us: Option<i64>) -> &mut Self {
        self.key(k);
        match us {
            Some(us) => {
                let _ = write!(self.0, "{:.3}", us as f64 / 1000.0);
            }
            None => self.0.push_str("null"),
        }
        self
    }

    pub fn done(&mut self) -> String {
        if self.0.is_empty() {
            self.0.push('{');
        }
        self.0.push('}');
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let body = br#"{"model": "gpt-4o-mini","max_tokens":130, "stream" : true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"a \"b\" c"}]}"#;
        assert_eq!(field_str(body, "model"), Some(&b"gpt-4o-mini"[..]));
        assert_eq!(field_u64(body, "max_tokens"), Some(130));
        assert!(field_is_true(body, "stream"));
        assert!(field_is_true(body, "include_usage"));
        assert!(!field_is_true(body, "missing"));
        assert_eq!(field_str(body, "content"), Some(&br#"a \"b\" c"#[..]));
        assert_eq!(content_words(body), 3);
    }

    #[test]
    fn percentiles_like_the_python() {
        let v: Vec<i64> = (0..100).collect();
        assert_eq!(pct(&v, 50.0), Some(50));
        assert_eq!(pct(&v, 99.0), Some(99));
        assert_eq!(pct(&v, 100.0), Some(99));
        assert_eq!(pct(&[], 50.0), None);
    }

    #[test]
    fn json_line() {
        let mut j = Json::default();
        let line = j
            .int("a", 1)
            .ms("b", Some(1500))
            .ms("c", None)
            .str("d", "x\"y")
            .done();
        assert_eq!(line, r#"{"a":1,"b":1.500,"c":null,"d":"x\"y"}"#);
    }
}
