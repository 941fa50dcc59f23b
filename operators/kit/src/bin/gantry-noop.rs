//! An operator with no domain logic, used to exercise the kit end to end: it takes the leader
//! lease, serves metrics and health, and runs one controller that records an `Observed` event
//! on every ConfigMap labelled `gantry.dev/probe=true`. It changes nothing.

use std::process::ExitCode;
use std::sync::Arc;

use gantry_kit::runtime::{self, OperatorInfo, Runtime};
use gantry_kit::{ErrorClass, ReconcileError};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Resource;
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};

const INFO: OperatorInfo = OperatorInfo {
    name: "gantry-noop",
    about: "Exercises the Gantry operator kit: leader election, metrics, health, events.",
    version: env!("CARGO_PKG_VERSION"),
    crds: Vec::new,
};

/// The probe cannot fail; the kit still needs an error type.
#[derive(Debug, thiserror::Error)]
enum ProbeError {}

impl ReconcileError for ProbeError {
    fn class(&self) -> ErrorClass {
        match *self {}
    }
    fn metric_reason(&self) -> &'static str {
        match *self {}
    }
}

async fn observe(config_map: Arc<ConfigMap>, runtime: Arc<Runtime>) -> Result<Action, ProbeError> {
    let keys = config_map.data.as_ref().map_or(0, |d| d.len());
    runtime
        .events()
        .normal(
            &config_map.object_ref(&()),
            "Observed",
            "Observe",
            format!("{keys} data keys"),
        )
        .await;
    Ok(Action::await_change())
}

async fn run(runtime: Runtime) -> Result<(), std::convert::Infallible> {
    let config_maps = runtime.api::<ConfigMap>();
    let controller = Controller::new(
        config_maps,
        watcher::Config::default().labels("gantry.dev/probe=true"),
    );
    runtime
        .run_controller(
            "configmap-probe",
            controller,
            Arc::new(runtime.clone()),
            observe,
        )
        .await;
    Ok(())
}

fn main() -> ExitCode {
    runtime::main(INFO, run)
}
