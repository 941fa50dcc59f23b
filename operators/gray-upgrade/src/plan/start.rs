//! Stage one: the rollout to work on, and the start of its next batch.

use super::{NoteReason, Planner, batch_goes_on, time};
use crate::api::{RolloutPhase, RolloutStatus};
use crate::model::{format_ranges, parse_ranges};

impl Planner<'_> {
    /// The rollout to work on: the one in status, or a new one when the template changed;
    /// batches appended to a completed rollout resume it, and an abort turns it back.
    pub(super) fn rollout(&mut self) -> RolloutStatus {
        let input = self.input;
        let total = i32::try_from(input.spec.update.batches.len().max(1)).unwrap_or(i32::MAX);
        let mut rollout = match &input.status.rollout {
            Some(r) if r.revision == input.update_revision => r.clone(),
            previous => {
                if let Some(previous) = previous {
                    self.note(
                        NoteReason::RolloutStarted,
                        format!(
                            "rolling out {} (was {}) in {total} batch(es)",
                            input.update_revision, previous.revision
                        ),
                    );
                }
                RolloutStatus::new(input.update_revision, total)
            }
        };
        // Batches appended after a completed rollout continue it: `kubectl gantry upgrade
        // --count 10` after a first batch, or a batch added in Git.
        if rollout.phase == RolloutPhase::Completed && rollout.batch + 1 < total {
            next_batch(&mut rollout);
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
        if batch_goes_on(rollout.phase) && input.abort == Some(input.update_revision) {
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

    /// Starts the next batch if one is due: records its members and where each comes from.
    /// The status saying so is written before any action of the same plan is carried out, so
    /// a restart cannot change who is in the batch. True when it did.
    pub(super) fn start_batch(&mut self, rollout: &mut RolloutStatus) -> bool {
        if rollout.phase != RolloutPhase::Progressing || rollout.batch_started_at.is_some() {
            return false;
        }
        let input = self.input;
        let total = usize::try_from(rollout.batches).unwrap_or(1);
        let index = usize::try_from(rollout.batch).unwrap_or(0);
        if index >= total {
            rollout.phase = RolloutPhase::Completed;
            return false;
        }
        let members = self.resolve_batch(input.spec.update.batches.get(index));
        for ordinal in &members {
            let origin = self.running_revision(*ordinal).to_string();
            let mut set = rollout
                .origins
                .get(&origin)
                .map(|r| parse_ranges(r))
                .unwrap_or_default();
            set.insert(*ordinal);
            rollout.origins.insert(origin, format_ranges(&set));
        }
        if !members.is_empty() {
            self.note(
                NoteReason::BatchStarted,
                format!(
                    "batch {}/{total} of {}: instances {}",
                    index + 1,
                    rollout.revision,
                    format_ranges(&members.iter().copied().collect())
                ),
            );
        }
        rollout.members = members;
        rollout.batch_started_at = Some(time(input.now));
        rollout.healthy_since = None;
        rollout.failed.clear();
        rollout.message = "batch starting".into();
        rollout.batch_progress = format!("{}/{total}", index + 1);
        true
    }
}

/// Moves the rollout on to its next batch, which starts on the next plan.
pub(super) fn next_batch(rollout: &mut RolloutStatus) {
    rollout.phase = RolloutPhase::Progressing;
    rollout.batch += 1;
    rollout.members.clear();
    rollout.failed.clear();
    rollout.batch_started_at = None;
    rollout.healthy_since = None;
}
