//! The Helm chart against a real API server, installed the way users install it (Helm's Go
//! SDK through `hack/helm.py`): lint, schema validation, the rendered pod against the
//! `restricted` Pod Security Standard, both RBAC modes proven sufficient by running the
//! controller authenticated as the chart's ServiceAccount through a lock handover, the
//! user-facing requester role proven insufficient to grant, and every example applied with
//! server-side dry-run.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        authentication::v1::{TokenRequest, TokenRequestSpec},
        authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
        coordination::v1::Lease,
        core::v1::{PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, Role, RoleBinding, RoleRef, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    core::ApiResource,
    discovery::{Scope, pinned_kind},
};
use kubelock::api::{Lock, LockRequest, Phase};
use serde_json::{Value, json};

use crate::support::{
    Identity, Proc, TIMEOUT, TestEnv, eventually,
    fixtures::{self, controller_rule_set, lease_rule_set, lock_with, request, rule_set},
    wait_until,
};

/// Timeout of one hack/helm.py run.
pub(crate) const HELM_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn chart_dir() -> PathBuf {
    repo().join("charts/kubelock")
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `hack/helm.py ARGS... --kubeconfig <admin>` as a child process of the test.
pub(crate) async fn helm(env: &TestEnv, name: &str, args: &[&str]) -> crate::support::Output {
    let out = env
        .command(name, python())
        .arg(repo().join("hack/helm.py"))
        .args(args)
        .arg("--kubeconfig")
        .arg(env.kubeconfig(Identity::Admin))
        .output(HELM_TIMEOUT)
        .await;
    if out.status.and_then(|s| s.code()) == Some(3) {
        panic!("helm-sdkpy is not installed (run `make helm-sdk`):\n{}", out.stderr);
    }
    out
}

/// The namespace label that the webhook of a test release selects (see [`Release::install`]).
pub(crate) const WEBHOOK_TEST_LABEL: &str = "kubelock.dev/chart-test-webhook";

/// An installed release; uninstalled when dropped after a passing test (kept for
/// inspection after a failure).
pub(crate) struct Release {
    name: String,
    namespace: String,
    kubeconfig: PathBuf,
    /// `hack/helm.py install -o json`: the release without the chart's files.
    json: Value,
}

impl Release {
    /// Installs the chart as `name` into the test's namespace with `--set` values.
    pub(crate) async fn install(env: &TestEnv, name: &str, sets: &[&str], take_ownership: bool) -> Release {
        let chart = chart_dir();
        let mut args = vec!["install", name, chart.to_str().expect("utf-8 path"), "-n", env.ns(), "-o", "json"];
        // The webhook reviews only a namespace labelled for this release (none is, unless a
        // test labels one): a release whose webhook has no running pod (no node here) must
        // not fail the writes of the other tests on the shared cluster.
        let selector = format!(r#"webhook.namespaceSelector={{"matchLabels":{{"{WEBHOOK_TEST_LABEL}":"{name}"}}}}"#);
        args.extend(["--set-json", &selector]);
        for set in sets {
            args.extend(["--set", set]);
        }
        if take_ownership {
            args.push("--take-ownership");
        }
        let out = helm(env, &format!("helm-install-{name}"), &args).await.success("helm install");
        let json: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("helm install printed no JSON ({e}):\n{}", out.stdout));
        assert_eq!(json["info"]["status"], "deployed", "release status: {}", json["info"]);
        Release { name: name.into(), namespace: env.ns().into(), kubeconfig: env.kubeconfig(Identity::Admin), json }
    }

    fn manifest_docs(&self) -> Vec<Value> {
        let text = self.json["manifest"].as_str().expect("the release has a manifest");
        serde_yaml::Deserializer::from_str(text)
            .filter_map(|doc| {
                let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("the manifest is YAML");
                (!v.is_null()).then(|| serde_json::to_value(v).expect("YAML to JSON"))
            })
            .collect()
    }

    /// The one rendered object of this kind (and name, if given).
    fn rendered(&self, kind: &str, name: Option<&str>) -> Value {
        let found: Vec<Value> = self
            .manifest_docs()
            .into_iter()
            .filter(|d| d["kind"] == kind && name.is_none_or(|n| d["metadata"]["name"] == n))
            .collect();
        assert_eq!(found.len(), 1, "expected one rendered {kind} {name:?}, found {}", found.len());
        found.into_iter().next().expect("one")
    }

    pub(crate) fn kinds(&self) -> BTreeSet<String> {
        self.manifest_docs().iter().map(|d| d["kind"].as_str().unwrap_or_default().to_string()).collect()
    }

    fn notes(&self) -> String {
        self.json["info"]["notes"].as_str().unwrap_or_default().to_string()
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("release {} in {} kept for inspection", self.name, self.namespace);
            return;
        }
        let status = std::process::Command::new(python())
            .arg(repo().join("hack/helm.py"))
            .args(["uninstall", &self.name, "-n", &self.namespace, "--kubeconfig"])
            .arg(&self.kubeconfig)
            .stdout(std::process::Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("uninstalling release {}: {status:?}", self.name);
        }
    }
}

/// A release name unique to the test: `kubelock-<the namespace's random suffix>`, so the
/// chart's full name is the release name and cluster-scoped names never collide.
pub(crate) fn release_name(env: &TestEnv) -> String {
    format!("kubelock-{}", env.ns().rsplit('-').next().unwrap_or("x"))
}

// ---------------------------------------------------------------------------------------
// The restricted Pod Security Standard, as the checks the admission plugin makes.

/// Volume types the `restricted` profile allows.
const RESTRICTED_VOLUMES: [&str; 8] =
    ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];

