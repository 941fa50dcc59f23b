//! The gray-upgrade operator: `GrayApp` instances upgraded in place, in batches, health-gated.

pub mod api;
pub mod model;
pub mod plan;
pub mod revision;

#[cfg(test)]
mod api_tests;

#[cfg(test)]
mod plan_tests;
