//! Every example of `examples/*.yaml` applied as it is to the local node cluster, with a
//! controller running, and seen doing what its comments promise: judged from the pods' logs.
//!
//! What the tests change in the files, and nothing else:
//! - images: kubelock's own (`ghcr.io/kubelock/kubelock:*`, the sidecar) becomes `kubelock:dev`,
//!   every other (the fictional apps' images) `kubelock-test:dev` (busybox and kubelock), both
//!   with `imagePullPolicy: Never`;
//! - the app's program: the command after `kubelock run ... --` (the fictional `/app/...`,
//!   `/usr/local/bin/backup`) becomes a busybox script that logs `start <KUBELOCK_TOKEN> <time>`,
//!   sleeps a second and logs `end <KUBELOCK_TOKEN> <time>`; an app container (no kubelock in
//!   it) becomes a busybox script too: beside the sidecar, a busybox `httpd` answering
//!   `/hostname` (its pod's name) that logs `start`/`end` of each token it finds in the sidecar's
//!   token file and `stopped <time>` on its way out, a second after SIGTERM; else an idle loop;
//! - `batch/v1` CronJob becomes `batch/v1beta1` (all that the 1.20 API server serves).
//!
//! `<time>` is `/proc/uptime` (for people); intervals are judged on the timestamps the kubelet's
//! log API puts on each line (the same machine's clock for every pod). The CronJob's run is a
//! Job made from its `jobTemplate` as `kubectl create job --from=cronjob/...` makes it, rather
//! than a wait of up to 15 minutes for the schedule (a scheduled run meanwhile takes the same
//! lock, and is judged with it). The examples bind the ClusterRole `kubelock-requester`, which
//! the chart installs: the tests create it with the chart's rules.
//!
//! Timings are printed (`--nocapture`): apply to the first grant, to the workload's end, a
//! rollout's duration, a handover on pod deletion.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{AsyncBufReadExt as _, StreamExt as _};
use jiff::Timestamp;
use k8s_openapi::api::{
    apps::v1::Deployment,
    batch::v1::Job,
    core::v1::{Endpoints, Pod, Service, ServiceAccount},
    rbac::v1::ClusterRole,
};
use kube::{
    Api, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, LogParams, Patch, PatchParams, PostParams},
    discovery::{Scope, pinned_kind},
};
use kubelock::{
    api::{BREAK_ANNOTATION, BROKEN_BY_ANNOTATION, Lock, LockRequest},
    devenv::{IMAGE, TEST_IMAGE},
};
use serde_json::{Value, json};

use crate::support::{
    Identity, TIMEOUT, TestEnv, eventually,
    fixtures::Fixture,
    node::{is_ready, phase, pod, repo, wait_started},
    rule, wait_until,
};

/// How long an example's workload may take on the node (pods start in 1-3 s each; 12 of the
/// semaphore's queue through 3 permits).
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(240);

/// The label the active/passive example's sidecar sets while holding.
const ACTIVE_LABEL: &str = "kubelock.dev/active";

/// The child of `kubelock run`: logs its token's interval.
const CHILD_SCRIPT: &str = r#"now() { read up _ < /proc/uptime; echo "$up"; }
echo "start $KUBELOCK_TOKEN $(now)"
sleep 1
echo "end $KUBELOCK_TOKEN $(now)""#;

/// An app container beside the sidecar: serves `/hostname` (the pod's name) on port 8000 and
/// logs each token it sees in the sidecar's token file; on SIGTERM it takes a second to stop.
const SIDECAR_APP_SCRIPT: &str = r#"now() { read up _ < /proc/uptime; echo "$up"; }
httpd -p 8000 -h /etc
tok=
stop() { sleep 1; [ -n "$tok" ] && echo "end $tok $(now)"; echo "stopped $(now)"; exit 0; }
trap stop TERM
while true; do
  t=$(cat /var/run/kubelock/token 2>/dev/null)
  if [ "$t" != "$tok" ]; then
    [ -n "$tok" ] && echo "end $tok $(now)"
    [ -n "$t" ] && echo "start $t $(now)"
    tok=$t
  fi
  sleep 0.2 & wait $!
done"#;

/// Any other app container: idles until told to stop.
const IDLE_SCRIPT: &str = "trap 'exit 0' TERM; while true; do sleep 1 & wait $!; done";

// ---------------------------------------------------------------------------------------
// The examples.

