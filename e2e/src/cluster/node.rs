//! A real node beside the kwok nodes: containerd with runc and Debian's CNI plugins, the
//! kubelet and kube-proxy, pulling from a registry of the cluster's own.
//!
//! The node lives in a network namespace of its own (`gantry-<cluster>`), linked to the host
//! by a veth pair on 10.250.<n>.0/24: the host side (.1) is where the API server and the
//! registry listen for it, the node side (.2) is the node's InternalIP, and its pods get
//! 10.244.<n>.0/24 behind a bridge inside the namespace. So two clusters with real nodes keep
//! their iptables rules, ports and conntrack apart, and deleting the namespace removes every
//! interface and rule the node made. Its processes (and the pods' containers) live under the
//! cgroup `/gantry-<cluster>` in every hierarchy, which is how teardown finds them all.
//!
//! Needs root: namespaces, cgroups and mounts.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::bins::{Binaries, NodeBinaries};
use crate::process::{FileLock, PidDir};

/// The name the real node registers as.
pub const REAL_NODE_NAME: &str = "real-node";
/// The label every real node carries (kwok nodes carry `type=kwok`).
pub const REAL_NODE_LABEL: (&str, &str) = ("gantry.dev/node", "real");
/// The taint that keeps pods off the real node unless they tolerate it.
pub const REAL_NODE_TAINT: &str = "gantry.dev/real-node";
/// The pause image's repository in the cluster's registry.
const PAUSE_REPOSITORY: &str = "gantry/pause";
/// The pause image's tag: bumped when the pause program changes meaning.
const PAUSE_TAG: &str = "1";

/// The addresses of a cluster's real node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeNetwork {
    /// Network namespace (a file under /run/netns).
    pub netns: String,
    /// n in 10.250.n.0/24 and 10.244.n.0/24.
    pub index: u8,
}

impl NodeNetwork {
    /// The host's side of the link: where the API server and the registry listen for the node.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.index, 1)
    }

    /// The node's InternalIP.
    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.index, 2)
    }

    /// The node's pod network.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    fn host_link(&self) -> String {
        format!("gantry{}h", self.index)
    }

    fn node_link(&self) -> String {
        format!("gantry{}n", self.index)
    }

    fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }
}

/// What a running cluster recorded about its real node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RealNodeInfo {
    pub network: NodeNetwork,
    /// `127.0.0.1:<port>`: push here; pods name images `<registry>/<repository>:<tag>`.
    pub registry: String,
    /// Seconds from starting containerd to the Node being Ready.
    pub ready_seconds: f64,
}

fn netns_of(cluster: &str) -> String {
    format!("gantry-{cluster}")
}

/// Where `ip netns` keeps a named namespace.
fn netns_path(netns: &str) -> PathBuf {
    Path::new("/run/netns").join(netns)
}

fn cgroup_of(cluster: &str) -> String {
    format!("gantry-{cluster}")
}

fn run(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Fails unless this process may make namespaces, cgroups and mounts.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("a real node needs root (network namespaces, cgroups and mounts)");
    }
    Ok(())
}

/// Creates the node's network namespace and its link to the host, on the lowest free n.
pub(super) fn create_network(cluster: &str, clusters_dir: &Path) -> Result<NodeNetwork> {
    require_root()?;
    // Two clusters starting at once must not pick the same n.
    let _lock = FileLock::acquire(&clusters_dir.join(".network.lock"))?;
    let used = ip(&["-4", "-o", "addr", "show"])?;
    let index = (1..=250u8)
        .find(|n| !used.contains(&format!("inet 10.250.{n}.")))
        .context("every 10.250.n.0/24 link for real nodes is taken")?;
    let network = NodeNetwork {
        netns: netns_of(cluster),
        index,
    };
    let (ns, host, node) = (
        network.netns.as_str(),
        network.host_link(),
        network.node_link(),
    );
    ip(&["netns", "add", ns])?;
    ip(&["link", "add", &host, "type", "veth", "peer", "name", &node])?;
    ip(&["link", "set", &node, "netns", ns])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/24", network.host_ip()),
        "dev",
        &host,
    ])?;
    ip(&["link", "set", &host, "up"])?;
    let node_ip = format!("{}/24", network.node_ip());
    for args in [
        vec!["addr", "add", node_ip.as_str(), "dev", node.as_str()],
        vec!["link", "set", node.as_str(), "up"],
        vec!["link", "set", "lo", "up"],
    ] {
        let mut full = vec!["-n", ns];
        full.extend(args);
        ip(&full)?;
    }
    let gateway = network.host_ip().to_string();
    ip(&["-n", ns, "route", "add", "default", "via", &gateway])?;
    // The API server reaches webhook pods at their own addresses.
    let node_ip = network.node_ip().to_string();
    ip(&["route", "add", &network.pod_cidr(), "via", &node_ip])?;
    Ok(network)
}

