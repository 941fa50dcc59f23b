//! The metrics and health endpoints: `/metrics`, `/healthz`, `/readyz`.
//!
//! `/healthz` answers 200 while the process is responsive. `/readyz` answers 200 when the
//! replica is useful: standing by for the lease (so a rollout of the operator's own Deployment
//! is not blocked by its standbys), or leading with every informer cache synced. It answers 503
//! while starting and once shutdown has begun.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::KitError;
use crate::metrics::Metrics;

/// Where the replica is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    StandingBy = 1,
    Leading = 2,
    ShuttingDown = 3,
}

/// Readiness shared between the runtime, the controllers and the `/readyz` handler.
#[derive(Debug, Default)]
pub struct Readiness {
    phase: AtomicU8,
    caches_pending: AtomicUsize,
    caches_synced: AtomicBool,
}

impl Readiness {
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            1 => Phase::StandingBy,
            2 => Phase::Leading,
            3 => Phase::ShuttingDown,
            _ => Phase::Starting,
        }
    }

    /// Registers an informer cache that must sync before a leader counts as ready.
    pub fn track_cache(self: &Arc<Self>) -> CacheSync {
        self.caches_pending.fetch_add(1, Ordering::SeqCst);
        CacheSync {
            readiness: Arc::clone(self),
        }
    }

    /// For operators without informer caches: ready as soon as they lead.
    pub fn mark_no_caches(&self) {
        self.caches_synced.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        match self.phase() {
            Phase::StandingBy => true,
            Phase::Leading => {
                self.caches_synced.load(Ordering::SeqCst)
                    && self.caches_pending.load(Ordering::SeqCst) == 0
            }
            Phase::Starting | Phase::ShuttingDown => false,
        }
    }
}

/// Marks one tracked cache as synced.
#[derive(Debug)]
pub struct CacheSync {
    readiness: Arc<Readiness>,
}

impl CacheSync {
    pub fn synced(self) {
        self.readiness.caches_synced.store(true, Ordering::SeqCst);
        self.readiness.caches_pending.fetch_sub(1, Ordering::SeqCst);
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

async fn readyz(State(state): State<Endpoints>) -> (StatusCode, String) {
    let phase = state.readiness.phase();
    if state.readiness.is_ready() {
        (StatusCode::OK, format!("ready ({phase:?})"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready ({phase:?})"),
        )
    }
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

    #[test]
    fn standby_is_ready_starting_and_stopping_are_not() {
        let r = Arc::new(Readiness::default());
        assert!(!r.is_ready());
        r.set_phase(Phase::StandingBy);
        assert!(r.is_ready());
        r.set_phase(Phase::ShuttingDown);
        assert!(!r.is_ready());
    }

    #[test]
    fn leader_is_ready_only_when_all_caches_synced() {
        let r = Arc::new(Readiness::default());
        r.set_phase(Phase::Leading);
        assert!(!r.is_ready(), "no cache has synced yet");
        let a = r.track_cache();
        let b = r.track_cache();
        a.synced();
        assert!(!r.is_ready());
        b.synced();
        assert!(r.is_ready());
    }

    #[test]
    fn operator_without_caches_can_declare_itself_ready() {
        let r = Arc::new(Readiness::default());
        r.set_phase(Phase::Leading);
        r.mark_no_caches();
        assert!(r.is_ready());
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
        assert_eq!(get_status(addr, "/healthz").await, 200);
        assert_eq!(get_status(addr, "/readyz").await, 503);
        readiness.set_phase(Phase::StandingBy);
        assert_eq!(get_status(addr, "/readyz").await, 200);
        assert_eq!(get_status(addr, "/metrics").await, 200);
        assert_eq!(get_status(addr, "/nope").await, 404);
        stop.cancel();
        servers.join().await.expect("stops cleanly");
    }

    /// A minimal HTTP/1.0 GET, to keep an HTTP client out of the dependencies.
    async fn get_status(addr: SocketAddr, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .expect("writes");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("reads");
        response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status line")
    }
}