/// examples/mutex.yaml: the Deployment's replicas run their migration (the init container)
/// one at a time, each under its own token, and all become Ready.
#[tokio::test]
async fn mutex_gates_the_replicas_migrations_one_at_a_time() {
    let f = examples_fixture().await;
    let applied = Instant::now();
    apply_example(&f, "mutex.yaml").await;
    first_grant(&f, "schema-migration", applied).await;
    let deployments: Api<Deployment> = f.env.api(Identity::Admin).await;
    wait_until(&deployments, "web", "3 replicas Ready", EXAMPLE_TIMEOUT, |d| {
        d.status.as_ref().and_then(|s| s.ready_replicas) == Some(3)
    })
    .await
    .unwrap_or_else(|e| fail(&f, e));
    eprintln!("timing: mutex.yaml applied -> 3 replicas Ready in {:.1} s", applied.elapsed().as_secs_f64());

    let migrations = intervals_of(&f, "app=web", "migrate").await;
    let pods: BTreeSet<&str> = migrations.iter().map(|i| i.pod.as_str()).collect();
    assert_eq!(pods.len(), 3, "one migration per replica at least: {migrations:#?}");
    assert_exclusive(&migrations);
    assert_tokens_increase(&migrations);
}

/// examples/job.yaml: the backup runs under the lock (its token is the Lock's only grant) and
/// the Job completes.
#[tokio::test]
async fn job_completes_under_the_lock() {
    let f = examples_fixture().await;
    let applied = Instant::now();
    apply_example(&f, "job.yaml").await;
    first_grant(&f, "db-backup", applied).await;
    wait_job(&f, "db-backup", 1).await;
    eprintln!("timing: job.yaml applied -> Job complete in {:.1} s", applied.elapsed().as_secs_f64());
    let runs = intervals_of(&f, "job-name=db-backup", "backup").await;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    let lock = f.locks.get("db-backup").await.expect("the Lock");
    assert_eq!(runs[0].token, lock.status.expect("a status").fencing_token, "the run's token is the Lock's grant");
}

/// examples/cronjob.yaml: a run of the CronJob (a Job from its jobTemplate, as `kubectl create
/// job --from` makes it) completes under the lock.
#[tokio::test]
async fn cronjob_run_completes_under_the_lock() {
    let f = examples_fixture().await;
    let applied = Instant::now();
    apply_example(&f, "cronjob.yaml").await;
    let client = f.env.admin().await;
    let (ar, _) = pinned_kind(&client, &GroupVersionKind::gvk("batch", "v1beta1", "CronJob")).await.expect("CronJob");
    let cronjobs: Api<DynamicObject> = Api::namespaced_with(client, f.env.ns(), &ar);
    let cronjob = cronjobs.get("ledger-reconcile").await.expect("the CronJob");
    let template = cronjob.data["spec"]["jobTemplate"].clone();
    let job: Job = serde_json::from_value(json!({
        "metadata": {
            "name": "ledger-reconcile-manual",
            "annotations": {"cronjob.kubernetes.io/instantiate": "manual"},
            "labels": template["metadata"]["labels"],
            "ownerReferences": [{
                "apiVersion": "batch/v1beta1", "kind": "CronJob", "name": "ledger-reconcile",
                "uid": cronjob.uid().expect("a UID"), "controller": true,
            }],
        },
        "spec": template["spec"],
    }))
    .expect("a Job from the jobTemplate");
    let jobs: Api<Job> = f.env.api(Identity::Admin).await;
    jobs.create(&PostParams::default(), &job).await.expect("creating the Job from the CronJob");
    first_grant(&f, "ledger-reconcile", applied).await;
    wait_job(&f, "ledger-reconcile-manual", 1).await;
    eprintln!("timing: cronjob.yaml applied -> its run complete in {:.1} s", applied.elapsed().as_secs_f64());
    let runs = intervals_of(&f, "job-name=ledger-reconcile-manual", "reconcile").await;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    let issued = f.locks.get("ledger-reconcile").await.expect("the Lock").status.expect("a status").fencing_token;
    assert!(runs[0].token > 0 && runs[0].token <= issued, "token {} not issued by the Lock ({issued})", runs[0].token);
    // Any scheduled run of the CronJob meanwhile took the same lock: never at the same time.
    let all = intervals_in(&f, &pods_of(&f, "").await, "reconcile").await;
    assert_exclusive(&all);
}

