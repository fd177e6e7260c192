//! The controller's view of the cluster: watch-fed stores of Locks, LockRequests and Pods,
//! an index of requests by Lock (and by pod), and tombstones of observed deletions.
//!
//! Objects are stripped before they are cached (no `managedFields`, no last-applied
//! annotation; pods keep only name, UID and phase), so 10,000 Locks fit in a small pod.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Pod, PodSpec, PodStatus};
use kube::{
    Resource, ResourceExt,
    api::ObjectMeta,
    runtime::{
        reflector::{ObjectRef, Store},
        watcher,
    },
};

use crate::{
    api::{Lock, LockRequest},
    planner::PodInfo,
};

/// How long an observed deletion is remembered.
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// The annotation `kubectl apply` writes: can be large and is never needed here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what the controller never reads from a cached object's metadata.
pub fn strip_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// Reduces a pod to what `podRef` checks need: name, namespace, UID, deletion, the node it
/// was bound to, its phase, and whether each container runs (not why or since when).
pub fn strip_pod(pod: &mut Pod) {
    let meta = ObjectMeta {
        name: pod.metadata.name.take(),
        namespace: pod.metadata.namespace.take(),
        uid: pod.metadata.uid.take(),
        resource_version: pod.metadata.resource_version.take(),
        deletion_timestamp: pod.metadata.deletion_timestamp.take(),
        ..Default::default()
    };
    let node_name = pod.spec.as_mut().and_then(|s| s.node_name.take());
    // A running container keeps an empty `running` state, a terminated one an empty
    // `terminated` one; a waiting one neither.
    let strip = |statuses: Option<Vec<ContainerStatus>>| {
        statuses.map(|list| {
            list.into_iter()
                .map(|c| {
                    let running = c.state.as_ref().and_then(|s| s.running.as_ref()).map(|_| Default::default());
                    let terminated = c.state.and_then(|s| s.terminated).map(|_| Default::default());
                    ContainerStatus {
                        name: c.name,
                        state: Some(ContainerState { running, terminated, ..Default::default() }),
                        ..Default::default()
                    }
                })
                .collect()
        })
    };
    let status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        container_statuses: strip(s.container_statuses),
        init_container_statuses: strip(s.init_container_statuses),
        ..Default::default()
    });
    let spec = node_name.map(|n| PodSpec { node_name: Some(n), ..Default::default() });
    *pod = Pod { metadata: meta, spec, status };
}

/// The key of a Lock: namespace and name.
pub type LockKey = ObjectRef<Lock>;

/// The Lock a request names.
pub fn lock_key_of(req: &LockRequest) -> LockKey {
    let key = ObjectRef::new(&req.spec.lock_name);
    match req.namespace() {
        Some(ns) => key.within(&ns),
        None => key,
    }
}

/// A pod key: namespace and name.
type PodKey = (String, String);

#[derive(Default)]
struct Index {
    /// Request names by the Lock they name.
    by_lock: HashMap<LockKey, BTreeSet<String>>,
    /// The Lock (and pod) each request is filed under, and what the Lock reconcile reads
    /// of its metadata.
    filed: HashMap<ObjectRef<LockRequest>, (LockKey, Option<PodKey>, Fingerprint)>,
    /// Locks with a request naming this pod.
    by_pod: HashMap<PodKey, HashSet<LockKey>>,
    /// Per request UID, the order in which the watch first delivered it.
    arrival: HashMap<String, u64>,
    next_arrival: u64,
}

impl Index {
    fn remove(&mut self, key: &ObjectRef<LockRequest>) -> Option<LockKey> {
        let (lock, pod, _) = self.filed.remove(key)?;
        if let Some(names) = self.by_lock.get_mut(&lock) {
            names.remove(&key.name);
            if names.is_empty() {
                self.by_lock.remove(&lock);
            }
        }
        if let Some(pod) = pod
            && let Some(locks) = self.by_pod.get_mut(&pod)
        {
            locks.remove(&lock);
            if locks.is_empty() {
                self.by_pod.remove(&pod);
            }
        }
        Some(lock)
    }

