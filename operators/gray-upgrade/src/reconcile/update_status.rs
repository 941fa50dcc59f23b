//! Stage four: the status, built from what was observed and planned, and written before any
//! action is taken, so that what a batch is and where its members come from is on record
//! before any of them moves.
//!
//! Writes are coalesced: a change to the rollout's course, a condition's status or the
//! observed generation is written at once; counts, the instance table and messages at most
//! once per [`COALESCE`], the rest waiting for the next write (a requeue makes sure there is
//! one).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gantry_kit::apply::apply_status;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Api, Resource, ResourceExt};

use super::dereference::World;
use super::{Context, Error, write_failure};
use crate::api::{GrayApp, GrayAppStatus};
use crate::model::{Verb, WriteFailure, Written};
use crate::plan::Plan;
use crate::reasons::AppProblem;
use crate::revision::{Revision, Wanted};
use crate::status::{self, ConditionReason, StatusInput};

/// The longest a status change that alters nothing of the rollout's course waits to be
/// written.
pub const COALESCE: Duration = Duration::from_secs(2);

/// What became of a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrite {
    Unchanged,
    Written,
    /// Written later: plan again within this long.
    Deferred(Duration),
}

/// Writes one app's status.
pub struct StatusWriter<'a> {
    pub ctx: &'a Context,
    pub api: Api<GrayApp>,
    pub name: &'a str,
    pub key: &'a str,
}

impl StatusWriter<'_> {
    /// Writes `status` if it says something new, at once if it changes the rollout's course.
    pub async fn write(
        &self,
        previous: &GrayAppStatus,
        status: &GrayAppStatus,
    ) -> Result<StatusWrite, Error> {
        if status == previous {
            return Ok(StatusWrite::Unchanged);
        }
        let now = Instant::now();
        if !changes_course(previous, status)
            && let Some(last) = self.ctx.memory.last_status_write(self.key)
            && now < last + COALESCE
        {
            return Ok(StatusWrite::Deferred(last + COALESCE - now));
        }
        apply_status(
            &self.api,
            self.name,
            self.ctx.runtime.field_manager(),
            status,
        )
        .await
        .map_err(|err| Error::Writes {
            failed: 1,
            first: write_failure(Verb::Patch, Written::GrayAppStatus, self.name, &err),
        })?;
        self.ctx.memory.status_written(self.key, now);
        Ok(StatusWrite::Written)
    }
}

/// Whether the difference matters to what happens next or to what kstatus readers decide:
/// everything but counts, the instance table, the revision spread and messages.
fn changes_course(previous: &GrayAppStatus, status: &GrayAppStatus) -> bool {
    course(previous) != course(status)
}

fn course(status: &GrayAppStatus) -> GrayAppStatus {
    let mut course = status.clone();
    course.replicas = 0;
    course.ready_replicas = 0;
    course.updated_replicas = 0;
    course.revisions.clear();
    course.instances.clear();
    if let Some(rollout) = course.rollout.as_mut() {
        rollout.message.clear();
    }
    for condition in &mut course.conditions {
        condition.message.clear();
        condition.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    }
    course
}

/// Everything the status is built from, in this reconcile.
pub struct Built<'a> {
    pub app: &'a GrayApp,
    pub previous: &'a GrayAppStatus,
    pub world: &'a World,
    pub wanted: &'a Wanted,
    pub plan: &'a Plan,
    pub write_failure: Option<&'a WriteFailure>,
    pub now: &'a Time,
}

/// Status from what is observed now plus the plan (the actions' effects show up on a later
/// reconcile, which their watch events trigger).
pub fn build(from: &Built) -> GrayAppStatus {
    let name = from.app.name_any();
    status::build(&StatusInput {
        app: &name,
        generation: from.app.metadata.generation,
        spec: &from.app.spec,
        previous: from.previous,
        pods: &from.world.pods,
        revisions: &from.world.revisions,
        variant_names: &from.wanted.variant_names,
        update_revision: &from.wanted.update.name,
        plan: Some(from.plan),
        invalid: None,
        write_failure: from.write_failure,
        now: from.now,
    })
}

/// An invalid spec: Stalled with why, one Warning per episode, and the instance view kept as
/// it was (an invalid spec changes nothing that runs).
pub async fn report_invalid(
    app: &GrayApp,
    writer: &StatusWriter<'_>,
    previous: &GrayAppStatus,
    why: &str,
    now: &Time,
) -> Result<(), Error> {
    let name = app.name_any();
    let update_revision = Revision::new(&name, app.spec.template.clone())
        .map(|r| r.name)
        .unwrap_or_default();
    let status = status::build(&StatusInput {
        app: &name,
        generation: app.metadata.generation,
        spec: &app.spec,
        previous,
        pods: &BTreeMap::new(),
        revisions: &BTreeMap::new(),
        variant_names: &BTreeMap::new(),
        update_revision: &update_revision,
        plan: None,
        invalid: Some(why),
        write_failure: None,
        now,
    });
    let status = GrayAppStatus {
        replicas: previous.replicas,
        ready_replicas: previous.ready_replicas,
        updated_replicas: previous.updated_replicas,
        revisions: previous.revisions.clone(),
        instances: previous.instances.clone(),
        images: previous.images.clone(),
        update_revision: previous.update_revision.clone(),
        ..status
    };
    let reported = previous
        .conditions
        .iter()
        .any(|c| c.reason == ConditionReason::InvalidSpec.as_str());
    if !reported {
        writer
            .ctx
            .runtime
            .events()
            .publish(
                &app.object_ref(&()),
                AppProblem::InvalidSpec,
                why.to_string(),
            )
            .await;
    }
    writer.write(previous, &status).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{RolloutPhase, RolloutStatus};

    fn rollout(phase: RolloutPhase, message: &str) -> Option<RolloutStatus> {
        Some(RolloutStatus {
            phase,
            members: vec![0],
            message: message.into(),
            ..RolloutStatus::new("ocr-a", 1)
        })
    }

    #[test]
    fn counts_and_messages_wait_but_the_rollout_course_does_not() {
        let before = GrayAppStatus {
            ready_replicas: 10,
            rollout: rollout(RolloutPhase::Progressing, "3 in flight"),
            ..GrayAppStatus::default()
        };
        let progress = GrayAppStatus {
            ready_replicas: 12,
            rollout: rollout(RolloutPhase::Progressing, "1 in flight"),
            ..before.clone()
        };
        assert!(!changes_course(&before, &progress));
        let baking = GrayAppStatus {
            rollout: rollout(RolloutPhase::Baking, "baking"),
            ..progress.clone()
        };
        assert!(changes_course(&progress, &baking));
        let next_generation = GrayAppStatus {
            observed_generation: Some(2),
            ..progress.clone()
        };
        assert!(changes_course(&progress, &next_generation));
    }
}
