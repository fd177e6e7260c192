//! The grant decision: `plan(inputs) -> Plan`.
//!
//! All lock policy lives here and nothing else: no I/O, no clock reads (the caller passes
//! `now`), no randomness. The controller feeds it what its caches hold and writes what it
//! returns; a plan over an unchanged world changes nothing, so reconciles are idempotent.
//!
//! Rules, in the order they apply:
//! 1. A holder whose request is gone (deleted, being deleted, or recreated with another UID)
//!    is a clean release: its permits are freed at once, with no lock delay.
//! 2. A holder whose request carries the break annotation, whose pod is gone, or whose lease
//!    ran out (no observed change of the request's generation or renewTime for its lease, on
//!    the controller's monotonic clock) is expired; the lock delay then holds back grants.
//! 3. Waiting requests queue in strict FIFO order by (creationTimestamp, name); the head that
//!    does not fit blocks those behind it, so a writer is never starved by readers.
//! 4. Every grant takes the next fencing token; tokens never repeat or decrease for a Lock UID.
//!
//! Caches lag. A fact that *frees* permits ("the request is gone", "no renewal came",
//! "the pod is gone", "the Lock was recreated") is only acted upon once confirmed: by a
//! deletion the watch delivered, or by a quorum read made for this plan. Until then the plan
//! keeps the holder and asks for the read in [`Plan::checks`]. A fact that only delays (a
//! request or pod still in the cache) needs no confirmation: acting on it late is safe.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::ResourceExt;

use crate::api::{
    BREAK_ANNOTATION, BROKEN_BY_ANNOTATION, Holder, Lock, LockRequest, LockRequestStatus, LockStatus, Phase, duration,
};

/// How many queued request names `Lock.status.queue` lists, and how far back
/// `LockRequest.status.position` is kept exact.
pub const QUEUE_WINDOW: usize = 10;

/// The lease used for a holder entry whose recorded lease cannot be read (a hand-edited status).
const FALLBACK_LEASE: Duration = Duration::from_secs(30);

/// The current time, as the controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// The controller's monotonic clock (time since it started). Decides expiry.
    pub mono: Duration,
    /// Wall-clock time, only written into status fields for people to read.
    pub wall: Timestamp,
}

/// Controller settings the plan depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Expired and Rejected requests are deleted this long after they finished.
    pub finished_retention: Duration,
    /// Whether pods are watched (and `podRef` honoured).
    pub watch_pods: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self { finished_retention: Duration::from_secs(15 * 60), watch_pods: true }
    }
}

/// What the controller remembers about one Lock between plans, on its monotonic clock.
/// Lost on restart, by design: every countdown then starts again (late, never early).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observations {
    /// Per holder (request UID): the renewal last seen and when it was first seen.
    pub renewals: BTreeMap<String, Renewal>,
    /// The lock delay in force, and when this controller first saw it.
    pub delay: Option<DelayObservation>,
    /// Per waiting request (UID): when this controller first saw it (for grant latency).
    pub first_seen: BTreeMap<String, Duration>,
    /// Requests (UIDs) whose grant this controller ended, kept until its cache shows them
    /// finished or gone: a cache that has not caught up with our own `Expired` mirror (or a
    /// mirror that failed) must not make them look like new waiters. Expired is final.
    pub ended: BTreeSet<String>,
}

/// A holder's heartbeat as last observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// `metadata.generation` of the request (bumped by every spec write, renewals included).
    pub generation: Option<i64>,
    /// `spec.renewTime`, compared for change only.
    pub renew_time: Option<Timestamp>,
    /// When the controller observed this value (or the grant).
    pub at: Duration,
}

/// A lock delay as first observed by this controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelayObservation {
    /// The `status.delayedUntil` value it belongs to.
    pub until: Timestamp,
    /// When the delay started, on this controller's clock.
    pub at: Duration,
}

/// What the controller knows about a pod named by a `podRef`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's UID.
    pub uid: String,
    /// Phase Succeeded or Failed: its containers will not run again.
    pub terminated: bool,
}

/// Everything one plan looks at. Built by the controller from its caches and quorum reads.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The Lock.
    pub lock: &'a Lock,
    /// The Lock was read by quorum (or returned by our own write) for this plan.
    pub lock_fresh: bool,
    /// The requests whose `spec.lockName` is this Lock.
    pub requests: &'a [Arc<LockRequest>],
    /// UIDs of requests read by quorum for this plan (their content is current).
    pub fresh: &'a HashSet<String>,
    /// UIDs of requests known to be deleted (a watched deletion, or a quorum read's 404).
    pub gone: &'a HashSet<String>,
    /// Pods in the Lock's namespace, by name, as far as the controller knows them.
    pub pods: &'a BTreeMap<String, PodInfo>,
    /// Names of pods known not to exist (a watched deletion, or a quorum read's 404).
    pub gone_pods: &'a HashSet<String>,
    /// Per request UID: the order in which the controller's watch first delivered it (etcd
    /// commit order). Breaks ties between requests created in the same second.
    pub arrival: &'a HashMap<String, u64>,
    /// What this controller observed in earlier plans.
    pub observations: &'a Observations,
    /// Settings.
    pub settings: &'a Settings,
    /// The time.
    pub now: Now,
}