    fn insert(&mut self, req: &LockRequest) -> LockKey {
        if let Some(uid) = req.uid() {
            let next = &mut self.next_arrival;
            self.arrival.entry(uid).or_insert_with(|| {
                *next += 1;
                *next
            });
        }
        let key = ObjectRef::from_obj(req);
        self.remove(&key);
        let lock = lock_key_of(req);
        let pod = req.spec.pod_ref.as_ref().map(|p| (req.namespace().unwrap_or_default(), p.name.clone()));
        self.by_lock.entry(lock.clone()).or_default().insert(key.name.clone());
        if let Some(pod) = &pod {
            self.by_pod.entry(pod.clone()).or_default().insert(lock.clone());
        }
        self.filed.insert(key, (lock.clone(), pod, Fingerprint::of(req)));
        lock
    }
}

/// What of a request, besides its status, matters to its Lock: a change of anything else
/// (its status, written by the controller itself) does not reconcile the Lock again.
#[derive(Clone, PartialEq, Eq)]
struct Fingerprint {
    uid: Option<String>,
    generation: Option<i64>,
    deleting: bool,
    break_request: Option<String>,
    released: bool,
}

impl Fingerprint {
    fn of(req: &LockRequest) -> Self {
        Self {
            uid: req.metadata.uid.clone(),
            generation: req.metadata.generation,
            deleting: req.metadata.deletion_timestamp.is_some(),
            break_request: req.annotations().get(crate::api::BREAK_ANNOTATION).cloned(),
            released: req.spec.released,
        }
    }
}

/// Deletions observed: when, and what the last state said.
#[derive(Default)]
struct Tombstones {
    /// Per request UID: whether its last state carried `spec.released` (unknown: false).
    requests: HashMap<String, (Instant, bool)>,
    locks: HashMap<String, Instant>,
    /// Per pod name: the UID of the pod deleted under it, and whether its last state showed
    /// it stopped (unknown: false).
    pods: HashMap<PodKey, (Instant, String, bool)>,
}

impl Tombstones {
    fn prune(&mut self) {
        let cutoff = Instant::now().checked_sub(TOMBSTONE_TTL);
        if let Some(cutoff) = cutoff {
            self.requests.retain(|_, (t, _)| *t > cutoff);
            self.locks.retain(|_, t| *t > cutoff);
            self.pods.retain(|_, (t, _, _)| *t > cutoff);
        }
    }
}

/// Stores, index and tombstones, shared by the watch tasks and the reconcilers.
pub struct Cache {
    /// Locks.
    pub locks: Store<Lock>,
    /// LockRequests.
    pub requests: Store<LockRequest>,
    /// Pods (stripped), when pods are watched.
    pub pods: Option<Store<Pod>>,
    index: Mutex<Index>,
    tombstones: Mutex<Tombstones>,
    /// First list done: locks, requests, pods.
    synced: [AtomicBool; 3],
    /// Why pods cannot be watched, while they cannot (RBAC, or the API is missing).
    pods_unreadable: Mutex<Option<String>>,
    /// True once all three are.
    all_synced: tokio::sync::watch::Sender<bool>,
}