/// examples/semaphore.yaml: 12 report builders, never more than 3 inside at once.
#[tokio::test]
async fn semaphore_never_has_more_than_its_permits_inside() {
    let f = examples_fixture().await;
    let applied = Instant::now();
    apply_example(&f, "semaphore.yaml").await;
    first_grant(&f, "reporting-db", applied).await;
    wait_job(&f, "monthly-reports", 12).await;
    eprintln!("timing: semaphore.yaml applied -> 12 reports built in {:.1} s", applied.elapsed().as_secs_f64());
    let builds = intervals_of(&f, "job-name=monthly-reports", "build").await;
    assert!(builds.len() >= 12, "12 builds logged: {builds:#?}");
    let most = max_inside(&builds);
    eprintln!("timing: semaphore: at most {most} of {} builds inside at once", builds.len());
    assert!(most <= 3, "{most} builders inside a semaphore of 3: {builds:#?}");
    assert_tokens_distinct(&builds);
}

/// examples/rwlock.yaml: the readers share the lock, the writer (all permits) never runs
/// beside a reader.
#[tokio::test]
async fn rwlock_never_mixes_the_writer_with_readers() {
    let f = examples_fixture().await;
    let applied = Instant::now();
    apply_example(&f, "rwlock.yaml").await;
    first_grant(&f, "catalog", applied).await;
    wait_job(&f, "catalog-export", 4).await;
    wait_job(&f, "catalog-reindex", 1).await;
    eprintln!("timing: rwlock.yaml applied -> readers and writer done in {:.1} s", applied.elapsed().as_secs_f64());
    let readers = intervals_of(&f, "job-name=catalog-export", "export").await;
    let writers = intervals_of(&f, "job-name=catalog-reindex", "reindex").await;
    assert!(readers.len() >= 4, "{readers:#?}");
    assert_eq!(writers.len(), 1, "{writers:#?}");
    for w in &writers {
        for r in &readers {
            assert!(!overlaps(w, r), "the writer ran beside a reader:\n{w:?}\n{r:?}");
        }
    }
    eprintln!("timing: rwlock: up to {} readers at once", max_inside(&readers));
    assert_tokens_distinct(&readers.iter().chain(&writers).cloned().collect::<Vec<_>>());
}

/// examples/active-passive.yaml: both replicas Ready, exactly one labelled active and holding,
/// the Service reaches it alone; a rollout completes and leaves one active pod of the new
/// template, which the Service reaches.
#[tokio::test]
async fn active_passive_serves_from_the_holder_and_rolls_out() {
    let f = examples_fixture().await;
    let applied = Instant::now();
    apply_example(&f, "active-passive.yaml").await;
    first_grant(&f, "invoicer-active", applied).await;
    let deployments: Api<Deployment> = f.env.api(Identity::Admin).await;
    wait_until(&deployments, "invoicer", "the Deployment Available, 2 Ready", EXAMPLE_TIMEOUT, |d| {
        available(d) && d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2)
    })
    .await
    .unwrap_or_else(|e| fail(&f, e));
    eprintln!(
        "timing: active-passive.yaml applied -> Available, both Ready in {:.1} s",
        applied.elapsed().as_secs_f64()
    );
    let active = one_active_pod(&f).await;
    let served = fetch_through_service(&f, "invoicer", &active, "before").await;
    eprintln!("active pod {active} answered {served} requests through the Service");

    // A rollout: a new template; maxUnavailable 0 waits for new pods to be Ready (standbys).
    let generation = deployments.get("invoicer").await.expect("the Deployment").metadata.generation.unwrap_or(0);
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"e2e.kubelock.dev/rollout": "1"}}}}});
    let started = Instant::now();
    deployments.patch("invoicer", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("a new template");
    wait_until(&deployments, "invoicer", "the rollout to complete", EXAMPLE_TIMEOUT, |d| {
        let s = d.status.clone().unwrap_or_default();
        s.observed_generation.unwrap_or(0) > generation
            && s.updated_replicas == Some(2)
            && s.replicas == Some(2)
            && s.ready_replicas == Some(2)
            && s.available_replicas == Some(2)
            && available(d)
    })
    .await
    .unwrap_or_else(|e| fail(&f, e));
    eprintln!("timing: active/passive rollout complete in {:.1} s", started.elapsed().as_secs_f64());
    let pods: Api<Pod> = f.env.api(Identity::Admin).await;
    eventually("the old pods to be gone", EXAMPLE_TIMEOUT, || async {
        let list = pods.list(&ListParams::default().labels("app=invoicer")).await.map_err(|e| e.to_string())?;
        let old: Vec<String> = list
            .items
            .iter()
            .filter(|p| !p.annotations().contains_key("e2e.kubelock.dev/rollout"))
            .map(|p| p.name_any())
            .collect();
        if old.is_empty() { Ok(()) } else { Err(format!("old pods left: {old:?}")) }
    })
    .await
    .unwrap_or_else(|e| fail(&f, e));
    let after = one_active_pod(&f).await;
    let pod = pods.get(&after).await.expect("the active pod");
    assert!(
        pod.annotations().contains_key("e2e.kubelock.dev/rollout"),
        "the active pod {after} is of the old template"
    );
    eprintln!("timing: rollout -> one active pod of the new template in {:.1} s", started.elapsed().as_secs_f64());
    fetch_through_service(&f, "invoicer", &after, "after the rollout").await;
}

