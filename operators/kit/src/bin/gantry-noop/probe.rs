//! The probe operator's own resource, `Probe` (`kit.gantry.dev/v1alpha1`): reconciled to
//! `Ready` with its message echoed, so that the kit's controllers, status writes and handling
//! of undecodable objects can be seen working on a real API server.

use std::sync::Arc;

use gantry_kit::Runtime;
use gantry_kit::apply::apply_status;
use gantry_kit::conditions::{self, Summary};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, CustomResource, Resource, ResourceExt};
use serde::{Deserialize, Serialize};

/// Something for the probe operator to reconcile.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[kube(
    group = "kit.gantry.dev",
    version = "v1alpha1",
    kind = "Probe",
    namespaced,
    status = "ProbeStatus",
    shortname = "gprobe",
    category = "gantry",
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".spec.message"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSpec {
    /// Echoed into the Ready condition's message once the probe is reconciled.
    pub message: String,
}

/// What the probe operator saw.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Reconciling and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The Probe CRD as published.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    <Probe as kube::CustomResourceExt>::crd()
}

gantry_kit::reasons! {
    /// What the probe operator records.
    pub enum ProbeReason {
        /// A probe was reconciled to Ready for its current generation.
        ProbeReady => Normal, "Reconcile";
    }
}

/// Sets Ready (with the message) for the probe's generation, once.
pub async fn reconcile(probe: Arc<Probe>, runtime: Arc<Runtime>) -> Result<Action, kube::Error> {
    // A namespaced kind: the API always gives one.
    let namespace = probe.namespace().unwrap_or_default();
    let previous = probe.status.clone().unwrap_or_default();
    let mut status = previous.clone();
    let now = Time(Timestamp::now());
    conditions::set_summary(
        &mut status.conditions,
        &Summary::Ready {
            reason: "Observed".into(),
            message: probe.spec.message.clone(),
        },
        probe.metadata.generation,
        &now,
    );
    status.observed_generation = probe.metadata.generation;
    if status != previous {
        let api: Api<Probe> = Api::namespaced(runtime.client().clone(), &namespace);
        apply_status(&api, &probe.name_any(), runtime.field_manager(), &status).await?;
        runtime
            .events()
            .publish(
                &probe.object_ref(&()),
                ProbeReason::ProbeReady,
                format!("ready: {}", probe.spec.message),
            )
            .await;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_follows_the_conventions() {
        assert_eq!(gantry_kit::crd::lint(&crd()), Vec::<String>::new());
    }
}
