//! The holders pass: how each grant ends, and when the permits of an ended grant are free.
//!
//! One rule for every end: permits are freed only when the ended holder can no longer act.
//! - Its own release (`spec.released`) frees them at once, with no lock delay.
//! - A lease that passed with no renewal observed frees them (the holder's own deadline has
//!   passed too), and so does a bound pod that the kubelet reported stopped.
//! - Every other end (a delete by someone else, a break, a pod that vanished unconfirmed, a
//!   changed spec, a Lock recreated) moves the grant to `status.draining`: its permits stay
//!   taken until the controller has observed no renewal for its lease since the last renewal
//!   it saw before the end, its pod is reported stopped, or its holder marks it released.
//!
//! The lock delay follows every end the holder did not report itself, from the moment the
//! permits are free. And requests whose grant ended while their status did not say so.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt as _;

use super::{
    FALLBACK_LEASE,
    inputs::{DelayObservation, Inputs, Observations, Renewal},
    outcome::{Check, EventKind, Finish, Plan},
    spec::{PodState, break_message, holder_identity, pod_state, renewal_key, uid_of},
    status::{Fate, desired_status, released, signed, since, truncate_to_micros},
};
use crate::api::{ConditionType, Draining, Holder, LockRequest, LockStatus, Phase, PodRef, Reason, duration};

/// The holders after this pass, the grants still draining, and what the queue must skip.
pub(super) struct HolderPass {
    /// Grants that go on.
    pub kept: Vec<Holder>,
    /// Ended grants whose holder may still act: their permits stay taken.
    pub draining: Vec<Draining>,
    /// UIDs of requests that are (or just stopped being) holders or draining: not queued.
    pub handled: HashSet<String>,
    /// Permits were freed by an end the holder did not report itself: the lock delay starts.
    pub delay_starts: bool,
}

/// How one grant ends in this plan.
enum End {
    /// It goes on.
    Keep,
    /// Its holder released it (`spec.released`): free at once, no lock delay.
    Release,
    /// Its holder can no longer act (lease passed, pod reported stopped): free now, then the
    /// lock delay.
    Free { kind: EventKind, reason: Reason, message: String },
    /// Its holder may still act: the permits drain. `restart`: nothing of the holder's last
    /// renewal is known for sure (its request vanished), so the lease counts from now.
    Drain { kind: EventKind, reason: Reason, message: String, restart: bool },
}

/// The lease recorded with a grant.
fn lease_of(recorded: &str) -> Duration {
    duration::parse(recorded).ok().filter(|d| !d.is_zero()).unwrap_or(FALLBACK_LEASE)
}

/// When the controller last observed this request renew (the grant counts as one), and
/// the renewal key it saw; a changed key counts as a renewal observed now.
fn observed(inputs: &Inputs<'_>, uid: &str, req: Option<&LockRequest>) -> Renewal {
    let (generation, renew_time) = req.map(renewal_key).unwrap_or_default();
    let at = match inputs.observations.renewals.get(uid) {
        Some(r) if req.is_none() || (r.generation == generation && r.renew_time == renew_time) => r.at,
        _ => inputs.now.mono,
    };
    Renewal { generation, renew_time, at }
}

/// What the spec of a granted request no longer matches in its grant, if anything.
fn changed_spec(h: &Holder, req: &LockRequest, lock_name: &str) -> Option<String> {
    if req.spec.lock_name != lock_name {
        return Some(format!("spec.lockName was changed to {} while it held {lock_name}", req.spec.lock_name));
    }
    if req.spec.permits != h.permits {
        return Some(format!("spec.permits was changed from {} to {} while held", h.permits, req.spec.permits));
    }
    // Grants recorded before holder entries carried the pod are bound to the request's pod.
    if h.pod_ref.is_some() && req.spec.pod_ref != h.pod_ref {
        return Some("spec.podRef was changed while held".to_string());
    }
    None
}

/// The pod whose end ends a grant: the one recorded with it, else the request's (whose stop
/// confirms nothing about the holder, see `end_of`).
fn bound_pod<'a>(recorded: Option<&'a PodRef>, req: Option<&'a LockRequest>) -> Option<&'a PodRef> {
    recorded.or_else(|| req.and_then(|r| r.spec.pod_ref.as_ref()))
}

