//! The gray-upgrade operator: `GrayApp` instances upgraded in place, in batches, health-gated.

pub mod api;

#[cfg(test)]
mod api_tests;
