//! Reading the specs: a Lock's and a request's parameters, a request's identity, its
//! place in the queue, a break asked for, the state of its pod.

use std::{cmp::Ordering, collections::HashMap, time::Duration};

use jiff::Timestamp;
use kube::ResourceExt as _;

use super::inputs::Inputs;
use crate::api::{BREAK_ANNOTATION, BROKEN_BY_ANNOTATION, Lock, LockRequest, PodRef, duration};

/// The Lock spec, parsed.
pub(super) struct LockParams {
    pub permits: i64,
    pub lease: Duration,
    pub lock_delay: Duration,
}

pub(super) fn parse_lock_spec(lock: &Lock) -> Result<LockParams, String> {
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
pub(super) struct RequestParams {
    pub permits: i64,
    pub lease: Option<Duration>,
}

pub(super) fn parse_request_spec(req: &LockRequest) -> Result<RequestParams, String> {
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

pub(crate) fn uid_of(req: &LockRequest) -> &str {
    req.metadata.uid.as_deref().unwrap_or("")
}

pub(super) fn holder_identity(req: &LockRequest) -> String {
    if req.spec.holder_identity.is_empty() { req.name_any() } else { req.spec.holder_identity.clone() }
}

pub(super) fn renewal_key(req: &LockRequest) -> (Option<i64>, Option<Timestamp>) {
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

pub(super) fn break_message(req: &LockRequest) -> Option<String> {
    let reason = req.annotations().get(BREAK_ANNOTATION)?;
    let who = req.annotations().get(BROKEN_BY_ANNOTATION).map_or("unknown", String::as_str);
    Some(format!("broken by {who}: {reason}"))
}

/// Where the pod a grant is bound to stands.
pub(super) enum PodState {
    /// No pod, pods are not watched, or the pod is there and may run.
    Fine,
    /// The pod is gone for good (deleted, replaced or terminated). `stopped`: the kubelet
    /// reported that none of its containers runs; otherwise it may still be running.
    Gone { why: String, stopped: bool },
    /// The cache does not have it and nothing confirms it is gone.
    Unknown(String),
}

/// The state of the pod `pod_ref` names.
pub(super) fn pod_state(pod_ref: Option<&PodRef>, inputs: &Inputs<'_>) -> PodState {
    // Pods not watched, or unreadable: a grant bound to a pod then ends by its lease alone
    // (waiting requests bound to a pod are held back, see the grants pass).
    let Some(pod_ref) = pod_ref.filter(|_| inputs.settings.watch_pods && inputs.pods_unreadable.is_none()) else {
        return PodState::Fine;
    };
    let name = &pod_ref.name;
    // Without a UID the reference names whichever pod has the name: a pod of that name that
    // stopped (an earlier one, still in a lagging cache, while the holder runs in the current
    // one) says nothing sure about the holder's. Its end drains; only a UID confirms a stop.
    let identified = pod_ref.uid.is_some();
    match inputs.pods.get(name) {
        // The pod named is another one now: ours is gone, and nothing says how it ended.
        Some(pod) if pod_ref.uid.as_ref().is_some_and(|uid| *uid != pod.uid) => {
            PodState::Gone { why: format!("pod {name} was replaced by another pod of the same name"), stopped: false }
        }
        Some(pod) if pod.terminated => {
            PodState::Gone { why: format!("pod {name} has terminated"), stopped: identified }
        }
        Some(_) => PodState::Fine,
        None => match inputs.gone_pods.get(name) {
            Some(stopped) => PodState::Gone { why: format!("pod {name} was deleted"), stopped: *stopped && identified },
            None => PodState::Unknown(name.clone()),
        },
    }
}