fn end_of(h: &Holder, req: Option<&LockRequest>, inputs: &Inputs<'_>, seen: &Renewal, plan: &mut Plan) -> End {
    let now = inputs.now;
    let Some(req) = req else {
        if inputs.released.contains(&h.request_uid) {
            return End::Release;
        }
        if inputs.gone.contains(&h.request_uid) {
            let message = "its request was deleted by someone else than its holder".to_string();
            return End::Drain { kind: EventKind::Expired, reason: Reason::Deleted, message, restart: true };
        }
        // Not in the cache, but no deletion seen: the cache may lag. Keep the grant.
        plan.checks.insert(Check::Request { name: h.request.clone(), uid: h.request_uid.clone() });
        return End::Keep;
    };
    if req.spec.released {
        return End::Release;
    }
    if req.metadata.deletion_timestamp.is_some() {
        let message = "its request is being deleted by someone else than its holder".to_string();
        return End::Drain { kind: EventKind::Expired, reason: Reason::Deleted, message, restart: false };
    }
    if req.phase().is_final() {
        // Its end is already written on the request (a fence whose Lock write did not
        // follow: a conflict, or a controller that stopped in between): finish it here.
        let cause = end_reason(req);
        let message = req.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
        return match cause {
            Some(Reason::LeaseExpired) => End::Free { kind: EventKind::Expired, reason: Reason::LeaseExpired, message },
            Some(reason @ Reason::Broken) => End::Drain { kind: EventKind::Broken, reason, message, restart: false },
            Some(
                reason @ (Reason::PodGone
                | Reason::LockDeleted
                | Reason::SpecChanged
                | Reason::Deleted
                | Reason::RemovedFromStatus),
            ) => End::Drain { kind: EventKind::Expired, reason, message, restart: false },
            _ => End::Drain { kind: EventKind::Expired, reason: Reason::Lost, message, restart: false },
        };
    }
    if let Some(message) = changed_spec(h, req, &inputs.lock.name_any()) {
        return End::Drain { kind: EventKind::Expired, reason: Reason::SpecChanged, message, restart: false };
    }
    if let Some(message) = break_message(req) {
        return End::Drain { kind: EventKind::Broken, reason: Reason::Broken, message, restart: false };
    }
    match pod_state(bound_pod(h.pod_ref.as_ref(), Some(req)), inputs) {
        // Only the pod recorded with the grant is the holder's for sure: one named by the
        // request alone (a grant recorded without its pod, or a podRef added since) ends the
        // grant, but its stop confirms nothing.
        PodState::Gone { why, stopped: true } if h.pod_ref.is_some() => {
            return End::Free { kind: EventKind::Expired, reason: Reason::PodGone, message: why };
        }
        PodState::Gone { why, .. } => {
            let message = format!("{why}; it may still be running");
            return End::Drain { kind: EventKind::Expired, reason: Reason::PodGone, message, restart: false };
        }
        PodState::Unknown(pod) => {
            plan.checks.insert(Check::Pod(pod));
            return End::Keep;
        }
        PodState::Fine => {}
    }
    let lease = lease_of(&h.lease_duration);
    if now.mono.saturating_sub(seen.at) < lease {
        return End::Keep;
    }
    if !inputs.fresh.contains(&h.request_uid) {
        // Confirm with a quorum read that no renewal is stuck in a lagging watch.
        plan.checks.insert(Check::Request { name: h.request.clone(), uid: h.request_uid.clone() });
        return End::Keep;
    }
    let message = format!("no renewal observed for {}", duration::format(lease));
    End::Free { kind: EventKind::Expired, reason: Reason::LeaseExpired, message }
}

/// Writes a grant's end on its request before the Lock says so (see
/// `outcome::RequestUpdate::fence`), unless the request is gone, going or already final.
fn fence_end(
    req: Option<&LockRequest>,
    h: &Holder,
    reason: Reason,
    message: &str,
    lock_uid: &str,
    inputs: &Inputs<'_>,
    plan: &mut Plan,
) {
    let Some(req) = req.filter(|r| r.metadata.deletion_timestamp.is_none() && !r.phase().is_final()) else {
        return;
    };
    let fate = Fate::Finished {
        phase: Phase::Expired,
        reason,
        message: message.to_string(),
        holder: Some(h),
        lock_uid: Some(lock_uid),
    };
    plan.fence(req, desired_status(req, fate, inputs.now));
}

