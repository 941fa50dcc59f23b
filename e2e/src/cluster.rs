//! The cluster launcher: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
//! kwok as host processes on loopback, with generated TLS and kwok-simulated nodes.
//!
//! A cluster is named; its state (certificates, kubeconfigs, etcd data, logs, pid files) lives
//! in `<cache>/clusters/<name>/`. [`Cluster::up`] reuses a healthy cluster of the same name
//! and spec, and otherwise reaps whatever an earlier run left there and starts afresh.
//! [`Cluster::down`] stops every process and removes the state.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::{Deserialize, Serialize};

use crate::bins::{Binaries, cache_dir};
use crate::pki::{self, Ca};
use crate::process::{self, FileLock, PidDir};

/// The Kubernetes version the binaries are built from (e2e/cluster/go.mod); reported as the
/// fake nodes' kubelet version.
pub const KUBERNETES_VERSION: &str = "v1.34.4";

/// Label that marks the nodes kwok manages.
pub const KWOK_NODE_LABEL: (&str, &str) = ("type", "kwok");

/// Components in the order they are stopped.
const STOP_ORDER: &[&str] = &[
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
];

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
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
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
}

impl ClusterSpec {
    /// A cluster with three nodes `kwok-node-{0,1,2}` of the default size.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            node_pools: vec![NodePool::new("kwok-node", 3)],
            scheduler_extenders: Vec::new(),
            audit_log: false,
        }
    }

    pub fn node_count(&self) -> u32 {
        self.node_pools.iter().map(|p| p.count).sum()
    }
}

/// What a running cluster recorded about itself (`cluster.json` in its state directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub spec: ClusterSpec,
    /// `https://127.0.0.1:<port>`
    pub server: String,
    /// `http://127.0.0.1:<port>`
    pub etcd: String,
    pub controller_manager_port: u16,
    pub scheduler_port: u16,
    pub kubeconfig: PathBuf,
    /// Seconds the last `up` took to bring the cluster up from nothing.
    pub startup_seconds: f64,
}

/// A handle on a running cluster. Dropping it leaves the cluster running; see
/// [`Cluster::down`].
#[derive(Clone, Debug)]
pub struct Cluster {
    pub name: String,
    pub state_dir: PathBuf,
    pub info: ClusterInfo,
    pub bins: Binaries,
}

/// Directory that holds every cluster's state directory.
pub fn clusters_dir() -> PathBuf {
    cache_dir().join("clusters")
}

fn state_dir_of(name: &str) -> PathBuf {
    clusters_dir().join(name)
}

fn lock_path(name: &str) -> PathBuf {
    clusters_dir().join(format!(".{name}.lock"))
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !ok {
        bail!("cluster name {name:?} must be 1-40 characters of a-z, 0-9 and '-'");
    }
    Ok(())
}

