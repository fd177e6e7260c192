//! Item 10, a long queue: N LockRequests on one Lock, created before the controller starts;
//! once the API server is quiet (every waiter's first status written), K handovers (the holder marks its request released, the next
//! in line is granted). What each grant costs in API writes with N waiting behind it, and the
//! controller's memory with N requests in its cache.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use kube::{Api, runtime::watcher};
use kubelock::api::{Lock, LockRequest};
use serde_json::{Value, json};

use crate::{
    requester,
    scale::{create_all, round, wait_quiet, wait_quiet_within},
    sys::{self, Controller},
};

const LOCK: &str = "q";

/// How long the controller may take to write every waiter's first status.
const SETTLE_MAX: Duration = Duration::from_secs(900);

/// Item 10's figures.
#[derive(Debug, Default)]
pub struct Queue {
    pub queued: usize,
    pub create_s: f64,
    /// Controller start until the API server saw no write for a second (first grant and every
    /// waiter's first status written).
    pub settle_s: f64,
    pub settle_api_writes: BTreeMap<String, f64>,
    pub grants: usize,
    pub window_s: f64,
    /// API writes during the K handovers, by `resource[/subresource] VERB`.
    pub api_writes: BTreeMap<String, f64>,
    pub controller_writes: BTreeMap<String, f64>,
    pub peak_rss_mib: f64,
    pub rss_mib: f64,
}

impl Queue {
    pub fn writes_per_grant(&self) -> Option<f64> {
        (self.grants > 0).then(|| self.api_writes.values().sum::<f64>() / self.grants as f64)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "queued": self.queued,
            "create_s": round(self.create_s, 1),
            "settle_s": round(self.settle_s, 1),
            "settle_api_writes": self.settle_api_writes,
            "grants": self.grants,
            "window_s": round(self.window_s, 2),
            "api_writes": self.api_writes,
            "api_writes_per_grant": self.writes_per_grant().map(|v| round(v, 2)),
            "controller_writes": self.controller_writes,
            "controller_peak_rss_mib": round(self.peak_rss_mib, 1),
            "controller_rss_mib": round(self.rss_mib, 1),
        })
    }
}

/// The request holding the Lock, from its status.
fn holder_of(lock: &Lock) -> Option<(String, String)> {
    let h = lock.status.as_ref()?.holders.first()?;
    Some((h.request.clone(), h.request_uid.clone()))
}

/// Runs item 10 in `namespace` (created by the caller, empty).
#[allow(clippy::too_many_arguments)]
pub async fn long_queue(
    client: &kube::Client,
    binary: &Path,
    kubeconfig: &Path,
    namespace: &str,
    out_dir: &Path,
    ctl_args: &[String],
    n: usize,
    grants: usize,
) -> anyhow::Result<Queue> {
    let locks: Api<Lock> = Api::namespaced(client.clone(), namespace);
    let requests: Api<LockRequest> = Api::namespaced(client.clone(), namespace);
    let mut out = Queue { queued: n, ..Default::default() };
    let mut took = create_all(&locks, vec![requester::lock(LOCK, 1, Some("1h"))]).await?;
    let reqs = (0..n).map(|i| requester::request(LOCK, Some(&format!("q-{i:06}")), &format!("queue-{i}"))).collect();
    took += create_all(&requests, reqs).await?;
    out.create_s = took.as_secs_f64();
    eprintln!("  created {n} requests in {:.1} s", out.create_s);

    let mut controller = Controller::start(binary, kubeconfig, namespace, out_dir, "queue", ctl_args)?;
    let result = async {
        let api_start = sys::apiserver_writes(client).await?;
        controller.wait_ready(Duration::from_secs(300)).await?;
        // Every waiter's first status (one write each, a bounded number per reconcile), counted
        // by the controller; the first reconcile plans them all before it writes any, so a
        // quiet API server alone does not tell.
        let empty = controller.snapshot().await?;
        let from = Instant::now();
        loop {
            let written = controller.snapshot().await?.writes_since(&empty).get("request_status/ok").copied();
            if written.unwrap_or(0.0) >= n as f64 {
                break;
            }
            if from.elapsed() > SETTLE_MAX {
                bail!("{} of {n} request statuses written after {SETTLE_MAX:?}", written.unwrap_or(0.0));
            }
            tokio::time::sleep(Duration::from_secs(1)).await; // polling the controller's counts
        }
        let (last, quiet) = wait_quiet_within(client, Duration::from_secs(60)).await?;
        out.settle_s = controller.started.elapsed().as_secs_f64();
        if !quiet {
            bail!("the API server still took writes {:.0} s after the controller started", out.settle_s);
        }
        out.settle_api_writes = sys::delta(&last, &api_start);
        eprintln!("  settled {:.1} s after the controller started", out.settle_s);

        let events = watcher(locks.clone(), watcher::Config::default().fields(&format!("metadata.name={LOCK}")));
        let mut events = std::pin::pin!(events);
        let mut current = None;
        // The current holder, from the watch's initial list.
        while current.is_none() {
            match events.next().await.context("the Lock's watch ended")? {
                Ok(watcher::Event::InitApply(l) | watcher::Event::Apply(l)) => current = holder_of(&l),
                Ok(_) => {}
                Err(e) => bail!("watching the Lock: {e}"),
            }
        }
        let before = controller.snapshot().await?;
        let api_before = sys::apiserver_writes(client).await?;
        let start = Instant::now();
        for _ in 0..grants {
            let (name, uid) = current.clone().context("no holder")?;
            let mut held = requester::request(LOCK, Some(&name), "");
            held.metadata.uid = Some(uid.clone());
            requester::release(&requests, &held).await?;
            // The next grant: a holder other than the one released.
            let next = loop {
                match tokio::time::timeout(Duration::from_secs(60), events.next()).await {
                    Err(_) => bail!("no grant within 60 s of releasing {name}"),
                    Ok(None) => bail!("the Lock's watch ended"),
                    Ok(Some(Ok(watcher::Event::Apply(l)))) => match holder_of(&l) {
                        Some(h) if h.1 != uid => break h,
                        _ => {}
                    },
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => bail!("watching the Lock: {e}"),
                }
            };
            current = Some(next);
            out.grants += 1;
        }
        out.window_s = start.elapsed().as_secs_f64();
        // What the last handovers left to write (the released request's delete, mirrors).
        let api_after = wait_quiet(client).await?;
        let after = controller.snapshot().await?;
        out.api_writes = sys::delta(&api_after, &api_before);
        out.controller_writes = after.writes_since(&before);
        out.peak_rss_mib = after.hwm_kib as f64 / 1024.0;
        out.rss_mib = after.rss_kib as f64 / 1024.0;
        Ok(())
    }
    .await;
    controller.stop().await;
    result.map(|()| out)
}
