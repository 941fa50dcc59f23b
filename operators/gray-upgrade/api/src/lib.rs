//! The `GrayApp` API (`apps.gantry.dev/v1alpha1`).
//!
//! A GrayApp owns `replicas` pods named `<app>-<ordinal>`. When its pod template changes, the
//! instances move to the new revision in the batches the spec names, in place where only images
//! (and pod labels or annotations) differ, and by recreating the pod under the same name
//! otherwise. Admission rejects a bad plan before it can touch a running instance.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PodTemplateSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Label on every pod: the app it belongs to.
pub const LABEL_APP: &str = "apps.gantry.dev/app";
/// Label on every pod: its ordinal.
pub const LABEL_INSTANCE: &str = "apps.gantry.dev/instance";
/// Label on every pod: the revision its containers run (or are being moved to).
pub const LABEL_REVISION: &str = "apps.gantry.dev/revision";
/// Annotation on a pod: the record of its in-place update (JSON, see `inplace::Record`).
pub const ANNOTATION_IN_PLACE: &str = "apps.gantry.dev/in-place-update";
/// Annotation on a GrayApp, set by `kubectl gantry approve`: `<revision>/<batch>` lets that
/// batch's successor start under manual promotion.
pub const ANNOTATION_APPROVE: &str = "apps.gantry.dev/approve";
/// Annotation on a GrayApp, set by `kubectl gantry abort`: `<revision>` stops that rollout and
/// returns every instance it moved to the revision it came from.
pub const ANNOTATION_ABORT: &str = "apps.gantry.dev/abort";
/// The readiness gate the operator owns: False while an instance is out of service for an
/// update, so Services stop sending it traffic; True once the new container is Ready.
pub const READINESS_GATE: &str = "apps.gantry.dev/in-service";

/// Fields holding embedded core types, documented by the core API (`kubectl explain pod`).
pub const EMBEDDED: &[&str] = &["spec.template", "spec.volumeClaimTemplates"];

// CEL shared by a rule and the message that names what broke it. Every rule names the field it
// concerns (its place in the schema, or `fieldPath`) and, in its message, the offending value;
// the messages pick that value with the negation of the rule's own condition. The API server
// estimates a message's cost as well and refuses costly ones: a number enters a message through
// `format` (its estimate of `string(int)` joined with `+` is unbounded), and a value found in
// nested lists through `map` and `filter` (cheaper to estimate than `filter` then `exists`).

/// The ordinals an instance may have stay below this (spec scope).
macro_rules! ordinal_bound {
    () => {
        "(self.replicas + (has(self.removeInstances) ? size(self.removeInstances) : 0))"
    };
}

/// Whether ordinal `i` is an instance of the app (spec scope).
macro_rules! is_instance {
    () => {
        concat!(
            "(i < ",
            ordinal_bound!(),
            " && (!has(self.removeInstances) || !(i in self.removeInstances)))"
        )
    };
}

/// Whether the batch or variant instance `i` is named by more than one of `list` (`c` ranges
/// over it).
macro_rules! named_twice {
    ($list:literal) => {
        concat!(
            "(",
            $list,
            ".filter(c, has(c.instances) && i in c.instances).size() > 1)"
        )
    };
}

/// A number, or a percentage from 1% to 100%, at least 1 (an int-or-string).
macro_rules! positive_count {
    () => {
        "string(self).matches('^[0-9]+%?$') && int(string(self).replace('%', '')) > 0 && (!string(self).endsWith('%') || int(string(self).replace('%', '')) <= 100)"
    };
}

/// The GrayApp CRD as published: nested descriptions of embedded core types removed.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = <GrayApp as kube::CustomResourceExt>::crd();
    gantry_kit::crd::strip_embedded_descriptions(&mut crd, EMBEDDED);
    // Bound the int-or-string fields ("100%" at most): the API server estimates the cost of
    // their CEL rules from the longest string they may hold.
    for version in &mut crd.spec.versions {
        if let Some(root) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            for path in ["spec.update.maxUnavailable", "spec.update.batches.count"] {
                if let Some(node) = gantry_kit::crd::find_mut(root, path) {
                    node.max_length = Some(6);
                }
            }
            // Declare metadata.name (the one metadata field a CRD may declare, with
            // generateName, and without a description) so the name rule's fieldPath can
            // point at it.
            root.properties.get_or_insert_with(Default::default).insert(
                "metadata".into(),
                JSONSchemaProps {
                    type_: Some("object".into()),
                    properties: Some(BTreeMap::from([(
                        "name".to_string(),
                        JSONSchemaProps {
                            type_: Some("string".into()),
                            ..JSONSchemaProps::default()
                        },
                    )])),
                    ..JSONSchemaProps::default()
                },
            );
        }
    }
    crd
}

