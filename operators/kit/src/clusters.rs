//! Clients for several clusters: the home cluster the operator runs in, and remote clusters
//! whose kubeconfigs are kept in Secrets of the home cluster.
//!
//! A remote cluster is a Secret labelled `gantry.dev/cluster=<name>` holding a self-contained
//! kubeconfig (credentials inline) under the key `kubeconfig`. Every replica watches those
//! Secrets: a new one adds the cluster, a changed one replaces its client (rotated credentials
//! take effect without a restart), a deleted one removes it. Each cluster has its own events
//! writer, and its health is probed (`/readyz`) and exported as `gantry_cluster_reachable`; a
//! remote that does not answer never makes the operator itself unready. A Secret that does
//! not hold a usable kubeconfig gets a Warning event.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::cache::watch_events;
use crate::events::Events;
use crate::metrics::ClusterMetrics;
use crate::runtime::Runtime;

/// The label that marks a kubeconfig Secret and names its cluster.
pub const CLUSTER_LABEL: &str = "gantry.dev/cluster";
/// The Secret's key holding the kubeconfig.
pub const KUBECONFIG_KEY: &str = "kubeconfig";
/// The home cluster's name.
pub const HOME: &str = "home";

/// How often each remote cluster is probed.
const PROBE_EVERY: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a cluster's API server answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet.
    Unknown,
    Reachable,
    Unreachable(String),
}

/// One cluster: its client, its events writer, its health. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    name: String,
    client: Client,
    events: Events,
    health: watch::Receiver<Health>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("health", &*self.health.borrow())
            .finish()
    }
}

impl Cluster {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Events written to this cluster, about its objects.
    pub fn events(&self) -> &Events {
        &self.events
    }

    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    pub fn is_reachable(&self) -> bool {
        self.health() == Health::Reachable
    }
}

/// The home cluster and the remotes known now; every clone sees the same.
#[derive(Clone)]
pub struct Clusters {
    home: Cluster,
    remotes: watch::Receiver<BTreeMap<String, Cluster>>,
}

impl Clusters {
    pub fn home(&self) -> &Cluster {
        &self.home
    }

    /// The named cluster (`home` for the home cluster).
    pub fn get(&self, name: &str) -> Option<Cluster> {
        if name == HOME {
            return Some(self.home.clone());
        }
        self.remotes.borrow().get(name).cloned()
    }

    /// The remote clusters' names, in order.
    pub fn remote_names(&self) -> Vec<String> {
        self.remotes.borrow().keys().cloned().collect()
    }

