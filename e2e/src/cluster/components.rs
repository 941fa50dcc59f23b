//! Starting the components of a cluster: certificates and kubeconfigs, etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok and the nodes, each waited for in turn.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, Config};

use super::kubeconfig::{KubeconfigUser, client_from_kubeconfig, get_text, write_kubeconfig};
use super::node::{self, NodeStart, REAL_NODE_NAME, RealNodeInfo};
use super::spec::{AUDIT_POLICY, ClusterSpec, node_objects, node_ready};
use super::{Cluster, ClusterInfo, KWOK_NODE_LABEL, clusters_dir};
use crate::bins::{Binaries, NodeBinaries};
use crate::pki::{self, Ca};
use crate::poll::{self, Fatal};
use crate::process::{self, PidDir};

/// A port the kernel had free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

struct Layout {
    dir: PathBuf,
    pki: PathBuf,
    logs: PathBuf,
    pids: PidDir,
}

impl Layout {
    fn spawn(&self, component: &str, program: &Path, args: &[String]) -> Result<u32> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.pids.spawn(
            component,
            &mut cmd,
            &self.logs.join(format!("{component}.log")),
        )
    }
}

pub(super) async fn start(
    spec: &ClusterSpec,
    dir: &Path,
    bins: &Binaries,
    started: Instant,
) -> Result<Cluster> {
    let layout = Layout {
        dir: dir.to_owned(),
        pki: dir.join("pki"),
        logs: dir.join("logs"),
        pids: PidDir::new(dir.join("pids")),
    };
    for d in [
        &layout.pki,
        &layout.logs,
        &dir.join("etcd"),
        &dir.join("kubeconfigs"),
    ] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let pki_dir = &layout.pki;

    // A real node reaches the API server on the host's side of its link, not on loopback.
    // Its binaries are looked for first: a missing one leaves no network behind.
    let real_node = if spec.real_node {
        let node_bins = NodeBinaries::locate()?;
        Some((
            node_bins,
            node::create_network(&spec.name, &clusters_dir())?,
        ))
    } else {
        None
    };
    let api_ip: IpAddr = real_node
        .as_ref()
        .map_or(Ipv4Addr::LOCALHOST, |(_, network)| network.host_ip())
        .into();

    // --- certificates -------------------------------------------------------------------
    let ca = Ca::new(&format!("gantry-{}-ca", spec.name))?;
    let ca_crt = pki_dir.join("ca.crt");
    let ca_key = pki_dir.join("ca.key");
    std::fs::write(&ca_crt, ca.cert_pem())?;
    pki::write_private(&ca_key, &ca.key_pem())?;
    let localhost: IpAddr = Ipv4Addr::LOCALHOST.into();
    let service_ip: IpAddr = Ipv4Addr::new(10, 96, 0, 1).into();
    let (apiserver_crt, apiserver_key) = ca
        .serving(
            "kube-apiserver",
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[localhost, "::1".parse()?, service_ip, api_ip],
        )?
        .write(pki_dir, "apiserver")?;
    // The aggregation layer's front proxy: its own CA and the client certificate the API
    // server presents to aggregated API servers (components read the CA as the request-header
    // CA from kube-system/extension-apiserver-authentication).
    let front_proxy_ca = Ca::new(&format!("gantry-{}-front-proxy-ca", spec.name))?;
    let front_proxy_ca_crt = pki_dir.join("front-proxy-ca.crt");
    std::fs::write(&front_proxy_ca_crt, front_proxy_ca.cert_pem())?;
    let (proxy_client_crt, proxy_client_key) = front_proxy_ca
        .client("front-proxy-client", None)?
        .write(pki_dir, "front-proxy-client")?;
    // How the API server proves itself to kubelets (logs, exec, port-forward).
    let (kubelet_client_crt, kubelet_client_key) = ca
        .client("kube-apiserver-kubelet-client", Some("system:masters"))?
        .write(pki_dir, "apiserver-kubelet-client")?;
    let sa_key = pki_dir.join("sa.key");
    let sa_pub = pki_dir.join("sa.pub");
    let (sa_private, sa_public) = pki::key_pair_pem()?;
    pki::write_private(&sa_key, &sa_private)?;
    std::fs::write(&sa_pub, sa_public)?;

    // --- ports ----------------------------------------------------------------------------
    let etcd_port = free_port()?;
    let etcd_peer_port = free_port()?;
    let apiserver_port = free_port()?;
    let kcm_port = free_port()?;
    let scheduler_port = free_port()?;
    let server = format!("https://{api_ip}:{apiserver_port}");
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");

    // --- kubeconfigs ----------------------------------------------------------------------
    let kubeconfig_for = |stem: &str, user: &str, group: Option<&str>| -> Result<PathBuf> {
        let (crt, key) = ca.client(user, group)?.write(pki_dir, stem)?;
        let path = if stem == "admin" {
            layout.dir.join("kubeconfig")
        } else {
            layout
                .dir
                .join("kubeconfigs")
                .join(format!("{stem}.kubeconfig"))
        };
        let context = if stem == "admin" {
            format!("gantry-{}", spec.name)
        } else {
            stem.to_owned()
        };
        write_kubeconfig(
            &path,
            &context,
            &server,
            &ca_crt,
            KubeconfigUser::Cert {
                cert: &crt,
                key: &key,
            },
            None,
        )?;
        Ok(path)
    };
    let admin_kubeconfig = kubeconfig_for("admin", "kubernetes-admin", Some("system:masters"))?;
    let kcm_kubeconfig =
        kubeconfig_for("controller-manager", "system:kube-controller-manager", None)?;
    let scheduler_kubeconfig = kubeconfig_for("scheduler", "system:kube-scheduler", None)?;
    // kwok plays every kubelet; it gets the masters group rather than per-node identities.
    let kwok_kubeconfig = kubeconfig_for("kwok", "kwok-controller", Some("system:masters"))?;
    // A real kubelet is its node, as the Node authorizer and NodeRestriction expect.
    let kubelet_kubeconfig = kubeconfig_for(
        "kubelet",
        &format!("system:node:{REAL_NODE_NAME}"),
        Some("system:nodes"),
    )?;
    let proxy_kubeconfig = kubeconfig_for("kube-proxy", "system:kube-proxy", None)?;

    // --- etcd -------------------------------------------------------------------------------
    let etcd_peer = format!("http://127.0.0.1:{etcd_peer_port}");
    let etcd_args = vec![
        "--name=default".to_owned(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={etcd_peer}"),
        format!("--initial-advertise-peer-urls={etcd_peer}"),
        format!("--initial-cluster=default={etcd_peer}"),
        "--initial-cluster-state=new".to_owned(),
        // A throw-away test cluster: durability is not worth the fsync latency.
        "--unsafe-no-fsync=true".to_owned(),
        "--log-level=warn".to_owned(),
    ];
    layout.spawn("etcd", &bins.program("etcd"), &etcd_args)?;
    wait_until(
        "etcd to report healthy",
        Duration::from_secs(30),
        &layout,
        || async { Ok(etcd_healthy(etcd_port).await) },
    )
    .await?;

    // --- kube-apiserver ---------------------------------------------------------------------
    let apiserver_args = vec![
        format!("--etcd-servers={etcd_url}"),
        format!("--bind-address={api_ip}"),
        format!("--advertise-address={api_ip}"),
        format!("--secure-port={apiserver_port}"),
        format!("--cert-dir={}", pki_dir.display()),
        format!("--tls-cert-file={}", apiserver_crt.display()),
        format!("--tls-private-key-file={}", apiserver_key.display()),
        format!("--client-ca-file={}", ca_crt.display()),
        format!("--service-account-key-file={}", sa_pub.display()),
        format!("--service-account-signing-key-file={}", sa_key.display()),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
        "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
        format!(
            "--requestheader-client-ca-file={}",
            front_proxy_ca_crt.display()
        ),
        "--requestheader-allowed-names=front-proxy-client".to_owned(),
        "--requestheader-username-headers=X-Remote-User".to_owned(),
        "--requestheader-group-headers=X-Remote-Group".to_owned(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".to_owned(),
        format!("--proxy-client-cert-file={}", proxy_client_crt.display()),
        format!("--proxy-client-key-file={}", proxy_client_key.display()),
        "--authorization-mode=Node,RBAC".to_owned(),
        "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,\
         DefaultStorageClass,DefaultTolerationSeconds,NodeRestriction,Priority,\
         PodSecurity,RuntimeClass,ResourceQuota,MutatingAdmissionWebhook,\
         ValidatingAdmissionWebhook,ValidatingAdmissionPolicy"
            .to_owned(),
        "--allow-privileged=true".to_owned(),
        format!(
            "--kubelet-client-certificate={}",
            kubelet_client_crt.display()
        ),
        format!("--kubelet-client-key={}", kubelet_client_key.display()),
        "--kubelet-preferred-address-types=InternalIP".to_owned(),
        "--event-ttl=1h".to_owned(),
        "--profiling=false".to_owned(),
        "--v=1".to_owned(),
    ];
    let mut apiserver_args = apiserver_args;
    if real_node.is_none() {
        // The kubernetes Service would point at 127.0.0.1, which Endpoints may not hold;
        // nothing in a cluster of kwok nodes dials it anyway.
        apiserver_args.push("--endpoint-reconciler-type=none".to_owned());
    }
    if spec.audit_log {
        let policy = layout.dir.join("audit-policy.yaml");
        std::fs::write(&policy, AUDIT_POLICY)?;
        apiserver_args.push(format!("--audit-policy-file={}", policy.display()));
        apiserver_args.push(format!(
            "--audit-log-path={}",
            layout.dir.join("logs/audit.log").display()
        ));
        apiserver_args.push("--audit-log-format=json".to_owned());
    }
    layout.spawn(
        "kube-apiserver",
        &bins.program("kube-apiserver"),
        &apiserver_args,
    )?;
    let admin_path = admin_kubeconfig.clone();
    wait_until(
        "kube-apiserver /readyz",
        Duration::from_secs(120),
        &layout,
        || {
            let admin_path = admin_path.clone();
            async move {
                let client = client_from_kubeconfig(&admin_path).await?;
                Ok(matches!(get_text(&client, "/readyz").await, Ok(t) if t.trim() == "ok"))
            }
        },
    )
    .await?;
    let client = client_from_kubeconfig(&admin_kubeconfig).await?;

    // --- controller-manager, scheduler, kwok -------------------------------------------------
    let kcm_args = vec![
        format!("--kubeconfig={}", kcm_kubeconfig.display()),
        format!("--authentication-kubeconfig={}", kcm_kubeconfig.display()),
        format!("--authorization-kubeconfig={}", kcm_kubeconfig.display()),
        "--bind-address=127.0.0.1".to_owned(),
        format!("--secure-port={kcm_port}"),
        format!(
            "--cert-dir={}",
            dir.join("controller-manager-certs").display()
        ),
        "--leader-elect=false".to_owned(),
        "--controllers=*".to_owned(),
        "--use-service-account-credentials=true".to_owned(),
        format!("--service-account-private-key-file={}", sa_key.display()),
        format!("--root-ca-file={}", ca_crt.display()),
        format!("--cluster-signing-cert-file={}", ca_crt.display()),
        format!("--cluster-signing-key-file={}", ca_key.display()),
        "--kube-api-qps=200".to_owned(),
        "--kube-api-burst=400".to_owned(),
        "--v=1".to_owned(),
    ];
    layout.spawn(
        "kube-controller-manager",
        &bins.program("kube-controller-manager"),
        &kcm_args,
    )?;

    let scheduler_config = dir.join("scheduler-config.yaml");
    let config = serde_json::json!({
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": { "kubeconfig": scheduler_kubeconfig, "qps": 200, "burst": 400 },
        "leaderElection": { "leaderElect": false },
        "extenders": spec.scheduler_extenders,
    });
    std::fs::write(&scheduler_config, serde_yaml::to_string(&config)?)?;
    let scheduler_args = vec![
        format!("--config={}", scheduler_config.display()),
        format!(
            "--authentication-kubeconfig={}",
            scheduler_kubeconfig.display()
        ),
        format!(
            "--authorization-kubeconfig={}",
            scheduler_kubeconfig.display()
        ),
        "--bind-address=127.0.0.1".to_owned(),
        format!("--secure-port={scheduler_port}"),
        format!("--cert-dir={}", dir.join("scheduler-certs").display()),
        "--v=1".to_owned(),
    ];
    layout.spawn(
        "kube-scheduler",
        &bins.program("kube-scheduler"),
        &scheduler_args,
    )?;

    let stages = dir.join("kwok-stages.yaml");
    std::fs::write(
        &stages,
        format!(
            "{}\n---\n{}",
            include_str!("../../stages/node.yaml"),
            include_str!("../../stages/pod.yaml")
        ),
    )?;
    let kwok_args = vec![
        format!("--kubeconfig={}", kwok_kubeconfig.display()),
        format!("--config={}", stages.display()),
        format!(
            "--manage-nodes-with-label-selector={}={}",
            KWOK_NODE_LABEL.0, KWOK_NODE_LABEL.1
        ),
        "--node-lease-duration-seconds=40".to_owned(),
        "--cidr=10.0.0.0/16".to_owned(),
    ];
    layout.spawn("kwok", &bins.program("kwok"), &kwok_args)?;

    // --- nodes --------------------------------------------------------------------------------
    create_nodes(&client, spec).await?;

    let nodes: Api<Node> = Api::all(client.clone());
    let want = spec.node_count() as usize;
    let selector = format!("{}={}", KWOK_NODE_LABEL.0, KWOK_NODE_LABEL.1);
    wait_until(
        &format!("{want} kwok nodes Ready"),
        Duration::from_secs(60),
        &layout,
        || {
            let nodes = nodes.clone();
            let selector = selector.clone();
            async move {
                let list = nodes.list(&ListParams::default().labels(&selector)).await?;
                let ready = list.items.iter().filter(|n| node_ready(n)).count();
                Ok(ready == want)
            }
        },
    )
    .await?;
    for (component, port) in [
        ("kube-controller-manager", kcm_port),
        ("kube-scheduler", scheduler_port),
    ] {
        wait_until(
            &format!("{component} /healthz"),
            Duration::from_secs(60),
            &layout,
            || async move { Ok(component_healthy(port).await) },
        )
        .await?;
    }
    // The service-account controller has run once the default namespace has its account:
    // pods can be created from here on.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    wait_until(
        "the default ServiceAccount",
        Duration::from_secs(60),
        &layout,
        || {
            let accounts = accounts.clone();
            async move { Ok(accounts.get_opt("default").await?.is_some()) }
        },
    )
    .await?;

    let real_node = match &real_node {
        Some((node_bins, network)) => {
            let start = NodeStart {
                cluster: &spec.name,
                dir,
                network,
                bins,
                node_bins,
                ca_crt: &ca_crt,
                kubelet_kubeconfig: &kubelet_kubeconfig,
                proxy_kubeconfig: &proxy_kubeconfig,
            };
            Some(start_real_node(&start, &layout, &client).await?)
        }
        None => None,
    };

    let info = ClusterInfo {
        spec: spec.clone(),
        server,
        etcd: etcd_url,
        controller_manager_port: kcm_port,
        scheduler_port,
        kubeconfig: admin_kubeconfig,
        startup_seconds: started.elapsed().as_secs_f64(),
        real_node,
    };
    // Written last: its presence means the cluster finished starting.
    std::fs::write(dir.join("cluster.json"), serde_json::to_vec_pretty(&info)?)?;
    Ok(Cluster {
        name: spec.name.clone(),
        state_dir: dir.to_owned(),
        info,
        bins: bins.clone(),
    })
}

/// Starts the registry, pushes the pause image, starts containerd, the kubelet and
/// kube-proxy, and waits for the Node to be Ready.
async fn start_real_node(
    start: &NodeStart<'_>,
    layout: &Layout,
    client: &Client,
) -> Result<RealNodeInfo> {
    node::prepare_cgroups(start.cluster)?;
    let registry = node::start_registry(start, free_port()?)?;
    wait_until("the registry", Duration::from_secs(30), layout, || {
        let registry = registry.clone();
        async move { Ok(node::registry_ready(&registry).await) }
    })
    .await?;
    let pause = node::push_pause_image(start, &registry)?;
    let started = Instant::now();
    let socket = node::start_containerd(start, &registry, &pause)?;
    wait_until(
        "containerd's socket",
        Duration::from_secs(30),
        layout,
        || {
            let socket = socket.clone();
            async move { Ok(socket.exists()) }
        },
    )
    .await?;
    node::start_kubelet(start, &socket)?;
    node::start_kube_proxy(start)?;
    let nodes: Api<Node> = Api::all(client.clone());
    wait_until(
        &format!("node {REAL_NODE_NAME} Ready"),
        Duration::from_secs(120),
        layout,
        || {
            let nodes = nodes.clone();
            async move {
                Ok(nodes
                    .get_opt(REAL_NODE_NAME)
                    .await?
                    .is_some_and(|n| node_ready(&n)))
            }
        },
    )
    .await?;
    Ok(RealNodeInfo {
        network: start.network.clone(),
        registry,
        ready_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Polls `probe` until it returns true; fails after `timeout`, or at once when a component
/// process has exited.
async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    layout: &Layout,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    poll::until(what, timeout, || {
        let exited = layout
            .pids
            .entries()
            .into_iter()
            .find(|(_, pid)| !process::alive(*pid));
        let probed = probe();
        async move {
            if let Some((component, pid)) = exited {
                return Err(Fatal(format!("{component} (pid {pid}) exited")).into());
            }
            Ok(probed.await?.then_some(()))
        }
    })
    .await
}

async fn etcd_healthy(port: u16) -> bool {
    matches!(
        crate::http::get(&format!("127.0.0.1:{port}"), "/health").await,
        Ok((200, body)) if body.contains("\"health\":\"true\"")
    )
}

/// `/healthz` of a component's self-signed HTTPS endpoint (controller-manager, scheduler).
async fn component_healthy(port: u16) -> bool {
    let Ok(uri) = format!("https://127.0.0.1:{port}").parse() else {
        return false;
    };
    let mut config = Config::new(uri);
    config.accept_invalid_certs = true;
    let Ok(client) = Client::try_from(config) else {
        return false;
    };
    matches!(get_text(&client, "/healthz").await, Ok(t) if t.trim() == "ok")
}

async fn create_nodes(client: &Client, spec: &ClusterSpec) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let objects = node_objects(spec)?;
    futures::stream::iter(objects.into_iter().map(|node| {
        let api = api.clone();
        async move {
            let name = node.metadata.name.clone().unwrap_or_default();
            api.create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("creating node {name}"))
        }
    }))
    .buffer_unordered(16)
    .try_collect::<Vec<_>>()
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_files_parse_and_name_every_stage() -> Result<()> {
        let text = format!(
            "{}\n---\n{}",
            include_str!("../../stages/node.yaml"),
            include_str!("../../stages/pod.yaml")
        );
        let mut names = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            use serde::Deserialize as _;
            let value = serde_yaml::Value::deserialize(doc)?;
            assert_eq!(value["kind"].as_str(), Some("Stage"));
            names.push(
                value["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        assert_eq!(
            names,
            [
                "gantry-node-ready",
                "gantry-pod-start",
                "gantry-pod-readiness",
                "gantry-pod-kill",
                "gantry-pod-restart",
                "gantry-pod-complete",
                "gantry-pod-terminate",
                "gantry-pod-delete"
            ]
        );
        Ok(())
    }
}
