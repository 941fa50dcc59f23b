//! The container-wide memory account: layout of the shared table and the arithmetic on it.
//!
//! The table lives in a file mapped `MAP_SHARED` by every process of the container (see
//! `shm.rs` for the file and its lock). Each process owns one slot, keyed by its pid and its
//! start time; the usage of a device is the sum of the slots' counters for that device. A slot
//! is a single writer's: a process that dies, even while holding the lock or half-way through
//! an update, leaves every other slot intact, and its own slot is reclaimed once the pid is
//! found dead (or reused by a younger process). No shared total exists that a crash could leave
//! inconsistent.
//!
//! Every function here expects the caller to hold the file lock; the atomics only make the
//! concurrent mapping well defined, `Relaxed` is enough under the lock.

use crate::config::MAX_DEVICES;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};

/// `"GNTRYVCA"` in little-endian bytes.
pub const MAGIC: u64 = u64::from_le_bytes(*b"GNTRYVCA");
/// Layout version of the shared table; bump on any layout change.
pub const LAYOUT_VERSION: u32 = 1;
/// Processes that can hold GPU memory at the same time in one container.
pub const MAX_SLOTS: usize = 1024;

#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub slots: AtomicU32,
    pub devices: AtomicU32,
    /// One past the highest slot ever used, to bound scans.
    pub high_water: AtomicU32,
    _reserved: [u64; 5],
}

/// Per-device state shared by the container's processes for the compute throttle.
#[repr(C)]
pub struct DeviceShared {
    /// The throttle's virtual clock in CLOCK_MONOTONIC nanoseconds (see `throttle`).
    pub vclock: AtomicI64,
    /// Total measured GPU time of the container's launches on this device, in ns.
    pub consumed_ns: AtomicU64,
    _reserved: [u64; 6],
}

#[repr(C)]
pub struct Slot {
    /// Owner pid, 0 when free.
    pub pid: AtomicI32,
    _pad: u32,
    /// Owner start time (clock ticks since boot, `/proc/<pid>/stat` field 22); 0 if unknown.
    pub start_time: AtomicU64,
    /// Bytes charged to this process on each device.
    pub used: [AtomicU64; MAX_DEVICES],
}

#[repr(C)]
pub struct Table {
    pub header: Header,
    pub devices: [DeviceShared; MAX_DEVICES],
    pub slots: [Slot; MAX_SLOTS],
}

/// Size of the shared file in bytes.
pub const TABLE_BYTES: usize = std::mem::size_of::<Table>();

impl Table {
    /// A zeroed, initialised table on the heap (tests and the simulator).
    pub fn new_boxed() -> Box<Table> {
        // SAFETY: every field is an integer or an atomic integer, for which all-zero bytes are
        // a valid value; the layout is that of `Table`.
        let t: Box<Table> = unsafe {
            let layout = std::alloc::Layout::new::<Table>();
            let p = std::alloc::alloc_zeroed(layout).cast::<Table>();
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            Box::from_raw(p)
        };
        t.init();
        t
    }

    /// Writes the header of a fresh (all-zero) table.
    pub fn init(&self) {
        self.header.version.store(LAYOUT_VERSION, Relaxed);
        self.header.slots.store(MAX_SLOTS as u32, Relaxed);
        self.header.devices.store(MAX_DEVICES as u32, Relaxed);
        self.header.magic.store(MAGIC, Relaxed);
    }

    /// Checks that a mapped table has the layout this library writes.
    pub fn check_header(&self) -> Result<(), String> {
        let h = &self.header;
        if h.magic.load(Relaxed) != MAGIC {
            return Err("account file has no valid header".into());
        }
        let (v, s, d) = (
            h.version.load(Relaxed),
            h.slots.load(Relaxed),
            h.devices.load(Relaxed),
        );
        if v != LAYOUT_VERSION || s as usize != MAX_SLOTS || d as usize != MAX_DEVICES {
            return Err(format!(
                "account file layout {v}/{s}/{d} differs from this library's \
                 {LAYOUT_VERSION}/{MAX_SLOTS}/{MAX_DEVICES}"
            ));
        }
        Ok(())
    }

    fn scan_len(&self) -> usize {
        (self.header.high_water.load(Relaxed) as usize).min(MAX_SLOTS)
    }

