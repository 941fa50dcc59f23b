//! Operators under test: an operator binary on the host with the identity its Helm chart gives
//! it (the chart is rendered with `helm template`, its ServiceAccount and RBAC applied, and the
//! operator gets a kubeconfig holding a token for that ServiceAccount, so a rule missing from
//! the chart fails the test), started through one fixture by every test and benchmark.
//!
//! ```ignore
//! let operator = Fixture::new(&env, operator::NOOP)
//!     .replicas(2)
//!     .flag("--probes")
//!     .start()
//!     .await?;
//! let leader = operator.replicas()[0].is_leader().await;
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DynamicObject, PostParams};
use kube::{Client, ResourceExt as _};

use crate::bins::{repo_root, workspace_binary};
use crate::cluster::{Cluster, KubeconfigUser, write_kubeconfig};
use crate::manifest::{apply_object, helm_template, install_crd_file, parse_yaml_documents};
use crate::process::{self, HostProcesses};
use crate::testing::TestEnv;

/// What the repository holds of one operator: its chart, its binary, its CRDs.
#[derive(Clone, Copy, Debug)]
pub struct OperatorSpec {
    /// The chart under `charts/`.
    pub chart: &'static str,
    pub package: &'static str,
    pub binary: &'static str,
    /// The CRD file under `crds/` (without `.yaml`), if the operator has CRDs.
    pub crds: Option<&'static str>,
}

pub const GRAY_UPGRADE: OperatorSpec = OperatorSpec {
    chart: "gray-upgrade",
    package: "gantry-gray-upgrade",
    binary: "gantry-gray-upgrade",
    crds: Some("gray-upgrade"),
};

/// The kit's probe operator.
pub const NOOP: OperatorSpec = OperatorSpec {
    chart: "noop",
    package: "gantry-kit",
    binary: "gantry-noop",
    crds: Some("noop"),
};

impl OperatorSpec {
    pub fn chart_dir(&self) -> PathBuf {
        repo_root().join("charts").join(self.chart)
    }

    pub fn crd_file(&self) -> Option<PathBuf> {
        self.crds
            .map(|stem| repo_root().join("crds").join(format!("{stem}.yaml")))
    }
}

/// How to start an operator for a test: the chart values its identity is rendered with, its
/// flags, its replicas.
pub struct Fixture {
    spec: OperatorSpec,
    cluster: Cluster,
    client: Client,
    namespace: String,
    values: Vec<(String, String)>,
    flags: Vec<String>,
    replicas: Vec<(String, Vec<String>)>,
    leader_elect: Option<bool>,
    release_build: bool,
    binary: Option<PathBuf>,
}

impl Fixture {
    /// One replica in the test's namespace; the chart's cluster-scoped RBAC is named after the
    /// namespace, so tests running side by side do not share it.
    pub fn new(env: &TestEnv, spec: OperatorSpec) -> Self {
        Self::in_namespace(&env.cluster, &env.client, env.namespace(), spec)
    }

    /// As [`Fixture::new`], for a namespace of a cluster that is not a [`TestEnv`]'s.
    pub fn in_namespace(
        cluster: &Cluster,
        client: &Client,
        namespace: &str,
        spec: OperatorSpec,
    ) -> Self {
        Self {
            spec,
            cluster: cluster.clone(),
            client: client.clone(),
            namespace: namespace.to_owned(),
            values: vec![("fullnameOverride".into(), namespace.to_owned())],
            flags: Vec::new(),
            replicas: vec![("a".into(), Vec::new())],
            leader_elect: None,
            release_build: false,
            binary: None,
        }
    }

    /// A chart value (`--set key=value`) to render the operator's identity with.
    #[must_use]
    pub fn value(mut self, key: &str, value: &str) -> Self {
        self.values.push((key.to_owned(), value.to_owned()));
        self
    }

