//! Stage three: each instance's next action, within the unavailability budget.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    Acted, Action, DeleteReason, MetadataChange, NoteReason, Planner, Sets, max_unavailable,
};
use crate::api::{RolloutStatus, UpdateMethod};
use crate::model::{ContainerBaseline, InPlaceRecord, Ordinal, PodView, Seconds, same_image};
use crate::revision::{Revision, in_place_compatible};

/// Instances that may still be made unavailable.
struct Budget {
    max: usize,
    unavailable: usize,
}

impl Budget {
    /// Takes a place for `pod` if it is available now; false when none is left.
    fn admit(&mut self, pod: &PodView) -> bool {
        if !pod.available() {
            return true;
        }
        if self.unavailable + 1 > self.max {
            return false;
        }
        self.unavailable += 1;
        true
    }
}

/// One instance's step.
enum Decision {
    Act(Action),
    /// Two actions, in this order: out of service, then patched, when there is no grace
    /// period to wait out between them.
    ActInOrder(Box<(Action, Action)>),
    /// The budget, a pause or failing writes keep it where it is for now.
    HeldBack,
    /// Its in-place record cannot be read: it stays out of service.
    Unreadable,
    Nothing,
}

impl<'a> Planner<'a> {
    /// Every instance's action: pods no longer wanted go, then batch members in the order the
    /// batch gives, then the rest.
    pub(super) fn instance_actions(
        &mut self,
        rollout: &RolloutStatus,
        failed: BTreeSet<Ordinal>,
    ) -> Acted {
        let input = self.input;
        let sets = Sets::new(rollout);
        let mut budget = Budget {
            max: max_unavailable(&input.spec.update.max_unavailable, self.desired.len()),
            unavailable: self
                .desired
                .iter()
                .filter(|o| !input.pods.get(o).is_some_and(|p| p.available()))
                .count(),
        };
        let mut acted = Acted {
            failed,
            ..Acted::default()
        };
        for (ordinal, pod) in input.pods {
            if !self.wanted.contains(ordinal) && !pod.deleting {
                acted.actions.push(Action::Delete {
                    ordinal: *ordinal,
                    uid: pod.uid.clone(),
                    reason: DeleteReason::ScaleDown,
                });
            }
        }
        let order = rollout
            .members
            .iter()
            .copied()
            .filter(|o| self.wanted.contains(o))
            .chain(
                self.desired
                    .iter()
                    .copied()
                    .filter(|o| !sets.members.contains(o)),
            );
        let mut compatible = BTreeMap::new();
        for ordinal in order.collect::<Vec<_>>() {
            let target = self.target(rollout, &sets, &acted.failed, ordinal);
            match self.decide(ordinal, target, &mut budget, &mut compatible) {
                Decision::Act(action) => acted.actions.push(action),
                Decision::ActInOrder(pair) => {
                    let (first, then) = *pair;
                    acted.actions.extend([first, then]);
                }
                Decision::HeldBack => acted.held_back += 1,
                Decision::Unreadable => {
                    acted.unreadable.insert(ordinal);
                }
                Decision::Nothing => {}
            }
        }
        self.report_unreadable(&acted.unreadable);
        acted
    }

    fn decide(
        &mut self,
        ordinal: Ordinal,
        target: String,
        budget: &mut Budget,
        compatible: &mut BTreeMap<(&'a str, &'a str), bool>,
    ) -> Decision {
        let input = self.input;
        let Some(pod) = input.pods.get(&ordinal) else {
            return Decision::Act(Action::Create {
                ordinal,
                revision: target,
            });
        };
        let uid = pod.uid.clone();
        if pod.deleting {
            return Decision::Nothing;
        }
        if pod.terminal {
            return Decision::Act(Action::Delete {
                ordinal,
                uid,
                reason: DeleteReason::Replace,
            });
        }
        if pod.revision.as_deref() == Some(target.as_str()) {
            return back_in_service(pod);
        }
        let Some((to_name, to)) = input.revisions.get_key_value(&target) else {
            self.note(
                NoteReason::RevisionMissing,
                format!("instance {ordinal} should run {target}, whose template is gone"),
            );
            return Decision::Nothing;
        };
        let in_place = self.in_place(pod, to_name, to, compatible);
        if pod.in_service != Some(false) {
            // The first step of a move makes the instance unavailable.
            if input.spec.update.paused || input.hold_writes || !budget.admit(pod) {
                return Decision::HeldBack;
            }
            if !in_place {
                return Decision::Act(Action::Delete {
                    ordinal,
                    uid,
                    reason: DeleteReason::Recreate,
                });
            }
            let out = Action::TakeOutOfService { ordinal, uid };
            if input.spec.update.grace_period_seconds > 0 {
                return Decision::Act(out);
            }
            let from = self.revision_of(pod);
            let patch = patch_in_place(pod, target, from, to, input.now);
            return Decision::ActInOrder(Box::new((out, patch)));
        }
        if input.hold_writes {
            // Out of service, waiting for a write that is failing: serve meanwhile.
            return match back_in_service(pod) {
                Decision::Nothing => Decision::HeldBack,
                other => other,
            };
        }
        if !in_place {
            return Decision::Act(Action::Delete {
                ordinal,
                uid,
                reason: DeleteReason::Recreate,
            });
        }
        let grace_ends = pod.in_service_since.unwrap_or(input.now)
            + Seconds::from(input.spec.update.grace_period_seconds);
        if input.now < grace_ends {
            self.requeue_in(grace_ends - input.now);
            return Decision::Nothing;
        }
        let from = self.revision_of(pod);
        Decision::Act(patch_in_place(pod, target, from, to, input.now))
    }

