//! One reconcile of one Lock: read (caches) → plan (pure) → confirm (quorum reads, rarely)
//! → compare-and-swap `Lock.status` → mirror request statuses → delete finished requests
//! → publish events → requeue at the next deadline.
//!
//! And the orphan reconcile: requests whose Lock does not exist.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    Api, Resource, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, ObjectMeta, PostParams, Preconditions},
    runtime::{controller::Action, reflector::ObjectRef},
};
use tracing::{debug, info, instrument, warn};

use super::{
    Error,
    cache::{Cache, LockKey, lock_key_of, pod_info, strip_meta, strip_pod},
    events::EventSink,
};
use crate::{
    api::{self, CONTROLLER_MANAGER, Lock, LockRequest, LockRequestStatus, Reason},
    planner::{self, Check, EventKind, Inputs, Now, Observations, Plan, PlanEvent, PodInfo, Settings},
    telemetry::{Metrics, SumGauge},
};

/// Plan/write rounds before a reconcile gives up on a contended Lock (and is retried).
const MAX_ROUNDS: usize = 8;
/// A failed request-status write is retried after this long.
const MIRROR_RETRY: Duration = Duration::from_millis(250);
/// Mirror writes in flight at once for one Lock.
const MIRROR_CONCURRENCY: usize = 16;

/// Shared by all reconciles.
pub struct Context {
    /// API client.
    pub client: kube::Client,
    /// Watch-fed caches.
    pub cache: Cache,
    /// Planner settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event publisher (None when events are off).
    pub events: Option<EventSink>,
    /// Timeout of each API request.
    pub request_timeout: Duration,
    /// The monotonic clock's origin.
    started: Instant,
    /// Observations per Lock UID.
    observations: Mutex<HashMap<String, Observations>>,
    /// Our last successful Lock status write, with the resourceVersion it replaced: used
    /// while the watch has not delivered it yet, to avoid a certain conflict.
    written: Mutex<HashMap<LockKey, (String, Arc<Lock>)>>,
    /// The same for our request status writes, by request UID: the reconcile that follows a
    /// grant often starts before the watch delivers its mirror writes, and would otherwise
    /// write the same status again with a stale resourceVersion (a certain 409, then a retry).
    written_requests: Mutex<HashMap<String, (String, Arc<LockRequest>)>>,
    /// Requests waiting, per Lock (for the queue-depth gauge).
    waiting: SumGauge,
    /// Grants held, per Lock.
    held: SumGauge,
}

impl Context {
    /// A context around these caches.
    pub fn new(
        client: kube::Client,
        cache: Cache,
        settings: Settings,
        metrics: Arc<Metrics>,
        events: Option<EventSink>,
        request_timeout: Duration,
    ) -> Self {
        Self {
            client,
            cache,
            settings,
            metrics,
            events,
            request_timeout,
            started: Instant::now(),
            observations: Mutex::default(),
            written: Mutex::default(),
            written_requests: Mutex::default(),
            waiting: SumGauge::default(),
            held: SumGauge::default(),
        }
    }

    fn now(&self) -> Now {
        Now { mono: self.started.elapsed(), wall: jiff::Timestamp::now() }
    }

    fn mono_to_action(&self, wake_at: Option<Duration>) -> Action {
        match wake_at {
            Some(at) => Action::requeue(at.saturating_sub(self.started.elapsed()) + Duration::from_millis(1)),
            None => Action::await_change(),
        }
    }