/// The cgroup hierarchies mounted on this machine: each v1 hierarchy (`/sys/fs/cgroup/<name>`)
/// and the unified one where a hybrid machine mounts it (runc makes a container's cgroup there
/// too).
fn cgroup_hierarchies() -> Result<Vec<PathBuf>> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "cgroup" || kind == "cgroup2").then(|| PathBuf::from(path))
        })
        .collect())
}

/// Creates `/<cgroup>` and `/<cgroup>/agents` in every hierarchy (the kubelet insists that its
/// cgroup root exists in all of them), with cpuset's CPUs and memory nodes copied from the
/// parent, which a new cpuset does not inherit.
fn create_cgroups(cgroup: &str) -> Result<()> {
    for hierarchy in cgroup_hierarchies()? {
        for relative in [cgroup.to_owned(), format!("{cgroup}/agents")] {
            let dir = hierarchy.join(&relative);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let parent = dir.parent().map(|p| p.join(file));
                if let Some(parent) = parent.filter(|p| p.exists()) {
                    std::fs::write(dir.join(file), std::fs::read(parent)?)?;
                }
            }
        }
    }
    Ok(())
}

/// Moves `pid` into `/<cgroup>/agents` in every hierarchy.
fn join_cgroups(cgroup: &str, pid: u32) -> Result<()> {
    for hierarchy in cgroup_hierarchies()? {
        let procs = hierarchy.join(cgroup).join("agents").join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", procs.display()))?;
    }
    Ok(())
}