    /// Waits until a remote is added, replaced or removed.
    pub async fn changed(&mut self) {
        if self.remotes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

crate::reasons! {
    /// What the kit reports about kubeconfig Secrets.
    pub enum ClusterReason {
        /// The Secret does not hold a usable kubeconfig.
        InvalidKubeconfig => Warning, "Connect";
        /// A remote cluster was added or its credentials replaced.
        ClusterConnected => Normal, "Connect";
    }
}

/// Everything a remote needs besides its Secret.
#[derive(Clone)]
pub struct Settings {
    /// The operator's name (the events' reporting controller).
    pub controller: String,
    /// This replica's identity (the events' reporting instance).
    pub instance: String,
    pub metrics: ClusterMetrics,
    /// Events about the Secrets themselves, in the home cluster.
    pub home_events: Events,
}

/// The clusters `home` and those in the kubeconfig Secrets `secrets` lists, and the future
/// that keeps them current: poll it (spawn it) for as long as they are wanted.
/// [`Runtime::clusters`] does that for operators.
pub fn watch(
    home: Client,
    secrets: Api<Secret>,
    settings: Settings,
) -> (Clusters, impl Future<Output = ()> + Send + 'static) {
    let (sender, remotes) = watch::channel(BTreeMap::new());
    let home = Cluster {
        name: HOME.to_string(),
        events: Events::new(
            home.clone(),
            &settings.controller,
            Some(settings.instance.clone()),
        ),
        client: home,
        health: watch::channel(Health::Reachable).1,
    };
    let clusters = Clusters { home, remotes };
    let follow = async move {
        let mut remotes = Remotes {
            settings,
            sender,
            known: BTreeMap::new(),
            listed: None,
        };
        let config = watcher::Config::default().labels(CLUSTER_LABEL);
        let mut events = watch_events(secrets, config, "kubeconfig Secrets".into()).boxed();
        while let Some(event) = events.next().await {
            remotes.apply(event).await;
        }
    };
    (clusters, follow)
}

/// A remote as the Secret gave it, with the probe that follows its health.
struct Known {
    /// (namespace, name) of the Secret.
    secret: (String, String),
    fingerprint: u64,
    /// Stops the health probe when the entry goes.
    _probe: DropGuard,
}

struct Remotes {
    settings: Settings,
    sender: watch::Sender<BTreeMap<String, Cluster>>,
    known: BTreeMap<String, Known>,
    /// During a relist: the clusters seen so far.
    listed: Option<BTreeSet<String>>,
}

impl Remotes {
    async fn apply(&mut self, event: Event<Secret>) {
        match event {
            Event::Init => self.listed = Some(BTreeSet::new()),
            Event::InitApply(secret) => {
                if let Some(name) = self.upsert(&secret).await
                    && let Some(listed) = self.listed.as_mut()
                {
                    listed.insert(name);
                }
            }
            Event::InitDone => {
                if let Some(listed) = self.listed.take() {
                    let gone: Vec<String> = self
                        .known
                        .keys()
                        .filter(|name| !listed.contains(*name))
                        .cloned()
                        .collect();
                    for name in gone {
                        self.remove(&name);
                    }
                }
            }
            Event::Apply(secret) => {
                self.upsert(&secret).await;
            }
            Event::Delete(secret) => self.forget_secret(&secret_key(&secret), None),
        }
    }

    /// Adds or replaces the cluster the Secret describes; returns its name when it is usable.
    async fn upsert(&mut self, secret: &Secret) -> Option<String> {
        let key = secret_key(secret);
        let name = secret
            .labels()
            .get(CLUSTER_LABEL)
            .cloned()
            .filter(|n| !n.is_empty() && n != HOME);
        // A Secret relabelled (or whose label went bad) no longer provides what it named.
        self.forget_secret(&key, name.as_deref());
        let Some(name) = name else {
            self.report(
                secret,
                format!(
                    "the label {CLUSTER_LABEL} must name the cluster (not empty, not {HOME:?})"
                ),
            )
            .await;
            return None;
        };
        let kubeconfig = secret
            .data
            .as_ref()
            .and_then(|d| d.get(KUBECONFIG_KEY))
            .map(|b| b.0.clone())
            .unwrap_or_default();
        let fingerprint = {
            let mut hasher = DefaultHasher::new();
            kubeconfig.hash(&mut hasher);
            hasher.finish()
        };
        if self
            .known
            .get(&name)
            .is_some_and(|k| k.fingerprint == fingerprint && k.secret == key)
        {
            return Some(name);
        }
        let client = match client_from(&kubeconfig).await {
            Ok(client) => client,
            Err(why) => {
                self.remove(&name);
                self.report(secret, format!("cluster {name}: {why}")).await;
                return None;
            }
        };
        let (health_tx, health) = watch::channel(Health::Unknown);
        let probe = CancellationToken::new();
        tokio::spawn(follow_health(
            name.clone(),
            client.clone(),
            health_tx,
            self.settings.metrics.clone(),
            probe.clone(),
        ));
        let cluster = Cluster {
            name: name.clone(),
            events: Events::new(
                client.clone(),
                &self.settings.controller,
                Some(self.settings.instance.clone()),
            ),
            client,
            health,
        };
        // Replacing or dropping the entry (at shutdown too) stops the old probe.
        self.known.insert(
            name.clone(),
            Known {
                secret: key,
                fingerprint,
                _probe: probe.drop_guard(),
            },
        );
        self.sender.send_modify(|remotes| {
            remotes.insert(name.clone(), cluster);
        });
        tracing::info!(cluster = %name, secret = %secret.name_any(), "connected a remote cluster");
        self.settings
            .home_events
            .publish(
                &secret.object_ref(&()),
                ClusterReason::ClusterConnected,
                format!("cluster {name} uses the kubeconfig in this Secret"),
            )
            .await;
        Some(name)
    }

    /// Removes the clusters the Secret `key` provided, but for `keep`.
    fn forget_secret(&mut self, key: &(String, String), keep: Option<&str>) {
        let names: Vec<String> = self
            .known
            .iter()
            .filter(|(name, known)| &known.secret == key && Some(name.as_str()) != keep)
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            self.remove(&name);
        }
    }

    fn remove(&mut self, name: &str) {
        if self.known.remove(name).is_some() {
            self.settings.metrics.forget(name);
            self.sender.send_modify(|remotes| {
                remotes.remove(name);
            });
            tracing::info!(cluster = %name, "removed a remote cluster");
        }
    }

    async fn report(&self, secret: &Secret, why: String) {
        tracing::warn!(secret = %secret.name_any(), %why, "unusable kubeconfig Secret");
        self.settings
            .home_events
            .publish(
                &secret.object_ref(&()),
                ClusterReason::InvalidKubeconfig,
                why,
            )
            .await;
    }
}

fn secret_key(secret: &Secret) -> (String, String) {
    (secret.namespace().unwrap_or_default(), secret.name_any())
}

/// A client from a self-contained kubeconfig.
pub async fn client_from(kubeconfig: &[u8]) -> Result<Client, String> {
    if kubeconfig.is_empty() {
        return Err(format!("the Secret has no {KUBECONFIG_KEY:?} key"));
    }
    let text =
        std::str::from_utf8(kubeconfig).map_err(|_| "the kubeconfig is not UTF-8".to_string())?;
    let parsed = Kubeconfig::from_yaml(text).map_err(|err| format!("not a kubeconfig: {err}"))?;
    let config = kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .map_err(|err| format!("the kubeconfig is not usable: {err}"))?;
    Client::try_from(config).map_err(|err| format!("could not build a client: {err}"))
}

async fn follow_health(
    name: String,
    client: Client,
    health: watch::Sender<Health>,
    metrics: ClusterMetrics,
    stop: CancellationToken,
) {
    loop {
        let probe = async {
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|err| err.to_string())?;
            match client.request_text(request).await {
                Ok(text) if text.trim() == "ok" => Ok(()),
                Ok(text) => Err(format!("/readyz says {:?}", text.trim())),
                Err(err) => Err(err.to_string()),
            }
        };
        let now = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(())) => Health::Reachable,
            Ok(Err(why)) => Health::Unreachable(why),
            Err(_) => Health::Unreachable(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        if stop.is_cancelled() {
            return;
        }
        metrics.set_reachable(&name, now == Health::Reachable);
        let before = health.send_replace(now.clone());
        if before != now {
            match &now {
                Health::Reachable => tracing::info!(cluster = %name, "cluster reachable"),
                Health::Unreachable(why) => {
                    tracing::warn!(cluster = %name, %why, "cluster unreachable")
                }
                Health::Unknown => {}
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

impl Runtime {
    /// The home cluster and the remotes whose kubeconfig Secrets are in `namespace`, kept
    /// current on this replica until shutdown.
    pub fn clusters(&self, namespace: &str) -> Clusters {
        let secrets: Api<Secret> = Api::namespaced(self.client().clone(), namespace);
        let settings = Settings {
            controller: self.info().name.to_string(),
            instance: self.identity().to_string(),
            metrics: self.metrics().clusters.clone(),
            home_events: self.events().clone(),
        };
        let (clusters, follow) = watch(self.client().clone(), secrets, settings);
        let shutdown = self.shutdown_token().clone();
        tokio::spawn(async move {
            tokio::select! {
                () = follow => {}
                () = shutdown.cancelled() => {}
            }
        });
        clusters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unusable_kubeconfigs_are_explained() {
        let why = |kubeconfig: &'static [u8]| async move {
            client_from(kubeconfig).await.err().expect("refused")
        };
        assert!(why(b"").await.contains("no \"kubeconfig\" key"));
        assert!(why(b"\xff").await.contains("not UTF-8"));
        assert!(why(b"{not: [yaml").await.contains("not a kubeconfig"));
        let no_context = b"apiVersion: v1\nkind: Config\nclusters: []\nusers: []\ncontexts: []\n";
        assert!(why(no_context).await.contains("not usable"));
    }

    #[tokio::test]
    async fn a_self_contained_kubeconfig_makes_a_client() {
        let kubeconfig = "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n";
        assert!(client_from(kubeconfig.as_bytes()).await.is_ok());
    }
}
