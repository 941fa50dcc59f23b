//! Decoding a watch's objects one by one, so that one object that does not fit the operator's
//! types (stored under an older schema, say) is set aside instead of failing the whole list.
//!
//! Each object is captured as raw JSON and decoded from it: directly when it fits, and only
//! when it does not, again for its metadata alone. Unlike kube's `DeserializeGuard`, which
//! builds a generic value tree of every object first, an object that fits costs one copy of its
//! JSON more than decoding it straight away.

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// An object as the watch delivered it: decoded (shared, so that handing it to a reconcile
/// copies nothing), or set aside with why and its metadata.
#[derive(Clone, Debug)]
pub struct Decoded<K>(pub Result<Arc<K>, Undecodable>);

/// An object that does not fit the operator's types.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{error}")]
pub struct Undecodable {
    /// What did not fit, as serde says it.
    pub error: String,
    pub metadata: ObjectMeta,
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Decoded<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        match serde_json::from_str::<K>(raw.get()) {
            Ok(object) => Ok(Self(Ok(Arc::new(object)))),
            Err(err) => {
                #[derive(Deserialize)]
                struct Metadata {
                    #[serde(default)]
                    metadata: ObjectMeta,
                }
                let Metadata { metadata } =
                    serde_json::from_str(raw.get()).map_err(D::Error::custom)?;
                Ok(Self(Err(Undecodable {
                    error: err.to_string(),
                    metadata,
                })))
            }
        }
    }
}

impl<K: Resource + Clone> Resource for Decoded<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        match &self.0 {
            Ok(object) => object.meta(),
            Err(undecodable) => &undecodable.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match &mut self.0 {
            Ok(object) => Arc::make_mut(object).meta_mut(),
            Err(undecodable) => &mut undecodable.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::core::ObjectList;

    #[test]
    fn a_list_with_one_misfit_keeps_the_others() {
        let list: ObjectList<Decoded<ConfigMap>> = serde_json::from_str(
            r#"{"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {}, "items": [
                {"metadata": {"name": "good", "namespace": "ns"}, "data": {"k": "v"}},
                {"metadata": {"name": "bad", "namespace": "ns", "uid": "u"}, "data": {"k": 42}}
            ]}"#,
        )
        .expect("the list decodes");
        let [good, bad] = &list.items[..] else {
            panic!("two items");
        };
        assert!(
            good.0
                .as_ref()
                .is_ok_and(|cm| cm.data.as_ref().is_some_and(|d| d["k"] == "v"))
        );
        let Err(undecodable) = &bad.0 else {
            panic!("the misfit is set aside");
        };
        assert_eq!(bad.meta().name.as_deref(), Some("bad"));
        assert_eq!(undecodable.metadata.uid.as_deref(), Some("u"));
        assert!(
            undecodable.error.contains("invalid type"),
            "{}",
            undecodable.error
        );
    }

    #[test]
    fn an_object_without_usable_metadata_fails_the_decode() {
        let broken = serde_json::from_str::<Decoded<ConfigMap>>(r#"{"metadata": 7}"#);
        assert!(broken.is_err());
    }
}
