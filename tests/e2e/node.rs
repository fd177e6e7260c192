//! The local node (`ControlPlaneOptions::node`, `kubelock dev --node`): a real kubelet on
//! containerd runs pods from the images `make image` writes; pods reach the API server through
//! the `kubernetes` Service; pods and namespaces are deleted; and nothing of a node outlives
//! it, whether its owner stops it, exits, or is killed.
//!
//! Node tests share one node cluster (`TestEnv::with_node`); the teardown tests, which take
//! the machine's node for themselves, are in `node_teardown`. Timings are printed
//! (`--nocapture`).

use std::time::{Duration, Instant};

use k8s_openapi::api::{
    core::v1::{Endpoints, Namespace, Node, Pod},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api,
    api::{DeleteParams, LogParams, PostParams},
};
use kubelock::{
    api::{Lock, LockSpec},
    devenv::{IMAGE, TEST_IMAGE},
};

use kubelock::devenv::DevError;

use crate::support::{
    ControlPlaneOptions, Identity, TIMEOUT, TestEnv,
    node::{image_tarballs, is_ready, phase, pod, wait_started},
    process::KUBELOCK,
    wait_gone, wait_until,
};

/// How long a pod may take from create to running (measured: 1-3 s).
pub(crate) const POD_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a namespace with a running pod may take to go (measured: 12-28 s).
const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `pod` to completion and returns its log; panics with its status unless it succeeded.
async fn run_to_completion(env: &TestEnv, pod: Pod) -> String {
    let pods: Api<Pod> = env.api(Identity::Admin).await;
    let name = pod.metadata.name.clone().expect("a named pod");
    pods.create(&PostParams::default(), &pod).await.unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
    let done = wait_until(&pods, &name, "the pod to finish", POD_TIMEOUT, |p| {
        matches!(phase(p), "Succeeded" | "Failed") || crate::support::node::waiting_reason(p).is_some()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let log = pods.logs(&name, &LogParams::default()).await.unwrap_or_else(|e| panic!("logs of pod {name}: {e}"));
    assert_eq!(phase(&done), "Succeeded", "pod {name} did not succeed; log:\n{log}\nstatus: {:?}", done.status);
    log
}

#[tokio::test]
async fn the_node_is_ready_and_the_kubernetes_service_leads_to_the_api_server() {
    let env = TestEnv::with_node().await;
    let node_info = env.node().clone();
    let nodes: Api<Node> = Api::all(env.admin().await);
    let node = nodes.get(&node_info.name).await.expect("the Node");
    let status = node.status.expect("a Node status");
    let ready = status.conditions.unwrap_or_default().into_iter().find(|c| c.type_ == "Ready").expect("Ready");
    assert_eq!(ready.status, "True", "{ready:?}");
    let addresses = status.addresses.unwrap_or_default();
    assert!(
        addresses.iter().any(|a| a.type_ == "InternalIP" && a.address == node_info.address),
        "InternalIP {} not among {addresses:?}",
        node_info.address
    );
    let info = status.node_info.expect("nodeInfo");
    assert_eq!(info.kubelet_version, "v1.20.2");
    assert!(info.container_runtime_version.starts_with("containerd://"), "{}", info.container_runtime_version);

    // The `kubernetes` Service's endpoint is the API server at the machine's address.
    let port = env.control_plane().server().rsplit(':').next().expect("a port").to_string();
    let endpoints: Api<Endpoints> = Api::namespaced(env.admin().await, "default");
    let ep = endpoints.get("kubernetes").await.expect("the kubernetes Endpoints");
    let subsets = ep.subsets.unwrap_or_default();
    let mut seen = Vec::new();
    for subset in &subsets {
        for address in subset.addresses.iter().flatten() {
            for p in subset.ports.iter().flatten() {
                seen.push(format!("{}:{}", address.ip, p.port));
            }
        }
    }
    assert_eq!(seen, [format!("{}:{port}", node_info.address)]);
}

/// A pod of the pause image (no image build needed) runs on the node and gets an address in
/// the pod subnet. The teardown test runs it in a test binary of its own, whose exit must
/// leave nothing behind; it prints the node's state directory for that.
#[tokio::test]
async fn a_pod_runs_on_the_node() {
    let env = TestEnv::with_node().await;
    println!("node state directory: {}", env.control_plane().dir().display());
    let pods: Api<Pod> = env.api(Identity::Admin).await;
    let pause = env.node().pause_image.clone();
    let created = Instant::now();
    pods.create(&PostParams::default(), &pod("pause", &pause, &[])).await.expect("creating a pod");
    let running = wait_started(&pods, "pause", POD_TIMEOUT).await;
    eprintln!("timing: pause pod Ready {:.1} s after create", created.elapsed().as_secs_f64());
    assert!(is_ready(&running), "pod not Ready: {:?}", running.status);
    let ip = running.status.and_then(|s| s.pod_ip).expect("a pod IP");
    assert!(ip.starts_with("10.244."), "pod IP {ip} outside the pod subnet {}", env.node().pod_subnet);
}

/// busybox in the test image reaches `https://kubernetes.default.svc` by its ClusterIP, as
/// pods find it (the KUBERNETES_SERVICE_* variables; there is no cluster DNS), through
/// kube-proxy's rules to the API server.
#[tokio::test]
async fn a_busybox_pod_reaches_the_api_server_through_the_kubernetes_service() {
    let env = TestEnv::with_node().await;
    env.import_images().await;
    let script = "echo service=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT; \
                  wget -q -O- --no-check-certificate https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/version";
    let log = run_to_completion(&env, pod("busybox", TEST_IMAGE, &["sh", "-c", script])).await;
    assert!(log.contains("service=10.96.0.1:443"), "{log}");
    assert!(log.contains(r#""gitVersion": "v1.20.2""#), "no /version answer from the API server:\n{log}");
}

/// The kubelock image (as `make image` writes it, the Dockerfile's final stage) runs its
/// entrypoint with the given arguments.
#[tokio::test]
async fn the_kubelock_image_runs_kubelock_version() {
    let env = TestEnv::with_node().await;
    env.import_images().await;
    let mut version = pod("kubelock-version", IMAGE, &[]);
    version.spec.as_mut().expect("a spec").containers[0].args = Some(vec!["--version".into()]);
    let log = run_to_completion(&env, version).await;
    assert_eq!(log.trim(), format!("kubelock {}", env!("CARGO_PKG_VERSION")));
}

/// kubelock in a pod finds the API server by in-cluster configuration (the Service's address,
/// verified against the serving certificate; the service account's token) and is authorized
/// as the pod's service account.
#[tokio::test]
async fn kubelock_in_a_pod_uses_the_in_cluster_configuration() {
    let env = TestEnv::with_node().await;
    env.import_images().await;
    let admin = env.admin().await;
    let rule = crate::support::rule(&["kubelock.dev"], &["locks"], &["get", "list"]);
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "lock-reader"}, "rules": [rule],
    }))
    .expect("a Role");
    Api::<Role>::namespaced(admin.clone(), env.ns()).create(&PostParams::default(), &role).await.expect("Role");
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "lock-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lock-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": env.ns()}],
    }))
    .expect("a RoleBinding");
    Api::<RoleBinding>::namespaced(admin, env.ns()).create(&PostParams::default(), &binding).await.expect("binding");
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    let lock = Lock::new("seen-from-a-pod", LockSpec { permits: 3, ..Default::default() });
    locks.create(&PostParams::default(), &lock).await.expect("creating a Lock");

    let log = run_to_completion(&env, pod("kubelock-list", TEST_IMAGE, &["kubelock", "list", "-o", "json"])).await;
    assert!(log.contains("seen-from-a-pod"), "the pod did not list the Lock:\n{log}");
}

