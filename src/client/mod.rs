//! The client: acquire, renew, release and the local deadline. The one implementation
//! behind `kubelock run`, the sidecar, the CLI and Rust applications.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kubelock::client::{AcquireOptions, LockClient};
//! let client = kube::Client::try_default().await?;
//! let locks = LockClient::new(client, "default");
//! let guard = locks.acquire(AcquireOptions::new("db-migrations")).await?;
//! println!("holding with fencing token {}", guard.token());
//! // ... pass guard.token() to everything written while holding ...
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! Protocol (docs/design.md, "Client protocol"): a `LockRequest` is created (named
//! `<lock>-<random>` by the client, so that a create whose answer was lost is retried
//! without a duplicate; label `kubelock.dev/lock`, `spec.renewTime`, `podRef` and an ownerReference
//! when the holder is a pod); the grant is awaited through two watches (the request by name,
//! the Lock by name) — no polling; `spec.renewTime` is renewed every lease/3 while waiting
//! and holding; the local deadline (boot time before the last successful write + lease −
//! margin) is kept on `CLOCK_BOOTTIME` with a timerfd, so a frozen or suspended holder knows
//! the moment it runs again that it no longer holds; release marks the request
//! `spec.released` with a UID precondition, and the controller frees the permits and deletes
//! it (a request deleted unmarked keeps its permits for its lease). A waiter whose deadline
//! passed withdraws its request the same way and asks again.

mod clock;
pub mod grace;
mod leader;
mod session;
mod tracker;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

pub use clock::{BootInstant, BootTimer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions},
};
pub use leader::{LeaderElector, Leadership, Term};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
pub use tracker::{
    DEFAULT_RENEW_INTERVAL, Grant, LockState, LostReason, MIN_MARGIN, Tracker, deadline, default_margin,
};

use crate::api::{LOCK_LABEL, Lock, LockRequest, LockRequestSpec, NAME_PATTERN, PodRef, duration};

/// Default timeout of each API call made by the client.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of API calls made by the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{op}: {source}")]
    Api {
        op: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("{op}: no answer from the API server within {after:?}")]
    Timeout { op: &'static str, after: Duration },
}

impl ClientError {
    /// A short, fixed label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            ClientError::Api { .. } => "api",
            ClientError::Timeout { .. } => "timeout",
        }
    }

    /// The API server said 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Api { source: kube::Error::Api(s), .. } if s.code == 404)
    }

    /// The API server said 403.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, ClientError::Api { source: kube::Error::Api(s), .. } if s.code == 403)
    }

    /// Worth retrying: no answer, no connection, or the server busy or failing (429, 5xx).
    /// An answer that refuses (other 4xx) is not.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Timeout { .. } => true,
            ClientError::Api { source: kube::Error::Api(s), .. } => s.code == 429 || s.code >= 500,
            ClientError::Api { source: kube::Error::Service(_) | kube::Error::HyperError(_), .. } => true,
            ClientError::Api { .. } => false,
        }
    }
}

/// First and longest pause between retries of a write that failed transiently.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(4);
/// How long creating a request is retried when no wait timeout bounds it.
const CREATE_RETRY_LIMIT: Duration = Duration::from_secs(60);

/// Why `acquire` (or `adopt`) returned without a grant.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("timed out after {waited} waiting for lock {lock} (request {request}{position})",
        waited = duration::format(*.waited),
        position = .position.map(|p| format!(", position {p} in the queue")).unwrap_or_default())]
    WaitTimeout { lock: String, request: String, waited: Duration, position: Option<i32> },
    #[error("cancelled while waiting for lock {lock}")]
    Cancelled { lock: String },
    #[error("lock {lock} not granted to request {request}: {reason}")]
    NotGranted { lock: String, request: String, reason: LostReason },
    #[error("lock request {request} not found")]
    NotFound { request: String },
}

impl AcquireError {
    /// A short, fixed label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            AcquireError::Invalid { .. } => "invalid",
            AcquireError::Client(e) => e.category(),
            AcquireError::WaitTimeout { .. } => "wait_timeout",
            AcquireError::Cancelled { .. } => "cancelled",
            AcquireError::NotGranted { reason: LostReason::Rejected { .. }, .. } => "rejected",
            AcquireError::NotGranted { .. } => "not_granted",
            AcquireError::NotFound { .. } => "not_found",
        }
    }
}

