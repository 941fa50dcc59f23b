//! Watch caches that every replica keeps, and the changes they see, for the controllers that
//! react to them.
//!
//! Caches run on every replica from the start, not only on the leader: a standby's caches are
//! warm, so it reconciles the moment it takes over instead of listing everything first, and
//! parts that serve on every replica (an extender, a webhook) read the same caches. A
//! controller subscribes to the [`Changes`] of the caches it reacts to for as long as its
//! replica leads ([`crate::controller`]).

use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};

use crate::runtime::Runtime;

/// How many changes a slow subscriber may fall behind before it is told it missed some (and
/// reconciles everything). Small: the channel keeps this many changes alive for good, and a
/// controller takes them as fast as they come.
const CHANGES_BUFFER: usize = 256;

/// The object that controls another, from its `ownerReferences` entry with `controller: true`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controlled {
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

/// One object a watch saw change, as the controllers that react to it need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub namespace: Option<String>,
    pub name: String,
    /// What controls the object, if anything does.
    pub controller: Option<Controlled>,
    /// The object is gone.
    pub deleted: bool,
    /// The change may be what a reconcile is waiting for: it ends the pacing of the controller
    /// it triggers (see [`crate::pacing`]). Only indexes judge changes so.
    pub urgent: bool,
}

impl Change {
    pub fn of<K: Resource>(object: &K, deleted: bool) -> Self {
        let meta = object.meta();
        let controller = crate::index::controller_of(object).map(|o| Controlled {
            api_version: o.api_version.clone(),
            kind: o.kind.clone(),
            name: o.name.clone(),
        });
        Self {
            namespace: meta.namespace.clone(),
            name: meta.name.clone().unwrap_or_default(),
            controller,
            deleted,
            urgent: false,
        }
    }
}

/// What a subscriber to [`Changes`] sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Changed(Change),
    /// Anything may have changed: the subscriber fell behind, or the cache was replaced by a
    /// fresh list (after a watch gap, whose changes and deletions no event tells of).
    Missed,
}

/// The changes one cache sees, for anyone subscribed at the time. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Changes {
    sender: broadcast::Sender<Seen>,
}

impl Default for Changes {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CHANGES_BUFFER).0,
        }
    }
}

impl Changes {
    /// Tells every subscriber; nobody subscribed is not an error.
    pub fn send(&self, change: Change) {
        let _ = self.sender.send(Seen::Changed(change));
    }

    /// Tells every subscriber that the cache now holds a fresh list.
    pub fn relisted(&self) {
        let _ = self.sender.send(Seen::Missed);
    }

    /// Announces what one watch event changed, once the cache has applied it. A list's
    /// objects are not announced one by one: they only take the cache's place at its end,
    /// and the end is announced as a relist.
    pub fn announce<K: Resource>(&self, event: &Event<K>) {
        match event {
            Event::Apply(object) => self.send(Change::of(object, false)),
            Event::Delete(object) => self.send(Change::of(object, true)),
            Event::InitDone => self.relisted(),
            Event::Init | Event::InitApply(_) => {}
        }
    }

    /// The changes from now on; ends when the cache is gone.
    pub fn subscribe(&self) -> impl Stream<Item = Seen> + Send + 'static {
        futures::stream::unfold(self.sender.subscribe(), |mut receiver| async move {
            let seen = match receiver.recv().await {
                Ok(seen) => seen,
                Err(RecvError::Lagged(_)) => Seen::Missed,
                Err(RecvError::Closed) => return None,
            };
            Some((seen, receiver))
        })
    }
}

/// Whether a cache has had its first complete list; every clone sees the same.
#[derive(Clone, Debug)]
pub struct Synced {
    receiver: watch::Receiver<bool>,
}

impl Synced {
    pub fn channel() -> (watch::Sender<bool>, Self) {
        let (sender, receiver) = watch::channel(false);
        (sender, Self { receiver })
    }

