//! The admission webhook in front of a real API server (reached at a loopback URL, its CA
//! in the configurations): who may touch a request, what of it may change, who breaks, the
//! bounds of Locks and requests, and the fence of a ConfigMap labelled with a Lock.

use k8s_openapi::{
    api::core::v1::ConfigMap,
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use kubelock::{
    api::{
        BREAK_ANNOTATION, BROKEN_BY_ANNOTATION, FENCED_BY_LABEL, FENCING_TOKEN_ANNOTATION, Lock, LockRequest,
        OWNER_ANNOTATION, Phase,
    },
    client::{AcquireOptions, LockClient},
};
use serde_json::json;

use crate::support::{
    Identity, TIMEOUT, eventually,
    fixtures::{Fixture, create_request, lock_with, release, request, requester_rules},
    rule, wait_gone, wait_until,
};

/// The message of a refusal by the webhook (403), or a panic naming what was let through.
fn refused<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) -> String {
    match result {
        Err(kube::Error::Api(e)) if e.code == 403 => e.message,
        other => panic!("{what}: expected a 403 from the admission webhook, got {other:?}"),
    }
}

fn merge(patch: serde_json::Value) -> Patch<serde_json::Value> {
    Patch::Merge(patch)
}

#[tokio::test]
async fn only_its_creator_the_controller_and_a_breaker_may_touch_a_request() {
    let f = Fixture::with_webhook().await;
    f.env.grant(Identity::Requester2, requester_rules()).await;
    let mine = &f.requests; // kubelock-requester-1
    let theirs: Api<LockRequest> = f.env.api(Identity::Requester2).await;
    let owner = Identity::Requester1.user();
    let pp = PatchParams::default();
    f.lock("db", 1, "5s", "0s").await;

    let r1 = f.request("r1", "db", 1).await;
    assert_eq!(r1.annotations().get(OWNER_ANNOTATION), Some(&owner), "the creator is recorded");
    f.wait_phase("r1", Phase::Granted).await;

    // Somebody else: refused, naming whose it is.
    let m = refused(theirs.delete("r1", &DeleteParams::default()).await, "requester-2 deleting r1");
    assert!(m.contains(&format!("belongs to {owner}")), "{m}");
    let renew = json!({"spec": {"renewTime": MicroTime(jiff::Timestamp::now())}});
    let m = refused(theirs.patch("r1", &pp, &merge(renew.clone())).await, "requester-2 renewing r1");
    assert!(m.contains(&format!("belongs to {owner}")), "{m}");
    let m = refused(theirs.patch("r1", &pp, &merge(json!({"spec": {"lockName": "other"}}))).await, "re-point");
    assert!(m.contains(&format!("belongs to {owner}")), "{m}");
    let brk = json!({"metadata": {"annotations": {BREAK_ANNOTATION: "stuck"}}});
    let m = refused(theirs.patch("r1", &pp, &merge(brk.clone())).await, "requester-2 breaking r1");
    assert!(m.contains("only subjects allowed to break lock db"), "{m}");
    let mut forged = LockRequest::new("r2", kubelock::api::LockRequestSpec::new("db"));
    forged.metadata.annotations = Some([(OWNER_ANNOTATION.to_string(), owner.clone())].into());
    let m = refused(theirs.create(&PostParams::default(), &forged).await, "a forged creator");
    assert!(m.contains(OWNER_ANNOTATION), "{m}");

    // The creator: renews and releases, but changes nothing it was granted for.
    mine.patch("r1", &pp, &merge(renew)).await.expect("the creator renews");
    for (field, value) in [
        ("lockName", json!("other")),
        ("permits", json!(2)),
        ("leaseDuration", json!("1m")),
        ("holderIdentity", json!("someone")),
        ("podRef", json!({"name": "a-pod"})),
    ] {
        let m = refused(mine.patch("r1", &pp, &merge(json!({"spec": {field: value}}))).await, field);
        assert!(m.contains(&format!("spec.{field} cannot change")), "{field}: {m}");
    }
    let m = refused(
        mine.patch("r1", &pp, &merge(json!({"metadata": {"annotations": {OWNER_ANNOTATION: "me"}}}))).await,
        "changing the creator",
    );
    assert!(m.contains(OWNER_ANNOTATION), "{m}");

    // The controller deletes a released request (it is trusted).
    f.lock("other", 1, "5s", "0s").await;
    create_request(mine, "r3", "other", 1, None).await;
    f.wait_phase("r3", Phase::Granted).await;
    release(mine, "r3").await;
    wait_gone(mine, "r3", TIMEOUT).await.expect("the controller deletes a released request");

    // A breaker (verb break on the Lock) may break it, recorded as who it is, and delete it.
    f.env.grant(Identity::Requester2, vec![rule(&["kubelock.dev"], &["locks"], &["break"])]).await;
    // Not by marking it released, though: that would free the permits at once.
    let m = refused(theirs.patch("r1", &pp, &merge(json!({"spec": {"released": true}}))).await, "a breaker's release");
    assert!(m.contains("spec.released is the holder's own release"), "{m}");
    f.env
        .kubelock(Identity::Requester2, "break")
        .args(["break", "db", "--reason", "stuck migration", "--by", "someone-else"])
        .output(TIMEOUT)
        .await
        .success("kubelock break as a breaker");
    let broken = mine.get("r1").await.expect("r1");
    assert_eq!(
        broken.annotations().get(BROKEN_BY_ANNOTATION),
        Some(&Identity::Requester2.user()),
        "who broke is the authenticated user, not --by"
    );
    wait_until(&f.locks, "db", "r1 draining", TIMEOUT, |l: &Lock| {
        l.status.as_ref().is_some_and(|s| s.draining.iter().any(|d| d.request == "r1"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let breaker = format!("broken by {}: stuck migration", Identity::Requester2.user());
    wait_until(mine, "r1", "the break recorded as the breaker's", TIMEOUT, |r: &LockRequest| {
        r.status.iter().flat_map(|s| &s.conditions).any(|c| c.message.contains(&breaker))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    theirs.delete("r1", &DeleteParams::default()).await.expect("a breaker may delete the request");
}

#[tokio::test]
async fn a_fenced_configmap_takes_the_writes_of_a_current_holder_alone() {
    let f = Fixture::with_webhook().await;
    let cm_rules = rule(&[""], &["configmaps"], &["get", "create", "update", "patch", "delete"]);
    f.env.grant(Identity::Requester1, vec![cm_rules.clone()]).await;
    f.env.grant(Identity::Requester2, [requester_rules(), vec![cm_rules]].concat()).await;
    f.lock("stock", 1, "30s", "0s").await;
    let ns = f.env.ns().to_string();
    let first = LockClient::new(f.env.client(Identity::Requester1).await, &ns);
    let second = LockClient::new(f.env.client(Identity::Requester2).await, &ns);
    let cms1: Api<ConfigMap> = f.env.api(Identity::Requester1).await;
    let cms2: Api<ConfigMap> = f.env.api(Identity::Requester2).await;
    let pp = PostParams::default();

    let g1 = first.acquire(AcquireOptions::new("stock")).await.expect("first holder");
    let mut cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("stock".into()),
            labels: Some([(FENCED_BY_LABEL.to_string(), "stock".to_string())].into()),
            ..Default::default()
        },
        data: Some([("stock".to_string(), "10".to_string())].into()),
        ..Default::default()
    };
    let m = refused(cms1.create(&pp, &cm).await, "a fenced object without a token");
    assert!(m.contains("carries no fencing token"), "{m}");
    g1.fence(&mut cm);
    let mut cm = cms1.create(&pp, &cm).await.expect("the holder creates the fenced object");
    cm.annotations_mut().insert(FENCING_TOKEN_ANNOTATION.into(), (g1.token() + 1000).to_string());
    let m = refused(cms1.replace("stock", &pp, &cm).await, "a foreign token");
    assert!(m.contains("is not a current holder's"), "{m}");

    // Handover: the first holder's token is refused from now on, the second's accepted.
    let waiting = tokio::spawn(async move { second.acquire(AcquireOptions::new("stock")).await });
    wait_until(&f.locks, "stock", "a waiter", TIMEOUT, |l: &Lock| l.status.as_ref().is_some_and(|s| s.waiting == 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stale = g1.token();
    g1.release().await.expect("first release");
    let g2 = waiting.await.expect("join").expect("second holder");
    assert!(g2.token() > stale);
    let mut cm = cms1.get("stock").await.expect("read");
    cm.data = Some([("stock".to_string(), "9".to_string())].into());
    cm.annotations_mut().insert(FENCING_TOKEN_ANNOTATION.into(), stale.to_string());
    let m = refused(cms1.replace("stock", &pp, &cm).await, "the previous holder's token");
    assert!(m.contains(&format!("token {stale} of this write is not a current holder's")), "{m}");
    // Whatever the writer's rights: a cluster administrator's stale write is refused too.
    let admin: Api<ConfigMap> = f.env.api(Identity::Admin).await;
    let m = refused(admin.replace("stock", &pp, &cm).await, "an administrator's stale write");
    assert!(m.contains("is not a current holder's"), "{m}");
    g2.fence(&mut cm);
    let cm = cms2.replace("stock", &pp, &cm).await.expect("the current holder writes");
    assert_eq!(cm.data.as_ref().and_then(|d| d.get("stock")).map(String::as_str), Some("9"));

    // Removing the label is a write under the fence too.
    let unlabel =
        json!({"metadata": {"labels": {FENCED_BY_LABEL: null}, "annotations": {FENCING_TOKEN_ANNOTATION: null}}});
    let m = refused(cms1.patch("stock", &PatchParams::default(), &merge(unlabel)).await, "removing the label");
    assert!(m.contains("carries no fencing token"), "{m}");

    // A delete needs the last write to be a current holder's: not once the holder released.
    g2.release().await.expect("second release");
    wait_until(&f.locks, "stock", "no holder", TIMEOUT, |l: &Lock| {
        l.status.as_ref().is_some_and(|s| s.holders.is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let m = refused(cms2.delete("stock", &DeleteParams::default()).await, "deleting after the release");
    assert!(m.contains("it has no holder now"), "{m}");
}

#[tokio::test]
async fn bounds_of_locks_and_requests_are_refused_at_admission_naming_the_field() {
    let f = Fixture::with_webhook().await;
    let m = refused(f.locks.create(&PostParams::default(), &lock_with("wide", 5000, "30s", "0s")).await, "permits");
    assert!(m.contains("spec.permits 5000"), "{m}");
    let m = refused(f.locks.create(&PostParams::default(), &lock_with("hot", 1, "10ms", "0s")).await, "lease");
    assert!(m.contains("spec.leaseDuration 10ms"), "{m}");
    let mut lock = lock_with("q", 1, "30s", "0s");
    lock.spec.max_waiting = Some(2);
    f.locks.create(&PostParams::default(), &lock).await.expect("creating q");
    let spec = kubelock::api::LockRequestSpec {
        lease_duration: Some("1ms".into()),
        ..kubelock::api::LockRequestSpec::new("q")
    };
    let m = refused(f.requests.create(&PostParams::default(), &LockRequest::new("fast", spec)).await, "lease");
    assert!(m.contains("spec.leaseDuration 1ms"), "{m}");

    for name in ["h", "w1", "w2"] {
        f.request(name, "q", 1).await;
    }
    wait_until(&f.locks, "q", "two waiting", TIMEOUT, |l: &Lock| l.status.as_ref().is_some_and(|s| s.waiting == 2))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The webhook reads Locks from its cache: a dry run (nothing stored) until it has seen them.
    let dry = PostParams { dry_run: true, ..Default::default() };
    let third = request("w3", "q", "test/w3");
    let m = eventually("the third waiter to be refused", TIMEOUT, || async {
        match f.requests.create(&dry, &third).await {
            Err(kube::Error::Api(e)) if e.code == 403 => Ok(e.message),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(m.contains("spec.maxWaiting is 2"), "{m}");
    refused(f.requests.create(&PostParams::default(), &third).await, "a third waiter");
}

// ---------------------------------------------------------------------------------------
// The shop: a stock in a fenced ConfigMap, buyers that read, decide and write back.

/// Stock and ledger (`sales`: comma-separated sale ids) of the shop's ConfigMap.
fn shop(cm: &ConfigMap) -> (i64, Vec<String>) {
    let data = cm.data.clone().unwrap_or_default();
    let stock = data.get("stock").and_then(|s| s.parse().ok()).expect("a stock");
    let sales = data.get("sales").map(|s| s.split(',').filter(|s| !s.is_empty()).map(String::from).collect());
    (stock, sales.unwrap_or_default())
}

/// One sale as a buyer makes it: the write-back of what it read, with its token, as a merge
/// patch (no resourceVersion: a stale writer overwrites what it did not see, unless fenced).
/// `Ok(true)`: sold; `Ok(false)`: out of stock; `Err(message)`: refused.
async fn sell(cms: &Api<ConfigMap>, read: &ConfigMap, token: i64, sale: &str) -> Result<bool, String> {
    let (stock, mut sales) = shop(read);
    if stock <= 0 {
        return Ok(false);
    }
    sales.push(sale.to_string());
    let patch = json!({
        "metadata": {"annotations": {FENCING_TOKEN_ANNOTATION: token.to_string()}},
        "data": {"stock": (stock - 1).to_string(), "sales": sales.join(",")},
    });
    match cms.patch("stock", &PatchParams::default(), &merge(patch)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 403 => Err(e.message),
        Err(e) => panic!("selling {sale}: {e}"),
    }
}

/// The seed's scenario under faults: three buyers sell under the Lock; a fourth is frozen
/// (its request granted, then never renewed, as a paused process) between its read and its
/// write, thawed once another buyer sold after its grant ended, and writes its stale sale;
/// the controller is killed and replaced twice. The API server refuses every stale write:
/// the stock never goes below zero and every sale a buyer recorded is in the ledger exactly
/// once, with none it did not record.
#[tokio::test]
async fn the_stock_is_never_oversold_and_no_sale_lost_with_frozen_buyers_and_controller_kills() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    const STOCK: i64 = 30;
    const FREEZES: usize = 3;
    let mut f = Fixture::with_webhook().await;
    f.env.grant(Identity::Requester1, vec![rule(&[""], &["configmaps"], &["get", "create", "patch"])]).await;
    f.lock("stock", 1, "2s", "0s").await;
    let ns = f.env.ns().to_string();
    let cms: Api<ConfigMap> = f.env.api(Identity::Requester1).await;
    let locks = LockClient::new(f.env.client(Identity::Requester1).await, &ns);

    let opening = locks.acquire(AcquireOptions::new("stock")).await.expect("the opening grant");
    let mut cm = ConfigMap {
        metadata: ObjectMeta { name: Some("stock".into()), ..Default::default() },
        data: Some([("stock".to_string(), STOCK.to_string()), ("sales".to_string(), String::new())].into()),
        ..Default::default()
    };
    opening.fence(&mut cm);
    cms.create(&PostParams::default(), &cm).await.expect("opening the shop");
    opening.release().await.expect("release");

    let frozen_done = Arc::new(AtomicBool::new(false));
    let buyers: Vec<_> = (0..3)
        .map(|b| {
            let (locks, cms, frozen_done) = (locks.clone(), cms.clone(), frozen_done.clone());
            tokio::spawn(async move {
                let mut recorded = Vec::new();
                for n in 0.. {
                    let guard = locks.acquire(AcquireOptions::new("stock")).await.expect("a buyer's grant");
                    let read = cms.get("stock").await.expect("reading the stock");
                    let sale = format!("b{b}-{n}");
                    let sold = sell(&cms, &read, guard.token(), &sale).await;
                    guard.release().await.expect("a buyer's release");
                    match sold {
                        Ok(true) => recorded.push(sale),
                        Ok(false) if frozen_done.load(Ordering::SeqCst) => break,
                        Ok(false) => {}
                        Err(m) => panic!("a current holder's write was refused: {m}"),
                    }
                }
                recorded
            })
        })
        .collect();

    // The frozen buyer: granted, reads, stops renewing; thawed once another sold after it.
    let frozen = {
        let (requests, cms, locks_api, frozen_done) =
            (f.requests.clone(), cms.clone(), f.locks.clone(), frozen_done.clone());
        tokio::spawn(async move {
            let mut refusals = Vec::new();
            for round in 0..FREEZES {
                let name = format!("frozen-{round}");
                create_request(&requests, &name, "stock", 1, None).await;
                // It renews while it waits (as every client does), not once granted.
                let granted = eventually("the frozen buyer's grant", TIMEOUT, || async {
                    let r = requests.get(&name).await.map_err(|e| e.to_string())?;
                    if r.phase() == Phase::Granted {
                        return Ok(r);
                    }
                    let renew = json!({"spec": {"renewTime": MicroTime(jiff::Timestamp::now())}});
                    requests.patch(&name, &PatchParams::default(), &merge(renew)).await.map_err(|e| e.to_string())?;
                    Err(format!("{:?}", r.phase()))
                })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                let token = granted.status.and_then(|s| s.token).expect("a token");
                let read = cms.get("stock").await.expect("the frozen buyer's read");
                // Frozen: no renewal. Its lease passes, the next buyer is granted and sells.
                wait_until(&locks_api, "stock", "the frozen grant to end", TIMEOUT, |l: &Lock| {
                    l.status.as_ref().is_some_and(|s| !s.holders.iter().any(|h| h.request == name))
                })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                let sold_after = eventually("another buyer to sell after the frozen grant", TIMEOUT, || async {
                    let now = cms.get("stock").await.map_err(|e| e.to_string())?;
                    let last: i64 =
                        now.annotations().get(FENCING_TOKEN_ANNOTATION).and_then(|t| t.parse().ok()).unwrap_or(0);
                    if last > token || shop(&now).0 == 0 {
                        Ok(shop(&now).0 > 0)
                    } else {
                        Err(format!("last write {last}"))
                    }
                })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                if !sold_after {
                    break; // sold out meanwhile
                }
                match sell(&cms, &read, token, &format!("frozen-{round}")).await {
                    Err(m) => refusals.push(m),
                    Ok(sold) => panic!("the frozen buyer's stale write was admitted (sold: {sold})"),
                }
            }
            frozen_done.store(true, Ordering::SeqCst);
            refusals
        })
    };

    // The controller is killed (SIGKILL) and replaced twice while they sell.
    let mut kills = 0;
    for at in [STOCK - 5, STOCK - 15] {
        eventually("sales to go on", TIMEOUT, || async {
            let now = cms.get("stock").await.map_err(|e| e.to_string())?;
            if shop(&now).0 <= at { Ok(()) } else { Err(format!("stock {}", shop(&now).0)) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        f.controllers.last_mut().expect("a controller").kill();
        kills += 1;
        f.start_controller(&[]);
    }

    let refusals = frozen.await.expect("the frozen buyer");
    let mut recorded = Vec::new();
    for buyer in buyers {
        recorded.extend(buyer.await.expect("a buyer"));
    }
    let (stock, ledger) = shop(&cms.get("stock").await.expect("the final stock"));
    assert_eq!(stock, 0, "the buyers stop once sold out");
    assert_eq!(kills, 2, "the controller was killed twice");
    assert!(!refusals.is_empty(), "no stale write was tried: the faults did not happen");
    for m in &refusals {
        assert!(m.contains("is not a current holder's"), "refused for another reason: {m}");
    }
    let mut sorted = ledger.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ledger.len(), "a sale applied twice: {ledger:?}");
    recorded.sort();
    assert_eq!(sorted, recorded, "the ledger and the buyers' records differ (a sale lost or a phantom)");
    assert_eq!(ledger.len() as i64, STOCK, "sold {} of {STOCK}", ledger.len());
    eprintln!("shop: {} sales, {} stale writes refused, {kills} controller kills", ledger.len(), refusals.len());
}
