//! The admission decisions, rule by rule, and properties over random writes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::api::{Holder, LockSpec, LockStatus};

fn user(name: &str) -> User {
    User { username: name.into(), uid: format!("uid-{name}"), groups: vec!["system:authenticated".into()], pod: None }
}

fn request(owner: Option<&str>) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(o) = owner {
        annotations.insert(OWNER_ANNOTATION.into(), json!(o));
        annotations.insert(OWNER_UID_ANNOTATION.into(), json!(format!("uid-{o}")));
    }
    json!({
        "metadata": {"name": "db-abcde", "namespace": "ns", "annotations": annotations},
        "spec": {"lockName": "db", "holderIdentity": "me", "permits": 1, "renewTime": "2026-12-02T00:00:00.000000Z"}
    })
}

fn allowed(d: &Decision) -> bool {
    matches!(d, Decision::Allow { .. })
}

fn lock_with_holders(tokens: &[i64]) -> Lock {
    let mut lock = Lock::new("stock", LockSpec::default());
    lock.status = Some(LockStatus {
        holders: tokens
            .iter()
            .map(|t| Holder {
                request: format!("r{t}"),
                request_uid: format!("u{t}"),
                holder: "x".into(),
                permits: 1,
                token: *t,
                granted_at: MicroTime(jiff::Timestamp::UNIX_EPOCH),
                lease_duration: "10s".into(),
                pod_ref: None,
            })
            .collect(),
        ..Default::default()
    });
    lock
}

fn fenced(lock: Option<&str>, token: Option<&str>) -> Value {
    let mut labels = serde_json::Map::new();
    if let Some(l) = lock {
        labels.insert(FENCED_BY_LABEL.into(), json!(l));
    }
    let mut annotations = serde_json::Map::new();
    if let Some(t) = token {
        annotations.insert(FENCING_TOKEN_ANNOTATION.into(), json!(t));
    }
    json!({"metadata": {"name": "stock", "labels": labels, "annotations": annotations}, "data": {"stock": "5"}})
}

#[test]
fn the_creator_is_recorded_and_a_forged_one_refused() {
    let alice = user("alice");
    let Decision::Allow { patch, .. } = mutate_request(Op::Create, &request(None), None, &alice) else {
        panic!("refused")
    };
    let values: Vec<&Value> = patch.iter().filter_map(|p| p.get("value")).collect();
    assert!(values.contains(&&json!("alice")) && values.contains(&&json!("uid-alice")), "{patch:?}");
    let forged = mutate_request(Op::Create, &request(Some("bob")), None, &alice);
    assert!(matches!(&forged, Decision::Deny(m) if m.contains(OWNER_ANNOTATION) && m.contains("alice")), "{forged:?}");
    // Given right, it stays.
    assert!(allowed(&mutate_request(Op::Create, &request(Some("alice")), None, &alice)));
}

#[test]
fn a_pod_bound_token_fills_the_pod_ref_and_must_match_a_given_one() {
    let pod_user = User {
        username: "system:serviceaccount:ns:app".into(),
        pod: Some(("app-0".into(), "pod-uid".into())),
        ..user("x")
    };
    let Decision::Allow { patch, .. } = mutate_request(Op::Create, &request(None), None, &pod_user) else {
        panic!("refused")
    };
    assert!(patch.iter().any(|p| p["path"] == "/spec/podRef" && p["value"]["name"] == "app-0"), "{patch:?}");
    let mut other = request(None);
    other["spec"]["podRef"] = json!({"name": "app-1"});
    let d = mutate_request(Op::Create, &other, None, &pod_user);
    assert!(matches!(&d, Decision::Deny(m) if m.contains("spec.podRef") && m.contains("app-0")), "{d:?}");
}

#[test]
fn only_the_creator_the_trusted_and_breakers_may_change_or_delete_a_request() {
    let policy = Policy { trusted_users: vec!["controller".into()], ..Policy::default() };
    let old = request(Some("alice"));
    let mut renewed = old.clone();
    renewed["spec"]["renewTime"] = json!("2026-12-02T00:00:10.000000Z");
    for op in [Op::Update, Op::Delete] {
        let obj = (op == Op::Update).then_some(&renewed);
        let by =
            |who: &User, may_break| validate_request(op, obj, Some(&old), who, Context::default(), may_break, &policy);
        assert!(allowed(&by(&user("alice"), None)), "{op:?} by its creator");
        assert!(allowed(&by(&user("controller"), None)), "{op:?} by the controller");
        assert_eq!(by(&user("bob"), None), Decision::NeedsBreakRight("db".into()));
        let d = by(&user("bob"), Some(false));
        assert!(matches!(&d, Decision::Deny(m) if m.contains("belongs to alice")), "{op:?}: {d:?}");
        assert!(allowed(&by(&user("bob"), Some(true))), "{op:?} by a breaker");
        let admin = User { groups: vec!["system:masters".into()], ..user("root") };
        assert!(allowed(&by(&admin, None)));
    }
}

