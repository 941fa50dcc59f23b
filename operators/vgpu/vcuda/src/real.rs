//! Finding the real driver: the real `dlsym`, the real `libcuda.so.1` and `libnvidia-ml.so.1`,
//! and the real functions behind every hook.
//!
//! The real libraries are opened with `dlopen` and searched with the *real* `dlsym` on that
//! handle. `dlsym(RTLD_NEXT, ..)` would not do: the CUDA runtime opens the driver with
//! `dlopen` at run time, after the preloaded library, and a library opened that way is not
//! in the global search list `RTLD_NEXT` walks. Opening by the same soname yields the same
//! handle the application gets, so both see one driver.

#![cfg_attr(test, allow(dead_code))]

use crate::symbols::{Id, Lib, SYMBOLS, sym};
use std::ffi::{CStr, c_char, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

pub type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

/// Address of libc's `dlsym`; read by the `dlsym` trampoline, so it is a plain `usize` static.
pub static GANTRY_VCUDA_REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// Environment override of the real driver's path (tests).
pub const REAL_CUDA_ENV: &str = "GANTRY_VCUDA_REAL_LIBCUDA";
/// Environment override of the real NVML's path (tests).
pub const REAL_NVML_ENV: &str = "GANTRY_VCUDA_REAL_LIBNVML";

/// Resolves libc's `dlsym` through `dlvsym`, which the library does not intercept. Returns 0
/// only if the C library has no `dlsym` at all.
pub extern "C" fn resolve_real_dlsym() -> usize {
    let cur = GANTRY_VCUDA_REAL_DLSYM.load(Ordering::Acquire);
    if cur != 0 {
        return cur;
    }
    // glibc >= 2.34 keeps dlsym in libc at GLIBC_2.34; older ones in libdl at the base version
    for ver in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17", c"GLIBC_2.0"] {
        // SAFETY: both strings are NUL-terminated; RTLD_NEXT searches after this library.
        let p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), ver.as_ptr()) };
        if !p.is_null() {
            GANTRY_VCUDA_REAL_DLSYM.store(p as usize, Ordering::Release);
            return p as usize;
        }
    }
    0
}

/// Calls the real `dlsym`.
pub fn dlsym(handle: *mut c_void, name: &CStr) -> *mut c_void {
    dlsym_raw(handle, name.as_ptr())
}

/// Calls the real `dlsym` with a raw name (NUL-terminated or null).
pub fn dlsym_raw(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let p = resolve_real_dlsym();
    if p == 0 || name.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `p` is libc's dlsym, whose signature is `DlsymFn`.
    let f = unsafe { std::mem::transmute::<usize, DlsymFn>(p) };
    // SAFETY: the caller's NUL-terminated name; dlsym accepts any handle and reports failure.
    unsafe { f(handle, name) }
}

fn open(env: &str, default: &CStr) -> usize {
    let path = std::env::var(env)
        .ok()
        .filter(|p| !p.is_empty() && !p.contains('\0'));
    let cpath = path.map(|p| std::ffi::CString::new(p).unwrap_or_else(|_| default.to_owned()));
    let name = cpath.as_deref().unwrap_or(default);
    // SAFETY: `name` is NUL-terminated.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() && crate::log::debug() {
        crate::log::error(&format!("cannot open {name:?}"));
    }
    h as usize
}

/// Handle of the real library, opened on first use; null if it cannot be opened.
pub fn handle(lib: Lib) -> *mut c_void {
    static CUDA: OnceLock<usize> = OnceLock::new();
    static NVML: OnceLock<usize> = OnceLock::new();
    let h = match lib {
        Lib::Cuda => *CUDA.get_or_init(|| open(REAL_CUDA_ENV, c"libcuda.so.1")),
        Lib::Nvml => *NVML.get_or_init(|| open(REAL_NVML_ENV, c"libnvidia-ml.so.1")),
    };
    h as *mut c_void
}

const ABSENT: usize = usize::MAX;

/// Looks `name` up in the real library once and caches the answer in `cache`.
pub fn resolve_cached(cache: &AtomicUsize, lib: Lib, name: &str) -> Option<usize> {
    let mut p = cache.load(Ordering::Acquire);
    if p == 0 {
        let h = handle(lib);
        let f = match std::ffi::CString::new(name) {
            Ok(c) if !h.is_null() => dlsym(h, &c),
            _ => std::ptr::null_mut(),
        };
        p = if f.is_null() { ABSENT } else { f as usize };
        cache.store(p, Ordering::Release);
    }
    (p != ABSENT).then_some(p)
}

static REAL: [AtomicUsize; SYMBOLS.len()] = [const { AtomicUsize::new(0) }; SYMBOLS.len()];

/// Address of the real function behind hook `id`, if the real library has it.
pub fn addr(id: Id) -> Option<usize> {
    let p = REAL[id as usize].load(Ordering::Acquire);
    if p != 0 && p != ABSENT {
        return Some(p);
    }
    let s = sym(id);
    resolve_cached(&REAL[id as usize], s.lib, s.name)
}

/// The real function behind a hook, typed. Evaluates to `Option<fn type>`.
#[macro_export]
macro_rules! real_fn {
    ($id:ident, $ty:ty) => {
        $crate::real::addr($crate::symbols::Id::$id)
            // SAFETY: the address was found under the symbol's name in the real library,
            // whose ABI for that name is `$ty` (cuda.h / nvml.h).
            .map(|p| unsafe { std::mem::transmute::<usize, $ty>(p) })
    };
}

/// A real function that is not intercepted (helpers the library itself calls).
#[macro_export]
macro_rules! aux {
    ($lib:ident, $name:literal, $ty:ty) => {{
        static CACHE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        $crate::real::resolve_cached(&CACHE, $crate::symbols::Lib::$lib, $name)
            // SAFETY: found under `$name` in the real library, whose ABI for it is `$ty`.
            .map(|p| unsafe { std::mem::transmute::<usize, $ty>(p) })
    }};
}

/// Warns about variants of intercepted families that the real driver exports but this
/// library does not know: newer versions (`_vN` beyond the table) and per-thread variants.
pub fn probe_unknown_variants() -> Vec<String> {
    let h = handle(Lib::Cuda);
    if h.is_null() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for s in SYMBOLS.iter().filter(|s| s.lib == Lib::Cuda) {
        let newest = SYMBOLS
            .iter()
            .filter(|x| x.base == s.base)
            .filter_map(|x| {
                x.name
                    .rsplit_once("_v")
                    .and_then(|(_, n)| n.parse::<u32>().ok())
            })
            .max()
            .unwrap_or(1);
        let mut candidates: Vec<String> = (newest + 1..=newest + 2)
            .map(|n| format!("{}_v{n}", s.base))
            .collect();
        if !SYMBOLS.iter().any(|x| x.base == s.base && x.per_thread) {
            candidates.push(format!("{}_ptsz", s.base));
        }
        for c in candidates {
            if let Ok(cs) = std::ffi::CString::new(c.clone())
                && !dlsym(h, &cs).is_null()
                && !found.contains(&c)
            {
                found.push(c);
            }
        }
    }
    found
}
