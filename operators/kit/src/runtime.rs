//! The operator process: parse the command line, set up logging, metrics and health endpoints,
//! take part in the leader election, run the operator's body on every replica, and stop
//! cleanly.
//!
//! The body gets a [`Runtime`] on every replica, at once. What it starts is of two kinds:
//! - **services**, which every replica runs: watch caches and indexes, HTTPS endpoints
//!   (webhooks, scheduler extenders), node agents' work on their own node;
//! - **leader-only work** ([`Runtime::while_leading`], and every controller the kit runs), which
//!   runs while this replica holds the lease, stops at once when it loses it, and starts again
//!   if it wins it back. Without `--leader-elect` a replica always leads.
//!
//! Shutdown on SIGTERM (or SIGINT) goes: `/readyz` turns unready; controllers stop taking new
//! work and finish what is in flight, and services keep answering for
//! `--shutdown-delay-seconds` before they stop listening (all bounded by
//! `--shutdown-timeout-seconds`); the leader lease is released so a standby takes over at once;
//! the endpoints close; the process exits 0. A second signal exits at once.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, FromArgMatches};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::{Api, Client, Resource};
use tokio_util::sync::CancellationToken;

use crate::cli::{self, Action, KitArgs, RunArgs};
use crate::endpoints::{Readiness, Servers};
use crate::error::KitError;
use crate::events::Events;
use crate::leader::{LeaderElector, Leadership, LeaseConfig};
use crate::metrics::Metrics;

/// Errors an operator's body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the kit needs to know about an operator.
#[derive(Clone, Copy)]
pub struct OperatorInfo {
    /// The binary's name, e.g. `gantry-gray-upgrade`; also the default lease name, the event
    /// reporter and the server-side-apply field manager.
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    pub version: &'static str,
    /// The operator's CRDs, printed by the `crd` command.
    pub crds: fn() -> Vec<CustomResourceDefinition>,
}

/// Which namespaces the operator watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    Namespace(String),
}

/// How an API handle for a kind follows the operator's [`Scope`]: namespaced kinds are read
/// in the watched namespace (or all), cluster-scoped kinds always cluster-wide.
pub trait ApiScope {
    fn api<K>(client: Client, scope: &Scope) -> Api<K>
    where
        K: Resource<Scope = Self, DynamicType = ()>;
}

impl ApiScope for NamespaceResourceScope {
    fn api<K>(client: Client, scope: &Scope) -> Api<K>
    where
        K: Resource<Scope = Self, DynamicType = ()>,
    {
        match scope {
            Scope::All => Api::all(client),
            Scope::Namespace(ns) => Api::namespaced(client, ns),
        }
    }
}

impl ApiScope for ClusterResourceScope {
    fn api<K>(client: Client, _: &Scope) -> Api<K>
    where
        K: Resource<Scope = Self, DynamicType = ()>,
    {
        Api::all(client)
    }
}

/// Everything an operator's parts get from the kit, on every replica. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    info: OperatorInfo,
    client: Client,
    scope: Scope,
    identity: String,
    events: Events,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    leadership: Leadership,
    shutdown: CancellationToken,
    reconcile_interval: Duration,
    shutdown_delay: Duration,
}

/// How a [`Runtime`] is set up: the process fills it in from the command line; tests and
/// embedders set what they need and take the rest from `Default` (every namespace, always
/// leading, no pacing, a fresh registry and readiness).
pub struct RuntimeSettings {
    pub scope: Scope,
    /// Default: the operator's name.
    pub identity: Option<String>,
    /// Default: a fresh registry.
    pub metrics: Option<Metrics>,
    pub readiness: Arc<Readiness>,
    pub leadership: Leadership,
    pub shutdown: CancellationToken,
    pub reconcile_interval: Duration,
    pub shutdown_delay: Duration,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            scope: Scope::All,
            identity: None,
            metrics: None,
            readiness: Arc::default(),
            leadership: Leadership::always(),
            shutdown: CancellationToken::new(),
            reconcile_interval: Duration::ZERO,
            shutdown_delay: Duration::ZERO,
        }
    }
}