/// Why a grant ended or was refused: the `Granted` condition's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Granted.
    Granted,
    /// The request was deleted: a clean release.
    Released,
    /// No renewal was observed for the whole lease.
    LeaseExpired,
    /// The holder pod is gone or terminated.
    PodGone,
    /// An administrator broke the lock.
    Broken,
    /// The Lock was deleted (or recreated) while this request held it.
    LockDeleted,
    /// The grant ended while its status was not mirrored (seen after a controller restart).
    Lost,
    /// More permits asked than the Lock has.
    TooManyPermits,
    /// The request's spec cannot be honoured.
    InvalidSpec,
    /// Queued behind other requests.
    Waiting,
    /// Queued: a lock delay after an expiry holds back grants.
    LockDelay,
    /// Queued: the Lock's spec is invalid, so nothing is granted.
    InvalidLock,
    /// Queued: the Lock does not exist.
    LockNotFound,
    /// Queued: the request's pod has not been seen yet.
    PodNotFound,
}

impl Reason {
    /// The CamelCase name used in conditions, events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Granted => "Granted",
            Reason::Released => "Released",
            Reason::LeaseExpired => "LeaseExpired",
            Reason::PodGone => "PodGone",
            Reason::Broken => "Broken",
            Reason::LockDeleted => "LockDeleted",
            Reason::Lost => "Lost",
            Reason::TooManyPermits => "TooManyPermits",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::Waiting => "Waiting",
            Reason::LockDelay => "LockDelay",
            Reason::InvalidLock => "InvalidLock",
            Reason::LockNotFound => "LockNotFound",
            Reason::PodNotFound => "PodNotFound",
        }
    }

    /// Ending a grant for this reason starts the lock delay (it was not a clean release).
    fn starts_lock_delay(self) -> bool {
        matches!(self, Reason::LeaseExpired | Reason::PodGone | Reason::Broken)
    }
}

/// The kind of a Kubernetes Event the plan asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// Permits were granted.
    Granted,
    /// A holder released cleanly (its request was deleted).
    Released,
    /// A grant was ended by the controller (lease, pod gone, lock deleted, lost).
    Expired,
    /// An administrator broke a grant (or cancelled a waiting request).
    Broken,
    /// A request can never be granted.
    Rejected,
}

impl EventKind {
    /// The Event reason.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Granted => "Granted",
            EventKind::Released => "Released",
            EventKind::Expired => "Expired",
            EventKind::Broken => "Broken",
            EventKind::Rejected => "Rejected",
        }
    }
}

/// Something worth an Event and a metric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEvent {
    /// What happened.
    pub kind: EventKind,
    /// Why (the request's condition reason).
    pub reason: Reason,
    /// The request concerned.
    pub request: String,
    /// Its UID.
    pub request_uid: String,
    /// Its holder identity.
    pub holder: String,
    /// The token granted or lost.
    pub token: Option<i64>,
    /// A sentence for the Event note.
    pub message: String,
    /// For grants: time since this controller first saw the request waiting.
    pub wait: Option<Duration>,
    /// For ends of grants: how long it was held (wall clock since `grantedAt`).
    pub held: Option<Duration>,
    /// The event is a change of the Lock's status (a grant, or the end of one): it happened
    /// once the status is written. Otherwise it only concerns the request, and happened once
    /// the request's own status is written.
    pub of_lock: bool,
}

/// A request status to write.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestUpdate {
    /// Request name.
    pub name: String,
    /// Request UID (the write also carries the request's resourceVersion).
    pub uid: String,
    /// The complete new status.
    pub status: LockRequestStatus,
    /// A new grant: written first, since a waiter may be watching only its request.
    pub granted: bool,
    /// The end of a grant, written *before* the Lock status (a fence): carrying the
    /// resourceVersion the plan read, it fails if the holder renewed meanwhile, and a renewal
    /// landing after it is answered with `Expired`. Without it a renewal racing the expiry
    /// could hand the holder a fresh deadline while its successor is granted (found by the
    /// model check, tests/model_check.rs).
    pub fence: bool,
}

/// A finished request to delete, past its retention.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deletion {
    /// Request name.
    pub name: String,
    /// Request UID (delete precondition).
    pub uid: String,
}

/// A quorum read the plan needs before it may free permits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    /// Read the Lock.
    Lock,
    /// Read this request (is it gone? has it renewed?).
    Request {
        /// Its name.
        name: String,
        /// The UID the plan knows it by: a 404, or another UID, means that one is gone.
        uid: String,
    },
    /// Read this pod (is it gone?).
    Pod(String),
}