fn draining_entry(h: &Holder, pod_ref: Option<&PodRef>, reason: Reason, now: Timestamp) -> Draining {
    Draining {
        request: h.request.clone(),
        request_uid: h.request_uid.clone(),
        holder: h.holder.clone(),
        permits: h.permits,
        token: h.token,
        lease_duration: h.lease_duration.clone(),
        pod_ref: pod_ref.cloned(),
        reason: reason.as_str().to_string(),
        ended_at: MicroTime(truncate_to_micros(now)),
    }
}

/// The requests a grant of this Lock may refer to, by UID: those naming it, and those whose
/// grant it holds although they now name another Lock (a re-pointed request).
fn requests_by_uid<'a>(inputs: &Inputs<'a>) -> HashMap<&'a str, &'a LockRequest> {
    inputs.requests.iter().map(|r| (uid_of(r), r.as_ref())).collect()
}

pub(super) fn plan_holders(
    inputs: &Inputs<'_>,
    old: &LockStatus,
    lock_uid: &str,
    plan: &mut Plan,
    obs: &mut Observations,
) -> HolderPass {
    let now = inputs.now;
    let by_uid = requests_by_uid(inputs);
    let mut pass = HolderPass { kept: Vec::new(), draining: Vec::new(), handled: HashSet::new(), delay_starts: false };
    for h in &old.holders {
        if !pass.handled.insert(h.request_uid.clone()) {
            continue; // a duplicate entry (hand-edited status): keep the first
        }
        let req = by_uid.get(h.request_uid.as_str()).copied();
        let seen = observed(inputs, &h.request_uid, req);
        let held = Some(since(h.granted_at.0, now.wall));
        let mut end = end_of(h, req, inputs, &seen, plan);
        if matches!(end, End::Keep) && inputs.lock.metadata.deletion_timestamp.is_some() {
            // The Lock is being deleted (its finalizer keeps it until its grants are free):
            // every grant drains under the one rule, here, where a recreated Lock of this name
            // cannot miss it.
            let message = "its Lock is being deleted".to_string();
            end = End::Drain { kind: EventKind::Expired, reason: Reason::LockDeleted, message, restart: false };
        }
        match end {
            End::Keep => {
                plan.wake(seen.at + lease_of(&h.lease_duration));
                obs.renewals.insert(h.request_uid.clone(), seen);
                pass.kept.push(h.clone());
            }
            End::Release => {
                plan.holder_event(EventKind::Released, Reason::Released, h, held, released(h));
                if let Some(req) = req {
                    plan.delete_released(req);
                }
            }
            End::Free { kind, reason, message } => {
                obs.ended.insert(h.request_uid.clone());
                pass.delay_starts = true;
                fence_end(req, h, reason, &message, lock_uid, inputs, plan);
                let note = format!("{} lost token {}: {message}", h.holder, h.token);
                plan.holder_event(kind, reason, h, held, note);
            }
            End::Drain { kind, reason, message, restart } => {
                obs.ended.insert(h.request_uid.clone());
                fence_end(req, h, reason, &message, lock_uid, inputs, plan);
                let at = if restart { now.mono } else { seen.at };
                obs.renewals.insert(h.request_uid.clone(), Renewal { at, ..seen });
                plan.wake(at + lease_of(&h.lease_duration));
                // Bound to the pod recorded with the grant, not to one its request names now.
                pass.draining.push(draining_entry(h, h.pod_ref.as_ref(), reason, now.wall));
                let note = format!(
                    "{} lost token {}: {message}; its permits drain until it can no longer act",
                    h.holder, h.token
                );
                plan.holder_event(kind, reason, h, held, note);
            }
        }
    }
    for d in &old.draining {
        if !pass.handled.insert(d.request_uid.clone()) {
            continue;
        }
        // Committed to this Lock's status by CAS, so its end is certain: fenced if not yet.
        let fence = Some("its grant ended; it drains until its holder can no longer act");
        match drain(d, by_uid.get(d.request_uid.as_str()).copied(), inputs, plan, obs, &mut pass, fence) {
            Some(d) => pass.draining.push(d),
            None => {
                obs.drained.insert(d.request_uid.clone());
            }
        }
    }
    pass
}

