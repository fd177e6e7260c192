//! The local control plane used by `kubelock dev`, the tests and the benchmarks: a real etcd
//! and kube-apiserver on free loopback ports, with one static-token identity per role; and,
//! on request, a local node where pods run (the `node` module: containerd, kubelet,
//! kube-controller-manager, kube-scheduler, kube-proxy).
//!
//! `src/devenv/control-plane.sh` (embedded here, so the binary works outside the repository)
//! prepares a state directory: certificates, tokens, kubeconfigs and one argument file per
//! server (`src/devenv/node.sh` adds the node's). [`ControlPlane`] then runs the servers itself
//! so that it can kill and restart them for fault-injection tests.
//!
//! No process outlives its owner, however the owner dies:
//! - every server runs under `setpriv --pdeathsig KILL`, spawned from one long-lived
//!   thread ([`spawn_guarded`]): the kernel sends the signal when the *thread* that forked
//!   exits, so spawning from a short-lived (test or blocking-pool) thread would kill the
//!   child early;
//! - a tiny reaper process (`sh`, reading a pipe held by this process) removes the state
//!   directory and the tmpfs etcd data once the pipe closes, which also happens on SIGKILL
//!   (with a node, it first runs the node's cleanup);
//! - `Drop` stops the servers (SIGTERM, then SIGKILL) and removes everything at once.

mod dev;
mod node;
mod process;

use std::{
    fs, io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, ResourceExt as _,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};

use self::process::{send_signal, spawn_reaper};
pub use self::{
    dev::{DevArgs, run_dev},
    node::{CLEANUP_LOG, IMAGE, IMAGE_FILES, NODE_LOCK, NodeInfo, TEST_IMAGE},
    process::{guarded_command, log_tail, spawn_guarded},
};
use crate::controller;

/// The control-plane script, embedded so that `kubelock dev` works from any directory.
const SCRIPT: &str = include_str!("control-plane.sh");
/// Field manager of the CRD installs made by `kubelock dev` and the tests.
pub const DEV_MANAGER: &str = "kubelock-dev";
/// Prefix of the state directories (under `$TMPDIR`).
pub const STATE_DIR_PREFIX: &str = "kubelock-cp.";
/// Prefix the script gives etcd data directories on tmpfs.
const SHM_PREFIX: &str = "/dev/shm/kubelock-etcd.";

/// How long a server gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How many times a start that lost a port race is tried (each time on new ports).
const START_ATTEMPTS: u32 = 3;
/// Interval of readiness polls.
const POLL: Duration = Duration::from_millis(100);

/// The identities of the local control plane (static tokens). `admin` is in
/// `system:masters`; the others have no rights until something binds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// Cluster administrator (`kubelock-admin`, group `system:masters`).
    Admin,
    /// The controller's own identity (`kubelock-controller`), no rights by default.
    Controller,
    /// An ordinary requester (`kubelock-requester-1`), no rights by default.
    Requester1,
    /// A second ordinary requester (`kubelock-requester-2`), no rights by default.
    Requester2,
}

impl Identity {
    /// Every identity.
    pub const ALL: [Identity; 4] = [Identity::Admin, Identity::Controller, Identity::Requester1, Identity::Requester2];

    /// Short name, as in the kubeconfig file names (`kubeconfig-<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Identity::Admin => "admin",
            Identity::Controller => "controller",
            Identity::Requester1 => "requester-1",
            Identity::Requester2 => "requester-2",
        }
    }

    /// The Kubernetes user name the API server authenticates (for RBAC subjects).
    pub fn user(self) -> String {
        format!("kubelock-{}", self.name())
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One of the servers: etcd and kube-apiserver, and those of the local node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    /// etcd.
    Etcd,
    /// kube-apiserver.
    ApiServer,
    /// containerd (the local node's container runtime).
    Containerd,
    /// kube-controller-manager (local node).
    ControllerManager,
    /// kube-scheduler (local node).
    Scheduler,
    /// kubelet (local node).
    Kubelet,
    /// kube-proxy (local node).
    KubeProxy,
}

impl Component {
    /// The local node's servers, in the order they start.
    pub const NODE: [Component; 5] = [
        Component::Containerd,
        Component::ControllerManager,
        Component::Scheduler,
        Component::Kubelet,
        Component::KubeProxy,
    ];

