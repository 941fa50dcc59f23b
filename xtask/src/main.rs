//! `cargo xtask crds [--check]`: regenerates `crds/*.yaml` and the charts' copies from the
//! operators' own `crd` command, or checks that the committed files are current.
//! `cargo xtask charts --helm H [--helm H2]`: lints, renders and checks every chart.

mod charts;
mod generated;

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
    /// Regenerate the CRD files from the operators (or, with --check, fail if they are stale).
    Crds {
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
        Task::Crds { check } => crds(&root, check),
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

fn crds(root: &Path, check: bool) -> anyhow::Result<()> {
    let outputs = OPERATORS
        .iter()
        .map(|op| Ok((*op, crd_output(root, op)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let planned = generated::plan(&outputs)?;
    let present = read_owned_files(root)?;
    let drift = generated::drift(&planned, &present);
    if check {
        if drift.is_empty() {
            println!("generated CRD files are current ({} files)", planned.len());
            return Ok(());
        }
        for d in &drift {
            match d {
                Drift::Missing(p) => eprintln!("missing: {}", p.display()),
                Drift::Stale(p) => eprintln!("stale:   {}", p.display()),
                Drift::Orphan(p) => eprintln!("orphan:  {} (nothing generates it)", p.display()),
            }
        }
        bail!("generated files are out of date; run `make crds` and commit the result");
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
