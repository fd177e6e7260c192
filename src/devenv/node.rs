//! The local node ([`ControlPlaneOptions::node`](super::ControlPlaneOptions::node)): containerd
//! (runc, a CNI bridge), kubelet, kube-controller-manager, kube-scheduler and kube-proxy beside
//! etcd and kube-apiserver, so that pods really run on this machine.
//!
//! `src/devenv/node.sh` (embedded, like the control-plane script) checks the machine, writes the
//! node's configuration and argument files into the state directory, and cleans up what the
//! node leaves behind: containers and their shims outlive containerd by design, and the
//! kubelet leaves mounts, a bridge and iptables chains. The [`ControlPlane`] runs every process
//! itself, the same way as etcd and kube-apiserver, and runs that cleanup when it stops; its
//! reaper runs it when the owner was killed.
//!
//! One node per machine: the bridge, the kubelet's port 10250, the pod subnet, the pods' cgroup
//! and the KUBE-* chains are machine-wide. The owner holds an exclusive lock on [`NODE_LOCK`],
//! and so does its reaper (the lock file is its stdout) until the node is cleaned up.

use std::{
    fs, io,
    io::{Seek as _, Write as _},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::Api;

use super::{ControlPlane, DevError, Identity, POLL, log_tail};

/// The node script, embedded so that `kubelock dev --node` works from any directory.
pub(super) const SCRIPT: &str = include_str!("node.sh");
/// The machine-wide lock of the local node; it holds `<owner pid> <state directory>`.
pub const NODE_LOCK: &str = "/run/kubelock/node.lock";
/// What the reaper's cleanup printed, the last time it ran (after its owner was killed).
pub const CLEANUP_LOG: &str = "/run/kubelock/node-cleanup.log";
/// The kubelock image `make image` writes (`target/image/kubelock.oci.tar`).
pub const IMAGE: &str = "docker.io/library/kubelock:dev";
/// The test image `make image` writes (`target/image/kubelock-test.oci.tar`): busybox and kubelock.
pub const TEST_IMAGE: &str = "docker.io/library/kubelock-test:dev";
/// File names of the two image tarballs in the directory `make image` writes them to.
pub const IMAGE_FILES: [&str; 2] = ["kubelock.oci.tar", "kubelock-test.oci.tar"];

/// How long a lock whose owner is gone may stay held while its reaper cleans up.
const CLEANUP_WAIT: Duration = Duration::from_secs(90);
/// How long containerd gets to answer on its socket.
const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(30);

/// The local node of a [`ControlPlane`].
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The Node's name.
    pub name: String,
    /// The machine's IPv4 address: the Node's InternalIP, where kube-apiserver listens for pods.
    pub address: String,
    /// containerd's socket (`ctr --address <it> -n k8s.io ...`).
    pub containerd_socket: PathBuf,
    /// The pods' addresses (CIDR).
    pub pod_subnet: String,
    /// The sandbox image, compiled here and imported at start.
    pub pause_image: String,
    pub(super) pause_tar: PathBuf,
}

/// The exclusive lock on [`NODE_LOCK`].
#[derive(Debug)]
pub(super) struct MachineLock {
    file: fs::File,
}

