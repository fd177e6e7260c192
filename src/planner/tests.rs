//! Unit tests for each planner rule, and property tests over random histories.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ObjectMeta;
use proptest::prelude::*;

use std::{sync::Arc, time::Duration};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt as _;

use super::{spec::uid_of, *};
use crate::api::{
    BREAK_ANNOTATION, BROKEN_BY_ANNOTATION, Lock, LockRequest, LockRequestSpec, LockRequestStatus, LockSpec,
    LockStatus, Phase, PodRef, Reason,
};

const T0: i64 = 1_800_000_000;

fn lock(permits: i32, lease: &str, delay: &str) -> Lock {
    let spec = LockSpec { permits, lease_duration: lease.into(), lock_delay: delay.into(), ..Default::default() };
    let mut lock = Lock::new("db", spec);
    lock.metadata.namespace = Some("ns".into());
    lock.metadata.uid = Some("lock-uid".into());
    lock.metadata.generation = Some(1);
    lock
}

fn request(name: &str, permits: i32, created: i64) -> LockRequest {
    LockRequest {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(1),
            creation_timestamp: Some(Time(Timestamp::from_second(T0 + created).unwrap())),
            ..Default::default()
        },
        spec: LockRequestSpec {
            lock_name: "db".into(),
            holder_identity: format!("holder-{name}"),
            permits,
            lease_duration: None,
            renew_time: None,
            pod_ref: None,
            released: false,
        },
        status: None,
    }
}

/// A request whose status says the Lock of UID `lock_uid` granted it `token` for 30 s.
fn granted(name: &str, created: i64, lock_uid: &str, token: i64) -> LockRequest {
    let mut r = request(name, 1, created);
    r.status = Some(LockRequestStatus {
        phase: Some(Phase::Granted),
        token: Some(token),
        lock_uid: Some(lock_uid.into()),
        lease_duration: Some("30s".into()),
        ..Default::default()
    });
    r
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A small simulated controller around the planner: applies plans like the controller does.
struct World {
    lock: Lock,
    lock_fresh: bool,
    requests: Vec<Arc<LockRequest>>,
    obs: Observations,
    gone: HashSet<String>,
    released: HashSet<String>,
    fresh: HashSet<String>,
    pods: BTreeMap<String, PodInfo>,
    gone_pods: HashMap<String, bool>,
    pods_unreadable: Option<String>,
    other_locks: HashSet<String>,
    arrival: HashMap<String, u64>,
    settings: Settings,
    mono: Duration,
}

impl World {
    fn new(lock: Lock) -> Self {
        Self {
            lock,
            lock_fresh: true,
            requests: Vec::new(),
            obs: Observations::default(),
            gone: HashSet::new(),
            released: HashSet::new(),
            fresh: HashSet::new(),
            pods: BTreeMap::new(),
            gone_pods: HashMap::new(),
            pods_unreadable: None,
            other_locks: HashSet::new(),
            arrival: HashMap::new(),
            settings: Settings::default(),
            mono: secs(1000),
        }
    }

    fn now(&self) -> Now {
        // A wall clock with nanoseconds, as a real one has (the API stores microseconds).
        let nanos = i128::from(T0) * 1_000_000_000 + self.mono.as_nanos() as i128 + 123;
        Now { mono: self.mono, wall: Timestamp::from_nanosecond(nanos).unwrap() }
    }

    fn add(&mut self, r: LockRequest) {
        self.arrival.insert(uid_of(&r).to_string(), self.arrival.len() as u64);
        self.requests.push(Arc::new(r));
    }

    fn plan(&self) -> Plan {
        plan(Inputs {
            lock: &self.lock,
            lock_fresh: self.lock_fresh,
            requests: &self.requests,
            fresh: &self.fresh,
            gone: &self.gone,
            released: &self.released,
            pods: &self.pods,
            gone_pods: &self.gone_pods,
            pods_unreadable: self.pods_unreadable.as_deref(),
            other_locks: &self.other_locks,
            arrival: &self.arrival,
            observations: &self.obs,
            settings: &self.settings,
            now: self.now(),
        })
    }

    /// Plans and applies the result, answering the plan's checks like quorum reads would.
    fn step(&mut self) -> Plan {
        let mut p = self.plan();
        if !p.checks.is_empty() {
            for check in &p.checks {
                match check {
                    Check::Request { uid, .. } => {
                        if self.requests.iter().any(|r| uid_of(r) == uid) {
                            self.fresh.insert(uid.clone());
                        } else {
                            self.gone.insert(uid.clone());
                        }
                    }
                    Check::Pod(name) => {
                        if !self.pods.contains_key(name) {
                            // A quorum read's 404 says nothing of how the pod ended.
                            self.gone_pods.entry(name.clone()).or_insert(false);
                        }
                    }
                    Check::Lock => {}
                }
            }
            p = self.plan();
            self.fresh.clear();
        }
        self.apply(&p);
        p
    }

    fn apply(&mut self, p: &Plan) {
        // Through JSON, as the API server stores and returns them (times to the microsecond).
        fn stored<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
            serde_json::from_value(serde_json::to_value(v).unwrap()).unwrap()
        }
        if let Some(status) = &p.lock_status {
            self.lock.status = Some(stored(status));
        }
        for u in &p.requests {
            let r = self.requests.iter_mut().find(|r| uid_of(r) == u.uid).expect("update for a known request");
            Arc::make_mut(r).status = Some(stored(&u.status));
        }
        let deleted: HashSet<&str> = p.deletions.iter().map(|d| d.uid.as_str()).collect();
        self.requests.retain(|r| !deleted.contains(uid_of(r)));
        self.obs = p.observations.clone();
    }

    /// A delete by someone else than the holder (no `spec.released` before it).
    fn delete(&mut self, name: &str) {
        let uid = format!("uid-{name}");
        self.requests.retain(|r| uid_of(r) != uid);
        self.gone.insert(uid);
    }

    /// The holder's own release: `spec.released`, then the delete (seen together).
    fn release(&mut self, name: &str) {
        let uid = format!("uid-{name}");
        self.requests.retain(|r| uid_of(r) != uid);
        self.gone.insert(uid.clone());
        self.released.insert(uid);
    }

    /// The holder marks its request released; the delete has not been seen yet.
    fn mark_released(&mut self, name: &str) {
        let r = self.requests.iter_mut().find(|r| r.name_any() == name).unwrap();
        let r = Arc::make_mut(r);
        r.spec.released = true;
        r.metadata.generation = Some(r.metadata.generation.unwrap_or(0) + 1);
    }

    fn token(&self, name: &str) -> i64 {
        self.req(name).status.as_ref().and_then(|s| s.token).expect("a token")
    }

    fn taken(&self) -> i64 {
        self.lock.taken_permits()
    }

    fn renew(&mut self, name: &str) {
        let r = self.requests.iter_mut().find(|r| r.name_any() == name).unwrap();
        let r = Arc::make_mut(r);
        r.metadata.generation = Some(r.metadata.generation.unwrap_or(0) + 1);
    }

    fn status(&self) -> LockStatus {
        self.lock.status.clone().unwrap_or_default()
    }

    fn holders(&self) -> Vec<String> {
        self.status().holders.iter().map(|h| h.request.clone()).collect()
    }

    fn phase(&self, name: &str) -> Phase {
        self.req(name).phase()
    }

    fn req(&self, name: &str) -> &LockRequest {
        self.requests.iter().find(|r| r.name_any() == name).unwrap()
    }

    fn reason(&self, name: &str) -> String {
        self.req(name).status.as_ref().unwrap().conditions[0].reason.clone()
    }
}

