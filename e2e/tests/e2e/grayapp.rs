//! GrayApp end to end: the gray-upgrade operator runs on the host as the ServiceAccount its
//! chart creates (watching only the test's namespace, with the chart's namespaced RBAC),
//! against the real control plane and kwok nodes whose `nvidia.com/gpu` stands in for GPUs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use gantry_e2e::manifest::dynamic_api;
use gantry_e2e::operator::{Fixture, GRAY_UPGRADE, Operator};
use gantry_e2e::testing::TestEnv;
use gantry_e2e::{poll, wait};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);
const GPU: &str = "nvidia.com/gpu";

/// A test namespace with the operator running in it (one replica, leader election on with a
/// short lease, so that more can be started and take over).
struct Gray {
    env: TestEnv,
    operator: Operator,
    apps: Api<kube::api::DynamicObject>,
}

impl Gray {
    async fn start(prefix: &str) -> Result<Self> {
        let env = TestEnv::new(prefix).await?;
        let operator = Fixture::new(&env, GRAY_UPGRADE)
            .watch_namespace()
            .leader_elect(true)
            .flag("--lease-duration-seconds=6")
            .start()
            .await?;
        let apps = dynamic_api(
            &env.client,
            env.namespace(),
            "apps.gantry.dev/v1alpha1",
            "GrayApp",
        )
        .await?;
        Ok(Self {
            env,
            operator,
            apps,
        })
    }

    async fn create(&self, name: &str, replicas: i32, image: &str, update: Value) -> Result<()> {
        let object = json!({
            "apiVersion": "apps.gantry.dev/v1alpha1",
            "kind": "GrayApp",
            "metadata": {"name": name, "namespace": self.env.namespace()},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": template(name, image, None),
                "update": update,
            }
        });
        self.dynamic()
            .create(&PostParams::default(), &serde_json::from_value(object)?)
            .await?;
        Ok(())
    }

    /// Creates the app and waits until every instance is Ready, the start of most stories.
    async fn create_ready(
        &self,
        name: &str,
        replicas: i32,
        image: &str,
        update: Value,
    ) -> Result<()> {
        self.create(name, replicas, image, update).await?;
        self.wait_status(name, &format!("{replicas} Ready"), |s| {
            ready_count(s) == i64::from(replicas)
        })
        .await?;
        Ok(())
    }

    fn dynamic(&self) -> Api<kube::api::DynamicObject> {
        self.apps.clone()
    }

    async fn patch(&self, name: &str, patch: Value) -> Result<()> {
        self.dynamic()
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    async fn status(&self, name: &str) -> Result<Value> {
        Ok(self.dynamic().get(name).await?.data["status"].clone())
    }

    /// Waits until the app's status satisfies `cond`, returning the status.
    async fn wait_status(
        &self,
        name: &str,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        // Only a status written for the current generation counts: one from before the last
        // change could satisfy a condition about the change.
        let app = wait::for_object(&self.dynamic(), name, what, TIMEOUT, |o| {
            o.data["status"]["observedGeneration"].as_i64() == o.metadata.generation
                && cond(&o.data["status"])
        })
        .await?;
        Ok(app.data["status"].clone())
    }

    async fn pods(&self, app: &str) -> Result<BTreeMap<String, Pod>> {
        let pods: Api<Pod> = self.env.api();
        let list = pods
            .list(&kube::api::ListParams::default().labels(&format!("apps.gantry.dev/app={app}")))
            .await?;
        Ok(list.items.into_iter().map(|p| (p.name_any(), p)).collect())
    }
}

/// The pod template; only the OCR story's instances hold GPUs (2 each), so that tests running
/// side by side do not compete for them.
fn template(app: &str, image: &str, args: Option<&str>) -> Value {
    let mut container = json!({"name": "ocr", "image": image});
    if app == "ocr" {
        container["resources"] = json!({"limits": {GPU: "2"}});
    }
    if let Some(a) = args {
        container["args"] = json!([a]);
    }
    json!({"metadata": {"labels": {"app": app}}, "spec": {"containers": [container]}})
}

fn image_patch(app: &str, image: &str) -> Value {
    json!({"spec": {"template": template(app, image, None)}})
}

