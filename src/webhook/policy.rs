//! The admission decisions, pure: (operation, object, old object, who asks, the Lock, and
//! whether the asker may break the Lock) → allow (with a patch) or deny (with a message that
//! names what is wrong and whose it is). No I/O: the server gathers the inputs.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::api::{
    BREAK_ANNOTATION, BROKEN_BY_ANNOTATION, FENCED_BY_LABEL, FENCED_DELETE_ANNOTATION, FENCING_TOKEN_ANNOTATION, Lock,
    OWNER_ANNOTATION, OWNER_POD_ANNOTATION, OWNER_UID_ANNOTATION, duration,
};

/// Extra keys of a ServiceAccount token bound to a pod (TokenRequest with a pod reference).
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// See [`POD_NAME_EXTRA`].
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// The operation under review.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
}

/// Who asks, as the API server authenticated them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    /// The pod a bound ServiceAccount token belongs to: (name, UID).
    pub pod: Option<(String, String)>,
}

impl User {
    /// The namespace of a ServiceAccount user (`system:serviceaccount:NS:NAME`).
    fn service_account_namespace(&self) -> Option<&str> {
        self.username.strip_prefix("system:serviceaccount:")?.split(':').next()
    }
}

/// What the webhook is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Users that may change and delete any request (the controller, the garbage collector,
    /// the namespace controller).
    pub trusted_users: Vec<String>,
    /// Groups whose members may (cluster administrators).
    pub trusted_groups: Vec<String>,
    /// The shortest lease a Lock or a request may ask for.
    pub min_lease: std::time::Duration,
    /// The most permits a Lock may have (its status must fit an etcd object).
    pub max_permits: i32,
    /// `spec.maxWaiting` when a Lock does not set it.
    pub default_max_waiting: i32,
    /// The most LockRequests a namespace may hold.
    pub max_requests_per_namespace: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            trusted_users: vec![
                "system:serviceaccount:kube-system:generic-garbage-collector".into(),
                "system:serviceaccount:kube-system:namespace-controller".into(),
            ],
            trusted_groups: vec!["system:masters".into()],
            min_lease: std::time::Duration::from_secs(1),
            max_permits: 1000,
            default_max_waiting: 10_000,
            max_requests_per_namespace: 20_000,
        }
    }
}

impl Policy {
    fn trusts(&self, user: &User) -> bool {
        self.trusted_users.contains(&user.username) || user.groups.iter().any(|g| self.trusted_groups.contains(g))
    }
}

/// An answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Allowed, with JSON-patch operations to apply (mutating) and warnings for the client.
    Allow { patch: Vec<Value>, warnings: Vec<String> },
    /// Refused: 403 with this message.
    Deny(String),
    /// The answer depends on whether the user may break the Lock named (a
    /// SubjectAccessReview of verb `break` on `locks/NAME`): ask, then decide again with it.
    NeedsBreakRight(String),
}

impl Decision {
    fn allow() -> Self {
        Decision::Allow { patch: Vec::new(), warnings: Vec::new() }
    }
}

