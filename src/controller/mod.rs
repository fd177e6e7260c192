//! The controller: fetch -> plan -> compare-and-swap the Lock status -> mirror request statuses.

mod cache;
mod context;
mod events;
pub mod lease;
mod reconcile;
mod record;
mod writes;

use std::{future::Future, net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{ApiResource, DynamicObject},
    runtime::{
        Controller, WatchStreamExt as _, controller,
        reflector::{self, ObjectRef},
        watcher,
    },
};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::{
    cache::{Cache, strip_meta, strip_pod},
    events::EventSink,
    reconcile::Context,
};
use crate::{
    api::{self, Lock, LockRequest},
    connect::{ClientArgs, parse_duration},
    planner::Settings,
    telemetry::{ApiLabel, Metrics},
};

/// How long in-flight reconciles may run on after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `kubelock controller` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Watch only this namespace (namespace-scoped install, Role instead of ClusterRole).
    /// Default: all namespaces.
    #[arg(long, env = "KUBELOCK_WATCH_NAMESPACE", value_name = "NS")]
    pub watch_namespace: Option<String>,
    /// Address of the admin server (/metrics, /healthz, /readyz). Empty to disable.
    #[arg(long, env = "KUBELOCK_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: String,
    /// Run only while holding the leader-election Lease (several replicas for availability).
    /// Safety never depends on it: grants are decided by compare-and-swap.
    #[arg(long, env = "KUBELOCK_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease (default: $POD_NAMESPACE, else `default`).
    #[arg(long, env = "KUBELOCK_LEADER_ELECT_NAMESPACE")]
    pub leader_elect_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, env = "KUBELOCK_LEADER_ELECT_LEASE", default_value = "kubelock-controller")]
    pub leader_elect_lease: String,
    /// How long Expired and Rejected LockRequests are kept before the controller deletes them.
    #[arg(long, env = "KUBELOCK_FINISHED_RETENTION", default_value = "15m", value_parser = parse_duration)]
    pub finished_retention: Duration,
    /// Watch the pods named by `spec.podRef` and release when they are gone.
    #[arg(long, env = "KUBELOCK_WATCH_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch_pods: bool,
    /// Publish Kubernetes Events (Granted, Released, Expired, Rejected, Broken).
    #[arg(long, env = "KUBELOCK_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub events: bool,
    /// Events published per Lock at most: a burst of this many, then this many a minute;
    /// those beyond are counted and summed up in the next one (0: no bound).
    #[arg(long, env = "KUBELOCK_EVENTS_PER_LOCK_PER_MINUTE", default_value_t = 60)]
    pub events_per_lock_per_minute: u32,
    /// Reconciles running at once (different Locks; one Lock is never reconciled twice at once).
    #[arg(long, env = "KUBELOCK_CONCURRENCY", default_value_t = 64)]
    pub concurrency: u16,
}

impl Default for ControllerArgs {
    fn default() -> Self {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: ControllerArgs,
        }
        Wrapper::parse_from(["kubelock"]).args
    }
}

impl ControllerArgs {
    /// The admin address, if enabled.
    pub fn admin_socket(&self) -> Result<Option<SocketAddr>, Error> {
        if self.admin_addr.is_empty() {
            return Ok(None);
        }
        self.admin_addr.parse().map(Some).map_err(|_| {
            Error::Config(format!("--admin-addr {:?} is not an address like 0.0.0.0:8080", self.admin_addr))
        })
    }
}

/// Controller errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("API request timed out after {0:?}")]
    Timeout(Duration),
    #[error("serializing the {0} status: {1}")]
    Serialize(&'static str, #[source] serde_json::Error),
    #[error("the lock kept changing under us: gave up after {0} rounds")]
    Contention(usize),
    #[error(transparent)]
    Leader(#[from] lease::LeaderError),
    #[error(transparent)]
    Admin(#[from] crate::telemetry::AdminError),
}

impl Error {
    /// A short static name: the only error label on metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Connect(_) => "connect",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Config(_) => "config",
            Error::Timeout(_) => "timeout",
            Error::Serialize(..) => "serialize",
            Error::Contention(_) => "contention",
            Error::Leader(_) => "leader",
            Error::Admin(_) => "admin",
        }
    }
}

