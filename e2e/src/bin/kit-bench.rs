//! `kit-bench`: how fast a standby of a kit-based operator (the probe, `gantry-noop`) takes
//! over, on a local cluster: after the leader is killed (its lease must expire: 15 s) and after
//! it is stopped with SIGTERM (it releases the lease), over several rounds; and how soon a new
//! replica is ready. Tests assert that takeovers happen; this reports how long they take.
//!
//!   cargo run --release -p gantry-e2e --bin kit-bench -- --rounds 3

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gantry_e2e::cluster::{Cluster, ClusterSpec};
use gantry_e2e::operator::{Fixture, NOOP, Operator};
use gantry_e2e::testing::TestNamespace;

#[derive(Parser)]
struct Args {
    /// How many times to kill and to stop the leader.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// The probe binary (default: a release build made with cargo), to compare builds.
    #[arg(long)]
    binary: Option<std::path::PathBuf>,
}

/// Polls every 20 ms until `name` reports leadership; returns how long that took.
async fn until_leading(operator: &Operator, name: &str, since: Instant) -> Result<Duration> {
    let replica = operator.replica(name)?;
    let deadline = since + Duration::from_secs(60);
    while Instant::now() < deadline {
        if replica.is_leader().await == Some(true) {
            return Ok(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{name} did not take over within 60 s")
}

/// Polls every 20 ms until `name` answers `/readyz` with 200.
async fn until_ready(operator: &Operator, name: &str, since: Instant) -> Result<Duration> {
    let replica = operator.replica(name)?;
    let deadline = since + Duration::from_secs(60);
    while Instant::now() < deadline {
        if replica.readyz().await.is_some_and(|(code, _)| code == 200) {
            return Ok(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{name} was not ready within 60 s")
}

async fn leader(operator: &Operator) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        for replica in operator.replicas() {
            if replica.is_leader().await == Some(true) {
                return Ok(replica.name.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no replica leads")
}

fn summary(samples: &[Duration]) -> String {
    let mut sorted: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    sorted.sort_by(f64::total_cmp);
    match (sorted.first(), sorted.get(sorted.len() / 2), sorted.last()) {
        (Some(min), Some(median), Some(max)) => {
            format!("{min:.2} / {median:.2} / {max:.2} s")
        }
        _ => "-".to_owned(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = Cluster::up_temporary(&ClusterSpec::new("kit-bench")).await?;
    let client = cluster.client().await?;
    let ns = TestNamespace::create(&cluster, &client, "kit-bench").await?;
    let mut fixture = Fixture::in_namespace(&cluster, &client, &ns.name, NOOP)
        .watch_namespace()
        .replicas(2)
        .release_build();
    if let Some(binary) = &args.binary {
        fixture = fixture.binary(binary.clone());
    }
    let mut operator = fixture.start().await?;
    let (mut killed, mut stopped, mut ready) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        for crash in [true, false] {
            let old = leader(&operator).await?;
            let other = operator
                .replicas()
                .iter()
                .map(|r| r.name.clone())
                .find(|n| *n != old)
                .context("a standby")?;
            // The standby polls the lease every 2 s from when it started: a random wait keeps
            // the figures from depending on how the bench's own steps line up with that.
            let jitter = Duration::from_millis(rand::random_range(0..2500));
            tokio::time::sleep(jitter).await;
            let gone = operator.remove(&old).context("the leader")?;
            let since = if crash {
                gone.process.kill().await;
                Instant::now()
            } else {
                let since = Instant::now();
                gone.process.terminate(Duration::from_secs(30)).await;
                since
            };
            let took = until_leading(&operator, &other, since).await?;
            eprintln!(
                "round {round}: {other} took over {:.2} s after {old} was {}",
                took.as_secs_f64(),
                if crash { "killed" } else { "sent SIGTERM" }
            );
            if crash {
                killed.push(took);
            } else {
                stopped.push(took);
            }
            drop(gone);
            let started = Instant::now();
            operator.spawn(&old, &[])?;
            ready.push(until_ready(&operator, &old, started).await?);
        }
    }
    println!(
        "| figure (min / median / max, {} rounds) | value |",
        args.rounds
    );
    println!("| --- | --- |");
    println!(
        "| takeover after SIGKILL of the leader (15 s lease) | {} |",
        summary(&killed)
    );
    println!(
        "| takeover after SIGTERM of the leader (lease released) | {} |",
        summary(&stopped)
    );
    println!(
        "| a new replica ready (caches synced) | {} |",
        summary(&ready)
    );
    Ok(())
}