/// A set of instances of one application, upgraded in place, batch by batch.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "apps.gantry.dev",
    version = "v1alpha1",
    kind = "GrayApp",
    namespaced,
    status = "GrayAppStatus",
    shortname = "gapp",
    category = "gantry",
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.updatedReplicas"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.updateRevision"}"#,
    printcolumn = r#"{"name":"Images","type":"string","jsonPath":".status.images"}"#,
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.rollout.phase"}"#,
    printcolumn = r#"{"name":"Batch","type":"string","jsonPath":".status.rollout.batchProgress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.labelSelector"}"#,
    validation = Rule::new("self.metadata.name.size() <= 52")
        .message(Message::Expression("'the app name has %d characters; at most 52 are allowed, so that pod names <app>-<ordinal> stay valid'.format([self.metadata.name.size()])".into()))
        .field_path(".metadata.name")
        .reason(Reason::FieldValueInvalid),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(concat!(
        "!has(self.update) || !has(self.update.batches) || self.update.batches.all(b, !has(b.instances) || b.instances.all(i, ",
        is_instance!(),
        "))"
    ))
    .message(Message::Expression(concat!(
        "'instance %d is not an ordinal of this app (0..%d%s)'.format([self.update.batches.map(b, has(b.instances) ? b.instances.filter(i, !",
        is_instance!(),
        ") : []).filter(l, l.size() > 0)[0][0], ",
        ordinal_bound!(),
        " - 1, has(self.removeInstances) ? ' without removeInstances' : ''])"
    ).into()))
    .field_path(".update.batches")
    .reason(Reason::FieldValueInvalid),
    validation = Rule::new(concat!(
        "!has(self.variants) || self.variants.all(v, v.instances.all(i, i < ",
        ordinal_bound!(),
        "))"
    ))
    .message(Message::Expression(concat!(
        "'variant %s: instance %d is not an ordinal of this app (0..%d)'.format([self.variants.filter(v, v.instances.exists(i, i >= ",
        ordinal_bound!(),
        "))[0].name, self.variants.map(v, v.instances.filter(i, i >= ",
        ordinal_bound!(),
        ")).filter(l, l.size() > 0)[0][0], ",
        ordinal_bound!(),
        " - 1])"
    ).into()))
    .field_path(".variants")
    .reason(Reason::FieldValueInvalid),
    validation = Rule::new(concat!(
        "!has(self.variants) || self.variants.all(v, v.instances.all(i, !",
        named_twice!("self.variants"),
        "))"
    ))
    .message(Message::Expression(concat!(
        "'instance %d belongs to more than one variant'.format([self.variants.map(v, v.instances.filter(i, ",
        named_twice!("self.variants"),
        ")).filter(l, l.size() > 0)[0][0]])"
    ).into()))
    .field_path(".variants")
    .reason(Reason::FieldValueInvalid),
)]
pub struct GrayAppSpec {
    /// Number of instances. Instances are named `<app>-<ordinal>`; ordinals start at 0 and skip
    /// those listed in removeInstances.
    #[schemars(range(min = 0, max = 100000))]
    pub replicas: i32,

    /// Selects the app's pods; must match the template's labels.
    pub selector: LabelSelector,

    /// The pod template every instance runs unless a variant names it. Changing it starts a
    /// rollout to a new revision, driven by `update`.
    pub template: PodTemplateSpec,

    /// Claims each instance gets its own PersistentVolumeClaim from, named
    /// `<claim>-<app>-<ordinal>`. They survive upgrades, recreation and scale-down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub volume_claim_templates: Vec<PersistentVolumeClaim>,

