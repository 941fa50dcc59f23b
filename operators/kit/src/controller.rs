//! Controllers: kube-runtime's `Controller`, fed from caches every replica keeps, run while
//! the replica leads, with what every Gantry controller needs around its reconcile function:
//! a tracing span carrying the object's key, reconcile metrics, graceful shutdown, pacing, the
//! shared error policy, and objects that cannot be read reported instead of stalling the rest.
//!
//! ```ignore
//! let apps = runtime.controller::<GrayApp>("grayapp", watcher::Config::default());
//! let pods = runtime.owned_index("grayapp pods", runtime.api::<LeanPod>(), config, pod_view);
//! apps.owns(pods.changes()).run(context, reconcile).await;
//! ```
//!
//! The controlled kind is watched on every replica from the moment [`Runtime::controller`] is
//! called (its cache counts towards readiness); reconciles run only while the replica leads,
//! beginning with every object in the cache each time it takes over.
//!
//! **Objects that cannot be read.** The watch decodes each object on its own
//! ([`crate::decode`]): one object that does not fit the operator's types (stored under an
//! older schema, say) is skipped, logged, reported with a Warning event `Undecodable` on
//! itself and a `Stalled` condition where its status can be written, once per generation; the
//! others are reconciled as usual.
//!
//! **Pacing.** A reconcile of one object that finishes sooner than the controller's interval
//! (`--reconcile-interval-ms` unless the controller sets its own, zero for a node agent) after
//! it started holds the object until the interval is over, so that the changes arriving
//! meanwhile (an object owning thousands of pods sees many) are handled together by one
//! reconcile that starts with fresh caches. A change the object is waiting for (one its index
//! judges urgent) ends the hold early: see [`crate::pacing`]. The first reconcile after a
//! quiet spell starts at once.
//!
//! **Errors.** A transient error is retried after an exponential, jittered, capped backoff that
//! grows per object, resets on the object's next success and is forgotten when the object is
//! deleted; a permanent error (an invalid spec) is not retried at all: the reconcile function
//! is expected to have reported `Stalled` with the reason, and the object is reconciled again
//! when it changes.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::{self, BoxStream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::Controller;
use kube::runtime::controller::{Action, Error as ControllerError};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::cache::{Cache, Change, Changes, Seen};
use crate::conditions::{self, Summary};
use crate::decode::Decoded;
use crate::error::{ErrorClass, ReconcileError};
use crate::events::Reason;
use crate::pacing::Pacing;
use crate::runtime::{ApiScope, Runtime};

/// `namespace/name`, or `name` for cluster-scoped objects.
pub fn object_key<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    key_of(
        meta.namespace.as_deref(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

/// `namespace/name` (or `name`) from the parts, as [`object_key`] spells it.
pub fn key_of(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

crate::reasons! {
    /// The events the kit itself writes about an operator's objects.
    pub enum KitReason {
        /// The object does not fit the operator's types and is skipped until it changes.
        Undecodable => Warning, "Decode";
    }
}

/// Why a reconcile did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Failure<E> {
    #[error(transparent)]
    Reconcile(E),
    #[error("the object cannot be read as this operator's type: {0}")]
    Undecodable(String),
}

impl<E: ReconcileError> Failure<E> {
    fn metric_reason(&self) -> &'static str {
        match self {
            Failure::Reconcile(err) => err.metric_reason(),
            Failure::Undecodable(_) => "Undecodable",
        }
    }
}

/// A kind a controller can control: a typed resource that decodes from the API and can be
/// shared between tasks.
pub trait Kind:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Kind for K where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}
type Trigger<K> = Box<dyn Fn(&Change) -> Option<ObjectRef<Decoded<K>>> + Send + Sync>;

/// A controller of kind `K` being put together; see the module docs.
pub struct ControllerBuilder<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    runtime: Runtime,
    name: &'static str,
    objects: Cache<Decoded<K>>,
    triggers: Vec<(Changes, Trigger<K>)>,
    pacing: Duration,
}

