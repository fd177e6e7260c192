//! The lock service against a real API server: the controller binary grants, queues,
//! expires and fences; two controllers at once stay safe; a killed controller's successor
//! finishes its work.

use std::{collections::BTreeSet, time::Duration};

use futures::future::join_all;
use jiff::Timestamp;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::MicroTime};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use kubelock::api::{LOCK_FINALIZER, Lock, LockRequest, LockRequestSpec, Phase, PodRef};
use rand::{RngExt as _, SeedableRng as _};

use crate::support::{
    Identity, TIMEOUT, TestEnv, eventually,
    fixtures::{
        ControllerCmd, Fixture, controller_rules, create_lock, create_pod, create_request, free_port, http_get, lock,
        release,
    },
    history::LockHistory,
    wait_for, wait_until,
};

async fn renew(api: &Api<LockRequest>, name: &str) {
    let patch = serde_json::json!({"spec": {"renewTime": MicroTime(Timestamp::now())}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("renewing {name}: {e}"));
}

fn status(r: &LockRequest) -> kubelock::api::LockRequestStatus {
    r.status.clone().unwrap_or_default()
}

fn reason(r: &LockRequest) -> String {
    status(r).conditions.first().map(|c| c.reason.clone()).unwrap_or_default()
}

fn seconds_between(a: &MicroTime, b: &MicroTime) -> f64 {
    b.0.duration_since(a.0).as_secs_f64()
}

#[tokio::test]
async fn mutex_hands_over_between_two_requesters() {
    let f = Fixture::new().await;
    f.lock("db", 1, "30s", "0s").await;
    let history = LockHistory::record(f.locks.clone(), "db").await;
    f.request("first", "db", 1).await;
    let first = f.wait_phase("first", Phase::Granted).await;
    let first_token = status(&first).token.expect("a token");
    f.request("second", "db", 1).await;
    let second = wait_until(&f.requests, "second", "second queued", TIMEOUT, |r| status(r).position == Some(0))
        .await
        .expect("second queued at position 0");
    assert_eq!(second.phase(), Phase::Pending);
    f.release("first").await;
    let second = f.wait_phase("second", Phase::Granted).await;
    assert!(status(&second).token.expect("a token") > first_token);
    assert_eq!(status(&second).lock_uid, f.locks.get("db").await.unwrap().uid());
    assert_eq!(f.holders("db").await, ["second"]);
    let summary = history.check_after("second").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.max_held, 1);
}

#[tokio::test]
async fn semaphore_of_three_serves_five_requesters() {
    let f = Fixture::new().await;
    f.lock("api", 3, "30s", "0s").await;
    let history = LockHistory::record(f.locks.clone(), "api").await;
    for i in 0..5 {
        f.request(&format!("r{i}"), "api", 1).await;
    }
    let lock = wait_until(&f.locks, "api", "3 holders, 2 waiting", TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| s.holders.len() == 3 && s.waiting == 2)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let holders: BTreeSet<String> = lock.status.unwrap().holders.into_iter().map(|h| h.request).collect();
    assert_eq!(holders, ["r0", "r1", "r2"].into_iter().map(String::from).collect());
    f.release("r1").await;
    f.wait_phase("r3", Phase::Granted).await;
    assert_eq!(f.requests.get("r4").await.unwrap().phase(), Phase::Pending);
    f.release("r0").await;
    f.wait_phase("r4", Phase::Granted).await;
    let summary = history.check_after("r4").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.max_held, 3, "{summary:?}");
    assert_eq!(summary.grants, 5);
}