    pub fn is_synced(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Waits until the first complete list has arrived. Every waiter is woken (unlike a
    /// reflector store's own wait, which wakes only the last of several).
    pub async fn wait(&self) {
        let mut receiver = self.receiver.clone();
        if receiver.wait_for(|synced| *synced).await.is_err() && !self.is_synced() {
            // The writer is gone without ever syncing: it never will.
            std::future::pending::<()>().await;
        }
    }
}

/// A reflector cache of whole objects, its changes and whether it has synced.
pub struct Cache<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    changes: Changes,
    synced: Synced,
}

impl<K> Clone for Cache<K>
where
    K: Resource + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            changes: self.changes.clone(),
            synced: self.synced.clone(),
        }
    }
}

impl<K> Cache<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    pub fn store(&self) -> &Store<K> {
        &self.store
    }

    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    pub fn synced(&self) -> &Synced {
        &self.synced
    }

    /// Every object in the cache.
    pub fn state(&self) -> Vec<Arc<K>> {
        self.store.state()
    }
}

/// What fills a [`Cache`]: watch events, applied in order. The watch does it in
/// [`cache`]; tests feed events by hand.
pub struct Feed<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer: reflector::store::Writer<K>,
    changes: Changes,
    synced: watch::Sender<bool>,
}

impl<K> Feed<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// Applies one watch event: the store first, then whether it is synced, then the change
    /// is announced. In that order, a controller that subscribes and then finds the cache not
    /// synced is sure to hear of the list's end.
    pub fn apply(&mut self, event: &Event<K>) {
        self.writer.apply_watcher_event(event);
        if matches!(event, Event::InitDone) {
            self.synced.send_replace(true);
        }
        self.changes.announce(event);
    }
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// An empty cache and what fills it.
    pub fn new() -> (Self, Feed<K>) {
        let (store, writer) = reflector::store();
        let changes = Changes::default();
        let (synced_tx, synced) = Synced::channel();
        let cache = Cache {
            store,
            changes: changes.clone(),
            synced,
        };
        let feed = Feed {
            writer,
            changes,
            synced: synced_tx,
        };
        (cache, feed)
    }
}

/// The events of a watch on `api` (narrowed by `config`) for as long as it is polled: a
/// failure is logged, naming `what` is watched, and the watch goes on after a backoff.
pub fn watch_events<K>(
    api: Api<K>,
    config: watcher::Config,
    what: String,
) -> impl Stream<Item = Event<K>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config)
        .default_backoff()
        .filter_map(move |event| {
            let event = event
                .inspect_err(
                    |err| tracing::warn!(watch = %what, error = %err, "watch failed; retrying"),
                )
                .ok();
            std::future::ready(event)
        })
}

