//! Every event the operator writes and every outcome it counts, as enums: a new reason cannot
//! go without its phrase, its event type, or its place in the metrics.

use gantry_kit::events::{EventType, Reason};
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::plan::NoteReason;

/// One step taken on an instance, recorded on its pod and, grouped, on the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    Created,
    Removed,
    Recreating,
    Replaced,
    OutOfService,
    Updating,
    InService,
}

impl Step {
    /// How the app's event that groups the instances begins: "updating in place: ocr-2, ...".
    pub fn phrase(self) -> &'static str {
        match self {
            Step::Created => "created",
            Step::Removed => "removed (scaled down)",
            Step::Recreating => {
                "recreating under the same names (the change cannot happen in place)"
            }
            Step::Replaced => "replaced terminated pods",
            Step::OutOfService => "taken out of service for their update",
            Step::Updating => "updating in place",
            Step::InService => "back in service",
        }
    }

    /// Whether the step gets an event on the app: those that create or remove pods do; the
    /// steps of an in-place update are told by the batch's event, with their timings.
    pub fn has_event(self) -> bool {
        match self {
            Step::Created | Step::Removed | Step::Recreating | Step::Replaced => true,
            Step::OutOfService | Step::Updating | Step::InService => false,
        }
    }
}

impl Reason for Step {
    fn reason(self) -> &'static str {
        match self {
            Step::Created => "InstanceCreated",
            Step::Removed => "InstanceRemoved",
            Step::Recreating => "InstanceRecreating",
            Step::Replaced => "InstanceReplaced",
            Step::OutOfService => "InstanceOutOfService",
            Step::Updating => "InstanceUpdating",
            Step::InService => "InstanceInService",
        }
    }

    fn event_type(self) -> EventType {
        EventType::Normal
    }

    fn action(self) -> &'static str {
        "Upgrade"
    }
}

impl Reason for NoteReason {
    fn reason(self) -> &'static str {
        self.as_str()
    }

    fn event_type(self) -> EventType {
        if self.is_warning() {
            EventType::Warning
        } else {
            EventType::Normal
        }
    }

    fn action(self) -> &'static str {
        "Rollout"
    }
}

gantry_kit::reasons! {
    /// Something about the app itself, not one of its instances, that a person must look at.
    pub enum AppProblem {
        /// The app's spec cannot be acted on.
        InvalidSpec => Warning, "Validate";
        /// A write the API server refused: the app says which, and holds its rollout.
        WriteFailed => Warning, "Write";
        /// A stored ControllerRevision cannot be read as a pod template.
        RevisionUndecodable => Warning, "Read";
    }
}

/// How an instance's upgrade went, as `gantry_grayapp_upgrades_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpgradeOutcome {
    Started,
    Succeeded,
    Failed,
    RolledBack,
}

impl EncodeLabelValue for UpgradeOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            UpgradeOutcome::Started => "started",
            UpgradeOutcome::Succeeded => "succeeded",
            UpgradeOutcome::Failed => "failed",
            UpgradeOutcome::RolledBack => "rolled_back",
        })
    }
}

impl NoteReason {
    /// The outcome a note counts, if any.
    pub fn outcome(self) -> Option<UpgradeOutcome> {
        match self {
            NoteReason::InstanceFailed => Some(UpgradeOutcome::Failed),
            NoteReason::RolledBack => Some(UpgradeOutcome::RolledBack),
            _ => None,
        }
    }

    /// Whether the note marks the end of a batch, whose duration is measured.
    pub fn ends_batch(self) -> bool {
        matches!(
            self,
            NoteReason::BatchPromoted | NoteReason::RolloutCompleted | NoteReason::AwaitingApproval
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_camel_case_words() {
        let steps = [
            Step::Created,
            Step::Removed,
            Step::Recreating,
            Step::Replaced,
            Step::OutOfService,
            Step::Updating,
            Step::InService,
        ];
        let mut seen = std::collections::BTreeSet::new();
        for step in steps {
            let reason = step.reason();
            assert!(reason.starts_with("Instance") && reason.chars().all(char::is_alphanumeric));
            assert!(seen.insert(reason), "{reason} twice");
            assert!(!step.phrase().is_empty());
        }
        for problem in [
            AppProblem::InvalidSpec,
            AppProblem::WriteFailed,
            AppProblem::RevisionUndecodable,
        ] {
            assert_eq!(problem.event_type(), EventType::Warning);
            assert!(seen.insert(problem.reason()), "{problem:?} twice");
        }
    }

    #[test]
    fn warnings_and_outcomes_follow_the_reason() {
        assert_eq!(NoteReason::BatchFailed.event_type(), EventType::Warning);
        assert_eq!(NoteReason::BatchPromoted.event_type(), EventType::Normal);
        assert_eq!(
            NoteReason::InstanceFailed.outcome(),
            Some(UpgradeOutcome::Failed)
        );
        assert!(NoteReason::AwaitingApproval.ends_batch());
        assert!(!NoteReason::BatchStarted.ends_batch());
    }
}
