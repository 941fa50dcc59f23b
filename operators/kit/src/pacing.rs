//! How long a controller holds an object after reconciling it, and what ends the hold early.
//!
//! A reconcile that finishes sooner than the interval after it started holds its object until
//! the interval is over, so that the changes arriving meanwhile (an object owning thousands of
//! pods sees many) are handled together by one reconcile that starts with fresh caches. A
//! change the object's reconcile is waiting for (an urgent one, as the index that saw it
//! judged: see [`crate::index::Projection`]) ends the hold, though not before half the
//! interval has passed since the reconcile started, so that a burst of them still shares
//! reconciles, and not before the object has been held as long as its reconcile took, so that
//! an object whose reconciles are slow (thousands of children on a busy API server) spends at
//! most half its time in them. An urgent change that arrives while the reconcile is still
//! running counts too: the reconcile may have read the caches before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The share of the interval that an urgent change still waits for.
const LEAST_SHARE: u32 = 2;

/// One controller's pacing: its interval, and the objects being reconciled or held.
#[derive(Debug, Default)]
pub struct Pacing {
    interval: Duration,
    /// Keyed by object; each reconcile gets its own, so an urgent change seen before it
    /// started (which it read) does not cut its hold short.
    urgent: Mutex<HashMap<String, Arc<Notify>>>,
}

/// A reconcile in progress, from its start until its hold is over.
#[derive(Debug)]
pub struct Hold {
    key: String,
    started: Instant,
    urged: Arc<Notify>,
}

impl Pacing {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            urgent: Mutex::default(),
        }
    }

    /// The reconcile of `key` starts now.
    pub fn start(&self, key: &str) -> Hold {
        let urged = Arc::new(Notify::new());
        self.waiting().insert(key.to_string(), Arc::clone(&urged));
        Hold {
            key: key.to_string(),
            started: Instant::now(),
            urged,
        }
    }

    /// A change the object `key` is waiting for has arrived: its hold, if it has one, ends
    /// as soon as it may.
    pub fn urge(&self, key: &str) {
        if let Some(urged) = self.waiting().get(key) {
            // Stores a permit when the reconcile is still running, so its hold ends at once.
            urged.notify_one();
        }
    }

    /// Holds the object until the interval since the start is over, an urgent change arrives
    /// (and the least gap is over), or `shutdown` is cancelled.
    pub async fn hold(&self, hold: Hold, shutdown: &CancellationToken) {
        let full = hold.started + self.interval;
        let took = hold.started.elapsed();
        let least = hold.started + (self.interval / LEAST_SHARE).max(took * 2);
        let urged = async {
            hold.urged.notified().await;
            tokio::time::sleep_until(least).await;
        };
        tokio::select! {
            () = tokio::time::sleep_until(full) => {}
            () = urged => {}
            () = shutdown.cancelled() => {}
        }
        let mut waiting = self.waiting();
        if waiting
            .get(&hold.key)
            .is_some_and(|urged| Arc::ptr_eq(urged, &hold.urged))
        {
            waiting.remove(&hold.key);
        }
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.urgent.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(500);

    /// How long the hold of a reconcile of `key` that started now lasted, with `meanwhile`
    /// run alongside it from the start.
    async fn held_for(
        pacing: &Pacing,
        key: &str,
        shutdown: &CancellationToken,
        meanwhile: impl Future<Output = ()>,
    ) -> Duration {
        let hold = pacing.start(key);
        let started = Instant::now();
        let ((), ()) = tokio::join!(pacing.hold(hold, shutdown), meanwhile);
        started.elapsed()
    }

    async fn urge_after(pacing: &Pacing, key: &str, after: Duration) {
        tokio::time::sleep(after).await;
        pacing.urge(key);
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_urgent_change_the_hold_lasts_the_interval() {
        let pacing = Pacing::new(INTERVAL);
        let held = held_for(&pacing, "ns/a", &CancellationToken::new(), async {}).await;
        assert_eq!(held, INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_change_ends_the_hold_when_it_arrives() {
        let pacing = Pacing::new(INTERVAL);
        let after = INTERVAL / LEAST_SHARE + Duration::from_millis(50);
        let held = held_for(
            &pacing,
            "ns/a",
            &CancellationToken::new(),
            urge_after(&pacing, "ns/a", after),
        )
        .await;
        assert_eq!(held, after);
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_change_early_on_still_waits_out_the_least_gap() {
        let pacing = Pacing::new(INTERVAL);
        let hold = pacing.start("ns/a");
        let started = Instant::now();
        pacing.urge("ns/a"); // while the reconcile runs
        pacing.urge("ns/a");
        pacing.hold(hold, &CancellationToken::new()).await;
        assert_eq!(started.elapsed(), INTERVAL / LEAST_SHARE);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_slow_reconcile_an_urgent_change_waits_as_long_as_it_took() {
        let pacing = Pacing::new(INTERVAL);
        let hold = pacing.start("ns/a");
        let started = Instant::now();
        let took = Duration::from_millis(300);
        tokio::time::sleep(took).await; // the reconcile
        pacing.urge("ns/a");
        pacing.hold(hold, &CancellationToken::new()).await;
        assert_eq!(
            started.elapsed(),
            INTERVAL,
            "held to the interval, not to 2 × 300 ms"
        );

        let hold = pacing.start("ns/a");
        let started = Instant::now();
        let took = Duration::from_millis(150);
        tokio::time::sleep(took).await;
        pacing.urge("ns/a");
        pacing.hold(hold, &CancellationToken::new()).await;
        assert_eq!(started.elapsed(), took * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_change_before_the_reconcile_started_does_not_count() {
        let pacing = Pacing::new(INTERVAL);
        let earlier = pacing.start("ns/a");
        pacing.urge("ns/a");
        drop(earlier);
        let held = held_for(&pacing, "ns/a", &CancellationToken::new(), async {}).await;
        assert_eq!(held, INTERVAL, "the new reconcile read that change");
    }

    #[tokio::test(start_paused = true)]
    async fn another_objects_urgent_change_does_not_end_the_hold() {
        let pacing = Pacing::new(INTERVAL);
        let other = pacing.start("ns/b");
        let held = held_for(
            &pacing,
            "ns/a",
            &CancellationToken::new(),
            urge_after(&pacing, "ns/b", Duration::from_millis(100)),
        )
        .await;
        assert_eq!(held, INTERVAL);
        drop(other);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_hold() {
        let pacing = Pacing::new(INTERVAL);
        let shutdown = CancellationToken::new();
        let after = Duration::from_millis(10);
        let held = held_for(&pacing, "ns/a", &shutdown, async {
            tokio::time::sleep(after).await;
            shutdown.cancel();
        })
        .await;
        assert_eq!(held, after);
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_hold_is_forgotten_and_urging_it_is_harmless() {
        let pacing = Pacing::new(INTERVAL);
        held_for(&pacing, "ns/a", &CancellationToken::new(), async {}).await;
        assert!(pacing.waiting().is_empty());
        pacing.urge("ns/a");
        assert!(pacing.waiting().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_interval_holds_nothing() {
        let pacing = Pacing::new(Duration::ZERO);
        let held = held_for(&pacing, "ns/a", &CancellationToken::new(), async {}).await;
        assert_eq!(held, Duration::ZERO);
    }
}