#[test]
fn the_release_mark_is_the_creators_alone() {
    let policy = Policy { trusted_users: vec!["controller".into()], ..Policy::default() };
    let old = request(Some("alice"));
    let mut released = old.clone();
    released["spec"]["released"] = json!(true);
    let review = |who: &User, may_break| {
        validate_request(Op::Update, Some(&released), Some(&old), who, Context::default(), may_break, &policy)
    };
    assert!(allowed(&review(&user("alice"), None)));
    let admin = User { groups: vec!["system:masters".into()], ..user("root") };
    for (who, may_break) in [(user("bob"), Some(true)), (user("controller"), None), (admin, None)] {
        let d = review(&who, may_break);
        assert!(matches!(&d, Decision::Deny(m) if m.contains("spec.released")), "{}: {d:?}", who.username);
    }
}

#[test]
fn who_broke_is_the_authenticated_breaker_never_a_name_given() {
    let policy = Policy::default();
    let old = request(Some("alice"));
    // A break as the mutating webhook leaves it: who is the authenticated user.
    let mut broken = old.clone();
    broken["metadata"]["annotations"][BREAK_ANNOTATION] = json!("stuck");
    broken["metadata"]["annotations"][BROKEN_BY_ANNOTATION] = json!("bob");
    let review = |obj: &Value, who: &str| {
        validate_request(Op::Update, Some(obj), Some(&old), &user(who), Context::default(), Some(true), &policy)
    };
    assert!(allowed(&review(&broken, "bob")));
    // The mutating webhook writes who on a break; a later write cannot change it, nor can the
    // creator name someone.
    let d = review(&broken, "carol");
    assert!(matches!(&d, Decision::Deny(m) if m.contains(BROKEN_BY_ANNOTATION)), "{d:?}");
    let mut forged = old.clone();
    forged["metadata"]["annotations"][BROKEN_BY_ANNOTATION] = json!("somebody else");
    let d = review(&forged, "alice");
    assert!(matches!(&d, Decision::Deny(m) if m.contains(BROKEN_BY_ANNOTATION)), "{d:?}");
    // And the mutation records the user, whatever the client put there.
    let d = mutate_request(Op::Update, &forged_break(&old), Some(&old), &user("bob"));
    let Decision::Allow { patch, .. } = d else { panic!("{d:?}") };
    assert!(patch.iter().any(|p| p["value"] == json!("bob")), "{patch:?}");
}

fn forged_break(old: &Value) -> Value {
    let mut obj = old.clone();
    obj["metadata"]["annotations"][BREAK_ANNOTATION] = json!("stuck");
    obj["metadata"]["annotations"][BROKEN_BY_ANNOTATION] = json!("not-me");
    obj
}

#[test]
fn a_request_of_a_pod_bound_creator_is_its_pods_alone() {
    let policy = Policy::default();
    let mut old = request(Some("system:serviceaccount:ns:app"));
    old["metadata"]["annotations"][OWNER_POD_ANNOTATION] = json!("app-0");
    old["metadata"]["annotations"].as_object_mut().unwrap().remove(OWNER_UID_ANNOTATION);
    let replica = |pod: &str| User {
        username: "system:serviceaccount:ns:app".into(),
        uid: String::new(),
        groups: vec![],
        pod: Some((pod.into(), "u".into())),
    };
    assert!(allowed(&validate_request(
        Op::Delete,
        None,
        Some(&old),
        &replica("app-0"),
        Context::default(),
        None,
        &policy
    )));
    let d = validate_request(Op::Delete, None, Some(&old), &replica("app-1"), Context::default(), Some(false), &policy);
    assert!(matches!(&d, Decision::Deny(m) if m.contains("in pod app-0")), "{d:?}");
}

