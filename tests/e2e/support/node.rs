//! The node cluster: a local control plane with a node (`ControlPlaneOptions::node`), where
//! pods run. [`TestEnv::with_node`] starts it on first use; every node test of the binary
//! shares it. The node is machine-wide (one per machine), so a test of the node's own teardown
//! takes the machine for itself with [`exclusive_node`]: it waits until no test uses the shared
//! node, stops it, and the next node test starts it again.
//!
//! Also here: the images of `hack/image.sh build` (built once per test binary, imported once
//! per node), pod builders, and a snapshot of what a node may leave on the machine.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use tokio::sync::{OnceCell, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use super::{Cluster, ControlPlaneOptions, Identity, TestEnv, wait_until};

type Slot = Option<Result<Arc<Cluster>, String>>;

/// The shared node cluster; `None` until started (and after an exclusive test stopped it).
static NODE: LazyLock<Arc<RwLock<Slot>>> = LazyLock::new(|| Arc::new(RwLock::new(None)));

/// How long building the images may take (a cold static build of kubelock: about 7 min here).
const IMAGE_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Held by every [`TestEnv::with_node`]: the shared node stays up while one is alive.
pub struct NodeUse(#[allow(dead_code)] OwnedRwLockReadGuard<Slot>);

/// A node control plane (CRDs installed), whose namespaces are deleted after passing tests
/// (a namespace controller runs there).
pub async fn start_node_cluster() -> Result<Cluster, String> {
    let mut cluster = Cluster::start(ControlPlaneOptions { node: true, ..Default::default() }).await?;
    cluster.delete_namespaces = true;
    Ok(cluster)
}

/// The shared node cluster, started if it is not running. A failure to start is remembered
/// until an exclusive test resets it: the other node tests fail at once with its message.
pub(super) async fn shared_node_cluster() -> (Arc<Cluster>, NodeUse) {
    let read = NODE.clone().read_owned().await;
    let guard = if read.is_some() {
        read
    } else {
        drop(read);
        let mut write = NODE.clone().write_owned().await;
        if write.is_none() {
            *write = Some(start_node_cluster().await.map(Arc::new));
        }
        write.downgrade()
    };
    match guard.as_ref() {
        Some(Ok(cluster)) => (cluster.clone(), NodeUse(guard)),
        Some(Err(e)) => panic!("{e}"),
        None => unreachable!("set above"),
    }
}

/// The machine's node for one test alone: no test uses the shared node cluster meanwhile,
/// and it is stopped. The next node test starts it again.
pub struct ExclusiveNode(#[allow(dead_code)] OwnedRwLockWriteGuard<Slot>);

/// Waits until no test uses the shared node cluster, then stops it (if it runs).
pub async fn exclusive_node() -> ExclusiveNode {
    let mut write = NODE.clone().write_owned().await;
    if let Some(Ok(cluster)) = write.take() {
        // Every TestEnv that held it is gone (each held a read guard), so this is the last
        // reference, and dropping it stops the node.
        match Arc::try_unwrap(cluster) {
            Ok(cluster) => drop(cluster),
            Err(_) => panic!("the shared node cluster is still referenced by a test"),
        }
    }
    ExclusiveNode(write)
}

/// The cargo target directory this test binary was built in.
pub fn target_dir() -> PathBuf {
    let exe = Path::new(super::process::KUBELOCK);
    exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| repo().join("target"))
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `hack/image.sh build`, once per test binary: the kubelock and test image tarballs.
pub async fn image_tarballs() -> [PathBuf; 2] {
    static BUILT: OnceCell<Result<PathBuf, String>> = OnceCell::const_new();
    let dir = BUILT
        .get_or_init(|| async {
            let dir = target_dir().join("image");
            let logs = tempfile::Builder::new().prefix("kubelock-image-build.").tempdir().map_err(|e| e.to_string())?;
            let out = super::Cmd::new("image-build", "bash", logs.path())
                .arg(repo().join("hack/image.sh"))
                .arg("build")
                .env("CARGO_TARGET_DIR", target_dir())
                .env("IMAGE_DIR", &dir)
                .output(IMAGE_BUILD_TIMEOUT)
                .await;
            match out.status {
                Some(status) if status.success() => Ok(dir),
                other => Err(format!("hack/image.sh build: {other:?}\n{}", tail(&out.stderr, 40))),
            }
        })
        .await
        .clone()
        .unwrap_or_else(|e| panic!("{e}"));
    kubelock::devenv::IMAGE_FILES.map(|f| dir.join(f))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl TestEnv {
    /// A new namespace on the shared node cluster, whose `default` ServiceAccount has its token
    /// (pods can be created in it).
    pub async fn with_node() -> TestEnv {
        let (cluster, node_use) = shared_node_cluster().await;
        let mut env = TestEnv::on(cluster).await;
        env.node = Some(node_use);
        env.wait_for_service_account().await;
        env
    }

    /// Waits until this namespace's `default` ServiceAccount has its token.
    pub async fn wait_for_service_account(&self) {
        let accounts: Api<ServiceAccount> = self.api(Identity::Admin).await;
        wait_until(&accounts, "default", "the default ServiceAccount's token", super::TIMEOUT, |sa| {
            sa.secrets.as_ref().is_some_and(|s| !s.is_empty())
        })
        .await
        .expect("the namespace's default ServiceAccount");
    }

    /// The node of this test's control plane (panics without one).
    pub fn node(&self) -> &kubelock::devenv::NodeInfo {
        self.control_plane().node().expect("this test needs TestEnv::with_node")
    }

    /// The images `make image` writes, imported into this test's node (once per node).
    pub async fn import_images(&self) {
        static IMPORTED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
        let tarballs = image_tarballs().await;
        let cp = self.control_plane();
        let key = cp.dir().to_path_buf();
        if IMPORTED.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_default().contains(&key) {
            return;
        }
        for tar in &tarballs {
            cp.import_image(tar).await.unwrap_or_else(|e| panic!("{e}"));
        }
        IMPORTED.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_default().insert(key);
    }
}

/// A pod of one container that runs `command` in `image` (never pulled), once, and is
/// deleted at once (grace period 1 s).
pub fn pod(name: &str, image: &str, command: &[&str]) -> Pod {
    let mut container = serde_json::json!({"name": "main", "image": image, "imagePullPolicy": "Never"});
    if !command.is_empty() {
        container["command"] = serde_json::json!(command);
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [container]},
    }))
    .expect("a valid Pod")
}

