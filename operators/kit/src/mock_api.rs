//! A scripted stand-in for the API server, for unit tests of an operator's I/O layer: a
//! `kube::Client` whose every request is recorded (method, path and query, JSON body) and
//! answered by a function of the request. Tests then assert the sequence of requests: what
//! was written, in which order, with which preconditions.
//!
//! ```ignore
//! let (api, client) = MockApi::new(|request| match request.method.as_str() {
//!     "POST" => (409, mock_api::status(409, "AlreadyExists", "exists")),
//!     _ => (200, request.body.clone()),
//! });
//! ```

use std::sync::{Arc, Mutex, MutexGuard};

use http_body_util::BodyExt;
use serde_json::{Value, json};

/// One request the client sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    pub method: String,
    /// The path with its query, e.g. `/api/v1/namespaces/ns/pods/a-1/status?fieldManager=x`.
    pub path: String,
    /// The body as JSON (`Null` when empty or not JSON).
    pub body: Value,
}

impl Recorded {
    /// `METHOD /path` without the query, for asserting sequences.
    pub fn line(&self) -> String {
        let path = self
            .path
            .split_once('?')
            .map_or(self.path.as_str(), |(p, _)| p);
        format!("{} {path}", self.method)
    }

    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }
}

/// The recorder side of a mock client.
#[derive(Clone, Default)]
pub struct MockApi {
    requests: Arc<Mutex<Vec<Recorded>>>,
}

type Answer = dyn Fn(&Recorded) -> (u16, Value) + Send + Sync;

impl MockApi {
    /// A client whose requests `answer` answers with a status code and a JSON body.
    pub fn new(
        answer: impl Fn(&Recorded) -> (u16, Value) + Send + Sync + 'static,
    ) -> (Self, kube::Client) {
        let mock = MockApi::default();
        let requests = Arc::clone(&mock.requests);
        let answer: Arc<Answer> = Arc::new(answer);
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let requests = Arc::clone(&requests);
            let answer = Arc::clone(&answer);
            async move {
                let (parts, body) = request.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|collected| collected.to_bytes())
                    .unwrap_or_default();
                let recorded = Recorded {
                    method: parts.method.to_string(),
                    path: parts
                        .uri
                        .path_and_query()
                        .map_or_else(|| parts.uri.path().to_string(), ToString::to_string),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let (code, body) = answer(&recorded);
                lock(&requests).push(recorded);
                let body = kube::client::Body::from(serde_json::to_vec(&body).unwrap_or_default());
                http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(body)
            }
        });
        (mock, kube::Client::new(service, "default"))
    }

    /// Every request so far, in the order they arrived.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.requests).clone()
    }

    /// The writes so far, as `METHOD /path` lines.
    pub fn writes(&self) -> Vec<String> {
        lock(&self.requests)
            .iter()
            .filter(|r| r.is_write())
            .map(Recorded::line)
            .collect()
    }
}

fn lock(requests: &Mutex<Vec<Recorded>>) -> MutexGuard<'_, Vec<Recorded>> {
    requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A `Status` body, as the API server answers a refused request.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "message": message, "code": code
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Api;
    use kube::api::PostParams;

    #[tokio::test]
    async fn requests_are_recorded_and_answered_as_scripted() {
        let (mock, client) = MockApi::new(|request| match request.method.as_str() {
            "POST" => (
                409,
                status(409, "AlreadyExists", "configmaps \"a\" already exists"),
            ),
            _ => (404, status(404, "NotFound", "not found")),
        });
        let api: Api<ConfigMap> = Api::namespaced(client, "ns");
        let created = api
            .create(&PostParams::default(), &ConfigMap::default())
            .await;
        assert!(
            matches!(created, Err(kube::Error::Api(ref s)) if s.is_already_exists()),
            "{created:?}"
        );
        assert!(api.get("a").await.is_err());
        assert_eq!(
            mock.requests()
                .iter()
                .map(Recorded::line)
                .collect::<Vec<_>>(),
            vec![
                "POST /api/v1/namespaces/ns/configmaps",
                "GET /api/v1/namespaces/ns/configmaps/a"
            ]
        );
        assert_eq!(mock.writes().len(), 1);
        assert_eq!(mock.requests()[0].body["kind"], "ConfigMap");
    }
}