fn phase(status: &Value) -> &str {
    status["rollout"]["phase"].as_str().unwrap_or_default()
}

fn condition(status: &Value, type_: &str) -> Option<String> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(String::from))
}

fn condition_reason(status: &Value, type_: &str) -> Option<String> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["reason"].as_str().map(String::from))
}

fn condition_message(status: &Value, type_: &str) -> String {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .and_then(|c| c["message"].as_str().map(String::from))
        .unwrap_or_default()
}

fn in_service(pod: &Pod) -> Option<bool> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "apps.gantry.dev/in-service"))
        .map(|c| c.status == "True")
}

fn ready_count(status: &Value) -> i64 {
    status["readyReplicas"].as_i64().unwrap_or(0)
}

fn image_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers[0].image.clone())
        .unwrap_or_default()
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c[0].restart_count)
}

/// uid and node of every pod.
fn identities(pods: &BTreeMap<String, Pod>) -> BTreeMap<String, (String, String)> {
    pods.iter()
        .map(|(n, p)| {
            (
                n.clone(),
                (
                    p.uid().unwrap_or_default(),
                    p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default(),
                ),
            )
        })
        .collect()
}

async fn approve(gray: &Gray, app: &str) -> Result<()> {
    let status = gray.status(app).await?;
    let value = format!(
        "{}/{}",
        status["rollout"]["revision"].as_str().unwrap_or_default(),
        status["rollout"]["batch"]
    );
    gray.patch(
        app,
        json!({"metadata": {"annotations": {"apps.gantry.dev/approve": value}}}),
    )
    .await
}

/// Watches the EndpointSlices of `service` and records every readiness each pod's endpoint
/// was seen with.
fn watch_endpoints(gray: &Gray, service: &str) -> Arc<Mutex<BTreeMap<String, BTreeSet<bool>>>> {
    let seen: Arc<Mutex<BTreeMap<String, BTreeSet<bool>>>> = Arc::default();
    let api: Api<EndpointSlice> = gray.env.api();
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut stream = watcher(api, config).applied_objects().boxed();
        while let Some(Ok(slice)) = stream.next().await {
            let mut map = record
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for endpoint in &slice.endpoints {
                let Some(pod) = endpoint.target_ref.as_ref().and_then(|t| t.name.clone()) else {
                    continue;
                };
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(false);
                map.entry(pod).or_default().insert(ready);
            }
        }
    });
    seen
}

#[tokio::test]
async fn ocr_story_upgrades_chosen_instances_in_place_batch_by_batch() -> Result<()> {
    let gray = Gray::start("gray-ocr").await?;
    let update = json!({"maxUnavailable": 3, "gracePeriodSeconds": 2, "promotion": "Manual",
        "batches": [{"instances": [2, 5, 11]}, {"count": 10}, {}]});
    gray.create("ocr", 25, "ocr:v7", update).await?;
    let services: Api<Service> = gray.env.api();
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "ocr"},
                "spec": {"selector": {"app": "ocr"}, "ports": [{"port": 80}]}
            }))?,
        )
        .await?;
    gray.wait_status("ocr", "25 instances Ready", |s| {
        ready_count(s) == 25 && condition(s, "Ready").as_deref() == Some("True")
    })
    .await?;
    let before = identities(&gray.pods("ocr").await?);
    let endpoints = watch_endpoints(&gray, "ocr");

    gray.patch("ocr", image_patch("ocr", "ocr:v8")).await?;
    let status = gray
        .wait_status("ocr", "batch 1 to pass and wait for approval", |s| {
            phase(s) == "AwaitingApproval"
        })
        .await?;
    assert_eq!(status["rollout"]["members"], json!([2, 5, 11]));
    let pods = gray.pods("ocr").await?;
    let on_v8: BTreeSet<String> = pods
        .iter()
        .filter(|(_, p)| image_of(p) == "ocr:v8")
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        on_v8,
        ["ocr-11", "ocr-2", "ocr-5"]
            .iter()
            .map(ToString::to_string)
            .collect()
    );
    {
        let seen = endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for pod in ["ocr-2", "ocr-5", "ocr-11"] {
            assert!(
                seen.get(pod).is_some_and(|s| s.contains(&false)),
                "{pod} never left the Service's endpoints: {seen:?}"
            );
        }
        assert!(
            !seen.get("ocr-0").is_some_and(|s| s.contains(&false)),
            "ocr-0 was taken out of service: {seen:?}"
        );
    }

    approve(&gray, "ocr").await?;
    gray.wait_status("ocr", "batch 2 to pass", |s| {
        phase(s) == "AwaitingApproval" && s["rollout"]["batch"] == 1
    })
    .await?;
    assert_eq!(
        gray.pods("ocr")
            .await?
            .values()
            .filter(|p| image_of(p) == "ocr:v8")
            .count(),
        13
    );

    approve(&gray, "ocr").await?;
    let status = gray
        .wait_status("ocr", "the rollout to complete", |s| {
            phase(s) == "Completed" && ready_count(s) == 25
        })
        .await?;
    assert_eq!(condition(&status, "Ready").as_deref(), Some("True"));
    let pods = gray.pods("ocr").await?;
    assert!(pods.values().all(|p| image_of(p) == "ocr:v8"));
    assert_eq!(
        identities(&pods),
        before,
        "every instance kept its pod (UID) and node"
    );
    assert!(
        pods.values().all(|p| restarts(p) == 1),
        "each container restarted exactly once"
    );
    Ok(())
}

