//! Item 7, scale: the controller started against N Locks and 2N LockRequests (one grantable, one
//! waiting per Lock): time to grant everything, peak RSS, CPU, reconcile p99, then idle CPU.
//! Item 8, cost of renewal: M holders renewing at the default lease (30 s → every 10 s).

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{
    Api, ResourceExt as _,
    api::{Patch, PatchParams, PostParams},
    runtime::watcher,
};
use kubelock::api::{CLIENT_MANAGER, Lock, LockRequest};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    requester,
    sys::{self, Controller},
};

/// How many objects are being created at once.
const CREATE_CONCURRENCY: usize = 64;

/// Creates objects with bounded concurrency; returns how long it took.
pub async fn create_all<K>(api: &Api<K>, objects: Vec<K>) -> anyhow::Result<Duration>
where
    K: crate::Object,
{
    let start = Instant::now();
    let results: Vec<Result<K, kube::Error>> = futures::stream::iter(objects.into_iter().map(|obj| {
        let api = api.clone();
        async move {
            // A create that times out under load is retried; "already exists" then means done.
            let mut tries = 0;
            loop {
                tries += 1;
                match api.create(&PostParams::default(), &obj).await {
                    Err(kube::Error::Api(s)) if s.code == 409 && tries > 1 => return Ok(obj),
                    Err(kube::Error::Api(s)) if s.code == 429 || s.code >= 500 => {}
                    Err(kube::Error::Api(s)) => return Err(kube::Error::Api(s)),
                    Err(_) if tries < 5 => {}
                    other => return other,
                }
            }
        }
    }))
    .buffer_unordered(CREATE_CONCURRENCY)
    .collect()
    .await;
    for r in results {
        r?;
    }
    Ok(start.elapsed())
}

/// Counts seen by the bench's own watches, by name prefix (`s-`: scale, `r-`: renewal).
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub synced: bool,
    /// Locks with at least one holder.
    pub held: BTreeMap<&'static str, usize>,
    /// Requests whose status the controller has written (any phase).
    pub mirrored: BTreeMap<&'static str, usize>,
}

fn prefix_of(name: &str) -> &'static str {
    if name.starts_with("s-") {
        "s"
    } else if name.starts_with("r-") {
        "r"
    } else {
        "other"
    }
}

/// Watches every Lock and LockRequest of the namespace and publishes the counts.
pub fn track(locks: Api<Lock>, requests: Api<LockRequest>, stop: CancellationToken) -> watch::Receiver<Counts> {
    let (tx, rx) = watch::channel(Counts::default());
    tokio::spawn(async move {
        enum Ev {
            L(Result<watcher::Event<Lock>, watcher::Error>),
            R(Result<watcher::Event<LockRequest>, watcher::Error>),
        }
        let config = watcher::Config::default().page_size(1000);
        let mut events =
            futures::stream::select(watcher(locks, config.clone()).map(Ev::L), watcher(requests, config).map(Ev::R))
                .boxed();
        // Per object its last state, and running totals by prefix: updated per event in O(1)
        // (recounting on every event is quadratic and would steal the API server's CPU).
        let mut held: HashMap<String, bool> = HashMap::new();
        let mut mirrored: HashMap<String, bool> = HashMap::new();
        let (mut lock_synced, mut req_synced) = (false, false);
        fn set(
            map: &mut HashMap<String, bool>,
            totals: &mut BTreeMap<&'static str, usize>,
            name: String,
            value: Option<bool>,
        ) {
            let prefix = prefix_of(&name);
            let old = match value {
                Some(v) => map.insert(name, v),
                None => map.remove(&name),
            };
            let total = totals.entry(prefix).or_default();
            if old == Some(true) {
                *total -= 1;
            }
            if value == Some(true) {
                *total += 1;
            }
        }
        let mut counts = Counts::default();
        loop {
            let ev = tokio::select! {
                ev = events.next() => match ev { Some(ev) => ev, None => return },
                _ = stop.cancelled() => return,
            };
            match ev {
                Ev::L(Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l))) => {
                    let h = l.status.as_ref().is_some_and(|s| !s.holders.is_empty());
                    set(&mut held, &mut counts.held, l.name_any(), Some(h));
                }
                Ev::L(Ok(watcher::Event::Delete(l))) => set(&mut held, &mut counts.held, l.name_any(), None),
                Ev::L(Ok(watcher::Event::InitDone)) => lock_synced = true,
                Ev::R(Ok(watcher::Event::Apply(r) | watcher::Event::InitApply(r))) => {
                    let m = r.status.as_ref().is_some_and(|s| s.phase.is_some());
                    set(&mut mirrored, &mut counts.mirrored, r.name_any(), Some(m));
                }
                Ev::R(Ok(watcher::Event::Delete(r))) => set(&mut mirrored, &mut counts.mirrored, r.name_any(), None),
                Ev::R(Ok(watcher::Event::InitDone)) => req_synced = true,
                Ev::L(Ok(watcher::Event::Init)) | Ev::R(Ok(watcher::Event::Init)) => {}
                Ev::L(Err(e)) | Ev::R(Err(e)) => tracing::warn!(error = %e, "scale watch"),
            }
            counts.synced = lock_synced && req_synced;
            tx.send_replace(counts.clone());
        }
    });
    rx
}

