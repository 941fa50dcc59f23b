//! Runs a kube-runtime `Controller` with what every Gantry controller needs around its
//! reconcile function: a tracing span carrying the object's key, reconcile metrics, readiness
//! once the cache has synced, graceful shutdown, and the shared error policy.
//!
//! Reconciles of one object are paced: one that finishes sooner than the runtime's reconcile
//! interval after it started holds the object until the interval is over, so that the changes
//! arriving meanwhile (an object owning thousands of pods sees many) are handled together by
//! one reconcile that starts with fresh caches. The first reconcile after a quiet spell starts
//! at once.
//!
//! The error policy: a transient error is retried after an exponential, jittered, capped
//! backoff that grows per object and resets on the object's next success; a permanent error
//! (an invalid spec) is not retried at all: the reconcile function is expected to have reported
//! `Stalled` with the reason, and the object is reconciled again when it changes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::StreamExt;
use kube::Resource;
use kube::runtime::Controller;
use kube::runtime::controller::{Action, Error as ControllerError};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::error::{ErrorClass, ReconcileError};
use crate::runtime::Runtime;

struct Shared<Ctx, F> {
    name: &'static str,
    ctx: Arc<Ctx>,
    reconcile: F,
    runtime: Runtime,
    backoff: Backoff,
    failures: Mutex<HashMap<String, u32>>,
}

impl<Ctx, F> Shared<Ctx, F> {
    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Waits until `store` has its first complete list. Re-polls every 200 ms: the store's own
/// wait wakes only the last of several concurrent waiters (the controller waits on the same
/// store), so a lone `wait_until_ready().await` can sleep forever. Returns false if the store's
/// writer is gone.
pub async fn cache_ready<K>(store: &kube::runtime::reflector::Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(
            std::time::Duration::from_millis(200),
            store.wait_until_ready(),
        )
        .await
        {
            Ok(result) => return result.is_ok(),
            Err(_elapsed) => continue,
        }
    }
}

/// `namespace/name`, or `name` for cluster-scoped objects.
pub fn object_key<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    let name = meta.name.as_deref().unwrap_or_default();
    match meta.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

impl Runtime {
    /// Runs `controller` until shutdown, calling `reconcile` for each object with `ctx`.
    /// Returns once in-flight reconciles have finished after shutdown began.
    pub async fn run_controller<K, Ctx, F, Fut, E>(
        &self,
        name: &'static str,
        controller: Controller<K>,
        ctx: Arc<Ctx>,
        reconcile: F,
    ) where
        K: Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
        Ctx: Send + Sync + 'static,
        F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Action, E>> + Send + 'static,
        E: ReconcileError,
    {
        let cache = self.readiness().track_cache();
        let store = controller.store();
        tokio::spawn(async move {
            if cache_ready(&store).await {
                tracing::info!(controller = name, "cache synced");
                cache.synced();
            }
        });
        let shared = Arc::new(Shared {
            name,
            ctx,
            reconcile,
            runtime: self.clone(),
            backoff: Backoff::default(),
            failures: Mutex::default(),
        });
        controller
            .graceful_shutdown_on(self.shutdown_token().clone().cancelled_owned())
            .run(reconcile_instrumented, error_policy, shared)
            .for_each(|result| async move {
                match result {
                    Ok(_) | Err(ControllerError::ReconcilerFailed(..)) => {}
                    Err(err) => tracing::warn!(controller = name, error = %err, "controller error"),
                }
            })
            .await;
        tracing::info!(controller = name, "controller stopped");
    }
}

fn reconcile_instrumented<K, Ctx, F, Fut, E>(
    obj: Arc<K>,
    shared: Arc<Shared<Ctx, F>>,
) -> impl Future<Output = Result<Action, E>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
    Ctx: Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
    E: ReconcileError,
{
    let key = object_key(obj.as_ref());
    let span = tracing::info_span!("reconcile", controller = shared.name, object = %key);
    let fut = (shared.reconcile)(obj, Arc::clone(&shared.ctx));
    async move {
        let started = Instant::now();
        let result = fut.await;
        let elapsed = started.elapsed();
        let pause = shared.runtime.reconcile_interval().saturating_sub(elapsed);
        shared.runtime.metrics().reconcile.observe(
            shared.name,
            elapsed,
            result.as_ref().err().map(ReconcileError::metric_reason),
        );
        match &result {
            Ok(action) => {
                shared.failures().remove(&key);
                tracing::debug!(?action, ?elapsed, "reconciled");
            }
            Err(err) => tracing::debug!(error = %err, ?elapsed, "reconcile failed"),
        }
        if !pause.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shared.runtime.shutdown_token().cancelled() => {}
            }
        }
        result
    }
    .instrument(span)
}

fn error_policy<K, Ctx, F, E>(obj: Arc<K>, err: &E, shared: Arc<Shared<Ctx, F>>) -> Action
where
    K: Resource<DynamicType = ()>,
    E: ReconcileError,
{
    let key = object_key(obj.as_ref());
    match err.class() {
        ErrorClass::Permanent => {
            shared.failures().remove(&key);
            tracing::warn!(controller = shared.name, object = %key, error = %err, "reconcile failed permanently; waiting for a change");
            Action::await_change()
        }
        ErrorClass::Transient => {
            let attempt = {
                let mut failures = shared.failures();
                let count = failures.entry(key.clone()).or_insert(0);
                *count = count.saturating_add(1);
                *count
            };
            let delay = shared.backoff.delay_random(attempt - 1);
            tracing::warn!(controller = shared.name, object = %key, error = %err, attempt, retry_in = ?delay, "reconcile failed; will retry");
            Action::requeue(delay)
        }
    }
}