/// The outcome of planning one Lock.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The new Lock status, if it differs from the current one: to be written by CAS.
    pub lock_status: Option<LockStatus>,
    /// Request statuses to mirror, once the Lock status is written. New grants first.
    pub requests: Vec<RequestUpdate>,
    /// Finished requests to delete.
    pub deletions: Vec<Deletion>,
    /// Events to publish, once the Lock status is written.
    pub events: Vec<PlanEvent>,
    /// Quorum reads to make, then plan again: until then the plan frees nothing they concern.
    pub checks: BTreeSet<Check>,
    /// Observations to keep once the Lock status is written (or if nothing needed writing).
    pub observations: Observations,
    /// When to plan again, on the monotonic clock, if nothing else happens first.
    pub wake_at: Option<Duration>,
    /// What is wrong with the Lock's spec, if anything (also in its Ready condition).
    pub invalid_spec: Option<String>,
}

impl Plan {
    fn wake(&mut self, at: Duration) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    fn update(&mut self, req: &LockRequest, status: LockRequestStatus, granted: bool) {
        // A status that could not be read in full is rewritten even if what was read matches.
        let unreadable = crate::api::malformed(req).is_some() && crate::api::malformed_spec(req).is_none();
        if req.status.as_ref() != Some(&status) || unreadable {
            let (name, uid) = (req.name_any(), uid_of(req).into());
            self.requests.push(RequestUpdate { name, uid, status, granted, fence: false });
        }
    }

    fn fence(&mut self, req: &LockRequest, status: LockRequestStatus) {
        self.update(req, status, false);
        if let Some(last) = self.requests.last_mut().filter(|u| u.uid == uid_of(req)) {
            last.fence = true;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        kind: EventKind,
        reason: Reason,
        request: &str,
        uid: &str,
        holder: &str,
        token: Option<i64>,
        message: String,
    ) -> &mut PlanEvent {
        self.events.push(PlanEvent {
            kind,
            reason,
            request: request.into(),
            request_uid: uid.into(),
            holder: holder.into(),
            token,
            message,
            wait: None,
            held: None,
            of_lock: false,
        });
        self.events.last_mut().expect("just pushed")
    }

    /// An event about a holder entry of the Lock that ends now, after holding for `held`.
    fn holder_event(&mut self, kind: EventKind, reason: Reason, h: &Holder, held: Option<Duration>, message: String) {
        let e = self.event(kind, reason, &h.request, &h.request_uid, &h.holder, Some(h.token), message);
        e.held = held;
        e.of_lock = true;
    }
}

/// The Lock spec, parsed.
struct LockParams {
    permits: i64,
    lease: Duration,
    lock_delay: Duration,
}

fn parse_lock_spec(lock: &Lock) -> Result<LockParams, String> {
    if let Some(problem) = crate::api::malformed(lock) {
        return Err(problem.to_string());
    }
    let spec = &lock.spec;
    if spec.permits < 1 {
        return Err(format!("spec.permits must be at least 1, got {}", spec.permits));
    }
    let lease = duration::parse(&spec.lease_duration).map_err(|e| format!("spec.leaseDuration: {e}"))?;
    if lease.is_zero() {
        return Err("spec.leaseDuration must be positive, got 0".into());
    }
    let lock_delay = duration::parse(&spec.lock_delay).map_err(|e| format!("spec.lockDelay: {e}"))?;
    Ok(LockParams { permits: i64::from(spec.permits), lease, lock_delay })
}

/// A request's own spec, parsed (independently of its Lock).
struct RequestParams {
    permits: i64,
    lease: Option<Duration>,
}

fn parse_request_spec(req: &LockRequest) -> Result<RequestParams, String> {
    if let Some(problem) = crate::api::malformed_spec(req) {
        return Err(problem.to_string());
    }
    if req.spec.permits < 1 {
        return Err(format!("spec.permits must be at least 1, got {}", req.spec.permits));
    }
    let lease = match &req.spec.lease_duration {
        None => None,
        Some(text) => {
            let d = duration::parse(text).map_err(|e| format!("spec.leaseDuration: {e}"))?;
            if d.is_zero() {
                return Err("spec.leaseDuration must be positive, got 0".into());
            }
            Some(d)
        }
    };
    Ok(RequestParams { permits: i64::from(req.spec.permits), lease })
}

fn uid_of(req: &LockRequest) -> &str {
    req.metadata.uid.as_deref().unwrap_or("")
}

fn holder_identity(req: &LockRequest) -> String {
    if req.spec.holder_identity.is_empty() { req.name_any() } else { req.spec.holder_identity.clone() }
}

fn renewal_key(req: &LockRequest) -> (Option<i64>, Option<Timestamp>) {
    (req.metadata.generation, req.spec.renew_time.as_ref().map(|t| t.0))
}

/// FIFO order: `creationTimestamp`, then (it has one-second resolution) the order in which
/// the watch delivered the requests, then name.
pub fn fifo(a: &LockRequest, b: &LockRequest, arrival: &HashMap<String, u64>) -> Ordering {
    let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let seq = |r: &LockRequest| arrival.get(uid_of(r)).copied().unwrap_or(u64::MAX);
    ta.cmp(&tb).then_with(|| seq(a).cmp(&seq(b))).then_with(|| a.name_any().cmp(&b.name_any()))
}

fn break_message(req: &LockRequest) -> Option<String> {
    let reason = req.annotations().get(BREAK_ANNOTATION)?;
    let who = req.annotations().get(BROKEN_BY_ANNOTATION).map_or("unknown", String::as_str);
    Some(format!("broken by {who}: {reason}"))
}

/// Where a request's pod stands.
enum PodState {
    /// No podRef (or pods are not watched), or the pod is there and running.
    Fine,
    /// The pod is gone for good.
    Gone(String),
    /// The cache does not have it and nothing confirms it is gone.
    Unknown(String),
}

fn pod_state(req: &LockRequest, inputs: &Inputs<'_>) -> PodState {
    let Some(pod_ref) = req.spec.pod_ref.as_ref().filter(|_| inputs.settings.watch_pods) else {
        return PodState::Fine;
    };
    let name = &pod_ref.name;
    match inputs.pods.get(name) {
        Some(pod) if pod_ref.uid.as_ref().is_some_and(|uid| *uid != pod.uid) => {
            PodState::Gone(format!("pod {name} was replaced by another pod of the same name"))
        }
        Some(pod) if pod.terminated => PodState::Gone(format!("pod {name} has terminated")),
        Some(_) => PodState::Fine,
        None if inputs.gone_pods.contains(name) => PodState::Gone(format!("pod {name} was deleted")),
        None => PodState::Unknown(name.clone()),
    }
}

/// The message of a clean release.
fn released(h: &Holder) -> String {
    format!("{} released {} permit(s), token {}", h.holder, h.permits, h.token)
}

fn since(start: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(start)).unwrap_or(Duration::ZERO)
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// Builds a condition, keeping `lastTransitionTime` from the previous one unless the status flips.
fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status a request should have.
enum Fate<'a> {
    Holding { holder: &'a Holder, lock_uid: &'a str },
    Waiting { position: usize, reason: Reason, message: String },
    Finished { phase: Phase, reason: Reason, message: String, holder: Option<&'a Holder>, lock_uid: Option<&'a str> },
}

