//! Both Helm majors install (and uninstall) the umbrella chart on the local cluster: the
//! operator Deployment becomes available, with the objects the chart conventions promise.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use gantry_e2e::bins::repo_root;
use gantry_e2e::testing::TestEnv;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;

fn helm(env_var: &str) -> Result<PathBuf> {
    std::env::var_os(env_var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .with_context(|| format!("${env_var} names no helm binary (make test-e2e sets it)"))
}

fn run(helm: &PathBuf, kubeconfig: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = Command::new(helm)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()?;
    if !out.status.success() {
        bail!(
            "helm {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn installs_with(env_var: &str) -> Result<()> {
    let helm = helm(env_var)?;
    let env = TestEnv::new(&format!("chart-{}", env_var.to_lowercase())).await?;
    let ns = env.namespace().to_string();
    let chart = repo_root().join("charts/gantry");
    let chart_arg = chart.to_string_lossy().to_string();
    let kubeconfig = env.cluster.kubeconfig().to_path_buf();
    {
        // Both tests package the same chart directories: one at a time.
        static PACKAGING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = PACKAGING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let operator_chart = repo_root()
            .join("charts/gray-upgrade")
            .to_string_lossy()
            .to_string();
        run(
            &helm,
            &kubeconfig,
            &["dependency", "update", "--skip-refresh", &operator_chart],
        )?;
        run(
            &helm,
            &kubeconfig,
            &["dependency", "update", "--skip-refresh", &chart_arg],
        )?;
    }
    // The CRD is already in the shared cluster (installed by the other tests, not by Helm), and
    // cluster-wide RBAC is named after the operator: both are made unique to this release.
    let fullname = format!("gray-{ns}");
    let set = format!("gray-upgrade.fullnameOverride={fullname},gray-upgrade.crds.install=false");
    run(
        &helm,
        &kubeconfig,
        &[
            "install",
            "gantry",
            &chart_arg,
            "--namespace",
            &ns,
            "--set",
            &set,
            "--wait",
            "--timeout",
            "120s",
        ],
    )?;

    let deployments: Api<Deployment> = env.api();
    let deployment = deployments.get(&fullname).await?;
    let status = deployment.status.clone().unwrap_or_default();
    assert_eq!(status.available_replicas, Some(2), "two replicas available");
    let args = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers[0].args.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(args.iter().any(|a| a == "--leader-elect"), "{args:?}");
    let pdbs: Api<PodDisruptionBudget> = env.api();
    pdbs.get(&fullname)
        .await
        .context("a PodDisruptionBudget for two replicas")?;
    let accounts: Api<ServiceAccount> = env.api();
    accounts
        .get(&fullname)
        .await
        .context("the operator's ServiceAccount")?;

    run(
        &helm,
        &kubeconfig,
        &["uninstall", "gantry", "--namespace", &ns, "--wait"],
    )?;
    assert!(
        deployments.get_opt(&fullname).await?.is_none(),
        "uninstall removed the operator"
    );
    Ok(())
}

#[tokio::test]
async fn helm_3_installs_and_uninstalls_the_umbrella_chart() -> Result<()> {
    installs_with("HELM3").await
}

#[tokio::test]
async fn helm_4_installs_and_uninstalls_the_umbrella_chart() -> Result<()> {
    installs_with("HELM4").await
}
