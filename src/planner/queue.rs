//! The queue pass (who waits, in strict FIFO order; who is refused) and the grants pass
//! (the head that fits is granted the next token; the head that does not blocks the rest).

use std::{collections::HashSet, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt as _;

use super::{
    holders::{HolderPass, finish_stale_grant},
    inputs::{Inputs, Observations, Renewal},
    outcome::{Check, EventKind, Finish, Plan},
    spec::{
        LockParams, PodState, break_message, fifo, holder_identity, parse_request_spec, pod_state, renewal_key, uid_of,
    },
    status::{Fate, desired_status, retain_finished},
};
use crate::api::{Holder, LockRequest, Phase, Reason, duration};

/// Queues the requests that wait for this Lock, in FIFO order; finishes those that never
/// will be granted (broken while waiting, invalid, too big, pod gone) and those already final.
pub(super) fn enqueue<'a>(
    inputs: &Inputs<'a>,
    handled: &HashSet<String>,
    params: &Result<LockParams, String>,
    lock_uid: &str,
    plan: &mut Plan,
    obs: &mut Observations,
) -> Vec<&'a LockRequest> {
    let now = inputs.now;
    let lock_name = inputs.lock.name_any();
    let mut queue: Vec<&LockRequest> = Vec::new();
    for r in inputs.requests.iter().map(Arc::as_ref) {
        let uid = uid_of(r);
        if uid.is_empty()
            || handled.contains(uid)
            || r.metadata.deletion_timestamp.is_some()
            || r.spec.lock_name != lock_name
        {
            continue; // a holder's (handled above), going, or re-pointed to another Lock
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
        if r.spec.released {
            // Released by its requester, granted or not: nothing acts on it; delete it.
            plan.delete_released(r);
            continue;
        }
        match r.phase() {
            Phase::Expired | Phase::Rejected => {
                retain_finished(r, inputs.settings, now, plan);
                continue;
            }
            Phase::Granted => {
                finish_stale_grant(r, inputs, lock_uid, &lock_name, plan);
                continue;
            }
            Phase::Pending => {}
        }
        if let Some(end) = refusal(r, inputs, params, &lock_name) {
            plan.finish(r, now, end);
            continue;
        }
        obs.first_seen.insert(uid.into(), inputs.observations.first_seen.get(uid).copied().unwrap_or(now.mono));
        queue.push(r);
    }
    queue.sort_by(|a, b| fifo(a, b, inputs.arrival));
    queue
}

/// Why a waiting request is finished instead of queued, if it is.
fn refusal(r: &LockRequest, inputs: &Inputs<'_>, params: &Result<LockParams, String>, lock: &str) -> Option<Finish> {
    if let Some(message) = break_message(r) {
        return Some(Finish { kind: EventKind::Broken, phase: Phase::Expired, reason: Reason::Broken, message });
    }
    let rejected = |reason, message| Finish { kind: EventKind::Rejected, phase: Phase::Rejected, reason, message };
    match (parse_request_spec(r), params) {
        (Err(message), _) => Some(rejected(Reason::InvalidSpec, message)),
        (Ok(rp), Ok(p)) if rp.permits > p.permits => Some(rejected(
            Reason::TooManyPermits,
            format!("spec.permits {} is more than the {} permit(s) of lock {lock}", rp.permits, p.permits),
        )),
        _ => match pod_state(r.spec.pod_ref.as_ref(), inputs) {
            PodState::Gone { why, .. } => {
                Some(Finish { kind: EventKind::Expired, phase: Phase::Expired, reason: Reason::PodGone, message: why })
            }
            _ => None,
        },
    }
}

/// What the grants pass leaves: the holders (kept and new), the waiting requests with why
/// they wait, and the last token issued.
pub(super) struct Granted<'a> {
    pub holders: Vec<Holder>,
    pub waiting: Vec<(&'a LockRequest, Reason, String)>,
    pub token: i64,
}

/// The next fencing token after `last`: larger, and at least the wall clock in milliseconds
/// since the epoch, so that tokens keep increasing for a Lock's name when its status starts
/// again lower (the Lock recreated, or etcd restored from a backup). `None` once exhausted.
pub(super) fn next_token(last: i64, wall: jiff::Timestamp) -> Option<i64> {
    Some(last.checked_add(1)?.max(wall.as_millisecond()))
}

/// Grants strictly in queue order, from the permits the holders pass left free.
#[allow(clippy::too_many_arguments)]
pub(super) fn grant<'a>(
    inputs: &Inputs<'_>,
    queue: Vec<&'a LockRequest>,
    pass: &HolderPass,
    params: &Result<LockParams, String>,
    delayed: bool,
    mut token: i64,
    plan: &mut Plan,
    obs: &mut Observations,
) -> Granted<'a> {
    let now = inputs.now;
    let lock_name = inputs.lock.name_any();
    let mut holders = pass.kept.clone();
    // Permits of draining grants stay taken.
    let mut held: i64 = holders.iter().map(|h| i64::from(h.permits)).sum::<i64>()
        + pass.draining.iter().map(|d| i64::from(d.permits)).sum::<i64>();
    let mut waiting: Vec<(&LockRequest, Reason, String)> = Vec::new();
    let mut blocked = false;
    for r in queue {
        let uid = uid_of(r).to_string();
        let Ok(rp) = parse_request_spec(r) else { continue };
        let wants = format!("waiting for {} permit(s)", rp.permits);
        let p = match params {
            Ok(p) => p,
            Err(why) => {
                waiting.push((r, Reason::InvalidLock, format!("{wants}: lock {lock_name} has an invalid spec: {why}")));
                continue;
            }
        };
        if inputs.lock.metadata.deletion_timestamp.is_some() {
            // Kept by its finalizer until its grants drained; a new Lock of the name grants.
            waiting.push((r, Reason::LockDeleted, format!("{wants}: lock {lock_name} is being deleted")));
            continue;
        }
        if delayed {
            waiting.push((r, Reason::LockDelay, format!("{wants}: lock delay after an expiry")));
            continue;
        }
        if let (Some(why), Some(_)) = (inputs.pods_unreadable, &r.spec.pod_ref) {
            // Its pod could not be watched: let those behind go first meanwhile.
            waiting.push((r, Reason::PodsUnreadable, format!("{wants}: bound to a pod, and {why}")));
            continue;
        }
        if let PodState::Unknown(pod) = pod_state(r.spec.pod_ref.as_ref(), inputs) {
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
        let Some(next) = next_token(token, now.wall) else {
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
            pod_ref: r.spec.pod_ref.clone(),
        };
        // The grant counts as an observed renewal.
        let (generation, renew_time) = renewal_key(r);
        obs.renewals.insert(uid.clone(), Renewal { generation, renew_time, at: now.mono });
        plan.wake(now.mono + lease);
        let wait = obs.first_seen.remove(&uid).map(|seen| now.mono.saturating_sub(seen));
        let message = format!("granted {} permit(s) to {} with token {token}", holder.permits, holder.holder);
        plan.holder_event(EventKind::Granted, Reason::Granted, &holder, None, message).wait = wait;
        holders.push(holder);
    }
    Granted { holders, waiting, token }
}