impl Cluster {
    /// Brings the cluster up, or reuses it when one of that name with the same spec is already
    /// running and healthy. Safe to call from several processes at once (they serialise on a
    /// lock file).
    pub async fn up(spec: &ClusterSpec) -> Result<Cluster> {
        validate_name(&spec.name)?;
        let bins = Binaries::locate()?;
        let _lock = FileLock::acquire(&lock_path(&spec.name))?;
        let dir = state_dir_of(&spec.name);
        if let Some(existing) = Self::load_unlocked(&spec.name, bins.clone())? {
            if existing.info.spec == *spec {
                match existing.check_health().await {
                    Ok(()) => {
                        tracing::info!(cluster = %spec.name, "reusing running cluster");
                        return Ok(existing);
                    }
                    Err(e) => {
                        tracing::warn!(cluster = %spec.name, "existing cluster unhealthy, restarting: {e:#}");
                    }
                }
            } else {
                tracing::warn!(cluster = %spec.name, "existing cluster has another spec, restarting");
            }
        }
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            teardown(&dir)?;
            match start(spec, &dir, &bins, started).await {
                Ok(cluster) => return Ok(cluster),
                Err(e) => {
                    let logs = log_tails(&dir);
                    // Ports are picked free and handed over; another cluster starting at the
                    // same moment can take one first. That is worth another try.
                    if attempt < 3 && logs.contains("address already in use") {
                        tracing::warn!(cluster = %spec.name, attempt, "a port was taken meanwhile; starting again");
                        attempt += 1;
                        continue;
                    }
                    if std::env::var_os("GANTRY_KEEP_FAILED_CLUSTER").is_none() {
                        let _ = teardown(&dir);
                    }
                    return Err(e.context(format!("starting cluster {:?}{logs}", spec.name)));
                }
            }
        }
    }

    /// The running cluster of that name, if its state says it finished starting.
    pub fn load(name: &str) -> Result<Option<Cluster>> {
        validate_name(name)?;
        let bins = Binaries::locate()?;
        let _lock = FileLock::acquire(&lock_path(name))?;
        Self::load_unlocked(name, bins)
    }

    fn load_unlocked(name: &str, bins: Binaries) -> Result<Option<Cluster>> {
        let dir = state_dir_of(name);
        let path = dir.join("cluster.json");
        let Ok(raw) = std::fs::read(&path) else {
            return Ok(None);
        };
        let Ok(info) = serde_json::from_slice::<ClusterInfo>(&raw) else {
            return Ok(None);
        };
        Ok(Some(Cluster {
            name: name.to_owned(),
            state_dir: dir,
            info,
            bins,
        }))
    }

    /// Stops every process of the named cluster (also those a crashed run left) and removes
    /// its state. Does nothing when there is no such cluster.
    pub fn down(name: &str) -> Result<()> {
        validate_name(name)?;
        let _lock = FileLock::acquire(&lock_path(name))?;
        // The lock file stays: removing it could let a waiter and a newcomer lock different
        // files.
        teardown(&state_dir_of(name))
    }

    /// Names of the clusters that have a state directory.
    pub fn list() -> Vec<String> {
        let Ok(read) = std::fs::read_dir(clusters_dir()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = read
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    }

    /// Path of the admin kubeconfig (user `kubernetes-admin`, group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.info.kubeconfig
    }

    /// `https://127.0.0.1:<port>`
    pub fn server(&self) -> &str {
        &self.info.server
    }

    /// Path of the cluster CA certificate (PEM).
    pub fn ca_cert_path(&self) -> PathBuf {
        self.state_dir.join("pki").join("ca.crt")
    }

    /// A directory for a test's or operator's files inside the cluster state directory.
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.state_dir.join("scratch").join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// An admin client. Create one per tokio runtime: a client must not outlive the runtime
    /// it was made in.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(self.kubeconfig()).await
    }

    /// A `kubectl` command (the one built with the control plane) pointed at this cluster.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bins.program("kubectl"));
        cmd.env("KUBECONFIG", self.kubeconfig());
        cmd
    }

    /// Pids of the control-plane processes by component.
    pub fn pids(&self) -> Vec<(String, u32)> {
        PidDir::new(self.state_dir.join("pids")).entries()
    }

    /// Checks that every process is alive and the API server is ready.
    pub async fn check_health(&self) -> Result<()> {
        for (component, pid) in self.pids() {
            if !process::alive(pid) {
                bail!("{component} (pid {pid}) is not running");
            }
        }
        let client = self.client().await?;
        let ready = tokio::time::timeout(Duration::from_secs(10), get_text(&client, "/readyz"))
            .await
            .map_err(|_| anyhow!("API server /readyz timed out"))??;
        if ready.trim() != "ok" {
            bail!("API server /readyz says {ready:?}");
        }
        Ok(())
    }
}

/// A client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    Client::try_from(config).context("building client")
}

/// GET a non-resource path (`/readyz`, `/version`, `/metrics`) as text.
pub async fn get_text(client: &Client, path: &str) -> Result<String> {
    let request = http::Request::get(path).body(Vec::new())?;
    client
        .request_text(request)
        .await
        .with_context(|| format!("GET {path}"))
}

/// The user a kubeconfig authenticates as.
pub enum KubeconfigUser<'a> {
    /// Client certificate and key files.
    Cert { cert: &'a Path, key: &'a Path },
    /// A bearer token.
    Token(&'a str),
}

