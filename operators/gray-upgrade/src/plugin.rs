//! The pure parts of `kubectl gantry`: reading instance lists and image flags, the tables it
//! prints, and how it words errors.

use std::collections::BTreeMap;

use crate::api::{GrayAppStatus, InstanceStatus, RolloutPhase};
use crate::model::{Instances, Ordinal};
use crate::plan::{Input, preview};

/// Reads `2,5,11`, `ocr-2`, `0-4` (and mixes) into ordinals, in the order given, without
/// repeats.
pub fn parse_instances(app: &str, text: &str) -> Result<Vec<Ordinal>, String> {
    let mut out: Vec<Ordinal> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bare = part.strip_prefix(&format!("{app}-")).unwrap_or(part);
        let range = match bare.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a, part)?, number(b, part)?);
                if a > b {
                    return Err(format!("{part:?}: a range runs from low to high"));
                }
                (a..=b).collect::<Vec<_>>()
            }
            None => vec![number(bare, part)?],
        };
        for o in range {
            if !out.contains(&o) {
                out.push(o);
            }
        }
    }
    if out.is_empty() {
        return Err("no instances given".into());
    }
    Ok(out)
}

fn number(text: &str, part: &str) -> Result<Ordinal, String> {
    text.parse::<Ordinal>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| {
            format!("{part:?} is not an instance: use ordinals (2), names (ocr-2) or ranges (0-4)")
        })
}

/// Reads `--image container=image` flags.
pub fn parse_images(flags: &[String]) -> Result<BTreeMap<String, String>, String> {
    flags
        .iter()
        .map(|f| {
            f.split_once('=')
                .filter(|(c, i)| !c.is_empty() && !i.is_empty())
                .map(|(c, i)| (c.to_string(), i.to_string()))
                .ok_or_else(|| format!("--image {f:?}: expected CONTAINER=IMAGE"))
        })
        .collect()
}

/// An error and its causes on one line, each said once: a cause whose text its parent already
/// shows is left out, and a Kubernetes API error reads as the API server's message and code
/// (the client's own rendering of it repeats the message and dumps the whole response).
pub fn error_message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(kube::Error::Api(status)) = e.downcast_ref::<kube::Error>() {
            parts.push(api_status(status));
            break;
        }
        let text = e.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// An API server's answer as a person reads it: its message, then its code and reason.
pub fn api_status(status: &kube::core::Status) -> String {
    let code = match (status.code, status.reason.as_str()) {
        (0, "") => String::new(),
        (0, reason) => format!(" ({reason})"),
        (code, "") => format!(" ({code})"),
        (code, reason) => format!(" ({code} {reason})"),
    };
    if status.message.is_empty() {
        format!("the API server refused the request{code}")
    } else {
        format!("{}{code}", status.message)
    }
}

/// The GrayApp a command names does not exist.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("grayapp {app:?} not found in namespace {namespace:?}")]
pub struct AppNotFound {
    pub app: String,
    pub namespace: String,
}

/// Whether `err` says that the GrayApp `app` does not exist (rather than, say, that the API
/// server does not know GrayApps at all: that 404 names no object).
pub fn app_not_found(err: &kube::Error, app: &str, namespace: &str) -> Option<AppNotFound> {
    match err {
        kube::Error::Api(status)
            if status.is_not_found() && status.details.as_ref().is_some_and(|d| d.name == app) =>
        {
            Some(AppNotFound {
                app: app.to_string(),
                namespace: namespace.to_string(),
            })
        }
        _ => None,
    }
}

/// Left-aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(ToString::to_string).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

/// Where one batch of the rollout to the update revision stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchStage {
    /// It passed.
    Done,
    /// Its members are being updated, or it bakes.
    InProgress(RolloutPhase),
    /// It passed and waits for `kubectl gantry approve`.
    AwaitingApproval,
    /// It failed, or the rollout was aborted during it: `RollingBack`, `Failed` or `Aborted`.
    Stopped(RolloutPhase),
    /// It has not started.
    ToCome,
    /// It will not start: the rollout stopped at an earlier batch.
    WillNotRun,
}