/// What in a pod spec violates the `restricted` Pod Security Standard (v1.20+ rules), plus
/// the read-only root filesystem the chart promises. Empty: it passes.
fn restricted_violations(pod: &PodSpec) -> Vec<String> {
    let mut v = Vec::new();
    let psc = pod.security_context.clone().unwrap_or_default();
    for (flag, set) in [("hostNetwork", pod.host_network), ("hostPID", pod.host_pid), ("hostIPC", pod.host_ipc)] {
        if set == Some(true) {
            v.push(format!("{flag} is set"));
        }
    }
    if psc.run_as_user == Some(0) {
        v.push("pod runAsUser is 0".into());
    }
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|s| s.type_.clone());
    if let Some(t) = &pod_seccomp
        && t != "RuntimeDefault"
        && t != "Localhost"
    {
        v.push(format!("pod seccompProfile {t}"));
    }
    if psc.sysctls.as_ref().is_some_and(|s| !s.is_empty()) {
        v.push("pod sets sysctls".into());
    }
    for vol in pod.volumes.iter().flatten() {
        let value = serde_json::to_value(vol).expect("volume to JSON");
        let kinds: Vec<&String> = value.as_object().expect("object").keys().filter(|k| *k != "name").collect();
        if kinds.iter().any(|k| !RESTRICTED_VOLUMES.contains(&k.as_str())) {
            v.push(format!("volume {} is of type {kinds:?}", vol.name));
        }
    }
    let containers = pod.containers.iter().chain(pod.init_containers.iter().flatten());
    for c in containers {
        let sc = c.security_context.clone().unwrap_or_default();
        let name = &c.name;
        if sc.privileged == Some(true) {
            v.push(format!("{name}: privileged"));
        }
        if sc.allow_privilege_escalation != Some(false) {
            v.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        if sc.run_as_non_root != Some(true) && !(psc.run_as_non_root == Some(true) && sc.run_as_non_root.is_none()) {
            v.push(format!("{name}: runAsNonRoot is not true (neither in the container nor in the pod)"));
        }
        if sc.run_as_user == Some(0) {
            v.push(format!("{name}: runAsUser is 0"));
        }
        let seccomp = sc.seccomp_profile.as_ref().map(|s| s.type_.clone()).or(pod_seccomp.clone());
        if !matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")) {
            v.push(format!("{name}: seccompProfile is {seccomp:?}, not RuntimeDefault or Localhost"));
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.iter().flatten().any(|d| d == "ALL") {
            v.push(format!("{name}: capabilities do not drop ALL"));
        }
        if let Some(add) = caps.add.as_ref().filter(|a| a.iter().any(|c| c != "NET_BIND_SERVICE")) {
            v.push(format!("{name}: adds capabilities {add:?}"));
        }
        if sc.read_only_root_filesystem != Some(true) {
            v.push(format!("{name}: readOnlyRootFilesystem is not true"));
        }
        for port in c.ports.iter().flatten() {
            if port.host_port.is_some_and(|p| p != 0) {
                v.push(format!("{name}: hostPort {:?}", port.host_port));
            }
        }
    }
    v
}

/// The checker itself can fail: a pod with the usual mistakes is refused on each.
#[test]
fn restricted_checker_refuses_a_privileged_pod() {
    let pod: PodSpec = serde_json::from_value(json!({
        "hostNetwork": true,
        "volumes": [{"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}],
        "containers": [{
            "name": "app",
            "securityContext": {"privileged": true, "runAsUser": 0, "capabilities": {"add": ["SYS_ADMIN"]}},
            "ports": [{"containerPort": 80, "hostPort": 80}]
        }]
    }))
    .expect("a pod spec");
    let violations = restricted_violations(&pod).join("\n");
    for expected in [
        "hostNetwork",
        "volume docker",
        "app: privileged",
        "app: allowPrivilegeEscalation",
        "app: runAsNonRoot",
        "app: runAsUser is 0",
        "app: seccompProfile",
        "app: capabilities do not drop ALL",
        "app: adds capabilities",
        "app: readOnlyRootFilesystem",
        "app: hostPort",
    ] {
        assert!(violations.contains(expected), "no violation {expected:?} in:\n{violations}");
    }
}

// ---------------------------------------------------------------------------------------

/// The chart's CRDs are the ones the API types generate (`make crds` refreshes both).
#[test]
fn chart_crds_match_the_types() {
    let path = chart_dir().join("files/crds.yaml");
    let file = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let generated = kubelock::api::crds_yaml();
    if file != generated {
        let line = file.lines().zip(generated.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{} differs from `kubelock crd` (first at line {}: {:?} vs {:?}): run `make crds`",
            path.display(),
            line + 1,
            file.lines().nth(line).unwrap_or("<end>"),
            generated.lines().nth(line).unwrap_or("<end>")
        );
    }
}

/// Values documented as a whole object in the README rather than key by key.
const OPAQUE_VALUES: [&str; 7] = [
    "resources",
    "webhook.resources",
    "podSecurityContext",
    "containerSecurityContext",
    "livenessProbe",
    "readinessProbe",
    "sidecar.resources",
];

fn value_keys(value: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
    if let serde_yaml::Value::Mapping(map) = value {
        for (k, v) in map {
            let key = format!("{prefix}{}", k.as_str().expect("string keys"));
            match v {
                serde_yaml::Value::Mapping(m) if !m.is_empty() && !OPAQUE_VALUES.contains(&key.as_str()) => {
                    value_keys(v, &format!("{key}."), out)
                }
                _ => out.push(key),
            }
        }
    }
}

/// The README's table lists every value of values.yaml, and every YAML example.
#[test]
fn readme_documents_every_value_and_example() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"))
            .expect("YAML");
    let mut keys = Vec::new();
    value_keys(&values, "", &mut keys);
    assert!(keys.len() > 40, "values.yaml parsed to only {keys:?}");
    let missing: Vec<&String> = keys.iter().filter(|k| !readme.contains(&format!("| `{k}` |"))).collect();
    assert!(missing.is_empty(), "README.md's values table lacks {missing:?}");
    for entry in std::fs::read_dir(repo().join("examples")).expect("examples/") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") {
            continue; // the Rust examples are documented with the library
        }
        assert!(readme.contains(&format!("`examples/{name}`")), "README.md does not list examples/{name}");
    }
}

