//! Process-wide state behind the hooks: the configuration, the device mapping, the memory
//! account and the launch meter. Everything the hooks do besides calling the real driver.

#![cfg_attr(test, allow(dead_code))]

use crate::account::Table;
use crate::config::{self, Config, Loaded, Mode};
use crate::cuda::*;
use crate::shm::{self, Account};
use crate::throttle::{Estimator, LAW, effective_share};
use crate::{aux, log};
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_uint};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// What the library does in this process, decided once at the first intercepted call.
pub enum State {
    /// No configuration or nothing limited: every hook calls the real driver and nothing else.
    PassThrough,
    /// The configuration is invalid: the GPU is denied (fail closed).
    Denied,
    Active(Box<Runtime>),
}

static STATE: OnceLock<State> = OnceLock::new();

pub fn state() -> &'static State {
    STATE.get_or_init(
        || match config::load(std::env::var(config::CONFIG_ENV).ok()) {
            Loaded::Absent => State::PassThrough,
            Loaded::Invalid { path, error } => {
                log::error(&format!(
                    "invalid configuration {path}: {error}; GPU access denied"
                ));
                State::Denied
            }
            Loaded::Valid(c) if c.is_noop() => State::PassThrough,
            Loaded::Valid(c) => State::Active(Box::new(Runtime::new(c))),
        },
    )
}

/// What a tracked allocation handle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Ptr,
    Vmm,
    Array,
    Mipmap,
}

#[derive(Debug, Clone, Copy)]
pub struct Charge {
    pub entry: usize,
    pub bytes: u64,
}

struct Proc {
    pid: i32,
    account: Option<&'static Account>,
    account_failed: bool,
    slot: Option<usize>,
    allocs: HashMap<(Kind, u64), Charge>,
}

struct Pending {
    ctx: usize,
    start: usize,
    end: usize,
    entry: usize,
    key: usize,
    est: i64,
    share: f64,
}

struct Meter {
    pid: i32,
    pool: HashMap<usize, Vec<(usize, usize)>>,
    pending: VecDeque<Pending>,
    est: Estimator,
}

#[derive(Default)]
struct Soft {
    last_ns: i64,
    last_consumed: u64,
    share: Option<f64>,
}

const MAX_ORDINALS: usize = 64;
const MAX_PENDING: usize = 256;
const SOFT_SAMPLE_NS: i64 = 500_000_000;

pub struct Runtime {
    pub config: Config,
    pub memory: bool,
    pub throttle: bool,
    /// CUDA ordinal -> limit entry + 1; 0 unknown, -1 no limit.
    ordinals: [AtomicI32; MAX_ORDINALS],
    nvml: Mutex<HashMap<usize, Option<usize>>>,
    proc: Mutex<Proc>,
    meter: Mutex<Meter>,
    soft: Vec<Mutex<Soft>>,
    fallback: OnceLock<&'static Table>,
}

fn pid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

pub fn now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn once(flag: &AtomicBool, msg: impl FnOnce() -> String) {
    if !flag.swap(true, Ordering::Relaxed) {
        log::error(&msg());
    }
}

type CtxGetDevice = unsafe extern "C" fn(*mut CUdevice) -> CUresult;
type CtxGetCurrent = unsafe extern "C" fn(*mut CUcontext) -> CUresult;
type DeviceGetUuid = unsafe extern "C" fn(*mut [u8; 16], CUdevice) -> CUresult;
type StreamIsCapturing = unsafe extern "C" fn(CUstream, *mut c_int) -> CUresult;
type EventCreate = unsafe extern "C" fn(*mut CUevent, c_uint) -> CUresult;
type EventRecord = unsafe extern "C" fn(CUevent, CUstream) -> CUresult;
type EventQuery = unsafe extern "C" fn(CUevent) -> CUresult;
type EventDestroy = unsafe extern "C" fn(CUevent) -> CUresult;
type EventElapsed = unsafe extern "C" fn(*mut f32, CUevent, CUevent) -> CUresult;
type NvmlGetUuid = unsafe extern "C" fn(nvmlDevice_t, *mut u8, c_uint) -> nvmlReturn_t;
type NvmlGetIndex = unsafe extern "C" fn(nvmlDevice_t, *mut c_uint) -> nvmlReturn_t;
type NvmlInit = unsafe extern "C" fn() -> nvmlReturn_t;
type NvmlByUuid = unsafe extern "C" fn(*const u8, *mut nvmlDevice_t) -> nvmlReturn_t;
type NvmlByIndex = unsafe extern "C" fn(c_uint, *mut nvmlDevice_t) -> nvmlReturn_t;
type NvmlUtil = unsafe extern "C" fn(nvmlDevice_t, *mut nvmlUtilization_t) -> nvmlReturn_t;

