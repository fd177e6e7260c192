//! The controller's writes, each carrying the resourceVersion it read: the compare-and-swap
//! of a Lock's status, the fence of a grant's end on its request (before the Lock), the
//! mirror of request statuses (after it), and the cleanup of finished requests.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use futures::StreamExt as _;
use kube::{
    Api, Resource, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, ObjectMeta, PostParams, Preconditions},
};
use tracing::{debug, warn};

use super::{Error, cache::strip_meta, context::Context, reconcile::Reads};
use crate::{
    api::{self, CONTROLLER_MANAGER, LockRequest, LockRequestStatus},
    planner::{Plan, PlanEvent},
};

/// Mirror writes in flight at once for one Lock.
const MIRROR_CONCURRENCY: usize = 16;

/// Mirror writes of one reconcile at most; the rest are left to the next one, which comes at
/// once. A queue seen for the first time (a controller started on 100,000 waiting requests)
/// needs a status for each; written in one go they held up every grant of their Lock for
/// minutes (the next reconcile, which grants, waits for this one to end).
pub(super) const MIRROR_BUDGET: usize = 512;

pub(super) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn post_params() -> PostParams {
    PostParams { field_manager: Some(CONTROLLER_MANAGER.into()), ..Default::default() }
}

/// API calls on a kubelock kind that read answers leniently ([`api::lenient`]) and write a
/// status with a minimal body: name, namespace, resourceVersion (the compare-and-swap) and
/// the status. The status subresource keeps everything else from the stored object.
pub(super) struct Objects<K> {
    api: Api<DynamicObject>,
    placeholder: fn(&serde_json::Value) -> K,
}

impl<K> Objects<K>
where
    K: Resource<DynamicType = ()> + serde::de::DeserializeOwned + Clone,
{
    pub(super) fn new(client: kube::Client, ns: &str, placeholder: fn(&serde_json::Value) -> K) -> Self {
        Self { api: Api::namespaced_with(client, ns, &ApiResource::erase::<K>(&())), placeholder }
    }

    fn typed(&self, obj: DynamicObject) -> K {
        let mut typed = api::lenient(serde_json::to_value(&obj).unwrap_or_default(), self.placeholder);
        strip_meta(typed.meta_mut());
        typed
    }

    pub(super) async fn get_opt(&self, ctx: &Context, name: &str) -> Result<Option<K>, Error> {
        Ok(ctx.call(self.api.get_opt(name)).await?.map(|o| self.typed(o)))
    }

    /// Sets the finalizers of `obj` to `finalizers`, as of the resourceVersion read (a merge
    /// patch carrying it: 409 if the object changed meanwhile).
    pub(super) async fn set_finalizers(&self, ctx: &Context, obj: &K, finalizers: Vec<String>) -> Result<K, Error> {
        let meta = obj.meta();
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": meta.resource_version, "finalizers": finalizers},
        });
        let name = meta.name.clone().unwrap_or_default();
        let params = kube::api::PatchParams { field_manager: Some(CONTROLLER_MANAGER.into()), ..Default::default() };
        Ok(self.typed(ctx.call(self.api.patch(&name, &params, &kube::api::Patch::Merge(&patch))).await?))
    }

    pub(super) async fn replace_status(
        &self,
        ctx: &Context,
        obj: &K,
        status: &impl serde::Serialize,
    ) -> Result<K, Error> {
        let meta = obj.meta();
        let body = DynamicObject {
            types: Some(kube::api::TypeMeta { api_version: K::api_version(&()).into(), kind: K::kind(&()).into() }),
            metadata: ObjectMeta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                resource_version: meta.resource_version.clone(),
                ..Default::default()
            },
            data: serde_json::json!({ "status": status }),
        };
        let name = meta.name.clone().unwrap_or_default();
        Ok(self.typed(ctx.call(self.api.replace_status(&name, &post_params(), &body)).await?))
    }
}

/// Writes the `Expired` status of each grant the plan ends, with the resourceVersion the
/// plan read (see `planner::RequestUpdate::fence`). Returns false when one was refused (the
/// holder renewed or went meanwhile): its fresh version is in `reads`, plan again.
pub(super) async fn fence(
    ctx: &Arc<Context>,
    ns: &str,
    by_uid: &HashMap<String, Arc<LockRequest>>,
    plan: &Plan,
    reads: &mut Reads,
) -> Result<bool, Error> {
    let objects = Objects::new(ctx.client.clone(), ns, api::placeholder_request);
    let mut all = true;
    for update in plan.requests.iter().filter(|u| u.fence) {
        let Some(current) = by_uid.get(&update.uid) else { continue };
        match objects.replace_status(ctx, current, &update.status).await {
            Ok(written) => {
                ctx.metrics.write("request_fence", "ok");
                let written = Arc::new(written);
                ctx.remember_request_write(current, written.clone());
                reads.requests.insert(update.uid.clone(), written);
            }
            Err(Error::Kube(e)) if is_status(&e, 409) || is_status(&e, 404) => {
                ctx.metrics.write("request_fence", "conflict");
                debug!(request = %update.name, "the holder changed before its expiry was fenced; planning again");
                all = false;
                match objects.get_opt(ctx, &update.name).await? {
                    Some(r) if r.uid().as_deref() == Some(update.uid.as_str()) => {
                        reads.requests.insert(update.uid.clone(), Arc::new(r));
                    }
                    _ => {
                        ctx.cache.mark_request_gone(&update.uid);
                        reads.gone.insert(update.uid.clone());
                    }
                }
            }
            Err(e) => {
                ctx.metrics.write("request_fence", "error");
                return Err(e);
            }
        }
    }
    Ok(all)
}

