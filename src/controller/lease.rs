//! Leader election on a `coordination.k8s.io/v1` Lease, so that several controller replicas
//! can run with one active. Availability only: safety never depends on it, because every
//! grant is a compare-and-swap on the Lock's resourceVersion.
//!
//! The usual client-go timings: a 15 s lease, renewed every 2 s; a leader that cannot renew
//! for 10 s steps down. On shutdown the leader empties the Lease so a standby takes over at
//! once instead of waiting for it to expire.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;

use crate::api::CONTROLLER_MANAGER;

/// Lease timings.
#[derive(Clone, Debug)]
pub struct Timings {
    /// How long a Lease is valid without renewal.
    pub lease: Duration,
    /// A leader that cannot renew for this long steps down.
    pub renew_deadline: Duration,
    /// How often to renew, and how often standbys retry.
    pub retry: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self { lease: Duration::from_secs(15), renew_deadline: Duration::from_secs(10), retry: Duration::from_secs(2) }
    }
}

/// Leader-election errors.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader-election lease {0}")]
    Lost(String),
    #[error("leader election on lease {lease} is not possible: {why}")]
    Unavailable { lease: String, why: String },
}

/// Refusals in a row (403, 404) after which leader election is given up as unavailable.
const REFUSALS: u32 = 3;

/// One replica's view of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    /// The other holder's record as last seen, and when it was first seen: like our Locks,
    /// the Lease expires by observation on our own clock, never by comparing timestamps.
    observed: std::sync::Mutex<Option<(String, Instant)>>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    /// An elector for the Lease `namespace/name`, as `identity` (the pod name).
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, timings: Timings) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            timings,
            observed: std::sync::Mutex::new(None),
        }
    }

    /// Tries once to take or renew the Lease. Ok(true) when this replica leads.
    async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = i32::try_from(self.timings.lease.as_secs()).unwrap_or(15);
        let existing = tokio::time::timeout(self.timings.retry, self.api.get_opt(&self.name))
            .await
            .map_err(|_| kube::Error::Service("timed out reading the leader lease".into()))??;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            let pp = PostParams { field_manager: Some(CONTROLLER_MANAGER.into()), ..Default::default() };
            return match self.api.create(&pp, &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let record = format!("{:?}/{:?}", spec.holder_identity, spec.renew_time);
        let valid = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(seconds).max(1) as u64);
        let expired = {
            let mut observed = self.observed.lock().expect("observed lock poisoned");
            match observed.as_ref() {
                Some((seen, at)) if *seen == record => at.elapsed() >= valid,
                _ => {
                    *observed = Some((record, Instant::now()));
                    false
                }
            }
        };
        if !(ours || free || expired) {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        lease.metadata.managed_fields = None;
        let pp = PostParams { field_manager: Some(CONTROLLER_MANAGER.into()), ..Default::default() };
        // Carries the resourceVersion read: two replicas can never both take it.
        match tokio::time::timeout(self.timings.retry, self.api.replace(&self.name, &pp, &lease)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if is_conflict(&e) => Ok(false),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(kube::Error::Service("timed out renewing the leader lease".into())),
        }
    }

    /// Waits until this replica leads (standbys retry every `retry`), or until the Lease API
    /// refused us a few times in a row (403: RBAC; 404: no such API): then leader election
    /// is unavailable, which the caller may run without (safety never depends on it).
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        let mut logged = false;
        let mut refusals = 0;
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return Ok(());
                }
                Ok(false) if !logged => {
                    tracing::info!(lease = %self.name, "another replica leads; standing by");
                    logged = true;
                    refusals = 0;
                }
                Ok(false) => refusals = 0,
                Err(kube::Error::Api(s)) if s.code == 403 || s.code == 404 => {
                    refusals += 1;
                    tracing::warn!(code = s.code, error = %s.message, "leader election refused");
                    if refusals >= REFUSALS {
                        return Err(LeaderError::Unavailable { lease: self.name.clone(), why: s.message.clone() });
                    }
                }
                Err(e) => {
                    refusals = 0;
                    tracing::warn!(error = %e, "leader election");
                }
            }
            tokio::time::sleep(self.timings.retry).await;
        }
    }

    /// Renews until renewal fails for `renew_deadline`; then reports the loss on `lost`.
    pub async fn keep(&self, lost: watch::Sender<bool>) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.timings.retry).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "another replica took the leader lease");
                    let _ = lost.send(true);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the leader lease");
                    if last_ok.elapsed() >= self.timings.renew_deadline {
                        let _ = lost.send(true);
                        return;
                    }
                }
            }
        }
    }

    /// Empties the Lease if this replica holds it, so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Ok(Some(mut lease))) = tokio::time::timeout(self.timings.retry, self.api.get_opt(&self.name)).await
        else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        lease.metadata.managed_fields = None;
        let pp = PostParams { field_manager: Some(CONTROLLER_MANAGER.into()), ..Default::default() };
        match tokio::time::timeout(self.timings.retry, self.api.replace(&self.name, &pp, &lease)).await {
            Ok(Ok(_)) => tracing::info!(lease = %self.name, "released the leader lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the leader lease"),
            Err(_) => tracing::warn!("timed out releasing the leader lease"),
        }
    }
}