/// What to ask for.
#[derive(Debug, Clone)]
pub struct AcquireOptions {
    /// Name of the Lock (same namespace as the client).
    pub lock: String,
    /// Permits wanted (1 = mutex / reader; all of the Lock's = writer).
    pub permits: i32,
    /// Lease to ask for (`spec.leaseDuration`, capped at the Lock's). `None`: the Lock's.
    pub lease: Option<Duration>,
    /// Who holds it (free text). Empty: `<hostname>:<pid>`, or `pod/NS/NAME` with a pod.
    pub holder_identity: String,
    /// The pod the holder runs in: released as soon as the pod is gone. With a UID, the
    /// request also gets an ownerReference to the pod (garbage-collected with it).
    pub pod_ref: Option<PodRef>,
    /// Give up waiting after this long (`None`: wait forever).
    pub wait_timeout: Option<Duration>,
    /// Safety margin taken off the lease for the local deadline (`None`: max(lease/10, 200ms)).
    pub margin: Option<Duration>,
    /// Cancels the wait (the request is deleted).
    pub cancel: Option<CancellationToken>,
    /// Extra labels for the LockRequest.
    pub labels: BTreeMap<String, String>,
}

impl AcquireOptions {
    /// One permit of `lock`, the Lock's lease, no timeout.
    pub fn new(lock: impl Into<String>) -> Self {
        Self {
            lock: lock.into(),
            permits: 1,
            lease: None,
            holder_identity: String::new(),
            pod_ref: None,
            wait_timeout: None,
            margin: None,
            cancel: None,
            labels: BTreeMap::new(),
        }
    }

    /// Checks what the server would refuse (with a clearer message) and what it cannot check.
    pub fn validate(&self) -> Result<(), AcquireError> {
        let invalid = |field, message: String| Err(AcquireError::Invalid { field, message });
        if self.lock.is_empty() {
            return invalid("lock", "the lock name is empty".into());
        }
        if self.lock.len() > 253 || !is_dns_subdomain(&self.lock) {
            return invalid(
                "lock",
                format!(
                    "{:?} is not a valid object name (lower-case letters, digits, '-' and '.'; pattern {NAME_PATTERN})",
                    self.lock
                ),
            );
        }
        if self.permits < 1 {
            return invalid("permits", format!("{} is less than 1", self.permits));
        }
        if let Some(lease) = self.lease {
            if lease.is_zero() {
                return invalid("lease", "must be positive".into());
            }
            if lease > duration::MAX {
                return invalid("lease", "is longer than 8760h".into());
            }
            if let Some(m) = self.margin
                && m >= lease
            {
                return invalid(
                    "margin",
                    format!("{} is not shorter than the lease {}", duration::format(m), duration::format(lease)),
                );
            }
        }
        if self.holder_identity.len() > 256 {
            return invalid("holder identity", "longer than 256 characters".into());
        }
        if let Some(p) = &self.pod_ref
            && p.name.is_empty()
        {
            return invalid("pod name", "empty".into());
        }
        Ok(())
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    s.split('.').all(|label| {
        !label.is_empty()
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    })
}

/// `<hostname>:<pid>`: the default holder identity outside a pod.
pub fn default_holder_identity() -> String {
    let uname = rustix::system::uname();
    let host = uname.nodename().to_string_lossy().into_owned();
    format!("{host}:{}", std::process::id())
}

/// Acquires and releases locks in one namespace.
#[derive(Clone)]
pub struct LockClient {
    client: kube::Client,
    namespace: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for LockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockClient").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

impl LockClient {
    /// A client for the Locks of `namespace`.
    pub fn new(client: kube::Client, namespace: impl Into<String>) -> Self {
        Self { client, namespace: namespace.into(), request_timeout: DEFAULT_REQUEST_TIMEOUT }
    }

    /// Bounds every API call (create, renew, delete, get) by `timeout`.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The kube client.
    pub fn kube_client(&self) -> &kube::Client {
        &self.client
    }