/// `root` and every cgroup below it, each before its children.
fn cgroup_tree(root: PathBuf) -> Vec<PathBuf> {
    let mut tree = Vec::new();
    let mut pending = vec![root];
    while let Some(dir) = pending.pop() {
        if let Ok(read) = std::fs::read_dir(&dir) {
            pending.extend(read.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        tree.push(dir);
    }
    tree
}

/// Every process under `/<cgroup>` (the node's agents, shims and the pods' containers).
fn cgroup_members(cgroup: &str) -> Vec<u32> {
    cgroup_tree(Path::new("/sys/fs/cgroup/pids").join(cgroup))
        .into_iter()
        .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Removes `/<cgroup>` from every hierarchy, deepest first.
fn remove_cgroups(cgroup: &str) -> Result<()> {
    for hierarchy in cgroup_hierarchies().unwrap_or_default() {
        let root = hierarchy.join(cgroup);
        if !root.exists() {
            continue;
        }
        for dir in cgroup_tree(root).iter().rev() {
            std::fs::remove_dir(dir)
                .with_context(|| format!("removing cgroup {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first; equal paths (mounts stacked on one point) side by side for dedup.
    points.sort_by(|a, b| {
        let depth = |p: &PathBuf| p.components().count();
        depth(b).cmp(&depth(a)).then_with(|| a.cmp(b))
    });
    points.dedup();
    points
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(raw: &str) -> PathBuf {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(byte) = u8::from_str_radix(&code, 8) {
                out.push(char::from(byte));
                continue;
            }
            out.push(c);
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    PathBuf::from(out)
}

/// Detaches every mount below `dir` (pods' volumes, containers' root filesystems, the
/// kubelet's own bind mount, pod network namespaces), and fails if one stays.
pub(super) fn unmount_all_under(dir: &Path) -> Result<()> {
    for _ in 0..5 {
        let points = mounts_under(dir);
        if points.is_empty() {
            return Ok(());
        }
        for point in points {
            let Ok(c_path) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: umount2 reads a NUL-terminated path; no other preconditions.
            unsafe {
                libc::umount2(c_path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        bail!("mounts under {} would not go: {left:?}", dir.display())
    }
}

/// Removes what a real node of `cluster` left on the host, whether it ran to the end or
/// crashed: every process in its cgroup, the mounts under `state_dir`, its network namespace
/// (with its links, routes and rules) and its cgroups. Does nothing for a cluster that never
/// had one.
pub(super) fn teardown(cluster: &str, state_dir: &Path) -> Result<()> {
    let cgroup = cgroup_of(cluster);
    let netns = netns_path(&netns_of(cluster));
    let has_cgroup = Path::new("/sys/fs/cgroup/pids").join(&cgroup).exists();
    if !has_cgroup && !netns.exists() && mounts_under(state_dir).is_empty() {
        return Ok(());
    }
    for _ in 0..50 {
        let members = cgroup_members(&cgroup);
        if members.is_empty() {
            break;
        }
        for pid in members {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unmount_all_under(state_dir)?;
    if netns.exists() {
        ip(&["netns", "delete", &netns_of(cluster)])?;
    }
    remove_cgroups(&cgroup)
}

/// What starting a real node needs from the cluster being started.
pub(super) struct NodeStart<'a> {
    pub cluster: &'a str,
    pub dir: &'a Path,
    pub network: &'a NodeNetwork,
    pub bins: &'a Binaries,
    pub node_bins: &'a NodeBinaries,
    pub ca_crt: &'a Path,
    pub kubelet_kubeconfig: &'a Path,
    pub proxy_kubeconfig: &'a Path,
}

impl NodeStart<'_> {
    fn node_dir(&self) -> PathBuf {
        self.dir.join("node")
    }

    fn spawn(
        &self,
        component: &str,
        program: &Path,
        args: &[String],
        in_netns: bool,
    ) -> Result<u32> {
        let logs = self.dir.join("logs");
        let mut command = if in_netns {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", self.network.netns_path().display()))
                .arg("--")
                .arg(program);
            c
        } else {
            Command::new(program)
        };
        command
            .args(args)
            // CNI plugins and kube-proxy run iptables; a test's PATH may lack the sbin dirs.
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            );
        let pid = PidDir::new(self.dir.join("pids")).spawn(
            component,
            &mut command,
            &logs.join(format!("{component}.log")),
        )?;
        join_cgroups(&cgroup_of(self.cluster), pid)?;
        Ok(pid)
    }
}

/// Starts the registry on loopback and on the host side of the node's link; returns
/// `127.0.0.1:<port>`.
pub(super) fn start_registry(start: &NodeStart<'_>, port: u16) -> Result<String> {
    let dir = start.node_dir().join("registry");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.yaml");
    let doc = serde_json::json!({
        "version": 0.1,
        "log": { "level": "warn", "accesslog": { "disabled": true } },
        "storage": {
            "filesystem": { "rootdirectory": dir.join("data") },
            "delete": { "enabled": true },
        },
        "http": { "addr": format!("127.0.0.1:{port}") },
    });
    std::fs::write(&config, serde_yaml::to_string(&doc)?)?;
    let loopback = format!("127.0.0.1:{port}");
    let args = [
        config.display().to_string(),
        loopback.clone(),
        format!("{}:{port}", start.network.host_ip()),
    ];
    start.spawn(
        "registry",
        &start.node_bins.program("registry"),
        &args,
        false,
    )?;
    Ok(loopback)
}

/// Whether the registry answers its API's version check.
pub(super) async fn registry_ready(registry: &str) -> bool {
    matches!(crate::http::get(registry, "/v2/").await, Ok((200, _)))
}

/// The pause image's reference in a cluster's registry (`127.0.0.1:<port>`).
pub fn pause_image(registry: &str) -> String {
    format!("{registry}/{PAUSE_REPOSITORY}:{PAUSE_TAG}")
}

/// Builds the pause image from the pause program with crane and pushes it; returns its
/// reference.
pub(super) fn push_pause_image(start: &NodeStart<'_>, registry: &str) -> Result<String> {
    let work = start.node_dir().join("images").join("pause");
    std::fs::create_dir_all(work.join("root"))?;
    std::fs::copy(
        start.node_bins.program("pause"),
        work.join("root").join("pause"),
    )?;
    let layer = work.join("layer.tar");
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(work.join("root"))
        .arg("-cf")
        .arg(&layer)
        .arg("pause"))?;
    let reference = pause_image(registry);
    let crane = start.node_bins.program("crane");
    run(Command::new(&crane)
        .args(["append", "--oci-empty-base", "-f"])
        .arg(&layer)
        .args(["-t", &reference]))?;
    run(Command::new(&crane).args([
        "mutate",
        &reference,
        "--entrypoint=/pause",
        "--set-platform=linux/amd64",
        "-t",
        &reference,
    ]))?;
    Ok(reference)
}

/// Writes containerd's configuration (its own root, state, socket, CNI and registry hosts)
/// and the CNI network, and starts containerd in the node's namespace; returns its socket.
pub(super) fn start_containerd(
    start: &NodeStart<'_>,
    registry: &str,
    pause: &str,
) -> Result<PathBuf> {
    let dir = start.node_dir().join("containerd");
    let (root, state) = (dir.join("root"), dir.join("state"));
    let (cni_conf, hosts) = (
        start.node_dir().join("cni").join("net.d"),
        dir.join("certs.d"),
    );
    for d in [&root, &state, &cni_conf, &hosts.join(registry)] {
        std::fs::create_dir_all(d)?;
    }
    let socket = state.join("containerd.sock");
    // The node pulls `127.0.0.1:<port>/...` from the host's side of its link.
    let port = registry.rsplit(':').next().unwrap_or_default();
    std::fs::write(
        hosts.join(registry).join("hosts.toml"),
        format!(
            "server = \"http://{host}:{port}\"\n[host.\"http://{host}:{port}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            host = start.network.host_ip()
        ),
    )?;
    std::fs::write(cni_conf.join("10-gantry.conflist"), cni_network(start)?)?;
    let config = containerd_config(start, &root, &state, &socket, &cni_conf, &hosts, pause);
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config)?;
    let args = [format!("--config={}", config_path.display())];
    start.spawn(
        "containerd",
        &start.node_bins.program("containerd"),
        &args,
        true,
    )?;
    Ok(socket)
}

fn cni_network(start: &NodeStart<'_>) -> Result<String> {
    let doc = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "gantry",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": start.network.pod_cidr() }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": start.node_dir().join("cni").join("ipam"),
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
        ],
    });
    Ok(serde_json::to_string_pretty(&doc)?)
}

fn containerd_config(
    start: &NodeStart<'_>,
    root: &Path,
    state: &Path,
    socket: &Path,
    cni_conf: &Path,
    hosts: &Path,
    pause: &str,
) -> String {
    let runc = start.node_bins.program("runc");
    let runc_root = state.join("runc");
    format!(
        r#"version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{hosts}"

[plugins.'io.containerd.cri.v1.runtime']
  # Without CAP_SYS_RESOURCE no process may lower an oom_score_adj below its own.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
        Root = "{runc_root}"
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

# NRI's socket is one fixed path per machine; two nodes would fight over it.
[plugins.'io.containerd.nri.v1.nri']
  disable = true
"#,
        root = root.display(),
        state = state.display(),
        socket = socket.display(),
        hosts = hosts.display(),
        runc = runc.display(),
        runc_root = runc_root.display(),
        cni_conf = cni_conf.display(),
    )
}

/// Writes the kubelet's configuration and starts it in the node's namespace.
pub(super) fn start_kubelet(start: &NodeStart<'_>, containerd_socket: &Path) -> Result<()> {
    let dir = start.node_dir().join("kubelet");
    let pod_logs = start.node_dir().join("pod-logs");
    for d in [&dir, &pod_logs] {
        std::fs::create_dir_all(d)?;
    }
    let config = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // Kubernetes 1.34 still runs on cgroup v1 (the only kind this machine has) when asked.
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{}", cgroup_of(start.cluster)),
        "containerRuntimeEndpoint": format!("unix://{}", containerd_socket.display()),
        "podLogsDir": pod_logs,
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "failSwapOn": false,
        // Without CAP_SYS_RESOURCE these cannot be raised; the defaults would only log errors.
        "oomScoreAdj": 0,
        "maxOpenFiles": 20000,
        // Pods get no host resolver: their DNS must stay inside the cluster.
        "resolvConf": "",
        "clusterDomain": "cluster.local",
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
            "imagefs.inodesFree": "1%",
        },
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true },
            "x509": { "clientCAFile": start.ca_crt },
        },
        "authorization": { "mode": "Webhook" },
        "registerWithTaints": [{ "key": REAL_NODE_TAINT, "value": "true", "effect": "NoSchedule" }],
        "serializeImagePulls": false,
    });
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, serde_yaml::to_string(&config)?)?;
    let args = [
        format!("--config={}", config_path.display()),
        format!("--kubeconfig={}", start.kubelet_kubeconfig.display()),
        format!("--root-dir={}", dir.join("root").display()),
        format!("--cert-dir={}", dir.join("pki").display()),
        format!("--hostname-override={REAL_NODE_NAME}"),
        format!("--node-ip={}", start.network.node_ip()),
        format!("--node-labels={}={}", REAL_NODE_LABEL.0, REAL_NODE_LABEL.1),
        "--v=1".to_owned(),
    ];
    start.spawn("kubelet", &start.bins.program("kubelet"), &args, true)?;
    Ok(())
}