#[tokio::test]
async fn a_waiting_writer_is_not_starved_by_readers() {
    let f = Fixture::new().await;
    f.lock("rw", 3, "30s", "0s").await;
    let history = LockHistory::record(f.locks.clone(), "rw").await;
    f.request("reader-1", "rw", 1).await;
    f.request("reader-2", "rw", 1).await;
    f.wait_phase("reader-1", Phase::Granted).await;
    f.wait_phase("reader-2", Phase::Granted).await;
    f.request("writer", "rw", 3).await;
    wait_until(&f.requests, "writer", "writer queued first", TIMEOUT, |r| status(r).position == Some(0)).await.unwrap();
    // A stream of readers after the writer: each would fit, none may overtake it.
    for i in 3..6 {
        f.request(&format!("reader-{i}"), "rw", 1).await;
    }
    wait_until(&f.locks, "rw", "three readers queued behind the writer", TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| s.waiting == 4)
    })
    .await
    .unwrap();
    assert_eq!(f.holders("rw").await, ["reader-1", "reader-2"]);
    f.release("reader-1").await;
    f.release("reader-2").await;
    let writer = f.wait_phase("writer", Phase::Granted).await;
    assert_eq!(f.holders("rw").await, ["writer"]);
    f.release("writer").await;
    for i in 3..6 {
        let reader = f.wait_phase(&format!("reader-{i}"), Phase::Granted).await;
        assert!(status(&reader).token > status(&writer).token);
    }
    history.check().unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_silent_holder_expires_after_its_lease_and_not_before() {
    let f = Fixture::new().await;
    f.lock("db", 1, "3s", "0s").await;
    f.request("silent", "db", 1).await;
    let granted = f.wait_phase("silent", Phase::Granted).await;
    f.request("renewing", "db", 1).await;
    let expired = f.wait_phase("silent", Phase::Expired).await;
    assert_eq!(reason(&expired), "LeaseExpired");
    let held =
        seconds_between(status(&granted).granted_at.as_ref().unwrap(), status(&expired).finished_at.as_ref().unwrap());
    assert!(held >= 3.0, "expired {held:.3}s after the grant, before its 3s lease");
    // A holder that renews every third of its lease keeps the lock for several leases.
    let renewing = f.wait_phase("renewing", Phase::Granted).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(9);
    while tokio::time::Instant::now() < until {
        renew(&f.requests, "renewing").await;
        tokio::time::sleep(Duration::from_secs(1)).await; // the holder's renewal cadence, not a wait
    }
    let still = f.requests.get("renewing").await.unwrap();
    assert_eq!(still.phase(), Phase::Granted, "{:?}", still.status);
    assert_eq!(status(&still).token, status(&renewing).token);
}

#[tokio::test]
async fn lock_delay_holds_back_grants_after_an_expiry() {
    let f = Fixture::new().await;
    f.lock("db", 1, "2s", "3s").await;
    f.request("paused", "db", 1).await;
    f.wait_phase("paused", Phase::Granted).await;
    f.request("next", "db", 1).await;
    let expired = f.wait_phase("paused", Phase::Expired).await;
    // The expiry is written on the request first (a fence), then on the Lock.
    let delayed = wait_until(&f.locks, "db", "the expired holder gone from the Lock", TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| s.holders.iter().all(|h| h.request != "paused"))
    })
    .await
    .unwrap();
    let delayed = delayed.status.unwrap();
    assert!(delayed.holders.is_empty(), "granted during the lock delay: {:?}", delayed.holders);
    assert!(delayed.delayed_until.is_some(), "no lock delay in force");
    let next = f.wait_phase("next", Phase::Granted).await;
    let gap =
        seconds_between(status(&expired).finished_at.as_ref().unwrap(), status(&next).granted_at.as_ref().unwrap());
    assert!(gap >= 3.0, "granted {gap:.3}s after the expiry, inside the 3s lock delay");
}

#[tokio::test]
async fn a_clean_release_skips_the_lock_delay() {
    let f = Fixture::new().await;
    // A lock delay far longer than the test's timeout: a grant proves it was skipped.
    f.lock("db", 1, "30s", "10m").await;
    f.request("first", "db", 1).await;
    f.wait_phase("first", Phase::Granted).await;
    f.request("second", "db", 1).await;
    f.release("first").await;
    f.wait_phase("second", Phase::Granted).await;
    let lock = f.locks.get("db").await.unwrap();
    assert!(lock.status.unwrap().delayed_until.is_none());
}

