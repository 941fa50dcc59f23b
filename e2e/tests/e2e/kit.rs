//! End-to-end tests of the kit, most through its probe operator (`gantry-noop`) on the real
//! API server: events, indexes, leader election, HTTPS services on every replica, certificate
//! rotation under load, undecodable objects, node agents and several clusters.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gantry_e2e::cluster::Cluster;
use gantry_e2e::manifest::{apply_object, install_crd_file, parse_yaml_documents};
use gantry_e2e::operator::{Fixture, NOOP, Operator, Replica, free_addr};
use gantry_e2e::pki::Ca;
use gantry_e2e::testing::{TestEnv, pod, remote_cluster_spec};
use gantry_e2e::webhook::{Registration, Target};
use gantry_e2e::{http, poll, wait};
use gantry_kit::clusters::{self, CLUSTER_LABEL, Health, KUBECONFIG_KEY};
use gantry_kit::events::{EventType, Events, Reason};
use gantry_kit::index;
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn config_map(name: &str, owner: Option<&ConfigMap>, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("kit-test".into(), "yes".into())])),
            owner_references: owner.map(|o| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "ConfigMap".into(),
                    name: o.name_any(),
                    uid: o.uid().unwrap_or_default(),
                    controller: Some(true),
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("v".into(), value.into())])),
        ..ConfigMap::default()
    }
}

#[derive(Clone, Copy)]
struct Probed(EventType);

impl Reason for Probed {
    fn reason(self) -> &'static str {
        "Probed"
    }
    fn event_type(self) -> EventType {
        self.0
    }
    fn action(self) -> &'static str {
        "Probe"
    }
}

/// Events about one object, as the API holds them.
async fn events_about(api: &Api<Event>, uid: Option<String>) -> Result<Vec<Event>> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.clone()) == uid)
        .collect())
}

#[tokio::test]
async fn events_fold_repeats_into_a_series_and_keep_different_notes_apart() -> Result<()> {
    let env = TestEnv::new("kit-events").await?;
    let maps: Api<ConfigMap> = env.api();
    let subject = maps
        .create(&PostParams::default(), &config_map("subject", None, "x"))
        .await?;
    let regarding: ObjectReference = subject.object_ref(&());
    let events = Events::new(env.client.clone(), "gantry-test", Some("test-0".into()));
    for _ in 0..3 {
        events
            .publish(&regarding, Probed(EventType::Normal), "the same note")
            .await;
    }
    events
        .publish(&regarding, Probed(EventType::Warning), "a different note")
        .await;

    let about_subject = events_about(&env.api(), subject.uid()).await?;
    ensure!(
        about_subject.len() == 2,
        "three repeats and one different event should make two events, got {}",
        about_subject.len()
    );
    let same = about_subject
        .iter()
        .find(|e| e.note.as_deref() == Some("the same note"))
        .context("the repeated event is missing")?;
    ensure!(
        same.series.as_ref().map(|s| s.count) == Some(3),
        "the repeats should be counted in a series: {:?}",
        same.series
    );
    ensure!(same.reporting_controller.as_deref() == Some("gantry-test"));
    ensure!(same.reporting_instance.as_deref() == Some("test-0"));
    let different = about_subject
        .iter()
        .find(|e| e.note.as_deref() == Some("a different note"))
        .context("the different event is missing")?;
    ensure!(different.series.is_none());
    ensure!(different.type_.as_deref() == Some("Warning"));
    Ok(())
}

#[tokio::test]
async fn the_owned_index_follows_a_real_watch() -> Result<()> {
    let env = TestEnv::new("kit-index").await?;
    let maps: Api<ConfigMap> = env.api();
    let owner = maps
        .create(&PostParams::default(), &config_map("owner", None, "-"))
        .await?;
    let owner_uid = owner.uid().unwrap_or_default();
    for (name, value) in [("b", "2"), ("a", "1")] {
        maps.create(
            &PostParams::default(),
            &config_map(name, Some(&owner), value),
        )
        .await?;
    }

    let (index, fill) = index::watch(
        maps.clone(),
        watcher::Config::default().labels("kit-test=yes"),
        index::by_controller,
        |cm: &ConfigMap| cm.data.as_ref()?.get("v").cloned(),
    );
    let filling = tokio::spawn(fill);
    let values = |index: &index::Index<String>| -> Vec<String> {
        index
            .get(&owner_uid)
            .iter()
            .map(|v| v.to_string())
            .collect()
    };
    tokio::time::timeout(TIMEOUT, index.synced()).await?;
    ensure!(
        values(&index) == ["1", "2"],
        "listed in name order under their owner: {:?}",
        values(&index)
    );
    ensure!(
        index.len() == 2,
        "the owner itself has no owner and is not kept"
    );

    maps.create(&PostParams::default(), &config_map("c", Some(&owner), "3"))
        .await?;
    maps.delete("a", &DeleteParams::default()).await?;
    poll::until(
        "the index to see c created and a deleted",
        TIMEOUT,
        || async { Ok((values(&index) == ["2", "3"]).then_some(())) },
    )
    .await?;
    filling.abort();
    Ok(())
}