fn annotations(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

fn label(obj: &Value, key: &str) -> Option<String> {
    obj.pointer("/metadata/labels")?.get(key)?.as_str().map(str::to_string)
}

fn name_of(obj: &Value) -> String {
    obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string()
}

/// `/` escaped for a JSON pointer.
fn pointer_key(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn set_annotation(obj: &Value, key: &str, value: &str, patch: &mut Vec<Value>) {
    if obj.pointer("/metadata/annotations").and_then(Value::as_object).is_none() && patch.is_empty() {
        patch.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    patch.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", pointer_key(key)), "value": value}));
}

/// Mutating review of a LockRequest: records the creator at create (refusing a forged one)
/// and fills `spec.podRef` from a pod-bound token; records who breaks at update.
pub fn mutate_request(op: Op, obj: &Value, old: Option<&Value>, user: &User) -> Decision {
    let mut patch = Vec::new();
    let given = annotations(obj);
    match op {
        Op::Create => {
            for (key, want) in [
                (OWNER_ANNOTATION, Some(user.username.as_str())),
                (OWNER_UID_ANNOTATION, Some(user.uid.as_str()).filter(|u| !u.is_empty())),
                (OWNER_POD_ANNOTATION, user.pod.as_ref().map(|(name, _)| name.as_str())),
            ] {
                match (given.get(key), want) {
                    (Some(have), Some(want)) if have == want => {}
                    (Some(have), _) => {
                        return Decision::Deny(format!(
                            "metadata.annotations[{key}] is set by the admission webhook to the authenticated creator; \
                             {have:?} was given, the request is made by {:?}",
                            user.username
                        ));
                    }
                    (None, Some(want)) => set_annotation(obj, key, want, &mut patch),
                    (None, None) => {}
                }
            }
            if let Some((pod, pod_uid)) = &user.pod {
                let same_namespace = user.service_account_namespace().is_some_and(|ns| {
                    obj.pointer("/metadata/namespace").and_then(Value::as_str).is_none_or(|o| o == ns)
                });
                match obj.pointer("/spec/podRef") {
                    None | Some(Value::Null) if same_namespace => {
                        patch
                            .push(json!({"op": "add", "path": "/spec/podRef", "value": {"name": pod, "uid": pod_uid}}));
                    }
                    Some(given) if same_namespace => {
                        let name = given.get("name").and_then(Value::as_str);
                        let uid = given.get("uid").and_then(Value::as_str);
                        if name != Some(pod.as_str()) || uid.is_some_and(|u| u != pod_uid) {
                            return Decision::Deny(format!(
                                "spec.podRef names pod {:?} but the request is made with the token of pod {pod}",
                                name.unwrap_or("")
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        Op::Update => {
            // Who breaks is the authenticated user, never a name the client chose.
            let old_break = old.map(annotations).and_then(|a| a.get(BREAK_ANNOTATION).cloned());
            if given.contains_key(BREAK_ANNOTATION) && given.get(BREAK_ANNOTATION) != old_break.as_ref() {
                set_annotation(obj, BROKEN_BY_ANNOTATION, &user.username, &mut patch);
            }
        }
        Op::Delete => {}
    }
    Decision::Allow { patch, warnings: Vec::new() }
}

/// The spec fields of a request that never change after create (only `renewTime` and the
/// release mark do).
const IMMUTABLE: [&str; 5] = ["lockName", "permits", "podRef", "leaseDuration", "holderIdentity"];

/// What a request's review reads besides the request: the Lock it names, if it exists, and
/// how many requests its namespace holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context<'a> {
    pub lock: Option<&'a Lock>,
    pub in_namespace: usize,
}

/// Validating review of a LockRequest; `may_break`: the answer of a SubjectAccessReview for
/// `break` on the Lock, once asked.
pub fn validate_request(
    op: Op,
    obj: Option<&Value>,
    old: Option<&Value>,
    user: &User,
    ctx: Context<'_>,
    may_break: Option<bool>,
    policy: &Policy,
) -> Decision {
    let Context { lock, in_namespace } = ctx;
    match op {
        Op::Create => {
            let Some(obj) = obj else { return Decision::allow() };
            if let Some(lease) = obj.pointer("/spec/leaseDuration").and_then(Value::as_str)
                && let Some(why) = below_floor(lease, policy)
            {
                return Decision::Deny(format!("spec.leaseDuration {why}"));
            }
            if in_namespace >= policy.max_requests_per_namespace {
                return Decision::Deny(format!(
                    "the namespace holds {in_namespace} lock requests, the most allowed ({})",
                    policy.max_requests_per_namespace
                ));
            }
            if let Some(lock) = lock {
                let waiting = lock.status.as_ref().map_or(0, |s| s.waiting);
                let max = lock.spec.max_waiting.unwrap_or(policy.default_max_waiting);
                if waiting >= max {
                    return Decision::Deny(format!(
                        "lock {} already has {waiting} waiting requests, its spec.maxWaiting is {max}",
                        lock.metadata.name.as_deref().unwrap_or("")
                    ));
                }
            }
            Decision::allow()
        }
        Op::Update | Op::Delete => {
            let Some(old) = old else { return Decision::allow() };
            let owner = annotations(old);
            let lock_name = old.pointer("/spec/lockName").and_then(Value::as_str).unwrap_or("").to_string();
            let is_owner = owner.get(OWNER_ANNOTATION).is_none_or(|o| *o == user.username)
                && owner.get(OWNER_UID_ANNOTATION).is_none_or(|u| user.uid.is_empty() || *u == user.uid)
                && owner.get(OWNER_POD_ANNOTATION).is_none_or(|p| user.pod.as_ref().is_some_and(|(n, _)| n == p));
            // The release mark frees the permits at once: it is the holder's word that it
            // stopped acting, so its creator's alone (anyone else ends a grant by a break or
            // a delete, which drain).
            let released = |o: &Value| o.pointer("/spec/released") == Some(&Value::Bool(true));
            if op == Op::Update && obj.is_some_and(released) && !released(old) && !is_owner {
                return Decision::Deny(format!(
                    "spec.released is the holder's own release: only the creator of lockrequest {} may set it (to take \
                     the lock from its holder, break it: kubelock break {lock_name})",
                    name_of(old)
                ));
            }
            if policy.trusts(user) {
                return Decision::allow();
            }
            let breaking = op == Op::Update
                && obj.is_some_and(|o| annotations(o).get(BREAK_ANNOTATION) != owner.get(BREAK_ANNOTATION));
            if breaking || !is_owner {
                match may_break {
                    None => return Decision::NeedsBreakRight(lock_name),
                    Some(true) => {}
                    Some(false) if breaking => {
                        return Decision::Deny(format!(
                            "only subjects allowed to break lock {lock_name} (verb break on locks.kubelock.dev) may \
                             break its holders"
                        ));
                    }
                    Some(false) => {
                        let whose = match owner.get(OWNER_POD_ANNOTATION) {
                            Some(pod) => {
                                format!("{} in pod {pod}", owner.get(OWNER_ANNOTATION).map_or("", String::as_str))
                            }
                            None => owner.get(OWNER_ANNOTATION).cloned().unwrap_or_default(),
                        };
                        let what = if op == Op::Delete { "delete" } else { "change" };
                        return Decision::Deny(format!(
                            "lockrequest {} belongs to {whose}: only its creator, the controller or a subject allowed \
                             to break lock {lock_name} may {what} it",
                            name_of(old)
                        ));
                    }
                }
            }
            if op == Op::Update
                && let Some(obj) = obj
            {
                // Who broke is the authenticated user the mutating webhook wrote, nobody else.
                let broken_by = annotations(obj).get(BROKEN_BY_ANNOTATION).cloned();
                if broken_by != owner.get(BROKEN_BY_ANNOTATION).cloned() && broken_by.as_ref() != Some(&user.username) {
                    return Decision::Deny(format!(
                        "metadata.annotations[{BROKEN_BY_ANNOTATION}] records who broke the request (the authenticated \
                         user, set with the break) and cannot be set by hand"
                    ));
                }
                return immutable(obj, old);
            }
            Decision::allow()
        }
    }
}

/// Refuses changes of what a request was granted for, and of the creator's record.
fn immutable(obj: &Value, old: &Value) -> Decision {
    for field in IMMUTABLE {
        let path = format!("/spec/{field}");
        if obj.pointer(&path) != old.pointer(&path) {
            return Decision::Deny(format!("spec.{field} cannot change after the request is created"));
        }
    }
    if old.pointer("/spec/released") == Some(&Value::Bool(true))
        && obj.pointer("/spec/released") != Some(&Value::Bool(true))
    {
        return Decision::Deny("spec.released cannot be unset once set".to_string());
    }
    let (new_a, old_a) = (annotations(obj), annotations(old));
    for key in [OWNER_ANNOTATION, OWNER_UID_ANNOTATION, OWNER_POD_ANNOTATION] {
        if new_a.get(key) != old_a.get(key) {
            return Decision::Deny(format!("metadata.annotations[{key}] records the creator and cannot change"));
        }
    }
    Decision::allow()
}

fn below_floor(lease: &str, policy: &Policy) -> Option<String> {
    let d = duration::parse(lease).ok()?;
    (d < policy.min_lease)
        .then(|| format!("{lease} is shorter than the shortest lease allowed ({})", duration::format(policy.min_lease)))
}

/// Validating review of a Lock: bounds that keep its status within an etcd object and its
/// holders from renewing too often.
pub fn validate_lock(obj: &Value, policy: &Policy) -> Decision {
    if let Some(p) = obj.pointer("/spec/permits").and_then(Value::as_i64)
        && p > i64::from(policy.max_permits)
    {
        return Decision::Deny(format!(
            "spec.permits {p} is more than the {} allowed (the Lock's status lists every holder)",
            policy.max_permits
        ));
    }
    if let Some(lease) = obj.pointer("/spec/leaseDuration").and_then(Value::as_str)
        && let Some(why) = below_floor(lease, policy)
    {
        return Decision::Deny(format!("spec.leaseDuration {why}"));
    }
    Decision::allow()
}

/// The tokens of a Lock's current holders.
fn current_tokens(lock: &Lock) -> Vec<i64> {
    lock.status.iter().flat_map(|s| &s.holders).map(|h| h.token).collect()
}

fn token_of(obj: &Value) -> Result<Option<i64>, String> {
    match annotations(obj).get(FENCING_TOKEN_ANNOTATION) {
        None => Ok(None),
        Some(t) => t.trim().parse::<i64>().map(Some).map_err(|_| {
            format!("metadata.annotations[{FENCING_TOKEN_ANNOTATION}] {t:?} is not a fencing token (an integer)")
        }),
    }
}

/// The Lock a fenced object's label names (from the new object, else the old one).
pub fn fencing_lock(obj: Option<&Value>, old: Option<&Value>) -> Option<String> {
    obj.and_then(|o| label(o, FENCED_BY_LABEL)).or_else(|| old.and_then(|o| label(o, FENCED_BY_LABEL)))
}

/// Validating review of a write to an object guarded by a Lock (`kubelock.dev/fenced-by`):
/// - CREATE and UPDATE carry, in `kubelock.dev/fencing-token`, the token of a current holder
///   of that Lock, not lower than the token of the object's last write;
/// - removing the label needs such a token too (it is not a way around the fence), and the
///   label cannot be moved to another Lock in one write (remove it, then set the new one);
/// - DELETE is allowed while the object's last write carries a current holder's token and
///   `kubelock.dev/fenced-delete: "true"` (a holder deletes by writing both, then deleting:
///   a stale holder can write neither, so it cannot delete what its successor wrote).
///
/// Nobody writes past the fence, whatever their rights (cluster administrators and
/// breakers included: a process with broad credentials is exactly what the fence must stop
/// when it lost its grant). The way out when a Lock was deleted for good is to recreate it,
/// acquire it and remove the label with that token.
pub fn validate_fenced(op: Op, obj: Option<&Value>, old: Option<&Value>, lock: Option<&Lock>) -> Decision {
    let Some(lock_name) = fencing_lock(obj, old) else { return Decision::allow() };
    match fence_refusal(op, obj, old, &lock_name, lock) {
        None => Decision::allow(),
        Some(why) => Decision::Deny(why),
    }
}

fn fence_refusal(
    op: Op,
    obj: Option<&Value>,
    old: Option<&Value>,
    lock_name: &str,
    lock: Option<&Lock>,
) -> Option<String> {
    let old_lock = old.and_then(|o| label(o, FENCED_BY_LABEL));
    let new_lock = obj.and_then(|o| label(o, FENCED_BY_LABEL));
    if let (Some(a), Some(b)) = (&old_lock, &new_lock)
        && a != b
    {
        return Some(format!(
            "label {FENCED_BY_LABEL} cannot move from lock {a} to lock {b} in one write: remove it with a token of {a}, \
             then set it with a token of {b}"
        ));
    }
    let Some(lock) = lock else {
        return Some(format!(
            "this object is fenced by lock {lock_name}, which does not exist (to lift the fence, create the Lock, \
             acquire it and remove the label {FENCED_BY_LABEL} with its token)"
        ));
    };
    let current = current_tokens(lock);
    let (token, whose) = match op {
        Op::Delete => match old.map(token_of) {
            Some(Ok(t)) => (t, "the object's last write"),
            Some(Err(e)) => return Some(e),
            None => (None, "the object's last write"),
        },
        Op::Create | Op::Update => match obj.map(token_of) {
            Some(Ok(t)) => (t, "this write"),
            Some(Err(e)) => return Some(e),
            None => (None, "this write"),
        },
    };
    let Some(token) = token else {
        let how = if op == Op::Delete {
            "write a current holder's token onto it before deleting it".to_string()
        } else {
            format!("set metadata.annotations[{FENCING_TOKEN_ANNOTATION}] to the token of a current holder")
        };
        return Some(format!("this object is fenced by lock {lock_name}: {whose} carries no fencing token ({how})"));
    };
    if !current.contains(&token) {
        let holders = if current.is_empty() {
            "it has no holder now".to_string()
        } else {
            format!("its current holders have token(s) {current:?}")
        };
        return Some(format!(
            "this object is fenced by lock {lock_name}: token {token} of {whose} is not a current holder's ({holders})"
        ));
    }
    if op == Op::Delete && old.is_none_or(|o| annotations(o).get(FENCED_DELETE_ANNOTATION).is_none_or(|v| v != "true"))
    {
        // A current token on the last write is not enough: it may be the successor's, and the
        // deleter a stale holder. The holder that means to delete says so under its token.
        return Some(format!(
            "this object is fenced by lock {lock_name}: a delete needs its last write to carry \
             metadata.annotations[{FENCED_DELETE_ANNOTATION}]=\"true\" with a current holder's token (write that, \
             then delete)"
        ));
    }
    if op == Op::Update
        && old_lock.is_some()
        && let Some(Ok(Some(last))) = old.map(token_of)
        && token < last
    {
        return Some(format!(
            "this object is fenced by lock {lock_name}: token {token} is lower than token {last} of its last write"
        ));
    }
    None
}

#[cfg(test)]
mod tests;