/// The sidecar in a real pod (examples/active-passive.yaml): its label follows the grant (a
/// broken grant loses it, the next holder gets it, never two at once), both pods stay Ready
/// standing by; and on the holder pod's deletion the sidecar releases only once its app has
/// stopped: the next grant comes after the old app's last log line.
#[tokio::test]
async fn sidecar_label_follows_the_grant_and_hands_over_after_the_app_stopped() {
    let f = examples_fixture().await;
    apply_example(&f, "active-passive.yaml").await;
    let deployments: Api<Deployment> = f.env.api(Identity::Admin).await;
    wait_until(&deployments, "invoicer", "the Deployment Available, 2 Ready", EXAMPLE_TIMEOUT, |d| {
        available(d) && d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2)
    })
    .await
    .unwrap_or_else(|e| fail(&f, e));
    let first = one_active_pod(&f).await;
    let pods: Api<Pod> = f.env.api(Identity::Admin).await;
    let standby = pods
        .list(&ListParams::default().labels("app=invoicer"))
        .await
        .expect("listing pods")
        .items
        .into_iter()
        .find(|p| p.name_any() != first)
        .expect("a standby pod");
    assert!(is_ready(&standby), "the standby is Ready: {:?}", standby.status);
    assert!(!standby.labels().contains_key(ACTIVE_LABEL), "the standby is not labelled");

    // Record how many pods carry the label at once, from every pod event.
    let most = Arc::new(AtomicUsize::new(0));
    let watching = tokio::spawn(most_labelled(pods.clone(), Arc::clone(&most)));

    // Break the grant: the holder's sidecar withdraws its files and its label; the standby is
    // granted once the broken grant drained (lease 15s) and the lock delay (5s) passed.
    let holder = holder_request(&f).await;
    let requests: Api<LockRequest> = f.env.api(Identity::Admin).await;
    let mark = json!({"metadata": {"annotations": {BREAK_ANNOTATION: "e2e: label follows the grant", BROKEN_BY_ANNOTATION: "e2e"}}});
    let broken = Instant::now();
    requests.patch(&holder, &PatchParams::default(), &Patch::Merge(&mark)).await.expect("breaking the grant");
    wait_until(&pods, &first, "the label to go with the grant", TIMEOUT, |p| !p.labels().contains_key(ACTIVE_LABEL))
        .await
        .unwrap_or_else(|e| fail(&f, e));
    eprintln!("timing: grant broken -> label removed from {first} in {:.2} s", broken.elapsed().as_secs_f64());
    let second = standby.name_any();
    wait_until(&pods, &second, "the next holder labelled", EXAMPLE_TIMEOUT, |p| {
        p.labels().get(ACTIVE_LABEL).is_some_and(|v| v == "true")
    })
    .await
    .unwrap_or_else(|e| fail(&f, e));
    eprintln!("timing: grant broken -> next holder {second} labelled in {:.1} s", broken.elapsed().as_secs_f64());
    assert_eq!(one_active_pod(&f).await, second);
    wait_until(&pods, &first, "the old holder Ready as a standby", TIMEOUT, is_ready)
        .await
        .unwrap_or_else(|e| fail(&f, e));

    // Delete the holder's pod: follow its app's log to its end, then compare with the grant.
    let follow = LogParams { container: Some("invoicer".into()), follow: true, timestamps: true, ..Default::default() };
    let mut stream = pods.log_stream(&second, &follow).await.expect("following the app's log").lines();
    let app_log = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(Ok(line)) = stream.next().await {
            lines.push(line);
        }
        lines
    });
    let holder_before = holder_request(&f).await;
    let deleted = Instant::now();
    pods.delete(&second, &Default::default()).await.expect("deleting the holder's pod");
    let lock = wait_until(&f.locks, "invoicer-active", "the next grant", EXAMPLE_TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| s.holders.iter().any(|h| h.request != holder_before))
    })
    .await
    .unwrap_or_else(|e| fail(&f, e));
    let handover = deleted.elapsed();
    let next =
        lock.status.expect("a status").holders.into_iter().find(|h| h.request != holder_before).expect("the next");
    let lines = tokio::time::timeout(EXAMPLE_TIMEOUT, app_log).await.expect("the app's log to end").expect("log task");
    let last = lines.iter().rev().find_map(|l| stamp_of(l)).unwrap_or_else(|| panic!("no app log lines: {lines:?}"));
    assert!(lines.last().is_some_and(|l| l.contains(" stopped ")), "the app's log ends with its stop: {lines:?}");
    eprintln!(
        "timing: holder pod deleted -> next grant ({}) in {:.1} s; app's last line {last}, grant {}",
        next.holder,
        handover.as_secs_f64(),
        next.granted_at.0
    );
    assert!(
        next.granted_at.0 > last,
        "granted at {} before the old app's last line at {last}: {lines:?}",
        next.granted_at.0
    );
    watching.abort();
    let most = most.load(Ordering::SeqCst);
    assert_eq!(most, 1, "pods labelled active at once: at most {most}");
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// A node namespace with the controller, the images imported and the chart's requester role.
async fn examples_fixture() -> Fixture {
    let env = TestEnv::with_node().await;
    env.import_images().await;
    requester_cluster_role(&env).await;
    let mut f = Fixture::on(env).await;
    f.start_controller(&[]);
    f
}

