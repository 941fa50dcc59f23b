//! The shared runtime of every Gantry operator.
//!
//! An operator binary is its domain logic plus one call to [`runtime::main`], which provides:
//! - the common command line ([`cli`]): `run` with metrics, health, leader-election, logging and
//!   namespace flags, and `crd` to print the operator's CRDs;
//! - logging as JSON or text ([`telemetry`]), and a span per reconcile carrying the object's key;
//! - `/metrics`, `/healthz` and `/readyz` ([`http`], [`metrics`]), with reconcile metrics for free;
//! - leader election on a Lease with a clean hand-over on SIGTERM ([`leader`]);
//! - graceful shutdown ([`runtime`]);
//! - Events ([`events`]), kstatus-compatible conditions ([`conditions`]), server-side apply
//!   ([`apply`]), and the shared error policy with capped, jittered backoff ([`backoff`],
//!   [`error`], [`controller`]);
//! - a lean watch cache of owned objects, filed by owner ([`index`]);
//! - rendering and checking CRDs ([`crd`]).

pub mod apply;
pub mod backoff;
pub mod cli;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod error;
pub mod events;
pub mod http;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod runtime;
pub mod telemetry;

pub use error::{ErrorClass, KitError, ReconcileError};
pub use runtime::{OperatorInfo, Runtime, Scope};