#[tokio::test]
async fn deleting_the_holder_pod_releases_it() {
    let f = Fixture::new().await;
    f.lock("db", 1, "10m", "0s").await;
    let pods: Api<Pod> = f.env.api(Identity::Admin).await;
    let pod = create_pod(&pods, "holder").await;
    let mut request = LockRequest::new(
        "pod-holder",
        LockRequestSpec {
            holder_identity: "pod/holder".into(),
            renew_time: Some(MicroTime(Timestamp::now())),
            pod_ref: Some(PodRef { name: "holder".into(), uid: pod.uid() }),
            ..LockRequestSpec::new("db")
        },
    );
    request.metadata.namespace = None;
    f.requests.create(&PostParams::default(), &request).await.expect("creating the request");
    f.wait_phase("pod-holder", Phase::Granted).await;
    f.request("next", "db", 1).await;
    pods.delete("holder", &DeleteParams::default()).await.expect("deleting the pod");
    let gone = f.wait_phase("pod-holder", Phase::Expired).await;
    assert_eq!(reason(&gone), "PodGone");
    // The 10 minute lease did not have to run out.
    f.wait_phase("next", Phase::Granted).await;
}

#[tokio::test]
async fn a_deleted_lock_stays_until_its_grants_drained_and_then_a_new_one_grants() {
    let f = Fixture::new().await;
    let old = f.lock("db", 1, "4s", "0s").await;
    f.request("holder", "db", 1).await;
    let granted = f.wait_phase("holder", Phase::Granted).await;
    let granted_at = std::time::Instant::now();
    let old_token = status(&granted).token.expect("a token");
    let held = f.locks.get("db").await.expect("the lock");
    assert!(held.finalizers().iter().any(|f| f == LOCK_FINALIZER), "no finalizer on a granted Lock: {held:?}");
    f.request("waiter", "db", 1).await;
    wait_until(&f.requests, "waiter", "queued", TIMEOUT, |r| status(r).position == Some(0)).await.unwrap();

    f.locks.delete("db", &DeleteParams::default()).await.expect("deleting the lock");
    let holder = f.wait_phase("holder", Phase::Expired).await;
    assert_eq!(reason(&holder), "LockDeleted");
    // Its finalizer keeps it while the grant drains: the record of the grant stays, and no
    // second Lock of the name can be made meanwhile.
    wait_until(&f.locks, "db", "the grant draining on the deleting Lock", TIMEOUT, |l| {
        l.metadata.deletion_timestamp.is_some()
            && l.status.as_ref().is_some_and(|s| s.draining.iter().any(|d| d.request == "holder"))
    })
    .await
    .unwrap();
    match f.locks.create(&PostParams::default(), &lock("db", 1)).await {
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        other => panic!("a second Lock db while the first one drains: {other:?}"),
    }
    assert_eq!(f.wait_phase("waiter", Phase::Pending).await.phase(), Phase::Pending);
    // Gone once the holder's lease passed (it never renewed after its grant).
    crate::support::wait_gone(&f.locks, "db", TIMEOUT).await.expect("the deleted Lock goes once drained");
    assert!(
        granted_at.elapsed() >= Duration::from_millis(3500),
        "the Lock went {:?} after the grant, before the holder's lease of 4s",
        granted_at.elapsed()
    );
    let new = f.lock("db", 1, "4s", "0s").await;
    let waiter = f.wait_phase("waiter", Phase::Granted).await;
    assert!(status(&waiter).token.expect("a token") > old_token, "tokens never go back for a Lock's name");
    assert_eq!(status(&waiter).lock_uid, new.uid());
    assert_ne!(new.uid(), old.uid());
}

#[tokio::test]
async fn a_request_for_a_lock_that_does_not_exist_yet_waits_for_it() {
    let f = Fixture::new().await;
    f.request("early", "later", 1).await;
    let waiting =
        wait_until(&f.requests, "early", "LockNotFound", TIMEOUT, |r| reason(r) == "LockNotFound").await.unwrap();
    assert_eq!(waiting.phase(), Phase::Pending);
    assert!(status(&waiting).message.unwrap().contains("does not exist"));
    f.lock("later", 1, "30s", "0s").await;
    f.wait_phase("early", Phase::Granted).await;
}

