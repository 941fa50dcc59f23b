//! The Prometheus registry every operator serves on `/metrics`, with the reconcile metrics the
//! kit records for every controller.
//!
//! All names carry the `gantry_` prefix. Operators add their own metrics with
//! [`Metrics::register`].

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::certs::Certificates;
use crate::leader::Leadership;

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
        Self {
            reconciles: registered(
                registry,
                "reconcile",
                "Reconciles run, by controller",
                Family::default(),
            ),
            errors: registered(
                registry,
                "reconcile_errors",
                "Reconciles that failed, by controller and reason",
                Family::default(),
            ),
            duration: registered(
                registry,
                "reconcile_duration_seconds",
                "Time spent in one reconcile, by controller",
                Family::new_with_constructor(reconcile_duration_histogram),
            ),
        }
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    server: String,
    route: String,
}

/// A response's status class, the only part of the code a route's metrics keep.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CodeClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

impl EncodeLabelValue for CodeClass {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            CodeClass::Informational => "1xx",
            CodeClass::Success => "2xx",
            CodeClass::Redirection => "3xx",
            CodeClass::ClientError => "4xx",
            CodeClass::ServerError => "5xx",
        })
    }
}

impl CodeClass {
    pub fn of(code: u16) -> Self {
        match code {
            100..=199 => CodeClass::Informational,
            200..=299 => CodeClass::Success,
            300..=399 => CodeClass::Redirection,
            400..=499 => CodeClass::ClientError,
            _ => CodeClass::ServerError,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteCodeLabels {
    server: String,
    route: String,
    code: CodeClass,
}

fn request_duration_histogram() -> Histogram {
    // 0.25 ms to ~8 s: admission answers are expected in single-digit milliseconds.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

type RouteHistograms = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Requests, latency and server errors of every route of the kit's HTTPS services, and failed
/// handshakes per service.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RouteCodeLabels, Counter>,
    errors: Family<RouteLabels, Counter>,
    duration: RouteHistograms,
    handshake_errors: Family<ServerLabels, Counter>,
}

impl HttpMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            requests: registered(
                registry,
                "http_requests",
                "Requests answered, by service, route and status class",
                Family::default(),
            ),
            errors: registered(
                registry,
                "http_request_errors",
                "Requests answered with a server error, by service and route",
                Family::default(),
            ),
            duration: registered(
                registry,
                "http_request_duration_seconds",
                "Time to answer a request, by service and route",
                Family::new_with_constructor(request_duration_histogram),
            ),
            handshake_errors: registered(
                registry,
                "https_handshake_errors",
                "TLS handshakes that failed or timed out, by service",
                Family::default(),
            ),
        }
    }

    /// Records one answered request; `route` is the matched route's template.
    pub fn observe(&self, server: &str, route: &str, code: u16, elapsed: Duration) {
        let labels = RouteLabels {
            server: server.to_string(),
            route: route.to_string(),
        };
        let class = CodeClass::of(code);
        self.requests
            .get_or_create(&RouteCodeLabels {
                server: labels.server.clone(),
                route: labels.route.clone(),
                code: class,
            })
            .inc();
        if class == CodeClass::ServerError {
            self.errors.get_or_create(&labels).inc();
        }
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn handshake_failed(&self, server: &str) {
        self.handshake_errors
            .get_or_create(&ServerLabels {
                server: server.to_string(),
            })
            .inc();
    }
}

/// How an admission review ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum AdmissionOutcome {
    Allowed,
    Denied,
    /// The body was not an admission review.
    Malformed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    route: String,
    outcome: AdmissionOutcome,
}

/// Admission reviews by route and outcome.
#[derive(Clone)]
pub struct AdmissionMetrics {
    reviews: Family<AdmissionLabels, Counter>,
}

