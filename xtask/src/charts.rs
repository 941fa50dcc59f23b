//! Chart checks: every chart lints and renders with each Helm given, and the rendered operator
//! objects follow the conventions, for Deployments and node agents' DaemonSets alike:
//! restricted pod security (a node agent gets only the privileges its Chart.yaml declares),
//! leader election and a disruption budget exactly when a Deployment has replicas > 1,
//! namespaced RBAC when one namespace is watched, webhook configurations that never see the
//! system namespaces or the release's own, and bad values rejected by values.schema.json.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_yaml::Value;

use crate::schemas::Privileges;

/// Namespaces no Gantry webhook may ever see, besides the release's own.
const PROTECTED_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// A library chart cannot be rendered on its own.
fn is_library(chart: &Path) -> anyhow::Result<bool> {
    let meta = std::fs::read_to_string(chart.join("Chart.yaml"))
        .with_context(|| format!("reading {}/Chart.yaml", chart.display()))?;
    let meta: Value = serde_yaml::from_str(&meta)?;
    Ok(meta.get("type").and_then(Value::as_str) == Some("library"))
}

/// Whether the chart deploys an operator (it uses the shared workload template).
fn is_operator_chart(chart: &Path) -> bool {
    std::fs::read_to_string(chart.join("templates/workload.yaml"))
        .is_ok_and(|t| t.contains("gantry.workload"))
}