#[test]
fn mutex_grants_the_first_request_and_queues_the_rest() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("b", 1, 2));
    w.add(request("a", 1, 1));
    let p = w.step();
    assert_eq!(w.holders(), ["a"]);
    // The first token is the wall clock in milliseconds (the floor), and the request has it.
    assert_eq!(w.status().fencing_token, w.now().wall.as_millisecond());
    assert_eq!(w.status().waiting, 1);
    assert_eq!(w.status().queue, ["b"]);
    assert_eq!(w.phase("a"), Phase::Granted);
    assert_eq!(w.token("a"), w.status().fencing_token);
    assert_eq!(w.req("b").status.as_ref().unwrap().position, Some(0));
    assert!(p.requests[0].granted, "the new grant is mirrored first");
    assert_eq!(p.events.iter().filter(|e| e.kind == EventKind::Granted).count(), 1);
}

#[test]
fn fifo_is_by_creation_time_first() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("z-late", 1, 5)); // seen first, created last
    w.add(request("b", 1, 1));
    w.add(request("a", 1, 1));
    w.step();
    assert_eq!(w.holders(), ["b"]);
    assert_eq!(w.status().queue, ["a", "z-late"]);
}

#[test]
fn within_one_second_the_watch_order_decides_not_the_name() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("holder", 1, 1));
    w.add(request("zulu", 1, 2)); // arrived first
    w.add(request("alpha", 1, 2));
    w.step();
    assert_eq!(w.status().queue, ["zulu", "alpha"]);
    w.arrival.clear(); // unknown arrival (after a restart): by name
    w.step();
    assert_eq!(w.status().queue, ["alpha", "zulu"]);
}

#[test]
fn clean_release_hands_over_at_once_without_lock_delay() {
    let mut w = World::new(lock(1, "30s", "10s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    let first = w.token("a");
    w.release("a");
    let p = w.step();
    assert_eq!(w.holders(), ["b"]);
    assert!(w.status().fencing_token > first);
    assert!(w.status().delayed_until.is_none());
    assert!(p.events.iter().any(|e| e.kind == EventKind::Released && e.request == "a"));
}

#[test]
fn a_holder_missing_from_the_cache_is_kept_until_a_read_confirms() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    // The cache lost "a" but no deletion was seen.
    w.requests.retain(|r| r.name_any() != "a");
    let p = w.plan();
    assert!(p.checks.contains(&Check::Request { name: "a".into(), uid: "uid-a".into() }));
    assert!(p.lock_status.is_none(), "nothing changes before the read");
    assert!(p.requests.is_empty());
}

#[test]
fn a_silent_holder_expires_after_its_lease_and_not_before() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    let p = w.step();
    assert_eq!(p.wake_at, Some(w.mono + secs(30)));
    w.mono += secs(29);
    w.step();
    assert_eq!(w.holders(), ["a"]);
    w.mono += secs(1);
    // Without a quorum read the plan only asks for one.
    let asked = w.plan();
    assert!(asked.checks.contains(&Check::Request { name: "a".into(), uid: "uid-a".into() }));
    assert!(asked.lock_status.is_none());
    let p = w.step();
    assert_eq!(w.holders(), ["b"]);
    assert_eq!(w.phase("a"), Phase::Expired);
    assert_eq!(w.reason("a"), "LeaseExpired");
    assert!(w.token("a") < w.token("b"), "the loser keeps its token");
    assert!(p.events.iter().any(|e| e.kind == EventKind::Expired && e.reason == Reason::LeaseExpired));
}

#[test]
fn an_expiry_is_fenced_on_the_request_before_the_lock_says_so() {
    let mut w = World::new(lock(1, "10s", "5s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    w.mono += secs(10);
    w.fresh.insert("uid-a".into());
    let p = w.plan();
    let a = p.requests.iter().find(|u| u.name == "a").unwrap();
    assert!(a.fence && a.status.phase == Some(Phase::Expired), "{a:?}");
    assert!(p.requests.iter().filter(|u| u.name != "a").all(|u| !u.fence));
    // The fence was written, the Lock write was not (a conflict, or a crash): the next plan
    // finishes the grant from the request's status, lock delay and event included.
    let r = w.requests.iter_mut().find(|r| r.name_any() == "a").unwrap();
    Arc::make_mut(r).status = Some(a.status.clone());
    w.fresh.clear();
    let p = w.plan();
    let status = p.lock_status.expect("the grant ends");
    assert!(status.holders.is_empty());
    assert!(status.delayed_until.is_some(), "the lock delay starts");
    assert!(p.requests.iter().all(|u| u.name != "a"), "nothing more to write on a");
    let e = p.events.iter().find(|e| e.request == "a").expect("an event");
    assert_eq!((e.kind, e.reason, e.of_lock), (EventKind::Expired, Reason::LeaseExpired, true));
}

#[test]
fn renewals_restart_the_countdown() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.step();
    for _ in 0..5 {
        w.mono += secs(20);
        w.renew("a");
        w.step();
        assert_eq!(w.holders(), ["a"]);
    }
    w.mono += secs(29);
    w.step();
    assert_eq!(w.holders(), ["a"]);
    w.mono += secs(1);
    w.step();
    assert!(w.holders().is_empty());
}

#[test]
fn a_renewal_found_by_the_confirming_read_saves_the_holder() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.step();
    w.mono += secs(31);
    // The watch lagged: the renewal is only visible to the quorum read.
    w.renew("a");
    w.fresh.insert("uid-a".into());
    let p = w.plan();
    assert!(p.lock_status.is_none(), "no expiry: {p:?}");
    assert_eq!(p.observations.renewals["uid-a"].at, w.mono);
}

#[test]
fn a_restarted_controller_counts_the_lease_from_its_restart() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.step();
    w.mono += secs(100);
    w.obs = Observations::default(); // restart: memory lost
    w.step();
    assert_eq!(w.holders(), ["a"]);
    w.mono += secs(29);
    w.step();
    assert_eq!(w.holders(), ["a"]);
    w.mono += secs(1);
    w.step();
    assert!(w.holders().is_empty());
}