    fn requests(&self) -> Api<LockRequest> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn locks(&self) -> Api<Lock> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Runs one API call with the request timeout.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(ClientError::Api { op, source }),
            Err(_) => Err(ClientError::Timeout { op, after: self.request_timeout }),
        }
    }

    /// Creates a LockRequest and starts renewing and watching it; does not wait.
    pub async fn request(&self, opts: &AcquireOptions) -> Result<Pending, AcquireError> {
        let give_up = opts.wait_timeout.map(|t| tokio::time::Instant::now() + t);
        self.request_until(opts, give_up).await
    }

    /// [`LockClient::request`], retrying the create until `give_up` at the latest.
    async fn request_until(
        &self,
        opts: &AcquireOptions,
        give_up: Option<tokio::time::Instant>,
    ) -> Result<Pending, AcquireError> {
        opts.validate()?;
        let holder = if !opts.holder_identity.is_empty() {
            opts.holder_identity.clone()
        } else if let Some(pod) = &opts.pod_ref {
            crate::pod::holder_identity(&self.namespace, &pod.name)
        } else {
            default_holder_identity()
        };
        let mut labels = opts.labels.clone();
        labels.insert(LOCK_LABEL.into(), label_value(&opts.lock));
        let owner_references = opts.pod_ref.as_ref().and_then(|p| {
            p.uid.as_ref().map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: p.name.clone(),
                    uid: uid.clone(),
                    controller: None,
                    block_owner_deletion: None,
                }]
            })
        });
        let renew_time = session::next_renew_time(jiff::Timestamp::UNIX_EPOCH);
        // The name is chosen here, not by the server (generateName), so that a create whose
        // answer was lost can be sent again without leaving a duplicate queued.
        let name = request_name(&opts.lock);
        let request = LockRequest {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                owner_references,
                ..Default::default()
            },
            spec: LockRequestSpec {
                lock_name: opts.lock.clone(),
                holder_identity: holder,
                permits: opts.permits,
                lease_duration: opts.lease.map(duration::format),
                renew_time: Some(MicroTime(renew_time)),
                pod_ref: opts.pod_ref.clone(),
                released: false,
            },
            status: None,
        };
        let params = PostParams { field_manager: Some(crate::api::CLIENT_MANAGER.into()), ..Default::default() };
        // The deadline counts from the first attempt (an earlier one may be the one that landed).
        let sent_at = BootInstant::now();
        let first_send = tokio::time::Instant::now();
        // Without a wait timeout, an API server that stays away for a minute is an error.
        let give_up = give_up.or(Some(first_send + CREATE_RETRY_LIMIT));
        let requests = self.requests();
        let mut pause = RETRY_FIRST;
        let mut attempts = 0;
        let outcome = loop {
            if opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                break Err(AcquireError::Cancelled { lock: opts.lock.clone() });
            }
            attempts += 1;
            match self.call("creating the lock request", requests.create(&params, &request)).await {
                Ok(created) => break Ok(created),
                // An earlier attempt landed although its answer was lost.
                Err(ClientError::Api { source: kube::Error::Api(s), .. }) if s.code == 409 && attempts > 1 => {
                    match self.call("reading the lock request", requests.get(&name)).await {
                        Ok(existing)
                            if existing.spec.holder_identity == request.spec.holder_identity
                                && existing.spec.lock_name == request.spec.lock_name
                                && existing.spec.permits == request.spec.permits =>
                        {
                            break Ok(existing);
                        }
                        Ok(_) => {
                            break Err(AcquireError::Invalid {
                                field: "request",
                                message: format!("a lock request named {name} exists already and is not ours"),
                            });
                        }
                        Err(e) => break Err(e.into()),
                    }
                }
                // Retried while the API server is unreachable or busy, as long as the wait
                // allows: a short outage must not fail a five-minute wait.
                Err(e)
                    if e.is_transient()
                        && give_up.is_none_or(|g| tokio::time::Instant::now() + pause + self.request_timeout < g) =>
                {
                    warn!(lock = %opts.lock, request = %name, error = %e, retry_in = ?pause, "creating the lock request failed");
                    let cancelled = async {
                        match &opts.cancel {
                            Some(c) => c.cancelled().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {} // back-off before the next attempt
                        _ = cancelled => {}
                    }
                    pause = (pause * 2).min(RETRY_MAX);
                }
                Err(e) => break Err(e.into()),
            }
        };
        let created = match outcome {
            Ok(created) => created,
            Err(e) => {
                if attempts > 1 {
                    // An earlier attempt may have landed unseen: nothing renews it, so it must not
                    // stay queued (it would be granted and hold the lock unused until it expired).
                    let (client, name) = (self.clone(), name.clone());
                    tokio::spawn(async move { client.withdraw(&name, None).await });
                }
                return Err(e);
            }
        };
        let now = BootInstant::now();
        let uid = created.uid().unwrap_or_default();
        debug!(lock = %opts.lock, request = %name, "lock request created");
        let mut tracker = Tracker::new(&name, &uid, opts.lease, opts.margin);
        tracker.on_write_ok(sent_at, now, Some(&created));
        Ok(self.start(opts.lock.clone(), tracker, false, renew_time, first_send))
    }

    /// Takes over a LockRequest created earlier (by `kubelock acquire` in an init container,
    /// or by a previous run of this process): renews it at once, and holds once that renewal
    /// succeeded and the grant is seen. Does not wait.
    pub async fn adopt_pending(&self, request: &str, opts: &AcquireOptions) -> Result<Pending, AcquireError> {
        let requests = self.requests();
        let existing = self
            .call("reading the lock request", requests.get_opt(request))
            .await?
            .ok_or_else(|| AcquireError::NotFound { request: request.into() })?;
        if !opts.lock.is_empty() && existing.spec.lock_name != opts.lock {
            return Err(AcquireError::Invalid {
                field: "request",
                message: format!("{request} asks for lock {}, not {}", existing.spec.lock_name, opts.lock),
            });
        }
        let lease = existing.spec.lease_duration.as_deref().and_then(|d| duration::parse(d).ok());
        let mut tracker = Tracker::new(request, existing.uid().unwrap_or_default(), lease, opts.margin);
        tracker.on_request(&existing, BootInstant::now());
        let last = existing.spec.renew_time.as_ref().map_or(jiff::Timestamp::UNIX_EPOCH, |t| t.0);
        Ok(self.start(existing.spec.lock_name.clone(), tracker, true, last, tokio::time::Instant::now()))
    }

    fn start(
        &self,
        lock: String,
        tracker: Tracker,
        renew_now: bool,
        last_renew: jiff::Timestamp,
        last_send: tokio::time::Instant,
    ) -> Pending {
        let (tx, rx) = watch::channel(tracker.state().clone());
        let cancel = CancellationToken::new();
        let ctx = session::SessionCtx {
            requests: self.requests(),
            locks: self.locks(),
            lock: lock.clone(),
            request_timeout: self.request_timeout,
            renew_now,
            last_renew,
            last_send,
        };
        let name = tracker.name().to_string();
        let uid = tracker.uid().to_string();
        let tx = Arc::new(tx);
        let task = tokio::spawn(session::run(ctx, tracker, Arc::clone(&tx), cancel.clone()));
        Pending { inner: Some(Inner { client: self.clone(), lock, name, uid, rx, tx, cancel, task: Some(task) }) }
    }

    /// Creates a LockRequest and waits until it is granted (or `wait_timeout`, or `cancel`).
    /// On any failure after the create, the request is deleted.
    ///
    /// A waiting request that loses its lease (it could not renew in time: the process was
    /// frozen, the API server unreachable) is withdrawn and a new one is made, while
    /// `wait_timeout` allows: see [`Tracker::waiting_deadline`].
    pub async fn acquire(&self, opts: AcquireOptions) -> Result<Guard, AcquireError> {
        let started = tokio::time::Instant::now();
        let give_up = opts.wait_timeout.map(|t| started + t);
        loop {
            let pending = self.request_until(&opts, give_up).await?;
            let remaining = opts.wait_timeout.map(|t| t.saturating_sub(started.elapsed()));
            match pending.granted(remaining, opts.cancel.clone()).await {
                Err(AcquireError::NotGranted { reason: LostReason::DeadlinePassed, lock, request })
                    if remaining.is_none_or(|r| !r.is_zero()) =>
                {
                    tracing::warn!(%lock, %request, "the waiting request could not renew within its lease; asking again");
                }
                Err(AcquireError::WaitTimeout { lock, request, position, .. }) => {
                    let waited = opts.wait_timeout.unwrap_or_default();
                    return Err(AcquireError::WaitTimeout { lock, request, waited, position });
                }
                other => return other,
            }
        }
    }

    /// [`LockClient::adopt_pending`], then waits like [`LockClient::acquire`].
    pub async fn adopt(&self, request: &str, opts: AcquireOptions) -> Result<Guard, AcquireError> {
        let pending = self.adopt_pending(request, &opts).await?;
        pending.granted(opts.wait_timeout, opts.cancel.clone()).await
    }

    /// Releases a request that must not stay queued (its requester does not act on it),
    /// retrying transient failures (and 403s) for up to a minute.
    async fn withdraw(&self, name: &str, uid: Option<&str>) {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut pause = RETRY_FIRST;
        loop {
            match self.release_request(name, uid).await {
                Ok(_) => return,
                // 403 too: a kube-apiserver that just restarted refuses everything for a moment,
                // until its RBAC cache is loaded (seen in fault runs).
                Err(e) if (e.is_transient() || e.is_forbidden()) && tokio::time::Instant::now() + pause < give_up => {
                    tokio::time::sleep(pause).await; // back-off before the next attempt
                    pause = (pause * 2).min(RETRY_MAX);
                }
                Err(e) => {
                    tracing::warn!(request = %name, error = %e, "could not withdraw the lock request; it stays until it expires");
                    return;
                }
            }
        }
    }

    /// The holder's own release of a request: marks it `spec.released`; the controller then
    /// frees its permits at once and deletes it (so that whichever controller plans next still
    /// sees the mark). Call it only once nothing acts on the grant any more. A request already
    /// gone is not an error: `Ok(false)`.
    pub async fn release_request(&self, name: &str, uid: Option<&str>) -> Result<bool, ClientError> {
        let mut patch = serde_json::json!({ "spec": { "released": true } });
        if let Some(uid) = uid {
            // The UID acts as a precondition: a request recreated under the name refuses it.
            patch["metadata"] = serde_json::json!({ "uid": uid });
        }
        let params = PatchParams { field_manager: Some(crate::api::CLIENT_MANAGER.into()), ..Default::default() };
        let requests = self.requests();
        match self.call("marking the lock request released", requests.patch(name, &params, &Patch::Merge(&patch))).await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            // 409, or 422 "metadata.uid: field is immutable": another request has the name now.
            Err(ClientError::Api { source: kube::Error::Api(s), .. })
                if s.code == 409 || (s.code == 422 && s.message.contains("metadata.uid")) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes a LockRequest by name (with its UID as precondition when given), without
    /// marking it released: the controller then keeps a grant's permits until its lease has
    /// passed (see [`LockClient::release_request`]). A request already gone: `Ok(false)`.
    pub async fn delete_request(&self, name: &str, uid: Option<&str>) -> Result<bool, ClientError> {
        let params = DeleteParams {
            preconditions: uid.map(|u| Preconditions { uid: Some(u.into()), resource_version: None }),
            ..Default::default()
        };
        let requests = self.requests();
        match self.call("deleting the lock request", requests.delete(name, &params)).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            // 409 on the UID precondition: another request has that name now; ours is gone.
            Err(ClientError::Api { source: kube::Error::Api(s), .. }) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// `<lock>-<5 random characters>`, like the server's generateName, within the 253 characters
/// of a name.
fn request_name(lock: &str) -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789"; // the server's own, no vowels
    let mut bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let mut suffix = String::with_capacity(5);
    for _ in 0..5 {
        suffix.push(ALPHABET[(bits % ALPHABET.len() as u64) as usize] as char);
        bits /= ALPHABET.len() as u64;
    }
    let prefix: String = lock.chars().take(253 - 6).collect();
    format!("{}-{suffix}", prefix.trim_end_matches(['-', '.']))
}

/// Label values are at most 63 characters; longer lock names are cut (the label is only a
/// convenience for `kubectl get lkr -l`).
fn label_value(lock: &str) -> String {
    let mut v: String = lock.chars().take(63).collect();
    while v.ends_with(['-', '.']) {
        v.pop();
    }
    v
}

struct Inner {
    client: LockClient,
    lock: String,
    name: String,
    uid: String,
    rx: watch::Receiver<LockState>,
    tx: Arc<watch::Sender<LockState>>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Inner {
    /// The state, with the deadline checked against the clock now.
    fn current(&self) -> LockState {
        let state = self.rx.borrow().clone();
        match state {
            LockState::Holding { token, deadline, .. } if BootInstant::now() >= deadline => {
                LockState::Lost { reason: LostReason::DeadlinePassed, token: Some(token) }
            }
            s => s,
        }
    }

    /// Stops the task and deletes the request, unless the lock was lost (then the
    /// controller finishes the request).
    async fn release(&mut self) -> Result<(), ClientError> {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let before = self.current();
        self.tx.send_replace(LockState::Lost {
            reason: LostReason::Released,
            token: match &before {
                LockState::Holding { token, .. } => Some(*token),
                LockState::Lost { token, .. } => *token,
                LockState::Waiting { .. } => None,
            },
        });
        // Nothing acts on the grant any more (the caller says so by releasing): mark the
        // request released (the controller deletes it). After a lost grant this frees permits that may
        // still be draining (the lock delay applies after such an end anyway); a waiter that
        // was never granted must not stay queued either (it would be granted later and hold
        // the lock unused until it expired). A request already gone needs nothing.
        if matches!(&before, LockState::Lost { reason: LostReason::RequestDeleted, .. }) {
            return Ok(());
        }
        self.client.release_request(&self.name, Some(&self.uid)).await?;
        info!(lock = %self.lock, request = %self.name, "lock released");
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped without release() or detach(): its owner no longer acts on it. Stop
        // renewing and release in the background, as release() does.
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
            if matches!(self.current(), LockState::Lost { reason: LostReason::RequestDeleted, .. }) {
                return;
            }
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let client = self.client.clone();
                let (name, uid) = (self.name.clone(), self.uid.clone());
                handle.spawn(async move {
                    if let Err(e) = client.release_request(&name, Some(&uid)).await {
                        tracing::warn!(request = %name, error = %e, "deleting the dropped lock request failed");
                    }
                });
            }
        }
    }
}

