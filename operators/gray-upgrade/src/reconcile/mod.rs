//! The reconcile of one GrayApp, in named stages, each in its own module: [`validate`] what
//! admission cannot, [`dereference`] the app's pods and revisions from the caches, [`probe`]
//! the batch's health checks, plan (the pure [`crate::plan`]), [`update_status`] (written
//! before anything moves), and [`execute`] the actions.

pub mod dereference;
pub mod execute;
pub mod memory;
pub mod probe;
pub mod update_status;
pub mod validate;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use gantry_kit::cache::Cache;
use gantry_kit::controller::key_of;
use gantry_kit::error::{classify_kube_error, kube_error_metric_reason};
use gantry_kit::index::Index;
use gantry_kit::runtime::Runtime;
use gantry_kit::{ErrorClass, ReconcileError};
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::runtime::controller::Action as Requeue;
use kube::{Api, Resource, ResourceExt};

use self::dereference::World;
use self::execute::{Executed, Executor};
use self::memory::Memory;
use self::update_status::{Built, StatusWrite, StatusWriter};
use crate::api::{ANNOTATION_ABORT, ANNOTATION_APPROVE, GrayApp, GrayAppStatus};
use crate::metrics::{GrayMetrics, RevisionLabels};
use crate::model::{Expected, Ordinal, PodView, Verb, WriteFailure, Written, pod_name};
use crate::plan::{self, Action, Input, NoteReason, Plan};
use crate::reasons::{AppProblem, Step};
use crate::revision::Wanted;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("the GrayApp has no namespace")]
    NoNamespace,
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("could not serialise {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{failed} write(s) failed, the first: {first}")]
    Writes { failed: usize, first: WriteFailure },
}

impl ReconcileError for Error {
    fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidSpec(_) | Error::NoNamespace | Error::Serialize { .. } => {
                ErrorClass::Permanent
            }
            Error::Kube(err) => classify_kube_error(err),
            Error::Writes { first, .. } => match first.code {
                Some(400 | 422) => ErrorClass::Permanent,
                _ => ErrorClass::Transient,
            },
        }
    }

    fn metric_reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::NoNamespace => "NoNamespace",
            Error::Serialize { .. } => "Serialize",
            Error::Kube(err) => kube_error_metric_reason(err),
            Error::Writes { .. } => "WriteFailed",
        }
    }
}

/// A failed write, as the operator reports it.
pub fn write_failure(
    verb: Verb,
    resource: Written,
    object: &str,
    err: &kube::Error,
) -> WriteFailure {
    let (code, message) = match err {
        kube::Error::Api(status) => (Some(status.code), status.message.clone()),
        other => (None, other.to_string()),
    };
    WriteFailure {
        verb,
        resource,
        object: object.to_string(),
        code,
        message,
    }
}

/// What every reconcile shares.
pub struct Context {
    pub runtime: Runtime,
    /// Each app's instances, filed under the app's UID.
    pub pods: Index<PodView>,
    pub revisions: Cache<ControllerRevision>,
    pub metrics: GrayMetrics,
    pub memory: Memory,
}

fn now() -> (i64, Time) {
    let ts = Timestamp::now();
    (ts.as_second(), Time(ts))
}

pub async fn reconcile(app: Arc<GrayApp>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = app.namespace().ok_or(Error::NoNamespace)?;
    let name = app.name_any();
    let key = key_of(Some(&namespace), &name);
    let (now_s, now_t) = now();
    let previous = app.status.clone().unwrap_or_default();
    let writer = StatusWriter {
        ctx: &ctx,
        api: Api::namespaced(ctx.runtime.client().clone(), &namespace),
        name: &name,
        key: &key,
    };

    let wanted = match validate::validate(&app) {
        Ok(wanted) => wanted,
        Err(why) => {
            update_status::report_invalid(&app, &writer, &previous, &why, &now_t).await?;
            return Err(Error::InvalidSpec(why));
        }
    };
    let mut world = dereference::dereference(&app, &ctx, &namespace, &wanted).await?;
    world.pods = ctx.memory.overlay(&key, world.pods, Instant::now());
    let (check_failures, metric) =
        probe::run(&app, &previous, &world.pods, &wanted.update.name).await;
    let holding = ctx.memory.holding_for(&key, Instant::now());
    let annotations = app.annotations();
    let plan = plan::plan(&Input {
        spec: &app.spec,
        approve: annotations.get(ANNOTATION_APPROVE).map(String::as_str),
        abort: annotations.get(ANNOTATION_ABORT).map(String::as_str),
        status: &previous,
        pods: &world.pods,
        revisions: &world.revisions,
        update_revision: &wanted.update.name,
        variant_revisions: &wanted.variant_of,
        check_failures: &check_failures,
        metric: &metric,
        hold_writes: holding.is_some(),
        now: now_s,
    });
    tracing::debug!(actions = plan.actions.len(), phase = ?plan.rollout.phase, "planned");

    let built = Built {
        app: &app,
        previous: &previous,
        world: &world,
        wanted: &wanted,
        plan: &plan,
        write_failure: holding.as_ref(),
        now: &now_t,
    };
    let status = update_status::build(&built);
    let written = writer.write(&previous, &status).await?;
    let executor = Executor {
        app: &app,
        ctx: &ctx,
        namespace: &namespace,
        world: &world,
        now: now_s,
        stamp: now_t.0.to_string(),
    };
    // The notes (events) are for people: the actions do not wait for them.
    let ((), executed) = futures::join!(
        publish_notes(&app, &ctx, &plan, &previous, now_s),
        executor.execute(&plan.actions)
    );
    expect_writes(&ctx, &key, &plan, &world, &executed, now_s);
    record_steps(&app, &ctx, &executed).await;
    let outcome = settle_failures(
        &app,
        &ctx,
        &writer,
        &built,
        &status,
        &executed,
        holding.is_some(),
    )
    .await;
    record_revision_metrics(&ctx, &namespace, &name, &status);
    collect_garbage(&app, &ctx, &namespace, &world, &wanted).await;
    outcome?;
    Ok(requeue(&plan, written))
}