/// The ClusterRole `kubelock-requester` the examples bind, with the rules the chart gives it.
async fn requester_cluster_role(env: &TestEnv) {
    let roles: Api<ClusterRole> = Api::all(env.admin().await);
    let role: ClusterRole = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "kubelock-requester"},
        "rules": [
            rule(&["kubelock.dev"], &["lockrequests"], &["create", "get", "list", "watch", "patch", "delete"]),
            rule(&["kubelock.dev"], &["locks"], &["get", "list", "watch"]),
        ],
    }))
    .expect("a ClusterRole");
    let pp = PatchParams::apply("kubelock-e2e-examples").force();
    roles.patch("kubelock-requester", &pp, &Patch::Apply(&role)).await.expect("the kubelock-requester ClusterRole");
}

/// Applies `examples/<file>` (with the substitutions of the module's doc) in the test's
/// namespace, in order; waits for each ServiceAccount's token before what follows it.
async fn apply_example(f: &Fixture, file: &str) {
    let text = std::fs::read_to_string(repo().join("examples").join(file)).expect("the example");
    let client = f.env.admin().await;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("YAML");
        if value.is_null() {
            continue;
        }
        let mut obj = serde_json::to_value(value).expect("JSON");
        substitute(&mut obj);
        let what = format!("{file}: {} {}", obj["kind"], obj["metadata"]["name"]);
        let mut gvk = gvk_of(&obj);
        let (ar, caps): (ApiResource, _) = match pinned_kind(&client, &gvk).await {
            Ok(found) => found,
            Err(_) if (gvk.group.as_str(), gvk.version.as_str(), gvk.kind.as_str()) == ("batch", "v1", "CronJob") => {
                gvk = GroupVersionKind::gvk("batch", "v1beta1", "CronJob");
                obj["apiVersion"] = json!("batch/v1beta1");
                pinned_kind(&client, &gvk).await.unwrap_or_else(|e| panic!("{what}: no CronJob API: {e}"))
            }
            Err(e) => panic!("{what}: {e}"),
        };
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(client.clone(), f.env.ns(), &ar),
            Scope::Cluster => Api::all_with(client.clone(), &ar),
        };
        let dynamic: DynamicObject = serde_json::from_value(obj).expect("an object");
        api.create(&PostParams::default(), &dynamic).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        if gvk.kind == "ServiceAccount" {
            let accounts: Api<ServiceAccount> = f.env.api(Identity::Admin).await;
            let name = dynamic.name_any();
            wait_until(&accounts, &name, "the ServiceAccount's token", TIMEOUT, |sa| {
                sa.secrets.as_ref().is_some_and(|s| !s.is_empty())
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}

fn gvk_of(obj: &Value) -> GroupVersionKind {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, obj["kind"].as_str().expect("kind"))
}

/// The substitutions of the module's doc, on every pod template of `obj`.
fn substitute(obj: &mut Value) {
    let spec = match obj["kind"].as_str() {
        Some("Deployment" | "Job") => &mut obj["spec"]["template"]["spec"],
        Some("CronJob") => &mut obj["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => return,
    };
    let has_sidecar = spec["containers"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["args"].get(0).and_then(Value::as_str) == Some("sidecar")));
    for list in ["initContainers", "containers"] {
        for container in spec[list].as_array_mut().into_iter().flatten() {
            substitute_container(container, has_sidecar);
        }
    }
}

fn substitute_container(c: &mut Value, beside_sidecar: bool) {
    let image = c["image"].as_str().unwrap_or_default().to_string();
    c["imagePullPolicy"] = json!("Never");
    if image.contains("kubelock/kubelock:") {
        c["image"] = json!(IMAGE);
        return;
    }
    c["image"] = json!(TEST_IMAGE);
    let command: Vec<String> = c["command"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    if command.first().map(String::as_str) == Some("kubelock") && command.get(1).map(String::as_str) == Some("run") {
        let dashes = command.iter().position(|a| a == "--").expect("kubelock run ... -- CMD");
        let mut wrapped: Vec<String> = command[..=dashes].to_vec();
        wrapped.extend(["sh".into(), "-c".into(), CHILD_SCRIPT.into()]);
        c["command"] = json!(wrapped);
    } else {
        let script = if beside_sidecar { SIDECAR_APP_SCRIPT } else { IDLE_SCRIPT };
        c["command"] = json!(["sh", "-c", script]);
        if let Some(map) = c.as_object_mut() {
            map.remove("args");
        }
    }
}

/// Waits for the Lock's first grant; prints the time since `applied`.
async fn first_grant(f: &Fixture, lock: &str, applied: Instant) {
    wait_until(&f.locks, lock, "the first grant", EXAMPLE_TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| s.fencing_token > 0)
    })
    .await
    .unwrap_or_else(|e| fail(f, e));
    eprintln!("timing: {lock}: applied -> first grant in {:.1} s", applied.elapsed().as_secs_f64());
}

