//! What the operator remembers of each app between reconciles, in this process only: nothing
//! here is needed for correctness after a restart (status and pods carry that), only to write
//! less and to report things once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::model::{Expected, Instances, WriteFailure};

/// How long writes are held after the first failure; doubled on each failure that follows,
/// up to [`MAX_HOLD`], and forgotten after a success.
pub const FIRST_HOLD: Duration = Duration::from_secs(15);
pub const MAX_HOLD: Duration = Duration::from_secs(300);

#[derive(Default)]
struct AppMemory {
    last_status_write: Option<Instant>,
    failure: Option<Failing>,
    /// `name@resourceVersion` of revisions already reported as unreadable.
    undecodable: BTreeSet<String>,
    /// The revisions the app's instance gauge has series for.
    revision_series: BTreeSet<String>,
    /// Writes to pods (by UID) the watch may not have shown yet, with when they were made.
    expected: HashMap<String, Vec<(Expected, Instant)>>,
}

/// How long a write is assumed to be on its way before the watch is believed instead.
pub const EXPECTATION_TTL: Duration = Duration::from_secs(30);

struct Failing {
    failure: WriteFailure,
    since: Instant,
    hold: Duration,
}

/// Per app, by `namespace/name`.
#[derive(Default)]
pub struct Memory {
    apps: Mutex<HashMap<String, AppMemory>>,
}

impl Memory {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, AppMemory>> {
        // A panic elsewhere cannot leave this map half-updated in a way that matters.
        self.apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The failing write to hold for, while its hold lasts.
    pub fn holding_for(&self, key: &str, now: Instant) -> Option<WriteFailure> {
        let apps = self.lock();
        let failing = apps.get(key)?.failure.as_ref()?;
        (now < failing.since + failing.hold).then(|| failing.failure.clone())
    }

    /// Remembers a failed write; true when it is news (not the same failure again).
    pub fn failed(&self, key: &str, failure: WriteFailure, now: Instant) -> bool {
        let mut apps = self.lock();
        let app = apps.entry(key.to_string()).or_default();
        let (news, hold) = match &app.failure {
            Some(previous) => (
                !same_kind(&previous.failure, &failure),
                (previous.hold * 2).min(MAX_HOLD),
            ),
            None => (true, FIRST_HOLD),
        };
        app.failure = Some(Failing {
            failure,
            since: now,
            hold,
        });
        news
    }

    /// Forgets a failure once writes went through; true when there was one.
    pub fn succeeded(&self, key: &str) -> bool {
        let mut apps = self.lock();
        apps.get_mut(key)
            .and_then(|app| app.failure.take())
            .is_some()
    }

    /// Remembers writes to a pod until the watch shows them.
    pub fn expect(&self, key: &str, uid: &str, expected: Expected, now: Instant) {
        let mut apps = self.lock();
        let app = apps.entry(key.to_string()).or_default();
        app.expected
            .entry(uid.to_string())
            .or_default()
            .push((expected, now));
    }

    /// The pods as this process last wrote them, where the watch is behind; expectations the
    /// watch has caught up with, or that are older than [`EXPECTATION_TTL`], are dropped.
    pub fn overlay(&self, key: &str, pods: Instances, now: Instant) -> Instances {
        let mut apps = self.lock();
        let Some(app) = apps.get_mut(key) else {
            return pods;
        };
        if app.expected.is_empty() {
            return pods;
        }
        let mut pods = pods;
        let live: BTreeSet<&str> = pods.values().map(|p| p.uid.as_str()).collect();
        app.expected.retain(|uid, _| live.contains(uid.as_str()));
        for pod in pods.values_mut() {
            let Some(writes) = app.expected.get_mut(&pod.uid) else {
                continue;
            };
            let observed = std::sync::Arc::clone(pod);
            let mut view = None::<crate::model::PodView>;
            writes.retain(|(expected, at)| {
                let current = view.as_ref().unwrap_or(&observed);
                match current.behind(expected) {
                    Some(updated) if now < *at + EXPECTATION_TTL => {
                        view = Some(updated);
                        true
                    }
                    _ => false,
                }
            });
            if let Some(view) = view {
                *pod = std::sync::Arc::new(view);
            }
        }
        app.expected.retain(|_, writes| !writes.is_empty());
        pods
    }

    /// When status was last written, if it was by this process.
    pub fn last_status_write(&self, key: &str) -> Option<Instant> {
        self.lock().get(key)?.last_status_write
    }

    pub fn status_written(&self, key: &str, at: Instant) {
        self.lock()
            .entry(key.to_string())
            .or_default()
            .last_status_write = Some(at);
    }

    /// True the first time a revision at this resource version is reported unreadable.
    pub fn first_report_of_undecodable(&self, key: &str, name: &str, version: &str) -> bool {
        let mut apps = self.lock();
        let entry = apps.entry(key.to_string()).or_default();
        entry.undecodable.insert(format!("{name}@{version}"))
    }

