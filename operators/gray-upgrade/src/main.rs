//! `gantry-gray-upgrade`: the GrayApp operator.

use std::process::ExitCode;

use gantry_kit::cli::NoArgs;
use gantry_kit::runtime::{self, OperatorInfo, Runtime};

const INFO: OperatorInfo = OperatorInfo {
    name: "gantry-gray-upgrade",
    about: "Upgrades chosen GrayApp instances in place, in batches, health-gated.",
    version: env!("CARGO_PKG_VERSION"),
    crds,
};

fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![gray_upgrade::api::crd()]
}

async fn run(runtime: Runtime, _: NoArgs) -> Result<(), std::convert::Infallible> {
    gray_upgrade::controller::run(runtime).await;
    Ok(())
}

fn main() -> ExitCode {
    runtime::main(INFO, run)
}