/// A LockRequest that is being renewed and watched, not granted yet.
pub struct Pending {
    inner: Option<Inner>,
}

impl Pending {
    fn inner(&self) -> &Inner {
        self.inner.as_ref().expect("present until consumed")
    }

    /// The LockRequest's name.
    pub fn request_name(&self) -> &str {
        &self.inner().name
    }

    /// The LockRequest's UID.
    pub fn request_uid(&self) -> &str {
        &self.inner().uid
    }

    /// The Lock's name.
    pub fn lock(&self) -> &str {
        &self.inner().lock
    }

    /// State changes.
    pub fn state(&self) -> watch::Receiver<LockState> {
        self.inner().rx.clone()
    }

    /// Waits until granted, `timeout` passes or `cancel` fires. On failure the request is
    /// deleted (unless the controller already finished it).
    pub async fn granted(
        mut self,
        timeout: Option<Duration>,
        cancel: Option<CancellationToken>,
    ) -> Result<Guard, AcquireError> {
        let mut inner = self.inner.take().expect("present until consumed");
        let mut rx = inner.rx.clone();
        let wait = rx.wait_for(|s| !matches!(s, LockState::Waiting { .. }));
        let cancelled = async {
            match &cancel {
                Some(c) => c.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            r = wait => match r {
                Ok(s) => Ok(s.clone()),
                Err(_) => Err(None),
            },
            _ = cancelled => Err(Some(AcquireError::Cancelled { lock: inner.lock.clone() })),
            _ = deadline => {
                let position = match &*inner.rx.borrow() {
                    LockState::Waiting { position } => *position,
                    _ => None,
                };
                Err(Some(AcquireError::WaitTimeout {
                    lock: inner.lock.clone(),
                    request: inner.name.clone(),
                    waited: timeout.unwrap_or_default(),
                    position,
                }))
            }
        };
        let error = match outcome {
            Ok(LockState::Holding { .. }) => {
                // Re-check with the clock: a grant may be past its deadline already.
                let reason = match inner.current() {
                    LockState::Holding { token, lock_uid, .. } => {
                        info!(lock = %inner.lock, request = %inner.name, token, "lock acquired");
                        return Ok(Guard { inner: Some(inner), token, lock_uid });
                    }
                    LockState::Lost { reason, .. } => reason,
                    LockState::Waiting { .. } => LostReason::DeadlinePassed,
                };
                AcquireError::NotGranted { lock: inner.lock.clone(), request: inner.name.clone(), reason }
            }
            Ok(LockState::Lost { reason, .. }) => {
                AcquireError::NotGranted { lock: inner.lock.clone(), request: inner.name.clone(), reason }
            }
            Ok(LockState::Waiting { .. }) | Err(None) => AcquireError::NotGranted {
                lock: inner.lock.clone(),
                request: inner.name.clone(),
                reason: LostReason::RequestDeleted,
            },
            Err(Some(e)) => e,
        };
        if let Err(e) = inner.release().await {
            tracing::warn!(request = %inner.name, error = %e, "deleting the lock request after a failed acquire");
            if e.is_transient() || e.is_forbidden() {
                // Left queued it would be granted later and hold the lock unused until it
                // expires: keep trying in the background (a caller usually asks again at once).
                let (client, name, uid) = (inner.client.clone(), inner.name.clone(), inner.uid.clone());
                tokio::spawn(async move { client.withdraw(&name, Some(&uid)).await });
            }
        }
        inner.task = None;
        Err(error)
    }

    /// Deletes the request.
    pub async fn release(mut self) -> Result<(), ClientError> {
        let mut inner = self.inner.take().expect("present until consumed");
        let r = inner.release().await;
        inner.task = None;
        r
    }

    /// Stops renewing and watching but leaves the request in place (someone adopts it).
    /// Returns its name and UID.
    pub fn detach(mut self) -> (String, String) {
        let mut inner = self.inner.take().expect("present until consumed");
        detach_inner(&mut inner)
    }
}

fn detach_inner(inner: &mut Inner) -> (String, String) {
    inner.cancel.cancel();
    if let Some(task) = inner.task.take() {
        task.abort();
    }
    (inner.name.clone(), inner.uid.clone())
}

/// A granted lock. Check [`Guard::is_holding`] (or watch [`Guard::state`]) before acting,
/// and pass [`Guard::token`] to every resource written under the lock. Dropping the guard
/// releases in the background; [`Guard::release`] releases and reports the outcome.
pub struct Guard {
    inner: Option<Inner>,
    token: i64,
    lock_uid: String,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("lock", &self.lock())
            .field("request", &self.request_name())
            .field("token", &self.token)
            .field("state", &self.current())
            .finish()
    }
}

