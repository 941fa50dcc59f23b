//! Planner tests against a simulated world: pods that restart when their image is patched,
//! become Ready, and (when told) never do. Each scenario of the user story is played out step by
//! step; property tests play out random plans and states.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;

use crate::api::{
    Batch, FailurePolicy, GrayAppSpec, GrayAppStatus, Promotion, RevisionStatus, RolloutPhase,
    UpdateStrategy,
};
use crate::checks::MetricVerdict;
use crate::model::{
    ContainerView, Instances, Ordinal, PodView, Seconds, format_ranges, normalize_image,
};
use crate::plan::{
    Action, DeleteReason, Input, NoteReason, Plan, desired_ordinals, max_unavailable, plan,
};
use crate::revision::{Revision, Wanted};

fn template(image: &str, env: Option<&str>) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some([("app".to_string(), "ocr".to_string())].into()),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "ocr".into(),
                image: Some(image.into()),
                args: env.map(|e| vec![e.to_string()]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
    }
}

fn spec(replicas: i32, image: &str, update: UpdateStrategy) -> GrayAppSpec {
    GrayAppSpec {
        replicas,
        selector: LabelSelector {
            match_labels: Some([("app".to_string(), "ocr".to_string())].into()),
            ..LabelSelector::default()
        },
        template: template(image, None),
        volume_claim_templates: Vec::new(),
        remove_instances: Vec::new(),
        variants: Vec::new(),
        update,
        revision_history_limit: 10,
    }
}

fn batches(list: Vec<Batch>, promotion: Promotion, max_unavailable: i32) -> UpdateStrategy {
    UpdateStrategy {
        batches: list,
        promotion,
        max_unavailable: IntOrString::Int(max_unavailable),
        ..UpdateStrategy::default()
    }
}

fn instances(list: &[i32]) -> Batch {
    Batch {
        instances: Some(list.to_vec()),
        ..Batch::default()
    }
}

fn count(n: IntOrString) -> Batch {
    Batch {
        count: Some(n),
        ..Batch::default()
    }
}

/// A cluster in miniature: the planner's actions happen, and pods restart and become ready
/// the next tick, unless their image is in `broken_images`.
struct World {
    spec: GrayAppSpec,
    status: GrayAppStatus,
    pods: Instances,
    revisions: BTreeMap<String, Revision>,
    approve: Option<String>,
    abort: Option<String>,
    now: Seconds,
    next_id: u64,
    broken_images: BTreeSet<String>,
    /// Instances whose containers never become Ready on any image but the original `ocr:v7`.
    broken_instances: BTreeSet<Ordinal>,
    /// Instances whose HTTP check fails.
    check_failures: BTreeMap<Ordinal, String>,
    /// The batch metric's verdict.
    metric: MetricVerdict,
    /// Every disruptive action taken, for the "never twice" checks.
    patches: Vec<(Ordinal, String)>,
    recreates: Vec<Ordinal>,
    /// Writes are failing: the planner is told to hold.
    hold_writes: bool,
    /// How long the kubelet takes to start a stopped container again, per instance (0 when
    /// not named: at once, on the tick that stops it).
    restart_delay: BTreeMap<Ordinal, Seconds>,
    /// Containers stopped and not yet started again, with when they stopped.
    stopped: BTreeMap<(Ordinal, String), Seconds>,
    /// The spec image each running container was started for: the kubelet restarts a
    /// container whose spec changed since (any spelling counts, as the container hash does).
    started_for: BTreeMap<(Ordinal, String), String>,
}

impl World {
    /// A settled app: every instance on `spec`'s template, Ready and in service.
    fn settled(spec: GrayAppSpec) -> Self {
        let mut world = World {
            spec,
            status: GrayAppStatus::default(),
            pods: BTreeMap::new(),
            revisions: BTreeMap::new(),
            approve: None,
            abort: None,
            now: 1_000,
            next_id: 0,
            broken_images: BTreeSet::new(),
            broken_instances: BTreeSet::new(),
            check_failures: BTreeMap::new(),
            metric: MetricVerdict::NotChecked,
            patches: Vec::new(),
            recreates: Vec::new(),
            hold_writes: false,
            restart_delay: BTreeMap::new(),
            stopped: BTreeMap::new(),
            started_for: BTreeMap::new(),
        };
        world.run(200);
        assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
        assert!(world.all_available(), "settled world is available");
        world.patches.clear();
        world.recreates.clear();
        world
    }

    fn set_template(&mut self, template: PodTemplateSpec) {
        self.spec.template = template;
    }

    fn update_revision(&self) -> Revision {
        Revision::new("ocr", self.spec.template.clone()).expect("a template serialises")
    }

    fn plan(&mut self) -> Plan {
        let wanted = Wanted::for_spec("ocr", &self.spec).expect("variants name known containers");
        for revision in &wanted.all {
            self.revisions
                .insert(revision.name.clone(), revision.clone());
        }
        let update = wanted.update;
        let variants = wanted.variant_of;
        let input = Input {
            spec: &self.spec,
            approve: self.approve.as_deref(),
            abort: self.abort.as_deref(),
            status: &self.status,
            pods: &self.pods,
            revisions: &self.revisions,
            update_revision: &update.name,
            variant_revisions: &variants,
            check_failures: &self.check_failures,
            metric: &self.metric,
            hold_writes: self.hold_writes,
            now: self.now,
        };
        plan(&input)
    }

    fn never_ready(&self, ordinal: Ordinal, image: &str) -> bool {
        let broken_instance = self.broken_instances.contains(&ordinal) && image != "ocr:v7";
        broken_instance || self.broken_images.contains(image)
    }

    /// A container just started for `image`, reported as the runtime reports images.
    fn container(&mut self, ordinal: Ordinal, name: &str, image: &str) -> ContainerView {
        self.next_id += 1;
        self.started_for
            .insert((ordinal, name.to_string()), image.to_string());
        ContainerView {
            name: name.into(),
            image: image.into(),
            running_image: Some(normalize_image(image)),
            container_id: Some(format!("c{}", self.next_id)),
            restart_count: 0,
            started_at: Some(self.now),
            ready: !self.never_ready(ordinal, image),
        }
    }

