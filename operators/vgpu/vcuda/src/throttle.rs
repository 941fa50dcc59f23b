//! The compute-share control law (pure): a virtual clock charged with measured GPU time.
//!
//! A container with share `s` (0 < s < 1) may keep the GPU busy `s` of the wall time. Every
//! kernel or graph launch is charged its GPU execution time `c` divided by `s` on a virtual
//! clock `V` shared by all processes of the container (one per device):
//!
//! * **admit**: a launch may go when `V <= now + L` (lookahead `L`): the container may queue
//!   at most `L` of wall time of work ahead. Otherwise the launching thread sleeps until
//!   `V <= now + L - H`; the hysteresis `H` makes every sleep at least `H` long so that the
//!   scheduler's wake-up latency is paid rarely, and it is not lost: `V` is absolute, so an
//!   oversleep is made up by launching sooner afterwards.
//! * **charge**: at launch `V := max(V, now - C) + est / s`, with `est` the kernel's expected
//!   GPU time (moving average of its past measurements, keyed by function or graph). The
//!   credit `C` bounds what an idle container can save up: idle time beyond `C` is forfeited.
//! * **correct**: when the launch's completion events are seen, `V := V + (c - est) / s` with
//!   `c` the measured GPU time between events recorded just before and just after the launch.
//!
//! Over any interval in which the container keeps launching, the GPU time it received is
//! `s * (V_end - V_start)` and `V` advances no faster than the wall clock plus `L + C`, so its
//! utilisation converges on `s`; the error of one window is bounded by `(L + C + c_max) / T`.
//! The law measures time, not blocks or threads, so it needs no SM count and no occupancy
//! model: a kernel that fills an H100 and one that fills a T4 are both charged the time they
//! held the GPU, which is what NVML's utilisation (and `nvidia-smi`) reports.
//!
//! **Soft mode** lends idle capacity: when the rest of the GPU (device utilisation minus the
//! container's own) stays under [`IDLE_OTHERS`], the effective share is 100 %; as soon as
//! anybody else uses the GPU the container is back to its share, so others always get theirs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};

/// Parameters of the law (nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Law {
    /// `L`: how far ahead of the wall clock the container may queue work.
    pub lookahead_ns: i64,
    /// `H`: the shortest sleep.
    pub min_sleep_ns: i64,
    /// `C`: how much idle time a container may save up.
    pub credit_ns: i64,
}

/// The parameters the library uses.
pub const LAW: Law = Law {
    lookahead_ns: 6_000_000,
    min_sleep_ns: 2_000_000,
    credit_ns: 4_000_000,
};

/// Others' utilisation under which soft mode borrows the whole GPU.
pub const IDLE_OTHERS: f64 = 0.10;

/// `cost / share` in ns, saturating.
fn scaled(cost_ns: i64, share: f64) -> i64 {
    let v = cost_ns as f64 / share.clamp(0.001, 1.0);
    if v >= i64::MAX as f64 {
        i64::MAX / 4
    } else if v <= i64::MIN as f64 {
        i64::MIN / 4
    } else {
        v as i64
    }
}

impl Law {
    /// How long a launch must wait given the virtual clock; 0: go now.
    pub fn wait_ns(&self, v: i64, now: i64) -> i64 {
        if v <= now.saturating_add(self.lookahead_ns) {
            0
        } else {
            v - now - self.lookahead_ns + self.min_sleep_ns
        }
    }

    /// The virtual clock after charging a launch with expected cost `est_ns`.
    pub fn charged(&self, v: i64, now: i64, est_ns: i64, share: f64) -> i64 {
        v.max(now - self.credit_ns)
            .saturating_add(scaled(est_ns, share))
    }

    /// Charges a launch on a clock shared between processes.
    pub fn charge_shared(&self, v: &AtomicI64, now: i64, est_ns: i64, share: f64) {
        let _ = v.fetch_update(Ordering::AcqRel, Ordering::Acquire, |x| {
            Some(self.charged(x, now, est_ns, share))
        });
    }

    /// Corrects a shared clock once the true cost of a launch is known.
    pub fn correct_shared(&self, v: &AtomicI64, measured_ns: i64, est_ns: i64, share: f64) {
        v.fetch_add(scaled(measured_ns - est_ns, share), Ordering::AcqRel);
    }
}

/// The share in force: soft mode borrows the GPU while nobody else uses it.
pub fn effective_share(share: f64, soft: bool, device_util: f64, own_util: f64) -> f64 {
    if soft && (device_util - own_util) <= IDLE_OTHERS {
        1.0
    } else {
        share
    }
}