#[test]
fn lock_delay_follows_an_expiry() {
    let mut w = World::new(lock(1, "10s", "5s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    w.mono += secs(10);
    let p = w.step();
    assert!(w.holders().is_empty());
    assert!(w.status().delayed_until.is_some());
    assert_eq!(p.wake_at, Some(w.mono + secs(5)));
    assert_eq!(w.reason("b"), "LockDelay");
    w.mono += secs(4);
    w.step();
    assert!(w.holders().is_empty());
    w.mono += secs(1);
    w.step();
    assert_eq!(w.holders(), ["b"]);
    assert!(w.status().delayed_until.is_none());
}

#[test]
fn lock_delay_restarts_in_full_after_a_controller_restart() {
    let mut w = World::new(lock(1, "10s", "5s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    w.mono += secs(10);
    w.step();
    w.mono += secs(4);
    w.obs = Observations::default();
    w.step();
    assert!(w.holders().is_empty(), "late, never early");
    w.mono += secs(4);
    w.step();
    assert!(w.holders().is_empty());
    w.mono += secs(1);
    w.step();
    assert_eq!(w.holders(), ["b"]);
}

#[test]
fn semaphore_grants_up_to_its_permits() {
    let mut w = World::new(lock(3, "30s", "0s"));
    for (i, n) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        w.add(request(n, 1, i as i64));
    }
    w.step();
    assert_eq!(w.holders(), ["a", "b", "c"]);
    assert_eq!(w.status().waiting, 2);
    let tokens: Vec<i64> = w.status().holders.iter().map(|h| h.token).collect();
    let floor = w.now().wall.as_millisecond();
    assert_eq!(tokens, [floor, floor + 1, floor + 2], "one plan: consecutive tokens from the floor");
    w.release("b");
    w.step();
    assert_eq!(w.holders(), ["a", "c", "d"]);
    assert_eq!(w.status().fencing_token, floor + 3);
}

#[test]
fn a_queued_writer_blocks_later_readers() {
    let mut w = World::new(lock(3, "30s", "0s"));
    w.add(request("r1", 1, 1));
    w.add(request("r2", 1, 2));
    w.add(request("writer", 3, 3));
    w.add(request("r3", 1, 4));
    w.step();
    assert_eq!(w.holders(), ["r1", "r2"], "r3 fits but must not overtake the writer");
    assert_eq!(w.status().queue, ["writer", "r3"]);
    w.release("r1");
    w.step();
    assert_eq!(w.holders(), ["r2"]);
    w.release("r2");
    w.step();
    assert_eq!(w.holders(), ["writer"]);
    w.release("writer");
    w.step();
    assert_eq!(w.holders(), ["r3"]);
}

#[test]
fn too_many_permits_is_rejected_with_the_field_named() {
    let mut w = World::new(lock(2, "30s", "0s"));
    w.add(request("big", 3, 1));
    w.add(request("ok", 1, 2));
    let p = w.step();
    assert_eq!(w.phase("big"), Phase::Rejected);
    assert_eq!(w.reason("big"), "TooManyPermits");
    assert!(w.req("big").status.as_ref().unwrap().message.as_ref().unwrap().contains("spec.permits 3"));
    assert_eq!(w.holders(), ["ok"]);
    assert!(p.events.iter().any(|e| e.kind == EventKind::Rejected));
}

#[test]
fn invalid_request_specs_are_rejected_naming_the_field() {
    let mut w = World::new(lock(2, "30s", "0s"));
    let mut bad = request("bad", 1, 1);
    bad.spec.lease_duration = Some("soon".into());
    w.add(bad);
    let mut zero = request("zero", 0, 1);
    zero.spec.permits = 0;
    w.add(zero);
    w.step();
    assert_eq!(w.phase("bad"), Phase::Rejected);
    assert!(w.req("bad").status.as_ref().unwrap().message.as_ref().unwrap().starts_with("spec.leaseDuration"));
    assert_eq!(w.phase("zero"), Phase::Rejected);
    assert!(w.req("zero").status.as_ref().unwrap().message.as_ref().unwrap().starts_with("spec.permits"));
}

#[test]
fn an_invalid_lock_spec_grants_nothing_and_says_why() {
    let mut w = World::new(lock(0, "30s", "0s"));
    w.add(request("a", 1, 1));
    let p = w.step();
    assert!(w.holders().is_empty());
    assert_eq!(w.phase("a"), Phase::Pending);
    assert_eq!(w.reason("a"), "InvalidLock");
    let ready = &w.status().conditions[0];
    assert_eq!((ready.type_.as_str(), ready.status.as_str(), ready.reason.as_str()), ("Ready", "False", "InvalidSpec"));
    assert!(ready.message.contains("spec.permits"));
    assert!(p.invalid_spec.is_some());
    let mut w = World::new(lock(1, "1y", "0s"));
    w.step();
    assert!(w.status().conditions[0].message.starts_with("spec.leaseDuration"));
}

#[test]
fn a_request_lease_is_capped_at_the_locks() {
    let mut w = World::new(lock(1, "30s", "0s"));
    let mut r = request("a", 1, 1);
    r.spec.lease_duration = Some("1h".into());
    w.add(r);
    w.step();
    assert_eq!(w.status().holders[0].lease_duration, "30s");
    assert_eq!(w.req("a").status.as_ref().unwrap().lease_duration.as_deref(), Some("30s"));
    let mut w = World::new(lock(1, "30s", "0s"));
    let mut r = request("a", 1, 1);
    r.spec.lease_duration = Some("5s".into());
    w.add(r);
    let p = w.step();
    assert_eq!(w.status().holders[0].lease_duration, "5s");
    assert_eq!(p.wake_at, Some(w.mono + secs(5)));
}

fn with_pod(mut r: LockRequest, pod: &str) -> LockRequest {
    r.spec.pod_ref = Some(PodRef { name: pod.into(), uid: Some(format!("pod-uid-{pod}")) });
    r
}

#[test]
fn a_holder_pod_that_vanished_unconfirmed_drains_for_its_lease() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.pods.insert("p1".into(), PodInfo { uid: "pod-uid-p1".into(), terminated: false, stopped: false });
    w.add(with_pod(request("a", 1, 1), "p1"));
    w.add(request("b", 1, 2));
    w.step();
    assert_eq!(w.holders(), ["a"]);
    w.mono += secs(10);
    w.pods.clear();
    // Missing from the cache only: a read must confirm first.
    assert!(w.plan().checks.contains(&Check::Pod("p1".into())));
    // The read says 404: gone, but nothing says its containers stopped (a force delete, a
    // lost node): it may still be running, so its permits drain for the rest of the lease.
    let p = w.step();
    assert!(w.holders().is_empty());
    assert_eq!(w.status().draining.iter().map(|d| d.request.as_str()).collect::<Vec<_>>(), ["a"]);
    assert_eq!(w.status().draining[0].reason, "PodGone");
    assert_eq!(w.reason("a"), "PodGone");
    assert_eq!(w.phase("a"), Phase::Expired);
    assert_eq!(w.phase("b"), Phase::Pending, "not while the old holder may act");
    assert_eq!(w.taken(), 1);
    assert_eq!(p.wake_at, Some(secs(1000) + secs(30)), "the lease counts from the last renewal seen");
    w.mono = secs(1000) + secs(29);
    w.step();
    assert_eq!(w.phase("b"), Phase::Pending);
    w.mono = secs(1000) + secs(30);
    w.step();
    assert_eq!(w.holders(), ["b"]);
    assert!(w.status().draining.is_empty());
}

#[test]
fn a_holder_pod_reported_stopped_releases_at_once() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.pods.insert("p1".into(), PodInfo { uid: "pod-uid-p1".into(), terminated: false, stopped: false });
    w.add(with_pod(request("a", 1, 1), "p1"));
    w.add(request("b", 1, 2));
    w.step();
    // Deleted, and its last state (the watched deletion) showed no container running.
    w.pods.clear();
    w.gone_pods.insert("p1".into(), true);
    w.step();
    assert_eq!(w.holders(), ["b"]);
    assert!(w.status().draining.is_empty());
    assert_eq!(w.reason("a"), "PodGone");
}

#[test]
fn a_draining_grant_ends_when_its_pod_is_reported_stopped() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.pods.insert("p1".into(), PodInfo { uid: "pod-uid-p1".into(), terminated: false, stopped: false });
    w.add(with_pod(request("a", 1, 1), "p1"));
    w.add(request("b", 1, 2));
    w.step();
    // Being deleted, still running: broken meanwhile, so it drains.
    w.mono += secs(1);
    let r = w.requests.iter_mut().find(|r| r.name_any() == "a").unwrap();
    Arc::make_mut(r).metadata.annotations = Some([(BREAK_ANNOTATION.to_string(), "stuck".to_string())].into());
    w.step();
    assert_eq!(w.status().draining.len(), 1);
    assert_eq!(w.phase("b"), Phase::Pending);
    // The kubelet reports the pod terminated: it can no longer act.
    w.pods.insert("p1".into(), PodInfo { uid: "pod-uid-p1".into(), terminated: true, stopped: true });
    w.step();
    assert_eq!(w.holders(), ["b"]);
}