impl Guard {
    fn inner(&self) -> &Inner {
        self.inner.as_ref().expect("present until consumed")
    }

    /// The fencing token of this grant.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// Marks `obj` as written under this grant: `kubelock.dev/fenced-by: LOCK` and
    /// `kubelock.dev/fencing-token: TOKEN`. Where the admission webhook runs, the API server
    /// admits a write of an object so labelled only while the token is a current holder's
    /// (and not lower than the object's last write), so a holder that lost its grant is
    /// refused even while it still believes it holds.
    pub fn fence<K: kube::Resource>(&self, obj: &mut K) {
        let meta = obj.meta_mut();
        meta.labels.get_or_insert_with(Default::default).insert(crate::api::FENCED_BY_LABEL.into(), self.lock().into());
        meta.annotations
            .get_or_insert_with(Default::default)
            .insert(crate::api::FENCING_TOKEN_ANNOTATION.into(), self.token.to_string());
    }

    /// The Lock's `metadata.uid` (tokens are unique per Lock UID).
    pub fn lock_uid(&self) -> &str {
        &self.lock_uid
    }

    /// The Lock's name.
    pub fn lock(&self) -> &str {
        &self.inner().lock
    }

    /// The LockRequest's name.
    pub fn request_name(&self) -> &str {
        &self.inner().name
    }