impl Runtime {
    pub fn new(info: OperatorInfo, client: Client, settings: RuntimeSettings) -> Self {
        let identity = settings.identity.unwrap_or_else(|| info.name.to_string());
        let metrics = settings
            .metrics
            .unwrap_or_else(|| Metrics::new(info.name, info.version));
        Runtime {
            inner: Arc::new(Inner {
                events: Events::new(client.clone(), info.name, Some(identity.clone())),
                info,
                client,
                scope: settings.scope,
                identity,
                metrics,
                readiness: settings.readiness,
                leadership: settings.leadership,
                shutdown: settings.shutdown,
                reconcile_interval: settings.reconcile_interval,
                shutdown_delay: settings.shutdown_delay,
            }),
        }
    }

    pub fn info(&self) -> &OperatorInfo {
        &self.inner.info
    }

    /// The home cluster's client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn scope(&self) -> &Scope {
        &self.inner.scope
    }

    /// An API handle for a kind: over the watched namespace (or all) for namespaced kinds,
    /// cluster-wide for cluster-scoped ones.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<DynamicType = ()>,
        K::Scope: ApiScope,
    {
        K::Scope::api(self.inner.client.clone(), &self.inner.scope)
    }

    /// This replica's name: the lease holder identity and the events' reporting instance.
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// The home cluster's events writer.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.inner.readiness
    }

    /// Whether this replica leads now.
    pub fn leadership(&self) -> &Leadership {
        &self.inner.leadership
    }

    /// The least time between the starts of two reconciles of one object, for controllers that
    /// do not set their own (`--reconcile-interval-ms`).
    pub fn reconcile_interval(&self) -> Duration {
        self.inner.reconcile_interval
    }

    /// Cancelled when the process has been asked to stop.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Resolves when services should stop listening: `--shutdown-delay-seconds` after the
    /// process was asked to stop, so that Services have stopped routing to this replica.
    pub async fn stop_serving(&self) {
        self.inner.shutdown.cancelled().await;
        tokio::time::sleep(self.inner.shutdown_delay).await;
    }

    /// The server-side-apply field manager for everything this operator writes.
    pub fn field_manager(&self) -> &'static str {
        self.inner.info.name
    }

    /// Runs `work` while this replica leads: started each time it wins the lease, dropped at
    /// once (cancelling whatever it was doing) when it loses it. Returns when `work` returns
    /// (it should, once [`Runtime::shutdown_token`] is cancelled), or at shutdown while
    /// standing by.
    pub async fn while_leading<F, Fut>(&self, what: &'static str, mut work: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut leadership = self.leadership().clone();
        loop {
            let term = tokio::select! {
                term = leadership.acquired() => term,
                () = self.shutdown_token().cancelled() => return,
            };
            if self.shutdown_token().is_cancelled() {
                return;
            }
            tracing::info!(work = what, term, "leading: starting leader-only work");
            tokio::select! {
                () = work() => return,
                () = leadership.ended(term) => {
                    tracing::warn!(work = what, term, "no longer leading: stopped leader-only work");
                }
            }
        }
    }
}

/// The whole `main` of an operator binary whose own flags are `A` ([`cli::NoArgs`] for none):
/// returns the process exit code.
///
/// `body` runs on every replica with the [`Runtime`] and the operator's flags; it starts the
/// operator's services and leader-only work and returns once they have stopped (they stop when
/// [`Runtime::shutdown_token`] is cancelled).
pub fn main<A, F, Fut, E>(info: OperatorInfo, body: F) -> ExitCode
where
    A: Args + FromArgMatches,
    F: FnOnce(Runtime, A) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let action =
        match cli::parse::<A, _, _>(info.name, info.about, info.version, std::env::args_os()) {
            Ok(action) => action,
            Err(err) => {
                let _ = err.print();
                return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2));
            }
        };
    let args = match action {
        Action::PrintCrds => return print_crds(&info),
        Action::Run(args) => args,
    };
    if let Err(err) = crate::telemetry::init(args.kit.log_format, &args.kit.log_level) {
        eprintln!("{}: {err}", info.name);
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{}: {}", info.name, KitError::Runtime(err));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_operator(info, args, body)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "operator stopped with an error");
            ExitCode::FAILURE
        }
    }
}

fn print_crds(info: &OperatorInfo) -> ExitCode {
    match crate::crd::to_yaml(info.name, &(info.crds)()) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{}: {err}", info.name);
            ExitCode::FAILURE
        }
    }
}

