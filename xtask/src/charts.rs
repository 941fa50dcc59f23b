//! Chart checks: every chart lints and renders with each Helm given, and the rendered operator
//! objects follow the conventions (restricted pod security, leader election and a disruption
//! budget exactly when replicas > 1, namespaced RBAC when one namespace is watched, bad values
//! rejected by values.schema.json).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_yaml::Value;

/// A library chart cannot be rendered on its own.
fn is_library(chart: &Path) -> anyhow::Result<bool> {
    let meta = std::fs::read_to_string(chart.join("Chart.yaml"))
        .with_context(|| format!("reading {}/Chart.yaml", chart.display()))?;
    let meta: Value = serde_yaml::from_str(&meta)?;
    Ok(meta.get("type").and_then(Value::as_str) == Some("library"))
}

/// Whether the chart deploys an operator (it uses the shared deployment template).
fn is_operator_chart(chart: &Path) -> bool {
    std::fs::read_to_string(chart.join("templates/deployment.yaml"))
        .is_ok_and(|t| t.contains("gantry.deployment"))
}

pub fn check_all(root: &Path, helms: &[PathBuf]) -> anyhow::Result<()> {
    if helms.is_empty() {
        bail!("give at least one --helm binary");
    }
    let mut charts: Vec<PathBuf> = std::fs::read_dir(root.join("charts"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Chart.yaml").is_file())
        .collect();
    // Dependencies first: the library, then the operator charts, then the umbrella that
    // packages them.
    charts.sort_by_key(|c| {
        let name = c
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let rank = if name == "gantry-lib" {
            0
        } else if name == "gantry" {
            2
        } else {
            1
        };
        (rank, name)
    });
    let mut failures = Vec::new();
    for helm in helms {
        let version = helm_output(helm, &["version", "--short"], None)?;
        for chart in &charts {
            let name = chart
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let label = format!("{name} (helm {})", version.trim());
            match check_chart(helm, chart) {
                Ok(()) => println!("ok      {label}"),
                Err(err) => {
                    println!("FAILED  {label}: {err:#}");
                    failures.push(label);
                }
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} chart check(s) failed: {}",
            failures.len(),
            failures.join(", ")
        );
    }
    Ok(())
}

fn check_chart(helm: &Path, chart: &Path) -> anyhow::Result<()> {
    let chart_arg = chart.to_string_lossy().to_string();
    if std::fs::read_to_string(chart.join("Chart.yaml"))?.contains("repository: file://") {
        helm_output(
            helm,
            &["dependency", "update", "--skip-refresh", &chart_arg],
            None,
        )?;
    }
    helm_output(helm, &["lint", "--strict", &chart_arg], None)?;
    if is_library(chart)? {
        return Ok(());
    }
    render(helm, chart, &[])?;
    if !is_operator_chart(chart) {
        return Ok(());
    }
    let problems = [
        conventions(&render(helm, chart, &["replicas=1"])?, 1, None),
        conventions(&render(helm, chart, &["replicas=3"])?, 3, None),
        conventions(
            &render(helm, chart, &["replicas=1", "watchNamespace=team-a"])?,
            1,
            Some("team-a"),
        ),
    ]
    .concat();
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    for bad in [
        "replicas=-1",
        "logFormat=xml",
        "image.pullPolicy=Sometimes",
        "watchNamespace=Not_A_Namespace",
        "reconcileIntervalMs=-1",
    ] {
        if render(helm, chart, &[bad]).is_ok() {
            bail!("values {bad:?} were accepted; values.schema.json must reject them");
        }
    }
    Ok(())
}

fn render(helm: &Path, chart: &Path, sets: &[&str]) -> anyhow::Result<Vec<Value>> {
    let chart_arg = chart.to_string_lossy().to_string();
    let mut args = vec![
        "template",
        "test-release",
        chart_arg.as_str(),
        "--namespace",
        "gantry-system",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let yaml = helm_output(helm, &args, None)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn helm_output(helm: &Path, args: &[&str], dir: Option<&Path>) -> anyhow::Result<String> {
    let mut command = Command::new(helm);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let out = command
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if !out.status.success() {
        bail!(
            "helm {} failed: {} {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn kind_of(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or_default()
}

fn at<'a>(doc: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |v, key| v.get(*key))
}

/// Every way the rendered objects of an operator chart depart from the conventions.
pub fn conventions(docs: &[Value], replicas: u64, watch_namespace: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    let deployments: Vec<&Value> = docs.iter().filter(|d| kind_of(d) == "Deployment").collect();
    if deployments.len() != 1 {
        problems.push(format!(
            "expected one Deployment, found {}",
            deployments.len()
        ));
        return problems;
    }
    let pod = at(deployments[0], &["spec", "template", "spec"])
        .cloned()
        .unwrap_or(Value::Null);
    let pod_security = pod.get("securityContext");
    if pod_security
        .and_then(|s| s.get("runAsNonRoot"))
        .and_then(Value::as_bool)
        != Some(true)
    {
        problems.push("pod does not require runAsNonRoot".into());
    }
    if pod_security
        .and_then(|s| at(s, &["seccompProfile", "type"]))
        .and_then(Value::as_str)
        != Some("RuntimeDefault")
    {
        problems.push("pod seccompProfile is not RuntimeDefault".into());
    }
    let mut leader_elect = false;
    for container in pod
        .get("containers")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let name = container.get("name").and_then(Value::as_str).unwrap_or("?");
        let security = container.get("securityContext");
        if security
            .and_then(|s| s.get("readOnlyRootFilesystem"))
            .and_then(Value::as_bool)
            != Some(true)
        {
            problems.push(format!("container {name}: root filesystem is writable"));
        }
        if security
            .and_then(|s| s.get("allowPrivilegeEscalation"))
            .and_then(Value::as_bool)
            != Some(false)
        {
            problems.push(format!("container {name}: privilege escalation allowed"));
        }
        let drops_all = security
            .and_then(|s| at(s, &["capabilities", "drop"]))
            .and_then(Value::as_sequence)
            .is_some_and(|d| d.iter().any(|c| c.as_str() == Some("ALL")));
        if !drops_all {
            problems.push(format!("container {name}: capabilities not dropped"));
        }
        for probe in ["livenessProbe", "readinessProbe"] {
            if container.get(probe).is_none() {
                problems.push(format!("container {name}: no {probe}"));
            }
        }
        leader_elect |= container
            .get("args")
            .and_then(Value::as_sequence)
            .is_some_and(|args| args.iter().any(|a| a.as_str() == Some("--leader-elect")));
    }
    let has = |kind: &str| docs.iter().any(|d| kind_of(d) == kind);
    if (replicas > 1) != leader_elect {
        problems.push(format!(
            "replicas={replicas} but --leader-elect is {}",
            if leader_elect { "set" } else { "missing" }
        ));
    }
    if (replicas > 1) != has("PodDisruptionBudget") {
        problems.push(format!(
            "replicas={replicas} but a PodDisruptionBudget is {}",
            if has("PodDisruptionBudget") {
                "rendered"
            } else {
                "missing"
            }
        ));
    }
    let lease_role = docs.iter().any(|d| {
        kind_of(d) == "Role"
            && d.get("rules")
                .and_then(Value::as_sequence)
                .is_some_and(|rules| {
                    rules.iter().any(|r| {
                        r.get("resources")
                            .and_then(Value::as_sequence)
                            .is_some_and(|res| res.iter().any(|x| x.as_str() == Some("leases")))
                    })
                })
    });
    if leader_elect && !lease_role {
        problems.push("leader election without a Role for leases".into());
    }
    match watch_namespace {
        None if !has("ClusterRole") => {
            problems.push("watching all namespaces without a ClusterRole".into())
        }
        Some(ns) => {
            if has("ClusterRole") {
                problems.push(format!("watching {ns} but a ClusterRole is rendered"));
            }
            let namespaced_role = docs.iter().any(|d| {
                kind_of(d) == "Role"
                    && at(d, &["metadata", "namespace"]).and_then(Value::as_str) == Some(ns)
            });
            if !namespaced_role {
                problems.push(format!("watching {ns} but no Role in {ns}"));
            }
        }
        None => {}
    }
    if !has("ServiceAccount") {
        problems.push("no ServiceAccount".into());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(yaml: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| serde::Deserialize::deserialize(d).expect("valid yaml"))
            .collect()
    }

    const GOOD: &str = r#"
kind: ServiceAccount
---
kind: ClusterRole
rules: []
---
kind: Deployment
spec:
  template:
    spec:
      securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: operator
          args: [run]
          livenessProbe: {}
          readinessProbe: {}
          securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
"#;

    #[test]
    fn conforming_render_passes() {
        assert_eq!(conventions(&docs(GOOD), 1, None), Vec::<String>::new());
    }

    #[test]
    fn loosened_security_is_reported() {
        let bad = GOOD
            .replace(
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: false",
            )
            .replace("drop: [ALL]", "drop: []");
        let problems = conventions(&docs(&bad), 1, None);
        assert!(
            problems.contains(&"container operator: root filesystem is writable".to_string()),
            "{problems:?}"
        );
        assert!(
            problems.contains(&"container operator: capabilities not dropped".to_string()),
            "{problems:?}"
        );
    }

    #[test]
    fn several_replicas_need_election_and_budget() {
        let problems = conventions(&docs(GOOD), 2, None);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("--leader-elect is missing")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("PodDisruptionBudget is missing")),
            "{problems:?}"
        );
    }

    #[test]
    fn one_namespace_needs_namespaced_rbac() {
        let problems = conventions(&docs(GOOD), 1, Some("team-a"));
        assert!(
            problems.contains(&"watching team-a but a ClusterRole is rendered".to_string()),
            "{problems:?}"
        );
        assert!(
            problems.contains(&"watching team-a but no Role in team-a".to_string()),
            "{problems:?}"
        );
    }
}
