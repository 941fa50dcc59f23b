//! The published CRD follows the conventions, and its CEL rules reject bad plans with
//! specific messages (evaluated client-side with the same rules the API server runs, against
//! the very CRD `crds/gray-upgrade.yaml` holds).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::Validator;
use serde_json::{Value, json};

/// The CRD as published: what `make generate` wrote and the API server installs.
const PUBLISHED: &str = include_str!("../../../../crds/gray-upgrade.yaml");

fn published() -> CustomResourceDefinition {
    serde_yaml::from_str(PUBLISHED).expect("crds/gray-upgrade.yaml is a CRD")
}

fn schema() -> Value {
    let crd = published();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("serialises")
}

#[test]
fn the_published_crd_is_what_the_operator_renders() {
    // So the file cannot drift from the code, and the rules tested here are the ones installed.
    let rendered =
        gantry_kit::crd::to_yaml("gantry-gray-upgrade", &[crate::crd()]).expect("renders");
    assert!(
        rendered == PUBLISHED,
        "crds/gray-upgrade.yaml is stale: run `cargo xtask generate`"
    );
}

#[test]
fn the_rules_are_checked_against_the_published_schema() {
    // The published schema bounds the int-or-string fields (the derive's does not): the API
    // server estimates the cost of their rules from that bound.
    let update = &schema()["properties"]["spec"]["properties"]["update"]["properties"];
    assert_eq!(update["maxUnavailable"]["maxLength"], json!(6));
    assert_eq!(
        update["batches"]["items"]["properties"]["count"]["maxLength"],
        json!(6)
    );
}

fn app(spec_extra: Value) -> Value {
    let mut spec = json!({
        "replicas": 25,
        "selector": {"matchLabels": {"app": "ocr"}},
        "template": {
            "metadata": {"labels": {"app": "ocr"}},
            "spec": {"containers": [{"name": "ocr", "image": "ocr:v7"}]}
        }
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "apps.gantry.dev/v1alpha1",
        "kind": "GrayApp",
        "metadata": {"name": "ocr", "namespace": "default"},
        "spec": spec
    })
}

/// Every rule the object breaks, as `<field path>: <message>` the way the API server words
/// it (the path without kube-cel's leading dot for rules at the root). Each names a reason.
fn violations(object: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(), object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| {
                assert_eq!(e.reason.as_deref(), Some("FieldValueInvalid"), "{e}");
                format!("{}: {}", e.field_path.trim_start_matches('.'), e.message)
            })
            .collect(),
    }
}

/// The object breaks exactly this rule, at this path, with this message.
fn assert_rejected(object: &Value, expected: &str) {
    assert_eq!(violations(object), vec![expected.to_string()]);
}

/// Every `x-kubernetes-validations` rule in the schema, with the schema node it sits on.
fn rules(node: &Value, path: &str, out: &mut Vec<(String, Value, Value)>) {
    for rule in node["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push((path.to_string(), node.clone(), rule.clone()));
    }
    for (name, child) in node["properties"].as_object().into_iter().flatten() {
        rules(child, &format!("{path}.{name}"), out);
    }
    if node["items"].is_object() {
        rules(&node["items"], &format!("{path}[]"), out);
    }
}

#[test]
fn every_rule_names_its_field_and_the_offending_value() {
    let mut found = Vec::new();
    rules(&schema(), "", &mut found);
    assert!(found.len() >= 14, "{} rules", found.len());
    for (path, node, rule) in &found {
        assert!(
            rule["messageExpression"].is_string() && rule["reason"] == json!("FieldValueInvalid"),
            "{path}: {rule}"
        );
        // The API server refuses a fieldPath that names no property of the schema below
        // the rule (so metadata.name is declared in the published schema).
        if let Some(field_path) = rule["fieldPath"].as_str() {
            let mut at = node;
            for field in field_path.trim_start_matches('.').split('.') {
                at = &at["properties"][field];
                assert!(
                    at.is_object(),
                    "{path}: fieldPath {field_path} names no field"
                );
            }
        }
    }
    // Rules on the app or its spec as a whole would be reported at the object (`<nil>`) or
    // at spec: each says which field it is about.
    for (path, _, rule) in &found {
        if path.is_empty() || path == ".spec" || path == ".spec.update" {
            assert!(rule["fieldPath"].is_string(), "{path}: {rule}");
        }
    }
}

