//! The gray-upgrade operator's own metrics (the kit adds the reconcile metrics).

use gantry_kit::metrics::registered;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::WriteFailure;
use crate::reasons::UpgradeOutcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabels {
    pub namespace: String,
    pub app: String,
    pub revision: String,
}

impl RevisionLabels {
    pub fn new(namespace: &str, app: &str, revision: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            app: app.to_string(),
            revision: revision.to_string(),
        }
    }
}

/// A failed write: its verb, resource and HTTP status class (all from small fixed sets).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteFailureLabels {
    pub verb: &'static str,
    pub resource: &'static str,
    pub code: &'static str,
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
    pub write_failures: Family<WriteFailureLabels, Counter>,
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
            write_failures: registered(
                registry,
                "grayapp_write_failures",
                "Writes the API server refused or that did not reach it, by verb, resource and status",
                Family::default(),
            ),
        }
    }

    pub fn count_write_failure(&self, failure: &WriteFailure) {
        let code = match failure.code {
            None => "none",
            Some(401) => "401",
            Some(403) => "403",
            Some(404) => "404",
            Some(409) => "409",
            Some(422) => "422",
            Some(429) => "429",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            Some(_) => "other",
        };
        self.write_failures
            .get_or_create(&WriteFailureLabels {
                verb: failure.verb.as_str(),
                resource: failure.resource.as_str(),
                code,
            })
            .inc();
    }

    pub fn count(&self, outcome: UpgradeOutcome) {
        self.upgrades
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}