/// Writes a kubeconfig with one cluster, user and context (named after `name`).
pub fn write_kubeconfig(
    path: &Path,
    name: &str,
    server: &str,
    ca: &Path,
    user: KubeconfigUser<'_>,
    namespace: Option<&str>,
) -> Result<()> {
    let user = match user {
        KubeconfigUser::Cert { cert, key } => serde_json::json!({
            "client-certificate": cert,
            "client-key": key,
        }),
        KubeconfigUser::Token(token) => serde_json::json!({ "token": token }),
    };
    let mut context = serde_json::json!({ "cluster": name, "user": name });
    if let Some(ns) = namespace {
        context["namespace"] = ns.into();
    }
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": name, "cluster": { "server": server, "certificate-authority": ca } }],
        "users": [{ "name": name, "user": user }],
        "contexts": [{ "name": name, "context": context }],
        "current-context": name,
    });
    pki::write_private(path, &serde_yaml::to_string(&doc)?)
}

/// Stops what the pid files in `dir` name and removes `dir`.
fn teardown(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // Operators first (they talk to the API server), then the control plane.
    crate::operator::stop_operators(dir, true);
    let marker = dir.to_string_lossy().into_owned();
    PidDir::new(dir.join("pids")).stop_all(&marker, STOP_ORDER)?;
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

/// The last lines of every component log, for error messages.
fn log_tails(dir: &Path) -> String {
    let mut out = String::new();
    for component in STOP_ORDER.iter().rev() {
        let path = dir.join("logs").join(format!("{component}.log"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!(
                "\n--- last lines of {} ---\n{}",
                path.display(),
                tail.join("\n")
            ));
        }
    }
    out
}

/// A port the kernel had free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

struct Layout {
    dir: PathBuf,
    pki: PathBuf,
    logs: PathBuf,
    pids: PidDir,
}

impl Layout {
    fn spawn(&self, component: &str, program: &Path, args: &[String]) -> Result<u32> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let pid = process::spawn_group(&mut cmd, &self.logs.join(format!("{component}.log")))?;
        self.pids.record(component, pid)?;
        Ok(pid)
    }
}

