//! The planner: from the GrayApp, its pods and its revisions to the next actions and the new
//! rollout status. Pure: no I/O, no clock (the time comes in), so every branch is unit-tested.
//!
//! Guarantees, property-tested in `plan_tests`:
//! - no action makes more instances unavailable than `maxUnavailable` allows;
//! - the only instances moved are the current batch's members, variant instances, and, while
//!   rolling back, the instances this rollout moved;
//! - repeated planning against a world that carries the actions out converges: every instance
//!   reaches its target revision and the rollout completes.
//!
//! Crash safety: a batch's members and where they come from are written to status before any
//! of them is touched, and each in-place update is recorded on its pod in the same write that
//! patches it; so a restarted operator resumes exactly where it stopped, never upgrading an
//! instance twice or losing one.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::api::{
    Batch, FailurePolicy, GrayAppSpec, GrayAppStatus, Promotion, RolloutPhase, RolloutStatus,
    UpdateMethod,
};
use crate::checks::MetricVerdict;
use crate::model::{
    ContainerBaseline, InPlaceRecord, Instances, Ordinal, Seconds, format_ranges, normalize_image,
    parse_ranges,
};
use crate::revision::{Revision, in_place_compatible};

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub spec: &'a GrayAppSpec,
    /// The `apps.gantry.dev/approve` annotation.
    pub approve: Option<&'a str>,
    /// The `apps.gantry.dev/abort` annotation.
    pub abort: Option<&'a str>,
    /// The status as last written.
    pub status: &'a GrayAppStatus,
    /// The app's pods by ordinal (including ones beyond the desired set).
    pub pods: &'a Instances,
    /// Every known revision by name: the update revision, the variants', and history.
    pub revisions: &'a BTreeMap<String, Revision>,
    /// The revision of spec.template.
    pub update_revision: &'a str,
    /// The revision each variant instance runs.
    pub variant_revisions: &'a BTreeMap<Ordinal, String>,
    /// Batch members whose HTTP check failed, with why.
    pub check_failures: &'a BTreeMap<Ordinal, String>,
    /// What the batch's Prometheus query said.
    pub metric: &'a MetricVerdict,
    pub now: Seconds,
}

/// One change to make.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create the instance's pod (and its claims) at a revision.
    Create { ordinal: Ordinal, revision: String },
    /// Delete the pod.
    Delete {
        ordinal: Ordinal,
        uid: String,
        reason: DeleteReason,
    },
    /// Set the readiness gate False: Services stop sending it traffic.
    TakeOutOfService { ordinal: Ordinal, uid: String },
    /// Patch images, revision label and the update record into the running pod.
    PatchInPlace {
        ordinal: Ordinal,
        uid: String,
        revision: String,
        images: BTreeMap<String, String>,
        record: InPlaceRecord,
    },
    /// Set the readiness gate True: the new container is Ready.
    PutInService { ordinal: Ordinal, uid: String },
}

impl Action {
    pub fn ordinal(&self) -> Ordinal {
        match self {
            Action::Create { ordinal, .. }
            | Action::Delete { ordinal, .. }
            | Action::TakeOutOfService { ordinal, .. }
            | Action::PatchInPlace { ordinal, .. }
            | Action::PutInService { ordinal, .. } => *ordinal,
        }
    }
}

/// Why a pod is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// The instance is no longer wanted.
    ScaleDown,
    /// The change cannot happen in place; the pod comes back under the same name.
    Recreate,
    /// The pod has terminated for good; a new one replaces it.
    Replace,
}

/// Something worth an Event on the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub reason: NoteReason,
    pub message: String,
}

/// What a note on the app reports. Whether it is a warning is part of the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoteReason {
    RolloutStarted,
    RolloutResumed,
    RolloutAborted,
    BatchStarted,
    InstanceFailed,
    BatchFailed,
    RevisionMissing,
    RolledBack,
    RolloutCompleted,
    AwaitingApproval,
    BatchPromoted,
}