impl Runtime {
    /// A controller named `name` of the objects of kind `K` that `config` selects (in the
    /// operator's scope). Their watch starts now, on every replica.
    pub fn controller<K>(&self, name: &'static str, config: watcher::Config) -> ControllerBuilder<K>
    where
        K: Kind,
        K::Scope: ApiScope,
    {
        let objects = self.cache(name, self.api::<Decoded<K>>(), config);
        ControllerBuilder {
            runtime: self.clone(),
            name,
            objects,
            triggers: Vec::new(),
            pacing: self.reconcile_interval(),
        }
    }
}

impl<K: Kind> ControllerBuilder<K> {
    /// Reconciles an object when something it controls changes: an object in `changes` whose
    /// `ownerReferences` name it with `controller: true`.
    #[must_use]
    pub fn owns(self, changes: &Changes) -> Self {
        let (api_version, kind) = (K::api_version(&()).to_string(), K::kind(&()).to_string());
        self.watches(changes, move |change| {
            let owner = change.controller.as_ref()?;
            (owner.kind == kind && owner.api_version == api_version)
                .then(|| reference(&owner.name, change.namespace.as_deref()))
        })
    }

    /// Reconciles the object `map` names (if any) whenever something in `changes` changes.
    #[must_use]
    pub fn watches(
        mut self,
        changes: &Changes,
        map: impl Fn(&Change) -> Option<ObjectRef<Decoded<K>>> + Send + Sync + 'static,
    ) -> Self {
        self.triggers.push((changes.clone(), Box::new(map)));
        self
    }

    /// The least time between the starts of two reconciles of one object, unless an urgent
    /// change cuts it short (zero reconciles on every change).
    #[must_use]
    pub fn pacing(mut self, interval: Duration) -> Self {
        self.pacing = interval;
        self
    }

    /// The controlled objects, as the cache holds them.
    pub fn cache(&self) -> &Cache<Decoded<K>> {
        &self.objects
    }

    /// Runs the controller while this replica leads, calling `reconcile` for each object with
    /// `ctx`, until shutdown; returns once in-flight reconciles have finished.
    pub async fn run<Ctx, F, Fut, E>(self, ctx: Arc<Ctx>, reconcile: F)
    where
        Ctx: Send + Sync + 'static,
        F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Action, E>> + Send + 'static,
        E: ReconcileError,
    {
        let name = self.name;
        let shared = Arc::new(Shared {
            name,
            ctx,
            reconcile,
            runtime: self.runtime.clone(),
            pacing: Pacing::new(self.pacing),
            backoff: Backoff::default(),
            memory: Mutex::default(),
        });
        let triggers = Arc::new(self.triggers);
        let objects = self.objects;
        self.runtime
            .while_leading(name, || {
                let controller = Controller::for_shared_stream(
                    stream::pending::<Arc<Decoded<K>>>(),
                    objects.store().clone(),
                )
                .reconcile_on(term_triggers(&objects, &triggers, &shared))
                .graceful_shutdown_on(shared.runtime.shutdown_token().clone().cancelled_owned());
                let shared = Arc::clone(&shared);
                async move {
                    controller
                        .run(reconcile_instrumented, error_policy, Arc::clone(&shared))
                        .for_each(|result| async move {
                            match result {
                                Ok(_) | Err(ControllerError::ReconcilerFailed(..)) => {}
                                Err(ControllerError::ObjectNotFound(gone)) => {
                                    tracing::debug!(controller = name, object = %gone, "object gone before its reconcile");
                                }
                                Err(err) => {
                                    tracing::warn!(controller = name, error = %err, "controller error");
                                }
                            }
                        })
                        .await;
                    tracing::info!(controller = name, "controller stopped");
                }
            })
            .await;
    }
}

fn reference<K>(name: &str, namespace: Option<&str>) -> ObjectRef<Decoded<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let reference = ObjectRef::new(name);
    match namespace {
        Some(ns) => reference.within(ns),
        None => reference,
    }
}

