//! The pod sidecar (`kubelock sidecar`): holds a lock for the pod it runs in, tells the app
//! through files in a shared directory and through `/readyz` (so a Service routes only to
//! the holder: active/passive with no app changes), and stands by again after a loss.
//!
//! Files in `--dir` (each replaced atomically: written to a temporary file, then renamed):
//! - `request`: the LockRequest this pod owns (waiting or holding); adopted on restart and
//!   from `kubelock acquire --wait --dir` in an init container;
//! - `token`, `lock-uid`, `deadline`: only while holding (written by the sidecar alone, which
//!   renews), removed the moment the lock is lost or `--grace` before the local deadline
//!   when renewals fail; `deadline` carries the deadline itself, on CLOCK_BOOTTIME (compare
//!   with `/proc/uptime`), so an app can check it even if the sidecar is gone;
//! - `state`: `waiting` or `holding`.
//!
//! HTTP on `--listen` (default 127.0.0.1:8081): `/healthz` (200 while the sidecar runs),
//! `/readyz` (200 only while holding, the deadline checked on every call), `/campaigning`
//! (200 while this pod is in the running: its request is queued or holds, so it can take over;
//! the readiness probe of an active/passive Deployment), `/status` (JSON).
//!
//! `--pod-label KEY=VALUE`: the pod carries that label while it holds, for a Service to select
//! the active pod. Set on the pod (a merge patch with the pod's UID) after the token files are
//! written; removed after they are withdrawn when the grant ends, on SIGTERM, and at start if an
//! earlier run left it. Safety never depends on it: the files go first, and the label's writes
//! run beside the campaign, retried, never holding it up. While the pod may carry the label
//! without holding (a removal not yet confirmed), `/campaigning` answers 503, so the endpoints
//! drop the pod even if the label lingers.
//!
//! SIGTERM/SIGINT (the pod is going away): the files and `/readyz` are withdrawn at once (the
//! app must stop acting), the lock is kept and renewed until the pod's other containers have
//! stopped (read from the pod: with native sidecar containers that is already so when the
//! sidecar is told to stop), then released for the next holder. If that cannot be seen the
//! request is left: the controller frees it once the kubelet reports the pod stopped, or after
//! the lease.

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde::Serialize;
use tokio::{signal::unix::SignalKind, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    client::{
        AcquireError, AcquireOptions, BootInstant, BootTimer, Guard, LockClient, LockState, LostReason, Pending,
        default_margin,
        grace::{check_grace, default_grace, stop_at},
    },
    connect::{ClientArgs, parse_duration},
    pod::{PodIdentity, StateDir, files},
    tools::{EXIT_REJECTED, flag_of},
};

/// Sidecar flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SidecarArgs {
    /// Lock to hold (in the pod's namespace unless -n is given).
    #[arg(long, env = "KUBELOCK_LOCK", value_name = "NAME")]
    pub lock: String,
    /// Permits to ask for.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub permits: i32,
    /// Lease to ask for (default: the Lock's leaseDuration).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub lease: Option<Duration>,
    /// Safety margin taken off the lease for the local deadline (default max(lease/10, 200ms)).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub margin: Option<Duration>,
    /// Directory shared with the app (an emptyDir): request, token, lock-uid, state.
    #[arg(long, env = "KUBELOCK_DIR", default_value = "/var/run/kubelock", value_name = "DIR")]
    pub dir: PathBuf,
    /// Address of the HTTP endpoints (/healthz, /readyz, /status). Empty to disable.
    #[arg(long, env = "KUBELOCK_LISTEN", default_value = "127.0.0.1:8081", value_name = "ADDR")]
    pub listen: String,
    /// Adopt this LockRequest (default: the one named in DIR/request, if any).
    #[arg(long, value_name = "REQUEST")]
    pub adopt: Option<String>,
    /// Holder identity (default `pod/NAMESPACE/NAME` from the downward API).
    #[arg(long, value_name = "TEXT")]
    pub holder: Option<String>,
    /// Time the app gets to stop acting before the local lease deadline when renewals fail:
    /// the token files and /readyz are withdrawn this long before it. Must be shorter than
    /// lease − margin − lease/3. Default: half of that, at most 10s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub grace: Option<Duration>,
    /// Name of this sidecar's container in the pod: on SIGTERM it waits for the pod's other
    /// containers to stop before releasing (their state read from the pod; needs `get` and
    /// `watch` on its own pod).
    #[arg(long, env = "KUBELOCK_CONTAINER", default_value = "kubelock", value_name = "NAME")]
    pub container: String,
    /// Label this pod carries while it holds the lock, e.g. `kubelock.dev/active=true`: a
    /// Service selecting it sends traffic to the holder alone. Set after the token files are
    /// written, removed when the grant ends, on SIGTERM, and at start if left over. Needs the
    /// pod's name (POD_NAME) and `get` and `patch` on pods.
    #[arg(long, env = "KUBELOCK_POD_LABEL", value_name = "KEY=VALUE", value_parser = parse_pod_label)]
    pub pod_label: Option<PodLabel>,
}

