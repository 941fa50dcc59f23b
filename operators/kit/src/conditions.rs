//! Status conditions that follow the Kubernetes API conventions and what kstatus (Flux, Argo CD,
//! `kubectl wait`) reads.
//!
//! Every Gantry resource carries the three summary conditions:
//! - `Ready`: the resource does what its spec asks (normal-true polarity);
//! - `Reconciling`: the controller is working towards the spec (abnormal-true);
//! - `Stalled`: the controller cannot make progress without a change from a person (abnormal-true);
//!
//! plus domain conditions of the operator's own. `lastTransitionTime` moves only when a
//! condition's status changes; a new reason or message alone keeps the old time.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The summary condition types every Gantry resource carries, in the order they are listed.
pub const READY: &str = "Ready";
/// See the module docs.
pub const RECONCILING: &str = "Reconciling";
/// See the module docs.
pub const STALLED: &str = "Stalled";

const SUMMARY_ORDER: [&str; 3] = [READY, RECONCILING, STALLED];

/// The API server rejects reasons longer than this.
const MAX_REASON_LEN: usize = 1024;
/// The API server rejects messages longer than this.
const MAX_MESSAGE_LEN: usize = 32 * 1024;

/// A condition's status, as the API spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }

    pub fn from_bool(value: bool) -> Self {
        if value { Status::True } else { Status::False }
    }
}

/// What a controller wants a condition to say now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: String,
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: impl Into<String>,
        status: Status,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Where a resource stands as a whole; sets `Ready`, `Reconciling` and `Stalled` consistently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Summary {
    /// The spec is fully realised.
    Ready { reason: String, message: String },
    /// Work towards the spec is under way.
    Reconciling { reason: String, message: String },
    /// No progress is possible until the spec (or the world) changes.
    Stalled { reason: String, message: String },
}

impl Summary {
    /// The three summary conditions this summary stands for.
    pub fn conditions(&self) -> [Desired; 3] {
        let (ready, reconciling, stalled, reason, message) = match self {
            Summary::Ready { reason, message } => (true, false, false, reason, message),
            Summary::Reconciling { reason, message } => (false, true, false, reason, message),
            Summary::Stalled { reason, message } => (false, false, true, reason, message),
        };
        [
            Desired::new(READY, Status::from_bool(ready), reason, message),
            Desired::new(RECONCILING, Status::from_bool(reconciling), reason, message),
            Desired::new(STALLED, Status::from_bool(stalled), reason, message),
        ]
    }
}

/// Makes `reason` acceptable to the API server: a CamelCase identifier of letters, digits,
/// `_`, `,` and `:` that starts with a letter and does not end in `,` or `:`.
pub fn sanitize_reason(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ',' | ':'))
        .take(MAX_REASON_LEN)
        .collect();
    while out.ends_with([',', ':']) {
        out.pop();
    }
    match out.chars().next() {
        Some(c) if c.is_ascii_alphabetic() => out,
        Some(_) => format!("R{}", &out[..out.len().min(MAX_REASON_LEN - 1)]),
        None => "Unspecified".to_string(),
    }
}

fn truncate_message(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_LEN {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE_LEN;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

/// Sets one condition. Returns whether anything the API stores changed, so callers can skip
/// a status write that would change nothing.
pub fn set(
    conditions: &mut Vec<Condition>,
    desired: &Desired,
    observed_generation: Option<i64>,
    now: &Time,
) -> bool {
    let reason = sanitize_reason(&desired.reason);
    let message = truncate_message(&desired.message);
    let status = desired.status.as_str();
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        let before = existing.clone();
        if existing.status != status {
            existing.status = status.to_string();
            existing.last_transition_time = now.clone();
        }
        existing.reason = reason;
        existing.message = message;
        existing.observed_generation = observed_generation;
        return *existing != before;
    }
    conditions.push(Condition {
        type_: desired.type_.clone(),
        status: status.to_string(),
        reason,
        message,
        observed_generation,
        last_transition_time: now.clone(),
    });
    sort(conditions);
    true
}

/// Sets the three summary conditions; returns whether anything changed.
pub fn set_summary(
    conditions: &mut Vec<Condition>,
    summary: &Summary,
    observed_generation: Option<i64>,
    now: &Time,
) -> bool {
    // Every condition must be set, so no short-circuiting `any`.
    let mut changed = false;
    for desired in &summary.conditions() {
        changed |= set(conditions, desired, observed_generation, now);
    }
    changed
}

/// Removes a condition; returns whether it was there.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

/// Finds a condition by type.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == Status::True.as_str())
}

