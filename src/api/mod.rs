//! The kubelock API: `Lock` and `LockRequest` (group `kubelock.dev`, version `v1alpha1`),
//! the constants shared by controller and clients, and CRD generation.
//!
//! Types only: nothing here talks to the API server or imports the controller.

pub mod duration;
mod lock;
mod request;

pub use lock::{Holder, Lock, LockSpec, LockStatus};
pub use request::{LockRequest, LockRequestSpec, LockRequestStatus, NAME_PATTERN, Phase, PodRef};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of kubelock's resources.
pub const GROUP: &str = "kubelock.dev";
/// API version of kubelock's resources.
pub const VERSION: &str = "v1alpha1";

/// Field manager of every write the controller makes.
pub const CONTROLLER_MANAGER: &str = "kubelock-controller";
/// Field manager of every write a client (run, sidecar, CLI, library) makes.
pub const CLIENT_MANAGER: &str = "kubelock-client";

/// Annotation on a LockRequest asking the controller to break (force-expire) its grant;
/// the value is the reason. Set by `kubelock break`.
pub const BREAK_ANNOTATION: &str = "kubelock.dev/break";
/// Annotation naming who asked for the break (recorded in the event).
pub const BROKEN_BY_ANNOTATION: &str = "kubelock.dev/broken-by";
/// In-memory only, never written: the controller marks an object that does not match the
/// schema of this version (e.g. written before a schema change) with what is wrong, so that
/// the planner refuses it with a clear condition instead of the whole watch failing.
pub const MALFORMED_ANNOTATION: &str = "kubelock.dev/malformed";

/// Label a client puts on its LockRequests: the Lock name (lets `kubectl get lkr -l` filter).
pub const LOCK_LABEL: &str = "kubelock.dev/lock";

/// Reads a watched object into its Rust type without ever failing: an object that does not
/// match (a field of the wrong type, an integer out of range) keeps its metadata, whatever
/// of its spec can be read, and [`MALFORMED_ANNOTATION`] saying what is wrong.
pub fn lenient<K>(value: serde_json::Value, placeholder: impl FnOnce(&serde_json::Value) -> K) -> K
where
    K: serde::de::DeserializeOwned + kube::Resource,
{
    let mut value = value;
    let full = match serde_json::from_value::<K>(value.clone()) {
        Ok(obj) => return obj,
        Err(e) => e.to_string(),
    };
    // The spec alone, if only the status is unreadable.
    let status = value.as_object_mut().and_then(|o| o.remove("status"));
    let (mut obj, problem) = match serde_json::from_value::<K>(value.clone()) {
        Ok(obj) if status.is_some() => (obj, format!("status does not match the schema: {full}")),
        _ => (placeholder(&value), format!("spec does not match the schema: {full}")),
    };
    if let Ok(meta) =
        serde_json::from_value::<kube::api::ObjectMeta>(value.get("metadata").cloned().unwrap_or_default())
    {
        *obj.meta_mut() = meta;
    }
    obj.meta_mut().annotations.get_or_insert_with(Default::default).insert(MALFORMED_ANNOTATION.into(), problem);
    obj
}

/// What is wrong with an object read by [`lenient`], if anything.
pub fn malformed<K: kube::Resource>(obj: &K) -> Option<&str> {
    obj.meta().annotations.as_ref()?.get(MALFORMED_ANNOTATION).map(String::as_str)
}

/// A Lock that could not be read: no permits, so nothing is granted.
pub fn placeholder_lock(_value: &serde_json::Value) -> Lock {
    Lock::new("", LockSpec { permits: 0, ..Default::default() })
}

/// A LockRequest that could not be read: only its `spec.lockName` (to file it), if a string.
pub fn placeholder_request(value: &serde_json::Value) -> LockRequest {
    let lock_name = value.pointer("/spec/lockName").and_then(|v| v.as_str()).unwrap_or_default();
    LockRequest::new(
        "",
        LockRequestSpec {
            lock_name: lock_name.into(),
            holder_identity: String::new(),
            permits: 1,
            lease_duration: None,
            renew_time: None,
            pod_ref: None,
        },
    )
}

/// The CustomResourceDefinitions of kubelock, in the order they are applied.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Lock::crd(), LockRequest::crd()]
}

/// The CRDs as one multi-document YAML stream: what `kubelock crd` prints and `crds/` holds.
pub fn crds_yaml() -> String {
    let docs: Vec<String> =
        crds().iter().map(|crd| serde_yaml::to_string(crd).expect("a CRD always serializes to YAML")).collect();
    docs.join("---\n")
}