/// Deleting a running pod and a namespace with a running pod both complete (kubelet,
/// namespace controller, garbage collector).
#[tokio::test]
async fn pod_and_namespace_deletion_complete() {
    let env = TestEnv::with_node().await;
    let pause = env.node().pause_image.clone();
    let pods: Api<Pod> = env.api(Identity::Admin).await;
    pods.create(&PostParams::default(), &pod("doomed", &pause, &[])).await.expect("creating a pod");
    assert!(is_ready(&wait_started(&pods, "doomed", POD_TIMEOUT).await), "pod doomed did not start");
    let deleted = Instant::now();
    pods.delete("doomed", &DeleteParams::default()).await.expect("deleting the pod");
    wait_gone(&pods, "doomed", POD_TIMEOUT).await.expect("the pod to be gone");
    eprintln!("timing: running pod gone {:.1} s after delete", deleted.elapsed().as_secs_f64());

    let admin = env.admin().await;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let scratch = format!("{}-scratch", env.ns());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": scratch}})).expect("a Namespace");
    namespaces.create(&PostParams::default(), &ns).await.expect("creating a namespace");
    let in_scratch: Api<Pod> = Api::namespaced(admin.clone(), &scratch);
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(admin, &scratch);
    wait_until(&accounts, "default", "the default ServiceAccount's token", TIMEOUT, |sa| {
        sa.secrets.as_ref().is_some_and(|s| !s.is_empty())
    })
    .await
    .expect("a token in the new namespace");
    in_scratch.create(&PostParams::default(), &pod("inside", &pause, &[])).await.expect("creating a pod");
    assert!(is_ready(&wait_started(&in_scratch, "inside", POD_TIMEOUT).await), "pod inside did not start");
    let deleted = Instant::now();
    namespaces.delete(&scratch, &DeleteParams::default()).await.expect("deleting the namespace");
    wait_gone(&namespaces, &scratch, NAMESPACE_TIMEOUT).await.expect("the namespace to be gone");
    eprintln!("timing: namespace with a running pod gone {:.1} s after delete", deleted.elapsed().as_secs_f64());
}