fn desired_status(req: &LockRequest, fate: Fate<'_>, now: Now) -> LockRequestStatus {
    let current = req.status.clone().unwrap_or_default();
    let previous = current.conditions.as_slice();
    match fate {
        Fate::Holding { holder, lock_uid } => LockRequestStatus {
            phase: Some(Phase::Granted),
            token: Some(holder.token),
            granted_at: Some(holder.granted_at.clone()),
            lease_duration: Some(holder.lease_duration.clone()),
            lock_uid: Some(lock_uid.to_string()),
            position: None,
            finished_at: None,
            message: Some(format!("holding {} permit(s) with fencing token {}", holder.permits, holder.token)),
            conditions: vec![condition(
                previous,
                "Granted",
                true,
                "Granted",
                format!("token {}", holder.token),
                None,
                now.wall,
            )],
        },
        Fate::Waiting { position, reason, message } => {
            let exact = position < QUEUE_WINDOW;
            let position = i32::try_from(position).unwrap_or(i32::MAX);
            let window = QUEUE_WINDOW as i32;
            let position = match current.position {
                // Beyond the window, refresh only every QUEUE_WINDOW places: fewer writes.
                Some(p) if !exact && p >= position && p - position < window => p,
                _ => position,
            };
            LockRequestStatus {
                phase: Some(Phase::Pending),
                position: Some(position),
                message: Some(message.clone()),
                conditions: vec![condition(previous, "Granted", false, reason.as_str(), message, None, now.wall)],
                ..Default::default()
            }
        }
        Fate::Finished { phase, reason, message, holder, lock_uid } => {
            let finished_at = if current.phase == Some(phase) { current.finished_at.clone() } else { None };
            LockRequestStatus {
                phase: Some(phase),
                token: holder.map(|h| h.token).or(current.token),
                granted_at: holder.map(|h| h.granted_at.clone()).or(current.granted_at),
                lease_duration: holder.map(|h| h.lease_duration.clone()).or(current.lease_duration),
                lock_uid: lock_uid.map(str::to_string).or(current.lock_uid),
                position: None,
                finished_at: finished_at.or(Some(MicroTime(now.wall))),
                message: Some(message.clone()),
                conditions: vec![condition(previous, "Granted", false, reason.as_str(), message, None, now.wall)],
            }
        }
    }
}

/// Requests this plan finishes are deleted after their retention: plan again then (the
/// status write itself brings no reconcile).
fn wake_for_retention(plan: &mut Plan, settings: &Settings, now: Now) {
    if plan.requests.iter().any(|u| u.status.phase.is_some_and(Phase::is_final)) {
        plan.wake(now.mono + settings.finished_retention);
    }
}

/// Finished requests only wait for their retention to pass.
fn retain_finished(req: &LockRequest, settings: &Settings, now: Now, plan: &mut Plan) {
    let finished = req.status.as_ref().and_then(|s| s.finished_at.as_ref()).map_or(now.wall, |t| t.0);
    let delete_at = finished.saturating_add(signed(settings.finished_retention)).unwrap_or(Timestamp::MAX);
    if delete_at <= now.wall {
        plan.deletions.push(Deletion { name: req.name_any(), uid: uid_of(req).into() });
    } else {
        plan.wake(now.mono + since(now.wall, delete_at));
    }
}

