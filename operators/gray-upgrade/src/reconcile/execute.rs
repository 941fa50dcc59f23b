//! Stage five: the plan's actions, carried out. An instance's actions run in the order
//! planned (its gate is closed before its containers are patched); instances run side by side.
//! Every failure is kept, not only the first.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};

use super::dereference::World;
use super::{Context, write_failure};
use crate::api::GrayApp;
use crate::model::{Ordinal, Seconds, Verb, WriteFailure, Written, pod_name};
use crate::objects;
use crate::observe::LeanPod;
use crate::plan::{Action, DeleteReason};
use crate::reasons::{Step, UpgradeOutcome};

/// One instance's actions, as far as they went: each with its step or its failure.
type InstanceResults = Vec<(usize, Ordinal, Result<Option<Step>, WriteFailure>)>;

/// What carrying out a plan did.
#[derive(Debug, Default)]
pub struct Executed {
    pub steps: Vec<(Ordinal, Step)>,
    pub failures: Vec<(Ordinal, WriteFailure)>,
    /// The indices of the actions that were carried out.
    pub done: Vec<usize>,
}

/// Where the actions run, and what they need to know.
pub struct Executor<'a> {
    pub app: &'a GrayApp,
    pub ctx: &'a Context,
    pub namespace: &'a str,
    pub world: &'a World,
    pub now: Seconds,
    /// `now` as the API server's timestamps spell it.
    pub stamp: String,
}

/// How many instances are written to at once. Futures are made as slots free up: each is
/// several kilobytes, and scaling up plans thousands of creations at once.
const IN_FLIGHT: usize = 32;