/// A cache of what `api` lists (narrowed by `config`), and the future that fills it: poll it
/// (spawn it) for as long as the cache is wanted. [`Runtime::cache`] does that for operators.
pub fn cache<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (Cache<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
{
    let (cache, mut feed) = Cache::new();
    let mut events = watch_events(api, config, K::kind(&()).to_string()).boxed();
    let fill = async move {
        while let Some(event) = events.next().await {
            feed.apply(&event);
        }
    };
    (cache, fill)
}

impl Runtime {
    /// [`cache`], filled on this replica from now until shutdown; the replica counts as
    /// ready only once the cache has its first complete list.
    pub fn cache<K>(&self, what: &str, api: Api<K>, config: watcher::Config) -> Cache<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    {
        let (cache, fill) = cache(api, config);
        self.keep_filled(what, fill, cache.synced().clone());
        cache
    }

    /// Runs a cache's `fill` until shutdown, with a readiness check that passes once `synced`.
    pub(crate) fn keep_filled(
        &self,
        what: &str,
        fill: impl Future<Output = ()> + Send + 'static,
        synced: Synced,
    ) {
        let check = self.readiness().check(format!("cache {what}"));
        let shutdown = self.shutdown_token().clone();
        let what = what.to_string();
        tokio::spawn(async move {
            let announce = async {
                synced.wait().await;
                check.set(true);
                tracing::info!(cache = %what, "cache synced");
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = fill => {}
                () = announce => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use kube::ResourceExt;

    fn pod(name: &str, owner: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                owner_references: owner.map(|o| {
                    vec![
                        OwnerReference {
                            api_version: "v1".into(),
                            kind: "ConfigMap".into(),
                            name: "not-the-controller".into(),
                            ..OwnerReference::default()
                        },
                        OwnerReference {
                            api_version: "apps.gantry.dev/v1alpha1".into(),
                            kind: "GrayApp".into(),
                            name: o.into(),
                            controller: Some(true),
                            ..OwnerReference::default()
                        },
                    ]
                }),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn a_change_names_the_object_and_its_controller() {
        let change = Change::of(&pod("ocr-1", Some("ocr")), false);
        assert_eq!(change.name, "ocr-1");
        assert_eq!(change.namespace.as_deref(), Some("ns"));
        assert_eq!(
            change.controller,
            Some(Controlled {
                api_version: "apps.gantry.dev/v1alpha1".into(),
                kind: "GrayApp".into(),
                name: "ocr".into(),
            })
        );
        assert_eq!(Change::of(&pod("lone", None), true).controller, None);
    }

    /// A relist's objects take the store's place only at its end: a subscriber told of them
    /// one by one would look them up too early, and would never hear of those that vanished
    /// during the watch gap. It hears once, at the end, that anything may have changed.
    #[tokio::test]
    async fn a_relist_is_announced_once_at_its_end_when_the_store_holds_it() {
        let (cache, mut feed) = Cache::<Pod>::new();
        for event in [
            Event::Init,
            Event::InitApply(pod("stays", None)),
            Event::InitApply(pod("vanishes", None)),
            Event::InitDone,
        ] {
            feed.apply(&event);
        }
        let mut seen = Box::pin(cache.changes().subscribe());
        feed.apply(&Event::Init);
        feed.apply(&Event::InitApply(pod("stays", None)));
        feed.apply(&Event::InitApply(pod("new", None)));
        let names = |cache: &Cache<Pod>| {
            let mut names: Vec<String> = cache.state().iter().map(|p| p.name_any()).collect();
            names.sort();
            names
        };
        assert_eq!(
            names(&cache),
            ["stays", "vanishes"],
            "the old list until the end"
        );
        feed.apply(&Event::InitDone);
        assert_eq!(names(&cache), ["new", "stays"]);
        feed.apply(&Event::Delete(pod("stays", None)));
        assert_eq!(seen.next().await, Some(Seen::Missed), "the relist, once");
        match seen.next().await {
            Some(Seen::Changed(change)) => assert!(change.name == "stays" && change.deleted),
            other => panic!("expected the deletion after the relist, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn subscribers_see_changes_from_when_they_subscribed() {
        let changes = Changes::default();
        changes.send(Change::of(&pod("before", None), false));
        let mut sub = Box::pin(changes.subscribe());
        changes.send(Change::of(&pod("after", None), false));
        match sub.next().await {
            Some(Seen::Changed(change)) => assert_eq!(change.name, "after"),
            other => panic!("expected the change after subscribing, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_it_missed_changes() {
        let changes = Changes::default();
        let mut sub = Box::pin(changes.subscribe());
        for i in 0..=CHANGES_BUFFER {
            changes.send(Change::of(&pod(&format!("p{i}"), None), false));
        }
        assert_eq!(sub.next().await, Some(Seen::Missed));
        assert!(matches!(sub.next().await, Some(Seen::Changed(_))));
    }

    #[tokio::test]
    async fn every_waiter_is_told_of_the_sync() {
        let (sender, synced) = Synced::channel();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let synced = synced.clone();
                tokio::spawn(async move { synced.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        sender.send_replace(true);
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("woken")
                .expect("joined");
        }
        assert!(synced.is_synced());
    }
}
