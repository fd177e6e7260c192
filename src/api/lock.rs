//! The `Lock` custom resource: a named capacity of `permits` that holders are granted from.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration;

/// A distributed lock: a mutex (`permits: 1`), a counting semaphore (`permits: N`) or a
/// read/write lock (readers ask for 1 permit, writers for all of them).
///
/// Users write the spec; the kubelock controller alone writes the status, and the status is
/// the single source of truth for who holds the lock.
// clippy reads the repeated `type_ = ...` of printcolumn(...) as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kubelock.dev",
    version = "v1alpha1",
    kind = "Lock",
    namespaced,
    status = "LockStatus",
    shortname = "lk",
    category = "kubelock",
    doc = "A distributed lock: mutex, counting semaphore or read/write lock, granted by the kubelock controller.",
    printcolumn(name = "Permits", type_ = "integer", json_path = ".spec.permits", priority = 1),
    printcolumn(name = "Holders", type_ = "string", json_path = ".status.holders[*].holder"),
    printcolumn(name = "Draining", type_ = "string", json_path = ".status.draining[*].holder", priority = 1),
    printcolumn(name = "Token", type_ = "integer", json_path = ".status.fencingToken"),
    printcolumn(name = "Waiting", type_ = "integer", json_path = ".status.waiting"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct LockSpec {
    /// Capacity of the lock. 1 makes a mutex; N a counting semaphore of N. A request for all
    /// permits is exclusive (a writer), a request for 1 is shared (a reader). Default 1.
    #[serde(default = "default_permits")]
    #[schemars(range(min = 1, max = 2147483647))]
    pub permits: i32,

    /// How long a holder may go without renewing (`spec.renewTime` of its LockRequest) before
    /// the controller expires it. Measured on the controller's own monotonic clock from the
    /// moment it observed the grant or the last renewal, never by comparing timestamps.
    /// Go duration syntax (`30s`, `1m30s`, `500ms`); positive, at most 8760h. Default `30s`.
    #[serde(default = "default_lease_duration")]
    #[schemars(regex(pattern = duration::POSITIVE_PATTERN))]
    pub lease_duration: String,

    /// After a holder is expired (not after a clean release), no new grant is made for this
    /// long: a guard against a holder that is paused rather than dead. Default `0s`.
    #[serde(default = "default_lock_delay")]
    #[schemars(regex(pattern = duration::PATTERN))]
    pub lock_delay: String,

    /// With the admission webhook: the most requests that may wait for this lock at once; a
    /// request beyond it is refused at create. Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub max_waiting: Option<i32>,
}

fn default_permits() -> i32 {
    1
}

fn default_lease_duration() -> String {
    "30s".into()
}

fn default_lock_delay() -> String {
    "0s".into()
}

impl Default for LockSpec {
    fn default() -> Self {
        Self {
            permits: default_permits(),
            lease_duration: default_lease_duration(),
            lock_delay: default_lock_delay(),
            max_waiting: None,
        }
    }
}

/// Observed state of a Lock, written only by the controller through a compare-and-swap on
/// the Lock's resourceVersion.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LockStatus {
    /// The requests that hold the lock now, in grant order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Holder>,

    /// Grants that have ended but whose holder may still be acting: its request was deleted
    /// by someone else, it was broken, its pod vanished without the kubelet reporting its
    /// containers stopped, its request was changed, or its Lock was recreated. Their permits
    /// stay taken until the controller has observed no renewal for their lease, the pod is
    /// reported stopped, or the holder marks its request `released`; then `lockDelay` applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<Draining>,

    /// The last fencing token issued. Every grant takes a larger one: the last plus one, or
    /// the controller's wall clock in milliseconds since the epoch if that is larger, so
    /// tokens keep increasing for a Lock's name across its deletion and recreation and after
    /// etcd is restored from a backup.
    #[serde(default)]
    pub fencing_token: i64,

    /// How many requests are queued and not granted.
    #[serde(default)]
    pub waiting: i32,

    /// The first queued requests, head first (at most 10 names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue: Vec<String>,

    /// Set while the lock delay after an expiry holds back new grants: the wall-clock time
    /// (of the controller that expired the holder) at which grants may resume. Informational;
    /// the controller measures the delay on its own monotonic clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed_until: Option<MicroTime>,

    /// `Ready` (the spec is valid and the controller reconciles the lock) and `Held`
    /// (at least one permit is granted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One grant of a Lock.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// Name of the LockRequest that was granted.
    pub request: String,
    /// UID of that LockRequest: a request recreated under the same name does not inherit the grant.
    #[serde(rename = "requestUID")]
    pub request_uid: String,
    /// The request's `spec.holderIdentity` (its name when that is empty).
    pub holder: String,
    /// Permits held by this grant.
    pub permits: i32,
    /// Fencing token of this grant: pass it to every resource you write while holding.
    pub token: i64,
    /// When the grant was made (the controller's wall clock; informational).
    pub granted_at: MicroTime,
    /// The lease this grant was made with: the request's `leaseDuration`, capped at the
    /// Lock's at grant time. The holder must renew within it.
    pub lease_duration: String,
    /// The pod the grant is bound to (the request's `podRef` at grant time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ref: Option<super::PodRef>,
}

/// A grant that has ended while its holder may still be acting (see `status.draining`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Draining {
    /// Name of the LockRequest whose grant ended.
    pub request: String,
    /// Its UID.
    #[serde(rename = "requestUID")]
    pub request_uid: String,
    /// Its holder identity.
    pub holder: String,
    /// Permits it still occupies.
    pub permits: i32,
    /// The fencing token of the grant that ended.
    pub token: i64,
    /// The grant's lease: how long after the last renewal the controller saw the holder may
    /// still act.
    pub lease_duration: String,
    /// The pod the grant was bound to, if any: its permits are freed as soon as the kubelet
    /// reports it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ref: Option<super::PodRef>,
    /// Why the grant ended (`Deleted`, `Broken`, `PodGone`, `SpecChanged`, `LockDeleted`,
    /// `RemovedFromStatus`).
    pub reason: String,
    /// When the grant ended (the controller's wall clock; informational).
    pub ended_at: MicroTime,
}

impl Lock {
    /// Permits currently granted.
    pub fn granted_permits(&self) -> i64 {
        self.status.as_ref().map_or(0, |s| s.holders.iter().map(|h| i64::from(h.permits)).sum())
    }

    /// Permits taken: granted, and held by grants that are draining.
    pub fn taken_permits(&self) -> i64 {
        self.granted_permits()
            + self.status.as_ref().map_or(0, |s| s.draining.iter().map(|d| i64::from(d.permits)).sum())
    }
}