/// Writes kube-proxy's configuration and starts it in the node's namespace.
pub(super) fn start_kube_proxy(start: &NodeStart<'_>) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": { "kubeconfig": start.proxy_kubeconfig },
        "hostnameOverride": REAL_NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": "10.244.0.0/16",
        "bindAddress": start.network.node_ip().to_string(),
        "healthzBindAddress": format!("{}:10256", start.network.node_ip()),
        "metricsBindAddress": "127.0.0.1:10249",
        "oomScoreAdj": 0,
        "nodePortAddresses": ["primary"],
        // Left alone: NodePorts on localhost would need route_localnet, the conntrack table's
        // size is the machine's (read-only in a namespace), timeouts stay the kernel's.
        "iptables": { "localhostNodePorts": false },
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    });
    let path = start.node_dir().join("kube-proxy.yaml");
    std::fs::write(&path, serde_yaml::to_string(&config)?)?;
    let args = [format!("--config={}", path.display()), "--v=1".to_owned()];
    start.spawn("kube-proxy", &start.bins.program("kube-proxy"), &args, true)?;
    Ok(())
}

/// Prepares the node's cgroups: what [`NodeStart`]'s processes join.
pub(super) fn prepare_cgroups(cluster: &str) -> Result<()> {
    create_cgroups(&cgroup_of(cluster))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(
            unescape_mount_path(r"/var/lib/a\040b\011c\134d"),
            PathBuf::from("/var/lib/a b\tc\\d")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn a_node_network_keeps_its_addresses_in_its_own_ranges() {
        let network = NodeNetwork {
            netns: "gantry-x".into(),
            index: 7,
        };
        assert_eq!(network.host_ip(), Ipv4Addr::new(10, 250, 7, 1));
        assert_eq!(network.node_ip(), Ipv4Addr::new(10, 250, 7, 2));
        assert_eq!(network.pod_cidr(), "10.244.7.0/24");
        // Interface names must fit IFNAMSIZ (15 bytes and a NUL).
        let longest = NodeNetwork {
            netns: "gantry-x".into(),
            index: 250,
        };
        assert!(longest.host_link().len() <= 15 && longest.node_link().len() <= 15);
    }
}