#[tokio::test]
async fn a_request_for_too_many_permits_is_rejected_and_deleted_after_retention() {
    let f = Fixture::with(&["--finished-retention", "2s"]).await;
    f.lock("small", 2, "30s", "0s").await;
    f.request("greedy", "small", 3).await;
    let rejected = f.wait_phase("greedy", Phase::Rejected).await;
    assert_eq!(reason(&rejected), "TooManyPermits");
    assert!(status(&rejected).message.unwrap().contains("spec.permits 3"));
    wait_for(&f.requests, "greedy", "deletion after the retention", TIMEOUT, |r| r.is_none()).await.unwrap();
}

/// One contender: acquire, hold a moment, release; `rounds` times.
async fn contend(requests: Api<LockRequest>, lock: String, who: usize, rounds: usize, seed: u64) -> Vec<i64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tokens = Vec::new();
    for round in 0..rounds {
        let name = format!("c{who}-{round}");
        create_request(&requests, &name, &lock, 1, None).await;
        let granted =
            wait_until(&requests, &name, "granted", Duration::from_secs(120), |r| r.phase() == Phase::Granted)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        tokens.push(status(&granted).token.unwrap());
        // The work done while holding: a random, short hold.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30u64))).await;
        release(&requests, &name).await;
    }
    tokens
}

#[tokio::test]
async fn two_controllers_at_once_never_over_grant() {
    let mut f = Fixture::new().await;
    f.start_controller(&[]); // split brain: no leader election, both act
    f.lock("hot", 1, "30s", "0s").await;
    f.lock("pool", 2, "30s", "0s").await;
    let hot = LockHistory::record(f.locks.clone(), "hot").await;
    let pool = LockHistory::record(f.locks.clone(), "pool").await;
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let contenders = (0..8).map(|who| {
        let lock = if who % 2 == 0 { "hot" } else { "pool" };
        contend(f.requests.clone(), lock.to_string(), who, 6, seed + who as u64)
    });
    let tokens: Vec<Vec<i64>> = join_all(contenders).await;
    let all: BTreeSet<i64> = tokens.iter().step_by(2).flatten().copied().collect();
    assert_eq!(all.len(), 24, "hot lock tokens unique: {tokens:?}");
    let hot = hot.check().unwrap_or_else(|e| panic!("hot lock: {e}"));
    let pool = pool.check().unwrap_or_else(|e| panic!("pool lock: {e}"));
    assert_eq!((hot.max_held, hot.grants), (1, 24), "{hot:?}");
    assert!(pool.max_held <= 2 && pool.grants == 24, "{pool:?}");
}

#[tokio::test]
async fn a_controller_killed_mid_queue_is_succeeded_without_double_grants() {
    let mut f = Fixture::new().await;
    f.lock("q", 1, "30s", "0s").await;
    let history = LockHistory::record(f.locks.clone(), "q").await;
    for i in 0..6 {
        f.request(&format!("w{i}"), "q", 1).await;
    }
    f.wait_phase("w0", Phase::Granted).await;
    for i in 0..6 {
        let name = format!("w{i}");
        f.wait_phase(&name, Phase::Granted).await;
        // Kill the controller right as the holder releases: the grant to the next one is
        // left to its successor (mid-handover, or before it even saw the release).
        f.release(&name).await;
        if i % 2 == 0 {
            f.controllers[0].kill();
            f.controllers.clear();
            f.start_controller(&[]);
        }
    }
    wait_until(&f.locks, "q", "the queue drained", TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| s.holders.is_empty() && s.draining.is_empty() && s.waiting == 0)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let summary = history.check_after("w5").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.grants, 6);
}

#[tokio::test]
async fn with_leader_election_one_replica_grants_and_a_standby_takes_over() {
    let mut f = Fixture::without_controller().await;
    let ns = f.env.ns().to_string();
    f.start_controller(&["--leader-elect", "--leader-elect-namespace", &ns]);
    f.start_controller(&["--leader-elect", "--leader-elect-namespace", &ns]);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = f.env.api(Identity::Admin).await;
    let lease = wait_until(&leases, "kubelock-controller", "a leader", TIMEOUT, |l| {
        l.spec.as_ref().and_then(|s| s.holder_identity.as_ref()).is_some_and(|h| !h.is_empty())
    })
    .await
    .unwrap();
    f.lock("db", 1, "30s", "0s").await;
    f.request("a", "db", 1).await;
    f.wait_phase("a", Phase::Granted).await;
    // Stop the leader cleanly: it empties the Lease, and the standby takes over at once.
    let leader = lease.spec.unwrap().holder_identity.unwrap();
    let index: usize = leader.trim_start_matches("controller-").parse().expect("a controller-N identity");
    f.controllers[index].signal(rustix::process::Signal::TERM);
    f.controllers[index].wait(TIMEOUT).await;
    f.request("b", "db", 1).await;
    f.release("a").await;
    f.wait_phase("b", Phase::Granted).await;
    let lease = leases.get("kubelock-controller").await.unwrap();
    assert_ne!(lease.spec.unwrap().holder_identity, Some(leader), "the standby leads now");
}