/// The current holders, after releases and expiries.
struct HolderPass {
    kept: Vec<Holder>,
    /// UIDs of requests that are (or just stopped being) holders: not queued again.
    handled: HashSet<String>,
    /// A grant ended in a way that starts the lock delay.
    delay_starts: bool,
}

fn plan_holders(
    inputs: &Inputs<'_>,
    old: &LockStatus,
    lock_uid: &str,
    plan: &mut Plan,
    obs: &mut Observations,
) -> HolderPass {
    let now = inputs.now;
    let by_uid: std::collections::HashMap<&str, &LockRequest> =
        inputs.requests.iter().map(|r| (uid_of(r), r.as_ref())).collect();
    let mut pass = HolderPass { kept: Vec::new(), handled: HashSet::new(), delay_starts: false };
    for h in &old.holders {
        if !pass.handled.insert(h.request_uid.clone()) {
            continue; // a duplicate entry (hand-edited status): keep the first
        }
        let held = Some(since(h.granted_at.0, now.wall));
        let Some(req) = by_uid.get(h.request_uid.as_str()).copied() else {
            if inputs.gone.contains(&h.request_uid) {
                plan.holder_event(EventKind::Released, Reason::Released, h, held, released(h));
            } else {
                // Not in the cache, but no deletion seen: the cache may lag. Keep the grant.
                plan.checks.insert(Check::Request { name: h.request.clone(), uid: h.request_uid.clone() });
                pass.kept.push(h.clone());
            }
            continue;
        };
        if req.metadata.deletion_timestamp.is_some() {
            plan.holder_event(EventKind::Released, Reason::Released, h, held, released(h));
            continue;
        }
        if req.phase().is_final() {
            // Its end is already written on the request (a fence whose Lock write did not
            // follow: a conflict, or a controller that stopped in between): finish it here.
            let status = req.status.clone().unwrap_or_default();
            let cause = status.conditions.iter().find(|c| c.type_ == "Granted").map(|c| c.reason.clone());
            let reason = match cause.as_deref() {
                Some("LeaseExpired") => Reason::LeaseExpired,
                Some("PodGone") => Reason::PodGone,
                Some("Broken") => Reason::Broken,
                Some("LockDeleted") => Reason::LockDeleted,
                _ => Reason::Lost,
            };
            pass.delay_starts |= reason.starts_lock_delay();
            let kind = if reason == Reason::Broken { EventKind::Broken } else { EventKind::Expired };
            let note = format!("{} lost token {}: {}", h.holder, h.token, status.message.unwrap_or_default());
            plan.holder_event(kind, reason, h, held, note);
            continue;
        }
        let lease = duration::parse(&h.lease_duration).ok().filter(|d| !d.is_zero()).unwrap_or(FALLBACK_LEASE);
        let (generation, renew_time) = renewal_key(req);
        let seen = match inputs.observations.renewals.get(&h.request_uid) {
            Some(r) if r.generation == generation && r.renew_time == renew_time => r.at,
            _ => now.mono,
        };
        let ended = if let Some(message) = break_message(req) {
            Some((EventKind::Broken, Reason::Broken, message))
        } else {
            match pod_state(req, inputs) {
                PodState::Gone(why) => Some((EventKind::Expired, Reason::PodGone, why)),
                PodState::Unknown(pod) => {
                    plan.checks.insert(Check::Pod(pod));
                    None
                }
                PodState::Fine if now.mono.saturating_sub(seen) >= lease => {
                    if inputs.fresh.contains(&h.request_uid) {
                        let message = format!("no renewal observed for {}", duration::format(lease));
                        Some((EventKind::Expired, Reason::LeaseExpired, message))
                    } else {
                        // Confirm with a quorum read that no renewal is stuck in a lagging watch.
                        plan.checks.insert(Check::Request { name: h.request.clone(), uid: h.request_uid.clone() });
                        None
                    }
                }
                PodState::Fine => None,
            }
        };
        match ended {
            None => {
                obs.renewals.insert(h.request_uid.clone(), Renewal { generation, renew_time, at: seen });
                plan.wake(seen + lease);
                pass.kept.push(h.clone());
            }
            Some((kind, reason, message)) => {
                obs.ended.insert(h.request_uid.clone());
                pass.delay_starts |= reason.starts_lock_delay();
                let note = format!("{} lost token {}: {message}", h.holder, h.token);
                let fate = Fate::Finished {
                    phase: Phase::Expired,
                    reason,
                    message,
                    holder: Some(h),
                    lock_uid: Some(lock_uid),
                };
                plan.fence(req, desired_status(req, fate, now));
                plan.holder_event(kind, reason, h, held, note);
            }
        }
    }
    pass
}