/// The grace of this grant: `--grace` if it fits the granted lease, else the default (and a
/// warning: the sidecar cannot refuse to run as `kubelock run` does, the app depends on it).
fn grace_for(args: &SidecarArgs, guard: &Guard) -> Duration {
    let lease = match guard.current() {
        LockState::Holding { lease, .. } => lease,
        _ => return Duration::ZERO,
    };
    let margin = args.margin.unwrap_or_else(|| default_margin(lease));
    match args.grace.map(|g| check_grace(g, lease, margin)) {
        Some(Ok(g)) => g,
        Some(Err(why)) => {
            warn!("--grace {why}; using the default");
            default_grace(lease, margin)
        }
        None => default_grace(lease, margin),
    }
}

/// Waits, while the grant holds, until every container of this pod but the sidecar's own
/// has stopped running, as the kubelet reports it. False when that cannot be seen (no pod
/// identity, no right to read the pod, the pod vanished) or the grant ended first.
async fn app_stopped(locks: &LockClient, pod: Option<&PodIdentity>, own: &str, guard: &Guard) -> bool {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let Some(pod) = pod else { return false };
    let ns = pod.namespace.clone().unwrap_or_else(|| locks.namespace().to_string());
    let api: kube::Api<Pod> = kube::Api::namespaced(locks.kube_client().clone(), &ns);
    let events = watcher(api, watcher::Config::default().fields(&format!("metadata.name={}", pod.name)));
    let stopped = |p: &Pod| {
        if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none() {
            return true; // never bound to a node: no kubelet runs any container of it
        }
        let statuses = p.status.as_ref().and_then(|s| s.container_statuses.as_ref());
        statuses.is_some_and(|list| {
            list.iter().filter(|c| c.name != own).all(|c| c.state.as_ref().is_none_or(|s| s.running.is_none()))
        })
    };
    let watch = async {
        let events = events.default_backoff();
        tokio::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) if stopped(&p) => return true,
                Ok(watcher::Event::Delete(_)) => return false,
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "cannot watch this pod to see its app stop");
                    return false;
                }
            }
        }
        false
    };
    tokio::select! {
        stopped = watch => stopped,
        _ = guard.lost() => false,
    }
}

/// Sidecar errors.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("invalid {flag}: {message}")]
    Invalid { flag: &'static str, message: String },
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(#[source] io::Error),
}

/// What the HTTP endpoints show.
#[derive(Debug, Default)]
struct View {
    lock: String,
    namespace: String,
    request: Option<String>,
    state: Option<watch::Receiver<LockState>>,
    /// The token whose files are written: not ready before the app can read its token.
    published: Option<i64>,
    last_loss: Option<String>,
    /// A request of this pod is queued or holds (false before the first one, while creating
    /// one fails, and once told to stop).
    campaigning: bool,
    /// With `--pod-label`.
    labeler: Option<Labeler>,
}

type SharedView = Arc<Mutex<View>>;

/// `/status` body.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusBody {
    /// Lock name.
    pub lock: String,
    /// Namespace.
    pub namespace: String,
    /// `waiting`, `holding` or `lost`.
    pub state: &'static str,
    /// Holding now (deadline checked).
    pub held: bool,
    /// Fencing token while holding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<i64>,
    /// The Lock's UID while holding.
    #[serde(rename = "lockUID", skip_serializing_if = "Option::is_none")]
    pub lock_uid: Option<String>,
    /// The LockRequest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Seconds left before the local deadline (while holding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_left_seconds: Option<f64>,
    /// Place in the queue while waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<i32>,
    /// Why the last grant was lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<String>,
    /// In the running for the lock (what `/campaigning` answers).
    pub campaigning: bool,
    /// With `--pod-label`: whether the pod carries the label (`null` while not known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labelled: Option<Option<bool>>,
}

