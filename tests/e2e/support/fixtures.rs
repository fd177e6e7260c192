//! The fixtures the test files share: Locks, LockRequests and Pods as the tests create them,
//! the RBAC rule sets of kubelock's roles, a namespace with a controller ([`Fixture`]),
//! controller processes ([`ControllerCmd`]) and their readiness, loopback ports and plain HTTP
//! GETs. A helper that only one test file uses stays in that file.

use std::{
    collections::BTreeSet,
    sync::Mutex,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_openapi::{
    api::{
        core::v1::{Container, Pod, PodSpec},
        rbac::v1::PolicyRule,
    },
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use kubelock::api::{Lock, LockRequest, LockRequestSpec, LockSpec, Phase};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{Identity, Proc, TIMEOUT, TestEnv, rule, wait_until};

// ---------------------------------------------------------------------------------------
// Locks, requests, pods.

/// A Lock of `permits` with the default lease (30s) and no lock delay.
pub fn lock(name: &str, permits: i32) -> Lock {
    Lock::new(name, LockSpec { permits, ..Default::default() })
}

/// A Lock of `permits` with lease `lease` and lock delay `delay` (Go durations: `30s`, `0s`).
pub fn lock_with(name: &str, permits: i32, lease: &str, delay: &str) -> Lock {
    Lock::new(name, LockSpec { permits, lease_duration: lease.into(), lock_delay: delay.into(), ..Default::default() })
}

/// Creates `lock` in `api`'s namespace; panics, naming it, if the API server refuses.
pub async fn create_lock(api: &Api<Lock>, lock: Lock) -> Lock {
    let name = lock.name_any();
    api.create(&PostParams::default(), &lock).await.unwrap_or_else(|e| panic!("creating lock {name}: {e}"))
}

/// A LockRequest `name` for one permit of `lock`, held as `holder`, not renewed yet.
pub fn request(name: &str, lock: &str, holder: &str) -> LockRequest {
    LockRequest::new(name, LockRequestSpec { holder_identity: holder.into(), ..LockRequestSpec::new(lock) })
}

/// Creates the LockRequest `name` for `permits` of `lock`, held as `test/<name>` and renewed
/// now, with a lease of its own if `lease` is given (else the Lock's); panics if refused.
pub async fn create_request(
    api: &Api<LockRequest>,
    name: &str,
    lock: &str,
    permits: i32,
    lease: Option<&str>,
) -> LockRequest {
    let spec = LockRequestSpec {
        holder_identity: format!("test/{name}"),
        permits,
        lease_duration: lease.map(str::to_string),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..LockRequestSpec::new(lock)
    };
    let request = LockRequest::new(name, spec);
    api.create(&PostParams::default(), &request).await.unwrap_or_else(|e| panic!("creating request {name}: {e}"))
}

/// The holder's own release of a request, as the client does it: `spec.released` (the
/// controller frees its permits and deletes it).
pub async fn release(api: &Api<LockRequest>, name: &str) {
    let mark = serde_json::json!({"spec": {"released": true}});
    api.patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&mark))
        .await
        .unwrap_or_else(|e| panic!("marking {name} released: {e}"));
}

/// A Pod with one container. Nothing ever runs it (the local control plane has no nodes): it
/// is there to be referenced by a request and deleted.
pub fn pod(name: &str) -> Pod {
    Pod {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("example.invalid/app:1".into()),
                ..Default::default()
            }],
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
        status: None,
    }
}

/// Creates [`pod`] `name` in `api`'s namespace; panics if refused.
pub async fn create_pod(api: &Api<Pod>, name: &str) -> Pod {
    api.create(&PostParams::default(), &pod(name)).await.unwrap_or_else(|e| panic!("creating pod {name}: {e}"))
}

// ---------------------------------------------------------------------------------------
// RBAC.

