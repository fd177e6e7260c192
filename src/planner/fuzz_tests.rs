//! Bad input: arbitrary Lock and LockRequest JSON — well-formed objects, values the schema
//! would refuse today (objects written before a schema change, hand edits of the status),
//! wrong JSON types, numbers out of range, missing fields — read the way the controller reads
//! them ([`crate::api::lenient`]) and planned. Properties:
//! - the planner never panics (no overflow, no indexing, no unwrap on bad input);
//! - it never loses a grant: a holder entry that is readable on its own stays in the new
//!   status unless a rule ends it (its request is finished, being deleted or broken);
//! - it never issues a token at or below one already issued (also near `i64::MAX`);
//! - it says what is wrong: an unreadable or invalid Lock gets `Ready=False` naming the field,
//!   an unreadable or invalid waiting request is `Rejected` with a message naming the field.

use std::collections::{BTreeMap, HashMap, HashSet};

use jiff::Timestamp;
use proptest::prelude::*;
use serde_json::{Value, json};

use std::{sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt as _;

use super::*;
use crate::api::{self, Holder, Lock, LockRequest, Phase};

/// A JSON value of the wrong kind for any field.
fn wrong_type() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        "[a-z]{0,6}".prop_map(Value::String),
        Just(json!([1, "x"])),
        Just(json!({"nested": {"deeper": [null]}})),
        (-1e12f64..1e12).prop_map(|f| json!(f + 0.5)),
    ]
}

/// Integers around every boundary a Rust type has.
fn edgy_int() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(i64::from(i32::MAX))),
        Just(json!(i64::from(i32::MAX) + 1)),
        Just(json!(i64::from(i32::MIN) - 1)),
        Just(json!(i64::MAX)),
        Just(json!(i64::MAX - 1)),
        Just(json!(i64::MIN)),
        Just(json!(u64::MAX)),
        any::<i64>().prop_map(|n| json!(n)),
    ]
}

/// Duration strings, good and bad.
fn duration_text() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop_oneof![Just("1s"), Just("30s"), Just("250ms"), Just("1m30s"), Just("2h")].prop_map(|s| json!(s)),
        1 => prop_oneof![Just("0s"), Just("0"), Just("-1s"), Just(""), Just("1d"), Just("1.5.5s"), Just("99999999999999h"), Just("8761h")]
            .prop_map(|s| json!(s)),
    ]
}

/// A field of Rust type `T`: usually `valid`, sometimes missing, of the wrong JSON type or an
/// edge-case integer. The flag says whether `T` cannot read the value.
fn field<T: serde::de::DeserializeOwned>(
    valid: impl Strategy<Value = Value> + 'static,
) -> impl Strategy<Value = (Option<Value>, bool)> {
    prop_oneof![
        8 => valid.prop_map(Some),
        1 => Just(None),
        1 => wrong_type().prop_map(Some),
        1 => edgy_int().prop_map(Some),
    ]
    .prop_map(|v| {
        let unreadable = v.as_ref().is_some_and(|v| serde_json::from_value::<T>(v.clone()).is_err());
        (v, unreadable)
    })
}

fn put(obj: &mut Value, key: &str, (value, _): &(Option<Value>, bool)) {
    if let Some(v) = value {
        obj[key] = v.clone();
    }
}

/// Requests r0..r5 (UIDs u0..u5) exist to be named by holders and queued.
const POOL: usize = 6;

fn time_text(second: i64) -> Value {
    json!(Timestamp::from_second(1_800_000_000 + second).expect("in range").to_string())
}

/// A holder entry: mostly well-formed, naming a request of the pool (or none of them).
fn holder() -> impl Strategy<Value = Value> {
    (
        0..POOL + 1,
        field::<i32>((1i64..3).prop_map(|n| json!(n))),
        field::<i64>((1i64..20).prop_map(|n| json!(n))),
        field::<String>(duration_text()),
    )
        .prop_map(|(i, permits, token, lease)| {
            let mut h = json!({
                "request": format!("r{i}"),
                "requestUID": format!("u{i}"),
                "holder": format!("h{i}"),
                "grantedAt": time_text(0),
            });
            put(&mut h, "permits", &permits);
            put(&mut h, "token", &token);
            put(&mut h, "leaseDuration", &lease);
            h
        })
}