    fn apply(&mut self, action: &Action) {
        match action {
            Action::Create { ordinal, revision } => {
                let images = self.revisions[revision].images();
                let containers = images
                    .iter()
                    .map(|(name, image)| self.container(*ordinal, name, image))
                    .collect();
                self.pods.insert(
                    *ordinal,
                    Arc::new(PodView {
                        ordinal: *ordinal,
                        uid: format!("uid-{ordinal}-{}", self.next_id),
                        node: Some(format!("node-{}", ordinal % 3)),
                        labels: [
                            ("app".to_string(), "ocr".to_string()),
                            (
                                "track".to_string(),
                                if ordinal % 2 == 0 { "even" } else { "odd" }.to_string(),
                            ),
                        ]
                        .into(),
                        revision: Some(revision.clone()),
                        created_at: self.now,
                        containers,
                        ..PodView::default()
                    }),
                );
            }
            Action::Delete {
                ordinal, reason, ..
            } => {
                if *reason == DeleteReason::Recreate {
                    self.recreates.push(*ordinal);
                }
                self.pods.remove(ordinal);
                self.stopped.retain(|(o, _), _| o != ordinal);
            }
            Action::TakeOutOfService { ordinal, .. } => {
                let pod = Arc::make_mut(self.pods.get_mut(ordinal).expect("pod exists"));
                pod.in_service = Some(false);
                pod.in_service_since = Some(self.now);
                pod.ready = false;
            }
            Action::PatchInPlace {
                ordinal,
                revision,
                images,
                record,
                ..
            } => {
                self.patches.push((*ordinal, revision.clone()));
                let pod = Arc::make_mut(self.pods.get_mut(ordinal).expect("pod exists"));
                pod.revision = Some(revision.clone());
                for c in &mut pod.containers {
                    if let Some(image) = images.get(&c.name) {
                        c.image = image.clone();
                    }
                }
                pod.record = Some(record.clone());
            }
            Action::PutInService { ordinal, .. } => {
                let pod = Arc::make_mut(self.pods.get_mut(ordinal).expect("pod exists"));
                pod.in_service = Some(true);
                pod.in_service_since = Some(self.now);
            }
        }
    }

    /// The kubelet: a container whose spec image changed since it started is stopped, and
    /// started again (on whatever the spec says then) after the instance's restart delay;
    /// readiness follows.
    fn tick(&mut self) {
        self.now += 1;
        let ordinals: Vec<Ordinal> = self.pods.keys().copied().collect();
        for o in ordinals {
            let delay = self.restart_delay.get(&o).copied().unwrap_or(0);
            let names: Vec<String> = self.pods[&o]
                .containers
                .iter()
                .map(|c| c.name.clone())
                .collect();
            for name in names {
                let key = (o, name.clone());
                let spec_image = self.pods[&o]
                    .containers
                    .iter()
                    .find(|c| c.name == name)
                    .map(|c| c.image.clone())
                    .unwrap_or_default();
                if !self.stopped.contains_key(&key)
                    && self.started_for.get(&key) != Some(&spec_image)
                {
                    self.stopped.insert(key.clone(), self.now);
                    let pod = Arc::make_mut(self.pods.get_mut(&o).expect("pod exists"));
                    if let Some(c) = pod.containers.iter_mut().find(|c| c.name == name) {
                        c.started_at = None;
                        c.ready = false;
                    }
                }
                let due = self
                    .stopped
                    .get(&key)
                    .is_some_and(|t| self.now >= t + delay);
                if due {
                    self.stopped.remove(&key);
                    let mut fresh = self.container(o, &name, &spec_image);
                    let pod = Arc::make_mut(self.pods.get_mut(&o).expect("pod exists"));
                    if let Some(c) = pod.containers.iter_mut().find(|c| c.name == name) {
                        fresh.restart_count = c.restart_count + 1;
                        *c = fresh;
                    }
                }
            }
            let pod = Arc::make_mut(self.pods.get_mut(&o).expect("pod exists"));
            pod.ready = pod.containers_ready() && pod.in_service == Some(true);
        }
    }

    /// The controller's status write, from the plan and the pods.
    fn record_status(&mut self, plan: &Plan) {
        self.status.rollout = Some(plan.rollout.clone());
        self.status.current_revision = plan.current_revision.clone();
        let mut by_revision: BTreeMap<String, BTreeSet<Ordinal>> = BTreeMap::new();
        for (o, p) in &self.pods {
            if let Some(r) = &p.revision {
                by_revision.entry(r.clone()).or_default().insert(*o);
            }
        }
        self.status.revisions = by_revision
            .into_iter()
            .map(|(name, set)| RevisionStatus {
                name,
                count: i32::try_from(set.len()).unwrap_or(0),
                instances: format_ranges(&set),
                ..RevisionStatus::default()
            })
            .collect();
    }

    fn desired(&self) -> Vec<Ordinal> {
        desired_ordinals(self.spec.replicas, &self.spec.remove_instances)
    }

    fn unavailable(&self) -> usize {
        self.desired()
            .iter()
            .filter(|o| !self.pods.get(o).is_some_and(|p| p.available()))
            .count()
    }

    fn all_available(&self) -> bool {
        self.unavailable() == 0
    }

    fn rollout_phase(&self) -> Option<RolloutPhase> {
        self.status.rollout.as_ref().map(|r| r.phase)
    }

    fn revision_of(&self, o: Ordinal) -> Option<String> {
        self.pods.get(&o).and_then(|p| p.revision.clone())
    }