/// Waits until the Job has `succeeded` pods; fails at once on a failed one.
async fn wait_job(f: &Fixture, name: &str, succeeded: i32) {
    let jobs: Api<Job> = f.env.api(Identity::Admin).await;
    let job = wait_until(&jobs, name, "the Job to complete", EXAMPLE_TIMEOUT, |j| {
        let s = j.status.clone().unwrap_or_default();
        s.succeeded.unwrap_or(0) >= succeeded || s.failed.unwrap_or(0) > 0
    })
    .await
    .unwrap_or_else(|e| fail(f, e));
    let status = job.status.unwrap_or_default();
    if status.failed.unwrap_or(0) > 0 {
        f.env.dump();
        panic!("Job {name}: a pod failed: {status:?}");
    }
}

fn fail(f: &Fixture, e: impl std::fmt::Display) -> ! {
    f.env.dump();
    panic!("{e}")
}

fn available(d: &Deployment) -> bool {
    d.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Available" && c.status == "True"))
}

/// The pods of the namespace with `labels` (a selector; empty: all).
async fn pods_of(f: &Fixture, labels: &str) -> Vec<Pod> {
    let pods: Api<Pod> = f.env.api(Identity::Admin).await;
    pods.list(&ListParams::default().labels(labels)).await.expect("listing pods").items
}

/// A stretch of a pod's log from `start <token>` to `end <token>`.
#[derive(Debug, Clone)]
struct Interval {
    pod: String,
    token: i64,
    start: Timestamp,
    end: Option<Timestamp>,
}

/// The intervals logged by `container` of the pods with `labels`; every one must have ended.
async fn intervals_of(f: &Fixture, labels: &str, container: &str) -> Vec<Interval> {
    intervals_in(f, &pods_of(f, labels).await, container).await
}