// --- leader election -----------------------------------------------------------------------

/// One replica's terms as leader, from its JSON log: when each began and, unless the log stops
/// first, when it ended.
fn terms(log: &str) -> Result<Vec<(Timestamp, Option<Timestamp>)>> {
    let mut terms: Vec<(Timestamp, Option<Timestamp>)> = Vec::new();
    for line in log.lines() {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(change) = entry["leadership"].as_str() else {
            continue;
        };
        let at: Timestamp = entry["timestamp"]
            .as_str()
            .context("a log line without a timestamp")?
            .parse()?;
        match (change, terms.last_mut()) {
            ("acquired", Some((_, None))) => bail!("acquired twice without ending: {line}"),
            ("acquired", _) => terms.push((at, None)),
            ("ended", Some((_, end @ None))) => *end = Some(at),
            ("ended", _) => bail!("ended a term that never began: {line}"),
            _ => bail!("unknown change of leadership: {line}"),
        }
    }
    Ok(terms)
}

/// Waits until `who` (any replica when `None`) alone reports leadership and holds the Lease.
async fn wait_for_leader<'a>(
    operator: &'a Operator,
    leases: &Api<Lease>,
    who: Option<&str>,
) -> Result<&'a Replica> {
    let what = who.map_or_else(|| "a leader".to_owned(), |w| format!("{w} to lead"));
    let name = poll::until(&what, Duration::from_secs(30), || async {
        let mut leaders = Vec::new();
        for replica in operator.replicas() {
            if replica.is_leader().await == Some(true) {
                leaders.push(replica.name.clone());
            }
        }
        let holder = leases
            .get_opt(operator.lease_name())
            .await?
            .and_then(|l| l.spec?.holder_identity);
        Ok(match leaders.as_slice() {
            [one] if holder.as_deref() == Some(one) && who.is_none_or(|w| w == one) => {
                Some(one.clone())
            }
            _ => None,
        })
    })
    .await?;
    operator.replica(&name)
}

#[tokio::test]
async fn replicas_never_lead_at_once_and_take_over_from_a_dead_or_stopped_leader() -> Result<()> {
    let env = TestEnv::new("kit-leader").await?;
    let leases: Api<Lease> = env.api();
    // The probe runs as the ServiceAccount its chart creates, with exactly the chart's RBAC.
    let mut operator = Fixture::new(&env, NOOP)
        .watch_namespace()
        .replicas(2)
        .start()
        .await?;

    // The kubeconfig really is the ServiceAccount, not an administrator.
    let as_operator = gantry_e2e::cluster::client_from_kubeconfig(operator.kubeconfig()).await?;
    match Api::<Secret>::namespaced(as_operator, env.namespace())
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => {
            bail!("listing Secrets as the noop ServiceAccount should be forbidden, got {other:?}")
        }
    }

    let mut logs: Vec<(String, String, Option<Timestamp>)> = Vec::new();
    let first = wait_for_leader(&operator, &leases, None)
        .await?
        .name
        .clone();
    let other = if first == "a" { "b" } else { "a" };

    // A crash: SIGKILL, so the lease is not released and must expire. Its last term ended, at
    // the latest, when the process was gone.
    let killed = operator.remove(&first).context("the leader")?;
    killed.process.kill().await;
    logs.push((
        format!("{first} (killed)"),
        killed.log(),
        Some(Timestamp::now()),
    ));
    drop(killed);
    wait_for_leader(&operator, &leases, Some(other)).await?;

    // The killed replica comes back as a standby, ready (its caches are warm) but not leading.
    operator.spawn(&first, &[])?;
    let restarted = operator.replica(&first)?;
    poll::until("the restarted replica to be ready", TIMEOUT, || async {
        Ok(restarted.readyz().await.filter(|(code, _)| *code == 200))
    })
    .await?;
    ensure!(
        restarted.is_leader().await == Some(false),
        "a standby must not lead"
    );

    // A clean stop releases the lease: the standby takes over at its next poll.
    let stopped = operator.remove(other).context("the new leader")?;
    ensure!(
        stopped.process.terminate(Duration::from_secs(20)).await,
        "gantry-noop did not exit on SIGTERM"
    );
    logs.push((format!("{other} (stopped)"), stopped.log(), None));
    wait_for_leader(&operator, &leases, Some(&first)).await?;
    let last = operator.replica(&first)?;
    logs.push((format!("{first} (restarted)"), last.log(), None));

    // Every change of leadership every replica logged: the terms never overlap.
    let mut all = Vec::new();
    for (who, log, gone_at) in &logs {
        for (began, ended) in terms(log)? {
            all.push((who.clone(), began, ended.or(*gone_at)));
        }
    }
    ensure!(
        all.len() >= 3,
        "each of the three leaders logged its term: {all:?}"
    );
    for (i, (who, began, ended)) in all.iter().enumerate() {
        for (other, other_began, other_ended) in &all[i + 1..] {
            let apart = ended.is_some_and(|e| e <= *other_began)
                || other_ended.is_some_and(|e| e <= *began);
            ensure!(
                apart,
                "{who} led {began}..{ended:?} while {other} led {other_began}..{other_ended:?}"
            );
        }
    }
    Ok(())
}

