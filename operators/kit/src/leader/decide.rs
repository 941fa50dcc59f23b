//! Pure leader-election decisions: what a candidate should do given the Lease it just read.
//!
//! Expiry is judged by the candidate's own clock: a lease counts as expired when its record
//! (holder and renew time) has not changed for a whole lease duration *since this candidate
//! first saw it*. Comparing the holder's `renewTime` with our clock instead would let clock skew
//! between nodes hand the lease to two replicas at once.

use std::time::{Duration, Instant};

/// The parts of a Lease that decide who leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `None` or empty: nobody holds it (a leader that stepped down releases it this way).
    pub holder: Option<String>,
    /// The holder's last renewal, as written (compared for change, never with our clock).
    pub renew_time: Option<String>,
    pub duration: Duration,
    pub transitions: i32,
}

impl LeaseRecord {
    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }
}

/// What to do after reading the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it, holding it.
    Create,
    /// We hold it: write a new renew time.
    Renew,
    /// Free or expired: take it over (the write must carry the resourceVersion we read, so only
    /// one candidate can win), counting one more transition.
    Acquire { transitions: i32 },
    /// Someone else holds a live lease: wait.
    StandBy {
        holder: String,
        expires_in: Duration,
    },
}

/// Remembers when this candidate last saw the Lease record change.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(LeaseRecord, Instant)>,
}

impl Observer {
    /// Decides from the Lease as just read (`None` when it does not exist) at local time `now`.
    pub fn decide(&mut self, record: Option<&LeaseRecord>, me: &str, now: Instant) -> Decision {
        let Some(record) = record else {
            self.last = None;
            return Decision::Create;
        };
        let observed_at = match &self.last {
            Some((seen, at)) if seen == record => *at,
            _ => {
                self.last = Some((record.clone(), now));
                now
            }
        };
        match record.holder() {
            Some(holder) if holder == me => Decision::Renew,
            None => Decision::Acquire {
                transitions: record.transitions.saturating_add(1),
            },
            Some(holder) => {
                let age = now.saturating_duration_since(observed_at);
                if age >= record.duration {
                    Decision::Acquire {
                        transitions: record.transitions.saturating_add(1),
                    }
                } else {
                    Decision::StandBy {
                        holder: holder.to_string(),
                        expires_in: record.duration - age,
                    }
                }
            }
        }
    }
}

/// Whether a leader that last renewed successfully at `last_renewed` must give up, having failed
/// to renew within `renew_deadline`. Stepping down before the lease expires is what keeps two
/// replicas from ever acting at once.
pub fn renewal_overdue(last_renewed: Instant, now: Instant, renew_deadline: Duration) -> bool {
    now.saturating_duration_since(last_renewed) >= renew_deadline
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEASE: Duration = Duration::from_secs(15);

    fn held_by(holder: &str, renew: &str) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.to_string()),
            renew_time: Some(renew.to_string()),
            duration: LEASE,
            transitions: 3,
        }
    }

    #[test]
    fn missing_lease_is_created() {
        let mut o = Observer::default();
        assert_eq!(o.decide(None, "a", Instant::now()), Decision::Create);
    }

    #[test]
    fn own_lease_is_renewed() {
        let mut o = Observer::default();
        assert_eq!(
            o.decide(Some(&held_by("a", "t1")), "a", Instant::now()),
            Decision::Renew
        );
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let mut o = Observer::default();
        let released = LeaseRecord {
            holder: Some(String::new()),
            ..held_by("x", "t1")
        };
        assert_eq!(
            o.decide(Some(&released), "a", Instant::now()),
            Decision::Acquire { transitions: 4 }
        );
        let none = LeaseRecord {
            holder: None,
            ..held_by("x", "t1")
        };
        assert_eq!(
            o.decide(Some(&none), "a", Instant::now()),
            Decision::Acquire { transitions: 4 }
        );
    }

    #[test]
    fn live_lease_of_another_is_respected_until_it_stops_changing() {
        let mut o = Observer::default();
        let t0 = Instant::now();
        let first = held_by("b", "t1");
        assert!(matches!(
            o.decide(Some(&first), "a", t0),
            Decision::StandBy { .. }
        ));
        // b renews: the clock restarts from when we saw the new record.
        let renewed = held_by("b", "t2");
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            o.decide(Some(&renewed), "a", t1),
            Decision::StandBy {
                holder: "b".into(),
                expires_in: LEASE
            }
        );
        assert!(matches!(
            o.decide(Some(&renewed), "a", t1 + Duration::from_secs(14)),
            Decision::StandBy { .. }
        ));
        // b stops renewing: one full duration after we first saw t2, it is ours.
        assert_eq!(
            o.decide(Some(&renewed), "a", t1 + LEASE),
            Decision::Acquire { transitions: 4 }
        );
    }

    #[test]
    fn a_fresh_candidate_waits_a_full_duration_even_for_an_old_renew_time() {
        // The holder's renewTime may be far in the past by our clock (skew): only our own
        // observation counts.
        let mut o = Observer::default();
        let t0 = Instant::now();
        assert!(matches!(
            o.decide(Some(&held_by("b", "1999-01-01T00:00:00Z")), "a", t0),
            Decision::StandBy { .. }
        ));
    }

    #[test]
    fn overdue_renewal() {
        let t0 = Instant::now();
        assert!(!renewal_overdue(
            t0,
            t0 + Duration::from_secs(9),
            Duration::from_secs(10)
        ));
        assert!(renewal_overdue(
            t0,
            t0 + Duration::from_secs(10),
            Duration::from_secs(10)
        ));
    }

    proptest! {
        /// Two candidates polling the same lease never both decide to act as holder while the
        /// holder keeps renewing within the lease duration.
        #[test]
        fn no_takeover_while_holder_renews(renew_gaps in proptest::collection::vec(1u64..14, 1..50)) {
            let mut o = Observer::default();
            let mut now = Instant::now();
            for (i, gap) in renew_gaps.into_iter().enumerate() {
                let record = held_by("b", &format!("t{i}"));
                let first = o.decide(Some(&record), "a", now);
                prop_assert!(matches!(first, Decision::StandBy { .. }), "{:?}", first);
                now += Duration::from_secs(gap);
                let later = o.decide(Some(&record), "a", now);
                prop_assert!(matches!(later, Decision::StandBy { .. }), "{:?}", later);
            }
        }
    }
}