/// What one term of leadership reconciles: every object once the cache is synced, then each
/// object that changed or whose children changed, and every object again whenever a
/// subscription fell behind or a cache was relisted, and so may have missed something.
fn term_triggers<K, Ctx, F>(
    objects: &Cache<Decoded<K>>,
    triggers: &Arc<Vec<(Changes, Trigger<K>)>>,
    shared: &Arc<Shared<Ctx, F>>,
) -> BoxStream<'static, ObjectRef<Decoded<K>>>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    Ctx: Send + Sync + 'static,
    F: Send + Sync + 'static,
{
    let store = objects.store().clone();
    let prune = Arc::clone(shared);
    // Every object again, and nothing remembered of those gone: a deletion during a watch gap
    // or while this replica stood by sent no event to forget them by.
    let everything = move || -> BoxStream<'static, ObjectRef<Decoded<K>>> {
        let objects = store.state();
        let present: HashSet<String> = objects.iter().map(|o| object_key(o.as_ref())).collect();
        prune.memory().keep_only(&present);
        stream::iter(
            objects
                .into_iter()
                .map(|object| ObjectRef::from_obj(object.as_ref())),
        )
        .boxed()
    };
    let own = {
        let forget = Arc::clone(shared);
        let everything = everything.clone();
        objects
            .changes()
            .subscribe()
            .flat_map(move |seen| match seen {
                Seen::Changed(change) if change.deleted => {
                    forget.forget(&change_key(&change));
                    stream::empty().boxed()
                }
                Seen::Changed(change) => {
                    stream::iter([reference(&change.name, change.namespace.as_deref())]).boxed()
                }
                Seen::Missed => everything(),
            })
            .boxed()
    };
    // Subscribed first: a cache that completes its list after this check announces it (and
    // so every object) to the subscription; one complete already is reconciled whole now.
    let first = if objects.synced().is_synced() {
        everything()
    } else {
        stream::empty().boxed()
    };
    let mut all = vec![first, own];
    for index in 0..triggers.len() {
        let triggers = Arc::clone(triggers);
        let everything = everything.clone();
        let urge = Arc::clone(shared);
        let source = triggers[index].0.subscribe();
        all.push(
            source
                .flat_map(move |seen| match seen {
                    Seen::Changed(change) => {
                        let target = (triggers[index].1)(&change);
                        if change.urgent
                            && let Some(target) = &target
                        {
                            urge.pacing
                                .urge(&key_of(target.namespace.as_deref(), &target.name));
                        }
                        stream::iter(target).boxed()
                    }
                    Seen::Missed => everything(),
                })
                .boxed(),
        );
    }
    stream::select_all(all).boxed()
}

fn change_key(change: &Change) -> String {
    key_of(change.namespace.as_deref(), &change.name)
}

struct Shared<Ctx, F> {
    name: &'static str,
    ctx: Arc<Ctx>,
    reconcile: F,
    runtime: Runtime,
    pacing: Pacing,
    backoff: Backoff,
    memory: Mutex<Memory>,
}

/// What a controller remembers per object, until the object succeeds, changes or is deleted.
#[derive(Default)]
struct Memory {
    /// Consecutive transient failures, for the backoff.
    failures: HashMap<String, u32>,
    /// The generation last reported as undecodable.
    undecodable: HashMap<String, Option<i64>>,
}

impl Memory {
    fn keep_only(&mut self, present: &HashSet<String>) {
        self.failures.retain(|key, _| present.contains(key));
        self.undecodable.retain(|key, _| present.contains(key));
    }
}

impl<Ctx, F> Shared<Ctx, F> {
    fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn forget(&self, key: &str) {
        let mut memory = self.memory();
        memory.failures.remove(key);
        memory.undecodable.remove(key);
    }
}

fn reconcile_instrumented<K, Ctx, F, Fut, E>(
    obj: Arc<Decoded<K>>,
    shared: Arc<Shared<Ctx, F>>,
) -> impl Future<Output = Result<Action, Failure<E>>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    Ctx: Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
    E: ReconcileError,
{
    let key = object_key(obj.as_ref());
    let span = tracing::info_span!("reconcile", controller = shared.name, object = %key);
    let decoded = obj.0.clone();
    async move {
        let hold = shared.pacing.start(&key);
        let started = Instant::now();
        let result = match decoded {
            Ok(object) => {
                shared.memory().undecodable.remove(&key);
                (shared.reconcile)(object, Arc::clone(&shared.ctx))
                    .await
                    .map_err(Failure::Reconcile)
            }
            Err(invalid) => {
                report_undecodable::<K, _, _>(&shared, &key, &obj, &invalid.error).await;
                Err(Failure::Undecodable(invalid.error))
            }
        };
        let elapsed = started.elapsed();
        shared.runtime.metrics().reconcile.observe(
            shared.name,
            elapsed,
            result.as_ref().err().map(Failure::metric_reason),
        );
        match &result {
            Ok(action) => {
                shared.memory().failures.remove(&key);
                tracing::debug!(?action, ?elapsed, "reconciled");
            }
            Err(err) => tracing::debug!(error = %err, ?elapsed, "reconcile failed"),
        }
        shared
            .pacing
            .hold(hold, shared.runtime.shutdown_token())
            .await;
        result
    }
    .instrument(span)
}