impl Cache {
    /// A cache over these reflector stores.
    pub fn new(locks: Store<Lock>, requests: Store<LockRequest>, pods: Option<Store<Pod>>) -> Self {
        let pods_synced = AtomicBool::new(pods.is_none());
        Self {
            locks,
            requests,
            pods,
            index: Mutex::default(),
            tombstones: Mutex::default(),
            synced: [AtomicBool::new(false), AtomicBool::new(false), pods_synced],
            pods_unreadable: Mutex::new(None),
            all_synced: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The requests naming this Lock.
    pub fn requests_for(&self, lock: &LockKey) -> Vec<Arc<LockRequest>> {
        let names: Vec<String> = {
            let index = self.index.lock().expect("index lock poisoned");
            index.by_lock.get(lock).map(|n| n.iter().cloned().collect()).unwrap_or_default()
        };
        let ns = lock.namespace.clone().unwrap_or_default();
        names
            .iter()
            .filter_map(|name| self.requests.get(&ObjectRef::new(name).within(&ns)))
            .filter(|r| r.spec.lock_name == lock.name)
            .collect()
    }

    /// Request names filed under this Lock (for the orphan controller).
    pub fn request_refs_for(&self, lock: &LockKey) -> Vec<ObjectRef<LockRequest>> {
        let ns = lock.namespace.clone().unwrap_or_default();
        let index = self.index.lock().expect("index lock poisoned");
        index
            .by_lock
            .get(lock)
            .map(|n| n.iter().map(|name| ObjectRef::new(name).within(&ns)).collect())
            .unwrap_or_default()
    }

    /// Files a request change (after the reflector stored it); returns the Locks to reconcile.
    pub fn on_request_event(&self, event: &watcher::Event<LockRequest>) -> Vec<LockKey> {
        let mut index = self.index.lock().expect("index lock poisoned");
        match event {
            watcher::Event::Apply(req) => {
                let old = index.filed.get(&ObjectRef::from_obj(req)).map(|(l, _, f)| (l.clone(), f.clone()));
                if let Some((lock, fingerprint)) = &old
                    && *lock == lock_key_of(req)
                    && *fingerprint == Fingerprint::of(req)
                    && index.filed.get(&ObjectRef::from_obj(req)).map(|(_, p, _)| p.clone())
                        == Some(
                            req.spec.pod_ref.as_ref().map(|p| (req.namespace().unwrap_or_default(), p.name.clone())),
                        )
                {
                    return Vec::new(); // only its status changed
                }
                let old = old.map(|(l, _)| l);
                let new = index.insert(req);
                let mut keys: Vec<LockKey> = old.into_iter().filter(|o| *o != new).collect();
                keys.push(new);
                keys
            }
            watcher::Event::Delete(req) => {
                if let Some(uid) = req.uid() {
                    let released = req.spec.released;
                    let mut tombstones = self.tombstones.lock().expect("tombstones lock poisoned");
                    tombstones.requests.insert(uid, (Instant::now(), released));
                }
                if let Some(uid) = req.uid() {
                    index.arrival.remove(&uid);
                }
                index.remove(&ObjectRef::from_obj(req)).into_iter().collect()
            }
            watcher::Event::InitDone => {
                self.mark_synced(1);
                // A (quorum) relist replaced the store: rebuild, and remember what vanished.
                let state = self.requests.state();
                let present: HashSet<String> = state.iter().filter_map(|r| r.uid()).collect();
                let mut vanished = Vec::new();
                for key in index.filed.keys() {
                    if let Some(uid) = key.extra.uid.as_ref().filter(|u| !present.contains(*u)) {
                        vanished.push(uid.clone());
                    }
                }
                // Keep the arrival order of requests still present; number the others in
                // (creationTimestamp, name) order, after them.
                let mut fresh = Index {
                    arrival: index
                        .arrival
                        .iter()
                        .filter(|(uid, _)| present.contains(*uid))
                        .map(|(u, n)| (u.clone(), *n))
                        .collect(),
                    next_arrival: index.next_arrival,
                    ..Index::default()
                };
                let mut sorted = state.clone();
                sorted.sort_by(|a, b| {
                    (&a.metadata.creation_timestamp, a.name_any()).cmp(&(&b.metadata.creation_timestamp, b.name_any()))
                });
                for req in &sorted {
                    fresh.insert(req);
                }
                let mut locks: HashSet<LockKey> = index.by_lock.keys().cloned().collect();
                locks.extend(fresh.by_lock.keys().cloned());
                *index = fresh;
                let mut tombstones = self.tombstones.lock().expect("tombstones lock poisoned");
                let now = Instant::now();
                for uid in vanished {
                    // Vanished during a relist: the last state is not known.
                    tombstones.requests.insert(uid, (now, false));
                }
                tombstones.prune();
                locks.into_iter().collect()
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => Vec::new(),
        }
    }

    /// The arrival order of these requests (see `planner::Inputs::arrival`).
    pub fn arrivals(&self, requests: &[Arc<LockRequest>]) -> HashMap<String, u64> {
        let index = self.index.lock().expect("index lock poisoned");
        requests
            .iter()
            .filter_map(|r| {
                let uid = r.uid()?;
                let n = *index.arrival.get(&uid)?;
                Some((uid, n))
            })
            .collect()
    }

    /// Records a Lock deletion; returns the requests that named it (for the orphan controller).
    pub fn on_lock_event(&self, event: &watcher::Event<Lock>) -> Vec<ObjectRef<LockRequest>> {
        match event {
            watcher::Event::Delete(lock) => {
                if let Some(uid) = lock.uid() {
                    self.tombstones.lock().expect("tombstones lock poisoned").locks.insert(uid, Instant::now());
                }
                self.request_refs_for(&ObjectRef::from_obj(lock))
            }
            watcher::Event::InitDone => {
                self.mark_synced(0);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Records a pod change; returns the Locks whose requests name the pod.
    pub fn on_pod_event(&self, event: &watcher::Event<Pod>) -> Vec<LockKey> {
        let index = self.index.lock().expect("index lock poisoned");
        let locks_of = |pod: &Pod| -> Vec<LockKey> {
            let key = (pod.namespace().unwrap_or_default(), pod.name_any());
            index.by_pod.get(&key).map(|l| l.iter().cloned().collect()).unwrap_or_default()
        };
        match event {
            watcher::Event::Apply(pod) => locks_of(pod),
            watcher::Event::Delete(pod) => {
                let key = (pod.namespace().unwrap_or_default(), pod.name_any());
                let info = pod_info(pod);
                let tombstone = (Instant::now(), info.uid, info.stopped);
                self.tombstones.lock().expect("tombstones lock poisoned").pods.insert(key, tombstone);
                locks_of(pod)
            }
            watcher::Event::InitDone => {
                self.mark_synced(2);
                index.by_pod.values().flatten().cloned().collect::<HashSet<_>>().into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Whether a request UID was seen deleted, and if so whether its last state carried
    /// `spec.released`.
    pub fn request_gone(&self, uid: &str) -> Option<bool> {
        self.tombstones.lock().expect("tombstones lock poisoned").requests.get(uid).map(|(_, released)| *released)
    }

    /// Records a request UID as deleted (a quorum read found it gone: its last state unknown).
    pub fn mark_request_gone(&self, uid: &str) {
        let mut tombstones = self.tombstones.lock().expect("tombstones lock poisoned");
        tombstones.requests.entry(uid.to_string()).or_insert((Instant::now(), false));
    }

    /// UIDs of deleted Locks seen recently.
    pub fn gone_locks(&self) -> HashSet<String> {
        self.tombstones.lock().expect("tombstones lock poisoned").locks.keys().cloned().collect()
    }

    /// What the caches know about the pods these references name: those present, and those
    /// seen deleted with whether their last state showed them stopped. A deletion of another
    /// pod of the name (another UID than the reference's) confirms nothing about this one.
    pub fn pods_for<'a>(
        &self,
        ns: &str,
        refs: impl IntoIterator<Item = &'a crate::api::PodRef>,
    ) -> (std::collections::BTreeMap<String, PodInfo>, HashMap<String, bool>) {
        let mut pods = std::collections::BTreeMap::new();
        let mut gone = HashMap::new();
        let Some(store) = &self.pods else { return (pods, gone) };
        let tombstones = self.tombstones.lock().expect("tombstones lock poisoned");
        for pod_ref in refs {
            let name = pod_ref.name.as_str();
            match store.get(&ObjectRef::new(name).within(ns)) {
                Some(pod) => {
                    pods.insert(name.to_string(), pod_info(&pod));
                }
                None => {
                    if let Some((_, uid, stopped)) = tombstones.pods.get(&(ns.to_string(), name.to_string())) {
                        let same = pod_ref.uid.as_ref().is_none_or(|u| u == uid);
                        let stopped = *stopped && same;
                        // Several references to one name: stopped only if every one agrees.
                        gone.entry(name.to_string()).and_modify(|s: &mut bool| *s &= stopped).or_insert(stopped);
                    }
                }
            }
        }
        (pods, gone)
    }

    /// A request of this namespace by name, if cached (a holder's request re-pointed to
    /// another Lock is no longer filed under this one).
    pub fn request(&self, ns: &str, name: &str) -> Option<Arc<LockRequest>> {
        self.requests.get(&ObjectRef::new(name).within(ns))
    }

    /// UIDs of the Locks of a namespace that exist, among `uids`.
    pub fn existing_locks(&self, ns: &str, uids: &HashSet<String>) -> HashSet<String> {
        if uids.is_empty() {
            return HashSet::new();
        }
        self.locks
            .state()
            .iter()
            .filter(|l| l.namespace().as_deref() == Some(ns))
            .filter_map(|l| l.uid())
            .filter(|u| uids.contains(u))
            .collect()
    }

    /// The Locks with a request bound to a pod.
    pub fn locks_with_pods(&self) -> Vec<LockKey> {
        let index = self.index.lock().expect("index lock poisoned");
        index.by_pod.values().flatten().cloned().collect::<HashSet<_>>().into_iter().collect()
    }

    /// Why pods cannot be watched now, if they cannot.
    pub fn pods_unreadable(&self) -> Option<String> {
        self.pods_unreadable.lock().expect("pods lock poisoned").clone()
    }

    /// Records that pods cannot be listed (`why`), or can again (`None`). While they cannot,
    /// the pod store does not hold back readiness: Locks whose requests have no pod are
    /// served, and requests bound to a pod wait with a condition that says why.
    pub fn set_pods_unreadable(&self, why: Option<String>) {
        let unreadable = why.is_some();
        *self.pods_unreadable.lock().expect("pods lock poisoned") = why;
        if unreadable {
            self.mark_synced(2);
        }
    }

    /// Whether every store has finished its first list.
    pub fn is_synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    fn mark_synced(&self, which: usize) {
        self.synced[which].store(true, Ordering::Release);
        if self.is_synced() {
            self.all_synced.send_replace(true);
        }
    }

    /// Waits until every store has finished its first list: before that, a Lock whose
    /// requests are not listed yet would look free.
    pub async fn wait_synced(&self) {
        let mut rx = self.all_synced.subscribe();
        let _ = rx.wait_for(|synced| *synced).await;
    }
}

/// The planner's view of a pod.
///
/// Stopped means no container of it runs, as the kubelet reported: it never reached a node
/// (no kubelet ever ran it), or it terminated (Succeeded or Failed: nothing runs again), or it
/// was being deleted and the kubelet reports every container terminated (during a graceful
/// deletion nothing is started again; a waiting container, e.g. in a crash loop on a node that
/// is cut off, might have been restarted since, so it does not count).
pub fn pod_info(pod: &Pod) -> PodInfo {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    let terminated = matches!(phase, Some("Succeeded" | "Failed"));
    let unbound = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none();
    let none_running = status.is_some_and(|s| {
        let all = s.container_statuses.iter().flatten().chain(s.init_container_statuses.iter().flatten());
        s.container_statuses.as_ref().is_some_and(|c| !c.is_empty())
            && all.into_iter().all(|c| c.state.as_ref().is_some_and(|st| st.terminated.is_some()))
    });
    let deleting = pod.metadata.deletion_timestamp.is_some();
    PodInfo {
        uid: pod.meta().uid.clone().unwrap_or_default(),
        terminated,
        stopped: terminated || unbound || (deleting && none_running),
    }
}

#[cfg(test)]
mod pod_tests {
    use k8s_openapi::{
        api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, PodSpec},
        apimachinery::pkg::apis::meta::v1::Time,
    };

    use super::*;

    fn deleting_pod(state: ContainerState) -> Pod {
        let mut pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                uid: Some("u".into()),
                deletion_timestamp: Some(Time(jiff::Timestamp::now())),
                ..Default::default()
            },
            spec: Some(PodSpec { node_name: Some("node".into()), ..Default::default() }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "app".into(),
                    state: Some(state),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        strip_pod(&mut pod); // as the cache keeps it
        pod
    }

    #[test]
    fn a_deleting_pod_is_stopped_only_once_every_container_terminated() {
        let terminated = ContainerState {
            terminated: Some(ContainerStateTerminated { exit_code: 0, ..Default::default() }),
            ..Default::default()
        };
        assert!(pod_info(&deleting_pod(terminated)).stopped);
        // Waiting (a crash loop's back-off) on a node that may be cut off: it may run again.
        let waiting = ContainerState { waiting: Some(ContainerStateWaiting::default()), ..Default::default() };
        assert!(!pod_info(&deleting_pod(waiting)).stopped);
        assert!(!pod_info(&deleting_pod(ContainerState::default())).stopped);
    }
}
