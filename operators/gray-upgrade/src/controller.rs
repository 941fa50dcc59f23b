//! The thin layer between the planner and the API server: read the app, its pods and its
//! revisions from caches (dereference), check what admission cannot (validate), plan, carry the
//! actions out, and write status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gantry_kit::apply::apply_status;
use gantry_kit::cache::Cache;
use gantry_kit::error::{classify_kube_error, kube_error_metric_reason};
use gantry_kit::index::{Index, controller_uid};
use gantry_kit::runtime::Runtime;
use gantry_kit::{ErrorClass, ReconcileError};
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};

use crate::api::{
    ANNOTATION_ABORT, ANNOTATION_APPROVE, GrayApp, GrayAppStatus, LABEL_APP, RolloutPhase, Scheme,
};
use crate::checks::{self, MetricVerdict, Transport};
use crate::metrics::{GrayMetrics, RevisionLabels};
use crate::model::{Instances, Ordinal, PodView};
use crate::objects;
use crate::observe::{LeanPod, pod_view};
use crate::plan::{self, Action, DeleteReason, Input, NoteReason, Plan};
use crate::reasons::{InvalidSpec, Step, UpgradeOutcome};
use crate::revision::{Revision, Wanted};
use crate::status::{self, StatusInput};

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("the GrayApp has no namespace")]
    NoNamespace,
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
}

impl ReconcileError for Error {
    fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidSpec(_) | Error::NoNamespace => ErrorClass::Permanent,
            Error::Kube(err) => classify_kube_error(err),
        }
    }

    fn metric_reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::NoNamespace => "NoNamespace",
            Error::Kube(err) => kube_error_metric_reason(err),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub runtime: Runtime,
    /// Each app's instances, filed under the app's UID.
    pub pods: Index<PodView>,
    pub revisions: Cache<ControllerRevision>,
    pub metrics: GrayMetrics,
}

/// Wires the controller: GrayApps, plus cached watches of their pods and revisions that both
/// trigger reconciles and serve reads (so a reconcile lists nothing from the API server).
pub async fn run(runtime: Runtime) {
    let metrics = runtime.metrics();
    let mut gray_metrics = None;
    metrics.register(|registry| gray_metrics = Some(GrayMetrics::register(registry)));
    let Some(gray_metrics) = gray_metrics else {
        return;
    };
    let owned = watcher::Config::default().labels(LABEL_APP);
    // Every instance's pod is cached, as the planner's compact view of it. The caches are kept
    // on every replica, so a standby takes over with them warm.
    let pods = runtime.owned_index(
        "grayapp pods",
        runtime.api::<LeanPod>(),
        owned.clone(),
        pod_view,
    );
    let revisions = runtime.cache(
        "grayapp revisions",
        runtime.api::<ControllerRevision>(),
        owned,
    );
    let controller = runtime
        .controller::<GrayApp>("grayapp", watcher::Config::default())
        .owns(pods.changes())
        .owns(revisions.changes());
    let context = Arc::new(Context {
        runtime: runtime.clone(),
        pods,
        revisions,
        metrics: gray_metrics,
    });
    controller.run(context, reconcile).await;
}

fn now() -> (i64, Time) {
    let ts = Timestamp::now();
    (ts.as_second(), Time(ts))
}

fn wanted_revisions(app: &GrayApp) -> Result<Wanted, Error> {
    Wanted::for_spec(&app.name_any(), &app.spec).map_err(Error::InvalidSpec)
}

fn validate(app: &GrayApp) -> Result<(), Error> {
    match objects::selector_matches_template(app) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::InvalidSpec(
                "spec.selector does not match the labels of spec.template".into(),
            ));
        }
        Err(why) => return Err(Error::InvalidSpec(format!("spec.selector: {why}"))),
    }
    for (index, batch) in app.spec.update.batches.iter().enumerate() {
        if let Some(selector) = &batch.selector
            && let Err(why) = gantry_kit::selector::parse(selector)
        {
            return Err(Error::InvalidSpec(format!(
                "spec.update.batches[{index}].selector: {why}"
            )));
        }
    }
    if app
        .spec
        .template
        .spec
        .as_ref()
        .is_none_or(|s| s.containers.is_empty())
    {
        return Err(Error::InvalidSpec("spec.template has no containers".into()));
    }
    Ok(())
}

