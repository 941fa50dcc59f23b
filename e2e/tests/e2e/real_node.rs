//! The real node: containerd, runc, the kubelet and kube-proxy in a network namespace of their
//! own beside the kwok nodes, pulling from the cluster's registry; and that taking the cluster
//! down leaves nothing of it on the machine.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gantry_e2e::cluster::node::{self, REAL_NODE_LABEL, REAL_NODE_NAME, REAL_NODE_TAINT};
use gantry_e2e::testing::{TestEnv, init_tracing, pod};
use gantry_e2e::{Cluster, ClusterSpec, NodePool, poll, process, wait};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);

/// What a pod needs to land on the real node: its selector and the taint's toleration.
fn on_the_real_node() -> serde_json::Value {
    json!({
        "nodeSelector": { REAL_NODE_LABEL.0: REAL_NODE_LABEL.1 },
        "tolerations": [{ "key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule" }],
        "terminationGracePeriodSeconds": 5,
    })
}

fn running_and_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn check_node(node: &Node, network: &node::NodeNetwork) -> Result<()> {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels.get(REAL_NODE_LABEL.0).map(String::as_str) == Some(REAL_NODE_LABEL.1)
            && !labels.contains_key("type"),
        "the real node carries the real label and not kwok's: {labels:?}"
    );
    let spec = node.spec.clone().unwrap_or_default();
    ensure!(
        spec.taints
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == REAL_NODE_TAINT && t.effect == "NoSchedule"),
        "the real node is tainted {REAL_NODE_TAINT}"
    );
    let status = node.status.clone().unwrap_or_default();
    let ip = network.node_ip().to_string();
    ensure!(
        status
            .addresses
            .unwrap_or_default()
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == ip),
        "the node's InternalIP is {ip}"
    );
    let info = status.node_info.context("nodeInfo")?;
    ensure!(
        info.kubelet_version == gantry_e2e::cluster::KUBERNETES_VERSION
            && info
                .container_runtime_version
                .starts_with("containerd://2."),
        "a real kubelet {} on containerd 2: {info:?}",
        gantry_e2e::cluster::KUBERNETES_VERSION
    );
    Ok(())
}

/// What a real node could leave on the machine, as a list of findings (empty: nothing).
fn leftovers(cluster: &str, state_dir: &Path, network: &node::NodeNetwork) -> Vec<String> {
    let mut found = Vec::new();
    let netns = Path::new("/run/netns").join(format!("gantry-{cluster}"));
    if netns.exists() {
        found.push(format!("network namespace {}", netns.display()));
    }
    for hierarchy in ["pids", "memory", "cpu", "cpuset", "systemd", "unified"] {
        let dir = Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join(format!("gantry-{cluster}"));
        if dir.exists() {
            found.push(format!("cgroup {}", dir.display()));
        }
    }
    if state_dir.exists() {
        found.push(format!("state directory {}", state_dir.display()));
    }
    let marker = state_dir.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    found.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&marker))
            .map(|l| format!("mount {l}")),
    );
    if let Ok(read) = std::fs::read_dir("/proc") {
        for entry in read.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if process::cmdline(pid).is_some_and(|c| c.contains(&marker)) {
                found.push(format!("process {pid}: {:?}", process::cmdline(pid)));
            }
        }
    }
    let host_ip = format!("inet {}/", network.host_ip());
    let addresses = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if addresses.contains(&host_ip) {
        found.push(format!("host address {}", network.host_ip()));
    }
    found
}

#[tokio::test]
async fn a_real_node_joins_runs_pods_from_the_registry_and_leaves_nothing_behind() -> Result<()> {
    init_tracing();
    let mut spec = ClusterSpec::new("e2e-node").with_real_node();
    spec.node_pools = vec![NodePool::new("kwok-node", 1)];
    let cluster = Cluster::up_temporary(&spec).await?;
    let info = cluster
        .info
        .real_node
        .clone()
        .context("the cluster has no real node")?;
    eprintln!(
        "real node Ready {:.1} s after containerd started",
        info.ready_seconds
    );
    let client = cluster.client().await?;
    let node = Api::<Node>::all(client.clone()).get(REAL_NODE_NAME).await?;
    check_node(&node, &info.network)?;

    // kube-proxy's rules send the kubernetes Service's ClusterIP to the API server (once it
    // has synced them: a connection made before keeps its un-translated conntrack entry, so
    // each try is a new connection).
    let netns = format!("--net=/run/netns/{}", info.network.netns);
    poll::until(
        "the kubernetes Service to answer from the node",
        TIMEOUT,
        || {
            let netns = netns.clone();
            async move {
                let out = tokio::process::Command::new("nsenter")
                    .arg(netns)
                    .args([
                        "--",
                        "curl",
                        "-sk",
                        "--max-time",
                        "2",
                        "https://10.96.0.1/readyz",
                    ])
                    .output()
                    .await?;
                Ok((String::from_utf8_lossy(&out.stdout).trim() == "ok").then_some(()))
            }
        },
    )
    .await?;

    let env = TestEnv::on(&cluster, "real-node").await?;
    let pods = env.api::<Pod>();
    let image = node::pause_image(&info.registry);
    pods.create(
        &PostParams::default(),
        &pod("sandbox", &image, on_the_real_node())?,
    )
    .await?;
    let running = wait::for_object(
        &pods,
        "sandbox",
        "the pod Running and Ready",
        TIMEOUT,
        running_and_ready,
    )
    .await?;
    let status = running.status.clone().unwrap_or_default();
    let pod_ip = status.pod_ip.clone().unwrap_or_default();
    let prefix = format!("10.244.{}.", info.network.index);
    ensure!(
        pod_ip.starts_with(&prefix),
        "pod IP {pod_ip} is in {}",
        info.network.pod_cidr()
    );
    let container = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .next()
        .context("a container status")?;
    ensure!(
        container
            .container_id
            .as_deref()
            .is_some_and(|id| id.starts_with("containerd://"))
            && container.image_id.contains("@sha256:"),
        "a container run by containerd from an image with a digest: {container:?}"
    );
    pods.delete("sandbox", &DeleteParams::default()).await?;
    wait::for_deletion(&pods, "sandbox", TIMEOUT).await?;
    drop(env);

    let (name, state_dir) = (cluster.name.clone(), cluster.state_dir.clone());
    drop(cluster);
    let found = leftovers(&name, &state_dir, &info.network);
    ensure!(found.is_empty(), "taking the cluster down left: {found:#?}");
    Ok(())
}
