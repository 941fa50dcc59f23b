//! Where the Go binaries are: the control-plane multi-call binary and kwok, built by
//! `make k8s-bins` (e2e/cluster/build.sh).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Directory holding `k8s`, its program symlinks (`etcd`, `kube-apiserver`, ...) and `kwok`.
pub const BIN_DIR_ENV: &str = "GANTRY_K8S_BIN_DIR";
/// Root of Gantry's cache beside the repository (clusters live under `<cache>/clusters`).
pub const CACHE_ENV: &str = "GANTRY_CACHE";

/// The cache root: `$GANTRY_CACHE`, else `$HOME/.cache/gantry`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("gantry")
}

/// The located binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    /// Finds the binaries in `$GANTRY_K8S_BIN_DIR`, else in `<cache>/k8s-bins/current` (what
    /// the last `make k8s-bins` built), and fails with what to run when they are missing.
    pub fn locate() -> Result<Self> {
        let (dir, from) = match std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(dir) => (PathBuf::from(dir), format!("${BIN_DIR_ENV}")),
            None => (
                cache_dir().join("k8s-bins").join("current"),
                format!("the default location (set ${BIN_DIR_ENV} to override)"),
            ),
        };
        let bins = Self { dir };
        let missing = missing_programs(
            &bins.dir,
            &[
                "k8s",
                "kwok",
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubectl",
                "kubelet",
                "kube-proxy",
            ],
        );
        if !missing.is_empty() {
            bail!(
                "Kubernetes binaries {missing:?} not found in {} ({from}). Build them with \
                 `make k8s-bins` from the repository root (it caches them; the first build takes \
                 a while), or point ${BIN_DIR_ENV} at a directory holding them.",
                bins.dir.display()
            );
        }
        Ok(bins)
    }

    /// The path of one program (`etcd`, `kube-apiserver`, `kubectl`, `kwok`, ...).
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The programs of `names` that `dir` lacks (or holds without the execute bit).
fn missing_programs(dir: &Path, names: &[&'static str]) -> Vec<&'static str> {
    names
        .iter()
        .copied()
        .filter(|name| !is_executable(&dir.join(name)))
        .collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Directory holding what a real node runs besides the kubelet and kube-proxy (containerd,
/// its runc shim, ctr, runc, the registry, crane, pause), built by `make node-bins`
/// (e2e/node/build.sh).
pub const NODE_BIN_DIR_ENV: &str = "GANTRY_NODE_BIN_DIR";

/// The located node binaries.
#[derive(Clone, Debug)]
pub struct NodeBinaries {
    pub dir: PathBuf,
}

impl NodeBinaries {
    /// Finds them in `$GANTRY_NODE_BIN_DIR`, else in `<cache>/node-bins/current`, and fails
    /// with what to run when they are missing.
    pub fn locate() -> Result<Self> {
        let dir = std::env::var_os(NODE_BIN_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(
                || cache_dir().join("node-bins").join("current"),
                PathBuf::from,
            );
        let bins = Self { dir };
        let missing = missing_programs(
            &bins.dir,
            &[
                "containerd",
                "containerd-shim-runc-v2",
                "ctr",
                "runc",
                "registry",
                "crane",
                "pause",
            ],
        );
        if !missing.is_empty() {
            bail!(
                "node binaries {missing:?} not found in {}. Build them with `make node-bins` \
                 from the repository root (it caches them and installs the Debian packages a \
                 node needs), or point ${NODE_BIN_DIR_ENV} at a directory holding them.",
                bins.dir.display()
            );
        }
        Ok(bins)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The variable that names a prebuilt workspace binary: `GANTRY_BIN_GANTRY_NOOP` for
/// `gantry-noop`.
pub fn binary_env(binary: &str) -> String {
    format!("GANTRY_BIN_{}", binary.to_uppercase().replace('-', "_"))
}

/// One of the workspace's own binaries: the path in [`binary_env`] when set (a benchmark's
/// release build, say), else built here with cargo (`release` for benchmarks), once per
/// process. The one way tests and benchmarks find the operators they run.
pub fn workspace_binary(package: &str, binary: &str, release: bool) -> Result<PathBuf> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock, PoisonError};
    if let Some(path) = std::env::var_os(binary_env(binary)).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    static BUILT: OnceLock<Mutex<HashMap<(String, bool), PathBuf>>> = OnceLock::new();
    // Held while building: concurrent tests wait for one build instead of racing cargo.
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(path) = built.get(&(binary.to_string(), release)) {
        return Ok(path.clone());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec![
        "build",
        "--quiet",
        "-p",
        package,
        "--bin",
        binary,
        "--message-format=json",
    ];
    if release {
        args.push("--release");
    }
    let out = std::process::Command::new(cargo)
        .current_dir(repo_root())
        .args(&args)
        .output()?;
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
        .find(|p| p.ends_with(binary));
    match path {
        Some(path) => {
            built.insert((binary.to_string(), release), path.clone());
            Ok(path)
        }
        None => bail!(
            "could not build {binary} (set ${} to a built one): {}",
            binary_env(binary),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
