//! The one way the harness waits: poll a probe until it yields, for at most a timeout. A probe
//! returns `Ok(Some(value))` when done, `Ok(None)` to be asked again, an error to be asked again
//! (the last one is reported on timeout), or a [`Fatal`] error to stop at once.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How long the poll waits between two probes.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// An error that ends a poll at once instead of being retried (a component that exited).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// Polls `probe` until it yields a value; fails after `timeout` with `what` and the probe's
/// last error, or at once when the probe fails with [`Fatal`].
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) if err.is::<Fatal>() => {
                return Err(err.context(format!("while waiting for {what}")));
            }
            Err(err) => last_err = Some(err),
        }
        if Instant::now() >= deadline {
            let detail = last_err
                .map(|e| format!("\nlast error: {e:#}"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{detail}");
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn polls_until_done_and_reports_the_last_error_on_timeout() -> Result<()> {
        let calls = AtomicU32::new(0);
        let value = until("the third call", Duration::from_secs(5), || async {
            Ok((calls.fetch_add(1, Ordering::SeqCst) == 2).then_some(7))
        })
        .await?;
        assert_eq!((value, calls.load(Ordering::SeqCst)), (7, 3));

        let err = until::<(), _, _>("never", Duration::from_millis(300), || async {
            bail!("still broken")
        })
        .await
        .expect_err("times out");
        let text = format!("{err:#}");
        assert!(
            text.contains("waiting for never") && text.contains("still broken"),
            "{text}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_fatal_error_stops_at_once() {
        let calls = AtomicU32::new(0);
        let err = until::<(), _, _>("a live component", Duration::from_secs(60), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Fatal("etcd exited".into()).into())
        })
        .await
        .expect_err("fails");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(format!("{err:#}").contains("etcd exited"));
    }
}
