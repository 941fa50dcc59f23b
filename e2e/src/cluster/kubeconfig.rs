//! Kubeconfigs: written for each component and user, read into clients.

use std::path::Path;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::pki;

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

/// Deletes the cluster-wide or named object `name` through `api_of(client)` with an admin
/// client from `kubeconfig`, on a thread and runtime of its own: for drops, which cannot rely
/// on the test's runtime (it may be shutting down). Failures are printed, not returned.
pub fn delete_on_the_side<K>(
    kubeconfig: &Path,
    name: &str,
    api_of: fn(Client) -> kube::Api<K>,
    params: kube::api::DeleteParams,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + 'static,
    K::DynamicType: Default,
{
    let (kubeconfig, owned_name) = (kubeconfig.to_owned(), name.to_owned());
    let deleted = std::thread::spawn(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let client = client_from_kubeconfig(&kubeconfig).await?;
            api_of(client).delete(&owned_name, &params).await?;
            Ok(())
        })
    })
    .join();
    if let Ok(Err(e)) = deleted {
        eprintln!("deleting {} {name}: {e:#}", K::kind(&Default::default()));
    }
}