    /// Ordinals to remove instead of the highest when fewer instances are wanted: with
    /// replicas 24 and removeInstances [7], the instances are 0-6 and 8-24.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    #[x_kube(validation = Rule::new("self.all(i, self.indexOf(i) == self.lastIndexOf(i))")
        .message(Message::Expression("'ordinal %d is listed twice'.format([self.filter(i, self.indexOf(i) != self.lastIndexOf(i))[0]])".into()))
        .reason(Reason::FieldValueInvalid))]
    pub remove_instances: Vec<i32>,

    /// Instances kept on purpose at other images than the template's: several versions side
    /// by side at rest (most on v7, three on v8, one on v9).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub variants: Vec<Variant>,

    /// How instances move to a new revision.
    #[serde(default)]
    pub update: UpdateStrategy,

    /// How many old revisions to keep as ControllerRevisions, to roll back to. Revisions that
    /// an instance still runs are always kept.
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub revision_history_limit: i32,
}

fn default_history_limit() -> i32 {
    10
}

/// Instances that run the template with other images.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Variant {
    /// A name for this version, shown in status (e.g. `v8-canary`).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The instance ordinals that run this variant.
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(validation = Rule::new("self.all(i, i >= 0)")
        .message(Message::Expression("'instance ordinals are not negative: %d'.format([self.filter(i, i < 0)[0]])".into()))
        .reason(Reason::FieldValueInvalid))]
    pub instances: Vec<i32>,
    /// Container name to image, replacing the template's image for those containers.
    #[schemars(length(min = 1))]
    pub images: BTreeMap<String, String>,
}

/// How an update proceeds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(concat!(
        "!has(self.batches) || self.batches.all(b, !has(b.instances) || b.instances.all(i, !",
        named_twice!("self.batches"),
        "))"
    ))
    .message(Message::Expression(concat!(
        "'instance %d is named in more than one batch'.format([self.batches.map(b, has(b.instances) ? b.instances.filter(i, ",
        named_twice!("self.batches"),
        ") : []).filter(l, l.size() > 0)[0][0]])"
    ).into()))
    .field_path(".batches")
    .reason(Reason::FieldValueInvalid))]
pub struct UpdateStrategy {
    /// `InPlaceIfPossible` patches images into running pods when only images, labels or
    /// annotations changed, and recreates the pod otherwise; `Recreate` always recreates.
    #[serde(default)]
    pub method: UpdateMethod,

    /// How many instances may be unavailable at once, across the whole app, as a number or a
    /// percentage of replicas (rounded down, at least 1). Must allow at least one: instances
    /// are upgraded in place, so there is no surge.
    #[serde(default = "default_max_unavailable")]
    #[x_kube(validation = Rule::new(positive_count!())
        .message(Message::Expression("'maxUnavailable must be at least 1 or a percentage from 1% to 100% (instances are upgraded in place, with no surge to keep capacity); got ' + string(self)".into()))
        .reason(Reason::FieldValueInvalid))]
    pub max_unavailable: IntOrString,

    /// Seconds an instance stays out of service (its readiness gate False, so Services stop
    /// sending it traffic) before its container is restarted.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub grace_period_seconds: i32,

    /// The batches, in order. Without any, every outdated instance moves in one batch, at
    /// most maxUnavailable at a time. Instances no batch selects stay at their revision: that
    /// is how several versions run side by side after a partial rollout.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub batches: Vec<Batch>,

    /// What happens when a batch has passed its health gate: `Manual` waits for
    /// `kubectl gantry approve` (the `apps.gantry.dev/approve` annotation); `Auto` goes on.
    #[serde(default)]
    pub promotion: Promotion,

    /// Stops starting new instance updates; updates in flight finish.
    #[serde(default)]
    pub paused: bool,

    /// When a batch counts as healthy, and what happens when it does not.
    #[serde(default)]
    pub health: HealthGate,
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        Self {
            method: UpdateMethod::default(),
            max_unavailable: default_max_unavailable(),
            grace_period_seconds: 0,
            batches: Vec::new(),
            promotion: Promotion::default(),
            paused: false,
            health: HealthGate::default(),
        }
    }
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}

/// How a revision reaches an instance.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum UpdateMethod {
    #[default]
    InPlaceIfPossible,
    Recreate,
}

/// What happens between batches.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Promotion {
    #[default]
    Manual,
    Auto,
}

