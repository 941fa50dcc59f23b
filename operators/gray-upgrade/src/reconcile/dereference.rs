//! Stage two: the app's pods and revisions, from the caches; every revision the spec asks
//! for is stored before any pod refers to it.

use std::collections::BTreeMap;
use std::sync::Arc;

use gantry_kit::index::controller_uid;
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::api::PostParams;
use kube::{Api, Resource, ResourceExt};

use super::{Context, Error, write_failure};
use crate::api::GrayApp;
use crate::model::{Instances, Verb, Written};
use crate::objects;
use crate::reasons::AppProblem;
use crate::revision::{Revision, Wanted};

/// What the app has in the cluster.
pub struct World {
    pub pods: Instances,
    /// Every revision that could be read, by name.
    pub revisions: BTreeMap<String, Revision>,
    /// The stored ControllerRevisions, readable or not (for garbage collection).
    pub stored: Vec<Arc<ControllerRevision>>,
}

pub async fn dereference(
    app: &GrayApp,
    ctx: &Context,
    namespace: &str,
    wanted: &Wanted,
) -> Result<World, Error> {
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
    let mut revisions = BTreeMap::new();
    for object in &stored {
        match decode(object) {
            Ok(revision) => {
                revisions.insert(revision.name.clone(), revision);
            }
            Err(why) => report_undecodable(app, ctx, object, &why).await,
        }
    }
    let mut world = World {
        pods,
        revisions,
        stored,
    };
    store_wanted(app, ctx, namespace, wanted, &mut world).await?;
    Ok(world)
}

fn decode(object: &ControllerRevision) -> Result<Revision, String> {
    let data = object.data.as_ref().ok_or("it holds no data")?;
    let template: PodTemplateSpec =
        serde_json::from_value(data.0.clone()).map_err(|err| err.to_string())?;
    Ok(Revision {
        name: object.name_any(),
        template,
    })
}

/// A revision that cannot be read is left alone (a person may want it) and reported once; an
/// instance that needs it is reported by the planner as missing its revision.
async fn report_undecodable(app: &GrayApp, ctx: &Context, object: &ControllerRevision, why: &str) {
    let name = object.name_any();
    let version = object.resource_version().unwrap_or_default();
    let key = gantry_kit::controller::object_key(app);
    if !ctx
        .memory
        .first_report_of_undecodable(&key, &name, &version)
    {
        return;
    }
    tracing::warn!(revision = %name, error = %why, "cannot read a stored revision");
    ctx.runtime
        .events()
        .publish(
            &app.object_ref(&()),
            AppProblem::RevisionUndecodable,
            format!("ControllerRevision {name} cannot be read as a pod template: {why}"),
        )
        .await;
}

async fn store_wanted(
    app: &GrayApp,
    ctx: &Context,
    namespace: &str,
    wanted: &Wanted,
    world: &mut World,
) -> Result<(), Error> {
    let api: Api<ControllerRevision> = Api::namespaced(ctx.runtime.client().clone(), namespace);
    let params = PostParams {
        field_manager: Some(ctx.runtime.field_manager().into()),
        ..PostParams::default()
    };
    let mut next_number = world.stored.iter().map(|r| r.revision).max().unwrap_or(0) + 1;
    for revision in &wanted.all {
        let stored = world.revisions.contains_key(&revision.name)
            || world.stored.iter().any(|r| r.name_any() == revision.name);
        if stored {
            continue;
        }
        let object =
            objects::controller_revision(app, revision, next_number).map_err(|source| {
                Error::Serialize {
                    what: "a ControllerRevision",
                    source,
                }
            })?;
        match api.create(&params, &object).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_already_exists() => {}
            Err(err) => {
                let first = write_failure(
                    Verb::Create,
                    Written::ControllerRevisions,
                    &revision.name,
                    &err,
                );
                return Err(Error::Writes { failed: 1, first });
            }
        }
        next_number += 1;
        world
            .revisions
            .insert(revision.name.clone(), revision.clone());
    }
    Ok(())
}