#[tokio::test]
async fn several_versions_run_side_by_side_at_rest() -> Result<()> {
    let gray = Gray::start("gray-mixed").await?;
    gray.create_ready("web", 8, "web:v7", json!({"maxUnavailable": 2}))
        .await?;
    gray.patch(
        "web",
        json!({"spec": {"variants": [
            {"name": "v8", "instances": [2, 5], "images": {"ocr": "web:v8"}},
            {"name": "v9", "instances": [4], "images": {"ocr": "web:v9"}}
        ]}}),
    )
    .await?;
    let status = gray
        .wait_status("web", "three revisions at rest", |s| {
            s["revisions"].as_array().is_some_and(|r| r.len() == 3)
                && ready_count(s) == 8
                && condition(s, "Ready").as_deref() == Some("True")
        })
        .await?;
    let spread: BTreeMap<String, String> = status["revisions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["images"]["ocr"].as_str().unwrap_or_default().to_string(),
                r["instances"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(spread.get("web:v7").map(String::as_str), Some("0-1,3,6-7"));
    assert_eq!(spread.get("web:v8").map(String::as_str), Some("2,5"));
    assert_eq!(spread.get("web:v9").map(String::as_str), Some("4"));
    Ok(())
}

#[tokio::test]
async fn abort_mid_batch_returns_every_moved_instance() -> Result<()> {
    let gray = Gray::start("gray-abort").await?;
    gray.create_ready(
        "api",
        6,
        "api:v1",
        json!({"maxUnavailable": 1, "gracePeriodSeconds": 4, "batches": [{}]}),
    )
    .await?;
    gray.patch("api", image_patch("api", "api:v2")).await?;
    gray.wait_status("api", "one instance moved", |s| {
        s["updatedReplicas"].as_i64().unwrap_or(0) >= 1
    })
    .await?;
    let revision = gray.status("api").await?["updateRevision"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    gray.patch(
        "api",
        json!({"metadata": {"annotations": {"apps.gantry.dev/abort": revision}}}),
    )
    .await?;
    let status = gray
        .wait_status("api", "the abort to finish", |s| {
            phase(s) == "Aborted" && ready_count(s) == 6
        })
        .await?;
    // A person's decision, carried out, with every instance serving: Ready (what Flux and
    // kstatus read as healthy), the abort as its reason; not Stalled.
    assert_eq!(condition(&status, "Stalled").as_deref(), Some("False"));
    assert_eq!(condition(&status, "Ready").as_deref(), Some("True"));
    assert_eq!(
        condition_reason(&status, "Ready").as_deref(),
        Some("RolloutAborted")
    );
    let pods = gray.pods("api").await?;
    assert!(
        pods.values().all(|p| image_of(p) == "api:v1"),
        "everyone back on v1"
    );
    Ok(())
}

#[tokio::test]
async fn reverting_the_template_while_an_instance_is_mid_update_converges() -> Result<()> {
    let gray = Gray::start("gray-revert").await?;
    gray.create_ready(
        "svc",
        4,
        "svc:v1",
        json!({"maxUnavailable": 1, "gracePeriodSeconds": 5}),
    )
    .await?;
    gray.patch("svc", image_patch("svc", "svc:v2")).await?;
    // The first instance is out of service, waiting out its grace period: revert now.
    poll::until("an instance out of service", TIMEOUT, || async {
        let pods = gray.pods("svc").await?;
        let out = pods.values().any(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "apps.gantry.dev/in-service" && c.status == "False")
                })
        });
        Ok(out.then_some(()))
    })
    .await?;
    gray.patch("svc", image_patch("svc", "svc:v1")).await?;
    gray.wait_status("svc", "convergence on v1", |s| {
        phase(s) == "Completed" && ready_count(s) == 4 && s["updatedReplicas"] == 4
    })
    .await?;
    assert!(
        gray.pods("svc")
            .await?
            .values()
            .all(|p| image_of(p) == "svc:v1")
    );
    Ok(())
}

