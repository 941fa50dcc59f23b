//! `cargo xtask generate [--check]`: regenerates `crds/*.yaml` and the charts' copies from the
//! operators' own `crd` command, and each operator chart's `values.schema.json` from the shared
//! base, or checks that the committed files are current.
//! `cargo xtask charts --helm H [--helm H2]`: lints, renders and checks every chart.

mod charts;
mod generated;
mod schemas;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use generated::{Drift, OPERATORS, Operator};

#[derive(Parser)]
#[command(name = "xtask", about = "Repository chores")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Regenerate the CRD files and the charts' values schemas (or, with --check, fail if
    /// they are stale).
    #[command(alias = "crds")]
    Generate {
        #[arg(long)]
        check: bool,
    },
    /// Lint and render every chart with each Helm binary, and check the rendered objects.
    Charts {
        /// A helm binary to check with; repeat for several (Helm 3 and Helm 4).
        #[arg(long = "helm", required = true)]
        helms: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root = repo_root()?;
    match cli.command {
        Task::Generate { check } => generate(&root, check),
        Task::Charts { helms } => charts::check_all(&root, &helms),
    }
}

fn repo_root() -> anyhow::Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask lives one level below the repository root")
}

fn generate(root: &Path, check: bool) -> anyhow::Result<()> {
    let outputs = OPERATORS
        .iter()
        .map(|op| Ok((*op, crd_output(root, op)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut planned = generated::plan(&outputs)?;
    let mut present = read_owned_files(root)?;
    for (path, content) in chart_schemas(root)? {
        if let Ok(found) = std::fs::read_to_string(root.join(&path)) {
            present.insert(path.clone(), found);
        }
        planned.insert(path, content);
    }
    let drift = generated::drift(&planned, &present);
    if check {
        if drift.is_empty() {
            println!("generated files are current ({} files)", planned.len());
            return Ok(());
        }
        for d in &drift {
            match d {
                Drift::Missing(p) => eprintln!("missing: {}", p.display()),
                Drift::Stale(p) => eprintln!("stale:   {}", p.display()),
                Drift::Orphan(p) => eprintln!("orphan:  {} (nothing generates it)", p.display()),
            }
        }
        bail!("generated files are out of date; run `make generate` and commit the result");
    }
    for d in drift {
        if let Drift::Orphan(p) = d {
            std::fs::remove_file(root.join(&p))
                .with_context(|| format!("removing {}", p.display()))?;
            println!("removed {}", p.display());
        }
    }
    for (path, content) in &planned {
        let full = root.join(path);
        if let Some(dir) = full.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&full, content).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn crd_output(root: &Path, op: &Operator) -> anyhow::Result<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(cargo)
        .current_dir(root)
        .args([
            "run",
            "--quiet",
            "--package",
            op.package,
            "--bin",
            op.binary,
            "--",
            "crd",
        ])
        .output()
        .with_context(|| format!("running {} crd", op.binary))?;
    if !output.status.success() {
        bail!(
            "`{} crd` failed: {}",
            op.binary,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{} crd` printed invalid UTF-8", op.binary))
}

/// `charts/<chart>/values.schema.json` of every chart with a `schema.json` part.
fn chart_schemas(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, String>> {
    let lib = root.join("charts/gantry-lib/schema");
    let read_json = |path: &Path| -> anyhow::Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let base = read_json(&lib.join("base.json"))?;
    let features = schemas::FEATURES
        .iter()
        .map(|f| Ok((f.to_string(), read_json(&lib.join(format!("{f}.json")))?)))
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
    let mut out = BTreeMap::new();
    let mut charts: Vec<PathBuf> = std::fs::read_dir(root.join("charts"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("schema.json").is_file())
        .collect();
    charts.sort();
    for chart in charts {
        let name = chart
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let part: schemas::ChartPart =
            serde_json::from_value(read_json(&chart.join("schema.json"))?)
                .with_context(|| format!("charts/{name}/schema.json"))?;
        let chart_yaml: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(chart.join("Chart.yaml"))
                .with_context(|| format!("reading charts/{name}/Chart.yaml"))?,
        )?;
        let privileges = schemas::Privileges::of_chart(&chart_yaml)
            .with_context(|| format!("charts/{name}/Chart.yaml"))?;
        let schema = schemas::compose(&name, &base, &features, &part, &privileges)?;
        out.insert(
            PathBuf::from(format!("charts/{name}/values.schema.json")),
            schemas::render(&schema)?,
        );
    }
    Ok(out)
}

fn read_owned_files(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, String>> {
    let mut files = BTreeMap::new();
    for dir in generated::owned_dirs() {
        let Ok(entries) = std::fs::read_dir(root.join(&dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let relative = dir.join(path.file_name().context("file has a name")?);
                let content = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                files.insert(relative, content);
            }
        }
    }
    Ok(files)
}
