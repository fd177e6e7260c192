//! What a plan that took effect leaves behind: log lines, metrics and Kubernetes Events.
//! One function for both paths (a Lock's reconcile and the requests of a missing Lock), so
//! that every outcome is counted the same way whichever path decided it.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::{context::Context, writes::Mirrored};
use crate::{
    api::{Lock, LockRequest},
    planner::{EventKind, Plan, PlanEvent},
    telemetry::ReasonLabel,
};

/// What the events of a plan are about.
pub(super) enum Regarding<'a> {
    /// A Lock's reconcile: events regard the Lock (the request is the related object), and
    /// the Lock's status feeds the queue-depth and holders gauges.
    Lock(&'a Lock),
    /// The requests of a Lock that does not exist: events regard the request.
    Request(&'a LockRequest),
}

/// Logs, metrics and events of a plan that took effect.
pub(super) fn record(ctx: &Context, regarding: Regarding<'_>, plan: &Plan, mirrored: &Mirrored) {
    let m = &ctx.metrics;
    if let Regarding::Lock(lock) = &regarding
        && let Some(status) = lock.status.as_ref()
    {
        let uid = lock.uid().unwrap_or_default();
        m.queue_depth.set(ctx.waiting.set(&uid, i64::from(status.waiting)));
        m.holders.set(ctx.held.set(&uid, status.holders.len() as i64));
    }
    for e in plan.events.iter().filter(|e| mirrored.happened(e)) {
        log_event(e);
        match e.kind {
            EventKind::Granted => {
                m.grants.inc();
                if let Some(wait) = e.wait {
                    m.grant_latency.observe(wait.as_secs_f64());
                }
            }
            EventKind::Released => {
                m.releases.inc();
            }
            EventKind::Expired | EventKind::Broken => {
                m.expirations.get_or_create(&reason(e)).inc();
            }
            EventKind::Rejected => {
                m.rejections.get_or_create(&reason(e)).inc();
            }
        }
        if let Some(held) = e.held {
            m.hold_time.observe(held.as_secs_f64());
        }
        if let Some(sink) = &ctx.events {
            let (object, related) = match &regarding {
                Regarding::Lock(lock) => (lock.object_ref(&()), Some(request_reference(lock, e))),
                Regarding::Request(req) => (req.object_ref(&()), None),
            };
            sink.publish(object, related, e.clone());
        }
    }
}

fn reason(e: &PlanEvent) -> ReasonLabel {
    ReasonLabel { reason: e.reason.as_str() }
}

fn request_reference(lock: &Lock, e: &PlanEvent) -> ObjectReference {
    ObjectReference {
        api_version: Some(LockRequest::api_version(&()).into()),
        kind: Some(LockRequest::kind(&()).into()),
        name: Some(e.request.clone()),
        namespace: lock.namespace(),
        uid: Some(e.request_uid.clone()),
        ..Default::default()
    }
}

fn log_event(e: &PlanEvent) {
    let token = e.token.unwrap_or_default();
    match e.kind {
        EventKind::Granted => info!(request = %e.request, holder = %e.holder, token, "lock granted"),
        EventKind::Released => info!(request = %e.request, holder = %e.holder, token, "lock released"),
        EventKind::Expired | EventKind::Broken => {
            warn!(request = %e.request, holder = %e.holder, token, reason = e.reason.as_str(), message = %e.message, "grant ended")
        }
        EventKind::Rejected => {
            warn!(request = %e.request, reason = e.reason.as_str(), message = %e.message, "request rejected")
        }
    }
}
