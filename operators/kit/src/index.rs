//! A watch cache that holds only what the operator reads of each object, filed under a key
//! of the operator's choosing: the UID of the controlling owner for a controller's children,
//! the node name for a node agent or a scheduler extender.
//!
//! kube-runtime's reflector stores whole objects in one flat map. An operator that owns
//! thousands of pods reads a handful of fields of each, and each reconcile wants the objects of
//! one owner (or one node) only. [`Index`] stores the operator's own projection of every object
//! under its key: memory grows with what is read, and a reconcile finds its objects without
//! scanning everyone else's. It is filled from watch events ([`Index::apply`]), so its filing
//! can be tested by feeding it events.
//!
//! Decode the watch into a lean type as well (see [`lean_meta`]) so that whole objects are never
//! built, not even for a moment.
//!
//! Subscribers to [`Index::changes`] hear of a change only when what the index holds of an
//! object changed (its projection or where it is filed): an operator whose projection leaves
//! out what it does not read is not woken by changes to that. The projection's
//! [`Projection::urgent`] marks the changes that a controller's reconcile may be waiting for,
//! which end its pacing early (see [`crate::pacing`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::cache::{Change, Changes, Synced, watch_events};
use crate::runtime::Runtime;

/// What an index keeps of each object.
pub trait Projection: PartialEq + Send + Sync + 'static {
    /// Whether the object going from `old` to `new` (`None`: not filed) is something that the
    /// reconcile of its owner may be waiting for, to be acted on without waiting out the
    /// controller's pacing. Only changes are asked about: `old` and `new` differ.
    fn urgent(old: Option<&Self>, new: Option<&Self>) -> bool {
        let _ = (old, new);
        false
    }
}

impl Projection for String {}

/// Objects' projections by key and object. Cheap to clone; every clone sees the same cache.
pub struct Index<V> {
    shared: Arc<Shared<V>>,
}

impl<V> Clone for Index<V> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<V> {
    state: RwLock<State<V>>,
    synced_tx: tokio::sync::watch::Sender<bool>,
    synced: Synced,
    changes: Changes,
}

struct State<V> {
    live: Entries<V>,
    /// A list in progress (after a start or a lost watch), swapped in once complete so that
    /// objects deleted meanwhile disappear.
    relisting: Option<Entries<V>>,
}

/// An object's (namespace, name).
type ObjectKey = (String, String);

struct Entries<V> {
    by_key: HashMap<String, BTreeMap<Arc<ObjectKey>, Arc<V>>>,
    /// Where each object is filed. The object's key is shared with `by_key`: a node agent's or
    /// a controller's index holds thousands.
    key_of: HashMap<Arc<ObjectKey>, String>,
}

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            key_of: HashMap::new(),
        }
    }
}

impl<V> Entries<V> {
    fn upsert(&mut self, object: ObjectKey, held: Option<(String, V)>) {
        match held {
            Some((key, value)) => {
                if self.key_of.get(&object).is_some_and(|k| *k != key) {
                    self.remove(&object);
                }
                let object = match self.key_of.get_key_value(&object) {
                    Some((shared, _)) => Arc::clone(shared),
                    None => Arc::new(object),
                };
                self.by_key
                    .entry(key.clone())
                    .or_default()
                    .insert(Arc::clone(&object), Arc::new(value));
                self.key_of.insert(object, key);
            }
            None => self.remove(&object),
        }
    }

    /// Where `object` is filed, and what is kept of it.
    fn held(&self, object: &ObjectKey) -> Option<(&str, &Arc<V>)> {
        let key = self.key_of.get(object)?;
        let value = self.by_key.get(key)?.get(object)?;
        Some((key.as_str(), value))
    }

    fn remove(&mut self, object: &ObjectKey) {
        let Some(key) = self.key_of.remove(object) else {
            return;
        };
        if let Some(objects) = self.by_key.get_mut(&key) {
            objects.remove(object);
            if objects.is_empty() {
                self.by_key.remove(&key);
            }
        }
    }

    fn len(&self) -> usize {
        self.key_of.len()
    }
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        let (synced_tx, synced) = Synced::channel();
        Self {
            shared: Arc::new(Shared {
                state: RwLock::new(State {
                    live: Entries::default(),
                    relisting: None,
                }),
                synced_tx,
                synced,
                changes: Changes::default(),
            }),
        }
    }
}