    /// A flag every replica gets.
    #[must_use]
    pub fn flag(mut self, flag: impl Into<String>) -> Self {
        self.flags.push(flag.into());
        self
    }

    /// Watch only the test's namespace, with the chart's namespaced RBAC.
    #[must_use]
    pub fn watch_namespace(self) -> Self {
        let namespace = self.namespace.clone();
        self.value("watchNamespace", &namespace)
            .flag(format!("--namespace={namespace}"))
    }

    /// `count` replicas named `a`, `b`, ...; leader election is on with more than one.
    #[must_use]
    pub fn replicas(mut self, count: usize) -> Self {
        self.replicas = (0..count).map(|i| (replica_name(i), Vec::new())).collect();
        self
    }

    /// One replica per node, named after it and started with `--node-name`: a node agent.
    #[must_use]
    pub fn per_node(mut self, nodes: &[&str]) -> Self {
        self.replicas = nodes
            .iter()
            .map(|n| ((*n).to_owned(), vec![format!("--node-name={n}")]))
            .collect();
        self.leader_elect = Some(false);
        self
    }

    /// Leader election on or off whatever the replica count.
    #[must_use]
    pub fn leader_elect(mut self, on: bool) -> Self {
        self.leader_elect = Some(on);
        self
    }

    /// Run a release build (benchmarks).
    #[must_use]
    pub fn release_build(mut self) -> Self {
        self.release_build = true;
        self
    }

    /// Run this build of the operator instead of one made with cargo.
    #[must_use]
    pub fn binary(mut self, path: PathBuf) -> Self {
        self.binary = Some(path);
        self
    }

    /// Installs the CRDs, applies the chart's identity and starts the replicas.
    pub async fn start(self) -> Result<Operator> {
        if let Some(file) = self.spec.crd_file() {
            install_crd_file(&self.client, &file).await?;
        }
        let leader_elect = self.leader_elect.unwrap_or(self.replicas.len() > 1);
        let mut values = self.values.clone();
        values.push(("replicas".into(), self.replicas.len().max(1).to_string()));
        if leader_elect {
            values.push(("leaderElection.enabled".into(), "true".into()));
        }
        let identity = identity_from_chart(
            &self.cluster,
            &self.client,
            &self.spec.chart_dir(),
            &self.namespace,
            &self.namespace,
            &values,
            None,
        )
        .await?;
        let binary = match &self.binary {
            Some(path) => path.clone(),
            None => workspace_binary(self.spec.package, self.spec.binary, self.release_build)?,
        };
        let mut flags = self.flags.clone();
        if leader_elect {
            flags.extend([
                "--leader-elect".to_owned(),
                format!("--lease-name={}", self.namespace),
                format!("--lease-namespace={}", self.namespace),
            ]);
        }
        let mut operator = Operator {
            spec: self.spec,
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            identity,
            binary,
            flags,
            replicas: Vec::new(),
            started: std::collections::HashMap::new(),
        };
        for (name, extra) in &self.replicas {
            operator.spawn(name, extra)?;
        }
        Ok(operator)
    }
}

fn replica_name(index: usize) -> String {
    let letters = "abcdefghijklmnopqrstuvwxyz";
    letters
        .get(index..=index)
        .map_or_else(|| format!("r{index}"), str::to_owned)
}

/// A started operator: its identity and its replicas, each a host process.
pub struct Operator {
    spec: OperatorSpec,
    cluster: Cluster,
    namespace: String,
    identity: ChartIdentity,
    binary: PathBuf,
    flags: Vec<String>,
    replicas: Vec<Replica>,
    /// How many processes were started per replica name: each gets a log of its own.
    started: std::collections::HashMap<String, u32>,
}

impl Operator {
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// The replica named `name`.
    pub fn replica(&self, name: &str) -> Result<&Replica> {
        self.replicas
            .iter()
            .find(|r| r.name == name)
            .with_context(|| format!("no replica {name}"))
    }