/// Every failed write is logged and counted; the app gets a Warning and a condition naming
/// the write, and writes are held (instances waiting for one return to service) until a retry
/// goes through.
async fn settle_failures(
    app: &GrayApp,
    ctx: &Context,
    writer: &StatusWriter<'_>,
    built: &Built<'_>,
    status: &GrayAppStatus,
    executed: &Executed,
    holding: bool,
) -> Result<(), Error> {
    for (ordinal, failure) in &executed.failures {
        tracing::warn!(instance = ordinal, verb = failure.verb.as_str(), resource = failure.resource.as_str(), code = ?failure.code, error = %failure.message, "write failed");
        ctx.metrics.count_write_failure(failure);
    }
    let Some((_, first)) = executed.failures.first() else {
        if !holding && ctx.memory.succeeded(writer.key) {
            tracing::info!("writes go through again");
        }
        return Ok(());
    };
    if ctx.memory.failed(writer.key, first.clone(), Instant::now()) {
        let note = format!(
            "{} write(s) failed, the first: {first}; instances waiting for a write are returned \
             to service and none is taken out until a retry succeeds",
            executed.failures.len()
        );
        ctx.runtime
            .events()
            .publish(&app.object_ref(&()), AppProblem::WriteFailed, note)
            .await;
    }
    let reported = update_status::build(&Built {
        write_failure: Some(first),
        ..*built
    });
    writer.write(status, &reported).await?;
    Err(Error::Writes {
        failed: executed.failures.len(),
        first: first.clone(),
    })
}

/// Writes to pods that went through, remembered until the watch shows them.
fn expect_writes(
    ctx: &Context,
    key: &str,
    plan: &Plan,
    world: &World,
    executed: &Executed,
    now: i64,
) {
    let at = Instant::now();
    for &index in &executed.done {
        let (uid, expected) = match &plan.actions[index] {
            Action::PatchInPlace {
                uid,
                revision,
                images,
                record,
                ..
            } => (
                uid,
                Expected::Patched {
                    revision: revision.clone(),
                    record: record.clone(),
                    images: images.clone(),
                },
            ),
            Action::TakeOutOfService { uid, .. } => (
                uid,
                Expected::Gate {
                    in_service: false,
                    since: now,
                },
            ),
            Action::PutInService { uid, .. } => (
                uid,
                Expected::Gate {
                    in_service: true,
                    since: now,
                },
            ),
            Action::Create { .. } | Action::Delete { .. } => continue,
        };
        if world.pods.values().any(|p| &p.uid == uid) {
            ctx.memory.expect(key, uid, expected, at);
        }
    }
}

fn requeue(plan: &Plan, written: StatusWrite) -> Requeue {
    let planned = plan.requeue_after.map_or(Duration::from_secs(300), |s| {
        Duration::from_secs(u64::try_from(s).unwrap_or(1).max(1))
    });
    match written {
        StatusWrite::Deferred(wait) => Requeue::requeue(planned.min(wait)),
        StatusWrite::Unchanged | StatusWrite::Written => Requeue::requeue(planned),
    }
}

async fn publish_notes(
    app: &GrayApp,
    ctx: &Context,
    plan: &Plan,
    previous: &GrayAppStatus,
    now: i64,
) {
    for note in &plan.notes {
        ctx.runtime
            .events()
            .publish(&app.object_ref(&()), note.reason, note.message.clone())
            .await;
        record_note_metrics(&ctx.metrics, note.reason, previous, now);
    }
}

