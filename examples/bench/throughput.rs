//! Item 6, throughput: grants per second with every client acquiring and releasing at once
//! (hold time zero), over a fixed window.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::anyhow;
use futures::StreamExt as _;
use kube::{Api, api::PostParams};
use kubelock::api::{Lock, LockRequest};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::requester::{self, GrantWatch};

/// The outcome of one throughput run.
pub struct Throughput {
    pub locks: usize,
    pub clients: usize,
    pub window: Duration,
    pub grants: u64,
    pub errors: u64,
    /// Mutating requests the API server served during the window, by resource and verb.
    pub api_writes: std::collections::BTreeMap<String, f64>,
    /// The controller's own writes during the run, by kind/outcome (its metrics).
    pub controller_writes: std::collections::BTreeMap<String, f64>,
}

/// What a write the API server counted is, for kubelock's objects: (resource and verb as
/// counted, the kind of write in the write budget).
const KINDS: &[(&str, &str)] = &[
    ("lockrequests POST", "request create"),
    ("locks/status PUT", "Lock CAS"),
    ("lockrequests/status PUT", "request status (positions, mirrors, fences)"),
    ("lockrequests PATCH", "release mark or renewal"),
    ("lockrequests DELETE", "delete"),
    ("events POST", "Event"),
    ("events PATCH", "Event"),
];

impl Throughput {
    /// API writes per grant by kind of write (the API server's counts of the window).
    pub fn per_grant_by_kind(&self) -> std::collections::BTreeMap<String, f64> {
        let mut out = std::collections::BTreeMap::new();
        for (key, v) in &self.api_writes {
            let kind = KINDS.iter().find(|(k, _)| k == key).map_or(key.as_str(), |(_, kind)| kind);
            *out.entry(kind.to_string()).or_insert(0.0) += v / self.grants.max(1) as f64;
        }
        // The controller's count splits the request-status writes into fences and mirrors.
        if let Some(fences) = self.controller_writes.get("request_fence/ok") {
            out.insert("of which fences".into(), fences / self.grants.max(1) as f64);
        }
        out
    }

    /// All API writes to kubelock objects and Events per grant.
    pub fn writes_per_grant(&self) -> Option<f64> {
        (self.grants > 0).then(|| self.api_writes.values().sum::<f64>() / self.grants as f64)
    }
}

impl Throughput {
    pub fn per_second(&self) -> f64 {
        self.grants as f64 / self.window.as_secs_f64()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "locks": self.locks,
            "clients_per_lock": self.clients / self.locks.max(1),
            "window_s": self.window.as_secs_f64(),
            "grants": self.grants,
            "grants_per_s": (self.per_second() * 10.0).round() / 10.0,
            "client_errors": self.errors,
            "apiserver_writes_in_window": self.api_writes,
            "apiserver_writes_per_grant": self.writes_per_grant().map(|v| (v * 100.0).round() / 100.0),
            "apiserver_writes_per_grant_by_kind": self.per_grant_by_kind().into_iter().map(|(k, v)| (k, json!((v * 100.0).round() / 100.0))).collect::<serde_json::Map<String, Value>>(),
            "controller_writes": self.controller_writes,
        })
    }
}

struct Shared {
    window: OnceLock<(Instant, Instant)>,
    grants: AtomicU64,
    errors: AtomicU64,
}

/// `n_locks` Locks named `<prefix>-<i>`, `per_lock` clients each, for `window`.
pub async fn throughput(
    kube_client: &kube::Client,
    locks: &Api<Lock>,
    requests: &Api<LockRequest>,
    prefix: &str,
    n_locks: usize,
    per_lock: usize,
    window: Duration,
) -> anyhow::Result<Throughput> {
    let names: Vec<String> = (0..n_locks).map(|i| format!("{prefix}-{i}")).collect();
    let created: Vec<_> = futures::stream::iter(names.iter().map(|n| {
        let locks = locks.clone();
        let lock = requester::lock(n, 1, Some("10m"));
        async move { locks.create(&PostParams::default(), &lock).await }
    }))
    .buffer_unordered(32)
    .collect()
    .await;
    for c in created {
        c?;
    }
    // What the Locks' creation and the previous item still write (finalizers, Events, deletes)
    // is not this item's.
    crate::scale::wait_quiet(kube_client).await?;
    let shared = Arc::new(Shared { window: OnceLock::new(), grants: AtomicU64::new(0), errors: AtomicU64::new(0) });
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for c in 0..per_lock {
            tasks.push(tokio::spawn(client(
                format!("tp-{i}-{c}"),
                locks.clone(),
                requests.clone(),
                name.clone(),
                shared.clone(),
                ready_tx.clone(),
                stop.clone(),
            )));
        }
    }
    drop(ready_tx);
    let clients = tasks.len();
    // The window opens once every client has its first request in.
    for _ in 0..clients {
        ready_rx.recv().await.ok_or_else(|| anyhow!("throughput clients failed to start"))?;
    }
    let writes_before = crate::sys::apiserver_writes(kube_client).await?;
    let opened = Instant::now();
    let _ = shared.window.set((opened, opened + window));
    tokio::time::sleep(window).await; // the workload runs for the window
    let writes_after = crate::sys::apiserver_writes(kube_client).await?;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    Ok(Throughput {
        locks: n_locks,
        clients,
        window,
        grants: shared.grants.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        api_writes: crate::sys::delta(&writes_after, &writes_before),
        controller_writes: Default::default(),
    })
}

async fn client(
    holder: String,
    locks: Api<Lock>,
    requests: Api<LockRequest>,
    lock: String,
    shared: Arc<Shared>,
    ready: mpsc::UnboundedSender<()>,
    stop: CancellationToken,
) {
    let mut ready = Some(ready);
    while !stop.is_cancelled() {
        let req = match requester::create(&requests, &lock, &holder).await {
            Ok(req) => req,
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "throughput client: create");
                continue;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        let granted = match GrantWatch::new(&locks, &requests, &lock, &req) {
            Ok(mut watch) => tokio::select! {
                g = watch.granted() => Some(g),
                _ = stop.cancelled() => None,
            },
            Err(e) => Some(Err(e)),
        };
        match granted {
            Some(Ok((at, _))) if shared.window.get().is_some_and(|(from, to)| at >= *from && at <= *to) => {
                shared.grants.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "throughput client: waiting");
            }
            None => {}
        }
        // Hold time zero: release at once.
        if let Err(e) = requester::release(&requests, &req).await {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "throughput client: release");
        }
    }
}