/// A Lock as it might be stored, and the names of the fields made unreadable.
fn lock_json() -> impl Strategy<Value = (Value, Vec<&'static str>)> {
    (
        field::<i32>((1i64..4).prop_map(|n| json!(n))),
        field::<String>(duration_text()),
        field::<String>(duration_text()),
        proptest::collection::vec(holder(), 0..4),
        field::<i64>((0i64..20).prop_map(|n| json!(n))),
        field::<i32>((0i64..5).prop_map(|n| json!(n))),
        prop_oneof![3 => Just(None), 1 => Just(Some(time_text(5))), 1 => wrong_type().prop_map(Some)].prop_map(|v| {
            let bad = v.as_ref().is_some_and(|v| serde_json::from_value::<Option<MicroTime>>(v.clone()).is_err());
            (v, bad)
        }),
        any::<bool>(),
    )
        .prop_map(|(permits, lease, delay, holders, fencing, waiting, delayed, bad_holders)| {
            let mut spec = json!({});
            put(&mut spec, "permits", &permits);
            put(&mut spec, "leaseDuration", &lease);
            put(&mut spec, "lockDelay", &delay);
            let mut status = json!({ "holders": holders });
            put(&mut status, "fencingToken", &fencing);
            put(&mut status, "waiting", &waiting);
            if let Some(d) = &delayed.0 {
                status["delayedUntil"] = d.clone();
            }
            if bad_holders {
                status["queue"] = json!("not a list");
            }
            let mut bad = Vec::new();
            for (name, f) in [("permits", &permits), ("leaseDuration", &lease), ("lockDelay", &delay)] {
                if f.1 {
                    bad.push(name);
                }
            }
            for (name, f) in [("fencingToken", &fencing), ("waiting", &waiting)] {
                if f.1 {
                    bad.push(name);
                }
            }
            if bad_holders {
                bad.push("queue");
            }
            if delayed.1 {
                bad.push("delayedUntil");
            }
            if holders.iter().any(|h| serde_json::from_value::<Holder>(h.clone()).is_err()) {
                bad.push("holders");
            }
            let lock = json!({
                "apiVersion": "kubelock.dev/v1alpha1",
                "kind": "Lock",
                "metadata": {"name": "db", "namespace": "ns", "uid": "lock-uid", "generation": 3,
                             "creationTimestamp": time_text(0)},
                "spec": spec,
                "status": status,
            });
            (lock, bad)
        })
}

/// A request of the pool as it might be stored, and the fields made unreadable.
fn request_json(i: usize) -> impl Strategy<Value = (Value, Vec<&'static str>)> {
    (
        field::<i32>((1i64..3).prop_map(|n| json!(n))),
        field::<Option<String>>(duration_text()),
        prop_oneof![
            Just(None),
            Just(Some("Pending")),
            Just(Some("Granted")),
            Just(Some("Expired")),
            Just(Some("Rejected")),
            Just(Some("Bogus"))
        ],
        field::<Option<i64>>((1i64..20).prop_map(|n| json!(n))),
        0i64..4,
        any::<bool>(),
    )
        .prop_map(move |(permits, lease, phase, token, created, break_it)| {
            let mut spec = json!({"lockName": "db", "holderIdentity": format!("h{i}")});
            put(&mut spec, "permits", &permits);
            put(&mut spec, "leaseDuration", &lease);
            let mut status = json!({});
            if let Some(p) = phase {
                status["phase"] = json!(p);
                status["lockUID"] = json!("lock-uid");
            }
            put(&mut status, "token", &token);
            let mut metadata = json!({"name": format!("r{i}"), "namespace": "ns", "uid": format!("u{i}"),
                                      "generation": 1, "creationTimestamp": time_text(created)});
            if break_it && i == 0 {
                metadata["annotations"] = json!({api::BREAK_ANNOTATION: "test"});
            }
            let mut bad = Vec::new();
            for (name, f) in [("permits", &permits), ("leaseDuration", &lease)] {
                if f.1 {
                    bad.push(name);
                }
            }
            if token.1 {
                bad.push("token");
            }
            if phase == Some("Bogus") {
                bad.push("phase");
            }
            let r = json!({
                "apiVersion": "kubelock.dev/v1alpha1",
                "kind": "LockRequest",
                "metadata": metadata,
                "spec": spec,
                "status": status,
            });
            (r, bad)
        })
}