/// The lock delay after an expiry: returns whether it holds back grants now, and the
/// `delayedUntil` value to publish.
fn plan_delay(
    inputs: &Inputs<'_>,
    old: &LockStatus,
    lock_delay: Duration,
    starts: bool,
    plan: &mut Plan,
    obs: &mut Observations,
) -> Option<MicroTime> {
    let now = inputs.now;
    if starts && !lock_delay.is_zero() {
        let until = now.wall.saturating_add(signed(lock_delay)).unwrap_or(Timestamp::MAX);
        obs.delay = Some(DelayObservation { until, at: now.mono });
        plan.wake(now.mono + lock_delay);
        return Some(MicroTime(until));
    }
    let until = old.delayed_until.as_ref()?.0;
    // The countdown runs on this controller's clock from when it first saw the delay.
    let start = match &inputs.observations.delay {
        Some(d) if d.until == until => d.at,
        _ => now.mono,
    };
    if now.mono.saturating_sub(start) >= lock_delay {
        return None;
    }
    obs.delay = Some(DelayObservation { until, at: start });
    plan.wake(start + lock_delay);
    Some(MicroTime(until))
}

/// Plans one existing Lock with the requests that name it.
pub fn plan(inputs: Inputs<'_>) -> Plan {
    let Inputs { lock, requests, now, .. } = inputs;
    if crate::api::grants_unreadable(lock) {
        // Holders or the fencing token cannot be read: writing a status would lose them.
        // Touch nothing (no grant either) and say why.
        return Plan {
            invalid_spec: crate::api::malformed(lock).map(str::to_string),
            observations: inputs.observations.clone(),
            ..Plan::default()
        };
    }
    let mut plan = Plan::default();
    let mut obs = Observations::default();
    let lock_uid = lock.metadata.uid.clone().unwrap_or_default();
    let lock_name = lock.name_any();
    let old = lock.status.clone().unwrap_or_default();
    let params = parse_lock_spec(lock);
    plan.invalid_spec = params.as_ref().err().cloned();

    // Tokens continue from the highest ever seen for this Lock UID, even if the status was
    // reset by hand while a request still remembers a higher token.
    let mut token = old.fencing_token.max(old.holders.iter().map(|h| h.token).max().unwrap_or(0));
    for s in requests.iter().filter_map(|r| r.status.as_ref()) {
        if s.lock_uid.as_deref() == Some(lock_uid.as_str()) {
            token = token.max(s.token.unwrap_or(0));
        }
    }

    // 1 and 2: holders.
    let pass = plan_holders(&inputs, &old, &lock_uid, &mut plan, &mut obs);
    let lock_delay = params.as_ref().map_or(Duration::ZERO, |p| p.lock_delay);
    let delayed_until = plan_delay(&inputs, &old, lock_delay, pass.delay_starts, &mut plan, &mut obs);

    // 3: the queue.
    let mut queue: Vec<&LockRequest> = Vec::new();
    for r in requests.iter().map(Arc::as_ref) {
        let uid = uid_of(r);
        if uid.is_empty() || pass.handled.contains(uid) || r.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if inputs.observations.ended.contains(uid) && r.phase() == Phase::Pending {
            // A grant we ended whose request still reads Pending (its grant was never mirrored,
            // and our cache lags the Expired mirror, or that write failed): not a new waiter.
            obs.ended.insert(uid.into());
            let message = "its grant ended before its status recorded it".to_string();
            let fate =
                Fate::Finished { phase: Phase::Expired, reason: Reason::Lost, message, holder: None, lock_uid: None };
            plan.update(r, desired_status(r, fate, now), false);
            continue;
        }
        match r.phase() {
            Phase::Expired | Phase::Rejected => {
                retain_finished(r, inputs.settings, now, &mut plan);
                continue;
            }
            Phase::Granted => {
                finish_stale_grant(r, &inputs, &lock_uid, &lock_name, &mut plan);
                continue;
            }
            Phase::Pending => {}
        }
        let refused = if let Some(message) = break_message(r) {
            Some((EventKind::Broken, Phase::Expired, Reason::Broken, message))
        } else {
            match (parse_request_spec(r), &params) {
                (Err(message), _) => Some((EventKind::Rejected, Phase::Rejected, Reason::InvalidSpec, message)),
                (Ok(rp), Ok(p)) if rp.permits > p.permits => {
                    let message = format!(
                        "spec.permits {} is more than the {} permit(s) of lock {lock_name}",
                        rp.permits, p.permits
                    );
                    Some((EventKind::Rejected, Phase::Rejected, Reason::TooManyPermits, message))
                }
                _ => match pod_state(r, &inputs) {
                    PodState::Gone(why) => Some((EventKind::Expired, Phase::Expired, Reason::PodGone, why)),
                    _ => None,
                },
            }
        };
        if let Some((kind, phase, reason, message)) = refused {
            plan.event(kind, reason, &r.name_any(), uid, &holder_identity(r), None, message.clone());
            let fate = Fate::Finished { phase, reason, message, holder: None, lock_uid: None };
            plan.update(r, desired_status(r, fate, now), false);
            continue;
        }
        obs.first_seen.insert(uid.into(), inputs.observations.first_seen.get(uid).copied().unwrap_or(now.mono));
        queue.push(r);
    }
    queue.sort_by(|a, b| fifo(a, b, inputs.arrival));

    // Grants, strictly in queue order.
    let mut holders = pass.kept;
    let mut held: i64 = holders.iter().map(|h| i64::from(h.permits)).sum();
    let mut waiting: Vec<(&LockRequest, Reason, String)> = Vec::new();
    let mut blocked = false;
    for r in queue {
        let uid = uid_of(r).to_string();
        let Ok(rp) = parse_request_spec(r) else { continue };
        let wants = format!("waiting for {} permit(s)", rp.permits);
        let p = match &params {
            Ok(p) => p,
            Err(why) => {
                waiting.push((r, Reason::InvalidLock, format!("{wants}: lock {lock_name} has an invalid spec: {why}")));
                continue;
            }
        };
        if delayed_until.is_some() {
            waiting.push((r, Reason::LockDelay, format!("{wants}: lock delay after an expiry")));
            continue;
        }
        if let PodState::Unknown(pod) = pod_state(r, &inputs) {
            // Not in the cache yet: ask, and let those behind go first meanwhile.
            plan.checks.insert(Check::Pod(pod.clone()));
            waiting.push((r, Reason::PodNotFound, format!("{wants}: pod {pod} not seen yet")));
            continue;
        }
        if blocked || held + rp.permits > p.permits {
            blocked = true;
            waiting.push((r, Reason::Waiting, wants));
            continue;
        }
        let Some(next) = token.checked_add(1) else {
            // The last token was i64::MAX (a hand-edited status): granting would wrap around
            // and reissue tokens. Nothing is granted any more.
            blocked = true;
            waiting.push((r, Reason::Waiting, format!("{wants}: the lock's fencing tokens are exhausted")));
            continue;
        };
        token = next;
        held += rp.permits;
        let lease = rp.lease.map_or(p.lease, |l| l.min(p.lease));
        let holder = Holder {
            request: r.name_any(),
            request_uid: uid.clone(),
            holder: holder_identity(r),
            permits: r.spec.permits,
            token,
            granted_at: MicroTime(now.wall),
            lease_duration: duration::format(lease),
        };
        // The grant counts as an observed renewal.
        let (generation, renew_time) = renewal_key(r);
        obs.renewals.insert(uid.clone(), Renewal { generation, renew_time, at: now.mono });
        plan.wake(now.mono + lease);
        let wait = obs.first_seen.remove(&uid).map(|seen| now.mono.saturating_sub(seen));
        let message = format!("granted {} permit(s) to {} with token {token}", holder.permits, holder.holder);
        let e = plan.event(
            EventKind::Granted,
            Reason::Granted,
            &holder.request,
            &uid,
            &holder.holder,
            Some(token),
            message,
        );
        e.wait = wait;
        e.of_lock = true;
        holders.push(holder);
    }

    // Request statuses: holders (new grants first), then the queue.
    let by_uid: std::collections::HashMap<&str, &LockRequest> =
        requests.iter().map(|r| (uid_of(r), r.as_ref())).collect();
    for h in &holders {
        if let Some(req) = by_uid.get(h.request_uid.as_str()) {
            let newly = old.holders.iter().all(|o| o.request_uid != h.request_uid);
            plan.update(req, desired_status(req, Fate::Holding { holder: h, lock_uid: &lock_uid }, now), newly);
        }
    }
    for (position, (r, reason, message)) in waiting.iter().enumerate() {
        let fate = Fate::Waiting { position, reason: *reason, message: message.clone() };
        plan.update(r, desired_status(r, fate, now), false);
    }
    plan.requests.sort_by_key(|u| !u.granted);
    wake_for_retention(&mut plan, inputs.settings, now);

    let status = LockStatus {
        conditions: lock_conditions(
            &old,
            params.as_ref().map(|p| p.permits),
            &holders,
            delayed_until.is_some(),
            lock.metadata.generation,
            now,
        ),
        holders,
        fencing_token: token,
        waiting: i32::try_from(waiting.len()).unwrap_or(i32::MAX),
        queue: waiting.iter().take(QUEUE_WINDOW).map(|(r, _, _)| r.name_any()).collect(),
        delayed_until,
        observed_generation: lock.metadata.generation,
    };
    if lock.status.as_ref() != Some(&status) {
        plan.lock_status = Some(status);
    }
    plan.observations = obs;
    plan
}