impl NoteReason {
    /// The event reason, as `kubectl describe` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            NoteReason::RolloutStarted => "RolloutStarted",
            NoteReason::RolloutResumed => "RolloutResumed",
            NoteReason::RolloutAborted => "RolloutAborted",
            NoteReason::BatchStarted => "BatchStarted",
            NoteReason::InstanceFailed => "InstanceFailed",
            NoteReason::BatchFailed => "BatchFailed",
            NoteReason::RevisionMissing => "RevisionMissing",
            NoteReason::RolledBack => "RolledBack",
            NoteReason::RolloutCompleted => "RolloutCompleted",
            NoteReason::AwaitingApproval => "AwaitingApproval",
            NoteReason::BatchPromoted => "BatchPromoted",
        }
    }

    /// Whether it needs a person's attention.
    pub fn is_warning(self) -> bool {
        matches!(
            self,
            NoteReason::RolloutAborted
                | NoteReason::InstanceFailed
                | NoteReason::BatchFailed
                | NoteReason::RevisionMissing
                | NoteReason::RolledBack
        )
    }
}

/// What to do now.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub rollout: RolloutStatus,
    pub current_revision: Option<String>,
    pub notes: Vec<Note>,
    /// Plan again after this many seconds even if nothing changes (a timer runs).
    pub requeue_after: Option<Seconds>,
    /// Instances that failed their health gate in the current batch.
    pub failed: BTreeSet<Ordinal>,
    /// Instances the budget or a pause kept from moving this time.
    pub held_back: usize,
}

/// The ordinals the app should have: the first `replicas` ordinals not removed.
pub fn desired_ordinals(replicas: i32, removed: &[i32]) -> Vec<Ordinal> {
    let removed: BTreeSet<_> = removed.iter().copied().collect();
    (0..)
        .filter(|o| !removed.contains(o))
        .take(usize::try_from(replicas).unwrap_or(0))
        .collect()
}

/// `maxUnavailable` as a number of instances: a percentage rounds down, and at least one
/// instance may always be unavailable (there is no surge to make progress otherwise).
pub fn max_unavailable(value: &IntOrString, replicas: usize) -> usize {
    let n = match value {
        IntOrString::Int(n) => usize::try_from(*n).unwrap_or(0),
        IntOrString::String(s) => {
            let pct: usize = s.trim_end_matches('%').parse().unwrap_or(0);
            pct.min(100) * replicas / 100
        }
    };
    n.max(1)
}

/// How many of `outdated` instances a count batch takes: a number, or a percentage rounded up.
fn batch_count(count: &IntOrString, outdated: usize) -> usize {
    match count {
        IntOrString::Int(n) => usize::try_from(*n).unwrap_or(0),
        IntOrString::String(s) => {
            let pct: usize = s.trim_end_matches('%').parse().unwrap_or(0);
            (pct.min(100) * outdated).div_ceil(100)
        }
    }
}