/// `helm lint --strict` finds nothing (not even a warning).
#[tokio::test]
async fn helm_lint_passes_strict() {
    let env = TestEnv::new().await;
    let out = helm(&env, "helm-lint", &["lint", chart_dir().to_str().expect("utf-8"), "--strict"]).await;
    assert!(
        out.status.is_some_and(|s| s.success()) && out.stdout.contains("1 chart(s) linted, no failures"),
        "helm lint failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

/// Bad values fail `helm install` before anything is created, with a message naming the value.
#[tokio::test]
async fn invalid_values_are_rejected_by_the_schema() {
    let env = TestEnv::new().await;
    let cases = [
        ("replicaCount=0", "/replicaCount"),
        ("replicas=3", "additional properties 'replicas' not allowed"),
        ("controller.finishedRetention=soon", "/controller/finishedRetention"),
        ("controller.logFormat=xml", "/controller/logFormat"),
        (
            "containerSecurityContext.allowPrivilegeEscalation=true",
            "/containerSecurityContext/allowPrivilegeEscalation",
        ),
        ("podSecurityContext.runAsNonRoot=false", "/podSecurityContext/runAsNonRoot"),
        ("podAntiAffinity=maybe", "/podAntiAffinity"),
        ("watchNamespace=Not_A_Namespace", "/watchNamespace"),
        ("metrics.service.port=70000", "/metrics/service/port"),
    ];
    let release = release_name(&env);
    let chart = chart_dir();
    for (set, expected) in cases {
        let out = helm(
            &env,
            "helm-install-invalid",
            &["install", &release, chart.to_str().expect("utf-8"), "-n", env.ns(), "--set", set],
        )
        .await;
        assert_eq!(
            out.status.and_then(|s| s.code()),
            Some(1),
            "--set {set} was not refused as expected (status {:?}):\n{}{}",
            out.status,
            out.stdout,
            out.stderr
        );
        assert!(
            out.stderr.contains("values don't meet the specifications of the schema") && out.stderr.contains(expected),
            "--set {set}: the message does not name {expected:?}:\n{}",
            out.stderr
        );
    }
    let deployments: Api<Deployment> = env.api(Identity::Admin).await;
    let left = deployments.list(&ListParams::default()).await.expect("listing deployments");
    assert!(
        left.items.is_empty(),
        "a refused install created {:?}",
        left.items.iter().map(|d| d.name_any()).collect::<Vec<_>>()
    );
}

/// Default values: every part is installed, the pod passes the restricted profile, the
/// controller's ClusterRole has exactly the verbs the controller uses, and uninstalling
/// keeps the CRDs.
#[tokio::test]
async fn default_install_is_restricted_and_least_privilege() {
    let env = TestEnv::new().await;
    let name = release_name(&env);
    let release = Release::install(&env, &name, &[], true).await;
    let client = env.admin().await;

    let expected_kinds = [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "MutatingWebhookConfiguration",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
        "ValidatingWebhookConfiguration",
    ];
    assert_eq!(release.kinds(), expected_kinds.iter().map(|k| k.to_string()).collect(), "kinds rendered");

    // The Deployment as the API server stores it.
    let deployment = Api::<Deployment>::namespaced(client.clone(), env.ns())
        .get(&format!("{name}-controller"))
        .await
        .expect("the controller Deployment exists");
    let spec = deployment.spec.clone().expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.clone().expect("pod spec");
    let violations = restricted_violations(&pod);
    assert!(violations.is_empty(), "the controller pod breaks the restricted profile:\n{}", violations.join("\n"));
    let sc = pod.security_context.clone().expect("pod securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.seccomp_profile.map(|s| s.type_), Some("RuntimeDefault".into()));
    assert_eq!(pod.service_account_name.as_deref(), Some(format!("{name}-controller").as_str()));
    let anti = pod.affinity.and_then(|a| a.pod_anti_affinity).expect("podAntiAffinity");
    assert!(anti.preferred_during_scheduling_ignored_during_execution.is_some_and(|p| !p.is_empty()));
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default();
    for flag in [
        "controller",
        "--leader-elect",
        &format!("--leader-elect-namespace={}", env.ns()),
        &format!("--leader-elect-lease={name}-controller"),
    ] {
        assert!(args.iter().any(|a| a == flag), "controller args {args:?} lack {flag}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--watch-namespace")),
        "default install watches one namespace: {args:?}"
    );
    let env_vars: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value_from.as_ref()?.field_ref.as_ref()?.field_path.clone())))
        .collect();
    assert_eq!(env_vars.get("POD_NAME").map(String::as_str), Some("metadata.name"));
    assert_eq!(env_vars.get("POD_NAMESPACE").map(String::as_str), Some("metadata.namespace"));
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().and_then(|p| p.http_get.as_ref()).map(|h| (h.path.clone().unwrap_or_default(), h.port.clone()))
    };
    let admin_port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("admin".into());
    assert_eq!(probe_path(&container.liveness_probe), Some(("/healthz".into(), admin_port.clone())));
    assert_eq!(probe_path(&container.readiness_probe), Some(("/readyz".into(), admin_port)));
    let resources = container.resources.clone().expect("resources");
    assert!(
        resources.requests.is_some_and(|r| r.contains_key("memory"))
            && resources.limits.is_some_and(|l| l.contains_key("memory"))
    );

    // The controller's ClusterRole: exactly the API calls it makes.
    let role = Api::<ClusterRole>::all(client.clone()).get(&format!("{name}-controller")).await.expect("ClusterRole");
    assert_eq!(
        rule_set(role.rules.as_deref().unwrap_or_default()),
        controller_rule_set(true),
        "controller ClusterRole"
    );
    // The Lease: get/update by name only, plus an unscoped create.
    let lease_role =
        Api::<Role>::namespaced(client.clone(), env.ns()).get(&format!("{name}-leader-election")).await.expect("Role");
    assert_eq!(
        rule_set(lease_role.rules.as_deref().unwrap_or_default()),
        lease_rule_set(&format!("{name}-controller"))
    );

    // The user roles, aggregated into edit/admin and view.
    let roles = Api::<ClusterRole>::all(client.clone());
    let requester = roles.get(&format!("{name}-requester")).await.expect("requester role");
    assert_eq!(requester.labels().get("rbac.authorization.k8s.io/aggregate-to-edit").map(String::as_str), Some("true"));
    let viewer = roles.get(&format!("{name}-viewer")).await.expect("viewer role");
    assert_eq!(viewer.labels().get("rbac.authorization.k8s.io/aggregate-to-view").map(String::as_str), Some("true"));
    for role in [&requester, &viewer] {
        assert!(
            !role.rules.iter().flatten().flat_map(|r| r.resources.iter().flatten()).any(|r| r.ends_with("/status")),
            "{} grants a status subresource",
            role.name_any()
        );
    }

    // The rest of the parts.
    Api::<ServiceAccount>::namespaced(client.clone(), env.ns()).get(&format!("{name}-controller")).await.expect("SA");
    let pdb = release.rendered("PodDisruptionBudget", Some(&format!("{name}-controller")));
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let pdb_api = dynamic_api(&client, &pdb, env.ns()).await;
    pdb_api.get(&format!("{name}-controller")).await.expect("the PodDisruptionBudget exists");
    let service = release.rendered("Service", Some(&format!("{name}-metrics")));
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "admin");
    for crd in ["locks.kubelock.dev", "lockrequests.kubelock.dev"] {
        let rendered = release.rendered("CustomResourceDefinition", Some(crd));
        assert_eq!(rendered["metadata"]["annotations"]["helm.sh/resource-policy"], "keep", "{crd} is not kept");
    }
    // The NOTES show the sidecar snippet, and it is a container the API server accepts.
    check_sidecar_snippet(&env, &release.notes()).await;

    // Uninstall: the release's objects go, the CRDs stay (crds.keep).
    drop(release);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in ["locks.kubelock.dev", "lockrequests.kubelock.dev"] {
        let kept = crds.get(crd).await.unwrap_or_else(|e| panic!("CRD {crd} was removed on uninstall: {e}"));
        assert!(kept.metadata.deletion_timestamp.is_none(), "CRD {crd} is being deleted");
    }
    let gone = roles.get_opt(&format!("{name}-controller")).await.expect("reading ClusterRole");
    assert!(gone.is_none(), "the controller ClusterRole outlived the release");
}

