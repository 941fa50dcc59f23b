//! Reading pods into the planner's view.

use k8s_openapi::api::core::v1::Pod;

use crate::api::{ANNOTATION_IN_PLACE, LABEL_INSTANCE, LABEL_REVISION, READINESS_GATE};
use crate::model::{ContainerView, InPlaceRecord, Ordinal, PodView};

/// The instance ordinal a pod carries, if it is one of ours.
pub fn ordinal_of(pod: &Pod) -> Option<Ordinal> {
    pod.metadata
        .labels
        .as_ref()?
        .get(LABEL_INSTANCE)?
        .parse()
        .ok()
}

/// What the planner needs to know about a pod; `None` for a pod without an ordinal label.
pub fn pod_view(pod: &Pod) -> Option<PodView> {
    let ordinal = ordinal_of(pod)?;
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let conditions = status.and_then(|s| s.conditions.as_ref());
    let condition = |type_: &str| conditions.and_then(|c| c.iter().find(|c| c.type_ == type_));
    let gate = condition(READINESS_GATE);
    let statuses = status.and_then(|s| s.container_statuses.as_ref());
    let containers = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            let st = statuses.and_then(|all| all.iter().find(|s| s.name == c.name));
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
    let phase = status.and_then(|s| s.phase.as_deref());
    Some(PodView {
        ordinal,
        uid: meta.uid.clone().unwrap_or_default(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        ip: status.and_then(|s| s.pod_ip.clone()),
        labels: meta.labels.clone().unwrap_or_default(),
        revision: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_REVISION).cloned()),
        created_at: meta
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
        deleting: meta.deletion_timestamp.is_some(),
        terminal: matches!(phase, Some("Succeeded" | "Failed")),
        ready: condition("Ready").is_some_and(|c| c.status == "True"),
        in_service: gate.map(|c| c.status == "True"),
        in_service_since: gate
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.as_second()),
        containers,
        record: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_IN_PLACE))
            .and_then(|json| serde_json::from_str::<InPlaceRecord>(json).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_everything_the_planner_needs() {
        let pod: Pod = serde_json::from_value(json!({
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
    fn pods_without_an_ordinal_are_not_ours() {
        assert!(pod_view(&Pod::default()).is_none());
    }
}