#[test]
fn crd_follows_the_conventions() {
    assert_eq!(
        gantry_kit::crd::lint_with_embedded(&crate::crd(), crate::EMBEDDED),
        Vec::<String>::new()
    );
}

#[test]
fn crd_fits_client_side_apply() {
    // kubectl apply without --server-side stores the object in an annotation of at most 256 KiB.
    let json = serde_json::to_string(&crate::crd()).expect("serialises");
    assert!(json.len() < 200 * 1024, "CRD is {} bytes", json.len());
}

#[test]
fn crd_has_scale_subresource_for_kubectl_scale_and_hpa() {
    let crd = published();
    let scale = crd.spec.versions[0]
        .subresources
        .as_ref()
        .and_then(|s| s.scale.as_ref())
        .expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.labelSelector")
    );
}

#[test]
fn kubectl_get_shows_the_images_instances_run() {
    let crd = crate::crd();
    let columns = crd.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .expect("printer columns");
    let images = columns
        .iter()
        .find(|c| c.name == "Images")
        .expect("an Images column");
    assert_eq!(images.json_path, ".status.images");
}

#[test]
fn the_ocr_plan_is_accepted() {
    let object = app(json!({"update": {
        "maxUnavailable": 3,
        "batches": [{"instances": [2, 5, 11]}, {"count": 10}, {}],
        "promotion": "Manual"
    }}));
    assert_eq!(violations(&object), Vec::<String>::new());
}

#[test]
fn unknown_ordinal_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"batches": [{"instances": [2]}, {"instances": [3, 40]}]}})),
        "spec.update.batches: instance 40 is not an ordinal of this app (0..24)",
    );
}

#[test]
fn removed_ordinal_is_rejected_but_the_replacement_range_is_accepted() {
    let removed = app(
        json!({"replicas": 24, "removeInstances": [7], "update": {"batches": [{"instances": [7]}]}}),
    );
    assert_rejected(
        &removed,
        "spec.update.batches: instance 7 is not an ordinal of this app (0..24 without removeInstances)",
    );
    let shifted = app(
        json!({"replicas": 24, "removeInstances": [7], "update": {"batches": [{"instances": [24]}]}}),
    );
    assert_eq!(violations(&shifted), Vec::<String>::new());
}

#[test]
fn an_ordinal_removed_twice_is_rejected() {
    assert_rejected(
        &app(json!({"replicas": 20, "removeInstances": [3, 9, 3]})),
        "spec.removeInstances: ordinal 3 is listed twice",
    );
}

#[test]
fn instance_in_two_batches_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"batches": [{"instances": [2, 5]}, {"instances": [6, 5]}]}})),
        "spec.update.batches: instance 5 is named in more than one batch",
    );
}

#[test]
fn instance_twice_in_one_batch_or_a_negative_one_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"batches": [{"instances": [1]}, {"instances": [2, 3, 2]}]}})),
        "spec.update.batches[1].instances: instance 2 is named twice",
    );
    assert_rejected(
        &app(json!({"update": {"batches": [{"instances": [4, -1]}]}})),
        "spec.update.batches[0].instances: instance ordinals are not negative: -1",
    );
}

#[test]
fn percentage_over_100_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"batches": [{"count": "150%"}]}})),
        "spec.update.batches[0].count: count must be a positive number or a percentage from 1% to 100%; got 150%",
    );
    assert_rejected(
        &app(json!({"update": {"maxUnavailable": "101%"}})),
        "spec.update.maxUnavailable: maxUnavailable must be at least 1 or a percentage from 1% to 100% (instances are upgraded in place, with no surge to keep capacity); got 101%",
    );
}