    fn name(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::ApiServer => "kube-apiserver",
            Component::Containerd => "containerd",
            Component::ControllerManager => "kube-controller-manager",
            Component::Scheduler => "kube-scheduler",
            Component::Kubelet => "kubelet",
            Component::KubeProxy => "kube-proxy",
        }
    }

    /// Base name of the files in the state directory (`<base>.args`, `.log`, `.pid`).
    fn file_base(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::ApiServer => "apiserver",
            Component::Containerd => "containerd",
            Component::ControllerManager => "controller-manager",
            Component::Scheduler => "scheduler",
            Component::Kubelet => "kubelet",
            Component::KubeProxy => "kube-proxy",
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the local control plane and `kubelock dev`.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(
        "no usable kube-apiserver ({reason}): run `make demo` (installs it first) or `src/devenv/control-plane.sh \
         install` (builds v1.20.2 with Go 1.15, about 7 minutes), or set KUBE_APISERVER to such a binary"
    )]
    NoApiServer { reason: String },
    #[error("{what} not found on PATH: {hint}")]
    Missing { what: &'static str, hint: &'static str },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("src/devenv/control-plane.sh {step} failed ({status}): {stderr}")]
    Script { step: &'static str, status: ExitStatus, stderr: String },
    #[error("state directory {dir}: {what}")]
    StateDir { dir: PathBuf, what: String },
    #[error("{component} exited ({status}); last lines of {log}:\n{tail}")]
    Exited { component: Component, status: ExitStatus, log: PathBuf, tail: String },
    #[error("kube-apiserver not ready after {timeout:?} ({last}); last lines of {log}:\n{tail}")]
    NotReady { timeout: Duration, last: String, log: PathBuf, tail: String },
    #[error("etcd not accepting connections on {endpoint} after {timeout:?}")]
    EtcdNotReady { endpoint: String, timeout: Duration },
    #[error("this control plane was not started by this process: cannot stop or start its {0}")]
    NotOwned(Component),
    #[error("kubeconfig of {identity} ({path}): {source}")]
    Kubeconfig {
        identity: Identity,
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("creating the API client: {0}")]
    Client(#[source] kube::Error),
    #[error("installing CRD {name}: {source}")]
    Crd {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("CRD {name} not Established after {timeout:?}")]
    CrdNotEstablished { name: String, timeout: Duration },
    #[error("waiting for CRD {name}: {source}")]
    CrdWait {
        name: String,
        #[source]
        source: kube::runtime::wait::Error,
    },
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("controller: {0}")]
    Controller(#[from] controller::Error),
    #[error("controller task: {0}")]
    ControllerTask(#[source] tokio::task::JoinError),
    #[error("this machine cannot run the local node:\n{reason}")]
    NodeUnavailable { reason: String },
    #[error(
        "another local node is running ({holder}): one node per machine (its bridge, the kubelet's port 10250 and \
         its pod subnet are machine-wide); stop it first"
    )]
    NodeBusy { holder: String },
    #[error("containerd not answering on {} after {timeout:?}; last lines of {log}:\n{tail}", socket.display())]
    ContainerdNotReady { socket: PathBuf, timeout: Duration, log: PathBuf, tail: String },
    #[error("node {node} not ready after {timeout:?}: {last}; read {log} (last lines):\n{tail}")]
    NodeNotReady { node: String, timeout: Duration, last: String, log: PathBuf, tail: String },
    #[error("importing the image {} into the local node's containerd: {stderr}", tar.display())]
    ImageImport { tar: PathBuf, stderr: String },
    #[error("admission webhook: {0}")]
    WebhookServe(#[from] crate::webhook::WebhookError),
    #[error("admission webhook: {0}")]
    Webhook(String),
    #[error("this control plane has no local node (start it with the `node` option, or `kubelock dev --node`)")]
    NoNode,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DevError {
    let what = what.into();
    move |source| DevError::Io { what, source }
}

// ---------------------------------------------------------------------------------------
// The control plane.

/// How to start a [`ControlPlane`].
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Keep etcd's data in the state directory on disk instead of tmpfs (`/dev/shm`).
    /// Benchmarks want this so that their figures include real fsyncs.
    pub etcd_on_disk: bool,
    /// How long to wait for `/readyz` (at start and after restarts).
    pub ready_timeout: Duration,
    /// Where to create the state directory (default: `$TMPDIR`, else `/tmp`).
    pub parent_dir: Option<PathBuf>,
    /// kube-apiserver binary (default: `$KUBE_APISERVER`, else the cache the script fills).
    pub kube_apiserver: Option<PathBuf>,
    /// Extra kube-apiserver flags, appended to the prepared ones (later flags win).
    pub extra_apiserver_args: Vec<String>,
    /// Leave the state directory (logs, kubeconfigs) behind after stopping, for debugging.
    pub keep_dir: bool,
    /// Also run a local node (containerd, kubelet, kube-controller-manager, kube-scheduler,
    /// kube-proxy) so that pods run; needs root, one per machine (see `src/devenv/node.sh`).
    pub node: bool,
    /// How long to wait for the node to be Ready (and the `default` ServiceAccount to exist).
    pub node_ready_timeout: Duration,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            etcd_on_disk: false,
            ready_timeout: Duration::from_secs(90),
            parent_dir: None,
            kube_apiserver: None,
            extra_apiserver_args: Vec::new(),
            keep_dir: false,
            node: false,
            node_ready_timeout: Duration::from_secs(120),
        }
    }
}

