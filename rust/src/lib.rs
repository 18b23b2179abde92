//! `pwachat._native`: the hot, pure parts of the pwachat backend. No I/O, no
//! logging, no Python imports: bytes and text in, bytes and text out, counters.

use pyo3::prelude::*;

pub mod budget;
pub mod limiter;
mod lru;
pub mod sanitize;
pub mod sse;
pub mod upstream;
pub mod usage;
mod window;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // A panic surfaces as pyo3's PanicException, a BaseException that `except Exception` misses;
    // named here so that the Python side can catch it and answer `internal_error`.
    m.add(
        "PanicException",
        m.py().get_type::<pyo3::panic::PanicException>(),
    )?;
    sse::init(m)?;
    upstream::init(m)?;
    sanitize::init(m)?;
    limiter::init(m)?;
    budget::init(m)?;
    usage::init(m)?;
    Ok(())
}