    /// The kubeconfig of the operator's ServiceAccount.
    pub fn kubeconfig(&self) -> &Path {
        &self.identity.kubeconfig
    }

    pub fn identity(&self) -> &ChartIdentity {
        &self.identity
    }

    /// The Lease the replicas elect a leader on (in the test's namespace).
    pub fn lease_name(&self) -> &str {
        &self.namespace
    }

    /// Starts one more replica named `name` (an identity in the Lease and in events) with the
    /// fixture's flags and `extra`.
    pub fn spawn(&mut self, name: &str, extra: &[String]) -> Result<&Replica> {
        let metrics = free_addr()?;
        let health = free_addr()?;
        let mut args: Vec<String> = vec![
            "run".into(),
            format!("--metrics-addr={metrics}"),
            format!("--health-addr={health}"),
            format!("--identity={name}"),
            "--log-format=json".into(),
        ];
        args.extend(self.flags.iter().cloned());
        args.extend(extra.iter().cloned());
        let run = self.started.entry(name.to_owned()).or_insert(0);
        *run += 1;
        let process_name = match *run {
            1 => format!("{}-{}-{name}", self.namespace, self.spec.binary),
            n => format!("{}-{}-{name}-{n}", self.namespace, self.spec.binary),
        };
        let process = OperatorProcess::spawn(
            &self.cluster,
            &process_name,
            &self.binary,
            &args,
            &self.identity.kubeconfig,
            &[("POD_NAMESPACE", self.namespace.as_str())],
        )?;
        self.replicas.push(Replica {
            name: name.to_owned(),
            metrics,
            health,
            process,
        });
        self.replicas.last().context("the replica just started")
    }

    /// Takes a replica out (to kill or stop it and perhaps start it again).
    pub fn remove(&mut self, name: &str) -> Option<Replica> {
        let index = self.replicas.iter().position(|r| r.name == name)?;
        Some(self.replicas.remove(index))
    }
}

/// An address on 127.0.0.1 whose port was free a moment ago, for a replica to listen on.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One replica of an operator under test.
pub struct Replica {
    pub name: String,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub process: OperatorProcess,
}

