//! The pure decision of a self-managed certificate authority: given what its Secret holds and
//! the time, what to change next.
//!
//! The Secret holds the CA that signs now, perhaps a newer CA on its way in, the bundle of
//! every CA clients should trust (those two plus older ones not yet expired), and the serving
//! certificate. Clients (the API server calling a webhook) trust the bundle, which the leader
//! copies into the webhook configurations. Nothing is ever served that the published bundle
//! does not trust:
//!
//! - the serving certificate is renewed from the signing CA a third of its life before it
//!   expires; the bundle does not change, so every client already trusts the new one;
//! - a new CA joins the bundle well before the signing CA expires, but signs nothing until the
//!   bundle holding it has been published for the propagation delay;
//! - then it becomes the signing CA and a serving certificate is issued from it at once; the old
//!   CA stays in the bundle until it expires, so certificates it signed, still served by
//!   replicas that have not reloaded yet, stay trusted.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::der::Validity;

/// How long certificates live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub ca_validity: Duration,
    pub leaf_validity: Duration,
    /// How long a bundle must have been published before a CA new in it may sign.
    pub propagation: Duration,
}

/// Why a policy cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "the CA must live at least three times as long as the serving certificate plus the propagation delay ({needed:?}), not {got:?}"
    )]
    CaTooShort { needed: Duration, got: Duration },
    #[error("the serving certificate must live at least 3 seconds, not {0:?}")]
    LeafTooShort(Duration),
}

impl Policy {
    pub fn check(&self) -> Result<(), PolicyError> {
        if self.leaf_validity < Duration::from_secs(3) {
            return Err(PolicyError::LeafTooShort(self.leaf_validity));
        }
        let needed = (self.leaf_validity + self.propagation * 2) * 3 / 2;
        if self.ca_validity < needed {
            return Err(PolicyError::CaTooShort {
                needed,
                got: self.ca_validity,
            });
        }
        Ok(())
    }

    /// A serving certificate with less than this left is renewed.
    pub fn leaf_renew_before(&self) -> Duration {
        self.leaf_validity / 3
    }

    /// A signing CA with less than this left gets a successor: long enough for the successor's
    /// bundle to propagate, and for a full serving certificate from the old CA to expire
    /// before the old CA does.
    pub fn ca_renew_before(&self) -> Duration {
        (self.ca_validity / 3).max(self.leaf_validity + self.propagation * 2)
    }
}

/// What the Secret holds, as far as the decision needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The CA that signs now, if the Secret holds a usable one (certificate and key).
    pub signing: Option<Validity>,
    /// A newer CA in the bundle, not yet signing.
    pub pending: Option<Validity>,
    /// Every CA in the bundle.
    pub bundle: Vec<Validity>,
    /// The serving certificate, if usable, and whether it names what it should.
    pub leaf: Option<Validity>,
    pub leaf_names_match: bool,
    /// When the bundle as it is now was last published everywhere it must be.
    pub published_at: Option<Timestamp>,
}

/// The next change to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// No usable CA: start afresh, with a new CA, a serving certificate and a bundle of it.
    Create,
    /// Take expired CAs out of the bundle.
    DropExpired,
    /// Add a successor CA to the bundle.
    AddSuccessor,
    /// Let the successor sign, and issue a serving certificate from it.
    Promote,
    /// Issue a new serving certificate from the signing CA.
    RenewLeaf,
    /// Copy the bundle into the webhook configurations (and record when).
    Publish,
    /// Nothing to do until `at`.
    Wait { at: Timestamp },
}

fn remaining(validity: &Validity, now: Timestamp) -> SignedDuration {
    validity.not_after.duration_since(now)
}

fn signed(duration: Duration) -> SignedDuration {
    SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX)
}

/// What to do next; see the module docs. A serving certificate that is due is renewed before
/// anything else is published, so that a bundle that cannot be published (a missing
/// permission, say) never lets the served certificate expire.
pub fn next_step(observed: &Observed, policy: &Policy, now: Timestamp) -> Step {
    let Some(signing) = observed
        .signing
        .filter(|ca| remaining(ca, now).is_positive())
    else {
        return Step::Create;
    };
    if observed
        .bundle
        .iter()
        .any(|ca| !remaining(ca, now).is_positive())
    {
        return Step::DropExpired;
    }
    let leaf_at = match observed.leaf {
        Some(leaf) if observed.leaf_names_match => {
            leaf.not_after - signed(policy.leaf_renew_before())
        }
        _ => now,
    };
    if now >= leaf_at {
        return Step::RenewLeaf;
    }
    let Some(published_at) = observed.published_at else {
        return Step::Publish;
    };
    if let Some(pending) = observed.pending {
        let ready_at = (published_at + signed(policy.propagation)).max(pending.not_before);
        if now >= ready_at {
            return Step::Promote;
        }
        return Step::Wait {
            at: ready_at.min(leaf_at),
        };
    }
    let successor_at = signing.not_after - signed(policy.ca_renew_before());
    if now >= successor_at {
        return Step::AddSuccessor;
    }
    Step::Wait {
        at: leaf_at.min(successor_at),
    }
}

