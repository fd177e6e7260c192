//! One reconcile of one Lock: read (caches) → plan (pure) → confirm (quorum reads, rarely)
//! → fence ends of grants → compare-and-swap `Lock.status` → mirror request statuses →
//! delete finished requests → record → requeue at the next deadline.
//!
//! And the orphan reconcile: requests whose Lock does not exist.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};
use tracing::{debug, instrument, warn};

pub use super::context::Context;
use super::{
    Error,
    cache::{lock_key_of, pod_info, strip_pod},
    record::{Regarding, record},
    writes::{Mirrored, Objects, delete_finished, fence, is_status, mirror},
};
use crate::{
    api::{self, Lock, LockRequest},
    planner::{self, Check, Inputs, PodInfo},
};

/// Plan/write rounds before a reconcile gives up on a contended Lock (and is retried).
const MAX_ROUNDS: usize = 8;
/// A failed request-status write is retried after this long.
const MIRROR_RETRY: Duration = Duration::from_millis(250);

/// Results of the quorum reads a plan asked for.
#[derive(Default)]
pub(super) struct Reads {
    done: bool,
    /// Requests as read (by UID); their content is current.
    pub requests: BTreeMap<String, Arc<LockRequest>>,
    /// Request UIDs found gone.
    pub gone: HashSet<String>,
    /// Pods as read.
    pods: BTreeMap<String, PodInfo>,
    /// Pods found gone (their last state unknown: not known to be stopped).
    gone_pods: HashMap<String, bool>,
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
                        self.gone_pods.insert(name.clone(), false);
                    }
                },
            }
        }
        Ok(lock)
    }
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
        let status = lock.status.clone().unwrap_or_default();
        let mut requests: Vec<Arc<LockRequest>> = ctx.cache.requests_for(&key);
        // A holder's (or draining grant's) request that names another Lock now still
        // belongs to this one's decision.
        let granted: Vec<(&str, &str)> = status
            .holders
            .iter()
            .map(|h| (h.request.as_str(), h.request_uid.as_str()))
            .chain(status.draining.iter().map(|d| (d.request.as_str(), d.request_uid.as_str())))
            .collect();
        for (name, uid) in &granted {
            if !requests.iter().any(|r| r.uid().as_deref() == Some(*uid))
                && let Some(r) = ctx.cache.request(&ns, name).filter(|r| r.uid().as_deref() == Some(*uid))
            {
                requests.push(r);
            }
        }
        for r in requests.iter_mut() {
            *r = ctx.newest_request(r.clone());
            if let Some(read) = r.uid().and_then(|u| reads.requests.get(&u)) {
                *r = read.clone();
            }
        }
        let pod_refs = requests
            .iter()
            .filter_map(|r| r.spec.pod_ref.as_ref())
            .chain(status.holders.iter().filter_map(|h| h.pod_ref.as_ref()))
            .chain(status.draining.iter().filter_map(|d| d.pod_ref.as_ref()));
        let (mut pods, mut gone_pods) = ctx.cache.pods_for(&ns, pod_refs);
        pods.extend(reads.pods.clone());
        for (name, stopped) in &reads.gone_pods {
            gone_pods.entry(name.clone()).or_insert(*stopped);
        }
        let mut gone: HashSet<String> = reads.gone.clone();
        let mut released: HashSet<String> = HashSet::new();
        for (_, uid) in &granted {
            if let Some(was_released) = ctx.cache.request_gone(uid) {
                gone.insert(uid.to_string());
                if was_released {
                    released.insert(uid.to_string());
                }
            }
        }
        let foreign: HashSet<String> = requests
            .iter()
            .filter_map(|r| r.status.as_ref()?.lock_uid.clone())
            .filter(|u| Some(u.as_str()) != lock.uid().as_deref())
            .collect();
        let other_locks = ctx.cache.existing_locks(&ns, &foreign);
        let pods_unreadable = ctx.cache.pods_unreadable();
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
            released: &released,
            pods: &pods,
            gone_pods: &gone_pods,
            pods_unreadable: pods_unreadable.as_deref(),
            other_locks: &other_locks,
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
        // Before its first grant, the Lock takes the finalizer that keeps it, once deleted,
        // until its grants drained (then plan again on the patched version).
        if lock.metadata.deletion_timestamp.is_none()
            && !has_finalizer(&lock)
            && plan.lock_status.as_ref().is_some_and(takes_permits)
        {
            lock = match set_finalizer(&ctx, &locks, &lock, true).await? {
                Some(patched) => Arc::new(patched),
                None => match locks.get_opt(&ctx, &name).await? {
                    Some(read) => Arc::new(read),
                    None => return Ok(Action::await_change()),
                },
            };
            lock_fresh = true;
            continue;
        }
        // Fence the ends of grants on their requests before the Lock says so; also with no
        // Lock write, for a draining grant whose end is not on its request yet.
        let fences = plan.lock_status.is_some() || plan.requests.iter().any(|u| u.fence);
        if fences && !fence(&ctx, &ns, &by_uid, &plan, &mut reads).await? {
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
        // A Lock being deleted goes once nothing it granted takes permits any more (a
        // conflict: the watch brings the newer version, and with it another reconcile).
        if may_go(&lock) {
            set_finalizer(&ctx, &locks, &lock, false).await?;
        }
        // The decision is made: keep what was observed, then tell the requests.
        ctx.observations.lock().expect("observations lock poisoned").insert(uid.clone(), plan.observations.clone());
        let mirrored = mirror(&ctx, &ns, &by_uid, &plan).await;
        delete_finished(&ctx, &ns, &plan).await;
        record(&ctx, Regarding::Lock(&lock), &plan, &mirrored);
        tracing::trace!(elapsed = ?start.elapsed(), writes = plan.requests.len(), "reconcile done");
        return Ok(ctx.mono_to_action(plan.wake_at.into_iter().chain(mirror_again(&ctx, &mirrored)).min()));
    }
    Err(Error::Contention(MAX_ROUNDS))
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
    record(&ctx, Regarding::Request(&requests[0]), &plan, &mirrored);
    Ok(ctx.mono_to_action(plan.wake_at.into_iter().chain(mirror_again(&ctx, &mirrored)).min()))
}