/// Namespace-scoped mode: a Role in the watched namespace, no ClusterRole, and the
/// controller, authenticated as the chart's ServiceAccount, completes a handover with it.
#[tokio::test]
async fn namespace_scoped_install_is_enough_for_a_handover() {
    let env = TestEnv::new().await;
    let name = release_name(&env);
    let watch = format!("watchNamespace={}", env.ns());
    let release = Release::install(
        &env,
        &name,
        &[&watch, "crds.install=false", "rbac.aggregateClusterRoles=false", "webhook.enabled=false"],
        false,
    )
    .await;
    let client = env.admin().await;
    let kinds = release.kinds();
    assert!(
        !kinds.contains("ClusterRole") && !kinds.contains("ClusterRoleBinding"),
        "cluster-wide RBAC rendered: {kinds:?}"
    );
    assert!(!kinds.contains("CustomResourceDefinition"), "crds.install=false still rendered CRDs");
    let role =
        Api::<Role>::namespaced(client.clone(), env.ns()).get(&format!("{name}-controller")).await.expect("Role");
    assert_eq!(rule_set(role.rules.as_deref().unwrap_or_default()), controller_rule_set(true));
    let cluster_role =
        Api::<ClusterRole>::all(client.clone()).get_opt(&format!("{name}-controller")).await.expect("get");
    assert!(cluster_role.is_none(), "namespace-scoped mode created a ClusterRole");

    let controller = run_controller_as_service_account(&env, &name).await;
    let args = controller_args(&env, &name).await;
    assert!(args.iter().any(|a| *a == format!("--watch-namespace={}", env.ns())), "args: {args:?}");
    handover(&env, &controller, &name).await;
}

/// (verb, API group, resource[/subresource], namespace, resource name) for a SubjectAccessReview.
type Access<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);

