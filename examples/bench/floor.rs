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

use crate::{Budget, stats::Samples};

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

/// 1. CAS PUT of a Lease (replace carrying the resourceVersion just read).
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

/// 2. Handover floor: DELETE marker → the waiter's watch event → CREATE marker (returned).
pub async fn handover_floor(leases: &Api<Lease>, budget: Budget) -> anyhow::Result<Samples> {
    const NAME: &str = "bench-floor-marker";
    leases.create(&PostParams::default(), &lease(NAME, "holder")).await?;
    // The waiter's watch, open for the whole run.
    let mut events =
        watcher(leases.clone(), watcher::Config::default().fields(&format!("metadata.name={NAME}"))).boxed();
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
            let leases = leases.clone();
            async move { leases.delete(NAME, &DeleteParams::default()).await }
        });
        // ...the waiter sees it and takes over.
        loop {
            match events.next().await.ok_or_else(|| anyhow!("watch ended"))?? {
                watcher::Event::Delete(_) => break,
                watcher::Event::Init => bail!("the floor watch restarted mid-measurement"),
                _ => {}
            }
        }
        leases
            .create(&PostParams::default(), &lease(NAME, &format!("waiter-{round}")))
            .await
            .context("waiter create")?;
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
