//! Logs and metrics: tracing setup, the Prometheus registry, and the admin HTTP server
//! (`/metrics`, `/healthz`, `/readyz`).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// The log filter could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {source}")]
pub struct LogFilterError {
    filter: String,
    #[source]
    source: tracing_subscriber::filter::ParseError,
}

/// Installs the global subscriber: logs go to stderr, so that stdout stays for command output.
pub fn init_tracing(filter: &str, format: LogFormat) -> Result<(), LogFilterError> {
    let env_filter =
        EnvFilter::try_new(filter).map_err(|source| LogFilterError { filter: filter.to_string(), source })?;
    let registry = tracing_subscriber::registry().with(env_filter);
    let _ = match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr).with_target(false)).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).try_init(),
    };
    Ok(())
}

// ---- metrics ----

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// A bounded label: a reason, an error category or a write kind (never an object name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: &'static str,
}

/// Error category label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// `Error::category()`.
    pub category: &'static str,
}

/// An API the controller depends on.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabel {
    /// `pods`, `leases`, `events`.
    pub api: &'static str,
}

/// API write kind label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    /// `lock_status`, `request_status`, `request_delete`.
    pub kind: &'static str,
    /// `ok`, `conflict`, `error`.
    pub outcome: &'static str,
}

/// The controller's metrics, all under the `kubelock_` prefix.
pub struct Metrics {
    /// Grants made.
    pub grants: Counter,
    /// Clean releases (request deleted).
    pub releases: Counter,
    /// Grants ended by the controller, by reason.
    pub expirations: Family<ReasonLabel, Counter>,
    /// Requests rejected, by reason.
    pub rejections: Family<ReasonLabel, Counter>,
    /// Lock status writes refused with 409 Conflict.
    pub cas_conflicts: Counter,
    /// Quorum reads made to confirm a release or expiry before acting on it.
    pub confirm_reads: Counter,
    /// API writes by kind and outcome.
    pub writes: Family<WriteLabel, Counter>,
    /// Seconds from a request first seen waiting to its grant.
    pub grant_latency: Histogram,
    /// Seconds a grant was held.
    pub hold_time: Histogram,
    /// Requests waiting, over all Locks.
    pub queue_depth: Gauge,
    /// Grants held, over all Locks.
    pub holders: Gauge,
    /// Reconciles run.
    pub reconciles: Counter,
    /// Reconcile duration in seconds.
    pub reconcile_duration: Histogram,
    /// Reconcile failures by error category.
    pub reconcile_errors: Family<ErrorLabel, Counter>,
    /// Events not published: the queue was full, or the Events API refused or failed them.
    pub events_dropped: Counter,
    /// Events left out by the rate bound per Lock (`--events-per-lock-per-minute`).
    pub events_suppressed: Counter,
    /// 1 while an API the controller uses is forbidden or missing (it runs degraded).
    pub api_unavailable: Family<ApiLabel, Gauge>,
    /// 1 while this replica leads (or runs without leader election).
    pub leader: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let latency = || Histogram::new(exponential_buckets(0.0005, 2.0, 20));
        let m = Self {
            grants: Counter::default(),
            releases: Counter::default(),
            expirations: Family::default(),
            rejections: Family::default(),
            cas_conflicts: Counter::default(),
            confirm_reads: Counter::default(),
            writes: Family::default(),
            grant_latency: latency(),
            hold_time: Histogram::new(exponential_buckets(0.01, 2.0, 24)),
            queue_depth: Gauge::default(),
            holders: Gauge::default(),
            reconciles: Counter::default(),
            reconcile_duration: latency(),
            reconcile_errors: Family::default(),
            events_dropped: Counter::default(),
            events_suppressed: Counter::default(),
            api_unavailable: Family::default(),
            leader: Gauge::default(),
        };
        registry.register("grants", "Grants made", m.grants.clone());
        registry.register("releases", "Clean releases (request deleted)", m.releases.clone());
        registry.register("expirations", "Grants ended by the controller, by reason", m.expirations.clone());
        registry.register("rejections", "Requests rejected, by reason", m.rejections.clone());
        registry.register("cas_conflicts", "Lock status writes refused with 409 Conflict", m.cas_conflicts.clone());
        registry.register("confirm_reads", "Quorum reads made to confirm a release or expiry", m.confirm_reads.clone());
        registry.register("api_writes", "API writes by kind and outcome", m.writes.clone());
        registry.register(
            "grant_latency_seconds",
            "From a request first seen waiting to its grant",
            m.grant_latency.clone(),
        );
        registry.register("hold_time_seconds", "How long grants were held", m.hold_time.clone());
        registry.register("queue_depth", "Requests waiting, over all locks", m.queue_depth.clone());
        registry.register("holders", "Grants held, over all locks", m.holders.clone());
        registry.register("reconciles", "Reconciles run", m.reconciles.clone());
        registry.register("reconcile_duration_seconds", "Reconcile duration", m.reconcile_duration.clone());
        registry.register("reconcile_errors", "Reconcile failures by error category", m.reconcile_errors.clone());
        registry.register(
            "events_dropped",
            "Events not published (queue full, or refused or failed by the API server)",
            m.events_dropped.clone(),
        );
        registry.register(
            "events_suppressed",
            "Events left out by the rate bound per Lock (--events-per-lock-per-minute)",
            m.events_suppressed.clone(),
        );
        registry.register(
            "api_unavailable",
            "1 while an API the controller uses is forbidden or missing",
            m.api_unavailable.clone(),
        );
        registry.register("leader", "1 while this replica leads", m.leader.clone());
        Arc::new(m)
    }

    /// Starts timing a reconcile; the duration is recorded when the guard drops.
    pub fn reconcile_timer(self: &Arc<Self>) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer { metrics: self.clone(), start: Instant::now() }
    }

    /// Counts an API write.
    pub fn write(&self, kind: &'static str, outcome: &'static str) {
        self.writes.get_or_create(&WriteLabel { kind, outcome }).inc();
    }
}

