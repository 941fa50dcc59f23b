//! The objects and patches the operator writes: instance pods, their claims, revisions, and
//! the in-place and readiness-gate patches.
//!
//! Pods are patched with strategic merge patches keyed by container name, not server-side
//! apply: an apply naming only the image would make the operator the owner of a partial
//! container list and could drop fields on a later apply. Every pod patch carries the pod's UID,
//! so a patch meant for a pod that was replaced in the meantime is rejected.

use std::collections::BTreeMap;

use gantry_kit::selector::SelectorError;
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodReadinessGate, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::api::{
    ANNOTATION_IN_PLACE, GrayApp, LABEL_APP, LABEL_INSTANCE, LABEL_REVISION, READINESS_GATE,
};
use crate::model::{InPlaceRecord, Ordinal};
use crate::plan::MetadataChange;
use crate::revision::Revision;

pub use crate::model::pod_name;

pub fn claim_name(claim: &str, app: &str, ordinal: Ordinal) -> String {
    format!("{claim}-{app}-{ordinal}")
}

fn owner(app: &GrayApp) -> Option<OwnerReference> {
    app.controller_owner_ref(&())
}

/// The pod of one instance at a revision: the template, plus our labels, the readiness gate,
/// a stable hostname, and its claims mounted.
pub fn instance_pod(app: &GrayApp, ordinal: Ordinal, revision: &Revision) -> Pod {
    let name = pod_name(&app.name_any(), ordinal);
    let template = &revision.template;
    let mut labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(LABEL_APP.to_string(), app.name_any());
    labels.insert(LABEL_INSTANCE.to_string(), ordinal.to_string());
    labels.insert(LABEL_REVISION.to_string(), revision.name.clone());
    let mut spec = template.spec.clone().unwrap_or_default();
    let gates = spec.readiness_gates.get_or_insert_with(Vec::new);
    if !gates.iter().any(|g| g.condition_type == READINESS_GATE) {
        gates.push(PodReadinessGate {
            condition_type: READINESS_GATE.to_string(),
        });
    }
    spec.hostname.get_or_insert_with(|| name.clone());
    for claim in &app.spec.volume_claim_templates {
        let claim_template = claim.metadata.name.clone().unwrap_or_default();
        let volumes = spec.volumes.get_or_insert_with(Vec::new);
        volumes.retain(|v| v.name != claim_template);
        volumes.push(Volume {
            name: claim_template.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&claim_template, &app.name_any(), ordinal),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: app.namespace(),
            labels: Some(labels),
            annotations: template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.clone()),
            owner_references: owner(app).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The claims of one instance. They carry no owner: like a StatefulSet's, they outlive the
/// pod, scale-down and the app, so data is never lost by accident.
pub fn instance_claims(app: &GrayApp, ordinal: Ordinal) -> Vec<PersistentVolumeClaim> {
    app.spec
        .volume_claim_templates
        .iter()
        .map(|t| {
            let template_name = t.metadata.name.clone().unwrap_or_default();
            let mut labels = t.metadata.labels.clone().unwrap_or_default();
            labels.insert(LABEL_APP.to_string(), app.name_any());
            labels.insert(LABEL_INSTANCE.to_string(), ordinal.to_string());
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(claim_name(&template_name, &app.name_any(), ordinal)),
                    namespace: app.namespace(),
                    labels: Some(labels),
                    annotations: t.metadata.annotations.clone(),
                    ..ObjectMeta::default()
                },
                spec: t.spec.clone(),
                status: None,
            }
        })
        .collect()
}

/// A ControllerRevision holding a revision's template, so it can be named and returned to.
pub fn controller_revision(
    app: &GrayApp,
    revision: &Revision,
    number: i64,
) -> Result<ControllerRevision, serde_json::Error> {
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_APP.to_string(), app.name_any());
    Ok(ControllerRevision {
        metadata: ObjectMeta {
            name: Some(revision.name.clone()),
            namespace: app.namespace(),
            labels: Some(labels),
            owner_references: owner(app).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: Some(RawExtension(serde_json::to_value(&revision.template)?)),
        revision: number,
    })
}

/// The in-place update: new images, the template's labels and annotations, the revision
/// label and the update record, in one write.
pub fn in_place_patch(
    uid: &str,
    revision: &str,
    images: &BTreeMap<String, String>,
    metadata: &MetadataChange,
    record: &InPlaceRecord,
) -> Result<Value, serde_json::Error> {
    let containers: Vec<Value> = images
        .iter()
        .map(|(name, image)| json!({"name": name, "image": image}))
        .collect();
    let mut labels = serde_json::to_value(&metadata.labels)?;
    labels[LABEL_REVISION] = json!(revision);
    let mut annotations = serde_json::to_value(&metadata.annotations)?;
    annotations[ANNOTATION_IN_PLACE] = json!(serde_json::to_string(record)?);
    Ok(json!({
        "metadata": {"uid": uid, "labels": labels, "annotations": annotations},
        "spec": {"containers": containers},
    }))
}