    /// One reconcile and one tick; checks the invariants every step must keep.
    fn step(&mut self) -> Plan {
        let before = self.unavailable();
        let plan = self.plan();
        let budget = max_unavailable(&self.spec.update.max_unavailable, self.desired().len());
        let members: BTreeSet<Ordinal> = plan.rollout.members.iter().copied().collect();
        let origins: BTreeSet<Ordinal> = plan
            .rollout
            .origins
            .values()
            .flat_map(|r| crate::model::parse_ranges(r))
            .collect();
        let variant_instances: BTreeSet<Ordinal> = self
            .spec
            .variants
            .iter()
            .flat_map(|v| v.instances.iter().copied())
            .collect();
        let wanted = Wanted::for_spec("ocr", &self.spec).expect("variants name known containers");
        let still_wanted: BTreeSet<&str> = wanted
            .all
            .iter()
            .map(|r| r.name.as_str())
            .chain(self.status.current_revision.as_deref())
            .collect();
        for action in &plan.actions {
            let moves = matches!(
                action,
                Action::TakeOutOfService { .. }
                    | Action::PatchInPlace { .. }
                    | Action::Delete {
                        reason: DeleteReason::Recreate,
                        ..
                    }
            );
            if moves {
                let o = action.ordinal();
                let abandoned = self
                    .revision_of(o)
                    .is_some_and(|r| !still_wanted.contains(r.as_str()));
                let allowed = members.contains(&o)
                    || variant_instances.contains(&o)
                    || (plan.rollout.phase == RolloutPhase::RollingBack
                        && (origins.contains(&o) || abandoned));
                assert!(
                    allowed,
                    "moved instance {o} outside the batch {members:?}: {action:?}"
                );
            }
        }
        for action in &plan.actions {
            self.apply(action);
        }
        let after = self.unavailable();
        assert!(
            after <= budget.max(before),
            "unavailable went from {before} to {after} with budget {budget}: {:?}",
            plan.actions
        );
        self.record_status(&plan);
        self.tick();
        plan
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            let plan = self.step();
            if plan.actions.is_empty()
                && matches!(
                    plan.rollout.phase,
                    RolloutPhase::Completed
                        | RolloutPhase::Failed
                        | RolloutPhase::Aborted
                        | RolloutPhase::AwaitingApproval
                )
                && self.all_available()
            {
                return;
            }
        }
    }

    fn approve_current(&mut self) {
        let r = self.status.rollout.as_ref().expect("a rollout");
        self.approve = Some(format!("{}/{}", r.revision, r.batch));
    }
}

fn ocr_world(update: UpdateStrategy) -> World {
    World::settled(spec(25, "ocr:v7", update))
}

#[test]
fn ocr_story_three_batches_with_manual_approval() {
    let mut world = ocr_world(batches(
        vec![
            instances(&[2, 5, 11]),
            count(IntOrString::Int(10)),
            Batch::default(),
        ],
        Promotion::Manual,
        3,
    ));
    let uids: BTreeMap<Ordinal, String> = world
        .pods
        .iter()
        .map(|(o, p)| (*o, p.uid.clone()))
        .collect();
    world.set_template(template("ocr:v8", None));
    let v8 = world.update_revision().name;

    world.run(100);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::AwaitingApproval));
    let on_v8: BTreeSet<Ordinal> = world
        .pods
        .keys()
        .copied()
        .filter(|o| world.revision_of(*o) == Some(v8.clone()))
        .collect();
    assert_eq!(
        on_v8,
        [2, 5, 11].into(),
        "batch 1 is exactly the named instances"
    );

    world.approve_current();
    world.run(100);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::AwaitingApproval));
    let on_v8 = world
        .pods
        .keys()
        .filter(|o| world.revision_of(**o) == Some(v8.clone()))
        .count();
    assert_eq!(on_v8, 13, "batch 2 adds 10 more");

    world.approve_current();
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    assert!(
        world
            .pods
            .values()
            .all(|p| p.revision.as_deref() == Some(v8.as_str()))
    );
    assert_eq!(world.status.current_revision.as_deref(), Some(v8.as_str()));
    // In place throughout: same pods (UIDs), each patched exactly once, none recreated.
    for (o, uid) in &uids {
        assert_eq!(&world.pods[o].uid, uid, "instance {o} kept its pod");
    }
    assert!(world.recreates.is_empty());
    let mut patched: Vec<Ordinal> = world.patches.iter().map(|(o, _)| *o).collect();
    patched.sort_unstable();
    assert_eq!(
        patched,
        (0..25).collect::<Vec<_>>(),
        "every instance patched once"
    );
}

#[test]
fn a_passed_batch_is_told_once_with_its_instances_and_timings() {
    let mut world = ocr_world(batches(
        vec![instances(&[2, 5, 11]), Batch::default()],
        Promotion::Auto,
        3,
    ));
    world.set_template(template("ocr:v8", None));
    let mut notes = Vec::new();
    for _ in 0..300 {
        notes.extend(world.step().notes);
        if world.rollout_phase() == Some(RolloutPhase::Completed) {
            break;
        }
    }
    let promoted: Vec<&str> = notes
        .iter()
        .filter(|n| n.reason == NoteReason::BatchPromoted)
        .map(|n| n.message.as_str())
        .collect();
    assert_eq!(promoted.len(), 1, "{promoted:?}");
    assert!(
        promoted[0].contains("batch 1/2") && promoted[0].contains("(2,5,11)"),
        "{}",
        promoted[0]
    );
    assert!(promoted[0].contains("at the median"), "{}", promoted[0]);
    let completed: Vec<&str> = notes
        .iter()
        .filter(|n| n.reason == NoteReason::RolloutCompleted)
        .map(|n| n.message.as_str())
        .collect();
    assert_eq!(completed.len(), 1);
    assert!(completed[0].contains("22 instance(s)"), "{}", completed[0]);
}