/// Summary conditions first, in a fixed order; domain conditions after them, in the order
/// they were first set. A stable order keeps server-side apply from seeing spurious changes.
fn sort(conditions: &mut [Condition]) {
    conditions.sort_by_key(|c| {
        SUMMARY_ORDER
            .iter()
            .position(|t| *t == c.type_)
            .unwrap_or(SUMMARY_ORDER.len())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use proptest::prelude::*;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    fn desired(type_: &str, status: Status, reason: &str) -> Desired {
        Desired::new(
            type_,
            status,
            reason,
            format!("{type_} is {}", status.as_str()),
        )
    }

    #[test]
    fn new_condition_gets_now_as_transition_time() {
        let mut conds = Vec::new();
        assert!(set(
            &mut conds,
            &desired("Progressing", Status::True, "Started"),
            Some(3),
            &at(10)
        ));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(10));
        assert_eq!(conds[0].observed_generation, Some(3));
        assert_eq!(conds[0].status, "True");
    }

    #[test]
    fn same_status_keeps_transition_time_but_updates_reason() {
        let mut conds = Vec::new();
        set(
            &mut conds,
            &desired("Progressing", Status::True, "Started"),
            Some(1),
            &at(10),
        );
        let changed = set(
            &mut conds,
            &desired("Progressing", Status::True, "Batch2"),
            Some(1),
            &at(20),
        );
        assert!(changed, "a new reason is a change worth writing");
        assert_eq!(conds[0].last_transition_time, at(10));
        assert_eq!(conds[0].reason, "Batch2");
    }

    #[test]
    fn status_flip_moves_transition_time() {
        let mut conds = Vec::new();
        set(
            &mut conds,
            &desired(READY, Status::False, "Waiting"),
            Some(1),
            &at(10),
        );
        set(
            &mut conds,
            &desired(READY, Status::True, "Waiting"),
            Some(1),
            &at(25),
        );
        assert_eq!(conds[0].last_transition_time, at(25));
    }

    #[test]
    fn identical_set_reports_no_change() {
        let mut conds = Vec::new();
        let d = desired(READY, Status::True, "Done");
        set(&mut conds, &d, Some(2), &at(10));
        assert!(!set(&mut conds, &d, Some(2), &at(99)));
        assert_eq!(conds[0].last_transition_time, at(10));
    }

    #[test]
    fn new_generation_alone_is_a_change() {
        let mut conds = Vec::new();
        let d = desired(READY, Status::True, "Done");
        set(&mut conds, &d, Some(2), &at(10));
        assert!(set(&mut conds, &d, Some(3), &at(11)));
        assert_eq!(conds[0].last_transition_time, at(10));
    }

    #[test]
    fn summary_sets_three_conditions_consistently() {
        let mut conds = Vec::new();
        let stalled = Summary::Stalled {
            reason: "InvalidSpec".into(),
            message: "batch 2 names instance 40 of 25".into(),
        };
        set_summary(&mut conds, &stalled, Some(4), &at(1));
        let types: Vec<_> = conds.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, vec![READY, RECONCILING, STALLED]);
        assert!(!is_true(&conds, READY));
        assert!(!is_true(&conds, RECONCILING));
        assert!(is_true(&conds, STALLED));
        assert_eq!(
            get(&conds, READY).map(|c| c.reason.as_str()),
            Some("InvalidSpec")
        );

        let ready = Summary::Ready {
            reason: "Converged".into(),
            message: String::new(),
        };
        assert!(set_summary(&mut conds, &ready, Some(5), &at(2)));
        assert!(is_true(&conds, READY));
        assert!(!is_true(&conds, STALLED));
        // Reconciling stayed False throughout, so its transition time did not move.
        assert_eq!(
            get(&conds, RECONCILING).map(|c| c.last_transition_time.clone()),
            Some(at(1))
        );
        assert_eq!(
            get(&conds, STALLED).map(|c| c.last_transition_time.clone()),
            Some(at(2))
        );
    }

    #[test]
    fn summary_conditions_stay_ahead_of_domain_conditions() {
        let mut conds = Vec::new();
        set(
            &mut conds,
            &desired("Paused", Status::False, "Running"),
            None,
            &at(1),
        );
        set(
            &mut conds,
            &desired("Degraded", Status::False, "Healthy"),
            None,
            &at(1),
        );
        set_summary(
            &mut conds,
            &Summary::Reconciling {
                reason: "Progressing".into(),
                message: String::new(),
            },
            None,
            &at(1),
        );
        let types: Vec<_> = conds.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            vec![READY, RECONCILING, STALLED, "Paused", "Degraded"]
        );
    }

    #[test]
    fn remove_reports_presence() {
        let mut conds = Vec::new();
        set(
            &mut conds,
            &desired("Paused", Status::True, "UserPaused"),
            None,
            &at(1),
        );
        assert!(remove(&mut conds, "Paused"));
        assert!(!remove(&mut conds, "Paused"));
        assert!(conds.is_empty());
    }

    #[test]
    fn reasons_are_made_acceptable() {
        assert_eq!(sanitize_reason("BatchFailed"), "BatchFailed");
        assert_eq!(sanitize_reason("batch failed: 2/3"), "batchfailed:23");
        assert_eq!(sanitize_reason("3Retries"), "R3Retries");
        assert_eq!(sanitize_reason("Done,:"), "Done");
        assert_eq!(sanitize_reason("   "), "Unspecified");
        assert_eq!(sanitize_reason(""), "Unspecified");
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let cut = truncate_message(&long);
        assert!(cut.len() <= MAX_MESSAGE_LEN);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    fn reason_is_valid(reason: &str) -> bool {
        let bytes = reason.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REASON_LEN
            && bytes[0].is_ascii_alphabetic()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b',' | b':'))
            && !matches!(bytes[bytes.len() - 1], b',' | b':')
    }

    proptest! {
        #[test]
        fn any_reason_sanitizes_to_a_valid_one(reason in ".{0,1200}") {
            prop_assert!(reason_is_valid(&sanitize_reason(&reason)));
        }

        #[test]
        fn transition_time_moves_exactly_when_status_flips(
            steps in proptest::collection::vec((0u8..3, 0u8..3), 1..40)
        ) {
            let statuses = [Status::True, Status::False, Status::Unknown];
            let mut conds = Vec::new();
            let mut last_status: Option<Status> = None;
            let mut last_transition = None;
            for (i, (s, r)) in steps.into_iter().enumerate() {
                let status = statuses[s as usize];
                let now = at(i as i64 + 1);
                set(&mut conds, &desired(READY, status, &format!("R{r}")), None, &now);
                if last_status != Some(status) {
                    last_transition = Some(now);
                    last_status = Some(status);
                }
                prop_assert_eq!(conds.len(), 1);
                prop_assert_eq!(Some(&conds[0].last_transition_time), last_transition.as_ref());
            }
        }
    }
}
