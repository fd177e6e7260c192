//! What a plan reads: the time, the settings, what the controller observed earlier, and
//! the objects of one Lock as its caches (and quorum reads) hold them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use jiff::Timestamp;

use crate::api::{Lock, LockRequest};

/// The current time, as the controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// The controller's monotonic clock (time since it started). Decides expiry.
    pub mono: Duration,
    /// Wall-clock time, only written into status fields for people to read.
    pub wall: Timestamp,
}

/// Controller settings the plan depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Expired and Rejected requests are deleted this long after they finished.
    pub finished_retention: Duration,
    /// Whether pods are watched (and `podRef` honoured).
    pub watch_pods: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self { finished_retention: Duration::from_secs(15 * 60), watch_pods: true }
    }
}

/// What the controller remembers about one Lock between plans, on its monotonic clock.
/// Lost on restart, by design: every countdown then starts again (late, never early).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observations {
    /// Per holder (request UID): the renewal last seen and when it was first seen.
    pub renewals: BTreeMap<String, Renewal>,
    /// The lock delay in force, and when this controller first saw it.
    pub delay: Option<DelayObservation>,
    /// Per waiting request (UID): when this controller first saw it (for grant latency).
    pub first_seen: BTreeMap<String, Duration>,
    /// Requests (UIDs) whose grant this controller ended, kept until its cache shows them
    /// finished or gone: a cache that has not caught up with our own `Expired` mirror (or a
    /// mirror that failed) must not make them look like new waiters. Expired is final.
    pub ended: BTreeSet<String>,
    /// Requests (UIDs) granted by an earlier Lock of this name whose holders can no longer act
    /// (their drain ended): not drained again while they linger, finished, until retention.
    pub drained: BTreeSet<String>,
}

/// A holder's heartbeat as last observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// `metadata.generation` of the request (bumped by every spec write, renewals included).
    pub generation: Option<i64>,
    /// `spec.renewTime`, compared for change only.
    pub renew_time: Option<Timestamp>,
    /// When the controller observed this value (or the grant).
    pub at: Duration,
}

/// A lock delay as first observed by this controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelayObservation {
    /// The `status.delayedUntil` value it belongs to.
    pub until: Timestamp,
    /// When the delay started, on this controller's clock.
    pub at: Duration,
}

/// What the controller knows about a pod named by a `podRef`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's UID.
    pub uid: String,
    /// Phase Succeeded or Failed: its containers will not run again.
    pub terminated: bool,
    /// None of its containers runs, as far as the kubelet reported: it never reached a node,
    /// or it terminated, or it was being deleted and every container it started has
    /// terminated. A pod that vanished with this unset may still be running somewhere.
    pub stopped: bool,
}

/// Everything one plan looks at. Built by the controller from its caches and quorum reads.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The Lock.
    pub lock: &'a Lock,
    /// The Lock was read by quorum (or returned by our own write) for this plan.
    pub lock_fresh: bool,
    /// The requests whose `spec.lockName` is this Lock.
    pub requests: &'a [Arc<LockRequest>],
    /// UIDs of requests read by quorum for this plan (their content is current).
    pub fresh: &'a HashSet<String>,
    /// UIDs of requests known to be deleted (a watched deletion, or a quorum read's 404).
    pub gone: &'a HashSet<String>,
    /// UIDs of deleted requests whose last state carried `spec.released`: released by their
    /// holder before they were deleted.
    pub released: &'a HashSet<String>,
    /// Pods in the Lock's namespace, by name, as far as the controller knows them.
    pub pods: &'a BTreeMap<String, PodInfo>,
    /// Pods known not to exist (a watched deletion, or a quorum read's 404), by name, with
    /// whether their last known state shows them stopped (only a watched deletion tells).
    pub gone_pods: &'a HashMap<String, bool>,
    /// Why the controller cannot read pods, if it cannot: requests bound to a pod then wait.
    pub pods_unreadable: Option<&'a str>,
    /// UIDs of the other Locks of the namespace that exist: a request granted by one of them
    /// was re-pointed here, it is not a grant left behind by an earlier Lock of this name.
    pub other_locks: &'a HashSet<String>,
    /// Per request UID: the order in which the controller's watch first delivered it (etcd
    /// commit order). Breaks ties between requests created in the same second.
    pub arrival: &'a HashMap<String, u64>,
    /// What this controller observed in earlier plans.
    pub observations: &'a Observations,
    /// Settings.
    pub settings: &'a Settings,
    /// The time.
    pub now: Now,
}
