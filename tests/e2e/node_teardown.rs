//! Nothing of a node outlives it, whether its owner stops it, exits, or is killed; a machine
//! that cannot run one is told why. These tests take the machine's node for themselves
//! (`exclusive_node`: the shared node is stopped meanwhile). In a module of their own, named
//! to run after the other node modules, so that the shared node is started once per run, not
//! again after each of them.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use kubelock::devenv::DevError;

use crate::{
    node::POD_TIMEOUT,
    support::{
        ControlPlaneOptions, Identity, TIMEOUT, TestEnv, eventually,
        node::{
            HostState, exclusive_node, is_ready, leftovers_of, node_lock_free, pod, start_node_cluster, wait_started,
        },
        process::KUBELOCK,
    },
};

/// How long what a killed owner left may take to be cleaned up by its reaper.
const REAP_TIMEOUT: Duration = Duration::from_secs(60);

/// The shared node cluster, stopped by dropping it (what `ControlPlane`'s `Drop` does) while a
/// pod runs, leaves no process, mount, shim, bridge, chain, cgroup or sysctl change behind.
#[tokio::test]
async fn a_stopped_node_leaves_nothing_behind() {
    let _machine = exclusive_node().await;
    let before = HostState::now();
    let started = Instant::now();
    let cluster = start_node_cluster().await.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("timing: node cluster Ready {:.1} s after start", started.elapsed().as_secs_f64());
    let dir = cluster.control_plane().expect("a local control plane").dir().to_path_buf();
    let env = TestEnv::on(std::sync::Arc::new(cluster)).await;
    env.wait_for_service_account().await;
    let pods: Api<Pod> = env.api(Identity::Admin).await;
    let pause = env.node().pause_image.clone();
    pods.create(&PostParams::default(), &pod("running", &pause, &[])).await.expect("creating a pod");
    assert!(is_ready(&wait_started(&pods, "running", POD_TIMEOUT).await));
    drop(pods);
    assert!(!HostState::now().added_since(&before).is_empty(), "a running node changes nothing on the machine?");
    let stopped = Instant::now();
    // The last reference to the cluster: dropping it stops the node. On another thread, so that
    // this runtime goes on serving the client connections it still has (ended watches among
    // them), which kube-apiserver's graceful shutdown waits for.
    tokio::task::spawn_blocking(move || drop(env)).await.expect("stopping the node");
    eprintln!("timing: node stopped and cleaned up in {:.1} s", stopped.elapsed().as_secs_f64());
    nothing_left(Some(&dir), &before, Duration::from_secs(10)).await;
}

/// A test binary that used the node and exited (its statics never dropped: the servers die by
/// their parent-death signal, the reaper cleans up) leaves nothing behind.
#[tokio::test]
async fn the_exit_of_a_test_binary_leaves_nothing_behind() {
    let _machine = exclusive_node().await;
    let before = HostState::now();
    let tmp = tempfile::tempdir().expect("a temp dir");
    let env_dir = tempfile::tempdir().expect("a temp dir");
    let exe = std::env::current_exe().expect("this test binary");
    let out = crate::support::Cmd::new("child-test-binary", &exe, env_dir.path())
        .args(["--exact", "node::a_pod_runs_on_the_node", "--nocapture", "--test-threads=1"])
        .env("TMPDIR", tmp.path())
        .output(Duration::from_secs(300))
        .await;
    assert!(out.status.is_some_and(|s| s.success()), "the child test binary failed:\n{}\n{}", out.stdout, out.stderr);
    let dir: PathBuf = out
        .stdout
        .lines()
        .find_map(|l| l.split_once("node state directory: ").map(|(_, dir)| dir.trim()))
        .unwrap_or_else(|| panic!("the child printed no state directory:\n{}", out.stdout))
        .into();
    assert!(dir.starts_with(tmp.path()), "{} not under the child's TMPDIR", dir.display());
    nothing_left(Some(&dir), &before, REAP_TIMEOUT).await;
}

/// SIGKILL `kubelock dev --node` while a pod runs: the node's servers die with it (the
/// parent-death signal), and its reaper removes containers, shims, mounts, bridge and chains.
#[tokio::test]
async fn a_killed_dev_node_leaves_nothing_behind() {
    let _machine = exclusive_node().await;
    let before = HostState::now();
    let env_dir = tempfile::tempdir().expect("a temp dir");
    let tmp = tempfile::tempdir().expect("a temp dir");
    let mut dev = crate::support::Cmd::new("dev-node", KUBELOCK, env_dir.path())
        .args(["dev", "--node", "--no-images", "--admin-addr="])
        .env("TMPDIR", tmp.path())
        .env_remove("KUBECONFIG")
        .piped_stdout()
        .spawn();
    let kubeconfig = dev.dev_kubeconfig(Duration::from_secs(180)).await;
    let dir = kubeconfig.parent().expect("the kubeconfig is in the state directory").to_path_buf();

    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("the printed kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("a config");
    let pods: Api<Pod> = Api::namespaced(kube::Client::try_from(config).expect("a client"), "default");
    let pause = std::fs::read_to_string(dir.join("node/pause-image-name")).expect("the pause image's name");
    pods.create(&PostParams::default(), &pod("running", pause.trim(), &[])).await.expect("creating a pod");
    assert!(is_ready(&wait_started(&pods, "running", POD_TIMEOUT).await));
    assert!(!leftovers_of(&dir).is_empty(), "the node's processes name its state directory");

    dev.kill(); // SIGKILL: no destructor, no signal handler runs
    nothing_left(Some(&dir), &before, REAP_TIMEOUT).await;
}

/// Waits until nothing of the node run in `dir` is left, the machine is as in `before`, and
/// the node lock is free (the reaper is done).
async fn nothing_left(dir: Option<&std::path::Path>, before: &HostState, timeout: Duration) {
    eventually("nothing of the node to be left", timeout, || async {
        let mut left = dir.map(leftovers_of).unwrap_or_default();
        left.extend(HostState::now().added_since(before));
        if !node_lock_free() {
            left.push(format!("{} still locked", kubelock::devenv::NODE_LOCK));
        }
        if left.is_empty() { Ok(()) } else { Err(left.join("\n")) }
    })
    .await
    .unwrap_or_else(|e| {
        let cleanup = std::fs::read_to_string(kubelock::devenv::CLEANUP_LOG).unwrap_or_default();
        panic!("{e}\n--- {}:\n{cleanup}", kubelock::devenv::CLEANUP_LOG)
    });
}

/// The kubelet's port taken: the start fails at the machine check, naming the port, and
/// leaves nothing behind.
#[tokio::test]
async fn a_taken_kubelet_port_is_named() {
    let _machine = exclusive_node().await;
    let before = HostState::now();
    let _taken = std::net::TcpListener::bind("0.0.0.0:10250").expect("binding the kubelet's port");
    let parent = tempfile::tempdir().expect("a temp dir");
    let opts = ControlPlaneOptions { node: true, parent_dir: Some(parent.path().into()), ..Default::default() };
    let err = kubelock::devenv::ControlPlane::start(opts).await.expect_err("a node without its port");
    let message = err.to_string();
    assert!(matches!(err, DevError::NodeUnavailable { .. }), "{message}");
    assert!(message.contains("port 10250"), "{message}");
    let left: Vec<_> = std::fs::read_dir(parent.path()).expect("listing").flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    nothing_left(None, &before, TIMEOUT).await;
}
