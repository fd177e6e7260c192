//! The floors: what the API server itself costs, with no operator in the loop.
//! 1. a compare-and-swap PUT of a Lease;
//! 2. a watch-driven handover: the holder DELETEs a marker, the waiter (already watching)
//!    sees the event and CREATEs its own (two writes and one watch hop).

use std::time::Instant;

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt as _;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::watcher,
};

use kubelock::api::{Holder, Lock, LockRequest, LockStatus};

use crate::{Budget, requester, stats::Samples};

fn lease(name: &str, holder: &str) -> Lease {
    Lease {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            ..Default::default()
        }),
    }
}

/// Item 1: CAS PUT of a Lease (replace carrying the resourceVersion just read).
pub async fn write_floor(leases: &Api<Lease>, budget: Budget) -> anyhow::Result<Samples> {
    let mut current = leases.create(&PostParams::default(), &lease("bench-write-floor", "a")).await?;
    let mut samples = Samples::default();
    let start = Instant::now();
    let mut i = 0u64;
    while !budget.done(start, samples.len()) {
        i += 1;
        let mut next = current.clone();
        if let Some(spec) = next.spec.as_mut() {
            spec.holder_identity = Some(format!("holder-{}", i % 2));
            spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        }
        let t0 = Instant::now();
        current = leases.replace("bench-write-floor", &PostParams::default(), &next).await?;
        samples.push(t0.elapsed());
    }
    Ok(samples)
}

/// 1b. The same on a custom resource: CAS of a Lock's status subresource (what the
/// controller's grant write is), with no controller watching its namespace.
pub async fn cr_write_floor(locks: &Api<Lock>, budget: Budget) -> anyhow::Result<Samples> {
    const NAME: &str = "bench-cr-write-floor";
    let mut current = locks.create(&PostParams::default(), &requester::lock(NAME, 1, None)).await?;
    let mut samples = Samples::default();
    let start = Instant::now();
    let mut token = 0i64;
    while !budget.done(start, samples.len()) {
        token += 1;
        let mut next = current.clone();
        next.status = Some(LockStatus {
            holders: vec![Holder {
                request: format!("{NAME}-{}", token % 2),
                request_uid: format!("uid-{token}"),
                holder: format!("holder-{}", token % 2),
                permits: 1,
                token,
                granted_at: MicroTime(jiff::Timestamp::now()),
                lease_duration: "30s".into(),
                pod_ref: None,
            }],
            fencing_token: token,
            ..Default::default()
        });
        let t0 = Instant::now();
        current = locks.replace_status(NAME, &PostParams::default(), &next).await?;
        samples.push(t0.elapsed());
    }
    Ok(samples)
}

/// Item 2, handover floor: DELETE marker → the waiter's watch event → CREATE marker (returned).
/// `make(holder)` builds the marker (always under the same name): a Lease for the floor of
/// the issue, a LockRequest for the same on a custom resource (2b).
pub async fn handover_floor<K>(api: &Api<K>, make: impl Fn(&str) -> K, budget: Budget) -> anyhow::Result<Samples>
where
    K: crate::Object,
{
    let first = make("holder");
    let name = first.meta().name.clone().ok_or_else(|| anyhow!("the marker has no name"))?;
    api.create(&PostParams::default(), &first).await?;
    // The waiter's watch, open for the whole run.
    let mut events = watcher(api.clone(), watcher::Config::default().fields(&format!("metadata.name={name}"))).boxed();
    // Until the initial list is done and shows the marker.
    let mut present = false;
    loop {
        match events.next().await.ok_or_else(|| anyhow!("watch ended"))?? {
            watcher::Event::InitApply(_) => present = true,
            watcher::Event::InitDone if present => break,
            watcher::Event::InitDone => bail!("marker not listed"),
            _ => {}
        }
    }
    let mut samples = Samples::default();
    let start = Instant::now();
    let mut round = 0u64;
    while !budget.done(start, samples.len()) {
        round += 1;
        // The holder lets go...
        let t0 = Instant::now();
        let delete = tokio::spawn({
            let (api, name) = (api.clone(), name.clone());
            async move { api.delete(&name, &DeleteParams::default()).await }
        });
        // ...the waiter sees it and takes over.
        loop {
            match events.next().await.ok_or_else(|| anyhow!("watch ended"))?? {
                watcher::Event::Delete(_) => break,
                watcher::Event::Init => bail!("the floor watch restarted mid-measurement"),
                _ => {}
            }
        }
        api.create(&PostParams::default(), &make(&format!("waiter-{round}"))).await.context("waiter create")?;
        samples.push(t0.elapsed());
        delete.await??;
        // Quiet again: the waiter's watch has seen its own marker.
        loop {
            if let watcher::Event::Apply(_) = events.next().await.ok_or_else(|| anyhow!("watch ended"))?? {
                break;
            }
        }
    }
    Ok(samples)
}

/// Name of the handover floor's marker object.
pub const MARKER: &str = "bench-floor-marker";

/// The Lease marker of item 2.
pub fn lease_marker(holder: &str) -> Lease {
    lease(MARKER, holder)
}

/// The Lease marker of item 2 measured again (another name: the first is still there).
pub fn lease_marker_again(holder: &str) -> Lease {
    lease(MARKER_AGAIN, holder)
}

/// Name of the marker when item 2 is measured again.
pub const MARKER_AGAIN: &str = "bench-floor-marker-2";

/// The LockRequest marker of item 2b (for a Lock that does not exist; nothing reconciles it).
pub fn request_marker(holder: &str) -> LockRequest {
    requester::request("bench-no-such-lock", Some(MARKER), holder)
}
