//! Waiting for objects, and watching them for a while, with errors that show what was seen.
//!
//! [`for_object`] and [`for_list`] poll until a condition holds and, on timeout, show the
//! objects as last seen (YAML), their events and the namespace's pods and Warning events.
//! [`observe`] is for checks that something did *not* happen: it watches for a while and
//! returns every state of the objects that the watch delivered, to assert on each.

use std::fmt::Debug;
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

/// What the last poll saw, for the timeout message.
struct Seen<K> {
    objects: Vec<K>,
    error: Option<String>,
}

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
    let seen = Mutex::new(Seen::<K> {
        objects: Vec::new(),
        error: None,
    });
    let done = poll::until(what, timeout, || async {
        let got = api.get_opt(name).await;
        let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        match got {
            Ok(Some(object)) if cond(&object) => return Ok(Some(object)),
            Ok(object) => seen.objects = object.into_iter().collect(),
            Err(err) => seen.error = Some(err.to_string()),
        }
        Ok(None)
    })
    .await;
    match done {
        Ok(object) => Ok(object),
        Err(err) => {
            let seen = seen.into_inner().unwrap_or_else(PoisonError::into_inner);
            let objects = match seen.objects.first() {
                Some(object) => to_yaml(object),
                None => format!("(no object named {name})\n"),
            };
            bail!(
                "{}",
                report(api, err, &seen, objects, &[name.to_owned()]).await
            )
        }
    }
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
    let seen = Mutex::new(Seen::<K> {
        objects: Vec::new(),
        error: None,
    });
    let done = poll::until(what, timeout, || async {
        let got = api.list(params).await;
        let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        match got {
            Ok(list) if cond(&list.items) => return Ok(Some(list.items)),
            Ok(list) => seen.objects = list.items,
            Err(err) => seen.error = Some(err.to_string()),
        }
        Ok(None)
    })
    .await;
    match done {
        Ok(objects) => Ok(objects),
        Err(err) => {
            let seen = seen.into_inner().unwrap_or_else(PoisonError::into_inner);
            let objects = if seen.objects.is_empty() {
                "(none)\n".to_owned()
            } else {
                seen.objects
                    .iter()
                    .map(|o| format!("{}---\n", to_yaml(o)))
                    .collect()
            };
            let names: Vec<String> = seen.objects.iter().map(|o| o.name_any()).collect();
            bail!("{}", report(api, err, &seen, objects, &names).await)
        }
    }
}

async fn report<K>(
    api: &Api<K>,
    err: anyhow::Error,
    seen: &Seen<K>,
    objects: String,
    names: &[String],
) -> String
where
    K: Resource + Clone,
{
    let client = api.clone().into_client();
    let namespace = seen
        .objects
        .first()
        .and_then(|o| o.meta().namespace.clone());
    let events = if names.is_empty() {
        "(no objects)\n".to_owned()
    } else {
        events_text(&client, namespace.as_deref(), names).await
    };
    let context = namespace_summary(&client, namespace.as_deref()).await;
    let detail = seen
        .error
        .as_ref()
        .map(|e| format!("\nlast error: {e}"))
        .unwrap_or_default();
    format!("{err:#}{detail}\n--- objects ---\n{objects}--- events ---\n{events}{context}")
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