async fn start(
    spec: &ClusterSpec,
    dir: &Path,
    bins: &Binaries,
    started: Instant,
) -> Result<Cluster> {
    let layout = Layout {
        dir: dir.to_owned(),
        pki: dir.join("pki"),
        logs: dir.join("logs"),
        pids: PidDir::new(dir.join("pids")),
    };
    for d in [
        &layout.pki,
        &layout.logs,
        &dir.join("etcd"),
        &dir.join("kubeconfigs"),
    ] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let pki_dir = &layout.pki;

    // --- certificates -------------------------------------------------------------------
    let ca = Ca::new(&format!("gantry-{}-ca", spec.name))?;
    let ca_crt = pki_dir.join("ca.crt");
    let ca_key = pki_dir.join("ca.key");
    std::fs::write(&ca_crt, ca.cert_pem())?;
    pki::write_private(&ca_key, &ca.key_pem())?;
    let localhost: IpAddr = Ipv4Addr::LOCALHOST.into();
    let service_ip: IpAddr = Ipv4Addr::new(10, 96, 0, 1).into();
    let (apiserver_crt, apiserver_key) = ca
        .serving(
            "kube-apiserver",
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[localhost, "::1".parse()?, service_ip],
        )?
        .write(pki_dir, "apiserver")?;
    // The aggregation layer's front proxy: its own CA and the client certificate the API
    // server presents to aggregated API servers (components read the CA as the request-header
    // CA from kube-system/extension-apiserver-authentication).
    let front_proxy_ca = Ca::new(&format!("gantry-{}-front-proxy-ca", spec.name))?;
    let front_proxy_ca_crt = pki_dir.join("front-proxy-ca.crt");
    std::fs::write(&front_proxy_ca_crt, front_proxy_ca.cert_pem())?;
    let (proxy_client_crt, proxy_client_key) = front_proxy_ca
        .client("front-proxy-client", None)?
        .write(pki_dir, "front-proxy-client")?;
    let sa_key = pki_dir.join("sa.key");
    let sa_pub = pki_dir.join("sa.pub");
    let (sa_private, sa_public) = pki::key_pair_pem()?;
    pki::write_private(&sa_key, &sa_private)?;
    std::fs::write(&sa_pub, sa_public)?;

    // --- ports ----------------------------------------------------------------------------
    let etcd_port = free_port()?;
    let etcd_peer_port = free_port()?;
    let apiserver_port = free_port()?;
    let kcm_port = free_port()?;
    let scheduler_port = free_port()?;
    let server = format!("https://127.0.0.1:{apiserver_port}");
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");

    // --- kubeconfigs ----------------------------------------------------------------------
    let kubeconfig_for = |stem: &str, user: &str, group: Option<&str>| -> Result<PathBuf> {
        let (crt, key) = ca.client(user, group)?.write(pki_dir, stem)?;
        let path = if stem == "admin" {
            layout.dir.join("kubeconfig")
        } else {
            layout
                .dir
                .join("kubeconfigs")
                .join(format!("{stem}.kubeconfig"))
        };
        let context = if stem == "admin" {
            format!("gantry-{}", spec.name)
        } else {
            stem.to_owned()
        };
        write_kubeconfig(
            &path,
            &context,
            &server,
            &ca_crt,
            KubeconfigUser::Cert {
                cert: &crt,
                key: &key,
            },
            None,
        )?;
        Ok(path)
    };
    let admin_kubeconfig = kubeconfig_for("admin", "kubernetes-admin", Some("system:masters"))?;
    let kcm_kubeconfig =
        kubeconfig_for("controller-manager", "system:kube-controller-manager", None)?;
    let scheduler_kubeconfig = kubeconfig_for("scheduler", "system:kube-scheduler", None)?;
    // kwok plays every kubelet; it gets the masters group rather than per-node identities.
    let kwok_kubeconfig = kubeconfig_for("kwok", "kwok-controller", Some("system:masters"))?;

    // --- etcd -------------------------------------------------------------------------------
    let etcd_peer = format!("http://127.0.0.1:{etcd_peer_port}");
    let etcd_args = vec![
        "--name=default".to_owned(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={etcd_peer}"),
        format!("--initial-advertise-peer-urls={etcd_peer}"),
        format!("--initial-cluster=default={etcd_peer}"),
        "--initial-cluster-state=new".to_owned(),
        // A throw-away test cluster: durability is not worth the fsync latency.
        "--unsafe-no-fsync=true".to_owned(),
        "--log-level=warn".to_owned(),
    ];
    layout.spawn("etcd", &bins.program("etcd"), &etcd_args)?;
    wait_until(
        "etcd to report healthy",
        Duration::from_secs(30),
        &layout,
        || async { Ok(etcd_healthy(etcd_port).await) },
    )
    .await?;

    // --- kube-apiserver ---------------------------------------------------------------------
    let apiserver_args = vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".to_owned(),
        "--advertise-address=127.0.0.1".to_owned(),
        format!("--secure-port={apiserver_port}"),
        format!("--cert-dir={}", pki_dir.display()),
        format!("--tls-cert-file={}", apiserver_crt.display()),
        format!("--tls-private-key-file={}", apiserver_key.display()),
        format!("--client-ca-file={}", ca_crt.display()),
        format!("--service-account-key-file={}", sa_pub.display()),
        format!("--service-account-signing-key-file={}", sa_key.display()),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
        "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
        format!(
            "--requestheader-client-ca-file={}",
            front_proxy_ca_crt.display()
        ),
        "--requestheader-allowed-names=front-proxy-client".to_owned(),
        "--requestheader-username-headers=X-Remote-User".to_owned(),
        "--requestheader-group-headers=X-Remote-Group".to_owned(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".to_owned(),
        format!("--proxy-client-cert-file={}", proxy_client_crt.display()),
        format!("--proxy-client-key-file={}", proxy_client_key.display()),
        "--authorization-mode=Node,RBAC".to_owned(),
        "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,\
         DefaultStorageClass,DefaultTolerationSeconds,NodeRestriction,Priority,\
         PodSecurity,RuntimeClass,ResourceQuota,MutatingAdmissionWebhook,\
         ValidatingAdmissionWebhook,ValidatingAdmissionPolicy"
            .to_owned(),
        "--allow-privileged=true".to_owned(),
        // The kubernetes Service would point at 127.0.0.1, which Endpoints may not hold;
        // nothing in a kwok cluster dials it anyway.
        "--endpoint-reconciler-type=none".to_owned(),
        "--event-ttl=1h".to_owned(),
        "--profiling=false".to_owned(),
        "--v=1".to_owned(),
    ];
    let mut apiserver_args = apiserver_args;
    if spec.audit_log {
        let policy = layout.dir.join("audit-policy.yaml");
        std::fs::write(&policy, AUDIT_POLICY)?;
        apiserver_args.push(format!("--audit-policy-file={}", policy.display()));
        apiserver_args.push(format!(
            "--audit-log-path={}",
            layout.dir.join("logs/audit.log").display()
        ));
        apiserver_args.push("--audit-log-format=json".to_owned());
    }
    layout.spawn(
        "kube-apiserver",
        &bins.program("kube-apiserver"),
        &apiserver_args,
    )?;
    let admin_path = admin_kubeconfig.clone();
    wait_until(
        "kube-apiserver /readyz",
        Duration::from_secs(120),
        &layout,
        || {
            let admin_path = admin_path.clone();
            async move {
                let client = client_from_kubeconfig(&admin_path).await?;
                Ok(matches!(get_text(&client, "/readyz").await, Ok(t) if t.trim() == "ok"))
            }
        },
    )
    .await?;
    let client = client_from_kubeconfig(&admin_kubeconfig).await?;

    // --- controller-manager, scheduler, kwok -------------------------------------------------
    let kcm_args = vec![
        format!("--kubeconfig={}", kcm_kubeconfig.display()),
        format!("--authentication-kubeconfig={}", kcm_kubeconfig.display()),
        format!("--authorization-kubeconfig={}", kcm_kubeconfig.display()),
        "--bind-address=127.0.0.1".to_owned(),
        format!("--secure-port={kcm_port}"),
        format!(
            "--cert-dir={}",
            dir.join("controller-manager-certs").display()
        ),
        "--leader-elect=false".to_owned(),
        "--controllers=*".to_owned(),
        "--use-service-account-credentials=true".to_owned(),
        format!("--service-account-private-key-file={}", sa_key.display()),
        format!("--root-ca-file={}", ca_crt.display()),
        format!("--cluster-signing-cert-file={}", ca_crt.display()),
        format!("--cluster-signing-key-file={}", ca_key.display()),
        "--kube-api-qps=200".to_owned(),
        "--kube-api-burst=400".to_owned(),
        "--v=1".to_owned(),
    ];
    layout.spawn(
        "kube-controller-manager",
        &bins.program("kube-controller-manager"),
        &kcm_args,
    )?;

    let scheduler_config = dir.join("scheduler-config.yaml");
    let config = serde_json::json!({
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": { "kubeconfig": scheduler_kubeconfig, "qps": 200, "burst": 400 },
        "leaderElection": { "leaderElect": false },
        "extenders": spec.scheduler_extenders,
    });
    std::fs::write(&scheduler_config, serde_yaml::to_string(&config)?)?;
    let scheduler_args = vec![
        format!("--config={}", scheduler_config.display()),
        format!(
            "--authentication-kubeconfig={}",
            scheduler_kubeconfig.display()
        ),
        format!(
            "--authorization-kubeconfig={}",
            scheduler_kubeconfig.display()
        ),
        "--bind-address=127.0.0.1".to_owned(),
        format!("--secure-port={scheduler_port}"),
        format!("--cert-dir={}", dir.join("scheduler-certs").display()),
        "--v=1".to_owned(),
    ];
    layout.spawn(
        "kube-scheduler",
        &bins.program("kube-scheduler"),
        &scheduler_args,
    )?;

    let stages = dir.join("kwok-stages.yaml");
    std::fs::write(
        &stages,
        format!(
            "{}\n---\n{}",
            include_str!("../stages/node.yaml"),
            include_str!("../stages/pod.yaml")
        ),
    )?;
    let kwok_args = vec![
        format!("--kubeconfig={}", kwok_kubeconfig.display()),
        format!("--config={}", stages.display()),
        format!(
            "--manage-nodes-with-label-selector={}={}",
            KWOK_NODE_LABEL.0, KWOK_NODE_LABEL.1
        ),
        "--node-lease-duration-seconds=40".to_owned(),
        "--cidr=10.0.0.0/16".to_owned(),
    ];
    layout.spawn("kwok", &bins.program("kwok"), &kwok_args)?;

    // --- nodes --------------------------------------------------------------------------------
    create_nodes(&client, spec).await?;

    let nodes: Api<Node> = Api::all(client.clone());
    let want = spec.node_count() as usize;
    let selector = format!("{}={}", KWOK_NODE_LABEL.0, KWOK_NODE_LABEL.1);
    wait_until(
        &format!("{want} kwok nodes Ready"),
        Duration::from_secs(60),
        &layout,
        || {
            let nodes = nodes.clone();
            let selector = selector.clone();
            async move {
                let list = nodes.list(&ListParams::default().labels(&selector)).await?;
                let ready = list.items.iter().filter(|n| node_ready(n)).count();
                Ok(ready == want)
            }
        },
    )
    .await?;
    for (component, port) in [
        ("kube-controller-manager", kcm_port),
        ("kube-scheduler", scheduler_port),
    ] {
        wait_until(
            &format!("{component} /healthz"),
            Duration::from_secs(60),
            &layout,
            || async move { Ok(component_healthy(port).await) },
        )
        .await?;
    }
    // The service-account controller has run once the default namespace has its account:
    // pods can be created from here on.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    wait_until(
        "the default ServiceAccount",
        Duration::from_secs(60),
        &layout,
        || {
            let accounts = accounts.clone();
            async move { Ok(accounts.get_opt("default").await?.is_some()) }
        },
    )
    .await?;

    let info = ClusterInfo {
        spec: spec.clone(),
        server,
        etcd: etcd_url,
        controller_manager_port: kcm_port,
        scheduler_port,
        kubeconfig: admin_kubeconfig,
        startup_seconds: started.elapsed().as_secs_f64(),
    };
    // Written last: its presence means the cluster finished starting.
    std::fs::write(dir.join("cluster.json"), serde_json::to_vec_pretty(&info)?)?;
    Ok(Cluster {
        name: spec.name.clone(),
        state_dir: dir.to_owned(),
        info,
        bins: bins.clone(),
    })
}