/// Each batch of the plan with where it stands and its instances: those it moved or moves
/// when status knows them (the current batch), those it would move when it is still to come,
/// none for earlier batches.
pub fn batch_stages(input: &Input) -> Vec<(BatchStage, Vec<Ordinal>)> {
    let rollout = input
        .status
        .rollout
        .as_ref()
        .filter(|r| r.revision == input.update_revision);
    preview(input)
        .into_iter()
        .enumerate()
        .map(|(index, members)| {
            let Some(r) = rollout else {
                return (BatchStage::ToCome, members);
            };
            let current = usize::try_from(r.batch).unwrap_or(0);
            let stopped = matches!(
                r.phase,
                RolloutPhase::RollingBack | RolloutPhase::Failed | RolloutPhase::Aborted
            );
            let stage = match index.cmp(&current) {
                std::cmp::Ordering::Less => BatchStage::Done,
                std::cmp::Ordering::Greater if stopped => BatchStage::WillNotRun,
                std::cmp::Ordering::Greater => BatchStage::ToCome,
                std::cmp::Ordering::Equal => match r.phase {
                    RolloutPhase::Completed => BatchStage::Done,
                    RolloutPhase::AwaitingApproval => BatchStage::AwaitingApproval,
                    phase if stopped => BatchStage::Stopped(phase),
                    phase => BatchStage::InProgress(phase),
                },
            };
            (stage, members)
        })
        .collect()
}

/// The batch lines of `kubectl gantry plan`: each batch's stage and instances, with the node
/// each runs on (`ocr-2@gpu-node-1`).
pub fn plan_lines(app: &str, input: &Input) -> Vec<String> {
    let failed: &[Ordinal] = input
        .status
        .rollout
        .as_ref()
        .filter(|r| r.revision == input.update_revision)
        .map_or(&[], |r| r.failed.as_slice());
    batch_stages(input)
        .into_iter()
        .enumerate()
        .map(|(index, (stage, members))| {
            let stage_text = match stage {
                BatchStage::Done => "done".to_string(),
                BatchStage::InProgress(phase) => format!("in progress ({phase:?})"),
                BatchStage::AwaitingApproval => {
                    format!("passed, awaiting `kubectl gantry approve {app}`")
                }
                BatchStage::Stopped(RolloutPhase::RollingBack) => "failed, rolling back".into(),
                BatchStage::Stopped(phase) => format!("{phase:?}").to_lowercase(),
                BatchStage::ToCome => "to come".into(),
                BatchStage::WillNotRun => {
                    return format!("batch {}: will not run (the rollout stopped)", index + 1);
                }
            };
            let instances = match (stage, members.is_empty()) {
                (BatchStage::Done, true) => String::new(),
                (_, true) => ", no instance to move".into(),
                (_, false) => {
                    // Failures are the current batch's; a later batch starts afresh.
                    let failed = if stage == BatchStage::ToCome {
                        &[]
                    } else {
                        failed
                    };
                    format!(
                        ", {} instance(s): {}",
                        members.len(),
                        instance_list(app, &members, input.pods, failed)
                    )
                }
            };
            format!("batch {}: {stage_text}{instances}", index + 1)
        })
        .collect()
}

