//! The gray-upgrade operator: `GrayApp` instances upgraded in place, in batches, health-gated.

/// The API types live in their own crate, which clients and tools depend on alone.
pub use gray_upgrade_api as api;

pub mod checks;
pub mod controller;
pub mod metrics;
pub mod model;
pub mod objects;
pub mod observe;
pub mod plan;
pub mod plugin;
pub mod reasons;
pub mod reconcile;
pub mod revision;
pub mod status;

#[cfg(test)]
mod plan_tests;