#[test]
fn creating_an_app_reports_no_empty_batch() {
    let world = ocr_world(UpdateStrategy::default());
    // `settled` created it; a fresh world shows what its creation noted.
    let mut fresh = World {
        status: GrayAppStatus::default(),
        pods: BTreeMap::new(),
        ..world
    };
    let mut notes = Vec::new();
    for _ in 0..20 {
        notes.extend(fresh.step().notes);
    }
    assert!(
        notes.iter().all(|n| n.reason != NoteReason::BatchStarted),
        "{notes:?}"
    );
}

#[test]
fn a_label_change_reaches_the_pods_in_place() {
    let mut world = ocr_world(batches(Vec::new(), Promotion::Auto, 25));
    let mut relabelled = template("ocr:v7", None);
    if let Some(meta) = relabelled.metadata.as_mut() {
        meta.labels = Some(
            [
                ("app".to_string(), "ocr".to_string()),
                ("tier".to_string(), "gold".to_string()),
            ]
            .into(),
        );
    }
    world.set_template(relabelled);
    let plan = world.plan();
    let patched: Vec<&Action> = plan
        .actions
        .iter()
        .filter(|a| matches!(a, Action::PatchInPlace { .. }))
        .collect();
    assert_eq!(patched.len(), 25, "{:?}", plan.actions);
    for action in patched {
        let Action::PatchInPlace {
            metadata, images, ..
        } = action
        else {
            continue;
        };
        assert!(images.is_empty(), "no image changes");
        assert_eq!(metadata.labels.get("tier"), Some(&Some("gold".to_string())));
    }
}

#[test]
fn without_approval_the_rollout_waits() {
    let mut world = ocr_world(batches(
        vec![instances(&[1]), Batch::default()],
        Promotion::Manual,
        1,
    ));
    world.set_template(template("ocr:v8", None));
    world.run(50);
    world.run(50);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::AwaitingApproval));
    // A stale approval (another revision) does not count.
    world.approve = Some("ocr-0000000000/0".into());
    world.run(50);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::AwaitingApproval));
}

#[test]
fn partial_plan_leaves_several_versions_at_rest() {
    let mut world = ocr_world(batches(vec![instances(&[2, 5, 11])], Promotion::Auto, 1));
    world.set_template(template("ocr:v8", None));
    world.run(100);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    let v8 = world.update_revision().name;
    let count = world
        .pods
        .values()
        .filter(|p| p.revision.as_deref() == Some(v8.as_str()))
        .count();
    assert_eq!(count, 3);
    // A new instance starts on the completed rollout's revision.
    world.spec.replicas = 26;
    world.run(20);
    assert_eq!(world.revision_of(25), Some(v8));
}

#[test]
fn appending_a_batch_continues_a_completed_rollout() {
    let mut world = ocr_world(batches(vec![instances(&[2, 5, 11])], Promotion::Manual, 3));
    world.set_template(template("ocr:v8", None));
    world.run(100);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    world.spec.update.batches.push(count(IntOrString::Int(10)));
    world.run(100);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    let v8 = world.update_revision().name;
    assert_eq!(
        world
            .pods
            .values()
            .filter(|p| p.revision.as_deref() == Some(v8.as_str()))
            .count(),
        13
    );
}

#[test]
fn variants_run_other_images_side_by_side() {
    let mut world = ocr_world(UpdateStrategy::default());
    world.spec.variants = vec![
        crate::api::Variant {
            name: "v8".into(),
            instances: vec![2, 5, 11],
            images: [("ocr".to_string(), "ocr:v8".to_string())].into(),
        },
        crate::api::Variant {
            name: "v9".into(),
            instances: vec![4],
            images: [("ocr".to_string(), "ocr:v9".to_string())].into(),
        },
    ];
    world.run(100);
    let image = |o: Ordinal| world.pods[&o].containers[0].image.clone();
    assert_eq!(image(2), "ocr:v8");
    assert_eq!(image(11), "ocr:v8");
    assert_eq!(image(4), "ocr:v9");
    assert_eq!(image(0), "ocr:v7");
    assert!(world.all_available());
}

#[test]
fn failed_batch_rolls_back_in_place() {
    let mut world = ocr_world(batches(
        vec![instances(&[2, 5]), Batch::default()],
        Promotion::Auto,
        2,
    ));
    world.spec.update.health.progress_deadline_seconds = 20;
    world.broken_images.insert("ocr:v8".into());
    let v7 = world.update_revision().name;
    world.set_template(template("ocr:v8", None));
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Failed));
    assert!(
        world
            .pods
            .values()
            .all(|p| p.revision.as_deref() == Some(v7.as_str())),
        "everyone is back on v7"
    );
    assert!(world.all_available());
    assert!(world.recreates.is_empty(), "rollback was in place");
    // Nothing outside the first batch was touched.
    assert!(
        world.patches.iter().all(|(o, _)| [2, 5].contains(o)),
        "{:?}",
        world.patches
    );
}

#[test]
fn failure_budget_rolls_back_only_the_failed_instance() {
    let mut world = ocr_world(batches(vec![instances(&[2, 5])], Promotion::Auto, 2));
    world.spec.update.health.progress_deadline_seconds = 20;
    world.spec.update.health.max_failed_instances = 1;
    world.broken_instances.insert(5);
    let v7 = world.update_revision().name;
    world.set_template(template("ocr:v8", None));
    let v8 = world.update_revision().name;
    world.run(200);
    assert_eq!(
        world.rollout_phase(),
        Some(RolloutPhase::Completed),
        "within budget the batch passes"
    );
    assert_eq!(world.revision_of(2), Some(v8));
    assert_eq!(
        world.revision_of(5),
        Some(v7),
        "the failed instance went back alone"
    );
}

#[test]
fn beyond_the_failure_budget_the_whole_batch_rolls_back() {
    let mut world = ocr_world(batches(
        vec![instances(&[2, 5]), Batch::default()],
        Promotion::Auto,
        2,
    ));
    world.spec.update.health.progress_deadline_seconds = 20;
    world.broken_instances.insert(5);
    let v7 = world.update_revision().name;
    world.set_template(template("ocr:v8", None));
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Failed));
    assert_eq!(
        world.revision_of(2),
        Some(v7.clone()),
        "the healthy member went back too"
    );
    assert_eq!(world.revision_of(5), Some(v7));
    assert!(world.all_available());
}