    /// Records which revisions now have gauge series; returns those that no longer do.
    pub fn revision_series(&self, key: &str, now: BTreeSet<String>) -> BTreeSet<String> {
        let mut apps = self.lock();
        let app = apps.entry(key.to_string()).or_default();
        let gone = app.revision_series.difference(&now).cloned().collect();
        app.revision_series = now;
        gone
    }

    /// Forgets an app that was deleted; returns the revisions it had gauge series for.
    pub fn forget(&self, key: &str) -> BTreeSet<String> {
        self.lock()
            .remove(key)
            .map(|app| app.revision_series)
            .unwrap_or_default()
    }

    /// Forgets every app not in `present` (deleted while no event said so); returns their keys
    /// with the revisions they had series for.
    pub fn keep_only(&self, present: &BTreeSet<String>) -> Vec<(String, BTreeSet<String>)> {
        let mut apps = self.lock();
        let gone: Vec<String> = apps
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        gone.into_iter()
            .filter_map(|k| apps.remove(&k).map(|app| (k, app.revision_series)))
            .collect()
    }
}

/// The same failure for reporting: the same write refused the same way, whichever instance.
fn same_kind(a: &WriteFailure, b: &WriteFailure) -> bool {
    a.verb == b.verb && a.resource == b.resource && a.code == b.code
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Verb, Written};
    use std::collections::BTreeMap;

    fn forbidden(object: &str) -> WriteFailure {
        WriteFailure {
            verb: Verb::Patch,
            resource: Written::Pods,
            object: object.into(),
            code: Some(403),
            message: "forbidden".into(),
        }
    }

    #[test]
    fn a_failure_holds_writes_for_longer_each_time_until_one_succeeds() {
        let memory = Memory::default();
        let t0 = Instant::now();
        assert!(memory.failed("ns/a", forbidden("a-1"), t0), "news");
        assert!(memory.holding_for("ns/a", t0 + FIRST_HOLD / 2).is_some());
        assert!(memory.holding_for("ns/a", t0 + FIRST_HOLD).is_none());
        let t1 = t0 + FIRST_HOLD;
        assert!(
            !memory.failed("ns/a", forbidden("a-2"), t1),
            "the same failure again"
        );
        assert!(
            memory.holding_for("ns/a", t1 + FIRST_HOLD).is_some(),
            "held twice as long"
        );
        assert!(memory.holding_for("ns/b", t1).is_none(), "per app");
        assert!(memory.succeeded("ns/a"));
        assert!(memory.holding_for("ns/a", t1).is_none());
        assert!(!memory.succeeded("ns/a"));
    }

    #[test]
    fn a_pod_is_planned_as_written_until_the_watch_shows_the_write() {
        use crate::model::{InPlaceRecord, PodView};
        use std::sync::Arc;
        let memory = Memory::default();
        let t0 = Instant::now();
        let stale = PodView {
            uid: "u1".into(),
            revision: Some("r1".into()),
            in_service: Some(true),
            ..PodView::default()
        };
        let pods: Instances = [(0, Arc::new(stale.clone()))].into();
        let record = InPlaceRecord {
            revision: "r2".into(),
            ..InPlaceRecord::default()
        };
        memory.expect(
            "ns/a",
            "u1",
            Expected::Gate {
                in_service: false,
                since: 5,
            },
            t0,
        );
        memory.expect(
            "ns/a",
            "u1",
            Expected::Patched {
                revision: "r2".into(),
                record: record.clone(),
                images: BTreeMap::new(),
            },
            t0,
        );
        let seen = memory.overlay("ns/a", pods.clone(), t0);
        assert_eq!(seen[&0].revision.as_deref(), Some("r2"));
        assert_eq!(seen[&0].in_service, Some(false));
        assert_eq!(seen[&0].record.as_ref(), Some(&record));
        // The watch catches up: nothing is overlaid any more, and nothing is remembered.
        let caught_up = PodView {
            revision: Some("r2".into()),
            in_service: Some(false),
            record: Some(record),
            ..stale
        };
        let pods: Instances = [(0, Arc::new(caught_up.clone()))].into();
        assert_eq!(*memory.overlay("ns/a", pods.clone(), t0)[&0], caught_up);
        assert!(memory.lock()["ns/a"].expected.is_empty());
        // An expectation the watch never confirms is given up after its time.
        memory.expect(
            "ns/a",
            "u1",
            Expected::Gate {
                in_service: true,
                since: 9,
            },
            t0,
        );
        let later = memory.overlay("ns/a", pods, t0 + EXPECTATION_TTL);
        assert_eq!(later[&0].in_service, Some(false));
    }

    #[test]
    fn series_of_revisions_gone_and_of_deleted_apps_are_returned_for_removal() {
        let memory = Memory::default();
        let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        assert!(
            memory
                .revision_series("ns/a", set(&["r1", "r2"]))
                .is_empty()
        );
        assert_eq!(memory.revision_series("ns/a", set(&["r2"])), set(&["r1"]));
        memory.revision_series("ns/b", set(&["r9"]));
        assert_eq!(memory.forget("ns/a"), set(&["r2"]));
        let gone = memory.keep_only(&set(&[]));
        assert_eq!(gone, vec![("ns/b".to_string(), set(&["r9"]))]);
    }
}
