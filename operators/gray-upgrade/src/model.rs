//! What the planner sees of the world: instances as plain data, with no Kubernetes client.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// An instance's number; its pod is `<app>-<ordinal>`.
pub type Ordinal = i32;

/// The name of an instance's pod.
pub fn pod_name(app: &str, ordinal: Ordinal) -> String {
    format!("{app}-{ordinal}")
}

/// What the batch's Prometheus query said.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricVerdict {
    /// No query configured, or the batch is not at the point where it matters.
    NotChecked,
    Passed(f64),
    /// Above the threshold: the batch fails.
    Failed(String),
    /// Prometheus could not be asked or gave no number: the batch waits.
    Unknown(String),
}

/// Seconds since the Unix epoch.
pub type Seconds = i64;

/// One container as the pod spec and status show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerView {
    pub name: String,
    /// The image the spec asks for.
    pub image: String,
    /// The image the running container was started from (status), if known.
    pub running_image: Option<String>,
    pub container_id: Option<String>,
    pub restart_count: i32,
    /// When the running container started.
    pub started_at: Option<Seconds>,
    pub ready: bool,
}

/// What a container looked like just before its in-place update. Every container has one, so
/// that restarts are counted from the update for all of them, not from the pod's start.
///
/// A container the update restarts is done once it is a different one (new ID or more
/// restarts) that started after the patch. Records written before `expectRestart` existed
/// held only such containers, hence its default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerBaseline {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    pub restart_count: i32,
    /// Whether the kubelet restarts it for this update: it runs another image than the one
    /// the patch asks for.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub expect_restart: bool,
    /// Whether it was running when patched. One that was not (stopped by an earlier patch, a
    /// slow kubelet not yet having started it again) restarts once more without crashing.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub was_running: bool,
}

impl Default for ContainerBaseline {
    fn default() -> Self {
        Self {
            container_id: None,
            restart_count: 0,
            expect_restart: true,
            was_running: true,
        }
    }
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_true(value: &bool) -> bool {
    *value
}

impl ContainerBaseline {
    /// Restarts the update itself accounts for.
    fn own_restarts(&self) -> i32 {
        i32::from(self.expect_restart || !self.was_running)
    }
}

/// The record of an in-place update, kept in an annotation on the pod so that a restarted
/// operator knows exactly where each instance stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InPlaceRecord {
    /// The revision the pod was patched to.
    pub revision: String,
    /// The revision it came from.
    pub previous_revision: String,
    /// When the patch was written.
    pub patched_at: Seconds,
    /// Baselines of the containers whose image changed.
    pub containers: BTreeMap<String, ContainerBaseline>,
}

/// An app's instances by ordinal (shared with the operator's cache, never copied).
pub type Instances = BTreeMap<Ordinal, Arc<PodView>>;

/// One instance's pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub ordinal: Ordinal,
    pub uid: String,
    pub node: Option<String>,
    /// The pod's IP, for HTTP checks.
    pub ip: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The revision label: what its containers run or are being moved to.
    pub revision: Option<String>,
    pub created_at: Seconds,
    /// Being deleted.
    pub deleting: bool,
    /// Finished or failed for good (restartPolicy Never): only a new pod helps.
    pub terminal: bool,
    /// The pod's Ready condition.
    pub ready: bool,
    /// The operator's readiness gate: `None` when not yet set.
    pub in_service: Option<bool>,
    /// When the gate last changed.
    pub in_service_since: Option<Seconds>,
    pub containers: Vec<ContainerView>,
    pub record: Option<InPlaceRecord>,
    /// Why the in-place record annotation could not be read, when it is there but unreadable.
    /// Such an instance cannot be known to have restarted, so it is never put back in service.
    pub record_unreadable: Option<String>,
}

impl PodView {
    /// Whether every container is ready (the pod's own readiness, ignoring our gate).
    pub fn containers_ready(&self) -> bool {
        !self.containers.is_empty() && self.containers.iter().all(|c| c.ready)
    }