fn status_of(view: &View) -> StatusBody {
    let now = BootInstant::now();
    let state = view.state.as_ref().map(|rx| rx.borrow().clone());
    let mut body = StatusBody {
        lock: view.lock.clone(),
        namespace: view.namespace.clone(),
        state: "waiting",
        held: false,
        token: None,
        lock_uid: None,
        request: view.request.clone(),
        time_left_seconds: None,
        position: None,
        last_loss: view.last_loss.clone(),
        campaigning: false,
        labelled: view.labeler.as_ref().map(|l| match l.on_pod() {
            OnPod::Unknown => None,
            OnPod::Set => Some(true),
            OnPod::Absent => Some(false),
        }),
    };
    match state {
        Some(LockState::Holding { token, lock_uid, deadline, .. })
            if now < deadline && view.published == Some(token) =>
        {
            body.state = "holding";
            body.held = true;
            body.token = Some(token);
            body.lock_uid = Some(lock_uid);
            body.time_left_seconds = Some(deadline.saturating_since(now).as_secs_f64());
        }
        Some(LockState::Holding { deadline, .. }) if now < deadline => {} // granted, files not written yet
        Some(LockState::Holding { .. }) | Some(LockState::Lost { .. }) => body.state = "lost",
        Some(LockState::Waiting { position }) => body.position = position,
        None => {}
    }
    body.campaigning = campaigning_of(view, body.held).is_ok();
    body
}

/// In the running for the lock: a request queued or holding, and no label on the pod that a
/// Service could route by while this pod does not hold. `Err` says why not.
fn campaigning_of(view: &View, held: bool) -> Result<(), &'static str> {
    if !view.campaigning {
        return Err("no lock request of this pod is in the queue\n");
    }
    match view.labeler.as_ref().map(Labeler::on_pod) {
        Some(OnPod::Unknown) => Err("whether the pod carries its label is not known yet\n"),
        Some(OnPod::Set) if !held => Err("the pod still carries its label though it does not hold\n"),
        _ => Ok(()),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(view): State<SharedView>) -> (StatusCode, &'static str) {
    let held = view.lock().map(|v| status_of(&v).held).unwrap_or(false);
    if held { (StatusCode::OK, "holding\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not holding\n") }
}

async fn campaigning(State(view): State<SharedView>) -> (StatusCode, &'static str) {
    let answer = view.lock().map_err(|_| "poisoned\n").and_then(|v| campaigning_of(&v, status_of(&v).held));
    match answer {
        Ok(()) => (StatusCode::OK, "campaigning\n"),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn status(State(view): State<SharedView>) -> (StatusCode, Json<Option<StatusBody>>) {
    match view.lock() {
        Ok(v) => (StatusCode::OK, Json(Some(status_of(&v)))),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, Json(None)),
    }
}

/// The admin router.
fn router(view: SharedView) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/campaigning", get(campaigning))
        .route("/status", get(status))
        .with_state(view)
}

fn set_view(view: &SharedView, f: impl FnOnce(&mut View)) {
    if let Ok(mut v) = view.lock() {
        f(&mut v);
    }
}

