//! What every end-to-end test uses: the shared cluster, a fresh namespace per test, applying
//! manifests and CRDs, and wait helpers whose timeouts say what was expected and show the
//! objects and events involved.

use std::fmt::Debug;
use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::discovery::{self, Scope};
use kube::{Client, Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cluster::{Cluster, ClusterSpec, NodePool};

/// Names the shared test cluster (default `e2e`).
pub const CLUSTER_ENV: &str = "GANTRY_E2E_CLUSTER";
/// When set (to anything), test namespaces are not deleted, for inspection after a run.
pub const KEEP_NAMESPACES_ENV: &str = "GANTRY_E2E_KEEP_NAMESPACES";
/// Field manager for everything the harness applies.
pub const FIELD_MANAGER: &str = "gantry-e2e";
/// Extended resource every node of the shared test cluster has 4 of.
pub const TEST_EXTENDED_RESOURCE: &str = "example.com/widget";

/// GPUs as the GPU-sharing and gray-upgrade tests see them; every node of the shared test
/// cluster has 20 (enough for 25 instances holding 2 each).
pub const TEST_GPU_RESOURCE: &str = "nvidia.com/gpu";

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
                crate::operator::reap_orphans(&cluster);
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
        let cluster = shared_cluster()?;
        let client = cluster.client().await?;
        let ns = TestNamespace::create(&cluster, &client, prefix).await?;
        Ok(Self {
            cluster,
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
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        // A thread of its own with its own runtime: the test's runtime may be shutting down.
        let deleted = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let client = crate::cluster::client_from_kubeconfig(&kubeconfig).await?;
                Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::background())
                    .await?;
                Ok(())
            })
        })
        .join();
        if let Ok(Err(e)) = deleted {
            eprintln!("deleting namespace {}: {e:#}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// Polls `probe` every 250 ms until it yields `Some`; after `timeout`, fails with `what` and
/// the last error the probe returned.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= timeout {
            let detail = last_err
                .map(|e| format!("\nlast error: {e:#}"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{detail}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the named object exists and satisfies `cond`. On timeout the error shows the
/// object as last seen (YAML, without managed fields) and its events.
pub async fn wait_for_object<K, F>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: F,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    F: Fn(&K) -> bool,
{
    let start = Instant::now();
    let mut last: Option<K> = None;
    let mut last_err = None;
    loop {
        match api.get_opt(name).await {
            Ok(Some(obj)) if cond(&obj) => return Ok(obj),
            Ok(obj) => last = obj,
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let client = api.clone().into_client();
    let objects = match &last {
        Some(obj) => to_yaml(obj),
        None => format!("(no object named {name})\n"),
    };
    let namespace = last.as_ref().and_then(|o| o.meta().namespace.clone());
    let events = events_text(&client, namespace.as_deref(), &[name.to_owned()]).await;
    let context = namespace_summary(&client, namespace.as_deref()).await;
    let detail = last_err
        .map(|e| format!("\nlast error: {e}"))
        .unwrap_or_default();
    bail!(
        "timed out after {timeout:?} waiting for {what}{detail}\n--- object ---\n{objects}--- events ---\n{events}{context}"
    )
}

/// Waits until the objects matching `params` satisfy `cond` (which sees all of them). On
/// timeout the error shows every object as last seen and their events.
pub async fn wait_for_list<K, F>(
    api: &Api<K>,
    params: &ListParams,
    what: &str,
    timeout: Duration,
    cond: F,
) -> Result<Vec<K>>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    F: Fn(&[K]) -> bool,
{
    let start = Instant::now();
    let mut last: Vec<K> = Vec::new();
    let mut last_err = None;
    loop {
        match api.list(params).await {
            Ok(list) if cond(&list.items) => return Ok(list.items),
            Ok(list) => last = list.items,
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let client = api.clone().into_client();
    let objects: String = if last.is_empty() {
        "(none)\n".to_owned()
    } else {
        last.iter()
            .map(|o| format!("{}---\n", to_yaml(o)))
            .collect()
    };
    let namespace = last.first().and_then(|o| o.meta().namespace.clone());
    let names: Vec<String> = last.iter().map(|o| o.name_any()).collect();
    let events = if names.is_empty() {
        "(no objects)\n".to_owned()
    } else {
        events_text(&client, namespace.as_deref(), &names).await
    };
    let context = namespace_summary(&client, namespace.as_deref()).await;
    let detail = last_err
        .map(|e| format!("\nlast error: {e}"))
        .unwrap_or_default();
    bail!(
        "timed out after {timeout:?} waiting for {what}{detail}\n--- objects ---\n{objects}--- events ---\n{events}{context}"
    )
}

/// One line per pod of the namespace (phase, readiness, node, each container's image, restarts
/// and state) and the namespace's Warning events: what an operator's objects usually hinge on.
/// Empty without a namespace.
pub async fn namespace_summary(client: &Client, namespace: Option<&str>) -> String {
    let Some(ns) = namespace else {
        return String::new();
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut out = format!("--- pods in {ns} ---\n");
    match pods.list(&ListParams::default()).await {
        Ok(list) if list.items.is_empty() => out.push_str("(none)\n"),
        Ok(list) => {
            for pod in list.items.iter().take(100) {
                out.push_str(&pod_line(pod));
                out.push('\n');
            }
            if list.items.len() > 100 {
                out.push_str(&format!("... and {} more\n", list.items.len() - 100));
            }
        }
        Err(e) => out.push_str(&format!("(listing pods failed: {e})\n")),
    }
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let warnings = api
        .list(&ListParams::default().fields("type=Warning"))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    out.push_str(&format!("--- Warning events in {ns} ---\n"));
    if warnings.is_empty() {
        out.push_str("(none)\n");
    }
    for e in warnings.iter().rev().take(30).rev() {
        out.push_str(&format!(
            "{} {}/{}: {}\n",
            e.reason.as_deref().unwrap_or(""),
            e.involved_object.kind.as_deref().unwrap_or(""),
            e.involved_object.name.as_deref().unwrap_or(""),
            e.message.as_deref().unwrap_or("").trim(),
        ));
    }
    out
}

/// `name phase Ready=<status> node=<node> [container=image restarts=N ready=B state] ...`
pub fn pod_line(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map_or("-", |c| c.status.as_str());
    let mut line = format!(
        "{} {} Ready={ready} node={}",
        pod.name_any(),
        status.and_then(|s| s.phase.as_deref()).unwrap_or("-"),
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or("-"),
    );
    if pod.metadata.deletion_timestamp.is_some() {
        line.push_str(" (terminating)");
    }
    for c in status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
    {
        let state = match &c.state {
            Some(st) if st.running.is_some() => "running".to_owned(),
            Some(st) if st.terminated.is_some() => "terminated".to_owned(),
            Some(st) => st
                .waiting
                .as_ref()
                .and_then(|w| w.reason.clone())
                .unwrap_or_else(|| "waiting".to_owned()),
            None => "-".to_owned(),
        };
        line.push_str(&format!(
            " [{}={} restarts={} ready={} {state}]",
            c.name, c.image, c.restart_count, c.ready
        ));
    }
    line
}

/// Waits until the named object is gone.
pub async fn wait_for_deletion<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    wait_for_list(
        api,
        &ListParams::default().fields(&format!("metadata.name={name}")),
        &format!("{name} to be deleted"),
        timeout,
        |items| items.is_empty(),
    )
    .await
    .map(|_| ())
}

/// An object as YAML without `managedFields`.
pub fn to_yaml<K: Serialize>(obj: &K) -> String {
    let mut value = serde_json::to_value(obj).unwrap_or_default();
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    serde_yaml::to_string(&value).unwrap_or_else(|e| format!("(unprintable: {e})\n"))
}

/// Events about the named objects (all events of the namespace when `names` is empty), oldest
/// first, one per line.
pub async fn events_text(client: &Client, namespace: Option<&str>, names: &[String]) -> String {
    let api: Api<Event> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut events = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => return format!("(listing events failed: {e})\n"),
    };
    events.retain(|e| {
        names.is_empty()
            || e.involved_object
                .name
                .as_ref()
                .is_some_and(|n| names.contains(n))
    });
    events.sort_by_key(event_time);
    if events.is_empty() {
        return "(none)\n".to_owned();
    }
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {}/{}: {}\n",
                event_time(e).map(|t| t.to_string()).unwrap_or_default(),
                e.type_.as_deref().unwrap_or(""),
                e.reason.as_deref().unwrap_or(""),
                e.involved_object.kind.as_deref().unwrap_or(""),
                e.involved_object.name.as_deref().unwrap_or(""),
                e.message.as_deref().unwrap_or("").trim(),
            )
        })
        .collect()
}

fn event_time(e: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

// ---------------------------------------------------------------------------------------------
// Applying manifests

/// Server-side applies every document of a multi-document YAML stream (field manager
/// `gantry-e2e`, forced). Namespaced objects without a namespace go to `default_namespace`.
/// Returns the applied objects as the server returned them.
pub async fn apply_yaml(
    client: &Client,
    yaml: &str,
    default_namespace: Option<&str>,
) -> Result<Vec<DynamicObject>> {
    let mut applied = Vec::new();
    for obj in parse_yaml_documents(yaml)? {
        applied.push(apply_object(client, obj, default_namespace).await?);
    }
    Ok(applied)
}

/// Parses a multi-document YAML stream into objects, skipping empty documents.
pub fn parse_yaml_documents(yaml: &str) -> Result<Vec<DynamicObject>> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc).context("parsing YAML")?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject =
            serde_yaml::from_value(value).context("YAML document is not a Kubernetes object")?;
        out.push(obj);
    }
    Ok(out)
}

/// Server-side applies one object; see [`apply_yaml`].
pub async fn apply_object(
    client: &Client,
    mut obj: DynamicObject,
    default_namespace: Option<&str>,
) -> Result<DynamicObject> {
    let types = obj
        .types
        .clone()
        .context("object without apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(&types)?;
    let (resource, caps) = discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("looking up {}/{}", types.api_version, types.kind))?;
    let name = obj.name_any();
    let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
        let ns = obj
            .metadata
            .namespace
            .clone()
            .or_else(|| default_namespace.map(str::to_owned))
            .with_context(|| format!("{} {name} needs a namespace", types.kind))?;
        obj.metadata.namespace = Some(ns.clone());
        Api::namespaced_with(client.clone(), &ns, &resource)
    } else {
        obj.metadata.namespace = None;
        Api::all_with(client.clone(), &resource)
    };
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
    .with_context(|| format!("applying {} {name}", types.kind))
}

/// Applies every CustomResourceDefinition found in the `*.yaml`/`*.yml` files of `dir` and
/// waits until each is Established. Returns their names.
pub async fn install_crds(client: &Client, dir: &std::path::Path) -> Result<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading CRD directory {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut names = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for obj in parse_yaml_documents(&text).with_context(|| format!("in {}", file.display()))? {
            if obj
                .types
                .as_ref()
                .is_some_and(|t| t.kind == "CustomResourceDefinition")
            {
                names.push(apply_object(client, obj, None).await?.name_any());
            }
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in &names {
        wait_for_object(
            &crds,
            name,
            &format!("CRD {name} to be Established"),
            Duration::from_secs(30),
            |crd| {
                crd.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            },
        )
        .await?;
    }
    Ok(names)
}

/// An API for GrayApps (`apps.gantry.dev/v1alpha1`) as dynamic objects, so that the tests read
/// the operator's wire format rather than its Rust types.
pub fn grayapps(client: &Client, namespace: &str) -> Api<kube::api::DynamicObject> {
    let resource = kube::api::ApiResource {
        group: "apps.gantry.dev".into(),
        version: "v1alpha1".into(),
        api_version: "apps.gantry.dev/v1alpha1".into(),
        kind: "GrayApp".into(),
        plural: "grayapps".into(),
    };
    Api::namespaced_with(client.clone(), namespace, &resource)
}