/// Runs the operator until shutdown; see the module docs for the sequence.
pub async fn run_operator<A, F, Fut, E>(
    info: OperatorInfo,
    args: RunArgs<A>,
    body: F,
) -> Result<(), BoxError>
where
    A: Args,
    F: FnOnce(Runtime, A) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let RunArgs { kit, operator } = args;
    let config = kube::Config::infer().await.map_err(KitError::Kubeconfig)?;
    let client = Client::try_from(config).map_err(KitError::Client)?;
    let shutdown = CancellationToken::new();
    listen_for_signals(shutdown.clone()).map_err(KitError::Signal)?;

    let metrics = Metrics::new(info.name, info.version);
    let readiness = Arc::new(Readiness::default());
    let stop_servers = CancellationToken::new();
    let servers = Servers::start(
        kit.metrics_addr,
        kit.health_addr,
        metrics.clone(),
        readiness.clone(),
        stop_servers.clone(),
    )
    .await?;

    let identity = kit.identity.clone().unwrap_or_else(default_identity);
    let release = CancellationToken::new();
    let (leadership, elector) = campaign(&info, &kit, &client, &identity, &release);
    tokio::spawn(crate::metrics::follow_leadership(
        metrics.clone(),
        leadership.clone(),
    ));
    let runtime = Runtime::new(
        info,
        client,
        RuntimeSettings {
            scope: match &kit.namespace {
                Some(ns) => Scope::Namespace(ns.clone()),
                None => Scope::All,
            },
            identity: Some(identity),
            metrics: Some(metrics.clone()),
            readiness: readiness.clone(),
            leadership,
            shutdown: shutdown.clone(),
            reconcile_interval: kit.reconcile_interval(),
            shutdown_delay: kit.shutdown_delay(),
        },
    );
    tracing::info!(scope = ?runtime.scope(), identity = %runtime.identity(), "starting");

    let mut work = Box::pin(body(runtime, operator));
    let result: Result<(), BoxError> = tokio::select! {
        result = &mut work => match result {
            Err(err) => Err(err.into()),
            Ok(()) if shutdown.is_cancelled() => Ok(()),
            Ok(()) => Err("the operator stopped without being asked to".into()),
        },
        () = shutdown.cancelled() => {
            readiness.set_stopping();
            tracing::info!(timeout = ?kit.shutdown_timeout(), "shutting down: finishing in-flight work");
            match tokio::time::timeout(kit.shutdown_timeout(), &mut work).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => {
                    tracing::warn!("in-flight work did not finish within the shutdown timeout; abandoning it");
                    Ok(())
                }
            }
        }
    };
    // Dropping the body cancels whatever it still runs, so nothing acts once the lease is free.
    drop(work);
    readiness.set_stopping();
    shutdown.cancel();
    release.cancel();
    if let Some(elector) = elector
        && let Err(err) = elector.await
    {
        tracing::warn!(error = %err, "leader election task failed");
    }
    stop_servers.cancel();
    servers.join().await?;
    tracing::info!("stopped");
    result
}

/// Starts the election when asked for; without it this replica always leads.
fn campaign(
    info: &OperatorInfo,
    kit: &KitArgs,
    client: &Client,
    identity: &str,
    release: &CancellationToken,
) -> (Leadership, Option<tokio::task::JoinHandle<()>>) {
    if !kit.leader_elect {
        return (Leadership::always(), None);
    }
    let mut lease = LeaseConfig::new(
        kit.lease_name
            .clone()
            .unwrap_or_else(|| info.name.to_string()),
        kit.lease_namespace.clone().unwrap_or_else(own_namespace),
        identity.to_string(),
    );
    lease.duration = kit.lease_duration();
    lease.renew_deadline = lease.duration.mul_f64(2.0 / 3.0);
    tracing::info!(lease = %lease.name, namespace = %lease.namespace, %identity, "standing by for leadership");
    let (standing, leadership) = Leadership::channel();
    let elector = LeaderElector::new(client.clone(), lease);
    let task = tokio::spawn(elector.run(standing, release.clone()));
    (leadership, Some(task))
}

fn listen_for_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM"),
            _ = int.recv() => tracing::info!("received SIGINT"),
        }
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
    Ok(())
}

