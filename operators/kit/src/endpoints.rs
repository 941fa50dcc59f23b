//! The metrics and health endpoints: `/metrics`, `/healthz`, `/readyz`.
//!
//! `/healthz` answers 200 while the process is responsive. `/readyz` is the AND of the
//! readiness checks the operator's parts register ([`Readiness::check`]): a watch cache is
//! ready once it has its first complete list, an HTTPS service once it listens with a
//! certificate loaded. A replica with nothing registered has nothing to offer and is not ready;
//! nobody is ready once shutdown has begun. `/readyz?verbose` lists every check, as the
//! Kubernetes components' own endpoints do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::KitError;
use crate::metrics::Metrics;

/// The replica's readiness: the checks its parts registered, and whether it is stopping.
#[derive(Debug, Default)]
pub struct Readiness {
    checks: Mutex<BTreeMap<u64, Registered>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
}

#[derive(Debug)]
struct Registered {
    name: String,
    ready: Arc<AtomicBool>,
}

impl Readiness {
    /// Registers a check, not yet passing. It counts until the returned handle is dropped.
    pub fn check(self: &Arc<Self>, name: impl Into<String>) -> ReadinessCheck {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ready = Arc::new(AtomicBool::new(false));
        self.lock().insert(
            id,
            Registered {
                name: name.into(),
                ready: Arc::clone(&ready),
            },
        );
        ReadinessCheck {
            id,
            ready,
            readiness: Arc::clone(self),
        }
    }