// --- HTTPS services ------------------------------------------------------------------------

/// A CA and a serving certificate for 127.0.0.1 in files, for `--tls-cert-file`.
fn serving_files(env: &TestEnv) -> Result<(String, Vec<String>)> {
    let ca = Ca::new("gantry-e2e-noop-ca")?;
    let serving = ca.serving("gantry-noop", &["localhost"], &[Ipv4Addr::LOCALHOST.into()])?;
    let (cert, key) = serving.write(&env.cluster.scratch_dir(env.namespace())?, "webhook")?;
    Ok((
        ca.cert_pem().to_owned(),
        vec![
            format!("--tls-cert-file={}", cert.display()),
            format!("--tls-key-file={}", key.display()),
        ],
    ))
}

fn review(name: &str, deny: bool) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b8d3a52-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
            "resource": {"group": "", "version": "v1", "resource": "configmaps"},
            "operation": "CREATE",
            "userInfo": {"username": "e2e"},
            "object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"gantry.dev/deny": deny.to_string()}}},
        }
    }))?)
}

fn labelled(name: &str, deny: bool) -> Result<ConfigMap> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"gantry.dev/deny": deny.to_string()}}
    }))?)
}

fn configmap_rules() -> serde_json::Value {
    json!([{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"] }])
}

#[tokio::test]
async fn a_standby_serves_its_https_webhook_and_is_ready_while_not_leading() -> Result<()> {
    let env = TestEnv::new("kit-standby").await?;
    let leases: Api<Lease> = env.api();
    let (ca, tls_flags) = serving_files(&env)?;
    let mut operator = Fixture::new(&env, NOOP)
        .watch_namespace()
        .replicas(0)
        .leader_elect(true)
        .start()
        .await?;
    let mut webhooks = BTreeMap::new();
    for name in ["a", "b"] {
        let addr = free_addr()?;
        let mut flags = vec![format!("--webhook-addr={addr}")];
        flags.extend(tls_flags.iter().cloned());
        operator.spawn(name, &flags)?;
        webhooks.insert(name, addr);
    }
    let leader = wait_for_leader(&operator, &leases, None)
        .await?
        .name
        .clone();
    let standby_name = if leader == "a" { "b" } else { "a" };
    let standby = operator.replica(standby_name)?;
    let standby_webhook = webhooks[standby_name];

    let (code, report) = poll::until("the standby to be ready", TIMEOUT, || async {
        Ok(standby.readyz().await.filter(|(code, _)| *code == 200))
    })
    .await?;
    ensure!(
        code == 200 && report.contains("[+]https webhook ok"),
        "{report}"
    );
    let (code, body) = http::https_request(
        standby_webhook,
        "POST",
        "/validate",
        &ca,
        &review("x", true)?,
    )
    .await?;
    ensure!(code == 200, "the standby answers reviews: {code} {body}");
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(answer["response"]["allowed"] == false, "{answer}");

    // The API server itself, sent to the standby only.
    let _registration = Registration::validating(
        &env.cluster,
        &env.client,
        &format!("{}-standby", env.namespace()),
        vec![(
            "standby.e2e.gantry.dev",
            Target::Url {
                url: format!("https://{standby_webhook}/validate"),
                ca_pem: &ca,
            },
        )],
        env.namespace(),
        configmap_rules(),
    )
    .await?;
    let maps: Api<ConfigMap> = env.api();
    poll::until(
        "the standby to deny a labelled ConfigMap",
        TIMEOUT,
        || async {
            match maps
                .create(&PostParams::default(), &labelled("denied", true)?)
                .await
            {
                Err(kube::Error::Api(status))
                    if status.message.contains("denied by gantry-noop") =>
                {
                    Ok(Some(()))
                }
                Ok(_) => {
                    maps.delete("denied", &DeleteParams::default()).await?;
                    Ok(None)
                }
                Err(err) => Err(err.into()),
            }
        },
    )
    .await?;
    maps.create(&PostParams::default(), &labelled("allowed", false)?)
        .await
        .context("the standby allows an unlabelled ConfigMap")?;
    ensure!(
        standby.is_leader().await == Some(false),
        "{standby_name} served all along as a standby"
    );
    let served = standby
        .metric("gantry_admission_reviews_total")
        .await
        .unwrap_or(0.0);
    ensure!(served >= 3.0, "the standby counted its reviews: {served}");
    Ok(())
}

#[tokio::test]
async fn managed_certificates_rotate_under_steady_load_without_a_failed_request() -> Result<()> {
    let env = TestEnv::new("kit-rotate").await?;
    let configuration = format!("{}-rotate", env.namespace());
    let mut operator = Fixture::new(&env, NOOP)
        .watch_namespace()
        .replicas(0)
        .leader_elect(true)
        .value("webhook.enabled", "true")
        .value("webhook.configurationName", &configuration)
        .value("webhook.certificates.secretName", "webhook-tls")
        .flag("--tls-secret=webhook-tls")
        .flag("--tls-name=127.0.0.1")
        .flag(format!(
            "--tls-webhook-configuration=validating/{configuration}"
        ))
        // Short lives, so that certificates and a CA rotate within the test: a serving
        // certificate every ~6 s, a new CA after ~27 s, the old one gone at 40 s.
        .flag("--tls-validity=8s")
        .flag("--tls-ca-validity=40s")
        .flag("--tls-propagation-delay=2s")
        // The API server keeps connections open; short ones make it meet every new
        // certificate within a second.
        .flag("--https-max-connection-age=1s")
        .start()
        .await?;
    let mut urls = Vec::new();
    for name in ["a", "b"] {
        let addr = free_addr()?;
        operator.spawn(name, &[format!("--webhook-addr={addr}")])?;
        urls.push((name, format!("https://{addr}/validate")));
    }
    // Every request goes to both replicas: one webhook each. The caBundle is the operator's
    // to fill in.
    let _registration = Registration::validating(
        &env.cluster,
        &env.client,
        &configuration,
        urls.iter()
            .map(|(name, url)| {
                (
                    if *name == "a" {
                        "a.rotate.e2e.gantry.dev"
                    } else {
                        "b.rotate.e2e.gantry.dev"
                    },
                    Target::Managed { url: url.clone() },
                )
            })
            .collect(),
        env.namespace(),
        configmap_rules(),
    )
    .await?;
    let maps: Api<ConfigMap> = env.api();
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    // The API server takes up a new configuration in its own time: the load starts once it
    // sends reviews to both replicas, trusting their certificates (a denial proves it).
    poll::until(
        "both webhooks in use with a trusted certificate",
        TIMEOUT,
        || async {
            let denied = matches!(
                maps.create(&dry_run, &labelled("first", true)?).await,
                Err(kube::Error::Api(status)) if status.message.contains("denied by gantry-noop")
            );
            let mut reviewed = true;
            for replica in operator.replicas() {
                reviewed &= replica
                    .metric("gantry_admission_reviews_total")
                    .await
                    .unwrap_or(0.0)
                    >= 1.0;
            }
            Ok((denied && reviewed).then_some(()))
        },
    )
    .await?;

    // Steady load from four clients until the CA has been replaced and the old one dropped.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let mut clients = Vec::new();
    for client in 0..4 {
        let (maps, stop, ok, failed, failures) = (
            maps.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            failures.clone(),
        );
        let dry_run = dry_run.clone();
        clients.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let Ok(map) = labelled(&format!("load-{client}-{i}"), false) else {
                    continue;
                };
                match maps.create(&dry_run, &map).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(err) => {
                        failures
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(err.to_string());
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    let started = Instant::now();
    let rotations = |step: &'static str| {
        let operator = &operator;
        async move {
            let mut total = 0.0;
            for replica in operator.replicas() {
                let text = replica.metrics_text().await.unwrap_or_default();
                total += text
                    .lines()
                    .filter(|l| {
                        l.starts_with(&format!("gantry_tls_rotations_total{{step=\"{step}\"}}"))
                    })
                    .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                    .sum::<f64>();
            }
            total
        }
    };
    let done =
        poll::until(
            "a CA rotation and the old CA dropped",
            Duration::from_secs(90),
            || async {
                Ok((rotations("PromotedCA").await >= 1.0
                    && rotations("DroppedExpiredCA").await >= 1.0)
                    .then_some(()))
            },
        )
        .await;
    // A little more load on the new CA alone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await?;
    }
    done?;
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let renewed = rotations("RenewedCertificate").await;
    eprintln!(
        "rotation under load: {ok} requests in {:.0} s, {failed} failed; {renewed} serving certificates and one CA rotated",
        started.elapsed().as_secs_f64()
    );
    let failures = failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    ensure!(
        failed == 0,
        "{failed} of {} requests failed: {:?}",
        ok + failed,
        &failures[..failures.len().min(5)]
    );
    ensure!(ok >= 100, "the load was steady: only {ok} requests");
    ensure!(
        renewed >= 3.0,
        "serving certificates were renewed: {renewed}"
    );
    Ok(())
}

// --- undecodable objects -------------------------------------------------------------------

/// The Probe CRD with `spec.message` allowed to be a number: what an older, looser version of
/// a CRD may have stored.
fn loosened_probe_crd() -> Result<DynamicObject> {
    let text = std::fs::read_to_string(gantry_e2e::bins::repo_root().join("crds/noop.yaml"))?;
    let mut crd = parse_yaml_documents(&text)?
        .into_iter()
        .next()
        .context("the Probe CRD")?;
    let message = &mut crd.data["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["message"];
    ensure!(message.is_object(), "the CRD has spec.message");
    *message = json!({"x-kubernetes-int-or-string": true, "description": "loosened by the test"});
    Ok(crd)
}

fn ready_for_generation(probe: &DynamicObject) -> bool {
    probe.data["status"]["observedGeneration"].as_i64() == probe.metadata.generation
        && probe.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
}

#[tokio::test]
async fn an_undecodable_object_is_skipped_and_reported_while_the_others_reconcile() -> Result<()> {
    let env = TestEnv::new("kit-undecodable").await?;
    let operator = Fixture::new(&env, NOOP)
        .watch_namespace()
        .flag("--probes")
        .start()
        .await?;
    let probes = gantry_e2e::manifest::dynamic_api(
        &env.client,
        env.namespace(),
        "kit.gantry.dev/v1alpha1",
        "Probe",
    )
    .await?;
    let probe = |name: &str, message: serde_json::Value| -> Result<DynamicObject> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "kit.gantry.dev/v1alpha1", "kind": "Probe",
            "metadata": {"name": name}, "spec": {"message": message},
        }))?)
    };
    probes
        .create(&PostParams::default(), &probe("good", json!("hello"))?)
        .await?;
    wait::for_object(
        &probes,
        "good",
        "the good probe to be Ready",
        TIMEOUT,
        ready_for_generation,
    )
    .await?;

    // Stored under the looser schema; the real one is back before the operator reads it. The
    // CRD is shared with tests that install it as it is, so the write is retried until it
    // lands while the loose schema is in force.
    let real = gantry_e2e::bins::repo_root().join("crds/noop.yaml");
    poll::until(
        "a probe stored with a number for a message",
        TIMEOUT,
        || async {
            apply_object(&env.client, loosened_probe_crd()?, None).await?;
            Ok(probes
                .create(&PostParams::default(), &probe("bad", json!(42))?)
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await?;
    install_crd_file(&env.client, &real).await?;
    probes
        .create(&PostParams::default(), &probe("after", json!("later"))?)
        .await?;

    let bad = wait::for_object(
        &probes,
        "bad",
        "the bad probe to be Stalled",
        TIMEOUT,
        |p| {
            p.data["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == "Stalled" && c["status"] == "True" && c["reason"] == "Undecodable"
                })
            })
        },
    )
    .await?;
    wait::for_object(
        &probes,
        "after",
        "a probe created later to be Ready",
        TIMEOUT,
        ready_for_generation,
    )
    .await?;
    let warnings = events_about(&env.api(), bad.uid()).await?;
    ensure!(
        warnings
            .iter()
            .any(|e| e.reason.as_deref() == Some("Undecodable")
                && e.type_.as_deref() == Some("Warning")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("cannot be read"))),
        "a Warning event on the bad probe: {warnings:?}"
    );
    let replica = operator.replica("a")?;
    let counted = replica.metrics_text().await?;
    ensure!(
        counted
            .contains(r#"gantry_reconcile_errors_total{controller="probe",reason="Undecodable"}"#),
        "the skip is counted: {counted}"
    );

    // Fixed, it reconciles like any other.
    probes
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"message": "fixed"}})),
        )
        .await?;
    wait::for_object(
        &probes,
        "bad",
        "the fixed probe to be Ready",
        TIMEOUT,
        ready_for_generation,
    )
    .await?;
    Ok(())
}