impl Executor<'_> {
    pub async fn execute(&self, actions: &[Action]) -> Executed {
        let mut by_instance: BTreeMap<Ordinal, Vec<usize>> = BTreeMap::new();
        for (index, action) in actions.iter().enumerate() {
            by_instance.entry(action.ordinal()).or_default().push(index);
        }
        let groups: Vec<Vec<usize>> = by_instance.into_values().collect();
        // By index: a closure over `&Action` trips the compiler's higher-ranked lifetime check
        // for `Send`.
        let results: Vec<InstanceResults> = {
            let groups = &groups;
            futures::stream::iter(0..groups.len())
                .map(move |g| async move {
                    let mut done = Vec::new();
                    for &i in &groups[g] {
                        let action = &actions[i];
                        let result = self.act(action).await;
                        let failed = result.is_err();
                        done.push((i, action.ordinal(), result));
                        if failed {
                            break; // the instance's later steps depend on this one
                        }
                    }
                    done
                })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await
        };
        let mut executed = Executed::default();
        for (index, ordinal, result) in results.into_iter().flatten() {
            match result {
                Ok(step) => {
                    executed.done.push(index);
                    executed.steps.extend(step.map(|s| (ordinal, s)));
                }
                Err(failure) => executed.failures.push((ordinal, failure)),
            }
        }
        executed
    }

    fn pods(&self) -> Api<LeanPod> {
        // Writes read back the lean form: the response to every patch is a whole pod.
        Api::namespaced(self.ctx.runtime.client().clone(), self.namespace)
    }

    fn patch_params(&self) -> PatchParams {
        PatchParams {
            field_manager: Some(self.ctx.runtime.field_manager().to_string()),
            ..PatchParams::default()
        }
    }

    async fn act(&self, action: &Action) -> Result<Option<Step>, WriteFailure> {
        let pod = pod_name(&self.app.name_any(), action.ordinal());
        match action {
            Action::Create { ordinal, revision } => self.create(*ordinal, revision, &pod).await,
            Action::Delete { uid, reason, .. } => self.delete(uid, *reason, &pod).await,
            Action::TakeOutOfService { uid, .. } => {
                let gate = objects::gate_patch(
                    uid,
                    false,
                    "UpdateStarting",
                    "out of service for an update",
                    &self.stamp,
                );
                self.set_gate(&pod, gate).await?;
                Ok(Some(Step::OutOfService))
            }
            Action::PatchInPlace {
                uid,
                revision,
                images,
                metadata,
                record,
                ..
            } => {
                let patch = objects::in_place_patch(uid, revision, images, metadata, record)
                    .map_err(|err| unserialisable(Written::Pods, &pod, &err))?;
                self.pods()
                    .patch(&pod, &self.patch_params(), &Patch::Strategic(patch))
                    .await
                    .map_err(|err| write_failure(Verb::Patch, Written::Pods, &pod, &err))?;
                self.ctx.metrics.count(UpgradeOutcome::Started);
                Ok(Some(Step::Updating))
            }
            Action::PutInService { ordinal, uid } => {
                let gate = objects::gate_patch(uid, true, "Ready", "in service", &self.stamp);
                self.set_gate(&pod, gate).await?;
                self.count_finished_update(*ordinal);
                Ok(Some(Step::InService))
            }
        }
    }

    async fn create(
        &self,
        ordinal: Ordinal,
        revision: &str,
        pod: &str,
    ) -> Result<Option<Step>, WriteFailure> {
        let Some(rev) = self.world.revisions.get(revision) else {
            return Ok(None);
        };
        let client = self.ctx.runtime.client().clone();
        let params = PostParams {
            field_manager: Some(self.ctx.runtime.field_manager().into()),
            ..PostParams::default()
        };
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), self.namespace);
        for claim in objects::instance_claims(self.app, ordinal) {
            match claims.create(&params, &claim).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(err) => {
                    let name = claim.name_any();
                    return Err(write_failure(
                        Verb::Create,
                        Written::PersistentVolumeClaims,
                        &name,
                        &err,
                    ));
                }
            }
        }
        let object = objects::instance_pod(self.app, ordinal, rev);
        match Api::<Pod>::namespaced(client, self.namespace)
            .create(&params, &object)
            .await
        {
            Ok(_) => Ok(Some(Step::Created)),
            Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(None),
            Err(err) => Err(write_failure(Verb::Create, Written::Pods, pod, &err)),
        }
    }

    async fn delete(
        &self,
        uid: &str,
        reason: DeleteReason,
        pod: &str,
    ) -> Result<Option<Step>, WriteFailure> {
        // Only the pod planned for: one recreated meanwhile under the same name is not it.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pods().delete(pod, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => return Ok(None),
            Err(err) => return Err(write_failure(Verb::Delete, Written::Pods, pod, &err)),
        }
        Ok(Some(match reason {
            DeleteReason::ScaleDown => Step::Removed,
            DeleteReason::Recreate => {
                self.ctx.metrics.count(UpgradeOutcome::Started);
                Step::Recreating
            }
            DeleteReason::Replace => Step::Replaced,
        }))
    }

    /// Writes the readiness gate's condition into the pod's status.
    async fn set_gate(&self, pod: &str, gate: serde_json::Value) -> Result<(), WriteFailure> {
        self.pods()
            .patch_status(pod, &self.patch_params(), &Patch::Strategic(gate))
            .await
            .map_err(|err| write_failure(Verb::Patch, Written::PodStatus, pod, &err))?;
        Ok(())
    }

    /// An instance back from an in-place update: count it and time it.
    fn count_finished_update(&self, ordinal: Ordinal) {
        let Some(pod) = self.world.pods.get(&ordinal) else {
            return;
        };
        if let Some(record) = pod.record.as_ref()
            && pod.revision.as_ref() == Some(&record.revision)
        {
            let metrics = &self.ctx.metrics;
            metrics.count(UpgradeOutcome::Succeeded);
            #[allow(clippy::cast_precision_loss)] // seconds of an update fit an f64 exactly
            metrics
                .in_place_seconds
                .observe((self.now - record.patched_at).max(0) as f64);
        }
    }
}

fn unserialisable(resource: Written, object: &str, err: &serde_json::Error) -> WriteFailure {
    WriteFailure {
        verb: Verb::Patch,
        resource,
        object: object.to_string(),
        code: None,
        message: format!("the patch cannot be serialised: {err}"),
    }
}
