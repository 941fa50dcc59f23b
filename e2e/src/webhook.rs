//! An HTTPS server on 127.0.0.1 for tests that need the API server to call the host: admission
//! webhooks, scheduler extenders, conversion webhooks. It gets its own CA; hand
//! [`HttpsServer::ca_pem`] to the API server as the `caBundle`.

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::pki::Ca;

/// A request as the handler sees it.
#[derive(Debug)]
pub struct Request {
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    pub body: Bytes,
}

/// The handler's answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    /// 200 with a JSON body.
    pub fn json<T: serde::Serialize>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status: 200,
                content_type: "application/json",
                body,
            },
            Err(e) => Self {
                status: 500,
                content_type: "text/plain",
                body: e.to_string().into_bytes(),
            },
        }
    }
}

/// A running HTTPS server; stops when dropped.
pub struct HttpsServer {
    pub addr: SocketAddr,
    ca: Ca,
    task: tokio::task::JoinHandle<()>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl HttpsServer {
    /// Serves `handler` over HTTPS (HTTP/1.1) on a free port of 127.0.0.1, with a certificate
    /// for `127.0.0.1` and `localhost` issued by a fresh CA.
    pub async fn start<H, Fut>(handler: H) -> Result<Self>
    where
        H: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let ca = Ca::new("gantry-e2e-webhook-ca")?;
        let serving = ca.serving(
            "gantry-e2e-webhook",
            &["localhost"],
            &[Ipv4Addr::LOCALHOST.into()],
        )?;
        let certs = vec![
            CertificateDer::from_pem_slice(serving.cert_pem.as_bytes())
                .context("parsing certificate")?,
        ];
        let key =
            PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).context("parsing key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let handler = Arc::new(handler);
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let handler = handler.clone();
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: hyper::Request<Incoming>| {
                        let handler = handler.clone();
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async move {
                            let method = req.method().clone();
                            let path = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let body = match req.into_body().collect().await {
                                Ok(b) => b.to_bytes(),
                                Err(_) => Bytes::new(),
                            };
                            let response = handler(Request { method, path, body }).await;
                            let status = http::StatusCode::from_u16(response.status)
                                .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                            let builder = hyper::Response::builder()
                                .status(status)
                                .header("content-type", response.content_type);
                            Ok::<_, Infallible>(
                                builder
                                    .body(Full::new(Bytes::from(response.body)))
                                    .unwrap_or_else(|_| {
                                        hyper::Response::new(Full::new(Bytes::new()))
                                    }),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            ca,
            task,
            requests,
        })
    }

    /// How many requests the server has been sent so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The CA certificate (PEM) that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// `https://127.0.0.1:<port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the API server sends a webhook's reviews.
pub enum Target<'a> {
    /// A URL on the host, with the CA that signed its certificate.
    Url { url: String, ca_pem: &'a str },
    /// A URL on the host whose `caBundle` the operator serving it keeps current (its managed
    /// certificate authority).
    Managed { url: String },
}

/// A ValidatingWebhookConfiguration that sends the test namespace's requests matching its rules
/// to its webhooks, deleted when dropped. `failurePolicy: Fail`, five-second timeout.
pub struct Registration {
    pub name: String,
    kubeconfig: std::path::PathBuf,
}

impl Registration {
    /// Registers `webhooks` (each a DNS-style name, e.g. `check.e2e.gantry.dev`, and where to
    /// send its reviews) as the ValidatingWebhookConfiguration `name`, for requests in
    /// `namespace` matching `rules` (the API's rule objects).
    pub async fn validating(
        cluster: &crate::cluster::Cluster,
        client: &kube::Client,
        name: &str,
        webhooks: Vec<(&str, Target<'_>)>,
        namespace: &str,
        rules: serde_json::Value,
    ) -> Result<Self> {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        let webhooks: Vec<serde_json::Value> = webhooks
            .into_iter()
            .map(|(webhook, target)| {
                let client_config = match target {
                    Target::Url { url, ca_pem } => serde_json::json!({
                        "url": url,
                        "caBundle": k8s_openapi::ByteString(ca_pem.as_bytes().to_vec()),
                    }),
                    Target::Managed { url } => serde_json::json!({ "url": url }),
                };
                serde_json::json!({
                    "name": webhook,
                    "clientConfig": client_config,
                    "rules": rules,
                    "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": namespace } },
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 5,
                })
            })
            .collect();
        let config: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "webhooks": webhooks,
        }))?;
        kube::Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .create(&kube::api::PostParams::default(), &config)
            .await
            .with_context(|| format!("registering webhook configuration {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            kubeconfig: cluster.kubeconfig().to_owned(),
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        crate::cluster::delete_on_the_side(
            &self.kubeconfig,
            &self.name,
            kube::Api::<ValidatingWebhookConfiguration>::all,
            kube::api::DeleteParams::default(),
        );
    }
}