/// Waits (at most 30 s) until the API server has served no write for a second, checking
/// every 500 ms; returns its write counters then.
pub async fn wait_quiet(client: &kube::Client) -> anyhow::Result<BTreeMap<String, f64>> {
    Ok(wait_quiet_within(client, Duration::from_secs(30)).await?.0)
}

/// Waits at most `max` until the API server has served no write for a second, checking every
/// 500 ms; returns its write counters then, and whether it was quiet.
pub async fn wait_quiet_within(client: &kube::Client, max: Duration) -> anyhow::Result<(BTreeMap<String, f64>, bool)> {
    let from = Instant::now();
    let mut last = sys::apiserver_writes(client).await?;
    let mut still = 0;
    while still < 2 && from.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(500)).await; // polling the API server's counters
        let now = sys::apiserver_writes(client).await?;
        still = if sys::delta(&now, &last).is_empty() { still + 1 } else { 0 };
        last = now;
    }
    Ok((last, still >= 2))
}

/// Waits (at most 30 s) until no Event is written for a second: the Events of a burst of
/// grants are published off the critical path, after the grants.
async fn wait_events_quiet(client: &kube::Client) -> anyhow::Result<()> {
    let events =
        |w: &BTreeMap<String, f64>| w.iter().filter(|(k, _)| k.starts_with("events")).map(|(_, v)| *v).sum::<f64>();
    let from = Instant::now();
    let mut last = events(&sys::apiserver_writes(client).await?);
    let mut still = 0;
    while still < 2 && from.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await; // polling the API server's counters
        let now = events(&sys::apiserver_writes(client).await?);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    Ok(())
}

/// Item 7's figures.
#[derive(Debug, Default)]
pub struct Scale {
    pub locks: usize,
    pub requests: usize,
    pub create_s: f64,
    pub ready_s: Option<f64>,
    pub all_held_s: Option<f64>,
    pub all_mirrored_s: Option<f64>,
    pub held: usize,
    pub mirrored: usize,
    pub peak_rss_mib: f64,
    pub rss_mib: f64,
    pub cpu_s: f64,
    pub reconcile_p50_ms: Option<f64>,
    pub reconcile_p99_ms: Option<f64>,
    pub reconciles: f64,
    pub writes: BTreeMap<String, f64>,
    pub events_dropped: f64,
    pub idle_s: f64,
    pub idle_cpu_per_s: Option<f64>,
    pub idle_writes: BTreeMap<String, f64>,
    pub idle_reconciles: f64,
    /// Since the controller started, when the API server had seen no write for a second.
    pub quiet_after_s: Option<f64>,
    pub idle_api_writes: BTreeMap<String, f64>,
    /// When the settle stopped waiting without reaching its goal (time budget).
    pub gave_up_s: Option<f64>,
    /// Writes the API server served from the controller's start until it was quiet.
    pub settle_api_writes: BTreeMap<String, f64>,
}

