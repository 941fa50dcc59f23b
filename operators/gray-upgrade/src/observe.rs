//! Reading pods into the planner's view.
//!
//! The operator caches every instance's pod, so pods are decoded straight from the API server's
//! JSON into [`LeanPod`], which holds only the fields the planner reads: whole Pods (tens of
//! kilobytes each, most of it spec and managed fields) are never built.

use std::sync::Arc;

use gantry_kit::index::{Projection, lean_meta};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;

use crate::api::{ANNOTATION_IN_PLACE, LABEL_INSTANCE, LABEL_REVISION, READINESS_GATE};
use crate::model::{ContainerView, InPlaceRecord, Instances, Ordinal, PodView};

/// A Pod as the operator reads it: what [`pod_view`] needs and nothing else. Listed and
/// watched like a Pod (`Api<LeanPod>`); never written.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LeanPod {
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: LeanSpec,
    #[serde(default)]
    status: LeanStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanSpec {
    node_name: Option<String>,
    #[serde(default)]
    containers: Vec<LeanContainer>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct LeanContainer {
    name: String,
    image: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default)]
    conditions: Vec<LeanCondition>,
    #[serde(default)]
    container_statuses: Vec<LeanContainerStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanCondition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
    last_transition_time: Option<Time>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanContainerStatus {
    name: String,
    #[serde(default)]
    image: String,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
    #[serde(default)]
    restart_count: i32,
    #[serde(default)]
    ready: bool,
    state: Option<LeanState>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct LeanState {
    running: Option<LeanRunning>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanRunning {
    started_at: Option<Time>,
}

impl k8s_openapi::Resource for LeanPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = NamespaceResourceScope;
}

impl k8s_openapi::Metadata for LeanPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.labels.as_ref()?.get(key)
}

/// A rollout waiting for a pod acts on the change at once, not after the controller's pacing.
impl Projection for PodView {
    fn urgent(old: Option<&Self>, new: Option<&Self>) -> bool {
        PodView::awaited(old, new)
    }
}

/// What the planner needs to know about a pod; `None` for a pod without an ordinal label.
pub fn pod_view(pod: &LeanPod) -> Option<PodView> {
    let meta = &pod.metadata;
    let ordinal: Ordinal = label(meta, LABEL_INSTANCE)?.parse().ok()?;
    let status = &pod.status;
    let condition = |type_: &str| status.conditions.iter().find(|c| c.type_ == type_);
    let gate = condition(READINESS_GATE);
    let (record, record_unreadable) = match read_record(meta) {
        Ok(record) => (record, None),
        Err(why) => (None, Some(why)),
    };
    let containers = pod
        .spec
        .containers
        .iter()
        .map(|c| {
            let st = status.container_statuses.iter().find(|s| s.name == c.name);
            ContainerView {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                running_image: st.map(|s| s.image.clone()).filter(|i| !i.is_empty()),
                container_id: st.and_then(|s| s.container_id.clone()),
                restart_count: st.map_or(0, |s| s.restart_count),
                started_at: st
                    .and_then(|s| s.state.as_ref())
                    .and_then(|s| s.running.as_ref())
                    .and_then(|r| r.started_at.as_ref())
                    .map(|t| t.0.as_second()),
                ready: st.is_some_and(|s| s.ready),
            }
        })
        .collect();
    Some(PodView {
        ordinal,
        uid: meta.uid.clone().unwrap_or_default(),
        node: pod.spec.node_name.clone(),
        ip: status.pod_ip.clone(),
        labels: meta.labels.clone().unwrap_or_default(),
        revision: label(meta, LABEL_REVISION).cloned(),
        created_at: meta
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
        deleting: meta.deletion_timestamp.is_some(),
        terminal: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
        ready: condition("Ready").is_some_and(|c| c.status == "True"),
        in_service: gate.map(|c| c.status == "True"),
        in_service_since: gate
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.as_second()),
        containers,
        record,
        record_unreadable,
    })
}

