//! Smoke tests that prove the harness is real: CRDs from the binary apply to a real API
//! server, objects are seen through watches, RBAC is enforced, the servers can be killed
//! and restarted, and nothing outlives a killed parent.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, ResourceExt as _,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use kubelock::api::Lock;
use serde::Deserialize as _;

use crate::support::{
    Cmd, Identity, ProcessId, ServerFaults as _, TIMEOUT, TestEnv, eventually, fixtures::lock, process::KUBELOCK, rule,
    wait_until,
};

fn api_error(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error status, got {other}"),
    }
}

/// `crds/kubelock.dev.yaml` is what the types generate.
#[test]
fn crd_file_matches_the_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/kubelock.dev.yaml");
    let file = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let generated = kubelock::api::crds_yaml();
    if file != generated {
        let line = file
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| file.lines().count().min(generated.lines().count()));
        panic!(
            "{} is out of date with the API types (first difference at line {}: file has {:?}, types give {:?}): \
             run `make crds`",
            path.display(),
            line + 1,
            file.lines().nth(line).unwrap_or("<end>"),
            generated.lines().nth(line).unwrap_or("<end>"),
        );
    }
}

/// The CRDs printed by `kubelock crd` apply; a Lock created afterwards arrives as a watch event.
#[tokio::test]
async fn crds_from_the_binary_apply_and_a_lock_is_seen_through_a_watch() {
    let env = TestEnv::new().await;
    let out = Cmd::kubelock("crd", env.log_dir()).arg("crd").output(TIMEOUT).await.success("kubelock crd");
    let crds: Vec<CustomResourceDefinition> = serde_yaml::Deserializer::from_str(&out.stdout)
        .map(|doc| CustomResourceDefinition::deserialize(doc).expect("kubelock crd prints CRDs"))
        .collect();
    let names: Vec<String> = crds.iter().map(|c| c.name_any()).collect();
    assert_eq!(names, ["locks.kubelock.dev", "lockrequests.kubelock.dev"]);
    let admin = env.admin().await;
    kubelock::devenv::apply_crds(&admin, &crds, "kubelock-e2e-smoke", TIMEOUT).await.expect("applying the CRDs");

    // Start watching and wait until the initial (empty) list is done: whatever comes
    // next is a watch event, not part of a list.
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    let mut events = watcher(locks.clone(), watcher::Config::default()).boxed();
    let mut next = async || {
        tokio::time::timeout(TIMEOUT, events.try_next())
            .await
            .expect("a watch event in time")
            .expect("watch")
            .expect("open")
    };
    loop {
        match next().await {
            watcher::Event::InitDone => break,
            watcher::Event::InitApply(obj) => panic!("fresh namespace, yet listed {}", obj.name_any()),
            _ => {}
        }
    }

    let created = locks.create(&PostParams::default(), &lock("smoke", 2)).await.expect("creating a Lock");
    match next().await {
        watcher::Event::Apply(seen) => {
            assert_eq!(seen.uid(), created.uid());
            assert_eq!(seen.spec.permits, 2);
            assert_eq!(seen.spec.lease_duration, "30s");
        }
        other => panic!("expected the new Lock, got {other:?}"),
    }
    let patch = serde_json::json!({"spec": {"permits": 3}});
    locks.patch("smoke", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patching the Lock");
    match next().await {
        watcher::Event::Apply(seen) => {
            assert_eq!(seen.spec.permits, 3);
            assert_eq!(seen.metadata.generation, Some(2));
        }
        other => panic!("expected the patched Lock, got {other:?}"),
    }
}

/// The schema is enforced by the API server: an invalid spec is refused, naming the field.
#[tokio::test]
async fn invalid_lock_is_refused_naming_the_field() {
    let env = TestEnv::new().await;
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    let err = locks.create(&PostParams::default(), &lock("zero", 0)).await.expect_err("permits 0 must be refused");
    let status = api_error(err);
    assert_eq!(status.code, 422, "{status:?}");
    assert!(status.message.contains("spec.permits"), "message does not name spec.permits: {}", status.message);
}

/// Identities are real: a requester without RBAC rights is forbidden, the admin is not, and
/// a grant gives exactly what it says.
#[tokio::test]
async fn requester_without_rights_is_forbidden() {
    let env = TestEnv::new().await;
    let as_requester: Api<Lock> = env.api(Identity::Requester1).await;
    let err = as_requester.create(&PostParams::default(), &lock("mine", 1)).await.expect_err("no rights yet");
    assert_eq!(api_error(err).code, 403);
    let err = as_requester.list(&ListParams::default()).await.expect_err("no rights yet");
    assert_eq!(api_error(err).code, 403);

    let as_admin: Api<Lock> = env.api(Identity::Admin).await;
    as_admin.create(&PostParams::default(), &lock("mine", 1)).await.expect("the admin may create Locks");

    env.grant(Identity::Requester1, vec![rule(&["kubelock.dev"], &["locks"], &["get", "list", "watch"])]).await;
    let listed = as_requester.list(&ListParams::default()).await.expect("granted list");
    assert_eq!(listed.items.iter().map(|l| l.name_any()).collect::<Vec<_>>(), ["mine"]);
    let err = as_requester.create(&PostParams::default(), &lock("other", 1)).await.expect_err("create not granted");
    assert_eq!(api_error(err).code, 403);
    // The other requester got nothing.
    let as_other: Api<Lock> = env.api(Identity::Requester2).await;
    assert_eq!(api_error(as_other.get("mine").await.expect_err("not granted")).code, 403);
}

/// A private control plane survives kube-apiserver and etcd being killed and restarted:
/// same address, same data. (What the fault-injection tests rely on.)
#[tokio::test]
async fn servers_can_be_killed_and_restarted() {
    let env = TestEnv::private().await;
    let cp = env.control_plane();
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    locks.create(&PostParams::default(), &lock("durable", 1)).await.expect("creating a Lock");

    let old = ProcessId::of(cp.apiserver_pid().expect("kube-apiserver runs")).expect("kube-apiserver is alive");
    cp.kill_apiserver().expect("killing kube-apiserver");
    assert!(!old.alive(), "kube-apiserver survived SIGKILL");
    assert!(cp.apiserver_pid().is_none());
    let short: Api<Lock> = {
        let mut config = env.config(Identity::Admin).await;
        config.connect_timeout = Some(Duration::from_secs(2));
        Api::namespaced(kube::Client::try_from(config).expect("client"), env.ns())
    };
    short.get("durable").await.expect_err("no API server, no answer");
    cp.start_apiserver().await.expect("restarting kube-apiserver");
    assert_ne!(cp.apiserver_pid(), Some(old.pid));
    assert_eq!(locks.get("durable").await.expect("the Lock after an API server restart").spec.permits, 1);

    let etcd = ProcessId::of(cp.etcd_pid().expect("etcd runs")).expect("etcd is alive");
    cp.kill_etcd().expect("killing etcd");
    assert!(!etcd.alive(), "etcd survived SIGKILL");
    cp.start_etcd().await.expect("restarting etcd");
    // The API server reconnects by itself; the data is still there.
    let back = eventually("the Lock to be readable after an etcd restart", TIMEOUT, || async {
        locks.get("durable").await.map_err(|e| e.to_string())
    })
    .await
    .expect("etcd restart");
    assert_eq!(back.spec.permits, 1);
    // And the API server still serves watches and writes.
    locks.create(&PostParams::default(), &lock("after", 4)).await.expect("writing after the restarts");
    wait_until(&locks, "after", "the new Lock", TIMEOUT, |l| l.spec.permits == 4).await.expect("watch after restarts");
}

/// SIGKILL a process that runs a control plane (`kubelock dev`): its etcd and kube-apiserver
/// die with it, and its state directory and tmpfs etcd data are removed.
#[tokio::test]
async fn killed_dev_leaves_no_orphans() {
    let env = TestEnv::new().await; // for the log directory and the failure dump
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut dev = env
        .command("dev", KUBELOCK)
        .args(["dev", "--admin-addr="])
        .env("TMPDIR", tmp.path())
        .env_remove("KUBECONFIG")
        .piped_stdout()
        .spawn();
    let kubeconfig = dev.dev_kubeconfig(Duration::from_secs(120)).await;
    let dir = kubeconfig.parent().expect("the kubeconfig is in the state directory").to_path_buf();
    assert!(dir.starts_with(tmp.path()), "state directory {} not under TMPDIR", dir.display());

    // `kubectl get locks` works with the printed KUBECONFIG: the CRDs are installed.
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("printed kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
    let client = kube::Client::try_from(config).expect("client");
    Api::<Lock>::all(client.clone()).list(&ListParams::default()).await.expect("listing Locks through kubelock dev");
    // It runs the admission webhook, as an installed cluster does: a forged creator is refused.
    kubelock::webhook::config::wait_enforced(&client, "default", Duration::from_secs(1))
        .await
        .unwrap_or_else(|e| panic!("kubelock dev without its webhook: {e}"));

    let pid = |name: &str| -> ProcessId {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pid = text.trim().parse().unwrap_or_else(|e| panic!("{name}: {e}"));
        ProcessId::of(pid).unwrap_or_else(|| panic!("{name}: process {pid} is not running"))
    };
    let (etcd, apiserver) = (pid("etcd.pid"), pid("apiserver.pid"));
    assert!(etcd.cmdline().contains("etcd"), "etcd.pid names {}", etcd.cmdline());
    assert!(apiserver.cmdline().contains("kube-apiserver"), "apiserver.pid names {}", apiserver.cmdline());
    let shm = std::fs::read_to_string(dir.join("etcd-data-shm")).ok().map(|s| PathBuf::from(s.trim()));

    dev.kill(); // SIGKILL: no destructor, no signal handler runs
    eventually("etcd and kube-apiserver to die with their parent", TIMEOUT, || async {
        match (etcd.alive(), apiserver.alive()) {
            (false, false) => Ok(()),
            alive => Err(format!("still alive (etcd, kube-apiserver): {alive:?}")),
        }
    })
    .await
    .expect("no orphan servers");
    eventually("the reaper to remove the state directory and the etcd data", TIMEOUT, || async {
        let left: Vec<&Path> =
            [Some(dir.as_path()), shm.as_deref()].into_iter().flatten().filter(|p| p.exists()).collect();
        if left.is_empty() { Ok(()) } else { Err(format!("still there: {left:?}")) }
    })
    .await
    .expect("no files left");
}