/// The UID of the object's controlling owner, if it has one.
pub fn controller_uid<K: Resource>(object: &K) -> Option<&str> {
    controller_of(object).map(|o| o.uid.as_str())
}

/// The `ownerReferences` entry with `controller: true`, if any.
pub fn controller_of<K: Resource>(object: &K) -> Option<&OwnerReference> {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// The key that files an object under its controlling owner's UID.
pub fn by_controller<K: Resource>(object: &K) -> Option<String> {
    controller_uid(object).map(str::to_owned)
}

/// Whether going from `before` to `after` (where an object is filed, and what is kept of it)
/// is a change, and if so whether it is urgent.
fn noticed<V: Projection>(
    before: Option<(&str, &Arc<V>)>,
    after: Option<(&str, &V)>,
) -> Option<bool> {
    let before = before.map(|(key, value)| (key, value.as_ref()));
    (before != after).then(|| V::urgent(before.map(|(_, v)| v), after.map(|(_, v)| v)))
}

fn object_key<K: Resource>(object: &K) -> ObjectKey {
    let meta = object.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl<V> Index<V> {
    /// The projections filed under `key` (an owner's UID, a node's name), in namespace and
    /// name order.
    pub fn get(&self, key: &str) -> Vec<Arc<V>> {
        let state = self.read();
        state
            .live
            .by_key
            .get(key)
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
        self.shared.synced.is_synced()
    }

    /// Waits until the first complete list has arrived.
    pub async fn synced(&self) {
        self.shared.synced.wait().await;
    }

    /// The changes of the filed objects, for controllers that react to them.
    pub fn changes(&self) -> &Changes {
        &self.shared.changes
    }

    /// Files one watch event: `key` says where an object goes (`None`: nowhere), `project` what
    /// to keep of it (`None`: nothing). Subscribers to [`Index::changes`] hear of the object
    /// once it is filed, if what is held of it changed.
    pub fn apply<K: Resource>(
        &self,
        event: &Event<K>,
        key: impl Fn(&K) -> Option<String>,
        project: impl Fn(&K) -> Option<V>,
    ) where
        V: Projection,
    {
        // Objects are projected before the lock is taken, so that readers never wait on it.
        let filed = |object: &K| {
            let key = key(object);
            let value = key.as_ref().and_then(|_| project(object));
            (object_key(object), key.zip(value))
        };
        match event {
            Event::Init => self.write().relisting = Some(Entries::default()),
            Event::InitApply(object) => {
                let (object_key, held) = filed(object);
                let mut state = self.write();
                let state = &mut *state;
                state
                    .relisting
                    .as_mut()
                    .unwrap_or(&mut state.live)
                    .upsert(object_key, held);
            }
            Event::InitDone => {
                {
                    let mut state = self.write();
                    if let Some(complete) = state.relisting.take() {
                        state.live = complete;
                    }
                }
                self.shared.synced_tx.send_replace(true);
                self.shared.changes.relisted();
            }
            Event::Apply(object) => {
                let (object_key, held) = filed(object);
                self.refile(object, object_key, held, false);
            }
            Event::Delete(object) => self.refile(object, object_key(object), None, true),
        }
    }

    /// Files what is held of a watched object (`None`: nothing) in the live entries, and
    /// announces it if that changed.
    fn refile<K: Resource>(
        &self,
        object: &K,
        object_key: ObjectKey,
        held: Option<(String, V)>,
        deleted: bool,
    ) where
        V: Projection,
    {
        let urgent = {
            let mut state = self.write();
            let urgent = noticed(
                state.live.held(&object_key),
                held.as_ref().map(|(k, v)| (k.as_str(), v)),
            );
            state.live.upsert(object_key, held);
            urgent
        };
        if let Some(urgent) = urgent {
            self.shared.changes.send(Change {
                urgent,
                ..Change::of(object, deleted)
            });
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

/// An index of what `project` keeps of the objects `api` lists (narrowed by `config`), filed
/// by `key`, and the future that fills it: poll it (spawn it) for as long as the index is
/// wanted. [`Runtime::index`] does that for operators.
pub fn watch<K, V>(
    api: Api<K>,
    config: watcher::Config,
    key: impl Fn(&K) -> Option<String> + Send + 'static,
    project: impl Fn(&K) -> Option<V> + Send + 'static,
) -> (Index<V>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    V: Projection,
{
    let index = Index::default();
    let filing = index.clone();
    let mut events = watch_events(api, config, std::any::type_name::<K>().to_string()).boxed();
    let fill = async move {
        while let Some(event) = events.next().await {
            filing.apply(&event, &key, &project);
        }
    };
    (index, fill)
}

impl Runtime {
    /// [`watch`], filled on this replica from now until shutdown; the replica counts as ready
    /// only once the index has its first complete list.
    pub fn index<K, V>(
        &self,
        what: &str,
        api: Api<K>,
        config: watcher::Config,
        key: impl Fn(&K) -> Option<String> + Send + 'static,
        project: impl Fn(&K) -> Option<V> + Send + 'static,
    ) -> Index<V>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        V: Projection,
    {
        let (index, fill) = watch(api, config, key, project);
        self.keep_filled(what, fill, index.shared.synced.clone());
        index
    }

    /// [`Runtime::index`] of the objects that have a controlling owner, filed under the
    /// owner's UID: a controller's children.
    pub fn owned_index<K, V>(
        &self,
        what: &str,
        api: Api<K>,
        config: watcher::Config,
        project: impl Fn(&K) -> Option<V> + Send + 'static,
    ) -> Index<V>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        V: Projection,
    {
        self.index(what, api, config, by_controller, project)
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
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodSpec};

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

    /// Files a ConfigMap event by controlling owner, keeping its value.
    fn file(index: &Index<String>, event: &Event<ConfigMap>) {
        index.apply(event, by_controller, value);
    }

    fn values(index: &Index<String>, owner: &str) -> Vec<String> {
        index
            .get(owner)
            .iter()
            .map(|v| v.as_str().to_owned())
            .collect()
    }

    #[test]
    fn files_objects_under_their_controlling_owner_in_name_order() {
        let index = Index::default();
        file(&index, &Event::Apply(object("b", Some("u1"), "b1")));
        file(&index, &Event::Apply(object("a", Some("u1"), "a1")));
        file(&index, &Event::Apply(object("c", Some("u2"), "c2")));
        file(&index, &Event::Apply(object("orphan", None, "x")));
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
        let index = Index::default();
        file(&index, &Event::Apply(object("a", Some("u1"), "old")));
        file(&index, &Event::Apply(object("a", Some("u1"), "new")));
        assert_eq!(values(&index, "u1"), ["new"]);
        file(&index, &Event::Apply(object("a", Some("u2"), "moved")));
        assert!(values(&index, "u1").is_empty());
        assert_eq!(values(&index, "u2"), ["moved"]);
        file(&index, &Event::Apply(object("a", None, "released")));
        assert!(index.is_empty(), "released by its owner");
        file(&index, &Event::Apply(object("a", Some("u1"), "back")));
        file(&index, &Event::Delete(object("a", Some("u1"), "back")));
        assert!(index.is_empty());
    }

    #[test]
    fn a_projection_of_none_keeps_nothing() {
        let index = Index::default();
        file(&index, &Event::Apply(object("a", Some("u1"), "v")));
        index.apply(
            &Event::Apply(object("a", Some("u1"), "v")),
            by_controller,
            |_: &ConfigMap| None,
        );
        assert!(index.is_empty());
    }

    #[test]
    fn a_relist_replaces_everything_once_complete() {
        let index = Index::default();
        assert!(!index.is_synced());
        file(&index, &Event::Init);
        file(&index, &Event::InitApply(object("a", Some("u1"), "a")));
        assert!(index.is_empty(), "a list in progress is not visible");
        file(&index, &Event::InitDone);
        assert!(index.is_synced());
        assert_eq!(values(&index, "u1"), ["a"]);

        // The watch is lost; meanwhile `a` is deleted and `b` created.
        file(&index, &Event::Init);
        file(&index, &Event::InitApply(object("b", Some("u1"), "b")));
        assert_eq!(
            values(&index, "u1"),
            ["a"],
            "the old view serves until the list completes"
        );
        file(&index, &Event::InitDone);
        assert_eq!(values(&index, "u1"), ["b"]);
    }

    fn pod_on(name: &str, node: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_owned),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    /// Files a pod event by node, keeping the pod's name.
    fn place(index: &Index<String>, event: &Event<Pod>) {
        index.apply(event, node_of, name_of);
    }

    fn node_of(pod: &Pod) -> Option<String> {
        pod.spec.as_ref()?.node_name.clone()
    }

    fn name_of(pod: &Pod) -> Option<String> {
        pod.metadata.name.clone()
    }

    #[test]
    fn an_index_keyed_by_node_follows_pods_as_they_are_bound_and_deleted() {
        let index: Index<String> = Index::default();
        let names =
            |node: &str| -> Vec<String> { index.get(node).iter().map(|v| v.to_string()).collect() };
        place(&index, &Event::Apply(pod_on("pending", None)));
        assert!(index.is_empty(), "an unscheduled pod belongs to no node");
        place(&index, &Event::Apply(pod_on("pending", Some("n1"))));
        place(&index, &Event::Apply(pod_on("b", Some("n1"))));
        place(&index, &Event::Apply(pod_on("c", Some("n2"))));
        assert_eq!(names("n1"), ["b", "pending"]);
        assert_eq!(names("n2"), ["c"]);
        place(&index, &Event::Delete(pod_on("b", Some("n1"))));
        assert_eq!(names("n1"), ["pending"]);
        assert!(names("n3").is_empty());
    }

    #[tokio::test]
    async fn subscribers_hear_of_an_object_once_it_is_filed() {
        use crate::cache::Seen;
        use futures::StreamExt as _;
        let index: Index<String> = Index::default();
        let mut changes = Box::pin(index.changes().subscribe());
        place(&index, &Event::Apply(pod_on("p", Some("n1"))));
        let Some(Seen::Changed(change)) = changes.next().await else {
            panic!("expected a change");
        };
        assert_eq!(change.name, "p");
        assert_eq!(index.get("n1").len(), 1, "filed before it was announced");
    }

    #[tokio::test]
    async fn a_relist_is_announced_once_when_the_index_holds_it() {
        use crate::cache::Seen;
        use futures::StreamExt as _;
        let index: Index<String> = Index::default();
        let mut changes = Box::pin(index.changes().subscribe());
        place(&index, &Event::Init);
        place(&index, &Event::InitApply(pod_on("p", Some("n1"))));
        place(&index, &Event::InitDone);
        place(&index, &Event::Delete(pod_on("p", Some("n1"))));
        assert_eq!(changes.next().await, Some(Seen::Missed));
        let Some(Seen::Changed(change)) = changes.next().await else {
            panic!("expected the deletion next, not the listed object");
        };
        assert!(change.name == "p" && change.deleted);
    }

    /// A projection whose rises are urgent, as are deletions.
    #[derive(Debug, PartialEq)]
    struct Level(u32);

    impl Projection for Level {
        fn urgent(old: Option<&Self>, new: Option<&Self>) -> bool {
            match (old, new) {
                (Some(old), Some(new)) => new.0 > old.0,
                (Some(_), None) => true,
                (None, _) => false,
            }
        }
    }

    fn level(cm: &ConfigMap) -> Option<Level> {
        value(cm)?.parse().ok().map(Level)
    }

    /// Every change announced so far, as (name, deleted, urgent).
    fn announced(
        changes: &mut (impl futures::Stream<Item = crate::cache::Seen> + Unpin),
    ) -> Vec<(String, bool, bool)> {
        use futures::{FutureExt as _, StreamExt as _};
        let mut seen = Vec::new();
        while let Some(Some(crate::cache::Seen::Changed(change))) = changes.next().now_or_never() {
            seen.push((change.name, change.deleted, change.urgent));
        }
        seen
    }

    #[test]
    fn only_changes_to_what_is_held_are_announced_each_judged_by_the_projection() {
        let index: Index<Level> = Index::default();
        let mut changes = Box::pin(index.changes().subscribe());
        let apply = |event: &Event<ConfigMap>| index.apply(event, by_controller, level);
        apply(&Event::Apply(object("a", Some("u1"), "1")));
        apply(&Event::Apply(object("a", Some("u1"), "1")));
        apply(&Event::Apply(object("a", Some("u1"), "2")));
        apply(&Event::Apply(object("a", Some("u1"), "0")));
        apply(&Event::Apply(object("a", Some("u2"), "0")));
        apply(&Event::Apply(object("orphan", None, "5")));
        apply(&Event::Delete(object("orphan", None, "5")));
        apply(&Event::Delete(object("a", Some("u2"), "0")));
        assert_eq!(
            announced(&mut changes),
            [
                ("a".into(), false, false), // new
                ("a".into(), false, true),  // risen; the repeat before it was not announced
                ("a".into(), false, false), // fallen
                ("a".into(), false, false), // moved to another owner
                ("a".into(), true, true),   // deleted; nothing of the orphan was ever held
            ]
        );
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