/// One batch: exactly the instances named, or those a selector picks, or a count or
/// percentage of the instances still outdated (lowest ordinals first), or, when empty, all of
/// the remaining ones.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.instances) ? 1 : 0) + (has(self.selector) ? 1 : 0) + (has(self.count) ? 1 : 0) <= 1")
    .message(Message::Expression("'a batch names instances, or a selector, or a count, not several; this one has' + (has(self.instances) ? ' instances' : '') + (has(self.selector) ? (has(self.instances) ? ' and' : '') + ' a selector' : '') + (has(self.count) ? (has(self.instances) || has(self.selector) ? ' and' : '') + ' a count' : '')".into()))
    .reason(Reason::FieldValueInvalid))]
pub struct Batch {
    /// Instance ordinals, upgraded in the order given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(
        validation = Rule::new("self.all(i, i >= 0)")
            .message(Message::Expression("'instance ordinals are not negative: %d'.format([self.filter(i, i < 0)[0]])".into()))
            .reason(Reason::FieldValueInvalid),
        validation = Rule::new("self.all(i, self.indexOf(i) == self.lastIndexOf(i))")
            .message(Message::Expression("'instance %d is named twice'.format([self.filter(i, self.indexOf(i) != self.lastIndexOf(i))[0]])".into()))
            .reason(Reason::FieldValueInvalid),
    )]
    pub instances: Option<Vec<i32>>,
    /// Instances whose pods carry these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// A number of the still outdated instances, or a percentage of them (rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(positive_count!())
        .message(Message::Expression("'count must be a positive number or a percentage from 1% to 100%; got ' + string(self)".into()))
        .reason(Reason::FieldValueInvalid))]
    pub count: Option<IntOrString>,
}

/// The health gate every batch must pass.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthGate {
    /// Seconds every instance of the batch must stay Ready, without restarting beyond
    /// maxRestarts, before the batch passes.
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub bake_seconds: i32,
    /// Container restarts tolerated per instance after its update.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub max_restarts: i32,
    /// Seconds an updated instance has to become Ready before it counts as failed.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 1, max = 86400))]
    pub progress_deadline_seconds: i32,
    /// Failed instances a batch tolerates; each is returned to its previous revision and the
    /// batch goes on. One more fails the batch.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub max_failed_instances: i32,
    /// What a failed batch leads to: `Rollback` returns every instance this rollout moved to
    /// its previous revision, in place; `Pause` leaves them and waits for a person.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// An HTTP GET each updated instance must answer with 2xx before it counts as healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpCheck>,
    /// A Prometheus query the batch must pass before it is promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusCheck>,
}

/// An HTTP health check against one instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheck {
    /// Request path, e.g. `/healthz`.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')")
        .message(Message::Expression("'path must start with /; got \"' + self + '\"'".into()))
        .reason(Reason::FieldValueInvalid))]
    pub path: String,
    /// Port on the pod.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `HTTP` or `HTTPS`. Like the kubelet's HTTPS probes, HTTPS does not check the
    /// instance's certificate.
    #[serde(default)]
    pub scheme: Scheme,
    /// Address to connect to instead of the pod IP, for instances reached through a local
    /// proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub host: Option<String>,
    /// Seconds to wait for an answer.
    #[serde(default = "default_check_timeout")]
    #[schemars(range(min = 1, max = 60))]
    pub timeout_seconds: i32,
}

fn default_check_timeout() -> i32 {
    2
}

/// How an HTTP check connects.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Scheme {
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
}

/// A Prometheus query over the batch.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusCheck {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.monitoring:9090`. An
    /// `https://` URL must present a certificate the operator's system roots trust.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')")
        .message(Message::Expression("'address must be an http:// or https:// URL; got \"' + self + '\"'".into()))
        .reason(Reason::FieldValueInvalid))]
    pub address: String,
    /// PromQL giving one number. `$pods` is replaced by a regular expression matching the
    /// batch's pod names, e.g. `sum(rate(http_errors_total{pod=~"$pods"}[1m]))`.
    #[schemars(length(min = 1, max = 4096))]
    pub query: String,
    /// The batch fails when the query's value is above this.
    pub max_value: f64,
}

impl Default for HealthGate {
    fn default() -> Self {
        Self {
            bake_seconds: 0,
            max_restarts: 0,
            progress_deadline_seconds: default_progress_deadline(),
            max_failed_instances: 0,
            on_failure: FailurePolicy::default(),
            http_get: None,
            prometheus: None,
        }
    }
}

fn default_progress_deadline() -> i32 {
    600
}

/// What a failed batch leads to.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum FailurePolicy {
    #[default]
    Rollback,
    Pause,
}

