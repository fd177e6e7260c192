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
//!
//! Where the rules live: [`inputs`] (what a plan reads), `spec` (reading specs),
//! `holders` (rules 1 and 2, the lock delay), `queue` (rules 3 and 4), `status` (the
//! statuses written), [`outcome`] (what a plan decides), `orphans` (requests of a Lock
//! that does not exist).

mod holders;
pub mod inputs;
mod orphans;
pub mod outcome;
mod queue;
mod spec;
mod status;

use kube::ResourceExt as _;

pub use self::{
    inputs::{DelayObservation, Inputs, Now, Observations, PodInfo, Renewal, Settings},
    orphans::plan_orphans,
    outcome::{Check, Deletion, EventKind, Plan, PlanEvent, RequestUpdate},
    spec::fifo,
};
use crate::api::LockStatus;

/// How many queued request names `Lock.status.queue` lists, and how far back
/// `LockRequest.status.position` is kept exact.
pub const QUEUE_WINDOW: usize = 10;

/// The lease used for a holder entry whose recorded lease cannot be read (a hand-edited status).
const FALLBACK_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether some of a Lock's grants could not be read: a holder, a grant still draining (its
/// permits are taken as a holder's are), or the fencing token. Such a status is never
/// rewritten, and a Lock being deleted keeps its finalizer.
pub fn grants_unreadable(lock: &crate::api::Lock) -> bool {
    crate::api::grants_unreadable(lock) || crate::api::malformed(lock).is_some_and(|p| p.contains("status.draining"))
}

/// Plans one existing Lock with the requests that name it.
pub fn plan(inputs: Inputs<'_>) -> Plan {
    let Inputs { lock, requests, now, .. } = inputs;
    if grants_unreadable(lock) {
        // Holders, draining grants or the fencing token cannot be read: writing a status
        // would lose them (and free the permits they take).
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
    let old = lock.status.clone().unwrap_or_default();
    let params = spec::parse_lock_spec(lock);
    plan.invalid_spec = params.as_ref().err().cloned();

    // Tokens continue from the highest ever seen for this Lock's name, even if the status was
    // reset (by hand, a restore, the Lock recreated) while a request still remembers a higher
    // token; `queue::next_token` adds the wall clock as a floor.
    let token = old
        .holders
        .iter()
        .map(|h| h.token)
        .chain(old.draining.iter().map(|d| d.token))
        .chain(requests.iter().filter(|r| r.spec.lock_name == lock.name_any()).filter_map(|r| r.status.as_ref()?.token))
        .fold(old.fencing_token.max(0), i64::max);

    // 1 and 2: holders, how their grants end and drain, and the lock delay their ends start.
    let mut pass = holders::plan_holders(&inputs, &old, &lock_uid, &mut plan, &mut obs);
    holders::drain_unlisted_grants(&inputs, &lock_uid, &mut plan, &mut obs, &mut pass);
    let lock_delay = params.as_ref().map_or(std::time::Duration::ZERO, |p| p.lock_delay);
    let delayed_until = holders::plan_delay(&inputs, &old, lock_delay, pass.delay_starts, &mut plan, &mut obs);
    // 3: the queue.
    let queue = queue::enqueue(&inputs, &pass.handled, &params, &lock_uid, &mut plan, &mut obs);
    // 4: grants, strictly in queue order.
    let granted = queue::grant(&inputs, queue, &pass, &params, delayed_until.is_some(), token, &mut plan, &mut obs);
    // Request statuses (new grants first), then the Lock's.
    status::request_statuses(&inputs, &old, &lock_uid, &granted.holders, &granted.waiting, &mut plan);
    status::wake_for_retention(&mut plan, inputs.settings, now);
    let status = LockStatus {
        conditions: status::lock_conditions(
            &old,
            params.as_ref().map(|p| p.permits),
            &granted.holders,
            &pass.draining,
            delayed_until.is_some(),
            lock.metadata.generation,
            now,
        ),
        holders: granted.holders,
        draining: pass.draining,
        fencing_token: granted.token,
        waiting: i32::try_from(granted.waiting.len()).unwrap_or(i32::MAX),
        queue: granted.waiting.iter().take(QUEUE_WINDOW).map(|(r, _, _)| r.name_any()).collect(),
        delayed_until,
        observed_generation: lock.metadata.generation,
    };
    if lock.status.as_ref() != Some(&status) {
        plan.lock_status = Some(status);
    }
    plan.observations = obs;
    plan
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