/// One server process and how to (re)start it.
#[derive(Debug)]
struct Server {
    component: Component,
    args: Vec<String>,
    log: PathBuf,
    pid_file: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn spawn(&mut self) -> Result<(), DevError> {
        if self.pid().is_some() {
            return Ok(());
        }
        if let Some(mut exited) = self.child.take() {
            let _ = exited.wait();
        }
        let name = self.component.name();
        let (program, args) = self.args.split_first().ok_or_else(|| DevError::StateDir {
            dir: self.log.parent().map(Path::to_path_buf).unwrap_or_default(),
            what: format!("the {name} argument file is empty"),
        })?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        let log2 = log.try_clone().map_err(io_err(format!("opening {}", self.log.display())))?;
        let mut cmd = guarded_command(program);
        cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = spawn_guarded(cmd).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DevError::Missing { what: "setpriv", hint: "install util-linux" },
            _ => DevError::Io { what: format!("starting {name}"), source: e },
        })?;
        fs::write(&self.pid_file, format!("{}\n", child.id()))
            .map_err(io_err(format!("writing {}", self.pid_file.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// The PID while the process runs (an exited one is reaped, and its status kept for
    /// [`Server::exited`]).
    fn pid(&mut self) -> Option<u32> {
        let child = self.child.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let _ = send_signal(child.id(), rustix::process::Signal::TERM);
        // Resume it in case a test paused it: a stopped process cannot act on SIGTERM.
        let _ = send_signal(child.id(), rustix::process::Signal::CONT);
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = fs::remove_file(&self.pid_file);
    }

    /// `Some(status)` if the process has exited on its own.
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }
}

/// A local etcd + kube-apiserver (and, with [`ControlPlaneOptions::node`], a local node).
/// Every method takes `&self`, so one control plane can be shared (e.g. in a `static`) and
/// still be killed and restarted by fault tests.
///
/// Dropping it stops every server, cleans up after the node, and removes the state directory
/// and the etcd data.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    shm_data: Option<PathBuf>,
    server: String,
    etcd_endpoint: String,
    ready_timeout: Duration,
    keep_dir: bool,
    /// The servers this process runs, in start order; empty when attached to a control plane
    /// started by someone else.
    servers: Vec<(Component, Mutex<Server>)>,
    /// The write end of the reaper's stdin: closing it (even by dying) triggers cleanup.
    reaper: Mutex<Option<(Child, ChildStdin)>>,
    node: Option<NodeInfo>,
    /// Held while the node runs or is being cleaned up.
    node_lock: Mutex<Option<node::MachineLock>>,
}

