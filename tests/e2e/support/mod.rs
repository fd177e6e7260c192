//! Test support for the e2e suite: a real control plane, a namespace per test, a client per
//! identity, RBAC grants, watch-driven waits, guarded child processes and a dump of the
//! objects involved when a test fails.
//!
//! ```text
//! #[tokio::test]
//! async fn something() {
//!     let env = TestEnv::new().await;                    // shared control plane, fresh namespace
//!     let locks: Api<Lock> = env.api(Identity::Admin).await;
//!     env.grant(Identity::Requester1, vec![rule(&["kubelock.dev"], &["locks"], &["get"])]).await;
//!     let proc = env.kubelock(Identity::Requester1, "holder").args(["acquire", "x"]).spawn();
//!     wait_until(&locks, "x", "x held", TIMEOUT, |l| ...).await.expect("granted");
//! }
//! ```
//!
//! Where the tests run (chosen once per test binary):
//! - default: a local etcd + kube-apiserver started on first use ([`kubelock::devenv`]),
//!   stopped when the binary exits (parent-death signal; a reaper removes its files);
//! - `KUBELOCK_TEST_CONTROL_PLANE=DIR`: one started beforehand with
//!   `src/devenv/control-plane.sh up DIR` (saves its start-up time while iterating);
//! - `KUBELOCK_TEST_KUBECONFIG=FILE`: any cluster (kind, ...); FILE must be an admin that may
//!   impersonate, the other identities are impersonated users `kubelock-<identity>`.
//!
//! Tests that kill or pause the servers use [`TestEnv::private`]: a control plane of their own.
//!
//! The fixtures the test files share (Locks, requests, controller processes, RBAC rule sets,
//! ports, HTTP) are in [`fixtures`].
//! Tests that run pods use [`TestEnv::with_node`]: a second shared control plane, with a local
//! node (the `node` module).

#![allow(dead_code)] // Not every test module uses every helper.