#[test]
fn terminated_or_replaced_pods_count_as_gone() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.pods.insert("p1".into(), PodInfo { uid: "pod-uid-p1".into(), terminated: false, stopped: false });
    w.add(with_pod(request("a", 1, 1), "p1"));
    w.step();
    w.pods.insert("p1".into(), PodInfo { uid: "pod-uid-p1".into(), terminated: true, stopped: true });
    w.step();
    assert_eq!(w.reason("a"), "PodGone");
    let mut w = World::new(lock(1, "30s", "0s"));
    w.pods.insert("p1".into(), PodInfo { uid: "other".into(), terminated: false, stopped: false });
    w.add(with_pod(request("a", 1, 1), "p1"));
    w.step();
    assert_eq!(w.phase("a"), Phase::Expired, "a waiting request whose pod was replaced is given up");
}

#[test]
fn a_waiting_request_with_an_unseen_pod_does_not_block_the_queue() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(with_pod(request("a", 1, 1), "not-yet"));
    w.add(request("b", 1, 2));
    let p = w.plan();
    assert!(p.checks.contains(&Check::Pod("not-yet".into())));
    let status = p.lock_status.unwrap();
    assert_eq!(status.holders[0].request, "b");
    assert_eq!(status.queue, ["a"]);
}

#[test]
fn break_expires_the_holder_with_who_and_why() {
    let mut w = World::new(lock(1, "30s", "3s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    let a = w.requests.iter_mut().find(|r| r.name_any() == "a").unwrap();
    let a = Arc::make_mut(a);
    a.annotations_mut().insert(BREAK_ANNOTATION.into(), "stuck migration".into());
    a.annotations_mut().insert(BROKEN_BY_ANNOTATION.into(), "alice".into());
    let p = w.step();
    assert_eq!(w.reason("a"), "Broken");
    let e = p.events.iter().find(|e| e.kind == EventKind::Broken).unwrap();
    assert!(e.message.contains("alice") && e.message.contains("stuck migration"), "{}", e.message);
    // The broken holder may still act until its lease passes; then the lock delay.
    assert!(w.holders().is_empty());
    assert_eq!(w.status().draining[0].reason, "Broken");
    w.mono += secs(30);
    w.step();
    assert!(w.status().draining.is_empty());
    assert!(w.status().delayed_until.is_some(), "lock delay after the drain");
    assert_eq!(w.phase("b"), Phase::Pending);
    w.mono += secs(3);
    w.step();
    assert_eq!(w.holders(), ["b"]);
}

#[test]
fn a_lock_being_deleted_drains_its_grants_and_grants_nothing() {
    let mut w = World::new(lock(2, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    assert_eq!(w.holders(), ["a", "b"]);
    w.add(request("c", 1, 3));
    // Deleted: its finalizer keeps it; both grants drain here, nothing is granted.
    w.lock.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
    w.step();
    assert!(w.holders().is_empty());
    let reasons: Vec<String> = w.status().draining.iter().map(|d| d.reason.clone()).collect();
    assert_eq!(reasons, ["LockDeleted", "LockDeleted"]);
    assert_eq!(w.phase("c"), Phase::Pending);
    // The holders' leases pass: the grants are free, still nothing is granted.
    w.mono += secs(30);
    w.step();
    assert!(w.status().draining.is_empty() && w.holders().is_empty());
    assert_eq!(w.phase("c"), Phase::Pending);
}

#[test]
fn a_delete_by_someone_else_keeps_the_permits_for_the_lease_then_the_lock_delay() {
    let mut w = World::new(lock(1, "30s", "10m"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    w.mono += secs(20);
    w.renew("a");
    w.step();
    w.mono += secs(5);
    w.delete("a"); // not by its holder: no spec.released
    let p = w.step();
    assert!(w.holders().is_empty());
    assert_eq!(w.status().draining[0].reason, "Deleted");
    assert_eq!(w.phase("b"), Phase::Pending, "not granted while a may act");
    let e = p.events.iter().find(|e| e.request == "a").unwrap();
    assert_eq!((e.kind, e.reason), (EventKind::Expired, Reason::Deleted));
    // Nothing says when its holder last renewed: a whole lease from when the delete was seen.
    assert_eq!(p.wake_at, Some(w.mono + secs(30)));
    w.mono += secs(29);
    w.step();
    assert_eq!(w.phase("b"), Phase::Pending);
    w.mono += secs(1);
    w.step();
    assert!(w.status().draining.is_empty());
    assert_eq!(w.phase("b"), Phase::Pending, "the lock delay follows");
    assert_eq!(w.reason("b"), "LockDelay");
    w.mono += secs(600);
    w.step();
    assert_eq!(w.holders(), ["b"]);
}

#[test]
fn the_holders_own_release_marks_the_request_and_frees_at_once() {
    let mut w = World::new(lock(1, "30s", "10m"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    // The holder marks it; the controller frees the permits and deletes the request.
    w.mark_released("a");
    let p = w.step();
    assert_eq!(w.holders(), ["b"]);
    assert!(p.deletions.iter().any(|d| d.name == "a"));
    assert!(w.status().delayed_until.is_none(), "a clean release: no lock delay");
    assert!(p.events.iter().any(|e| e.kind == EventKind::Released && e.request == "a"));
    // A draining grant ends at once when its holder says it stopped.
    w.delete("b");
    w.add(request("c", 1, 3));
    w.step();
    assert_eq!(w.status().draining.len(), 1);
    w.released.insert("uid-b".into());
    w.step();
    assert_eq!(w.holders(), ["c"]);
    assert!(w.status().delayed_until.is_none());
}

#[test]
fn a_waiter_withdrawn_by_its_requester_is_finished() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    w.mark_released("b");
    let p = w.step();
    assert_eq!(p.deletions, [Deletion { name: "b".into(), uid: "uid-b".into() }], "deleted by the controller");
    assert!(p.requests.is_empty(), "no status written on it");
    assert_eq!(w.status().waiting, 0);
}

#[test]
fn a_granted_request_re_pointed_or_resized_ends_its_grant_and_drains() {
    for change in ["lockName", "permits"] {
        let mut w = World::new(lock(2, "30s", "0s"));
        w.add(request("a", 1, 1));
        w.add(request("b", 2, 2));
        w.step();
        assert_eq!(w.holders(), ["a"]);
        let r = w.requests.iter_mut().find(|r| r.name_any() == "a").unwrap();
        let r = Arc::make_mut(r);
        match change {
            "lockName" => r.spec.lock_name = "other".into(),
            _ => r.spec.permits = 2,
        }
        r.metadata.generation = Some(2);
        w.step();
        assert!(w.holders().is_empty(), "{change}");
        assert_eq!(w.status().draining[0].reason, "SpecChanged", "{change}");
        assert_eq!(w.status().draining[0].permits, 1, "the permits of the grant, not of the new spec");
        assert_eq!(w.phase("a"), Phase::Expired, "{change}");
        assert_eq!(w.reason("a"), "SpecChanged", "{change}");
        assert_eq!(w.phase("b"), Phase::Pending, "{change}: b needs both permits, a may still act");
        w.mono += secs(30);
        w.step();
        assert_eq!(w.holders(), ["b"], "{change}");
    }
}

#[test]
fn a_requests_pod_ref_changed_while_held_ends_its_grant() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.pods.insert("p1".into(), PodInfo { uid: "pod-uid-p1".into(), terminated: false, stopped: false });
    w.pods.insert("p2".into(), PodInfo { uid: "pod-uid-p2".into(), terminated: true, stopped: true });
    w.add(with_pod(request("a", 1, 1), "p1"));
    w.add(request("b", 1, 2));
    w.step();
    assert_eq!(w.status().holders[0].pod_ref.as_ref().map(|p| p.name.as_str()), Some("p1"));
    // Pointed at a pod that has terminated: that must not free a's permits at once.
    let r = w.requests.iter_mut().find(|r| r.name_any() == "a").unwrap();
    let r = Arc::make_mut(r);
    r.spec.pod_ref = Some(PodRef { name: "p2".into(), uid: Some("pod-uid-p2".into()) });
    r.metadata.generation = Some(2);
    w.step();
    assert_eq!(w.status().draining[0].reason, "SpecChanged");
    assert_eq!(w.phase("b"), Phase::Pending);
}

#[test]
fn the_lock_delay_lasts_once_across_plans_whatever_the_clock_precision() {
    // The delay's end is stored to the microsecond; the plan that follows must recognize it
    // as its own (it once restarted the countdown, doubling the delay).
    let mut w = World::new(lock(1, "10s", "10s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    w.mono += secs(10);
    w.fresh.insert("uid-a".into());
    let p = w.step();
    assert!(w.status().delayed_until.is_some());
    assert_eq!(p.wake_at, Some(w.mono + secs(10)));
    w.mono += secs(3);
    w.step(); // a plan in between (a renewal of b, say)
    w.mono += secs(7);
    w.step();
    assert_eq!(w.holders(), ["b"], "granted after one lock delay");
}

#[test]
fn a_grant_that_ended_unmirrored_is_finalized_only_when_certain() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(granted("a", 1, "lock-uid", 5));
    // The Lock view predates token 5: a lagging cache, not an ended grant. Nothing is written
    // on the request; a read of the Lock is asked for.
    w.lock_fresh = false;
    let p = w.plan();
    assert!(p.requests.iter().all(|u| u.name != "a"), "{p:?}");
    assert!(p.checks.contains(&Check::Lock), "{p:?}");
    // The Lock has issued token 5 and later ones, and does not list it: the grant ended, but
    // not by this controller (its ends are written on the request first). Its holder may
    // still act: it drains.
    w.lock_fresh = true;
    w.lock.status = Some(LockStatus { fencing_token: 6, ..Default::default() });
    w.step();
    assert_eq!(w.phase("a"), Phase::Expired);
    assert_eq!(w.reason("a"), "RemovedFromStatus");
    assert_eq!(w.status().draining[0].request, "a");
}

#[test]
fn tokens_continue_past_any_token_a_request_remembers() {
    let mut w = World::new(lock(1, "30s", "0s"));
    let mut old = request("old", 1, 0);
    // A token above the wall-clock floor (a faster clock, a busy Lock).
    let remembered = w.now().wall.as_millisecond() + 1000;
    old.status = Some(LockRequestStatus {
        phase: Some(Phase::Expired),
        token: Some(remembered),
        lock_uid: Some("lock-uid".into()),
        finished_at: Some(MicroTime(Timestamp::from_second(T0 + 1000).unwrap())),
        ..Default::default()
    });
    w.add(old);
    w.add(request("a", 1, 1));
    w.step();
    assert_eq!(w.status().holders[0].token, remembered + 1);
}

#[test]
fn finished_requests_are_deleted_after_retention() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.settings.finished_retention = secs(60);
    w.add(request("big", 2, 1));
    w.step();
    assert_eq!(w.phase("big"), Phase::Rejected);
    let p = w.step();
    assert!(p.deletions.is_empty());
    // From finishedAt as stored (to the microsecond).
    let wake = p.wake_at.unwrap();
    assert!(wake <= w.mono + secs(60) && wake + Duration::from_micros(1) > w.mono + secs(60), "{wake:?}");
    w.mono += secs(60);
    let p = w.step();
    assert_eq!(p.deletions, [Deletion { name: "big".into(), uid: "uid-big".into() }]);
}

#[test]
fn orphans_wait_for_their_lock_and_lose_grants_of_a_deleted_one() {
    let now = Now { mono: secs(1), wall: Timestamp::from_second(T0).unwrap() };
    let pending = Arc::new(request("a", 1, 1));
    let mut granted = request("b", 1, 2);
    granted.status = Some(LockRequestStatus {
        phase: Some(Phase::Granted),
        token: Some(3),
        lock_uid: Some("old".into()),
        ..Default::default()
    });
    let granted = Arc::new(granted);
    let reqs = [pending, granted];
    let p = plan_orphans("db", &reqs, &HashSet::new(), &Settings::default(), now);
    assert_eq!(p.requests.len(), 1);
    assert_eq!(p.requests[0].status.conditions[0].reason, "LockNotFound");
    assert!(p.checks.contains(&Check::Lock), "the deletion must be confirmed");
    let gone: HashSet<String> = ["old".to_string()].into();
    let p = plan_orphans("db", &reqs, &gone, &Settings::default(), now);
    let b = p.requests.iter().find(|u| u.name == "b").unwrap();
    assert_eq!(b.status.phase, Some(Phase::Expired));
    assert_eq!(b.status.conditions[0].reason, "LockDeleted");
    assert_eq!(b.status.token, Some(3));
}

#[test]
fn a_grant_of_an_earlier_lock_of_the_same_name_drains_before_the_next_grant() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(granted("a", 1, "previous", 9));
    w.add(request("b", 1, 2));
    w.step();
    assert_eq!(w.phase("a"), Phase::Expired);
    assert_eq!(w.reason("a"), "LockDeleted");
    // Its holder may still be acting on what this Lock's name guards: b waits a lease.
    assert!(w.holders().is_empty());
    assert_eq!(w.status().draining[0].request, "a");
    assert_eq!(w.phase("b"), Phase::Pending);
    w.mono += secs(30);
    w.step();
    assert_eq!(w.holders(), ["b"]);
    assert!(w.token("b") > 9, "tokens keep increasing for the name");
    // Drained once: not drained again while its finished request lingers.
    w.mono += secs(1);
    w.step();
    assert!(w.status().draining.is_empty());
}

#[test]
fn a_grant_of_a_lock_that_still_exists_elsewhere_does_not_drain_here() {
    // A request re-pointed from another Lock: its grant drains on that Lock, not here.
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(granted("a", 1, "other-lock", 9));
    w.add(request("b", 1, 2));
    w.other_locks.insert("other-lock".into());
    w.step();
    assert_eq!(w.phase("a"), Phase::Expired);
    assert!(w.status().draining.is_empty());
    assert_eq!(w.holders(), ["b"]);
}

#[test]
fn the_end_of_an_earlier_locks_grant_is_a_fence_so_a_racing_renewal_restarts_the_drain() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(granted("a", 1, "previous", 9));
    w.add(request("b", 1, 2));
    let p = w.plan();
    let end = p.requests.iter().find(|u| u.name == "a").expect("a's end is written");
    // Before the Lock, with the version this plan read: a renewal landing first refuses it.
    // Written after the Lock, that renewal would be answered Granted, and its holder's new
    // deadline would outlive the drain counted from the renewal before it.
    assert!(end.fence, "{end:?}");
    assert_eq!(end.status.phase, Some(Phase::Expired));
    // The race: a renews 5 s later, before the fence lands; refused, the plan is made again.
    w.mono += secs(5);
    w.renew("a");
    w.step();
    w.mono += secs(29);
    w.step();
    assert!(w.holders().is_empty(), "drained from the renewal that refused the fence");
    w.mono += secs(1);
    w.step();
    assert_eq!(w.holders(), ["b"]);
}

#[test]
fn a_holder_taken_out_of_the_lock_status_by_another_writer_drains_before_the_next_grant() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    assert_eq!(w.holders(), ["a"]);
    // Someone edits the status subresource and takes a out; a's holder has not seen it.
    w.mono += secs(3);
    let mut status = w.status();
    status.holders.clear();
    w.lock.status = Some(status);
    let p = w.plan();
    let end = p.requests.iter().find(|u| u.name == "a").expect("a's end is written");
    assert!(end.fence, "{end:?}");
    // Its holder renews 7 s later, before that fence lands: refused, the plan is made again,
    // and the countdown starts from the renewal (answered Granted, it moved a's deadline).
    w.mono += secs(7);
    w.renew("a");
    w.step();
    assert_eq!(w.phase("a"), Phase::Expired);
    assert_eq!(w.reason("a"), "RemovedFromStatus");
    assert!(w.holders().is_empty(), "b is not granted while a may still act");
    assert_eq!(w.status().draining[0].request, "a");
    assert_eq!(w.taken(), 1);
    w.mono += secs(29);
    w.step();
    assert!(w.holders().is_empty(), "30 s from the renewal, not from the grant: {:?}", w.status());
    w.mono += secs(1);
    w.step();
    assert_eq!(w.holders(), ["b"]);
    w.mono += secs(1);
    w.step();
    assert!(w.status().draining.is_empty(), "drained once");
}

#[test]
fn a_fenced_removal_whose_lock_write_failed_still_drains() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    let mut status = w.status();
    status.holders.clear();
    w.lock.status = Some(status);
    // The fence lands; the Lock write after it does not (a conflict, or the controller stops).
    let p = w.plan();
    for u in &p.requests {
        let r = w.requests.iter_mut().find(|r| uid_of(r) == u.uid).unwrap();
        Arc::make_mut(r).status = Some(u.status.clone());
    }
    w.obs = Observations::default(); // a new leader, say
    assert_eq!(w.phase("a"), Phase::Expired);
    w.step();
    assert!(w.holders().is_empty(), "{:?}", w.status());
    assert_eq!(w.status().draining[0].request, "a");
}

#[test]
fn a_lock_status_reset_by_hand_drains_its_grants() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    // The whole status reset (fencing token 0, below a's token): a fresh read says so.
    w.lock.status = Some(LockStatus::default());
    w.step();
    assert!(w.holders().is_empty(), "{:?}", w.status());
    assert_eq!(w.status().draining[0].request, "a");
    w.mono += secs(30);
    w.step();
    assert_eq!(w.holders(), ["b"]);
    assert!(w.token("b") > w.token("a"));
}

#[test]
fn an_earlier_locks_grant_drained_before_the_lock_was_confirmed_is_fenced_once_it_is() {
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(granted("a", 1, "previous", 9));
    w.add(request("b", 1, 2));
    // The Lock is not confirmed (no quorum read this reconcile): a drains, unfenced.
    w.lock_fresh = false;
    let p = w.step();
    assert!(p.requests.iter().all(|u| !(u.name == "a" && u.fence)), "{p:?}");
    assert_eq!(w.phase("a"), Phase::Granted);
    assert_eq!(w.status().draining[0].request, "a");
    // Its holder renews; the next plan, committed or not, writes its end.
    w.lock_fresh = true;
    w.mono += secs(10);
    w.renew("a");
    let p = w.step();
    assert!(p.requests.iter().any(|u| u.name == "a" && u.fence), "{p:?}");
    assert_eq!(w.phase("a"), Phase::Expired);
    w.mono += secs(29);
    w.step();
    assert!(w.holders().is_empty(), "30 s from the renewal seen before the fence");
    w.mono += secs(1);
    w.step();
    assert_eq!(w.holders(), ["b"]);
}

#[test]
fn a_grant_this_controller_ended_is_not_drained_again_when_its_cache_lags() {
    // a's lease expired and the controller ended it; the cache still shows a Granted.
    let mut w = World::new(lock(1, "30s", "0s"));
    w.add(request("a", 1, 1));
    w.add(request("b", 1, 2));
    w.step();
    let granted = w.req("a").clone();
    w.mono += secs(30);
    w.step();
    assert_eq!(w.holders(), ["b"]);
    for _ in 0..2 {
        let r = w.requests.iter_mut().find(|r| r.name_any() == "a").unwrap();
        *r = Arc::new(granted.clone());
        let p = w.plan();
        assert!(p.requests.iter().all(|u| !u.fence), "{p:?}");
        w.apply(&p);
        assert_eq!(w.holders(), ["b"]);
        assert!(w.status().draining.is_empty(), "{:?}", w.status());
    }
}

#[test]
fn planning_an_unchanged_world_changes_nothing() {
    let mut w = World::new(lock(2, "30s", "0s"));
    for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
        w.add(request(n, 1 + (i as i32 % 2), i as i64));
    }
    w.step();
    w.mono += secs(3);
    let p = w.plan();
    assert_eq!(p.lock_status, None);
    assert!(p.requests.is_empty() && p.events.is_empty() && p.deletions.is_empty());
    assert_eq!(p.observations, w.obs);
}