    /// Bounds an API call by the request timeout.
    async fn call<T>(&self, fut: impl Future<Output = Result<T, kube::Error>>) -> Result<T, Error> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(Error::Timeout(self.request_timeout)),
        }
    }

    /// The newest Lock we know: the cache's, or our own write if the cache has not caught up.
    fn newest(&self, key: &LockKey, cached: Arc<Lock>) -> Arc<Lock> {
        let mut written = self.written.lock().expect("written lock poisoned");
        match written.get(key) {
            Some((replaced, ours)) if cached.resource_version().as_deref() == Some(replaced.as_str()) => ours.clone(),
            Some(_) => {
                written.remove(key);
                cached
            }
            None => cached,
        }
    }

    /// The newest version of a request we know: the cache's, or our own status write if the
    /// cache still has the version that write replaced.
    fn newest_request(&self, cached: Arc<LockRequest>) -> Arc<LockRequest> {
        let Some(uid) = cached.metadata.uid.as_deref() else { return cached };
        let written = self.written_requests.lock().expect("written requests lock poisoned");
        match written.get(uid) {
            Some((replaced, ours)) if cached.resource_version().as_deref() == Some(replaced.as_str()) => ours.clone(),
            _ => cached,
        }
    }

    /// Remembers our status write of `replaced` until the watch delivers it.
    fn remember_request_write(&self, replaced: &LockRequest, written: impl Into<Arc<LockRequest>>) {
        if let (Some(uid), Some(version)) = (replaced.uid(), replaced.resource_version()) {
            self.written_requests
                .lock()
                .expect("written requests lock poisoned")
                .insert(uid, (version, written.into()));
        }
    }

    /// A watch event for a request: once the cache has moved past the version our write
    /// replaced (to our write or beyond), or the request is gone, our copy is not needed.
    pub fn on_request_seen(&self, req: &LockRequest, deleted: bool) {
        let Some(uid) = req.metadata.uid.as_deref() else { return };
        let mut written = self.written_requests.lock().expect("written requests lock poisoned");
        if let Some((replaced, _)) = written.get(uid)
            && (deleted || req.resource_version().as_deref() != Some(replaced.as_str()))
        {
            written.remove(uid);
        }
    }

    /// Whether this Lock version is our own last write: its watch event needs no reconcile,
    /// and skipping it keeps the next real trigger (a release) from queuing behind it.
    pub fn is_own_write(&self, lock: &Lock) -> bool {
        let written = self.written.lock().expect("written lock poisoned");
        written.get(&ObjectRef::from_obj(lock)).is_some_and(|(_, ours)| {
            ours.resource_version().is_some() && ours.resource_version() == lock.resource_version()
        })
    }

    /// Forgets everything about a deleted Lock.
    pub fn forget_lock(&self, lock: &Lock) {
        if let Some(uid) = lock.uid() {
            self.observations.lock().expect("observations lock poisoned").remove(&uid);
            self.metrics.queue_depth.set(self.waiting.set(&uid, 0));
            self.metrics.holders.set(self.held.set(&uid, 0));
        }
        self.written.lock().expect("written lock poisoned").remove(&ObjectRef::from_obj(lock));
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn post_params() -> PostParams {
    PostParams { field_manager: Some(CONTROLLER_MANAGER.into()), ..Default::default() }
}

/// API calls on a kubelock kind that read answers leniently ([`api::lenient`]) and write a
/// status with a minimal body: name, namespace, resourceVersion (the compare-and-swap) and
/// the status. The status subresource keeps everything else from the stored object.
struct Objects<K> {
    api: Api<DynamicObject>,
    placeholder: fn(&serde_json::Value) -> K,
}

impl<K> Objects<K>
where
    K: Resource<DynamicType = ()> + serde::de::DeserializeOwned + Clone,
{
    fn new(client: kube::Client, ns: &str, placeholder: fn(&serde_json::Value) -> K) -> Self {
        Self { api: Api::namespaced_with(client, ns, &ApiResource::erase::<K>(&())), placeholder }
    }

    fn typed(&self, obj: DynamicObject) -> K {
        let mut typed = api::lenient(serde_json::to_value(&obj).unwrap_or_default(), self.placeholder);
        strip_meta(typed.meta_mut());
        typed
    }

    async fn get_opt(&self, ctx: &Context, name: &str) -> Result<Option<K>, Error> {
        Ok(ctx.call(self.api.get_opt(name)).await?.map(|o| self.typed(o)))
    }

    async fn replace_status(&self, ctx: &Context, obj: &K, status: &impl serde::Serialize) -> Result<K, Error> {
        let meta = obj.meta();
        let body = DynamicObject {
            types: Some(kube::api::TypeMeta { api_version: K::api_version(&()).into(), kind: K::kind(&()).into() }),
            metadata: ObjectMeta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                resource_version: meta.resource_version.clone(),
                ..Default::default()
            },
            data: serde_json::json!({ "status": status }),
        };
        let name = meta.name.clone().unwrap_or_default();
        Ok(self.typed(ctx.call(self.api.replace_status(&name, &post_params(), &body)).await?))
    }
}

/// Results of the quorum reads a plan asked for.
#[derive(Default)]
struct Reads {
    done: bool,
    /// Requests as read (by UID); their content is current.
    requests: BTreeMap<String, Arc<LockRequest>>,
    /// Request UIDs found gone.
    gone: HashSet<String>,
    /// Pods as read.
    pods: BTreeMap<String, PodInfo>,
    /// Pod names found gone.
    gone_pods: HashSet<String>,
}

