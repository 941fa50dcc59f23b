//! The kit's own errors, and the error policy every reconcile loop shares.

use std::net::SocketAddr;

/// Errors from the kit's plumbing.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("could not find Kubernetes credentials (in-cluster, KUBECONFIG, ~/.kube/config): {0}")]
    Kubeconfig(#[source] kube::config::InferConfigError),
    #[error("could not build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("could not listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} server failed: {source}")]
    Serve {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid log level {level:?}: {reason}")]
    LogLevel { level: String, reason: String },
    #[error("could not install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("could not serialise a CRD: {0}")]
    CrdYaml(#[from] serde_yaml::Error),
    #[error("could not start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("could not set up TLS: {0}")]
    Tls(#[source] rustls::Error),
    #[error("no serving certificate: {0}")]
    Certificates(#[from] crate::certs::CertError),
}

/// How a reconcile error should be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Likely to pass on retry (conflicts, timeouts, an API server restart): retry with backoff.
    Transient,
    /// Will fail the same way until the object changes (an invalid spec): report `Stalled` and
    /// wait for a change instead of retrying.
    Permanent,
}

/// What the kit needs to know about an operator's reconcile error.
pub trait ReconcileError: std::error::Error + Send + Sync + 'static {
    /// Whether retrying can help.
    fn class(&self) -> ErrorClass;
    /// A short, fixed label for the `reason` of the error metric. It must come from a small
    /// set (never a formatted message) so the metric's cardinality stays bounded.
    fn metric_reason(&self) -> &'static str;
}

/// An operator whose reconcile can fail only at the API may return kube's error itself.
impl ReconcileError for kube::Error {
    fn class(&self) -> ErrorClass {
        classify_kube_error(self)
    }

    fn metric_reason(&self) -> &'static str {
        kube_error_metric_reason(self)
    }
}

/// An operator whose reconcile cannot fail.
impl ReconcileError for std::convert::Infallible {
    fn class(&self) -> ErrorClass {
        match *self {}
    }

    fn metric_reason(&self) -> &'static str {
        match *self {}
    }
}

/// The class of an error returned by the API server or the client.
///
/// A rejected object (`422 Invalid`, `400 BadRequest`) will be rejected again until someone
/// changes it; everything else (conflicts, throttling, timeouts, connection failures, missing
/// permissions that an admin may grant) is worth retrying.
pub fn classify_kube_error(err: &kube::Error) -> ErrorClass {
    match err {
        kube::Error::Api(status) if status.is_invalid() || status.code == 400 => {
            ErrorClass::Permanent
        }
        _ => ErrorClass::Transient,
    }
}

/// A short metric label for a kube error, from the HTTP status code.
pub fn kube_error_metric_reason(err: &kube::Error) -> &'static str {
    match err {
        kube::Error::Api(status) => match status.code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            410 => "Gone",
            422 => "Invalid",
            429 => "TooManyRequests",
            500..=599 => "ServerError",
            _ => "ApiError",
        },
        kube::Error::Service(_) | kube::Error::HyperError(_) => "Connection",
        _ => "ClientError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api_error(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Status::failure("boom", reason).with_code(code).boxed())
    }

    #[test]
    fn invalid_objects_are_permanent() {
        assert_eq!(
            classify_kube_error(&api_error(422, "Invalid")),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify_kube_error(&api_error(400, "BadRequest")),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn everything_else_is_retried() {
        for (code, reason) in [
            (409, "Conflict"),
            (500, "InternalError"),
            (403, "Forbidden"),
            (429, "TooManyRequests"),
            (404, "NotFound"),
        ] {
            assert_eq!(
                classify_kube_error(&api_error(code, reason)),
                ErrorClass::Transient,
                "{code}"
            );
        }
    }

    #[test]
    fn metric_reasons_are_bounded_names() {
        assert_eq!(
            kube_error_metric_reason(&api_error(409, "Conflict")),
            "Conflict"
        );
        assert_eq!(
            kube_error_metric_reason(&api_error(503, "ServiceUnavailable")),
            "ServerError"
        );
        assert_eq!(
            kube_error_metric_reason(&api_error(418, "Teapot")),
            "ApiError"
        );
    }
}
