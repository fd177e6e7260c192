//! A requester speaking kubelock's protocol with plain kube-rs (docs/design.md, "Client
//! protocol"), so that the benchmark does not depend on the client library: create a
//! LockRequest, watch the Lock and the request, count as granted at the first of "listed in
//! `Lock.status.holders`" and "`phase: Granted`", mark the request released to release (the
//! controller frees its permits and deletes it).

use std::{pin::Pin, time::Instant};

use anyhow::{anyhow, bail};
use futures::{Stream, StreamExt as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{
    Api, ResourceExt as _,
    api::{ObjectMeta, PostParams},
    runtime::watcher,
};
use kubelock::api::{LOCK_LABEL, Lock, LockRequest, LockRequestSpec, LockSpec, Phase};

/// A Lock with `permits` and a lease of `lease` (None: the default, 30s).
pub fn lock(name: &str, permits: i32, lease: Option<&str>) -> Lock {
    let mut spec = LockSpec { permits, ..Default::default() };
    if let Some(lease) = lease {
        spec.lease_duration = lease.into();
    }
    Lock::new(name, spec)
}

/// A LockRequest for `lock`: named `name`, or generated from `<lock>-` when None.
pub fn request(lock: &str, name: Option<&str>, holder: &str) -> LockRequest {
    let mut req = LockRequest::new(
        "",
        LockRequestSpec {
            holder_identity: holder.into(),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            ..LockRequestSpec::new(lock)
        },
    );
    req.metadata = ObjectMeta {
        name: name.map(str::to_string),
        generate_name: name.is_none().then(|| format!("{lock}-")),
        labels: Some([(LOCK_LABEL.to_string(), lock.to_string())].into()),
        ..Default::default()
    };
    req
}

/// Which watch showed the grant first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Lock,
    Request,
}

/// What a waiter has seen.
#[derive(Clone, Copy, Debug)]
pub enum Seen {
    /// Both watches are synced and the request is `Pending`: it is queued and watching.
    Queued,
    /// Granted, first seen at `at` through `via`.
    Granted { at: Instant, via: Via },
}

enum Ev {
    Lock(Result<watcher::Event<Lock>, watcher::Error>),
    Req(Result<watcher::Event<LockRequest>, watcher::Error>),
}

/// The two watches of one request.
pub struct GrantWatch {
    events: Pin<Box<dyn Stream<Item = Ev> + Send>>,
    name: String,
    uid: String,
    lock_synced: bool,
    req_synced: bool,
    pending: bool,
    queued_told: bool,
}

impl GrantWatch {
    /// Starts watching `lock` and `req` (as created).
    pub fn new(
        locks: &Api<Lock>,
        requests: &Api<LockRequest>,
        lock: &str,
        req: &LockRequest,
    ) -> anyhow::Result<GrantWatch> {
        let name = req.name_any();
        let uid = req.uid().ok_or_else(|| anyhow!("created request {name} has no uid"))?;
        let lock_events =
            watcher(locks.clone(), watcher::Config::default().fields(&format!("metadata.name={lock}"))).map(Ev::Lock);
        let req_events =
            watcher(requests.clone(), watcher::Config::default().fields(&format!("metadata.name={name}"))).map(Ev::Req);
        Ok(GrantWatch {
            events: futures::stream::select(lock_events, req_events).boxed(),
            name,
            uid,
            lock_synced: false,
            req_synced: false,
            pending: false,
            queued_told: false,
        })
    }

    /// The next thing worth telling: queued (once), then granted.
    pub async fn next(&mut self) -> anyhow::Result<Seen> {
        loop {
            let ev = self.events.next().await.ok_or_else(|| anyhow!("watches ended"))?;
            match ev {
                Ev::Lock(Ok(watcher::Event::Apply(lock) | watcher::Event::InitApply(lock))) => {
                    let listed = lock
                        .status
                        .as_ref()
                        .is_some_and(|s| s.holders.iter().any(|h| h.request == self.name && h.request_uid == self.uid));
                    if listed {
                        return Ok(Seen::Granted { at: Instant::now(), via: Via::Lock });
                    }
                }
                Ev::Lock(Ok(watcher::Event::InitDone)) => self.lock_synced = true,
                Ev::Lock(Ok(watcher::Event::Delete(_))) => bail!("lock deleted while waiting"),
                Ev::Req(Ok(watcher::Event::Apply(req) | watcher::Event::InitApply(req))) => match req.phase() {
                    Phase::Granted if req.uid().as_deref() == Some(self.uid.as_str()) => {
                        return Ok(Seen::Granted { at: Instant::now(), via: Via::Request });
                    }
                    Phase::Pending => self.pending = req.status.as_ref().is_some_and(|s| s.phase.is_some()),
                    phase @ (Phase::Expired | Phase::Rejected) => bail!("request {} is {phase}", self.name),
                    _ => {}
                },
                Ev::Req(Ok(watcher::Event::InitDone)) => self.req_synced = true,
                Ev::Req(Ok(watcher::Event::Delete(_))) => bail!("request {} deleted while waiting", self.name),
                Ev::Lock(Ok(watcher::Event::Init)) | Ev::Req(Ok(watcher::Event::Init)) => {}
                Ev::Lock(Err(e)) | Ev::Req(Err(e)) => tracing::warn!(error = %e, "watch error (retrying)"),
            }
            if self.lock_synced && self.req_synced && self.pending && !self.queued_told {
                self.queued_told = true;
                return Ok(Seen::Queued);
            }
        }
    }

    /// Waits for the grant, ignoring `Queued`.
    pub async fn granted(&mut self) -> anyhow::Result<(Instant, Via)> {
        loop {
            if let Seen::Granted { at, via } = self.next().await? {
                return Ok((at, via));
            }
        }
    }
}

/// Creates a request for `lock` (generated name).
pub async fn create(requests: &Api<LockRequest>, lock: &str, holder: &str) -> anyhow::Result<LockRequest> {
    Ok(requests.create(&PostParams::default(), &request(lock, None, holder)).await?)
}

/// Releases as a holder does: marks the request `spec.released` (its uid in the patch: a
/// request recreated under the name refuses it); the controller frees and deletes it.
pub async fn release(requests: &Api<LockRequest>, req: &LockRequest) -> anyhow::Result<()> {
    let mark = serde_json::json!({"metadata": {"uid": req.uid()}, "spec": {"released": true}});
    match requests.patch(&req.name_any(), &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&mark)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
