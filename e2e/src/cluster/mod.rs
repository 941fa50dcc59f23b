//! The cluster launcher: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
//! kwok as host processes on loopback, with generated TLS and kwok-simulated nodes.
//!
//! A cluster is named; its state (certificates, kubeconfigs, etcd data, logs, pid files) lives
//! in `<cache>/clusters/<name>/`. [`Cluster::up`] reuses a healthy cluster of the same name
//! and spec, and otherwise reaps whatever an earlier run left there and starts afresh.
//! [`Cluster::down`] stops every process and removes the state.

mod components;
mod kubeconfig;
pub mod node;
mod spec;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kube::Client;
use serde::{Deserialize, Serialize};

pub use kubeconfig::{
    KubeconfigUser, client_from_kubeconfig, delete_on_the_side, get_text, write_kubeconfig,
};
pub use spec::{ClusterSpec, NodePool, node_objects, node_ready};

use crate::bins::{Binaries, cache_dir};
use crate::process::{self, FileLock, HostProcesses, PidDir};

/// The Kubernetes version the binaries are built from (e2e/cluster/go.mod); reported as the
/// fake nodes' kubelet version.
pub const KUBERNETES_VERSION: &str = "v1.34.4";

/// Label that marks the nodes kwok manages.
pub const KWOK_NODE_LABEL: (&str, &str) = ("type", "kwok");

/// Components in the order they are stopped: a real node's first, then the control plane's.
pub(crate) const STOP_ORDER: &[&str] = &[
    "kube-proxy",
    "kubelet",
    "containerd",
    "registry",
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
];

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
    /// The real node, when the spec asks for one.
    #[serde(default)]
    pub real_node: Option<node::RealNodeInfo>,
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
            teardown(&spec.name)?;
            match components::start(spec, &dir, &bins, started).await {
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
                        let _ = teardown(&spec.name);
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
        teardown(name)
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

    /// A self-contained admin kubeconfig (certificates inline), as a kubeconfig Secret holds it
    /// for an operator that reaches this cluster from another.
    pub fn inline_kubeconfig(&self) -> Result<String> {
        let pki = self.state_dir.join("pki");
        let base64 = |file: &str| -> Result<serde_json::Value> {
            let bytes = std::fs::read(pki.join(file))
                .with_context(|| format!("reading {}", pki.join(file).display()))?;
            Ok(serde_json::to_value(k8s_openapi::ByteString(bytes))?)
        };
        let name = format!("gantry-{}", self.name);
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": self.server(), "certificate-authority-data": base64("ca.crt")?}}],
            "users": [{"name": name, "user": {"client-certificate-data": base64("admin.crt")?, "client-key-data": base64("admin.key")?}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
        });
        Ok(serde_yaml::to_string(&doc)?)
    }

    /// Brings up a cluster that is stopped again when the returned guard is dropped: for a
    /// test that needs a cluster of its own (a second one, or one with other nodes).
    /// (A start that fails cleans up after itself, as [`Cluster::up`] does.)
    pub async fn up_temporary(spec: &ClusterSpec) -> Result<Temporary> {
        Ok(Temporary {
            cluster: Self::up(spec).await?,
        })
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

/// Stops what the pid files in the cluster's state directory name, removes what a real node
/// left, and removes the directory.
fn teardown(name: &str) -> Result<()> {
    let dir = state_dir_of(name);
    if !dir.exists() {
        return Ok(());
    }
    // Operators first (they talk to the API server), then the control plane.
    HostProcesses::of(&dir).stop(true);
    let marker = dir.to_string_lossy().into_owned();
    PidDir::new(dir.join("pids")).stop_all(&marker, STOP_ORDER)?;
    // What a real node leaves besides its processes: containers, mounts, a namespace and
    // cgroups. Mounts must be gone before the directory is removed: removing through a bind
    // mount would delete what it shows.
    node::teardown(name, &dir)?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
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

/// A cluster stopped when dropped; see [`Cluster::up_temporary`].
pub struct Temporary {
    cluster: Cluster,
}

impl std::ops::Deref for Temporary {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if let Err(e) = Cluster::down(&self.cluster.name) {
            eprintln!("stopping cluster {}: {e:#}", self.cluster.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("home").is_ok());
        assert!(validate_name("e2e-extender").is_ok());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("Home").is_err());
    }
}
