//! The published CRD follows the conventions, and its CEL rules reject bad plans with
//! specific messages (evaluated client-side with the same rules the API server runs, against
//! the very CRD `crds/gray-upgrade.yaml` holds).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::Validator;
use serde_json::{Value, json};

/// The CRD as published: what `make generate` wrote and the API server installs.
const PUBLISHED: &str = include_str!("../../../crds/gray-upgrade.yaml");

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
        gantry_kit::crd::to_yaml("gantry-gray-upgrade", &[crate::api::crd()]).expect("renders");
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

/// The messages of every rule the object breaks.
fn violations(object: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(), object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.to_string().lines().map(str::to_string).collect(),
    }
}

fn assert_rejected(object: &Value, message: &str) {
    let v = violations(object);
    assert!(
        v.iter().any(|m| m.contains(message)),
        "expected {message:?} among {v:#?}"
    );
}

#[test]
fn crd_follows_the_conventions() {
    assert_eq!(
        gantry_kit::crd::lint_with_embedded(&crate::api::crd(), crate::api::EMBEDDED),
        Vec::<String>::new()
    );
}

#[test]
fn crd_fits_client_side_apply() {
    // kubectl apply without --server-side stores the object in an annotation of at most 256 KiB.
    let json = serde_json::to_string(&crate::api::crd()).expect("serialises");
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
    let crd = crate::api::crd();
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
        &app(json!({"update": {"batches": [{"instances": [2, 40]}]}})),
        "a batch names an instance ordinal this app does not have",
    );
}

#[test]
fn removed_ordinal_is_rejected_but_the_replacement_range_is_accepted() {
    let removed = app(
        json!({"replicas": 24, "removeInstances": [7], "update": {"batches": [{"instances": [7]}]}}),
    );
    assert_rejected(
        &removed,
        "a batch names an instance ordinal this app does not have",
    );
    let shifted = app(
        json!({"replicas": 24, "removeInstances": [7], "update": {"batches": [{"instances": [24]}]}}),
    );
    assert_eq!(violations(&shifted), Vec::<String>::new());
}

#[test]
fn instance_in_two_batches_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"batches": [{"instances": [2, 5]}, {"instances": [5, 6]}]}})),
        "an instance is named in two batches",
    );
}

#[test]
fn instance_twice_in_one_batch_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"batches": [{"instances": [2, 2]}]}})),
        "a batch names an instance twice",
    );
}

#[test]
fn percentage_over_100_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"batches": [{"count": "150%"}]}})),
        "count must be a positive number or a percentage",
    );
    assert_rejected(
        &app(json!({"update": {"maxUnavailable": "101%"}})),
        "maxUnavailable must be at least 1",
    );
}

#[test]
fn zero_max_unavailable_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"maxUnavailable": 0}})),
        "maxUnavailable must be at least 1",
    );
    assert_rejected(
        &app(json!({"update": {"maxUnavailable": "0%"}})),
        "maxUnavailable must be at least 1",
    );
}

#[test]
fn batch_with_two_selections_is_rejected() {
    assert_rejected(
        &app(json!({"update": {"batches": [{"instances": [1], "count": 3}]}})),
        "a batch names instances, or a selector, or a count; not several",
    );
}

#[test]
fn instance_in_two_variants_is_rejected() {
    assert_rejected(
        &app(json!({"variants": [
            {"name": "v8", "instances": [2, 5], "images": {"ocr": "ocr:v8"}},
            {"name": "v9", "instances": [5], "images": {"ocr": "ocr:v9"}}
        ]})),
        "an instance belongs to two variants",
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
        "address must be an http:// or https:// URL",
    );
    // The schema's enum (enforced by the API server, not by this CEL-only check) limits the
    // scheme.
    let scheme = &schema()["properties"]["spec"]["properties"]["update"]["properties"]["health"]["properties"]
        ["httpGet"]["properties"]["scheme"];
    assert_eq!(scheme["enum"], json!(["HTTP", "HTTPS"]), "{scheme}");
}