impl Reads {
    /// Makes the reads; returns the Lock if it was read (None inside when it is gone).
    async fn run(
        &mut self,
        ctx: &Context,
        ns: &str,
        lock_name: &str,
        checks: &std::collections::BTreeSet<Check>,
    ) -> Result<Option<Option<Lock>>, Error> {
        self.done = true;
        let requests = Objects::new(ctx.client.clone(), ns, api::placeholder_request);
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
        let mut lock = None;
        for check in checks {
            ctx.metrics.confirm_reads.inc();
            match check {
                Check::Lock => {
                    let locks = Objects::new(ctx.client.clone(), ns, api::placeholder_lock);
                    lock = Some(locks.get_opt(ctx, lock_name).await?);
                }
                Check::Request { name, uid } => match requests.get_opt(ctx, name).await? {
                    Some(r) if r.uid().as_deref() == Some(uid.as_str()) => {
                        self.requests.insert(uid.clone(), Arc::new(r));
                    }
                    _ => {
                        ctx.cache.mark_request_gone(uid);
                        self.gone.insert(uid.clone());
                    }
                },
                Check::Pod(name) => match ctx.call(pods.get_opt(name)).await? {
                    Some(mut pod) => {
                        strip_pod(&mut pod);
                        self.pods.insert(name.clone(), pod_info(&pod));
                    }
                    None => {
                        self.gone_pods.insert(name.clone());
                    }
                },
            }
        }
        Ok(lock)
    }
}

fn object_reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    obj.object_ref(&())
}

/// Reconciles one Lock.
#[instrument(skip(lock, ctx), fields(lock = %lock.name_any(), ns = %lock.namespace().unwrap_or_default()))]
pub async fn reconcile(lock: Arc<Lock>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.cache.wait_synced().await;
    let _timer = ctx.metrics.reconcile_timer();
    let start = Instant::now();
    tracing::trace!("reconcile start");
    let key = ObjectRef::from_obj(lock.as_ref());
    let ns = lock.namespace().unwrap_or_default();
    let name = lock.name_any();
    let locks = Objects::new(ctx.client.clone(), &ns, api::placeholder_lock);
    // Read: the cache (or our own newer write).
    let cached = ctx.cache.locks.get(&key).unwrap_or(lock);
    let mut lock = ctx.newest(&key, cached);
    let mut lock_fresh = false;
    let mut reads = Reads::default();
    for _ in 0..MAX_ROUNDS {
        let uid = lock.uid().unwrap_or_default();
        let mut requests: Vec<Arc<LockRequest>> =
            ctx.cache.requests_for(&key).into_iter().map(|r| ctx.newest_request(r)).collect();
        for r in requests.iter_mut() {
            if let Some(read) = r.uid().and_then(|u| reads.requests.get(&u)) {
                *r = read.clone();
            }
        }
        let (mut pods, mut gone_pods) = ctx.cache.pods_for(&ns, &requests);
        pods.extend(reads.pods.clone());
        gone_pods.extend(reads.gone_pods.iter().cloned());
        let mut gone: HashSet<String> = reads.gone.clone();
        for h in lock.status.iter().flat_map(|s| &s.holders) {
            if ctx.cache.request_gone(&h.request_uid) {
                gone.insert(h.request_uid.clone());
            }
        }
        let fresh: HashSet<String> = reads.requests.keys().cloned().collect();
        let observations =
            ctx.observations.lock().expect("observations lock poisoned").get(&uid).cloned().unwrap_or_default();
        let arrival = ctx.cache.arrivals(&requests);
        // Plan: pure.
        let plan = planner::plan(Inputs {
            lock: &lock,
            lock_fresh,
            requests: &requests,
            fresh: &fresh,
            gone: &gone,
            pods: &pods,
            gone_pods: &gone_pods,
            arrival: &arrival,
            observations: &observations,
            settings: &ctx.settings,
            now: ctx.now(),
        });
        // Confirm: quorum reads before freeing anything on the word of a cache.
        if !plan.checks.is_empty() && !reads.done {
            debug!(checks = ?plan.checks, "confirming with quorum reads");
            match reads.run(&ctx, &ns, &name, &plan.checks).await? {
                Some(None) => return Ok(Action::await_change()), // the Lock is gone
                Some(Some(read)) => {
                    lock = Arc::new(read);
                    lock_fresh = true;
                }
                None => {}
            }
            continue;
        }
        if let Some(invalid) = &plan.invalid_spec {
            debug!(%invalid, "lock spec is invalid");
        }
        let by_uid: HashMap<String, Arc<LockRequest>> =
            requests.iter().filter_map(|r| Some((r.uid()?, r.clone()))).collect();
        // Fence the ends of grants on their requests before the Lock says so.
        if plan.lock_status.is_some() && !fence(&ctx, &ns, &by_uid, &plan, &mut reads).await? {
            continue; // a holder renewed (or went) meanwhile: plan again with what was read
        }
        // Compare-and-swap the Lock status.
        if let Some(status) = &plan.lock_status {
            match locks.replace_status(&ctx, &lock, status).await {
                Ok(written) => {
                    ctx.metrics.write("lock_status", "ok");
                    tracing::trace!(elapsed = ?start.elapsed(), "lock status written");
                    let written = Arc::new(written);
                    let replaced = lock.resource_version().unwrap_or_default();
                    ctx.written.lock().expect("written lock poisoned").insert(key.clone(), (replaced, written.clone()));
                    lock = written;
                }
                Err(Error::Kube(e)) if is_status(&e, 409) => {
                    ctx.metrics.write("lock_status", "conflict");
                    tracing::trace!(elapsed = ?start.elapsed(), "lock status conflict");
                    ctx.metrics.cas_conflicts.inc();
                    debug!("lock status changed under us; re-reading");
                    match locks.get_opt(&ctx, &name).await? {
                        Some(read) => {
                            lock = Arc::new(read);
                            lock_fresh = true;
                        }
                        None => return Ok(Action::await_change()),
                    }
                    continue;
                }
                Err(Error::Kube(e)) if is_status(&e, 404) => return Ok(Action::await_change()),
                Err(e) => {
                    ctx.metrics.write("lock_status", "error");
                    return Err(e);
                }
            }
        }
        // The decision is made: keep what was observed, then tell the requests.
        ctx.observations.lock().expect("observations lock poisoned").insert(uid.clone(), plan.observations.clone());
        let mirrored = mirror(&ctx, &ns, &by_uid, &plan).await;
        delete_finished(&ctx, &ns, &plan).await;
        record(&ctx, &lock, &plan, &mirrored);
        tracing::trace!(elapsed = ?start.elapsed(), writes = plan.requests.len(), "reconcile done");
        // A failed mirror write is retried soon: no watch event would bring it back.
        let retry = (!mirrored.complete).then(|| ctx.started.elapsed() + MIRROR_RETRY);
        return Ok(ctx.mono_to_action(plan.wake_at.into_iter().chain(retry).min()));
    }
    Err(Error::Contention(MAX_ROUNDS))
}

