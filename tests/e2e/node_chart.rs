//! The Helm chart on the local node, and holder pods killed the ways nodes kill them.
//!
//! - `the_chart_on_the_node_fails_over_upgrades_and_uninstalls`: `helm install` of
//!   charts/kubelock from the `kubelock:dev` image, webhook included (it reviews this test's
//!   namespace): both controller replicas Ready with the chart's RBAC alone, one leader by the
//!   Lease and by each replica's `kubelock_leader`; contenders take a Lock through the
//!   in-cluster controller while the leader pod is deleted (the standby leads, grants go on)
//!   and while `helm upgrade` rolls every pod; `helm uninstall` keeps the CRDs and the Locks
//!   and removes the rest. The history checker judges every grant of the run.
//! - `a_holder_pod_*`: a pod running `kubelock run` in `kubelock-test:dev` holds a Lock while a
//!   holder in the test waits; the pod is deleted gracefully, force-deleted, its container
//!   is SIGKILLed in containerd, or its node is lost (the kubelet paused, the pod's network
//!   cut). The waiter is granted at once where the pod is known stopped,
//!   after the lease otherwise, and never while the pod still acted: the pod writes every
//!   instant it acts (`/proc/uptime`, CLOCK_BOOTTIME, the test's clock too) to a hostPath
//!   file, and the checker judges those intervals with the store's history.
//!
//! The chart's controller watches every namespace and its webhook fails closed, so the chart
//! test runs alone: the holder tests (each with a controller of its own) wait for it, and it
//! for them ([`TURN`]). Timings are printed (`--nocapture`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{Namespace, Pod},
        rbac::v1::{ClusterRole, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use kubelock::{
    api::{Lock, LockRequest},
    client::{AcquireOptions, LockClient, LockState},
    devenv::{Component, TEST_IMAGE},
};
use serde_json::json;
use tokio::{io::AsyncReadExt as _, io::AsyncWriteExt as _, sync::RwLock};

use crate::{
    chart::{HELM_TIMEOUT, Release, WEBHOOK_TEST_LABEL, chart_dir, helm, may, release_name},
    faults::{Work, contend},
    support::{
        Identity, Proc, ServerFaults as _, TIMEOUT, TestEnv,
        checker::{self, At, Bounds, FaultKind, History, Journal, Report, Summary},
        eventually,
        fixtures::{ControllerCmd, controller_rules, create_lock, free_port, lock_with, requester_rules, wait_ready},
        node::{is_ready, phase, wait_started},
        wait_until,
    },
};

/// The chart test takes it for writing, the holder tests for reading (see the module doc).
static TURN: RwLock<()> = RwLock::const_new(());

/// How long pods may take to be Ready, rolled or gone.
const POD_TIMEOUT: Duration = Duration::from_secs(180);

/// The chart's values for the image `make image` writes, imported into the node.
const IMAGE_VALUES: [&str; 3] = ["image.repository=kubelock", "image.tag=dev", "image.pullPolicy=Never"];

/// `app.kubernetes.io/instance=RELEASE,app.kubernetes.io/component=COMPONENT`.
fn selector(release: &str, component: &str) -> String {
    format!("app.kubernetes.io/instance={release},app.kubernetes.io/component={component}")
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Waits until exactly `want` pods match `selector`, all Ready and none of UIDs `old`
/// (terminating pods count: a rollout is done once they are gone). Returns them.
async fn ready_pods(pods: &Api<Pod>, selector: &str, want: usize, old: &BTreeSet<String>) -> Vec<Pod> {
    eventually(&format!("{want} Ready pods {selector}"), POD_TIMEOUT, || async {
        let list = pods.list(&ListParams::default().labels(selector)).await.map_err(|e| e.to_string())?;
        let fresh = |p: &Pod| !old.contains(&p.uid().unwrap_or_default());
        let ready = list.items.iter().filter(|p| is_ready(p) && fresh(p)).count();
        if list.items.len() == want && ready == want {
            Ok(list.items)
        } else {
            let seen: Vec<String> = list
                .items
                .iter()
                .map(|p| {
                    let gone = if p.metadata.deletion_timestamp.is_some() { " terminating" } else { "" };
                    let old = if fresh(p) { "" } else { " old" };
                    format!("{} {} ready={}{gone}{old}", p.name_any(), phase(p), is_ready(p))
                })
                .collect();
            Err(format!("{seen:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn uids(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter().filter_map(|p| p.uid()).collect()
}

/// GET `path` from `address` (`IP:PORT`) with HTTP/1.0; the body.
async fn http_get(address: &str, path: &str) -> Result<String, String> {
    let connect = tokio::net::TcpStream::connect(address);
    let mut stream = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| format!("connecting to {address} timed out"))?
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| format!("reading from {address} timed out"))?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {address}{path}: {}", head.lines().next().unwrap_or_default()));
    }
    Ok(body.to_string())
}

/// The `kubelock_leader` gauge of a controller pod, read from its admin port.
async fn leader_gauge(pod: &Pod) -> Result<i64, String> {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).ok_or(format!("{} has no IP", pod.name_any()))?;
    let metrics = http_get(&format!("{ip}:8080"), "/metrics").await?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("kubelock_leader "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or(format!("no kubelock_leader in the metrics of {}", pod.name_any()))
}

fn holder_of(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty())
}

/// When the leader-election Lease changed hands, and to whom (`None`: emptied).
type Changes = Arc<Mutex<Vec<(At, Option<String>)>>>;

/// Who held the leader-election Lease when, as its watch told; journaled for the checker as
/// controller lifetimes (a replica is up from taking the Lease until it loses it: only the
/// leader grants).
struct Leadership {
    changes: Changes,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Leadership {
    async fn watch(leases: Api<Lease>, name: &str, journal: Journal) -> Leadership {
        let changes: Changes = Arc::default();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(leases, config).default_backoff().applied_objects().boxed();
        let sink = changes.clone();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut first = Some(first_tx);
            let mut current: Option<String> = None;
            while let Some(event) = events.next().await {
                let Ok(lease) = event else { continue };
                let holder = holder_of(&lease);
                let at = checker::now();
                if first.is_some() || holder != current {
                    if let Some(prev) = &current {
                        journal.fault(FaultKind::ControllerKill, at, None, prev);
                    }
                    if let Some(new) = &holder {
                        journal.fault(FaultKind::ControllerStart, at, None, new);
                        journal.fault(FaultKind::ControllerReady, at, None, new);
                    }
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push((at, holder.clone()));
                    current = holder;
                }
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
        });
        let _ = tokio::time::timeout(TIMEOUT, first_rx).await;
        Leadership { changes, task }
    }

    fn changes(&self) -> Vec<(At, Option<String>)> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first moment after `after` at which someone other than `old` held the Lease.
    fn taken_over(&self, after: At, old: &str) -> Option<(At, String)> {
        self.changes().into_iter().find_map(|(at, h)| match h {
            Some(h) if at >= after && h != old => Some((at, h)),
            _ => None,
        })
    }
}

/// Contenders on `lock` through the in-cluster controller until `stop`: one task each.
fn contenders(
    client: &kube::Client,
    ns: &str,
    lock: &str,
    n: usize,
    stop: At,
    journal: &Journal,
) -> Vec<tokio::task::JoinHandle<crate::faults::Stats>> {
    (0..n)
        .map(|i| {
            let work = Work {
                lock: lock.into(),
                permits: 1,
                lease: Duration::from_secs(10),
                hold: (100, 400),
                stop,
                journal: journal.clone(),
            };
            let locks = LockClient::new(client.clone(), ns);
            tokio::spawn(contend(locks, format!("contender-{i}"), work, rand::random(), None))
        })
        .collect()
}

/// Waits for contenders; panics with their problems or if none was granted.
async fn join_contenders(handles: Vec<tokio::task::JoinHandle<crate::faults::Stats>>, phase: &str) -> usize {
    let mut grants = 0;
    for h in handles {
        let stats = h.await.expect("a contender");
        assert!(stats.problems.is_empty(), "{phase}: {:?}", stats.problems);
        assert_eq!(stats.errors, 0, "{phase}: acquire errors {:?}", stats.first_errors);
        grants += stats.grants;
    }
    assert!(grants > 0, "{phase}: no grant");
    grants
}

/// Grant times (as the holders saw them) after `after`.
fn grants_after(journal: &Journal, after: At) -> Vec<At> {
    let mut at: Vec<At> = journal
        .snapshot()
        .reports
        .iter()
        .filter_map(|r| match r {
            Report::Granted { at, .. } if *at >= after => Some(*at),
            _ => None,
        })
        .collect();
    at.sort();
    at
}

/// Lets the recorder catch up, then judges everything recorded.
async fn judge(history: &History, what: &str) -> Summary {
    assert!(history.sync(Duration::from_secs(30)).await, "the recorder did not catch up with etcd");
    let mut log = history.journal.snapshot();
    log.end = Some(checker::now());
    let summary = checker::check(&log, &Bounds::default()).unwrap_or_else(|f| panic!("{what}: {f}"));
    eprintln!("{what}: checked {summary}");
    for r in &log.reports {
        if let Report::Note { at, who, text } = r {
            eprintln!("{what}: note at {:.3} s from {who}: {text}", at.as_secs_f64() - log.start.as_secs_f64());
        }
    }
    summary
}

/// A RoleBinding of the chart's `-requester` ClusterRole to requester-1 in the test's
/// namespace, waited for until the authorizer applies it.
async fn bind_requester_role(env: &TestEnv, release: &str) {
    let admin = env.admin().await;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "requester-1-locks"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{release}-requester")},
        "subjects": [{"kind": "User", "name": Identity::Requester1.user(), "apiGroup": "rbac.authorization.k8s.io"}],
    }))
    .expect("a RoleBinding");
    Api::<RoleBinding>::namespaced(admin.clone(), env.ns())
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding the requester role");
    let user = Identity::Requester1.user();
    eventually("the requester role to apply", TIMEOUT, || async {
        let ns = env.ns();
        let ok = may(&admin, &user, ns, "create", "kubelock.dev", "lockrequests", Some(ns), None).await
            && may(&admin, &user, ns, "watch", "kubelock.dev", "locks", Some(ns), None).await;
        if ok { Ok(()) } else { Err("not yet allowed".to_string()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// `hack/helm.py upgrade RELEASE charts/kubelock --reuse-values --set ... --wait`.
async fn helm_upgrade(env: &TestEnv, release: &str, sets: &[&str]) -> serde_json::Value {
    let chart = chart_dir();
    let mut args = vec!["upgrade", release, chart.to_str().expect("utf-8 path"), "-n", env.ns(), "--reuse-values"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let timeout = (HELM_TIMEOUT.as_secs() - 10).to_string();
    args.extend(["--wait", "--timeout", &timeout, "-o", "json"]);
    let out = helm(env, &format!("helm-upgrade-{release}"), &args).await.success("helm upgrade");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("helm upgrade printed no JSON ({e}):\n{}", out.stdout))
}

fn container_args(pod: &Pod) -> Vec<String> {
    pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.args.clone()).unwrap_or_default()
}

/// The chart, installed from the image of `make image`, on the node: failover, upgrade,
/// uninstall, with contenders taking a Lock through the in-cluster controller all along.
#[tokio::test]
async fn the_chart_on_the_node_fails_over_upgrades_and_uninstalls() {
    let _alone = TURN.write().await;
    let env = TestEnv::with_node().await;
    env.import_images().await;
    let admin = env.admin().await;
    let ns = env.ns().to_string();
    let name = release_name(&env);
    let pods: Api<Pod> = env.api(Identity::Admin).await;

    // 1. Install: both controller replicas Ready, one leader, the webhook enforced here.
    let installed = Instant::now();
    let release = Release::install(&env, &name, &IMAGE_VALUES, true).await;
    let controllers = ready_pods(&pods, &selector(&name, "controller"), 2, &BTreeSet::new()).await;
    eprintln!("timing: helm install to both controller replicas Ready: {:.1} s", seconds(installed.elapsed()));
    ready_pods(&pods, &selector(&name, "webhook"), 2, &BTreeSet::new()).await;
    for pod in &controllers {
        let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone());
        assert_eq!(sa, Some(format!("{name}-controller")), "{} runs as another ServiceAccount", pod.name_any());
        let image = pod.spec.as_ref().and_then(|s| s.containers[0].image.clone()).unwrap_or_default();
        assert_eq!(image, "kubelock:dev");
    }
    // The chart's webhook selects namespaces by a label its test releases set: label this one.
    let label = json!({"metadata": {"labels": {WEBHOOK_TEST_LABEL: &name}}});
    Api::<Namespace>::all(admin.clone())
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("labelling the namespace for the chart's webhook");
    kubelock::webhook::config::wait_enforced(&admin, &ns, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("the chart's webhook on the node: {e}"));
    eprintln!("timing: helm install to the webhook enforced: {:.1} s", seconds(installed.elapsed()));

    let leases: Api<Lease> = env.api(Identity::Admin).await;
    let lease_name = format!("{name}-controller");
    let names: BTreeSet<String> = controllers.iter().map(|p| p.name_any()).collect();
    let lease = wait_until(&leases, &lease_name, "a controller replica to lead", TIMEOUT, |l| {
        holder_of(l).is_some_and(|h| names.contains(&h))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let leader = holder_of(&lease).expect("a holder");
    let gauges = eventually("each replica's kubelock_leader", TIMEOUT, || async {
        let mut gauges = Vec::new();
        for pod in &controllers {
            gauges.push((pod.name_any(), leader_gauge(pod).await?));
        }
        let leading: Vec<&String> = gauges.iter().filter(|(_, g)| *g == 1).map(|(n, _)| n).collect();
        if leading == [&leader] { Ok(gauges) } else { Err(format!("{gauges:?}, Lease holder {leader}")) }
    })
    .await
    .unwrap_or_else(|e| panic!("exactly one leader: {e}"));
    eprintln!("leader {leader}; kubelock_leader per replica: {gauges:?}");

    // Requests by requester-1 with the chart's requester role; the Lock by the admin.
    bind_requester_role(&env, &name).await;
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    let history = History::record(env.control_plane().etcd_endpoint(), &ns).await;
    let journal = history.journal.clone();
    let leadership = Leadership::watch(leases.clone(), &lease_name, journal.clone()).await;
    create_lock(&locks, lock_with("shared", 1, "10s", "0s")).await;
    let requester = env.client(Identity::Requester1).await;

    // 2. Failover: contenders take the Lock; the leader pod is deleted; the standby leads.
    let standby: String = names.iter().find(|n| **n != leader).expect("a standby").clone();
    let stop = checker::now() + Duration::from_secs(30);
    let running = contenders(&requester, &ns, "shared", 3, stop, &journal);
    let warm = checker::now();
    eventually("grants by the in-cluster controller", TIMEOUT, || async {
        let n = grants_after(&journal, warm).len();
        if n >= 3 { Ok(()) } else { Err(format!("{n} grants")) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let deleted = checker::now();
    journal.fault(FaultKind::ControllerKill, deleted, None, &leader);
    pods.delete(&leader, &DeleteParams::default()).await.expect("deleting the leader pod");
    let (taken, new_leader) = eventually("another replica to take the Lease", Duration::from_secs(60), || async {
        leadership.taken_over(deleted, &leader).ok_or_else(|| format!("{:?}", leadership.changes()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let next_grant = eventually("a grant by the new leader", Duration::from_secs(60), || async {
        grants_after(&journal, taken).first().copied().ok_or("none yet".to_string())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "timing: failover: leader pod {leader} deleted -> Lease held by {new_leader} {:.2} s (handover), -> next grant observed {:.2} s",
        seconds(taken - deleted),
        seconds(next_grant - deleted)
    );
    // The standby retries every 2 s; the Deployment's replacement pod, started meanwhile, may
    // ask first. Either is one of this release's controller pods.
    assert!(new_leader.starts_with(&format!("{name}-controller-")), "the Lease went to {new_leader}");
    let which = if new_leader == standby { "the standby" } else { "the Deployment's replacement pod" };
    eprintln!("failover: {which} took over");
    let failover_grants = join_contenders(running, "failover").await;
    let after = grants_after(&journal, taken).len();
    assert!(after >= 3, "only {after} grants after the failover");
    eprintln!("failover phase: {failover_grants} grants, {after} after the new leader took the Lease");
    let summary = judge(&history, "failover").await;
    assert!(summary.grants >= failover_grants, "the store shows {} grants of {failover_grants}", summary.grants);

    // 3. Upgrade: a changed value rolls every controller (and webhook) pod; locks keep working.
    let before = ready_pods(&pods, &selector(&name, "controller"), 2, &BTreeSet::new()).await;
    let old = uids(&before);
    let stop = checker::now() + Duration::from_secs(40);
    let running = contenders(&requester, &ns, "shared", 3, stop, &journal);
    let upgrading = checker::now();
    let started = Instant::now();
    let upgraded = helm_upgrade(&env, &name, &["controller.logLevel=debug"]).await;
    assert_eq!(upgraded["version"], 2, "release revision after the upgrade: {}", upgraded["info"]);
    assert_eq!(upgraded["info"]["status"], "deployed");
    let rolled = ready_pods(&pods, &selector(&name, "controller"), 2, &old).await;
    eprintln!("timing: helm upgrade to every controller pod replaced and Ready: {:.1} s", seconds(started.elapsed()));
    for pod in &rolled {
        let args = container_args(pod);
        assert!(args.iter().any(|a| a == "--log=debug"), "{}: {args:?}", pod.name_any());
        assert!(args.iter().any(|a| a == "--leader-elect"), "{}: {args:?}", pod.name_any());
    }
    let rolled_names: BTreeSet<String> = rolled.iter().map(|p| p.name_any()).collect();
    let lease = wait_until(&leases, &lease_name, "a new replica to lead", TIMEOUT, |l| {
        holder_of(l).is_some_and(|h| rolled_names.contains(&h))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let upgraded_leader = holder_of(&lease).expect("a holder");
    let leaders: Vec<String> = leadership
        .changes()
        .into_iter()
        .filter(|(at, _)| *at >= upgrading)
        .map(|(_, h)| h.unwrap_or_else(|| "-".into()))
        .collect();
    eprintln!("upgrade: Lease holders in turn {leaders:?}, now {upgraded_leader}");
    let upgrade_grants = join_contenders(running, "upgrade").await;
    // After the rollout, a grant by the new leader.
    let client = LockClient::new(requester.clone(), &ns);
    let mut opts = AcquireOptions::new("shared");
    opts.holder_identity = "test/after-upgrade".into();
    opts.wait_timeout = Some(Duration::from_secs(60));
    let asked = Instant::now();
    let guard = client.acquire(opts).await.expect("a grant after the upgrade");
    eprintln!("timing: a grant after the upgrade in {:.2} s", seconds(asked.elapsed()));
    let token = guard.token();
    guard.release().await.expect("releasing");
    eprintln!("upgrade phase: {upgrade_grants} grants during the rollout, token {token} after it");
    judge(&history, "failover and upgrade").await;

    // 4. Uninstall, as README.md ("Install with Helm") says: the CRDs and the Locks stay, the
    // controller, its RBAC and the webhook go (writes are not refused by a webhook left behind).
    let uninstalled = Instant::now();
    drop(release);
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in ["locks.kubelock.dev", "lockrequests.kubelock.dev"] {
        let kept = crds.get(crd).await.unwrap_or_else(|e| panic!("CRD {crd} was removed on uninstall: {e}"));
        assert!(kept.metadata.deletion_timestamp.is_none(), "CRD {crd} is being deleted");
    }
    let kept = locks.get("shared").await.expect("the Lock outlives the release");
    assert!(kept.metadata.deletion_timestamp.is_none(), "the Lock is being deleted");
    let deployments: Api<Deployment> = env.api(Identity::Admin).await;
    for d in [format!("{name}-controller"), format!("{name}-webhook")] {
        assert!(deployments.get_opt(&d).await.expect("reading").is_none(), "Deployment {d} outlived the release");
    }
    for kind in ["controller", "webhook"] {
        eventually(&format!("the {kind} pods to go"), POD_TIMEOUT, || async {
            let left =
                pods.list(&ListParams::default().labels(&selector(&name, kind))).await.map_err(|e| e.to_string())?;
            if left.items.is_empty() { Ok(()) } else { Err(format!("{} left", left.items.len())) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    eprintln!("timing: helm uninstall to every pod gone: {:.1} s", seconds(uninstalled.elapsed()));
    let gone = Api::<ClusterRole>::all(admin.clone()).get_opt(&format!("{name}-controller")).await.expect("reading");
    assert!(gone.is_none(), "the controller ClusterRole outlived the release");
    let gone = Api::<Role>::namespaced(admin.clone(), &ns).get_opt(&format!("{name}-leader-election")).await;
    assert!(gone.expect("reading").is_none(), "the leader-election Role outlived the release");
    let webhook = format!("{name}-webhook");
    let mutating = Api::<MutatingWebhookConfiguration>::all(admin.clone()).get_opt(&webhook).await.expect("reading");
    let validating =
        Api::<ValidatingWebhookConfiguration>::all(admin.clone()).get_opt(&webhook).await.expect("reading");
    assert!(mutating.is_none() && validating.is_none(), "a webhook configuration outlived the release");
    let requests: Api<LockRequest> = env.api(Identity::Admin).await;
    requests
        .create(&PostParams::default(), &crate::support::fixtures::request("after-uninstall", "shared", "test/after"))
        .await
        .expect("a request after the uninstall (no webhook left to refuse it)");
    let lease_left = leases.get_opt(&lease_name).await.expect("reading the Lease");
    eprintln!(
        "after uninstall: Lock kept with finalizers {:?}; leader-election Lease {}",
        kept.finalizers(),
        if lease_left.is_some() { "kept (the controller created it, not the chart)" } else { "gone" }
    );
    // Without a controller, the Lock's finalizer would hold its deletion (and the namespace's)
    // forever: remove it by hand, as the README says.
    let unfinalize = json!({"metadata": {"finalizers": null}});
    locks.patch("shared", &PatchParams::default(), &Patch::Merge(&unfinalize)).await.expect("removing the finalizer");
}

// ---------------------------------------------------------------------------------------
// Holder pods killed the ways nodes kill them.

/// The Lock a holder pod holds: its lease (the pod's `kubelock run` takes the Lock's).
const HOLDER_LEASE: Duration = Duration::from_secs(15);
/// The holder pod's termination grace period.
const HOLDER_GRACE: Duration = Duration::from_secs(4);

/// The holder pod's command, under `kubelock run`: it ignores SIGTERM (so only SIGKILL, or
/// `kubelock run` at its deadline, stops it) and writes its token once and every instant it
/// acts as holder (`/proc/uptime`: CLOCK_BOOTTIME seconds) to the hostPath `/out`.
const HOLDER_SCRIPT: &str = "trap '' TERM; echo \"$KUBELOCK_TOKEN $KUBELOCK_REQUEST\" > /out/token; \
     while :; do read up _ < /proc/uptime; echo \"$up\" >> /out/acted; sleep 0.1; done";

/// A namespace on the node with a controller of its own (test-run, least-privileged), the
/// recorder, requester-1 and the namespace's `default` ServiceAccount as requesters, and a
/// Lock `held`.
struct HolderCase {
    env: TestEnv,
    history: History,
    journal: Journal,
    _controller: Proc,
    pods: Api<Pod>,
    locks: Api<Lock>,
    out: PathBuf,
}

impl HolderCase {
    async fn start() -> HolderCase {
        let env = TestEnv::with_node().await;
        env.import_images().await;
        env.grant(Identity::Controller, controller_rules()).await;
        env.grant(Identity::Requester1, requester_rules()).await;
        let admin = env.admin().await;
        let role: Role = serde_json::from_value(json!({"metadata": {"name": "holder"}, "rules": requester_rules()}))
            .expect("a Role");
        Api::<Role>::namespaced(admin.clone(), env.ns()).create(&PostParams::default(), &role).await.expect("Role");
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "holder"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "holder"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": env.ns()}],
        }))
        .expect("a RoleBinding");
        Api::<RoleBinding>::namespaced(admin.clone(), env.ns())
            .create(&PostParams::default(), &binding)
            .await
            .expect("RoleBinding");
        let sa = format!("system:serviceaccount:{}:default", env.ns());
        eventually("the holder pod's role to apply", TIMEOUT, || async {
            let ns = env.ns();
            if may(&admin, &sa, ns, "patch", "kubelock.dev", "lockrequests", Some(ns), None).await {
                Ok(())
            } else {
                Err("not yet allowed".to_string())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));

        let history = History::record(env.control_plane().etcd_endpoint(), env.ns()).await;
        let journal = history.journal.clone();
        let port = free_port();
        let controller = ControllerCmd::new(&env, Identity::Controller, "controller-0")
            .pod_name()
            .log("info,kubelock=debug")
            .admin_port(port)
            .spawn();
        journal.fault(FaultKind::ControllerStart, checker::now(), None, "controller-0");
        assert!(
            wait_ready(port, Duration::from_secs(60)).await,
            "the controller is not ready:\n{}",
            controller.stderr_tail(20)
        );
        journal.fault(FaultKind::ControllerReady, checker::now(), None, "controller-0");
        let locks: Api<Lock> = env.api(Identity::Admin).await;
        let lease = format!("{}s", HOLDER_LEASE.as_secs());
        create_lock(&locks, lock_with("held", 1, &lease, "0s")).await;
        let out = env.log_dir().join("holder-out");
        let pods = env.api(Identity::Admin).await;
        HolderCase { env, history, journal, _controller: controller, pods, locks, out }
    }

    /// Starts the holder pod and waits until it holds `held` and acts.
    async fn hold(&self) -> String {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "holder"},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": HOLDER_GRACE.as_secs(),
                "containers": [{
                    "name": "main",
                    "image": TEST_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["kubelock", "run", "--lock", "held", "--", "sh", "-c", HOLDER_SCRIPT],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                    ],
                    "volumeMounts": [{"name": "out", "mountPath": "/out"}],
                }],
                "volumes": [{"name": "out", "hostPath": {"path": self.out.to_str().expect("utf-8"), "type": "DirectoryOrCreate"}}],
            },
        }))
        .expect("a Pod");
        self.pods.create(&PostParams::default(), &pod).await.expect("creating the holder pod");
        let started = wait_started(&self.pods, "holder", Duration::from_secs(90)).await;
        if !is_ready(&started) {
            let log = self.pods.logs("holder", &Default::default()).await.unwrap_or_else(|e| e.to_string());
            panic!("the holder pod did not run: {:?}\nits log:\n{log}", started.status);
        }
        let held = wait_until(&self.locks, "held", "the holder pod to hold", TIMEOUT, |l| {
            l.status.as_ref().is_some_and(|s| s.holders.iter().any(|h| h.holder.starts_with("pod/")))
        })
        .await;
        let acting = eventually("the holder pod to act", TIMEOUT, || async {
            if read_acted(&self.out).len() >= 3 { Ok(()) } else { Err("fewer than 3 steps".to_string()) }
        })
        .await;
        match (held, acting) {
            (Ok(lock), Ok(())) => lock.status.expect("a status").holders[0].request.clone(),
            (held, acting) => {
                let log = self.pods.logs("holder", &Default::default()).await.unwrap_or_else(|e| e.to_string());
                panic!("{:?} / {:?}\nthe holder pod's log:\n{log}", held.err(), acting.err());
            }
        }
    }

    /// A holder in the test that asks for `held` now and, once granted, acts a few steps and
    /// releases; waited for until it is queued. Its task returns when it was granted.
    async fn waiter(&self) -> tokio::task::JoinHandle<At> {
        let client = LockClient::new(self.env.client(Identity::Requester1).await, self.env.ns());
        let journal = self.journal.clone();
        let task = tokio::spawn(async move {
            let mut opts = AcquireOptions::new("held");
            opts.holder_identity = "test/next".into();
            opts.wait_timeout = Some(HOLDER_LEASE * 3);
            let guard = client.acquire(opts).await.unwrap_or_else(|e| panic!("the next holder: {e}"));
            let granted = checker::now();
            let request = guard.request_name().to_string();
            let token = guard.token();
            journal.report(Report::Granted {
                at: granted,
                who: "next".into(),
                lock: "held".into(),
                request: request.clone(),
                token,
            });
            let state = guard.state();
            let (mut first, mut last, mut steps) = (None, None, 0);
            for _ in 0..5 {
                let t = kubelock::client::BootInstant::now();
                let holding = matches!(&*state.borrow(), LockState::Holding { deadline, .. } if t < *deadline);
                if !holding {
                    break;
                }
                first.get_or_insert(t.since_boot());
                last = Some(t.since_boot());
                steps += 1;
                tokio::time::sleep(Duration::from_millis(20)).await; // the work done while holding
            }
            if let (Some(from), Some(to)) = (first, last) {
                journal.report(Report::Acted {
                    who: "next".into(),
                    lock: "held".into(),
                    request,
                    token,
                    permits: 1,
                    from,
                    to,
                    steps,
                });
            }
            guard.release().await.expect("releasing");
            granted
        });
        wait_until(&self.locks, "held", "the next holder to queue", TIMEOUT, |l| {
            l.status.as_ref().is_some_and(|s| s.waiting >= 1)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        task
    }

    /// After the kill at `killed`: waits for the next holder and for the pod's container to
    /// be gone (a force-deleted pod's container runs on a while), checks that the pod acted no
    /// later than that grant, reports the pod's acting for the checker, prints the time from
    /// the kill to the grant. Returns it, and whether the pod's `kubelock run` marked its
    /// request released (it stopped its command itself).
    async fn next_granted(
        &self,
        case: &str,
        request: &str,
        container: &str,
        killed: At,
        waiter: tokio::task::JoinHandle<At>,
    ) -> (Duration, bool) {
        let granted = tokio::time::timeout(HOLDER_LEASE * 3, waiter)
            .await
            .unwrap_or_else(|_| panic!("{case}: the next holder was not granted in {:?}", HOLDER_LEASE * 3))
            .expect("the next holder");
        let socket = self.env.node().containerd_socket.clone();
        eventually("the holder pod's container to stop", Duration::from_secs(60), || async {
            let out = tokio::process::Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .args(["-n", "k8s.io", "task", "ls"])
                .output()
                .await
                .map_err(|e| format!("ctr task ls: {e}"))?;
            let tasks = String::from_utf8_lossy(&out.stdout).into_owned();
            let running = tasks.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&container) && f.get(2).is_some_and(|s| *s != "STOPPED")
            });
            if out.status.success() && !running { Ok(()) } else { Err(tasks) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let released = self
            .journal
            .snapshot()
            .records
            .iter()
            .any(|r| matches!(&r.change, checker::Change::Request(v) if v.name == request && v.released));
        let acted = read_acted(&self.out);
        let (first, last) = (*acted.first().expect("acting steps"), *acted.last().expect("acting steps"));
        // /proc/uptime has a resolution of 10 ms: a step read as `last` happened before last + 10 ms.
        let last_possible = last + Duration::from_millis(10);
        let token: i64 = std::fs::read_to_string(self.out.join("token"))
            .ok()
            .and_then(|t| t.split_whitespace().next().and_then(|t| t.parse().ok()))
            .expect("the holder pod's token");
        self.journal.report(Report::Acted {
            who: "pod/holder".into(),
            lock: "held".into(),
            request: request.into(),
            token,
            permits: 1,
            from: first,
            to: last_possible,
            steps: acted.len() as u64,
        });
        let after = granted.saturating_sub(killed);
        eprintln!(
            "timing: {case}: next holder granted {:.2} s after the kill; the pod last acted {:.2} s after it (lease {} s, grace {} s); {}",
            seconds(after),
            last.as_secs_f64() - killed.as_secs_f64(),
            HOLDER_LEASE.as_secs(),
            HOLDER_GRACE.as_secs(),
            if released { "its kubelock run stopped the command and released" } else { "it did not release" }
        );
        assert!(
            last_possible < granted,
            "{case}: the pod acted at {:.2} s, the next holder was granted at {:.2} s: two holders at once",
            last_possible.as_secs_f64(),
            granted.as_secs_f64()
        );
        judge(&self.history, case).await;
        (after, released)
    }

    /// The holder pod's container ID in containerd.
    async fn container_id(&self) -> String {
        let pod = self.pods.get("holder").await.expect("the holder pod");
        let id = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.first().and_then(|c| c.container_id.clone()))
            .expect("a container ID");
        id.strip_prefix("containerd://").unwrap_or_else(|| panic!("not a containerd container: {id}")).to_string()
    }
}

/// The instants the holder pod acted at, as it wrote them.
fn read_acted(out: &Path) -> Vec<At> {
    std::fs::read_to_string(out.join("acted"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .collect()
}

/// Graceful delete: the kubelet sends SIGTERM (ignored), SIGKILL after the grace period, and
/// reports the container terminated: the controller frees the permits then, well before the
/// lease, and not before (the pod acted until the SIGKILL).
#[tokio::test]
async fn a_holder_pod_deleted_gracefully_is_released_once_its_containers_stopped() {
    let _shared = TURN.read().await;
    let case = HolderCase::start().await;
    let request = case.hold().await;
    let container = case.container_id().await;
    let waiter = case.waiter().await;
    let killed = checker::now();
    case.pods.delete("holder", &DeleteParams::default()).await.expect("deleting the holder pod");
    let (after, released) = case.next_granted("graceful delete", &request, &container, killed, waiter).await;
    assert!(!released, "the holder released by itself: its command ignores SIGTERM, it cannot have exited");
    assert!(after >= HOLDER_GRACE, "granted {after:?} after the delete, within the pod's grace period");
    assert!(after < HOLDER_LEASE, "granted {after:?} after the delete: by the lease, not by the pod stopping");
}

/// Force delete (grace 0): the pod object goes at once while its container still runs (the
/// kubelet stops it 2 s later), so nothing tells the controller when it stops: the grant
/// drains. Its `kubelock run`, still running, sees the loss, SIGKILLs its command and marks the
/// request released, which frees the permits then; had the garbage collector deleted the
/// request first (it is the pod's dependent), only the lease would.
#[tokio::test]
async fn a_holder_pod_force_deleted_drains_until_its_holder_stops() {
    let _shared = TURN.read().await;
    let case = HolderCase::start().await;
    let request = case.hold().await;
    let container = case.container_id().await;
    let waiter = case.waiter().await;
    // The lease runs from the holder's last renewal, read after this instant (so that the
    // bound below never exceeds the true one) and before the kill.
    let killed = checker::now();
    let requests: Api<LockRequest> = case.env.api(Identity::Admin).await;
    let renewed = requests.get(&request).await.expect("the holder's request");
    let renewed =
        renewed.spec.renew_time.or(renewed.status.and_then(|s| s.granted_at)).expect("a renewal or grant time");
    let since_renewal = (jiff::Timestamp::now() - renewed.0).get_milliseconds().max(0) as u64;
    let force = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    case.pods.delete("holder", &force).await.expect("force-deleting the holder pod");
    let (after, released) = case.next_granted("force delete", &request, &container, killed, waiter).await;
    if !released {
        let lease_left = HOLDER_LEASE.saturating_sub(Duration::from_millis(since_renewal));
        assert!(
            after >= lease_left,
            "granted {after:?} after a force delete, {since_renewal} ms after the last renewal: before the lease ({HOLDER_LEASE:?}) passed"
        );
    }
    assert!(after < HOLDER_LEASE + Duration::from_secs(10), "granted {after:?} after a force delete: late");
}

/// The container SIGKILLed in containerd (as the OOM killer or a crashed runtime shim would):
/// the kubelet reports it terminated, the pod Failed: released at once.
#[tokio::test]
async fn a_holder_pod_killed_in_containerd_is_released_at_once() {
    let _shared = TURN.read().await;
    let case = HolderCase::start().await;
    let request = case.hold().await;
    let id = case.container_id().await;
    let waiter = case.waiter().await;
    let socket = case.env.node().containerd_socket.clone();
    let killed = checker::now();
    let out = case
        .env
        .command("ctr-kill", "ctr")
        .arg("--address")
        .arg(&socket)
        .args(["-n", "k8s.io", "task", "kill", "-s", "KILL", &id])
        .output(TIMEOUT)
        .await;
    assert!(out.status.is_some_and(|s| s.success()), "ctr task kill: {}{}", out.stdout, out.stderr);
    let (after, released) = case.next_granted("containerd kill", &request, &id, killed, waiter).await;
    assert!(!released, "a SIGKILLed kubelock run released");
    let pod = case.pods.get("holder").await.expect("the holder pod");
    assert_eq!(phase(&pod), "Failed", "{:?}", pod.status);
    assert!(after < HOLDER_LEASE / 2, "granted {after:?} after the kill: by the lease, not by the pod stopping");
}

/// Resumes the kubelet when dropped, so that a failing test does not leave the node paused.
struct PausedKubelet<'a>(&'a TestEnv);

impl PausedKubelet<'_> {
    fn pause(env: &TestEnv) -> PausedKubelet<'_> {
        env.control_plane().pause(Component::Kubelet).unwrap_or_else(|e| panic!("pausing the kubelet: {e}"));
        PausedKubelet(env)
    }
}

impl Drop for PausedKubelet<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.control_plane().resume(Component::Kubelet) {
            eprintln!("resuming the kubelet: {e}");
        }
    }
}

/// The node lost: its kubelet stops reporting (SIGSTOP) and the holder pod's network is cut
/// (every TCP packet out of its network namespace dropped), so the pod's status still says
/// Running and its `kubelock run` can neither renew nor release. Nothing confirms that the
/// holder stopped: the permits are freed only once the lease passed, and by then the pod's
/// `kubelock run`, on its own clock, has stopped its command.
#[tokio::test]
async fn a_holder_pod_on_a_lost_node_is_released_after_its_lease() {
    let _alone = TURN.write().await; // the other holder tests need the kubelet's reports
    let case = HolderCase::start().await;
    let request = case.hold().await;
    let id = case.container_id().await;
    let waiter = case.waiter().await;
    let socket = case.env.node().containerd_socket.clone();
    let tasks = case
        .env
        .command("ctr-tasks", "ctr")
        .arg("--address")
        .arg(&socket)
        .args(["-n", "k8s.io", "task", "ls"])
        .output(TIMEOUT)
        .await;
    let pid = tasks
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&id.as_str()))
        .and_then(|f| f.get(1).map(|p| p.to_string()))
        .unwrap_or_else(|| panic!("the holder's task in ctr task ls:\n{}{}", tasks.stdout, tasks.stderr));
    let kubelet = PausedKubelet::pause(&case.env);
    let cut = case
        .env
        .command("cut-network", "nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["iptables", "-w", "-I", "OUTPUT", "-p", "tcp", "-j", "DROP"])
        .output(TIMEOUT)
        .await;
    let killed = checker::now();
    assert!(cut.status.is_some_and(|s| s.success()), "cutting the pod's network: {}{}", cut.stdout, cut.stderr);
    let pod = case.pods.get("holder").await.expect("the holder pod");
    assert_eq!(phase(&pod), "Running", "the kubelet is paused: nothing reports the pod stopped");
    let (after, released) = case.next_granted("node lost", &request, &id, killed, waiter).await;
    drop(kubelet);
    assert!(!released, "a holder cut off from the API server released");
    // The lease counts from the last renewal the controller saw: at most a third of it
    // (the renewal interval) before the cut.
    let floor = HOLDER_LEASE - HOLDER_LEASE / 3;
    assert!(
        after >= floor,
        "granted {after:?} after the node was lost: before its lease ({HOLDER_LEASE:?}) could pass"
    );
}
