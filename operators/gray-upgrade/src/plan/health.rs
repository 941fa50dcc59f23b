//! Stage two: the health of the current batch's members, and of the batch as a whole.

use std::collections::BTreeSet;

use super::{NoteReason, Planner};
use crate::api::{FailurePolicy, RolloutPhase, RolloutStatus};
use crate::model::{MetricVerdict, Ordinal, PodView, Seconds};

/// The current batch's health as judged this time.
pub(super) struct BatchHealth {
    /// Members that failed their health gate, this time or before.
    pub failed: BTreeSet<Ordinal>,
    /// Every member still wanted is healthy and the batch's metric passed.
    pub all_healthy: bool,
    /// The batch waits for its Prometheus query to give an answer.
    pub waiting_for_metric: bool,
}

/// Why a member failed its health gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemberFailure {
    RestartedTooOften,
    Terminated,
    CheckFailedUntilDeadline,
    NotReadyByDeadline,
}

impl MemberFailure {
    fn phrase(self, check: Option<&String>) -> String {
        match (self, check) {
            (MemberFailure::RestartedTooOften, _) => "restarted too often".into(),
            (MemberFailure::Terminated, _) => "terminated".into(),
            (MemberFailure::CheckFailedUntilDeadline, Some(why)) => {
                format!("failed its HTTP check until the progress deadline ({why})")
            }
            (MemberFailure::CheckFailedUntilDeadline | MemberFailure::NotReadyByDeadline, _) => {
                "not Ready within the progress deadline".into()
            }
        }
    }
}

impl Planner<'_> {
    /// Judges every member still wanted (an instance scaled away mid-batch has nothing left to
    /// prove) and the batch's metric; a batch beyond its failure budget fails as a whole.
    pub(super) fn judge_health(&mut self, rollout: &mut RolloutStatus) -> BatchHealth {
        let mut health = BatchHealth {
            failed: rollout.failed.iter().copied().collect(),
            all_healthy: true,
            waiting_for_metric: false,
        };
        if !matches!(
            rollout.phase,
            RolloutPhase::Progressing | RolloutPhase::Baking
        ) {
            return health;
        }
        let wanted_members: Vec<Ordinal> = rollout
            .members
            .iter()
            .copied()
            .filter(|m| self.wanted.contains(m))
            .collect();
        for member in wanted_members {
            if !health.failed.contains(&member) {
                self.judge_member(rollout, member, &mut health);
            }
        }
        self.judge_metric(rollout, &mut health);
        self.fail_batch_beyond_budget(rollout, &mut health);
        health
    }

    fn judge_member(&mut self, rollout: &RolloutStatus, member: Ordinal, health: &mut BatchHealth) {
        let input = self.input;
        let gate = &input.spec.update.health;
        let pod = input.pods.get(&member);
        let on_target =
            pod.is_some_and(|p| p.revision.as_deref() == Some(rollout.revision.as_str()));
        let check_failure = input.check_failures.get(&member);
        let healthy = on_target
            && check_failure.is_none()
            && pod.is_some_and(|p| {
                p.in_place_done() && p.available() && p.restarts_since_update() <= gate.max_restarts
            });
        health.all_healthy &= healthy;
        let Some(pod) = pod.filter(|_| on_target && !healthy) else {
            return;
        };
        let deadline =
            update_started(pod, &rollout.revision) + Seconds::from(gate.progress_deadline_seconds);
        let past_deadline = input.now >= deadline;
        let failure = member_failure(
            pod,
            check_failure.is_some(),
            gate.max_restarts,
            past_deadline,
        );
        match failure {
            Some(failure) => {
                health.failed.insert(member);
                self.note(
                    NoteReason::InstanceFailed,
                    format!(
                        "instance {member} on {} {}",
                        rollout.revision,
                        failure.phrase(check_failure)
                    ),
                );
            }
            None if input.now < deadline => self.requeue_in(deadline - input.now),
            None => {}
        }
    }

    /// The batch's metric, once every member is healthy: above the threshold fails the batch;
    /// no answer holds it.
    fn judge_metric(&mut self, rollout: &mut RolloutStatus, health: &mut BatchHealth) {
        let input = self.input;
        let gate = &input.spec.update.health;
        if !health.all_healthy || gate.prometheus.is_none() {
            return;
        }
        match input.metric {
            MetricVerdict::Failed(why) => {
                health.all_healthy = false;
                rollout.message = format!(
                    "batch {} failed its Prometheus check: {why}",
                    rollout.batch + 1
                );
                self.note(NoteReason::BatchFailed, rollout.message.clone());
                rollout.phase = match gate.on_failure {
                    FailurePolicy::Rollback => RolloutPhase::RollingBack,
                    FailurePolicy::Pause => RolloutPhase::Failed,
                };
            }
            MetricVerdict::Unknown(why) => {
                health.all_healthy = false;
                health.waiting_for_metric = true;
                rollout.message = format!("waiting for the batch's Prometheus check: {why}");
                self.requeue_in(10);
            }
            MetricVerdict::NotChecked => {
                health.all_healthy = false;
                self.requeue_in(1);
            }
            MetricVerdict::Passed(_) => {}
        }
    }

    fn fail_batch_beyond_budget(&mut self, rollout: &mut RolloutStatus, health: &mut BatchHealth) {
        let gate = &self.input.spec.update.health;
        let budget = usize::try_from(gate.max_failed_instances).unwrap_or(0);
        if health.failed.len() <= budget || !health_phase(rollout.phase) {
            return;
        }
        health.all_healthy = false;
        let list = health
            .failed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let (phase, then) = match gate.on_failure {
            FailurePolicy::Rollback => (RolloutPhase::RollingBack, "rolling back"),
            FailurePolicy::Pause => (RolloutPhase::Failed, "paused for a person to decide"),
        };
        rollout.phase = phase;
        rollout.message = format!(
            "batch {} failed (instances {list}); {then}",
            rollout.batch + 1
        );
        self.note(NoteReason::BatchFailed, rollout.message.clone());
    }
}

fn health_phase(phase: RolloutPhase) -> bool {
    matches!(phase, RolloutPhase::Progressing | RolloutPhase::Baking)
}

/// When the member's move to `revision` began: its in-place patch, or its pod's creation.
fn update_started(pod: &PodView, revision: &str) -> Seconds {
    pod.record
        .as_ref()
        .filter(|r| r.revision == revision)
        .map_or(pod.created_at, |r| r.patched_at)
}

fn member_failure(
    pod: &PodView,
    check_failed: bool,
    max_restarts: i32,
    past_deadline: bool,
) -> Option<MemberFailure> {
    if pod.restarts_since_update() > max_restarts {
        Some(MemberFailure::RestartedTooOften)
    } else if pod.terminal {
        Some(MemberFailure::Terminated)
    } else if past_deadline && check_failed {
        Some(MemberFailure::CheckFailedUntilDeadline)
    } else if past_deadline && !(pod.in_place_done() && pod.containers_ready()) {
        Some(MemberFailure::NotReadyByDeadline)
    } else {
        None
    }
}