/// The in-place record on a pod: none, or why the annotation is there but cannot be read.
fn read_record(meta: &ObjectMeta) -> Result<Option<InPlaceRecord>, String> {
    let Some(json) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_IN_PLACE))
    else {
        return Ok(None);
    };
    serde_json::from_str(json)
        .map(Some)
        .map_err(|err| format!("annotation {ANNOTATION_IN_PLACE}: {err}"))
}

/// The app's instances by ordinal, from its pods.
pub fn instances<'a>(pods: impl IntoIterator<Item = &'a LeanPod>) -> Instances {
    pods.into_iter()
        .filter_map(pod_view)
        .map(|v| (v.ordinal, Arc::new(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_everything_the_planner_needs() {
        let pod: LeanPod = serde_json::from_value(json!({
            "metadata": {
                "name": "ocr-3", "uid": "u3", "creationTimestamp": "2026-11-22T10:00:00Z",
                "labels": {"apps.gantry.dev/instance": "3", "apps.gantry.dev/revision": "ocr-abc"},
                "annotations": {"apps.gantry.dev/in-place-update": "{\"revision\":\"ocr-abc\",\"previousRevision\":\"ocr-old\",\"patchedAt\":100,\"containers\":{\"ocr\":{\"containerId\":\"c1\",\"restartCount\":0}}}"}
            },
            "spec": {"nodeName": "node-1", "containers": [{"name": "ocr", "image": "ocr:v8"}]},
            "status": {
                "phase": "Running",
                "conditions": [
                    {"type": "Ready", "status": "False"},
                    {"type": "apps.gantry.dev/in-service", "status": "False", "lastTransitionTime": "2026-11-22T10:05:00Z"}
                ],
                "containerStatuses": [{
                    "name": "ocr", "image": "docker.io/library/ocr:v7", "imageID": "x", "containerID": "c1",
                    "restartCount": 0, "ready": true, "state": {"running": {"startedAt": "2026-11-22T10:00:05Z"}}
                }]
            }
        }))
        .expect("valid pod");
        let view = pod_view(&pod).expect("ours");
        assert_eq!(view.ordinal, 3);
        assert_eq!(view.revision.as_deref(), Some("ocr-abc"));
        assert_eq!(view.node.as_deref(), Some("node-1"));
        assert_eq!(view.in_service, Some(false));
        assert!(view.in_service_since.is_some());
        assert!(!view.ready);
        assert!(!view.deleting);
        assert_eq!(
            view.containers[0].running_image.as_deref(),
            Some("docker.io/library/ocr:v7")
        );
        assert_eq!(
            view.record.as_ref().map(|r| r.previous_revision.as_str()),
            Some("ocr-old")
        );
        assert!(!view.in_place_done(), "the container has not restarted yet");
    }

    #[test]
    fn an_unreadable_record_is_reported_not_read_as_done() {
        let pod: LeanPod = serde_json::from_value(json!({
            "metadata": {
                "name": "ocr-1", "uid": "u1",
                "labels": {"apps.gantry.dev/instance": "1", "apps.gantry.dev/revision": "ocr-abc"},
                "annotations": {"apps.gantry.dev/in-place-update": "{\"revision\": \"ocr-abc\""}
            },
            "spec": {"containers": [{"name": "ocr", "image": "ocr:v8"}]},
            "status": {"containerStatuses": [{"name": "ocr", "image": "docker.io/library/ocr:v7", "containerID": "c1", "ready": true}]}
        }))
        .expect("valid pod");
        let view = pod_view(&pod).expect("ours");
        assert!(view.record.is_none());
        let why = view.record_unreadable.as_deref().unwrap_or_default();
        assert!(why.contains(ANNOTATION_IN_PLACE), "{why}");
        assert!(
            !view.in_place_done(),
            "an unreadable record is never taken as done"
        );
    }

    #[test]
    fn pods_without_an_ordinal_are_not_ours() {
        assert!(pod_view(&LeanPod::default()).is_none());
    }
}