    /// Whether the in-place update in `record` has visibly happened: each patched container is
    /// a new one (new container ID or more restarts), started no earlier than the patch, and
    /// runs the patched image. The image ID is deliberately not used: a tag moved to an image
    /// with the same digest restarts the container without changing it.
    pub fn in_place_done(&self) -> bool {
        if self.record_unreadable.is_some() {
            return false;
        }
        let Some(record) = &self.record else {
            return true;
        };
        let restarting = record.containers.iter().filter(|(_, b)| b.expect_restart);
        restarting.into_iter().all(|(name, before)| {
            self.containers.iter().any(|c| {
                c.name == *name
                    && (c.container_id.is_some() && c.container_id != before.container_id
                        || c.restart_count > before.restart_count)
                    && c.started_at.is_some_and(|t| t >= record.patched_at)
            })
        })
    }

    /// Restarts since the in-place update finished (or since the pod started).
    pub fn restarts_since_update(&self) -> i32 {
        if self.record_unreadable.is_some() {
            // No baseline to count from; the update is not confirmed done either, which is
            // what holds the instance.
            return 0;
        }
        self.containers
            .iter()
            .map(|c| {
                let baseline = self
                    .record
                    .as_ref()
                    .and_then(|r| r.containers.get(&c.name))
                    .map_or(0, |b| b.restart_count + b.own_restarts());
                (c.restart_count - baseline).max(0)
            })
            .sum()
    }

    /// Available: Ready, gate included.
    pub fn available(&self) -> bool {
        !self.deleting && self.ready && self.in_service == Some(true)
    }

    /// Whether an instance's pod going from `old` to `new` (`None`: gone) may be what a
    /// rollout waits for: its containers becoming ready (an in-place restart done, so it can
    /// go back in service), the pod becoming Ready (back in service, so the next one can go
    /// out), or the pod going away (to be replaced). Its own writes, kills and falls out of
    /// readiness are not awaited.
    pub fn awaited(old: Option<&Self>, new: Option<&Self>) -> bool {
        match (old, new) {
            (Some(old), Some(new)) => {
                (!old.containers_ready() && new.containers_ready()) || (!old.ready && new.ready)
            }
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// Whether two image references name the same image, as the runtime resolves them
/// (`ocr:v7` and `docker.io/library/ocr:v7` do).
pub fn same_image(a: &str, b: &str) -> bool {
    a == b || normalize_image(a) == normalize_image(b)
}

/// An image reference in the form the container runtime reports it: a bare Docker Hub name
/// gets its registry and `library/` prefix, and a missing tag becomes `latest`.
pub fn normalize_image(image: &str) -> String {
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let first = name.split('/').next().unwrap_or_default();
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut full = if has_registry {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    let last = full.rsplit('/').next().unwrap_or_default();
    if digest.is_none() && !last.contains(':') {
        full.push_str(":latest");
    }
    match digest {
        Some(d) => format!("{full}@{d}"),
        None => full,
    }
}

/// A write to a pod the watch may not have shown yet. Until it does, the pod is planned as
/// written: planning from the stale view would repeat the write (and a repeated in-place patch
/// would restamp its record after the container may already have restarted).
#[derive(Clone, Debug, PartialEq)]
pub enum Expected {
    /// Patched in place to a revision, with this record and these images.
    Patched {
        revision: String,
        record: InPlaceRecord,
        images: BTreeMap<String, String>,
    },
    /// The readiness gate set, at this time.
    Gate { in_service: bool, since: Seconds },
}

impl PodView {
    /// The pod with the write applied, if this view does not show it yet.
    pub fn behind(&self, expected: &Expected) -> Option<PodView> {
        let mut pod = self.clone();
        match expected {
            Expected::Patched {
                revision,
                record,
                images,
            } => {
                if self.revision.as_ref() == Some(revision) && self.record.as_ref() == Some(record)
                {
                    return None;
                }
                pod.revision = Some(revision.clone());
                pod.record = Some(record.clone());
                pod.record_unreadable = None;
                for container in &mut pod.containers {
                    if let Some(image) = images.get(&container.name) {
                        container.image = image.clone();
                    }
                }
            }
            Expected::Gate { in_service, since } => {
                if self.in_service == Some(*in_service) {
                    return None;
                }
                pod.in_service = Some(*in_service);
                pod.in_service_since = Some(*since);
                pod.ready &= *in_service;
            }
        }
        Some(pod)
    }
}

/// A kind of write the operator makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    Create,
    Patch,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Create => "create",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
}

/// What the operator writes to, as RBAC names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Written {
    Pods,
    PodStatus,
    PersistentVolumeClaims,
    ControllerRevisions,
    GrayAppStatus,
}

impl Written {
    pub fn as_str(self) -> &'static str {
        match self {
            Written::Pods => "pods",
            Written::PodStatus => "pods/status",
            Written::PersistentVolumeClaims => "persistentvolumeclaims",
            Written::ControllerRevisions => "controllerrevisions",
            Written::GrayAppStatus => "grayapps/status",
        }
    }
}

/// A write the API server refused or that did not reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteFailure {
    pub verb: Verb,
    pub resource: Written,
    /// The object's name.
    pub object: String,
    /// The HTTP status the API server answered with; `None` when it did not answer.
    pub code: Option<u16>,
    pub message: String,
}