#[test]
fn what_a_request_was_granted_for_cannot_change() {
    let policy = Policy::default();
    let old = request(Some("alice"));
    for (field, value) in [
        ("lockName", json!("other")),
        ("permits", json!(2)),
        ("podRef", json!({"name": "p"})),
        ("leaseDuration", json!("1h")),
        ("holderIdentity", json!("someone")),
    ] {
        let mut changed = old.clone();
        changed["spec"][field] = value;
        let d =
            validate_request(Op::Update, Some(&changed), Some(&old), &user("alice"), Context::default(), None, &policy);
        assert!(matches!(&d, Decision::Deny(m) if m.contains(&format!("spec.{field}"))), "{field}: {d:?}");
    }
    let mut released = old.clone();
    released["spec"]["released"] = json!(true);
    assert!(allowed(&validate_request(
        Op::Update,
        Some(&released),
        Some(&old),
        &user("alice"),
        Context::default(),
        None,
        &policy
    )));
    let d =
        validate_request(Op::Update, Some(&old), Some(&released), &user("alice"), Context::default(), None, &policy);
    assert!(matches!(&d, Decision::Deny(m) if m.contains("spec.released")), "{d:?}");
    let mut forged = old.clone();
    forged["metadata"]["annotations"][OWNER_ANNOTATION] = json!("mallory");
    let d = validate_request(Op::Update, Some(&forged), Some(&old), &user("alice"), Context::default(), None, &policy);
    assert!(matches!(&d, Decision::Deny(m) if m.contains(OWNER_ANNOTATION)), "{d:?}");
}

#[test]
fn breaking_needs_the_break_right_and_records_who() {
    let policy = Policy::default();
    let old = request(Some("alice"));
    let mut broken = old.clone();
    broken["metadata"]["annotations"][BREAK_ANNOTATION] = json!("stuck");
    broken["metadata"]["annotations"][BROKEN_BY_ANNOTATION] = json!("someone-else");
    // Even its creator needs the right to break.
    assert_eq!(
        validate_request(Op::Update, Some(&broken), Some(&old), &user("alice"), Context::default(), None, &policy),
        Decision::NeedsBreakRight("db".into())
    );
    let d = validate_request(
        Op::Update,
        Some(&broken),
        Some(&old),
        &user("alice"),
        Context::default(),
        Some(false),
        &policy,
    );
    assert!(matches!(&d, Decision::Deny(m) if m.contains("verb break")), "{d:?}");
    let Decision::Allow { patch, .. } = mutate_request(Op::Update, &broken, Some(&old), &user("ops")) else {
        panic!("refused")
    };
    assert!(
        patch.iter().any(|p| p["value"] == "ops" && p["path"].as_str().unwrap().contains("broken-by")),
        "{patch:?}"
    );
}

#[test]
fn bounds_at_create() {
    let policy = Policy { max_requests_per_namespace: 5, ..Policy::default() };
    let mut short = request(None);
    short["spec"]["leaseDuration"] = json!("1ms");
    let d = validate_request(Op::Create, Some(&short), None, &user("a"), Context::default(), None, &policy);
    assert!(matches!(&d, Decision::Deny(m) if m.contains("spec.leaseDuration") && m.contains("1ms")), "{d:?}");
    let d = validate_request(
        Op::Create,
        Some(&request(None)),
        None,
        &user("a"),
        Context { lock: None, in_namespace: 5 },
        None,
        &policy,
    );
    assert!(matches!(&d, Decision::Deny(m) if m.contains("namespace holds 5")), "{d:?}");
    let mut lock = Lock::new("db", LockSpec { max_waiting: Some(2), ..Default::default() });
    lock.status = Some(LockStatus { waiting: 2, ..Default::default() });
    let d = validate_request(
        Op::Create,
        Some(&request(None)),
        None,
        &user("a"),
        Context { lock: Some(&lock), in_namespace: 0 },
        None,
        &policy,
    );
    assert!(matches!(&d, Decision::Deny(m) if m.contains("spec.maxWaiting is 2")), "{d:?}");
    lock.status.as_mut().unwrap().waiting = 1;
    assert!(allowed(&validate_request(
        Op::Create,
        Some(&request(None)),
        None,
        &user("a"),
        Context { lock: Some(&lock), in_namespace: 0 },
        None,
        &policy
    )));
    let d = validate_lock(&json!({"spec": {"permits": 5000}}), &policy);
    assert!(matches!(&d, Decision::Deny(m) if m.contains("spec.permits 5000")), "{d:?}");
    let d = validate_lock(&json!({"spec": {"permits": 1, "leaseDuration": "100ms"}}), &policy);
    assert!(matches!(&d, Decision::Deny(m) if m.contains("spec.leaseDuration")), "{d:?}");
}

