//! Writes through server-side apply, under a named field manager.
//!
//! Operators own only the fields they apply; fields a person or a GitOps tool set stay theirs,
//! so Argo CD and Flux see no drift caused by the operator.

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Patch parameters for server-side apply as `manager`. `force` takes over fields another
/// manager set; operators use it only on objects they own (their pods, their status).
pub fn apply_params(manager: &str, force: bool) -> PatchParams {
    let params = PatchParams::apply(manager);
    if force { params.force() } else { params }
}

/// Applies `status` to the status subresource of `name`. The body carries the kind's
/// apiVersion and kind, as server-side apply requires.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    status: &S,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &apply_params(manager, true), &Patch::Apply(body))
        .await
}