    /// Bytes in use on `dev` by all live or not yet reclaimed processes.
    pub fn used(&self, dev: usize) -> u64 {
        self.slots[..self.scan_len()]
            .iter()
            .filter(|s| s.pid.load(Relaxed) != 0)
            .fold(0u64, |acc, s| acc.saturating_add(s.used[dev].load(Relaxed)))
    }

    /// Bytes charged to one slot on `dev`.
    pub fn slot_used(&self, slot: usize, dev: usize) -> u64 {
        self.slots[slot].used[dev].load(Relaxed)
    }

    /// Finds the slot of `(pid, start)` or takes a free one, reclaiming dead owners if needed.
    pub fn claim(&self, pid: i32, start: u64, alive: &dyn Fn(i32, u64) -> bool) -> Option<usize> {
        let n = self.scan_len();
        let mine = |s: &Slot| s.pid.load(Relaxed) == pid && s.start_time.load(Relaxed) == start;
        if let Some(i) = self.slots[..n].iter().position(mine) {
            return Some(i);
        }
        let free = self.slots[..n]
            .iter()
            .position(|s| s.pid.load(Relaxed) == 0)
            .or_else(|| (n < MAX_SLOTS).then_some(n))
            .or_else(|| {
                self.reclaim_dead(alive);
                self.slots.iter().position(|s| s.pid.load(Relaxed) == 0)
            })?;
        let s = &self.slots[free];
        for u in &s.used {
            u.store(0, Relaxed);
        }
        s.start_time.store(start, Relaxed);
        s.pid.store(pid, Relaxed);
        if free >= n {
            self.header.high_water.store(free as u32 + 1, Relaxed);
        }
        Some(free)
    }

    /// Frees the slots of dead processes; returns how many were freed.
    pub fn reclaim_dead(&self, alive: &dyn Fn(i32, u64) -> bool) -> usize {
        let mut freed = 0;
        for s in &self.slots[..self.scan_len()] {
            let pid = s.pid.load(Relaxed);
            if pid != 0 && !alive(pid, s.start_time.load(Relaxed)) {
                Self::clear(s);
                freed += 1;
            }
        }
        freed
    }

    /// Releases a slot (process exit).
    pub fn release(&self, slot: usize) {
        Self::clear(&self.slots[slot]);
    }

    fn clear(s: &Slot) {
        // pid last: a reader that still sees the pid sees zeroed counters, never a half-freed slot
        for u in &s.used {
            u.store(0, Relaxed);
        }
        s.start_time.store(0, Relaxed);
        s.pid.store(0, Relaxed);
    }

    /// Charges `bytes` on `dev` to `slot` unless the device's usage would pass `cap`.
    /// On refusal returns the usage seen.
    pub fn try_charge(&self, slot: usize, dev: usize, bytes: u64, cap: u64) -> Result<(), u64> {
        let used = self.used(dev);
        match used.checked_add(bytes) {
            Some(total) if total <= cap => {
                let c = &self.slots[slot].used[dev];
                c.store(c.load(Relaxed).saturating_add(bytes), Relaxed);
                Ok(())
            }
            _ => Err(used),
        }
    }

    /// Gives back `bytes` on `dev` from `slot` (never below zero).
    pub fn uncharge(&self, slot: usize, dev: usize, bytes: u64) {
        let c = &self.slots[slot].used[dev];
        c.store(c.load(Relaxed).saturating_sub(bytes), Relaxed);
    }
}

/// Bytes per element of a `CUarray_format`, per channel. Unknown formats count 16 bytes so
/// that the estimate errs on the side of the cap.
pub fn format_bytes(format: u32) -> u64 {
    match format {
        0x01 | 0x08 => 1,               // UNSIGNED_INT8, SIGNED_INT8
        0x02 | 0x09 | 0x10 => 2,        // (UN)SIGNED_INT16, HALF
        0x03 | 0x0a | 0x20 => 4,        // (UN)SIGNED_INT32, FLOAT
        0xb0 => 2,                      // NV12 (1.5 rounded up)
        0xc0 | 0xc6 => 1,               // UNORM/SNORM_INT8X1
        0xc1 | 0xc3 | 0xc7 | 0xc9 => 2, // INT8X2, INT16X1
        0xc2 | 0xc4 | 0xc8 | 0xca => 4, // INT8X4, INT16X2
        0xc5 | 0xcb => 8,               // INT16X4
        _ => 16,
    }
}

