//! What a plan decides: the Lock status to write, request statuses, deletions, events,
//! quorum reads to make first, and when to plan again.

use std::{collections::BTreeSet, time::Duration};

use kube::ResourceExt as _;

use super::{
    inputs::{Now, Observations},
    spec::{holder_identity, uid_of},
    status::{Fate, desired_status},
};
use crate::api::{Holder, LockRequest, LockRequestStatus, LockStatus, Phase, Reason};

/// The kind of a Kubernetes Event the plan asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, strum::IntoStaticStr)]
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
        self.into()
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
    pub(super) fn wake(&mut self, at: Duration) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    pub(super) fn update(&mut self, req: &LockRequest, status: LockRequestStatus, granted: bool) {
        // A status that could not be read in full is rewritten even if what was read matches.
        let unreadable = crate::api::malformed(req).is_some() && crate::api::malformed_spec(req).is_none();
        if req.status.as_ref() != Some(&status) || unreadable {
            let (name, uid) = (req.name_any(), uid_of(req).into());
            self.requests.push(RequestUpdate { name, uid, status, granted, fence: false });
        }
    }

    pub(super) fn fence(&mut self, req: &LockRequest, status: LockRequestStatus) {
        self.update(req, status, false);
        if let Some(last) = self.requests.last_mut().filter(|u| u.uid == uid_of(req)) {
            last.fence = true;
        }
    }

    /// Deletes a request its holder released (`spec.released`): the controller does it, once
    /// the release took effect, so that whoever plans next still sees the mark.
    pub(super) fn delete_released(&mut self, req: &LockRequest) {
        self.deletions.push(Deletion { name: req.name_any(), uid: uid_of(req).into() });
    }

    fn push_event(&mut self, event: PlanEvent) -> &mut PlanEvent {
        self.events.push(event);
        self.events.last_mut().expect("just pushed")
    }

    /// An event about a request alone (it happens once the request's status is written).
    pub(super) fn request_event(
        &mut self,
        kind: EventKind,
        reason: Reason,
        req: &LockRequest,
        message: String,
    ) -> &mut PlanEvent {
        self.push_event(PlanEvent {
            kind,
            reason,
            request: req.name_any(),
            request_uid: uid_of(req).into(),
            holder: holder_identity(req),
            token: None,
            message,
            wait: None,
            held: None,
            of_lock: false,
        })
    }

    /// An event about a holder entry of the Lock (a grant, or its end after holding for
    /// `held`): it happens once the Lock's status is written.
    pub(super) fn holder_event(
        &mut self,
        kind: EventKind,
        reason: Reason,
        h: &Holder,
        held: Option<Duration>,
        message: String,
    ) -> &mut PlanEvent {
        self.push_event(PlanEvent {
            kind,
            reason,
            request: h.request.clone(),
            request_uid: h.request_uid.clone(),
            holder: h.holder.clone(),
            token: Some(h.token),
            message,
            wait: None,
            held,
            of_lock: true,
        })
    }

    /// Finishes a request that holds nothing in this Lock: its final status and its event
    /// (whose note is `message` unless the caller changes it).
    pub(super) fn finish(&mut self, req: &LockRequest, now: Now, end: Finish) -> &mut PlanEvent {
        let Finish { kind, phase, reason, message } = end;
        let fate = Fate::Finished { phase, reason, message: message.clone(), holder: None, lock_uid: None };
        self.update(req, desired_status(req, fate, now), false);
        self.request_event(kind, reason, req, message)
    }
}

/// How [`Plan::finish`] ends a request.
pub(super) struct Finish {
    pub kind: EventKind,
    pub phase: Phase,
    pub reason: Reason,
    pub message: String,
}