#[tokio::test]
async fn a_revert_during_a_slow_restart_ends_on_the_reverted_template() -> Result<()> {
    let gray = Gray::start("gray-slow").await?;
    let update = json!({"maxUnavailable": 1, "promotion": "Auto",
        "batches": [{"instances": [0]}, {}], "health": {"progressDeadlineSeconds": 5}});
    let slow = |image: &str| {
        let mut t = template("slow", image, None);
        t["metadata"]["annotations"] = json!({"kwok.gantry.dev/restart-delay": "12s"});
        json!({"spec": {"template": t}})
    };
    // Pods carry the delay from their creation: a template annotation alone changes nothing
    // that restarts a container.
    let object = json!({
        "apiVersion": "apps.gantry.dev/v1alpha1", "kind": "GrayApp",
        "metadata": {"name": "slow", "namespace": gray.env.namespace()},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "slow"}},
                 "template": slow("slow:v1")["spec"]["template"], "update": update}
    });
    gray.dynamic()
        .create(&PostParams::default(), &serde_json::from_value(object)?)
        .await?;
    gray.wait_status("slow", "3 Ready", |s| ready_count(s) == 3)
        .await?;
    let v1 = gray.status("slow").await?["updateRevision"].clone();
    gray.patch("slow", slow("slow:v2")).await?;
    // Instance 0 patched to v2, its container stopped and not started again yet (12 s).
    poll::until("instance 0 stopped for v2", TIMEOUT, || async {
        let pods = gray.pods("slow").await?;
        let stopped = pods.get("slow-0").is_some_and(|p| {
            image_of(p) == "slow:v2"
                && p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|c| c[0].state.as_ref().is_some_and(|s| s.running.is_none()))
        });
        Ok(stopped.then_some(()))
    })
    .await?;
    gray.patch("slow", slow("slow:v1")).await?;
    let status = gray
        .wait_status("slow", "a settled rollout back to v1", |s| {
            matches!(phase(s), "Completed" | "Failed") && ready_count(s) == 3
        })
        .await?;
    assert_eq!(status["updateRevision"], v1);
    let pods = gray.pods("slow").await?;
    for (name, pod) in &pods {
        assert_eq!(
            image_of(pod),
            "slow:v1",
            "{name} runs what the template names"
        );
        assert_eq!(
            pod.labels()
                .get("apps.gantry.dev/revision")
                .map(|r| json!(r)),
            Some(v1.clone()),
            "{name} is on the template's revision"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_forbidden_write_is_reported_and_holds_no_instance_out_of_service() -> Result<()> {
    let gray = Gray::start("gray-rbac").await?;
    gray.create_ready(
        "web",
        4,
        "web:v1",
        json!({"maxUnavailable": 2, "promotion": "Auto"}),
    )
    .await?;
    // The operator's Role loses `patch` on pods: its in-place patches are refused.
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = gray.env.api();
    let role = gray
        .operator
        .identity()
        .rendered
        .iter()
        .find(|o| o.types.as_ref().is_some_and(|t| t.kind == "Role"))
        .map(ResourceExt::name_any)
        .context("the chart renders a Role")?;
    let granted = roles.get(&role).await?;
    let mut narrowed = granted.clone();
    for rule in narrowed.rules.iter_mut().flatten() {
        if rule
            .resources
            .as_ref()
            .is_some_and(|r| r == &["pods".to_string()])
        {
            rule.verbs.retain(|v| v != "patch");
        }
    }
    roles
        .replace(&role, &PostParams::default(), &narrowed)
        .await?;
    gray.patch("web", image_patch("web", "web:v2")).await?;
    let status = gray
        .wait_status("web", "the refused write reported", |s| {
            condition_reason(s, "Stalled").as_deref() == Some("WriteForbidden")
        })
        .await?;
    let message = condition_message(&status, "Stalled");
    assert!(message.contains("patch pods web-"), "{message}");
    let events: Api<k8s_openapi::api::events::v1::Event> = gray.env.api();
    let warned = events
        .list(&kube::api::ListParams::default())
        .await?
        .items
        .iter()
        .any(|e| {
            e.reason.as_deref() == Some("WriteFailed") && e.type_.as_deref() == Some("Warning")
        });
    assert!(warned, "a Warning event says which write failed");
    // While writes are refused, no instance stays out of service.
    poll::until("every instance back in service", TIMEOUT, || async {
        let pods = gray.pods("web").await?;
        Ok(pods
            .values()
            .all(|p| in_service(p) == Some(true))
            .then_some(()))
    })
    .await?;
    // Permission restored: the rollout goes through.
    let mut restored = roles.get(&role).await?;
    restored.rules = granted.rules.clone();
    roles
        .replace(&role, &PostParams::default(), &restored)
        .await?;
    gray.wait_status("web", "the rollout once writes go through", |s| {
        phase(s) == "Completed" && ready_count(s) == 4 && s["updatedReplicas"] == 4
    })
    .await?;
    let status = gray.status("web").await?;
    assert_eq!(condition(&status, "Stalled").as_deref(), Some("False"));
    Ok(())
}

#[tokio::test]
async fn a_failed_batch_is_rolled_back_in_place() -> Result<()> {
    let gray = Gray::start("gray-fail").await?;
    let update = json!({"maxUnavailable": 2, "promotion": "Auto", "batches": [{"instances": [1, 2]}, {}],
        "health": {"progressDeadlineSeconds": 8}});
    gray.create_ready("pay", 5, "pay:v1", update).await?;
    let before = identities(&gray.pods("pay").await?);
    gray.patch("pay", image_patch("pay", "pay:v2-never-ready"))
        .await?;
    let status = gray
        .wait_status("pay", "the failed batch to be rolled back", |s| {
            phase(s) == "Failed" && ready_count(s) == 5
        })
        .await?;
    assert_eq!(condition(&status, "Stalled").as_deref(), Some("True"));
    assert_eq!(condition(&status, "Degraded").as_deref(), Some("True"));
    assert_eq!(condition(&status, "Ready").as_deref(), Some("False"));
    let pods = gray.pods("pay").await?;
    assert!(
        pods.values().all(|p| image_of(p) == "pay:v1"),
        "everyone back on v1"
    );
    assert_eq!(identities(&pods), before, "rolled back in place");
    for untouched in ["pay-0", "pay-3", "pay-4"] {
        assert_eq!(
            restarts(&pods[untouched]),
            0,
            "{untouched} was outside the failed batch"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_tag_moved_to_the_same_digest_still_completes() -> Result<()> {
    // The new tag names the same image: the runtime reports the same imageID before and after,
    // but the container is restarted. Completion must not wait for a new imageID.
    let digest = "sha256:4a1f0c57d6b9e3f2a8c7d6e5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281";
    let gray = Gray::start("gray-digest").await?;
    gray.create_ready(
        "tag",
        3,
        &format!("tag:v1@{digest}"),
        json!({"maxUnavailable": 1}),
    )
    .await?;
    let image_id = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|c| c[0].image_id.clone())
            .unwrap_or_default()
    };
    let before: BTreeMap<String, String> = gray
        .pods("tag")
        .await?
        .iter()
        .map(|(n, p)| (n.clone(), image_id(p)))
        .collect();
    gray.patch(
        "tag",
        image_patch("tag", &format!("tag:v1-hotfix@{digest}")),
    )
    .await?;
    gray.wait_status("tag", "the retag to complete", |s| {
        phase(s) == "Completed" && ready_count(s) == 3 && s["updatedReplicas"] == 3
    })
    .await?;
    let pods = gray.pods("tag").await?;
    for (name, pod) in &pods {
        assert_eq!(
            image_id(pod),
            before[name],
            "{name}: same digest, same imageID"
        );
        assert_eq!(restarts(pod), 1, "{name} restarted once");
    }
    Ok(())
}

#[tokio::test]
async fn instances_keep_their_volume_claims_through_upgrades_and_scale_down() -> Result<()> {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let gray = Gray::start("gray-pvc").await?;
    let ns = gray.env.namespace().to_string();
    // Volumes for the claims to bind, one per instance (kwok mounts nothing).
    let volumes: Api<PersistentVolume> = Api::all(gray.env.client.clone());
    for i in 0..3 {
        let pv = json!({
            "metadata": {"name": format!("{ns}-{i}")},
            "spec": {
                "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                "storageClassName": "manual", "persistentVolumeReclaimPolicy": "Delete",
                "hostPath": {"path": format!("/tmp/{ns}-{i}")},
                "claimRef": {"namespace": ns, "name": format!("data-vol-{i}")}
            }
        });
        volumes
            .create(&PostParams::default(), &serde_json::from_value(pv)?)
            .await?;
    }
    let object = json!({
        "apiVersion": "apps.gantry.dev/v1alpha1", "kind": "GrayApp",
        "metadata": {"name": "vol", "namespace": ns},
        "spec": {
            "replicas": 3, "selector": {"matchLabels": {"app": "vol"}},
            "template": template("vol", "vol:v1", None),
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "manual",
                "resources": {"requests": {"storage": "1Gi"}}}}],
            "update": {"maxUnavailable": 1}
        }
    });
    gray.dynamic()
        .create(&PostParams::default(), &serde_json::from_value(object)?)
        .await?;
    gray.wait_status("vol", "3 Ready with bound claims", |s| ready_count(s) == 3)
        .await?;
    let claims: Api<PersistentVolumeClaim> = gray.env.api();
    let uid_of = |c: &PersistentVolumeClaim| c.metadata.uid.clone().unwrap_or_default();
    let before: BTreeMap<String, String> = claims
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(|c| (c.name_any(), uid_of(c)))
        .collect();
    assert_eq!(
        before.keys().cloned().collect::<Vec<_>>(),
        vec!["data-vol-0", "data-vol-1", "data-vol-2"]
    );
    let mounts = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .and_then(|v| {
                v.iter().find_map(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .map(|c| c.claim_name.clone())
                })
            })
    };
    gray.patch("vol", image_patch("vol", "vol:v2")).await?;
    gray.wait_status("vol", "the upgrade", |s| {
        phase(s) == "Completed" && s["updatedReplicas"] == 3 && ready_count(s) == 3
    })
    .await?;
    for (name, pod) in gray.pods("vol").await? {
        let ordinal = name.trim_start_matches("vol-");
        assert_eq!(
            mounts(&pod),
            Some(format!("data-vol-{ordinal}")),
            "{name} mounts its own claim"
        );
    }
    gray.patch("vol", json!({"spec": {"replicas": 2}})).await?;
    gray.wait_status("vol", "scale-down", |s| {
        s["replicas"] == 2 && ready_count(s) == 2
    })
    .await?;
    let after: BTreeMap<String, String> = claims
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(|c| (c.name_any(), uid_of(c)))
        .collect();
    assert_eq!(
        after, before,
        "the same claims, including the removed instance's"
    );
    for i in 0..3 {
        let _ = volumes
            .delete(&format!("{ns}-{i}"), &Default::default())
            .await;
    }
    Ok(())
}