fn time(seconds: Seconds) -> Time {
    Time(Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn seconds(t: &Time) -> Seconds {
    t.0.as_second()
}

/// The revision each instance ran when status was last written, from the revision ranges.
fn last_known_revisions(status: &GrayAppStatus) -> BTreeMap<Ordinal, &str> {
    status
        .revisions
        .iter()
        .flat_map(|r| {
            parse_ranges(&r.instances)
                .into_iter()
                .map(move |o| (o, r.name.as_str()))
        })
        .collect()
}

/// Lookups the instance loop makes for every instance, built once per plan.
struct Sets {
    desired: BTreeSet<Ordinal>,
    members: BTreeSet<Ordinal>,
    /// Where each instance this rollout moved came from.
    origins: BTreeMap<Ordinal, String>,
}

impl Sets {
    fn new(desired: &[Ordinal], rollout: &RolloutStatus) -> Self {
        Self {
            desired: desired.iter().copied().collect(),
            members: rollout.members.iter().copied().collect(),
            origins: rollout
                .origins
                .iter()
                .flat_map(|(revision, ranges)| {
                    parse_ranges(ranges)
                        .into_iter()
                        .map(move |o| (o, revision.clone()))
                })
                .collect(),
        }
    }
}

struct Planner<'a> {
    input: &'a Input<'a>,
    desired: Vec<Ordinal>,
    last_known: BTreeMap<Ordinal, &'a str>,
    notes: Vec<Note>,
    requeue: Option<Seconds>,
}

impl<'a> Planner<'a> {
    fn note(&mut self, reason: NoteReason, message: String) {
        self.notes.push(Note { reason, message });
    }

    fn requeue_in(&mut self, seconds: Seconds) {
        let s = seconds.max(1);
        self.requeue = Some(self.requeue.map_or(s, |r| r.min(s)));
    }

    /// The revision an instance runs now: its pod's label, else what status last recorded,
    /// else the last completed rollout's revision, else the update revision.
    fn running_revision(&self, ordinal: Ordinal) -> &'a str {
        let input = self.input;
        input
            .pods
            .get(&ordinal)
            .and_then(|p| p.revision.as_deref())
            .or_else(|| self.last_known.get(&ordinal).copied())
            .or(input.status.current_revision.as_deref())
            .unwrap_or(input.update_revision)
    }

    /// Where an instance should be.
    fn target(
        &self,
        rollout: &RolloutStatus,
        sets: &Sets,
        failed: &BTreeSet<Ordinal>,
        ordinal: Ordinal,
    ) -> String {
        if let Some(revision) = self.input.variant_revisions.get(&ordinal) {
            return revision.clone();
        }
        let running = self.running_revision(ordinal);
        // A failed instance within the failure budget goes back alone while its batch goes on;
        // once the batch as a whole failed, only a rollback moves anyone.
        let batch_goes_on = matches!(
            rollout.phase,
            RolloutPhase::Progressing | RolloutPhase::Baking | RolloutPhase::AwaitingApproval
        );
        let returning = rollout.phase == RolloutPhase::RollingBack
            || (batch_goes_on && failed.contains(&ordinal));
        if returning {
            if running == rollout.revision
                && let Some(origin) = sets.origins.get(&ordinal)
            {
                return origin.clone();
            }
            return running.to_string();
        }
        let moving = matches!(
            rollout.phase,
            RolloutPhase::Progressing | RolloutPhase::Baking | RolloutPhase::AwaitingApproval
        );
        if moving && rollout.batch_started_at.is_some() && sets.members.contains(&ordinal) {
            return rollout.revision.clone();
        }
        running.to_string()
    }

    /// The rollout to work on: the one in status, or a new one when the template changed.
    fn rollout(&mut self) -> RolloutStatus {
        let input = self.input;
        let total = i32::try_from(input.spec.update.batches.len().max(1)).unwrap_or(i32::MAX);
        let mut rollout = match &input.status.rollout {
            Some(r) if r.revision == input.update_revision => r.clone(),
            previous => {
                let from = previous
                    .as_ref()
                    .map_or_else(|| "nothing".to_string(), |r| r.revision.clone());
                if previous.is_some() {
                    self.note(
                        NoteReason::RolloutStarted,
                        format!(
                            "rolling out {} (was {from}) in {total} batch(es)",
                            input.update_revision
                        ),
                    );
                }
                RolloutStatus {
                    revision: input.update_revision.to_string(),
                    phase: RolloutPhase::Progressing,
                    batch: 0,
                    batches: total,
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
        };
        // Batches appended after a completed rollout continue it: `kubectl gantry upgrade
        // --count 10` after a first batch, or a batch added in Git.
        if rollout.phase == RolloutPhase::Completed && rollout.batch + 1 < total {
            rollout.phase = RolloutPhase::Progressing;
            rollout.batch += 1;
            rollout.members.clear();
            rollout.failed.clear();
            rollout.batch_started_at = None;
            rollout.healthy_since = None;
            self.note(
                NoteReason::RolloutResumed,
                format!(
                    "batch {} added to the rollout of {}",
                    rollout.batch + 1,
                    rollout.revision
                ),
            );
        }
        rollout.batches = total;
        let abortable = matches!(
            rollout.phase,
            RolloutPhase::Progressing | RolloutPhase::Baking | RolloutPhase::AwaitingApproval
        );
        if abortable && input.abort == Some(input.update_revision) {
            rollout.phase = RolloutPhase::RollingBack;
            rollout.aborted = true;
            self.note(
                NoteReason::RolloutAborted,
                format!(
                    "rollout of {} aborted; returning its instances to their previous revisions",
                    rollout.revision
                ),
            );
        }
        rollout
    }

    /// Outdated instances the batch selects, in the order it gives.
    /// Desired instances not on the update revision (variant instances excluded).
    fn outdated(&self) -> Vec<Ordinal> {
        let input = self.input;
        self.desired
            .iter()
            .copied()
            .filter(|o| {
                !input.variant_revisions.contains_key(o)
                    && self.running_revision(*o) != input.update_revision
            })
            .collect()
    }

    /// Outdated instances the batch selects, in the order it gives.
    fn resolve_batch(&self, batch: Option<&Batch>) -> Vec<Ordinal> {
        select(batch, self.outdated(), self.input.pods)
    }
}

/// The instances a batch takes from `outdated` (ascending ordinals): the named ones in the
/// order given, those whose pods match a selector, a count of the first, or all of them.
fn select(batch: Option<&Batch>, outdated: Vec<Ordinal>, pods: &Instances) -> Vec<Ordinal> {
    let Some(batch) = batch else {
        return outdated;
    };
    if let Some(instances) = &batch.instances {
        return instances
            .iter()
            .copied()
            .filter(|o| outdated.contains(o))
            .collect();
    }
    if let Some(selector) = &batch.selector {
        // The controller refuses a spec whose selectors do not parse; none matches nothing.
        let Ok(selector) = gantry_kit::selector::parse(selector) else {
            return Vec::new();
        };
        return outdated
            .into_iter()
            .filter(|o| {
                pods.get(o)
                    .is_some_and(|p| gantry_kit::selector::matches(&selector, &p.labels))
            })
            .collect();
    }
    if let Some(count) = &batch.count {
        let n = batch_count(count, outdated.len());
        return outdated.into_iter().take(n).collect();
    }
    outdated
}

/// Which instances each batch of the rollout to the update revision would move, assuming
/// each passes: the dry run behind `kubectl gantry plan`. Batches already done are empty.
pub fn preview(input: &Input) -> Vec<Vec<Ordinal>> {
    let spec = input.spec;
    let planner = Planner {
        input,
        desired: desired_ordinals(spec.replicas, &spec.remove_instances),
        last_known: last_known_revisions(input.status),
        notes: Vec::new(),
        requeue: None,
    };
    let rollout = input
        .status
        .rollout
        .as_ref()
        .filter(|r| r.revision == input.update_revision);
    let first = rollout.map_or(0, |r| usize::try_from(r.batch).unwrap_or(0));
    let mut outdated = planner.outdated();
    (0..spec.update.batches.len().max(1))
        .map(|index| {
            if index < first {
                return Vec::new();
            }
            let started = rollout.filter(|r| index == first && r.batch_started_at.is_some());
            let chosen = match started {
                Some(r) => r.members.clone(),
                None => select(spec.update.batches.get(index), outdated.clone(), input.pods),
            };
            outdated.retain(|o| !chosen.contains(o));
            chosen
        })
        .collect()
}

/// Plans the next step.
pub fn plan(input: &Input) -> Plan {
    let spec = input.spec;
    let mut planner = Planner {
        input,
        desired: desired_ordinals(spec.replicas, &spec.remove_instances),
        last_known: last_known_revisions(input.status),
        notes: Vec::new(),
        requeue: None,
    };
    let mut rollout = planner.rollout();
    let mut current_revision = input.status.current_revision.clone();

    // A batch starts by recording its members and where they come from; nothing is touched
    // until that is written, so a restart cannot change who is in the batch.
    let total = usize::try_from(rollout.batches).unwrap_or(1);
    if rollout.phase == RolloutPhase::Progressing && rollout.batch_started_at.is_none() {
        let index = usize::try_from(rollout.batch).unwrap_or(0);
        if index >= total {
            rollout.phase = RolloutPhase::Completed;
        } else {
            let members = planner.resolve_batch(spec.update.batches.get(index));
            for ordinal in &members {
                let origin = planner.running_revision(*ordinal).to_string();
                let mut set = rollout
                    .origins
                    .get(&origin)
                    .map(|r| parse_ranges(r))
                    .unwrap_or_default();
                set.insert(*ordinal);
                rollout.origins.insert(origin, format_ranges(&set));
            }
            let names: Vec<String> = members.iter().map(ToString::to_string).collect();
            planner.note(
                NoteReason::BatchStarted,
                format!(
                    "batch {}/{total} of {}: instances [{}]",
                    index + 1,
                    rollout.revision,
                    names.join(", ")
                ),
            );
            rollout.members = members;
            rollout.batch_started_at = Some(time(input.now));
            rollout.healthy_since = None;
            rollout.failed.clear();
            rollout.message = "batch starting".into();
            rollout.batch_progress = format!("{}/{total}", index + 1);
            return Plan {
                actions: Vec::new(),
                rollout,
                current_revision,
                notes: planner.notes,
                requeue_after: Some(1),
                failed: BTreeSet::new(),
                held_back: 0,
            };
        }
    }

    // Health of the current batch's members.
    let health = &spec.update.health;
    let mut failed: BTreeSet<Ordinal> = rollout.failed.iter().copied().collect();
    let in_batch = matches!(
        rollout.phase,
        RolloutPhase::Progressing | RolloutPhase::Baking
    );
    let mut all_healthy = true;
    let mut waiting_for_metric = false;
    if in_batch {
        for &m in &rollout.members {
            if failed.contains(&m) {
                continue;
            }
            let pod = input.pods.get(&m);
            let on_target =
                pod.is_some_and(|p| p.revision.as_deref() == Some(rollout.revision.as_str()));
            let check_failure = input.check_failures.get(&m);
            let healthy = on_target
                && check_failure.is_none()
                && pod.is_some_and(|p| {
                    p.in_place_done()
                        && p.available()
                        && p.restarts_since_update() <= health.max_restarts
                });
            all_healthy &= healthy;
            if let Some(p) = pod.filter(|_| on_target && !healthy) {
                let started = p
                    .record
                    .as_ref()
                    .filter(|r| r.revision == rollout.revision)
                    .map_or(p.created_at, |r| r.patched_at);
                let deadline = started + Seconds::from(health.progress_deadline_seconds);
                let too_slow = (!(p.in_place_done() && p.containers_ready())
                    || check_failure.is_some())
                    && input.now >= deadline;
                let crashing = p.restarts_since_update() > health.max_restarts;
                if too_slow || crashing || p.terminal {
                    failed.insert(m);
                    let why = if crashing {
                        "restarted too often".to_string()
                    } else if p.terminal {
                        "terminated".to_string()
                    } else if let Some(check) = check_failure {
                        format!("failed its HTTP check until the progress deadline ({check})")
                    } else {
                        "not Ready within the progress deadline".to_string()
                    };
                    planner.note(
                        NoteReason::InstanceFailed,
                        format!("instance {m} on {} {why}", rollout.revision),
                    );
                } else if !too_slow {
                    planner.requeue_in(deadline - input.now);
                }
            }
        }
        // The batch's metric, once every member is healthy: above the threshold fails the
        // batch; no answer holds it.
        let mut metric_failure = None;
        if all_healthy && health.prometheus.is_some() {
            match input.metric {
                MetricVerdict::Failed(why) => metric_failure = Some(why.clone()),
                MetricVerdict::Unknown(why) => {
                    all_healthy = false;
                    waiting_for_metric = true;
                    rollout.message = format!("waiting for the batch's Prometheus check: {why}");
                    planner.requeue_in(10);
                }
                MetricVerdict::NotChecked => {
                    all_healthy = false;
                    planner.requeue_in(1);
                }
                MetricVerdict::Passed(_) => {}
            }
        }
        let budget = usize::try_from(health.max_failed_instances).unwrap_or(0);
        if let Some(why) = metric_failure {
            all_healthy = false;
            rollout.message = format!(
                "batch {} failed its Prometheus check: {why}",
                rollout.batch + 1
            );
            planner.note(NoteReason::BatchFailed, rollout.message.clone());
            rollout.phase = match health.on_failure {
                FailurePolicy::Rollback => RolloutPhase::RollingBack,
                FailurePolicy::Pause => RolloutPhase::Failed,
            };
        } else if failed.len() > budget {
            all_healthy = false;
            let list = failed
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            match health.on_failure {
                FailurePolicy::Rollback => {
                    rollout.phase = RolloutPhase::RollingBack;
                    rollout.message = format!(
                        "batch {} failed (instances {list}); rolling back",
                        rollout.batch + 1
                    );
                    planner.note(NoteReason::BatchFailed, rollout.message.clone());
                }
                FailurePolicy::Pause => {
                    rollout.phase = RolloutPhase::Failed;
                    rollout.message = format!(
                        "batch {} failed (instances {list}); paused for a person to decide",
                        rollout.batch + 1
                    );
                    planner.note(NoteReason::BatchFailed, rollout.message.clone());
                }
            }
        }
    }

    // Instance by instance: batch members first, in the order the batch gives, then the rest.
    let max_unavailable = max_unavailable(&spec.update.max_unavailable, planner.desired.len());
    let mut unavailable = planner
        .desired
        .iter()
        .filter(|o| !input.pods.get(o).is_some_and(|p| p.available()))
        .count();
    let sets = Sets::new(&planner.desired, &rollout);
    let mut actions = Vec::new();
    let mut held_back = 0;
    for (ordinal, pod) in input.pods {
        if !sets.desired.contains(ordinal) && !pod.deleting {
            actions.push(Action::Delete {
                ordinal: *ordinal,
                uid: pod.uid.clone(),
                reason: DeleteReason::ScaleDown,
            });
        }
    }
    let mut order: Vec<Ordinal> = rollout
        .members
        .iter()
        .copied()
        .filter(|o| sets.desired.contains(o))
        .collect();
    order.extend(
        planner
            .desired
            .iter()
            .copied()
            .filter(|o| !sets.members.contains(o)),
    );
    let mut compatible: BTreeMap<(&str, &str), bool> = BTreeMap::new();
    for ordinal in order {
        let target = planner.target(&rollout, &sets, &failed, ordinal);
        let Some(pod) = input.pods.get(&ordinal) else {
            actions.push(Action::Create {
                ordinal,
                revision: target,
            });
            continue;
        };
        if pod.deleting {
            continue;
        }
        if pod.terminal {
            actions.push(Action::Delete {
                ordinal,
                uid: pod.uid.clone(),
                reason: DeleteReason::Replace,
            });
            continue;
        }
        if pod.revision.as_deref() == Some(target.as_str()) {
            if pod.in_place_done() && pod.containers_ready() && pod.in_service != Some(true) {
                actions.push(Action::PutInService {
                    ordinal,
                    uid: pod.uid.clone(),
                });
            }
            continue;
        }
        let Some((to_name, to)) = input.revisions.get_key_value(&target) else {
            planner.note(
                NoteReason::RevisionMissing,
                format!("instance {ordinal} should run {target}, whose template is gone"),
            );
            continue;
        };
        let from = pod
            .revision
            .as_ref()
            .and_then(|r| input.revisions.get_key_value(r));
        // Comparing two templates is costly and the same few pairs recur for every instance.
        let in_place = spec.update.method == UpdateMethod::InPlaceIfPossible
            && from.is_some_and(|(from_name, from)| {
                *compatible
                    .entry((from_name.as_str(), to_name.as_str()))
                    .or_insert_with(|| in_place_compatible(&from.template, &to.template))
            });
        let out_of_service = pod.in_service == Some(false);
        if !out_of_service {
            if spec.update.paused {
                held_back += 1;
                continue;
            }
            let adds_unavailability = pod.available();
            if adds_unavailability && unavailable + 1 > max_unavailable {
                held_back += 1;
                continue;
            }
            if adds_unavailability {
                unavailable += 1;
            }
            actions.push(if in_place {
                Action::TakeOutOfService {
                    ordinal,
                    uid: pod.uid.clone(),
                }
            } else {
                Action::Delete {
                    ordinal,
                    uid: pod.uid.clone(),
                    reason: DeleteReason::Recreate,
                }
            });
            continue;
        }
        if !in_place {
            actions.push(Action::Delete {
                ordinal,
                uid: pod.uid.clone(),
                reason: DeleteReason::Recreate,
            });
            continue;
        }
        let grace_ends = pod.in_service_since.unwrap_or(input.now)
            + Seconds::from(spec.update.grace_period_seconds);
        if input.now < grace_ends {
            planner.requeue_in(grace_ends - input.now);
            continue;
        }
        let images: BTreeMap<String, String> = to
            .images()
            .into_iter()
            .filter(|(name, image)| {
                pod.containers
                    .iter()
                    .any(|c| &c.name == name && &c.image != image)
            })
            .collect();
        let record = InPlaceRecord {
            revision: target.clone(),
            previous_revision: pod.revision.clone().unwrap_or_default(),
            patched_at: input.now,
            // Only containers that run another image must restart: one patched back to the
            // image it still runs is left alone by the kubelet, and waiting for it would hang.
            containers: pod
                .containers
                .iter()
                .filter(|c| {
                    let wanted = to.images().get(&c.name).map(|i| normalize_image(i));
                    wanted.is_some() && c.running_image.as_deref().map(normalize_image) != wanted
                })
                .map(|c| {
                    (
                        c.name.clone(),
                        ContainerBaseline {
                            container_id: c.container_id.clone(),
                            restart_count: c.restart_count,
                        },
                    )
                })
                .collect(),
        };
        actions.push(Action::PatchInPlace {
            ordinal,
            uid: pod.uid.clone(),
            revision: target,
            images,
            record,
        });
    }

    // Batch progress.
    rollout.failed = failed.iter().copied().collect();
    let batch_busy = actions.iter().any(|a| sets.members.contains(&a.ordinal()));
    if in_batch
        && matches!(
            rollout.phase,
            RolloutPhase::Progressing | RolloutPhase::Baking
        )
    {
        if all_healthy && !batch_busy {
            let since = seconds(rollout.healthy_since.get_or_insert_with(|| time(input.now)));
            let bake_ends = since + Seconds::from(health.bake_seconds);
            if input.now < bake_ends {
                rollout.phase = RolloutPhase::Baking;
                rollout.message = format!(
                    "baking: healthy for {} of {} s",
                    input.now - since,
                    health.bake_seconds
                );
                planner.requeue_in(bake_ends - input.now);
            } else {
                advance(&mut planner, &mut rollout, &mut current_revision, input);
            }
        } else {
            rollout.healthy_since = None;
            rollout.phase = RolloutPhase::Progressing;
            let pending = rollout
                .members
                .iter()
                .filter(|m| !failed.contains(m))
                .count();
            if !waiting_for_metric {
                rollout.message = format!(
                    "updating batch {}: {pending} instance(s) in flight or waiting",
                    rollout.batch + 1
                );
            }
        }
    } else if rollout.phase == RolloutPhase::AwaitingApproval {
        advance(&mut planner, &mut rollout, &mut current_revision, input);
    } else if rollout.phase == RolloutPhase::RollingBack {
        let moved: BTreeSet<Ordinal> = rollout
            .origins
            .values()
            .flat_map(|r| parse_ranges(r))
            .collect();
        // Back means on the previous revision with the restart done; whether it is Ready then is
        // the instance's health, reported by the app's conditions, not the rollout's.
        let still_away = moved
            .iter()
            .filter(|o| {
                input.pods.get(o).is_none_or(|p| {
                    p.revision.as_deref() == Some(rollout.revision.as_str()) || !p.in_place_done()
                })
            })
            .count();
        if still_away == 0 && actions.is_empty() {
            rollout.phase = if rollout.aborted {
                RolloutPhase::Aborted
            } else {
                RolloutPhase::Failed
            };
            let msg = format!(
                "every instance rollout {} moved is back on its previous revision",
                rollout.revision
            );
            planner.note(NoteReason::RolledBack, msg.clone());
            rollout.message = msg;
        } else {
            rollout.message = format!("rolling back: {still_away} instance(s) still to return");
        }
    }
    rollout.batch_progress = format!(
        "{}/{}",
        (rollout.batch + 1).min(rollout.batches),
        rollout.batches
    );
    if !actions.is_empty()
        || matches!(
            rollout.phase,
            RolloutPhase::Progressing | RolloutPhase::RollingBack
        )
    {
        planner.requeue_in(30);
    }
    Plan {
        actions,
        rollout,
        current_revision,
        notes: planner.notes,
        requeue_after: planner.requeue,
        failed,
        held_back,
    }
}

/// The batch passed its health gate: finish, wait for approval, or start the next one.
fn advance(
    planner: &mut Planner,
    rollout: &mut RolloutStatus,
    current_revision: &mut Option<String>,
    input: &Input,
) {
    let last = rollout.batch + 1 >= rollout.batches;
    if last {
        rollout.phase = RolloutPhase::Completed;
        rollout.message = format!("all {} batch(es) passed", rollout.batches);
        *current_revision = Some(rollout.revision.clone());
        planner.note(
            NoteReason::RolloutCompleted,
            format!("rollout of {} completed", rollout.revision),
        );
        return;
    }
    let approval = format!("{}/{}", rollout.revision, rollout.batch);
    let empty_batch = rollout.members.is_empty();
    let approved = input.spec.update.promotion == Promotion::Auto
        || input.approve == Some(approval.as_str())
        || empty_batch;
    if !approved {
        if rollout.phase != RolloutPhase::AwaitingApproval {
            planner.note(
                NoteReason::AwaitingApproval,
                format!(
                    "batch {}/{} passed; approve the next with `kubectl gantry approve`",
                    rollout.batch + 1,
                    rollout.batches
                ),
            );
        }
        rollout.phase = RolloutPhase::AwaitingApproval;
        rollout.message = format!(
            "batch {} passed; waiting for approval of batch {}",
            rollout.batch + 1,
            rollout.batch + 2
        );
        return;
    }
    planner.note(
        NoteReason::BatchPromoted,
        format!(
            "batch {}/{} passed; starting batch {}",
            rollout.batch + 1,
            rollout.batches,
            rollout.batch + 2
        ),
    );
    rollout.batch += 1;
    rollout.phase = RolloutPhase::Progressing;
    rollout.members.clear();
    rollout.failed.clear();
    rollout.batch_started_at = None;
    rollout.healthy_since = None;
    rollout.message = "next batch starting".into();
    planner.requeue_in(1);
}