/// Writes request statuses (after the Lock status is written). New grants go first. A
/// conflict means the request changed: its watch event brings another reconcile.
pub(super) async fn mirror(
    ctx: &Arc<Context>,
    ns: &str,
    by_uid: &HashMap<String, Arc<LockRequest>>,
    plan: &Plan,
) -> Mirrored {
    let api = Arc::new(Objects::new(ctx.client.clone(), ns, api::placeholder_request));
    let mut writes: Vec<(String, String, Arc<LockRequest>, LockRequestStatus)> = plan
        .requests
        .iter()
        .filter(|u| !u.fence) // written already, before the Lock status
        .filter_map(|u| Some((u.name.clone(), u.uid.clone(), by_uid.get(&u.uid)?.clone(), u.status.clone())))
        .collect();
    // In the plan's order: new grants, then the queue from its head.
    let more = writes.len() > MIRROR_BUDGET;
    writes.truncate(MIRROR_BUDGET);
    let writes = writes.into_iter().map(|(name, uid, current, status)| {
        let (ctx, api) = (ctx.clone(), api.clone());
        async move {
            let written = match api.replace_status(&ctx, &current, &status).await {
                Ok(written) => {
                    ctx.metrics.write("request_status", "ok");
                    ctx.remember_request_write(&current, written);
                    Some(true)
                }
                Err(Error::Kube(e)) if is_status(&e, 404) => Some(false), // gone: nothing to tell
                Err(Error::Kube(e)) if is_status(&e, 409) => {
                    // The request changed under us; a change of its status alone brings no
                    // reconcile, so retry soon.
                    ctx.metrics.write("request_status", "conflict");
                    debug!(request = %name, "request changed before its status was written");
                    None
                }
                Err(e) => {
                    ctx.metrics.write("request_status", "error");
                    warn!(request = %name, error = %e, "writing request status");
                    None
                }
            };
            (uid, written)
        }
    });
    let results: Vec<(String, Option<bool>)> =
        futures::stream::iter(writes).buffer_unordered(MIRROR_CONCURRENCY).collect().await;
    Mirrored {
        complete: results.iter().all(|(_, r)| r.is_some()),
        more,
        written: results.into_iter().filter(|(_, r)| *r == Some(true)).map(|(uid, _)| uid).collect(),
    }
}

/// What a mirror pass achieved.
pub(super) struct Mirrored {
    /// Every write succeeded (or its request is gone).
    pub complete: bool,
    /// Writes were left over for the next reconcile ([`MIRROR_BUDGET`]).
    pub more: bool,
    /// UIDs of the requests whose status was written.
    pub written: HashSet<String>,
}

impl Mirrored {
    /// Whether an event took effect: a Lock change did (its status was written), a request's
    /// own change only once its status is written (else the next plan proposes it again).
    pub(super) fn happened(&self, e: &PlanEvent) -> bool {
        e.of_lock || self.written.contains(&e.request_uid)
    }
}

/// Deletes finished requests past their retention.
pub(super) async fn delete_finished(ctx: &Arc<Context>, ns: &str, plan: &Plan) {
    let api: Api<LockRequest> = Api::namespaced(ctx.client.clone(), ns);
    let deletions: Vec<(String, String)> = plan.deletions.iter().map(|d| (d.name.clone(), d.uid.clone())).collect();
    for (name, uid) in deletions {
        if ctx.deleted_recently(&uid) {
            continue; // deleted; its watch event is on its way
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(uid.clone()), resource_version: None }),
            ..Default::default()
        };
        match ctx.call(api.delete(&name, &dp)).await {
            Ok(_) => {
                ctx.metrics.write("request_delete", "ok");
                ctx.remember_delete(&uid);
                debug!(request = %name, "deleted finished request");
            }
            Err(Error::Kube(e)) if is_status(&e, 404) || is_status(&e, 409) => {
                ctx.metrics.write("request_delete", "gone");
            }
            Err(e) => {
                ctx.metrics.write("request_delete", "error");
                warn!(request = %name, error = %e, "deleting finished request");
            }
        }
    }
}
