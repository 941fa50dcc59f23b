//! HTTPS services that every replica runs: admission webhooks, scheduler extenders.
//!
//! [`Runtime::serve_https`] serves an axum `Router` over TLS (rustls, HTTP/1.1) with the
//! certificate [`Certificates`] holds at each handshake, so a rotated certificate is served
//! from the next connection on without a restart. The replica counts as ready once the service
//! listens with a certificate loaded. Every route is measured: requests by status class,
//! latency, and server errors; failed handshakes are counted per service. On shutdown the
//! service keeps answering for `--shutdown-delay-seconds` (while the replica reports unready),
//! then stops accepting and lets open requests finish. Every service also answers `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::certs::{self, Certificates};
use crate::error::KitError;
use crate::metrics::HttpMetrics;
use crate::runtime::Runtime;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open requests may take to finish once the service stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running HTTPS service.
pub struct Https {
    /// Where it listens (the port chosen when asked for port 0).
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Https {
    /// Waits until the service has stopped (after shutdown and the shutdown delay).
    pub async fn join(self) {
        if let Err(err) = self.task.await {
            tracing::warn!(error = %err, "HTTPS service task failed");
        }
    }
}

#[derive(Clone)]
struct Measured {
    server: &'static str,
    metrics: HttpMetrics,
}

async fn measure(
    State(measured): State<Measured>,
    route: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = route.map_or_else(|| "unmatched".to_string(), |r| r.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    measured.metrics.observe(
        measured.server,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

impl Runtime {
    /// Serves `router` over HTTPS on `addr` on this replica, presenting what `certificates`
    /// holds, until shutdown. Returns once it listens; [`Https::join`] waits for it to stop.
    pub async fn serve_https(
        &self,
        name: &'static str,
        addr: SocketAddr,
        router: Router,
        certificates: Certificates,
    ) -> Result<Https, KitError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| KitError::Bind {
                what: name,
                addr,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| KitError::Bind {
            what: name,
            addr,
            source,
        })?;
        let config = rustls::ServerConfig::builder_with_provider(certs::provider())
            .with_safe_default_protocol_versions()
            .map_err(KitError::Tls)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(certificates.clone()));
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let metrics = self.metrics().http.clone();
        // Every service answers `/healthz` too, for probes that speak TLS.
        let router = router.route("/healthz", axum::routing::get(|| async { "ok" }));
        let router = router.route_layer(middleware::from_fn_with_state(
            Measured {
                server: name,
                metrics: metrics.clone(),
            },
            measure,
        ));
        let check = self.readiness().check(format!("https {name}"));
        let runtime = self.clone();
        tracing::info!(service = name, address = %bound, "serving HTTPS");
        let task = tokio::spawn(async move {
            let announce = async {
                certificates.loaded().await;
                check.set(true);
                std::future::pending::<()>().await;
            };
            let graceful = GracefulShutdown::new();
            let accept = async {
                loop {
                    match listener.accept().await {
                        Ok((tcp, peer)) => tokio::spawn(connection(
                            name,
                            tcp,
                            peer,
                            acceptor.clone(),
                            router.clone(),
                            graceful.watcher(),
                            metrics.clone(),
                        )),
                        Err(err) => {
                            tracing::warn!(service = name, error = %err, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                }
            };
            tokio::select! {
                () = accept => {}
                () = announce => {}
                () = runtime.stop_serving() => {}
            }
            check.set(false);
            drop(listener);
            if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(service = name, "open requests did not finish in time");
            }
            tracing::info!(service = name, "stopped serving HTTPS");
        });
        Ok(Https { addr: bound, task })
    }
}

async fn connection(
    name: &'static str,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    watcher: hyper_util::server::graceful::Watcher,
    metrics: HttpMetrics,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::debug!(service = name, %peer, error = %err, "TLS handshake failed");
            metrics.handshake_failed(name);
            return;
        }
        Err(_) => {
            tracing::debug!(service = name, %peer, "TLS handshake timed out");
            metrics.handshake_failed(name);
            return;
        }
    };
    let service = TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service);
    if let Err(err) = watcher.watch(connection).await {
        tracing::debug!(service = name, %peer, error = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{https_get, test_runtime};
    use axum::routing::get;

    #[tokio::test]
    async fn serves_routes_over_tls_counts_them_and_follows_a_new_certificate() {
        let runtime = test_runtime();
        let certificates = Certificates::empty("test");
        let (cert_a, key_a) = crate::testing::self_signed(&["127.0.0.1"]);
        certificates
            .set(crate::certs::load_pem(cert_a.as_bytes(), key_a.as_bytes()).expect("loads"));
        let router = Router::new().route("/hello/{who}", get(|| async { "hi" }));
        let https = runtime
            .serve_https(
                "test",
                "127.0.0.1:0".parse().expect("addr"),
                router,
                certificates.clone(),
            )
            .await
            .expect("listens");
        let (code, body) = https_get(https.addr, "/hello/a", &cert_a)
            .await
            .expect("answers");
        assert_eq!((code, body.as_str()), (200, "hi"));
        assert_eq!(
            https_get(https.addr, "/nope", &cert_a)
                .await
                .expect("answers")
                .0,
            404
        );

        let (cert_b, key_b) = crate::testing::self_signed(&["127.0.0.1"]);
        certificates
            .set(crate::certs::load_pem(cert_b.as_bytes(), key_b.as_bytes()).expect("loads"));
        assert!(
            https_get(https.addr, "/hello/b", &cert_a).await.is_err(),
            "a client trusting only the old certificate is refused"
        );
        assert_eq!(
            https_get(https.addr, "/hello/b", &cert_b)
                .await
                .expect("answers")
                .0,
            200
        );

        let text = runtime.metrics().encode().expect("encodes");
        assert!(
            text.contains(
                r#"gantry_http_requests_total{server="test",route="/hello/{who}",code="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"gantry_https_handshake_errors_total{server="test"} 1"#),
            "{text}"
        );
        runtime.shutdown_token().cancel();
        https.join().await;
    }

    #[tokio::test]
    async fn ready_only_while_listening_with_a_certificate() {
        let runtime = test_runtime();
        let certificates = Certificates::empty("late");
        let https = runtime
            .serve_https(
                "late",
                "127.0.0.1:0".parse().expect("addr"),
                Router::new(),
                certificates.clone(),
            )
            .await
            .expect("listens");
        assert!(!runtime.readiness().is_ready(), "no certificate yet");
        let (cert, key) = crate::testing::self_signed(&["127.0.0.1"]);
        certificates.set(crate::certs::load_pem(cert.as_bytes(), key.as_bytes()).expect("loads"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !runtime.readiness().is_ready() && Instant::now() < deadline {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(runtime.readiness().is_ready());
        runtime.shutdown_token().cancel();
        https.join().await;
        assert!(!runtime.readiness().is_ready(), "stopped: nothing to serve");
    }
}