#[tokio::test]
async fn metrics_health_and_events_are_served() {
    let env = TestEnv::new().await;
    env.grant(Identity::Controller, controller_rules()).await;
    let port = free_port();
    let _controller = ControllerCmd::new(&env, Identity::Controller, "controller").admin_port(port).spawn();
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    let requests: Api<LockRequest> = env.api(Identity::Admin).await;
    create_lock(&locks, lock("m", 1)).await;
    create_request(&requests, "r", "m", 1, None).await;
    wait_until(&requests, "r", "granted", TIMEOUT, |r| r.phase() == Phase::Granted).await.unwrap();
    let metrics = eventually("metrics to count the grant", TIMEOUT, || async {
        let body = http_get(port, "/metrics").await?.body;
        if body.contains("kubelock_grants_total 1") { Ok(body) } else { Err(body) }
    })
    .await
    .unwrap();
    for name in [
        "kubelock_reconcile_duration_seconds",
        "kubelock_queue_depth",
        "kubelock_grant_latency_seconds",
        "kubelock_holders 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    assert!(http_get(port, "/healthz").await.unwrap().head.starts_with("HTTP/1.0 200"));
    assert!(http_get(port, "/readyz").await.unwrap().head.starts_with("HTTP/1.0 200"));
    let events: Api<k8s_openapi::api::events::v1::Event> = env.api(Identity::Admin).await;
    let granted = eventually("a Granted event", TIMEOUT, || async {
        let list = events.list(&Default::default()).await.map_err(|e| e.to_string())?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Granted"))
            .ok_or_else(|| "no Granted event yet".to_string())
    })
    .await
    .unwrap();
    assert_eq!(granted.regarding.and_then(|r| r.name).as_deref(), Some("m"));
    assert!(granted.note.unwrap().contains("token 1"));
}

/// The requests of a Lock that does not exist are counted like any other: a waiting request
/// broken by an administrator and one rejected for its spec show in the metrics.
#[tokio::test]
async fn broken_and_rejected_requests_of_a_missing_lock_are_counted() {
    let env = TestEnv::new().await;
    env.grant(Identity::Controller, controller_rules()).await;
    let port = free_port();
    let _controller = ControllerCmd::new(&env, Identity::Controller, "controller").admin_port(port).spawn();
    let requests: Api<LockRequest> = env.api(Identity::Admin).await;
    create_request(&requests, "waiting", "ghost", 1, None).await;
    wait_until(&requests, "waiting", "queued for the missing lock", TIMEOUT, |r| {
        r.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Pending))
    })
    .await
    .unwrap();
    let annotations = serde_json::json!({"metadata": {"annotations": {
        kubelock::api::BREAK_ANNOTATION: "maintenance", kubelock::api::BROKEN_BY_ANNOTATION: "admin"}}});
    requests
        .patch("waiting", &PatchParams::default(), &Patch::Merge(&annotations))
        .await
        .expect("annotating the break");
    // Within the schema, but longer than the longest lease the controller honours.
    create_request(&requests, "too-long", "ghost", 1, Some("8761h")).await;
    wait_until(&requests, "waiting", "broken", TIMEOUT, |r| r.phase() == Phase::Expired).await.unwrap();
    wait_until(&requests, "too-long", "rejected", TIMEOUT, |r| r.phase() == Phase::Rejected).await.unwrap();
    eventually("both outcomes in the metrics", TIMEOUT, || async {
        let body = http_get(port, "/metrics").await?.body;
        let broken = body.contains(r#"kubelock_expirations_total{reason="Broken"} 1"#);
        let rejected = body.contains(r#"kubelock_rejections_total{reason="InvalidSpec"} 1"#);
        if broken && rejected { Ok(()) } else { Err(body) }
    })
    .await
    .unwrap();
}

/// A controller that may not list pods nor publish Events (a namespace-scoped install without
/// those rules) serves every Lock it can: requests bound to no pod are granted, one bound to a
/// pod waits with a condition saying why; it is ready, counts what it drops, and stops at once
/// on SIGTERM.
#[tokio::test]
async fn a_controller_without_pods_or_events_serves_what_it_can_and_stops_on_sigterm() {
    let env = TestEnv::new().await;
    env.grant(Identity::Controller, crate::support::fixtures::controller_core_rules()).await;
    let port = free_port();
    let mut controller = ControllerCmd::new(&env, Identity::Controller, "controller").admin_port(port).spawn();
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    let requests: Api<LockRequest> = env.api(Identity::Admin).await;
    create_lock(&locks, lock("plain", 1)).await;
    create_lock(&locks, lock("bound", 1)).await;
    create_request(&requests, "free-of-pods", "plain", 1, None).await;
    wait_until(&requests, "free-of-pods", "granted without pods", TIMEOUT, |r| r.phase() == Phase::Granted)
        .await
        .unwrap();
    let pod = create_pod(&env.api(Identity::Admin).await, "app").await;
    let spec = LockRequestSpec {
        holder_identity: "pod/app".into(),
        pod_ref: Some(PodRef { name: "app".into(), uid: pod.uid() }),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..LockRequestSpec::new("bound")
    };
    requests.create(&PostParams::default(), &LockRequest::new("pod-bound", spec)).await.expect("creating");
    let waiting =
        wait_until(&requests, "pod-bound", "held back, saying why", TIMEOUT, |r| reason(r) == "PodsUnreadable")
            .await
            .unwrap();
    assert_eq!(waiting.phase(), Phase::Pending);
    assert!(status(&waiting).message.unwrap_or_default().contains("may not list pods"), "{waiting:?}");
    assert_eq!(http_get(port, "/readyz").await.unwrap().status, 200, "ready: it serves what it can");
    eventually("the refused APIs in the metrics", TIMEOUT, || async {
        let body = http_get(port, "/metrics").await?.body;
        let pods = body.contains(r#"kubelock_api_unavailable{api="pods"} 1"#);
        let events = body.contains(r#"kubelock_api_unavailable{api="events"} 1"#)
            && !body.contains("kubelock_events_dropped_total 0");
        if pods && events { Ok(()) } else { Err(body) }
    })
    .await
    .unwrap();
    let asked = std::time::Instant::now();
    controller.signal(rustix::process::Signal::TERM);
    let status = controller.wait(Duration::from_secs(15)).await;
    assert!(status.is_some(), "the controller ignored SIGTERM");
    eprintln!("controller stopped {:?} after SIGTERM", asked.elapsed());
    assert!(asked.elapsed() < Duration::from_secs(10), "stopped only after {:?}", asked.elapsed());
}

/// A controller asked to elect a leader that may not touch its Lease runs without election
/// (safety never depends on it) instead of standing by forever, and says so in its metrics.
#[tokio::test]
async fn a_controller_that_may_not_use_its_lease_runs_without_leader_election() {
    let env = TestEnv::new().await;
    let mut rules = crate::support::fixtures::controller_core_rules();
    rules.extend(
        controller_rules()
            .into_iter()
            .filter(|r| r.api_groups.as_ref().is_none_or(|g| !g.iter().any(|g| g == "coordination.k8s.io"))),
    );
    env.grant(Identity::Controller, rules).await;
    let port = free_port();
    let ns = env.ns().to_string();
    let _controller = ControllerCmd::new(&env, Identity::Controller, "controller")
        .admin_port(port)
        .args(&["--leader-elect", "--leader-elect-namespace", &ns])
        .spawn();
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    let requests: Api<LockRequest> = env.api(Identity::Admin).await;
    create_lock(&locks, lock("db", 1)).await;
    create_request(&requests, "r", "db", 1, None).await;
    wait_until(&requests, "r", "granted without leader election", TIMEOUT, |r| r.phase() == Phase::Granted)
        .await
        .unwrap();
    let body = http_get(port, "/metrics").await.unwrap().body;
    assert!(body.contains(r#"kubelock_api_unavailable{api="leases"} 1"#), "{body}");
}

/// The sum of `kubelock_api_writes_total` for one kind and outcome in a `/metrics` body.
fn writes_counted(metrics: &str, kind: &str, outcome: &str) -> f64 {
    let labels = format!("kind=\"{kind}\",outcome=\"{outcome}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("kubelock_api_writes_total{") && l.contains(&labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A request its holder released is deleted once: the reconciles that run before the watch
/// reports it gone (new requests, the next release) do not DELETE it again, which the API
/// server would answer 404 for nothing (a hot lock paid three of those per grant).
#[tokio::test]
async fn a_released_request_is_deleted_once_however_busy_its_lock() {
    let mut f = Fixture::without_controller().await;
    let port = free_port();
    f.controllers.push(ControllerCmd::new(&f.env, Identity::Controller, "controller").admin_port(port).spawn());
    f.lock("hot", 1, "30s", "0s").await;
    const CLIENTS: usize = 4;
    const ROUNDS: usize = 8;
    let clients = (0..CLIENTS).map(|c| {
        let requests = f.requests.clone();
        async move {
            for round in 0..ROUNDS {
                let name = format!("c{c}-{round}");
                create_request(&requests, &name, "hot", 1, None).await;
                wait_until(&requests, &name, "granted", TIMEOUT, |r| r.phase() == Phase::Granted)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                release(&requests, &name).await;
            }
        }
    });
    join_all(clients).await;
    let grants = (CLIENTS * ROUNDS) as f64;
    let metrics = eventually("every released request deleted", TIMEOUT, || async {
        let body = http_get(port, "/metrics").await?.body;
        if writes_counted(&body, "request_delete", "ok") >= grants { Ok(body) } else { Err(body) }
    })
    .await
    .unwrap();
    assert_eq!(writes_counted(&metrics, "request_delete", "ok"), grants);
    assert_eq!(writes_counted(&metrics, "request_delete", "gone"), 0.0, "DELETEs answered 404:\n{metrics}");
    assert!(f.requests.list(&Default::default()).await.unwrap().items.is_empty());
}

/// A queue the controller sees for the first time needs a status for every request; written
/// in one reconcile, they held up the next grant of their Lock until the last was written
/// (with 100,000 queued, minutes). The next grant comes after a bounded part of them.
#[tokio::test]
async fn a_long_new_queue_does_not_hold_up_the_next_grant() {
    use futures::StreamExt as _;
    const QUEUED: usize = 2_000;
    let mut f = Fixture::without_controller().await;
    f.lock("long", 1, "30s", "0s").await;
    let created: Vec<()> = futures::stream::iter(0..QUEUED)
        .map(|i| {
            let requests = f.requests.clone();
            async move {
                create_request(&requests, &format!("q-{i:05}"), "long", 1, None).await;
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(created.len(), QUEUED);
    f.controllers.push(ControllerCmd::new(&f.env, Identity::Controller, "controller").spawn());
    let first = wait_until(&f.locks, "long", "a first holder", TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| !s.holders.is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let first = first.status.expect("a status").holders[0].request.clone();
    release(&f.requests, &first).await;
    let second = wait_until(&f.locks, "long", "a second holder", TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| s.holders.first().is_some_and(|h| h.request != first))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // resourceVersions are etcd revisions here: what was written before the second grant.
    let granted_at: u64 = second.resource_version().and_then(|v| v.parse().ok()).expect("a numeric resourceVersion");
    let requests = f.requests.list(&Default::default()).await.expect("listing requests").items;
    let mirrored_before = requests
        .iter()
        .filter(|r| r.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Pending)))
        .filter(|r| r.resource_version().and_then(|v| v.parse::<u64>().ok()).is_some_and(|v| v < granted_at))
        .count();
    assert!(
        mirrored_before < QUEUED / 2,
        "{mirrored_before} of {QUEUED} waiting requests' statuses were written before the second grant"
    );
}
