//! The exported hooks: one `extern "C"` function per intercepted symbol, named exactly like
//! it, plus `dlsym`. Each hook decides quickly whether anything applies and otherwise calls the
//! real function, so that the pass-through path costs one load and a branch.
//!
//! A thread-local flag marks "inside a hook": if the real driver calls one of its own exported
//! functions and that call lands on a hook, the nested call goes straight to the real function
//! (no double charge, no self-deadlock).

#![allow(non_snake_case)]

use crate::account::{array_bytes, mipmap_bytes, pitch_estimate};
use crate::cuda::*;
use crate::real::{self, resolve_real_dlsym};
use crate::runtime::{Charge, Kind, Runtime, State, pitched, state};
use crate::symbols::{self, Id, Lib, SYMBOLS};
use crate::{log, real_fn};
use std::cell::Cell;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

struct Entered;

impl Drop for Entered {
    fn drop(&mut self) {
        IN_HOOK.with(|c| c.set(false));
    }
}

fn enter() -> Option<Entered> {
    (!IN_HOOK.with(|c| c.replace(true))).then_some(Entered)
}

fn once(flag: &AtomicBool, msg: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        log::error(msg);
    }
}

/// Memory hooks: deny on invalid configuration, act when a memory cap applies, else pass.
fn mem<R>(deny: R, pass: impl FnOnce() -> R, body: impl FnOnce(&Runtime) -> R) -> R {
    match state() {
        State::Denied => deny,
        State::Active(rt) if rt.memory => match enter() {
            Some(_g) => body(rt),
            None => pass(),
        },
        _ => pass(),
    }
}

/// Launch hooks: deny on invalid configuration, throttle when a share applies, else pass.
fn gate(stream: CUstream, key: usize, launch: impl FnOnce() -> CUresult) -> CUresult {
    match state() {
        State::Active(rt) if rt.throttle => match enter() {
            Some(_g) => rt.launch(stream, key, launch),
            None => launch(),
        },
        State::Denied => CUDA_ERROR_NOT_PERMITTED,
        _ => launch(),
    }
}

/// Reserves, allocates, then records or gives back.
fn charged(
    rt: &Runtime,
    entry: Option<usize>,
    bytes: u64,
    kind: Kind,
    run: impl FnOnce() -> (CUresult, u64),
) -> CUresult {
    let Some(entry) = entry.filter(|&e| rt.cap(e).is_some()) else {
        return run().0;
    };
    let c = Charge { entry, bytes };
    if let Err(code) = rt.reserve(entry, bytes) {
        return code;
    }
    let (r, key) = run();
    if r == CUDA_SUCCESS {
        rt.record(kind, key, c);
    } else {
        rt.unreserve(c);
    }
    r
}

/// Frees, then gives the charge back; the record is taken out first so that an address the
/// driver hands out again at once cannot be confused with the one being freed.
fn freed(rt: &Runtime, kind: Kind, key: u64, run: impl FnOnce() -> CUresult) -> CUresult {
    let rec = rt.take(kind, key);
    let r = run();
    match rec {
        Some(c) if r == CUDA_SUCCESS => rt.unreserve(c),
        Some(c) => rt.record(kind, key, c),
        None => {}
    }
    r
}

macro_rules! real_or {
    ($id:ident, $ty:ty, $err:expr) => {
        match real_fn!($id, $ty) {
            Some(f) => f,
            None => return $err,
        }
    };
}

const NF: CUresult = CUDA_ERROR_NOT_FOUND;
const DENY: CUresult = CUDA_ERROR_NOT_PERMITTED;

/// The stream a per-thread (`_ptsz`) variant really uses for the null stream.
fn per_thread(stream: CUstream) -> CUstream {
    if stream.is_null() {
        2 as CUstream // CU_STREAM_PER_THREAD
    } else {
        stream
    }
}

