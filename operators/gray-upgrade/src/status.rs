//! The status the operator reports: counts, revisions with their instances, the rollout,
//! a compact per-instance table, and conditions. Pure, built from the plan and the pods.

use std::collections::{BTreeMap, BTreeSet};

use gantry_kit::conditions::{self, Desired, Status, Summary};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{GrayAppSpec, GrayAppStatus, InstanceStatus, RevisionStatus, RolloutPhase};
use crate::model::{Instances, Ordinal, PodView, WriteFailure, format_ranges, pod_name};
use crate::plan::{Plan, desired_ordinals};
use crate::revision::Revision;

/// Status lists at most this many instances, and only those that are not steady.
pub const INSTANCE_TABLE_LIMIT: usize = 32;

pub const PROGRESSING: &str = "Progressing";
pub const PAUSED: &str = "Paused";
pub const DEGRADED: &str = "Degraded";

/// Everything the status is built from.
pub struct StatusInput<'a> {
    pub app: &'a str,
    pub generation: Option<i64>,
    pub spec: &'a GrayAppSpec,
    pub previous: &'a GrayAppStatus,
    pub pods: &'a Instances,
    pub revisions: &'a BTreeMap<String, Revision>,
    /// Variant name of each variant revision.
    pub variant_names: &'a BTreeMap<String, String>,
    pub update_revision: &'a str,
    /// `None` when the spec could not be planned at all.
    pub plan: Option<&'a Plan>,
    /// Why the spec is invalid, when it is.
    pub invalid: Option<&'a str>,
    /// A write that failed lately and is being retried.
    pub write_failure: Option<&'a WriteFailure>,
    pub now: &'a Time,
}

/// Where an instance stands, as the status table shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    Missing,
    Terminating,
    Running,
    Updating,
    Draining,
    Starting,
    Unready,
}

impl InstanceState {
    pub fn of(pod: Option<&PodView>) -> Self {
        match pod {
            None => InstanceState::Missing,
            Some(p) if p.deleting => InstanceState::Terminating,
            Some(p) if p.available() => InstanceState::Running,
            Some(p)
                if p.record
                    .as_ref()
                    .is_some_and(|r| Some(&r.revision) == p.revision.as_ref())
                    && !p.in_place_done() =>
            {
                InstanceState::Updating
            }
            Some(p) if p.in_service == Some(false) && p.containers_ready() => {
                InstanceState::Draining
            }
            Some(p) if p.containers_ready() => InstanceState::Starting,
            Some(_) => InstanceState::Unready,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Missing => "Missing",
            InstanceState::Terminating => "Terminating",
            InstanceState::Running => "Running",
            InstanceState::Updating => "Updating",
            InstanceState::Draining => "Draining",
            InstanceState::Starting => "Starting",
            InstanceState::Unready => "Unready",
        }
    }
}