fn requests_json() -> impl Strategy<Value = Vec<(Value, Vec<&'static str>)>> {
    (0..POOL).map(request_json).collect::<Vec<_>>().prop_flat_map(|all| proptest::sample::subsequence(all, 0..=POOL))
}

/// A holder entry readable on its own as a typed [`Holder`].
fn readable_holder(h: &Value) -> Option<Holder> {
    serde_json::from_value(h.clone()).ok()
}

fn plan_of(lock: &Lock, requests: &[Arc<LockRequest>]) -> Plan {
    let fresh: HashSet<String> = requests.iter().filter_map(|r| r.metadata.uid.clone()).collect();
    let arrival: HashMap<String, u64> =
        requests.iter().enumerate().filter_map(|(i, r)| Some((r.metadata.uid.clone()?, i as u64))).collect();
    plan(Inputs {
        lock,
        lock_fresh: true,
        requests,
        fresh: &fresh,
        gone: &HashSet::new(),
        pods: &BTreeMap::new(),
        released: &HashSet::new(),
        gone_pods: &HashMap::new(),
        pods_unreadable: None,
        other_locks: &HashSet::new(),
        arrival: &arrival,
        observations: &Observations::default(),
        settings: &Settings::default(),
        now: Now { mono: Duration::from_secs(100), wall: Timestamp::from_second(1_800_000_100).expect("in range") },
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_planner_over_arbitrary_objects((lock_value, lock_bad) in lock_json(), request_values in requests_json()) {
        let lock = api::lenient(lock_value.clone(), api::placeholder_lock);
        let requests: Vec<Arc<LockRequest>> =
            request_values.iter().map(|(v, _)| Arc::new(api::lenient(v.clone(), api::placeholder_request))).collect();
        let p = plan_of(&lock, &requests);
        let new_status = p.lock_status.clone();
        if api::grants_unreadable(&lock) {
            // Grants that cannot be read are not overwritten: the plan touches nothing.
            prop_assert!(new_status.is_none() && p.requests.is_empty() && p.events.is_empty(), "{p:?}");
            prop_assert!(p.invalid_spec.as_deref().is_some_and(|w| w.contains("status.holders") || w.contains("status.fencingToken")));
            return Ok(());
        }

        // Never loses a grant: readable holder entries stay unless a rule ends them.
        let by_uid: HashMap<&str, &LockRequest> =
            requests.iter().filter_map(|r| Some((r.metadata.uid.as_deref()?, r.as_ref()))).collect();
        let mut seen = HashSet::new();
        let raw_holders = lock_value["status"]["holders"].as_array().cloned().unwrap_or_default();
        for h in raw_holders.iter().filter_map(readable_holder) {
            if !seen.insert(h.request_uid.clone()) {
                continue;
            }
            // Only its holder's own release or a passed lease frees its permits; any other end
            // keeps them, draining.
            let freed = by_uid.get(h.request_uid.as_str()).is_some_and(|r| r.spec.released || r.phase().is_final());
            if freed {
                continue;
            }
            if let Some(status) = &new_status {
                let same = |uid: &str, token: i64| uid == h.request_uid && token == h.token;
                prop_assert!(
                    status.holders.iter().any(|k| same(&k.request_uid, k.token))
                        || status.draining.iter().any(|k| same(&k.request_uid, k.token)),
                    "holder {} (token {}) was dropped.\nstored lock: {lock_value}\nread as: {:?}\nnew status: {status:?}",
                    h.request, h.token, lock.status
                );
            }
        }

        // Tokens: new grants above everything issued (the stored fencing token and every token
        // a holder or a request remembers), never wrapping.
        if let Some(status) = &new_status {
            let mut issued = lock_value["status"]["fencingToken"].as_i64().unwrap_or(0);
            for h in raw_holders.iter().filter_map(readable_holder) {
                issued = issued.max(h.token);
            }
            for r in &requests {
                if let Some(s) = &r.status && s.lock_uid.as_deref() == Some("lock-uid") {
                    issued = issued.max(s.token.unwrap_or(0));
                }
            }
            let old: HashSet<String> = lock.status.iter().flat_map(|s| &s.holders).map(|h| h.request_uid.clone()).collect();
            for h in status.holders.iter().filter(|h| !old.contains(&h.request_uid)) {
                prop_assert!(h.token > issued, "new grant token {} not above {issued} issued before", h.token);
            }
            prop_assert!(status.fencing_token >= issued, "fencingToken {} below {issued} issued before\nstored lock: {lock_value}", status.fencing_token);
        }

        // Says what is wrong with the Lock.
        if !lock_bad.is_empty() {
            let why = p.invalid_spec.clone().unwrap_or_default();
            prop_assert!(
                lock_bad.iter().any(|f| why.contains(f)),
                "lock with unreadable {lock_bad:?}: the plan says {why:?}\nstored lock: {lock_value}"
            );
            if let Some(status) = &new_status {
                let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
                prop_assert!(ready.is_some_and(|c| c.status == "False" && c.message == why), "Ready condition: {ready:?}");
            }
            prop_assert!(!p.events.iter().any(|e| e.kind == EventKind::Granted), "granted on an unreadable lock");
        }

        // Says what is wrong with an unreadable waiting request (one that was not a holder).
        let holders: HashSet<String> = raw_holders.iter().filter_map(readable_holder).map(|h| h.request_uid).collect();
        for ((value, bad), r) in request_values.iter().zip(&requests) {
            let uid = r.metadata.uid.clone().unwrap_or_default();
            let spec_bad: Vec<&str> = bad.iter().copied().filter(|f| *f == "permits" || *f == "leaseDuration").collect();
            if spec_bad.is_empty() || holders.contains(&uid) || r.phase() != Phase::Pending
                || r.annotations().contains_key(api::BREAK_ANNOTATION) {
                continue;
            }
            let update = p.requests.iter().find(|u| u.uid == uid);
            let message = update.and_then(|u| u.status.message.clone()).unwrap_or_default();
            prop_assert!(
                update.is_some_and(|u| u.status.phase == Some(Phase::Rejected)) && spec_bad.iter().any(|f| message.contains(f)),
                "request with unreadable {spec_bad:?}: {update:?}\nstored request: {value}"
            );
        }
    }

    /// Typed values at the edges (no JSON): huge tokens and permits, odd durations.
    #[test]
    fn fuzz_planner_at_integer_edges(
        fencing in prop_oneof![Just(i64::MAX), Just(i64::MAX - 1), Just(0i64), Just(-5i64), 0i64..100],
        permits in prop_oneof![Just(i32::MAX), Just(1i32), Just(0i32), Just(-1i32), 1i32..5],
        wants in prop_oneof![Just(i32::MAX), Just(1i32), Just(0i32), Just(-3i32), 1i32..5],
        held_token in prop_oneof![Just(i64::MAX), Just(i64::MIN), 0i64..100],
        n in 0usize..4,
    ) {
        let mut lock = Lock::new("db", crate::api::LockSpec { permits, ..Default::default() });
        lock.metadata.uid = Some("lock-uid".into());
        lock.status = Some(LockStatus {
            fencing_token: fencing,
            holders: vec![Holder {
                request: "h".into(), request_uid: "uh".into(), holder: "h".into(), permits: 1,
                token: held_token, granted_at: MicroTime(Timestamp::UNIX_EPOCH), lease_duration: "30s".into(),
                pod_ref: None,
            }],
            ..Default::default()
        });
        let mut requests = Vec::new();
        for i in 0..n {
            let mut r = LockRequest::new(&format!("r{i}"), crate::api::LockRequestSpec {
                lock_name: "db".into(), holder_identity: String::new(), permits: wants,
                lease_duration: None, renew_time: None, pod_ref: None, released: false,
            });
            r.metadata.uid = Some(format!("u{i}"));
            requests.push(Arc::new(r));
        }
        let p = plan_of(&lock, &requests);
        if let Some(status) = &p.lock_status {
            let issued = fencing.max(held_token);
            prop_assert!(status.holders.iter().any(|h| h.request_uid == "uh"), "the holder was dropped");
            for h in status.holders.iter().filter(|h| h.request_uid != "uh") {
                prop_assert!(h.token > issued, "token {} issued after {issued}", h.token);
            }
            prop_assert!(status.fencing_token >= fencing, "fencing token went back");
        }
    }
}

// ---- regressions found by the fault runs ----

/// Found by `faults::control_plane_outages_frozen_and_skewed_holders`: kube-apiserver died
/// right after the Lock CAS that granted `a`, so `a`'s status was never mirrored (still
/// `Pending`). `a`'s holder lost its lease in the outage and the controller expired it
/// (Lock CAS, then the `Expired` mirror). The next reconcile ran on a request cache that had
/// not caught up with that mirror: `a` looked like a fresh waiter and was granted again, with
/// a new token — an `Expired` request granted, which is final (docs/design.md).
#[test]
fn a_request_whose_grant_ended_is_never_granted_again() {
    let mut lock =
        Lock::new("db", crate::api::LockSpec { permits: 1, lease_duration: "10s".into(), ..Default::default() });
    lock.metadata.uid = Some("lock-uid".into());
    let mut a = LockRequest::new(
        "a",
        crate::api::LockRequestSpec {
            lock_name: "db".into(),
            holder_identity: String::new(),
            permits: 1,
            lease_duration: None,
            renew_time: None,
            pod_ref: None,
            released: false,
        },
    );
    a.metadata.uid = Some("ua".into());
    a.metadata.generation = Some(1);
    let requests = vec![Arc::new(a)];
    let fresh: HashSet<String> = ["ua".to_string()].into();
    let arrival: HashMap<String, u64> = [("ua".to_string(), 1)].into();
    let settings = Settings::default();
    let at =
        |s: u64| Now { mono: Duration::from_secs(s), wall: Timestamp::from_second(1_800_000_000 + s as i64).unwrap() };
    let plan_at = |lock: &Lock, obs: &Observations, now: Now| {
        plan(Inputs {
            lock,
            lock_fresh: true,
            requests: &requests,
            fresh: &fresh,
            gone: &HashSet::new(),
            pods: &BTreeMap::new(),
            released: &HashSet::new(),
            gone_pods: &HashMap::new(),
            pods_unreadable: None,
            other_locks: &HashSet::new(),
            arrival: &arrival,
            observations: obs,
            settings: &settings,
            now,
        })
    };
    // Granted (the Lock CAS succeeds; the mirror of `a`'s status does not).
    let p = plan_at(&lock, &Observations::default(), at(0));
    lock.status = p.lock_status.clone();
    assert!(lock.status.as_ref().unwrap().holders[0].token > 0);
    // No renewal for the lease: expired (the Lock CAS succeeds; `a`'s cached status stays Pending).
    let p = plan_at(&lock, &p.observations, at(11));
    lock.status = p.lock_status.clone();
    assert!(lock.status.as_ref().unwrap().holders.is_empty(), "expired");
    assert!(p.requests.iter().any(|u| u.uid == "ua" && u.status.phase == Some(Phase::Expired)));
    // The next reconcile, on the same (lagging) cache: `a` must not be granted again.
    let p = plan_at(&lock, &p.observations, at(12));
    let again: Vec<_> = p.lock_status.iter().flat_map(|s| &s.holders).filter(|h| h.request_uid == "ua").collect();
    assert!(again.is_empty(), "the expired request was granted again: {again:?}");
}

/// Found by `fuzz_planner_over_arbitrary_objects`: one unreadable status field (here a
/// `waiting` beyond i32, which the schema's plain `integer` admits) made the reader drop the
/// whole status, and the plan then wrote a status without the holders — and with a fencing
/// token reset to what the requests remembered. Now the field is named and only it is dropped.
#[test]
fn an_unreadable_status_field_is_named_and_the_holders_are_kept() {
    let value = json!({
        "apiVersion": "kubelock.dev/v1alpha1", "kind": "Lock",
        "metadata": {"name": "db", "namespace": "ns", "uid": "lock-uid", "generation": 1},
        "spec": {"permits": 1, "leaseDuration": "30s"},
        "status": {"fencingToken": 7, "waiting": i64::from(i32::MAX) + 1, "holders": [{
            "request": "r0", "requestUID": "u0", "holder": "h0", "permits": 1, "token": 7,
            "grantedAt": "2027-01-15T08:00:00Z", "leaseDuration": "30s"}]},
    });
    let lock = api::lenient(value, api::placeholder_lock);
    assert_eq!(
        api::malformed(&lock),
        Some("does not match the schema: status.waiting: invalid value: integer `2147483648`, expected i32")
    );
    let p = plan_of(&lock, &[]);
    let status = p.lock_status.expect("the status is rewritten");
    assert_eq!(status.fencing_token, 7);
    assert_eq!(status.holders.len(), 1, "{status:?}");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.message.contains("status.waiting")), ("False", true));
}

