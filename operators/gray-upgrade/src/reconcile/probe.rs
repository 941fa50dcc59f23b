//! Stage three: the current batch's optional health checks, HTTP against each member that is
//! up and the Prometheus query once every member is; their verdicts are the planner's input.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::ResourceExt;

use crate::api::{GrayApp, GrayAppStatus, RolloutPhase, Scheme};
use crate::checks::{self, MetricVerdict, Transport};
use crate::model::{Instances, Ordinal, PodView};
use crate::objects;

/// The optional health checks of the current batch: HTTP against each member that is up, and
/// the Prometheus query once every member is.
pub async fn run(
    app: &GrayApp,
    previous: &GrayAppStatus,
    pods: &Instances,
    update_revision: &str,
) -> (BTreeMap<Ordinal, String>, MetricVerdict) {
    let health = &app.spec.update.health;
    let Some(rollout) = previous.rollout.as_ref().filter(|r| {
        r.revision == update_revision
            && matches!(r.phase, RolloutPhase::Progressing | RolloutPhase::Baking)
    }) else {
        return (BTreeMap::new(), MetricVerdict::NotChecked);
    };
    let up: Vec<&PodView> = rollout
        .members
        .iter()
        .filter_map(|m| pods.get(m).map(AsRef::as_ref))
        .filter(|p| {
            p.revision.as_deref() == Some(update_revision) && p.in_place_done() && p.available()
        })
        .collect();
    let mut failures = BTreeMap::new();
    if let Some(check) = &health.http_get {
        let timeout = Duration::from_secs(u64::try_from(check.timeout_seconds).unwrap_or(2));
        let probes: Vec<_> = up
            .iter()
            .map(|p| async move {
                let host = check.host.clone().or_else(|| p.ip.clone());
                let transport = match check.scheme {
                    Scheme::Http => Transport::Plain,
                    Scheme::Https => Transport::TlsUnverified,
                };
                let verdict = match host {
                    None => Err("the pod has no IP".to_string()),
                    Some(host) => match checks::http_get(
                        transport,
                        &checks::authority(&host, check.port),
                        &check.path,
                        timeout,
                    )
                    .await
                    {
                        Ok((code, _)) if (200..300).contains(&code) => Ok(()),
                        Ok((code, _)) => Err(format!("GET {} answered {code}", check.path)),
                        Err(why) => Err(why),
                    },
                };
                (p.ordinal, verdict)
            })
            .collect();
        for (ordinal, verdict) in futures::future::join_all(probes).await {
            if let Err(why) = verdict {
                failures.insert(ordinal, why);
            }
        }
    }
    let metric = match &health.prometheus {
        Some(query)
            if !rollout.members.is_empty()
                && up.len() == rollout.members.len()
                && failures.is_empty() =>
        {
            let names: Vec<String> = rollout
                .members
                .iter()
                .map(|m| objects::pod_name(&app.name_any(), *m))
                .collect();
            let promql = checks::expand_query(&query.query, &names);
            checks::prometheus(
                &query.address,
                &promql,
                query.max_value,
                Duration::from_secs(5),
            )
            .await
        }
        _ => MetricVerdict::NotChecked,
    };
    (failures, metric)
}
