//! The operator process: parse the command line, set up logging, metrics and health endpoints,
//! campaign for leadership, run the operator's controllers while leading, and stop cleanly.
//!
//! Shutdown on SIGTERM (or SIGINT) goes: `/readyz` turns unready; controllers stop taking new
//! work and finish what is in flight (bounded by `--shutdown-timeout-seconds`); the leader lease
//! is released so a standby takes over at once; the endpoints close; the process exits 0. A
//! second signal exits at once. A replica that loses its lease stops all work immediately and
//! exits non-zero, so that it never acts alongside a new leader.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client, Resource};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cli::{self, Action, RunArgs};
use crate::error::KitError;
use crate::events::Events;
use crate::http::{Phase, Readiness, Servers};
use crate::leader::{LeaderElector, Leadership, LeaseConfig};
use crate::metrics::Metrics;

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

/// Everything an operator's controllers get from the kit while this replica leads.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    info: OperatorInfo,
    client: Client,
    scope: Scope,
    events: Events,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
    reconcile_interval: Duration,
}

impl Runtime {
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn scope(&self) -> &Scope {
        &self.inner.scope
    }

    /// An API handle for a namespaced kind, over all namespaces or the one watched.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.inner.scope {
            Scope::All => Api::all(self.inner.client.clone()),
            Scope::Namespace(ns) => Api::namespaced(self.inner.client.clone(), ns),
        }
    }

    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.inner.readiness
    }

    /// The least time between the starts of two reconciles of one object (`--reconcile-interval-ms`).
    pub fn reconcile_interval(&self) -> Duration {
        self.inner.reconcile_interval
    }

    /// Cancelled when the process has been asked to stop.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The server-side-apply field manager for everything this operator writes.
    pub fn field_manager(&self) -> &'static str {
        self.inner.info.name
    }
}

/// The whole `main` of an operator binary: returns the process exit code.
///
/// `run` starts the operator's controllers with the [`Runtime`] and returns once they have
/// stopped (they stop when [`Runtime::shutdown_token`] is cancelled).
pub fn main<F, Fut, E>(info: OperatorInfo, run: F) -> ExitCode
where
    F: FnOnce(Runtime) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let action = match cli::parse(info.name, info.about, info.version, std::env::args_os()) {
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
    if let Err(err) = crate::telemetry::init(args.log_format, &args.log_level) {
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
    match runtime.block_on(run_operator(info, args, run)) {
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
pub async fn run_operator<F, Fut, E>(
    info: OperatorInfo,
    args: RunArgs,
    run: F,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    F: FnOnce(Runtime) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let config = kube::Config::infer().await.map_err(KitError::Kubeconfig)?;
    let client = Client::try_from(config).map_err(KitError::Client)?;
    let shutdown = CancellationToken::new();
    listen_for_signals(shutdown.clone()).map_err(KitError::Signal)?;

    let metrics = Metrics::new(info.name, info.version);
    let readiness = Arc::new(Readiness::default());
    let stop_servers = CancellationToken::new();
    let servers = Servers::start(
        args.metrics_addr,
        args.health_addr,
        metrics.clone(),
        readiness.clone(),
        stop_servers.clone(),
    )
    .await?;

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let (state_tx, mut state) = watch::channel(Leadership::StandingBy);
    let release = CancellationToken::new();
    let elector = if args.leader_elect {
        let mut lease = LeaseConfig::new(
            args.lease_name
                .clone()
                .unwrap_or_else(|| info.name.to_string()),
            args.lease_namespace
                .clone()
                .unwrap_or_else(default_namespace),
            identity.clone(),
        );
        lease.duration = args.lease_duration();
        lease.renew_deadline = lease.duration.mul_f64(2.0 / 3.0);
        tracing::info!(lease = %lease.name, namespace = %lease.namespace, %identity, "standing by for leadership");
        readiness.set_phase(Phase::StandingBy);
        let elector = LeaderElector::new(client.clone(), lease);
        Some(tokio::spawn(elector.run(state_tx, release.clone())))
    } else {
        state_tx.send_replace(Leadership::Leading);
        None
    };

    let leadership = tokio::select! {
        () = shutdown.cancelled() => None,
        leadership = state.wait_for(|s| *s != Leadership::StandingBy) => Some(leadership.map(|s| *s)),
    };
    let result = match leadership {
        None => Ok(()),
        Some(Ok(Leadership::Leading)) => {
            lead(
                info, &args, client, identity, &metrics, &readiness, &shutdown, &mut state, run,
            )
            .await
        }
        Some(_) => Err("lost the leader lease before leading".into()),
    };

    readiness.set_phase(Phase::ShuttingDown);
    shutdown.cancel();
    release.cancel();
    if let Some(elector) = elector {
        match elector.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "leader election ended with an error"),
            Err(err) => tracing::warn!(error = %err, "leader election task failed"),
        }
    }
    metrics.leader.set(0);
    stop_servers.cancel();
    servers.join().await?;
    tracing::info!("stopped");
    result
}

#[allow(clippy::too_many_arguments)]
async fn lead<F, Fut, E>(
    info: OperatorInfo,
    args: &RunArgs,
    client: Client,
    identity: String,
    metrics: &Metrics,
    readiness: &Arc<Readiness>,
    shutdown: &CancellationToken,
    state: &mut watch::Receiver<Leadership>,
    run: F,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    F: FnOnce(Runtime) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    readiness.set_phase(Phase::Leading);
    metrics.leader.set(1);
    let scope = match &args.namespace {
        Some(ns) => Scope::Namespace(ns.clone()),
        None => Scope::All,
    };
    tracing::info!(?scope, "starting controllers");
    let runtime = Runtime {
        inner: Arc::new(Inner {
            info,
            events: Events::new(client.clone(), info.name, Some(identity)),
            client,
            scope,
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            shutdown: shutdown.clone(),
            reconcile_interval: args.reconcile_interval(),
        }),
    };
    let work = run(runtime);
    tokio::pin!(work);
    let drained = async {
        shutdown.cancelled().await;
        readiness.set_phase(Phase::ShuttingDown);
        tracing::info!(timeout = ?args.shutdown_timeout(), "shutting down: finishing in-flight work");
        tokio::time::sleep(args.shutdown_timeout()).await;
    };
    tokio::select! {
        result = &mut work => {
            result.map_err(Into::into)?;
            if shutdown.is_cancelled() {
                Ok(())
            } else {
                Err("the operator's controllers stopped without being asked to".into())
            }
        }
        _ = state.wait_for(|s| *s == Leadership::Lost) => {
            // Dropping `work` cancels every in-flight reconcile right here.
            Err("lost the leader lease; stopped all work".into())
        }
        () = drained => {
            tracing::warn!("in-flight work did not finish within the shutdown timeout; abandoning it");
            Ok(())
        }
    }
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

fn default_namespace() -> String {
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