/// A request that says Granted but is not a holder: its grant ended while its status was
/// not mirrored (a controller stopped in between), or it was granted by an earlier Lock of
/// the same name. Finalized only when that is certain, never on a lagging view.
fn finish_stale_grant(r: &LockRequest, inputs: &Inputs<'_>, lock_uid: &str, lock_name: &str, plan: &mut Plan) {
    let status = r.status.clone().unwrap_or_default();
    let fencing = inputs.lock.status.as_ref().map_or(0, |s| s.fencing_token);
    let (reason, message) = if status.lock_uid.as_deref() == Some(lock_uid) {
        // Tokens order grants: a Lock status whose fencing token has reached this grant's
        // token already contains the grant, so its absence means the grant ended.
        if fencing < status.token.unwrap_or(i64::MAX) {
            return; // our view of the Lock predates the grant
        }
        (Reason::Lost, "the grant ended while the controller was restarting".to_string())
    } else {
        if !inputs.lock_fresh {
            plan.checks.insert(Check::Lock); // is this Lock really a newer one?
            return;
        }
        (Reason::LockDeleted, format!("lock {lock_name} was deleted and recreated while held"))
    };
    let note = format!("{} lost token {}: {message}", holder_identity(r), status.token.unwrap_or_default());
    plan.event(EventKind::Expired, reason, &r.name_any(), uid_of(r), &holder_identity(r), status.token, note);
    let fate = Fate::Finished { phase: Phase::Expired, reason, message, holder: None, lock_uid: None };
    plan.update(r, desired_status(r, fate, inputs.now), false);
}

