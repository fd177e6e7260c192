//! Building statuses: a request's from its fate, the Lock's conditions, and the retention
//! of finished requests.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::ResourceExt as _;

use super::{
    inputs::{Now, Settings},
    outcome::{Deletion, Plan},
    spec::uid_of,
};
use crate::api::{
    ConditionType, Draining, Holder, LockReason, LockRequest, LockRequestStatus, LockStatus, Phase, Reason,
    status_string,
};

/// The message of a clean release.
pub(super) fn released(h: &Holder) -> String {
    format!("{} released {} permit(s), token {}", h.holder, h.permits, h.token)
}

/// `t` to the microsecond, as the API stores a MicroTime: a value the plan compares with
/// what it wrote must be the value read back.
pub(super) fn truncate_to_micros(t: Timestamp) -> Timestamp {
    Timestamp::from_microsecond(t.as_microsecond()).unwrap_or(t)
}

pub(super) fn since(start: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(start)).unwrap_or(Duration::ZERO)
}

pub(super) fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// Builds a condition, keeping `lastTransitionTime` from the previous one unless the status flips.
pub(super) fn condition(
    previous: &[Condition],
    type_: ConditionType,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = status_string(status).to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_.as_str() && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.as_str().into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status a request should have.
pub(super) enum Fate<'a> {
    Holding { holder: &'a Holder, lock_uid: &'a str },
    Waiting { position: i32, reason: Reason, message: String },
    Finished { phase: Phase, reason: Reason, message: String, holder: Option<&'a Holder>, lock_uid: Option<&'a str> },
}

pub(super) fn desired_status(req: &LockRequest, fate: Fate<'_>, now: Now) -> LockRequestStatus {
    let current = req.status.clone().unwrap_or_default();
    let previous = current.conditions.as_slice();
    let not_granted = |reason: Reason, message: String| {
        vec![condition(previous, ConditionType::Granted, false, reason.as_str(), message, None, now.wall)]
    };
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
                ConditionType::Granted,
                true,
                Reason::Granted.as_str(),
                format!("token {}", holder.token),
                None,
                now.wall,
            )],
        },
        Fate::Waiting { position, reason, message } => LockRequestStatus {
            phase: Some(Phase::Pending),
            position: Some(position),
            message: Some(message.clone()),
            conditions: not_granted(reason, message),
            ..Default::default()
        },
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
                conditions: not_granted(reason, message),
            }
        }
    }
}

/// Requests this plan finishes are deleted after their retention: plan again then (the
/// status write itself brings no reconcile).
pub(super) fn wake_for_retention(plan: &mut Plan, settings: &Settings, now: Now) {
    if plan.requests.iter().any(|u| u.status.phase.is_some_and(Phase::is_final)) {
        plan.wake(now.mono + settings.finished_retention);
    }
}

/// Finished requests only wait for their retention to pass.
pub(super) fn retain_finished(req: &LockRequest, settings: &Settings, now: Now, plan: &mut Plan) {
    let finished = req.status.as_ref().and_then(|s| s.finished_at.as_ref()).map_or(now.wall, |t| t.0);
    let delete_at = finished.saturating_add(signed(settings.finished_retention)).unwrap_or(Timestamp::MAX);
    if delete_at <= now.wall {
        plan.deletions.push(Deletion { name: req.name_any(), uid: uid_of(req).into() });
    } else {
        plan.wake(now.mono + since(now.wall, delete_at));
    }
}