// ---- initialisation and entry points ------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    type F = unsafe extern "C" fn(c_uint) -> CUresult;
    if matches!(state(), State::Denied) {
        return DENY;
    }
    let f = real_or!(cuInit, F, NF);
    // SAFETY: forwarding the caller's arguments to the real function.
    let r = unsafe { f(flags) };
    static PROBED: AtomicBool = AtomicBool::new(false);
    if r == CUDA_SUCCESS
        && matches!(state(), State::Active(_))
        && !PROBED.swap(true, Ordering::Relaxed)
    {
        for name in real::probe_unknown_variants() {
            log::error(&format!(
                "the driver exports {name}, which this library does not intercept; \
                 limits may be bypassed through it"
            ));
        }
    }
    r
}

/// Replaces a real function pointer handed out by `cuGetProcAddress` with the hook of the
/// same variant: by identity with the real variants first, else by the version table.
unsafe fn substitute(symbol: *const c_char, pfn: *mut *mut c_void, ver: c_int, flags: u64) {
    if symbol.is_null() || pfn.is_null() || matches!(state(), State::PassThrough) {
        return;
    }
    // SAFETY: the caller's out-parameter, just written by the real driver.
    let p = unsafe { *pfn } as usize;
    if p == 0 {
        return;
    }
    // SAFETY: the caller passed a NUL-terminated symbol name (the driver accepted it).
    let base = unsafe { CStr::from_ptr(symbol) }.to_bytes();
    let mut family = SYMBOLS
        .iter()
        .filter(|s| s.lib == Lib::Cuda && s.base.as_bytes() == base)
        .peekable();
    if family.peek().is_none() {
        return;
    }
    let by_identity = family.find(|s| real::addr(s.id) == Some(p)).map(|s| s.id);
    let chosen = by_identity.or_else(|| {
        let v = u32::try_from(ver).unwrap_or(0);
        symbols::select(base, v, flags & PROC_ADDRESS_PER_THREAD != 0)
            .filter(|&id| real::addr(id).is_some())
    });
    match chosen {
        // SAFETY: the caller's out-parameter.
        Some(id) => unsafe { *pfn = hook_addr(id) as *mut c_void },
        None => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            once(
                &WARNED,
                &format!(
                    "cuGetProcAddress({}, {ver}) returned a variant this library does not \
                     intercept; limits may be bypassed through it",
                    String::from_utf8_lossy(base)
                ),
            );
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
) -> CUresult {
    type F = unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> CUresult;
    let f = real_or!(cuGetProcAddress, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(symbol, pfn, cuda_version, flags) };
    if r == CUDA_SUCCESS {
        // SAFETY: the caller's arguments, accepted by the driver.
        unsafe { substitute(symbol, pfn, cuda_version, flags) };
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    type F =
        unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CUresult;
    let f = real_or!(cuGetProcAddress_v2, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(symbol, pfn, cuda_version, flags, status) };
    if r == CUDA_SUCCESS {
        // SAFETY: the caller's arguments, accepted by the driver.
        unsafe { substitute(symbol, pfn, cuda_version, flags) };
    }
    r
}

// ---- allocations ----------------------------------------------------------------------------

/// Reads an out-parameter after a successful call.
macro_rules! out {
    ($r:expr, $p:expr) => {
        if $r == CUDA_SUCCESS {
            // SAFETY: the driver wrote the out-parameter on success.
            (unsafe { *$p }) as u64
        } else {
            0
        }
    };
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    type F = unsafe extern "C" fn(*mut CUdeviceptr, usize) -> CUresult;
    let f = real_or!(cuMemAlloc_v2, F, NF);
    // SAFETY (all closures): forwarding the caller's arguments.
    let call = || unsafe { f(dptr, bytesize) };
    mem(DENY, call, |rt| {
        charged(rt, rt.current_entry(), bytesize as u64, Kind::Ptr, || {
            let r = call();
            (r, out!(r, dptr))
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    flags: c_uint,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut CUdeviceptr, usize, c_uint) -> CUresult;
    let f = real_or!(cuMemAllocManaged, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(dptr, bytesize, flags) };
    mem(DENY, call, |rt| {
        charged(rt, rt.current_entry(), bytesize as u64, Kind::Ptr, || {
            let r = call();
            (r, out!(r, dptr))
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_size: c_uint,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut CUdeviceptr, *mut usize, usize, usize, c_uint) -> CUresult;
    type Free = unsafe extern "C" fn(CUdeviceptr) -> CUresult;
    let f = real_or!(cuMemAllocPitch_v2, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(dptr, pitch, width, height, element_size) };
    mem(DENY, call, |rt| {
        let Some(entry) = rt.current_entry().filter(|&e| rt.cap(e).is_some()) else {
            return call();
        };
        let est = pitch_estimate(width as u64, height as u64);
        if let Err(code) = rt.reserve(entry, est) {
            return code;
        }
        let r = call();
        if r != CUDA_SUCCESS {
            rt.unreserve(Charge { entry, bytes: est });
            return r;
        }
        let (ptr, actual) = (out!(r, dptr), pitched(out!(r, pitch), height as u64));
        if actual > est && rt.reserve(entry, actual - est).is_err() {
            if let Some(free) = real_fn!(cuMemFree_v2, Free) {
                // SAFETY: freeing the allocation just made.
                unsafe { free(ptr) };
            }
            rt.unreserve(Charge { entry, bytes: est });
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        if actual < est {
            rt.unreserve(Charge {
                entry,
                bytes: est - actual,
            });
        }
        rt.record(
            Kind::Ptr,
            ptr,
            Charge {
                entry,
                bytes: actual,
            },
        );
        r
    })
}

macro_rules! alloc_async {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            dptr: *mut CUdeviceptr,
            bytesize: usize,
            stream: CUstream,
        ) -> CUresult {
            type F = unsafe extern "C" fn(*mut CUdeviceptr, usize, CUstream) -> CUresult;
            let f = real_or!($name, F, NF);
            // SAFETY: forwarding the caller's arguments.
            let call = || unsafe { f(dptr, bytesize, stream) };
            mem(DENY, call, |rt| {
                charged(rt, rt.current_entry(), bytesize as u64, Kind::Ptr, || {
                    let r = call();
                    (r, out!(r, dptr))
                })
            })
        }
    };
}
alloc_async!(cuMemAllocAsync);
alloc_async!(cuMemAllocAsync_ptsz);

macro_rules! alloc_pool {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            dptr: *mut CUdeviceptr,
            bytesize: usize,
            pool: CUmemoryPool,
            stream: CUstream,
        ) -> CUresult {
            type F =
                unsafe extern "C" fn(*mut CUdeviceptr, usize, CUmemoryPool, CUstream) -> CUresult;
            let f = real_or!($name, F, NF);
            // SAFETY: forwarding the caller's arguments.
            let call = || unsafe { f(dptr, bytesize, pool, stream) };
            mem(DENY, call, |rt| {
                charged(rt, rt.current_entry(), bytesize as u64, Kind::Ptr, || {
                    let r = call();
                    (r, out!(r, dptr))
                })
            })
        }
    };
}
alloc_pool!(cuMemAllocFromPoolAsync);
alloc_pool!(cuMemAllocFromPoolAsync_ptsz);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const CUmemAllocationProp,
    flags: u64,
) -> CUresult {
    type F = unsafe extern "C" fn(
        *mut CUmemGenericAllocationHandle,
        usize,
        *const CUmemAllocationProp,
        u64,
    ) -> CUresult;
    let f = real_or!(cuMemCreate, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(handle, size, prop, flags) };
    mem(DENY, call, |rt| {
        // only device memory counts; host (NUMA) allocations through cuMemCreate do not
        // SAFETY: a non-null `prop` points at the caller's CUmemAllocationProp.
        let entry = (!prop.is_null())
            .then(|| unsafe { &*prop })
            .filter(|p| p.location_type == MEM_LOCATION_TYPE_DEVICE)
            .and_then(|p| rt.entry_for_device(p.location_id));
        charged(rt, entry, size as u64, Kind::Vmm, || {
            let r = call();
            (r, out!(r, handle))
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayCreate_v2(
    handle: *mut CUarray,
    desc: *const CUDA_ARRAY_DESCRIPTOR,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut CUarray, *const CUDA_ARRAY_DESCRIPTOR) -> CUresult;
    let f = real_or!(cuArrayCreate_v2, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(handle, desc) };
    mem(DENY, call, |rt| {
        // SAFETY: a non-null descriptor is the caller's.
        let bytes = unsafe { desc.as_ref() }.map_or(0, |d| {
            array_bytes(d.format, d.num_channels, d.width as u64, d.height as u64, 0)
        });
        charged(rt, rt.current_entry(), bytes, Kind::Array, || {
            let r = call();
            (r, out!(r, handle))
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArray3DCreate_v2(
    handle: *mut CUarray,
    desc: *const CUDA_ARRAY3D_DESCRIPTOR,
) -> CUresult {
    type F = unsafe extern "C" fn(*mut CUarray, *const CUDA_ARRAY3D_DESCRIPTOR) -> CUresult;
    let f = real_or!(cuArray3DCreate_v2, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(handle, desc) };
    mem(DENY, call, |rt| {
        // SAFETY: a non-null descriptor is the caller's.
        let bytes = unsafe { desc.as_ref() }.map_or(0, |d| {
            let (w, h, z) = (d.width as u64, d.height as u64, d.depth as u64);
            array_bytes(d.format, d.num_channels, w, h, z)
        });
        charged(rt, rt.current_entry(), bytes, Kind::Array, || {
            let r = call();
            (r, out!(r, handle))
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    handle: *mut CUmipmappedArray,
    desc: *const CUDA_ARRAY3D_DESCRIPTOR,
    levels: c_uint,
) -> CUresult {
    type F = unsafe extern "C" fn(
        *mut CUmipmappedArray,
        *const CUDA_ARRAY3D_DESCRIPTOR,
        c_uint,
    ) -> CUresult;
    let f = real_or!(cuMipmappedArrayCreate, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(handle, desc, levels) };
    mem(DENY, call, |rt| {
        // SAFETY: a non-null descriptor is the caller's.
        let bytes = unsafe { desc.as_ref() }.map_or(0, |d| {
            let (w, h, z) = (d.width as u64, d.height as u64, d.depth as u64);
            mipmap_bytes(d.format, d.num_channels, w, h, z, levels)
        });
        charged(rt, rt.current_entry(), bytes, Kind::Mipmap, || {
            let r = call();
            (r, out!(r, handle))
        })
    })
}

/// The pre-3.2 allocation ABI (32-bit device pointers) is refused while a cap applies.
fn legacy(rt: &Runtime) -> Option<CUresult> {
    rt.current_entry().and_then(|e| rt.cap(e))?;
    static WARNED: AtomicBool = AtomicBool::new(false);
    once(
        &WARNED,
        "a pre-CUDA-3.2 allocation entry point was called under a memory cap; refused",
    );
    Some(CUDA_ERROR_NOT_SUPPORTED)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc(dptr: *mut CUdeviceptr_v1, bytesize: c_uint) -> CUresult {
    type F = unsafe extern "C" fn(*mut CUdeviceptr_v1, c_uint) -> CUresult;
    let f = real_or!(cuMemAlloc, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(dptr, bytesize) };
    mem(DENY, call, |rt| legacy(rt).unwrap_or_else(call))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch(
    dptr: *mut CUdeviceptr_v1,
    pitch: *mut c_uint,
    width: c_uint,
    height: c_uint,
    element_size: c_uint,
) -> CUresult {
    type F =
        unsafe extern "C" fn(*mut CUdeviceptr_v1, *mut c_uint, c_uint, c_uint, c_uint) -> CUresult;
    let f = real_or!(cuMemAllocPitch, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(dptr, pitch, width, height, element_size) };
    mem(DENY, call, |rt| legacy(rt).unwrap_or_else(call))
}

macro_rules! legacy_array {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(handle: *mut CUarray, desc: *const c_void) -> CUresult {
            type F = unsafe extern "C" fn(*mut CUarray, *const c_void) -> CUresult;
            let f = real_or!($name, F, NF);
            // SAFETY: forwarding the caller's arguments.
            let call = || unsafe { f(handle, desc) };
            mem(DENY, call, |rt| legacy(rt).unwrap_or_else(call))
        }
    };
}
legacy_array!(cuArrayCreate);
legacy_array!(cuArray3DCreate);

// ---- frees ----------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    type F = unsafe extern "C" fn(CUdeviceptr) -> CUresult;
    let f = real_or!(cuMemFree_v2, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(dptr) };
    mem(DENY, call, |rt| freed(rt, Kind::Ptr, dptr, call))
}

macro_rules! free_async {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
            type F = unsafe extern "C" fn(CUdeviceptr, CUstream) -> CUresult;
            let f = real_or!($name, F, NF);
            // SAFETY: forwarding the caller's arguments.
            let call = || unsafe { f(dptr, stream) };
            mem(DENY, call, |rt| freed(rt, Kind::Ptr, dptr, call))
        }
    };
}
free_async!(cuMemFreeAsync);
free_async!(cuMemFreeAsync_ptsz);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult {
    type F = unsafe extern "C" fn(CUmemGenericAllocationHandle) -> CUresult;
    let f = real_or!(cuMemRelease, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(handle) };
    mem(DENY, call, |rt| freed(rt, Kind::Vmm, handle, call))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayDestroy(handle: CUarray) -> CUresult {
    type F = unsafe extern "C" fn(CUarray) -> CUresult;
    let f = real_or!(cuArrayDestroy, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(handle) };
    mem(DENY, call, |rt| freed(rt, Kind::Array, handle as u64, call))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(handle: CUmipmappedArray) -> CUresult {
    type F = unsafe extern "C" fn(CUmipmappedArray) -> CUresult;
    let f = real_or!(cuMipmappedArrayDestroy, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(handle) };
    mem(DENY, call, |rt| {
        freed(rt, Kind::Mipmap, handle as u64, call)
    })
}

// ---- memory queries -------------------------------------------------------------------------

/// `(total, free)` as the container should see them, from the driver's figures.
fn capped_view(rt: &Runtime, entry: Option<usize>, total: u64, free: u64) -> Option<(u64, u64)> {
    let entry = entry?;
    let cap = rt.cap(entry)?.min(total);
    let used = rt.used(entry);
    Some((cap, free.min(cap.saturating_sub(used))))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    type F = unsafe extern "C" fn(*mut usize, *mut usize) -> CUresult;
    let f = real_or!(cuMemGetInfo_v2, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(free, total) };
    mem(DENY, call, |rt| {
        let r = call();
        if r == CUDA_SUCCESS
            && let Some((t, fr)) =
                capped_view(rt, rt.current_entry(), out!(r, total), out!(r, free))
        {
            // SAFETY: the driver accepted (and wrote) both out-parameters.
            unsafe {
                *total = t as usize;
                *free = fr as usize;
            }
        }
        r
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CUresult {
    type F = unsafe extern "C" fn(*mut c_uint, *mut c_uint) -> CUresult;
    let f = real_or!(cuMemGetInfo, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(free, total) };
    mem(DENY, call, |rt| {
        let r = call();
        if r == CUDA_SUCCESS
            && let Some((t, fr)) =
                capped_view(rt, rt.current_entry(), out!(r, total), out!(r, free))
        {
            // SAFETY: the driver accepted (and wrote) both out-parameters.
            unsafe {
                *total = t.min(u64::from(c_uint::MAX)) as c_uint;
                *free = fr.min(u64::from(c_uint::MAX)) as c_uint;
            }
        }
        r
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    type F = unsafe extern "C" fn(*mut usize, CUdevice) -> CUresult;
    let f = real_or!(cuDeviceTotalMem_v2, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(bytes, dev) };
    mem(DENY, call, |rt| {
        let r = call();
        if let Some(cap) = rt.entry_for_device(dev).and_then(|e| rt.cap(e))
            && r == CUDA_SUCCESS
        {
            // SAFETY: the driver wrote the out-parameter.
            unsafe { *bytes = (*bytes).min(cap as usize) };
        }
        r
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem(bytes: *mut c_uint, dev: CUdevice) -> CUresult {
    type F = unsafe extern "C" fn(*mut c_uint, CUdevice) -> CUresult;
    let f = real_or!(cuDeviceTotalMem, F, NF);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(bytes, dev) };
    mem(DENY, call, |rt| {
        let r = call();
        if let Some(cap) = rt.entry_for_device(dev).and_then(|e| rt.cap(e))
            && r == CUDA_SUCCESS
        {
            // SAFETY: the driver wrote the out-parameter.
            unsafe { *bytes = u64::from(*bytes).min(cap) as c_uint };
        }
        r
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    type F = unsafe extern "C" fn(nvmlDevice_t, *mut nvmlMemory_t) -> nvmlReturn_t;
    let f = real_or!(nvmlDeviceGetMemoryInfo, F, NVML_ERROR_FUNCTION_NOT_FOUND);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(device, memory) };
    mem(NVML_ERROR_NO_PERMISSION, call, |rt| {
        let r = call();
        // SAFETY: on success the driver filled the caller's struct.
        if r == NVML_SUCCESS
            && let Some(m) = unsafe { memory.as_mut() }
            && let Some((t, fr)) = capped_view(rt, rt.entry_for_nvml(device), m.total, m.free)
        {
            m.total = t;
            m.free = fr;
            m.used = t - fr;
        }
        r
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    type F = unsafe extern "C" fn(nvmlDevice_t, *mut nvmlMemory_v2_t) -> nvmlReturn_t;
    let f = real_or!(nvmlDeviceGetMemoryInfo_v2, F, NVML_ERROR_FUNCTION_NOT_FOUND);
    // SAFETY: forwarding the caller's arguments.
    let call = || unsafe { f(device, memory) };
    mem(NVML_ERROR_NO_PERMISSION, call, |rt| {
        let r = call();
        // SAFETY: on success the driver filled the caller's struct.
        if r == NVML_SUCCESS
            && let Some(m) = unsafe { memory.as_mut() }
            && let Some((t, fr)) = capped_view(rt, rt.entry_for_nvml(device), m.total, m.free)
        {
            m.total = t;
            m.reserved = 0;
            m.free = fr;
            m.used = t - fr;
        }
        r
    })
}

// ---- launches -------------------------------------------------------------------------------

macro_rules! launch_kernel {
    ($name:ident, $pt:expr) => {
        #[unsafe(no_mangle)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "C" fn $name(
            func: CUfunction,
            gx: c_uint,
            gy: c_uint,
            gz: c_uint,
            bx: c_uint,
            by: c_uint,
            bz: c_uint,
            shared: c_uint,
            stream: CUstream,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> CUresult {
            type F = unsafe extern "C" fn(
                CUfunction,
                c_uint,
                c_uint,
                c_uint,
                c_uint,
                c_uint,
                c_uint,
                c_uint,
                CUstream,
                *mut *mut c_void,
                *mut *mut c_void,
            ) -> CUresult;
            let f = real_or!($name, F, NF);
            let s = if $pt { per_thread(stream) } else { stream };
            // SAFETY: forwarding the caller's arguments.
            gate(s, func as usize, || unsafe {
                f(func, gx, gy, gz, bx, by, bz, shared, stream, params, extra)
            })
        }
    };
}
launch_kernel!(cuLaunchKernel, false);
launch_kernel!(cuLaunchKernel_ptsz, true);

macro_rules! launch_kernel_ex {
    ($name:ident, $pt:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            config: *const CUlaunchConfig,
            func: CUfunction,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> CUresult {
            type F = unsafe extern "C" fn(
                *const CUlaunchConfig,
                CUfunction,
                *mut *mut c_void,
                *mut *mut c_void,
            ) -> CUresult;
            let f = real_or!($name, F, NF);
            // SAFETY: a non-null config is the caller's.
            let stream = unsafe { config.as_ref() }.map_or(std::ptr::null_mut(), |c| c.h_stream);
            let s = if $pt { per_thread(stream) } else { stream };
            // SAFETY: forwarding the caller's arguments.
            gate(s, func as usize, || unsafe {
                f(config, func, params, extra)
            })
        }
    };
}
launch_kernel_ex!(cuLaunchKernelEx, false);
launch_kernel_ex!(cuLaunchKernelEx_ptsz, true);

macro_rules! launch_cooperative {
    ($name:ident, $pt:expr) => {
        #[unsafe(no_mangle)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "C" fn $name(
            func: CUfunction,
            gx: c_uint,
            gy: c_uint,
            gz: c_uint,
            bx: c_uint,
            by: c_uint,
            bz: c_uint,
            shared: c_uint,
            stream: CUstream,
            params: *mut *mut c_void,
        ) -> CUresult {
            type F = unsafe extern "C" fn(
                CUfunction,
                c_uint,
                c_uint,
                c_uint,
                c_uint,
                c_uint,
                c_uint,
                c_uint,
                CUstream,
                *mut *mut c_void,
            ) -> CUresult;
            let f = real_or!($name, F, NF);
            let s = if $pt { per_thread(stream) } else { stream };
            // SAFETY: forwarding the caller's arguments.
            gate(s, func as usize, || unsafe {
                f(func, gx, gy, gz, bx, by, bz, shared, stream, params)
            })
        }
    };
}
launch_cooperative!(cuLaunchCooperativeKernel, false);
launch_cooperative!(cuLaunchCooperativeKernel_ptsz, true);

macro_rules! graph_launch {
    ($name:ident, $pt:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(exec: CUgraphExec, stream: CUstream) -> CUresult {
            type F = unsafe extern "C" fn(CUgraphExec, CUstream) -> CUresult;
            let f = real_or!($name, F, NF);
            let s = if $pt { per_thread(stream) } else { stream };
            // SAFETY: forwarding the caller's arguments.
            gate(s, exec as usize, || unsafe { f(exec, stream) })
        }
    };
}
graph_launch!(cuGraphLaunch, false);
graph_launch!(cuGraphLaunch_ptsz, true);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunch(func: CUfunction) -> CUresult {
    type F = unsafe extern "C" fn(CUfunction) -> CUresult;
    let f = real_or!(cuLaunch, F, NF);
    // SAFETY: forwarding the caller's arguments.
    gate(std::ptr::null_mut(), func as usize, || unsafe { f(func) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchGrid(func: CUfunction, w: c_int, h: c_int) -> CUresult {
    type F = unsafe extern "C" fn(CUfunction, c_int, c_int) -> CUresult;
    let f = real_or!(cuLaunchGrid, F, NF);
    // SAFETY: forwarding the caller's arguments.
    gate(std::ptr::null_mut(), func as usize, || unsafe {
        f(func, w, h)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchGridAsync(
    func: CUfunction,
    w: c_int,
    h: c_int,
    stream: CUstream,
) -> CUresult {
    type F = unsafe extern "C" fn(CUfunction, c_int, c_int, CUstream) -> CUresult;
    let f = real_or!(cuLaunchGridAsync, F, NF);
    // SAFETY: forwarding the caller's arguments.
    gate(stream, func as usize, || unsafe { f(func, w, h, stream) })
}

// ---- dlsym ----------------------------------------------------------------------------------

/// Address of the hook for `id`.
pub fn hook_addr(id: Id) -> usize {
    macro_rules! table {
        ($($n:ident),* $(,)?) => {
            match id { $(Id::$n => $n as *const () as usize),* }
        };
    }
    table!(
        cuInit,
        cuGetProcAddress,
        cuGetProcAddress_v2,
        cuMemAlloc,
        cuMemAlloc_v2,
        cuMemAllocPitch,
        cuMemAllocPitch_v2,
        cuMemAllocManaged,
        cuMemAllocAsync,
        cuMemAllocAsync_ptsz,
        cuMemAllocFromPoolAsync,
        cuMemAllocFromPoolAsync_ptsz,
        cuMemCreate,
        cuArrayCreate,
        cuArrayCreate_v2,
        cuArray3DCreate,
        cuArray3DCreate_v2,
        cuMipmappedArrayCreate,
        cuMemFree_v2,
        cuMemFreeAsync,
        cuMemFreeAsync_ptsz,
        cuMemRelease,
        cuArrayDestroy,
        cuMipmappedArrayDestroy,
        cuMemGetInfo,
        cuMemGetInfo_v2,
        cuDeviceTotalMem,
        cuDeviceTotalMem_v2,
        cuLaunchKernel,
        cuLaunchKernel_ptsz,
        cuLaunchKernelEx,
        cuLaunchKernelEx_ptsz,
        cuLaunchCooperativeKernel,
        cuLaunchCooperativeKernel_ptsz,
        cuGraphLaunch,
        cuGraphLaunch_ptsz,
        cuLaunch,
        cuLaunchGrid,
        cuLaunchGridAsync,
        nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetMemoryInfo_v2,
    )
}

/// `dlsym` for every handle but `RTLD_NEXT`: asks the real `dlsym`, and when the name is an
/// intercepted symbol that the handle does provide, answers with the hook instead. This is what
/// catches runtimes that `dlopen` the driver and look functions up on its handle, which an
/// exported symbol alone cannot: `dlsym(handle, ..)` searches only that library and its
/// dependencies, never the preloaded ones. It never loads anything or reads the configuration,
/// so it is safe in any context (including the real driver's own initialisation).
unsafe extern "C" fn dlsym_impl(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let p = real::dlsym_raw(handle, name);
    if p.is_null() || name.is_null() {
        return p;
    }
    // SAFETY: dlsym found the name, so it is a NUL-terminated string.
    let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
    match symbols::by_name(bytes) {
        Some(id) => hook_addr(id) as *mut c_void,
        None => p,
    }
}

// `dlsym(RTLD_NEXT, ..)` must see its real caller's return address: glibc searches the
// objects after the caller's. So the exported `dlsym` is a trampoline that tail-jumps to the
// real one for RTLD_NEXT (return address untouched) and to `dlsym_impl` otherwise.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    core::arch::naked_asm!(
        "cmp rdi, -1",
        "jne {imp}",
        "mov rax, qword ptr [rip + {real}]",
        "test rax, rax",
        "jz 2f",
        "jmp rax",
        "2:",
        "push rdi",
        "push rsi",
        "sub rsp, 8",
        "call {resolve}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "test rax, rax",
        "jz {imp}",
        "jmp rax",
        imp = sym dlsym_impl,
        real = sym real::GANTRY_VCUDA_REAL_DLSYM,
        resolve = sym resolve_real_dlsym,
    )
}

/// Other architectures: a plain wrapper; `RTLD_NEXT` is then resolved relative to this
/// library rather than to the caller.
#[cfg(not(target_arch = "x86_64"))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // SAFETY: forwarding the caller's arguments.
    unsafe { dlsym_impl(handle, name) }
}

extern "C" fn init() {
    resolve_real_dlsym();
}

/// Resolves the real `dlsym` before anybody calls the trampoline.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;