/// Runs the sidecar until SIGTERM/SIGINT.
pub async fn run(args: SidecarArgs, client_args: &ClientArgs) -> Result<ExitCode, SidecarError> {
    let pod = PodIdentity::from_env();
    let mut client_args = client_args.clone();
    if client_args.namespace.is_none() {
        client_args.namespace = pod.as_ref().and_then(|p| p.namespace.clone());
    }
    let listen: Option<SocketAddr> = if args.listen.is_empty() {
        None
    } else {
        Some(args.listen.parse().map_err(|_| SidecarError::Invalid {
            flag: "--listen",
            message: format!("{:?} is not an address like 127.0.0.1:8081", args.listen),
        })?)
    };
    let probe = AcquireOptions {
        permits: args.permits,
        lease: args.lease,
        margin: args.margin,
        ..AcquireOptions::new(&args.lock)
    };
    if let Err(AcquireError::Invalid { field, message }) = probe.validate() {
        return Err(SidecarError::Invalid { flag: flag_of(field), message });
    }
    let (kube, namespace) = client_args.client().await?;
    let locks = LockClient::new(kube, &namespace).with_request_timeout(client_args.request_timeout);
    let dir = StateDir::create(&args.dir).map_err(|source| SidecarError::Dir { path: args.dir.clone(), source })?;
    let dir_err = |source| SidecarError::Dir { path: args.dir.clone(), source };

    let mut opts = AcquireOptions::new(&args.lock);
    opts.permits = args.permits;
    opts.lease = args.lease;
    opts.margin = args.margin;
    opts.pod_ref = pod.as_ref().and_then(|p| p.pod_ref_in(&namespace));
    opts.holder_identity =
        args.holder.clone().or_else(|| pod.as_ref().map(|p| p.holder_identity(&namespace))).unwrap_or_default();
    opts.validate().map_err(|e| match e {
        AcquireError::Invalid { field, message } => SidecarError::Invalid { flag: flag_of(field), message },
        other => SidecarError::Invalid { flag: "--lock", message: other.to_string() },
    })?;

    let labeler = match (&args.pod_label, &pod) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(SidecarError::Invalid {
                flag: "--pod-label",
                message: "needs this pod's name in POD_NAME (the downward API's metadata.name)".into(),
            });
        }
        (Some(label), Some(pod)) => {
            let pod_ns = pod.namespace.clone().unwrap_or_else(|| namespace.clone());
            Some(Labeler::start(locks.kube_client().clone(), &pod_ns, pod, label.clone(), client_args.request_timeout))
        }
    };
    let view: SharedView = Arc::new(Mutex::new(View {
        lock: args.lock.clone(),
        namespace: namespace.clone(),
        labeler: labeler.clone(),
        ..Default::default()
    }));
    let want_label = |on: bool| {
        if let Some(l) = &labeler {
            l.want(on);
        }
    };
    let shutdown = CancellationToken::new();
    if let Some(addr) = listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| SidecarError::Listen { addr: args.listen.clone(), source })?;
        let app = router(Arc::clone(&view));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
            if let Err(e) = served {
                warn!(error = %e, "admin server stopped");
            }
        });
        info!(%addr, "serving /healthz, /readyz, /status");
    }
    {
        let mut term = tokio::signal::unix::signal(SignalKind::terminate()).map_err(SidecarError::Signals)?;
        let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(SidecarError::Signals)?;
        let stop = shutdown.clone();
        let told = Arc::clone(&view);
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: releasing"),
                _ = int.recv() => info!("SIGINT: releasing"),
            }
            set_view(&told, |v| v.campaigning = false);
            stop.cancel();
        });
    }

    let mut adopt = match &args.adopt {
        Some(r) => Some(r.clone()),
        None => dir.read(files::REQUEST).map_err(dir_err)?,
    };
    let mut backoff = Duration::from_millis(500);
    let code = 'campaign: loop {
        if shutdown.is_cancelled() {
            break 'campaign ExitCode::SUCCESS;
        }
        // 1. A request: adopted (init container, restart) or new.
        let pending: Result<Pending, AcquireError> = match adopt.take() {
            Some(name) => {
                info!(request = %name, "adopting lock request");
                let r = locks.adopt_pending(&name, &opts).await;
                if let Err(e) = &r {
                    warn!(request = %name, error = %e, "cannot adopt; creating a new request");
                    dir.write_not_holding(None).map_err(dir_err)?;
                    continue 'campaign;
                }
                r
            }
            None => locks.request(&opts).await,
        };
        let pending = match pending {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "creating the lock request failed");
                set_view(&view, |v| v.campaigning = false);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue 'campaign;
            }
        };
        backoff = Duration::from_millis(500);
        let request = pending.request_name().to_string();
        dir.write_not_holding(Some(&request)).map_err(dir_err)?;
        set_view(&view, |v| {
            v.request = Some(request.clone());
            v.state = Some(pending.state());
            v.campaigning = !shutdown.is_cancelled();
        });
        info!(lock = %args.lock, %request, "waiting for the lock");

        // 2. Wait for the grant (SIGTERM cancels and deletes the request).
        let guard: Guard = match pending.granted(None, Some(shutdown.clone())).await {
            Ok(g) => g,
            Err(AcquireError::Cancelled { .. }) => {
                dir.clear().map_err(dir_err)?;
                break 'campaign ExitCode::SUCCESS;
            }
            Err(e @ AcquireError::NotGranted { reason: LostReason::Rejected { .. }, .. }) => {
                dir.clear().map_err(dir_err)?;
                eprintln!("kubelock sidecar: {e}");
                break 'campaign ExitCode::from(EXIT_REJECTED);
            }
            Err(e) => {
                warn!(error = %e, "not granted; requesting again");
                set_view(&view, |v| v.last_loss = Some(e.to_string()));
                dir.write_not_holding(None).map_err(dir_err)?;
                continue 'campaign;
            }
        };
        // Files first, then readiness: whoever sees /readyz 200 finds the token file.
        let deadline = guard.deadline().unwrap_or_else(BootInstant::now);
        dir.write_holding(&request, guard.token(), guard.lock_uid(), deadline).map_err(dir_err)?;
        set_view(&view, |v| {
            v.state = Some(guard.state());
            v.published = Some(guard.token());
        });
        // Then the label, for a Service to route to this pod (off the campaign's path).
        want_label(true);
        let grace = grace_for(&args, &guard);
        info!(lock = %args.lock, %request, token = guard.token(), grace = ?grace, "holding");

        // 3. Hold until lost, until the deadline nears with no renewal (the app gets `grace`
        // to stop before it), or until told to stop; keep the deadline file current.
        let mut states = guard.state();
        let mut stop_timer = BootTimer::new().map_err(SidecarError::Signals)?;
        let ended = loop {
            stop_timer.set(guard.deadline().map(|d| stop_at(d, grace))).map_err(SidecarError::Signals)?;
            tokio::select! {
                biased;
                reason = guard.lost() => break Some(reason.to_string()),
                _ = stop_timer.fired(), if stop_timer.armed().is_some() => {
                    break Some("no renewal succeeded and the lease deadline is near".to_string());
                }
                _ = shutdown.cancelled() => break None,
                _ = states.changed() => {
                    if let Some(d) = guard.deadline() {
                        dir.write_deadline(d).map_err(dir_err)?;
                    }
                }
            }
        };
        // Files first, then readiness and the label: once the token file is gone the app must
        // not act; the label's removal follows, retried beside the campaign.
        dir.write_not_holding(None).map_err(dir_err)?;
        set_view(&view, |v| {
            v.published = None;
            v.campaigning &= ended.is_some();
        });
        want_label(false);
        match ended {
            Some(reason) => {
                // The app may still be finishing: only its own deadline, the lease or the
                // pod's end can tell, so the request is left to the controller (it expires,
                // or drains), not released.
                warn!(lock = %args.lock, %request, token = guard.token(), %reason, "lock lost; standing by again");
                set_view(&view, |v| {
                    v.last_loss = Some(reason);
                    v.request = None;
                });
                guard.detach();
            }
            None => {
                // Told to stop (the pod is going away): keep the lock, renewing, until the app's
                // containers have stopped, then release it for the next holder at once. If that
                // cannot be seen, leave it: the controller frees it once the kubelet reports the
                // pod stopped, or after the lease.
                info!(lock = %args.lock, %request, "waiting for the app's containers to stop before releasing");
                if app_stopped(&locks, pod.as_ref(), &args.container, &guard).await && guard.is_holding() {
                    if let Err(e) = guard.release().await {
                        warn!(%request, error = %e, "releasing failed; the lease will expire");
                    }
                } else {
                    warn!(%request, "not released: the controller frees the lock when the pod is reported stopped or the lease passes");
                    guard.detach();
                }
                dir.clear().map_err(dir_err)?;
                set_view(&view, |v| v.state = None);
                break 'campaign ExitCode::SUCCESS;
            }
        }
    };
    shutdown.cancel();
    set_view(&view, |v| v.campaigning = false);
    if let Some(l) = &labeler {
        want_label(false);
        if !l.removed(LABEL_REMOVAL_ON_EXIT).await {
            warn!("the pod label could not be removed before exit; the next start of this sidecar removes it");
        }
    }
    Ok(code)
}

