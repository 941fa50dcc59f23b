//! The Prometheus registry every operator serves on `/metrics`, with the reconcile metrics the
//! kit records for every controller.
//!
//! All names carry the `gantry_` prefix. Operators add their own metrics with
//! [`Metrics::register`].

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    operator: String,
    version: String,
}

type HistogramFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;

fn reconcile_duration_histogram() -> Histogram {
    // 1 ms to ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Reconcile counts, failures by reason and durations, per controller.
#[derive(Clone)]
pub struct ReconcileMetrics {
    reconciles: Family<ControllerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: HistogramFamily,
}

impl ReconcileMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(reconcile_duration_histogram),
        };
        registry.register(
            "reconcile",
            "Reconciles run, by controller",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and reason",
            metrics.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile, by controller",
            metrics.duration.clone(),
        );
        metrics
    }

    /// Records one finished reconcile; `error_reason` is `Some` when it failed.
    pub fn observe(&self, controller: &str, elapsed: Duration, error_reason: Option<&str>) {
        let labels = ControllerLabels {
            controller: controller.to_string(),
        };
        self.reconciles.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if let Some(reason) = error_reason {
            self.errors
                .get_or_create(&ErrorLabels {
                    controller: controller.to_string(),
                    reason: reason.to_string(),
                })
                .inc();
        }
    }
}

/// The operator's metrics registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<RwLock<Registry>>,
    pub reconcile: ReconcileMetrics,
    /// 1 while this replica holds the leader lease (or runs without election), else 0.
    pub leader: Gauge,
}

impl Metrics {
    pub fn new(operator: &str, version: &str) -> Self {
        let mut registry = Registry::with_prefix("gantry");
        let reconcile = ReconcileMetrics::register(&mut registry);
        let leader = Gauge::default();
        registry.register(
            "leader_is_leader",
            "1 while this replica is the leader and may act",
            leader.clone(),
        );
        registry.register(
            "build",
            "Which operator and version this process runs",
            Info::new(BuildLabels {
                operator: operator.to_string(),
                version: version.to_string(),
            }),
        );
        Self {
            registry: Arc::new(RwLock::new(registry)),
            reconcile,
            leader,
        }
    }

    /// Adds an operator's own metrics; names get the `gantry_` prefix.
    pub fn register(&self, add: impl FnOnce(&mut Registry)) {
        let mut registry = self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        add(&mut registry);
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let registry = self.registry.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_metrics_are_exported_with_prefix_and_labels() {
        let metrics = Metrics::new("gray-upgrade", "0.1.0");
        metrics
            .reconcile
            .observe("grayapp", Duration::from_millis(3), None);
        metrics
            .reconcile
            .observe("grayapp", Duration::from_millis(5), Some("Conflict"));
        metrics.leader.set(1);
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains(r#"gantry_reconcile_total{controller="grayapp"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"gantry_reconcile_errors_total{controller="grayapp",reason="Conflict"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"gantry_reconcile_duration_seconds_count{controller="grayapp"} 2"#),
            "{text}"
        );
        assert!(text.contains("gantry_leader_is_leader 1"), "{text}");
        assert!(
            text.contains(r#"gantry_build_info{operator="gray-upgrade",version="0.1.0"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn operators_add_their_own_metrics() {
        let metrics = Metrics::new("x", "0");
        let upgrades: Counter = Counter::default();
        metrics.register(|r| r.register("upgrades", "Upgrades started", upgrades.clone()));
        upgrades.inc();
        let text = metrics.encode().expect("encodes");
        assert!(text.contains("gantry_upgrades_total 1"), "{text}");
    }
}
