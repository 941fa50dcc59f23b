//! Wires the GrayApp controller: the app watch, cached watches of the apps' pods and revisions
//! (which both trigger reconciles and serve their reads, so a reconcile lists nothing from the
//! API server), and the reconcile in [`crate::reconcile`].

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;
use gantry_kit::cache::Seen;
use gantry_kit::controller::{key_of, object_key};
use gantry_kit::runtime::Runtime;
use k8s_openapi::api::apps::v1::ControllerRevision;
use kube::runtime::watcher;

use crate::api::{GrayApp, LABEL_APP};
use crate::metrics::GrayMetrics;
use crate::observe::{LeanPod, pod_view};
use crate::reconcile::memory::Memory;
use crate::reconcile::{Context, forget_app, reconcile, remove_series};

pub use crate::reconcile::Error;

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
        memory: Memory::default(),
    });
    let apps = controller.cache().clone();
    let forgetting = tokio::spawn(forget_deleted_apps(apps, Arc::clone(&context)));
    controller.run(context, reconcile).await;
    forgetting.abort();
}

/// What the operator keeps per app (metric series, memory) goes with the app: on its deletion
/// event, or, after a watch gap, when a fresh list no longer has it.
async fn forget_deleted_apps(
    apps: gantry_kit::cache::Cache<gantry_kit::decode::Decoded<GrayApp>>,
    ctx: Arc<Context>,
) {
    let mut seen = apps.changes().subscribe().boxed();
    while let Some(event) = seen.next().await {
        match event {
            Seen::Changed(change) if change.deleted => {
                forget_app(&ctx, &key_of(change.namespace.as_deref(), &change.name));
            }
            Seen::Changed(_) => {}
            Seen::Missed => {
                let present: BTreeSet<String> = apps
                    .state()
                    .iter()
                    .map(|a| object_key(a.as_ref()))
                    .collect();
                for (key, revisions) in ctx.memory.keep_only(&present) {
                    remove_series(&ctx, &key, revisions);
                }
            }
        }
    }
}
