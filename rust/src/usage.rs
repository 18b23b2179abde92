//! Token counts the server makes itself when a provider reports none (some
//! OpenAI-compatible servers send no usage in streams): an upper bound that
//! needs no tokenizer, from the UTF-8 bytes of the texts.
//!
//! Why bytes bound tokens. A byte-level BPE tokenizer (tiktoken's cl100k and
//! o200k, GPT-2, Llama 3, Qwen, Mistral's tekken) starts from one token per
//! UTF-8 byte and only merges, so every token of a text stands for at least
//! one of its bytes: `n` bytes are at most `n` tokens. `SentencePiece` with byte
//! fallback (Llama 2, Mistral 7B v0.1, Gemma) keeps it: each piece covers at
//! least one character, an unknown character falls back to one token per byte,
//! and the one piece that may cover none, the `▁` put before a text, is in the
//! per-message allowance below. A special token spelt out in a text
//! (`<|im_end|>`) that a server reads as one is one token for many bytes.
//! Decoding gives each generated token's bytes back (an invalid
//! sequence as U+FFFD, three bytes), so the same holds for an answer.
//!
//! The bytes cannot be tightened without knowing the vocabulary: a text of
//! rare symbols is one token per byte. For ordinary English it is about
//! four times the real count (`OpenAI`'s rule of thumb: a token is about four
//! characters).
//!
//! What it cannot see: text a provider adds beyond the allowances (a
//! template's preamble longer than [`REQUEST_OVERHEAD`]), tokens that are
//! never relayed (reasoning, tool calls), and tokenizers that normalise with
//! NFKC, which can lengthen a character many times. pwachat's texts are NFC
//! already (sanitising), so an NFC normaliser changes nothing.

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;

// ---------------------------------------------------------------------------
// Plain Rust
// ---------------------------------------------------------------------------

/// The tokens a chat template adds around one message: its role header and
/// separators. `OpenAI` counts 3 (4 with a name), `ChatML` (Qwen, `SmolLM2`) 5,
/// Llama 3 5, Gemma 5; Llama 2's `[INST]`/`[/INST]` about 7 with
/// `SentencePiece`'s leading `▁`.
pub const MESSAGE_OVERHEAD: u64 = 8;

/// The tokens a template adds once per request: the begin-of-text token, the
/// reply's own header (the generation prompt, counted as input: 3 for `OpenAI`
/// and `ChatML`, 4 for Llama 3) and the "Cutting Knowledge Date / Today Date"
/// lines Llama 3.1's template puts in the system message (about 20).
pub const REQUEST_OVERHEAD: u64 = 32;

/// The tokens of an answer that its text does not show: the end-of-turn token
/// the model samples to stop, which llama.cpp counts as output, and a leading
/// `▁` that `SentencePiece` decodes to nothing.
pub const ANSWER_OVERHEAD: u64 = 2;

/// An upper bound on the input tokens of a request whose messages (the system
/// prompt, the history and the message, each one message) hold `texts`.
pub fn input_tokens<'a>(texts: impl IntoIterator<Item = &'a str>) -> u64 {
    texts.into_iter().fold(REQUEST_OVERHEAD, |sum, text| {
        sum.saturating_add(text.len() as u64 + MESSAGE_OVERHEAD)
    })
}

/// An upper bound on the output tokens of an answer of `text_bytes` UTF-8
/// bytes of text.
pub fn output_tokens(text_bytes: u64) -> u64 {
    text_bytes.saturating_add(ANSWER_OVERHEAD)
}

// ---------------------------------------------------------------------------
// Python layer
// ---------------------------------------------------------------------------

/// The one input estimate: what the chat routes report when the provider
/// counts nothing, and what a token budget is to reserve before the provider
/// is called (contract, "Token budgets").
#[pyfunction]
pub fn estimate_input_tokens(
    system: &str,
    history: Vec<(PyBackedStr, PyBackedStr)>,
    message: &str,
) -> u64 {
    let contents = history.iter().map(|(_role, content)| &**content);
    input_tokens([system, message].into_iter().chain(contents))
}

#[pyfunction]
pub fn estimate_output_tokens(text: &str) -> u64 {
    output_tokens(text.len() as u64)
}

pub fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(estimate_input_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(estimate_output_tokens, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_bytes_plus_an_allowance_per_message_and_per_request() {
        assert_eq!(input_tokens([]), REQUEST_OVERHEAD);
        assert_eq!(input_tokens([""]), REQUEST_OVERHEAD + MESSAGE_OVERHEAD);
        assert_eq!(
            input_tokens(["You are terse.", "Hi", "Hello!", "2 + 2?"]),
            REQUEST_OVERHEAD + 4 * MESSAGE_OVERHEAD + 14 + 2 + 6 + 6
        );
    }

    #[test]
    fn bytes_not_characters_are_counted() {
        // é is 2 bytes, € 3, 😀 4: a byte-level tokenizer may spend a token on each byte.
        assert_eq!(output_tokens("é€😀".len() as u64), 9 + ANSWER_OVERHEAD);
        assert_eq!(
            input_tokens(["é€😀"]),
            9 + MESSAGE_OVERHEAD + REQUEST_OVERHEAD
        );
    }

    #[test]
    fn an_empty_answer_is_its_end_of_turn_only() {
        assert_eq!(output_tokens(0), ANSWER_OVERHEAD);
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        assert_eq!(output_tokens(u64::MAX), u64::MAX);
    }
}