/// Writes the `Expired` status of each grant the plan ends, with the resourceVersion the
/// plan read (see `planner::RequestUpdate::fence`). Returns false when one was refused (the
/// holder renewed or went meanwhile): its fresh version is in `reads`, plan again.
async fn fence(
    ctx: &Arc<Context>,
    ns: &str,
    by_uid: &HashMap<String, Arc<LockRequest>>,
    plan: &Plan,
    reads: &mut Reads,
) -> Result<bool, Error> {
    let objects = Objects::new(ctx.client.clone(), ns, api::placeholder_request);
    let mut all = true;
    for update in plan.requests.iter().filter(|u| u.fence) {
        let Some(current) = by_uid.get(&update.uid) else { continue };
        match objects.replace_status(ctx, current, &update.status).await {
            Ok(written) => {
                ctx.metrics.write("request_fence", "ok");
                let written = Arc::new(written);
                ctx.remember_request_write(current, written.clone());
                reads.requests.insert(update.uid.clone(), written);
            }
            Err(Error::Kube(e)) if is_status(&e, 409) || is_status(&e, 404) => {
                ctx.metrics.write("request_fence", "conflict");
                debug!(request = %update.name, "the holder changed before its expiry was fenced; planning again");
                all = false;
                match objects.get_opt(ctx, &update.name).await? {
                    Some(r) if r.uid().as_deref() == Some(update.uid.as_str()) => {
                        reads.requests.insert(update.uid.clone(), Arc::new(r));
                    }
                    _ => {
                        ctx.cache.mark_request_gone(&update.uid);
                        reads.gone.insert(update.uid.clone());
                    }
                }
            }
            Err(e) => {
                ctx.metrics.write("request_fence", "error");
                return Err(e);
            }
        }
    }
    Ok(all)
}

