//! What every end-to-end test starts from: a cluster (the shared one, or any other), an admin
//! client made in the test's runtime, and a fresh namespace.

use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Resource};

use crate::cluster::{Cluster, ClusterSpec, NodePool};
use crate::process::HostProcesses;

/// Names the shared test cluster (default `e2e`).
pub const CLUSTER_ENV: &str = "GANTRY_E2E_CLUSTER";
/// When set (to anything), test namespaces are not deleted, for inspection after a run.
pub const KEEP_NAMESPACES_ENV: &str = "GANTRY_E2E_KEEP_NAMESPACES";
/// Extended resource every node of the shared test cluster has 4 of.
pub const TEST_EXTENDED_RESOURCE: &str = "example.com/widget";

/// GPUs as the GPU-sharing and gray-upgrade tests see them; every node of the shared test
/// cluster has 20 (enough for 25 instances holding 2 each).
pub const TEST_GPU_RESOURCE: &str = "nvidia.com/gpu";

/// A second cluster for tests that span two (the shared one being the first): two nodes
/// `remote-node-{0,1}`.
pub fn remote_cluster_spec() -> ClusterSpec {
    let mut spec = ClusterSpec::new(&format!("{}-remote", test_cluster_spec().name));
    spec.node_pools = vec![NodePool::new("remote-node", 2)];
    spec
}

/// The spec of the shared test cluster: three nodes `kwok-node-{0,1,2}`, each with
/// 32 CPUs, 256 GiB, 110 pods, 4 `example.com/widget` and 20 `nvidia.com/gpu`.
pub fn test_cluster_spec() -> ClusterSpec {
    let name = std::env::var(CLUSTER_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "e2e".into());
    ClusterSpec {
        name,
        node_pools: vec![
            NodePool::new("kwok-node", 3)
                .with_capacity(TEST_EXTENDED_RESOURCE, "4")
                .with_capacity(TEST_GPU_RESOURCE, "20"),
        ],
        scheduler_extenders: Vec::new(),
        audit_log: false,
        real_node: false,
    }
}

/// The cluster all tests of this process share: started on first use (or reused when one of
/// that name is already up), never stopped by the tests (`make test-e2e` and
/// `make cluster-down` do that).
pub fn shared_cluster() -> Result<Cluster> {
    static SHARED: OnceLock<std::result::Result<Cluster, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            init_tracing();
            // Its own thread and runtime: tests call this from inside their own runtimes.
            std::thread::spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let cluster = runtime
                    .block_on(Cluster::up(&test_cluster_spec()))
                    .map_err(|e| format!("{e:#}"))?;
                HostProcesses::of(&cluster.state_dir).stop(false);
                Ok(cluster)
            })
            .join()
            .unwrap_or_else(|_| Err("starting the test cluster panicked".to_owned()))
        })
        .clone()
        .map_err(|e| anyhow!("the shared test cluster is not available: {e}"))
}

/// Logs to the test output, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "info,kube_client::client::builder=off,kube_client::client::tls=error",
            )
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A test's view of the world: the shared cluster, an admin client made in the test's runtime
/// and a fresh namespace.
pub struct TestEnv {
    pub cluster: Cluster,
    pub client: Client,
    pub ns: TestNamespace,
}

impl TestEnv {
    /// Starts or reuses the shared cluster and creates a namespace `e2e-<prefix>-<random>`.
    pub async fn new(prefix: &str) -> Result<Self> {
        Self::on(&shared_cluster()?, prefix).await
    }

    /// A namespace `e2e-<prefix>-<random>` on `cluster`, any running cluster: a second
    /// cluster, or one with other nodes.
    pub async fn on(cluster: &Cluster, prefix: &str) -> Result<Self> {
        let client = cluster.client().await?;
        let ns = TestNamespace::create(cluster, &client, prefix).await?;
        Ok(Self {
            cluster: cluster.clone(),
            client,
            ns,
        })
    }

    /// The test namespace's name.
    pub fn namespace(&self) -> &str {
        &self.ns.name
    }

    /// An API for namespaced objects in the test namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }
}

/// A namespace for one test, deleted when dropped (unless `GANTRY_E2E_KEEP_NAMESPACES` is
/// set). It carries the label `e2e.gantry.dev/test=<prefix>`.
pub struct TestNamespace {
    pub name: String,
    kubeconfig: std::path::PathBuf,
}

impl TestNamespace {
    pub async fn create(cluster: &Cluster, client: &Client, prefix: &str) -> Result<Self> {
        let suffix: String = {
            use rand::Rng as _;
            let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
            let mut rng = rand::rng();
            (0..6)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
                .collect()
        };
        let name = format!("e2e-{prefix}-{suffix}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "e2e.gantry.dev/test": prefix } }
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(Self {
            name,
            kubeconfig: cluster.kubeconfig().to_owned(),
        })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_NAMESPACES_ENV).is_some() {
            eprintln!(
                "keeping namespace {} ({KEEP_NAMESPACES_ENV} is set)",
                self.name
            );
            return;
        }
        crate::cluster::delete_on_the_side(
            &self.kubeconfig,
            &self.name,
            Api::<Namespace>::all,
            DeleteParams::background(),
        );
    }
}

/// A pod named `name` with one container `app` running `image`, plus `spec` (merged into the
/// pod's spec: `nodeName`, `readinessGates`, resources, ...).
pub fn pod(
    name: &str,
    image: &str,
    spec: serde_json::Value,
) -> Result<k8s_openapi::api::core::v1::Pod> {
    let mut full = serde_json::json!({ "containers": [{ "name": "app", "image": image }] });
    if let (Some(full), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        full.extend(extra.clone());
    }
    Ok(serde_json::from_value(
        serde_json::json!({ "metadata": { "name": name }, "spec": full }),
    )?)
}