/// How long the sidecar waits, on exit, for the pod label to be removed.
const LABEL_REMOVAL_ON_EXIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// `--pod-label`: the holder's pod carries a label while it holds.

/// `--pod-label KEY=VALUE`: a label the sidecar puts on its own pod while it holds the lock
/// (for a Service's selector), and removes when the grant ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLabel {
    /// The label key, e.g. `kubelock.dev/active`.
    pub key: String,
    /// Its value while holding, e.g. `true`.
    pub value: String,
}

impl std::fmt::Display for PodLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// A label name or value part: at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn label_name_problem(what: &str, s: &str) -> Option<String> {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if s.len() > 63 {
        return Some(format!("{what} {s:?} is longer than 63 characters"));
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || !alnum(s.chars().next())
        || !alnum(s.chars().last())
    {
        return Some(format!(
            "{what} {s:?} must be letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    None
}

/// A DNS subdomain (a label key's prefix): at most 253 characters, dot-separated parts of
/// lower-case letters, digits and '-', alphanumeric at both ends of each part.
fn dns_subdomain_problem(s: &str) -> Option<String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    if s.len() > 253 || !s.split('.').all(part_ok) {
        return Some(format!("the key's prefix {s:?} is not a DNS subdomain (lower-case, like kubelock.dev)"));
    }
    None
}

/// Parses `--pod-label`: `KEY=VALUE` with a Kubernetes label key (`[prefix/]name`) and value.
pub fn parse_pod_label(s: &str) -> Result<PodLabel, String> {
    let example = "e.g. kubelock.dev/active=true";
    let Some((key, value)) = s.split_once('=') else {
        return Err(format!("{s:?} is not KEY=VALUE ({example})"));
    };
    if key.is_empty() {
        return Err(format!("{s:?} has no key before '=' ({example})"));
    }
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if name.is_empty() {
        return Err(format!("the key {key:?} has no name after '/' ({example})"));
    }
    let problem = prefix
        .and_then(dns_subdomain_problem)
        .or_else(|| label_name_problem("the key's name", name))
        .or_else(|| (!value.is_empty()).then(|| label_name_problem("the value", value)).flatten());
    match problem {
        Some(p) => Err(format!("{p} ({example})")),
        None => Ok(PodLabel { key: key.to_string(), value: value.to_string() }),
    }
}

/// What the sidecar knows of the label on its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnPod {
    /// Not known yet, or a write of it failed: it may be there.
    Unknown,
    /// The pod carries it.
    Set,
    /// The pod does not carry it (or is gone).
    Absent,
}

