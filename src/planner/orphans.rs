//! Requests whose Lock does not exist (never created, or deleted): they wait for it, and
//! a grant made by a deleted Lock ends once that deletion is certain.

use std::{collections::HashSet, sync::Arc};

use super::{
    inputs::{Now, Settings},
    outcome::{Check, EventKind, Finish, Plan},
    spec::{break_message, holder_identity, parse_request_spec, uid_of},
    status::{Fate, desired_status, retain_finished, wake_for_retention},
};
use crate::api::{LockRequest, Phase, Reason};

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
        if r.spec.released {
            plan.delete_released(r); // nothing acts on it
            continue;
        }
        let status = r.status.clone().unwrap_or_default();
        match r.phase() {
            Phase::Expired | Phase::Rejected => retain_finished(r, settings, now, &mut plan),
            Phase::Granted => {
                // Only once the deletion of the granting Lock is certain.
                let granted_by = status.lock_uid.clone().unwrap_or_default();
                if !lock_gone_uids.contains(&granted_by) {
                    plan.checks.insert(Check::Lock);
                    continue;
                }
                let message = format!("lock {lock_name} was deleted while held");
                let note = format!("{} lost token {}: {message}", holder_identity(r), status.token.unwrap_or_default());
                let end =
                    Finish { kind: EventKind::Expired, phase: Phase::Expired, reason: Reason::LockDeleted, message };
                let e = plan.finish(r, now, end);
                e.message = note;
                e.token = status.token;
            }
            Phase::Pending => match (break_message(r), parse_request_spec(r)) {
                (Some(message), _) => {
                    let end =
                        Finish { kind: EventKind::Broken, phase: Phase::Expired, reason: Reason::Broken, message };
                    plan.finish(r, now, end);
                }
                (None, Err(message)) => {
                    let end = Finish {
                        kind: EventKind::Rejected,
                        phase: Phase::Rejected,
                        reason: Reason::InvalidSpec,
                        message,
                    };
                    plan.finish(r, now, end);
                }
                (None, Ok(_)) => {
                    let message = format!("waiting: lock {lock_name} does not exist");
                    let fate = Fate::Waiting { position: 0, reason: Reason::LockNotFound, message };
                    let mut desired = desired_status(r, fate, now);
                    desired.position = None;
                    plan.update(r, desired, false);
                }
            },
        }
    }
    wake_for_retention(&mut plan, settings, now);
    plan
}