/// Writes request statuses (after the Lock status is written). New grants go first. A
/// conflict means the request changed: its watch event brings another reconcile.
async fn mirror(ctx: &Arc<Context>, ns: &str, by_uid: &HashMap<String, Arc<LockRequest>>, plan: &Plan) -> Mirrored {
    let api = Arc::new(Objects::new(ctx.client.clone(), ns, api::placeholder_request));
    let writes: Vec<(String, String, Arc<LockRequest>, LockRequestStatus)> = plan
        .requests
        .iter()
        .filter(|u| !u.fence) // written already, before the Lock status
        .filter_map(|u| Some((u.name.clone(), u.uid.clone(), by_uid.get(&u.uid)?.clone(), u.status.clone())))
        .collect();
    let writes = writes.into_iter().map(|(name, uid, current, status)| {
        let (ctx, api) = (ctx.clone(), api.clone());
        async move {
            let written = match api.replace_status(&ctx, &current, &status).await {
                Ok(written) => {
                    ctx.metrics.write("request_status", "ok");
                    ctx.remember_request_write(&current, written);
                    Some(true)
                }
                Err(Error::Kube(e)) if is_status(&e, 404) => Some(false), // gone: nothing to tell
                Err(Error::Kube(e)) if is_status(&e, 409) => {
                    // The request changed under us; a change of its status alone brings no
                    // reconcile, so retry soon.
                    ctx.metrics.write("request_status", "conflict");
                    debug!(request = %name, "request changed before its status was written");
                    None
                }
                Err(e) => {
                    ctx.metrics.write("request_status", "error");
                    warn!(request = %name, error = %e, "writing request status");
                    None
                }
            };
            (uid, written)
        }
    });
    let results: Vec<(String, Option<bool>)> =
        futures::stream::iter(writes).buffer_unordered(MIRROR_CONCURRENCY).collect().await;
    Mirrored {
        complete: results.iter().all(|(_, r)| r.is_some()),
        written: results.into_iter().filter(|(_, r)| *r == Some(true)).map(|(uid, _)| uid).collect(),
    }
}

/// What a mirror pass achieved.
struct Mirrored {
    /// Every write succeeded (or its request is gone).
    complete: bool,
    /// UIDs of the requests whose status was written.
    written: HashSet<String>,
}

impl Mirrored {
    /// Whether an event took effect: a Lock change did (its status was written), a request's
    /// own change only once its status is written (else the next plan proposes it again).
    fn happened(&self, e: &PlanEvent) -> bool {
        e.of_lock || self.written.contains(&e.request_uid)
    }
}

/// Deletes finished requests past their retention.
async fn delete_finished(ctx: &Arc<Context>, ns: &str, plan: &Plan) {
    let api: Api<LockRequest> = Api::namespaced(ctx.client.clone(), ns);
    let deletions: Vec<(String, String)> = plan.deletions.iter().map(|d| (d.name.clone(), d.uid.clone())).collect();
    for (name, uid) in deletions {
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
            ..Default::default()
        };
        match ctx.call(api.delete(&name, &dp)).await {
            Ok(_) => {
                ctx.metrics.write("request_delete", "ok");
                debug!(request = %name, "deleted finished request");
            }
            Err(Error::Kube(e)) if is_status(&e, 404) || is_status(&e, 409) => {}
            Err(e) => {
                ctx.metrics.write("request_delete", "error");
                warn!(request = %name, error = %e, "deleting finished request");
            }
        }
    }
}

/// Logs, metrics and events of a plan that took effect.
fn record(ctx: &Context, lock: &Lock, plan: &Plan, mirrored: &Mirrored) {
    let m = &ctx.metrics;
    let uid = lock.uid().unwrap_or_default();
    if let Some(status) = lock.status.as_ref() {
        m.queue_depth.set(ctx.waiting.set(&uid, i64::from(status.waiting)));
        m.holders.set(ctx.held.set(&uid, status.holders.len() as i64));
    }
    for e in plan.events.iter().filter(|e| mirrored.happened(e)) {
        log_event(e);
        match e.kind {
            EventKind::Granted => {
                m.grants.inc();
                if let Some(wait) = e.wait {
                    m.grant_latency.observe(wait.as_secs_f64());
                }
            }
            EventKind::Released => {
                m.releases.inc();
            }
            EventKind::Expired | EventKind::Broken => {
                m.expirations.get_or_create(&crate::telemetry::ReasonLabel { reason: e.reason.as_str() }).inc();
            }
            EventKind::Rejected => {
                m.rejections.get_or_create(&crate::telemetry::ReasonLabel { reason: e.reason.as_str() }).inc();
            }
        }
        if let Some(held) = e.held {
            m.hold_time.observe(held.as_secs_f64());
        }
        if let Some(sink) = &ctx.events {
            let related = ObjectReference {
                api_version: Some(LockRequest::api_version(&()).into()),
                kind: Some(LockRequest::kind(&()).into()),
                name: Some(e.request.clone()),
                namespace: lock.namespace(),
                uid: Some(e.request_uid.clone()),
                ..Default::default()
            };
            sink.publish(object_reference(lock), Some(related), e.clone());
        }
    }
}

