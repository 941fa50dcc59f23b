//! The reconcile's requests against a scripted API server: what it writes, in which order,
//! with which preconditions, and what it does when a write is refused.

use std::sync::Arc;

use gantry_kit::cache::Cache;
use gantry_kit::index::{Index, by_controller};
use gantry_kit::mock_api::{self, MockApi, Recorded};
use gantry_kit::runtime::{Runtime, RuntimeSettings};
use gantry_kit::{OperatorInfo, ReconcileError};
use k8s_openapi::api::apps::v1::ControllerRevision;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::memory::Memory;
use super::{Context, Error, reconcile};
use crate::api::GrayApp;
use crate::metrics::GrayMetrics;
use crate::observe::{LeanPod, pod_view};
use crate::revision::Revision;

const APP_UID: &str = "app-uid";

fn app(image: &str, replicas: i32, status: Value) -> GrayApp {
    serde_json::from_value(json!({
        "apiVersion": "apps.gantry.dev/v1alpha1", "kind": "GrayApp",
        "metadata": {"name": "ocr", "namespace": "ns", "uid": APP_UID, "generation": 2},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "ocr"}},
            "template": {"metadata": {"labels": {"app": "ocr"}}, "spec": {"containers": [{"name": "ocr", "image": image}]}},
            "update": {"maxUnavailable": 1}
        },
        "status": status
    }))
    .expect("a valid GrayApp")
}

fn revision_name(image: &str) -> String {
    let app = app(image, 1, Value::Null);
    Revision::new("ocr", app.spec.template)
        .expect("serialises")
        .name
}

/// A pod of the app, Ready and in service on `image`.
fn pod(ordinal: i32, image: &str) -> LeanPod {
    serde_json::from_value(pod_json(ordinal, image)).expect("a valid pod")
}

fn pod_json(ordinal: i32, image: &str) -> Value {
    json!({
        "metadata": {
            "name": format!("ocr-{ordinal}"), "namespace": "ns", "uid": format!("pod-uid-{ordinal}"),
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {"app": "ocr", "apps.gantry.dev/app": "ocr",
                       "apps.gantry.dev/instance": ordinal.to_string(),
                       "apps.gantry.dev/revision": revision_name(image)},
            "ownerReferences": [{"apiVersion": "apps.gantry.dev/v1alpha1", "kind": "GrayApp",
                                 "name": "ocr", "uid": APP_UID, "controller": true}]
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "ocr", "image": image}]},
        "status": {
            "phase": "Running", "podIP": "10.0.0.1",
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "apps.gantry.dev/in-service", "status": "True", "lastTransitionTime": "2026-12-01T10:00:05Z"}
            ],
            "containerStatuses": [{"name": "ocr", "image": image, "containerID": format!("c-{ordinal}"),
                                   "restartCount": 0, "ready": true,
                                   "state": {"running": {"startedAt": "2026-12-01T10:00:02Z"}}}]
        }
    })
}

/// What the scripted API server answers: a revision that exists already, pods that are
/// written as asked, and `refuse` for the requests it matches.
fn answer(
    refuse: impl Fn(&Recorded) -> Option<(u16, Value)> + Send + Sync + 'static,
) -> impl Fn(&Recorded) -> (u16, Value) + Send + Sync + 'static {
    move |request| {
        if let Some(refused) = refuse(request) {
            return refused;
        }
        let path = request.path.split('?').next().unwrap_or_default();
        match request.method.as_str() {
            "POST" if path.ends_with("/controllerrevisions") => (
                409,
                mock_api::status(
                    409,
                    "AlreadyExists",
                    "controllerrevisions \"ocr-x\" already exists",
                ),
            ),
            "PATCH" if path.contains("/grayapps/") => (
                200,
                serde_json::to_value(app("ocr:v7", 2, Value::Null)).unwrap_or_default(),
            ),
            "POST" if path.ends_with("/pods") => {
                let mut pod = request.body.clone();
                pod["metadata"]["uid"] = json!("new-uid");
                (201, pod)
            }
            "PATCH" | "DELETE" if path.contains("/pods/") => (
                200,
                serde_json::to_value(json!({
                    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "ns"}
                }))
                .unwrap_or_default(),
            ),
            _ => (201, request.body.clone()),
        }
    }
}

