//! `gantry-cluster`: bring local clusters up and down (what `make cluster-up`, `make
//! cluster-down` and `make demo-cluster` run), and measure them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use gantry_e2e::cluster::{Cluster, ClusterSpec, NodePool};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, PostParams};

#[derive(Parser)]
#[command(
    name = "gantry-cluster",
    about = "Local Kubernetes clusters (control plane + kwok nodes) for Gantry"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster (or reuse the running one of that name) and print its kubeconfig.
    Up {
        #[arg(long, default_value = "gantry")]
        name: String,
        #[command(flatten)]
        nodes: NodeArgs,
        /// A scheduler extender, as the JSON of one `extenders` entry of
        /// KubeSchedulerConfiguration (repeatable).
        #[arg(long = "scheduler-extender")]
        extenders: Vec<String>,
    },
    /// Stop a cluster's processes and remove its state.
    Down {
        #[arg(long, default_value = "gantry", conflicts_with = "all")]
        name: String,
        /// Every cluster.
        #[arg(long)]
        all: bool,
    },
    /// List clusters and whether they are healthy.
    List,
    /// Print the admin kubeconfig path of a running cluster.
    Kubeconfig {
        #[arg(long, default_value = "gantry")]
        name: String,
    },
    /// Measure control-plane memory at idle and with many pods: starts cluster `bench`, records
    /// the resident memory of each component, creates the pods, waits until all run and
    /// measures again.
    Bench {
        #[arg(long, default_value_t = 100)]
        nodes: u32,
        #[arg(long, default_value_t = 1000)]
        pods: u32,
        /// Leave the cluster running afterwards.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Number of kwok nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Node capacity entries, e.g. `cpu=64`, `nvidia.com/gpu=8` (repeatable; added to the
    /// defaults cpu=32, memory=256Gi, pods=110, ephemeral-storage=1Ti).
    #[arg(long = "capacity", value_parser = parse_kv)]
    capacity: Vec<(String, String)>,
    /// Node labels, `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    labels: Vec<(String, String)>,
    /// Also run a real node (containerd, runc, kubelet, kube-proxy; needs root and `make
    /// node-bins`).
    #[arg(long)]
    real_node: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "info,kube_client::client::builder=off,kube_client::client::tls=error",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Up {
            name,
            nodes,
            extenders,
        } => {
            let mut pool = NodePool::new("kwok-node", nodes.nodes);
            for (k, v) in nodes.capacity {
                pool = pool.with_capacity(&k, &v);
            }
            for (k, v) in nodes.labels {
                pool = pool.with_label(&k, &v);
            }
            let scheduler_extenders = extenders
                .iter()
                .map(|e| {
                    serde_json::from_str(e).with_context(|| format!("--scheduler-extender {e}"))
                })
                .collect::<Result<Vec<serde_json::Value>>>()?;
            let spec = ClusterSpec {
                name,
                node_pools: vec![pool],
                scheduler_extenders,
                audit_log: false,
                real_node: nodes.real_node,
            };
            let started = Instant::now();
            let cluster = Cluster::up(&spec).await?;
            eprintln!(
                "cluster {:?} is up ({:.1} s; API server {}; {} kwok nodes)",
                cluster.name,
                started.elapsed().as_secs_f64(),
                cluster.server(),
                spec.node_count()
            );
            if let Some(node) = &cluster.info.real_node {
                eprintln!(
                    "real node {} Ready in {:.1} s at {}; push images to {}",
                    gantry_e2e::cluster::node::REAL_NODE_NAME,
                    node.ready_seconds,
                    node.network.node_ip(),
                    node.registry
                );
            }
            eprintln!("kubectl: {}", cluster.bins.program("kubectl").display());
            eprintln!("logs:    {}", cluster.state_dir.join("logs").display());
            eprintln!("Point kubectl at it with:");
            println!("export KUBECONFIG={}", cluster.kubeconfig().display());
        }
        Cmd::Down { name, all } => {
            let names = if all { Cluster::list() } else { vec![name] };
            for name in names {
                Cluster::down(&name)?;
                eprintln!("cluster {name:?} is down");
            }
        }
        Cmd::List => {
            for name in Cluster::list() {
                let state = match Cluster::load(&name)? {
                    None => "not running (incomplete state; `down` removes it)".to_owned(),
                    Some(c) => match c.check_health().await {
                        Ok(()) => format!("healthy, {} ({})", c.server(), c.kubeconfig().display()),
                        Err(e) => format!("unhealthy: {e:#}"),
                    },
                };
                println!("{name}\t{state}");
            }
        }
        Cmd::Kubeconfig { name } => match Cluster::load(&name)? {
            Some(c) => println!("{}", c.kubeconfig().display()),
            None => bail!("no running cluster {name:?}; start one with `make cluster-up`"),
        },
        Cmd::Bench { nodes, pods, keep } => bench(nodes, pods, keep).await?,
    }
    Ok(())
}