/// Expected GPU time per launch key (function or graph): exponential moving average of the
/// measurements, falling back to the average over all keys for a key never measured.
#[derive(Debug, Default)]
pub struct Estimator {
    per_key: HashMap<usize, i64>,
    global: Option<i64>,
}

const MAX_KEYS: usize = 4096;

impl Estimator {
    /// The expected cost of a launch; `None` before anything was measured, in which case the
    /// caller must let its outstanding launches complete first (their cost is unknown, so
    /// the lookahead cannot bound them).
    pub fn get(&self, key: usize) -> Option<i64> {
        self.per_key.get(&key).copied().or(self.global)
    }

    pub fn observe(&mut self, key: usize, ns: i64) {
        let ns = ns.max(0);
        let ewma = |old: i64| old + (ns - old) / 4;
        if self.per_key.len() >= MAX_KEYS && !self.per_key.contains_key(&key) {
            self.per_key.clear();
        }
        self.per_key
            .entry(key)
            .and_modify(|e| *e = ewma(*e))
            .or_insert(ns);
        self.global = Some(self.global.map_or(ns, ewma));
    }
}

#[cfg(test)]
pub mod sim {
    //! A discrete-event model of launchers, the throttle and a GPU, to check the law.

    use super::*;
    use std::collections::VecDeque;

    /// What to simulate.
    #[derive(Debug, Clone)]
    pub struct Spec {
        pub share: f64,
        /// SMs of the simulated GPU; a kernel of `blocks` blocks runs in
        /// `ceil(blocks / sms)` waves of `wave_ns` each.
        pub sms: u64,
        pub blocks: u64,
        pub wave_ns: i64,
        /// Every n-th kernel is `big_factor` times longer (mixed workloads); 0: none.
        pub big_every: u64,
        pub big_factor: i64,
        /// Concurrent launching processes of the container, sharing the clock.
        pub processes: usize,
        /// Host time per launch.
        pub launch_cpu_ns: i64,
        /// How much later than asked a sleep returns.
        pub oversleep_ns: i64,
        /// Completion is seen only at the next launch or wake-up (no extra latency here).
        pub seconds: i64,
    }

    impl Spec {
        pub fn new(share: f64, sms: u64, blocks: u64, wave_ns: i64) -> Spec {
            Spec {
                share,
                sms,
                blocks,
                wave_ns,
                big_every: 0,
                big_factor: 1,
                processes: 1,
                launch_cpu_ns: 5_000,
                oversleep_ns: 80_000,
                seconds: 20,
            }
        }
    }

    struct Launcher {
        now: i64,
        pending: VecDeque<(usize, i64, i64, i64)>, // key, est, gpu start, gpu end
        est: Estimator,
        count: u64,
    }