async fn reconcile(app: Arc<GrayApp>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = app.namespace().ok_or(Error::NoNamespace)?;
    let name = app.name_any();
    let apps: Api<GrayApp> = Api::namespaced(ctx.runtime.client().clone(), &namespace);
    let (now_s, now_t) = now();
    let previous = app.status.clone().unwrap_or_default();

    // Validate what admission cannot see across fields; an invalid spec stalls, harming nothing.
    let checked = validate(&app).and_then(|()| wanted_revisions(&app));
    let wanted = match checked {
        Ok(w) => w,
        Err(Error::InvalidSpec(why)) => {
            report_invalid(&app, &apps, &ctx, &previous, &why, &now_t).await?;
            return Err(Error::InvalidSpec(why));
        }
        Err(other) => return Err(other),
    };

    // Dereference from the caches.
    ctx.pods.synced().await;
    ctx.revisions.synced().wait().await;
    let uid = app.uid().unwrap_or_default();
    let pods: Instances = ctx
        .pods
        .get(&uid)
        .into_iter()
        .map(|v| (v.ordinal, v))
        .collect();
    let stored: Vec<Arc<ControllerRevision>> = ctx
        .revisions
        .state()
        .into_iter()
        .filter(|r| controller_uid(r.as_ref()) == Some(uid.as_str()))
        .collect();
    let mut revisions: BTreeMap<String, Revision> = stored
        .iter()
        .filter_map(|r| {
            let template: PodTemplateSpec =
                serde_json::from_value(r.data.as_ref()?.0.clone()).ok()?;
            Some((
                r.name_any(),
                Revision {
                    name: r.name_any(),
                    template,
                },
            ))
        })
        .collect();

    // Make sure every wanted revision is stored before any pod refers to it.
    let revision_api: Api<ControllerRevision> =
        Api::namespaced(ctx.runtime.client().clone(), &namespace);
    let mut next_number = stored.iter().map(|r| r.revision).max().unwrap_or(0) + 1;
    for revision in &wanted.all {
        if !revisions.contains_key(&revision.name) {
            let object = objects::controller_revision(&app, revision, next_number);
            match revision_api
                .create(
                    &PostParams {
                        field_manager: Some(ctx.runtime.field_manager().into()),
                        ..PostParams::default()
                    },
                    &object,
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(err) => return Err(err.into()),
            }
            next_number += 1;
            revisions.insert(revision.name.clone(), revision.clone());
        }
    }

    let (check_failures, metric) = run_checks(&app, &previous, &pods, &wanted.update.name).await;
    let annotations = app.annotations();
    let input = Input {
        spec: &app.spec,
        approve: annotations.get(ANNOTATION_APPROVE).map(String::as_str),
        abort: annotations.get(ANNOTATION_ABORT).map(String::as_str),
        status: &previous,
        pods: &pods,
        revisions: &revisions,
        update_revision: &wanted.update.name,
        variant_revisions: &wanted.variant_of,
        check_failures: &check_failures,
        hold_writes: false,
        metric: &metric,
        now: now_s,
    };
    let plan = plan::plan(&input);
    tracing::debug!(actions = plan.actions.len(), phase = ?plan.rollout.phase, "planned");

    // Act; each action is independent of the others in the same plan.
    // Futures are made as slots free up: each is several kilobytes, and scaling up plans
    // thousands of creations at once. (By index: a closure over `&Action` trips the compiler's
    // higher-ranked lifetime check for `Send`.)
    let results: Vec<(Ordinal, Result<Option<Step>, Error>)> = {
        let (app, namespace, revisions, pods, ctx, now_t) =
            (&*app, &namespace, &revisions, &pods, &ctx, &now_t);
        let actions = &plan.actions;
        futures::stream::iter(0..actions.len())
            .map(move |i| async move {
                let a = &actions[i];
                let result = execute(app, namespace, a, revisions, pods, ctx, now_s, now_t).await;
                (a.ordinal(), result)
            })
            .buffer_unordered(32)
            .collect()
            .await
    };
    record_steps(&app, &ctx, &name, &results).await;

    for note in &plan.notes {
        ctx.runtime
            .events()
            .publish(&app.object_ref(&()), note.reason, note.message.clone())
            .await;
        record_note_metrics(&ctx.metrics, note.reason, &previous, now_s);
    }

    // Status from what is observed now plus the plan (the actions' effects show up on the next
    // reconcile, which their watch events trigger).
    let status = status::build(&StatusInput {
        app: &name,
        generation: app.metadata.generation,
        spec: &app.spec,
        previous: &previous,
        pods: &pods,
        revisions: &revisions,
        variant_names: &wanted.variant_names,
        update_revision: &wanted.update.name,
        plan: Some(&plan),
        invalid: None,
        now: &now_t,
    });
    write_status(&apps, &name, &ctx, &previous, status.clone()).await?;
    record_revision_metrics(&ctx.metrics, &namespace, &name, &previous, &status);
    collect_garbage(&app, &revision_api, &stored, &wanted, &pods).await;

    for (_, result) in results {
        result?;
    }
    Ok(requeue(&plan))
}