    /// The LockRequest's UID.
    pub fn request_uid(&self) -> &str {
        &self.inner().uid
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        self.inner().client.namespace()
    }

    /// The current state, the deadline checked against `CLOCK_BOOTTIME` now (so it is right
    /// even if the background task has not run since the deadline passed).
    pub fn current(&self) -> LockState {
        self.inner().current()
    }

    /// Holding now.
    pub fn is_holding(&self) -> bool {
        matches!(self.current(), LockState::Holding { .. })
    }

    /// The local deadline while holding.
    pub fn deadline(&self) -> Option<BootInstant> {
        match self.current() {
            LockState::Holding { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// Time left before the local deadline (zero when not holding).
    pub fn time_left(&self) -> Duration {
        self.deadline().map_or(Duration::ZERO, |d| d.saturating_since(BootInstant::now()))
    }

    /// State changes (Holding → Lost), for `select!`/`changed()`.
    pub fn state(&self) -> watch::Receiver<LockState> {
        self.inner().rx.clone()
    }

    /// Completes when the lock is lost (at once if it already is), with the reason.
    pub async fn lost(&self) -> LostReason {
        let mut rx = self.inner().rx.clone();
        let result = rx.wait_for(|s| s.is_lost()).await.map(|s| s.clone());
        match result {
            Ok(LockState::Lost { reason, .. }) => reason,
            // The task is gone (released or detached): not holding.
            _ => match self.current() {
                LockState::Lost { reason, .. } => reason,
                _ => LostReason::Released,
            },
        }
    }

    /// Stops renewing, marks the request released and deletes it (UID precondition): a clean
    /// release, the next waiter is granted at once. Call it once nothing acts on the grant
    /// any more. After a loss it also ends the drain of the grant's permits (the lock delay
    /// still applies after such an end).
    pub async fn release(mut self) -> Result<(), ClientError> {
        let mut inner = self.inner.take().expect("present until consumed");
        let r = inner.release().await;
        inner.task = None;
        r
    }

    /// Stops renewing and watching but leaves the request in place: the grant lives on
    /// until its lease runs out, unless someone adopts the request (init container →
    /// sidecar). Returns its name and UID.
    pub fn detach(mut self) -> (String, String) {
        let mut inner = self.inner.take().expect("present until consumed");
        detach_inner(&mut inner)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_names_look_generated_and_fit() {
        let a = super::request_name("db");
        let b = super::request_name("db");
        assert!(a.starts_with("db-") && a.len() == 8, "{a}");
        assert_ne!(a, b, "random suffixes");
        let long = super::request_name(&format!("{}.x", "a".repeat(246)));
        assert!(long.len() <= 253 && !long.contains(".-"), "{long}");
    }

    use super::*;

    #[test]
    fn validation_names_the_field() {
        let mut o = AcquireOptions::new("");
        assert!(matches!(o.validate(), Err(AcquireError::Invalid { field: "lock", .. })));
        o.lock = "Bad_Name".into();
        assert!(matches!(o.validate(), Err(AcquireError::Invalid { field: "lock", .. })));
        o.lock = "db.migrations-1".into();
        assert!(o.validate().is_ok());
        o.permits = 0;
        assert!(matches!(o.validate(), Err(AcquireError::Invalid { field: "permits", .. })));
        o.permits = 2;
        o.lease = Some(Duration::from_secs(1));
        o.margin = Some(Duration::from_secs(1));
        let e = o.validate().unwrap_err();
        assert!(matches!(e, AcquireError::Invalid { field: "margin", .. }));
        assert_eq!(e.to_string(), "invalid margin: 1s is not shorter than the lease 1s");
        o.margin = None;
        o.lease = Some(Duration::ZERO);
        assert!(matches!(o.validate(), Err(AcquireError::Invalid { field: "lease", .. })));
    }

    #[test]
    fn label_values_fit() {
        assert_eq!(label_value("db"), "db");
        let long = format!("{}-x", "a".repeat(62));
        assert_eq!(label_value(&long), "a".repeat(62));
    }

    #[test]
    fn timeout_message() {
        let e = AcquireError::WaitTimeout {
            lock: "db".into(),
            request: "db-x1".into(),
            waited: Duration::from_secs(300),
            position: Some(2),
        };
        assert_eq!(e.to_string(), "timed out after 5m0s waiting for lock db (request db-x1, position 2 in the queue)");
    }

    #[test]
    fn holder_identity_default() {
        let id = default_holder_identity();
        assert!(id.ends_with(&format!(":{}", std::process::id())), "{id}");
    }
}