/// (API group, resource, verbs).
type Calls<'a> = (&'a str, &'a str, &'a [&'a str]);

/// The controller's API calls on Locks and LockRequests (src/controller).
const CONTROLLER_CALLS: [Calls; 4] = [
    ("kubelock.dev", "locks", &["get", "list", "watch", "patch"]),
    ("kubelock.dev", "locks/status", &["update"]),
    ("kubelock.dev", "lockrequests", &["get", "list", "watch", "delete"]),
    ("kubelock.dev", "lockrequests/status", &["update"]),
];

/// The controller's API calls for requests bound to a pod, and for its Events.
const CONTROLLER_POD_AND_EVENT_CALLS: [Calls; 2] =
    [("", "pods", &["get", "list", "watch"]), ("events.k8s.io", "events", &["create", "patch"])];

/// What the controller needs in a namespace it watches, as rules for [`TestEnv::grant`]: the
/// calls the chart grants it ([`controller_rule_set`]), and its leader-election Lease.
pub fn controller_rules() -> Vec<PolicyRule> {
    CONTROLLER_CALLS
        .iter()
        .chain(&CONTROLLER_POD_AND_EVENT_CALLS)
        .map(|(group, resource, verbs)| rule(&[group], &[resource], verbs))
        .chain([rule(&["coordination.k8s.io"], &["leases"], &["get", "create", "update"])])
        .collect()
}

/// The controller's rules on kubelock's own kinds alone: no pods, no Events, no Lease.
pub fn controller_core_rules() -> Vec<PolicyRule> {
    CONTROLLER_CALLS.iter().map(|(group, resource, verbs)| rule(&[group], &[resource], verbs)).collect()
}

/// What a requester needs (the chart's `kubelock-requester` role).
pub fn requester_rules() -> Vec<PolicyRule> {
    vec![
        rule(&["kubelock.dev"], &["lockrequests"], &["create", "get", "list", "watch", "patch", "delete"]),
        rule(&["kubelock.dev"], &["locks"], &["get", "list", "watch"]),
        // The sidecar reads its own pod to see the app's containers stop before it releases.
        rule(&[""], &["pods"], &["get", "list", "watch"]),
    ]
}

/// Rules as a set of (group, resource, verb, resourceName) for exact comparison.
pub type RuleSet = BTreeSet<(String, String, String, String)>;

/// The rule set that `rules` grant.
pub fn rule_set(rules: &[PolicyRule]) -> RuleSet {
    let mut set = BTreeSet::new();
    for r in rules {
        let names = r.resource_names.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| vec![String::new()]);
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    for n in &names {
                        set.insert((g.clone(), res.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    set
}

/// The rule set of `(group, resource, verbs, resourceName)` entries.
fn rules(entries: &[(&str, &str, &[&str], &str)]) -> RuleSet {
    entries
        .iter()
        .flat_map(|(g, r, verbs, n)| {
            verbs.iter().map(move |v| (g.to_string(), r.to_string(), v.to_string(), n.to_string()))
        })
        .collect()
}

/// The controller's API calls, as the chart's controller role must grant them: nothing more,
/// nothing less (`pods_and_events`: with the calls on pods and Events).
pub fn controller_rule_set(pods_and_events: bool) -> RuleSet {
    let more: &[Calls] = if pods_and_events { &CONTROLLER_POD_AND_EVENT_CALLS } else { &[] };
    let entries: Vec<_> = CONTROLLER_CALLS.iter().chain(more).map(|(g, r, verbs)| (*g, *r, *verbs, "")).collect();
    rules(&entries)
}

/// The chart's leader-election rules: get and update of the Lease `lease` only, and create.
pub fn lease_rule_set(lease: &str) -> RuleSet {
    rules(&[
        ("coordination.k8s.io", "leases", &["get", "update"], lease),
        ("coordination.k8s.io", "leases", &["create"], ""),
    ])
}

// ---------------------------------------------------------------------------------------
// A namespace with the controller.

/// A test namespace with the controller running in it, as its own least-privileged identity,
/// and a requester identity with a requester's rights.
pub struct Fixture {
    pub env: TestEnv,
    /// As the admin.
    pub locks: Api<Lock>,
    /// As `kubelock-requester-1`.
    pub requests: Api<LockRequest>,
    pub controllers: Vec<Proc>,
}

impl Fixture {
    pub async fn new() -> Fixture {
        Fixture::with(&[]).await
    }

    /// With extra controller flags.
    pub async fn with(flags: &[&str]) -> Fixture {
        let mut f = Fixture::without_controller().await;
        f.start_controller(flags);
        f
    }

    /// The namespace and identities, no controller yet.
    pub async fn without_controller() -> Fixture {
        Fixture::on(TestEnv::new().await).await
    }

    /// In a namespace the admission webhook reviews, with the controller.
    pub async fn with_webhook() -> Fixture {
        let mut f = Fixture::on(TestEnv::with_webhook().await).await;
        f.start_controller(&[]);
        f
    }

    /// The identities on `env`, no controller yet.
    pub async fn on(env: TestEnv) -> Fixture {
        env.grant(Identity::Controller, controller_rules()).await;
        env.grant(Identity::Requester1, requester_rules()).await;
        let locks = env.api(Identity::Admin).await;
        let requests = env.api(Identity::Requester1).await;
        Fixture { env, locks, requests, controllers: Vec::new() }
    }

    /// Starts one more controller process on this namespace (its identity, POD_NAME, is
    /// `controller-N`).
    pub fn start_controller(&mut self, flags: &[&str]) {
        let name = format!("controller-{}", self.controllers.len());
        let proc = ControllerCmd::new(&self.env, Identity::Controller, &name)
            .pod_name()
            .log("info,kubelock=debug")
            .args(flags)
            .spawn();
        self.controllers.push(proc);
    }

    /// Creates a Lock (see [`lock_with`]).
    pub async fn lock(&self, name: &str, permits: i32, lease: &str, delay: &str) -> Lock {
        create_lock(&self.locks, lock_with(name, permits, lease, delay)).await
    }

    /// Creates a request as the requester (see [`create_request`]).
    pub async fn request(&self, name: &str, lock: &str, permits: i32) -> LockRequest {
        create_request(&self.requests, name, lock, permits, None).await
    }

    pub async fn wait_phase(&self, name: &str, phase: Phase) -> LockRequest {
        let what = format!("{name} to be {phase}");
        wait_until(&self.requests, name, &what, TIMEOUT, |r| r.phase() == phase).await.unwrap_or_else(|e| {
            self.env.dump();
            panic!("{e}")
        })
    }

    /// The holder's own release: marks the request released.
    pub async fn release(&self, name: &str) {
        release(&self.requests, name).await;
    }

    /// A delete by someone else than the holder (no release mark).
    pub async fn delete(&self, name: &str) {
        self.requests.delete(name, &DeleteParams::default()).await.unwrap_or_else(|e| panic!("deleting {name}: {e}"));
    }

    pub async fn holders(&self, lock: &str) -> Vec<String> {
        let lock = self.locks.get(lock).await.expect("reading the lock");
        lock.status.unwrap_or_default().holders.into_iter().map(|h| h.request).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Controller processes.

/// `kubelock controller --watch-namespace <ns>` on a test's namespace, as a child process:
/// set up with the builder methods, started with [`ControllerCmd::spawn`].
pub struct ControllerCmd<'a> {
    env: &'a TestEnv,
    id: Identity,
    name: String,
    pod_name: bool,
    admin_addr: String,
    args: Vec<String>,
    dumped: bool,
}

impl<'a> ControllerCmd<'a> {
    /// The controller as `id`; `name` names its logs. No admin server (`--admin-addr ""`).
    pub fn new(env: &'a TestEnv, id: Identity, name: &str) -> ControllerCmd<'a> {
        ControllerCmd {
            env,
            id,
            name: name.into(),
            pod_name: false,
            admin_addr: String::new(),
            args: Vec::new(),
            dumped: true,
        }
    }

    /// POD_NAME is its name: the identity it claims (leader election, Events).
    pub fn pod_name(mut self) -> Self {
        self.pod_name = true;
        self
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on 127.0.0.1:`port` (see [`free_port`]).
    pub fn admin_port(mut self, port: u16) -> Self {
        self.admin_addr = format!("127.0.0.1:{port}");
        self
    }

    /// `--log FILTER`.
    pub fn log(self, filter: &str) -> Self {
        self.args(&["--log", filter])
    }

    /// More controller flags.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Leaves its logs out of the failure dump of the namespace (see
    /// [`TestEnv::kubelock_undumped`]).
    pub fn undumped(mut self) -> Self {
        self.dumped = false;
        self
    }

    pub fn spawn(self) -> Proc {
        let mut cmd = if self.dumped {
            self.env.kubelock(self.id, &self.name)
        } else {
            self.env.kubelock_undumped(self.id, &self.name)
        };
        if self.pod_name {
            cmd = cmd.env("POD_NAME", &self.name);
        }
        cmd.args(["controller", "--watch-namespace", self.env.ns(), "--admin-addr", &self.admin_addr])
            .args(&self.args)
            .spawn()
    }
}

/// Whether the admin server on 127.0.0.1:`port` answers `/readyz` with 200 within a second.
pub async fn readyz(port: u16) -> bool {
    let probe = tokio::time::timeout(Duration::from_secs(1), http_get(port, "/readyz")).await;
    matches!(probe, Ok(Ok(response)) if response.status == 200)
}

/// Waits until a controller's admin server on `port` answers `/readyz` with 200 (its caches
/// are synced), polling every 50 ms; false if `timeout` passed first.
pub async fn wait_ready(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if readyz(port).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // polling /readyz
    }
    false
}

// ---------------------------------------------------------------------------------------
// Ports and HTTP.

/// A loopback port nothing listens on, for a process under test to bind. It lies outside the
/// kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999 if
/// unreadable), so the kernel does not hand it out as the local port of a connection before
/// the process binds it; and it is never handed out twice in one test binary.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|text| {
        let mut bounds = text.split_whitespace().map(|n| n.parse::<u32>().ok());
        Some((bounds.next()??, bounds.next()??))
    });
    let (low, high) = range.filter(|(low, high)| low <= high && *high <= 65535).unwrap_or((32768, 60999));
    // The candidates: 1024..low, then high+1..=65535.
    let below = low.saturating_sub(1024);
    let count = below + (65535 - high);
    let nth = |i: u32| if i < below { 1024 + i } else { high + 1 + (i - below) };
    assert!(count > 0, "every unprivileged port is in the ephemeral range {low}-{high}");
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let start = rand::random::<u32>() % count;
    for i in 0..count {
        let port = u16::try_from(nth((start + i) % count)).expect("a port number");
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port outside the ephemeral range {low}-{high}");
}

/// An HTTP response as received.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The status line and the headers (`HTTP/1.0 200 OK\r\n...`).
    pub head: String,
    pub body: String,
}

/// GET `path` from 127.0.0.1:`port` with HTTP/1.0: the server closes the connection after
/// its answer, so the answer is everything read until then.
pub async fn http_get(port: u16, path: &str) -> Result<Response, String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(format!("bad response {text:?}"))?;
    Ok(Response { status, head: head.to_string(), body: body.to_string() })
}