pub(super) fn lock_conditions(
    old: &LockStatus,
    permits: Result<i64, &String>,
    holders: &[Holder],
    draining: &[Draining],
    delayed: bool,
    generation: Option<i64>,
    now: Now,
) -> Vec<Condition> {
    let previous = old.conditions.as_slice();
    let ready = match permits {
        Ok(_) => condition(
            previous,
            ConditionType::Ready,
            true,
            LockReason::Reconciled.as_str(),
            String::new(),
            generation,
            now.wall,
        ),
        Err(why) => condition(
            previous,
            ConditionType::Ready,
            false,
            LockReason::InvalidSpec.as_str(),
            why.clone(),
            generation,
            now.wall,
        ),
    };
    let sum = |it: &mut dyn Iterator<Item = i32>| it.map(i64::from).sum::<i64>();
    let held = sum(&mut holders.iter().map(|h| h.permits));
    let draining_permits = sum(&mut draining.iter().map(|d| d.permits));
    let of = permits.map_or(String::new(), |p| format!(" of {p}"));
    let (status, reason, message) = match (holders.is_empty(), draining.is_empty()) {
        (false, true) => (true, LockReason::Granted, format!("{held}{of} permit(s) held")),
        (false, false) => (
            true,
            LockReason::Granted,
            format!("{held}{of} permit(s) held, {draining_permits} more by ended grants whose holders may still act"),
        ),
        (true, false) => (
            true,
            LockReason::Draining,
            format!("{draining_permits}{of} permit(s) held by ended grants whose holders may still act"),
        ),
        (true, true) if delayed => {
            (false, LockReason::LockDelay, "no grant until the lock delay after an expiry passes".to_string())
        }
        (true, true) => (false, LockReason::Free, "no permit is held".to_string()),
    };
    let held = condition(previous, ConditionType::Held, status, reason.as_str(), message, generation, now.wall);
    vec![ready, held]
}

/// Position refreshes a plan may make for each grant it makes (see [`request_statuses`]).
pub(super) const REFRESHES_PER_GRANT: usize = 1;

/// The position a waiting request's status shows, given its true place and the place its
/// status shows now (`stored`, if it waits already).
///
/// `status.position` is exact for the head (0: granted next), and for every request whose
/// status is written anyway (a first status, a changed reason). Beyond the head it is the
/// place when last written: the queue only moves forward, so it is never less than the true
/// place. It is refreshed once it is more than twice the true place (plus one), front first,
/// at most [`REFRESHES_PER_GRANT`] per grant made: one write per grant whatever the queue's
/// length, where an exact position for every waiter would cost one write per waiter.
fn shown_position(place: i32, stored: Option<i32>, written_anyway: bool, refreshes: &mut usize) -> i32 {
    match stored {
        Some(p) if place > 0 && p > place && !written_anyway => {
            let stale = i64::from(p) > 2 * i64::from(place) + 1;
            if stale && *refreshes > 0 {
                *refreshes -= 1;
                place
            } else {
                p
            }
        }
        _ => place,
    }
}

/// The statuses of the holders (new grants flagged, so they are written first) and of the
/// waiting requests with their places (see [`shown_position`]).
pub(super) fn request_statuses(
    inputs: &super::Inputs<'_>,
    old: &LockStatus,
    lock_uid: &str,
    holders: &[Holder],
    waiting: &[(&LockRequest, Reason, String)],
    plan: &mut Plan,
) {
    let now = inputs.now;
    let by_uid: std::collections::HashMap<&str, &LockRequest> =
        inputs.requests.iter().map(|r| (uid_of(r), r.as_ref())).collect();
    let mut new_grants = 0;
    for h in holders {
        if let Some(req) = by_uid.get(h.request_uid.as_str()) {
            let newly = old.holders.iter().all(|o| o.request_uid != h.request_uid);
            new_grants += usize::from(newly);
            plan.update(req, desired_status(req, Fate::Holding { holder: h, lock_uid }, now), newly);
        }
    }
    let mut refreshes = new_grants * REFRESHES_PER_GRANT;
    for (place, (r, reason, message)) in waiting.iter().enumerate() {
        let place = i32::try_from(place).unwrap_or(i32::MAX);
        let status =
            |position| desired_status(r, Fate::Waiting { position, reason: *reason, message: message.clone() }, now);
        let current = r.status.as_ref().filter(|s| s.phase == Some(Phase::Pending));
        let stored = current.and_then(|s| s.position);
        // Written anyway if the status with the position it shows differs in anything else.
        let written_anyway = stored.is_none_or(|p| Some(&status(p)) != r.status.as_ref());
        let position = shown_position(place, stored, written_anyway, &mut refreshes);
        plan.update(r, status(position), false);
    }
    plan.requests.sort_by_key(|u| !u.granted);
}