#[test]
fn a_fenced_object_takes_writes_of_current_holders_only() {
    let lock = lock_with_holders(&[12]);
    let ok = |op, obj: Option<&Value>, old: Option<&Value>| validate_fenced(op, obj, old, Some(&lock));
    assert!(allowed(&ok(Op::Create, Some(&fenced(Some("stock"), Some("12"))), None)));
    for (token, why) in [(None, "carries no fencing token"), (Some("7"), "token 7"), (Some("x"), "not a fencing token")]
    {
        let d = ok(Op::Create, Some(&fenced(Some("stock"), token)), None);
        assert!(matches!(&d, Decision::Deny(m) if m.contains(why)), "{token:?}: {d:?}");
    }
    // The previous holder's write after a handover: its token is no longer current.
    let old = fenced(Some("stock"), Some("12"));
    let moved_on = lock_with_holders(&[13]);
    let d = validate_fenced(Op::Update, Some(&fenced(Some("stock"), Some("12"))), Some(&old), Some(&moved_on));
    assert!(matches!(&d, Decision::Deny(m) if m.contains("token 12") && m.contains("[13]")), "{d:?}");
    // Removing the label needs a current token too.
    let d = ok(Op::Update, Some(&fenced(None, None)), Some(&old));
    assert!(matches!(&d, Decision::Deny(_)), "{d:?}");
    assert!(allowed(&ok(Op::Update, Some(&fenced(None, Some("12"))), Some(&old))));
    // Not moved to another Lock in one write.
    let d = ok(Op::Update, Some(&fenced(Some("other"), Some("12"))), Some(&old));
    assert!(matches!(&d, Decision::Deny(m) if m.contains("cannot move")), "{d:?}");
    // A delete: the last write must be a current holder's.
    // Not without the holder's word that it deletes: the last write may be a successor's.
    let d = ok(Op::Delete, None, Some(&old));
    assert!(matches!(&d, Decision::Deny(m) if m.contains(FENCED_DELETE_ANNOTATION)), "{d:?}");
    let mut marked = old.clone();
    marked["metadata"]["annotations"][FENCED_DELETE_ANNOTATION] = json!("true");
    assert!(allowed(&ok(Op::Delete, None, Some(&marked))));
    let d = validate_fenced(Op::Delete, None, Some(&old), Some(&moved_on));
    assert!(matches!(&d, Decision::Deny(_)), "{d:?}");
    // A missing Lock fences everything, for everyone (no right writes past the fence).
    let d = validate_fenced(Op::Update, Some(&old), Some(&old), None);
    assert!(matches!(&d, Decision::Deny(m) if m.contains("does not exist")), "{d:?}");
    // Objects without the label are none of the fence's business.
    assert!(allowed(&validate_fenced(Op::Update, Some(&fenced(None, None)), Some(&fenced(None, None)), None)));
}

#[test]
fn a_semaphore_holder_cannot_write_below_the_last_token() {
    let lock = lock_with_holders(&[20, 21]);
    let old = fenced(Some("stock"), Some("21"));
    let d = validate_fenced(Op::Update, Some(&fenced(Some("stock"), Some("20"))), Some(&old), Some(&lock));
    assert!(matches!(&d, Decision::Deny(m) if m.contains("lower than token 21")), "{d:?}");
}

proptest! {
    /// Whoever asks and whatever changes, an allowed update or delete of someone else's request
    /// came from the trusted or a breaker, and an allowed update never changed what the
    /// request was granted for.
    #[test]
    fn no_one_else_touches_a_request_and_its_grant_terms_stay(
        who in prop_oneof!["alice", "bob", "controller"],
        delete in any::<bool>(),
        field in prop_oneof!["lockName", "permits", "leaseDuration", "holderIdentity", "renewTime", "released"],
        may_break in any::<bool>(),
    ) {
        let policy = Policy { trusted_users: vec!["controller".into()], ..Policy::default() };
        let old = request(Some("alice"));
        let mut new = old.clone();
        new["spec"][field.as_str()] = match field.as_str() {
            "permits" => json!(3),
            "released" => json!(true),
            _ => json!("changed"),
        };
        let op = if delete { Op::Delete } else { Op::Update };
        let obj = (!delete).then_some(&new);
        let mut d = validate_request(op, obj, Some(&old), &user(&who), Context::default(), None, &policy);
        if let Decision::NeedsBreakRight(_) = d {
            d = validate_request(op, obj, Some(&old), &user(&who), Context::default(), Some(may_break), &policy);
        }
        if allowed(&d) {
            prop_assert!(who == "alice" || who == "controller" || may_break);
            if !delete && who != "controller" {
                prop_assert!(field == "renewTime" || field == "released", "{field} changed");
            }
        }
    }

    /// An allowed write to a fenced object, by someone who may not break the Lock, carries the
    /// token of a current holder not below the object's last.
    #[test]
    fn fenced_writes_carry_a_current_token(holders in proptest::collection::vec(1i64..20, 0..3), token in 0i64..25, last in 0i64..25) {
        let lock = lock_with_holders(&holders);
        let old = fenced(Some("stock"), Some(&last.to_string()));
        let new = fenced(Some("stock"), Some(&token.to_string()));
        let d = validate_fenced(Op::Update, Some(&new), Some(&old), Some(&lock));
        if allowed(&d) {
            prop_assert!(holders.contains(&token) && token >= last);
        }
    }
}
