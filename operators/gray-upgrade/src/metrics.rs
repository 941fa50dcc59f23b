//! The gray-upgrade operator's own metrics (the kit adds the reconcile metrics).

use gantry_kit::metrics::registered;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::reasons::UpgradeOutcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabels {
    pub namespace: String,
    pub app: String,
    pub revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: UpgradeOutcome,
}

#[derive(Clone)]
pub struct GrayMetrics {
    pub instances: Family<RevisionLabels, Gauge>,
    pub upgrades: Family<OutcomeLabels, Counter>,
    /// Patch written → container restarted and Ready (in-place updates only).
    pub in_place_seconds: Histogram,
    /// Batch started → batch passed its health gate.
    pub batch_seconds: Histogram,
}

impl GrayMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        Self {
            instances: registered(
                registry,
                "grayapp_instances",
                "Instances per GrayApp revision",
                Family::default(),
            ),
            upgrades: registered(
                registry,
                "grayapp_upgrades",
                "Instance upgrades by outcome",
                Family::default(),
            ),
            in_place_seconds: registered(
                registry,
                "grayapp_in_place_upgrade_duration_seconds",
                "Time from the in-place patch to the new container being Ready",
                Histogram::new(exponential_buckets(0.25, 2.0, 14)),
            ),
            batch_seconds: registered(
                registry,
                "grayapp_batch_duration_seconds",
                "Time from a batch's start to passing its health gate",
                Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            ),
        }
    }

    pub fn count(&self, outcome: UpgradeOutcome) {
        self.upgrades
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}