/// One draining grant: kept while its holder may still act; `None` once its permits are free.
/// `fence`: the message with which to write its end on its request while that still reads
/// `Granted` (`None`: not yet, this plan cannot be sure the end is real).
fn drain(
    d: &Draining,
    req: Option<&LockRequest>,
    inputs: &Inputs<'_>,
    plan: &mut Plan,
    obs: &mut Observations,
    pass: &mut HolderPass,
    fence: Option<&str>,
) -> Option<Draining> {
    let now = inputs.now;
    if let Some(req) = req.filter(|r| r.spec.released) {
        plan.delete_released(req);
        return None; // its holder says it stopped acting
    }
    if inputs.released.contains(&d.request_uid) {
        return None;
    }
    let stopped = match pod_state(bound_pod(d.pod_ref.as_ref(), None), inputs) {
        PodState::Gone { stopped, .. } => stopped,
        PodState::Unknown(pod) => {
            plan.checks.insert(Check::Pod(pod));
            false
        }
        PodState::Fine => false,
    };
    // The countdown from the last renewal seen before the end is on the request: once it reads
    // `Expired` (a fence), renewals are answered so and do not count. While it still reads
    // `Granted`, a renewal may be answered `Granted`: it counts, and the end is written now.
    // After a restart it starts again.
    let live = req.filter(|r| r.phase() == Phase::Granted && r.metadata.deletion_timestamp.is_none());
    let at = match live {
        Some(r) => {
            if let Some(message) = fence {
                let reason = d.reason.parse().unwrap_or(Reason::Lost);
                let message = message.to_string();
                let fate = Fate::Finished { phase: Phase::Expired, reason, message, holder: None, lock_uid: None };
                plan.fence(r, desired_status(r, fate, now));
            }
            observed(inputs, &d.request_uid, Some(r)).at
        }
        None => inputs.observations.renewals.get(&d.request_uid).map_or(now.mono, |r| r.at),
    };
    let lease = lease_of(&d.lease_duration);
    if stopped || now.mono.saturating_sub(at) >= lease {
        pass.delay_starts = true;
        return None;
    }
    let (generation, renew_time) = req.map(renewal_key).unwrap_or_default();
    obs.renewals.insert(d.request_uid.clone(), Renewal { generation, renew_time, at });
    obs.ended.insert(d.request_uid.clone());
    plan.wake(at + lease);
    Some(d.clone())
}