/// Default (cluster-wide) RBAC: the controller, authenticated as the chart's ServiceAccount
/// with the flags the chart passes, completes a handover; and the ServiceAccount is
/// allowed exactly the controller's calls, nothing more.
#[tokio::test]
async fn charts_service_account_runs_the_controller() {
    let env = TestEnv::new().await;
    let name = release_name(&env);
    let _release =
        Release::install(&env, &name, &["crds.install=false", "rbac.aggregateClusterRoles=false"], false).await;
    let client = env.admin().await;

    // What the ServiceAccount may and may not do, as the API server's authorizer answers.
    let sa = format!("system:serviceaccount:{}:{name}-controller", env.ns());
    let lease = format!("{name}-controller");
    let ns = env.ns();
    let allowed: Vec<Access> = vec![
        ("list", "kubelock.dev", "locks", None, None),
        ("watch", "kubelock.dev", "locks", Some("elsewhere"), None),
        ("update", "kubelock.dev", "locks/status", Some(ns), None),
        ("delete", "kubelock.dev", "lockrequests", Some(ns), None),
        ("update", "kubelock.dev", "lockrequests/status", Some(ns), None),
        ("watch", "", "pods", None, None),
        ("get", "", "pods", Some(ns), None),
        ("create", "events.k8s.io", "events", Some(ns), None),
        ("patch", "events.k8s.io", "events", Some(ns), None),
        ("create", "coordination.k8s.io", "leases", Some(ns), None),
        ("update", "coordination.k8s.io", "leases", Some(ns), Some(&lease)),
    ];
    let denied: Vec<Access> = vec![
        ("create", "kubelock.dev", "locks", Some(ns), None),
        ("update", "kubelock.dev", "locks", Some(ns), None),
        ("delete", "kubelock.dev", "locks", Some(ns), None),
        ("patch", "kubelock.dev", "locks/status", Some(ns), None),
        ("create", "kubelock.dev", "lockrequests", Some(ns), None),
        ("patch", "kubelock.dev", "lockrequests", Some(ns), None),
        ("delete", "", "pods", Some(ns), None),
        ("get", "", "secrets", Some(ns), None),
        ("update", "coordination.k8s.io", "leases", Some(ns), Some("kube-controller-manager")),
        ("delete", "coordination.k8s.io", "leases", Some(ns), Some(&lease)),
        ("update", "coordination.k8s.io", "leases", Some("elsewhere"), Some(&lease)),
        ("create", "", "events", Some(ns), None),
    ];
    for (verbs, want) in [(&allowed, true), (&denied, false)] {
        for (verb, group, resource, namespace, name) in verbs.iter() {
            let got = may(&client, &sa, env.ns(), verb, group, resource, *namespace, *name).await;
            assert_eq!(got, want, "{sa} {verb} {group}/{resource} in {namespace:?} named {name:?}");
        }
    }

    let controller = run_controller_as_service_account(&env, &name).await;
    handover(&env, &controller, &name).await;

    // Leader election worked with the Lease rules, and Events were published.
    let leases: Api<Lease> = env.api(Identity::Admin).await;
    let lease_obj = leases.get(&lease).await.expect("the leader-election Lease exists");
    assert_eq!(lease_obj.spec.and_then(|s| s.holder_identity).as_deref(), Some(POD_NAME));
    let events: Api<k8s_openapi::api::events::v1::Event> = env.api(Identity::Admin).await;
    eventually("an Event from the controller", TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
            let ours =
                list.items.iter().any(|e| e.reporting_controller.as_deref() == Some(kubelock::api::CONTROLLER_MANAGER));
            if ours { Ok(()) } else { Err(format!("{} events, none from the controller", list.items.len())) }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", controller.stderr_tail(30)));
}

/// The requester role: request, renew, release and read, but never grant or delete a Lock.
#[tokio::test]
async fn requester_role_can_request_but_not_grant() {
    let env = TestEnv::new().await;
    let name = release_name(&env);
    let _release = Release::install(&env, &name, &["crds.install=false"], false).await;
    let client = env.admin().await;
    let role = format!("{name}-requester");
    // Bind requester-1 to the chart's role in this namespace only.
    let binding = RoleBinding {
        metadata: ObjectMeta { name: Some("requester-1-locks".into()), ..Default::default() },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: Identity::Requester1.user(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(client.clone(), env.ns())
        .create(&PostParams::default(), &binding)
        .await
        .expect("RoleBinding");
    let user = Identity::Requester1.user();
    eventually("the requester binding to apply", TIMEOUT, || {
        let client = client.clone();
        let (user, ns) = (user.clone(), env.ns().to_string());
        async move {
            if may(&client, &user, &ns, "create", "kubelock.dev", "lockrequests", Some(&ns), None).await {
                Ok(())
            } else {
                Err("not yet allowed".into())
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let admin_locks: Api<Lock> = env.api(Identity::Admin).await;
    admin_locks.create(&PostParams::default(), &fixtures::lock("shared", 1)).await.expect("Lock");
    let locks: Api<Lock> = env.api(Identity::Requester1).await;
    let requests: Api<LockRequest> = env.api(Identity::Requester1).await;

    // Allowed: read Locks, create, renew and delete its own request.
    locks.get("shared").await.expect("requester reads a Lock");
    locks.list(&ListParams::default()).await.expect("requester lists Locks");
    let created = requests
        .create(&PostParams::default(), &request("mine", "shared", "user/requester-1"))
        .await
        .expect("create request");
    let renew = json!({"spec": {"renewTime": "2030-01-01T00:00:00.000000Z"}});
    requests.patch("mine", &PatchParams::default(), &Patch::Merge(&renew)).await.expect("renew (patch) own request");
    requests.list(&ListParams::default()).await.expect("list requests");

    // Forbidden: granting itself the lock, or removing it.
    let mut lock = locks.get("shared").await.expect("get");
    lock.status.get_or_insert_with(Default::default).fencing_token = 99;
    expect_forbidden(locks.replace_status("shared", &PostParams::default(), &lock).await, "update Lock status");
    let grant = json!({"status": {"fencingToken": 99}});
    expect_forbidden(
        locks.patch_status("shared", &PatchParams::default(), &Patch::Merge(&grant)).await,
        "patch Lock status",
    );
    expect_forbidden(locks.delete("shared", &DeleteParams::default()).await.map(|_| ()), "delete the Lock");
    expect_forbidden(locks.create(&PostParams::default(), &fixtures::lock("mine", 1)).await, "create a Lock");
    let mut req = requests.get("mine").await.expect("get own request");
    req.status =
        Some(kubelock::api::LockRequestStatus { phase: Some(Phase::Granted), token: Some(1), ..Default::default() });
    expect_forbidden(requests.replace_status("mine", &PostParams::default(), &req).await, "update own request status");

    // Release: delete its own request.
    requests.delete("mine", &DeleteParams::default()).await.expect("delete own request");
    assert!(admin_locks.get_opt("shared").await.expect("get").is_some(), "the Lock is still there");
    assert_eq!(created.spec.lock_name, "shared");
}

/// Every example applies with server-side dry-run once the CRDs are installed.
#[tokio::test]
async fn examples_apply_with_server_side_dry_run() {
    let env = TestEnv::new().await;
    let client = env.admin().await;
    let dir = repo().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let names: BTreeSet<String> =
        files.iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect();
    for expected in ["mutex.yaml", "semaphore.yaml", "rwlock.yaml", "active-passive.yaml", "job.yaml", "cronjob.yaml"] {
        assert!(names.contains(expected), "examples/{expected} is missing (have {names:?})");
    }
    let mut applied = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if value.is_null() {
                continue;
            }
            let value = serde_json::to_value(value).expect("JSON");
            let what = format!("{}: {} {}", file.display(), value["kind"], value["metadata"]["name"]);
            dry_run_create(&client, env.ns(), value).await.unwrap_or_else(|e| panic!("{what}: {e}"));
            applied.push(what);
        }
    }
    assert!(applied.len() >= 6 * 3, "suspiciously few objects applied: {applied:#?}");
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// `--set` the chart passes reach the controller: the args of the rendered container.
async fn controller_args(env: &TestEnv, name: &str) -> Vec<String> {
    let deployments: Api<Deployment> = env.api(Identity::Admin).await;
    let d = deployments.get(&format!("{name}-controller")).await.expect("controller Deployment");
    let pod = d.spec.and_then(|s| s.template.spec).expect("pod spec");
    pod.containers.into_iter().find(|c| c.name == "controller").and_then(|c| c.args).expect("controller args")
}

/// The pod name the local controller claims (the downward API would set it in a pod).
const POD_NAME: &str = "kubelock-controller-test-0";

/// Starts `kubelock controller` as a local process with the args of the chart's
/// Deployment, authenticated as the chart's ServiceAccount (a token from the TokenRequest
/// API), and waits until it leads.
async fn run_controller_as_service_account(env: &TestEnv, name: &str) -> Proc {
    let client = env.admin().await;
    let sa_name = format!("{name}-controller");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), env.ns());
    let request = TokenRequest {
        metadata: Default::default(),
        spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(3600), ..Default::default() },
        status: None,
    };
    let token: TokenRequest = sas
        .create_subresource("token", &sa_name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {sa_name}: {e}"));
    let token = token.status.expect("TokenRequest status").token;
    let kubeconfig = token_kubeconfig(env, &token);

    let mut args = controller_args(env, name).await;
    assert_eq!(args.first().map(String::as_str), Some("controller"), "args: {args:?}");
    // Everything as the chart passes it, except the admin server (ports are shared here).
    for arg in args.iter_mut() {
        if arg.starts_with("--admin-addr=") {
            *arg = "--admin-addr=".into();
        }
    }
    let proc = env
        .command("controller-as-sa", crate::support::process::KUBELOCK)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(&args)
        .env_remove("KUBECONFIG")
        .env("POD_NAME", POD_NAME)
        .env("POD_NAMESPACE", env.ns())
        .spawn();
    // With --leader-elect it first takes the Lease: wait until it holds it.
    if args.iter().any(|a| a == "--leader-elect") {
        let leases: Api<Lease> = env.api(Identity::Admin).await;
        wait_until(&leases, &format!("{name}-controller"), "the controller to lead", TIMEOUT, |l| {
            l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(POD_NAME)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontroller log:\n{}", proc.stderr_tail(40)));
    }
    proc
}

/// A kubeconfig file: the admin kubeconfig's cluster, authenticated with `token` only.
fn token_kubeconfig(env: &TestEnv, token: &str) -> PathBuf {
    let admin = env.kubeconfig(Identity::Admin);
    let text = std::fs::read_to_string(&admin).expect("admin kubeconfig");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    let current = doc["current-context"].as_str().expect("current-context").to_string();
    let user = doc["contexts"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"].as_str() == Some(&current)))
        .and_then(|c| c["context"]["user"].as_str())
        .expect("the current context's user")
        .to_string();
    let users = doc["users"].as_sequence_mut().expect("users");
    let entry = users.iter_mut().find(|u| u["name"].as_str() == Some(&user)).expect("user entry");
    entry["user"] = serde_yaml::to_value(BTreeMap::from([("token", token)])).expect("yaml");
    let path = env.log_dir().join("kubeconfig-chart-serviceaccount");
    std::fs::write(&path, serde_yaml::to_string(&doc).expect("yaml")).expect("writing kubeconfig");
    path
}

fn phase(r: &LockRequest) -> Option<Phase> {
    r.status.as_ref().and_then(|s| s.phase)
}

/// A Lock, two requests: the first is granted, the second waits; deleting the first
/// hands the lock to the second, with a higher token.
async fn handover(env: &TestEnv, controller: &Proc, name: &str) {
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    let requests: Api<LockRequest> = env.api(Identity::Admin).await;
    let lock = format!("{name}-handover");
    locks.create(&PostParams::default(), &lock_with(&lock, 1, "5m", "0s")).await.expect("Lock");
    let log = || controller.stderr_tail(40);
    requests.create(&PostParams::default(), &request("first", &lock, "test/first")).await.expect("first");
    let first = wait_until(&requests, "first", "first granted", TIMEOUT, |r| phase(r) == Some(Phase::Granted))
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontroller log:\n{}", log()));
    requests.create(&PostParams::default(), &request("second", &lock, "test/second")).await.expect("second");
    wait_until(&requests, "second", "second queued", TIMEOUT, |r| phase(r) == Some(Phase::Pending))
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontroller log:\n{}", log()));
    crate::support::fixtures::release(&requests, "first").await;
    let second = wait_until(&requests, "second", "second granted", TIMEOUT, |r| phase(r) == Some(Phase::Granted))
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontroller log:\n{}", log()));
    let token = |r: &LockRequest| r.status.as_ref().and_then(|s| s.token).unwrap_or_default();
    assert!(token(&second) > token(&first), "tokens {} then {}", token(&first), token(&second));
    let held = locks.get(&lock).await.expect("Lock");
    let holders: Vec<String> = held.status.iter().flat_map(|s| s.holders.iter().map(|h| h.request.clone())).collect();
    assert_eq!(holders, vec!["second".to_string()], "Lock status holders");
}

fn expect_forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// Whether `user` (a ServiceAccount's groups are added for `system:serviceaccount:` users)
/// may `verb` `group`/`resource[/subresource]` in `namespace` (None: cluster-wide), named `name`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn may(
    admin: &kube::Client,
    user: &str,
    sa_ns: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r.to_string(), Some(s.to_string())),
        None => (resource.to_string(), None),
    };
    let groups: Vec<String> = if user.starts_with("system:serviceaccount:") {
        vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{sa_ns}"), "system:authenticated".into()]
    } else {
        vec!["system:authenticated".into()]
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(groups),
            resource_attributes: Some(ResourceAttributes {
                namespace: namespace.map(str::to_string),
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource),
                subresource,
                name: name.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

/// `Api<DynamicObject>` for a rendered object's apiVersion and kind.
async fn dynamic_api(client: &kube::Client, obj: &Value, ns: &str) -> Api<DynamicObject> {
    let gvk = gvk_of(obj);
    let (ar, caps) = pinned_kind(client, &gvk).await.unwrap_or_else(|e| panic!("{gvk:?} is not served: {e}"));
    match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), ns, &ar),
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    }
}

fn gvk_of(obj: &Value) -> GroupVersionKind {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, obj["kind"].as_str().expect("kind"))
}

/// Creates `obj` with `dryRun: All` in `ns`. batch/v1 CronJob is served from Kubernetes 1.21
/// on; older servers (the local 1.20) get the same object as batch/v1beta1, whose schema is
/// the same.
async fn dry_run_create(client: &kube::Client, ns: &str, mut obj: Value) -> Result<(), String> {
    let mut gvk = gvk_of(&obj);
    let found = match pinned_kind(client, &gvk).await {
        Ok(found) => found,
        Err(_) if gvk.group == "batch" && gvk.version == "v1" && gvk.kind == "CronJob" => {
            gvk = GroupVersionKind::gvk("batch", "v1beta1", "CronJob");
            obj["apiVersion"] = json!("batch/v1beta1");
            pinned_kind(client, &gvk).await.map_err(|e| format!("neither batch/v1 nor batch/v1beta1 CronJob: {e}"))?
        }
        Err(e) => return Err(format!("{gvk:?} is not served: {e}")),
    };
    let (ar, caps): (ApiResource, _) = found;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), ns, &ar),
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    let dynamic: DynamicObject = serde_json::from_value(obj).map_err(|e| format!("not an object: {e}"))?;
    let pp = PostParams { dry_run: true, ..Default::default() };
    api.create(&pp, &dynamic).await.map(|_| ()).map_err(|e| format!("dry-run create refused: {e}"))
}

/// The NOTES' "containers:/volumes:" block parses, and a Deployment made of an app and that
/// sidecar passes the API server's validation (dry-run) and the restricted profile.
async fn check_sidecar_snippet(env: &TestEnv, notes: &str) {
    let start = notes.find("\n  containers:\n").unwrap_or_else(|| panic!("no sidecar snippet in the NOTES:\n{notes}"));
    let block: String = notes[start + 1..]
        .lines()
        .take_while(|l| l.starts_with("  ") || l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
        .collect();
    let snippet: Value = serde_json::to_value(
        serde_yaml::from_str::<serde_yaml::Value>(&block)
            .unwrap_or_else(|e| panic!("snippet is not YAML ({e}):\n{block}")),
    )
    .expect("JSON");
    let sidecar = snippet["containers"][0].clone();
    assert_eq!(sidecar["args"][0], "sidecar", "snippet: {sidecar}");
    let app = json!({
        "name": "app",
        "image": "registry.example.com/app:1",
        "volumeMounts": [{"name": "kubelock", "mountPath": "/var/run/kubelock", "readOnly": true}],
        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    });
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "with-sidecar"},
        "spec": {
            "selector": {"matchLabels": {"app": "with-sidecar"}},
            "template": {
                "metadata": {"labels": {"app": "with-sidecar"}},
                "spec": {"containers": [app, sidecar], "volumes": snippet["volumes"].clone()}
            }
        }
    });
    let pod: PodSpec = serde_json::from_value(deployment["spec"]["template"]["spec"].clone()).expect("pod spec");
    let violations = restricted_violations(&pod);
    assert!(violations.is_empty(), "the sidecar snippet breaks the restricted profile:\n{}", violations.join("\n"));
    dry_run_create(&env.admin().await, env.ns(), deployment).await.unwrap_or_else(|e| panic!("sidecar snippet: {e}"));
}

