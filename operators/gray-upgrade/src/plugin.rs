//! The pure parts of `kubectl gantry`: reading instance lists and image flags, the tables it
//! prints, and how it words errors.

use std::collections::BTreeMap;

use crate::api::{GrayAppStatus, InstanceStatus};
use crate::model::Ordinal;

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

/// The per-instance table of `kubectl gantry status`.
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

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1");
    }
}