/// Polls `probe` every 200 ms until it returns true; fails after `timeout`, or at once when a
/// component process has exited.
async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    layout: &Layout,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match probe().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        for (component, pid) in layout.pids.entries() {
            if !process::alive(pid) {
                bail!("{component} (pid {pid}) exited while waiting for {what}");
            }
        }
        if Instant::now() >= deadline {
            let detail = last_err
                .map(|e| format!(": last error: {e:#}"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{detail}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn etcd_healthy(port: u16) -> bool {
    matches!(
        crate::http::get(&format!("127.0.0.1:{port}"), "/health").await,
        Ok((200, body)) if body.contains("\"health\":\"true\"")
    )
}

/// `/healthz` of a component's self-signed HTTPS endpoint (controller-manager, scheduler).
async fn component_healthy(port: u16) -> bool {
    let Ok(uri) = format!("https://127.0.0.1:{port}").parse() else {
        return false;
    };
    let mut config = Config::new(uri);
    config.accept_invalid_certs = true;
    let Ok(client) = Client::try_from(config) else {
        return false;
    };
    matches!(get_text(&client, "/healthz").await, Ok(t) if t.trim() == "ok")
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

async fn create_nodes(client: &Client, spec: &ClusterSpec) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let objects = node_objects(spec)?;
    futures::stream::iter(objects.into_iter().map(|node| {
        let api = api.clone();
        async move {
            let name = node.metadata.name.clone().unwrap_or_default();
            api.create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("creating node {name}"))
        }
    }))
    .buffer_unordered(16)
    .try_collect::<Vec<_>>()
    .await?;
    Ok(())
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

    #[test]
    fn stage_files_parse_and_name_every_stage() -> Result<()> {
        let text = format!(
            "{}\n---\n{}",
            include_str!("../stages/node.yaml"),
            include_str!("../stages/pod.yaml")
        );
        let mut names = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            use serde::Deserialize as _;
            let value = serde_yaml::Value::deserialize(doc)?;
            assert_eq!(value["kind"].as_str(), Some("Stage"));
            names.push(
                value["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        assert_eq!(
            names,
            [
                "gantry-node-ready",
                "gantry-pod-start",
                "gantry-pod-readiness",
                "gantry-pod-kill",
                "gantry-pod-restart",
                "gantry-pod-complete",
                "gantry-pod-terminate",
                "gantry-pod-delete"
            ]
        );
        Ok(())
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("home").is_ok());
        assert!(validate_name("e2e-extender").is_ok());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("Home").is_err());
    }
}
