//! The scheduler extender hook: a cluster of its own whose kube-scheduler calls an HTTPS
//! extender served by the test (as the GPU-sharing scheduler extender will be).

use std::time::Duration;

use anyhow::{Result, ensure};
use gantry_e2e::testing::init_tracing;
use gantry_e2e::wait;
use gantry_e2e::webhook::{HttpsServer, Response};
use gantry_e2e::{Cluster, ClusterSpec, NodePool};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

#[tokio::test]
async fn scheduler_consults_the_configured_extender() -> Result<()> {
    init_tracing();
    const CHOSEN: &str = "kwok-node-1";
    let server = {
        // Filter: only CHOSEN may take pods. With nodeCacheCapable the scheduler sends node
        // names only (ExtenderArgs.NodeNames) and reads ExtenderFilterResult.NodeNames back.
        HttpsServer::start(move |request| async move {
            let args: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
            let names: Vec<String> = args["NodeNames"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let (keep, drop): (Vec<String>, Vec<String>) =
                names.into_iter().partition(|n| n == CHOSEN);
            let failed: serde_json::Map<String, serde_json::Value> = drop
                .into_iter()
                .map(|n| (n, json!("filtered out by the e2e extender")))
                .collect();
            Response::json(&json!({ "NodeNames": keep, "FailedNodes": failed, "Error": "" }))
        })
        .await?
    };

    let spec = ClusterSpec {
        name: "e2e-extender".to_owned(),
        node_pools: vec![NodePool::new("kwok-node", 3)],
        scheduler_extenders: vec![json!({
            "urlPrefix": server.url(""),
            "filterVerb": "filter",
            "enableHTTPS": true,
            "tlsConfig": { "caData": serde_json::to_value(ByteString(server.ca_pem().as_bytes().to_vec()))? },
            "nodeCacheCapable": true,
            "httpTimeout": "5s",
        })],
        audit_log: false,
        real_node: false,
    };
    let cluster = Cluster::up_temporary(&spec).await?;
    let client = cluster.client().await?;

    let pods: Api<Pod> = Api::namespaced(client, "default");
    for i in 0..3 {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": format!("placed-{i}") },
            "spec": { "containers": [{ "name": "app", "image": "registry.example/app:v1" }] },
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    for i in 0..3 {
        let placed = wait::for_object(
            &pods,
            &format!("placed-{i}"),
            "the pod to run",
            Duration::from_secs(60),
            |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"),
        )
        .await?;
        let node = placed.spec.and_then(|s| s.node_name).unwrap_or_default();
        ensure!(
            node == CHOSEN,
            "pod placed-{i} landed on {node}, not on the extender's choice {CHOSEN}"
        );
    }
    ensure!(
        server.requests() >= 3,
        "extender called {} times",
        server.requests()
    );
    Ok(())
}