const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The namespace this replica runs in: `POD_NAMESPACE`, then the in-cluster service account's
/// namespace, then `gantry-system`. Where the lease and the operator's own Secrets live.
pub fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty())
        .or_else(|| {
            std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                .ok()
                .map(|ns| ns.trim().to_string())
                .filter(|ns| !ns.is_empty())
        })
        .unwrap_or_else(|| "gantry-system".to_string())
}

fn default_identity() -> String {
    if let Some(pod) = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "gantry".to_string());
    format!("{host}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::Standing;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Sets its flag while alive: tells whether leader-only work is running now.
    struct Running(Arc<AtomicBool>);

    impl Drop for Running {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out waiting for {what}");
    }

    #[tokio::test]
    async fn leader_only_work_runs_per_term_and_stops_the_moment_the_lease_is_lost() {
        let (standing, leadership) = Leadership::channel();
        let base = crate::testing::test_runtime();
        let runtime = Runtime::new(
            *base.info(),
            base.client().clone(),
            RuntimeSettings {
                leadership,
                ..RuntimeSettings::default()
            },
        );
        let (starts, running) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let task = {
            let (runtime, starts, running) = (runtime.clone(), starts.clone(), running.clone());
            tokio::spawn(async move {
                let shutdown = runtime.shutdown_token().clone();
                runtime
                    .while_leading("test", || {
                        starts.fetch_add(1, Ordering::SeqCst);
                        running.store(true, Ordering::SeqCst);
                        let guard = Running(running.clone());
                        let shutdown = shutdown.clone();
                        async move {
                            shutdown.cancelled().await;
                            drop(guard);
                        }
                    })
                    .await;
            })
        };
        standing.send_replace(Standing {
            leading: true,
            term: 1,
        });
        until("the first term's work", || running.load(Ordering::SeqCst)).await;
        standing.send_replace(Standing {
            leading: false,
            term: 1,
        });
        until("the work to stop with the lease", || {
            !running.load(Ordering::SeqCst)
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        standing.send_replace(Standing {
            leading: true,
            term: 2,
        });
        until("the second term's work", || running.load(Ordering::SeqCst)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        runtime.shutdown_token().cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("returns at shutdown")
            .expect("joins");
        assert!(!running.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_term_that_ends_and_a_new_one_that_begins_at_once_still_restart_the_work() {
        let (standing, mut leadership) = Leadership::channel();
        standing.send_replace(Standing {
            leading: true,
            term: 1,
        });
        assert_eq!(leadership.acquired().await, 1);
        // Lost and won back before anyone looked: the old term is over all the same.
        standing.send_replace(Standing {
            leading: false,
            term: 1,
        });
        standing.send_replace(Standing {
            leading: true,
            term: 2,
        });
        tokio::time::timeout(Duration::from_secs(1), leadership.ended(1))
            .await
            .expect("term 1 is over");
        assert_eq!(leadership.acquired().await, 2);
    }

    #[tokio::test]
    async fn apis_follow_the_scope_for_namespaced_kinds_only() {
        use k8s_openapi::api::core::v1::{Node, Pod};
        let base = crate::testing::test_runtime();
        let runtime = Runtime::new(
            *base.info(),
            base.client().clone(),
            RuntimeSettings {
                scope: Scope::Namespace("team-a".into()),
                ..RuntimeSettings::default()
            },
        );
        let pods = runtime.api::<Pod>().resource_url().to_string();
        let nodes = runtime.api::<Node>().resource_url().to_string();
        assert_eq!(pods, "/api/v1/namespaces/team-a/pods");
        assert_eq!(
            nodes, "/api/v1/nodes",
            "cluster-scoped kinds are cluster-wide"
        );
        let all = crate::testing::test_runtime()
            .api::<Pod>()
            .resource_url()
            .to_string();
        assert_eq!(all, "/api/v1/pods");
    }

    #[tokio::test]
    async fn a_replica_without_election_leads_for_good() {
        let mut leadership = Leadership::always();
        assert!(leadership.is_leading());
        assert_eq!(leadership.acquired().await, 1);
        let ended = tokio::time::timeout(Duration::from_millis(50), leadership.ended(1)).await;
        assert!(ended.is_err(), "the only term never ends");
    }
}