/// Keeps the label on this pod as wanted: set once the token files are written, removed when
/// the grant ends, and at start if left by an earlier run. Runs beside the sidecar's campaign,
/// which never waits for it: a write that fails is retried (with backoff) until it succeeds or
/// is no longer wanted.
#[derive(Debug, Clone)]
struct Labeler {
    want: Arc<watch::Sender<bool>>,
    on_pod: watch::Receiver<OnPod>,
}

impl Labeler {
    /// Starts the labelling task for `pod` (whose name the downward API gave) in `namespace`.
    fn start(client: kube::Client, namespace: &str, pod: &PodIdentity, label: PodLabel, timeout: Duration) -> Self {
        let (want, wanted) = watch::channel(false);
        let (known, on_pod) = watch::channel(OnPod::Unknown);
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, namespace);
        tokio::spawn(keep_label(api, pod.clone(), label, timeout, wanted, known));
        Self { want: Arc::new(want), on_pod }
    }

    /// The pod should (true) or should not (false) carry the label.
    fn want(&self, on: bool) {
        self.want.send_replace(on);
    }

    fn on_pod(&self) -> OnPod {
        *self.on_pod.borrow()
    }

    /// Waits up to `timeout` for the label to be gone from the pod (on exit).
    async fn removed(&self, timeout: Duration) -> bool {
        let mut on_pod = self.on_pod.clone();
        tokio::time::timeout(timeout, on_pod.wait_for(|s| *s == OnPod::Absent)).await.is_ok_and(|r| r.is_ok())
    }
}