impl MachineLock {
    /// Takes the lock. When its holder is gone, waits for its reaper to finish cleaning up;
    /// when it runs, fails at once naming it.
    pub(super) async fn acquire() -> Result<MachineLock, DevError> {
        if !rustix::process::geteuid().is_root() {
            return Err(DevError::NodeUnavailable {
                reason: "the local node needs root (containerd, runc, mounts, a bridge, iptables): run as root".into(),
            });
        }
        let path = Path::new(NODE_LOCK);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(super::io_err(format!("creating {}", dir.display())))?;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(super::io_err(format!("opening {NODE_LOCK}")))?;
        let deadline = Instant::now() + CLEANUP_WAIT;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(MachineLock { file }),
                Err(rustix::io::Errno::WOULDBLOCK) => {}
                Err(e) => return Err(DevError::Io { what: format!("locking {NODE_LOCK}"), source: e.into() }),
            }
            let text = fs::read_to_string(path).unwrap_or_default();
            let mut fields = text.split_whitespace();
            let owner = fields.next().and_then(|p| p.parse::<i32>().ok());
            let dir = fields.next().unwrap_or("unknown");
            let owner_alive = owner.and_then(rustix::process::Pid::from_raw).is_some_and(|pid| {
                // Signal 0: does it exist (a zombie counts, but an owner is not left a zombie for long).
                rustix::process::test_kill_process(pid).is_ok()
            });
            if owner_alive {
                return Err(DevError::NodeBusy {
                    holder: format!("owner pid {}, state directory {dir}", owner.unwrap_or_default()),
                });
            }
            if Instant::now() >= deadline {
                return Err(DevError::NodeBusy {
                    holder: format!(
                        "its owner (pid {}, state directory {dir}) is gone but its cleanup still holds {NODE_LOCK} \
                         after {CLEANUP_WAIT:?}; see {CLEANUP_LOG}",
                        owner.map_or_else(|| "unknown".to_string(), |p| p.to_string())
                    ),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Writes `<pid> <dir>` into the lock file, for `node.sh load` and for error messages.
    pub(super) fn record(&mut self, dir: &Path) -> Result<(), DevError> {
        let what = || format!("writing {NODE_LOCK}");
        self.file.set_len(0).map_err(super::io_err(what()))?;
        self.file.rewind().map_err(super::io_err(what()))?;
        writeln!(self.file, "{} {}", std::process::id(), dir.display()).map_err(super::io_err(what()))
    }

    /// Another handle on the same open file (so the same lock), for the reaper.
    pub(super) fn share(&self) -> Result<fs::File, DevError> {
        self.file.try_clone().map_err(super::io_err(format!("duplicating the handle of {NODE_LOCK}")))
    }
}

/// What `node.sh preflight` says about this machine: its address, or what is missing.
pub(super) async fn preflight(script: &Path) -> Result<String, DevError> {
    let out = script_command(script, "preflight", None)
        .output()
        .await
        .map_err(super::io_err("running bash (node.sh preflight)"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr
            .trim()
            .trim_start_matches("node: error: ")
            .trim_start_matches("this machine cannot run the local node:")
            .trim()
            .to_string();
        return Err(DevError::NodeUnavailable { reason });
    }
    let address = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if address.is_empty() {
        return Err(DevError::NodeUnavailable { reason: "node.sh preflight printed no address".into() });
    }
    Ok(address)
}

/// `node.sh STEP [DIR]` under the parent-death signal (so it dies with us).
pub(super) fn script_command(script: &Path, step: &str, dir: Option<&Path>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "bash"])
        .arg(script)
        .arg(step)
        .args(dir)
        .env("KUBELOCK_SCRIPT_NAME", "src/devenv/control-plane.sh")
        .env("KUBELOCK_NODE_SCRIPT_NAME", "src/devenv/node.sh")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `node.sh cleanup DIR` to completion (from `stop`, so synchronously).
pub(super) fn cleanup(dir: &Path) -> Result<(), String> {
    let out = std::process::Command::new("bash")
        .arg(dir.join("node.sh"))
        .arg("cleanup")
        .arg(dir)
        .env("KUBELOCK_NODE_SCRIPT_NAME", "src/devenv/node.sh")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running bash: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(format!("node.sh cleanup failed ({}): {stderr}", out.status));
    }
    if stderr.is_empty() { Ok(()) } else { Err(stderr) }
}

/// Mount points under `dir` (from `/proc/self/mounts`).
pub(super) fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

impl ControlPlane {
    /// The local node, if this control plane has one.
    pub fn node(&self) -> Option<&NodeInfo> {
        self.node.as_ref()
    }

    fn node_or_err(&self) -> Result<&NodeInfo, DevError> {
        self.node.as_ref().ok_or(DevError::NoNode)
    }

    /// `ctr --address <the node's containerd> -n k8s.io ARGS`.
    fn ctr(&self, args: &[&std::ffi::OsStr]) -> Result<tokio::process::Command, DevError> {
        let node = self.node_or_err()?;
        let mut cmd = tokio::process::Command::new("ctr");
        cmd.arg("--address").arg(&node.containerd_socket).args(["-n", "k8s.io"]).args(args);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        Ok(cmd)
    }

    /// Imports an OCI image tarball (as `make image` writes them) into the node's containerd,
    /// under the name it carries. Pods use it with `imagePullPolicy: Never` (or `IfNotPresent`).
    pub async fn import_image(&self, tar: &Path) -> Result<(), DevError> {
        if !tar.is_file() {
            return Err(DevError::ImageImport { tar: tar.to_path_buf(), stderr: "no such file".into() });
        }
        let out =
            self.ctr(&["images".as_ref(), "import".as_ref(), tar.as_os_str()])?.output().await.map_err(|e| match e
                .kind()
            {
                io::ErrorKind::NotFound => DevError::Missing { what: "ctr", hint: "run `src/devenv/node.sh install`" },
                _ => DevError::Io { what: "running ctr".into(), source: e },
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(DevError::ImageImport { tar: tar.to_path_buf(), stderr });
        }
        Ok(())
    }

    /// Waits until containerd answers on its socket.
    pub(super) async fn wait_containerd(&self) -> Result<(), DevError> {
        let deadline = Instant::now() + CONTAINERD_TIMEOUT;
        loop {
            self.check()?;
            let out = self.ctr(&["version".as_ref()])?.stdout(Stdio::null()).stderr(Stdio::piped()).output().await;
            match out {
                Ok(out) if out.status.success() => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(DevError::Missing { what: "ctr", hint: "run `src/devenv/node.sh install`" });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let log = self.log_file(super::Component::Containerd);
                return Err(DevError::ContainerdNotReady {
                    socket: self.node_or_err()?.containerd_socket.clone(),
                    timeout: CONTAINERD_TIMEOUT,
                    tail: log_tail(&log, 20),
                    log,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the Node is Ready and the `default` ServiceAccount of `default` has its
    /// token (pods can be created there), failing early when a server exits.
    pub(super) async fn wait_node_ready(&self, timeout: Duration) -> Result<(), DevError> {
        let node = self.node_or_err()?;
        let client = self.client(Identity::Admin).await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        let deadline = Instant::now() + timeout;
        let ask = Duration::from_secs(5);
        loop {
            self.check()?;
            // What is missing, and whose log tells why.
            let (last, component) = match tokio::time::timeout(ask, nodes.get_opt(&node.name)).await {
                Ok(Ok(Some(found))) => {
                    let ready = found
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
                    match ready {
                        Some(c) if c.status == "True" => {
                            match tokio::time::timeout(ask, accounts.get_opt("default")).await {
                                Ok(Ok(Some(sa))) if sa.secrets.as_ref().is_some_and(|s| !s.is_empty()) => {
                                    return Ok(());
                                }
                                Ok(Ok(Some(_))) => (
                                    "Ready, but the default ServiceAccount has no token yet".to_string(),
                                    super::Component::ControllerManager,
                                ),
                                Ok(Ok(None)) => (
                                    "Ready, but there is no default ServiceAccount yet".to_string(),
                                    super::Component::ControllerManager,
                                ),
                                Ok(Err(e)) => {
                                    (format!("reading the default ServiceAccount: {e}"), super::Component::ApiServer)
                                }
                                Err(_) => {
                                    ("reading the default ServiceAccount timed out".into(), super::Component::ApiServer)
                                }
                            }
                        }
                        Some(c) => (
                            format!(
                                "Ready={} ({}: {})",
                                c.status,
                                c.reason.clone().unwrap_or_default(),
                                c.message.clone().unwrap_or_default()
                            ),
                            super::Component::Kubelet,
                        ),
                        None => ("registered, no Ready condition yet".into(), super::Component::Kubelet),
                    }
                }
                Ok(Ok(None)) => ("not registered yet".into(), super::Component::Kubelet),
                Ok(Err(e)) => (format!("reading the Node: {e}"), super::Component::ApiServer),
                Err(_) => ("reading the Node timed out".into(), super::Component::ApiServer),
            };
            if Instant::now() >= deadline {
                let log = self.log_file(component);
                return Err(DevError::NodeNotReady {
                    node: node.name.clone(),
                    timeout,
                    last,
                    tail: log_tail(&log, 20),
                    log,
                });
            }
            tokio::time::sleep(POLL * 2).await;
        }
    }
}