#[test]
fn position_writes_per_grant_are_bounded_whatever_the_queue_length() {
    for n in [30usize, 3_000] {
        let mut w = World::new(lock(1, "30s", "0s"));
        let name = |i: usize| format!("r{i:05}");
        for i in 0..n {
            w.add(request(&name(i), 1, i as i64));
        }
        w.step();
        let rounds = n.min(60) - 8;
        for g in 0..rounds {
            w.mark_released(&name(g));
            let p = w.step();
            let pending = p.requests.iter().filter(|u| u.status.phase == Some(Phase::Pending)).count();
            assert!(
                pending <= 1 + status::REFRESHES_PER_GRANT,
                "{pending} position writes for grant {g} with {n} queued"
            );
            assert_eq!(w.phase(&name(g + 1)), Phase::Granted);
            for (place, i) in (g + 2..n).enumerate() {
                let shown = w.req(&name(i)).status.as_ref().unwrap().position.unwrap() as usize;
                if place == 0 {
                    assert_eq!(shown, 0, "the head's position is exact");
                } else {
                    assert!(shown >= place, "{} shows {shown}, ahead of its place {place}", name(i));
                }
            }
        }
        // The front is refreshed first: right behind the head, the position is within twice
        // (plus one) of the place.
        for place in 1..2 {
            let shown = w.req(&name(rounds + 1 + place)).status.as_ref().unwrap().position.unwrap() as usize;
            assert!(shown <= 2 * place + 1, "place {place} shows {shown}");
        }
    }
}