/// The labelling task (see [`Labeler`]).
async fn keep_label(
    api: kube::Api<k8s_openapi::api::core::v1::Pod>,
    pod: PodIdentity,
    label: PodLabel,
    timeout: Duration,
    mut wanted: watch::Receiver<bool>,
    known: watch::Sender<OnPod>,
) {
    use kube::api::{Patch, PatchParams};
    let gone = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 404);
    let mut backoff = Duration::from_millis(200);
    // What the pod carries at start: a label left while not holding (the sidecar restarted,
    // or was killed before it removed it) goes.
    let first = loop {
        match tokio::time::timeout(timeout, api.get(&pod.name)).await {
            Ok(Ok(p)) if pod.uid.as_ref().is_some_and(|u| p.metadata.uid.as_ref() != Some(u)) => break None,
            Ok(Ok(p)) => {
                let has = p.metadata.labels.as_ref().is_some_and(|l| l.contains_key(&label.key));
                break Some(if has { OnPod::Set } else { OnPod::Absent });
            }
            Ok(Err(e)) if gone(&e) => break None,
            Ok(Err(e)) => warn!(pod = %pod.name, error = %e, "cannot read this pod for its --pod-label; retrying"),
            Err(_) => warn!(pod = %pod.name, ?timeout, "reading this pod for its --pod-label timed out; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    };
    let Some(mut state) = first else {
        info!(pod = %pod.name, "this pod is gone: no --pod-label to keep");
        known.send_replace(OnPod::Absent);
        return;
    };
    known.send_replace(state);
    backoff = Duration::from_millis(200);
    loop {
        let on = *wanted.borrow_and_update();
        let target = if on { OnPod::Set } else { OnPod::Absent };
        if state == target {
            if wanted.changed().await.is_err() {
                return; // the sidecar is gone
            }
            continue;
        }
        // A merge patch of the one label; with the pod's UID, so that it never lands on
        // another pod of the same name (a StatefulSet's replacement): that one is refused.
        let value = if on { serde_json::Value::String(label.value.clone()) } else { serde_json::Value::Null };
        let mut meta = serde_json::json!({"labels": {&label.key: value}});
        if let Some(uid) = &pod.uid {
            meta["uid"] = serde_json::Value::String(uid.clone());
        }
        let patch = serde_json::json!({"metadata": meta});
        match tokio::time::timeout(timeout, api.patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))).await
        {
            Ok(Ok(_)) => {
                info!(pod = %pod.name, label = %label, on, "pod label written");
                state = target;
                known.send_replace(state);
                backoff = Duration::from_millis(200);
                continue;
            }
            Ok(Err(e)) if gone(&e) => {
                info!(pod = %pod.name, "this pod is gone: no --pod-label to keep");
                known.send_replace(OnPod::Absent);
                return;
            }
            Ok(Err(kube::Error::Api(s)))
                if pod.uid.is_some() && matches!(s.code, 409 | 422) && s.message.to_lowercase().contains("uid") =>
            {
                warn!(pod = %pod.name, error = %s.message, "this pod was replaced by another of its name: no --pod-label to keep");
                known.send_replace(OnPod::Absent);
                return;
            }
            Ok(Err(e)) => {
                warn!(pod = %pod.name, label = %label, on, error = %e, retry_in = ?backoff, "writing the pod label failed")
            }
            Err(_) => {
                warn!(pod = %pod.name, label = %label, on, ?timeout, retry_in = ?backoff, "writing the pod label timed out")
            }
        }
        state = OnPod::Unknown;
        known.send_replace(state);
        // Retry after the backoff, or at once when what is wanted changes.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            changed = wanted.changed() => if changed.is_err() { return },
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_checks_the_deadline() {
        let (_tx, rx) = watch::channel(LockState::Holding {
            token: 3,
            lock_uid: "u".into(),
            lease: Duration::from_secs(10),
            deadline: BootInstant::now().saturating_sub(Duration::from_millis(1)),
        });
        let view = View { lock: "db".into(), namespace: "ns".into(), state: Some(rx), ..Default::default() };
        let s = status_of(&view);
        assert!(!s.held);
        assert_eq!(s.state, "lost");
        assert_eq!(s.token, None);

        let (_tx, rx) = watch::channel(LockState::Holding {
            token: 3,
            lock_uid: "u".into(),
            lease: Duration::from_secs(10),
            deadline: BootInstant::now().saturating_add(Duration::from_secs(5)),
        });
        let mut view = View { lock: "db".into(), namespace: "ns".into(), state: Some(rx), ..Default::default() };
        let s = status_of(&view);
        assert!(!s.held, "not ready before the token file is written");
        assert_eq!(s.state, "waiting");
        view.published = Some(3);
        let s = status_of(&view);
        assert!(s.held);
        assert_eq!(s.token, Some(3));
        assert!(s.time_left_seconds.unwrap() > 4.0);
    }

    #[test]
    fn pod_label_parses_kubernetes_label_syntax() {
        let ok = |s: &str| parse_pod_label(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(
            ok("kubelock.dev/active=true"),
            PodLabel { key: "kubelock.dev/active".into(), value: "true".into() }
        );
        assert_eq!(ok("role=primary"), PodLabel { key: "role".into(), value: "primary".into() });
        assert_eq!(ok("a.b-c/x_y.z=V-1.2_3"), PodLabel { key: "a.b-c/x_y.z".into(), value: "V-1.2_3".into() });
        assert_eq!(ok("active="), PodLabel { key: "active".into(), value: String::new() }, "values may be empty");
        assert_eq!(ok("kubelock.dev/active=true").to_string(), "kubelock.dev/active=true");

        let err = |s: &str| parse_pod_label(s).expect_err(s);
        assert!(err("kubelock.dev/active").contains("is not KEY=VALUE"), "{}", err("kubelock.dev/active"));
        assert!(err("=true").contains("no key"));
        assert!(err("kubelock.dev/=true").contains("no name after '/'"));
        assert!(err("Kubelock.dev/active=true").contains("not a DNS subdomain"));
        assert!(err("kube_lock.dev/active=true").contains("not a DNS subdomain"));
        assert!(err("-x.dev/active=true").contains("not a DNS subdomain"));
        assert!(err("a/b/c=true").contains("the key's name \"b/c\""), "{}", err("a/b/c=true"));
        assert!(err("-active=true").contains("starting and ending with a letter or digit"));
        assert!(err("active=true-").contains("the value \"true-\""));
        assert!(err("active=a=b").contains("the value \"a=b\""));
        assert!(err("active=has space").contains("the value"));
        assert!(err(&format!("{}=x", "k".repeat(64))).contains("longer than 63"));
        assert!(err(&format!("k={}", "v".repeat(64))).contains("longer than 63"));
        assert!(err(&format!("{}/k=x", "p".repeat(64))).contains("not a DNS subdomain"));
        for e in [err("active"), err("active=-")] {
            assert!(e.contains("e.g. kubelock.dev/active=true"), "every error shows an example: {e}");
        }
    }

    #[test]
    fn pod_label_flag_errors_name_the_flag() {
        use clap::Parser as _;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            sidecar: SidecarArgs,
        }
        let parsed = Cli::try_parse_from(["sidecar", "--lock", "l", "--pod-label", "kubelock.dev/active=true"])
            .expect("a valid --pod-label");
        assert_eq!(parsed.sidecar.pod_label.map(|l| l.to_string()).as_deref(), Some("kubelock.dev/active=true"));
        let none = Cli::try_parse_from(["sidecar", "--lock", "l"]).expect("no --pod-label");
        assert_eq!(none.sidecar.pod_label, None);
        let e = Cli::try_parse_from(["sidecar", "--lock", "l", "--pod-label", "active"]).expect_err("no '='");
        let text = e.to_string();
        assert!(text.contains("--pod-label"), "the error names the flag: {text}");
        assert!(text.contains("is not KEY=VALUE"), "{text}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn campaigning_needs_a_request_and_no_stale_label() {
        let (_tx, rx) = watch::channel(LockState::Waiting { position: Some(1) });
        let mut view = View { lock: "db".into(), namespace: "ns".into(), state: Some(rx), ..Default::default() };
        assert!(campaigning_of(&view, false).is_err(), "no request yet");
        view.campaigning = true;
        assert_eq!(campaigning_of(&view, false), Ok(()), "a standby in the queue is ready");
        assert!(status_of(&view).campaigning);
        let (_known, on_pod) = watch::channel(OnPod::Unknown);
        let (want, _wanted) = watch::channel(false);
        view.labeler = Some(Labeler { want: Arc::new(want), on_pod });
        assert!(campaigning_of(&view, false).is_err(), "the label's state unknown");
        assert_eq!(status_of(&view).labelled, Some(None));
        let (_known, on_pod) = watch::channel(OnPod::Set);
        view.labeler.as_mut().unwrap().on_pod = on_pod;
        assert!(campaigning_of(&view, false).unwrap_err().contains("still carries its label"));
        assert_eq!(campaigning_of(&view, true), Ok(()), "the holder carries it");
        let (_known, on_pod) = watch::channel(OnPod::Absent);
        view.labeler.as_mut().unwrap().on_pod = on_pod;
        assert_eq!(campaigning_of(&view, false), Ok(()));
        assert_eq!(status_of(&view).labelled, Some(Some(false)));
    }
}
