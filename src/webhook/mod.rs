//! `kubelock webhook`: the admission webhooks (admission.k8s.io/v1) through which the API
//! server enforces who may touch a LockRequest, what of it may change, the bounds of Locks
//! and requests, and the fence of objects guarded by a Lock. Every decision is the pure
//! function of [`policy`]; this module gathers its inputs (the Lock from a cache or a quorum
//! read, the namespace's request count, a SubjectAccessReview for `break`) and serves HTTPS.
//!
//! Paths: `/mutate/lockrequests` (the creator recorded, a pod-bound token's pod filled in,
//! who breaks recorded), `/validate/lockrequests`, `/validate/locks`, `/validate/fenced`
//! (any kind the webhook configuration sends, selected by the `kubelock.dev/fenced-by`
//! label), and `/healthz`, `/metrics`.
//!
//! It runs apart from the controller (its own Deployment): all its replicas serve at once,
//! without leader election, with rights of their own (read Locks and requests, review
//! access), and a webhook outage never stops the controller from expiring grants.

pub mod config;
pub mod policy;
mod tls;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get, routing::post};
use futures::StreamExt as _;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::{
    Api, ResourceExt as _,
    api::{DynamicObject, PostParams},
    core::PartialObjectMeta,
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde_json::Value;

use self::policy::{Decision, Op, Policy, User};
pub use self::tls::{CA_FILE, CERT_FILE, KEY_FILE, generate as generate_certificate};
use crate::{
    api::{self, GROUP, Lock, LockRequest},
    connect::{ClientArgs, parse_duration},
};

/// `kubelock webhook` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on.
    #[arg(long, env = "KUBELOCK_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// Directory with the serving certificate (`tls.crt`, `tls.key`), reloaded when changed.
    #[arg(long, env = "KUBELOCK_WEBHOOK_CERT_DIR", default_value = "/var/run/kubelock-webhook/tls")]
    pub cert_dir: PathBuf,
    /// Generate a CA and a serving certificate for these names (DNS names or IPs) into
    /// --cert-dir first (a local control plane; a cluster uses the chart's or cert-manager's).
    #[arg(long, value_name = "NAME")]
    pub generate_cert: Vec<String>,
    /// Write the address actually listened on into this file once serving (for `--listen`
    /// with port 0).
    #[arg(long, value_name = "FILE")]
    pub address_file: Option<PathBuf>,
    /// Users that may change and delete any LockRequest (the controller's ServiceAccount;
    /// repeat the flag). The garbage collector and namespace controller are always trusted.
    #[arg(long, env = "KUBELOCK_WEBHOOK_TRUSTED_USERS", value_delimiter = ',', value_name = "USER")]
    pub trusted_user: Vec<String>,
    /// Register the webhook configurations named NAME with the API server, pointing at
    /// `https://<the address listened on>` with the CA of --cert-dir (a local control plane,
    /// where the API server reaches the webhook at a loopback address; a cluster registers
    /// the chart's configurations instead).
    #[arg(long, value_name = "NAME")]
    pub register: Option<String>,
    /// With --register: review only namespaces carrying this label (default: every namespace
    /// but kube-system).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label, requires = "register")]
    pub namespace_label: Option<(String, String)>,
    /// With --register: the kinds the fence guards, as `group/version/resource` (`v1/configmaps`
    /// for the core group); repeat the flag. Default: ConfigMaps and Secrets.
    #[arg(long, value_name = "GROUP/VERSION/RESOURCE", value_parser = parse_fenced, requires = "register")]
    pub fenced_resource: Vec<config::Fenced>,
    /// Groups whose members may too (default: system:masters).
    #[arg(long, value_delimiter = ',', value_name = "GROUP", default_value = "system:masters")]
    pub trusted_group: Vec<String>,
    /// The shortest `leaseDuration` a Lock or a request may have.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_lease: Duration,
    /// The most permits a Lock may have (its status lists each holder: it must fit etcd).
    #[arg(long, default_value_t = 1000)]
    pub max_permits: i32,
    /// `spec.maxWaiting` of a Lock that does not set it.
    #[arg(long, default_value_t = 10_000)]
    pub default_max_waiting: i32,
    /// The most LockRequests one namespace may hold.
    #[arg(long, default_value_t = 20_000)]
    pub max_requests_per_namespace: usize,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn parse_fenced(text: &str) -> Result<config::Fenced, String> {
    let parts: Vec<&str> = text.split('/').collect();
    let (group, version, resource) = match parts[..] {
        [version, resource] => ("", version, resource),
        [group, version, resource] => (group, version, resource),
        _ => return Err(format!("{text:?} is not GROUP/VERSION/RESOURCE (or VERSION/RESOURCE for the core group)")),
    };
    if version.is_empty() || resource.is_empty() {
        return Err(format!("{text:?} names no version or no resource"));
    }
    Ok(config::Fenced { group: group.into(), version: version.into(), resource: resource.into() })
}

impl WebhookArgs {
    /// Flags for a webhook on a loopback port of this machine that registers itself (what
    /// `kubelock dev` runs), with its certificate generated into `cert_dir`.
    pub fn local(cert_dir: PathBuf, register: &str) -> WebhookArgs {
        WebhookArgs {
            listen: "127.0.0.1:0".into(),
            cert_dir,
            generate_cert: vec!["127.0.0.1".into()],
            address_file: None,
            register: Some(register.into()),
            namespace_label: None,
            fenced_resource: Vec::new(),
            trusted_user: Vec::new(),
            trusted_group: vec!["system:masters".into()],
            min_lease: Duration::from_secs(1),
            max_permits: 1000,
            default_max_waiting: 10_000,
            max_requests_per_namespace: 20_000,
        }
    }

    fn policy(&self) -> Policy {
        let mut policy = Policy {
            trusted_groups: self.trusted_group.clone(),
            min_lease: self.min_lease,
            max_permits: self.max_permits,
            default_max_waiting: self.default_max_waiting,
            max_requests_per_namespace: self.max_requests_per_namespace,
            ..Policy::default()
        };
        policy.trusted_users.extend(self.trusted_user.iter().filter(|u| !u.is_empty()).cloned());
        policy
    }
}

/// Webhook errors.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("--listen {0:?} is not an address like 0.0.0.0:8443")]
    Listen(String),
    #[error("registering the webhook configurations: {0}")]
    Register(#[source] kube::Error),
    #[error("serving on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReviewLabel {
    webhook: &'static str,
    allowed: &'static str,
}

struct Shared {
    client: kube::Client,
    policy: Policy,
    locks: reflector::Store<Lock>,
    /// LockRequests per namespace, from a metadata watch.
    counts: Mutex<HashMap<String, usize>>,
    reviews: Family<ReviewLabel, Counter>,
    registry: Registry,
}

/// `kubelock webhook`: serves until SIGINT/SIGTERM.
pub async fn run(args: WebhookArgs, client_args: &ClientArgs) -> Result<ExitCode, WebhookError> {
    let (client, _) = client_args.client().await?;
    let listener = bind(&args.listen)?;
    serve(client, args, listener, crate::controller::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// A listener on `addr` (port 0: one the kernel picks, without a race).
pub fn bind(addr: &str) -> Result<std::net::TcpListener, WebhookError> {
    let parsed: SocketAddr = addr.parse().map_err(|_| WebhookError::Listen(addr.to_string()))?;
    let listener =
        std::net::TcpListener::bind(parsed).map_err(|source| WebhookError::Serve { addr: parsed, source })?;
    listener.set_nonblocking(true).map_err(|source| WebhookError::Serve { addr: parsed, source })?;
    Ok(listener)
}

/// Serves the webhooks on `listener` until `shutdown` completes (also used by `kubelock dev`).
pub async fn serve(
    client: kube::Client,
    args: WebhookArgs,
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WebhookError> {
    let addr = listener
        .local_addr()
        .map_err(|source| WebhookError::Serve { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })?;
    if !args.generate_cert.is_empty() {
        tls::generate(&args.cert_dir, &args.generate_cert)?;
    }
    let tls = tls::serving_config(&args.cert_dir).await?;

    // Locks, for the bounds of requests (a cache is enough: a bound a moment late is fine).
    let (locks, writer) = reflector::store::<Lock>();
    let lock_events = watcher(Api::<Lock>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|l| l.metadata.managed_fields = None)
        .reflect(writer);
    tokio::spawn(lock_events.for_each(|e| async move {
        if let Err(e) = e {
            tracing::warn!(error = %e, "lock watch");
        }
    }));
    let mut registry = Registry::with_prefix("kubelock_webhook");
    let reviews = Family::<ReviewLabel, Counter>::default();
    registry.register("reviews", "Admission reviews answered, by webhook and outcome", reviews.clone());
    let shared = Arc::new(Shared {
        client: client.clone(),
        policy: args.policy(),
        locks,
        counts: Mutex::default(),
        reviews,
        registry,
    });
    // Requests per namespace: metadata only.
    let counter = shared.clone();
    let requests = watcher(Api::<PartialObjectMeta<LockRequest>>::all(client.clone()), watcher::Config::default())
        .default_backoff();
    tokio::spawn(async move {
        let mut seen: HashMap<(String, String), ()> = HashMap::new();
        let mut listing: Option<HashMap<(String, String), ()>> = None;
        tokio::pin!(requests);
        while let Some(event) = requests.next().await {
            let key = |m: &PartialObjectMeta<LockRequest>| (m.namespace().unwrap_or_default(), m.name_any());
            match event {
                Ok(watcher::Event::Init) => listing = Some(HashMap::new()),
                Ok(watcher::Event::InitApply(m)) => {
                    listing.get_or_insert_with(HashMap::new).insert(key(&m), ());
                }
                Ok(watcher::Event::InitDone) => seen = listing.take().unwrap_or_default(),
                Ok(watcher::Event::Apply(m)) => {
                    seen.insert(key(&m), ());
                }
                Ok(watcher::Event::Delete(m)) => {
                    seen.remove(&key(&m));
                }
                Err(e) => tracing::warn!(error = %e, "lock request watch"),
            }
            let mut counts: HashMap<String, usize> = HashMap::new();
            for (ns, _) in seen.keys() {
                *counts.entry(ns.clone()).or_default() += 1;
            }
            *counter.counts.lock().expect("counts lock poisoned") = counts;
        }
    });

    let app = Router::new()
        .route("/mutate/lockrequests", post(mutate_requests))
        .route("/validate/lockrequests", post(validate_requests))
        .route("/validate/locks", post(validate_locks))
        .route("/validate/fenced", post(validate_fenced))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let handle = axum_server::Handle::new();
    let stop = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    if let Some(name) = &args.register {
        // The listener is bound: the API server's first calls wait in its backlog.
        register(&client, &args, name, addr).await?;
    }
    tracing::info!(%addr, "serving admission webhooks");
    if let Some(file) = &args.address_file {
        // Written whole (renamed into place): a reader never sees half an address.
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("{addr}\n"))
            .and_then(|()| std::fs::rename(&tmp, file))
            .map_err(|source| WebhookError::Serve { addr, source })?;
    }
    axum_server::from_tcp_rustls(listener, tls)
        .map_err(|source| WebhookError::Serve { addr, source })?
        .handle(handle)
        .serve(app.into_make_service())
        .await
        .map_err(|source| WebhookError::Serve { addr, source })
}

/// Registers the configurations that send reviews to `https://addr` (see `--register`).
async fn register(client: &kube::Client, args: &WebhookArgs, name: &str, addr: SocketAddr) -> Result<(), WebhookError> {
    let ca_file = args.cert_dir.join(CA_FILE);
    let ca = std::fs::read(&ca_file).map_err(|e| tls::TlsError::Io(ca_file, e))?;
    let namespaces = match &args.namespace_label {
        Some((key, value)) => k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([(key.clone(), value.clone())].into()),
            ..Default::default()
        },
        None => config::namespaces_except(&[]),
    };
    let fenced = match args.fenced_resource.is_empty() {
        true => config::Fenced::defaults(),
        false => args.fenced_resource.clone(),
    };
    let configs =
        config::configurations(name, &config::Target::Url(format!("https://{addr}")), &ca, &fenced, namespaces);
    config::install(client, &configs, "kubelock-webhook").await.map_err(WebhookError::Register)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &shared.registry) {
        Ok(()) => (StatusCode::OK, body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A review's request and what the policy functions read of it.
struct Review {
    request: AdmissionRequest<DynamicObject>,
    op: Op,
    user: User,
    object: Option<Value>,
    old: Option<Value>,
}

fn review_of(body: AdmissionReview<DynamicObject>) -> Result<Review, Box<AdmissionResponse>> {
    let request: AdmissionRequest<DynamicObject> =
        body.try_into().map_err(|e| Box::new(AdmissionResponse::invalid(format!("not an admission review: {e}"))))?;
    let op = match request.operation {
        Operation::Create => Op::Create,
        Operation::Update => Op::Update,
        Operation::Delete => Op::Delete,
        Operation::Connect => return Err(Box::new(AdmissionResponse::from(&request))),
    };
    let info = &request.user_info;
    let extra = |key: &str| info.extra.as_ref()?.get(key)?.first().cloned();
    let user = User {
        username: info.username.clone().unwrap_or_default(),
        uid: info.uid.clone().unwrap_or_default(),
        groups: info.groups.clone().unwrap_or_default(),
        pod: extra(policy::POD_NAME_EXTRA).map(|name| (name, extra(policy::POD_UID_EXTRA).unwrap_or_default())),
    };
    let to_value = |o: &Option<DynamicObject>| o.as_ref().and_then(|o| serde_json::to_value(o).ok());
    let (object, old) = (to_value(&request.object), to_value(&request.old_object));
    Ok(Review { op, user, object, old, request })
}

/// Asks the API server whether `user` may break `lock` (verb `break` on `locks`).
async fn may_break(shared: &Shared, user: &User, namespace: &str, lock: &str) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.username.clone()),
            uid: Some(user.uid.clone()).filter(|u| !u.is_empty()),
            groups: Some(user.groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_string()),
                verb: Some("break".into()),
                group: Some(GROUP.into()),
                resource: Some("locks".into()),
                name: Some(lock.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(shared.client.clone());
    match tokio::time::timeout(Duration::from_secs(5), api.create(&PostParams::default(), &review)).await {
        Ok(Ok(answer)) => answer.status.is_some_and(|s| s.allowed),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "subject access review");
            false
        }
        Err(_) => false,
    }
}

/// Decides, asking for the break right when the policy needs it, and answers.
async fn answer(
    shared: &Shared,
    webhook: &'static str,
    review: &Review,
    decide: impl Fn(Option<bool>) -> Decision,
) -> Json<AdmissionReview<DynamicObject>> {
    let mut decision = decide(None);
    if let Decision::NeedsBreakRight(lock) = &decision {
        let ns = review.request.namespace.clone().unwrap_or_default();
        let allowed = may_break(shared, &review.user, &ns, lock).await;
        decision = decide(Some(allowed));
    }
    let mut response = AdmissionResponse::from(&review.request);
    let allowed = match decision {
        Decision::Allow { patch, warnings } => {
            if !warnings.is_empty() {
                response.warnings = Some(warnings);
            }
            if !patch.is_empty() {
                match serde_json::from_value::<json_patch::Patch>(Value::Array(patch)) {
                    Ok(p) => match response.clone().with_patch(p) {
                        Ok(r) => response = r,
                        Err(e) => response = response.deny(format!("building the patch: {e}")),
                    },
                    Err(e) => response = response.deny(format!("building the patch: {e}")),
                }
            }
            response.allowed
        }
        Decision::Deny(message) | Decision::NeedsBreakRight(message) => {
            response = response.deny(message);
            response.result.code = 403;
            response.result.reason = "Forbidden".into();
            false
        }
    };
    shared.reviews.get_or_create(&ReviewLabel { webhook, allowed: if allowed { "true" } else { "false" } }).inc();
    Json(response.into_review())
}

fn rejected(response: impl Into<Box<AdmissionResponse>>) -> Json<AdmissionReview<DynamicObject>> {
    Json(response.into().into_review())
}

/// Every handler's input: the review's request, or an answer that it is not one.
impl<S: Send + Sync> axum::extract::FromRequest<S> for Review {
    type Rejection = Json<AdmissionReview<DynamicObject>>;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(body) = Json::<AdmissionReview<DynamicObject>>::from_request(req, state)
            .await
            .map_err(|e| rejected(AdmissionResponse::invalid(format!("not an admission review: {e}"))))?;
        review_of(body).map_err(rejected)
    }
}

