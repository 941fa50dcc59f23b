//! Gantry's local Kubernetes for tests and the demo.
//!
//! - [`cluster`]: starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
//!   kwok (fake nodes) as host processes on loopback, from the binaries `make k8s-bins` builds;
//!   several named clusters can run side by side.
//! - [`testing`]: the shared test cluster, a namespace per test, applying manifests and CRDs,
//!   wait helpers whose timeouts show the objects and events involved.
//! - [`operator`]: runs an operator binary on the host as the ServiceAccount its Helm chart
//!   creates, so missing RBAC fails tests.
//! - [`webhook`]: an HTTPS server on loopback for webhooks and scheduler extenders.
//!
//! End-to-end tests live in `e2e/tests/` and run through `make test-e2e`.

pub mod bins;
pub mod cluster;
pub mod http;
pub mod operator;
pub mod pki;
mod process;
pub mod testing;
pub mod webhook;

pub use cluster::{Cluster, ClusterSpec, NodePool};
pub use operator::{ChartIdentity, OperatorProcess};
pub use testing::{TestEnv, TestNamespace};