/// An unreadable spec keeps the status (the grants) and names the field.
#[test]
fn an_unreadable_spec_field_is_named_and_the_status_is_kept() {
    let value = json!({
        "apiVersion": "kubelock.dev/v1alpha1", "kind": "Lock",
        "metadata": {"name": "db", "namespace": "ns", "uid": "lock-uid"},
        "spec": {"permits": "three"},
        "status": {"fencingToken": 4, "holders": [{
            "request": "r0", "requestUID": "u0", "holder": "h0", "permits": 1, "token": 4,
            "grantedAt": "2027-01-15T08:00:00Z", "leaseDuration": "30s"}]},
    });
    let lock = api::lenient(value, api::placeholder_lock);
    assert!(
        api::malformed(&lock).unwrap().contains("spec.permits: invalid type: string \"three\""),
        "{:?}",
        api::malformed(&lock)
    );
    let p = plan_of(&lock, &[]);
    let status = p.lock_status.expect("a Ready condition is written");
    assert_eq!((status.fencing_token, status.holders.len()), (4, 1));
    assert!(p.invalid_spec.unwrap().contains("spec.permits"));
}

/// Found by `faults::malformed_objects_get_a_condition_and_others_keep_being_served`: a
/// holder's request whose status had an unreadable field (`position` beyond i32) was read
/// without it, which matched what the plan wanted, so the status was never rewritten and the
/// request stayed unreadable for every typed client.
#[test]
fn an_unreadable_request_status_is_rewritten() {
    let lock_value = json!({
        "apiVersion": "kubelock.dev/v1alpha1", "kind": "Lock",
        "metadata": {"name": "db", "namespace": "ns", "uid": "lock-uid"},
        "spec": {"permits": 1},
        "status": {"fencingToken": 1, "holders": [{
            "request": "r0", "requestUID": "u0", "holder": "h0", "permits": 1, "token": 1,
            "grantedAt": "2027-01-15T08:00:00Z", "leaseDuration": "30s"}]},
    });
    let lock = api::lenient(lock_value, api::placeholder_lock);
    let request = |position: Value| {
        json!({
            "apiVersion": "kubelock.dev/v1alpha1", "kind": "LockRequest",
            "metadata": {"name": "r0", "namespace": "ns", "uid": "u0", "generation": 1},
            "spec": {"lockName": "db", "holderIdentity": "h0"},
            "status": {"phase": "Granted", "token": 1, "grantedAt": "2027-01-15T08:00:00Z", "leaseDuration": "30s",
                       "lockUID": "lock-uid", "message": "holding 1 permit(s) with fencing token 1", "position": position},
        })
    };
    // Readable: whatever the plan wants is written once, then nothing.
    let r = Arc::new(api::lenient(request(Value::Null), api::placeholder_request));
    let first = plan_of(&lock, std::slice::from_ref(&r));
    let mut settled = (*r).clone();
    settled.status = first.requests.first().map(|u| u.status.clone()).or(settled.status);
    assert!(plan_of(&lock, &[Arc::new(settled.clone())]).requests.is_empty());
    // The same status with an unreadable position: rewritten.
    let mut bad = request(json!(i64::from(i32::MAX) + 1));
    bad["status"] = serde_json::to_value(settled.status.clone()).unwrap();
    bad["status"]["position"] = json!(i64::from(i32::MAX) + 1);
    let r = Arc::new(api::lenient(bad, api::placeholder_request));
    assert!(api::malformed(r.as_ref()).is_some_and(|m| m.contains("status.position")));
    let p = plan_of(&lock, &[r]);
    assert_eq!(p.requests.len(), 1, "{p:?}");
    assert_eq!(p.requests[0].status.phase, Some(Phase::Granted));
}