#[test]
fn abort_mid_batch_returns_moved_instances() {
    let mut world = ocr_world(batches(vec![instances(&[1, 2, 3, 4])], Promotion::Auto, 1));
    let v7 = world.update_revision().name;
    world.set_template(template("ocr:v8", None));
    let v8 = world.update_revision().name;
    world.run(4); // mid-batch: some instances moved, one in flight
    world.abort = Some(v8);
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Aborted));
    assert!(
        world
            .pods
            .values()
            .all(|p| p.revision.as_deref() == Some(v7.as_str()))
    );
    assert!(world.all_available());
}

#[test]
fn template_revert_mid_update_converges() {
    let mut world = ocr_world(UpdateStrategy::default());
    let v7 = world.update_revision().name;
    world.set_template(template("ocr:v8", None));
    world.run(3); // instance 0 out of service or patched, not done
    assert!(
        world.pods.values().any(|p| p.in_service == Some(false)),
        "something is mid-update"
    );
    world.set_template(template("ocr:v7", None));
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    assert!(
        world
            .pods
            .values()
            .all(|p| p.revision.as_deref() == Some(v7.as_str()))
    );
    assert!(world.all_available());
}

#[test]
fn retarget_to_the_still_running_image_does_not_wait_for_a_restart() {
    let mut world = ocr_world(UpdateStrategy::default());
    world.set_template(template("ocr:v8", None));
    // Plan until instance 0 is patched, but do not let the kubelet restart it.
    loop {
        let plan = world.plan();
        let patched = plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::PatchInPlace { .. }));
        for a in &plan.actions {
            world.apply(a);
        }
        world.record_status(&plan);
        world.now += 1;
        if patched {
            break;
        }
    }
    world.set_template(template("ocr:v7", None));
    world.run(200);
    assert!(
        world.all_available(),
        "no instance is left waiting for a restart that never comes"
    );
}

#[test]
fn same_digest_tag_change_completes() {
    // The new tag points at the same image: the runtime reports the same image ID, but the
    // container is restarted; completion must not depend on the image ID.
    let mut world = ocr_world(UpdateStrategy::default());
    world.set_template(template("ocr:v7-retag", None));
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    assert!(world.all_available());
}

#[test]
fn non_image_change_recreates_under_the_same_name() {
    let mut world = ocr_world(batches(vec![], Promotion::Auto, 2));
    world.set_template(template("ocr:v7", Some("--fast")));
    world.run(300);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    assert_eq!(world.recreates.len(), 25);
    assert!(world.patches.is_empty());
    assert_eq!(
        world.pods.keys().copied().collect::<Vec<_>>(),
        (0..25).collect::<Vec<_>>()
    );
}

#[test]
fn pause_starts_nothing_new_but_finishes_what_is_in_flight() {
    let mut world = ocr_world(UpdateStrategy::default());
    world.set_template(template("ocr:v8", None));
    world.run(2);
    world.spec.update.paused = true;
    world.run(50);
    assert!(world.all_available(), "in-flight update finished");
    let v8 = world.update_revision().name;
    let moved = world
        .pods
        .values()
        .filter(|p| p.revision.as_deref() == Some(v8.as_str()))
        .count();
    assert!(moved < 25, "paused before everyone moved");
    let plan = world.plan();
    assert!(plan.actions.is_empty());
    assert!(plan.held_back > 0);
    world.spec.update.paused = false;
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
}

#[test]
fn scale_down_removes_highest_or_named_instances() {
    let mut world = ocr_world(UpdateStrategy::default());
    world.spec.replicas = 23;
    world.run(10);
    assert_eq!(world.pods.keys().copied().max(), Some(22));
    world.spec.remove_instances = vec![7];
    world.run(10);
    assert!(!world.pods.contains_key(&7));
    assert_eq!(world.pods.len(), 23);
    assert!(world.pods.contains_key(&23));
}

#[test]
fn batch_members_are_fixed_before_anything_moves() {
    let mut world = ocr_world(batches(
        vec![count(IntOrString::String("20%".into()))],
        Promotion::Auto,
        5,
    ));
    world.set_template(template("ocr:v8", None));
    // The plan that records the batch may act on its members (its status is written before
    // any action is carried out), and on no one else.
    let first = world.plan();
    assert_eq!(first.rollout.members, vec![0, 1, 2, 3, 4]);
    assert!(!first.actions.is_empty(), "the batch starts moving at once");
    assert!(
        first
            .actions
            .iter()
            .all(|a| first.rollout.members.contains(&a.ordinal())),
        "{:?}",
        first.actions
    );
    assert!(first.rollout.origins.values().any(|r| r == "0-4"));
}

#[test]
fn preview_shows_every_batch_before_anything_moves() {
    let mut world = ocr_world(batches(
        vec![
            instances(&[2, 5, 11]),
            count(IntOrString::Int(10)),
            Batch::default(),
        ],
        Promotion::Manual,
        3,
    ));
    world.set_template(template("ocr:v8", None));
    let update = world.update_revision();
    world.revisions.insert(update.name.clone(), update.clone());
    let variants = BTreeMap::new();
    let input = Input {
        spec: &world.spec,
        approve: None,
        abort: None,
        status: &world.status,
        pods: &world.pods,
        revisions: &world.revisions,
        update_revision: &update.name,
        variant_revisions: &variants,
        check_failures: &BTreeMap::new(),
        metric: &MetricVerdict::NotChecked,
        hold_writes: false,
        now: world.now,
    };
    let preview = crate::plan::preview(&input);
    assert_eq!(preview[0], vec![2, 5, 11]);
    assert_eq!(preview[1], vec![0, 1, 3, 4, 6, 7, 8, 9, 10, 12]);
    assert_eq!(preview[2].len(), 12);
}

