//! The vocabulary of the status conditions: their types and reasons, typed once here and
//! turned into (and read back from) the strings stored in objects by derived conversions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The `type` of a condition in a Lock's or a LockRequest's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumString, strum::Display)]
pub enum ConditionType {
    /// Lock: the spec is valid and the controller reconciles the lock.
    Ready,
    /// Lock: at least one permit is granted.
    Held,
    /// LockRequest: holding the lock; the reason says why not otherwise.
    Granted,
}

impl ConditionType {
    /// The string stored in `conditions[].type`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The condition of this type in a list, if any.
    pub fn find(self, conditions: &[Condition]) -> Option<&Condition> {
        conditions.iter().find(|c| c.type_ == self.as_str())
    }
}

/// Why a request's grant ended or was refused: the reason of its `Granted` condition (also
/// the action of its Events and a metric label).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, strum::IntoStaticStr, strum::EnumString, strum::Display,
)]
pub enum Reason {
    /// Granted.
    Granted,
    /// The holder released the request itself (`spec.released`, then deleted): a clean release.
    Released,
    /// The request was deleted by someone else than its holder while held (no
    /// `spec.released`): its permits stay taken until the holder's lease has passed.
    Deleted,
    /// No renewal was observed for the whole lease.
    LeaseExpired,
    /// The holder pod is gone or terminated.
    PodGone,
    /// An administrator broke the lock.
    Broken,
    /// The Lock was deleted (or recreated) while this request held it.
    LockDeleted,
    /// The request's `lockName`, `permits` or `podRef` was changed while it held the lock:
    /// the grant made for the old spec ends.
    SpecChanged,
    /// The grant ended while its status was not mirrored (seen after a controller restart).
    Lost,
    /// The grant was taken out of the Lock's status by another writer than the controller
    /// (an edit of the status subresource, or the status reset): it drains like any end the
    /// holder did not report.
    RemovedFromStatus,
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
    /// Queued: the controller cannot read pods (RBAC, or the API is missing), so a request
    /// bound to a pod cannot be granted.
    PodsUnreadable,
}

impl Reason {
    /// The CamelCase name used in conditions, events and metric labels.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The reason of a Lock's `Ready` or `Held` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumString, strum::Display)]
pub enum LockReason {
    /// Ready: the spec is valid and reconciled.
    Reconciled,
    /// Not ready: the spec is invalid.
    InvalidSpec,
    /// Held: permits are granted.
    Granted,
    /// Held: no grant goes on, but ended grants whose holders may still act keep permits.
    Draining,
    /// Not held: the lock delay after an expiry holds back grants.
    LockDelay,
    /// Not held: no permit is granted.
    Free,
}

impl LockReason {
    /// The string stored in `conditions[].reason`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// `conditions[].status`.
pub fn status_string(status: bool) -> &'static str {
    if status { "True" } else { "False" }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use super::*;

    #[test]
    fn strings_round_trip() {
        for r in [Reason::Granted, Reason::LeaseExpired, Reason::PodNotFound, Reason::LockDeleted] {
            assert_eq!(Reason::from_str(r.as_str()), Ok(r));
        }
        assert_eq!(Reason::LeaseExpired.as_str(), "LeaseExpired");
        assert_eq!(ConditionType::Granted.as_str(), "Granted");
        assert_eq!(LockReason::Free.to_string(), "Free");
        assert!(Reason::from_str("Nonsense").is_err());
    }
}
