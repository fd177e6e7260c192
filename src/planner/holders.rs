//! The holders pass: releases, expiries, breaks and pods gone; the lock delay they start;
//! and requests whose grant ended while their status did not say so.

use std::{collections::HashSet, time::Duration};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use super::{
    FALLBACK_LEASE,
    inputs::{DelayObservation, Inputs, Observations, Renewal},
    outcome::{Check, EventKind, Finish, Plan},
    spec::{PodState, break_message, holder_identity, pod_state, renewal_key, uid_of},
    status::{Fate, desired_status, released, signed, since},
};
use crate::api::{ConditionType, Holder, LockRequest, LockStatus, Phase, Reason, duration};

/// The current holders, after releases and expiries.
/// Ending a grant for this reason starts the lock delay (it was not a clean release).
fn starts_lock_delay(reason: Reason) -> bool {
    matches!(reason, Reason::LeaseExpired | Reason::PodGone | Reason::Broken)
}

pub(super) struct HolderPass {
    pub kept: Vec<Holder>,
    /// UIDs of requests that are (or just stopped being) holders: not queued again.
    pub handled: HashSet<String>,
    /// A grant ended in a way that starts the lock delay.
    pub delay_starts: bool,
}

pub(super) fn plan_holders(
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
            let cause = ConditionType::Granted.find(&status.conditions).and_then(|c| c.reason.parse::<Reason>().ok());
            let reason = match cause {
                Some(r @ (Reason::LeaseExpired | Reason::PodGone | Reason::Broken | Reason::LockDeleted)) => r,
                _ => Reason::Lost,
            };
            pass.delay_starts |= starts_lock_delay(reason);
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
                pass.delay_starts |= starts_lock_delay(reason);
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
        (Reason::LockDeleted, format!("lock {lock_name} was deleted and recreated while held"))
    };
    let note = format!("{} lost token {}: {message}", holder_identity(r), status.token.unwrap_or_default());
    let e = plan.finish(r, inputs.now, Finish { kind: EventKind::Expired, phase: Phase::Expired, reason, message });
    e.message = note;
    e.token = status.token;
}