/// The kubelock image carries the Dockerfile's final-stage configuration: user, entrypoint,
/// command and labels, with the static binary at /usr/local/bin/kubelock.
#[tokio::test]
async fn the_kubelock_image_has_the_dockerfiles_configuration() {
    let [kubelock_tar, _] = image_tarballs().await;
    let read = |member: &str| -> String {
        let out = std::process::Command::new("tar").arg("-xOf").arg(&kubelock_tar).arg(member).output().expect("tar");
        assert!(out.status.success(), "{member} not in {}", kubelock_tar.display());
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let json = |text: &str| -> serde_json::Value { serde_json::from_str(text).expect("JSON") };
    let index = json(&read("./index.json"));
    let manifest_ref = &index["manifests"][0];
    assert_eq!(manifest_ref["annotations"]["org.opencontainers.image.ref.name"], IMAGE);
    let blob = |digest: &serde_json::Value| {
        format!("./blobs/sha256/{}", digest.as_str().expect("a digest").trim_start_matches("sha256:"))
    };
    let manifest = json(&read(&blob(&manifest_ref["digest"])));
    let config = json(&read(&blob(&manifest["config"]["digest"])))["config"].clone();

    let dockerfile = std::fs::read_to_string(crate::support::node::repo().join("Dockerfile")).expect("the Dockerfile");
    let expected = FinalStage::parse(&dockerfile);
    assert_eq!(config["User"], expected.user);
    assert_eq!(config["Entrypoint"], serde_json::json!(expected.entrypoint));
    assert_eq!(config["Cmd"], serde_json::json!(expected.cmd));
    assert_eq!(config["Labels"], serde_json::json!(expected.labels));

    // The one layer holds the binary, executable.
    let layers = manifest["layers"].as_array().expect("layers");
    let listing = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("tar -xOf '{}' '{}' | tar -tvz", kubelock_tar.display(), blob(&layers[0]["digest"])))
        .output()
        .expect("listing the layer");
    let listing = String::from_utf8_lossy(&listing.stdout);
    let binary =
        listing.lines().find(|l| l.ends_with(" usr/local/bin/kubelock")).unwrap_or_else(|| panic!("{listing}"));
    assert!(binary.starts_with("-rwxr-xr-x"), "{binary}");
}

/// USER, ENTRYPOINT, CMD and LABEL of a Dockerfile's last stage (exec forms, `key="value"`
/// labels; `${VERSION}` is the stage's `ARG VERSION` default).
struct FinalStage {
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    labels: std::collections::BTreeMap<String, String>,
}