    fn revision_of(&self, pod: &PodView) -> Option<&'a Revision> {
        pod.revision
            .as_ref()
            .and_then(|r| self.input.revisions.get(r))
    }

    /// Whether the move from the pod's revision to `to` can happen in place. Comparing two
    /// templates is costly and the same few pairs recur for every instance.
    fn in_place(
        &self,
        pod: &PodView,
        to_name: &'a str,
        to: &Revision,
        compatible: &mut BTreeMap<(&'a str, &'a str), bool>,
    ) -> bool {
        let input = self.input;
        if input.spec.update.method != UpdateMethod::InPlaceIfPossible {
            return false;
        }
        let from = pod
            .revision
            .as_ref()
            .and_then(|r| input.revisions.get_key_value(r));
        from.is_some_and(|(from_name, from)| {
            *compatible
                .entry((from_name.as_str(), to_name))
                .or_insert_with(|| in_place_compatible(&from.template, &to.template))
        })
    }

    /// One Warning per episode: while the app's Degraded condition already says so, no more.
    fn report_unreadable(&mut self, unreadable: &BTreeSet<Ordinal>) {
        if unreadable.is_empty() {
            return;
        }
        let reported = self.input.status.conditions.iter().any(|c| {
            c.type_ == crate::status::DEGRADED && c.reason == NoteReason::RecordUnreadable.as_str()
        });
        if reported {
            return;
        }
        let why: Vec<String> = unreadable
            .iter()
            .filter_map(|o| {
                let pod = self.input.pods.get(o)?;
                Some(format!("{o} ({})", pod.record_unreadable.as_deref()?))
            })
            .collect();
        self.note(
            NoteReason::RecordUnreadable,
            format!(
                "instances kept out of service: their in-place update record cannot be read, so \
                 their restart cannot be confirmed; delete the pod to recreate it: {}",
                why.join(", ")
            ),
        );
    }
}

/// A pod on its target: back in service once its restart is confirmed and it is Ready.
fn back_in_service(pod: &PodView) -> Decision {
    if pod.in_service == Some(true) {
        return Decision::Nothing;
    }
    if pod.record_unreadable.is_some() {
        return Decision::Unreadable;
    }
    if pod.in_place_done() && pod.containers_ready() {
        return Decision::Act(Action::PutInService {
            ordinal: pod.ordinal,
            uid: pod.uid.clone(),
        });
    }
    Decision::Nothing
}

/// The in-place move of `pod` to `to`: the images that differ (compared as the runtime
/// resolves them), and a restart baseline for every container, so that only restarts after the
/// update count against it.
fn patch_in_place(
    pod: &PodView,
    revision: String,
    from: Option<&Revision>,
    to: &Revision,
    now: Seconds,
) -> Action {
    let wanted = to.images();
    let images: BTreeMap<String, String> = wanted
        .iter()
        .filter(|(name, image)| {
            pod.containers
                .iter()
                .any(|c| &c.name == *name && !same_image(&c.image, image))
        })
        .map(|(name, image)| (name.clone(), image.clone()))
        .collect();
    let containers = pod
        .containers
        .iter()
        .map(|c| {
            // Only a container that runs another image restarts: one patched back to the image
            // it still runs is left alone by the kubelet, and waiting for it would hang.
            let expect_restart = wanted.get(&c.name).is_some_and(|image| {
                c.running_image
                    .as_deref()
                    .is_none_or(|running| !same_image(running, image))
            });
            let baseline = ContainerBaseline {
                container_id: c.container_id.clone(),
                restart_count: c.restart_count,
                expect_restart,
                was_running: c.started_at.is_some(),
            };
            (c.name.clone(), baseline)
        })
        .collect();
    let record = InPlaceRecord {
        revision: revision.clone(),
        previous_revision: pod.revision.clone().unwrap_or_default(),
        patched_at: now,
        containers,
    };
    Action::PatchInPlace {
        ordinal: pod.ordinal,
        uid: pod.uid.clone(),
        revision,
        images,
        metadata: metadata_change(from, to),
        record,
    }
}

/// The target template's labels and annotations, and removals of those the pod's template
/// had that the target does not (others' labels on the pod are left alone).
fn metadata_change(from: Option<&Revision>, to: &Revision) -> MetadataChange {
    let of = |revision: Option<&Revision>| {
        let meta = revision.and_then(|r| r.template.metadata.as_ref());
        (
            meta.and_then(|m| m.labels.clone()).unwrap_or_default(),
            meta.and_then(|m| m.annotations.clone()).unwrap_or_default(),
        )
    };
    let (old_labels, old_annotations) = of(from);
    let (new_labels, new_annotations) = of(Some(to));
    let change = |old: BTreeMap<String, String>, new: BTreeMap<String, String>| {
        let removed = old
            .into_keys()
            .filter(|k| !new.contains_key(k))
            .map(|k| (k, None))
            .collect::<Vec<_>>();
        new.into_iter()
            .map(|(k, v)| (k, Some(v)))
            .chain(removed)
            .collect()
    };
    MetadataChange {
        labels: change(old_labels, new_labels),
        annotations: change(old_annotations, new_annotations),
    }
}