// ---- properties over random histories ----

#[derive(Clone, Debug)]
enum Op {
    Create {
        permits: i32,
    },
    /// The holder's (or waiter's) own release.
    Release {
        pick: usize,
    },
    /// A delete by someone else.
    Delete {
        pick: usize,
    },
    /// An administrator's break of a holder.
    Break {
        pick: usize,
    },
    Renew {
        pick: usize,
    },
    Advance {
        secs: u64,
    },
    Restart,
}

fn op(max_permits: i32) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..=max_permits).prop_map(|permits| Op::Create { permits }),
        2 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Break { pick }),
        3 => any::<usize>().prop_map(|pick| Op::Renew { pick }),
        3 => (1u64..20).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_over_random_histories(
        permits in 1i32..4,
        delay in 0u64..6,
        ops in proptest::collection::vec(op(4), 1..60),
    ) {
        let lease = 10u64;
        let mut w = World::new(lock(permits, &format!("{lease}s"), &format!("{delay}s")));
        let mut next = 0i64;
        let mut issued: Vec<i64> = Vec::new();
        let mut granted_order: Vec<String> = Vec::new();
        // When each holder was last seen alive (grant or renewal), on the world's clock.
        let mut alive: BTreeMap<String, Duration> = BTreeMap::new();
        // Grants whose holder may still act, by request UID: permits and last renewal
        // answered. A holder acts until it releases, or until its lease after that renewal.
        let mut acting: BTreeMap<String, (i32, Duration)> = BTreeMap::new();
        let mut last_expiry: Option<Duration> = None;
        for op in ops {
            match op {
                Op::Create { permits } => {
                    next += 1;
                    w.add(request(&format!("r{next:03}"), permits, next));
                }
                Op::Release { pick } => {
                    let live: Vec<String> = w.requests.iter().filter(|r| !r.phase().is_final()).map(|r| r.name_any()).collect();
                    if !live.is_empty() {
                        let name = live[pick % live.len()].clone();
                        w.release(&name);
                        alive.remove(&format!("uid-{name}"));
                        acting.remove(&format!("uid-{name}"));
                    }
                }
                Op::Delete { pick } => {
                    let live: Vec<String> = w.requests.iter().filter(|r| !r.phase().is_final()).map(|r| r.name_any()).collect();
                    if !live.is_empty() {
                        let name = live[pick % live.len()].clone();
                        w.delete(&name); // its holder does not know yet: it acts on
                    }
                }
                Op::Break { pick } => {
                    let holders = w.holders();
                    if !holders.is_empty() {
                        let name = holders[pick % holders.len()].clone();
                        let r = w.requests.iter_mut().find(|r| r.name_any() == name).unwrap();
                        let annotations = [(BREAK_ANNOTATION.to_string(), "test".to_string())].into();
                        Arc::make_mut(r).metadata.annotations = Some(annotations);
                    }
                }
                Op::Renew { pick } => {
                    let holders = w.holders();
                    if !holders.is_empty() {
                        let name = holders[pick % holders.len()].clone();
                        w.renew(&name);
                        alive.insert(format!("uid-{name}"), w.mono);
                        if let Some(a) = acting.get_mut(&format!("uid-{name}")) {
                            a.1 = w.mono;
                        }
                    }
                }
                Op::Advance { secs: s } => w.mono += secs(s),
                Op::Restart => w.obs = Observations::default(),
            }
            let p = w.step();
            for e in &p.events {
                match e.kind {
                    EventKind::Granted => {
                        let t = e.token.unwrap();
                        prop_assert!(issued.last().is_none_or(|&l| t > l), "token {t} after {issued:?}");
                        issued.push(t);
                        granted_order.push(e.request.clone());
                        alive.insert(e.request_uid.clone(), w.mono);
                        let wants = w.req(&e.request).spec.permits;
                        acting.insert(e.request_uid.clone(), (wants, w.mono));
                        prop_assert!(last_expiry.is_none_or(|x| w.mono >= x + secs(delay)) || delay == 0,
                            "grant during the lock delay");
                    }
                    EventKind::Expired if e.reason == Reason::LeaseExpired => {
                        let seen = alive[&e.request_uid];
                        prop_assert!(w.mono >= seen + secs(lease), "expired {:?} after the last renewal", w.mono - seen);
                        last_expiry = Some(w.mono);
                    }
                    _ => {}
                }
            }
            let status = w.status();
            // Mutual exclusion by permits: granted and draining.
            let held: i32 = status.holders.iter().map(|h| h.permits).sum::<i32>()
                + status.draining.iter().map(|d| d.permits).sum::<i32>();
            prop_assert!(held <= permits, "{held} permits taken of {permits}");
            // Never more acting than the permits, whatever ended the grants: a holder whose
            // request was deleted or broken acts until its lease since its last renewal.
            acting.retain(|_, (_, last)| w.mono < *last + secs(lease));
            let active: i32 = acting.values().map(|(p, _)| p).sum();
            prop_assert!(active <= permits, "{active} permits in use by holders that may act, of {permits}: {acting:?}");
            // No lost wake-up: the head of the queue does not fit (or grants are held back).
            if status.delayed_until.is_none()
                && let Some(head) = status.queue.first()
            {
                let head = w.req(head).spec.permits;
                prop_assert!(held + head > permits, "head wants {head}, {held} of {permits} held");
            }
            // Idempotent: planning again right away changes nothing.
            let again = w.plan();
            prop_assert!(again.lock_status.is_none() && again.requests.is_empty() && again.events.is_empty(), "{again:?}");
        }
        // FIFO: grants happened in creation order (names are numbered in creation order).
        let mut sorted = granted_order.clone();
        sorted.sort();
        prop_assert_eq!(granted_order, sorted);
    }
}