// --- node agents ---------------------------------------------------------------------------

#[tokio::test]
async fn node_agents_each_count_their_own_nodes_pods_from_an_index_keyed_by_node() -> Result<()> {
    let env = TestEnv::new("kit-nodes").await?;
    let pods: Api<Pod> = env.api();
    for (name, node) in [
        ("p0", "kwok-node-0"),
        ("p1", "kwok-node-0"),
        ("p2", "kwok-node-1"),
    ] {
        let pinned = pod(name, "registry.example/app:v1", json!({"nodeName": node}))?;
        pods.create(&PostParams::default(), &pinned).await?;
    }
    let nodes = ["kwok-node-0", "kwok-node-1", "kwok-node-2"];
    // An operator's own flags at work: --node-name (one agent per node) and --probe-selector.
    let operator = Fixture::new(&env, NOOP)
        .watch_namespace()
        .value("nodeAgent.enabled", "true")
        .flag("--probe-selector=e2e.gantry.dev/count=yes")
        .per_node(&nodes)
        .start()
        .await?;
    for replica in operator.replicas() {
        poll::until(
            &format!("agent {} to be ready", replica.name),
            TIMEOUT,
            || async { Ok(replica.readyz().await.filter(|(code, _)| *code == 200)) },
        )
        .await?;
    }
    let maps: Api<ConfigMap> = env.api();
    let counted: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "count", "labels": {"e2e.gantry.dev/count": "yes"}}, "data": {"k": "v"},
    }))?;
    let counted = maps.create(&PostParams::default(), &counted).await?;
    let ignored: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "ignored", "labels": {"gantry.dev/probe": "true"}},
    }))?;
    let ignored = maps.create(&PostParams::default(), &ignored).await?;

    let events: Api<Event> = env.api();
    let notes = poll::until("an Observed event from each agent", TIMEOUT, || async {
        let by_agent: BTreeMap<String, String> = events_about(&events, counted.uid())
            .await?
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Observed"))
            .filter_map(|e| Some((e.reporting_instance?, e.note?)))
            .collect();
        Ok((by_agent.len() == nodes.len()).then_some(by_agent))
    })
    .await?;
    for (node, expected) in [("kwok-node-0", 2), ("kwok-node-1", 1), ("kwok-node-2", 0)] {
        let note = notes
            .get(node)
            .with_context(|| format!("no event from {node}"))?;
        ensure!(
            note.ends_with(&format!("{expected} pods on {node}")),
            "{node} counted its pods: {note:?}"
        );
    }
    let about_ignored = events_about(&events, ignored.uid()).await?;
    ensure!(
        about_ignored.is_empty(),
        "the default selector was replaced: {about_ignored:?}"
    );
    Ok(())
}