/// A context whose caches hold `pods` and `revisions` (as if listed), on the mock client.
fn context(client: kube::Client, pods: &[LeanPod], revisions: &[&str]) -> Arc<Context> {
    let info = OperatorInfo {
        name: "gantry-gray-upgrade",
        about: "test",
        version: "0",
        crds: Vec::new,
    };
    let runtime = Runtime::new(info, client, RuntimeSettings::default());
    let mut metrics = None;
    runtime
        .metrics()
        .register(|registry| metrics = Some(GrayMetrics::register(registry)));
    let index = Index::default();
    index.apply(&Event::<LeanPod>::Init, by_controller, pod_view);
    for pod in pods {
        index.apply(&Event::InitApply(pod.clone()), by_controller, pod_view);
    }
    index.apply(&Event::<LeanPod>::InitDone, by_controller, pod_view);
    let (cache, mut feed) = Cache::<ControllerRevision>::new();
    feed.apply(&Event::Init);
    for image in revisions {
        let app = app(image, 1, Value::Null);
        let revision = Revision::new("ocr", app.spec.template.clone()).expect("serialises");
        let object = crate::objects::controller_revision(&app, &revision, 1).expect("serialises");
        feed.apply(&Event::InitApply(object));
    }
    feed.apply(&Event::InitDone);
    Arc::new(Context {
        runtime,
        pods: index,
        revisions: cache,
        metrics: metrics.expect("registered"),
        memory: Memory::default(),
    })
}

fn position(lines: &[String], wanted: impl Fn(&str) -> bool) -> usize {
    lines
        .iter()
        .position(|l| wanted(l))
        .unwrap_or_else(|| panic!("no such request among {lines:#?}"))
}

#[tokio::test]
async fn a_new_app_stores_its_revision_then_its_status_then_creates_its_pods() {
    let (mock, client) = MockApi::new(answer(|_| None));
    let ctx = context(client, &[], &[]);
    let result = reconcile(Arc::new(app("ocr:v7", 2, Value::Null)), ctx).await;
    assert!(result.is_ok(), "{result:?}");
    let writes = mock.writes();
    let revision = position(&writes, |l| l.ends_with("/controllerrevisions"));
    let status = position(&writes, |l| l.ends_with("/grayapps/ocr/status"));
    let first_pod = position(&writes, |l| l == "POST /api/v1/namespaces/ns/pods");
    assert!(
        revision < status && status < first_pod,
        "revision (AlreadyExists is fine), status, then pods: {writes:#?}"
    );
    assert_eq!(
        writes.iter().filter(|l| l.ends_with("/pods")).count(),
        2,
        "{writes:#?}"
    );
}

#[tokio::test]
async fn scaling_down_deletes_only_the_pod_planned_for_by_its_uid() {
    let (mock, client) = MockApi::new(answer(|_| None));
    let pods = [pod(0, "ocr:v7"), pod(1, "ocr:v7")];
    let ctx = context(client, &pods, &["ocr:v7"]);
    let result = reconcile(Arc::new(app("ocr:v7", 1, Value::Null)), ctx).await;
    assert!(result.is_ok(), "{result:?}");
    let deletes: Vec<Recorded> = mock
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:#?}");
    assert_eq!(deletes[0].line(), "DELETE /api/v1/namespaces/ns/pods/ocr-1");
    assert_eq!(deletes[0].body["preconditions"]["uid"], "pod-uid-1");
}

#[tokio::test]
async fn an_in_place_update_writes_the_batch_then_closes_the_gate_then_patches() {
    let (mock, client) = MockApi::new(answer(|_| None));
    let pods = [pod(0, "ocr:v7"), pod(1, "ocr:v7")];
    let ctx = context(client, &pods, &["ocr:v7"]);
    let result = reconcile(Arc::new(app("ocr:v8", 2, Value::Null)), ctx).await;
    assert!(result.is_ok(), "{result:?}");
    let requests = mock.requests();
    let writes = mock.writes();
    let status = position(&writes, |l| l.ends_with("/grayapps/ocr/status"));
    let gate = position(&writes, |l| l.ends_with("/pods/ocr-0/status"));
    let patch = position(&writes, |l| l.ends_with("/pods/ocr-0"));
    assert!(status < gate && gate < patch, "{writes:#?}");
    let written = |suffix: &str| {
        requests
            .iter()
            .find(|r| r.is_write() && r.line().ends_with(suffix))
            .map(|r| r.body.clone())
            .unwrap_or_default()
    };
    let status_body = written("/grayapps/ocr/status");
    assert_eq!(status_body["status"]["rollout"]["members"], json!([0, 1]));
    let gate_body = written("/pods/ocr-0/status");
    assert_eq!(gate_body["metadata"]["uid"], "pod-uid-0");
    assert_eq!(
        gate_body["status"]["conditions"][0]["type"],
        "apps.gantry.dev/in-service"
    );
    assert_eq!(gate_body["status"]["conditions"][0]["status"], "False");
    let patch_body = written("/pods/ocr-0");
    assert_eq!(patch_body["spec"]["containers"][0]["image"], "ocr:v8");
    assert_eq!(patch_body["metadata"]["uid"], "pod-uid-0");
    assert!(
        !writes.iter().any(|l| l.ends_with("/pods/ocr-1")),
        "maxUnavailable 1: one instance at a time: {writes:#?}"
    );
}

