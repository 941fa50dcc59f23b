//! Waiting for objects, and watching them for a while, with errors that show what was seen.
//!
//! [`for_object`] and [`for_list`] poll until a condition holds and, on timeout, show the
//! objects as last seen (YAML), their events and the namespace's pods and Warning events.
//! [`observe`] is for checks that something did *not* happen: it watches for a while and
//! returns every state of the objects that the watch delivered, to assert on each.

use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Result, bail};
use futures::StreamExt as _;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::diagnose::{events_text, namespace_summary, to_yaml};
use crate::poll;

/// Waits until the named object exists and satisfies `cond`. On timeout the error shows the
/// object as last seen (YAML, without managed fields) and its events.
pub async fn for_object<K, F>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: F,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    F: Fn(&K) -> bool,
{
    until_seen(
        api,
        what,
        timeout,
        Some(name),
        || async { Ok(api.get_opt(name).await?.into_iter().collect()) },
        |objects| objects.first().filter(|o| cond(o)).cloned(),
    )
    .await
}

/// Waits until the objects matching `params` satisfy `cond` (which sees all of them). On
/// timeout the error shows every object as last seen and their events.
pub async fn for_list<K, F>(
    api: &Api<K>,
    params: &ListParams,
    what: &str,
    timeout: Duration,
    cond: F,
) -> Result<Vec<K>>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    F: Fn(&[K]) -> bool,
{
    until_seen(
        api,
        what,
        timeout,
        None,
        || async { Ok(api.list(params).await?.items) },
        |objects| cond(objects).then(|| objects.to_vec()),
    )
    .await
}

/// Polls `fetch` until `done` accepts what it returned. On timeout the error shows the objects
/// last fetched (or that `name` was missing), their events and the namespace's pods and
/// Warning events.
async fn until_seen<K, F, Fut, T>(
    api: &Api<K>,
    what: &str,
    timeout: Duration,
    name: Option<&str>,
    fetch: F,
    done: impl Fn(&[K]) -> Option<T>,
) -> Result<T>
where
    K: Resource + Clone + Serialize,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Vec<K>, kube::Error>>,
{
    let last: Mutex<(Vec<K>, Option<String>)> = Mutex::new((Vec::new(), None));
    let waited = poll::until(what, timeout, || async {
        let fetched = fetch().await;
        let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
        match fetched {
            Ok(objects) => {
                let accepted = done(&objects);
                last.0 = objects;
                Ok(accepted)
            }
            Err(err) => {
                last.1 = Some(err.to_string());
                Ok(None)
            }
        }
    })
    .await;
    let err = match waited {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    let (objects, error) = last.into_inner().unwrap_or_else(PoisonError::into_inner);
    let shown = match (objects.is_empty(), name) {
        (true, Some(name)) => format!("(no object named {name})\n"),
        (true, None) => "(none)\n".to_owned(),
        (false, _) => objects
            .iter()
            .map(|o| format!("{}---\n", to_yaml(o)))
            .collect(),
    };
    let names: Vec<String> = match name {
        Some(name) => vec![name.to_owned()],
        None => objects.iter().map(|o| o.name_any()).collect(),
    };
    let client = api.clone().into_client();
    let namespace = objects.first().and_then(|o| o.meta().namespace.clone());
    let events = if names.is_empty() {
        "(no objects)\n".to_owned()
    } else {
        events_text(&client, namespace.as_deref(), &names).await
    };
    let context = namespace_summary(&client, namespace.as_deref()).await;
    let detail = error
        .map(|e| format!("\nlast error: {e}"))
        .unwrap_or_default();
    bail!("{err:#}{detail}\n--- objects ---\n{shown}--- events ---\n{events}{context}")
}

/// Waits until the named object is gone.
pub async fn for_deletion<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    for_list(
        api,
        &ListParams::default().fields(&format!("metadata.name={name}")),
        &format!("{name} to be deleted"),
        timeout,
        |items| items.is_empty(),
    )
    .await
    .map(|_| ())
}

/// Watches the objects `config` selects for `duration` and returns every state the watch
/// delivered, the initial list included, in order: for checks that something did not happen,
/// asserted on every state seen rather than on one sample.
pub async fn observe<K>(api: &Api<K>, config: watcher::Config, duration: Duration) -> Result<Vec<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let seen: Arc<Mutex<Vec<K>>> = Arc::default();
    let record = Arc::clone(&seen);
    let mut events = watcher::watcher(api.clone(), config).boxed();
    let failure = tokio::time::timeout(duration, async move {
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => record
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(o),
                Ok(_) => {}
                Err(err) => return Some(err),
            }
        }
        None
    })
    .await;
    if let Ok(Some(err)) = failure {
        bail!("the watch failed while observing: {err}");
    }
    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
    Ok(seen)
}