// --- several clusters ----------------------------------------------------------------------

fn kubeconfig_secret(name: &str, cluster: &str, kubeconfig: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(CLUSTER_LABEL.into(), cluster.into())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            KUBECONFIG_KEY.into(),
            ByteString(kubeconfig.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

#[tokio::test]
async fn one_process_works_with_two_clusters_from_a_kubeconfig_secret() -> Result<()> {
    let env = TestEnv::new("kit-clusters").await?;
    let remote_cluster = Cluster::up_temporary(&remote_cluster_spec()).await?;
    let secrets: Api<Secret> = env.api();
    secrets
        .create(
            &PostParams::default(),
            &kubeconfig_secret("remote", "remote", &remote_cluster.inline_kubeconfig()?),
        )
        .await?;
    let metrics = gantry_kit::metrics::Metrics::new("gantry-e2e", "0");
    let (clusters, follow) = clusters::watch(
        env.client.clone(),
        secrets.clone(),
        clusters::Settings {
            controller: "gantry-e2e".into(),
            instance: "e2e-0".into(),
            metrics: metrics.clusters.clone(),
            home_events: Events::new(env.client.clone(), "gantry-e2e", Some("e2e-0".into())),
        },
    );
    let following = tokio::spawn(follow);

    let remote = poll::until("the remote cluster to be reachable", TIMEOUT, || async {
        Ok(clusters.get("remote").filter(|c| c.is_reachable()))
    })
    .await?;
    let names: Vec<String> = Api::<Node>::all(remote.client().clone())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    ensure!(
        names == ["remote-node-0", "remote-node-1"],
        "the remote's own nodes: {names:?}"
    );
    let home_nodes = Api::<Node>::all(clusters.home().client().clone())
        .list(&ListParams::default())
        .await?;
    ensure!(
        home_nodes
            .items
            .iter()
            .all(|n| n.name_any().starts_with("kwok-node-"))
    );

    // An event written through the remote's writer lands in the remote cluster.
    let remote_maps: Api<ConfigMap> = Api::namespaced(remote.client().clone(), "default");
    let subject = remote_maps
        .create(
            &PostParams::default(),
            &config_map(&format!("{}-subject", env.namespace()), None, "x"),
        )
        .await?;
    remote
        .events()
        .publish(
            &subject.object_ref(&()),
            Probed(EventType::Normal),
            "from the home process",
        )
        .await;
    let remote_events = events_about(
        &Api::namespaced(remote.client().clone(), "default"),
        subject.uid(),
    )
    .await?;
    ensure!(
        remote_events.len() == 1,
        "the event is in the remote cluster: {remote_events:?}"
    );
    let metrics_text = metrics.encode()?;
    ensure!(
        metrics_text.contains(r#"gantry_cluster_reachable{cluster="remote"} 1"#),
        "{metrics_text}"
    );

    // New credentials replace the client; a server that does not answer shows in its health.
    let broken = remote_cluster.inline_kubeconfig()?.replace(
        remote_cluster.server(),
        &format!("https://{}", free_addr()?),
    );
    secrets
        .replace("remote", &PostParams::default(), &{
            let mut s = secrets.get("remote").await?;
            s.data = kubeconfig_secret("remote", "remote", &broken).data;
            s
        })
        .await?;
    poll::until(
        "the replaced client to report the cluster unreachable",
        TIMEOUT,
        || async {
            Ok(clusters
                .get("remote")
                .filter(|c| matches!(c.health(), Health::Unreachable(_)))
                .map(|_| ()))
        },
    )
    .await?;

    // A Secret that holds no kubeconfig is reported, and adds nothing.
    secrets
        .create(
            &PostParams::default(),
            &kubeconfig_secret("garbage", "garbage", "not: [a kubeconfig"),
        )
        .await?;
    let garbage = secrets.get("garbage").await?;
    poll::until("a Warning on the unusable Secret", TIMEOUT, || async {
        Ok(events_about(&env.api(), garbage.uid())
            .await?
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidKubeconfig")))
    })
    .await?;
    ensure!(clusters.get("garbage").is_none());

    // Relabelled, the Secret provides the cluster under its new name only.
    secrets
        .patch(
            "remote",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {clusters::CLUSTER_LABEL: "renamed"}}})),
        )
        .await?;
    poll::until("the cluster under its new name only", TIMEOUT, || async {
        Ok((clusters.get("remote").is_none() && clusters.get("renamed").is_some()).then_some(()))
    })
    .await?;

    secrets.delete("remote", &DeleteParams::default()).await?;
    poll::until("the remote cluster to be forgotten", TIMEOUT, || async {
        Ok(clusters.get("renamed").is_none().then_some(()))
    })
    .await?;
    ensure!(clusters.remote_names().is_empty());
    following.abort();
    Ok(())
}