#[test]
fn percentages_round_as_documented() {
    assert_eq!(max_unavailable(&IntOrString::String("10%".into()), 25), 2);
    assert_eq!(
        max_unavailable(&IntOrString::String("1%".into()), 25),
        1,
        "never zero"
    );
    assert_eq!(max_unavailable(&IntOrString::Int(3), 25), 3);
    assert_eq!(desired_ordinals(3, &[1]), vec![0, 2, 3]);
}

fn arb_batch() -> impl Strategy<Value = Batch> {
    prop_oneof![
        proptest::collection::btree_set(0i32..12, 1..4)
            .prop_map(|s| instances(&s.into_iter().collect::<Vec<_>>())),
        (1i32..6).prop_map(|n| count(IntOrString::Int(n))),
        (1i32..100).prop_map(|p| count(IntOrString::String(format!("{p}%")))),
        Just(Batch {
            selector: Some(LabelSelector {
                match_labels: Some([("track".to_string(), "even".to_string())].into()),
                ..LabelSelector::default()
            }),
            ..Batch::default()
        }),
        Just(Batch::default()),
    ]
}

/// Batches that would pass admission: no instance in two batches.
fn distinct(batches: Vec<Batch>) -> Vec<Batch> {
    let mut seen = BTreeSet::new();
    batches
        .into_iter()
        .filter_map(|mut b| {
            if let Some(list) = b.instances.take() {
                let fresh: Vec<i32> = list.into_iter().filter(|o| seen.insert(*o)).collect();
                if fresh.is_empty() {
                    return None;
                }
                b.instances = Some(fresh);
            }
            Some(b)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any plan on any app converges, every step within the budget and the batch (checked in
    /// `World::step`), and instances end where the plan puts them.
    #[test]
    fn any_plan_converges_within_budget(
        replicas in 1i32..12,
        max_unavail in 1i32..4,
        plan_batches in proptest::collection::vec(arb_batch(), 0..4),
        recreate in any::<bool>(),
    ) {
        let update = batches(distinct(plan_batches.clone()), Promotion::Auto, max_unavail);
        let mut world = World::settled(spec(replicas, "ocr:v7", update));
        world.set_template(template("ocr:v8", recreate.then_some("--changed")));
        let v8 = world.update_revision().name;
        world.run(600);
        prop_assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
        prop_assert!(world.all_available());
        let unique: BTreeSet<Ordinal> = world.patches.iter().map(|(o, _)| *o).collect();
        prop_assert_eq!(unique.len(), world.patches.len(), "an instance was patched twice");
        let ends_on_v8 = world.pods.values().filter(|p| p.revision.as_deref() == Some(v8.as_str())).count();
        if distinct(plan_batches).is_empty() {
            prop_assert_eq!(ends_on_v8, usize::try_from(replicas).unwrap_or(0));
        }
    }

    /// From any mix of unavailable and mid-update instances, one plan never disrupts beyond the
    /// budget, and never moves an instance outside the batch.
    #[test]
    fn one_step_from_any_state_respects_budget_and_batch(
        replicas in 2i32..15,
        max_unavail in 1i32..4,
        broken in proptest::collection::btree_set(0i32..15, 0..5),
        out_of_service in proptest::collection::btree_set(0i32..15, 0..3),
        first in proptest::collection::btree_set(0i32..15, 1..5),
    ) {
        let update = batches(vec![instances(&first.iter().copied().filter(|o| *o < replicas).chain([0]).collect::<BTreeSet<_>>().into_iter().collect::<Vec<_>>())], Promotion::Auto, max_unavail);
        let mut world = World::settled(spec(replicas, "ocr:v7", update));
        for o in &broken {
            if let Some(p) = world.pods.get_mut(o).map(Arc::make_mut) {
                p.ready = false;
                p.containers[0].ready = false;
            }
        }
        for o in &out_of_service {
            if let Some(p) = world.pods.get_mut(o).map(Arc::make_mut) {
                p.in_service = Some(false);
                p.ready = false;
            }
        }
        world.set_template(template("ocr:v8", None));
        for _ in 0..6 {
            world.step();
        }
    }
}

#[test]
fn failing_http_check_fails_the_instance_at_the_deadline() {
    let mut world = ocr_world(batches(vec![instances(&[2, 5])], Promotion::Auto, 2));
    world.spec.update.health.progress_deadline_seconds = 15;
    world.check_failures.insert(5, "GET /healthz: 503".into());
    let v7 = world.update_revision().name;
    world.set_template(template("ocr:v8", None));
    world.run(8);
    assert_eq!(
        world.rollout_phase(),
        Some(RolloutPhase::Progressing),
        "waits while within the deadline"
    );
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Failed));
    assert_eq!(world.revision_of(5), Some(v7.clone()));
    assert_eq!(
        world.revision_of(2),
        Some(v7),
        "the whole batch rolled back"
    );
}

#[test]
fn metric_above_threshold_fails_the_batch() {
    let mut world = ocr_world(batches(
        vec![instances(&[1]), Batch::default()],
        Promotion::Auto,
        1,
    ));
    world.spec.update.health.prometheus = Some(crate::api::PrometheusCheck {
        address: "http://prom:9090".into(),
        query: "errors".into(),
        max_value: 0.1,
    });
    world.metric = MetricVerdict::Failed("query value 0.5 is above 0.1".into());
    let v7 = world.update_revision().name;
    world.set_template(template("ocr:v8", None));
    world.run(100);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Failed));
    assert_eq!(world.revision_of(1), Some(v7));
}

