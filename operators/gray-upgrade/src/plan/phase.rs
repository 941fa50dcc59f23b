//! Stage four: where the rollout goes next (bake, promote, wait for approval, complete, or
//! finish rolling back).

use std::collections::BTreeSet;

use super::health::BatchHealth;
use super::start::next_batch;
use super::{Acted, NoteReason, Planner, Sets, seconds, time};
use crate::api::{Promotion, RolloutPhase, RolloutStatus};
use crate::model::{Ordinal, Seconds, format_ranges};

impl Planner<'_> {
    /// Moves the rollout on from what this plan saw and did; returns the revision the app
    /// counts as rolled out.
    pub(super) fn advance_phase(
        &mut self,
        rollout: &mut RolloutStatus,
        mut current_revision: Option<String>,
        health: &BatchHealth,
        acted: &Acted,
    ) -> Option<String> {
        rollout.failed = health.failed.iter().copied().collect();
        match rollout.phase {
            RolloutPhase::Progressing | RolloutPhase::Baking => {
                self.progress_batch(rollout, &mut current_revision, health, acted);
            }
            RolloutPhase::AwaitingApproval => self.advance(rollout, &mut current_revision),
            RolloutPhase::RollingBack => self.finish_rollback(rollout, acted),
            RolloutPhase::Completed | RolloutPhase::Failed | RolloutPhase::Aborted => {}
        }
        rollout.batch_progress = format!(
            "{}/{}",
            (rollout.batch + 1).min(rollout.batches),
            rollout.batches
        );
        if !acted.actions.is_empty()
            || matches!(
                rollout.phase,
                RolloutPhase::Progressing | RolloutPhase::RollingBack
            )
        {
            self.requeue_in(30);
        }
        current_revision
    }

    /// A batch whose members are all healthy and idle bakes, then passes.
    fn progress_batch(
        &mut self,
        rollout: &mut RolloutStatus,
        current_revision: &mut Option<String>,
        health: &BatchHealth,
        acted: &Acted,
    ) {
        let members: BTreeSet<Ordinal> = rollout.members.iter().copied().collect();
        let busy = acted.actions.iter().any(|a| members.contains(&a.ordinal()));
        if health.all_healthy && !busy {
            let now = self.input.now;
            let bake = self.input.spec.update.health.bake_seconds;
            let since = seconds(rollout.healthy_since.get_or_insert_with(|| time(now)));
            let bake_ends = since + Seconds::from(bake);
            if now < bake_ends {
                rollout.phase = RolloutPhase::Baking;
                rollout.message = format!("baking: healthy for {} of {bake} s", now - since);
                self.requeue_in(bake_ends - now);
            } else {
                self.advance(rollout, current_revision);
            }
            return;
        }
        rollout.healthy_since = None;
        rollout.phase = RolloutPhase::Progressing;
        let pending = members
            .iter()
            .filter(|m| self.wanted.contains(m) && !health.failed.contains(m))
            .count();
        if !health.waiting_for_metric {
            rollout.message = format!(
                "updating batch {}: {pending} instance(s) in flight or waiting",
                rollout.batch + 1
            );
        }
    }

    /// Back means on the revision it returns to with the restart done; whether it is Ready
    /// then is the instance's health, reported by the app's conditions, not the rollout's.
    fn finish_rollback(&mut self, rollout: &mut RolloutStatus, acted: &Acted) {
        let input = self.input;
        let sets = Sets::new(rollout);
        let still_away = self
            .desired
            .iter()
            .filter(|o| !input.variant_revisions.contains_key(o))
            .filter(|o| {
                let back_to = self.return_target(rollout, &sets, **o);
                input.pods.get(o).is_none_or(|p| {
                    p.revision.as_deref() != Some(back_to.as_str()) || !p.in_place_done()
                })
            })
            .count();
        if still_away > 0 || !acted.actions.is_empty() {
            rollout.message = format!("rolling back: {still_away} instance(s) still to return");
            return;
        }
        rollout.phase = if rollout.aborted {
            RolloutPhase::Aborted
        } else {
            RolloutPhase::Failed
        };
        let message = format!(
            "every instance rollout {} moved is back on its previous revision",
            rollout.revision
        );
        self.note(NoteReason::RolledBack, message.clone());
        rollout.message = message;
    }

    /// What a person wants to know of a batch that passed: its instances, how long it took, and
    /// how long each instance was away (from its update's start to back in service).
    fn batch_report(&self, rollout: &RolloutStatus) -> String {
        let input = self.input;
        let members: BTreeSet<Ordinal> = rollout.members.iter().copied().collect();
        let mut away: Vec<Seconds> = members
            .iter()
            .filter_map(|o| input.pods.get(o))
            .filter_map(|p| {
                let started = p
                    .record
                    .as_ref()
                    .filter(|r| r.revision == rollout.revision)
                    .map_or(p.created_at, |r| r.patched_at);
                Some((p.in_service_since? - started).max(0))
            })
            .collect();
        away.sort_unstable();
        let took = rollout
            .batch_started_at
            .as_ref()
            .map(|t| format!(" in {} s", (input.now - seconds(t)).max(0)));
        let timing = match (away.get(away.len() / 2), away.last()) {
            (Some(median), Some(most)) => {
                format!("; each away from service {median} s at the median, {most} s at most")
            }
            _ => String::new(),
        };
        format!(
            "batch {}/{} of {} passed{}: {} instance(s) ({}){timing}",
            rollout.batch + 1,
            rollout.batches,
            rollout.revision,
            took.unwrap_or_default(),
            members.len(),
            format_ranges(&members),
        )
    }

    /// The batch passed its health gate: finish, wait for approval, or start the next one.
    fn advance(&mut self, rollout: &mut RolloutStatus, current_revision: &mut Option<String>) {
        let input = self.input;
        let moved_any = !rollout.origins.is_empty();
        if rollout.batch + 1 >= rollout.batches {
            rollout.phase = RolloutPhase::Completed;
            rollout.message = format!("all {} batch(es) passed", rollout.batches);
            *current_revision = Some(rollout.revision.clone());
            if moved_any {
                let report = self.batch_report(rollout);
                self.note(
                    NoteReason::RolloutCompleted,
                    format!("rollout of {} completed; {report}", rollout.revision),
                );
            }
            return;
        }
        let approval = format!("{}/{}", rollout.revision, rollout.batch);
        let approved = input.spec.update.promotion == Promotion::Auto
            || input.approve == Some(approval.as_str())
            || rollout.members.is_empty();
        if !approved {
            if rollout.phase != RolloutPhase::AwaitingApproval {
                self.note(
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
        if !rollout.members.is_empty() {
            let report = self.batch_report(rollout);
            self.note(
                NoteReason::BatchPromoted,
                format!("{report}; starting batch {}", rollout.batch + 2),
            );
        }
        next_batch(rollout);
        rollout.message = "next batch starting".into();
        self.requeue_in(1);
    }
}
