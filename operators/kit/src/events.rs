//! Kubernetes Events (events.k8s.io/v1) for every state change an operator makes.
//!
//! Publishing an event never fails a reconcile: an event that cannot be written is logged and
//! dropped, because the change it describes has already happened.
//!
//! An event repeated within [`SERIES_WINDOW`] (same object, type, reason, action and note) is
//! folded into the first one as a series with a count, as the events API intends. To do that,
//! the writer remembers a fingerprint and the name of each recent event, about a hundred bytes
//! apiece, rather than the event itself: an operator that touches ten thousand pods keeps a
//! megabyte, not tens of them. The note is part of the fingerprint so that a count never sits
//! next to a note from an earlier, different occurrence.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// How long a repeat still joins an earlier event's series.
pub const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// How often fingerprints older than the window are swept out.
const SWEEP_EVERY: SignedDuration = SignedDuration::from_secs(60);

/// Why an event is written: each operator lists its reasons as an enum, so that every reason
/// has one spelling, one type and one action, and a new one cannot be left uncounted where the
/// operator counts them.
pub trait Reason: Copy {
    /// The event's `reason`, CamelCase (`InstanceUpdating`).
    fn reason(self) -> &'static str;
    /// Whether it reports something going as intended or something to look at.
    fn event_type(self) -> EventType;
    /// What the operator did or was doing (`Upgrade`, `Validate`).
    fn action(self) -> &'static str;
}

/// Declares an enum of event reasons whose `reason` is the variant's name, each with its type
/// and action:
///
/// ```
/// gantry_kit::reasons! {
///     /// What the probe records.
///     pub enum ProbeReason {
///         /// A probe was reconciled.
///         ProbeReady => Normal, "Reconcile";
///     }
/// }
/// # use gantry_kit::events::Reason as _;
/// assert_eq!(ProbeReason::ProbeReady.reason(), "ProbeReady");
/// ```
#[macro_export]
macro_rules! reasons {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$variant_meta:meta])* $variant:ident => $type:ident, $action:literal;)+
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $crate::events::Reason for $name {
            fn reason(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant),)+
                }
            }

            fn event_type(self) -> $crate::events::EventType {
                match self {
                    $($name::$variant => $crate::events::EventType::$type,)+
                }
            }

            fn action(self) -> &'static str {
                match self {
                    $($name::$variant => $action,)+
                }
            }
        }
    };
}

/// Whether an event reports something going as intended or something to look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Writes events on behalf of one operator replica. Cheap to clone; clones share the memory of
/// recent events.
#[derive(Clone)]
pub struct Events {
    client: kube::Client,
    controller: String,
    instance: String,
    recent: Arc<Mutex<Recent>>,
    sequence: Arc<AtomicU32>,
}

/// Recent events by fingerprint.
#[derive(Default)]
struct Recent {
    by_fingerprint: HashMap<u64, Written>,
    swept_at: Option<Timestamp>,
}

#[derive(Clone)]
struct Written {
    namespace: String,
    name: String,
    count: i32,
    last: Timestamp,
}

impl Recent {
    /// The earlier event `fingerprint` repeats, if it is recent enough to join.
    fn repeat_of(&mut self, fingerprint: u64, now: Timestamp) -> Option<Written> {
        if self
            .swept_at
            .is_none_or(|swept| now.duration_since(swept) >= SWEEP_EVERY)
        {
            self.by_fingerprint
                .retain(|_, w| now.duration_since(w.last) < SERIES_WINDOW);
            self.swept_at = Some(now);
        }
        self.by_fingerprint
            .get(&fingerprint)
            .filter(|w| now.duration_since(w.last) < SERIES_WINDOW)
            .cloned()
    }
}

fn fingerprint(
    type_: EventType,
    regarding: &ObjectReference,
    reason: &str,
    action: &str,
    note: &str,
) -> u64 {
    let mut hasher = DefaultHasher::new();
    type_.hash(&mut hasher);
    regarding.api_version.hash(&mut hasher);
    regarding.kind.hash(&mut hasher);
    regarding.namespace.hash(&mut hasher);
    regarding.name.hash(&mut hasher);
    regarding.uid.hash(&mut hasher);
    regarding.field_path.hash(&mut hasher);
    reason.hash(&mut hasher);
    action.hash(&mut hasher);
    note.hash(&mut hasher);
    hasher.finish()
}