impl AdmissionMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            reviews: registered(
                registry,
                "admission_reviews",
                "Admission reviews answered, by route and outcome",
                Family::default(),
            ),
        }
    }

    pub fn reviewed(&self, route: &str, outcome: AdmissionOutcome) {
        self.reviews
            .get_or_create(&AdmissionLabels {
                route: route.to_string(),
                outcome,
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    server: String,
    outcome: ReloadOutcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
enum ReloadOutcome {
    Loaded,
    Rejected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    step: String,
}

/// Serving certificates: when each expires, reloads, and the managed CA's rotations.
#[derive(Clone)]
pub struct TlsMetrics {
    expiry: Family<ServerLabels, Gauge>,
    reloads: Family<ReloadLabels, Counter>,
    rotations: Family<RotationLabels, Counter>,
}

impl TlsMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            expiry: registered(
                registry,
                "tls_certificate_expiry_timestamp_seconds",
                "When the certificate a service presents expires (Unix time)",
                Family::default(),
            ),
            reloads: registered(
                registry,
                "tls_certificate_loads",
                "Certificates loaded or rejected (the old one kept), by service",
                Family::default(),
            ),
            rotations: registered(
                registry,
                "tls_rotations",
                "Changes the managed certificate authority made, by step",
                Family::default(),
            ),
        }
    }

    pub fn reloaded(&self, server: &str, ok: bool) {
        let outcome = if ok {
            ReloadOutcome::Loaded
        } else {
            ReloadOutcome::Rejected
        };
        self.reloads
            .get_or_create(&ReloadLabels {
                server: server.to_string(),
                outcome,
            })
            .inc();
    }

    /// `step` comes from a fixed set (the rotation's steps and `Failed`).
    pub fn rotated(&self, step: &'static str) {
        self.rotations
            .get_or_create(&RotationLabels {
                step: step.to_string(),
            })
            .inc();
    }

    fn expires(&self, server: &str, at: i64) {
        self.expiry
            .get_or_create(&ServerLabels {
                server: server.to_string(),
            })
            .set(at);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

/// Whether each remote cluster answers.
#[derive(Clone)]
pub struct ClusterMetrics {
    reachable: Family<ClusterLabels, Gauge>,
}

impl ClusterMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            reachable: registered(
                registry,
                "cluster_reachable",
                "1 while the named cluster's API server answers, else 0",
                Family::default(),
            ),
        }
    }

    pub fn set_reachable(&self, cluster: &str, reachable: bool) {
        self.reachable
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .set(i64::from(reachable));
    }

    /// A cluster that is no longer configured leaves no series behind.
    pub fn forget(&self, cluster: &str) {
        self.reachable.remove(&ClusterLabels {
            cluster: cluster.to_string(),
        });
    }
}

/// Registers `metric` as `name` and gives it back: a struct of metrics is built, and
/// registered, in one expression.
pub fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

/// The operator's metrics registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<RwLock<Registry>>,
    pub reconcile: ReconcileMetrics,
    /// 1 while this replica holds the leader lease (or runs without election), else 0.
    pub leader: Gauge,
    /// Terms this replica has begun as leader.
    pub leader_terms: Counter,
    pub http: HttpMetrics,
    pub admission: AdmissionMetrics,
    pub tls: TlsMetrics,
    pub clusters: ClusterMetrics,
}

impl Metrics {
    pub fn new(operator: &str, version: &str) -> Self {
        let mut registry = Registry::with_prefix("gantry");
        let reconcile = ReconcileMetrics::register(&mut registry);
        let leader = registered(
            &mut registry,
            "leader_is_leader",
            "1 while this replica is the leader and may act",
            Gauge::default(),
        );
        let leader_terms = registered(
            &mut registry,
            "leader_terms",
            "Terms this replica has begun as the leader",
            Counter::default(),
        );
        registry.register(
            "build",
            "Which operator and version this process runs",
            Info::new(BuildLabels {
                operator: operator.to_string(),
                version: version.to_string(),
            }),
        );
        let http = HttpMetrics::register(&mut registry);
        let admission = AdmissionMetrics::register(&mut registry);
        let tls = TlsMetrics::register(&mut registry);
        let clusters = ClusterMetrics::register(&mut registry);
        Self {
            registry: Arc::new(RwLock::new(registry)),
            reconcile,
            leader,
            leader_terms,
            http,
            admission,
            tls,
            clusters,
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

/// Keeps the leader metrics in step with the election until it is over.
pub async fn follow_leadership(metrics: Metrics, mut leadership: Leadership) {
    let mut term = 0;
    loop {
        let standing = leadership.standing();
        metrics.leader.set(i64::from(standing.leading));
        if standing.leading && standing.term != term {
            term = standing.term;
            metrics.leader_terms.inc();
        }
        if !leadership.changed().await {
            return;
        }
    }
}

/// Keeps a service's certificate expiry metric current.
pub async fn follow_certificates(metrics: Metrics, certificates: Certificates) {
    let mut changes = certificates.subscribe();
    loop {
        if let Some(validity) = *changes.borrow_and_update() {
            metrics
                .tls
                .expires(certificates.name(), validity.not_after.as_second());
        }
        if changes.changed().await.is_err() {
            return;
        }
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