fn log_event(e: &PlanEvent) {
    let token = e.token.unwrap_or_default();
    match e.kind {
        EventKind::Granted => info!(request = %e.request, holder = %e.holder, token, "lock granted"),
        EventKind::Released => info!(request = %e.request, holder = %e.holder, token, "lock released"),
        EventKind::Expired | EventKind::Broken => {
            warn!(request = %e.request, holder = %e.holder, token, reason = e.reason.as_str(), message = %e.message, "grant ended")
        }
        EventKind::Rejected => {
            warn!(request = %e.request, reason = e.reason.as_str(), message = %e.message, "request rejected")
        }
    }
}

/// Reconciles a request whose Lock is absent from the cache (never created, or deleted).
/// When the Lock exists the Lock reconcile owns the request and this does nothing.
#[instrument(skip(req, ctx), fields(request = %req.name_any(), ns = %req.namespace().unwrap_or_default()))]
pub async fn reconcile_orphan(req: Arc<LockRequest>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.cache.wait_synced().await;
    let lock_key = lock_key_of(&req);
    if ctx.cache.locks.get(&lock_key).is_some() {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_timer();
    let ns = req.namespace().unwrap_or_default();
    let lock_name = req.spec.lock_name.clone();
    let requests = [ctx.newest_request(ctx.cache.requests.get(&ObjectRef::from_obj(req.as_ref())).unwrap_or(req))];
    let mut gone_locks = ctx.cache.gone_locks();
    let mut plan = planner::plan_orphans(&lock_name, &requests, &gone_locks, &ctx.settings, ctx.now());
    if plan.checks.contains(&Check::Lock) {
        let locks = Objects::new(ctx.client.clone(), &ns, api::placeholder_lock);
        ctx.metrics.confirm_reads.inc();
        match locks.get_opt(&ctx, &lock_name).await? {
            // The cache lags: the Lock reconcile will see it.
            Some(lock) if lock.uid() == requests[0].status.as_ref().and_then(|s| s.lock_uid.clone()) => {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            _ => {
                // Gone, or a different Lock of that name: the granting one is gone.
                gone_locks.extend(requests[0].status.as_ref().and_then(|s| s.lock_uid.clone()));
                plan = planner::plan_orphans(&lock_name, &requests, &gone_locks, &ctx.settings, ctx.now());
            }
        }
    }
    let by_uid: HashMap<String, Arc<LockRequest>> =
        requests.iter().filter_map(|r| Some((r.uid()?, r.clone()))).collect();
    let mirrored = mirror(&ctx, &ns, &by_uid, &plan).await;
    delete_finished(&ctx, &ns, &plan).await;
    for e in plan.events.iter().filter(|e| mirrored.happened(e)) {
        log_event(e);
        if e.kind == EventKind::Expired {
            ctx.metrics
                .expirations
                .get_or_create(&crate::telemetry::ReasonLabel { reason: Reason::LockDeleted.as_str() })
                .inc();
        }
        if let Some(sink) = &ctx.events {
            sink.publish(object_reference(requests[0].as_ref()), None, e.clone());
        }
    }
    let retry = (!mirrored.complete).then(|| ctx.started.elapsed() + MIRROR_RETRY);
    Ok(ctx.mono_to_action(plan.wake_at.into_iter().chain(retry).min()))
}

/// Backs off on errors: a second for the first, growing with repeats is left to the next
/// watch event (any change of the Lock or its requests reconciles it again at once).
pub fn error_policy<K>(_obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&crate::telemetry::ErrorLabel { category: error.category() }).inc();
    warn!(error = %error, category = error.category(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}
