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
/// Label a client puts on its LockRequests: the Lock name (lets `kubectl get lkr -l` filter).
pub const LOCK_LABEL: &str = "kubelock.dev/lock";

/// The CustomResourceDefinitions of kubelock, in the order they are applied.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Lock::crd(), LockRequest::crd()]
}

/// The CRDs as one multi-document YAML stream: what `kubelock crd` prints and `crds/` holds.
pub fn crds_yaml() -> String {
    let docs: Vec<String> = crds()
        .iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD always serializes to YAML"))
        .collect();
    docs.join("---\n")
}
