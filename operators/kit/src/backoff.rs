//! Retry timing shared by every operator: exponential backoff with jitter, capped.
//!
//! Jitter spreads the retries of many objects that failed together (an API server restart
//! fails every in-flight reconcile at once) so they do not return as one wave.

use std::time::Duration;

/// Exponential backoff: `base * 2^attempt`, capped, then spread by ± `jitter` of itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    /// Fraction in `[0, 1]` by which a delay may be shortened or lengthened at random.
    pub jitter: f64,
}

impl Default for Backoff {
    /// 1 s, 2 s, 4 s … up to 5 minutes, each ± 20 %.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry). `unit_random` is a
    /// number in `[0, 1)`; passing it in keeps this function pure and testable.
    pub fn delay(&self, attempt: u32, unit_random: f64) -> Duration {
        let exponent = attempt.min(62);
        let unjittered = self
            .base
            .checked_mul(1u32 << exponent.min(31))
            .and_then(|d| d.checked_mul(1u32 << exponent.saturating_sub(31)))
            .unwrap_or(self.cap)
            .min(self.cap);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let spread = 1.0 + jitter * (2.0 * unit_random.clamp(0.0, 1.0) - 1.0);
        unjittered.mul_f64(spread).min(self.cap)
    }

    /// [`Backoff::delay`] with a fresh random number.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_without_jitter() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        let delays: Vec<u64> = (0..5).map(|a| b.delay(a, 0.5).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16]);
    }

    #[test]
    fn stops_at_cap() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        assert_eq!(b.delay(9, 0.5), Duration::from_secs(300));
        assert_eq!(b.delay(u32::MAX, 0.5), Duration::from_secs(300));
    }

    #[test]
    fn jitter_spreads_both_ways() {
        let b = Backoff::default();
        assert_eq!(b.delay(2, 0.0), Duration::from_secs(4).mul_f64(0.8));
        assert_eq!(b.delay(2, 0.5), Duration::from_secs(4));
        assert!(b.delay(2, 0.999) > Duration::from_secs(4));
    }

    #[test]
    fn random_delay_lies_in_band() {
        let b = Backoff::default();
        for _ in 0..100 {
            let d = b.delay_random(3);
            assert!(
                d >= Duration::from_secs(8).mul_f64(0.8)
                    && d <= Duration::from_secs(8).mul_f64(1.2)
            );
        }
    }

    proptest! {
        #[test]
        fn never_exceeds_cap_nor_falls_below_jittered_base(
            attempt in 0u32..200, r in 0.0f64..1.0, jitter in 0.0f64..1.0,
            base_ms in 1u64..10_000, cap_s in 1u64..3_600,
        ) {
            let b = Backoff {
                base: Duration::from_millis(base_ms),
                cap: Duration::from_secs(cap_s),
                jitter,
            };
            let d = b.delay(attempt, r);
            prop_assert!(d <= b.cap);
            let floor = b.base.min(b.cap).mul_f64(1.0 - jitter);
            prop_assert!(d + Duration::from_nanos(1) >= floor, "{:?} < {:?}", d, floor);
        }

        #[test]
        fn envelope_is_monotonic(attempt in 0u32..100) {
            let b = Backoff { jitter: 0.0, ..Backoff::default() };
            prop_assert!(b.delay(attempt, 0.5) <= b.delay(attempt + 1, 0.5));
        }
    }
}