/// Estimated bytes of a 1D/2D/3D CUDA array (height/depth 0 mean 1).
pub fn array_bytes(format: u32, channels: u32, w: u64, h: u64, d: u64) -> u64 {
    format_bytes(format)
        .saturating_mul(u64::from(channels.max(1)))
        .saturating_mul(w.max(1))
        .saturating_mul(h.max(1))
        .saturating_mul(d.max(1))
}

/// Estimated bytes of a mipmapped array: the sum over its levels, each halving every dimension
/// that is not zero.
pub fn mipmap_bytes(format: u32, channels: u32, w: u64, h: u64, d: u64, levels: u32) -> u64 {
    let (mut w, mut h, mut d) = (w, h, d);
    let mut total = 0u64;
    for _ in 0..levels.max(1) {
        total = total.saturating_add(array_bytes(format, channels, w, h, d));
        if w <= 1 && h <= 1 && d <= 1 {
            break;
        }
        w = (w / 2).max(1);
        h = if h == 0 { 0 } else { (h / 2).max(1) };
        d = if d == 0 { 0 } else { (d / 2).max(1) };
    }
    total
}

/// Reservation for `cuMemAllocPitch` before the driver picks the pitch: rows rounded up to
/// 512 bytes, the largest pitch alignment current GPUs use. The charge is corrected to
/// `pitch * height` afterwards.
pub fn pitch_estimate(width_bytes: u64, height: u64) -> u64 {
    width_bytes
        .div_ceil(512)
        .saturating_mul(512)
        .saturating_mul(height.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const ALL_ALIVE: &dyn Fn(i32, u64) -> bool = &|_, _| true;

    #[test]
    fn charge_up_to_cap_then_refuse() {
        let t = Table::new_boxed();
        t.check_header().expect("fresh header");
        let a = t.claim(10, 1, ALL_ALIVE).expect("slot");
        let b = t.claim(11, 1, ALL_ALIVE).expect("slot");
        assert_ne!(a, b);
        assert_eq!(
            t.claim(10, 1, ALL_ALIVE),
            Some(a),
            "same process, same slot"
        );
        assert_eq!(t.try_charge(a, 0, 600, 1000), Ok(()));
        assert_eq!(t.try_charge(b, 0, 400, 1000), Ok(()));
        assert_eq!(t.try_charge(b, 0, 1, 1000), Err(1000));
        assert_eq!(
            t.try_charge(b, 1, 1000, 1000),
            Ok(()),
            "devices are separate"
        );
        t.uncharge(a, 0, 600);
        assert_eq!(t.used(0), 400);
        assert_eq!(
            t.try_charge(b, 0, u64::MAX, u64::MAX),
            Err(400),
            "no overflow"
        );
        t.uncharge(a, 0, 5);
        assert_eq!(t.slot_used(a, 0), 0, "never below zero");
    }

    #[test]
    fn dead_processes_are_reclaimed_and_pid_reuse_detected() {
        let t = Table::new_boxed();
        let a = t.claim(10, 100, ALL_ALIVE).expect("slot");
        t.try_charge(a, 0, 1000, 1000).expect("fits");
        // pid 10 reused by a younger process: the old slot belongs to a dead owner
        let alive = |pid: i32, start: u64| pid == 10 && start == 200;
        assert_eq!(t.reclaim_dead(&alive), 1);
        assert_eq!(t.used(0), 0);
        let b = t.claim(10, 200, &alive).expect("slot");
        assert_eq!(t.try_charge(b, 0, 1000, 1000), Ok(()));
        t.release(b);
        assert_eq!(t.used(0), 0);
    }

    #[test]
    fn full_table_reclaims_then_refuses() {
        let t = Table::new_boxed();
        for pid in 1..=MAX_SLOTS as i32 {
            t.claim(pid, 0, ALL_ALIVE).expect("slot");
        }
        assert_eq!(t.claim(5000, 0, ALL_ALIVE), None);
        let odd_dead = |pid: i32, _| pid % 2 == 0;
        assert!(t.claim(5000, 0, &odd_dead).is_some());
    }

    #[test]
    fn bad_header_is_reported() {
        let t = Table::new_boxed();
        t.header.version.store(9, Relaxed);
        assert!(t.check_header().expect_err("bad").contains("differs"));
        t.header.magic.store(0, Relaxed);
        assert!(
            t.check_header()
                .expect_err("bad")
                .contains("no valid header")
        );
    }

    #[test]
    fn size_estimates() {
        assert_eq!(array_bytes(0x20, 4, 1024, 1024, 0), 16 << 20);
        assert_eq!(array_bytes(0x01, 1, 10, 0, 0), 10);
        assert_eq!(array_bytes(0x99, 1, 10, 0, 0), 160);
        assert_eq!(mipmap_bytes(0x01, 1, 8, 8, 0, 4), 64 + 16 + 4 + 1);
        assert_eq!(mipmap_bytes(0x01, 1, 8, 0, 0, 10), 8 + 4 + 2 + 1);
        assert_eq!(pitch_estimate(1000, 3), 3 * 1024);
        assert_eq!(pitch_estimate(u64::MAX, 3), u64::MAX);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { p: usize, dev: usize, bytes: u64 },
        Free { p: usize, pick: usize },
        Die { p: usize },
        Reclaim,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4usize, 0..2usize, 1u64..400).prop_map(|(p, dev, bytes)| Op::Alloc { p, dev, bytes }),
            3 => (0..4usize, 0..8usize).prop_map(|(p, pick)| Op::Free { p, pick }),
            1 => (0..4usize).prop_map(|p| Op::Die { p }),
            1 => Just(Op::Reclaim),
        ]
    }

    proptest! {
        /// Under any interleaving of allocations, frees, deaths and reclaims by several
        /// processes, usage never passes the cap, equals the sum of live holdings once dead
        /// slots are reclaimed, and an allocation is refused only if it truly does not fit.
        #[test]
        fn never_exceeds_cap(ops in proptest::collection::vec(op(), 1..200), cap in 1u64..2000) {
            let t = Table::new_boxed();
            // process p incarnation k has pid 100 + p and start time k
            let mut inc = [1u64; 4];
            let mut held: HashMap<usize, Vec<(usize, u64)>> = HashMap::new();
            let mut dead: Vec<(i32, u64)> = Vec::new();
            for op in ops {
                let dead_now = dead.clone();
                let alive = move |pid: i32, st: u64| !dead_now.contains(&(pid, st));
                match op {
                    Op::Alloc { p, dev, bytes } => {
                        let slot = t.claim(100 + p as i32, inc[p], &alive).expect("slot");
                        let live: u64 = held.values().flatten().filter(|h| h.0 == dev).map(|h| h.1).sum();
                        let mut r = t.try_charge(slot, dev, bytes, cap);
                        if r.is_err() {
                            t.reclaim_dead(&alive);
                            r = t.try_charge(slot, dev, bytes, cap);
                        }
                        match r {
                            Ok(()) => held.entry(p).or_default().push((dev, bytes)),
                            Err(_) => prop_assert!(live + bytes > cap, "false refusal"),
                        }
                    }
                    Op::Free { p, pick } => {
                        if let Some(v) = held.get_mut(&p).filter(|v| !v.is_empty()) {
                            let (dev, bytes) = v.remove(pick % v.len());
                            let slot = t.claim(100 + p as i32, inc[p], &alive).expect("slot");
                            t.uncharge(slot, dev, bytes);
                        }
                    }
                    Op::Die { p } => {
                        dead.push((100 + p as i32, inc[p]));
                        inc[p] += 1;
                        held.remove(&p);
                    }
                    Op::Reclaim => { t.reclaim_dead(&alive); }
                }
                for dev in 0..2 {
                    prop_assert!(t.used(dev) <= cap);
                }
            }
            let dead_now = dead.clone();
            t.reclaim_dead(&move |pid, st| !dead_now.contains(&(pid, st)));
            for dev in 0..2 {
                let live: u64 = held.values().flatten().filter(|h| h.0 == dev).map(|h| h.1).sum();
                prop_assert_eq!(t.used(dev), live);
            }
        }
    }
}