/// One event on the app per kind of step this reconcile took that changes which pods exist,
/// naming the instances. The steps of an in-place update (out of service, patched, back in
/// service) have no event each: the batch's event names its instances with their timings.
async fn record_steps(app: &GrayApp, ctx: &Context, executed: &Executed) {
    let mut by_step: BTreeMap<Step, Vec<Ordinal>> = BTreeMap::new();
    for (ordinal, step) in &executed.steps {
        if step.has_event() {
            by_step.entry(*step).or_default().push(*ordinal);
        }
    }
    let name = app.name_any();
    for (step, mut ordinals) in by_step {
        ordinals.sort_unstable();
        const LISTED: usize = 20;
        let mut names: Vec<String> = ordinals
            .iter()
            .take(LISTED)
            .map(|o| pod_name(&name, *o))
            .collect();
        if ordinals.len() > LISTED {
            names.push(format!("and {} more", ordinals.len() - LISTED));
        }
        let note = format!("{}: {}", step.phrase(), names.join(", "));
        ctx.runtime
            .events()
            .publish(&app.object_ref(&()), step, note)
            .await;
    }
}

fn record_note_metrics(
    metrics: &GrayMetrics,
    reason: NoteReason,
    previous: &GrayAppStatus,
    now: i64,
) {
    if let Some(outcome) = reason.outcome() {
        metrics.count(outcome);
    }
    if reason.ends_batch()
        && let Some(started) = previous
            .rollout
            .as_ref()
            .and_then(|r| r.batch_started_at.as_ref())
    {
        #[allow(clippy::cast_precision_loss)] // seconds of a batch fit an f64 exactly
        metrics
            .batch_seconds
            .observe((now - started.0.as_second()).max(0) as f64);
    }
}

/// The instance gauge per revision; series of revisions no instance runs any more go.
fn record_revision_metrics(ctx: &Context, namespace: &str, app: &str, status: &GrayAppStatus) {
    let key = key_of(Some(namespace), app);
    let now: BTreeSet<String> = status.revisions.iter().map(|r| r.name.clone()).collect();
    for gone in ctx.memory.revision_series(&key, now) {
        ctx.metrics
            .instances
            .remove(&RevisionLabels::new(namespace, app, &gone));
    }
    for revision in &status.revisions {
        ctx.metrics
            .instances
            .get_or_create(&RevisionLabels::new(namespace, app, &revision.name))
            .set(i64::from(revision.count));
    }
}

/// Forgets an app that is gone, and removes its series.
pub fn forget_app(ctx: &Context, key: &str) {
    let revisions = ctx.memory.forget(key);
    remove_series(ctx, key, revisions);
}

/// Removes the instance gauge's series of an app's revisions.
pub fn remove_series(ctx: &Context, key: &str, revisions: BTreeSet<String>) {
    let Some((namespace, app)) = key.split_once('/') else {
        return;
    };
    for revision in revisions {
        ctx.metrics
            .instances
            .remove(&RevisionLabels::new(namespace, app, &revision));
    }
}

/// Deletes stored revisions beyond the history limit that nothing runs or asks for.
async fn collect_garbage(
    app: &GrayApp,
    ctx: &Context,
    namespace: &str,
    world: &World,
    wanted: &Wanted,
) {
    let in_use: BTreeSet<&str> = world
        .pods
        .values()
        .filter_map(|p| p.revision.as_deref())
        .chain(wanted.all.iter().map(|r| r.name.as_str()))
        .chain(
            app.status
                .iter()
                .flat_map(|s| s.rollout.iter())
                .flat_map(|r| r.origins.keys().map(String::as_str)),
        )
        .chain(
            app.status
                .iter()
                .filter_map(|s| s.current_revision.as_deref()),
        )
        .collect();
    let mut spare: Vec<&Arc<ControllerRevision>> = world
        .stored
        .iter()
        .filter(|r| !in_use.contains(r.name_any().as_str()))
        .collect();
    spare.sort_by_key(|r| r.revision);
    let limit = usize::try_from(app.spec.revision_history_limit).unwrap_or(0);
    let excess = spare.len().saturating_sub(limit);
    let api: Api<ControllerRevision> = Api::namespaced(ctx.runtime.client().clone(), namespace);
    let names: Vec<String> = spare
        .into_iter()
        .take(excess)
        .map(|r| r.name_any())
        .collect();
    let deletions = names.into_iter().map(|name| {
        let api = api.clone();
        async move {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(revision = %name, "deleted old revision"),
                Err(err) => {
                    let failure = write_failure(Verb::Delete, Written::ControllerRevisions, &name, &err);
                    tracing::warn!(revision = %name, error = %failure, "could not delete old revision");
                    ctx.metrics.count_write_failure(&failure);
                }
            }
        }
    });
    futures::stream::iter(deletions)
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;
}
