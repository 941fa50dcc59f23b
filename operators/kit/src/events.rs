//! Kubernetes Events (events.k8s.io/v1) for every state change an operator makes.
//!
//! Publishing an event never fails a reconcile: an event that cannot be written is logged and
//! dropped, because the change it describes has already happened. Repeats of the same event are
//! folded into one with a count by the underlying recorder.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// Writes events on behalf of one operator replica.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    /// `controller` names the operator (`gantry-gray-upgrade`); `instance` the replica.
    pub fn new(client: kube::Client, controller: &str, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: controller.to_string(),
            instance,
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// A normal event: something happened as intended. `regarding` is usually
    /// `object.object_ref(&())`; `reason` is CamelCase, `action` what the operator did.
    pub async fn normal(
        &self,
        regarding: &ObjectReference,
        reason: &str,
        action: &str,
        note: impl Into<String>,
    ) {
        self.publish(
            EventType::Normal,
            regarding,
            None,
            reason,
            action,
            note.into(),
        )
        .await;
    }

    /// A warning: something needs a person's attention or did not go as intended.
    pub async fn warning(
        &self,
        regarding: &ObjectReference,
        reason: &str,
        action: &str,
        note: impl Into<String>,
    ) {
        self.publish(
            EventType::Warning,
            regarding,
            None,
            reason,
            action,
            note.into(),
        )
        .await;
    }

    /// An event about `regarding` that also concerns `related` (an app and one of its pods).
    pub async fn related(
        &self,
        type_: EventType,
        regarding: &ObjectReference,
        related: &ObjectReference,
        reason: &str,
        action: &str,
        note: impl Into<String>,
    ) {
        self.publish(
            type_,
            regarding,
            Some(related.clone()),
            reason,
            action,
            note.into(),
        )
        .await;
    }

    async fn publish(
        &self,
        type_: EventType,
        regarding: &ObjectReference,
        related: Option<ObjectReference>,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(truncate_note(note)),
            action: action.to_string(),
            secondary: related,
        };
        if let Err(err) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(
                reason,
                object = regarding.name.as_deref().unwrap_or_default(),
                error = %err,
                "could not record event"
            );
        }
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
}
