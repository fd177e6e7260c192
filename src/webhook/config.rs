//! The webhook configurations that register `kubelock webhook` with the API server, built
//! here for a local control plane (`kubelock dev`, the tests) and written as templates in the
//! chart for a cluster: the same webhooks, rules, selectors and failure policies.

use k8s_openapi::{
    ByteString,
    api::admissionregistration::v1::{
        MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference, ValidatingWebhook,
        ValidatingWebhookConfiguration, WebhookClientConfig,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
};
use kube::{
    Api, ResourceExt as _,
    api::{Patch, PatchParams},
};

use crate::api::{FENCED_BY_LABEL, GROUP};

/// A kind of object the fence guards: `group/version/resource`, e.g. ("", "v1", "configmaps").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fenced {
    pub group: String,
    pub version: String,
    pub resource: String,
}

impl Fenced {
    /// ConfigMaps and Secrets: what the chart guards by default.
    pub fn defaults() -> Vec<Fenced> {
        ["configmaps", "secrets"]
            .iter()
            .map(|r| Fenced { group: String::new(), version: "v1".into(), resource: r.to_string() })
            .collect()
    }
}

/// Where the API server reaches the webhook.
#[derive(Clone, Debug)]
pub enum Target {
    /// A URL (`https://127.0.0.1:PORT`): a local control plane.
    Url(String),
    /// A Service of the cluster.
    Service { namespace: String, name: String, port: i32 },
}

fn client_config(target: &Target, path: &str, ca_bundle: &[u8]) -> WebhookClientConfig {
    let ca_bundle = Some(ByteString(ca_bundle.to_vec()));
    match target {
        Target::Url(base) => {
            WebhookClientConfig { url: Some(format!("{base}{path}")), ca_bundle, ..Default::default() }
        }
        Target::Service { namespace, name, port } => WebhookClientConfig {
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(path.into()),
                port: Some(*port),
            }),
            ca_bundle,
            ..Default::default()
        },
    }
}

fn rule(groups: &[&str], versions: &[&str], resources: &[&str], operations: &[&str]) -> RuleWithOperations {
    let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    RuleWithOperations {
        api_groups: strings(groups),
        api_versions: strings(versions),
        resources: strings(resources),
        operations: strings(operations),
        scope: Some("Namespaced".into()),
    }
}

/// Never kube-system, nor the namespaces given (the webhook's own): a webhook that is down
/// must not block what runs the cluster, or its own recovery.
pub fn namespaces_except(excluded: &[String]) -> LabelSelector {
    let mut values = vec!["kube-system".to_string()];
    values.extend(excluded.iter().cloned());
    LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "NotIn".into(),
            values: Some(values),
        }]),
        ..Default::default()
    }
}

/// The mutating and validating configurations named `name` (cluster-scoped), for the
/// namespaces `namespaces` selects (see [`namespaces_except`]).
pub fn configurations(
    name: &str,
    target: &Target,
    ca_bundle: &[u8],
    fenced: &[Fenced],
    namespaces: LabelSelector,
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    let meta = ObjectMeta { name: Some(name.into()), ..Default::default() };
    let fail = Some("Fail".to_string());
    let none = "None".to_string();
    let versions = vec!["v1".to_string()];
    let namespaces = Some(namespaces);
    let mutating = MutatingWebhookConfiguration {
        metadata: meta.clone(),
        webhooks: Some(vec![MutatingWebhook {
            name: format!("requests.{GROUP}"),
            client_config: client_config(target, "/mutate/lockrequests", ca_bundle),
            rules: Some(vec![rule(&[GROUP], &["*"], &["lockrequests"], &["CREATE", "UPDATE"])]),
            failure_policy: fail.clone(),
            side_effects: none.clone(),
            admission_review_versions: versions.clone(),
            namespace_selector: namespaces.clone(),
            timeout_seconds: Some(5),
            ..Default::default()
        }]),
    };
    let fenced_rules = fenced
        .iter()
        .map(|f| {
            // Its subresources too (a custom resource's status is written past the object).
            let all = format!("{}/*", f.resource);
            rule(
                &[f.group.as_str()],
                &[f.version.as_str()],
                &[f.resource.as_str(), &all],
                &["CREATE", "UPDATE", "DELETE"],
            )
        })
        .collect();
    let validating_hook = |what: &str, path: &str, rules: Vec<RuleWithOperations>| ValidatingWebhook {
        name: format!("{what}.{GROUP}"),
        client_config: client_config(target, path, ca_bundle),
        rules: Some(rules),
        failure_policy: fail.clone(),
        side_effects: none.clone(),
        admission_review_versions: versions.clone(),
        namespace_selector: namespaces.clone(),
        timeout_seconds: Some(5),
        ..Default::default()
    };
    let fence = ValidatingWebhook {
        // Only objects a Lock guards (either side of an update: removing the label too).
        object_selector: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: FENCED_BY_LABEL.into(),
                operator: "Exists".into(),
                values: None,
            }]),
            ..Default::default()
        }),
        ..validating_hook("fenced", "/validate/fenced", fenced_rules)
    };
    let validating = ValidatingWebhookConfiguration {
        metadata: meta,
        webhooks: Some(vec![
            validating_hook(
                "requests",
                "/validate/lockrequests",
                vec![rule(&[GROUP], &["*"], &["lockrequests"], &["CREATE", "UPDATE", "DELETE"])],
            ),
            validating_hook(
                "locks",
                "/validate/locks",
                vec![rule(&[GROUP], &["*"], &["locks"], &["CREATE", "UPDATE"])],
            ),
            fence,
        ]),
    };
    (mutating, validating)
}

/// Applies both configurations (server-side apply, field manager `manager`).
pub async fn install(
    client: &kube::Client,
    configs: &(MutatingWebhookConfiguration, ValidatingWebhookConfiguration),
    manager: &str,
) -> Result<(), kube::Error> {
    let params = PatchParams::apply(manager).force();
    let (mutating, validating) = configs;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(&mutating.name_any(), &params, &Patch::Apply(mutating))
        .await?;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(&validating.name_any(), &params, &Patch::Apply(validating))
        .await?;
    Ok(())
}

/// Waits until the API server sends the LockRequests of `namespace` to the webhook (it picks
/// up a new configuration within a moment, not at once): a dry-run create with a forged
/// creator annotation is refused once it does. Nothing is stored.
pub async fn wait_enforced(client: &kube::Client, namespace: &str, timeout: std::time::Duration) -> Result<(), String> {
    use crate::api::{LockRequest, LockRequestSpec, OWNER_ANNOTATION};
    let api: Api<LockRequest> = Api::namespaced(client.clone(), namespace);
    let mut probe = LockRequest::new("kubelock-webhook-probe", LockRequestSpec::new("kubelock-webhook-probe"));
    probe.metadata.annotations = Some([(OWNER_ANNOTATION.to_string(), "nobody (a probe)".to_string())].into());
    let params = kube::api::PostParams { dry_run: true, ..Default::default() };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match api.create(&params, &probe).await {
            Err(kube::Error::Api(e)) if e.message.contains(OWNER_ANNOTATION) => return Ok(()),
            Err(e) => e.to_string(),
            Ok(_) => "a forged creator was still admitted".to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("the webhook was not enforced in namespace {namespace} within {timeout:?}: {last}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
