//! `gray-bench`: the gray-upgrade operator on a local cluster of kwok nodes, measured.
//!
//! Creates a GrayApp of N instances, upgrades every one in place in B batches with automatic
//! promotion, and reports the wall time, the time the operator spent reconciling versus
//! waiting on pods, the API requests it made per instance (from the API server's audit log,
//! by the operator's ServiceAccount), and its peak memory and CPU. With `--scale M`, it then
//! grows the app to M instances, reports the operator's resident memory there, and rolls all
//! M out again in B batches.
//!
//! The simulated kubelet restarts a container `--restart-delay-seconds` after it stopped, so a
//! rollout can take no less than its waves (per batch, its size over maxUnavailable, rounded
//! up) times that delay: the floor, printed with the rollout's ratio to it.
//!
//!   cargo run -p gantry-e2e --bin gray-bench -- --instances 1000 --nodes 100 --batches 5

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use gantry_e2e::cluster::{Cluster, ClusterSpec, NodePool};
use gantry_e2e::manifest::dynamic_api;
use gantry_e2e::operator::{Fixture, GRAY_UPGRADE};
use gantry_e2e::testing::TestNamespace;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    instances: u32,
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    #[arg(long, default_value_t = 5)]
    batches: u32,
    /// Then grow the app to this many instances and report the operator's memory there.
    #[arg(long)]
    scale: Option<u32>,
    /// How long the simulated kubelet takes to start a stopped container again.
    #[arg(long, default_value_t = 5)]
    restart_delay_seconds: u32,
    /// The operator binary (default: a release build made with cargo).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// A flag to pass to the operator (repeatable), e.g. `--operator-flag=--reconcile-interval-ms=250`.
    #[arg(long = "operator-flag", allow_hyphen_values = true)]
    operator_flags: Vec<String>,
    /// Leave the cluster running afterwards.
    #[arg(long)]
    keep: bool,
}

/// The operator process's CPU seconds (user + system) and peak resident memory (KiB).
fn process_usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the name.
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    let hz = 100.0; // USER_HZ on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks as f64 / hz, hwm))
}

fn resident_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS"))
}

/// `gantry_reconcile_duration_seconds_sum` from the operator's metrics.
/// Seconds spent in reconciles and how many ran, from the operator's metrics.
async fn reconciles(metrics: &str) -> Result<(f64, f64)> {
    let (code, body) = gantry_e2e::http::get(metrics, "/metrics").await?;
    if code != 200 {
        bail!("metrics answered {code}");
    }
    let total = |series: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    Ok((
        total("gantry_reconcile_duration_seconds_sum"),
        total("gantry_reconcile_duration_seconds_count"),
    ))
}

/// Requests in the audit log by `user`, counted by "verb resource[/subresource]", from byte
/// `from` on.
fn audit_counts(log: &Path, user: &str, from: u64) -> Result<(BTreeMap<String, u64>, u64)> {
    let bytes = std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
    let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let mut counts = BTreeMap::new();
    for line in String::from_utf8_lossy(&bytes[start..]).lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if entry["user"]["username"] != user {
            continue;
        }
        let object = &entry["objectRef"];
        let resource = match object["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", object["resource"].as_str().unwrap_or("?")),
            None => object["resource"].as_str().unwrap_or("?").to_string(),
        };
        *counts
            .entry(format!(
                "{} {resource}",
                entry["verb"].as_str().unwrap_or("?")
            ))
            .or_insert(0) += 1;
    }
    Ok((counts, bytes.len() as u64))
}

async fn wait_status(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let start = Instant::now();
    loop {
        let app = api.get(name).await?;
        let status = app.data["status"].clone();
        if status["observedGeneration"].as_i64() == app.metadata.generation && cond(&status) {
            return Ok(status);
        }
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}; status: {status}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn template(image: &str, restart_delay_seconds: u32) -> Value {
    json!({
        "metadata": {
            "labels": {"app": "bench"},
            "annotations": {"kwok.gantry.dev/restart-delay": format!("{restart_delay_seconds}s")}
        },
        "spec": {"containers": [{"name": "app", "image": image}]}
    })
}

/// `batches` batches over `n` instances: equal counts, the last taking the rest.
fn batches(n: u32, batches: u32) -> Vec<Value> {
    let per_batch = n / batches;
    (0..batches)
        .map(|i| {
            if i + 1 == batches {
                json!({})
            } else {
                json!({"count": per_batch})
            }
        })
        .collect()
}

/// The fewest restart delays a rollout of `n` instances in `batches` batches can take: each
/// batch in waves of at most maxUnavailable (10 %, at least one).
fn waves(n: u32, batches: u32) -> u32 {
    let max_unavailable = (n / 10).max(1);
    let per_batch = n / batches;
    (0..batches)
        .map(|i| {
            let size = if i + 1 == batches {
                n - per_batch * (batches - 1)
            } else {
                per_batch
            };
            size.div_ceil(max_unavailable)
        })
        .sum()
}

/// The app's batch events: each batch's instances, duration and time away from service.
async fn print_batch_events(client: &kube::Client, namespace: &str) -> Result<()> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), namespace);
    let mut batches: Vec<(String, String)> = events
        .list(&kube::api::ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            matches!(
                e.reason.as_deref(),
                Some("BatchPromoted" | "RolloutCompleted")
            )
        })
        .map(|e| {
            let at = e.event_time.map(|t| t.0.to_string()).unwrap_or_default();
            (at, e.note.unwrap_or_default())
        })
        .collect();
    batches.sort();
    println!("batch events:");
    for (at, note) in batches {
        println!("  {at}  {note}");
    }
    println!();
    Ok(())
}