/// A draining grant takes permits as a holder does: an entry the reader could not read (its
/// `permits` beyond i32, which the schema's plain `integer` admits) was dropped, and the plan
/// wrote a status without it and granted the next request while the ended holder could
/// still act.
#[test]
fn an_unreadable_draining_entry_is_never_dropped_and_its_permits_stay_taken() {
    let value = json!({
        "apiVersion": "kubelock.dev/v1alpha1", "kind": "Lock",
        "metadata": {"name": "db", "namespace": "ns", "uid": "lock-uid", "generation": 1},
        "spec": {"permits": 1, "leaseDuration": "30s"},
        "status": {"fencingToken": 7, "draining": [{
            "request": "r0", "requestUID": "u0", "holder": "h0", "permits": i64::from(i32::MAX) + 1,
            "token": 7, "leaseDuration": "30s", "reason": "Deleted", "endedAt": "2027-01-15T08:00:00.000000Z"}]},
    });
    let lock = api::lenient(value, api::placeholder_lock);
    assert!(api::malformed(&lock).is_some_and(|m| m.contains("status.draining")), "{:?}", api::malformed(&lock));
    let waiter: LockRequest = serde_json::from_value(json!({
        "apiVersion": "kubelock.dev/v1alpha1", "kind": "LockRequest",
        "metadata": {"name": "r1", "namespace": "ns", "uid": "u1", "generation": 1,
                     "creationTimestamp": "2027-01-15T08:00:01Z"},
        "spec": {"lockName": "db", "holderIdentity": "h1", "permits": 1},
    }))
    .expect("a request");
    let requests = [Arc::new(waiter)];
    // Plan, write what it asks for, read the Lock back as the controller would, plan again.
    let mut lock = lock;
    for round in 0..2 {
        let p = plan_of(&lock, &requests);
        let granted: Vec<&str> = p.lock_status.iter().flat_map(|s| &s.holders).map(|h| h.request.as_str()).collect();
        assert!(granted.is_empty(), "round {round}: granted {granted:?} while the ended holder may still act");
        assert!(p.invalid_spec.as_deref().is_some_and(|w| w.contains("status.draining")), "round {round}");
        if let Some(status) = p.lock_status {
            let mut stored = serde_json::to_value(&lock).expect("json");
            stored["metadata"]["annotations"] = json!({});
            stored["status"] = serde_json::to_value(&status).expect("json");
            lock = api::lenient(stored, api::placeholder_lock);
        }
    }
}