/// The optional health checks of the current batch: HTTP against each member that is up, and
/// the Prometheus query once every member is.
async fn run_checks(
    app: &GrayApp,
    previous: &GrayAppStatus,
    pods: &Instances,
    update_revision: &str,
) -> (BTreeMap<Ordinal, String>, MetricVerdict) {
    let health = &app.spec.update.health;
    let Some(rollout) = previous.rollout.as_ref().filter(|r| {
        r.revision == update_revision
            && matches!(r.phase, RolloutPhase::Progressing | RolloutPhase::Baking)
    }) else {
        return (BTreeMap::new(), MetricVerdict::NotChecked);
    };
    let up: Vec<&PodView> = rollout
        .members
        .iter()
        .filter_map(|m| pods.get(m).map(AsRef::as_ref))
        .filter(|p| {
            p.revision.as_deref() == Some(update_revision) && p.in_place_done() && p.available()
        })
        .collect();
    let mut failures = BTreeMap::new();
    if let Some(check) = &health.http_get {
        let timeout = Duration::from_secs(u64::try_from(check.timeout_seconds).unwrap_or(2));
        let probes: Vec<_> = up
            .iter()
            .map(|p| async move {
                let host = check.host.clone().or_else(|| p.ip.clone());
                let transport = match check.scheme {
                    Scheme::Http => Transport::Plain,
                    Scheme::Https => Transport::TlsUnverified,
                };
                let verdict = match host {
                    None => Err("the pod has no IP".to_string()),
                    Some(host) => match checks::http_get(
                        transport,
                        &checks::authority(&host, check.port),
                        &check.path,
                        timeout,
                    )
                    .await
                    {
                        Ok((code, _)) if (200..300).contains(&code) => Ok(()),
                        Ok((code, _)) => Err(format!("GET {} answered {code}", check.path)),
                        Err(why) => Err(why),
                    },
                };
                (p.ordinal, verdict)
            })
            .collect();
        for (ordinal, verdict) in futures::future::join_all(probes).await {
            if let Err(why) = verdict {
                failures.insert(ordinal, why);
            }
        }
    }
    let metric = match &health.prometheus {
        Some(query)
            if !rollout.members.is_empty()
                && up.len() == rollout.members.len()
                && failures.is_empty() =>
        {
            let names: Vec<String> = rollout
                .members
                .iter()
                .map(|m| objects::pod_name(&app.name_any(), *m))
                .collect();
            let promql = checks::expand_query(&query.query, &names);
            checks::prometheus(
                &query.address,
                &promql,
                query.max_value,
                Duration::from_secs(5),
            )
            .await
        }
        _ => MetricVerdict::NotChecked,
    };
    (failures, metric)
}

fn requeue(plan: &Plan) -> Requeue {
    match plan.requeue_after {
        Some(s) => Requeue::requeue(Duration::from_secs(u64::try_from(s).unwrap_or(1).max(1))),
        None => Requeue::requeue(Duration::from_secs(300)),
    }
}

/// Writes status only when it says something new (timestamps alone do not count).
async fn write_status(
    apps: &Api<GrayApp>,
    name: &str,
    ctx: &Context,
    previous: &GrayAppStatus,
    status: GrayAppStatus,
) -> Result<(), Error> {
    if &status == previous {
        return Ok(());
    }
    apply_status(apps, name, ctx.runtime.field_manager(), &status).await?;
    Ok(())
}

async fn report_invalid(
    app: &GrayApp,
    apps: &Api<GrayApp>,
    ctx: &Context,
    previous: &GrayAppStatus,
    why: &str,
    now: &Time,
) -> Result<(), Error> {
    let name = app.name_any();
    let update = Revision::new(&name, app.spec.template.clone());
    let status = status::build(&StatusInput {
        app: &name,
        generation: app.metadata.generation,
        spec: &app.spec,
        previous,
        pods: &BTreeMap::new(),
        revisions: &BTreeMap::new(),
        variant_names: &BTreeMap::new(),
        update_revision: &update.name,
        plan: None,
        invalid: Some(why),
        now,
    });
    // Keep the instance view from before: an invalid spec changes nothing that runs.
    let status = GrayAppStatus {
        replicas: previous.replicas,
        ready_replicas: previous.ready_replicas,
        updated_replicas: previous.updated_replicas,
        revisions: previous.revisions.clone(),
        instances: previous.instances.clone(),
        update_revision: previous.update_revision.clone(),
        ..status
    };
    if previous
        .conditions
        .iter()
        .all(|c| c.reason != InvalidSpec::REASON)
    {
        ctx.runtime
            .events()
            .publish(&app.object_ref(&()), InvalidSpec, why.to_string())
            .await;
    }
    write_status(apps, &name, ctx, previous, status).await
}

