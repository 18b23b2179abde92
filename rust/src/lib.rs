//! `pwachat._native`: the hot, pure parts of the pwachat backend. No I/O, no
//! logging, no Python imports: bytes and text in, bytes and text out, counters.

use pyo3::prelude::*;

pub mod limiter;
mod lru;
pub mod sanitize;
pub mod sse;
pub mod upstream;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    sse::init(m)?;
    upstream::init(m)?;
    sanitize::init(m)?;
    limiter::init(m)?;
    Ok(())
}