/// The chart's default values.
fn values(chart: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(chart.join("values.yaml"))
        .with_context(|| format!("reading {}/values.yaml", chart.display()))?;
    Ok(serde_yaml::from_str(&text)?)
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
    let defaults = values(chart)?;
    let chart_yaml: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml"))?)?;
    let privileges = Privileges::of_chart(&chart_yaml)?;
    let none = Privileges::default();
    let mut problems = [
        conventions(&render(helm, chart, &["replicas=1"])?, 1, None, &none),
        conventions(&render(helm, chart, &["replicas=3"])?, 3, None, &none),
        conventions(
            &render(helm, chart, &["replicas=1", "watchNamespace=team-a"])?,
            1,
            Some("team-a"),
            &none,
        ),
    ]
    .concat();
    let mut bad = vec![
        "replicas=-1",
        "logFormat=xml",
        "image.pullPolicy=Sometimes",
        "watchNamespace=Not_A_Namespace",
        "reconcileIntervalMs=-1",
    ];
    if defaults.get("nodeAgent").is_some() {
        for sets in [
            &["nodeAgent.enabled=true"][..],
            &["nodeAgent.enabled=true", "watchNamespace=team-a"],
        ] {
            let namespace = sets.iter().find_map(|s| s.strip_prefix("watchNamespace="));
            problems.extend(conventions(
                &render(helm, chart, sets)?,
                1,
                namespace,
                &privileges,
            ));
        }
        if privileges.host_paths.is_empty() {
            bad.extend(["nodeAgent.hostPaths[0].name=etc,nodeAgent.hostPaths[0].path=/etc"]);
        }
        if privileges.capabilities.is_empty() {
            bad.push("nodeAgent.capabilities[0]=SYS_ADMIN");
        }
        if !privileges.run_as_root {
            bad.push("nodeAgent.runAsRoot=true");
        }
    }
    if defaults.get("webhook").is_some() {
        for sets in [
            &["webhook.enabled=true"][..],
            &[
                "webhook.enabled=true",
                "replicas=3",
                "watchNamespace=team-a",
            ],
            &[
                "webhook.enabled=true",
                "webhook.certificates.mode=certManager",
            ],
        ] {
            let docs = render(helm, chart, sets)?;
            let namespace = sets.iter().find_map(|s| s.strip_prefix("watchNamespace="));
            let replicas = if sets.contains(&"replicas=3") { 3 } else { 1 };
            problems.extend(conventions(&docs, replicas, namespace, &none));
            if !docs
                .iter()
                .any(|d| kind_of(d) == "ValidatingWebhookConfiguration")
            {
                problems.push(format!(
                    "{sets:?}: no ValidatingWebhookConfiguration rendered"
                ));
            }
        }
        bad.extend([
            "webhook.failurePolicy=Sometimes",
            "webhook.certificates.mode=byHand",
        ]);
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    for set in bad {
        if render(helm, chart, &[set]).is_ok() {
            bail!("values {set:?} were accepted; values.schema.json must reject them");
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

/// The elements of the sequence at `key`, none when it is missing.
fn items<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    value
        .get(key)
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
}

fn kind_of(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or_default()
}

fn at<'a>(doc: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |v, key| v.get(*key))
}

/// Every way the rendered objects of an operator chart depart from the conventions; a node
/// agent may have what `privileges` declares and nothing more.
pub fn conventions(
    docs: &[Value],
    replicas: u64,
    watch_namespace: Option<&str>,
    privileges: &Privileges,
) -> Vec<String> {
    let mut problems = Vec::new();
    let workloads: Vec<&Value> = docs
        .iter()
        .filter(|d| matches!(kind_of(d), "Deployment" | "DaemonSet"))
        .collect();
    let [workload] = workloads.as_slice() else {
        problems.push(format!(
            "expected one Deployment or DaemonSet, found {}",
            workloads.len()
        ));
        return problems;
    };
    let agent = kind_of(workload) == "DaemonSet";
    let pod = at(workload, &["spec", "template", "spec"])
        .cloned()
        .unwrap_or(Value::Null);
    // Only a node agent may have privileges at all.
    let none = Privileges::default();
    problems.extend(pod_security(&pod, if agent { privileges } else { &none }));
    let leader_elect = items(&pod, "containers").any(|c| {
        c.get("args")
            .and_then(Value::as_sequence)
            .is_some_and(|args| args.iter().any(|a| a.as_str() == Some("--leader-elect")))
    });
    let has = |kind: &str| docs.iter().any(|d| kind_of(d) == kind);
    let wants_election = !agent && replicas > 1;
    if wants_election != leader_elect {
        problems.push(format!(
            "{} with replicas={replicas} but --leader-elect is {}",
            kind_of(workload),
            if leader_elect { "set" } else { "missing" }
        ));
    }
    if wants_election != has("PodDisruptionBudget") {
        problems.push(format!(
            "{} with replicas={replicas} but a PodDisruptionBudget is {}",
            kind_of(workload),
            if has("PodDisruptionBudget") {
                "rendered"
            } else {
                "missing"
            }
        ));
    }
    if leader_elect && !grants(docs, "Role", "leases") {
        problems.push("leader election without a Role for leases".into());
    }
    problems.extend(rbac_scope(docs, watch_namespace));
    problems.extend(webhook_scope(docs));
    if !has("ServiceAccount") {
        problems.push("no ServiceAccount".into());
    }
    problems
}

/// Restricted pod security, but for what `privileges` allows.
fn pod_security(pod: &Value, privileges: &Privileges) -> Vec<String> {
    let mut problems = Vec::new();
    let pod_security = pod.get("securityContext");
    let non_root = pod_security
        .and_then(|s| s.get("runAsNonRoot"))
        .and_then(Value::as_bool);
    if non_root != Some(true) && !privileges.run_as_root {
        problems.push("pod does not require runAsNonRoot".into());
    }
    if pod_security
        .and_then(|s| at(s, &["seccompProfile", "type"]))
        .and_then(Value::as_str)
        != Some("RuntimeDefault")
    {
        problems.push("pod seccompProfile is not RuntimeDefault".into());
    }
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod.get(host).and_then(Value::as_bool) == Some(true) {
            problems.push(format!("pod sets {host}"));
        }
    }
    for volume in items(pod, "volumes") {
        if let Some(path) = at(volume, &["hostPath", "path"]).and_then(Value::as_str)
            && !privileges.host_paths.iter().any(|p| p == path)
        {
            problems.push(format!("host path {path} is not declared in Chart.yaml"));
        }
    }
    for container in items(pod, "containers") {
        let name = container.get("name").and_then(Value::as_str).unwrap_or("?");
        let security = container.get("securityContext");
        let flag = |key: &str| security.and_then(|s| s.get(key)).and_then(Value::as_bool);
        if flag("readOnlyRootFilesystem") != Some(true) {
            problems.push(format!("container {name}: root filesystem is writable"));
        }
        if flag("allowPrivilegeEscalation") != Some(false) {
            problems.push(format!("container {name}: privilege escalation allowed"));
        }
        if flag("privileged") == Some(true) {
            problems.push(format!("container {name}: privileged"));
        }
        let drops_all = security
            .and_then(|s| at(s, &["capabilities", "drop"]))
            .and_then(Value::as_sequence)
            .is_some_and(|d| d.iter().any(|c| c.as_str() == Some("ALL")));
        if !drops_all {
            problems.push(format!("container {name}: capabilities not dropped"));
        }
        for added in security
            .and_then(|s| at(s, &["capabilities", "add"]))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !privileges.capabilities.iter().any(|c| c == added) {
                problems.push(format!(
                    "container {name}: capability {added} is not declared in Chart.yaml"
                ));
            }
        }
        for probe in ["livenessProbe", "readinessProbe"] {
            if container.get(probe).is_none() {
                problems.push(format!("container {name}: no {probe}"));
            }
        }
    }
    problems
}

