//! `kubectl gantry`: the day-to-day verbs for GrayApps. Install by putting this binary on the
//! PATH; kubectl finds it by its name.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use gray_upgrade::api::{
    ANNOTATION_ABORT, ANNOTATION_APPROVE, Batch, GrayApp, LABEL_APP, RolloutPhase,
};
use gray_upgrade::model::Instances;
use gray_upgrade::observe::{LeanPod, instances};
use gray_upgrade::plan::Input;
use gray_upgrade::plugin::{
    app_not_found, error_message, parse_images, parse_instances, plan_lines, status_report, table,
};
use gray_upgrade::revision::{Revision, Wanted, images, with_images};
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const MANAGER: &str = "kubectl-gantry";

#[derive(Parser)]
#[command(
    name = "kubectl-gantry",
    about = "Day-to-day verbs for Gantry GrayApps",
    version
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Move instances to new images: `--instances 2,5,11` (or names, ranges), `--count 10`, or
    /// all remaining. Without --image, adds a batch to the rollout under way.
    Upgrade {
        app: String,
        /// CONTAINER=IMAGE; repeat for several containers.
        #[arg(long = "image")]
        images: Vec<String>,
        #[arg(long, conflicts_with = "count")]
        instances: Option<String>,
        /// A number, or a percentage of the instances still outdated (`25%`).
        #[arg(long)]
        count: Option<String>,
    },
    /// Let the next batch start (manual promotion).
    Approve { app: String },
    /// Start no new instance updates; those in flight finish.
    Pause { app: String },
    /// Undo pause.
    Resume { app: String },
    /// Stop the rollout and return every instance it moved to its previous revision.
    Abort { app: String },
    /// Return the template to an earlier revision (default: the one the current rollout came
    /// from); every instance on another revision moves back, maxUnavailable at a time.
    Rollback {
        app: String,
        /// Revision name or number (see `history`).
        #[arg(long)]
        to: Option<String>,
    },
    /// Where every instance runs (revisions, their images and ordinals), and a row for each
    /// instance not steady: revision, images, readiness, state, node.
    Status { app: String },
    /// Stored revisions, their images and which instances run them.
    History { app: String },
    /// Dry run: which instances each batch of the current plan would move, and where they run.
    Plan { app: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_message(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the cluster")?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let apps: Api<GrayApp> = Api::namespaced(client.clone(), &namespace);
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    let get = |name: String| {
        let apps = apps.clone();
        let namespace = namespace.clone();
        async move {
            apps.get(&name)
                .await
                .map_err(|e| match app_not_found(&e, &name, &namespace) {
                    Some(missing) => missing.into(),
                    None => anyhow::Error::new(e).context(format!("reading GrayApp {name}")),
                })
        }
    };
    // A change to the app; a missing app is named with its namespace.
    let patch = |name: &str, patch: serde_json::Value| {
        let (apps, params) = (apps.clone(), params.clone());
        let (name, namespace) = (name.to_string(), namespace.clone());
        async move {
            apps.patch(&name, &params, &Patch::Merge(patch))
                .await
                .map_err(|e| about_app(e, &name, &namespace))
        }
    };
    match cli.verb {
        Verb::Upgrade {
            app,
            images: flags,
            instances,
            count,
        } => {
            let current = get(app.clone()).await?;
            let batch = Batch {
                instances: instances
                    .map(|list| parse_instances(&app, &list))
                    .transpose()
                    .map_err(|e| anyhow!(e))?,
                count: count.map(|c| {
                    c.parse::<i32>()
                        .map_or(IntOrString::String(c), IntOrString::Int)
                }),
                selector: None,
            };
            let replace = parse_images(&flags).map_err(|e| anyhow!(e))?;
            let known = images(&current.spec.template);
            if let Some(unknown) = replace.keys().find(|c| !known.contains_key(*c)) {
                bail!(
                    "GrayApp {app} has no container {unknown} (it has: {})",
                    known.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            let template = with_images(&current.spec.template, &replace);
            let new_revision = template != current.spec.template;
            let mut batches = if new_revision {
                Vec::new()
            } else {
                current.spec.update.batches.clone()
            };
            batches.push(batch);
            patch(
                &app,
                json!({"spec": {"template": template, "update": {"batches": batches}}}),
            )
            .await?;
            let name = Revision::new(&app, template)?.name;
            if new_revision {
                println!(
                    "{app}: rolling out {name}; batch 1 of {} starts now",
                    batches.len()
                );
            } else {
                println!(
                    "{app}: batch {} added to the rollout of {name}",
                    batches.len()
                );
            }
        }
        Verb::Approve { app } => {
            let current = get(app.clone()).await?;
            let rollout = current
                .status
                .and_then(|s| s.rollout)
                .ok_or_else(|| anyhow!("{app} has no rollout"))?;
            if rollout.phase != RolloutPhase::AwaitingApproval {
                bail!(
                    "{app} is not waiting for approval (rollout is {:?}: {})",
                    rollout.phase,
                    rollout.message
                );
            }
            let value = format!("{}/{}", rollout.revision, rollout.batch);
            patch(
                &app,
                json!({"metadata": {"annotations": {ANNOTATION_APPROVE: value}}}),
            )
            .await?;
            println!("{app}: batch {} approved", rollout.batch + 2);
        }
        Verb::Pause { app } => {
            patch(&app, json!({"spec": {"update": {"paused": true}}})).await?;
            println!("{app}: paused");
        }
        Verb::Resume { app } => {
            patch(&app, json!({"spec": {"update": {"paused": false}}})).await?;
            println!("{app}: resumed");
        }
        Verb::Abort { app } => {
            let current = get(app.clone()).await?;
            // From the spec, not status: status may not have caught up with the last change.
            let revision = Revision::new(&app, current.spec.template.clone())?.name;
            patch(
                &app,
                json!({"metadata": {"annotations": {ANNOTATION_ABORT: revision}}}),
            )
            .await?;
            println!(
                "{app}: rollout of {revision} aborted; its instances return to their previous revisions"
            );
        }
        Verb::Rollback { app, to } => {
            let current = get(app.clone()).await?;
            let stored = revisions(&client, &namespace, &app).await?;
            let target = rollback_target(&current, &stored, to.as_deref())?;
            let template: PodTemplateSpec =
                serde_json::from_value(target.data.clone().map(|d| d.0).unwrap_or_default())
                    .with_context(|| {
                        format!("revision {} holds no pod template", target.name_any())
                    })?;
            patch(
                &app,
                json!({"spec": {"template": template, "update": {"batches": []}}}),
            )
            .await?;
            println!(
                "{app}: template returned to {} (revision {}); instances move back maxUnavailable at a time",
                target.name_any(),
                target.revision
            );
        }
        Verb::Status { app } => {
            let current = get(app.clone()).await?;
            let status = current.status.unwrap_or_default();
            if let Some(r) = &status.rollout {
                println!(
                    "rollout {}: {:?}, batch {} - {}",
                    r.revision, r.phase, r.batch_progress, r.message
                );
            }
            println!("{}", status_report(&app, &status));
        }
        Verb::History { app } => {
            let current = get(app.clone()).await?;
            let status = current.status.unwrap_or_default();
            let mut stored = revisions(&client, &namespace, &app).await?;
            stored.sort_by_key(|r| r.revision);
            let rows: Vec<Vec<String>> = stored
                .iter()
                .map(|r| {
                    let name = r.name_any();
                    let template: Option<PodTemplateSpec> = r
                        .data
                        .as_ref()
                        .and_then(|d| serde_json::from_value(d.0.clone()).ok());
                    let imgs = template
                        .map(|t| {
                            images(&t)
                                .into_iter()
                                .map(|(c, i)| format!("{c}={i}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let running = status
                        .revisions
                        .iter()
                        .find(|s| s.name == name)
                        .map(|s| s.instances.clone())
                        .unwrap_or_default();
                    let mark = if status.update_revision.as_deref() == Some(name.as_str()) {
                        "template"
                    } else {
                        ""
                    };
                    vec![r.revision.to_string(), name, imgs, running, mark.into()]
                })
                .collect();
            println!(
                "{}",
                table(&["#", "REVISION", "IMAGES", "INSTANCES", ""], &rows)
            );
        }
        Verb::Plan { app } => {
            let current = get(app.clone()).await?;
            let pods = pods(&client, &namespace, &app).await?;
            let wanted = Wanted::for_spec(&app, &current.spec).map_err(|e| anyhow!(e))?;
            let update = wanted.update.clone();
            let status = current.status.clone().unwrap_or_default();
            let revisions = BTreeMap::from([(update.name.clone(), update.clone())]);
            let variants = wanted.variant_of;
            let input = Input {
                spec: &current.spec,
                approve: None,
                abort: None,
                status: &status,
                pods: &pods,
                revisions: &revisions,
                update_revision: &update.name,
                variant_revisions: &variants,
                check_failures: &BTreeMap::new(),
                hold_writes: false,
                metric: &gray_upgrade::checks::MetricVerdict::NotChecked,
                now: 0,
            };
            println!(
                "rollout to {} ({})",
                update.name,
                update
                    .images()
                    .into_iter()
                    .map(|(c, i)| format!("{c}={i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            for line in plan_lines(&app, &input) {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// A failed request about the GrayApp `app`; "not found" names the app and its namespace.
fn about_app(err: kube::Error, app: &str, namespace: &str) -> anyhow::Error {
    match app_not_found(&err, app, namespace) {
        Some(missing) => missing.into(),
        None => err.into(),
    }
}

async fn revisions(
    client: &Client,
    namespace: &str,
    app: &str,
) -> anyhow::Result<Vec<ControllerRevision>> {
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .list(&ListParams::default().labels(&format!("{LABEL_APP}={app}")))
        .await?
        .items)
}

async fn pods(client: &Client, namespace: &str, app: &str) -> anyhow::Result<Instances> {
    let api: Api<LeanPod> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(&format!("{LABEL_APP}={app}")))
        .await?;
    Ok(instances(&list.items))
}

/// `--to` by name or number; by default the revision the current rollout came from, else the
/// newest stored revision before the template's.
fn rollback_target<'a>(
    app: &GrayApp,
    stored: &'a [ControllerRevision],
    to: Option<&str>,
) -> anyhow::Result<&'a ControllerRevision> {
    if let Some(to) = to {
        return stored
            .iter()
            .find(|r| r.name_any() == to || r.revision.to_string() == to)
            .ok_or_else(|| {
                anyhow!(
                    "no revision {to}; see `kubectl gantry history {}`",
                    app.name_any()
                )
            });
    }
    let status = app.status.clone().unwrap_or_default();
    let template = status.update_revision.clone().unwrap_or_default();
    let origin = status
        .rollout
        .as_ref()
        .and_then(|r| r.origins.keys().find(|k| **k != template).cloned());
    if let Some(found) = origin.and_then(|o| stored.iter().find(|r| r.name_any() == o)) {
        return Ok(found);
    }
    let current_number = stored
        .iter()
        .find(|r| r.name_any() == template)
        .map_or(i64::MAX, |r| r.revision);
    stored
        .iter()
        .filter(|r| r.revision < current_number)
        .max_by_key(|r| r.revision)
        .ok_or_else(|| anyhow!("{} has no earlier revision to roll back to", app.name_any()))
}