/// When to reconcile again for the mirror writes: at once for those left over, soon for a
/// failed one (no watch event would bring it back).
fn mirror_again(ctx: &Context, mirrored: &Mirrored) -> Option<Duration> {
    if mirrored.more {
        Some(ctx.started.elapsed())
    } else {
        (!mirrored.complete).then(|| ctx.started.elapsed() + MIRROR_RETRY)
    }
}

/// Counts a failed reconcile by its error category and retries it after a second (a change
/// of the Lock or of its requests reconciles it again sooner, through the watches).
pub fn error_policy<K>(_obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&crate::telemetry::ErrorLabel { category: error.category() }).inc();
    warn!(error = %error, category = error.category(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

fn has_finalizer(lock: &Lock) -> bool {
    lock.finalizers().iter().any(|f| f == api::LOCK_FINALIZER)
}

fn takes_permits(status: &api::LockStatus) -> bool {
    !status.holders.is_empty() || !status.draining.is_empty()
}

/// Whether a Lock being deleted may go (its finalizer removed): nothing it granted takes
/// permits any more, as far as its status can be read in full (a grant it cannot read is
/// a grant still).
fn may_go(lock: &Lock) -> bool {
    lock.metadata.deletion_timestamp.is_some()
        && has_finalizer(lock)
        && !lock.status.as_ref().is_some_and(takes_permits)
        && !planner::grants_unreadable(lock)
}

/// Adds (`on`) or removes the controller's finalizer as of the version read; `None` when the
/// Lock changed meanwhile or is gone.
async fn set_finalizer(ctx: &Context, locks: &Objects<Lock>, lock: &Lock, on: bool) -> Result<Option<Lock>, Error> {
    let mut finalizers: Vec<String> = lock.finalizers().iter().filter(|f| *f != api::LOCK_FINALIZER).cloned().collect();
    if on {
        finalizers.push(api::LOCK_FINALIZER.to_string());
    }
    match locks.set_finalizers(ctx, lock, finalizers).await {
        Ok(patched) => {
            ctx.metrics.write("lock_finalizer", "ok");
            Ok(Some(patched))
        }
        Err(Error::Kube(e)) if is_status(&e, 409) || is_status(&e, 404) => {
            ctx.metrics.write("lock_finalizer", "conflict");
            Ok(None)
        }
        Err(e) => {
            ctx.metrics.write("lock_finalizer", "error");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deleting_lock(status: serde_json::Value) -> Lock {
        let value = serde_json::json!({
            "apiVersion": "kubelock.dev/v1alpha1", "kind": "Lock",
            "metadata": {"name": "db", "namespace": "ns", "uid": "lock-uid", "generation": 1,
                         "finalizers": [api::LOCK_FINALIZER], "deletionTimestamp": "2027-01-15T08:00:00Z"},
            "spec": {"permits": 1, "leaseDuration": "30s"},
            "status": status,
        });
        api::lenient(value, api::placeholder_lock)
    }

    /// The finalizer keeps a deleted Lock, and so the record of its grants, until they are
    /// free: a grant the controller cannot read (a value beyond the Rust types, which the
    /// schema's plain `integer` admits) is still a grant, and the Lock must not go with it.
    #[test]
    fn a_deleted_lock_with_grants_it_cannot_read_keeps_its_finalizer() {
        let entry = |what: &str| {
            let mut e = serde_json::json!({
                "request": "r0", "requestUID": "u0", "holder": "h0", "permits": i64::from(i32::MAX) + 1,
                "token": 7, "leaseDuration": "30s"});
            if what == "draining" {
                e["reason"] = "Deleted".into();
                e["endedAt"] = "2027-01-15T08:00:00.000000Z".into();
            } else {
                e["grantedAt"] = "2027-01-15T08:00:00.000000Z".into();
            }
            e
        };
        for what in ["holders", "draining"] {
            let lock = deleting_lock(serde_json::json!({"fencingToken": 7, what: [entry(what)]}));
            assert!(api::malformed(&lock).is_some_and(|m| m.contains(what)), "{:?}", api::malformed(&lock));
            assert!(!may_go(&lock), "the Lock goes with an unreadable entry of status.{what}");
        }
        // Once nothing takes permits, it goes; not before.
        assert!(may_go(&deleting_lock(serde_json::json!({"fencingToken": 7}))));
        let held = deleting_lock(serde_json::json!({"fencingToken": 7, "holders": [{
            "request": "r0", "requestUID": "u0", "holder": "h0", "permits": 1, "token": 7,
            "leaseDuration": "30s", "grantedAt": "2027-01-15T08:00:00.000000Z"}]}));
        assert!(!may_go(&held));
    }
}