/// Logs, records a Warning event on the object and sets `Stalled` where its status can be
/// written, once per generation of the object.
async fn report_undecodable<K, Ctx, F>(
    shared: &Shared<Ctx, F>,
    key: &str,
    obj: &Decoded<K>,
    error: &str,
) where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let meta = obj.meta();
    let generation = meta.generation;
    if shared.memory().undecodable.get(key) == Some(&generation) {
        return;
    }
    let kind = K::kind(&());
    tracing::warn!(controller = shared.name, object = %key, %error, "cannot read the object; skipping it until it changes");
    let regarding = obj.object_ref(&());
    let message = format!(
        "this {kind} cannot be read: {error}. It is skipped until it is fixed; the others are \
         reconciled as usual."
    );
    shared
        .runtime
        .events()
        .publish(&regarding, KitReason::Undecodable, message.clone())
        .await;
    if let Err(err) = write_stalled::<K>(&shared.runtime, meta, message).await {
        tracing::debug!(object = %key, error = %err, "could not set Stalled on the object");
    }
    shared
        .memory()
        .undecodable
        .insert(key.to_string(), generation);
}

async fn write_stalled<K>(
    runtime: &Runtime,
    meta: &ObjectMeta,
    message: String,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let now = Time(Timestamp::now());
    let mut summary = Vec::new();
    conditions::set_summary(
        &mut summary,
        &Summary::Stalled {
            reason: KitReason::Undecodable.reason().to_string(),
            message,
        },
        meta.generation,
        &now,
    );
    let name = meta.name.clone().unwrap_or_default();
    // Dynamic, because the answer is the object that could not be read in the first place.
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match &meta.namespace {
        Some(ns) => Api::namespaced_with(runtime.client().clone(), ns, &resource),
        None => Api::all_with(runtime.client().clone(), &resource),
    };
    // A merge patch, not server-side apply: apply would need the stored object to fit the
    // schema's types, which is what an undecodable object may not do.
    let body = serde_json::json!({
        "status": { "observedGeneration": meta.generation, "conditions": summary },
    });
    let params = kube::api::PatchParams {
        field_manager: Some(runtime.field_manager().to_string()),
        ..kube::api::PatchParams::default()
    };
    api.patch_status(&name, &params, &kube::api::Patch::Merge(body))
        .await?;
    Ok(())
}

