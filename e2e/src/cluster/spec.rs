//! What a local cluster is made of: its name, its pools of simulated nodes (as Node objects),
//! scheduler extenders and audit logging.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};

use super::{KUBERNETES_VERSION, KWOK_NODE_LABEL};

/// A group of identical fake nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePool {
    /// Nodes are named `<prefix>-<index>`, index from 0.
    pub prefix: String,
    pub count: u32,
    /// Capacity (and allocatable) of each node: `cpu`, `memory`, `pods`, `ephemeral-storage`
    /// and any extended resource (`example.com/widget: "4"`).
    pub capacity: BTreeMap<String, String>,
    /// Extra labels for each node.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl NodePool {
    /// `count` nodes with 32 CPUs, 256 GiB memory, 110 pods and 1 TiB ephemeral storage.
    pub fn new(prefix: &str, count: u32) -> Self {
        let capacity = [
            ("cpu", "32"),
            ("memory", "256Gi"),
            ("pods", "110"),
            ("ephemeral-storage", "1Ti"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Self {
            prefix: prefix.to_owned(),
            count,
            capacity,
            labels: BTreeMap::new(),
        }
    }

    /// Sets one capacity entry (standard or extended resource).
    #[must_use]
    pub fn with_capacity(mut self, resource: &str, quantity: &str) -> Self {
        self.capacity
            .insert(resource.to_owned(), quantity.to_owned());
        self
    }

    #[must_use]
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }
}

/// Requests by ServiceAccounts, at Metadata level, once each (when complete).
pub(super) const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
- level: Metadata
  userGroups: [\"system:serviceaccounts\"]
- level: None
";

/// What to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Lower-case letters, digits and '-'; names the state directory.
    pub name: String,
    pub node_pools: Vec<NodePool>,
    /// Entries of the scheduler's `KubeSchedulerConfiguration.extenders` list, verbatim
    /// (`urlPrefix`, `filterVerb`, `managedResources`, ...). Extenders must listen on loopback.
    #[serde(default)]
    pub scheduler_extenders: Vec<serde_json::Value>,
    /// Write an audit log of every request made by a ServiceAccount to `logs/audit.log`
    /// (Metadata level): how benchmarks count an operator's API requests.
    #[serde(default)]
    pub audit_log: bool,
    /// Also run a real node (containerd, runc, the kubelet and kube-proxy) in a network
    /// namespace of its own, with a registry of the cluster's own; needs root and
    /// `make node-bins`. See [`super::node`].
    #[serde(default)]
    pub real_node: bool,
}

impl ClusterSpec {
    /// A cluster with three nodes `kwok-node-{0,1,2}` of the default size.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            node_pools: vec![NodePool::new("kwok-node", 3)],
            scheduler_extenders: Vec::new(),
            audit_log: false,
            real_node: false,
        }
    }

    /// The same cluster with a real node beside its kwok nodes.
    #[must_use]
    pub fn with_real_node(mut self) -> Self {
        self.real_node = true;
        self
    }

    pub fn node_count(&self) -> u32 {
        self.node_pools.iter().map(|p| p.count).sum()
    }
}

/// Whether a node's Ready condition is True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Node objects for a spec, status included (kwok leaves what the node was created with
/// and only reports it healthy).
pub fn node_objects(spec: &ClusterSpec) -> Result<Vec<Node>> {
    let mut nodes = Vec::new();
    let mut index: u32 = 0;
    for pool in &spec.node_pools {
        for i in 0..pool.count {
            let name = format!("{}-{i}", pool.prefix);
            // 10.<64 + index/256>.<index%256>.0/24 for pods; the node "addresses" are in
            // 172.20.0.0/14. Neither is ever dialled: nothing of these nodes is real.
            let (hi, lo) = (64 + index / 256, index % 256);
            if hi > 255 {
                bail!(
                    "too many nodes: at most {} fit the address plan",
                    (256 - 64) * 256
                );
            }
            let pod_cidr = format!("10.{hi}.{lo}.0/24");
            let n = index + 1;
            let node_ip = format!("172.{}.{}.{}", 20 + n / 65536, (n / 256) % 256, n % 256);
            let mut labels = serde_json::Map::new();
            for (k, v) in [
                (KWOK_NODE_LABEL.0, KWOK_NODE_LABEL.1),
                ("kubernetes.io/hostname", name.as_str()),
                ("kubernetes.io/os", "linux"),
                ("kubernetes.io/arch", "amd64"),
            ] {
                labels.insert(k.to_owned(), v.into());
            }
            for (k, v) in &pool.labels {
                labels.insert(k.clone(), v.clone().into());
            }
            let node: Node = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "annotations": {
                        "kwok.x-k8s.io/node": "fake",
                        "node.alpha.kubernetes.io/ttl": "0",
                    },
                },
                "spec": { "podCIDR": pod_cidr, "podCIDRs": [pod_cidr] },
                "status": {
                    "capacity": pool.capacity,
                    "allocatable": pool.capacity,
                    "addresses": [
                        { "type": "InternalIP", "address": node_ip },
                        { "type": "Hostname", "address": name },
                    ],
                    "nodeInfo": {
                        "architecture": "amd64",
                        "operatingSystem": "linux",
                        "kubeletVersion": KUBERNETES_VERSION,
                        "kubeProxyVersion": "",
                        "containerRuntimeVersion": "containerd://2.1.0",
                        "kernelVersion": "6.8.0-kwok",
                        "osImage": "kwok (simulated node)",
                        "machineID": "",
                        "systemUUID": "",
                        "bootID": "",
                    },
                    "phase": "Running",
                },
            }))?;
            nodes.push(node);
            index += 1;
        }
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_distinct_cidrs_addresses_and_the_pool_capacity() -> Result<()> {
        let spec = ClusterSpec {
            name: "t".into(),
            node_pools: vec![
                NodePool::new("a", 300).with_capacity("nvidia.com/gpu", "8"),
                NodePool::new("b", 2).with_label("zone", "z1"),
            ],
            scheduler_extenders: Vec::new(),
            audit_log: false,
            real_node: false,
        };
        let nodes = node_objects(&spec)?;
        assert_eq!(nodes.len(), 302);
        let cidrs: std::collections::BTreeSet<_> = nodes
            .iter()
            .filter_map(|n| n.spec.as_ref()?.pod_cidr.clone())
            .collect();
        assert_eq!(cidrs.len(), 302, "pod CIDRs must not overlap");
        let ips: std::collections::BTreeSet<_> = nodes
            .iter()
            .filter_map(|n| {
                Some(
                    n.status
                        .as_ref()?
                        .addresses
                        .as_ref()?
                        .first()?
                        .address
                        .clone(),
                )
            })
            .collect();
        assert_eq!(ips.len(), 302);
        let gpu = nodes[0]
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get("nvidia.com/gpu"));
        assert_eq!(gpu.map(|q| q.0.as_str()), Some("8"));
        let last = &nodes[301];
        assert_eq!(last.metadata.name.as_deref(), Some("b-1"));
        let labels = last.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("zone").map(String::as_str), Some("z1"));
        assert_eq!(
            labels.get(KWOK_NODE_LABEL.0).map(String::as_str),
            Some(KWOK_NODE_LABEL.1)
        );
        Ok(())
    }
}