async fn intervals_in(f: &Fixture, pods: &[Pod], container: &str) -> Vec<Interval> {
    let api: Api<Pod> = f.env.api(Identity::Admin).await;
    let mut all = Vec::new();
    for p in pods {
        let name = p.name_any();
        let in_pod = |c: &k8s_openapi::api::core::v1::Container| c.name == container;
        let spec = p.spec.as_ref().expect("a pod spec");
        if !spec.containers.iter().any(in_pod) && !spec.init_containers.iter().flatten().any(in_pod) {
            continue;
        }
        let lp = LogParams { container: Some(container.into()), timestamps: true, ..Default::default() };
        let log = api.logs(&name, &lp).await.unwrap_or_else(|e| fail(f, format!("logs of {name}/{container}: {e}")));
        let found = parse_intervals(&name, &log);
        if let Some(open) = found.iter().find(|i| i.end.is_none()) {
            fail(f, format!("{name}/{container}: an interval never ended: {open:?}\n{log}"));
        }
        all.extend(found);
    }
    all
}

/// The timestamp the log API put before a line.
fn stamp_of(line: &str) -> Option<Timestamp> {
    line.split_once(' ').and_then(|(ts, _)| ts.parse().ok())
}

fn parse_intervals(pod: &str, log: &str) -> Vec<Interval> {
    let mut found: Vec<Interval> = Vec::new();
    for line in log.lines() {
        let (Some(at), Some((_, rest))) = (stamp_of(line), line.split_once(' ')) else { continue };
        let mut words = rest.split_whitespace();
        let (what, token) = (words.next(), words.next().and_then(|t| t.parse::<i64>().ok()));
        match (what, token) {
            (Some("start"), Some(token)) => found.push(Interval { pod: pod.into(), token, start: at, end: None }),
            (Some("end"), Some(token)) => {
                if let Some(open) = found.iter_mut().rev().find(|i| i.token == token && i.end.is_none()) {
                    open.end = Some(at);
                }
            }
            _ => {}
        }
    }
    found
}

fn overlaps(a: &Interval, b: &Interval) -> bool {
    let (ae, be) = (a.end.expect("ended"), b.end.expect("ended"));
    a.start < be && b.start < ae
}

/// The most intervals open at one time.
fn max_inside(intervals: &[Interval]) -> usize {
    let mut events: Vec<(Timestamp, i32)> = Vec::new();
    for i in intervals {
        events.push((i.start, 1));
        events.push((i.end.expect("ended"), -1));
    }
    events.sort(); // at the same instant an end (-1) sorts before a start
    let (mut inside, mut most) = (0i32, 0i32);
    for (_, d) in events {
        inside += d;
        most = most.max(inside);
    }
    most as usize
}

fn assert_exclusive(intervals: &[Interval]) {
    assert!(!intervals.is_empty(), "no intervals logged");
    let most = max_inside(intervals);
    assert_eq!(most, 1, "{most} holders of a mutex at once: {intervals:#?}");
}

/// In the order they started, each holder's token is higher than the one before.
fn assert_tokens_increase(intervals: &[Interval]) {
    let mut sorted = intervals.to_vec();
    sorted.sort_by_key(|i| i.start);
    for pair in sorted.windows(2) {
        assert!(pair[0].token < pair[1].token, "tokens out of order: {:?} then {:?}", pair[0], pair[1]);
    }
}

fn assert_tokens_distinct(intervals: &[Interval]) {
    let tokens: BTreeSet<i64> = intervals.iter().map(|i| i.token).collect();
    assert_eq!(tokens.len(), intervals.len(), "a token given twice: {intervals:#?}");
}

/// The one pod labelled active, which is the Lock's holder (waits for it: the label follows
/// the grant).
async fn one_active_pod(f: &Fixture) -> String {
    let pods: Api<Pod> = f.env.api(Identity::Admin).await;
    let ns = f.env.ns().to_string();
    let locks = f.locks.clone();
    eventually("exactly one pod labelled active, the Lock's holder", EXAMPLE_TIMEOUT, || {
        let (pods, locks, ns) = (pods.clone(), locks.clone(), ns.clone());
        async move {
            let list = pods.list(&ListParams::default().labels(&format!("{ACTIVE_LABEL}=true"))).await;
            let active: Vec<String> = list.map_err(|e| e.to_string())?.items.iter().map(|p| p.name_any()).collect();
            let lock = locks.get("invoicer-active").await.map_err(|e| e.to_string())?;
            let holders: Vec<String> = lock.status.unwrap_or_default().holders.into_iter().map(|h| h.holder).collect();
            match active.as_slice() {
                [one] if holders == [format!("pod/{ns}/{one}")] => Ok(one.clone()),
                _ => Err(format!("labelled active: {active:?}; holders: {holders:?}")),
            }
        }
    })
    .await
    .unwrap_or_else(|e| fail(f, e))
}

