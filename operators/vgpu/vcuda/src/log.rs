//! Messages on stderr, written with `write(2)` so that a closed or full stderr can never make
//! the library panic.

#![cfg_attr(test, allow(dead_code))]

use std::sync::OnceLock;

/// Writes one line prefixed with the library name.
pub fn error(msg: &str) {
    let line = format!("gantry-vcuda: {msg}\n");
    let mut buf = line.as_bytes();
    while !buf.is_empty() {
        // SAFETY: the pointer and length describe `buf`, which outlives the call.
        let n = unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// True when `GANTRY_VCUDA_DEBUG` is set to a non-empty value other than `0`.
pub fn debug() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("GANTRY_VCUDA_DEBUG").is_ok_and(|v| !v.is_empty() && v != "0"))
}
