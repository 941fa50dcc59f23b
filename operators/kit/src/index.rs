//! A watch cache of the objects an operator's resources own, holding only what the operator
//! reads of each and filed under the owner.
//!
//! kube-runtime's reflector stores whole objects in one flat map. An operator that owns
//! thousands of pods reads a handful of fields of each, and each reconcile wants the objects of
//! one owner only. [`OwnedIndex`] stores the operator's own projection of every object under the
//! UID of its controlling owner: memory grows with what is read, and a reconcile finds its
//! objects without scanning everyone else's.
//!
//! Decode the watch into a lean type as well (see [`lean_meta`]) so that whole objects are never
//! built, not even for a moment.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::{Stream, TryStreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use tokio::sync::watch as signal;

use crate::runtime::Runtime;

/// The owned objects' projections, by controlling owner's UID and object name. Cheap to clone;
/// every clone sees the same cache.
pub struct OwnedIndex<V> {
    shared: Arc<Shared<V>>,
}

impl<V> Clone for OwnedIndex<V> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<V> {
    state: RwLock<State<V>>,
    synced: signal::Sender<bool>,
}

struct State<V> {
    live: Entries<V>,
    /// A list in progress (after a start or a lost watch), swapped in once complete so that
    /// objects deleted meanwhile disappear.
    relisting: Option<Entries<V>>,
}

struct Entries<V> {
    by_owner: HashMap<String, BTreeMap<String, Arc<V>>>,
    /// Where each object is filed: (namespace, name) → owner UID.
    owner_of: HashMap<(String, String), String>,
}

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self {
            by_owner: HashMap::new(),
            owner_of: HashMap::new(),
        }
    }
}

impl<V> Entries<V> {
    fn upsert(&mut self, key: (String, String), owner: Option<String>, value: Option<V>) {
        match (owner, value) {
            (Some(owner), Some(value)) => {
                if self.owner_of.get(&key).is_some_and(|o| *o != owner) {
                    self.remove(&key);
                }
                self.by_owner
                    .entry(owner.clone())
                    .or_default()
                    .insert(key.1.clone(), Arc::new(value));
                self.owner_of.insert(key, owner);
            }
            _ => self.remove(&key),
        }
    }

