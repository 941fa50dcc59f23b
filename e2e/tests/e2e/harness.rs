//! End-to-end tests that prove the harness itself: the control plane, kwok's simulated
//! kubelet behaviour, the scheduler and admission webhooks over TLS.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gantry_e2e::manifest::install_crds;
use gantry_e2e::testing::{TEST_EXTENDED_RESOURCE, TestEnv, pod};
use gantry_e2e::webhook::{HttpsServer, Registration, Response, Target};
use gantry_e2e::{poll, wait};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::watcher;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn pod_condition<'a>(
    pod: &'a Pod,
    type_: &str,
) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

fn condition_true(pod: &Pod, type_: &str) -> bool {
    pod_condition(pod, type_).is_some_and(|c| c.status == "True")
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

fn first_container_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()
}

#[tokio::test]
async fn deployment_pods_run_on_kwok_nodes_and_are_garbage_collected() -> Result<()> {
    let env = TestEnv::new("deploy").await?;
    let deployments: Api<Deployment> = env.api();
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{ "name": "web", "image": "registry.example/web:v1" }] },
            },
        },
    }))?;
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;

    let pods: Api<Pod> = env.api();
    let selector = ListParams::default().labels("app=web");
    let running = wait::for_list(
        &pods,
        &selector,
        "3 Running, Ready pods on kwok nodes",
        TIMEOUT,
        |pods| {
            pods.len() == 3
                && pods.iter().all(|p| {
                    phase(p) == Some("Running")
                        && condition_true(p, "Ready")
                        && p.spec
                            .as_ref()
                            .and_then(|s| s.node_name.as_deref())
                            .is_some_and(|n| n.starts_with("kwok-node-"))
                })
        },
    )
    .await?;
    for p in &running {
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .unwrap_or_default();
        ensure!(!ip.is_empty(), "pod {:?} has no IP", p.metadata.name);
    }
    wait::for_object(
        &deployments,
        "web",
        "the Deployment to report 3 ready replicas",
        TIMEOUT,
        |d| d.status.as_ref().and_then(|s| s.ready_replicas) == Some(3),
    )
    .await?;

    // Deleting the Deployment leaves its ReplicaSet and pods to the garbage collector.
    deployments
        .delete("web", &DeleteParams::background())
        .await?;
    wait::for_list(
        &pods,
        &selector,
        "the garbage collector to remove every pod",
        TIMEOUT,
        <[Pod]>::is_empty,
    )
    .await?;
    let replicasets: Api<ReplicaSet> = env.api();
    wait::for_list(
        &replicasets,
        &selector,
        "the ReplicaSet to be removed",
        TIMEOUT,
        <[ReplicaSet]>::is_empty,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn changing_a_running_pods_image_restarts_its_container_in_place() -> Result<()> {
    let env = TestEnv::new("inplace").await?;
    let pods: Api<Pod> = env.api();
    pods.create(
        &PostParams::default(),
        &pod("app", "registry.example/app:v1", json!({}))?,
    )
    .await?;
    let before = wait::for_object(
        &pods,
        "app",
        "the pod to be Running and Ready",
        TIMEOUT,
        |p| phase(p) == Some("Running") && condition_true(p, "Ready"),
    )
    .await?;
    let old = first_container_status(&before)
        .context("no container status")?
        .clone();
    ensure!(
        old.restart_count == 0 && old.image == "registry.example/app:v1",
        "unexpected status {old:?}"
    );
    let node = before.spec.as_ref().and_then(|s| s.node_name.clone());
    let pod_ip = before.status.as_ref().and_then(|s| s.pod_ip.clone());

    let patch = json!({ "spec": { "containers": [{ "name": "app", "image": "registry.example/app:v2" }] } });
    pods.patch("app", &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;

    let after = wait::for_object(
        &pods,
        "app",
        "the container to restart with image v2",
        TIMEOUT,
        |p| {
            first_container_status(p).is_some_and(|s| {
                s.image == "registry.example/app:v2" && s.restart_count == 1 && s.ready
            }) && condition_true(p, "Ready")
        },
    )
    .await?;
    let new = first_container_status(&after).context("no container status")?;
    ensure!(
        new.container_id != old.container_id,
        "containerID unchanged: {:?}",
        new.container_id
    );
    ensure!(
        new.image_id != old.image_id,
        "imageID unchanged: {}",
        new.image_id
    );
    let started = |s: &k8s_openapi::api::core::v1::ContainerStatus| {
        s.state
            .as_ref()
            .and_then(|st| st.running.as_ref())
            .and_then(|r| r.started_at.clone())
    };
    let (old_started, new_started) = (
        started(&old).context("old startedAt")?,
        started(new).context("new startedAt")?,
    );
    ensure!(
        new_started.0 > old_started.0,
        "startedAt did not move: {old_started:?} -> {new_started:?}"
    );
    let last = new
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .context("no lastState.terminated")?;
    ensure!(
        last.container_id == old.container_id,
        "lastState does not describe the previous container"
    );
    // In place: same node, same IP, same pod.
    ensure!(
        after.metadata.uid == before.metadata.uid,
        "the pod was recreated"
    );
    ensure!(
        after.spec.as_ref().and_then(|s| s.node_name.clone()) == node,
        "the pod moved"
    );
    ensure!(
        after.status.as_ref().and_then(|s| s.pod_ip.clone()) == pod_ip,
        "the pod IP changed"
    );
    Ok(())
}

#[tokio::test]
async fn readiness_gates_are_left_to_their_controller() -> Result<()> {
    let env = TestEnv::new("gates").await?;
    let pods: Api<Pod> = env.api();
    let gate = "e2e.gantry.dev/in-place-ready";
    pods.create(
        &PostParams::default(),
        &pod(
            "gated",
            "registry.example/app:v1",
            json!({ "readinessGates": [{ "conditionType": gate }] }),
        )?,
    )
    .await?;
    wait::for_object(
        &pods,
        "gated",
        "containers ready but the pod not Ready (gate unset)",
        TIMEOUT,
        |p| {
            phase(p) == Some("Running")
                && condition_true(p, "ContainersReady")
                && pod_condition(p, "Ready").is_some_and(|c| {
                    c.status == "False" && c.reason.as_deref() == Some("ReadinessGatesNotReady")
                })
        },
    )
    .await?;
    // Not Ready in any state the pod takes for a while: nothing but the gate's owner may flip
    // it.
    let seen = wait::observe(
        &pods,
        watcher::Config::default().fields("metadata.name=gated"),
        Duration::from_secs(3),
    )
    .await?;
    ensure!(!seen.is_empty(), "the watch saw the pod");
    ensure!(
        seen.iter().all(|p| !condition_true(p, "Ready")),
        "pod became Ready without its gate"
    );

    // The gate's owner flips it; Ready follows each time.
    for (gate_status, ready) in [("True", "True"), ("False", "False")] {
        let patch =
            json!({ "status": { "conditions": [{ "type": gate, "status": gate_status }] } });
        pods.patch_status("gated", &PatchParams::default(), &Patch::Strategic(&patch))
            .await?;
        wait::for_object(
            &pods,
            "gated",
            &format!("Ready={ready} once the gate is {gate_status}"),
            TIMEOUT,
            |p| pod_condition(p, "Ready").is_some_and(|c| c.status == ready),
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn pod_asking_for_more_extended_resource_than_any_node_has_stays_pending() -> Result<()> {
    let env = TestEnv::new("extres").await?;
    let pods: Api<Pod> = env.api();
    let asking = |n: u32| {
        json!({ "containers": [{
        "name": "app",
        "image": "registry.example/app:v1",
        "resources": { "limits": { TEST_EXTENDED_RESOURCE: n.to_string() } },
    }] })
    };
    // Every node has 4.
    pods.create(
        &PostParams::default(),
        &pod("fits", "registry.example/app:v1", asking(4))?,
    )
    .await?;
    pods.create(
        &PostParams::default(),
        &pod("too-big", "registry.example/app:v1", asking(5))?,
    )
    .await?;
    let pending = wait::for_object(
        &pods,
        "too-big",
        "the scheduler to report the pod Unschedulable",
        TIMEOUT,
        |p| {
            pod_condition(p, "PodScheduled").is_some_and(|c| {
                c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
            })
        },
    )
    .await?;
    let message = pod_condition(&pending, "PodScheduled")
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        message.contains(&format!("Insufficient {TEST_EXTENDED_RESOURCE}")),
        "scheduler message does not name the resource: {message}"
    );
    ensure!(phase(&pending) == Some("Pending"), "pod is not Pending");
    wait::for_object(&pods, "fits", "the pod that fits to run", TIMEOUT, |p| {
        phase(p) == Some("Running")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn https_admission_webhook_on_the_host_is_called_by_the_api_server() -> Result<()> {
    let env = TestEnv::new("webhook").await?;
    let server = {
        HttpsServer::start(move |request| async move {
            let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&request.body)
            {
                Ok(r) => r,
                Err(e) => {
                    return Response {
                        status: 400,
                        content_type: "text/plain",
                        body: e.to_string().into_bytes(),
                    };
                }
            };
            let Ok(req): Result<AdmissionRequest<DynamicObject>, _> = review.try_into() else {
                return Response {
                    status: 400,
                    content_type: "text/plain",
                    body: b"no request".to_vec(),
                };
            };
            let deny = req
                .object
                .as_ref()
                .and_then(|o| o.metadata.labels.as_ref())
                .and_then(|l| l.get("e2e.gantry.dev/deny"))
                .is_some_and(|v| v == "true");
            let response = AdmissionResponse::from(&req);
            let response = if deny {
                response.deny("denied by the gantry e2e webhook")
            } else {
                response
            };
            Response::json(&response.into_review())
        })
        .await?
    };

    let registration = Registration::validating(
        &env.cluster,
        &env.client,
        &format!("{}-check", env.namespace()),
        vec![(
            "check.e2e.gantry.dev",
            Target::Url {
                url: server.url("/validate"),
                ca_pem: server.ca_pem(),
            },
        )],
        env.namespace(),
        json!([{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"] }]),
    )
    .await?;

    let cms: Api<ConfigMap> = env.api();
    let cm = |n: &str, deny: bool| -> Result<ConfigMap> {
        Ok(serde_json::from_value(json!({
            "metadata": { "name": n, "labels": { "e2e.gantry.dev/deny": deny.to_string() } },
        }))?)
    };
    // The API server picks the configuration up asynchronously: retry until it denies.
    let result = poll::until(
        "the webhook to deny a labelled ConfigMap",
        Duration::from_secs(30),
        || {
            let cms = cms.clone();
            let denied = cm("denied", true);
            async move {
                match cms.create(&PostParams::default(), &denied?).await {
                    Ok(_) => {
                        cms.delete("denied", &DeleteParams::default()).await?;
                        Ok(None)
                    }
                    Err(kube::Error::Api(status))
                        if status.message.contains("denied by the gantry e2e webhook") =>
                    {
                        Ok(Some(()))
                    }
                    Err(e) => Err(e.into()),
                }
            }
        },
    )
    .await;
    let allowed = cms
        .create(&PostParams::default(), &cm("allowed", false)?)
        .await;
    drop(registration);
    result?;
    allowed.context("the webhook should allow an unlabelled ConfigMap")?;
    ensure!(
        server.requests() >= 2,
        "the webhook saw {} calls",
        server.requests()
    );
    Ok(())
}

#[tokio::test]
async fn every_crd_in_the_repository_is_accepted_and_established() -> Result<()> {
    let env = TestEnv::new("crds").await?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let names = install_crds(&env.client, &dir).await?;
    let files = std::fs::read_dir(&dir)?.count();
    ensure!(
        files == 0 || !names.is_empty(),
        "no CRD found in {}",
        dir.display()
    );
    Ok(())
}