impl Scale {
    pub fn to_json(&self) -> Value {
        json!({
            "locks": self.locks,
            "requests": self.requests,
            "create_s": round(self.create_s, 1),
            "controller_ready_s": self.ready_s.map(|v| round(v, 2)),
            "all_held_s": self.all_held_s.map(|v| round(v, 2)),
            "all_mirrored_s": self.all_mirrored_s.map(|v| round(v, 2)),
            "held": self.held,
            "gave_up_after_s": self.gave_up_s.map(|v| round(v, 1)),
            "locks_held_per_s": self.all_held_s.or(self.gave_up_s).map(|t| round(self.held as f64 / t, 1)),
            "mirrored": self.mirrored,
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "rss_after_settle_mib": round(self.rss_mib, 1),
            "cpu_s_to_settle": round(self.cpu_s, 2),
            "reconcile_p50_ms": self.reconcile_p50_ms.map(|v| round(v, 2)),
            "reconcile_p99_ms": self.reconcile_p99_ms.map(|v| round(v, 2)),
            "reconciles": self.reconciles,
            "controller_writes": self.writes,
            "events_dropped": self.events_dropped,
            "idle_window_s": self.idle_s,
            "idle_cpu_s_per_s": self.idle_cpu_per_s.map(|v| round(v, 5)),
            "idle_controller_writes": self.idle_writes,
            "idle_reconciles": self.idle_reconciles,
            "idle_apiserver_writes": self.idle_api_writes,
            "apiserver_writes_until_quiet": self.settle_api_writes,
            "quiet_after_s": self.quiet_after_s.map(|v| round(v, 1)),
        })
    }
}

pub fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Creates N Locks (lease 1h: nothing expires during the run; renewal is item 8) and two
/// requests each, `-a` before `-b` so that `-a` is first in FIFO order.
pub async fn populate(locks: &Api<Lock>, requests: &Api<LockRequest>, n: usize) -> anyhow::Result<Duration> {
    let names: Vec<String> = (0..n).map(|i| format!("s-{i:05}")).collect();
    let mut took = create_all(locks, names.iter().map(|n| requester::lock(n, 1, Some("1h"))).collect()).await?;
    for suffix in ["a", "b"] {
        let reqs = names
            .iter()
            .map(|n| requester::request(n, Some(&format!("{n}-{suffix}")), &format!("scale-{suffix}")))
            .collect();
        took += create_all(requests, reqs).await?;
    }
    Ok(took)
}