/// The pod's phase (`Pending` while unknown).
pub fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

/// Whether the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What a node may leave on the machine, outside its state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostState {
    /// The sysctls the node changes.
    sysctls: BTreeMap<String, String>,
    /// `iptables|ip6tables table chain` of every KUBE-* chain.
    chains: BTreeSet<String>,
    /// Network interfaces.
    links: BTreeSet<String>,
    /// Entries of the machine-wide directories the node writes to (pod logs, CNI results,
    /// shim sockets, containerd's cgroups).
    entries: BTreeSet<PathBuf>,
}

const SYSCTLS: [&str; 6] = [
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
];

impl HostState {
    pub fn now() -> HostState {
        let sysctls = SYSCTLS
            .iter()
            .map(|k| {
                (k.to_string(), std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap_or_default().trim().into())
            })
            .collect();
        let mut chains = BTreeSet::new();
        for ipt in ["iptables", "ip6tables"] {
            for table in ["filter", "nat", "mangle", "raw"] {
                let Ok(out) = std::process::Command::new(format!("{ipt}-save")).args(["-t", table]).output() else {
                    continue;
                };
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some(chain) = line.strip_prefix(':').and_then(|l| l.split_whitespace().next())
                        && chain.starts_with("KUBE-")
                    {
                        chains.insert(format!("{ipt} {table} {chain}"));
                    }
                }
            }
        }
        let names = |dir: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
        };
        let links = names(Path::new("/sys/class/net"))
            .into_iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let mut entries = BTreeSet::new();
        for dir in ["/var/log/pods", "/var/log/containers", "/var/lib/cni", "/var/lib/cni/results", "/run/containerd"] {
            if Path::new(dir).exists() {
                entries.insert(PathBuf::from(dir));
                entries.extend(names(Path::new(dir)));
            }
        }
        for cgroup in names(Path::new("/sys/fs/cgroup")) {
            let parent = cgroup.join("k8s.io");
            if parent.is_dir() {
                entries.insert(parent.clone());
                entries.extend(names(&parent).into_iter().filter(|p| p.is_dir()));
            }
        }
        HostState { sysctls, chains, links, entries }
    }

    /// What is there now that was not in `before`, and sysctls that changed.
    pub fn added_since(&self, before: &HostState) -> Vec<String> {
        let mut problems = Vec::new();
        for (k, v) in &self.sysctls {
            if before.sysctls.get(k) != Some(v) {
                problems.push(format!("sysctl {k} is {v}, was {:?}", before.sysctls.get(k)));
            }
        }
        problems.extend(self.chains.difference(&before.chains).map(|c| format!("chain {c}")));
        problems.extend(self.links.difference(&before.links).map(|l| format!("network interface {l}")));
        problems.extend(self.entries.difference(&before.entries).map(|p| format!("{}", p.display())));
        problems
    }
}

/// What of the run with state directory `dir` is still there: the directory itself, mounts
/// under it, processes whose command line names it (every server of a node, the shims serving
/// its containerd socket, its reaper).
pub fn leftovers_of(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if dir.exists() {
        found.push(format!("state directory {}", dir.display()));
    }
    let prefix = format!("{}/", dir.display());
    for line in std::fs::read_to_string("/proc/self/mounts").unwrap_or_default().lines() {
        if let Some(point) = line.split_whitespace().nth(1)
            && point.starts_with(&prefix)
        {
            found.push(format!("mount {point}"));
        }
    }
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&*dir.to_string_lossy()) {
            found.push(format!("process {name}: {}", cmdline.trim()));
        }
    }
    found
}

/// Whether the machine's node lock is free (no node runs, none is being cleaned up).
pub fn node_lock_free() -> bool {
    let Ok(file) = std::fs::File::open(kubelock::devenv::NODE_LOCK) else { return true };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => true,
        Err(_) => false,
    }
}

/// A pod in `pods` until it is Running or finished; returns it. Fails early (with its status)
/// when it cannot start.
pub async fn wait_started(pods: &Api<Pod>, name: &str, timeout: Duration) -> Pod {
    wait_until(pods, name, "the pod to run", timeout, |p| {
        is_ready(p) || matches!(phase(p), "Succeeded" | "Failed") || waiting_reason(p).is_some()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The reason a container of the pod waits for, if it is one that does not pass by itself.
pub fn waiting_reason(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|s| {
        let reason = s.state.as_ref()?.waiting.as_ref()?.reason.clone()?;
        matches!(
            reason.as_str(),
            "ErrImageNeverPull"
                | "ErrImagePull"
                | "ImagePullBackOff"
                | "CreateContainerError"
                | "CreateContainerConfigError"
                | "InvalidImageName"
                | "CrashLoopBackOff"
        )
        .then_some(reason)
    })
}