fn lock_conditions(
    old: &LockStatus,
    permits: Result<i64, &String>,
    holders: &[Holder],
    delayed: bool,
    generation: Option<i64>,
    now: Now,
) -> Vec<Condition> {
    let previous = old.conditions.as_slice();
    let ready = match permits {
        Ok(_) => condition(previous, "Ready", true, "Reconciled", String::new(), generation, now.wall),
        Err(why) => condition(previous, "Ready", false, "InvalidSpec", why.clone(), generation, now.wall),
    };
    let held: i64 = holders.iter().map(|h| i64::from(h.permits)).sum();
    let held = if !holders.is_empty() {
        let of = permits.map_or(String::new(), |p| format!(" of {p}"));
        condition(previous, "Held", true, "Granted", format!("{held}{of} permit(s) held"), generation, now.wall)
    } else if delayed {
        condition(
            previous,
            "Held",
            false,
            "LockDelay",
            "no grant until the lock delay after an expiry passes".into(),
            generation,
            now.wall,
        )
    } else {
        condition(previous, "Held", false, "Free", "no permit is held".into(), generation, now.wall)
    };
    vec![ready, held]
}

/// Plans the requests of a Lock that does not exist (never created, or deleted).
/// `lock_gone_uids` are the UIDs of Locks of this name known to be deleted.
pub fn plan_orphans(
    lock_name: &str,
    requests: &[Arc<LockRequest>],
    lock_gone_uids: &HashSet<String>,
    settings: &Settings,
    now: Now,
) -> Plan {
    let mut plan = Plan::default();
    for r in requests.iter().map(Arc::as_ref) {
        if r.metadata.deletion_timestamp.is_some() || uid_of(r).is_empty() {
            continue;
        }
        let status = r.status.clone().unwrap_or_default();
        let fate = match r.phase() {
            Phase::Expired | Phase::Rejected => {
                retain_finished(r, settings, now, &mut plan);
                continue;
            }
            Phase::Granted => {
                // Only once the deletion of the granting Lock is certain.
                let granted_by = status.lock_uid.clone().unwrap_or_default();
                if !lock_gone_uids.contains(&granted_by) {
                    plan.checks.insert(Check::Lock);
                    continue;
                }
                let message = format!("lock {lock_name} was deleted while held");
                let note = format!("{} lost token {}: {message}", holder_identity(r), status.token.unwrap_or_default());
                plan.event(
                    EventKind::Expired,
                    Reason::LockDeleted,
                    &r.name_any(),
                    uid_of(r),
                    &holder_identity(r),
                    status.token,
                    note,
                );
                Fate::Finished {
                    phase: Phase::Expired,
                    reason: Reason::LockDeleted,
                    message,
                    holder: None,
                    lock_uid: None,
                }
            }
            Phase::Pending => match (break_message(r), parse_request_spec(r)) {
                (Some(message), _) => {
                    plan.event(
                        EventKind::Broken,
                        Reason::Broken,
                        &r.name_any(),
                        uid_of(r),
                        &holder_identity(r),
                        None,
                        message.clone(),
                    );
                    Fate::Finished {
                        phase: Phase::Expired,
                        reason: Reason::Broken,
                        message,
                        holder: None,
                        lock_uid: None,
                    }
                }
                (None, Err(message)) => {
                    plan.event(
                        EventKind::Rejected,
                        Reason::InvalidSpec,
                        &r.name_any(),
                        uid_of(r),
                        &holder_identity(r),
                        None,
                        message.clone(),
                    );
                    Fate::Finished {
                        phase: Phase::Rejected,
                        reason: Reason::InvalidSpec,
                        message,
                        holder: None,
                        lock_uid: None,
                    }
                }
                (None, Ok(_)) => Fate::Waiting {
                    position: 0,
                    reason: Reason::LockNotFound,
                    message: format!("waiting: lock {lock_name} does not exist"),
                },
            },
        };
        let mut desired = desired_status(r, fate, now);
        if desired.phase == Some(Phase::Pending) {
            desired.position = None;
        }
        plan.update(r, desired, false);
    }
    wake_for_retention(&mut plan, settings, now);
    plan
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
