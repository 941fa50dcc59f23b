//! Running an operator binary on the host against a test cluster, with the identity its Helm
//! chart gives it: the chart is rendered with `helm template`, its ServiceAccount and RBAC are
//! applied, and the operator gets a kubeconfig holding a token for that ServiceAccount
//! (TokenRequest API). A rule missing from the chart therefore fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DynamicObject, PostParams};
use kube::{Client, ResourceExt as _};

use crate::cluster::{Cluster, KubeconfigUser, write_kubeconfig};
use crate::process;
use crate::testing::{apply_object, parse_yaml_documents};

/// Path of helm v3 (`$HELM3`, which the Makefile sets to the helm it installs).
pub const HELM_ENV: &str = "HELM3";

/// Kinds of a rendered chart applied to give the operator its identity.
const IDENTITY_KINDS: &[&str] = &[
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
];

/// The helm binary: `$HELM3`, else `helm` on PATH.
pub fn helm_binary() -> PathBuf {
    std::env::var_os(HELM_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("helm"), PathBuf::from)
}

/// `helm template <release> <chart> --namespace <ns> [--set k=v]...`
pub fn helm_template(
    chart: &Path,
    release: &str,
    namespace: &str,
    set: &[(&str, &str)],
) -> Result<String> {
    let helm = helm_binary();
    let mut cmd = Command::new(&helm);
    cmd.arg("template")
        .arg(release)
        .arg(chart)
        .arg("--namespace")
        .arg(namespace);
    for (k, v) in set {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    let out = cmd.output().with_context(|| {
        format!(
            "running {} (install helm with `make tools`, or set ${HELM_ENV})",
            helm.display()
        )
    })?;
    if !out.status.success() {
        bail!(
            "helm template {} failed: {}",
            chart.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("helm output is not UTF-8")
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
    set: &[(&str, &str)],
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

/// Environment variable naming the cluster state directory in every process the harness
/// starts; it lets a later run recognise (and reap) processes a crashed run left behind.
const OWNER_ENV: &str = "GANTRY_E2E_CLUSTER_DIR";

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
        let dir = cluster.state_dir.join("operators");
        std::fs::create_dir_all(&dir)?;
        let log = dir.join(format!("{name}.log"));
        let pid_file = dir.join(format!("{name}.pid"));
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env("KUBECONFIG", kubeconfig)
            .env(OWNER_ENV, &cluster.state_dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let pid = process::spawn_group(&mut cmd, &log)
            .with_context(|| format!("starting {} (is it built?)", binary.display()))?;
        std::fs::write(&pid_file, format!("{pid} {}\n", std::process::id()))?;
        Ok(Self {
            name: name.to_owned(),
            pid,
            log,
            pid_file,
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

/// Stops operator processes that a test process which no longer exists started against this
/// cluster (it crashed or was killed before its drops ran).
pub fn reap_orphans(cluster: &Cluster) {
    stop_operators(&cluster.state_dir, false);
}

/// Stops the operator processes started against the cluster in `state_dir`: all of them, or
/// (`all == false`) those whose starting test process is gone.
pub(crate) fn stop_operators(state_dir: &Path, all: bool) {
    let dir = state_dir.join("operators");
    let Ok(read) = std::fs::read_dir(&dir) else {
        return;
    };
    let marker = format!("{OWNER_ENV}={}", state_dir.display());
    for entry in read.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "pid") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut fields = text
            .split_whitespace()
            .filter_map(|f| f.parse::<u32>().ok());
        let (Some(pid), Some(owner)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !all && process::alive(owner) {
            continue;
        }
        if process::alive(pid) && process::environ_contains(pid, &marker) {
            tracing::info!(pid, file = %path.display(), "stopping operator process");
            process::stop_group(pid, Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(&path);
    }
}
