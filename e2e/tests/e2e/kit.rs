//! End-to-end tests of the kit's pieces that talk to the API server on their own: the event
//! writer's series and the owned-object index. Run with `make test-e2e`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use gantry_e2e::testing::{TestEnv, wait_for};
use gantry_kit::events::{EventType, Events, Reason};
use gantry_kit::index;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};

const TIMEOUT: Duration = Duration::from_secs(30);

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

    let written: Api<Event> = env.api();
    let list = written.list(&ListParams::default()).await?.items;
    let about_subject: Vec<&Event> = list
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.clone()) == subject.uid())
        .collect();
    ensure!(
        about_subject.len() == 2,
        "three repeats and one different event should make two events, got {}",
        about_subject.len()
    );
    let same = about_subject
        .iter()
        .find(|e| e.note.as_deref() == Some("the same note"))
        .ok_or_else(|| anyhow::anyhow!("the repeated event is missing"))?;
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
        .ok_or_else(|| anyhow::anyhow!("the different event is missing"))?;
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
    let driver = tokio::spawn(fill);
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
    wait_for(
        "the index to see c created and a deleted",
        TIMEOUT,
        || async { Ok((values(&index) == ["2", "3"]).then_some(())) },
    )
    .await?;
    driver.abort();
    Ok(())
}
