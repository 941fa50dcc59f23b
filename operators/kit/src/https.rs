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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use clap::Args;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::certs::{self, Certificates, TlsArgs, parse_duration};
use crate::error::KitError;
use crate::metrics::HttpMetrics;
use crate::runtime::Runtime;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open requests may take to finish once the service stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an aged connection may stay idle before it is closed (clients' own idle timeouts
/// are shorter: Go's is 90 s, and the API server reconnects at once when it needs to).
const IDLE_AFTER_AGE: Duration = Duration::from_secs(120);

/// An HTTPS service's flags: where its certificate comes from, and how long a client may keep
/// one connection. Flatten into an operator's own flags.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct HttpsArgs {
    #[command(flatten)]
    pub tls: TlsArgs,
    /// A client connection this old gets `Connection: close` with its next answer, so that
    /// clients reconnect: they meet a rotated certificate, and new replicas get their share,
    /// soon (Go duration).
    #[arg(long, env = "GANTRY_HTTPS_MAX_CONNECTION_AGE", default_value = "60s", value_parser = parse_duration)]
    pub https_max_connection_age: Duration,
}

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
    /// Serves `router` over HTTPS on `addr` on this replica, with certificates as `args` says
    /// ([`Runtime::certificates`]), until shutdown. Returns once it listens; [`Https::join`]
    /// waits for it to stop.
    pub async fn serve_https(
        &self,
        name: &'static str,
        addr: SocketAddr,
        router: Router,
        args: &HttpsArgs,
    ) -> Result<Https, KitError> {
        let certificates = self.certificates(name, &args.tls)?;
        self.serve_https_with(
            name,
            addr,
            router,
            certificates,
            args.https_max_connection_age,
        )
        .await
    }

    /// [`Runtime::serve_https`] presenting what `certificates` holds (kept current elsewhere).
    pub async fn serve_https_with(
        &self,
        name: &'static str,
        addr: SocketAddr,
        router: Router,
        certificates: Certificates,
        max_connection_age: Duration,
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
        // `layer`, not `route_layer`: requests no route matches are counted too, as one label.
        let router = router.layer(middleware::from_fn_with_state(
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
            let closing = CancellationToken::new();
            let mut connections = JoinSet::new();
            let accept = async {
                loop {
                    match listener.accept().await {
                        Ok((tcp, peer)) => {
                            connections.spawn(connection(
                                name,
                                tcp,
                                peer,
                                Connection {
                                    acceptor: acceptor.clone(),
                                    router: router.clone(),
                                    metrics: metrics.clone(),
                                    max_age: max_connection_age,
                                    closing: closing.clone(),
                                },
                            ));
                            // Forget connections that are done, so the set stays small.
                            while connections.try_join_next().is_some() {}
                        }
                        Err(err) => {
                            tracing::warn!(service = name, error = %err, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            };
            tokio::select! {
                () = accept => {}
                () = announce => {}
                () = runtime.stop_serving() => {}
            }
            check.set(false);
            drop(listener);
            closing.cancel();
            let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                while connections.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(service = name, "open requests did not finish in time");
            }
            tracing::info!(service = name, "stopped serving HTTPS");
        });
        Ok(Https { addr: bound, task })
    }
}

/// What each connection needs.
struct Connection {
    acceptor: TlsAcceptor,
    router: Router,
    metrics: HttpMetrics,
    max_age: Duration,
    /// Cancelled when the service stops: finish the request in flight, then close.
    closing: CancellationToken,
}

async fn connection(
    name: &'static str,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    with: Connection,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, with.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::debug!(service = name, %peer, error = %err, "TLS handshake failed");
            with.metrics.handshake_failed(name);
            return;
        }
        Err(_) => {
            tracing::debug!(service = name, %peer, "TLS handshake timed out");
            with.metrics.handshake_failed(name);
            return;
        }
    };
    // Past its maximum age, a connection answers its next request with `Connection: close`,
    // so the client reconnects without a request ever meeting a closed socket (closing an
    // idle connection races with a client writing its next request on it).
    let aged = Arc::new(AtomicBool::new(false));
    let service = {
        let aged = Arc::clone(&aged);
        tower::ServiceExt::<hyper::Request<hyper::body::Incoming>>::map_response(
            with.router,
            move |mut response: Response| {
                if aged.load(Ordering::SeqCst) {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            },
        )
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = async {
            tokio::time::sleep(with.max_age).await;
            aged.store(true, Ordering::SeqCst);
            // A client that stays idle that long after is not coming back.
            tokio::time::sleep(with.max_age.max(IDLE_AFTER_AGE)).await;
        } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = with.closing.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = served {
        tracing::debug!(service = name, %peer, error = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        connect, https_get, renew_self_signed, self_signed_certificates, serve, test_runtime,
    };
    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const LONG: Duration = Duration::from_secs(60);

    async fn stop(runtime: &crate::Runtime, https: Https) {
        runtime.shutdown_token().cancel();
        https.join().await;
    }

    #[tokio::test]
    async fn serves_routes_over_tls_counts_them_and_follows_a_new_certificate() {
        let runtime = test_runtime();
        let (certificates, cert_a) = self_signed_certificates("test");
        let router = Router::new().route("/hello/{who}", get(|| async { "hi" }));
        let https = serve(&runtime, "test", router, certificates.clone(), LONG).await;
        let get_with = async |path: &str, trusted: &str| https_get(https.addr, path, trusted).await;
        assert_eq!(
            get_with("/hello/a", &cert_a).await,
            Ok((200, "hi".to_string()))
        );
        assert_eq!(get_with("/nope", &cert_a).await.map(|r| r.0), Ok(404));

        let cert_b = renew_self_signed(&certificates);
        assert!(
            get_with("/hello/b", &cert_a).await.is_err(),
            "a client trusting only the old certificate is refused"
        );
        assert_eq!(get_with("/hello/b", &cert_b).await.map(|r| r.0), Ok(200));

        let text = runtime.metrics().encode().expect("encodes");
        assert!(
            text.contains(
                r#"gantry_http_requests_total{server="test",route="/hello/{who}",code="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"gantry_http_requests_total{server="test",route="unmatched",code="4xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"gantry_https_handshake_errors_total{server="test"} 1"#),
            "{text}"
        );
        stop(&runtime, https).await;
    }

    #[tokio::test]
    async fn a_connection_is_closed_once_it_is_older_than_the_maximum_age() {
        let runtime = test_runtime();
        let (certificates, cert) = self_signed_certificates("aging");
        let age = Duration::from_millis(300);
        let https = serve(&runtime, "aging", Router::new(), certificates, age).await;
        let mut tls = connect(https.addr, &cert).await.expect("handshakes");
        let mut buffer = [0u8; 1024];
        let mut ask = async |tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
            tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .expect("writes");
            let read = tls.read(&mut buffer).await.expect("reads");
            String::from_utf8_lossy(&buffer[..read]).to_lowercase()
        };
        // A young connection stays open for the next request...
        let first = ask(&mut tls).await;
        assert!(
            first.starts_with("http/1.1 200") && !first.contains("connection: close"),
            "{first}"
        );
        tokio::time::sleep(age + Duration::from_millis(100)).await;
        // ...an aged one answers once more, saying it closes, and closes.
        let last = ask(&mut tls).await;
        assert!(
            last.starts_with("http/1.1 200") && last.contains("connection: close"),
            "{last}"
        );
        let after = tls.read(&mut buffer).await;
        assert!(
            matches!(after, Ok(0) | Err(_)),
            "closed after the answer: {after:?}"
        );
        stop(&runtime, https).await;
    }

    #[tokio::test]
    async fn ready_only_while_listening_with_a_certificate() {
        let runtime = test_runtime();
        let certificates = Certificates::empty("late");
        let https = serve(&runtime, "late", Router::new(), certificates.clone(), LONG).await;
        assert!(!runtime.readiness().is_ready(), "no certificate yet");
        renew_self_signed(&certificates);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !runtime.readiness().is_ready() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(runtime.readiness().is_ready());
        stop(&runtime, https).await;
        assert!(!runtime.readiness().is_ready(), "stopped: nothing to serve");
    }
}