/// When a serving certificate issued now expires: its full life, but never after the CA that
/// signs it.
pub fn leaf_not_after(policy: &Policy, signing: &Validity, now: Timestamp) -> Timestamp {
    (now + signed(policy.leaf_validity)).min(signing.not_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("valid")
    }

    fn valid(from: i64, to: i64) -> Validity {
        Validity {
            not_before: at(from),
            not_after: at(to),
        }
    }

    const POLICY: Policy = Policy {
        ca_validity: Duration::from_secs(300),
        leaf_validity: Duration::from_secs(30),
        propagation: Duration::from_secs(5),
    };

    fn settled(now: i64) -> Observed {
        Observed {
            signing: Some(valid(0, 300)),
            pending: None,
            bundle: vec![valid(0, 300)],
            leaf: Some(valid(now - 1, now + 29)),
            leaf_names_match: true,
            published_at: Some(at(0)),
        }
    }

    #[test]
    fn policies_that_cannot_rotate_safely_are_rejected() {
        assert!(POLICY.check().is_ok());
        let short_ca = Policy {
            ca_validity: Duration::from_secs(40),
            ..POLICY
        };
        assert!(matches!(
            short_ca.check(),
            Err(PolicyError::CaTooShort { .. })
        ));
        let short_leaf = Policy {
            leaf_validity: Duration::from_secs(1),
            ..POLICY
        };
        assert_eq!(
            short_leaf.check(),
            Err(PolicyError::LeafTooShort(Duration::from_secs(1)))
        );
    }

    #[test]
    fn nothing_usable_starts_afresh() {
        assert_eq!(
            next_step(&Observed::default(), &POLICY, at(0)),
            Step::Create
        );
        let expired = Observed {
            signing: Some(valid(-300, -1)),
            ..settled(0)
        };
        assert_eq!(next_step(&expired, &POLICY, at(0)), Step::Create);
    }

    #[test]
    fn a_settled_secret_waits_for_the_leaf_renewal() {
        assert_eq!(
            next_step(&settled(10), &POLICY, at(10)),
            Step::Wait { at: at(29) },
            "renewed with a third of its 30 s left"
        );
    }

    #[test]
    fn the_leaf_is_renewed_a_third_before_it_expires_or_when_its_names_change() {
        let mut observed = settled(10);
        assert_eq!(next_step(&observed, &POLICY, at(29)), Step::RenewLeaf);
        observed.leaf_names_match = false;
        assert_eq!(next_step(&observed, &POLICY, at(10)), Step::RenewLeaf);
        observed.leaf = None;
        assert_eq!(next_step(&observed, &POLICY, at(10)), Step::RenewLeaf);
    }

    #[test]
    fn a_successor_ca_joins_the_bundle_then_signs_only_after_propagation() {
        // The CA (0..300) gets a successor with 100 s left (a third of 300 s).
        let observed = settled(200);
        assert_eq!(
            next_step(&observed, &POLICY, at(199)),
            Step::Wait { at: at(200) }
        );
        assert_eq!(next_step(&observed, &POLICY, at(200)), Step::AddSuccessor);

        let added = Observed {
            pending: Some(valid(200, 500)),
            bundle: vec![valid(0, 300), valid(200, 500)],
            published_at: None,
            ..settled(200)
        };
        assert_eq!(next_step(&added, &POLICY, at(200)), Step::Publish);
        let published = Observed {
            published_at: Some(at(201)),
            ..added
        };
        assert_eq!(
            next_step(&published, &POLICY, at(203)),
            Step::Wait { at: at(206) },
            "not before the bundle has been out for the propagation delay"
        );
        assert_eq!(next_step(&published, &POLICY, at(206)), Step::Promote);
    }

    #[test]
    fn expired_cas_leave_the_bundle() {
        let observed = Observed {
            signing: Some(valid(200, 500)),
            bundle: vec![valid(0, 300), valid(200, 500)],
            leaf: Some(valid(300, 330)),
            ..settled(300)
        };
        assert_eq!(next_step(&observed, &POLICY, at(301)), Step::DropExpired);
    }

    #[test]
    fn a_leaf_never_outlives_its_ca() {
        assert_eq!(leaf_not_after(&POLICY, &valid(0, 300), at(100)), at(130));
        assert_eq!(leaf_not_after(&POLICY, &valid(0, 300), at(290)), at(300));
    }

    /// A CA's state after steps are carried out, with certificates issued as the module says,
    /// to check the safety property over whole lifetimes.
    #[derive(Clone, Debug)]
    struct World {
        signing: Validity,
        pending: Option<Validity>,
        bundle: Vec<Validity>,
        /// Which CA signed the serving certificate, and its validity.
        leaf: (Validity, Validity),
        /// The bundle as published, and when.
        published: Option<(Vec<Validity>, Timestamp)>,
        clients_trust: Vec<Validity>,
    }

    impl World {
        fn new(policy: &Policy, now: Timestamp) -> Self {
            let ca = Validity {
                not_before: now,
                not_after: now + signed(policy.ca_validity),
            };
            let leaf = Validity {
                not_before: now,
                not_after: leaf_not_after(policy, &ca, now),
            };
            Self {
                signing: ca,
                pending: None,
                bundle: vec![ca],
                leaf: (ca, leaf),
                published: None,
                clients_trust: Vec::new(),
            }
        }

        fn observed(&self) -> Observed {
            Observed {
                signing: Some(self.signing),
                pending: self.pending,
                bundle: self.bundle.clone(),
                leaf: Some(self.leaf.1),
                leaf_names_match: true,
                published_at: self
                    .published
                    .as_ref()
                    .filter(|(bundle, _)| *bundle == self.bundle)
                    .map(|(_, when)| *when),
            }
        }

        fn apply(&mut self, step: Step, policy: &Policy, now: Timestamp) {
            let issue = |ca: &Validity| Validity {
                not_before: now,
                not_after: leaf_not_after(policy, ca, now),
            };
            match step {
                Step::Create => *self = World::new(policy, now),
                Step::DropExpired => self.bundle.retain(|ca| remaining(ca, now).is_positive()),
                Step::AddSuccessor => {
                    let next = Validity {
                        not_before: now,
                        not_after: now + signed(policy.ca_validity),
                    };
                    self.pending = Some(next);
                    self.bundle.push(next);
                }
                Step::Promote => {
                    if let Some(next) = self.pending.take() {
                        self.signing = next;
                        self.leaf = (next, issue(&next));
                    }
                }
                Step::RenewLeaf => self.leaf = (self.signing, issue(&self.signing)),
                Step::Publish => {
                    self.published = Some((self.bundle.clone(), now));
                    self.clients_trust = self.bundle.clone();
                }
                Step::Wait { .. } => {}
            }
        }
    }

    proptest! {
        /// Over several CA lifetimes, polled at irregular intervals, the served certificate is
        /// always unexpired and signed by a CA that clients were told to trust, once the first
        /// bundle is out.
        #[test]
        fn what_is_served_is_always_trusted_and_valid(gaps in proptest::collection::vec(1i64..4, 200..600)) {
            let policy = Policy {
                ca_validity: Duration::from_secs(120),
                leaf_validity: Duration::from_secs(20),
                propagation: Duration::from_secs(3),
            };
            prop_assert!(policy.check().is_ok());
            let mut now = at(0);
            let mut world = World::new(&policy, now);
            let mut started = false;
            for gap in gaps {
                // Several steps may be due at one moment.
                for _ in 0..6 {
                    let step = next_step(&world.observed(), &policy, now);
                    if matches!(step, Step::Wait { .. }) {
                        break;
                    }
                    world.apply(step, &policy, now);
                }
                started |= world.published.is_some();
                if started {
                    let (ca, leaf) = world.leaf;
                    prop_assert!(remaining(&leaf, now).is_positive(), "expired leaf {:?} at {:?}", leaf, now);
                    prop_assert!(world.clients_trust.contains(&ca), "leaf from {:?}, clients trust {:?}", ca, world.clients_trust);
                    prop_assert!(remaining(&ca, now).is_positive(), "its CA expired");
                }
                now += SignedDuration::from_secs(gap);
            }
        }
    }
}