fn pod_params(ctx: &Context) -> PatchParams {
    PatchParams {
        field_manager: Some(ctx.runtime.field_manager().to_string()),
        ..PatchParams::default()
    }
}

#[allow(clippy::too_many_arguments)]
async fn execute(
    app: &GrayApp,
    namespace: &str,
    action: &Action,
    revisions: &BTreeMap<String, Revision>,
    pods: &Instances,
    ctx: &Context,
    now_s: i64,
    now_t: &Time,
) -> Result<Option<Step>, Error> {
    let client = ctx.runtime.client().clone();
    // Writes read back the lean form: the response to every patch is a whole pod.
    let pod_api: Api<LeanPod> = Api::namespaced(client.clone(), namespace);
    let name = app.name_any();
    let events = ctx.runtime.events();
    let stamp = now_t.0.to_string();
    let pod_name = objects::pod_name(&name, action.ordinal());
    let (reason, note, uid) = match action {
        Action::Create { ordinal, revision } => {
            let Some(rev) = revisions.get(revision) else {
                return Ok(None);
            };
            let claim_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
            for claim in objects::instance_claims(app, *ordinal) {
                ignore_exists(claim_api.create(&PostParams::default(), &claim).await)?;
            }
            let pod = objects::instance_pod(app, *ordinal, rev);
            let params = PostParams {
                field_manager: Some(ctx.runtime.field_manager().into()),
                ..PostParams::default()
            };
            let created = match Api::<Pod>::namespaced(client.clone(), namespace)
                .create(&params, &pod)
                .await
            {
                Ok(p) => p.uid(),
                Err(kube::Error::Api(s)) if s.is_already_exists() => return Ok(None),
                Err(err) => return Err(err.into()),
            };
            (
                Step::Created,
                format!("created {pod_name} at {revision}"),
                created.unwrap_or_default(),
            )
        }
        Action::Delete { uid, reason, .. } => {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match pod_api.delete(&pod_name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => return Ok(None),
                Err(err) => return Err(err.into()),
            }
            let (reason, why) = match reason {
                DeleteReason::ScaleDown => (Step::Removed, "scaled down"),
                DeleteReason::Recreate => {
                    ctx.metrics.count(UpgradeOutcome::Started);
                    (
                        Step::Recreating,
                        "the change cannot happen in place; it comes back under the same name",
                    )
                }
                DeleteReason::Replace => {
                    (Step::Replaced, "its pod terminated; a new one replaces it")
                }
            };
            (reason, format!("deleted {pod_name}: {why}"), uid.clone())
        }
        Action::TakeOutOfService { uid, .. } => {
            let gate = objects::gate_patch(
                uid,
                false,
                "UpdateStarting",
                "out of service for an update",
                &stamp,
            );
            set_gate(&pod_api, &pod_name, gate, ctx).await?;
            (
                Step::OutOfService,
                format!("{pod_name} taken out of service for its update"),
                uid.clone(),
            )
        }
        Action::PatchInPlace {
            uid,
            revision,
            images,
            record,
            ..
        } => {
            let patch = objects::in_place_patch(uid, revision, images, record);
            pod_api
                .patch(&pod_name, &pod_params(ctx), &Patch::Strategic(patch))
                .await?;
            ctx.metrics.count(UpgradeOutcome::Started);
            let list = images
                .iter()
                .map(|(c, i)| format!("{c}={i}"))
                .collect::<Vec<_>>()
                .join(", ");
            (
                Step::Updating,
                format!("{pod_name} updating in place to {revision} ({list})"),
                uid.clone(),
            )
        }
        Action::PutInService { ordinal, uid } => {
            let gate = objects::gate_patch(uid, true, "Ready", "in service", &stamp);
            set_gate(&pod_api, &pod_name, gate, ctx).await?;
            // An instance coming back from an in-place update: count it and time it.
            if let Some(pod) = pods.get(ordinal)
                && let Some(record) = pod.record.as_ref()
                && pod.revision.as_ref() == Some(&record.revision)
            {
                ctx.metrics.count(UpgradeOutcome::Succeeded);
                ctx.metrics
                    .in_place_seconds
                    .observe((now_s - record.patched_at).max(0) as f64);
            }
            (
                Step::InService,
                format!("{pod_name} back in service"),
                uid.clone(),
            )
        }
    };
    let pod_ref = objects::pod_reference(app, action.ordinal(), &uid);
    events.publish(&pod_ref, reason, note).await;
    Ok(Some(reason))
}