/// `kubelock controller`: runs until SIGINT/SIGTERM.
pub async fn run(args: ControllerArgs, client: &ClientArgs) -> Result<ExitCode, Error> {
    let timeout = client.request_timeout;
    let (client, _ns) = client.client().await?;
    run_controller(client, args, timeout, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

fn scoped<K>(client: kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// A watch that never fails on an object it cannot read: it is converted with
/// [`api::lenient`] and the planner refuses it with a clear condition. (A typed watch would
/// fail its whole list on one such object and stop the controller for every Lock.)
fn lenient_watch<K>(
    client: kube::Client,
    namespace: Option<&str>,
    placeholder: fn(&serde_json::Value) -> K,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned + Clone + Send + 'static,
{
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    };
    let convert = move |obj: DynamicObject| -> K {
        match serde_json::to_value(&obj) {
            Ok(value) => api::lenient(value, placeholder),
            Err(_) => api::lenient(serde_json::Value::Null, placeholder),
        }
    };
    watcher(api, watcher::Config::default()).default_backoff().map_ok(move |event| match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(convert(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(convert(o)),
        watcher::Event::InitApply(o) => watcher::Event::InitApply(convert(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    })
}

/// Why a watch's list was refused for good (403 Forbidden, 404 no such API), if it was: the
/// sentence a request's condition shows.
fn unreadable(e: &watcher::Error) -> Option<String> {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s,
        _ => return None,
    };
    match status.code {
        403 => Some(format!("the controller may not list pods ({})", status.message)),
        404 => Some("the API server has no pods API".to_string()),
        _ => None,
    }
}

fn channel_stream<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Runs the controller in this process until `shutdown` completes (also used by
/// `kubelock dev`). With leader election it first waits to lead, and returns an error if
/// it loses the lead (so that its pod restarts as a standby).
pub async fn run_controller(
    client: kube::Client,
    args: ControllerArgs,
    request_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let token = CancellationToken::new();
    tokio::spawn({
        let token = token.clone();
        async move {
            shutdown.await;
            token.cancel();
        }
    });
    let mut registry = Registry::with_prefix("kubelock");
    let metrics = Metrics::register(&mut registry);
    let registry = Arc::new(registry);
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = args.admin_socket()? {
        let ready = {
            let synced = synced.clone();
            Arc::new(move || synced.load(std::sync::atomic::Ordering::Acquire)) as Arc<dyn Fn() -> bool + Send + Sync>
        };
        let listener_token = token.clone();
        let serve = crate::telemetry::serve_admin(addr, registry.clone(), ready, listener_token.cancelled_owned());
        // Bind errors surface at once; serving runs in the background.
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin server stopped");
            }
        });
    }

    let identity = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("kubelock-{}", std::process::id()));
    let elector = args.leader_elect.then(|| {
        let ns = args
            .leader_elect_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        lease::Elector::new(client.clone(), &ns, &args.leader_elect_lease, &identity, lease::Timings::default())
    });
    let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(false);
    let mut elector = elector;
    if let Some(e) = &elector {
        synced.store(true, std::sync::atomic::Ordering::Release); // a standby is healthy
        let acquired = tokio::select! {
            r = e.acquire() => r,
            _ = token.cancelled() => return Ok(()),
        };
        if let Err(why) = acquired {
            // Safety never depends on leading (every grant is a CAS): serve rather than
            // stand by forever. Several replicas doing so only cost conflicts.
            tracing::error!(error = %why, "running without leader election");
            metrics.api_unavailable.get_or_create(&ApiLabel { api: "leases" }).set(1);
            elector = None;
        }
        synced.store(false, std::sync::atomic::Ordering::Release);
    }
    metrics.leader.set(1);
    let keeper = elector.map(|e| {
        let e = Arc::new(e);
        let keep = e.clone();
        let token = token.clone();
        let handle = tokio::spawn(async move {
            keep.keep(lost_tx).await;
        });
        tokio::spawn({
            let token = token.clone();
            async move {
                if lost_rx.wait_for(|lost| *lost).await.is_ok() {
                    token.cancel();
                }
            }
        });
        (e, handle)
    });

    run_active(client, &args, request_timeout, metrics.clone(), synced, token.clone(), identity).await;
    metrics.leader.set(0);
    if let Some((elector, handle)) = keeper {
        handle.abort();
        let lost = handle.await.is_ok();
        if lost {
            return Err(lease::LeaderError::Lost(args.leader_elect_lease.clone()).into());
        }
        elector.release().await;
    }
    Ok(())
}

/// The watches and the two controllers (Locks; requests of missing Locks), until cancelled.
async fn run_active(
    client: kube::Client,
    args: &ControllerArgs,
    request_timeout: Duration,
    metrics: Arc<Metrics>,
    synced: Arc<std::sync::atomic::AtomicBool>,
    token: CancellationToken,
    identity: String,
) {
    let ns = args.watch_namespace.as_deref();
    let settings = Settings { finished_retention: args.finished_retention, watch_pods: args.watch_pods };
    let (lock_store, lock_writer) = reflector::store::<Lock>();
    let (request_store, request_writer) = reflector::store::<LockRequest>();
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let cache = Cache::new(lock_store.clone(), request_store.clone(), args.watch_pods.then(|| pod_store.clone()));
    let events = args
        .events
        .then(|| EventSink::spawn(client.clone(), Some(identity), metrics.clone(), args.events_per_lock_per_minute));
    let ctx = Arc::new(Context::new(client.clone(), cache, settings, metrics, events, request_timeout));
    let (lock_tx, lock_rx) = mpsc::unbounded_channel::<ObjectRef<Lock>>();
    let (orphan_tx, orphan_rx) = mpsc::unbounded_channel::<ObjectRef<LockRequest>>();
    let mark_synced = {
        let ctx = ctx.clone();
        move || {
            if ctx.cache.is_synced() {
                synced.store(true, std::sync::atomic::Ordering::Release);
            }
        }
    };

    // Locks: the controller's own objects. Deletions send their requests to the orphan controller.
    let locks = lenient_watch(client.clone(), ns, api::placeholder_lock)
        .modify(|l| strip_meta(&mut l.metadata))
        .reflect(lock_writer)
        .inspect_ok({
            let (ctx, orphan_tx, mark_synced) = (ctx.clone(), orphan_tx.clone(), mark_synced.clone());
            move |event| {
                for r in ctx.cache.on_lock_event(event) {
                    let _ = orphan_tx.send(r);
                }
                if let watcher::Event::Delete(lock) = event {
                    ctx.forget_lock(lock);
                }
                mark_synced();
            }
        })
        .applied_objects()
        .try_filter({
            let ctx = ctx.clone();
            move |lock| std::future::ready(!ctx.is_own_write(lock))
        });

    // Requests: indexed by Lock; every change reconciles the Lock it names.
    let requests = lenient_watch(client.clone(), ns, api::placeholder_request)
        .modify(|r| strip_meta(&mut r.metadata))
        .reflect(request_writer)
        .inspect_ok({
            let (ctx, lock_tx, mark_synced) = (ctx.clone(), lock_tx.clone(), mark_synced.clone());
            move |event| {
                tracing::trace!(event = ?std::mem::discriminant(event), "request event");
                match event {
                    watcher::Event::Apply(req) | watcher::Event::InitApply(req) => ctx.on_request_seen(req, false),
                    watcher::Event::Delete(req) => ctx.on_request_seen(req, true),
                    _ => {}
                }
                for key in ctx.cache.on_request_event(event) {
                    let _ = lock_tx.send(key);
                }
                mark_synced();
            }
        })
        .applied_objects();

    // Pods named by podRef: a change reconciles the Locks whose requests name them. A
    // controller that may not list pods (RBAC of a namespace-scoped install, an API it cannot
    // reach) serves the Locks it can: requests bound to a pod wait with a condition saying so.
    if args.watch_pods {
        let pods = watcher(scoped::<Pod>(client.clone(), ns), watcher::Config::default())
            .default_backoff()
            .modify(strip_pod)
            .reflect(pod_writer)
            .inspect_ok({
                let (ctx, lock_tx, mark_synced) = (ctx.clone(), lock_tx.clone(), mark_synced.clone());
                move |event| {
                    if matches!(event, watcher::Event::InitDone) && ctx.cache.pods_unreadable().is_some() {
                        tracing::info!("pods can be read again");
                        ctx.cache.set_pods_unreadable(None);
                    }
                    for key in ctx.cache.on_pod_event(event) {
                        let _ = lock_tx.send(key);
                    }
                    mark_synced();
                }
            });
        let token = token.clone();
        let (ctx, lock_tx, mark_synced) = (ctx.clone(), lock_tx.clone(), mark_synced.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = pods.for_each(|event| {
                    if let Err(e) = event {
                        let refused = unreadable(&e);
                        let first = ctx.cache.pods_unreadable().is_none();
                        if let Some(why) = refused {
                            if first {
                                tracing::error!(error = %e, "cannot list pods: serving the locks whose requests have no podRef; requests bound to a pod wait");
                                ctx.metrics.api_unavailable.get_or_create(&ApiLabel { api: "pods" }).set(1);
                                ctx.cache.set_pods_unreadable(Some(why));
                                mark_synced();
                                for key in ctx.cache.locks_with_pods() {
                                    let _ = lock_tx.send(key);
                                }
                            }
                        } else {
                            tracing::warn!(error = %e, "pod watch");
                        }
                    } else if ctx.cache.pods_unreadable().is_none() {
                        ctx.metrics.api_unavailable.get_or_create(&ApiLabel { api: "pods" }).set(0);
                    }
                    std::future::ready(())
                }) => {}
                _ = token.cancelled() => {}
            }
        });
    }

    let config = controller::Config::default().concurrency(args.concurrency);
    let lock_controller = Controller::for_stream(locks, lock_store)
        .with_config(config.clone())
        .reconcile_on(channel_stream(lock_rx))
        .graceful_shutdown_on(token.clone().cancelled_owned())
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok(_) | Err(controller::Error::ObjectNotFound(_)) => {}
                Err(e) => tracing::debug!(error = %e, "lock controller"),
            }
        });
    let orphan_controller = Controller::for_stream(requests, request_store)
        .with_config(config)
        .reconcile_on(channel_stream(orphan_rx))
        .graceful_shutdown_on(token.clone().cancelled_owned())
        .run(reconcile::reconcile_orphan, reconcile::error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok(_) | Err(controller::Error::ObjectNotFound(_)) => {}
                Err(e) => tracing::debug!(error = %e, "request controller"),
            }
        });
    tracing::info!(namespace = ns.unwrap_or("<all>"), "controller running");
    // Stops promptly when told to, whatever a reconcile waits on: in-flight work gets a grace
    // period (a CAS half done is safe to abandon: the next controller plans again).
    let running = async { futures::join!(lock_controller, orphan_controller) };
    tokio::pin!(running);
    tokio::select! {
        _ = &mut running => {}
        _ = token.cancelled() => {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut running).await.is_err() {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "reconciles still running at shutdown; stopping anyway");
            }
        }
    }
}
