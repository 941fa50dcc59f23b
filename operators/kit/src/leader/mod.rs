//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Replicas poll the Lease every retry period. The holder renews it; the others take it over
//! only once it has gone unrenewed for a whole lease duration by their own clock
//! ([`decide`]). Every write carries the resourceVersion that was read, so the API server lets
//! exactly one candidate win a race. A leader that cannot renew within the renew deadline (shorter
//! than the lease duration) steps down before anyone else may take over, and on shutdown the
//! leader keeps renewing until its work has drained, then releases the Lease so a standby takes
//! over at its next poll instead of waiting for expiry.
//!
//! The election gates only the work that must not run twice ([`Leadership`]): a replica that
//! loses the lease stops that work at once and stands by again, while what it serves on every
//! replica (webhooks, extenders, caches) carries on. Every change of standing is logged with a
//! `leadership` field (`acquired` or `ended`) and the term, so that a test can check from the
//! logs alone that no two replicas ever led at once.

pub mod decide;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use decide::{Decision, LeaseRecord, Observer, renewal_overdue};

/// Where the Lease lives and how it is timed.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's name in `holderIdentity`; unique per replica (the pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
    /// A leader that has not renewed for this long steps down; shorter than `duration`.
    pub renew_deadline: Duration,
    /// How often every replica reads (and the leader renews) the Lease.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The usual timing: 15 s lease, 10 s renew deadline, 2 s polls. A killed leader is replaced
    /// within about 17 s; one that stops cleanly within about 2 s.
    pub fn new(name: String, namespace: String, identity: String) -> Self {
        Self {
            name,
            namespace,
            identity,
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Where this replica stands, as the election publishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    /// Whether this replica holds the lease now and may do the work that must not run twice.
    pub leading: bool,
    /// Counts the terms this replica has led, the current one included: a replica that loses
    /// the lease and wins it back is in a new term, so work tied to the old one can tell.
    pub term: u64,
}

/// Whether this replica leads now, for work that must not run on two replicas at once.
/// Cheap to clone; every clone sees the same election.
#[derive(Clone, Debug)]
pub struct Leadership {
    standing: watch::Receiver<Standing>,
}

impl Leadership {
    /// A replica that does not take part in an election leads from the start, for good.
    pub fn always() -> Self {
        let (sender, standing) = watch::channel(Standing {
            leading: true,
            term: 1,
        });
        // A receiver still reads the last value once its sender is gone, which is all a lone
        // replica needs.
        drop(sender);
        Self { standing }
    }

    /// A handle on an election that `sender` publishes to.
    pub fn channel() -> (watch::Sender<Standing>, Self) {
        let (sender, standing) = watch::channel(Standing {
            leading: false,
            term: 0,
        });
        (sender, Self { standing })
    }

    /// What the election says now.
    pub fn standing(&self) -> Standing {
        *self.standing.borrow()
    }

    pub fn is_leading(&self) -> bool {
        self.standing().leading
    }

    /// Waits for the next change of standing; false once the election is over for good.
    pub async fn changed(&mut self) -> bool {
        self.standing.changed().await.is_ok()
    }

    /// Waits until this replica leads; returns the term.
    pub async fn acquired(&mut self) -> u64 {
        let waited = self.standing.wait_for(|s| s.leading).await.map(|s| s.term);
        match waited {
            Ok(term) => term,
            // The election is over (a lone replica's, or one that ended at shutdown): it is
            // whatever it last said, for good.
            Err(_) if self.is_leading() => self.standing().term,
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits until `term` is over: the lease was lost (or released), even if a later term has
    /// begun since.
    pub async fn ended(&mut self, term: u64) {
        let over = |s: &Standing| !s.leading || s.term != term;
        let closed = self.standing.wait_for(over).await.is_err();
        if closed && !over(&self.standing()) {
            std::future::pending::<()>().await;
        }
    }
}

enum Outcome {
    Leading,
    NotLeading,
    /// The write raced with another; the next poll tells who won.
    Unconfirmed,
    /// No answer within the time allowed; whether a write took effect is unknown.
    TimedOut,
}

/// Runs the election for one replica.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observer: Observer,
}

impl LeaderElector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observer: Observer::default(),
        }
    }

    /// Campaigns and renews until `release` is cancelled, publishing each change of standing
    /// on `standing`; then releases the Lease if held. A leader that loses the lease (another
    /// replica holds it, or it could not renew in time) publishes that it no longer leads at
    /// once, so its leader-only work stops, and campaigns again.
    pub async fn run(mut self, standing: watch::Sender<Standing>, release: CancellationToken) {
        let mut term: u64 = 0;
        let mut leading = false;
        let mut last_renewed = Instant::now();
        loop {
            let started = Instant::now();
            let outcome = self.attempt(leading, last_renewed, started).await;
            let now = Instant::now();
            match outcome {
                Ok(Outcome::Leading) => {
                    // The lease counts from when the write was sent, not when it was answered.
                    last_renewed = started;
                    if !leading {
                        leading = true;
                        term += 1;
                        tracing::info!(lease = %self.config.name, identity = %self.config.identity, term, leadership = "acquired", "acquired leadership");
                        standing.send_replace(Standing { leading, term });
                    }
                }
                Ok(Outcome::NotLeading) if leading => {
                    leading = false;
                    self.lose(&standing, term, "another replica holds the lease");
                }
                Ok(Outcome::NotLeading) => {}
                Ok(Outcome::Unconfirmed) => {
                    tracing::debug!(lease = %self.config.name, "lease write raced with another replica");
                }
                Ok(Outcome::TimedOut) => {
                    tracing::warn!(lease = %self.config.name, "the API server did not answer the lease request in time");
                }
                Err(err) => {
                    tracing::warn!(lease = %self.config.name, error = %err, "could not read or renew the lease");
                }
            }
            if leading && renewal_overdue(last_renewed, now, self.config.renew_deadline) {
                leading = false;
                self.lose(&standing, term, "could not renew within the renew deadline");
            }
            tokio::select! {
                () = release.cancelled() => break,
                () = tokio::time::sleep(self.config.retry_period) => {}
            }
        }
        if leading {
            // The caller cancels `release` only once leader-only work has stopped.
            tracing::info!(lease = %self.config.name, identity = %self.config.identity, term, leadership = "ended", "stopped leading; releasing the lease");
            standing.send_replace(Standing {
                leading: false,
                term,
            });
            self.release().await;
        }
    }

    fn lose(&self, standing: &watch::Sender<Standing>, term: u64, reason: &str) {
        standing.send_replace(Standing {
            leading: false,
            term,
        });
        tracing::error!(lease = %self.config.name, identity = %self.config.identity, term, leadership = "ended", reason, "lost leadership; stopped leader-only work");
    }

    /// One read-decide-write round, bounded in time: a leader's by what is left of its renew
    /// deadline (a hung request must not keep it leading past the point where a standby may
    /// take the lease), a standby's by the whole deadline.
    async fn attempt(
        &mut self,
        leading: bool,
        last_renewed: Instant,
        started: Instant,
    ) -> Result<Outcome, kube::Error> {
        let budget = if leading {
            self.config
                .renew_deadline
                .saturating_sub(started.saturating_duration_since(last_renewed))
        } else {
            self.config.renew_deadline
        };
        tokio::time::timeout(budget, self.try_once())
            .await
            .unwrap_or(Ok(Outcome::TimedOut))
    }

    async fn try_once(&mut self) -> Result<Outcome, kube::Error> {
        let lease = self.api.get_opt(&self.config.name).await?;
        let record = lease.as_ref().map(record_of);
        let decision = self
            .observer
            .decide(record.as_ref(), &self.config.identity, Instant::now());
        let now = MicroTime(Timestamp::now());
        let written = match (decision, lease) {
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now.clone(), now, 0)),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(now);
                spec.lease_duration_seconds = Some(duration_seconds(self.config.duration));
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Acquire { transitions }, Some(mut lease)) => {
                tracing::info!(lease = %self.config.name, "lease is free or expired; trying to take it");
                lease.spec = Some(self.spec(now.clone(), now, transitions));
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::StandBy { holder, expires_in }, _) => {
                tracing::debug!(%holder, ?expires_in, "standing by");
                return Ok(Outcome::NotLeading);
            }
            // The decision came from the lease we read, so Renew and Acquire always have one.
            (Decision::Renew | Decision::Acquire { .. }, None) => return Ok(Outcome::Unconfirmed),
        };
        match written {
            Ok(()) => Ok(Outcome::Leading),
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                Ok(Outcome::Unconfirmed)
            }
            Err(err) => Err(err),
        }
    }

    fn spec(&self, acquired: MicroTime, renewed: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration_seconds(self.config.duration)),
            acquire_time: Some(acquired),
            renew_time: Some(renewed),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Gives the lease up so a standby can take it at its next poll. Best effort: if this
    /// fails, the lease simply expires.
    async fn release(&self) {
        let result = tokio::time::timeout(self.config.renew_deadline, async {
            let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::info!(lease = %self.config.name, "released leadership"),
            Ok(Err(err)) => {
                tracing::warn!(lease = %self.config.name, error = %err, "could not release the lease; it will expire")
            }
            Err(_) => {
                tracing::warn!(lease = %self.config.name, "the API server did not answer the release in time; the lease will expire")
            }
        }
    }
}