/// The webhook the chart installs: its serving certificate, signed by the CA the chart
/// generated (the caBundle of both configurations), is served by `kubelock webhook` from
/// the Secret's files and verifies for the Service's DNS name and no other; every webhook
/// fails closed; its Deployment is restricted, two replicas, with a PodDisruptionBudget.
#[tokio::test]
async fn the_charts_webhook_serves_its_own_certificate_and_fails_closed() {
    use k8s_openapi::api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        core::v1::Secret,
    };
    let env = TestEnv::new().await;
    let name = release_name(&env);
    let release = Release::install(&env, &name, &[], true).await;
    let client = env.admin().await;
    let webhook = format!("{name}-webhook");
    let host = format!("{webhook}.{}.svc", env.ns());

    let secret = Api::<Secret>::namespaced(client.clone(), env.ns())
        .get(&format!("{webhook}-tls"))
        .await
        .expect("the TLS Secret");
    let data = secret.data.expect("Secret data");
    let dir = tempfile::tempdir().expect("temp dir");
    for file in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::write(dir.path().join(file), &data[file].0).expect("writing the certificate files");
    }
    let ca = data["ca.crt"].0.clone();
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone()).get(&webhook).await.expect("mutating");
    let validating =
        Api::<ValidatingWebhookConfiguration>::all(client.clone()).get(&webhook).await.expect("validating");
    let hooks = mutating.webhooks.iter().flatten().map(|w| (&w.name, &w.failure_policy, &w.client_config));
    let hooks =
        hooks.chain(validating.webhooks.iter().flatten().map(|w| (&w.name, &w.failure_policy, &w.client_config)));
    let configured: Vec<_> = hooks
        .map(|(name, policy, client)| (name.clone(), policy.clone(), client.ca_bundle.clone(), client.service.clone()))
        .collect();
    let names: Vec<&str> = configured.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(names, ["requests.kubelock.dev", "requests.kubelock.dev", "locks.kubelock.dev", "fenced.kubelock.dev"]);
    for (hook, policy, bundle, service) in &configured {
        assert_eq!(policy.as_deref(), Some("Fail"), "{hook} fails open");
        assert_eq!(bundle.as_ref().map(|b| &b.0), Some(&ca), "{hook}: its caBundle is not the chart's CA");
        let service = service.as_ref().expect("a Service reference");
        assert_eq!((service.name.as_str(), service.port), (webhook.as_str(), Some(443)), "{hook}");
    }
    let fenced = validating.webhooks.iter().flatten().find(|w| w.name == "fenced.kubelock.dev").expect("the fence");
    let kinds: Vec<String> =
        fenced.rules.iter().flatten().flat_map(|r| r.resources.clone().unwrap_or_default()).collect();
    assert_eq!(kinds, ["configmaps", "configmaps/*", "secrets", "secrets/*"]);

    let deployment =
        Api::<Deployment>::namespaced(client.clone(), env.ns()).get(&webhook).await.expect("the webhook Deployment");
    let spec = deployment.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.expect("pod spec");
    let violations = restricted_violations(&pod);
    assert!(violations.is_empty(), "the webhook pod breaks the restricted profile:\n{}", violations.join("\n"));
    let args = pod.containers[0].args.clone().unwrap_or_default();
    let trusted = format!("--trusted-user=system:serviceaccount:{}:{name}-controller", env.ns());
    assert!(args.contains(&trusted), "the controller is not trusted: {args:?}");
    release.rendered("PodDisruptionBudget", Some(&webhook));

    // Served by the webhook from exactly those files, verified as the API server does.
    let address_file = dir.path().join("address");
    let mut served = env
        .kubelock(Identity::Admin, "webhook")
        .args(["webhook", "--listen", "127.0.0.1:0", "--cert-dir"])
        .arg(dir.path())
        .arg("--address-file")
        .arg(&address_file)
        .spawn();
    let address = eventually("the webhook to listen", TIMEOUT, || async {
        std::fs::read_to_string(&address_file).map(|a| a.trim().to_string()).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| panic!("{e} (exited: {:?})\n{}", served.try_status(), served.stderr_tail(20)));
    let tls_get = |server_name: &str| {
        let (ip, port) = address.rsplit_once(':').expect("host:port");
        let script = "import socket, ssl, sys\n\
            ctx = ssl.create_default_context(cafile=sys.argv[1])\n\
            s = ctx.wrap_socket(socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10), server_hostname=sys.argv[4])\n\
            s.sendall(b'GET /healthz HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
            print(s.recv(4096).decode().splitlines()[0])\n";
        std::process::Command::new(python())
            .args(["-c", script])
            .arg(dir.path().join("ca.crt"))
            .args([ip, port, server_name])
            .output()
            .expect("running python3")
    };
    let ok = tls_get(&host);
    assert!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("200"),
        "TLS to {host} with the chart's CA: {}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    let wrong = tls_get("kubelock-webhook.elsewhere.svc");
    assert!(
        !wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("CERTIFICATE_VERIFY_FAILED"),
        "a name the certificate is not for verified: {}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}