/// Sets the readiness gate's condition (merged into status.conditions by type).
pub fn gate_patch(uid: &str, in_service: bool, reason: &str, message: &str, now: &str) -> Value {
    json!({
        "metadata": {"uid": uid},
        "status": {"conditions": [{
            "type": READINESS_GATE,
            "status": if in_service { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }]},
    })
}

/// Whether the template's labels satisfy the selector's matchLabels (admission cannot check
/// this across fields, so the operator reports it as an invalid spec).
pub fn selector_matches_template(app: &GrayApp) -> Result<bool, SelectorError> {
    let labels = app
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = gantry_kit::selector::parse(&app.spec.selector)?;
    Ok(gantry_kit::selector::matches(&selector, &labels))
}

/// The app's revision object reference, for events that concern a pod as well.
pub fn pod_reference(
    app: &GrayApp,
    ordinal: Ordinal,
    uid: &str,
) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod_name(&app.name_any(), ordinal)),
        namespace: app.namespace(),
        uid: Some(uid.to_string()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GrayAppSpec;

    fn app() -> GrayApp {
        let spec: GrayAppSpec = serde_json::from_value(json!({
            "replicas": 3,
            "selector": {"matchLabels": {"app": "ocr"}},
            "template": {"metadata": {"labels": {"app": "ocr"}}, "spec": {"containers": [{"name": "ocr", "image": "ocr:v7"}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]
        }))
        .expect("valid spec");
        let mut app = GrayApp::new("ocr", spec);
        app.metadata.namespace = Some("team".into());
        app.metadata.uid = Some("app-uid".into());
        app
    }

    #[test]
    fn instance_pod_carries_identity_gate_owner_and_claims() {
        let app = app();
        let revision = Revision::new("ocr", app.spec.template.clone()).expect("serialises");
        let pod = instance_pod(&app, 4, &revision);
        assert_eq!(pod.metadata.name.as_deref(), Some("ocr-4"));
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(LABEL_INSTANCE).map(String::as_str), Some("4"));
        assert_eq!(labels.get(LABEL_REVISION), Some(&revision.name));
        assert_eq!(labels.get("app").map(String::as_str), Some("ocr"));
        let spec = pod.spec.expect("spec");
        assert_eq!(
            spec.readiness_gates.expect("gates")[0].condition_type,
            READINESS_GATE
        );
        assert_eq!(spec.hostname.as_deref(), Some("ocr-4"));
        let volume = &spec.volumes.expect("volumes")[0];
        assert_eq!(
            volume
                .persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str()),
            Some("data-ocr-4")
        );
        let owner = &pod.metadata.owner_references.expect("owner")[0];
        assert_eq!(owner.kind, "GrayApp");
        assert_eq!(owner.controller, Some(true));
        let claims = instance_claims(&app, 4);
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data-ocr-4"));
        assert!(
            claims[0].metadata.owner_references.is_none(),
            "claims outlive the app"
        );
    }

    #[test]
    fn an_in_place_patch_sets_the_templates_labels_and_removes_those_it_dropped() {
        let metadata = MetadataChange {
            labels: [
                ("track".to_string(), Some("canary".to_string())),
                ("old".to_string(), None),
            ]
            .into(),
            annotations: [("team".to_string(), Some("ocr".to_string()))].into(),
        };
        let patch = in_place_patch(
            "u1",
            "ocr-r2",
            &BTreeMap::new(),
            &metadata,
            &InPlaceRecord::default(),
        )
        .expect("serialises");
        let labels = &patch["metadata"]["labels"];
        assert_eq!(labels["track"], "canary");
        assert!(
            labels["old"].is_null() && labels.get("old").is_some(),
            "null removes it"
        );
        assert_eq!(labels[LABEL_REVISION], "ocr-r2");
        assert_eq!(patch["metadata"]["annotations"]["team"], "ocr");
        assert!(patch["metadata"]["annotations"][ANNOTATION_IN_PLACE].is_string());
    }

    #[test]
    fn patches_guard_on_uid() {
        let patch = in_place_patch(
            "u1",
            "ocr-r2",
            &[("ocr".to_string(), "ocr:v8".to_string())].into(),
            &MetadataChange::default(),
            &InPlaceRecord::default(),
        )
        .expect("serialises");
        assert_eq!(patch["metadata"]["uid"], "u1");
        assert_eq!(patch["spec"]["containers"][0]["image"], "ocr:v8");
        assert_eq!(patch["metadata"]["labels"][LABEL_REVISION], "ocr-r2");
        let gate = gate_patch("u1", false, "UpdateStarted", "m", "2026-11-22T10:00:00Z");
        assert_eq!(gate["status"]["conditions"][0]["status"], "False");
    }

    #[test]
    fn selector_must_match_template() {
        let mut app = app();
        assert_eq!(selector_matches_template(&app), Ok(true));
        app.spec.selector.match_labels = Some([("app".to_string(), "other".to_string())].into());
        assert_eq!(selector_matches_template(&app), Ok(false));
    }

    #[test]
    fn selector_expressions_count_against_the_template() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let mut app = app();
        let requirement = |operator: &str, values: Option<Vec<String>>| LabelSelectorRequirement {
            key: "tier".into(),
            operator: operator.into(),
            values,
        };
        app.spec.selector.match_expressions = Some(vec![requirement("Exists", None)]);
        assert_eq!(
            selector_matches_template(&app),
            Ok(false),
            "the template has no tier"
        );
        app.spec.selector.match_expressions = Some(vec![requirement("DoesNotExist", None)]);
        assert_eq!(selector_matches_template(&app), Ok(true));
        app.spec.selector.match_expressions = Some(vec![requirement("In", None)]);
        assert!(selector_matches_template(&app).is_err(), "In needs values");
    }
}