fn duration_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

fn record_of(lease: &Lease) -> LeaseRecord {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseRecord {
        holder: spec.holder_identity,
        renew_time: spec.renew_time.map(|t| t.0.to_string()),
        duration: Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
        ),
        transitions: spec.lease_transitions.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An API server that answers the first read (no Lease yet) and the create, then never
    /// answers again: a hung connection.
    fn answers_twice_then_hangs() -> kube::Client {
        let calls = Arc::new(AtomicUsize::new(0));
        let service = tower::service_fn(move |_: http::Request<kube::client::Body>| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let (status, body) = match call {
                    0 => (
                        404,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                    ),
                    1 => (
                        201,
                        serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l", "namespace": "ns"}}),
                    ),
                    _ => std::future::pending().await,
                };
                let body = kube::client::Body::from(serde_json::to_vec(&body).expect("encodes"));
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(body)
                        .expect("a response"),
                )
            }
        });
        kube::Client::new(service, "ns")
    }

    #[tokio::test]
    async fn a_leader_whose_renewal_hangs_steps_down_by_its_renew_deadline() {
        let config = LeaseConfig {
            duration: Duration::from_secs(3),
            renew_deadline: Duration::from_millis(600),
            retry_period: Duration::from_millis(100),
            ..LeaseConfig::new("l".into(), "ns".into(), "me".into())
        };
        let (standing, mut seen) = watch::channel(Standing {
            leading: false,
            term: 0,
        });
        let release = CancellationToken::new();
        let elector = tokio::spawn(
            LeaderElector::new(answers_twice_then_hangs(), config).run(standing, release.clone()),
        );
        let mut states = Vec::new();
        let outcome = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if seen.changed().await.is_err() {
                    return;
                }
                let now = *seen.borrow_and_update();
                states.push(now);
                if !now.leading {
                    return;
                }
            }
        })
        .await;
        assert!(outcome.is_ok(), "still leading after 30 s: {states:?}");
        assert_eq!(
            states,
            [
                Standing {
                    leading: true,
                    term: 1
                },
                Standing {
                    leading: false,
                    term: 1
                }
            ]
        );
        release.cancel();
        assert!(
            tokio::time::timeout(Duration::from_secs(30), elector)
                .await
                .is_ok(),
            "a release with the API server hung ends too"
        );
    }
}