/// Records a reconcile's duration when dropped, whichever way the reconcile ends.
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics.reconcile_duration.observe(self.start.elapsed().as_secs_f64());
    }
}

/// A gauge fed by per-object contributions, so that its total stays right as objects come
/// and go without a label per object.
#[derive(Default)]
pub struct SumGauge {
    parts: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    total: AtomicU64,
}

impl SumGauge {
    /// Sets one object's part and returns the new total.
    pub fn set(&self, key: &str, value: i64) -> i64 {
        let mut parts = self.parts.lock().expect("sum gauge lock poisoned");
        let old = if value == 0 { parts.remove(key) } else { parts.insert(key.to_string(), value) }.unwrap_or(0);
        let total = self.total.load(Ordering::Relaxed) as i64 + value - old;
        self.total.store(total.max(0) as u64, Ordering::Relaxed);
        total
    }
}

// ---- admin server ----

/// The admin HTTP server failed.
#[derive(Debug, thiserror::Error)]
#[error("admin server on {addr}: {source}")]
pub struct AdminError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Serves `/metrics`, `/healthz` and `/readyz` (200 when `ready()` says so) until `shutdown`.
pub async fn serve_admin(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    use axum::{Router, http::StatusCode, http::header, routing::get};
    let metrics = move || {
        let registry = registry.clone();
        async move {
            let mut body = String::new();
            match encode(&mut body, &registry) {
                Ok(()) => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    body,
                ),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string()),
            }
        }
    };
    let readyz = move || {
        let ready = ready.clone();
        async move { if ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") } }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| AdminError { addr, source })?;
    tracing::info!(%addr, "admin server listening (/metrics /healthz /readyz)");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|source| AdminError { addr, source })
}
