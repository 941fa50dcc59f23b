//! Manifests: parsing multi-document YAML, server-side applying objects of any kind, installing
//! CRDs, and rendering Helm charts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::{self, Scope};
use kube::{Client, ResourceExt as _};

use crate::wait;

/// Field manager for everything the harness applies.
pub const FIELD_MANAGER: &str = "gantry-e2e";

/// Path of helm v3 (`$HELM3`, which the Makefile sets to the helm it installs).
pub const HELM_ENV: &str = "HELM3";

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
pub async fn install_crds(client: &Client, dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading CRD directory {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut names = Vec::new();
    for file in files {
        names.extend(install_crd_file(client, &file).await?);
    }
    Ok(names)
}

/// Applies the CustomResourceDefinitions of one file and waits until each is Established.
pub async fn install_crd_file(client: &Client, file: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut names = Vec::new();
    for obj in parse_yaml_documents(&text).with_context(|| format!("in {}", file.display()))? {
        if obj
            .types
            .as_ref()
            .is_some_and(|t| t.kind == "CustomResourceDefinition")
        {
            names.push(apply_object(client, obj, None).await?.name_any());
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in &names {
        wait::for_object(
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

/// An API for objects of `kind` (`apiVersion` like `apps.gantry.dev/v1alpha1`) in
/// `namespace` as dynamic objects, found through discovery: tests read an operator's wire
/// format rather than its Rust types.
pub async fn dynamic_api(
    client: &Client,
    namespace: &str,
    api_version: &str,
    kind: &str,
) -> Result<Api<DynamicObject>> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, _) = discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("looking up {api_version}/{kind}"))?;
    Ok(Api::namespaced_with(client.clone(), namespace, &resource))
}

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
    set: &[(String, String)],
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
