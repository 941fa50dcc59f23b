//! Gantry's local Kubernetes for tests, benchmarks and the demo.
//!
//! Layers, each using only those above it:
//! - [`process`], [`bins`], [`pki`], [`poll`], [`http`]: host processes, the binaries, TLS
//!   material, the one poll primitive, loopback HTTP;
//! - [`cluster`]: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake
//!   nodes) as host processes on loopback; several named clusters side by side;
//! - [`diagnose`], [`wait`], [`manifest`]: what a failed wait shows, waiting for and watching
//!   objects, applying manifests and CRDs, rendering charts;
//! - [`testing`]: a test's cluster (the shared one or any other), client and namespace;
//! - [`operator`]: the fixture that runs an operator on the host as the ServiceAccount its
//!   Helm chart creates (so missing RBAC fails tests), one process per replica or per node;
//! - [`webhook`]: an HTTPS server on loopback for webhooks and scheduler extenders, and
//!   webhook configurations scoped to a test namespace.
//!
//! End-to-end tests live in `e2e/tests/e2e/` (one test binary) and run through
//! `make test-e2e`.

pub mod bins;
pub mod cluster;
pub mod diagnose;
pub mod http;
pub mod manifest;
pub mod operator;
pub mod pki;
pub mod poll;
pub mod process;
pub mod testing;
pub mod wait;
pub mod webhook;

pub use cluster::{Cluster, ClusterSpec, NodePool};
pub use operator::{Fixture, Operator, OperatorSpec};
pub use testing::{TestEnv, TestNamespace};