    /// From now on the replica is not ready, whatever its checks say.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        let checks = self.lock();
        !self.is_stopping()
            && !checks.is_empty()
            && checks.values().all(|c| c.ready.load(Ordering::SeqCst))
    }

    /// One line per check, `[+]name ok` or `[-]name not ready`, and the verdict.
    pub fn report(&self) -> String {
        let checks = self.lock();
        let mut out = String::new();
        for check in checks.values() {
            let ok = check.ready.load(Ordering::SeqCst);
            out.push_str(&format!(
                "[{}]{} {}\n",
                if ok { '+' } else { '-' },
                check.name,
                if ok { "ok" } else { "not ready" }
            ));
        }
        if checks.is_empty() {
            out.push_str("[-]nothing to serve on this replica\n");
        }
        if self.is_stopping() {
            out.push_str("[-]shutting down\n");
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Registered>> {
        self.checks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One registered readiness check; dropping it unregisters the check.
#[derive(Debug)]
pub struct ReadinessCheck {
    id: u64,
    ready: Arc<AtomicBool>,
    readiness: Arc<Readiness>,
}

impl ReadinessCheck {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

impl Drop for ReadinessCheck {
    fn drop(&mut self) {
        self.readiness.lock().remove(&self.id);
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: Metrics,
    readiness: Arc<Readiness>,
}

async fn metrics(State(state): State<Endpoints>) -> impl IntoResponse {
    match state.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode metrics",
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Endpoints>, RawQuery(query): RawQuery) -> (StatusCode, String) {
    let ready = state.readiness.is_ready();
    let verbose = query.is_some_and(|q| q.split('&').any(|p| p == "verbose"));
    let verdict = if ready { "ok" } else { "not ready" };
    let body = if verbose {
        format!("{}readyz: {verdict}\n", state.readiness.report())
    } else {
        verdict.to_string()
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

/// The running endpoint servers.
pub struct Servers {
    pub metrics_addr: SocketAddr,
    pub health_addr: SocketAddr,
    tasks: Vec<JoinHandle<Result<(), KitError>>>,
}

impl Servers {
    /// Binds and serves the endpoints until `stop` is cancelled. When both addresses are the
    /// same, one listener serves all three paths.
    pub async fn start(
        metrics_addr: SocketAddr,
        health_addr: SocketAddr,
        metrics_state: Metrics,
        readiness: Arc<Readiness>,
        stop: CancellationToken,
    ) -> Result<Self, KitError> {
        let state = Endpoints {
            metrics: metrics_state,
            readiness,
        };
        let metrics_routes = Router::new().route("/metrics", get(metrics));
        let health_routes = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz));
        let mut tasks = Vec::new();
        if metrics_addr == health_addr {
            let (addr, task) = serve(
                "metrics and health",
                metrics_addr,
                metrics_routes.merge(health_routes).with_state(state),
                stop,
            )
            .await?;
            tasks.push(task);
            return Ok(Self {
                metrics_addr: addr,
                health_addr: addr,
                tasks,
            });
        }
        let (metrics_bound, task) = serve(
            "metrics",
            metrics_addr,
            metrics_routes.with_state(state.clone()),
            stop.clone(),
        )
        .await?;
        tasks.push(task);
        let (health_bound, task) =
            serve("health", health_addr, health_routes.with_state(state), stop).await?;
        tasks.push(task);
        Ok(Self {
            metrics_addr: metrics_bound,
            health_addr: health_bound,
            tasks,
        })
    }

    /// Waits for the servers to finish after their stop token was cancelled.
    pub async fn join(self) -> Result<(), KitError> {
        for task in self.tasks {
            match task.await {
                Ok(result) => result?,
                Err(join) => tracing::warn!(error = %join, "endpoint server task failed"),
            }
        }
        Ok(())
    }
}

async fn serve(
    what: &'static str,
    addr: SocketAddr,
    router: Router,
    stop: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<Result<(), KitError>>), KitError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| KitError::Bind { what, addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| KitError::Bind { what, addr, source })?;
    tracing::info!(address = %bound, "serving {what} endpoints");
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .map_err(|source| KitError::Serve { what, source })
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::http_get;

    #[test]
    fn ready_is_the_and_of_every_registered_check() {
        let r = Arc::new(Readiness::default());
        assert!(!r.is_ready(), "nothing registered: nothing to serve");
        let a = r.check("cache a");
        let b = r.check("https webhook");
        assert!(!r.is_ready());
        a.set(true);
        assert!(!r.is_ready(), "b still fails");
        b.set(true);
        assert!(r.is_ready());
        a.set(false);
        assert!(!r.is_ready(), "a check can fail again");
    }

    #[test]
    fn a_dropped_check_no_longer_counts() {
        let r = Arc::new(Readiness::default());
        let kept = r.check("kept");
        kept.set(true);
        let gone = r.check("gone");
        assert!(!r.is_ready());
        drop(gone);
        assert!(r.is_ready());
        drop(kept);
        assert!(!r.is_ready(), "nothing left to serve");
    }

    #[test]
    fn stopping_overrides_every_check() {
        let r = Arc::new(Readiness::default());
        let check = r.check("cache");
        check.set(true);
        r.set_stopping();
        assert!(!r.is_ready());
        assert!(r.report().contains("[-]shutting down"), "{}", r.report());
    }

    #[test]
    fn the_report_names_each_check() {
        let r = Arc::new(Readiness::default());
        assert!(r.report().contains("nothing to serve"));
        let a = r.check("cache pods");
        let _b = r.check("https extender");
        a.set(true);
        let report = r.report();
        assert!(report.contains("[+]cache pods ok"), "{report}");
        assert!(report.contains("[-]https extender not ready"), "{report}");
    }

    #[tokio::test]
    async fn endpoints_answer_over_http() {
        let metrics = Metrics::new("test", "0");
        let readiness = Arc::new(Readiness::default());
        let stop = CancellationToken::new();
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let servers = Servers::start(any, any, metrics, readiness.clone(), stop.clone())
            .await
            .expect("binds");
        let addr = servers.health_addr;
        assert_eq!(http_get(addr, "/healthz").await.0, 200);
        assert_eq!(http_get(addr, "/readyz").await.0, 503);
        let check = readiness.check("cache");
        check.set(true);
        assert_eq!(http_get(addr, "/readyz").await.0, 200);
        let (code, body) = http_get(addr, "/readyz?verbose").await;
        assert_eq!(code, 200);
        assert!(body.contains("[+]cache ok"), "{body}");
        assert_eq!(http_get(addr, "/metrics").await.0, 200);
        assert_eq!(http_get(addr, "/nope").await.0, 404);
        stop.cancel();
        servers.join().await.expect("stops cleanly");
    }
}
