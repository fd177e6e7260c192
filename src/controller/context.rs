//! What every reconcile shares: the client, the caches, the settings, metrics, events, the
//! controller's monotonic clock, its observations per Lock, and its own recent writes (used
//! until the watch delivers them).

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::{
    ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{
    Error,
    cache::{Cache, LockKey},
    events::EventSink,
};
use crate::{
    api::{Lock, LockRequest},
    planner::{Now, Observations, Settings},
    telemetry::{Metrics, SumGauge},
};

/// How long a DELETE of ours is trusted to take effect before it is sent again.
pub(super) const DELETE_AGAIN_AFTER: Duration = Duration::from_secs(10);

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
    pub(super) started: Instant,
    /// Observations per Lock UID.
    pub(super) observations: Mutex<HashMap<String, Observations>>,
    /// Our last successful Lock status write, with the resourceVersion it replaced: used
    /// while the watch has not delivered it yet, to avoid a certain conflict.
    pub(super) written: Mutex<HashMap<LockKey, (String, Arc<Lock>)>>,
    /// The same for our request status writes, by request UID: the reconcile that follows a
    /// grant often starts before the watch delivers its mirror writes, and would otherwise
    /// write the same status again with a stale resourceVersion (a certain 409, then a retry).
    written_requests: Mutex<HashMap<String, (String, Arc<LockRequest>)>>,
    /// Requests we deleted, by UID, with when: until the watch reports them gone, every plan
    /// of their Lock (a waiter's status change, the next release) asks to delete them again,
    /// and each DELETE after the first is a certain 404, a write for nothing. Kept past the
    /// watch's delete event too: a reconcile that read its snapshot before the event still
    /// plans the deletion.
    deleted_requests: Mutex<HashMap<String, Instant>>,
    /// Requests waiting, per Lock (for the queue-depth gauge).
    pub(super) waiting: SumGauge,
    /// Grants held, per Lock.
    pub(super) held: SumGauge,
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
            deleted_requests: Mutex::default(),
            waiting: SumGauge::default(),
            held: SumGauge::default(),
        }
    }

    pub(super) fn now(&self) -> Now {
        Now { mono: self.started.elapsed(), wall: jiff::Timestamp::now() }
    }

    pub(super) fn mono_to_action(&self, wake_at: Option<Duration>) -> Action {
        match wake_at {
            Some(at) => Action::requeue(at.saturating_sub(self.started.elapsed()) + Duration::from_millis(1)),
            None => Action::await_change(),
        }
    }

    /// Bounds an API call by the request timeout.
    pub(super) async fn call<T>(&self, fut: impl Future<Output = Result<T, kube::Error>>) -> Result<T, Error> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(Error::Timeout(self.request_timeout)),
        }
    }

    /// The newest Lock we know: the cache's, or our own write if the cache has not caught up.
    pub(super) fn newest(&self, key: &LockKey, cached: Arc<Lock>) -> Arc<Lock> {
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
    pub(super) fn newest_request(&self, cached: Arc<LockRequest>) -> Arc<LockRequest> {
        let Some(uid) = cached.metadata.uid.as_deref() else { return cached };
        let written = self.written_requests.lock().expect("written requests lock poisoned");
        match written.get(uid) {
            Some((replaced, ours)) if cached.resource_version().as_deref() == Some(replaced.as_str()) => ours.clone(),
            _ => cached,
        }
    }

    /// Remembers our status write of `replaced` until the watch delivers it.
    pub(super) fn remember_request_write(&self, replaced: &LockRequest, written: impl Into<Arc<LockRequest>>) {
        if let (Some(uid), Some(version)) = (replaced.uid(), replaced.resource_version()) {
            self.written_requests
                .lock()
                .expect("written requests lock poisoned")
                .insert(uid, (version, written.into()));
        }
    }

    /// Whether our DELETE of this request is recent enough that it needs no other. After [`DELETE_AGAIN_AFTER`] it is sent again
    /// (something else may keep the object: a finalizer, a lost answer).
    pub(super) fn deleted_recently(&self, uid: &str) -> bool {
        let deleted = self.deleted_requests.lock().expect("deleted requests lock poisoned");
        deleted.get(uid).is_some_and(|at| at.elapsed() < DELETE_AGAIN_AFTER)
    }

    /// Remembers our successful DELETE of a request for [`DELETE_AGAIN_AFTER`].
    pub(super) fn remember_delete(&self, uid: &str) {
        let mut deleted = self.deleted_requests.lock().expect("deleted requests lock poisoned");
        if deleted.len() >= 1024 {
            deleted.retain(|_, at| at.elapsed() < DELETE_AGAIN_AFTER);
        }
        deleted.insert(uid.to_string(), Instant::now());
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