/// Grants that the Lock's status does not list, although their holders may still act on
/// what this Lock's name guards: grants of an earlier Lock of this name (deleted and
/// recreated), unless that Lock still exists under another name (the request was re-pointed)
/// or they drained already; and grants of this Lock that another writer than the controller
/// took out of its status (an edit of the status subresource), unless this controller ended
/// them itself (its cache lags its own end). They drain here from their last renewal seen.
///
/// The end is written on the request as a fence, before the Lock: a renewal that lands
/// first refuses it (plan again, counting from that renewal), and a renewal that lands after
/// it is answered `Expired`. Written after the Lock, a renewal in between would be answered
/// `Granted` and give its holder a deadline later than the drain's end.
pub(super) fn drain_unlisted_grants(
    inputs: &Inputs<'_>,
    lock_uid: &str,
    plan: &mut Plan,
    obs: &mut Observations,
    pass: &mut HolderPass,
) {
    let now = inputs.now;
    let name = inputs.lock.name_any();
    let fencing = inputs.lock.status.as_ref().map_or(0, |s| s.fencing_token);
    for r in inputs.requests.iter().map(AsRef::as_ref) {
        let uid = uid_of(r);
        if inputs.observations.drained.contains(uid) {
            obs.drained.insert(uid.to_string()); // remembered while the request lingers
        }
        // Only requests that remember a grant go further (no copy of every waiter's status).
        let Some(status) = r.status.as_ref() else { continue };
        let (Some(token), Some(granted_by)) = (status.token, status.lock_uid.as_deref()) else { continue };
        if uid.is_empty()
            || r.spec.lock_name != name
            || r.spec.released
            || pass.handled.contains(uid)
            || obs.drained.contains(uid)
        {
            continue;
        }
        let (reason, message, certain) = if granted_by == lock_uid {
            if inputs.observations.ended.contains(uid) {
                obs.ended.insert(uid.to_string()); // kept while the cache lags our own end
                continue;
            }
            // Still `Granted`, or already fenced by an earlier plan whose Lock write did not
            // follow (a conflict, a controller that stopped in between).
            let fenced = r.phase() == Phase::Expired && end_reason(r) == Some(Reason::RemovedFromStatus);
            if r.phase() != Phase::Granted && !fenced {
                continue;
            }
            // Our view of the Lock predates the grant (a lagging cache: ask), or its status
            // was reset (a fresh view says so): it drains meanwhile either way.
            let predates = fencing < token;
            if predates && !inputs.lock_fresh {
                plan.checks.insert(Check::Lock);
            }
            let message = "its grant was taken out of the Lock's status by another writer than the controller";
            (Reason::RemovedFromStatus, message.to_string(), !predates || inputs.lock_fresh)
        } else {
            if inputs.other_locks.contains(granted_by) || !matches!(r.phase(), Phase::Granted | Phase::Expired) {
                continue;
            }
            if r.phase() == Phase::Granted && !inputs.lock_fresh {
                plan.checks.insert(Check::Lock); // is this Lock really a newer one? (it drains meanwhile)
            }
            (
                Reason::LockDeleted,
                format!("its grant was made by another Lock than the current {name}"),
                inputs.lock_fresh,
            )
        };
        let holder = Holder {
            request: r.name_any(),
            request_uid: uid.to_string(),
            holder: holder_identity(r),
            permits: r.spec.permits,
            token,
            granted_at: status.granted_at.clone().unwrap_or(MicroTime(now.wall)),
            lease_duration: status.lease_duration.clone().unwrap_or_else(|| duration::format(FALLBACK_LEASE)),
            pod_ref: r.spec.pod_ref.clone(),
        };
        if r.phase() == Phase::Granted && certain {
            let note = format!(
                "{} lost token {token}: {message}; its permits drain until it can no longer act",
                holder.holder
            );
            let held = Some(since(holder.granted_at.0, now.wall));
            plan.holder_event(EventKind::Expired, reason, &holder, held, note);
        }
        let entry = draining_entry(&holder, r.spec.pod_ref.as_ref(), reason, now.wall);
        pass.handled.insert(uid.to_string());
        match drain(&entry, Some(r), inputs, plan, obs, pass, certain.then_some(message.as_str())) {
            Some(d) => pass.draining.push(d),
            None => {
                obs.drained.insert(uid.to_string());
            }
        }
    }
}

/// Why a finished request's grant ended, as its `Granted` condition says.
fn end_reason(r: &LockRequest) -> Option<Reason> {
    let status = r.status.as_ref()?;
    ConditionType::Granted.find(&status.conditions)?.reason.parse().ok()
}

/// The lock delay after an expiry: returns whether it holds back grants now, and the
/// `delayedUntil` value to publish.
pub(super) fn plan_delay(
    inputs: &Inputs<'_>,
    old: &LockStatus,
    lock_delay: Duration,
    starts: bool,
    plan: &mut Plan,
    obs: &mut Observations,
) -> Option<MicroTime> {
    let now = inputs.now;
    if starts && !lock_delay.is_zero() {
        // As the API stores it (microseconds): the next plan must recognize its own delay.
        let until = truncate_to_micros(now.wall.saturating_add(signed(lock_delay)).unwrap_or(Timestamp::MAX));
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

/// A request that says Granted but is not a holder: its grant ended while its status was
/// not mirrored (a controller stopped in between), or it was granted by an earlier Lock of
/// the same name. Finalized only when that is certain, never on a lagging view.
pub(super) fn finish_stale_grant(
    r: &LockRequest,
    inputs: &Inputs<'_>,
    lock_uid: &str,
    lock_name: &str,
    plan: &mut Plan,
) {
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
        (Reason::LockDeleted, format!("its grant was made by another Lock than the current {lock_name}"))
    };
    let note = format!("{} lost token {}: {message}", holder_identity(r), status.token.unwrap_or_default());
    let e = plan.finish(r, inputs.now, Finish { kind: EventKind::Expired, phase: Phase::Expired, reason, message });
    e.message = note;
    e.token = status.token;
}