impl FinalStage {
    fn parse(dockerfile: &str) -> FinalStage {
        let joined = dockerfile.replace("\\\n", " ");
        let stage = joined.rsplit("\nFROM ").next().expect("a FROM");
        let instruction = |name: &str| -> Option<String> {
            stage.lines().filter_map(|l| l.strip_prefix(&format!("{name} "))).next_back().map(|v| v.trim().to_string())
        };
        let exec_form = |name: &str| -> Vec<String> {
            serde_json::from_str(&instruction(name).unwrap_or_else(|| panic!("no {name}"))).expect("an exec form")
        };
        let version =
            instruction("ARG").and_then(|a| a.strip_prefix("VERSION=").map(str::to_string)).expect("ARG VERSION");
        let mut labels = std::collections::BTreeMap::new();
        let mut rest = instruction("LABEL").expect("a LABEL").replace("${VERSION}", &version);
        while let Some((key, after)) = rest.split_once("=\"") {
            let (value, after) = after.split_once('"').expect("a closing quote");
            labels.insert(key.trim().to_string(), value.to_string());
            rest = after.to_string();
        }
        FinalStage {
            user: instruction("USER").expect("a USER"),
            entrypoint: exec_form("ENTRYPOINT"),
            cmd: exec_form("CMD"),
            labels,
        }
    }
}

// ---------------------------------------------------------------------------------------
// What the machine cannot do, said clearly.

/// A second node while one runs: refused before anything starts, naming the running one.
#[tokio::test]
async fn a_second_node_is_refused_while_one_runs() {
    let env = TestEnv::with_node().await;
    let err = kubelock::devenv::ControlPlane::start(ControlPlaneOptions { node: true, ..Default::default() })
        .await
        .expect_err("a second node on one machine");
    let message = err.to_string();
    assert!(matches!(err, DevError::NodeBusy { .. }), "{message}");
    assert!(message.contains(&std::process::id().to_string()), "the owner's pid is not named: {message}");
    assert!(message.contains(&*env.control_plane().dir().to_string_lossy()), "its directory is not named: {message}");
}

/// Without root: `kubelock dev --node` says so at once.
#[tokio::test]
async fn a_node_without_root_is_refused() {
    let env_dir = tempfile::tempdir().expect("a temp dir");
    let out = crate::support::Cmd::new("dev-node-nobody", "setpriv", env_dir.path())
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", KUBELOCK, "dev", "--node", "--no-images"])
        .env("TMPDIR", "/tmp")
        .output(TIMEOUT)
        .await;
    assert!(out.status.is_some_and(|s| !s.success()), "kubelock dev --node ran as nobody: {out:?}");
    assert!(out.stderr.contains("needs root"), "{}", out.stderr);
}

/// Every port the harness picked (etcd, kube-apiserver, the node's servers) is outside the
/// kernel's ephemeral range, where outgoing connections could take it first.
#[tokio::test]
async fn the_picked_ports_are_outside_the_ephemeral_range() {
    let env = TestEnv::with_node().await;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("the ephemeral range");
    let bounds: Vec<u16> = range.split_whitespace().map(|n| n.parse().expect("a port")).collect();
    let ephemeral = bounds[0]..=bounds[1];
    let dir = env.control_plane().dir();
    let mut ports = Vec::new();
    for file in ["etcd.args", "apiserver.args", "controller-manager.args", "scheduler.args", "kube-proxy.args"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for arg in text.lines() {
            let port = if let Some(p) = arg.strip_prefix("--secure-port=") {
                Some(p)
            } else if arg.contains("-address=127.0.0.1:") || arg.contains("-urls=http://127.0.0.1:") {
                arg.rsplit(':').next()
            } else {
                None
            };
            if let Some(port) = port {
                ports.push((file, port.parse::<u16>().unwrap_or_else(|e| panic!("{file}: {arg}: {e}"))));
            }
        }
    }
    let kubelet = std::fs::read_to_string(dir.join("node/kubelet-config.yaml")).expect("the kubelet's config");
    let healthz = kubelet.lines().find_map(|l| l.strip_prefix("healthzPort: ")).expect("healthzPort");
    ports.push(("kubelet-config.yaml", healthz.parse().expect("a port")));
    assert!(ports.len() >= 8, "too few ports found: {ports:?}");
    let inside: Vec<_> = ports.iter().filter(|(_, p)| ephemeral.contains(p)).collect();
    assert!(inside.is_empty(), "ports inside the ephemeral range {range:?}: {inside:?}");
}