pub fn build(input: &StatusInput) -> GrayAppStatus {
    let desired = desired_ordinals(input.spec.replicas, &input.spec.remove_instances);
    let pods = input.pods;
    let existing = desired.iter().filter(|o| pods.contains_key(o)).count();
    let ready = desired
        .iter()
        .filter(|o| pods.get(o).is_some_and(|p| p.available()))
        .count();
    let updated = desired
        .iter()
        .filter(|o| pods.get(o).and_then(|p| p.revision.as_deref()) == Some(input.update_revision))
        .count();

    let mut by_revision: BTreeMap<&str, BTreeSet<Ordinal>> = BTreeMap::new();
    for (o, p) in pods {
        if let Some(r) = &p.revision {
            by_revision.entry(r.as_str()).or_default().insert(*o);
        }
    }
    let revisions: Vec<RevisionStatus> = by_revision
        .iter()
        .map(|(name, set)| RevisionStatus {
            name: (*name).to_string(),
            variant: input.variant_names.get(*name).cloned(),
            images: input
                .revisions
                .get(*name)
                .map(Revision::images)
                .unwrap_or_default(),
            count: i32::try_from(set.len()).unwrap_or(i32::MAX),
            instances: format_ranges(set),
        })
        .collect();

    let previous_rows: BTreeMap<&str, &InstanceStatus> = input
        .previous
        .instances
        .iter()
        .map(|i| (i.name.as_str(), i))
        .collect();
    // Only instances that are not steady are listed: steady means Running on the revision it
    // should rest on (the template's, or its variant's). Those in flight or in trouble (not
    // Running) come first when there are more than the table holds; then those merely on
    // another revision. Where every instance runs, the revisions' ordinal ranges say.
    let variant_of: BTreeMap<Ordinal, &str> = input
        .spec
        .variants
        .iter()
        .flat_map(|v| v.instances.iter().map(move |o| (*o, v.name.as_str())))
        .collect();
    let mut unsteady: Vec<(Ordinal, InstanceState)> = Vec::new();
    for o in &desired {
        let pod = pods.get(o);
        let state = InstanceState::of(pod.map(AsRef::as_ref));
        let revision = pod.and_then(|p| p.revision.as_deref());
        let at_rest = match variant_of.get(o) {
            Some(variant) => revision
                .and_then(|r| input.variant_names.get(r))
                .is_some_and(|v| v == variant),
            None => revision == Some(input.update_revision),
        };
        if !(state == InstanceState::Running && at_rest) {
            unsteady.push((*o, state));
        }
    }
    let (busy, idle): (Vec<_>, Vec<_>) = unsteady
        .into_iter()
        .partition(|(_, s)| *s != InstanceState::Running);
    let mut listed: Vec<(Ordinal, InstanceState)> = busy
        .into_iter()
        .chain(idle)
        .take(INSTANCE_TABLE_LIMIT)
        .collect();
    listed.sort_by_key(|(o, _)| *o);
    let mut instances = Vec::new();
    for (o, state) in listed {
        let pod = pods.get(&o);
        let revision = pod.and_then(|p| p.revision.clone());
        let name = pod_name(input.app, o);
        let images = pod
            .map(|p| {
                p.containers
                    .iter()
                    .map(|c| format!("{}={}", c.name, c.image))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let ready = pod.is_some_and(|p| p.available());
        let unchanged = previous_rows.get(name.as_str()).filter(|prev| {
            prev.revision == revision && prev.ready == ready && prev.state == state.as_str()
        });
        instances.push(InstanceStatus {
            last_transition_time: unchanged
                .and_then(|p| p.last_transition_time.clone())
                .or_else(|| Some(input.now.clone())),
            name,
            revision,
            images,
            ready,
            state: state.as_str().to_string(),
            node: pod.and_then(|p| p.node.clone()),
        });
    }

    let mut status = GrayAppStatus {
        observed_generation: input.generation,
        conditions: input.previous.conditions.clone(),
        replicas: i32::try_from(existing).unwrap_or(i32::MAX),
        ready_replicas: i32::try_from(ready).unwrap_or(i32::MAX),
        updated_replicas: i32::try_from(updated).unwrap_or(i32::MAX),
        label_selector: selector_string(input.spec),
        update_revision: Some(input.update_revision.to_string()),
        current_revision: input
            .plan
            .and_then(|p| p.current_revision.clone())
            .or_else(|| input.previous.current_revision.clone()),
        images: images_summary(&revisions),
        revisions,
        rollout: input
            .plan
            .map(|p| p.rollout.clone())
            .or_else(|| input.previous.rollout.clone()),
        instances,
    };
    set_conditions(&mut status, input, desired.len(), ready);
    status
}

/// How many image sets [`images_summary`] names; the rest it counts.
pub const IMAGES_SHOWN: usize = 2;
/// The longest one image set reads in [`images_summary`], in characters.
const IMAGE_LABEL_MAX: usize = 48;

/// What the instances run, for `kubectl get`: each set of images with how many instances run
/// it, the most common first, at most [`IMAGES_SHOWN`] of them and then how many others
/// (`ocr:v8 (20), ocr:v7 (4), +1 more`). An image reads as its last path segment
/// (`registry/team/ocr:v8` as `ocr:v8`, a digest cut to 12 characters). With several
/// containers only those whose images differ between revisions are named (`ocr=ocr:v8`); a
/// revision whose images are unknown reads as its name.
pub fn images_summary(revisions: &[RevisionStatus]) -> String {
    let containers: BTreeSet<&str> = revisions
        .iter()
        .flat_map(|r| r.images.keys().map(String::as_str))
        .collect();
    let differing: Vec<&str> = containers
        .iter()
        .copied()
        .filter(|c| {
            revisions
                .iter()
                .filter(|r| !r.images.is_empty())
                .map(|r| r.images.get(*c))
                .collect::<BTreeSet<_>>()
                .len()
                > 1
        })
        .collect();
    let named: Vec<&str> = if differing.is_empty() {
        containers.iter().copied().collect()
    } else {
        differing
    };
    // Revisions that run the same images (they differ elsewhere) count together.
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for r in revisions {
        let label = if r.images.is_empty() {
            r.name.clone()
        } else if containers.len() == 1 {
            r.images.values().map(|i| short_image(i)).collect()
        } else {
            named
                .iter()
                .map(|c| {
                    let image = r.images.get(*c).map_or("-".into(), |i| short_image(i));
                    format!("{c}={image}")
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        *counts.entry(label).or_default() += i64::from(r.count);
    }
    let mut sets: Vec<(String, i64)> = counts.into_iter().collect();
    sets.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut parts: Vec<String> = sets
        .iter()
        .take(IMAGES_SHOWN)
        .map(|(label, count)| format!("{} ({count})", bounded(label)))
        .collect();
    if sets.len() > IMAGES_SHOWN {
        parts.push(format!("+{} more", sets.len() - IMAGES_SHOWN));
    }
    parts.join(", ")
}

/// `registry.example.com:5000/team/ocr:v8` as `ocr:v8`; `ocr@sha256:<64 hex>` keeps 12 of them.
fn short_image(image: &str) -> String {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    let last = name.rsplit('/').next().unwrap_or(name);
    match digest {
        Some(digest) => {
            let (algorithm, hex) = digest.split_once(':').unwrap_or(("", digest));
            let hex: String = hex.chars().take(12).collect();
            if algorithm.is_empty() {
                format!("{last}@{hex}")
            } else {
                format!("{last}@{algorithm}:{hex}")
            }
        }
        None => last.to_string(),
    }
}

fn bounded(label: &str) -> String {
    if label.chars().count() <= IMAGE_LABEL_MAX {
        return label.to_string();
    }
    let mut out: String = label.chars().take(IMAGE_LABEL_MAX - 1).collect();
    out.push('…');
    out
}

/// The selector as the scale subresource carries it to an HPA: expressions included.
fn selector_string(spec: &GrayAppSpec) -> String {
    gantry_kit::selector::parse(&spec.selector)
        .map(|s| gantry_kit::selector::to_query(&s))
        .unwrap_or_default()
}

/// Why a condition is what it is: one word per cause, so that a new one cannot be spelt two
/// ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionReason {
    InvalidSpec,
    WriteForbidden,
    WriteFailed,
    RolloutFailed,
    RolloutAborted,
    Progressing,
    Baking,
    RollingBack,
    AwaitingApproval,
    InstancesNotReady,
    Converged,
    NoRollout,
    Completed,
    Failed,
    Aborted,
    PausedBySpec,
    NotPaused,
    HealthGateFailed,
    InPlaceRecordUnreadable,
    Healthy,
}

impl ConditionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionReason::InvalidSpec => "InvalidSpec",
            ConditionReason::WriteForbidden => "WriteForbidden",
            ConditionReason::WriteFailed => "WriteFailed",
            ConditionReason::RolloutFailed => "RolloutFailed",
            ConditionReason::RolloutAborted => "RolloutAborted",
            ConditionReason::Progressing => "Progressing",
            ConditionReason::Baking => "Baking",
            ConditionReason::RollingBack => "RollingBack",
            ConditionReason::AwaitingApproval => "AwaitingApproval",
            ConditionReason::InstancesNotReady => "InstancesNotReady",
            ConditionReason::Converged => "Converged",
            ConditionReason::NoRollout => "NoRollout",
            ConditionReason::Completed => "Completed",
            ConditionReason::Failed => "Failed",
            ConditionReason::Aborted => "Aborted",
            ConditionReason::PausedBySpec => "PausedBySpec",
            ConditionReason::NotPaused => "NotPaused",
            ConditionReason::HealthGateFailed => "HealthGateFailed",
            ConditionReason::InPlaceRecordUnreadable => "InPlaceRecordUnreadable",
            ConditionReason::Healthy => "Healthy",
        }
    }

    fn of_phase(phase: RolloutPhase) -> Self {
        match phase {
            RolloutPhase::Progressing => ConditionReason::Progressing,
            RolloutPhase::Baking => ConditionReason::Baking,
            RolloutPhase::RollingBack => ConditionReason::RollingBack,
            RolloutPhase::AwaitingApproval => ConditionReason::AwaitingApproval,
            RolloutPhase::Completed => ConditionReason::Completed,
            RolloutPhase::Failed => ConditionReason::Failed,
            RolloutPhase::Aborted => ConditionReason::Aborted,
        }
    }
}

/// Ready, Reconciling or Stalled, as kstatus (Flux, Argo CD's kstatus-based checks) reads
/// them. An aborted rollout is a person's decision carried out: every instance serves on its
/// previous revision, so the app is Ready, with the abort as its reason; a failed one needs a
/// person and is Stalled.
fn summarise(status: &GrayAppStatus, input: &StatusInput, desired: usize, ready: usize) -> Summary {
    let phase = status.rollout.as_ref().map(|r| r.phase);
    let rollout_message = || {
        status
            .rollout
            .as_ref()
            .map(|r| r.message.clone())
            .unwrap_or_default()
    };
    let acting = input.plan.is_some_and(|p| !p.actions.is_empty());
    let (kind, (reason, message)) = if let Some(why) = input.invalid {
        (
            Kind::Stalled,
            (ConditionReason::InvalidSpec, why.to_string()),
        )
    } else if let Some(failure) = input.write_failure {
        let message = format!("retrying a write the API server refused: {failure}");
        if failure.needs_a_person() {
            (Kind::Stalled, (ConditionReason::WriteForbidden, message))
        } else {
            (Kind::Reconciling, (ConditionReason::WriteFailed, message))
        }
    } else {
        match phase {
            Some(RolloutPhase::Failed) => (
                Kind::Stalled,
                (ConditionReason::RolloutFailed, rollout_message()),
            ),
            Some(
                p @ (RolloutPhase::Progressing
                | RolloutPhase::Baking
                | RolloutPhase::RollingBack
                | RolloutPhase::AwaitingApproval),
            ) => (
                Kind::Reconciling,
                (ConditionReason::of_phase(p), rollout_message()),
            ),
            _ if acting || ready < desired => (
                Kind::Reconciling,
                (
                    ConditionReason::InstancesNotReady,
                    format!("{ready} of {desired} instances ready"),
                ),
            ),
            Some(RolloutPhase::Aborted) => (
                Kind::Ready,
                (
                    ConditionReason::RolloutAborted,
                    format!(
                        "{}; {ready} of {desired} instances ready",
                        rollout_message()
                    ),
                ),
            ),
            _ => {
                let spread = status
                    .revisions
                    .iter()
                    .map(|r| format!("{} on {}", r.count, r.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                (
                    Kind::Ready,
                    (
                        ConditionReason::Converged,
                        format!("{ready} of {desired} instances ready ({spread})"),
                    ),
                )
            }
        }
    };
    let reason = reason.as_str().to_string();
    match kind {
        Kind::Ready => Summary::Ready { reason, message },
        Kind::Reconciling => Summary::Reconciling { reason, message },
        Kind::Stalled => Summary::Stalled { reason, message },
    }
}

enum Kind {
    Ready,
    Reconciling,
    Stalled,
}

fn set_conditions(status: &mut GrayAppStatus, input: &StatusInput, desired: usize, ready: usize) {
    let now = input.now;
    let generation = input.generation;
    let summary = summarise(status, input, desired, ready);
    conditions::set_summary(&mut status.conditions, &summary, generation, now);
    let phase = status.rollout.as_ref().map(|r| r.phase);
    let rollout_message = status
        .rollout
        .as_ref()
        .map(|r| r.message.clone())
        .unwrap_or_default();
    let moving = matches!(
        phase,
        Some(RolloutPhase::Progressing | RolloutPhase::Baking | RolloutPhase::RollingBack)
    );
    let phase_reason = phase.map_or(ConditionReason::NoRollout, ConditionReason::of_phase);
    conditions::set(
        &mut status.conditions,
        &Desired::new(
            PROGRESSING,
            Status::from_bool(moving),
            phase_reason.as_str(),
            rollout_message.clone(),
        ),
        generation,
        now,
    );
    let paused = input.spec.update.paused;
    conditions::set(
        &mut status.conditions,
        &Desired::new(
            PAUSED,
            Status::from_bool(paused),
            if paused {
                ConditionReason::PausedBySpec.as_str()
            } else {
                ConditionReason::NotPaused.as_str()
            },
            "",
        ),
        generation,
        now,
    );
    let (degraded, reason, message) = degradation(input, phase, &rollout_message);
    conditions::set(
        &mut status.conditions,
        &Desired::new(
            DEGRADED,
            Status::from_bool(degraded),
            reason.as_str(),
            message,
        ),
        generation,
        now,
    );
}

fn degradation(
    input: &StatusInput,
    phase: Option<RolloutPhase>,
    rollout_message: &str,
) -> (bool, ConditionReason, String) {
    let unreadable = input.plan.map(|p| &p.unreadable).filter(|u| !u.is_empty());
    if let Some(unreadable) = unreadable {
        let names: Vec<String> = unreadable.iter().map(|o| pod_name(input.app, *o)).collect();
        return (
            true,
            ConditionReason::InPlaceRecordUnreadable,
            format!(
                "kept out of service: the in-place update record of {} cannot be read, so its \
                 restart cannot be confirmed; delete the pod to recreate it",
                names.join(", ")
            ),
        );
    }
    let failed = input.plan.map_or(0, |p| p.failed.len());
    if failed > 0
        || matches!(
            phase,
            Some(RolloutPhase::Failed | RolloutPhase::RollingBack)
        )
    {
        return (
            true,
            ConditionReason::HealthGateFailed,
            format!("{failed} instance(s) failed their health gate; {rollout_message}"),
        );
    }
    (false, ConditionReason::Healthy, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ContainerView;
    use k8s_openapi::jiff::Timestamp;
    use std::sync::Arc;

    fn spec(replicas: i32) -> GrayAppSpec {
        serde_json::from_value(serde_json::json!({
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "ocr"}},
            "template": {"metadata": {"labels": {"app": "ocr"}}, "spec": {"containers": [{"name": "ocr", "image": "ocr:v7"}]}}
        }))
        .expect("valid")
    }

    fn running(o: Ordinal, rev: &str) -> PodView {
        PodView {
            ordinal: o,
            revision: Some(rev.into()),
            ready: true,
            in_service: Some(true),
            node: Some("n1".into()),
            containers: vec![ContainerView {
                name: "ocr".into(),
                image: "ocr:v7".into(),
                ready: true,
                ..ContainerView::default()
            }],
            ..PodView::default()
        }
    }

    fn now() -> Time {
        Time(Timestamp::from_second(1_000).expect("valid"))
    }

    /// A status input with nothing but the spec, the pods and the clock: each test names what
    /// differs from it.
    fn input<'a>(spec: &'a GrayAppSpec, pods: &'a Instances, now: &'a Time) -> StatusInput<'a> {
        StatusInput {
            app: "ocr",
            generation: None,
            spec,
            previous: &NO_STATUS,
            pods,
            revisions: &NO_REVISIONS,
            variant_names: &NO_VARIANTS,
            update_revision: "ocr-a",
            plan: None,
            invalid: None,
            write_failure: None,
            now,
        }
    }

    static NO_STATUS: std::sync::LazyLock<GrayAppStatus> =
        std::sync::LazyLock::new(GrayAppStatus::default);
    static NO_REVISIONS: BTreeMap<String, Revision> = BTreeMap::new();
    static NO_VARIANTS: BTreeMap<String, String> = BTreeMap::new();

    #[test]
    fn converged_app_is_ready_with_revision_spread() {
        let spec = spec(3);
        let pods: BTreeMap<_, _> = (0..3)
            .map(|o| {
                (
                    o,
                    Arc::new(running(o, if o == 1 { "ocr-b" } else { "ocr-a" })),
                )
            })
            .collect();
        let now = now();
        let status = build(&StatusInput {
            generation: Some(2),
            ..input(&spec, &pods, &now)
        });
        assert_eq!(
            (
                status.replicas,
                status.ready_replicas,
                status.updated_replicas
            ),
            (3, 3, 2)
        );
        assert!(conditions::is_true(&status.conditions, conditions::READY));
        assert_eq!(
            status
                .revisions
                .iter()
                .map(|r| (r.name.as_str(), r.instances.as_str()))
                .collect::<Vec<_>>(),
            vec![("ocr-a", "0,2"), ("ocr-b", "1")]
        );
        assert_eq!(status.label_selector, "app=ocr");
        // Only the instance not on the template's revision has a row.
        assert_eq!(
            status
                .instances
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            vec!["ocr-1"]
        );
        assert_eq!(status.observed_generation, Some(2));
    }

    fn revision(name: &str, images: &[(&str, &str)], count: i32) -> RevisionStatus {
        RevisionStatus {
            name: name.into(),
            variant: None,
            images: images
                .iter()
                .map(|(c, i)| (c.to_string(), i.to_string()))
                .collect(),
            count,
            instances: String::new(),
        }
    }

    #[test]
    fn status_names_the_images_instances_run_with_their_counts() {
        let spec = spec(25);
        let pods: BTreeMap<_, _> = (0..25)
            .map(|o| {
                (
                    o,
                    Arc::new(running(o, if o < 5 { "ocr-a" } else { "ocr-b" })),
                )
            })
            .collect();
        let template = |image: &str| {
            serde_json::from_value(serde_json::json!({
                "spec": {"containers": [{"name": "ocr", "image": image}]}
            }))
            .expect("valid template")
        };
        let revisions: BTreeMap<String, Revision> = [
            ("ocr-a", "registry.example.com/vision/ocr:v7"),
            ("ocr-b", "registry.example.com/vision/ocr:v8"),
        ]
        .into_iter()
        .map(|(name, image)| {
            (
                name.to_string(),
                Revision {
                    name: name.into(),
                    template: template(image),
                },
            )
        })
        .collect();
        let now = now();
        let status = build(&StatusInput {
            revisions: &revisions,
            update_revision: "ocr-b",
            ..input(&spec, &pods, &now)
        });
        assert_eq!(status.images, "ocr:v8 (20), ocr:v7 (5)");
    }

    #[test]
    fn the_images_summary_stays_short_with_many_revisions() {
        let revisions: Vec<RevisionStatus> = (0..40)
            .map(|n| revision(&format!("ocr-{n}"), &[("ocr", &format!("ocr:v{n}"))], n + 1))
            .collect();
        assert_eq!(
            images_summary(&revisions),
            "ocr:v39 (40), ocr:v38 (39), +38 more"
        );
        let long = "registry.example.com/vision/an-image-whose-name-goes-on-and-on-and-on:v1";
        let summary = images_summary(&[revision("ocr-a", &[("ocr", long)], 1)]);
        assert!(summary.chars().count() <= IMAGE_LABEL_MAX + 4, "{summary}");
        assert_eq!(images_summary(&[]), "");
    }

    #[test]
    fn with_several_containers_the_summary_names_those_that_differ() {
        let revisions = [
            revision("ocr-a", &[("ocr", "ocr:v8"), ("proxy", "envoy:1.30")], 3),
            revision("ocr-b", &[("ocr", "ocr:v7"), ("proxy", "envoy:1.30")], 22),
            revision("ocr-c", &[], 1),
        ];
        assert_eq!(
            images_summary(&revisions),
            "ocr=ocr:v7 (22), ocr=ocr:v8 (3), +1 more"
        );
        let same = [revision(
            "ocr-a",
            &[("ocr", "ocr:v8"), ("proxy", "envoy:1.30")],
            25,
        )];
        assert_eq!(images_summary(&same), "ocr=ocr:v8,proxy=envoy:1.30 (25)");
        // Two revisions with the same images (they differ in a label) count together.
        let twins = [
            revision("ocr-a", &[("ocr", "ocr:v8")], 20),
            revision("ocr-b", &[("ocr", "ocr:v8")], 5),
        ];
        assert_eq!(images_summary(&twins), "ocr:v8 (25)");
        assert_eq!(
            short_image("ocr@sha256:0123456789abcdef0123456789abcdef"),
            "ocr@sha256:0123456789ab"
        );
    }

    #[test]
    fn the_scale_selector_carries_match_expressions_for_an_hpa() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let mut spec = spec(1);
        spec.selector.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "track".into(),
            operator: "NotIn".into(),
            values: Some(vec!["canary".into()]),
        }]);
        assert_eq!(selector_string(&spec), "app=ocr,track notin (canary)");
    }

    fn three_on(rev: &str) -> Instances {
        (0..3).map(|o| (o, Arc::new(running(o, rev)))).collect()
    }

    #[test]
    fn an_aborted_rollout_with_every_instance_serving_is_ready_not_stalled() {
        let spec = spec(3);
        let pods = three_on("ocr-a");
        let previous = GrayAppStatus {
            rollout: Some(crate::api::RolloutStatus {
                phase: RolloutPhase::Aborted,
                members: vec![0],
                aborted: true,
                message: "every instance rollout ocr-b moved is back on its previous revision"
                    .into(),
                ..crate::api::RolloutStatus::new("ocr-b", 1)
            }),
            ..GrayAppStatus::default()
        };
        let now = now();
        let status = build(&StatusInput {
            previous: &previous,
            update_revision: "ocr-b",
            ..input(&spec, &pods, &now)
        });
        assert!(conditions::is_true(&status.conditions, conditions::READY));
        assert!(!conditions::is_true(
            &status.conditions,
            conditions::STALLED
        ));
        let ready = conditions::get(&status.conditions, conditions::READY).expect("Ready");
        assert_eq!(ready.reason, "RolloutAborted");
        assert!(
            ready.message.contains("3 of 3 instances ready"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn a_forbidden_write_stalls_the_app_naming_the_verb_and_resource() {
        let spec = spec(3);
        let pods = three_on("ocr-b");
        let failure = WriteFailure {
            verb: crate::model::Verb::Patch,
            resource: crate::model::Written::PodStatus,
            object: "ocr-1".into(),
            code: Some(403),
            message: "pods \"ocr-1\" is forbidden".into(),
        };
        let now = now();
        let status = build(&StatusInput {
            write_failure: Some(&failure),
            update_revision: "ocr-b",
            ..input(&spec, &pods, &now)
        });
        let stalled = conditions::get(&status.conditions, conditions::STALLED).expect("Stalled");
        assert_eq!(stalled.status, "True");
        assert_eq!(stalled.reason, "WriteForbidden");
        assert!(
            stalled.message.contains("patch pods/status ocr-1: 403"),
            "{}",
            stalled.message
        );
    }

    #[test]
    fn an_unreadable_record_degrades_the_app_naming_the_pod() {
        let spec = spec(3);
        let pods = three_on("ocr-b");
        let plan = Plan {
            actions: Vec::new(),
            rollout: crate::api::RolloutStatus {
                members: vec![1],
                ..crate::api::RolloutStatus::new("ocr-b", 1)
            },
            current_revision: None,
            notes: Vec::new(),
            requeue_after: None,
            failed: BTreeSet::new(),
            held_back: 0,
            unreadable: [1].into(),
        };
        let now = now();
        let status = build(&StatusInput {
            plan: Some(&plan),
            update_revision: "ocr-b",
            ..input(&spec, &pods, &now)
        });
        let degraded = conditions::get(&status.conditions, DEGRADED).expect("Degraded");
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, "InPlaceRecordUnreadable");
        assert!(degraded.message.contains("ocr-1"), "{}", degraded.message);
    }

    #[test]
    fn invalid_spec_is_stalled() {
        let spec = spec(1);
        let now = now();
        let no_pods = Instances::new();
        let status = build(&StatusInput {
            invalid: Some("selector does not match the template's labels"),
            ..input(&spec, &no_pods, &now)
        });
        assert!(conditions::is_true(&status.conditions, conditions::STALLED));
        assert!(!conditions::is_true(&status.conditions, conditions::READY));
    }

    #[test]
    fn large_apps_list_only_instances_that_are_not_steady() {
        let spec = spec(1000);
        let mut pods: BTreeMap<_, _> = (0..1000)
            .map(|o| (o, Arc::new(running(o, "ocr-a"))))
            .collect();
        if let Some(p) = pods.get_mut(&7).map(Arc::make_mut) {
            p.ready = false;
        }
        let now = now();
        let status = build(&input(&spec, &pods, &now));
        assert_eq!(status.instances.len(), 1);
        assert_eq!(status.instances[0].name, "ocr-7");
        assert_eq!(status.revisions[0].instances, "0-999");
    }

    fn status_of(
        spec: &GrayAppSpec,
        pods: &Instances,
        variant_names: &BTreeMap<String, String>,
    ) -> GrayAppStatus {
        let now = now();
        build(&StatusInput {
            variant_names,
            ..input(spec, pods, &now)
        })
    }

    fn names(status: &GrayAppStatus) -> Vec<String> {
        status.instances.iter().map(|i| i.name.clone()).collect()
    }

    #[test]
    fn a_healthy_app_lists_no_instance_its_revisions_show_where_each_runs() {
        let pods: Instances = (0..25)
            .map(|o| (o, Arc::new(running(o, "ocr-a"))))
            .collect();
        let status = status_of(&spec(25), &pods, &BTreeMap::new());
        assert_eq!(status.instances, Vec::new());
        assert_eq!(status.revisions[0].instances, "0-24");
    }

    #[test]
    fn the_instance_table_is_bounded_and_lists_instances_in_flight_first() {
        // Mid-rollout: 900 instances still on the old revision, 100 moved, 5 of them not Ready.
        let pods: Instances = (0..1000)
            .map(|o| {
                let mut pod = running(o, if o < 900 { "ocr-old" } else { "ocr-a" });
                pod.ready = !(950..955).contains(&o);
                (o, Arc::new(pod))
            })
            .collect();
        let status = status_of(&spec(1000), &pods, &BTreeMap::new());
        let expected: Vec<String> = (0..27)
            .chain(950..955)
            .map(|o| format!("ocr-{o}"))
            .collect();
        assert_eq!(names(&status), expected);
        assert_eq!(status.instances.len(), INSTANCE_TABLE_LIMIT);
    }

    #[test]
    fn variant_instances_on_their_variant_revision_are_steady() {
        let mut spec = spec(4);
        spec.variants = vec![
            serde_json::from_value(serde_json::json!({
                "name": "v8", "instances": [2], "images": {"ocr": "ocr:v8"}
            }))
            .expect("valid variant"),
        ];
        let variant_names: BTreeMap<String, String> = [("ocr-v8".into(), "v8".into())].into();
        let pods: Instances = [
            (0, running(0, "ocr-a")),
            (1, running(1, "ocr-a")),
            (2, running(2, "ocr-v8")),
            // Not a v8 instance, yet on its revision.
            (3, running(3, "ocr-v8")),
        ]
        .into_iter()
        .map(|(o, p)| (o, Arc::new(p)))
        .collect();
        let status = status_of(&spec, &pods, &variant_names);
        assert_eq!(names(&status), vec!["ocr-3"]);
    }

    #[test]
    fn instance_transition_time_moves_only_on_change() {
        let spec = spec(1);
        // Not Ready, so it has a row.
        let unready = PodView {
            ready: false,
            ..running(0, "ocr-a")
        };
        let pods: BTreeMap<_, _> = [(0, Arc::new(unready))].into();
        let t1 = now();
        let input = |previous: &GrayAppStatus, now: &Time| {
            build(&StatusInput {
                previous,
                ..input(&spec, &pods, now)
            })
        };
        let first = input(&GrayAppStatus::default(), &t1);
        let t2 = Time(Timestamp::from_second(2_000).expect("valid"));
        let second = input(&first, &t2);
        assert_eq!(second.instances[0].last_transition_time, Some(t1));
    }
}
