//! # gantry-vcuda: the in-container CUDA interception library
//!
//! Loaded into every process of a GPU container (`LD_PRELOAD` or an `/etc/ld.so.preload`
//! entry), it makes the container see and use only its share of each GPU: a **memory cap**
//! and a **compute share**. See `README.md` for the configuration format, how to load the
//! library, the symbol coverage table and the GPU bench.
//!
//! ## Layout
//! Pure logic, unit-tested without a GPU:
//! * [`config`]: the limits file (format version 1) and its validation;
//! * [`account`]: the shared memory account's layout and arithmetic;
//! * [`throttle`]: the compute-share control law and a simulator for it;
//! * [`symbols`]: the intercepted symbols per CUDA version and the `cuGetProcAddress` rule.
//!
//! FFI: `real` (finding the real driver), `shm` (the account file and its lock), `runtime`
//! (state behind the hooks), `exports` (the exported hooks and `dlsym`).
//!
//! ## Loading and symbol resolution
//! The library exports a function for every intercepted driver and NVML symbol and resolves
//! the real ones with `dlopen("libcuda.so.1")` / `dlopen("libnvidia-ml.so.1")` and the real
//! `dlsym` on those handles (`GANTRY_VCUDA_REAL_LIBCUDA` / `GANTRY_VCUDA_REAL_LIBNVML` name
//! other files, for tests). Exporting the symbols covers programs linked against the driver;
//! it does not cover programs that `dlopen` the driver and call `dlsym` on its handle (the CUDA
//! runtime does exactly that for `cuGetProcAddress`), because `dlsym(handle, ..)` searches
//! that library and its dependencies only, never preloaded objects. The library therefore
//! also exports `dlsym`: it asks the real `dlsym` and, when the answer is an intercepted
//! name, hands out the hook. `dlsym(RTLD_NEXT, ..)` is forwarded by a tail jump so that the
//! real `dlsym` still sees its true caller. `cuGetProcAddress` and `cuGetProcAddress_v2`
//! call the real one and swap the returned pointer for the hook of the same variant
//! (identified by address among the real variants, else by the version table).
//!
//! The real driver may call its own exported functions; a thread-local "inside a hook" flag
//! sends such nested calls straight to the real function. With no configuration file, or one
//! that limits nothing, every hook is a pure pass-through (one atomic load and a branch).
//!
//! ## Memory cap
//! All processes of the container share one account per device, in a file mapped by each
//! (`accountFile`). Each process owns a slot keyed by pid and start time; device usage is the
//! sum of the slots. An allocation first reserves its size under the file lock (refused with
//! `CUDA_ERROR_OUT_OF_MEMORY` past the cap), then calls the driver, then records the handle or
//! gives the reservation back; a free gives the recorded size back. Locking is `flock(2)`,
//! which the kernel releases when a holder dies; a dead process's slot (pid gone, zombie, or
//! pid reused with another start time) is reclaimed when an allocation would fail or usage
//! is reported. There is no shared total a crash could corrupt: a slot has one writer.
//! `cuMemGetInfo`, `cuDeviceTotalMem` and NVML's `nvmlDeviceGetMemoryInfo(_v2)` report
//! `total = cap` and `free = cap - container usage` (never more than the driver's free).
//!
//! ## Compute share
#![doc = include_str!("control_law.md")]
//!
//! ## Failing closed
//! A configuration that exists but is invalid (or an explicitly named one that is missing)
//! prints `gantry-vcuda: invalid configuration <path>: <reason>; GPU access denied` once on
//! stderr; `cuInit` and every intercepted allocation, free, memory query and launch return
//! `CUDA_ERROR_NOT_PERMITTED` (800), NVML's memory queries `NVML_ERROR_NO_PERMISSION`
//! (`cuGetProcAddress` keeps handing out the hooks). Nothing unwinds across the C boundary: an `extern "C"` function
//! that panicked would abort the process, and the code avoids panicking paths.

pub mod account;
pub mod config;
mod cuda;
#[cfg(not(test))]
mod exports;
mod log;
mod real;
mod runtime;
mod shm;
pub mod symbols;
pub mod throttle;