async fn mutate_requests(State(shared): State<Arc<Shared>>, review: Review) -> Json<AdmissionReview<DynamicObject>> {
    let empty = Value::Null;
    let object = review.object.as_ref().unwrap_or(&empty);
    answer(&shared, "mutate_lockrequests", &review, |_| {
        policy::mutate_request(review.op, object, review.old.as_ref(), &review.user)
    })
    .await
}

async fn validate_requests(State(shared): State<Arc<Shared>>, review: Review) -> Json<AdmissionReview<DynamicObject>> {
    let ns = review.request.namespace.clone().unwrap_or_default();
    let lock_name = review.object.as_ref().or(review.old.as_ref()).and_then(|o| o.pointer("/spec/lockName")?.as_str());
    let lock = lock_name.and_then(|name| shared.locks.get(&reflector::ObjectRef::new(name).within(&ns)));
    let in_namespace = shared.counts.lock().expect("counts lock poisoned").get(&ns).copied().unwrap_or(0);
    answer(&shared, "validate_lockrequests", &review, |may_break| {
        policy::validate_request(
            review.op,
            review.object.as_ref(),
            review.old.as_ref(),
            &review.user,
            policy::Context { lock: lock.as_deref(), in_namespace },
            may_break,
            &shared.policy,
        )
    })
    .await
}