fn error_policy<K, Ctx, F, E>(
    obj: Arc<Decoded<K>>,
    err: &Failure<E>,
    shared: Arc<Shared<Ctx, F>>,
) -> Action
where
    K: Resource<DynamicType = ()> + Clone,
    E: ReconcileError,
{
    let key = object_key(obj.as_ref());
    let class = match err {
        Failure::Reconcile(err) => err.class(),
        Failure::Undecodable(_) => ErrorClass::Permanent,
    };
    match class {
        ErrorClass::Permanent => {
            shared.memory().failures.remove(&key);
            tracing::warn!(controller = shared.name, object = %key, error = %err, "reconcile failed permanently; waiting for a change");
            Action::await_change()
        }
        ErrorClass::Transient => {
            let attempt = {
                let mut memory = shared.memory();
                let count = memory.failures.entry(key.clone()).or_insert(0);
                *count = count.saturating_add(1);
                *count
            };
            let delay = shared.backoff.delay_random(attempt - 1);
            tracing::warn!(controller = shared.name, object = %key, error = %err, attempt, retry_in = ?delay, "reconcile failed; will retry");
            Action::requeue(delay)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::watcher::Event;

    fn guarded(name: &str) -> Decoded<ConfigMap> {
        Decoded(Ok(Arc::new(ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        })))
    }

    /// The names of the next `count` objects `triggers` asks to reconcile, sorted.
    async fn next_names(
        triggers: &mut BoxStream<'static, ObjectRef<Decoded<ConfigMap>>>,
        count: usize,
    ) -> Vec<String> {
        let mut names = Vec::new();
        for _ in 0..count {
            let next = tokio::time::timeout(Duration::from_secs(5), triggers.next())
                .await
                .expect("a trigger");
            names.extend(next.map(|r| r.name));
        }
        names.sort();
        names
    }

    /// What a controller shares, remembering `memory`, with no reconcile function.
    fn shared(memory: Memory) -> Arc<Shared<(), ()>> {
        Arc::new(Shared {
            name: "test",
            ctx: Arc::new(()),
            reconcile: (),
            runtime: crate::testing::test_runtime(),
            pacing: Pacing::default(),
            backoff: Backoff::default(),
            memory: Mutex::new(memory),
        })
    }

    #[tokio::test]
    async fn a_deleted_object_is_forgotten_and_the_others_are_reconciled() {
        let (objects, mut feed) = Cache::<Decoded<ConfigMap>>::new();
        let shared = shared(Memory {
            failures: HashMap::from([("ns/a".into(), 3), ("ns/b".into(), 1)]),
            undecodable: HashMap::from([("ns/a".into(), Some(1))]),
        });
        let mut triggers = term_triggers(&objects, &Arc::new(Vec::new()), &shared);
        feed.apply(&Event::Delete(guarded("a")));
        feed.apply(&Event::Apply(guarded("c")));
        assert_eq!(
            next_names(&mut triggers, 1).await,
            ["c"],
            "nothing for the deleted one"
        );
        let memory = shared.memory();
        assert!(
            !memory.failures.contains_key("ns/a"),
            "its backoff is forgotten"
        );
        assert!(!memory.undecodable.contains_key("ns/a"));
        assert_eq!(
            memory.failures.get("ns/b"),
            Some(&1),
            "the others keep theirs"
        );
    }

    #[tokio::test]
    async fn a_term_begins_with_every_object_once_the_cache_is_synced() {
        let (objects, mut feed) = Cache::<Decoded<ConfigMap>>::new();
        let shared = shared(Memory::default());
        feed.apply(&Event::Init);
        feed.apply(&Event::InitApply(guarded("x")));
        feed.apply(&Event::InitApply(guarded("y")));
        let mut triggers = term_triggers(&objects, &Arc::new(Vec::new()), &shared);
        feed.apply(&Event::InitDone);
        assert_eq!(next_names(&mut triggers, 2).await, ["x", "y"]);
        feed.apply(&Event::Apply(guarded("z")));
        assert_eq!(
            next_names(&mut triggers, 1).await,
            ["z"],
            "each object once"
        );

        // The next term begins with the cache synced: every object at once.
        let mut next_term = term_triggers(&objects, &Arc::new(Vec::new()), &shared);
        assert_eq!(next_names(&mut next_term, 3).await, ["x", "y", "z"]);
    }

    #[tokio::test]
    async fn a_relist_reconciles_everything_and_forgets_what_vanished_during_the_gap() {
        let (objects, mut feed) = Cache::<Decoded<ConfigMap>>::new();
        for event in [Event::Init, Event::InitApply(guarded("a")), Event::InitDone] {
            feed.apply(&event);
        }
        let shared = shared(Memory {
            failures: HashMap::from([("ns/a".into(), 2)]),
            undecodable: HashMap::from([("ns/a".into(), Some(1))]),
        });
        let mut triggers = term_triggers(&objects, &Arc::new(Vec::new()), &shared);
        assert_eq!(
            next_names(&mut triggers, 1).await,
            ["a"],
            "the term's first pass"
        );
        // The watch was lost; meanwhile `a` was deleted and `b` created.
        for event in [Event::Init, Event::InitApply(guarded("b")), Event::InitDone] {
            feed.apply(&event);
        }
        assert_eq!(next_names(&mut triggers, 1).await, ["b"]);
        let memory = shared.memory();
        assert!(memory.failures.is_empty() && memory.undecodable.is_empty());
    }
}
