//! What the operator remembers of each app between reconciles, in this process only: nothing
//! here is needed for correctness after a restart (status and pods carry that), only to write
//! less and to report things once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::model::WriteFailure;

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
}

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