#[test]
fn metric_without_an_answer_holds_the_batch() {
    let mut world = ocr_world(batches(
        vec![instances(&[1]), Batch::default()],
        Promotion::Auto,
        1,
    ));
    world.spec.update.health.prometheus = Some(crate::api::PrometheusCheck {
        address: "http://prom:9090".into(),
        query: "errors".into(),
        max_value: 0.1,
    });
    world.metric = MetricVerdict::Unknown("connection refused".into());
    world.set_template(template("ocr:v8", None));
    world.run(30);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Progressing));
    assert!(
        world
            .status
            .rollout
            .as_ref()
            .is_some_and(|r| r.message.contains("connection refused"))
    );
    world.metric = MetricVerdict::Passed(0.0);
    world.run(100);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
}

#[test]
fn failure_pause_policy_stops_without_rolling_back() {
    let mut world = ocr_world(batches(vec![instances(&[3])], Promotion::Auto, 1));
    world.spec.update.health.progress_deadline_seconds = 10;
    world.spec.update.health.on_failure = FailurePolicy::Pause;
    world.broken_images.insert("ocr:v8".into());
    world.set_template(template("ocr:v8", None));
    world.run(100);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Failed));
    let v8 = world.update_revision().name;
    assert_eq!(
        world.revision_of(3),
        Some(v8),
        "left in place for a person to look at"
    );
}

fn template_with_sidecar(image: &str, sidecar: &str) -> PodTemplateSpec {
    let mut t = template(image, None);
    if let Some(spec) = t.spec.as_mut() {
        spec.containers.push(Container {
            name: "proxy".into(),
            image: Some(sidecar.into()),
            ..Container::default()
        });
    }
    t
}

fn on_revision(world: &World, revision: &str) -> usize {
    world
        .pods
        .values()
        .filter(|p| p.revision.as_deref() == Some(revision))
        .count()
}

#[test]
fn an_unreadable_record_keeps_the_instance_out_of_service_and_says_why() {
    let mut world = ocr_world(batches(vec![instances(&[3])], Promotion::Auto, 1));
    world.spec.update.health.progress_deadline_seconds = 600;
    world.set_template(template("ocr:v8", None));
    // Until instance 3 is patched, with its container not restarted yet.
    for _ in 0..20 {
        let plan = world.plan();
        for a in &plan.actions {
            world.apply(a);
        }
        world.record_status(&plan);
        world.now += 1;
        if !world.patches.is_empty() {
            break;
        }
    }
    assert_eq!(world.patches.len(), 1, "instance 3 was patched");
    let pod = Arc::make_mut(world.pods.get_mut(&3).expect("pod 3"));
    pod.record = None;
    pod.record_unreadable = Some("annotation apps.gantry.dev/in-place-update: EOF".into());
    let mut warnings = 0;
    for _ in 0..50 {
        let plan = world.step();
        assert!(
            !plan
                .actions
                .iter()
                .any(|a| matches!(a, Action::PutInService { ordinal: 3, .. })),
            "an instance whose restart cannot be confirmed is never put back in service"
        );
        assert!(plan.unreadable.contains(&3), "the plan names it: {plan:?}");
        warnings += plan
            .notes
            .iter()
            .filter(|n| n.reason == NoteReason::RecordUnreadable)
            .count();
        // What the status stage would write: Degraded with the reason, once reported.
        world.status.conditions = vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: crate::status::DEGRADED.into(),
            status: "True".into(),
            reason: NoteReason::RecordUnreadable.as_str().into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        }];
    }
    assert_eq!(world.pods[&3].in_service, Some(false));
    assert_eq!(warnings, 1, "one Warning, not one per reconcile");
}

#[test]
fn after_a_sidecar_bump_the_main_container_still_upgrades_in_place() {
    let mut world = World::settled(GrayAppSpec {
        template: template_with_sidecar("ocr:v7", "proxy:1"),
        ..spec(6, "ocr:v7", batches(Vec::new(), Promotion::Auto, 2))
    });
    world.set_template(template_with_sidecar("ocr:v7", "proxy:2"));
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    // maxRestarts is 0: the sidecar's restart for the first update must not count as a crash
    // in the second, nor the unchanged container's.
    world.set_template(template_with_sidecar("ocr:v8", "proxy:2"));
    let v8 = world.update_revision().name;
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    assert_eq!(on_revision(&world, &v8), 6);
    assert!(world.all_available());
    assert!(world.recreates.is_empty());
}

#[test]
fn another_spelling_of_the_same_image_restarts_nothing_and_counts_no_crash() {
    let mut world = ocr_world(batches(Vec::new(), Promotion::Auto, 3));
    world.set_template(template("docker.io/library/ocr:v7", None));
    let respelled = world.update_revision().name;
    world.run(200);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    assert_eq!(on_revision(&world, &respelled), 25);
    assert!(
        world
            .pods
            .values()
            .all(|p| p.containers[0].restart_count == 0),
        "the same image under another name is not a change to restart for"
    );
    world.set_template(template("docker.io/library/ocr:v8", None));
    let v8 = world.update_revision().name;
    world.run(300);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    assert_eq!(on_revision(&world, &v8), 25);
}

#[test]
fn scaling_down_mid_batch_converges_at_the_new_size() {
    let mut world = ocr_world(batches(vec![Batch::default()], Promotion::Auto, 5));
    world.set_template(template("ocr:v8", None));
    let v8 = world.update_revision().name;
    // Until instances near the cut are out of service.
    for _ in 0..40 {
        world.step();
        if (20..25).any(|o| {
            world
                .pods
                .get(&o)
                .is_some_and(|p| p.in_service == Some(false))
        }) {
            break;
        }
    }
    assert!(
        (20..25).any(|o| world
            .pods
            .get(&o)
            .is_some_and(|p| p.in_service == Some(false))),
        "an instance beyond the new size is mid-update"
    );
    world.spec.replicas = 20;
    world.run(300);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    assert_eq!(world.pods.len(), 20);
    assert_eq!(on_revision(&world, &v8), 20);
    assert!(world.all_available());
}