/// Starts the controller and measures item 7. `deadline`: give up waiting for the settle.
pub async fn settle(
    client: &kube::Client,
    controller: &mut Controller,
    counts: &mut watch::Receiver<Counts>,
    n: usize,
    deadline: Duration,
    idle: Duration,
) -> anyhow::Result<Scale> {
    let mut out = Scale { locks: n, requests: 2 * n, ..Default::default() };
    let started = controller.started;
    // The controller was just started: it lists for a while before its first write.
    let api_start = sys::apiserver_writes(client).await?;
    let ready = controller.wait_ready(deadline);
    out.ready_s = Some(ready.await?.as_secs_f64());
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    let give_up = started + deadline;
    loop {
        let c = counts.borrow_and_update().clone();
        let held = c.held.get("s").copied().unwrap_or(0);
        let mirrored = c.mirrored.get("s").copied().unwrap_or(0);
        (out.held, out.mirrored) = (held, mirrored);
        if held >= n && out.all_held_s.is_none() {
            out.all_held_s = Some(started.elapsed().as_secs_f64());
        }
        if mirrored >= 2 * n && out.all_mirrored_s.is_none() {
            out.all_mirrored_s = Some(started.elapsed().as_secs_f64());
        }
        if out.all_held_s.is_some() && out.all_mirrored_s.is_some() {
            break;
        }
        if Instant::now() >= give_up {
            out.gave_up_s = Some(started.elapsed().as_secs_f64());
            eprintln!(
                "  scale: gave up after {deadline:?}: {held}/{n} locks held, {mirrored}/{} requests mirrored",
                2 * n
            );
            break;
        }
        tokio::select! {
            changed = counts.changed() => changed.context("scale watch ended")?,
            _ = progress.tick() => eprintln!("  scale: {:5.1}s  {held}/{n} locks held, {mirrored}/{} requests mirrored", started.elapsed().as_secs_f64(), 2 * n),
            _ = tokio::time::sleep_until(give_up.into()) => {}
        }
    }
    let settled = controller.snapshot().await?;
    out.peak_rss_mib = settled.hwm_kib as f64 / 1024.0;
    out.rss_mib = settled.rss_kib as f64 / 1024.0;
    out.cpu_s = settled.cpu;
    out.reconcile_p50_ms = settled.reconcile.quantile(0.50).map(|s| s * 1e3);
    out.reconcile_p99_ms = settled.reconcile.quantile(0.99).map(|s| s * 1e3);
    out.reconciles = settled.reconciles;
    out.writes = settled
        .writes
        .iter()
        .map(|(l, v)| {
            (format!("{}/{}", sys::label(l, "kind").unwrap_or("?"), sys::label(l, "outcome").unwrap_or("?")), *v)
        })
        .collect();
    out.events_dropped = settled.events_dropped;
    // The controller may still be publishing its backlog of Events: the idle window starts
    // once the API server has seen no write for a second.
    let last = wait_quiet(client).await?;
    out.settle_api_writes = sys::delta(&last, &api_start);
    out.quiet_after_s = Some(started.elapsed().as_secs_f64());
    // Idle: nothing changes; the workload is waiting.
    let before = controller.snapshot().await?;
    tokio::time::sleep(idle).await;
    let after = controller.snapshot().await?;
    let api_after = sys::apiserver_writes(client).await?;
    out.idle_s = after.at.duration_since(before.at).as_secs_f64();
    out.idle_cpu_per_s = Some((after.cpu - before.cpu) / out.idle_s);
    out.idle_writes = after.writes_since(&before);
    out.idle_api_writes = sys::delta(&api_after, &last);
    out.idle_reconciles = after.reconciles - before.reconciles;
    Ok(out)
}

/// Item 8's figures.
#[derive(Debug, Default)]
pub struct Renewal {
    pub holders: usize,
    pub period_s: f64,
    pub window_s: f64,
    pub renewals: u64,
    pub renew_errors: u64,
    pub api_writes: BTreeMap<String, f64>,
    pub api_writes_per_s: f64,
    pub controller_writes: BTreeMap<String, f64>,
    pub controller_cpu_per_s: f64,
    pub idle_cpu_per_s: Option<f64>,
    pub reconciles: f64,
    pub expirations: f64,
    pub still_held: usize,
}

impl Renewal {
    pub fn to_json(&self) -> Value {
        json!({
            "holders": self.holders,
            "renew_period_s": self.period_s,
            "window_s": round(self.window_s, 2),
            "renewals_sent": self.renewals,
            "renew_errors": self.renew_errors,
            "apiserver_writes": self.api_writes,
            "apiserver_writes_per_s": round(self.api_writes_per_s, 1),
            "controller_writes": self.controller_writes,
            "controller_cpu_s_per_s": round(self.controller_cpu_per_s, 4),
            "controller_cpu_s_per_s_above_idle": self.idle_cpu_per_s.map(|i| round(self.controller_cpu_per_s - i, 4)),
            "reconciles": self.reconciles,
            "expirations": self.expirations,
            "still_held": self.still_held,
        })
    }
}