/// What watching one rollout measured.
struct Rollout {
    instances: u32,
    wall_seconds: f64,
    floor_seconds: f64,
    reconciles: f64,
    reconcile_seconds: f64,
    cpu_seconds: f64,
    peak_kib: u64,
    resident_kib: u64,
    requests: BTreeMap<String, u64>,
}

/// Where the operator runs and how to reach what measures it.
struct Probe<'a> {
    apps: &'a Api<DynamicObject>,
    audit: PathBuf,
    user: String,
    metrics: String,
    pid: u32,
}

impl Probe<'_> {
    /// Patches the template to `image` (and the batches to `batches` over `n`), and measures
    /// the rollout until every instance is Ready on it.
    async fn rollout(&self, args: &Args, n: u32, image: &str) -> Result<Rollout> {
        let (_, audit_offset) = audit_counts(&self.audit, &self.user, 0)?;
        let (cpu_before, _) = process_usage(self.pid)?;
        let (reconcile_before, reconciles_before) = reconciles(&self.metrics).await?;
        let started = Instant::now();
        let patch = json!({"spec": {
            "template": template(image, args.restart_delay_seconds),
            "update": {"batches": batches(n, args.batches)}
        }});
        self.apps
            .patch("bench", &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        let timeout = Duration::from_secs(u64::from(n) + 600);
        wait_status(self.apps, "bench", "the rollout", timeout, |s| {
            s["rollout"]["phase"] == "Completed"
                && s["updatedReplicas"].as_u64() == Some(u64::from(n))
                && s["readyReplicas"].as_u64() == Some(u64::from(n))
        })
        .await?;
        let wall_seconds = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await; // let the audit log catch up
        let (reconcile_after, reconciles_after) = reconciles(&self.metrics).await?;
        let (cpu_after, peak_kib) = process_usage(self.pid)?;
        let (requests, _) = audit_counts(&self.audit, &self.user, audit_offset)?;
        Ok(Rollout {
            instances: n,
            wall_seconds,
            floor_seconds: f64::from(waves(n, args.batches) * args.restart_delay_seconds),
            reconciles: reconciles_after - reconciles_before,
            reconcile_seconds: reconcile_after - reconcile_before,
            cpu_seconds: cpu_after - cpu_before,
            peak_kib,
            resident_kib: resident_kib(self.pid)?,
            requests,
        })
    }
}

fn is_write(request: &str) -> bool {
    ["create ", "patch ", "update ", "delete "]
        .iter()
        .any(|v| request.starts_with(v))
}

fn is_read(request: &str) -> bool {
    ["get ", "list ", "watch "]
        .iter()
        .any(|v| request.starts_with(v))
}

impl Rollout {
    fn print(&self) {
        let n = f64::from(self.instances);
        let sum = |keep: &dyn Fn(&str) -> bool| -> f64 {
            self.requests
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(_, v)| *v as f64)
                .sum::<f64>()
                / n
        };
        println!("| rollout of {} instances | value |", self.instances);
        println!("| --- | --- |");
        println!(
            "| wall time (patch → every instance Ready on the new revision, rollout Completed) | {:.1} s |",
            self.wall_seconds
        );
        println!(
            "| floor (waves × restart delay) / ratio | {:.0} s / {:.2} |",
            self.floor_seconds,
            self.wall_seconds / self.floor_seconds.max(1.0)
        );
        println!("| reconciles | {} |", self.reconciles);
        println!(
            "| time inside reconciles / operator CPU time | {:.2} s / {:.2} s |",
            self.reconcile_seconds, self.cpu_seconds
        );
        println!("| API writes per instance, all | {:.2} |", sum(&is_write));
        for kind in ["patch pods", "patch pods/status", "patch grayapps/status"] {
            println!(
                "| writes per instance: {kind} | {:.3} |",
                sum(&|k: &str| k == kind)
            );
        }
        println!(
            "| writes per instance: events | {:.3} |",
            sum(&|k: &str| is_write(k) && k.ends_with(" events"))
        );
        println!(
            "| writes per instance: other | {:.3} |",
            sum(&|k: &str| {
                is_write(k)
                    && !k.ends_with(" events")
                    && !["patch pods", "patch pods/status", "patch grayapps/status"].contains(&k)
            })
        );
        println!(
            "| API reads per instance (get/list/watch) | {:.3} |",
            sum(&is_read)
        );
        println!(
            "| operator memory: peak / resident after | {:.1} MiB / {:.1} MiB |",
            self.peak_kib as f64 / 1024.0,
            self.resident_kib as f64 / 1024.0
        );
        println!();
        println!("requests during the rollout by the operator:");
        for (k, v) in &self.requests {
            println!("  {v:>7}  {k}");
        }
        println!();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let capacity = args.scale.unwrap_or(args.instances).max(args.instances);
    let pods_per_node = capacity.div_ceil(args.nodes) + 10;
    let spec = ClusterSpec {
        name: "gray-bench".into(),
        node_pools: vec![
            NodePool::new("kwok-node", args.nodes)
                .with_capacity("pods", &pods_per_node.to_string()),
        ],
        scheduler_extenders: Vec::new(),
        audit_log: true,
        real_node: false,
    };
    eprintln!(
        "starting cluster gray-bench: {} nodes, {pods_per_node} pods each",
        args.nodes
    );
    let cluster = Cluster::up(&spec).await?;
    let result = run(&args, &cluster).await;
    if !args.keep {
        Cluster::down("gray-bench")?;
    }
    result
}