impl Runtime {
    pub fn new(config: Config) -> Runtime {
        let soft = config.devices.iter().map(|_| Mutex::default()).collect();
        Runtime {
            memory: config.any_memory_cap(),
            throttle: config.any_throttle(),
            config,
            ordinals: [const { AtomicI32::new(0) }; MAX_ORDINALS],
            nvml: Mutex::new(HashMap::new()),
            proc: Mutex::new(Proc {
                pid: pid(),
                account: None,
                account_failed: false,
                slot: None,
                allocs: HashMap::new(),
            }),
            meter: Mutex::new(Meter {
                pid: pid(),
                pool: HashMap::new(),
                pending: VecDeque::new(),
                est: Estimator::default(),
            }),
            soft,
            fallback: OnceLock::new(),
        }
    }

    pub fn cap(&self, entry: usize) -> Option<u64> {
        self.config.devices.get(entry)?.memory_bytes
    }

    // ---- devices -------------------------------------------------------------------------

    fn resolve_ordinal(&self, dev: CUdevice) -> Option<usize> {
        let mut uuid = [0u8; 16];
        let got = [
            aux!(Cuda, "cuDeviceGetUuid_v2", DeviceGetUuid),
            aux!(Cuda, "cuDeviceGetUuid", DeviceGetUuid),
        ]
        .into_iter()
        .flatten()
        // SAFETY: `uuid` is a 16-byte out-parameter, as CUuuid is.
        .any(|f| unsafe { f(&mut uuid, dev) } == CUDA_SUCCESS);
        let uuid = got.then(|| config::format_uuid(&uuid));
        self.config.find(uuid.as_deref(), u32::try_from(dev).ok())
    }

    /// The limit entry of a CUDA device ordinal.
    pub fn entry_for_device(&self, dev: CUdevice) -> Option<usize> {
        let Some(cell) = usize::try_from(dev).ok().and_then(|d| self.ordinals.get(d)) else {
            return self.resolve_ordinal(dev);
        };
        match cell.load(Ordering::Relaxed) {
            0 => {
                let e = self.resolve_ordinal(dev);
                cell.store(e.map_or(-1, |e| e as i32 + 1), Ordering::Relaxed);
                e
            }
            c if c > 0 => Some(c as usize - 1),
            _ => None,
        }
    }

    /// The limit entry of the current context's device.
    pub fn current_entry(&self) -> Option<usize> {
        let f = aux!(Cuda, "cuCtxGetDevice", CtxGetDevice)?;
        let mut dev: CUdevice = 0;
        // SAFETY: valid out-parameter.
        (unsafe { f(&mut dev) } == CUDA_SUCCESS)
            .then(|| self.entry_for_device(dev))
            .flatten()
    }

    /// The limit entry of an NVML device handle.
    pub fn entry_for_nvml(&self, device: nvmlDevice_t) -> Option<usize> {
        let key = device as usize;
        let mut map = self.nvml.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(&key) {
            return *e;
        }
        let mut buf = [0u8; 96];
        // SAFETY: the buffer and its length match; NVML NUL-terminates.
        let uuid = aux!(Nvml, "nvmlDeviceGetUUID", NvmlGetUuid)
            .filter(|f| unsafe { f(device, buf.as_mut_ptr(), buf.len() as c_uint) } == NVML_SUCCESS)
            .and_then(|_| std::ffi::CStr::from_bytes_until_nul(&buf).ok())
            .and_then(|c| c.to_str().ok())
            .map(str::to_string);
        let mut idx: c_uint = 0;
        // SAFETY: valid out-parameter.
        let index = aux!(Nvml, "nvmlDeviceGetIndex", NvmlGetIndex)
            .filter(|f| unsafe { f(device, &mut idx) } == NVML_SUCCESS)
            .map(|_| idx);
        let e = self.config.find(uuid.as_deref(), index);
        map.insert(key, e);
        e
    }