impl WriteFailure {
    /// Whether a person must act (grant a permission): retrying alone will not help.
    pub fn needs_a_person(&self) -> bool {
        matches!(self.code, Some(401 | 403))
    }
}

impl std::fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (verb, resource, object) = (self.verb.as_str(), self.resource.as_str(), &self.object);
        match self.code {
            Some(code) => write!(f, "{verb} {resource} {object}: {code}: {}", self.message),
            None => write!(f, "{verb} {resource} {object}: {}", self.message),
        }
    }
}

/// `0-1,3,5-24` for {0, 1, 3, 5, …, 24}.
pub fn format_ranges(ordinals: &BTreeSet<Ordinal>) -> String {
    let mut parts = Vec::new();
    let mut iter = ordinals.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

/// The inverse of [`format_ranges`]; malformed parts are skipped.
pub fn parse_ranges(text: &str) -> BTreeSet<Ordinal> {
    let mut out = BTreeSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<Ordinal>(), b.parse::<Ordinal>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(n) = part.parse() {
                    out.insert(n);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn container(id: &str, restarts: i32, started: Seconds, ready: bool) -> ContainerView {
        ContainerView {
            name: "app".into(),
            image: "app:v2".into(),
            running_image: Some("app:v2".into()),
            container_id: Some(id.into()),
            restart_count: restarts,
            started_at: Some(started),
            ready,
        }
    }

    fn patched_pod(now_container: ContainerView) -> PodView {
        PodView {
            containers: vec![now_container],
            record: Some(InPlaceRecord {
                revision: "r2".into(),
                previous_revision: "r1".into(),
                patched_at: 100,
                containers: [(
                    "app".to_string(),
                    ContainerBaseline {
                        container_id: Some("c1".into()),
                        restart_count: 0,
                        ..ContainerBaseline::default()
                    },
                )]
                .into(),
            }),
            ..PodView::default()
        }
    }

    /// A running pod with one container, `containers` ready or not, and Ready or not.
    fn instance(containers: bool, ready: bool) -> PodView {
        PodView {
            containers: vec![container("c1", 0, 1, containers)],
            ready,
            in_service: Some(ready),
            ..PodView::default()
        }
    }

    #[test]
    fn a_rollout_awaits_readiness_coming_and_pods_going_but_not_the_rest() {
        let (stopped, restarted, ready) = (
            instance(false, false),
            instance(true, false),
            instance(true, true),
        );
        let awaited = |old: &PodView, new: &PodView| PodView::awaited(Some(old), Some(new));
        assert!(
            awaited(&stopped, &restarted),
            "restarted: can go back in service"
        );
        assert!(
            awaited(&restarted, &ready),
            "back in service: the next can go"
        );
        assert!(awaited(&stopped, &ready));
        assert!(
            !awaited(&ready, &restarted),
            "out of service: our own doing"
        );
        assert!(
            !awaited(&restarted, &stopped),
            "killed: the restart is what counts"
        );
        let relabelled = PodView {
            revision: Some("r2".into()),
            ..stopped.clone()
        };
        assert!(!awaited(&stopped, &relabelled), "our own patch");
        assert!(PodView::awaited(Some(&ready), None), "gone: to be replaced");
        assert!(
            !PodView::awaited(None, Some(&stopped)),
            "new: not ready yet"
        );
    }

    #[test]
    fn update_is_done_when_a_new_container_started_after_the_patch() {
        assert!(patched_pod(container("c2", 1, 105, true)).in_place_done());
    }

    #[test]
    fn the_old_container_is_not_done() {
        assert!(!patched_pod(container("c1", 0, 50, true)).in_place_done());
    }

    #[test]
    fn a_restart_from_before_the_patch_is_not_done() {
        // New ID, but it started before the patch: a crash restart of the old image.
        assert!(!patched_pod(container("c2", 1, 90, true)).in_place_done());
    }

    #[test]
    fn same_container_id_but_more_restarts_counts() {
        // Runtimes that reuse IDs still bump the restart count.
        assert!(patched_pod(container("c1", 1, 101, true)).in_place_done());
    }

    #[test]
    fn restarts_count_from_the_update() {
        let pod = patched_pod(container("c2", 3, 105, true));
        // Baseline 0 restarts, +1 for the update's own restart: 2 more since.
        assert_eq!(pod.restarts_since_update(), 2);
        let fresh = PodView {
            containers: vec![container("c1", 0, 1, true)],
            ..PodView::default()
        };
        assert_eq!(fresh.restarts_since_update(), 0);
    }

    #[test]
    fn images_normalize_like_the_runtime_reports_them() {
        assert_eq!(normalize_image("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(
            normalize_image("nginx:1.25"),
            "docker.io/library/nginx:1.25"
        );
        assert_eq!(normalize_image("team/app:v1"), "docker.io/team/app:v1");
        assert_eq!(
            normalize_image("registry.local:5000/ocr:v8"),
            "registry.local:5000/ocr:v8"
        );
        assert_eq!(
            normalize_image("ocr@sha256:abc"),
            "docker.io/library/ocr@sha256:abc"
        );
        assert_eq!(
            normalize_image(&normalize_image("ocr:v7")),
            normalize_image("ocr:v7")
        );
    }

    #[test]
    fn records_written_before_every_container_had_a_baseline_still_read() {
        let old: InPlaceRecord = serde_json::from_str(
            r#"{"revision":"r2","previousRevision":"r1","patchedAt":100,"containers":{"app":{"containerId":"c1","restartCount":0}}}"#,
        )
        .expect("old record");
        assert!(old.containers["app"].expect_restart && old.containers["app"].was_running);
        let unchanged = ContainerBaseline {
            expect_restart: false,
            ..ContainerBaseline::default()
        };
        let json = serde_json::to_string(&unchanged).expect("serialises");
        assert_eq!(json, r#"{"restartCount":0,"expectRestart":false}"#);
    }

    #[test]
    fn restarts_of_an_unchanged_container_count_from_the_update() {
        let mut pod = patched_pod(container("c2", 1, 105, true));
        pod.containers.push(ContainerView {
            name: "proxy".into(),
            restart_count: 3,
            ..container("p1", 3, 10, true)
        });
        if let Some(record) = pod.record.as_mut() {
            record.containers.insert(
                "proxy".into(),
                ContainerBaseline {
                    container_id: Some("p1".into()),
                    restart_count: 3,
                    expect_restart: false,
                    was_running: true,
                },
            );
        }
        assert!(
            pod.in_place_done(),
            "the unchanged container is not waited for"
        );
        assert_eq!(pod.restarts_since_update(), 0);
    }

    #[test]
    fn images_in_other_spellings_are_the_same_image() {
        assert!(same_image("ocr:v7", "docker.io/library/ocr:v7"));
        assert!(same_image("team/app", "docker.io/team/app:latest"));
        assert!(!same_image("ocr:v7", "ocr:v8"));
        assert!(!same_image("registry.local/ocr:v7", "ocr:v7"));
    }

    #[test]
    fn ranges_read_well() {
        let set: BTreeSet<_> = [0, 1, 3, 5, 6, 7, 24].into();
        assert_eq!(format_ranges(&set), "0-1,3,5-7,24");
        assert_eq!(parse_ranges("0-1,3,5-7,24"), set);
        assert_eq!(format_ranges(&BTreeSet::new()), "");
    }

    proptest! {
        #[test]
        fn ranges_round_trip(set in proptest::collection::btree_set(0i32..500, 0..100)) {
            prop_assert_eq!(parse_ranges(&format_ranges(&set)), set);
        }
    }
}