impl ControlPlane {
    /// Prepares a state directory with `src/devenv/control-plane.sh prepare`, starts etcd and
    /// kube-apiserver and waits until `/readyz` answers. With [`ControlPlaneOptions::node`], also
    /// starts the local node and waits until it is Ready.
    ///
    /// A start in which a server could not bind its port (another process took the port picked
    /// for it in the meantime) is tried again from the beginning, on new ports.
    ///
    /// Cancel-safe: if the future is dropped half-way, what was started is stopped.
    pub async fn start(opts: ControlPlaneOptions) -> Result<ControlPlane, DevError> {
        let mut attempt = 1;
        loop {
            match ControlPlane::start_once(&opts).await {
                Err(DevError::Exited { component, tail, .. })
                    if attempt < START_ATTEMPTS && lost_port_race(component, &tail) =>
                {
                    tracing::warn!(%component, attempt, "a port picked as free was taken meanwhile; starting again on new ports");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(opts: &ControlPlaneOptions) -> Result<ControlPlane, DevError> {
        for (what, hint) in [
            ("setpriv", "install util-linux"),
            ("etcd", "run `src/devenv/control-plane.sh install` (Debian package etcd-server)"),
            ("openssl", "run `src/devenv/control-plane.sh install`"),
            ("bash", "install bash"),
            ("curl", "install curl"),
        ] {
            if !on_path(what) {
                return Err(DevError::Missing { what, hint });
            }
        }
        // One node per machine: say so before checking anything else it would collide on.
        let mut lock = match opts.node {
            true => Some(node::MachineLock::acquire().await?),
            false => None,
        };
        let parent = opts.parent_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix(STATE_DIR_PREFIX)
            .tempdir_in(&parent)
            .map_err(io_err(format!("creating a state directory in {}", parent.display())))?
            .keep();
        let reaper = lock
            .as_mut()
            .map(|lock| lock.record(&dir).and_then(|()| lock.share()))
            .transpose()
            .and_then(|node_lock| spawn_reaper(&dir, opts.keep_dir, node_lock))
            .inspect_err(|_| {
                let _ = fs::remove_dir_all(&dir);
            })?;
        // From here on, `Drop` cleans up whatever happens.
        let mut cp = ControlPlane {
            dir,
            shm_data: None,
            server: String::new(),
            etcd_endpoint: String::new(),
            ready_timeout: opts.ready_timeout,
            keep_dir: opts.keep_dir,
            servers: Vec::new(),
            reaper: Mutex::new(Some(reaper)),
            node: None,
            node_lock: Mutex::new(lock),
        };
        let script = cp.dir.join("control-plane.sh");
        let node_script = cp.dir.join("node.sh");
        for (path, text) in [(&script, SCRIPT), (&node_script, node::SCRIPT)] {
            fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))
                .map_err(io_err(format!("chmod {}", path.display())))?;
        }

        // A precise error when the one expensive dependency is missing.
        if let Err(e) = run_script(&script, "path", None, opts, None).await {
            let explicit = opts.kube_apiserver.is_some() || std::env::var_os("KUBE_APISERVER").is_some();
            let reason = match e {
                DevError::Script { stderr, .. } if explicit => {
                    stderr.trim_start_matches("control-plane: error: ").to_string()
                }
                DevError::Script { .. } => format!("none in the cache {}", cache_dir().display()),
                other => return Err(other),
            };
            return Err(DevError::NoApiServer { reason });
        }
        let node_address = match opts.node {
            true => Some(node::preflight(&node_script).await?),
            false => None,
        };
        run_script(&script, "prepare", Some(&cp.dir), opts, node_address.as_deref()).await?;
        if opts.node {
            run_script(&node_script, "prepare", Some(&cp.dir), opts, None).await?;
        }

        cp.server = cp.read_state("server")?;
        cp.etcd_endpoint = cp.read_state("etcd-endpoint")?;
        if cp.dir.join("etcd-data-shm").exists() {
            let shm = PathBuf::from(cp.read_state("etcd-data-shm")?);
            if !shm.to_string_lossy().starts_with(SHM_PREFIX) {
                return Err(cp.state_error(format!("etcd-data-shm names {}, not {SHM_PREFIX}*", shm.display())));
            }
            cp.shm_data = Some(shm);
        }
        let mut servers = vec![
            (Component::Etcd, cp.server_from_args(Component::Etcd, &[])?),
            (Component::ApiServer, cp.server_from_args(Component::ApiServer, &opts.extra_apiserver_args)?),
        ];
        if let Some(address) = node_address {
            for component in Component::NODE {
                servers.push((component, cp.server_from_args(component, &[])?));
            }
            cp.node = Some(NodeInfo {
                name: cp.read_state("node-name")?,
                address,
                containerd_socket: cp.read_state("containerd-socket")?.into(),
                pod_subnet: cp.read_state("pod-subnet")?,
                pause_image: cp.read_state("node/pause-image-name")?,
                pause_tar: cp.read_state("node/pause-image")?.into(),
            });
        }
        cp.servers = servers.into_iter().map(|(c, s)| (c, Mutex::new(s))).collect();
        cp.start_server(Component::Etcd)?;
        cp.start_server(Component::ApiServer)?;
        if cp.node.is_some() {
            cp.start_server(Component::Containerd)?;
        }
        cp.wait_ready(cp.ready_timeout).await?;
        if let Some(node) = cp.node.clone() {
            // The sandbox image must be there before the kubelet asks for a pod: nothing is
            // ever pulled.
            cp.wait_containerd().await?;
            cp.import_image(&node.pause_tar).await?;
            for component in &Component::NODE[1..] {
                cp.start_server(*component)?;
            }
            cp.wait_node_ready(opts.node_ready_timeout).await?;
        }
        Ok(cp)
    }

    /// Attaches to a control plane prepared and started by someone else (for example
    /// `src/devenv/control-plane.sh up DIR`). It can be used but not stopped or restarted, and
    /// dropping it leaves it running.
    pub async fn attach(dir: impl Into<PathBuf>, ready_timeout: Duration) -> Result<ControlPlane, DevError> {
        let dir = dir.into();
        let mut cp = ControlPlane {
            dir,
            shm_data: None,
            server: String::new(),
            etcd_endpoint: String::new(),
            ready_timeout,
            keep_dir: true,
            servers: Vec::new(),
            reaper: Mutex::new(None),
            node: None,
            node_lock: Mutex::new(None),
        };
        cp.server = cp.read_state("server")?;
        cp.etcd_endpoint = cp.read_state("etcd-endpoint")?;
        cp.wait_ready(ready_timeout).await?;
        Ok(cp)
    }

    fn read_state(&self, name: &str) -> Result<String, DevError> {
        let path = self.dir.join(name);
        let text = fs::read_to_string(&path).map_err(|e| self.state_error(format!("reading {name}: {e}")))?;
        let text = text.trim();
        if text.is_empty() {
            return Err(self.state_error(format!("{name} is empty")));
        }
        Ok(text.to_string())
    }

    fn state_error(&self, what: String) -> DevError {
        DevError::StateDir { dir: self.dir.clone(), what }
    }

    fn server_from_args(&self, component: Component, extra: &[String]) -> Result<Server, DevError> {
        let base = component.file_base();
        let mut args: Vec<String> =
            self.read_state(&format!("{base}.args"))?.lines().map(str::to_string).filter(|l| !l.is_empty()).collect();
        args.extend(extra.iter().cloned());
        Ok(Server {
            component,
            args,
            log: self.dir.join(format!("{base}.log")),
            pid_file: self.dir.join(format!("{base}.pid")),
            child: None,
        })
    }

    fn lock(&self, component: Component) -> Result<MutexGuard<'_, Server>, DevError> {
        let (_, server) = self.servers.iter().find(|(c, _)| *c == component).ok_or(DevError::NotOwned(component))?;
        // A panic while holding the lock leaves the Server consistent: take it anyway.
        Ok(server.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    fn start_server(&self, component: Component) -> Result<(), DevError> {
        self.lock(component)?.spawn()
    }

    /// The state directory: kubeconfigs, logs (`etcd.log`, `apiserver.log`, `kubelet.log`, ...),
    /// pid files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API server URL (`https://127.0.0.1:<port>`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The etcd client URL (`http://127.0.0.1:<port>`).
    pub fn etcd_endpoint(&self) -> &str {
        &self.etcd_endpoint
    }

    /// Where etcd keeps its data (tmpfs unless `etcd_on_disk`).
    pub fn etcd_data_dir(&self) -> PathBuf {
        self.shm_data.clone().unwrap_or_else(|| self.dir.join("etcd"))
    }

    /// The kubeconfig file of an identity.
    pub fn kubeconfig(&self, identity: Identity) -> PathBuf {
        self.dir.join(format!("kubeconfig-{}", identity.name()))
    }

    /// The log file of a server.
    pub fn log_file(&self, component: Component) -> PathBuf {
        self.dir.join(format!("{}.log", component.file_base()))
    }

    /// Client configuration of an identity (default namespace `default`).
    pub async fn config(&self, identity: Identity) -> Result<kube::Config, DevError> {
        let path = self.kubeconfig(identity);
        let kubeconfig = Kubeconfig::read_from(&path).map_err(|source| DevError::Kubeconfig {
            identity,
            path: path.clone(),
            source,
        })?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|source| DevError::Kubeconfig { identity, path, source })
    }

    /// A client acting as `identity`. Bound to the current tokio runtime: make one per runtime.
    pub async fn client(&self, identity: Identity) -> Result<kube::Client, DevError> {
        crate::connect::client_from_config(self.config(identity).await?).map_err(DevError::from)
    }

    /// PID of a server, if this process started it and it is running.
    pub fn pid(&self, component: Component) -> Option<u32> {
        self.lock(component).ok()?.pid()
    }

    /// Starts a server again if it is not running (it exited, or was killed), with the same
    /// flags, port and data, and waits until it serves: etcd until it accepts connections
    /// (and kube-apiserver, if running, until `/readyz` says it reaches etcd again),
    /// kube-apiserver until `/readyz` answers, containerd until it answers on its socket (the
    /// node's other servers are only started).
    pub async fn restart(&self, component: Component) -> Result<(), DevError> {
        self.start_server(component)?;
        match component {
            Component::Etcd => {
                self.wait_etcd(self.ready_timeout).await?;
                if self.pid(Component::ApiServer).is_none() {
                    return Ok(());
                }
            }
            Component::ApiServer => {}
            Component::Containerd => return self.wait_containerd().await,
            _ => return Ok(()),
        }
        self.wait_ready(self.ready_timeout).await
    }

    async fn wait_etcd(&self, timeout: Duration) -> Result<(), DevError> {
        let not_ready = || DevError::EtcdNotReady { endpoint: self.etcd_endpoint.clone(), timeout };
        let addr: SocketAddr =
            self.etcd_endpoint.trim_start_matches("http://").parse().map_err(|_| {
                self.state_error(format!("etcd-endpoint {:?} is not http://IP:PORT", self.etcd_endpoint))
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            self.check()?;
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)).await
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(not_ready());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls `/readyz` (as admin, with curl: a kube client would log every refused
    /// connection as an error) until it answers `ok`, a server exits, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), DevError> {
        let token = self.read_state("token-admin")?;
        let ca = self.dir.join("pki/ca.crt");
        let url = format!("{}/readyz", self.server);
        let deadline = Instant::now() + timeout;
        loop {
            self.check()?;
            let probe = tokio::process::Command::new("curl")
                .args(["-sS", "--max-time", "2", "--cacert"])
                .arg(&ca)
                .arg("-H")
                .arg(format!("Authorization: Bearer {token}"))
                .arg(&url)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => DevError::Missing { what: "curl", hint: "install curl" },
                    _ => DevError::Io { what: "running curl".into(), source: e },
                })?;
            let body = String::from_utf8_lossy(&probe.stdout);
            if probe.status.success() && body.trim() == "ok" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let last = format!("{} {}", body.trim(), String::from_utf8_lossy(&probe.stderr).trim());
                let log = self.log_file(Component::ApiServer);
                return Err(DevError::NotReady { timeout, last, tail: log_tail(&log, 20), log });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Fails if a server this process started has exited on its own.
    pub fn check(&self) -> Result<(), DevError> {
        for (component, _) in &self.servers {
            let component = *component;
            let Ok(mut server) = self.lock(component) else { continue };
            if let Some(status) = server.exited() {
                let log = server.log.clone();
                return Err(DevError::Exited { component, status, tail: log_tail(&log, 20), log });
            }
        }
        Ok(())
    }

    /// Stops every server (in the reverse order of their start, kube-apiserver and etcd last),
    /// cleans up after the node (containers, shims, mounts, bridge, chains: `node.sh cleanup`)
    /// and removes the state directory and the etcd data, unless `keep_dir`. Idempotent;
    /// `Drop` calls it.
    pub fn stop(&self) {
        for (_, server) in self.servers.iter().rev() {
            server.lock().unwrap_or_else(|p| p.into_inner()).stop(STOP_GRACE);
        }
        let reaper = self.reaper.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((mut reaper, stdin)) = reaper else { return };
        let mut remove_dir = !self.keep_dir;
        if self.node.is_some() || self.dir.join("node").exists() {
            if let Err(problems) = node::cleanup(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), "cleaning up after the local node: {problems}");
            }
            let mounted = node::mounts_under(&self.dir);
            if remove_dir && !mounted.is_empty() {
                tracing::warn!(dir = %self.dir.display(), ?mounted, "still mounted: leaving the state directory");
                remove_dir = false;
            }
        }
        if let Some(shm) = &self.shm_data {
            let _ = fs::remove_dir_all(shm);
        }
        if remove_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
        // Closing its stdin lets the reaper run; there is nothing left for it to do.
        drop(stdin);
        let _ = reaper.wait();
        // The node is gone: the next one may start.
        drop(self.node_lock.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a server exited because the port picked for it was taken (the kubelet's port is
/// fixed: losing it is no race).
fn lost_port_race(component: Component, log_tail: &str) -> bool {
    log_tail.contains("address already in use") && !(component == Component::Kubelet && log_tail.contains(":10250"))
}

/// Runs `control-plane.sh STEP [DIR]` (or `node.sh`); returns its stdout. `node_address` makes
/// `prepare` prepare for a local node.
async fn run_script(
    script: &Path,
    step: &'static str,
    dir: Option<&Path>,
    opts: &ControlPlaneOptions,
    node_address: Option<&str>,
) -> Result<String, DevError> {
    // Under setpriv too, so that a prepare in progress dies with us rather than writing
    // into a directory the reaper is removing.
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "bash"])
        .arg(script)
        .arg(step)
        .args(dir)
        .env("KUBELOCK_SCRIPT_NAME", "src/devenv/control-plane.sh")
        .env("KUBELOCK_NODE_SCRIPT_NAME", "src/devenv/node.sh");
    match node_address {
        Some(address) => cmd.env("NODE_ADDRESS", address),
        None => cmd.env_remove("NODE_ADDRESS"),
    };
    if let Some(path) = &opts.kube_apiserver {
        cmd.env("KUBE_APISERVER", path);
    }
    if opts.etcd_on_disk {
        cmd.env("ETCD_DATA_ON_DISK", "1");
    } else {
        cmd.env_remove("ETCD_DATA_ON_DISK");
    }
    let out = cmd.stdin(Stdio::null()).kill_on_drop(true).output().await.map_err(io_err("running bash"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(DevError::Script { step, status: out.status, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// The cache the script keeps kube-apiserver in.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KUBELOCK_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("kubelock")
}

// ---------------------------------------------------------------------------------------
// CRDs.

/// Installs kubelock's CRDs ([`crate::api::crds`]) with server-side apply and waits until
/// each is Established.
pub async fn install_crds(client: &kube::Client, timeout: Duration) -> Result<(), DevError> {
    apply_crds(client, &crate::api::crds(), DEV_MANAGER, timeout).await
}

/// Applies the given CRDs (server-side apply, field manager `manager`, forcing conflicts)
/// and waits until each is Established.
pub async fn apply_crds(
    client: &kube::Client,
    crds: &[CustomResourceDefinition],
    manager: &str,
    timeout: Duration,
) -> Result<(), DevError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(manager).force();
    for crd in crds {
        let name = crd.name_any();
        tokio::time::timeout(timeout, api.patch(&name, &params, &Patch::Apply(crd)))
            .await
            .map_err(|_| DevError::CrdNotEstablished { name: name.clone(), timeout })?
            .map_err(|source| DevError::Crd { name: name.clone(), source })?;
    }
    for crd in crds {
        let name = crd.name_any();
        tokio::time::timeout(timeout, await_condition(api.clone(), &name, conditions::is_crd_established()))
            .await
            .map_err(|_| DevError::CrdNotEstablished { name: name.clone(), timeout })?
            .map_err(|source| DevError::CrdWait { name: name.clone(), source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Component, lost_port_race};

    #[test]
    fn a_lost_port_race_is_told_from_a_taken_kubelet_port() {
        let etcd = r#"{"level":"fatal","msg":"listen tcp 127.0.0.1:22379: bind: address already in use"}"#;
        assert!(lost_port_race(Component::Etcd, etcd));
        let apiserver = "failed to listen on 0.0.0.0:26443: listen tcp 0.0.0.0:26443: bind: address already in use";
        assert!(lost_port_race(Component::ApiServer, apiserver));
        let kubelet = "listen tcp 192.0.2.2:10250: bind: address already in use";
        assert!(!lost_port_race(Component::Kubelet, kubelet), "the kubelet's port is fixed: no new ports help");
        assert!(!lost_port_race(Component::Etcd, "etcdmain: open /dev/shm/x: no space left on device"));
    }
}
