//! Admission webhooks on the kit's HTTPS services: an `AdmissionReview` in, the handler's
//! `AdmissionResponse` out, on kube's admission types.
//!
//! ```ignore
//! let router = Router::new().route("/validate", admission::route("/validate", metrics, validate));
//! ```
//!
//! A body that is not an `AdmissionReview` gets `400` with what was wrong; the API server then
//! applies the webhook's `failurePolicy`. Every review is counted by route and outcome
//! (`Allowed`, `Denied`, `Malformed`).

use std::future::Future;

use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, post};
use kube::Resource;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde::de::DeserializeOwned;

use crate::metrics::{AdmissionMetrics, AdmissionOutcome};

/// A POST route for admission reviews of objects of type `K` (`DynamicObject` for any), each
/// answered by `handler`.
pub fn route<K, F, Fut>(name: &'static str, metrics: AdmissionMetrics, handler: F) -> MethodRouter
where
    K: Resource + DeserializeOwned + Clone + Send + Sync + 'static,
    F: Fn(AdmissionRequest<K>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = AdmissionResponse> + Send + 'static,
{
    post(move |body: Bytes| {
        let handler = handler.clone();
        let metrics = metrics.clone();
        async move {
            let request = match decode::<K>(&body) {
                Ok(request) => request,
                Err(why) => {
                    metrics.reviewed(name, AdmissionOutcome::Malformed);
                    tracing::warn!(route = name, error = %why, "malformed admission review");
                    return (StatusCode::BAD_REQUEST, why).into_response();
                }
            };
            let response = handler(request).await;
            let outcome = if response.allowed {
                AdmissionOutcome::Allowed
            } else {
                AdmissionOutcome::Denied
            };
            metrics.reviewed(name, outcome);
            json(&response.into_review())
        }
    })
}

fn decode<K>(body: &[u8]) -> Result<AdmissionRequest<K>, String>
where
    K: Resource + DeserializeOwned,
{
    let review: AdmissionReview<K> = serde_json::from_slice(body)
        .map_err(|err| format!("the body is not an AdmissionReview: {err}"))?;
    review
        .try_into()
        .map_err(|err| format!("the AdmissionReview has no request: {err}"))
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode the response: {err}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{https_request, self_signed_certificates, serve, test_runtime};
    use axum::Router;
    use kube::api::DynamicObject;
    use serde_json::json;
    use std::time::Duration;

    fn review(labels: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
                "resource": {"group": "", "version": "v1", "resource": "configmaps"},
                "operation": "CREATE",
                "userInfo": {"username": "alice"},
                "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": labels}},
                "dryRun": false,
            }
        }))
        .expect("encodes")
    }

    async fn deny_labelled(request: AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let deny = request
            .object
            .as_ref()
            .and_then(|o| o.metadata.labels.as_ref())
            .is_some_and(|l| l.contains_key("deny"));
        let response = AdmissionResponse::from(&request);
        if deny {
            response.deny("labelled deny")
        } else {
            response
        }
    }

    #[tokio::test]
    async fn reviews_are_answered_and_counted_and_garbage_is_refused() {
        let runtime = test_runtime();
        let (certificates, cert) = self_signed_certificates("hooks");
        let metrics = runtime.metrics().admission.clone();
        let router = Router::new().route("/validate", route("/validate", metrics, deny_labelled));
        let https = serve(
            &runtime,
            "hooks",
            router,
            certificates,
            Duration::from_secs(60),
        )
        .await;
        let call = |body: Vec<u8>| {
            let cert = cert.clone();
            async move {
                https_request(https.addr, "POST", "/validate", &cert, &body)
                    .await
                    .expect("answers")
            }
        };
        let (code, body) = call(review(json!({}))).await;
        assert_eq!(code, 200);
        let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(
            answer["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        let (_, body) = call(review(json!({"deny": "yes"}))).await;
        let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(answer["response"]["allowed"], false);
        assert_eq!(answer["response"]["status"]["message"], "labelled deny");
        let (code, body) = call(b"{not json".to_vec()).await;
        assert_eq!(code, 400);
        assert!(body.contains("not an AdmissionReview"), "{body}");

        let text = runtime.metrics().encode().expect("encodes");
        for outcome in ["Allowed", "Denied", "Malformed"] {
            assert!(
                text.contains(&format!(
                    r#"gantry_admission_reviews_total{{route="/validate",outcome="{outcome}"}} 1"#
                )),
                "{outcome}: {text}"
            );
        }
        runtime.shutdown_token().cancel();
        https.join().await;
    }
}