impl Replica {
    /// The replica's `/metrics` text.
    pub async fn metrics_text(&self) -> Result<String> {
        let (status, body) = crate::http::get(&self.metrics.to_string(), "/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }

    /// The sum of every sample of the metric `name` (all label sets), if the replica answers.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics_text().await.ok()?;
        let samples: Vec<f64> = text
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
            .collect();
        (!samples.is_empty()).then(|| samples.iter().sum())
    }

    /// `gantry_leader_is_leader`; `None` while the replica does not answer.
    pub async fn is_leader(&self) -> Option<bool> {
        self.metric("gantry_leader_is_leader")
            .await
            .map(|v| v >= 1.0)
    }

    /// `/readyz?verbose`: its status and report, if the replica answers.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        crate::http::get(&self.health.to_string(), "/readyz?verbose")
            .await
            .ok()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// The identity a chart gives its operator, applied to the cluster.
#[derive(Clone, Debug)]
pub struct ChartIdentity {
    pub namespace: String,
    pub service_account: String,
    /// A kubeconfig authenticating as `system:serviceaccount:<namespace>:<service_account>`,
    /// with the namespace as its default.
    pub kubeconfig: PathBuf,
    /// Everything the chart rendered (applied or not).
    pub rendered: Vec<DynamicObject>,
}

/// Kinds of a rendered chart applied to give the operator its identity.
const IDENTITY_KINDS: &[&str] = &[
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
];

/// Renders `chart` as release `release` in `namespace`, applies its ServiceAccount, Roles,
/// ClusterRoles and bindings, and writes a kubeconfig for its ServiceAccount (the only one, or
/// the one named `service_account`). Cluster-scoped RBAC is named after the release, so use a
/// release name unique to the test when several tests install the same chart.
pub async fn identity_from_chart(
    cluster: &Cluster,
    client: &Client,
    chart: &Path,
    release: &str,
    namespace: &str,
    set: &[(String, String)],
    service_account: Option<&str>,
) -> Result<ChartIdentity> {
    let rendered = parse_yaml_documents(&helm_template(chart, release, namespace, set)?)?;
    let kind = |o: &DynamicObject| o.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default();
    let accounts: Vec<String> = rendered
        .iter()
        .filter(|o| kind(o) == "ServiceAccount")
        .map(|o| o.name_any())
        .collect();
    let account = match service_account {
        Some(name) if accounts.iter().any(|a| a == name) => name.to_owned(),
        Some(name) => bail!(
            "chart {} renders no ServiceAccount {name:?} (it has {accounts:?})",
            chart.display()
        ),
        None => match accounts.as_slice() {
            [one] => one.clone(),
            _ => bail!(
                "chart {} renders {} ServiceAccounts {accounts:?}; name the operator's",
                chart.display(),
                accounts.len()
            ),
        },
    };
    for obj in rendered
        .iter()
        .filter(|o| IDENTITY_KINDS.contains(&kind(o).as_str()))
    {
        apply_object(client, obj.clone(), Some(namespace)).await?;
    }
    let token =
        service_account_token(client, namespace, &account, Duration::from_secs(24 * 3600)).await?;
    let kubeconfig = cluster
        .scratch_dir(namespace)?
        .join(format!("{account}.kubeconfig"));
    write_kubeconfig(
        &kubeconfig,
        &format!("{namespace}-{account}"),
        cluster.server(),
        &cluster.ca_cert_path(),
        KubeconfigUser::Token(&token),
        Some(namespace),
    )?;
    Ok(ChartIdentity {
        namespace: namespace.to_owned(),
        service_account: account,
        kubeconfig,
        rendered,
    })
}

/// A token for a ServiceAccount from the TokenRequest API.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    name: &str,
    validity: Duration,
) -> Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(i64::try_from(validity.as_secs()).unwrap_or(i64::MAX)),
            ..Default::default()
        },
        ..Default::default()
    };
    let response: TokenRequest = api
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?;
    response
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .context("TokenRequest returned no token")
}

/// An operator (or any program) running on the host in its own process group, stopped when
/// dropped. Its output goes to a log file under the cluster state directory.
pub struct OperatorProcess {
    name: String,
    pid: u32,
    log: PathBuf,
    pid_file: PathBuf,
}

impl OperatorProcess {
    /// Starts `binary args...` with `KUBECONFIG=kubeconfig`. `name` names its log and pid file
    /// (unique per cluster, e.g. `<namespace>-<instance>`).
    pub fn spawn(
        cluster: &Cluster,
        name: &str,
        binary: &Path,
        args: &[String],
        kubeconfig: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut cmd = Command::new(binary);
        cmd.args(args).env("KUBECONFIG", kubeconfig);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let started = HostProcesses::of(&cluster.state_dir)
            .spawn(name, &mut cmd)
            .with_context(|| format!("starting {} (is it built?)", binary.display()))?;
        Ok(Self {
            name: name.to_owned(),
            pid: started.pid,
            log: started.log,
            pid_file: started.pid_file,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn is_running(&self) -> bool {
        process::alive(self.pid)
    }

    /// Path of its combined stdout/stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits up to `grace` for it to exit (SIGKILL after that). Returns whether it
    /// exited on its own within `grace`.
    pub async fn terminate(&self, grace: Duration) -> bool {
        process::signal_group(self.pid, libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while self.is_running() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let exited = !self.is_running();
        if !exited {
            process::stop_group(self.pid, Duration::ZERO);
        }
        exited
    }

    /// SIGKILL: no chance to clean up (a crash).
    pub async fn kill(&self) {
        process::signal_group(self.pid, libc::SIGKILL);
        while self.is_running() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if self.is_running() {
            process::stop_group(self.pid, Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}