/// Item 8: M Locks with the default lease (30 s) get one holder each; the holders renew every
/// lease/3 = 10 s, spread evenly; measured over `window`.
#[allow(clippy::too_many_arguments)]
pub async fn renewal(
    client: &kube::Client,
    locks: &Api<Lock>,
    requests: &Api<LockRequest>,
    controller: &Controller,
    counts: &mut watch::Receiver<Counts>,
    m: usize,
    window: Duration,
    idle_cpu_per_s: Option<f64>,
) -> anyhow::Result<Renewal> {
    let period = Duration::from_secs(10);
    let initial = controller.snapshot().await?;
    let names: Vec<String> = (0..m).map(|i| format!("r-{i:04}")).collect();
    create_all(locks, names.iter().map(|n| requester::lock(n, 1, None)).collect()).await?;
    create_all(requests, names.iter().map(|n| requester::request(n, Some(&format!("{n}-a")), "renewer")).collect())
        .await?;
    let stop = CancellationToken::new();
    // Renewing starts at once (a waiting request may renew too): holders must never go a
    // lease without renewing, whatever the wait for grants and for quiet below takes.
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (requests, name, stop) = (requests.clone(), format!("{n}-a"), stop.clone());
            let first = start + period.mul_f64(i as f64 / m as f64);
            tokio::spawn(async move {
                let (mut sent, mut errors) = (0u64, 0u64);
                let mut ticks = tokio::time::interval_at(first, period);
                let params = PatchParams { field_manager: Some(CLIENT_MANAGER.into()), ..Default::default() };
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        _ = stop.cancelled() => return (sent, errors),
                    }
                    let patch = json!({ "spec": { "renewTime": MicroTime(jiff::Timestamp::now()) } });
                    match requests.patch(&name, &params, &Patch::Merge(&patch)).await {
                        Ok(_) => sent += 1,
                        Err(e) => {
                            errors += 1;
                            tracing::warn!(request = %name, error = %e, "renewal");
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::timeout(
        Duration::from_secs(120),
        counts
            .wait_for(|c| c.held.get("r").copied().unwrap_or(0) >= m && c.mirrored.get("r").copied().unwrap_or(0) >= m),
    )
    .await
    .map_err(|_| anyhow!("renewal: the {m} holders were not all granted within 120 s"))??;
    // The window starts once every holder renewed at least once since its grant, and the
    // Events of those grants are published (quiet apart from the renewals themselves).
    tokio::time::sleep(period).await; // one renewal period: every holder renewed once
    wait_events_quiet(client).await?;
    let api_before = sys::apiserver_writes(client).await?;
    let before = controller.snapshot().await?;
    let start = tokio::time::Instant::now();
    tokio::time::sleep_until(start + window).await; // the renewal workload runs for the window
    let after = controller.snapshot().await?;
    let api_after = sys::apiserver_writes(client).await?;
    stop.cancel();
    let mut out = Renewal {
        holders: m,
        period_s: period.as_secs_f64(),
        window_s: after.at.duration_since(before.at).as_secs_f64(),
        idle_cpu_per_s,
        ..Default::default()
    };
    for t in tasks {
        let (sent, errors) = t.await?;
        out.renewals += sent;
        out.renew_errors += errors;
    }
    out.api_writes = sys::delta(&api_after, &api_before);
    // Only writes to kubelock's own objects (the snapshot itself is a GET).
    out.api_writes_per_s =
        out.api_writes.iter().filter(|(k, _)| k.starts_with("lock")).map(|(_, v)| v).sum::<f64>() / out.window_s;
    out.controller_writes = after.writes_since(&before);
    out.controller_cpu_per_s = (after.cpu - before.cpu) / out.window_s;
    out.reconciles = after.reconciles - before.reconciles;
    // Over the whole item, not only the window: no holder may expire while it renews.
    out.expirations = after.expirations - initial.expirations;
    out.still_held = counts.borrow().held.get("r").copied().unwrap_or(0);
    if out.expirations > 0.0 {
        bail!("renewal: {} holders expired although they renewed", out.expirations);
    }
    Ok(out)
}