async fn run(args: &Args, cluster: &Cluster) -> Result<()> {
    let client = cluster.client().await?;
    let ns = TestNamespace::create(cluster, &client, "bench").await?;
    let namespace = ns.name.clone();
    let mut fixture = Fixture::in_namespace(cluster, &client, &namespace, GRAY_UPGRADE)
        .watch_namespace()
        .flag("--log-level=warn")
        .release_build();
    if let Some(binary) = &args.operator {
        fixture = fixture.binary(binary.clone());
    }
    for flag in &args.operator_flags {
        fixture = fixture.flag(flag);
    }
    let operator = fixture.start().await?;
    let user = format!(
        "system:serviceaccount:{namespace}:{}",
        operator.identity().service_account
    );
    let replica = operator.replica("a")?;
    let metrics = replica.metrics.to_string();
    let pid = replica.process.pid();
    let apps = dynamic_api(&client, &namespace, "apps.gantry.dev/v1alpha1", "GrayApp").await?;
    let n = args.instances;
    let app = json!({
        "apiVersion": "apps.gantry.dev/v1alpha1", "kind": "GrayApp",
        "metadata": {"name": "bench", "namespace": namespace},
        "spec": {"replicas": n, "selector": {"matchLabels": {"app": "bench"}},
                 "template": template("app:v1", args.restart_delay_seconds),
                 "update": {"maxUnavailable": "10%", "promotion": "Auto", "batches": batches(n, args.batches)}}
    });
    let created = Instant::now();
    apps.create(&PostParams::default(), &serde_json::from_value(app)?)
        .await?;
    let timeout = Duration::from_secs(u64::from(n) + 600);
    wait_status(&apps, "bench", "all instances Ready", timeout, |s| {
        s["readyReplicas"].as_u64() == Some(u64::from(n))
    })
    .await?;
    println!(
        "{n} instances on {} nodes, {} batches, maxUnavailable 10 %, restart delay {} s; user {user}",
        args.nodes, args.batches, args.restart_delay_seconds
    );
    println!(
        "creating {n} instances, until all Ready: {:.1} s",
        created.elapsed().as_secs_f64()
    );
    println!();
    let probe = Probe {
        apps: &apps,
        audit: cluster.state_dir.join("logs/audit.log"),
        user,
        metrics,
        pid,
    };
    probe.rollout(args, n, "app:v2").await?.print();
    print_batch_events(&client, &namespace).await?;

    if let Some(scale) = args.scale {
        let grown = Instant::now();
        apps.patch(
            "bench",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": scale}})),
        )
        .await?;
        let timeout = Duration::from_secs(u64::from(scale) / 5 + 900);
        wait_status(&apps, "bench", "the scaled app Ready", timeout, |s| {
            s["readyReplicas"].as_u64() == Some(u64::from(scale))
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss = resident_kib(pid)?;
        let (_, peak) = process_usage(pid)?;
        println!("| at {scale} instances, idle | value |");
        println!("| --- | --- |");
        println!(
            "| scaling {n} → {scale}, until all Ready | {:.1} s |",
            grown.elapsed().as_secs_f64()
        );
        println!(
            "| operator resident memory, settled | {:.1} MiB |",
            rss as f64 / 1024.0
        );
        println!(
            "| operator peak resident memory | {:.1} MiB |",
            peak as f64 / 1024.0
        );
        println!();
        probe.rollout(args, scale, "app:v3").await?.print();
    }
    drop(operator);
    Ok(())
}