async fn validate_locks(State(shared): State<Arc<Shared>>, review: Review) -> Json<AdmissionReview<DynamicObject>> {
    let decision = match &review.object {
        Some(obj) if review.op != Op::Delete => policy::validate_lock(obj, &shared.policy),
        _ => Decision::Allow { patch: Vec::new(), warnings: Vec::new() },
    };
    answer(&shared, "validate_locks", &review, |_| decision.clone()).await
}

async fn validate_fenced(State(shared): State<Arc<Shared>>, review: Review) -> Json<AdmissionReview<DynamicObject>> {
    let ns = review.request.namespace.clone().unwrap_or_default();
    // The Lock as etcd has it now (a quorum read): a cache that lags the end of a grant
    // would let the old holder's write through.
    let lock = match policy::fencing_lock(review.object.as_ref(), review.old.as_ref()) {
        Some(name) => {
            let api: Api<DynamicObject> =
                Api::namespaced_with(shared.client.clone(), &ns, &kube::api::ApiResource::erase::<Lock>(&()));
            match tokio::time::timeout(Duration::from_secs(5), api.get_opt(&name)).await {
                Ok(Ok(found)) => {
                    found.map(|o| api::lenient(serde_json::to_value(o).unwrap_or_default(), api::placeholder_lock))
                }
                Ok(Err(e)) => {
                    let mut r = AdmissionResponse::from(&review.request).deny(format!("reading lock {name}: {e}"));
                    r.result.code = 503;
                    return rejected(r);
                }
                Err(_) => {
                    let mut r =
                        AdmissionResponse::from(&review.request).deny(format!("reading lock {name}: timed out"));
                    r.result.code = 503;
                    return rejected(r);
                }
            }
        }
        None => None,
    };
    answer(&shared, "validate_fenced", &review, |_| {
        policy::validate_fenced(review.op, review.object.as_ref(), review.old.as_ref(), lock.as_ref())
    })
    .await
}