/// Writes the readiness gate's condition into the pod's status.
async fn set_gate(
    pod_api: &Api<LeanPod>,
    pod_name: &str,
    gate: serde_json::Value,
    ctx: &Context,
) -> Result<(), Error> {
    pod_api
        .patch_status(pod_name, &pod_params(ctx), &Patch::Strategic(gate))
        .await?;
    Ok(())
}

/// One event on the app per kind of step this reconcile took, naming the instances (each pod
/// has its own event too): at a thousand instances, one per instance on the app as well would
/// double the event traffic.
async fn record_steps(
    app: &GrayApp,
    ctx: &Context,
    name: &str,
    results: &[(Ordinal, Result<Option<Step>, Error>)],
) {
    let mut by_reason: BTreeMap<Step, Vec<Ordinal>> = BTreeMap::new();
    for (ordinal, result) in results {
        if let Ok(Some(reason)) = result {
            by_reason.entry(*reason).or_default().push(*ordinal);
        }
    }
    for (reason, mut ordinals) in by_reason {
        ordinals.sort_unstable();
        const LISTED: usize = 20;
        let mut names: Vec<String> = ordinals
            .iter()
            .take(LISTED)
            .map(|o| objects::pod_name(name, *o))
            .collect();
        if ordinals.len() > LISTED {
            names.push(format!("and {} more", ordinals.len() - LISTED));
        }
        let note = format!("{}: {}", reason.phrase(), names.join(", "));
        ctx.runtime
            .events()
            .publish(&app.object_ref(&()), reason, note)
            .await;
    }
}

fn ignore_exists<T>(result: Result<T, kube::Error>) -> Result<(), Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(err) => Err(err.into()),
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
        metrics
            .batch_seconds
            .observe((now - started.0.as_second()).max(0) as f64);
    }
}

fn record_revision_metrics(
    metrics: &GrayMetrics,
    namespace: &str,
    app: &str,
    previous: &GrayAppStatus,
    status: &GrayAppStatus,
) {
    let labels = |revision: &str| RevisionLabels {
        namespace: namespace.to_string(),
        app: app.to_string(),
        revision: revision.to_string(),
    };
    for gone in previous
        .revisions
        .iter()
        .filter(|p| !status.revisions.iter().any(|r| r.name == p.name))
    {
        metrics.instances.remove(&labels(&gone.name));
    }
    for revision in &status.revisions {
        metrics
            .instances
            .get_or_create(&labels(&revision.name))
            .set(i64::from(revision.count));
    }
}

/// Deletes stored revisions beyond the history limit that nothing runs or asks for.
async fn collect_garbage(
    app: &GrayApp,
    api: &Api<ControllerRevision>,
    stored: &[Arc<ControllerRevision>],
    wanted: &Wanted,
    pods: &Instances,
) {
    let in_use: BTreeSet<&str> = pods
        .values()
        .filter_map(|p| p.revision.as_deref())
        .chain(wanted.all.iter().map(|r| r.name.as_str()))
        .chain(
            app.status
                .iter()
                .flat_map(|s| s.rollout.iter())
                .flat_map(|r| r.origins.keys().map(String::as_str)),
        )
        .collect();
    let mut spare: Vec<&Arc<ControllerRevision>> = stored
        .iter()
        .filter(|r| !in_use.contains(r.name_any().as_str()))
        .collect();
    spare.sort_by_key(|r| r.revision);
    let limit = usize::try_from(app.spec.revision_history_limit).unwrap_or(0);
    let excess = spare.len().saturating_sub(limit);
    let names: Vec<String> = spare
        .into_iter()
        .take(excess)
        .map(|r| r.name_any())
        .collect();
    let deletions: Vec<_> = names
        .into_iter()
        .map(|name| async move {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(revision = %name, "deleted old revision"),
                Err(err) => {
                    tracing::warn!(revision = %name, error = %err, "could not delete old revision")
                }
            }
        })
        .collect();
    futures::stream::iter(deletions)
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;
}
