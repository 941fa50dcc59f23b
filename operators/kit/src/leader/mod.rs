//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Replicas poll the Lease every retry period. The holder renews it; the others take it over
//! only once it has gone unrenewed for a whole lease duration by their own clock
//! ([`decide`]). Every write carries the resourceVersion that was read, so the API server lets
//! exactly one candidate win a race. A leader that cannot renew within the renew deadline (shorter
//! than the lease duration) steps down before anyone else may take over, and on shutdown the
//! leader keeps renewing until its work has drained, then releases the Lease so a standby takes
//! over at its next poll instead of waiting for expiry.

pub mod decide;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::KitError;
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

/// Where this replica stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// Waiting for the lease; healthy, doing no work.
    StandingBy,
    /// Holding the lease; the only replica allowed to act.
    Leading,
    /// Held the lease and lost it: the process must stop acting at once.
    Lost,
}

enum Outcome {
    Leading,
    NotLeading,
    /// The write raced with another; the next poll tells who won.
    Unconfirmed,
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

    /// Campaigns and renews until `release` is cancelled, publishing each change of
    /// leadership on `state`; then releases the Lease if held. Returns an error when leadership
    /// was lost, so the caller can stop all work.
    pub async fn run(
        mut self,
        state: watch::Sender<Leadership>,
        release: CancellationToken,
    ) -> Result<(), KitError> {
        let mut leading = false;
        let mut last_renewed = Instant::now();
        loop {
            let outcome = self.try_once().await;
            let now = Instant::now();
            match outcome {
                Ok(Outcome::Leading) => {
                    last_renewed = now;
                    if !leading {
                        leading = true;
                        tracing::info!(lease = %self.config.name, identity = %self.config.identity, "acquired leadership");
                        state.send_replace(Leadership::Leading);
                    }
                }
                Ok(Outcome::NotLeading) if leading => {
                    return self.lose(&state, "another replica holds the lease");
                }
                Ok(Outcome::NotLeading) => {}
                Ok(Outcome::Unconfirmed) => {
                    tracing::debug!(lease = %self.config.name, "lease write raced with another replica");
                }
                Err(err) => {
                    tracing::warn!(lease = %self.config.name, error = %err, "could not read or renew the lease");
                }
            }
            if leading && renewal_overdue(last_renewed, now, self.config.renew_deadline) {
                return self.lose(&state, "could not renew within the renew deadline");
            }
            tokio::select! {
                () = release.cancelled() => break,
                () = tokio::time::sleep(self.config.retry_period) => {}
            }
        }
        if leading {
            self.release().await;
        }
        Ok(())
    }

    fn lose(&self, state: &watch::Sender<Leadership>, reason: &str) -> Result<(), KitError> {
        tracing::error!(lease = %self.config.name, reason, "lost leadership");
        state.send_replace(Leadership::Lost);
        Err(KitError::LeadershipLost {
            lease: format!("{}/{}", self.config.namespace, self.config.name),
            reason: reason.to_string(),
        })
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
        let result = async {
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
        }
        .await;
        match result {
            Ok(()) => tracing::info!(lease = %self.config.name, "released leadership"),
            Err(err) => {
                tracing::warn!(lease = %self.config.name, error = %err, "could not release the lease; it will expire")
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