    // ---- memory account ------------------------------------------------------------------

    fn proc(&self) -> MutexGuard<'_, Proc> {
        let mut p = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        let me = pid();
        if p.pid != me {
            // a forked child: new slot, none of the parent's allocations, own file lock
            *p = Proc {
                pid: me,
                account: None,
                account_failed: false,
                slot: None,
                allocs: HashMap::new(),
            };
        }
        p
    }

    fn account(&self, p: &mut Proc) -> Option<&'static Account> {
        if p.account.is_none() && !p.account_failed {
            match Account::open(&self.config.account_file) {
                Ok(a) => p.account = Some(Box::leak(Box::new(a))),
                Err(e) => {
                    p.account_failed = true;
                    log::error(&format!(
                        "{e}; memory limits cannot be enforced, allocations are refused"
                    ));
                }
            }
        }
        p.account
    }

    /// Runs `f` on the locked table with this process's slot.
    fn with_slot<R>(&self, f: impl FnOnce(&Table, usize) -> R) -> Option<R> {
        let mut p = self.proc();
        let acct = self.account(&mut p)?;
        let t = acct.lock();
        let slot = match p.slot {
            Some(s) if t.slots[s].pid.load(Ordering::Relaxed) == p.pid => s,
            _ => {
                let me = p.pid;
                let s = t.claim(me, shm::start_time(me), &shm::alive);
                if s.is_none() {
                    static FULL: AtomicBool = AtomicBool::new(false);
                    once(&FULL, || "account file has no free process slot".into());
                }
                p.slot = s;
                s?
            }
        };
        Some(f(&t, slot))
    }

    /// Charges `bytes` on `entry` before an allocation; `Err` is the CUDA error to return.
    pub fn reserve(&self, entry: usize, bytes: u64) -> Result<(), CUresult> {
        let Some(cap) = self.cap(entry) else {
            return Ok(());
        };
        let r = self.with_slot(|t, slot| {
            t.try_charge(slot, entry, bytes, cap).or_else(|_| {
                t.reclaim_dead(&shm::alive);
                t.try_charge(slot, entry, bytes, cap)
            })
        });
        match r {
            Some(Ok(())) => Ok(()),
            Some(Err(used)) => {
                if log::debug() {
                    log::error(&format!(
                        "refused {bytes} bytes on device entry {entry}: {used} of {cap} in use"
                    ));
                }
                Err(CUDA_ERROR_OUT_OF_MEMORY)
            }
            None => Err(CUDA_ERROR_OUT_OF_MEMORY),
        }
    }

    /// Gives back a reservation whose allocation failed, or a freed allocation.
    pub fn unreserve(&self, c: Charge) {
        if self.cap(c.entry).is_some() {
            self.with_slot(|t, slot| t.uncharge(slot, c.entry, c.bytes));
        }
    }

    pub fn record(&self, kind: Kind, key: u64, c: Charge) {
        self.proc().allocs.insert((kind, key), c);
    }

    /// Removes the record of an allocation about to be freed.
    pub fn take(&self, kind: Kind, key: u64) -> Option<Charge> {
        self.proc().allocs.remove(&(kind, key))
    }

    /// Bytes the container uses on `entry`, after reclaiming dead processes' slots.
    pub fn used(&self, entry: usize) -> u64 {
        let mut p = self.proc();
        let Some(acct) = self.account(&mut p) else {
            return 0;
        };
        let t = acct.lock();
        t.reclaim_dead(&shm::alive);
        t.used(entry)
    }

    // ---- compute throttle ----------------------------------------------------------------

    fn table(&self) -> &'static Table {
        let shared = {
            let mut p = self.proc();
            self.account(&mut p).map(Account::table)
        };
        shared.unwrap_or_else(|| self.fallback.get_or_init(|| Box::leak(Table::new_boxed())))
    }

    fn share(&self, entry: usize, table: &Table, now: i64) -> f64 {
        let d = &self.config.devices[entry];
        let share = f64::from(d.compute_percent) / 100.0;
        if d.mode != Mode::Soft {
            return share;
        }
        let mut s = self.soft[entry].lock().unwrap_or_else(|e| e.into_inner());
        if now - s.last_ns < SOFT_SAMPLE_NS {
            return s.share.unwrap_or(share);
        }
        let consumed = table.devices[entry].consumed_ns.load(Ordering::Relaxed);
        let own = if s.last_ns == 0 {
            0.0
        } else {
            consumed.saturating_sub(s.last_consumed) as f64 / (now - s.last_ns) as f64
        };
        s.last_ns = now;
        s.last_consumed = consumed;
        s.share = self
            .device_utilisation(entry)
            .map(|u| effective_share(share, true, u, own));
        s.share.unwrap_or(share)
    }

    fn device_utilisation(&self, entry: usize) -> Option<f64> {
        static INIT: OnceLock<bool> = OnceLock::new();
        let ok = *INIT.get_or_init(|| {
            // SAFETY: nvmlInit_v2 takes no arguments.
            aux!(Nvml, "nvmlInit_v2", NvmlInit).is_some_and(|f| unsafe { f() } == NVML_SUCCESS)
        });
        if !ok {
            return None;
        }
        let mut dev: nvmlDevice_t = std::ptr::null_mut();
        let found = match &self.config.devices[entry].selector {
            config::DeviceSelector::Uuid(u) => {
                let c = std::ffi::CString::new(u.as_str()).ok()?;
                // SAFETY: NUL-terminated UUID and a valid out-parameter.
                aux!(Nvml, "nvmlDeviceGetHandleByUUID", NvmlByUuid)
                    .is_some_and(|f| unsafe { f(c.as_ptr().cast(), &mut dev) } == NVML_SUCCESS)
            }
            config::DeviceSelector::Index(i) => {
                // SAFETY: valid out-parameter.
                aux!(Nvml, "nvmlDeviceGetHandleByIndex_v2", NvmlByIndex)
                    .is_some_and(|f| unsafe { f(*i, &mut dev) } == NVML_SUCCESS)
            }
        };
        let mut u = nvmlUtilization_t { gpu: 0, memory: 0 };
        // SAFETY: `dev` came from NVML; valid out-parameter.
        (found
            && aux!(Nvml, "nvmlDeviceGetUtilizationRates", NvmlUtil)
                .is_some_and(|f| unsafe { f(dev, &mut u) } == NVML_SUCCESS))
        .then(|| f64::from(u.gpu) / 100.0)
    }

    fn meter(&self) -> MutexGuard<'_, Meter> {
        let mut m = self.meter.lock().unwrap_or_else(|e| e.into_inner());
        let me = pid();
        if m.pid != me {
            // the parent's events are meaningless in a forked child
            m.pid = me;
            m.pool.clear();
            m.pending.clear();
        }
        m
    }

    /// Folds completed launches into the clock; `block` waits for the oldest one first.
    fn drain(&self, m: &mut Meter, table: &Table, block: bool) {
        let (Some(query), Some(elapsed)) = (
            aux!(Cuda, "cuEventQuery", EventQuery),
            aux!(Cuda, "cuEventElapsedTime", EventElapsed),
        ) else {
            m.pending.clear();
            return;
        };
        if block
            && let (Some(p), Some(sync)) = (
                m.pending.front(),
                aux!(Cuda, "cuEventSynchronize", EventQuery),
            )
        {
            // SAFETY: an event this library created and recorded.
            unsafe { sync(p.end as CUevent) };
        }
        let destroy = aux!(Cuda, "cuEventDestroy_v2", EventDestroy);
        let mut i = 0;
        while i < m.pending.len() {
            let p = &m.pending[i];
            // SAFETY: events this library created and recorded.
            let q = unsafe { query(p.end as CUevent) };
            if q == CUDA_ERROR_NOT_READY {
                i += 1;
                continue;
            }
            let Some(p) = m.pending.remove(i) else { break };
            let mut ms = 0f32;
            // SAFETY: both events were recorded and have completed; valid out-parameter.
            let ok = q == CUDA_SUCCESS
                && unsafe { elapsed(&mut ms, p.start as CUevent, p.end as CUevent) }
                    == CUDA_SUCCESS;
            let clock = &table.devices[p.entry];
            if ok {
                let ns = (f64::from(ms) * 1e6) as i64;
                LAW.correct_shared(&clock.vclock, ns, p.est, p.share);
                clock
                    .consumed_ns
                    .fetch_add(ns.max(0) as u64, Ordering::Relaxed);
                m.est.observe(p.key, ns);
                m.pool.entry(p.ctx).or_default().push((p.start, p.end));
            } else {
                // context gone or event broken: the estimate stays charged, the events go
                if let Some(d) = destroy {
                    // SAFETY: events this library created; errors are ignored.
                    unsafe {
                        d(p.start as CUevent);
                        d(p.end as CUevent);
                    }
                }
            }
        }
    }

    fn events(&self, m: &mut Meter, ctx: usize) -> Option<(usize, usize)> {
        if let Some(e) = m.pool.get_mut(&ctx).and_then(Vec::pop) {
            return Some(e);
        }
        let create = aux!(Cuda, "cuEventCreate", EventCreate)?;
        let (mut a, mut b): (CUevent, CUevent) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: valid out-parameters; timing-enabled events in the current context.
        let ok = unsafe { create(&mut a, EVENT_DEFAULT) == CUDA_SUCCESS }
            && unsafe { create(&mut b, EVENT_DEFAULT) == CUDA_SUCCESS };
        ok.then_some((a as usize, b as usize))
    }

    /// Runs a kernel or graph launch on `stream` under the compute share of the current
    /// device. `key` identifies the function or graph for the cost estimate.
    pub fn launch(
        &self,
        stream: CUstream,
        key: usize,
        launch: impl FnOnce() -> CUresult,
    ) -> CUresult {
        let Some(entry) = self
            .current_entry()
            .filter(|&e| self.config.devices[e].throttled())
        else {
            return launch();
        };
        // work captured into a graph does not run now; it is charged when the graph launches
        let mut status: c_int = STREAM_CAPTURE_STATUS_NONE;
        let capturing = aux!(Cuda, "cuStreamIsCapturing", StreamIsCapturing)
            // SAFETY: valid out-parameter; the stream is the caller's.
            .is_none_or(|f| unsafe { f(stream, &mut status) } != CUDA_SUCCESS)
            || status != STREAM_CAPTURE_STATUS_NONE;
        let (Some(record), Some(get_ctx)) = (
            aux!(Cuda, "cuEventRecord", EventRecord),
            aux!(Cuda, "cuCtxGetCurrent", CtxGetCurrent),
        ) else {
            return launch();
        };
        if capturing {
            return launch();
        }
        let table = self.table();
        let clock = &table.devices[entry].vclock;
        let mut now;
        let mut share;
        let mut est;
        loop {
            now = now_ns();
            share = self.share(entry, table, now);
            {
                let mut m = self.meter();
                // a launch of unknown cost waits for the outstanding ones: nothing else
                // bounds how much unmeasured work could pile up
                let unknown = m.est.get(key).is_none() && !m.pending.is_empty();
                let full = m.pending.len() >= MAX_PENDING;
                self.drain(&mut m, table, full || unknown);
                est = m.est.get(key);
                if est.is_none() && !m.pending.is_empty() {
                    continue;
                }
            }
            let wait = LAW.wait_ns(clock.load(Ordering::Acquire), now);
            if wait == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_nanos(wait as u64));
        }
        let est = est.unwrap_or(0);
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-parameter.
        unsafe { get_ctx(&mut ctx) };
        let events = {
            let mut m = self.meter();
            self.events(&mut m, ctx as usize)
        };
        LAW.charge_shared(clock, now, est, share);
        let Some((start, end)) = events else {
            return launch();
        };
        // SAFETY: our event, the caller's stream.
        let started = unsafe { record(start as CUevent, stream) } == CUDA_SUCCESS;
        let r = launch();
        // SAFETY: as above.
        let ended = started
            && r == CUDA_SUCCESS
            && unsafe { record(end as CUevent, stream) } == CUDA_SUCCESS;
        let mut m = self.meter();
        if ended {
            m.pending.push_back(Pending {
                ctx: ctx as usize,
                start,
                end,
                entry,
                key,
                est,
                share,
            });
        } else {
            LAW.correct_shared(clock, 0, est, share);
            m.pool.entry(ctx as usize).or_default().push((start, end));
        }
        r
    }
}

/// Bytes a pitched allocation really holds.
pub fn pitched(pitch: u64, height: u64) -> u64 {
    pitch.saturating_mul(height.max(1))
}