#[test]
fn a_status_restored_from_a_backup_never_hands_out_a_token_again() {
    let mut w = World::new(lock(1, "30s", "0s"));
    let backup = w.lock.clone();
    w.add(request("a", 1, 1));
    w.step();
    let issued = w.token("a");
    // etcd restored from a backup taken before the grant: the Lock and the request forget it.
    w.mono += secs(60);
    w.lock = backup;
    w.requests.clear();
    w.obs = Observations::default();
    w.add(request("b", 1, 2));
    w.step();
    assert!(w.token("b") > issued, "token {} after {issued} was issued", w.token("b"));
}

/// A `podRef` without a UID names a pod by its name alone, and another pod of that name (an
/// earlier one, terminated or deleted, still in a controller's lagging pod cache, while the
/// holder runs in the current one) confirms nothing about the holder's: its grant ends, and
/// drains for its lease, but its permits are not freed at once.
#[test]
fn another_pod_of_the_name_never_confirms_a_holder_without_a_pod_uid_stopped() {
    for stale in ["terminated", "deleted"] {
        let mut w = World::new(lock(1, "30s", "0s"));
        w.pods.insert("web-0".into(), PodInfo { uid: "pod-now".into(), terminated: false, stopped: false });
        let mut a = request("a", 1, 1);
        a.spec.pod_ref = Some(PodRef { name: "web-0".into(), uid: None });
        w.add(a);
        w.add(request("b", 1, 2));
        w.step();
        assert_eq!(w.holders(), ["a"]);
        // Another controller (a new leader, or a second one in split brain) whose pod cache
        // still shows the earlier web-0: terminated, or its watched deletion, stopped.
        w.obs = Observations::default();
        w.mono += secs(1);
        w.pods.clear();
        if stale == "terminated" {
            w.pods.insert("web-0".into(), PodInfo { uid: "pod-before".into(), terminated: true, stopped: true });
        } else {
            w.gone_pods.insert("web-0".into(), true);
        }
        w.step();
        assert_eq!(w.phase("b"), Phase::Pending, "{stale}: b granted while a may still act in the current web-0");
        assert_eq!(w.taken(), 1, "{stale}");
        assert_eq!(w.status().draining.iter().map(|d| d.request.as_str()).collect::<Vec<_>>(), ["a"], "{stale}");
        // Its lease passes with no renewal: then it is free.
        w.mono += secs(30);
        w.step();
        assert_eq!(w.holders(), ["b"], "{stale}");
    }
}