/// Whether a rendered object of `kind` grants something on `resource`.
fn grants(docs: &[Value], kind: &str, resource: &str) -> bool {
    docs.iter().any(|d| {
        kind_of(d) == kind
            && d.get("rules")
                .and_then(Value::as_sequence)
                .is_some_and(|rules| {
                    rules.iter().any(|r| {
                        r.get("resources")
                            .and_then(Value::as_sequence)
                            .is_some_and(|res| res.iter().any(|x| x.as_str() == Some(resource)))
                    })
                })
    })
}

/// Watching one namespace, a ClusterRole may grant only named objects; watching all, the
/// operator's rules are a ClusterRole.
fn rbac_scope(docs: &[Value], watch_namespace: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    let cluster_roles: Vec<&Value> = docs
        .iter()
        .filter(|d| kind_of(d) == "ClusterRole")
        .collect();
    match watch_namespace {
        None if cluster_roles.is_empty() => {
            problems.push("watching all namespaces without a ClusterRole".into());
        }
        None => {}
        Some(ns) => {
            let broad = cluster_roles.iter().any(|role| {
                items(role, "rules").any(|r| {
                    r.get("resourceNames")
                        .and_then(Value::as_sequence)
                        .is_none_or(|n| n.is_empty())
                })
            });
            if broad {
                problems.push(format!(
                    "watching {ns} but a ClusterRole grants more than named objects"
                ));
            }
            let namespaced_role = docs.iter().any(|d| {
                kind_of(d) == "Role"
                    && at(d, &["metadata", "namespace"]).and_then(Value::as_str) == Some(ns)
            });
            if !namespaced_role {
                problems.push(format!("watching {ns} but no Role in {ns}"));
            }
        }
    }
    problems
}

