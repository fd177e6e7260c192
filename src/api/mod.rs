//! The kubelock API: `Lock` and `LockRequest` (group `kubelock.dev`, version `v1alpha1`),
//! the constants shared by controller and clients, and CRD generation.
//!
//! Types only: nothing here talks to the API server or imports the controller.

mod conditions;
pub mod duration;
mod lock;
mod request;

pub use conditions::{ConditionType, LockReason, Reason, status_string};
pub use lock::{Draining, Holder, Lock, LockSpec, LockStatus};
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

/// Annotation the admission webhook sets on a LockRequest at create: the authenticated user
/// who created it (nobody can set or change it by hand). Only that user, the controller and
/// those allowed to break the Lock may change or delete the request.
pub const OWNER_ANNOTATION: &str = "kubelock.dev/owner";
/// The UID of [`OWNER_ANNOTATION`]'s user, when the authenticator gives one.
pub const OWNER_UID_ANNOTATION: &str = "kubelock.dev/owner-uid";
/// The pod whose bound ServiceAccount token created the request: later writes must come from
/// the same pod (replicas sharing a ServiceAccount cannot touch each other's requests).
pub const OWNER_POD_ANNOTATION: &str = "kubelock.dev/owner-pod";
/// The finalizer the controller puts on a Lock before its first grant: a Lock being deleted
/// stays until its grants drained (its status is where they are remembered), and only then
/// goes. A recreated Lock of the name therefore never misses a grant that may still act.
pub const LOCK_FINALIZER: &str = "kubelock.dev/grants";
/// Label of an object guarded by a Lock (its value): with the admission webhook, it accepts
/// writes only with the fencing token of a current holder of that Lock.
pub const FENCED_BY_LABEL: &str = "kubelock.dev/fenced-by";
/// Annotation carrying the fencing token of a write to an object [`FENCED_BY_LABEL`] guards.
pub const FENCING_TOKEN_ANNOTATION: &str = "kubelock.dev/fencing-token";
/// Set to `"true"`, with a current holder's token, on the last write before deleting an
/// object [`FENCED_BY_LABEL`] guards: the delete is admitted only then.
pub const FENCED_DELETE_ANNOTATION: &str = "kubelock.dev/fenced-delete";

/// Label a client puts on its LockRequests: the Lock name (lets `kubectl get lkr -l` filter).
pub const LOCK_LABEL: &str = "kubelock.dev/lock";

/// Reads a watched object into its Rust type without ever failing: an object that does not
/// match (a field of the wrong type, an integer out of range) keeps its metadata and every
/// field that can be read, and gets [`MALFORMED_ANNOTATION`] naming each field that could not
/// (`spec.leaseDuration: invalid type: sequence, expected a string`). Unreadable fields are
/// dropped one at a time (a spec field, a status field, or one entry of a status list such as
/// `status.holders[2]`); if the object still cannot be read, `placeholder` builds one from
/// what is left.
pub fn lenient<K>(value: serde_json::Value, placeholder: impl FnOnce(&serde_json::Value) -> K) -> K
where
    K: serde::de::DeserializeOwned + kube::Resource,
{
    if let Ok(obj) = serde_json::from_value::<K>(value.clone()) {
        return obj;
    }
    let mut salvaged = value;
    let mut problems: Vec<String> = Vec::new();
    // Each round drops one unreadable field (a bounded number of rounds).
    for _ in 0..16 {
        let text = serde_json::to_string_pretty(&salvaged).unwrap_or_default();
        let err = match serde_json::from_str::<K>(&text) {
            Ok(_) => break,
            Err(e) => e,
        };
        let what = without_position(&err);
        let paths = line_paths(&salvaged);
        let path = err.line().checked_sub(1).and_then(|l| paths.get(l)).cloned().unwrap_or_default();
        let cut = match path.first().map(String::as_str) {
            Some("spec") if path.len() >= 2 => 2,
            // One entry of a status list, or one status field.
            Some("status") if path.len() >= 3 && path[2].parse::<usize>().is_ok() => 3,
            Some("status") if path.len() >= 2 => 2,
            _ => {
                let at = if path.is_empty() { String::new() } else { format!("{}: ", display_path(&path)) };
                problems.push(format!("{at}{what}"));
                break;
            }
        };
        problems.push(format!("{}: {what}", display_path(&path)));
        remove_path(&mut salvaged, &path[..cut]);
    }
    let mut obj = match serde_json::from_value::<K>(salvaged.clone()) {
        Ok(obj) => obj,
        Err(_) => placeholder(&salvaged),
    };
    if let Ok(meta) =
        serde_json::from_value::<kube::api::ObjectMeta>(salvaged.get("metadata").cloned().unwrap_or_default())
    {
        *obj.meta_mut() = meta;
    }
    let problem = format!("does not match the schema: {}", problems.join("; "));
    obj.meta_mut().annotations.get_or_insert_with(Default::default).insert(MALFORMED_ANNOTATION.into(), problem);
    obj
}