#[tokio::test]
async fn a_refused_patch_is_reported_and_its_instance_returned_to_service() {
    let refuse = |r: &Recorded| {
        (r.method == "PATCH" && r.line() == "PATCH /api/v1/namespaces/ns/pods/ocr-0").then(|| {
            (
                403,
                mock_api::status(
                    403,
                    "Forbidden",
                    "pods \"ocr-0\" is forbidden: cannot patch resource \"pods\"",
                ),
            )
        })
    };
    let (mock, client) = MockApi::new(answer(refuse));
    let pods = [pod(0, "ocr:v7"), pod(1, "ocr:v7")];
    let ctx = context(client, &pods, &["ocr:v7"]);
    let first = reconcile(Arc::new(app("ocr:v8", 2, Value::Null)), Arc::clone(&ctx)).await;
    let Err(err @ Error::Writes { .. }) = &first else {
        panic!("the refused write is the reconcile's error: {first:?}");
    };
    assert_eq!(err.metric_reason(), "WriteFailed");
    assert!(err.to_string().contains("patch pods ocr-0: 403"), "{err}");
    let requests = mock.requests();
    let event = requests
        .iter()
        .find(|r| {
            r.method == "POST" && r.line().ends_with("/events") && r.body["reason"] == "WriteFailed"
        })
        .unwrap_or_else(|| panic!("a Warning event: {:#?}", mock.writes()));
    assert_eq!(event.body["type"], "Warning");
    let stalled = requests
        .iter()
        .filter(|r| r.line().ends_with("/grayapps/ocr/status"))
        .filter_map(|r| r.body["status"]["conditions"].as_array().cloned())
        .flatten()
        .find(|c| c["type"] == "Stalled" && c["status"] == "True")
        .unwrap_or_else(|| panic!("a Stalled condition: {requests:#?}"));
    assert_eq!(stalled["reason"], "WriteForbidden");
    assert!(
        stalled["message"]
            .as_str()
            .unwrap_or_default()
            .contains("patch pods ocr-0"),
        "{stalled}"
    );

    // The next reconcile sees instance 0 out of service, waiting for the patch: while writes
    // are held it goes back into service, and no one else is taken out.
    let written_status = requests
        .iter()
        .rfind(|r| r.line().ends_with("/grayapps/ocr/status"))
        .map(|r| r.body["status"].clone())
        .unwrap_or_default();
    let mut out_of_service = serde_json::to_value(pod_json(0, "ocr:v7")).unwrap_or_default();
    out_of_service["status"]["conditions"][1]["status"] = json!("False");
    out_of_service["status"]["conditions"][0]["status"] = json!("False");
    let out_of_service: LeanPod = serde_json::from_value(out_of_service).expect("a valid pod");
    ctx.pods
        .apply(&Event::Apply(out_of_service), by_controller, pod_view);
    let before = mock.requests().len();
    let second = reconcile(Arc::new(app("ocr:v8", 2, written_status)), Arc::clone(&ctx)).await;
    assert!(second.is_ok(), "{second:?}");
    let later: Vec<Recorded> = mock.requests().into_iter().skip(before).collect();
    let gate_on = later
        .iter()
        .find(|r| r.line().ends_with("/pods/ocr-0/status"))
        .unwrap_or_else(|| panic!("instance 0 back in service: {later:#?}"));
    assert_eq!(gate_on.body["status"]["conditions"][0]["status"], "True");
    assert!(
        !later
            .iter()
            .any(|r| r.line().ends_with("/pods/ocr-0") || r.line().ends_with("/pods/ocr-1/status")),
        "nothing new while writes are held: {later:#?}"
    );
}

#[tokio::test]
async fn a_write_the_watch_has_not_shown_yet_is_not_made_again() {
    let (mock, client) = MockApi::new(answer(|_| None));
    let pods = [pod(0, "ocr:v7"), pod(1, "ocr:v7")];
    let ctx = context(client, &pods, &["ocr:v7"]);
    let first = reconcile(Arc::new(app("ocr:v8", 2, Value::Null)), Arc::clone(&ctx)).await;
    assert!(first.is_ok(), "{first:?}");
    let status = mock
        .requests()
        .iter()
        .rfind(|r| r.line().ends_with("/grayapps/ocr/status"))
        .map(|r| r.body["status"].clone())
        .unwrap_or_default();
    let before = mock.writes().len();
    // The caches still show the pods as they were: the watch is behind.
    let second = reconcile(Arc::new(app("ocr:v8", 2, status)), ctx).await;
    assert!(second.is_ok(), "{second:?}");
    let again: Vec<String> = mock
        .writes()
        .into_iter()
        .skip(before)
        .filter(|l| l.contains("/pods/"))
        .collect();
    assert!(again.is_empty(), "nothing written twice: {again:#?}");
}