/// Resident memory of each component in MiB.
fn rss_by_component(cluster: &Cluster) -> BTreeMap<String, f64> {
    cluster
        .pids()
        .into_iter()
        .map(|(component, pid)| {
            let kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<f64>().ok())
                })
                .unwrap_or(0.0);
            (component, kib / 1024.0)
        })
        .collect()
}

fn print_rss(label: &str, rss: &BTreeMap<String, f64>) {
    println!("{label}:");
    for (component, mib) in rss {
        println!("  {component:<26} {mib:>8.1} MiB");
    }
    println!("  {:<26} {:>8.1} MiB", "total", rss.values().sum::<f64>());
}

async fn bench(nodes: u32, pods: u32, keep: bool) -> Result<()> {
    let spec = ClusterSpec {
        name: "bench".to_owned(),
        node_pools: vec![NodePool::new("kwok-node", nodes)],
        scheduler_extenders: Vec::new(),
        audit_log: false,
        real_node: false,
    };
    let started = Instant::now();
    let cluster = Cluster::up(&spec).await?;
    println!(
        "cluster up with {nodes} nodes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let client = cluster.client().await?;
    tokio::time::sleep(Duration::from_secs(20)).await;
    print_rss("idle", &rss_by_component(&cluster));

    let ns = "bench";
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": ns } }))?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(ns).await?.is_none() {
        namespaces
            .create(&PostParams::default(), &namespace)
            .await?;
    }
    // 10 Deployments share the pods, as a handful of services would.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let per = pods.div_ceil(10);
    let mut remaining = pods;
    let created = Instant::now();
    for i in 0..10 {
        let replicas = per.min(remaining);
        remaining -= replicas;
        if replicas == 0 {
            break;
        }
        let deployment: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": { "name": format!("load-{i}") },
            "spec": {
                "replicas": replicas,
                "selector": { "matchLabels": { "app": format!("load-{i}") } },
                "template": {
                    "metadata": { "labels": { "app": format!("load-{i}") } },
                    "spec": { "containers": [{
                        "name": "app",
                        "image": "registry.example/load:v1",
                        "resources": { "requests": { "cpu": "10m", "memory": "16Mi" } },
                    }] },
                },
            },
        }))?;
        deployments
            .create(&PostParams::default(), &deployment)
            .await?;
    }
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    loop {
        let list = pod_api.list(&ListParams::default()).await?;
        let running = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        if running >= pods as usize {
            break;
        }
        if created.elapsed() > Duration::from_secs(600) {
            bail!("only {running} of {pods} pods Running after 10 minutes");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "{pods} pods Running in {:.1} s",
        created.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    print_rss(
        &format!("{pods} pods on {nodes} nodes"),
        &rss_by_component(&cluster),
    );
    if keep {
        println!("export KUBECONFIG={}", cluster.kubeconfig().display());
    } else {
        Cluster::down("bench")?;
    }
    Ok(())
}
