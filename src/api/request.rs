//! The `LockRequest` custom resource: one party asking for one Lock. Deleting it releases.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration;

/// Pattern of a Kubernetes object name (DNS-1123 subdomain), used for `spec.lockName`.
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A request for permits of one Lock in the same namespace. The requester writes the spec
/// (and renews `spec.renewTime`); the controller writes the status. Deleting the request
/// releases whatever it holds at once.
// clippy reads the repeated `type_ = ...` of printcolumn(...) as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kubelock.dev",
    version = "v1alpha1",
    kind = "LockRequest",
    namespaced,
    status = "LockRequestStatus",
    shortname = "lkr",
    category = "kubelock",
    doc = "A request for permits of a kubelock Lock; delete it to release.",
    printcolumn(name = "Lock", type_ = "string", json_path = ".spec.lockName"),
    printcolumn(name = "Holder", type_ = "string", json_path = ".spec.holderIdentity", priority = 1),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Token", type_ = "integer", json_path = ".status.token"),
    printcolumn(name = "Position", type_ = "integer", json_path = ".status.position"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct LockRequestSpec {
    /// Name of the Lock (in this namespace) to acquire. A request for a Lock that does not
    /// exist yet waits, `Pending`, until it is created.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub lock_name: String,

    /// Who holds the lock when this request is granted, free text such as `pod/ns/name` or
    /// `host:pid`. Shown in the Lock's status and in events.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 256))]
    pub holder_identity: String,

    /// Permits wanted, at most the Lock's `spec.permits` (more is `Rejected`). On a
    /// read/write lock, 1 is a reader and all permits a writer. Default 1.
    #[serde(default = "default_permits")]
    #[schemars(range(min = 1, max = 2147483647))]
    pub permits: i32,

    /// Lease for this holder, Go duration syntax. Capped at the Lock's `leaseDuration` (the
    /// effective value is reported in `status.leaseDuration`). Default: the Lock's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = duration::POSITIVE_PATTERN))]
    pub lease_duration: Option<String>,

    /// The requester's heartbeat: patch it (to any new value) about every third of the
    /// lease, while waiting and while holding. The controller only looks for changes; it
    /// never compares this time with its own clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<MicroTime>,

    /// The holder is this pod: the grant ends when the pod is deleted, replaced or has
    /// terminated. Its permits are freed at once when the kubelet has reported that none of
    /// the pod's containers runs any more (phase Succeeded or Failed, or every container
    /// terminated before the pod was deleted); a pod that vanished otherwise (force-deleted,
    /// its node lost) may still be running, so its permits stay taken until the lease passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ref: Option<PodRef>,

    /// Set by the holder itself, once it has stopped acting, right before it deletes the
    /// request (`kubelock release`, the client library, `kubelock run`, the sidecar): its
    /// permits go to the next waiter at once. A request deleted without it (by someone else,
    /// `kubectl delete`, the garbage collector) keeps its permits taken until its lease has
    /// passed since the last renewal the controller saw, since its holder may still be acting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

fn default_permits() -> i32 {
    1
}

impl LockRequestSpec {
    /// One permit of `lock_name`, no holder identity, the Lock's lease, no renewal yet, no pod.
    /// Set the other fields with struct update syntax:
    /// `LockRequestSpec { permits: 2, ..LockRequestSpec::new("db") }`.
    pub fn new(lock_name: impl Into<String>) -> Self {
        Self {
            lock_name: lock_name.into(),
            holder_identity: String::new(),
            permits: default_permits(),
            lease_duration: None,
            renew_time: None,
            pod_ref: None,
            released: false,
        }
    }
}

/// A pod in the request's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// Pod name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Pod UID; when set, a pod recreated under the same name counts as gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// Where a request stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Queued: waiting for permits (or for the Lock to exist).
    Pending,
    /// Holding the lock with `status.token`.
    Granted,
    /// Lost the lock: the lease ran out, the holder pod went away, an administrator broke
    /// it, or the Lock was deleted. Final: create a new request to acquire again.
    Expired,
    /// Can never be granted (asks for more permits than the Lock has, or an invalid spec).
    /// Final.
    Rejected,
}

impl Phase {
    /// Expired and Rejected never change again.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Expired | Phase::Rejected)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Observed state of a LockRequest, mirrored by the controller from the Lock's status after
/// each successful compare-and-swap.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LockRequestStatus {
    /// `Pending`, `Granted`, `Expired` or `Rejected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Fencing token of the grant (kept after it expires, so the loser knows which token died).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<i64>,

    /// When the grant was made (the controller's wall clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_at: Option<MicroTime>,

    /// The effective lease of the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration: Option<String>,

    /// UID of the Lock that made the grant: tokens are unique per Lock UID.
    #[serde(default, rename = "lockUID", skip_serializing_if = "Option::is_none")]
    pub lock_uid: Option<String>,

    /// Place in the queue while `Pending`, 0-based: 0 is exact and means granted next. Further
    /// back it is the place when last written, never less than the true place (the queue
    /// only moves forward): written exactly whenever the status is written anyway, and
    /// refreshed once more than twice the true place plus one, front first, at most one
    /// request per grant, so a grant costs one position write whatever the queue's length.
    /// `Lock.status.queue` lists the first 10 waiters in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<i32>,

    /// When the request became `Expired` or `Rejected`; the controller deletes it
    /// `--finished-retention` (default 15m) later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<MicroTime>,

    /// Human-readable explanation of the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// `Granted`: True while holding; its reason says why not otherwise (`Waiting`,
    /// `LockNotFound`, `LeaseExpired`, `PodGone`, `Broken`, `LockDeleted`, `TooManyPermits`...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl LockRequest {
    /// The request's phase (`Pending` until the controller says otherwise).
    pub fn phase(&self) -> Phase {
        self.status.as_ref().and_then(|s| s.phase).unwrap_or(Phase::Pending)
    }
}
