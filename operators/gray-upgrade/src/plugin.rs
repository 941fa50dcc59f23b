//! The pure parts of `kubectl gantry`: reading instance lists and image flags, and the tables
//! it prints.

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

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1");
    }
}