    fn remove(&mut self, key: &(String, String)) {
        let Some(owner) = self.owner_of.remove(key) else {
            return;
        };
        if let Some(objects) = self.by_owner.get_mut(&owner) {
            objects.remove(&key.1);
            if objects.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
    }

    fn len(&self) -> usize {
        self.owner_of.len()
    }
}

impl<V> Default for OwnedIndex<V> {
    fn default() -> Self {
        let (synced, _) = signal::channel(false);
        Self {
            shared: Arc::new(Shared {
                state: RwLock::new(State {
                    live: Entries::default(),
                    relisting: None,
                }),
                synced,
            }),
        }
    }
}

/// The UID of the object's controlling owner, if it has one.
pub fn controller_uid<K: Resource>(object: &K) -> Option<&str> {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

fn key_of<K: Resource>(object: &K) -> (String, String) {
    let meta = object.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl<V> OwnedIndex<V> {
    /// The projections of the objects `owner_uid` controls, in name order.
    pub fn owned_by(&self, owner_uid: &str) -> Vec<Arc<V>> {
        let state = self.read();
        state
            .live
            .by_owner
            .get(owner_uid)
            .map(|objects| objects.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many objects are filed.
    pub fn len(&self) -> usize {
        let state = self.read();
        state.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the first complete list has arrived.
    pub fn is_synced(&self) -> bool {
        *self.shared.synced.borrow()
    }

    /// Waits until the first complete list has arrived.
    pub async fn synced(&self) {
        let mut receiver = self.shared.synced.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = receiver.wait_for(|synced| *synced).await;
    }

    /// Files one watch event: `project` gives what to keep of an object, `None` to keep nothing.
    /// Objects without a controlling owner are not kept.
    pub fn apply<K: Resource>(&self, event: &Event<K>, project: impl Fn(&K) -> Option<V>) {
        // Objects are projected before the lock is taken, so that readers never wait on it.
        let filed = |object: &K| {
            let owner = controller_uid(object).map(str::to_owned);
            let value = owner.as_ref().and_then(|_| project(object));
            (key_of(object), owner, value)
        };
        match event {
            Event::Init => self.write().relisting = Some(Entries::default()),
            Event::InitApply(object) => {
                let (key, owner, value) = filed(object);
                let mut state = self.write();
                let state = &mut *state;
                state
                    .relisting
                    .as_mut()
                    .unwrap_or(&mut state.live)
                    .upsert(key, owner, value);
            }
            Event::InitDone => {
                {
                    let mut state = self.write();
                    if let Some(complete) = state.relisting.take() {
                        state.live = complete;
                    }
                }
                self.shared.synced.send_replace(true);
            }
            Event::Apply(object) => {
                let (key, owner, value) = filed(object);
                self.write().live.upsert(key, owner, value);
            }
            Event::Delete(object) => self.write().live.remove(&key_of(object)),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State<V>> {
        self.shared
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State<V>> {
        self.shared
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Watches the objects `api` lists (narrowed by `config`) into an [`OwnedIndex`] of what
/// `project` keeps of each. Returns the index and the stream of changed objects, which must be
/// polled for the index to fill (hand it to `Controller::owns_stream` so that owners are
/// reconciled when their objects change; an object is filed before it is passed on).
pub fn watch<K, V>(
    api: Api<K>,
    config: watcher::Config,
    project: impl Fn(&K) -> Option<V> + Send + 'static,
) -> (
    OwnedIndex<V>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    V: Send + Sync + 'static,
{
    let index = OwnedIndex::default();
    let filing = index.clone();
    let changes = watcher::watcher(api, config)
        .default_backoff()
        .inspect_ok(move |event| filing.apply(event, &project))
        .touched_objects();
    (index, changes)
}

impl Runtime {
    /// [`watch`], with the leader counted as ready only once the index has its first complete
    /// list.
    pub fn owned_index<K, V>(
        &self,
        api: Api<K>,
        config: watcher::Config,
        project: impl Fn(&K) -> Option<V> + Send + 'static,
    ) -> (
        OwnedIndex<V>,
        impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    )
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        V: Send + Sync + 'static,
    {
        let (index, changes) = watch(api, config, project);
        let cache = self.readiness().track_cache();
        let waiting = index.clone();
        tokio::spawn(async move {
            waiting.synced().await;
            tracing::info!(objects = waiting.len(), "owned-object index synced");
            cache.synced();
        });
        (index, changes)
    }
}

/// Deserializes `metadata` keeping only what operators read: identity, labels, annotations,
/// owners and timestamps. `managedFields`, the bulk of most objects' metadata, is skipped while
/// parsing and never allocated. Use as `#[serde(deserialize_with = "lean_meta")]`.
pub fn lean_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Lean {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        generation: Option<i64>,
        labels: Option<BTreeMap<String, String>>,
        annotations: Option<BTreeMap<String, String>>,
        owner_references: Option<Vec<OwnerReference>>,
        creation_timestamp: Option<Time>,
        deletion_timestamp: Option<Time>,
    }
    let lean = Lean::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: lean.name,
        namespace: lean.namespace,
        uid: lean.uid,
        resource_version: lean.resource_version,
        generation: lean.generation,
        labels: lean.labels,
        annotations: lean.annotations,
        owner_references: lean.owner_references,
        creation_timestamp: lean.creation_timestamp,
        deletion_timestamp: lean.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn object(name: &str, owner: Option<&str>, value: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                owner_references: owner.map(|uid| {
                    vec![OwnerReference {
                        uid: uid.into(),
                        controller: Some(true),
                        ..OwnerReference::default()
                    }]
                }),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([("v".into(), value.into())])),
            ..ConfigMap::default()
        }
    }

    fn value(cm: &ConfigMap) -> Option<String> {
        cm.data.as_ref()?.get("v").cloned()
    }

    fn values(index: &OwnedIndex<String>, owner: &str) -> Vec<String> {
        index
            .owned_by(owner)
            .iter()
            .map(|v| v.as_str().to_owned())
            .collect()
    }

    #[test]
    fn files_objects_under_their_controlling_owner_in_name_order() {
        let index = OwnedIndex::default();
        index.apply(&Event::Apply(object("b", Some("u1"), "b1")), value);
        index.apply(&Event::Apply(object("a", Some("u1"), "a1")), value);
        index.apply(&Event::Apply(object("c", Some("u2"), "c2")), value);
        index.apply(&Event::Apply(object("orphan", None, "x")), value);
        assert_eq!(values(&index, "u1"), ["a1", "b1"]);
        assert_eq!(values(&index, "u2"), ["c2"]);
        assert_eq!(
            index.len(),
            3,
            "objects without a controlling owner are not kept"
        );
    }

    #[test]
    fn updates_replace_deletes_remove_and_owner_changes_move() {
        let index = OwnedIndex::default();
        index.apply(&Event::Apply(object("a", Some("u1"), "old")), value);
        index.apply(&Event::Apply(object("a", Some("u1"), "new")), value);
        assert_eq!(values(&index, "u1"), ["new"]);
        index.apply(&Event::Apply(object("a", Some("u2"), "moved")), value);
        assert!(values(&index, "u1").is_empty());
        assert_eq!(values(&index, "u2"), ["moved"]);
        index.apply(&Event::Apply(object("a", None, "released")), value);
        assert!(index.is_empty(), "released by its owner");
        index.apply(&Event::Apply(object("a", Some("u1"), "back")), value);
        index.apply(&Event::Delete(object("a", Some("u1"), "back")), value);
        assert!(index.is_empty());
    }

    #[test]
    fn a_projection_of_none_keeps_nothing() {
        let index = OwnedIndex::default();
        index.apply(&Event::Apply(object("a", Some("u1"), "v")), value);
        index.apply(
            &Event::Apply(object("a", Some("u1"), "v")),
            |_: &ConfigMap| None,
        );
        assert!(index.is_empty());
    }

    #[test]
    fn a_relist_replaces_everything_once_complete() {
        let index = OwnedIndex::default();
        assert!(!index.is_synced());
        index.apply(&Event::Init, value);
        index.apply(&Event::InitApply(object("a", Some("u1"), "a")), value);
        assert!(index.is_empty(), "a list in progress is not visible");
        index.apply(&Event::InitDone, value);
        assert!(index.is_synced());
        assert_eq!(values(&index, "u1"), ["a"]);

        // The watch is lost; meanwhile `a` is deleted and `b` created.
        index.apply(&Event::Init, value);
        index.apply(&Event::InitApply(object("b", Some("u1"), "b")), value);
        assert_eq!(
            values(&index, "u1"),
            ["a"],
            "the old view serves until the list completes"
        );
        index.apply(&Event::InitDone, value);
        assert_eq!(values(&index, "u1"), ["b"]);
    }

    #[tokio::test]
    async fn synced_wakes_every_waiter() {
        let index: OwnedIndex<String> = OwnedIndex::default();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let index = index.clone();
                tokio::spawn(async move { index.synced().await })
            })
            .collect();
        tokio::task::yield_now().await;
        index.apply(&Event::<ConfigMap>::Init, value);
        index.apply(&Event::<ConfigMap>::InitDone, value);
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("woken")
                .expect("joined");
        }
    }

    #[test]
    fn lean_meta_skips_managed_fields() {
        #[derive(Deserialize)]
        struct Lean {
            #[serde(deserialize_with = "lean_meta")]
            metadata: ObjectMeta,
        }
        let lean: Lean = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "a", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                "labels": {"k": "v"}, "annotations": {"a": "b"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": "ou", "controller": true}],
                "creationTimestamp": "2026-11-22T10:00:00Z",
                "managedFields": [{"manager": "m", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
            }
        }))
        .expect("decodes");
        let meta = lean.metadata;
        assert_eq!(meta.name.as_deref(), Some("a"));
        assert_eq!(meta.resource_version.as_deref(), Some("7"));
        assert_eq!(meta.labels.as_ref().map(BTreeMap::len), Some(1));
        assert_eq!(meta.owner_references.as_ref().map(Vec::len), Some(1));
        assert!(meta.creation_timestamp.is_some());
        assert!(meta.managed_fields.is_none());
    }
}