/// Every webhook's namespaceSelector keeps out the system namespaces and the release's own.
fn webhook_scope(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    for config in docs.iter().filter(|d| {
        matches!(
            kind_of(d),
            "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration"
        )
    }) {
        for webhook in items(config, "webhooks") {
            let name = webhook.get("name").and_then(Value::as_str).unwrap_or("?");
            let service_namespace =
                at(webhook, &["clientConfig", "service", "namespace"]).and_then(Value::as_str);
            let excluded: Vec<&str> = at(webhook, &["namespaceSelector", "matchExpressions"])
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .filter(|e| {
                    e.get("key").and_then(Value::as_str) == Some("kubernetes.io/metadata.name")
                        && e.get("operator").and_then(Value::as_str) == Some("NotIn")
                })
                .flat_map(|e| items(e, "values"))
                .filter_map(Value::as_str)
                .collect();
            for namespace in PROTECTED_NAMESPACES
                .iter()
                .copied()
                .chain(service_namespace)
            {
                if !excluded.contains(&namespace) {
                    problems.push(format!(
                        "webhook {name} does not exclude namespace {namespace}"
                    ));
                }
            }
            if webhook.get("sideEffects").and_then(Value::as_str) != Some("None") {
                problems.push(format!("webhook {name} does not declare sideEffects: None"));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails unless some problem says `text`.
    fn assert_mentions(problems: &[String], text: &str) {
        assert!(
            problems.iter().any(|p| p.contains(text)),
            "no {text:?} in {problems:?}"
        );
    }

    fn docs(yaml: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| serde::Deserialize::deserialize(d).expect("valid yaml"))
            .collect()
    }

    const GOOD: &str = r#"
kind: ServiceAccount
---
kind: ClusterRole
rules: [{resources: [pods], verbs: [get]}]
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
        assert_eq!(
            conventions(&docs(GOOD), 1, None, &Privileges::default()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn loosened_security_is_reported() {
        let bad = GOOD
            .replace(
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: false",
            )
            .replace("drop: [ALL]", "drop: []");
        let problems = conventions(&docs(&bad), 1, None, &Privileges::default());
        assert_mentions(&problems, "container operator: root filesystem is writable");
        assert_mentions(&problems, "container operator: capabilities not dropped");
    }

    #[test]
    fn several_replicas_need_election_and_budget() {
        let problems = conventions(&docs(GOOD), 2, None, &Privileges::default());
        assert_mentions(&problems, "--leader-elect is missing");
        assert_mentions(&problems, "PodDisruptionBudget is missing");
    }

    #[test]
    fn one_namespace_needs_namespaced_rbac() {
        let problems = conventions(&docs(GOOD), 1, Some("team-a"), &Privileges::default());
        assert!(
            problems.contains(
                &"watching team-a but a ClusterRole grants more than named objects".to_string()
            ),
            "{problems:?}"
        );
        assert_mentions(&problems, "watching team-a but no Role in team-a");
    }

    /// A node agent: GOOD as a DaemonSet with a host path and a capability.
    fn agent() -> String {
        GOOD.replace("kind: Deployment", "kind: DaemonSet")
            .replace(
                "      containers:",
                "      volumes:\n        - {name: plugins, hostPath: {path: /var/lib/kubelet/device-plugins}}\n      containers:",
            )
            .replace("drop: [ALL]}", "drop: [ALL], add: [SYS_ADMIN]}")
    }

    #[test]
    fn a_node_agent_may_have_exactly_what_its_chart_declares() {
        let declared = Privileges {
            host_paths: vec!["/var/lib/kubelet/device-plugins".into()],
            capabilities: vec!["SYS_ADMIN".into()],
            run_as_root: false,
        };
        assert_eq!(
            conventions(&docs(&agent()), 1, None, &declared),
            Vec::<String>::new()
        );
        let problems = conventions(&docs(&agent()), 1, None, &Privileges::default());
        assert!(
            problems.contains(
                &"host path /var/lib/kubelet/device-plugins is not declared in Chart.yaml"
                    .to_string()
            ),
            "{problems:?}"
        );
        assert!(
            problems.contains(
                &"container operator: capability SYS_ADMIN is not declared in Chart.yaml"
                    .to_string()
            ),
            "{problems:?}"
        );
        let escalated = agent()
            .replace(
                "allowPrivilegeEscalation: false",
                "allowPrivilegeEscalation: false, privileged: true",
            )
            .replace("seccompProfile", "hostPID: true, seccompProfile");
        let problems = conventions(&docs(&escalated), 1, None, &declared);
        assert_mentions(&problems, "container operator: privileged");
    }

    #[test]
    fn a_node_agent_never_elects_a_leader() {
        let electing = agent().replace("args: [run]", "args: [run, --leader-elect]");
        let declared = Privileges {
            host_paths: vec!["/var/lib/kubelet/device-plugins".into()],
            capabilities: vec!["SYS_ADMIN".into()],
            run_as_root: false,
        };
        let problems = conventions(&docs(&electing), 1, None, &declared);
        assert_mentions(
            &problems,
            "DaemonSet with replicas=1 but --leader-elect is set",
        );
    }

    #[test]
    fn watching_one_namespace_allows_cluster_roles_for_named_objects_only() {
        let named = format!(
            "{GOOD}---\nkind: Role\nmetadata: {{namespace: team-a}}\nrules: []\n"
        )
        .replace(
            "kind: ClusterRole\nrules: [{resources: [pods], verbs: [get]}]",
            "kind: ClusterRole\nrules: [{resources: [validatingwebhookconfigurations], resourceNames: [gantry-x], verbs: [patch]}]",
        );
        assert_eq!(
            conventions(&docs(&named), 1, Some("team-a"), &Privileges::default()),
            Vec::<String>::new()
        );
    }

    const WEBHOOK: &str = r#"
kind: ValidatingWebhookConfiguration
webhooks:
  - name: x.gantry.dev
    clientConfig: {service: {name: s, namespace: gantry-system}}
    sideEffects: None
    namespaceSelector:
      matchExpressions:
        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [kube-system, kube-public, kube-node-lease, gantry-system]}
"#;

    #[test]
    fn webhooks_keep_out_the_system_namespaces_and_their_own() {
        assert_eq!(webhook_scope(&docs(WEBHOOK)), Vec::<String>::new());
        let open = WEBHOOK.replace("kube-node-lease, gantry-system", "kube-node-lease");
        assert_eq!(
            webhook_scope(&docs(&open)),
            ["webhook x.gantry.dev does not exclude namespace gantry-system"]
        );
        let wrong_operator = WEBHOOK.replace("NotIn", "In");
        assert_eq!(webhook_scope(&docs(&wrong_operator)).len(), 4);
    }
}