#[tokio::test]
async fn a_change_that_cannot_happen_in_place_recreates_under_the_same_name() -> Result<()> {
    let gray = Gray::start("gray-recreate").await?;
    gray.create_ready("job", 3, "job:v1", json!({"maxUnavailable": 1}))
        .await?;
    let before = identities(&gray.pods("job").await?);
    gray.patch(
        "job",
        json!({"spec": {"template": template("job", "job:v1", Some("--fast"))}}),
    )
    .await?;
    gray.wait_status("job", "all recreated", |s| {
        phase(s) == "Completed" && ready_count(s) == 3 && s["updatedReplicas"] == 3
    })
    .await?;
    let after = identities(&gray.pods("job").await?);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "same names"
    );
    assert!(
        after.iter().all(|(n, (uid, _))| before[n].0 != *uid),
        "new pods"
    );
    Ok(())
}

#[tokio::test]
async fn operator_killed_mid_batch_resumes_without_upgrading_anyone_twice() -> Result<()> {
    let mut gray = Gray::start("gray-kill").await?;
    gray.create_ready("db", 6, "db:v1", json!({"maxUnavailable": 2, "gracePeriodSeconds": 2, "promotion": "Auto", "batches": [{"count": 3}, {}]})).await?;
    gray.patch("db", image_patch("db", "db:v2")).await?;
    gray.wait_status("db", "the first batch under way", |s| {
        s["rollout"]["members"]
            .as_array()
            .is_some_and(|m| !m.is_empty())
    })
    .await?;
    gray.operator.replica("a")?.process.kill().await;
    gray.operator.spawn("b", &[])?;
    gray.wait_status("db", "the rollout to complete after the restart", |s| {
        phase(s) == "Completed" && ready_count(s) == 6 && s["updatedReplicas"] == 6
    })
    .await?;
    let pods = gray.pods("db").await?;
    assert!(
        pods.values().all(|p| restarts(p) == 1),
        "no instance restarted twice: {:?}",
        pods.values().map(restarts).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
async fn two_replicas_only_the_leader_acts() -> Result<()> {
    let mut gray = Gray::start("gray-ha").await?;
    gray.operator.spawn("b", &[])?;
    gray.create_ready("ha", 3, "ha:v1", json!({"maxUnavailable": 1}))
        .await?;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = gray.env.api();
    let holder = leases
        .get(gray.env.namespace())
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .context("a leader")?;
    let events: Api<k8s_openapi::api::events::v1::Event> = gray.env.api();
    let reporters: BTreeSet<String> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("gantry-gray-upgrade"))
        .filter_map(|e| e.reporting_instance)
        .collect();
    if reporters != BTreeSet::from([holder.clone()]) {
        bail!("events came from {reporters:?}, but only the leader {holder} may act");
    }
    Ok(())
}

#[tokio::test]
async fn a_bad_plan_is_rejected_at_admission_and_harms_nothing() -> Result<()> {
    let gray = Gray::start("gray-reject").await?;
    gray.create_ready("ok", 3, "ok:v1", json!({"maxUnavailable": 1}))
        .await?;
    let before = identities(&gray.pods("ok").await?);
    let bad = json!({"spec": {"template": template("ok", "ok:v2", None), "update": {"maxUnavailable": 0, "batches": [{"instances": [1, 9]}]}}});
    let err = gray
        .patch("ok", bad)
        .await
        .expect_err("admission rejects the plan");
    let text = format!("{err:#}");
    assert!(text.contains("maxUnavailable must be at least 1"), "{text}");
    // Each rejection names its field and the offending value.
    assert!(
        text.contains("spec.update.batches")
            && text.contains("instance 9 is not an ordinal of this app (0..2)"),
        "{text}"
    );
    // Every state the pods take for a while after the rejection: none moved.
    let seen = wait::observe(
        &gray.env.api::<Pod>(),
        watcher::Config::default().labels("apps.gantry.dev/app=ok"),
        Duration::from_secs(3),
    )
    .await?;
    assert!(seen.len() >= 3, "the watch saw the pods: {}", seen.len());
    for pod in &seen {
        let name = pod.name_any();
        assert_eq!(
            Some(&(
                pod.uid().unwrap_or_default(),
                pod.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default()
            )),
            before.get(&name),
            "{name} is the same pod on the same node"
        );
        assert!(
            image_of(pod) == "ok:v1" && restarts(pod) == 0,
            "{name} was not touched"
        );
    }
    Ok(())
}