impl Events {
    /// `controller` names the operator (`gantry-gray-upgrade`); `instance` the replica.
    pub fn new(client: kube::Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
            recent: Arc::default(),
            sequence: Arc::default(),
        }
    }

    /// Records `reason` about `regarding` (usually `object.object_ref(&())`), with a note for
    /// people. Never fails: an event that cannot be written is logged and dropped.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        reason: impl Reason,
        note: impl Into<String>,
    ) {
        let (type_, action) = (reason.event_type(), reason.action());
        let reason = reason.reason();
        let note = truncate_note(note.into());
        let now = Timestamp::now();
        let key = fingerprint(type_, regarding, reason, action, &note);
        let repeat = self.recent().repeat_of(key, now);
        let written = match repeat {
            Some(earlier) => match self.add_to_series(&earlier, now).await {
                Ok(()) => Ok(Written {
                    count: earlier.count + 1,
                    last: now,
                    ..earlier
                }),
                // Expired or deleted meanwhile: start afresh.
                Err(kube::Error::Api(status)) if status.is_not_found() => {
                    self.create(type_, regarding, reason, action, note, now)
                        .await
                }
                Err(err) => Err(err),
            },
            None => {
                self.create(type_, regarding, reason, action, note, now)
                    .await
            }
        };
        match written {
            Ok(written) => {
                self.recent().by_fingerprint.insert(key, written);
            }
            Err(err) => tracing::warn!(
                reason,
                object = regarding.name.as_deref().unwrap_or_default(),
                error = %err,
                "could not record event"
            ),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn create(
        &self,
        type_: EventType,
        regarding: &ObjectReference,
        reason: &str,
        action: &str,
        note: String,
        now: Timestamp,
    ) -> Result<Written, kube::Error> {
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        // Unique per replica: the time, plus a counter for events in the same nanosecond.
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}.{:x}{:04x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond(),
            sequence & 0xffff
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(type_.as_str().to_string()),
            reason: Some(reason.to_string()),
            action: Some(action.to_string()),
            note: Some(note),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await?;
        Ok(Written {
            namespace,
            name,
            count: 1,
            last: now,
        })
    }

    async fn add_to_series(&self, earlier: &Written, now: Timestamp) -> Result<(), kube::Error> {
        let series = json!({"series": {
            "count": earlier.count + 1,
            "lastObservedTime": MicroTime(now),
        }});
        Api::<Event>::namespaced(self.client.clone(), &earlier.namespace)
            .patch(
                &earlier.name,
                &PatchParams::default(),
                &Patch::Merge(series),
            )
            .await?;
        Ok(())
    }
}

/// The API server rejects notes over 1 kB.
fn truncate_note(mut note: String) -> String {
    const MAX: usize = 1024;
    if note.len() > MAX {
        let mut end = MAX - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_fit_the_api_limit() {
        assert_eq!(truncate_note("short".into()), "short");
        let long = truncate_note("ä".repeat(2000));
        assert!(long.len() <= 1024);
        assert!(long.ends_with("..."));
    }

    fn pod(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectReference::default()
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("valid")
    }

    fn written(name: &str, last: Timestamp) -> Written {
        Written {
            namespace: "ns".into(),
            name: name.into(),
            count: 1,
            last,
        }
    }

    #[test]
    fn fingerprints_tell_apart_everything_that_makes_an_event_different() {
        let base = fingerprint(EventType::Normal, &pod("a"), "R", "A", "note");
        assert_eq!(
            base,
            fingerprint(EventType::Normal, &pod("a"), "R", "A", "note")
        );
        for other in [
            fingerprint(EventType::Warning, &pod("a"), "R", "A", "note"),
            fingerprint(EventType::Normal, &pod("b"), "R", "A", "note"),
            fingerprint(EventType::Normal, &pod("a"), "S", "A", "note"),
            fingerprint(EventType::Normal, &pod("a"), "R", "B", "note"),
            fingerprint(EventType::Normal, &pod("a"), "R", "A", "other note"),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn a_repeat_joins_only_within_the_window() {
        let mut recent = Recent::default();
        recent.by_fingerprint.insert(1, written("e1", at(0)));
        assert_eq!(
            recent.repeat_of(1, at(10)).map(|w| w.name),
            Some("e1".into())
        );
        assert!(recent.repeat_of(2, at(10)).is_none(), "a different event");
        assert!(recent.repeat_of(1, at(6 * 60)).is_none(), "too late");
    }

    #[test]
    fn old_fingerprints_are_swept_out() {
        let mut recent = Recent::default();
        recent.by_fingerprint.insert(1, written("old", at(0)));
        recent.by_fingerprint.insert(2, written("fresh", at(400)));
        assert!(recent.repeat_of(3, at(30)).is_none());
        assert_eq!(recent.by_fingerprint.len(), 2, "nothing is old yet");
        assert!(recent.repeat_of(3, at(420)).is_none());
        assert_eq!(recent.by_fingerprint.len(), 1, "the old one is gone");
        assert!(recent.by_fingerprint.contains_key(&2));
    }
}