/// What the app looks like now.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrayAppStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Reconciling and Stalled (what kstatus, Flux and Argo CD read), and Progressing,
    /// Paused and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Instances that have a pod.
    #[serde(default)]
    pub replicas: i32,
    /// Instances whose pod is Ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Instances on the update revision.
    #[serde(default)]
    pub updated_replicas: i32,
    /// The selector as a string, for the scale subresource.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label_selector: String,
    /// The revision of spec.template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,
    /// The revision the last completed rollout reached; new instances outside the current
    /// rollout's batches start on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// Each revision instances run, with its images and which instances run it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<RevisionStatus>,
    /// The images instances run and how many run each, the most common first: at most two,
    /// then how many others (`ocr:v8 (20), ocr:v7 (5)`; with several containers, those that
    /// differ: `ocr=ocr:v8,proxy=envoy:1.30 (3)`). For kubectl get; revisions has the full
    /// references.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub images: String,
    /// Progress of the rollout to updateRevision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The instances that are not steady, i.e. not Running on the revision they should run
    /// (being updated, unready, missing, or on another revision): at most 32, those not Running
    /// first. Where every instance runs, revisions says with its ordinal ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceStatus>,
}

/// A revision and the instances running it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    /// Revision name (`<app>-<hash>`), also the ControllerRevision's name.
    pub name: String,
    /// The variant this revision belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Container name to image.
    #[serde(default)]
    pub images: BTreeMap<String, String>,
    /// How many instances run it.
    pub count: i32,
    /// Their ordinals, as ranges (`0-1,3,5-24`).
    pub instances: String,
}

/// Where the rollout to the update revision stands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The revision being rolled out.
    pub revision: String,
    /// Progressing, Baking, AwaitingApproval, Completed, RollingBack, Failed or Aborted.
    pub phase: RolloutPhase,
    /// Index of the current batch (0-based).
    pub batch: i32,
    /// Number of batches in the plan.
    pub batches: i32,
    /// `<batch+1>/<batches>`, for kubectl get.
    pub batch_progress: String,
    /// The current batch's instances, fixed when it started.
    #[serde(default)]
    pub members: Vec<i32>,
    /// Members that failed their health gate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<i32>,
    /// When the current batch started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_started_at: Option<Time>,
    /// Since when every member has been healthy (the bake time counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since: Option<Time>,
    /// Instances this rollout moved, by the revision each came from (ordinal ranges): where a
    /// rollback returns them. Written before the batch starts, so it survives a restart.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub origins: BTreeMap<String, String>,
    /// Whether a person aborted the rollout (it ends as Aborted rather than Failed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub aborted: bool,
    /// What the rollout waits for, or why it stopped.
    #[serde(default)]
    pub message: String,
}

impl RolloutStatus {
    /// A rollout of `revision` in `batches` batches, before its first batch starts.
    pub fn new(revision: &str, batches: i32) -> Self {
        Self {
            revision: revision.to_string(),
            phase: RolloutPhase::Progressing,
            batch: 0,
            batches,
            batch_progress: String::new(),
            members: Vec::new(),
            failed: Vec::new(),
            batch_started_at: None,
            healthy_since: None,
            origins: BTreeMap::new(),
            aborted: false,
            message: String::new(),
        }
    }
}

/// Rollout phases.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum RolloutPhase {
    /// Members of the current batch are being updated.
    Progressing,
    /// All members are updated and Ready; the bake time runs.
    Baking,
    /// The batch passed; waiting for `kubectl gantry approve`.
    AwaitingApproval,
    /// Every batch passed.
    Completed,
    /// A batch failed or the rollout was aborted: instances return to their previous revision.
    RollingBack,
    /// A batch failed; with onFailure Rollback its instances are back on their previous
    /// revision. Nothing moves until the template changes.
    Failed,
    /// Aborted by a person; instances are back on their previous revision.
    Aborted,
}

/// One instance, compactly.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Pod name, `<app>-<ordinal>`.
    pub name: String,
    /// Revision its containers run (or are moving to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Images of its containers, `name=image` joined by commas.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub images: String,
    /// Whether the pod is Ready.
    pub ready: bool,
    /// Running, Draining, Updating, Recreating, Pending, RollingBack or Missing.
    pub state: String,
    /// The node it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When its revision, readiness or state last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

#[cfg(test)]
mod tests;
