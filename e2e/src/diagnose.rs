//! What a failed wait shows: the objects as last seen, their events, and what the namespace's
//! pods and Warning events say.

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt as _};
use serde::Serialize;

/// One line per pod of the namespace (phase, readiness, node, each container's image, restarts
/// and state) and the namespace's Warning events: what an operator's objects usually hinge on.
/// Empty without a namespace.
pub async fn namespace_summary(client: &Client, namespace: Option<&str>) -> String {
    let Some(ns) = namespace else {
        return String::new();
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut out = format!("--- pods in {ns} ---\n");
    match pods.list(&ListParams::default()).await {
        Ok(list) if list.items.is_empty() => out.push_str("(none)\n"),
        Ok(list) => {
            for pod in list.items.iter().take(100) {
                out.push_str(&pod_line(pod));
                out.push('\n');
            }
            if list.items.len() > 100 {
                out.push_str(&format!("... and {} more\n", list.items.len() - 100));
            }
        }
        Err(e) => out.push_str(&format!("(listing pods failed: {e})\n")),
    }
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let warnings = api
        .list(&ListParams::default().fields("type=Warning"))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    out.push_str(&format!("--- Warning events in {ns} ---\n"));
    if warnings.is_empty() {
        out.push_str("(none)\n");
    }
    for e in warnings.iter().rev().take(30).rev() {
        out.push_str(&format!(
            "{} {}/{}: {}\n",
            e.reason.as_deref().unwrap_or(""),
            e.involved_object.kind.as_deref().unwrap_or(""),
            e.involved_object.name.as_deref().unwrap_or(""),
            e.message.as_deref().unwrap_or("").trim(),
        ));
    }
    out
}

/// `name phase Ready=<status> node=<node> [container=image restarts=N ready=B state] ...`
pub fn pod_line(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map_or("-", |c| c.status.as_str());
    let mut line = format!(
        "{} {} Ready={ready} node={}",
        pod.name_any(),
        status.and_then(|s| s.phase.as_deref()).unwrap_or("-"),
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or("-"),
    );
    if pod.metadata.deletion_timestamp.is_some() {
        line.push_str(" (terminating)");
    }
    for c in status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
    {
        let state = match &c.state {
            Some(st) if st.running.is_some() => "running".to_owned(),
            Some(st) if st.terminated.is_some() => "terminated".to_owned(),
            Some(st) => st
                .waiting
                .as_ref()
                .and_then(|w| w.reason.clone())
                .unwrap_or_else(|| "waiting".to_owned()),
            None => "-".to_owned(),
        };
        line.push_str(&format!(
            " [{}={} restarts={} ready={} {state}]",
            c.name, c.image, c.restart_count, c.ready
        ));
    }
    line
}

/// An object as YAML without `managedFields`.
pub fn to_yaml<K: Serialize>(obj: &K) -> String {
    let mut value = serde_json::to_value(obj).unwrap_or_default();
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    serde_yaml::to_string(&value).unwrap_or_else(|e| format!("(unprintable: {e})\n"))
}

/// Events about the named objects (all events of the namespace when `names` is empty), oldest
/// first, one per line.
pub async fn events_text(client: &Client, namespace: Option<&str>, names: &[String]) -> String {
    let api: Api<Event> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut events = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => return format!("(listing events failed: {e})\n"),
    };
    events.retain(|e| {
        names.is_empty()
            || e.involved_object
                .name
                .as_ref()
                .is_some_and(|n| names.contains(n))
    });
    events.sort_by_key(event_time);
    if events.is_empty() {
        return "(none)\n".to_owned();
    }
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {}/{}: {}\n",
                event_time(e).map(|t| t.to_string()).unwrap_or_default(),
                e.type_.as_deref().unwrap_or(""),
                e.reason.as_deref().unwrap_or(""),
                e.involved_object.kind.as_deref().unwrap_or(""),
                e.involved_object.name.as_deref().unwrap_or(""),
                e.message.as_deref().unwrap_or("").trim(),
            )
        })
        .collect()
}

fn event_time(e: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}
