//! The kit's probe operator: every shape an operator takes, with no domain logic, so that the
//! kit can be seen working end to end. It changes nothing but its own Probes' status.
//!
//! - a controller (leader-only) that records an `Observed` event on every ConfigMap matching
//!   `--probe-selector`;
//! - with `--probes`, a controller of its own resource, `Probe`, reconciled to `Ready`;
//! - with `--node-name`, a node agent: each ConfigMap's event also counts the pods on that node,
//!   read from an index of pods keyed by node;
//! - with `--webhook-addr`, a validating admission webhook on every replica (`/validate`) that
//!   denies ConfigMaps labelled `gantry.dev/deny=true`, over HTTPS with certificates from files
//!   or managed by the operator.

mod probe;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use axum::Router;
use gantry_kit::admission;
use gantry_kit::https::HttpsArgs;
use gantry_kit::index::Index;
use gantry_kit::runtime::{self, BoxError, OperatorInfo, Runtime};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Resource;
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};
use kube::runtime::controller::Action;
use kube::runtime::watcher;

const INFO: OperatorInfo = OperatorInfo {
    name: "gantry-noop",
    about: "Exercises the Gantry operator kit: controllers, node agents, webhooks, leader election.",
    version: env!("CARGO_PKG_VERSION"),
    crds: || vec![probe::crd()],
};

/// The label that makes the webhook deny a ConfigMap.
const DENY_LABEL: &str = "gantry.dev/deny";

/// The probe operator's own flags.
#[derive(clap::Args, Clone, Debug, PartialEq)]
struct NoopArgs {
    /// The ConfigMaps to observe.
    #[arg(
        long,
        env = "GANTRY_PROBE_SELECTOR",
        default_value = "gantry.dev/probe=true"
    )]
    probe_selector: String,
    /// Also reconcile Probe objects (kit.gantry.dev); their CRD must be installed.
    #[arg(long, env = "GANTRY_PROBES")]
    probes: bool,
    /// Act as the agent of this node: count the pods on it.
    #[arg(long, env = "GANTRY_NODE_NAME")]
    node_name: Option<String>,
    /// Serve the validating admission webhook on this address (HTTPS).
    #[arg(long, env = "GANTRY_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,
    #[command(flatten)]
    https: HttpsArgs,
}

gantry_kit::reasons! {
    enum NoopReason {
        /// A ConfigMap matching the selector was seen.
        Observed => Normal, "Observe";
    }
}

struct Observer {
    runtime: Runtime,
    /// The node this replica is the agent of, and the pods by node.
    node: Option<(String, Index<String>)>,
}

async fn observe(
    config_map: Arc<ConfigMap>,
    observer: Arc<Observer>,
) -> Result<Action, std::convert::Infallible> {
    let keys = config_map.data.as_ref().map_or(0, |d| d.len());
    let note = match &observer.node {
        Some((node, pods)) => format!("{keys} data keys; {} pods on {node}", pods.get(node).len()),
        None => format!("{keys} data keys"),
    };
    observer
        .runtime
        .events()
        .publish(&config_map.object_ref(&()), NoopReason::Observed, note)
        .await;
    Ok(Action::await_change())
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.node_name.clone()
}

fn pod_name(pod: &Pod) -> Option<String> {
    pod.metadata.name.clone()
}

async fn validate(request: AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let denied = request
        .object
        .as_ref()
        .and_then(|o| o.metadata.labels.as_ref())
        .and_then(|l| l.get(DENY_LABEL))
        .is_some_and(|v| v == "true");
    let response = AdmissionResponse::from(&request);
    if denied {
        response.deny(format!(
            "denied by gantry-noop: the object is labelled {DENY_LABEL}=true"
        ))
    } else {
        response
    }
}

async fn run(runtime: Runtime, args: NoopArgs) -> Result<(), BoxError> {
    let webhook = match args.webhook_addr {
        Some(addr) => {
            let routes = Router::new().route(
                "/validate",
                admission::route("/validate", runtime.metrics().admission.clone(), validate),
            );
            Some(
                runtime
                    .serve_https("webhook", addr, routes, &args.https)
                    .await?,
            )
        }
        None => None,
    };
    let node = args.node_name.clone().map(|node| {
        // An agent watches only its own node's pods: each agent's share, not the cluster's.
        let pods = runtime.index(
            "pods by node",
            runtime.api::<Pod>(),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            node_of,
            pod_name,
        );
        (node, pods)
    });
    let observer = Arc::new(Observer {
        runtime: runtime.clone(),
        node,
    });
    let mut config_maps = runtime.controller::<ConfigMap>(
        "configmap-probe",
        watcher::Config::default().labels(&args.probe_selector),
    );
    if args.node_name.is_some() {
        // A node agent acts on every change at once; it has only its own node's to handle.
        config_maps = config_maps.pacing(std::time::Duration::ZERO);
    }
    let config_maps = config_maps.run(observer, observe);
    let probes = async {
        if args.probes {
            runtime
                .controller::<probe::Probe>("probe", watcher::Config::default())
                .run(Arc::new(runtime.clone()), probe::reconcile)
                .await;
        }
    };
    tokio::join!(config_maps, probes);
    if let Some(webhook) = webhook {
        webhook.join().await;
    }
    Ok(())
}

fn main() -> ExitCode {
    runtime::main(INFO, run)
}