/// The request of the Lock's one holder.
async fn holder_request(f: &Fixture) -> String {
    let lock: Lock = f.locks.get("invoicer-active").await.expect("the Lock");
    let holders = lock.status.unwrap_or_default().holders;
    assert_eq!(holders.len(), 1, "one holder: {holders:?}");
    holders[0].request.clone()
}

/// Fetches `/hostname` through the Service's ClusterIP from a pod, once its Endpoints list
/// `active` alone, until 5 answers came; asserts every answer is `active`'s name.
async fn fetch_through_service(f: &Fixture, service: &str, active: &str, when: &str) -> usize {
    let endpoints: Api<Endpoints> = f.env.api(Identity::Admin).await;
    let pods: Api<Pod> = f.env.api(Identity::Admin).await;
    let ip = pods.get(active).await.expect("the active pod").status.and_then(|s| s.pod_ip).expect("a pod IP");
    wait_until(&endpoints, service, "the Service's endpoints: the active pod alone", EXAMPLE_TIMEOUT, |e| {
        let ready: Vec<&str> =
            e.subsets.iter().flatten().flat_map(|s| s.addresses.iter().flatten()).map(|a| a.ip.as_str()).collect();
        ready == [ip.as_str()]
            && e.subsets.iter().flatten().all(|s| s.not_ready_addresses.as_ref().is_none_or(|n| n.is_empty()))
    })
    .await
    .unwrap_or_else(|e| fail(f, e));
    let services: Api<Service> = f.env.api(Identity::Admin).await;
    let cluster_ip =
        services.get(service).await.expect("the Service").spec.and_then(|s| s.cluster_ip).expect("a ClusterIP");
    // HTTP by hand through nc: the static busybox's wget crashes (SIGSEGV) in an image
    // without a libc, where glibc's name service lookups have nothing to load.
    let script = format!(
        "ok=0; n=0; while [ $ok -lt 5 ] && [ $n -lt 60 ]; do n=$((n+1)); \
         resp=$(printf 'GET /hostname HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {cluster_ip} 80); \
         case \"$resp\" in \"HTTP/1.\"?\" 200\"*) echo \"served $(echo \"$resp\" | tail -n 1)\"; ok=$((ok+1));; \
         *) sleep 0.5;; esac; done"
    );
    let name = format!("fetch-{}", when.replace(' ', "-"));
    pods.create(&PostParams::default(), &pod(&name, TEST_IMAGE, &["sh", "-c", &script])).await.expect("the fetch pod");
    let done = wait_started(&pods, &name, EXAMPLE_TIMEOUT).await;
    let done = if matches!(phase(&done), "Succeeded" | "Failed") {
        done
    } else {
        wait_until(&pods, &name, "the fetch pod to finish", EXAMPLE_TIMEOUT, |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await
        .unwrap_or_else(|e| fail(f, e))
    };
    let log = pods.logs(&name, &LogParams::default()).await.expect("the fetch pod's log");
    let answers: Vec<&str> = log.lines().filter_map(|l| l.strip_prefix("served ")).map(str::trim).collect();
    assert_eq!(phase(&done), "Succeeded", "{log}");
    assert!(answers.len() >= 5, "{when}: too few answers through {cluster_ip}:\n{log}");
    assert!(answers.iter().all(|a| *a == active), "{when}: answers from others than {active}: {answers:?}");
    answers.len()
}

/// Keeps in `most` the most pods labelled active at once, from a watch of every pod event
/// (runs until aborted).
async fn most_labelled(pods: Api<Pod>, most: Arc<AtomicUsize>) {
    use kube::runtime::{WatchStreamExt as _, watcher};
    let mut labelled = BTreeSet::new();
    let events = watcher(pods, watcher::Config::default()).default_backoff();
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                if p.labels().get(ACTIVE_LABEL).is_some_and(|v| v == "true") {
                    labelled.insert(p.name_any());
                } else {
                    labelled.remove(&p.name_any());
                }
            }
            Ok(watcher::Event::Delete(p)) => {
                labelled.remove(&p.name_any());
            }
            _ => {}
        }
        most.fetch_max(labelled.len(), Ordering::SeqCst);
    }
}