pub mod checker;
pub mod etcd;
pub mod fixtures;
pub mod history;
pub mod node;
pub mod process;
pub mod servers;
pub mod wait;
pub mod webhook;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
        core::v1::Namespace,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Resource,
    api::{ApiResource, DynamicObject, ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::Serialize;
use tokio::sync::OnceCell;

// Re-exported for the test modules; not every module uses all of them.
#[allow(unused_imports)]
pub use kubelock::devenv::{Component, ControlPlane, ControlPlaneOptions, Identity};
#[allow(unused_imports)]
pub use process::{Cmd, Output, Proc, ProcessId};
#[allow(unused_imports)]
pub use servers::ServerFaults;
#[allow(unused_imports)]
pub use wait::{WaitError, eventually, wait_for, wait_gone, wait_until};

/// Default deadline of a wait in a test.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A control plane (or cluster) the tests run against, with its CRDs installed.
pub struct Cluster {
    control_plane: Option<ControlPlane>,
    kubeconfigs: BTreeMap<Identity, PathBuf>,
    /// Holds the impersonating kubeconfigs of an external cluster.
    _files: Option<tempfile::TempDir>,
    /// Namespaces are deleted after passing tests only where a namespace controller runs.
    delete_namespaces: bool,
    /// Its admission webhook, started by the first [`TestEnv::with_webhook`].
    webhook: OnceCell<Result<webhook::Webhook, String>>,
}

impl Cluster {
    /// Starts a local control plane and installs the CRDs.
    pub async fn start(opts: ControlPlaneOptions) -> Result<Cluster, String> {
        let cp = ControlPlane::start(opts).await.map_err(|e| format!("starting the control plane: {e}"))?;
        Cluster::local(cp).await
    }

    /// A local control plane's cluster, with the CRDs installed.
    async fn local(cp: ControlPlane) -> Result<Cluster, String> {
        let kubeconfigs = Identity::ALL.iter().map(|id| (*id, cp.kubeconfig(*id))).collect();
        let cluster = Cluster {
            control_plane: Some(cp),
            kubeconfigs,
            _files: None,
            delete_namespaces: false,
            webhook: OnceCell::new(),
        };
        cluster.install_crds().await?;
        Ok(cluster)
    }

    /// The cluster this test binary uses, as chosen by the environment (see the module doc).
    async fn from_env() -> Result<Cluster, String> {
        if let Some(path) = std::env::var_os("KUBELOCK_TEST_KUBECONFIG") {
            return Cluster::external(Path::new(&path)).await;
        }
        if let Some(dir) = std::env::var_os("KUBELOCK_TEST_CONTROL_PLANE") {
            let cp = ControlPlane::attach(PathBuf::from(&dir), Duration::from_secs(10))
                .await
                .map_err(|e| format!("KUBELOCK_TEST_CONTROL_PLANE={}: {e}", Path::new(&dir).display()))?;
            return Cluster::local(cp).await;
        }
        Cluster::start(ControlPlaneOptions::default()).await
    }

    /// Any cluster: `path` is an admin kubeconfig; the other identities impersonate
    /// `kubelock-<identity>` through kubeconfigs written next to each other in a temp dir.
    async fn external(path: &Path) -> Result<Cluster, String> {
        let fail = |e: String| format!("KUBELOCK_TEST_KUBECONFIG={}: {e}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let files = tempfile::tempdir().map_err(|e| fail(e.to_string()))?;
        let mut kubeconfigs = BTreeMap::from([(Identity::Admin, path.to_path_buf())]);
        for id in &Identity::ALL[1..] {
            let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| fail(e.to_string()))?;
            impersonate(&mut doc, &id.user()).map_err(fail)?;
            let file = files.path().join(format!("kubeconfig-{}", id.name()));
            std::fs::write(&file, serde_yaml::to_string(&doc).map_err(|e| fail(e.to_string()))?)
                .map_err(|e| fail(e.to_string()))?;
            kubeconfigs.insert(*id, file);
        }
        let cluster = Cluster {
            control_plane: None,
            kubeconfigs,
            _files: Some(files),
            delete_namespaces: true,
            webhook: OnceCell::new(),
        };
        cluster.install_crds().await?;
        Ok(cluster)
    }

    async fn install_crds(&self) -> Result<(), String> {
        let client = self.client(Identity::Admin).await;
        kubelock::devenv::install_crds(&client, TIMEOUT).await.map_err(|e| e.to_string())
    }

    /// The local control plane, if the tests run on one.
    pub fn control_plane(&self) -> Option<&ControlPlane> {
        self.control_plane.as_ref()
    }

    /// The webhook of this cluster, started on first use (local control planes only: the
    /// API server must reach it at a loopback address).
    pub async fn webhook(&self) -> &webhook::Webhook {
        let cp =
            self.control_plane().expect("the webhook tests need the local control plane, not KUBELOCK_TEST_KUBECONFIG");
        let dir = cp.dir().join("webhook-test");
        let started = self.webhook.get_or_init(|| webhook::Webhook::start(self, &dir)).await;
        started.as_ref().unwrap_or_else(|e| panic!("starting the admission webhook: {e}"))
    }

    /// The kubeconfig file of an identity.
    pub fn kubeconfig(&self, id: Identity) -> &Path {
        &self.kubeconfigs[&id]
    }

    /// Client configuration of an identity.
    pub async fn config(&self, id: Identity) -> kube::Config {
        let path = self.kubeconfig(id);
        let kubeconfig = Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    }

    /// A client of an identity (bound to the calling test's runtime).
    pub async fn client(&self, id: Identity) -> kube::Client {
        kubelock::connect::client_from_config(self.config(id).await).expect("creating a client")
    }
}

/// Sets `as: user` on the user of the current context of a kubeconfig document.
fn impersonate(doc: &mut serde_yaml::Value, user: &str) -> Result<(), String> {
    let current = doc["current-context"].as_str().ok_or("no current-context")?.to_string();
    let contexts = doc["contexts"].as_sequence().ok_or("no contexts")?;
    let ctx_user = contexts
        .iter()
        .find(|c| c["name"].as_str() == Some(&current))
        .and_then(|c| c["context"]["user"].as_str())
        .ok_or_else(|| format!("context {current} has no user"))?
        .to_string();
    let users = doc["users"].as_sequence_mut().ok_or("no users")?;
    let entry = users
        .iter_mut()
        .find(|u| u["name"].as_str() == Some(&ctx_user))
        .ok_or_else(|| format!("user {ctx_user} not found"))?;
    entry["user"]["as"] = serde_yaml::Value::String(user.to_string());
    Ok(())
}

/// The cluster shared by every test of this binary, started (or attached) on first use.
/// A failure to start is remembered: the other tests fail at once with the same message.
pub async fn shared_cluster() -> Arc<Cluster> {
    static SHARED: OnceCell<Result<Arc<Cluster>, String>> = OnceCell::const_new();
    SHARED
        .get_or_init(|| async { Cluster::from_env().await.map(Arc::new) })
        .await
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A policy rule for [`TestEnv::grant`]: `rule(&["kubelock.dev"], &["locks"], &["get", "list"])`.
pub fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    PolicyRule {
        api_groups: strings(groups),
        resources: strings(resources),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// One test's world: a fresh namespace on a cluster, clients per identity, its child
/// processes' logs. When the test panics, dropping it prints the objects of the namespace.
pub struct TestEnv {
    cluster: Arc<Cluster>,
    ns: String,
    admin: kube::Config,
    tmp: tempfile::TempDir,
    logs: process::LogRegistry,
    grants: AtomicU32,
    /// Runs on a control plane of its own.
    private: bool,
    /// Keeps the shared node cluster up while this test runs on it.
    node: Option<node::NodeUse>,
}

impl TestEnv {
    /// A new namespace on the shared cluster.
    pub async fn new() -> TestEnv {
        TestEnv::on(shared_cluster().await).await
    }

    /// A new namespace on a control plane of this test's own, which it may kill, pause and
    /// restart ([`TestEnv::control_plane`]). Costs a few seconds to start.
    pub async fn private() -> TestEnv {
        TestEnv::private_with(ControlPlaneOptions::default()).await
    }

    /// [`TestEnv::private`] with options (e.g. etcd on disk, extra kube-apiserver flags).
    pub async fn private_with(opts: ControlPlaneOptions) -> TestEnv {
        let cluster = Cluster::start(opts).await.unwrap_or_else(|e| panic!("{e}"));
        let mut env = TestEnv::on(Arc::new(cluster)).await;
        env.private = true;
        env
    }

    /// A new namespace on the shared cluster that the admission webhook reviews (requests,
    /// Locks, fenced ConfigMaps and Secrets), as on a cluster with the chart installed.
    pub async fn with_webhook() -> TestEnv {
        let cluster = shared_cluster().await;
        cluster.webhook().await;
        let env = TestEnv::on_labelled(cluster, &[webhook::LABEL]).await;
        // The API server reads namespace labels from its cache: wait until it sends this one's.
        kubelock::webhook::config::wait_enforced(&env.admin().await, env.ns(), TIMEOUT).await.unwrap_or_else(|e| {
            panic!(
                "{e}; webhook log:\n{}",
                env.cluster.webhook.get().and_then(|w| w.as_ref().ok()).map(|w| w.log_tail(20)).unwrap_or_default()
            )
        });
        env
    }

    /// A new namespace on `cluster`.
    pub async fn on(cluster: Arc<Cluster>) -> TestEnv {
        TestEnv::on_labelled(cluster, &[]).await
    }

    /// A new namespace on `cluster` with these labels besides the tests' own.
    pub async fn on_labelled(cluster: Arc<Cluster>, labels: &[(&str, &str)]) -> TestEnv {
        let ns = namespace_name();
        let mut labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        labels.insert("kubelock.dev/test".into(), "true".into());
        let admin = cluster.config(Identity::Admin).await;
        let client = kubelock::connect::client_from_config(admin.clone()).expect("creating a client");
        let namespace = Namespace {
            metadata: ObjectMeta { name: Some(ns.clone()), labels: Some(labels), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(client)
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {ns}: {e}"));
        let tmp = tempfile::Builder::new().prefix("kubelock-test.").tempdir().expect("creating a temp dir");
        TestEnv {
            cluster,
            ns,
            admin,
            tmp,
            logs: Default::default(),
            grants: AtomicU32::new(0),
            private: false,
            node: None,
        }
    }

    /// This test's namespace.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The local control plane (panics when the tests run on an external cluster).
    pub fn control_plane(&self) -> &ControlPlane {
        self.cluster.control_plane().expect("this test needs the local control plane, not KUBELOCK_TEST_KUBECONFIG")
    }

    /// Client configuration of an identity, with this test's namespace as default.
    pub async fn config(&self, id: Identity) -> kube::Config {
        let mut config = self.cluster.config(id).await;
        config.default_namespace = self.ns.clone();
        config
    }

    /// A client of an identity, with this test's namespace as default.
    pub async fn client(&self, id: Identity) -> kube::Client {
        kubelock::connect::client_from_config(self.config(id).await).expect("creating a client")
    }

    /// The admin client.
    pub async fn admin(&self) -> kube::Client {
        self.client(Identity::Admin).await
    }

    /// `Api<K>` in this test's namespace as an identity.
    pub async fn api<K>(&self, id: Identity) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client(id).await, &self.ns)
    }

    /// The kubeconfig file of an identity (its context's namespace is `default`: pass `-n`).
    pub fn kubeconfig(&self, id: Identity) -> PathBuf {
        self.cluster.kubeconfig(id).to_path_buf()
    }

    /// Where this test's processes log (removed after the test).
    pub fn log_dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `kubelock --kubeconfig <id's> -n <ns> ...` as a child process; `name` names its logs,
    /// which a failure dump prints. Add arguments, then `.spawn()` or `.output(timeout)`.
    pub fn kubelock(&self, id: Identity, name: &str) -> Cmd {
        self.kubelock_undumped(id, name).register_logs(self.logs.clone())
    }

    /// [`TestEnv::kubelock`] whose logs a failure dump leaves out: for a test that starts
    /// dozens of such processes and prints the logs that matter itself.
    pub fn kubelock_undumped(&self, id: Identity, name: &str) -> Cmd {
        Cmd::kubelock(name, self.log_dir())
            .arg("--kubeconfig")
            .arg(self.kubeconfig(id))
            .args(["-n", &self.ns])
            .env_remove("KUBECONFIG")
    }

    /// Any program as a guarded child process, logs registered for the failure dump.
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Cmd {
        Cmd::new(name, program, self.log_dir()).register_logs(self.logs.clone())
    }

    /// Grants `rules` to an identity in this namespace (Role + RoleBinding) and waits until
    /// the API server's authorizer applies them.
    pub async fn grant(&self, id: Identity, rules: Vec<PolicyRule>) {
        let n = self.grants.fetch_add(1, Ordering::Relaxed);
        let name = format!("test-{}-{n}", id.name());
        let client = self.admin().await;
        let role = Role { metadata: meta(&name, Some(&self.ns)), rules: Some(rules.clone()) };
        Api::<Role>::namespaced(client.clone(), &self.ns)
            .create(&PostParams::default(), &role)
            .await
            .unwrap_or_else(|e| panic!("creating Role {name}: {e}"));
        let binding = RoleBinding {
            metadata: meta(&name, Some(&self.ns)),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name.clone(),
            },
            subjects: Some(vec![user_subject(id)]),
        };
        Api::<RoleBinding>::namespaced(client.clone(), &self.ns)
            .create(&PostParams::default(), &binding)
            .await
            .unwrap_or_else(|e| panic!("creating RoleBinding {name}: {e}"));
        self.await_rules(&client, id, &rules, Some(&self.ns)).await;
    }

    /// Grants `rules` to an identity cluster-wide (ClusterRole + ClusterRoleBinding named
    /// after this namespace) and waits until they apply.
    pub async fn grant_cluster(&self, id: Identity, rules: Vec<PolicyRule>) {
        let n = self.grants.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{}-{n}", self.ns, id.name());
        let client = self.admin().await;
        let role = ClusterRole { metadata: meta(&name, None), rules: Some(rules.clone()), ..Default::default() };
        Api::<ClusterRole>::all(client.clone())
            .create(&PostParams::default(), &role)
            .await
            .unwrap_or_else(|e| panic!("creating ClusterRole {name}: {e}"));
        let binding = ClusterRoleBinding {
            metadata: meta(&name, None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: name.clone(),
            },
            subjects: Some(vec![user_subject(id)]),
        };
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await
            .unwrap_or_else(|e| panic!("creating ClusterRoleBinding {name}: {e}"));
        self.await_rules(&client, id, &rules, None).await;
    }

    /// Polls SubjectAccessReviews until every rule's first verb on its first resource is allowed.
    async fn await_rules(&self, admin: &kube::Client, id: Identity, rules: &[PolicyRule], ns: Option<&str>) {
        let reviews: Api<SubjectAccessReview> = Api::all(admin.clone());
        for rule in rules {
            let first = |v: &Option<Vec<String>>| v.as_ref().and_then(|v| v.first().cloned());
            let (resource, subresource) = match first(&rule.resources) {
                Some(r) => match r.split_once('/') {
                    Some((r, s)) => (Some(r.to_string()), Some(s.to_string())),
                    None => (Some(r), None),
                },
                None => continue, // a non-resource rule: nothing to check
            };
            let attributes = ResourceAttributes {
                namespace: ns.map(str::to_string),
                verb: rule.verbs.first().cloned(),
                group: first(&rule.api_groups),
                resource,
                subresource,
                name: first(&rule.resource_names),
                ..Default::default()
            };
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(id.user()),
                    resource_attributes: Some(attributes.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            eventually(&format!("RBAC to allow {id} {attributes:?}"), TIMEOUT, || async {
                let answer = reviews.create(&PostParams::default(), &review).await.map_err(|e| e.to_string())?;
                match answer.status {
                    Some(status) if status.allowed => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Prints the objects of this namespace, the logs of this test's processes and (on a
    /// private control plane) the end of the kube-apiserver log. Runs on its own thread and
    /// runtime, so it also works from `Drop` while a test panics.
    pub fn dump(&self) {
        let admin = self.admin.clone();
        let ns = self.ns.clone();
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let apiserver_log =
            self.private.then(|| self.cluster.control_plane().map(|cp| cp.log_file(Component::ApiServer))).flatten();
        let kubelet_log =
            self.node.as_ref().and_then(|_| self.cluster.control_plane()).map(|cp| cp.log_file(Component::Kubelet));
        let dump = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(dump_namespace(admin, &ns));
            for (name, path) in logs {
                eprintln!("--- {name} ({}), last lines:\n{}", path.display(), kubelock::devenv::log_tail(&path, 60));
            }
            if let Some(path) = apiserver_log {
                eprintln!("--- kube-apiserver log, last lines:\n{}", kubelock::devenv::log_tail(&path, 30));
            }
            if let Some(path) = kubelet_log {
                eprintln!(
                    "--- kubelet log ({}), last lines:\n{}",
                    path.display(),
                    kubelock::devenv::log_tail(&path, 30)
                );
            }
        });
        let _ = dump.join();
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("=== test failed: dump of namespace {} ===", self.ns);
            self.dump();
        } else if self.cluster.delete_namespaces {
            let (admin, ns) = (self.admin.clone(), self.ns.clone());
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                runtime.block_on(async {
                    let client = kubelock::connect::client_from_config(admin).ok()?;
                    Api::<Namespace>::all(client).delete(&ns, &Default::default()).await.ok()
                })
            })
            .join();
        }
    }
}

/// Prints every object of the kinds a kubelock test involves, as YAML, and the events.
async fn dump_namespace(admin: kube::Config, ns: &str) {
    let Ok(client) = kubelock::connect::client_from_config(admin) else { return };
    let kinds = [
        ApiResource::erase::<kubelock::api::Lock>(&()),
        ApiResource::erase::<kubelock::api::LockRequest>(&()),
        ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
        ApiResource::erase::<k8s_openapi::api::coordination::v1::Lease>(&()),
    ];
    let mut empty = true;
    for kind in kinds {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &kind);
        match tokio::time::timeout(Duration::from_secs(5), api.list(&ListParams::default())).await {
            Ok(Ok(list)) if list.items.is_empty() => {}
            Ok(Ok(list)) => {
                empty = false;
                eprintln!("--- {} in {ns}:", kind.plural);
                for obj in &list.items {
                    eprintln!("{}---", to_yaml(obj));
                }
            }
            Ok(Err(e)) => eprintln!("--- {}: {e}", kind.plural),
            Err(_) => eprintln!("--- {}: listing timed out", kind.plural),
        }
    }
    if empty {
        eprintln!("--- no Locks, LockRequests, Pods or Leases in {ns}");
    }
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, ns);
    if let Ok(Ok(list)) = tokio::time::timeout(Duration::from_secs(5), events.list(&ListParams::default())).await
        && !list.items.is_empty()
    {
        eprintln!("--- events in {ns}:");
        for e in list.items {
            let when = e.event_time.map(|t| t.0.to_string()).or(e.last_timestamp.map(|t| t.0.to_string()));
            eprintln!(
                "{} {} {} {}/{}: {}",
                when.unwrap_or_default(),
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.involved_object.kind.unwrap_or_default(),
                e.involved_object.name.unwrap_or_default(),
                e.message.unwrap_or_default()
            );
        }
    }
}

/// YAML of any object, without `metadata.managedFields`.
pub fn to_yaml<T: Serialize>(obj: &T) -> String {
    let mut value = serde_json::to_value(obj).unwrap_or_default();
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    serde_yaml::to_string(&value).unwrap_or_else(|e| format!("<not serializable: {e}>"))
}

fn meta(name: &str, ns: Option<&str>) -> ObjectMeta {
    ObjectMeta { name: Some(name.to_string()), namespace: ns.map(str::to_string), ..Default::default() }
}

fn user_subject(id: Identity) -> Subject {
    Subject {
        kind: "User".into(),
        name: id.user(),
        api_group: Some("rbac.authorization.k8s.io".into()),
        ..Default::default()
    }
}

/// `t-<test name>-<random>`: the test harness names each test's thread after the test.
fn namespace_name() -> String {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test").rsplit("::").next().unwrap_or("test");
    let mut slug: String =
        test.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    slug.truncate(40);
    let slug = slug.trim_matches('-');
    format!("t-{slug}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}