#[test]
fn a_revert_during_a_slow_restart_never_returns_to_the_abandoned_revision() {
    let mut world = ocr_world(batches(
        vec![instances(&[0]), Batch::default()],
        Promotion::Auto,
        1,
    ));
    world.spec.update.health.progress_deadline_seconds = 10;
    world.restart_delay.insert(0, 15);
    let v7 = world.update_revision().name;
    world.set_template(template("ocr:v8", None));
    let v8 = world.update_revision().name;
    // Until instance 0 is patched to v8 and its container stopped, not started again.
    for _ in 0..20 {
        world.step();
        if world.pods[&0].containers[0].started_at.is_none() {
            break;
        }
    }
    assert!(world.pods[&0].containers[0].started_at.is_none());
    assert_eq!(world.revision_of(0), Some(v8.clone()));
    // The user reverts; the slow kubelet then misses the batch's progress deadline.
    world.set_template(template("ocr:v7", None));
    world.run(300);
    assert_eq!(
        on_revision(&world, &v8),
        0,
        "no instance is left on the revision the template was reverted away from"
    );
    assert_eq!(on_revision(&world, &v7), 25);
    assert!(world.all_available());
}

#[test]
fn while_writes_fail_nobody_is_taken_out_and_waiting_instances_serve() {
    let mut world = ocr_world(batches(vec![instances(&[1, 2, 3])], Promotion::Auto, 3));
    world.spec.update.health.progress_deadline_seconds = 600;
    world.spec.update.grace_period_seconds = 30;
    world.set_template(template("ocr:v8", None));
    let v8 = world.update_revision().name;
    // The batch starts and its members go out of service; the patch itself then fails.
    world.step();
    world.step();
    let out = || {
        (1..4)
            .filter(|o| world.pods[o].in_service == Some(false))
            .count()
    };
    assert!(
        out() > 0,
        "members are out of service, waiting for their patch"
    );
    world.hold_writes = true;
    for _ in 0..10 {
        let plan = world.step();
        assert!(
            !plan.actions.iter().any(|a| matches!(
                a,
                Action::TakeOutOfService { .. } | Action::PatchInPlace { .. }
            )),
            "nothing new while writes fail: {:?}",
            plan.actions
        );
    }
    assert!(
        world.all_available(),
        "those waiting for the write serve again"
    );
    world.hold_writes = false;
    world.run(300);
    assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
    assert_eq!(on_revision(&world, &v8), 3);
}

/// A template among a few: images, one non-image change (a recreate), and a sidecar.
fn arb_template() -> impl Strategy<Value = PodTemplateSpec> {
    prop_oneof![
        Just(template("ocr:v7", None)),
        Just(template("ocr:v8", None)),
        Just(template("docker.io/library/ocr:v8", None)),
        Just(template("ocr:v9", None)),
        Just(template("ocr:v8", Some("--changed"))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After any sequence of template changes, arriving at any point of a rollout, with a
    /// kubelet that restarts each instance after its own delay and images that never become
    /// Ready, every instance ends on a revision the spec asks for: its template's, or the last
    /// completed rollout's where a rollout failed; and back in service unless broken.
    #[test]
    fn instances_end_on_a_revision_the_spec_asks_for(
        changes in proptest::collection::vec((arb_template(), 0usize..25), 1..4),
        delays in proptest::collection::btree_map(0i32..8, 0i64..30, 0..8),
        broken_v9 in any::<bool>(),
        deadline in 5i32..40,
    ) {
        let mut world = World::settled(spec(8, "ocr:v7", batches(
            vec![count(IntOrString::Int(2)), Batch::default()], Promotion::Auto, 2)));
        world.spec.update.health.progress_deadline_seconds = deadline;
        world.restart_delay = delays;
        if broken_v9 {
            world.broken_images.insert("ocr:v9".into());
        }
        for (template, steps) in changes {
            world.set_template(template);
            for _ in 0..steps {
                world.step();
            }
        }
        world.run(800);
        let update = world.update_revision().name;
        let stable = world.status.current_revision.clone();
        let phase = world.rollout_phase();
        prop_assert!(matches!(phase, Some(RolloutPhase::Completed | RolloutPhase::Failed)), "{phase:?}");
        for (o, pod) in &world.pods {
            let revision = pod.revision.as_deref();
            let wanted = revision == Some(update.as_str())
                || (phase == Some(RolloutPhase::Failed) && revision == stable.as_deref());
            prop_assert!(wanted, "instance {o} on {revision:?}; update {update}, stable {stable:?}, {phase:?}");
        }
        if !broken_v9 {
            prop_assert!(world.all_available());
        }
    }

    /// The operator dies at any point of a rollout: after writing status and only part of a
    /// plan's actions, or before writing anything. A fresh planner continues from status and
    /// pods alone, and no instance is patched twice.
    #[test]
    fn a_restart_at_any_point_never_patches_an_instance_twice(
        crash_at in 1usize..40,
        written in proptest::collection::vec(any::<bool>(), 32),
        status_written in any::<bool>(),
    ) {
        let mut world = ocr_world(batches(
            vec![count(IntOrString::Int(5)), Batch::default()], Promotion::Auto, 3));
        world.set_template(template("ocr:v8", None));
        let v8 = world.update_revision().name;
        for _ in 0..crash_at {
            world.step();
        }
        // The crash: the plan's status is written first, then only some of its actions.
        let plan = world.plan();
        if status_written {
            world.record_status(&plan);
            for (action, done) in plan.actions.iter().zip(written.iter().chain(std::iter::repeat(&false))) {
                if *done {
                    world.apply(action);
                }
            }
        }
        world.tick();
        world.run(400);
        prop_assert_eq!(world.rollout_phase(), Some(RolloutPhase::Completed));
        prop_assert_eq!(on_revision(&world, &v8), 25);
        let unique: BTreeSet<Ordinal> = world.patches.iter().map(|(o, _)| *o).collect();
        prop_assert_eq!(unique.len(), world.patches.len(), "patched twice: {:?}", world.patches);
    }
}
