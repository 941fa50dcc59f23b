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
//! A plan is made in named stages, each in its own module: the rollout to work on and the start
//! of a batch ([`start`]), the batch's health ([`health`]), each instance's action
//! ([`instances`]), and the rollout's next phase ([`phase`]).
//!
//! Crash safety: a batch's members and where they come from are written to status before any
//! of them is touched, and each in-place update is recorded on its pod in the same write that
//! patches it; so a restarted operator resumes exactly where it stopped, never upgrading an
//! instance twice or losing one.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::api::{Batch, GrayAppSpec, GrayAppStatus, RolloutPhase, RolloutStatus};
use crate::model::{InPlaceRecord, Instances, MetricVerdict, Ordinal, Seconds, parse_ranges};
use crate::revision::Revision;

mod health;
mod instances;
mod phase;
mod start;

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
    /// Writes to the API server failed lately (a permission missing, say): take no instance out
    /// of service, and return to service those that were waiting for a write.
    pub hold_writes: bool,
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
        /// The target template's pod labels and annotations: set, or (`None`) removed where
        /// the template the pod came from had them and the target does not.
        metadata: MetadataChange,
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

/// Pod labels and annotations an in-place update sets (`Some`) or removes (`None`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataChange {
    pub labels: BTreeMap<String, Option<String>>,
    pub annotations: BTreeMap<String, Option<String>>,
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
    RecordUnreadable,
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
            NoteReason::RecordUnreadable => "InPlaceRecordUnreadable",
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
                | NoteReason::RecordUnreadable
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
    /// Instances kept out of service because their in-place record cannot be read.
    pub unreadable: BTreeSet<Ordinal>,
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

/// Whether the rollout is working through a batch that has not failed as a whole.
fn batch_goes_on(phase: RolloutPhase) -> bool {
    matches!(
        phase,
        RolloutPhase::Progressing | RolloutPhase::Baking | RolloutPhase::AwaitingApproval
    )
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

/// Lookups into the rollout made for every instance, built once per stage that needs them.
struct Sets<'r> {
    members: BTreeSet<Ordinal>,
    /// Where each instance this rollout moved came from.
    origins: BTreeMap<Ordinal, &'r str>,
}

impl<'r> Sets<'r> {
    fn new(rollout: &'r RolloutStatus) -> Self {
        Self {
            members: rollout.members.iter().copied().collect(),
            origins: rollout
                .origins
                .iter()
                .flat_map(|(revision, ranges)| {
                    parse_ranges(ranges)
                        .into_iter()
                        .map(move |o| (o, revision.as_str()))
                })
                .collect(),
        }
    }
}

struct Planner<'a> {
    input: &'a Input<'a>,
    /// The ordinals the app should have, ascending.
    desired: Vec<Ordinal>,
    /// The same ordinals, for lookups.
    wanted: BTreeSet<Ordinal>,
    last_known: BTreeMap<Ordinal, &'a str>,
    notes: Vec<Note>,
    requeue: Option<Seconds>,
}

impl<'a> Planner<'a> {
    fn new(input: &'a Input<'a>) -> Self {
        let spec = input.spec;
        let desired = desired_ordinals(spec.replicas, &spec.remove_instances);
        Self {
            input,
            wanted: desired.iter().copied().collect(),
            desired,
            last_known: last_known_revisions(input.status),
            notes: Vec::new(),
            requeue: None,
        }
    }

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

    /// Whether the spec still asks for a revision: its template's, a variant's, or the
    /// revision of the last rollout that completed (where a failed rollout returns to).
    fn still_wanted(&self, revision: &str) -> bool {
        let input = self.input;
        revision == input.update_revision
            || input.status.current_revision.as_deref() == Some(revision)
            || input.variant_revisions.values().any(|r| r == revision)
    }

    /// Where an instance goes back to when a move is undone: where it came from if this
    /// rollout moved it, else where it is; but never to a revision the spec no longer asks for
    /// (a template reverted or replaced while instances were on their way): those go to the
    /// last completed rollout's revision instead.
    fn return_target(&self, rollout: &RolloutStatus, sets: &Sets, ordinal: Ordinal) -> String {
        let running = self.running_revision(ordinal);
        let back_to = match sets.origins.get(&ordinal) {
            Some(origin) if running == rollout.revision => origin,
            _ => running,
        };
        if self.still_wanted(back_to) {
            return back_to.to_string();
        }
        let input = self.input;
        input
            .status
            .current_revision
            .as_deref()
            .filter(|stable| input.revisions.contains_key(*stable))
            .unwrap_or(back_to)
            .to_string()
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
        // A failed instance within the failure budget goes back alone while its batch goes on;
        // once the batch as a whole failed, only a rollback moves anyone.
        let goes_on = batch_goes_on(rollout.phase);
        if rollout.phase == RolloutPhase::RollingBack || (goes_on && failed.contains(&ordinal)) {
            return self.return_target(rollout, sets, ordinal);
        }
        if goes_on && rollout.batch_started_at.is_some() && sets.members.contains(&ordinal) {
            return rollout.revision.clone();
        }
        self.running_revision(ordinal).to_string()
    }

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

    fn finish(
        self,
        rollout: RolloutStatus,
        current_revision: Option<String>,
        acted: Acted,
    ) -> Plan {
        Plan {
            actions: acted.actions,
            rollout,
            current_revision,
            notes: self.notes,
            requeue_after: self.requeue,
            failed: acted.failed,
            held_back: acted.held_back,
            unreadable: acted.unreadable,
        }
    }
}

/// What the instance stage decided, with the health it was decided on.
#[derive(Default)]
struct Acted {
    actions: Vec<Action>,
    failed: BTreeSet<Ordinal>,
    held_back: usize,
    unreadable: BTreeSet<Ordinal>,
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
/// each passes: the dry run behind `kubectl gantry plan`. The current batch (done or not) has
/// the members status recorded for it; batches before it are empty (status keeps no members for
/// them). Members of the current batch that failed their health gate go back to where they
/// came from, so later batches may take them again.
pub fn preview(input: &Input) -> Vec<Vec<Ordinal>> {
    let spec = input.spec;
    let planner = Planner::new(input);
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
            let returning = started.map_or(&[][..], |r| r.failed.as_slice());
            outdated.retain(|o| !chosen.contains(o) || returning.contains(o));
            chosen
        })
        .collect()
}

/// Plans the next step, stage by stage. A batch that passes hands over to the next within the
/// same plan: nothing waits for another reconcile to start it.
pub fn plan(input: &Input) -> Plan {
    let mut planner = Planner::new(input);
    let mut rollout = planner.rollout();
    let mut current_revision = input.status.current_revision.clone();
    loop {
        let batch = rollout.batch;
        planner.start_batch(&mut rollout);
        let health = planner.judge_health(&mut rollout);
        let acted = planner.instance_actions(&rollout, health.failed.clone());
        current_revision = planner.advance_phase(&mut rollout, current_revision, &health, &acted);
        let next_batch_due = rollout.batch != batch && rollout.batch_started_at.is_none();
        if !next_batch_due {
            return planner.finish(rollout, current_revision, acted);
        }
    }
}
