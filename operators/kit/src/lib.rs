//! The shared runtime of every Gantry operator, as parts an operator binary composes.
//!
//! An operator binary is its domain logic plus one call to [`runtime::main`], which provides:
//! - the command line ([`cli`]): the kit's flags, extended by the operator's own, and `crd`;
//! - logging as JSON or text ([`telemetry`]), and a span per reconcile carrying the object's key;
//! - `/metrics`, `/healthz` and `/readyz` ([`endpoints`], [`metrics`]), readiness being the AND
//!   of the checks the operator's parts register;
//! - leader election on a Lease ([`leader`]) that gates only leader-only work, with a clean
//!   hand-over on SIGTERM, and graceful shutdown ([`runtime`]);
//! - watch caches and indexes kept on every replica ([`cache`], [`index`]) and controllers that
//!   run from them while the replica leads ([`controller`]);
//! - HTTPS services on every replica ([`https`]) with certificates from files or managed by
//!   the operator itself ([`certs`]), and admission webhooks on them ([`admission`]);
//! - clients, events and health for several clusters ([`clusters`]);
//! - Events with typed reasons ([`events`]), kstatus-compatible conditions ([`conditions`]),
//!   server-side apply ([`apply`]), label selectors ([`selector`]) and the shared error policy
//!   with capped, jittered backoff ([`backoff`], [`error`]);
//! - rendering and checking CRDs ([`crd`]).

pub mod admission;
pub mod apply;
pub mod backoff;
pub mod cache;
pub mod certs;
pub mod cli;
pub mod clusters;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod decode;
pub mod endpoints;
pub mod error;
pub mod events;
pub mod https;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod mock_api;
pub mod pacing;
pub mod runtime;
pub mod selector;
pub mod telemetry;

#[cfg(test)]
mod testing;

pub use error::{ErrorClass, KitError, ReconcileError};
pub use runtime::{OperatorInfo, Runtime, Scope};