/// The path of the JSON value on each line of `serde_json::to_string_pretty(v)`.
fn line_paths(v: &serde_json::Value) -> Vec<Vec<String>> {
    fn walk(v: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        let children: Vec<(String, &serde_json::Value)> = match v {
            serde_json::Value::Object(m) => m.iter().map(|(k, c)| (k.clone(), c)).collect(),
            serde_json::Value::Array(a) => a.iter().enumerate().map(|(i, c)| (i.to_string(), c)).collect(),
            _ => return,
        };
        if children.is_empty() {
            return; // `{}` or `[]` on the line of its key
        }
        for (key, child) in children {
            path.push(key);
            out.push(path.clone());
            walk(child, path, out);
            path.pop();
        }
        out.push(path.clone()); // the closing bracket
    }
    let mut out = vec![Vec::new()];
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// `status.holders[2].permits`
fn display_path(path: &[String]) -> String {
    let mut text = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() {
            text.push_str(&format!("[{part}]"));
        } else {
            if !text.is_empty() {
                text.push('.');
            }
            text.push_str(part);
        }
    }
    text
}

fn remove_path(v: &mut serde_json::Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut node = v;
    for p in parents {
        let next = match node {
            serde_json::Value::Object(m) => m.get_mut(p),
            serde_json::Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return,
        }
    }
    match node {
        serde_json::Value::Object(m) => {
            m.remove(last);
        }
        serde_json::Value::Array(a) => {
            if let Ok(i) = last.parse::<usize>()
                && i < a.len()
            {
                a.remove(i);
            }
        }
        _ => {}
    }
}

/// A serde error without its ` at line L column C` suffix.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// What is wrong with an object read by [`lenient`], if anything.
pub fn malformed<K: kube::Resource>(obj: &K) -> Option<&str> {
    obj.meta().annotations.as_ref()?.get(MALFORMED_ANNOTATION).map(String::as_str)
}

/// What is wrong with an object read by [`lenient`] outside its status (the part its owner
/// writes), if anything. Problems of the status alone (which the controller writes, and
/// rewrites) do not make a request invalid.
pub fn malformed_spec<K: kube::Resource>(obj: &K) -> Option<&str> {
    let problem = malformed(obj)?;
    let list = problem.strip_prefix("does not match the schema: ").unwrap_or(problem);
    list.split("; ").any(|p| !p.starts_with("status")).then_some(problem)
}

/// Whether [`lenient`] could not read all of a Lock's grants (`status.holders` or
/// `status.fencingToken`): such a status must not be overwritten, or grants and tokens that
/// nobody could read would be lost.
pub fn grants_unreadable<K: kube::Resource>(obj: &K) -> bool {
    malformed(obj).is_some_and(|p| p.contains("status.holders") || p.contains("status.fencingToken"))
}

/// A Lock whose spec could not be read: no permits, so nothing is granted; its status is
/// kept if it can be read (its grants and fencing token must not be lost).
pub fn placeholder_lock(value: &serde_json::Value) -> Lock {
    let mut lock = Lock::new("", LockSpec { permits: 0, ..Default::default() });
    lock.status = value.get("status").and_then(|s| serde_json::from_value(s.clone()).ok());
    lock
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
            released: false,
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