    /// Runs the model; returns the GPU utilisation over the run after a one-second warm-up.
    pub fn run(spec: &Spec) -> f64 {
        let law = LAW;
        let v = AtomicI64::new(0);
        let waves = spec.blocks.div_ceil(spec.sms) as i64;
        let base = waves * spec.wave_ns;
        let end = spec.seconds * 1_000_000_000;
        let warm = 1_000_000_000;
        let mut gpu_free = 0i64;
        let mut busy = 0i64;
        let mut ls: Vec<Launcher> = (0..spec.processes)
            .map(|i| Launcher {
                now: i as i64 * 1_000,
                pending: VecDeque::new(),
                est: Estimator::default(),
                count: 0,
            })
            .collect();
        // the launcher furthest behind in time acts next
        while let Some(l) = ls.iter_mut().min_by_key(|l| l.now) {
            if l.now >= end {
                break;
            }
            while let Some(&(key, est, s, e)) = l.pending.front() {
                if e > l.now {
                    break;
                }
                l.pending.pop_front();
                law.correct_shared(&v, e - s, est, spec.share);
                l.est.observe(key, e - s);
            }
            let est = l.est.get(
                if spec.big_every > 0 && (l.count + 1) % spec.big_every == 0 {
                    2
                } else {
                    1
                },
            );
            if l.pending.len() >= 64 || (est.is_none() && !l.pending.is_empty()) {
                l.now = l.pending.front().map_or(l.now, |p| p.3);
                continue;
            }
            let wait = law.wait_ns(v.load(Ordering::Acquire), l.now);
            if wait > 0 {
                l.now += wait + spec.oversleep_ns;
                continue;
            }
            l.count += 1;
            let big = spec.big_every > 0 && l.count % spec.big_every == 0;
            let (key, dur) = if big {
                (2, base * spec.big_factor)
            } else {
                (1, base)
            };
            let est = est.unwrap_or(0);
            law.charge_shared(&v, l.now, est, spec.share);
            let start = gpu_free.max(l.now + 2_000);
            let stop = start + dur;
            gpu_free = stop;
            busy += (stop.min(end) - start.max(warm)).max(0);
            l.pending.push_back((key, est, start, stop));
            l.now += spec.launch_cpu_ns;
        }
        busy as f64 / (end - warm) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::sim::{Spec, run};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wait_and_charge_arithmetic() {
        let law = LAW;
        assert_eq!(law.wait_ns(0, 0), 0);
        assert_eq!(law.wait_ns(law.lookahead_ns, 0), 0);
        assert_eq!(law.wait_ns(law.lookahead_ns + 1, 0), 1 + law.min_sleep_ns);
        // idle beyond the credit is forfeited
        assert_eq!(
            law.charged(0, 1_000_000_000, 1000, 0.5),
            1_000_000_000 - law.credit_ns + 2000
        );
        assert_eq!(law.charged(5_000, 0, 1000, 0.25), 9_000);
        let v = AtomicI64::new(100);
        law.correct_shared(&v, 300, 100, 0.5);
        assert_eq!(v.load(Ordering::Relaxed), 500);
        law.correct_shared(&v, 0, 100, 0.5);
        assert_eq!(v.load(Ordering::Relaxed), 300);
    }

    #[test]
    fn soft_mode_borrows_only_while_others_idle() {
        assert_eq!(effective_share(0.3, true, 0.95, 0.93), 1.0);
        assert_eq!(effective_share(0.3, true, 0.60, 0.30), 0.3);
        assert_eq!(effective_share(0.3, false, 0.30, 0.30), 0.3);
    }

    #[test]
    fn estimator_tracks_per_key_and_falls_back() {
        let mut e = Estimator::default();
        assert_eq!(e.get(1), None);
        e.observe(1, 1000);
        assert_eq!(e.get(1), Some(1000));
        assert_eq!(e.get(2), Some(1000), "unknown key uses the global average");
        e.observe(1, 2000);
        assert_eq!(e.get(1), Some(1250));
        for k in 0..(MAX_KEYS + 10) {
            e.observe(k + 10, 5);
        }
        assert!(e.per_key.len() <= MAX_KEYS);
    }

    fn check(spec: &Spec) {
        let u = run(spec);
        assert!(
            (u - spec.share).abs() <= 0.05,
            "share {} got {:.3} with {spec:?}",
            spec.share,
            u
        );
    }

    /// Shares 10..90 % on small and large GPUs, short and long kernels.
    #[test]
    fn converges_across_gpus_and_kernel_lengths() {
        for share in [0.10, 0.25, 0.50, 0.75, 0.90] {
            for sms in [20u64, 46, 108, 132] {
                for wave_ns in [5_000i64, 50_000, 500_000] {
                    check(&Spec::new(share, sms, 2000, wave_ns));
                }
            }
        }
    }

    #[test]
    fn converges_with_several_processes_and_mixed_kernels() {
        for share in [0.10, 0.5, 0.9] {
            let mut s = Spec::new(share, 132, 528, 50_000);
            s.processes = 4;
            s.big_every = 7;
            s.big_factor = 40;
            check(&s);
        }
    }

    #[test]
    fn unthrottled_share_keeps_gpu_busy() {
        let u = run(&Spec::new(1.0, 108, 1000, 100_000));
        assert!(u > 0.97, "{u}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn converges_for_any_share_gpu_and_kernel(pct in 10u32..=90, sms in 8u64..=160,
                                                  waves in 1u64..=40, partial in 0.0f64..1.0,
                                                  wave_us in 20i64..=1250,
                                                  procs in 1usize..4, oversleep_us in 0i64..1000) {
            // kernels of 20 us .. 50 ms: longer than a launch (the workload saturates) and
            // short against the measuring window (a running kernel cannot be preempted)
            let blocks = (waves - 1) * sms + 1 + ((sms - 1) as f64 * partial) as u64;
            let mut s = Spec::new(f64::from(pct) / 100.0, sms, blocks, wave_us * 1000);
            s.processes = procs;
            s.oversleep_ns = oversleep_us * 1000;
            let u = run(&s);
            prop_assert!((u - s.share).abs() <= 0.05, "share {} got {:.3}", s.share, u);
        }
    }
}
