//! Label selectors, one way for every operator: `kube::core::Selector` for matching and for
//! the string form (`app=ocr,track in (a,b)`) that the scale subresource's `labelSelector`
//! carries to an HPA and that list calls take, after the checks the API server makes of a
//! `LabelSelector` (kube's conversion alone accepts `In` without values).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

/// Why a `LabelSelector` is not a valid selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("matchExpressions[{index}]: operator {operator} needs at least one value")]
    NoValues { index: usize, operator: String },
    #[error("matchExpressions[{index}]: operator {operator} takes no values")]
    UnexpectedValues { index: usize, operator: String },
    #[error(
        "matchExpressions[{index}]: unknown operator {operator:?} (In, NotIn, Exists or DoesNotExist)"
    )]
    UnknownOperator { index: usize, operator: String },
    #[error("matchExpressions[{index}]: the key is empty")]
    EmptyKey { index: usize },
}

/// The selector a `LabelSelector` stands for, checked as the API server checks it.
pub fn parse(selector: &LabelSelector) -> Result<Selector, SelectorError> {
    for (index, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        let operator = requirement.operator.clone();
        let has_values = requirement.values.as_ref().is_some_and(|v| !v.is_empty());
        if requirement.key.is_empty() {
            return Err(SelectorError::EmptyKey { index });
        }
        match operator.as_str() {
            "In" | "NotIn" if !has_values => {
                return Err(SelectorError::NoValues { index, operator });
            }
            "Exists" | "DoesNotExist" if has_values => {
                return Err(SelectorError::UnexpectedValues { index, operator });
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            _ => return Err(SelectorError::UnknownOperator { index, operator }),
        }
    }
    Selector::try_from(selector.clone()).map_err(|_| SelectorError::UnknownOperator {
        index: 0,
        operator: String::new(),
    })
}

/// Whether `labels` satisfy `selector`: every label and every expression.
pub fn matches(selector: &Selector, labels: &BTreeMap<String, String>) -> bool {
    selector.matches(labels)
}

/// The string form of a selector, as list calls and the scale subresource take it.
pub fn to_query(selector: &Selector) -> String {
    selector.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use proptest::prelude::*;

    fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn selector(
        labels: &[(&str, &str)],
        expressions: Vec<LabelSelectorRequirement>,
    ) -> LabelSelector {
        LabelSelector {
            match_labels: (!labels.is_empty()).then(|| {
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            match_expressions: (!expressions.is_empty()).then_some(expressions),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_and_every_kind_of_expression_are_matched() {
        let parsed = parse(&selector(
            &[("app", "ocr")],
            vec![
                requirement("track", "In", &["a", "b"]),
                requirement("tier", "NotIn", &["test"]),
                requirement("gpu", "Exists", &[]),
                requirement("legacy", "DoesNotExist", &[]),
            ],
        ))
        .expect("valid");
        let fits = labels(&[("app", "ocr"), ("track", "b"), ("gpu", "2")]);
        assert!(matches(&parsed, &fits));
        for misfit in [
            labels(&[("app", "web"), ("track", "b"), ("gpu", "2")]),
            labels(&[("app", "ocr"), ("track", "c"), ("gpu", "2")]),
            labels(&[
                ("app", "ocr"),
                ("track", "b"),
                ("gpu", "2"),
                ("tier", "test"),
            ]),
            labels(&[("app", "ocr"), ("track", "b")]),
            labels(&[
                ("app", "ocr"),
                ("track", "b"),
                ("gpu", "2"),
                ("legacy", "y"),
            ]),
        ] {
            assert!(!matches(&parsed, &misfit), "{misfit:?}");
        }
    }

    #[test]
    fn the_string_form_carries_expressions_too() {
        let parsed = parse(&selector(
            &[("app", "ocr")],
            vec![
                requirement("track", "In", &["b", "a"]),
                requirement("legacy", "DoesNotExist", &[]),
            ],
        ))
        .expect("valid");
        assert_eq!(to_query(&parsed), "app=ocr,track in (a,b),!legacy");
        assert_eq!(
            to_query(&parse(&LabelSelector::default()).expect("valid")),
            ""
        );
    }

    #[test]
    fn invalid_selectors_are_clear_errors() {
        let cases = [
            (
                requirement("k", "In", &[]),
                "operator In needs at least one value",
            ),
            (
                requirement("k", "Exists", &["v"]),
                "operator Exists takes no values",
            ),
            (
                requirement("k", "Near", &["v"]),
                "unknown operator \"Near\"",
            ),
            (requirement("", "Exists", &[]), "the key is empty"),
        ];
        for (bad, message) in cases {
            let err = parse(&selector(&[], vec![requirement("ok", "Exists", &[]), bad]))
                .expect_err("invalid");
            assert!(
                err.to_string().starts_with("matchExpressions[1]: "),
                "{err}"
            );
            assert!(err.to_string().contains(message), "{err}");
        }
    }

    proptest! {
        /// Matching agrees with the selector's meaning, label by label.
        #[test]
        fn match_labels_alone_match_exactly_the_supersets(
            wanted in proptest::collection::btree_map("[a-c]", "[x-z]", 0..3),
            present in proptest::collection::btree_map("[a-d]", "[x-z]", 0..4),
        ) {
            let parsed = parse(&LabelSelector {
                match_labels: Some(wanted.clone()),
                match_expressions: None,
            }).expect("valid");
            let expected = wanted.iter().all(|(k, v)| present.get(k) == Some(v));
            prop_assert_eq!(matches(&parsed, &present), expected);
        }
    }
}