/// `ocr-2@node ocr-5@node (failed)`.
fn instance_list(app: &str, members: &[Ordinal], pods: &Instances, failed: &[Ordinal]) -> String {
    members
        .iter()
        .map(|o| {
            let node = pods.get(o).and_then(|p| p.node.as_deref()).unwrap_or("-");
            let mark = if failed.contains(o) { " (failed)" } else { "" };
            format!("{app}-{o}@{node}{mark}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `kubectl gantry status` prints below the rollout line: where every instance runs (each
/// revision with its images and ordinal ranges), then a row for each instance that is not
/// steady (not Running on the revision it should run), as status lists them.
pub fn status_report(app: &str, status: &GrayAppStatus) -> String {
    let revisions: Vec<Vec<String>> = status
        .revisions
        .iter()
        .map(|r| {
            let images = r
                .images
                .iter()
                .map(|(c, i)| format!("{c}={i}"))
                .collect::<Vec<_>>()
                .join(",");
            let role = if status.update_revision.as_deref() == Some(r.name.as_str()) {
                "template".to_string()
            } else {
                r.variant
                    .as_ref()
                    .map(|v| format!("variant {v}"))
                    .unwrap_or_default()
            };
            vec![
                r.name.clone(),
                images,
                r.count.to_string(),
                r.instances.clone(),
                role,
            ]
        })
        .collect();
    let mut out = vec![table(
        &["REVISION", "IMAGES", "COUNT", "INSTANCES", ""],
        &revisions,
    )];
    out.push(String::new());
    if status.instances.is_empty() {
        out.push("every instance is Running on the revision it should run".into());
    } else {
        out.push(status_table(status));
        if status.instances.len() >= crate::status::INSTANCE_TABLE_LIMIT {
            out.push(format!(
                "(status lists at most {} instances that are not steady; \
                 `kubectl get pods -l {}={app}` shows every one)",
                crate::status::INSTANCE_TABLE_LIMIT,
                crate::api::LABEL_APP
            ));
        }
    }
    out.join("\n")
}

/// The table of instances status lists (those not steady).
pub fn status_table(status: &GrayAppStatus) -> String {
    let rows: Vec<Vec<String>> = status
        .instances
        .iter()
        .map(|i: &InstanceStatus| {
            vec![
                i.name.clone(),
                i.revision.clone().unwrap_or_else(|| "-".into()),
                i.images.clone(),
                if i.ready { "yes".into() } else { "no".into() },
                i.state.clone(),
                i.node.clone().unwrap_or_else(|| "-".into()),
                i.last_transition_time
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "INSTANCE", "REVISION", "IMAGES", "READY", "STATE", "NODE", "SINCE",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_lists_accept_ordinals_names_and_ranges() {
        assert_eq!(parse_instances("ocr", "2,5,11"), Ok(vec![2, 5, 11]));
        assert_eq!(
            parse_instances("ocr", "ocr-11, ocr-2 ,5"),
            Ok(vec![11, 2, 5])
        );
        assert_eq!(
            parse_instances("ocr", "0-3,2,ocr-7-8"),
            Ok(vec![0, 1, 2, 3, 7, 8])
        );
        assert!(parse_instances("ocr", "web-2").is_err());
        assert!(parse_instances("ocr", "5-2").is_err());
        assert!(parse_instances("ocr", "").is_err());
        assert!(parse_instances("ocr", "-1").is_err());
    }

    #[test]
    fn image_flags() {
        assert_eq!(
            parse_images(&["ocr=ocr:v8".into()]),
            Ok([("ocr".to_string(), "ocr:v8".to_string())].into())
        );
        assert!(parse_images(&["ocr:v8".into()]).is_err());
        assert!(parse_images(&["=x".into()]).is_err());
    }

    fn not_found() -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            status: Some(kube::core::response::StatusSummary::Failure),
            code: 404,
            message: r#"grayapps.apps.gantry.dev "ocr" not found"#.into(),
            reason: "NotFound".into(),
            details: Some(kube::core::response::StatusDetails {
                name: "ocr".into(),
                group: "apps.gantry.dev".into(),
                kind: "grayapps".into(),
                uid: String::new(),
                causes: Vec::new(),
                retry_after_seconds: 0,
            }),
            metadata: None,
        }))
    }

    #[test]
    fn an_api_error_reads_once_with_its_code() {
        let err = anyhow::Error::new(not_found()).context("reading GrayApp ocr");
        // What `{:#}` printed: the client's text for the error, then its source's, repeating
        // the message three times.
        assert_eq!(format!("{err:#}").matches("not found").count(), 3);
        let message = error_message(err.as_ref());
        assert_eq!(
            message,
            r#"reading GrayApp ocr: grayapps.apps.gantry.dev "ocr" not found (404 NotFound)"#
        );
        assert_eq!(message.matches("not found").count(), 1, "{message}");
    }

    #[test]
    fn a_cause_its_parent_already_shows_is_left_out() {
        #[derive(Debug, thiserror::Error)]
        #[error("connecting: {0}")]
        struct Outer(#[source] std::io::Error);
        let err = anyhow::Error::new(Outer(std::io::Error::other("refused"))).context("step");
        assert_eq!(error_message(err.as_ref()), "step: connecting: refused");
    }

    #[test]
    fn a_missing_app_is_named_with_its_namespace() {
        let missing = app_not_found(&not_found(), "ocr", "default").expect("recognised");
        assert_eq!(
            missing.to_string(),
            r#"grayapp "ocr" not found in namespace "default""#
        );
        assert_eq!(app_not_found(&not_found(), "web", "default"), None);
        // The API server not knowing GrayApps at all is another error.
        let no_crd = kube::Error::Api(Box::new(kube::core::Status {
            code: 404,
            message: "the server could not find the requested resource".into(),
            reason: "NotFound".into(),
            ..kube::core::Status::default()
        }));
        assert_eq!(app_not_found(&no_crd, "ocr", "default"), None);
        assert_eq!(
            error_message(&no_crd),
            "the server could not find the requested resource (404 NotFound)"
        );
    }

    mod plans {
        use std::collections::BTreeMap;
        use std::sync::Arc;

        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use k8s_openapi::jiff::Timestamp;
        use serde_json::json;

        use super::super::plan_lines;
        use crate::api::{GrayAppSpec, GrayAppStatus, RevisionStatus, RolloutPhase, RolloutStatus};
        use crate::checks::MetricVerdict;
        use crate::model::{Instances, PodView};
        use crate::plan::Input;

        const NEW: &str = "ocr-new";
        const OLD: &str = "ocr-old";

        /// The OCR story's plan: 2, 5 and 11 first, then ten more, then the rest.
        fn spec() -> GrayAppSpec {
            serde_json::from_value(json!({
                "replicas": 25,
                "selector": {"matchLabels": {"app": "ocr"}},
                "template": {
                    "metadata": {"labels": {"app": "ocr"}},
                    "spec": {"containers": [{"name": "ocr", "image": "ocr:v8"}]}
                },
                "update": {"batches": [{"instances": [2, 5, 11]}, {"count": 10}, {}]}
            }))
            .expect("valid spec")
        }

        /// Status with the instances on `new` and `old` (ordinal ranges) and a rollout.
        fn status(new: &str, old: &str, rollout: Option<RolloutStatus>) -> GrayAppStatus {
            let revision = |name: &str, instances: &str| RevisionStatus {
                name: name.into(),
                instances: instances.into(),
                ..RevisionStatus::default()
            };
            GrayAppStatus {
                revisions: [(NEW, new), (OLD, old)]
                    .into_iter()
                    .filter(|(_, instances)| !instances.is_empty())
                    .map(|(name, instances)| revision(name, instances))
                    .collect(),
                current_revision: Some(OLD.into()),
                rollout,
                ..GrayAppStatus::default()
            }
        }

        fn rollout(
            phase: RolloutPhase,
            batch: i32,
            members: &[i32],
            failed: &[i32],
        ) -> RolloutStatus {
            RolloutStatus {
                phase,
                batch,
                batch_progress: format!("{}/3", batch + 1),
                members: members.to_vec(),
                failed: failed.to_vec(),
                batch_started_at: Some(Time(Timestamp::UNIX_EPOCH)),
                ..RolloutStatus::new(NEW, 3)
            }
        }

        fn lines(status: &GrayAppStatus) -> Vec<String> {
            let spec = spec();
            let pods: Instances = [(
                2,
                Arc::new(PodView {
                    ordinal: 2,
                    node: Some("gpu-1".into()),
                    ..PodView::default()
                }),
            )]
            .into();
            let input = Input {
                spec: &spec,
                approve: None,
                abort: None,
                status,
                pods: &pods,
                revisions: &BTreeMap::new(),
                update_revision: NEW,
                variant_revisions: &BTreeMap::new(),
                check_failures: &BTreeMap::new(),
                metric: &MetricVerdict::NotChecked,
                hold_writes: false,
                now: 0,
            };
            plan_lines("ocr", &input)
        }

        fn names(ordinals: impl IntoIterator<Item = i32>) -> String {
            ordinals
                .into_iter()
                .map(|o| format!("ocr-{o}@-"))
                .collect::<Vec<_>>()
                .join(" ")
        }

        #[test]
        fn a_completed_rollout_shows_every_batch_done() {
            let last: Vec<i32> = (13..25).collect();
            let status = status(
                "0-24",
                "",
                Some(rollout(RolloutPhase::Completed, 2, &last, &[])),
            );
            assert_eq!(
                lines(&status),
                vec![
                    "batch 1: done".to_string(),
                    "batch 2: done".to_string(),
                    format!("batch 3: done, 12 instance(s): {}", names(13..25)),
                ]
            );
        }

        #[test]
        fn batches_before_the_current_one_are_done_and_only_later_ones_to_come() {
            // Batch 2 moves ten instances; 4 failed its health gate and went back.
            let members = [0, 1, 3, 4, 6, 7, 8, 9, 10, 12];
            let status = status(
                "0-3,5-12",
                "4,13-24",
                Some(rollout(RolloutPhase::Progressing, 1, &members, &[4])),
            );
            let second = members
                .iter()
                .map(|o| format!("ocr-{o}@-{}", if *o == 4 { " (failed)" } else { "" }))
                .collect::<Vec<_>>()
                .join(" ");
            assert_eq!(
                lines(&status),
                vec![
                    "batch 1: done".to_string(),
                    format!("batch 2: in progress (Progressing), 10 instance(s): {second}"),
                    // The failed instance is outdated again: the last batch takes it too.
                    format!(
                        "batch 3: to come, 13 instance(s): {}",
                        names(std::iter::once(4).chain(13..25))
                    ),
                ]
            );
        }

        #[test]
        fn a_stopped_rollout_runs_no_later_batch() {
            let status = status(
                "",
                "0-24",
                Some(rollout(RolloutPhase::Failed, 0, &[2, 5, 11], &[5])),
            );
            assert_eq!(
                lines(&status),
                vec![
                    "batch 1: failed, 3 instance(s): ocr-2@gpu-1 ocr-5@- (failed) ocr-11@-",
                    "batch 2: will not run (the rollout stopped)",
                    "batch 3: will not run (the rollout stopped)",
                ]
            );
        }

        #[test]
        fn before_the_operator_starts_the_rollout_every_batch_is_to_come() {
            let status = status("", "0-24", None);
            let second = [0, 1, 3, 4, 6, 7, 8, 9, 10, 12];
            assert_eq!(
                lines(&status),
                vec![
                    "batch 1: to come, 3 instance(s): ocr-2@gpu-1 ocr-5@- ocr-11@-".to_string(),
                    format!("batch 2: to come, 10 instance(s): {}", names(second)),
                    format!("batch 3: to come, 12 instance(s): {}", names(13..25)),
                ]
            );
        }
    }

    #[test]
    fn status_shows_where_every_instance_runs_and_rows_only_for_those_not_steady() {
        use crate::api::{InstanceStatus, RevisionStatus};
        let revision = |name: &str, image: &str, count: i32, instances: &str| RevisionStatus {
            name: name.into(),
            variant: None,
            images: [("ocr".to_string(), image.to_string())].into(),
            count,
            instances: instances.into(),
        };
        let mut status = GrayAppStatus {
            update_revision: Some("ocr-b".into()),
            revisions: vec![
                revision("ocr-a", "ocr:v7", 22, "0-1,3-4,6-10,12-24"),
                revision("ocr-b", "ocr:v8", 3, "2,5,11"),
            ],
            ..GrayAppStatus::default()
        };
        assert_eq!(
            status_report("ocr", &status),
            [
                "REVISION  IMAGES      COUNT  INSTANCES           ",
                "ocr-a     ocr=ocr:v7  22     0-1,3-4,6-10,12-24",
                "ocr-b     ocr=ocr:v8  3      2,5,11              template",
                "",
                "every instance is Running on the revision it should run",
            ]
            .map(str::trim_end)
            .join("\n")
        );
        status.instances = vec![InstanceStatus {
            name: "ocr-5".into(),
            revision: Some("ocr-b".into()),
            images: "ocr=ocr:v8".into(),
            ready: false,
            state: "Updating".into(),
            node: Some("gpu-2".into()),
            last_transition_time: None,
        }];
        let report = status_report("ocr", &status);
        assert!(
            report.ends_with(
                "INSTANCE  REVISION  IMAGES      READY  STATE     NODE   SINCE\n\
                 ocr-5     ocr-b     ocr=ocr:v8  no     Updating  gpu-2"
            ),
            "{report}"
        );
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1");
    }
}