#[test]
fn zero_max_unavailable_is_rejected() {
    let expected = |got: &str| {
        format!(
            "spec.update.maxUnavailable: maxUnavailable must be at least 1 or a percentage from 1% to 100% (instances are upgraded in place, with no surge to keep capacity); got {got}"
        )
    };
    assert_rejected(
        &app(json!({"update": {"maxUnavailable": 0}})),
        &expected("0"),
    );
    assert_rejected(
        &app(json!({"update": {"maxUnavailable": "0%"}})),
        &expected("0%"),
    );
}

#[test]
fn batch_with_two_selections_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"batches": [{"instances": [1], "count": 3}]}})),
        "spec.update.batches[0]: a batch names instances, or a selector, or a count, not several; this one has instances and a count",
    );
}

#[test]
fn instance_in_two_variants_is_rejected() {
    assert_rejected(
        &app(json!({"variants": [
            {"name": "v8", "instances": [2, 5], "images": {"ocr": "ocr:v8"}},
            {"name": "v9", "instances": [5], "images": {"ocr": "ocr:v9"}}
        ]})),
        "spec.variants: instance 5 belongs to more than one variant",
    );
}

#[test]
fn a_variant_naming_no_instance_of_the_app_is_rejected() {
    assert_rejected(
        &app(json!({"variants": [
            {"name": "v8", "instances": [2], "images": {"ocr": "ocr:v8"}},
            {"name": "v9", "instances": [4, 30], "images": {"ocr": "ocr:v9"}}
        ]})),
        "spec.variants: variant v9: instance 30 is not an ordinal of this app (0..24)",
    );
    assert_rejected(
        &app(json!({"variants": [{"name": "v8", "instances": [-2], "images": {"ocr": "ocr:v8"}}]})),
        "spec.variants[0].instances: instance ordinals are not negative: -2",
    );
}

#[test]
fn a_name_too_long_for_its_pods_is_rejected() {
    let mut object = app(json!({}));
    object["metadata"]["name"] = json!("o".repeat(60));
    assert_rejected(
        &object,
        "metadata.name: the app name has 60 characters; at most 52 are allowed, so that pod names <app>-<ordinal> stay valid",
    );
}

#[test]
fn mixed_versions_are_accepted() {
    let object = app(json!({"variants": [
        {"name": "v8", "instances": [2, 5, 11], "images": {"ocr": "ocr:v8"}},
        {"name": "v9", "instances": [4], "images": {"ocr": "ocr:v9"}}
    ]}));
    assert_eq!(violations(&object), Vec::<String>::new());
}

#[test]
fn health_checks_take_http_and_https_only() {
    let health = |prometheus: &str, scheme: &str| {
        app(json!({"update": {"health": {
            "httpGet": {"path": "/healthz", "port": 8443, "scheme": scheme},
            "prometheus": {"address": prometheus, "query": "up", "maxValue": 1.0}
        }}}))
    };
    assert!(violations(&health("https://prometheus.monitoring:9091", "HTTPS")).is_empty());
    assert!(violations(&health("http://prometheus.monitoring:9090", "HTTP")).is_empty());
    assert_rejected(
        &health("ftp://prometheus", "HTTP"),
        r#"spec.update.health.prometheus.address: address must be an http:// or https:// URL; got "ftp://prometheus""#,
    );
    let mut relative = health("http://prometheus.monitoring:9090", "HTTP");
    relative["spec"]["update"]["health"]["httpGet"]["path"] = json!("healthz");
    assert_rejected(
        &relative,
        r#"spec.update.health.httpGet.path: path must start with /; got "healthz""#,
    );
    // The schema's enum (enforced by the API server, not by this CEL-only check) limits the
    // scheme.
    let scheme = &schema()["properties"]["spec"]["properties"]["update"]["properties"]["health"]["properties"]
        ["httpGet"]["properties"]["scheme"];
    assert_eq!(scheme["enum"], json!(["HTTP", "HTTPS"]), "{scheme}");
}