/// A grant made without a pod is bound to none: a `podRef` added to its request afterwards
/// (by anyone who may patch it without the webhook, by a trusted user with it), naming a pod
/// that stopped, says nothing about its holder, which may still act. It ends the grant as a
/// changed spec does (drained), never frees its permits at once.
#[test]
fn a_pod_ref_added_to_a_grant_made_without_one_never_frees_it_at_once() {
    for stale in ["terminated", "deleted"] {
        let mut w = World::new(lock(1, "30s", "0s"));
        w.add(request("a", 1, 1));
        w.add(request("b", 1, 2));
        w.step();
        assert_eq!(w.holders(), ["a"]);
        assert_eq!(w.status().holders[0].pod_ref, None);
        if stale == "terminated" {
            w.pods.insert("p2".into(), PodInfo { uid: "pod-uid-p2".into(), terminated: true, stopped: true });
        } else {
            w.gone_pods.insert("p2".into(), true);
        }
        let r = w.requests.iter_mut().find(|r| r.name_any() == "a").unwrap();
        let r = Arc::make_mut(r);
        r.spec.pod_ref = Some(PodRef { name: "p2".into(), uid: Some("pod-uid-p2".into()) });
        r.metadata.generation = Some(2);
        w.mono += secs(1);
        w.step();
        assert_eq!(w.phase("b"), Phase::Pending, "{stale}: b granted while a may still act");
        assert_eq!(w.taken(), 1, "{stale}");
        assert_eq!(w.status().draining.len(), 1, "{stale}");
        // The draining grant is not bound to that pod either: its lease decides.
        w.step();
        assert_eq!(w.phase("b"), Phase::Pending, "{stale}: the drain ended on the added pod's stop");
        w.mono += secs(30);
        w.step();
        assert_eq!(w.holders(), ["b"], "{stale}");
    }
}
